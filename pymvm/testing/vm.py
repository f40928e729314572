"""MicroVM: a Linux guest in a child `pymvm run` process, for integration tests.

The VMM is a separate process serving the control API (pymvm/api) on a UNIX socket, so a
VMM crash fails the test instead of killing the test process. Commands and files go to the
guest agent (docs/agent.md) over vsock; the serial console and the VMM's log are captured in
files next to the VM's TOML. Every error raised carries the console's tail and the VMM's last
log lines.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .agent import (
    DEFAULT_PORT,
    AgentClient,
    AgentError,
    AgentUnreachable,
    RunResult,
    vsock_connector,
)

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
BOOT_TIMEOUT_S = float(os.environ.get("PYMVM_TESTING_BOOT_TIMEOUT", "240"))
STOP_TIMEOUT_S = 30.0
# How often start() looks at the console for the ready marker, then pings the agent: the
# agent listens a few milliseconds after the marker; a console file has nothing to wait on.
READY_POLL_S = 0.01
TAIL_LINES = 40
_ids = itertools.count()


class MicroVMError(Exception):
    """A MicroVM failed; ``console_tail`` and ``vmm_log_tail`` say what the guest and the
    VMM printed last (both are also in the message)."""

    def __init__(self, message: str, console_tail: str = "", vmm_log_tail: str = "") -> None:
        self.summary = message
        self.console_tail = console_tail
        self.vmm_log_tail = vmm_log_tail
        parts = [message]
        if console_tail:
            parts.append(f"--- console (last lines) ---\n{console_tail}")
        if vmm_log_tail:
            parts.append(f"--- VMM log (last lines) ---\n{vmm_log_tail}")
        super().__init__("\n".join(parts))


class GuestNotReady(MicroVMError):
    """The guest did not reach its agent within the boot timeout."""


class VmmDied(MicroVMError):
    """The `pymvm run` process ended (crash, bad config, guest reboot)."""


class AgentGone(MicroVMError):
    """The guest agent stopped answering while the VMM still runs."""


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def default_kernel() -> Path:
    from pymvm.images.kernel import kernel_status

    env = os.environ.get("PYMVM_TEST_KERNEL")
    if env:
        return Path(env)
    kernel = kernel_status()
    if kernel is None:
        raise MicroVMError("the microVM kernel is not built: run 'pymvm build-kernel' (or pass "
                           "--pymvm-kernel / kernel=)")
    return kernel.vmlinux


def default_initrd() -> Path:
    from pymvm.images.initramfs import build_initramfs

    env = os.environ.get("PYMVM_TEST_INITRD")
    if env:
        return Path(env)
    return build_initramfs(log=lambda *_: None)  # cached: built once, with the agent


class MicroVM:
    """One guest: ``with MicroVM(vcpus=2) as vm: vm.run("uname -r")``.

    ``net`` entries are [[net]] tables as dicts (e.g. ``{"tap": "t0", "ip": "10.0.0.2/24",
    "host_ip": "10.0.0.1/24"}``; backend vhost-net unless given). ``spawn`` is "fork" (a
    forked child of this process runs `pymvm run`; the default: no interpreter start-up) or
    "exec" (a fresh `python -m pymvm.cli run`).
    """

    def __init__(self, *, kernel: str | os.PathLike[str] | None = None,
                 initrd: str | os.PathLike[str] | None = None, vcpus: int = 1,
                 memory_mib: int = 256, net: Sequence[Mapping[str, Any]] = (),
                 cmdline: str | None = None, cid: int | None = None, vm_id: str | None = None,
                 extra_toml: str = "", workdir: str | os.PathLike[str] | None = None,
                 boot_timeout: float = BOOT_TIMEOUT_S, spawn: str | None = None,
                 agent_port: int = DEFAULT_PORT) -> None:
        self.id = vm_id or f"microvm-{os.getpid()}-{next(_ids)}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"pymvm-{self.id}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.boot_timeout = boot_timeout
        self.spawn = spawn or os.environ.get("PYMVM_TESTING_SPAWN", "fork")
        self.agent_port = agent_port
        self.console_path = self.workdir / "console.log"
        self.log_path = self.workdir / "vmm.log"
        self.api_socket = self.workdir / "api.sock"
        self.config_path = self.workdir / "vm.toml"
        self._toml = self._render(kernel, initrd, vcpus, memory_mib, net, cmdline, cid,
                                  extra_toml)
        self.cid = tomllib.loads(self._toml).get("vsock", {}).get("cid")
        self._proc: Any = None
        self._agent: AgentClient | None = None
        self.returncode: int | None = None
        self._lock = threading.Lock()

    # ---- construction -----------------------------------------------------------------------
    def _render(self, kernel, initrd, vcpus, memory_mib, net, cmdline, cid, extra_toml) -> str:
        kernel = Path(kernel) if kernel is not None else default_kernel()
        initrd = Path(initrd) if initrd is not None else default_initrd()
        if cid is None:
            from pymvm.config import default_vsock_cid

            cid = default_vsock_cid(self.id)
        lines = [f"id = {_toml_value(self.id)}",
                 "[machine]", f"vcpus = {vcpus}", f"memory_mib = {memory_mib}",
                 "[boot]", f"kernel = {_toml_value(kernel)}", f"initrd = {_toml_value(initrd)}",
                 f"cmdline = {_toml_value(cmdline or DEFAULT_CMDLINE)}",
                 "[serial]", 'output = "stdout"', "input = false",
                 "[vsock]", f"cid = {cid}"]
        for entry in net:
            lines.append("[[net]]")
            entry = {"backend": "vhost-net", **entry}
            lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
        return "\n".join(lines) + "\n" + extra_toml

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **kwargs: Any) -> MicroVM:
        """A MicroVM from an existing VM config. A [vsock] table is added when it has none;
        the console is captured when its serial output is stdout (the default)."""
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text)
        vm = cls.__new__(cls)
        vm_id = kwargs.pop("vm_id", None) or data.get("id") or path.stem
        cls.__init__(vm, vm_id=vm_id, kernel=kwargs.pop("kernel", "/dev/null"),
                     initrd=kwargs.pop("initrd", "/dev/null"), **kwargs)
        if "vsock" not in data:
            from pymvm.config import default_vsock_cid

            text += f"\n[vsock]\ncid = {default_vsock_cid(vm_id)}\n"
        # Relative paths in the file stay relative to where it was.
        vm._toml = text
        vm.config_path = path.parent / f".{path.stem}.microvm-{os.getpid()}.toml"
        vm.cid = tomllib.loads(text)["vsock"].get("cid")
        if vm.cid is None:
            from pymvm.config import default_vsock_cid

            vm.cid = default_vsock_cid(data.get("id") or path.stem)
        return vm

    # ---- life ---------------------------------------------------------------------------------
    def __enter__(self) -> MicroVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> MicroVM:
        """Start the VMM and wait until the guest agent answers."""
        if self._proc is not None:
            raise MicroVMError(f"{self.id} is already started")
        self.config_path.write_text(self._toml)
        argv = ["run", str(self.config_path), "--api-sock", str(self.api_socket)]
        self._proc = self._spawn(argv)
        self._agent = AgentClient(vsock_connector(self.cid, self.agent_port))
        self._wait_ready()
        return self

    def _spawn(self, argv: list[str]) -> Any:
        console = os.open(self.console_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if self.spawn == "exec":
                return subprocess.Popen([sys.executable, "-m", "pymvm.cli", *argv],
                                        stdin=subprocess.DEVNULL, stdout=console, stderr=log,
                                        start_new_session=True)
            return _ForkedRun(argv, console, log)
        finally:
            os.close(console)
            os.close(log)

    def _wait_ready(self) -> None:
        """Until the agent answers: the console is read as it grows (only the new bytes) for
        the ready marker, then the agent is pinged; both every READY_POLL_S."""
        from pymvm.images.initramfs import READY_RE

        deadline = time.monotonic() + self.boot_timeout
        last = ""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, ready = "", False
        with open(self.console_path, "rb") as console:
            while time.monotonic() < deadline:
                if self.poll() is not None:
                    raise self._error(VmmDied, f"{self.id}: pymvm run exited with status "
                                               f"{self.returncode} before the guest was ready")
                if not ready:
                    text += decoder.decode(console.read())
                    ready = READY_RE.search(text) is not None
                    text = text[text.rfind("\n") + 1:]  # keep only a line still incomplete
                if ready:
                    try:
                        assert self._agent is not None
                        self._agent.connect_timeout = 5
                        self._agent.ping()
                        self._agent.connect_timeout = 30  # a busy guest may accept slowly
                        return
                    except AgentError as e:
                        last = str(e)
                time.sleep(READY_POLL_S)
        self.kill()
        raise self._error(GuestNotReady, f"{self.id}: the guest agent did not answer within "
                                         f"{self.boot_timeout:g} s" + (f" ({last})" if last else ""))

    def poll(self) -> int | None:
        """The VMM's exit status, or None while it runs."""
        if self._proc is not None and self.returncode is None:
            self.returncode = self._proc.poll()
        return self.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the VM through the API ("stop"), then signals if it does not go; its status."""
        if self._proc is None or self.poll() is not None:
            return self.returncode
        try:
            self.api("PUT", "/vm/actions", {"action": "stop"}, timeout=10)
            asked = True
        except Exception:  # no API (any more): signals at once
            asked = False
        if not asked or self._wait(timeout) is None:
            self._proc.send_signal(signal.SIGTERM)
            if self._wait(10) is None:
                self.kill()
        return self.returncode

    def kill(self) -> None:
        if self._proc is not None and self.poll() is None:
            self._proc.kill()
            self._wait(10)

    def _wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode

    def close(self) -> None:
        """Stop the VM and remove its files (the console and log stay readable as text)."""
        with self._lock:
            self.stop()
            self._final_console = self.console
            self._final_log = self.vmm_log
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.config_path.name.startswith("."):
                self.config_path.unlink(missing_ok=True)

    # ---- what happened --------------------------------------------------------------------
    @property
    def console(self) -> str:
        """The serial console so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except OSError:
            return getattr(self, "_final_console", "")

    @property
    def vmm_log(self) -> str:
        """The VMM's log (JSON lines) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return getattr(self, "_final_log", "")

    def _error(self, kind: type[MicroVMError], message: str) -> MicroVMError:
        return kind(message, _tail(self.console), _tail(self.vmm_log, 20))

    # ---- control API ------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        from pymvm.api.client import request

        return request(str(self.api_socket), method, path, body, timeout)

    # ---- the guest agent --------------------------------------------------------------------
    def _call(self, what: str, fn, *args: Any, **kwargs: Any):
        if self._agent is None:
            raise MicroVMError(f"{self.id} is not started: use it in a with block or call start()")
        try:
            return fn(*args, **kwargs)
        except AgentError as e:
            if self.poll() is not None:
                raise self._error(VmmDied, f"{self.id}: {what} failed: the VMM exited with "
                                           f"status {self.returncode} ({e})") from None
            if isinstance(e, (AgentUnreachable,)) or "closed the connection" in str(e) \
                    or "did not answer" in str(e):
                raise self._error(AgentGone, f"{self.id}: {what} failed: {e}") from None
            raise

    def run(self, command: str | Sequence[str], *, input: bytes | str | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, check: bool = False) -> RunResult:
        """Run ``command`` in the guest (a str through sh -c, a sequence as argv)."""
        assert self._agent is not None or True
        return self._call(f"run({command!r})", lambda: self._agent.run(  # type: ignore[union-attr]
            command, input=input, env=env, cwd=cwd, timeout=timeout, check=check))

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest."""
        self._call(f"put({path!r})", lambda: self._agent.put(data, path, mode))  # type: ignore[union-attr]

    def get(self, path: str) -> bytes:
        """Read ``path`` from the guest."""
        return self._call(f"get({path!r})", lambda: self._agent.get(path))  # type: ignore[union-attr]


