"""The nested KVM host: run a command where Linux guests can boot.

Some development and CI machines expose a /dev/kvm on which Linux guests cannot boot (the
paravirtual ``kvm_pvm``) and have no /dev/vhost-net. There, e2e tests run inside a Linux
guest booted by virtme-ng (``vng``) under QEMU TCG emulating AMD SVM: inside it ``kvm_amd``,
``vhost_net`` and ``tun`` are real. vng shares this machine's root filesystem (read-only,
with copy-on-write overlays), so the project, Python and its packages are all there; only
the folders given as ``--rwdir`` write through.

    python -m pymvm.nested [--cpus N] [--memory M] [--timeout S] -- CMD...

runs CMD directly where this machine can boot Linux guests, else inside the nested host.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import py_compile
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import structlog

from .hostcheck import (  # noqa: F401  (re-exported: the runner's API)
    IN_NESTED_ENV,
    KERNEL_CMDLINE_MARK,
    OVERRIDE_ENV,
    HostFacts,
    NestedHostError,
    assess,
    can_boot_linux_here,
    cpu_flags_from_cpuinfo,
    in_nested_host,
)

log = structlog.get_logger()

NESTED_MODULES = ("kvm_amd", "vhost_net", "vhost_vsock", "tun")

# QEMU TCG cannot run a hardware-KVM CPU model; EPYC + svm gives kvm_amd with nested paging.
QEMU_CPU = "EPYC,+svm"

#: Experiment knobs of issue 8 (see NestedSettings.from_env); unset means the default.
SETTINGS_ENV = ("PYMVM_NESTED_QEMU", "PYMVM_NESTED_CPU_MODEL", "PYMVM_NESTED_TB_SIZE",
                "PYMVM_NESTED_KVM_AMD", "PYMVM_NESTED_APPEND", "PYMVM_NESTED_WAKE",
                "PYMVM_NESTED_KERNEL")
#: The nested host's timer interrupt runs periodically (LAPIC periodic mode): QEMU can
#: lose the request that delivers a pending timer interrupt (see wake_host), and with
#: Linux's one-shot tickless timer no later expiry ever comes; with a periodic one the next
#: tick does. PYMVM_NESTED_APPEND=none: the kernel's default (one-shot) again.
DEFAULT_APPEND = "nohz=off highres=off"
_CMDLINE_WORDS = re.compile(r"[A-Za-z0-9_.=,-]+( [A-Za-z0-9_.=,-]+)*")
_MODULE_PARAMS = re.compile(r"[a-z_]+=[A-Za-z0-9_]+( [a-z_]+=[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class NestedSettings:
    """How the nested host is emulated: the knobs compared in issue 8's freeze experiments.
    The defaults are the setting every test and benchmark runs with."""

    qemu: str | None = None  # QEMU binary (default: vng's choice, this machine's QEMU)
    cpu_model: str = QEMU_CPU
    tb_size_mib: int | None = None  # TCG translation cache (QEMU's default: 1 GiB on x86)
    kvm_amd: str = ""  # kvm_amd module parameters inside, e.g. "npt=0 avic=0"
    append: str = DEFAULT_APPEND  # more words for the nested host's kernel command line
    wake: bool = True  # wake a host whose heartbeat is late (PYMVM_NESTED_WAKE=0: don't)
    # The host's kernel (default: find_kernel(), Debian's from /boot). A custom one has
    # kvm_amd built in: its parameters go on the kernel command line (kvm_amd.NAME=VALUE).
    kernel: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NestedSettings:
        def get(name: str) -> str | None:
            return (env.get(name) or "").strip() or None

        tb = get("PYMVM_NESTED_TB_SIZE")
        if tb is not None and not (tb.isdigit() and int(tb) > 0):
            raise NestedHostError(
                f"PYMVM_NESTED_TB_SIZE={tb!r} is not a size in MiB: give a positive integer")
        params = get("PYMVM_NESTED_KVM_AMD") or ""
        if params and not _MODULE_PARAMS.fullmatch(params):
            raise NestedHostError(
                f"PYMVM_NESTED_KVM_AMD={params!r} is not a list of module parameters: "
                "give NAME=VALUE pairs separated by spaces, e.g. 'npt=0 avic=0'")
        append = get("PYMVM_NESTED_APPEND") or DEFAULT_APPEND
        if append == "none":
            append = ""
        if append and not _CMDLINE_WORDS.fullmatch(append):
            raise NestedHostError(
                f"PYMVM_NESTED_APPEND={append!r} is not a list of kernel parameters: give "
                "words such as 'nohz=off highres=off' separated by spaces")
        cpu = get("PYMVM_NESTED_CPU_MODEL") or QEMU_CPU
        if any(c.isspace() for c in cpu):
            raise NestedHostError(
                f"PYMVM_NESTED_CPU_MODEL={cpu!r} has a space: give one QEMU -cpu value")
        kernel = get("PYMVM_NESTED_KERNEL")
        return cls(qemu=get("PYMVM_NESTED_QEMU"), cpu_model=cpu,
                   tb_size_mib=None if tb is None else int(tb), kvm_amd=params, append=append,
                   wake=get("PYMVM_NESTED_WAKE") != "0",
                   kernel=None if kernel is None else _nested_kernel(kernel, env))

    def describe(self) -> str:
        return (f"qemu={self.qemu or 'default'} cpu={self.cpu_model} "
                f"tb_size={self.tb_size_mib or 'default'} kvm_amd={self.kvm_amd or 'default'} "
                f"append={self.append or 'none'} wake={'on' if self.wake else 'off'} "
                f"kernel={self.kernel or 'default'}")

    def kernel_params(self) -> list[str]:
        """kvm_amd's parameters as kernel parameters, for a kernel with kvm_amd built in."""
        if self.kernel is None:
            return []
        return [f"kvm_amd.{param}" for param in self.kvm_amd.split()]


