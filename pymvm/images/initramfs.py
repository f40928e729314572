"""A busybox test initramfs, written as an uncompressed cpio "newc" archive in pure Python.

The archive holds the static busybox with a link per applet, /dev/console and /dev/null,
the /init script (init.sh rendered from pymvm.layout, contract in its header) and, on
request, extra host programs with their shared libraries and ELF interpreter, and kernel
modules of an installed distribution kernel with their dependencies (for kernels such as
Debian's, whose virtio drivers are modules), which /init loads in order. Archives are
cached as `<cache>/initramfs/<key>.cpio` (see `pymvm.images.cache.cache_root`).

    python -m pymvm.images.initramfs [--with iperf3] [--modules [--kernel-release R]] [-o PATH]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import structlog

from pymvm import layout
from pymvm.images.agent import AGENT_PORT
from pymvm.images.cache import ImageError, cache_root

log_ = structlog.get_logger()

READY_MARKER = "PYMVM-READY"
EXIT_MARKER = "PYMVM-EXIT"
# Matches the lines /init prints; group 1 is the CPU count / the exit status.
READY_RE = re.compile(rf"^{READY_MARKER} cpus=(\d+)\r?$", re.MULTILINE)
EXIT_RE = re.compile(rf"^{EXIT_MARKER} (\d+)\r?$", re.MULTILINE)

INIT_TEMPLATE = Path(__file__).with_name("init.sh")
# Bump when the archive layout changes, so cached archives are rebuilt.
FORMAT_VERSION = "initramfs-1"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

Log = Callable[[str], None]


class InitramfsError(ImageError):
    """The test initramfs could not be built."""


# --- cpio newc ----------------------------------------------------------------------------

NEWC_MAGIC = b"070701"
NEWC_HEADER_LEN = 110
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without a leading "/"
    mode: int  # file type and permission bits, as in st_mode
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node
    ino: int = 0
    nlink: int = 1


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Writes a newc archive: 110-byte ASCII hex headers, name and data 4-byte aligned.

    Owner, group and mtime are 0 so that the same inputs give the same bytes.
    """

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()
        self.offset = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1, ino: int | None = None) -> None:
        encoded = name.encode() + b"\0"
        if ino is None:
            self._ino += 1
            ino = self._ino
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        assert len(header) == NEWC_HEADER_LEN
        chunk = header + encoded + b"\0" * _pad4(len(header) + len(encoded))
        chunk += data + b"\0" * _pad4(len(data))
        self._out.write(chunk)
        self.offset += len(chunk)

    def _claim(self, path: str) -> str:
        name = str(PurePosixPath("/", path)).lstrip("/")
        if not name or name in self._names:
            raise InitramfsError(f"initramfs path {path!r} is empty or added twice")
        self._names.add(name)
        return name

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._entry(self._claim(path), stat.S_IFDIR | perm, nlink=2)

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(self._claim(path), stat.S_IFREG | perm, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._entry(self._claim(path), stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(self._claim(path), stat.S_IFCHR | perm, rdev=(major, minor))

    def has(self, path: str) -> bool:
        return str(PurePosixPath("/", path)).lstrip("/") in self._names

    def finish(self) -> None:
        self._entry(TRAILER, 0, ino=0)


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer, which is not returned); checks alignment."""
    entries = []
    pos = 0
    while True:
        if pos % 4:
            raise InitramfsError(f"cpio header at offset {pos} is not 4-byte aligned")
        header = data[pos:pos + NEWC_HEADER_LEN]
        if len(header) < NEWC_HEADER_LEN or header[:6] != NEWC_MAGIC:
            raise InitramfsError(f"no newc header at offset {pos}; archive truncated or corrupt")
        f = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        ino, mode, _, _, nlink, _, size, _, _, rmaj, rmin, namesize, _ = f
        name_start = pos + NEWC_HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(NEWC_HEADER_LEN + namesize)
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, data[data_start:data_start + size],
                                 (rmaj, rmin), ino, nlink))
        pos = data_start + size + _pad4(size)


# --- ELF and shared libraries -------------------------------------------------------------

PT_INTERP = 3


def elf_interpreter(image: bytes, what: str = "file") -> str | None:
    """The PT_INTERP path of a 64-bit little-endian ELF, or None if statically linked."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise InitramfsError(f"{what} is not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", image, phoff + i * phentsize)
        if p_type == PT_INTERP:
            return image[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


_LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)$")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)$")


def parse_ldd(output: str) -> list[str]:
    """Absolute library paths from `ldd` output (the vDSO and unresolved ones excluded)."""
    paths = []
    for line in output.splitlines():
        if "not found" in line:
            raise InitramfsError(f"ldd could not resolve a library: {line.strip()}")
        if m := _LDD_ARROW.match(line):
            paths.append(m.group(2))
        elif m := _LDD_PLAIN.match(line):
            paths.append(m.group(1))
    return paths


