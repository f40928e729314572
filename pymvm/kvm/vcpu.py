"""A KVM vCPU: register state, CPUID, MSRs, LAPIC, and the shared kvm_run page."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, Iterable

from ..record import FrozenRecord
from .errors import KvmError
from .ioctls import ffi, ioctl_ptr, lib

if TYPE_CHECKING:
    from .system import CpuidEntry
    from .vm import Vm

# Offsets into struct kvm_run, from the compiler (see _build.py).
_EXIT_REASON = lib.PYMVM_RUN_EXIT_REASON
_IMMEDIATE_EXIT = lib.PYMVM_RUN_IMMEDIATE_EXIT
_IO_DIRECTION = lib.PYMVM_RUN_IO_DIRECTION
_IO_SIZE = lib.PYMVM_RUN_IO_SIZE
_IO_PORT = lib.PYMVM_RUN_IO_PORT
_IO_COUNT = lib.PYMVM_RUN_IO_COUNT
_IO_DATA_OFFSET = lib.PYMVM_RUN_IO_DATA_OFFSET
_MMIO_PHYS_ADDR = lib.PYMVM_RUN_MMIO_PHYS_ADDR
_MMIO_DATA = lib.PYMVM_RUN_MMIO_DATA
_MMIO_LEN = lib.PYMVM_RUN_MMIO_LEN
_MMIO_IS_WRITE = lib.PYMVM_RUN_MMIO_IS_WRITE

# The run loop reads each union member with one struct.unpack_from: check, against the
# compiler's offsets, that the fields it reads are laid out back to back as it assumes.
assert (_IO_SIZE, _IO_PORT, _IO_COUNT, _IO_DATA_OFFSET) == (
    _IO_DIRECTION + 1, _IO_DIRECTION + 2, _IO_DIRECTION + 4, _IO_DIRECTION + 8), "kvm_run.io layout"
assert (_MMIO_DATA, _MMIO_LEN, _MMIO_IS_WRITE) == (
    _MMIO_PHYS_ADDR + 8, _MMIO_PHYS_ADDR + 16, _MMIO_PHYS_ADDR + 20), "kvm_run.mmio layout"

EXIT_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}

# Exit reason returned by Vcpu.run() when KVM_RUN was interrupted by a signal (EINTR).
EXIT_INTERRUPTED = -1


class IoExit(FrozenRecord):
    """A KVM_EXIT_IO: a port access of the guest."""

    __slots__ = ("port", "size", "count", "is_write", "data_offset")
    port: int
    size: int
    count: int
    is_write: bool
    data_offset: int

    def __init__(self, port: int, size: int, count: int, is_write: bool, data_offset: int) -> None:
        self._init(port, size, count, is_write, data_offset)


class MmioExit(FrozenRecord):
    """A KVM_EXIT_MMIO: a guest access to unbacked guest-physical memory."""

    __slots__ = ("addr", "length", "is_write")
    addr: int
    length: int
    is_write: bool

    def __init__(self, addr: int, length: int, is_write: bool) -> None:
        self._init(addr, length, is_write)


class FastRead:
    """One MMIO register in a FastReadTable: ``set`` what a 4-byte guest read returns."""

    __slots__ = ("_entries", "_index")

    def __init__(self, entries: Any, index: int) -> None:
        self._entries = entries  # the whole C array: an element alone would not keep it alive
        self._index = index

    @property
    def addr(self) -> int:
        return int(self._entries[self._index].addr)

    @property
    def value(self) -> int:
        return int(self._entries[self._index].value)

    def set(self, value: int) -> None:
        self._entries[self._index].value = value & 0xFFFF_FFFF  # one aligned 32-bit store

    @property
    def hits(self) -> int:
        """Guest reads answered without leaving C (approximate with several vCPUs)."""
        return int(self._entries[self._index].hits)


class FastReadTable:
    """MMIO registers whose 4-byte reads KVM_RUN's C loop answers itself (pymvm_vcpu_run).

    For registers read on every interrupt (virtio-mmio InterruptStatus): the value lives
    in C memory that the device updates whenever it changes, so such a read costs one
    return from the kernel to the C loop, not a trip through the Python run loop.
    """

    CAPACITY = 64

    def __init__(self) -> None:
        self._entries = ffi.new("struct pymvm_fast_read[]", self.CAPACITY)
        self.count = 0

    def add(self, addr: int, value: int = 0) -> FastRead:
        for i in range(self.count):
            if self._entries[i].addr == addr:
                raise ValueError(f"MMIO address {addr:#x} already has a fast read")
        if self.count == self.CAPACITY:
            raise ValueError(f"at most {self.CAPACITY} fast MMIO reads")
        entry = self._entries[self.count]
        entry.addr, entry.value, entry.hits = addr, value & 0xFFFF_FFFF, 0
        self.count += 1
        return FastRead(self._entries, self.count - 1)


class Vcpu:
    """A vCPU fd and its mmapped kvm_run. Owns both."""

    def __init__(self, vm: "Vm", vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        self.run_page = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_view = memoryview(self.run_page)
        self._run_ptr = ffi.from_buffer(self.run_page)
        self._err = ffi.new("int *")
        self._fast_entries = ffi.NULL  # the table's owning C array: holding it keeps it alive
        self._fast_count = 0

    def use_fast_reads(self, table: FastReadTable) -> None:
        """Answer reads of ``table``'s registers in C from now on (entries added later to
        the table are not seen: call again)."""
        self._fast_entries = table._entries
        self._fast_count = table.count

    def close(self) -> None:
        if self.fd < 0:
            return
        ffi.release(self._run_ptr)
        self._run_view.release()
        self.run_page.close()
        os.close(self.fd)
        self.fd = -1

    # ---- running -------------------------------------------------------------------------
    def run(self) -> int:
        """Enter the guest until the next exit Python must handle; returns the exit reason
        (or EXIT_INTERRUPTED). Reads of the fast-read registers are answered on the way."""
        ret = lib.pymvm_vcpu_run(self.fd, self._run_ptr, self._fast_entries, self._fast_count, self._err)
        if ret < 0:
            err = self._err[0]
            if err in (errno.EINTR, errno.EAGAIN):
                return EXIT_INTERRUPTED
            raise KvmError.from_errno("KVM_RUN", err, f"vcpu {self.id}")
        return ret

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page[_IMMEDIATE_EXIT] = 1 if value else 0

    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("=I", self.run_page, _EXIT_REASON)[0]

    def io_exit(self) -> IoExit:
        direction, size = self.run_page[_IO_DIRECTION], self.run_page[_IO_SIZE]
        (port,) = struct.unpack_from("=H", self.run_page, _IO_PORT)
        (count,) = struct.unpack_from("=I", self.run_page, _IO_COUNT)
        (offset,) = struct.unpack_from("=Q", self.run_page, _IO_DATA_OFFSET)
        return IoExit(port, size, count, direction == lib.KVM_EXIT_IO_OUT, offset)

    def mmio_exit(self) -> MmioExit:
        (addr,) = struct.unpack_from("=Q", self.run_page, _MMIO_PHYS_ADDR)
        (length,) = struct.unpack_from("=I", self.run_page, _MMIO_LEN)
        return MmioExit(addr, length, self.run_page[_MMIO_IS_WRITE] != 0)

    def run_data(self, offset: int, length: int) -> memoryview:
        """A view of the kvm_run page (I/O data lives there); bounds-checked."""
        if offset < 0 or length < 0 or offset + length > len(self.run_page):
            raise KvmError(f"vcpu {self.id}: kvm_run data {offset:#x}+{length} outside the page")
        return self._run_view[offset:offset + length]

    def mmio_data(self) -> memoryview:
        return self._run_view[_MMIO_DATA:_MMIO_DATA + 8]

    def internal_error(self) -> str:
        (sub,) = struct.unpack_from("=I", self.run_page, lib.PYMVM_RUN_INTERNAL_SUBERROR)
        (ndata,) = struct.unpack_from("=I", self.run_page, lib.PYMVM_RUN_INTERNAL_NDATA)
        data = struct.unpack_from(f"={min(ndata, 16)}Q", self.run_page, lib.PYMVM_RUN_INTERNAL_DATA)
        return f"suberror {sub} data [{', '.join(hex(d) for d in data)}]"

    def fail_entry_reason(self) -> int:
        return struct.unpack_from("=Q", self.run_page, lib.PYMVM_RUN_FAIL_ENTRY_REASON)[0]

    def system_event_type(self) -> int:
        return struct.unpack_from("=I", self.run_page, lib.PYMVM_RUN_SYSTEM_EVENT_TYPE)[0]

    # ---- register state ------------------------------------------------------------------
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, f"vcpu {self.id}")
        return regs

    def set_regs(self, regs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_REGS, regs, f"vcpu {self.id}")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, lib.KVM_GET_SREGS, sregs, f"vcpu {self.id}")
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_SREGS, sregs, f"vcpu {self.id}")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        ioctl_ptr(self.fd, lib.KVM_GET_FPU, fpu, f"vcpu {self.id}")
        return fpu

    def set_fpu(self, fpu) -> None:
        ioctl_ptr(self.fd, lib.KVM_SET_FPU, fpu, f"vcpu {self.id}")

    def set_cpuid(self, entries: Iterable["CpuidEntry"]) -> None:
        entries = list(entries)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, e in enumerate(entries):
            dst = cpuid.entries[i]
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid, f"vcpu {self.id}")

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Set MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(msrs) * ffi.sizeof("struct kvm_msr_entry"))
        arg = ffi.cast("struct kvm_msrs *", buf)
        arg.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs.items()):
            arg.entries[i].index = index
            arg.entries[i].data = data
        return ioctl_ptr(self.fd, lib.KVM_SET_MSRS, arg, f"vcpu {self.id}")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(indices) * ffi.sizeof("struct kvm_msr_entry"))
        arg = ffi.cast("struct kvm_msrs *", buf)
        arg.nmsrs = len(indices)
        for i, index in enumerate(indices):
            arg.entries[i].index = index
        n = ioctl_ptr(self.fd, lib.KVM_GET_MSRS, arg, f"vcpu {self.id}")
        return {arg.entries[i].index: arg.entries[i].data for i in range(n)}

    def get_lapic(self) -> bytearray:
        state = ffi.new("struct kvm_lapic_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_LAPIC, state, f"vcpu {self.id}")
        return bytearray(ffi.buffer(state.regs))

    def set_lapic(self, regs: bytes) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(state.regs)[:] = bytes(regs)
        ioctl_ptr(self.fd, lib.KVM_SET_LAPIC, state, f"vcpu {self.id}")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, lib.KVM_GET_MP_STATE, state, f"vcpu {self.id}")
        return state.mp_state
