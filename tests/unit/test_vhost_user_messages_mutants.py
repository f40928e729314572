"""vhost-user wire format (pymvm/vhost/user/messages.py): refusal texts, size and index
limits at their exact boundaries, and the decode paths scripts/mutation on the module showed
the round-trip tests leave unchecked."""

from __future__ import annotations

import re
import struct

import pytest

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserLocalError, VhostUserRemoteError
from pymvm.vhost.user.messages import BackendRequest as BR
from pymvm.vhost.user.messages import FrontendRequest as FR
from tests.unit.test_vhost_user_protocol_mutants import is_open, new_fd, pipe_fd  # noqa: F401 (a fixture)

REGION = m.MemoryRegion(guest_phys_addr=0x1000, memory_size=0x2000, userspace_addr=0x3000,
                        mmap_offset=0x4000)


def decode(cls, request: int, payload: bytes, fds: list[int] | None = None, flags: int = 1):
    return cls.decode(m.Header(request, flags, len(payload)), payload, list(fds or []))


# ---------------------------------------------------------------------------------------------
# Header, flags and the generic checks


def test_header_flags_give_version_reply_and_need_reply_bits() -> None:
    h = m.Header(1, 0x1 | 0x4 | 0x8, 0)
    assert (h.version, h.is_reply, h.need_reply) == (1, True, True)
    h = m.Header(1, 0x2, 0)
    assert (h.version, h.is_reply, h.need_reply) == (2, False, False)
    assert m.Header.unpack(m.Header(7, 0x5, 9).pack() + b"tail") == m.Header(7, 0x5, 9)


def test_requests_and_replies_carry_their_flags() -> None:
    assert m.Header.unpack(m.GetFeatures().encode()[0]).flags == 0x1
    assert m.Header.unpack(m.GetFeatures(need_reply=True).encode()[0]).flags == 0x9
    assert m.Header.unpack(m.FeaturesReply(0).encode()[0]).flags == 0x5


def test_negotiation_keeps_the_bits_both_sides_have() -> None:
    assert m.negotiate(0b1100, 0b1010) == 0b1000


def test_decode_takes_need_reply_from_the_header_for_requests_only() -> None:
    payload = struct.pack("=Q", 5)
    assert decode(m.SetFeatures, FR.SET_FEATURES, payload, flags=0x9) == m.SetFeatures(
        5, need_reply=True)
    assert decode(m.SetFeatures, FR.SET_FEATURES, payload, flags=0x1).need_reply is False
    assert decode(m.FeaturesReply, FR.GET_FEATURES, payload, flags=0x5) == m.FeaturesReply(5)


def test_wrong_fd_count_is_refused_naming_message_and_counts(pipe_fd) -> None:
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_LOG_FD arrived with 0 file descriptors, expected 1; the peer attached the "
            "wrong ancillary data")):
        decode(m.SetLogFd, FR.SET_LOG_FD, b"")
    with pytest.raises(VhostUserRemoteError, match="GET_FEATURES arrived with 1 file descriptors, "
                                                   "expected 0"):
        decode(m.GetFeatures, FR.GET_FEATURES, b"", [new_fd(pipe_fd)])


def test_fd_zero_is_a_file_descriptor_and_negative_or_non_int_are_not() -> None:
    assert m.SetLogFd(fd=0).encode()[1] == [0]
    with pytest.raises(VhostUserLocalError, match=re.escape(
            "SetLogFd: -1 is not a file descriptor; pass an open fd >= 0")):
        m.SetLogFd(fd=-1).encode()
    with pytest.raises(VhostUserLocalError, match=re.escape("SetLogFd: '3' is not a file descriptor")):
        m.SetLogFd(fd="3").encode()  # type: ignore[arg-type]


def test_field_too_big_for_its_wire_type_is_a_local_error_naming_request_and_class() -> None:
    with pytest.raises(VhostUserLocalError, match=r"^SET_VRING_NUM: a field does not fit its wire "
                                                  r"type \(.*\); check the values passed to "
                                                  r"SetVringNum$"):
        m.SetVringNum(index=1 << 32, num=0).encode()


