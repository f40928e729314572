"""Nested-host soak: how often does the nested KVM host freeze or die while L2 guests come and go?

Outer mode (the default; run it with scripts/nested-soak): starts fresh nested KVM hosts one
after another (``python -m pymvm.nested --attempts 1``), each running this script with
``--inner`` for up to ``--per-host`` boots, until ``--boots`` boots have been started in all
or ``--max-hosts`` hosts were used. Inside each host the settings take turns:

    vmm   pymvm | qemu (QEMU microvm)
    cpus  1 | 2 vCPUs
    nic   none | vhost-net (a TAP with vhost-net; the guest pings the host 100 times, 20 ms apart)
          | iperf (the same NIC moving TCP at full speed both ways for --iperf-seconds (IPERF_S): iperf3
          --bidir against a server on the nested host; the freezes seen in e2e runs came
          under such traffic)

``--settings`` picks some of them (e.g. ``pymvm-1cpu-iperf``). The nested host's emulation
is the default one unless the PYMVM_NESTED_* experiment variables say otherwise (issue 8:
QEMU binary, CPU model, TCG cache size, kvm_amd parameters; see pymvm.nested.NestedSettings);
the report names the setting used.

Every boot writes a "start" record and then an "end" record (ok or the guest's error) to a
JSON-lines progress file in the shared working tree, flushed and fsynced first, so that when
a host freezes (its heartbeat stops: status 124) or dies (status 125) the setting that was
booting or shutting down is known: it is the last "start" with no "end". The report gives,
per setting, the boots that completed, the guest failures, and the freezes and deaths that
happened during such a boot, then per host. A non-zero exit only means the soak itself
could not run; freezes are its result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from itertools import product
from pathlib import Path

MEMORY_MIB = 256
HOST_IP, GUEST_IP = "10.89.0.1", "10.89.0.2"
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet"
READY_TIMEOUT = 180.0
IPERF_S = 20
IPERF_PORT = 5301
SETTINGS = [f"{vmm}-{cpus}cpu-{nic}" for vmm, cpus, nic in
            product(("pymvm", "qemu"), (1, 2), ("none", "vhost-net", "iperf"))]


#: The nested host as it was before issue 8's fix: one-shot timer, no wake-up.
OLD_SETTING = "PYMVM_NESTED_APPEND=none PYMVM_NESTED_WAKE=0"


def parse_assignments(text: str) -> dict[str, str]:
    """``NAME=VALUE NAME=VALUE`` of the nested host's experiment variables."""
    from pymvm.nested import SETTINGS_ENV

    out = {}
    for word in text.split():
        name, eq, value = word.partition("=")
        if not eq or name not in SETTINGS_ENV:
            raise ValueError(f"--compare takes NAME=VALUE words with NAME one of "
                             f"{', '.join(SETTINGS_ENV)}; got {word!r}")
        out[name] = value
    return out


