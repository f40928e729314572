"""Back-end swap benchmark: the data-plane gap of pymvm's live back-end swap, against the
closest thing a QEMU user has (a vhost-user back-end killed and restarted under QEMU's
reconnecting chardev) and pymvm's own reconnect, measured the same way in one run.

    bench/swap [-n ROUNDS] [--pps N]        (runs bench/swap.py in the nested host)

A guest echoes a sequence-numbered UDP stream (pymvm.testing.udp, 1000 datagrams/s by
default). Over a window around each event the stream gives the longest time without an echo
(the data-plane gap) and the datagrams lost.

- swap: one pymvm VM with a swappable NIC on a bridge, cycled vhost-net -> builtin ->
  dpdk (testpmd: vhost-user <-> TAP on the same bridge) -> builtin -> vhost-net ROUNDS times
  through the control API; the window is the API call plus one second.
- restart: the guest on a vhost-user NIC served by `pymvm vhost-user net` on a TAP; the
  back-end is killed (SIGKILL) and started again ROUNDS times, under QEMU microvm
  (-chardev socket,reconnect=1 -netdev vhost-user) and under pymvm (client mode, which
  reconnects); the window runs from the kill until echoes flow again, plus one second.

Prints, per pair and per restart kind, the medians of the gap and of the losses, then
``swap_gap_ms=`` (the worst pair's median gap) and ``swap_gap_ratio=`` (that over QEMU's
median restart gap).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymvm.api.client import request
from pymvm.images.initramfs import encode_cmd, encode_net
from pymvm.testing.backends import BuiltinNetProcess
from pymvm.testing.dpdk import TESTPMD, Testpmd, wait_until
from pymvm.testing.udp import (
    ECHO_PORT,
    UdpStream,
    build_udp_echo,
    initramfs_with_udp_echo,
)

CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
HOST_IP, GUEST_IP = "10.91.0.1", "10.91.0.2"
MEMORY_MIB = 256
CYCLE = ("builtin", "vhost-user", "builtin", "vhost-net")  # from vhost-net
NAMES = {"vhost-net": "vhost-net", "builtin": "builtin", "vhost-user": "dpdk"}
START_TIMEOUT_S = 600.0
WINDOW_TAIL_S = 1.0


def log(msg: str) -> None:
    print(f"[bench/swap {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def has_address(ip: str) -> bool:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return f"inet {ip}/" in out


def guest_command() -> str:
    return f"{build_udp_echo()} {ECHO_PORT} & sleep 100000"


def handover_times(vmm_log: Path) -> list[float]:
    """The VMM's own time of each hand-over so far, old back-end's stop to the new one's
    start (its net_backend_swapped lines), in ms."""
    times = []
    for line in vmm_log.read_text(errors="replace").splitlines():
        if '"net_backend_swapped"' in line:
            try:
                event = json.loads(line[line.index("{"):])
                times.append(float(event["stop_ms"]) + float(event["start_ms"]))
            except (ValueError, KeyError, TypeError):
                continue
    return times


def summary(samples: list[dict[str, float]]) -> tuple[float, float]:
    return (statistics.median(s["gap_ms"] for s in samples),
            statistics.median(s["lost"] for s in samples))


def restarts(vmm_argv: list[str], vmm_name: str, tmp: Path, rounds: int, pps: int,
             make_config) -> list[dict[str, float]]:
    """Boot the guest on a vhost-user NIC, then kill and restart its back-end ``rounds``
    times; the gap and losses of each restart."""
    tap = f"pmbsw{vmm_name[:1]}0"
    sock = tmp / f"{vmm_name}.sock"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"], check=True)
    backend = BuiltinNetProcess(sock, tap, tmp / f"{vmm_name}-backend.log",
                                start_timeout=START_TIMEOUT_S, log_level="warning")
    vmm = stream = None
    samples = []
    try:
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        backend.start()
        make_config(sock)
        console = open(tmp / f"{vmm_name}-console.log", "wb")
        vmm = subprocess.Popen(vmm_argv, stdin=subprocess.DEVNULL, stdout=console,
                               stderr=subprocess.STDOUT)
        stream = UdpStream(HOST_IP, GUEST_IP, pps=pps)
        if not stream.wait_flowing(START_TIMEOUT_S):
            raise RuntimeError(f"{vmm_name}: no echoes from the guest\n"
                               f"{(tmp / f'{vmm_name}-console.log').read_text()[-2000:]}")
        for n in range(rounds):
            t0 = time.monotonic()
            backend.kill()
            backend.start()
            if not stream.wait_flowing(START_TIMEOUT_S):
                raise RuntimeError(f"{vmm_name}: echoes did not come back after restart {n}")
            t1 = time.monotonic()
            time.sleep(WINDOW_TAIL_S)
            w = stream.window(t0 - 0.2, t1 + WINDOW_TAIL_S)
            samples.append(w)
            log(f"{vmm_name} restart {n}: gap {w['gap_ms']:.0f} ms, lost {w['lost']}")
            time.sleep(1.0)
    finally:
        if stream is not None:
            stream.close()
        if vmm is not None and vmm.poll() is None:
            vmm.terminate()
            try:
                vmm.wait(30)
            except subprocess.TimeoutExpired:
                vmm.kill()
                vmm.wait()
        backend.kill()
        subprocess.run(["ip", "link", "del", tap], capture_output=True)
    return samples


def qemu_restarts(qemu: str, kernel: Path, initramfs: Path, tmp: Path, rounds: int,
                  pps: int) -> list[dict[str, float]]:
    argv: list[str] = []

    def config(sock: Path) -> None:
        cmdline = f"{CMDLINE} {encode_net('eth0', f'{GUEST_IP}/24')} {encode_cmd(guest_command())}"
        argv.extend([
            qemu, "-M", "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on,"
            "memory-backend=mem", "-accel", "kvm", "-cpu", "host", "-smp", "1",
            "-m", str(MEMORY_MIB), "-object",
            f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline,
            "-chardev", f"socket,id=vu,path={sock},reconnect=1",
            "-netdev", "vhost-user,id=n0,chardev=vu",
            "-device", "virtio-net-device,netdev=n0"])

    return restarts(argv, "qemu", tmp, rounds, pps, config)


def pymvm_config(tmp: Path, kernel: Path, initramfs: Path, net: str, api: Path | None = None,
                 name: str = "vm") -> Path:
    config = tmp / f"{name}.toml"
    text = (f'id = "bench-swap-{name}"\n[machine]\nvcpus = 1\nmemory_mib = {MEMORY_MIB}\n'
            f'[boot]\nkernel = "{kernel}"\ninitrd = "{initramfs}"\n'
            f'cmdline = "{CMDLINE} {encode_cmd(guest_command())}"\n'
            '[serial]\noutput = "stdout"\ninput = false\n')
    if api is not None:
        text += f'[api]\nsocket = "{api}"\n'
    config.write_text(text + net)
    return config


def pymvm_restarts(kernel: Path, initramfs: Path, tmp: Path, rounds: int,
                   pps: int) -> list[dict[str, float]]:
    argv: list[str] = []

    def config(sock: Path) -> None:
        net = (f'[[net]]\nbackend = "vhost-user"\nsocket = "{sock}"\nip = "{GUEST_IP}/24"\n')
        path = pymvm_config(tmp, kernel, initramfs, net, name="reconnect")
        argv.extend([sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run",
                     str(path)])

    return restarts(argv, "pymvm", tmp, rounds, pps, config)


def pymvm_swaps(kernel: Path, initramfs: Path, tmp: Path, rounds: int,
                pps: int) -> dict[str, list[dict[str, float]]]:
    tap, bridge, dtap = "pmbswt0", "pmbswb0", "pmbswd0"
    api = tmp / "api.sock"
    sock = tmp / "testpmd.sock"
    net = (f'[[net]]\nid = "net0"\nbackend = "vhost-net"\ntap = "{tap}"\nbridge = "{bridge}"\n'
           f'host_ip = "{HOST_IP}/24"\nip = "{GUEST_IP}/24"\nswappable = true\n')
    config = pymvm_config(tmp, kernel, initramfs, net, api=api, name="swap")
    # testpmd starts first and is stopped (SIGSTOP) while the guest is on another back-end:
    # its start (DPDK touches all its memory without hugepages) and its busy-polling core
    # would take the nested host's one CPU from whatever back-end is being measured.
    pmd = Testpmd([f"net_vhost0,iface={sock},queues=1", f"net_tap0,iface={dtap}"], "io",
                  tmp / "testpmd.log", "pymvm-bench-swap", memory_mb=256)
    try:
        pmd.wait_started(lambda: sock.exists() and os.path.exists(f"/sys/class/net/{dtap}"))
        pmd.pause()
    except BaseException:
        pmd.finish()
        raise
    console = open(tmp / "swap-console.log", "wb")
    # info: the VMM's own timing of each hand-over (net_backend_swapped) goes to the log.
    vmm = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "--log-level", "info", "run",
                            str(config)], stdin=subprocess.DEVNULL, stdout=console,
                           stderr=subprocess.STDOUT)
    stream = None
    pairs: dict[str, list[dict[str, float]]] = {}
    try:
        wait_until(lambda: has_address(HOST_IP), START_TIMEOUT_S, "the VM's bridge", vmm)
        stream = UdpStream(HOST_IP, GUEST_IP, pps=pps)
        if not stream.wait_flowing(START_TIMEOUT_S):
            raise RuntimeError(f"no echoes:\n{(tmp / 'swap-console.log').read_text()[-2000:]}")
        subprocess.run(["ip", "link", "set", dtap, "master", bridge, "up"], check=True)
        current = "vhost-net"
        for n in range(rounds):
            for target in CYCLE:
                body = {"backend": target}
                if target == "vhost-user":
                    body.update(socket=str(sock), socket_mode="client")
                    pmd.resume()
                t0 = time.monotonic()
                request(str(api), "PUT", "/vm/net/net0/backend", body, timeout=START_TIMEOUT_S)
                t1 = time.monotonic()
                if current == "vhost-user":
                    pmd.pause()  # swapped away: idle until the next round's swap to it
                if not stream.wait_flowing(120):
                    raise RuntimeError(f"no echoes after the swap to {target}")
                time.sleep(WINDOW_TAIL_S)
                w = stream.window(t0, t1 + WINDOW_TAIL_S)
                handovers = handover_times(tmp / "swap-console.log")
                w["handover_ms"] = handovers[-1] if handovers else float("nan")
                pair = f"{NAMES[current]}->{NAMES[target]}"
                pairs.setdefault(pair, []).append(w)
                log(f"round {n} {pair}: gap {w['gap_ms']:.0f} ms, lost {w['lost']} "
                    f"(call {t1 - t0:.1f} s, hand-over {w['handover_ms']:.0f} ms)")
                current = target
                time.sleep(1.0)
    finally:
        if stream is not None:
            stream.close()
        try:
            request(str(api), "PUT", "/vm/actions", {"action": "stop"}, timeout=60)
        except Exception:
            pass
        try:
            vmm.wait(60)
        except subprocess.TimeoutExpired:
            vmm.kill()
            vmm.wait()
        pmd.finish()
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--rounds", type=int, default=5, help="swaps per pair / restarts (5)")
    p.add_argument("--pps", type=int, default=1000, help="UDP datagrams per second (1000)")
    args = p.parse_args()
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    qemu = shutil.which("qemu-system-x86_64")
    if kernel is None or qemu is None or shutil.which(TESTPMD) is None:
        print("bench/swap: needs 'pymvm build-kernel', qemu-system-x86 and dpdk-testpmd "
              "(dpdk-dev)", file=sys.stderr)
        return 2
    initramfs = initramfs_with_udp_echo()
    with tempfile.TemporaryDirectory(prefix="pymvm-bench-swap-") as tmpdir:
        tmp = Path(tmpdir)
        log("QEMU: back-end killed and restarted")
        qemu_samples = qemu_restarts(qemu, kernel.bzimage, initramfs, tmp, args.rounds, args.pps)
        log("pymvm: back-end killed and restarted (reconnect)")
        reconnect_samples = pymvm_restarts(kernel.vmlinux, initramfs, tmp, args.rounds, args.pps)
        log("pymvm: live back-end swaps")
        pairs = pymvm_swaps(kernel.vmlinux, initramfs, tmp, args.rounds, args.pps)
    print(f"nested_cpus={len(os.sched_getaffinity(0))} pps={args.pps} rounds={args.rounds}")
    for pair, samples in pairs.items():
        gap, lost = summary(samples)
        handover = statistics.median(s["handover_ms"] for s in samples)
        print(f"swap {pair}: median gap {gap:.1f} ms, median lost {lost:.0f}, median "
              f"hand-over {handover:.1f} ms (gaps {[round(s['gap_ms']) for s in samples]})")
    q_gap, q_lost = summary(qemu_samples)
    r_gap, r_lost = summary(reconnect_samples)
    print(f"qemu back-end restart: median gap {q_gap:.1f} ms, median lost {q_lost:.0f}")
    print(f"pymvm back-end restart (reconnect): median gap {r_gap:.1f} ms, median lost {r_lost:.0f}")
    worst = max(summary(s)[0] for s in pairs.values())
    print(f"swap_gap_ms={worst:.1f}")
    print(f"swap_lost={max(summary(s)[1] for s in pairs.values()):.0f}")
    print(f"restart_gap_ms_qemu={q_gap:.1f}")
    print(f"restart_gap_ms_pymvm={r_gap:.1f}")
    print(f"swap_gap_ratio={worst / q_gap:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
