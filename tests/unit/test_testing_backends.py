"""pymvm.testing.backends: the built-in back-end as a process that tests start, kill, restart."""

from __future__ import annotations

import signal
import socket
import sys

import pytest

from pymvm.testing.backends import BuiltinNetProcess


def test_builtin_net_process_runs_the_cli_back_end_on_the_socket_and_tap() -> None:
    p = BuiltinNetProcess("/run/x.sock", "tap7", "/dev/null", log_level="warning")
    assert p.argv() == [sys.executable, "-m", "pymvm.cli", "--log-level", "warning", "vhost-user",
                        "net", "--socket", "/run/x.sock", "--tap", "tap7"]
    assert "--log-level" not in BuiltinNetProcess("/s", "t", "/dev/null").argv()


def test_builtin_net_process_that_exits_at_start_fails_naming_its_status_and_log(tmp_path) -> None:
    # Its socket's directory does not exist: the back-end refuses and exits 2.
    p = BuiltinNetProcess(tmp_path / "missing" / "net.sock", "pmtbx0", tmp_path / "log",
                          start_timeout=120)
    with pytest.raises(RuntimeError, match=r"exited with status 2 \(log: .*log\)"):
        p.start()
    assert (tmp_path / "log").read_text().strip()  # its error went to the log


def test_builtin_net_process_listening_probe_and_kill(tmp_path) -> None:
    path = tmp_path / "s.sock"
    p = BuiltinNetProcess(path, "t", tmp_path / "log", start_timeout=0.3)
    assert not p.listening()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    try:
        assert p.listening()
    finally:
        server.close()
    import subprocess

    p.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p.kill()
    assert p.proc.returncode == -signal.SIGKILL
    p.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p.stop()
    assert p.proc.returncode == -signal.SIGTERM
