"""User-facing errors.

Everything a user can fix (a missing file, a bad value, a model that does not exist) is raised as
a :class:`DenseBenchError`. The CLI prints its message (and hint) and exits with code 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DenseBenchError(Exception):
    """An error the user can fix. ``hint`` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class DataError(DenseBenchError):
    """A dataset root, split file, image or mask is missing or malformed."""


class ModelError(DenseBenchError):
    """An unknown model, unreadable weights, or weights that do not fit the architecture."""


class ConfigError(DenseBenchError):
    """A protocol option or CLI value is out of range or unknown."""


class ResultError(DenseBenchError):
    """A result or leaderboard file is invalid, tampered with, or would be overwritten."""


def choices_message(kind: str, value: object, accepted) -> str:
    """The standard 'unknown X' sentence: names the bad value and the accepted ones."""
    accepted = sorted(str(a) for a in accepted)
    return f"unknown {kind} {value!r}; accepted: {', '.join(accepted)}"
