"""The nested host's 6.12 kernel (issue 8's kernel experiment): fragment, cache, build steps."""

import os
import subprocess
from pathlib import Path

import pytest

from pymvm.images import hostkernel
from pymvm.images.kernel import KernelConfigError, parse_kconfig

#: What the nested host uses, all built in: no modules of that kernel are installed.
NEEDED = ("KVM", "KVM_AMD", "VHOST_NET", "VHOST_VSOCK", "VSOCKETS", "VIRTIO_VSOCKETS", "TUN",
          "BRIDGE", "VETH", "NET_NS", "PID_NS", "USER_NS", "IPV6", "HUGETLBFS", "MEMFD_CREATE",
          "SECCOMP", "SECCOMP_FILTER", "USERFAULTFD", "VDPA", "VDPA_SIM", "VDPA_SIM_NET",
          "VHOST_VDPA", "BLK_DEV_LOOP", "EXT4_FS", "OVERLAY_FS", "SERIO_I8042", "KEYBOARD_ATKBD")


def test_fragment_builds_in_everything_the_nested_host_needs():
    options = parse_kconfig(hostkernel.FRAGMENT_PATH.read_text())
    assert {name: options.get(f"CONFIG_{name}") for name in NEEDED} == dict.fromkeys(NEEDED, "y")
    assert "m" not in options.values()
    assert options["CONFIG_LOCALVERSION"] == '"-pymvm-nested"'  # uname -r tells it apart


@pytest.fixture
def fake_tarball(tmp_path, monkeypatch) -> Path:
    tarball = tmp_path / "linux-source-6.12.tar.xz"
    tarball.write_bytes(b"not really a kernel")
    monkeypatch.setattr(hostkernel, "find_source_tarball", lambda source_dir=None: tarball)
    return tarball


def test_cache_key_changes_with_fragment_tarball_and_virtme_ng(fake_tarball):
    key = hostkernel.cache_key(b"CONFIG_KVM=y\n", fake_tarball, "1.42")
    assert key == hostkernel.cache_key(b"CONFIG_KVM=y\n", fake_tarball, "1.42")
    assert key != hostkernel.cache_key(b"CONFIG_KVM=m\n", fake_tarball, "1.42")
    assert key != hostkernel.cache_key(b"CONFIG_KVM=y\n", fake_tarball, "1.43")
    fake_tarball.write_bytes(b"another source")
    assert key != hostkernel.cache_key(b"CONFIG_KVM=y\n", fake_tarball, "1.42")


def _fill(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in ("bzImage", "config", *hostkernel.BUILTIN_FILES):
        (folder / name).write_bytes(b"x")


def test_status_is_none_until_built_then_build_returns_the_cache_without_make(
        tmp_path, fake_tarball, monkeypatch):
    cache_dir = tmp_path / "cache"
    assert hostkernel.host_kernel_status(cache_dir) is None
    folder = hostkernel.host_kernel_dir(cache_dir)
    assert folder.parent == cache_dir / "kernels"
    assert folder.name.startswith("nested-host-")
    _fill(folder)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached kernel must not be rebuilt")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    built = hostkernel.build_host_kernel(cache_dir, log=lambda line: None)
    assert built.bzimage == folder / "bzImage"
    assert hostkernel.host_kernel_status(cache_dir) == built


def test_a_kernel_without_its_builtin_module_list_counts_as_not_built(tmp_path, fake_tarball):
    cache_dir = tmp_path / "cache"
    folder = hostkernel.host_kernel_dir(cache_dir)
    _fill(folder)
    (folder / "modules.builtin").unlink()
    assert hostkernel.host_kernel_status(cache_dir) is None


def _fake_build(monkeypatch, final_config: str) -> list[tuple[str, list[str]]]:
    """Replace each build step with a stand-in that leaves what the real one would."""
    monkeypatch.setattr(hostkernel, "_check_tools", lambda: None)
    monkeypatch.setattr(hostkernel, "_configkernel", lambda: "virtme-configkernel")
    steps: list[tuple[str, list[str]]] = []

    def fake_run(stage, argv, cwd, build_log, log, start):
        steps.append((stage, argv))
        if stage == "unpack":
            (Path(argv[-1]) / "linux").mkdir()
        elif stage == "olddefconfig":
            (cwd / ".config").write_text(final_config)
        elif stage == "compile":
            (cwd / "arch/x86/boot").mkdir(parents=True)
            (cwd / "arch/x86/boot/bzImage").write_bytes(b"bz")
            for name in hostkernel.BUILTIN_FILES:
                (cwd / name).write_text("kernel/kvm.ko\n")

    monkeypatch.setattr(hostkernel, "_run", fake_run)
    return steps


def test_build_configures_from_virtme_ng_merges_the_fragment_and_compiles_niced(
        tmp_path, fake_tarball, monkeypatch):
    steps = _fake_build(monkeypatch, hostkernel.FRAGMENT_PATH.read_text())
    lines: list[str] = []
    built = hostkernel.build_host_kernel(tmp_path / "cache", jobs=2, log=lines.append)
    assert [stage for stage, _ in steps] == ["unpack", "virtme-ng base config", "merge fragment",
                                             "olddefconfig", "compile"]
    assert steps[1][1][1:] == ["--defconfig", "--arch", "x86_64"]
    assert steps[4][1][:3] == ["nice", "-n", "19"] and steps[4][1][-2:] == ["-j2", "bzImage"]
    assert built.bzimage.read_bytes() == b"bz"
    assert (built.folder / "modules.builtin").read_text() == "kernel/kvm.ko\n"
    assert hostkernel.host_kernel_status(tmp_path / "cache") == built
    assert any("s wall)" in line for line in lines)  # the build's wall time
    assert [p.name for p in built.folder.parent.iterdir() if p.name.startswith(".")] == []


def test_build_stops_before_compiling_when_olddefconfig_drops_an_option(
        tmp_path, fake_tarball, monkeypatch):
    final = hostkernel.FRAGMENT_PATH.read_text().replace("CONFIG_KVM_AMD=y\n", "")
    steps = _fake_build(monkeypatch, final)
    with pytest.raises(KernelConfigError, match=r"CONFIG_KVM_AMD=y \(final \.config: not set\)"):
        hostkernel.build_host_kernel(tmp_path / "cache", log=lambda line: None)
    assert "compile" not in [stage for stage, _ in steps]
    assert hostkernel.host_kernel_status(tmp_path / "cache") is None


def test_cli_status_reports_not_built(tmp_path, fake_tarball, capsys):
    assert hostkernel.main(["--status", "--cache-dir", os.fspath(tmp_path)]) == 1
    assert "not built" in capsys.readouterr().out


def test_pymvm_build_kernel_nested_host_builds_it_and_prints_the_bzimage(
        tmp_path, monkeypatch, capsys):
    from pymvm import cli

    calls = []

    def fake_build(jobs=None, log=print):
        calls.append(jobs)
        return hostkernel.HostKernel(tmp_path)

    monkeypatch.setattr(hostkernel, "build_host_kernel", fake_build)
    assert cli.main(["build-kernel", "--nested-host", "-j", "2"]) == 0
    assert calls == [2]
    assert capsys.readouterr().out == f"{tmp_path / 'bzImage'}\n"
    assert cli.main(["build-kernel", "--nested-host", "--acpi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nested-host and --acpi" in err
    assert calls == [2]
