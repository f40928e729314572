"""The vhost-user net front-end against a fake back-end (the sans-IO BackendConnection answering
on a real unix socket in a thread): handshake, activation sequence, reset, reconnect, close."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.memory import GuestMemory
from pymvm.vhost.kernel import OFFERED_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.frontend import VhostUserFrontendError, VhostUserNetBackend
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import NEED_DATA, PEER_CLOSED, BackendConnection
from pymvm.vhost.user.socket_io import recv_with_fds, send_with_fds

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_CTRL_VQ = 1 << 17
BACKEND_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_MAC
                    | VIRTIO_NET_F_CTRL_VQ | m.PROTOCOL_FEATURES_FLAG)
BACKEND_PROTOCOL = PF.REPLY_ACK | PF.MQ | PF.STATUS | PF.LOG_SHMFD | PF.BACKEND_REQ
QUEUE_SIZE = 256
# Rings of two queues, 4 KiB apart, inside the first MiB of a 4 MiB guest.
RINGS = {0: 0x10000, 1: 0x20000}


@dataclass
class Received:
    message: m.Request
    fd_inodes: tuple[tuple[int, int], ...]  # (st_dev, st_ino) of each fd that came with it


class FakeBackend:
    """A vhost-user back-end on a unix socket: answers every request, records it."""

    def __init__(self, path: str, *, features: int = BACKEND_FEATURES,
                 protocol: PF = BACKEND_PROTOCOL, listen: bool = True) -> None:
        self.path = path
        self.features = features
        self.protocol = protocol
        self.vring_bases: dict[int, int] = {}
        self.refuse: set[FR] = set()
        self.received: list[Received] = []
        self.changed = threading.Condition()
        self._conn_sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        if listen:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(path)
            self._listener.listen(1)
        self._thread: threading.Thread | None = None

    def start(self) -> FakeBackend:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def dial(self) -> FakeBackend:
        """Connect to a front-end listening at path (server-mode front-end). The socket file
        appears at bind(), a moment before listen(): until then a connect is refused (and
        a stale file the front-end replaces is missing for a moment)."""
        deadline = time.monotonic() + 5
        while True:
            self._conn_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._conn_sock.connect(self.path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self._conn_sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        return self.start()

    def _run(self) -> None:
        if self._conn_sock is None:
            assert self._listener is not None
            try:
                self._conn_sock, _ = self._listener.accept()
            except OSError:
                return
        conn = BackendConnection()
        sock = self._conn_sock
        try:
            while True:
                data, fds = recv_with_fds(sock)
                conn.receive_data(data, fds)
                while (event := conn.next_event()) is not NEED_DATA:
                    if event is PEER_CLOSED:
                        return
                    self._handle(conn, sock, event)
        except OSError:
            return

    def _handle(self, conn: BackendConnection, sock: socket.socket, msg: m.Request) -> None:
        fds = [f for f in self._fds_of(msg) if f is not None]
        inodes = tuple((os.fstat(f).st_dev, os.fstat(f).st_ino) for f in fds)
        for f in fds:
            os.close(f)
        request = FR(msg.REQUEST)
        reply: m.Reply | None = None
        if request is FR.GET_FEATURES:
            reply = m.FeaturesReply(self.features)
        elif request is FR.GET_PROTOCOL_FEATURES:
            reply = m.ProtocolFeaturesReply(self.protocol)
        elif request is FR.GET_QUEUE_NUM:
            reply = m.QueueNumReply(1)
        elif request is FR.GET_MAX_MEM_SLOTS:
            reply = m.MaxMemSlotsReply(32)
        elif request is FR.GET_VRING_BASE:
            assert isinstance(msg, m.GetVringBase)
            reply = m.VringBaseReply(msg.index, self.vring_bases.get(msg.index, 0))
        elif conn.reply_owed is not None:
            reply = m.Ack(request, 1 if request in self.refuse else 0)
        with self.changed:  # recorded before the reply: the front-end returns after it
            self.received.append(Received(msg, inodes))
            self.changed.notify_all()
        if reply is not None:
            send_with_fds(sock, *conn.send(reply))

    @staticmethod
    def _fds_of(msg: m.Request) -> list[int | None]:
        if isinstance(msg, m.SetMemTable):
            return list(msg.fds)
        return [getattr(msg, "fd", None)]

    def requests(self) -> list[FR]:
        with self.changed:
            return [FR(r.message.REQUEST) for r in self.received]

    def messages(self, request: FR) -> list[Received]:
        with self.changed:
            return [r for r in self.received if r.message.REQUEST == request]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), f"timed out; got {self.requests()}"

    def kill(self) -> None:
        """Die like a crashed process: the listener goes away, the connection closes."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            os.unlink(self.path)
        if self._conn_sock is not None:
            try:
                self._conn_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._conn_sock.close()
        if self._thread is not None:
            self._thread.join(5)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pymvm-vu-")  # short: unix socket paths max 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(4 << 20) as mem:
        yield mem


