"""The built-in vhost-user net back-end as a child process (root, /dev/net/tun): the host side
the VMM makes for it, and what close() takes away again."""

from __future__ import annotations

import os
import subprocess

import pytest
from pyroute2 import IPRoute

from pymvm.vhost.user.frontend import BuiltinNetBackendProcess

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun",
)


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


@pytest.fixture
def tap_name():
    name = f"pmbt{os.urandom(3).hex()}"
    yield name
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_close_stops_the_backend_and_deletes_the_tap_it_was_given(tap_name: str) -> None:
    proc = BuiltinNetBackendProcess.start(tap_name, ready_timeout=60)
    try:
        assert link_exists(tap_name)
        assert os.path.exists(proc.socket_path)
        assert proc.process.poll() is None
    finally:
        proc.close()
    assert proc.process.poll() is not None, "the back-end process must be reaped"
    assert not link_exists(tap_name), "the TAP made for the back-end must go with it"
    assert not os.path.exists(proc.socket_path)


def test_close_leaves_a_tap_that_existed_before(tap_name: str) -> None:
    subprocess.run(["ip", "tuntap", "add", "name", tap_name, "mode", "tap", "vnet_hdr"],
                   check=True)
    proc = BuiltinNetBackendProcess.start(tap_name, ready_timeout=60)
    proc.close()
    assert proc.process.poll() is not None
    assert link_exists(tap_name), "a TAP the user made must survive"
