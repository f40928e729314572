"""VirtualMachine teardown: every host resource is undone even when a step fails."""

from __future__ import annotations

from pymvm.vmm import VirtualMachine


class FailingMachine:
    def close(self) -> None:
        raise BufferError("cannot close exported pointers exist")


def test_host_resources_are_undone_even_if_closing_the_machine_fails():
    vm = VirtualMachine.__new__(VirtualMachine)  # only the teardown state, no KVM
    undone: list[str] = []
    vm.machine = FailingMachine()
    vm._closers = [lambda: undone.append("tap"), lambda: undone.append("bridge")]
    vm._serial_file = None
    vm.serial = None

    vm.close()  # must not raise: the TAP and bridge would leak

    assert undone == ["bridge", "tap"]  # the reverse of the order they were made in
    assert vm.machine is None
