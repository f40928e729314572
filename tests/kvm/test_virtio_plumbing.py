"""The virtio-mmio eventfd plumbing against real KVM: kicks and acks stay in the kernel."""

from __future__ import annotations

import os

import pytest

from pymvm import layout
from pymvm.devices.virtio.device import QueueConfig
from pymvm.devices.virtio.plumbing import KvmEventfdPlumbing
from pymvm.machine import StopKind

from .guests import Asm, Recorder, load, setup_64bit

pytestmark = pytest.mark.kvm

MIB = 1 << 20
BASE = layout.VIRTIO_MMIO_START
NOTIFY, ACK = BASE + 0x50, BASE + 0x64


def count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def guest_writing(make_machine, writes: list[tuple[int, int]]):
    m = make_machine(2 * MIB, irqchip=True)
    device = Recorder()
    m.mmio_bus.insert(device, BASE, layout.VIRTIO_MMIO_SIZE, "virtio-test")
    a = Asm(layout.HIMEM_START, bits=64)
    for addr, value in writes:
        a.mov_ebx(addr).mov_eax(value).mov_dword_rbx_eax()
    a.mov_ebx(BASE + 0x70).mov_eax(0xD0E).mov_dword_rbx_eax()  # "done": a write that exits
    a.label("spin").jmp("spin")
    load(m, a)
    setup_64bit(m, m.vcpus[0], layout.HIMEM_START)
    return m, device


def queues(n: int) -> list[QueueConfig]:
    return [QueueConfig(index=i, size=256, ready=True, desc_addr=0x10000 * (i + 1),
                        driver_addr=0x10000 * (i + 1) + 0x1000, device_addr=0x10000 * (i + 1) + 0x2000)
            for i in range(n)]


def test_plumbing_routes_queue_kicks_to_per_queue_eventfds_and_absorbs_vring_acks(make_machine):
    m, device = guest_writing(make_machine, [(NOTIFY, 1), (NOTIFY, 0), (NOTIFY, 1), (ACK, 1), (ACK, 2)])
    plumbing = KvmEventfdPlumbing(m.vm, BASE, layout.VIRTIO_IRQ_BASE)
    try:
        kicks, calls = plumbing.activate(None, queues(2))
        assert len(kicks) == len(calls) == 2
        m.start()
        assert device.wait_for_writes(2, timeout=10)
    finally:
        from pymvm.machine import StopReason
        m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
        m.join()
    assert count(kicks[0]) == 1 and count(kicks[1]) == 2  # datamatch = queue index
    seen = [(w.offset, int.from_bytes(w.data, "little")) for w in device.writes]
    # Only the config-change ack (2) and the marker exited to userspace.
    assert seen == [(0x64, 2), (0x70, 0xD0E)]
    plumbing.close()


def test_plumbing_deactivate_hands_writes_back_to_the_transport(make_machine):
    m, device = guest_writing(make_machine, [(NOTIFY, 0), (ACK, 1)])
    plumbing = KvmEventfdPlumbing(m.vm, BASE, layout.VIRTIO_IRQ_BASE)
    kicks, _ = plumbing.activate(None, queues(1))
    kick_copy = os.dup(kicks[0])
    plumbing.deactivate(None)  # closes its fds and unregisters them from KVM
    try:
        m.start()
        assert device.wait_for_writes(3, timeout=10)
    finally:
        from pymvm.machine import StopReason
        m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
        m.join()
    seen = [(w.offset, int.from_bytes(w.data, "little")) for w in device.writes]
    assert seen[:2] == [(0x50, 0), (0x64, 1)]
    assert count(kick_copy) == 0
    os.close(kick_copy)
