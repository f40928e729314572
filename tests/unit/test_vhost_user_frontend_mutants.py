"""vhost-user front-end behaviour the mutation run of issue 16 found unchecked (docs/mutation.md):
the config space (GET/SET_CONFIG) and SEND_RARP, replies asked for every request once
REPLY_ACK is on (so a refusal is seen), memory tables at the back-end's slot limits, the used
index read from guest memory when the back-end cannot say, and the error texts that tell the
operator what to do."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pymvm.memory import GuestMemory, MemoryRegion
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.frontend import (
    DRIVER_OK_STATUS,
    VhostUserFrontendError,
    VhostUserNetBackend,
    _read_u16,
)
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import BackendConnection
from pymvm.vhost.user.socket_io import send_with_fds
from tests.unit import test_vhost_user_frontend as base
from tests.unit.test_vhost_user_frontend import (
    BACKEND_FEATURES,
    BACKEND_PROTOCOL,
    QUEUE_SIZE,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    FakeBackend,
    Received,
    connect,
    context,
    write_used_idx,
)

# The fixtures of test_vhost_user_frontend.py, shared.
eventfds, frontends, memory, sock_dir = base.eventfds, base.frontends, base.memory, base.sock_dir

CONFIG = bytes(range(64))


class ConfigBackend(FakeBackend):
    """The fake back-end with a config space, a SEND_RARP handler and a slot count to offer."""

    def __init__(self, path: str, *, slots: int = 32, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.slots = slots
        self.config = bytearray(CONFIG)
        self.hang_up_on: set[FR] = set()
        self.hung_up = False

    def _handle(self, conn: BackendConnection, sock, msg: m.Request) -> None:
        request = FR(msg.REQUEST)
        if request in self.hang_up_on or self.hung_up:  # die with the request unanswered
            self.hung_up = True  # and ignore what was sent after it
            sock.shutdown(socket.SHUT_RDWR)
            return
        if request is FR.GET_MAX_MEM_SLOTS:
            reply: m.Reply = m.MaxMemSlotsReply(self.slots)
        elif request is FR.GET_INFLIGHT_FD:
            assert isinstance(msg, m.GetInflightFd)
            from pymvm.vhost.user.inflight import region_size

            size = region_size(msg.num_queues, msg.queue_size)
            fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            reply = m.InflightFdReply(size, 0, msg.num_queues, msg.queue_size, fd)
            with self.changed:
                self.received.append(Received(msg, ()))
                self.changed.notify_all()
            send_with_fds(sock, *conn.send(reply))
            os.close(fd)
            return
        elif request is FR.GET_CONFIG:
            assert isinstance(msg, m.GetConfig)
            data = (b"" if request in self.refuse
                    else bytes(self.config[msg.offset:msg.offset + msg.size]))
            reply = m.ConfigReply(msg.offset, data, msg.flags)
        else:
            super()._handle(conn, sock, msg)
            return
        with self.changed:
            self.received.append(Received(msg, ()))
            self.changed.notify_all()
        send_with_fds(sock, *conn.send(reply))


@pytest.fixture
def make(sock_dir: str) -> Iterator:
    made: list[FakeBackend] = []

    def build(**kwargs) -> ConfigBackend:
        fake = ConfigBackend(os.path.join(sock_dir, "vu.sock"), **kwargs).start()
        made.append(fake)
        return fake

    yield build
    for fake in made:
        fake.kill()


def sent(fake: FakeBackend, request: FR) -> list[m.Request]:
    return [r.message for r in fake.messages(request)]


# ---- config space ----------------------------------------------------------------------------


def test_config_space_is_read_and_written_through_get_and_set_config(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fe = connect(fake, frontends)
    assert fe.get_config(8, 4) == CONFIG[8:12]
    fe.set_config(2, b"\xaa\xbb")
    fake.wait_for(lambda: FR.SET_CONFIG in fake.requests())
    (msg,) = sent(fake, FR.SET_CONFIG)
    assert isinstance(msg, m.SetConfig)
    assert (msg.offset, msg.data, msg.need_reply) == (2, b"\xaa\xbb", True)


def test_config_write_refused_by_the_back_end_does_not_raise(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fake.refuse.add(FR.SET_CONFIG)
    fe = connect(fake, frontends)
    fe.set_config(0, b"\x01")  # the guest's config write must not fail the vCPU
    assert fe.get_config(0, 2) == CONFIG[:2]  # and the connection is still usable


def test_config_of_a_back_end_without_a_config_space_is_neither_read_nor_written(
        make, frontends) -> None:
    fake = make()
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.get_config(0, 4)
    assert str(refused.value) == (
        f"the vhost-user back-end at {fake.path} does not offer VHOST_USER_PROTOCOL_F_CONFIG: it "
        "has no config space to read")
    fe.set_config(0, b"\x01")
    assert FR.GET_CONFIG not in fake.requests() and FR.SET_CONFIG not in fake.requests()


def test_config_read_refused_by_the_back_end_names_size_and_offset(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fake.refuse.add(FR.GET_CONFIG)
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.get_config(16, 4)
    assert str(refused.value) == "the vhost-user back-end refused GET_CONFIG of 4 bytes at 16"


def wait_disconnected(fe: VhostUserNetBackend) -> None:
    deadline = time.monotonic() + 5
    while fe.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fe.connected


def test_config_read_from_a_back_end_that_hangs_up_is_an_error_and_drops_the_link(
        make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fake.hang_up_on.add(FR.GET_CONFIG)
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as lost:
        fe.get_config(0, 4)
    assert str(lost.value).endswith("; check the back-end's log")
    wait_disconnected(fe)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.get_config(0, 4)
    assert str(refused.value) == (
        f"vhost-user back-end {fake.path} is not connected: no config space")
    fe.set_config(0, b"\x01")  # dropped, not raised


def test_config_write_to_a_back_end_that_hangs_up_drops_the_link(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fake.hang_up_on.add(FR.SET_CONFIG)
    fe = connect(fake, frontends)
    fe.set_config(0, b"\x01")
    wait_disconnected(fe)


# ---- SEND_RARP -------------------------------------------------------------------------------


MAC = bytes.fromhex("52540012ab01")


def test_announce_sends_the_mac_when_the_back_end_offers_rarp(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.RARP)
    fe = connect(fake, frontends)
    assert fe.announce(MAC) is True
    fake.wait_for(lambda: FR.SEND_RARP in fake.requests())
    (msg,) = sent(fake, FR.SEND_RARP)
    assert isinstance(msg, m.SendRarp) and bytes(msg.mac) == MAC


def test_announce_is_skipped_without_rarp(make, frontends) -> None:
    fake = make()
    fe = connect(fake, frontends)
    assert fe.announce(MAC) is False
    assert FR.SEND_RARP not in fake.requests()


def test_announce_without_a_connected_back_end_is_skipped(make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.RARP)
    fe = connect(fake, frontends)
    fake.kill()
    wait_disconnected(fe)
    assert fe.announce(MAC) is False


# ---- replies asked for, and what a back-end without protocol features gets --------------------


def test_with_reply_ack_every_request_without_a_reply_of_its_own_asks_for_one(
        make, frontends, memory, eventfds) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIGURE_MEM_SLOTS)
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    fe.stop()
    replied = {FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES, FR.GET_QUEUE_NUM,
               FR.GET_MAX_MEM_SLOTS, FR.GET_VRING_BASE}
    unasked = [FR(r.message.REQUEST).name for r in fake.received
               if FR(r.message.REQUEST) not in replied | {FR.SET_PROTOCOL_FEATURES}
               and not r.message.need_reply]
    assert unasked == []
    assert [msg.enable for msg in sent(fake, FR.SET_VRING_ENABLE)] == [True, True, False, False]
    assert [msg.status for msg in sent(fake, FR.SET_STATUS)] == [DRIVER_OK_STATUS, 0]
    assert len(sent(fake, FR.ADD_MEM_REG)) == len(memory.regions)


def test_rings_are_handed_over_without_dirty_logging(make, frontends, memory, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    for msg in sent(fake, FR.SET_VRING_ADDR):
        assert (msg.flags, msg.log_guest_addr) == (0, 0)


def test_back_end_without_protocol_features_is_stopped_without_set_vring_enable(
        make, frontends, memory, eventfds) -> None:
    fake = make(features=BACKEND_FEATURES & ~m.PROTOCOL_FEATURES_FLAG)
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    fe.stop()
    assert FR.SET_VRING_ENABLE not in fake.requests()
    assert len(sent(fake, FR.GET_VRING_BASE)) == 2


# ---- memory tables at the limits -------------------------------------------------------------


def split(memory: GuestMemory, count: int, size: int = 0x40000) -> list[MemoryRegion]:
    """``count`` regions of ``size`` bytes carved from the guest's first region."""
    (first, *_) = memory.regions
    return [MemoryRegion(first.gpa + i * size, size, first.fd, first.fd_offset + i * size,
                         first.host_addr + i * size, first._map,
                         first.view[i * size:(i + 1) * size]) for i in range(count)]


