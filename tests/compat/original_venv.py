"""A venv holding the original spirit-gpu worker from the registry (it has our import name).

Made once and reused: ``$SPIRIT_ORIGINAL_VENV`` or
``${XDG_CACHE_HOME:-~/.cache}/spirit-gpu-tests/original-<version>``.
``python -m tests.compat.original_venv`` prepares it (CI runs that before the
tests); tests that need it skip, with the reason, when it cannot be made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.1.0"
REQUIREMENT = f"spirit-gpu=={VERSION}"
_CHECK = ("import importlib.metadata as m, spirit_gpu; "
          f"assert m.version('spirit-gpu') == {VERSION!r}, m.version('spirit-gpu')")


def venv_dir() -> Path:
    explicit = os.environ.get("SPIRIT_ORIGINAL_VENV")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "spirit-gpu-tests" / f"original-{VERSION}"


def clean_env() -> dict[str, str]:
    """The environment for the original's processes: our tree must not shadow its package."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_path(where: Path | None = None) -> Path:
    return (where or venv_dir()) / "bin" / "python"


def usable(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", _CHECK], env=clean_env(), cwd="/",
                          capture_output=True, timeout=120)
    return done.returncode == 0


def prepare() -> tuple[Path | None, str]:
    """The venv's python, or None and why it could not be made."""
    where = venv_dir()
    python = python_path(where)
    if usable(python):
        return python, ""
    where.parent.mkdir(parents=True, exist_ok=True)
    steps = ([sys.executable, "-m", "venv", "--clear", str(where)],
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              REQUIREMENT])
    for step in steps:
        try:
            done = subprocess.run(step, env=clean_env(), cwd="/", capture_output=True,
                                  text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(step[:3])}: {exc}"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            tail = [line for line in lines if line.startswith("ERROR")][-2:] or lines[-3:]
            return None, (f"could not install {REQUIREMENT} from the package registry into "
                          f"{where} (registry unreachable?): {' | '.join(tail)}")
    if not usable(python):
        return None, f"{REQUIREMENT} installed into {where} but does not import"
    return python, ""


if __name__ == "__main__":
    found, why = prepare()
    if found is None:
        print(f"original worker venv: {why}", file=sys.stderr)
        sys.exit(1)
    print(f"original worker venv ready: {found}")