def _nested_kernel(value: str, env: Mapping[str, str]) -> Path:
    """PYMVM_NESTED_KERNEL's kernel image: a path, or the keyword of the cached 6.12 kernel."""
    from pymvm.images import hostkernel

    if value == hostkernel.KEYWORD:
        cache = env.get("PYMVM_CACHE_DIR")
        built = hostkernel.host_kernel_status(Path(cache) if cache else None)
        if built is None:
            raise NestedHostError(
                f"PYMVM_NESTED_KERNEL={value}: the nested host's {value} kernel is not built: "
                "run `python -m pymvm.images.hostkernel` (tens of minutes)")
        return built.bzimage
    path = Path(value).absolute()
    if not path.is_file():
        raise NestedHostError(
            f"PYMVM_NESTED_KERNEL={value!r} is not a file: give the path of a kernel image "
            f"(bzImage) or {hostkernel.KEYWORD!r} for `python -m pymvm.images.hostkernel`'s")
    return path


EXIT_NESTED_HOST_DIED = 125
"""run_nested's result when the nested host ended without recording the command's status
(kernel panic, OOM, QEMU crash). Like ``docker run``'s 125: the runner failed, not CMD."""

EXIT_TIMEOUT = 124
"""run_nested's result when ``timeout`` expired (as coreutils ``timeout``)."""

STATUS_FILE = "exit-status"
SCRIPT_FILE = "run.sh"
#: One emulated CPU by default. The nested host sometimes freezes (QEMU spins on its vCPU
#: threads; the kernel prints nothing) or dies while an L2 guest starts or stops, whichever
#: VMM runs it. On 2026-11-26 that happened in 4 of 6 full e2e runs with two CPUs and 2 of 5
#: with one, and one CPU was faster too. L2 guests with several vCPUs still run.
DEFAULT_CPUS = 1
HEARTBEAT_FILE = "heartbeat"
CONSOLE_FILE = "console.log"
MONITOR_FILE = "monitor.sock"
#: The nested host's kernel messages at this level and worse (oopses, panics, lockups) go to
#: a second serial port logged to CONSOLE_FILE: vng sends its own console to /dev/null.
CONSOLE_LOGLEVEL = 4
HEARTBEAT_INTERVAL_S = 20
#: A heartbeat older than this means the nested host froze (its kernel stopped scheduling
#: the loop): stop it at once rather than wait for a timeout.
FROZEN_AFTER_S = 90
#: A heartbeat this late gets the host a device interrupt first (wake_host): two beats missed.
WAKE_AFTER_S = 45

# Passed into the nested host besides PATH (which gets this Python's bin dir first).
PASSTHROUGH_ENV = (
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYENV_VERSION",
    "PYTEST_ADDOPTS",
    "LANG",
    "LC_ALL",
    "TERM",
    "CI",
    "NO_COLOR",
    "FORCE_COLOR",
    "PY_COLORS",
)
PASSTHROUGH_PREFIX = "PYMVM_"
# Never passed in: inside, "always" would try to nest again.
NOT_PASSED = frozenset({OVERRIDE_ENV})

# QEMU prints one of these per unsupported CPUID bit per vCPU: noise, not news.
_QEMU_TCG_WARNING = b"qemu-system-x86_64: warning: TCG doesn't support requested feature"

_EMPTY_ENV: Mapping[str, str] = MappingProxyType({})


# --------------------------------------------------------------------------- fast Python

FAST_IMAGE_FILE = "fast-python.img"
FAST_MOUNT = "/run/pymvm-fast"
"""Where the nested host mounts the image; each tree is a folder ``t<N>`` in it."""

# Python never needs these to run pymvm or its tests; left out of the image, they are still
# there (from 9p) under the overlay, only slower.
_STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
     "dist-packages", "__phello__"}
)
_SYSTEM_PREFIXES = frozenset({Path("/"), Path("/usr"), Path("/usr/local")})
# Overlay options are comma- and colon-separated; the shell line quotes the rest.
_OVERLAY_UNSAFE = re.compile(r"[\s,:\\]")


@dataclass(frozen=True)
class FastTree:
    """A folder of the root filesystem, and those of its files the image holds a copy of.

    Inside, a read-only overlay puts the copy over the folder: the files it holds are read
    from the image, the rest (and nothing else changes) from the folder underneath.
    """

    root: Path
    files: tuple[Path, ...]  # relative to root


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(dist: importlib.metadata.Distribution, extras: frozenset[str]) -> list[str]:
    """Names ``dist`` requires: unconditional ones and those of ``extras``; other markers
    (python_version, platform) count as met: an extra file in the image costs little."""
    names = []
    for req in dist.requires or ():
        spec, _, marker = req.partition(";")
        if (extra := re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)) and (
            extra.group(1) not in extras
        ):
            continue
        if match := re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec):
            names.append(_norm_dist(match.group(1)))
    return names


def needed_distributions(
    site_dirs: Sequence[Path], roots: Sequence[str] = ("pymvm",)
) -> list[importlib.metadata.Distribution]:
    """``roots`` (with all their extras) and the pytest plugins, with everything they require."""
    dists: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions(path=[str(d) for d in site_dirs]):
        dists.setdefault(_norm_dist(dist.metadata["Name"] or ""), dist)
    todo: list[tuple[str, bool]] = [(_norm_dist(r), True) for r in roots]
    for dist in dists.values():
        if any(ep.group == "pytest11" for ep in dist.entry_points):
            todo.append((_norm_dist(dist.metadata["Name"] or ""), False))
    seen: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name, all_extras = todo.pop()
        if name in seen or name not in dists:
            continue
        dist = seen[name] = dists[name]
        extras = frozenset(dist.metadata.get_all("Provides-Extra") or () if all_extras else ())
        todo += [(n, False) for n in _requirement_names(dist, extras)]
    return list(seen.values())


