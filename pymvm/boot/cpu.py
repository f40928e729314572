"""x86_64 vCPU state for a direct 64-bit Linux boot: CPUID, MSRs, FPU, LAPIC, long mode."""

from __future__ import annotations

import struct

from .. import layout
from ..kvm import CpuidEntry, Vcpu
from ..memory import GuestMemory

# Control register and EFER bits (Intel SDM vol. 3, 2.5 / 2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# GDT: null, 64-bit code, data, TSS (access/flags nibbles as in the SDM descriptor format).
GDT_CODE64 = 0xA09B
GDT_DATA = 0xC093
GDT_TSS = 0x808B
SEL_CODE, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18

# MSR numbers (SDM vol. 4).
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

# LAPIC registers and delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

CPUID_HYPERVISOR = 1 << 31  # leaf 1 ecx
CPUID_HTT = 1 << 28  # leaf 1 edx


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0xFFFFFF) << 16) | (limit & 0xFFFF))


GDT = [0, gdt_entry(GDT_CODE64, 0, 0xFFFFF), gdt_entry(GDT_DATA, 0, 0xFFFFF), gdt_entry(GDT_TSS, 0, 0xFFFFF)]


def _segment_from_gdt(seg, entry: int, index: int) -> None:
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    seg.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    seg.limit = (limit << 12) | 0xFFF if g else limit
    seg.selector = index * 8
    seg.type = (entry >> 40) & 0xF
    seg.present = (entry >> 47) & 1
    seg.dpl = (entry >> 45) & 3
    seg.db = (entry >> 54) & 1
    seg.s = (entry >> 44) & 1
    seg.l = (entry >> 53) & 1
    seg.g = g
    seg.avl = (entry >> 52) & 1
    seg.unusable = 0 if seg.present else 1


def write_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages: enough for the kernel's own setup."""
    mem.write(layout.PML4_START, struct.pack("<Q", layout.PDPT_START | 0x3) + bytes(4096 - 8))
    pdpt = b"".join(struct.pack("<Q", (layout.PD_START + i * 0x1000) | 0x3) for i in range(4))
    mem.write(layout.PDPT_START, pdpt + bytes(4096 - len(pdpt)))
    for i in range(4):
        pd = struct.pack("<512Q", *[((i * 512 + j) << 21) | 0x83 for j in range(512)])
        mem.write(layout.PD_START + i * 0x1000, pd)


def write_gdt(mem: GuestMemory) -> None:
    mem.write(layout.GDT_START, b"".join(struct.pack("<Q", e) for e in GDT))
    mem.write(layout.IDT_START, bytes(8))


def setup_long_mode(vcpu: Vcpu, entry: int) -> None:
    sregs = vcpu.get_sregs()
    for name, index in (("cs", 1), ("ds", 2), ("es", 2), ("fs", 2), ("gs", 2), ("ss", 2)):
        _segment_from_gdt(getattr(sregs, name), GDT[index], index)
    _segment_from_gdt(sregs.tr, GDT[3], 3)
    sregs.gdt.base = layout.GDT_START
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = layout.IDT_START
    sregs.idt.limit = 7
    sregs.cr3 = layout.PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = layout.ZERO_PAGE_START
    vcpu.set_regs(regs)


def setup_fpu(vcpu: Vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def boot_msrs() -> dict[int, int]:
    return {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0, MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
    }


def setup_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a BIOS would leave them."""
    regs = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", regs, offset, value)
    vcpu.set_lapic(regs)


def vcpu_cpuid(supported: list[CpuidEntry], vcpu_id: int, ncpus: int) -> list[CpuidEntry]:
    """KVM's supported CPUID, with this vCPU's APIC id and the VM's CPU count filled in."""
    out = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(ncpus, 255) << 16)
            ecx = e.ecx | CPUID_HYPERVISOR
            edx = e.edx | CPUID_HTT if ncpus > 1 else e.edx & ~CPUID_HTT
            e = e.replace(ebx=ebx, ecx=ecx, edx=edx)
        elif e.function == 0xB:
            # Extended topology: one thread per core, every vCPU a core of one package.
            if e.index == 0:
                e = e.replace(eax=0, ebx=1, ecx=(1 << 8) | 0, edx=vcpu_id)
            elif e.index == 1:
                shift = max(ncpus - 1, 0).bit_length()
                e = e.replace(eax=shift, ebx=ncpus, ecx=(2 << 8) | 1, edx=vcpu_id)
            else:
                e = e.replace(eax=0, ebx=0, ecx=e.index, edx=vcpu_id)
        elif e.function == 0x4:
            # Cores per package - 1 in eax[31:26].
            e = e.replace(eax=(e.eax & 0x3FFFFFF) | ((max(ncpus, 1) - 1) << 26))
        out.append(e)
    return out


def configure_vcpu(vcpu: Vcpu, supported: list[CpuidEntry], ncpus: int, entry: int | None) -> int:
    """Set CPUID, MSRs, FPU and LAPIC; for the BSP (entry given) also long mode. Returns MSRs set."""
    vcpu.set_cpuid(vcpu_cpuid(supported, vcpu.id, ncpus))
    msrs = boot_msrs()
    accepted = vcpu.set_msrs(msrs)
    setup_fpu(vcpu)
    setup_lapic(vcpu)
    if entry is not None:
        setup_long_mode(vcpu, entry)
    return accepted
