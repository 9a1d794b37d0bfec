"""The shared config mechanism: precedence and coercion, for both configs."""

from __future__ import annotations

import argparse

from spirit_gpu.config import WorkerConfig
from spirit_gpu.gateway.config import GatewayConfig
from spirit_gpu.settings import add_flags


def test_worker_precedence_flag_over_env_over_start_key() -> None:
    env = {"SPIRIT_MAX_CHILDREN": "5", "SPIRIT_JOB_TIMEOUT": "2.5", "EASE_TEST_MODE": "yes"}
    cfg = WorkerConfig.from_sources({"max_children": 3, "idle_timeout": 9}, environ=env)
    assert (cfg.max_children, cfg.idle_timeout, cfg.job_timeout, cfg.test_mode) == (5, 9.0,
                                                                                   2.5, True)
    parser = argparse.ArgumentParser()
    add_flags(parser, WorkerConfig)
    flags = WorkerConfig.flag_values(parser.parse_args(["--max-children", "7", "--no-in-process"]))
    assert flags == {"max_children": "7", "in_process": False}
    cfg = WorkerConfig.from_sources({"max_children": 3}, environ=env, flags=flags)
    assert cfg.max_children == 7 and cfg.in_process is False


def test_unknown_keys_and_empty_env_values_are_ignored() -> None:
    cfg = WorkerConfig.from_sources({"handler": print, "nope": 1},
                                    environ={"SPIRIT_MAX_CHILDREN": ""})
    assert cfg == WorkerConfig()


def test_gateway_lists_from_env_and_code() -> None:
    cfg = GatewayConfig.from_sources(environ={"SPIRIT_API_KEYS": "a, b,,c", "SPIRIT_PORT": "9"},
                                     port=1, api_keys=["x"])
    assert (cfg.api_keys, cfg.port) == (["a", "b", "c"], 9)
    # a flag takes the env var's form too, and repeats
    parser = argparse.ArgumentParser()
    add_flags(parser, GatewayConfig)
    flags = GatewayConfig.flag_values(parser.parse_args([
        "--webhook-allow", "127.0.0.1, 10.0.0.0/8", "--webhook-allow", "*.example.com",
        "--api-key", "k1,k2"]))
    cfg = GatewayConfig.from_sources(environ={}, flags=flags)
    assert cfg.webhook_allow == ["127.0.0.1", "10.0.0.0/8", "*.example.com"]
    assert cfg.api_keys == ["k1", "k2"]
    assert GatewayConfig().api_keys == [] and GatewayConfig().api_keys is not \
        GatewayConfig().api_keys  # no shared mutable default


def test_supervisor_flags_reach_handler_processes_as_env_vars_without_secrets() -> None:
    from spirit_gpu.config import child_environ

    env = child_environ({"agent_url": "http://gw:8000/agent/s", "ping_interval": "0.5",
                         "test_mode": True, "worker_token": "secret"})
    assert env == {"EASE_AGENT_URL": "http://gw:8000/agent/s", "SPIRIT_PING_INTERVAL": "0.5",
                   "EASE_TEST_MODE": "True"}
    # a handler process resolving its config from them agrees with the supervisor
    cfg = WorkerConfig.from_sources({"ping_interval": 2.0}, environ=env)
    assert (cfg.agent_url, cfg.ping_interval, cfg.test_mode) == ("http://gw:8000/agent/s",
                                                                 0.5, True)


def test_the_worker_config_is_frozen() -> None:
    import dataclasses

    import pytest
    cfg = WorkerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grace_period = 0  # type: ignore[misc]


def test_values_a_setting_cannot_use_are_refused_naming_where_they_came_from() -> None:
    import re

    import pytest

    from spirit_gpu.settings import SettingError
    ok = "127.0.0.1,10.0.0.0/8,fd00::/8,*.example.com,hooks.example.com,localhost"
    assert len(GatewayConfig.from_sources(environ={"SPIRIT_WEBHOOK_ALLOW": ok}).webhook_allow) == 6
    for bad in ("10.0.0.0/33", "hooks.example.com:8080", "two words", "*."):
        with pytest.raises(SettingError,
                           match=f"SPIRIT_WEBHOOK_ALLOW: .*{re.escape(repr(bad))}, which is not"):
            GatewayConfig.from_sources(environ={"SPIRIT_WEBHOOK_ALLOW": f"127.0.0.1,{bad}"})
        with pytest.raises(SettingError, match="SPIRIT_WEBHOOK_ALLOW"):
            WorkerConfig.from_sources({}, environ={"SPIRIT_WEBHOOK_ALLOW": bad})
    parser = argparse.ArgumentParser()
    add_flags(parser, WorkerConfig)
    flags = WorkerConfig.flag_values(parser.parse_args(["--transport", "lnk"]))
    with pytest.raises(SettingError, match="--transport: 'lnk' is not one of auto, plain, link"):
        WorkerConfig.from_sources({}, environ={}, flags=flags)
