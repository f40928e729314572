"""The sans-IO vhost-user protocol, driven without sockets (fds are real os.pipe() ends)."""

from __future__ import annotations

import functools
import operator
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import (
    VhostUserLocalError,
    VhostUserRemoteError,
    VhostUserRequestFailed,
)
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import (
    NEED_DATA,
    PEER_CLOSED,
    BackendConnection,
    BackendRequestReceiver,
    BackendRequestSender,
    ConnectionState,
    FrontendConnection,
)
from tests.fds import is_open

ALL_PROTOCOL_FEATURES = PF(functools.reduce(operator.or_, PF))
VIRTIO_FEATURES = m.PROTOCOL_FEATURES_FLAG | (1 << 32) | (1 << 5)

MakeFd = Callable[[], int]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def new_fd() -> Iterator[MakeFd]:
    """Makes real fds (pipe read ends); closes those the code under test did not close."""
    opened: list[tuple[int, int]] = []

    def make() -> int:
        r, w = os.pipe()
        os.close(w)
        opened.append((r, os.fstat(r).st_ino))
        return r

    yield make
    for fd, ino in opened:
        try:
            if os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass


def header(request: int, size: int, flags: int = m.VHOST_USER_VERSION) -> bytes:
    return m.Header(request, flags, size).pack()


def deliver(encoded: tuple[bytes, list[int]], conn) -> None:
    data, fds = encoded
    conn.receive_data(data, fds)


def handshake(protocol_features: int = ALL_PROTOCOL_FEATURES,
              virtio_features: int = VIRTIO_FEATURES) -> tuple[FrontendConnection, BackendConnection]:
    """A front-end/back-end pair past GET_FEATURES, protocol features and SET_OWNER."""
    f, b = FrontendConnection(), BackendConnection()

    def exchange(request: m.Request, reply: m.Reply | None = None) -> None:
        deliver(f.send(request), b)
        assert b.next_event() == request
        if reply is not None:
            deliver(b.send(reply), f)
            assert f.next_event() == reply

    exchange(m.GetFeatures(), m.FeaturesReply(virtio_features))
    if virtio_features & m.PROTOCOL_FEATURES_FLAG:
        exchange(m.GetProtocolFeatures(), m.ProtocolFeaturesReply(protocol_features))
        exchange(m.SetProtocolFeatures(f.negotiate_protocol_features(protocol_features)))
    exchange(m.SetOwner())
    return f, b


REGION = m.MemoryRegion(guest_phys_addr=0x10_0000, memory_size=0x4000_0000,
                        userspace_addr=0x7F00_0000_0000, mmap_offset=0x1000)


def request_examples(fd: MakeFd) -> list[m.Request]:
    """One instance of every front-end request class; fds come from ``fd``."""
    return [
        m.GetFeatures(),
        m.SetFeatures(features=VIRTIO_FEATURES),
        m.SetOwner(),
        m.ResetOwner(),
        m.SetMemTable(regions=(REGION, m.MemoryRegion(0, 0x1000, 0x2000, 0)), fds=(fd(), fd())),
        m.SetMemTable(regions=(), fds=()),
        m.SetLogBase(mmap_size=0x8000, mmap_offset=0, fd=fd()),
        m.SetLogFd(fd=fd()),
        m.SetVringNum(index=1, num=256),
        m.SetVringAddr(index=1, flags=1, desc_user_addr=0x1000, used_user_addr=0x3000,
                       avail_user_addr=0x2000, log_guest_addr=0x4000),
        m.SetVringBase(index=0, num=7),
        m.GetVringBase(index=1),
        m.SetVringKick(index=0, fd=fd()),
        m.SetVringKick(index=255, fd=None),
        m.SetVringCall(index=1, fd=fd()),
        m.SetVringCall(index=2, fd=None),
        m.SetVringErr(index=3, fd=fd()),
        m.GetProtocolFeatures(),
        m.SetProtocolFeatures(features=PF.MQ | PF.REPLY_ACK),
        m.GetQueueNum(),
        m.SetVringEnable(index=1, enable=True),
        m.SetVringEnable(index=0, enable=False),
        m.SendRarp(mac=bytes.fromhex("525400123456")),
        m.NetSetMtu(mtu=1500),
        m.SetBackendReqFd(fd=fd()),
        m.IotlbMsg(iova=0x1000, size=0x1000, uaddr=0x7F00_0000_0000, perm=3, type=2),
        m.SetVringEndian(index=0, num=1),
        m.GetConfig(offset=0, size=60),
        m.SetConfig(offset=8, data=b"\x01\x02\x03\x04", flags=1),
        m.GetInflightFd(num_queues=2, queue_size=256),
        m.SetInflightFd(mmap_size=0x3000, mmap_offset=0, num_queues=2, queue_size=256, fd=fd()),
        m.GpuSetSocket(fd=fd()),
        m.ResetDevice(),
        m.VringKick(index=1),
        m.GetMaxMemSlots(),
        m.AddMemReg(region=REGION, fd=fd()),
        m.RemMemReg(region=REGION),
        m.SetStatus(status=0xF),
        m.GetStatus(),
        m.SetVringNum(index=0, num=1024, need_reply=True),
    ]


