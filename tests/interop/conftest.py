"""Fixtures of the interop tier: third-party vhost-user peers (DPDK testpmd) on this host."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

TESTPMD = shutil.which("dpdk-testpmd")


def _unusable_reason() -> str | None:
    if TESTPMD is None:
        return "dpdk-testpmd is not installed: apt-get install dpdk-dev"
    if os.geteuid() != 0:
        return "DPDK and TAP creation need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist: modprobe tun"
    return None


_UNUSABLE = _unusable_reason()


@pytest.fixture(autouse=True)
def require_peers() -> None:
    """Skip, saying why and what to install, where the interop peers are missing."""
    if _UNUSABLE is not None:
        pytest.skip(_UNUSABLE)


@pytest.fixture
def unique() -> str:
    """A short random tag for TAP names and DPDK file prefixes (no clashes between runs)."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def testpmd() -> str:
    """Path of dpdk-testpmd (the autouse fixture has already skipped where it is missing)."""
    assert TESTPMD is not None
    return TESTPMD
