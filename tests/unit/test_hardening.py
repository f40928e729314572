"""Hardening (issue 14): hostile front-ends cannot crash or drain the vhost-user back-end,
and bad configs end in one line. Each test reproduces a defect found by fuzzing."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import structlog

from pymvm.memory import GuestMemory
from pymvm.vhost.user import messages as m
from tests.sockets import accepting
from tests.unit.test_vhost_user_backend import (
    AVAIL,
    DESC,
    MEM_GPA,
    MEM_UVA,
    QSIZE,
    USED,
    Frontend,
    RecordingDevice,
    run_server,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20

# A back-end in its own process, so that a crash (SIGBUS) is visible as the process dying.
BACKEND_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pymvm.logging import configure
    from pymvm.vhost.user.backend import VhostUserServer
    configure("warning")
    from tests.unit.test_vhost_user_backend import RecordingDevice
    server = VhostUserServer(sys.argv[1], RecordingDevice())
    server.listen()
    print("listening", flush=True)
    asyncio.run(server.serve_forever())
""")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def connect(path: str) -> Frontend:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return Frontend(sock)


# ---------------------------------------------------------------------------------------------
# (a) a front-end that shrinks its memory must not kill the back-end (SIGBUS)


@pytest.mark.parametrize("sealable", [False, True], ids=["plain-memfd", "sealable-memfd"])
def test_backend_survives_a_frontend_that_shrinks_its_memfd_under_a_live_ring(
        tmp_path: Path, sealable: bool) -> None:
    path = str(tmp_path / "vu.sock")
    child = subprocess.Popen([sys.executable, "-c", BACKEND_CHILD, path], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    memfd = os.memfd_create("hostile-frontend", flags)
    os.ftruncate(memfd, MIB)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"listening\n"

        async def hostile() -> list[str]:
            notes: list[str] = []
            fe = await connect(path)
            await fe.negotiate()
            kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
            try:
                ack = await fe.request(m.SetMemTable((m.MemoryRegion(MEM_GPA, MIB, MEM_UVA, 0),),
                                                     (memfd,), need_reply=True))
                notes.append(f"mem table ack {getattr(ack, 'status', None)}")
                await fe.request(m.SetVringNum(0, QSIZE))
                await fe.request(m.SetVringAddr(0, 0, MEM_UVA + DESC, MEM_UVA + USED,
                                                MEM_UVA + AVAIL, 0))
                await fe.request(m.SetVringCall(0, call))
                await fe.request(m.SetVringKick(0, kick))
                await fe.request(m.SetVringEnable(0, True, need_reply=True))
            except (m.VhostUserRemoteError, OSError, asyncio.TimeoutError) as e:
                notes.append(f"refused: {e!r}")
            try:
                os.ftruncate(memfd, 0)  # pull the pages out from under the ring
                notes.append("shrunk")
            except PermissionError:
                notes.append("shrink refused by the seal")
            os.eventfd_write(kick, 1)
            await asyncio.sleep(0.5)
            fe.sock.close()
            os.close(kick)
            os.close(call)
            return notes

        notes = asyncio.run(hostile())
        time.sleep(0.2)
        assert child.poll() is None, f"back-end died ({child.returncode}) after {notes}"
        assert os.path.exists(path)
        if sealable:  # the back-end sealed the memfd itself: the shrink could not happen
            assert "shrink refused by the seal" in notes
            assert fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        else:  # an unsealable memfd is refused at SET_MEM_TABLE
            assert any(n.startswith("refused") for n in notes), notes

        async def next_client() -> None:
            fe = await connect(path)
            assert isinstance(await fe.request(m.GetFeatures()), m.FeaturesReply)
            fe.sock.close()

        asyncio.run(next_client())  # and the back-end still serves the next front-end
    finally:
        os.close(memfd)
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_pymvm_guest_memory_is_sealed_against_shrink_and_grow() -> None:
    with GuestMemory(2 * MIB) as mem:
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, MIB)