def _walk_files(top: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in skip_dirs]
        found += [Path(folder, f) for f in files]
    return found


def _is_wanted(path: Path) -> bool:
    # Optimised bytecode is only read under -O.
    return not (path.suffix == ".pyc" and ".opt-" in path.name)


def python_trees(
    *,
    package_dir: Path = Path(__file__).resolve().parent,
    prefix: Path = Path(sys.base_prefix),
    paths: Mapping[str, str] | None = None,
) -> list[FastTree]:
    """What the image holds: this Python's standard library, interpreter and shared library,
    the site-packages distributions pymvm and its tests need (metadata of all), and pymvm."""
    paths = sysconfig.get_paths() if paths is None else paths
    stdlib = Path(paths["stdlib"]).resolve()
    site_dirs = list(dict.fromkeys(Path(paths[k]).resolve() for k in ("purelib", "platlib")))
    files: set[Path] = set()
    for lib in dict.fromkeys((stdlib, Path(paths["platstdlib"]).resolve())):
        files.update(_walk_files(lib, _STDLIB_SKIP))
    for site in site_dirs:
        for entry in site.iterdir() if site.is_dir() else ():
            if entry.is_file():  # .pth files and the modules they import, single-file modules
                files.add(entry)
            elif entry.suffix in (".dist-info", ".egg-info"):  # entry points, versions
                files.update(f for f in entry.iterdir() if f.name != "RECORD" and f.is_file())
        for dist in needed_distributions([site]):
            for rel in dist.files or ():
                file = Path(dist.locate_file(rel)).resolve()
                files.add(file)
                if file.suffix == ".py":
                    files.update(file.parent.glob(f"__pycache__/{file.stem}.*.pyc"))
    prefix = prefix.resolve()
    roots = [stdlib, *site_dirs]
    if prefix not in _SYSTEM_PREFIXES:
        # The interpreter and libpython are read on each start too.
        roots = [prefix]
        for sub in ("bin", "lib"):
            files.update(f for f in (prefix / sub).glob("*") if f.is_file())
        if Path(sys.prefix).resolve() != prefix:  # a virtualenv
            roots.append(Path(sys.prefix).resolve())
    roots.append(package_dir)
    files.update(f for f in _walk_files(package_dir, frozenset({"__pycache__"})))
    roots = list(dict.fromkeys(roots))
    roots = [r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots)]
    trees = []
    for root in roots:
        mine = sorted(
            f.relative_to(root)
            for f in files
            if f.is_relative_to(root) and _is_wanted(f) and not f.is_symlink() and f.is_file()
        )
        if mine and not _OVERLAY_UNSAFE.search(str(root)):
            trees.append(FastTree(root, tuple(mine)))
    return trees


def _stage(trees: Sequence[FastTree], stage: Path) -> int:
    """Copy the trees' files under ``stage``; compile sources that lack bytecode there."""
    total = 0
    for index, tree in enumerate(trees):
        base = stage / f"t{index}"
        for rel in tree.files:
            dest = base / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree.root / rel, dest)  # keeps mtimes: bytecode checks them
            total += dest.stat().st_size
        for rel in tree.files:
            if rel.suffix != ".py":
                continue
            cached = Path(
                base / rel.parent / "__pycache__" / f"{rel.stem}.{sys.implementation.cache_tag}.pyc"
            )
            if not cached.exists():
                # Timestamp bytecode of the copy is valid for the original (same mtime, size);
                # compiling inside, under emulation, costs far more.
                try:
                    py_compile.compile(
                        str(base / rel), cfile=str(cached), dfile=str(tree.root / rel), doraise=True
                    )
                    total += cached.stat().st_size
                except (py_compile.PyCompileError, OSError, ValueError):
                    pass  # Python compiles it inside, as before
    return total


