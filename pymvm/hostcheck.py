"""Can Linux guests boot on this machine's /dev/kvm? (hardware-assisted KVM and vhost-net)

Kept apart from pymvm.nested, the nested-host runner (test infrastructure), so that
`pymvm run` can warn on a host that cannot boot Linux without importing that runner.
"""

from __future__ import annotations

import os
from pathlib import Path

from .record import FrozenRecord

OVERRIDE_ENV = "PYMVM_NESTED"
"""``always`` (use the nested host), ``never`` (run directly) or ``auto`` (detect)."""

IN_NESTED_ENV = "PYMVM_IN_NESTED"
"""Set to 1 for commands run inside the nested host."""

KERNEL_CMDLINE_MARK = "pymvm_nested=1"
"""Appended to the nested host's kernel command line: detects it even with a scrubbed env."""


class NestedHostError(Exception):
    """The nested KVM host cannot be started or used."""


class HostFacts(FrozenRecord):
    """What decides whether Linux guests can boot on this machine's /dev/kvm."""

    __slots__ = ("cpu_flags", "modules", "has_dev_kvm", "has_vhost_net")
    cpu_flags: frozenset[str]
    modules: frozenset[str]  # the KVM-related modules in /sys/module
    has_dev_kvm: bool
    has_vhost_net: bool

    def __init__(self, cpu_flags: frozenset[str], modules: frozenset[str], has_dev_kvm: bool,
                 has_vhost_net: bool) -> None:
        self._init(cpu_flags, modules, has_dev_kvm, has_vhost_net)

    @classmethod
    def gather(
        cls,
        *,
        cpuinfo: Path = Path("/proc/cpuinfo"),
        sys_module: Path = Path("/sys/module"),
        dev: Path = Path("/dev"),
        try_modprobe: bool = True,
    ) -> HostFacts:
        try:
            flags = cpu_flags_from_cpuinfo(cpuinfo.read_text())
        except OSError:
            flags = frozenset()
        modules = frozenset(
            m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm") if (sys_module / m).exists()
        )
        vhost = dev / "vhost-net"
        if not vhost.exists() and try_modprobe and (dev / "kvm").exists():
            _modprobe("vhost_net")
        return cls(
            cpu_flags=flags,
            modules=modules,
            has_dev_kvm=(dev / "kvm").exists(),
            has_vhost_net=vhost.exists(),
        )


def cpu_flags_from_cpuinfo(text: str) -> frozenset[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo text."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def _modprobe(module: str) -> None:
    import subprocess  # rarely needed: not on every `pymvm run` (issue 15)

    try:
        subprocess.run(
            ["modprobe", "-q", module],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass  # no modprobe or no permission: the caller checks for the device instead


def assess(facts: HostFacts, override: str = "auto", *, nested: bool = False) -> tuple[bool, str]:
    """Decide from ``facts`` whether Linux guests can boot here; the string says why."""
    if override not in ("auto", "always", "never"):
        raise NestedHostError(
            f"{OVERRIDE_ENV}={override!r} is not valid: use always, never or auto"
        )
    if override == "never":
        return True, f"{OVERRIDE_ENV}=never: running directly"
    # Inside the nested host "always" would only nest again: detect instead.
    if override == "always" and not nested:
        return False, f"{OVERRIDE_ENV}=always: using the nested KVM host"
    if not facts.has_dev_kvm:
        return False, "/dev/kvm does not exist"
    if "kvm_pvm" in facts.modules:
        return False, "/dev/kvm is the paravirtual kvm_pvm: Linux guests cannot boot on it"
    if not facts.cpu_flags & {"vmx", "svm"}:
        return False, "the CPU has neither vmx nor svm: /dev/kvm is not hardware-assisted"
    loaded = sorted(facts.modules & {"kvm_intel", "kvm_amd"})
    if not loaded:
        return False, "neither kvm_intel nor kvm_amd is loaded"
    if not facts.has_vhost_net:
        return False, "/dev/vhost-net does not exist and `modprobe vhost_net` did not create it"
    return True, f"hardware-assisted KVM ({loaded[0]}) and /dev/vhost-net are available"


def can_boot_linux_here(facts: HostFacts | None = None) -> tuple[bool, str]:
    """True where /dev/kvm is hardware-assisted KVM with vhost-net; else why not.

    ``PYMVM_NESTED=always|never|auto`` (default auto) overrides the detection.
    """
    override = os.environ.get(OVERRIDE_ENV, "auto").strip().lower() or "auto"
    nested = in_nested_host()
    if facts is None:
        # `modprobe vhost_net` is a child process on every `pymvm run`: ask for it only where
        # its answer decides, i.e. where everything but /dev/vhost-net is there (issue 15).
        facts = HostFacts.gather(try_modprobe=False)
        if (not facts.has_vhost_net and not assess(facts, override, nested=nested)[0]
                and assess(facts.replace(has_vhost_net=True), override, nested=nested)[0]):
            facts = HostFacts.gather()
    return assess(facts, override, nested=nested)


def in_nested_host(*, cmdline: Path = Path("/proc/cmdline")) -> bool:
    """True when running inside the nested KVM host started by run_nested."""
    if os.environ.get(IN_NESTED_ENV) == "1":
        return True
    try:
        return KERNEL_CMDLINE_MARK in cmdline.read_text().split()
    except OSError:
        return False
