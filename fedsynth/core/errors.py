"""The errors a user can fix, which the CLI shows as one line naming the file or key."""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """Bad input a user can fix (a wrong option, a file of the wrong kind, a request the
    model cannot serve); the message says what and how."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key."""
