"""Calling a user handler of any kind and turning what it does into result bytes.

The one rule for results: a handler that returns ``bytes`` (plain or async)
answers those bytes untouched; everything else is JSON. Inside JSON, bytes are
base64 strings (msgspec's and pydantic's convention), and that includes each
item a generator yields: a generator's result is a JSON list and each streamed
chunk one JSON value. The gateway and test mode serve a result that parses as
JSON as ``application/json``, anything else as ``application/octet-stream``
(``spirit_gpu.protocol.agent.result_content_type``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import msgspec

from spirit_gpu.env import Env
from spirit_gpu.errors import HandlerError
from spirit_gpu.log import logger

Handler = Callable[[dict[str, Any], Env], Any]
EmitChunk = Callable[[int, bytes], None]

SYNC, GENERATOR, ASYNC, ASYNC_GENERATOR = "sync", "generator", "async", "async_generator"
ASYNC_KINDS = (ASYNC, ASYNC_GENERATOR)


def handler_kind(handler: Callable[..., Any]) -> str:
    target = handler
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = getattr(handler, "__call__", handler)  # noqa: B004 - callable objects
    if inspect.isasyncgenfunction(target):
        return ASYNC_GENERATOR
    if inspect.iscoroutinefunction(target):
        return ASYNC
    if inspect.isgeneratorfunction(target):
        return GENERATOR
    return SYNC


def _enc_hook(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # pydantic v2
    if callable(dump):
        return dump(mode="json")
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise NotImplementedError(f"cannot JSON-encode {type(obj).__name__}")


_json = msgspec.json.Encoder(enc_hook=_enc_hook)
_request_decoder = msgspec.json.Decoder()


def encode_result(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return _json.encode(value)


def encode_item(value: Any) -> bytes:
    """One generator item: always JSON (bytes become a base64 string)."""
    return _json.encode(value)


def error_body(message: str) -> bytes:
    return _json.encode({"error": message})


class Outcome(msgspec.Struct):
    status_code: int
    body: bytes
    message: str = ""


class BadRequest(Exception):
    pass


def prepare_request(body: bytes, request_id: str) -> dict[str, Any]:
    """Decode the client's JSON once; add meta.requestID as the platform does."""
    try:
        request = _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise BadRequest("request body must be a JSON object with an \"input\" key")
    if "input" not in request:
        raise BadRequest("request body has no \"input\" key")
    if not isinstance(request.get("meta"), dict):
        request["meta"] = {"requestID": request_id}
    else:
        request["meta"].setdefault("requestID", request_id)
    return request


def _failure(exc: BaseException, request_id: str) -> Outcome:
    if isinstance(exc, HandlerError):
        return Outcome(exc.status_code, _json.encode(exc.body()), exc.message)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    logger.error(f"handler raised {text}", request_id=request_id, exc_info=True)
    return Outcome(500, error_body(text), f"handler raised {text}")


def _encoded(value: Any, request_id: str) -> Outcome:
    try:
        return Outcome(200, encode_result(value))
    except (NotImplementedError, TypeError, OverflowError) as exc:
        return _failure(TypeError(f"handler result is not JSON-serializable: {exc}"),
                        request_id)


def run_sync(handler: Handler, kind: str, request: dict[str, Any], env: Env,
             emit: EmitChunk | None) -> Outcome:
    """Run a sync or generator handler to completion in this thread."""
    try:
        if kind == GENERATOR:
            items: list[bytes] = []
            for item in handler(request, env):
                encoded = encode_item(item)
                if emit is not None:
                    emit(len(items), encoded)
                items.append(encoded)
            return Outcome(200, b"[" + b",".join(items) + b"]")
        return _encoded(handler(request, env), env.request_id)
    except Exception as exc:  # the handler's failure is this job's, not the process's
        return _failure(exc, env.request_id)


async def run_async(handler: Handler, kind: str, request: dict[str, Any], env: Env,
                    emit: EmitChunk | None) -> Outcome:
    """Run an async or async-generator handler as the current task."""
    try:
        if kind == ASYNC_GENERATOR:
            items: list[bytes] = []
            async for item in handler(request, env):
                encoded = encode_item(item)
                if emit is not None:
                    emit(len(items), encoded)
                items.append(encoded)
            return Outcome(200, b"[" + b",".join(items) + b"]")
        if kind == ASYNC:
            return _encoded(await handler(request, env), env.request_id)
        # a sync handler under the in-process debugging mode
        return await asyncio.to_thread(run_sync, handler, kind, request, env, emit)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return _failure(exc, env.request_id)


def call_concurrency_modifier(modifier: Callable[[int], Any] | None, current: int) -> int:
    """The user's concurrency_modifier; an error or a non-int means 1 (with a log line)."""
    if modifier is None:
        return current
    try:
        value = modifier(current)
    except Exception as exc:
        _modifier_complaint.say(f"concurrency_modifier raised {type(exc).__name__}: {exc}; "
                                "using 1")
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _modifier_complaint.say(f"concurrency_modifier returned {value!r}, not a positive "
                                "int; using 1")
        return 1
    return value


class _Complaint:
    """An error line said when it changes and again at most every ``every`` s: the
    modifier is asked every second, and its error need not fill the log."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.text = ""
        self.at = 0.0
        self.held = 0

    def say(self, text: str) -> None:
        now = time.monotonic()
        if text == self.text and now - self.at < self.every:
            self.held += 1
            return
        again = f" (said {self.held + 1} times in {now - self.at:.0f} s)" \
            if text == self.text and self.held else ""
        logger.error(text + again)
        self.text, self.at, self.held = text, now, 0


_modifier_complaint = _Complaint(every=60.0)


def call_check_start(check: Callable[[], Any] | None) -> tuple[bool, str]:
    """Proxy mode's check_start, plain function or coroutine function."""
    if check is None:
        return True, ""
    try:
        value = check()
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        return bool(value), ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


async def _await(value: Any) -> Any:
    return await value
