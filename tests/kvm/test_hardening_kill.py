"""Nothing outlives a VMM killed with SIGKILL (issue 14): its built-in back-end ends by itself
(parent-death signal), and `pymvm cleanup` removes the TAP, bridge, address and socket it
recorded in its state directory. The guest is a `hlt` loop: the VM just runs until killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from tests.unit.test_boot import make_elf

REPO = Path(__file__).resolve().parents[2]
ENTRY = 0x1000000
HLT_LOOP = bytes([0xF4, 0xEB, 0xFD])  # 1: hlt; jmp 1b


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def addresses(name: str) -> list[str]:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0])] if idx else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def vm_config(tmp_path: Path) -> tuple[Path, str, str]:
    tag = uuid.uuid4().hex[:6]
    tap, bridge = f"pvk{tag}", f"pvkbr{tag}"
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(ENTRY, HLT_LOOP, 0x1000)], ENTRY))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f"""
id = "kill9-{tag}"
[machine]
vcpus = 1
memory_mib = 64
[boot]
kernel = "{kernel}"
cmdline = "console=ttyS0"
[serial]
output = "none"
[[net]]
backend = "builtin"
tap = "{tap}"
bridge = "{bridge}"
host_ip = "10.213.{int(tag[:2], 16)}.1/24"
""")
    yield cfg, tap, bridge
    for name in (tap, bridge):  # never leak into the next test, whatever happened
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                ipr.link("del", index=idx[0])


def test_hardening_kill_9_of_pymvm_run_leaves_no_backend_and_cleanup_removes_tap_bridge_socket(
        tmp_path: Path, vm_config) -> None:
    cfg, tap, bridge = vm_config
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYMVM_STATE_DIR": str(state_dir)}
    log = (tmp_path / "vmm.log").open("wb")
    vmm = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "run", str(cfg)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: b"vm_starting" in (tmp_path / "vmm.log").read_bytes() or vmm.poll() is not None,
                 60, "the VM to start")
        assert vmm.poll() is None, (tmp_path / "vmm.log").read_text()[-2000:]
        (vm_dir,) = state_dir.iterdir()
        records = [json.loads(line) for line in (vm_dir / "resources.jsonl").read_text().splitlines()]
        kinds = {r["kind"] for r in records}
        assert {"tap", "bridge", "address", "dir", "process"} <= kinds, records
        (backend,) = [r["pid"] for r in records if r["kind"] == "process"]
        (sock_dir,) = [r["path"] for r in records if r["kind"] == "dir"]
        assert alive(backend) and link_exists(tap) and link_exists(bridge)
        assert os.path.exists(os.path.join(sock_dir, "net.sock"))
        # Least privilege: the back-end the VMM started runs as nobody, without capabilities,
        # holding its TAP, its sockets and its event loop's fds only (no guest memory before
        # the driver starts the device, nothing of the VMM's such as /dev/kvm).
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{backend}/status").read_text().splitlines() if ":\t" in line)
        assert status["Uid"].split()[0] == str(__import__("pwd").getpwnam("nobody").pw_uid)
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        kinds = {os.readlink(f"/proc/{backend}/fd/{fd}").split(":")[0]
                 for fd in os.listdir(f"/proc/{backend}/fd") if int(fd) > 2}
        assert kinds <= {"/dev/net/tun", "socket", "anon_inode"}, kinds
        assert "/dev/net/tun" in kinds

        vmm.send_signal(signal.SIGKILL)
        vmm.wait(10)
        # The back-end ends by itself: nobody else would stop it (it is init's child now).
        wait_for(lambda: not alive(backend), 10, "the back-end to exit after its VMM died")
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
        log.close()

    out = subprocess.run([sys.executable, "-m", "pymvm.cli", "cleanup"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert vm_dir.name in out.stdout
    assert not link_exists(tap) and not link_exists(bridge)
    assert not os.path.exists(sock_dir)
    assert list(state_dir.iterdir()) == []
    again = subprocess.run([sys.executable, "-m", "pymvm.cli", "cleanup"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_sigterm_of_pymvm_run_undoes_everything_itself_and_removes_its_state_dir(
        tmp_path: Path, vm_config) -> None:
    cfg, tap, bridge = vm_config
    state_dir = tmp_path / "state"
    env = {**os.environ, "PYMVM_STATE_DIR": str(state_dir)}
    log_path = tmp_path / "vmm.log"
    with log_path.open("wb") as log:
        vmm = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "run", str(cfg)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(lambda: b"vm_starting" in log_path.read_bytes() or vmm.poll() is not None,
                     60, "the VM to start")
            vmm.send_signal(signal.SIGTERM)
            assert vmm.wait(30) == 128 + signal.SIGTERM, log_path.read_text()[-2000:]
        finally:
            if vmm.poll() is None:
                vmm.kill()
                vmm.wait()
    assert not link_exists(tap) and not link_exists(bridge)
    assert list(state_dir.iterdir()) == []
