"""Errors a handler raises to choose the status code its client sees."""

from __future__ import annotations

from typing import Any


class HandlerError(Exception):
    """Raise from any handler to answer with ``status_code`` and a JSON body.

    The body is ``{"error": message}`` plus ``details`` when given, e.g.
    ``raise HandlerError(400, "invalid input", details=[...])``.
    Any other exception is answered as 500 with ``{"error": str(exc)}``.
    """

    def __init__(self, status_code: int, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.details is not None:
            out["details"] = self.details
        return out
