"""Pool unit tests: the real Pool driving fake handler processes on a jumping clock.

No processes, no sockets, no wall-clock waits: scaling with the concurrency
modifier, idle retirement, crash backoff, liveness, job timeouts, recycling,
the config resolved once and a second SIGINT. tests/supervisor/test_processes.py
keeps one real-process test per behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from spirit_gpu.config import WorkerConfig
from spirit_gpu.handlers import Outcome
from spirit_gpu.protocol import ipc
from spirit_gpu.supervisor.jobs import Job
from spirit_gpu.supervisor.pool import Pool
from tests.supervisor.fakes import Behaviour, FakeChild, factory, run

BASE = WorkerConfig(ping_interval=1.0, ping_timeout=10.0, concurrency_interval=1.0,
                    idle_timeout=30.0, crash_backoff_max=4.0)


async def advance_until(check: Callable[[], Any], virtual_seconds: float = 300.0) -> None:
    """Wait in virtual time (the jumping clock makes this free)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + virtual_seconds
    while not check():
        assert loop.time() < deadline, "condition not met in virtual time"
        await asyncio.sleep(0.01)


async def started(cfg: WorkerConfig = BASE, behaviour: Behaviour | None = None,
                  resolve: Callable[[Mapping[str, object]], WorkerConfig] | None = None
                  ) -> tuple[Pool, list[FakeChild]]:
    children: list[FakeChild] = []
    pool = Pool(cfg, "main.py", [], resolve, factory(children, behaviour or Behaviour()))
    await pool.start()
    await pool.wait_ready()
    return pool, children


def alive(children: list[FakeChild]) -> list[FakeChild]:
    return [c for c in children if not c.exit_code.done()]


def job(n: int) -> Job:
    return Job(request_id=f"r{n}", body=b'{"input": {}}')


def test_scales_up_to_the_modifiers_concurrency_then_retires_idle_surplus() -> None:
    async def main() -> None:
        allowed = {"value": 3}
        cfg = WorkerConfig(**{**BASE.__dict__, "max_children": 4, "min_children": 1})
        pool, children = await started(cfg, Behaviour(concurrency=lambda c: allowed["value"]))
        assert len(alive(children)) == 1 and pool.slots == 1
        await advance_until(lambda: pool.slots == 3)  # the modifier is asked every second
        runs = [asyncio.ensure_future(pool.run(job(i))) for i in range(3)]
        await advance_until(lambda: all(len(c.jobs) == 1 for c in alive(children))
                    and len(alive(children)) == 3)
        for child in alive(children):  # one job per process, in three processes
            child.done(child.runs()[0].job)
        assert [o.status_code for o in await asyncio.gather(*runs)] == [200] * 3
        loop = asyncio.get_running_loop()
        idle_from = loop.time()
        allowed["value"] = 8  # more than max_children: capped
        await advance_until(lambda: pool.slots == 4)
        assert len(alive(children)) == 3  # capacity alone starts no process
        await advance_until(lambda: len(alive(children)) == 1)  # idle surplus retired
        assert cfg.idle_timeout <= loop.time() - idle_from < cfg.idle_timeout + 2
        assert sum(isinstance(m, ipc.Stop) for c in children for m in c.sent) == 2
        assert pool.crash_streak == 0
        allowed["value"] = 1  # scaling down: one slot, and one job at a time again
        await advance_until(lambda: pool.slots == 1)
        runs = [asyncio.ensure_future(pool.run(job(i))) for i in range(2)]
        await advance_until(lambda: any(c.jobs for c in alive(children)))
        await asyncio.sleep(5.0)
        assert len(alive(children)) == 1 and len(pool.pending) == 1  # the second one waits
        for _ in range(2):
            await advance_until(lambda: alive(children)[0].jobs)
            child = alive(children)[0]
            child.done(next(iter(child.jobs)))
        assert [o.status_code for o in await asyncio.gather(*runs)] == [200, 200]
        await pool.close()
    run(main)


