"""virtio-vsock without /dev/vhost-vsock: the ioctl layer (recorded), the CID claim and its
errors, the device model's config space and queue split, the VMM-kept event queue, and the
[vsock] config table."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymvm.config import ConfigError, VSOCK_CID_MAX, default_vsock_cid, load_config
from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext, QueueConfig, VirtioActivationError
from pymvm.devices.virtio.vsock import (
    EVENT_QUEUE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VirtioVsockDevice,
)
from pymvm.vhost import kernel
from pymvm.vhost._vhost_cffi import ffi, lib
from pymvm.vhost.errors import VhostError, VhostIoctlError
from pymvm.vhost.kernel import VIRTIO_F_VERSION_1, VhostVsock, VhostVsockBackend

from .test_virtqueue import AVAIL, DATA, DESC, MEM_BASE, MEM_SIZE, USED, WRITE, Driver


def bit(n: int) -> int:
    return 1 << n


# ---- bindings -------------------------------------------------------------------------------

def test_vsock_ioctls_and_layouts_come_from_the_kernel_headers() -> None:
    for name in ("VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING"):
        assert (getattr(lib, name) >> 8) & 0xFF == 0xAF  # the vhost ioctl type
    assert lib.VHOST_VSOCK_SET_GUEST_CID != lib.VHOST_VSOCK_SET_RUNNING
    assert ffi.sizeof("struct virtio_vsock_config") == 8
    assert ffi.sizeof("struct virtio_vsock_event") == 4
    assert lib.VIRTIO_ID_VSOCK == c.VIRTIO_ID_VSOCK == 19
    assert lib.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET


# ---- VhostVsock: ioctl sequence ------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    host_addr: int
    view: memoryview | None = None


REGIONS = [Region(0, 0x10_0000, 0x7F00_0000_0000)]
SUPPORTED = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_RING_F_EVENT_IDX) | bit(lib.VIRTIO_RING_F_INDIRECT_DESC) \
    | bit(lib.VIRTIO_VSOCK_F_SEQPACKET) | bit(lib.VHOST_F_LOG_ALL)


class RecordingVsock(VhostVsock):
    """VhostVsock whose ioctls are recorded instead of issued (its fd is /dev/null)."""

    def __init__(self, in_use: set[int] = frozenset()) -> None:
        super().__init__("/dev/null")
        self.calls: list[tuple] = []
        self.in_use = in_use
        self._features = SUPPORTED

    def set_owner(self) -> None:
        self.calls.append(("owner",))
        self._owned = True

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_mem_table(self, regions) -> None:
        self.calls.append(("mem", len(regions)))

    def set_vring_num(self, index: int, num: int) -> None:
        self.calls.append(("num", index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.calls.append(("base", index, base))

    def get_vring_base(self, index: int) -> int:
        self.calls.append(("get_base", index))
        return 7 + index

    def set_vring_addr(self, index: int, addrs) -> None:
        self.calls.append(("addr", index))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.calls.append(("kick", index, fd))

    def set_vring_call(self, index: int, fd: int) -> None:
        self.calls.append(("call", index, fd))

    def set_guest_cid(self, cid: int) -> None:
        self.calls.append(("cid", cid))
        if cid in self.in_use:
            raise VhostIoctlError("VHOST_VSOCK_SET_GUEST_CID", errno.EADDRINUSE, "in use")

    def set_running(self, running: bool) -> None:
        self.calls.append(("running", running))


RINGS = [QueueConfig(0, 256, True, 0x10000, 0x11000, 0x12000),
         QueueConfig(1, 256, True, 0x20000, 0x21000, 0x22000)]


def test_activate_programs_both_rings_then_starts_the_worker() -> None:
    vhost = RecordingVsock()
    vhost.claim_cid(42)
    vhost.calls.clear()
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_RING_F_EVENT_IDX)
    vhost.activate(acked, REGIONS, RINGS, [10, 11], [20, 21])
    assert vhost.calls == [
        ("owner",), ("features", acked), ("mem", 1),
        ("num", 0, 256), ("base", 0, 0), ("addr", 0), ("kick", 0, 10), ("call", 0, 20),
        ("num", 1, 256), ("base", 1, 0), ("addr", 1), ("kick", 1, 11), ("call", 1, 21),
        ("running", True),
    ]  # fmt: skip
    assert vhost.active
    vhost.close()


def test_deactivate_stops_the_worker_but_keeps_the_fd_and_cid_for_the_next_driver() -> None:
    vhost = RecordingVsock()
    vhost.claim_cid(42)
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, RINGS, [1, 2], [3, 4])
    fd = vhost.fd
    vhost.calls.clear()
    assert vhost.deactivate() == {0: 7, 1: 8}
    assert vhost.calls == [("running", False), ("get_base", 0), ("get_base", 1)]
    assert vhost.fd == fd and vhost.cid == 42 and not vhost.active
    vhost.calls.clear()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, RINGS, [1, 2], [3, 4])
    assert ("owner",) not in vhost.calls  # same fd: already its owner
    assert vhost.calls[-1] == ("running", True)
    vhost.close()
    assert vhost.cid is None


def test_activate_without_a_cid_is_refused() -> None:
    vhost = RecordingVsock()
    with pytest.raises(VhostError, match="no guest CID: call claim_cid"):
        vhost.activate(VIRTIO_F_VERSION_1, REGIONS, RINGS, [1, 2], [3, 4])
    assert vhost.calls == []


def test_cid_in_use_names_the_next_free_cid_and_releases_the_device() -> None:
    vhost = RecordingVsock(in_use={42, 43})
    with pytest.raises(VhostError) as info:
        vhost.claim_cid(42)
    message = str(info.value)
    assert message == ("vsock.cid = 42 is already in use on this host (another VM or vhost-vsock "
                       "user holds it); choose e.g. vsock.cid = 44")
    assert "\n" not in message
    assert vhost._fd is None and vhost.cid is None


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF])
def test_reserved_cids_are_refused_before_any_ioctl(cid: int) -> None:
    vhost = RecordingVsock()
    with pytest.raises(VhostError, match=f"vsock.cid = {cid} is not a guest CID: choose one from 3"):
        vhost.claim_cid(cid)
    assert vhost.calls == []


def test_missing_device_node_says_to_load_vhost_vsock(tmp_path: Path) -> None:
    with pytest.raises(VhostError, match=r"does not exist: load the module with 'modprobe vhost_vsock'"):
        VhostVsockBackend(3, VhostVsock(str(tmp_path / "vhost-vsock")))


def test_real_set_guest_cid_failure_names_the_ioctl() -> None:
    vhost = VhostVsock("/dev/null")
    with pytest.raises(VhostIoctlError, match="VHOST_VSOCK_SET_GUEST_CID failed") as info:
        vhost.claim_cid(5)
    assert info.value.errno == errno.ENOTTY
    assert vhost._fd is None


class IoctlRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []

    def __getattr__(self, name: str):
        return getattr(lib, name)

    def pymvm_ioctl_ptr(self, fd: int, request: int, arg) -> int:
        self.calls.append((request, bytes(ffi.buffer(arg))))
        return 0


def test_cid_and_running_flag_reach_the_kernel_in_its_argument_layout(monkeypatch) -> None:
    recorder = IoctlRecorder()
    monkeypatch.setattr(kernel, "lib", recorder)
    vhost = VhostVsock("/dev/null")
    vhost.claim_cid(0x1_2345)
    vhost.set_running(True)
    vhost.set_running(False)
    vhost.close()
    assert recorder.calls == [
        (lib.VHOST_VSOCK_SET_GUEST_CID, (0x1_2345).to_bytes(8, "little")),
        (lib.VHOST_VSOCK_SET_RUNNING, (1).to_bytes(ffi.sizeof("int"), "little")),
        (lib.VHOST_VSOCK_SET_RUNNING, (0).to_bytes(ffi.sizeof("int"), "little")),
    ]


def test_backend_offers_only_the_ring_features_vhost_vsock_reports() -> None:
    backend = VhostVsockBackend(9, RecordingVsock())
    assert backend.features() == SUPPORTED & ~bit(lib.VHOST_F_LOG_ALL)
    backend.close()


# ---- the device model -----------------------------------------------------------------------

EVENT_DESC, EVENT_AVAIL, EVENT_USED = DESC, AVAIL, USED


class GuestRam:
    """One guest RAM region backed by a bytearray, with the rx/tx/event rings of a driver."""

    def __init__(self) -> None:
        self.driver = Driver(size=8)
        self.region = Region(MEM_BASE, MEM_SIZE, 0x7F00_0000_0000, memoryview(self.driver.ram))

    def ctx(self, queues=(0, 1, 2), acked: int = VIRTIO_F_VERSION_1,
            kick_fds=None, call_fds=None) -> ActivationContext:
        configs = {
            0: QueueConfig(0, 8, True, MEM_BASE + 0x6000, MEM_BASE + 0x6800, MEM_BASE + 0x7000),
            1: QueueConfig(1, 8, True, MEM_BASE + 0x8000, MEM_BASE + 0x8800, MEM_BASE + 0x9000),
            2: QueueConfig(2, 8, True, EVENT_DESC, EVENT_AVAIL, EVENT_USED),
        }
        qs = [configs[i] for i in queues]
        return ActivationContext(
            acked_features=acked, queues=qs,
            kick_fds=list(kick_fds) if kick_fds is not None else [100 + q.index for q in qs],
            call_fds=list(call_fds) if call_fds is not None else [200 + q.index for q in qs],
            mem_regions=[self.region])

    def post_event_buffer(self, head: int = 0, length: int = 4) -> None:
        self.driver.desc(head, DATA + 16 * head, length, WRITE)
        self.driver.write(DATA + 16 * head, b"\xff" * length)
        self.driver.publish(head)

    def event_written(self, head: int = 0) -> bytes:
        start = DATA - MEM_BASE + 16 * head
        return bytes(self.driver.ram[start:start + 4])


def make_device(cid: int = 42) -> tuple[VirtioVsockDevice, RecordingVsock]:
    vhost = RecordingVsock()
    return VirtioVsockDevice(cid, VhostVsockBackend(cid, vhost)), vhost


def test_config_space_is_the_guest_cid_as_le64() -> None:
    device, _ = make_device(0xFFFF_FF05)
    data = bytearray(8)
    device.read_config(0, data)
    assert struct.unpack("<Q", data)[0] == 0xFFFF_FF05
    assert device.device_type == 19 and len(device.queue_max_sizes) == 3


def test_features_are_version_1_plus_what_vhost_vsock_supports() -> None:
    device, _ = make_device()
    features = device.avail_features()
    assert features & VIRTIO_F_VERSION_1
    assert features & bit(lib.VIRTIO_VSOCK_F_SEQPACKET)
    assert not features & bit(lib.VHOST_F_LOG_ALL)


def test_only_rx_and_tx_go_to_vhost_the_event_queue_stays_in_the_vmm() -> None:
    ram = GuestRam()
    device, vhost = make_device()
    vhost.calls.clear()
    device.activate(ram.ctx())
    kicks = [call for call in vhost.calls if call[0] == "kick"]
    calls = [call for call in vhost.calls if call[0] == "call"]
    assert kicks == [("kick", 0, 100), ("kick", 1, 101)]
    assert calls == [("call", 0, 200), ("call", 1, 201)]
    assert ("num", EVENT_QUEUE, 8) not in vhost.calls
    device.reset()
    device.close()


def test_activation_without_the_event_queue_is_refused() -> None:
    ram = GuestRam()
    device, vhost = make_device()
    with pytest.raises(VirtioActivationError, match=r"queues \[2\] ready"):
        device.activate(ram.ctx(queues=(0, 1)))
    assert not vhost.active


def test_first_driver_gets_no_event_a_rebound_driver_gets_transport_reset() -> None:
    ram = GuestRam()
    device, vhost = make_device()
    call_r = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ctx = ram.ctx(kick_fds=[-1, -1, -1], call_fds=[201, 202, call_r])
        ram.post_event_buffer(0)
        device.activate(ctx)
        assert ram.driver.used_idx() == 0 and device.events_sent == 0
        device.reset()
        assert [c for c in vhost.calls if c[0] == "running"] == [("running", True), ("running", False)]

        device.activate(ctx)  # the driver came back (rebind)
        assert ram.driver.used_idx() == 1
        assert ram.driver.used(0) == (0, 4)
        assert struct.unpack("<I", ram.event_written(0))[0] == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        assert os.eventfd_read(call_r) == 1  # the guest was interrupted
        assert device.events_sent == 1
        device.reset()
    finally:
        device.close()
        os.close(call_r)


def test_pending_event_waits_for_the_drivers_event_buffer_kick() -> None:
    ram = GuestRam()
    device, _ = make_device()
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ctx = ram.ctx(kick_fds=[-1, -1, kick], call_fds=[-1, -1, call])
        device.activate(ctx)
        device.reset()
        device.activate(ctx)  # rebind, but no event buffer posted yet
        assert ram.driver.used_idx() == 0 and device.events_sent == 0
        ram.post_event_buffer(0)
        os.eventfd_write(kick, 1)  # what the driver's QueueNotify does through the ioeventfd
        for _ in range(100):
            if device.events_sent:
                break
            import time
            time.sleep(0.02)
        assert device.events_sent == 1 and ram.driver.used_idx() == 1
        device.reset()
    finally:
        device.close()
        os.close(kick)
        os.close(call)


def test_event_buffer_too_small_is_dropped_not_overrun() -> None:
    ram = GuestRam()
    device, _ = make_device()
    ctx = ram.ctx(kick_fds=[-1, -1, -1], call_fds=[-1, -1, -1])
    ram.post_event_buffer(0, length=2)
    device.activate(ctx)
    device.reset()
    device.activate(ctx)
    assert device.events_sent == 0
    assert ram.event_written(0)[:2] == b"\xff\xff"
    device.reset()
    device.close()


# ---- [vsock] in the TOML --------------------------------------------------------------------

@pytest.fixture
def kernel_file(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + bytes(0x300))
    return k


def load(tmp_path: Path, kernel_file: Path, extra: str):
    path = tmp_path / "vm.toml"
    path.write_text(f'id = "vm1"\n[boot]\nkernel = "{kernel_file}"\n' + extra)
    return load_config(path, available_memory_mib=lambda hp: None)


def test_no_vsock_table_means_no_vsock_device(tmp_path: Path, kernel_file: Path) -> None:
    assert load(tmp_path, kernel_file, "").vsock is None


def test_vsock_cid_defaults_to_one_derived_from_the_vm_id(tmp_path: Path, kernel_file: Path) -> None:
    cfg = load(tmp_path, kernel_file, "[vsock]\n")
    assert cfg.vsock is not None and cfg.vsock.cid == default_vsock_cid("vm1")
    assert 3 <= cfg.vsock.cid <= VSOCK_CID_MAX
    assert default_vsock_cid("vm1") != default_vsock_cid("vm2")


def test_derived_cids_are_never_reserved_ones() -> None:
    cids = [default_vsock_cid(f"vm-{i}") for i in range(2000)]
    assert min(cids) >= 3 and max(cids) <= VSOCK_CID_MAX
    assert len(set(cids)) == len(cids)


def test_explicit_vsock_cid_is_used(tmp_path: Path, kernel_file: Path) -> None:
    assert load(tmp_path, kernel_file, "[vsock]\ncid = 1234\n").vsock.cid == 1234


@pytest.mark.parametrize("value", ["2", "0", "-1", "4294967295", '"5"'])
def test_reserved_or_bad_vsock_cid_is_a_one_line_error(tmp_path: Path, kernel_file: Path,
                                                       value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, kernel_file, f"[vsock]\ncid = {value}\n")
    assert "vsock.cid: expected an integer from 3 to 4294967294" in str(info.value)


def test_unknown_vsock_key_is_refused(tmp_path: Path, kernel_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key vsock.port"):
        load(tmp_path, kernel_file, "[vsock]\nport = 5\n")


# ---- the device registry ----------------------------------------------------------------------

def test_add_vsock_without_the_module_fails_naming_modprobe_and_leaves_no_device(monkeypatch) -> None:
    from pymvm.config import VsockConfig
    from pymvm.devices.manager import DeviceManager

    from .test_device_manager import FakeMachine

    monkeypatch.setattr(kernel, "VHOST_VSOCK_PATH", "/nonexistent/vhost-vsock")
    monkeypatch.setattr(VhostVsock.__init__, "__defaults__", ("/nonexistent/vhost-vsock",))
    manager = DeviceManager(FakeMachine())  # type: ignore[arg-type]
    with pytest.raises(VhostError, match="modprobe vhost_vsock"):
        manager.add_vsock(VsockConfig(cid=5))
    assert len(manager) == 0
    assert manager.mmio_devices() == []
