"""Errors raised by the KVM layer."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """A KVM ioctl or /dev/kvm operation failed."""

    def __init__(self, message: str, *, ioctl: str | None = None, errno: int | None = None):
        self.ioctl = ioctl
        self.errno = errno
        super().__init__(message)

    @classmethod
    def from_errno(cls, ioctl: str, err: int, context: str = "") -> "KvmError":
        name = _errno.errorcode.get(err, str(err))
        where = f" ({context})" if context else ""
        return cls(f"{ioctl} failed{where}: {name}: {os.strerror(err)}", ioctl=ioctl, errno=err)


class KvmCapabilityError(KvmError):
    """The host's KVM lacks something the VMM needs."""
