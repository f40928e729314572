"""Fixtures of the kvm tier: skip without a usable /dev/kvm, machines closed after each test."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from pymvm.machine import Machine

KVM_DEVICE = "/dev/kvm"


def _kvm_unusable_reason() -> str | None:
    """Why this host cannot run the kvm tier, or None when /dev/kvm opens read-write."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} does not exist: this host has no KVM (load kvm_intel/kvm_amd)"
    except PermissionError:
        return f"{KVM_DEVICE} is not openable by this user: join the 'kvm' group or run as root"
    except OSError as e:
        code = errno.errorcode.get(e.errno, e.errno)
        return f"{KVM_DEVICE} cannot be opened: {code} {e.strerror}"
    os.close(fd)
    return None


_UNUSABLE = _kvm_unusable_reason()


@pytest.fixture(autouse=True)
def require_kvm() -> None:
    """Every test of this tier runs guest code: skip, saying why, where KVM is unusable."""
    if _UNUSABLE is not None:
        pytest.skip(_UNUSABLE)


@pytest.fixture
def make_machine() -> Iterator[Callable[..., Machine]]:
    """Build Machines that are closed (vCPU threads stopped, fds released) after the test."""
    machines: list[Machine] = []

    def make(memory_size: int, **kwargs: object) -> Machine:
        m = Machine(memory_size, **kwargs)
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.close()