def test_payload_sizes_at_the_limits_decode_and_one_byte_off_is_refused_with_the_numbers() -> None:
    ok = struct.pack("=II", 1, 2)
    assert decode(m.SetVringNum, FR.SET_VRING_NUM, ok) == m.SetVringNum(index=1, num=2)
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_VRING_NUM payload is truncated: 7 bytes, needs 8")):
        decode(m.SetVringNum, FR.SET_VRING_NUM, ok[:7])
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_VRING_NUM payload is 9 bytes, at most 8 allowed")):
        decode(m.SetVringNum, FR.SET_VRING_NUM, ok + b"\0")


# ---------------------------------------------------------------------------------------------
# Vring fd messages and the host notifier


def test_vring_index_255_fits_and_256_or_negative_is_refused_at_encode(pipe_fd) -> None:
    fd = new_fd(pipe_fd)
    data, sent = m.SetVringCall(index=255, fd=fd).encode()
    assert struct.unpack("=Q", data[12:])[0] == 255 and sent == [fd]
    assert struct.unpack("=Q", m.SetVringCall(index=0, fd=None).encode()[0][12:])[0] == 0x100
    for bad in (256, -1):
        with pytest.raises(VhostUserLocalError, match=re.escape(
                f"SET_VRING_CALL: vring index {bad} does not fit bits 0-7; vhost-user addresses "
                f"at most 256 vrings")):
            m.SetVringCall(index=bad, fd=None).encode()


def test_vring_fd_message_with_reserved_bits_is_refused_naming_the_value() -> None:
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_VRING_KICK sets reserved bits 0x201 beyond index and no-fd flag")):
        decode(m.SetVringKick, FR.SET_VRING_KICK, struct.pack("=Q", 0x201))


def test_vring_fd_message_decodes_index_and_fd_or_the_no_fd_flag(pipe_fd) -> None:
    fd = new_fd(pipe_fd)
    assert decode(m.SetVringErr, FR.SET_VRING_ERR, struct.pack("=Q", 0xFF), [fd]) == \
        m.SetVringErr(index=255, fd=fd)
    assert decode(m.SetVringErr, FR.SET_VRING_ERR, struct.pack("=Q", 0x107)) == \
        m.SetVringErr(index=7, fd=None)


def test_host_notifier_index_limits_and_reserved_bits(pipe_fd) -> None:
    data, _ = m.VringHostNotifier(index=255, size=1, offset=2, fd=None).encode()
    assert struct.unpack("=QQQ", data[12:]) == (0x1FF, 1, 2)
    with pytest.raises(VhostUserLocalError, match=re.escape(
            "VRING_HOST_NOTIFIER_MSG: vring index 256 > 255")):
        m.VringHostNotifier(index=256, size=0, offset=0, fd=None).encode()
    with pytest.raises(VhostUserLocalError, match="vring index -1 > 255"):
        m.VringHostNotifier(index=-1, size=0, offset=0, fd=None).encode()
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "VRING_HOST_NOTIFIER_MSG sets reserved bits 0x400")):
        decode(m.VringHostNotifier, BR.VRING_HOST_NOTIFIER_MSG, struct.pack("=QQQ", 0x400, 0, 0))
    fd = new_fd(pipe_fd)
    assert decode(m.VringHostNotifier, BR.VRING_HOST_NOTIFIER_MSG,
                  struct.pack("=QQQ", 3, 4096, 8192), [fd]) == \
        m.VringHostNotifier(index=3, size=4096, offset=8192, fd=fd)
    assert decode(m.VringHostNotifier, BR.VRING_HOST_NOTIFIER_MSG,
                  struct.pack("=QQQ", 0x103, 0, 0)).fd is None


# ---------------------------------------------------------------------------------------------
# Config space


def test_config_of_256_bytes_fits_and_257_is_refused_naming_the_sizes() -> None:
    data, _ = m.SetConfig(offset=4, data=bytes(256), flags=1).encode()
    assert struct.unpack_from("=III", data, 12) == (4, 256, 1)
    with pytest.raises(VhostUserLocalError, match=re.escape(
            "SET_CONFIG: 257 bytes of config space, at most 256 per message")):
        m.SetConfig(offset=0, data=bytes(257)).encode()
    with pytest.raises(VhostUserLocalError, match="GET_CONFIG: 257 bytes"):
        m.GetConfig(offset=0, size=257).encode()
    with pytest.raises(VhostUserLocalError, match="GET_CONFIG reply: 257 bytes"):
        m.ConfigReply(offset=0, data=bytes(257)).encode()


