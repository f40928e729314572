"""Fixtures for e2e tests: real Linux guests booted by `pymvm run`.

They need a /dev/kvm that can boot Linux. On hosts whose KVM cannot (this project's
development machines: a paravirtual kvm_pvm), `scripts/e2e` runs this tier inside the
nested KVM host; run directly there, the tests skip and say so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pymvm.images.initramfs import EXIT_RE, READY_RE, encode_cmd
from pymvm.testing.vm import fork_cli

GUEST_TIMEOUT_S = float(os.environ.get("PYMVM_E2E_GUEST_TIMEOUT", "240"))
# Every e2e guest gets this; `quiet` keeps the boot log off the (exit-per-byte) UART.
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"


# scripts/test may run this tier in several nested hosts in a row, when one crashes or
# freezes under it (no test result). PYMVM_E2E_PROGRESS names a file where each test's
# outcome is recorded as it ends (fsync'd: the host may freeze right after); a later attempt
# runs only the tests without a recorded outcome, and fails if an earlier attempt recorded
# a failure.
PROGRESS_ENV = "PYMVM_E2E_PROGRESS"


def _progress_path() -> Path | None:
    value = os.environ.get(PROGRESS_ENV)
    return Path(value) if value else None


def _recorded_outcomes() -> dict[str, str]:
    path = _progress_path()
    outcomes: dict[str, str] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            outcome, _, nodeid = line.partition(" ")
            if nodeid:
                outcomes[nodeid] = outcome
    return outcomes


def pytest_runtest_logreport(report):
    path = _progress_path()
    if path is None:
        return
    # A test's outcome is known at its first failure or skip, else once its teardown passed.
    if report.failed:
        _record(path, "failed", report.nodeid)
        _record_failure_text(path, report)
    elif report.skipped and report.when != "teardown":
        _record(path, "skipped", report.nodeid)
    elif report.when == "teardown":
        _record(path, "passed", report.nodeid, only_if_absent=True)


# Tests this attempt has recorded (earlier attempts' tests are deselected, never run again).
_recorded_now: set[str] = set()


def _record(path: Path, outcome: str, nodeid: str, *, only_if_absent: bool = False) -> None:
    if only_if_absent and nodeid in _recorded_now:
        return
    _recorded_now.add(nodeid)
    with open(path, "a") as f:
        f.write(f"{outcome} {nodeid}\n")
        f.flush()
        os.fsync(f.fileno())


def _failures_path(path: Path) -> Path:
    return path.with_name(path.stem + "-failures.txt")


FAILURE_TAIL = 6000  # characters of each failure's report kept across attempts


def _record_failure_text(path: Path, report) -> None:
    """Keep the failure's report now: pytest prints it only at the session's end, which a
    nested host that freezes or times out later in the attempt never reaches."""
    text = report.longreprtext[-FAILURE_TAIL:]
    with open(_failures_path(path), "a") as f:
        f.write(f"===== FAILED {report.nodeid} ({report.when})\n{text}\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_sessionfinish(session, exitstatus):
    earlier = getattr(session.config, "_pymvm_earlier_failures", [])
    if earlier:
        print(f"\ne2e: {len(earlier)} test(s) failed in an earlier attempt of this run:")
        path = _progress_path()
        failures = _failures_path(path) if path is not None else None
        if failures is not None and failures.exists():
            print(failures.read_text(errors="replace"))
        for nodeid in earlier:
            print(f"  FAILED {nodeid}")
        if session.exitstatus == 0 or session.exitstatus == 5:
            session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    from pymvm.nested import can_boot_linux_here, in_nested_host

    recorded = _recorded_outcomes()
    path = _progress_path()
    if path is not None and not path.exists():  # a first attempt: no failure texts yet
        _failures_path(path).unlink(missing_ok=True)
    if recorded:
        done = [item for item in items if item.nodeid in recorded]
        config._pymvm_earlier_failures = [
            item.nodeid for item in done if recorded[item.nodeid] == "failed"
        ]
        if done:
            print(f"e2e: {len(done)} test(s) already ended in an earlier attempt of this run "
                  f"({sum(recorded[i.nodeid] == 'passed' for i in done)} passed); running the rest")
            config.hook.pytest_deselected(items=done)
            items[:] = [item for item in items if item.nodeid not in recorded]

    ok, why = can_boot_linux_here()
    if ok or in_nested_host():
        return
    if os.environ.get("PYMVM_E2E_REQUIRE") == "1":  # scripts/test: a skipped tier is a failure
        raise pytest.UsageError(f"e2e tests cannot run here: {why}")
    skip = pytest.mark.skip(reason=f"{why}; run this tier with scripts/e2e (nested KVM host)")
    for item in items:
        if "tests/e2e" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


def link_exists(name: str) -> bool:
    """Whether a host interface of that name exists (in this network namespace)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def unique(prefix: str) -> str:
    """An interface name unlikely to clash with another run's (at most 15 bytes)."""
    return f"{prefix}{os.getpid() % 10000}{int(time.monotonic() * 1000) % 1000}"[:15]


@dataclass(frozen=True)
class GuestImages:
    vmlinux: Path
    bzimage: Path
    initramfs: Path


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    from pymvm.images.initramfs import build_initramfs
    from pymvm.images.kernel import kernel_status

    kernel = kernel_status()
    if kernel is None:
        pytest.fail("the microVM kernel is not built: run 'pymvm build-kernel' (.ci/run does)")
    initramfs = build_initramfs(extra_binaries=["iperf3"], log=lambda *_: None)
    return GuestImages(kernel.vmlinux, kernel.bzimage, initramfs)


