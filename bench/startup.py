"""Native start-up of the VMMs: CPU time and system calls from exec to the first KVM_RUN.

bench/boot's start-up part times the same interval under the nested host's emulation with
`strace -f -ttt`, where tracing every call and the emulation both inflate it. This one runs
on the host it is started on (any /dev/kvm that gets a vCPU to its first KVM_RUN, such as
the development machine's kvm_pvm, where Linux guests do not boot) and measures each VMM
(pymvm with bench/boot's argv and VM, and QEMU microvm with bench/boot's argv) exactly:

  - a seccomp filter installed in the child before its exec kills the whole process at its
    first ioctl(KVM_RUN) (SECCOMP_RET_KILL_PROCESS, no core dump), so the process's CPU
    time (user + system, all threads, from wait4's rusage) is that of exec to first KVM_RUN,
    whatever else runs on the machine; the wall time of the same interval and the page
    faults (rusage again; each costs far more under emulation) are printed beside;
  - `strace -f -c` of one run more under the same filter counts its system calls;
  - for pymvm, `python -X importtime` of one run more counts the modules it imported (the
    interpreter's own included).

``--api`` and ``--vsock`` add pymvm with a control API socket and with a vsock device (the VMs
of the testing kit and of bench/boot's first-exec part). ``--floor`` adds what CPython costs
before any of pymvm's code runs, in the same interleaved runs: the interpreter alone
(`python -S -c pass`) and the interpreter importing every module that is not pymvm's which
pymvm imports up to its first KVM_RUN (read from `-X importtime` of pymvm started with
`python -S`), and prints `python_floor_ratio=X` (the second / QEMU): a pymvm start-up ratio
below it would need fewer of those modules, not a faster pymvm. It also adds the least that
the chosen stack needs before any VMM on it can read its TOML file and make a KVM ioctl: the
interpreter importing tomllib and pymvm's compiled cffi module of KVM's numbers and layouts
(with _cffi_backend), loaded from its file without the pymvm package, and prints
`stack_floor_ratio=X` (that / QEMU). Prints per-run lines, then medians
and `native_startup_cpu_ratio=X` (pymvm / QEMU; QEMU is skipped with --no-qemu). Run it
directly: python3 bench/startup.py [-n RUNS], or inside the nested host:
python -m pymvm.nested -- python3 bench/startup.py.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot import CMDLINE, pymvm_argv, qemu_argv

ROOT = Path(__file__).resolve().parents[1]

KVM_RUN = 0xAE80
_NR_IOCTL = 16  # x86-64
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_LD_ABS_W, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def _filter_program() -> bytes:
    """Classic BPF: kill the process on ioctl(fd, KVM_RUN, ...), allow everything else.
    seccomp_data: nr at 0, arch at 4, args[1] at 24 (its low 32 bits: little-endian)."""
    insns = [
        (_LD_ABS_W, 0, 0, 4), (_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),
        (_LD_ABS_W, 0, 0, 0), (_JEQ_K, 0, 3, _NR_IOCTL),
        (_LD_ABS_W, 0, 0, 24), (_JEQ_K, 0, 1, KVM_RUN),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


_PROGRAM = ctypes.create_string_buffer(_filter_program())
_FPROG = struct.pack("<HxxxxxxQ", len(_PROGRAM.raw) // 8, ctypes.addressof(_PROGRAM))
_FPROG_BUF = ctypes.create_string_buffer(_FPROG)
_libc = ctypes.CDLL(None, use_errno=True)


def _die_at_first_kvm_run() -> None:
    """preexec_fn: no core file, then the filter (inherited across exec and by threads)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ul = ctypes.c_ulong
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, ul(1), ul(0), ul(0), ul(0)) != 0 or _libc.prctl(
            _PR_SET_SECCOMP, ul(_SECCOMP_MODE_FILTER), ul(ctypes.addressof(_FPROG_BUF)), ul(0),
            ul(0)) != 0:
        os._exit(121)


