"""The /dev/kvm system handle: API version, capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import errno
import os

from ..record import FrozenRecord
from .errors import KvmCapabilityError, KvmError
from .ioctls import ffi, ioctl_none, ioctl_ptr, ioctl_val, lib

KVM_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256

# What a pymvm VM cannot run without, with the reason shown to the user.
REQUIRED_CAPS: dict[str, str] = {
    "KVM_CAP_USER_MEMORY": "guest memory slots",
    "KVM_CAP_IRQCHIP": "the in-kernel IOAPIC/LAPIC/PIC",
    "KVM_CAP_PIT2": "the in-kernel PIT",
    "KVM_CAP_SET_TSS_ADDR": "the TSS region needed by x86 guests",
    "KVM_CAP_EXT_CPUID": "KVM_GET_SUPPORTED_CPUID",
    "KVM_CAP_IOEVENTFD": "queue kicks that bypass userspace",
    "KVM_CAP_IRQFD": "interrupts injected from eventfds",
    "KVM_CAP_IMMEDIATE_EXIT": "stopping vCPUs promptly",
}


class CpuidEntry(FrozenRecord):
    """One CPUID leaf (function, index) and its registers."""

    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int,
                 edx: int) -> None:
        self._init(function, index, flags, eax, ebx, ecx, edx)


class Kvm:
    """An open /dev/kvm. Owns its fd."""

    def __init__(self, path: str = KVM_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                f"{path} does not exist: load kvm_intel or kvm_amd, or run inside a VM with "
                "nested virtualisation"
            ) from None
        except PermissionError:
            raise KvmError(f"{path}: permission denied: run as root or join the 'kvm' group") from None
        try:
            version = ioctl_none(self.fd, lib.KVM_GET_API_VERSION)
            if version != lib.KVM_API_VERSION:
                raise KvmError(
                    f"{path}: KVM API version {version}, pymvm needs {lib.KVM_API_VERSION}"
                )
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int | str) -> int:
        if isinstance(cap, str):
            cap = getattr(lib, cap)
        return ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap)

    def require(self, caps: dict[str, str] | None = None) -> None:
        """Raise KvmCapabilityError naming every required capability the host lacks."""
        missing = [
            f"{name} ({why})"
            for name, why in (caps or REQUIRED_CAPS).items()
            if self.check_extension(name) <= 0
        ]
        if missing:
            raise KvmCapabilityError("host KVM lacks " + ", ".join(missing))

    def max_vcpus(self) -> int:
        return self.check_extension("KVM_CAP_MAX_VCPUS") or self.check_extension("KVM_CAP_NR_VCPUS") or 4

    def vcpu_mmap_size(self) -> int:
        return ioctl_none(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        nent = MAX_CPUID_ENTRIES
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = nent
            try:
                ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            return [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))
            ]

    def create_vm(self) -> "Vm":
        from .vm import Vm

        fd = ioctl_val(self.fd, lib.KVM_CREATE_VM, 0)
        return Vm(self, fd)
