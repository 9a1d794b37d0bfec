"""Results of every shape: input.kind picks the handler's answer (see RESULTS)."""

import base64

from spirit_gpu import start

RESULTS = {"bytes": b"\x00raw", "json_bytes": b'{"a": 1}', "dict": {"b": b"\x01"}}


def handler(request, env):  # type: ignore[no-untyped-def]
    kind = request["input"]["kind"]
    if kind == "list":  # bytes inside JSON: base64, as in a generator's result
        return list(gen())
    return RESULTS[kind] if kind in RESULTS else base64.b64encode(b"x")


def gen():  # type: ignore[no-untyped-def]
    yield b"raw-0"
    yield {"n": 1}


start({"handler": handler})
