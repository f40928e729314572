"""pymvm's built-in vhost-user net back-end run as a process of its own, for the tests and
benchmarks that kill and restart it (a reconnect, or a back-end restart, is what they check).
It attaches to a persistent TAP by name, so a restarted one serves the same TAP."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from .dpdk import wait_until


def unix_socket_listening(path: str | Path) -> bool:
    """Whether something accepts connections at ``path``. The built-in back-ends create their
    socket file (bind) before they listen, which they do once they can answer at once; a peer
    that connects only once (DPDK's virtio_user) must wait for this, not for the file."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class BuiltinNetProcess:
    """`pymvm vhost-user net --socket SOCKET --tap TAP`, its output appended to ``log_path``."""

    def __init__(self, socket_path: Path, tap: str, log_path: Path, *,
                 start_timeout: float = 600.0, log_level: str | None = None) -> None:
        self.socket_path, self.tap, self.log_path = Path(socket_path), tap, Path(log_path)
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        return [sys.executable, "-m", "pymvm.cli", *level, "vhost-user", "net",
                "--socket", str(self.socket_path), "--tap", self.tap]

    def start(self) -> None:
        """Start it and wait until it listens; RuntimeError (naming why) if it does not."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            wait_until(self.listening, self.start_timeout,
                       f"the built-in back-end listening on {self.socket_path}", self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e} (log: {self.log_path})") from None

    def listening(self) -> bool:
        return unix_socket_listening(self.socket_path)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it; waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
