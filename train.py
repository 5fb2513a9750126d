"""Fine-tune a text-to-image diffusion model with DDPO.

python train.py reward=jpeg_compressibility prompt=animals
python train.py experiment=tiny_compressibility          # CPU quick start
python train.py --help                                   # config groups and options
"""

import hydra
from omegaconf import DictConfig

from ddpo.config import main as run
from ddpo.config import register_configs
from ddpo.hydra_callbacks import one_line_config_errors

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    import os
    import sys

    from ddpo.help import print_help_if_asked

    if print_help_if_asked(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"), "train.py"):
        sys.exit(0)
    with one_line_config_errors():  # a misspelt option or key, a wrong type: one line, as the run's own errors
        main()