def reply_examples(fd: MakeFd) -> list[m.Reply]:
    return [
        m.FeaturesReply(features=VIRTIO_FEATURES),
        m.ProtocolFeaturesReply(features=ALL_PROTOCOL_FEATURES),
        m.QueueNumReply(num_queues=4),
        m.MaxMemSlotsReply(slots=509),
        m.StatusReply(status=0xF),
        m.VringBaseReply(index=1, num=42),
        m.ConfigReply(offset=0, data=bytes(range(60))),
        m.ConfigReply(offset=0, data=b""),
        m.InflightFdReply(mmap_size=0x3000, mmap_offset=0, num_queues=2, queue_size=256, fd=fd()),
        m.Ack(FR.SET_MEM_TABLE, 0),
        m.Ack(FR.IOTLB_MSG, 1),
    ]


def backend_channel_examples(fd: MakeFd) -> list[m.Request]:
    return [
        m.BackendIotlbMsg(iova=0x1000, size=0, uaddr=0, perm=1, type=1),
        m.ConfigChange(),
        m.ConfigChange(need_reply=True),
        m.VringHostNotifier(index=1, size=4096, offset=0, fd=fd()),
        m.VringHostNotifier(index=1, size=0, offset=0, fd=None),
        m.BackendVringCall(index=1),
        m.BackendVringErr(index=2),
    ]


def fake_fds() -> MakeFd:
    counter = iter(range(1000, 2000))
    return lambda: next(counter)


def _id(msg: m.Message) -> str:
    return type(msg).__name__


def split(encoded: tuple[bytes, list[int]]) -> tuple[m.Header, bytes, list[int]]:
    data, fds = encoded
    hdr = m.Header.unpack(data)
    assert hdr.size == len(data) - m.HEADER_SIZE
    return hdr, data[m.HEADER_SIZE :], list(fds)


# ---------------------------------------------------------------------------------------------
# Encode/decode round trips


@pytest.mark.parametrize("msg", request_examples(fake_fds()), ids=_id)
def test_every_frontend_request_round_trips_through_encode_and_decode(msg: m.Request) -> None:
    hdr, payload, fds = split(msg.encode())
    assert hdr.version == 1 and not hdr.is_reply
    assert hdr.need_reply == msg.need_reply
    assert m.decode_request(hdr, payload, fds) == msg


@pytest.mark.parametrize("msg", reply_examples(fake_fds()), ids=_id)
def test_every_reply_round_trips_through_encode_and_decode(msg: m.Reply) -> None:
    hdr, payload, fds = split(msg.encode())
    assert hdr.is_reply and not hdr.need_reply
    assert m.decode_reply(hdr, payload, fds) == msg


@pytest.mark.parametrize("msg", backend_channel_examples(fake_fds()), ids=_id)
def test_every_backend_channel_request_round_trips(msg: m.Request) -> None:
    hdr, payload, fds = split(msg.encode())
    assert m.backend_request_type(hdr).decode(hdr, payload, fds) == msg


def test_examples_cover_every_registered_message_class() -> None:
    fd = fake_fds()
    covered = {type(x) for x in request_examples(fd) + reply_examples(fd)}
    covered |= {type(x) for x in backend_channel_examples(fd)}
    registered = (set(m.FRONTEND_REQUESTS.values()) | set(m.FRONTEND_REPLIES.values())
                  | set(m.BACKEND_REQUESTS.values()))
    assert registered - covered == set()


