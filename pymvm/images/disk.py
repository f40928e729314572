"""Raw disk images: open one for a VM's virtio-blk device, checked and locked.

A writable image is locked exclusively and a read-only one shared (``flock`` on the open file
description, as QEMU locks its images with OFD locks): two VMs writing one ext4 image would
corrupt it, so the second is refused with a one-line error. The lock lives as long as the
file description, which the VMM passes on to the back-end process it starts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pymvm.devices.virtio.blk import SECTOR_SIZE


class DiskImageError(Exception):
    """A disk image cannot be used (missing, unreadable, read-only, in use); one line."""


@dataclass
class DiskImage:
    """An open, locked raw image; ``close()`` releases fd and lock."""

    path: Path
    fd: int
    read_only: bool
    size: int

    @property
    def sectors(self) -> int:
        """Capacity in 512-byte sectors (a partial last sector is not addressable)."""
        return self.size // SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_image(path: Path, read_only: bool, what: str = "disk image") -> None:
    """The checks that need no open: exists, a regular file or block device, permissions."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiskImageError(f"{what} {path} does not exist; create it (e.g. 'pymvm build-rootfs' "
                             f"or 'truncate -s 1G {path}')") from None
    except OSError as e:
        raise DiskImageError(f"{what} {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DiskImageError(f"{what} {path} is not a regular file or block device")
    if not os.access(path, os.R_OK):
        raise DiskImageError(f"{what} {path} is not readable; fix its permissions")
    if not read_only and not os.access(path, os.W_OK):
        raise DiskImageError(f"{what} {path} is not writable; fix its permissions or set "
                             f"read_only = true")


def open_image(path: str | os.PathLike[str], *, read_only: bool = False,
               what: str = "disk image") -> DiskImage:
    """Open and lock ``path`` (exclusive for writing, shared for read-only)."""
    path = Path(path)
    check_image(path, read_only, what)
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise DiskImageError(f"{what} {path}: cannot open: {e.strerror}") from None
    try:
        lock_fd(fd, read_only, path, what)
        size = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    if size < SECTOR_SIZE:
        os.close(fd)
        raise DiskImageError(f"{what} {path} holds {size} bytes, less than one 512-byte sector")
    return DiskImage(path, fd, read_only, size)


def lock_fd(fd: int, read_only: bool, path: Path | str, what: str = "disk image") -> None:
    """Take the image lock on ``fd``'s file description (a no-op if it already holds it)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DiskImageError(
                f"{what} {path} is in use by another VM (it holds the image lock); stop that "
                f"VM, or give this one its own copy of the image") from None
        raise DiskImageError(f"{what} {path}: cannot lock: {e.strerror}") from None
