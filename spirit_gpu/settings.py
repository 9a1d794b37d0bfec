"""The mechanism both typed configs share: fields that know their env var and flag.

``WorkerConfig`` (spirit_gpu/config.py) and ``GatewayConfig``
(spirit_gpu/gateway/config.py) are dataclasses of ``setting(...)`` fields and
inherit ``EnvSettings``; each decides its own precedence in ``from_sources``.
``add_flags`` declares one command-line flag per field, for either config.
A value that cannot be used raises ``SettingError`` naming where it came from
(``--job-timeout``, ``SPIRIT_JOB_TIMEOUT``, the start() key).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import Field, field, fields
from typing import Any, Self

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingError(ValueError):
    """A setting's value cannot be used; the message is one line a user can act on."""


def setting(default: Any, env: str, doc: str, flag: str = "", metavar: str = "",
            check: Callable[[Any], None] | None = None) -> Any:
    """A config field with its environment variable, one line of help and, when it
    differs from ``--field-name``, its flag. ``check`` refuses a value it cannot use
    with ValueError (the rest of a sentence after the value)."""
    metadata = {"env": env, "doc": doc, "flag": flag, "metavar": metavar, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _kind(kind: Any) -> str:
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def coerce(kind: Any, value: Any) -> Any:
    """A flag's or env var's text (or a code value) as the field's type (ValueError if not)."""
    kind = _kind(kind)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in _TRUE | _FALSE:
            raise ValueError("is not true or false (1/0, yes/no, on/off)")
        return text in _TRUE
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError("is not a whole number") from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("is not a number") from None
    if kind == "list[str]":
        # comma-separated wherever it comes from: an env var, or each repeat of a flag
        items = [value] if isinstance(value, str) else list(value)
        return [part.strip() for v in items for part in str(v).split(",") if part.strip()]
    return str(value)


def one_of(*choices: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
    return check


def port_number(value: Any) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("is not a port number (0-65535)")


def flag_name(f: Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _where(f: Field[Any], source: str) -> str:
    if source == "flag":
        return flag_name(f)
    if source == "env":
        return str(f.metadata["env"])
    if source == "start":
        return f"start() key {f.name!r}"
    return f.name


class EnvSettings:
    """Methods for a dataclass of ``setting`` fields."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    def apply(self, values: Mapping[str, Any], source: str = "") -> Self:
        """A copy with the known keys of ``values`` set (unknown keys and None ignored).

        ``source`` (flag, env, start) names the origin in a ``SettingError``."""
        known = {f.name: f for f in fields(self)}  # type: ignore[arg-type]
        updates = {}
        for name, value in values.items():
            f = known.get(name)
            if f is None or value is None:
                continue
            try:
                updates[name] = coerce(f.type, value)
                check = f.metadata.get("check")
                if check is not None:
                    check(updates[name])
            except ValueError as exc:
                raise SettingError(f"{_where(f, source)}: {value!r} {exc}") from None
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

    @classmethod
    def flag_names(cls) -> list[str]:
        names = []
        for f in fields(cls):  # type: ignore[arg-type]
            names.append(flag_name(f))
            if _kind(f.type) == "bool":
                names.append("--no-" + flag_name(f)[2:])
        return names


def add_flags(parser: argparse.ArgumentParser, config: type[EnvSettings]) -> None:
    """One flag per field of ``config`` (default None: not given, so the env var or
    the default applies); booleans get ``--x/--no-x``, lists repeat."""
    for f in fields(config):  # type: ignore[arg-type]
        env, doc = f.metadata["env"], f.metadata["doc"]
        flag = flag_name(f)
        kind = _kind(f.type)
        metavar = f.metadata.get("metavar") or None
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{doc} (env {env}, default {f.default!r})")
        elif kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, action="append", default=None,
                                metavar=metavar, help=f"{doc} (repeatable; env {env})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar,
                                help=f"{doc} (env {env}, default {f.default!r})")
