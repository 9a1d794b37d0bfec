"""A command whose extra is missing says which one to install, in one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK = "import sys; sys.modules[{mod!r}] = None; sys.argv = {argv!r}; {call}"


def run_without(module: str, argv: list[str], call: str) -> subprocess.CompletedProcess[str]:
    code = BLOCK.format(mod=module, argv=argv, call=call)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize(("module", "argv", "call", "extra"), [
    ("prometheus_client", ["spirit-gpu", "gateway"],
     "from spirit_gpu.cli import main; sys.exit(main(['gateway']))", "gateway"),
    ("rich", ["spirit-gpu", "dev", "x.py"],
     "from spirit_gpu.cli import main; sys.exit(main(['dev', 'x.py']))", "gateway"),
    ("datamodel_code_generator", ["spirit-gpu-builder"],
     "from spirit_gpu.builder import main; sys.exit(main([]))", "builder"),
])
def test_missing_extra_names_the_extra(module: str, argv: list[str], call: str,
                                       extra: str) -> None:
    proc = run_without(module, argv, call)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'spirit-gpu[{extra}]'" in lines[0]
    assert module in lines[0]


def test_worker_runs_on_the_base_install() -> None:
    # the supervisor, the child and start() import nothing from the extras
    code = ("import sys\n"
            "for m in ('prometheus_client', 'rich', 'datamodel_code_generator', 'yaml', 'nats'):\n"
            "    sys.modules[m] = None\n"
            "import spirit_gpu, spirit_gpu.supervisor.app, spirit_gpu.child.runtime\n"
            "import spirit_gpu.supervisor.proxy.worker, spirit_gpu.supervisor.__main__\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_base_dependencies_are_what_a_worker_image_needs() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split(";")[0].strip() for d in meta["dependencies"])
    assert names == ["aiohttp", "httptools", "msgspec", "uvloop"]
    extras = meta["optional-dependencies"]
    assert {"gateway", "builder", "nats", "bench", "test", "all"} <= set(extras)
