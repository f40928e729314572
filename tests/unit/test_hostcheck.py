"""pymvm.hostcheck asks `modprobe vhost_net` (a child process) only where its answer decides
whether Linux can boot here (issue 15: no child process on every `pymvm run`)."""

from __future__ import annotations

import pytest

from pymvm import hostcheck
from pymvm.hostcheck import HostFacts

HARDWARE = dict(cpu_flags=frozenset({"svm"}), modules=frozenset({"kvm", "kvm_amd"}),
                has_dev_kvm=True)
PVM = dict(cpu_flags=frozenset(), modules=frozenset({"kvm", "kvm_pvm"}), has_dev_kvm=True)


def fake_gather(monkeypatch, before: dict, vhost_after_modprobe: bool) -> list[bool]:
    """HostFacts.gather answering ``before`` (no vhost-net until modprobe); records each
    call's try_modprobe."""
    calls: list[bool] = []

    def gather(*, try_modprobe: bool = True, **_) -> HostFacts:
        calls.append(try_modprobe)
        return HostFacts(**before, has_vhost_net=try_modprobe and vhost_after_modprobe)

    monkeypatch.setattr(HostFacts, "gather", staticmethod(gather))
    monkeypatch.delenv(hostcheck.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(hostcheck, "in_nested_host", lambda **_: False)
    return calls


def test_a_host_that_fails_before_the_vhost_check_runs_no_modprobe(monkeypatch) -> None:
    calls = fake_gather(monkeypatch, PVM, vhost_after_modprobe=True)
    ok, why = hostcheck.can_boot_linux_here()
    assert not ok and "kvm_pvm" in why
    assert calls == [False]


def test_a_hardware_host_missing_only_vhost_net_modprobes_it_and_can_boot(monkeypatch) -> None:
    calls = fake_gather(monkeypatch, HARDWARE, vhost_after_modprobe=True)
    ok, why = hostcheck.can_boot_linux_here()
    assert ok and "kvm_amd" in why
    assert calls == [False, True]


def test_a_hardware_host_whose_modprobe_fails_says_vhost_net_is_missing(monkeypatch) -> None:
    calls = fake_gather(monkeypatch, HARDWARE, vhost_after_modprobe=False)
    ok, why = hostcheck.can_boot_linux_here()
    assert not ok and "vhost-net" in why
    assert calls == [False, True]


@pytest.mark.parametrize("override, expect", [("never", True), ("always", False)])
def test_an_override_decides_without_modprobe(monkeypatch, override: str, expect: bool) -> None:
    calls = fake_gather(monkeypatch, HARDWARE, vhost_after_modprobe=True)
    monkeypatch.setenv(hostcheck.OVERRIDE_ENV, override)
    assert hostcheck.can_boot_linux_here()[0] is expect
    assert calls == [False]
