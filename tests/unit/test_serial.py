import io
import threading

import pytest
from structlog.testing import capture_logs

from pymvm.devices import serial as s
from pymvm.devices.serial import Serial8250


class Uart:
    """Drives a Serial8250 the way the guest's port I/O would."""

    def __init__(self, out=None) -> None:
        self.irqs = 0
        self.written: list[bytes] = []
        self.dev = Serial8250(out if out is not None else self.written.append, self._irq)

    def _irq(self) -> None:
        self.irqs += 1

    def inb(self, reg: int) -> int:
        data = bytearray(1)
        self.dev.read(reg, data)
        return data[0]

    def outb(self, reg: int, value: int) -> None:
        self.dev.write(reg, bytes([value]))

    def output(self) -> bytes:
        self.dev.flush()
        return b"".join(self.written)


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_linux_autoconfig_ier_scratch_test_passes(uart: Uart) -> None:
    saved = uart.inb(s.IER)
    uart.outb(s.IER, 0)
    scratch2 = uart.inb(s.IER) & 0x0F
    uart.outb(s.IER, 0x0F)
    scratch3 = uart.inb(s.IER) & 0x0F
    uart.outb(s.IER, saved)
    assert (scratch2, scratch3) == (0, 0x0F)


def test_linux_autoconfig_loopback_test_reports_dcd_and_cts(uart: Uart) -> None:
    save_mcr = uart.inb(s.MCR)
    uart.outb(s.MCR, s.MCR_LOOP | 0x0A)  # OUT2 | RTS
    status1 = uart.inb(s.MSR) & 0xF0
    uart.outb(s.MCR, save_mcr)
    assert status1 == 0x90


def test_loopback_maps_every_modem_output_to_its_input(uart: Uart) -> None:
    uart.outb(s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_RTS | s.MCR_OUT1 | s.MCR_OUT2)
    assert uart.inb(s.MSR) == s.MSR_DSR | s.MSR_CTS | s.MSR_RI | s.MSR_DCD
    uart.outb(s.MCR, s.MCR_LOOP)
    assert uart.inb(s.MSR) == 0


def test_msr_reports_carrier_dsr_cts_outside_loopback(uart: Uart) -> None:
    assert uart.inb(s.MSR) == s.MSR_DCD | s.MSR_DSR | s.MSR_CTS


def test_linux_autoconfig_detects_16550a_fifo(uart: Uart) -> None:
    uart.outb(s.LCR, 0xBF)  # UART_LCR_CONF_MODE_B, then "EFR" = 0
    uart.outb(s.IIR_FCR, 0)
    uart.outb(s.LCR, 0)
    uart.outb(s.IIR_FCR, s.FCR_ENABLE_FIFO)
    assert uart.inb(s.IIR_FCR) >> 6 == 3


def test_16550a_variant_probes_do_not_match(uart: Uart) -> None:
    uart.outb(s.IIR_FCR, s.FCR_ENABLE_FIFO)
    # ST16C650V1 check: "EFR" read with DLAB set must not be 0.
    uart.outb(s.LCR, 0x80)
    assert uart.inb(s.IIR_FCR) != 0
    # TI16750 check: IIR bit 5 stays clear even with the 64-byte FIFO bit and DLAB.
    uart.outb(s.IIR_FCR, s.FCR_ENABLE_FIFO | 0x20)
    assert uart.inb(s.IIR_FCR) & 0x20 == 0
    uart.outb(s.LCR, 0)
    # XScale check: IER bit 6 (UUE) does not stick.
    uart.outb(s.IER, 0x40)
    assert uart.inb(s.IER) & 0x40 == 0


def test_iir_reports_no_fifo_bits_when_fifo_disabled(uart: Uart) -> None:
    uart.outb(s.IIR_FCR, 0)
    assert uart.inb(s.IIR_FCR) == s.IIR_NO_INT


def test_scratch_register_holds_written_value(uart: Uart) -> None:
    uart.outb(s.SCR, 0xA5)
    assert uart.inb(s.SCR) == 0xA5
    uart.outb(s.SCR, 0x5A)
    assert uart.inb(s.SCR) == 0x5A


