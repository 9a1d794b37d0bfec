"""`spirit-gpu-builder`: argument parsing and the two flows (project, model only)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from spirit_gpu.builder import report
from spirit_gpu.builder.errors import BuilderError
from spirit_gpu.builder.inputs import DEFAULT_FILES, INPUT_TYPES, LoadedInput, load, locate
from spirit_gpu.builder.model import DATA_TYPES, MODEL_FILE, generate_model
from spirit_gpu.builder.openapi import MODEL_NAME, request_input_document
from spirit_gpu.builder.project import (
    HANDLER_TYPES,
    ApiFile,
    Options,
    PlannedFile,
    plan_project,
    write_files,
)
from spirit_gpu.builder.sample import fits, sample_input

_JSON_KINDS = ("openapi", "jsonschema", "json", "yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spirit-gpu-builder",
        description="Generate a spirit-gpu worker project from an OpenAPI document, a JSON "
        "schema or an example of the request `input`, built on datamodel-code-generator.",
    )
    parser.add_argument("-i", "--input-file", help="the file describing the request input; "
                        f"default: the first of {', '.join(DEFAULT_FILES)} in the current "
                        "directory")
    parser.add_argument("--input-type", choices=INPUT_TYPES, default="auto",
                        help="type of the input file (default: auto)")
    parser.add_argument("-o", "--output-dir", default=".",
                        help="where to write the project (default: current directory)")
    parser.add_argument("--data-type", choices=DATA_TYPES, default=DATA_TYPES[0],
                        help=f"model class kind (default: {DATA_TYPES[0]})")
    parser.add_argument("--handler-type", choices=HANDLER_TYPES, default="sync",
                        help="handler kind in src/main.py (default: sync)")
    parser.add_argument("--model-only", action="store_true",
                        help=f"only (re)generate {MODEL_FILE}, overwriting it")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing files that differ from what would be written")
    return parser


def _api_file(loaded: LoadedInput, out_dir: Path, notes: list[str]) -> ApiFile | None:
    """The description, kept in the project to regenerate from: api.json, or a copy
    of a CSV, GraphQL or Python input as api.<suffix> (None: it is in there already)."""
    if loaded.path.parent.resolve() == out_dir.resolve():
        notes.append(f"the description stays {loaded.path.name}: the project already has it")
        return None
    if loaded.kind in _JSON_KINDS:
        return ApiFile("api.json",
                       json.dumps(loaded.data, indent=2, ensure_ascii=False, default=str) + "\n")
    return ApiFile(f"api{loaded.path.suffix.lower()}", loaded.path.read_text(encoding="utf-8"))


def _sample_file(loaded: LoadedInput, model_code: str, notes: list[str]) -> PlannedFile | None:
    """src/test_input.json: the request `spirit-gpu dev src/main.py` prints to try."""
    if loaded.kind in ("json", "yaml"):
        value = loaded.data  # the example is a valid input
    elif loaded.kind in ("jsonschema", "openapi"):
        if loaded.kind == "openapi":
            root = request_input_document(loaded.data, loaded.path.name)[0]
            schema = root["components"]["schemas"][MODEL_NAME]
        else:
            root = schema = loaded.data
        try:
            value = sample_input(schema, root)
        except ValueError:
            value = None
        if value is None or not fits(model_code, value):
            notes.append("no src/test_input.json: no sample input from the schema fits "
                         "RequestInput; write one for spirit-gpu dev's sample request")
            return None
    else:
        return None
    return PlannedFile("src/test_input.json", json.dumps(
        {"input": value}, indent=2, ensure_ascii=False, default=str) + "\n")


def run(args: argparse.Namespace, console: Console) -> None:
    cwd = Path.cwd()
    path = locate(args.input_file, cwd)
    loaded = load(path, args.input_type)
    out_dir = Path(args.output_dir)
    out_dir = out_dir if out_dir.is_absolute() else cwd / out_dir
    report.show_arguments(console, {
        "input file": str(path), "input type": f"{loaded.kind} (asked: {args.input_type})",
        "output dir": str(out_dir), "data type": args.data_type,
        "handler type": "-" if args.model_only else args.handler_type,
        "mode": "model only" if args.model_only else "project",
        "force": str(args.force),
    })
    try:
        model_code = generate_model(loaded, args.data_type)
    except BuilderError as exc:
        if args.input_type == "auto" and loaded.kind == "jsonschema" and exc.hint is None:
            # an example whose top level has a "type" (or "properties") looks like a schema
            exc.hint = (f"{path.name} was read as a JSON schema (auto); if it is an example "
                        "input, say so with --input-type json (or yaml)")
        raise
    notes: list[str] = []
    if args.model_only:
        files = [PlannedFile(MODEL_FILE, model_code)]
        outcomes = write_files(out_dir, files, args.force, always=frozenset({MODEL_FILE}))
    else:
        options = Options(path.name, loaded.kind, args.data_type, args.handler_type)
        files = plan_project(options, model_code, _api_file(loaded, out_dir, notes))
        sample = _sample_file(loaded, model_code, notes)
        if sample is not None:
            files.append(sample)
        outcomes = write_files(out_dir, files, args.force)
        if any(o.path == MODEL_FILE and o.status == "kept" for o in outcomes):
            notes.append(f"{MODEL_FILE} was kept; regenerate it with --model-only")
    report.show_files(console, out_dir, outcomes)
    report.show_notes(console, notes)
    report.show_next_steps(console, out_dir, args.model_only)


def console(stderr: bool = False) -> Console:
    """Rich output; into a pipe or file no line is wrapped at a made-up terminal width
    (a long path must stay whole for whoever reads or greps it)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=100_000)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the builder; returns the exit status (0 ok, 1 a reported error, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has already printed the usage error
        return exc.code if isinstance(exc.code, int) else 2
    out, errors = console(), console(stderr=True)
    try:
        run(args, out)
    except BuilderError as exc:
        report.show_error(errors, exc)
        return 1
    except KeyboardInterrupt:
        report.show_error(errors, BuilderError("interrupted"))
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
