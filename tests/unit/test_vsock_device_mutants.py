"""The virtio-vsock device model (pymvm/devices/virtio/vsock.py): what scripts/mutation on the
module showed test_vsock.py leaves unchecked: CID bounds, refusal texts, the device's
activation count, TRANSPORT_RESET requested while the driver is away or without eventfd
plumbing, the event watcher thread (when it runs, its fds, how long it waits), EVENT_IDX on the
event queue, and an event split over two buffers."""

from __future__ import annotations

import os
import threading
import time

import pytest
from structlog.testing import capture_logs

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio import vsock
from pymvm.devices.virtio.device import (
    ActivationContext,
    VirtioActivationError,
    VirtioConfigError,
)
from pymvm.devices.virtio.vsock import VirtioVsockDevice
from pymvm.vhost.kernel import VIRTIO_F_VERSION_1
from tests.fds import is_open as fd_open

from .test_virtqueue import AVAIL, DATA, DESC, MEM_BASE, MEM_SIZE, NEXT, USED, WRITE
from .test_vsock import GuestRam, Region, make_device


class FakeBackend:
    """A vsock data plane that needs no eventfds (VhostVsockBackend insists on them)."""

    cid = 42

    def __init__(self) -> None:
        self.activations = 0
        self.resets = 0

    def features(self) -> int:
        return 0

    def activate(self, ctx, mem_regions) -> None:
        self.activations += 1

    def reset(self) -> None:
        self.resets += 1


_OLDER: set[threading.Thread] = set()


def watchers() -> list[threading.Thread]:
    """The event watchers running now, except any an earlier test left behind."""
    return [t for t in threading.enumerate() if t.name == "vsock-event" and t not in _OLDER]


@pytest.fixture(autouse=True)
def _ignore_older_watchers():
    _OLDER.update(t for t in threading.enumerate() if t.name == "vsock-event")


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def open_fds() -> set[int]:
    listed = [int(fd) for fd in os.listdir("/proc/self/fd")]  # listdir's own fd is gone after
    return {fd for fd in listed if fd_open(fd)}


@pytest.fixture
def watched(eventfds):
    """A device whose event queue has a kick eventfd: activations start its watcher thread.
    (kick, call, ram, device, ctx); the device is closed after the test."""
    kick, call = eventfds
    ram = GuestRam()
    device, _ = make_device()
    ctx = ram.ctx(kick_fds=[-1, -1, kick], call_fds=[-1, -1, call])
    yield kick, call, ram, device, ctx
    device.close()


@pytest.fixture
def eventfds():
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    yield kick, call
    os.close(kick)
    os.close(call)


# ---- construction and activation --------------------------------------------------------------


@pytest.mark.parametrize("cid", [3, 0xFFFF_FFFE])
def test_the_first_and_last_guest_cids_are_accepted(cid: int) -> None:
    assert VirtioVsockDevice(cid, FakeBackend()).cid == cid


@pytest.mark.parametrize("cid", [2, 0xFFFF_FFFF])
def test_a_guest_cid_outside_3_to_2_pow_32_minus_2_is_refused_naming_the_range(cid: int) -> None:
    with pytest.raises(VirtioConfigError) as e:
        VirtioVsockDevice(cid, FakeBackend())
    assert str(e.value) == f"virtio-vsock guest CID {cid} is outside 3..4294967294"


def test_activation_without_the_event_queue_names_the_queue_and_the_fix() -> None:
    device = VirtioVsockDevice(42, FakeBackend())
    with pytest.raises(VirtioActivationError) as e:
        device.activate(GuestRam().ctx(queues=(0, 1)))
    assert str(e.value) == ("virtio-vsock: the driver did not make queues [2] ready; the guest "
                            "driver must set up rx, tx and event")