def test_vring_fd_requests_encode_index_in_bits_0_to_7_and_no_fd_flag_in_bit_8() -> None:
    data, fds = m.SetVringCall(index=5, fd=None).encode()
    assert struct.unpack("=Q", data[m.HEADER_SIZE:])[0] == 0x105 and fds == []
    data, fds = m.SetVringKick(index=5, fd=9).encode()
    assert struct.unpack("=Q", data[m.HEADER_SIZE:])[0] == 5 and fds == [9]


def test_mem_table_is_sized_by_its_region_count() -> None:
    data, _ = m.SetMemTable(regions=(REGION,), fds=(3,)).encode()
    assert m.Header.unpack(data).size == 8 + 32


def test_mem_table_padded_to_eight_regions_by_other_front_ends_decodes() -> None:
    payload = struct.pack("=II", 1, 0) + REGION.pack() + bytes(7 * 32)
    msg = m.decode_request(m.Header(FR.SET_MEM_TABLE, 1, len(payload)), payload, [7])
    assert msg == m.SetMemTable(regions=(REGION,), fds=(7,))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: m.SetVringKick(index=256, fd=None),
        lambda: m.SetMemTable(regions=(REGION,) * 9, fds=tuple(range(3, 12))),
        lambda: m.SetMemTable(regions=(REGION,), fds=()),
        lambda: m.SetVringNum(index=2**32, num=0),
        lambda: m.SetLogFd(fd=-1),
        lambda: m.SendRarp(mac=b"\x00"),
        lambda: m.SetConfig(offset=0, data=bytes(257)),
    ],
    ids=["vring-index-256", "nine-regions", "region-without-fd", "u32-overflow", "negative-fd",
         "short-mac", "config-too-big"],
)
def test_unrepresentable_messages_are_local_errors_at_encode(bad: Callable[[], m.Message]) -> None:
    with pytest.raises(VhostUserLocalError):
        bad().encode()


# ---------------------------------------------------------------------------------------------
# Messages through the state machines, with real fds


@pytest.mark.parametrize("index", range(len(request_examples(fake_fds()))))
def test_every_request_crosses_from_frontend_to_backend_with_its_fds(new_fd: MakeFd, index: int) -> None:
    msg = request_examples(new_fd)[index]
    f, b = handshake()
    deliver(f.send(msg), b)
    got = b.next_event()
    assert got == msg
    assert b.next_event() is NEED_DATA
    for fd in got._fds():
        assert is_open(fd)  # ownership passed to the caller, not closed


@pytest.mark.parametrize(
    "request_, reply",
    [
        (m.GetQueueNum(), m.QueueNumReply(2)),
        (m.GetMaxMemSlots(), m.MaxMemSlotsReply(32)),
        (m.GetStatus(), m.StatusReply(7)),
        (m.GetVringBase(index=0), m.VringBaseReply(0, 99)),
        (m.GetConfig(offset=4, size=8), m.ConfigReply(offset=4, data=b"12345678")),
        (m.IotlbMsg(iova=0, size=1, uaddr=0, perm=1, type=3), m.Ack(FR.IOTLB_MSG)),
        (m.SetVringNum(index=0, num=8, need_reply=True), m.Ack(FR.SET_VRING_NUM)),
    ],
    ids=lambda x: type(x).__name__,
)
def test_replies_cross_from_backend_to_frontend(request_: m.Request, reply: m.Reply) -> None:
    f, b = handshake()
    deliver(f.send(request_), b)
    b.next_event()
    assert b.reply_owed is request_.REQUEST and f.awaiting_reply is request_.REQUEST
    deliver(b.send(reply), f)
    assert f.next_event() == reply
    assert f.awaiting_reply is None and b.reply_owed is None


def test_inflight_fd_reply_carries_its_fd_to_the_frontend(new_fd: MakeFd) -> None:
    f, b = handshake()
    deliver(f.send(m.GetInflightFd(num_queues=1, queue_size=128)), b)
    b.next_event()
    reply = m.InflightFdReply(mmap_size=4096, mmap_offset=0, num_queues=1, queue_size=128, fd=new_fd())
    deliver(b.send(reply), f)
    assert f.next_event() == reply


def test_set_log_base_is_acked_once_log_shmfd_is_negotiated(new_fd: MakeFd) -> None:
    f, b = handshake()
    deliver(f.send(m.SetLogBase(mmap_size=4096, mmap_offset=0, fd=new_fd())), b)
    b.next_event()
    assert b.reply_owed is FR.SET_LOG_BASE
    deliver(b.send(m.Ack(FR.SET_LOG_BASE)), f)
    assert f.next_event() == m.Ack(FR.SET_LOG_BASE)


