"""Control-plane latency: pymvm's `GET /vm` against QEMU's QMP `query-status`, same guest.

Both VMMs boot the same bzImage and test initramfs with one virtio-net device (vhost-net on
a TAP); the guest runs an iperf3 server. For each VMM, one client on one persistent
connection asks for the VM's status ``-n`` times back to back, first with the guest idle,
then while an iperf3 client on the host moves traffic to the guest (-R: both ways in turn).
pymvm's client is http.client over the UNIX socket; QEMU's sends QMP JSON lines on its UNIX
socket. Prints p50/p99 per VMM and phase, then `api_latency_ratio_idle=`,
`api_latency_ratio_load=` and `api_latency_ratio=` (pymvm p50 / QEMU p50, both phases
pooled).

Run with bench/api (uses the nested KVM host where this one cannot boot Linux); needs root.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CMDLINE, stop

HOST_IP, GUEST_IP = "10.89.0.1", "10.89.0.2"
MEMORY_MIB = 256
BOOT_TIMEOUT_S = 600


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket (keep-alive: one connection for every request)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def pymvm_status(path: str):
    conn = UnixHTTPConnection(path)

    def ask() -> None:
        conn.request("GET", "/vm")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200 or body["state"] != "running":
            raise RuntimeError(f"GET /vm answered {resp.status} {body}")

    return ask, conn.close


def qmp_status(path: str):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = sock.makefile("rb")

    def command(name: str) -> dict:
        sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            reply = json.loads(reader.readline())
            if "return" in reply or "error" in reply:
                return reply  # events ({"event": ...}) may come in between

    json.loads(reader.readline())  # the greeting
    command("qmp_capabilities")

    def ask() -> None:
        reply = command("query-status")
        if reply.get("return", {}).get("status") != "running":
            raise RuntimeError(f"query-status answered {reply}")

    def close() -> None:
        try:
            command("quit")
        except (OSError, ValueError):
            pass
        reader.close()
        sock.close()

    return ask, close


def measure(ask, count: int) -> list[float]:
    for _ in range(20):  # warm-up: connection, caches
        ask()
    took = []
    for _ in range(count):
        started = time.perf_counter()
        ask()
        took.append(time.perf_counter() - started)
    return took


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = BOOT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the VMM exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def run_vmm(name: str, argv: list[str], console: Path, ctl_path: str, connect, iperf3: str,
            count: int) -> dict[str, list[float]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = None
    try:
        wait_for("the iperf3 server in the guest",
                 lambda: console.exists() and b"Server listening" in console.read_bytes(), proc)
        ask, close = connect(ctl_path)
        idle = measure(ask, count)
        client = subprocess.Popen([iperf3, "-c", GUEST_IP, "-t", "3600", "-R"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)  # let the transfer ramp up
        if client.poll() is not None:
            raise RuntimeError(f"iperf3 -c {GUEST_IP} exited ({client.returncode}): no load")
        load = measure(ask, count)
        if client.poll() is not None:
            raise RuntimeError("iperf3 stopped before the loaded phase ended")
        stop(client)
        client = None
        close()
        if name == "pymvm":
            conn = UnixHTTPConnection(ctl_path)
            conn.request("PUT", "/vm/actions", body=json.dumps({"action": "stop"}),
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        proc.wait(120)
        return {"idle": idle, "load": load}
    finally:
        stop(client)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--requests", type=int, default=1000, help="requests per phase")
    args = p.parse_args()

    from pymvm.images.initramfs import build_initramfs, encode_cmd, encode_net
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    qemu = shutil.which("qemu-system-x86_64")
    iperf3 = shutil.which("iperf3")
    if kernel is None or qemu is None or iperf3 is None:
        print("bench/api: needs 'pymvm build-kernel', qemu-system-x86 and iperf3", file=sys.stderr)
        return 2
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    cmdline = (f"{CMDLINE} {encode_net('eth0', f'{GUEST_IP}/24')} "
               f"{encode_cmd('iperf3 -s')}")

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-api-") as tmp:
        # pymvm
        sock = f"{tmp}/api.sock"
        console = Path(tmp) / "pymvm-console.log"
        config = Path(tmp) / "vm.toml"
        config.write_text(
            f'id = "bench-api"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
            f'[boot]\nkernel = "{kernel.bzimage}"\ninitrd = "{initramfs}"\ncmdline = "{cmdline}"\n'
            f'[serial]\noutput = "file"\npath = "{console}"\ninput = false\n'
            f'[api]\nsocket = "{sock}"\n'
            f'[[net]]\nbackend = "vhost-net"\ntap = "pmvapi0"\nhost_ip = "{HOST_IP}/24"\n')
        argv = [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)]
        results["pymvm"] = run_vmm("pymvm", argv, console, sock, pymvm_status, iperf3, args.requests)

        # QEMU microvm, same guest, QMP on a UNIX socket
        qmp = f"{tmp}/qmp.sock"
        console = Path(tmp) / "qemu-console.log"
        subprocess.run(["ip", "tuntap", "add", "dev", "qmapi0", "mode", "tap", "vnet_hdr"], check=True)
        try:
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", "qmapi0"], check=True)
            subprocess.run(["ip", "link", "set", "qmapi0", "up"], check=True)
            argv = [qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-smp", "1",
                    "-m", str(MEMORY_MIB), "-display", "none", "-serial", f"file:{console}",
                    "-no-reboot", "-nodefaults", "-no-user-config", "-kernel", str(kernel.bzimage),
                    "-initrd", str(initramfs), "-append", cmdline,
                    "-qmp", f"unix:{qmp},server=on,wait=off",
                    "-netdev", "tap,id=n0,ifname=qmapi0,script=no,downscript=no,vhost=on",
                    "-device", "virtio-net-device,netdev=n0"]
            results["qemu"] = run_vmm("qemu", argv, console, qmp, qmp_status, iperf3, args.requests)
        finally:
            subprocess.run(["ip", "link", "del", "qmapi0"], check=False)

    p50 = {}
    for name, phases in results.items():
        for phase, took in phases.items():
            p50[name, phase] = statistics.median(took)
            print(f"{name:5s} {phase:4s} GET status: p50 {p50[name, phase] * 1e3:.3f} ms  "
                  f"p99 {percentile(took, 0.99) * 1e3:.3f} ms  (n={len(took)})")
        pooled = phases["idle"] + phases["load"]
        p50[name, "all"] = statistics.median(pooled)
    print(f"api_latency_ratio_idle={p50['pymvm', 'idle'] / p50['qemu', 'idle']:.3f}")
    print(f"api_latency_ratio_load={p50['pymvm', 'load'] / p50['qemu', 'load']:.3f}")
    print(f"api_latency_ratio={p50['pymvm', 'all'] / p50['qemu', 'all']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
