"""The control API's one dispatcher: every request becomes a VmmAction run against the VM.

Firecracker's ``rpc_interface.rs`` idea: the HTTP layer only parses, the dispatcher validates
and acts, one action at a time, on the VMM's asyncio loop. Work that may block (parking the
vCPUs, a config-change interrupt under the transport's lock, netlink reads for the metrics)
runs in a worker thread so the loop keeps answering.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ..machine import MachineState, MachineStateError, StopKind, StopReason
from .errors import BadRequest, Conflict, NotFound

if TYPE_CHECKING:
    from ..devices.manager import DeviceManager, MmioDevice
    from ..machine import Machine

log = structlog.get_logger()

#: Exit status of `pymvm run` after `PUT /vm/actions {"action": "stop"}` (README).
EXIT_API_STOP = 3

# Machine states as the API names them; STOPPED and CLOSED are never seen by a client that
# still gets answers (the socket closes with the VM), but map them anyway.
API_STATES = {
    MachineState.CREATED: "created",
    MachineState.RUNNING: "running",
    MachineState.PAUSED: "paused",
    MachineState.STOPPING: "stopping",
    MachineState.STOPPED: "stopping",
    MachineState.CLOSED: "stopping",
}


class VmmAction(enum.Enum):
    GET_VM = "get-vm"
    SET_STATE = "set-state"
    ACTION = "action"
    GET_DEVICES = "get-devices"
    GET_NET = "get-net"
    PATCH_NET = "patch-net"
    SWAP_NET = "swap-net"
    METRICS = "metrics"


@dataclass(frozen=True)
class ApiRequest:
    action: VmmAction
    device_id: str | None = None
    body: Any = None


@dataclass
class ControlledVm:
    """What the API may see and steer of one VM (a VirtualMachine, or a test machine)."""

    id: str
    machine: Machine
    devices: DeviceManager | None
    vcpus: int
    memory_mib: int
    kernel: str | None = None
    started_ns: int = field(default_factory=time.monotonic_ns)  # the VMM's start
    boot_time_us: Callable[[], int | None] = lambda: None
    #: Presses Ctrl-Alt-Del on the guest's keyboard (the i8042); None: no keyboard.
    ctrl_alt_del: Callable[[], None] | None = None


def _object_body(body: Any, fields: Mapping[str, tuple[str, ...]], example: str) -> dict[str, str]:
    """Check ``body`` is a JSON object with exactly ``fields``, each one of its choices."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object such as {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; send only {', '.join(fields)} "
                         f"(e.g. {example})")
    out: dict[str, str] = {}
    for name, choices in fields.items():
        if name not in body:
            raise BadRequest(f"missing field {name!r}; send e.g. {example}")
        value = body[name]
        if not isinstance(value, str) or value not in choices:
            shown = " or ".join(f'"{c}"' for c in choices)
            raise BadRequest(f"field {name!r} must be {shown}, got {_show(value)}")
        out[name] = value
    return out


_SWAP_EXAMPLE = '{"backend": "vhost-user", "socket": "/run/ovs/vm1.sock", "socket_mode": "server"}'