def test_as_many_regions_as_the_back_end_has_slots_are_added_and_one_more_is_refused(
        make, frontends, memory, eventfds) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIGURE_MEM_SLOTS, slots=3)
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), split(memory, 3))
    assert len(sent(fake, FR.ADD_MEM_REG)) == 3
    fe.stop()
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.activate(context(eventfds, memory), split(memory, 4))
    assert str(refused.value) == ("guest memory has 4 regions, the back-end takes at most 3 "
                                  "(GET_MAX_MEM_SLOTS)")


def test_set_mem_table_carries_eight_regions_and_a_ninth_is_refused(
        make, frontends, memory, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), split(memory, m.MAX_MEM_REGIONS, 0x20000))
    (table,) = sent(fake, FR.SET_MEM_TABLE)
    assert len(table.regions) == m.MAX_MEM_REGIONS
    fe.stop()
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.activate(context(eventfds, memory), split(memory, m.MAX_MEM_REGIONS + 1, 0x20000))
    assert str(refused.value) == (
        f"guest memory has {m.MAX_MEM_REGIONS + 1} regions, SET_MEM_TABLE carries at most "
        f"{m.MAX_MEM_REGIONS}; the back-end lacks CONFIGURE_MEM_SLOTS")


@dataclass
class Anonymous:
    gpa: int = 0
    size: int = 0x400000
    host_addr: int = 0x7F0000000000
    fd_offset: int = 0


