"""Errors that the command-line tools turn into one clear line and a non-zero exit."""


class ConfigError(ValueError):
    """A run cannot start because of bad user input (config, flags, paths). The message is shown as is."""
