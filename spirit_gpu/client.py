"""A Python client for the public serverless API (DESIGN.md section 6).

``Endpoint`` is synchronous (standard library only); ``AsyncEndpoint`` has the
same methods as coroutines (aiohttp). Both talk to our gateway or to the hosted
platform alike::

    ep = Endpoint("http://127.0.0.1:8000", "my-sid", api_key="...")
    ep.run_sync({"prompt": "hi"})                 # the handler's result
    job = ep.submit({"prompt": "hi"}, webhook="https://example.com/hook")
    for item in job.stream(): ...                 # generator items as they come
    job.result(timeout=60)

Results are decoded from JSON; a result that is not JSON comes back as bytes.
Errors are ``SpiritError`` subclasses carrying the status code and the server's
message. Connection failures and 503 answers are retried with backoff; a POST
is retried only when nothing was run: after a connection error when nothing was
sent (connect refused), after a 503 only the gateway's "not enough gpu now"
(no worker, nothing queued). A submit is never enqueued twice by the client,
and a handler's own 503 is not run again.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

TERMINAL = ("succeed", "failed", "cancelled")
DEFAULT_SYNC_TIMEOUT = 200.0  # the gateway answers 408 after 180 s; wait a little longer
# a stream may wait for a queued job: the default async TTL (15 min) and a little more
DEFAULT_STREAM_GAP = 930.0


# --- errors ------------------------------------------------------------------------------

class SpiritError(Exception):
    """An answer that is not a success. ``status`` is the HTTP or job status code
    (0 when the server could not be reached); ``message`` the server's words."""

    def __init__(self, status: int, message: str, body: bytes = b"") -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body


class ConnectionFailed(SpiritError):
    """The gateway could not be reached (after the retries)."""


class BadRequest(SpiritError):
    """400: the request was refused as it is; the message says why."""


class Unauthorized(SpiritError):
    """401: missing or wrong API key."""


class NotFound(SpiritError):
    """404: unknown request id (or past the 30 minutes results are kept)."""


class RequestTimeout(SpiritError):
    """408: the request did not finish in time."""


class ServiceUnavailable(SpiritError):
    """503: no worker could take the request (after the retries)."""


class ServerError(SpiritError):
    """5xx other than 503."""


class JobFailed(SpiritError):
    """The job ended ``failed`` or ``cancelled``; ``status`` is its status code
    (499 for cancelled), ``body`` what the handler answered."""


class ResultTimeout(RequestTimeout, TimeoutError):
    """``Job.result(timeout=)`` ran out before the job finished (the job goes on)."""


_BY_STATUS: dict[int, type[SpiritError]] = {400: BadRequest, 401: Unauthorized, 404: NotFound,
                                            408: RequestTimeout, 503: ServiceUnavailable}


def error_for(status: int, body: bytes) -> SpiritError:
    """The typed error for a non-2xx answer; the message is its ``error`` field if any."""
    message = ""
    try:
        decoded = json.loads(body)
        if isinstance(decoded, dict):
            err = decoded.get("error")
            message = err.get("message", "") if isinstance(err, dict) else str(err or "")
    except ValueError:
        pass
    if not message:
        message = body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else SpiritError)
    return cls(status, message, body)


# --- what both clients share ----------------------------------------------------------

NO_WORKER = "not enough gpu now"  # the gateway's 503 before it queued anything


def _retry_503(method: str, error: SpiritError) -> bool:
    """A 503 is tried again when nothing ran: a read, or a submit the gateway refused for
    want of a worker. A handler's own 503, or a gateway shutting down with the request
    queued, would run it twice."""
    return error.status == 503 and (method == "GET" or error.message.startswith(NO_WORKER))


@dataclass(frozen=True)
class Retry:
    """Retries of connection failures and 503 answers (``_retry_503``): ``attempts`` tries in all,
    sleeping ``base * factor**n`` seconds (at most ``cap``) between them."""

    attempts: int = 4
    base: float = 0.25
    factor: float = 2.0
    cap: float = 4.0

    def delays(self) -> Iterator[float]:
        for n in range(self.attempts - 1):
            yield min(self.cap, self.base * self.factor ** n)