def test_requests_without_need_reply_expect_no_reply() -> None:
    f, b = handshake()
    deliver(f.send(m.SetVringNum(index=0, num=256)), b)
    b.next_event()
    assert f.awaiting_reply is None and b.reply_owed is None


# ---------------------------------------------------------------------------------------------
# Framing: partial data, several messages per chunk


def test_stream_fed_byte_by_byte_yields_the_same_messages(new_fd: MakeFd) -> None:
    f, b = handshake()
    sent = [m.SetVringNum(index=0, num=256), m.SetVringCall(index=0, fd=new_fd()),
            m.SetMemTable(regions=(REGION,), fds=(new_fd(),)), m.SetVringKick(index=0, fd=None)]
    received = []
    for msg in sent:
        data, fds = f.send(msg)
        for i in range(len(data)):
            # The kernel attaches SCM_RIGHTS to the first byte of the message.
            b.receive_data(data[i : i + 1], fds if i == 0 else [])
            event = b.next_event()
            if event is not NEED_DATA:
                assert i == len(data) - 1
                received.append(event)
    assert received == sent


def test_two_messages_in_one_chunk_yield_both_and_fds_go_to_the_one_holding_the_last_byte(
    new_fd: MakeFd,
) -> None:
    f, b = handshake()
    first = m.SetVringNum(index=0, num=256)
    second = m.SetVringCall(index=0, fd=new_fd())
    d1, _ = f.send(first)
    d2, fds2 = f.send(second)
    b.receive_data(d1 + d2, fds2)
    assert b.next_event() == first
    assert b.next_event() == second
    assert b.next_event() is NEED_DATA


def test_truncated_header_needs_more_data_and_is_an_error_at_eof() -> None:
    b = BackendConnection()
    b.receive_data(header(FR.GET_FEATURES, 0)[:11])
    assert b.next_event() is NEED_DATA
    b.receive_data(b"")
    with pytest.raises(VhostUserRemoteError, match="middle of a message"):
        b.next_event()
    assert b.state is ConnectionState.ERROR


def test_incomplete_payload_waits_for_the_rest() -> None:
    b = BackendConnection()
    data, _ = m.GetFeatures().encode()
    b.receive_data(data)
    b.next_event()
    data, _ = m.SetFeatures(features=0).encode()
    b.receive_data(data[:-3])
    assert b.next_event() is NEED_DATA
    b.receive_data(data[-3:])
    assert b.next_event() == m.SetFeatures(features=0)


def test_payload_shorter_than_the_message_type_needs_is_a_remote_error() -> None:
    b = BackendConnection()
    b.receive_data(header(FR.SET_FEATURES, 4) + b"\0\0\0\0")
    with pytest.raises(VhostUserRemoteError, match="truncated"):
        b.next_event()


def test_payload_longer_than_the_message_type_allows_is_refused_from_the_header() -> None:
    b = BackendConnection()
    b.receive_data(header(FR.SET_FEATURES, 16))  # the payload never needs to arrive
    with pytest.raises(VhostUserRemoteError, match="at most 8"):
        b.next_event()


def test_payload_over_4096_bytes_is_refused_without_buffering_it() -> None:
    _, b = handshake()
    b.receive_data(header(FR.SET_CONFIG, 1 << 31))
    with pytest.raises(VhostUserRemoteError, match="payload of 2147483648 bytes"):
        b.next_event()


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3])
def test_header_version_other_than_1_is_a_remote_error(flags: int) -> None:
    b = BackendConnection()
    b.receive_data(header(FR.GET_FEATURES, 0, flags=flags))
    with pytest.raises(VhostUserRemoteError, match="version"):
        b.next_event()


@pytest.mark.parametrize("request_type", [0, 26, 44, 9999])
def test_unknown_or_unsupported_request_type_is_a_remote_error(request_type: int) -> None:
    # Decision (see protocol.py): every type beyond the base set is feature-gated, so an
    # unknown one means the front-end used a feature we never offered.
    b = BackendConnection()
    b.receive_data(header(request_type, 0))
    with pytest.raises(VhostUserRemoteError, match="request type"):
        b.next_event()


# ---------------------------------------------------------------------------------------------
# File descriptors


