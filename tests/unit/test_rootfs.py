"""pymvm build-rootfs: an ext4 image holding the test initramfs's tree, with the same init
reachable where the kernel looks on a disk root (/sbin/init)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pymvm.images.initramfs import render_init_script
from pymvm.images.rootfs import RootfsError, build_rootfs


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True).stdout


def test_rootfs_is_ext4_with_the_initramfs_init_and_busybox(tmp_path: Path) -> None:
    image = build_rootfs(tmp_path / "root.ext4", size_mib=32, log=lambda _: None)
    assert image.stat().st_size == 32 << 20
    assert "Filesystem volume name:   pymvm-root" in subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    assert debugfs(image, "cat /init") == render_init_script()
    assert "/init" in debugfs(image, "stat /sbin/init")  # fast symlink target
    assert "busybox" in debugfs(image, "ls -l /bin")
    assert "pymvm-agent" in debugfs(image, "ls -l /sbin")
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_rootfs_too_small_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RootfsError, match="too small"):
        build_rootfs(tmp_path / "root.ext4", size_mib=1, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_build_rootfs_cli_into_a_missing_directory_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pymvm.cli", "build-rootfs", "-o",
                        str(tmp_path / "no" / "root.ext4")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
