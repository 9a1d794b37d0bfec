"""What the proxy path relies on in aiohttp beyond its documented API, in one place.

Each behaviour has a named test in ``tests/proxy/test_aiohttp_internals.py``,
so an aiohttp upgrade that changes one fails that test rather than the proxy
in production:

* ``LazyHeadResponse``: a ``StreamResponse`` whose ``prepare`` holds the head
  back (the private class attribute ``_send_headers_immediately``, which
  aiohttp's own ``Response`` sets the same way); the first ``write`` sends the
  head and its bytes together, and ``write(b"")`` sends a held head alone.
* ``send_continue``: bytes written on ``request.writer`` before the response
  is prepared reach the client as they are (an interim ``100 Continue``; the
  low-level server has no router, so aiohttp's ``expect_handler`` never runs).
* ``cut_connection``: closing the transport under a started response flushes
  what was written, and aiohttp's own ``write_eof`` afterwards fails quietly.
"""

from __future__ import annotations

from aiohttp import web

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class LazyHeadResponse(web.StreamResponse):
    """A streamed response whose head waits for the first body bytes: one write, not two.

    aiohttp's own ``Response`` works this way; a ``StreamResponse`` sends its head
    at ``prepare``. ``send_head`` (a ``write(b"")``) sends a head that should not wait.
    """

    _send_headers_immediately = False

    async def send_head(self) -> None:
        await self.write(b"")


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client that sent ``Expect: 100-continue`` to go on with its body."""
    await request.writer.write(CONTINUE)


def cut_connection(request: web.BaseRequest) -> None:
    """End a started response without its terminator: the client sees an error.

    Chunks already written are flushed first; aiohttp's own ``write_eof`` then
    fails quietly on the closed transport.
    """
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.close()
