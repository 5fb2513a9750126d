"""Seeds derived from (run seed, epoch, index, ...): stable across runs and processes, never repeated.

Every sample of an epoch is drawn from its own seed, so an epoch holds the same samples whatever the
number of processes or batches. The seeds come from a cryptographic hash of their parts: a weak mix
repeats (prompt, noise) pairs across the epochs of a paper-scale run and between runs.
"""

import hashlib


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and processes (unlike hash())."""
    data = b",".join(str(int(part)).encode() for part in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index`` of ``epoch``: its prompt and its noise derive from it."""
    return derived_seed(seed, epoch, index)


def group_seed(seed: int, epoch: int, group: int) -> int:
    """The seed of a group of samples that share a prompt (GRPO)."""
    return derived_seed(seed, epoch, group, 4)


def shuffle_seed(seed: int, epoch: int, process_index: int) -> int:
    """The seed of one process's training shuffle in ``epoch``."""
    return derived_seed(seed, epoch, process_index, 3)
