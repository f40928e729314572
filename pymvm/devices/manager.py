"""The VM's device registry: virtio-mmio slots and IRQs, devices by id, and their owned parts.

Firecracker's ``device_manager/mmio.rs`` in Python: one object allocates each virtio-mmio
device a page of the MMIO hole and an IOAPIC pin (pymvm.layout), keeps the devices by id in
slot order, and is the single source for the kernel command line (and the ACPI tables). Each
device owns its parts separately, each closed by its own ExitStack:

- the transport's KVM plumbing (ioeventfd/irqfd) and its place on the bus;
- the back-end (vhost-net, a vhost-user front-end): the data plane, replaceable while the
  device lives (``replace_backend``);
- the host network (TAP, bridge, namespace, or a built-in back-end process that owns them).

Closing a device closes the back-end first (vhost holds a reference to the TAP), then the host
network, then the plumbing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from .. import layout
from ..record import FrozenRecord, Record
from .virtio import constants as vc

if TYPE_CHECKING:
    from ..config import BlockConfig, NetConfig, VsockConfig
    from ..machine import Machine
    from .virtio.device import VirtioDevice
    from .virtio.mmio import VirtioMmioTransport

log = structlog.get_logger()

#: How long a swap waits for a new vhost-user back-end to answer (client) or connect (server).
SWAP_CONNECT_TIMEOUT = 30.0
#: How long a swap waits for a fresh built-in back-end to listen (a Python start under load
#: in an emulated host took over 120 s).
SWAP_READY_TIMEOUT = 600.0
#: How long a swapped-in vhost-user back-end may take to answer a request: a fresh built-in
#: one answers its first only once it has dropped privileges and installed its seccomp filter
#: after listening, which took over 5 s (the boot-time default) in a loaded nested host.
SWAP_REQUEST_TIMEOUT = 60.0
#: How long closing the VM waits for a swap under way (its own waits are bounded).
SWAP_CLOSE_WAIT = SWAP_READY_TIMEOUT + 60.0


class DeviceManagerError(Exception):
    """A device could not be added (no slot or IRQ left, duplicate id, unknown back-end)."""


class DeviceNotFoundError(DeviceManagerError, KeyError):
    """No device has the id asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "device not found"


class MmioSlot(FrozenRecord):
    """One virtio-mmio window and its interrupt: ``index`` counts from 0 in slot order."""

    __slots__ = ("index", "base", "size", "irq")
    index: int
    base: int
    size: int
    irq: int

    def __init__(self, index: int, base: int, size: int, irq: int) -> None:
        self._init(index, base, size, irq)


