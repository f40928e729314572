"""Tiny guest programs for the kvm tier: a hand encoder, vCPU set-up and a recording device.

The encoder knows only the few x86 instructions these tests use, each written out as its
bytes (Intel SDM vol. 2 opcode tables), so the tier needs no assembler. Jumps take labels
(rel8) and 16-bit immediates/addresses may be labels (absolute, from ``origin``).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

import pytest

from pymvm.boot import cpu
from pymvm.devices.bus import BusDevice
from pymvm.kvm import Vcpu
from pymvm.machine import Machine, StopKind, StopReason


class AsmError(Exception):
    """A guest program could not be encoded (unknown label, jump out of range, wrong mode)."""


Imm = int | str  # a number, or a label resolved to its absolute address


class Asm:
    """Encodes a guest program placed at guest-physical ``origin`` in 16- or 64-bit mode."""

    def __init__(self, origin: int, bits: int = 16) -> None:
        if bits not in (16, 64):
            raise AsmError(f"{bits}-bit code is not supported; use 16 or 64")
        self.origin = origin
        self.bits = bits
        self._code = bytearray()
        self._labels: dict[str, int] = {}
        # (position in code, label, kind): kind "rel8" or "abs16"
        self._fixups: list[tuple[int, str, str]] = []

    # ---- structure -------------------------------------------------------------------------
    def label(self, name: str) -> Asm:
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)
        return self

    def addr(self, name: str) -> int:
        """Guest-physical address of a label."""
        try:
            return self.origin + self._labels[name]
        except KeyError:
            raise AsmError(f"label {name!r} is not defined") from None

    def db(self, data: bytes) -> Asm:
        self._code += data
        return self

    def assemble(self) -> bytes:
        code = bytearray(self._code)
        for pos, name, kind in self._fixups:
            target = self.addr(name)
            if kind == "rel8":
                rel = target - (self.origin + pos + 1)
                if not -128 <= rel <= 127:
                    raise AsmError(f"jump to {name!r} is {rel} bytes away, beyond rel8 range")
                code[pos] = rel & 0xFF
            else:
                if target > 0xFFFF:
                    raise AsmError(f"label {name!r} at {target:#x} is beyond a 16-bit address")
                struct.pack_into("<H", code, pos, target)
        return bytes(code)

    def _emit(self, *parts: int) -> Asm:
        self._code += bytes(parts)
        return self

    def _imm16(self, value: Imm) -> Asm:
        if isinstance(value, str):
            self._fixups.append((len(self._code), value, "abs16"))
            value = 0
        self._code += struct.pack("<H", value)
        return self

    def _imm32(self, value: int) -> Asm:
        self._code += struct.pack("<I", value)
        return self

    def _rel8(self, opcode: int, target: str) -> Asm:
        self._emit(opcode)
        self._fixups.append((len(self._code), target, "rel8"))
        return self._emit(0)

    def _mode(self, bits: int, what: str) -> None:
        if self.bits != bits:
            raise AsmError(f"{what} is encoded here for {bits}-bit code only")

    # ---- both modes ----------------------------------------------------------------------
    def mov_al(self, imm: int) -> Asm:
        return self._emit(0xB0, imm)  # mov al, imm8

    def in_al_dx(self) -> Asm:
        return self._emit(0xEC)  # in al, dx

    def in_al_port(self, port: int) -> Asm:
        return self._emit(0xE4, port)  # in al, imm8

    def out_dx_al(self) -> Asm:
        return self._emit(0xEE)  # out dx, al

    def out_port_al(self, port: int) -> Asm:
        return self._emit(0xE6, port)  # out imm8, al

    def test_al(self, imm: int) -> Asm:
        return self._emit(0xA8, imm)  # test al, imm8

    def cmp_al(self, imm: int) -> Asm:
        return self._emit(0x3C, imm)  # cmp al, imm8

    def jz(self, target: str) -> Asm:
        return self._rel8(0x74, target)

    def jnz(self, target: str) -> Asm:
        return self._rel8(0x75, target)

    def jmp(self, target: str) -> Asm:
        return self._rel8(0xEB, target)

    def spin(self) -> Asm:
        return self._emit(0xEB, 0xFE)  # jmp $

    def hlt(self) -> Asm:
        return self._emit(0xF4)

    def cli(self) -> Asm:
        return self._emit(0xFA)

    def sti(self) -> Asm:
        return self._emit(0xFB)

    def int3(self) -> Asm:
        return self._emit(0xCC)

    def ud2(self) -> Asm:
        return self._emit(0x0F, 0x0B)  # raises #UD (vector 6)

    def lodsb(self) -> Asm:
        return self._emit(0xAC)  # al = [ds:si], si += 1

    def rep_outsb(self) -> Asm:
        return self._emit(0xF3, 0x6E)  # cx times: out dx, [ds:si]; si += 1

    def rep_insb(self) -> Asm:
        return self._emit(0xF3, 0x6C)  # cx times: in [es:di], dx; di += 1

    # ---- 16-bit (real mode) ----------------------------------------------------------------
    def mov_ax(self, imm: Imm) -> Asm:
        self._mode(16, "mov ax, imm16")
        return self._emit(0xB8)._imm16(imm)

    def mov_cx(self, imm: Imm) -> Asm:
        self._mode(16, "mov cx, imm16")
        return self._emit(0xB9)._imm16(imm)

    def mov_dx(self, imm: Imm) -> Asm:
        self._mode(16, "mov dx, imm16")
        return self._emit(0xBA)._imm16(imm)

    def mov_di(self, imm: Imm) -> Asm:
        self._mode(16, "mov di, imm16")
        return self._emit(0xBF)._imm16(imm)

    def mov_si(self, imm: Imm) -> Asm:
        self._mode(16, "mov si, imm16")
        return self._emit(0xBE)._imm16(imm)

    def mov_ds_ax(self) -> Asm:
        self._mode(16, "mov ds, ax")
        return self._emit(0x8E, 0xD8)

    def mov_byte_mem_imm(self, addr: Imm, imm: int) -> Asm:
        self._mode(16, "mov byte [disp16], imm8")
        return self._emit(0xC6, 0x06)._imm16(addr)._emit(imm)

    def mov_word_mem_imm(self, addr: Imm, imm: Imm) -> Asm:
        self._mode(16, "mov word [disp16], imm16")
        return self._emit(0xC7, 0x06)._imm16(addr)._imm16(imm)

    def mov_ax_mem(self, addr: Imm) -> Asm:
        self._mode(16, "mov ax, [disp16]")
        return self._emit(0xA1)._imm16(addr)

    def in_ax_dx(self) -> Asm:
        self._mode(16, "in ax, dx")
        return self._emit(0xED)

    def out_dx_ax(self) -> Asm:
        self._mode(16, "out dx, ax")
        return self._emit(0xEF)

    def lidt(self, addr: Imm) -> Asm:
        self._mode(16, "lidt [disp16]")
        return self._emit(0x0F, 0x01, 0x1E)._imm16(addr)

    def iret(self) -> Asm:
        self._mode(16, "iret")
        return self._emit(0xCF)

    # ---- 64-bit (long mode) ----------------------------------------------------------------
    # Addresses above 2 GiB go through rbx: a disp32 would be sign-extended to 0xffff_ffff_....
    def mov_eax(self, imm: int) -> Asm:
        self._mode(64, "mov eax, imm32")
        return self._emit(0xB8)._imm32(imm)

    def mov_ebx(self, imm: int) -> Asm:
        self._mode(64, "mov ebx, imm32")  # zero-extends into rbx
        return self._emit(0xBB)._imm32(imm)

    def mov_edx(self, imm: int) -> Asm:
        self._mode(64, "mov edx, imm32")
        return self._emit(0xBA)._imm32(imm)

    def mov_dword_rbx_eax(self) -> Asm:
        self._mode(64, "mov [rbx], eax")
        return self._emit(0x89, 0x03)

    def mov_byte_rbx_imm(self, imm: int) -> Asm:
        self._mode(64, "mov byte [rbx], imm8")
        return self._emit(0xC6, 0x03, imm)

    def mov_eax_dword_rbx(self) -> Asm:
        self._mode(64, "mov eax, [rbx]")
        return self._emit(0x8B, 0x03)

    def mov_ax_word_rbx(self) -> Asm:
        self._mode(64, "mov ax, [rbx]")
        return self._emit(0x66, 0x8B, 0x03)

    def mov_rax_qword_rbx(self) -> Asm:
        self._mode(64, "mov rax, [rbx]")
        return self._emit(0x48, 0x8B, 0x03)

    def inc_qword_rbx(self) -> Asm:
        self._mode(64, "inc qword [rbx]")
        return self._emit(0x48, 0xFF, 0x03)

    def shr_rax(self, count: int) -> Asm:
        self._mode(64, "shr rax, imm8")
        return self._emit(0x48, 0xC1, 0xE8, count)

    def out_dx_eax(self) -> Asm:
        self._mode(64, "out dx, eax")
        return self._emit(0xEF)


# ---- placing programs and setting up vCPUs ------------------------------------------------

def load(machine: Machine, asm: Asm) -> bytes:
    """Write ``asm`` into guest memory at its origin; returns the bytes written."""
    code = asm.assemble()
    assert machine.memory is not None
    machine.memory.write(asm.origin, code)
    return code


def setup_real_mode(vcpu: Vcpu, rip: int, *, sp: int = 0x8000) -> None:
    """Real mode with every segment at base 0 (the reset state has cs at 0xffff_0000)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = rip
    regs.rsp = sp
    regs.rflags = 0x2  # bit 1 is reserved-one; IF clear
    vcpu.set_regs(regs)


