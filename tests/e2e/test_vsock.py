"""virtio-vsock on vhost-vsock with a real Linux guest and its agent (issue 11): connections both
ways, concurrency, a 16 MiB file, exit status and stderr, timeouts, `pymvm exec`, a CID in use,
and a driver rebind."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pymvm.testing import MicroVM
from pymvm.testing.agent import PING, FrameDecoder, frame
from pymvm.testing.vm import VmmDied



def vsock_device(vm: MicroVM) -> dict:
    devices = vm.api("GET", "/vm/devices")["devices"]
    (device,) = [d for d in devices if d["type"] == "vsock"]
    return device


def test_vsock_host_to_guest_connection_reaches_the_agent_through_vhost_vsock(microvm) -> None:
    device = vsock_device(microvm)
    assert device["vsock"]["cid"] == microvm.cid and device["driver"]["driver_ok"]
    assert '"vhost_vsock_activated"' in microvm.vmm_log
    # A plain AF_VSOCK client from this host, no pymvm code on the way.
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect((microvm.cid, 1024))
        sock.sendall(frame(PING))
        decoder, reply = FrameDecoder(), []
        while chunk := sock.recv(64):  # the agent answers, then closes (one request each)
            reply += decoder.feed(chunk)
    assert reply == [(b"V", b"1")]


def test_vsock_guest_to_host_connection_reaches_a_host_listener(microvm) -> None:
    port = 20000 + os.getpid() % 10000
    got: list[bytes] = []
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as server:
        server.bind((socket.VMADDR_CID_ANY, port))
        server.listen(1)
        server.settimeout(60)

        def serve() -> None:
            conn, (peer_cid, _) = server.accept()
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                got.append(data)
                got.append(str(peer_cid).encode())
                conn.sendall(b"reply from the host\n")

        thread = threading.Thread(target=serve)
        thread.start()
        result = microvm.run(f"echo hello from the guest | pymvm-agent --connect 2:{port}",
                             timeout=60)
        thread.join(60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reply from the host\n"
    assert got == [b"hello from the guest\n", str(microvm.cid).encode()]


def test_vsock_50_concurrent_runs_all_return_their_own_output(microvm) -> None:
    def one(i: int) -> tuple[int, str, int]:
        r = microvm.run(f"echo out-{i}; echo err-{i} >&2; exit {i % 7}", timeout=300)
        return i, r.stdout + r.stderr, r.returncode

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    assert results == [(i, f"out-{i}\nerr-{i}\n", i % 7) for i in range(50)]


def test_vsock_16_mib_file_round_trip_keeps_its_checksum(microvm_factory) -> None:
    vm = microvm_factory(memory_mib=256)
    data = os.urandom(16 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    vm.put(data, "/tmp/blob")
    in_guest = vm.run("sha256sum /tmp/blob", timeout=300)
    assert in_guest.stdout.split()[0] == digest
    back = vm.get("/tmp/blob")
    assert len(back) == len(data) and hashlib.sha256(back).hexdigest() == digest


def test_vsock_nonzero_exit_status_and_stderr_come_back(microvm) -> None:
    r = microvm.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 42"])
    assert (r.returncode, r.stdout, r.stderr) == (42, "to-stdout\n", "to-stderr\n")
    missing = microvm.run(["/no/such/program"])
    assert missing.returncode == 127 and "cannot run /no/such/program" in missing.stderr


def test_vsock_timeout_kills_the_guest_command_and_its_children(microvm) -> None:
    start = time.monotonic()
    r = microvm.run("sleep 1000 & echo $! > /tmp/bg.pid; sleep 1000", timeout=3)
    assert r.timed_out and r.returncode == -9
    assert time.monotonic() - start < 120
    # A zombie waiting for init to reap it counts as gone.
    check = microvm.run("p=$(cat /tmp/bg.pid); if [ -d /proc/$p ] && ! grep -q '^State:.*Z' "
                        "/proc/$p/status; then echo alive; else echo gone; fi")
    assert check.stdout == "gone\n"


def test_vsock_pymvm_exec_runs_in_the_guest_and_exits_with_its_status(microvm, capfd) -> None:
    from pymvm.cli import main

    status = main(["exec", str(microvm.api_socket), "--", "sh", "-c",
                   "cat /proc/sys/kernel/ostype; echo err >&2; exit 5"])
    out, err = capfd.readouterr()
    assert status == 5 and out == "Linux\n" and "err\n" in err
    assert main(["exec", "--timeout", "2", str(microvm.api_socket), "--", "sleep", "100"]) == 124


def test_vsock_cid_in_use_fails_the_second_vm_naming_another_cid(microvm) -> None:
    second = MicroVM(cid=microvm.cid, boot_timeout=120)
    try:
        with pytest.raises(VmmDied) as info:
            second.start()
    finally:
        second.close()
    assert f"vsock.cid = {microvm.cid} is already in use on this host" in info.value.vmm_log_tail
    assert "choose e.g. vsock.cid = " in info.value.vmm_log_tail
    assert second.returncode == 2


REBIND = """
d=
for dev in /sys/bus/virtio/devices/*; do
    [ "$(cat $dev/device)" = 0x0013 ] && d=${dev##*/}
done
drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport
(sleep 1; echo $d > $drv/unbind; sleep 1; echo $d > $drv/bind) >/dev/null 2>&1 </dev/null &
echo $d
"""


def test_vsock_survives_a_guest_driver_rebind(microvm) -> None:
    assert microvm.run("echo before").stdout == "before\n"
    device = microvm.run(REBIND).stdout.strip()
    assert device.startswith("virtio")
    deadline = time.monotonic() + 120
    time.sleep(3)
    while True:  # the driver goes away for a moment: connections fail until it is back
        try:
            after = microvm.run("echo after", timeout=30)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert after.stdout == "after\n"
    info = vsock_device(microvm)
    assert info["driver"]["driver_ok"]
    # The VMM told the re-bound driver to drop stale connections (event queue, 5.10.6.6).
    assert info["vsock"]["transport_resets"] == 1
    assert microvm.vmm_log.count('"vhost_vsock_activated"') == 2
