"""ACPI boots (issue 13): the stock Debian kernel and pymvm's ACPI kernel find their CPUs in
the MADT and their virtio-mmio devices in the DSDT (LNRO0005), reach the host over vhost-net
and over the built-in vhost-user back-end, and `poweroff` ends the VM with status 0 through
the FADT's sleep control register.

The stock kernel is the nested host's own (Debian's linux-image-amd64, /boot/vmlinuz-*),
with the test initramfs plus its virtio modules (`pymvm build-initramfs --modules`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from .conftest import (BASE_CMDLINE, finish_vm, link_exists, net_toml, start_vm, unique,
                       write_vm_toml)

pytestmark = pytest.mark.e2e

# Two host networks, one per back-end: net0 (vhost-net) and net1 (built-in vhost-user).
VHOST_HOST, VHOST_GUEST = "10.77.20.1", "10.77.20.2"
BUILTIN_HOST, BUILTIN_GUEST = "10.77.21.1", "10.77.21.2"

# What the guest reports before it powers off.
PROBE = (
    "echo CPUS=$(cat /sys/devices/system/cpu/online); "
    "echo LNRO=$(ls /sys/bus/acpi/devices | grep -c '^LNRO0005:'); "
    "echo BOUND=$(ls /sys/bus/platform/drivers/virtio-mmio | grep -c LNRO0005); "
    "ip -4 addr show eth0; ip -4 addr show eth1; "
    f"ping -c 3 -W 10 {VHOST_HOST} && echo PING-VHOST-NET-OK; "
    f"ping -c 3 -W 10 {BUILTIN_HOST} && echo PING-BUILTIN-OK; "
    "sync; poweroff -f; sleep 60"
)


@pytest.fixture(scope="session")
def stock_kernel() -> tuple[Path, Path]:
    """(the stock kernel, the test initramfs with that kernel's virtio modules)."""
    from pymvm.images.initramfs import DEFAULT_MODULES, build_initramfs, default_kernel_release

    release = default_kernel_release()
    initrd = build_initramfs(extra_binaries=["iperf3"], modules=DEFAULT_MODULES,
                             kernel_release=release, log=lambda *_: None)
    return Path("/boot") / f"vmlinuz-{release}", initrd


@pytest.fixture(scope="session")
def acpi_kernel() -> Path:
    from pymvm.images.kernel import kernel_status

    images = kernel_status(acpi=True)
    if images is None:
        pytest.fail("the ACPI microVM kernel is not built: run 'pymvm build-kernel --acpi' "
                    "(scripts/setup does)")
    return images.vmlinux


def boot_two_nics(tmp_path: Path, kernel: Path, initrd: Path, command: str, *,
                  acpi: str = "", vcpus: int = 2, cmdline_extra: str = ""):
    from pymvm.images.initramfs import encode_cmd

    taps = unique("pmav"), unique("pmab")
    nets = (net_toml(tap=taps[0], ip=f"{VHOST_GUEST}/24", host_ip=f"{VHOST_HOST}/24")
            + net_toml(tap=taps[1], ip=f"{BUILTIN_GUEST}/24", host_ip=f"{BUILTIN_HOST}/24",
                       backend="builtin"))
    cmdline = f"{BASE_CMDLINE} {cmdline_extra} {encode_cmd(command)}".replace("  ", " ")
    config = write_vm_toml(tmp_path / f"vm-{time.monotonic_ns()}.toml", kernel=kernel, initrd=initrd,
                           cmdline=cmdline, vcpus=vcpus, memory_mib=384, vm_id="acpi")
    text = config.read_text().replace("[serial]", f"{acpi}\n[serial]" if acpi else "[serial]")
    config.write_text(text + nets)
    run = finish_vm(start_vm(config))
    for tap in taps:
        assert not link_exists(tap), f"TAP {tap} outlived the VM"
    return run


def assert_acpi_guest_saw_everything_and_powered_off(run) -> None:
    built = run.events("vm_built")
    assert built and built[-1]["acpi"] is True, run.describe()
    assert "virtio_mmio.device=" not in built[-1]["cmdline"]
    assert run.ready_cpus == 2, run.describe()
    assert "CPUS=0-1" in run.console, run.describe()
    assert "LNRO=2" in run.console and "BOUND=2" in run.console, run.describe()
    assert f"inet {VHOST_GUEST}/24" in run.console, run.describe()
    assert f"inet {BUILTIN_GUEST}/24" in run.console, run.describe()
    assert "PING-VHOST-NET-OK" in run.console, run.describe()
    assert "PING-BUILTIN-OK" in run.console, run.describe()
    # poweroff ended the VM (no exit marker: the command never finished).
    assert run.command_status is None, run.describe()
    assert run.returncode == 0, run.describe()
    stopped = run.events("vm_stopped")[-1]
    assert stopped["reason"] == "guest-shutdown", run.describe()
    assert "ACPI S5" in stopped["detail"]


def test_stock_kernel_two_vcpus_finds_acpi_devices_pings_both_backends_and_powers_off(
        tmp_path, stock_kernel):
    kernel, initrd = stock_kernel
    run = boot_two_nics(tmp_path, kernel, initrd, PROBE)
    assert_acpi_guest_saw_everything_and_powered_off(run)
    # Every module of the initramfs loaded (virtio-mmio is a module in this kernel).
    assert "pymvm-init: insmod" not in run.console, run.describe()


def test_acpi_microvm_kernel_two_vcpus_finds_acpi_devices_pings_both_backends_and_powers_off(
        tmp_path, acpi_kernel, guest_images):
    run = boot_two_nics(tmp_path, acpi_kernel, guest_images.initramfs, PROBE)
    assert_acpi_guest_saw_everything_and_powered_off(run)


def test_acpi_microvm_kernel_reboot_goes_through_the_acpi_reset_register(
        tmp_path, acpi_kernel, guest_images):
    from pymvm.images.initramfs import encode_cmd

    cmdline = BASE_CMDLINE.replace("reboot=k", "reboot=acpi") + " " + encode_cmd("echo rebooting")
    config = write_vm_toml(tmp_path / "vm.toml", kernel=acpi_kernel, initrd=guest_images.initramfs,
                           cmdline=cmdline)
    run = finish_vm(start_vm(config))
    assert "rebooting" in run.console and run.command_status == 0, run.describe()
    assert run.returncode == 0, run.describe()
    stopped = run.events("vm_stopped")[-1]
    assert stopped["reason"] == "guest-reset" and "ACPI reset register" in stopped["detail"], \
        run.describe()


def test_acpi_false_with_the_acpi_kernel_uses_the_mp_table_and_command_line_devices(
        tmp_path, acpi_kernel, guest_images):
    command = ("echo CPUS=$(cat /sys/devices/system/cpu/online); "
               "echo LNRO=$(ls /sys/bus/acpi/devices 2>/dev/null | grep -c '^LNRO0005:'); "
               f"ip -4 addr show eth0; ping -c 2 -W 10 {VHOST_HOST} && echo PING-VHOST-NET-OK")
    run = boot_two_nics(tmp_path, acpi_kernel, guest_images.initramfs, command, acpi="acpi = false")
    built = run.events("vm_built")[-1]
    assert built["acpi"] is False and built["cmdline"].count("virtio_mmio.device=") == 2
    assert run.ready_cpus == 2 and "CPUS=0-1" in run.console, run.describe()
    assert "LNRO=0" in run.console, run.describe()
    assert re.search(rf"inet {VHOST_GUEST}/24", run.console), run.describe()
    assert "PING-VHOST-NET-OK" in run.console, run.describe()
    assert run.command_status == 0 and run.returncode == 0, run.describe()
