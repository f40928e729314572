"""DPDK testpmd as a peer for tests and benchmarks (one launcher for both).

testpmd runs non-interactively: forwarding starts at once, a newline on its stdin stops it
and makes it print its totals. It needs no hugepages here (``--no-huge``) and no PCI device;
its ports are virtual devices (``--vdev``): a vhost-user port (``net_vhost0,iface=SOCK``) for
a VM and a TAP (``net_tap0,iface=NAME``) to the host, forwarded to each other (``io``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

TESTPMD = "dpdk-testpmd"
START_TIMEOUT_S = 180.0  # a DPDK start-up inside the emulated nested host


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def lcores() -> list[str]:
    """Two lcores (main, forwarding): on CPUs 0 and 1, or both on CPU 0 on a 1-CPU host."""
    return ["-l", "0,1"] if len(os.sched_getaffinity(0)) >= 2 else ["--lcores", "0@0,1@0"]


class Testpmd:
    """dpdk-testpmd with ``vdevs``, forwarding in ``forward_mode``, its output in ``log``."""

    def __init__(self, vdevs: list[str], forward_mode: str, log: Path, prefix: str, *,
                 memory_mb: int = 1024) -> None:
        """``memory_mb``: DPDK's memory (``-m``). Without hugepages DPDK touches all of it at
        start: 1 GiB is seconds of page faults in the emulated nested host, so a peer that
        only forwards a few thousand mbufs (8192 of about 2 KiB) can ask for less."""
        self.log, self.prefix = log, prefix
        self._out = log.open("wb")
        argv = ["stdbuf", "-oL", TESTPMD, *lcores(), "--no-pci", "--no-huge", "-m",
                str(memory_mb), "--single-file-segments", f"--file-prefix={prefix}"]
        for vdev in vdevs:
            argv += ["--vdev", vdev]
        argv += ["--", f"--forward-mode={forward_mode}", "--auto-start", "--total-num-mbufs=8192"]
        # stdin stays open: testpmd (without -i) exits once it reads a line there.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, extra: Callable[[], bool] = lambda: True,
                     timeout: float = START_TIMEOUT_S) -> None:
        try:
            wait_until(lambda: "Press enter to exit" in self.text() and extra(), timeout,
                       "testpmd start", self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.text()[-3000:]}") from None

    def pause(self) -> None:
        """Stop the process (SIGSTOP) while no VM uses it: its forwarding core busy-polls,
        which on a host with one CPU takes a share from everything else."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused testpmd run again (SIGCONT) before a VM connects to it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def finish(self) -> str:
        """Stop forwarding and exit; testpmd's whole output."""
        if self.proc.poll() is None:
            self.resume()  # a paused testpmd reads no stdin
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.text()