def test_fds_attached_to_a_message_that_takes_none_are_closed(new_fd: MakeFd) -> None:
    f, b = handshake()
    fds = [new_fd(), new_fd()]
    data, _ = m.SetVringNum(index=0, num=8).encode()
    b.receive_data(data, fds)
    with pytest.raises(VhostUserRemoteError, match="2 file descriptors, expected 0"):
        b.next_event()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_vring_call_without_fd_or_no_fd_flag_is_a_remote_error() -> None:
    f, b = handshake()
    data, _ = m.SetVringCall(index=0, fd=3).encode()
    b.receive_data(data, [])
    with pytest.raises(VhostUserRemoteError, match="0 file descriptors, expected 1"):
        b.next_event()


def test_mem_table_with_fewer_fds_than_regions_is_rejected_and_its_fds_closed(new_fd: MakeFd) -> None:
    f, b = handshake()
    data, _ = m.SetMemTable(regions=(REGION, REGION), fds=(1, 2)).encode()
    fd = new_fd()
    b.receive_data(data, [fd])
    with pytest.raises(VhostUserRemoteError, match="SET_MEM_TABLE"):
        b.next_event()
    assert not is_open(fd)


def test_rem_mem_reg_with_a_stray_fd_is_accepted_and_the_fd_closed(new_fd: MakeFd) -> None:
    f, b = handshake()
    data, _ = m.RemMemReg(region=REGION).encode()
    fd = new_fd()
    b.receive_data(data, [fd])
    assert b.next_event() == m.RemMemReg(region=REGION)
    assert not is_open(fd)


def test_buffered_fds_of_a_partial_message_are_closed_by_close(new_fd: MakeFd) -> None:
    f, b = handshake()
    data, _ = f.send(m.SetLogFd(fd=0))
    fd = new_fd()
    b.receive_data(data[:5], [fd])
    assert b.next_event() is NEED_DATA
    b.close()
    assert not is_open(fd)


def test_fds_still_buffered_when_the_connection_fails_are_closed(new_fd: MakeFd) -> None:
    b = BackendConnection()
    fd = new_fd()
    b.receive_data(header(FR.GET_FEATURES, 0, flags=0x2), [fd])
    with pytest.raises(VhostUserRemoteError):
        b.next_event()
    assert not is_open(fd)
    later = new_fd()
    b.receive_data(b"more", [later])  # draining after the error still releases fds
    assert not is_open(later)


# ---------------------------------------------------------------------------------------------
# Replies


def test_reply_without_an_outstanding_request_is_a_remote_error() -> None:
    f = FrontendConnection()
    deliver(m.FeaturesReply(0).encode(), f)
    with pytest.raises(VhostUserRemoteError, match="no request outstanding"):
        f.next_event()


def test_reply_of_a_different_request_type_is_a_remote_error() -> None:
    f = FrontendConnection()
    f.send(m.GetFeatures())
    deliver(m.ProtocolFeaturesReply(0).encode(), f)
    with pytest.raises(VhostUserRemoteError, match="waiting for the reply to GET_FEATURES"):
        f.next_event()


def test_request_arriving_at_the_frontend_on_the_main_socket_is_a_remote_error() -> None:
    f = FrontendConnection()
    f.send(m.GetFeatures())
    deliver(m.GetFeatures().encode(), f)
    with pytest.raises(VhostUserRemoteError, match="may only reply"):
        f.next_event()


def test_reply_arriving_at_the_backend_is_a_remote_error() -> None:
    b = BackendConnection()
    deliver(m.FeaturesReply(0).encode(), b)
    with pytest.raises(VhostUserRemoteError, match="may only send requests"):
        b.next_event()


def test_reply_ack_nonzero_raises_request_failed_naming_the_request_and_connection_survives() -> None:
    f, b = handshake()
    deliver(f.send(m.SetVringNum(index=0, num=256, need_reply=True)), b)
    b.next_event()
    deliver(b.send(m.Ack(FR.SET_VRING_NUM, 1)), f)
    with pytest.raises(VhostUserRequestFailed, match="SET_VRING_NUM") as info:
        f.next_event()
    assert info.value.request is FR.SET_VRING_NUM and info.value.status == 1
    assert isinstance(info.value, VhostUserRemoteError)
    assert f.state is ConnectionState.OPEN
    deliver(f.send(m.GetStatus()), b)
    b.next_event()
    deliver(b.send(m.StatusReply(0)), f)
    assert f.next_event() == m.StatusReply(0)


