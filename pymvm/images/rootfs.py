"""`pymvm build-rootfs`: the test initramfs as an ext4 root disk.

The image holds the same tree as the test initramfs (busybox, the guest agent, extra
programs) and the same /init, linked as /sbin/init where the kernel looks for it when it
mounts a disk root (``root=/dev/vda rw``, which ``[[block]] root = true`` adds). Built with
``mke2fs -d`` (e2fsprogs), no loop mount and no root needed; what the guest writes to it
stays there across VM restarts.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pymvm.images.initramfs import InitramfsError, _gather, busybox_applets, read_newc, write_initramfs

Log = Callable[[str], None]
DEFAULT_SIZE_MIB = 256
MIN_SIZE_MIB = 16


class RootfsError(InitramfsError):
    """The root file system image could not be built; one line."""


def extract_tree(archive: bytes, root: Path) -> None:
    """Materialize a newc archive under ``root`` (device nodes only when we may mknod)."""
    for entry in read_newc(archive):
        path = root / entry.name
        kind = stat.S_IFMT(entry.mode)
        perm = stat.S_IMODE(entry.mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == stat.S_IFDIR:
            path.mkdir(exist_ok=True)
            path.chmod(perm)
        elif kind == stat.S_IFREG:
            path.write_bytes(entry.data)
            path.chmod(perm)
        elif kind == stat.S_IFLNK:
            os.symlink(entry.data.decode(), path)
        elif kind == stat.S_IFCHR:
            try:
                os.mknod(path, entry.mode, os.makedev(*entry.rdev))
            except PermissionError:
                pass  # the kernel mounts devtmpfs on /dev of a disk root anyway


def build_rootfs(out: Path, *, size_mib: int = DEFAULT_SIZE_MIB,
                 extra_binaries: Sequence[str] = (), log: Log = print,
                 label: str = "pymvm-root") -> Path:
    """Write an ext4 image of ``size_mib`` MiB at ``out`` (replaced if it exists)."""
    out = Path(out)
    if size_mib < MIN_SIZE_MIB:
        raise RootfsError(f"--size-mib {size_mib} is too small; use at least {MIN_SIZE_MIB}")
    mke2fs = shutil.which("mke2fs") or shutil.which("mkfs.ext4")
    if mke2fs is None:
        raise RootfsError("mke2fs is not installed: apt-get install e2fsprogs")
    if not out.parent.is_dir():
        raise RootfsError(f"directory {out.parent} does not exist; create it or choose -o")
    inputs = _gather(extra_binaries)
    archive = io.BytesIO()
    write_initramfs(archive, inputs.script, inputs.busybox, busybox_applets(inputs.busybox_path),
                    inputs.extra)
    with tempfile.TemporaryDirectory(prefix="pymvm-rootfs-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        extract_tree(archive.getvalue(), tree)
        (tree / "sbin").mkdir(exist_ok=True)
        os.symlink("/init", tree / "sbin" / "init")  # the kernel's first choice on a disk root
        (tree / "mnt").mkdir(exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with open(tmp_out, "wb") as f:
            f.truncate(size_mib << 20)  # sparse
        result = subprocess.run(
            [mke2fs, "-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0",
             "-d", str(tree), str(tmp_out)],
            capture_output=True, text=True)
        if result.returncode != 0:
            tmp_out.unlink(missing_ok=True)
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise RootfsError(f"mke2fs failed ({result.returncode}): "
                              f"{detail[-1] if detail else 'no output'}")
        tmp_out.replace(out)
    log(f"[rootfs] built {out} ({size_mib} MiB ext4"
        f"{', with ' + ', '.join(extra_binaries) if extra_binaries else ''})")
    return out
