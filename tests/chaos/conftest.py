"""The chaos run behind tests/chaos/test_chaos.py: once per store, shared by the tests.

``CHAOS_SECONDS`` (default 25) sets how long the traffic and kills go on,
``CHAOS_SEED`` the seed (default: a random one, printed), ``CHAOS_LOGS`` a
directory that keeps the processes' logs; ``scripts/chaos.sh`` sets them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.scenario import Report, Settings, run
from tests.chaos.stores import STORES

DEFAULT_SECONDS = 25.0


def settings() -> Settings:
    seconds = float(os.environ.get("CHAOS_SECONDS") or DEFAULT_SECONDS)
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    return Settings.lasting(seconds, seed)


@pytest.fixture(scope="module", params=sorted(STORES))
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Report]:
    """One chaos run per store (the run's summary goes to the terminal, captured or not)."""
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")

    def say(text: str) -> None:
        if reporter is None or capture is None:
            print(text)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)

    logs = os.environ.get("CHAOS_LOGS")  # keep the processes' logs there (pytest's go)
    workdir = (Path(logs) / request.param if logs
               else Path(tmp_path_factory.mktemp(f"chaos-{request.param}")))
    yield run(settings(), STORES[request.param], workdir, say)
