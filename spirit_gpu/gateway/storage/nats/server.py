"""Connecting to NATS, refusing a server that lacks what the store needs, and
declaring the streams (idempotent: every replica does it at start)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import NotFoundError, ServiceUnavailableError
from nats.js.object_store import ObjectStore

from spirit_gpu.gateway.storage.base import StorageRefused
from spirit_gpu.gateway.storage.nats import names
from spirit_gpu.log import logger

MIN_VERSION = (2, 11)
FIRST_CONNECT = 7.0  # seconds the first connection may take, plus 3 s per server


def parse_urls(store: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` -> the server list."""
    urls = [u.strip() for u in store.split(",") if u.strip()]
    expected = (f"--store {store!r}: expected 'memory' or "
                "nats://HOST:4222[,nats://HOST2:4222...] (or tls://...)")
    if not urls or not all(u.startswith(("nats://", "tls://")) for u in urls):
        raise StorageRefused(expected)
    for url in urls:
        try:
            parsed = urlsplit(url)
            parsed.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise StorageRefused(f"{expected} ({url}: {exc})") from None
        if not parsed.hostname:
            raise StorageRefused(f"{expected} ({url}: no host)")
    return urls


def shown(url: str) -> str:
    """``url`` for messages and logs: its password (or token) hidden."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user + ':' if colon else ''}***@{host}"))


def shown_all(urls: list[str]) -> str:
    return ",".join(shown(u) for u in urls)


def credentials(urls: list[str]) -> dict[str, str]:
    """nats-py's ``user``/``password`` or ``token`` options, percent-decoded, from the
    first URL that has any (nats-py would read a URL's as written, undecoded); like
    the URL's own, they are used for every server, the discovered ones too."""
    for url in urls:
        parts = urlsplit(url)
        if parts.username is None:
            continue
        if parts.password is None:
            return {"token": unquote(parts.username)}
        return {"user": unquote(parts.username), "password": unquote(parts.password)}
    return {}


def _refused_credentials(exc: BaseException) -> bool:
    return (isinstance(exc, nats.errors.AuthorizationError)
            or "authorization violation" in str(exc).lower())


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


async def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def _quiet(exc: Exception) -> None:
    logger.warn(f"NATS: {exc!r}")


async def _reconnected() -> None:
    logger.info("NATS: reconnected")


async def connect(urls: list[str], name: str) -> Client:
    """Connect, then reconnect forever; refuse at once when no server answers at start
    (the client itself would retry an unreachable first server forever) or when the
    server refuses the credentials (it would retry those forever too)."""
    where = shown_all(urls)
    if not any(await asyncio.gather(*(_reachable(u) for u in urls))):
        raise StorageRefused(f"cannot reach NATS at {where}: nothing listens there")
    nc = Client()
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[str] = loop.create_future()
    auth = credentials(urls)

    starting = True
    last_error: list[Exception] = []  # the first connection's, told in its one line

    async def on_error(exc: Exception) -> None:
        if not starting:
            await _quiet(exc)
            return
        last_error[:] = [exc]
        if _refused_credentials(exc) and not refused.done():
            refused.set_result(str(exc))

    async def disconnected() -> None:
        if not nc.is_closed:  # (our own close, at a refusal or the shutdown, says nothing)
            logger.warn("NATS: disconnected; reconnecting (requests wait or fail meanwhile)")
    within = FIRST_CONNECT + 3 * len(urls)
    connecting = asyncio.ensure_future(nc.connect(
        servers=urls, name=name, connect_timeout=3, allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # (typed int, slept as float)
        ping_interval=5, max_outstanding_pings=3, error_cb=on_error,
        disconnected_cb=disconnected, reconnected_cb=_reconnected,
        user=auth.get("user"), password=auth.get("password"), token=auth.get("token")))
    try:
        # bounded: something that accepts TCP and never speaks NATS (a wrong port, a
        # firewall) keeps the client retrying its first connection forever
        racing: set[asyncio.Future[Any]] = {connecting, refused}
        await asyncio.wait(racing, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if refused.done() and not connecting.done():
            raise StorageRefused(
                f"NATS at {where} refused the credentials ({refused.result()}): check "
                "the user and password (or token) in --store" if auth else
                f"NATS at {where} asks for credentials ({refused.result()}): put them in "
                "--store, as nats://USER:PASSWORD@HOST:4222 or nats://TOKEN@HOST:4222")
        if not connecting.done():
            why = f"last error: {last_error[0]!r}" if last_error else "the wrong port?"
            raise StorageRefused(f"cannot connect to NATS at {where}: it accepts "
                                 f"connections but no NATS server answered within "
                                 f"{within:g} s ({why})")
        connecting.result()
        starting = False  # (from now on a refusal is logged, and retried, as any error)
    except StorageRefused:
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the one line below
        with contextlib.suppress(Exception):
            await nc.close()
        raise StorageRefused(f"cannot reach NATS at {where}: {exc!r}") from exc
    return nc


def known_urls(nc: Client, configured: list[str]) -> list[str]:
    """The servers ``nc`` knows, the one it is connected to first: the configured ones
    and those the cluster told it of, which get the configured credentials."""
    userinfo = next((u.netloc.rpartition("@")[0] for u in map(urlsplit, configured)
                     if "@" in u.netloc), "")
    out: list[str] = []
    current = nc.connected_url
    for uri in ([current] if current is not None else []) + nc.servers:
        netloc = uri.netloc
        if userinfo and "@" not in netloc:
            netloc = f"{userinfo}@{netloc}"
        url = f"{uri.scheme}://{netloc}"
        if url not in out:
            out.append(url)
    return out


async def check(nc: Client, js: JetStreamContext) -> None:
    """One clear line when the server cannot keep our promises."""
    version = nc.connected_server_version
    found = _version(f"{version.major}.{version.minor}")
    if found < MIN_VERSION:
        raise StorageRefused(
            f"NATS server {version.major}.{version.minor}.{version.patch} is too old: the store "
            f"needs 2.11 or newer (per-message TTL for results and retention)")
    loop = asyncio.get_running_loop()
    began = loop.time()
    where = nc.connected_url.netloc if nc.connected_url else "?"
    while True:
        try:
            await js.account_info()
            return
        except (ServiceUnavailableError, NoRespondersError) as exc:
            if loop.time() - began > 3.0:  # (a cluster still forming answers so briefly)
                raise StorageRefused(f"NATS at {where} has JetStream off: start nats-server "
                                     f"with -js ({exc!r})") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            if loop.time() - began > 30.0:
                raise StorageRefused(f"NATS at {where}: JetStream does not answer (a cluster "
                                     f"without a quorum?) ({exc!r})") from exc
        await asyncio.sleep(0.5)


async def declare(js: JetStreamContext, *, lease: float, retention: float, ttl_max: float,
                  replicas: int) -> ObjectStore:
    """Create or update the streams; returns the blob bucket."""
    keep = ttl_max + retention + 3600
    await _stream(js, StreamConfig(
        name=names.JOBS, subjects=["spirit.jobs.>"], retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=120.0, num_replicas=replicas, allow_direct=True,
        max_age=keep))
    await _stream(js, StreamConfig(
        name=names.REQ, subjects=["spirit.req.>"], max_msgs_per_subject=1,
        allow_msg_ttl=True, allow_direct=True, num_replicas=replicas, max_age=keep,
        discard=DiscardPolicy.OLD))
    await _stream(js, StreamConfig(
        name=names.CHUNKS, subjects=["spirit.chunks.>"], duplicate_window=120.0,
        allow_direct=True, num_replicas=replicas, max_age=keep))
    await _stream(js, StreamConfig(
        name=names.WORKERS, subjects=["spirit.workers.>"], max_msgs_per_subject=1,
        num_replicas=replicas, max_age=max(3 * lease, 1.0)))
    return await js.create_object_store(names.BLOBS, config=ObjectStoreConfig(
        bucket=names.BLOBS, ttl=keep, replicas=replicas))


async def _stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


async def ensure_consumer(js: JetStreamContext, sid: str, lease: float) -> None:
    await js.add_consumer(names.JOBS, ConsumerConfig(
        durable_name=names.consumer(sid), filter_subject=names.jobs(sid),
        ack_wait=lease, max_deliver=-1, max_ack_pending=-1, max_waiting=4096))
