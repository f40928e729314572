"""Open vSwitch with DPDK (Debian's openvswitch-switch-dpdk) as a peer for tests and benchmarks.

A private instance: its own database, run directory and logs under ``workdir``, started
without the system service. DPDK runs without hugepages (``--no-huge`` through
``other_config:dpdk-extra``) on CPU 0, with the PMD thread allowed to sleep when idle
(``pmd-maxsleep``) so that a one-CPU host keeps time for the VMs. Ports for VMs are
``dpdkvhostuserclient``: OVS connects to a socket the VMM listens on (``socket_mode =
"server"``) and reconnects when the VMM comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

VSWITCHD_DPDK = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
START_TIMEOUT_S = 300.0  # DPDK's start-up in the emulated nested host


class OvsError(RuntimeError):
    pass


def available() -> bool:
    return (os.path.exists(VSWITCHD_DPDK) and shutil.which("ovsdb-server") is not None
            and shutil.which("ovs-vsctl") is not None)


class OvsDpdk:
    """ovsdb-server + ovs-vswitchd (DPDK) under ``workdir``; ``close()`` stops both."""

    def __init__(self, workdir: Path, prefix: str) -> None:
        self.dir = workdir
        self.prefix = prefix
        self.rundir = workdir / "run"
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.db_sock = self.rundir / "db.sock"
        self.env = {**os.environ, "OVS_RUNDIR": str(self.rundir), "OVS_DBDIR": str(workdir),
                    "OVS_LOGDIR": str(workdir), "OVS_PKGDATADIR": "/usr/share/openvswitch"}
        self.procs: list[subprocess.Popen] = []
        self.bridges: list[str] = []

    def vsctl(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(["ovs-vsctl", f"--db=unix:{self.db_sock}", f"--timeout={int(timeout)}",
                            *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout + 10)
        if r.returncode != 0:
            raise OvsError(f"ovs-vsctl {' '.join(args)}: {r.stderr.strip()}\n{self.logs()}")
        return r.stdout.strip()

    def logs(self) -> str:
        out = []
        for name in ("ovsdb-server.log", "ovs-vswitchd.log"):
            try:
                out.append(f"--- {name} ---\n" + (self.dir / name).read_text(errors="replace")[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(out)

    def start(self) -> OvsDpdk:
        db = self.dir / "conf.db"
        subprocess.run(["ovsdb-tool", "create", str(db), SCHEMA], check=True, env=self.env)
        self.procs.append(subprocess.Popen(
            ["ovsdb-server", str(db), f"--remote=punix:{self.db_sock}",
             f"--unixctl={self.rundir / 'ovsdb-server.ctl'}",
             f"--log-file={self.dir / 'ovsdb-server.log'}"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        self._wait(lambda: self.db_sock.exists(), "ovsdb-server's socket")
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
                   "other_config:dpdk-lcore-mask=0x1", "other_config:pmd-cpu-mask=0x1",
                   "other_config:pmd-maxsleep=1000",
                   'other_config:dpdk-extra="--no-huge --legacy-mem -m 1024 --no-pci '
                   f'--single-file-segments --file-prefix {self.prefix}"')
        self.procs.append(subprocess.Popen(
            [VSWITCHD_DPDK, f"unix:{self.db_sock}",
             f"--unixctl={self.rundir / 'ovs-vswitchd.ctl'}",
             f"--log-file={self.dir / 'ovs-vswitchd.log'}"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        self._wait(lambda: self.vsctl("get", "Open_vSwitch", ".", "dpdk_initialized") == "true",
                   "DPDK initialized in ovs-vswitchd")
        return self

    def _wait(self, predicate, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise OvsError(f"{what}: {p.args[0]} exited with status {p.returncode}\n"
                                   f"{self.logs()}")
            try:
                if predicate():
                    return
            except OvsError:
                pass
            if time.monotonic() > deadline:
                raise OvsError(f"{what}: not within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)

    def add_bridge(self, name: str, address: str | None = None) -> None:
        """A userspace (netdev) bridge; ``address`` (CIDR) goes on its internal port."""
        self.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev")
        self.bridges.append(name)
        self._wait(lambda: os.path.exists(f"/sys/class/net/{name}"), f"bridge {name}'s port")
        if address is not None:
            subprocess.run(["ip", "addr", "add", address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)

    def add_vhost_user_port(self, bridge: str, port: str, socket_path: str | Path) -> None:
        """A dpdkvhostuserclient port: OVS connects to ``socket_path`` (the VMM listens)."""
        self.vsctl("add-port", bridge, port, "--", "set", "Interface", port,
                   "type=dpdkvhostuserclient", f"options:vhost-server-path={socket_path}")

    def add_system_port(self, bridge: str, ifname: str) -> None:
        """A kernel interface (a VMM's TAP) as a port of the userspace bridge."""
        self.vsctl("add-port", bridge, ifname)

    def close(self) -> None:
        """Remove the bridges (their internal TAPs outlive ovs-vswitchd otherwise), stop both
        daemons; idempotent."""
        for name in self.bridges:
            try:
                self.vsctl("--if-exists", "del-br", name, timeout=30)
            except (OvsError, subprocess.TimeoutExpired):
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()
        for name in self.bridges:
            if os.path.exists(f"/sys/class/net/{name}"):
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self.bridges.clear()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
