"""The one exception family of regraft.

Every error a user can cause is a :class:`RegraftError`. Its message names the
file or tensor, says what was expected and what was found, and ends with what to
do about it. The CLI prints the message on one line (plus a hint) and exits 2.
"""

from __future__ import annotations

__all__ = [
    "RegraftError",
    "SourceError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "TargetError",
    "LoadError",
    "ModelSpecError",
]


class RegraftError(Exception):
    """Base class of every error regraft raises for bad input.

    Attributes:
        hint: one sentence saying how to fix the problem, or ``""``.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHint: {self.hint}"
        return self.message


class SourceError(RegraftError):
    """A checkpoint path that cannot be opened: missing, not a checkpoint, unreadable."""


class UnsupportedFormatError(SourceError):
    """A file that exists but is in no format regraft reads."""


class CorruptCheckpointError(SourceError):
    """A checkpoint whose bytes are damaged: truncated file, bad checksum, bad index."""


class TargetError(RegraftError):
    """A model that cannot be described or assigned to (e.g. not built yet)."""


class LoadError(RegraftError):
    """A load refused in strict mode; ``problems`` lists every reason at once."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str = "") -> None:
        super().__init__(message, hint)
        self.problems = list(problems or [])


class ModelSpecError(RegraftError):
    """A ``--model`` spec that does not import or does not return a built model."""