def _swap_body(body: Any) -> tuple[str, str | None, str]:
    """``{"backend": ..., "socket": ..., "socket_mode": ...}`` of PUT /vm/net/{id}/backend."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object such as {_SWAP_EXAMPLE}")
    unknown = sorted(set(body) - {"backend", "socket", "socket_mode"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; send backend, socket and socket_mode "
                         f"(e.g. {_SWAP_EXAMPLE})")
    backend = body.get("backend")
    if backend not in ("vhost-net", "builtin", "vhost-user"):
        raise BadRequest('field "backend" must be "vhost-net", "builtin" or "vhost-user", got '
                         f"{_show(backend)}")
    socket = body.get("socket")
    mode = body.get("socket_mode", "client")
    if mode not in ("client", "server"):
        raise BadRequest(f'field "socket_mode" must be "client" or "server", got {_show(mode)}')
    if backend == "vhost-user":
        if not isinstance(socket, str) or not socket.startswith("/") or "\0" in socket:
            raise BadRequest('a vhost-user back-end needs "socket": the absolute path of its '
                             f"UNIX socket, got {_show(socket)}")
    elif socket is not None or "socket_mode" in body:
        raise BadRequest(f'"socket" and "socket_mode" are only for backend "vhost-user"; '
                         f"{backend} takes neither")
    return backend, socket, mode


def _show(value: Any) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Controller:
    """Runs API requests against ``vm``; one at a time (an asyncio lock), on the loop."""

    def __init__(self, vm: ControlledVm, metrics: Any = None) -> None:
        self.vm = vm
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._handlers: dict[VmmAction, Callable[[ApiRequest], Any]] = {
            VmmAction.GET_VM: self._get_vm,
            VmmAction.SET_STATE: self._set_state,
            VmmAction.ACTION: self._action,
            VmmAction.GET_DEVICES: self._get_devices,
            VmmAction.GET_NET: self._get_net,
            VmmAction.PATCH_NET: self._patch_net,
            VmmAction.SWAP_NET: self._swap_net,
            VmmAction.METRICS: self._metrics,
        }

    async def dispatch(self, request: ApiRequest) -> Any:
        async with self._lock:
            return await self._handlers[request.action](request)

    # ---- the VM --------------------------------------------------------------------------------
    def vm_info(self) -> dict[str, Any]:
        vm = self.vm
        boot_us = vm.boot_time_us()
        return {
            "id": vm.id,
            "state": API_STATES[vm.machine.state],
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "kernel": vm.kernel,
            "uptime_s": round((time.monotonic_ns() - vm.started_ns) / 1e9, 3),
            "boot_time_us": boot_us,
        }

    def vm_info_if_idle(self) -> dict[str, Any] | None:
        """``vm_info()`` now, or None while an action runs (GET /vm then waits its turn)."""
        return None if self._lock.locked() else self.vm_info()

    async def _get_vm(self, request: ApiRequest) -> dict[str, Any]:
        return self.vm_info()

    async def _set_state(self, request: ApiRequest) -> dict[str, Any]:
        state = _object_body(request.body, {"state": ("paused", "running")},
                             '{"state": "paused"}')["state"]
        machine = self.vm.machine
        operation = machine.pause if state == "paused" else machine.resume
        try:
            await asyncio.get_running_loop().run_in_executor(None, operation)
        except MachineStateError as e:
            raise Conflict(f"cannot make the VM {state}: it is "
                           f"{API_STATES[machine.state]} ({e})") from None
        except TimeoutError as e:
            raise Conflict(f"cannot pause the VM now: {e}; try again") from None
        return self.vm_info()

    async def _action(self, request: ApiRequest) -> dict[str, Any]:
        action = _object_body(request.body, {"action": ("shutdown", "stop")},
                              '{"action": "shutdown"}')["action"]
        machine = self.vm.machine
        state = machine.state
        if action == "stop":
            if state not in (MachineState.CREATED, MachineState.RUNNING, MachineState.PAUSED):
                raise Conflict(f"the VM is already {API_STATES[state]}")
            machine.request_stop(StopReason(StopKind.REQUESTED, "stop requested through the API",
                                            EXIT_API_STOP))
            return {"action": action, "exit_status": EXIT_API_STOP}
        if state is not MachineState.RUNNING:
            hint = "; resume it first" if state is MachineState.PAUSED else ""
            raise Conflict(f"the guest can only be asked to shut down while running, it is "
                           f"{API_STATES[state]}{hint}")
        if self.vm.ctrl_alt_del is None:
            raise Conflict("this VM has no i8042 keyboard to send Ctrl-Alt-Del to; use "
                           '{"action": "stop"}')
        self.vm.ctrl_alt_del()
        log.info("api_shutdown_requested")
        return {"action": action, "exit_status": 0}

    # ---- devices -------------------------------------------------------------------------------
    def _device_info(self, d: MmioDevice) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": d.id,
            "type": d.kind,
            "mmio_base": d.mmio_base,
            "mmio_size": d.mmio_size,
            "irq": d.irq,
            "driver": d.driver_status(),
        }
        if d.kind == "net":
            info["net"] = self._net_facts(d)
        elif d.kind == "vsock":
            info["vsock"] = {"cid": d.info.get("cid"),
                             "transport_resets": getattr(d.device, "events_sent", 0)}
        return info

    @staticmethod
    def _net_facts(d: MmioDevice) -> dict[str, Any]:
        backend = d.backend.obj
        connected = getattr(backend, "connected", None)
        return {
            "link": "up" if getattr(d.device, "link_up", True) else "down",
            "mac": d.info.get("mac"),
            "backend": d.info.get("backend"),
            "tap": d.info.get("tap"),
            "socket": d.info.get("socket"),
            "netns": d.info.get("netns"),
            "connected": bool(connected) if connected is not None else None,
        }

    def _devices(self) -> list[MmioDevice]:
        return self.vm.devices.mmio_devices() if self.vm.devices is not None else []

    def net_device(self, device_id: str | None) -> MmioDevice:
        for d in self._devices():
            if d.id == device_id and d.kind == "net":
                return d
        known = ", ".join(d.id for d in self._devices() if d.kind == "net") or "none"
        raise NotFound(f"no network device with id {_show(device_id)} (network devices: {known}); "
                       "GET /vm/devices lists them")

    async def _get_devices(self, request: ApiRequest) -> dict[str, Any]:
        return {"devices": [self._device_info(d) for d in self._devices()]}

    async def _get_net(self, request: ApiRequest) -> dict[str, Any]:
        return self._device_info(self.net_device(request.device_id))

    async def _patch_net(self, request: ApiRequest) -> dict[str, Any]:
        d = self.net_device(request.device_id)
        link = _object_body(request.body, {"link": ("up", "down")}, '{"link": "down"}')["link"]
        if self.vm.machine.state not in (MachineState.CREATED, MachineState.RUNNING,
                                         MachineState.PAUSED):
            raise Conflict(f"the VM is {API_STATES[self.vm.machine.state]}: its links are gone")
        transport = d.transport

        def set_link() -> None:
            # Under the transport's lock: a vCPU reading the config space sees the old or
            # the new status, and the interrupt follows the change (VIRTIO_NET_F_STATUS).
            with transport.lock:
                d.device.set_link_up(link == "up")

        await asyncio.get_running_loop().run_in_executor(None, set_link)
        log.info("api_link_changed", device=d.id, link=link)
        return self._device_info(d)

    async def _swap_net(self, request: ApiRequest) -> dict[str, Any]:
        """Move the NIC's data plane to another back-end while the guest runs (issue 10)."""
        from ..devices.swap import SwapError

        d = self.net_device(request.device_id)
        backend, socket, mode = _swap_body(request.body)
        if self.vm.machine.state not in (MachineState.CREATED, MachineState.RUNNING,
                                         MachineState.PAUSED):
            raise Conflict(f"the VM is {API_STATES[self.vm.machine.state]}: its back-ends are "
                           "going")
        assert self.vm.devices is not None

        def swap() -> None:
            self.vm.devices.swap_net_backend(d.id, backend, socket, mode)  # type: ignore[union-attr]

        try:
            await asyncio.get_running_loop().run_in_executor(None, swap)
        except SwapError as e:
            raise Conflict(str(e)) from None
        log.info("api_backend_swapped", device=d.id, backend=backend, socket=socket)
        return self._device_info(d)

    # ---- metrics -------------------------------------------------------------------------------
    async def _metrics(self, request: ApiRequest) -> bytes:
        if self.metrics is None:
            raise NotFound("this VM has no metrics")
        return await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
