"""Optional parts of the package: which extra a command needs, said in one line.

The base install is what a GPU worker image needs (aiohttp, msgspec, uvloop);
the gateway, builder, NATS store and benchmarks come as extras.
"""

from __future__ import annotations

import importlib

EXTRAS: dict[str, tuple[str, ...]] = {
    "gateway": ("prometheus_client", "rich"),
    "builder": ("datamodel_code_generator", "yaml", "rich"),
    "nats": ("nats",),
}


class MissingExtra(SystemExit):
    """Raised (as an exit with a message) when a command's extra is not installed."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    gone = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)  # the command imports it next anyway
        except ImportError:
            gone.append(module)
    return gone


def require(extra: str, what: str) -> None:
    """Exit with one clear line when ``what`` needs ``extra`` and it is not installed."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what} needs the '{extra}' extra (missing: {', '.join(gone)}); "
                           f"install it with: pip install 'spirit-gpu[{extra}]'")