def test_crashes_back_off_and_a_served_job_resets_the_streak() -> None:
    async def main() -> None:
        pool, children = await started()
        for _ in range(4):  # crashes in a row, each replacement crashing when ready
            alive(children)[0].exit(-11)
            await advance_until(lambda: len(children) > 1 and alive(children)
                        and alive(children)[0].state == "ready")
        gaps = [round(b.spawned_at - a.spawned_at, 2)
                for a, b in zip(children, children[1:], strict=False)]
        expected = [0.0, 0.5, 1.0, 2.0]  # at once, then 0.5 s doubling (the test polls 0.01 s)
        assert all(abs(g - e) < 0.05 for g, e in zip(gaps, expected, strict=True)), gaps
        assert pool.crash_streak == 4
        result = asyncio.ensure_future(pool.run(job(1)))
        await advance_until(lambda: alive(children)[0].jobs)
        alive(children)[0].done(alive(children)[0].runs()[0].job)
        assert (await result).status_code == 200
        assert pool.crash_streak == 0
        await pool.close()
    run(main)


def test_a_crash_fails_its_job_with_the_signal_named() -> None:
    async def main() -> None:
        pool, children = await started()
        result = asyncio.ensure_future(pool.run(job(1)))
        await advance_until(lambda: children[0].jobs)
        children[0].exit(-11)
        outcome: Outcome = await result
        assert outcome.status_code == 500
        assert "was killed by SIGSEGV" in outcome.message
        await advance_until(lambda: len(alive(children)) == 1)
        await pool.close()
    run(main)


def test_job_timeout_kills_on_purpose_408_and_is_not_a_crash() -> None:
    async def main() -> None:
        cfg = WorkerConfig(**{**BASE.__dict__, "job_timeout": 5.0})
        pool, children = await started(cfg)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcome = await pool.run(job(1))  # the fake never answers
        assert outcome.status_code == 408 and "5 s job timeout" in outcome.message
        assert 5.0 <= loop.time() - t0 < 6.0
        assert children[0].killed_on_purpose
        assert pool.crash_streak == 0
        await advance_until(lambda: len(children) == 2 and children[1].spawned_at > 0)
        assert children[1].spawned_at - (t0 + 5.0) < 0.1  # replaced at once: no backoff
        await pool.close()
    run(main)


def test_a_silent_process_is_killed_after_the_ping_timeout_and_counts_as_a_crash() -> None:
    async def main() -> None:
        pool, children = await started(behaviour=Behaviour(silent=True))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = asyncio.ensure_future(pool.run(job(1)))
        await advance_until(lambda: children[0].exit_code.done())
        assert BASE.ping_timeout <= loop.time() - t0 < BASE.ping_timeout + 2
        outcome = await result
        assert outcome.status_code == 500 and "unresponsive" in outcome.message
        assert pool.crash_streak == 1 and not children[0].killed_on_purpose
        await pool.close()
    run(main)


def test_beats_keep_a_long_job_alive() -> None:
    async def main() -> None:
        pool, children = await started()
        result = asyncio.ensure_future(pool.run(job(1)))
        child = children[0]
        for seq in range(30):  # 30 s of beats, three times the ping timeout
            await asyncio.sleep(1.0)
            child.tell(ipc.Beat(seq))
        assert not child.exit_code.done()
        child.done(child.runs()[0].job)
        assert (await result).status_code == 200
        await pool.close()
    run(main)


def test_recycles_after_n_jobs_and_when_asked() -> None:
    async def main() -> None:
        cfg = WorkerConfig(**{**BASE.__dict__, "max_jobs_per_child": 2})
        pool, children = await started(cfg, Behaviour(job_seconds=0.1))
        for i in range(2):
            assert (await pool.run(job(i))).status_code == 200
        await advance_until(lambda: children[0].exit_code.done() and len(alive(children)) == 1)
        assert isinstance(children[0].sent[-1], ipc.Stop)
        result = asyncio.ensure_future(pool.run(job(9)))
        await advance_until(lambda: alive(children)[0].jobs)
        second = alive(children)[0]
        second.behaviour = Behaviour()  # answer by hand: with recycle=True
        second.done(second.runs()[0].job, recycle=True)
        assert (await result).status_code == 200
        await advance_until(lambda: second.exit_code.done())
        assert pool.crash_streak == 0
        await pool.close()
    run(main)