def test_guest_memory_without_an_fd_is_refused_before_the_back_end_hears_of_it(
        make, frontends, eventfds, memory) -> None:
    fake = make()
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.activate(context(eventfds, memory), [Anonymous()])
    assert str(refused.value) == (
        "guest memory at GPA 0x0 has no file descriptor: a vhost-user back-end maps guest RAM "
        "through a shared memfd/hugetlbfs fd; anonymous or private memory cannot be shared "
        "(use pymvm.memory.GuestMemory)")
    assert FR.SET_MEM_TABLE not in fake.requests()


# ---- the used index, read from guest memory ----------------------------------------------------


@dataclass
class Raw:
    """Guest memory known only by its host address (no memoryview)."""

    host_addr: int
    size: int


def test_u16_is_read_at_both_ends_of_a_region_and_nowhere_outside(memory: GuestMemory) -> None:
    (region, *_) = memory.regions
    memory.write(0, b"\x34\x12\xff")
    memory.write(region.size - 2, b"\x78\x56")
    base = region.host_addr
    assert _read_u16([region], base) == 0x1234  # a u16, not three bytes
    assert _read_u16([region], base + region.size - 2) == 0x5678
    buf = (ctypes.c_uint8 * 4)(0xCD, 0xAB, 0x00, 0x00)
    raw = Raw(ctypes.addressof(buf), 4)
    assert _read_u16([raw], raw.host_addr) == 0xABCD
    for outside in (base - 1, base + region.size - 1):
        with pytest.raises(VhostUserFrontendError) as refused:
            _read_u16([region], outside)
        assert str(refused.value) == f"host address {outside:#x} is not inside guest memory"


