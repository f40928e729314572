"""The in-kernel vhost back-ends (vhost-net, vhost-vsock): pymvm drives the control plane,
the kernel moves the data.

Once activated, the kernel's vhost worker reads the guest's split rings straight out of
guest memory (through the mem table of host userspace addresses), is woken by the queue's
kick eventfd (a KVM ioeventfd on QueueNotify) and signals the guest through the call
eventfd (a KVM irqfd). See Documentation/virtual/vhost, drivers/vhost/net.c and vsock.c.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self

import structlog

from pymvm.record import FrozenRecord
from pymvm.vhost._vhost_cffi import ffi, lib
from pymvm.vhost.errors import VhostError, VhostIoctlError
from pymvm.vhost.queue_state import RingPosition, used_idx_at

if TYPE_CHECKING:
    from pymvm.devices.virtio.device import ActivationContext
    from pymvm.net.tap import Tap

log = structlog.get_logger()

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_VSOCK_PATH = "/dev/vhost-vsock"

# Guest CIDs (virtio 1.2 5.10.4): 0-2 are reserved (hypervisor, local, host) and the kernel
# takes a 32-bit CID, U32_MAX being VMADDR_CID_ANY.
VSOCK_CID_MIN = 3
VSOCK_CID_MAX = 0xFFFF_FFFE

VIRTIO_F_VERSION_1 = 1 << lib.VIRTIO_F_VERSION_1
VIRTIO_NET_F_MRG_RXBUF = 1 << lib.VIRTIO_NET_F_MRG_RXBUF
VIRTIO_RING_F_EVENT_IDX = 1 << lib.VIRTIO_RING_F_EVENT_IDX

# Ring and header-layout features: vhost-net itself must implement these, so they are offered
# only where VHOST_GET_FEATURES has them.
VHOST_RING_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << lib.VIRTIO_RING_F_INDIRECT_DESC
)
# Checksum/segmentation offloads: vhost-net passes the virtio-net header through untouched and
# the TAP (IFF_VNET_HDR + TUNSETOFFLOAD) implements them, so vhost never reports these bits.
TAP_OFFLOAD_FEATURES = sum(
    1 << bit
    for bit in (
        lib.VIRTIO_NET_F_CSUM,
        lib.VIRTIO_NET_F_GUEST_CSUM,
        lib.VIRTIO_NET_F_GUEST_TSO4,
        lib.VIRTIO_NET_F_GUEST_TSO6,
        lib.VIRTIO_NET_F_GUEST_ECN,
        lib.VIRTIO_NET_F_GUEST_UFO,
        lib.VIRTIO_NET_F_HOST_TSO4,
        lib.VIRTIO_NET_F_HOST_TSO6,
        lib.VIRTIO_NET_F_HOST_ECN,
        lib.VIRTIO_NET_F_HOST_UFO,
    )
)
# Device-level bits (MAC, STATUS, MTU) belong to the virtio-net device model.
OFFERED_FEATURES = VHOST_RING_FEATURES | TAP_OFFLOAD_FEATURES

# Split virtqueue alignment (virtio 1.2 §2.7).
_DESC_ALIGN, _AVAIL_ALIGN, _USED_ALIGN = 16, 2, 4

_IOCTL_HINTS = {
    ("VHOST_SET_OWNER", errno.EBUSY): "this vhost-net fd already has an owner",
    ("VHOST_SET_FEATURES", errno.EOPNOTSUPP): "the kernel's vhost-net does not support "
    "these feature bits: intersect with features() first",
    ("VHOST_SET_VRING_ADDR", errno.EINVAL): "a ring address is misaligned or the ring "
    "is busy: deactivate before reconfiguring",
    ("VHOST_SET_VRING_ADDR", errno.EFAULT): "a ring address is not accessible host memory",
    ("VHOST_SET_VRING_NUM", errno.EINVAL): "the queue size must be a power of two",
    ("VHOST_SET_VRING_NUM", errno.EBUSY): "the queue has a backend attached: deactivate first",
    ("VHOST_SET_VRING_BASE", errno.EBUSY): "the queue has a backend attached: deactivate first",
    ("VHOST_NET_SET_BACKEND", errno.ENOTSOCK): "the backend fd is not a TAP",
    ("VHOST_NET_SET_BACKEND", errno.EFAULT): "the rings are not inside the mem table",
    ("VHOST_NET_SET_BACKEND", errno.ENOBUFS): "the queue index is out of range",
    ("VHOST_VSOCK_SET_GUEST_CID", errno.EINVAL): "the CID must be from 3 to 4294967294",
    ("VHOST_VSOCK_SET_RUNNING", errno.EFAULT): "the rings are not inside the mem table",
}


class MemoryRegionLike(Protocol):
    """One memfd-backed, MAP_SHARED guest RAM region (pymvm.memory provides these)."""

    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def host_addr(self) -> int: ...


class VringLike(Protocol):
    """A queue as the transport configured it: all addresses are guest physical."""

    @property
    def index(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def desc_addr(self) -> int: ...

    @property
    def driver_addr(self) -> int: ...

    @property
    def device_addr(self) -> int: ...


class Vring(FrozenRecord):
    __slots__ = ("index", "size", "desc_addr", "driver_addr", "device_addr")
    index: int
    size: int
    desc_addr: int
    driver_addr: int
    device_addr: int

    def __init__(self, index: int, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int) -> None:
        self._init(index, size, desc_addr, driver_addr, device_addr)


class VringHostAddrs(FrozenRecord):
    __slots__ = ("desc", "avail", "used")
    desc: int
    avail: int
    used: int

    def __init__(self, desc: int, avail: int, used: int) -> None:
        self._init(desc, avail, used)


def offered_features(vhost_features: int) -> int:
    """The virtio features to offer the guest, given what VHOST_GET_FEATURES reported:
    the ring features vhost supports plus the offloads a vnet-header TAP implements."""
    if not vhost_features & VIRTIO_F_VERSION_1:
        raise VhostError(
            "the kernel's vhost-net lacks VIRTIO_F_VERSION_1: use a host kernel >= 4.0"
        )
    return (vhost_features & VHOST_RING_FEATURES) | TAP_OFFLOAD_FEATURES


def vnet_hdr_size(acked_features: int) -> int:
    """Bytes of virtio-net header per packet, which the TAP must be set to (virtio 1.2 §5.1.6)."""
    if acked_features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF):
        return int(lib.PYMVM_VIRTIO_NET_HDR_MRG_RXBUF_SIZE)
    return int(lib.PYMVM_VIRTIO_NET_HDR_SIZE)


def gpa_to_host(regions: Sequence[MemoryRegionLike], gpa: int, length: int) -> int | None:
    """Host address of [gpa, gpa+length) if it lies inside one region, else None."""
    for region in regions:
        if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
            return region.host_addr + (gpa - region.gpa)
    return None


def vring_host_addrs(
    regions: Sequence[MemoryRegionLike], vring: VringLike, event_idx: bool
) -> VringHostAddrs:
    """Translate a queue's three ring GPAs; each whole ring must sit in one region."""
    num = vring.size
    extra = 2 if event_idx else 0  # used_event / avail_event trailers
    parts = {
        "descriptor table": (vring.desc_addr, 16 * num, _DESC_ALIGN),
        "available ring": (vring.driver_addr, 4 + 2 * num + extra, _AVAIL_ALIGN),
        "used ring": (vring.device_addr, 4 + 8 * num + extra, _USED_ALIGN),
    }
    out: dict[str, int] = {}
    for what, (gpa, length, align) in parts.items():
        if gpa % align:
            raise VhostError(
                f"queue {vring.index}: {what} at GPA {gpa:#x} is not {align}-byte aligned: "
                "the guest driver programmed a bad address"
            )
        hva = gpa_to_host(regions, gpa, length)
        if hva is None:
            raise VhostError(
                f"queue {vring.index}: {what} at GPA {gpa:#x} (+{length:#x}) is outside "
                "guest RAM: the guest driver programmed a bad address"
            )
        out[what] = hva
    return VringHostAddrs(
        desc=out["descriptor table"], avail=out["available ring"], used=out["used ring"]
    )


