"""Time to the first command result (bench/boot's exec part, issue 11).

From spawning the VMM process to the result of `run("true")` through the guest agent over
vsock: pymvm with `[vsock]` against QEMU microvm with `-device vhost-vsock-device,guest-cid=N`,
same kernel, initramfs (with the agent) and host, interleaved. Both guests wait for the agent
(the init does when the guest has a vsock device); the console's ready marker is awaited
first, then the agent is polled every 10 ms, the same way for both. Each VMM is started once
untimed before the timed runs (``warmup``), so that neither pays for a cold page cache.
Each run prints the time to the ready marker beside the time to the first result (boot vs
the agent's first answer). Afterwards the latency of `run("true")` is sampled on the running
guest.

Prints `first_exec_ratio=X` (pymvm / QEMU) and `run_true_p50_ms=Y` (pymvm's).
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

READY = b"PYMVM-READY"
LATENCY_SAMPLES = 50


def _wait_ready(proc: subprocess.Popen, start: float, timeout: float) -> None:
    seen = b""
    fd = proc.stdout.fileno()
    while READY not in seen:
        if time.monotonic() - start > timeout or proc.poll() is not None:
            raise RuntimeError(f"no ready marker (rc={proc.poll()}): {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            seen += os.read(fd, 65536)


@dataclass
class FirstExec:
    ready_s: float  # spawn to the console's ready marker
    first_s: float  # spawn to the first run("true") result
    attempts: int  # run("true") calls until one answered
    latencies: list[float]  # run("true") on the running guest, seconds


def first_exec_once(argv: list[str], cid: int, samples: int = 0,
                    timeout: float = 300.0) -> FirstExec:
    from pymvm.testing.agent import AgentClient, AgentError, vsock_connector

    agent = AgentClient(vsock_connector(cid), connect_timeout=5)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, start, timeout)
        ready = time.monotonic() - start
        attempts = 0
        while True:
            attempts += 1
            try:
                result = agent.run("true")
                break
            except AgentError:
                if time.monotonic() - start > timeout or proc.poll() is not None:
                    raise
                time.sleep(0.01)
        first = time.monotonic() - start
        if result.returncode != 0:
            raise RuntimeError(f"run('true') returned {result.returncode}: {result.stderr}")
        latencies = []
        for _ in range(samples):
            t0 = time.perf_counter()
            agent.run("true")
            latencies.append(time.perf_counter() - t0)
        return FirstExec(ready, first, attempts, latencies)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exec_part(qemu: str, kernel: Path, initrd: Path, tmp: Path, runs: int, memory_mib: int,
              cmdline: str, warmup: int = 1) -> tuple[float, float]:
    """Returns (first_exec_ratio, pymvm's run("true") p50 in ms)."""
    cid_pymvm, cid_qemu = 10000 + os.getpid() % 50000, 70000 + os.getpid() % 50000
    config = tmp / "exec.toml"
    config.write_text(
        f'id = "bench-exec"\n[machine]\nvcpus = 1\nmemory_mib = {memory_mib}\n'
        f'[boot]\nkernel = "{kernel}"\ninitrd = "{initrd}"\ncmdline = "{cmdline}"\n'
        f'[serial]\noutput = "stdout"\ninput = false\n[vsock]\ncid = {cid_pymvm}\n')
    vmms = {
        "pymvm": ([sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "run", str(config)],
                  cid_pymvm),
        "qemu": ([qemu, "-M", "microvm,acpi=off,x-option-roms=off,rtc=off,isa-serial=on",
                  "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", str(memory_mib),
                  "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                  "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
                  "-device", f"vhost-vsock-device,guest-cid={cid_qemu}"], cid_qemu),
    }
    for name, (argv, cid) in vmms.items():
        # Untimed, once per VMM alike: what a start reads from disk is in the page cache
        # for the timed runs (the nested host's root is 9p: a cold Python start-up there
        # costs seconds of reads, a one-off that says nothing about the VMM).
        for _ in range(warmup):
            first_exec_once(argv, cid)
    firsts: dict[str, list[float]] = {name: [] for name in vmms}
    readies: dict[str, list[float]] = {name: [] for name in vmms}
    latencies: dict[str, list[float]] = {name: [] for name in vmms}
    for i in range(runs):
        for name, (argv, cid) in vmms.items():
            r = first_exec_once(argv, cid, LATENCY_SAMPLES)
            firsts[name].append(r.first_s)
            readies[name].append(r.ready_s)
            latencies[name] += r.latencies
            print(f"exec run {i + 1:2d} {name:5s} ready marker {r.ready_s * 1000:8.1f} ms  "
                  f"first result {r.first_s * 1000:8.1f} ms ({r.attempts} attempt(s))  "
                  f"run('true') p50 {statistics.median(r.latencies) * 1000:6.1f} ms", flush=True)
    for name in vmms:
        print(f"{name}: median time to first command result {statistics.median(firsts[name]) * 1000:.1f} ms "
              f"(ready marker {statistics.median(readies[name]) * 1000:.1f} ms), "
              f"run('true') p50 {statistics.median(latencies[name]) * 1000:.1f} ms "
              f"({len(latencies[name])} samples)")
    ratio = statistics.median(firsts["pymvm"]) / statistics.median(firsts["qemu"])
    return ratio, statistics.median(latencies["pymvm"]) * 1000
