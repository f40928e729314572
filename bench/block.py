"""Block benchmark: a guest's disk through pymvm's built-in vhost-user-blk back-end, through
qemu-storage-daemon's vhost-user-blk export (both with pymvm as the VMM and front-end), and
through QEMU microvm's own virtio-blk, same kernel, initramfs, image file and host.

    python bench/block.py [-t SECONDS] [--size-mib N]     (needs KVM that boots Linux)

In the guest (bzImage + the test initramfs built ``--with fio``, one vCPU) fio measures, on
the raw disk /dev/vda with O_DIRECT:
  4 KiB random read and random write IOPS at queue depth 32, and
  1 MiB sequential read and write throughput.
The guest kernel has neither AIO nor io_uring (a minimal config), so queue depth 32 is 32
fio threads doing synchronous I/O (psync, numjobs=32): 32 requests in flight at the device.
Nor has it System V IPC, where fio keeps its job table: ``bench/shm_malloc.c``, compiled
here and preloaded into fio, gives it that memory from calloc (all jobs are threads).

Prints each back-end's numbers, then `builtin_vs_qsd_iops=X` (the mean of the random read
and random write IOPS ratios), `builtin_vs_qsd_seq=Y` (the mean of the sequential read and
write throughput ratios), and the same against QEMU (`builtin_vs_qemu_*`). The image lives
where the nested host keeps /tmp (memory), written in full first so that no read hits a
hole; every back-end uses the host page cache (QEMU's and qsd's defaults, the built-in's
only mode).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import stop

CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
MEMORY_MIB = 1024  # the fio initramfs is ~90 MiB, unpacked in guest RAM
BACKENDS = ("builtin", "qsd", "qemu")
JOBS = {
    # name: (fio --rw, block size, threads)
    "randread": ("randread", "4k", 32),
    "randwrite": ("randwrite", "4k", 32),
    "seqread": ("read", "1M", 1),
    "seqwrite": ("write", "1M", 1),
}
START_TIMEOUT_S = 180


def guest_command(seconds: int, shim: Path) -> str:
    """fio's terse (v3) lines, one per job, each prefixed with its name."""
    parts = []
    for name, (rw, bs, threads) in JOBS.items():
        parts.append(
            f"echo -n 'FIO {name} '; LD_PRELOAD={shim} fio --name={name} --filename=/dev/vda --rw={rw} --bs={bs} "
            f"--numjobs={threads} --thread --ioengine=psync --direct=1 --runtime={seconds} "
            f"--time_based --ramp_time=1 --group_reporting --output-format=terse "
            f"--terse-version=3 | tail -1")
    return "; ".join(parts)


def parse(console: str) -> dict[str, float]:
    """{randread, randwrite: IOPS; seqread, seqwrite: MiB/s} from the guest's console."""
    results: dict[str, float] = {}
    for line in console.splitlines():
        if not line.startswith("FIO "):
            continue
        name, _, terse = line[4:].partition(" ")
        fields = terse.strip().split(";")
        if name not in JOBS or len(fields) < 49:
            continue
        # terse v3: read bw (KiB/s) and IOPS are fields 7 and 8, write's 48 and 49 (1-based).
        read_bw, read_iops, write_bw, write_iops = (float(fields[i]) for i in (6, 7, 47, 48))
        if name == "randread":
            results[name] = read_iops
        elif name == "randwrite":
            results[name] = write_iops
        elif name == "seqread":
            results[name] = read_bw / 1024
        else:
            results[name] = write_bw / 1024
    if set(results) != set(JOBS):
        raise RuntimeError(f"could not parse fio's results (got {sorted(results)}):\n"
                           f"{console[-3000:]}")
    return results


def build_shm_shim() -> Path:
    """bench/shm_malloc.c as a shared library in the cache (its path goes into the guest)."""
    from pymvm.images.cache import cache_root

    out = cache_root(None) / "bench" / "libshm_malloc.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = Path(__file__).with_name("shm_malloc.c")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-lpthread"],
                   check=True)
    tmp.replace(out)
    return out


def make_image(path: Path, size_mib: int) -> None:
    """A raw image with data in every block (a sparse file's holes read unrealistically)."""
    chunk = (b"pymvm-bench-block" * 61681)[: 1 << 20]
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)


