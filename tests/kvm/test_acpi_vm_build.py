"""A VirtualMachine built on this host's KVM writes ACPI tables or the MP table, per
`[boot] acpi` and the kernel image, and wires the power registers (no guest runs)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pymvm import layout
from pymvm.boot import acpi
from pymvm.config import load_config
from pymvm.vmm import VirtualMachine
from tests.unit.test_boot import make_elf

ENTRY = 0x1000000


def kernel_file(tmp_path: Path, *, with_acpi: bool) -> Path:
    # A stand-in vmlinux: one segment; ACPI support shows as ACPICA's RSDP signature.
    text = b"\xf4" + (b"RSD PTR " if with_acpi else b"no tables")
    path = tmp_path / ("vmlinux-acpi" if with_acpi else "vmlinux")
    path.write_bytes(make_elf([(ENTRY, text, len(text))], ENTRY))
    return path


def build(tmp_path: Path, kernel: Path, acpi_line: str = "", vcpus: int = 2) -> VirtualMachine:
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nvcpus = {vcpus}\nmemory_mib = 64\n[boot]\nkernel = "{kernel}"\n'
                      f'cmdline = "console=ttyS0"\n{acpi_line}\n[serial]\noutput = "none"\n')
    return VirtualMachine(load_config(config))


def e820(vm: VirtualMachine) -> list[tuple[int, int, int]]:
    zero = vm.machine.memory.read(layout.ZERO_PAGE_START, 4096)
    count = zero[0x1E8]
    return [struct.unpack_from("<QQI", zero, 0x2D0 + 20 * i) for i in range(count)]


def test_auto_with_an_acpi_kernel_writes_acpi_tables_and_no_mp_table(tmp_path):
    vm = build(tmp_path, kernel_file(tmp_path, with_acpi=True))
    try:
        mem = vm.machine.memory
        assert vm.acpi
        rsdp = mem.read(layout.ACPI_RSDP_ADDR, 36)
        assert rsdp[:8] == b"RSD PTR " and sum(rsdp) & 0xFF == 0
        xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
        xsdt_len = struct.unpack_from("<I", mem.read(xsdt_addr, 8), 4)[0]
        xsdt = mem.read(xsdt_addr, xsdt_len)
        assert xsdt[:4] == b"XSDT" and sum(xsdt) & 0xFF == 0
        madt_addr = struct.unpack_from("<Q", xsdt, 44)[0]
        madt = mem.read(madt_addr, struct.unpack_from("<I", mem.read(madt_addr, 8), 4)[0])
        assert madt == acpi.build_madt(2)
        assert mem.read(layout.MPTABLE_START, 4) != b"_MP_"
        assert (layout.ACPI_TABLES_START, layout.ACPI_TABLES_SIZE, 2) in e820(vm)
        assert "acpi-pm" in [r.name for r in vm.machine.pio_bus.ranges()]
    finally:
        vm.close()


@pytest.mark.parametrize("with_acpi,line", [(False, ""), (True, "acpi = false")])
def test_without_acpi_the_mp_table_is_written_and_no_rsdp(tmp_path, with_acpi, line):
    vm = build(tmp_path, kernel_file(tmp_path, with_acpi=with_acpi), line)
    try:
        mem = vm.machine.memory
        assert not vm.acpi
        assert mem.read(layout.MPTABLE_START, 4) == b"_MP_"
        assert mem.read(layout.ACPI_RSDP_ADDR, 8) != b"RSD PTR "
        assert all(kind != 2 for *_, kind in e820(vm))
        assert "acpi-pm" not in [r.name for r in vm.machine.pio_bus.ranges()]
    finally:
        vm.close()


def test_forced_acpi_on_a_kernel_without_the_signature_writes_the_tables(tmp_path):
    vm = build(tmp_path, kernel_file(tmp_path, with_acpi=False), "acpi = true")
    try:
        assert vm.acpi
        assert vm.machine.memory.read(layout.ACPI_RSDP_ADDR, 8) == b"RSD PTR "
    finally:
        vm.close()


def test_power_off_through_the_sleep_control_register_stops_the_machine_with_status_0(tmp_path):
    vm = build(tmp_path, kernel_file(tmp_path, with_acpi=True))
    try:
        vm.machine.pio_bus.write(layout.ACPI_SLEEP_CONTROL_PORT, bytes([(acpi.SLEEP_TYPE_S5 << 2) | 0x20]))
        reason = vm.machine.stop_reason
        assert reason is not None and reason.kind.value == "guest-shutdown" and reason.exit_status == 0
    finally:
        vm.close()


def test_acpi_reset_register_stops_the_machine_as_a_reset(tmp_path):
    vm = build(tmp_path, kernel_file(tmp_path, with_acpi=True))
    try:
        vm.machine.pio_bus.write(layout.ACPI_RESET_PORT, bytes([layout.ACPI_RESET_VALUE]))
        reason = vm.machine.stop_reason
        assert reason is not None and reason.kind.value == "guest-reset" and reason.exit_status == 0
    finally:
        vm.close()
