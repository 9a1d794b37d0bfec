"""payload: 1 MiB and 16 MiB request and result through supervisor and child (MiB/s).

MiB/s = request size / round-trip time (the same bytes come back as the
result). Baseline: the raw pipe echo (``pipe_echo.RawEcho``) with the same
framing and the same bodies.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Result, main_for, median, result  # noqa: E402
from ipc import close_pool, json_body, open_pool, pool_caller  # noqa: E402
from pipe_echo import RawEcho, sequential  # noqa: E402

from spirit_gpu.loop import run as run_loop  # noqa: E402

MIB = 1 << 20


async def measure(quick: bool) -> list[Result]:
    runs = 3 if quick else 5
    raw = RawEcho()
    await raw.start()
    pool = await open_pool()
    call = pool_caller(pool)
    out: list[Result] = []
    try:
        for size, n in ((MIB, 20 if quick else 50), (16 * MIB, 3 if quick else 8)):
            body = json_body(size)
            await sequential(raw.roundtrip, body, 1)
            await sequential(call, body, 1)
            r_raw, r_pool = [], []
            for _ in range(runs):
                r_raw.append(size / MIB / await sequential(raw.roundtrip, body, n))
                r_pool.append(size / MIB / await sequential(call, body, n))
            out.append(result(f"payload {size // MIB} MiB round trip", median(r_pool), "MiB/s",
                              "pipe echo floor", median(r_raw), target=(">=", 0.5)))
    finally:
        await raw.close()
        await close_pool(pool)
    return out


def run(quick: bool) -> list[Result]:
    return run_loop(measure(quick))


if __name__ == "__main__":
    main_for(run, "payload")