def test_empty_get_config_reply_is_reported_as_request_failed() -> None:
    f, b = handshake()
    deliver(f.send(m.GetConfig(offset=0, size=8)), b)
    b.next_event()
    deliver(b.send(m.ConfigReply(offset=0, data=b"")), f)
    with pytest.raises(VhostUserRequestFailed, match="GET_CONFIG"):
        f.next_event()


def test_get_config_reply_of_the_wrong_size_is_a_remote_error() -> None:
    f, _ = handshake()
    f.send(m.GetConfig(offset=0, size=8))
    deliver(m.ConfigReply(offset=0, data=b"1234").encode(), f)
    with pytest.raises(VhostUserRemoteError, match="8 were requested"):
        f.next_event()


def test_peer_closing_with_a_reply_outstanding_is_a_remote_error() -> None:
    f = FrontendConnection()
    f.send(m.GetFeatures())
    f.receive_data(b"")
    with pytest.raises(VhostUserRemoteError, match="before replying to GET_FEATURES"):
        f.next_event()


def test_clean_eof_yields_peer_closed() -> None:
    b = BackendConnection()
    b.receive_data(b"")
    assert b.next_event() is PEER_CLOSED
    assert b.state is ConnectionState.CLOSED


def test_connection_in_error_keeps_raising() -> None:
    b = BackendConnection()
    b.receive_data(header(FR.GET_FEATURES, 0, flags=0))
    for _ in range(2):
        with pytest.raises(VhostUserRemoteError):
            b.next_event()
    assert b.state is ConnectionState.ERROR


def test_backend_refuses_to_send_a_reply_nobody_asked_for() -> None:
    b = BackendConnection()
    with pytest.raises(VhostUserLocalError, match="no request awaits a reply"):
        b.send(m.FeaturesReply(0))


def test_backend_refuses_to_send_a_reply_of_the_wrong_kind() -> None:
    _, b = handshake()
    deliver(m.GetQueueNum().encode(), b)
    b.next_event()
    with pytest.raises(VhostUserLocalError, match="QueueNumReply"):
        b.send(m.Ack(FR.GET_QUEUE_NUM, 0))
    with pytest.raises(VhostUserLocalError):
        b.send(m.StatusReply(0))


def test_backend_refuses_a_config_reply_of_the_wrong_size() -> None:
    _, b = handshake()
    deliver(m.GetConfig(offset=0, size=8).encode(), b)
    b.next_event()
    with pytest.raises(VhostUserLocalError, match="8 were requested"):
        b.send(m.ConfigReply(offset=0, data=b"1"))


