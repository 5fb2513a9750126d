"""Hydra callbacks: checks that must happen before Hydra itself touches the output directory."""

import os
import sys
import tempfile

from hydra.experimental.callback import Callback


def check_writable_dir(path: str, key: str) -> None:
    """Create ``path`` if needed and prove it writable, or exit with one line naming ``key``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        sys.exit(f"error: {key}={path} cannot be used as the output directory ({error.strerror or error})")


class CheckOutputDir(Callback):
    """Hydra creates the run (or sweep) directory before the task starts, and a path that cannot be
    created ends there in a traceback; this says in one line which setting to change instead."""

    def on_run_start(self, config, **kwargs) -> None:
        check_writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
