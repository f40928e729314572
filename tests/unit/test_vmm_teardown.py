"""VirtualMachine teardown: every host resource is undone even when a step fails."""

from __future__ import annotations

from pymvm.devices.manager import DeviceManager
from pymvm.vmm import VirtualMachine


class FailingMachine:
    def close(self) -> None:
        raise BufferError("cannot close exported pointers exist")


def test_host_resources_are_undone_even_if_closing_the_machine_fails():
    vm = VirtualMachine.__new__(VirtualMachine)  # only the teardown state, no KVM
    undone: list[str] = []
    vm.machine = FailingMachine()
    vm.devices = DeviceManager(vm.machine)
    net0 = vm.devices.reserve("net0", "net")
    net0.host.stack.callback(undone.append, "tap")
    net0.backend.stack.callback(undone.append, "vhost")
    net1 = vm.devices.reserve("net1", "net")
    net1.host.stack.callback(undone.append, "bridge")
    vm._serial_file = None
    vm.serial = None

    vm.close()  # must not raise: the TAP and bridge would leak

    # Newest device first; in each, the back-end before the host network it uses.
    assert undone == ["bridge", "vhost", "tap"]
    assert vm.machine is None


def test_fast_mmio_read_count_survives_teardown_for_the_vm_stopped_log() -> None:
    # vm_stopped is logged after close(): the C loop's hit counts must still be there.
    from types import SimpleNamespace

    from pymvm.vmm import VirtualMachine

    class Devices:
        closed = False

        def mmio_devices(self):
            return [] if self.closed else [SimpleNamespace(fast_read=SimpleNamespace(hits=7)),
                                           SimpleNamespace(fast_read=None),
                                           SimpleNamespace(fast_read=SimpleNamespace(hits=5))]

        def close(self):
            self.closed = True

    vm = VirtualMachine.__new__(VirtualMachine)
    vm.machine, vm.devices, vm._serial_file = None, Devices(), None
    assert vm.fast_mmio_reads() == 12
    vm.close()
    assert vm.devices.closed
    assert vm.fast_mmio_reads() == 12
