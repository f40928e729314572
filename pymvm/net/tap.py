"""TAP devices with virtio-net headers, the packet end of vhost-net on the host side.

A TAP opened here is not persistent: the kernel deletes it when its last fd closes. A TAP
that already exists (``ip tuntap add ... mode tap``, persistent) is attached to, and
survives close().
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import structlog

from pymvm.net.errors import TapError
from pymvm.vhost._vhost_cffi import ffi, lib

log = structlog.get_logger()

_T = TypeVar("_T")

TUN_PATH = "/dev/net/tun"
DEFAULT_TAP_NAME = "pymvm%d"  # the kernel replaces %d with the first free number
MAX_NAME_LEN = lib.IFNAMSIZ - 1

# Guest receive offloads -> TUN_F_* (the TAP may hand the guest such packets).
# tun's set_offload() rejects TSO/ECN without CSUM, and ECN without a TSO flag is
# meaningless, so the dependencies of virtio 1.2 §5.1.3.1 are applied here as well.
_GUEST_CSUM = 1 << lib.VIRTIO_NET_F_GUEST_CSUM
_GUEST_TSO4 = 1 << lib.VIRTIO_NET_F_GUEST_TSO4
_GUEST_TSO6 = 1 << lib.VIRTIO_NET_F_GUEST_TSO6
_GUEST_ECN = 1 << lib.VIRTIO_NET_F_GUEST_ECN
_GUEST_UFO = 1 << lib.VIRTIO_NET_F_GUEST_UFO


def tap_offload_flags(acked_features: int) -> int:
    """TUN_F_* flags for TUNSETOFFLOAD from the virtio-net features the guest acked."""
    if not acked_features & _GUEST_CSUM:
        return 0
    flags = lib.TUN_F_CSUM
    if acked_features & _GUEST_TSO4:
        flags |= lib.TUN_F_TSO4
    if acked_features & _GUEST_TSO6:
        flags |= lib.TUN_F_TSO6
    if acked_features & _GUEST_ECN and flags & (lib.TUN_F_TSO4 | lib.TUN_F_TSO6):
        flags |= lib.TUN_F_TSO_ECN
    if acked_features & _GUEST_UFO:
        flags |= lib.TUN_F_UFO
    return flags


def run_in_netns(netns: str | None, func: Callable[[], _T]) -> _T:
    """Run ``func`` in network namespace ``netns`` (None: the current one).

    setns(2) switches only the calling thread, so a short-lived thread does it and the
    rest of the process stays where it is. Sockets and TAP fds opened there stay bound to
    that namespace after the thread ends.
    """
    if netns is None:
        return func()
    result: list[_T] = []
    error: list[BaseException] = []

    # pyroute2 costs a built-in back-end's start-up a noticeable part: imported only here.
    from pyroute2 import netns as pyroute2_netns

    def target() -> None:
        try:
            pyroute2_netns.setns(netns, flags=0)
        except OSError as exc:
            error.append(
                TapError(f"cannot enter network namespace {netns!r}: {exc}: create it first")
            )
            return
        try:
            result.append(func())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _set_iff(name: str, flags: int) -> tuple[int, str]:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"{TUN_PATH} does not exist: load the module with 'modprobe tun'") from None
    except PermissionError:
        raise TapError(
            f"permission denied opening {TUN_PATH}: run as root or fix its permissions"
        ) from None
    try:
        features = ffi.new("unsigned int *")
        if lib.pymvm_ioctl_ptr(fd, lib.TUNGETFEATURES, features) == 0 and not (
            features[0] & lib.IFF_VNET_HDR
        ):
            raise TapError("this kernel's TAP lacks IFF_VNET_HDR: vhost-net cannot use it")
        buf = ffi.new(f"char[{lib.IFNAMSIZ}]", name.encode())
        if lib.pymvm_tun_set_iff(fd, buf, flags) < 0:
            raise _set_iff_error(name, ffi.errno)
        return fd, ffi.string(buf).decode()
    except BaseException:
        os.close(fd)
        raise


def _set_iff_error(name: str, err: int) -> TapError:
    if err == errno.EBUSY:
        return TapError(
            f"TAP {name!r} is busy: another fd (another process or VM) holds it; "
            "choose another name"
        )
    if err == errno.EPERM:
        return TapError(f"creating TAP {name!r} needs CAP_NET_ADMIN: run as root")
    if err == errno.EINVAL:
        return TapError(
            f"cannot attach TAP {name!r}: an interface of that name exists and is not a "
            "TAP with these flags; choose another name"
        )
    return TapError(f"TUNSETIFF for TAP {name!r} failed: {os.strerror(err)}")


class Tap:
    """Owner of one TAP fd set up for vhost-net (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)."""

    def __init__(self, fd: int, name: str, netns: str | None = None) -> None:
        self._fd: int | None = fd
        self._name = name
        self._netns = netns

    @classmethod
    def open(
        cls, name: str | None = None, *, netns: str | None = None, multi_queue: bool = False
    ) -> Tap:
        """Create (or attach to) TAP ``name``; None lets the kernel pick ``pymvm<N>``.
        With ``netns`` the TAP is created inside that existing network namespace."""
        name = name or DEFAULT_TAP_NAME
        if len(name.encode()) > MAX_NAME_LEN:
            raise TapError(
                f"TAP name {name!r} is longer than {MAX_NAME_LEN} bytes: choose a shorter name"
            )
        flags = lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR
        if multi_queue:
            flags |= lib.IFF_MULTI_QUEUE
        fd, real_name = run_in_netns(netns, lambda: _set_iff(name, flags))
        log.info("tap_opened", tap=real_name, netns=netns, fd=fd)
        return cls(fd, real_name, netns)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise TapError(f"TAP {self._name!r} is closed")
        return self._fd

    @property
    def name(self) -> str:
        return self._name

    @property
    def netns(self) -> str | None:
        return self._netns

    @property
    def closed(self) -> bool:
        return self._fd is None

    def set_vnet_hdr_size(self, size: int) -> None:
        """Bytes of virtio-net header the TAP prepends/expects (12 for virtio 1.x)."""
        val = ffi.new("int *", size)
        if lib.pymvm_ioctl_ptr(self.fd, lib.TUNSETVNETHDRSZ, val) < 0:
            raise TapError(
                f"TUNSETVNETHDRSZ {size} on TAP {self._name!r} failed: "
                f"{os.strerror(ffi.errno)}"
            )

    def vnet_hdr_size(self) -> int:
        val = ffi.new("int *")
        if lib.pymvm_ioctl_ptr(self.fd, lib.TUNGETVNETHDRSZ, val) < 0:
            raise TapError(
                f"TUNGETVNETHDRSZ on TAP {self._name!r} failed: {os.strerror(ffi.errno)}"
            )
        return int(val[0])

    def set_offload(self, acked_features: int) -> int:
        """Enable the offloads the guest negotiated; returns the TUN_F_* flags set."""
        flags = tap_offload_flags(acked_features)
        if lib.pymvm_ioctl_val(self.fd, lib.TUNSETOFFLOAD, flags) < 0:
            raise TapError(
                f"TUNSETOFFLOAD {flags:#x} on TAP {self._name!r} failed: {os.strerror(ffi.errno)}"
            )
        return flags

    def close(self) -> None:
        """Close the fd (a TAP this process created disappears); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            log.info("tap_closed", tap=self._name, netns=self._netns)