def test_region_larger_than_its_fd_is_refused_not_mapped(tmp_path: Path) -> None:
    memfd = os.memfd_create("short", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 4096)

    async def body(server, connect_) -> None:
        fe = await connect_()
        await fe.negotiate()
        ack = await fe.request(m.SetMemTable((m.MemoryRegion(MEM_GPA, MIB, MEM_UVA, 0),),
                                             (memfd,), need_reply=True))
        assert ack is None or not getattr(ack, "ok", True)

    try:
        with structlog.testing.capture_logs() as logs:
            # Refused by the back-end (an error or a dropped connection), never a timeout.
            with pytest.raises((m.VhostUserRemoteError, OSError)):
                run_server(tmp_path, RecordingDevice(), body)
    finally:
        os.close(memfd)
    reasons = [e["reason"] for e in logs if e["event"] == "vhost_user.disconnected"]
    assert reasons and "the file has 0x1000" in reasons[0], reasons


# ---------------------------------------------------------------------------------------------
# (b) fds of SET_VRING_KICK/CALL/ERR with an out-of-range index are closed


@pytest.mark.parametrize("request_type", [m.SetVringKick, m.SetVringCall, m.SetVringErr])
def test_vring_fd_with_out_of_range_index_is_closed_not_leaked(tmp_path: Path, request_type) -> None:
    async def body(server, connect_) -> None:
        before = fd_count()
        for index in (2, 7, 255):
            for _ in range(10):
                fe = await connect_()
                await fe.negotiate()
                efd = os.eventfd(0)
                fe.sock.sendmsg(*_encoded(fe, request_type(index, efd)))
                os.close(efd)
                assert await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(fe.sock, 64), 5) == b""
                fe.sock.close()
        await asyncio.sleep(0.05)
        assert fd_count() == before

    run_server(tmp_path, RecordingDevice(), body)


def _encoded(fe: Frontend, msg: m.Request) -> tuple[list[bytes], list]:
    import array

    data, fds = fe.conn.send(msg)
    return [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


# ---------------------------------------------------------------------------------------------
# (c) a kick fd that cannot be polled is a protocol error


@pytest.mark.parametrize("kind", ["dev-null", "regular-file"])
def test_unpollable_kick_fd_is_a_protocol_error(tmp_path: Path, kind: str) -> None:
    from tests.unit.test_vhost_user_backend import GuestRam

    ram = GuestRam()
    kick = os.open("/dev/null" if kind == "dev-null" else str(tmp_path / "f"),
                   os.O_RDWR | os.O_CREAT)

    async def body(server, connect_) -> None:
        fe = await connect_()
        await fe.negotiate()
        dup = os.dup(ram.fd)
        await fe.request(m.SetMemTable((ram.region(),), (dup,)))
        os.close(dup)
        await fe.request(m.SetVringNum(0, QSIZE))
        await fe.request(m.SetVringAddr(0, 0, MEM_UVA + DESC, MEM_UVA + USED, MEM_UVA + AVAIL, 0))
        await fe.request(m.SetVringKick(0, kick))
        # Refused by the back-end (an error or a dropped connection), never a timeout.
        with pytest.raises((m.VhostUserRemoteError, OSError)):
            await fe.request(m.SetVringEnable(0, True, need_reply=True))
        fe.sock.close()
        await asyncio.sleep(0.05)

    try:
        with structlog.testing.capture_logs() as logs:
            run_server(tmp_path, RecordingDevice(), body)
    finally:
        ram.close()
        os.close(kick)
    assert not [e for e in logs if e["event"] == "vhost_user.session_failed"]
    reasons = [e["reason"] for e in logs if e["event"] == "vhost_user.disconnected"]
    assert reasons and reasons[0].startswith("protocol error: kick fd of vring 0 cannot be polled")


# ---------------------------------------------------------------------------------------------
# (d) deeply nested TOML: one line, exit 2


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("value", ["[" * 500 + "]" * 500, "{a = " * 1000 + "1" + "}" * 1000],
                         ids=["array-500", "inline-table-1000"])
def test_deeply_nested_toml_is_one_line_and_exit_2(tmp_path: Path, command: str, value: str) -> None:
    cfg = tmp_path / "deep.toml"
    cfg.write_text(f'id = "deep"\nx = {value}\n')
    out = subprocess.run([sys.executable, "-m", "pymvm.cli", command, str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-500:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymvm: error: ") and "nested too deeply" in lines[0]


# ---------------------------------------------------------------------------------------------
# Line-atomic logs: the VMM and its back-ends share stderr


LOGGER_CHILD = textwrap.dedent("""
    import sys
    import structlog
    from pymvm.logging import configure
    stream = open(sys.argv[1], "a")
    configure("info", stream=stream)
    log = structlog.get_logger()
    for i in range(200):
        log.info("big", who=sys.argv[2], i=i, pad="x" * 20000)
""")


def test_log_lines_of_processes_sharing_a_file_never_interleave(tmp_path: Path) -> None:
    out = tmp_path / "log.jsonl"
    out.touch()
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER_CHILD, str(out), who], cwd=REPO)
             for who in ("a", "b", "c")]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    import json

    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a torn line fails to parse
    assert len(records) == 600 and {r["who"] for r in records} == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------------