def decode_result(data: bytes | None) -> Any:
    """JSON when it parses, else the bytes (None for no result)."""
    if data is None:
        return None
    if not data:
        return b""
    try:
        return json.loads(data)
    except ValueError:
        return data


@dataclass(frozen=True)
class JobStatus:
    """One ``GET /status?requestID=`` answer, with ``result`` base64-decoded."""

    request_id: str
    status: str  # queueing, executing, succeed, failed, cancelled (notFound in batches)
    status_code: int
    message: str
    raw_result: bytes | None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def result(self) -> Any:
        return decode_result(self.raw_result)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobStatus:
        result = body.get("result")
        return cls(request_id=str(body.get("requestID", "")), status=str(body.get("status", "")),
                   status_code=int(body.get("statusCode") or 0),
                   message=str(body.get("message") or ""),
                   raw_result=base64.b64decode(result) if result else None)

    def outcome(self) -> Any:
        """The decoded result of a finished job; raises ``JobFailed`` when it failed."""
        if self.status == "succeed":
            return self.result
        raise JobFailed(self.status_code, self.message or self.status, self.raw_result or b"")


def _body(input: Any, webhook: str | None = None, ttl: float | None = None) -> bytes:
    body: dict[str, Any] = {"input": input}
    if webhook:
        body["webhook"] = webhook
    if ttl is not None:
        body["policy"] = {"ttl": int(ttl * 1000)}
    return json.dumps(body).encode()


def _poll_delays() -> Iterator[float]:
    delay = 0.05
    while True:
        yield delay
        delay = min(1.0, delay * 1.5)


class _Sse:
    """Server-Sent Events parsing: feed lines, get (event, data) when one ends."""

    def __init__(self) -> None:
        self.event = ""
        self.data: list[bytes] = []

    def feed(self, line: bytes) -> tuple[str, bytes] | None:
        line = line.rstrip(b"\r\n")
        if not line:
            if not self.data and not self.event:
                return None
            done = (self.event, b"\n".join(self.data))
            self.event, self.data = "", []
            return done
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            self.data.append(value)
        elif field == b"event":
            self.event = value.decode()
        return None


def _gap(timeout: float) -> RequestTimeout:
    return RequestTimeout(408, f"no stream event within {timeout:g} s")


def _lines(resp: http.client.HTTPResponse, timeout: float) -> Iterator[bytes]:
    try:
        yield from resp
    except TimeoutError as exc:
        raise _gap(timeout) from exc


async def _alines(resp: aiohttp.ClientResponse, timeout: float) -> AsyncIterator[bytes]:
    try:
        async for line in resp.content:
            yield line
    except TimeoutError as exc:
        raise _gap(timeout) from exc


def _end_status(data: bytes) -> tuple[int, str]:
    end = json.loads(data)
    return int(end.get("statusCode") or 0), str(end.get("status", ""))


# --- the synchronous client ----------------------------------------------------------

