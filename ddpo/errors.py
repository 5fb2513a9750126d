"""Errors that stop a run with a short message instead of a traceback."""


class DDPOError(Exception):
    """An error the user can fix; train.py prints its message and exits non-zero."""


class ConfigError(DDPOError):
    """A configuration value, file or model that cannot be used."""
