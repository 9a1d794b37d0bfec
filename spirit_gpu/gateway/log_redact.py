"""Keep credentials out of the gateway's logs.

aiohttp logs a request it cannot parse with the parser's error, and that error
quotes the raw head: an ``Authorization: Bearer <api-key>`` line included.
``redact_logs`` puts a filter on aiohttp's loggers that rewrites each record
(message, arguments and traceback) with the values of credential headers and
every configured key replaced by ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# aiohttp's loggers (aiohttp/log.py); a filter on a logger does not cover its children
LOGGERS = ("aiohttp.access", "aiohttp.client", "aiohttp.internal", "aiohttp.server",
           "aiohttp.web", "aiohttp.websocket")
# a credential header, as a line of a raw head or as a repr'd/dict entry: keep the name
_HEADER = re.compile(
    r"(?i)(\b(?:proxy-)?authorization|\bauth|\bx-api-key|\bapi[-_]?key|"
    r"\bspirit-worker-token|\bworker[-_]?token)"
    r"(['\"]?\s*[:=]\s*['\"]?)"
    r"([^\r\n'\"\\]+)")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class RedactFilter(logging.Filter):
    """Rewrites a record to its redacted, fully formatted text (nothing is dropped)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._format = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self._format.formatException(record.exc_info)}"
        elif record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
        record.msg = redact(text, self.secrets)
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def redact_logs(secrets: Iterable[str] = ()) -> RedactFilter:
    """Install one filter (replacing an earlier one) on every aiohttp logger."""
    new = RedactFilter(secrets)
    for name in LOGGERS:
        log = logging.getLogger(name)
        for old in [f for f in log.filters if isinstance(f, RedactFilter)]:
            log.removeFilter(old)
        log.addFilter(new)
    return new
