"""Thin one-to-one wrappers over the KVM ioctls.

Each wrapper issues exactly one ioctl through the cffi binding and turns a failure into
a ``KvmError`` that names the ioctl and errno. No policy lives here.
"""

from __future__ import annotations

from typing import Any

from ._kvm_cffi import ffi, lib
from .errors import KvmError

__all__ = ["ffi", "lib", "ioctl_ptr", "ioctl_val", "ioctl_none"]

_NAMES: dict[int, str] = {
    getattr(lib, name): name for name in dir(lib) if name.startswith("KVM_") and name.isupper()
}


def _name(request: int) -> str:
    return _NAMES.get(request, hex(request))


def ioctl_ptr(fd: int, request: int, arg: Any, context: str = "") -> int:
    ret = lib.pymvm_ioctl_ptr(fd, request, arg)
    if ret < 0:
        raise KvmError.from_errno(_name(request), ffi.errno, context)
    return ret


def ioctl_val(fd: int, request: int, value: int, context: str = "") -> int:
    ret = lib.pymvm_ioctl_val(fd, request, value)
    if ret < 0:
        raise KvmError.from_errno(_name(request), ffi.errno, context)
    return ret


def ioctl_none(fd: int, request: int, context: str = "") -> int:
    return ioctl_val(fd, request, 0, context)


def try_ioctl_ptr(fd: int, request: int, arg: Any) -> tuple[int, int]:
    """Issue an ioctl whose failure the caller interprets (KVM_RUN's EINTR); (ret, errno)."""
    ret = lib.pymvm_ioctl_ptr(fd, request, arg)
    return ret, (ffi.errno if ret < 0 else 0)
