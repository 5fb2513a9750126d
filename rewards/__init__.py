"""Reward functions for DDPO.

Every reward is a callable ``reward(images, prompts, metadata) -> (rewards, info)``:

- ``images``: float tensor (B, 3, H, W) in [0, 1], on any device;
- ``prompts``: list of B strings; ``metadata``: list of B dicts;
- ``rewards``: float32 CPU tensor of shape (B,);
- ``info``: dict of per-image float32 CPU tensors of shape (B,), logged by the trainer as means.

Rewards are built with Hydra from ``conf/reward/*.yaml`` and moved once with
``reward.to(device, dtype)``. Heavy libraries (torch, open_clip, transformers) are imported
inside the reward classes, never when this package is imported.

Available rewards (module: class):

- ``rewards.jpeg``: ``JpegCompressibility``, ``JpegIncompressibility``
- ``rewards.aesthetic``: ``AestheticReward`` (LAION aesthetic predictor v2)
- ``rewards.pickscore``: ``PickScore``
- ``rewards.hpsv2``: ``HPSv2`` (Human Preference Score v2.1)
- ``rewards.clip_score``: ``ClipScore``
- ``rewards.mix``: ``WeightedSum``
- ``rewards.remote``: ``RemoteReward`` (any reward, scored by an HTTP server: ``ddpo-reward-server``)
"""

from .base import Reward

__all__ = ["Reward"]
