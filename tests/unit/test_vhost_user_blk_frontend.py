"""The generic vhost-user front-end as virtio-blk's data plane, against pymvm's own blk
back-end: features and config space (GET_CONFIG) reach the device model, a request goes
through the rings, stop() reports the ring positions, and after a back-end restart the
inflight region is handed over (SET_INFLIGHT_FD) and requests flow again."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1
from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.devices.virtio.queue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pymvm.memory import GuestMemory
from pymvm.vhost.backends.blk import BlkBackend
from pymvm.vhost.user.backend import VhostUserServer
from pymvm.vhost.user.frontend import RingPosition, VhostUserBlkBackend, VhostUserFrontendError
from pymvm.vhost.user.messages import ProtocolFeature as PF
from tests.unit.test_vhost_user_frontend import sock_dir  # noqa: F401 (fixture)
from tests.unit.test_vhost_user_reconnect import ServerThread

QSIZE = 16
DESC, AVAIL, USED = 0x10000, 0x10000 + 16 * QSIZE, 0x11000
HDR, DATA, STATUS = 0x20000, 0x21000, 0x22000
SECTORS = 128


class BlkServer(ServerThread):
    """pymvm's blk back-end on an asyncio loop in a thread (a stand-in for the process)."""

    def __init__(self, path: str, image: Path) -> None:
        self.fd = os.open(image, os.O_RDWR)
        super().__init__(path, BlkBackend(self.fd, image.stat().st_size, serial="unit"))

    def stop(self) -> None:
        super().stop()
        self.device.close()
        os.close(self.fd)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(struct.pack("<Q", i).ljust(512, b"s") for i in range(SECTORS)))
    return path


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def used_idx(memory: GuestMemory) -> int:
    return struct.unpack("<H", memory.read(USED + 2, 2))[0]


def post_read(memory: GuestMemory, sector: int, avail_idx: int) -> None:
    """The guest driver: a 3-descriptor read of one sector at ``sector``."""
    memory.write(HDR, b.REQUEST_HEADER.pack(b.VIRTIO_BLK_T_IN, 0, sector))
    memory.write(STATUS, b"\xff")
    for i, (addr, length, flags) in enumerate([
            (HDR, 16, VRING_DESC_F_NEXT), (DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
            (STATUS, 1, VRING_DESC_F_WRITE)]):
        memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, i + 1))
    memory.write(AVAIL + 4 + 2 * (avail_idx % QSIZE), struct.pack("<H", 0))
    memory.write(AVAIL + 2, struct.pack("<H", avail_idx + 1))


def context(memory: GuestMemory, kick: int, call: int) -> ActivationContext:
    q = QueueConfig(index=0, size=QSIZE, ready=True, desc_addr=DESC, driver_addr=AVAIL,
                    device_addr=USED)
    return ActivationContext(acked_features=1 << VIRTIO_F_VERSION_1 | 1 << b.VIRTIO_BLK_F_FLUSH,
                             queues=[q], kick_fds=[kick], call_fds=[call],
                             mem_regions=memory.regions)


def test_blk_frontend_gets_features_and_config_and_serves_a_read(sock_dir, image) -> None:
    path = os.path.join(sock_dir, "blk.sock")
    server = BlkServer(path, image)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    fe = VhostUserBlkBackend(path, connect_timeout=5)
    try:
        for bit in (b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_BLK_SIZE, b.VIRTIO_BLK_F_SEG_MAX,
                    b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES, b.VIRTIO_BLK_F_MQ):
            assert fe.features() >> bit & 1, bit
        assert fe.protocol_features & PF.CONFIG and fe.protocol_features & PF.INFLIGHT_SHMFD
        model = b.VirtioBlkDevice(fe)
        assert model.capacity == SECTORS and model.config.seg_max == 510
        assert model.queue_max_sizes == (512,)  # a request of seg_max pages is one chain
        assert struct.unpack_from("<Q", model.config_bytes())[0] == SECTORS
        assert model.avail_features() >> b.VIRTIO_BLK_F_FLUSH & 1
        with GuestMemory(4 << 20) as memory:
            fe.start(context(memory, kick, call), memory.regions)
            post_read(memory, 5, 0)
            os.eventfd_write(kick, 1)
            wait_until(lambda: used_idx(memory) == 1)
            assert memory.read(STATUS, 1) == bytes([b.VIRTIO_BLK_S_OK])
            assert memory.read(DATA, 512) == struct.pack("<Q", 5).ljust(512, b"s")
            assert fe.stop() == {0: RingPosition(next_avail=1, used_idx=1)}
    finally:
        fe.close()
        server.stop()
        os.close(kick)
        os.close(call)


def test_blk_frontend_resumes_at_given_positions(sock_dir, image) -> None:
    """start(positions): the back-end takes the ring from entry 3 on, as after a swap."""
    path = os.path.join(sock_dir, "blk.sock")
    server = BlkServer(path, image)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    fe = VhostUserBlkBackend(path, connect_timeout=5)
    try:
        with GuestMemory(4 << 20) as memory:
            memory.write(AVAIL + 2, struct.pack("<H", 3))  # three requests done before
            memory.write(USED + 2, struct.pack("<H", 3))
            fe.start(context(memory, kick, call), memory.regions, {0: RingPosition(3, 3)})
            post_read(memory, 7, 3)
            os.eventfd_write(kick, 1)
            wait_until(lambda: used_idx(memory) == 4)
            assert memory.read(DATA, 8) == struct.pack("<Q", 7)
            assert fe.stop() == {0: RingPosition(4, 4)}
    finally:
        fe.close()
        server.stop()
        os.close(kick)
        os.close(call)


def test_restarted_blk_backend_gets_the_inflight_region_and_serves_again(sock_dir, image) -> None:
    path = os.path.join(sock_dir, "blk.sock")
    first = BlkServer(path, image)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    fe = VhostUserBlkBackend(path, connect_timeout=5)
    second = None
    try:
        with GuestMemory(4 << 20) as memory:
            fe.start(context(memory, kick, call), memory.regions)
            assert first.server.session is not None and first.server.session.inflight is not None
            first.stop()
            wait_until(lambda: not fe.connected)
            second = BlkServer(path, image)
            assert fe.wait_connected(10)
            wait_until(lambda: second.server.session is not None
                       and second.server.session.inflight is not None
                       and second.server.session.vrings[0].queue is not None)
            post_read(memory, 9, 0)
            os.eventfd_write(kick, 1)
            wait_until(lambda: used_idx(memory) == 1)
            assert memory.read(DATA, 8) == struct.pack("<Q", 9)
            fe.stop()
    finally:
        fe.close()
        if second is not None:
            second.stop()
        os.close(kick)
        os.close(call)


def test_blk_frontend_refuses_a_backend_without_a_config_space(sock_dir) -> None:
    """A vhost-user-blk device needs GET_CONFIG: a back-end without PF.CONFIG is refused."""
    from tests.unit.test_vhost_user_backend import RecordingDevice

    path = os.path.join(sock_dir, "rec.sock")
    server = VhostUserServer(path, RecordingDevice())
    server.listen()
    loop = asyncio.new_event_loop()
    task = loop.create_task(server.serve_forever())
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        asyncio.gather(task, return_exceptions=True)), daemon=True)
    thread.start()
    try:
        with pytest.raises(VhostUserFrontendError, match="CONFIG"):
            VhostUserBlkBackend(path, connect_timeout=5)
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(5)
        loop.close()