@pytest.fixture
def eventfds() -> Iterator[tuple[list[int], list[int]]]:
    kicks = [os.eventfd(0, os.EFD_CLOEXEC) for _ in RINGS]
    calls = [os.eventfd(0, os.EFD_CLOEXEC) for _ in RINGS]
    yield kicks, calls
    for fd in kicks + calls:
        os.close(fd)


def queue(index: int) -> QueueConfig:
    base = RINGS[index]
    return QueueConfig(index=index, size=QUEUE_SIZE, ready=True, desc_addr=base,
                       driver_addr=base + 16 * QUEUE_SIZE, device_addr=base + 0x2000)


def context(eventfds: tuple[list[int], list[int]], memory: GuestMemory,
            acked: int = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_MAC,
            queues: list[QueueConfig] | None = None) -> ActivationContext:
    kicks, calls = eventfds
    return ActivationContext(acked_features=acked, queues=queues or [queue(0), queue(1)],
                             kick_fds=kicks, call_fds=calls, mem_regions=memory.regions)


def inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def write_used_idx(memory: GuestMemory, index: int, value: int) -> None:
    memory.write(queue(index).device_addr + 2, value.to_bytes(2, "little"))


@pytest.fixture
def backend_factory(sock_dir: str) -> Iterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    def make(**kwargs) -> FakeBackend:
        fake = FakeBackend(os.path.join(sock_dir, "vu.sock"), **kwargs).start()
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.kill()


@pytest.fixture
def frontends() -> Iterator[list[VhostUserNetBackend]]:
    made: list[VhostUserNetBackend] = []
    yield made
    for fe in made:
        fe.close()


def connect(fake: FakeBackend, frontends: list[VhostUserNetBackend],
            **kwargs) -> VhostUserNetBackend:
    fe = VhostUserNetBackend(fake.path, "client", connect_timeout=2, request_timeout=2, **kwargs)
    frontends.append(fe)
    return fe


# ---------------------------------------------------------------------------------------------


def test_handshake_negotiates_protocol_features_and_sets_owner(backend_factory, frontends):
    fake = backend_factory()
    fe = connect(fake, frontends)
    assert fake.requests() == [FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES,
                               FR.SET_PROTOCOL_FEATURES, FR.GET_QUEUE_NUM, FR.SET_OWNER]
    (sent,) = fake.messages(FR.SET_PROTOCOL_FEATURES)
    # Offered LOG_SHMFD and BACKEND_REQ are not taken: pymvm serves neither.
    assert sent.message.features == PF.REPLY_ACK | PF.MQ | PF.STATUS
    assert fe.protocol_features == PF.REPLY_ACK | PF.MQ | PF.STATUS


def test_features_are_backend_offer_intersected_with_what_pymvm_passes_through(
        backend_factory, frontends):
    fe = connect(backend_factory(), frontends)
    assert fe.features() == VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF
    assert fe.features() & ~OFFERED_FEATURES == 0  # no CTRL_VQ, MAC or protocol bit


def test_backend_without_version_1_is_refused_at_construction(backend_factory, frontends):
    fake = backend_factory(features=VIRTIO_NET_F_MRG_RXBUF)
    with pytest.raises(VhostUserFrontendError, match="VIRTIO_F_VERSION_1"):
        connect(fake, frontends)


