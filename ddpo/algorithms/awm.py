"""Advantage Weighted Matching (Xue et al. 2025, arXiv:2509.25050; scxue/advantage_weighted_matching).

A policy gradient whose log-likelihood is the forward process's own: for a final sample x0 noised
afresh at a training step, log p ~ -||f_theta(x_t, t) - target||^2 (the flow-matching or epsilon
loss, per-element mean), bent by a generalised Huber function and weighted by the step's noise
coefficient c (sigma for flow matching, as the official code multiplies by t):

    log p = -c ((mse + 1e-10)^p - (1e-10)^p) / p          (p = ghuber_power; p = 1/2 is Huber-like)

Training is on-policy: the ratio exp(log p - stopgrad(log p)) is exactly 1, so the clipped PPO loss
is -A log p in gradient, every sample weighted by its advantage. Advantages are relative to the
prompt's group over the epoch's std (the official ``global_std``), clipped to +-adv_clip_max and
scaled to +-advantage_max. Two regularisers on the network output, both squared distances: to the
reference policy (``kl_coef``, the official beta) and to a slowly moving EMA of the trained weights
(``ema_kl_coef``, the official ema_beta), which after each epoch moves by
theta_ema <- d theta_ema + (1 - d) theta, d = min(ema_decay_max, ema_decay_rate x global step)
(the official "linear" schedule).

Official settings (config/dgx_awm.py, SD3.5-M GenEval/OCR): lr 3e-4, LoRA, 14 sampling steps without
CFG, 24 images per prompt, 6 training timesteps of the sampler's steps 1..12, p = 0.25, clip 1,
advantage_max 1, beta 0.001 (GenEval) / 0.003 (OCR), ema_beta 1, EMA decay min(0.3, 0.001 step).
"""

from __future__ import annotations

import numpy as np
import torch

from ddpo.algorithms.base import FINAL, Algorithm
from ddpo.algorithms.groups import PromptGroups
from ddpo.algorithms.nft import per_sample_mean
from ddpo.errors import ConfigError

TINY = 1e-10  # the official offset inside the power (its gradient at a zero loss stays finite)


def ghuber_log_likelihood(mse: torch.Tensor, weight: torch.Tensor, power: float) -> torch.Tensor:
    """-weight ((mse + 1e-10)^p - (1e-10)^p) / p: 0 at a perfect prediction, decreasing in the error."""
    floor = torch.tensor(TINY, dtype=mse.dtype, device=mse.device)
    return -((mse + TINY).pow(power) - floor.pow(power)) * weight / power


