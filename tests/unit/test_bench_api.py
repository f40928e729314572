"""bench/api's clients: the minimal HTTP/1.1 keep-alive client for pymvm's GET /vm and the
QMP JSON-lines client for QEMU, and the API server's small per-connection reads."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from pymvm.api.server import READ_SIZE, ApiServer

from .script_loader import load_bench
from .test_api import Vm


@pytest.fixture(scope="module")
def bench_api():
    return load_bench("api.py", "bench_api")


def test_http_client_reads_answers_split_across_reads_and_keeps_what_follows(bench_api) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = bench_api.LineReader(ours)
        first = b'{"state": "running"}'
        second = b'{"error": "no"}'
        wire = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s"
                % (len(first), first, len(second), second))

        def feed() -> None:
            theirs.recv(1024)  # the request
            for i in range(0, len(wire), 7):  # in pieces that split the head and the body
                theirs.sendall(wire[i:i + 7])

        sender = threading.Thread(target=feed)
        sender.start()
        assert bench_api.http_request(reader, bench_api.GET_VM) == (200, first)
        sender.join()
        # The second answer is already buffered: it is read without another send.
        assert reader.until(b"\r\n\r\n").startswith(b"HTTP/1.1 404")
        assert reader.exactly(len(second)) == second


def test_http_client_refuses_an_answer_without_content_length(bench_api) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with pytest.raises(RuntimeError, match="Content-Length"):
            bench_api.http_request(bench_api.LineReader(ours), bench_api.GET_VM)


def test_qmp_client_skips_events_and_fails_on_a_status_other_than_running(bench_api, tmp_path) -> None:
    path = str(tmp_path / "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    statuses = ["running", "paused"]

    def qmp_server() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            for line in lines:
                name = json.loads(line)["execute"]
                if name == "query-status":
                    conn.sendall(b'{"event": "NIC_RX_FILTER_CHANGED", "data": {}}\r\n')
                    reply = {"return": {"status": statuses.pop(0), "running": True}}
                else:
                    reply = {"return": {}}
                conn.sendall(json.dumps(reply).encode() + b"\r\n")

    server = threading.Thread(target=qmp_server, daemon=True)
    server.start()
    try:
        ask, close = bench_api.qmp_status(path)
        ask()  # running, with an event before the answer
        with pytest.raises(RuntimeError, match="paused"):
            ask()
        close()
    finally:
        listener.close()
    server.join(5)


def test_http_client_measures_get_vm_on_the_api_server_over_one_connection(bench_api, tmp_path) -> None:
    vm = Vm()
    server = ApiServer(vm.controller, str(tmp_path / "api.sock"))

    async def main() -> tuple[list[float], list[int]]:
        await server.start()
        try:
            ask, close = bench_api.pymvm_status(server.path)
            loop = asyncio.get_running_loop()
            took = await loop.run_in_executor(None, bench_api.measure, ask, 30)
            # A request longer than one read still arrives whole (the API refuses its field).
            reader = bench_api.LineReader(bench_api._connect(server.path))
            body = json.dumps({"state": "paused", "padding": "x" * (3 * READ_SIZE)}).encode()
            big = (b"PUT /vm/state HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status, answer = await loop.run_in_executor(None, bench_api.http_request, reader, big)
            assert status == 400 and "padding" in json.loads(answer)["error"]
            # Every served connection now reads READ_SIZE bytes at a time, not asyncio's 256 KiB.
            assert server._runner is not None and server._runner.server is not None
            sizes = [h.transport.max_size for h in server._runner.server.connections]
            reader.sock.close()
            close()
            return took, sizes
        finally:
            await server.close()

    took, sizes = asyncio.run(main())
    assert len(took) == 30 and all(t > 0 for t in took)
    assert sizes and set(sizes) == {READ_SIZE}


def test_the_headline_ratio_is_the_worse_phase_not_the_median_between_two_modes(bench_api) -> None:
    # Both phases faster than QEMU, but the pooled median falls between the modes, where
    # pymvm's idle tail reaches further: the pooled ratio is above 1, the headline is not.
    results = {"pymvm": {"idle": [1.0] * 100 + [2.9] * 5, "load": [3.0] * 100},
               "qemu": {"idle": [1.1] * 100, "load": [3.2] * 100}}
    ratios = bench_api.latency_ratios(results)
    assert ratios["api_latency_ratio_idle"] == pytest.approx(1.0 / 1.1)
    assert ratios["api_latency_ratio_load"] == pytest.approx(3.0 / 3.2)
    assert ratios["api_latency_ratio"] == pytest.approx(3.0 / 3.2)  # the worse phase
    assert ratios["api_latency_ratio_pooled"] == pytest.approx(2.9 / 2.15)  # between the modes