@dataclass
class VmRun:
    returncode: int
    console: str
    logs: list[dict] = field(default_factory=list)
    stderr: str = ""

    def events(self, name: str) -> list[dict]:
        return [e for e in self.logs if e.get("event") == name]

    @property
    def ready_cpus(self) -> int | None:
        m = READY_RE.search(self.console)
        return int(m.group(1)) if m else None

    @property
    def command_status(self) -> int | None:
        m = EXIT_RE.search(self.console)
        return int(m.group(1)) if m else None

    def describe(self) -> str:
        return f"rc={self.returncode}\n--- console ---\n{self.console[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


def parse_logs(stderr: str) -> list[dict]:
    logs = []
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                logs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return logs


def net_toml(*, tap: str, ip: str, host_ip: str | None = None, bridge: str | None = None,
             backend: str = "vhost-net", mac: str | None = None, extra: str = "") -> str:
    lines = ["[[net]]", f'backend = "{backend}"', f'tap = "{tap}"', f'ip = "{ip}"']
    if host_ip:
        lines.append(f'host_ip = "{host_ip}"')
    if bridge:
        lines.append(f'bridge = "{bridge}"')
    if mac:
        lines.append(f'mac = "{mac}"')
    return "\n".join(lines) + "\n" + extra


def write_vm_toml(path: Path, *, kernel: Path, initrd: Path | None, cmdline: str, vcpus: int = 1,
                  memory_mib: int = 256, extra: str = "", vm_id: str = "e2e") -> Path:
    lines = [
        f'id = "{vm_id}"',
        "[machine]", f"vcpus = {vcpus}", f"memory_mib = {memory_mib}",
        "[boot]", f'kernel = "{kernel}"',
    ]
    if initrd is not None:
        lines.append(f'initrd = "{initrd}"')
    lines += [f'cmdline = "{cmdline}"', "[serial]", 'output = "stdout"', "input = false"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class ForkedVmm:
    """`pymvm run CONFIG` in a forked child of the test process.

    The child runs the same `pymvm.cli.main` as the console script, with its own stdout,
    stderr and signals; only the interpreter start-up is skipped, which costs tens of
    seconds per process inside the nested host (its root filesystem is 9p under TCG).
    Quacks like the subprocess.Popen calls the tests use.
    """

    def __init__(self, argv: list[str]) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = fork_cli(argv, out_w, err_w, close_fds=(out_r, out_w, err_r, err_w))
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self._stderr = os.fdopen(err_r, "rb", buffering=0)

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        open_files = {self.stdout.fileno(): out, self._stderr.fileno(): err}
        if not self.stdout.closed:
            os.set_blocking(self.stdout.fileno(), True)
        while open_files:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("pymvm run", timeout)
            ready, _, _ = select.select(list(open_files), [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    open_files[fd] += chunk
                else:
                    del open_files[fd]
        self._reap(0)
        return bytes(out), bytes(err)


def start_vm(config: Path, *, spawn: str | None = None):
    """Start `pymvm run CONFIG`: forked from this process, or exec'd (spawn="exec")."""
    argv = ["run", str(config)]
    if (spawn or os.environ.get("PYMVM_E2E_SPAWN", "fork")) == "exec":
        return subprocess.Popen(
            [sys.executable, "-m", "pymvm.cli", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
    import pymvm.cli  # noqa: F401  (imported once here, inherited by every child)
    import pymvm.vmm  # noqa: F401

    return ForkedVmm(argv)


def finish_vm(proc: subprocess.Popen, timeout: float = GUEST_TIMEOUT_S) -> VmRun:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # unkillable, or its pipes live on elsewhere
                pytest.fail(f"VM did not stop within {timeout:.0f} s, nor die of SIGKILL")
        run = VmRun(proc.returncode, out.decode(errors="replace"), parse_logs(err.decode(errors="replace")),
                    err.decode(errors="replace"))
        pytest.fail(f"VM did not stop within {timeout:.0f} s\n{run.describe()}")
    stderr = err.decode(errors="replace")
    return VmRun(proc.returncode, out.decode(errors="replace"), parse_logs(stderr), stderr)


@pytest.fixture
def boot_vm(tmp_path, guest_images):
    """Boot a guest running ``command`` and wait for the VM to stop; returns a VmRun."""

    def boot(command: str | None = None, *, vcpus: int = 1, kernel: str = "vmlinux",
             extra_cmdline: str = "", memory_mib: int = 256, extra_toml: str = "",
             timeout: float = GUEST_TIMEOUT_S, background: bool = False, vm_id: str = "e2e",
             spawn: str | None = None):
        cmdline = BASE_CMDLINE
        if command is not None:
            cmdline += " " + encode_cmd(command)
        if extra_cmdline:
            cmdline += " " + extra_cmdline
        image = guest_images.vmlinux if kernel == "vmlinux" else guest_images.bzimage
        config = write_vm_toml(tmp_path / f"vm-{time.monotonic_ns()}.toml", kernel=image,
                               initrd=guest_images.initramfs, cmdline=cmdline, vcpus=vcpus,
                               memory_mib=memory_mib, extra=extra_toml, vm_id=vm_id)
        proc = start_vm(config, spawn=spawn)
        return proc if background else finish_vm(proc, timeout)

    return boot
