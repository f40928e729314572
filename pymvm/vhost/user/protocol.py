"""Sans-IO vhost-user connection state machines (the h11 pattern: no sockets here).

The I/O layer feeds what ``recvmsg`` returned into ``receive_data(data, fds)`` (``b""`` for
EOF), pulls decoded messages with ``next_event()`` until it returns ``NEED_DATA``, and writes
what ``send(message)`` returns with ``sendmsg`` (the fds as SCM_RIGHTS with the bytes).

Roles:

* :class:`FrontendConnection`: the VMM side of the main socket; sends requests, receives
  replies, refuses (``VhostUserLocalError``) to send what the protocol forbids now.
* :class:`BackendConnection`: the device side of the main socket; receives requests,
  refuses (``VhostUserRemoteError``) what a front-end must not send, sends replies.
* :class:`BackendRequestSender` / :class:`BackendRequestReceiver`: the two ends of the
  back-end channel (SET_BACKEND_REQ_FD), where the back-end asks and the front-end acks.

Fd ownership: fds handed to ``receive_data`` belong to the connection until ``next_event``
returns the message that carries them (then they belong to the caller). Fds of a rejected
message, and any still buffered when the connection fails or is closed, are closed here.
Fds in a message passed to ``send`` stay the caller's: sendmsg duplicates them into the peer.

Fd attribution: the kernel attaches SCM_RIGHTS fds to the first byte of the ``sendmsg`` that
carried them and a unix-stream ``recvmsg`` stops right after a segment with fds, so the fds
returned by one ``recvmsg`` belong to the message that contains the *last byte* of the data
returned with them. That is the rule used here.

Decisions where the spec leaves room:

* An unknown request type is a remote error: every message beyond the base set is gated by
  a protocol feature, so an unknown one means the peer used a feature we never offered, and
  we cannot know its fds or whether it expects a reply (a reply of the wrong shape would
  desynchronise the stream).
* "Before SET_OWNER" (:data:`REQUIRES_OWNER`): the vring, memory-table and log messages,
  whose kernel-vhost ioctls fail without VHOST_SET_OWNER. Feature and protocol-feature
  negotiation, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD and config access may
  come first, as QEMU sends them during vhost_user_backend_init before SET_OWNER.
* The back-end accepts a protocol-feature-gated request if it *offered* that feature (the
  front-end sends GET_QUEUE_NUM etc. around SET_PROTOCOL_FEATURES); the front-end only sends
  one once it was *negotiated*.
* A non-zero ack raises :class:`VhostUserRequestFailed` but leaves the connection usable;
  every other remote error puts the connection in the ERROR state for good.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Literal, NoReturn, Sequence

import structlog

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import (
    VhostUserLocalError,
    VhostUserRemoteError,
    VhostUserRequestFailed,
)
from pymvm.vhost.user.messages import (
    FrontendRequest as FR,
    ProtocolFeature as PF,
)

log = structlog.get_logger()


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PEER_CLOSED = "PEER_CLOSED"


#: ``next_event()``: no complete message is buffered; read more from the socket.
NEED_DATA: Literal[Sentinel.NEED_DATA] = Sentinel.NEED_DATA
#: ``next_event()``: the peer closed the stream cleanly (after ``receive_data(b"")``).
PEER_CLOSED: Literal[Sentinel.PEER_CLOSED] = Sentinel.PEER_CLOSED

Event = m.Message | Sentinel


class ConnectionState(enum.Enum):
    OPEN = "OPEN"
    ERROR = "ERROR"  # the peer broke the protocol; drop the connection
    CLOSED = "CLOSED"  # close() was called or the peer closed


#: Requests the front-end may only send after SET_OWNER (see module docstring).
REQUIRES_OWNER: frozenset[FR] = frozenset({
    FR.SET_MEM_TABLE, FR.SET_LOG_BASE, FR.SET_LOG_FD, FR.SET_VRING_NUM, FR.SET_VRING_ADDR,
    FR.SET_VRING_BASE, FR.GET_VRING_BASE, FR.SET_VRING_KICK, FR.SET_VRING_CALL,
    FR.SET_VRING_ERR, FR.SET_VRING_ENABLE, FR.SET_VRING_ENDIAN, FR.VRING_KICK,
    FR.ADD_MEM_REG, FR.REM_MEM_REG, FR.GET_INFLIGHT_FD, FR.SET_INFLIGHT_FD, FR.IOTLB_MSG,
})

#: Requests that are only legal once this protocol feature is negotiated.
GATED_BY: dict[FR, PF] = {
    FR.SET_LOG_BASE: PF.LOG_SHMFD,  # our SET_LOG_BASE always carries the log fd
    FR.GET_QUEUE_NUM: PF.MQ,
    FR.SEND_RARP: PF.RARP,
    FR.NET_SET_MTU: PF.MTU,
    FR.SET_BACKEND_REQ_FD: PF.BACKEND_REQ,
    FR.SET_VRING_ENDIAN: PF.CROSS_ENDIAN,
    FR.GET_CONFIG: PF.CONFIG,
    FR.SET_CONFIG: PF.CONFIG,
    FR.CREATE_CRYPTO_SESSION: PF.CRYPTO_SESSION,
    FR.CLOSE_CRYPTO_SESSION: PF.CRYPTO_SESSION,
    FR.POSTCOPY_ADVISE: PF.PAGEFAULT,
    FR.POSTCOPY_LISTEN: PF.PAGEFAULT,
    FR.POSTCOPY_END: PF.PAGEFAULT,
    FR.GET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
    FR.SET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
    FR.RESET_DEVICE: PF.RESET_DEVICE,
    FR.VRING_KICK: PF.INBAND_NOTIFICATIONS,
    FR.GET_MAX_MEM_SLOTS: PF.CONFIGURE_MEM_SLOTS,
    FR.ADD_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
    FR.REM_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
    FR.SET_STATUS: PF.STATUS,
    FR.GET_STATUS: PF.STATUS,
    FR.GET_SHARED_OBJECT: PF.SHARED_OBJECT,
    FR.SET_DEVICE_STATE_FD: PF.DEVICE_STATE,
    FR.CHECK_DEVICE_STATE: PF.DEVICE_STATE,
}

#: Requests legal only if the back-end offers VHOST_USER_F_PROTOCOL_FEATURES.
NEEDS_PROTOCOL_FEATURES: frozenset[FR] = frozenset({
    FR.GET_PROTOCOL_FEATURES, FR.SET_PROTOCOL_FEATURES, FR.SET_VRING_ENABLE,
})


@dataclass(frozen=True)
class _Pending:
    """A request that is owed a reply, and the reply's class."""

    request: enum.IntEnum
    reply_type: type[m.Reply]
    config_size: int | None = None  # GET_CONFIG: the reply must match the requested size


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed by its previous owner: nothing left to release


