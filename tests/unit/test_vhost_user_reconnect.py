"""The vhost-user front-end's reconnect path against back-ends that offer what the real ones
do (CONFIGURE_MEM_SLOTS, as pymvm's own back-end and DPDK): memory re-added on the new
connection, and a back-end that came back with fewer features refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import struct
import threading
import time

from pymvm.vhost.kernel import VIRTIO_F_VERSION_1
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.backend import VhostUserServer
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from tests.unit.test_vhost_user_frontend import (  # noqa: F401 (fixtures)
    BACKEND_PROTOCOL,
    FakeBackend,
    connect,
    context,
    eventfds,
    frontends,
    inode,
    memory,
    queue,
    sock_dir,
)
from tests.unit.test_vhost_user_backend import RecordingDevice

WITH_MEM_SLOTS = BACKEND_PROTOCOL | PF.CONFIGURE_MEM_SLOTS


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_reconnect_re_adds_every_memory_region_with_add_mem_reg(
        sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    first = FakeBackend(path, protocol=WITH_MEM_SLOTS).start()
    fe = connect(first, frontends)
    fe.activate(context(eventfds, memory), memory.regions)
    assert len(first.messages(FR.ADD_MEM_REG)) == len(memory.regions)
    first.kill()
    wait_until(lambda: not fe.connected)
    second = FakeBackend(path, protocol=WITH_MEM_SLOTS).start()
    try:
        assert fe.wait_connected(5)
        second.wait_for(lambda: FR.SET_STATUS in second.requests())
        # A new back-end process knows none of the old connection's regions.
        added = second.messages(FR.ADD_MEM_REG)
        assert [r.message.region.guest_phys_addr for r in added] == [
            r.gpa for r in memory.regions]
        assert all(r.fd_inodes == (inode(memory.fd),) for r in added)
        requests = second.requests()
        assert requests.index(FR.ADD_MEM_REG) < requests.index(FR.SET_VRING_ADDR)
        assert fe.active
    finally:
        second.kill()


def test_reconnect_to_a_backend_that_lost_features_does_not_replay_the_rings(
        sock_dir, frontends, memory, eventfds):
    path = os.path.join(sock_dir, "vu.sock")
    first = FakeBackend(path).start()
    fe = connect(first, frontends)
    ctx = context(eventfds, memory)  # the guest acked MRG_RXBUF
    fe.activate(ctx, memory.regions)
    offered = fe.features()
    first.kill()
    wait_until(lambda: not fe.connected)
    # The back-end came back started with other options: no MRG_RXBUF any more.
    second = FakeBackend(path, features=VIRTIO_F_VERSION_1 | m.PROTOCOL_FEATURES_FLAG).start()
    try:
        assert fe.wait_connected(5)
        wait_until(lambda: not fe.active)  # the replay was refused, not forced through
        requests = second.requests()
        assert FR.SET_FEATURES not in requests and FR.SET_VRING_KICK not in requests
        assert FR.SET_MEM_TABLE not in requests
        assert fe.features() == offered  # what the guest was offered does not change
    finally:
        second.kill()


# ---- against pymvm's own back-end server ------------------------------------------------------


class ServerThread:
    """pymvm's VhostUserServer with ``device`` (a RecordingDevice unless given), on an asyncio
    loop in a thread."""

    def __init__(self, path: str, device=None) -> None:
        self.device = RecordingDevice() if device is None else device
        self.server = VhostUserServer(path, self.device)
        self.server.listen()
        self.loop = asyncio.new_event_loop()
        self._task: asyncio.Task | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self.server.serve_forever())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._task)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result."""
        done = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(5)

    def drop_session(self) -> None:
        """The back-end hangs up on the front-end (as when it restarts)."""
        self.call(lambda: self.server.session and self.server.session.close("test hang-up"))

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.loop.close()


def post_tx(memory, payload: bytes, avail_idx: int, head: int) -> None:
    """The guest driver puts a one-descriptor chain holding ``payload`` on queue 1."""
    q = queue(1)
    data_gpa = 0x100000 + 0x1000 * head
    memory.write(data_gpa, payload)
    memory.write(q.desc_addr + 16 * head, struct.pack("<QIHH", data_gpa, len(payload), 0, 0))
    memory.write(q.driver_addr + 4 + 2 * (avail_idx % q.size), struct.pack("<H", head))
    memory.write(q.driver_addr + 2, struct.pack("<H", avail_idx + 1))


def test_rings_work_again_after_pymvms_own_backend_hangs_up_and_is_redialled(
        sock_dir, frontends, memory, eventfds):
    backend = ServerThread(os.path.join(sock_dir, "vu.sock"))
    try:
        fe = connect(backend.server, frontends)
        assert fe.protocol_features & PF.CONFIGURE_MEM_SLOTS  # as the real back-end offers
        kicks, _ = eventfds
        fe.activate(context(eventfds, memory, acked=VIRTIO_F_VERSION_1), memory.regions)
        post_tx(memory, b"before", 0, 0)
        os.eventfd_write(kicks[1], 1)
        wait_until(lambda: backend.device.payloads == [b"before"])

        backend.drop_session()
        wait_until(lambda: backend.server.sessions_served == 2 and fe.connected)
        # The new session got the memory again and the rings where the old one left them.
        wait_until(lambda: backend.call(
            lambda: backend.server.session is not None
            and backend.server.session.vrings[1].queue is not None))
        post_tx(memory, b"after", 1, 1)
        os.eventfd_write(kicks[1], 1)
        wait_until(lambda: backend.device.payloads == [b"before", b"after"])
        assert fe.connections == 2 and fe.active
    finally:
        for fe in frontends:
            fe.close()
        backend.stop()
