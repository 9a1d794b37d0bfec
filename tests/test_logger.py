"""The reference-compatible logger: exact JSON lines."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

from spirit_gpu.log import MAX_MESSAGE_CHARS, Logger


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_line_format_and_request_id() -> None:
    out = io.StringIO()
    log = Logger(out)
    log.info("hello", request_id="r1")
    log.error("bad")
    assert out.getvalue().splitlines()[0] == '{"message":"hello","requestID":"r1","level":"INFO"}'
    assert lines(out)[1] == {"message": "bad", "requestID": "", "level": "ERROR"}


def test_levels_filter_and_set_level_by_name_or_constant() -> None:
    out = io.StringIO()
    log = Logger(out)
    log.debug("hidden")
    log.set_level("DEBUG")
    log.debug("shown")
    log.set_level(logging.ERROR)
    log.warn("hidden too")
    assert [x["message"] for x in lines(out)] == ["shown"]


def test_invalid_level_falls_back_to_info_with_a_notice() -> None:
    out = io.StringIO()
    log = Logger(out)
    log.set_level("LOUD")
    assert log.level == logging.INFO
    assert "invalid log level 'LOUD'" in lines(out)[0]["message"]


def test_env_level(monkeypatch) -> None:
    monkeypatch.setenv("EASE_LOG_LEVEL", "warning")
    out = io.StringIO()
    log = Logger(out)
    log.info("no")
    log.warning("yes")
    assert [x["level"] for x in lines(out)] == ["WARNING"]


def test_caller_prefix_and_exc_info() -> None:
    out = io.StringIO()
    log = Logger(out)
    log.info("where", caller=True)
    try:
        raise ValueError("kaput")
    except ValueError:
        log.error("failed", exc_info=True)
    first, second = lines(out)
    assert first["message"].startswith("[test_logger.py:")
    assert first["message"].endswith("] where")
    assert second["message"].startswith("failed\nTraceback")
    assert "ValueError: kaput" in second["message"]


def test_long_messages_keep_head_and_tail() -> None:
    out = io.StringIO()
    log = Logger(out)
    log.info("H" * 5000 + "T" * 5000)
    message = lines(out)[0]["message"]
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.startswith("HHH") and message.endswith("TTT")
    assert "truncated" in message


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_readable_lines_and_json_stays_elsewhere(monkeypatch: Any) -> None:
    monkeypatch.delenv("SPIRIT_LOG_FORMAT", raising=False)
    tty = _Tty()
    log = Logger(tty)
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("handler raised", request_id="r9", exc_info=True)
    text = tty.getvalue()
    assert re.match(r"\d\d:\d\d:\d\d ERROR   \[r9\] handler raised\nTraceback", text), text
    assert 'raise ValueError("boom")\n' in text and "ValueError: boom\n" in text
    monkeypatch.setenv("SPIRIT_LOG_FORMAT", "json")
    forced = _Tty()
    Logger(forced).info("x")
    assert json.loads(forced.getvalue()) == {"message": "x", "requestID": "", "level": "INFO"}
    monkeypatch.setenv("SPIRIT_LOG_FORMAT", "console")
    piped = io.StringIO()
    Logger(piped).warn("y")
    assert piped.getvalue().endswith(" WARNING y\n")
    monkeypatch.delenv("SPIRIT_LOG_FORMAT")
    plain = io.StringIO()
    Logger(plain).info("z")
    assert json.loads(plain.getvalue())["message"] == "z"
