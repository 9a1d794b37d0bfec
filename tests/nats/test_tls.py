"""The NATS store over TLS (a ``tls://`` URL, the server's certificate checked
against a CA of the test's own): both of its connections, a request end to end."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spirit_gpu.gateway.storage.base import NewRequest
from spirit_gpu.gateway.storage.nats import NatsStorage
from tests.nats_server import TempNats

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found")


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
    server = TempNats(tls=(str(tmp_path / "server.pem"), str(tmp_path / "server.key")))
    try:
        yield server
    finally:
        server.close()


async def test_a_request_goes_end_to_end_over_tls(tls_nats: TempNats) -> None:
    store = NatsStorage([tls_nats.url.replace("nats://", "tls://")], lease_seconds=5.0)
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
