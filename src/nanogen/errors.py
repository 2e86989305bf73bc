"""User-facing errors.

Anything the user can fix (a config, a path, a CLI argument, a checkpoint) raises ``UserError``. The CLI
prints its message as one line on stderr and exits with code 2, with no traceback. Everything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key, value or override is wrong."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match the model."""


class NotAvailableError(UserError):
    """A subcommand or feature that a later release fills in."""
