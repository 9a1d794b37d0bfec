"""The reference-compatible logger: one JSON object a line on stdout.

Each line is ``{"message": ..., "requestID": ..., "level": ...}``; the platform's
log collector reads exactly these keys, so they must not change. When stdout is
a terminal (``spirit-gpu dev``, a worker run by hand) lines are written for
people instead: ``12:00:01 INFO  [request-id] message``, tracebacks as they
are. ``SPIRIT_LOG_FORMAT=json`` or ``console`` forces one or the other.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import traceback
from typing import TextIO

import msgspec

MAX_MESSAGE_CHARS = 4096
_KEEP = (MAX_MESSAGE_CHARS - 64) // 2
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
          logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}
_encoder = msgspec.json.Encoder()
FORMAT_ENV = "SPIRIT_LOG_FORMAT"


def console_format(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether to write human lines: ``SPIRIT_LOG_FORMAT``, else whether ``stream``
    is a terminal (JSON everywhere else, as the platform's collector expects)."""
    chosen = (os.environ if environ is None else environ).get(FORMAT_ENV, "").strip().lower()
    if chosen in ("json", "console"):
        return chosen == "console"
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def console_line(level: str, message: str, request_id: str, at: float) -> str:
    rid = f"[{request_id}] " if request_id else ""
    return f"{time.strftime('%H:%M:%S', time.localtime(at))} {level:<7} {rid}{message}\n"


def _truncate(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    cut = len(message) - 2 * _KEEP
    return f"{message[:_KEEP]} ...[truncated {cut} characters]... {message[-_KEEP:]}"


def parse_level(level: str | int) -> int | None:
    """The numeric level for a name or number, or None when it is not one."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level if level in _NAMES else None
    if isinstance(level, str):
        return _LEVELS.get(level.strip().upper())
    return None


class Logger:
    """Writes reference-format JSON log lines; thread-safe, one write per line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._console: bool | None = None  # decided at the first line written
        self.level = logging.INFO
        self._invalid_said: set[str | int] = set()
        self.set_level(os.environ.get("EASE_LOG_LEVEL", "INFO") or "INFO")

    def set_level(self, level: str | int) -> None:
        """Set the lowest level written: a name ("DEBUG") or a logging constant.

        An invalid level falls back to INFO and says so once.
        """
        parsed = parse_level(level)
        if parsed is None:
            self.level = logging.INFO
            if level not in self._invalid_said:  # (the env is read again once start() runs)
                self._invalid_said.add(level)
                self.warn(f"invalid log level {level!r}, using INFO")
        else:
            self.level = parsed

    def log(self, level: int, message: object, request_id: str | None = None,
            caller: bool = False, exc_info: bool = False, _depth: int = 2) -> None:
        if level < self.level:
            return
        text = str(message)
        if caller:
            frame = inspect.stack()[_depth] if len(inspect.stack()) > _depth else None
            if frame is not None:
                text = f"[{os.path.basename(frame.filename)}:{frame.lineno}] {text}"
        if exc_info:
            tb = traceback.format_exc()
            if tb and not tb.startswith("NoneType: None"):
                text = f"{text}\n{tb.rstrip()}"
        stream = self._stream or sys.stdout
        name = _NAMES.get(level, str(level))
        if self._console is None:
            self._console = console_format(stream)
        if self._console:
            line = console_line(name, _truncate(text), request_id or "", time.time())
        else:
            record = {"message": _truncate(text), "requestID": request_id or "", "level": name}
            line = _encoder.encode(record).decode() + "\n"
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (ValueError, OSError):  # closed stdout during interpreter shutdown
                pass

    def debug(self, message: object, request_id: str | None = None, caller: bool = False,
              exc_info: bool = False) -> None:
        self.log(logging.DEBUG, message, request_id, caller, exc_info, _depth=2)

    def info(self, message: object, request_id: str | None = None, caller: bool = False,
             exc_info: bool = False) -> None:
        self.log(logging.INFO, message, request_id, caller, exc_info, _depth=2)

    def warn(self, message: object, request_id: str | None = None, caller: bool = False,
             exc_info: bool = False) -> None:
        self.log(logging.WARNING, message, request_id, caller, exc_info, _depth=2)

    warning = warn

    def error(self, message: object, request_id: str | None = None, caller: bool = False,
              exc_info: bool = False) -> None:
        self.log(logging.ERROR, message, request_id, caller, exc_info, _depth=2)

    def critical(self, message: object, request_id: str | None = None, caller: bool = False,
                 exc_info: bool = False) -> None:
        self.log(logging.CRITICAL, message, request_id, caller, exc_info, _depth=2)


logger = Logger()