def _resolve_program(name: str) -> Path:
    found = shutil.which(name) if "/" not in name else name
    if not found or not Path(found).is_file():
        raise InitramfsError(f"program {name!r} not found on the host; install it "
                             f"(e.g. `apt-get install {name}`)")
    return Path(found)


def host_program_files(name: str) -> dict[str, Path]:
    """Archive path -> host file for a program, its shared libraries and ELF interpreter.

    Libraries keep the paths ldd reports, which the guest's dynamic loader also searches.
    """
    program = _resolve_program(name)
    files = {str(program): program}
    interp = elf_interpreter(program.read_bytes(), str(program))
    if interp is None:
        return files
    files[interp] = Path(interp)
    result = subprocess.run(["ldd", str(program)], capture_output=True, text=True)
    if result.returncode != 0:
        raise InitramfsError(f"ldd {program} failed: {result.stderr.strip()}")
    for lib in parse_ldd(result.stdout):
        files[lib] = Path(lib)
    return files


# --- kernel modules -------------------------------------------------------------------------

MODULES_ROOT = Path("/lib/modules")
BOOT_DIR = Path("/boot")
# The virtio drivers a pymvm guest needs: the virtio-mmio transport (found through the ACPI
# DSDT's LNRO0005 devices), net, block, entropy and vsock. Dependencies come from modules.dep.
DEFAULT_MODULES = ("virtio_mmio", "virtio_net", "virtio_blk", "virtio_rng",
                   "vmw_vsock_virtio_transport")
# The list /init reads: one module path per line, in load order (dependencies first).
MODULE_LIST = "etc/pymvm-modules"
_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: str) -> str:
    """The module name of a modules.dep path: file name without .ko[.xz|.gz|.zst], '-' as '_'."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES[::-1]:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep:
            table[module_name(path.strip())] = (path.strip(), deps.split())
    return table


def modules_in_load_order(wanted: Sequence[str], dep_table: dict[str, tuple[str, list[str]]],
                          builtin: set[str], release: str) -> list[str]:
    """Paths (relative to /lib/modules/<release>) of ``wanted`` and their dependencies,
    each after what it needs; modules built into the kernel are skipped."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise InitramfsError(f"module dependency loop: {' -> '.join((*stack, name))}")
        if name not in dep_table:
            if name in builtin:
                return
            raise InitramfsError(f"kernel {release} has no module {name!r} (not in modules.dep "
                                 "nor built in); check the name with `modinfo`")
        path, deps = dep_table[name]
        for dep in deps:
            visit(module_name(dep), (*stack, name))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; compressed modules (.ko.xz, .ko.gz, .ko.zst) are decompressed,
    since busybox insmod loads plain .ko files only."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise InitramfsError(f"{path} is zstd-compressed; install zstd (`apt-get install zstd`)")
        result = subprocess.run([zstd, "-dc", str(path)], capture_output=True)
        if result.returncode != 0:
            raise InitramfsError(f"zstd could not decompress {path}: {result.stderr.decode().strip()}")
        return result.stdout
    return data


def default_kernel_release(boot_dir: Path | None = None, modules_root: Path | None = None) -> str:
    """The newest /boot/vmlinuz-<release> that has modules installed (Debian's
    linux-image-amd64 is the kernel the nested host runs)."""
    boot_dir, modules_root = boot_dir or BOOT_DIR, modules_root or MODULES_ROOT
    releases = [p.name.removeprefix("vmlinuz-") for p in sorted(boot_dir.glob("vmlinuz-*"))]
    usable = [r for r in releases if (modules_root / r / "modules.dep").is_file()]
    if not usable:
        raise InitramfsError(f"no kernel in {boot_dir} with modules in {modules_root}; install "
                             "one (`apt-get install linux-image-amd64`) or pass --kernel-release")
    return usable[-1]


def kernel_modules(release: str, names: Sequence[str] = DEFAULT_MODULES,
                   modules_root: Path | None = None) -> tuple[dict[str, bytes], list[str]]:
    """({guest path: module bytes}, guest paths in load order) for ``names`` of ``release``."""
    directory = (modules_root or MODULES_ROOT) / release
    try:
        dep_text = (directory / "modules.dep").read_text()
    except OSError:
        raise InitramfsError(f"{directory / 'modules.dep'} not found: is kernel {release} "
                             "installed? (see `ls /lib/modules`)") from None
    try:
        builtin = {module_name(line.strip())
                   for line in (directory / "modules.builtin").read_text().splitlines() if line.strip()}
    except OSError:
        builtin = set()
    files: dict[str, bytes] = {}
    order: list[str] = []
    for rel in modules_in_load_order(names, parse_modules_dep(dep_text), builtin, release):
        guest = f"/lib/modules/{release}/{rel}"
        for suffix in (".xz", ".gz", ".zst"):
            guest = guest.removesuffix(suffix)
        files[guest] = read_module(directory / rel)
        order.append(guest)
    return files, order