def setup_64bit(machine: Machine, vcpu: Vcpu, entry: int) -> None:
    """Long mode as pymvm boots Linux: its GDT, identity-mapped 4 GiB, rip at ``entry``."""
    assert machine.memory is not None
    cpu.write_gdt(machine.memory)
    cpu.write_page_tables(machine.memory)
    cpu.setup_long_mode(vcpu, entry=entry)


# ---- a device that records what the guest does ----------------------------------------------

@dataclass(frozen=True)
class Access:
    offset: int
    data: bytes  # written bytes; for a read, the bytes returned
    is_write: bool
    thread: threading.Thread


@dataclass
class Recorder:
    """BusDevice that records every access; reads come from ``inner`` or ``read_values``.

    ``read_values`` maps an offset to the little-endian value returned there (unset: 0).
    With ``inner`` (a real device), accesses are forwarded to it and only observed here.
    """

    read_values: dict[int, int] = field(default_factory=dict)
    inner: BusDevice | None = None
    accesses: list[Access] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def read(self, offset: int, data: bytearray) -> None:
        if self.inner is not None:
            self.inner.read(offset, data)
        else:
            value = self.read_values.get(offset, 0)
            data[:] = value.to_bytes(8, "little")[: len(data)]
        self._record(Access(offset, bytes(data), False, threading.current_thread()))

    def write(self, offset: int, data: bytes) -> None:
        self._record(Access(offset, bytes(data), True, threading.current_thread()))
        if self.inner is not None:
            self.inner.write(offset, data)

    def _record(self, access: Access) -> None:
        with self._cond:
            self.accesses.append(access)
            self._cond.notify_all()

    @property
    def writes(self) -> list[Access]:
        with self._cond:
            return [a for a in self.accesses if a.is_write]

    @property
    def reads(self) -> list[Access]:
        with self._cond:
            return [a for a in self.accesses if not a.is_write]

    def written_bytes(self) -> bytes:
        return b"".join(a.data for a in self.writes)

    def wait_for_writes(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` writes arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: sum(a.is_write for a in self.accesses) >= count, timeout)


def run_to_stop(machine: Machine, timeout: float = 5.0) -> StopReason:
    """Start ``machine``, wait for it to stop by itself, join its vCPU threads."""
    machine.start()
    reason = machine.wait(timeout)
    if reason is None:
        machine.request_stop(StopReason(StopKind.REQUESTED, "test timed out", 1))
        machine.join()
        pytest.fail(f"guest did not stop by itself within {timeout} s")
    machine.join()
    return reason
