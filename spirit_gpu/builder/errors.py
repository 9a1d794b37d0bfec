"""The one error type the builder reports to its user (never as a traceback)."""

from __future__ import annotations


class BuilderError(Exception):
    """A problem the user can fix; ``hint`` says how, when we know."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