class VhostDevice:
    """Owner of one /dev/vhost-* fd: the ring set-up every in-kernel vhost device shares.

    Subclasses (VhostNet, VhostVsock) add the device-specific ioctls that start and stop the
    kernel's worker on the rings (NET_SET_BACKEND, VSOCK_SET_RUNNING).
    """

    #: What the device is called in messages, and the module that provides its node.
    name = "vhost"
    module = "vhost"

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None
        self._owned = False
        self._features: int | None = None
        self._active: list[int] = []
        #: (features, memory regions) that prepare() set ahead of activate(), on this fd
        self._prepared: tuple[int, tuple[Any, ...]] | None = None
        self._log = log.bind(device=self.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise VhostError(
                f"{self.name} device is not open: call {type(self).__name__}.open() first"
            )
        return self._fd

    @property
    def active(self) -> bool:
        return bool(self._active)

    def _open(self) -> None:
        if self._fd is not None:
            return
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VhostError(
                f"{self._path} does not exist: load the module with 'modprobe {self.module}'"
            ) from None
        except PermissionError:
            raise VhostError(
                f"permission denied opening {self._path}: run as root or grant this user "
                "read/write access to it"
            ) from None
        except OSError as exc:
            raise VhostError(f"cannot open {self._path}: {exc.strerror}") from None
        self._log.debug("vhost_opened", fd=self._fd)

    # ---- one-to-one ioctl wrappers ----

    def _check(self, rc: int, name: str) -> None:
        if rc < 0:
            err = ffi.errno
            hint = _IOCTL_HINTS.get((name, err))
            detail = f"{name} failed: {os.strerror(err)}"
            raise VhostIoctlError(name, err, f"{detail}: {hint}" if hint else detail)

    def set_owner(self) -> None:
        self._check(lib.pymvm_ioctl_val(self.fd, lib.VHOST_SET_OWNER, 0), "VHOST_SET_OWNER")
        self._owned = True

    def features(self) -> int:
        """The raw VHOST_GET_FEATURES bits (cached: they do not change for a kernel)."""
        if self._features is None:
            self._open()
            out = ffi.new("__u64 *")
            self._check(
                lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_GET_FEATURES, out), "VHOST_GET_FEATURES"
            )
            self._features = int(out[0])
        return self._features

    def set_features(self, features: int) -> None:
        val = ffi.new("__u64 *", features)
        self._check(lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_SET_FEATURES, val), "VHOST_SET_FEATURES")

    def set_mem_table(self, regions: Sequence[MemoryRegionLike]) -> None:
        n = len(regions)
        mem = ffi.new("struct vhost_memory *", {"nregions": n, "regions": n})
        for i, region in enumerate(regions):
            mem.regions[i].guest_phys_addr = region.gpa
            mem.regions[i].memory_size = region.size
            mem.regions[i].userspace_addr = region.host_addr
        self._check(
            lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_SET_MEM_TABLE, mem), "VHOST_SET_MEM_TABLE"
        )

    def _vring_state(self, request: int, name: str, index: int, num: int) -> int:
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._check(lib.pymvm_ioctl_ptr(self.fd, request, state), name)
        return int(state.num)

    def set_vring_num(self, index: int, num: int) -> None:
        self._vring_state(lib.VHOST_SET_VRING_NUM, "VHOST_SET_VRING_NUM", index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._vring_state(lib.VHOST_SET_VRING_BASE, "VHOST_SET_VRING_BASE", index, base)

    def get_vring_base(self, index: int) -> int:
        return self._vring_state(lib.VHOST_GET_VRING_BASE, "VHOST_GET_VRING_BASE", index, 0)

    def set_vring_addr(self, index: int, addrs: VringHostAddrs) -> None:
        addr = ffi.new(
            "struct vhost_vring_addr *",
            {
                "index": index,
                "flags": 0,  # no dirty logging
                "desc_user_addr": addrs.desc,
                "used_user_addr": addrs.used,
                "avail_user_addr": addrs.avail,
                "log_guest_addr": 0,
            },
        )
        self._check(
            lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_SET_VRING_ADDR, addr), "VHOST_SET_VRING_ADDR"
        )

    def _vring_file(self, request: int, name: str, index: int, fd: int) -> None:
        vfile = ffi.new("struct vhost_vring_file *", {"index": index, "fd": fd})
        self._check(lib.pymvm_ioctl_ptr(self.fd, request, vfile), name)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._vring_file(lib.VHOST_SET_VRING_KICK, "VHOST_SET_VRING_KICK", index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._vring_file(lib.VHOST_SET_VRING_CALL, "VHOST_SET_VRING_CALL", index, fd)

    # ---- shared ring set-up ----

    def _prepare(
        self,
        acked_features: int,
        mem_regions: Sequence[MemoryRegionLike],
        queues: Sequence[VringLike],
        kick_fds: Sequence[int],
        call_fds: Sequence[int],
    ) -> tuple[int, list[VringHostAddrs]]:
        """Check the arguments and translate the rings, touching no ioctl; returns the
        feature bits the kernel will get and each queue's host addresses."""
        if self._active:
            raise VhostError(
                f"{self.name} is already active: deactivate() before activating again"
            )
        if not len(queues) == len(kick_fds) == len(call_fds):
            raise VhostError(
                f"{len(queues)} queues but {len(kick_fds)} kick and {len(call_fds)} call "
                "eventfds: pass one of each per queue"
            )
        # vhost rejects bits it does not know (offloads, MAC...) with EOPNOTSUPP.
        features = acked_features & self.features()
        event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        # Translate first so a bad guest address fails before the kernel is touched.
        return features, [vring_host_addrs(mem_regions, q, event_idx) for q in queues]

    def prepare(self, acked_features: int, mem_regions: Sequence[MemoryRegionLike]) -> None:
        """Ahead of activate(), while another back-end still runs the rings (a back-end swap):
        open the device, take ownership (the kernel starts its worker thread), set the
        features and the memory table. activate() then only sets the rings up."""
        if self._active:
            raise VhostError(f"{self.name} is already active: nothing to prepare")
        features = acked_features & self.features()
        self._open()
        if not self._owned:
            self.set_owner()
        self.set_features(features)
        self.set_mem_table(mem_regions)
        self._prepared = (features, tuple(mem_regions))

    def _setup_rings(
        self,
        features: int,
        mem_regions: Sequence[MemoryRegionLike],
        queues: Sequence[VringLike],
        host_addrs: Sequence[VringHostAddrs],
        kick_fds: Sequence[int],
        call_fds: Sequence[int],
        vring_bases: Mapping[int, int] | None,
    ) -> None:
        """Owner, features, mem table, then each ring: size, base, addresses, kick, call."""
        bases = vring_bases or {}
        prepared, self._prepared = self._prepared, None
        if self._fd is None or prepared != (features, tuple(mem_regions)):
            self._open()
            if not self._owned:
                self.set_owner()
            self.set_features(features)
            self.set_mem_table(mem_regions)
        # _prepare() checked that there is one kick and one call eventfd per queue.
        for q, addrs, kick, call in zip(queues, host_addrs, kick_fds, call_fds):
            self.set_vring_num(q.index, q.size)
            self.set_vring_base(q.index, bases.get(q.index, 0))
            self.set_vring_addr(q.index, addrs)
            self.set_vring_kick(q.index, kick)
            self.set_vring_call(q.index, call)

    def _vring_bases(self, indexes: Sequence[int]) -> dict[int, int]:
        return {index: self.get_vring_base(index) for index in indexes}

    def _close_fd(self) -> None:
        self._prepared = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._owned = False
            os.close(fd)

    def close(self) -> None:
        """Release the device; safe to call more than once."""
        self._active.clear()
        self._close_fd()


class VhostNet(VhostDevice):
    """Owner of one /dev/vhost-net fd and of the queues it has attached to a TAP.

    deactivate() closes the fd and the next activate() opens a fresh one: a new vhost
    device starts from a clean state (no stale rings, log or owner), which is simpler
    and more robust than VHOST_RESET_OWNER across guest reboots and driver rebinds.
    """

    name = "vhost-net"
    module = "vhost_net"

    def __init__(self, path: str = VHOST_NET_PATH) -> None:
        super().__init__(path)

    @classmethod
    def open(cls, path: str = VHOST_NET_PATH) -> VhostNet:
        vhost = cls(path)
        vhost._open()
        return vhost

    def set_backend(self, index: int, fd: int) -> None:
        """Attach queue ``index`` to a TAP fd; -1 detaches it (the worker stops on it)."""
        self._vring_file(lib.VHOST_NET_SET_BACKEND, "VHOST_NET_SET_BACKEND", index, fd)

    # ---- lifecycle ----

    def activate(
        self,
        acked_features: int,
        mem_regions: Sequence[MemoryRegionLike],
        queues: Sequence[VringLike],
        kick_fds: Sequence[int],
        call_fds: Sequence[int],
        tap_fd: int,
        vring_bases: Mapping[int, int] | None = None,
    ) -> None:
        """Hand the queues to the kernel. ``vring_bases`` restores saved ring positions
        (snapshot/restore); a freshly reset device starts every ring at 0."""
        features, host_addrs = self._prepare(acked_features, mem_regions, queues, kick_fds,
                                             call_fds)
        try:
            self._setup_rings(features, mem_regions, queues, host_addrs, kick_fds, call_fds,
                              vring_bases)
            for q in queues:
                self.set_backend(q.index, tap_fd)
                self._active.append(q.index)
        except BaseException:
            # Leave no half-attached device behind: a fresh fd on the next try.
            self._active.clear()
            self._close_fd()
            raise
        self._log.info(
            "vhost_net_activated",
            features=hex(features),
            queues=[q.index for q in queues],
            tap_fd=tap_fd,
        )

    def deactivate(self, *, close: bool = True) -> dict[int, int]:
        """Detach every queue from the TAP and return {queue index: last avail index}.

        The fd is closed so the next activate() starts from a fresh vhost device; with
        ``close=False`` (a back-end swap) it stays open until close(): releasing it waits for
        the kernel (its worker thread stops, an RCU grace period), which need not happen
        while the guest's rings wait for their next back-end. activate() works on it again."""
        bases: dict[int, int] = {}
        if self._fd is None:
            return bases
        try:
            for index in self._active:
                self.set_backend(index, lib.VHOST_FILE_UNBIND)
            bases = self._vring_bases(self._active)
        finally:
            self._active.clear()
            if close:
                self._close_fd()
        self._log.info("vhost_net_deactivated", vring_bases=bases)
        return bases


class VhostVsock(VhostDevice):
    """Owner of one /dev/vhost-vsock fd: the guest's CID and its rx/tx rings.

    Unlike VhostNet, the fd lives as long as the device: it holds the guest's CID (a free CID
    for anyone else the moment it closed), and the kernel resets host sockets connected to
    the guest only when it closes. A driver reset stops the worker (SET_RUNNING 0); the next
    DRIVER_OK programs the rings again on the same fd.
    """

    name = "vhost-vsock"
    module = "vhost_vsock"

    def __init__(self, path: str = VHOST_VSOCK_PATH) -> None:
        super().__init__(path)
        self.cid: int | None = None

    @classmethod
    def open(cls, path: str = VHOST_VSOCK_PATH) -> VhostVsock:
        vhost = cls(path)
        vhost._open()
        return vhost

    def set_guest_cid(self, cid: int) -> None:
        val = ffi.new("__u64 *", cid)
        self._check(lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_VSOCK_SET_GUEST_CID, val),
                    "VHOST_VSOCK_SET_GUEST_CID")

    def set_running(self, running: bool) -> None:
        val = ffi.new("int *", 1 if running else 0)
        self._check(lib.pymvm_ioctl_ptr(self.fd, lib.VHOST_VSOCK_SET_RUNNING, val),
                    "VHOST_VSOCK_SET_RUNNING")

    def claim_cid(self, cid: int, *, key: str = "vsock.cid") -> None:
        """Open the device and take ``cid`` for this guest. A CID someone else holds is a
        VhostError naming a free one (found by trying the next CIDs on this fd)."""
        if not VSOCK_CID_MIN <= cid <= VSOCK_CID_MAX:
            raise VhostError(f"{key} = {cid} is not a guest CID: choose one from "
                             f"{VSOCK_CID_MIN} to {VSOCK_CID_MAX}")
        self._open()
        try:
            self.set_guest_cid(cid)
        except VhostIoctlError as e:
            if e.errno != errno.EADDRINUSE:
                self._close_fd()
                raise
            free = self._probe_free_cid(cid)
            self._close_fd()  # releases whatever the probe took
            other = f"e.g. {key} = {free}" if free is not None else "another one"
            raise VhostError(f"{key} = {cid} is already in use on this host (another VM or "
                             f"vhost-vsock user holds it); choose {other}") from None
        self.cid = cid
        self._log.info("vhost_vsock_cid_claimed", cid=cid)

    def _probe_free_cid(self, taken: int, tries: int = 64) -> int | None:
        for step in range(1, tries + 1):
            candidate = VSOCK_CID_MIN + (taken - VSOCK_CID_MIN + step) % (
                VSOCK_CID_MAX - VSOCK_CID_MIN + 1)
            try:
                self.set_guest_cid(candidate)
            except VhostIoctlError:
                continue
            return candidate
        return None

    def activate(
        self,
        acked_features: int,
        mem_regions: Sequence[MemoryRegionLike],
        queues: Sequence[VringLike],
        kick_fds: Sequence[int],
        call_fds: Sequence[int],
        vring_bases: Mapping[int, int] | None = None,
    ) -> None:
        """Program the rx/tx rings and start the kernel's worker (SET_RUNNING 1)."""
        if self.cid is None:
            raise VhostError("vhost-vsock has no guest CID: call claim_cid() before activating")
        features, host_addrs = self._prepare(acked_features, mem_regions, queues, kick_fds,
                                             call_fds)
        try:
            self._setup_rings(features, mem_regions, queues, host_addrs, kick_fds, call_fds,
                              vring_bases)
            self.set_running(True)
        except BaseException:
            self._stop_quietly()
            raise
        self._active = [q.index for q in queues]
        self._log.info("vhost_vsock_activated", cid=self.cid, features=hex(features),
                       queues=self._active)

    def _stop_quietly(self) -> None:
        try:
            self.set_running(False)
        except VhostError as e:  # never started: nothing to stop
            self._log.debug("vhost_vsock_stop_failed", error=str(e))

    def deactivate(self) -> dict[int, int]:
        """Stop the worker and return {queue index: last avail index}; the fd and the CID
        stay for the next activate()."""
        if not self._active or self._fd is None:
            self._active.clear()
            return {}
        try:
            self.set_running(False)
            bases = self._vring_bases(self._active)
        finally:
            self._active.clear()
        self._log.info("vhost_vsock_deactivated", vring_bases=bases)
        return bases

    def close(self) -> None:
        super().close()
        self.cid = None