def test_client_mode_gives_up_after_connect_timeout(sock_dir):
    started = time.monotonic()
    with pytest.raises(VhostUserFrontendError, match="no vhost-user back-end listening"):
        VhostUserNetBackend(os.path.join(sock_dir, "absent.sock"), connect_timeout=0.3)
    assert time.monotonic() - started < 2


def test_client_mode_waits_for_a_backend_that_starts_late(sock_dir, frontends):
    path = os.path.join(sock_dir, "vu.sock")
    late: list[FakeBackend] = []
    timer = threading.Timer(0.3, lambda: late.append(FakeBackend(path).start()))
    timer.start()
    try:
        fe = VhostUserNetBackend(path, connect_timeout=5)
        assert fe.connected
        fe.close()
    finally:
        timer.join()
        for fake in late:
            fake.kill()


def test_activate_sends_the_exact_request_sequence_with_real_fds(
        backend_factory, frontends, memory, eventfds):
    fake = backend_factory()
    fe = connect(fake, frontends)
    handshake = len(fake.requests())
    fe.activate(context(eventfds, memory), memory.regions)
    ring = [FR.SET_VRING_NUM, FR.SET_VRING_BASE, FR.SET_VRING_ADDR, FR.SET_VRING_KICK,
            FR.SET_VRING_CALL]
    assert fake.requests()[handshake:] == [
        FR.SET_FEATURES, FR.SET_MEM_TABLE, *ring, *ring,
        FR.SET_VRING_ENABLE, FR.SET_VRING_ENABLE, FR.SET_STATUS,
    ]
    assert all(r.message.need_reply for r in fake.received[handshake:])

    (features,) = fake.messages(FR.SET_FEATURES)
    # The guest's MAC bit is the device model's business; the protocol bit is re-acked.
    assert features.message.features == (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF
                                          | m.PROTOCOL_FEATURES_FLAG)

    (table,) = fake.messages(FR.SET_MEM_TABLE)
    region = memory.regions[0]
    assert table.message.regions == (m.MemoryRegion(region.gpa, region.size, region.host_addr,
                                                    region.fd_offset),)
    assert table.fd_inodes == (inode(memory.fd),)  # the guest memfd itself travelled

    kicks, calls = eventfds
    assert [r.fd_inodes for r in fake.messages(FR.SET_VRING_KICK)] == [(inode(kicks[0]),),
                                                                         (inode(kicks[1]),)]
    assert [r.fd_inodes for r in fake.messages(FR.SET_VRING_CALL)] == [(inode(calls[0]),),
                                                                         (inode(calls[1]),)]
    addr = fake.messages(FR.SET_VRING_ADDR)[1].message
    q1 = queue(1)
    assert (addr.index, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr) == (
        1, memory.host_address(q1.desc_addr), memory.host_address(q1.driver_addr),
        memory.host_address(q1.device_addr))
    assert [r.message.num for r in fake.messages(FR.SET_VRING_BASE)] == [0, 0]
    assert fake.messages(FR.SET_STATUS)[0].message.status == 0xF  # ACK|DRIVER|FEATURES_OK|DRIVER_OK
    assert fe.active


def test_activate_uses_add_mem_reg_when_configure_mem_slots_is_negotiated(
        backend_factory, frontends, memory, eventfds):
    fake = backend_factory(protocol=BACKEND_PROTOCOL | PF.CONFIGURE_MEM_SLOTS)
    fe = connect(fake, frontends)
    assert FR.GET_MAX_MEM_SLOTS in fake.requests()
    fe.activate(context(eventfds, memory), memory.regions)
    fe.reset()
    fe.activate(context(eventfds, memory), memory.regions)
    assert FR.SET_MEM_TABLE not in fake.requests()
    (added,) = fake.messages(FR.ADD_MEM_REG)  # once per connection, not per activation
    assert added.fd_inodes == (inode(memory.fd),)


