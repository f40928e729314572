"""The machine's lifecycle guard and its pause/resume/stop state machine, without KVM."""

from __future__ import annotations

import threading

import pytest

from pymvm.machine import (
    Machine,
    MachineState,
    MachineStateError,
    StateError,
    StopKind,
    StopReason,
)


def bare_machine(state: MachineState) -> Machine:
    """A Machine with its lifecycle fields only (no vCPU threads, no KVM)."""
    m = Machine.__new__(Machine)
    m.state = state
    m._run_cond = threading.Condition()
    m._pause_requested = False
    m._parked = 0
    m._threads = []
    m.vcpus = []
    m.stop_reason = None
    m._stopped = threading.Event()
    m.on_stop = None
    return m


def test_state_guard_keeps_the_methods_name_and_docstring():
    assert Machine.pause.__name__ == "pause"
    assert "Park every vCPU" in Machine.pause.__doc__
    assert Machine.start.__wrapped__.__name__ == "start"


def test_state_error_carries_current_and_allowed_states_and_is_a_machine_state_error():
    m = bare_machine(MachineState.CREATED)

    with pytest.raises(StateError) as err:
        m.resume()

    assert isinstance(err.value, MachineStateError)
    assert err.value.state is MachineState.CREATED
    assert err.value.required == (MachineState.RUNNING, MachineState.PAUSED)
    assert str(err.value) == "resume() needs the machine running or paused, it is created"


def test_pause_twice_stays_paused():
    m = bare_machine(MachineState.RUNNING)
    m.pause()
    m.pause()
    assert m.state is MachineState.PAUSED


def test_resume_while_running_changes_nothing():
    m = bare_machine(MachineState.RUNNING)
    m.resume()
    assert m.state is MachineState.RUNNING
    assert not m._pause_requested


def test_resume_after_pause_runs_again_and_clears_the_request():
    m = bare_machine(MachineState.RUNNING)
    m.pause()
    m.resume()
    assert m.state is MachineState.RUNNING
    assert not m._pause_requested


def test_stop_while_paused_moves_to_stopping_and_refuses_resume():
    m = bare_machine(MachineState.RUNNING)
    seen: list[StopReason] = []
    m.on_stop = seen.append
    m.pause()

    m.request_stop(StopReason(StopKind.REQUESTED, "api stop", 0))

    assert m.state is MachineState.STOPPING
    assert [r.kind for r in seen] == [StopKind.REQUESTED]
    with pytest.raises(StateError, match="it is stopping"):
        m.resume()
    with pytest.raises(StateError, match="it is stopping"):
        m.pause()
