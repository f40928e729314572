"""vhost-user wire format: header, payload layouts and one frozen dataclass per message.

Spec: QEMU ``docs/interop/vhost-user.rst`` ("Message Specification", "Front-end message
types", "Back-end message types"); struct layouts follow ``<linux/vhost_types.h>``. All
numbers are in the machine's native byte order (spec: "Message Specification").

Every message class has ``encode() -> (bytes, fds)`` and ``decode(header, payload, fds)``.
``encode`` raises :class:`VhostUserLocalError` for fields that cannot be represented;
``decode`` raises :class:`VhostUserRemoteError` for payloads or fd counts that do not fit the
message type. ``decode`` never closes fds it rejects: the connection that owns them does.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self

from pymvm.vhost.user.errors import VhostUserLocalError, VhostUserRemoteError

# ---------------------------------------------------------------------------------------------
# Constants

VHOST_USER_VERSION: Final = 0x1
VERSION_MASK: Final = 0x3
REPLY_FLAG: Final = 0x4
NEED_REPLY_FLAG: Final = 0x8

HEADER = struct.Struct("=III")
HEADER_SIZE: Final = HEADER.size  # 12

#: No message we understand is larger than this; anything bigger is refused from its header.
MAX_PAYLOAD_SIZE: Final = 4096
#: VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE (and fds in one message).
MAX_MEM_REGIONS: Final = 8
#: VHOST_USER_MAX_CONFIG_SIZE: largest config-space access.
MAX_CONFIG_SIZE: Final = 256
CONFIG_HEADER = struct.Struct("=III")

#: Virtio feature bit number (like the C define) that announces protocol-feature support.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
PROTOCOL_FEATURES_FLAG: Final = 1 << VHOST_USER_F_PROTOCOL_FEATURES

#: SET_VRING_KICK/CALL/ERR (and host notifier) u64: bits 0-7 vring index, bit 8 "no fd".
VRING_INDEX_MASK: Final = 0xFF
VRING_NOFD_FLAG: Final = 0x100

_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDR = struct.Struct("=IIQQQQ")
_MEM_REGION = struct.Struct("=QQQQ")
_MEM_TABLE_HEADER = struct.Struct("=II")
_MEM_REG_MSG = struct.Struct("=Q" + "QQQQ")
_LOG = struct.Struct("=QQ")
# struct vhost_iotlb_msg is 26 bytes of fields, padded to 32 by its u64 alignment.
_IOTLB = struct.Struct("=QQQBB")
_IOTLB_SIZE: Final = 32
# VhostUserInflight: 20 bytes of fields, padded to 24 by its u64 alignment.
_INFLIGHT = struct.Struct("=QQHH")
_INFLIGHT_SIZE: Final = 24
_VRING_AREA = struct.Struct("=QQQ")


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket (spec "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the back-end channel (SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks: member value is ``1 << bit`` (spec "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


def negotiate(wanted: int, offered: int) -> int:
    """Feature negotiation: the bits both sides support."""
    return wanted & offered


# ---------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY_FLAG)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY_FLAG)

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data))


# ---------------------------------------------------------------------------------------------
# Base classes


def _expect_fds(name: str, fds: list[int], count: int) -> None:
    if len(fds) != count:
        raise VhostUserRemoteError(
            f"{name} arrived with {len(fds)} file descriptors, expected {count}; "
            f"the peer attached the wrong ancillary data"
        )


def _check_fd(name: str, fd: int) -> None:
    if not isinstance(fd, int) or fd < 0:
        raise VhostUserLocalError(f"{name}: {fd!r} is not a file descriptor; pass an open fd >= 0")


class Message:
    """Base of every vhost-user message. Concrete subclasses are frozen dataclasses.

    ``REQUEST`` is the wire request type; replies carry their request's type with the
    REPLY flag set.
    """

    REQUEST: ClassVar[enum.IntEnum]
    IS_REPLY: ClassVar[bool] = False
    MIN_PAYLOAD: ClassVar[int] = 0
    MAX_PAYLOAD: ClassVar[int] = 0

    def wire_request(self) -> enum.IntEnum:
        return self.REQUEST

    def _pack(self) -> bytes:
        return b""

    def _fds(self) -> list[int]:
        return []

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 0)
        return {}

    @classmethod
    def _name(cls, header: Header | None = None) -> str:
        kind = " reply" if cls.IS_REPLY else ""
        return f"{cls.REQUEST.name}{kind}"

    def _flags(self) -> int:
        return VHOST_USER_VERSION | (REPLY_FLAG if self.IS_REPLY else 0)

    def encode(self) -> tuple[bytes, list[int]]:
        """Header plus payload, and the fds to send as SCM_RIGHTS with the first byte."""
        try:
            payload = self._pack()
        except struct.error as e:
            raise VhostUserLocalError(
                f"{self.wire_request().name}: a field does not fit its wire type ({e}); "
                f"check the values passed to {type(self).__name__}"
            ) from None
        fds = self._fds()
        for fd in fds:
            _check_fd(type(self).__name__, fd)
        return Header(self.wire_request(), self._flags(), len(payload)).pack() + payload, fds

    @classmethod
    def decode(cls, header: Header, payload: bytes, fds: list[int]) -> Self:
        name = cls._name(header)
        if len(payload) < cls.MIN_PAYLOAD:
            raise VhostUserRemoteError(
                f"{name} payload is truncated: {len(payload)} bytes, needs {cls.MIN_PAYLOAD}"
            )
        if len(payload) > cls.MAX_PAYLOAD:
            raise VhostUserRemoteError(
                f"{name} payload is {len(payload)} bytes, at most {cls.MAX_PAYLOAD} allowed"
            )
        fields = cls._parse(header, payload, fds)
        if issubclass(cls, Request):
            fields["need_reply"] = header.need_reply
        return cls(**fields)


@dataclass(frozen=True)
class Request(Message):
    """A request; ``need_reply`` asks for a REPLY_ACK status (only once REPLY_ACK is negotiated)."""

    need_reply: bool = field(default=False, kw_only=True)

    def _flags(self) -> int:
        return VHOST_USER_VERSION | (NEED_REPLY_FLAG if self.need_reply else 0)


@dataclass(frozen=True)
class Reply(Message):
    IS_REPLY: ClassVar[bool] = True


class _U64Payload:
    """Mixin: the payload is one u64, stored in the field named by ``_FIELD``."""

    _FIELD: ClassVar[str]
    MIN_PAYLOAD: ClassVar[int] = 8
    MAX_PAYLOAD: ClassVar[int] = 8

    def _pack(self) -> bytes:
        return _U64.pack(getattr(self, self._FIELD))

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 0)  # type: ignore[attr-defined]
        return {cls._FIELD: _U64.unpack(payload)[0]}


class _VringStatePayload:
    """Mixin: the payload is a vring state (index u32, num u32)."""

    MIN_PAYLOAD: ClassVar[int] = _VRING_STATE.size
    MAX_PAYLOAD: ClassVar[int] = _VRING_STATE.size

    def _pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)  # type: ignore[attr-defined]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 0)  # type: ignore[attr-defined]
        index, num = _VRING_STATE.unpack(payload)
        return {"index": index, "num": num}


class _FdOnlyPayload:
    """Mixin: no payload, exactly one fd in ``fd``."""

    def _fds(self) -> list[int]:
        return [self.fd]  # type: ignore[attr-defined]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 1)  # type: ignore[attr-defined]
        return {"fd": fds[0]}


class _VringFdPayload:
    """Mixin: u64 of vring index (bits 0-7) and no-fd flag (bit 8), plus the fd unless flagged."""

    MIN_PAYLOAD: ClassVar[int] = 8
    MAX_PAYLOAD: ClassVar[int] = 8

    def _pack(self) -> bytes:
        index = self.index  # type: ignore[attr-defined]
        if not 0 <= index <= VRING_INDEX_MASK:
            raise VhostUserLocalError(
                f"{self.REQUEST.name}: vring index {index} does not fit bits 0-7; "  # type: ignore[attr-defined]
                f"vhost-user addresses at most 256 vrings"
            )
        return _U64.pack(index | (VRING_NOFD_FLAG if self.fd is None else 0))  # type: ignore[attr-defined]

    def _fds(self) -> list[int]:
        return [] if self.fd is None else [self.fd]  # type: ignore[attr-defined]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        name = cls._name(header)  # type: ignore[attr-defined]
        (value,) = _U64.unpack(payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_FLAG):
            raise VhostUserRemoteError(f"{name} sets reserved bits {value:#x} beyond index and no-fd flag")
        no_fd = bool(value & VRING_NOFD_FLAG)
        _expect_fds(name, fds, 0 if no_fd else 1)
        return {"index": value & VRING_INDEX_MASK, "fd": None if no_fd else fds[0]}


class _ConfigPayload:
    """Mixin: virtio config space (offset u32, size u32, flags u32, then ``size`` bytes)."""

    MIN_PAYLOAD: ClassVar[int] = CONFIG_HEADER.size
    MAX_PAYLOAD: ClassVar[int] = CONFIG_HEADER.size + MAX_CONFIG_SIZE

    @staticmethod
    def _pack_config(name: str, offset: int, flags: int, data: bytes) -> bytes:
        if len(data) > MAX_CONFIG_SIZE:
            raise VhostUserLocalError(
                f"{name}: {len(data)} bytes of config space, at most {MAX_CONFIG_SIZE} per message"
            )
        return CONFIG_HEADER.pack(offset, len(data), flags) + bytes(data)

    @staticmethod
    def _parse_config(name: str, payload: bytes) -> tuple[int, int, int, bytes]:
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        data = payload[CONFIG_HEADER.size :]
        if size > MAX_CONFIG_SIZE or len(data) != size:
            raise VhostUserRemoteError(
                f"{name} says {size} bytes of config space but carries {len(data)}"
            )
        return offset, size, flags, data


# ---------------------------------------------------------------------------------------------
# Payload structures


@dataclass(frozen=True)
class MemoryRegion:
    """struct vhost_memory_region with the mmap offset in place of flags_padding."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _MEM_REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack_from(cls, data: bytes, offset: int = 0) -> MemoryRegion:
        return cls(*_MEM_REGION.unpack_from(data, offset))


