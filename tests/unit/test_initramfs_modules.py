"""`pymvm build-initramfs --modules`: a distribution kernel's virtio modules, with their
dependencies in load order, decompressed, and loaded by /init."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from pymvm.images import initramfs
from pymvm.images.initramfs import (InitramfsError, kernel_modules, module_name,
                                    modules_in_load_order, parse_modules_dep, read_newc)

RELEASE = "6.1.0-99-amd64"
DEP = """\
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/net/virtio_net.ko.gz: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko:
"""


@pytest.fixture
def modules_root(tmp_path: Path) -> Path:
    root = tmp_path / "lib-modules"
    d = root / RELEASE
    for line in DEP.splitlines():
        rel = line.split(":")[0]
        body = f"ELF module {module_name(rel)}".encode()
        if rel.endswith(".xz"):
            body = lzma.compress(body)
        elif rel.endswith(".gz"):
            body = gzip.compress(body)
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(body)
    (d / "modules.dep").write_text(DEP)
    (d / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    return root


def test_module_names_drop_the_suffix_and_use_underscores():
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("kernel/drivers/virtio/virtio_mmio.ko.xz") == "virtio_mmio"
    assert module_name("a/b.ko.zst") == "b"


def test_dependencies_come_before_the_modules_that_need_them_once_each():
    table = parse_modules_dep(DEP)
    order = [module_name(p) for p in
             modules_in_load_order(["virtio_mmio", "virtio_net", "virtio-rng"], table, set(), RELEASE)]
    assert order == ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover",
                     "virtio_net", "virtio_rng"]


def test_builtin_modules_are_skipped_and_unknown_ones_are_an_error():
    table = parse_modules_dep(DEP)
    assert modules_in_load_order(["virtio_blk"], table, {"virtio_blk"}, RELEASE) == []
    with pytest.raises(InitramfsError, match="no module 'virtio_nope'"):
        modules_in_load_order(["virtio_nope"], table, set(), RELEASE)


def test_compressed_modules_are_stored_decompressed_under_their_plain_name(modules_root):
    files, order = kernel_modules(RELEASE, ["virtio_mmio", "virtio_net"], modules_root)
    assert order[0] == f"/lib/modules/{RELEASE}/kernel/drivers/virtio/virtio_ring.ko"
    assert all(path.endswith(".ko") for path in order)
    assert files[f"/lib/modules/{RELEASE}/kernel/drivers/net/virtio_net.ko"] == b"ELF module virtio_net"
    assert files[f"/lib/modules/{RELEASE}/kernel/drivers/virtio/virtio.ko"] == b"ELF module virtio"


def test_missing_kernel_release_names_the_fix(modules_root):
    with pytest.raises(InitramfsError, match="is kernel 9.9 installed"):
        kernel_modules("9.9", ["virtio_mmio"], modules_root)


def test_default_release_is_the_newest_boot_kernel_with_modules(tmp_path, modules_root):
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{RELEASE}").write_bytes(b"")
    (boot / "vmlinuz-7.0.0-1-amd64").write_bytes(b"")  # no modules installed for it
    assert initramfs.default_kernel_release(boot, modules_root) == RELEASE
    with pytest.raises(InitramfsError, match="linux-image-amd64"):
        initramfs.default_kernel_release(tmp_path / "empty", modules_root)


def test_archive_holds_the_modules_and_the_load_list_init_reads(tmp_path, modules_root, monkeypatch):
    monkeypatch.setattr(initramfs, "MODULES_ROOT", modules_root)
    path = initramfs.build_initramfs(cache_dir=tmp_path / "cache", log=lambda *_: None,
                                     modules=["virtio_mmio", "virtio_net"], kernel_release=RELEASE)
    entries = {e.name: e for e in read_newc(path.read_bytes())}
    listed = entries["etc/pymvm-modules"].data.decode().split()
    assert [module_name(p) for p in listed] == ["virtio_ring", "virtio", "virtio_mmio", "failover",
                                                 "net_failover", "virtio_net"]
    for guest_path in listed:
        assert entries[guest_path.lstrip("/")].data.startswith(b"ELF module")
    init = entries["init"].data.decode()
    assert "/etc/pymvm-modules" in init and "insmod" in init
    # Loading happens before the network is configured (virtio_net makes eth0).
    assert init.index("insmod") < init.index("ip link set lo up")


def test_modules_archive_does_not_replace_the_test_initramfs_artifact(tmp_path, modules_root, monkeypatch):
    monkeypatch.setattr(initramfs, "MODULES_ROOT", modules_root)
    cache = tmp_path / "cache"
    plain = initramfs.build_initramfs(cache_dir=cache, log=lambda *_: None)
    with_modules = initramfs.build_initramfs(cache_dir=cache, log=lambda *_: None,
                                             modules=["virtio_mmio"], kernel_release=RELEASE)
    assert with_modules != plain
    assert initramfs.initramfs_status(cache_dir=cache) == plain


def test_hosts_debian_kernel_modules_resolve_if_installed():
    try:
        release = initramfs.default_kernel_release()
    except InitramfsError as e:
        pytest.skip(f"no distribution kernel with modules here: {e}")
    files, order = kernel_modules(release)
    names = [module_name(p) for p in order]
    for wanted in ("virtio_mmio", "virtio_net", "virtio_blk"):
        assert wanted in names
    assert names.index("virtio") < names.index("virtio_mmio") < names.index("virtio_net")
    assert all(files[p][:4] == b"\x7fELF" for p in order)
