"""`pymvm status|pause|resume|shutdown|stop SOCK` and `pymvm net SOCK ID`: the CLI clients
against a live API server (a bare machine, served from a loop in another thread)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from pymvm import cli
from pymvm import logging as pymvm_logging
from pymvm.api.server import ApiServer
from pymvm.machine import MachineState

from .test_api import Vm


@pytest.fixture(autouse=True)
def keep_logging_config() -> Iterator[None]:
    """cli.main configures structlog for the process: give later tests theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def pymvm(*argv: str) -> int:
    return cli.main(["--log-level", "error", *argv])


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Vm, str]]:
    # The server thread logs: never into a stream pytest closed after an earlier test.
    pymvm_logging.configure("error", stream=sys.__stderr__)
    vm = Vm()
    path = str(tmp_path / "api.sock")
    loop = asyncio.new_event_loop()
    server = ApiServer(vm.controller, path)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield vm, path
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_status_prints_one_readable_line(served, capsys):
    vm, sock = served
    assert pymvm("status", sock) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("vm1: running, 1 vCPU, 64 MiB, up ")
    assert line.endswith("booted in 1 ms")


def test_status_json_prints_the_api_answer(served, capsys):
    vm, sock = served
    assert pymvm("status", sock, "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running"


def test_pause_and_resume_change_the_machine_state(served, capsys):
    vm, sock = served
    assert pymvm("pause", sock) == 0
    assert vm.machine.state is MachineState.PAUSED
    assert "vm1: paused" in capsys.readouterr().out
    assert pymvm("resume", sock) == 0
    assert vm.machine.state is MachineState.RUNNING


def test_shutdown_and_stop_report_what_happens(served, capsys):
    vm, sock = served
    assert pymvm("shutdown", sock) == 0
    assert vm.keypresses == 1
    assert pymvm("stop", sock) == 0
    assert "exits with status 3" in capsys.readouterr().out


def test_an_api_error_exits_1_with_the_apis_message(served, capsys):
    vm, sock = served
    pymvm("stop", sock)
    assert pymvm("pause", sock) == 1
    err = capsys.readouterr().err
    assert err.startswith("pymvm: error: cannot make the VM paused: it is stopping")
    assert err.strip().endswith("(HTTP 409)") and err.count("\n") == 1


def test_net_link_down_and_show(served, capsys):
    vm, sock = served
    assert pymvm("net", sock, "net0", "--link", "down") == 0
    assert vm.device.link_up is False
    assert pymvm("net", sock, "net0") == 0
    assert "net0: link down (vhost-user on /run/vu.sock)" in capsys.readouterr().out


def test_net_unknown_device_exits_1_naming_the_known_ones(served, capsys):
    vm, sock = served
    assert pymvm("net", sock, "eth7", "--link", "up") == 1
    assert 'no network device with id "eth7" (network devices: net0)' in capsys.readouterr().err


def test_no_server_at_the_socket_is_a_one_line_error_exit_2(tmp_path, capsys):
    assert pymvm("status", str(tmp_path / "none.sock")) == 2
    err = capsys.readouterr().err
    assert err.startswith("pymvm: error: cannot reach the API at ") and err.count("\n") == 1


def test_run_with_a_live_api_socket_is_a_one_line_error_exit_2_before_building(tmp_path, capsys):
    from pymvm.api.server import bind_socket

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))  # only its magic is read before the socket check
    config = tmp_path / "vm.toml"
    config.write_text(f'[boot]\nkernel = "{kernel}"\n[serial]\noutput = "none"\n')
    live = bind_socket(str(tmp_path / "api.sock"))
    try:
        assert pymvm("run", str(config), "--api-sock", str(tmp_path / "api.sock")) == 2
    finally:
        live.close()
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]
    assert err == [f"pymvm: error: API socket {tmp_path / 'api.sock'} is served by another "
                   "running VMM; stop it or choose another --api-sock path"]
