"""Guest RAM: one memfd (optionally hugetlbfs-backed) mapped MAP_SHARED.

Shared, fd-backed memory is what lets vhost back-ends (the kernel's vhost-net, or a
vhost-user process that mmaps the fd) reach the guest's buffers directly. RAM is split
around the 32-bit MMIO hole: [0, hole) and, for large guests, [4 GiB, ...).
Host views are memoryview slices of the mapping: no copies.

The memfd is sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW, as QEMU's
memory-backend-memfd does): a vhost-user back-end that maps it can then trust its size, and
refuses memory that a front-end could truncate under it (a SIGBUS in the back-end).
"""

from __future__ import annotations

import fcntl
import mmap
import os

import structlog

from . import layout
from .record import Record

log = structlog.get_logger()

MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)
HUGE_PAGE_SIZE = 2 << 20


class GuestMemoryError(Exception):
    """Guest memory could not be created, or a guest address is outside it."""


class MemoryRegion(Record):
    """One contiguous range of guest-physical RAM."""

    __slots__ = ("gpa", "size", "fd", "fd_offset", "host_addr", "_map", "view")
    _repr_hidden = frozenset({"_map", "view"})
    gpa: int
    size: int
    fd: int  # the memfd shared by all regions
    fd_offset: int  # where this region starts inside the memfd
    host_addr: int  # userspace address of the mapping (for KVM and vhost)
    _map: mmap.mmap
    view: memoryview

    def __init__(self, gpa: int, size: int, fd: int, fd_offset: int, host_addr: int,
                 _map: mmap.mmap, view: memoryview) -> None:
        self.gpa = gpa
        self.size = size
        self.fd = fd
        self.fd_offset = fd_offset
        self.host_addr = host_addr
        self._map = _map
        self.view = view

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


def ram_ranges(size: int) -> list[tuple[int, int]]:
    """The (gpa, size) ranges of a guest with ``size`` bytes of RAM."""
    low = min(size, layout.MMIO_HOLE_START)
    ranges = [(0, low)]
    if size > low:
        ranges.append((layout.MMIO_HOLE_END, size - low))
    return ranges


def _host_address(buf: mmap.mmap) -> int:
    from .kvm.ioctls import ffi

    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


class GuestMemory:
    """All RAM of one VM. Owns the memfd and the mappings."""

    def __init__(self, size: int, *, hugepages: bool = False, name: str = "pymvm-guest-ram") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest memory size {size} is not a positive multiple of the page size")
        if hugepages and size % HUGE_PAGE_SIZE:
            raise GuestMemoryError(
                f"guest memory size {size >> 20} MiB is not a multiple of the 2 MiB huge page size"
            )
        self.size = size
        self.hugepages = hugepages
        self.regions: list[MemoryRegion] = []
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (MFD_HUGETLB if hugepages else 0)
        try:
            self.fd = os.memfd_create(name, flags)
        except OSError as e:
            raise GuestMemoryError(f"memfd_create failed: {e.strerror}") from None
        try:
            os.ftruncate(self.fd, size)
            try:
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            except OSError as e:
                raise GuestMemoryError(f"cannot seal the guest memfd: {e.strerror}") from None
            offset = 0
            for gpa, length in ram_ranges(size):
                try:
                    m = mmap.mmap(self.fd, length, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                except OSError as e:
                    hint = (" (reserve huge pages: echo N > /proc/sys/vm/nr_hugepages)"
                            if hugepages else "")
                    raise GuestMemoryError(
                        f"cannot map {length >> 20} MiB of guest memory: {e.strerror}{hint}"
                    ) from None
                self.regions.append(
                    MemoryRegion(gpa, length, self.fd, offset, _host_address(m), m, memoryview(m))
                )
                offset += length
            if hugepages:
                self._touch_hugepages()
        except BaseException:
            self.close()
            raise

    def _touch_hugepages(self) -> None:
        # hugetlbfs memory is reserved at mmap time; fail now, not on a guest fault (SIGBUS).
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except OSError as e:
            raise GuestMemoryError(
                f"not enough free huge pages for {self.size >> 20} MiB: {e.strerror} "
                "(reserve them: echo N > /proc/sys/vm/nr_hugepages)"
            ) from None

    def close(self) -> None:
        """Unmap and close. A mapping that something still exports (a slice held by a live
        traceback, say) cannot be unmapped yet: it is left to the garbage collector or the
        process exit, and closing goes on: teardown must never stop halfway."""
        in_use = 0
        for region in self.regions:
            try:
                region.view.release()
                region._map.close()
            except BufferError:
                in_use += 1
        self.regions.clear()
        if in_use:
            log.debug("guest_memory_still_referenced", regions=in_use)
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def low_ram_end(self) -> int:
        return self.regions[0].end

    def find_region(self, gpa: int, length: int = 1) -> MemoryRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory; the range must lie inside one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        region = self.find_region(gpa, max(length, 1))
        start = gpa - region.gpa
        return region.view[start:start + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def load_file(self, gpa: int, fd: int, offset: int, length: int) -> int:
        """Copy ``length`` bytes of file ``fd`` from ``offset`` on into guest memory at ``gpa``
        (inside one region); returns how many it had (fewer where the file ends first).

        The kernel copies them from the file into the memfd (sendfile): this process neither
        holds them nor faults the guest's pages in one by one, which costs as much again
        (issue 15). hugetlbfs takes no write(2): there they are read into the mapping."""
        view = self.view(gpa, length)  # in guest RAM, or GuestMemoryError
        region = self.find_region(gpa, max(length, 1))
        done = 0
        if not self.hugepages:
            try:
                os.lseek(self.fd, region.fd_offset + gpa - region.gpa, os.SEEK_SET)
                while done < length:
                    n = os.sendfile(self.fd, fd, offset + done, length - done)
                    if not n:
                        return done
                    done += n
                return done
            except OSError:
                pass  # a file sendfile cannot read: the rest is read below
        os.lseek(fd, offset + done, os.SEEK_SET)
        while done < length:
            n = os.readv(fd, [view[done:]])
            if not n:
                break
            done += n
        return done

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def host_address(self, gpa: int, length: int = 1) -> int:
        region = self.find_region(gpa, length)
        return region.host_addr + (gpa - region.gpa)