def build_fast_image(trees: Sequence[FastTree], image: Path) -> bool:
    """Write an ext2 image of ``trees`` (``mke2fs -d``); False, with a warning, if it fails."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
    if not trees:
        return False
    if not mke2fs:
        log.warning("fast_python_skipped", reason="mke2fs is missing: apt-get install e2fsprogs")
        return False
    with tempfile.TemporaryDirectory(prefix="pymvm-fast-") as tmp:
        stage = Path(tmp)
        try:
            size = _stage(trees, stage)
        except OSError as exc:
            log.warning("fast_python_skipped", reason=f"copying Python's files failed: {exc}")
            return False
        count = sum(len(t.files) for t in trees)
        blocks = (size * 5 // 4 + count * 4096 * 2) // 4096 + 8192  # room for metadata
        result = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext2", "-b", "4096", "-m", "0", "-N", str(count * 2 + 1024),
             "-L", "pymvm-fast", "-d", str(stage), str(image), str(blocks)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        log.warning("fast_python_skipped", reason=f"mke2fs failed: {result.stderr.strip()}")
        image.unlink(missing_ok=True)
        return False
    return True


def render_fast_mounts(image: Path, roots: Sequence[Path]) -> list[str]:
    """Shell lines putting the image's trees over ``roots`` inside the nested host.

    The root filesystem is 9p without caching, and under TCG every round trip is slow:
    a Python start took 5-20 s. From the image (read once, then page cache) it is local.
    Any failure only warns: the command still runs, from 9p.
    """
    warn = "echo 'pymvm.nested: warning: {what}; Python runs from 9p (slowly)' >&2"
    img = shlex.quote(str(image))
    lines = [
        # Only in the nested host: never mount over this machine's Python.
        f"if grep -qw {KERNEL_CMDLINE_MARK} /proc/cmdline; then",
        f"  if modprobe -q loop && modprobe -q ext4 && modprobe -q overlay && "
        f"mkdir -p {FAST_MOUNT} && mount -t ext2 -o loop,ro,noatime {img} {FAST_MOUNT}; then",
    ]
    for index, root in enumerate(roots):
        where = shlex.quote(str(root))
        # The folder itself is the lower layer: what the image lacks still comes from 9p.
        opts = shlex.quote(f"ro,lowerdir={FAST_MOUNT}/t{index}:{root}")
        lines.append(
            f"    mount -t overlay pymvm-fast -o {opts} {where} || "
            + warn.format(what=f"overlay on {root} failed")
        )
    failed = warn.format(what="mounting the fast Python image failed")
    lines += ["  else", f"    {failed}", "  fi", "fi"]
    return lines



# --------------------------------------------------------------------------- running


def _version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    # "6.12.9-amd64" sorts after "6.1.0-56-amd64": compare numbers as numbers.
    parts = re.findall(r"\d+|[^\d.+~-]+", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def find_kernel(boot_dir: Path = Path("/boot")) -> Path:
    """The newest Debian kernel ``vmlinuz-*-amd64`` in ``boot_dir``."""
    kernels = sorted(boot_dir.glob("vmlinuz-*-amd64"), key=lambda p: _version_key(p.name))
    if not kernels:
        raise NestedHostError(
            f"no {boot_dir}/vmlinuz-*-amd64 kernel for the nested KVM host: "
            "run `apt-get install linux-image-amd64 qemu-system-x86`"
        )
    return kernels[-1]


def find_vng() -> str:
    """The virtme-ng launcher, preferring the one installed next to this Python."""
    sibling = Path(sys.executable).parent / "vng"
    if os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("vng")
    if found:
        return found
    raise NestedHostError("virtme-ng's `vng` is not installed: run `pip install virtme-ng`")


def check_tools() -> None:
    """QEMU, and busybox for the initramfs vng builds, must be installed."""
    if not shutil.which("qemu-system-x86_64"):
        raise NestedHostError(
            "qemu-system-x86_64 is missing for the nested KVM host: "
            "run `apt-get install qemu-system-x86`"
        )
    if not any(shutil.which(b) for b in ("busybox-static", "busybox.static", "busybox")):
        raise NestedHostError(
            "busybox is missing for the nested KVM host's initramfs: "
            "run `apt-get install busybox-static`"
        )


def _check_shareable(path: Path) -> None:
    # vng puts shared folders on QEMU's and the kernel's command lines unquoted.
    if re.search(r"[\s,=]", str(path)):
        raise NestedHostError(
            f"cannot share {path} with the nested host: its path has a space, ',' or '='; "
            "move the project to a plain path"
        )


def _dedupe_rwdirs(paths: Sequence[Path]) -> list[Path]:
    """Absolute, unique paths; one inside another is already shared by it."""
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))  # keeps the given order
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


def nested_env(
    extra: Mapping[str, str] = _EMPTY_ENV, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for the command inside: PATH, PYTHONPATH, PYMVM_* ... plus ``extra``."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    # This Python's bin dir first: pyenv shims need a writable HOME, the interpreter does not.
    path = [str(Path(sys.executable).parent)] + environ.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
    for name, value in environ.items():
        if name in PASSTHROUGH_ENV or name.startswith(PASSTHROUGH_PREFIX):
            env[name] = value
    for name in NOT_PASSED:
        env.pop(name, None)
    env.update(extra)
    env[IN_NESTED_ENV] = "1"
    for name in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise NestedHostError(
                f"environment variable name {name!r} cannot be passed to the nested host"
            )
    return env


def render_script(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    status_path: Path,
    modules: Sequence[str] = NESTED_MODULES,
    prelude: Sequence[str] = (),
    heartbeat_path: Path | None = None,
    module_params: Mapping[str, str] = _EMPTY_ENV,
    builtin_dir: Path | None = None,
    show_kvm_amd: bool = False,
) -> str:
    """The shell script the nested host runs: load modules, run ``prelude`` (lines), set env,
    run argv, save status. With ``heartbeat_path``, a background loop rewrites that file
    every HEARTBEAT_INTERVAL_S with what the host is doing (for a diagnosis if it stalls).
    ``builtin_dir`` holds a custom kernel's modules.builtin(.modinfo): installed for its
    version first, they make modprobe of a built-in module succeed quietly (no modules of
    that kernel exist here). ``show_kvm_amd`` prints kvm_amd's parameters in effect.

    It lives in a shared file (not in ``vng --exec``) because vng puts --exec on the kernel
    command line, which holds only 2 KiB.
    """
    if not argv:
        raise NestedHostError("no command given to run in the nested KVM host")
    status = shlex.quote(str(status_path))
    lines = ["#!/bin/sh", "# Written by pymvm.nested; runs inside the nested KVM host."]
    if builtin_dir is not None:
        files = " ".join(shlex.quote(str(builtin_dir / name))
                         for name in ("modules.builtin", "modules.builtin.modinfo"))
        # Only in the nested host (its /lib is a copy-on-write view): never on this machine.
        lines.append(
            f'kver=$(uname -r); grep -qw {KERNEL_CMDLINE_MARK} /proc/cmdline && '
            '[ ! -e "/lib/modules/$kver/modules.builtin" ] && '
            f'{{ {{ mkdir -p "/lib/modules/$kver" && cp {files} "/lib/modules/$kver/" && '
            'touch "/lib/modules/$kver/modules.order" && depmod -a "$kver"; } || '
            "echo 'pymvm.nested: warning: installing the list of built-in modules "
            "failed' >&2; }")
    for module in modules:
        params = shlex.split(module_params.get(module, ""))
        lines.append(
            f"modprobe {shlex.join([module, *params])} || "
            f"echo 'pymvm.nested: warning: modprobe {module} failed' >&2"
        )
    if module_params.get("kvm_amd") or show_kvm_amd:
        # What the experiment really ran with (a parameter the module ignores stays default).
        lines.append("echo \"pymvm.nested: kvm_amd $(cd /sys/module/kvm_amd/parameters && "
                     "grep -H . npt avic vgif vls nested nrips 2>/dev/null | tr ':\\n' '= ')\" >&2")
    lines += prelude
    if heartbeat_path is not None:
        beat = shlex.quote(str(heartbeat_path))
        lines += [
            "( while :; do { date -u '+%T'; cat /proc/loadavg; "
            "ps -eo pid,ppid,stat,pcpu,time,wchan:24,args --sort=-pcpu | head -n 15 | cut -c1-160; "
            f"dmesg | tail -n 40; }} > {beat}.new 2>&1; mv -f {beat}.new {beat}; "
            f"sleep {HEARTBEAT_INTERVAL_S}; done ) </dev/null >/dev/null 2>&1 &",
            "heartbeat=$!",
        ]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines.append(f"cd {shlex.quote(str(cwd))} || {{ echo 126 > {status}; sync; exit 126; }}")
    lines += [
        shlex.join(argv),
        "rc=$?",
        *(["kill $heartbeat 2>/dev/null"] if heartbeat_path is not None else []),
        # Write then rename: a half-written status must not read as a result.
        f"echo $rc > {status}.tmp && mv {status}.tmp {status}",
        "sync",
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def vng_command(
    *,
    vng: str,
    kernel: Path,
    script: Path,
    rwdirs: Sequence[Path],
    cwd: Path,
    cpus: int,
    memory: str,
    console_log: Path | None = None,
    tcg_thread: str | None = None,
    monitor: Path | None = None,
    settings: NestedSettings | None = None,
) -> list[str]:
    """The vng command line that boots the nested host and runs ``script`` there; with
    ``console_log``, the host's kernel warnings and panics are written to that file.
    ``tcg_thread`` ("single" or "multi", from PYMVM_NESTED_TCG_THREAD) picks QEMU's TCG
    threading; "single" avoided no freeze and made a 2-vCPU L2 boot too slow to use.
    ``monitor`` is a UNIX socket for QEMU's human monitor (read when the host freezes);
    ``settings`` are the experiment knobs of issue 8 (QEMU binary, CPU model, TCG cache)."""
    settings = settings or NestedSettings()
    qemu_opts = f"-cpu {settings.cpu_model}"
    accel = []
    if tcg_thread is not None:
        accel.append(f"thread={tcg_thread}")
    if settings.tb_size_mib is not None:
        accel.append(f"tb-size={settings.tb_size_mib}")
    if accel:
        qemu_opts += " -accel tcg," + ",".join(accel)
    if monitor is not None:
        _check_shareable(monitor)
        qemu_opts += f" -monitor unix:{monitor},server=on,wait=off"
    append = KERNEL_CMDLINE_MARK
    if settings.append:
        append += " " + settings.append
    if params := settings.kernel_params():
        append += " " + " ".join(params)
    if console_log is not None:
        _check_shareable(console_log)
        # ttyS1 (vng's -serial is ttyS0); the last console= stays /dev/console, so ttyS0
        # is named again after it.
        qemu_opts += f" -serial file:{console_log}"
        append += f" console=ttyS1 console=ttyS0 loglevel={CONSOLE_LOGLEVEL}"
    cmd = [
        vng,
        "--run", str(kernel),
        "--disable-kvm",  # TCG: the only way to emulate SVM on a host without it
        "--cpus", str(cpus),
        "--memory", memory,
        # "=" form: argparse would take a separate "-cpu ..." for an option.
        f"--qemu-opts={qemu_opts}",
        f"--append={append}",
        "--cwd", str(cwd),
    ]
    if settings.qemu is not None:
        cmd.append(f"--qemu={settings.qemu}")
    for path in rwdirs:
        _check_shareable(path)
        cmd.append(f"--rwdir={path}={path}")
    cmd += ["--exec", f"/bin/sh {shlex.quote(str(script))}"]
    return cmd


def read_exit_status(path: Path) -> int | None:
    """The inner command's exit status, or None when the nested host never wrote it."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class _OutputFilter:
    """Copies vng's output to ``sink`` as it comes, dropping QEMU's TCG feature warnings.

    Partial lines are written at once (pytest's progress dots) unless they may be the start
    of a warning line, which is held until its newline decides.
    """

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._held = b""  # start of a line that may be a warning
        self._mid_line = False  # the current line's start was already written

    def feed(self, data: bytes) -> None:
        out = bytearray()
        data = self._held + data
        self._held = b""
        while data:
            line, nl, rest = data.partition(b"\n")
            if self._mid_line:
                out += line + nl
                self._mid_line = not nl
            elif nl:
                if not line.startswith(_QEMU_TCG_WARNING):
                    out += line + nl
            elif _QEMU_TCG_WARNING.startswith(line) or line.startswith(_QEMU_TCG_WARNING):
                self._held = line
            else:
                out += line
                self._mid_line = True
            data = rest
        self._write(bytes(out))

    def close(self) -> None:
        if self._held and not self._held.startswith(_QEMU_TCG_WARNING):
            self._write(self._held)
        self._held = b""

    def _write(self, data: bytes) -> None:
        if data:
            self._sink.write(data)
            self._sink.flush()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End vng and the QEMU it started: they share the session we gave vng."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


