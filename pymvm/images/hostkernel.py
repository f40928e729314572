"""Build a 6.12 kernel for the nested KVM host from Debian's linux-source-6.12.

An experiment of issue 8: the nested host (pymvm.nested) normally boots Debian's own 6.1
kernel from /boot; this one is the same host on 6.12, with everything it needs built in
(KVM and kvm_amd, vhost-net, vhost-vsock, TUN, bridges, veth, namespaces, hugetlbfs,
seccomp, userfaultfd, the vDPA simulator and vhost-vdpa). Recipe: unpack the tarball,
`virtme-configkernel --defconfig` (what `vng --kconfig` runs: defconfig plus what virtme-ng
needs to boot a kernel), merge kernels/nested-host-x86_64.config over it, `make
olddefconfig`, check that no option of the fragment was dropped, `nice make bzImage`.

The result is cached under `<cache>/kernels/nested-host-<key>/` (bzImage, config,
modules.builtin, modules.builtin.modinfo; see `pymvm.images.cache.cache_root`); the key
covers the fragment, the source tarball, virtme-ng's version (it writes the base config)
and RECIPE_VERSION. `PYMVM_NESTED_KERNEL=6.12` boots the nested host on it.

    python -m pymvm.images.hostkernel [--jobs N] [--cache-dir DIR] [--status]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from pymvm.images.cache import ImageError, cache_root
from pymvm.images.kernel import (
    MAKE_ARGS,
    KernelBuildError,
    KernelConfigError,
    Log,
    _check_tools,
    _elapsed,
    _run,
    dropped_options,
    find_source_tarball,
)

log_ = structlog.get_logger()

# Bump when the build steps change in a way that changes the output.
RECIPE_VERSION = "nested-host-kernel-1"
FRAGMENT_PATH = Path(__file__).resolve().parents[2] / "kernels" / "nested-host-x86_64.config"
#: The keyword PYMVM_NESTED_KERNEL takes for this kernel (see pymvm.nested.NestedSettings).
KEYWORD = "6.12"
CACHE_PREFIX = "nested-host-"
#: Files kept beside the bzImage: the list of built-in modules lets modprobe inside the
#: host answer "built in" (silently) instead of "not found".
BUILTIN_FILES = ("modules.builtin", "modules.builtin.modinfo")


@dataclass(frozen=True)
class HostKernel:
    folder: Path

    @property
    def bzimage(self) -> Path:
        return self.folder / "bzImage"

    @property
    def config(self) -> Path:
        return self.folder / "config"

    def complete(self) -> bool:
        return all((self.folder / name).is_file()
                   for name in ("bzImage", "config", *BUILTIN_FILES))


def _virtme_version() -> str:
    try:
        return importlib.metadata.version("virtme-ng")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(fragment: bytes, tarball: Path, virtme_version: str) -> str:
    st = tarball.stat()
    h = hashlib.sha256()
    for part in (fragment, tarball.name.encode(), str(st.st_size).encode(),
                 str(st.st_mtime_ns).encode(), virtme_version.encode(), RECIPE_VERSION.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def host_kernel_dir(cache_dir: Path | None = None, fragment_path: Path = FRAGMENT_PATH,
                    *, fragment: bytes | None = None, tarball: Path | None = None) -> Path:
    """Where the kernel for the current fragment, source and virtme-ng lives (built or not);
    ``fragment`` and ``tarball`` when the caller has them already."""
    fragment = fragment_path.read_bytes() if fragment is None else fragment
    tarball = find_source_tarball() if tarball is None else tarball
    key = cache_key(fragment, tarball, _virtme_version())
    return cache_root(cache_dir) / "kernels" / f"{CACHE_PREFIX}{key}"


def host_kernel_status(cache_dir: Path | None = None,
                       fragment_path: Path = FRAGMENT_PATH) -> HostKernel | None:
    """The cached kernel for the current inputs, or None if it is not built."""
    try:
        kernel = HostKernel(host_kernel_dir(cache_dir, fragment_path))
    except (KernelBuildError, OSError):
        return None
    return kernel if kernel.complete() else None


def _configkernel() -> str:
    sibling = Path(sys.executable).parent / "virtme-configkernel"
    if os.access(sibling, os.X_OK):
        return str(sibling)
    if found := shutil.which("virtme-configkernel"):
        return found
    raise KernelBuildError("virtme-ng's `virtme-configkernel` is not installed: "
                           "run `pip install virtme-ng`")


def build_host_kernel(cache_dir: Path | None = None, jobs: int | None = None,
                      log: Log = print, fragment_path: Path = FRAGMENT_PATH) -> HostKernel:
    """Build (or return the cached) nested-host kernel; see the module docstring."""
    tarball = find_source_tarball()
    fragment = fragment_path.read_bytes()
    kernel = HostKernel(host_kernel_dir(cache_dir, fragment_path, fragment=fragment,
                                        tarball=tarball))
    if kernel.complete():
        log(f"[kernel] nested-host kernel already built: {kernel.folder}")
        return kernel
    _check_tools()
    configkernel = _configkernel()
    jobs = jobs or os.cpu_count() or 1
    kernels_dir = kernel.folder.parent
    kernels_dir.mkdir(parents=True, exist_ok=True)
    build_log = kernels_dir / f"{kernel.folder.name}.build.log"
    build_log.write_text("")
    start = time.monotonic()
    log(f"[kernel] building the nested-host kernel {kernel.folder.name} from {tarball.name} "
        f"with {jobs} jobs at nice 19 (tens of minutes on 2 cores; log: {build_log})")
    log_.info("host_kernel_build_start", key=kernel.folder.name, tarball=str(tarball), jobs=jobs)
    work = Path(tempfile.mkdtemp(prefix=f".{kernel.folder.name}-", dir=kernels_dir))
    try:
        _run("unpack", ["tar", "-xf", str(tarball), "-C", str(work)], work, build_log, log, start)
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        make = ["make", *MAKE_ARGS]
        _run("virtme-ng base config", [configkernel, "--defconfig", "--arch", "x86_64"], src,
             build_log, log, start)
        shutil.copyfile(fragment_path, src / "pymvm-nested-host.config")
        _run("merge fragment", ["sh", "scripts/kconfig/merge_config.sh", "-m", ".config",
                                "pymvm-nested-host.config"], src, build_log, log, start)
        _run("olddefconfig", [*make, "olddefconfig"], src, build_log, log, start)
        if problems := dropped_options(fragment.decode(), (src / ".config").read_text()):
            raise KernelConfigError(
                f"olddefconfig dropped {len(problems)} option(s) of the nested-host fragment: "
                f"{'; '.join(problems)}; fix their dependencies in {fragment_path.name}")
        _run("compile", ["nice", "-n", "19", *make, f"-j{jobs}", "bzImage"], src, build_log,
             log, start)
        out = work / "out"
        out.mkdir()
        shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(src / ".config", out / "config")
        for name in BUILTIN_FILES:
            shutil.copyfile(src / name, out / name)
        try:
            out.rename(kernel.folder)
        except OSError:
            if not kernel.complete():  # another build finished first: as good as ours
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.monotonic() - start)
    log(f"[kernel] nested-host kernel done in {_elapsed(start)} ({seconds} s wall): "
        f"{kernel.folder}")
    log_.info("host_kernel_build_done", key=kernel.folder.name, seconds=seconds)
    return kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pymvm.images.hostkernel",
        description="Build the nested KVM host's 6.12 kernel (issue 8's kernel experiment; "
        f"use it with PYMVM_NESTED_KERNEL={KEYWORD}).")
    parser.add_argument("--jobs", "-j", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--status", action="store_true",
                        help="print the cached kernel's path, build nothing")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    try:
        if args.status:
            kernel = host_kernel_status(args.cache_dir)
            if kernel is None:
                print("nested-host kernel not built")
                return 1
        else:
            kernel = build_host_kernel(args.cache_dir, args.jobs)
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bzImage: {kernel.bzimage}\nconfig:  {kernel.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
