"""In-kernel vhost behaviour the mutation run of issue 16 found unchecked (docs/mutation.md):
each ioctl wrapper names its ioctl and the errno when the kernel refuses it. Checked on an fd
that is no vhost device (/dev/null answers every ioctl with ENOTTY), so no /dev/vhost-net
is needed."""

from __future__ import annotations

import errno
import os

import pytest

from pymvm.memory import GuestMemory
from pymvm.vhost.errors import VhostIoctlError
from pymvm.vhost.kernel import VhostNet, VhostVsock, VringHostAddrs

CALLS = {
    "VHOST_SET_OWNER": lambda v, mem: v.set_owner(),
    "VHOST_GET_FEATURES": lambda v, mem: v.features(),
    "VHOST_SET_FEATURES": lambda v, mem: v.set_features(1 << 32),
    "VHOST_SET_MEM_TABLE": lambda v, mem: v.set_mem_table(mem.regions),
    "VHOST_SET_VRING_NUM": lambda v, mem: v.set_vring_num(0, 256),
    "VHOST_SET_VRING_BASE": lambda v, mem: v.set_vring_base(0, 0),
    "VHOST_GET_VRING_BASE": lambda v, mem: v.get_vring_base(0),
    "VHOST_SET_VRING_ADDR": lambda v, mem: v.set_vring_addr(
        0, VringHostAddrs(desc=mem.regions[0].host_addr, avail=mem.regions[0].host_addr + 4096,
                          used=mem.regions[0].host_addr + 8192)),
    "VHOST_SET_VRING_KICK": lambda v, mem: v.set_vring_kick(0, -1),
    "VHOST_SET_VRING_CALL": lambda v, mem: v.set_vring_call(0, -1),
    "VHOST_NET_SET_BACKEND": lambda v, mem: v.set_backend(0, -1),
}


@pytest.mark.parametrize("ioctl", sorted(CALLS))
def test_refused_ioctl_is_named_with_its_errno(ioctl: str) -> None:
    with (GuestMemory(1 << 20) as mem, VhostNet.open(os.devnull) as vhost,
          pytest.raises(VhostIoctlError) as refused):
        CALLS[ioctl](vhost, mem)
    assert (refused.value.ioctl, refused.value.errno) == (ioctl, errno.ENOTTY)
    assert str(refused.value) == f"{ioctl} failed: {os.strerror(errno.ENOTTY)}"


@pytest.mark.parametrize("ioctl, call", [
    ("VHOST_VSOCK_SET_GUEST_CID", lambda v: v.set_guest_cid(3)),
    ("VHOST_VSOCK_SET_RUNNING", lambda v: v.set_running(True)),
])
def test_refused_vsock_ioctl_is_named_with_its_errno(ioctl: str, call) -> None:
    with VhostVsock.open(os.devnull) as vhost, pytest.raises(VhostIoctlError) as refused:
        call(vhost)
    assert (refused.value.ioctl, refused.value.errno) == (ioctl, errno.ENOTTY)
    assert str(refused.value) == f"{ioctl} failed: {os.strerror(errno.ENOTTY)}"
