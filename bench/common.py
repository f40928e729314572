"""Helpers shared by the network benchmarks (bench/net.py, bench/vhost_user.py).

The guest runs iperf3 against a server on the host (guest->host, then -R for host->guest)
and ping; these functions build that guest command, parse what it printed and start the
host side.
"""

from __future__ import annotations

import re
import subprocess

CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"


def guest_script(host_ip: str, seconds: int, *, pings: int = 20, wait_for_host: bool = False) -> str:
    """The guest's command: iperf3 both ways, then ping (its summary line).

    ``wait_for_host``: first ping the host until it answers (up to 30 s), for a data plane
    that may still be starting its forwarding when the guest is up (DPDK testpmd)."""
    wait = (f"for i in $(seq 30); do ping -c 1 -W 1 {host_ip} >/dev/null && break; done; "
            if wait_for_host else "")
    return (f"{wait}iperf3 -c {host_ip} -t {seconds} -f m | grep -E 'sender|receiver'; "
            f"iperf3 -c {host_ip} -t {seconds} -f m -R | grep -E 'sender|receiver'; "
            f"ping -c {pings} -i 0.2 {host_ip} | tail -1")


def parse(console: str) -> dict[str, float]:
    """{tx_mbps (guest->host), rx_mbps (host->guest), rtt_ms} from the guest's console."""
    rates = [float(m.group(1)) for m in re.finditer(r"([\d.]+) Mbits/sec.*receiver", console)]
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", console)
    if len(rates) != 2 or rtt is None:
        raise RuntimeError(f"could not parse the guest's results:\n{console[-3000:]}")
    return {"tx_mbps": rates[0], "rx_mbps": rates[1], "rtt_ms": float(rtt.group(1))}


def run_guest(argv: list[str], timeout: float) -> str:
    """Run a VMM to completion; its stdout (the guest console)."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    return proc.stdout.decode(errors="replace")


def start_server_when_up(iperf3: str, host_ip: str) -> subprocess.Popen:
    """iperf3 server bound to host_ip; waits (in a shell loop) until the address exists."""
    script = (f"until ip -4 addr | grep -q 'inet {host_ip}/'; do sleep 0.2; done; "
              f"exec {iperf3} -s -B {host_ip}")
    return subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
