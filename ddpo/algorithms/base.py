"""The interface the loop needs from an RL algorithm, and the PPO loss the policy-gradient ones share.

An algorithm decides, and the loop asks it:

- how an epoch's samples get their prompts and noise (``sample_seeds``): one prompt per sample,
  or groups of samples sharing a prompt;
- which kind of rollout it trains on (``rollout``): ``"transitions"`` (every step's latents and
  log probability, for policy gradients), ``"final"`` (the clean sample and its conditioning
  only, for forward-process methods) or ``"differentiable"`` (nothing stored: each batch is sampled
  with gradients and its differentiable reward is the loss, for reward-gradient methods);
- how advantages follow from the rewards of the whole epoch, gathered from every process in the
  order of the samples' global index (``advantages``);
- the loss of a training batch (``loss``), given the pipeline that scores it;
- what happens at the end of an epoch (``end_epoch``: an old policy or an EMA moves), and what the
  epoch's log line shows (``summary``).

It knows rewards, prompts, log probabilities or predictions, never a model family. A new algorithm
is one module (a subclass of ``Algorithm``, or of ``PolicyGradient`` for a PPO-style one) and one
YAML file in ``conf/algorithm/`` naming it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import numpy as np
import torch

from ddpo.errors import ConfigError
from ddpo.seeds import derived_seed, sample_seed

TRANSITIONS, FINAL, DIFFERENTIABLE = "transitions", "final", "differentiable"  # rollout kinds (ddpo.pipelines.base)


class Algorithm(ABC):
    """What every algorithm answers; the defaults are one prompt and one noise per sample."""

    rollout: str = TRANSITIONS  # which rollout the pipeline fills for it
    needs_old_policy: bool = False  # the pipeline keeps a second, slowly moving copy of the trained weights

    # -- sampling ---------------------------------------------------------------------------------
    def sample_seeds(self, seed: int, epoch: int, index: int) -> tuple[int, int]:
        """(prompt seed, noise seed) of sample ``index`` of ``epoch``: each sample its own prompt and noise."""
        own = sample_seed(seed, epoch, index)
        return derived_seed(own, 1), derived_seed(own, 2)

    def shared_noise_seed(self, seed: int, epoch: int, index: int) -> int | None:
        """The seed of the noise sample ``index`` shares with others (its initial latent, and with
        ``branch_step`` every step but that one); None: all its noise from its own noise seed."""
        return None

    def branch_step(self, seed: int, epoch: int, index: int) -> int | None:
        """The one step at which sample ``index``'s chain leaves its group's shared noise (the only
        step stored and trained); None: the chain does not branch."""
        return None

    @property
    def stored_steps(self) -> int | None:
        """Transitions stored per sample when the algorithm decides it (1 when chains branch)."""
        return None

    def check_steps(self, num_steps: int) -> None:
        """Refuse settings that do not fit a chain of ``num_steps`` steps (one ConfigError)."""

    def check_plan(self, samples_per_epoch: int) -> None:
        """Refuse an epoch size the algorithm cannot use (one ConfigError naming the keys)."""

    def describe(self, samples_per_epoch: int) -> str:
        """What the start-up line says about how the epoch's samples are drawn."""
        return f"{samples_per_epoch} prompts drawn independently"

    # -- advantages and the loss ------------------------------------------------------------------
    @abstractmethod
    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Advantages of the whole epoch's samples (global index order)."""

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads the reference policy (the base model before training)."""
        return False

    @abstractmethod
    def loss(self, pipeline, batch: dict[str, torch.Tensor], advantages: torch.Tensor):
        """(loss, diagnostics) of a training batch: what ``rollout.transitions(rows, steps)`` returned."""

    @property
    def other_forwards_per_training_call(self) -> int:
        """Forward passes (no gradients) of other policies per call of the trained one in ``loss``: what
        ``scripts/bench.py`` adds to the compute floor."""
        return int(self.needs_reference)

    def start(self, pipeline) -> None:
        """Before training, and before a resume loads the trained weights (what the run starts from)."""

    def sampling_policy(self, pipeline):
        """The policy the epoch's rollouts are drawn with (a context manager): the trained one by default."""
        return contextlib.nullcontext()

    def end_epoch(self, pipeline, global_step: int) -> None:
        """After the epoch's last optimizer step (an old policy or EMA moves here)."""

    def summary(self, record: dict) -> str:
        """The algorithm's part of the epoch's log line, from the epoch's metrics record."""
        return f"loss {record['loss']:.3g}"

    # -- state (checkpointed as JSON) ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def stats(self) -> dict[str, float]:
        """Extra numbers for the epoch's metrics record."""
        return {}


