"""vhost-net control plane without /dev/vhost-net: constants, translation, feature and
activation logic (the ioctl layer is replaced by a recorder)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.vhost import kernel
from pymvm.vhost._vhost_cffi import ffi, lib
from pymvm.vhost.errors import VhostError
from pymvm.vhost.kernel import (
    OFFERED_FEATURES,
    TAP_OFFLOAD_FEATURES,
    VIRTIO_F_VERSION_1,
    VhostNet,
    VhostNetBackend,
    Vring,
    gpa_to_host,
    offered_features,
    vnet_hdr_size,
    vring_host_addrs,
)


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    host_addr: int


LOW = Region(gpa=0x0, size=0x10_0000, host_addr=0x7F00_0000_0000)
HIGH = Region(gpa=0x1_0000_0000, size=0x10_0000, host_addr=0x7F10_0000_0000)
REGIONS = [LOW, HIGH]


def bit(n: int) -> int:
    return 1 << n


def test_vhost_ioctl_numbers_come_from_the_header_with_the_vhost_type_byte() -> None:
    names = [
        "VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_RESET_OWNER",
        "VHOST_SET_MEM_TABLE", "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR",
        "VHOST_SET_VRING_BASE", "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK",
        "VHOST_SET_VRING_CALL", "VHOST_NET_SET_BACKEND",
    ]  # fmt: skip
    numbers = [getattr(lib, n) for n in names]
    assert all((num >> 8) & 0xFF == 0xAF for num in numbers)
    # GET/SET pairs share the command number but differ in direction bits.
    assert lib.VHOST_GET_FEATURES != lib.VHOST_SET_FEATURES
    assert lib.VHOST_GET_VRING_BASE != lib.VHOST_SET_VRING_BASE
    assert len(set(numbers)) == len(numbers)


def test_tun_constants_and_struct_layouts_are_exported() -> None:
    assert (lib.TUNSETIFF >> 8) & 0xFF == ord("T")
    assert lib.IFF_TAP and lib.IFF_NO_PI and lib.IFF_VNET_HDR and lib.IFF_MULTI_QUEUE
    assert lib.TUN_F_CSUM and lib.TUN_F_TSO4 and lib.TUN_F_TSO6 and lib.TUN_F_TSO_ECN
    assert lib.IFNAMSIZ == 16
    assert ffi.sizeof("struct vhost_memory_region") == 32
    assert ffi.sizeof("struct vhost_vring_addr") == 40
    assert ffi.sizeof("struct vhost_vring_file") == 8


def test_vnet_header_is_12_bytes_with_version_1_or_mrg_rxbuf_else_10() -> None:
    assert lib.PYMVM_VIRTIO_NET_HDR_V1_SIZE == 12
    assert vnet_hdr_size(VIRTIO_F_VERSION_1) == 12
    assert vnet_hdr_size(bit(lib.VIRTIO_NET_F_MRG_RXBUF)) == 12
    assert vnet_hdr_size(bit(lib.VIRTIO_NET_F_CSUM)) == 10


def test_mem_table_allocation_holds_every_region() -> None:
    mem = ffi.new("struct vhost_memory *", {"nregions": 3, "regions": 3})
    assert ffi.sizeof(mem[0]) == ffi.sizeof("struct vhost_memory") + 3 * 32


def test_gpa_translates_into_the_region_that_contains_it() -> None:
    assert gpa_to_host(REGIONS, 0x1234, 16) == LOW.host_addr + 0x1234
    assert gpa_to_host(REGIONS, 0x1_0000_0040, 16) == HIGH.host_addr + 0x40


def test_gpa_range_straddling_a_region_end_does_not_translate() -> None:
    assert gpa_to_host(REGIONS, LOW.size - 16, 16) == LOW.host_addr + LOW.size - 16
    assert gpa_to_host(REGIONS, LOW.size - 8, 16) is None
    assert gpa_to_host(REGIONS, 0xD000_0000, 1) is None


def test_vring_addresses_translate_to_host_addresses() -> None:
    q = Vring(index=1, size=256, desc_addr=0x4000, driver_addr=0x5000, device_addr=0x6000)
    addrs = vring_host_addrs(REGIONS, q, event_idx=True)
    assert (addrs.desc, addrs.avail, addrs.used) == (
        LOW.host_addr + 0x4000,
        LOW.host_addr + 0x5000,
        LOW.host_addr + 0x6000,
    )


@pytest.mark.parametrize("field", ["desc_addr", "driver_addr", "device_addr"])
def test_ring_outside_guest_ram_raises_vhost_error_naming_the_queue(field: str) -> None:
    rings = {"desc_addr": 0x4000, "driver_addr": 0x5000, "device_addr": 0x6000}
    rings[field] = 0xD000_0000  # MMIO hole, no region
    q = Vring(index=3, size=256, **rings)
    with pytest.raises(VhostError, match=r"queue 3: .* at GPA 0xd0000000 .*outside guest RAM"):
        vring_host_addrs(REGIONS, q, event_idx=False)


def test_used_ring_trailer_counts_only_with_event_idx() -> None:
    num = 256
    used_len = 4 + 8 * num
    q = Vring(0, num, 0x1000, 0x2000, LOW.size - used_len)  # fits exactly without avail_event
    vring_host_addrs(REGIONS, q, event_idx=False)
    with pytest.raises(VhostError, match="used ring"):
        vring_host_addrs(REGIONS, q, event_idx=True)


def test_misaligned_descriptor_table_is_refused() -> None:
    q = Vring(0, 16, desc_addr=0x1008, driver_addr=0x2000, device_addr=0x3000)
    with pytest.raises(VhostError, match="queue 0: descriptor table .* not 16-byte aligned"):
        vring_host_addrs(REGIONS, q, event_idx=False)


def test_offered_features_intersect_vhost_features_with_the_net_set() -> None:
    vhost = (
        VIRTIO_F_VERSION_1
        | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
        | bit(lib.VIRTIO_RING_F_EVENT_IDX)
        | bit(lib.VHOST_F_LOG_ALL)  # vhost-only: never shown to the guest
        | bit(lib.VHOST_NET_F_VIRTIO_NET_HDR)
        | bit(lib.VIRTIO_F_ACCESS_PLATFORM)
    )
    assert offered_features(vhost) == (
        VIRTIO_F_VERSION_1
        | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
        | bit(lib.VIRTIO_RING_F_EVENT_IDX)
        | TAP_OFFLOAD_FEATURES
    )
    assert offered_features(0xFFFF_FFFF_FFFF_FFFF) == OFFERED_FEATURES


def test_offloads_are_offered_although_vhost_never_reports_them() -> None:
    # VHOST_GET_FEATURES as seen on Linux 6.1's vhost-net (nested host): ring bits only.
    seen = 0x33D008000
    offered = offered_features(seen)
    assert offered & ~TAP_OFFLOAD_FEATURES == (
        VIRTIO_F_VERSION_1
        | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
        | bit(lib.VIRTIO_RING_F_EVENT_IDX)
        | bit(lib.VIRTIO_RING_F_INDIRECT_DESC)
    )
    assert offered & bit(lib.VIRTIO_NET_F_GUEST_TSO4) and offered & bit(lib.VIRTIO_NET_F_CSUM)


def test_vhost_without_version_1_is_refused() -> None:
    with pytest.raises(VhostError, match="VIRTIO_F_VERSION_1"):
        offered_features(bit(lib.VIRTIO_NET_F_MRG_RXBUF))


def test_open_missing_device_says_to_load_vhost_net(tmp_path) -> None:
    with pytest.raises(VhostError, match="does not exist: load .*'modprobe vhost_net'"):
        VhostNet.open(str(tmp_path / "vhost-net"))


def test_open_without_permission_says_run_as_root(monkeypatch) -> None:
    def deny(*_a: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kernel.os, "open", deny)
    with pytest.raises(VhostError, match="permission denied .* run as root"):
        VhostNet.open("/dev/vhost-net")


class RecordingVhost(VhostNet):
    """VhostNet whose ioctls are recorded instead of issued (fd is /dev/null)."""

    SUPPORTED = 0x33D008000  # what Linux 6.1's vhost-net reports: no offload bits

    def __init__(self) -> None:
        super().__init__("/dev/null")
        self.calls: list[tuple] = []
        self.opens = 0
        self._features = self.SUPPORTED

    def _open(self) -> None:
        if self._fd is None:
            self.opens += 1
        super()._open()

    def set_owner(self) -> None:
        self.calls.append(("owner",))
        self._owned = True

    def set_features(self, features: int) -> None:
        self.calls.append(("features", features))

    def set_mem_table(self, regions) -> None:
        self.calls.append(("mem", [(r.gpa, r.size, r.host_addr) for r in regions]))

    def set_vring_num(self, index: int, num: int) -> None:
        self.calls.append(("num", index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.calls.append(("base", index, base))

    def get_vring_base(self, index: int) -> int:
        self.calls.append(("get_base", index))
        return 40 + index

    def set_vring_addr(self, index: int, addrs) -> None:
        self.calls.append(("addr", index, addrs.desc, addrs.avail, addrs.used))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.calls.append(("kick", index, fd))

    def set_vring_call(self, index: int, fd: int) -> None:
        self.calls.append(("call", index, fd))

    def set_backend(self, index: int, fd: int) -> None:
        self.calls.append(("backend", index, fd))


QUEUES = [Vring(0, 256, 0x10000, 0x11000, 0x12000), Vring(1, 256, 0x20000, 0x21000, 0x22000)]


def test_activate_issues_ioctls_in_order_with_translated_addresses() -> None:
    vhost = RecordingVhost()
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF) | bit(lib.VIRTIO_NET_F_MAC)
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    h = LOW.host_addr
    assert vhost.calls == [
        ("owner",),
        # MAC is a device-model feature vhost does not know: it must not reach the kernel.
        ("features", VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)),
        ("mem", [(r.gpa, r.size, r.host_addr) for r in REGIONS]),
        ("num", 0, 256), ("base", 0, 0), ("addr", 0, h + 0x10000, h + 0x11000, h + 0x12000),
        ("kick", 0, 10), ("call", 0, 20),
        ("num", 1, 256), ("base", 1, 0), ("addr", 1, h + 0x20000, h + 0x21000, h + 0x22000),
        ("kick", 1, 11), ("call", 1, 21),
        ("backend", 0, 99), ("backend", 1, 99),
    ]  # fmt: skip
    assert vhost.active
    vhost.close()


def test_activate_restores_saved_vring_bases() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5, vring_bases={1: 7})
    assert ("base", 0, 0) in vhost.calls and ("base", 1, 7) in vhost.calls
    vhost.close()


def test_deactivate_detaches_backends_returns_bases_and_closes_the_fd() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    vhost.calls.clear()
    assert vhost.deactivate() == {0: 40, 1: 41}
    assert vhost.calls == [("backend", 0, -1), ("backend", 1, -1), ("get_base", 0), ("get_base", 1)]
    assert not vhost.active
    with pytest.raises(VhostError, match="not open"):
        _ = vhost.fd


def test_reactivation_after_deactivate_uses_a_fresh_owned_fd() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    vhost.deactivate()
    vhost.calls.clear()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    assert vhost.opens == 2
    assert vhost.calls[0] == ("owner",)
    vhost.close()


def test_activate_twice_without_deactivate_is_refused() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    with pytest.raises(VhostError, match="already active"):
        vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    vhost.close()


def test_bad_ring_address_fails_before_any_ioctl() -> None:
    vhost = RecordingVhost()
    bad = [QUEUES[0], Vring(1, 256, 0x20000, 0xD000_0000, 0x22000)]
    with pytest.raises(VhostError, match="queue 1: available ring"):
        vhost.activate(VIRTIO_F_VERSION_1, REGIONS, bad, [1, 2], [3, 4], 5)
    assert vhost.calls == []


def test_mismatched_eventfd_counts_are_refused() -> None:
    vhost = RecordingVhost()
    with pytest.raises(VhostError, match="2 queues but 1 kick and 2 call"):
        vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1], [3, 4], 5)


def test_failed_ioctl_during_activate_closes_the_fd_and_leaves_nothing_active() -> None:
    class Failing(RecordingVhost):
        def set_backend(self, index: int, fd: int) -> None:
            raise VhostError("VHOST_NET_SET_BACKEND failed")

    vhost = Failing()
    with pytest.raises(VhostError, match="SET_BACKEND"):
        vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    assert not vhost.active
    assert vhost._fd is None


def test_real_ioctl_failure_names_the_ioctl_and_errno() -> None:
    vhost = VhostNet("/dev/null")
    vhost._open()
    try:
        with pytest.raises(VhostError, match="VHOST_SET_OWNER failed: Inappropriate ioctl") as info:
            vhost.set_owner()
        assert info.value.errno == 25  # ENOTTY
    finally:
        vhost.close()
    assert os.path.exists("/dev/null")


class FakeTap:
    name = "pymvm-test"
    fd = 77

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_vnet_hdr_size(self, size: int) -> None:
        self.calls.append(("hdr", size))

    def set_offload(self, acked: int) -> int:
        self.calls.append(("offload", acked))
        return 0


def _ctx(acked: int, fds: bool = True) -> ActivationContext:
    queues = [
        QueueConfig(q.index, q.size, True, q.desc_addr, q.driver_addr, q.device_addr)
        for q in QUEUES
    ]
    return ActivationContext(
        acked_features=acked,
        queues=queues,
        kick_fds=[10, 11] if fds else [],
        call_fds=[20, 21] if fds else [],
        mem_regions=REGIONS,
    )


def test_backend_configures_the_tap_then_hands_queues_to_vhost() -> None:
    tap, vhost = FakeTap(), RecordingVhost()
    backend = VhostNetBackend(tap, vhost)  # type: ignore[arg-type]
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_GUEST_CSUM) | bit(lib.VIRTIO_NET_F_GUEST_TSO4)
    ctx = _ctx(acked)
    backend.activate(ctx, ctx.mem_regions)
    assert tap.calls == [("hdr", 12), ("offload", acked)]
    # Offload bits stay with the TAP: vhost-net only gets the bits it knows.
    assert ("features", VIRTIO_F_VERSION_1) in vhost.calls
    assert ("backend", 0, 77) in vhost.calls and ("backend", 1, 77) in vhost.calls
    backend.reset()
    assert not vhost.active
    backend.activate(ctx, ctx.mem_regions)  # the driver may set the rings up again
    assert vhost.active
    backend.close()


def test_backend_features_are_what_the_virtio_net_device_can_pass_through() -> None:
    from pymvm.devices.virtio.net import PASSTHROUGH_FEATURES

    backend = VhostNetBackend(FakeTap(), RecordingVhost())  # type: ignore[arg-type]
    assert backend.features() & ~PASSTHROUGH_FEATURES == VIRTIO_F_VERSION_1


def test_backend_without_eventfds_is_refused() -> None:
    backend = VhostNetBackend(FakeTap(), RecordingVhost())  # type: ignore[arg-type]
    ctx = _ctx(VIRTIO_F_VERSION_1, fds=False)
    with pytest.raises(VhostError, match="needs a kick and a call eventfd"):
        backend.activate(ctx, ctx.mem_regions)


# ---- the ioctl wrappers' structs, read back at the kernel header's offsets -------------------


class IoctlRecorder:
    """Stands in for the cffi ``lib`` of pymvm.vhost.kernel: each ioctl's argument is kept as
    the raw bytes the kernel would have read, and GET ioctls are answered like the kernel."""

    def __init__(self, features: int, vring_base: int) -> None:
        self.calls: list[tuple[int, bytes | int]] = []
        self._features = features
        self._vring_base = vring_base

    def __getattr__(self, name: str):
        return getattr(lib, name)  # constants (ioctl numbers, VHOST_FILE_UNBIND...)

    def pymvm_ioctl_val(self, fd: int, request: int, arg: int) -> int:
        self.calls.append((request, arg))
        return 0

    def pymvm_ioctl_ptr(self, fd: int, request: int, arg) -> int:
        if request == lib.VHOST_GET_FEATURES:
            arg[0] = self._features
        elif request == lib.VHOST_GET_VRING_BASE:
            arg.num = self._vring_base
        self.calls.append((request, bytes(ffi.buffer(arg))))
        return 0

    def args(self, request: int) -> list[bytes]:
        return [a for r, a in self.calls if r == request]


def field(raw: bytes, struct_name: str, name: str) -> int:
    """Field ``name`` of ``struct_name`` in ``raw``, at the offset and size the compiler gives
    for the system's <linux/vhost.h> (the cdef's ``...;`` makes cffi take them from there)."""
    ctype = ffi.typeof(struct_name)
    offset = ffi.offsetof(ctype, name)
    size = ffi.sizeof(dict(ctype.fields)[name].type)
    return int.from_bytes(raw[offset:offset + size], "little", signed=name == "fd")


def test_ioctl_structs_carry_each_value_at_the_kernel_layout_offset(monkeypatch) -> None:
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
    recorder = IoctlRecorder(features=acked, vring_base=1234)
    monkeypatch.setattr(kernel, "lib", recorder)
    vhost = VhostNet("/dev/null")
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99, vring_bases={1: 7})

    (features,) = recorder.args(lib.VHOST_SET_FEATURES)
    assert int.from_bytes(features, "little") == acked
    (mem,) = recorder.args(lib.VHOST_SET_MEM_TABLE)
    assert field(mem, "struct vhost_memory", "nregions") == 2
    base = ffi.offsetof("struct vhost_memory", "regions")
    size = ffi.sizeof("struct vhost_memory_region")
    for i, region in enumerate(REGIONS):
        raw = mem[base + i * size:base + (i + 1) * size]
        assert [field(raw, "struct vhost_memory_region", f)
                for f in ("guest_phys_addr", "memory_size", "userspace_addr")] == [
            region.gpa, region.size, region.host_addr]

    def state(raw: bytes) -> tuple[int, int]:
        return (field(raw, "struct vhost_vring_state", "index"),
                field(raw, "struct vhost_vring_state", "num"))

    def vfile(raw: bytes) -> tuple[int, int]:
        return (field(raw, "struct vhost_vring_file", "index"),
                field(raw, "struct vhost_vring_file", "fd"))

    assert [state(a) for a in recorder.args(lib.VHOST_SET_VRING_NUM)] == [(0, 256), (1, 256)]
    assert [state(a) for a in recorder.args(lib.VHOST_SET_VRING_BASE)] == [(0, 0), (1, 7)]
    h = LOW.host_addr
    addr_fields = ("index", "flags", "desc_user_addr", "avail_user_addr", "used_user_addr",
                   "log_guest_addr")
    assert [tuple(field(a, "struct vhost_vring_addr", f) for f in addr_fields)
            for a in recorder.args(lib.VHOST_SET_VRING_ADDR)] == [
        (0, 0, h + 0x10000, h + 0x11000, h + 0x12000, 0),
        (1, 0, h + 0x20000, h + 0x21000, h + 0x22000, 0),
    ]
    assert [vfile(a) for a in recorder.args(lib.VHOST_SET_VRING_KICK)] == [(0, 10), (1, 11)]
    assert [vfile(a) for a in recorder.args(lib.VHOST_SET_VRING_CALL)] == [(0, 20), (1, 21)]
    assert [vfile(a) for a in recorder.args(lib.VHOST_NET_SET_BACKEND)] == [(0, 99), (1, 99)]

    recorder.calls.clear()
    assert vhost.deactivate() == {0: 1234, 1: 1234}
    assert [vfile(a) for a in recorder.args(lib.VHOST_NET_SET_BACKEND)] == [(0, -1), (1, -1)]
    assert [state(a)[0] for a in recorder.args(lib.VHOST_GET_VRING_BASE)] == [0, 1]


# ---- a back-end swap: prepared ahead, released after -------------------------------------------


def test_prepare_sets_owner_features_and_memory_ahead_and_activate_then_only_sets_up_rings() -> None:
    vhost = RecordingVhost()
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
    vhost.prepare(acked, REGIONS)
    assert vhost.calls == [("owner",), ("features", acked),
                           ("mem", [(r.gpa, r.size, r.host_addr) for r in REGIONS])]
    assert not vhost.active
    vhost.calls.clear()
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    assert [c[0] for c in vhost.calls] == ["num", "base", "addr", "kick", "call"] * 2 + [
        "backend", "backend"]
    assert vhost.opens == 1
    vhost.close()


def test_activate_after_a_prepare_with_other_features_sets_them_again() -> None:
    vhost = RecordingVhost()
    vhost.prepare(VIRTIO_F_VERSION_1, REGIONS)
    vhost.calls.clear()
    acked = VIRTIO_F_VERSION_1 | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
    vhost.activate(acked, REGIONS, QUEUES, [10, 11], [20, 21], tap_fd=99)
    assert vhost.calls[:2] == [("features", acked),
                               ("mem", [(r.gpa, r.size, r.host_addr) for r in REGIONS])]
    vhost.close()


def test_deactivate_without_close_keeps_the_owned_fd_and_activate_reuses_it() -> None:
    vhost = RecordingVhost()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5)
    fd = vhost.fd
    vhost.calls.clear()
    assert vhost.deactivate(close=False) == {0: 40, 1: 41}
    assert vhost.fd == fd and not vhost.active  # released later, by close()
    vhost.calls.clear()
    vhost.activate(VIRTIO_F_VERSION_1, REGIONS, QUEUES, [1, 2], [3, 4], 5, vring_bases={0: 40})
    assert vhost.opens == 1 and ("owner",) not in vhost.calls
    assert vhost.calls[0][0] == "features" and ("base", 0, 40) in vhost.calls
    vhost.close()
    with pytest.raises(VhostError, match="not open"):
        _ = vhost.fd