#: What the runner prints each time it wakes a late host (bench/nested_soak.py counts it).
WOKE_NOTE = "woke its CPU with a device interrupt"


def wake_host(monitor: Path) -> str:
    """Raise a device interrupt in the nested host (a Shift key press on its keyboard, which
    nothing there reads). QEMU 7.2 to 10.0 can lose the request that turns a pending APIC
    timer interrupt into a delivered one (an unlocked ``interrupt_request |= ...`` in its
    SVM VMRUN helper races the timer, fixed upstream for 10.2): the host's only CPU then
    halts with the interrupt pending, for good. Any later interrupt delivers it."""
    return _monitor_session(monitor, ["sendkey shift"])


def _pump(
    proc: subprocess.Popen[bytes],
    out: _OutputFilter,
    deadline: float | None,
    stall_timeout: float | None = None,
    heartbeat: Path | None = None,
    monitor: Path | None = None,
) -> str:
    """Copy output until EOF. Returns "eof", "timeout" (the deadline passed), "stalled" (no
    output for ``stall_timeout`` seconds) or "frozen" (``heartbeat`` stopped being
    rewritten: the nested host's kernel no longer runs its processes). With ``monitor``, a
    heartbeat late by WAKE_AFTER_S first gets the host a device interrupt (wake_host): a
    host halted by QEMU's lost timer interrupt runs on."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    last_output = time.monotonic()
    woken_at: float | None = None  # the heartbeat's time when we last woke the host
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            waits = [min(10.0, FROZEN_AFTER_S / 2)]  # look at the heartbeat this often
            if deadline is not None:
                if now >= deadline:
                    return "timeout"
                waits.append(deadline - now)
            if stall_timeout is not None:
                if now - last_output >= stall_timeout:
                    return "stalled"
                waits.append(last_output + stall_timeout - now)
            if heartbeat is not None:
                age = _heartbeat_age(heartbeat)
                if age > FROZEN_AFTER_S:
                    return "frozen"
                beat = _heartbeat_mtime(heartbeat)  # which beat is late: one wake per stall
                if (age > WAKE_AFTER_S and monitor is not None and woken_at != beat
                        and monitor.exists()):
                    woken_at = beat  # once per stall
                    try:
                        wake_host(monitor)
                        _note(f"pymvm.nested: the nested host's heartbeat is {age:.0f} s late: "
                              f"{WOKE_NOTE} (QEMU can lose a timer interrupt; see "
                              "docs/nested-host.md)")
                    except OSError as exc:
                        _note(f"pymvm.nested: could not wake the nested host: {exc}")
            if not sel.select(min(waits)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return "eof"
            last_output = time.monotonic()
            out.feed(chunk)


#: What the frozen host's QEMU is asked through its human monitor: the state of each vCPU
#: (registers three times, a second apart: a RIP that moves is a host that still runs,
#: only too slowly), the code at the current RIP, and TCG's translation statistics.
FREEZE_MONITOR_COMMANDS = ("info status", "info cpus", "info registers", "info jit",
                           "x/6i $pc", "info registers", "info lapic", "info registers",
                           "info jit")


def _monitor_session(path: Path, commands: Sequence[str], pause_s: float = 1.0,
                     timeout_s: float = 10.0) -> str:
    """Run ``commands`` on QEMU's human monitor at the UNIX socket ``path``; the transcript."""
    import socket

    out: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))

        def until_prompt() -> str:
            data = b""
            while not data.endswith(b"(qemu) "):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace")

        until_prompt()  # the banner
        for i, command in enumerate(commands):
            if i and command == "info registers":
                time.sleep(pause_s)
            sock.sendall(command.encode() + b"\n")
            reply = until_prompt().replace("\r", "")
            # The monitor echoes the command line (with terminal escapes) before the answer.
            body = reply.split("\n", 1)[1] if "\n" in reply else reply
            body = "\n".join(line for line in body.removesuffix("(qemu) ").rstrip().splitlines()
                             if not line.startswith(("YMM", "XMM", "FPR")))  # vector state: noise
            out.append(f"(qemu) {command}\n{body}")
    return "\n".join(out)


