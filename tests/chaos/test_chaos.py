"""Chaos: sync, async and streaming requests while handler processes, supervisors
and the gateway are SIGKILLed and webhooks fail (tests/chaos/scenario.py).

Each test judges one property of the same run (conftest.py's ``chaos``)."""

from __future__ import annotations

from tests.chaos.receiver import MODES
from tests.chaos.scenario import Report


def problems(report: Report, *kinds: str) -> dict[str, list[str]]:
    return {k: v for k, v in report.problems.items() if k in kinds}


def test_the_chaos_happened(chaos: Report) -> None:
    """Guard against a run that proves nothing: every kind of request was counted,
    and every kind of failure was dealt out."""
    counted = {x.kind for x in chaos.counted}
    assert counted == {"sync", "async", "stream"}, chaos.summary()
    assert chaos.kills["handler processes"] >= 3, chaos.summary()
    assert chaos.kills["handler processes mid-job"] >= 1, chaos.summary()
    assert sum(n for k, n in chaos.kills.items() if k.startswith("supervisors")) \
        == chaos.settings.supervisor_kills, chaos.summary()
    assert chaos.kills["gateways"] == chaos.settings.gateway_kills, chaos.summary()
    assert {x.mode for x in chaos.sent if x.mode} == set(MODES), chaos.summary()
    assert set(chaos.webhook_attempts) == set(MODES) - {"refused"}, chaos.summary()


def test_every_accepted_request_ends_in_exactly_one_terminal_status(chaos: Report) -> None:
    assert not problems(chaos, "not terminal", "terminal status changed",
                        "sync answer and status disagree", "unanswered by the live gateway",
                        "stream did not end"), chaos.summary()


def test_every_result_and_stream_belongs_to_its_request(chaos: Report) -> None:
    """With every chunk once, in order: a chunk the dying gateway took, or one sent while
    no gateway listened, is sent again (the link's confirmations, the plain POST's
    retries)."""
    assert not problems(chaos, "wrong result", "stream end and status disagree",
                        "stream chunks wrong"), chaos.summary()


def test_no_webhook_is_delivered_twice_or_contradicts_the_status(chaos: Report) -> None:
    assert not problems(chaos, "webhook delivered twice", "webhook and status disagree"), \
        chaos.summary()


def test_no_supervisor_handler_process_or_gateway_is_left(chaos: Report) -> None:
    assert not chaos.processes_left, chaos.summary()
    assert not problems(chaos, "did not stop on SIGTERM"), chaos.summary()
    assert all(code == 0 for code in chaos.stop_codes.values()), chaos.stop_codes


def test_no_helper_process_outlives_its_handler_process(chaos: Report) -> None:
    """A handler's own subprocess (a grandchild of the supervisor) ends with it."""
    assert not chaos.helpers_left_after_handler_exit, chaos.summary()


def test_no_helper_process_outlives_a_killed_supervisor(chaos: Report) -> None:
    assert not chaos.helpers_left_after_supervisor_kill, chaos.summary()