class _Connection:
    """Byte/fd buffering, framing and error state shared by all four roles."""

    ROLE: ClassVar[str]

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._buffer_start = 0  # stream offset of self._buffer[0]
        # (stream offset of the last byte received with them, fds), oldest first
        self._fd_groups: deque[tuple[int, list[int]]] = deque()
        self._eof = False
        self._state = ConnectionState.OPEN
        self._error: VhostUserRemoteError | None = None

    @property
    def state(self) -> ConnectionState:
        return self._state

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what recvmsg returned; ``data=b""`` means the peer closed the stream."""
        if self._state is not ConnectionState.OPEN or self._eof:
            _close_fds(fds)
            if self._state is ConnectionState.ERROR:
                return  # the I/O layer may still drain the socket after an error
            raise VhostUserLocalError(
                f"{self.ROLE}: receive_data after the connection was closed; "
                f"stop reading the socket once EOF was fed or close() called"
            )
        if not data:
            if fds:
                _close_fds(fds)
                raise VhostUserLocalError(f"{self.ROLE}: fds passed with EOF; pass data with fds")
            self._eof = True
            return
        end = self._buffer_start + len(self._buffer) + len(data)
        self._buffer += data
        if fds:
            self._fd_groups.append((end - 1, list(fds)))

    def next_event(self) -> Event:
        """The next complete message, ``NEED_DATA``, or ``PEER_CLOSED``."""
        if self._state is ConnectionState.ERROR:
            raise VhostUserRemoteError(
                f"{self.ROLE}: connection already failed ({self._error}); close it"
            )
        if self._state is ConnectionState.CLOSED:
            raise VhostUserLocalError(f"{self.ROLE}: next_event after close")
        if len(self._buffer) < m.HEADER_SIZE:
            return self._at_end_of_buffer()
        header = m.Header.unpack(self._buffer)
        try:
            if header.version != m.VHOST_USER_VERSION:
                raise VhostUserRemoteError(
                    f"{self.ROLE}: message version {header.version}, only version 1 exists"
                )
            cls = self._classify(header)
            limit = min(cls.MAX_PAYLOAD, m.MAX_PAYLOAD_SIZE)
            if header.size > limit:
                raise VhostUserRemoteError(
                    f"{self.ROLE}: {cls._name(header)} payload of {header.size} bytes, "
                    f"at most {limit} allowed"
                )
        except VhostUserRemoteError as e:
            self._fail(e, [])
        total = m.HEADER_SIZE + header.size
        if len(self._buffer) < total:
            return self._at_end_of_buffer()
        payload = bytes(self._buffer[m.HEADER_SIZE : total])
        fds = self._take_fds(self._buffer_start + total)
        del self._buffer[:total]
        self._buffer_start += total
        try:
            msg = cls.decode(header, payload, fds)
            self._received(msg, header)
        except VhostUserRequestFailed:
            raise
        except VhostUserRemoteError as e:
            self._fail(e, fds)
        return msg

    def close(self) -> None:
        """Close every fd still owned by the connection; idempotent."""
        self._release_buffered_fds()
        if self._state is ConnectionState.OPEN:
            self._state = ConnectionState.CLOSED

    # -- internals ------------------------------------------------------------------------

    def _at_end_of_buffer(self) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._buffer:
            self._fail(
                VhostUserRemoteError(
                    f"{self.ROLE}: peer closed the connection in the middle of a message "
                    f"({len(self._buffer)} bytes buffered)"
                ),
                [],
            )
        self._check_clean_close()
        self._release_buffered_fds()
        self._state = ConnectionState.CLOSED
        return PEER_CLOSED

    def _check_clean_close(self) -> None:
        pass

    def _take_fds(self, end: int) -> list[int]:
        fds: list[int] = []
        while self._fd_groups and self._fd_groups[0][0] < end:
            fds.extend(self._fd_groups.popleft()[1])
        return fds

    def _release_buffered_fds(self) -> None:
        while self._fd_groups:
            _close_fds(self._fd_groups.popleft()[1])

    def _fail(self, error: VhostUserRemoteError, fds: list[int]) -> NoReturn:
        """Enter ERROR, close every fd we still own, and raise ``error``."""
        log.debug("vhost_user.remote_error", role=self.ROLE, error=str(error),
                  closed_fds=len(fds))
        _close_fds(fds)
        self._release_buffered_fds()
        self._buffer.clear()
        self._state = ConnectionState.ERROR
        self._error = error
        raise error

    def _check_can_send(self) -> None:
        if self._state is not ConnectionState.OPEN:
            raise VhostUserLocalError(
                f"{self.ROLE}: cannot send on a connection in state {self._state.name}"
            )

    def _classify(self, header: m.Header) -> type[m.Message]:
        raise NotImplementedError

    def _received(self, msg: m.Message, header: m.Header) -> None:
        raise NotImplementedError


class _Requester(_Connection):
    """Sends requests, receives replies in order (one FIFO of outstanding requests)."""

    REQUEST_BASE: ClassVar[type[m.Request]] = m.Request
    REQUEST_ENUM: ClassVar[type[enum.IntEnum]]

    def __init__(self) -> None:
        super().__init__()
        self._pending: deque[_Pending] = deque()

    @property
    def awaiting_reply(self) -> enum.IntEnum | None:
        """The request whose reply comes next, if any."""
        return self._pending[0].request if self._pending else None

    @property
    def replies_owed(self) -> int:
        """How many requests sent so far still await their reply."""
        return len(self._pending)

    def send(self, message: m.Request) -> tuple[bytes, list[int]]:
        """Encode ``message`` and record what reply it expects."""
        self._check_can_send()
        if not isinstance(message, m.Request) or not isinstance(message.REQUEST, self.REQUEST_ENUM):
            raise VhostUserLocalError(
                f"{self.ROLE}: can only send {self.REQUEST_ENUM.__name__} requests, "
                f"not {type(message).__name__}"
            )
        self._check_send(message)
        data, fds = message.encode()
        self._sent(message)
        reply_type = self._reply_type(message)
        if reply_type is not None:
            size = message.size if isinstance(message, m.GetConfig) else None
            self._pending.append(_Pending(message.REQUEST, reply_type, size))
        return data, fds

    def _classify(self, header: m.Header) -> type[m.Message]:
        name = self._request_name(header.request)
        if not header.is_reply:
            raise VhostUserRemoteError(
                f"{self.ROLE}: peer sent request {name} on a channel where it may only reply"
            )
        if not self._pending:
            raise VhostUserRemoteError(f"{self.ROLE}: reply to {name} with no request outstanding")
        expected = self._pending[0]
        if header.request != expected.request:
            raise VhostUserRemoteError(
                f"{self.ROLE}: reply to {name} while waiting for the reply to "
                f"{expected.request.name}"
            )
        return expected.reply_type

    def _received(self, msg: m.Message, header: m.Header) -> None:
        pending = self._pending.popleft()
        if isinstance(msg, m.ConfigReply) and pending.config_size is not None:
            if msg.failed:
                raise VhostUserRequestFailed(pending.request, 1)
            if len(msg.data) != pending.config_size:
                raise VhostUserRemoteError(
                    f"{self.ROLE}: GET_CONFIG reply has {len(msg.data)} bytes, "
                    f"{pending.config_size} were requested"
                )
        self._got_reply(msg)
        if isinstance(msg, m.Ack) and not msg.ok:
            raise VhostUserRequestFailed(msg.request, msg.status)

    def _check_clean_close(self) -> None:
        if self._pending:
            self._fail(
                VhostUserRemoteError(
                    f"{self.ROLE}: peer closed the connection before replying to "
                    f"{self._pending[0].request.name}"
                ),
                [],
            )

    def _request_name(self, request: int) -> str:
        try:
            return self.REQUEST_ENUM(request).name
        except ValueError:
            return f"unknown request type {request}"

    # hooks
    def _check_send(self, message: m.Request) -> None:
        pass

    def _sent(self, message: m.Request) -> None:
        pass

    def _got_reply(self, msg: m.Message) -> None:
        pass

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        raise NotImplementedError


class _Responder(_Connection):
    """Receives requests, sends the replies they are owed, in order."""

    REPLY_ENUM: ClassVar[type[enum.IntEnum]]

    def __init__(self) -> None:
        super().__init__()
        self._owed: deque[_Pending] = deque()

    @property
    def reply_owed(self) -> enum.IntEnum | None:
        """The request whose reply must be sent next, if any."""
        return self._owed[0].request if self._owed else None

    def send(self, reply: m.Reply) -> tuple[bytes, list[int]]:
        """Encode the reply to the oldest request that is owed one."""
        self._check_can_send()
        if not isinstance(reply, m.Reply) or not isinstance(reply.wire_request(), self.REPLY_ENUM):
            raise VhostUserLocalError(
                f"{self.ROLE}: can only send replies to {self.REPLY_ENUM.__name__}, "
                f"not {type(reply).__name__}"
            )
        name = reply.wire_request().name
        if not self._owed:
            raise VhostUserLocalError(
                f"{self.ROLE}: reply to {name} but no request awaits a reply; "
                f"reply only to GET_* requests and NEED_REPLY requests"
            )
        owed = self._owed[0]
        if reply.wire_request() != owed.request or type(reply) is not owed.reply_type:
            raise VhostUserLocalError(
                f"{self.ROLE}: {type(reply).__name__} for {name}, but {owed.request.name} "
                f"awaits a {owed.reply_type.__name__}"
            )
        if (isinstance(reply, m.ConfigReply) and not reply.failed
                and len(reply.data) != owed.config_size):
            raise VhostUserLocalError(
                f"{self.ROLE}: GET_CONFIG reply has {len(reply.data)} bytes, "
                f"{owed.config_size} were requested; send exactly that many or b'' for failure"
            )
        data, fds = reply.encode()
        self._owed.popleft()
        self._sent_reply(reply)
        return data, fds

    def _classify(self, header: m.Header) -> type[m.Message]:
        if header.is_reply:
            raise VhostUserRemoteError(
                f"{self.ROLE}: peer sent a reply (request type {header.request}) "
                f"but it may only send requests on this channel"
            )
        cls = self._lookup(header)
        self._check_receive(cls.REQUEST)
        return cls

    def _received(self, msg: m.Message, header: m.Header) -> None:
        assert isinstance(msg, m.Request)
        self._got_request(msg)
        reply_type = self._reply_type(msg)
        if reply_type is not None:
            size = msg.size if isinstance(msg, m.GetConfig) else None
            self._owed.append(_Pending(msg.REQUEST, reply_type, size))

    # hooks
    def _lookup(self, header: m.Header) -> type[m.Request]:
        raise NotImplementedError

    def _check_receive(self, request: enum.IntEnum) -> None:
        pass

    def _got_request(self, msg: m.Request) -> None:
        pass

    def _sent_reply(self, reply: m.Reply) -> None:
        pass

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Main socket


def _main_reply_type(message: m.Request, negotiated: int) -> type[m.Reply] | None:
    """What reply a front-end request gets, given the negotiated protocol features."""
    request = FR(message.REQUEST)
    if request in m.FRONTEND_REPLIES:
        return m.FRONTEND_REPLIES[request]
    if request is FR.IOTLB_MSG or (request is FR.SET_LOG_BASE and negotiated & PF.LOG_SHMFD):
        return m.Ack
    if message.need_reply and negotiated & PF.REPLY_ACK:
        return m.Ack
    return None


class FrontendConnection(_Requester):
    """The front-end (VMM) side of the main vhost-user socket."""

    ROLE = "vhost-user front-end"
    REQUEST_ENUM = FR

    def __init__(self) -> None:
        super().__init__()
        self.owner_set = False
        #: Virtio features the back-end offered (GET_FEATURES reply), None until known.
        self.backend_features: int | None = None
        #: Virtio features we acked with SET_FEATURES.
        self.acked_features: int | None = None
        #: Protocol features the back-end offered (GET_PROTOCOL_FEATURES reply).
        self.backend_protocol_features: PF | None = None
        #: Protocol features in force (what we sent with SET_PROTOCOL_FEATURES).
        self.protocol_features = PF(0)

    def negotiate_features(self, wanted: int) -> int:
        """Bits of ``wanted`` the back-end offers; send the result with SetFeatures."""
        if self.backend_features is None:
            raise VhostUserLocalError(
                f"{self.ROLE}: back-end features unknown; send GetFeatures and read its reply first"
            )
        return m.negotiate(wanted, self.backend_features)

    def negotiate_protocol_features(self, wanted: int) -> PF:
        """Bits of ``wanted`` the back-end offers; send the result with SetProtocolFeatures."""
        if self.backend_protocol_features is None:
            raise VhostUserLocalError(
                f"{self.ROLE}: back-end protocol features unknown; send GetProtocolFeatures "
                f"and read its reply first"
            )
        return PF(m.negotiate(wanted, self.backend_protocol_features))

    def _offers_protocol_features(self) -> bool:
        return self.backend_features is not None and bool(
            self.backend_features & m.PROTOCOL_FEATURES_FLAG
        )

    def _check_send(self, message: m.Request) -> None:
        request = FR(message.REQUEST)
        if request in REQUIRES_OWNER and not self.owner_set:
            raise VhostUserLocalError(
                f"{self.ROLE}: {request.name} before SET_OWNER; send SetOwner first"
            )
        if request in NEEDS_PROTOCOL_FEATURES and not self._offers_protocol_features():
            raise VhostUserLocalError(
                f"{self.ROLE}: {request.name} needs VHOST_USER_F_PROTOCOL_FEATURES (bit 30) "
                f"in the back-end's GET_FEATURES reply, which "
                f"{'lacks it' if self.backend_features is not None else 'has not arrived'}"
            )
        gate = GATED_BY.get(request)
        if gate is not None and not self.protocol_features & gate:
            raise VhostUserLocalError(
                f"{self.ROLE}: {request.name} needs protocol feature {gate.name}, "
                f"which was not negotiated with SetProtocolFeatures"
            )
        if message.need_reply and not self.protocol_features & PF.REPLY_ACK:
            raise VhostUserLocalError(
                f"{self.ROLE}: {request.name} with need_reply but REPLY_ACK was not "
                f"negotiated; the back-end would never answer"
            )
        if isinstance(message, m.SetFeatures):
            offered = self.negotiate_features(-1)
            if message.features & ~offered:
                raise VhostUserLocalError(
                    f"{self.ROLE}: SET_FEATURES acks {message.features & ~offered:#x} which the "
                    f"back-end did not offer; use negotiate_features()"
                )
        if isinstance(message, m.SetProtocolFeatures):
            offered = self.negotiate_protocol_features(-1)
            if message.features & ~offered:
                raise VhostUserLocalError(
                    f"{self.ROLE}: SET_PROTOCOL_FEATURES sets {message.features & ~offered:#x} "
                    f"which the back-end did not offer; use negotiate_protocol_features()"
                )

    def _sent(self, message: m.Request) -> None:
        if isinstance(message, m.SetOwner):
            self.owner_set = True
        elif isinstance(message, m.SetFeatures):
            self.acked_features = message.features
        elif isinstance(message, m.SetProtocolFeatures):
            self.protocol_features = PF(message.features)

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        return _main_reply_type(message, self.protocol_features)

    def _got_reply(self, msg: m.Message) -> None:
        if isinstance(msg, m.FeaturesReply):
            self.backend_features = msg.features
        elif isinstance(msg, m.ProtocolFeaturesReply):
            self.backend_protocol_features = PF(msg.features)


class BackendConnection(_Responder):
    """The back-end (device) side of the main vhost-user socket.

    Everything a front-end must not send is a :class:`VhostUserRemoteError`; the I/O layer
    then closes this connection only.
    """

    ROLE = "vhost-user back-end"
    REPLY_ENUM = FR

    def __init__(self) -> None:
        super().__init__()
        self.owner_set = False
        #: Virtio features we offered (our GET_FEATURES reply), None until sent.
        self.offered_features: int | None = None
        #: Virtio features the front-end acked with SET_FEATURES.
        self.acked_features: int | None = None
        #: Protocol features we offered (our GET_PROTOCOL_FEATURES reply).
        self.offered_protocol_features = PF(0)
        #: Protocol features in force (the front-end's SET_PROTOCOL_FEATURES).
        self.protocol_features = PF(0)

    def _lookup(self, header: m.Header) -> type[m.Request]:
        return m.frontend_request_type(header)

    def _check_receive(self, request: enum.IntEnum) -> None:
        request = FR(request)
        if request in REQUIRES_OWNER and not self.owner_set:
            raise VhostUserRemoteError(f"{self.ROLE}: {request.name} before SET_OWNER")
        if (request in NEEDS_PROTOCOL_FEATURES and self.offered_features is not None
                and not self.offered_features & m.PROTOCOL_FEATURES_FLAG):
            raise VhostUserRemoteError(
                f"{self.ROLE}: {request.name} although we did not offer "
                f"VHOST_USER_F_PROTOCOL_FEATURES"
            )
        gate = GATED_BY.get(request)
        if gate is not None and not (self.offered_protocol_features | self.protocol_features) & gate:
            raise VhostUserRemoteError(
                f"{self.ROLE}: {request.name} needs protocol feature {gate.name}, "
                f"which we did not offer"
            )

    def _got_request(self, msg: m.Request) -> None:
        if isinstance(msg, m.SetOwner):
            self.owner_set = True
        elif isinstance(msg, m.SetFeatures):
            if self.offered_features is not None and msg.features & ~self.offered_features:
                raise VhostUserRemoteError(
                    f"{self.ROLE}: SET_FEATURES acks {msg.features & ~self.offered_features:#x} "
                    f"which we did not offer"
                )
            self.acked_features = msg.features
        elif isinstance(msg, m.SetProtocolFeatures):
            if msg.features & ~self.offered_protocol_features:
                raise VhostUserRemoteError(
                    f"{self.ROLE}: SET_PROTOCOL_FEATURES sets "
                    f"{msg.features & ~self.offered_protocol_features:#x} which we did not offer"
                )
            self.protocol_features = PF(msg.features)

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        return _main_reply_type(message, self.protocol_features)

    def _sent_reply(self, reply: m.Reply) -> None:
        if isinstance(reply, m.FeaturesReply):
            self.offered_features = reply.features
        elif isinstance(reply, m.ProtocolFeaturesReply):
            self.offered_protocol_features = PF(reply.features)


# ---------------------------------------------------------------------------------------------
# Back-end channel (SET_BACKEND_REQ_FD): roles reversed, only REPLY_ACK acks


class BackendRequestSender(_Requester):
    """The back-end's end of the back-end channel: sends BACKEND_* requests, reads acks."""

    ROLE = "vhost-user back-end channel (back-end side)"
    REQUEST_ENUM = m.BackendRequest

    def __init__(self, *, reply_ack: bool) -> None:
        super().__init__()
        self.reply_ack = reply_ack

    def _check_send(self, message: m.Request) -> None:
        if message.need_reply and not self.reply_ack:
            raise VhostUserLocalError(
                f"{self.ROLE}: {message.REQUEST.name} with need_reply but REPLY_ACK was not "
                f"negotiated; the front-end would never answer"
            )

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        return m.BackendAck if message.need_reply and self.reply_ack else None


class BackendRequestReceiver(_Responder):
    """The front-end's end of the back-end channel: reads BACKEND_* requests, sends acks."""

    ROLE = "vhost-user back-end channel (front-end side)"
    REPLY_ENUM = m.BackendRequest

    def __init__(self, *, reply_ack: bool) -> None:
        super().__init__()
        self.reply_ack = reply_ack

    def _lookup(self, header: m.Header) -> type[m.Request]:
        return m.backend_request_type(header)

    def _reply_type(self, message: m.Request) -> type[m.Reply] | None:
        return m.BackendAck if message.need_reply and self.reply_ack else None
