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
