"""The API's fast path for `GET /vm`, the request a control plane polls.

Every connection to the API socket starts with ``FastPathProtocol``. A chunk of received
bytes that is exactly one complete, plain `GET /vm` HTTP/1.1 request (parsed by httptools:
no body, no Expect or Upgrade header, not Connection: close; the controller idle) is answered at once
with what aiohttp would answer (the controller's ``vm_info()`` as JSON, the same status
line and headers). Anything else (another method or path, a body, a partial or pipelined
request, HTTP/1.0, a malformed request, an action under way) hands the connection, from
those bytes on, to aiohttp's request handler for good, which serves every endpoint.

Why: aiohttp's own path costs about 60 µs of Python per request natively (request and
response objects, a task per request on Python 3.11, three turns of the event loop), and
Python runs about 100 times slower than natively in the nested host, C code about 15-25
times: there `GET /vm` took 9.5 ms through aiohttp against 2.3 ms for QEMU's QMP
(docs/benchmarks.md). This path is one callback per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import httptools
from aiohttp.http import SERVER_SOFTWARE

if TYPE_CHECKING:
    from .controller import Controller

# Headers that change how a request must be read or answered: such a request goes to aiohttp.
# (Connection: close is seen by should_keep_alive(); Connection: keep-alive changes nothing.)
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
         b"Content-Length: %d\r\nDate: %s\r\nServer: " + SERVER_SOFTWARE.encode() + b"\r\n\r\n")


class _HttpDate:
    """The Date header's value (RFC 9110 IMF-fixdate), formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


_date = _HttpDate()


def protocol_factory(controller: Controller, aiohttp_handler: Callable[[], asyncio.Protocol],
                     read_size: int, connections: set[asyncio.Transport]
                     ) -> Callable[[], FastPathProtocol]:
    """For ``loop.create_unix_server`` (or ``create_server``): one FastPathProtocol each."""
    return lambda: FastPathProtocol(controller, aiohttp_handler, read_size, connections)


class FastPathProtocol(asyncio.Protocol):
    """One API connection: answers plain `GET /vm` itself until anything else comes."""

    def __init__(self, controller: Controller, aiohttp_handler: Callable[[], asyncio.Protocol],
                 read_size: int, connections: set[asyncio.Transport]) -> None:
        self._controller = controller
        self._aiohttp_handler = aiohttp_handler
        self._read_size = read_size
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._begun = self._completed = 0
        self._url = b""
        self._plain = True
        self._keep_alive = False

    # ---- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # See READ_SIZE in server.py: asyncio's 256 KiB reads cost an mmap per request.
        transport.max_size = self._read_size  # type: ignore[attr-defined]
        self._connections.add(self._transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if not self._answer(data):
            self._hand_over(data)

    def eof_received(self) -> bool | None:
        return False  # close: the client is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self._transport)  # type: ignore[arg-type]

    # ---- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._begun += 1
        self._url = b""
        self._plain = True
        self._keep_alive = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in _NOT_PLAIN:
            self._plain = False

    def on_message_complete(self) -> None:
        self._completed += 1
        # Only meaningful now: once feed_data returns the parser has reset to "keep alive".
        self._keep_alive = self._parser.should_keep_alive()

    # ---- the fast path ------------------------------------------------------------------------
    def _answer(self, data: bytes) -> bool:
        """Answer ``data`` if it is one plain `GET /vm`; False: aiohttp must have it."""
        self._begun = self._completed = 0
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return False
        parser = self._parser
        if not (self._begun == self._completed == 1 and self._plain and self._url == b"/vm"
                and parser.get_method() == b"GET" and parser.get_http_version() == "1.1"
                and self._keep_alive):
            return False
        info: dict[str, Any] | None = self._controller.vm_info_if_idle()
        if info is None:
            return False  # an action is under way: aiohttp's path waits for it
        body = json.dumps(info).encode()
        assert self._transport is not None
        self._transport.write(_HEAD % (len(body), _date.now()) + body)
        return True

    def _hand_over(self, data: bytes) -> None:
        """From ``data`` on, aiohttp's request handler serves this connection."""
        transport = self._transport
        assert transport is not None
        self._connections.discard(transport)  # aiohttp's server tracks it from now on
        handler = self._aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(data)
