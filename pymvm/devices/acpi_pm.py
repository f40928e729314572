"""The FADT's hardware-reduced power registers (ACPI 6.5, 4.8.3.7): sleep control, sleep
status and reset, one byte each on consecutive ports from ``layout.ACPI_PM_PORT``.

Linux's `poweroff` evaluates \\_S5 and writes SLP_TYP (bits 4:2) with SLP_EN (bit 5) to
the sleep control register (ACPICA hwxfsleep.c, acpi_hw_extended_sleep): SLP_TYP 5 (the
value pymvm.boot.acpi puts in \\_S5) powers the machine off. `reboot` with the default
`reboot=acpi` writes the FADT's reset value to the reset register. Either ends the VM
through a callback; the sleep status register reads 0 (never "woken").
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from .. import layout
from ..boot.acpi import SLEEP_TYPE_S5

SLEEP_CONTROL = layout.ACPI_SLEEP_CONTROL_PORT - layout.ACPI_PM_PORT
SLEEP_STATUS = layout.ACPI_SLEEP_STATUS_PORT - layout.ACPI_PM_PORT
RESET = layout.ACPI_RESET_PORT - layout.ACPI_PM_PORT
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5

log = structlog.get_logger()


class AcpiPmDevice:
    """PIO device: S5 through the sleep control register calls ``on_power_off``, the reset
    value in the reset register calls ``on_reset``. Other sleep states are not offered
    (no \\_S1-\\_S4 in the DSDT) and are ignored."""

    def __init__(self, on_power_off: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_power_off = on_power_off
        self._on_reset = on_reset

    def read(self, offset: int, data: bytearray) -> None:
        for i in range(len(data)):
            data[i] = 0

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == SLEEP_CONTROL:
            if not value & SLP_EN:
                return
            sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if sleep_type == SLEEP_TYPE_S5:
                log.info("acpi_power_off", device="acpi-pm")
                self._on_power_off()
            else:
                log.warning("acpi_sleep_state_ignored", device="acpi-pm", sleep_type=sleep_type)
        elif offset == RESET:
            if value == layout.ACPI_RESET_VALUE:
                log.info("acpi_reset", device="acpi-pm")
                self._on_reset()
        # SLEEP_STATUS: the OS writes WAK_STS to clear it; there is nothing to clear.