def test_config_whose_size_field_disagrees_with_its_bytes_is_refused() -> None:
    payload = struct.pack("=III", 0, 4, 0) + b"abc"
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_CONFIG says 4 bytes of config space but carries 3")):
        decode(m.SetConfig, FR.SET_CONFIG, payload)
    with pytest.raises(VhostUserRemoteError, match="GET_CONFIG says 4 bytes"):
        decode(m.GetConfig, FR.GET_CONFIG, payload)
    with pytest.raises(VhostUserRemoteError, match="GET_CONFIG reply says 4 bytes"):
        decode(m.ConfigReply, FR.GET_CONFIG, payload, flags=5)


def test_config_reply_empty_means_failure_and_a_short_header_is_refused() -> None:
    assert m.ConfigReply(offset=0, data=b"").encode()[0][12:] == b""
    failed = decode(m.ConfigReply, FR.GET_CONFIG, b"", flags=5)
    assert failed.failed and failed == m.ConfigReply(offset=0, data=b"", flags=0)
    assert not m.ConfigReply(offset=0, data=b"x").failed
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "GET_CONFIG reply payload is truncated: 11 bytes, needs 12 or none")):
        decode(m.ConfigReply, FR.GET_CONFIG, bytes(11), flags=5)
    good = decode(m.ConfigReply, FR.GET_CONFIG, struct.pack("=III", 8, 2, 1) + b"hi", flags=5)
    assert good == m.ConfigReply(offset=8, data=b"hi", flags=1)


def test_get_config_request_decodes_offset_size_and_flags() -> None:
    payload = struct.pack("=III", 16, 4, 1) + bytes(4)
    assert decode(m.GetConfig, FR.GET_CONFIG, payload) == m.GetConfig(offset=16, size=4, flags=1)


# ---------------------------------------------------------------------------------------------
# Memory table and regions


def test_mem_table_of_more_than_eight_regions_or_unmatched_fds_is_refused_at_encode(pipe_fd) -> None:
    with pytest.raises(VhostUserLocalError, match=re.escape(
            "SET_MEM_TABLE: 9 regions with 9 fds; pass at most 8 regions and exactly one fd per "
            "region")):
        m.SetMemTable(regions=(REGION,) * 9, fds=(0,) * 9).encode()
    with pytest.raises(VhostUserLocalError, match="2 regions with 1 fds"):
        m.SetMemTable(regions=(REGION,) * 2, fds=(0,)).encode()
    data, sent = m.SetMemTable(regions=(REGION,) * 8, fds=tuple(range(8))).encode()
    assert struct.unpack_from("=II", data, 12) == (8, 0) and sent == list(range(8))


def test_mem_table_decode_checks_count_size_and_fds(pipe_fd) -> None:
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_MEM_TABLE has 9 regions, at most 8 allowed")):
        decode(m.SetMemTable, FR.SET_MEM_TABLE, struct.pack("=II", 9, 0))
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_MEM_TABLE payload is 40 bytes for 2 regions, expected 72")):
        decode(m.SetMemTable, FR.SET_MEM_TABLE, struct.pack("=II", 2, 0) + REGION.pack())
    one = [new_fd(pipe_fd)]
    body = struct.pack("=II", 1, 0) + REGION.pack()
    assert decode(m.SetMemTable, FR.SET_MEM_TABLE, body, one) == m.SetMemTable((REGION,), tuple(one))
    padded = body + bytes(7 * 32)
    assert decode(m.SetMemTable, FR.SET_MEM_TABLE, padded, one).regions == (REGION,)
    with pytest.raises(VhostUserRemoteError, match="SET_MEM_TABLE arrived with 0 file descriptors"):
        decode(m.SetMemTable, FR.SET_MEM_TABLE, body)


def test_region_fields_are_packed_in_struct_order() -> None:
    assert REGION.pack() == struct.pack("=QQQQ", 0x1000, 0x2000, 0x3000, 0x4000)
    assert m.MemoryRegion.unpack_from(b"xx" + REGION.pack(), 2) == REGION


def test_add_and_rem_mem_reg_carry_the_region_after_a_u64_of_padding(pipe_fd) -> None:
    fd = new_fd(pipe_fd)
    data, sent = m.AddMemReg(region=REGION, fd=fd).encode()
    assert data[12:] == bytes(8) + REGION.pack() and sent == [fd]
    assert decode(m.AddMemReg, FR.ADD_MEM_REG, data[12:], [fd]) == m.AddMemReg(REGION, fd)
    assert decode(m.RemMemReg, FR.REM_MEM_REG, data[12:]) == m.RemMemReg(REGION)


