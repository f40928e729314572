"""The control API against a live machine running a small guest program (no Linux).

A 64-bit guest counts in memory forever (no exits); the API, served from an asyncio loop in
another thread as the VMM serves it, pauses and resumes it, answers while it spins, and is
checked against its OpenAPI document by schemathesis (every endpoint, no 5xx, every answer
valid against the document).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from aiohttp import ClientSession, UnixConnector
from hypothesis import HealthCheck, settings

from pymvm import layout
from pymvm.api import OPENAPI_PATH
from pymvm.api.controller import ControlledVm, Controller
from pymvm.api.metrics import VmMetrics
from pymvm.api.server import ApiServer
from pymvm.devices.i8042 import I8042, PORT_COUNT
from pymvm.devices.manager import DeviceManager
from pymvm.devices.virtio.net import VirtioNetDevice
from pymvm.machine import Machine, StopKind, StopReason

from .guests import Asm, load, setup_64bit

pytestmark = pytest.mark.kvm

MIB = 1 << 20
COUNTER = 0x10_0000 - 0x1000


class IdleNetBackend:
    """A data plane that never moves packets: the guest program has no virtio driver."""

    connected = None

    def features(self) -> int:
        return 0

    def activate(self, ctx, mem_regions) -> None:
        pass

    def reset(self) -> None:
        pass


@dataclass
class LiveVm:
    machine: Machine
    devices: DeviceManager
    sock: str
    tcp_url: str  # the same app on loopback TCP, for schemathesis (it speaks TCP only)

    def counter(self) -> int:
        assert self.machine.memory is not None
        return struct.unpack("<Q", self.machine.memory.read(COUNTER, 8))[0]


def build_counting_machine(make_machine) -> tuple[Machine, DeviceManager]:
    m = make_machine(4 * MIB, irqchip=True)
    a = Asm(layout.HIMEM_START, bits=64).mov_ebx(COUNTER).label("loop").inc_qword_rbx().jmp("loop")
    load(m, a)
    setup_64bit(m, m.vcpus[0], layout.HIMEM_START)
    i8042 = I8042(lambda: m.request_stop(StopReason(StopKind.GUEST_RESET, "reset", 0)),
                  m.irq_eventfd(layout.I8042_IRQ))
    m.pio_bus.insert(i8042, layout.I8042_DATA_PORT, PORT_COUNT, "i8042")
    devices = DeviceManager(m)
    record = devices.reserve("net0", "net")
    record.backend.obj = IdleNetBackend()
    record.info.update(backend="vhost-user", tap=None, socket="/nonexistent.sock", netns=None,
                       mac="52:54:00:00:00:01")
    devices.attach_transport(record, VirtioNetDevice(bytes.fromhex("525400000001"), 1500,
                                                     record.backend.obj))
    m.i8042 = i8042  # type: ignore[attr-defined]
    return m, devices


@contextlib.contextmanager
def serve_live(make_machine, tmp_path) -> Iterator[LiveVm]:
    """A running counting guest with the API served for it (UNIX socket and loopback TCP)."""
    m, devices = build_counting_machine(make_machine)
    controlled = ControlledVm(id="guest", machine=m, devices=devices, vcpus=1, memory_mib=4,
                              kernel=None, ctrl_alt_del=m.i8042.send_ctrl_alt_del)
    server = ApiServer(Controller(controlled, VmMetrics(controlled)), str(tmp_path / "api.sock"))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    tcp: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            await server.start()
            # The same connections as on the socket (GET /vm fast path, then aiohttp).
            tcp_server = await loop.create_server(server.protocol_factory(), "127.0.0.1", 0)
            tcp["server"] = tcp_server
            tcp["port"] = tcp_server.sockets[0].getsockname()[1]

        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        tcp["server"].close()  # type: ignore[union-attr]
        loop.run_until_complete(server.close())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        m.start()  # the API is up before the first vCPU runs, as in the VMM
        yield LiveVm(m, devices, server.path, f"http://127.0.0.1:{tcp['port']}")
    finally:
        m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
        m.join()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        devices.close()


@pytest.fixture
def live(make_machine, tmp_path) -> Iterator[LiveVm]:
    with serve_live(make_machine, tmp_path) as vm:
        yield vm


async def api(sock: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    async with ClientSession(connector=UnixConnector(path=sock)) as session:
        async with session.request(method, f"http://localhost{path}", json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if resp.content_type == "application/json" else text


def call(sock: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    return asyncio.run(api(sock, method, path, body))


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_guest_stops_counting_while_paused_through_the_api_and_goes_on_after_resume(live):
    assert wait_for(lambda: live.counter() > 0), "the guest never started counting"

    status, body = call(live.sock, "PUT", "/vm/state", {"state": "paused"})
    assert status == 200 and body["state"] == "paused"
    frozen = live.counter()
    time.sleep(0.3)
    assert live.counter() == frozen, "the guest counted while paused"
    assert call(live.sock, "GET", "/vm")[1]["state"] == "paused"

    status, body = call(live.sock, "PUT", "/vm/state", {"state": "running"})
    assert status == 200 and body["state"] == "running"
    assert wait_for(lambda: live.counter() > frozen), "the guest did not go on after resume"


def test_api_answers_while_the_guest_spins(live):
    assert wait_for(lambda: live.counter() > 0)

    async def many() -> list[float]:
        took = []
        async with ClientSession(connector=UnixConnector(path=live.sock)) as session:
            for _ in range(50):
                started = time.perf_counter()
                async with session.get("http://localhost/vm") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["state"] == "running"
                took.append(time.perf_counter() - started)
        return took

    took = asyncio.run(many())
    before = live.counter()
    assert wait_for(lambda: live.counter() > before), "the guest stopped while being asked"
    assert statistics.median(took) < 0.5, f"median GET /vm took {statistics.median(took):.3f} s"


def test_stop_through_the_api_ends_the_spinning_guest_with_status_3(live):
    status, body = call(live.sock, "PUT", "/vm/actions", {"action": "stop"})
    assert status == 202 and body["exit_status"] == 3
    reason = live.machine.wait(5)
    assert reason is not None and reason.kind is StopKind.REQUESTED and reason.exit_status == 3


def test_metrics_count_the_vcpu_exits_of_the_live_guest(live):
    assert wait_for(lambda: live.counter() > 0)
    call(live.sock, "PUT", "/vm/state", {"state": "paused"})  # a kick: one interrupted exit
    status, text = call(live.sock, "GET", "/metrics")
    assert status == 200
    assert 'pymvm_vcpu_exits_total{kind="interrupted",vcpu="0"}' in text
    assert "pymvm_vm_paused 1.0" in text


# ---- schemathesis: the live API against its OpenAPI document ------------------------------

schema = schemathesis.openapi.from_path(OPENAPI_PATH)


@pytest.fixture(scope="module")
def live_for_schema(tmp_path_factory) -> Iterator[LiveVm]:
    from .conftest import _UNUSABLE

    if _UNUSABLE is not None:  # module-scoped: built before the tier's autouse skip runs
        pytest.skip(_UNUSABLE)
    machines: list[Machine] = []

    def make(memory_size: int, **kwargs: object) -> Machine:
        m = Machine(memory_size, **kwargs)
        machines.append(m)
        return m

    try:
        with serve_live(make, tmp_path_factory.mktemp("api")) as vm:
            yield vm
    finally:
        for m in machines:
            m.close()


@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_live_api_conforms_to_its_openapi_document(case, live_for_schema):
    # Every operation, generated valid and invalid inputs: no 5xx, documented statuses,
    # content types and bodies. "stop" ends the guest early; later answers are 409s.
    case.call_and_validate(base_url=live_for_schema.tcp_url)


# ---- the real `pymvm run` under its seccomp filter ------------------------------------------

HLT_FOREVER = bytes([0xF4, 0xEB, 0xFD])  # 1: hlt; jmp 1b


def test_real_vmm_under_seccomp_answers_fast_path_and_aiohttp_requests_then_stops_with_3(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from pymvm import syscalls
    from tests.unit.test_api_fastpath import GET_VM, read_answer
    from tests.unit.test_boot import make_elf

    if not syscalls.available():
        pytest.skip("libseccomp's Python binding is missing: apt-get install python3-seccomp")
    entry = 0x1000000
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(entry, HLT_FOREVER, 0x1000)], entry))
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'id = "fast"\n[machine]\nvcpus = 1\nmemory_mib = 64\n'
                   f'[boot]\nkernel = "{kernel}"\ncmdline = "console=ttyS0"\n')
    sock_path = tmp_path / "api.sock"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "pymvm.cli", "run", str(cfg), "--api-sock",
                             str(sock_path)], cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state")})
    try:
        assert wait_for(sock_path.exists, 30), "the API socket never appeared"
        answers = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(sock_path))
            buf = bytearray()
            for _ in range(3):  # the fast path
                sock.sendall(GET_VM)
                answers.append(read_answer(sock, buf))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # aiohttp from here on
            answers.append(read_answer(sock, buf))
            sock.sendall(GET_VM)
            answers.append(read_answer(sock, buf))
            body = b'{"action": "stop"}'
            sock.sendall(b"PUT /vm/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            answers.append(read_answer(sock, buf))
        assert proc.wait(30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    assert "seccomp_installed" in stderr and "seccomp_violation" not in stderr, stderr[-2000:]
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 5 + [b"HTTP/1.1 202 Accepted"]
    assert [json.loads(a[2])["state"] for a in answers[:3] + answers[4:5]] == ["running"] * 4
    assert b"pymvm_uptime_seconds" in answers[3][2]
