"""Errors a user can act on. Each message is one line naming the file/field/line and what was expected."""


class LlamaworksError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class FormatError(LlamaworksError, ValueError):
    """A file or record is not in the format we expected."""


class ConfigError(LlamaworksError, ValueError):
    """An option or configuration value is invalid."""
