"""Groups of samples sharing a prompt in an epoch (GRPO, DiffusionNFT, AWM): how they are drawn and
how their rewards are read back in groups.

The groups are consecutive global sample indices, so a group may span batches and processes:
advantages are computed on the rewards gathered from every process, in index order.
"""

from __future__ import annotations

import numpy as np

from ddpo.errors import ConfigError
from ddpo.seeds import derived_seed, group_seed, sample_seed


class PromptGroups:
    """``group_size`` samples per prompt, each with its own noise; set ``self.group_size`` (``check_group_size``)."""

    group_size: int

    def check_group_size(self, group_size: int) -> int:
        if group_size < 2:
            raise ConfigError(f"algorithm.group_size must be >= 2 (got {group_size}): a group of one has no baseline")
        return group_size

    def sample_seeds(self, seed: int, epoch: int, index: int) -> tuple[int, int]:
        group = group_seed(seed, epoch, index // self.group_size)
        return derived_seed(group, 1), derived_seed(sample_seed(seed, epoch, index), 2)

    def check_plan(self, samples_per_epoch: int) -> None:
        if samples_per_epoch % self.group_size:
            raise ConfigError(
                f"algorithm.group_size={self.group_size} does not divide the {samples_per_epoch} samples per epoch "
                "(processes x sample.num_batches_per_epoch x sample.batch_size)"
            )

    def describe(self, samples_per_epoch: int) -> str:
        return f"{samples_per_epoch // self.group_size} prompts x {self.group_size} samples (groups)"

    def grouped(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        """The epoch's rewards as (groups, group_size), float64, after checking each group holds one prompt."""
        groups = np.asarray(rewards, dtype=np.float64).reshape(-1, self.group_size)
        grouped_prompts = [prompts[i : i + self.group_size] for i in range(0, len(prompts), self.group_size)]
        if any(len(set(g)) != 1 for g in grouped_prompts):  # the sampling and the gather order disagree
            raise RuntimeError("a group holds different prompts: samples were not gathered in index order")
        return groups