# --- the archive --------------------------------------------------------------------------

def render_init_script() -> str:
    """init.sh with the boot timer address/value and the markers filled in."""
    values = {
        "BOOT_TIMER_ADDR": f"0x{layout.BOOT_TIMER_ADDR:x}",
        "BOOT_TIMER_MAGIC": str(layout.BOOT_TIMER_MAGIC),
        "READY_MARKER": READY_MARKER,
        "EXIT_MARKER": EXIT_MARKER,
        "AGENT_PORT": str(AGENT_PORT),
    }
    script = INIT_TEMPLATE.read_text()
    for key, value in values.items():
        script = script.replace(f"@@{key}@@", value)
    if leftover := re.search(r"@@\w+@@", script):
        raise InitramfsError(f"init.sh placeholder {leftover.group()} has no value")
    return script


def encode_cmd(command: str) -> str:
    """The `pymvm.cmd=` kernel command line token that makes /init run `command`."""
    return "pymvm.cmd=" + base64.b64encode(command.encode()).decode()


def decode_cmd(token: str) -> str:
    """Inverse of encode_cmd."""
    return base64.b64decode(token.removeprefix("pymvm.cmd="), validate=True).decode()


def encode_net(iface: str, address: str, gateway: str | None = None) -> str:
    """The `pymvm.net=` token; address is ADDR/PREFIX, e.g. encode_net("eth0", "10.0.0.2/24")."""
    if "/" not in address:
        raise InitramfsError(f"guest address {address!r} lacks a /PREFIX (e.g. 10.0.0.2/24)")
    return f"pymvm.net={iface},{address}" + (f",{gateway}" if gateway else "")


def find_busybox() -> Path:
    """The host's busybox, which must be static (Debian `busybox-static`)."""
    candidates = [shutil.which("busybox"), *BUSYBOX_CANDIDATES]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if path.is_file():
            if elf_interpreter(path.read_bytes(), str(path)) is not None:
                raise InitramfsError(f"{path} is dynamically linked; install a static "
                                     f"busybox with `apt-get install busybox-static`")
            return path
    raise InitramfsError("busybox not found; install it with `apt-get install busybox-static`")


def busybox_applets(busybox: Path) -> list[str]:
    result = subprocess.run([str(busybox), "--list"], capture_output=True, text=True)
    if result.returncode != 0:
        raise InitramfsError(f"`{busybox} --list` failed: {result.stderr.strip()}")
    return sorted(set(result.stdout.split()) - {"busybox"})


_BASE_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "etc", "root")


def _add_parents(writer: CpioWriter, path: str) -> None:
    parents = list(PurePosixPath("/", path).parents)[::-1][1:]  # skip "/"
    for parent in parents:
        if not writer.has(str(parent)):
            writer.add_dir(str(parent))


def write_initramfs(out: io.BufferedIOBase, init_script: str, busybox: bytes,
                    applets: Iterable[str], extra_files: dict[str, bytes]) -> None:
    """Write the whole archive; extra_files maps absolute guest path -> content."""
    w = CpioWriter(out)
    for d in _BASE_DIRS:
        w.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    w.add_chardev("dev/console", 5, 1, 0o600)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_file("bin/busybox", busybox, 0o755)
    for applet in applets:
        w.add_symlink(f"bin/{applet}", "busybox")
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("etc/group", b"root:x:0:\n")
    for path, content in sorted(extra_files.items()):
        _add_parents(w, path)
        w.add_file(path, content, 0o755)
    w.add_file("init", init_script.encode(), 0o755)
    w.finish()


@dataclass(frozen=True)
class _Inputs:
    script: str
    busybox_path: Path
    busybox: bytes
    extra: dict[str, bytes]  # guest path -> content (programs, modules, the module list)

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (FORMAT_VERSION.encode(), self.script.encode(),
                     hashlib.sha256(self.busybox).digest(),
                     *(p.encode() + hashlib.sha256(c).digest()
                       for p, c in sorted(self.extra.items()))):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()[:16]


