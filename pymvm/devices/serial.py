"""16550A UART (COM1) as Linux's 8250 driver sees it.

Register map (PC16550D datasheet, section 8.4; offsets from the port base):

    0 RBR (read) / THR (write), or DLL when LCR.DLAB=1
    1 IER, or DLM when LCR.DLAB=1
    2 IIR (read) / FCR (write)
    3 LCR   4 MCR   5 LSR   6 MSR   7 SCR

Transmission is instantaneous: THR and the transmitter are always empty, so LSR always
reports THRE|TEMT. The interrupt callback is an edge (a KVM irqfd on an edge-triggered ISA
line): it fires when an interrupt *becomes* pending, never to lower the line.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import BinaryIO

import structlog

# Register offsets.
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_MASK = 0x0F  # bits 7:4 read as zero on a 16550A (Linux probes bit 6 for XScale UARTs)

IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0  # 16550A with working FIFOs

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

INPUT_FIFO_LIMIT = 64 * 1024
OUTPUT_FLUSH_SIZE = 4096
# How often the owner should call flush() for partial lines (a prompt, an echoed key).
OUTPUT_FLUSH_INTERVAL_S = 0.02

log = structlog.get_logger()


class Serial8250:
    """COM1 at ``COM1_PORT``, ``REGISTER_COUNT`` ports; thread-safe."""

    def __init__(
        self,
        out: BinaryIO | Callable[[bytes], None] | None,
        interrupt: Callable[[], None],
    ) -> None:
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._ier = 0
        self._lcr = 0x03  # 8N1, what firmware would leave behind
        self._mcr = MCR_OUT2
        self._fcr = 0
        self._scr = 0
        self._dll = 0x0C  # divisor 12: 9600 baud
        self._dlm = 0
        self._thr_pending = False
        self._rx = bytearray()
        self._rx_dropping = False

        self._out_lock = threading.Lock()  # orders flushes; separate so I/O never blocks registers
        self._out_buf = bytearray()
        #: Called (from a vCPU thread, under the output lock) when a partial line starts to
        #: wait for flush(), at most once until the owner's next flush_partial(); it must
        #: not block.
        self.on_partial: Callable[[], None] | None = None
        self._partial_told = False
        self._write_out: Callable[[bytes], None] | None
        if out is None:
            self._write_out = None
        elif callable(out) and not hasattr(out, "write"):
            self._write_out = out
        else:
            # A text stream such as sys.stdout: write to its binary buffer.
            stream = out.buffer if isinstance(out, io.TextIOBase) else out

            def write_stream(data: bytes) -> None:
                stream.write(data)
                stream.flush()

            self._write_out = write_stream

    # -- BusDevice --------------------------------------------------------------------------

    def read(self, offset: int, data: bytearray) -> None:
        with self._lock:
            value = self._read_register(offset)
        data[0] = value
        for i in range(1, len(data)):
            data[i] = 0

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        out: int | None = None
        with self._lock:
            fire, out = self._write_register(offset, value)
        if out is not None:
            self._emit(out)
        if fire:
            self._interrupt()

    # -- host side ----------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Queue terminal input for the guest; raises the interrupt if RDA is enabled."""
        if not data:
            return
        with self._lock:
            room = INPUT_FIFO_LIMIT - len(self._rx)
            if len(data) > room:
                if not self._rx_dropping:
                    log.warning(
                        "serial_input_dropped",
                        device="serial",
                        dropped=len(data) - room,
                        reason="guest is not reading its console",
                    )
                self._rx_dropping = True
                data = data[:room]
            else:
                self._rx_dropping = False
            if not data:
                return
            self._rx += data
            # Edge on every arrival, not only on empty -> non-empty: a guest that left data
            # behind (Linux reads at most 256 bytes per pass) must get another edge.
            fire = bool(self._ier & IER_RDI)
        if fire:
            self._interrupt()

    def flush(self) -> None:
        """Write out buffered guest output (call at VM exit; also runs on newline)."""
        with self._out_lock:
            if not self._out_buf:
                return
            chunk = bytes(self._out_buf)
            self._out_buf.clear()
            if self._write_out is None:
                return
            try:
                self._write_out(chunk)
            except (OSError, ValueError) as exc:  # closed or broken output: keep the VM running
                log.warning("serial_output_failed", device="serial", error=str(exc))
                self._write_out = None

    def close(self) -> None:
        self.flush()

    # -- registers (called with self._lock held) ----------------------------------------------

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0
        if self._ier & IER_RDI and self._rx:
            return fifo | IIR_RDI
        if self._ier & IER_THRI and self._thr_pending:
            return fifo | IIR_THRI
        return fifo | IIR_NO_INT

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self._dll
            if not self._rx:
                return 0
            value = self._rx[0]
            del self._rx[0]  # bytearray deletes from the front in O(1)
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iir = self._iir()
            # Reading IIR acknowledges THRE only when THRE is what it reported (16550D 8.6.3).
            if iir & 0x0F == IIR_THRI:
                self._thr_pending = False
            return iir
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                # Loopback wires the modem outputs to the inputs (16550D 8.6.4).
                msr = 0
                if self._mcr & MCR_DTR:
                    msr |= MSR_DSR
                if self._mcr & MCR_RTS:
                    msr |= MSR_CTS
                if self._mcr & MCR_OUT1:
                    msr |= MSR_RI
                if self._mcr & MCR_OUT2:
                    msr |= MSR_DCD
                return msr
            return MSR_DCD | MSR_DSR | MSR_CTS
        if offset == SCR:
            return self._scr
        return 0

    def _write_register(self, offset: int, value: int) -> tuple[bool, int | None]:
        """Returns (raise the interrupt, byte to transmit)."""
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self._dll = value
                return False, None
            fire = False
            out: int | None = value
            if self._mcr & MCR_LOOP:
                out = None
                fire = self._receive_loopback(value)
            # The byte left THR at once: THRE is pending again.
            self._thr_pending = True
            if self._ier & IER_THRI:
                fire = True
            return fire, out
        if offset == IER:
            if dlab:
                self._dlm = value
                return False, None
            old = self._ier
            self._ier = value & IER_MASK
            rising = self._ier & ~old
            fire = False
            # Enabling THRI with an empty transmitter makes THRE pending; Linux's startup
            # THRE test (UART_BUG_THRE) toggles IER and expects this each time.
            if rising & IER_THRI:
                self._thr_pending = True
                fire = True
            if rising & IER_RDI and self._rx:
                fire = True
            return fire, None
        if offset == IIR_FCR:
            # FCR is written regardless of DLAB; Linux's "EFR" writes at LCR=0xBF land here
            # too, as they do on a real 16550A.
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            self._fcr = value & FCR_ENABLE_FIFO
            return False, None
        if offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_MASK
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes are ignored like on hardware.
        return False, None

    def _receive_loopback(self, value: int) -> bool:
        if len(self._rx) >= INPUT_FIFO_LIMIT:
            return False
        self._rx.append(value)
        return bool(self._ier & IER_RDI)

    # -- output -------------------------------------------------------------------------------

    def _emit(self, byte: int) -> None:
        # Whole lines go out at once; a partial line (a prompt, an echoed key) waits for the
        # owner's flush() within OUTPUT_FLUSH_INTERVAL_S, which costs no thread per write.
        # on_partial tells an owner that sleeps while nothing waits (VirtualMachine.wait).
        with self._out_lock:
            self._out_buf.append(byte)
            if byte != 0x0A and len(self._out_buf) < OUTPUT_FLUSH_SIZE:
                if len(self._out_buf) == 1 and not self._partial_told:
                    told = self.on_partial
                    if told is not None:
                        self._partial_told = True
                        told()
                return
        self.flush()

    def flush_partial(self) -> None:
        """The owner's timed flush: write out what waits, and let on_partial tell of the
        next partial line again."""
        with self._out_lock:
            self._partial_told = False
        self.flush()

    @property
    def pending(self) -> bool:
        """Whether guest output waits for flush()."""
        return bool(self._out_buf)
