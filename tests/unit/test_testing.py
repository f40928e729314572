"""pymvm.testing without a Linux guest: MicroVM against a fake VMM (a process that prints the
console lines and runs the real guest agent on a UNIX socket), its failure modes and their
messages, `pymvm exec`'s errors, and the pytest plugin's cheap import and skip reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from pymvm.images.agent import build_agent
from pymvm.images.initramfs import READY_MARKER
from pymvm.testing import vm as vm_module
from pymvm.testing.agent import unix_connector
from pymvm.testing.vm import AgentGone, GuestNotReady, MicroVM, MicroVMError, VmmDied

pytest_plugins = ["pytester"]

FAKE_VMM = textwrap.dedent("""
    import os, sys, time
    mode, agent, sock = sys.argv[1:4]
    print("Linux version 6.12-fake (console line)", flush=True)
    print('{"event": "vm_starting", "level": "info"}', file=sys.stderr, flush=True)
    if mode == "die":
        print('{"event": "vm_build_failed", "error": "vsock.cid = 7 is already in use"}',
              file=sys.stderr, flush=True)
        sys.exit(2)
    if mode == "hang":
        time.sleep(600)
    if mode == "split":  # the marker line in pieces, after more console than one read
        print("x" * 100000, flush=True)
        for piece in ("{ready}"[:5], "{ready}"[5:] + " cp", "us=1\\n"):
            sys.stdout.write(piece)
            sys.stdout.flush()
            time.sleep(0.05)
        os.execv(agent, [agent, "--unix", sock])
    print("{ready} cpus=1", flush=True)
    os.execv(agent, [agent, "--unix", sock])
