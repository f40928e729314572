"""The guest agent's protocol, host side (docs/agent.md): the codec without sockets, the client
against a fake agent that misbehaves, and the real agent (built from pymvm/images/agent) served
on a UNIX socket on this host: exec, stdin, stdout/stderr, status, signals, timeouts, env, cwd,
files both ways, binary data, concurrency and errors."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pymvm.images.agent import AgentBuildError, build_agent
from pymvm.testing.agent import (
    CHUNK,
    EXEC,
    FLAG_CLEAR_ENV,
    FLAG_SHELL,
    FLAG_STDIN,
    MAX_FRAME,
    AgentClient,
    AgentError,
    AgentProtocolError,
    AgentRemoteError,
    AgentUnreachable,
    CommandFailed,
    FrameDecoder,
    data_frames,
    decode_result,
    encode_exec,
    encode_get,
    encode_put,
    frame,
    unix_connector,
)
from tests.sockets import wait_accepting

# ---- codec ------------------------------------------------------------------------------------


def test_frame_is_type_byte_then_big_endian_length_then_payload() -> None:
    assert frame(b"O", b"hi") == b"O\x00\x00\x00\x02hi"
    assert frame(b"D") == b"D\x00\x00\x00\x00"


def test_frame_larger_than_the_limit_is_refused() -> None:
    with pytest.raises(AgentProtocolError, match="exceeds"):
        frame(b"D", bytes(MAX_FRAME + 1))


def test_exec_request_layout_shell_string_env_cwd_timeout() -> None:
    raw = encode_exec("echo $X", env={"X": "1"}, cwd="/tmp", timeout=1.5, stdin=True)
    kind, length = struct.unpack(">cI", raw[:5])
    body = raw[5:]
    assert kind == EXEC and length == len(body)
    flags, timeout_ms = struct.unpack(">II", body[:8])
    assert flags == FLAG_SHELL | FLAG_STDIN and timeout_ms == 1500
    assert body[8:] == (struct.pack(">II", 1, 7) + b"echo $X" + struct.pack(">II", 1, 3) + b"X=1"
                        + struct.pack(">I", 4) + b"/tmp")


def test_exec_argv_is_sent_as_separate_strings_with_clear_env() -> None:
    body = encode_exec(["printf", "%s", "a b"], clear_env=True)[5:]
    flags, timeout_ms, argc = struct.unpack(">III", body[:12])
    assert flags == FLAG_CLEAR_ENV and timeout_ms == 0 and argc == 3


@pytest.mark.parametrize("bad", [["a\0b"], [], "x\0"])
def test_unsendable_commands_are_refused_before_sending(bad) -> None:
    with pytest.raises(AgentError):
        encode_exec(bad)


@pytest.mark.parametrize("env", [{"A=B": "1"}, {"": "1"}])
def test_bad_environment_names_are_refused(env) -> None:
    with pytest.raises(AgentError, match="environment variable name"):
        encode_exec("true", env=env)


def test_non_positive_timeout_is_refused() -> None:
    with pytest.raises(AgentError, match="timeout must be positive"):
        encode_exec("true", timeout=0)


def test_put_and_get_requests_carry_mode_and_path() -> None:
    assert encode_put("/f", 0o755)[5:] == struct.pack(">II", 0o755, 2) + b"/f"
    assert encode_get("/f")[5:] == struct.pack(">I", 2) + b"/f"
    with pytest.raises(AgentError):
        encode_get("")


def test_data_is_chunked_and_ended_by_an_empty_frame() -> None:
    data = os.urandom(2 * CHUNK + 5)
    frames = list(data_frames(data))
    assert len(frames) == 4 and frames[-1] == frame(b"D")
    decoder = FrameDecoder()
    got = [p for f in frames for _, p in decoder.feed(f)]
    assert b"".join(got) == data


def test_decoder_reassembles_frames_fed_one_byte_at_a_time() -> None:
    stream = frame(b"O", b"\x00\xffbinary\n") + frame(b"e", b"err") + frame(b"R", b"\0\0\0\0\x07")
    decoder = FrameDecoder()
    out = []
    for byte in stream:
        out += decoder.feed(bytes([byte]))
    assert out == [(b"O", b"\x00\xffbinary\n"), (b"e", b"err"), (b"R", b"\0\0\0\0\x07")]
    assert decoder.pending == 0


def test_decoder_refuses_unknown_types_and_oversized_frames() -> None:
    with pytest.raises(AgentProtocolError, match="unexpected frame type"):
        FrameDecoder().feed(b"Z\0\0\0\0")
    with pytest.raises(AgentProtocolError, match="limit"):
        FrameDecoder().feed(b"O" + struct.pack(">I", MAX_FRAME + 1))


def test_result_decoding_checks_length_and_kind() -> None:
    assert decode_result(b"\x01" + struct.pack(">i", 9)) == (1, 9)
    with pytest.raises(AgentProtocolError):
        decode_result(b"\x00")
    with pytest.raises(AgentProtocolError, match="unknown result kind"):
        decode_result(b"\x07\0\0\0\0")


# ---- the client against a fake agent ----------------------------------------------------------


def fake_agent(tmp_path: Path, reply: bytes, close: bool = True) -> AgentClient:
    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    kept: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(reply)
        if close:
            conn.close()
        else:
            kept.append(conn)  # stays open (and silent) until the test ends
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    client = AgentClient(unix_connector(path), io_timeout=5)
    client.kept = kept  # type: ignore[attr-defined]  # the silent connection lives as long
    return client


def test_agent_closing_without_a_result_is_an_error_that_says_so(tmp_path: Path) -> None:
    client = fake_agent(tmp_path, frame(b"O", b"partial"))
    with pytest.raises(AgentError, match="closed the connection without a result"):
        client.run("true")


def test_agent_closing_inside_a_frame_is_a_protocol_error(tmp_path: Path) -> None:
    client = fake_agent(tmp_path, b"O\0\0\0\x10abc")
    with pytest.raises(AgentProtocolError, match="inside a frame"):
        client.run("true")


def test_unexpected_frame_for_the_request_is_a_protocol_error(tmp_path: Path) -> None:
    client = fake_agent(tmp_path, frame(b"D", b"x"))
    with pytest.raises(AgentProtocolError, match="while a command runs"):
        client.run("true")


def test_agent_error_frame_becomes_agent_remote_error(tmp_path: Path) -> None:
    client = fake_agent(tmp_path, frame(b"X", b"cannot read /nope: No such file or directory"))
    with pytest.raises(AgentRemoteError, match="cannot read /nope"):
        client.get("/nope")


def test_silent_agent_times_out(tmp_path: Path) -> None:
    client = fake_agent(tmp_path, b"", close=False)
    client.io_timeout = 0.3
    with pytest.raises(AgentError, match="did not answer in time"):
        client.run("true")


def test_nothing_listening_is_agent_unreachable(tmp_path: Path) -> None:
    client = AgentClient(unix_connector(tmp_path / "none.sock"))
    with pytest.raises(AgentUnreachable, match="no guest agent at"):
        client.ping()


# ---- the real agent on a UNIX socket --------------------------------------------------------


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    try:
        return build_agent(tmp_path_factory.mktemp("agent-cache"))
    except AgentBuildError as e:  # gcc/libc6-dev come from scripts/setup
        pytest.fail(f"the guest agent must build on this host: {e}")


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path):
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen([str(agent_binary), "--unix", str(path)])
    wait_accepting(path, proc)  # its socket file exists from bind(), before listen()
    client = AgentClient(unix_connector(path), io_timeout=30)
    assert client.ping() == 1
    yield client
    proc.terminate()
    proc.wait(5)


def test_agent_binary_is_static(agent_binary: Path) -> None:
    from pymvm.images.initramfs import elf_interpreter

    assert elf_interpreter(agent_binary.read_bytes()) is None


def test_stdout_stderr_and_exit_status_come_back_separately(agent: AgentClient) -> None:
    r = agent.run("echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert r.signal is None and not r.timed_out


def test_argv_is_not_split_by_a_shell(agent: AgentClient) -> None:
    r = agent.run(["printf", "[%s]", "a b", "$HOME", "*"])
    assert r.stdout == "[a b][$HOME][*]" and r.returncode == 0


def test_binary_stdin_goes_through_unchanged(agent: AgentClient) -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\0\n\xff"
    r = agent.run(["cat"], input=data)
    assert r.returncode == 0 and r.stdout_bytes == data


def test_command_without_stdin_reads_eof(agent: AgentClient) -> None:
    assert agent.run("wc -c").stdout.strip() == "0"


def test_environment_and_working_directory(agent: AgentClient, tmp_path: Path) -> None:
    r = agent.run('echo "$GREETING $PWD"', env={"GREETING": "hello there"}, cwd=str(tmp_path))
    assert r.stdout == f"hello there {tmp_path}\n"
    cleared = agent.run(["/usr/bin/env"], env={"ONLY": "1"}, clear_env=True)
    assert cleared.stdout == "ONLY=1\n"


def test_missing_working_directory_is_status_127_with_the_reason(agent: AgentClient) -> None:
    r = agent.run("true", cwd="/nonexistent-dir")
    assert r.returncode == 127 and "cannot change to directory /nonexistent-dir" in r.stderr


def test_missing_program_is_status_127_with_the_reason(agent: AgentClient) -> None:
    r = agent.run(["no-such-program-here"])
    assert r.returncode == 127 and "cannot run no-such-program-here" in r.stderr


def test_signal_death_is_reported_as_negative_returncode(agent: AgentClient) -> None:
    r = agent.run("kill -TERM $$")
    assert r.signal == 15 and r.returncode == -15 and not r.timed_out


def test_timeout_kills_the_commands_whole_process_group(agent: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    start = time.monotonic()
    r = agent.run(f"sleep 60 & echo $! > {pidfile}; sleep 60", timeout=0.5)
    assert r.timed_out and r.signal == 9 and r.returncode == -9
    assert time.monotonic() - start < 10
    bg = int(pidfile.read_text())
    for _ in range(100):  # the background sleep was in the group: it dies too
        try:
            os.kill(bg, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the background process outlived the timeout")


def test_check_raises_command_failed_with_stderr(agent: AgentClient) -> None:
    with pytest.raises(CommandFailed, match="exited with 2: boom"):
        agent.run("echo boom >&2; exit 2", check=True)


def test_background_process_holding_stdout_does_not_delay_the_result(agent: AgentClient) -> None:
    start = time.monotonic()
    r = agent.run("sleep 5 & echo done")
    assert r.stdout == "done\n" and time.monotonic() - start < 4


def test_file_put_get_round_trip_is_binary_exact(agent: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 7)
    target = tmp_path / "blob"
    agent.put(data, str(target), mode=0o600)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert target.stat().st_mode & 0o777 == 0o600
    assert agent.get(str(target)) == data


def test_empty_file_round_trip(agent: AgentClient, tmp_path: Path) -> None:
    agent.put(b"", str(tmp_path / "empty"))
    assert agent.get(str(tmp_path / "empty")) == b""


def test_get_of_a_missing_file_names_the_path_and_reason(agent: AgentClient) -> None:
    with pytest.raises(AgentRemoteError, match="cannot read /no/such/file: No such file"):
        agent.get("/no/such/file")


def test_get_of_a_directory_is_refused(agent: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRemoteError, match="Is a directory"):
        agent.get(str(tmp_path))


def test_put_into_a_missing_directory_names_the_path(agent: AgentClient) -> None:
    with pytest.raises(AgentRemoteError, match="cannot write /no/such/dir/f"):
        agent.put(b"x", "/no/such/dir/f")


def test_requests_are_served_concurrently(agent: AgentClient) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = agent.run(f"sleep 0.5; echo {i}").stdout

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(20)}
    assert time.monotonic() - start < 5  # serially it would take 10 s


def raw_exchange(client: AgentClient, data: bytes) -> list[tuple[bytes, bytes]]:
    with client._open() as sock:
        sock.sendall(data)
        decoder = FrameDecoder()
        frames = []
        while chunk := sock.recv(65536):
            frames += decoder.feed(chunk)
        return frames


def test_unknown_request_type_gets_an_error_frame(agent: AgentClient) -> None:
    frames = raw_exchange(agent, b"Z\0\0\0\0")
    assert frames == [(b"X", b"unknown request type 0x5a; expected E, P, G or V")]


def test_oversized_request_frame_gets_an_error_frame(agent: AgentClient) -> None:
    frames = raw_exchange(agent, b"E" + struct.pack(">I", MAX_FRAME + 1))
    assert frames[0][0] == b"X" and b"larger than the limit" in frames[0][1]


def test_malformed_exec_request_gets_an_error_frame(agent: AgentClient) -> None:
    frames = raw_exchange(agent, frame(b"E", struct.pack(">II", 0, 0) + struct.pack(">I", 99)))
    assert frames == [(b"X", b"malformed exec request")]


def test_client_going_away_kills_the_running_command(agent: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    sock = agent._open()
    sock.sendall(encode_exec(f"echo $$ > {pidfile}; exec sleep 60"))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.01)
    pid = int(pidfile.read_text())
    sock.close()
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    pytest.fail("the command outlived its client")


# ---- the agent in the initramfs ---------------------------------------------------------------


def test_initramfs_carries_the_static_agent_and_init_starts_it_on_the_agent_port(tmp_path: Path) -> None:
    from pymvm.images import initramfs
    from pymvm.images.agent import AGENT_PORT, GUEST_PATH

    archive = initramfs.build_initramfs(cache_dir=tmp_path, log=lambda line: None)
    entries = {e.name: e for e in initramfs.read_newc(archive.read_bytes())}
    agent_entry = entries[GUEST_PATH.lstrip("/")]
    assert agent_entry.mode & 0o777 == 0o755
    assert agent_entry.data == build_agent(tmp_path).read_bytes()
    init = entries["init"].data.decode()
    assert "/sbin/pymvm-agent --port \"$agent_port\"" in init
    assert f"agent_port={AGENT_PORT}" in init and "pymvm.agent=1) agent_wait=1" in init


def test_an_edited_agent_source_is_rebuilt_and_changes_the_binary(tmp_path: Path) -> None:
    from pymvm.images.agent import AGENT_SOURCE

    source = tmp_path / "agent.c"
    source.write_text(AGENT_SOURCE.read_text())
    first = build_agent(tmp_path / "cache", source)
    assert build_agent(tmp_path / "cache", source) == first  # cached
    source.write_text(AGENT_SOURCE.read_text().replace("#define PROTOCOL_VERSION 1",
                                                       "#define PROTOCOL_VERSION 2"))
    second = build_agent(tmp_path / "cache", source)
    assert second != first and second.read_bytes() != first.read_bytes()


def test_agent_that_does_not_compile_is_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return undefined_thing; }\n")
    with pytest.raises(AgentBuildError, match="compiling the guest agent failed: .*undefined_thing") as info:
        build_agent(tmp_path / "cache", source)
    assert "\n" not in str(info.value)
