"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv:2509.16117): online RL on the forward process.

Only the final clean sample x0 of each rollout, its conditioning and its reward are kept (a FINAL
rollout, collected with any sampler, no log probabilities). Each sample is trained at several of
its sampler's timesteps with fresh noise: x_t = forward noising of x0, and the trained policy
(theta) and the old policy (theta_old, no gradients) predict x0 from x_t. Two implicit policies mix
them, with weights that sum to one (so the mixture means the same in x0, epsilon, v or velocity
space: every parametrisation here is affine in the network output at fixed x_t, t):

    positive  x+ = beta x_theta + (1 - beta) x_old        negative  x- = (1 + beta) x_old - beta x_theta

and half their sum is the old policy exactly. A sample's optimality probability r = clip(A, -c, c) /
(2c) + 1/2 in [0, 1] (c = adv_clip_max = 5: r = A / 10 + 1/2) weighs the positive policy's diffusion
loss against the negative one's, each divided by its own adaptive weight (the stop-gradient mean
|x_hat - x0| of the sample, DiffusionNFT's normalisation):

    loss = c [ r ||x+ - x0||^2 / w+  +  (1 - r) ||x- - x0||^2 / w- ] / beta  (+ kl_coef ||f_theta - f_ref||^2)

(c = adv_clip_max, the official scale; f the network output). The epoch's samples are drawn by the
old policy, as in the official code.

Rewarded samples pull the policy towards them, penalised ones push it away, and nothing needs the
sampler's likelihood. After each epoch the old policy moves towards the trained one,
theta_old <- eta theta_old + (1 - eta) theta, with eta = min(old_decay_rate x step, old_decay_max)
after ``global_step`` optimizer steps (the official schedule: eta = 0 at first, so the old policy
follows the trained one closely early on).

Identities the tests check: (x+ + x-) / 2 = x_old; with r = 1/2 and theta = theta_old the gradient is
zero; with r = 1 and beta = 1 the loss is the adaptive-weighted diffusion loss on the samples.
"""

from __future__ import annotations

import numpy as np
import torch

from ddpo.algorithms.base import FINAL, Algorithm
from ddpo.algorithms.groups import PromptGroups
from ddpo.errors import ConfigError

WEIGHT_FLOOR = 1e-5  # the adaptive weight's lower bound (an x0 prediction already exact)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def implicit_policies(x_theta: torch.Tensor, x_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) implicit policies' predictions: their mean is ``x_old`` for any beta."""
    return beta * x_theta + (1 - beta) * x_old, (1 + beta) * x_old - beta * x_theta