def test_rem_mem_reg_closes_one_stray_fd_and_refuses_two(pipe_fd) -> None:
    payload = bytes(8) + REGION.pack()
    stray = new_fd(pipe_fd)
    assert decode(m.RemMemReg, FR.REM_MEM_REG, payload, [stray]) == m.RemMemReg(REGION)
    assert not is_open(stray)
    two = [new_fd(pipe_fd), new_fd(pipe_fd)]
    with pytest.raises(VhostUserRemoteError, match="REM_MEM_REG arrived with 2 file descriptors"):
        decode(m.RemMemReg, FR.REM_MEM_REG, payload, two)
    assert all(is_open(fd) for fd in two)


# ---------------------------------------------------------------------------------------------
# The other payloads


def test_log_base_decodes_size_offset_and_its_fd(pipe_fd) -> None:
    fd = new_fd(pipe_fd)
    msg = decode(m.SetLogBase, FR.SET_LOG_BASE, struct.pack("=QQ", 0x8000, 0x10), [fd])
    assert msg == m.SetLogBase(mmap_size=0x8000, mmap_offset=0x10, fd=fd)
    with pytest.raises(VhostUserRemoteError, match="SET_LOG_BASE arrived with 0"):
        decode(m.SetLogBase, FR.SET_LOG_BASE, struct.pack("=QQ", 1, 2))


def test_vring_addr_fields_are_in_the_kernel_struct_order() -> None:
    msg = m.SetVringAddr(index=1, flags=1, desc_user_addr=2, used_user_addr=3, avail_user_addr=4,
                         log_guest_addr=5)
    data = msg.encode()[0]
    assert struct.unpack("=IIQQQQ", data[12:]) == (1, 1, 2, 3, 4, 5)
    assert decode(m.SetVringAddr, FR.SET_VRING_ADDR, data[12:]) == msg
    with pytest.raises(VhostUserRemoteError, match="SET_VRING_ADDR arrived with 1"):
        decode(m.SetVringAddr, FR.SET_VRING_ADDR, data[12:], [0])


def test_vring_enable_is_any_nonzero_num_and_encodes_as_one() -> None:
    assert decode(m.SetVringEnable, FR.SET_VRING_ENABLE, struct.pack("=II", 2, 7)) == \
        m.SetVringEnable(index=2, enable=True)
    assert decode(m.SetVringEnable, FR.SET_VRING_ENABLE, struct.pack("=II", 2, 0)).enable is False
    assert struct.unpack("=II", m.SetVringEnable(index=3, enable=True).encode()[0][12:]) == (3, 1)
    assert struct.unpack("=II", m.SetVringEnable(index=3, enable=False).encode()[0][12:]) == (3, 0)
    with pytest.raises(VhostUserRemoteError, match="SET_VRING_ENABLE arrived with 1"):
        decode(m.SetVringEnable, FR.SET_VRING_ENABLE, struct.pack("=II", 0, 1), [0])


def test_rarp_mac_is_six_bytes_padded_to_a_u64() -> None:
    mac = bytes.fromhex("525400abcdef")
    assert m.SendRarp(mac=mac).encode()[0][12:] == mac + b"\0\0"
    assert decode(m.SendRarp, FR.SEND_RARP, mac + b"\xff\xff") == m.SendRarp(mac=mac)
    with pytest.raises(VhostUserLocalError, match=re.escape("SEND_RARP: MAC must be 6 bytes, got 5")):
        m.SendRarp(mac=mac[:5]).encode()
    with pytest.raises(VhostUserRemoteError, match="SEND_RARP arrived with 1"):
        decode(m.SendRarp, FR.SEND_RARP, mac + b"\0\0", [0])


def test_iotlb_is_padded_to_32_bytes_and_decodes_its_fields() -> None:
    msg = m.IotlbMsg(iova=1, size=2, uaddr=3, perm=4, type=5)
    data = msg.encode()[0]
    assert len(data) == 12 + 32
    assert data[12:] == struct.pack("=QQQBB", 1, 2, 3, 4, 5) + bytes(6)
    assert decode(m.IotlbMsg, FR.IOTLB_MSG, data[12:]) == msg
    assert decode(m.IotlbMsg, FR.IOTLB_MSG, data[12:38]) == msg  # the unpadded 26 bytes
    with pytest.raises(VhostUserRemoteError, match="IOTLB_MSG arrived with 1"):
        decode(m.IotlbMsg, FR.IOTLB_MSG, data[12:], [0])