# State directory: the next `pymvm run` undoes what a dead VMM recorded, a live one's is kept


def test_next_run_undoes_what_a_dead_vmm_recorded_and_keeps_a_live_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import uuid

    from pyroute2 import IPRoute

    from pymvm import state

    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path))
    tap = f"pvst{uuid.uuid4().hex[:6]}"
    with IPRoute() as ipr:  # persistent, as the built-in back-end's TAP is
        ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
    dead = subprocess.Popen(["true"])
    dead.wait()
    sock = tmp_path / "left.sock"
    sock.touch()
    stale, live = tmp_path / "old.1", tmp_path / "other.2"
    for path, pid in ((stale, dead.pid), (live, os.getpid())):
        path.mkdir()
        (path / state.OWNER).write_text(json.dumps(
            {"pid": pid, "start_time": state.process_start_time(pid), "vm_id": path.name}))
        (path / state.RESOURCES).write_text(
            json.dumps({"kind": "tap", "name": tap, "netns": None}) + "\n"
            + json.dumps({"kind": "socket", "path": str(sock)}) + "\n" if path == stale else "")
    try:
        with state.vm_state("new") as mine:
            state.record("socket", path="/nonexistent")
            assert state.current() is mine
            with IPRoute() as ipr:
                assert not ipr.link_lookup(ifname=tap)
            assert not sock.exists() and not stale.exists() and live.exists()
            assert (mine.path / state.RESOURCES).read_text().count("\n") == 1
        assert not mine.path.exists()  # a clean exit forgets its own records
    finally:
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=tap):
                ipr.link("del", index=ipr.link_lookup(ifname=tap)[0])


