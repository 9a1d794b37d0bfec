"""The files of a worker project, and writing them without clobbering the user's."""

from __future__ import annotations

import datetime
import os
import string
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from spirit_gpu.builder import wheel
from spirit_gpu.builder.errors import BuilderError
from spirit_gpu.builder.model import MODEL_FILE

HANDLER_TYPES = ("sync", "async", "sync_generator", "async_generator")
CREATED, OVERWRITTEN, KEPT, UNCHANGED = "created", "overwritten", "kept", "unchanged"
_STATIC = (".dockerignore", "Dockerfile", "scripts/build.sh", "scripts/start.sh",
           "src/build.py")
WHEELS = "wheels"
_RENDERED = ("LICENSE", "README.md", "requirements.txt")
_STDLIB = {"async_generator": ["from collections.abc import AsyncIterator"],
           "sync_generator": ["from collections.abc import Iterator"]}


@dataclass(frozen=True)
class Options:
    input_name: str
    input_type: str
    data_type: str
    handler_type: str


@dataclass(frozen=True)
class ApiFile:
    """The API description as the project keeps it (api.json, api.csv, ...)."""

    name: str
    text: str


@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative to the output directory, with "/"
    content: str | bytes
    executable: bool = False


@dataclass(frozen=True)
class Outcome:
    path: str
    status: str


def _templates() -> Traversable:
    return resources.files("spirit_gpu.builder").joinpath("templates")


def _read(*parts: str) -> str:
    node = _templates()
    for part in parts:
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def render_main(data_type: str, handler_type: str) -> str:
    """``src/main.py`` for the chosen data type and handler kind."""
    if handler_type not in HANDLER_TYPES:
        raise BuilderError(f"unknown handler type {handler_type!r}; "
                           f"choose from {', '.join(HANDLER_TYPES)}")
    pydantic = data_type.startswith("pydantic")
    stdlib = ([] if pydantic else ["import dataclasses"]) + ["import sys"]
    stdlib += _STDLIB.get(handler_type, []) + ["from pathlib import Path", "from typing import Any"]
    imports = "\n".join(sorted(stdlib, key=lambda line: (line.startswith("from"), line)))
    imports += "\n\nfrom pydantic import ValidationError" if pydantic else "\n"
    validation = _read("main", "validate_pydantic.txt" if pydantic else "validate_dataclass.txt")
    return string.Template(_read("main", "main.py.tmpl")).substitute(
        imports=imports,
        validation=validation.rstrip("\n"),
        handler=_read("main", f"handler_{handler_type}.txt").rstrip("\n"),
    )


def _requirements(data_type: str) -> str:
    # the registry's 0.1.0 is an older SDK without the supervisor: ask for this
    # version or newer, which pip finds in wheels/ until it is published
    lines = [f"--find-links ./{WHEELS}", f"spirit-gpu>={wheel.metadata().version}"]
    if data_type.startswith("pydantic"):
        lines.append("pydantic>=2")
    return "\n".join(lines)


def regenerate_command(options: Options, source: str) -> str:
    """The command that regenerates the model, run in the project's directory, from the
    description kept there. The input type is named: a JSON example can look like a
    schema to the guess, and an api.json of a YAML input is no longer YAML."""
    return (f"spirit-gpu-builder -i {source} --input-type {options.input_type} "
            f"--data-type {options.data_type} --model-only")


def plan_project(options: Options, model_code: str, api: ApiFile | None) -> list[PlannedFile]:
    """Every file of a new project (``api`` None: the description is in it already)."""
    source = api.name if api is not None else options.input_name
    values = {
        "input_name": options.input_name, "input_type": options.input_type,
        "data_type": options.data_type, "handler_type": options.handler_type,
        "year": str(datetime.date.today().year),
        "requirements": _requirements(options.data_type),
        "regenerate": regenerate_command(options, source),
        "api_file": source,
    }
    files = [PlannedFile(p, _read("project", p), p.endswith(".sh")) for p in _STATIC]
    files += [PlannedFile(p, string.Template(_read("project", p + ".tmpl")).substitute(values))
              for p in _RENDERED]
    files.append(PlannedFile("src/main.py", render_main(options.data_type, options.handler_type)))
    files.append(PlannedFile(MODEL_FILE, model_code))
    name, data = wheel.build()
    files.append(PlannedFile(f"{WHEELS}/{name}", data))
    if api is not None:
        files.append(PlannedFile(api.name, api.text))
    return sorted(files, key=lambda f: f.path)


def prepare_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BuilderError(f"output directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuilderError(f"cannot create output directory {out_dir}: "
                           f"{exc.strerror or exc}") from None


def _write_one(out_dir: Path, planned: PlannedFile, overwrite: bool) -> Outcome:
    target = out_dir / planned.path
    existed = target.exists()
    if existed:
        try:
            current = target.read_bytes()
            wanted = planned.content if isinstance(planned.content, bytes) \
                else planned.content.encode()
            if current == wanted:
                return Outcome(planned.path, UNCHANGED)
        except OSError:
            pass
        if not overwrite:
            return Outcome(planned.path, KEPT)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(planned.content, bytes):
            target.write_bytes(planned.content)
        else:
            target.write_text(planned.content, encoding="utf-8")
        if planned.executable:
            os.chmod(target, 0o755)
    except OSError as exc:
        raise BuilderError(f"cannot write {target}: {exc.strerror or exc}") from None
    return Outcome(planned.path, OVERWRITTEN if existed else CREATED)


def write_files(out_dir: Path, files: list[PlannedFile], force: bool,
                always: frozenset[str] = frozenset()) -> list[Outcome]:
    """Write ``files``; an existing, different file is kept unless ``force`` or in ``always``."""
    prepare_output_dir(out_dir)
    return [_write_one(out_dir, f, force or f.path in always) for f in files]
