"""pymvm's vhost-user front-end against DPDK's vhost back-end (testpmd ``net_vhost``).

No guest: the test plays the virtio driver in a memfd-backed GuestMemory, lays out the rings,
queues one packet on the tx ring and checks that testpmd receives it through the rings pymvm
handed over (memory table, ring addresses, kick/call fds).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.memory import GuestMemory
from pymvm.vhost.kernel import VIRTIO_F_VERSION_1
from pymvm.vhost.user.frontend import VhostUserNetBackend

pytestmark = pytest.mark.interop

QUEUE_SIZE = 256
RX, TX = 0, 1
RING_GPA = {RX: 0x100000, TX: 0x200000}
PACKET_GPA = 0x300000
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (VERSION_1)
FRAME = bytes.fromhex("ffffffffffff" "525400123456" "0800") + bytes(46)  # 60-byte broadcast


class PmdProcess:
    """dpdk-testpmd in interactive mode, its output collected in a file."""

    def __init__(self, binary: str, socket_path: str, workdir: Path, tag: str) -> None:
        self.output = workdir / "testpmd.log"
        self.runtime_dir = Path("/var/run/dpdk") / f"pymvm-nv-{tag}"
        self._log = open(self.output, "wb")
        self.proc = subprocess.Popen(
            # stdbuf: testpmd's command output is stdio-buffered when not on a terminal.
            ["stdbuf", "-oL", binary, "-l", "0,1", "--no-pci", "--no-huge", "-m", "1024",
             f"--file-prefix=pymvm-nv-{tag}",
             "--vdev", f"net_vhost0,iface={socket_path},queues=1",
             "--", "-i", "--total-num-mbufs=8192"],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text()[start:])
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"testpmd never printed {pattern!r}; its output:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)  # EAL leaves it behind


@pytest.fixture
def testpmd() -> str:
    path = shutil.which("dpdk-testpmd")  # conftest's require_peers skips without it
    if path is None:
        pytest.skip("dpdk-testpmd is not installed: apt-get install dpdk-dev")
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pymvm-nv-"))  # short: unix socket path limit
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def queue(index: int) -> QueueConfig:
    base = RING_GPA[index]
    return QueueConfig(index=index, size=QUEUE_SIZE, ready=True, desc_addr=base,
                       driver_addr=base + 16 * QUEUE_SIZE, device_addr=base + 0x2000)


def post_tx_packet(memory: GuestMemory, frame: bytes = FRAME) -> None:
    """Be the driver: one descriptor (header + frame) made available on the tx ring."""
    q = queue(TX)
    packet = bytes(VNET_HDR_SIZE) + frame
    memory.write(PACKET_GPA, packet)
    memory.write(q.desc_addr, struct.pack("<QIHH", PACKET_GPA, len(packet), 0, 0))
    memory.write(q.driver_addr + 4, struct.pack("<H", 0))  # ring[0] = descriptor 0
    memory.write(q.driver_addr + 2, struct.pack("<H", 1))  # avail->idx = 1


def used_idx(memory: GuestMemory, index: int) -> int:
    return struct.unpack("<H", memory.read(queue(index).device_addr + 2, 2))[0]


def test_testpmd_vhost_backend_runs_the_rings_pymvm_hands_it(
        testpmd: str, workdir: Path, unique: str) -> None:
    socket_path = str(workdir / "vu.sock")
    pmd = PmdProcess(testpmd, socket_path, workdir, unique)
    kicks = [os.eventfd(0, os.EFD_CLOEXEC) for _ in RING_GPA]
    calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in RING_GPA]
    memory = GuestMemory(64 << 20)
    frontend: VhostUserNetBackend | None = None
    try:
        pmd.wait_for(r"testpmd> ")
        frontend = VhostUserNetBackend(socket_path, "client", connect_timeout=20)
        assert frontend.features() & VIRTIO_F_VERSION_1
        ctx = ActivationContext(acked_features=VIRTIO_F_VERSION_1, queues=[queue(RX), queue(TX)],
                                kick_fds=kicks, call_fds=calls, mem_regions=memory.regions)
        post_tx_packet(memory)
        frontend.activate(ctx, memory.regions)
        pmd.wait_for(r"virtio is now ready for processing")
        pmd.wait_for(r"Port 0: link state change event")
        mark = len(pmd.text())
        pmd.command("show port info 0")
        pmd.wait_for(r"Link status: up", start=mark)

        pmd.command("set fwd rxonly")
        pmd.command("start")
        os.eventfd_write(kicks[TX], 1)
        deadline = time.monotonic() + 20
        while used_idx(memory, TX) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used_idx(memory, TX) == 1, "testpmd never consumed the tx descriptor"
        assert os.eventfd_read(calls[TX]) >= 1  # it signalled the guest through our call fd
        mark = len(pmd.text())
        pmd.command("show port stats 0")  # port stats: start's rx flush hides it from fwd stats
        pmd.wait_for(r"RX-packets: 1\s+RX-missed: 0\s+RX-bytes:\s+60\b", start=mark)
        pmd.command("stop")

        bases = frontend.reset()
        assert bases == {RX: 0, TX: 1}
        pmd.wait_for(r"new device status\(0x00000000\)")
        frontend.close()
        pmd.wait_for(r"vhost peer closed", timeout=10)
    finally:
        if frontend is not None:
            frontend.close()
        pmd.stop()
        memory.close()
        for fd in kicks + calls:
            os.close(fd)
    assert pmd.proc.returncode is not None, "testpmd is still running"
    assert not os.path.exists(socket_path)
