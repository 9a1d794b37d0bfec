"""A wheel of the running spirit-gpu, for a generated project's ``wheels/``.

The registry's ``spirit-gpu`` 0.1.0 is an older SDK without the supervisor, so
a project's ``requirements.txt`` asks for ``spirit-gpu>=VERSION`` and finds it
in ``wheels/`` (``--find-links``) until this version is published. The wheel
is written from the package's own files, without a build backend or network:
the same bytes each time for the same files (fixed timestamps), so
regenerating a project leaves an unchanged wheel unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import spirit_gpu

NAME = "spirit-gpu"
_EPOCH = (2020, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Meta:
    version: str
    summary: str
    requires_python: str
    requires: list[str]  # Requires-Dist lines, extras marked
    extras: list[str]
    scripts: dict[str, str]


def package_dir() -> Path:
    return Path(spirit_gpu.__file__).resolve().parent


def _from_pyproject(path: Path) -> Meta | None:
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != NAME:
        return None
    requires = list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    for extra, deps in extras.items():
        for dep in deps:
            marker = f'extra == "{extra}"'
            requires.append(f"{dep} and {marker}" if ";" in dep else f"{dep}; {marker}")
    return Meta(version=project["version"], summary=project.get("description", ""),
                requires_python=project.get("requires-python", ""), requires=requires,
                extras=sorted(extras), scripts=dict(project.get("scripts", {})))


def metadata() -> Meta:
    """From the source tree's pyproject.toml when running from one, else from the
    installed distribution."""
    found = _from_pyproject(package_dir().parent / "pyproject.toml")
    if found is not None:
        return found
    dist = importlib.metadata.distribution(NAME)
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    info = dist.metadata
    return Meta(version=dist.version, summary=info["Summary"] or "",
                requires_python=info["Requires-Python"] or "",
                requires=list(dist.requires or []),
                extras=list(info.get_all("Provides-Extra") or []), scripts=scripts)


def wheel_name(meta: Meta) -> str:
    return f"spirit_gpu-{meta.version}-py3-none-any.whl"


def _metadata_text(meta: Meta) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {NAME}", f"Version: {meta.version}"]
    if meta.summary:
        lines.append(f"Summary: {meta.summary}")
    if meta.requires_python:
        lines.append(f"Requires-Python: {meta.requires_python}")
    lines += [f"Provides-Extra: {e}" for e in meta.extras]
    lines += [f"Requires-Dist: {r}" for r in meta.requires]
    return "\n".join(lines) + "\n"


def build() -> tuple[str, bytes]:
    """The wheel's file name and bytes."""
    meta = metadata()
    root = package_dir()
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            files[rel.as_posix()] = path.read_bytes()
    info = f"spirit_gpu-{meta.version}.dist-info"
    files[f"{info}/METADATA"] = _metadata_text(meta).encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: spirit-gpu-builder\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    if meta.scripts:
        entries = "".join(f"{k} = {v}\n" for k, v in sorted(meta.scripts.items()))
        files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{entries}".encode()
    record = io.StringIO()
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{info}/RECORD,,\n")
    files[f"{info}/RECORD"] = record.getvalue().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            entry = zipfile.ZipInfo(name, date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, data)
    return wheel_name(meta), out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """``python -m spirit_gpu.builder.wheel DIR``: write the wheel into DIR."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "wheels")
    out.mkdir(parents=True, exist_ok=True)
    name, data = build()
    (out / name).write_bytes(data)
    print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