# ---------------------------------------------------------------------------------------------
# Least privilege: the built-in back-end runs as an unprivileged user, no capabilities


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def test_builtin_backend_drops_to_an_unprivileged_user_with_no_capabilities_and_still_serves(
        tmp_path: Path) -> None:
    import pwd
    import uuid

    from tests.unit.test_vhost_user_backend import GuestRam

    nobody = pwd.getpwnam("nobody").pw_uid
    path, tap = str(tmp_path / "vu.sock"), f"pvpr{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "vhost-user", "net", "--socket", path,
                             "--tap", tap, "--user", "nobody", "--parent-pid", str(os.getpid())],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ram = GuestRam()
    try:
        deadline = time.monotonic() + 20
        # It listens only once set up (privileges dropped, event loop and seccomp on): wait
        # for the kernel to show its socket accepting, not just for the uid change.
        while _status(proc.pid)["Uid"].split()[0] != str(nobody) or not accepting(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        st = _status(proc.pid)
        assert st["Uid"].split() == [str(nobody)] * 4 and st["Groups"].strip() == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[caps], 16) == 0, (caps, st[caps])
        assert st["NoNewPrivs"].strip() == "1"
        targets = sorted(os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")
                         if int(fd) > 2)
        # Its TAP, its listening socket, and asyncio's own epoll and wake-up socketpair.
        assert [t.split(":")[0] for t in targets] == ["/dev/net/tun", "anon_inode", "socket", "socket",
                                                      "socket"], targets

        async def session() -> None:
            fe = await connect(path)
            await fe.negotiate()  # SET_FEATURES sets the TAP's offloads: no privilege needed
            dup = os.dup(ram.fd)
            ack = await fe.request(m.SetMemTable((ram.region(),), (dup,), need_reply=True))
            os.close(dup)
            assert isinstance(ack, m.Ack) and ack.ok
            fe.sock.close()

        asyncio.run(session())
        assert proc.poll() is None
    finally:
        ram.close()
        proc.terminate()
        proc.wait(10)
    with __import__("pyroute2").IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=tap)
        if idx:  # a non-persistent TAP goes with the back-end's fd
            ipr.link("del", index=idx[0])


# ---------------------------------------------------------------------------------------------
# seccomp: the built-in back-end's allowlist


@pytest.mark.skipif(not __import__("pymvm.syscalls", fromlist=["available"]).available(),
                    reason="libseccomp's Python binding is missing: apt-get install python3-seccomp")
def test_forbidden_syscall_kills_the_filtered_backend_and_the_log_names_it(tmp_path: Path) -> None:
    import json
    import uuid

    path, tap = str(tmp_path / "vu.sock"), f"pvsc{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "vhost-user", "net", "--socket",
                             path, "--tap", tap, "--user", "nobody"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYMVM_SECCOMP_SELF_TEST": "backend"})
    # The self-test kills it right after its filter is installed, before it listens: until
    # then a front-end is refused (and retries), never accepted by a back-end still setting up.
    accepted = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            accepted += 1
        except OSError:
            pass
        finally:
            probe.close()
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == -signal.SIGSYS, stderr[-3000:]
    assert accepted == 0, "a front-end was accepted before the back-end's filter was in place"
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "seccomp_installed" and e["process"] == "vhost-user-backend" for e in logs)
    (violation,) = [e for e in logs if e["event"] == "seccomp_violation"]
    assert violation["syscall"] == "reboot" and violation["process"] == "vhost-user-backend"


def test_seccomp_doc_lists_every_allowed_syscall_with_its_reason() -> None:
    from pymvm import syscalls

    doc = (REPO / "docs" / "seccomp.md").read_text()
    for allow in (syscalls.PYTHON_RUNTIME, syscalls.BACKEND, syscalls.VMM):
        for name, why in allow.items():
            assert f"| `{name}` | {why} |" in doc, f"docs/seccomp.md lacks {name}: regenerate its tables"


# ---------------------------------------------------------------------------------------------
# Found by bench/fuzz (virtqueue harness): a used ring laid over the available ring made
# pop_writable give dropped chains back into the avail ring and loop forever


@pytest.mark.parametrize("over", ["available ring", "descriptor table"])
def test_used_ring_overlapping_the_driver_areas_is_refused(over: str) -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue, VirtQueueError

    ram = bytearray(0x4000)
    memory = GuestMemoryMap([(0x1000, memoryview(ram))])
    desc, avail = 0x1000, 0x2000
    used = avail + 4 if over == "available ring" else desc + 0x40
    with pytest.raises(VirtQueueError, match=f"overlaps the {over}"):
        VirtQueue(memory, 16, desc, avail, used)
    VirtQueue(memory, 16, desc, avail, 0x3000).release()  # apart: fine
    memory.release()


