import pytest

from pymvm.devices import i8042 as k
from pymvm.devices.bus import Bus
from pymvm.layout import I8042_CMD_PORT, I8042_DATA_PORT


class Kbc:
    def __init__(self) -> None:
        self.resets = 0
        self.irqs = 0
        self.dev = k.I8042(self._reset, self._irq)
        self.bus = Bus("pio")
        self.bus.insert(self.dev, I8042_DATA_PORT, k.PORT_COUNT, "i8042")

    def _reset(self) -> None:
        self.resets += 1

    def _irq(self) -> None:
        self.irqs += 1

    def inb(self, port: int) -> int:
        data = bytearray(1)
        assert self.bus.read(port, data)
        return data[0]

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, bytes([value]))

    def command(self, cmd: int, param: int | None = None) -> int | None:
        """Linux's i8042_command(): wait IBF clear, write, param, read one reply if OBF."""
        assert self.inb(I8042_CMD_PORT) & k.STR_IBF == 0
        self.outb(I8042_CMD_PORT, cmd)
        if param is not None:
            self.outb(I8042_DATA_PORT, param)
        if self.inb(I8042_CMD_PORT) & k.STR_OBF:
            return self.inb(I8042_DATA_PORT)
        return None


@pytest.fixture
def kbc() -> Kbc:
    return Kbc()


def test_one_range_spans_ports_0x60_to_0x64(kbc: Kbc) -> None:
    assert kbc.bus.lookup(0x60) is not None
    assert kbc.bus.lookup(0x64) is not None
    assert kbc.bus.lookup(0x65) is None


def test_linux_reboot_k_path_triggers_reset(kbc: Kbc) -> None:
    # arch/x86/kernel/reboot.c: kb_wait() polls for IBF clear, then writes 0xFE.
    for _ in range(0x10000):
        if kbc.inb(I8042_CMD_PORT) & k.STR_IBF == 0:
            break
    else:
        pytest.fail("input buffer never empties")
    kbc.outb(I8042_CMD_PORT, 0xFE)
    assert kbc.resets == 1


def test_fe_written_to_data_port_does_not_reset(kbc: Kbc) -> None:
    kbc.outb(I8042_DATA_PORT, 0xFE)
    assert kbc.resets == 0


def test_self_test_replies_0x55(kbc: Kbc) -> None:
    assert kbc.command(k.CMD_SELF_TEST) == 0x55


def test_keyboard_interface_test_replies_ok(kbc: Kbc) -> None:
    assert kbc.command(k.CMD_KBD_TEST) == 0x00


def test_aux_interface_test_fails_so_linux_skips_the_aux_irq_test(kbc: Kbc) -> None:
    reply = kbc.command(k.CMD_AUX_TEST)
    assert reply not in (0x00, 0xFA, 0xFF)  # Linux's "AUX port works" answers


def test_aux_loop_reply_lacks_auxdata(kbc: Kbc) -> None:
    kbc.outb(I8042_CMD_PORT, k.CMD_WRITE_AUX_OUTBUF)
    kbc.outb(I8042_DATA_PORT, 0x5A)
    status = kbc.inb(I8042_CMD_PORT)
    assert status & k.STR_OBF
    assert not status & k.STR_AUXDATA


def test_command_byte_reads_back_what_was_written(kbc: Kbc) -> None:
    first = kbc.command(k.CMD_READ_CTR)
    second = kbc.command(k.CMD_READ_CTR)
    assert first == second  # Linux reads it twice and wants a stable value
    assert kbc.command(k.CMD_WRITE_CTR, 0x65) is None
    assert kbc.command(k.CMD_READ_CTR) == 0x65


def test_port_disable_enable_toggle_ctr_bits(kbc: Kbc) -> None:
    kbc.command(k.CMD_AUX_DISABLE)
    assert kbc.command(k.CMD_READ_CTR) & k.CTR_AUXDIS
    kbc.command(k.CMD_AUX_ENABLE)
    assert not kbc.command(k.CMD_READ_CTR) & k.CTR_AUXDIS
    kbc.command(k.CMD_KBD_DISABLE)
    assert kbc.command(k.CMD_READ_CTR) & k.CTR_KBDDIS
    kbc.command(k.CMD_KBD_ENABLE)
    assert not kbc.command(k.CMD_READ_CTR) & k.CTR_KBDDIS