def test_inflight_messages_are_padded_to_24_bytes_and_decode_their_fields(pipe_fd) -> None:
    get = m.GetInflightFd(num_queues=2, queue_size=256)
    data = get.encode()[0]
    assert data[12:] == struct.pack("=QQHH", 0, 0, 2, 256) + bytes(4)
    assert decode(m.GetInflightFd, FR.GET_INFLIGHT_FD, data[12:]) == get
    with pytest.raises(VhostUserRemoteError, match="GET_INFLIGHT_FD arrived with 1"):
        decode(m.GetInflightFd, FR.GET_INFLIGHT_FD, data[12:], [0])
    fd = new_fd(pipe_fd)
    body = struct.pack("=QQHH", 0x3000, 0x10, 2, 256)
    assert decode(m.SetInflightFd, FR.SET_INFLIGHT_FD, body, [fd]) == m.SetInflightFd(
        0x3000, 0x10, 2, 256, fd)
    assert decode(m.InflightFdReply, FR.GET_INFLIGHT_FD, body, [fd], flags=5) == m.InflightFdReply(
        0x3000, 0x10, 2, 256, fd)
    with pytest.raises(VhostUserRemoteError, match="GET_INFLIGHT_FD reply arrived with 0"):
        decode(m.InflightFdReply, FR.GET_INFLIGHT_FD, body, flags=5)
    with pytest.raises(VhostUserRemoteError, match="SET_INFLIGHT_FD arrived with 0"):
        decode(m.SetInflightFd, FR.SET_INFLIGHT_FD, body)


# ---------------------------------------------------------------------------------------------
# Acks and registries


def test_ack_names_its_request_and_is_ok_only_for_status_zero() -> None:
    assert m.Ack(FR.SET_OWNER, 0).ok and not m.Ack(FR.SET_OWNER, 1).ok
    assert m.Ack._name() == "ack"
    assert m.Ack._name(m.Header(FR.SET_OWNER, 5, 8)) == "SET_OWNER ack"
    assert m.Ack._name(m.Header(999, 5, 8)) == "request 999 ack"
    assert m.BackendAck._name(m.Header(BR.CONFIG_CHANGE_MSG, 5, 8)) == "CONFIG_CHANGE_MSG ack"
    with pytest.raises(VhostUserRemoteError, match=re.escape("ack for unknown request type 999")):
        decode(m.Ack, 999, bytes(8), flags=5)
    with pytest.raises(VhostUserRemoteError, match="SET_OWNER ack arrived with 1"):
        decode(m.Ack, FR.SET_OWNER, bytes(8), [0], flags=5)
    assert decode(m.Ack, FR.SET_OWNER, struct.pack("=Q", 7), flags=5) == m.Ack(FR.SET_OWNER, 7)


def test_unknown_request_types_are_refused_naming_the_channel_and_type() -> None:
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "unknown or unsupported front-end request type 999; the peer uses a message this "
            "implementation never negotiates")):
        m.frontend_request_type(m.Header(999, 1, 0))
    with pytest.raises(VhostUserRemoteError, match="unsupported back-end request type 999"):
        m.backend_request_type(m.Header(999, 1, 0))
    assert m.backend_request_type(m.Header(BR.VRING_CALL, 1, 8)) is m.BackendVringCall
    with pytest.raises(VhostUserRemoteError, match=re.escape("reply to unknown request type 999")):
        m.decode_reply(m.Header(999, 5, 8), bytes(8), [])


def test_decode_helpers_pick_the_class_from_the_header() -> None:
    assert m.decode_request(m.Header(FR.SET_OWNER, 1, 0), b"", []) == m.SetOwner()
    assert m.decode_reply(m.Header(FR.GET_FEATURES, 5, 8), struct.pack("=Q", 3), []) == \
        m.FeaturesReply(3)
    assert m.decode_reply(m.Header(FR.SET_OWNER, 5, 8), bytes(8), []) == m.Ack(FR.SET_OWNER, 0)
    assert m.frontend_reply_type(FR.SET_MEM_TABLE) is m.Ack
    assert m.frontend_reply_type(FR.GET_VRING_BASE) is m.VringBaseReply


