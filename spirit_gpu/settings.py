"""The mechanism both typed configs share: fields that know their env var.

``WorkerConfig`` (spirit_gpu/config.py) and ``GatewayConfig``
(spirit_gpu/gateway/config.py) are dataclasses of ``setting(...)`` fields and
inherit ``EnvSettings``; each decides its own precedence in ``from_sources``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import field, fields
from typing import Any, Self

_TRUE = {"1", "true", "yes", "on"}


def setting(default: Any, env: str, doc: str) -> Any:
    """A config field with its environment variable and one line of help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"env": env, "doc": doc})
    return field(default=default, metadata={"env": env, "doc": doc})


def coerce(kind: Any, value: Any) -> Any:
    """A flag's or env var's text (or a code value) as the field's type."""
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "list[str]":
        items = value.split(",") if isinstance(value, str) else list(value)
        return [str(v).strip() for v in items if str(v).strip()]
    return str(value)


class EnvSettings:
    """Methods for a dataclass of ``setting`` fields."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    def apply(self, values: Mapping[str, Any]) -> Self:
        """A copy with the known keys of ``values`` set (unknown keys and None ignored)."""
        known = {f.name: f for f in fields(self)}  # type: ignore[arg-type]
        updates = {k: coerce(known[k].type, v) for k, v in values.items()
                   if k in known and v is not None}
        return dataclasses.replace(self, **updates)  # type: ignore[type-var]

    @classmethod
    def env_values(cls, environ: Mapping[str, str]) -> dict[str, str]:
        """The fields set (non-empty) in ``environ``."""
        return {f.name: environ[f.metadata["env"]] for f in fields(cls)  # type: ignore[arg-type]
                if environ.get(f.metadata["env"], "") != ""}

    @classmethod
    def flag_values(cls, ns: argparse.Namespace) -> dict[str, Any]:
        """The fields given as command-line flags (argparse default None: not given)."""
        names = set(cls.names())
        return {k: v for k, v in vars(ns).items() if k in names and v is not None}