def test_frontend_refuses_to_send_replies() -> None:
    with pytest.raises(VhostUserLocalError, match="can only send"):
        FrontendConnection().send(m.FeaturesReply(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Ordering and feature negotiation


def test_mem_table_before_set_owner_is_refused_locally_by_the_frontend() -> None:
    f = FrontendConnection()
    with pytest.raises(VhostUserLocalError, match="SET_MEM_TABLE before SET_OWNER"):
        f.send(m.SetMemTable(regions=(), fds=()))


def test_mem_table_before_set_owner_is_a_remote_error_at_the_backend(new_fd: MakeFd) -> None:
    b = BackendConnection()
    fd = new_fd()
    deliver((m.SetMemTable(regions=(REGION,), fds=(fd,)).encode()[0], [fd]), b)
    with pytest.raises(VhostUserRemoteError, match="before SET_OWNER"):
        b.next_event()
    assert not is_open(fd)


def test_feature_queries_are_allowed_before_set_owner_as_qemu_sends_them() -> None:
    f, b = handshake()  # GET_FEATURES, GET/SET_PROTOCOL_FEATURES all precede SET_OWNER
    assert f.owner_set and b.owner_set


def test_get_protocol_features_before_the_features_reply_is_refused() -> None:
    with pytest.raises(VhostUserLocalError, match="has not arrived"):
        FrontendConnection().send(m.GetProtocolFeatures())


def test_get_protocol_features_is_refused_if_the_backend_lacks_bit_30() -> None:
    f, _ = handshake(virtio_features=1 << 32)
    with pytest.raises(VhostUserLocalError, match="lacks it"):
        f.send(m.GetProtocolFeatures())


def test_backend_rejects_get_protocol_features_when_it_did_not_offer_bit_30() -> None:
    _, b = handshake(virtio_features=1 << 32)
    deliver(m.GetProtocolFeatures().encode(), b)
    with pytest.raises(VhostUserRemoteError, match="VHOST_USER_F_PROTOCOL_FEATURES"):
        b.next_event()


def test_negotiated_protocol_features_are_the_intersection() -> None:
    f, b = handshake(protocol_features=PF.MQ | PF.REPLY_ACK | PF.CONFIG)
    # handshake() negotiated everything it offered; check the helper directly too
    assert f.negotiate_protocol_features(PF.MQ | PF.STATUS) == PF.MQ
    assert f.protocol_features == b.protocol_features == PF.MQ | PF.REPLY_ACK | PF.CONFIG
    assert f.negotiate_features(VIRTIO_FEATURES | 1) == VIRTIO_FEATURES


def test_frontend_refuses_to_set_protocol_features_the_backend_did_not_offer() -> None:
    f, _ = handshake(protocol_features=PF.MQ)
    with pytest.raises(VhostUserLocalError, match="did not offer"):
        f.send(m.SetProtocolFeatures(features=PF.MQ | PF.STATUS))


def test_backend_rejects_protocol_features_it_did_not_offer() -> None:
    _, b = handshake(protocol_features=PF.MQ)
    deliver(m.SetProtocolFeatures(features=PF.STATUS).encode(), b)
    with pytest.raises(VhostUserRemoteError, match="did not offer"):
        b.next_event()


def test_backend_rejects_virtio_features_it_did_not_offer() -> None:
    _, b = handshake()
    deliver(m.SetFeatures(features=1 << 40).encode(), b)
    with pytest.raises(VhostUserRemoteError, match="did not offer"):
        b.next_event()


def test_feature_gated_request_is_refused_until_negotiated() -> None:
    f, b = handshake(protocol_features=PF.REPLY_ACK)
    with pytest.raises(VhostUserLocalError, match="GET_QUEUE_NUM needs protocol feature MQ"):
        f.send(m.GetQueueNum())
    deliver(m.GetQueueNum().encode(), b)
    with pytest.raises(VhostUserRemoteError, match="MQ"):
        b.next_event()


def test_need_reply_without_reply_ack_is_refused_locally() -> None:
    f, _ = handshake(protocol_features=PF.MQ)
    with pytest.raises(VhostUserLocalError, match="REPLY_ACK"):
        f.send(m.SetVringNum(index=0, num=8, need_reply=True))


def test_backend_owes_no_ack_when_reply_ack_is_not_negotiated() -> None:
    _, b = handshake(protocol_features=PF.MQ)
    deliver(m.SetVringNum(index=0, num=8, need_reply=True).encode(), b)
    b.next_event()
    assert b.reply_owed is None


# ---------------------------------------------------------------------------------------------
# Back-end channel


def test_backend_channel_acks_need_reply_requests_when_reply_ack_is_negotiated(new_fd: MakeFd) -> None:
    sender, receiver = BackendRequestSender(reply_ack=True), BackendRequestReceiver(reply_ack=True)
    note = m.VringHostNotifier(index=0, size=4096, offset=0, fd=new_fd())
    deliver(sender.send(note), receiver)
    assert receiver.next_event() == note and receiver.reply_owed is None
    deliver(sender.send(m.ConfigChange(need_reply=True)), receiver)
    assert receiver.next_event() == m.ConfigChange(need_reply=True)
    deliver(receiver.send(m.BackendAck(m.BackendRequest.CONFIG_CHANGE_MSG, 5)), sender)
    with pytest.raises(VhostUserRequestFailed, match="CONFIG_CHANGE_MSG"):
        sender.next_event()


def test_backend_channel_refuses_need_reply_without_reply_ack() -> None:
    with pytest.raises(VhostUserLocalError, match="REPLY_ACK"):
        BackendRequestSender(reply_ack=False).send(m.ConfigChange(need_reply=True))


def test_backend_channel_refuses_main_socket_requests() -> None:
    with pytest.raises(VhostUserLocalError, match="BackendRequest"):
        BackendRequestSender(reply_ack=True).send(m.GetFeatures())


# ---------------------------------------------------------------------------------------------
# Property-based


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(m.MemoryRegion, u64, u64, u64, u64)


@st.composite
def mem_tables(draw: st.DrawFn) -> m.SetMemTable:
    rs = tuple(draw(st.lists(regions, max_size=m.MAX_MEM_REGIONS)))
    return m.SetMemTable(regions=rs, fds=tuple(range(100, 100 + len(rs))))


random_messages = st.one_of(
    st.builds(m.SetFeatures, u64, need_reply=st.booleans()),
    st.builds(m.SetVringAddr, u32, u32, u64, u64, u64, u64),
    st.builds(m.SetVringNum, u32, u32),
    st.builds(m.SetVringCall, st.integers(0, 255), st.one_of(st.none(), st.integers(0, 2**31 - 1))),
    st.builds(m.SetConfig, u32, st.binary(max_size=m.MAX_CONFIG_SIZE), flags=u32),
    st.builds(m.AddMemReg, regions, st.integers(0, 2**31 - 1)),
    mem_tables(),
    st.builds(m.VringBaseReply, u32, u32),
    st.builds(m.Ack, st.sampled_from(sorted(set(FR) - set(m.FRONTEND_REPLIES))), u64),
    st.builds(m.ConfigReply, u32, st.binary(max_size=m.MAX_CONFIG_SIZE), flags=u32),
)


@settings(deadline=None)  # a loaded host (or mutmut's tracing) makes one example slow
@given(random_messages)
def test_random_messages_round_trip(msg: m.Message) -> None:
    hdr, payload, fds = split(msg.encode())
    decoded = (m.decode_reply if hdr.is_reply else m.decode_request)(hdr, payload, fds)
    if isinstance(msg, m.ConfigReply) and not msg.data:
        assert decoded == m.ConfigReply(offset=0, data=b"")  # failure reply drops the fields
    else:
        assert decoded == msg


@st.composite
def hostile_streams(draw: st.DrawFn) -> list[bytes]:
    """Chunks of bytes: plausible headers with random payloads, or pure noise."""
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            request = draw(st.integers(0, 45))
            flags = draw(st.sampled_from([1, 5, 9, 13, 0, 2]) | u32)
            body = draw(st.binary(max_size=300))
            size = draw(st.sampled_from([len(body), 0, 8, 40, 264]) | u32)
            pieces.append(m.Header(request, flags, size).pack() + body)
        else:
            pieces.append(draw(st.binary(max_size=64)))
    stream = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


def _drain(conn) -> None:
    for _ in range(1000):
        try:
            event = conn.next_event()
        except VhostUserRemoteError:
            return
        if event is NEED_DATA:
            return
        assert isinstance(event, m.Message)
    raise AssertionError("next_event never returned NEED_DATA")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams())
def test_garbage_into_backend_only_raises_remote_errors(chunks: list[bytes]) -> None:
    _, b = handshake()
    for chunk in chunks:
        b.receive_data(chunk)
        _drain(b)
    b.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams())
