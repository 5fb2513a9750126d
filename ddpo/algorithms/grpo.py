"""GRPO-style group-relative advantages (Shao et al. 2024; Flow-GRPO, Liu et al. 2025).

Every prompt of an epoch is drawn for a group of ``group_size`` samples, and each sample's advantage
is its reward relative to its own group: (r - group mean) / (group std + eps). No reward history is
kept. The groups are consecutive global sample indices, so a group may span batches and processes:
advantages are computed on the rewards gathered from every process.
"""

from __future__ import annotations

import numpy as np

from ddpo.algorithms.base import PolicyGradient
from ddpo.algorithms.groups import PromptGroups
from ddpo.errors import ConfigError
from ddpo.seeds import derived_seed, group_seed


class GRPO(PromptGroups, PolicyGradient):
    """Args:
    group_size: samples per prompt in every epoch (>= 2).
    scale_by_std: divide by the group's std (GRPO); false keeps only the mean baseline (Dr. GRPO).
    eps: added to the group std (Flow-GRPO uses 1e-4).
    shared_noise: the samples of a group share their initial noise; each still draws its own step
        noise, so they differ only by the sampler's steps.
    branch_window: [start, end) step indices, or None. Each group branches at one step drawn from
        the window (uniformly, per group and epoch): its samples share the initial noise and every
        step's noise but that step's, so their chains agree up to it and part there, and the
        reward differences within the group come from that one step, the only one stored and
        trained (branched rollouts: single-step credit as in TempFlow-GRPO, He et al. 2025). DDIM
        pipelines keep eta at the other steps, with the group's shared noise; pipeline=flow_sde
        takes the SDE at the branch step only and the ODE elsewhere, as TempFlow-GRPO does.
    """

    def __init__(
        self,
        clip_range: float,
        adv_clip_max: float,
        group_size: int,
        scale_by_std: bool = True,
        eps: float = 1e-4,
        shared_noise: bool = False,
        branch_window: list[int] | tuple[int, int] | None = None,
        kl_coef: float = 0.0,
        track_kl_ref: bool = False,
    ):
        super().__init__(clip_range, adv_clip_max, kl_coef, track_kl_ref)
        self.group_size = self.check_group_size(group_size)
        if not eps > 0:
            raise ConfigError(f"algorithm.eps must be > 0 (got {eps})")
        self.scale_by_std = scale_by_std
        self.eps = eps
        self.shared_noise = shared_noise
        self.branch_window = None
        if branch_window is not None:
            window = tuple(int(i) for i in branch_window)
            if len(window) != 2 or not 0 <= window[0] < window[1]:
                raise ConfigError(
                    f"algorithm.branch_window must be [start, end) with 0 <= start < end (got {list(branch_window)})"
                )
            self.branch_window = window

    def shared_noise_seed(self, seed: int, epoch: int, index: int) -> int | None:
        if not (self.shared_noise or self.branch_window):
            return None
        return derived_seed(group_seed(seed, epoch, index // self.group_size), 3)

    def branch_step(self, seed: int, epoch: int, index: int) -> int | None:
        if self.branch_window is None:
            return None
        start, end = self.branch_window
        return start + derived_seed(group_seed(seed, epoch, index // self.group_size), 5) % (end - start)

    @property
    def stored_steps(self) -> int | None:
        return 1 if self.branch_window else None

    def check_steps(self, num_steps: int) -> None:
        if self.branch_window and self.branch_window[1] > num_steps:
            raise ConfigError(
                f"algorithm.branch_window={list(self.branch_window)} ends after the chain's "
                f"sample.num_steps={num_steps} steps"
            )

    def describe(self, samples_per_epoch: int) -> str:
        described = f"{samples_per_epoch // self.group_size} prompts x {self.group_size} samples (GRPO groups)"
        if self.branch_window:
            described += f", each group branching at one step of {list(self.branch_window)}"
        return described

    def raw_advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        groups = self.grouped(rewards, prompts)
        centred = groups - groups.mean(axis=1, keepdims=True)
        if self.scale_by_std:
            centred = centred / (groups.std(axis=1, keepdims=True) + self.eps)
        return centred.reshape(-1)
