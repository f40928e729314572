import time

import pytest

from pymvm.devices.boot_timer import BootTimer, process_start_monotonic_ns
from pymvm.layout import BOOT_TIMER_MAGIC


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))


@pytest.fixture
def log() -> RecordingLog:
    return RecordingLog()


def test_magic_byte_records_boot_time_and_logs_once(log: RecordingLog) -> None:
    start = time.monotonic_ns() - 5_000_000
    timer = BootTimer(start, log=log)
    timer.write(0, bytes([BOOT_TIMER_MAGIC]))
    assert timer.booted.is_set()
    assert timer.boot_time_us is not None and timer.boot_time_us >= 5000
    assert [e for e, _ in log.events] == ["guest_boot_time"]
    fields = log.events[0][1]
    assert fields["boot_time_us"] == timer.boot_time_us
    assert fields["cpu_us"] > 0


def test_other_values_are_ignored(log: RecordingLog) -> None:
    timer = BootTimer(time.monotonic_ns(), log=log)
    timer.write(0, bytes([BOOT_TIMER_MAGIC + 1]))
    timer.write(0, bytes([0]))
    assert timer.boot_time_us is None
    assert not timer.booted.is_set()
    assert log.events == []


def test_magic_at_nonzero_offset_is_ignored(log: RecordingLog) -> None:
    timer = BootTimer(time.monotonic_ns(), log=log)
    timer.write(4, bytes([BOOT_TIMER_MAGIC]))
    assert timer.boot_time_us is None


def test_wide_write_with_magic_low_byte_counts(log: RecordingLog) -> None:
    timer = BootTimer(time.monotonic_ns(), log=log)
    timer.write(0, BOOT_TIMER_MAGIC.to_bytes(4, "little"))
    assert timer.booted.is_set()


def test_second_signal_does_not_move_the_measurement(log: RecordingLog) -> None:
    timer = BootTimer(time.monotonic_ns(), log=log)
    timer.write(0, bytes([BOOT_TIMER_MAGIC]))
    first = timer.boot_time_us
    time.sleep(0.002)
    timer.write(0, bytes([BOOT_TIMER_MAGIC]))
    assert timer.boot_time_us == first
    assert len(log.events) == 1


def test_reads_return_zeros(log: RecordingLog) -> None:
    data = bytearray(b"\xff" * 4)
    BootTimer(0, log=log).read(0, data)
    assert data == bytes(4)


def test_process_start_is_in_the_past_within_this_process_lifetime() -> None:
    start = process_start_monotonic_ns()
    now = time.monotonic_ns()
    assert start <= now
    # pytest has been running for less than an hour; the clock-tick error is 10 ms.
    assert now - start < 3600 * 10**9


def test_process_start_of_a_fresh_child_matches_when_it_was_spawned() -> None:
    import subprocess

    before = time.monotonic_ns()
    child = subprocess.Popen(["sleep", "5"])
    try:
        after = time.monotonic_ns()
        start = process_start_monotonic_ns(child.pid)
    finally:
        child.kill()
        child.wait()
    tick = 20_000_000  # /proc's start time has clock-tick (10 ms) resolution
    assert before - tick <= start <= after + tick