class VhostNetBackend:
    """The virtio-net ``NetBackend`` served by in-kernel vhost-net on a TAP.

    Owns its VhostNet; the Tap belongs to whoever opened it (e.g. HostNetwork), which must
    outlive this back-end: close() this first.
    """

    def __init__(self, tap: Tap, vhost: VhostNet | None = None) -> None:
        self._tap = tap
        self._vhost = vhost or VhostNet()
        self._used_rings: dict[int, int] = {}  # queue index -> host address of its used ring
        self._regions: tuple[Any, ...] = ()

    @property
    def vhost(self) -> VhostNet:
        return self._vhost

    def features(self) -> int:
        return offered_features(self._vhost.features())

    @property
    def active(self) -> bool:
        return self._vhost.active

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        """Hand the rings to the kernel from their start (a driver's DRIVER_OK)."""
        self.start(ctx, mem_regions)

    def start(self, ctx: ActivationContext, mem_regions: Sequence[Any],
              positions: Mapping[int, RingPosition] | None = None, *,
              strict: bool = True) -> None:
        """Hand the rings to the kernel, each resuming at ``positions[queue].next_avail``
        (VHOST_SET_VRING_BASE; 0 for a queue not given). The kernel reads the used idx from
        the guest's used ring itself. Every failure raises (``strict`` is always so here)."""
        if not ctx.kick_fds or not ctx.call_fds:
            raise VhostError(
                "vhost-net needs a kick and a call eventfd per queue: the transport must "
                "register KVM ioeventfds and irqfds before activating"
            )
        acked = ctx.acked_features
        # The TAP must frame packets exactly as vhost-net expects and the guest negotiated.
        self._tap.set_vnet_hdr_size(vnet_hdr_size(acked))
        self._tap.set_offload(acked)
        bases = {q: pos.next_avail for q, pos in (positions or {}).items()}
        self._vhost.activate(
            acked, mem_regions, ctx.queues, ctx.kick_fds, ctx.call_fds, self._tap.fd,
            vring_bases=bases,
        )
        # Only the used ring's address is kept: activate() checked every ring, trailers included.
        self._used_rings = {q.index: vring_host_addrs(mem_regions, q, False).used
                            for q in ctx.queues}
        self._regions = tuple(mem_regions)

    def prepare(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        """Before a swap stops the old back-end: the vhost device's owner, features and
        memory table (VhostNet.prepare), so that start() only sets the rings up."""
        self._vhost.prepare(ctx.acked_features, mem_regions)

    def stop(self) -> dict[int, RingPosition]:
        """Detach the rings; returns each queue's position: the next available entry
        (VHOST_GET_VRING_BASE) and the used ring's idx read from guest memory. The vhost
        fd is released by close() (after a swap's new back-end started), or by a start()
        that follows (rollback), which reuses it."""
        bases = self._vhost.deactivate(close=False)
        positions = {q: RingPosition(base, used_idx_at(self._regions, self._used_rings[q]))
                     for q, base in bases.items() if q in self._used_rings}
        return positions

    def reset(self) -> None:
        """Device reset: detach the rings; a reset device restarts them at index 0."""
        self._vhost.deactivate()

    def close(self) -> None:
        self._vhost.close()


# vhost-vsock implements the rings; SEQPACKET only where the kernel reports it (Linux >= 5.14).
VSOCK_RING_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << lib.VIRTIO_RING_F_INDIRECT_DESC
    | 1 << lib.VIRTIO_VSOCK_F_SEQPACKET
)