def test_status_has_obf_only_while_reply_pending(kbc: Kbc) -> None:
    assert not kbc.inb(I8042_CMD_PORT) & k.STR_OBF
    kbc.outb(I8042_CMD_PORT, k.CMD_SELF_TEST)
    assert kbc.inb(I8042_CMD_PORT) & k.STR_OBF
    kbc.inb(I8042_DATA_PORT)
    assert not kbc.inb(I8042_CMD_PORT) & k.STR_OBF


def test_status_reports_keylock_off_so_linux_does_not_warn(kbc: Kbc) -> None:
    assert kbc.inb(I8042_CMD_PORT) & k.STR_KEYLOCK


def test_reply_raises_interrupt_only_with_kbdint(kbc: Kbc) -> None:
    kbc.command(k.CMD_WRITE_CTR, k.CTR_SYSFLAG)
    irqs = kbc.irqs
    kbc.command(k.CMD_SELF_TEST)
    assert kbc.irqs == irqs
    kbc.command(k.CMD_WRITE_CTR, k.CTR_SYSFLAG | k.CTR_KBDINT)
    kbc.command(k.CMD_SELF_TEST)
    assert kbc.irqs == irqs + 1


def test_unknown_command_is_ignored(kbc: Kbc) -> None:
    assert kbc.command(0xC0 + 0x0B) is None
    assert kbc.resets == 0
    assert kbc.command(k.CMD_SELF_TEST) == 0x55


def read_all(kbc: Kbc) -> list[int]:
    """Drain the output buffer as Linux's i8042 interrupt handler does, one byte at a time."""
    out = []
    while kbc.inb(I8042_CMD_PORT) & k.STR_OBF:
        out.append(kbc.inb(I8042_DATA_PORT))
    return out


def test_keyboard_get_id_answers_ack_and_the_translated_mf2_id(kbc: Kbc) -> None:
    kbc.outb(I8042_DATA_PORT, k.KBD_CMD_GET_ID)  # atkbd_probe()
    assert read_all(kbc) == [k.KBD_ACK, 0xAB, 0x41]


def test_keyboard_get_id_without_translation_answers_the_raw_id(kbc: Kbc) -> None:
    kbc.command(k.CMD_WRITE_CTR, k.CTR_SYSFLAG | k.CTR_KBDINT)  # XLATE off
    kbc.outb(I8042_DATA_PORT, k.KBD_CMD_GET_ID)
    assert read_all(kbc) == [k.KBD_ACK, 0xAB, 0x83]


def test_keyboard_acks_commands_and_their_parameters(kbc: Kbc) -> None:
    for byte in (k.KBD_CMD_SET_LEDS, 0x00, k.KBD_CMD_SET_REPEAT, 0x20, 0xF4):
        kbc.outb(I8042_DATA_PORT, byte)
        assert read_all(kbc) == [k.KBD_ACK]
    kbc.outb(I8042_DATA_PORT, k.KBD_CMD_RESET)
    assert read_all(kbc) == [k.KBD_ACK, k.KBD_BAT_OK]
    kbc.outb(I8042_DATA_PORT, k.KBD_CMD_ECHO)
    assert read_all(kbc) == [k.KBD_CMD_ECHO]


def test_ctrl_alt_del_queues_set1_press_and_release_with_one_interrupt_per_byte(kbc: Kbc) -> None:
    irqs = kbc.irqs
    kbc.dev.send_ctrl_alt_del()
    assert kbc.irqs == irqs + 1  # for the first byte
    assert read_all(kbc) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert kbc.irqs == irqs + 8  # each read re-raises while bytes remain
    assert kbc.resets == 0  # the guest reboots, not the device


def test_ctrl_alt_del_uses_set2_when_the_guest_turned_translation_off(kbc: Kbc) -> None:
    kbc.command(k.CMD_WRITE_CTR, k.CTR_SYSFLAG | k.CTR_KBDINT)
    kbc.dev.send_ctrl_alt_del()
    assert read_all(kbc) == list(k.CTRL_ALT_DEL_SET2)


def test_interrupt_is_optional() -> None:
    dev = k.I8042(lambda: None)
    dev.write(k.STATUS_COMMAND, bytes([k.CMD_SELF_TEST]))
    data = bytearray(1)
    dev.read(k.DATA, data)
    assert data[0] == 0x55