def test_stop_without_a_back_end_resumes_at_the_used_index_in_guest_memory(
        make, frontends, memory, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    write_used_idx(memory, 0, 7)
    write_used_idx(memory, 1, 9)
    fake.kill()
    deadline = time.monotonic() + 5
    while fe.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    positions = fe.stop()
    assert {q: (p.next_avail, p.used_idx) for q, p in positions.items()} == {0: (7, 7), 1: (9, 9)}


# ---- connection set-up -----------------------------------------------------------------------


def test_wait_connected_gives_up_after_its_timeout(make, frontends) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fake.kill()
    deadline = time.monotonic() + 5
    while fe.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert fe.wait_connected(0.2) is False
    assert time.monotonic() - started < 2


def test_server_mode_replaces_a_stale_socket_file(sock_dir: str, frontends) -> None:
    import socket
    import threading

    path = os.path.join(sock_dir, "vu.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays: a socket nobody listens on
    made: list[VhostUserNetBackend] = []
    builder = threading.Thread(
        target=lambda: made.append(VhostUserNetBackend(path, "server", connect_timeout=5)))
    builder.start()
    fake = ConfigBackend(path, listen=False)
    try:
        fake.dial()  # retried while the stale file still answers "refused"
        builder.join(5)
        (fe,) = made
        frontends.append(fe)
        assert fe.connected
    finally:
        fake.kill()


def test_server_mode_in_a_missing_directory_says_what_to_check(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "missing", "vu.sock")
    with pytest.raises(VhostUserFrontendError) as refused:
        VhostUserNetBackend(path, "server", connect_timeout=1)
    assert str(refused.value) == (
        f"cannot listen on vhost-user socket {path}: No such file or directory; check the "
        "directory exists and the path is not another file")


def test_stop_after_guest_memory_is_gone_reports_the_rings_at_zero(make, frontends, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    mem = GuestMemory(4 << 20)
    fe.activate(context(eventfds, mem), mem.regions)
    write_used_idx(mem, 0, 5)
    fake.kill()
    wait_disconnected(fe)
    mem.close()  # VM teardown: nothing will run the rings again
    positions = fe.stop()
    assert {q: (p.next_avail, p.used_idx) for q, p in positions.items()} == {0: (0, 0), 1: (0, 0)}


def test_blk_front_end_in_server_mode_waits_connect_timeout_for_a_back_end(sock_dir: str) -> None:
    from pymvm.vhost.user.frontend import VhostUserBlkBackend

    path = os.path.join(sock_dir, "blk.sock")
    started = time.monotonic()
    with pytest.raises(VhostUserFrontendError) as refused:
        VhostUserBlkBackend(path, "server", connect_timeout=0.3)
    assert time.monotonic() - started < 3
    assert str(refused.value).startswith(
        f"no vhost-user back-end connected to {path} within 0.3 s")


# ---- what start() checks before the back-end hears of it --------------------------------------


def test_start_with_a_kick_or_call_eventfd_missing_is_refused(make, frontends, memory,
                                                              eventfds) -> None:
    from pymvm.devices.virtio.device import ActivationContext

    fake = make()
    fe = connect(fake, frontends)
    kicks, calls = eventfds
    good = context(eventfds, memory)
    for k, c in ((kicks[:1], calls), (kicks, calls[:1])):
        ctx = ActivationContext(acked_features=good.acked_features, queues=good.queues,
                                kick_fds=k, call_fds=c, mem_regions=memory.regions)
        with pytest.raises(VhostUserFrontendError) as refused:
            fe.activate(ctx, memory.regions)
        assert str(refused.value) == (
            f"2 queues but {len(k)} kick and {len(c)} call eventfds: the transport must "
            "register one ioeventfd and one irqfd per queue")
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.activate(good, [])
    assert str(refused.value) == "no guest memory regions: the back-end needs a mem table"
    assert FR.SET_FEATURES not in fake.requests()


@pytest.mark.parametrize("event_idx", [False, True])
def test_used_ring_ending_at_the_end_of_memory_fits_only_without_event_idx(
        make, frontends, memory, event_idx: bool) -> None:
    from pymvm.devices.virtio.constants import VIRTIO_RING_F_EVENT_IDX
    from pymvm.devices.virtio.device import ActivationContext, QueueConfig

    fake = make(features=BACKEND_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX)
    fe = connect(fake, frontends)
    size = 256
    q = QueueConfig(index=0, size=size, ready=True, desc_addr=0x10000,
                    driver_addr=0x10000 + 16 * size, device_addr=(4 << 20) - (4 + 8 * size))
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    acked = context(([kick], [call]), memory).acked_features
    if event_idx:
        acked |= 1 << VIRTIO_RING_F_EVENT_IDX
    ctx = ActivationContext(acked_features=acked, queues=[q], kick_fds=[kick], call_fds=[call],
                            mem_regions=memory.regions)
    try:
        if event_idx:  # avail_event, 2 bytes past the used ring, is outside guest memory
            with pytest.raises(VhostUserFrontendError, match="used ring at GPA"):
                fe.activate(ctx, memory.regions)
        else:
            fe.activate(ctx, memory.regions)
            assert fe.active
    finally:
        fe.close()
        os.close(kick)
        os.close(call)


def test_start_resumes_each_ring_at_its_given_position(make, frontends, memory, eventfds) -> None:
    from pymvm.vhost.queue_state import RingPosition

    fake = make()
    fe = connect(fake, frontends)
    fe.start(context(eventfds, memory), memory.regions, {1: RingPosition(9, 9)})
    assert [msg.num for msg in sent(fake, FR.SET_VRING_BASE)] == [0, 9]
    fe.stop()
    fe.start(context(eventfds, memory), memory.regions,
             {0: RingPosition(5, 4), 1: RingPosition(7, 7)})
    assert [msg.num for msg in sent(fake, FR.SET_VRING_BASE)][2:] == [5, 7]


def test_start_refusals_name_the_problem(make, frontends, memory, eventfds) -> None:
    fake = make()
    fake.refuse.add(FR.SET_VRING_NUM)
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.start(context(eventfds, memory), memory.regions)
    assert str(refused.value) == ("vhost-user back-end refused SET_VRING_NUM (status 0x1); "
                                  "check the back-end's log")
    fake.refuse.clear()
    fe.start(context(eventfds, memory), memory.regions)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.start(context(eventfds, memory), memory.regions)
    assert str(refused.value) == "vhost-user-net is already active: stop() first"
    fe.stop()
    fake.kill()
    wait_disconnected(fe)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.start(context(eventfds, memory), memory.regions, strict=True)
    assert str(refused.value) == f"vhost-user back-end {fake.path} is not connected"
    fe.close()
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.start(context(eventfds, memory), memory.regions)
    assert str(refused.value) == f"vhost-user back-end {fake.path} is closed"


def test_unknown_socket_mode_is_refused_naming_the_modes(sock_dir: str) -> None:
    with pytest.raises(VhostUserFrontendError) as refused:
        VhostUserNetBackend(os.path.join(sock_dir, "vu.sock"), "listen")  # type: ignore[arg-type]
    assert str(refused.value) == ("vhost-user socket mode 'listen' is unknown; use 'client' or "
                                  "'server'")


# ---- the blk front-end's inflight region, unoffered features, connect errors --------------------


def blk(fake: FakeBackend, frontends):
    from pymvm.vhost.user.frontend import VhostUserBlkBackend

    fe = VhostUserBlkBackend(fake.path, "client", connect_timeout=2, request_timeout=2)
    frontends.append(fe)
    return fe


def test_blk_inflight_region_is_asked_for_and_handed_over_with_a_reply_asked(
        make, frontends, memory, eventfds) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG | PF.INFLIGHT_SHMFD)
    fe = blk(fake, frontends)
    fe.activate(context(eventfds, memory, acked=fe.features()), memory.regions)
    (get,) = sent(fake, FR.GET_INFLIGHT_FD)
    assert (get.num_queues, get.queue_size) == (2, QUEUE_SIZE)
    (handed,) = sent(fake, FR.SET_INFLIGHT_FD)
    assert handed.need_reply is True  # a back-end refusing it is noticed


def test_blk_front_end_asks_no_inflight_region_of_a_back_end_without_one(
        make, frontends, memory, eventfds) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fe = blk(fake, frontends)
    fe.activate(context(eventfds, memory, acked=fe.features()), memory.regions)
    assert FR.GET_INFLIGHT_FD not in fake.requests()
    assert FR.SET_INFLIGHT_FD not in fake.requests()
    assert fe.active


def test_start_with_features_the_back_end_does_not_offer_is_refused_naming_them(
        make, frontends, memory, eventfds) -> None:
    fake = make(features=BACKEND_FEATURES & ~VIRTIO_NET_F_MRG_RXBUF)
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.activate(context(eventfds, memory), memory.regions)  # the guest acked MRG_RXBUF
    assert str(refused.value) == (
        f"the back-end no longer offers features {VIRTIO_NET_F_MRG_RXBUF:#x} the guest "
        "negotiated; restart it with the same options")


def test_client_mode_socket_path_under_a_file_names_the_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = str(blocker / "vu.sock")
    with pytest.raises(VhostUserFrontendError) as refused:
        VhostUserNetBackend(path, "client", connect_timeout=1)
    assert str(refused.value) == f"cannot connect to vhost-user socket {path}: Not a directory"


# ---- what the handshake records, the front-end's own resources, reconnecting ------------------


def test_back_end_without_the_protocol_features_bit_gets_no_protocol_features_or_queue_count(
        make, frontends) -> None:
    fe = connect(make(features=VIRTIO_F_VERSION_1), frontends)
    assert fe.protocol_features == PF(0)
    assert fe.backend_queues is None


def test_queue_count_is_recorded_only_from_a_back_end_with_mq(make, frontends) -> None:
    fake = make()
    with_mq = connect(fake, frontends)  # the fake answers GET_QUEUE_NUM with 1
    assert with_mq.backend_queues == 1
    with_mq.close()
    fake.kill()
    without = connect(make(protocol=PF.REPLY_ACK), frontends)
    assert without.backend_queues is None


def test_back_end_without_version_1_is_refused_saying_pymvm_offers_only_modern_devices(
        make, frontends) -> None:
    fake = make(features=VIRTIO_NET_F_MRG_RXBUF)
    with pytest.raises(VhostUserFrontendError) as refused:
        connect(fake, frontends)
    assert str(refused.value) == (
        f"the vhost-user back-end at {fake.path} lacks VIRTIO_F_VERSION_1 (modern virtio); "
        "pymvm offers only modern devices")


def test_log_lines_name_the_device_socket_and_mode(make, frontends) -> None:
    import structlog

    fake = make()
    with structlog.testing.capture_logs() as logs:
        fe = connect(fake, frontends)
        fe.close()
    (closed,) = [e for e in logs if e["event"] == "vhost_user_closed"]
    assert (closed["device"], closed["socket"], closed["mode"]) == (
        "vhost-user-net", fake.path, "client")


def test_supervisor_thread_is_named_after_the_socket_and_does_not_keep_the_process_alive(
        make, frontends) -> None:
    import threading

    fake = make()
    before = set(threading.enumerate())
    connect(fake, frontends)
    (supervisor,) = [t for t in threading.enumerate() if t not in before
                     and t.name.startswith("vhost-user-")]
    assert supervisor.name == "vhost-user-vu.sock"
    assert supervisor.daemon


def test_wake_eventfd_is_close_on_exec_and_never_blocks(make, frontends) -> None:
    fe = connect(make(), frontends)
    assert not os.get_inheritable(fe._wake)  # a back-end the VMM starts does not inherit it
    assert not os.get_blocking(fe._wake)


def test_reconnect_pause_lasts_its_time_and_close_cuts_it_short(make, frontends) -> None:
    import threading

    fe = connect(make(), frontends)
    started = time.monotonic()
    fe._sleep(0.2)
    assert 0.18 <= time.monotonic() - started < 2
    sleeper = threading.Thread(target=fe._sleep, args=(30,))
    sleeper.start()
    time.sleep(0.05)
    fe.close()
    sleeper.join(2)
    assert not sleeper.is_alive()


def test_back_end_hanging_up_in_the_first_handshake_is_refused_pointing_at_its_log(
        make, frontends) -> None:
    fake = make()
    fake.hang_up_on.add(FR.GET_FEATURES)
    with pytest.raises(VhostUserFrontendError) as refused:
        connect(fake, frontends)
    assert str(refused.value).startswith("vhost-user back-end lost: GET_FEATURES")
    assert str(refused.value).endswith("; check the back-end's log")


def test_generic_front_end_tracks_no_inflight_requests_unless_asked(
        make, frontends, memory, eventfds) -> None:
    from pymvm.vhost.user.frontend import WANTED_PROTOCOL_FEATURES, VhostUserFrontend

    fake = make(protocol=BACKEND_PROTOCOL | PF.INFLIGHT_SHMFD)
    fe = VhostUserFrontend(fake.path, protocol_features=WANTED_PROTOCOL_FEATURES
                           | PF.INFLIGHT_SHMFD, connect_timeout=2, request_timeout=2)
    frontends.append(fe)
    assert fe.protocol_features & PF.INFLIGHT_SHMFD  # offered and taken, but not asked to use
    fe.activate(context(eventfds, memory), memory.regions)
    assert FR.GET_INFLIGHT_FD not in fake.requests()
    assert FR.SET_INFLIGHT_FD not in fake.requests()


def record_pauses(fe: VhostUserNetBackend, count: int) -> tuple[list[float], threading.Event]:
    """The pauses of the front-end's reconnect loop, until ``count`` were taken (each cut
    to a millisecond so the test does not wait for them)."""
    pauses: list[float] = []
    done = threading.Event()

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) >= count:
            done.set()
        time.sleep(0.001)

    fe._sleep = pause  # type: ignore[method-assign]
    return pauses, done


BACK_OFF = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_redialling_a_vanished_back_end_backs_off_doubling_from_50_ms_to_1_s(
        make, frontends) -> None:
    fake = make()
    fe = connect(fake, frontends)
    pauses, done = record_pauses(fe, len(BACK_OFF))
    fake.kill()  # the socket file goes too: every dial fails
    assert done.wait(10), pauses
    fe.close()
    assert pauses[:len(BACK_OFF)] == pytest.approx(BACK_OFF)


class HangUpAtOnce:
    """A listener that takes each connection and closes it unanswered."""

    def __init__(self, path: str) -> None:
        self.accepted = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_back_end_that_hangs_up_in_every_handshake_is_retried_with_back_off_leaking_nothing(
        make, frontends) -> None:
    fake = make()
    fe = connect(fake, frontends)
    hang_up = HangUpAtOnce(fake.path + ".next")
    os.rename(fake.path + ".next", fake.path)  # every dial from now on reaches hang_up
    fds = open_fds()
    pauses, done = record_pauses(fe, len(BACK_OFF))
    assert fake._conn_sock is not None
    fake._conn_sock.shutdown(socket.SHUT_RDWR)  # the back-end's first life ends
    try:
        assert done.wait(10), pauses
        assert hang_up.accepted >= len(BACK_OFF)  # each pause followed a failed handshake
        assert open_fds() <= fds + 2  # not one socket per try (at most one in flight)
    finally:
        fe.close()
        hang_up.close()
    assert pauses[:len(BACK_OFF)] == pytest.approx(BACK_OFF)


def test_close_during_a_handshake_the_back_end_never_answers_returns_at_once(
        make, frontends, sock_dir: str) -> None:
    fake = make()
    fe = VhostUserNetBackend(fake.path, "client", connect_timeout=2, request_timeout=30)
    frontends.append(fe)
    fake.kill()
    wait_disconnected(fe)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(fake.path)
    silent.listen(1)
    try:
        conn, _ = silent.accept()  # the front-end redials and sends GET_FEATURES
        conn.settimeout(5)
        assert conn.recv(12)  # the request's header: the handshake is waiting for a reply
        started = time.monotonic()
        fe.close()
        assert time.monotonic() - started < 2  # not the request's 30 s, nor close's 5 s join
        conn.close()
    finally:
        silent.close()


def test_announce_to_a_back_end_gone_unnoticed_returns_false_and_drops_the_link(
        make, frontends) -> None:
    fake = make(protocol=BACKEND_PROTOCOL | PF.RARP)
    fe = connect(fake, frontends)
    channel = fe._channel
    assert channel is not None
    with fe._lock:  # the supervisor cannot drop the connection before announce() uses it
        fake.kill()
        assert fe.announce(MAC) is False
        assert channel.broken is not None  # shut down: the supervisor reconnects
    wait_disconnected(fe)


def test_blk_front_end_offers_only_the_blk_features_it_passes_through(make, frontends) -> None:
    from pymvm.devices.virtio.blk import PASSTHROUGH_FEATURES

    outside = 1 << 7  # VIRTIO_BLK_F_SCSI: legacy, not passed through
    assert not outside & PASSTHROUGH_FEATURES
    fake = make(features=BACKEND_FEATURES | outside, protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fe = blk(fake, frontends)
    assert fe.features() & VIRTIO_F_VERSION_1
    assert not fe.features() & outside
    assert fe.features() & ~(PASSTHROUGH_FEATURES | VIRTIO_F_VERSION_1) == 0


def test_blk_front_end_request_timeout_bounds_a_handshake_nobody_answers(sock_dir: str) -> None:
    from pymvm.vhost.user.frontend import VhostUserBlkBackend

    path = os.path.join(sock_dir, "blk.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(VhostUserFrontendError, match="GET_FEATURES"):
            VhostUserBlkBackend(path, "client", connect_timeout=2, request_timeout=0.3)
        assert time.monotonic() - started < 3  # not the default 5 s
    finally:
        silent.close()


# ---- prepare() (a swap's first step) and the reason a lost back-end is logged with -------------


def test_prepare_is_refused_while_active_after_close_and_without_a_back_end(
        make, frontends, memory, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    closed_or_active = f"vhost-user back-end {fake.path} is closed or already active"
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.prepare(context(eventfds, memory), memory.regions)
    assert str(refused.value) == closed_or_active
    fe.stop()
    fake.kill()
    wait_disconnected(fe)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.prepare(context(eventfds, memory), memory.regions)
    assert str(refused.value) == f"vhost-user back-end {fake.path} is not connected"
    fe.close()
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.prepare(context(eventfds, memory), memory.regions)
    assert str(refused.value) == closed_or_active


def test_prepare_to_a_back_end_that_hangs_up_or_refuses_says_which(
        make, frontends, memory, eventfds) -> None:
    fake = make()
    fake.refuse.add(FR.SET_MEM_TABLE)
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError) as refused:
        fe.prepare(context(eventfds, memory), memory.regions)
    assert str(refused.value) == ("vhost-user back-end refused SET_MEM_TABLE (status 0x1); "
                                  "check the back-end's log")
    assert fe.connected  # a refusal leaves the connection as it was
    fake.hang_up_on.add(FR.SET_MEM_TABLE)
    with pytest.raises(VhostUserFrontendError) as lost:
        fe.prepare(context(eventfds, memory), memory.regions)
    assert str(lost.value).startswith(f"the vhost-user back-end at {fake.path} hung up: "
                                      "vhost-user back-end lost: ")
    wait_disconnected(fe)


@pytest.mark.parametrize("request_name", ["GET_CONFIG", "SET_CONFIG", "SET_MEM_TABLE",
                                          "SET_FEATURES", "GET_VRING_BASE"])
def test_back_end_lost_during_a_request_is_logged_naming_the_request_and_dropped(
        make, frontends, memory, eventfds, request_name: str) -> None:
    import contextlib

    import structlog

    request = FR[request_name]
    fake = make(protocol=BACKEND_PROTOCOL | PF.CONFIG)
    fe = connect(fake, frontends)
    if request is FR.GET_VRING_BASE:
        fe.activate(context(eventfds, memory), memory.regions)
    fake.hang_up_on.add(request)
    calls = {FR.GET_CONFIG: lambda: fe.get_config(0, 4),
             FR.SET_CONFIG: lambda: fe.set_config(0, b"\x01"),
             FR.SET_MEM_TABLE: lambda: fe.prepare(context(eventfds, memory), memory.regions),
             FR.SET_FEATURES: lambda: fe.activate(context(eventfds, memory), memory.regions),
             FR.GET_VRING_BASE: fe.stop}
    with structlog.testing.capture_logs() as logs:
        with contextlib.suppress(VhostUserFrontendError):
            calls[request]()
    (reason,) = [e["reason"] for e in logs if e["event"] == "vhost_user_backend_lost"]
    assert reason.startswith("vhost-user back-end lost: ") and request_name in reason
    wait_disconnected(fe)


def test_stop_when_the_back_end_hangs_up_resumes_at_the_used_index(
        make, frontends, memory, eventfds) -> None:
    fake = make()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    write_used_idx(memory, 0, 7)
    write_used_idx(memory, 1, 9)
    fake.hang_up_on.add(FR.GET_VRING_BASE)
    positions = fe.stop()  # no raise: the VM goes on
    assert {q: (p.next_avail, p.used_idx) for q, p in positions.items()} == {0: (7, 7),
                                                                             1: (9, 9)}
    assert not fe.active
    wait_disconnected(fe)


def test_closed_front_end_is_inactive_and_has_given_back_its_wake_eventfd(
        make, frontends, memory, eventfds) -> None:
    fe = connect(make(), frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    wake = fe._wake
    fe.close()
    assert not fe.active
    with pytest.raises(OSError):
        os.fstat(wake)