class Job:
    """A submitted request: poll, wait, stream or cancel it."""

    def __init__(self, endpoint: Endpoint, request_id: str, sequence: int | None = None) -> None:
        self.endpoint = endpoint
        self.id = request_id
        self.sequence = sequence

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        return self.endpoint.status(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the job ends: its decoded result, or ``JobFailed``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _poll_delays():
            st = self.status()
            if st.done:
                return st.outcome()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ResultTimeout(408, f"job {self.id} still {st.status} after {timeout:g} s")
            time.sleep(delay)
        raise AssertionError("unreachable")

    def stream(self, timeout: float = DEFAULT_STREAM_GAP) -> Iterator[Any]:
        """Each generator item, decoded, as the worker yields it; ``JobFailed`` when
        the job ends other than ``succeed``. ``timeout``: longest wait for the next item."""
        query = urllib.parse.urlencode({"requestID": self.id})
        resp = self.endpoint._open("GET", f"stream?{query}", None, timeout)
        sse = _Sse()
        with resp:
            for line in _lines(resp, timeout):
                event = sse.feed(line)
                if event is None:
                    continue
                name, data = event
                if name == "end":
                    code, status = _end_status(data)
                    if status != "succeed":
                        self.status().outcome()  # raises with the server's message
                        raise JobFailed(code, status)
                    return
                yield decode_result(data)

    def cancel(self) -> None:
        """Cancel the job, queued or running (fine when it already was)."""
        query = {"requestID": self.id}
        if self.sequence is not None:
            query["sequence"] = str(self.sequence)
        self.endpoint._call("DELETE", "async?" + urllib.parse.urlencode(query))


class Endpoint:
    """One serverless id on a gateway (or the hosted platform)."""

    def __init__(self, base_url: str, serverless_id: str, api_key: str = "",
                 retry: Retry | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.serverless_id = serverless_id
        self.api_key = api_key
        self.retry = retry or Retry()
        self.timeout = timeout

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v1/{urllib.parse.quote(self.serverless_id, safe='')}/{path}"

    def _open(self, method: str, path: str, data: bytes | None,
              timeout: float | None) -> http.client.HTTPResponse:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        delays = self.retry.delays()
        while True:
            request = urllib.request.Request(self._url(path), data=data, method=method,
                                             headers=headers)
            try:
                resp: http.client.HTTPResponse = urllib.request.urlopen(  # noqa: S310
                    request, timeout=timeout if timeout is not None else self.timeout)
                return resp
            except urllib.error.HTTPError as exc:
                body = exc.read()
                exc.close()
                error = error_for(exc.code, body)
                retry = _retry_503(method, error)
            except (urllib.error.URLError, OSError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                if isinstance(reason, TimeoutError | socket.timeout):
                    raise RequestTimeout(408, f"no answer from {self.base_url} within "
                                              f"{timeout or self.timeout:g} s") from exc
                error = ConnectionFailed(0, f"cannot reach {self.base_url}: {reason}")
                # a POST is retried only when the connection was never made
                retry = method == "GET" or isinstance(reason, ConnectionRefusedError)
            delay = next(delays, None) if retry else None
            if delay is None:
                raise error
            time.sleep(delay)

    def _call(self, method: str, path: str, data: bytes | None = None,
              timeout: float | None = None) -> tuple[bytes, str]:
        with self._open(method, path, data, timeout) as resp:
            return resp.read(), resp.headers.get_content_type()

    def _json(self, method: str, path: str, data: bytes | None = None) -> Any:
        return json.loads(self._call(method, path, data)[0])

    def run_sync(self, input: Any, timeout: float = DEFAULT_SYNC_TIMEOUT) -> Any:
        """Run the handler and wait for its result (JSON-decoded, or bytes)."""
        body, ctype = self._call("POST", "sync", _body(input), timeout)
        return decode_result(body) if ctype == "application/json" else body

    def submit(self, input: Any, webhook: str | None = None, ttl: float | None = None) -> Job:
        """Queue the request (``ttl`` in seconds); the platform requires a webhook."""
        answer = self._json("POST", "async", _body(input, webhook, ttl))
        return Job(self, str(answer["id"]), answer.get("sequence"))

    def job(self, request_id: str) -> Job:
        return Job(self, request_id)

    def status(self, request_id: str) -> JobStatus:
        query = urllib.parse.urlencode({"requestID": request_id})
        return JobStatus.from_json(self._json("GET", f"status?{query}"))

    def statuses(self, request_ids: list[str]) -> list[JobStatus]:
        """Batch status (at most 1000 ids); unknown ids come back as ``notFound``."""
        answer = self._json("POST", "status", json.dumps({"requestIDs": request_ids}).encode())
        return [JobStatus.from_json(s) for s in answer["statuses"]]

    def queue_length(self) -> int:
        return int(self._json("GET", "status")["queueingCount"])

    def clean(self) -> list[str]:
        """Cancel every queued async request; their ids."""
        return list(self._json("DELETE", "async")["cleaned"])


# --- the asynchronous client ---------------------------------------------------------

class AsyncJob:
    """``Job`` with coroutine methods and an async ``stream``."""

    def __init__(self, endpoint: AsyncEndpoint, request_id: str,
                 sequence: int | None = None) -> None:
        self.endpoint = endpoint
        self.id = request_id
        self.sequence = sequence

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobStatus:
        return await self.endpoint.status(self.id)

    async def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in _poll_delays():
            st = await self.status()
            if st.done:
                return st.outcome()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ResultTimeout(408, f"job {self.id} still {st.status} after {timeout:g} s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def stream(self, timeout: float = DEFAULT_STREAM_GAP) -> AsyncIterator[Any]:
        """Each generator item as it comes; ``timeout``: longest wait for the next one."""
        resp = await self.endpoint._open("GET", "stream", None, timeout,
                                         params={"requestID": self.id})
        sse = _Sse()
        async with resp:
            async for line in _alines(resp, timeout):
                event = sse.feed(line)
                if event is None:
                    continue
                name, data = event
                if name == "end":
                    code, status = _end_status(data)
                    if status != "succeed":
                        (await self.status()).outcome()
                        raise JobFailed(code, status)
                    return
                yield decode_result(data)

    async def cancel(self) -> None:
        params = {"requestID": self.id}
        if self.sequence is not None:
            params["sequence"] = str(self.sequence)
        await self.endpoint._call("DELETE", "async", params=params)


class AsyncEndpoint:
    """``Endpoint`` on aiohttp. Use ``async with`` (or ``await close()``) to free its
    connections; pass ``session`` to share one."""

    def __init__(self, base_url: str, serverless_id: str, api_key: str = "",
                 retry: Retry | None = None, timeout: float = 30.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.serverless_id = serverless_id
        self.api_key = api_key
        self.retry = retry or Retry()
        self.timeout = timeout
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> AsyncEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v1/{urllib.parse.quote(self.serverless_id, safe='')}/{path}"

    async def _open(self, method: str, path: str, data: bytes | None, timeout: float | None,
                    params: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        limit = timeout if timeout is not None else self.timeout
        delays = self.retry.delays()
        while True:
            try:
                resp = await self._session.request(
                    method, self._url(path), data=data, headers=headers, params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=limit,
                                                  sock_read=limit))
            except TimeoutError as exc:
                raise RequestTimeout(408, f"no answer from {self.base_url} within "
                                          f"{limit:g} s") from exc
            except aiohttp.ClientConnectionError as exc:
                error: SpiritError = ConnectionFailed(0, f"cannot reach {self.base_url}: {exc}")
                retry = method == "GET" or isinstance(exc, aiohttp.ClientConnectorError)
            else:
                if resp.status < 300:
                    return resp
                async with resp:
                    error = error_for(resp.status, await resp.read())
                retry = _retry_503(method, error)
            delay = next(delays, None) if retry else None
            if delay is None:
                raise error
            await asyncio.sleep(delay)

    async def _call(self, method: str, path: str, data: bytes | None = None,
                    timeout: float | None = None,
                    params: dict[str, str] | None = None) -> tuple[bytes, str]:
        async with await self._open(method, path, data, timeout, params) as resp:
            try:
                return await resp.read(), resp.content_type
            except TimeoutError as exc:
                raise RequestTimeout(408, f"no answer from {self.base_url} within "
                                          f"{timeout or self.timeout:g} s") from exc

    async def _json(self, method: str, path: str, data: bytes | None = None,
                    params: dict[str, str] | None = None) -> Any:
        return json.loads((await self._call(method, path, data, params=params))[0])

    async def run_sync(self, input: Any, timeout: float = DEFAULT_SYNC_TIMEOUT) -> Any:
        body, ctype = await self._call("POST", "sync", _body(input), timeout)
        return decode_result(body) if ctype == "application/json" else body

    async def submit(self, input: Any, webhook: str | None = None,
                     ttl: float | None = None) -> AsyncJob:
        answer = await self._json("POST", "async", _body(input, webhook, ttl))
        return AsyncJob(self, str(answer["id"]), answer.get("sequence"))

    def job(self, request_id: str) -> AsyncJob:
        return AsyncJob(self, request_id)

    async def status(self, request_id: str) -> JobStatus:
        return JobStatus.from_json(await self._json("GET", "status",
                                                    params={"requestID": request_id}))

    async def statuses(self, request_ids: list[str]) -> list[JobStatus]:
        answer = await self._json("POST", "status",
                                  json.dumps({"requestIDs": request_ids}).encode())
        return [JobStatus.from_json(s) for s in answer["statuses"]]

    async def queue_length(self) -> int:
        return int((await self._json("GET", "status"))["queueingCount"])

    async def clean(self) -> list[str]:
        return list((await self._json("DELETE", "async"))["cleaned"])
