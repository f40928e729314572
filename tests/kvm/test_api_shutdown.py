"""The API's shutdown reaches a guest as Ctrl-Alt-Del on its keyboard, one byte per IRQ 1.

The guest program plays Linux's keyboard path in miniature: its IRQ 1 handler reads one
scan code from the i8042's data port per interrupt, reports it, and when the last key is
released (Ctrl break, 0x9D) resets the machine through the controller (0xFE to port 0x64),
as Linux's ctrl_alt_del() does with reboot=k. No Linux needed.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from pymvm import layout
from pymvm.api.controller import ApiRequest, ControlledVm, Controller, VmmAction
from pymvm.boot.cpu import APIC_LVT0, APIC_MODE_EXTINT
from pymvm.devices.i8042 import CTRL_ALT_DEL_SET1, I8042, PORT_COUNT
from pymvm.machine import StopKind, StopReason

from .guests import Asm, Recorder, load, setup_real_mode

pytestmark = pytest.mark.kvm

MIB = 1 << 20
CODE = 0x1000
VECTOR_BASE = 0x20  # ICW2: the master PIC's IRQ0 vector
REPORT_PORT = 0x510
READY = 0xA5


def keyboard_guest(make_machine):
    m = make_machine(MIB, irqchip=True)
    report = Recorder()
    m.pio_bus.insert(report, REPORT_PORT, 1, "report")
    i8042 = I8042(lambda: m.request_stop(StopReason(StopKind.GUEST_RESET, "guest reset (i8042)", 0)),
                  m.irq_eventfd(layout.I8042_IRQ))
    m.pio_bus.insert(i8042, layout.I8042_DATA_PORT, PORT_COUNT, "i8042")
    ivt_entry = (VECTOR_BASE + layout.I8042_IRQ) * 4
    a = Asm(CODE).cli()
    a.mov_word_mem_imm(ivt_entry, "handler").mov_word_mem_imm(ivt_entry + 2, 0)
    a.mov_al(0x11).out_port_al(0x20)  # ICW1: edge, cascade, ICW4 follows
    a.mov_al(VECTOR_BASE).out_port_al(0x21)  # ICW2
    a.mov_al(0x04).out_port_al(0x21)  # ICW3
    a.mov_al(0x01).out_port_al(0x21)  # ICW4: 8086 mode
    a.mov_al(0xFF & ~(1 << layout.I8042_IRQ)).out_port_al(0x21)  # OCW1: only IRQ 1
    a.mov_dx(REPORT_PORT).mov_al(READY).out_dx_al()
    a.sti()
    a.label("idle").hlt().jmp("idle")
    a.label("handler").in_al_port(0x60)  # one scan code per interrupt, as Linux reads it
    a.mov_dx(REPORT_PORT).out_dx_al()
    a.cmp_al(0x9D).jnz("eoi")  # Ctrl released: the three-finger salute is complete
    a.mov_al(0xFE).out_port_al(0x64)  # pulse reset (reboot=k)
    a.label("eoi").mov_al(0x20).out_port_al(0x20)
    a.iret()
    load(m, a)
    vcpu = m.vcpus[0]
    setup_real_mode(vcpu, CODE)
    lapic = vcpu.get_lapic()
    struct.pack_into("<I", lapic, APIC_LVT0, APIC_MODE_EXTINT << 8)
    vcpu.set_lapic(lapic)
    return m, i8042, report


def test_api_shutdown_delivers_ctrl_alt_del_byte_by_byte_and_the_guest_reset_ends_the_vm(make_machine):
    m, i8042, report = keyboard_guest(make_machine)
    controller = Controller(ControlledVm(id="kbd", machine=m, devices=None, vcpus=1, memory_mib=1,
                                         ctrl_alt_del=i8042.send_ctrl_alt_del))
    m.start()
    assert report.wait_for_writes(1, timeout=5), "the guest never got ready"

    answer = asyncio.run(controller.dispatch(
        ApiRequest(VmmAction.ACTION, body={"action": "shutdown"})))
    reason = m.wait(10)
    if reason is None:
        m.request_stop(StopReason(StopKind.REQUESTED, "test timed out", 1))
    m.join()

    assert answer == {"action": "shutdown", "exit_status": 0}
    assert list(report.written_bytes()) == [READY, *CTRL_ALT_DEL_SET1]
    assert reason is not None and reason.kind is StopKind.GUEST_RESET and reason.exit_status == 0
