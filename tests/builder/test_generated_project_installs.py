"""A generated project's requirements install THIS spirit-gpu (not the registry's 0.1.0,
an older SDK without the supervisor), and the worker it describes serves requests.

Offline and quick: a fresh venv whose only source of spirit-gpu is the project's
wheels/ (pip --no-index); the other dependencies (aiohttp, msgspec, pydantic...)
come from this test run's environment through a .pth file that leaves out every
copy of spirit_gpu.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import pytest

from spirit_gpu.builder.cli import main
from spirit_gpu.builder.wheel import metadata
from tests.conftest import free_port


def _deps_without_spirit(tmp: Path) -> Path:
    """A directory with links to every installed package except spirit-gpu itself."""
    deps = tmp / "deps"
    deps.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            low = entry.name.lower()
            if low.startswith(("spirit_gpu", "spirit-gpu", "__editable__")) or \
                    low.endswith(".pth") or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    return deps


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EASE_", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_fresh_venv_installs_the_projects_spirit_gpu_and_serves(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.json").write_text('{"prompt": "a cat", "steps": 3}')
    assert main(["-i", "input.json", "-o", "proj"]) == 0
    project = tmp_path / "proj"
    version = metadata().version
    requirements = (project / "requirements.txt").read_text()
    assert f"spirit-gpu>={version}" in requirements and "--find-links ./wheels" in requirements
    assert (project / ".dockerignore").is_file()
    assert "COPY wheels/ wheels/" in (project / "Dockerfile").read_text()

    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = str(fresh / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], capture_output=True, text=True, check=True,
                             env=_clean_env()).stdout.strip()
    Path(purelib, "deps.pth").write_text(str(_deps_without_spirit(tmp_path)) + "\n")
    env = _clean_env()
    probe = [python, "-c", "import spirit_gpu"]
    assert subprocess.run(probe, env=env, capture_output=True).returncode != 0  # none yet

    pip = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                          "--no-index", "-q", "-r", "requirements.txt"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    where = subprocess.run([python, "-c", "import importlib.metadata as m, spirit_gpu; "
                            "print(spirit_gpu.__file__); print(m.version('spirit-gpu'))"],
                           env=env, capture_output=True, text=True, cwd=tmp_path, check=True)
    path, installed = where.stdout.split()
    assert path.startswith(purelib) and installed == version

    port = free_port()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([python, "-m", "spirit_gpu.supervisor", "src/main.py"], cwd=project,
                            env=dict(env, EASE_TEST_MODE="true", EASE_TEST_PORT=str(port)),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"input": {"prompt": "a dog", "steps": 2}}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body)
                with urllib.request.urlopen(request, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
        assert answer == {"output": {"prompt": "a dog", "steps": 2}}
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_version_is_past_the_registrys_original() -> None:
    import spirit_gpu

    version = metadata().version
    assert spirit_gpu.__version__ == version
    assert tuple(int(x) for x in version.split(".")[:2]) > (0, 1)