def fork_cli(argv: list[str], stdout_fd: int, stderr_fd: int, *, new_session: bool = False,
             close_fds: Sequence[int] = ()) -> int:
    """Run `pymvm ARGV` (`pymvm.cli.main`) in a forked child of this process; its pid.

    The child gets ``stdout_fd`` and ``stderr_fd`` as its stdout and stderr, /dev/null as
    stdin, default signal handlers, and (``new_session``) a session of its own; it closes
    ``close_fds`` (e.g. the caller's ends of its pipes) and never returns into the caller.
    Only the interpreter start-up is skipped, which costs tens of seconds per process in the
    nested host (9p root under TCG); everything else is what the console script does.
    """
    import pymvm.cli  # noqa: F401  (imported before the fork: the child does not pay for it)
    import pymvm.vmm  # noqa: F401

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # Import as the console script does. Under pytest, pymvm (a pytest11 plugin) is on the
        # assertion-rewriting list, so a module the child imports lazily would be parsed into
        # Python AST objects; a SIGTERM landing in that conversion surfaces on CPython 3.11.7
        # as "SystemError: AST constructor recursion depth mismatch" instead of StopSignal.
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"]
        if new_session:
            os.setsid()
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd in {*close_fds, null} - {0, 1, 2}:
            os.close(fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        from pymvm.cli import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class _ForkedRun:
    """`pymvm run ARGS` in a forked child (stdout/stderr to the given fds); Popen-like."""

    def __init__(self, argv: list[str], stdout_fd: int, stderr_fd: int) -> None:
        pid = fork_cli(argv, stdout_fd, stderr_fd, new_session=True)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
