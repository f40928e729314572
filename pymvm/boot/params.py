"""boot_params (the "zero page"), the e820 map and the kernel command line."""

from __future__ import annotations

from collections.abc import Sequence

from .. import layout
from ..memory import GuestMemory
from ..record import FrozenRecord
from ._bootparam_cffi import ffi, lib
from .loader import BootError, LoadedInitrd, LoadedKernel

E820_RAM = lib.PYMVM_E820_RAM
E820_RESERVED = lib.PYMVM_E820_RESERVED
BOOT_FLAG = 0xAA55
LOADER_TYPE_UNDEFINED = 0xFF  # "no registered loader id" (boot.rst)


class E820Entry(FrozenRecord):
    """One entry of the guest's e820 memory map."""

    __slots__ = ("addr", "size", "type")
    addr: int
    size: int
    type: int

    def __init__(self, addr: int, size: int, type: int) -> None:
        self._init(addr, size, type)


def e820_map(mem: GuestMemory, reserved: Sequence[tuple[int, int]] = ()) -> list[E820Entry]:
    """RAM below the EBDA, the ``reserved`` (addr, size) ranges (the ACPI tables' area,
    between the EBDA and 1 MiB), RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB."""
    entries = [E820Entry(0, layout.EBDA_START, E820_RAM)]
    entries += [E820Entry(addr, size, E820_RESERVED) for addr, size in sorted(reserved)]
    for region in mem.regions:
        start = max(region.gpa, layout.HIMEM_START)
        if region.end > start:
            entries.append(E820Entry(start, region.end - start, E820_RAM))
    return entries


def build_boot_params(
    mem: GuestMemory,
    kernel: LoadedKernel,
    cmdline: bytes,
    initrd: LoadedInitrd | None = None,
    reserved: Sequence[tuple[int, int]] = (),
) -> bytes:
    """Return the 4 KiB zero page for ``kernel`` (written to ZERO_PAGE_START by the caller)."""
    if len(cmdline) + 1 > layout.CMDLINE_MAX_SIZE:
        raise BootError(f"kernel command line is {len(cmdline)} bytes, the maximum is {layout.CMDLINE_MAX_SIZE - 1}")
    params = ffi.new("struct boot_params *")
    if kernel.setup_header is not None:
        # Start from the image's own header, as the boot protocol asks of loaders.
        hdr_bytes = ffi.buffer(ffi.addressof(params.hdr))
        hdr_bytes[0:len(kernel.setup_header)] = kernel.setup_header
        if kernel.setup_header and params.hdr.cmdline_size and len(cmdline) > params.hdr.cmdline_size:
            raise BootError(
                f"kernel command line is {len(cmdline)} bytes, this kernel accepts {params.hdr.cmdline_size}")
    else:
        params.hdr.boot_flag = BOOT_FLAG
        params.hdr.header = int.from_bytes(b"HdrS", "little")
        params.hdr.kernel_alignment = 0x01000000
    hdr = params.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= lib.LOADED_HIGH | lib.CAN_USE_HEAP
    hdr.heap_end_ptr = 0xFE00
    hdr.cmd_line_ptr = layout.CMDLINE_START
    hdr.cmdline_size = len(cmdline)
    if initrd is not None:
        hdr.ramdisk_image = initrd.addr & 0xFFFFFFFF
        hdr.ramdisk_size = initrd.size & 0xFFFFFFFF
        params.ext_ramdisk_image = initrd.addr >> 32
        params.ext_ramdisk_size = initrd.size >> 32
    entries = e820_map(mem, reserved)
    if len(entries) > lib.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError("too many e820 entries")
    for i, entry in enumerate(entries):
        params.e820_table[i].addr = entry.addr
        params.e820_table[i].size = entry.size
        params.e820_table[i].type = entry.type
    params.e820_entries = len(entries)
    return bytes(ffi.buffer(params))


def write_boot_data(mem: GuestMemory, kernel: LoadedKernel, cmdline: str,
                    initrd: LoadedInitrd | None,
                    reserved: Sequence[tuple[int, int]] = ()) -> None:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL byte")
    zero_page = build_boot_params(mem, kernel, raw, initrd, reserved)
    mem.write(layout.CMDLINE_START, raw + b"\0")
    mem.write(layout.ZERO_PAGE_START, zero_page)
