"""The FADT's sleep control and reset registers (pymvm.devices.acpi_pm) end the VM."""

from __future__ import annotations

import pytest

from pymvm import layout
from pymvm.boot import acpi
from pymvm.devices.acpi_pm import RESET, SLEEP_CONTROL, SLEEP_STATUS, AcpiPmDevice
from pymvm.devices.bus import Bus


@pytest.fixture
def pm():
    calls: list[str] = []
    dev = AcpiPmDevice(lambda: calls.append("off"), lambda: calls.append("reset"))
    bus = Bus("pio")
    bus.insert(dev, layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT, "acpi-pm")
    return bus, calls


def test_s5_with_sleep_enable_powers_off(pm):
    bus, calls = pm
    # What ACPICA's acpi_hw_extended_sleep writes for \_S5 (SLP_TYP 5): (5 << 2) | SLP_EN.
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, bytes([(acpi.SLEEP_TYPE_S5 << 2) | 0x20]))
    assert calls == ["off"]


def test_sleep_type_without_sleep_enable_does_nothing(pm):
    bus, calls = pm
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, bytes([acpi.SLEEP_TYPE_S5 << 2]))
    assert calls == []


def test_other_sleep_states_are_ignored(pm):
    bus, calls = pm
    bus.write(layout.ACPI_SLEEP_CONTROL_PORT, bytes([(3 << 2) | 0x20]))  # S3
    assert calls == []


def test_reset_register_with_the_fadt_value_resets(pm):
    bus, calls = pm
    bus.write(layout.ACPI_RESET_PORT, bytes([layout.ACPI_RESET_VALUE]))
    assert calls == ["reset"]
    bus.write(layout.ACPI_RESET_PORT, bytes([0x42]))  # not the reset value
    assert calls == ["reset"]


def test_sleep_status_reads_zero_and_accepts_the_wake_status_clear(pm):
    bus, calls = pm
    bus.write(layout.ACPI_SLEEP_STATUS_PORT, b"\x80")  # WAK_STS clear, before sleeping
    data = bytearray(b"\xff")
    assert bus.read(layout.ACPI_SLEEP_STATUS_PORT, data)
    assert data == b"\x00" and calls == []


def test_register_offsets_match_the_fadt():
    fadt = acpi.build_fadt(0)
    ports = {fadt[120] | fadt[121] << 8: "reset", fadt[248] | fadt[249] << 8: "control",
             fadt[260] | fadt[261] << 8: "status"}
    assert ports == {layout.ACPI_PM_PORT + RESET: "reset",
                     layout.ACPI_PM_PORT + SLEEP_CONTROL: "control",
                     layout.ACPI_PM_PORT + SLEEP_STATUS: "status"}
