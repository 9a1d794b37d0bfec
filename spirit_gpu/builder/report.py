"""What the builder tells its user, with rich."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from spirit_gpu.builder.errors import BuilderError
from spirit_gpu.builder.project import CREATED, KEPT, OVERWRITTEN, UNCHANGED, Outcome

_STYLE = {CREATED: "green", OVERWRITTEN: "yellow", KEPT: "cyan", UNCHANGED: "dim"}


def show_arguments(console: Console, arguments: dict[str, str]) -> None:
    table = Table(title="spirit-gpu-builder", show_header=True, header_style="bold")
    table.add_column("argument", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in arguments.items():
        table.add_row(name, escape(value))
    console.print(table)


def show_files(console: Console, out_dir: Path, outcomes: list[Outcome]) -> None:
    tree = Tree(f"[bold]{escape(str(out_dir))}[/]")
    folders: dict[str, Tree] = {}
    for outcome in outcomes:
        *parents, name = outcome.path.split("/")
        node, key = tree, ""
        for parent in parents:
            key = f"{key}/{parent}"
            if key not in folders:
                folders[key] = node.add(f"[bold]{escape(parent)}/[/]")
            node = folders[key]
        style = _STYLE[outcome.status]
        node.add(f"{escape(name)}  [{style}]{outcome.status}[/]")
    console.print(tree)
    kept = [o.path for o in outcomes if o.status == KEPT]
    if kept:
        console.print(f"[cyan]Kept {len(kept)} existing file(s) that differ from the template:[/] "
                      f"{escape(', '.join(kept))}. Use --force to overwrite them.")


def show_notes(console: Console, notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


def show_next_steps(console: Console, out_dir: Path, model_only: bool) -> None:
    if model_only:
        console.print("[bold]Next:[/] adapt src/main.py to the changed RequestInput if needed.")
        return
    steps = Table.grid(padding=(0, 2))
    steps.add_column(style="bold")
    steps.add_column()
    # (escaped whole: rich would take "[gateway]" for a style and drop it)
    steps.add_row("1.", escape(f"cd {out_dir} && pip install -r requirements.txt "
                               "'spirit-gpu[gateway]'   (the gateway extra runs spirit-gpu dev)"))
    steps.add_row("2.", "put your inference code in src/main.py (predict) and src/build.py")
    steps.add_row("3.", "spirit-gpu dev src/main.py   (run and try it locally)")
    steps.add_row("4.", "docker build -t my-worker .   (build the image)")
    console.print("[bold]Next steps[/]")
    console.print(steps)


def show_error(console: Console, error: BuilderError) -> None:
    console.print(f"[bold red]error:[/] {escape(error.message)}")
    if error.hint:
        console.print(f"[dim]hint:[/] {escape(error.hint)}")
