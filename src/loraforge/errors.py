"""The one error type for bad input, and its kinds.

Library code raises `UserError` (or a subclass) when what it was given is wrong: a file, a config
value, a flag, an adapter that does not fit. The message names the problem and, where it helps,
the fix. The command line prints a `UserError` as one line and exits with status 2; any other
exception is a bug in loraforge or a library and keeps its traceback (exit status 1).

`UserError` is a `ValueError`, and `NotFound` a `FileNotFoundError`, so code written against
PEFT-style APIs that catches those keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: printed as one line by the command line (exit status 2)."""


class NotFound(UserError, FileNotFoundError):
    """A file, directory, model or adapter that was named does not exist."""


class ConfigError(UserError):
    """A configuration value (a YAML key, a flag, a LoraConfig field) is unknown or out of range."""


class DataError(UserError):
    """Training or evaluation data that cannot be used."""


class IncompatibleAdapter(UserError):
    """An adapter that does not fit the model it is put on (another base, another shape)."""
