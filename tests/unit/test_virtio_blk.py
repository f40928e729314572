"""The virtio-blk device model: features and config space come from the back-end, the queue
count from its num_queues when it offers MQ, read-only is enforced towards the guest."""

from __future__ import annotations

import pytest

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import (
    ActivationContext,
    QueueConfig,
    VirtioActivationError,
    VirtioConfigError,
)


class FakeBlkBackend:
    def __init__(self, features: int, config: b.BlkConfig) -> None:
        self._features = features
        self.config = config.pack()
        self.activated: list[ActivationContext] = []
        self.resets = 0
        self.config_writes: list[tuple[int, bytes]] = []

    def features(self) -> int:
        return self._features

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    def activate(self, ctx, mem_regions) -> None:
        self.activated.append(ctx)

    def reset(self) -> None:
        self.resets += 1


MODERN = 1 << c.VIRTIO_F_VERSION_1


def test_features_pass_through_the_blk_set_only() -> None:
    offered = (MODERN | 1 << b.VIRTIO_BLK_F_FLUSH | 1 << b.VIRTIO_BLK_F_DISCARD
               | 1 << b.VIRTIO_BLK_F_WRITE_ZEROES | 1 << b.VIRTIO_BLK_F_SEG_MAX
               | 1 << b.VIRTIO_BLK_F_BLK_SIZE | 1 << c.VIRTIO_F_RING_PACKED
               | 1 << b.VIRTIO_BLK_F_CONFIG_WCE)
    dev = b.VirtioBlkDevice(FakeBlkBackend(offered, b.BlkConfig(capacity=2048)))
    features = dev.avail_features()
    for bit in (b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES,
                b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_BLK_SIZE, c.VIRTIO_F_VERSION_1):
        assert features >> bit & 1, bit
    assert not features >> c.VIRTIO_F_RING_PACKED & 1  # pymvm's rings are split rings
    assert not features >> b.VIRTIO_BLK_F_CONFIG_WCE & 1  # no writable config offered
    assert not features >> b.VIRTIO_BLK_F_RO & 1


def test_read_only_disk_offers_ro_even_if_the_backend_does_not() -> None:
    dev = b.VirtioBlkDevice(FakeBlkBackend(MODERN, b.BlkConfig(capacity=8)), read_only=True)
    assert dev.avail_features() >> b.VIRTIO_BLK_F_RO & 1


def test_config_space_is_the_backends_and_capacity_is_read_from_it() -> None:
    cfg = b.BlkConfig(capacity=123456, seg_max=126, blk_size=4096, num_queues=1,
                      max_discard_sectors=99, max_discard_seg=1)
    dev = b.VirtioBlkDevice(FakeBlkBackend(MODERN, cfg))
    assert dev.capacity == 123456
    data = bytearray(8)
    dev.read_config(0, data)
    assert int.from_bytes(data, "little") == 123456
    blk_size = bytearray(4)
    dev.read_config(20, blk_size)
    assert int.from_bytes(blk_size, "little") == 4096
    assert len(dev.config_bytes()) == b.CONFIG_SIZE == 60


def test_queue_count_follows_num_queues_only_with_mq() -> None:
    cfg = b.BlkConfig(capacity=8, num_queues=4)
    assert len(b.VirtioBlkDevice(FakeBlkBackend(MODERN, cfg)).queue_max_sizes) == 1
    with_mq = b.VirtioBlkDevice(FakeBlkBackend(MODERN | 1 << b.VIRTIO_BLK_F_MQ, cfg))
    assert len(with_mq.queue_max_sizes) == 4


@pytest.mark.parametrize("seg_max, size", [
    (0, 256), (126, 256), (254, 256),  # qemu-storage-daemon's 126; header + status fit 256
    (255, 512), (510, 512),  # the built-in back-end's 510: 1 MiB of 4 KiB pages, one chain
    (1022, 1024), (5000, 1024),  # no bigger than QUEUE_SIZE_LIMIT
])
def test_queue_offered_holds_a_request_of_seg_max_segments_as_one_chain(seg_max, size) -> None:
    cfg = b.BlkConfig(capacity=8, seg_max=seg_max, num_queues=2)
    dev = b.VirtioBlkDevice(FakeBlkBackend(MODERN | 1 << b.VIRTIO_BLK_F_MQ, cfg))
    assert dev.queue_max_sizes == (size, size)


