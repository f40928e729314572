"""vhost-user benchmark: a guest's TCP throughput through three network back-ends, and the
built-in back-end's packet rate driven by DPDK.

    python bench/vhost_user.py tcp [-t SECONDS] [-n RUNS]   (needs KVM that boots Linux)
    python bench/vhost_user.py pps [-s SECONDS]             (needs dpdk-testpmd)
    python bench/vhost_user.py rx [-n PACKETS]              (needs root and /dev/net/tun)

`tcp`: the same pymvm guest (bzImage + test initramfs, one vCPU) runs iperf3 against a
server on the host, both directions, through
  (a) vhost-net (in-kernel data plane on a TAP),
  (b) pymvm's built-in vhost-user back-end (`backend = "builtin"`, a TAP),
  (c) DPDK testpmd as the vhost-user back-end (net_vhost <-> net_tap, io forwarding),
and prints the medians, then `builtin_vs_vhost_net=X` and `dpdk_vs_vhost_net=Y` (mean of
the two directions' ratios).

`pps`: testpmd's virtio_user front-end sends 64-byte frames (txonly) into
`pymvm vhost-user net`, which writes them to its TAP; prints `builtin_pps=N` (frames that
reached the TAP per second) and the share of testpmd's frames that arrived.

`rx`: the built-in back-end's receive path alone, natively: 64 KiB frames written into a
TAP are delivered into a ring of guest-style mergeable buffers (1536 and 4096 bytes, the
bounds of what a Linux guest posts) that a driver stand-in refills at once; prints the time
per packet and per guest buffer, and `builtin_rx_gbps_1536=` / `builtin_rx_gbps_4096=`.

bench/vhost-user runs `pps` and `rx` on this host and `tcp` where Linux guests can boot (the nested
KVM host on machines whose KVM cannot). Needs root.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CMDLINE, guest_script, parse, run_guest, start_server_when_up, stop

from pymvm.testing.backends import unix_socket_listening
from pymvm.testing.dpdk import TESTPMD, Testpmd, wait_until

HOST_IP, GUEST_IP = "10.89.0.1", "10.89.0.2"
MEMORY_MIB = 512
BACKENDS = ("vhost-net", "builtin", "dpdk")
START_TIMEOUT_S = 120


def link_up(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


# --- tcp ------------------------------------------------------------------------------------

def vm_toml(kernel: Path, initramfs: Path, cmdline: str, net: str) -> str:
    return (f'id = "bench-vu"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
            f'[boot]\nkernel = "{kernel}"\ninitrd = "{initramfs}"\ncmdline = "{cmdline}"\n'
            '[serial]\noutput = "stdout"\ninput = false\n' + net)


def one_run(backend: str, *, kernel: Path, initramfs: Path, cmdline: str, tmp: Path,
            iperf3: str, timeout: float) -> dict[str, float]:
    config = tmp / f"{backend}.toml"
    pymvm = [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)]
    server = pmd = None
    try:
        if backend == "dpdk":
            sock, tap = tmp / "testpmd.sock", "pmvbdp0"
            pmd = Testpmd([f"net_vhost0,iface={sock},queues=1", f"net_tap0,iface={tap}"], "io",
                          tmp / "testpmd.log", "pymvm-bench-vu")
            pmd.wait_started(lambda: sock.exists() and link_up(tap))
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
            net = f'[[net]]\nbackend = "vhost-user"\nsocket = "{sock}"\n'
        else:
            tap = "pmvbvn0" if backend == "vhost-net" else "pmvbvu0"
            net = f'[[net]]\nbackend = "{backend}"\ntap = "{tap}"\nhost_ip = "{HOST_IP}/24"\n'
        config.write_text(vm_toml(kernel, initramfs, cmdline, net))
        # pymvm (or testpmd) puts the address up; the server binds once it exists.
        server = start_server_when_up(iperf3, HOST_IP)
        console = run_guest(pymvm, timeout)
    finally:
        stop(server)
        if pmd is not None:
            pmd.finish()
    return parse(console)


def tcp(args: argparse.Namespace) -> int:
    from pymvm.images.initramfs import build_initramfs, encode_cmd, encode_net
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    iperf3 = shutil.which("iperf3")
    if kernel is None or iperf3 is None or shutil.which(TESTPMD) is None:
        print("bench/vhost-user: needs 'pymvm build-kernel', iperf3 and dpdk-testpmd (dpdk-dev)",
              file=sys.stderr)
        return 2
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    cmdline = (f"{CMDLINE} {encode_net('eth0', f'{GUEST_IP}/24')} "
               f"{encode_cmd(guest_script(HOST_IP, args.seconds, pings=10, wait_for_host=True))}")
    results: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-") as tmp:
        for i in range(args.runs):
            for backend in BACKENDS:
                r = one_run(backend, kernel=kernel.bzimage, initramfs=initramfs, cmdline=cmdline,
                            tmp=Path(tmp), iperf3=iperf3, timeout=600 + 4 * args.seconds)
                results[backend].append(r)
                print(f"run {i + 1} {backend:9s} guest->host {r['tx_mbps']:8.1f} Mbit/s  "
                      f"host->guest {r['rx_mbps']:8.1f} Mbit/s  rtt {r['rtt_ms']:.3f} ms", flush=True)

    med = {b: {k: statistics.median(r[k] for r in rs) for k in ("tx_mbps", "rx_mbps", "rtt_ms")}
           for b, rs in results.items()}
    for b, m in med.items():
        print(f"{b}: median guest->host {m['tx_mbps']:.1f} Mbit/s, host->guest {m['rx_mbps']:.1f} Mbit/s, "
              f"rtt {m['rtt_ms']:.3f} ms")
    base = med["vhost-net"]
    for b in ("builtin", "dpdk"):
        tx = med[b]["tx_mbps"] / base["tx_mbps"]
        rx = med[b]["rx_mbps"] / base["rx_mbps"]
        print(f"{b}_vs_vhost_net_guest_to_host={tx:.3f}")
        print(f"{b}_vs_vhost_net_host_to_guest={rx:.3f}")
        print(f"{b}_vs_vhost_net={(tx + rx) / 2:.3f}")
    return 0


# --- pps ------------------------------------------------------------------------------------

def pps(args: argparse.Namespace) -> int:
    if shutil.which(TESTPMD) is None:
        print("bench/vhost-user: pps needs dpdk-testpmd (apt-get install dpdk-dev)", file=sys.stderr)
        return 2
    tap = "pmvbpps0"
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-") as tmp:
        sock = Path(tmp) / "vu.sock"
        log = (Path(tmp) / "backend.log").open("wb")
        backend = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "--log-level", "warning",
                                    "vhost-user", "net", "--socket", str(sock), "--tap", tap,
                                    # DPDK's virtio_user shares hugepage/anonymous memory, which
                                    # is not sealed: the back-end refuses it unless told to trust it.
                                    "--allow-unsealed-memory"],
                                   stdout=log, stderr=subprocess.STDOUT)
        pmd = None
        try:
            # Listening, not only bound: DPDK's virtio_user connects once.
            wait_until(lambda: unix_socket_listening(sock) and link_up(tap), START_TIMEOUT_S,
                       "back-end start", backend)
            Path(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6").write_text("1")
            before = int(Path(f"/sys/class/net/{tap}/statistics/rx_packets").read_text())
            pmd = Testpmd([f"net_virtio_user0,path={sock},queues=1"], "txonly",
                          Path(tmp) / "testpmd.log", "pymvm-bench-pps")
            pmd.wait_started()
            began = time.monotonic()
            time.sleep(args.seconds)
            text = pmd.finish()
            seconds = time.monotonic() - began
            pmd = None
            time.sleep(1)  # the back-end drains the last batch it was kicked for
            arrived = int(Path(f"/sys/class/net/{tap}/statistics/rx_packets").read_text()) - before
        finally:
            if pmd is not None:
                pmd.finish()
            stop(backend)
            log.close()
    sent = [int(n) for n in re.findall(r"TX-packets:\s+(\d+)", text)]
    if not sent:
        print(f"bench/vhost-user: no totals from testpmd:\n{text[-3000:]}", file=sys.stderr)
        return 1
    print(f"testpmd txonly -> pymvm vhost-user net -> TAP: {arrived} frames of {max(sent)} sent "
          f"in {seconds:.1f} s")
    print(f"builtin_pps={arrived / seconds:.0f}")
    return 0


# --- rx -------------------------------------------------------------------------------------

RX_QSIZE = 256
RX_FRAME = 65535  # an Ethernet frame carrying a 64 KiB GSO packet, about


def rx_one(buf_size: int, packets: int) -> tuple[float, int, int]:
    """Seconds spent in the back-end's RX path, guest buffers used, packets delivered."""
    import socket
    import struct

    from pyroute2 import IPRoute

    from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, feature_mask
    from pymvm.devices.virtio.queue import VRING_DESC_F_WRITE, GuestMemoryMap, VirtQueue
    from pymvm.net.tap import Tap
    from pymvm.vhost.backends.net import HDR_LEN, RX_DIRECT_ROOM, NetBackend
    from pymvm.vhost.user.backend import Vring

    # Frames per round: as many as the ring holds beside the buffers the back-end keeps
    # back for the next read, so that every packet can go the direct way.
    per_frame = -(-(RX_FRAME + HDR_LEN) // buf_size)
    per_round = max(1, (RX_QSIZE - -(-RX_DIRECT_ROOM // buf_size)) // per_frame)

    desc, avail, used, data = 0, 0x1000, 0x2000, 0x10000
    ram = bytearray(data + RX_QSIZE * buf_size)
    ring = VirtQueue(GuestMemoryMap([(0, memoryview(ram))]), RX_QSIZE, desc, avail, used,
                     event_idx=True, indirect=True)
    for i in range(RX_QSIZE):  # slot i always names buffer i: refilling is one idx store
        struct.pack_into("<QIHH", ram, desc + 16 * i, data + buf_size * i, buf_size, VRING_DESC_F_WRITE, 0)
        struct.pack_into("<H", ram, avail + 4 + 2 * i, i)
    posted = RX_QSIZE
    struct.pack_into("<H", ram, avail + 2, posted)
    vring = Vring(0)
    vring.queue = ring
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + os.urandom(RX_FRAME - 14)
    with Tap.open("pmvbrx%d") as tap:
        Path(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6").write_text("1")
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=tap.name)[0], state="up", mtu=RX_FRAME - 14)
        backend = NetBackend(tap)
        backend.set_features(feature_mask(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF))
        backend.rx = vring
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind((tap.name, 0))
        spent = 0.0
        buffers = 0
        try:
            while backend.stats["rx_packets"] < packets:
                for _ in range(per_round):
                    sender.send(frame)
                before = ring.next_used_idx
                began = time.perf_counter()
                backend._process_rx()
                spent += time.perf_counter() - began
                done = (ring.next_used_idx - before) & 0xFFFF
                buffers += done
                posted = (posted + done) & 0xFFFF  # the driver re-posts what came back
                struct.pack_into("<H", ram, avail + 2, posted)
        finally:
            sender.close()
            backend.rx = None
            ring.release()
        if backend.stats["rx_direct"] != backend.stats["rx_packets"]:
            raise RuntimeError(f"only {backend.stats['rx_direct']} of {backend.stats['rx_packets']} "
                               f"packets took the direct path")
        return spent, buffers, backend.stats["rx_packets"]


def rx(args: argparse.Namespace) -> int:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        print("bench/vhost-user: rx needs root and /dev/net/tun", file=sys.stderr)
        return 2
    from pymvm.logging import configure

    configure("warning")
    for buf_size in (1536, 4096):
        spent, buffers, packets = rx_one(buf_size, args.packets)
        gbps = packets * (RX_FRAME + 12) * 8 / spent / 1e9
        print(f"{packets} frames of {RX_FRAME} bytes into {buf_size}-byte guest buffers: "
              f"{spent / packets * 1e6:.1f} us per packet, {spent / buffers * 1e6:.2f} us per buffer "
              f"({buffers / packets:.1f} buffers per packet)")
        print(f"builtin_rx_gbps_{buf_size}={gbps:.2f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    t = sub.add_parser("tcp", help="iperf3 through vhost-net, the built-in back-end and testpmd")
    t.add_argument("-t", "--seconds", type=int, default=10, help="iperf3 duration per direction")
    t.add_argument("-n", "--runs", type=int, default=2)
    q = sub.add_parser("pps", help="DPDK virtio_user txonly into the built-in back-end")
    q.add_argument("-s", "--seconds", type=float, default=10.0)
    r = sub.add_parser("rx", help="the built-in back-end's RX path alone, 64 KiB frames from a TAP")
    r.add_argument("-n", "--packets", type=int, default=20000)
    args = p.parse_args()
    return {"tcp": tcp, "pps": pps, "rx": rx}[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
