"""The virtio-mmio transport, version 2 register layout (virtio 1.2 spec 4.2).

One transport wraps one VirtioDevice and sits on the MMIO bus as a BusDevice. It owns the
driver-visible state: device status, feature negotiation and queue registers. At DRIVER_OK it
asks its EventfdPlumbing (KVM ioeventfd on QueueNotify, irqfd on the device's GSI) for one
kick and one call eventfd per ready queue and hands them, with the rings, to the device.

Guest mistakes are logged and ignored, never raised: read() and write() run on vCPU threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import (
    ActivationContext,
    QueueConfig,
    VirtioDevice,
    VirtioError,
)
from pymvm.record import Record

log = structlog.get_logger()

_ACK = c.VIRTIO_CONFIG_S_ACKNOWLEDGE
_DRIVER = c.VIRTIO_CONFIG_S_DRIVER
_FEATURES_OK = c.VIRTIO_CONFIG_S_FEATURES_OK
_DRIVER_OK = c.VIRTIO_CONFIG_S_DRIVER_OK
_FAILED = c.VIRTIO_CONFIG_S_FAILED
_NEEDS_RESET = c.VIRTIO_CONFIG_S_NEEDS_RESET
_PROGRESS_BITS = _ACK | _DRIVER | _FEATURES_OK | _DRIVER_OK
_VERSION_1 = 1 << c.VIRTIO_F_VERSION_1
_U32 = 0xFFFF_FFFF


class InterruptLine(Protocol):
    """The device's interrupt, raised by the VMM itself (config changes), edge style."""

    def trigger(self) -> None: ...


class EventfdPlumbing(Protocol):
    """Wires a transport's queues to KVM: ioeventfd for kicks, irqfd for calls."""

    def activate(
        self, transport: VirtioMmioTransport, queues: Sequence[QueueConfig]
    ) -> tuple[list[int], list[int]]:
        """Return (kick_fds, call_fds), one of each per entry of ``queues``, in order."""

    def deactivate(self, transport: VirtioMmioTransport) -> None:
        """Undo activate(): unregister and close what it made."""


def virtio_mmio_cmdline(base: int, irq: int, size: int = c.VIRTIO_MMIO_PAGE_SIZE) -> str:
    """Linux's ``virtio_mmio.device=<size>@<baseaddr>:<irq>`` (size in memparse syntax)."""
    if size % (1 << 20) == 0:
        size_text = f"{size >> 20}M"
    elif size % (1 << 10) == 0:
        size_text = f"{size >> 10}K"
    else:
        size_text = str(size)
    return f"virtio_mmio.device={size_text}@{base:#x}:{irq}"


class _Queue(Record):
    __slots__ = ("max_size", "size", "ready", "desc_addr", "driver_addr", "device_addr")
    max_size: int
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int
    device_addr: int

    def __init__(self, max_size: int, size: int, ready: bool = False, desc_addr: int = 0,
                 driver_addr: int = 0, device_addr: int = 0) -> None:
        self.max_size = max_size
        self.size = size
        self.ready = ready
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr

    @classmethod
    def fresh(cls, max_size: int) -> _Queue:
        return cls(max_size=max_size, size=max_size)

    def snapshot(self, index: int) -> QueueConfig:
        return QueueConfig(
            index=index,
            size=self.size,
            ready=self.ready,
            desc_addr=self.desc_addr,
            driver_addr=self.driver_addr,
            device_addr=self.device_addr,
        )


def _set_low(value: int, word: int) -> int:
    return (value & ~_U32) | word


def _set_high(value: int, word: int) -> int:
    return (value & _U32) | (word << 32)


def _progress(status: int) -> int | None:
    """How many driver-progress steps ``status`` has taken, or None if not a valid prefix."""
    steps = 0
    for bit in c.STATUS_PROGRESS_ORDER:
        if not status & bit:
            break
        steps += 1
    rest = status & _PROGRESS_BITS & ~sum(c.STATUS_PROGRESS_ORDER[:steps])
    return None if rest else steps


