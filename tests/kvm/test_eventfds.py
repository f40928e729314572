"""ioeventfd (guest writes signalled in the kernel) and irqfd (eventfd writes raise IRQs)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pymvm import layout
from pymvm.boot.cpu import APIC_LVT0, APIC_MODE_EXTINT
from pymvm.machine import Machine, StopKind, StopReason

from .guests import Asm, Recorder, load, run_to_stop, setup_64bit, setup_real_mode

pytestmark = pytest.mark.kvm

MIB = 1 << 20
QUEUE_NOTIFY = 0x50  # virtio-mmio QueueNotify (virtio 1.2, 4.2.2)
NOTIFY_ADDR = layout.VIRTIO_MMIO_START + QUEUE_NOTIFY


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def eventfd_count(fd: int) -> int:
    """Read and reset the counter; 0 when nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def notify_guest(make_machine) -> tuple[Machine, Recorder]:
    """A 64-bit guest that writes 1, then 2, to QueueNotify as 32-bit values, then halts."""
    m = make_machine(2 * MIB, irqchip=False)
    device = Recorder()
    m.mmio_bus.insert(device, layout.VIRTIO_MMIO_START, layout.VIRTIO_MMIO_SIZE, "virtio-test")
    a = Asm(layout.HIMEM_START, bits=64).mov_ebx(NOTIFY_ADDR)
    a.mov_eax(1).mov_dword_rbx_eax()
    a.mov_eax(2).mov_dword_rbx_eax()
    a.hlt()
    load(m, a)
    setup_64bit(m, m.vcpus[0], layout.HIMEM_START)
    return m, device


def test_ioeventfd_takes_matching_write_in_kernel_and_lets_others_exit(make_machine, eventfd):
    m, device = notify_guest(make_machine)
    m.vm.register_ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=1)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED

    assert eventfd_count(eventfd) == 1
    # Only the value that misses the datamatch reached userspace.
    assert [(w.offset, w.data) for w in device.writes] == [(QUEUE_NOTIFY, struct.pack("<I", 2))]


def test_unregistered_ioeventfd_no_longer_catches_the_write(make_machine, eventfd):
    m, device = notify_guest(make_machine)
    m.vm.register_ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=1)
    m.vm.unregister_ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=1)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED

    assert eventfd_count(eventfd) == 0
    assert [(w.offset, w.data) for w in device.writes] == [
        (QUEUE_NOTIFY, struct.pack("<I", 1)), (QUEUE_NOTIFY, struct.pack("<I", 2))]


# ---- irqfd --------------------------------------------------------------------------------
IRQ = 5
VECTOR_BASE = 0x20  # ICW2: the master PIC's IRQ0 vector
REPORT_PORT = 0x510
READY, IN_HANDLER = b"R", b"I"
CODE = 0x1000


def pic_guest(make_machine) -> tuple[Machine, Recorder]:
    """Real mode, in-kernel irqchip: program the 8259, hook IRQ5, report ready, sti; hlt loop.

    The handler reports IN_HANDLER and sends a non-specific EOI.
    """
    m = make_machine(MIB, irqchip=True)
    report = Recorder()
    m.pio_bus.insert(report, REPORT_PORT, 1, "report")
    ivt_entry = (VECTOR_BASE + IRQ) * 4
    a = Asm(CODE).cli()
    a.mov_word_mem_imm(ivt_entry, "handler").mov_word_mem_imm(ivt_entry + 2, 0)  # cs:ip = 0:handler
    # 8259A initialisation (datasheet: ICW1..ICW4), then OCW1 masks all lines but IRQ5.
    a.mov_al(0x11).out_port_al(0x20)  # ICW1: edge, cascade, ICW4 follows
    a.mov_al(VECTOR_BASE).out_port_al(0x21)  # ICW2
    a.mov_al(0x04).out_port_al(0x21)  # ICW3: slave on IRQ2
    a.mov_al(0x01).out_port_al(0x21)  # ICW4: 8086 mode
    a.mov_al(0xFF & ~(1 << IRQ)).out_port_al(0x21)  # OCW1
    a.mov_dx(REPORT_PORT).mov_al(READY[0]).out_dx_al()
    a.sti()
    a.label("idle").hlt().jmp("idle")  # with an in-kernel irqchip HLT waits in the kernel
    a.label("handler").mov_al(IN_HANDLER[0]).out_dx_al()
    a.mov_al(0x20).out_port_al(0x20)  # OCW2: non-specific EOI
    a.iret()
    load(m, a)
    vcpu = m.vcpus[0]
    setup_real_mode(vcpu, CODE)
    # The PIC reaches the CPU through LINT0: ExtINT delivery, unmasked (SDM vol. 3, 11.5.1).
    lapic = vcpu.get_lapic()
    struct.pack_into("<I", lapic, APIC_LVT0, APIC_MODE_EXTINT << 8)
    vcpu.set_lapic(lapic)
    return m, report


def test_irqfd_write_interrupts_the_guest_through_the_pic(make_machine, eventfd):
    m, report = pic_guest(make_machine)
    m.vm.register_irqfd(eventfd, IRQ)
    m.start()
    assert report.wait_for_writes(1, timeout=5), "guest never reported ready"

    os.eventfd_write(eventfd, 1)
    handled = report.wait_for_writes(2, timeout=5)
    m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
    m.join()

    assert handled, f"no interrupt reached the guest: it reported {report.written_bytes()!r}"
    assert report.written_bytes() == READY + IN_HANDLER


def test_machine_irq_eventfd_trigger_interrupts_the_guest(make_machine):
    m, report = pic_guest(make_machine)
    trigger = m.irq_eventfd(IRQ)
    m.start()
    assert report.wait_for_writes(1, timeout=5), "guest never reported ready"

    trigger()
    handled = report.wait_for_writes(2, timeout=5)
    m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
    m.join()

    assert handled, f"no interrupt reached the guest: it reported {report.written_bytes()!r}"
    assert report.written_bytes() == READY + IN_HANDLER


def test_guest_sees_no_interrupt_without_an_irqfd_write(make_machine, eventfd):
    m, report = pic_guest(make_machine)
    m.vm.register_irqfd(eventfd, IRQ)
    m.start()
    assert report.wait_for_writes(1, timeout=5), "guest never reported ready"

    spurious = report.wait_for_writes(2, timeout=0.5)
    m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
    m.join()

    assert not spurious
    assert report.written_bytes() == READY
