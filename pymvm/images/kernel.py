"""Build the minimal microVM guest kernel from Debian's linux-source-6.12.

Recipe: unpack the tarball, `make tinyconfig`, merge kernels/microvm-x86_64.config (and,
for the ACPI variant, kernels/microvm-x86_64-acpi.config after it), `make olddefconfig`,
check that no option of the fragments was dropped, then `make vmlinux bzImage`. Results
are cached under `<cache>/kernels/<key>/` (see `pymvm.images.cache.cache_root`); the key
covers the fragments, the source tarball and `RECIPE_VERSION`, so editing a fragment
triggers a rebuild and the two variants never share a cache entry.

    python -m pymvm.images.kernel [--acpi] [--jobs N] [--cache-dir DIR] [--status]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from pymvm.images.cache import ImageError, cache_root

log_ = structlog.get_logger()

# Bump when the build steps change in a way that changes the output.
RECIPE_VERSION = "microvm-kernel-1"
SOURCE_DIR = Path("/usr/src")
SOURCE_GLOB = "linux-source-6.12*.tar.*"
FRAGMENT_PATH = Path(__file__).resolve().parents[2] / "kernels" / "microvm-x86_64.config"
# Merged after FRAGMENT_PATH for the ACPI variant (`acpi=True`).
ACPI_FRAGMENT_PATH = FRAGMENT_PATH.with_name("microvm-x86_64-acpi.config")
MAKE_ARGS = ("ARCH=x86_64",)
# Host tools the kernel build needs, and the Debian package providing each.
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "tar": "tar", "xz": "xz-utils", "perl": "perl"}
PROGRESS_INTERVAL_S = 10.0

Log = Callable[[str], None]


class KernelBuildError(ImageError):
    """The guest kernel could not be configured or built."""


class KernelConfigError(KernelBuildError):
    """`make olddefconfig` dropped or changed options that the fragment sets."""


@dataclass(frozen=True)
class KernelImages:
    vmlinux: Path  # uncompressed ELF, what pymvm loads
    bzimage: Path  # compressed, for QEMU and other VMMs
    config: Path  # the final .config


# --- config fragment checks -------------------------------------------------------------

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_kconfig(text: str) -> dict[str, str]:
    """Map option -> value of a .config or fragment; "is not set" lines map to "n"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET_RE.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _UNSET_RE.match(line):
            options[m.group(1)] = "n"
    return options


def dropped_options(fragment: str, final_config: str) -> list[str]:
    """Options the fragment sets that the final .config does not have, as readable lines.

    An option absent from the final config counts as "n" (Kconfig omits invisible options).
    """
    final = parse_kconfig(final_config)
    problems = []
    for name, wanted in parse_kconfig(fragment).items():
        got = final.get(name, "n")
        if got != wanted:
            shown = "not set" if got == "n" else got
            problems.append(f"{name}={wanted} (final .config: {shown})")
    return problems


def check_config(fragment: str, final_config: str) -> None:
    """Raise KernelConfigError naming every option of the fragment that did not survive."""
    if problems := dropped_options(fragment, final_config):
        raise KernelConfigError(
            f"olddefconfig dropped {len(problems)} option(s) of the kernel fragment: "
            f"{'; '.join(problems)}; fix their dependencies in {FRAGMENT_PATH.name}")


# --- locating inputs and the cache ------------------------------------------------------

def find_source_tarball(source_dir: Path | None = None) -> Path:
    """The Debian linux-source-6.12 tarball (newest if several)."""
    source_dir = source_dir or SOURCE_DIR
    found = sorted(source_dir.glob(SOURCE_GLOB))
    if not found:
        raise KernelBuildError(
            f"no {SOURCE_GLOB} in {source_dir}; install it with "
            f"`apt-get install linux-source-6.12`")
    return found[-1]