def test_lcr_dlab_switches_offsets_0_and_1_to_divisor(uart: Uart) -> None:
    uart.outb(s.IER, s.IER_RDI)
    uart.outb(s.LCR, s.LCR_DLAB | 0x03)
    uart.outb(s.RBR_THR, 0x01)
    uart.outb(s.IER, 0x00)
    assert (uart.inb(s.RBR_THR), uart.inb(s.IER)) == (0x01, 0x00)
    uart.outb(s.LCR, 0x03)
    assert uart.inb(s.LCR) == 0x03
    assert uart.inb(s.IER) == s.IER_RDI  # the DLM write did not touch IER
    assert uart.output() == b""  # the DLL write was not transmitted


def test_lsr_always_reports_transmitter_empty_and_never_0xff(uart: Uart) -> None:
    lsr = uart.inb(s.LSR)
    assert lsr == s.LSR_THRE | s.LSR_TEMT
    uart.outb(s.RBR_THR, ord("x"))
    assert uart.inb(s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_thr_bytes_reach_output_on_newline(uart: Uart) -> None:
    for b in b"hello\n":
        uart.outb(s.RBR_THR, b)
    assert b"".join(uart.written) == b"hello\n"  # flushed without an explicit flush()


def test_partial_line_is_held_until_flush(uart: Uart) -> None:
    for b in b"/ # ":
        uart.outb(s.RBR_THR, b)
    assert uart.output() == b"/ # "


def test_partial_line_waits_for_the_owners_flush(uart: Uart) -> None:
    uart.outb(s.RBR_THR, ord(">"))
    assert b"".join(uart.written) == b""
    uart.dev.flush()
    assert b"".join(uart.written) == b">"


def test_owner_is_told_of_partial_lines_once_per_timed_flush(uart: Uart) -> None:
    # VirtualMachine.wait sleeps until told; then it flushes once per interval
    # (flush_partial): however many lines the guest prints meanwhile, one call.
    calls = []
    uart.dev.on_partial = lambda: calls.append(uart.dev.pending)
    for b in b"done\nnext\nlogin: ":
        uart.outb(s.RBR_THR, b)
    assert calls == [True] and uart.dev.pending  # 'd' told; whole lines went out at once
    assert b"".join(uart.written) == b"done\nnext\n"
    uart.dev.flush()  # a plain flush (a newline, the VM's end) re-arms nothing
    uart.outb(s.RBR_THR, ord(">"))
    assert len(calls) == 1
    uart.dev.flush_partial()  # the owner's timed flush: out, and the next one is news again
    assert not uart.dev.pending and b"".join(uart.written) == b"done\nnext\nlogin: >"
    uart.outb(s.RBR_THR, ord("x"))
    assert len(calls) == 2


def test_large_output_is_flushed_without_newline(uart: Uart) -> None:
    for _ in range(s.OUTPUT_FLUSH_SIZE):
        uart.outb(s.RBR_THR, ord("a"))
    assert len(b"".join(uart.written)) == s.OUTPUT_FLUSH_SIZE


def test_binary_stream_output_receives_bytes() -> None:
    stream = io.BytesIO()
    uart = Uart(out=stream)
    for b in b"ok\r\n":
        uart.outb(s.RBR_THR, b)
    uart.dev.flush()
    assert stream.getvalue() == b"ok\r\n"


def test_output_none_discards_bytes() -> None:
    dev = Serial8250(None, lambda: None)
    dev.write(s.RBR_THR, b"x")
    assert dev.pending
    dev.flush()  # must not raise
    assert not dev.pending  # dropped, not kept for later


def test_broken_output_stream_does_not_raise_into_the_vcpu() -> None:
    stream = io.BytesIO()
    stream.close()
    uart = Uart(out=stream)
    uart.outb(s.RBR_THR, ord("\n"))  # the write fails: logged, output switched off
    uart.outb(s.RBR_THR, ord("\n"))
    assert not uart.dev.pending and uart.inb(s.LSR) & s.LSR_THRE  # the guest may go on


def test_input_sets_data_ready_and_reads_in_order(uart: Uart) -> None:
    assert uart.inb(s.LSR) & s.LSR_DR == 0
    uart.dev.enqueue_input(b"ab")
    assert uart.inb(s.LSR) & s.LSR_DR
    assert uart.inb(s.RBR_THR) == ord("a")
    assert uart.inb(s.RBR_THR) == ord("b")
    assert uart.inb(s.LSR) & s.LSR_DR == 0


def test_input_raises_interrupt_only_when_rdi_enabled(uart: Uart) -> None:
    uart.dev.enqueue_input(b"a")
    assert uart.irqs == 0
    uart.inb(s.RBR_THR)
    uart.outb(s.IER, s.IER_RDI)
    uart.dev.enqueue_input(b"b")
    assert uart.irqs == 1
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_RDI


def test_enabling_rdi_with_queued_input_raises_interrupt(uart: Uart) -> None:
    uart.dev.enqueue_input(b"a")
    uart.outb(s.IER, s.IER_RDI)
    assert uart.irqs == 1


def test_input_beyond_fifo_limit_is_dropped_with_one_warning(uart: Uart) -> None:
    with capture_logs() as logs:
        uart.dev.enqueue_input(b"x" * (s.INPUT_FIFO_LIMIT + 10))
        uart.dev.enqueue_input(b"more")
    assert [e["event"] for e in logs] == ["serial_input_dropped"]
    assert logs[0]["dropped"] == 10
    count = 0
    while uart.inb(s.LSR) & s.LSR_DR:
        uart.inb(s.RBR_THR)
        count += 1
    assert count == s.INPUT_FIFO_LIMIT


def test_fcr_clear_receiver_drops_queued_input(uart: Uart) -> None:
    uart.dev.enqueue_input(b"abc")
    uart.outb(s.IIR_FCR, s.FCR_ENABLE_FIFO | s.FCR_CLEAR_RCVR)
    assert uart.inb(s.LSR) & s.LSR_DR == 0


def test_enabling_thri_raises_thre_interrupt(uart: Uart) -> None:
    uart.outb(s.IER, s.IER_THRI)
    assert uart.irqs == 1
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_reading_iir_clears_pending_thre(uart: Uart) -> None:
    uart.outb(s.IER, s.IER_THRI)
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_NO_INT


def test_linux_thre_test_sees_thre_reasserted(uart: Uart) -> None:
    # serial8250_do_startup: a UART that does not re-assert THRE gets UART_BUG_THRE.
    uart.outb(s.IER, s.IER_THRI)
    iir1 = uart.inb(s.IIR_FCR)
    uart.outb(s.IER, 0)
    uart.outb(s.IER, s.IER_THRI)
    iir = uart.inb(s.IIR_FCR)
    uart.outb(s.IER, 0)
    assert not iir1 & s.IIR_NO_INT
    assert not iir & s.IIR_NO_INT


def test_each_thr_write_raises_thre_when_enabled(uart: Uart) -> None:
    uart.outb(s.IER, s.IER_THRI)
    uart.inb(s.IIR_FCR)
    before = uart.irqs
    for b in b"abc":
        uart.outb(s.RBR_THR, b)
    assert uart.irqs == before + 3
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_THRI


def test_thr_write_without_thri_raises_nothing(uart: Uart) -> None:
    uart.outb(s.RBR_THR, ord("a"))
    assert uart.irqs == 0
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_NO_INT


def test_iir_prefers_received_data_over_thre(uart: Uart) -> None:
    uart.outb(s.IER, s.IER_THRI | s.IER_RDI)
    uart.dev.enqueue_input(b"z")
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_RDI
    # RDA was reported, so THRE is still pending and shows once the data is read.
    uart.inb(s.RBR_THR)
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_THRI
    assert uart.inb(s.IIR_FCR) & 0x0F == s.IIR_NO_INT


def test_loopback_thr_write_is_received_not_transmitted(uart: Uart) -> None:
    uart.outb(s.MCR, s.MCR_LOOP)
    uart.outb(s.RBR_THR, 0x42)
    assert uart.inb(s.LSR) & s.LSR_DR
    assert uart.inb(s.RBR_THR) == 0x42
    assert uart.output() == b""


def test_wide_access_fills_every_byte(uart: Uart) -> None:
    data = bytearray(b"\xff\xff")
    uart.dev.read(s.LSR, data)
    assert data == bytes([s.LSR_THRE | s.LSR_TEMT, 0])


def test_concurrent_writers_lose_no_output() -> None:
    uart = Uart()

    def writer() -> None:
        for _ in range(500):
            uart.outb(s.RBR_THR, ord("a"))
            uart.outb(s.RBR_THR, ord("\n"))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(uart.output()) == 4 * 500 * 2


def test_text_stream_output_is_written_as_bytes() -> None:
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8")
    dev = Serial8250(text, lambda: None)
    for b in "é\n".encode():
        dev.write(s.RBR_THR, bytes([b]))
    dev.flush()
    assert raw.getvalue() == "é\n".encode()
