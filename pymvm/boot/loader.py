"""Kernel loaders: uncompressed ELF ``vmlinux`` and ``bzImage`` (Linux x86 boot protocol).

Both produce a 64-bit entry point that the BSP jumps to in long mode with %rsi pointing
at boot_params (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

from .. import layout
from ..memory import GuestMemory, GuestMemoryError
from ..record import FrozenRecord
from ._bootparam_cffi import ffi, lib


class BootError(Exception):
    """The kernel or initrd cannot be loaded."""


ELF_MAGIC = b"\x7fELF"
BZIMAGE_MAGIC = b"HdrS"
HDR_OFFSET = lib.PYMVM_SETUP_HEADER_OFFSET  # 0x1f1, from <asm/bootparam.h>
_HDR_MAGIC_OFFSET = HDR_OFFSET + ffi.offsetof("struct setup_header", "header")
_HDR_SIZE = ffi.sizeof("struct setup_header")
_BZIMAGE_HEAD = 4096  # read first: the setup header (and an ELF's magic) lie within
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags and the 64-bit entry point
PT_LOAD = 1
EM_X86_64 = 62


class LoadedKernel(FrozenRecord):
    """Where a kernel image was loaded into guest memory, and how to enter it."""

    __slots__ = ("kind", "entry", "start", "end", "setup_header")
    kind: str  # "elf" or "bzimage"
    entry: int  # guest-physical 64-bit entry point
    start: int  # lowest guest-physical byte used
    end: int  # one past the highest guest-physical byte used (incl. bss / init_size)
    setup_header: bytes | None  # the bzImage's setup header, copied into boot_params

    def __init__(self, kind: str, entry: int, start: int, end: int, setup_header: bytes | None) -> None:
        self._init(kind, entry, start, end, setup_header)


def kernel_kind(data: bytes) -> str | None:
    if data[:4] == ELF_MAGIC:
        return "elf"
    if data[_HDR_MAGIC_OFFSET:_HDR_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC:
        return "bzimage"
    return None


def load_kernel(mem: GuestMemory, path: Path) -> LoadedKernel:
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = os.pread(f.fileno(), _BZIMAGE_HEAD, 0)
            if kernel_kind(head) == "bzimage":
                # Its payload goes from the file into guest RAM (GuestMemory.load_file): no
                # copies of the whole image on the VMM's heap (issue 15).
                def load_payload(addr: int, offset: int, length: int) -> None:
                    if mem.load_file(addr, f.fileno(), offset, length) != length:
                        raise BootError(f"{path}: kernel shrank while it was read: try again")

                return _load_bzimage(mem, head, size, load_payload, str(path))
            data = f.read()  # an ELF vmlinux: its segments lie all over the file
    except OSError as e:
        raise BootError(f"{path}: cannot read kernel: {e.strerror}") from None
    kind = kernel_kind(data)
    if kind == "elf":
        return load_elf(mem, data, str(path))
    raise BootError(f"{path}: not a kernel: neither an ELF vmlinux nor a bzImage (no 'HdrS' at {_HDR_MAGIC_OFFSET:#x})")


def load_elf(mem: GuestMemory, data: bytes, name: str = "kernel") -> LoadedKernel:
    if len(data) < 64:
        raise BootError(f"{name}: truncated ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_class != 2 or ei_data != 1:
        raise BootError(f"{name}: not a 64-bit little-endian ELF (x86_64 vmlinux expected)")
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    if e_machine != EM_X86_64:
        raise BootError(f"{name}: ELF machine {e_machine} is not x86_64")
    if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name}: truncated ELF program headers")
    start, end, loaded = None, 0, 0
    for i in range(e_phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise BootError(f"{name}: ELF segment {i} is truncated or larger in file than in memory")
        if p_paddr < layout.HIMEM_START:
            raise BootError(f"{name}: ELF segment {i} loads at {p_paddr:#x}, below {layout.HIMEM_START:#x}")
        try:
            dst = mem.view(p_paddr, p_memsz)
        except GuestMemoryError:
            raise BootError(
                f"{name}: ELF segment {i} [{p_paddr:#x}, {p_paddr + p_memsz:#x}) does not fit in guest RAM "
                "(give the VM more memory)") from None
        dst[:p_filesz] = data[p_offset:p_offset + p_filesz]
        dst[p_filesz:] = bytes(p_memsz - p_filesz)
        start = p_paddr if start is None else min(start, p_paddr)
        end = max(end, p_paddr + p_memsz)
        loaded += 1
    if not loaded:
        raise BootError(f"{name}: ELF has no loadable segments")
    # vmlinux's e_entry is the physical address of startup_64 (ENTRY(phys_startup_64)).
    if not (start <= e_entry < end):
        raise BootError(f"{name}: ELF entry point {e_entry:#x} is outside its loaded segments")
    return LoadedKernel("elf", e_entry, start, end, None)


def load_bzimage(mem: GuestMemory, data: bytes, name: str = "kernel") -> LoadedKernel:
    def load_payload(addr: int, offset: int, length: int) -> None:
        mem.write(addr, memoryview(data)[offset:offset + length])

    return _load_bzimage(mem, data, len(data), load_payload, name)


def _load_bzimage(mem: GuestMemory, data: bytes, size: int,
                  load_payload: Callable[[int, int, int], None], name: str) -> LoadedKernel:
    """``data``: the image's first bytes at least (its setup header); ``size``: the whole
    image's; ``load_payload(addr, offset, length)`` copies that part of it to guest RAM."""
    if size < HDR_OFFSET + _HDR_SIZE:
        raise BootError(f"{name}: truncated bzImage header")
    hdr = ffi.new("struct setup_header *")
    ffi.memmove(hdr, data[HDR_OFFSET:HDR_OFFSET + _HDR_SIZE], _HDR_SIZE)
    if hdr.version < MIN_BOOT_PROTOCOL:
        raise BootError(
            f"{name}: boot protocol {hdr.version >> 8}.{hdr.version & 0xff} is too old "
            "(2.12 or newer is needed for the 64-bit entry point)")
    if not hdr.xloadflags & lib.XLF_KERNEL_64:
        raise BootError(f"{name}: bzImage has no 64-bit entry point (XLF_KERNEL_64 clear): build a 64-bit kernel")
    setup_sects = hdr.setup_sects or 4
    payload_off = (setup_sects + 1) * 512
    if payload_off >= size:
        raise BootError(f"{name}: truncated bzImage: no protected-mode kernel after the setup code")
    payload_size = size - payload_off
    load_addr = hdr.pref_address if hdr.relocatable_kernel else hdr.code32_start
    align = hdr.kernel_alignment or 0x200000
    if hdr.relocatable_kernel and load_addr % align:
        load_addr = (load_addr + align - 1) // align * align
    # The decompressor works in place: reserve init_size bytes, not just the payload.
    span = max(payload_size, hdr.init_size)
    try:
        mem.view(load_addr, span)
        load_payload(load_addr, payload_off, payload_size)
    except GuestMemoryError:
        raise BootError(
            f"{name}: kernel needs [{load_addr:#x}, {load_addr + span:#x}) which does not fit in guest RAM "
            "(give the VM more memory)") from None
    # The setup header's own length is given by the jump at 0x200 (byte 0x201 + 0x202).
    hdr_end = min(0x202 + data[0x201], HDR_OFFSET + _HDR_SIZE)
    setup_header = data[HDR_OFFSET:hdr_end]
    return LoadedKernel("bzimage", load_addr + 0x200, load_addr, load_addr + span, setup_header)


class LoadedInitrd(FrozenRecord):
    """Where the initrd lies in guest memory."""

    __slots__ = ("addr", "size")
    addr: int
    size: int

    def __init__(self, addr: int, size: int) -> None:
        self._init(addr, size)


def load_initrd(mem: GuestMemory, path: Path, kernel: LoadedKernel, addr_max: int = 0x7FFFFFFF) -> LoadedInitrd:
    """Place the initrd page-aligned at the top of low RAM, above the kernel."""
    # Straight from the file into guest RAM: no copy of the whole image on the VMM's heap,
    # and no page faults (GuestMemory.load_file; issue 15).
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            top = min(mem.low_ram_end, addr_max + 1)
            addr = (top - size) & ~0xFFF
            if addr < kernel.end:
                raise BootError(
                    f"{path}: initrd of {size >> 10} KiB does not fit between the kernel (ends "
                    f"at {kernel.end:#x}) and {top:#x}: give the VM more memory")
            if mem.load_file(addr, f.fileno(), 0, size) != size:
                raise BootError(f"{path}: initrd shrank while it was read: try again")
    except OSError as e:
        raise BootError(f"{path}: cannot read initrd: {e.strerror}") from None
    return LoadedInitrd(addr, size)
