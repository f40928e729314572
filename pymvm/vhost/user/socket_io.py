"""Blocking socket I/O over the sans-IO vhost-user connections: framing stays in protocol.py.

Fds travel as SCM_RIGHTS on the first byte of a ``sendmsg``; received fds get O_CLOEXEC
(MSG_CMSG_CLOEXEC) so a back-end process spawned later never inherits them.
"""

from __future__ import annotations

import array
import socket
import time
from collections.abc import Sequence
from typing import NoReturn

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import (
    VhostUserError,
    VhostUserLocalError,
    VhostUserRemoteError,
    VhostUserRequestFailed,
)
from pymvm.vhost.user.protocol import NEED_DATA, FrontendConnection

#: Most fds one vhost-user message carries (SET_MEM_TABLE: one per region).
MAX_FDS = m.MAX_MEM_REGIONS
_RECV_SIZE = 64 * 1024
_FD_SIZE = array.array("i").itemsize


class VhostUserDisconnected(VhostUserError):
    """The peer closed the socket, broke the protocol or did not answer in time."""


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of ``data``; ``fds`` ride on the first chunk. EPIPE raises, never SIGPIPE."""
    view = memoryview(data)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while view:
        sent = sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
        view = view[sent:]
        ancillary = []


def recv_with_fds(sock: socket.socket, size: int = _RECV_SIZE,
                  max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes (``b""`` at EOF) and the fds that came with them."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        size, socket.CMSG_SPACE(max_fds * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return data, fds


class FrontendChannel:
    """A front-end's main socket: one request at a time, each round trip bounded by ``timeout``.

    Every failure of the stream itself (EOF, EPIPE, a timeout, a malformed reply) raises
    :class:`VhostUserDisconnected` and leaves the channel unusable: the caller reconnects.
    A back-end's non-zero REPLY_ACK raises ``VhostUserRequestFailed``; the channel stays usable.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.conn = FrontendConnection()
        self.broken: str | None = None

    def request(self, message: m.Request) -> m.Reply | None:
        """Send ``message``; return its reply, or None when the request gets none."""
        if self.broken is not None:
            raise VhostUserDisconnected(f"vhost-user socket already failed ({self.broken})")
        data, fds = self.conn.send(message)  # a local protocol error raises before any I/O
        name = m.FrontendRequest(message.REQUEST).name
        try:
            self.sock.settimeout(self.timeout)
            send_with_fds(self.sock, data, fds)
            if self.conn.awaiting_reply is None:
                return None
            return self._read_reply()
        except TimeoutError:
            self._break(f"no reply to {name} within {self.timeout:g} s")
        except OSError as e:
            self._break(f"{name}: {e.strerror or e}")
        except (VhostUserDisconnected, VhostUserRequestFailed):
            raise
        except VhostUserRemoteError as e:
            self._break(f"{name}: {e}")

    def requests(self, messages: Sequence[m.Request]) -> list[m.Reply | None]:
        """Send ``messages`` back to back, then read their replies in order: one round trip
        for all instead of one each (the back-end handles them in order, exactly as if each
        had waited for the previous one's reply). Every reply is read before a refusal
        raises (the first ``VhostUserRequestFailed``); the channel stays in step."""
        replies, failure = self.pipeline(messages)
        if failure is not None:
            raise failure
        return replies

    def pipeline(self, messages: Sequence[m.Request]
                 ) -> tuple[list[m.Reply | None], VhostUserRequestFailed | None]:
        """Like :meth:`requests`, but a refusal is returned (the first one) with the replies
        (None in a refused request's place) instead of raised."""
        if self.broken is not None:
            raise VhostUserDisconnected(f"vhost-user socket already failed ({self.broken})")
        expects: list[tuple[str, bool]] = []
        name = "?"
        try:
            self.sock.settimeout(self.timeout)
            for message in messages:
                owed = self.conn.replies_owed
                try:
                    data, fds = self.conn.send(message)  # a local protocol error raises here
                except VhostUserLocalError as e:
                    if not expects:
                        raise
                    self._break(f"{e} (after {len(expects)} requests sent unanswered)")
                name = m.FrontendRequest(message.REQUEST).name
                send_with_fds(self.sock, data, fds)
                expects.append((name, self.conn.replies_owed > owed))
            replies: list[m.Reply | None] = []
            failure: VhostUserRequestFailed | None = None
            for name, has_reply in expects:
                if not has_reply:
                    replies.append(None)
                    continue
                try:
                    replies.append(self._read_reply())
                except VhostUserRequestFailed as e:
                    failure = failure or e
                    replies.append(None)
            return replies, failure
        except TimeoutError:
            self._break(f"no reply to {name} within {self.timeout:g} s")
        except OSError as e:
            self._break(f"{name}: {e.strerror or e}")
        except VhostUserDisconnected:
            raise
        except VhostUserRemoteError as e:
            self._break(f"{name}: {e}")

    def _read_reply(self) -> m.Reply:
        deadline = time.monotonic() + self.timeout
        while True:
            # Called only while a reply is owed: at EOF the connection raises "peer closed
            # the connection before replying" (a remote error), never returns PEER_CLOSED.
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, m.Reply)
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            chunk, fds = recv_with_fds(self.sock)
            self.conn.receive_data(chunk, fds)

    def _break(self, why: str) -> NoReturn:
        self.broken = why
        raise VhostUserDisconnected(f"vhost-user back-end lost: {why}")

    def shutdown(self) -> None:
        """Wake every thread blocked on the socket (they see EOF); the fd stays open."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more: nothing to wake

    def close(self) -> None:
        self.conn.close()
        self.sock.close()