def test_legacy_backend_is_refused() -> None:
    with pytest.raises(VirtioConfigError, match="VERSION_1"):
        b.VirtioBlkDevice(FakeBlkBackend(1 << b.VIRTIO_BLK_F_FLUSH, b.BlkConfig(capacity=8)))


def test_activate_hands_the_rings_over_and_reset_stops_them() -> None:
    backend = FakeBlkBackend(MODERN, b.BlkConfig(capacity=8))
    dev = b.VirtioBlkDevice(backend)
    with pytest.raises(VirtioActivationError):
        dev.activate(ActivationContext(MODERN, []))
    q = QueueConfig(0, 128, True, 0x1000, 0x2000, 0x3000)
    dev.activate(ActivationContext(MODERN, [q]))
    assert dev.active and backend.activated[0].queues == [q]
    dev.reset()
    assert not dev.active and backend.resets == 1


def test_config_layout_matches_virtio_blk_config_offsets() -> None:
    # struct virtio_blk_config (virtio 1.2 §5.2.4): num_queues at 34, max_discard_sectors at
    # 36, max_write_zeroes_sectors at 48, write_zeroes_may_unmap at 56.
    raw = b.BlkConfig(capacity=1, num_queues=0x1234, max_discard_sectors=0x55667788,
                      max_write_zeroes_sectors=0x11223344, write_zeroes_may_unmap=1).pack()
    assert raw[34:36] == (0x1234).to_bytes(2, "little")
    assert raw[36:40] == (0x55667788).to_bytes(4, "little")
    assert raw[48:52] == (0x11223344).to_bytes(4, "little")
    assert raw[56] == 1
    assert b.BlkConfig.unpack(raw).num_queues == 0x1234


def test_constants_and_config_offsets_match_linux_virtio_blk_h(tmp_path) -> None:
    """Every VIRTIO_BLK_* value and the config field offsets, from the kernel's header."""
    import shutil
    import subprocess

    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is missing: scripts/setup installs it"
    names = [n for n in dir(b) if n.startswith("VIRTIO_BLK_") and n not in (
        "VIRTIO_BLK_ID_BYTES", "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP")]
    fields = ["capacity", "seg_max", "blk_size", "num_queues", "max_discard_sectors",
              "max_discard_seg", "discard_sector_alignment", "max_write_zeroes_sectors",
              "max_write_zeroes_seg", "write_zeroes_may_unmap"]
    src = tmp_path / "blk.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/virtio_blk.h>\nint main(void){\n"
        + "".join(f'printf("{n} %lld\\n", (long long){n});\n' for n in names)
        + "".join(f'printf("off_{f} %zu\\n", offsetof(struct virtio_blk_config, {f}));\n'
                  for f in fields)
        + 'printf("VIRTIO_BLK_ID_BYTES %d\\n", VIRTIO_BLK_ID_BYTES);\n'
        + 'printf("UNMAP %d\\n", VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);\nreturn 0;}\n')
    exe = tmp_path / "blk"
    subprocess.run([gcc, str(src), "-o", str(exe)], check=True, capture_output=True)
    out = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    for n in names:
        assert int(out[n]) == getattr(b, n), n
    assert int(out["VIRTIO_BLK_ID_BYTES"]) == b.VIRTIO_BLK_ID_BYTES
    assert int(out["UNMAP"]) == b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    offsets = {"capacity": 0, "seg_max": 12, "blk_size": 20, "num_queues": 34,
               "max_discard_sectors": 36, "max_discard_seg": 40, "discard_sector_alignment": 44,
               "max_write_zeroes_sectors": 48, "max_write_zeroes_seg": 52,
               "write_zeroes_may_unmap": 56}
    for f in fields:
        assert int(out[f"off_{f}"]) == offsets[f], f


# ---- what mutation testing of blk.py showed unchecked ----------------------------------------

#: A value for every field pymvm sets, each different, none the default.
EVERY_FIELD = b.BlkConfig(capacity=0x0102030405060708, size_max=0x11121314, seg_max=0x21222324,
                          blk_size=4096, num_queues=0x3132, max_discard_sectors=0x41424344,
                          max_discard_seg=0x51525354, discard_sector_alignment=0x61626364,
                          max_write_zeroes_sectors=0x71727374, max_write_zeroes_seg=0x01020304,
                          write_zeroes_may_unmap=1, writeback=1)


