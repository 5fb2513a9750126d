"""The interface the training loop needs from a diffusion model.

A new model family (SDXL, SD3, ...) is a new subclass of ``DDPOPipeline`` plus a YAML file in
``conf/pipeline/``; the loop does not change.
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # the trained tensors under their own names


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

    @property
    def max_num_steps(self) -> int | None:
        """The most denoising steps the scheduler can take (None: no limit)."""
        return None

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
    def export(self, directory: str) -> list[str]:
        """Write the trained weights in the model family's diffusers format; return the files.

        What ``final/`` and every checkpoint hold: ``pipe.load_lora_weights(directory)`` (LoRA) or
        ``from_pretrained`` (full fine-tuning) loads it.
        """

    def read_export(self, directory: str) -> dict[str, torch.Tensor]:
        """The trained tensors by name, read back from an ``export`` (when ``export_is_exact``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read its export back")

    @property
    def export_is_exact(self) -> bool:
        """Whether ``export`` holds exactly the trained tensors under recoverable names (full fine-tuning).

        When it does not (LoRA: diffusers renames the adapter's keys), checkpoints also keep the
        trained tensors by their own names.
        """
        return False

    def save_trained(self, directory: str) -> list[str]:
        """A checkpoint's weights: the diffusers export, plus the exact trained tensors if it is not exact."""
        from safetensors.torch import save_file

        files = self.export(directory)
        if not self.export_is_exact:
            path = os.path.join(directory, TRAINED_WEIGHTS_FILE)
            save_file({k: v.contiguous().cpu() for k, v in self.trained_state_dict().items()}, path)
            files.append(path)
        return files

    def load_trained(self, directory: str) -> None:
        """Load what ``save_trained`` wrote (or a checkpoint of an older version, which always has the file)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, TRAINED_WEIGHTS_FILE)
        self.load_trained_state_dict(load_file(path) if os.path.isfile(path) else self.read_export(directory))
