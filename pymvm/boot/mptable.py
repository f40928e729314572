"""Intel MultiProcessor Specification 1.4 tables.

Without ACPI, an SMP Linux guest finds its CPUs, its IOAPIC and the routing of ISA
interrupts from these tables; it scans the last KiB of base memory (639 KiB), where
``MPTABLE_START`` puts the floating pointer.
"""

from __future__ import annotations

import struct

from .. import layout

MP_SPEC_REV = 4  # 1.4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 0x1
CPU_BOOTPROCESSOR = 0x2
CPU_SIGNATURE = 0x600  # family 6, as a placeholder: Linux uses CPUID, not this
CPU_FEATURES = 0x201  # FPU | APIC
ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINTR, ENTRY_LOCALINTR = range(5)
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = range(4)
IOAPIC_PINS = 24
MAX_CPUS = 254  # APIC ids are 8-bit; the IOAPIC takes the id after the last CPU


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build_mptable(ncpus: int, base: int = layout.MPTABLE_START) -> bytes:
    """Return the floating pointer followed by the configuration table, for address ``base``."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise ValueError(f"MP table supports 1..{MAX_CPUS} CPUs, got {ncpus}")
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", ENTRY_PROCESSOR, cpu, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    for irq in range(IOAPIC_PINS):
        # flags 0: polarity and trigger "conform to the bus" (ISA: edge, active high).
        entries.append(struct.pack("<BBHBBBB", ENTRY_IOINTR, INT_TYPE_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCALINTR, INT_TYPE_EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCALINTR, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)

    header_len = 44
    table_addr = base + 16
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", header_len + len(body), MP_SPEC_REV, 0,
                         b"PYMVM   ", b"MICROVM     ", 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0)
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))

    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, MP_SPEC_REV, 0, bytes(5)))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(table)