class VhostVsockBackend:
    """The data plane of a virtio-vsock device: rx (0) and tx (1) in the kernel's vhost-vsock.

    The event queue (2) is not the kernel's: the device model keeps it. The CID is claimed at
    construction, so a CID in use or a missing /dev/vhost-vsock fails the VM's build.
    """

    def __init__(self, cid: int, vhost: VhostVsock | None = None) -> None:
        self._vhost = vhost or VhostVsock()
        try:
            self._vhost.claim_cid(cid)
        except BaseException:
            self._vhost.close()
            raise
        self.cid = cid

    @property
    def vhost(self) -> VhostVsock:
        return self._vhost

    def features(self) -> int:
        vhost_features = self._vhost.features()
        if not vhost_features & VIRTIO_F_VERSION_1:
            raise VhostError("the kernel's vhost-vsock lacks VIRTIO_F_VERSION_1: use a host "
                             "kernel >= 4.8")
        return vhost_features & VSOCK_RING_FEATURES

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        if not ctx.kick_fds or not len(ctx.queues) == len(ctx.kick_fds) == len(ctx.call_fds):
            raise VhostError(
                "vhost-vsock needs a kick and a call eventfd per queue: the transport must "
                "register KVM ioeventfds and irqfds before activating"
            )
        picked = [(q, k, c) for q, k, c in zip(ctx.queues, ctx.kick_fds, ctx.call_fds)
                  if q.index in (0, 1)]
        self._vhost.activate(ctx.acked_features, mem_regions, [p[0] for p in picked],
                             [p[1] for p in picked], [p[2] for p in picked])

    def reset(self) -> None:
        """Device reset: stop the worker; a reset device restarts its rings at index 0."""
        self._vhost.deactivate()

    def close(self) -> None:
        self._vhost.close()
