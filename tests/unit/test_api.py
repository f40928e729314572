"""The control API without KVM: routing, every error status, the dispatcher's state rules,
the UNIX socket's life (mode, stale and live sockets), against a bare machine."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp import ClientSession, UnixConnector
from aiohttp.test_utils import TestClient, TestServer

from pymvm.api import OPENAPI_PATH
from pymvm.api.controller import EXIT_API_STOP, ControlledVm, Controller
from pymvm.api.errors import ApiSocketError
from pymvm.api.metrics import VmMetrics
from pymvm.api.server import ApiServer, bind_socket, check_socket_path
from pymvm.devices.manager import DeviceManager
from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext
from pymvm.devices.virtio.net import VirtioNetDevice
from pymvm.machine import MachineState, StopKind

from .test_device_manager import FakeMachine
from .test_machine_state import bare_machine
from .test_virtio_mmio import FakeDriver


class FakeNetBackend:
    connections = 3  # two reconnects

    def __init__(self) -> None:
        self.connected = True

    def features(self) -> int:
        return 0

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        pass

    def reset(self) -> None:
        pass


class Vm:
    """A bare Machine (no vCPUs) with one NIC on a DeviceManager over a fake KVM."""

    def __init__(self, with_keyboard: bool = True) -> None:
        self.machine = bare_machine(MachineState.RUNNING)
        self.machine.exit_counts = [{-1: 2, 2: 7}]
        self.kvm = FakeMachine()
        self.devices = DeviceManager(self.kvm)
        self.net = self.devices.reserve("net0", "net")
        self.net.backend.obj = FakeNetBackend()
        self.net.info.update(backend="vhost-user", tap=None, socket="/run/vu.sock", netns=None,
                             mac="52:54:00:12:34:56")
        self.device = VirtioNetDevice(bytes.fromhex("525400123456"), None, self.net.backend.obj)
        self.transport = self.devices.attach_transport(self.net, self.device)
        self.keypresses = 0
        self.controlled = ControlledVm(
            id="vm1", machine=self.machine, devices=self.devices, vcpus=1, memory_mib=64,
            kernel="vmlinux", boot_time_us=lambda: 1234,
            ctrl_alt_del=self._press if with_keyboard else None)
        self.controller = Controller(self.controlled, VmMetrics(self.controlled))

    def _press(self) -> None:
        self.keypresses += 1


async def call(vm: Vm, method: str, path: str, body: Any = None, raw: bytes | None = None):
    server = ApiServer(vm.controller, "/nonexistent/unused.sock")
    async with TestClient(TestServer(server.app())) as client:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        resp = await client.request(method, path, data=data)
        text = await resp.text()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, resp.headers


def run(vm: Vm, method: str, path: str, body: Any = None, raw: bytes | None = None):
    return asyncio.run(call(vm, method, path, body, raw))


@pytest.fixture
def vm() -> Vm:
    return Vm()


# ---- routing and the happy paths -----------------------------------------------------------

def test_get_vm_reports_id_state_size_kernel_uptime_and_boot_time(vm):
    status, body, headers = run(vm, "GET", "/vm")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["id"] == "vm1" and body["state"] == "running"
    assert (body["vcpus"], body["memory_mib"], body["kernel"]) == (1, 64, "vmlinux")
    assert body["boot_time_us"] == 1234 and body["uptime_s"] >= 0


def test_put_state_pauses_and_resumes_and_each_is_idempotent(vm):
    for state in ("paused", "paused", "running", "running"):
        status, body, _ = run(vm, "PUT", "/vm/state", {"state": state})
        assert (status, body["state"]) == (200, state)
        assert vm.machine.state.value == state


def test_stop_action_ends_the_machine_with_the_documented_status(vm):
    status, body, _ = run(vm, "PUT", "/vm/actions", {"action": "stop"})
    assert status == 202 and body == {"action": "stop", "exit_status": EXIT_API_STOP}
    assert vm.machine.stop_reason.kind is StopKind.REQUESTED
    assert vm.machine.stop_reason.exit_status == EXIT_API_STOP


def test_stop_action_works_on_a_paused_vm(vm):
    run(vm, "PUT", "/vm/state", {"state": "paused"})
    status, _, _ = run(vm, "PUT", "/vm/actions", {"action": "stop"})
    assert status == 202 and vm.machine.state is MachineState.STOPPING


def test_shutdown_action_presses_ctrl_alt_del_once(vm):
    status, body, _ = run(vm, "PUT", "/vm/actions", {"action": "shutdown"})
    assert status == 202 and body == {"action": "shutdown", "exit_status": 0}
    assert vm.keypresses == 1
    assert vm.machine.stop_reason is None  # the guest decides when to end


def test_devices_list_the_nic_with_its_slot_driver_status_and_backend(vm):
    FakeDriver(vm.transport).probe()
    status, body, _ = run(vm, "GET", "/vm/devices")
    assert status == 200
    (dev,) = body["devices"]
    assert (dev["id"], dev["type"]) == ("net0", "net")
    assert (dev["mmio_base"], dev["irq"]) == (vm.net.mmio_base, vm.net.irq)
    assert dev["driver"]["driver_ok"] is True and dev["driver"]["needs_reset"] is False
    assert int(dev["driver"]["features_acked"], 16) & (1 << c.VIRTIO_NET_F_STATUS)
    assert dev["net"]["backend"] == "vhost-user" and dev["net"]["socket"] == "/run/vu.sock"
    assert dev["net"]["connected"] is True and dev["net"]["link"] == "up"


def test_patch_link_down_changes_the_config_status_and_interrupts_the_driver(vm):
    driver = FakeDriver(vm.transport)
    driver.probe()
    generation = driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION)
    interrupts = len(vm.kvm.interrupts)

    status, body, _ = run(vm, "PATCH", "/vm/net/net0", {"link": "down"})

    assert status == 200 and body["net"]["link"] == "down"
    config = bytearray(2)
    vm.transport.read(c.VIRTIO_MMIO_CONFIG + 6, config)  # virtio_net_config.status
    assert int.from_bytes(config, "little") & c.VIRTIO_NET_S_LINK_UP == 0
    assert driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION) != generation
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) & c.VIRTIO_MMIO_INT_CONFIG
    assert len(vm.kvm.interrupts) == interrupts + 1
    status, body, _ = run(vm, "GET", "/vm/net/net0")
    assert body["net"]["link"] == "down"
    run(vm, "PATCH", "/vm/net/net0", {"link": "up"})
    assert vm.device.link_up is True


def test_metrics_are_prometheus_text_with_exits_fast_reads_reconnects_and_boot_time(vm):
    status, text, headers = run(vm, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'pymvm_vcpu_exits_total{kind="interrupted",vcpu="0"} 2.0' in text
    assert 'pymvm_vcpu_exits_total{kind="io",vcpu="0"} 7.0' in text
    assert 'pymvm_fast_mmio_reads_total{device="net0"} 0.0' in text
    assert 'pymvm_vhost_user_reconnects_total{device="net0"} 2.0' in text
    assert "pymvm_guest_boot_time_seconds 0.001234" in text


def test_openapi_document_is_served_as_stored(vm):
    status, body, _ = run(vm, "GET", "/openapi.json")
    assert status == 200 and body == json.loads(OPENAPI_PATH.read_text())
    assert set(body["paths"]) == {"/vm", "/vm/state", "/vm/actions", "/vm/devices",
                                  "/vm/net/{id}", "/vm/net/{id}/backend", "/metrics",
                                  "/openapi.json"}


# ---- errors: 400 ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, fragment", [
    (b"{not json", "not valid JSON"),
    (b"", "no body"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"state": "frozen"}', "must be \"paused\" or \"running\""),
    (b'{"state": 1}', "must be \"paused\" or \"running\""),
    (b"{}", "missing field 'state'"),
    (b'{"state": "paused", "extra": 1}', "unknown field 'extra'"),
])
def test_bad_state_bodies_are_400_with_a_json_error_naming_the_problem(vm, raw, fragment):
    status, body, _ = run(vm, "PUT", "/vm/state", raw=raw)
    assert status == 400
    assert fragment in body["error"]
    assert vm.machine.state is MachineState.RUNNING


def test_deeply_nested_json_is_400_not_a_crash(vm):
    status, body, _ = run(vm, "PUT", "/vm/state", raw=b"[" * 30000 + b"]" * 30000)
    assert status == 400 and "nests too deeply" in body["error"]


def test_bad_action_and_bad_link_are_400(vm):
    assert run(vm, "PUT", "/vm/actions", {"action": "reboot"})[0] == 400
    status, body, _ = run(vm, "PATCH", "/vm/net/net0", {"link": "sideways"})
    assert status == 400 and "'link'" in body["error"]


# ---- errors: 404 / 405 ---------------------------------------------------------------------

def test_unknown_device_is_404_for_get_and_patch_whatever_the_body(vm):
    for method, body in (("GET", None), ("PATCH", {"link": "down"}), ("PATCH", None)):
        status, payload, _ = run(vm, method, "/vm/net/eth9", body)
        assert status == 404
        assert "eth9" in payload["error"] and "net0" in payload["error"]


def test_unknown_path_is_404_json(vm):
    status, body, _ = run(vm, "GET", "/vm/nothing")
    assert status == 404 and "GET /openapi.json" in body["error"]


def test_wrong_method_is_405_json_with_allow(vm):
    status, body, headers = run(vm, "DELETE", "/vm")
    assert status == 405 and headers["Allow"] == "GET"
    assert "DELETE is not allowed" in body["error"]


# ---- errors: 409 ---------------------------------------------------------------------------

def test_shutdown_while_paused_is_409_and_says_resume_first(vm):
    run(vm, "PUT", "/vm/state", {"state": "paused"})
    status, body, _ = run(vm, "PUT", "/vm/actions", {"action": "shutdown"})
    assert status == 409 and "resume it first" in body["error"]
    assert vm.keypresses == 0


def test_shutdown_without_a_keyboard_is_409_pointing_to_stop():
    vm = Vm(with_keyboard=False)
    status, body, _ = run(vm, "PUT", "/vm/actions", {"action": "shutdown"})
    assert status == 409 and '"stop"' in body["error"]


def test_pause_resume_stop_and_link_after_stop_are_409(vm):
    run(vm, "PUT", "/vm/actions", {"action": "stop"})
    for method, path, body in (("PUT", "/vm/state", {"state": "paused"}),
                               ("PUT", "/vm/state", {"state": "running"}),
                               ("PUT", "/vm/actions", {"action": "stop"}),
                               ("PUT", "/vm/actions", {"action": "shutdown"}),
                               ("PATCH", "/vm/net/net0", {"link": "down"})):
        status, payload, _ = run(vm, method, path, body)
        assert status == 409, (method, path)
        assert "stopping" in payload["error"]


def test_pause_before_the_vcpus_run_is_409(vm):
    vm.machine.state = MachineState.CREATED
    status, body, _ = run(vm, "PUT", "/vm/state", {"state": "paused"})
    assert status == 409 and "created" in body["error"]


# ---- the UNIX socket -----------------------------------------------------------------------

async def _serve_and_get(vm: Vm, path: str) -> tuple[int, dict, int]:
    server = ApiServer(vm.controller, path)
    await server.start()
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        async with ClientSession(connector=UnixConnector(path=path)) as session:
            async with session.get("http://localhost/vm") as resp:
                return resp.status, await resp.json(), mode
    finally:
        await server.close()


def test_socket_is_mode_0600_answers_and_is_removed_at_close(vm, tmp_path):
    path = str(tmp_path / "api.sock")
    status, body, mode = asyncio.run(_serve_and_get(vm, path))
    assert status == 200 and body["id"] == "vm1"
    assert mode == 0o600
    assert not os.path.exists(path)


def test_stale_socket_is_replaced(vm, tmp_path):
    path = str(tmp_path / "api.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens

    status, _, _ = asyncio.run(_serve_and_get(vm, path))
    assert status == 200


def test_live_socket_is_refused_with_one_line_naming_the_fix(tmp_path):
    path = str(tmp_path / "api.sock")
    live = bind_socket(path)
    try:
        with pytest.raises(ApiSocketError, match="served by another running VMM; stop it or "
                                                 "choose another --api-sock") as err:
            check_socket_path(path)
        assert "\n" not in str(err.value)
    finally:
        live.close()


def test_a_regular_file_at_the_socket_path_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "api.sock"
    path.write_text("keep me")
    with pytest.raises(ApiSocketError, match="not a socket"):
        bind_socket(path)
    assert path.read_text() == "keep me"


def test_the_vmm_loads_aiohttp_without_client_tls_contexts_and_prometheus_still_imports(
        tmp_path) -> None:
    # In a fresh interpreter, through run_vm with an API socket (whose socket check comes
    # first): aiohttp's two client contexts (each loads the CA store) are not built; ssl,
    # urllib.request's HTTPS parts and prometheus_client still work. The guest resets at
    # once (or, without KVM, the VM fails to build): what is checked is what came before.
    import subprocess
    import sys

    from tests.unit.test_boot import make_elf

    entry = 0x1000000
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(entry, bytes([0xB0, 0xFE, 0xE6, 0x64, 0xF4]), 0x1000)], entry))
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from pymvm.config import parse_config\n"
            "from pymvm.vmm import run_vm\n"
            "cfg = parse_config({'boot': {'kernel': sys.argv[1]}}, Path('.'), 'test')\n"
            "try:\n"
            "    print('run_vm:', run_vm(cfg, Path(sys.argv[2])), file=sys.stderr)\n"
            "except Exception as exc:\n"
            "    print('run_vm:', type(exc).__name__, file=sys.stderr)\n"
            "import aiohttp.connector as c\n"
            "assert c._SSL_CONTEXT_VERIFIED is None and c._SSL_CONTEXT_UNVERIFIED is None\n"
            "assert 'prometheus_client' not in sys.modules\n"
            "import ssl, urllib.request, prometheus_client\n"
            "assert ssl.create_default_context() is not None and urllib.request.HTTPSHandler\n"
            "from pymvm.api.server import ApiServer\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code, str(kernel), str(tmp_path / "api.sock")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr[-2000:]
    assert "run_vm:" in done.stderr  # run_vm ran (its socket check and API start included)