def _examples() -> list[m.Message]:
    fd = 5
    return [
        m.SetFeatures(features=1), m.SetMemTable(regions=(REGION,), fds=(fd,)),
        m.SetLogBase(mmap_size=1, mmap_offset=0, fd=fd), m.SetLogFd(fd=fd),
        m.SetVringNum(index=0, num=8), m.SetVringAddr(index=0, flags=0, desc_user_addr=0,
                                                      used_user_addr=0, avail_user_addr=0,
                                                      log_guest_addr=0),
        m.SetVringBase(index=0, num=0), m.GetVringBase(index=0), m.SetVringKick(index=0, fd=fd),
        m.SetVringCall(index=0, fd=None), m.SetVringErr(index=0, fd=fd),
        m.SetProtocolFeatures(features=1), m.SetVringEnable(index=0, enable=True),
        m.SendRarp(mac=bytes(6)), m.NetSetMtu(mtu=1500), m.SetBackendReqFd(fd=fd),
        m.IotlbMsg(iova=0, size=0, uaddr=0, perm=0, type=0), m.SetVringEndian(index=0, num=0),
        m.GetConfig(offset=0, size=4), m.SetConfig(offset=0, data=b"ab"),
        m.GetInflightFd(num_queues=1, queue_size=8),
        m.SetInflightFd(mmap_size=1, mmap_offset=0, num_queues=1, queue_size=8, fd=fd),
        m.GpuSetSocket(fd=fd), m.VringKick(index=0), m.AddMemReg(region=REGION, fd=fd),
        m.SetStatus(status=1), m.GetFeatures(),
        m.FeaturesReply(features=1), m.ProtocolFeaturesReply(features=1),
        m.QueueNumReply(num_queues=1), m.MaxMemSlotsReply(slots=8), m.StatusReply(status=1),
        m.VringBaseReply(index=0, num=0), m.ConfigReply(offset=0, data=b"ab"),
        m.InflightFdReply(mmap_size=1, mmap_offset=0, num_queues=1, queue_size=8, fd=fd),
        m.BackendIotlbMsg(iova=0, size=0, uaddr=0, perm=0, type=0), m.ConfigChange(),
        m.VringHostNotifier(index=0, size=0, offset=0, fd=fd), m.BackendVringCall(index=0),
        m.BackendVringErr(index=0),
    ]


@pytest.mark.parametrize("msg", _examples(), ids=lambda msg: type(msg).__name__)
def test_a_message_with_one_fd_too_many_is_refused_naming_it_exactly(msg: m.Message) -> None:
    data, fds = msg.encode()
    header = m.Header.unpack(data)
    name = type(msg).REQUEST.name + (" reply" if msg.IS_REPLY else "")
    wrong = [*fds, 1000]
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            f"{name} arrived with {len(wrong)} file descriptors, expected {len(fds)}; ")):
        type(msg).decode(header, data[12:], wrong)


def test_config_reply_of_a_bare_config_header_decodes_with_no_data() -> None:
    reply = decode(m.ConfigReply, FR.GET_CONFIG, struct.pack("=III", 4, 0, 1), flags=5)
    assert reply == m.ConfigReply(offset=4, data=b"", flags=1)


def test_region_is_read_from_the_start_of_the_data_by_default() -> None:
    assert m.MemoryRegion.unpack_from(REGION.pack()) == REGION


def test_rem_mem_reg_encodes_zero_padding_before_the_region() -> None:
    assert m.RemMemReg(region=REGION).encode()[0][12:] == bytes(8) + REGION.pack()


def test_truncated_ack_names_the_request_it_answers() -> None:
    with pytest.raises(VhostUserRemoteError, match=re.escape(
            "SET_OWNER ack payload is truncated: 4 bytes, needs 8")):
        decode(m.Ack, FR.SET_OWNER, bytes(4), flags=5)


def test_mem_table_of_exactly_eight_regions_and_config_of_256_bytes_decode() -> None:
    body = struct.pack("=II", 8, 0) + REGION.pack() * 8
    table = decode(m.SetMemTable, FR.SET_MEM_TABLE, body, list(range(100, 108)))
    assert table.regions == (REGION,) * 8 and table.fds == tuple(range(100, 108))
    config = decode(m.SetConfig, FR.SET_CONFIG, struct.pack("=III", 0, 256, 0) + bytes(256))
    assert config.data == bytes(256)
