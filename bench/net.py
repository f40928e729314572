"""Network benchmark: pymvm + vhost-net against QEMU microvm + vhost-net, same guest.

Both VMMs boot the same bzImage and test initramfs with one virtio-net (virtio-mmio)
device whose data plane is the kernel's vhost-net on a TAP. In the guest, iperf3 measures
TCP throughput to an iperf3 server on the host (guest->host, then -R for host->guest) and
ping measures the round-trip time. Prints per-VMM numbers, then the lines
`throughput_ratio=X` (pymvm / QEMU, mean of both directions) and `latency_ratio=Y`.

Run with bench/net (uses the nested KVM host where this one cannot boot Linux); needs root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import CMDLINE, guest_script, parse, run_guest, start_server_when_up, stop

HOST_IP, GUEST_IP = "10.88.0.1", "10.88.0.2"
MEMORY_MIB = 512


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--seconds", type=int, default=10, help="iperf3 duration per direction")
    p.add_argument("-n", "--runs", type=int, default=2)
    args = p.parse_args()

    from pymvm.images.initramfs import build_initramfs, encode_cmd, encode_net
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    qemu = shutil.which("qemu-system-x86_64")
    iperf3 = shutil.which("iperf3")
    if kernel is None or qemu is None or iperf3 is None:
        print("bench/net: needs 'pymvm build-kernel', qemu-system-x86 and iperf3", file=sys.stderr)
        return 2
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    cmdline = (f"{CMDLINE} {encode_net('eth0', f'{GUEST_IP}/24')} "
               f"{encode_cmd(guest_script(HOST_IP, args.seconds))}")
    timeout = 600 + 4 * args.seconds

    results: dict[str, list[dict[str, float]]] = {"pymvm": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-") as tmp:
        config = Path(tmp) / "vm.toml"
        config.write_text(
            f'id = "bench-net"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
            f'[boot]\nkernel = "{kernel.bzimage}"\ninitrd = "{initramfs}"\ncmdline = "{cmdline}"\n'
            '[serial]\noutput = "stdout"\ninput = false\n'
            f'[[net]]\nbackend = "vhost-net"\ntap = "pmvbench0"\nhost_ip = "{HOST_IP}/24"\n')
        server = None
        try:
            for i in range(args.runs):
                for name in ("pymvm", "qemu"):
                    if name == "pymvm":
                        argv = [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)]
                        # pymvm creates the TAP and its address; the server binds once it exists.
                        server = start_server_when_up(iperf3, HOST_IP)
                        console = run_guest(argv, timeout)
                    else:
                        subprocess.run(["ip", "tuntap", "add", "dev", "qmbench0", "mode", "tap", "vnet_hdr"], check=True)
                        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", "qmbench0"], check=True)
                        subprocess.run(["ip", "link", "set", "qmbench0", "up"], check=True)
                        server = start_server_when_up(iperf3, HOST_IP)
                        argv = [qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-smp", "1",
                                "-m", str(MEMORY_MIB), "-display", "none", "-serial", "stdio", "-no-reboot",
                                "-nodefaults", "-no-user-config", "-kernel", str(kernel.bzimage),
                                "-initrd", str(initramfs), "-append", cmdline,
                                "-netdev", "tap,id=n0,ifname=qmbench0,script=no,downscript=no,vhost=on",
                                "-device", "virtio-net-device,netdev=n0"]
                        try:
                            console = run_guest(argv, timeout)
                        finally:
                            subprocess.run(["ip", "link", "del", "qmbench0"], check=False)
                    stop(server)
                    server = None
                    r = parse(console)
                    results[name].append(r)
                    print(f"run {i + 1} {name:5s} guest->host {r['tx_mbps']:8.1f} Mbit/s  "
                          f"host->guest {r['rx_mbps']:8.1f} Mbit/s  rtt {r['rtt_ms']:.3f} ms", flush=True)
        finally:
            stop(server)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("tx_mbps", "rx_mbps", "rtt_ms")}
           for name, rs in results.items()}
    for name, m in med.items():
        print(f"{name}: median guest->host {m['tx_mbps']:.1f} Mbit/s, host->guest {m['rx_mbps']:.1f} Mbit/s, "
              f"rtt {m['rtt_ms']:.3f} ms")
    tx = med["pymvm"]["tx_mbps"] / med["qemu"]["tx_mbps"]
    rx = med["pymvm"]["rx_mbps"] / med["qemu"]["rx_mbps"]
    print(f"throughput_ratio_guest_to_host={tx:.3f}")
    print(f"throughput_ratio_host_to_guest={rx:.3f}")
    print(f"throughput_ratio={(tx + rx) / 2:.3f}")
    print(f"latency_ratio={med['pymvm']['rtt_ms'] / med['qemu']['rtt_ms']:.3f}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
