"""Hardening (issue 14) with real Linux guests: nothing outlives a VMM killed with SIGKILL, and
a full guest run (boot, ping, TCP both ways) passes with the seccomp filters on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import BASE_CMDLINE, link_exists, net_toml, start_vm, unique, write_vm_toml
from .test_vhost_user import PROCESS_START_TIMEOUT_S, TcpPeer, backend_pids, wait_until

from pymvm.images.initramfs import encode_cmd

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NET_HOST, NET_GUEST = "10.79.0.1", "10.79.0.2"  # vhost-net NIC, on a bridge
VU_HOST, VU_GUEST = "10.79.1.1", "10.79.1.2"  # built-in back-end NIC


def host_addresses() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def read_console_until(proc, marker: bytes, timeout: float) -> bytes:
    seen = bytearray()
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            pytest.fail(f"no {marker!r} on the console (status {proc.poll()}): {bytes(seen[-3000:])!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                continue
            seen += chunk
    return bytes(seen)


def test_hardening_kill_9_of_vmm_with_vhost_net_bridge_and_builtin_backend_leaves_nothing(
        tmp_path: Path, guest_images, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "state"
    monkeypatch.setenv("PYMVM_STATE_DIR", str(state_dir))
    bridge, net_tap, vu_tap = unique("phbr"), unique("phnt"), unique("phvu")
    before_backends = backend_pids()
    extra = (net_toml(tap=net_tap, ip=f"{NET_GUEST}/24", host_ip=f"{NET_HOST}/24", bridge=bridge)
             + net_toml(tap=vu_tap, ip=f"{VU_GUEST}/24", host_ip=f"{VU_HOST}/24", backend="builtin"))
    config = write_vm_toml(tmp_path / "vm.toml", kernel=guest_images.vmlinux,
                           initrd=guest_images.initramfs,
                           cmdline=f"{BASE_CMDLINE} {encode_cmd('echo HARDENING-UP; sleep 900')}",
                           extra=extra, vm_id="hardening-kill")
    proc = start_vm(config)
    try:
        read_console_until(proc, b"HARDENING-UP", PROCESS_START_TIMEOUT_S + 240)
        backends = backend_pids() - before_backends
        assert backends, "the built-in back-end is not running"
        assert link_exists(bridge) and link_exists(net_tap) and link_exists(vu_tap)
        assert {NET_HOST, VU_HOST} <= host_addresses()
        (vm_dir,) = state_dir.iterdir()
        records = [json.loads(line) for line in (vm_dir / "resources.jsonl").read_text().splitlines()]
        socket_dirs = [r["path"] for r in records if r["kind"] == "dir"]
        assert socket_dirs and all(os.path.isdir(p) for p in socket_dirs)

        proc.kill()  # SIGKILL: no teardown at all
        assert proc.communicate(timeout=60) is not None
        assert proc.returncode == -signal.SIGKILL
        # The back-end ends by itself (parent-death signal): nobody else stops it now.
        wait_until(lambda: not (backend_pids() & backends), 60, "the back-end to exit with its VMM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)

    cleanup = subprocess.run([sys.executable, "-m", "pymvm.cli", "cleanup"], cwd=REPO,
                             capture_output=True, text=True, timeout=PROCESS_START_TIMEOUT_S)
    assert cleanup.returncode == 0, cleanup.stderr[-3000:]
    leftovers = [name for name in (bridge, net_tap, vu_tap) if link_exists(name)]
    assert not leftovers, f"left behind after pymvm cleanup: {leftovers}\n{cleanup.stdout}\n{cleanup.stderr[-2000:]}"
    assert not ({NET_HOST, VU_HOST} & host_addresses())
    assert not any(os.path.exists(p) for p in socket_dirs)
    assert not (backend_pids() - before_backends)
    assert list(state_dir.iterdir()) == []


def test_hardening_guest_boots_pings_and_moves_tcp_both_ways_with_seccomp_on(boot_vm) -> None:
    net_tap, vu_tap = unique("phsn"), unique("phsv")
    size = 2 << 20
    download = os.urandom(size)
    to_guest = TcpPeer(VU_HOST, 5102, payload=download).start()
    from_guest = TcpPeer(VU_HOST, 5101, expect=size).start()
    command = (
        f"ping -c 3 -W 10 {NET_HOST}; ping -c 3 -W 10 {VU_HOST}; "
        f"dd if=/dev/urandom of=/tmp/up bs=65536 count={size // 65536} 2>/dev/null; "
        "echo UP=$(sha256sum /tmp/up | cut -d' ' -f1); "
        f"nc {VU_HOST} 5101 < /tmp/up; "
        f"nc {VU_HOST} 5102 > /tmp/down < /dev/null; "
        "echo DOWN=$(sha256sum /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down)")
    run = boot_vm(command, extra_toml=(
        net_toml(tap=net_tap, ip=f"{NET_GUEST}/24", host_ip=f"{NET_HOST}/24")
        + net_toml(tap=vu_tap, ip=f"{VU_GUEST}/24", host_ip=f"{VU_HOST}/24", backend="builtin")))
    to_guest.join()
    from_guest.join()
    installed = {e["process"] for e in run.events("seccomp_installed")}
    assert installed == {"vmm", "vhost-user-backend"}, run.describe()
    assert not run.events("seccomp_violation"), run.describe()
    assert len(re.findall(r"3 packets transmitted, 3 (?:packets )?received", run.console)) == 2, run.describe()
    up = re.search(r"UP=([0-9a-f]{64})", run.console)
    down = re.search(r"DOWN=([0-9a-f]{64}) (\d+)", run.console)
    assert up and down, run.describe()
    assert from_guest.error is None and to_guest.error is None, (from_guest.error, to_guest.error)
    assert hashlib.sha256(from_guest.received).hexdigest() == up.group(1)
    assert down.group(1) == hashlib.sha256(download).hexdigest() and int(down.group(2)) == size
    assert run.command_status == 0 and run.returncode == 0, run.describe()
    assert not link_exists(net_tap) and not link_exists(vu_tap)
