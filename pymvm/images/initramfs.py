"""A busybox test initramfs, written as an uncompressed cpio "newc" archive in pure Python.

The archive holds the static busybox with a link per applet, /dev/console and /dev/null,
the /init script (init.sh rendered from pymvm.layout, contract in its header) and, on
request, extra host programs with their shared libraries and ELF interpreter. Archives are
cached as `<cache>/initramfs/<key>.cpio` (see `pymvm.images.cache.cache_root`).

    python -m pymvm.images.initramfs [--with iperf3] [-o PATH]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
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


# --- the archive --------------------------------------------------------------------------

def render_init_script() -> str:
    """init.sh with the boot timer address/value and the markers filled in."""
    values = {
        "BOOT_TIMER_ADDR": f"0x{layout.BOOT_TIMER_ADDR:x}",
        "BOOT_TIMER_MAGIC": str(layout.BOOT_TIMER_MAGIC),
        "READY_MARKER": READY_MARKER,
        "EXIT_MARKER": EXIT_MARKER,
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
    extra: dict[str, bytes]  # guest path -> content

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (FORMAT_VERSION.encode(), self.script.encode(),
                     hashlib.sha256(self.busybox).digest(),
                     *(p.encode() + hashlib.sha256(c).digest()
                       for p, c in sorted(self.extra.items()))):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()[:16]


def _gather(extra_binaries: Sequence[str]) -> _Inputs:
    busybox_path = find_busybox()
    extra: dict[str, bytes] = {}
    for name in extra_binaries:
        for guest_path, host_path in host_program_files(name).items():
            extra[guest_path] = host_path.read_bytes()
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
            current = _gather(with_names).key()
        except (OSError, ImageError):
            return None
        return latest if current == key and latest.is_file() else None
    try:
        path = directory / f"{_gather(extra_binaries).key()}.cpio"
    except ImageError:
        return None
    return path if path.is_file() else None


def build_initramfs(out: Path | None = None, extra_binaries: Sequence[str] = (),
                    cache_dir: Path | None = None, log: Log = print) -> Path:
    """Build (or reuse) the test initramfs; returns its path (`out` if given)."""
    inputs = _gather(extra_binaries)
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
            f"{', with ' + ', '.join(extra_binaries) if extra_binaries else ''})")
        log_.info("initramfs_built", path=str(cached), extra=list(extra_binaries))
    _write_atomically(directory / f"{key}.with", " ".join(extra_binaries))
    _write_atomically(directory / _LATEST, key)
    if out is None:
        return cached
    out = Path(out)
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(cached, tmp_out)
    tmp_out.replace(out)
    return out


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymvm.images.initramfs",
                                     description="Build the pymvm test initramfs.")
    parser.add_argument("--with", dest="extra", action="append", default=[],
                        metavar="PROGRAM", help="host program to include with its libraries")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress must show up even when piped
    try:
        path = build_initramfs(args.output, args.extra, args.cache_dir)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
