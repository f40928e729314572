"""A KVM virtual machine: memory slots, in-kernel irqchip and PIT, ioeventfd, irqfd."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import KvmError
from .ioctls import ffi, ioctl_ptr, ioctl_val, lib

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu


class Vm:
    """A VM fd. Owns it; vCPUs it creates are closed with it."""

    def __init__(self, kvm: "Kvm", fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list["Vcpu"] = []
        self._next_slot = 0

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(
        self, guest_phys_addr: int, memory_size: int, userspace_addr: int, *, flags: int = 0
    ) -> int:
        """Map host memory into the guest; returns the slot used."""
        slot = self._next_slot
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = memory_size
        region.userspace_addr = userspace_addr
        ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region,
                  f"slot {slot} at {guest_phys_addr:#x}+{memory_size:#x}")
        self._next_slot += 1
        return slot

    def set_tss_addr(self, addr: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("uint64_t *", addr)
        ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irqchip(self) -> None:
        ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *")
        # The speaker port (0x61) is left to userspace: nothing listens there.
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, config)

    def irq_line(self, irq: int, level: int) -> None:
        arg = ffi.new("struct kvm_irq_level *")
        arg.irq = irq
        arg.level = level
        ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, arg, f"irq {irq}")

    def _ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None, pio: bool,
                   deassign: bool) -> None:
        arg = ffi.new("struct kvm_ioeventfd *")
        arg.addr = addr
        arg.len = length
        arg.fd = fd
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            arg.datamatch = datamatch
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg.flags = flags
        what = "deassign" if deassign else "assign"
        ioctl_ptr(self.fd, lib.KVM_IOEVENTFD, arg, f"{what} {addr:#x}/{length} datamatch={datamatch}")

    def register_ioeventfd(self, fd: int, addr: int, length: int = 4, *,
                           datamatch: int | None = None, pio: bool = False) -> None:
        """Make guest writes to ``addr`` signal eventfd ``fd`` inside the kernel, no exit."""
        self._ioeventfd(fd, addr, length, datamatch, pio, deassign=False)

    def unregister_ioeventfd(self, fd: int, addr: int, length: int = 4, *,
                             datamatch: int | None = None, pio: bool = False) -> None:
        self._ioeventfd(fd, addr, length, datamatch, pio, deassign=True)

    def register_irqfd(self, fd: int, gsi: int) -> None:
        """Make a write to eventfd ``fd`` raise an edge on interrupt line ``gsi``."""
        arg = ffi.new("struct kvm_irqfd *")
        arg.fd = fd
        arg.gsi = gsi
        ioctl_ptr(self.fd, lib.KVM_IRQFD, arg, f"gsi {gsi}")

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        arg = ffi.new("struct kvm_irqfd *")
        arg.fd = fd
        arg.gsi = gsi
        arg.flags = lib.KVM_IRQFD_FLAG_DEASSIGN
        ioctl_ptr(self.fd, lib.KVM_IRQFD, arg, f"deassign gsi {gsi}")

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        from .vcpu import Vcpu

        fd = ioctl_val(self.fd, lib.KVM_CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        try:
            vcpu = Vcpu(self, vcpu_id, fd)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Vm", "KvmError"]
