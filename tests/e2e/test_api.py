"""The control API steering a Linux guest (issue 9): state and boot time, pause/resume,
the NIC's link, the guest's shutdown and the VMM's stop.

The guest's console goes to a file here, so the test can watch it while the VM runs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pymvm.api.client import request
from pymvm.images.initramfs import encode_cmd

from .conftest import (
    BASE_CMDLINE,
    GUEST_TIMEOUT_S,
    finish_vm,
    link_exists,
    net_toml,
    start_vm,
    unique,
)

pytestmark = pytest.mark.e2e

HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"


class ApiGuest:
    """A guest booted by `pymvm run` with its API socket and its console in files."""

    def __init__(self, tmp_path: Path, guest_images, command: str, extra_toml: str = "", *,
                 vm_id: str = "e2e-api") -> None:
        # Two VMs on one network need two ids: a NIC's generated MAC comes from its VM's id.
        self.sock = str(tmp_path / "api.sock")
        self.console_path = tmp_path / "console.log"
        config = tmp_path / "vm.toml"
        config.write_text("\n".join([
            f'id = "{vm_id}"',
            "[machine]", "vcpus = 1", "memory_mib = 256",
            "[boot]", f'kernel = "{guest_images.vmlinux}"', f'initrd = "{guest_images.initramfs}"',
            f'cmdline = "{BASE_CMDLINE} {encode_cmd(command)}"',
            "[serial]", 'output = "file"', f'path = "{self.console_path}"', "input = false",
            "[api]", f'socket = "{self.sock}"',
        ]) + "\n" + extra_toml)
        self.proc = start_vm(config)

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, *, after: int = 0, timeout: float = GUEST_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.console(), after)
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the VM ended (rc={self.proc.returncode}) before {pattern!r}:\n"
                            f"{self.console()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} on the console within {timeout:.0f} s:\n"
                            f"{self.console()[-3000:]}")
            time.sleep(0.5)

    def api(self, method: str, path: str, body: object = None):
        return request(self.sock, method, path, body, timeout=120)

    def finish(self, timeout: float = 300):
        return finish_vm(self.proc, timeout)


def test_api_get_vm_shows_running_with_boot_time_pause_stops_the_guest_resume_and_stop_exit_3(
        tmp_path, guest_images):
    guest = ApiGuest(tmp_path, guest_images,
                     "i=0; while true; do i=$((i+1)); echo TICK $i; sleep 0.5; done")
    try:
        guest.wait_console(r"TICK 3\b")
        assert os.stat(guest.sock).st_mode & 0o777 == 0o600
        vm = guest.api("GET", "/vm")
        assert vm["state"] == "running" and vm["id"] == "e2e-api"
        assert vm["boot_time_us"] is not None and 0 < vm["boot_time_us"] < vm["uptime_s"] * 1e6
        assert vm["vcpus"] == 1 and vm["memory_mib"] == 256

        assert guest.api("PUT", "/vm/state", {"state": "paused"})["state"] == "paused"
        frozen = guest.console()
        time.sleep(5)  # ten ticks' worth
        assert guest.console() == frozen, "the guest printed while paused"
        assert guest.api("GET", "/vm")["state"] == "paused"
        last = max(int(n) for n in re.findall(r"TICK (\d+)", frozen))

        assert guest.api("PUT", "/vm/state", {"state": "running"})["state"] == "running"
        guest.wait_console(rf"TICK {last + 2}\b", after=len(frozen), timeout=120)

        answer = guest.api("PUT", "/vm/actions", {"action": "stop"})
        assert answer["exit_status"] == 3
        run = guest.finish()
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()
    assert run.returncode == 3, run.describe()
    assert run.events("vm_stopped")[-1]["reason"] == "requested"
    assert not os.path.exists(guest.sock), "the API socket outlived the VMM"


def test_api_link_down_drops_the_guest_carrier_and_ping_and_link_up_brings_both_back(
        tmp_path, guest_images):
    tap = unique("pmva")
    probe = (f"while true; do c=$(cat /sys/class/net/eth0/carrier); "
             f"if ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; then p=ok; else p=fail; fi; "
             "echo PROBE carrier=$c ping=$p; sleep 0.5; done")
    guest = ApiGuest(tmp_path, guest_images, probe,
                     net_toml(tap=tap, ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24"))
    try:
        guest.wait_console(r"PROBE carrier=1 ping=ok")
        (dev,) = guest.api("GET", "/vm/devices")["devices"]
        assert dev["type"] == "net" and dev["driver"]["driver_ok"] is True
        assert dev["net"]["tap"] == tap and dev["net"]["link"] == "up"

        mark = len(guest.console())
        assert guest.api("PATCH", f"/vm/net/{dev['id']}", {"link": "down"})["net"]["link"] == "down"
        guest.wait_console(r"PROBE carrier=0 ping=fail", after=mark, timeout=120)

        mark = len(guest.console())
        assert guest.api("PATCH", f"/vm/net/{dev['id']}", {"link": "up"})["net"]["link"] == "up"
        guest.wait_console(r"PROBE carrier=1 ping=ok", after=mark, timeout=120)

        metrics = guest.api("GET", "/metrics")
        sent = re.search(rf'pymvm_net_packets_total{{device="{dev["id"]}",direction="tx"}} (\S+)',
                         metrics)
        assert sent and float(sent.group(1)) > 0, metrics
        guest.api("PUT", "/vm/actions", {"action": "stop"})
        run = guest.finish()
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()
    assert run.returncode == 3, run.describe()
    assert not link_exists(tap)


def test_api_shutdown_presses_ctrl_alt_del_and_the_vm_ends_with_status_0(tmp_path, guest_images):
    guest = ApiGuest(tmp_path, guest_images, "echo WAITING; sleep 600")
    try:
        guest.wait_console(r"WAITING")
        assert guest.api("PUT", "/vm/actions", {"action": "shutdown"}) == {
            "action": "shutdown", "exit_status": 0}
        run = guest.finish(timeout=240)
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()
    assert run.returncode == 0, run.describe()
    assert run.events("vm_stopped")[-1]["reason"] == "guest-reset", run.describe()
    assert "i8042_ctrl_alt_del" in run.stderr
