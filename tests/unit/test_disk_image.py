"""Disk images: the checks and the lock that keep two VMs off one image, and the built-in
back-end's command line refusing bad images with one line and status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymvm.images.disk import DiskImageError, open_image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


def test_open_image_reports_size_in_sectors(image: Path) -> None:
    with open_image(image) as disk:
        assert disk.size == 4096 and disk.sectors == 8


def test_missing_image_is_one_line_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(DiskImageError, match="does not exist") as e:
        open_image(tmp_path / "nope.img")
    assert "\n" not in str(e.value) and "nope.img" in str(e.value)


def test_second_writer_is_refused_while_the_first_holds_the_lock(image: Path) -> None:
    with open_image(image):
        with pytest.raises(DiskImageError, match="in use by another VM"):
            open_image(image)
        with pytest.raises(DiskImageError, match="in use by another VM"):
            open_image(image, read_only=True)
    open_image(image).close()  # released with the first


def test_read_only_users_share_the_image(image: Path) -> None:
    with open_image(image, read_only=True), open_image(image, read_only=True):
        with pytest.raises(DiskImageError, match="in use"):
            open_image(image)


def test_unwritable_image_is_refused_for_a_writable_disk(image: Path, monkeypatch) -> None:
    # As root every file is writable, so the access check is shown the answer a user gets.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    with pytest.raises(DiskImageError, match="not writable"):
        open_image(image)
    open_image(image, read_only=True).close()


def test_image_smaller_than_a_sector_is_refused(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(DiskImageError, match="less than one 512-byte sector"):
        open_image(tiny)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(DiskImageError, match="not a regular file"):
        open_image(tmp_path)


def run_blk_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pymvm.cli", "vhost-user", "blk", *args],
                          capture_output=True, text=True, timeout=60)


def test_blk_backend_cli_refuses_a_missing_image_with_status_2(tmp_path: Path) -> None:
    r = run_blk_cli("--socket", str(tmp_path / "s"), "--image", str(tmp_path / "none.img"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("pymvm: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_blk_backend_cli_refuses_an_image_locked_by_another_vm(tmp_path: Path, image: Path) -> None:
    with open_image(image):
        r = run_blk_cli("--socket", str(tmp_path / "s"), "--image", str(image))
    assert r.returncode == 2 and "in use by another VM" in r.stderr
    assert not (tmp_path / "s").exists()