class AWM(PromptGroups, Algorithm):
    """Args:
    group_size: samples per prompt per epoch.
    ghuber_power: p of the generalised Huber log-likelihood (official 0.25); 1 is the plain loss.
    clip_range: PPO ratio clip (official 1; on-policy the ratio is 1 anyway).
    adv_clip_max, advantage_max: advantages clipped to +-adv_clip_max, then scaled to +-advantage_max.
    kl_coef: weight of ||f_theta - f_ref||^2 (official beta 0.001); ema_kl_coef: of ||f_theta - f_ema||^2 (1).
    ema_decay_rate, ema_decay_max: the EMA's decay min(ema_decay_max, ema_decay_rate x global step).
    eps: added to the epoch's reward std.
    """

    rollout = FINAL
    needs_old_policy = True  # the EMA the loss stays close to

    def __init__(
        self,
        group_size: int,
        ghuber_power: float = 0.25,
        clip_range: float = 1.0,
        adv_clip_max: float = 5.0,
        advantage_max: float = 1.0,
        kl_coef: float = 0.001,
        ema_kl_coef: float = 1.0,
        ema_decay_rate: float = 0.001,
        ema_decay_max: float = 0.3,
        eps: float = 1e-4,
    ):
        self.group_size = self.check_group_size(group_size)
        for key, value in (("ghuber_power", ghuber_power), ("clip_range", clip_range), ("eps", eps)):
            if not value > 0:
                raise ConfigError(f"algorithm.{key} must be > 0 (got {value})")
        for key, value in (("adv_clip_max", adv_clip_max), ("advantage_max", advantage_max)):
            if not value > 0:
                raise ConfigError(f"algorithm.{key} must be > 0 (got {value})")
        for key, value in (("kl_coef", kl_coef), ("ema_kl_coef", ema_kl_coef), ("ema_decay_rate", ema_decay_rate)):
            if not value >= 0:
                raise ConfigError(f"algorithm.{key} must be >= 0 (got {value})")
        if not 0 <= ema_decay_max < 1:
            raise ConfigError(f"algorithm.ema_decay_max must be in [0, 1) (got {ema_decay_max})")
        self.ghuber_power, self.clip_range, self.eps = ghuber_power, clip_range, eps
        self.adv_clip_max, self.advantage_max = adv_clip_max, advantage_max
        self.kl_coef, self.ema_kl_coef = kl_coef, ema_kl_coef
        self.ema_decay_rate, self.ema_decay_max = ema_decay_rate, ema_decay_max
        self.last_decay = 0.0

    def describe(self, samples_per_epoch: int) -> str:
        return f"{super().describe(samples_per_epoch)}, final samples only (AWM)"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        groups = self.grouped(rewards, prompts)
        centred = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std() + self.eps)
        clipped = np.clip(centred.reshape(-1), -self.adv_clip_max, self.adv_clip_max)
        return clipped / self.adv_clip_max * self.advantage_max

    def loss(self, pipeline, batch: dict[str, torch.Tensor], advantages: torch.Tensor):
        x0, steps = batch["x0"], batch["step_index"]
        noise = pipeline.forward_noise(batch)
        x_t = pipeline.noised(x0, steps, noise)
        output = pipeline.predict_output(x_t, steps, batch)
        mse = per_sample_mean((output.double() - pipeline.output_target(x0, noise, steps).double()) ** 2)
        log_prob = ghuber_log_likelihood(mse, pipeline.noise_coefficient(steps).double(), self.ghuber_power)
        ratio = torch.exp(log_prob - log_prob.detach())  # on-policy: exactly 1, with the gradient of log p
        advantages = advantages.to(ratio.dtype)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - self.clip_range, 1.0 + self.clip_range)
        loss = torch.maximum(unclipped, clipped).mean().float()
        stats = {"policy_loss": loss.detach(), "mse": mse.detach().mean().float()}
        stats["ratio_dev_max"] = (ratio.detach() - 1).abs().max().float()
        if self.kl_coef > 0:
            with torch.no_grad(), pipeline.reference():
                reference = pipeline.predict_output(x_t, steps, batch)
            kl = per_sample_mean((output - reference) ** 2).mean()
            loss = loss + self.kl_coef * kl
            stats["kl_ref"] = kl.detach()
        if self.ema_kl_coef > 0:
            with torch.no_grad(), pipeline.old_policy():
                ema = pipeline.predict_output(x_t, steps, batch)
            kl_ema = per_sample_mean((output - ema) ** 2).mean()
            loss = loss + self.ema_kl_coef * kl_ema
            stats["kl_ema"] = kl_ema.detach()
        return loss, stats

    @property
    def other_forwards_per_training_call(self) -> int:
        return int(self.ema_kl_coef > 0) + int(self.needs_reference)

    def ema_decay(self, global_step: int) -> float:
        return min(self.ema_decay_max, self.ema_decay_rate * global_step)

    def end_epoch(self, pipeline, global_step: int) -> None:
        self.last_decay = self.ema_decay(global_step)
        pipeline.update_old_policy(self.last_decay)

    def summary(self, record: dict) -> str:
        return f"loss {record['loss']:.3g}  mse {record['mse']:.3g}  kl_ema {record.get('kl_ema', 0.0):.2g}"

    def stats(self) -> dict[str, float]:
        return {"ema_decay": self.last_decay}