def test_a_bad_event_ring_is_refused_naming_the_event_queue_and_the_back_end_is_reset() -> None:
    from pymvm.devices.virtio.device import QueueConfig

    backend = FakeBackend()
    device = VirtioVsockDevice(42, backend)
    ctx = GuestRam().ctx(kick_fds=[], call_fds=[])
    bad = QueueConfig(2, 8, True, DESC + 8, AVAIL, USED)  # a descriptor table not 16-aligned
    ctx = ActivationContext(ctx.acked_features, ctx.queues[:2] + [bad], [], [], ctx.mem_regions)
    with pytest.raises(VirtioActivationError) as e:
        device.activate(ctx)
    assert str(e.value) == (f"virtio-vsock event queue: vsock-event: descriptor table at "
                            f"{DESC + 8:#x} is not 16-byte aligned (virtio 1.2 §2.7)")
    assert backend.resets == 1 and not device.active


def test_the_device_is_active_from_activation_to_reset_and_counts_its_activations() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    assert not device.active and device.activations == 0
    ctx = ram.ctx(kick_fds=[], call_fds=[])
    device.activate(ctx)
    assert device.active and device.activations == 1
    device.reset()
    assert not device.active
    device.activate(ctx)
    assert device.active and device.activations == 2
    device.reset()


def test_the_activation_log_line_names_the_device_and_its_cid() -> None:
    device = VirtioVsockDevice(42, FakeBackend())
    with capture_logs() as logs:
        device.activate(GuestRam().ctx(kick_fds=[], call_fds=[]))
    (line,) = [e for e in logs if e["event"] == "virtio-vsock activated"]
    assert line["device"] == "virtio-vsock" and line["cid"] == 42
    device.reset()


def test_reset_gives_the_guest_memory_views_back() -> None:
    ram = bytearray(MEM_SIZE)
    view = memoryview(ram)
    base = GuestRam().ctx(kick_fds=[], call_fds=[])
    ctx = ActivationContext(base.acked_features, base.queues, [], [],
                            [Region(MEM_BASE, MEM_SIZE, 0x7F00_0000_0000, view)])
    device = VirtioVsockDevice(42, FakeBackend())
    device.activate(ctx)
    device.reset()
    view.release()
    ram.extend(b"\0")  # BufferError while any view of the guest memory is left


# ---- TRANSPORT_RESET -----------------------------------------------------------------------------


def test_without_eventfd_plumbing_a_rebound_driver_still_gets_its_event() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    ctx = ram.ctx(kick_fds=[], call_fds=[])
    device.activate(ctx)
    device.reset()
    ram.post_event_buffer(0)
    device.activate(ctx)
    assert device.events_sent == 1 and ram.driver.used(0) == (0, 4)
    assert ram.event_written(0) == bytes(4)
    device.reset()


def test_a_transport_reset_requested_before_the_driver_is_up_is_delivered_when_it_comes_up() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    assert device.send_transport_reset() is False
    ram.post_event_buffer(0)
    device.activate(ram.ctx(kick_fds=[], call_fds=[]))
    assert device.events_sent == 1 and ram.driver.used_idx() == 1
    device.reset()


def test_a_transport_reset_requested_while_the_driver_is_down_waits_for_it() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    ctx = ram.ctx(kick_fds=[], call_fds=[])
    device.activate(ctx)
    device.reset()
    assert device.send_transport_reset() is False
    ram.post_event_buffer(0)
    device.activate(ctx)
    assert device.events_sent == 1 and ram.driver.used_idx() == 1  # one event, not two
    device.reset()


def test_a_transport_reset_sent_to_a_live_driver_arrives_at_once_and_each_is_counted() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    device.activate(ram.ctx(kick_fds=[], call_fds=[]))
    ram.post_event_buffer(0)
    ram.post_event_buffer(1)
    assert device.send_transport_reset() is True
    assert ram.driver.used_idx() == 1
    assert device.send_transport_reset() is True
    assert ram.driver.used_idx() == 2 and device.events_sent == 2
    assert device.send_transport_reset() is False  # no buffer left: it waits
    device.reset()


