"""PUT /vm/net/{id}/backend and `pymvm net SOCK ID --backend ...` (issue 10 item 1): routing,
the body's rules, the answers for a done, refused and failed swap (the hand-over itself is
tested in test_net_swap.py)."""

from __future__ import annotations

import os
import socket

import pytest

from pymvm.config import NetConfig
from pymvm.devices.virtio import constants as c
from pymvm.vhost.user import frontend

from .test_api import Vm, run
from .test_api_cli import keep_logging_config, pymvm, served  # noqa: F401  (fixtures)

TSO4 = 1 << c.VIRTIO_NET_F_HOST_TSO4


class NewBackend:
    made: list[NewBackend] = []
    offered = 1 << c.VIRTIO_F_VERSION_1

    def __init__(self, path: str, mode: str, **kwargs) -> None:
        self.path, self.mode, self.closed = path, mode, False
        self.connected = True
        NewBackend.made.append(self)

    def features(self) -> int:
        return self.offered

    def start(self, ctx, regions, positions=None, strict=False) -> None:
        pass

    def stop(self) -> dict:
        return {}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def swappable(monkeypatch, tmp_path):
    NewBackend.made = []
    monkeypatch.setattr(frontend, "VhostUserNetBackend", NewBackend)
    sock = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "ovs.sock")
    sock.bind(path)
    yield path
    sock.close()


def vm_with_config() -> Vm:
    vm = Vm()
    vm.net.config = NetConfig(id="net0", backend="vhost-user", mac="52:54:00:12:34:56",
                              socket=None)
    return vm


def test_put_backend_moves_the_nic_and_answers_the_device_on_its_new_backend(swappable):
    vm = vm_with_config()
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend",
                          {"backend": "vhost-user", "socket": swappable, "socket_mode": "client"})
    assert status == 200, body
    assert body["net"]["backend"] == "vhost-user" and body["net"]["socket"] == swappable
    assert body["net"]["mac"] == "52:54:00:12:34:56"
    assert vm.device.backend is NewBackend.made[0]


def test_a_swap_that_would_lose_a_feature_is_409_naming_it_and_the_old_backend_stays(swappable):
    vm = vm_with_config()
    old = vm.device.backend
    old.features = lambda: TSO4  # type: ignore[method-assign]  # offered to the guest now
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend",
                          {"backend": "vhost-user", "socket": swappable})
    assert status == 409
    assert body["error"].startswith("the new back-end lacks features the guest negotiated: "
                                    "HOST_TSO4;")
    assert vm.device.backend is old and NewBackend.made[0].closed


def test_a_swap_to_a_missing_socket_is_409_and_the_old_backend_stays(tmp_path):
    vm = vm_with_config()
    old = vm.device.backend
    missing = str(tmp_path / "none.sock")
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend",
                          {"backend": "vhost-user", "socket": missing})
    assert status == 409 and body["error"] == (
        f"no vhost-user back-end socket at {missing}; start the back-end first")
    assert vm.device.backend is old and vm.net.info["socket"] == "/run/vu.sock"


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, 'field "backend" must be'),
    ({"backend": "tap"}, 'field "backend" must be'),
    ({"backend": "vhost-user"}, 'needs "socket": the absolute path'),
    ({"backend": "vhost-user", "socket": "rel.sock"}, "absolute path"),
    ({"backend": "vhost-user", "socket": "/a", "socket_mode": "both"}, '"socket_mode" must be'),
    ({"backend": "vhost-net", "socket": "/a"}, "only for backend \"vhost-user\""),
    ({"backend": "builtin", "color": "red"}, "unknown field 'color'"),
    ([1], "must be a JSON object"),
])
def test_bad_swap_bodies_are_400_naming_the_problem(body, fragment):
    vm = vm_with_config()
    status, answer, _ = run(vm, "PUT", "/vm/net/net0/backend", body)
    assert status == 400 and fragment in answer["error"]


def test_swap_of_an_unknown_device_is_404_whatever_the_body():
    status, body, _ = run(vm_with_config(), "PUT", "/vm/net/eth9/backend", {"nonsense": 1})
    assert status == 404 and "network devices: net0" in body["error"]


def test_a_nic_without_a_host_network_cannot_go_to_vhost_net_409():
    vm = Vm()  # no config: a NIC on an external back-end with nothing to make a TAP from
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend", {"backend": "vhost-net"})
    assert status == 409 and "has no host network" in body["error"]


def test_swap_while_stopping_is_409():
    from pymvm.machine import MachineState

    vm = vm_with_config()
    vm.machine.state = MachineState.STOPPING
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend", {"backend": "builtin"})
    assert status == 409 and "stopping" in body["error"]


def test_a_swap_after_the_devices_were_closed_is_refused():
    from pymvm.devices.swap import SwapRefused

    vm = vm_with_config()
    vm.devices.close()
    with pytest.raises(SwapRefused, match="the VM is stopping"):
        vm.devices.swap_net_backend("net0", "builtin")


def test_the_openapi_document_describes_the_swap_with_every_answer():
    import json

    from pymvm.api import OPENAPI_PATH

    doc = json.loads(OPENAPI_PATH.read_text())
    put = doc["paths"]["/vm/net/{id}/backend"]["put"]
    assert set(put["responses"]) == {"200", "400", "404", "409"}
    schema = doc["components"]["schemas"]["NetBackendChange"]
    assert schema["properties"]["backend"]["enum"] == ["vhost-net", "builtin", "vhost-user"]


def test_cli_net_backend_puts_the_swap_and_prints_the_nic(served, swappable, capsys):  # noqa: F811
    vm, sock = served
    vm.net.config = NetConfig(id="net0", backend="vhost-user", mac="52:54:00:12:34:56")
    rel = os.path.relpath(swappable)
    assert pymvm("net", sock, "net0", "--backend", "vhost-user", "--socket", rel) == 0
    assert f"vhost-user on {swappable}" in capsys.readouterr().out
    assert NewBackend.made[0].path == swappable  # made absolute by the client


def test_cli_net_backend_refused_exits_1_with_the_apis_message(served, tmp_path, capsys):  # noqa: F811
    vm, sock = served
    vm.net.config = NetConfig(id="net0", backend="vhost-user", mac="52:54:00:12:34:56")
    missing = str(tmp_path / "gone.sock")
    assert pymvm("net", sock, "net0", "--backend", "vhost-user", "--socket", missing) == 1
    assert f"no vhost-user back-end socket at {missing}" in capsys.readouterr().err


def test_cli_socket_without_backend_is_a_usage_error(served, capsys):  # noqa: F811
    _, sock = served
    assert pymvm("net", sock, "net0", "--socket", "/x.sock") == 2
    assert "--socket and --socket-mode go with --backend" in capsys.readouterr().err


def test_a_swap_to_a_path_that_is_not_a_socket_is_409_at_once(tmp_path):
    vm = vm_with_config()
    status, body, _ = run(vm, "PUT", "/vm/net/net0/backend",
                          {"backend": "vhost-user", "socket": str(tmp_path)})
    assert status == 409 and body["error"] == (
        f"{tmp_path} is not a UNIX socket; give the vhost-user back-end's socket")
