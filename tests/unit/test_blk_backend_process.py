"""The built-in blk back-end as the VMM's child: it serves the image the VMM locked, is
started again after kill -9 (the front-end reconnects), and close() frees the image."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import pytest

from pymvm.images.disk import DiskImageError, open_image
from pymvm.vhost.backends.process import BuiltinBlkBackendProcess
from pymvm.vhost.user.frontend import VhostUserBlkBackend


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_builtin_blk_process_serves_restarts_after_kill_and_frees_the_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    proc = BuiltinBlkBackendProcess.start(image, serial="proc-test", ready_timeout=60)
    fe = None
    try:
        with pytest.raises(DiskImageError, match="in use by another VM"):
            open_image(image)  # the VMM holds the lock, not only the child
        fe = VhostUserBlkBackend(proc.socket_path, connect_timeout=10)
        assert struct.unpack("<Q", fe.get_config(0, 8))[0] == (1 << 20) // 512
        first = proc.process.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: proc.restarts == 1 and proc.process.pid != first)
        wait_until(lambda: fe.connections == 2 and fe.connected)
        assert struct.unpack("<Q", fe.get_config(0, 8))[0] == (1 << 20) // 512
        with pytest.raises(DiskImageError, match="in use"):
            open_image(image)  # still locked across the restart
    finally:
        if fe is not None:
            fe.close()
        proc.close()
    assert proc.process.poll() is not None
    assert not os.path.exists(proc.socket_path)
    open_image(image).close()  # the lock went with close()


def test_requests_in_flight_when_the_backend_is_killed_complete_after_its_restart(
        tmp_path: Path) -> None:
    """20 writes of 256 KiB are kicked and the back-end is killed at once: the VMM-side
    process object starts a new one, the front-end reconnects and hands it the inflight
    region, and every write completes with status OK and lands on the image."""
    from pymvm.devices.virtio import blk as b
    from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1
    from pymvm.devices.virtio.device import ActivationContext, QueueConfig
    from pymvm.memory import GuestMemory
    from tests.interop.test_qsd_vhost_user_blk import AVAIL, DESC, QSIZE, USED, Driver

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 << 20))
    proc = BuiltinBlkBackendProcess.start(image, ready_timeout=60)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe = VhostUserBlkBackend(proc.socket_path, connect_timeout=10)
    count, size = 20, 256 << 10
    try:
        with GuestMemory(16 << 20) as memory:
            q = QueueConfig(index=0, size=QSIZE, ready=True, desc_addr=DESC, driver_addr=AVAIL,
                            device_addr=USED)
            fe.start(ActivationContext(1 << VIRTIO_F_VERSION_1, [q], [kick], [call],
                                       memory.regions), memory.regions)
            drv = Driver(memory)
            # Slot i: header at 0x40000 + 0x2000 i, data at + 0x100: 256 KiB would overlap
            # the next slot, so the data of slot i goes at 8 MiB + 256 KiB * i instead.
            for i in range(count):
                drv.submit(i, b.VIRTIO_BLK_T_OUT, i * size // 512, out=b"x")
                data_gpa = (8 << 20) + size * i
                memory.write(data_gpa, bytes([65 + i]) * size)
                memory.write(DESC + 16 * (3 * i + 1),
                             struct.pack("<QIHH", data_gpa, size, 1, 3 * i + 2))
            first = proc.process.pid
            os.eventfd_write(kick, 1)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: drv.used_idx() == count, 60)
            assert [drv.status(i) for i in range(count)] == [b.VIRTIO_BLK_S_OK] * count
            # The first back-end may have finished some (or all) before the signal landed;
            # it is started again either way, and the front-end comes back to it.
            wait_until(lambda: proc.restarts == 1 and fe.connections == 2, 60)
            fe.stop()
    finally:
        fe.close()
        proc.close()
        os.close(kick)
        os.close(call)
    data = image.read_bytes()
    for i in range(count):
        assert data[i * size : (i + 1) * size] == bytes([65 + i]) * size, i


def test_blk_backend_process_loads_neither_the_net_backend_nor_pyroute2() -> None:
    """A restarted blk back-end is what the guest's disk waits for: its start-up must not pay
    for the net back-end's TAP and netlink modules (pyroute2 was half of its imports)."""
    import subprocess
    import sys

    # What `pymvm vhost-user blk` imports (cli.cmd_vhost_user_blk), in a fresh interpreter.
    code = ("import sys, pymvm.cli, pymvm.sandbox, pymvm.syscalls, pymvm.images.disk, "
            "pymvm.vhost.backends.blk, pymvm.vhost.user.backend, pymvm.vhost.user.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2' "
            "or m.startswith(('pymvm.vhost.backends.net', 'pymvm.net'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
