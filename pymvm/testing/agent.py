"""The host side of the guest agent's protocol (docs/agent.md): a sans-IO codec and a
blocking client over one stream socket per request (AF_VSOCK to the guest, or AF_UNIX to an
agent run on the host by the tests).

Frames: 1 byte type, 4 bytes big-endian payload length, payload. Requests: EXEC, PUT, GET,
PING; replies: STDOUT/STDERR chunks, DATA chunks, RESULT, ERROR.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pymvm.images.agent import AGENT_PORT as DEFAULT_PORT  # where /init starts the agent

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # the largest payload either side sends (the agent refuses more)
CHUNK = 64 * 1024

# Frame types (one ASCII byte each).
EXEC, STDIN, PUT, GET, DATA, PING = b"E", b"I", b"P", b"G", b"D", b"V"
STDOUT, STDERR, RESULT, ERROR = b"O", b"e", b"R", b"X"
_REPLY_TYPES = {STDOUT, STDERR, RESULT, ERROR, DATA, PING}

# EXEC flags.
FLAG_SHELL, FLAG_CLEAR_ENV, FLAG_STDIN = 1, 2, 4
# RESULT kinds.
EXITED, SIGNALED, TIMED_OUT = 0, 1, 2

_HEADER = struct.Struct(">cI")


class AgentError(Exception):
    """Talking to the guest agent failed."""


class AgentProtocolError(AgentError):
    """The other side sent something the protocol does not allow."""


class AgentRemoteError(AgentError):
    """The agent refused or failed the request; the message is the agent's."""


class AgentUnreachable(AgentError):
    """No agent answers at the address (not started yet, or gone)."""


# ---- codec --------------------------------------------------------------------------------

