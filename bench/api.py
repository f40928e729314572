"""Control-plane latency: pymvm's `GET /vm` against QEMU's QMP `query-status`, same guest.

Both VMMs boot the same bzImage and test initramfs with one virtio-net device (vhost-net on
a TAP); the guest runs an iperf3 server. For each VMM, one client on one persistent
connection asks for the VM's status ``-n`` times back to back, first with the guest idle,
then while an iperf3 client on the host moves traffic from the guest (-R).

What is measured is the server: both clients are the same minimal kind, so the client's own
cost is small and alike on both sides. Each sends a request built once (pymvm: the bytes of
``GET /vm HTTP/1.1`` with a Host header, HTTP/1.1 keep-alive; QEMU: ``{"execute":
"query-status"}`` and a newline, after the QMP greeting and ``qmp_capabilities``), reads from
its UNIX socket into one buffer, and looks only at what it must: pymvm's status line,
Content-Length and the JSON body; QMP's next JSON line (events that come in between are
skipped). Both bodies are decoded with ``json.loads`` and the state checked to be running.
A sample is the time from the send to the decoded answer (time.perf_counter), after 20
warm-up requests. Clients that parse more (http.client, aiohttp, qemu.qmp) add their own
cost: with http.client a `GET /vm` took twice as long natively, most of it header parsing.

Prints p50/p99 per VMM and phase, then `api_latency_ratio_idle=` and
`api_latency_ratio_load=` (pymvm p50 / QEMU p50 in each phase), `api_latency_ratio=`, the
worse of the two (the ratio holds on an idle guest and under load alike), and
`api_latency_ratio_pooled=` (the p50s of both phases' samples pooled). The pooled figure was
the headline until 2026-11-30; it is the median of a sample with two modes (idle about
1.7 ms, load about 3.6 ms in the nested host), so it falls in the gap between them, where
the modes' tails decide it: on 2026-11-30 it was 1.103 with both phases' ratios below 1
(0.901 and 0.993), and 0.739 in the run before.

Run with bench/api (uses the nested KVM host where this one cannot boot Linux); needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


REQUEST_TIMEOUT_S = 30.0


class LineReader:
    """A receive buffer over one connected stream socket: the client side both VMMs share."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the VMM closed the control connection")
        self.buf += chunk

    def until(self, marker: bytes) -> bytes:
        """Everything up to ``marker`` (which is consumed too)."""
        while (end := self.buf.find(marker)) < 0:
            self._more()
        head, self.buf = self.buf[:end], self.buf[end + len(marker):]
        return head

    def exactly(self, count: int) -> bytes:
        while len(self.buf) < count:
            self._more()
        data, self.buf = self.buf[:count], self.buf[count:]
        return data


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REQUEST_TIMEOUT_S)
    sock.connect(path)
    return sock


# pymvm: HTTP/1.1 keep-alive. The request is built once; of the answer only the status
# line, Content-Length and the JSON body are looked at (what any HTTP client must do).
GET_VM = b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


def http_request(reader: LineReader, request: bytes) -> tuple[int, bytes]:
    """Send one pre-built request on the kept-alive connection; (status, body)."""
    reader.sock.sendall(request)
    head = reader.until(b"\r\n\r\n")
    status = int(head[9:12])
    found = _CONTENT_LENGTH.search(head)
    if found is None:
        raise RuntimeError(f"an answer without Content-Length: {head!r}")
    return status, reader.exactly(int(found.group(1)))


def pymvm_status(path: str):
    reader = LineReader(_connect(path))

    def ask() -> None:
        status, body = http_request(reader, GET_VM)
        state = json.loads(body).get("state")
        if status != 200 or state != "running":
            raise RuntimeError(f"GET /vm answered {status} {body!r}")

    return ask, reader.sock.close


# QEMU: QMP, JSON lines on a persistent connection. The request is built once; each answer
# line is decoded as JSON (events may come between a command and its answer).
QUERY_STATUS = b'{"execute":"query-status"}\n'


def qmp_command(reader: LineReader, request: bytes) -> dict:
    reader.sock.sendall(request)
    while True:
        reply = json.loads(reader.until(b"\n"))
        if "return" in reply or "error" in reply:
            return reply


def qmp_status(path: str):
    reader = LineReader(_connect(path))
    json.loads(reader.until(b"\n"))  # the greeting
    qmp_command(reader, b'{"execute":"qmp_capabilities"}\n')

    def ask() -> None:
        reply = qmp_command(reader, QUERY_STATUS)
        if reply.get("return", {}).get("status") != "running":
            raise RuntimeError(f"query-status answered {reply}")

    def close() -> None:
        try:
            qmp_command(reader, b'{"execute":"quit"}\n')
        except (OSError, ValueError, RuntimeError):
            pass
        reader.sock.close()

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
            body = json.dumps({"action": "stop"}).encode()
            reader = LineReader(_connect(ctl_path))
            http_request(reader, b"PUT /vm/actions HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            reader.sock.close()
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
    print(f"bench/api: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPU(s), "
          f"{args.requests} requests per phase", flush=True)

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

    for name, phases in results.items():
        for phase, took in phases.items():
            print(f"{name:5s} {phase:4s} GET status: p50 {statistics.median(took) * 1e3:.3f} ms  "
                  f"p99 {percentile(took, 0.99) * 1e3:.3f} ms  (n={len(took)})")
    for key, value in latency_ratios(results).items():
        print(f"{key}={value:.3f}")
    return 0


def latency_ratios(results: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """pymvm p50 / QEMU p50 per phase, the worse of the two (``api_latency_ratio``) and the
    pooled samples' (see the module's docstring), from {vmm: {"idle"|"load": seconds}}."""
    def p50(name: str, *phases: str) -> float:
        return statistics.median([t for phase in phases for t in results[name][phase]])

    idle = p50("pymvm", "idle") / p50("qemu", "idle")
    load = p50("pymvm", "load") / p50("qemu", "load")
    return {"api_latency_ratio_idle": idle, "api_latency_ratio_load": load,
            "api_latency_ratio": max(idle, load),
            "api_latency_ratio_pooled": p50("pymvm", "idle", "load") / p50("qemu", "idle", "load")}


if __name__ == "__main__":
    sys.exit(main())
