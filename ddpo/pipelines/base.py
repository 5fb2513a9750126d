"""The interface the training loop needs from a diffusion model.

A new model family (SDXL, SD3, ...) is a new subclass of ``DDPOPipeline`` plus a YAML file in
``conf/pipeline/``; the loop does not change.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch


@dataclass
class SampleBatch:
    """One batch of sampled images and the denoising chain that produced them.

    ``latents[:, j]`` is x_t at step j and ``next_latents[:, j]`` the x_{t-1} drawn from it;
    ``log_probs[:, j]`` is the log probability of that transition under the sampling policy.
    """

    prompt_embeds: torch.Tensor  # (B, L, D) text conditioning, reused in training
    timesteps: torch.Tensor  # (B, T)
    latents: torch.Tensor  # (B, T, C, h, w)
    next_latents: torch.Tensor  # (B, T, C, h, w)
    log_probs: torch.Tensor  # (B, T), float32
    images: torch.Tensor  # (B, 3, H, W), float32 in [0, 1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DDPOPipeline(ABC):
    """Sampling with log probabilities, log-prob recomputation with gradients, trained weights."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning for a batch of prompts (no gradients)."""

    @abstractmethod
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> SampleBatch:
        """Sample images and record every transition with its log probability (no gradients).

        ``generator`` may be a list with one generator per sample: each sample's initial latent and
        step noise then come from its own generator, whatever batch it is drawn in.
        """

    @abstractmethod
    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        cfg: bool = True,
    ) -> torch.Tensor:
        """Log probability (B,) of stored transitions x_t -> x_{t-1}, with gradients.

        ``timesteps`` holds one timestep per element, so one call may score transitions from
        different steps of the chain; ``num_steps`` is the length of the chain they were sampled
        with (it fixes the schedule, hence each step's predecessor). With ``cfg`` the guidance is
        applied exactly as in sampling.
        """

    @abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters are trained (handed to accelerate.prepare)."""

    @abstractmethod
    def use_wrapped(self, wrapped: torch.nn.Module) -> None:
        """Run forward passes through ``wrapped`` (the module accelerate.prepare returned)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the trained tensors, by name: what a checkpoint must hold."""
        return {
            name: p.detach() for name, p in self.trainable_module().named_parameters() if p.requires_grad
        }

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_module().named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"trained weights do not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    @abstractmethod
    def save_final(self, directory: str) -> list[str]:
        """Write the trained weights in the model family's usual format; return the files."""
