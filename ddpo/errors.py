"""Errors that stop a run with a short message instead of a traceback."""


class DDPOError(Exception):
    """An error the user can fix; train.py prints its message and exits non-zero."""


class ConfigError(DDPOError):
    """A configuration value, file or model that cannot be used."""


class Interrupted(DDPOError):
    """The run was stopped by a signal; the message says how to resume, ``exit_code`` is the signal's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WeightsMismatch(ConfigError):
    """Trained weights (a checkpoint's) that do not fit the model this run built; the message names the
    config key that differs where the weights tell it (use_lora, lora_rank)."""