def pymvm_config(path: Path, kernel: Path, initrd: Path, command: str, block: str) -> Path:
    from pymvm.images.initramfs import encode_cmd

    path.write_text(
        f'id = "bench-block"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
        f'[boot]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
        f'cmdline = "{CMDLINE} {encode_cmd(command)}"\n'
        f'[serial]\noutput = "stdout"\ninput = false\n{block}')
    return path


def run_console(argv: list[str], timeout: float) -> str:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    return proc.stdout.decode(errors="replace")


def start_qsd(image: Path, sock: Path) -> subprocess.Popen:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise RuntimeError("qemu-storage-daemon not found: apt-get install qemu-system-common")
    proc = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={image}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                     "writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon did not start")
        time.sleep(0.1)
    return proc


def run_backend(name: str, tmp: Path, kernel: Path, initrd: Path, image: Path,
                command: str, timeout: float) -> dict[str, float]:
    pymvm = [sys.executable, "-m", "pymvm.cli", "run"]
    if name == "builtin":
        cfg = pymvm_config(tmp / "builtin.toml", kernel, initrd, command,
                           f'[[block]]\nid = "bench"\npath = "{image}"\n')
        return parse(run_console([*pymvm, str(cfg)], timeout))
    if name == "qsd":
        sock = tmp / "qsd.sock"
        qsd = start_qsd(image, sock)
        try:
            cfg = pymvm_config(tmp / "qsd.toml", kernel, initrd, command,
                               f'[[block]]\nid = "bench"\nbackend = "vhost-user"\n'
                               f'socket = "{sock}"\n')
            return parse(run_console([*pymvm, str(cfg)], timeout))
        finally:
            stop(qsd)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    from pymvm.images.initramfs import encode_cmd

    argv = [qemu, "-M", "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on",
            "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", str(MEMORY_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"{CMDLINE} {encode_cmd(command)}",
            "-drive", f"file={image},format=raw,if=none,id=d0",
            "-device", "virtio-blk-device,drive=d0"]
    return parse(run_console(argv, timeout))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--seconds", type=int, default=10, help="seconds per fio job")
    p.add_argument("--size-mib", type=int, default=512, help="disk image size")
    p.add_argument("--backends", default=",".join(BACKENDS))
    args = p.parse_args()

    from pymvm.images.initramfs import build_initramfs
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    if kernel is None:
        print("bench/block: build the guest kernel first: pymvm build-kernel", file=sys.stderr)
        return 2
    if shutil.which("fio") is None:
        print("bench/block: fio not found: apt-get install fio (scripts/setup does)", file=sys.stderr)
        return 2
    shim = build_shm_shim()
    from pymvm.images.cache import cache_root

    latest = cache_root(None) / "initramfs" / "latest"  # @test-initramfs: keep pointing there
    before = latest.read_bytes() if latest.exists() else None
    initrd = build_initramfs(extra_binaries=["fio", str(shim)], log=lambda *_: None)
    if before is not None:
        latest.write_bytes(before)
    command = guest_command(args.seconds, shim)
    timeout = 600 + 8 * args.seconds * len(JOBS)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-block-") as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "disk.img"
        make_image(image, args.size_mib)
        print(f"image {args.size_mib} MiB in {tmp}, {os.cpu_count()} host CPUs, fio {args.seconds} s "
              f"per job", flush=True)
        for name in args.backends.split(","):
            started = time.monotonic()
            results[name] = run_backend(name, tmp, kernel.bzimage, initrd, image, command, timeout)
            r = results[name]
            print(f"{name}: randread {r['randread']:.0f} IOPS, randwrite {r['randwrite']:.0f} IOPS, "
                  f"seqread {r['seqread']:.1f} MiB/s, seqwrite {r['seqwrite']:.1f} MiB/s "
                  f"({time.monotonic() - started:.0f} s)", flush=True)

    def ratios(other: str) -> tuple[float, float]:
        a, b = results["builtin"], results[other]
        iops = (a["randread"] / b["randread"] + a["randwrite"] / b["randwrite"]) / 2
        seq = (a["seqread"] / b["seqread"] + a["seqwrite"] / b["seqwrite"]) / 2
        return iops, seq

    if "builtin" in results and "qsd" in results:
        iops, seq = ratios("qsd")
        print(f"builtin_vs_qsd_iops={iops:.2f}")
        print(f"builtin_vs_qsd_seq={seq:.2f}")
    if "builtin" in results and "qemu" in results:
        iops, seq = ratios("qemu")
        print(f"builtin_vs_qemu_iops={iops:.2f}")
        print(f"builtin_vs_qemu_seq={seq:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
