"""The blk back-end under its seccomp allowlist: every request type, the inflight region and
a clean stop run with the filter on (a missing entry would kill it by SIGSYS), a forbidden
syscall kills it and is named, and docs/seccomp.md lists every entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pymvm import syscalls
from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1
from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.memory import GuestMemory
from pymvm.vhost.user.frontend import VhostUserBlkBackend
from tests.interop.test_qsd_vhost_user_blk import AVAIL, DESC, QSIZE, USED, Driver, wait_until

REPO = Path(__file__).resolve().parents[2]

if not syscalls.available():
    pytest.skip("libseccomp's Python binding is missing: apt-get install python3-seccomp",
                allow_module_level=True)


def start_backend(tmp: Path, image: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    sock = str(tmp / "blk.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "vhost-user", "blk",
                             "--socket", sock, "--image", str(image), "--serial", "sc"],
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, sock


def events(stderr: bytes) -> list[dict]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


def test_filtered_blk_backend_serves_every_request_type_and_the_inflight_region() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pymvm-sc-"))
    image = tmp / "disk.img"
    image.write_bytes(b"i" * (1 << 20))
    proc, sock = start_backend(tmp, image)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe = VhostUserBlkBackend(sock, connect_timeout=30)
    try:
        with GuestMemory(8 << 20) as memory:
            q = QueueConfig(index=0, size=QSIZE, ready=True, desc_addr=DESC, driver_addr=AVAIL,
                            device_addr=USED)
            acked = (1 << VIRTIO_F_VERSION_1 | 1 << b.VIRTIO_BLK_F_FLUSH
                     | 1 << b.VIRTIO_BLK_F_DISCARD | 1 << b.VIRTIO_BLK_F_WRITE_ZEROES)
            fe.start(ActivationContext(acked, [q], [kick], [call], memory.regions), memory.regions)
            drv = Driver(memory)
            drv.submit(0, b.VIRTIO_BLK_T_OUT, 0, out=b"w" * 8192)
            drv.submit(1, b.VIRTIO_BLK_T_FLUSH, 0)
            os.eventfd_write(kick, 1)  # in flight together, requests have no order: wait
            wait_until(lambda: drv.used_idx() == 2, 30)
            drv.submit(2, b.VIRTIO_BLK_T_DISCARD, 0, out=b.DISCARD_SEGMENT.pack(64, 8, 0))
            drv.submit(3, b.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=b.DISCARD_SEGMENT.pack(128, 8, 0))
            drv.submit(4, b.VIRTIO_BLK_T_IN, 0, in_len=4096)
            drv.submit(5, b.VIRTIO_BLK_T_GET_ID, 0, in_len=20)
            os.eventfd_write(kick, 1)
            wait_until(lambda: drv.used_idx() == 6, 30)
            assert [drv.status(i) for i in range(6)] == [b.VIRTIO_BLK_S_OK] * 6
            assert drv.data(4, 4096) == b"w" * 4096 and drv.data(5, 2) == b"sc"
            fe.stop()
        assert proc.poll() is None  # alive: nothing it did was outside its list
    finally:
        fe.close()
        os.close(kick)
        os.close(call)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    logs = events(err)
    assert any(e["event"] == "seccomp_installed" and e["process"] == "vhost-user-blk-backend"
               for e in logs)
    assert not [e for e in logs if e["event"] == "seccomp_violation"]
    assert proc.returncode == 0
    data = image.read_bytes()
    assert data[64 * 512 : 72 * 512] == bytes(4096) and data[128 * 512 : 136 * 512] == bytes(4096)


def test_forbidden_syscall_kills_the_filtered_blk_backend_and_is_named(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    tmp = Path(tempfile.mkdtemp(prefix="pymvm-sc-"))
    proc, _ = start_backend(tmp, image, env={"PYMVM_SECCOMP_SELF_TEST": "backend"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGSYS, err.decode()[-2000:]
    (violation,) = [e for e in events(err) if e["event"] == "seccomp_violation"]
    assert violation["syscall"] == "reboot" and violation["process"] == "vhost-user-blk-backend"


def test_seccomp_doc_lists_every_blk_backend_syscall_with_its_reason() -> None:
    doc = (REPO / "docs" / "seccomp.md").read_text()
    for name, why in syscalls.BLK_BACKEND.items():
        assert f"| `{name}` | {why} |" in doc, f"docs/seccomp.md lacks {name}"


RESTART_UNDER_VMM_FILTER = '''
import os, signal, struct, sys, time
from pathlib import Path
from pymvm import sandbox, syscalls
from pymvm.vhost.backends.process import BuiltinBlkBackendProcess
from pymvm.vhost.user.frontend import VhostUserBlkBackend

sandbox.settings.seccomp = True
proc = BuiltinBlkBackendProcess.start(Path(sys.argv[1]), ready_timeout=60)
fe = VhostUserBlkBackend(proc.socket_path, connect_timeout=30)
syscalls.prepare()
syscalls.install_vmm()  # as pymvm run does before the vCPUs start
first = proc.process.pid
os.kill(first, signal.SIGKILL)
deadline = time.monotonic() + 90
while not (proc.restarts >= 1 and fe.connections == 2 and fe.connected):
    assert time.monotonic() < deadline, f"no reconnect: restarts={proc.restarts}"
    time.sleep(0.05)
time.sleep(1)
assert proc.restarts == 1, proc.restarts  # the new one did not die (SIGSYS) in turn
print("CAPACITY", struct.unpack("<Q", fe.get_config(0, 8))[0], flush=True)
fe.close()
proc.close()
'''


def test_blk_backend_restarted_by_a_filtered_vmm_survives_both_filters(tmp_path: Path) -> None:
    """A back-end the VMM restarts inherits the VMM's filter (then adds its own): what it
    does at start (the image lock) and while serving must be on the VMM's list too."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    done = subprocess.run([sys.executable, "-c", RESTART_UNDER_VMM_FILTER, str(image)],
                          capture_output=True, timeout=240)
    err = done.stderr.decode()
    assert not [e for e in events(done.stderr) if e["event"] == "seccomp_violation"], err[-3000:]
    assert done.returncode == 0, err[-3000:]
    assert f"CAPACITY {(1 << 20) // 512}" in done.stdout.decode()
