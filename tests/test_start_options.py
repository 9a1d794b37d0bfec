"""start()'s config: what it accepts and the errors it gives before anything runs."""

from __future__ import annotations

import pytest

from spirit_gpu.config import start_options


def handler(request: object, env: object) -> None:
    return None


def test_handler_mode_keeps_worker_settings_and_drops_the_rest() -> None:
    options = start_options({"handler": handler, "max_children": 3, "job_timeout": 2.5,
                             "concurrency_modifier": lambda c: c, "unknown": 1})
    assert options == {"mode": "handler", "max_children": 3, "job_timeout": 2.5}


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434", "https://llm.internal/v1",
                                 "HTTP://localhost:8000/"])
def test_proxy_mode_takes_an_http_base_url(url: str) -> None:
    assert start_options({"mode": "proxy", "base_url": url})["base_url"] == url


@pytest.mark.parametrize(("config", "error", "text"), [
    ({}, TypeError, "needs a \"handler\""),
    ({"handler": handler, "concurrency_modifier": 4}, TypeError, "must be a function"),
    ({"mode": "proxy"}, ValueError, "needs \"base_url\""),
    ({"mode": "proxy", "base_url": "127.0.0.1:11434"}, ValueError, "http:// or https://"),
    ({"mode": "proxy", "base_url": "ftp://host/"}, ValueError, "got 'ftp://host/'"),
    ({"mode": "proxy", "base_url": "http://"}, ValueError, "with a host"),
])
def test_bad_config_is_refused_with_a_clear_error(config: dict[str, object],
                                                  error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(")):
        start_options(config)
