"""Built-in vhost-user back-ends as child processes of the VMM (blk, and net on the VMM's TAP).

:class:`BuiltinBlkBackendProcess` runs ``pymvm vhost-user blk`` on an image the VMM opened and
locked: the child inherits that file description (``--image-fd``), so the lock that keeps
other VMs off the image is held by the VMM for the VM's whole life, whatever happens to the
child. A child that dies (a crash, ``kill -9``) is started again on the same socket; the
front-end reconnects, hands the new one the inflight region, and the requests the dead one
left unfinished are resubmitted: the guest sees a pause, not an I/O error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from pymvm.images.disk import DiskImage, open_image
from pymvm.vhost.user.errors import VhostUserError

log = structlog.get_logger()

READY_TIMEOUT = 120.0  # a Python start-up in the emulated nested host
RESTART_MIN_DELAY = 0.1
RESTART_MAX_DELAY = 5.0


class BuiltinBackendError(VhostUserError):
    """The built-in back-end process could not be started."""


class BuiltinBlkBackendProcess:
    """``pymvm vhost-user blk`` serving one disk of one VM, restarted if it dies."""

    def __init__(self, image: DiskImage, serial: str = "", *, restart: bool = True) -> None:
        self.image = image
        self.serial = serial
        self.restart = restart
        self._dir = tempfile.mkdtemp(prefix="pymvm-blk-")
        self.socket_path = os.path.join(self._dir, "blk.sock")
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._log = log.bind(device="vhost-user-blk", backend="builtin", image=str(image.path))

    @classmethod
    def start(cls, path: Path, *, read_only: bool = False, serial: str = "",
              ready_timeout: float = READY_TIMEOUT, restart: bool = True) -> BuiltinBlkBackendProcess:
        """Open and lock ``path``, start the back-end, wait until it listens."""
        from pymvm import state

        image = open_image(path, read_only=read_only)
        try:
            proc = cls(image, serial, restart=restart)
        except BaseException:
            image.close()
            raise
        try:
            state.record("dir", path=proc._dir)
            proc._spawn()
            proc._wait_listening(ready_timeout)
            proc._watcher = threading.Thread(target=proc._watch, daemon=True,
                                             name=f"blk-backend-{Path(path).name}")
            proc._watcher.start()
        except BaseException:
            proc.close()
            raise
        return proc

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "pymvm.cli", "vhost-user", "blk",
                "--socket", self.socket_path, "--image-fd", str(self.image.fd),
                "--parent-pid", str(os.getpid())]
        if self.image.read_only:
            argv.append("--read-only")
        if self.serial:
            argv += ["--serial", self.serial]
        from pymvm.sandbox import settings

        if settings.backend_user:  # no root, no capabilities once the socket is bound
            argv += ["--user", settings.backend_user]
        if not settings.seccomp:
            argv.append("--no-seccomp")
        return argv

    def _spawn(self) -> None:
        from pymvm import state

        os.set_inheritable(self.image.fd, True)
        try:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL,
                                            pass_fds=(self.image.fd,))
        finally:
            os.set_inheritable(self.image.fd, False)
        state.record("process", pid=self.process.pid,
                     start_time=state.process_start_time(self.process.pid))
        self._log.info("builtin_backend_started", pid=self.process.pid, socket=self.socket_path,
                       restarts=self.restarts)

    def _wait_listening(self, timeout: float) -> None:
        assert self.process is not None
        _wait_listening(self.process, self.socket_path, timeout, "blk")

    def _watch(self) -> None:
        """Restart the back-end whenever it dies, until close()."""
        delay = RESTART_MIN_DELAY
        while not self._closing.is_set():
            proc = self.process
            if proc is None:
                return
            status = proc.wait()
            if self._closing.is_set() or not self.restart:
                return
            self._log.warning("builtin_backend_died", pid=proc.pid, status=status,
                              restarting_in_s=delay)
            if self._closing.wait(delay):
                return
            started = time.monotonic()
            with self._lock:
                if self._closing.is_set():
                    return
                try:
                    self.restarts += 1
                    self._spawn()
                except OSError as e:
                    self._log.error("builtin_backend_restart_failed", error=str(e))
                    delay = min(delay * 2, RESTART_MAX_DELAY)
                    continue
            # A back-end that keeps dying at once is restarted ever more slowly.
            delay = RESTART_MIN_DELAY if time.monotonic() - started > 10 else min(
                delay * 2, RESTART_MAX_DELAY)

    def close(self) -> None:
        """Stop and reap the back-end, release the image and its lock; idempotent."""
        self._closing.set()
        with self._lock:
            proc = self.process
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
                self._log.info("builtin_backend_stopped", pid=proc.pid, status=proc.returncode)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        self.image.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class BuiltinNetBackendOnTap:
    """``pymvm vhost-user net`` on a TAP the VMM owns: the child inherits the TAP's fd
    (``--tap-fd``) instead of opening the TAP by name.

    The VMM's host network (pymvm.net.host.HostNetwork) owns the TAP whatever the back-end:
    vhost-net attaches the same fd, and a built-in back-end started later (a back-end swap,
    a live upgrade) gets it again. So the TAP, its bridge port, its addresses and the host's
    sockets on it stay as they are when the back-end changes (issue 10 item 3). Only one
    back-end moves packets on the TAP at a time: the swap stops the old one first.
    """

    def __init__(self, tap_fd: int, tap_name: str) -> None:
        self.tap_fd = tap_fd
        self.tap_name = tap_name
        self._dir = tempfile.mkdtemp(prefix="pymvm-vu-")
        self.socket_path = os.path.join(self._dir, "net.sock")
        self.process: subprocess.Popen | None = None
        self._log = log.bind(device="vhost-user-net", backend="builtin", tap=tap_name)

    @classmethod
    def start(cls, tap_fd: int, tap_name: str, *,
              ready_timeout: float = READY_TIMEOUT) -> BuiltinNetBackendOnTap:
        """Start the back-end on the TAP behind ``tap_fd`` and wait until it listens."""
        from pymvm import state

        proc = cls(tap_fd, tap_name)
        try:
            state.record("dir", path=proc._dir)
            proc._spawn()
            proc._wait_listening(ready_timeout)
        except BaseException:
            proc.close()
            raise
        return proc

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "pymvm.cli", "vhost-user", "net",
                "--socket", self.socket_path, "--tap-fd", str(self.tap_fd),
                "--tap", self.tap_name, "--parent-pid", str(os.getpid())]
        from pymvm.sandbox import settings

        if settings.backend_user and os.geteuid() == 0:  # no root, no capabilities once set up
            argv += ["--user", settings.backend_user]
        if not getattr(settings, "seccomp", True):
            argv.append("--no-seccomp")
        return argv

    def _spawn(self) -> None:
        from pymvm import state

        # The fd stays close-on-exec in the VMM; only this child gets it.
        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, pass_fds=(self.tap_fd,))
        state.record("process", pid=self.process.pid,
                     start_time=state.process_start_time(self.process.pid))
        self._log.info("builtin_backend_started", pid=self.process.pid, socket=self.socket_path)

    def _wait_listening(self, timeout: float) -> None:
        assert self.process is not None
        _wait_listening(self.process, self.socket_path, timeout, "net")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stop and reap the back-end and remove its socket directory; the TAP stays (the
        VMM's); idempotent."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            self._log.info("builtin_backend_stopped", pid=proc.pid, status=proc.returncode)
        shutil.rmtree(self._dir, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen, socket_path: str, timeout: float, kind: str) -> None:
    """Until the back-end ``proc`` has created its socket; one-line errors if it exits first
    or takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise BuiltinBackendError(
                f"the built-in vhost-user {kind} back-end exited with status {proc.returncode} "
                "before listening; see its log above")
        if time.monotonic() > deadline:
            raise BuiltinBackendError(
                f"the built-in vhost-user {kind} back-end did not create {socket_path} "
                f"within {timeout:g} s")
        time.sleep(0.02)
