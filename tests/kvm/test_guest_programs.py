"""Small guest programs against the real vCPU run loop, buses and legacy devices."""

from __future__ import annotations

import time

import pytest

from pymvm import layout
from pymvm.devices import i8042
from pymvm.devices.boot_timer import BootTimer
from pymvm.devices.serial import LSR, LSR_THRE, REGISTER_COUNT, Serial8250
from pymvm.kvm import Vcpu, constants as k
from pymvm.machine import Machine, MachineState, MachineStateError, StopKind, StopReason

from .guests import Asm, Recorder, load, run_to_stop, setup_64bit, setup_real_mode

pytestmark = pytest.mark.kvm

CODE = 0x1000  # real-mode programs start here, well clear of the IVT and the stack
SINK_PORT = 0x510  # a Recorder that collects what a guest reports
MIB = 1 << 20


def add_sink(machine: Machine) -> Recorder:
    sink = Recorder()
    machine.pio_bus.insert(sink, SINK_PORT, 2, "sink")
    return sink


def test_real_mode_guest_prints_hello_through_serial_polling_thre_then_halts(make_machine):
    m = make_machine(MIB, irqchip=False)
    out = bytearray()
    serial = Recorder(inner=Serial8250(out.extend, interrupt=lambda: None))
    m.pio_bus.insert(serial, layout.COM1_PORT, REGISTER_COUNT, "serial")
    a = Asm(CODE)
    a.mov_si("msg")
    a.label("next").mov_dx(layout.COM1_PORT + LSR)
    a.label("busy").in_al_dx().test_al(LSR_THRE).jz("busy")  # wait for an empty THR
    a.lodsb().mov_dx(layout.COM1_PORT).out_dx_al()
    a.cmp_al(ord("\n")).jnz("next")  # the message ends with its newline
    a.hlt()
    a.label("msg").db(b"Hello\n")
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    reason = run_to_stop(m)
    serial.inner.flush()

    assert out == b"Hello\n"
    assert reason.kind is StopKind.GUEST_HALTED
    assert reason.exit_status == 0
    lsr_reads = [r for r in serial.reads if r.offset == LSR]
    assert len(lsr_reads) == 6 and all(r.data[0] & LSR_THRE for r in lsr_reads)


def count_io_exits(vcpu: Vcpu) -> list[tuple[bool, int]]:
    """Record (is_write, count) of every I/O exit the run loop sees on ``vcpu``."""
    exits: list[tuple[bool, int]] = []
    kvm_run = vcpu.run

    def counting_run() -> int:
        reason = kvm_run()
        if reason == k.KVM_EXIT_IO:
            io = vcpu.io_exit()
            exits.append((io.is_write, io.count))
        return reason

    vcpu.run = counting_run  # the run loop looks vcpu.run up once, when it starts
    return exits


def test_rep_outsb_delivers_all_bytes_in_order(make_machine):
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    message = bytes(range(32, 32 + 64))
    a = Asm(CODE)
    a.mov_si("msg").mov_cx(len(message)).mov_dx(SINK_PORT).rep_outsb().hlt()
    a.label("msg").db(message)
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED
    assert sink.written_bytes() == message
    assert all(w.offset == 0 and len(w.data) == 1 for w in sink.writes)


class ByteCounter:
    """PIO device whose every read returns the next byte of 0, 1, 2, ..."""

    def __init__(self) -> None:
        self.next = 0

    def read(self, offset: int, data: bytearray) -> None:
        for i in range(len(data)):
            data[i] = self.next & 0xFF
            self.next += 1

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_rep_insb_fills_guest_memory_in_order_with_several_bytes_per_exit(make_machine):
    # KVM batches string *input* (one exit carries up to 1 KiB); OUTS exits once per byte.
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    m.pio_bus.insert(ByteCounter(), 0x500, 1, "counter")
    n, buf = 200, 0x3000
    a = Asm(CODE)
    a.mov_di(buf).mov_cx(n).mov_dx(0x500).rep_insb()
    a.mov_si(buf).mov_cx(n).mov_dx(SINK_PORT).rep_outsb()  # and echo it back out
    a.hlt()
    load(m, a)
    vcpu = m.vcpus[0]
    setup_real_mode(vcpu, CODE)
    exits = count_io_exits(vcpu)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED
    expected = bytes(range(n))
    assert m.memory.read(buf, n) == expected
    assert sink.written_bytes() == expected
    in_counts = [count for is_write, count in exits if not is_write]
    assert in_counts, "no I/O exit was observed: the run loop no longer calls vcpu.run()"
    assert sum(in_counts) == n
    assert max(in_counts) > 1, f"every string input exit carried one byte: {in_counts}"


