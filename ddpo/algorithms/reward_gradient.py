"""Reward-gradient fine-tuning: DRaFT (Clark et al., ICLR 2024, arXiv:2309.17400) and AlignProp
(Prabhudesai et al., arXiv:2310.03739).

The loss is the reward itself: each batch is sampled with gradients through the chain's last K steps
and the decode (``pipeline.sample_with_grad``), scored by a differentiable reward
(``reward.score_with_grad``), and ``-reward_scale x mean reward`` is backpropagated into the trained
weights. Nothing is stored between sampling and training (a ``DIFFERENTIABLE`` rollout): the loop
samples, scores and steps batch by batch.

- DRaFT-K: gradients through the last K steps (K = 1: DRaFT-1, the paper's recommendation);
- DRaFT-LV: K = 1 and the last step re-drawn ``draws`` times from the re-noised clean sample, the
  rewards of the draws averaged (lower variance for one extra step and decode per draw);
- AlignProp: K drawn uniformly per batch from ``truncation`` = [k_min, k_max] (randomised truncated
  backpropagation, against the collapse a fixed short K invites).

Optionally the trained weights are pulled back to where they started (``base_decay`` x ||theta -
theta_start||^2: weight decay towards the base model rather than towards zero), the regulariser
that keeps a reward optimiser near the model it improves. Gradient-norm clipping is the loop's
(``train.max_grad_norm``).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ddpo.algorithms.base import DIFFERENTIABLE, Algorithm
from ddpo.errors import ConfigError
from ddpo.seeds import derived_seed, sample_seed


class RewardGradient(Algorithm):
    """Backpropagate a differentiable reward through the sampling chain's tail (see the module docstring).

    Args:
        grad_steps: K, the sampling steps the gradient passes through (the last ones); >= 1.
        truncation: [k_min, k_max] to draw K uniformly per batch (AlignProp); null: always ``grad_steps``.
            k_max null: up to every step of the chain.
        draws: DRaFT-LV's re-drawn last steps per sample (1: plain DRaFT-K); > 1 needs K = 1.
        reward_scale: the loss is -reward_scale x the batch's mean reward.
        base_decay: weight of ||theta - theta_start||^2 in the loss (0: off).
        checkpoint: recompute the denoiser calls and the decode in the backward pass instead of keeping
            their activations (memory for compute).
    """

    rollout = DIFFERENTIABLE

    def __init__(
        self,
        grad_steps: int = 1,
        truncation: list[int | None] | tuple | None = None,
        draws: int = 1,
        reward_scale: float = 1.0,
        base_decay: float = 0.0,
        checkpoint: bool = True,
    ):
        if truncation is None and not grad_steps >= 1:
            raise ConfigError(
                f"algorithm.grad_steps must be >= 1 (got {grad_steps}): with K = 0 no sampling step is "
                "differentiated and the reward's gradient never reaches the trained weights"
            )
        if truncation is not None:
            truncation = list(truncation)
            if len(truncation) != 2 or truncation[0] is None or truncation[0] < 1:
                raise ConfigError(
                    f"algorithm.truncation must be [k_min, k_max] with k_min >= 1 (got {truncation}); k_max null "
                    "means every step; K = 0 would train nothing"
                )
            if truncation[1] is not None and truncation[1] < truncation[0]:
                raise ConfigError(f"algorithm.truncation: k_max {truncation[1]} < k_min {truncation[0]}")
        if not draws >= 1:
            raise ConfigError(f"algorithm.draws must be >= 1 (got {draws})")
        if draws > 1 and (truncation is not None or grad_steps != 1):
            raise ConfigError(
                f"algorithm.draws={draws} re-draws the last step (DRaFT-LV), which differentiates K = 1 step: "
                "set algorithm.grad_steps=1 and algorithm.truncation=null"
            )
        if not base_decay >= 0:
            raise ConfigError(f"algorithm.base_decay must be >= 0 (got {base_decay})")
        self.grad_steps, self.truncation, self.draws = int(grad_steps), truncation, int(draws)
        self.reward_scale, self.base_decay, self.checkpoint = float(reward_scale), float(base_decay), bool(checkpoint)
        self._start: list[torch.Tensor] | None = None

    # -- the chain ---------------------------------------------------------------------------------
    def check_steps(self, num_steps: int) -> None:
        top = self.grad_steps if self.truncation is None else (self.truncation[1] or num_steps)
        if top > num_steps:
            key = "algorithm.grad_steps" if self.truncation is None else "algorithm.truncation's k_max"
            raise ConfigError(f"{key}={top} exceeds the chain's sample.num_steps={num_steps}")
        self.num_steps = num_steps

    def steps_of_batch(self, seed: int, epoch: int, index: int) -> int:
        """K of the sampling batch whose first sample is ``index``: drawn from a seed of (seed, epoch,
        index) under truncation, so that a resumed run and any process count draw the same K."""
        if self.truncation is None:
            return self.grad_steps
        low, high = self.truncation[0], self.truncation[1] or self.num_steps
        return random.Random(derived_seed(sample_seed(seed, epoch, index), 3)).randint(low, high)

    def describe(self, samples_per_epoch: int) -> str:
        if self.truncation is None:
            through = f"the last {self.grad_steps} step(s)"
        else:
            through = f"the last K ~ U{{{self.truncation[0]}..{self.truncation[1] or self.num_steps}}} steps"
        lv = f", the last step re-drawn {self.draws}x (DRaFT-LV)" if self.draws > 1 else ""
        return f"{samples_per_epoch} prompts drawn independently; reward gradient through {through} and the decode{lv}"

    # -- the loss ------------------------------------------------------------------------------------
    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        """None are used: the reward's gradient is the signal. Zeros, for the loop's bookkeeping."""
        return np.zeros_like(rewards, dtype=np.float32)

    def start(self, pipeline) -> None:
        """Before training (and before a resume loads weights): remember theta_start for ``base_decay``."""
        if self.base_decay > 0 and self._start is None:
            self._start = [p.detach().clone() for p in pipeline.trainable_parameters()]

    def loss(self, pipeline, batch: dict[str, torch.Tensor], advantages=None):
        """-reward_scale x mean of ``batch["rewards"]`` (differentiable scores) (+ the pull to the start)."""
        rewards = batch["rewards"]
        loss = -self.reward_scale * rewards.float().mean()
        stats = {}
        if self.base_decay > 0:
            if self._start is None:
                raise RuntimeError("start(pipeline) was not called before training")
            parameters = pipeline.trainable_parameters()
            distance = sum(((p.float() - s.float()) ** 2).sum() for p, s in zip(parameters, self._start))
            loss = loss + self.base_decay * distance
            stats["base_distance"] = distance.detach()
        return loss, stats

    def summary(self, record: dict) -> str:
        return f"loss {record['loss']:.3g}  grad norm {record['grad_norm']:.3g}"


class DRaFT(RewardGradient):
    """DRaFT-K (``grad_steps`` = K) and DRaFT-LV (``draws`` = n > 1)."""


class AlignProp(RewardGradient):
    """AlignProp: randomised truncated backpropagation (K drawn per batch from ``truncation``)."""

    def __init__(self, truncation=(1, None), **kwargs):
        super().__init__(truncation=truncation, **kwargs)
