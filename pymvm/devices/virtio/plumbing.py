"""KVM side of a virtio-mmio device's data plane: ioeventfd kicks and irqfd calls.

At DRIVER_OK each ready queue gets a kick eventfd, bound by KVM_IOEVENTFD to the device's
QueueNotify register with the queue index as datamatch (a guest notify then signals the
back-end inside the kernel, with no exit to the VMM), and a call eventfd, bound by
KVM_IRQFD to the device's interrupt line (the back-end raises the guest interrupt itself).
Reset undoes both; the next DRIVER_OK builds them again.

The guest acknowledges every interrupt by writing 1 (VIRTIO_MMIO_INT_VRING) to
InterruptACK. With vhost the used-buffer bit is synthetic (the transport reports it
whenever the device is live), so that write changes nothing: an ioeventfd with datamatch 1
absorbs it in the kernel and saves the VMM one exit per interrupt. Acks of other values
(config changes) still reach the transport.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

import structlog

from . import constants as c
from .device import QueueConfig

if TYPE_CHECKING:
    from ...kvm import Vm
    from .mmio import VirtioMmioTransport

log = structlog.get_logger()


class InterruptEventfd:
    """The transport's own interrupt line (config changes): an irqfd-bound eventfd."""

    def __init__(self, trigger: Callable[[], None]) -> None:
        self._trigger = trigger

    def trigger(self) -> None:
        self._trigger()


class KvmEventfdPlumbing:
    """Owns the kick/call eventfds of one virtio-mmio device while it is activated."""

    def __init__(self, vm: "Vm", mmio_base: int, irq: int) -> None:
        self._vm = vm
        self._notify_addr = mmio_base + c.VIRTIO_MMIO_QUEUE_NOTIFY
        self._ack_addr = mmio_base + c.VIRTIO_MMIO_INTERRUPT_ACK
        self._ack_fd: int | None = None
        self._irq = irq
        self._lock = threading.Lock()
        self._kicks: list[tuple[int, int]] = []  # (queue index, fd)
        self._calls: list[int] = []

    def activate(self, transport: "VirtioMmioTransport",
                 queues: Sequence[QueueConfig]) -> tuple[list[int], list[int]]:
        with self._lock:
            self._teardown()
            try:
                kicks, calls = [], []
                for q in queues:
                    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    self._kicks.append((q.index, kick))
                    self._vm.register_ioeventfd(kick, self._notify_addr, 4, datamatch=q.index)
                    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    self._calls.append(call)
                    self._vm.register_irqfd(call, self._irq)
                    kicks.append(kick)
                    calls.append(call)
                self._ack_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._vm.register_ioeventfd(self._ack_fd, self._ack_addr, 4,
                                            datamatch=c.VIRTIO_MMIO_INT_VRING)
            except BaseException:
                self._teardown()
                raise
            log.debug("eventfds_activated", irq=self._irq, queues=[q.index for q in queues])
            return kicks, calls

    def deactivate(self, transport: "VirtioMmioTransport") -> None:
        with self._lock:
            self._teardown()

    def close(self) -> None:
        self.deactivate(None)  # type: ignore[arg-type]

    def _teardown(self) -> None:
        # Unregister before closing: KVM keeps its own reference until told to let go.
        for index, fd in self._kicks:
            try:
                self._vm.unregister_ioeventfd(fd, self._notify_addr, 4, datamatch=index)
            except Exception as e:  # the VM may already be gone at shutdown
                log.debug("ioeventfd_unregister_failed", error=str(e))
            os.close(fd)
        for fd in self._calls:
            try:
                self._vm.unregister_irqfd(fd, self._irq)
            except Exception as e:
                log.debug("irqfd_unregister_failed", error=str(e))
            os.close(fd)
        if self._ack_fd is not None:
            try:
                self._vm.unregister_ioeventfd(self._ack_fd, self._ack_addr, 4,
                                              datamatch=c.VIRTIO_MMIO_INT_VRING)
            except Exception as e:
                log.debug("ioeventfd_unregister_failed", error=str(e))
            os.close(self._ack_fd)
            self._ack_fd = None
        self._kicks.clear()
        self._calls.clear()