def _record(progress: Path, **fields: object) -> None:
    with progress.open("a") as f:
        f.write(json.dumps(fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _guest_cmd(nic: str, iperf_s: int = IPERF_S) -> str:
    if nic == "none":
        return "true"
    if nic == "iperf":
        # Fails the boot unless the transfer ran (iperf3's summary has a "receiver" line).
        return (f"ping -c 5 -W 5 {HOST_IP} >/dev/null; iperf3 -c {HOST_IP} -p {IPERF_PORT} "
                f"-t {iperf_s} --bidir | tail -4")
    # Exits non-zero (and so fails the boot) unless at least one reply came back.
    return f"ping -c 100 -i 0.02 -q {HOST_IP} | tail -2"


def _boot(setting: str, tmp: Path, kernel: Path, qemu: str,
          iperf_s: int = IPERF_S) -> tuple[bool, str]:
    from pymvm.images.initramfs import build_initramfs, encode_cmd, encode_net

    vmm, cpus_s, nic = setting.split("-", 2)
    cpus = int(cpus_s[0])
    initramfs = build_initramfs(extra_binaries=["iperf3"] if nic == "iperf" else [],
                                log=lambda *_: None)
    cmdline = f"{CMDLINE} {encode_cmd(_guest_cmd(nic, iperf_s))}"
    if nic != "none":
        cmdline = f"{CMDLINE} {encode_net('eth0', f'{GUEST_IP}/24')} {encode_cmd(_guest_cmd(nic, iperf_s))}"
    tap = "pmsoak0" if vmm == "pymvm" else "qmsoak0"
    if vmm == "pymvm":
        config = tmp / "vm.toml"
        text = (f'id = "soak"\n[machine]\nvcpus = {cpus}\nmemory_mib = {MEMORY_MIB}\n'
                f'[boot]\nkernel = "{kernel}"\ninitrd = "{initramfs}"\ncmdline = "{cmdline}"\n'
                '[serial]\noutput = "stdout"\ninput = false\n')
        if nic != "none":
            text += f'[[net]]\nbackend = "vhost-net"\ntap = "{tap}"\nhost_ip = "{HOST_IP}/24"\n'
        config.write_text(text)
        argv = [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)]
    else:
        argv = [qemu, "-M", "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on", "-accel", "kvm",
                "-cpu", "host", "-smp", str(cpus), "-m", str(MEMORY_MIB), "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                "-kernel", str(kernel), "-initrd", str(initramfs), "-append", cmdline]
        if nic != "none":
            for cmd in (["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
                        ["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap],
                        ["ip", "link", "set", tap, "up"]):
                subprocess.run(cmd, check=True)
            argv += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=on",
                     "-device", "virtio-net-device,netdev=n0"]
    server = None
    if nic == "iperf":  # on every address: pymvm's TAP and its address appear with the VM
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=READY_TIMEOUT + iperf_s, check=False)
        out = proc.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired:
        return False, f"no exit within {READY_TIMEOUT + iperf_s:g} s"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if vmm == "qemu" and nic != "none":
            subprocess.run(["ip", "link", "del", tap], check=False, stderr=subprocess.DEVNULL)
    return check_output(nic, proc.returncode, out)


def check_output(nic: str, status: int | None, out: str) -> tuple[bool, str]:
    """Whether a boot did its job, from the guest's console: (ok, what went wrong)."""
    if "PYMVM-READY" not in out:
        return False, f"no ready marker (status {status}): {out[-300:]!r}"
    if nic == "vhost-net" and (" 0 received" in out or "received" not in out):
        return False, f"the ping got no reply: {out[-300:]!r}"
    if nic == "iperf" and "receiver" not in out:
        return False, f"the iperf3 transfer did not run: {out[-300:]!r}"
    return True, ""


def inner(args: argparse.Namespace) -> int:
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    qemu = shutil.which("qemu-system-x86_64")
    if kernel is None or qemu is None:
        print("nested_soak: needs 'pymvm build-kernel' and qemu-system-x86", file=sys.stderr)
        return 2
    progress = Path(args.progress)
    with tempfile.TemporaryDirectory(prefix="pymvm-soak-") as tmp:
        chosen = args.settings.split(",")
        for i in range(args.boots):
            setting = chosen[(args.offset + i) % len(chosen)]
            _record(progress, event="start", host=args.host, setting=setting, t=time.time())
            start = time.monotonic()
            ok, error = _boot(setting, Path(tmp), kernel.bzimage, qemu, args.iperf_seconds)
            seconds = time.monotonic() - start
            _record(progress, event="end", host=args.host, setting=setting, ok=ok, error=error,
                    seconds=round(seconds, 2))
            print(f"host {args.host} boot {i + 1} {setting}: {'ok' if ok else 'FAILED ' + error} "
                  f"({seconds:.1f} s)", flush=True)
    return 0


def _read(progress: Path) -> list[dict]:
    if not progress.exists():
        return []
    return [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]


def outer(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    progress = Path(args.progress).resolve()
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.unlink(missing_ok=True)
    outcomes: dict[int, str] = {}
    wakes: dict[int, int] = {}
    started = 0
    from pymvm.nested import NestedSettings

    variants = [("chosen", dict(os.environ))]
    if args.compare is not None:  # every other host runs with these variables
        variants.append(("compared", {**os.environ, **parse_assignments(args.compare)}))
    for label, env in variants:
        print(f"nested_soak: {label} nested host setting: "
              f"{NestedSettings.from_env(env).describe()}", flush=True)
    print(f"nested_soak: L2 settings: {args.settings}", flush=True)
    host_variant: dict[int, str] = {}
    for host in range(1, args.max_hosts + 1):
        if started >= args.boots:
            break
        label, env = variants[(host - 1) % len(variants)]
        host_variant[host] = label
        boots = min(args.per_host, args.boots - started)
        cmd = [sys.executable, "-m", "pymvm.nested", "--cpus", str(args.cpus), "--attempts", "1",
               "--timeout", str(args.host_timeout), "--", sys.executable, "bench/nested_soak.py",
               "--inner", "--host", str(host), "--boots", str(boots), "--offset", str(started),
               "--progress", str(progress), "--settings", args.settings,
               "--iperf-seconds", str(args.iperf_seconds)]
        print(f"nested_soak: host {host} ({label}): {boots} boot(s) ({time.strftime('%H:%M:%S')})",
              flush=True)
        proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              check=False, env=env)
        log = proc.stdout.decode(errors="replace")
        # Each host's whole output beside the progress file: the settings it really ran
        # with (kvm_amd's parameters in effect, the kernel), and the runner's notes.
        progress.with_name(f"{progress.stem}.host{host}.log").write_text(log)
        from pymvm.nested import WOKE_NOTE

        wakes[host] = log.count(WOKE_NOTE)  # late heartbeats the runner woke: hidden freezes
        if proc.returncode == 0:
            outcomes[host] = "ok"
        elif "heartbeat stopped" in log:
            outcomes[host] = "froze"
        elif proc.returncode == 125:
            outcomes[host] = "died"
        elif proc.returncode == 124:
            outcomes[host] = "timed out"
        else:
            outcomes[host] = f"error {proc.returncode}"
            print(log[-3000:], file=sys.stderr)
        started += sum(1 for r in _read(progress) if r["event"] == "start" and r["host"] == host)
        print(f"nested_soak: host {host}: {outcomes[host]}", flush=True)
        if outcomes[host].startswith("error"):
            break
    return report(_read(progress), outcomes, host_variant, wakes)


def report(records: list[dict], outcomes: dict[int, str],
           host_variant: dict[int, str] | None = None, wakes: dict[int, int] | None = None) -> int:
    per: dict[str, Counter] = defaultdict(Counter)
    open_boot: dict[int, str] = {}
    for r in records:
        if r["event"] == "start":
            open_boot[r["host"]] = r["setting"]
        else:
            open_boot.pop(r["host"], None)
            per[r["setting"]]["completed" if r["ok"] else "guest_failures"] += 1
    for host, outcome in outcomes.items():
        if outcome in ("froze", "died", "timed out"):
            per[open_boot.get(host, "between boots")][outcome.replace(" ", "_")] += 1
    columns = ("completed", "guest_failures", "froze", "died", "timed_out")
    print(f"\n{'setting':24s} " + " ".join(f"{c:>14s}" for c in columns))
    for setting in [*SETTINGS, "between boots"]:
        if setting in per:
            print(f"{setting:24s} " + " ".join(f"{per[setting][c]:14d}" for c in columns))
    totals = Counter()
    for c in per.values():
        totals.update(c)
    print(f"{'total':24s} " + " ".join(f"{totals[c]:14d}" for c in columns))
    print("hosts: " + ", ".join(f"{h}: {o}" for h, o in outcomes.items()))
    print(f"soak_boots={sum(1 for r in records if r['event'] == 'start')}")
    print(f"soak_host_failures={totals['froze'] + totals['died'] + totals['timed_out']}")
    print(f"soak_hosts={len(outcomes)}")
    # Per nested host setting: the chosen one (nested_freezes_per_100_boots=) and, with
    # --compare, the one it is compared with, measured in the same run.
    host_variant = host_variant or {host: "chosen" for host in outcomes}
    for label in dict.fromkeys(host_variant.values()):
        hosts = {h for h, v in host_variant.items() if v == label}
        boots = sum(1 for r in records if r["event"] == "start" and r["host"] in hosts)
        failures = sum(1 for h in hosts if outcomes.get(h) in ("froze", "died", "timed out"))
        rate = 100 * failures / boots if boots else 0.0
        suffix = "" if label == "chosen" else f"_{label}"
        print(f"nested_freezes_per_100_boots{suffix}={rate:.1f} ({failures} in {boots} boots, "
              f"{len(hosts)} hosts)")
        if wakes is not None:  # a host the runner woke would have frozen without the wake-up
            print(f"nested_wakes{suffix}={sum(wakes.get(h, 0) for h in hosts)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boots", type=int, default=100, help="L2 boots in all (outer), or in this host (inner)")
    p.add_argument("--per-host", type=int, default=25, help="boots per fresh nested host")
    p.add_argument("--max-hosts", type=int, default=12)
    p.add_argument("--cpus", type=int, default=int(os.environ.get("PYMVM_NESTED_CPUS", "1")))
    p.add_argument("--host-timeout", type=int, default=1800, help="seconds per nested host")
    p.add_argument("--progress", default="results/nested-soak/progress.jsonl")
    p.add_argument("--compare", metavar="ASSIGNMENTS", default=None,
                   help="run every other nested host with these PYMVM_NESTED_* variables set "
                   f"(e.g. {OLD_SETTING!r}, the setting before issue 8) and report both")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated settings to take turns (default: all of them)")
    p.add_argument("--iperf-seconds", type=int, default=IPERF_S,
                   help="how long each iperf setting's transfer runs (longer: closer to the "
                   "e2e runs that froze)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compare is not None:
        try:
            parse_assignments(args.compare)
        except ValueError as exc:
            p.error(str(exc))
    unknown = [x for x in args.settings.split(",") if x not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