def run_to_first_kvm_run(argv: list[str], timeout: float = 60.0, cwd: Path = ROOT,
                         exits: bool = False) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, page faults) from exec to the first KVM_RUN, which kills
    the process; with ``exits``, from exec to the process's exit with status 0 (a program
    that never gets to a KVM_RUN: the floor's).
    ``python -m pymvm.cli`` imports the pymvm package found in ``cwd``."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_die_at_first_kvm_run,  # noqa: PLW1509
                            cwd=cwd)  # (this process has no threads)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{argv[0]}: no KVM_RUN within {timeout} s")
        time.sleep(0.0005)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if exits:
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]}: exited {proc.returncode}")
    elif proc.returncode != -31:  # SIGSYS: the filter killed it at KVM_RUN
        raise RuntimeError(f"{argv[0]}: exited {proc.returncode} before any KVM_RUN")
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_minflt + usage.ru_majflt


def without_pth(argv: list[str]) -> list[str]:
    """``python -m pymvm.cli ARGS`` as ``python -S``, with site-packages on sys.path but none
    of its .pth files run."""
    assert argv[1:3] == ["-m", "pymvm.cli"], argv
    code = ("import sys, site; sys.path += site.getsitepackages(); import runpy; "
            "runpy.run_module('pymvm.cli', run_name='__main__', alter_sys=True)")
    return [argv[0], "-S", "-c", code, *argv[3:]]


