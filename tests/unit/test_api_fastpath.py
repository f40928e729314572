"""The API socket's fast path for plain `GET /vm` (pymvm/api/fastpath.py) and its hand-over
to aiohttp for everything else, over a real UNIX socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from pymvm.api.server import ApiServer

from .test_api import Vm

GET_VM = b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n"


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """(status line, headers, body) of the next answer; leftovers stay in ``buf``."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {bytes(buf)!r}"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).split(b"\r\n")
    del buf[:end + 4]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode().partition(":")
        headers[name] = value.strip()
    length = int(headers["Content-Length"])
    while len(buf) < length:
        chunk = sock.recv(65536)
        assert chunk
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return lines[0], headers, body


def serve(tmp_path, client: Callable[[str, ApiServer], Any], vm: Vm | None = None) -> Any:
    """Run ``client(socket path, server)`` in a thread while the server runs on a loop."""
    vm = vm or Vm()
    server = ApiServer(vm.controller, str(tmp_path / "api.sock"))

    async def main() -> Any:
        await server.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, client, server.path,
                                                                    server)
        finally:
            await server.close()

    return asyncio.run(main())


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_fast_answer_to_get_vm_matches_aiohttps_answer(tmp_path) -> None:
    def client(path: str, server: ApiServer):
        fast, slow = connect(path), connect(path)
        with fast, slow:
            fast.sendall(GET_VM)
            fast_answer = read_answer(fast, bytearray())
            # A query string is not the plain request: aiohttp answers it (same route).
            slow.sendall(b"GET /vm?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            slow_answer = read_answer(slow, bytearray())
            return fast_answer, slow_answer, len(server._fast_connections)

    (f_status, f_headers, f_body), (s_status, s_headers, s_body), fast_open = serve(tmp_path, client)
    assert fast_open == 1  # only the first connection stayed on the fast path
    assert f_status == s_status == b"HTTP/1.1 200 OK"
    assert list(f_headers) == list(s_headers)  # same headers in the same order
    for name in ("Content-Type", "Server"):
        assert f_headers[name] == s_headers[name]
    fast_vm, slow_vm = json.loads(f_body), json.loads(s_body)
    assert fast_vm.pop("uptime_s") <= slow_vm.pop("uptime_s")
    assert fast_vm == slow_vm == {"id": "vm1", "state": "running", "vcpus": 1, "memory_mib": 64,
                                  "kernel": "vmlinux", "boot_time_us": 1234}


def test_a_connection_goes_to_aiohttp_for_good_after_anything_else_and_keeps_order(tmp_path) -> None:
    def client(path: str, server: ApiServer):
        answers = []
        with connect(path) as sock:
            buf = bytearray()
            sock.sendall(GET_VM)
            answers.append(read_answer(sock, buf))
            body = b'{"state": "paused"}'
            sock.sendall(b"PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            answers.append(read_answer(sock, buf))
            handed = len(server._fast_connections)
            # Pipelined: both in one send, answered in order by aiohttp.
            sock.sendall(GET_VM + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + GET_VM)
            answers += [read_answer(sock, buf) for _ in range(3)]
        return answers, handed

    answers, fast_open = serve(tmp_path, client)
    assert fast_open == 0
    states = [json.loads(body).get("state") for _, _, body in answers]
    assert [status for status, _, _ in answers] == [
        b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 200 OK"]
    assert states == ["running", "paused", "paused", None, "paused"]


def test_pipelined_gets_on_a_fresh_connection_are_all_answered_in_order(tmp_path) -> None:
    def client(path: str, server: ApiServer):
        with connect(path) as sock:
            buf = bytearray()
            sock.sendall(GET_VM * 3)
            return [read_answer(sock, buf)[0] for _ in range(3)]

    assert serve(tmp_path, client) == [b"HTTP/1.1 200 OK"] * 3


def test_malformed_http10_and_close_requests_are_aiohttps(tmp_path) -> None:
    def client(path: str, server: ApiServer):
        out = []
        with connect(path) as sock:
            sock.sendall(b"GET /vm HTTP/1.0\r\n\r\n")
            out.append(read_answer(sock, bytearray())[0])
        with connect(path) as sock:
            sock.sendall(b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, headers, _ = read_answer(sock, bytearray())
            out += [status, headers.get("Connection"), sock.recv(1)]  # then closed
        with connect(path) as sock:
            sock.sendall(b"GET /vm HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            out.append(sock.recv(4096).split(b"\r\n")[0][-15:])  # aiohttp says HTTP/1.0
        return out

    assert serve(tmp_path, client) == [b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK", "close", b"",
                                       b"400 Bad Request"]


def test_get_vm_waits_for_an_action_under_way(tmp_path) -> None:
    vm = Vm()
    controller = vm.controller
    assert controller.vm_info_if_idle() is not None

    async def main() -> tuple[Any, bool]:
        async with controller._lock:  # as while a pause runs
            return controller.vm_info_if_idle(), controller._lock.locked()

    assert asyncio.run(main()) == (None, True)


def test_closing_the_server_closes_fast_path_connections(tmp_path) -> None:
    vm = Vm()
    server = ApiServer(vm.controller, str(tmp_path / "api.sock"))

    async def main() -> bytes:
        await server.start()
        loop = asyncio.get_running_loop()
        sock = connect(server.path)
        with sock:
            sock.sendall(GET_VM)
            await loop.run_in_executor(None, read_answer, sock, bytearray())
            await server.close()
            return await loop.run_in_executor(None, sock.recv, 1)

    assert asyncio.run(main()) == b""  # EOF: the server closed it
    assert not (tmp_path / "api.sock").exists()
