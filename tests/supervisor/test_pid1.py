"""As PID 1 (a container), the supervisor forwards signals and reaps orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.conftest import APPS, ROOT, free_port


def zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def test_pid1_reaps_orphans_and_forwards_sigterm(tmp_path) -> None:
    port = free_port()
    env = dict(os.environ, EASE_TEST_MODE="true", EASE_TEST_PORT=str(port))
    log = open(tmp_path / "out.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-m", "spirit_gpu.supervisor", str(APPS / "orphans.py")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        answered = 0
        while answered < 3:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                             data=b'{"input": {}}', method="POST")
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.status == 200
                    answered += 1
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "out.log").read_text()
                time.sleep(0.05)
        init_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                      text=True).stdout.split()[0])
        # the orphaned sleeps end after 0.2 s; PID 1 must reap them
        deadline = time.monotonic() + 5
        while True:
            leftover = [p for p in os.listdir("/proc") if p.isdigit() and
                        _cmd(p).startswith("sleep") and _ppid(p) == init_pid]
            if not leftover and not zombies_of(init_pid):
                break
            assert time.monotonic() < deadline, f"unreaped: {leftover} {zombies_of(init_pid)}"
            time.sleep(0.05)
        os.kill(init_pid, signal.SIGTERM)  # what `docker stop` does to PID 1
        assert proc.wait(20) == 0
        assert "received SIGTERM" in (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _cmd(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1
