"""`pymvm run` without a control API: the main thread waits in epoll, not in asyncio
(VirtualMachine.wait, issue 15). Guest programs on this host's /dev/kvm, through the real
CLI, check what the asyncio loop did before: partial serial lines come out, terminal input
reaches the guest, SIGTERM and SIGINT stop the VM with 128+N, and an idle VMM sleeps."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_boot import make_elf

REPO = Path(__file__).resolve().parents[2]
ENTRY = 0x1000000

# 64-bit code: print "login: " on COM1 (no newline), then halt for good.
PROMPT_THEN_HALT = bytes([
    0x66, 0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    *[b for c in b"login: " for b in (0xB0, c, 0xEE)],  # mov al, c; out dx, al
    0xFA,  # cli
    0xF4, 0xEB, 0xFD,  # 1: hlt; jmp 1b
])

# 64-bit code: echo what COM1 receives (polling LSR.DR) until a 'q', then pulse the i8042
# reset line (the VM ends, status 0).
ECHO_UNTIL_Q = bytes([
    0x66, 0xBA, 0xFD, 0x03,  # 0:  mov dx, 0x3fd (LSR)
    0xEC,  # 4:  poll: in al, dx
    0xA8, 0x01,  # 5:  test al, 1 (data ready)
    0x74, 0xFB,  # 7:  jz poll
    0x66, 0xBA, 0xF8, 0x03,  # 9:  mov dx, 0x3f8 (RBR/THR)
    0xEC,  # 13: in al, dx
    0xEE,  # 14: out dx, al
    0x3C, 0x71,  # 15: cmp al, 'q'
    0x74, 0x06,  # 17: je reset
    0x66, 0xBA, 0xFD, 0x03,  # 19: mov dx, 0x3fd
    0xEB, 0xEB,  # 23: jmp poll
    0xB0, 0xFE, 0xE6, 0x64,  # 25: reset: mov al, 0xfe; out 0x64, al
    0xF4, 0xEB, 0xFD,  # hlt; jmp
])


def start_vm(tmp_path: Path, code: bytes, *, serial_input: bool) -> subprocess.Popen[bytes]:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(ENTRY, code, 0x1000)], ENTRY))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'id = "wait"\n[machine]\nvcpus = 1\nmemory_mib = 64\n'
                   f'[boot]\nkernel = "{kernel}"\ncmdline = "console=ttyS0"\n'
                   f'[serial]\noutput = "stdout"\ninput = {str(serial_input).lower()}\n')
    return subprocess.Popen([sys.executable, "-m", "pymvm.cli", "run", str(cfg)], cwd=REPO,
                            env={**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state")},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen[bytes], wanted: bytes, timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    while wanted not in out:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, (out, proc.poll())
        if select.select([proc.stdout], [], [], min(left, 0.5))[0]:
            out += os.read(proc.stdout.fileno(), 4096)
    return out


def main_thread_switches(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def stop(proc: subprocess.Popen[bytes], signum: int) -> tuple[int, bytes]:
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_prompt_without_newline_comes_out_and_the_signal_stops_the_vm(
        tmp_path: Path, signum: int) -> None:
    proc = start_vm(tmp_path, PROMPT_THEN_HALT, serial_input=False)
    try:
        assert read_until(proc, b"login: ") == b"login: "  # flushed with no newline after it
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    rc, err = stop(proc, signum)
    assert rc == 128 + signum, err[-2000:]
    assert b'"vm_stopped"' in err and b'"signal"' in err


def test_an_idle_vmm_does_not_wake_up_to_poll(tmp_path: Path) -> None:
    # The guest printed its prompt and halted: nothing is pending, so the main thread sleeps
    # (the asyncio loop it replaced woke every 20 ms to flush the serial port).
    proc = start_vm(tmp_path, PROMPT_THEN_HALT, serial_input=False)
    try:
        read_until(proc, b"login: ")
        time.sleep(0.5)  # the flush after the prompt, and the VMM's start, are behind it
        before = main_thread_switches(proc.pid)
        time.sleep(2.0)
        woke = main_thread_switches(proc.pid) - before
    finally:
        rc, err = stop(proc, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert woke < 10, f"the idle VMM's main thread woke {woke} times in 2 s"


def test_terminal_input_reaches_the_guest_and_its_echo_comes_back(tmp_path: Path) -> None:
    proc = start_vm(tmp_path, ECHO_UNTIL_Q, serial_input=True)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert read_until(proc, b"hello\n") == b"hello\n"
        proc.stdin.write(b"q")  # the guest resets: the VM ends by itself, status 0
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert out == b"q"