def test_pio_read_returns_the_device_value_to_the_guest(make_machine):
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    source = Recorder(read_values={0: 0x5A, 2: 0xBEEF})
    m.pio_bus.insert(source, 0x500, 4, "source")
    a = Asm(CODE)
    a.mov_dx(0x500).in_al_dx().mov_dx(SINK_PORT).out_dx_al()
    a.mov_dx(0x502).in_ax_dx().mov_dx(SINK_PORT).out_dx_ax()
    a.hlt()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED
    assert [(r.offset, len(r.data)) for r in source.reads] == [(0, 1), (2, 2)]
    assert [w.data for w in sink.writes] == [b"\x5a", b"\xef\xbe"]


def test_pio_read_from_an_unmapped_port_is_open_bus_all_ones(make_machine):
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    a = Asm(CODE)
    a.mov_dx(0x600).in_al_dx().mov_dx(SINK_PORT).out_dx_al()
    a.mov_dx(0x600).in_ax_dx().mov_dx(SINK_PORT).out_dx_ax()
    a.hlt()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED
    assert [w.data for w in sink.writes] == [b"\xff", b"\xff\xff"]


def test_real_mode_mmio_above_ram_reaches_the_device_and_returns_its_value(make_machine):
    m = make_machine(0x10000, irqchip=False)  # 64 KiB: 0x10000 is the first address past RAM
    sink = add_sink(m)
    device = Recorder(read_values={4: 0xBEEF})
    m.mmio_bus.insert(device, 0x10000, 0x1000, "test-mmio")
    a = Asm(CODE)
    a.mov_ax(0x1000).mov_ds_ax()  # ds base 0x10000
    a.mov_byte_mem_imm(0x0, 0x5A)
    a.mov_word_mem_imm(0x2, 0x1234)
    a.mov_ax_mem(0x4)
    a.mov_dx(SINK_PORT).out_dx_ax()
    a.hlt()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    assert run_to_stop(m).kind is StopKind.GUEST_HALTED
    seen = [(x.offset, x.data, x.is_write) for x in device.accesses]
    assert seen == [(0, b"\x5a", True), (2, b"\x34\x12", True), (4, b"\xef\xbe", False)]
    assert [w.data for w in sink.writes] == [b"\xef\xbe"]


def test_64bit_guest_does_mmio_above_ram_and_signals_the_boot_timer(make_machine):
    m = make_machine(2 * MIB, irqchip=False)
    sink = add_sink(m)
    device = Recorder(read_values={8: 0x1122334455667788})
    m.mmio_bus.insert(device, layout.VIRTIO_MMIO_START, layout.VIRTIO_MMIO_SIZE, "test-mmio")
    timer = BootTimer(time.monotonic_ns())
    m.mmio_bus.insert(timer, layout.BOOT_TIMER_ADDR, layout.BOOT_TIMER_SIZE, "boot-timer")
    a = Asm(layout.HIMEM_START, bits=64)
    a.mov_ebx(layout.VIRTIO_MMIO_START).mov_eax(0xDEADBEEF).mov_dword_rbx_eax()
    a.mov_ebx(layout.VIRTIO_MMIO_START + 8).mov_rax_qword_rbx()
    a.mov_edx(SINK_PORT).out_dx_eax().shr_rax(32).out_dx_eax()  # low half, then high half
    a.mov_ebx(layout.BOOT_TIMER_ADDR).mov_byte_rbx_imm(layout.BOOT_TIMER_MAGIC)
    a.hlt()
    load(m, a)
    setup_64bit(m, m.vcpus[0], layout.HIMEM_START)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.GUEST_HALTED, reason.message
    seen = [(x.offset, x.data, x.is_write) for x in device.accesses]
    assert seen == [(0, (0xDEADBEEF).to_bytes(4, "little"), True),
                    (8, (0x1122334455667788).to_bytes(8, "little"), False)]
    assert [w.data for w in sink.writes] == [bytes.fromhex("88776655"), bytes.fromhex("44332211")]
    assert timer.boot_time_us is not None


