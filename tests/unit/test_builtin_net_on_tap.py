"""The built-in vhost-user net back-end on a TAP the VMM owns (issue 10 item 3): the child gets
the TAP's fd (``--tap-fd``), opens no TAP of its own, and leaves the VMM's TAP as it was when
it goes, so a later back-end (vhost-net, a fresh built-in process) uses the same TAP."""

from __future__ import annotations

import os
import subprocess

import pytest
from pyroute2 import IPRoute

from pymvm.net.host import HostNetwork
from pymvm.vhost.backends.process import BuiltinNetBackendOnTap
from pymvm.vhost.user.frontend import VhostUserNetBackend

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun",
)


@pytest.fixture
def hostnet():
    name = f"pmft{os.urandom(3).hex()}"
    net = HostNetwork.create(name, host_address="10.251.0.1/24")
    yield net
    net.close()
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def tap_fds_of(pid: int, tap_fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{tap_fd}")


def open_files(pid: int) -> dict[str, str]:
    """fd -> what it is, for the fds ``pid`` holds; one it closes between the listing and
    the look-up (the ready back-end still opens and closes files) is left out."""
    files = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            files[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return files


def test_two_builtin_backends_in_turn_serve_the_vmms_tap_through_its_fd(hostnet) -> None:
    tap = hostnet.tap
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tap.name)[0]
    for _ in range(2):  # a fresh process each time: a live upgrade of the back-end
        proc = BuiltinNetBackendOnTap.start(tap.fd, tap.name, ready_timeout=60)
        try:
            assert tap_fds_of(proc.process.pid, tap.fd) == "/dev/net/tun"
            # Its only TAP is the inherited one: no other /dev/net/tun fd.
            files = open_files(proc.process.pid)
            tuns = [fd for fd, what in files.items() if what == "/dev/net/tun"]
            assert tuns == [str(tap.fd)]
            frontend = VhostUserNetBackend(proc.socket_path, "client", connect_timeout=30)
            try:
                assert frontend.features()  # the handshake went through
            finally:
                frontend.close()
        finally:
            proc.close()
        assert proc.process.poll() is not None
        assert not os.path.exists(proc.socket_path)
        with IPRoute() as ipr:  # the same TAP (same index), still up, address kept
            assert ipr.link_lookup(ifname=tap.name) == [index]
            addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)]
        assert "10.251.0.1" in addrs
    assert not tap.closed


def test_a_tap_fd_that_is_not_open_is_a_one_line_error(tmp_path) -> None:
    r = subprocess.run(["python3", "-m", "pymvm.cli", "vhost-user", "net", "--socket",
                        str(tmp_path / "s.sock"), "--tap-fd", "97", "--no-seccomp"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--tap-fd 97 is not an open fd" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s.sock").exists()
