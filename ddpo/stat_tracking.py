"""Per-prompt reward statistics for advantages (DDPO's per_prompt_stat_tracking)."""

from collections import defaultdict, deque

import numpy as np


class PerPromptStatTracker:
    """Normalises each reward by the mean and std of recent rewards for the same prompt.

    A prompt with fewer than ``min_count`` rewards in its buffer falls back to the statistics of
    the whole current batch. Buffers keep the newest ``buffer_size`` rewards per prompt.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        # grouped as Python strings: numpy's string comparison drops trailing NULs and matches nothing
        rows: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            rows[str(prompt)].append(i)
        advantages = np.full_like(rewards, np.nan)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for prompt, index in rows.items():
            buffer = self.buffers[prompt]
            buffer.extend(rewards[index].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6
            advantages[index] = (rewards[index] - mean) / std
        return advantages

    def stats(self) -> dict[str, float]:
        return {"num_tracked_prompts": len(self.buffers)}

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(values) for prompt, values in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffers; ValueError (nothing changed) unless they are prompts -> lists of finite numbers."""
        buffers = state.get("buffers") if isinstance(state, dict) else None
        if not isinstance(buffers, dict):
            raise ValueError("the per-prompt statistics hold no 'buffers' object")
        for prompt, values in buffers.items():
            if not (
                isinstance(values, list)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
            ):
                raise ValueError(f"the per-prompt statistics of {prompt[:40]!r} are not a list of finite numbers")
        self.buffers.clear()
        for prompt, values in buffers.items():
            self.buffers[prompt].extend(float(v) for v in values)


def global_advantages(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)
