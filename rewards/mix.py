"""A weighted sum of rewards, configured in YAML.

    _target_: ddpo.rewards.mix.WeightedSum
    components:
      aesthetic: {weight: 1.0, reward: {_target_: ddpo.rewards.aesthetic.AestheticReward}}
      jpeg_compressibility: {weight: 0.1, reward: {_target_: ddpo.rewards.jpeg.JpegCompressibility}}

Hydra instantiates the nested rewards before this class sees them. ``info`` holds each
component's raw (unweighted) per-image reward under the component's name, and each component's
own info entries as ``<component>.<key>``. The mix is differentiable (``score_with_grad``) when
every component is.
"""

from __future__ import annotations

from collections.abc import Mapping

from ddpo.errors import ConfigError

from .base import Reward, as_reward_tensor, check_images


def _build(name: str, reward):
    """A component's reward: already built by Hydra, or a ``_target_`` mapping to build now."""
    if isinstance(reward, Mapping) and "_target_" in reward:
        from hydra.utils import instantiate

        reward = instantiate(reward)
    if not callable(reward):
        raise ConfigError(f"reward.components.{name}.reward must be a reward (a mapping with _target_), got {reward!r}")
    return reward


class WeightedSum(Reward):
    """reward = sum_i weight_i * reward_i(images, prompts, metadata).

    Args:
        components: mapping of component name -> ``{"weight": float, "reward": reward}``.
    """

    name = "mix"

    def __init__(self, components: Mapping):
        if not isinstance(components, Mapping) or not components:
            raise ConfigError("reward.components must map at least one name to {weight: ..., reward: ...}")
        self.weights: dict[str, float] = {}
        self.rewards: dict[str, object] = {}
        for name, spec in components.items():
            name = str(name)
            if not isinstance(spec, Mapping) or "reward" not in spec or "weight" not in spec:
                raise ConfigError(f"reward.components.{name} must have the keys 'weight' and 'reward'")
            try:
                self.weights[name] = float(spec["weight"])
            except (TypeError, ValueError):
                raise ConfigError(f"reward.components.{name}.weight must be a number, got {spec['weight']!r}") from None
            self.rewards[name] = _build(name, spec["reward"])

    def to(self, device, dtype=None):
        for reward in self.rewards.values():
            if hasattr(reward, "to"):
                reward.to(device, dtype)
        return self

    @property
    def differentiable(self) -> bool:
        """True only if every component has a differentiable path."""
        return all(getattr(reward, "differentiable", False) for reward in self.rewards.values())

    def score_with_grad(self, images, prompts, metadata):
        """sum_i weight_i * reward_i.score_with_grad(...): (B,) float32, differentiable w.r.t. ``images``."""
        check_images(images)
        lacking = [name for name, reward in self.rewards.items() if not getattr(reward, "differentiable", False)]
        if lacking:
            raise NotImplementedError(
                f"reward {self.name!r}: the components {lacking} have no differentiable scoring path, "
                "so the weighted sum has none"
            )
        total = None
        for name, reward in self.rewards.items():
            values = reward.score_with_grad(images, prompts, metadata).float().reshape(-1)
            if values.numel() != images.shape[0]:
                raise ValueError(f"reward.components.{name}: expected {images.shape[0]} values, got {values.numel()}")
            term = self.weights[name] * values
            total = term if total is None else total + term.to(total.device)
        return total

    def __call__(self, images, prompts, metadata):
        import torch

        check_images(images)
        batch = images.shape[0]
        total = torch.zeros(batch, dtype=torch.float32)
        info = {}
        for name, reward in self.rewards.items():
            values, component_info = reward(images, prompts, metadata)
            values = as_reward_tensor(values, batch, f"reward.components.{name}")
            total += self.weights[name] * values
            info[name] = values
            for key, value in component_info.items():
                info[f"{name}.{key}"] = as_reward_tensor(value, batch, f"reward.components.{name} info {key}")
        return total, info

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={self.weights[name]:g}*{type(r).__name__}" for name, r in self.rewards.items())
        return f"WeightedSum({parts})"
