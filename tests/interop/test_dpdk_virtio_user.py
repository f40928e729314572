"""`pymvm vhost-user net` against DPDK's virtio-user front-end (testpmd plays the guest).

Packets are counted on both sides: testpmd's port statistics, and the TAP's kernel counters
(guest -> TAP) or the frames we inject into the TAP (TAP -> guest).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymvm.testing.backends import unix_socket_listening
from tests.interop.conftest import TESTPMD

pytestmark = pytest.mark.interop

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5
TXONLY_SECONDS = 3.0


def tap_counter(tap: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{tap}/statistics/{name}").read_text())


class Backend:
    """`pymvm vhost-user net` as a child process; stopped with SIGTERM like a user would."""

    def __init__(self, sock: str, tap: str, log: Path) -> None:
        self.sock, self.tap = sock, tap
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            # DPDK's --no-huge memfd is made without MFD_ALLOW_SEALING: it cannot be sealed
            # against shrinking, so the back-end accepts it only when told to trust the peer.
            [sys.executable, "-m", "pymvm.cli", "vhost-user", "net", "--socket", sock, "--tap", tap,
             "--allow-unsealed-memory"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.log_path = log

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        # Listening, not only bound: DPDK's virtio_user connects once and gives up if refused.
        while not (unix_socket_listening(self.sock)
                   and os.path.exists(f"/sys/class/net/{self.tap}")):
            assert self.proc.poll() is None, f"back-end exited early: {self.log_path.read_text()}"
            assert time.monotonic() < deadline, "back-end did not start listening"
            time.sleep(0.05)
        # No IPv6 autoconfiguration chatter on the guest's RX queue.
        Path(f"/proc/sys/net/ipv6/conf/{self.tap}/disable_ipv6").write_text("1")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class PmdFrontend:
    """dpdk-testpmd in interactive mode with a virtio-user port on the back-end's socket."""

    def __init__(self, sock: str, prefix: str) -> None:
        self.prefix = prefix
        assert TESTPMD is not None
        self.proc = subprocess.Popen(
            # stdbuf: testpmd's command output is stdio-buffered when not on a terminal.
            ["stdbuf", "-oL", TESTPMD, "-l", "0,1", "--no-pci", "--no-huge", "-m", "1024", "--single-file-segments",
             f"--file-prefix={prefix}", f"--vdev=net_virtio_user0,path={sock},queues=1",
             "--", "-i", "--total-num-mbufs=8192"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(r"testpmd> ", start=0, timeout=60)
        assert "Port 0: " in self.output or "Configuring Port 0" in self.output, self.output

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read(1), ""):  # type: ignore[union-attr]
            with self._lock:
                self.output += chunk

    def wait_for(self, pattern: str, *, start: int, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = re.compile(pattern).search(self.output, start)
            if found:
                return found
            if self.proc.poll() is not None:  # it will never print it: fail now, not later
                self._reader.join(5)  # the rest of what it printed
                with self._lock:
                    found = re.compile(pattern).search(self.output, start)
                assert found, (f"testpmd exited ({self.proc.returncode}) before printing "
                               f"{pattern!r}: {self.output[-2000:]}")
                return found
            assert time.monotonic() < deadline, f"testpmd never printed {pattern!r}: {self.output[-2000:]}"
            time.sleep(0.05)

    def command(self, line: str) -> int:
        with self._lock:
            start = len(self.output)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return start

    def port_stats(self) -> tuple[int, int]:
        """(RX-packets, TX-packets) of port 0 from `show port stats all`."""
        start = self.command("show port stats all")
        found = self.wait_for(r"RX-packets:\s+(\d+)\s+RX-missed[\s\S]*?TX-packets:\s+(\d+)\s+TX-errors",
                              start=start)
        self.wait_for(r"Tx-bps", start=start)
        return int(found.group(1)), int(found.group(2))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)


@pytest.fixture
def backend(tmp_path: Path, unique: str) -> Iterator[Backend]:
    b = Backend(str(tmp_path / "vu.sock"), f"pvmvu{unique}", tmp_path / "backend.log")
    try:
        b.wait_ready()
        yield b
    finally:
        rc = b.stop()
        # Everything the back-end owned is gone: its socket file and its TAP.
        assert not os.path.exists(b.sock)
        assert not os.path.exists(f"/sys/class/net/{b.tap}")
        assert rc == 0, b.log_path.read_text()[-3000:]


@pytest.fixture
def testpmd_factory(unique: str) -> Iterator:
    started: list[PmdFrontend] = []

    def start(sock: str) -> PmdFrontend:
        started.append(PmdFrontend(sock, f"pymvm-vu-{unique}-{len(started)}"))
        return started[-1]

    yield start
    for t in started:
        t.close()


def run_txonly(testpmd: PmdFrontend, backend: Backend) -> tuple[int, int, float]:
    """Run txonly for a few seconds; (testpmd TX packets, TAP rx packets, seconds)."""
    before = tap_counter(backend.tap, "rx_packets")
    testpmd.command("set fwd txonly")
    began = time.monotonic()
    testpmd.wait_for(r"packets/burst", start=testpmd.command("start"))
    time.sleep(TXONLY_SECONDS)
    testpmd.wait_for(r"Accumulated forward statistics", start=testpmd.command("stop"))
    seconds = time.monotonic() - began
    _, tx = testpmd.port_stats()
    deadline = time.monotonic() + 5  # let the back-end drain the last burst it was kicked for
    while tap_counter(backend.tap, "rx_packets") - before < tx and time.monotonic() < deadline:
        time.sleep(0.05)
    return tx, tap_counter(backend.tap, "rx_packets") - before, seconds


def test_testpmd_txonly_packets_all_arrive_on_the_tap(backend: Backend, testpmd_factory) -> None:
    testpmd = testpmd_factory(backend.sock)
    tx, on_tap, seconds = run_txonly(testpmd, backend)
    print(f"\ntestpmd txonly -> pymvm vhost-user net -> TAP: {tx} packets in {seconds:.1f} s, "
          f"{tx / seconds:,.0f} pps")
    assert tx > 1000
    assert on_tap == tx


def test_frames_injected_into_the_tap_are_received_by_testpmd(backend: Backend, testpmd_factory) -> None:
    testpmd = testpmd_factory(backend.sock)
    testpmd.command("set fwd rxonly")
    testpmd.wait_for(r"packets/burst", start=testpmd.command("start"))
    rx_before, _ = testpmd.port_stats()
    count = 2000
    taken_before = tap_counter(backend.tap, "tx_packets")
    inject = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        inject.bind((backend.tap, 0))
        for i in range(count):
            frame = (b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!HI", ETHERTYPE, i)).ljust(64, b"\0")
            inject.send(frame)
            if i % 100 == 99:
                # Stay well under the TAP's 1000-packet queue however slowly the back-end
                # reads it (a loaded machine): at most 500 frames not yet taken by it.
                paced = time.monotonic() + 10
                while (i + 1 - (tap_counter(backend.tap, "tx_packets") - taken_before) > 500
                       and time.monotonic() < paced):
                    time.sleep(0.005)
    finally:
        inject.close()
    deadline = time.monotonic() + 10
    while (received := testpmd.port_stats()[0] - rx_before) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tap_counter(backend.tap, "tx_packets") >= count
    assert count <= received <= count + 20  # a few host-originated frames may join ours


def test_garbage_client_is_dropped_and_testpmd_is_served_next(backend: Backend, testpmd_factory) -> None:
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.settimeout(5)
    try:
        garbage.connect(backend.sock)
        garbage.sendall(b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"\xff" * 64)  # bad flags/size
        assert garbage.recv(64) == b""  # the back-end hung up on us
    finally:
        garbage.close()
    assert backend.proc.poll() is None  # and is still running
    testpmd = testpmd_factory(backend.sock)
    tx, on_tap, _ = run_txonly(testpmd, backend)
    assert tx > 0 and on_tap == tx
