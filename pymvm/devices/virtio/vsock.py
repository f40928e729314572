"""The virtio-vsock device model (virtio 1.2 section 5.10): control plane and event queue.

The rx (0) and tx (1) queues carry the sockets' packets and are handed to the in-kernel
vhost-vsock at DRIVER_OK. The event queue (2) stays with the VMM: it is where the device
tells the driver VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.6), after which the driver
drops its connections and re-reads the guest CID. pymvm sends it when the driver comes back
after a reset (a rebind): the vhost worker was stopped in between, so no connection the
driver may still believe in survived.

The driver fills the event queue only after DRIVER_OK (Linux's virtio_vsock_vqs_start), so
a pending event waits for the queue's kick on a small watcher thread.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import (
    ActivationContext,
    QueueConfig,
    VirtioActivationError,
    VirtioConfigError,
    VirtioDevice,
)
from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue, VirtQueueError

log = structlog.get_logger()

RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2
QUEUE_MAX_SIZE = 256
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0  # enum virtio_vsock_event_id (checked in the tests)
CID_MIN = 3  # 0, 1 and 2 are the hypervisor, loopback and host (5.10.4)
CID_MAX = 0xFFFF_FFFE
EVENT_WAIT_S = 10.0  # how long a pending event waits for the driver's buffers


class VsockBackend(Protocol):
    """The data plane of a virtio-vsock device (in-kernel vhost-vsock)."""

    cid: int

    def features(self) -> int: ...

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None: ...

    def reset(self) -> None: ...


class _EventQueue:
    """The device side of the event queue: one VirtQueue and the call eventfd."""

    def __init__(self, queue: QueueConfig, mem_regions: Sequence[Any], call_fd: int | None,
                 event_idx: bool) -> None:
        regions = [(r.gpa, r.view) for r in mem_regions]
        self.memory = GuestMemoryMap(regions)
        self.queue = VirtQueue(self.memory, queue.size, queue.desc_addr, queue.driver_addr,
                               queue.device_addr, event_idx=event_idx, name="vsock-event")
        self.call_fd = call_fd

    def push(self, event_id: int) -> bool:
        """Write one event into the driver's next buffer; False if it has none posted."""
        chain = self.queue.pop_avail()
        if chain is None:
            return False
        payload = struct.pack("<I", event_id)
        if chain.writable_len < len(payload):
            self.queue.drop_chain(chain, "event buffer smaller than struct virtio_vsock_event")
            return False
        chain.writable[0][: len(payload)] = payload[: chain.writable[0].nbytes]
        if chain.writable[0].nbytes < len(payload):  # split over two descriptors
            rest = payload[chain.writable[0].nbytes:]
            chain.writable[1][: len(rest)] = rest
        self.queue.add_used(chain.head, len(payload))
        if self.call_fd is not None and self.queue.needs_notification():
            os.eventfd_write(self.call_fd, 1)
        return True

    def release(self) -> None:
        self.queue.release()
        self.memory.release()


class VirtioVsockDevice(VirtioDevice):
    """A virtio-vsock device for guest CID ``cid``; rx/tx served by ``backend``."""

    device_type = c.VIRTIO_ID_VSOCK
    queue_max_sizes = (QUEUE_MAX_SIZE,) * 3

    def __init__(self, cid: int, backend: VsockBackend) -> None:
        if not CID_MIN <= cid <= CID_MAX:
            raise VirtioConfigError(f"virtio-vsock guest CID {cid} is outside {CID_MIN}..{CID_MAX}")
        self.cid = cid
        self.backend = backend
        self.active = False
        self.activations = 0
        self.events_sent = 0
        self._pending_reset = False
        self._lock = threading.Lock()
        self._event: _EventQueue | None = None
        #: The thread waiting for the event queue's kick, and the pipe that stops it.
        self._watcher: tuple[threading.Thread, int, int] | None = None
        self._log = log.bind(device="virtio-vsock", cid=cid)

    def avail_features(self) -> int:
        return c.feature_mask(c.VIRTIO_F_VERSION_1) | self.backend.features()

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)  # struct virtio_vsock_config

    def activate(self, ctx: ActivationContext) -> None:
        missing = [q for q in (RX_QUEUE, TX_QUEUE, EVENT_QUEUE) if ctx.queue(q) is None]
        if missing:
            raise VirtioActivationError(
                f"virtio-vsock: the driver did not make queues {missing} ready; the guest "
                "driver must set up rx, tx and event"
            )
        self.backend.activate(ctx, ctx.mem_regions)
        position = [q.index for q in ctx.queues].index(EVENT_QUEUE)
        event_q = ctx.queues[position]
        call = ctx.call_fds[position] if ctx.call_fds else None
        kick = ctx.kick_fds[position] if ctx.kick_fds else None
        try:
            event = _EventQueue(event_q, ctx.mem_regions, call,
                                ctx.has_feature(c.VIRTIO_RING_F_EVENT_IDX))
        except VirtQueueError as e:
            self.backend.reset()
            raise VirtioActivationError(f"virtio-vsock event queue: {e}") from None
        with self._lock:
            self._event = event
            # A driver that comes back after a reset gets TRANSPORT_RESET (see the module doc).
            if self.activations:
                self._pending_reset = True
            self.activations += 1
            self.active = True
            delivered = self._deliver_pending_locked()
        if not delivered and kick is not None and kick >= 0:
            self._start_watcher(kick)
        self._log.info("virtio-vsock activated", features=hex(ctx.acked_features),
                       activations=self.activations)

    def send_transport_reset(self) -> bool:
        """Queue VIRTIO_VSOCK_EVENT_TRANSPORT_RESET; True if it reached the driver now."""
        with self._lock:
            self._pending_reset = True
            return self._deliver_pending_locked()

    def _deliver_pending_locked(self) -> bool:
        if not self._pending_reset:
            return True
        if self._event is None or not self._event.push(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET):
            return False
        self._pending_reset = False
        self.events_sent += 1
        self._log.info("vsock_transport_reset_sent")
        return True

    def _start_watcher(self, kick_fd: int) -> None:
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        thread = threading.Thread(target=self._watch, args=(kick_fd, stop_r),
                                  name="vsock-event", daemon=True)
        self._watcher = (thread, stop_r, stop_w)
        thread.start()

    def _watch(self, kick_fd: int, stop_fd: int) -> None:
        """Wait for the driver's event-queue kick, then deliver what is pending."""
        poller = select.poll()
        poller.register(kick_fd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        deadline = EVENT_WAIT_S
        while deadline > 0:
            try:  # poll(2): in the VMM's seccomp allowlist (docs/seccomp.md)
                ready = [fd for fd, _ in poller.poll(500)]
            except (OSError, ValueError):
                return
            if stop_fd in ready:
                return
            deadline -= 0.5
            if kick_fd in ready:
                try:
                    os.eventfd_read(kick_fd)
                except OSError:
                    pass
            with self._lock:
                if self._deliver_pending_locked():
                    return
        self._log.warning("vsock event not delivered: the driver posted no event buffer")

    def _stop_watcher(self) -> None:
        if self._watcher is None:
            return
        thread, stop_r, stop_w = self._watcher
        self._watcher = None
        os.close(stop_w)  # the watcher's poll sees the pipe hang up
        thread.join(timeout=2)
        os.close(stop_r)

    def reset(self) -> None:
        self._stop_watcher()  # before the transport closes the kick fd it watches
        with self._lock:
            self.active = False
            if self._event is not None:
                self._event.release()
                self._event = None
        self.backend.reset()

    def close(self) -> None:
        self._stop_watcher()
