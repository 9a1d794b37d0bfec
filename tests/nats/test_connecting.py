"""Reaching NATS: over TLS (a ``tls://`` URL, the server's certificate checked
against a CA of the test's own) and with credentials in the URL (percent-decoded,
hidden in messages); both of the store's connections, a request end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from spirit_gpu.gateway.storage.base import NewRequest
from spirit_gpu.gateway.storage.nats import NatsStorage, server
from tests.conftest import ROOT
from tests.nats_server import TempNats

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl not found")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(where: Path) -> None:
    """ca.pem, and server.pem / server.key for 127.0.0.1 signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=spirit test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=where)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=where)
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
             cwd=where)


@pytest.fixture
def tls_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TempNats]:
    make_certs(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # (the default context's)
    nats = TempNats(tls=(str(tmp_path / "server.pem"), str(tmp_path / "server.key")))
    try:
        yield nats
    finally:
        nats.close()


async def end_to_end(store: NatsStorage) -> None:
    """Start the store, run one request through it, close it."""
    await store.start()
    try:
        rid = (await store.submit(NewRequest(sid="s", mode="async", body=b'{"input":1}',
                                             webhook="", ttl_ms=60_000))).request_id
        taken = await store.take("s", "link:w", 2.0)
        assert taken is not None and taken.request_id == rid
        assert await store.mark_started("s", rid)
        await store.finish("s", rid, 200, "", b'{"ok":true}')
        rec = await store.get("s", rid)
        assert rec is not None
        assert (rec.public_status, rec.result) == ("succeed", b'{"ok":true}')
    finally:
        await store.close()


@needs_openssl
def test_a_certificate_not_trusted_is_named_in_the_refusal(tls_nats: TempNats) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    done = subprocess.run(
        [sys.executable, "-c", "from spirit_gpu.cli import main; raise SystemExit(main())",
         "gateway", "--api-key", "k", "--port", "0",
         "--store", tls_nats.url.replace("nats://", "tls://")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 2, done
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr, done.stderr


@needs_openssl
async def test_a_request_goes_end_to_end_over_tls(tls_nats: TempNats) -> None:
    await end_to_end(NatsStorage([tls_nats.url.replace("nats://", "tls://")],
                                 lease_seconds=5.0))


async def test_credentials_with_any_character_work_percent_encoded() -> None:
    server = TempNats(user="spirit", password="s3cr@t:/x%")
    try:
        url = server.server.url_as("spirit", quote("s3cr@t:/x%", safe=""))
        await end_to_end(NatsStorage([url], lease_seconds=5.0))
    finally:
        server.close()


def test_a_password_or_token_is_hidden_in_messages() -> None:
    assert server.shown("nats://spirit:s3cret@10.0.0.1:4222") == "nats://spirit:***@10.0.0.1:4222"
    assert server.shown("tls://tok3n@h:4222") == "tls://***@h:4222"
    assert server.shown("nats://h:4222") == "nats://h:4222"
    assert server.credentials(["nats://h:1", "nats://u:p%40ss@h:2"]) == {
        "user": "u", "password": "p@ss"}
    assert server.credentials(["nats://t%2Fk@h:1"]) == {"token": "t/k"}
    assert server.credentials(["nats://h:1"]) == {}
