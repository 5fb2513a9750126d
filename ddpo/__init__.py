"""ddpo: reinforcement-learning fine-tuning of text-to-image diffusion models on diffusers, with Hydra configs."""

import os as _os

__version__ = "0.3.0.dev0"  # the package's version (pyproject.toml reads it from here)

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CLONE_REWARDS = _os.path.join(_os.path.dirname(_HERE), "rewards")
if not _os.path.isdir(_os.path.join(_HERE, "rewards")) and _os.path.isfile(
    _os.path.join(_CLONE_REWARDS, "__init__.py")
):  # a clone or an editable install: ddpo.rewards is the repository's rewards/ (see ddpo/_rewards_alias.py)
    from ddpo._rewards_alias import install as _install

    _install(_CLONE_REWARDS)