""").replace("{ready}", READY_MARKER)


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    return build_agent(tmp_path_factory.mktemp("agent-cache"))


@pytest.fixture
def fake_vm(tmp_path: Path, agent_binary: Path, monkeypatch):
    """MicroVM(mode=...) whose `pymvm run` is the fake VMM above."""
    script = tmp_path / "fake_vmm.py"
    script.write_text(FAKE_VMM)
    sock = tmp_path / "agent.sock"
    made: list[MicroVM] = []

    def make(mode: str, **kwargs) -> MicroVM:
        kernel = tmp_path / "vmlinux"
        kernel.write_bytes(b"\x7fELF")
        vm = MicroVM(kernel=kernel, initrd=kernel, workdir=tmp_path / f"vm-{len(made)}",
                     **kwargs)

        def spawn(argv):
            console = open(vm.console_path, "wb")
            log = open(vm.log_path, "wb")
            with console, log:
                return subprocess.Popen([sys.executable, str(script), mode, str(agent_binary),
                                         str(sock)], stdout=console, stderr=log)

        monkeypatch.setattr(vm, "_spawn", spawn)
        made.append(vm)
        return vm

    monkeypatch.setattr(vm_module, "vsock_connector", lambda cid, port: unix_connector(sock))
    yield make
    for vm in made:
        vm.close()


def test_toml_has_the_machine_the_vsock_cid_and_the_nets(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    vm = MicroVM(kernel=kernel, initrd=kernel, vcpus=2, memory_mib=128, cid=77,
                 net=[{"tap": "t0", "ip": "10.0.0.2/24"}], workdir=tmp_path)
    data = tomllib.loads(vm._toml)
    assert data["machine"] == {"vcpus": 2, "memory_mib": 128}
    assert data["vsock"] == {"cid": 77} and vm.cid == 77
    assert data["net"] == [{"backend": "vhost-net", "tap": "t0", "ip": "10.0.0.2/24"}]
    assert data["serial"]["output"] == "stdout"


def test_default_cid_is_derived_from_a_unique_vm_id(tmp_path: Path) -> None:
    from pymvm.config import default_vsock_cid

    k = tmp_path / "k"
    a, b = MicroVM(kernel=k, initrd=k, workdir=tmp_path / "a"), MicroVM(kernel=k, initrd=k, workdir=tmp_path / "b")
    assert a.id != b.id and a.cid != b.cid
    assert a.cid == default_vsock_cid(a.id) and a.cid >= 3


def test_from_toml_adds_a_vsock_table_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('id = "mine"\n[boot]\nkernel = "vmlinux"\n')
    vm = MicroVM.from_toml(path)
    data = tomllib.loads(vm._toml)
    assert data["boot"] == {"kernel": "vmlinux"} and data["id"] == "mine"
    assert vm.cid == data["vsock"]["cid"] >= 3
    assert vm.config_path.parent == tmp_path  # relative paths resolve as in the original


def test_run_put_get_through_the_agent_of_a_ready_guest(fake_vm) -> None:
    with fake_vm("ready") as vm:
        result = vm.run("echo hello; echo oops >&2; exit 4")
        assert (result.returncode, result.stdout, result.stderr) == (4, "hello\n", "oops\n")
        target = str(vm.workdir / "f.bin")
        vm.put(b"\x00\xffdata", target)
        assert vm.get(target) == b"\x00\xffdata"
        assert "Linux version 6.12-fake" in vm.console


def test_ready_marker_written_in_pieces_after_a_long_console_is_found(fake_vm) -> None:
    with fake_vm("split") as vm:
        assert vm.run("echo up").stdout == "up\n"
        assert vm.console.endswith(f"{READY_MARKER} cpus=1\n")


def test_vmm_that_exits_during_boot_raises_vmm_died_with_its_log(fake_vm) -> None:
    vm = fake_vm("die")
    with pytest.raises(VmmDied) as info:
        vm.start()
    e = info.value
    assert "pymvm run exited with status 2 before the guest was ready" in str(e)
    assert "vsock.cid = 7 is already in use" in e.vmm_log_tail and e.vmm_log_tail in str(e)
    assert "Linux version 6.12-fake" in e.console_tail


def test_guest_that_never_gets_ready_raises_guest_not_ready_with_the_console(fake_vm) -> None:
    vm = fake_vm("hang", boot_timeout=1.0)
    with pytest.raises(GuestNotReady, match=r"did not answer within 1 s") as info:
        vm.start()
    assert "Linux version 6.12-fake" in info.value.console_tail
    assert vm.poll() is not None  # the hung VMM was killed


def test_vmm_dying_under_a_running_test_raises_vmm_died(fake_vm) -> None:
    with fake_vm("ready") as vm:
        vm._proc.kill()
        vm._proc.wait()
        with pytest.raises(VmmDied, match=r"run\('true'\) failed: the VMM exited with status -9"):
            vm.run("true")


def test_agent_gone_while_the_vmm_runs_raises_agent_gone(fake_vm, monkeypatch, tmp_path) -> None:
    with fake_vm("ready") as vm:
        # The VMM lives on but nothing answers where the agent was.
        monkeypatch.setattr(vm._agent, "_connect", unix_connector(tmp_path / "nothing.sock"))
        with pytest.raises(AgentGone, match="no guest agent at") as info:
            vm.run("true")
        assert "Linux version 6.12-fake" in info.value.console_tail


def test_use_before_start_says_how_to_start(tmp_path: Path) -> None:
    k = tmp_path / "k"
    vm = MicroVM(kernel=k, initrd=k, workdir=tmp_path)
    with pytest.raises(MicroVMError, match="not started: use it in a with block"):
        vm.run("true")


def test_close_keeps_console_and_log_readable_after_the_files_are_gone(fake_vm) -> None:
    vm = fake_vm("ready").start()
    vm.close()
    assert "Linux version 6.12-fake" in vm.console and "vm_starting" in vm.vmm_log


# ---- pymvm exec -----------------------------------------------------------------------------


def test_exec_without_an_api_is_a_one_line_usage_error(tmp_path: Path) -> None:
    from pymvm.cli import main

    with pytest.raises(SystemExit) as info:
        sys.exit(main(["exec", str(tmp_path / "none.sock"), "--", "true"]))
    assert info.value.code == 2


def test_exec_finds_no_vsock_device_and_says_to_add_one(monkeypatch) -> None:
    from pymvm.api import client
    from pymvm.testing.exec import ExecError, guest_cid

    monkeypatch.setattr(client, "request", lambda *a, **k: {"devices": [{"type": "net", "id": "eth0"}]})
    with pytest.raises(ExecError, match=r"has no vsock device: add a \[vsock\] table"):
        guest_cid("/x.sock")
    monkeypatch.setattr(client, "request",
                        lambda *a, **k: {"devices": [{"type": "vsock", "vsock": {"cid": 41}}]})
    assert guest_cid("/x.sock") == 41


def test_exec_passes_the_status_and_output_through(monkeypatch, capfd, tmp_path, agent_binary) -> None:
    from pymvm.testing import exec as exec_module

    sock = tmp_path / "a.sock"
    agent = subprocess.Popen([str(agent_binary), "--unix", str(sock)])
    try:
        from tests.sockets import wait_accepting

        wait_accepting(sock, agent)  # its socket file exists from bind(), before listen()
        monkeypatch.setattr(exec_module, "guest_cid", lambda s: 5)
        from pymvm.testing import agent as agent_module

        monkeypatch.setattr(agent_module, "vsock_connector", lambda cid, port: unix_connector(sock))
        rc = exec_module.exec_in_vm("/x.sock", ["sh", "-c", "echo out; echo err >&2; exit 6"])
        assert rc == 6
        assert exec_module.exec_in_vm("/x.sock", ["sleep", "5"], timeout=0.2) == 124
        assert exec_module.exec_in_vm("/x.sock", ["sh", "-c", "kill -KILL $$"]) == 128 + 9
        out, err = capfd.readouterr()
        assert out == "out\n" and err.startswith("err\n") and "timed out after 0.2 s" in err
    finally:
        agent.terminate()
        agent.wait()


# ---- the pytest plugin ----------------------------------------------------------------------


def test_plugin_import_loads_nothing_of_the_vm_machinery() -> None:
    code = ("import sys, pymvm.testing.plugin, pymvm.testing; "
            "heavy = [m for m in ('pymvm.testing.vm', 'pymvm.vmm', 'pymvm.nested', 'aiohttp') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plugin_is_registered_through_the_pytest11_entry_point() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("pymvm") == "pymvm.testing.plugin"


def test_fixtures_skip_where_linux_cannot_boot_naming_the_nested_runner(pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYMVM_NESTED", "always")
    pytester.makepyfile("""
        def test_one(microvm):
            raise AssertionError("must not run")

        def test_two(microvm_factory):
            raise AssertionError("must not run")
    """)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*python -m pymvm.nested -- pytest ...*"])


def test_plugin_options_are_offered(pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--pymvm-kernel=PATH*", "*--pymvm-initrd=PATH*"])


def test_fork_cli_runs_the_cli_in_a_child_with_its_own_stdio_and_exit_status(tmp_path) -> None:
    from pymvm.testing.vm import fork_cli

    out = (tmp_path / "out").open("w+b")
    err_r, err_w = os.pipe()
    pid = fork_cli(["run", str(tmp_path / "missing.toml")], out.fileno(), err_w,
                   new_session=True, close_fds=(err_r, err_w))
    os.close(err_w)
    with os.fdopen(err_r, "rb") as err:
        stderr = err.read().decode()  # EOF: the child closed its copies of the pipe
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2
    assert "missing.toml" in stderr and len(stderr.strip().splitlines()) == 1


def test_fork_cli_child_imports_without_pytest_assertion_rewriting(tmp_path, monkeypatch) -> None:
    # The CI failure this guards against: a SIGTERM during a lazy import in the child that
    # pytest was rewriting became a SystemError (exit 1) instead of a clean stop (143).
    import pymvm.cli
    from pymvm.testing.vm import fork_cli

    assert any(type(f).__name__ == "AssertionRewritingHook" for f in sys.meta_path), \
        "precondition: pytest rewrites pymvm's modules in this process"

    def report_finders(argv):
        print(" ".join(getattr(f, "__name__", type(f).__name__) for f in sys.meta_path))
        return 7

    monkeypatch.setattr(pymvm.cli, "main", report_finders)
    out = (tmp_path / "out").open("w+b")
    pid = fork_cli(["run", "x.toml"], out.fileno(), out.fileno())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    out.seek(0)
    finders = out.read().decode().split()
    assert "PathFinder" in finders and "AssertionRewritingHook" not in finders
