"""seccomp allowlists (issue 14): the VMM runs a guest program under its filter, and a
syscall outside the list kills the filtered VMM with a log line naming it. Through the real
`pymvm run` (the filter cannot be removed, so never in the test process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_boot import make_elf

REPO = Path(__file__).resolve().parents[2]
ENTRY = 0x1000000
# 64-bit code: print "OK\n" on COM1, then pulse the i8042 reset line (the VM ends, status 0).
SAY_OK_THEN_RESET = bytes([
    0x66, 0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0xB0, 0x4F, 0xEE,  # mov al, 'O'; out dx, al
    0xB0, 0x4B, 0xEE,  # mov al, 'K'; out dx, al
    0xB0, 0x0A, 0xEE,  # mov al, '\n'; out dx, al
    0xB0, 0xFE, 0xE6, 0x64,  # mov al, 0xfe; out 0x64, al  (i8042: reset)
    0xF4, 0xEB, 0xFD,  # 1: hlt; jmp 1b
])


def seccomp_available() -> bool:
    from pymvm import syscalls

    return syscalls.available()


pytestmark = pytest.mark.skipif(not seccomp_available(),
                                reason="libseccomp's Python binding is missing: apt-get install python3-seccomp")


def run_vm(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(ENTRY, SAY_OK_THEN_RESET, 0x1000)], ENTRY))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'id = "seccomp"\n[machine]\nvcpus = 2\nmemory_mib = 64\n'
                   f'[boot]\nkernel = "{kernel}"\ncmdline = "console=ttyS0"\n')
    return subprocess.run([sys.executable, "-m", "pymvm.cli", "run", str(cfg), *extra], cwd=REPO,
                          env={**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state"), **(env or {})},
                          capture_output=True, timeout=120)


def events(stderr: bytes) -> list[dict]:
    out = []
    for line in stderr.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_vmm_runs_a_guest_program_under_its_seccomp_filter(tmp_path: Path) -> None:
    done = run_vm(tmp_path)
    logs = events(done.stderr)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"OK" in done.stdout
    installed = [e for e in logs if e.get("event") == "seccomp_installed"]
    assert installed and installed[0]["process"] == "vmm" and installed[0]["syscalls"] > 50
    assert not [e for e in logs if e.get("event") == "seccomp_violation"]


def test_vmm_without_seccomp_installs_no_filter(tmp_path: Path) -> None:
    done = run_vm(tmp_path, "--no-seccomp", env={"PYMVM_SECCOMP_SELF_TEST": "vmm"})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert not [e for e in events(done.stderr) if e.get("event") == "seccomp_installed"]


def test_forbidden_syscall_kills_the_filtered_vmm_and_the_log_names_it(tmp_path: Path) -> None:
    done = run_vm(tmp_path, env={"PYMVM_SECCOMP_SELF_TEST": "vmm"})
    assert done.returncode == -signal.SIGSYS, done.stderr.decode()[-3000:]
    (violation,) = [e for e in events(done.stderr) if e.get("event") == "seccomp_violation"]
    assert violation["syscall"] == "reboot" and violation["process"] == "vmm"
    assert b"OK" not in done.stdout  # killed before any vCPU ran
    subprocess.run([sys.executable, "-m", "pymvm.cli", "cleanup"], cwd=REPO, timeout=60,
                   env={**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state")}, check=True,
                   capture_output=True)
