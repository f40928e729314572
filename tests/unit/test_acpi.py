"""ACPI tables (pymvm.boot.acpi): layouts, lengths, checksums, and the AML as ACPICA reads it.

The disassembler checks (`iasl -d`, Debian's acpica-tools, installed by scripts/setup) are
the independent reader: the tables must decompile without errors or checksum complaints
and show the devices and resources pymvm put there.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pymvm import layout
from pymvm.boot import acpi


@dataclass(frozen=True)
class Dev:
    id: str
    kind: str
    mmio_base: int
    mmio_size: int
    irq: int


def virtio_devices(n: int) -> list[Dev]:
    return [Dev(f"net{i}", "virtio-net", layout.VIRTIO_MMIO_START + i * layout.VIRTIO_MMIO_SIZE,
                layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQ_BASE + i) for i in range(n)]


def table_sum(data: bytes) -> int:
    return sum(data) & 0xFF


def check_header(table: bytes, signature: bytes, revision: int) -> None:
    sig, length, rev = struct.unpack_from("<4sIB", table)
    assert sig == signature
    assert length == len(table)
    assert rev == revision
    assert table_sum(table) == 0, f"{signature!r} checksum"
    assert table[10:16] == acpi.OEM_ID


# ---- AML encoder --------------------------------------------------------------------------

@pytest.mark.parametrize("body,encoded", [
    (0, b"\x01"), (0x3E, b"\x3f"),  # one byte up to 63 in all
    (0x3F, bytes([0x40 | 1, 0x04])),  # 0x41 total: two bytes
    (0xFFD, bytes([0x40 | 0xF, 0xFF])),  # 0xFFF total: the largest two-byte length
    (0xFFE, bytes([0x80 | 0x1, 0x00, 0x01])),  # 0x1001 total: three bytes
])
def test_pkg_length_counts_its_own_bytes_and_grows_at_the_spec_limits(body, encoded):
    assert acpi.pkg_length(body) == encoded


def test_integers_use_the_shortest_encoding():
    assert acpi.integer(0) == b"\x00"
    assert acpi.integer(1) == b"\x01"
    assert acpi.integer(5) == b"\x0a\x05"
    assert acpi.integer(0x1234) == b"\x0b\x34\x12"
    assert acpi.integer(0xD0001000) == b"\x0c\x00\x10\x00\xd0"
    assert acpi.integer(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")
    assert acpi.integer((1 << 64) - 1) == b"\xff"
    with pytest.raises(acpi.AcpiError):
        acpi.integer(-1)


def test_eisa_id_of_the_16550_uart_is_the_well_known_value():
    assert acpi.eisa_id("PNP0501") == 0x0105D041
    with pytest.raises(acpi.AcpiError):
        acpi.eisa_id("pnp0501")


def test_name_strings_pad_segments_and_use_prefixes():
    assert acpi.name_string("_S5") == b"_S5_"
    assert acpi.name_string("\\_SB") == b"\\_SB_"
    assert acpi.name_string("\\_SB.V000") == b"\\\x2e_SB_V000"
    assert acpi.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    with pytest.raises(acpi.AcpiError):
        acpi.name_string("0ABC")
    with pytest.raises(acpi.AcpiError):
        acpi.name_string("TOOLONG")


def test_resource_descriptors_have_the_spec_layouts():
    mem = acpi.memory32_fixed(0xD0001000, 0x1000)
    assert mem == struct.pack("<BHBII", 0x86, 9, 1, 0xD0001000, 0x1000)
    irq = acpi.extended_interrupt(5)
    assert irq == bytes([0x89, 6, 0, 0x03, 1]) + (5).to_bytes(4, "little")  # consumer, edge
    assert acpi.extended_interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D
    assert acpi.io_port(0x3F8, 8) == bytes([0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8])
    assert acpi.irq_no_flags(4) == bytes([0x22, 0x10, 0])
    template = acpi.resource_template(mem)
    assert template.endswith(b"\x79\x00")
    assert template[0] == 0x11  # BufferOp


# ---- tables ---------------------------------------------------------------------------------

def test_rsdp_has_both_checksums_and_points_at_the_xsdt():
    rsdp = acpi.build_rsdp(0xE1234)
    assert len(rsdp) == 36
    sig, csum, oem, rev, rsdt, length, xsdt = struct.unpack_from("<8sB6sBIIQ", rsdp)
    assert sig == b"RSD PTR " and rev == 2 and length == 36 and rsdt == 0 and xsdt == 0xE1234
    assert table_sum(rsdp[:20]) == 0
    assert table_sum(rsdp) == 0


def test_fadt_is_hardware_reduced_with_sleep_and_reset_registers():
    fadt = acpi.build_fadt(0xE0040)
    check_header(fadt, b"FACP", 6)
    assert len(fadt) == 276
    flags, = struct.unpack_from("<I", fadt, 112)
    assert flags & acpi.FADT_F_HW_REDUCED_ACPI
    assert flags & acpi.FADT_F_RESET_REG_SUP
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, layout.ACPI_RESET_PORT)
    assert fadt[128] == layout.ACPI_RESET_VALUE
    assert fadt[131] == 5  # minor revision: ACPI 6.5
    assert struct.unpack_from("<Q", fadt, 140)[0] == 0xE0040  # X_DSDT
    assert struct.unpack_from("<I", fadt, 40)[0] == 0  # 32-bit DSDT unused
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)
    # No legacy PM1 blocks: a hardware-reduced OS must not need them.
    assert struct.unpack_from("<8I", fadt, 56) == (0,) * 8


def _madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2
        entries.append((kind, madt[pos:pos + length]))
        pos += length
    assert pos == len(madt), "MADT entries overrun the table"
    return entries


@pytest.mark.parametrize("ncpus", [1, 2, 7])
def test_madt_lists_one_enabled_lapic_per_vcpu_the_ioapic_and_overrides(ncpus):
    madt = acpi.build_madt(ncpus)
    check_header(madt, b"APIC", acpi.MADT_REVISION)
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    entries = _madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == \
        [(i, i, 1) for i in range(ncpus)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic[2] == ncpus and ioapic[4] == layout.IOAPIC_ADDR and ioapic[5] == 0
    overrides = [struct.unpack("<BBBBIH", e) for k, e in entries if k == 2]
    assert {(src, gsi) for _, _, _, src, gsi, _ in overrides} == \
        {(layout.SERIAL_IRQ, layout.SERIAL_IRQ), (layout.I8042_IRQ, layout.I8042_IRQ)}
    assert all(flags == 0b0101 for *_, flags in overrides)  # edge, active high
    assert [k for k, _ in entries].count(4) == 1  # LINT1 NMI


def test_madt_refuses_cpu_counts_it_cannot_describe():
    with pytest.raises(acpi.AcpiError):
        acpi.build_madt(0)
    with pytest.raises(acpi.AcpiError):
        acpi.build_madt(255)


def test_dsdt_describes_com1_and_each_virtio_device_in_order():
    devs = virtio_devices(3)
    dsdt = acpi.build_dsdt(devs)
    check_header(dsdt, b"DSDT", 2)
    assert dsdt.count(b"LNRO0005\0") == 3
    for dev in devs:
        assert acpi.memory32_fixed(dev.mmio_base, dev.mmio_size) in dsdt
        assert acpi.extended_interrupt(dev.irq) in dsdt
    assert dsdt.index(b"V000") < dsdt.index(b"V001") < dsdt.index(b"V002")


def test_tables_sit_in_the_bios_area_and_the_xsdt_lists_fadt_and_madt():
    tables = acpi.build_acpi_tables(2, virtio_devices(2))
    assert tables.rsdp_addr == layout.ACPI_RSDP_ADDR
    assert 0xE0000 <= tables.rsdp_addr and tables.rsdp_addr % 16 == 0  # Linux's scan step
    assert tables.end <= layout.ACPI_TABLES_START + layout.ACPI_TABLES_SIZE <= 0x100000
    by_addr = dict(tables.blobs)
    xsdt_addr = struct.unpack_from("<Q", tables.table(b"RSD PTR "), 24)[0]
    xsdt = by_addr[xsdt_addr]
    check_header(xsdt, b"XSDT", 1)
    listed = [by_addr[a][:4] for a in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)]
    assert listed == [b"FACP", b"APIC"]
    dsdt_addr = struct.unpack_from("<Q", tables.table(b"FACP"), 140)[0]
    assert by_addr[dsdt_addr][:4] == b"DSDT"
    spans = sorted((a, a + len(b)) for a, b in tables.blobs)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "tables overlap"


def test_too_many_devices_for_the_area_is_an_error():
    with pytest.raises(acpi.AcpiError, match="describe fewer devices"):
        acpi.build_acpi_tables(1, virtio_devices(200), size=0x1000)


# ---- ACPICA's disassembler ------------------------------------------------------------------

@pytest.fixture(scope="module")
def iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.fail("iasl not found: install Debian's acpica-tools (scripts/setup does)")
    return path


def disassemble(iasl: str, tmp_path: Path, name: str, table: bytes) -> str:
    src = tmp_path / f"{name}.dat"
    src.write_bytes(table)
    result = subprocess.run([iasl, "-d", str(src)], capture_output=True, text=True, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    dsl = (tmp_path / f"{name}.dsl").read_text()
    for bad in ("Incorrect checksum", "Error", "Unknown", "terminates in the middle"):
        assert bad not in out and bad not in dsl, f"iasl: {bad}\n{out}\n{dsl}"
    return dsl


def test_iasl_flags_a_corrupted_checksum(iasl, tmp_path):
    # The checks below can fail: a table with a wrong checksum is reported.
    bad = bytearray(acpi.build_madt(1))
    bad[9] ^= 0xFF
    (tmp_path / "bad.dat").write_bytes(bad)
    subprocess.run([iasl, "-d", "bad.dat"], capture_output=True, cwd=tmp_path)
    assert "Incorrect checksum" in (tmp_path / "bad.dsl").read_text()


def test_iasl_decompiles_the_dsdt_with_the_devices_and_resources(iasl, tmp_path):
    devs = virtio_devices(3)
    dsl = disassemble(iasl, tmp_path, "dsdt", acpi.build_dsdt(devs))
    assert 'DefinitionBlock ("", "DSDT", 2, "PYMVM ", "MICROVM ", 0x00000001)' in dsl
    assert re.search(r"Name \(_S5, Package \(0x04\)[^{]*\{\s*0x05,", dsl), dsl
    com1 = dsl[dsl.index("Device (COM1)"):dsl.index("Device (V000)")]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s*0x03F8,[^)]*0x08,", com1), com1
    assert re.search(r"IRQNoFlags \(\)\s*\{4\}", com1), com1
    for i, dev in enumerate(devs):
        start = dsl.index(f"Device (V{i:03X})")
        block = dsl[start:dsl.find("Device (", start + 1) if i < 2 else len(dsl)]
        assert 'Name (_HID, "LNRO0005")' in block
        assert f"Name (_UID, {['Zero', 'One', '0x02'][i]})" in block
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s*0x{dev.mmio_base:08X},\s*// Address Base\s*"
                         r"0x00001000,\s*// Address Length", block), block
        assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in block
        assert f"0x{dev.irq:08X}," in block


def test_iasl_decodes_the_fadt_madt_and_xsdt_fields(iasl, tmp_path):
    tables = acpi.build_acpi_tables(2, virtio_devices(1))
    fadt = disassemble(iasl, tmp_path, "facp", tables.table(b"FACP"))
    assert re.search(r"Hardware Reduced \(V5\) : 1", fadt)
    assert re.search(r"Reset Register Supported \(V2\) : 1", fadt)
    assert re.search(r"Value to cause reset : 01", fadt)
    assert re.search(rf"DSDT Address : {tables.blobs[1][0]:016X}", fadt)
    for register, port in (("Sleep Control Register", layout.ACPI_SLEEP_CONTROL_PORT),
                           ("Sleep Status Register", layout.ACPI_SLEEP_STATUS_PORT),
                           ("Reset Register", layout.ACPI_RESET_PORT)):
        block = fadt[fadt.index(register):]
        assert re.search(rf"Space ID : 01 \[SystemIO\].*?Address : {port:016X}", block, re.S), block[:600]
    madt = disassemble(iasl, tmp_path, "apic", tables.table(b"APIC"))
    assert madt.count("[Processor Local APIC]") == 2
    assert "Local Apic ID : 01" in madt
    assert "[I/O APIC]" in madt and "Address : FEC00000" in madt
    assert "I/O Apic ID : 02" in madt
    assert madt.count("[Interrupt Source Override]") == 2
    assert "[Local APIC NMI]" in madt
    xsdt = disassemble(iasl, tmp_path, "xsdt", tables.table(b"XSDT"))
    assert len(re.findall(r"ACPI Table Address +\d+ : ", xsdt)) == 2


# ---- "auto": does the kernel support ACPI? ------------------------------------------------------

def test_kernel_with_the_rsdp_signature_supports_acpi(tmp_path):
    with_acpi = tmp_path / "vmlinux-acpi"
    with_acpi.write_bytes(b"\x7fELF" + bytes(5000) + b"RSD PTR " + bytes(100))
    without = tmp_path / "vmlinux-plain"
    without.write_bytes(b"\x7fELF" + bytes(5000) + b"RSD PTX " + bytes(100))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert acpi.kernel_supports_acpi(with_acpi)
    assert not acpi.kernel_supports_acpi(without)
    assert not acpi.kernel_supports_acpi(empty)
    assert acpi.resolve_acpi("auto", with_acpi) is True
    assert acpi.resolve_acpi("auto", without) is False
    assert acpi.resolve_acpi(True, without) is True
    assert acpi.resolve_acpi(False, with_acpi) is False


def synthetic_bzimage(signature_at: int | None, payload_length: int = 0x1000) -> bytes:
    """A bzImage header (boot.rst offsets) whose compressed payload is [0x500, 0x1500)."""
    image = bytearray(0x3000)
    image[0x1F1] = 1  # setup_sects: protected-mode code at (1 + 1) * 512 = 0x400
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")
    image[0x248:0x24C] = (0x100).to_bytes(4, "little")  # payload_offset, from 0x400
    image[0x24C:0x250] = payload_length.to_bytes(4, "little")
    if signature_at is not None:
        image[signature_at:signature_at + 8] = acpi.RSDP_SIGNATURE
    return bytes(image)


@pytest.mark.parametrize(("signature_at", "payload_length", "supports"), [
    (0x800, 0x1000, False),   # inside the compressed payload: chance, not ACPI
    (0x1500, 0x1000, True),   # right after it: the decompressor's own RSDP search
    (0x2FF8, 0x1000, True),   # at the very end of the file
    (0x300, 0x1000, True),    # in the setup code
    (0x4FC, 0x1000, False),   # straddling the payload's start
    (None, 0x1000, False),
    (0x800, 0x3000, True),    # payload past the end of the file: the whole file is searched
])
def test_a_bzimage_is_searched_outside_its_compressed_payload(tmp_path, signature_at,
                                                              payload_length, supports):
    image = tmp_path / "bzImage"
    image.write_bytes(synthetic_bzimage(signature_at, payload_length))
    assert acpi.kernel_supports_acpi(image) is supports
    if payload_length == 0x1000:
        assert acpi.bzimage_payload(image.read_bytes()) == (0x500, 0x1500)
    else:
        assert acpi.bzimage_payload(image.read_bytes()) is None


@pytest.mark.parametrize("image", sorted(Path("/boot").glob("vmlinuz-*")) or [None])
def test_the_hosts_stock_kernel_is_detected_as_acpi_capable(image):
    if image is None:
        pytest.skip("no /boot/vmlinuz-* on this host (Debian's linux-image-amd64 has one)")
    assert acpi.kernel_supports_acpi(image)


def test_auto_tells_pymvms_two_kernels_apart_in_both_formats():
    from pymvm.images.kernel import kernel_status

    plain, with_acpi = kernel_status(), kernel_status(acpi=True)
    if plain is None and with_acpi is None:
        pytest.skip("no pymvm kernel built here (pymvm build-kernel [--acpi]; scripts/setup does)")
    if plain is not None:
        assert not acpi.kernel_supports_acpi(plain.vmlinux)
        assert not acpi.kernel_supports_acpi(plain.bzimage)
    if with_acpi is not None:
        assert acpi.kernel_supports_acpi(with_acpi.vmlinux)
        assert acpi.kernel_supports_acpi(with_acpi.bzimage)
