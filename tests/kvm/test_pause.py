"""Pause and resume park the vCPUs outside KVM_RUN: a counting guest stops, then goes on."""

from __future__ import annotations

import struct
import time

import pytest

from pymvm import layout
from pymvm.machine import Machine, MachineState, StateError, StopKind, StopReason

from .guests import Asm, load, setup_64bit

pytestmark = pytest.mark.kvm

MIB = 1 << 20
COUNTERS = 0x10_0000 - 0x1000  # one 8-byte counter per vCPU, below the code


def counting_machine(make_machine, vcpus: int = 1) -> Machine:
    """Each vCPU increments its own 64-bit counter in guest memory forever, with no exits."""
    m = make_machine(4 * MIB, vcpus=vcpus, irqchip=False)
    for vcpu in m.vcpus:
        origin = layout.HIMEM_START + vcpu.id * 0x1000
        a = Asm(origin, bits=64).mov_ebx(COUNTERS + 8 * vcpu.id).label("loop")
        a.inc_qword_rbx().jmp("loop")
        load(m, a)
        setup_64bit(m, vcpu, origin)
    return m


def counter(m: Machine, index: int = 0) -> int:
    assert m.memory is not None
    return struct.unpack("<Q", m.memory.read(COUNTERS + 8 * index, 8))[0]


def wait_counting(m: Machine, index: int = 0, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (value := counter(m, index)) == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"vCPU {index} never started counting")
        time.sleep(0.01)
    return value


def stop(m: Machine) -> None:
    m.request_stop(StopReason(StopKind.REQUESTED, "test done", 0))
    m.join()


def test_paused_guest_stops_counting_and_goes_on_after_resume(make_machine):
    m = counting_machine(make_machine)
    m.start()
    wait_counting(m)

    m.pause()
    assert m.state is MachineState.PAUSED
    assert m.paused_vcpus == 1
    frozen = counter(m)
    time.sleep(0.3)
    assert counter(m) == frozen, "the guest made progress while paused"

    m.resume()
    assert m.state is MachineState.RUNNING
    deadline = time.monotonic() + 5
    while counter(m) == frozen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter(m) > frozen, "the guest did not go on after resume"
    stop(m)


def test_pause_parks_every_vcpu_of_a_two_vcpu_guest(make_machine):
    m = counting_machine(make_machine, vcpus=2)
    m.start()
    wait_counting(m, 0)
    wait_counting(m, 1)

    m.pause()
    frozen = (counter(m, 0), counter(m, 1))
    time.sleep(0.3)

    assert m.paused_vcpus == 2
    assert (counter(m, 0), counter(m, 1)) == frozen
    m.resume()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (counter(m, 0) == frozen[0] or counter(m, 1) == frozen[1]):
        time.sleep(0.01)
    assert counter(m, 0) > frozen[0] and counter(m, 1) > frozen[1]
    stop(m)


def test_pause_twice_and_resume_twice_are_idempotent(make_machine):
    m = counting_machine(make_machine)
    m.start()
    wait_counting(m)

    m.pause()
    m.pause()
    assert m.state is MachineState.PAUSED
    m.resume()
    m.resume()  # resume while running: nothing to do
    assert m.state is MachineState.RUNNING
    before = counter(m)
    time.sleep(0.1)
    assert counter(m) > before
    stop(m)


def test_stop_while_paused_ends_the_machine_and_joins_the_parked_thread(make_machine):
    m = counting_machine(make_machine)
    m.start()
    wait_counting(m)
    m.pause()
    thread = m._threads[0]

    started = time.monotonic()
    stop(m)

    assert time.monotonic() - started < 3
    assert not thread.is_alive()
    assert m.state is MachineState.STOPPED
    assert m.wait(0).kind is StopKind.REQUESTED


def test_pause_refused_before_start_and_after_stop_with_a_state_error(make_machine):
    m = counting_machine(make_machine)
    with pytest.raises(StateError) as before:
        m.pause()
    assert before.value.state is MachineState.CREATED
    assert set(before.value.required) == {MachineState.RUNNING, MachineState.PAUSED}
    m.start()
    wait_counting(m)
    stop(m)
    with pytest.raises(StateError, match=r"resume\(\) needs the machine running or paused, it is stopped"):
        m.resume()
