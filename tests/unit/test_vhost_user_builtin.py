"""The built-in vhost-user net back-end as a child process (root, /dev/net/tun) on the TAP of
the VMM's host network: what closing the back-end and then the host network takes away."""

from __future__ import annotations

import os
import subprocess

import pytest
from pyroute2 import IPRoute

from pymvm.net.host import HostNetwork
from pymvm.vhost.backends.process import BuiltinNetBackendOnTap

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


def test_close_stops_the_backend_and_the_host_network_deletes_the_tap_it_made(tap_name) -> None:
    hostnet = HostNetwork.create(tap_name)
    try:
        proc = BuiltinNetBackendOnTap.start(hostnet.tap.fd, tap_name, ready_timeout=60)
        try:
            assert os.path.exists(proc.socket_path)
            assert proc.process.poll() is None
        finally:
            proc.close()
        assert proc.process.poll() is not None, "the back-end process must be reaped"
        assert not os.path.exists(proc.socket_path)
        assert link_exists(tap_name), "the TAP is the VMM's: it outlives the back-end"
    finally:
        hostnet.close()
    assert not link_exists(tap_name), "the TAP made for the VM must go with its host network"


def test_close_leaves_a_tap_that_existed_before(tap_name) -> None:
    subprocess.run(["ip", "tuntap", "add", "name", tap_name, "mode", "tap", "vnet_hdr"],
                   check=True)
    hostnet = HostNetwork.create(tap_name)
    try:
        proc = BuiltinNetBackendOnTap.start(hostnet.tap.fd, tap_name, ready_timeout=60)
        proc.close()
        assert proc.process.poll() is not None
    finally:
        hostnet.close()
    assert link_exists(tap_name), "a TAP the user made must survive"
