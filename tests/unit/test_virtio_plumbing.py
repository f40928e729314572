"""The virtio-mmio eventfd plumbing (pymvm/devices/virtio/plumbing.py) against a VM that
records what KVM is asked to do: every eventfd it binds, and each one given back at reset.
tests/kvm/test_virtio_plumbing.py checks the same plumbing against real KVM."""

from __future__ import annotations

import fcntl
import os

import pytest

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import QueueConfig
from pymvm.devices.virtio.plumbing import InterruptEventfd, KvmEventfdPlumbing
from tests.fds import is_open

BASE, IRQ = 0xD000_0000, 5
NOTIFY, ACK = BASE + c.VIRTIO_MMIO_QUEUE_NOTIFY, BASE + c.VIRTIO_MMIO_INTERRUPT_ACK


class RecordingVm:
    """The Vm methods the plumbing uses; each call recorded as (what, fd, where, datamatch)."""

    def __init__(self) -> None:
        self.registered: list[tuple] = []
        self.unregistered: list[tuple] = []

    def register_ioeventfd(self, fd: int, addr: int, length: int = 4, *, datamatch=None) -> None:
        self.registered.append(("ioeventfd", fd, addr, length, datamatch))

    def unregister_ioeventfd(self, fd: int, addr: int, length: int = 4, *, datamatch=None) -> None:
        self.unregistered.append(("ioeventfd", fd, addr, length, datamatch))

    def register_irqfd(self, fd: int, gsi: int) -> None:
        self.registered.append(("irqfd", fd, gsi))

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        self.unregistered.append(("irqfd", fd, gsi))


def queues(*indices: int) -> list[QueueConfig]:
    return [QueueConfig(index=i, size=256, ready=True, desc_addr=0x10000, driver_addr=0x11000,
                        device_addr=0x12000) for i in indices]


@pytest.fixture
def vm_and_plumbing():
    vm = RecordingVm()
    plumbing = KvmEventfdPlumbing(vm, BASE, IRQ)  # type: ignore[arg-type]
    yield vm, plumbing
    plumbing.close()


def test_each_queue_kick_is_bound_to_queue_notify_with_its_index_and_each_call_to_the_irq(
        vm_and_plumbing) -> None:
    vm, plumbing = vm_and_plumbing
    kicks, calls = plumbing.activate(None, queues(0, 2))  # type: ignore[arg-type]
    ack = vm.registered[-1][1]
    assert vm.registered == [
        ("ioeventfd", kicks[0], NOTIFY, 4, 0), ("irqfd", calls[0], IRQ),
        ("ioeventfd", kicks[1], NOTIFY, 4, 2), ("irqfd", calls[1], IRQ),
        ("ioeventfd", ack, ACK, 4, c.VIRTIO_MMIO_INT_VRING),
    ]
    assert len(set(kicks + calls + [ack])) == 5


def test_every_eventfd_starts_empty_nonblocking_and_close_on_exec(vm_and_plumbing) -> None:
    vm, plumbing = vm_and_plumbing
    plumbing.activate(None, queues(0, 1))  # type: ignore[arg-type]
    for record in vm.registered:
        fd = record[1]
        assert not os.get_inheritable(fd), record  # a back-end spawned later must not get it
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK, record
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)


def test_deactivate_gives_back_exactly_what_was_bound_and_closes_the_eventfds(
        vm_and_plumbing) -> None:
    vm, plumbing = vm_and_plumbing
    plumbing.activate(None, queues(0, 1))  # type: ignore[arg-type]
    plumbing.deactivate(None)  # type: ignore[arg-type]
    assert sorted(vm.unregistered) == sorted(vm.registered)
    assert not any(is_open(record[1]) for record in vm.registered)


def test_close_after_deactivate_gives_nothing_back_twice(vm_and_plumbing) -> None:
    vm, plumbing = vm_and_plumbing
    plumbing.activate(None, queues(0))  # type: ignore[arg-type]
    plumbing.deactivate(None)  # type: ignore[arg-type]
    plumbing.close()
    assert len(vm.unregistered) == len(vm.registered) == 3


def test_interrupt_eventfd_trigger_raises_the_line_it_was_given() -> None:
    raised: list[str] = []
    InterruptEventfd(lambda: raised.append("irq")).trigger()
    assert raised == ["irq"]
