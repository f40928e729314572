"""virtio-net over virtio-mmio with its data plane in a vhost-user back-end (issue 4).

The back-end is another process reached over a unix socket: pymvm's built-in one (started by
the VMM for ``backend = "builtin"``, or by the test to kill and restart it) or DPDK testpmd.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pymvm.testing.backends import BuiltinNetProcess

from .conftest import finish_vm, link_exists, net_toml, unique

pytestmark = pytest.mark.e2e

HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
# Starting a Python or DPDK process inside the nested host takes tens of seconds.
PROCESS_START_TIMEOUT_S = 180.0
BACKEND_CMDLINE = b"pymvm.cli\0vhost-user\0net"


def backend_pids() -> set[int]:
    """Live `pymvm.cli vhost-user net` processes (a zombie's cmdline is empty)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if BACKEND_CMDLINE in f.read():
                    pids.add(int(entry))
        except OSError:
            pass
    return pids


def vhost_user_toml(socket_path: Path, *, ip: str, mode: str = "client") -> str:
    return (f'[[net]]\nbackend = "vhost-user"\nsocket = "{socket_path}"\n'
            f'socket_mode = "{mode}"\nip = "{ip}"\n')


def wait_until(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


class TcpPeer:
    """A host-side TCP endpoint on ``host``: receives exactly `expect` bytes, or sends `payload`.

    With ``pause_at``, it stops reading once that many bytes arrived (the sender stalls on a
    closed window) and sets ``paused`` until ``resume`` is set.
    """

    def __init__(self, host: str, port: int, *, expect: int = 0, payload: bytes = b"",
                 pause_at: int | None = None, io_timeout: float = 120) -> None:
        self.host, self.port = host, port
        self.expect, self.payload, self.pause_at = expect, payload, pause_at
        self.io_timeout = io_timeout
        self.paused, self.resume = threading.Event(), threading.Event()
        self.received = bytearray()
        self.connections = 0
        self.error: BaseException | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "TcpPeer":
        # The host address may appear only once the VMM (or testpmd) has made its interface.
        self.thread.start()
        return self

    def _serve(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    self.sock.bind((self.host, self.port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.sock.listen(1)
            self.sock.settimeout(300)
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                conn.settimeout(self.io_timeout)
                if self.payload:
                    conn.sendall(self.payload)
                while len(self.received) < self.expect:
                    if self.pause_at is not None and len(self.received) >= self.pause_at:
                        self.pause_at = None
                        self.paused.set()
                        self.resume.wait(600)
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


def transfer_command(host: str, up_port: int, down_port: int, size: int) -> str:
    return (
        # guest -> host: random data whose digest the guest prints
        f"dd if=/dev/urandom of=/tmp/up bs=65536 count={size // 65536} 2>/dev/null; "
        "echo UP=$(sha256sum /tmp/up | cut -d' ' -f1); "
        f"nc {host} {up_port} < /tmp/up; "
        # host -> guest: the host sends, then closes; the guest prints the digest it got
        f"nc {host} {down_port} > /tmp/down < /dev/null; "
        "echo DOWN=$(sha256sum /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)")


def check_transfer(run, up: TcpPeer, down: TcpPeer, download: bytes, size: int) -> None:
    up.join()
    down.join()
    assert up.error is None and down.error is None, (up.error, down.error, run.describe())
    up_digest = re.search(r"UP=([0-9a-f]{64})", run.console)
    down_digest = re.search(r"DOWN=([0-9a-f]{64}) (\d+)", run.console)
    assert up_digest and down_digest, run.describe()
    assert len(up.received) == size
    assert hashlib.sha256(up.received).hexdigest() == up_digest.group(1)
    assert int(down_digest.group(2)) == size
    assert down_digest.group(1) == hashlib.sha256(download).hexdigest()


def test_vhost_user_builtin_guest_gets_its_address_pings_the_host_and_cleans_up(boot_vm):
    tap = unique("pmut")
    run = boot_vm(
        f"ip -4 addr show eth0; cat /sys/class/net/eth0/address; ping -c 3 -W 10 {HOST_IP}",
        extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24",
                            backend="builtin", mac="52:54:00:aa:bc:01"))
    assert f"inet {GUEST_IP}/24" in run.console, run.describe()
    assert "52:54:00:aa:bc:01" in run.console
    assert re.search(r"3 packets transmitted, 3 (packets )?received", run.console), run.describe()
    assert run.command_status == 0
    assert run.returncode == 0
    started = run.events("builtin_backend_started")
    assert len(started) == 1, run.describe()
    assert started[0]["pid"] not in backend_pids(), "the built-in back-end outlived the VM"
    assert not link_exists(tap), "the TAP pymvm created outlived the VM"


def test_vhost_user_builtin_tcp_transfer_both_ways_with_checked_data(boot_vm):
    tap = unique("pmut")
    size = 4 << 20
    download = os.urandom(size)
    down = TcpPeer(HOST_IP, 5012, payload=download).start()
    up = TcpPeer(HOST_IP, 5011, expect=size).start()
    run = boot_vm(transfer_command(HOST_IP, 5011, 5012, size), memory_mib=256,
                  extra_toml=net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24",
                                      backend="builtin"))
    check_transfer(run, up, down, download, size)
    assert run.returncode == 0
    # The back-end's closing stats: with the guest's ring full of mergeable buffers, the
    # TAP wrote packets straight into them (no copy through the back-end).
    stop = run.events("vhost_user_net.stop")
    assert len(stop) == 1, run.describe()
    assert stop[0]["rx_packets"] > 100 and stop[0]["rx_direct"] > stop[0]["rx_packets"] // 2, stop


def pmd_lcores() -> list[str]:
    """testpmd's two lcores (main, forwarding): on CPUs 0 and 1, or both on CPU 0 where the
    host has one CPU (scripts/test's nested host)."""
    return ["-l", "0,1"] if len(os.sched_getaffinity(0)) >= 2 else ["--lcores", "0@0,1@0"]


@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None,
                    reason="dpdk-testpmd is not installed: apt-get install dpdk-dev")
def test_vhost_user_dpdk_testpmd_backend_pings_and_moves_checked_tcp_data(boot_vm, tmp_path):
    host_ip, guest_ip = "10.78.2.1", "10.78.2.2"
    prefix, dtap = unique("pmvu-dpdk"), unique("pmud")
    sock = tmp_path / "vhost.sock"
    pmd_log = tmp_path / "testpmd.log"
    size = 4 << 20
    download = os.urandom(size)
    with open(pmd_log, "wb") as out:
        # stdin stays open: without -i, testpmd exits once it reads a line (or EOF) there.
        # stdbuf: its stdio output to a file is block-buffered otherwise.
        pmd = subprocess.Popen(
            ["stdbuf", "-oL", "dpdk-testpmd", *pmd_lcores(), "--no-pci", "--no-huge", "-m", "1024",
             f"--file-prefix={prefix}",
             "--vdev", f"net_vhost0,iface={sock},queues=1", "--vdev", f"net_tap0,iface={dtap}",
             "--", "--forward-mode=io", "--auto-start", "--total-num-mbufs=8192"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_until(lambda: sock.exists() and link_exists(dtap) and
                       b"Press enter to exit" in pmd_log.read_bytes(),
                       PROCESS_START_TIMEOUT_S, "testpmd listening with its TAP", pmd)
        except BaseException:
            print(pmd_log.read_text(errors="replace")[-3000:])
            raise
        subprocess.run(["ip", "addr", "add", f"{host_ip}/24", "dev", dtap], check=True)
        subprocess.run(["ip", "link", "set", dtap, "up"], check=True)
        down = TcpPeer(host_ip, 5022, payload=download).start()
        up = TcpPeer(host_ip, 5021, expect=size).start()
        run = boot_vm(f"ping -c 3 -W 10 {host_ip} && echo PING-OK; "
                      + transfer_command(host_ip, 5021, 5022, size),
                      memory_mib=256, extra_toml=vhost_user_toml(sock, ip=f"{guest_ip}/24"))
        pmd_alive = pmd.poll() is None
    finally:
        if pmd.poll() is None:
            pmd.send_signal(signal.SIGINT)
            try:
                pmd.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(pmd.pid, signal.SIGKILL)
                pmd.wait()
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    pmd_text = pmd_log.read_text(errors="replace")
    assert pmd_alive, pmd_text[-3000:]
    assert "PING-OK" in run.console, run.describe() + "\n--- testpmd ---\n" + pmd_text[-3000:]
    check_transfer(run, up, down, download, size)
    assert run.returncode == 0, run.describe()


def test_vhost_user_backend_killed_mid_transfer_and_restarted_completes_the_same_tcp_connection(
        boot_vm, tmp_path):
    # The back-end attaches to a persistent TAP by name, so a restarted one finds the same TAP
    # (and host address) the dead one served.
    tap = unique("pmur")
    sock = tmp_path / "net.sock"
    size, pause_at = 16 << 20, 2 << 20
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"], check=True)
    backend = BuiltinNetProcess(sock, tap, tmp_path / "backend.log",
                                start_timeout=PROCESS_START_TIMEOUT_S)
    try:
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        backend.start()
        first_pid = backend.proc.pid
        up = TcpPeer(HOST_IP, 5031, expect=size, pause_at=pause_at, io_timeout=600).start()
        vm = boot_vm(
            f"dd if=/dev/urandom of=/tmp/up bs=65536 count={size // 65536} 2>/dev/null; "
            "echo UP=$(sha256sum /tmp/up | cut -d' ' -f1); "
            f"nc {HOST_IP} 5031 < /tmp/up; echo NC=$?",
            memory_mib=256, background=True,
            extra_toml=vhost_user_toml(sock, ip=f"{GUEST_IP}/24"))
        try:
            # The guest is mid-send (the host stopped reading): kill the back-end under it.
            assert up.paused.wait(600), f"the transfer never reached {pause_at} bytes: {up.error}"
            received_at_kill = len(up.received)
            backend.proc.send_signal(signal.SIGKILL)
            backend.proc.wait()
            backend.start()
            up.resume.set()
        finally:
            up.resume.set()
            run = finish_vm(vm)
    finally:
        backend.stop()
        subprocess.run(["ip", "link", "del", tap], check=False)
    up.join()
    assert backend.proc.pid != first_pid
    assert received_at_kill < size
    assert up.error is None, (up.error, run.describe())
    assert up.connections == 1
    digest = re.search(r"UP=([0-9a-f]{64})", run.console)
    assert digest, run.describe()
    assert len(up.received) == size, run.describe()
    assert hashlib.sha256(up.received).hexdigest() == digest.group(1)
    assert "NC=0" in run.console, run.describe()
    assert run.events("vhost_user_reconnected"), run.describe()
    assert run.events("vhost_user_replayed"), run.describe()
    assert run.returncode == 0, run.describe()


def test_vhost_user_and_vhost_net_vms_on_one_bridge_ping_each_other(boot_vm):
    bridge = unique("pmubr")
    tap_a, tap_b = unique("pmua"), unique("pmub")
    ip_a, ip_b = "10.78.1.2", "10.78.1.3"
    vm_a = boot_vm("echo A-UP; sleep 600", vm_id="vm-a", background=True,
                   extra_toml=net_toml(tap=tap_a, ip=f"{ip_a}/24", bridge=bridge,
                                       host_ip="10.78.1.1/24"))
    try:
        deadline = time.monotonic() + 240
        while not link_exists(tap_a) and time.monotonic() < deadline and vm_a.poll() is None:
            time.sleep(0.5)  # A's network first, so that the bridge is A's (either order works)
        run_b = boot_vm(
            f"i=0; until ping -c 1 -W 2 {ip_a} >/dev/null; do i=$((i+1)); "
            f"[ $i -gt 120 ] && exit 1; sleep 1; done; ping -c 3 -W 5 {ip_a}",
            vm_id="vm-b", extra_toml=net_toml(tap=tap_b, ip=f"{ip_b}/24", bridge=bridge,
                                              backend="builtin"))
    finally:
        vm_a.send_signal(signal.SIGTERM)
        run_a = finish_vm(vm_a, 120)
    assert run_b.command_status == 0, run_b.describe()
    assert re.search(r"3 packets transmitted, 3 (packets )?received", run_b.console)
    assert run_b.events("builtin_backend_started"), run_b.describe()
    assert "A-UP" in run_a.console
    assert run_a.returncode == 143
    for name in (tap_a, tap_b, bridge):
        assert not link_exists(name), f"{name} outlived the VMs"
