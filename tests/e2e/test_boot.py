"""Linux guests boot to userspace under pymvm and stop cleanly (issue: boot foundation)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pymvm.images.initramfs import READY_MARKER

from .conftest import BASE_CMDLINE, finish_vm, start_vm, write_vm_toml

pytestmark = pytest.mark.e2e


def assert_clean_guest_exit(run) -> None:
    assert run.returncode == 0, run.describe()
    stopped = run.events("vm_stopped")
    assert stopped and stopped[-1]["reason"] == "guest-reset", run.describe()


def test_boot_vmlinux_one_vcpu_reaches_userspace_and_exits_cleanly(boot_vm):
    # A real `python -m pymvm.cli` process (the other tests fork one from pytest).
    run = boot_vm("echo hello-from-guest; cat /proc/cmdline", vcpus=1, spawn="exec")
    assert run.ready_cpus == 1, run.describe()
    assert "hello-from-guest" in run.console
    assert run.command_status == 0, run.describe()
    assert_clean_guest_exit(run)


def test_boot_logs_the_guest_boot_time(boot_vm):
    run = boot_vm("true")
    timers = run.events("guest_boot_time")
    assert len(timers) == 1, run.describe()
    assert timers[0]["boot_time_us"] > 0
    stopped = run.events("vm_stopped")[-1]
    assert stopped["boot_time_us"] == timers[0]["boot_time_us"]


def test_boot_two_vcpus_guest_sees_both_cpus(boot_vm):
    run = boot_vm("grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online", vcpus=2)
    assert run.ready_cpus == 2, run.describe()
    assert "0-1" in run.console, run.describe()
    assert run.command_status == 0
    assert_clean_guest_exit(run)


def test_boot_bzimage_reaches_userspace(boot_vm):
    run = boot_vm("echo bzimage-ok", kernel="bzimage")
    assert run.ready_cpus == 1, run.describe()
    assert "bzimage-ok" in run.console
    assert_clean_guest_exit(run)


def test_boot_guest_command_failure_is_reported_on_the_console(boot_vm):
    run = boot_vm("exit 7")
    assert run.command_status == 7, run.describe()
    assert_clean_guest_exit(run)  # the VM itself still ended cleanly


def test_boot_guest_reboot_ends_the_vm_with_status_0(boot_vm):
    # The guest reboots in the middle of its command: no exit marker, VM stops via i8042.
    run = boot_vm("echo rebooting; reboot -f; sleep 60")
    assert "rebooting" in run.console
    assert run.command_status is None, run.describe()
    assert_clean_guest_exit(run)
    assert "i8042" in run.events("vm_stopped")[-1]["detail"]


def test_boot_triple_fault_reboot_ends_the_vm_with_status_0(tmp_path, guest_images):
    from pymvm.images.initramfs import encode_cmd

    cmdline = BASE_CMDLINE.replace("reboot=k", "reboot=t") + " " + encode_cmd("echo tf")
    config = write_vm_toml(tmp_path / "vm.toml", kernel=guest_images.vmlinux,
                           initrd=guest_images.initramfs, cmdline=cmdline)
    run = finish_vm(start_vm(config))
    assert_clean_guest_exit(run)
    assert "triple fault" in run.events("vm_stopped")[-1]["detail"], run.describe()


def test_boot_sigterm_stops_a_running_guest_with_status_143(tmp_path, guest_images):
    from pymvm.images.initramfs import encode_cmd

    cmdline = BASE_CMDLINE + " " + encode_cmd("sleep 600")
    config = write_vm_toml(tmp_path / "vm.toml", kernel=guest_images.vmlinux,
                           initrd=guest_images.initramfs, cmdline=cmdline)
    proc = start_vm(config)
    # Wait for the ready marker on the console, then stop the VMM from outside.
    deadline = time.monotonic() + 240
    seen = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while READY_MARKER.encode() not in seen and time.monotonic() < deadline and proc.poll() is None:
        chunk = proc.stdout.read()
        if chunk:
            seen += chunk
        time.sleep(0.2)
    assert READY_MARKER.encode() in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGTERM)
    os.set_blocking(proc.stdout.fileno(), True)
    run = finish_vm(proc, 60)
    assert run.returncode == 143, run.describe()
    assert run.events("vm_stopped")[-1]["reason"] == "signal"