class PolicyGradient(Algorithm):
    """PPO with clipped importance ratios on log probabilities of stored transitions, plus an optional
    KL penalty to the reference model (the base model before training).

    Args:
        clip_range: PPO ratio clip range (log probs are per-element means, hence DDPO's 1e-4).
        adv_clip_max: advantages are clipped to [-adv_clip_max, adv_clip_max].
        kl_coef: weight of KL(policy || reference) per transition in the loss; 0 disables it.
        track_kl_ref: compute and log ``kl_ref`` even when ``kl_coef`` is 0 (one extra forward pass
            of the reference per training call).
    """

    rollout = TRANSITIONS

    def __init__(self, clip_range: float, adv_clip_max: float, kl_coef: float = 0.0, track_kl_ref: bool = False):
        if not clip_range > 0:
            raise ConfigError(f"train.clip_range must be > 0 (got {clip_range})")
        if not adv_clip_max > 0:
            raise ConfigError(f"train.adv_clip_max must be > 0 (got {adv_clip_max})")
        if not kl_coef >= 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0 (got {kl_coef})")
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.kl_coef = kl_coef
        self.track_kl_ref = track_kl_ref

    @abstractmethod
    def raw_advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Advantages of the whole epoch's samples (global index order), before clipping."""

    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        return np.clip(self.raw_advantages(rewards, prompts), -self.adv_clip_max, self.adv_clip_max)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.track_kl_ref

    def loss(self, pipeline, batch: dict[str, torch.Tensor], advantages: torch.Tensor):
        """PPO clipped loss (+ kl_coef x KL to the reference) on stored transitions, with diagnostics."""
        log_prob, mean, std = pipeline.log_prob(batch)
        old = batch["log_probs"]
        ratio = torch.exp(log_prob - old)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - self.clip_range, 1.0 + self.clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        stats = {}
        if self.needs_reference:
            with torch.no_grad(), pipeline.reference():
                _, ref_mean, _ = pipeline.log_prob(batch)
            kl = gaussian_kl(mean, ref_mean, std)
            if self.kl_coef > 0:
                loss = loss + self.kl_coef * kl.mean()
            stats["kl_ref"] = kl.detach().mean()
        with torch.no_grad():
            stats.update(
                {
                    "approx_kl": 0.5 * torch.mean((log_prob - old) ** 2),
                    "clipfrac": torch.mean((torch.abs(ratio - 1.0) > self.clip_range).float()),
                    "ratio_dev_max": torch.max(torch.abs(ratio - 1.0)),
                }
            )
        return loss, stats

    def summary(self, record: dict) -> str:
        return f"loss {record['loss']:.3g}  kl {record['approx_kl']:.2g}  clipfrac {record['clipfrac']:.3f}"


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians with the same std, per transition: the per-element mean of
    (mean - ref_mean)^2 / (2 std^2), the reduction the log probabilities use."""
    std = std.float().reshape(-1, *([1] * (mean.ndim - 1)))
    squared = (mean.float() - ref_mean.float()) ** 2 / (2 * std**2)
    return squared.mean(dim=tuple(range(1, mean.ndim)))