def adaptive_loss(prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per sample: the squared x0 error divided by the stop-gradient mean absolute error (floored)."""
    with torch.no_grad():
        weight = per_sample_mean((prediction.double() - x0.double()).abs()).clamp(min=WEIGHT_FLOOR).to(prediction.dtype)
    return per_sample_mean((prediction - x0) ** 2) / weight


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """r = clip(A, -c, c) / (2c) + 1/2: 0 for the worst samples, 1 for the best, 1/2 for the average."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0.0, 1.0)


class NFT(PromptGroups, Algorithm):
    """Args:
    group_size: samples per prompt per epoch (advantages are relative to the prompt's group).
    beta: the implicit policies' step (official default 1.0; 0.1 in its OCR and multi-reward configs).
    kl_coef: weight of the squared distance of the network output to the reference policy's (official
        train.beta = 1e-4; 0 disables it).
    adv_clip_max: advantages are clipped to [-c, c] before becoming r (c = 5: r = A / 10 + 1/2).
    eps: added to the epoch's reward std.
    old_decay_rate, old_decay_max: eta = min(old_decay_rate x global step, old_decay_max).
    """

    rollout = FINAL
    needs_old_policy = True

    def __init__(
        self,
        group_size: int,
        beta: float = 1.0,
        kl_coef: float = 1e-4,
        adv_clip_max: float = 5.0,
        eps: float = 1e-4,
        old_decay_rate: float = 0.001,
        old_decay_max: float = 0.5,
    ):
        self.group_size = self.check_group_size(group_size)
        if not beta > 0:
            raise ConfigError(f"algorithm.beta must be > 0 (got {beta})")
        if not kl_coef >= 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0 (got {kl_coef})")
        if not adv_clip_max > 0:
            raise ConfigError(f"algorithm.adv_clip_max must be > 0 (got {adv_clip_max})")
        if not eps > 0:
            raise ConfigError(f"algorithm.eps must be > 0 (got {eps})")
        if not (old_decay_rate >= 0 and 0 <= old_decay_max < 1):
            raise ConfigError(
                f"algorithm.old_decay_rate must be >= 0 and old_decay_max in [0, 1) (got {old_decay_rate}, {old_decay_max})"
            )
        self.beta, self.kl_coef, self.adv_clip_max, self.eps = beta, kl_coef, adv_clip_max, eps
        self.old_decay_rate, self.old_decay_max = old_decay_rate, old_decay_max
        self.last_decay = 0.0

    def describe(self, samples_per_epoch: int) -> str:
        return f"{super().describe(samples_per_epoch)}, final samples only (DiffusionNFT)"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        groups = self.grouped(rewards, prompts)
        centred = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std() + self.eps)
        return np.clip(centred.reshape(-1), -self.adv_clip_max, self.adv_clip_max)

    def old_decay(self, global_step: int) -> float:
        """eta after ``global_step`` optimizer steps."""
        return min(self.old_decay_rate * global_step, self.old_decay_max)

    @property
    def other_forwards_per_training_call(self) -> int:
        return 1 + int(self.needs_reference)  # the old policy (+ the reference)

    def sampling_policy(self, pipeline):
        """The official code samples the epoch's rollouts with the old policy."""
        return pipeline.old_policy()

    def loss(self, pipeline, batch: dict[str, torch.Tensor], advantages: torch.Tensor):
        x0, steps = batch["x0"], batch["step_index"]
        x_t = pipeline.noised(x0, steps, pipeline.forward_noise(batch))
        with torch.no_grad(), pipeline.old_policy():
            old_output = pipeline.predict_output(x_t, steps, batch)
        output = pipeline.predict_output(x_t, steps, batch)
        x_theta, x_old = pipeline.x0_from_output(output, x_t, steps), pipeline.x0_from_output(old_output, x_t, steps)
        positive, negative = implicit_policies(x_theta, x_old, self.beta)
        r = optimality(advantages, self.adv_clip_max)
        scale = pipeline.loss_scale(steps)  # 1 in x0 space (flow); epsilon space for SD's UNets
        policy = scale * (r * adaptive_loss(positive, x0) + (1 - r) * adaptive_loss(negative, x0)) / self.beta
        loss = (policy * self.adv_clip_max).mean()  # the official scale (x adv_clip_max)
        stats = {"policy_loss": loss.detach(), "r_mean": r.mean()}
        if self.kl_coef > 0:  # on the network outputs, as the official code (velocity for SD3)
            with torch.no_grad(), pipeline.reference():
                reference = pipeline.predict_output(x_t, steps, batch)
            kl = per_sample_mean((output - reference) ** 2)
            loss = loss + self.kl_coef * kl.mean()
            stats["kl_ref"] = kl.detach().mean()
        with torch.no_grad():
            stats["x0_error"] = per_sample_mean((x_theta - x0) ** 2).mean()
            stats["old_distance"] = per_sample_mean((output - old_output) ** 2).mean()
        return loss, stats

    def end_epoch(self, pipeline, global_step: int) -> None:
        self.last_decay = self.old_decay(global_step)
        pipeline.update_old_policy(self.last_decay)

    def summary(self, record: dict) -> str:
        return f"loss {record['loss']:.3g}  x0 err {record['x0_error']:.3g}  old dist {record['old_distance']:.2g}"

    def stats(self) -> dict[str, float]:
        return {"old_decay": self.last_decay}