# ---------------------------------------------------------------------------------------------
# Front-end requests


@dataclass(frozen=True)
class GetFeatures(Request):
    REQUEST: ClassVar = FrontendRequest.GET_FEATURES


@dataclass(frozen=True)
class SetFeatures(_U64Payload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_FEATURES
    _FIELD: ClassVar = "features"
    features: int


@dataclass(frozen=True)
class SetOwner(Request):
    REQUEST: ClassVar = FrontendRequest.SET_OWNER


@dataclass(frozen=True)
class ResetOwner(Request):
    REQUEST: ClassVar = FrontendRequest.RESET_OWNER


@dataclass(frozen=True)
class SetMemTable(Request):
    """Regions plus one fd per region, in the same order (spec: SET_MEM_TABLE)."""

    REQUEST: ClassVar = FrontendRequest.SET_MEM_TABLE
    MIN_PAYLOAD: ClassVar = _MEM_TABLE_HEADER.size
    MAX_PAYLOAD: ClassVar = _MEM_TABLE_HEADER.size + MAX_MEM_REGIONS * _MEM_REGION.size
    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]

    def _pack(self) -> bytes:
        if len(self.regions) > MAX_MEM_REGIONS or len(self.regions) != len(self.fds):
            raise VhostUserLocalError(
                f"SET_MEM_TABLE: {len(self.regions)} regions with {len(self.fds)} fds; "
                f"pass at most {MAX_MEM_REGIONS} regions and exactly one fd per region"
            )
        return _MEM_TABLE_HEADER.pack(len(self.regions), 0) + b"".join(
            r.pack() for r in self.regions
        )

    def _fds(self) -> list[int]:
        return list(self.fds)

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        count, _padding = _MEM_TABLE_HEADER.unpack_from(payload)
        if count > MAX_MEM_REGIONS:
            raise VhostUserRemoteError(
                f"SET_MEM_TABLE has {count} regions, at most {MAX_MEM_REGIONS} allowed"
            )
        needed = _MEM_TABLE_HEADER.size + count * _MEM_REGION.size
        # Some front-ends send the fixed 8-region struct whatever the count; accept both.
        if len(payload) not in (needed, cls.MAX_PAYLOAD):
            raise VhostUserRemoteError(
                f"SET_MEM_TABLE payload is {len(payload)} bytes for {count} regions, "
                f"expected {needed}"
            )
        _expect_fds("SET_MEM_TABLE", fds, count)
        regions = tuple(
            MemoryRegion.unpack_from(payload, _MEM_TABLE_HEADER.size + i * _MEM_REGION.size)
            for i in range(count)
        )
        return {"regions": regions, "fds": tuple(fds)}