def _gather(extra_binaries: Sequence[str], modules: Sequence[str] = (),
            kernel_release: str | None = None, cache_dir: Path | None = None) -> _Inputs:
    from pymvm.images.agent import GUEST_PATH, build_agent

    busybox_path = find_busybox()
    # The guest agent (docs/agent.md), built from this repository's source: in every image.
    extra: dict[str, bytes] = {GUEST_PATH: build_agent(cache_dir).read_bytes()}
    for name in extra_binaries:
        for guest_path, host_path in host_program_files(name).items():
            extra[guest_path] = host_path.read_bytes()
    if modules:
        release = kernel_release or default_kernel_release()
        files, order = kernel_modules(release, modules)
        extra.update(files)
        extra["/" + MODULE_LIST] = "".join(f"{p}\n" for p in order).encode()
    return _Inputs(render_init_script(), busybox_path, busybox_path.read_bytes(), extra)


_LATEST = "latest"  # names the archive built last, for `initramfs_status()`


def initramfs_status(extra_binaries: Sequence[str] | None = None,
                     cache_dir: Path | None = None) -> Path | None:
    """The cached archive for these extra binaries, or (None) the one built last; no build.

    None when it was never built, or was built from an older init script or busybox.
    """
    directory = cache_root(cache_dir) / "initramfs"
    if extra_binaries is None:
        try:
            key = (directory / _LATEST).read_text().strip()
        except OSError:
            return None
        latest = directory / f"{key}.cpio"
        try:
            # Rebuilding the key from the programs it was built with detects staleness.
            with_names = (directory / f"{key}.with").read_text().split()
            current = _gather(with_names, cache_dir=cache_dir).key()
        except (OSError, ImageError):
            return None
        return latest if current == key and latest.is_file() else None
    try:
        path = directory / f"{_gather(extra_binaries, cache_dir=cache_dir).key()}.cpio"
    except ImageError:
        return None
    return path if path.is_file() else None


def build_initramfs(out: Path | None = None, extra_binaries: Sequence[str] = (),
                    cache_dir: Path | None = None, log: Log = print,
                    modules: Sequence[str] = (), kernel_release: str | None = None) -> Path:
    """Build (or reuse) the test initramfs; returns its path (`out` if given). ``modules``
    (e.g. DEFAULT_MODULES) of ``kernel_release`` (default: default_kernel_release()) go in
    with their dependencies, loaded by /init before it configures the network."""
    inputs = _gather(extra_binaries, modules, kernel_release, cache_dir)
    key = inputs.key()
    directory = cache_root(cache_dir) / "initramfs"
    cached = directory / f"{key}.cpio"

    if not cached.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{key}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            write_initramfs(f, inputs.script, inputs.busybox,
                            busybox_applets(inputs.busybox_path), inputs.extra)
        tmp.replace(cached)
        log(f"[initramfs] built {cached} ({cached.stat().st_size // 1024} KiB"
            f"{', with ' + ', '.join(extra_binaries) if extra_binaries else ''}"
            f"{', with modules ' + ', '.join(modules) if modules else ''})")
        log_.info("initramfs_built", path=str(cached), extra=list(extra_binaries),
                  modules=list(modules))
    if not modules:
        # `@test-initramfs` (initramfs_status) names the last archive built without modules.
        _write_atomically(directory / f"{key}.with", " ".join(extra_binaries))
        _write_atomically(directory / _LATEST, key)
        if cache_dir is None:
            _record(cached, inputs, extra_binaries)
    if out is None:
        return cached
    out = Path(out)
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(cached, tmp_out)
    tmp_out.replace(out)
    return out


def _record(archive: Path, inputs: _Inputs, extra_binaries: Sequence[str]) -> None:
    """`@test-initramfs` for `pymvm run`, valid while every file it was made from is
    unchanged (pymvm.images.artifacts): no hashing of busybox and the programs per run."""
    from pymvm.images.agent import AGENT_SOURCE
    from pymvm.images.artifacts import record_artifact

    try:
        files = [INIT_TEMPLATE, Path(layout.__file__), Path(__file__), inputs.busybox_path,
                 AGENT_SOURCE]
        for name in extra_binaries:
            files.extend(host_program_files(name).values())
    except (OSError, ImageError):
        return
    record_artifact("test-initramfs", archive, files)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymvm.images.initramfs",
                                     description="Build the pymvm test initramfs.")
    parser.add_argument("--with", dest="extra", action="append", default=[],
                        metavar="PROGRAM", help="host program to include with its libraries")
    parser.add_argument("--modules", action="store_true",
                        help=f"add kernel modules ({', '.join(DEFAULT_MODULES)}) and their "
                             "dependencies, loaded by /init")
    parser.add_argument("--kernel-release", default=None, metavar="RELEASE",
                        help="whose modules (/lib/modules/RELEASE); default: the newest "
                             "/boot/vmlinuz-* with modules")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress must show up even when piped
    try:
        path = build_initramfs(args.output, args.extra, args.cache_dir,
                               modules=DEFAULT_MODULES if args.modules else (),
                               kernel_release=args.kernel_release)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
