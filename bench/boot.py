"""Boot benchmark: pymvm against QEMU's microvm machine, same kernel, initramfs and host.

Each VMM boots the microVM bzImage with the test initramfs N times. Measured per boot:
  - boot time: from spawning the VMM process to the guest's ready marker on the console
    (the test init writes the boot timer and prints the marker back to back, so this is
    the moment of the boot-timer write as seen from outside, for both VMMs alike);
  - memory overhead: the VMM's RSS minus the RSS of its guest-RAM mapping, sampled at the
    ready marker.
Prints medians, then `boot_time_ratio=X` and `memory_overhead_ratio=Y` (pymvm / QEMU).
Then the VMM's own start-up: from process start (its execve) to the first KVM_RUN ioctl,
both read from an `strace -f -ttt` of each VMM alike (`--startup-runs`, 3 by default, in runs
of their own since tracing slows the boot), printed as `startup_ratio=X`.

The stock part (`--stock-runs`, 1 by default) boots the distribution kernel the host runs
(Debian's /boot/vmlinuz-*) with the test initramfs plus its virtio modules, with ACPI on in
both VMMs (pymvm's "auto" detects it; QEMU microvm's default), and prints
`stock_boot_time_ratio=X`. `--parts stock` runs only that part.

Run it with bench/boot (which uses the nested KVM host where this one cannot boot Linux).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = b"PYMVM-READY"
MEMORY_MIB = 256
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"  # QEMU microvm has no i8042: triple-fault reboot


def guest_ram_rss_kib(pid: int, size_mib: int) -> tuple[int, int]:
    """(total RSS, RSS of the mapping that is guest RAM) in KiB, from /proc/PID/smaps."""
    total = guest = 0
    current_size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                current_size = hi - lo
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if current_size is not None and current_size == size_mib << 20:
                    guest = max(guest, kib)
    return total, guest


def boot_once(argv: list[str], timeout: float = 300.0) -> tuple[float, int]:
    """Spawn a VMM, wait for the ready marker; returns (seconds, overhead KiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    seen = b""
    try:
        fd = proc.stdout.fileno()
        while READY not in seen:
            remaining = timeout - (time.monotonic() - start)
            if remaining <= 0 or proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                raise RuntimeError(f"{argv[0]}: no ready marker (rc={proc.poll()}): {seen[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk and proc.poll() is not None:
                    continue
                seen += chunk
        elapsed = time.monotonic() - start
        total, guest = guest_ram_rss_kib(proc.pid, MEMORY_MIB)
        proc.stdout.close()
        proc.wait(timeout=timeout)
        return elapsed, total - guest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def interleaved(vmms: dict[str, list[str]], runs: int, label: str) -> dict[str, tuple[float, float]]:
    """Boot each VMM ``runs`` times, alternating; {name: (median seconds, median KiB)}."""
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in vmms}
    # Interleave the VMMs so that drift in the host's speed hits both alike.
    for i in range(runs):
        for name, argv in vmms.items():
            t, overhead = boot_once(argv)
            results[name].append((t, overhead))
            print(f"{label} run {i + 1:2d} {name:5s} boot {t * 1000:8.1f} ms  "
                  f"overhead {overhead / 1024:7.1f} MiB", flush=True)
    return {name: (statistics.median(t for t, _ in r), statistics.median(o for _, o in r))
            for name, r in results.items()}


def startup_once(argv: list[str], trace: Path, timeout: float = 300.0) -> float:
    """Seconds from the VMM's execve to its first KVM_RUN ioctl, both read from one
    `strace -f -ttt` of the process, the same way for every VMM; the VMM is killed then."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace not found: apt-get install strace")
    proc = subprocess.Popen([strace, "-f", "-ttt", "-qq", "-e", "trace=execve,ioctl",
                             "-o", str(trace), *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    vmm_pid = None
    try:
        while True:
            text = trace.read_text(errors="replace") if trace.exists() else ""
            execs = [ln for ln in text.splitlines() if " execve(" in ln]
            runs = [ln for ln in text.splitlines() if "KVM_RUN" in ln]
            if execs and vmm_pid is None:
                vmm_pid = int(execs[0].split()[0])  # with -f every line starts with the pid
            if execs and runs:
                return _trace_time(runs[0]) - _trace_time(execs[0])
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]}: no KVM_RUN traced (rc={proc.poll()}): {text[-800:]}")
            time.sleep(0.05)
    finally:
        if vmm_pid is not None:  # the traced VMM first: strace's death would leave it running
            try:
                os.kill(vmm_pid, 9)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


def _trace_time(line: str) -> float:
    """The -ttt timestamp of a strace -f line ("PID SECONDS.USEC call(...)")."""
    fields = line.split()
    return float(fields[1] if fields[0].isdigit() else fields[0])


def startup_part(vmms: dict[str, list[str]], runs: int, tmp: Path) -> float:
    """Median process start to first KVM_RUN per VMM, interleaved; returns pymvm / QEMU."""
    times: dict[str, list[float]] = {name: [] for name in vmms}
    for i in range(runs):
        for name, argv in vmms.items():
            t = startup_once(argv, tmp / f"startup-{name}-{i}.trace")
            times[name].append(t)
            print(f"startup run {i + 1:2d} {name:5s} first KVM_RUN after {t * 1000:8.1f} ms", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in med.items():
        print(f"{name}: median start-up (process start to first KVM_RUN) {t * 1000:.1f} ms")
    return med["pymvm"] / med["qemu"]


def pymvm_argv(config: Path, kernel: Path, initrd: Path, cmdline: str) -> list[str]:
    config.write_text(
        f'id = "bench"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
        f'[boot]\nkernel = "{kernel}"\ninitrd = "{initrd}"\ncmdline = "{cmdline}"\n'
        '[serial]\noutput = "stdout"\ninput = false\n')
    return [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)]


def qemu_argv(qemu: str, machine: str, kernel: Path, initrd: Path, cmdline: str) -> list[str]:
    return [qemu, "-M", machine, "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", str(MEMORY_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def stock_part(qemu: str, runs: int, tmp: Path, cmdline: str) -> float:
    """The stock kernel, ACPI on in both VMMs; returns pymvm's median / QEMU's."""
    from pymvm.images.initramfs import DEFAULT_MODULES, build_initramfs, default_kernel_release

    release = default_kernel_release()
    kernel = Path("/boot") / f"vmlinuz-{release}"
    initrd = build_initramfs(extra_binaries=["iperf3"], modules=DEFAULT_MODULES,
                             kernel_release=release, log=lambda *_: None)
    print(f"stock kernel {kernel.name}, initramfs with its virtio modules", flush=True)
    vmms = {
        "pymvm": pymvm_argv(tmp / "stock.toml", kernel, initrd, cmdline),
        # microvm's ACPI is on by default ("auto"): DSDT, MADT and a hardware-reduced FADT.
        "qemu": qemu_argv(qemu, "microvm,acpi=on,x-option-roms=off,rtc=off,isa-serial=on",
                          kernel, initrd, cmdline),
    }
    med = interleaved(vmms, runs, "stock")
    for name, (t, o) in med.items():
        print(f"stock {name}: median boot {t * 1000:.1f} ms, median VMM memory overhead {o / 1024:.1f} MiB")
    return med["pymvm"][0] / med["qemu"][0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=10)
    p.add_argument("--exec-runs", type=int, default=1,
                   help="time to the first command result through the agent over vsock, per "
                        "VMM (bench/first_exec.py; 0: skip)")
    p.add_argument("--stock-runs", type=int, default=1,
                   help="boots per VMM of the stock distribution kernel (0: skip that part)")
    p.add_argument("--startup-runs", type=int, default=3,
                   help="runs per VMM of the start-up measurement: process start to the first "
                        "KVM_RUN, both from strace -f -ttt (0: skip)")
    p.add_argument("--parts", default="microvm,stock,exec",
                   help="comma-separated: microvm (pymvm's kernel), stock (the distribution "
                        "kernel), exec (first command result over vsock)")
    args = p.parse_args()
    parts = set(args.parts.split(","))

    from pymvm.images.initramfs import build_initramfs, encode_cmd
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    if kernel is None and "microvm" in parts:
        print("bench/boot: build the kernel first: pymvm build-kernel", file=sys.stderr)
        return 2
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("bench/boot: qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    cmdline = f"{CMDLINE} {encode_cmd('true')}"

    with tempfile.TemporaryDirectory(prefix="pymvm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if "microvm" in parts and args.runs > 0:
            vmms = {
                "pymvm": pymvm_argv(tmp / "vm.toml", kernel.bzimage, initramfs, cmdline),
                "qemu": qemu_argv(qemu, "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on",
                                  kernel.bzimage, initramfs, cmdline),
            }
            med = interleaved(vmms, args.runs, "microvm")
            for name, (t, o) in med.items():
                print(f"{name}: median boot {t * 1000:.1f} ms, median VMM memory overhead {o / 1024:.1f} MiB")
            print(f"boot_time_ratio={med['pymvm'][0] / med['qemu'][0]:.3f}")
            print(f"memory_overhead_ratio={med['pymvm'][1] / med['qemu'][1]:.3f}", flush=True)
            if args.startup_runs > 0:
                ratio = startup_part(vmms, args.startup_runs, tmp)
                print(f"startup_ratio={ratio:.3f}", flush=True)
        if "stock" in parts and args.stock_runs > 0:
            ratio = stock_part(qemu, args.stock_runs, tmp, cmdline)
            print(f"stock_boot_time_ratio={ratio:.3f}")
        if "exec" in parts and args.exec_runs > 0 and kernel is not None:
            from first_exec import exec_part

            ratio, p50_ms = exec_part(qemu, kernel.bzimage, initramfs, Path(tmp), args.exec_runs,
                                      MEMORY_MIB, CMDLINE)
            print(f"first_exec_ratio={ratio:.3f}")
            print(f"run_true_p50_ms={p50_ms:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
