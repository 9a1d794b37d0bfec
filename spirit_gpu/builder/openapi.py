"""Picking the request input's schema out of an OpenAPI document."""

from __future__ import annotations

import copy
from typing import Any

from spirit_gpu.builder.errors import BuilderError
from spirit_gpu.builder.schema_check import check_schema, resolve_pointer

MODEL_NAME = "RequestInput"
_PREFIX = "#/components/schemas/"
_METHODS = ("post", "put", "patch", "get", "delete", "options", "head", "trace")


def _deref(doc: dict[str, Any], node: Any, source: str, where: str) -> Any:
    seen: set[str] = set()
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen or not ref.startswith("#"):
            raise BuilderError(f"{source}: cannot follow $ref {ref!r} at {where}")
        seen.add(ref)
        try:
            node = resolve_pointer(doc, ref)
        except KeyError:
            raise BuilderError(f"{source}: $ref {ref!r} at {where} does not resolve") from None
    return node


def _json_schema_of_body(doc: dict[str, Any], body: Any, source: str, where: str) -> Any:
    body = _deref(doc, body, source, where)
    content = body.get("content") if isinstance(body, dict) else None
    if not isinstance(content, dict):
        return None
    for media, entry in content.items():
        if "json" in media and isinstance(entry, dict) and "schema" in entry:
            return _deref(doc, entry["schema"], source, f"{where}.content.{media}.schema")
    return None


def find_input_schema(doc: dict[str, Any], source: str) -> tuple[Any, str]:
    """The schema of ``input`` in the first operation whose JSON body has one, and where."""
    paths = doc.get("paths")
    for path, item in (paths.items() if isinstance(paths, dict) else []):
        if not isinstance(item, dict):
            continue
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            where = f"paths.{path}.{method}.requestBody"
            schema = _json_schema_of_body(doc, operation["requestBody"], source, where)
            props = schema.get("properties") if isinstance(schema, dict) else None
            if isinstance(props, dict) and "input" in props:
                return props["input"], f"{where} (property `input`)"
    raise BuilderError(
        f"{source}: the OpenAPI document has no components.schemas.{MODEL_NAME} and no "
        "operation with a JSON request body that has an `input` property",
        hint=f"add components.schemas.{MODEL_NAME}, or describe the request body as "
        "{input: {...}}",
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _closure(schemas: dict[str, Any], start: Any, source: str) -> dict[str, Any]:
    """The component schemas ``start`` references, directly or not."""
    kept: dict[str, Any] = {}
    pending = _refs(start)
    while pending:
        ref = pending.pop()
        if not ref.startswith(_PREFIX):
            raise BuilderError(f"{source}: $ref {ref!r} is not supported in the request "
                               f"input (only {_PREFIX}... references are)")
        name = ref.removeprefix(_PREFIX)
        if name in kept:
            continue
        if name not in schemas:
            raise BuilderError(f"{source}: $ref {ref!r} does not resolve")
        kept[name] = schemas[name]
        pending.extend(_refs(schemas[name]))
    return kept


def request_input_document(doc: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """A minimal OpenAPI document holding RequestInput and what it references; and its origin."""
    components = doc.get("components")
    schemas = components.get("schemas") if isinstance(components, dict) else None
    schemas = schemas if isinstance(schemas, dict) else {}
    if MODEL_NAME in schemas:
        request_input, origin = schemas[MODEL_NAME], f"components.schemas.{MODEL_NAME}"
    else:
        request_input, origin = find_input_schema(doc, source)
        request_input = copy.deepcopy(_deref(doc, request_input, source, origin))
    check_schema(request_input, doc, source, origin)
    kept = _closure(schemas, request_input, source)
    for name, schema in kept.items():
        check_schema(schema, doc, source, f"components.schemas.{name}")
    kept[MODEL_NAME] = request_input
    minimal = {
        "openapi": doc.get("openapi", "3.0.0"),
        "info": doc.get("info") or {"title": "request input", "version": "1"},
        "components": {"schemas": kept},
    }
    return minimal, origin
