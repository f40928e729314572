"""pymvm's vhost-user front-end against qemu-storage-daemon's vhost-user-blk export (the
third-party back-end, QEMU's libvhost-user): the handshake, features and config space, the
memory table, the inflight region and the rings are set up, and the export serves writes,
a flush and reads through them (the device is ready)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1
from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.devices.virtio.queue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pymvm.memory import GuestMemory
from pymvm.vhost.user.frontend import RingPosition, VhostUserBlkBackend
from pymvm.vhost.user.messages import ProtocolFeature as PF

QSD = shutil.which("qemu-storage-daemon")
QSIZE = 64
DESC, AVAIL, USED = 0x10000, 0x10000 + 16 * QSIZE, 0x11000
BUF = 0x40000  # request i: header at BUF + 0x2000 * i, data at + 0x100, status at + 0x1f00
IMAGE_MIB = 4
NEXT, WRITE = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE


@pytest.fixture(autouse=True)
def require_peers() -> None:  # overrides the DPDK check of conftest: this peer is qsd
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed: apt-get install qemu-system-common")


@pytest.fixture
def qsd_export():
    """qemu-storage-daemon exporting a 4 MiB raw image; yields (socket, image, process)."""
    tmp = tempfile.mkdtemp(prefix="pymvm-qsd-")  # short: unix socket paths max 107 bytes
    image = Path(tmp) / "disk.img"
    image.write_bytes(b"".join(struct.pack("<Q", i).ljust(512, b"q")
                               for i in range(IMAGE_MIB * 2048)))
    sock = os.path.join(tmp, "blk.sock")
    proc = subprocess.Popen(
        [QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                     "writable=on"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
            time.sleep(0.05)
        yield sock, image, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


class Driver:
    """The guest's virtio-blk driver on one split ring in pymvm's guest memory."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.avail = 0

    def submit(self, slot: int, rtype: int, sector: int, *, out: bytes = b"", in_len: int = 0) -> None:
        base = BUF + 0x2000 * slot
        d = 3 * slot
        self.memory.write(base, b.REQUEST_HEADER.pack(rtype, 0, sector))
        self.memory.write(base + 0x1F00, b"\xff")
        chain = [(base, 16, NEXT)]
        if out:
            self.memory.write(base + 0x100, out)
            chain.append((base + 0x100, len(out), NEXT))
        elif in_len:
            chain.append((base + 0x100, in_len, NEXT | WRITE))
        chain.append((base + 0x1F00, 1, WRITE))
        for i, (addr, length, flags) in enumerate(chain):
            nxt = d + i + 1 if flags & NEXT else 0
            self.memory.write(DESC + 16 * (d + i), struct.pack("<QIHH", addr, length, flags, nxt))
        self.memory.write(AVAIL + 4 + 2 * (self.avail % QSIZE), struct.pack("<H", d))
        self.avail += 1
        self.memory.write(AVAIL + 2, struct.pack("<H", self.avail))

    def status(self, slot: int) -> int:
        return self.memory.read(BUF + 0x2000 * slot + 0x1F00, 1)[0]

    def data(self, slot: int, length: int) -> bytes:
        return self.memory.read(BUF + 0x2000 * slot + 0x100, length)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(USED + 2, 2))[0]


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_pymvm_frontend_sets_up_qsd_vhost_user_blk_export_and_moves_data(qsd_export) -> None:
    sock, image, proc = qsd_export
    fe = VhostUserBlkBackend(sock, connect_timeout=20)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        features = fe.features()
        for bit in (VIRTIO_F_VERSION_1, b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_BLK_SIZE,
                    b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES):
            assert features >> bit & 1, f"qsd does not offer feature bit {bit}"
        assert fe.protocol_features & PF.CONFIG
        model = b.VirtioBlkDevice(fe)  # the config space, read with GET_CONFIG
        assert model.capacity == IMAGE_MIB * 2048
        assert model.config.blk_size == 512 and model.config.seg_max > 0
        assert model.config.num_queues >= 1
        with GuestMemory(8 << 20) as memory:
            q = QueueConfig(index=0, size=QSIZE, ready=True, desc_addr=DESC, driver_addr=AVAIL,
                            device_addr=USED)
            acked = features & model.avail_features() & (
                1 << VIRTIO_F_VERSION_1 | 1 << b.VIRTIO_BLK_F_FLUSH | 1 << b.VIRTIO_BLK_F_BLK_SIZE
                | 1 << b.VIRTIO_BLK_F_SEG_MAX)
            ctx = ActivationContext(acked_features=acked, queues=[q], kick_fds=[kick],
                                    call_fds=[call], mem_regions=memory.regions)
            model.activate(ctx)
            drv = Driver(memory)
            drv.submit(0, b.VIRTIO_BLK_T_OUT, 10, out=b"P" * 4096)
            drv.submit(1, b.VIRTIO_BLK_T_FLUSH, 0)
            os.eventfd_write(kick, 1)
            wait_until(lambda: drv.used_idx() == 2)
            assert drv.status(0) == drv.status(1) == b.VIRTIO_BLK_S_OK
            drv.submit(2, b.VIRTIO_BLK_T_IN, 9, in_len=2048)
            drv.submit(3, b.VIRTIO_BLK_T_IN, IMAGE_MIB * 2048, in_len=512)  # past the end
            os.eventfd_write(kick, 1)
            wait_until(lambda: drv.used_idx() == 4)
            assert drv.status(2) == b.VIRTIO_BLK_S_OK
            assert drv.data(2, 2048) == struct.pack("<Q", 9).ljust(512, b"q") + b"P" * 1536
            assert drv.status(3) == b.VIRTIO_BLK_S_IOERR
            assert os.eventfd_read(call) >= 1  # qsd signalled the guest through our irqfd
            assert fe.stop() == {0: RingPosition(next_avail=4, used_idx=4)}
        assert proc.poll() is None  # the export is still up
        with open(image, "rb") as f:
            f.seek(10 * 512)
            assert f.read(4096) == b"P" * 4096
    finally:
        fe.close()
        os.close(kick)
        os.close(call)
