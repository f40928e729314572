"""In-kernel vhost behaviour the mutation runs of issue 16 found unchecked (docs/mutation.md):
each ioctl wrapper names its ioctl and the errno when the kernel refuses it (checked on an fd
that is no vhost device: /dev/null answers every ioctl with ENOTTY, so no /dev/vhost-net is
needed); the exact extent of each ring; the error texts; VHOST_SET_OWNER once per fd; the
vhost-net back-end's positions; the vsock CID probe, its clean-up and its eventfd checks."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

import pytest
from pymvm.vhost._vhost_cffi import ffi, lib

from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.memory import GuestMemory
from pymvm.vhost import kernel
from pymvm.vhost.errors import VhostError, VhostIoctlError
from pymvm.vhost.kernel import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VSOCK_CID_MAX,
    VSOCK_CID_MIN,
    VhostNet,
    VhostNetBackend,
    VhostVsock,
    VhostVsockBackend,
    Vring,
    VringHostAddrs,
    gpa_to_host,
    offered_features,
    vring_host_addrs,
)
from pymvm.vhost.queue_state import RingPosition

from .test_vhost_kernel import (
    HIGH,
    LOW,
    QUEUES,
    REGIONS,
    FakeTap,
    IoctlRecorder,
    RecordingVhost,
)
from .test_vsock import REGIONS as VSOCK_REGIONS
from .test_vsock import RINGS, RecordingVsock


def bit(n: int) -> int:
    return 1 << n


CALLS = {
    "VHOST_SET_OWNER": lambda v, mem: v.set_owner(),
    "VHOST_GET_FEATURES": lambda v, mem: v.features(),
    "VHOST_SET_FEATURES": lambda v, mem: v.set_features(1 << 32),
    "VHOST_SET_MEM_TABLE": lambda v, mem: v.set_mem_table(mem.regions),
    "VHOST_SET_VRING_NUM": lambda v, mem: v.set_vring_num(0, 256),
    "VHOST_SET_VRING_BASE": lambda v, mem: v.set_vring_base(0, 0),
    "VHOST_GET_VRING_BASE": lambda v, mem: v.get_vring_base(0),
    "VHOST_SET_VRING_ADDR": lambda v, mem: v.set_vring_addr(
        0, VringHostAddrs(desc=mem.regions[0].host_addr, avail=mem.regions[0].host_addr + 4096,
                          used=mem.regions[0].host_addr + 8192)),
    "VHOST_SET_VRING_KICK": lambda v, mem: v.set_vring_kick(0, -1),
    "VHOST_SET_VRING_CALL": lambda v, mem: v.set_vring_call(0, -1),
    "VHOST_NET_SET_BACKEND": lambda v, mem: v.set_backend(0, -1),
}


@pytest.mark.parametrize("ioctl", sorted(CALLS))
def test_refused_ioctl_is_named_with_its_errno(ioctl: str) -> None:
    with (GuestMemory(1 << 20) as mem, VhostNet.open(os.devnull) as vhost,
          pytest.raises(VhostIoctlError) as refused):
        CALLS[ioctl](vhost, mem)
    assert (refused.value.ioctl, refused.value.errno) == (ioctl, errno.ENOTTY)
    assert str(refused.value) == f"{ioctl} failed: {os.strerror(errno.ENOTTY)}"


@pytest.mark.parametrize("ioctl, call", [
    ("VHOST_VSOCK_SET_GUEST_CID", lambda v: v.set_guest_cid(3)),
    ("VHOST_VSOCK_SET_RUNNING", lambda v: v.set_running(True)),
])
def test_refused_vsock_ioctl_is_named_with_its_errno(ioctl: str, call) -> None:
    with VhostVsock.open(os.devnull) as vhost, pytest.raises(VhostIoctlError) as refused:
        call(vhost)
    assert (refused.value.ioctl, refused.value.errno) == (ioctl, errno.ENOTTY)
    assert str(refused.value) == f"{ioctl} failed: {os.strerror(errno.ENOTTY)}"

# ---- ring extents and error texts ------------------------------------------------------------

BAD_ADDRESS = "the guest driver programmed a bad address"


def test_gpa_at_the_very_start_of_a_region_translates() -> None:
    assert gpa_to_host(REGIONS, 0, 16) == LOW.host_addr
    assert gpa_to_host(REGIONS, HIGH.gpa, 16) == HIGH.host_addr


@pytest.mark.parametrize("event_idx", [False, True])
def test_each_ring_fits_exactly_at_a_region_end_and_not_one_step_further(event_idx: bool) -> None:
    num, trailer = 256, 2 if event_idx else 0
    lengths = {"desc_addr": 16 * num, "driver_addr": 4 + 2 * num + trailer,
               "device_addr": 4 + 8 * num + trailer}
    aligns = {"desc_addr": 16, "driver_addr": 2, "device_addr": 4}
    elsewhere = {"desc_addr": 0x1000, "driver_addr": 0x2000, "device_addr": 0x3000}
    names = {"desc_addr": "descriptor table", "driver_addr": "available ring",
             "device_addr": "used ring"}
    for part, length in lengths.items():
        end = LOW.size - length
        fits = end - end % aligns[part]  # the last aligned start the whole ring fits after
        q = Vring(2, num, **{**elsewhere, part: fits})
        addrs = vring_host_addrs(REGIONS, q, event_idx)
        assert {"desc_addr": addrs.desc, "driver_addr": addrs.avail,
                "device_addr": addrs.used}[part] == LOW.host_addr + fits
        q = Vring(2, num, **{**elsewhere, part: fits + aligns[part]})
        with pytest.raises(VhostError) as outside:
            vring_host_addrs(REGIONS, q, event_idx)
        assert str(outside.value) == (
            f"queue 2: {names[part]} at GPA {fits + aligns[part]:#x} (+{length:#x}) is outside "
            f"guest RAM: {BAD_ADDRESS}")


def test_available_ring_needs_room_for_used_event_only_with_event_idx() -> None:
    num = 256
    q = Vring(0, num, 0x1000, LOW.size - (4 + 2 * num), 0x3000)
    vring_host_addrs(REGIONS, q, event_idx=False)
    with pytest.raises(VhostError, match="queue 0: available ring"):
        vring_host_addrs(REGIONS, q, event_idx=True)


def test_misaligned_ring_message_names_the_ring_its_alignment_and_the_cause() -> None:
    q = Vring(1, 16, desc_addr=0x1000, driver_addr=0x2001, device_addr=0x3000)
    with pytest.raises(VhostError) as refused:
        vring_host_addrs(REGIONS, q, event_idx=False)
    assert str(refused.value) == (
        f"queue 1: available ring at GPA 0x2001 is not 2-byte aligned: {BAD_ADDRESS}")


def test_vhost_without_version_1_message_names_the_kernel_to_use() -> None:
    with pytest.raises(VhostError) as refused:
        offered_features(0)
    assert str(refused.value) == (
        "the kernel's vhost-net lacks VIRTIO_F_VERSION_1: use a host kernel >= 4.0")


# ---- opening the device node -----------------------------------------------------------------


def test_device_is_opened_read_write_and_close_on_exec() -> None:
    with VhostNet.open(os.devnull) as vhost:
        assert fcntl.fcntl(vhost.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert fcntl.fcntl(vhost.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_permission_denied_message_says_run_as_root_or_grant_access(monkeypatch) -> None:
    def deny(*_a: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(kernel.os, "open", deny)
    with pytest.raises(VhostError) as refused:
        VhostNet.open("/dev/vhost-net")
    assert str(refused.value) == ("permission denied opening /dev/vhost-net: run as root or "
                                  "grant this user read/write access to it")


def test_other_open_failure_names_the_path_and_the_reason(tmp_path) -> None:
    with pytest.raises(VhostError) as refused:
        VhostNet.open(str(tmp_path))  # a directory cannot be opened read/write
    assert str(refused.value) == f"cannot open {tmp_path}: {os.strerror(errno.EISDIR)}"


# ---- a refused ioctl with a known cause carries the hint ---------------------------------------


class RefusingLib(IoctlRecorder):
    """The cffi ``lib`` with every ioctl refused by the kernel with ``err``."""

    def __init__(self, err: int) -> None:
        super().__init__(features=0, vring_base=0)
        self.err = err

    def pymvm_ioctl_val(self, fd: int, request: int, arg: int) -> int:
        super().pymvm_ioctl_val(fd, request, arg)
        ffi.errno = self.err
        return -1

    def pymvm_ioctl_ptr(self, fd: int, request: int, arg) -> int:
        super().pymvm_ioctl_ptr(fd, request, arg)
        ffi.errno = self.err
        return -1


@pytest.mark.parametrize("ioctl, err, call, hint", [
    ("VHOST_SET_OWNER", errno.EBUSY, lambda v: v.set_owner(),
     "this vhost-net fd already has an owner"),
    ("VHOST_SET_VRING_NUM", errno.EINVAL, lambda v: v.set_vring_num(0, 3),
     "the queue size must be a power of two"),
    ("VHOST_NET_SET_BACKEND", errno.ENOTSOCK, lambda v: v.set_backend(0, 0),
     "the backend fd is not a TAP"),
])
def test_refusal_with_a_known_cause_appends_the_hint(monkeypatch, ioctl, err, call,
                                                     hint) -> None:
    monkeypatch.setattr(kernel, "lib", RefusingLib(err))
    with VhostNet.open(os.devnull) as vhost, pytest.raises(VhostIoctlError) as refused:
        call(vhost)
    assert (refused.value.ioctl, refused.value.errno) == (ioctl, err)
    assert str(refused.value) == f"{ioctl} failed: {os.strerror(err)}: {hint}"


# ---- ownership: VHOST_SET_OWNER once per fd ----------------------------------------------------


def owner_calls(recorder: IoctlRecorder) -> list[int]:
    return [arg for request, arg in recorder.calls if request == lib.VHOST_SET_OWNER]


def test_set_owner_is_issued_once_per_fd_with_no_argument(monkeypatch) -> None:
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
    recorder = IoctlRecorder(features=acked, vring_base=0)
    monkeypatch.setattr(kernel, "lib", recorder)
    vhost = VhostNet("/dev/null")
    vhost.prepare(VIRTIO_F_VERSION_1, REGIONS)
    # Other features than prepared: features and memory are set again, the owner is not.
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    vhost.deactivate(close=False)
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    assert owner_calls(recorder) == [0]
    vhost.deactivate()  # closes the fd: the next one needs its own owner
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    assert owner_calls(recorder) == [0, 0]
    vhost.close()


# ---- VhostDevice: activation checks ------------------------------------------------------------


def test_used_ring_trailer_counts_only_when_event_idx_reaches_the_kernel() -> None:
    num = 256
    tight = [Vring(0, num, 0x1000, 0x2000, LOW.size - (4 + 8 * num))]  # no room for avail_event
    vhost = RecordingVhost()  # supports EVENT_IDX
    with pytest.raises(VhostError, match="queue 0: used ring"):
        vhost.activate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, REGIONS, tight, [1], [2], 5)
    assert vhost.calls == []
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, tight, [1], [2], 5)
    assert vhost.active
    vhost.close()


def test_mismatched_eventfd_message_says_one_of_each_per_queue() -> None:
    with pytest.raises(VhostError) as refused:
        RecordingVhost().activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1], [3, 4], 5)
    assert str(refused.value) == ("2 queues but 1 kick and 2 call eventfds: pass one of each "
                                  "per queue")


def test_prepare_while_active_is_refused_naming_the_device() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    with pytest.raises(VhostError) as refused:
        vhost.prepare(VIRTIO_F_VERSION_1, REGIONS)
    assert str(refused.value) == "vhost-net is already active: nothing to prepare"
    vhost.close()


def test_deactivate_of_a_device_never_opened_returns_no_positions() -> None:
    assert VhostNet("/dev/null").deactivate() == {}


# ---- VhostNetBackend -------------------------------------------------------------------------


class RamRegion:
    """One guest RAM region the test can write, as pymvm.memory provides it."""

    def __init__(self, size: int = 0x10000) -> None:
        self.ram = (ctypes.c_char * size)()
        self.gpa, self.size = 0, size
        self.host_addr = ctypes.addressof(self.ram)
        self.view = memoryview(self.ram).cast("B")


def net_ctx(acked: int, regions, queues=QUEUES, kick=(10, 11), call=(20, 21)):
    configs = [QueueConfig(q.index, q.size, True, q.desc_addr, q.driver_addr, q.device_addr)
               for q in queues]
    return ActivationContext(acked_features=acked, queues=configs, kick_fds=list(kick),
                             call_fds=list(call), mem_regions=regions)


@pytest.mark.parametrize("kick, call", [((), ()), ((10, 11), ()), ((), (20, 21))])
def test_backend_start_without_kick_or_call_eventfds_is_refused_before_the_tap(kick,
                                                                              call) -> None:
    tap, vhost = FakeTap(), RecordingVhost()
    backend = VhostNetBackend(tap, vhost)  # type: ignore[arg-type]
    ctx = net_ctx(VIRTIO_F_VERSION_1, REGIONS, kick=kick, call=call)
    with pytest.raises(VhostError) as refused:
        backend.start(ctx, REGIONS)
    assert str(refused.value) == (
        "vhost-net needs a kick and a call eventfd per queue: the transport must register KVM "
        "ioeventfds and irqfds before activating")
    assert tap.calls == [] and vhost.calls == []


def test_backend_prepare_hands_the_acked_features_and_memory_to_vhost() -> None:
    vhost = RecordingVhost()
    backend = VhostNetBackend(FakeTap(), vhost)  # type: ignore[arg-type]
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF) | bit(lib.VIRTIO_NET_F_MAC)
    backend.prepare(net_ctx(acked, REGIONS), REGIONS)
    assert vhost.calls == [
        ("owner",), ("features", VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)),
        ("mem", [(r.gpa, r.size, r.host_addr) for r in REGIONS])]
    backend.close()


def test_backend_start_resumes_each_ring_at_its_next_avail_and_stop_reports_positions() -> None:
    region = RamRegion()
    queues = [Vring(0, 256, 0x1000, 0x2000, 0x3000), Vring(1, 256, 0x5000, 0x6000, 0x7000)]
    vhost = RecordingVhost()
    backend = VhostNetBackend(FakeTap(), vhost)  # type: ignore[arg-type]
    ctx = net_ctx(VIRTIO_F_VERSION_1, [region], queues)
    backend.start(ctx, [region], {1: RingPosition(9, 3)})
    assert [c for c in vhost.calls if c[0] == "base"] == [("base", 0, 0), ("base", 1, 9)]
    fd = vhost.fd
    region.ram[0x3002:0x3004] = (39).to_bytes(2, "little")  # each used ring's idx
    region.ram[0x7002:0x7004] = (5).to_bytes(2, "little")
    # RecordingVhost answers GET_VRING_BASE with 40 + index.
    assert backend.stop() == {0: RingPosition(40, 39), 1: RingPosition(41, 5)}
    assert vhost.fd == fd and not backend.active  # kept for a start() that rolls back
    backend.start(ctx, [region])
    assert backend.active
    backend.close()


def test_backend_starts_a_used_ring_that_ends_at_guest_rams_end_without_event_idx() -> None:
    region = RamRegion()
    used = region.size - (4 + 8 * 256)  # no room for avail_event: fine without EVENT_IDX
    queues = [Vring(0, 256, 0x1000, 0x2000, used)]
    vhost = RecordingVhost()
    backend = VhostNetBackend(FakeTap(), vhost)  # type: ignore[arg-type]
    backend.start(net_ctx(VIRTIO_F_VERSION_1, [region], queues, [10], [20]), [region])
    region.ram[used + 2:used + 4] = (17).to_bytes(2, "little")
    assert backend.stop() == {0: RingPosition(40, 17)}
    backend.close()


# ---- VhostVsock ------------------------------------------------------------------------------


def test_every_cid_in_use_says_choose_another_one_after_64_probes() -> None:
    everything = type("All", (), {"__contains__": lambda self, cid: True})()
    vhost = RecordingVsock(in_use=everything)
    with pytest.raises(VhostError) as refused:
        vhost.claim_cid(42, key="devices.vsock.cid")
    assert str(refused.value) == (
        "devices.vsock.cid = 42 is already in use on this host (another VM or vhost-vsock user "
        "holds it); choose another one")
    assert [c[1] for c in vhost.calls] == list(range(42, 42 + 65))  # the CID, then 64 more
    assert vhost._fd is None


def test_cid_probe_wraps_from_the_highest_cid_to_the_lowest() -> None:
    vhost = RecordingVsock(in_use={VSOCK_CID_MAX})
    with pytest.raises(VhostError, match=f"choose e.g. vsock.cid = {VSOCK_CID_MIN}$"):
        vhost.claim_cid(VSOCK_CID_MAX)
    assert vhost.calls == [("cid", VSOCK_CID_MAX), ("cid", VSOCK_CID_MIN)]


def test_highest_and_lowest_guest_cids_can_be_claimed() -> None:
    for cid in (VSOCK_CID_MIN, VSOCK_CID_MAX):
        vhost = RecordingVsock()
        vhost.claim_cid(cid)
        assert vhost.cid == cid and vhost.calls == [("cid", cid)]
        vhost.close()


def test_vsock_activate_restores_saved_vring_bases() -> None:
    vhost = RecordingVsock()
    vhost.claim_cid(42)
    vhost.activate(VIRTIO_F_VERSION_1, VSOCK_REGIONS, RINGS, [1, 2], [3, 4],
                   vring_bases={1: 300})
    assert [c for c in vhost.calls if c[0] == "base"] == [("base", 0, 0), ("base", 1, 300)]
    vhost.close()


def test_vsock_activate_without_a_cid_message_says_claim_it_first() -> None:
    with pytest.raises(VhostError) as refused:
        RecordingVsock().activate(VIRTIO_F_VERSION_1, VSOCK_REGIONS, RINGS, [1, 2], [3, 4])
    assert str(refused.value) == ("vhost-vsock has no guest CID: call claim_cid() before "
                                  "activating")


def test_vsock_activate_that_fails_stops_the_worker_and_raises_the_failure() -> None:
    class FailingAddr(RecordingVsock):
        def set_vring_addr(self, index: int, addrs) -> None:
            super().set_vring_addr(index, addrs)
            raise VhostIoctlError("VHOST_SET_VRING_ADDR", errno.EFAULT, "refused")

    vhost = FailingAddr()
    vhost.claim_cid(42)
    with pytest.raises(VhostIoctlError, match="refused"):
        vhost.activate(VIRTIO_F_VERSION_1, VSOCK_REGIONS, RINGS, [1, 2], [3, 4])
    assert vhost.calls[-1] == ("running", False) and not vhost.active
    vhost.close()


def test_vsock_activate_failure_is_raised_even_when_stopping_the_worker_fails_too() -> None:
    class FailingRun(RecordingVsock):
        def set_running(self, running: bool) -> None:
            super().set_running(running)
            raise VhostIoctlError("VHOST_VSOCK_SET_RUNNING", errno.EFAULT, f"run {running}")

    vhost = FailingRun()
    vhost.claim_cid(42)
    with pytest.raises(VhostIoctlError, match="run True"):
        vhost.activate(VIRTIO_F_VERSION_1, VSOCK_REGIONS, RINGS, [1, 2], [3, 4])
    assert vhost.calls[-2:] == [("running", True), ("running", False)]
    vhost.close()


def test_vsock_deactivate_before_any_activate_touches_nothing() -> None:
    vhost = RecordingVsock()
    vhost.claim_cid(42)  # the fd is open, the worker never ran
    vhost.calls.clear()
    assert vhost.deactivate() == {}
    assert vhost.calls == []
    vhost.close()


# ---- VhostVsockBackend -----------------------------------------------------------------------


def vsock_ctx(queues=(0, 1, 2), kick=None, call=None) -> ActivationContext:
    rings = {0: RINGS[0], 1: RINGS[1], 2: QueueConfig(2, 256, True, 0x30000, 0x31000, 0x32000)}
    qs = [rings[i] for i in queues]
    return ActivationContext(
        acked_features=VIRTIO_F_VERSION_1, queues=qs,
        kick_fds=[100 + q.index for q in qs] if kick is None else list(kick),
        call_fds=[200 + q.index for q in qs] if call is None else list(call),
        mem_regions=VSOCK_REGIONS)


def test_vsock_backend_keeps_the_cid_it_claimed() -> None:
    vhost = RecordingVsock()
    backend = VhostVsockBackend(77, vhost)
    assert backend.cid == 77 and vhost.cid == 77 and backend.vhost is vhost
    backend.close()


@pytest.mark.parametrize("kick, call", [
    ((), ()), ((100, 101, 102), ()), ((), (200, 201, 202)),
    ((100, 101), (200, 201)),  # the event queue's pair missing
    ((100, 101, 102), (200, 201)),
])
def test_vsock_backend_without_a_kick_and_call_eventfd_per_queue_is_refused(kick, call) -> None:
    vhost = RecordingVsock()
    backend = VhostVsockBackend(42, vhost)
    vhost.calls.clear()
    with pytest.raises(VhostError) as refused:
        backend.activate(vsock_ctx(kick=kick, call=call), VSOCK_REGIONS)
    assert str(refused.value) == (
        "vhost-vsock needs a kick and a call eventfd per queue: the transport must register "
        "KVM ioeventfds and irqfds before activating")
    assert vhost.calls == []
    backend.close()


def test_vsock_backend_without_any_queue_or_eventfd_is_refused() -> None:
    backend = VhostVsockBackend(42, RecordingVsock())
    with pytest.raises(VhostError, match="needs a kick and a call eventfd per queue"):
        backend.activate(vsock_ctx(queues=()), VSOCK_REGIONS)
    backend.close()


def test_vsock_backend_gives_vhost_the_rx_and_tx_eventfds_of_their_queues() -> None:
    vhost = RecordingVsock()
    backend = VhostVsockBackend(42, vhost)
    vhost.calls.clear()
    backend.activate(vsock_ctx(queues=(2, 0, 1)), VSOCK_REGIONS)
    assert [c for c in vhost.calls if c[0] in ("kick", "call")] == [
        ("kick", 0, 100), ("call", 0, 200), ("kick", 1, 101), ("call", 1, 201)]
    backend.close()


def test_vsock_backend_refuses_a_kernel_without_version_1() -> None:
    vhost = RecordingVsock()
    vhost._features = bit(lib.VIRTIO_RING_F_EVENT_IDX)
    backend = VhostVsockBackend(42, vhost)
    with pytest.raises(VhostError) as refused:
        backend.features()
    assert str(refused.value) == ("the kernel's vhost-vsock lacks VIRTIO_F_VERSION_1: use a "
                                  "host kernel >= 4.8")
    backend.close()