def test_garbage_into_frontend_only_raises_remote_errors(chunks: list[bytes]) -> None:
    f, _ = handshake()
    for request in (m.GetVringBase(index=0), m.GetConfig(offset=0, size=8), m.GetFeatures()):
        f.send(request)
    for chunk in chunks:
        f.receive_data(chunk)
        _drain(f)
    f.close()


# ---------------------------------------------------------------------------------------------
# The one assumption about the kernel that the sans-IO layer depends on


def test_fd_attribution_matches_linux_unix_stream_recvmsg(new_fd: MakeFd) -> None:
    """Linux may merge a no-fd message with the next fd-carrying one into one recvmsg, and
    stops reading after it: the fds belong to the message holding the chunk's last byte."""
    import array
    import socket

    f, b = handshake()
    sent = [m.SetVringNum(index=0, num=256), m.SetVringCall(index=0, fd=new_fd()),
            m.SetVringNum(index=1, num=8), m.SetVringKick(index=0, fd=new_fd()),
            m.SetVringKick(index=1, fd=None)]
    a, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, c:
        for msg in sent:
            data, fds = f.send(msg)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            a.sendmsg([data], anc)
        a.shutdown(socket.SHUT_WR)
        received: list[m.Message] = []
        while True:
            data, anc, _, _ = c.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
            fds = array.array("i")
            for _, _, payload in anc:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            b.receive_data(data, list(fds))
            if not data:
                break
            while (event := b.next_event()) is not NEED_DATA:
                received.append(event)
    assert [type(x) for x in received] == [type(x) for x in sent]
    assert [getattr(x, "fd", None) is None for x in received] == [
        getattr(x, "fd", None) is None for x in sent
    ]
    for msg in received:
        if getattr(msg, "fd", None) is not None:
            os.close(msg.fd)