class VirtioMmioTransport:
    """A BusDevice presenting ``device`` as a virtio-mmio (version 2) device."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        irq: int,
        interrupt: InterruptLine,
        eventfds: EventfdPlumbing | None,
        mmio_base: int | None = None,
        mem_regions: Sequence[Any] = (),
    ) -> None:
        if not device.queue_max_sizes:
            raise VirtioError(f"virtio device type {device.device_type} declares no queues")
        for size in device.queue_max_sizes:
            if not 0 < size <= 0x8000 or size & (size - 1):
                raise VirtioError(
                    f"virtio device type {device.device_type}: queue max size {size} is not a "
                    "power of 2 in 1..32768 (spec 2.7)"
                )
        self.device = device
        self.irq = irq
        self.mmio_base = mmio_base
        self._interrupt = interrupt
        self._eventfds = eventfds
        self._mem_regions = mem_regions
        self._lock = threading.RLock()
        self._log = log.bind(device=f"virtio-mmio:{device.device_type}", irq=irq)
        self._config_generation = 0
        self._publish_status: Callable[[int], None] | None = None
        self._reset_state()
        device.bind_transport(self)

    # --- state -----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._driver_features_extra = False
        self._acked_features = 0
        self._queue_sel = 0
        self._shm_sel = 0
        self._interrupt_status = 0
        self._queues = [_Queue.fresh(size) for size in self.device.queue_max_sizes]
        self._activated = False
        self._eventfds_active = False
        self._kick_by_queue: dict[int, int] = {}
        self._publish_interrupt_status()

    @property
    def status(self) -> int:
        return self._status

    @property
    def lock(self) -> threading.RLock:
        """Held while the transport's state changes (vCPU accesses, signals): take it to
        change device state the guest reads, such as the config space, from another thread."""
        return self._lock

    @property
    def activated(self) -> bool:
        return self._activated

    @property
    def acked_features(self) -> int:
        return self._acked_features

    @property
    def config_generation(self) -> int:
        return self._config_generation

    def offered_features(self) -> int:
        # A version-2 device must offer VERSION_1 (Linux's vm_finalize_features insists on it).
        return (self.device.avail_features() | _VERSION_1) & ((1 << 64) - 1)

    def queue_configs(self) -> list[QueueConfig]:
        with self._lock:
            return [q.snapshot(i) for i, q in enumerate(self._queues)]

    def cmdline_fragment(self, base: int | None = None, size: int = c.VIRTIO_MMIO_PAGE_SIZE) -> str:
        base = self.mmio_base if base is None else base
        if base is None:
            raise VirtioError(
                "virtio-mmio transport has no MMIO base; pass base= or build it with mmio_base="
            )
        return virtio_mmio_cmdline(base, self.irq, size)

    # --- signals from the device or the VMM ------------------------------------------------

    def signal_needs_reset(self) -> None:
        with self._lock:
            self._status |= _NEEDS_RESET
            self._log.warning("virtio device needs reset", status=self._status)
            if self._status & _DRIVER_OK:
                self._raise_config_interrupt()

    def signal_config_change(self) -> None:
        with self._lock:
            self._config_generation = (self._config_generation + 1) & _U32
            if self._status & _DRIVER_OK:
                self._raise_config_interrupt()

    def _raise_config_interrupt(self) -> None:
        self._interrupt_status |= c.VIRTIO_MMIO_INT_CONFIG
        self._publish_interrupt_status()  # before the interrupt: the guest reads it next
        try:
            self._interrupt.trigger()
        except Exception:
            self._log.exception("virtio config interrupt could not be raised")

    def _interrupt_status_value(self) -> int:
        # With vhost the used-buffer interrupts arrive through irqfd, straight from the
        # back-end into KVM: this transport never sees them. Linux's vm_interrupt only walks
        # the vrings when bit 0 is set, so report it whenever the device is live (a spurious
        # walk is harmless). Firecracker does the same for vhost-user devices, except that it
        # drops bit 0 while a config change is pending; ORing keeps a coincident queue
        # interrupt from being lost.
        status = self._interrupt_status
        if self._activated:
            status |= c.VIRTIO_MMIO_INT_VRING
        return status

    def serve_interrupt_status_from(self, publish: Callable[[int], None]) -> None:
        """Hand InterruptStatus reads to a faster path (the vCPU loop's C fast reads):
        ``publish(value)`` is called with the register's value now and on every change,
        before any interrupt that follows the change. The guest reads it on every
        interrupt, so this saves a trip through Python per interrupt."""
        with self._lock:
            self._publish_status = publish
            self._publish_interrupt_status()

    def _publish_interrupt_status(self) -> None:
        if self._publish_status is not None:
            self._publish_status(self._interrupt_status_value())

    # --- BusDevice ---------------------------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        if offset >= c.VIRTIO_MMIO_CONFIG:
            with self._lock:
                self.device.read_config(offset - c.VIRTIO_MMIO_CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            self._log.warning("virtio-mmio register read ignored: not an aligned 32-bit access",
                              offset=offset, length=len(data))
            data[:] = bytes(len(data))
            return
        with self._lock:
            value = self._read_register(offset)
        data[:] = value.to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset >= c.VIRTIO_MMIO_CONFIG:
            with self._lock:
                if not self._status & _DRIVER or self._status & (_FAILED | _NEEDS_RESET):
                    self._log.warning("virtio config write ignored: driver not ready",
                                      offset=offset, status=self._status)
                    return
                self.device.write_config(offset - c.VIRTIO_MMIO_CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            self._log.warning("virtio-mmio register write ignored: not an aligned 32-bit access",
                              offset=offset, length=len(data))
            return
        with self._lock:
            self._write_register(offset, int.from_bytes(data, "little"))
            self._publish_interrupt_status()  # an ack, an activation or a reset changes it

    # --- registers ---------------------------------------------------------------------------

    def _selected_queue(self) -> _Queue | None:
        if self._queue_sel < len(self._queues):
            return self._queues[self._queue_sel]
        return None

    def _read_register(self, offset: int) -> int:
        match offset:
            case c.VIRTIO_MMIO_MAGIC_VALUE:
                return c.VIRTIO_MMIO_MAGIC
            case c.VIRTIO_MMIO_VERSION:
                return c.VIRTIO_MMIO_VERSION_MODERN
            case c.VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_type
            case c.VIRTIO_MMIO_VENDOR_ID:
                return c.PYMVM_VIRTIO_VENDOR_ID
            case c.VIRTIO_MMIO_DEVICE_FEATURES:
                if self._device_features_sel > 1:
                    return 0
                return (self.offered_features() >> (32 * self._device_features_sel)) & _U32
            case c.VIRTIO_MMIO_QUEUE_NUM_MAX:
                queue = self._selected_queue()
                return queue.max_size if queue else 0
            case c.VIRTIO_MMIO_QUEUE_READY:
                queue = self._selected_queue()
                return int(queue.ready) if queue else 0
            case c.VIRTIO_MMIO_INTERRUPT_STATUS:
                return self._interrupt_status_value()
            case c.VIRTIO_MMIO_STATUS:
                return self._status
            case c.VIRTIO_MMIO_SHM_LEN_LOW | c.VIRTIO_MMIO_SHM_LEN_HIGH:
                return _U32  # no shared memory regions: length -1 (spec 4.2.2)
            case c.VIRTIO_MMIO_SHM_BASE_LOW | c.VIRTIO_MMIO_SHM_BASE_HIGH:
                return _U32
            case c.VIRTIO_MMIO_CONFIG_GENERATION:
                return self._config_generation
            case _:
                self._log.warning("virtio-mmio read of an unknown or write-only register",
                                  offset=offset)
                return 0

    def _write_register(self, offset: int, value: int) -> None:
        match offset:
            case c.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                self._device_features_sel = value
            case c.VIRTIO_MMIO_DRIVER_FEATURES:
                self._write_driver_features(value)
            case c.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                self._driver_features_sel = value
            case c.VIRTIO_MMIO_QUEUE_SEL:
                self._queue_sel = value
            case c.VIRTIO_MMIO_QUEUE_NUM:
                self._write_queue_num(value)
            case c.VIRTIO_MMIO_QUEUE_READY:
                self._write_queue_ready(value)
            case c.VIRTIO_MMIO_QUEUE_NOTIFY:
                self._queue_notify(value)
            case c.VIRTIO_MMIO_INTERRUPT_ACK:
                self._interrupt_status &= ~value
            case c.VIRTIO_MMIO_STATUS:
                self._write_status(value)
            case c.VIRTIO_MMIO_QUEUE_DESC_LOW:
                self._write_queue_addr("desc_addr", _set_low, value)
            case c.VIRTIO_MMIO_QUEUE_DESC_HIGH:
                self._write_queue_addr("desc_addr", _set_high, value)
            case c.VIRTIO_MMIO_QUEUE_AVAIL_LOW:
                self._write_queue_addr("driver_addr", _set_low, value)
            case c.VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
                self._write_queue_addr("driver_addr", _set_high, value)
            case c.VIRTIO_MMIO_QUEUE_USED_LOW:
                self._write_queue_addr("device_addr", _set_low, value)
            case c.VIRTIO_MMIO_QUEUE_USED_HIGH:
                self._write_queue_addr("device_addr", _set_high, value)
            case c.VIRTIO_MMIO_SHM_SEL:
                self._shm_sel = value
            case _:
                self._log.warning("virtio-mmio write to an unknown or read-only register",
                                  offset=offset, value=value)

    def _write_driver_features(self, value: int) -> None:
        # Features may only change between DRIVER and FEATURES_OK (spec 3.1.1 steps 4-5).
        if (self._status & (_DRIVER | _FEATURES_OK | _FAILED)) != _DRIVER:
            self._log.warning("virtio driver features write ignored in this state",
                              status=self._status, page=self._driver_features_sel, value=value)
            return
        page = self._driver_features_sel
        if page > 1:
            # Only 64 feature bits exist; a nonzero ack above them can never be accepted.
            self._driver_features_extra |= value != 0
            return
        shift = 32 * page
        self._driver_features = (self._driver_features & ~(_U32 << shift)) | (value << shift)

    def _queue_for_setup(self, register: str) -> _Queue | None:
        """The selected queue if queue registers may be written now (FEATURES_OK..DRIVER_OK)."""
        allowed = (self._status & (_FEATURES_OK | _DRIVER_OK | _FAILED)) == _FEATURES_OK
        if not allowed:
            self._log.warning("virtio queue register write ignored in this state",
                              register=register, status=self._status, queue=self._queue_sel)
            return None
        queue = self._selected_queue()
        if queue is None:
            self._log.warning("virtio queue register write ignored: no such queue",
                              register=register, queue=self._queue_sel,
                              queues=len(self._queues))
        return queue

    def _write_queue_num(self, value: int) -> None:
        queue = self._queue_for_setup("QueueNum")
        if queue is None:
            return
        # Split rings only (RING_PACKED is never offered): a power of 2 up to the maximum.
        if not 0 < value <= queue.max_size or value & (value - 1):
            self._log.warning("virtio QueueNum ignored: not a power of 2 within QueueNumMax",
                              queue=self._queue_sel, value=value, max_size=queue.max_size)
            return
        queue.size = value

    def _write_queue_ready(self, value: int) -> None:
        if value == 0 and not self._status:
            return  # Linux clears QueueReady after resetting, while tearing down: nothing to do
        queue = self._queue_for_setup("QueueReady")
        if queue is None:
            return
        if value not in (0, 1):
            self._log.warning("virtio QueueReady ignored: not 0 or 1", queue=self._queue_sel,
                              value=value)
            return
        queue.ready = bool(value)

    def _write_queue_addr(self, attr: str, merge: Any, value: int) -> None:
        queue = self._queue_for_setup(attr)
        if queue is not None:
            setattr(queue, attr, merge(getattr(queue, attr), value))

    def _queue_notify(self, index: int) -> None:
        # With ioeventfd registered, KVM swallows these writes; one reaching us means the kick
        # bypassed it, so forward it to the back-end by hand rather than lose it.
        fd = self._kick_by_queue.get(index)
        if fd is None:
            self._log.debug("virtio QueueNotify with no active queue", queue=index,
                            status=self._status)
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as err:
            self._log.warning("virtio QueueNotify could not be forwarded", queue=index,
                              error=str(err))

    # --- status state machine (spec 2.1, 3.1.1) ---------------------------------------------

    def _write_status(self, value: int) -> None:
        # DEVICE_NEEDS_RESET is the device's bit; drivers write back what they read (add_status).
        value &= ~_NEEDS_RESET
        if value == 0:
            self._reset()
            return
        current = self._status
        if current & _FAILED:
            self._log.warning("virtio status write ignored: FAILED is set, reset first",
                              status=current, value=value)
            return
        if value & ~(_PROGRESS_BITS | _FAILED):
            self._log.warning("virtio status write ignored: unknown bits", status=current,
                              value=value)
            return
        if value & _FAILED:
            self._log.warning("virtio driver set FAILED", status=current)
            self._status |= _FAILED
            return
        old_steps = _progress(current)
        new_steps = _progress(value)
        if new_steps is None or old_steps is None or new_steps < old_steps or (
            new_steps > old_steps + 1
        ):
            self._log.warning("virtio status write ignored: bits out of order or cleared",
                              status=current, value=value)
            return
        if new_steps == old_steps:
            return
        added = value & ~current
        if added == _FEATURES_OK and not self._accept_features():
            return  # FEATURES_OK stays clear: the driver sees the refusal on its re-read
        if added == _DRIVER_OK and self._status & _NEEDS_RESET:
            self._log.warning("virtio DRIVER_OK ignored: device needs reset", status=current)
            return
        self._status |= added
        if added == _DRIVER_OK:
            self._activate()

    def _accept_features(self) -> bool:
        offered = self.offered_features()
        acked = self._driver_features
        if not acked & _VERSION_1:
            self._log.warning("virtio FEATURES_OK refused: driver did not accept VERSION_1",
                              acked=hex(acked))
            return False
        if acked & ~offered or self._driver_features_extra:
            self._log.warning("virtio FEATURES_OK refused: driver acked features not offered",
                              acked=hex(acked), offered=hex(offered),
                              extra=hex(acked & ~offered))
            return False
        self._acked_features = acked
        return True

    def _check_ring_alignment(self, queues: list[QueueConfig]) -> None:
        for q in queues:
            if (q.desc_addr % c.VRING_DESC_ALIGN_SIZE or q.driver_addr % c.VRING_AVAIL_ALIGN_SIZE
                    or q.device_addr % c.VRING_USED_ALIGN_SIZE):
                raise VirtioError(
                    f"virtqueue {q.index} rings are misaligned (desc {q.desc_addr:#x}, "
                    f"avail {q.driver_addr:#x}, used {q.device_addr:#x}); see spec 2.7"
                )

    def _activate(self) -> None:
        queues = [q.snapshot(i) for i, q in enumerate(self._queues) if q.ready]
        try:
            self._check_ring_alignment(queues)
            kick_fds: list[int] = []
            call_fds: list[int] = []
            if self._eventfds is not None:
                kick_fds, call_fds = self._eventfds.activate(self, queues)
                self._eventfds_active = True
                if len(kick_fds) != len(queues) or len(call_fds) != len(queues):
                    raise VirtioError(
                        f"eventfd plumbing returned {len(kick_fds)} kick and {len(call_fds)} "
                        f"call fds for {len(queues)} queues; it must return one of each per queue"
                    )
            ctx = ActivationContext(
                acked_features=self._acked_features,
                queues=queues,
                kick_fds=list(kick_fds),
                call_fds=list(call_fds),
                mem_regions=self._mem_regions,
            )
            if self._publish_status is not None:
                # The back-end may interrupt as soon as it starts, and a fast-path read does
                # not wait for this lock: report used buffers already (spurious is harmless).
                self._publish_status(self._interrupt_status | c.VIRTIO_MMIO_INT_VRING)
            self.device.activate(ctx)
        except Exception:
            self._log.exception("virtio device activation failed; setting DEVICE_NEEDS_RESET")
            self._deactivate_eventfds()
            self.signal_needs_reset()
            return
        self._activated = True
        self._kick_by_queue = {q.index: fd for q, fd in zip(queues, kick_fds)}
        self._log.info("virtio device activated", features=hex(self._acked_features),
                       queues=[q.index for q in queues])

    def _deactivate_eventfds(self) -> None:
        if not self._eventfds_active or self._eventfds is None:
            return
        self._eventfds_active = False
        try:
            self._eventfds.deactivate(self)
        except Exception:
            self._log.exception("virtio eventfd teardown failed")

    def _reset(self) -> None:
        if self._activated:
            try:
                self.device.reset()
            except Exception:
                # The back-end may still own the rings: keep the driver out (FAILED) until a
                # later reset succeeds rather than let it reuse that memory.
                self._log.exception("virtio device reset failed; status set to FAILED")
                self._status = _FAILED
                return
        self._deactivate_eventfds()
        was_live = bool(self._status)
        self._reset_state()
        if was_live:
            self._log.info("virtio device reset")