def test_packed_config_holds_each_field_at_its_offset_and_zeros_everywhere_else() -> None:
    expected = bytearray(b.CONFIG_SIZE)  # geometry, topology, unused0, unused1: all zero
    for offset, size, value in [(0, 8, 0x0102030405060708), (8, 4, 0x11121314), (12, 4, 0x21222324),
                                (20, 4, 4096), (32, 1, 1), (34, 2, 0x3132), (36, 4, 0x41424344),
                                (40, 4, 0x51525354), (44, 4, 0x61626364), (48, 4, 0x71727374),
                                (52, 4, 0x01020304), (56, 1, 1)]:
        expected[offset : offset + size] = value.to_bytes(size, "little")
    assert EVERY_FIELD.pack() == bytes(expected)


def test_unpack_reads_back_every_field_pack_wrote() -> None:
    assert b.BlkConfig.unpack(EVERY_FIELD.pack()) == EVERY_FIELD


def test_a_short_config_read_unpacks_with_the_missing_fields_zero() -> None:
    assert b.BlkConfig.unpack((1234).to_bytes(8, "little")) == b.BlkConfig(
        capacity=1234, blk_size=0, num_queues=0)


class ShortConfigBackend(FakeBlkBackend):
    def __init__(self, size: int) -> None:
        super().__init__(MODERN, b.BlkConfig(capacity=99))
        self.config = self.config[:size]


def test_a_back_end_config_space_of_just_the_capacity_is_enough() -> None:
    assert b.VirtioBlkDevice(ShortConfigBackend(8)).capacity == 99


def test_a_back_end_config_space_shorter_than_the_capacity_is_refused_exactly() -> None:
    with pytest.raises(VirtioConfigError) as e:
        b.VirtioBlkDevice(ShortConfigBackend(7))
    assert str(e.value) == "virtio-blk: the back-end's config space has no capacity field"


@pytest.mark.parametrize(("queues", "accepted"), [(64, True), (65, False), (0, False)])
def test_an_mq_back_end_may_report_1_to_64_queues(queues: int, accepted: bool) -> None:
    backend = FakeBlkBackend(MODERN | 1 << b.VIRTIO_BLK_F_MQ, b.BlkConfig(capacity=8, num_queues=queues))
    if accepted:
        assert len(b.VirtioBlkDevice(backend).queue_max_sizes) == queues
        return
    with pytest.raises(VirtioConfigError) as e:
        b.VirtioBlkDevice(backend)
    assert str(e.value) == f"virtio-blk: the back-end reports {queues} queues; 1..64 work"


def test_a_read_only_disk_keeps_the_back_ends_other_features() -> None:
    offered = MODERN | 1 << b.VIRTIO_BLK_F_FLUSH
    dev = b.VirtioBlkDevice(FakeBlkBackend(offered, b.BlkConfig(capacity=8)), read_only=True)
    assert dev.avail_features() == offered | 1 << b.VIRTIO_BLK_F_RO


def test_config_writes_go_to_the_back_end() -> None:
    backend = FakeBlkBackend(MODERN, b.BlkConfig(capacity=8))
    b.VirtioBlkDevice(backend).write_config(32, bytearray(b"\x01"))
    assert backend.config_writes == [(32, b"\x01")]


def test_activation_hands_the_memory_regions_over_and_logs_the_device_name() -> None:
    from structlog.testing import capture_logs

    backend = FakeBlkBackend(MODERN, b.BlkConfig(capacity=8))
    seen: list = []
    backend.activate = lambda ctx, mem_regions: seen.append(mem_regions)  # type: ignore[method-assign]
    dev = b.VirtioBlkDevice(backend, name="disk1")
    assert not dev.active
    q = QueueConfig(0, 128, True, 0x1000, 0x2000, 0x3000)
    with capture_logs() as logs:
        dev.activate(ActivationContext(MODERN, [q], mem_regions=("ram",)))
    assert seen == [("ram",)]
    assert [e["device"] for e in logs if e["event"] == "virtio-blk activated"] == ["disk1"]


def test_activation_without_a_ready_queue_is_refused_exactly() -> None:
    dev = b.VirtioBlkDevice(FakeBlkBackend(MODERN, b.BlkConfig(capacity=8)))
    with pytest.raises(VirtioActivationError) as e:
        dev.activate(ActivationContext(MODERN, []))
    assert str(e.value) == "virtio-blk: the driver made no queue ready"