class FastValueSetter:
    """PIO device: a guest write of N sets the fast-read register to N + 0x100."""

    def __init__(self) -> None:
        self.fast = None

    def read(self, offset: int, data: bytearray) -> None:
        pass

    def write(self, offset: int, data: bytes) -> None:
        self.fast.set(int.from_bytes(data, "little") + 0x100)


def test_fast_mmio_reads_are_answered_in_c_with_the_current_value(make_machine):
    # A register on the fast-read table: 4-byte reads never reach its bus device, and see
    # each value the VMM sets; other widths and other registers still go to the device.
    m = make_machine(2 * MIB, irqchip=False)
    sink = add_sink(m)
    base = layout.VIRTIO_MMIO_START
    device = Recorder(read_values={0x60: 0xBAD, 0x64: 0x64646464})
    m.mmio_bus.insert(device, base, layout.VIRTIO_MMIO_SIZE, "test-mmio")
    setter = FastValueSetter()
    m.pio_bus.insert(setter, 0x520, 4, "setter")
    setter.fast = m.add_fast_read(base + 0x60, 0x11)
    a = Asm(layout.HIMEM_START, bits=64)
    a.mov_ebx(base + 0x60).mov_eax_dword_rbx().mov_edx(SINK_PORT).out_dx_eax()  # 0x11
    a.mov_eax(0x22).mov_edx(0x520).out_dx_eax()  # the VMM sets 0x122
    a.mov_ebx(base + 0x60).mov_eax_dword_rbx().mov_edx(SINK_PORT).out_dx_eax()  # 0x122
    a.mov_ebx(base + 0x64).mov_eax_dword_rbx().mov_edx(SINK_PORT).out_dx_eax()  # the device
    a.mov_eax(0).mov_ebx(base + 0x60).mov_ax_word_rbx().mov_edx(SINK_PORT).out_dx_eax()  # 2 bytes
    a.hlt()
    load(m, a)
    setup_64bit(m, m.vcpus[0], layout.HIMEM_START)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.GUEST_HALTED, reason.message
    values = [int.from_bytes(w.data, "little") for w in sink.writes]
    assert values == [0x11, 0x122, 0x64646464, 0xBAD]
    assert setter.fast.hits == 2
    seen = [(x.offset, len(x.data), x.is_write) for x in device.accesses]
    assert seen == [(0x64, 4, False), (0x60, 2, False)]


def test_fast_reads_are_registered_before_the_machine_starts(make_machine):
    m = make_machine(MIB, irqchip=False)
    m.add_fast_read(layout.VIRTIO_MMIO_START + 0x60)
    with pytest.raises(ValueError, match="already has a fast read"):
        m.add_fast_read(layout.VIRTIO_MMIO_START + 0x60)
    a = Asm(CODE).hlt()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)
    run_to_stop(m)
    with pytest.raises(MachineStateError):
        m.add_fast_read(layout.VIRTIO_MMIO_START + 0x1060)


def test_hlt_stops_the_machine_as_guest_halted_and_the_vcpu_thread_exits(make_machine):
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    a = Asm(CODE).mov_dx(SINK_PORT).mov_al(1).out_dx_al().hlt()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.GUEST_HALTED
    assert reason.exit_status == 0
    vcpu_thread = sink.writes[0].thread  # the thread that ran the guest's OUT
    assert vcpu_thread.name == "vcpu0"
    assert not vcpu_thread.is_alive()
    assert m.state is MachineState.STOPPED


