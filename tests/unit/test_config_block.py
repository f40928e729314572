"""[[block]] disks in the VM config: defaults, both back-ends, and one-line errors for a
missing, unwritable or locked image and for contradictory keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pymvm.config import BlockConfig
from pymvm.images.disk import open_image
from tests.unit.test_config import MINIMAL, error_of, kernel, load  # noqa: F401 (fixture)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "root.img"
    path.write_bytes(bytes(1 << 16))
    return path


def test_builtin_disk_defaults(tmp_path: Path, kernel: Path, image: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '[[block]]\npath = "root.img"\nroot = true\n')
    assert cfg.block == (BlockConfig(id="disk0", backend="builtin", path=image, root=True),)


def test_vhost_user_disk_takes_a_socket_and_mode(tmp_path: Path, kernel: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '[[block]]\nid = "data"\nbackend = "vhost-user"\n'
                                   'socket = "qsd.sock"\nsocket_mode = "server"\nread_only = true\n')
    (disk,) = cfg.block
    assert (disk.id, disk.backend, disk.socket, disk.socket_mode, disk.read_only) == (
        "data", "vhost-user", tmp_path / "qsd.sock", "server", True)


def test_config_without_disks_has_none(tmp_path: Path, kernel: Path) -> None:
    assert load(tmp_path, MINIMAL).block == ()


def test_missing_image_is_one_line_with_the_key_and_a_fix(tmp_path: Path, kernel: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + '[[block]]\npath = "nope.img"\n')
    assert "block[0].path:" in msg and "does not exist" in msg and "build-rootfs" in msg


def test_image_locked_by_another_vm_is_refused(tmp_path: Path, kernel: Path, image: Path) -> None:
    with open_image(image):
        msg = error_of(tmp_path, MINIMAL + '[[block]]\npath = "root.img"\n')
    assert "block[0].path:" in msg and "in use by another VM" in msg


def test_unwritable_image_for_a_writable_disk_is_refused(tmp_path: Path, kernel: Path,
                                                          image: Path, monkeypatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    msg = error_of(tmp_path, MINIMAL + '[[block]]\npath = "root.img"\n')
    assert "not writable" in msg and "read_only = true" in msg
    load(tmp_path, MINIMAL + '[[block]]\npath = "root.img"\nread_only = true\n')


def test_unreadable_image_is_refused(tmp_path: Path, kernel: Path, image: Path,
                                     monkeypatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.R_OK and real_access(p, mode)
                        if str(p).endswith(".img") else real_access(p, mode))
    assert "not readable" in error_of(tmp_path, MINIMAL + '[[block]]\npath = "root.img"\n'
                                                          'read_only = true\n')


@pytest.mark.parametrize("entries,key,problem", [
    ('[[block]]\nbackend = "builtin"\n', "block[0].path", "required"),
    ('[[block]]\nbackend = "vhost-user"\n', "block[0].socket", "required"),
    ('[[block]]\nbackend = "spdk"\npath = "root.img"\n', "block[0].backend", "expected one of"),
    ('[[block]]\npath = "root.img"\nsocket = "x.sock"\n', "block[0].socket", "only used with"),
    ('[[block]]\nbackend = "vhost-user"\nsocket = "x"\npath = "root.img"\n', "block[0].path", "not used"),
    ('[[block]]\npath = "root.img"\nserial = "' + "s" * 21 + '"\n', "block[0].serial", "20"),
    ('[[block]]\npath = "root.img"\nread_only = 1\n', "block[0].read_only", "true or false"),
    ('[[block]]\npath = "root.img"\nrooot = true\n', "block[0].rooot", "did you mean root"),
    ('[[block]]\nid = "a"\npath = "root.img"\nread_only = true\n[[block]]\nid = "a"\n'
     'path = "root.img"\nread_only = true\n', "block[1].id", "already used"),
    ('[[block]]\nid = "a"\npath = "root.img"\n[[block]]\nid = "b"\npath = "root.img"\n',
     "block[1].path", "one image serves one writable disk"),
    ('[[block]]\nid = "a"\npath = "root.img"\nroot = true\nread_only = true\n[[block]]\n'
     'id = "b"\nbackend = "vhost-user"\nsocket = "s"\nroot = true\n', "block[1].root", "one disk only"),
    ('[block]\npath = "root.img"\n', "block", "[[block]]"),
])
def test_bad_block_entries_name_key_and_fix(tmp_path: Path, kernel: Path, image: Path,
                                            entries: str, key: str, problem: str) -> None:
    msg = error_of(tmp_path, MINIMAL + entries)
    assert f"{key}" in msg and problem in msg, msg