def test_config_is_resolved_once_with_the_scripts_start_keys() -> None:
    async def main() -> None:
        seen: list[Mapping[str, object]] = []

        def resolve(options: Mapping[str, object]) -> WorkerConfig:
            seen.append(options)
            return WorkerConfig.from_sources(options, environ={})
        behaviour = Behaviour(options={"mode": "handler", "job_timeout": 2.0,
                                       "ping_interval": 0.25})
        pool, children = await started(BASE, behaviour, resolve)
        assert pool.cfg.job_timeout == 2.0 and pool.cfg.ping_interval == 0.25
        assert len(seen) == 1
        assert (await pool.run(job(1))).status_code == 408  # the start() key applies
        await advance_until(lambda: len(children) == 2 and children[1].spawned_at > 0)
        assert children[1].beat_interval == 0.25  # later processes beat at its interval
        assert len(seen) == 1  # not again for the next process
        await pool.close()
    run(main)


def test_a_bad_start_key_is_a_startup_failure() -> None:
    async def main() -> None:
        def resolve(options: Mapping[str, object]) -> WorkerConfig:
            return WorkerConfig.from_sources(options, environ={})
        children: list[FakeChild] = []
        pool = Pool(BASE, "main.py", [], resolve,
                    factory(children, Behaviour(options={"job_timeout": "soon"})))
        await pool.start()
        try:
            await pool.wait_ready()
        except Exception as exc:
            assert "start() key 'job_timeout': 'soon' is not a number" in str(exc)
        else:
            raise AssertionError("a bad start() key must stop the start")
        await pool.close()
    run(main)


def test_hurry_ends_running_jobs_now_with_503() -> None:
    async def main() -> None:
        pool, children = await started()
        result = asyncio.ensure_future(pool.run(job(1)))
        await advance_until(lambda: children[0].jobs)
        draining = asyncio.ensure_future(pool.drain(BASE.grace_period))
        await asyncio.sleep(1.0)
        pool.hurry()  # a second SIGINT
        outcome = await result
        assert outcome.status_code == 503
        await draining
        assert pool.cfg.grace_period == BASE.grace_period  # nothing was mutated
        assert children[0].killed_on_purpose
    run(main)


def test_max_crashes_in_a_row_make_the_pool_unhealthy_and_fail_what_waits() -> None:
    async def main() -> None:
        cfg = WorkerConfig(**{**BASE.__dict__, "max_crashes": 3})
        pool, children = await started(cfg)
        for _ in range(2):
            alive(children)[0].exit(-9)
            await advance_until(lambda: alive(children) and alive(children)[0].state == "ready")
        assert pool.unhealthy == "" and pool.slots == 1
        # a job waiting for the next process when the third crash comes
        first = asyncio.ensure_future(pool.run(job(1)))
        await advance_until(lambda: alive(children)[0].jobs)
        waiting = asyncio.ensure_future(pool.run(job(2)))
        alive(children)[0].exit(-9)
        assert (await first).status_code == 500
        outcome = await waiting
        assert outcome.status_code == 503 and "worker unhealthy" in outcome.message
        assert "3 handler failures in a row" in pool.unhealthy and pool.slots == 0
        assert (await pool.run(job(3))).status_code == 503  # nothing new is taken
        made = len(children)
        await asyncio.sleep(60)  # (virtual) past any crash back-off
        assert len(children) == made  # and no process is started for it
        await pool.close()
    run(main)


def test_cuda_out_of_memory_counts_like_a_crash() -> None:
    async def main() -> None:
        cfg = WorkerConfig(**{**BASE.__dict__, "max_crashes": 2})
        pool, children = await started(cfg)
        for n in range(2):
            result = asyncio.ensure_future(pool.run(job(n)))
            await advance_until(lambda: alive(children)[0].jobs)
            child = alive(children)[0]
            child.tell(ipc.Done(child.runs()[-1].job, 500, b"{}",
                                "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"))
            assert (await result).status_code == 500
        assert "CUDA out of memory" in pool.unhealthy
        await pool.close()
    run(main)