class SlotAllocator:
    """Hands out virtio-mmio slots in order: page ``index`` of the window and pin ``index``
    of ``irqs``. Runs out when either the pins or the window do."""

    def __init__(self, first_base: int = layout.VIRTIO_MMIO_START,
                 slot_size: int = layout.VIRTIO_MMIO_SIZE,
                 window_end: int = layout.IOAPIC_ADDR,
                 irqs: range = range(layout.VIRTIO_IRQ_BASE, layout.VIRTIO_IRQ_MAX + 1)) -> None:
        self.first_base = first_base
        self.slot_size = slot_size
        self.irqs = irqs
        self.capacity = min(len(irqs), (window_end - first_base) // slot_size)
        self._next = 0

    def allocate(self, what: str) -> MmioSlot:
        index = self._next
        if index >= self.capacity:
            if index >= len(self.irqs):
                why = (f"all {len(self.irqs)} virtio IRQs ({self.irqs.start}-"
                       f"{self.irqs.stop - 1}) are taken")
            else:
                why = f"the virtio-mmio window holds only {self.capacity} devices"
            raise DeviceManagerError(
                f"{what}: no virtio-mmio slot left: {why}; remove a device from the config")
        self._next += 1
        return MmioSlot(index, self.first_base + index * self.slot_size, self.slot_size,
                        self.irqs[index])


class OwnedPart(Record):
    """Something a device owns (a back-end, a host network) with the stack that closes it."""

    __slots__ = ("obj", "stack")
    obj: Any
    stack: contextlib.ExitStack

    def __init__(self, obj: Any = None, stack: contextlib.ExitStack | None = None) -> None:
        self.obj = obj
        self.stack = contextlib.ExitStack() if stack is None else stack

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            self.obj = None


class MmioDevice(Record):
    """One virtio-mmio device in the registry. ``kind``: "net" or "vsock" (later "block")."""

    __slots__ = ("id", "kind", "slot", "device", "transport", "fast_read", "backend", "host",
                 "plumbing", "info", "cmdline_extra", "config")
    id: str
    kind: str
    slot: MmioSlot
    device: Any  # the VirtioDevice model
    transport: VirtioMmioTransport | None
    fast_read: Any  # its InterruptStatus FastRead (hits count for the metrics)
    backend: OwnedPart
    host: OwnedPart
    plumbing: OwnedPart
    info: dict[str, Any]  # kind-specific facts for the API
    cmdline_extra: list[str]
    config: Any  # the device's config entry (a NetConfig...), for a back-end swap

    def __init__(self, id: str, kind: str, slot: MmioSlot, device: Any,
                 transport: VirtioMmioTransport | None = None, fast_read: Any = None,
                 backend: OwnedPart | None = None, host: OwnedPart | None = None,
                 plumbing: OwnedPart | None = None, info: dict[str, Any] | None = None,
                 cmdline_extra: list[str] | None = None, config: Any = None) -> None:
        self.id = id
        self.kind = kind
        self.slot = slot
        self.device = device
        self.transport = transport
        self.fast_read = fast_read
        self.backend = OwnedPart() if backend is None else backend
        self.host = OwnedPart() if host is None else host
        self.plumbing = OwnedPart() if plumbing is None else plumbing
        self.info = {} if info is None else info
        self.cmdline_extra = [] if cmdline_extra is None else cmdline_extra
        self.config = config

    @property
    def mmio_base(self) -> int:
        return self.slot.base

    @property
    def mmio_size(self) -> int:
        return self.slot.size

    @property
    def irq(self) -> int:
        return self.slot.irq

    def driver_status(self) -> dict[str, Any]:
        """What the guest driver did: features acked, DRIVER_OK, NEEDS_RESET."""
        t = self.transport
        status = t.status if t is not None else 0
        return {
            "status": status,
            "features_acked": f"{t.acked_features:#x}" if t is not None else "0x0",
            "driver_ok": bool(status & vc.VIRTIO_CONFIG_S_DRIVER_OK),
            "needs_reset": bool(status & vc.VIRTIO_CONFIG_S_NEEDS_RESET),
            "failed": bool(status & vc.VIRTIO_CONFIG_S_FAILED),
        }

    def replace_backend(self, backend: Any, close: Callable[[], None] | None = None) -> OwnedPart:
        """Install a new back-end part and return the old one, unclosed (the caller moves
        the rings over, then closes it). The device model must be told separately."""
        old = self.backend
        self.backend = OwnedPart(backend)
        if close is not None:
            self.backend.stack.callback(close)
        return old

    def close(self) -> None:
        """Back-end, then host network, then plumbing; each step runs even if one fails."""
        for name, part in (("backend", self.backend), ("host", self.host),
                           ("plumbing", self.plumbing)):
            try:
                part.close()
            except Exception as e:  # keep undoing the rest
                log.warning("teardown_step_failed", device=self.id, step=name, error=str(e))


class DeviceManager:
    """The devices of one Machine: allocation, registry, command line. Owns every device."""

    def __init__(self, machine: Machine, allocator: SlotAllocator | None = None) -> None:
        self.machine = machine
        self.allocator = allocator or SlotAllocator()
        self._devices: dict[str, MmioDevice] = {}
        # One back-end swap at a time; close() waits for it, then refuses new ones.
        self._swap_lock = threading.Lock()
        self._closing = False

    # ---- registry ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[MmioDevice]:
        return iter(self.mmio_devices())

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, device_id: str) -> MmioDevice:
        try:
            return self._devices[device_id]
        except KeyError:
            known = ", ".join(self._devices) or "none"
            raise DeviceNotFoundError(
                f"no device with id {device_id!r} (devices: {known})") from None

    def mmio_devices(self) -> list[MmioDevice]:
        """Every virtio-mmio device in slot order (the order the guest enumerates them)."""
        return sorted(self._devices.values(), key=lambda d: d.slot.index)

    def devices_of_kind(self, kind: str) -> list[MmioDevice]:
        return [d for d in self.mmio_devices() if d.kind == kind]

    def cmdline_fragments(self, *, discovery: bool = True) -> list[str]:
        """``virtio_mmio.device=`` for each device, then the device's own extras. Without
        ``discovery`` only the extras: the guest finds the devices in the ACPI tables."""
        parts: list[str] = []
        for d in self.mmio_devices():
            if discovery:
                from .virtio.mmio import virtio_mmio_cmdline  # not for a VM without devices

                parts.append(virtio_mmio_cmdline(d.mmio_base, d.irq, d.mmio_size))
            parts.extend(d.cmdline_extra)
        return parts

    def cmdline(self) -> str:
        return " ".join(self.cmdline_fragments())

    # ---- adding devices ----------------------------------------------------------------------
    def reserve(self, device_id: str, kind: str, device: Any = None) -> MmioDevice:
        """Allocate a slot and register an (empty) device record under ``device_id``."""
        if device_id in self._devices:
            raise DeviceManagerError(f"device id {device_id!r} is used twice; give each device "
                                     "its own id")
        slot = self.allocator.allocate(f"{kind} device {device_id!r}")
        record = MmioDevice(device_id, kind, slot, device)
        self._devices[device_id] = record
        return record

    def attach_transport(self, record: MmioDevice, device: VirtioDevice) -> VirtioMmioTransport:
        """Wrap ``device`` in a virtio-mmio transport at the record's slot: KVM eventfd
        plumbing, the MMIO bus range, and InterruptStatus served by the vCPUs' C fast path."""
        from .virtio.constants import VIRTIO_MMIO_INTERRUPT_STATUS
        from .virtio.mmio import VirtioMmioTransport
        from .virtio.plumbing import InterruptEventfd, KvmEventfdPlumbing

        m = self.machine
        assert m.vm is not None and m.memory is not None
        slot = record.slot
        record.device = device
        plumbing = KvmEventfdPlumbing(m.vm, slot.base, slot.irq)
        record.plumbing.obj = plumbing
        record.plumbing.stack.callback(plumbing.close)
        transport = VirtioMmioTransport(
            device, irq=slot.irq, interrupt=InterruptEventfd(m.irq_eventfd(slot.irq)),
            eventfds=plumbing, mmio_base=slot.base, mem_regions=m.memory.regions)
        m.mmio_bus.insert(transport, slot.base, slot.size, f"virtio-{record.kind}:{record.id}")
        record.plumbing.stack.callback(self._remove_from_bus, slot.base)
        # Read on every interrupt: answered by the vCPU's C loop, not the Python bus.
        fast = m.add_fast_read(slot.base + VIRTIO_MMIO_INTERRUPT_STATUS)
        transport.serve_interrupt_status_from(fast.set)
        record.fast_read = fast
        record.transport = transport
        return transport

    def _remove_from_bus(self, base: int) -> None:
        remove = getattr(self.machine.mmio_bus, "remove", None)
        if remove is not None:
            remove(base)

    def add_net(self, index: int, net: NetConfig) -> MmioDevice:
        """A virtio-net device for ``net[index]`` of the config, with its back-end and host
        network; on failure everything made for it is undone."""
        from .virtio.net import VirtioNetDevice

        record = self.reserve(net.id, "net")
        try:
            self._net_backend(record, index, net)
            mac = bytes(int(part, 16) for part in net.mac.split(":"))
            from .virtio.net import PASSTHROUGH_FEATURES, SWAPPABLE_FEATURES

            mask = SWAPPABLE_FEATURES if getattr(net, "swappable", False) else PASSTHROUGH_FEATURES
            device = VirtioNetDevice(mac, net.mtu, record.backend.obj, features_mask=mask)
            record.config = net
            self.attach_transport(record, device)
            if net.ip is not None:
                from ..images.initramfs import encode_net

                record.cmdline_extra.append(encode_net(f"eth{index}", str(net.ip)))
        except BaseException:
            self._devices.pop(net.id, None)
            record.close()
            raise
        log.info("net_device_added", net=net.id, backend=net.backend, mac=net.mac,
                 mmio_base=hex(record.mmio_base), irq=record.irq)
        return record

    def _net_backend(self, record: MmioDevice, index: int, net: NetConfig) -> None:
        info = record.info
        info.update(backend=net.backend, tap=None, socket=None, netns=net.netns,
                    bridge=net.bridge, mac=net.mac)
        host_ip = str(net.host_ip) if net.host_ip is not None else None
        if net.backend == "vhost-net":
            from ..net.host import HostNetwork
            from ..vhost.kernel import VhostNetBackend

            hostnet = HostNetwork.create(net.tap, mtu=net.mtu, bridge=net.bridge, netns=net.netns,
                                         host_address=host_ip)
            record.host.obj = hostnet
            record.host.stack.callback(hostnet.close)
            info["tap"] = hostnet.tap.name
            backend = VhostNetBackend(hostnet.tap)
            record.backend.obj = backend
            record.backend.stack.callback(backend.close)
            backend.features()  # opens /dev/vhost-net now: a missing module is a build error
            return
        if net.backend in ("vhost-user", "builtin"):
            from ..vhost.user.frontend import VhostUserNetBackend

            # The back-end maps guest RAM through its fd: it must be memfd/hugetlbfs shared.
            assert self.machine.memory is not None
            assert all(r.fd >= 0 for r in self.machine.memory.regions)
            if net.backend == "vhost-user":
                assert net.socket is not None  # the config requires it
                socket_path, mode = str(net.socket), net.socket_mode
                backend = VhostUserNetBackend(socket_path, mode)
                record.backend.stack.callback(backend.close)
            else:
                # The VMM owns the TAP whatever the back-end; the child gets its fd.
                tap = self._host_tap(record, net)
                backend, socket_path = self._builtin_backend(record.backend.stack, tap)
            info["socket"] = socket_path
            record.backend.obj = backend
            return
        raise DeviceManagerError(f"net[{index}].backend = {net.backend!r} is not available in "
                                 "this build; use backend = \"vhost-net\"")

    def _host_tap(self, record: MmioDevice, net: NetConfig) -> Any:
        """The TAP of the device's host network, made now if it has none (a NIC that
        started on an external vhost-user back-end)."""
        from ..net.host import HostNetwork

        if record.host.obj is None:
            host_ip = str(net.host_ip) if net.host_ip is not None else None
            hostnet = HostNetwork.create(net.tap, mtu=net.mtu, bridge=net.bridge,
                                         netns=net.netns, host_address=host_ip)
            record.host.obj = hostnet
            record.host.stack.callback(hostnet.close)
            record.info["tap"] = hostnet.tap.name
        return record.host.obj.tap

    @staticmethod
    def _builtin_backend(stack: contextlib.ExitStack, tap: Any,
                         connect_timeout: float | None = None,
                         ready_timeout: float | None = None,
                         request_timeout: float | None = None) -> tuple[Any, str]:
        """pymvm's built-in back-end on ``tap`` (its fd inherited) and a front-end connected
        to it; both closed by ``stack`` (front-end first)."""
        from ..vhost.backends.process import READY_TIMEOUT, BuiltinNetBackendOnTap
        from ..vhost.user.frontend import DEFAULT_REQUEST_TIMEOUT, VhostUserNetBackend

        process = BuiltinNetBackendOnTap.start(tap.fd, tap.name,
                                               ready_timeout=ready_timeout or READY_TIMEOUT)
        stack.callback(process.close)
        # Its socket exists once bound; it listens only when it can answer (after its seccomp
        # filter), and refused connects are retried: the connect waits as long as its start.
        backend = VhostUserNetBackend(process.socket_path, "client",
                                      connect_timeout=max(connect_timeout or 0,
                                                          ready_timeout or READY_TIMEOUT),
                                      request_timeout=request_timeout or DEFAULT_REQUEST_TIMEOUT)
        stack.callback(backend.close)
        backend.process = process  # type: ignore[attr-defined]  # for the API and tests
        return backend, process.socket_path

    # ---- swapping a NIC's back-end -------------------------------------------------------------
    def swap_net_backend(self, device_id: str, backend: str, socket: str | None = None,
                         socket_mode: str = "client", *,
                         connect_timeout: float = SWAP_CONNECT_TIMEOUT) -> dict[str, Any]:
        """Move NIC ``device_id``'s data plane to a new back-end while the guest runs (issue 10):
        ``backend`` is "vhost-net", "builtin" (a fresh pymvm back-end process) or "vhost-user"
        (at ``socket``, dialled as ``socket_mode`` "client" or awaited as "server"). The TAP
        stays the VMM's; the rings move over at their positions (pymvm.devices.swap).

        Raises SwapRefused (nothing touched) or SwapFailed (the old back-end serves again)."""
        from .swap import SwapRefused

        with self._swap_lock:
            if self._closing:
                raise SwapRefused("the VM is stopping: its devices are being closed")
            return self._swap_net_backend(device_id, backend, socket, socket_mode,
                                          connect_timeout)

    def _swap_net_backend(self, device_id: str, backend: str, socket: str | None,
                          socket_mode: str, connect_timeout: float) -> dict[str, Any]:
        from .swap import SwapFailed, SwapRefused, hand_over

        record = self.get(device_id)
        if record.kind != "net" or record.transport is None:
            raise SwapRefused(f"device {device_id!r} is not a network device")
        net = record.config
        if backend in ("vhost-net", "builtin") and record.host.obj is None and net is None:
            raise SwapRefused(f"device {device_id!r} has no host network to put a {backend} "
                              "back-end on; use a vhost-user back-end")
        if backend not in ("vhost-net", "builtin", "vhost-user"):
            raise SwapRefused(f"back-end {backend!r} is unknown; use vhost-net, builtin or "
                              "vhost-user")
        if backend == "vhost-user" and not socket:
            raise SwapRefused("a vhost-user back-end needs \"socket\": the path of its socket")
        if socket_mode not in ("client", "server"):
            raise SwapRefused(f"socket_mode {socket_mode!r} is unknown; use client or server")
        from ..net.errors import NetError
        from ..vhost.errors import VhostError
        from ..vhost.user.errors import VhostUserError

        new_part = OwnedPart()
        try:
            try:
                if backend == "vhost-net":
                    from ..vhost.kernel import VhostNetBackend

                    tap = self._host_tap(record, net)
                    new = VhostNetBackend(tap)
                    new_part.stack.callback(new.close)
                    new.features()  # opens /dev/vhost-net: a missing module fails here
                    socket_path = None
                elif backend == "builtin":
                    tap = self._host_tap(record, net)
                    # While the VM runs (and moves packets) a Python start takes longer.
                    new, socket_path = self._builtin_backend(new_part.stack, tap, connect_timeout,
                                                             SWAP_READY_TIMEOUT,
                                                             SWAP_REQUEST_TIMEOUT)
                else:
                    from ..vhost.user.frontend import VhostUserNetBackend

                    assert socket is not None
                    if socket_mode == "client" and not os.path.exists(socket):
                        raise SwapFailed(f"no vhost-user back-end socket at {socket}; start the "
                                         "back-end first")
                    if socket_mode == "client" and not stat.S_ISSOCK(os.stat(socket).st_mode):
                        raise SwapFailed(f"{socket} is not a UNIX socket; give the vhost-user "
                                         "back-end's socket")
                    new = VhostUserNetBackend(socket, socket_mode,  # type: ignore[arg-type]
                                              connect_timeout=connect_timeout,
                                              request_timeout=SWAP_REQUEST_TIMEOUT)
                    new_part.stack.callback(new.close)
                    socket_path = socket
            except (VhostError, VhostUserError, NetError, OSError) as e:
                raise SwapFailed(f"the new {backend} back-end could not be set up: {e}; the old "
                                 "back-end keeps serving") from None
            new_part.obj = new
            transport = record.transport
            hand_over(record.device, new, acked=transport.acked_features, lock=transport.lock,
                      on_old_lost=transport.signal_needs_reset)
        except BaseException:
            new_part.close()
            raise
        old_part, record.backend = record.backend, new_part
        old_kind = record.info.get("backend")
        record.info.update(backend=backend, socket=socket_path)
        try:
            old_part.close()
        except Exception as e:  # the swap is done; a leftover is only logged
            log.warning("swap_old_backend_close_failed", device=device_id, error=str(e))
        announce = getattr(new, "announce", None)
        if announce is not None:  # a switch (a bridge, OVS, testpmd's peer) learns the port
            announce(record.device.mac)
        log.info("net_backend_swap_done", device=device_id, old=old_kind, new=backend,
                 socket=socket_path)
        return dict(record.info)

    def add_vsock(self, vsock: VsockConfig, device_id: str = "vsock0") -> MmioDevice:
        """A virtio-vsock device for guest CID ``vsock.cid``: rx/tx on /dev/vhost-vsock, the
        event queue in the device model. The CID is claimed now: a CID in use or a missing
        vhost_vsock module fails the build."""
        from ..vhost.kernel import VhostVsockBackend
        from .virtio.vsock import VirtioVsockDevice

        record = self.reserve(device_id, "vsock")
        try:
            backend = VhostVsockBackend(vsock.cid)
            record.backend.obj = backend
            record.backend.stack.callback(backend.close)
            device = VirtioVsockDevice(vsock.cid, backend)
            record.backend.stack.callback(device.close)  # its watcher stops before the fd closes
            record.info.update(cid=vsock.cid)
            self.attach_transport(record, device)
        except BaseException:
            self._devices.pop(device_id, None)
            record.close()
            raise
        log.info("vsock_device_added", cid=vsock.cid, mmio_base=hex(record.mmio_base),
                 irq=record.irq)
        return record

    def add_block(self, index: int, block: BlockConfig) -> MmioDevice:
        """A virtio-blk device for ``block[index]`` of the config: a vhost-user-blk front-end
        to pymvm's built-in back-end (started here, on the image it locks) or to the back-end
        at ``block.socket``. A root disk adds root=/dev/vdX to the command line."""
        from ..vhost.user.frontend import DEFAULT_CONNECT_TIMEOUT, VhostUserBlkBackend
        from .virtio.blk import VirtioBlkDevice

        letter = len(self.devices_of_kind("block"))  # vda, vdb... in slot (probe) order
        record = self.reserve(block.id, "block")
        try:
            assert self.machine.memory is not None
            assert all(r.fd >= 0 for r in self.machine.memory.regions)  # shared with the back-end
            info = record.info
            info.update(backend=block.backend, read_only=block.read_only, root=block.root,
                        path=str(block.path) if block.path else None, socket=None)
            timeout = DEFAULT_CONNECT_TIMEOUT
            if block.backend == "builtin":
                from ..vhost.backends.process import READY_TIMEOUT, BuiltinBlkBackendProcess

                assert block.path is not None
                process = BuiltinBlkBackendProcess.start(block.path, read_only=block.read_only,
                                                         serial=block.serial)
                record.host.obj = process
                record.host.stack.callback(process.close)
                socket_path, mode, timeout = process.socket_path, "client", READY_TIMEOUT
            else:
                assert block.socket is not None
                socket_path, mode = str(block.socket), block.socket_mode
            info["socket"] = socket_path
            backend = VhostUserBlkBackend(socket_path, mode, connect_timeout=timeout)
            record.backend.obj = backend
            record.backend.stack.callback(backend.close)
            device = VirtioBlkDevice(backend, read_only=block.read_only, name=f"block {block.id}")
            info["sectors"] = device.capacity
            self.attach_transport(record, device)
            if block.root:
                name = _disk_name(letter)
                record.cmdline_extra.append(f"root=/dev/{name} {'ro' if block.read_only else 'rw'}")
                info["guest_name"] = name
        except BaseException:
            self._devices.pop(block.id, None)
            record.close()
            raise
        log.info("block_device_added", block=block.id, backend=block.backend,
                 sectors=record.info["sectors"], mmio_base=hex(record.mmio_base), irq=record.irq)
        return record

    # ---- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every device, newest first; a back-end swap under way finishes first (its
        new back-end is then the device's and closes with it), later ones are refused."""
        self._closing = True
        locked = self._swap_lock.acquire(timeout=SWAP_CLOSE_WAIT)
        if not locked:
            log.warning("swap_still_running_at_close", waited_s=SWAP_CLOSE_WAIT)
        try:
            for record in reversed(self.mmio_devices()):
                record.close()
            self._devices.clear()
        finally:
            if locked:
                self._swap_lock.release()


def _disk_name(index: int) -> str:
    """Linux's virtio-blk names: vda..vdz, vdaa... (drivers/block/virtio_blk.c)."""
    suffix = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        suffix = chr(ord("a") + rest) + suffix
    return "vd" + suffix
