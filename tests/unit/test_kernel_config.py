"""The kernel config fragment, the dropped-option check and the kernel cache."""

import os
import subprocess
from pathlib import Path

import pytest

from pymvm.images import cache, kernel
from pymvm.images.kernel import (FRAGMENT_PATH, KernelBuildError, KernelConfigError,
                                 check_config, dropped_options, parse_kconfig)

FRAGMENT = """\
# comment
CONFIG_64BIT=y
CONFIG_NR_CPUS=32
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_PCI is not set
"""

FINAL_OK = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_64BIT=y
CONFIG_X86_64=y
CONFIG_NR_CPUS=32
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_ACPI is not set
"""


def test_parse_kconfig_reads_values_and_not_set_lines():
    options = parse_kconfig(FRAGMENT)
    assert options == {"CONFIG_64BIT": "y", "CONFIG_NR_CPUS": "32",
                       "CONFIG_CMDLINE": '"console=ttyS0"', "CONFIG_PCI": "n"}


def test_no_option_reported_when_all_survive():
    # CONFIG_PCI absent from the final config counts as "not set", as Kconfig writes it.
    assert dropped_options(FRAGMENT, FINAL_OK) == []
    check_config(FRAGMENT, FINAL_OK)


def test_option_missing_from_final_config_is_reported_as_dropped():
    final = FINAL_OK.replace("CONFIG_64BIT=y\n", "# CONFIG_64BIT is not set\n")
    assert dropped_options(FRAGMENT, final) == ["CONFIG_64BIT=y (final .config: not set)"]


def test_option_silently_absent_is_reported_as_dropped():
    final = FINAL_OK.replace("CONFIG_64BIT=y\n", "")
    assert [p.split("=")[0] for p in dropped_options(FRAGMENT, final)] == ["CONFIG_64BIT"]


def test_changed_value_is_reported():
    final = FINAL_OK.replace("CONFIG_NR_CPUS=32", "CONFIG_NR_CPUS=8")
    assert dropped_options(FRAGMENT, final) == ["CONFIG_NR_CPUS=32 (final .config: 8)"]


def test_option_meant_off_but_enabled_is_reported():
    final = FINAL_OK + "CONFIG_PCI=y\n"
    assert dropped_options(FRAGMENT, final) == ["CONFIG_PCI=n (final .config: y)"]


def test_check_config_error_names_every_dropped_option():
    final = FINAL_OK.replace("CONFIG_64BIT=y\n", "").replace("CONFIG_NR_CPUS=32", "")
    with pytest.raises(KernelConfigError, match="CONFIG_64BIT=y.*CONFIG_NR_CPUS=32"):
        check_config(FRAGMENT, final)


REQUIRED_ON = """64BIT SMP X86_MPPARSE X86_LOCAL_APIC X86_IO_APIC PRINTK EARLY_PRINTK TTY
    SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP BINFMT_ELF BINFMT_SCRIPT DEVTMPFS
    DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS SHMEM FUTEX EPOLL EVENTFD SIGNALFD TIMERFD POSIX_TIMERS
    FILE_LOCKING MULTIUSER NET INET PACKET UNIX NETDEVICES NET_CORE VIRTIO VIRTIO_MMIO
    VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_NET VIRTIO_BLK BLOCK EXT4_FS HYPERVISOR_GUEST PARAVIRT
    KVM_GUEST VSOCKETS VIRTIO_VSOCKETS HW_RANDOM HW_RANDOM_VIRTIO DEVMEM SERIO SERIO_I8042
    """.split()


def test_repo_fragment_enables_what_the_microvm_needs_and_nothing_pci_acpi_or_modular():
    options = parse_kconfig(FRAGMENT_PATH.read_text())
    missing = [o for o in REQUIRED_ON if options.get(f"CONFIG_{o}") != "y"]
    assert missing == []
    assert int(options["CONFIG_NR_CPUS"]) >= 8
    for off in ("PCI", "ACPI", "MODULES"):
        assert options[f"CONFIG_{off}"] == "n"


def test_missing_source_tarball_error_names_the_package(tmp_path):
    with pytest.raises(KernelBuildError, match="apt-get install linux-source-6.12"):
        kernel.find_source_tarball(tmp_path)


def test_newest_source_tarball_is_chosen(tmp_path):
    for name in ("linux-source-6.12.1.tar.xz", "linux-source-6.12.9.tar.xz", "other.tar.xz"):
        (tmp_path / name).write_bytes(b"")
    assert kernel.find_source_tarball(tmp_path).name == "linux-source-6.12.9.tar.xz"


def test_cache_key_changes_with_fragment_and_tarball(tmp_path):
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"x")
    key = kernel.cache_key(b"CONFIG_A=y\n", tarball)
    assert len(key) == 16
    assert kernel.cache_key(b"CONFIG_A=y\n", tarball) == key
    assert kernel.cache_key(b"CONFIG_B=y\n", tarball) != key
    tarball.write_bytes(b"xy")
    assert kernel.cache_key(b"CONFIG_A=y\n", tarball) != key


def test_cache_root_prefers_explicit_then_pymvm_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PYMVM_CACHE_DIR", raising=False)
    assert cache.cache_root() == tmp_path / "xdg" / "pymvm"
    monkeypatch.setenv("PYMVM_CACHE_DIR", str(tmp_path / "p"))
    assert cache.cache_root() == tmp_path / "p"
    assert cache.cache_root(tmp_path / "e") == tmp_path / "e"


@pytest.fixture
def fake_tarball(tmp_path, monkeypatch) -> Path:
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"not really a kernel")
    monkeypatch.setattr(kernel, "find_source_tarball", lambda source_dir=None: tarball)
    return tarball


def test_status_is_none_until_built_then_build_returns_cache_without_running_make(
        tmp_path, fake_tarball, monkeypatch):
    cache_dir = tmp_path / "cache"
    assert kernel.kernel_status(cache_dir) is None
    key = kernel.cache_key(FRAGMENT_PATH.read_bytes(), fake_tarball)
    built = cache_dir / "kernels" / key
    built.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "config"):
        (built / name).write_bytes(b"x")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached kernel must not be rebuilt")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    images = kernel.build_kernel(cache_dir, log=lambda line: None)
    assert images.vmlinux == built / "vmlinux" and images.bzimage == built / "bzImage"
    assert kernel.kernel_status(cache_dir) == images


def test_failed_build_step_raises_and_leaves_no_partial_kernel(tmp_path, fake_tarball,
                                                                 monkeypatch):
    # The fake tarball fails to unpack: the error names the log, the temp dir is removed.
    monkeypatch.setattr(kernel, "_check_tools", lambda: None)
    cache_dir = tmp_path / "cache"
    lines: list[str] = []
    with pytest.raises(KernelBuildError, match=r"kernel unpack failed .*build\.log"):
        kernel.build_kernel(cache_dir, log=lines.append)
    assert kernel.kernel_status(cache_dir) is None
    leftovers = [p.name for p in (cache_dir / "kernels").iterdir()]
    assert all(name.endswith(".build.log") for name in leftovers), leftovers
    assert any("unpack" in line for line in lines)


def test_kernel_cli_status_reports_not_built(tmp_path, fake_tarball, capsys):
    assert kernel.main(["--status", "--cache-dir", os.fspath(tmp_path)]) == 1
    assert "not built" in capsys.readouterr().out


def test_acpi_fragment_turns_acpi_on_over_the_base_fragment():
    paths = kernel.fragment_paths(acpi=True)
    assert paths == [FRAGMENT_PATH, kernel.ACPI_FRAGMENT_PATH]
    merged = parse_kconfig(kernel.combined_fragment(paths).decode())
    assert merged["CONFIG_ACPI"] == "y"
    # Command-line discovery stays, so `[boot] acpi = false` still finds the devices.
    assert merged["CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"] == "y"
    assert merged["CONFIG_PCI"] == "y"  # 6.12's ACPICA cannot load tables without it
    assert merged["CONFIG_MODULES"] == "n"


def test_acpi_variant_has_its_own_cache_key_and_the_base_key_is_unchanged(tmp_path, fake_tarball):
    base = kernel.combined_fragment(kernel.fragment_paths())
    assert base == FRAGMENT_PATH.read_bytes()
    with_acpi = kernel.combined_fragment(kernel.fragment_paths(acpi=True))
    assert kernel.cache_key(base, fake_tarball) != kernel.cache_key(with_acpi, fake_tarball)
    cache_dir = tmp_path / "cache"
    built = cache_dir / "kernels" / kernel.cache_key(base, fake_tarball)
    built.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "config"):
        (built / name).write_bytes(b"x")
    assert kernel.kernel_status(cache_dir) is not None
    assert kernel.kernel_status(cache_dir, acpi=True) is None  # never the plain kernel


def test_acpi_build_merges_both_fragments_in_order(tmp_path, fake_tarball, monkeypatch):
    monkeypatch.setattr(kernel, "_check_tools", lambda: None)
    steps: list[list[str]] = []

    def fake_run(stage, argv, cwd, build_log, log, start):
        steps.append(argv)
        if stage == "unpack":
            (Path(argv[-1]) / "linux").mkdir()
        if stage == "merge fragment":
            raise KernelBuildError("stop here")

    monkeypatch.setattr(kernel, "_run", fake_run)
    with pytest.raises(KernelBuildError, match="stop here"):
        kernel.build_kernel(tmp_path / "cache", log=lambda line: None, acpi=True)
    assert steps[-1][-2:] == ["pymvm-0.config", "pymvm-1.config"]