def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_FRAME:
        raise AgentProtocolError(f"a {len(payload)}-byte frame exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(kind, len(payload)) + payload


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _string(value: str | bytes, what: str) -> bytes:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if b"\0" in raw:
        raise AgentError(f"{what} contains a NUL byte, which no command line or path can hold")
    return _u32(len(raw)) + raw


def _strings(values: Iterable[str | bytes], what: str) -> bytes:
    items = [_string(v, what) for v in values]
    return _u32(len(items)) + b"".join(items)


def encode_exec(command: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                clear_env: bool = False, cwd: str | None = None, timeout: float | None = None,
                stdin: bool = False) -> bytes:
    """The EXEC frame: a str is run by /bin/sh -c, a sequence is an argv (PATH lookup)."""
    if isinstance(command, str):
        flags, argv = FLAG_SHELL, [command]
    else:
        flags, argv = 0, list(command)
        if not argv:
            raise AgentError("the command is an empty argv; give at least the program")
    if clear_env:
        flags |= FLAG_CLEAR_ENV
    if stdin:
        flags |= FLAG_STDIN
    for key in env or {}:
        if not key or "=" in key:
            raise AgentError(f"environment variable name {key!r} is empty or contains '='")
    timeout_ms = 0
    if timeout is not None:
        if timeout <= 0:
            raise AgentError(f"timeout must be positive, got {timeout}")
        timeout_ms = min(max(1, round(timeout * 1000)), 0xFFFF_FFFF)
    payload = (_u32(flags) + _u32(timeout_ms) + _strings(argv, "the command")
               + _strings([f"{k}={v}" for k, v in (env or {}).items()], "the environment")
               + _string(cwd or "", "the working directory"))
    return frame(EXEC, payload)


def encode_put(path: str, mode: int = 0o644) -> bytes:
    if not path:
        raise AgentError("put needs a guest path")
    return frame(PUT, _u32(mode & 0o7777) + _string(path, "the path"))


def encode_get(path: str) -> bytes:
    if not path:
        raise AgentError("get needs a guest path")
    return frame(GET, _string(path, "the path"))


def data_frames(data: bytes | memoryview, kind: bytes = DATA) -> Iterable[bytes]:
    """``data`` as chunks, then the empty frame that ends it."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        yield frame(kind, bytes(view[start:start + CHUNK]))
    yield frame(kind)


class FrameDecoder:
    """Turns received bytes into (type, payload) frames; checks types and lengths."""

    def __init__(self, allowed: set[bytes] = _REPLY_TYPES) -> None:
        self._buf = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if kind not in self._allowed:
                raise AgentProtocolError(f"unexpected frame type {kind!r} from the agent")
            if length > MAX_FRAME:
                raise AgentProtocolError(f"the agent announced a {length}-byte frame, more than "
                                         f"the {MAX_FRAME}-byte limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def decode_result(payload: bytes) -> tuple[int, int]:
    if len(payload) != 5:
        raise AgentProtocolError(f"a RESULT frame holds 5 bytes, got {len(payload)}")
    kind = payload[0]
    code = struct.unpack(">i", payload[1:])[0]
    if kind not in (EXITED, SIGNALED, TIMED_OUT):
        raise AgentProtocolError(f"unknown result kind {kind}")
    return kind, code


@dataclass(frozen=True)
class RunResult:
    """What a command run in the guest did; like subprocess.CompletedProcess, a command
    killed by a signal has ``returncode`` -N (a timeout: -9 and ``timed_out``)."""

    args: str | tuple[str, ...]
    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    signal: int | None = None
    timed_out: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    def check_returncode(self) -> None:
        if self.returncode != 0:
            raise CommandFailed(self)


class CommandFailed(AgentError):
    """``run(..., check=True)`` and the command did not exit with 0."""

    def __init__(self, result: RunResult) -> None:
        how = ("timed out" if result.timed_out else f"was killed by signal {result.signal}"
               if result.signal else f"exited with {result.returncode}")
        tail = result.stderr.strip().splitlines()[-5:]
        super().__init__(f"guest command {result.args!r} {how}"
                         + (": " + " | ".join(tail) if tail else ""))
        self.result = result


# ---- blocking client ------------------------------------------------------------------------

def vsock_connector(cid: int, port: int = DEFAULT_PORT) -> Callable[[float], socket.socket]:
    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect((cid, port))
        except OSError as e:
            sock.close()
            raise AgentUnreachable(f"no guest agent at vsock CID {cid} port {port}: "
                                   f"{e.strerror or e}") from None
        return sock
    return connect


def unix_connector(path: str | os.PathLike[str]) -> Callable[[float], socket.socket]:
    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as e:
            sock.close()
            raise AgentUnreachable(f"no guest agent at {os.fspath(path)}: {e.strerror or e}") from None
        return sock
    return connect


class AgentClient:
    """One request per connection, so calls from many threads run concurrently."""

    def __init__(self, connect: Callable[[float], socket.socket], *,
                 connect_timeout: float = 10.0, io_timeout: float = 600.0) -> None:
        self._connect = connect
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout

    def _open(self) -> socket.socket:
        sock = self._connect(self.connect_timeout)
        sock.settimeout(self.io_timeout)
        return sock

    @staticmethod
    def _replies(sock: socket.socket) -> Iterable[tuple[bytes, bytes]]:
        decoder = FrameDecoder()
        while True:
            try:
                data = sock.recv(256 * 1024)
            except TimeoutError:
                raise AgentError("the guest agent did not answer in time") from None
            except OSError as e:
                raise AgentError(f"the connection to the guest agent broke: {e.strerror or e}") from None
            if not data:
                if decoder.pending:
                    raise AgentProtocolError("the agent closed the connection inside a frame")
                raise AgentError("the guest agent closed the connection without a result "
                                 "(did the guest reboot or the agent die?)")
            yield from decoder.feed(data)

    def ping(self) -> int:
        """The agent's protocol version."""
        with self._open() as sock:
            sock.sendall(frame(PING))
            for kind, payload in self._replies(sock):
                if kind == PING:
                    return int(payload.decode() or 0)
                if kind == ERROR:
                    raise AgentRemoteError(payload.decode(errors="replace"))
                raise AgentProtocolError(f"unexpected {kind!r} frame in reply to PING")
        raise AssertionError("unreachable")

    def run(self, command: str | Sequence[str], *, input: bytes | str | None = None,
            env: Mapping[str, str] | None = None, clear_env: bool = False,
            cwd: str | None = None, timeout: float | None = None,
            check: bool = False) -> RunResult:
        """Run ``command`` in the guest (a str through /bin/sh -c, a sequence as argv) and
        wait for it; ``timeout`` (seconds) kills its whole process group in the guest."""
        request = encode_exec(command, env=env, clear_env=clear_env, cwd=cwd, timeout=timeout,
                              stdin=input is not None)
        args = command if isinstance(command, str) else tuple(command)
        out, err = bytearray(), bytearray()
        with self._open() as sock:
            if timeout is not None:
                sock.settimeout(timeout + self.io_timeout)
            sock.sendall(request)
            sender = None
            if input is not None:
                raw = input.encode() if isinstance(input, str) else bytes(input)
                # A thread feeds stdin while this one reads the output: neither side can
                # block the other with a full socket buffer.
                sender = threading.Thread(target=_send_quietly,
                                          args=(sock, data_frames(raw, STDIN)), daemon=True)
                sender.start()
            try:
                for kind, payload in self._replies(sock):
                    if kind == STDOUT:
                        out += payload
                    elif kind == STDERR:
                        err += payload
                    elif kind == RESULT:
                        how, code = decode_result(payload)
                        break
                    elif kind == ERROR:
                        raise AgentRemoteError(payload.decode(errors="replace"))
                    else:
                        raise AgentProtocolError(f"unexpected {kind!r} frame while a command runs")
            finally:
                if sender is not None:
                    sender.join(timeout=5)
        if how == EXITED:
            result = RunResult(args, code, bytes(out), bytes(err))
        else:
            result = RunResult(args, -code, bytes(out), bytes(err), signal=code,
                               timed_out=how == TIMED_OUT)
        if check:
            result.check_returncode()
        return result

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated, ``mode``)."""
        with self._open() as sock:
            sock.sendall(encode_put(path, mode))
            for chunk in data_frames(data):
                sock.sendall(chunk)
            for kind, payload in self._replies(sock):
                if kind == RESULT:
                    decode_result(payload)
                    return
                if kind == ERROR:
                    raise AgentRemoteError(payload.decode(errors="replace"))
                raise AgentProtocolError(f"unexpected {kind!r} frame in reply to PUT")

    def get(self, path: str) -> bytes:
        """The content of ``path`` in the guest."""
        data = bytearray()
        ended = False
        with self._open() as sock:
            sock.sendall(encode_get(path))
            for kind, payload in self._replies(sock):
                if kind == DATA and not ended:
                    if payload:
                        data += payload
                    else:
                        ended = True
                elif kind == RESULT and ended:
                    decode_result(payload)
                    return bytes(data)
                elif kind == ERROR:
                    raise AgentRemoteError(payload.decode(errors="replace"))
                else:
                    raise AgentProtocolError(f"unexpected {kind!r} frame in reply to GET")
        raise AssertionError("unreachable")


def _send_quietly(sock: socket.socket, frames: Iterable[bytes]) -> None:
    try:
        for chunk in frames:
            sock.sendall(chunk)
    except OSError:
        pass  # the command ended without reading all of its stdin; its result still comes