def _read_stat(path: Path) -> tuple[str, list[str]] | None:
    """A /proc stat file: the command name and the fields after it (field 3 on); None if
    the process or thread is gone."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def _session_processes(sid: int) -> dict[int, str]:
    """The processes of session ``sid`` (vng and the QEMU it started), pid -> command name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        parsed = _read_stat(entry / "stat")
        if parsed is not None and int(parsed[1][3]) == sid:  # field 6 of stat: the session id
            found[int(entry.name)] = parsed[0]
    return found


def _thread_cpu(pid: int, interval_s: float = 2.0) -> str:
    """Each thread of ``pid`` with its CPU use over ``interval_s``: which ones spin."""
    def sample() -> dict[str, tuple[str, int]]:
        ticks = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            parsed = _read_stat(task / "stat")
            if parsed is not None:
                comm, fields = parsed
                ticks[task.name] = (comm, int(fields[11]) + int(fields[12]))  # utime + stime
        return ticks

    before = sample()
    time.sleep(interval_s)
    after = sample()
    hz = os.sysconf("SC_CLK_TCK")
    rows = [f"  tid {tid:>8} {comm:<20} {100 * (t - before.get(tid, (comm, t))[1]) / hz / interval_s:5.0f}% CPU"
            for tid, (comm, t) in sorted(after.items(), key=lambda kv: -kv[1][1])]
    return "\n".join(rows)


