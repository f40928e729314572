"""virtio-net over virtio-mmio with its data plane in the kernel's vhost-net (issue 3).

Every guest here reaches the host through a TAP served by /dev/vhost-net: pymvm only
negotiates, hands over the memory table and wires ioeventfd/irqfd.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time

import pytest

from .conftest import link_exists, unique, finish_vm, net_toml

pytestmark = pytest.mark.e2e

HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"


class TcpPeer:
    """A host-side TCP endpoint on HOST_IP: receives exactly `expect` bytes, or sends `payload`."""

    def __init__(self, port: int, *, expect: int = 0, payload: bytes = b"") -> None:
        self.expect, self.payload = expect, payload
        self.received = bytearray()
        self.error: BaseException | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = port
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "TcpPeer":
        # The TAP (and its address) only exists once the VMM has built the VM: retry bind.
        self.thread.start()
        return self

    def _serve(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    self.sock.bind((HOST_IP, self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.sock.listen(1)
            self.sock.settimeout(300)
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(120)
                if self.payload:
                    conn.sendall(self.payload)
                while len(self.received) < self.expect:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    self.received += chunk
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the TCP peer was still running 60 s after the guest"


def test_vhost_net_guest_gets_its_address_and_pings_the_host(boot_vm):
    tap = unique("pmvt")
    run = boot_vm(
        f"ip -4 addr show eth0; cat /sys/class/net/eth0/address; ping -c 3 -W 10 {HOST_IP}",
        extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24",
                            mac="52:54:00:aa:bb:01"))
    assert f"inet {GUEST_IP}/24" in run.console, run.describe()
    assert "52:54:00:aa:bb:01" in run.console
    assert re.search(r"3 packets transmitted, 3 (packets )?received", run.console), run.describe()
    assert run.command_status == 0
    assert run.returncode == 0
    assert not link_exists(tap), "the TAP pymvm created outlived the VM"


def test_vhost_net_tcp_transfer_both_ways_with_checked_data(boot_vm):
    tap = unique("pmvt")
    size = 4 << 20
    download = os.urandom(size)
    to_guest = TcpPeer(5002, payload=download).start()
    from_guest = TcpPeer(5001, expect=size).start()
    command = (
        # guest -> host: random data whose digest the guest prints
        f"dd if=/dev/urandom of=/tmp/up bs=65536 count={size // 65536} 2>/dev/null; "
        "echo UP=$(sha256sum /tmp/up | cut -d' ' -f1); "
        f"nc {HOST_IP} 5001 < /tmp/up; "
        # host -> guest: the host sends, then closes; the guest prints the digest it got
        f"nc {HOST_IP} 5002 > /tmp/down < /dev/null; "
        "echo DOWN=$(sha256sum /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)")
    run = boot_vm(command, memory_mib=256,
                  extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24"))
    to_guest.join()
    from_guest.join()
    assert from_guest.error is None and to_guest.error is None, (from_guest.error, to_guest.error)
    up = re.search(r"UP=([0-9a-f]{64})", run.console)
    down = re.search(r"DOWN=([0-9a-f]{64}) (\d+)", run.console)
    assert up and down, run.describe()
    assert len(from_guest.received) == size
    assert hashlib.sha256(from_guest.received).hexdigest() == up.group(1)
    assert int(down.group(2)) == size
    assert down.group(1) == hashlib.sha256(download).hexdigest()
    # The guest's InterruptStatus reads (one per interrupt) were answered by the vCPU's C loop.
    assert run.events("vm_stopped")[-1]["fast_mmio_reads"] > 100, run.describe()
    assert run.returncode == 0


def test_vhost_net_two_vms_on_one_bridge_ping_each_other(boot_vm):
    bridge = unique("pmvbr")
    tap_a, tap_b = unique("pmva"), unique("pmvb")
    ip_a, ip_b = "10.77.1.2", "10.77.1.3"
    vm_a = boot_vm("echo A-UP; sleep 600", vm_id="vm-a", background=True,
                   extra_toml=net_toml(tap=tap_a, ip=f"{ip_a}/24", bridge=bridge,
                                       host_ip="10.77.1.1/24"))
    try:
        deadline = time.monotonic() + 240
        while not link_exists(tap_a) and time.monotonic() < deadline and vm_a.poll() is None:
            time.sleep(0.5)  # A's network first, so that the bridge is A's (either order works)
        run_b = boot_vm(
            f"i=0; until ping -c 1 -W 2 {ip_a} >/dev/null; do i=$((i+1)); "
            f"[ $i -gt 120 ] && exit 1; sleep 1; done; ping -c 3 -W 5 {ip_a}",
            vm_id="vm-b", extra_toml=net_toml(tap=tap_b, ip=f"{ip_b}/24", bridge=bridge))
    finally:
        vm_a.send_signal(signal.SIGTERM)
        run_a = finish_vm(vm_a, 120)
    assert run_b.command_status == 0, run_b.describe()
    assert re.search(r"3 packets transmitted, 3 (packets )?received", run_b.console)
    assert "A-UP" in run_a.console
    assert run_a.returncode == 143
    for name in (tap_a, tap_b, bridge):
        assert not link_exists(name), f"{name} outlived the VMs"


def test_vhost_net_driver_rebind_brings_the_network_back(boot_vm):
    # A guest driver reset (unbind/bind) resets the device: pymvm tears the vhost rings
    # and eventfds down and builds them again when the driver sets DRIVER_OK anew.
    tap = unique("pmvt")
    command = (
        f"ping -c 1 -W 10 {HOST_IP} && echo BEFORE-OK; "
        "d=$(basename $(readlink /sys/class/net/eth0/device)); "
        "echo $d > /sys/bus/platform/drivers/virtio-mmio/unbind; "
        "ls /sys/class/net; "
        "echo $d > /sys/bus/platform/drivers/virtio-mmio/bind; "
        f"ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0; "
        f"ping -c 3 -W 10 {HOST_IP} && echo AFTER-OK")
    run = boot_vm(command, extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24"))
    assert "BEFORE-OK" in run.console, run.describe()
    assert "AFTER-OK" in run.console, run.describe()
    assert run.returncode == 0


def test_vhost_net_stopping_the_vm_removes_its_tap(boot_vm):
    tap = unique("pmvt")
    proc = boot_vm("sleep 600", background=True,
                   extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24"))
    deadline = time.monotonic() + 240
    while not link_exists(tap) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert link_exists(tap), "the VMM never created its TAP"
    proc.send_signal(signal.SIGTERM)
    run = finish_vm(proc, 120)
    assert run.returncode == 143, run.describe()
    assert not link_exists(tap)


def test_vhost_net_busy_tap_is_a_one_line_error_and_leaves_the_other_vm_alone(boot_vm):
    tap = unique("pmvt")
    first = boot_vm("sleep 600", background=True, vm_id="first",
                    extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24"))
    try:
        deadline = time.monotonic() + 240
        while not link_exists(tap) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert link_exists(tap)
        second = boot_vm("true", vm_id="second", extra_toml=net_toml(tap=tap, ip="10.77.0.9/24"))
        assert second.returncode == 2, second.describe()
        errors = [l for l in second.stderr.splitlines() if l.startswith("pymvm: error:")]
        assert len(errors) == 1 and "busy" in errors[0].lower(), second.describe()
        assert first.poll() is None, "the first VM died when the second one failed"
        assert link_exists(tap), "the failed VM removed a TAP it did not create"
    finally:
        first.send_signal(signal.SIGTERM)
        finish_vm(first, 120)
    assert not link_exists(tap)
