"""Exceptions for mistakes a user can fix.

Every kind of user mistake has its own subclass of :class:`MambascopeError`. The CLI prints such an
error as one line (what went wrong, which file, how to fix it) and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MambascopeError(Exception):
    """Base class: a problem with the user's input, not with mambascope."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """`message: path (fix: hint)`, the form the CLI prints."""
        text = self.message
        if self.path:
            text = f"{text}: {self.path}"
        if self.hint:
            text = f"{text} (fix: {self.hint})"
        return text


class ConfigError(MambascopeError):
    """A configuration file or option is missing, malformed or contradictory."""

    exit_code = 2


class SlideReadError(MambascopeError):
    """A slide cannot be opened or read, or lacks what the request needs (e.g. its mpp)."""


class DataError(MambascopeError):
    """An input data file (HDF5, CSV, image, NIfTI) is missing, malformed or inconsistent."""


class CheckpointError(MambascopeError):
    """A checkpoint cannot be loaded or does not match the model configuration."""


class BatchError(MambascopeError):
    """Some items of a batch job failed; each was recorded and the rest finished."""
