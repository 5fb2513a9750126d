"""RL algorithms: one module each, selected by ``conf/algorithm/<name>.yaml``."""

from ddpo.algorithms.awm import AWM
from ddpo.algorithms.base import FINAL, TRANSITIONS, Algorithm, PolicyGradient, gaussian_kl
from ddpo.algorithms.ddpo import DDPO
from ddpo.algorithms.grpo import GRPO
from ddpo.algorithms.nft import NFT

__all__ = ["AWM", "Algorithm", "DDPO", "FINAL", "GRPO", "NFT", "PolicyGradient", "TRANSITIONS", "gaussian_kl"]
