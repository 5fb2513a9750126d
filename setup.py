"""Package layout (metadata and data files are in pyproject.toml).

The Hydra configs live in ``conf/`` at the repository root, where ``train.py`` reads them; a wheel
ships them inside the package as ``ddpo/conf``, where the ``ddpo-train`` command finds them. The
repository's ``rewards/`` is installed as ``ddpo/rewards`` (``ddpo.rewards``; in a clone the same name
reaches ``rewards/`` through ``ddpo/_rewards_alias.py``). The
launcher plugin joins Hydra's ``hydra_plugins`` namespace package (no ``__init__.py`` there).
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["ddpo", "ddpo.*"]),
        "ddpo.conf",
        "ddpo.rewards",  # the repository's rewards/, installed inside ddpo: no top-level "rewards" (PyPI has one)
        "hydra_plugins.ddpo_launcher",
    ],
    package_dir={"ddpo.conf": "conf", "ddpo.rewards": "rewards"},
)
