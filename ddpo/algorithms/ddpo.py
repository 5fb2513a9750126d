"""DDPO (Black et al. 2023): one prompt per sample, advantages from per-prompt reward statistics."""

from __future__ import annotations

import numpy as np

from ddpo.algorithms.base import PolicyGradient
from ddpo.stat_tracking import PerPromptStatTracker, global_advantages


class DDPO(PolicyGradient):
    """DDPO-IS: PPO on each sample's advantage, normalised by the recent rewards of its prompt
    (``per_prompt_stat_tracking``, as in ddpo-pytorch) or over the whole epoch.

    Args:
        stat_tracking: ``{enabled, buffer_size, min_count}`` (the run's ``per_prompt_stat_tracking``).
    """

    def __init__(
        self,
        clip_range: float,
        adv_clip_max: float,
        stat_tracking: dict,
        kl_coef: float = 0.0,
        track_kl_ref: bool = False,
    ):
        super().__init__(clip_range, adv_clip_max, kl_coef, track_kl_ref)
        self.tracker = (
            PerPromptStatTracker(stat_tracking["buffer_size"], stat_tracking["min_count"])
            if stat_tracking["enabled"]
            else None
        )

    def raw_advantages(self, rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
        if self.tracker is not None:
            return self.tracker.update(prompts, rewards)
        return global_advantages(rewards)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("stat_tracker") is not None:
            self.tracker.load_state_dict(state["stat_tracker"])

    def stats(self) -> dict[str, float]:
        return self.tracker.stats() if self.tracker is not None else {}