def test_pop_writable_gives_back_bad_chains_and_returns_when_the_ring_is_drained() -> None:
    import struct

    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue

    ram = bytearray(0x4000)
    memory = GuestMemoryMap([(0x1000, memoryview(ram))])
    queue = VirtQueue(memory, 8, 0x1000, 0x2000, 0x3000)
    for i in range(8):  # eight one-byte writable buffers: all shorter than the device needs
        struct.pack_into("<QIHH", ram, 16 * i, 0x1800, 1, 2, 0)
        struct.pack_into("<H", ram, 0x1000 + 4 + 2 * i, i)
    struct.pack_into("<H", ram, 0x1000 + 2, 8)
    views: list = []
    assert queue.pop_writable(views, [], [], 1 << 16, 64) == 0 and views == []
    assert queue.dropped_chains == 8 and queue.last_avail_idx == 8
    assert struct.unpack_from("<H", ram, 0x2000 + 2)[0] == 8  # all given back, used idx 8
    queue.release()
    memory.release()


# Found by bench/fuzz (config harness): "~name/..." for an unknown user raised RuntimeError
# (a traceback and exit 1) instead of a one-line error.


@pytest.mark.parametrize("command", ["validate", "run"])
def test_path_under_an_unknown_users_home_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text('id = "x"\n[boot]\nkernel = "~nosuchuser-pymvm/vmlinux"\n')
    out = subprocess.run([sys.executable, "-m", "pymvm.cli", command, str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "~nosuchuser-pymvm names no user" in lines[0]


def test_run_without_the_seccomp_binding_is_one_line_exit_2_before_building(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from pymvm import cli, syscalls
    from tests.unit.test_boot import make_elf

    def missing():
        raise syscalls.SeccompError("libseccomp's Python binding is not installed: apt-get install "
                                    "python3-seccomp (or turn the filters off: --no-seccomp)")

    monkeypatch.setattr(syscalls, "_load_binding", missing)
    monkeypatch.setenv("PYMVM_STATE_DIR", str(tmp_path / "state"))
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(0x1000000, b"\xf4", 0x1000)], 0x1000000))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'id = "x"\n[boot]\nkernel = "{kernel}"\n[serial]\noutput = "none"\n')
    assert cli.main(["run", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("{")]
    assert err == ["pymvm: error: libseccomp's Python binding is not installed: apt-get install "
                   "python3-seccomp (or turn the filters off: --no-seccomp)"]
    assert not (tmp_path / "state").exists()  # nothing was built, nothing recorded


def test_cleanup_removes_a_dead_vmms_api_socket_but_not_one_bound_there_since(tmp_path: Path) -> None:
    import json

    from pymvm import state

    dead = subprocess.Popen(["true"])
    dead.wait()
    sockets = []
    for name in ("mine.sock", "rebound.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        sockets.append(s)
    ino = os.stat(tmp_path / "mine.sock").st_ino
    vm_dir = tmp_path / "state" / "old.1"
    vm_dir.mkdir(parents=True)
    (vm_dir / state.OWNER).write_text(json.dumps({"pid": dead.pid, "start_time": None, "vm_id": "old"}))
    (vm_dir / state.RESOURCES).write_text("".join(
        json.dumps({"kind": "socket", "path": str(tmp_path / n), "ino": i}) + "\n"
        # the dead VMM's inode at both paths: rebound.sock is another file now
        for n, i in (("mine.sock", ino), ("rebound.sock", ino))))
    try:
        state.cleanup_stale(tmp_path / "state")
        assert not (tmp_path / "mine.sock").exists()
        assert (tmp_path / "rebound.sock").exists()  # another VMM's now: left alone
        assert not vm_dir.exists()
    finally:
        for s in sockets:
            s.close()
