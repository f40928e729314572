"""Boot timer: the guest's init writes BOOT_TIMER_MAGIC to BOOT_TIMER_ADDR when it is up.

The measurement starts at this process's start (not at VM creation), so it covers Python
start-up, config parsing, kernel loading and the guest's boot.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import structlog

from pymvm.layout import BOOT_TIMER_MAGIC


def process_start_monotonic_ns(pid: int | str = "self") -> int:
    """When process ``pid`` started, on the time.monotonic_ns() clock.

    /proc/<pid>/stat field 22 is the start time in clock ticks since boot (CLOCK_BOOTTIME);
    mapping it through the current BOOTTIME - MONOTONIC offset gives tick resolution (10 ms
    at USER_HZ=100). Falls back to "now" where /proc is unavailable.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return time.monotonic_ns()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    start_ticks = int(fields[19])  # field 22 overall; fields[0] is field 3
    start_boottime_ns = start_ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    now_mono = time.monotonic_ns()
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return now_mono - (now_boot - start_boottime_ns)


class BootTimer:
    """MMIO device at ``BOOT_TIMER_ADDR`` (``BOOT_TIMER_SIZE`` bytes); thread-safe."""

    def __init__(self, start_ns: int, log: Any = None) -> None:
        self._start_ns = start_ns
        self._log = log if log is not None else structlog.get_logger()
        self._lock = threading.Lock()
        self.boot_time_us: int | None = None
        self.cpu_us: int | None = None
        self.booted = threading.Event()

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        # Any width: busybox `devmem ADDR 8|32|64 123` all have the magic in the low byte.
        if offset != 0 or not data or data[0] != BOOT_TIMER_MAGIC:
            return
        now = time.monotonic_ns()
        cpu_us = time.process_time_ns() // 1000
        with self._lock:
            if self.boot_time_us is not None:
                return  # first signal wins; a re-run init must not move the measurement
            self.boot_time_us = (now - self._start_ns) // 1000
            self.cpu_us = cpu_us
        self._log.info("guest_boot_time", boot_time_us=self.boot_time_us, cpu_us=cpu_us)
        self.booted.set()