def count_syscalls(argv: list[str], tmp: Path, cwd: Path = ROOT) -> tuple[int, dict[str, int]]:
    """System calls (all threads) from exec to the first KVM_RUN, from `strace -f -c`."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace not found: apt-get install strace")
    out = tmp / "strace-c.txt"
    subprocess.run([strace, "-f", "-c", "-o", str(out), *argv], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   preexec_fn=_die_at_first_kvm_run, timeout=120, check=False, cwd=cwd)
    per_call: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls = int(fields[3])
            per_call[fields[-1]] = calls
        elif fields and fields[-1] == "total":
            total = int(fields[3] if len(fields) >= 5 else fields[2])
    return total, per_call


def _importtime_lines(importtime: str) -> list[tuple[int, str]]:
    """(depth, module) of each `-X importtime` line, in the order the imports finished (each
    one's own imports, one level deeper, before it)."""
    lines = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            field = line.split("|")[2]
            name = field.strip()
            if name != "imported package":  # the header
                lines.append(((len(field) - len(field.lstrip()) - 1) // 2, name))
    return lines


def imported_modules(importtime: str) -> list[str]:
    """The modules `-X importtime` output names, in the order their imports finished."""
    return [name for _, name in _importtime_lines(importtime)]


def _is_pymvms(module: str) -> bool:
    return module == "pymvm" or module.startswith("pymvm.")


def dependency_imports(importtime: str) -> list[str]:
    """The imports, not of pymvm's modules, that pymvm's code and the interpreter's start
    make, in the order they started: importing these, in this order, loads every module of
    the output that is not pymvm's (each brings its own imports), and nothing of pymvm.
    Except: a submodule whose package the output does not list (structlog.contextvars:
    pymvm.lazy loads it with structlog's ``__init__`` pending) would load that package too,
    so it is left out, and only its own imports are made: the floor understates, never
    overstates, what pymvm's dependencies cost."""
    lines = _importtime_lines(importtime)
    pending: dict[int, list[tuple[str, list]]] = {}
    for depth, name in lines:
        children = pending.pop(depth + 1, [])
        pending.setdefault(depth, []).append((name, children))
    listed = {name for _, name in lines}
    order: list[str] = []

    def visit(nodes: list[tuple[str, list]]) -> None:
        for name, children in nodes:
            if _is_pymvms(name) or name.partition(".")[0] not in listed:
                visit(children)  # what pymvm's own module (or the bare submodule) imported
            else:
                order.append(name)

    for depth in sorted(pending):
        visit(pending[depth])
    return order


def run_importtime(argv: list[str], cwd: Path = ROOT) -> str:
    """`-X importtime` output of pymvm's ``argv`` up to its first KVM_RUN."""
    python_argv = [argv[0], "-X", "importtime", *argv[1:]]
    proc = subprocess.run(python_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, preexec_fn=_die_at_first_kvm_run, timeout=120,
                          check=False, cwd=cwd)
    return proc.stderr.decode(errors="replace")


def count_modules(argv: list[str], cwd: Path = ROOT) -> int:
    """Modules `-X importtime` reports for pymvm up to its first KVM_RUN."""
    return len(imported_modules(run_importtime(argv, cwd)))


def floor_argv(python: str, imports: list[str]) -> list[str]:
    """``python -S`` importing ``imports`` in their order, then exiting. The interpreter's
    own modules, loaded before ``-c`` runs, cost nothing more. `-X importtime` lists failed
    imports too (``nt`` on Linux, tried by the modules that import it inside a ``try``): the
    same failures are let pass here."""
    code = ("for m in " + repr(imports) + ":\n"
            "    try:\n        __import__(m)\n    except ImportError:\n        pass")
    return [python, "-S", "-c", code]


def stack_floor_argv(python: str, root: Path = ROOT) -> list[str]:
    """``python -S`` importing the least a VMM on this stack loads before it can read its
    config and make its first KVM ioctl: tomllib, and ``root``'s compiled cffi module of
    KVM's numbers and layouts (which loads ``_cffi_backend``), by its file name from its
    folder, so that the pymvm package is not imported. Then it exits."""
    import importlib.util

    backend = importlib.util.find_spec("_cffi_backend")
    if backend is None or backend.origin is None:
        raise RuntimeError("_cffi_backend not found: pip install cffi")
    path = [str(root / "pymvm" / "kvm"), os.path.dirname(backend.origin)]
    code = f"import sys\nsys.path[:0] = {path!r}\nimport tomllib, _kvm_cffi"
    return [python, "-S", "-c", code]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--runs", type=int, default=21, help="timed runs per VMM (interleaved)")
    p.add_argument("--no-qemu", action="store_true", help="measure pymvm only")
    p.add_argument("--without-pth", action="store_true",
                   help="also measure pymvm started without site's .pth hooks (python -S, "
                        "site-packages put on sys.path by hand): what this interpreter's "
                        "installation adds to every start (editable installs, other hooks)")
    p.add_argument("--compare", type=Path, metavar="DIR",
                   help="also measure, interleaved, the pymvm package in DIR/pymvm (say an older "
                        "commit's: git archive COMMIT pymvm | tar -x -C DIR, its built *.so "
                        "copied in and compiled with python -m compileall DIR)")
    p.add_argument("--api", action="store_true",
                   help="also measure pymvm with a control API socket (--api-sock): the API's "
                        "server modules load before its vCPUs")
    p.add_argument("--vsock", action="store_true",
                   help="also measure pymvm with a vsock device (bench/boot's first-exec VM; "
                        "needs /dev/vhost-vsock)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the interpreter alone (python -S -c pass), the "
                        "interpreter importing the modules, not pymvm's, that pymvm imports, "
                        "and the interpreter importing tomllib and the compiled KVM module")
    args = p.parse_args()

    from pymvm.images.initramfs import build_initramfs, encode_cmd
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    if kernel is None:
        print("bench/startup.py: build the kernel first: pymvm build-kernel", file=sys.stderr)
        return 2
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    cmdline = f"{CMDLINE} {encode_cmd('true')}"
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        vmms = {"pymvm": pymvm_argv(tmp / "vm.toml", kernel.bzimage, initramfs, cmdline)}
        where = {"pymvm": ROOT}
        if args.compare is not None:
            vmms["other"] = vmms["pymvm"]
            where["other"] = args.compare.resolve()
        if args.api:
            argv = vmms["pymvm"]
            vmms["api"] = [*argv[:-1], "--api-sock", str(tmp / "api.sock"), argv[-1]]
        if args.vsock:
            vsock_toml = tmp / "vsock.toml"
            argv = pymvm_argv(vsock_toml, kernel.bzimage, initramfs, cmdline)
            vsock_toml.write_text(vsock_toml.read_text().replace('id = "bench"', 'id = "bench-vsock"')
                                  + f"[vsock]\ncid = {10000 + os.getpid() % 50000}\n")
            vmms["vsock"] = argv
        if args.without_pth:
            vmms["no-pth"] = without_pth(vmms["pymvm"])
            where["no-pth"] = ROOT
        # Programs that exit before any KVM_RUN: the floor under pymvm's start-up.
        exiting: set[str] = set()
        if args.floor:
            # Each run here is killed at its first KVM_RUN and leaves its state directory,
            # which the next pymvm start cleans up (loading shutil for it): a normal start
            # has none, so the floor's modules are read from one without.
            from pymvm import logging as pymvm_logging
            from pymvm.state import cleanup_stale

            pymvm_logging.configure("warning")
            cleanup_stale()
            importtime = run_importtime(without_pth(vmms["pymvm"]))
            modules = imported_modules(importtime)
            vmms["interp"] = [sys.executable, "-S", "-c", "pass"]
            vmms["deps"] = floor_argv(sys.executable, dependency_imports(importtime))
            vmms["stack"] = stack_floor_argv(sys.executable)
            exiting = {"interp", "deps", "stack"}
            print(f"floor: deps loads the {sum(not _is_pymvms(m) for m in modules)} modules, not "
                  f"pymvm's, of the {len(modules)} that pymvm started with python -S imports",
                  flush=True)
        if not args.no_qemu:
            qemu = shutil.which("qemu-system-x86_64")
            if qemu is None:
                print("bench/startup.py: qemu-system-x86_64 not found (or use --no-qemu)",
                      file=sys.stderr)
                return 2
            vmms["qemu"] = qemu_argv(qemu, "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on",
                                     kernel.bzimage, initramfs, cmdline)
        for name, argv in vmms.items():  # warm the page cache
            run_to_first_kvm_run(argv, cwd=where.get(name, ROOT), exits=name in exiting)
        cpu: dict[str, list[float]] = {name: [] for name in vmms}
        wall: dict[str, list[float]] = {name: [] for name in vmms}
        faults: dict[str, list[int]] = {name: [] for name in vmms}
        for i in range(args.runs):
            for name, argv in vmms.items():
                c, w, f = run_to_first_kvm_run(argv, cwd=where.get(name, ROOT),
                                               exits=name in exiting)
                cpu[name].append(c)
                wall[name].append(w)
                faults[name].append(f)
                until = "its exit" if name in exiting else "first KVM_RUN"
                print(f"run {i + 1:2d} {name:6s} exec to {until}: CPU {c * 1000:7.1f} ms, "
                      f"wall {w * 1000:7.1f} ms, {f} page faults", flush=True)
        for name, argv in vmms.items():
            line = (f"{name}: CPU median {statistics.median(cpu[name]) * 1000:.1f} ms "
                    f"(min {min(cpu[name]) * 1000:.1f}), wall median "
                    f"{statistics.median(wall[name]) * 1000:.1f} ms, "
                    f"{statistics.median(faults[name]):.0f} page faults")
            if name in exiting:
                print(f"{line} (to its exit)", flush=True)
                continue
            total, per_call = count_syscalls(argv, tmp, cwd=where.get(name, ROOT))
            top = ", ".join(f"{k} {v}" for k, v in sorted(per_call.items(), key=lambda kv: -kv[1])[:8])
            line += f", {total} system calls ({top})"
            if name in where and name != "no-pth":
                line += f", {count_modules(argv, cwd=where[name])} modules imported"
            print(line, flush=True)
        if "qemu" in vmms:
            ratio = statistics.median(cpu["pymvm"]) / statistics.median(cpu["qemu"])
            print(f"native_startup_cpu_ratio={ratio:.3f}")
            if args.floor:
                floor = statistics.median(cpu["deps"]) / statistics.median(cpu["qemu"])
                print(f"python_floor_ratio={floor:.3f}")
                stack = statistics.median(cpu["stack"]) / statistics.median(cpu["qemu"])
                print(f"stack_floor_ratio={stack:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
