"""Kernel loaders, boot_params/e820, MP table and the x86 boot CPU state (no KVM needed)."""

from __future__ import annotations

import struct

import os

import pytest

from pymvm import layout
from pymvm.boot import cpu
from pymvm.boot._bootparam_cffi import ffi, lib
from pymvm.boot.loader import (
    BootError, LoadedInitrd, LoadedKernel, kernel_kind, load_bzimage, load_elf, load_initrd, load_kernel,
)
from pymvm.boot.mptable import build_mptable
from pymvm.boot.params import E820_RAM, E820_RESERVED, build_boot_params, e820_map
from pymvm.kvm import CpuidEntry
from pymvm.memory import GuestMemory, GuestMemoryError, ram_ranges

MIB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(64 * MIB)
    yield m
    m.close()


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, *, ei_class: int = 2,
             machine: int = 62) -> bytes:
    """A minimal ELF64 executable: segments are (paddr, file bytes, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    header = bytearray(b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9))
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, 56, len(segments), 0, 0, 0)
    phdrs, blobs = b"", b""
    for paddr, blob, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), paddr | 0xFFFFFFFF80000000,
                             paddr, len(blob), memsz, 0x1000)
        blobs += blob
    return bytes(header) + phdrs + blobs


def make_bzimage(payload: bytes, *, version: int = 0x020F, xloadflags: int | None = None,
                 setup_sects: int = 2, pref_address: int = 0x1000000, init_size: int = 0x400000) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    hdr = ffi.new("struct setup_header *")
    hdr.setup_sects = setup_sects
    hdr.boot_flag = 0xAA55
    hdr.header = int.from_bytes(b"HdrS", "little")
    hdr.version = version
    hdr.xloadflags = lib.XLF_KERNEL_64 if xloadflags is None else xloadflags
    hdr.relocatable_kernel = 1
    hdr.kernel_alignment = 0x200000
    hdr.pref_address = pref_address
    hdr.init_size = init_size
    hdr.code32_start = 0x100000
    hdr.cmdline_size = 2047
    raw = bytes(ffi.buffer(hdr))
    off = lib.PYMVM_SETUP_HEADER_OFFSET
    setup[off:off + len(raw)] = raw
    setup[0x201] = 0x6A  # jump offset: the header runs to 0x202 + 0x6a
    return bytes(setup) + payload


# ---- ELF -------------------------------------------------------------------------------------

def test_elf_segments_are_copied_to_their_physical_addresses_and_bss_zeroed(mem):
    mem.write(0x1000000 + 4, b"\xff" * 16)  # stale bytes where the bss goes
    image = make_elf([(0x1000000, b"TEXT", 20), (0x1200000, b"DATA", 4)], entry=0x1000000)
    k = load_elf(mem, image)
    assert (k.kind, k.entry, k.start, k.end) == ("elf", 0x1000000, 0x1000000, 0x1200004)
    assert mem.read(0x1000000, 20) == b"TEXT" + bytes(16)
    assert mem.read(0x1200000, 4) == b"DATA"
    assert k.setup_header is None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(ei_class=1), "64-bit"),
    (dict(machine=3), "not x86_64"),
])
def test_elf_that_is_not_x86_64_is_refused(mem, kwargs, needle):
    with pytest.raises(BootError, match=needle):
        load_elf(mem, make_elf([(0x1000000, b"x", 1)], 0x1000000, **kwargs))


def test_elf_segment_outside_guest_ram_is_refused(mem):
    with pytest.raises(BootError, match="does not fit in guest RAM"):
        load_elf(mem, make_elf([(0x8000000, b"x", 1)], 0x8000000))


def test_elf_entry_outside_its_segments_is_refused(mem):
    with pytest.raises(BootError, match="entry point"):
        load_elf(mem, make_elf([(0x1000000, b"x", 1)], 0x2000000))


def test_elf_with_truncated_program_headers_is_refused(mem):
    image = make_elf([(0x1000000, b"x", 1)], 0x1000000)
    with pytest.raises(BootError, match="truncated"):
        load_elf(mem, image[:80])


# ---- bzImage ---------------------------------------------------------------------------------

def test_bzimage_payload_is_loaded_at_pref_address_with_the_64bit_entry(mem):
    image = make_bzimage(b"PAYLOAD" * 10)
    assert kernel_kind(image) == "bzimage"
    k = load_bzimage(mem, image)
    assert k.kind == "bzimage"
    assert k.start == 0x1000000 and k.entry == 0x1000200
    assert k.end == 0x1000000 + 0x400000  # init_size is reserved, not just the payload
    assert mem.read(0x1000000, 7) == b"PAYLOAD"
    assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    assert len(k.setup_header) == 0x202 + 0x6A - 0x1F1


def test_bzimage_with_an_old_boot_protocol_is_refused(mem):
    with pytest.raises(BootError, match="too old"):
        load_bzimage(mem, make_bzimage(b"x" * 64, version=0x020A))


def test_bzimage_without_a_64bit_entry_is_refused(mem):
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        load_bzimage(mem, make_bzimage(b"x" * 64, xloadflags=0))


def test_bzimage_that_does_not_fit_is_refused(mem):
    with pytest.raises(BootError, match="does not fit"):
        load_bzimage(mem, make_bzimage(b"x" * 64, init_size=128 * MIB))


def test_file_that_is_neither_elf_nor_bzimage_is_refused_by_name(mem, tmp_path):
    junk = tmp_path / "notakernel"
    junk.write_bytes(b"MZ" + bytes(4096))
    with pytest.raises(BootError, match="neither an ELF vmlinux nor a bzImage") as e:
        load_kernel(mem, junk)
    assert str(junk) in str(e.value)


def test_unreadable_kernel_is_refused(mem, tmp_path):
    with pytest.raises(BootError, match="cannot read kernel"):
        load_kernel(mem, tmp_path / "missing")


def test_built_microvm_kernel_loads_in_both_formats(mem):
    from pymvm.images.kernel import kernel_status

    images = kernel_status()
    if images is None:
        pytest.skip("the microVM kernel is not built (pymvm build-kernel)")
    elf = load_kernel(mem, images.vmlinux)
    assert elf.kind == "elf" and elf.entry == 0x1000000
    bz = load_kernel(mem, images.bzimage)
    assert bz.kind == "bzimage" and bz.entry == bz.start + 0x200


# ---- initrd ----------------------------------------------------------------------------------

def test_initrd_goes_page_aligned_at_the_top_of_low_ram(mem, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"I" * 5000)
    k = LoadedKernel("elf", 0x1000000, 0x1000000, 0x1100000, None)
    loaded = load_initrd(mem, initrd, k)
    assert loaded.addr % 4096 == 0
    assert loaded.addr + loaded.size <= mem.low_ram_end
    assert mem.low_ram_end - loaded.addr < 4096 + 5000
    assert mem.read(loaded.addr, 5) == b"IIIII"


def test_initrd_that_would_overlap_the_kernel_is_refused(mem, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(40 * MIB))
    k = LoadedKernel("elf", 0x1000000, 0x1000000, 0x1000000 + 30 * MIB, None)
    with pytest.raises(BootError, match="more memory"):
        load_initrd(mem, initrd, k)


# ---- boot_params and e820 --------------------------------------------------------------------

def test_e820_has_low_ram_below_the_ebda_and_ram_from_1mib():
    m = GuestMemory(64 * MIB)
    try:
        entries = [(e.addr, e.size, e.type) for e in e820_map(m)]
    finally:
        m.close()
    assert entries == [(0, layout.EBDA_START, E820_RAM),
                       (layout.HIMEM_START, 64 * MIB - layout.HIMEM_START, E820_RAM)]


def test_e820_reserves_the_acpi_tables_area_between_the_ebda_and_1mib():
    m = GuestMemory(64 * MIB)
    try:
        entries = [(e.addr, e.size, e.type) for e in
                   e820_map(m, [(layout.ACPI_TABLES_START, layout.ACPI_TABLES_SIZE)])]
    finally:
        m.close()
    assert entries == [(0, layout.EBDA_START, E820_RAM),
                       (layout.ACPI_TABLES_START, layout.ACPI_TABLES_SIZE, E820_RESERVED),
                       (layout.HIMEM_START, 64 * MIB - layout.HIMEM_START, E820_RAM)]
    # RAM and the reserved area do not overlap and stay below where the kernel goes.
    assert layout.EBDA_START <= layout.ACPI_TABLES_START
    assert layout.ACPI_TABLES_START + layout.ACPI_TABLES_SIZE <= layout.HIMEM_START


def test_ram_larger_than_the_mmio_hole_continues_above_4gib():
    assert ram_ranges(4 << 30) == [(0, layout.MMIO_HOLE_START),
                                   (1 << 32, (4 << 30) - layout.MMIO_HOLE_START)]
    assert ram_ranges(256 * MIB) == [(0, 256 * MIB)]


def test_boot_params_carry_cmdline_initrd_loader_and_e820(mem):
    k = LoadedKernel("elf", 0x1000000, 0x1000000, 0x1100000, None)
    raw = build_boot_params(mem, k, b"console=ttyS0", LoadedInitrd(0x3000000, 0x1234))
    p = ffi.new("struct boot_params *")
    ffi.memmove(p, raw, len(raw))
    assert len(raw) == 4096
    assert p.hdr.boot_flag == 0xAA55 and p.hdr.header == int.from_bytes(b"HdrS", "little")
    assert p.hdr.type_of_loader == 0xFF
    assert p.hdr.loadflags & lib.LOADED_HIGH and p.hdr.loadflags & lib.CAN_USE_HEAP
    assert p.hdr.cmd_line_ptr == layout.CMDLINE_START
    assert p.hdr.cmdline_size == len(b"console=ttyS0")
    assert (p.hdr.ramdisk_image, p.hdr.ramdisk_size) == (0x3000000, 0x1234)
    assert p.e820_entries == 2
    assert p.e820_table[1].addr == layout.HIMEM_START and p.e820_table[1].type == E820_RAM


def test_boot_params_start_from_the_bzimage_setup_header(mem):
    k = load_bzimage(mem, make_bzimage(b"x" * 64))
    raw = build_boot_params(mem, k, b"quiet")
    p = ffi.new("struct boot_params *")
    ffi.memmove(p, raw, len(raw))
    assert p.hdr.version == 0x020F and p.hdr.pref_address == 0x1000000
    assert p.hdr.type_of_loader == 0xFF


def test_cmdline_longer_than_the_kernel_accepts_is_refused(mem):
    k = load_bzimage(mem, make_bzimage(b"x" * 64))
    with pytest.raises(BootError, match="command line"):
        build_boot_params(mem, k, b"a" * 3000)


# ---- MP table --------------------------------------------------------------------------------

@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_mp_table_checksums_and_lists_every_cpu(ncpus):
    raw = build_mptable(ncpus)
    assert raw[:4] == b"_MP_" and sum(raw[:16]) % 256 == 0
    (table_addr,) = struct.unpack_from("<I", raw, 4)
    table = raw[table_addr - layout.MPTABLE_START:]
    assert table[:4] == b"PCMP"
    length, = struct.unpack_from("<H", table, 4)
    assert sum(table[:length]) % 256 == 0
    count, = struct.unpack_from("<H", table, 34)
    assert count == ncpus + 1 + 1 + 24 + 2
    cpus = [table[44 + 20 * i:44 + 20 * (i + 1)] for i in range(ncpus)]
    assert [c[1] for c in cpus] == list(range(ncpus))  # APIC ids
    assert [bool(c[3] & 2) for c in cpus] == [True] + [False] * (ncpus - 1)  # BSP flag
    ioapic = table[44 + 20 * ncpus + 8:][:8]
    assert ioapic[0] == 2 and ioapic[1] == ncpus
    assert struct.unpack_from("<I", ioapic, 4)[0] == layout.IOAPIC_ADDR


def test_mp_table_refuses_more_cpus_than_apic_ids():
    with pytest.raises(ValueError):
        build_mptable(255)


# ---- CPU state -------------------------------------------------------------------------------

def test_gdt_entries_are_the_flat_64bit_code_data_and_tss_descriptors():
    assert cpu.GDT == [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF]


def test_page_tables_identity_map_4gib_with_2mib_pages(mem):
    cpu.write_page_tables(mem)
    pml4, = struct.unpack("<Q", mem.read(layout.PML4_START, 8))
    assert pml4 == layout.PDPT_START | 3
    pdpt = struct.unpack("<4Q", mem.read(layout.PDPT_START, 32))
    assert pdpt == tuple((layout.PD_START + i * 4096) | 3 for i in range(4))
    last, = struct.unpack("<Q", mem.read(layout.PD_START + 3 * 4096 + 511 * 8, 8))
    assert last == ((4 << 30) - (2 << 20)) | 0x83


def test_cpuid_gets_the_apic_id_cpu_count_and_hypervisor_bit():
    supported = [CpuidEntry(1, 0, 0, 0x800F12, 0xFF0800, 0x1, 0x0), CpuidEntry(0xB, 1, 1, 0, 0, 1, 0),
                 CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)]
    out = {(e.function, e.index): e for e in cpu.vcpu_cpuid(supported, vcpu_id=3, ncpus=4)}
    leaf1 = out[(1, 0)]
    assert leaf1.ebx >> 24 == 3 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx & cpu.CPUID_HYPERVISOR and leaf1.edx & cpu.CPUID_HTT
    assert out[(0xB, 1)].edx == 3 and out[(0xB, 1)].ebx == 4
    assert out[(0x40000000, 0)] == supported[2]  # KVM's paravirt signature passes through


# ---- guest memory ----------------------------------------------------------------------------

def test_guest_memory_views_share_the_memfd_and_refuse_ranges_outside_ram(mem):
    view = mem.view(0x2000, 4)
    view[:] = b"abcd"
    assert mem.read(0x2000, 4) == b"abcd"
    assert len(mem.view(64 * MIB - 1, 1)) == 1
    with pytest.raises(GuestMemoryError):
        mem.view(64 * MIB - 2, 4)
    with pytest.raises(GuestMemoryError):
        mem.view(-1, 1)
    import os
    assert os.pread(mem.fd, 4, 0x2000) == b"abcd"  # what a vhost back-end would map


def test_guest_memory_close_goes_on_while_a_view_is_still_held():
    # A traceback being handled can hold slices of guest RAM (a loader's locals) while the
    # VMM tears down: closing must finish (fd closed) instead of raising BufferError.
    memory = GuestMemory(4 * MIB)
    held = memory.view(0x1000, 16)
    fd = memory.fd
    memory.close()
    assert memory.fd == -1 and memory.regions == []
    with pytest.raises(OSError):
        os.fstat(fd)
    held[:4] = b"ok!!"  # still mapped until the last reference goes: no crash
    del held


def test_guest_memory_size_must_be_page_granular():
    with pytest.raises(GuestMemoryError, match="page size"):
        GuestMemory(4097)


# ---- from the file straight into guest RAM (GuestMemory.load_file; issue 15) ----------------

def test_a_bzimage_file_loads_as_its_bytes_do(mem, tmp_path):
    payload = bytes(range(256)) * 40 + b"END"  # not page-aligned, more than one page
    image = make_bzimage(payload, setup_sects=4)
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    from_file = load_kernel(mem, path)
    in_guest = mem.read(from_file.start, len(payload))
    with GuestMemory(64 * MIB) as other:
        assert load_bzimage(other, image) == from_file
        assert other.read(from_file.start, len(payload)) == in_guest == payload


@pytest.mark.parametrize("sendfile_works", [True, False])
def test_load_file_copies_a_file_range_into_guest_memory(mem, tmp_path, monkeypatch, sendfile_works):
    if not sendfile_works:  # as on hugetlbfs, which takes no write(2): read into the mapping
        def refuse(*args):
            raise OSError(22, "Invalid argument")
        monkeypatch.setattr(os, "sendfile", refuse)
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert mem.load_file(0x200123, f.fileno(), 100, len(data) - 100) == len(data) - 100
        assert mem.read(0x200123, len(data) - 100) == data[100:]
        assert mem.read(0x200122, 1) == b"\0"  # nothing before it
        # Past the end of the file: as much as there was.
        assert mem.load_file(0x300000, f.fileno(), len(data) - 10, 100) == 10
        assert mem.read(0x300000, 10) == data[-10:]
        with pytest.raises(GuestMemoryError):
            mem.load_file(64 * MIB - 10, f.fileno(), 0, 100)  # beyond guest RAM
