"""A VirtualMachine with [[block]] disks, built on this host's KVM (no guest runs): the
built-in back-end is started on the locked image, the virtio-blk transport shows the
back-end's capacity, the root disk's root= is on the command line, and close() stops the
back-end and frees the image."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pymvm.config import load_config
from pymvm.devices.virtio import constants as c
from pymvm.images.disk import DiskImageError, open_image
from pymvm.vmm import VirtualMachine
from tests.kvm.test_acpi_vm_build import kernel_file


def mmio_read32(transport, offset: int) -> int:
    data = bytearray(4)
    transport.read(offset, data)
    return struct.unpack("<I", data)[0]


def test_vm_with_a_builtin_root_disk_and_a_read_only_disk(tmp_path: Path) -> None:
    root = tmp_path / "root.img"
    root.write_bytes(bytes(2 << 20))
    data = tmp_path / "data.img"
    data.write_bytes(bytes(1 << 20))
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[machine]\nmemory_mib = 64\n[boot]\nkernel = "{kernel_file(tmp_path, with_acpi=False)}"\n'
        f'cmdline = "console=ttyS0"\n[serial]\noutput = "none"\n'
        f'[[block]]\nid = "root"\npath = "{root}"\nroot = true\n'
        f'[[block]]\nid = "data"\npath = "{data}"\nread_only = true\nserial = "d1"\n')
    vm = VirtualMachine(load_config(config))
    try:
        disks = vm.devices.devices_of_kind("block")
        assert [d.id for d in disks] == ["root", "data"]
        assert "root=/dev/vda rw" in vm.cmdline
        assert vm.cmdline.count("virtio_mmio.device=") == 2
        root_t, data_t = (d.transport for d in disks)
        assert mmio_read32(root_t, c.VIRTIO_MMIO_DEVICE_ID) == c.VIRTIO_ID_BLOCK
        assert mmio_read32(root_t, c.VIRTIO_MMIO_CONFIG) == (2 << 20) // 512  # capacity, low
        assert mmio_read32(data_t, c.VIRTIO_MMIO_CONFIG) == (1 << 20) // 512
        features = mmio_read32(data_t, c.VIRTIO_MMIO_DEVICE_FEATURES)
        assert features >> 5 & 1  # VIRTIO_BLK_F_RO on the read-only disk
        with pytest.raises(DiskImageError, match="in use"):
            open_image(root)
        processes = [d.host.obj.process for d in disks]
        assert all(p.poll() is None for p in processes)
    finally:
        vm.close()
    assert all(p.poll() is not None for p in processes)
    open_image(root).close()  # unlocked
    open_image(data).close()