def test_an_event_split_over_two_buffers_is_written_across_both() -> None:
    ram = GuestRam()
    device = VirtioVsockDevice(42, FakeBackend())
    ctx = ram.ctx(kick_fds=[], call_fds=[])
    device.activate(ctx)
    device.reset()
    ram.driver.desc(0, DATA, 1, WRITE | NEXT, 1)
    ram.driver.desc(1, DATA + 16, 3, WRITE)
    ram.driver.write(DATA, b"\xff" * 32)
    ram.driver.publish(0)
    device.activate(ctx)
    off = DATA - MEM_BASE
    assert bytes(ram.driver.ram[off : off + 1]) == b"\0"
    assert bytes(ram.driver.ram[off + 16 : off + 20]) == b"\0\0\0\xff"
    assert ram.driver.used(0) == (0, 4)
    device.reset()


@pytest.mark.parametrize(("event_idx", "interrupted"), [(True, True), (False, False)])
def test_with_event_idx_the_event_interrupts_whatever_the_avail_flags_say(
        eventfds, event_idx: bool, interrupted: bool) -> None:
    _, call = eventfds
    ram = GuestRam()
    acked = VIRTIO_F_VERSION_1 | (1 << c.VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
    ctx = ram.ctx(acked=acked, kick_fds=[-1, -1, -1], call_fds=[-1, -1, call])
    device = VirtioVsockDevice(42, FakeBackend())
    device.activate(ctx)
    device.reset()
    ram.driver.avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT: ignored with EVENT_IDX (§2.7.7)
    ram.post_event_buffer(0)
    device.activate(ctx)
    assert device.events_sent == 1
    try:
        assert os.eventfd_read(call) == 1 and interrupted
    except BlockingIOError:
        assert not interrupted
    device.reset()


# ---- the watcher ---------------------------------------------------------------------------------


def test_the_watcher_runs_only_while_an_event_waits_as_a_daemon_thread(watched) -> None:
    _kick, _call, _ram, device, ctx = watched
    device.activate(ctx)  # nothing to send to a first driver: no watcher
    assert watchers() == []
    device.reset()
    device.activate(ctx)  # rebind, no event buffer yet: a watcher waits for the kick
    (watcher,) = watchers()
    assert watcher.daemon  # never holds up the VMM's exit
    device.reset()
    assert not watcher.is_alive() and watchers() == []


def test_the_watcher_opens_only_close_on_exec_fds(watched) -> None:
    _kick, _call, _ram, device, ctx = watched
    device.activate(ctx)
    device.reset()
    before = open_fds()
    device.activate(ctx)
    new = open_fds() - before
    assert new and not [fd for fd in new if os.get_inheritable(fd)]
    device.reset()


def test_a_pending_event_outlasts_a_spurious_kick_and_a_quiet_second(watched) -> None:
    kick, _call, ram, device, ctx = watched
    device.activate(ctx)
    device.reset()
    device.activate(ctx)
    os.eventfd_write(kick, 1)  # a kick with no buffer posted
    time.sleep(1.0)
    assert device.events_sent == 0
    ram.post_event_buffer(0)
    os.eventfd_write(kick, 1)
    assert wait_until(lambda: device.events_sent == 1)
    assert ram.driver.used_idx() == 1
    device.reset()


def test_the_watcher_gives_up_after_event_wait_s_and_says_so(watched, monkeypatch) -> None:
    _kick, _call, _ram, device, ctx = watched
    monkeypatch.setattr(vsock, "EVENT_WAIT_S", 1.0)  # read when the watcher starts
    device.activate(ctx)
    device.reset()
    with capture_logs() as logs:
        start = time.monotonic()
        device.activate(ctx)
        (watcher,) = watchers()
        watcher.join(timeout=5)
        elapsed = time.monotonic() - start
    assert not watcher.is_alive() and elapsed >= 0.9
    assert "vsock event not delivered: the driver posted no event buffer" in [
        e["event"] for e in logs]
    assert device.events_sent == 0
    device.reset()
