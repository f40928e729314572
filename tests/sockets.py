"""UNIX-socket readiness shared by the unit tests: a server's socket file exists from its
bind(), but a connect() is refused until its listen(), so tests wait for the listen."""

from __future__ import annotations

import os
import subprocess
import time


def accepting(path: str | os.PathLike[str]) -> bool:
    """Whether a UNIX socket bound at ``path`` is listening (``__SO_ACCEPTCON`` in
    /proc/net/unix)."""
    path = os.fspath(path)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_accepting(path: str | os.PathLike[str], proc: subprocess.Popen | None = None,
                   timeout: float = 20.0) -> None:
    """Until ``path`` accepts connections; fails if ``proc`` ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not accepting(path):
        assert proc is None or proc.poll() is None, f"{proc.args} ended with {proc.returncode}"
        assert time.monotonic() < deadline, f"nothing listening on {path} after {timeout:g} s"
        time.sleep(0.01)
