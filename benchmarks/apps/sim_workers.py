"""Many workers on links to one gateway, simulated in one process.

Each simulated worker is a real ``LinkTransport`` (its own WebSocket to the
gateway) driven by a small loop that does what the job loop does for an echo
handler (pull, "executing" metric, result, "succeed" metric, ack), without
child processes: the benchmark measures the gateway's dispatch over many
links, not handler processes.

Run: python sim_workers.py GATEWAY_URL READY_FILE SID:COUNT [SID:COUNT ...]
(writes READY_FILE once every link is open; SIGTERM stops it).
"""

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import msgspec

from spirit_gpu.loop import run
from spirit_gpu.supervisor.jobs import Job, metric, now_ms
from spirit_gpu.supervisor.transports.link import LinkTransport

SLOTS = 8  # jobs one simulated worker takes at a time
_dec = msgspec.json.Decoder()


async def handle(link: LinkTransport, job: Job) -> None:
    job.started_at = now_ms()
    await link.metric(job, metric(job, "executing"))
    body = msgspec.json.encode(_dec.decode(job.body).get("input"))
    finished = now_ms()
    await link.result(job, 200, "", body)
    await link.metric(job, metric(job, "succeed", "", finished))
    await link.ack(job)


async def worker(link: LinkTransport) -> None:
    running: set[asyncio.Task[None]] = set()
    while True:
        free = SLOTS - len(running)
        if free <= 0:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            continue
        for job in (await link.pull(free)).jobs:
            task = asyncio.create_task(handle(link, job))
            running.add(task)
            task.add_done_callback(running.discard)


async def main(gateway: str, ready: Path, specs: list[str]) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        links = []
        for spec in specs:
            sid, count = spec.split(":")
            links += [LinkTransport(session, f"{gateway}/agent/{sid}") for _ in range(int(count))]
        for i in range(0, len(links), 50):  # connect in batches: a burst of handshakes
            await asyncio.gather(*(link.connect() for link in links[i:i + 50]))
        tasks = [asyncio.create_task(worker(link)) for link in links]
        await asyncio.to_thread(ready.write_text, str(len(links)))
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)


if __name__ == "__main__":
    run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
