"""RL algorithms: one module each, selected by ``conf/algorithm/<name>.yaml``."""

from ddpo.algorithms.awm import AWM
from ddpo.algorithms.base import DIFFERENTIABLE, FINAL, TRANSITIONS, Algorithm, PolicyGradient, gaussian_kl
from ddpo.algorithms.ddpo import DDPO
from ddpo.algorithms.grpo import GRPO
from ddpo.algorithms.nft import NFT
from ddpo.algorithms.reward_gradient import AlignProp, DRaFT, RewardGradient

__all__ = [
    "AWM",
    "AlignProp",
    "Algorithm",
    "DDPO",
    "DIFFERENTIABLE",
    "DRaFT",
    "FINAL",
    "GRPO",
    "NFT",
    "PolicyGradient",
    "RewardGradient",
    "TRANSITIONS",
    "gaussian_kl",
]
