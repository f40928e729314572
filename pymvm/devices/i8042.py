"""Just enough of an i8042 PS/2 controller for Linux: `reboot=k` and a quiet driver probe.

One bus range covers ports 0x60..0x64: offset 0 is the data port, offset 4 the
status (read) / command (write) port. A minimal PS/2 keyboard is attached: it acknowledges
commands, identifies itself (so Linux's atkbd binds at once, without probe timeouts) and
can press Ctrl-Alt-Del (``send_ctrl_alt_del``, Firecracker's SendCtrlAltDel). No mouse.

Linux paths this serves:
- arch/x86/kernel/reboot.c (BOOT_KBD): polls status until IBF is clear, writes 0xFE to 0x64.
- drivers/input/serio/i8042.c probe: flush, read/write the command byte (CTR), self-test,
  AUX loop/test, AUX enable/disable checked through CTR.AUXDIS.
- drivers/input/keyboard/atkbd.c probe: GETID, set LEDs / repeat rate, enable (each byte
  ACKed); then a Ctrl-Alt-Del press reaches the VT keyboard handler, which reboots
  (``ctrl_alt_del()``; with ``reboot=k`` through 0xFE here).

The AUX (mouse) port is reported broken on purpose: its IRQ 12 is not wired, and a working
AUX port makes Linux wait 250 ms for an IRQ 12 delivery test during boot.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import structlog

DATA = 0
STATUS_COMMAND = 4
PORT_COUNT = 5  # 0x60..0x64 inclusive

# Status register.
STR_OBF = 0x01  # output buffer full: a byte waits at the data port
STR_IBF = 0x02  # input buffer full: never, writes are handled synchronously
STR_SYSFLAG = 0x04  # self-test passed
STR_CMDDAT = 0x08  # last write went to the command port
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited (Linux warns "Keylock active" otherwise)
STR_AUXDATA = 0x20

# Command byte (CTR).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3  # Linux's I8042_CMD_AUX_LOOP
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

# Keyboard (PS/2 device) commands and replies; IBM PS/2 technical reference.
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE_SET = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_REPEAT = 0xF3
KBD_CMD_RESET = 0xFF
_KBD_TAKES_PARAMETER = frozenset({KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE_SET, KBD_CMD_SET_REPEAT})
KBD_ID = (0xAB, 0x83)  # MF2 keyboard
KBD_ID_TRANSLATED = (0xAB, 0x41)  # what the controller passes on with CTR.XLATE set

# Ctrl-Alt-Del in scan code set 1 (what the guest gets with CTR.XLATE, Linux's default):
# make left Ctrl, left Alt, Delete (E0-prefixed), then the breaks (make | 0x80) in reverse.
CTRL_ALT_DEL_SET1 = (0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D)
# The same in set 2 for a guest that turned translation off.
CTRL_ALT_DEL_SET2 = (0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14)

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00
INTERFACE_CLOCK_STUCK_HIGH = 0x02

# Commands whose parameter byte follows on the data port.
_TAKES_PARAMETER = frozenset(
    {
        CMD_WRITE_CTR,
        CMD_WRITE_OUTPUT_PORT,
        CMD_WRITE_KBD_OUTBUF,
        CMD_WRITE_AUX_OUTBUF,
        CMD_WRITE_AUX,
    }
)

log = structlog.get_logger()


class I8042:
    """PS/2 controller on ports ``I8042_DATA_PORT``..``I8042_CMD_PORT``; thread-safe."""

    def __init__(
        self, on_reset: Callable[[], None], interrupt: Callable[[], None] | None = None
    ) -> None:
        self._on_reset = on_reset
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._ctr = CTR_KBDINT | CTR_SYSFLAG | CTR_XLATE
        self._output_port = 0x01  # bit 0 high: CPU not held in reset
        self._pending_command: int | None = None
        self._kbd_pending: int | None = None  # keyboard command waiting for its parameter
        self._last_write_command = False
        # (byte, from the AUX port); a real controller holds one, Linux drains it anyway.
        self._outbuf: deque[tuple[int, bool]] = deque(maxlen=32)

    def read(self, offset: int, data: bytearray) -> None:
        fire = False
        with self._lock:
            if offset == DATA:
                value = self._outbuf.popleft()[0] if self._outbuf else 0
                # Linux reads one byte per interrupt: raise it again while bytes wait.
                fire = bool(self._outbuf) and not self._outbuf[0][1] and bool(self._ctr & CTR_KBDINT)
            elif offset == STATUS_COMMAND:
                value = self._status()
            else:
                # 0x61 (system control port B, NMI reason) is KVM's in-kernel PIT speaker
                # port when PIT2 exists; otherwise read 0: "no NMI source".
                value = 0
        data[0] = value
        for i in range(1, len(data)):
            data[i] = 0
        if fire and self._interrupt is not None:
            self._interrupt()

    def send_ctrl_alt_del(self) -> None:
        """Press and release Ctrl-Alt-Del on the keyboard (the guest decides what follows)."""
        with self._lock:
            codes = CTRL_ALT_DEL_SET1 if self._ctr & CTR_XLATE else CTRL_ALT_DEL_SET2
            fire = False
            for code in codes:
                fire = self._reply(code) or fire
            fire = fire and len(self._outbuf) == len(codes)  # else a read re-raises it
        log.info("i8042_ctrl_alt_del", device="i8042")
        if fire and self._interrupt is not None:
            self._interrupt()

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        with self._lock:
            if offset == STATUS_COMMAND:
                reset, fire = self._command(value)
            elif offset == DATA:
                reset, fire = False, self._data(value)
            else:
                reset, fire = False, False
        # Callbacks run without the lock: on_reset may stop vCPUs that are blocked on it.
        if reset:
            log.info("i8042_reset", device="i8042")
            self._on_reset()
        if fire and self._interrupt is not None:
            self._interrupt()

    # -- with self._lock held ---------------------------------------------------------------

    def _status(self) -> int:
        status = STR_KEYLOCK
        if self._ctr & CTR_SYSFLAG:
            status |= STR_SYSFLAG
        if self._last_write_command:
            status |= STR_CMDDAT
        if self._outbuf:
            status |= STR_OBF
            if self._outbuf[0][1]:
                status |= STR_AUXDATA
        return status

    def _reply(self, value: int, aux: bool = False) -> bool:
        """Queue a byte for the data port; returns whether to raise the keyboard IRQ."""
        self._outbuf.append((value, aux))
        return not aux and bool(self._ctr & CTR_KBDINT)

    def _command(self, cmd: int) -> tuple[bool, bool]:
        """Returns (reset the VM, raise the interrupt)."""
        self._last_write_command = True
        self._pending_command = None
        # A new command supersedes an unread reply; Linux flushes before probing anyway.
        self._outbuf.clear()
        if cmd in _TAKES_PARAMETER:
            self._pending_command = cmd
            return False, False
        if cmd == CMD_READ_CTR:
            return False, self._reply(self._ctr)
        if cmd == CMD_SELF_TEST:
            self._ctr |= CTR_SYSFLAG
            return False, self._reply(SELF_TEST_OK)
        if cmd == CMD_KBD_TEST:
            return False, self._reply(INTERFACE_TEST_OK)
        if cmd == CMD_AUX_TEST:
            # Fail it: Linux then gives up on the AUX port without its 250 ms IRQ 12 test.
            return False, self._reply(INTERFACE_CLOCK_STUCK_HIGH)
        if cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUXDIS
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT_PORT:
            return False, self._reply(self._output_port)
        elif cmd == CMD_PULSE_RESET:
            return True, False
        else:
            # 0xF0..0xFD pulse other output lines; the rest are vendor commands.
            log.debug("i8042_unknown_command", device="i8042", command=f"{cmd:#04x}")
        return False, False

    def _data(self, value: int) -> bool:
        """A data-port write: a command parameter, else a byte for the (absent) keyboard."""
        self._last_write_command = False
        cmd, self._pending_command = self._pending_command, None
        if cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            # Bit 0 low would hold the CPU in reset; Linux resets with 0xFE instead.
            self._output_port = value | 0x01
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            return self._reply(value)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            # Echoed without AUXDATA: Linux's AUX loop test fails at once ("auxerr").
            return self._reply(value)
        elif cmd == CMD_WRITE_AUX:
            log.debug("i8042_aux_write_ignored", device="i8042", value=f"{value:#04x}")
        else:
            return self._keyboard(value)
        return False

    def _keyboard(self, value: int) -> bool:
        """A byte for the keyboard: every command and parameter is ACKed; a few answer more."""
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None:  # the parameter of SET_LEDS, SET_REPEAT, SCANCODE_SET
            fire = self._reply(KBD_ACK)
            if pending == KBD_CMD_SCANCODE_SET and value == 0:
                self._reply(2)  # "which set": set 2 (translated to set 1 by XLATE)
            return fire
        if value == KBD_CMD_ECHO:
            return self._reply(KBD_CMD_ECHO)
        fire = self._reply(KBD_ACK)
        if value in _KBD_TAKES_PARAMETER:
            self._kbd_pending = value
        elif value == KBD_CMD_GET_ID:
            for byte in KBD_ID_TRANSLATED if self._ctr & CTR_XLATE else KBD_ID:
                self._reply(byte)
        elif value == KBD_CMD_RESET:
            self._reply(KBD_BAT_OK)
        return fire