def test_i8042_reset_command_stops_the_machine_as_guest_reset(make_machine):
    m = make_machine(MIB, irqchip=False)
    kbc = Recorder(inner=i8042.I8042(
        on_reset=lambda: m.request_stop(StopReason(StopKind.GUEST_RESET, "i8042 reset", 0))))
    m.pio_bus.insert(kbc, layout.I8042_DATA_PORT, i8042.PORT_COUNT, "i8042")
    a = Asm(CODE)
    a.label("busy").in_al_port(layout.I8042_CMD_PORT).test_al(i8042.STR_IBF).jnz("busy")
    a.mov_al(i8042.CMD_PULSE_RESET).out_port_al(layout.I8042_CMD_PORT)
    a.spin()  # only the reset can stop this guest
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)

    reason = run_to_stop(m)

    assert reason.kind is StopKind.GUEST_RESET
    assert [(x.offset, x.is_write) for x in kbc.accesses] == [
        (i8042.STATUS_COMMAND, False), (i8042.STATUS_COMMAND, True)]


def test_triple_fault_stops_the_machine_as_guest_reset(make_machine):
    # Long mode, not real mode: KVM delivers real-mode exceptions through the IVT without
    # checking the IDTR limit (seen here: a zero-limit lidt + int3 just vectors to 0000:0000).
    m = make_machine(2 * MIB, irqchip=False)
    a = Asm(layout.HIMEM_START, bits=64).ud2().spin()  # #UD, #GP, #DF all miss the IDT
    load(m, a)
    vcpu = m.vcpus[0]
    setup_64bit(m, vcpu, layout.HIMEM_START)
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = 0, 0  # no vector has a gate
    vcpu.set_sregs(sregs)

    reason = run_to_stop(m, timeout=3)

    assert reason.kind is StopKind.GUEST_RESET, reason.message
    assert "triple fault" in reason.message


def test_request_stop_ends_a_spinning_guest_and_joins_its_thread(make_machine):
    m = make_machine(MIB, irqchip=False)
    sink = add_sink(m)
    a = Asm(CODE).mov_dx(SINK_PORT).mov_al(1).out_dx_al().spin()
    load(m, a)
    setup_real_mode(m.vcpus[0], CODE)
    m.start()
    assert sink.wait_for_writes(1, timeout=5), "guest never reached its loop"
    vcpu_thread = sink.writes[0].thread

    started = time.monotonic()
    m.request_stop(StopReason(StopKind.REQUESTED, "test", 0))
    m.join(timeout=3)
    elapsed = time.monotonic() - started

    assert not vcpu_thread.is_alive()
    assert elapsed < 3
    assert m.wait(0).kind is StopKind.REQUESTED
    assert m.state is MachineState.STOPPED


def test_two_vcpus_run_their_own_code_concurrently_on_one_bus(make_machine):
    m = make_machine(MIB, vcpus=2, irqchip=False)
    sink = add_sink(m)
    # Each vCPU reports once, then spins: a HLT would stop the machine before the other ran.
    for vcpu, origin, byte in ((m.vcpus[0], 0x1000, b"a"), (m.vcpus[1], 0x2000, b"b")):
        load(m, Asm(origin).mov_dx(SINK_PORT).mov_al(byte[0]).out_dx_al().spin())
        setup_real_mode(vcpu, origin, sp=origin - 0x100)
    m.start()

    arrived = sink.wait_for_writes(2, timeout=5)
    m.request_stop(StopReason(StopKind.REQUESTED, "test", 0))
    m.join()

    assert arrived, f"only {sink.written_bytes()!r} arrived"
    writes = sink.writes
    assert sorted(w.data for w in writes) == [b"a", b"b"]
    by_thread = {w.data: w.thread.name for w in writes}
    assert by_thread == {b"a": "vcpu0", b"b": "vcpu1"}