def cache_key(fragment: bytes, tarball: Path) -> str:
    st = tarball.stat()
    h = hashlib.sha256()
    for part in (fragment, tarball.name.encode(), str(st.st_size).encode(),
                 str(st.st_mtime_ns).encode(), RECIPE_VERSION.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _images_in(directory: Path) -> KernelImages:
    return KernelImages(vmlinux=directory / "vmlinux", bzimage=directory / "bzImage",
                        config=directory / "config")


def _complete(images: KernelImages) -> bool:
    return all(p.is_file() for p in (images.vmlinux, images.bzimage, images.config))


def fragment_paths(fragment_path: Path = FRAGMENT_PATH, *, acpi: bool = False) -> list[Path]:
    """The fragments merged, in order: the base one, then the ACPI one for that variant."""
    return [fragment_path, ACPI_FRAGMENT_PATH] if acpi else [fragment_path]


def combined_fragment(paths: list[Path]) -> bytes:
    """The fragments as one text (later options win, as in merge_config.sh). The base
    variant's text is its fragment unchanged, so its cache key does not move."""
    parts = [paths[0].read_bytes()]
    for extra in paths[1:]:
        parts.append(f"\n# --- merged from {extra.name}\n".encode() + extra.read_bytes())
    return b"".join(parts)


def _build_dir(cache_dir: Path | None, paths: list[Path]) -> tuple[Path, Path, bytes]:
    fragment = combined_fragment(paths)
    tarball = find_source_tarball()
    return cache_root(cache_dir) / "kernels" / cache_key(fragment, tarball), tarball, fragment


def kernel_status(cache_dir: Path | None = None,
                  fragment_path: Path = FRAGMENT_PATH, *, acpi: bool = False) -> KernelImages | None:
    """The cached kernel for the current fragments and source, or None if not built yet."""
    try:
        final_dir, _, _ = _build_dir(cache_dir, fragment_paths(fragment_path, acpi=acpi))
    except KernelBuildError:
        return None
    images = _images_in(final_dir)
    if not _complete(images):
        return None
    if not acpi and cache_dir is None:
        _record(images, fragment_paths(fragment_path, acpi=acpi))
    return images


def _record(images: KernelImages, fragments: list[Path]) -> None:
    """`@microvm-kernel` for `pymvm run`, valid while the fragments, the source and this
    recipe are unchanged (pymvm.images.artifacts)."""
    from .artifacts import record_artifact

    try:
        tarball = find_source_tarball()
    except KernelBuildError:
        return
    record_artifact("microvm-kernel", images.vmlinux, [*fragments, tarball, Path(__file__)])


# --- building ---------------------------------------------------------------------------

def _check_tools() -> None:
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise KernelBuildError(
            f"kernel build tools missing; install them with "
            f"`apt-get install {' '.join(missing)} libelf-dev libssl-dev`")


class _Progress:
    """Condenses make's output: one line every PROGRESS_INTERVAL_S with a step count."""

    _STEP_RE = re.compile(r"^\s+([A-Z][A-Z0-9_]*)\s+(\S+)")

    def __init__(self, stage: str, log: Log, start: float) -> None:
        self.stage, self.log, self.start = stage, log, start
        self.steps = 0
        self.last = ""
        self.next_report = time.monotonic() + PROGRESS_INTERVAL_S

    def feed(self, line: str) -> None:
        if m := self._STEP_RE.match(line):
            self.steps += 1
            self.last = f"{m.group(1)} {m.group(2)}"
        now = time.monotonic()
        if now >= self.next_report:
            self.next_report = now + PROGRESS_INTERVAL_S
            self.log(f"[kernel] {self.stage}: {self.steps} steps, "
                     f"{_elapsed(self.start)} elapsed, last: {self.last}")


def _elapsed(start: float) -> str:
    s = int(time.monotonic() - start)
    return f"{s // 60}:{s % 60:02d}"


def _run(stage: str, argv: list[str], cwd: Path, build_log: Path, log: Log,
         start: float) -> None:
    """Run one build step, its output appended to build_log and condensed to `log`."""
    log(f"[kernel] {stage}: {' '.join(argv)}")
    progress = _Progress(stage, log, start)
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with build_log.open("a") as out, subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail.append(line.rstrip())
            progress.feed(line)
        rc = proc.wait()
    if rc != 0:
        for line in tail:
            log(f"[kernel]   | {line}")
        raise KernelBuildError(
            f"kernel {stage} failed (exit {rc}); full output in {build_log}")
    log(f"[kernel] {stage} done ({progress.steps} steps, {_elapsed(start)} elapsed)")


def build_kernel(cache_dir: Path | None = None, jobs: int | None = None,
                 log: Log = print, fragment_path: Path = FRAGMENT_PATH, *,
                 acpi: bool = False) -> KernelImages:
    """Build (or return the cached) microVM kernel, with ACPI if asked; see the module
    docstring."""
    paths = fragment_paths(fragment_path, acpi=acpi)
    final_dir, tarball, fragment = _build_dir(cache_dir, paths)
    images = _images_in(final_dir)
    if _complete(images):
        if not acpi and cache_dir is None:
            _record(images, paths)
        return images
    _check_tools()
    jobs = jobs or os.cpu_count() or 1
    kernels_dir = final_dir.parent
    kernels_dir.mkdir(parents=True, exist_ok=True)
    build_log = kernels_dir / f"{final_dir.name}.build.log"
    build_log.write_text("")
    start = time.monotonic()
    log(f"[kernel] building {final_dir.name}{' (ACPI)' if acpi else ''} from {tarball.name} with {jobs} jobs "
        f"(a few minutes; log: {build_log})")
    log_.info("kernel_build_start", key=final_dir.name, tarball=str(tarball), jobs=jobs)
    # Built in a temp dir beside the final one so the rename into place is atomic.
    work = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=kernels_dir))
    try:
        _run("unpack", ["tar", "-xf", str(tarball), "-C", str(work)], work, build_log,
             log, start)
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        make = ["make", *MAKE_ARGS]
        _run("tinyconfig", [*make, "tinyconfig"], src, build_log, log, start)
        merged = []
        for i, path in enumerate(paths):
            shutil.copyfile(path, src / f"pymvm-{i}.config")
            merged.append(f"pymvm-{i}.config")
        _run("merge fragment", ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config",
                                *merged], src, build_log, log, start)
        _run("olddefconfig", [*make, "olddefconfig"], src, build_log, log, start)
        check_config(fragment.decode(), (src / ".config").read_text())
        _run("compile", [*make, f"-j{jobs}", "vmlinux", "bzImage"], src, build_log, log,
             start)
        out = work / "out"
        out.mkdir()
        shutil.copyfile(src / "vmlinux", out / "vmlinux")
        shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(src / ".config", out / "config")
        try:
            out.rename(final_dir)
        except OSError:
            # Another build finished first; its result is as good as ours.
            if not _complete(images):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[kernel] done in {_elapsed(start)}: {final_dir}")
    log_.info("kernel_build_done", key=final_dir.name, seconds=round(time.monotonic() - start))
    if not acpi and cache_dir is None:
        _record(images, paths)
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymvm.images.kernel",
                                     description="Build the pymvm microVM guest kernel.")
    parser.add_argument("--jobs", "-j", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--acpi", action="store_true", help="the ACPI variant")
    parser.add_argument("--status", action="store_true",
                        help="print the cached kernel's paths, build nothing")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress must show up even when piped
    try:
        if args.status:
            images = kernel_status(args.cache_dir, acpi=args.acpi)
            if images is None:
                print("kernel not built")
                return 1
        else:
            images = build_kernel(args.cache_dir, args.jobs, acpi=args.acpi)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"vmlinux: {images.vmlinux}\nbzImage: {images.bzimage}\nconfig:  {images.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
