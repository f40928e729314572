"""A sequence-numbered UDP stream through a guest, for back-end swap tests and benchmarks.

The guest runs ``pymvm-udp-echo PORT`` (udp_echo.c, built static here and put in the test
initramfs); the host sends numbered datagrams at a fixed rate and keeps when each echo came
back. Over any time window this gives the longest time without an echo (the data-plane gap
of a swap or a back-end restart, whichever direction stalled) and the datagrams sent then
that never came back.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("udp_echo.c")
GUEST_PROGRAM = "pymvm-udp-echo"
ECHO_PORT = 7777


def build_udp_echo() -> Path:
    """The static echo program, kept in the image cache (a stable path: the initramfs that
    carries it keeps its cache key)."""
    from pymvm.images.cache import cache_root

    out = cache_root() / "testing"
    out.mkdir(parents=True, exist_ok=True)
    exe = out / GUEST_PROGRAM
    if not exe.exists() or exe.stat().st_mtime < SOURCE.stat().st_mtime:
        tmp = exe.with_suffix(".new")
        subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp), str(SOURCE)], check=True)
        os.replace(tmp, exe)
    return exe


def initramfs_with_udp_echo() -> Path:
    """The test initramfs with iperf3 and the echo program."""
    from pymvm.images.initramfs import build_initramfs

    return build_initramfs(extra_binaries=["iperf3", str(build_udp_echo())],
                           log=lambda *_: None)


class UdpStream:
    """Numbered datagrams from ``host`` to the echo at ``guest`` at ``pps``; arrival times."""

    def __init__(self, host: str, guest: str, *, pps: int = 1000, port: int = ECHO_PORT) -> None:
        self.pps = pps
        self.max_burst = max(1, pps // 50)  # 20 ms of the stream at once, at most
        self.sent: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self._lock = threading.Lock()  # the two threads write, readers take snapshots
        self.stop = threading.Event()
        self.sending = threading.Event()  # cleared by stop_sending(): echoes are still taken
        self.sending.set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for a few seconds of echoes: a receiving thread that waits for the GIL (the
        # test's other threads) must not lose datagrams the data plane delivered. Root may
        # go past the sysctl limits (the ...FORCE options).
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, plain, 4 << 20)
        self.sock.bind((host, 0))
        self.sock.connect((guest, port))
        self.sock.settimeout(0.2)
        # The sender never waits: while the data plane stalls, the datagrams queued towards
        # the guest (qdisc, TAP ring) fill the socket's send buffer, and a blocking send would
        # stop the clock of the stream (datagrams sent late, stamped early). One that cannot
        # be sent counts as sent then and lost.
        self._tx = self.sock.dup()
        self._tx.setblocking(False)
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        t0 = time.monotonic()
        seq = 0
        while not self.stop.is_set() and self.sending.is_set():
            now = time.monotonic()
            due = int((now - t0) * self.pps) + 1
            # A sender that was itself held up (CPU, the GIL) skips the slots it missed
            # instead of sending them in one burst: thousands of datagrams at once overflow
            # the queues in front of the guest, and the loss measured would be the sender's.
            # Skipped numbers are never sent, so they count neither as sent nor as lost.
            seq = max(seq, due - self.max_burst)
            while seq < due:
                sent_at = time.monotonic()
                try:
                    self._tx.send(struct.pack("!Q", seq).ljust(64, b"\0"))
                except OSError:
                    pass  # a full send buffer, or an ICMP error from an earlier datagram
                with self._lock:
                    self.sent[seq] = sent_at
                seq += 1
            time.sleep(0.004)

    def _receive(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(2048)
            except OSError:  # the timeout included
                continue
            if len(data) >= 8:
                with self._lock:
                    self.received.setdefault(struct.unpack_from("!Q", data)[0], time.monotonic())

    def stop_sending(self) -> None:
        """No more datagrams; the echoes of those already sent are still recorded."""
        self.sending.clear()
        self.threads[0].join(5)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self._tx.close()
        self.sock.close()

    def _snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        with self._lock:
            return dict(self.sent), dict(self.received)

    def echoes_since(self, t: float) -> int:
        _, received = self._snapshot()
        return sum(1 for r in received.values() if r >= t)

    def wait_flowing(self, timeout: float, *, share: float = 0.5) -> bool:
        """Until at least ``share`` of the last second's datagrams came back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.echoes_since(time.monotonic() - 1.0) >= self.pps * share:
                return True
            time.sleep(0.1)
        return False

    def timeline(self, t0: float, t1: float, step: float = 1.0) -> list[list[float]]:
        """Per ``step`` from ``t0`` to ``t1``: [seconds after t0, datagrams sent then, how
        many of those were echoed]; how delivery moves around each swap."""
        sent_at, received = self._snapshot()
        slots = max(0, int((t1 - t0) / step))
        rows = [[round(i * step, 3), 0, 0] for i in range(slots)]
        for seq, t in sent_at.items():
            i = int((t - t0) / step)
            if t0 <= t and i < slots:
                rows[i][1] += 1
                rows[i][2] += seq in received
        return rows

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Longest time without an echo in [t0, t1] and the datagrams sent then never echoed."""
        sent_at, received = self._snapshot()
        arrivals = sorted(r for r in received.values() if t0 <= r <= t1)
        points = [t0, *arrivals, t1]
        gap = max(b - a for a, b in zip(points, points[1:]))
        sent = [s for s, t in sent_at.items() if t0 <= t <= t1]
        lost = sum(1 for s in sent if s not in received)
        return {"gap_ms": round(gap * 1000, 1), "lost": lost, "sent": len(sent)}