@dataclass(frozen=True)
class SetLogBase(Request):
    """Log description (size, offset) plus the shared log fd (needs LOG_SHMFD)."""

    REQUEST: ClassVar = FrontendRequest.SET_LOG_BASE
    MIN_PAYLOAD: ClassVar = _LOG.size
    MAX_PAYLOAD: ClassVar = _LOG.size
    mmap_size: int
    mmap_offset: int
    fd: int

    def _pack(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    def _fds(self) -> list[int]:
        return [self.fd]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SET_LOG_BASE", fds, 1)
        size, offset = _LOG.unpack(payload)
        return {"mmap_size": size, "mmap_offset": offset, "fd": fds[0]}


@dataclass(frozen=True)
class SetLogFd(_FdOnlyPayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_LOG_FD
    fd: int


@dataclass(frozen=True)
class SetVringNum(_VringStatePayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_NUM
    index: int
    num: int


@dataclass(frozen=True)
class SetVringAddr(Request):
    """struct vhost_vring_addr; flags bit 0 (VHOST_VRING_F_LOG) enables used-ring logging."""

    REQUEST: ClassVar = FrontendRequest.SET_VRING_ADDR
    MIN_PAYLOAD: ClassVar = _VRING_ADDR.size
    MAX_PAYLOAD: ClassVar = _VRING_ADDR.size
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def _pack(self) -> bytes:
        return _VRING_ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SET_VRING_ADDR", fds, 0)
        names = ("index", "flags", "desc_user_addr", "used_user_addr", "avail_user_addr",
                 "log_guest_addr")
        return dict(zip(names, _VRING_ADDR.unpack(payload), strict=True))


@dataclass(frozen=True)
class SetVringBase(_VringStatePayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_BASE
    index: int
    num: int


@dataclass(frozen=True)
class GetVringBase(_VringStatePayload, Request):
    """Stops the ring; ``num`` is reserved (0)."""

    REQUEST: ClassVar = FrontendRequest.GET_VRING_BASE
    index: int
    num: int = 0


@dataclass(frozen=True)
class SetVringKick(_VringFdPayload, Request):
    """``fd=None`` sets the no-fd flag: the back-end polls instead."""

    REQUEST: ClassVar = FrontendRequest.SET_VRING_KICK
    index: int
    fd: int | None


@dataclass(frozen=True)
class SetVringCall(_VringFdPayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_CALL
    index: int
    fd: int | None


@dataclass(frozen=True)
class SetVringErr(_VringFdPayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_ERR
    index: int
    fd: int | None


@dataclass(frozen=True)
class GetProtocolFeatures(Request):
    REQUEST: ClassVar = FrontendRequest.GET_PROTOCOL_FEATURES


@dataclass(frozen=True)
class SetProtocolFeatures(_U64Payload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_PROTOCOL_FEATURES
    _FIELD: ClassVar = "features"
    features: int


@dataclass(frozen=True)
class GetQueueNum(Request):
    REQUEST: ClassVar = FrontendRequest.GET_QUEUE_NUM


@dataclass(frozen=True)
class SetVringEnable(Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_ENABLE
    MIN_PAYLOAD: ClassVar = _VRING_STATE.size
    MAX_PAYLOAD: ClassVar = _VRING_STATE.size
    index: int
    enable: bool

    def _pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, 1 if self.enable else 0)

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SET_VRING_ENABLE", fds, 0)
        index, num = _VRING_STATE.unpack(payload)
        return {"index": index, "enable": num != 0}


@dataclass(frozen=True)
class SendRarp(Request):
    """u64 payload whose first 6 bytes are the guest's MAC address."""

    REQUEST: ClassVar = FrontendRequest.SEND_RARP
    MIN_PAYLOAD: ClassVar = 8
    MAX_PAYLOAD: ClassVar = 8
    mac: bytes

    def _pack(self) -> bytes:
        if len(self.mac) != 6:
            raise VhostUserLocalError(f"SEND_RARP: MAC must be 6 bytes, got {len(self.mac)}")
        return bytes(self.mac) + b"\0\0"

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SEND_RARP", fds, 0)
        return {"mac": payload[:6]}


@dataclass(frozen=True)
class NetSetMtu(_U64Payload, Request):
    REQUEST: ClassVar = FrontendRequest.NET_SET_MTU
    _FIELD: ClassVar = "mtu"
    mtu: int


@dataclass(frozen=True)
class SetBackendReqFd(_FdOnlyPayload, Request):
    """Hands the back-end one end of a socketpair for BackendRequest messages."""

    REQUEST: ClassVar = FrontendRequest.SET_BACKEND_REQ_FD
    fd: int


class _IotlbPayload:
    MIN_PAYLOAD: ClassVar[int] = _IOTLB.size
    MAX_PAYLOAD: ClassVar[int] = _IOTLB_SIZE

    def _pack(self) -> bytes:
        raw = _IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)  # type: ignore[attr-defined]
        return raw.ljust(_IOTLB_SIZE, b"\0")

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 0)  # type: ignore[attr-defined]
        iova, size, uaddr, perm, type_ = _IOTLB.unpack_from(payload)
        return {"iova": iova, "size": size, "uaddr": uaddr, "perm": perm, "type": type_}


@dataclass(frozen=True)
class IotlbMsg(_IotlbPayload, Request):
    """struct vhost_iotlb_msg; always answered with a u64 status (:class:`Ack`)."""

    REQUEST: ClassVar = FrontendRequest.IOTLB_MSG
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True)
class SetVringEndian(_VringStatePayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_VRING_ENDIAN
    index: int
    num: int


@dataclass(frozen=True)
class GetConfig(_ConfigPayload, Request):
    """Asks for ``size`` bytes at ``offset``; the request carries ``size`` zero bytes."""

    REQUEST: ClassVar = FrontendRequest.GET_CONFIG
    offset: int
    size: int
    flags: int = 0

    def _pack(self) -> bytes:
        return self._pack_config("GET_CONFIG", self.offset, self.flags, bytes(self.size))

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("GET_CONFIG", fds, 0)
        offset, size, flags, _ = cls._parse_config("GET_CONFIG", payload)
        return {"offset": offset, "size": size, "flags": flags}


@dataclass(frozen=True)
class SetConfig(_ConfigPayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_CONFIG
    offset: int
    data: bytes
    flags: int = 0

    def _pack(self) -> bytes:
        return self._pack_config("SET_CONFIG", self.offset, self.flags, self.data)

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SET_CONFIG", fds, 0)
        offset, _, flags, data = cls._parse_config("SET_CONFIG", payload)
        return {"offset": offset, "data": data, "flags": flags}


class _InflightPayload:
    MIN_PAYLOAD: ClassVar[int] = _INFLIGHT.size
    MAX_PAYLOAD: ClassVar[int] = _INFLIGHT_SIZE

    def _pack(self) -> bytes:
        raw = _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)  # type: ignore[attr-defined]
        return raw.ljust(_INFLIGHT_SIZE, b"\0")

    @staticmethod
    def _parse_inflight(payload: bytes) -> dict[str, Any]:
        size, offset, queues, qsize = _INFLIGHT.unpack_from(payload)
        return {"mmap_size": size, "mmap_offset": offset, "num_queues": queues, "queue_size": qsize}


@dataclass(frozen=True)
class GetInflightFd(_InflightPayload, Request):
    REQUEST: ClassVar = FrontendRequest.GET_INFLIGHT_FD
    num_queues: int
    queue_size: int
    mmap_size: int = 0
    mmap_offset: int = 0

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("GET_INFLIGHT_FD", fds, 0)
        return cls._parse_inflight(payload)


@dataclass(frozen=True)
class SetInflightFd(_InflightPayload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_INFLIGHT_FD
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int

    def _fds(self) -> list[int]:
        return [self.fd]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("SET_INFLIGHT_FD", fds, 1)
        return cls._parse_inflight(payload) | {"fd": fds[0]}


@dataclass(frozen=True)
class GpuSetSocket(_FdOnlyPayload, Request):
    REQUEST: ClassVar = FrontendRequest.GPU_SET_SOCKET
    fd: int


@dataclass(frozen=True)
class ResetDevice(Request):
    REQUEST: ClassVar = FrontendRequest.RESET_DEVICE


@dataclass(frozen=True)
class VringKick(_VringStatePayload, Request):
    """In-band kick (INBAND_NOTIFICATIONS); ``num`` is reserved (0)."""

    REQUEST: ClassVar = FrontendRequest.VRING_KICK
    index: int
    num: int = 0


@dataclass(frozen=True)
class GetMaxMemSlots(Request):
    REQUEST: ClassVar = FrontendRequest.GET_MAX_MEM_SLOTS


@dataclass(frozen=True)
class AddMemReg(Request):
    """Single memory region (u64 padding + region) plus exactly one fd."""

    REQUEST: ClassVar = FrontendRequest.ADD_MEM_REG
    MIN_PAYLOAD: ClassVar = _MEM_REG_MSG.size
    MAX_PAYLOAD: ClassVar = _MEM_REG_MSG.size
    region: MemoryRegion
    fd: int

    def _pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    def _fds(self) -> list[int]:
        return [self.fd]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("ADD_MEM_REG", fds, 1)
        return {"region": MemoryRegion.unpack_from(payload, 8), "fd": fds[0]}


@dataclass(frozen=True)
class RemMemReg(Request):
    """Single memory region, no fd (mmap_offset is ignored by the back-end)."""

    REQUEST: ClassVar = FrontendRequest.REM_MEM_REG
    MIN_PAYLOAD: ClassVar = _MEM_REG_MSG.size
    MAX_PAYLOAD: ClassVar = _MEM_REG_MSG.size
    region: MemoryRegion

    def _pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        # Spec: the back-end MAY accept one stray fd from old front-ends and MUST close it.
        if len(fds) == 1:
            os.close(fds.pop())
        _expect_fds("REM_MEM_REG", fds, 0)
        return {"region": MemoryRegion.unpack_from(payload, 8)}


@dataclass(frozen=True)
class SetStatus(_U64Payload, Request):
    REQUEST: ClassVar = FrontendRequest.SET_STATUS
    _FIELD: ClassVar = "status"
    status: int


@dataclass(frozen=True)
class GetStatus(Request):
    REQUEST: ClassVar = FrontendRequest.GET_STATUS


# ---------------------------------------------------------------------------------------------
# Replies to front-end requests


@dataclass(frozen=True)
class FeaturesReply(_U64Payload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_FEATURES
    _FIELD: ClassVar = "features"
    features: int


@dataclass(frozen=True)
class ProtocolFeaturesReply(_U64Payload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_PROTOCOL_FEATURES
    _FIELD: ClassVar = "features"
    features: int


@dataclass(frozen=True)
class QueueNumReply(_U64Payload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_QUEUE_NUM
    _FIELD: ClassVar = "num_queues"
    num_queues: int


@dataclass(frozen=True)
class MaxMemSlotsReply(_U64Payload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_MAX_MEM_SLOTS
    _FIELD: ClassVar = "slots"
    slots: int


@dataclass(frozen=True)
class StatusReply(_U64Payload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_STATUS
    _FIELD: ClassVar = "status"
    status: int


@dataclass(frozen=True)
class VringBaseReply(_VringStatePayload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_VRING_BASE
    index: int
    num: int


@dataclass(frozen=True)
class ConfigReply(_ConfigPayload, Reply):
    """Config bytes; ``data=b""`` encodes the spec's failure reply (a zero-length payload)."""

    REQUEST: ClassVar = FrontendRequest.GET_CONFIG
    MIN_PAYLOAD: ClassVar = 0
    offset: int
    data: bytes
    flags: int = 0

    @property
    def failed(self) -> bool:
        return not self.data

    def _pack(self) -> bytes:
        if not self.data:
            return b""
        return self._pack_config("GET_CONFIG reply", self.offset, self.flags, self.data)

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("GET_CONFIG reply", fds, 0)
        if not payload:
            return {"offset": 0, "data": b"", "flags": 0}
        if len(payload) < CONFIG_HEADER.size:
            raise VhostUserRemoteError(
                f"GET_CONFIG reply payload is truncated: {len(payload)} bytes, "
                f"needs {CONFIG_HEADER.size} or none"
            )
        offset, _, flags, data = cls._parse_config("GET_CONFIG reply", payload)
        return {"offset": offset, "data": data, "flags": flags}


@dataclass(frozen=True)
class InflightFdReply(_InflightPayload, Reply):
    REQUEST: ClassVar = FrontendRequest.GET_INFLIGHT_FD
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    fd: int

    def _fds(self) -> list[int]:
        return [self.fd]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds("GET_INFLIGHT_FD reply", fds, 1)
        return cls._parse_inflight(payload) | {"fd": fds[0]}


@dataclass(frozen=True)
class Ack(Reply):
    """u64 status reply: REPLY_ACK, IOTLB_MSG, SET_LOG_BASE. Zero is success."""

    MIN_PAYLOAD: ClassVar = 8
    MAX_PAYLOAD: ClassVar = 8
    REQUEST_ENUM: ClassVar[type[enum.IntEnum]] = FrontendRequest
    request: FrontendRequest
    status: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0

    def wire_request(self) -> enum.IntEnum:
        return self.request

    def _pack(self) -> bytes:
        return _U64.pack(self.status)

    @classmethod
    def _name(cls, header: Header | None = None) -> str:
        if header is None:
            return "ack"
        try:
            return f"{cls.REQUEST_ENUM(header.request).name} ack"
        except ValueError:
            return f"request {header.request} ack"

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        _expect_fds(cls._name(header), fds, 0)
        try:
            request = cls.REQUEST_ENUM(header.request)
        except ValueError:
            raise VhostUserRemoteError(f"ack for unknown request type {header.request}") from None
        return {"request": request, "status": _U64.unpack(payload)[0]}


# ---------------------------------------------------------------------------------------------
# Back-end channel requests (back-end -> front-end) and their ack


@dataclass(frozen=True)
class BackendIotlbMsg(_IotlbPayload, Request):
    REQUEST: ClassVar = BackendRequest.IOTLB_MSG
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True)
class ConfigChange(Request):
    REQUEST: ClassVar = BackendRequest.CONFIG_CHANGE_MSG


@dataclass(frozen=True)
class VringHostNotifier(Request):
    """Vring area: u64 (index bits 0-7, no-fd bit 8), size, offset; fd unless no-fd."""

    REQUEST: ClassVar = BackendRequest.VRING_HOST_NOTIFIER_MSG
    MIN_PAYLOAD: ClassVar = _VRING_AREA.size
    MAX_PAYLOAD: ClassVar = _VRING_AREA.size
    index: int
    size: int
    offset: int
    fd: int | None

    def _pack(self) -> bytes:
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise VhostUserLocalError(f"VRING_HOST_NOTIFIER_MSG: vring index {self.index} > 255")
        flags = VRING_NOFD_FLAG if self.fd is None else 0
        return _VRING_AREA.pack(self.index | flags, self.size, self.offset)

    def _fds(self) -> list[int]:
        return [] if self.fd is None else [self.fd]

    @classmethod
    def _parse(cls, header: Header, payload: bytes, fds: list[int]) -> dict[str, Any]:
        value, size, offset = _VRING_AREA.unpack(payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_FLAG):
            raise VhostUserRemoteError(f"VRING_HOST_NOTIFIER_MSG sets reserved bits {value:#x}")
        no_fd = bool(value & VRING_NOFD_FLAG)
        _expect_fds("VRING_HOST_NOTIFIER_MSG", fds, 0 if no_fd else 1)
        return {"index": value & VRING_INDEX_MASK, "size": size, "offset": offset,
                "fd": None if no_fd else fds[0]}


@dataclass(frozen=True)
class BackendVringCall(_VringStatePayload, Request):
    REQUEST: ClassVar = BackendRequest.VRING_CALL
    index: int
    num: int = 0


@dataclass(frozen=True)
class BackendVringErr(_VringStatePayload, Request):
    REQUEST: ClassVar = BackendRequest.VRING_ERR
    index: int
    num: int = 0


@dataclass(frozen=True)
class BackendAck(Ack):
    """The front-end's u64 status reply on the back-end channel."""

    REQUEST_ENUM: ClassVar[type[enum.IntEnum]] = BackendRequest
    request: BackendRequest  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# Registries

FRONTEND_REQUESTS: Final[dict[FrontendRequest, type[Request]]] = {
    cls.REQUEST: cls
    for cls in (
        GetFeatures, SetFeatures, SetOwner, ResetOwner, SetMemTable, SetLogBase, SetLogFd,
        SetVringNum, SetVringAddr, SetVringBase, GetVringBase, SetVringKick, SetVringCall,
        SetVringErr, GetProtocolFeatures, SetProtocolFeatures, GetQueueNum, SetVringEnable,
        SendRarp, NetSetMtu, SetBackendReqFd, IotlbMsg, SetVringEndian, GetConfig, SetConfig,
        GetInflightFd, SetInflightFd, GpuSetSocket, ResetDevice, VringKick, GetMaxMemSlots,
        AddMemReg, RemMemReg, SetStatus, GetStatus,
    )
}

#: Replies with a body of their own; every other reply on the main socket is an :class:`Ack`.
FRONTEND_REPLIES: Final[dict[FrontendRequest, type[Reply]]] = {
    cls.REQUEST: cls
    for cls in (
        FeaturesReply, ProtocolFeaturesReply, QueueNumReply, MaxMemSlotsReply, StatusReply,
        VringBaseReply, ConfigReply, InflightFdReply,
    )
}

BACKEND_REQUESTS: Final[dict[BackendRequest, type[Request]]] = {
    cls.REQUEST: cls
    for cls in (BackendIotlbMsg, ConfigChange, VringHostNotifier, BackendVringCall, BackendVringErr)
}


def _lookup(registry: dict[Any, type[Request]], header: Header, what: str) -> type[Request]:
    cls = registry.get(header.request)  # type: ignore[call-overload]
    if cls is None:
        raise VhostUserRemoteError(
            f"unknown or unsupported {what} request type {header.request}; "
            f"the peer uses a message this implementation never negotiates"
        )
    return cls


def frontend_request_type(header: Header) -> type[Request]:
    """The class for a front-end request header, or VhostUserRemoteError if unsupported."""
    return _lookup(FRONTEND_REQUESTS, header, "front-end")


def backend_request_type(header: Header) -> type[Request]:
    return _lookup(BACKEND_REQUESTS, header, "back-end")


def frontend_reply_type(request: FrontendRequest) -> type[Reply]:
    return FRONTEND_REPLIES.get(request, Ack)


def decode_request(header: Header, payload: bytes, fds: list[int]) -> Request:
    """Decode a front-end request (registry lookup by header.request)."""
    return frontend_request_type(header).decode(header, payload, fds)


def decode_reply(header: Header, payload: bytes, fds: list[int]) -> Reply:
    """Decode a reply to a front-end request."""
    try:
        request = FrontendRequest(header.request)
    except ValueError:
        raise VhostUserRemoteError(f"reply to unknown request type {header.request}") from None
    return frontend_reply_type(request).decode(header, payload, fds)
