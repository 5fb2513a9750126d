"""``ddpo-train``: the Hydra app of ``train.py`` for an installed copy (``pip install ddpo-diffusion``).

    ddpo-train experiment=tiny_compressibility          # same config, same overrides as python train.py
    ddpo-train --help                                   # config groups and options

The configs are the repository's ``conf/`` tree, which a wheel ships as ``ddpo/conf``; in a clone (or an
editable install) the same command reads ``conf/`` beside the package. Outputs go to the current
directory (``outputs/...``), as with ``train.py``.
"""

from pathlib import Path

from omegaconf import DictConfig


def config_dir() -> str:
    """Where ``config.yaml`` lives: ``ddpo/conf`` when installed from a wheel, ``<clone>/conf`` otherwise."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit(
        f"error: no config.yaml in {package / 'conf'} or {package.parent / 'conf'}: reinstall ddpo-diffusion"
    )


def run(cfg: DictConfig) -> float | None:
    from ddpo.config import main

    return main(cfg)


def train() -> None:
    """The console script: ``python train.py``'s app, with the config directory found at run time."""
    import sys

    import hydra

    from ddpo.config import register_configs
    from ddpo.help import print_help_if_asked
    from ddpo.hydra_callbacks import one_line_config_errors

    if print_help_if_asked(sys.argv[1:], config_dir(), "ddpo-train"):
        return

    register_configs()
    with one_line_config_errors():
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(run)()
