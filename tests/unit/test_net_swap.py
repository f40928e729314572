"""Back-end swap hand-over with fake back-ends (issue 10): ring positions carried from the old
back-end to the new one, the kick after start, rollback at each failure point, a refused swap
that leaves the old back-end serving."""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from pymvm.devices.swap import SwapFailed, SwapRefused, feature_names, hand_over
from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.devices.virtio.net import PASSTHROUGH_FEATURES, SWAPPABLE_FEATURES, VirtioNetDevice
from pymvm.vhost.queue_state import RingPosition

MRG = 1 << c.VIRTIO_NET_F_MRG_RXBUF
TSO4 = 1 << c.VIRTIO_NET_F_HOST_TSO4
VERSION_1 = 1 << c.VIRTIO_F_VERSION_1


def eventfd_value(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@dataclass
class FakeBackend:
    """A back-end that records what it was asked; ``fail_start`` makes start raise, after
    ``fail_after`` queues were set up ("dies halfway")."""

    name: str
    offered: int = VERSION_1 | MRG | TSO4
    positions: dict[int, RingPosition] = field(default_factory=dict)
    fail_start: Exception | None = None
    fail_after: int = 0
    events: list[tuple] = field(default_factory=list)
    running: bool = False
    kicks_seen_at_start: list[int] = field(default_factory=list)

    def features(self) -> int:
        return self.offered

    def activate(self, ctx: Any, regions: Any) -> None:
        self.start(ctx, regions)

    def start(self, ctx: Any, regions: Any, positions: Any = None, strict: bool = False) -> None:
        self.kicks_seen_at_start = [eventfd_value(fd) for fd in ctx.kick_fds]
        for fd, value in zip(ctx.kick_fds, self.kicks_seen_at_start):
            if value:
                os.eventfd_write(fd, value)  # leave the counter as it was
        given = dict(positions or {})
        for n, q in enumerate(ctx.queues):
            if self.fail_start is not None and n >= self.fail_after:
                self.events.append(("start-failed", given))
                raise self.fail_start
            self.events.append(("queue", q.index, given.get(q.index)))
        self.events.append(("start", given))
        self.running = True

    def stop(self) -> dict[int, RingPosition]:
        self.events.append(("stop",))
        self.running = False
        return dict(self.positions)

    def reset(self) -> None:
        self.stop()


@pytest.fixture
def eventfds():
    fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


def live_device(old: FakeBackend, fds: list[int], mask: int = PASSTHROUGH_FEATURES,
                acked_extra: int = 0) -> tuple[VirtioNetDevice, ActivationContext]:
    device = VirtioNetDevice(b"\x52\x54\x00\x12\x34\x56", None, old, features_mask=mask)
    queues = [QueueConfig(i, 256, True, 0x1000 * (i + 1), 0x1000 * (i + 1) + 0x400,
                          0x1000 * (i + 1) + 0x800) for i in range(2)]
    ctx = ActivationContext(acked_features=VERSION_1 | MRG | acked_extra, queues=queues,
                            kick_fds=fds[:2], call_fds=fds[2:], mem_regions=())
    device.activate(ctx)
    old.events.clear()
    return device, ctx


def test_positions_reported_by_the_old_backend_are_where_the_new_one_starts(eventfds) -> None:
    old = FakeBackend("old", positions={0: RingPosition(300, 300), 1: RingPosition(77, 77)})
    new = FakeBackend("new")
    device, ctx = live_device(old, eventfds)
    resumed = hand_over(device, new, acked=ctx.acked_features)
    assert resumed == {0: RingPosition(300, 300), 1: RingPosition(77, 77)}
    assert new.events[-1] == ("start", resumed)
    assert old.events == [("stop",)] and not old.running
    assert device.backend is new and new.running


def test_buffers_in_flight_in_the_old_backend_are_taken_again_from_the_used_index(eventfds) -> None:
    # The old back-end took 3 RX buffers it never returned: the new one starts at the used idx.
    old = FakeBackend("old", positions={0: RingPosition(103, 100), 1: RingPosition(5, 5)})
    new = FakeBackend("new")
    device, ctx = live_device(old, eventfds)
    resumed = hand_over(device, new, acked=ctx.acked_features)
    assert resumed[0] == RingPosition(100, 100) and resumed[1] == RingPosition(5, 5)


def test_every_queue_is_kicked_and_signalled_once_after_the_new_backend_started(eventfds) -> None:
    old = FakeBackend("old", positions={0: RingPosition(1, 1), 1: RingPosition(2, 2)})
    new = FakeBackend("new")
    device, ctx = live_device(old, eventfds)
    hand_over(device, new, acked=ctx.acked_features)
    assert new.kicks_seen_at_start == [0, 0]  # nothing was kicked before start
    assert [eventfd_value(fd) for fd in ctx.kick_fds] == [1, 1]
    assert [eventfd_value(fd) for fd in ctx.call_fds] == [1, 1]


@pytest.mark.parametrize("fail_after", [0, 1], ids=["handshake-error", "dies-halfway"])
def test_a_new_backend_failing_during_start_puts_the_old_one_back_at_the_saved_positions(
        eventfds, fail_after: int) -> None:
    saved = {0: RingPosition(40, 40), 1: RingPosition(41, 41)}
    old = FakeBackend("old", positions=saved)
    new = FakeBackend("new", fail_start=ConnectionResetError("back-end hung up"),
                      fail_after=fail_after)
    device, ctx = live_device(old, eventfds)
    with pytest.raises(SwapFailed, match="back-end hung up; the old back-end serves"):
        hand_over(device, new, acked=ctx.acked_features)
    assert device.backend is old and old.running
    assert old.events == [("stop",), ("queue", 0, saved[0]), ("queue", 1, saved[1]),
                          ("start", saved)]
    assert ("stop",) in new.events  # whatever it set up is stopped again
    assert [eventfd_value(fd) for fd in ctx.kick_fds] == [1, 1]  # the old one looks again


def test_when_even_the_old_backend_cannot_restart_the_device_asks_for_a_reset(eventfds) -> None:
    old = FakeBackend("old", positions={0: RingPosition(1, 1), 1: RingPosition(1, 1)})
    new = FakeBackend("new", fail_start=OSError("no"))
    device, ctx = live_device(old, eventfds)
    old.fail_start = OSError("gone too")
    lost = []
    with pytest.raises(SwapFailed, match="could not be restarted .*must reset"):
        hand_over(device, new, acked=ctx.acked_features, on_old_lost=lambda: lost.append(1))
    assert lost == [1]


def test_a_swap_to_a_backend_lacking_a_negotiated_feature_is_refused_untouched(eventfds) -> None:
    old = FakeBackend("old", positions={0: RingPosition(1, 1), 1: RingPosition(1, 1)})
    new = FakeBackend("new", offered=VERSION_1 | MRG)  # no HOST_TSO4
    device, ctx = live_device(old, eventfds, acked_extra=TSO4)
    with pytest.raises(SwapRefused, match="lacks features the guest negotiated: HOST_TSO4;"):
        hand_over(device, new, acked=ctx.acked_features)
    assert old.events == [] and old.running and device.backend is old
    assert new.events == []
    assert SwapRefused.status == 409


def test_a_swappable_nic_never_offers_the_offloads_so_such_a_swap_goes_through(eventfds) -> None:
    old = FakeBackend("old", positions={0: RingPosition(1, 1), 1: RingPosition(1, 1)})
    device, _ = live_device(old, eventfds, mask=SWAPPABLE_FEATURES)
    assert not device.avail_features() & TSO4
    assert device.avail_features() & MRG
    # The guest could only ack what it was offered; a back-end without offloads is fine.
    hand_over(device, FakeBackend("new", offered=VERSION_1 | MRG),
              acked=VERSION_1 | MRG)


def test_before_the_driver_started_the_rings_the_backend_is_only_replaced() -> None:
    old = FakeBackend("old")
    device = VirtioNetDevice(b"\x52\x54\x00\x12\x34\x56", None, old)
    new = FakeBackend("new")
    assert hand_over(device, new) == {}
    assert device.backend is new and new.events == [] and old.events == []


def test_a_driver_reset_forgets_the_activation_so_a_later_swap_starts_nothing(eventfds) -> None:
    old = FakeBackend("old")
    device, _ = live_device(old, eventfds)
    device.reset()
    new = FakeBackend("new")
    hand_over(device, new)
    assert new.events == []


def test_the_swap_holds_the_transport_lock_so_no_driver_reset_runs_in_between(eventfds) -> None:
    lock = threading.RLock()
    seen = []

    class Probe(FakeBackend):
        def start(self, ctx, regions, positions=None, strict=False):
            # Another thread (a vCPU writing the status register) cannot take the lock now.
            t = threading.Thread(target=lambda: seen.append(lock.acquire(timeout=0.05)))
            t.start()
            t.join()
            super().start(ctx, regions, positions, strict)

    old = FakeBackend("old", positions={0: RingPosition(1, 1), 1: RingPosition(1, 1)})
    device, ctx = live_device(old, eventfds)
    hand_over(device, Probe("new"), acked=ctx.acked_features, lock=lock)
    assert seen == [False]


def test_feature_names_name_the_bits() -> None:
    assert feature_names(TSO4 | MRG | 1 << 63) == ["HOST_TSO4", "MRG_RXBUF", "bit 63"]


# ---- vhost-net's side of the contract: positions from VHOST_GET_VRING_BASE and the used ring --


@dataclass(frozen=True)
class RamRegion:
    gpa: int
    size: int
    host_addr: int
    view: memoryview


def test_vhost_net_stop_reports_get_vring_base_and_the_used_idx_and_start_sets_the_base() -> None:
    from tests.unit.test_vhost_kernel import FakeTap, RecordingVhost

    ram = (ctypes.c_char * 0x10000)()
    region = RamRegion(0, 0x10000, ctypes.addressof(ram), memoryview(ram).cast("B"))
    queues = [QueueConfig(i, 256, True, 0x1000 + 0x4000 * i, 0x2000 + 0x4000 * i,
                          0x3000 + 0x4000 * i) for i in range(2)]
    ctx = ActivationContext(acked_features=VERSION_1, queues=queues, kick_fds=[10, 11],
                            call_fds=[20, 21], mem_regions=[region])
    from pymvm.vhost.kernel import VhostNetBackend

    vhost = RecordingVhost()
    backend = VhostNetBackend(FakeTap(), vhost)  # type: ignore[arg-type]
    backend.start(ctx, ctx.mem_regions, {0: RingPosition(500, 500), 1: RingPosition(9, 8)})
    assert ("base", 0, 500) in vhost.calls and ("base", 1, 9) in vhost.calls
    ram[0x3002:0x3004] = (39).to_bytes(2, "little")  # the used rings' idx in guest memory
    ram[0x7002:0x7004] = (41).to_bytes(2, "little")
    # RecordingVhost answers GET_VRING_BASE with 40 + index.
    assert backend.stop() == {0: RingPosition(40, 39), 1: RingPosition(41, 41)}
    assert not backend.active


# ---- the device registry's swap: what is refused before anything is touched -----------------


class FakeTransport:
    def __init__(self, acked: int) -> None:
        self.acked_features = acked
        self.lock = threading.RLock()
        self.needs_reset = 0

    def signal_needs_reset(self) -> None:
        self.needs_reset += 1


def registry_with_live_nic(eventfds):
    from pymvm.config import NetConfig
    from pymvm.devices.manager import DeviceManager, MmioDevice, MmioSlot

    old = FakeBackend("old", positions={0: RingPosition(7, 7), 1: RingPosition(8, 8)})
    device, ctx = live_device(old, eventfds)
    manager = DeviceManager(machine=None)  # type: ignore[arg-type]
    record = MmioDevice("net0", "net", MmioSlot(0, 0xD000_0000, 0x1000, 5), device,
                        transport=FakeTransport(ctx.acked_features))  # type: ignore[arg-type]
    record.backend.obj = old
    record.config = NetConfig(id="net0", backend="vhost-user", mac="52:54:00:12:34:56",
                              socket=None)
    record.info.update(backend="vhost-user", socket="/old.sock")
    manager._devices["net0"] = record
    return manager, record, old


def test_a_swap_to_a_missing_socket_fails_before_the_old_backend_is_stopped(eventfds,
                                                                             tmp_path) -> None:
    manager, record, old = registry_with_live_nic(eventfds)
    missing = str(tmp_path / "nobody-here.sock")
    with pytest.raises(SwapFailed, match=f"no vhost-user back-end socket at {missing}"):
        manager.swap_net_backend("net0", "vhost-user", missing, "client")
    assert old.events == [] and old.running
    assert record.backend.obj is old and record.device.backend is old
    assert record.info["socket"] == "/old.sock"


def test_a_swap_to_a_socket_where_nothing_answers_fails_with_the_old_backend_serving(
        eventfds, tmp_path) -> None:
    import socket as socketlib

    manager, record, old = registry_with_live_nic(eventfds)
    path = str(tmp_path / "dead.sock")
    dead = socketlib.socket(socketlib.AF_UNIX)
    dead.bind(path)  # bound, never listening: connect is refused
    try:
        with pytest.raises(SwapFailed, match="could not be set up: .*old back-end keeps serving"):
            manager.swap_net_backend("net0", "vhost-user", path, connect_timeout=0.3)
    finally:
        dead.close()
    assert old.events == [] and record.device.backend is old


@pytest.mark.parametrize(("args", "message"), [
    (("tap9",), "back-end 'tap9' is unknown"),
    (("vhost-user",), "needs \"socket\""),
    (("vhost-user", "/x.sock", "both"), "socket_mode 'both' is unknown"),
])
def test_bad_swap_requests_are_refused_untouched(eventfds, args, message) -> None:
    manager, record, old = registry_with_live_nic(eventfds)
    with pytest.raises(SwapRefused, match=message):
        manager.swap_net_backend("net0", *args)
    assert old.events == [] and record.device.backend is old


def test_a_swap_through_the_registry_moves_the_rings_and_closes_the_old_part(
        eventfds, monkeypatch) -> None:
    from pymvm.vhost.user import frontend

    manager, record, old = registry_with_live_nic(eventfds)
    closed = []
    record.backend.stack.callback(lambda: closed.append("old"))
    made = []

    class Fake(FakeBackend):
        def __init__(self, path, mode, **kw):
            super().__init__("new")
            self.path, self.mode = path, mode
            made.append(self)

        def close(self):
            closed.append("new")

    monkeypatch.setattr(frontend, "VhostUserNetBackend", Fake)
    import socket as socketlib
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.sock")
        s = socketlib.socket(socketlib.AF_UNIX)
        s.bind(path)
        try:
            info = manager.swap_net_backend("net0", "vhost-user", path, "client")
        finally:
            s.close()
    new = made[0]
    assert record.device.backend is new and record.backend.obj is new
    assert new.events[-1] == ("start", {0: RingPosition(7, 7), 1: RingPosition(8, 8)})
    assert closed == ["old"] and not old.running
    assert info["backend"] == "vhost-user" and info["socket"] == path


def test_swappable_in_the_toml_limits_the_offer_and_allows_a_tap_for_vhost_user(tmp_path) -> None:
    from pymvm.config import ConfigError, load_config

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    base = f'[boot]\nkernel = "{kernel}"\n'
    cfg = tmp_path / "vm.toml"
    cfg.write_text(base + '[[net]]\nbackend = "vhost-user"\nsocket = "/run/a.sock"\n'
                   'swappable = true\ntap = "tapsw0"\nbridge = "br0"\nhost_ip = "10.9.0.1/24"\n')
    net = load_config(cfg).net[0]
    assert net.swappable and net.tap == "tapsw0" and net.bridge == "br0"
    cfg.write_text(base + '[[net]]\nbackend = "vhost-user"\nsocket = "/run/a.sock"\n'
                   'tap = "tapsw0"\n')
    with pytest.raises(ConfigError, match=r"net\[0\].tap"):
        load_config(cfg)
    cfg.write_text(base + '[[net]]\nswappable = "yes"\n')
    with pytest.raises(ConfigError, match=r"net\[0\].swappable"):
        load_config(cfg)


def test_stopping_the_vm_during_a_swap_waits_for_it_then_closes_the_new_backend(
        eventfds, monkeypatch, tmp_path) -> None:
    import socket as socketlib

    from pymvm.vhost.user import frontend

    manager, record, old = registry_with_live_nic(eventfds)
    started, release = threading.Event(), threading.Event()
    made = []

    class Slow(FakeBackend):
        def __init__(self, path, mode, **kw):
            super().__init__("new")
            self.closed = False
            made.append(self)

        def start(self, ctx, regions, positions=None, strict=False):
            started.set()
            assert release.wait(10)
            super().start(ctx, regions, positions, strict)

        def close(self):
            self.closed = True

    monkeypatch.setattr(frontend, "VhostUserNetBackend", Slow)
    path = str(tmp_path / "s.sock")
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(path)
    swap = threading.Thread(target=manager.swap_net_backend, args=("net0", "vhost-user", path))
    swap.start()
    try:
        assert started.wait(10)
        closer = threading.Thread(target=manager.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "close() must wait for the swap under way"
        release.set()
        closer.join(10)
        swap.join(10)
        assert not closer.is_alive() and not swap.is_alive()
    finally:
        release.set()
        s.close()
    assert made[0].closed, "the swapped-in back-end closes with the VM"
    assert len(manager) == 0
    with pytest.raises(SwapRefused, match="stopping"):
        manager.swap_net_backend("net0", "builtin")