def test_backend_without_protocol_features_gets_no_enable_or_status(
        backend_factory, frontends, memory, eventfds):
    fake = backend_factory(features=VIRTIO_F_VERSION_1)
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory, acked=VIRTIO_F_VERSION_1), memory.regions)
    # Nothing is acked without REPLY_ACK: wait until the last ring message has arrived.
    fake.wait_for(lambda: len(fake.messages(FR.SET_VRING_CALL)) == 2)
    requests = fake.requests()
    assert requests[:2] == [FR.GET_FEATURES, FR.SET_OWNER]
    assert FR.SET_VRING_ENABLE not in requests and FR.SET_STATUS not in requests
    assert not any(r.message.need_reply for r in fake.received)  # no REPLY_ACK to ask for
    assert fake.messages(FR.SET_FEATURES)[0].message.features == VIRTIO_F_VERSION_1


def test_reset_stops_rings_and_returns_their_bases(backend_factory, frontends, memory, eventfds):
    fake = backend_factory()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    fake.vring_bases = {0: 17, 1: 42}
    mark = len(fake.requests())
    assert fe.reset() == {0: 17, 1: 42}
    assert fake.requests()[mark:] == [FR.SET_VRING_ENABLE, FR.SET_VRING_ENABLE,
                                      FR.GET_VRING_BASE, FR.GET_VRING_BASE, FR.SET_STATUS]
    assert [r.message.enable for r in fake.messages(FR.SET_VRING_ENABLE)[2:]] == [False, False]
    assert fake.messages(FR.SET_STATUS)[-1].message.status == 0
    assert not fe.active
    # The connection stays usable: a fresh activation starts the rings at 0 again.
    fe.activate(context(eventfds, memory), memory.regions)
    assert [r.message.num for r in fake.messages(FR.SET_VRING_BASE)[2:]] == [0, 0]


def test_refused_request_raises_naming_it(backend_factory, frontends, memory, eventfds):
    fake = backend_factory()
    fake.refuse = {FR.SET_VRING_ADDR}
    fe = connect(fake, frontends)
    with pytest.raises(VhostUserFrontendError, match="refused SET_VRING_ADDR"):
        fe.activate(context(eventfds, memory), memory.regions)
    assert not fe.active


@dataclass
class AnonymousRegion:
    gpa: int
    size: int
    host_addr: int
    fd_offset: int = 0
    fd: int = -1


def test_anonymous_memory_is_refused_before_the_backend_hears_of_it(
        backend_factory, frontends, memory, eventfds):
    fake = backend_factory()
    fe = connect(fake, frontends)
    mark = len(fake.requests())
    region = memory.regions[0]
    anon = [AnonymousRegion(region.gpa, region.size, region.host_addr)]
    with pytest.raises(VhostUserFrontendError, match="anonymous or private memory"):
        fe.activate(context(eventfds, memory), anon)
    assert fake.requests()[mark:] == []


def test_ring_outside_guest_memory_is_refused_naming_the_queue(
        backend_factory, frontends, memory, eventfds):
    fe = connect(backend_factory(), frontends)
    bad = QueueConfig(index=1, size=QUEUE_SIZE, ready=True, desc_addr=0x10_0000_0000,
                      driver_addr=0x20000, device_addr=0x22000)
    with pytest.raises(VhostUserFrontendError, match="queue 1: descriptor table"):
        fe.activate(context(eventfds, memory, queues=[queue(0), bad]), memory.regions)