def capture_frozen_host(sid: int, monitor: Path | None) -> str:
    """What a frozen (or hung) nested host's QEMU is doing, before it is stopped: its
    threads' CPU use, the vCPUs' state through the monitor, and every thread's stack from
    gdb where gdb is installed. Each part that fails says why instead."""
    parts = [f"captured at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"]
    qemu = [pid for pid, comm in _session_processes(sid).items() if comm.startswith("qemu-system")]
    if not qemu:
        return "\n".join(parts + ["no QEMU process found in the nested host's session"])
    pid = qemu[0]
    parts.append(f"QEMU pid {pid}, its threads' CPU over 2 s:")
    try:
        parts.append(_thread_cpu(pid))
    except OSError as exc:
        parts.append(f"  (not readable: {exc})")
    if monitor is not None:
        try:
            parts.append(_monitor_session(monitor, FREEZE_MONITOR_COMMANDS))
        except OSError as exc:
            parts.append(f"QEMU monitor at {monitor}: not reachable ({exc})")
    gdb = shutil.which("gdb")
    if gdb is None:
        parts.append("gdb is not installed: no thread stacks")
    else:
        try:
            res = subprocess.run(
                [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "set pagination off",
                 "-ex", "thread apply all bt 12"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=60, check=False)
            text = res.stdout.decode(errors="replace")
            parts.append("gdb, every thread's stack:\n" + "\n".join(
                line for line in text.splitlines() if line.startswith(("Thread ", "#"))))
        except (OSError, subprocess.TimeoutExpired) as exc:
            parts.append(f"gdb failed: {exc}")
    return "\n".join(parts)


def _save_capture(text: str, cwd: Path) -> Path | None:
    """Keep a freeze capture under ``cwd``/results (CI keeps that folder's files)."""
    folder = Path(os.environ.get("PYMVM_NESTED_CAPTURE_DIR") or cwd / "results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"nested-freeze-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.txt"
        path.write_text(text + "\n")
    except OSError:
        return None
    return path


def _heartbeat_mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _heartbeat_age(path: Path) -> float:
    """Seconds since the heartbeat was last written (0 before the first one)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


def image_cache_dir(env: Mapping[str, str]) -> Path:
    """pymvm's image cache, which must be shared read-write: inside, HOME is read-only and
    the rest of the root filesystem a copy-on-write view, so images built there are lost."""
    if value := env.get("PYMVM_CACHE_DIR"):
        return Path(value)
    from pymvm.images.cache import cache_root  # the one rule for the default location

    return cache_root()


def run_nested(
    argv: Sequence[str],
    *,
    cwd: Path,
    rwdirs: Sequence[Path] = (),
    cpus: int = DEFAULT_CPUS,
    memory: str = "3G",
    timeout: float | None = None,
    stall_timeout: float | None = None,
    env: Mapping[str, str] = _EMPTY_ENV,
    output: BinaryIO | None = None,
    fast_python: bool = True,
) -> int:
    """Boot the nested KVM host, run ``argv`` in ``cwd`` there and return its exit status.

    ``cwd``, ``rwdirs`` and the image cache are shared read-write; the rest of the root
    filesystem is a copy-on-write view whose changes are lost. Output streams to ``output``
    (default: our stdout) as it comes. With ``fast_python``, Python's files and pymvm's
    package are read inside from a local image (see render_fast_mounts); the package folder
    is read-only there. Returns EXIT_NESTED_HOST_DIED if the host ended
    without recording a status, EXIT_TIMEOUT if ``timeout`` seconds passed, or if it printed
    nothing for ``stall_timeout`` seconds (a hung command or a frozen nested host).
    """
    cwd = Path(cwd).resolve()
    if not cwd.is_dir():
        raise NestedHostError(f"working directory {cwd} does not exist")
    sink = output if output is not None else sys.stdout.buffer
    settings = NestedSettings.from_env(os.environ)
    kernel = settings.kernel or find_kernel()
    # A custom kernel has kvm_amd built in: its parameters are on the command line instead.
    builtin_dir = kernel.parent if settings.kernel and (
        kernel.parent / "modules.builtin").is_file() else None
    module_params = {"kvm_amd": settings.kvm_amd} if settings.kvm_amd and not settings.kernel else {}
    vng = find_vng()
    check_tools()
    inner_env = nested_env(env)
    cache = image_cache_dir(inner_env)
    cache.mkdir(parents=True, exist_ok=True)
    inner_env["PYMVM_CACHE_DIR"] = str(cache)  # inside, the default would be elsewhere
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pymvm-nested-") as tmp:
        workdir = Path(tmp).resolve()
        status_path = workdir / STATUS_FILE
        script = workdir / SCRIPT_FILE
        prelude: list[str] = []
        if fast_python:
            image = workdir / FAST_IMAGE_FILE
            trees = python_trees()
            if build_fast_image(trees, image):
                prelude = render_fast_mounts(image, [t.root for t in trees])
                log.info(
                    "fast_python_image",
                    mib=round(image.stat().st_blocks * 512 / 2**20),
                    seconds=round(time.monotonic() - started, 1),
                )
        heartbeat = workdir / HEARTBEAT_FILE
        script.write_text(
            render_script(argv, cwd=cwd, env=inner_env, status_path=status_path, prelude=prelude,
                          heartbeat_path=heartbeat, module_params=module_params,
                          builtin_dir=builtin_dir, show_kvm_amd=bool(settings.kvm_amd))
        )
        shared = _dedupe_rwdirs([workdir, cwd, *rwdirs, cache])
        console_log = workdir / CONSOLE_FILE
        monitor = workdir / MONITOR_FILE
        cmd = vng_command(
            vng=vng, kernel=kernel, script=script, rwdirs=shared, cwd=cwd, cpus=cpus,
            memory=memory, console_log=console_log,
            tcg_thread=os.environ.get("PYMVM_NESTED_TCG_THREAD") or None,
            monitor=monitor, settings=settings,
        )
        log.info("nested_host_start", kernel=str(kernel), cpus=cpus, memory=memory, argv=list(argv),
                 settings=settings.describe())
        sys.stdout.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            # A pipe, not our stdout: vng's QEMU reopens /proc/self/fd/1, and reopening a
            # regular file (a CI log) would write from offset 0 over what is there.
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so _stop can end QEMU too
        )
        out = _OutputFilter(sink)
        try:
            outcome = _pump(proc, out, None if timeout is None else started + timeout, stall_timeout,
                            heartbeat, monitor if settings.wake else None)
            if outcome == "eof":
                proc.wait()
            else:
                capture = capture_frozen_host(proc.pid, monitor if monitor.exists() else None)
                saved = _save_capture(capture, cwd)
                _note("pymvm.nested: what QEMU was doing when it was stopped"
                      + (f" (kept in {saved})" if saved else "") + ":\n"
                      + "\n".join(capture.splitlines()[:40]))
        finally:
            out.close()
            _stop(proc)
            if proc.stdout:
                proc.stdout.close()
        elapsed = round(time.monotonic() - started, 1)
        if outcome != "eof":
            _show_heartbeat(heartbeat, console_log)
        if outcome == "timeout":
            _note(f"pymvm.nested: error: the nested KVM host timed out after {timeout:g} s")
            return EXIT_TIMEOUT
        if outcome == "frozen":
            _note(
                f"pymvm.nested: error: the nested KVM host froze: its heartbeat stopped "
                f"(after {elapsed:g} s in all); stopped it"
            )
            return EXIT_TIMEOUT
        if outcome == "stalled":
            _note(
                f"pymvm.nested: error: the nested KVM host printed nothing for {stall_timeout:g} s "
                f"(after {elapsed:g} s in all): its command hung or the host froze; stopped it"
            )
            return EXIT_TIMEOUT
        status = read_exit_status(status_path)
        if status is None:
            _show_heartbeat(heartbeat, console_log)
    log.info("nested_host_end", status=status, vng_status=proc.returncode, seconds=elapsed)
    if status is None:
        _note(
            f"pymvm.nested: error: the nested KVM host ended (vng status {proc.returncode}) "
            "without recording the command's exit status: it crashed or ran out of memory"
        )
        return EXIT_NESTED_HOST_DIED
    return status


def _show_heartbeat(path: Path, console_log: Path | None = None) -> None:
    """Print the nested host's last heartbeat (processes, kernel log), if it wrote one, and
    the end of its kernel console (warnings, oopses, panics)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        _note("pymvm.nested: the nested host left no heartbeat")
    else:
        _note(f"pymvm.nested: the nested host's last heartbeat (every {HEARTBEAT_INTERVAL_S} s):\n"
              + text.rstrip())
    if console_log is None:
        return
    try:
        console = console_log.read_text(errors="replace").rstrip()
    except OSError:
        console = ""
    lines = console.splitlines()[-60:]
    _note("pymvm.nested: the nested host's kernel console (last lines):\n" + "\n".join(lines)
          if lines else "pymvm.nested: the nested host's kernel console is empty")


def _note(message: str) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def run_with_attempts(run_once: Callable[[], int], attempts: int) -> int:
    """Call ``run_once`` (one nested host from boot to exit) until it returns a status that
    is the command's own, at most ``attempts`` times. A host that froze, died or timed out
    (124/125) gave no result; the next attempt starts a fresh host and the whole command
    again, so a benchmark never combines numbers measured on two hosts."""
    status = EXIT_NESTED_HOST_DIED
    for attempt in range(1, attempts + 1):
        status = run_once()
        if status not in (EXIT_TIMEOUT, EXIT_NESTED_HOST_DIED):
            return status
        if attempt < attempts:
            _note(f"pymvm.nested: the nested KVM host froze, died or timed out (status {status}): "
                  f"not a result of the command; running it again from the start in a fresh "
                  f"nested host (attempt {attempt + 1} of {attempts})")
    _note(f"pymvm.nested: giving up after {attempts} attempt(s): the nested KVM host froze, "
          f"died or timed out each time (last status {status})")
    return status


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pymvm.nested",
        description="Run a command where Linux guests can boot: directly where /dev/kvm is "
        "hardware-assisted, else inside a nested KVM host (virtme-ng + QEMU TCG).",
    )
    parser.add_argument(
        "--cpus", type=int, default=DEFAULT_CPUS,
        help=f"the nested host's CPUs (default {DEFAULT_CPUS}: see DEFAULT_CPUS)",
    )
    parser.add_argument("--memory", default="3G")
    parser.add_argument("--timeout", type=float, default=None, help="seconds, nested host only")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="stop the nested host after this many seconds without output",
    )
    parser.add_argument(
        "--rwdir", type=Path, action="append", default=[], help="another folder to share read-write"
    )
    parser.add_argument(
        "--attempts", type=int, default=1,
        help="run the whole command again in a fresh nested host, up to this many times in all, "
        "when the host froze, died or timed out (status 124/125): for benchmarks, whose results "
        "are only valid from one host",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.attempts < 1:
        parser.error("--attempts must be at least 1")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: python -m pymvm.nested [options] -- CMD...")
    try:
        if in_nested_host():
            direct, why = True, "already inside the nested KVM host"
        else:
            direct, why = can_boot_linux_here()
        if direct:
            _note(f"pymvm.nested: running directly ({why})")
            return subprocess.call(command)
        _note(f"pymvm.nested: running inside the nested KVM host ({why})")
        return run_with_attempts(
            lambda: run_nested(
                command,
                cwd=Path.cwd(),
                rwdirs=args.rwdir,
                cpus=args.cpus,
                memory=args.memory,
                timeout=args.timeout,
                stall_timeout=args.stall_timeout,
            ),
            args.attempts,
        )
    except NestedHostError as exc:
        _note(f"pymvm.nested: error: {exc}")
        return EXIT_NESTED_HOST_DIED
    except FileNotFoundError as exc:
        _note(f"pymvm.nested: error: command not found: {exc.filename}")
        return 127
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