def test_backend_death_is_not_raised_and_reconnect_replays_with_used_ring_positions(
        sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    first = FakeBackend(path).start()
    fe = connect(first, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    # The back-end moved packets, then crashed before anyone could ask for its bases.
    write_used_idx(memory, 0, 5)
    write_used_idx(memory, 1, 300)
    first.kill()
    deadline = time.monotonic() + 5
    while fe.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fe.connected
    second = FakeBackend(path).start()
    try:
        assert fe.wait_connected(5)
        second.wait_for(lambda: FR.SET_STATUS in second.requests())
        requests = second.requests()
        assert requests[:5] == [FR.GET_FEATURES, FR.GET_PROTOCOL_FEATURES,
                                FR.SET_PROTOCOL_FEATURES, FR.GET_QUEUE_NUM, FR.SET_OWNER]
        assert [r.message.num for r in second.messages(FR.SET_VRING_BASE)] == [5, 300]
        kicks, calls = eventfds
        assert [r.fd_inodes for r in second.messages(FR.SET_VRING_KICK)] == [
            (inode(kicks[0]),), (inode(kicks[1]),)]
        assert [r.fd_inodes for r in second.messages(FR.SET_VRING_CALL)] == [
            (inode(calls[0]),), (inode(calls[1]),)]
        assert second.messages(FR.SET_MEM_TABLE)[0].fd_inodes == (inode(memory.fd),)
        assert fe.connections == 2 and fe.active
    finally:
        second.kill()


def test_reset_while_backend_is_down_returns_used_ring_positions(
        backend_factory, frontends, memory, eventfds):
    fake = backend_factory()
    fe = connect(fake, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    write_used_idx(memory, 0, 7)
    write_used_idx(memory, 1, 9)
    fake.kill()
    started = time.monotonic()
    assert fe.reset() == {0: 7, 1: 9}  # no raise into the vCPU thread
    assert time.monotonic() - started < 1


def test_activate_while_backend_is_down_is_deferred_until_it_returns(
        sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    first = FakeBackend(path).start()
    fe = connect(first, frontends)
    first.kill()
    deadline = time.monotonic() + 5
    while fe.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    fe.activate(context(eventfds, memory), memory.regions)  # must not raise
    assert fe.active
    second = FakeBackend(path).start()
    try:
        second.wait_for(lambda: FR.SET_STATUS in second.requests())
        assert [r.message.num for r in second.messages(FR.SET_VRING_BASE)] == [0, 0]
    finally:
        second.kill()


def test_close_cancels_a_pending_reconnect_promptly(backend_factory, frontends):
    fake = backend_factory()
    fe = connect(fake, frontends)
    supervisor = fe._supervisor
    assert supervisor is not None
    fake.kill()
    time.sleep(0.3)  # the supervisor is now retrying against a missing socket
    started = time.monotonic()
    fe.close()
    assert time.monotonic() - started < 0.5
    assert not supervisor.is_alive()


def test_server_mode_accepts_a_backend_and_reaccepts_after_it_dies(
        sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    made: list[VhostUserNetBackend] = []
    builder = threading.Thread(
        target=lambda: made.append(VhostUserNetBackend(path, "server", connect_timeout=5)))
    builder.start()
    deadline = time.monotonic() + 5
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    first = FakeBackend(path, listen=False).dial()
    builder.join(5)
    (fe,) = made
    frontends.append(fe)
    fe.activate(context(eventfds, memory), memory.regions)
    write_used_idx(memory, 0, 3)
    first.kill()
    second = FakeBackend(path, listen=False).dial()
    try:
        second.wait_for(lambda: FR.SET_STATUS in second.requests())
        assert [r.message.num for r in second.messages(FR.SET_VRING_BASE)] == [3, 0]
    finally:
        second.kill()
    fe.close()
    assert not os.path.exists(path)  # the listening socket was ours to remove


def test_server_mode_without_a_backend_times_out_and_removes_its_socket(sock_dir):
    path = os.path.join(sock_dir, "vu.sock")
    with pytest.raises(VhostUserFrontendError, match="no vhost-user back-end connected"):
        VhostUserNetBackend(path, "server", connect_timeout=0.2)
    assert not os.path.exists(path)


def test_unanswered_request_is_bounded_by_request_timeout(sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    fake = FakeBackend(path).start()
    fe = VhostUserNetBackend(path, connect_timeout=2, request_timeout=0.3)
    frontends.append(fe)
    fake.refuse = set()
    # A back-end that stops reading: replace its handler with one that never answers.
    fake._handle = lambda conn, sock, msg: None  # type: ignore[method-assign]
    started = time.monotonic()
    fe.activate(context(eventfds, memory), memory.regions)  # times out, logs, does not raise
    assert time.monotonic() - started < 1.5
    assert fe.active  # kept for replay once a working back-end is there
    fake.kill()
