"""virtio-blk (virtio 1.2 §5.2): the request format, the config space, and the device model.

The device model is control plane only, like virtio-net's: its features and config space come
from the back-end that serves the rings (a vhost-user-blk back-end, through GET_FEATURES and
GET_CONFIG), and ``activate()`` hands the rings to it. The request format and config layout
live here once, for the model and for pymvm's built-in back-end
(:mod:`pymvm.vhost.backends.blk`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import (
    ActivationContext,
    VirtioActivationError,
    VirtioConfigError,
    VirtioDevice,
)

log = structlog.get_logger()

# <linux/virtio_blk.h>: feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status byte values
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20  # GET_ID answers at most 20 bytes, not NUL-terminated if full
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
SECTOR_SIZE = 512  # request sectors are 512 bytes whatever blk_size says

#: struct virtio_blk_outhdr: type, reserved (ioprio), sector.
REQUEST_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
DISCARD_SEGMENT = struct.Struct("<QII")

#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes): capacity,
#: size_max, seg_max, geometry (cylinders, heads, sectors), blk_size, topology
#: (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused0,
#: num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
#: max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3].
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_SIZE = CONFIG.size

#: Back-end features pymvm passes between the guest and a vhost-user-blk back-end.
PASSTHROUGH_FEATURES = c.feature_mask(
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    c.VIRTIO_RING_F_EVENT_IDX,
    c.VIRTIO_RING_F_INDIRECT_DESC,
)
QUEUE_MAX_SIZE = 256
#: The largest queue offered to fit a back-end's seg_max (see queue_size_for).
QUEUE_SIZE_LIMIT = 1024


def queue_size_for(seg_max: int) -> int:
    """The queue size to offer a driver when requests carry up to ``seg_max`` data segments:
    QUEUE_MAX_SIZE, or the power of two that holds a whole request (seg_max + header +
    status) as one chain, since no chain may be longer than its queue (virtio 1.2
    §2.7.5.3.1), up to QUEUE_SIZE_LIMIT. A back-end that offers seg_max 510 gets 1 MiB of
    scattered 4 KiB pages as one request instead of two."""
    size = QUEUE_MAX_SIZE
    while size < seg_max + 2 and size < QUEUE_SIZE_LIMIT:
        size *= 2
    return size


@dataclass(frozen=True)
class BlkConfig:
    """The fields of struct virtio_blk_config that pymvm uses or sets."""

    capacity: int  # in 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = SECTOR_SIZE
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    writeback: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(self.capacity, self.size_max, self.seg_max, 0, 0, 0, self.blk_size,
                           0, 0, 0, 0, self.writeback, 0, self.num_queues,
                           self.max_discard_sectors, self.max_discard_seg,
                           self.discard_sector_alignment, self.max_write_zeroes_sectors,
                           self.max_write_zeroes_seg, self.write_zeroes_may_unmap)

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        """From a (possibly shorter, zero-extended) config space read."""
        f = CONFIG.unpack(bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0"))
        return cls(capacity=f[0], size_max=f[1], seg_max=f[2], blk_size=f[6], writeback=f[11],
                   num_queues=f[13], max_discard_sectors=f[14], max_discard_seg=f[15],
                   discard_sector_alignment=f[16], max_write_zeroes_sectors=f[17],
                   max_write_zeroes_seg=f[18], write_zeroes_may_unmap=f[19])


class BlkBackend(Protocol):
    """The data plane of a virtio-blk device: a vhost-user-blk front-end."""

    def features(self) -> int:
        """The virtio feature bits the back-end offers."""

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the back-end's config space at ``offset`` (GET_CONFIG)."""

    def set_config(self, offset: int, data: bytes) -> None:
        """Write the back-end's config space (SET_CONFIG)."""

    def activate(self, ctx: ActivationContext, mem_regions: Any) -> None:
        """Start serving ``ctx.queues``."""

    def reset(self) -> Any:
        """Stop using the rings."""


class VirtioBlkDevice(VirtioDevice):
    """A virtio-blk device whose requests a vhost-user-blk back-end serves.

    The config space is the back-end's (read once here with GET_CONFIG); the number of queues
    is the back-end's ``num_queues`` when it offers VIRTIO_BLK_F_MQ, else one.
    """

    device_type = c.VIRTIO_ID_BLOCK

    def __init__(self, backend: BlkBackend, *, read_only: bool = False,
                 name: str = "virtio-blk") -> None:
        self.backend = backend
        self.read_only = read_only
        offered = backend.features()
        if not offered >> c.VIRTIO_F_VERSION_1 & 1:
            raise VirtioConfigError(f"{name}: the back-end lacks VIRTIO_F_VERSION_1 (modern virtio)")
        self._config = bytearray(backend.get_config(0, CONFIG_SIZE))
        if len(self._config) < 8:
            raise VirtioConfigError(f"{name}: the back-end's config space has no capacity field")
        self.config = BlkConfig.unpack(self._config)
        queues = self.config.num_queues if offered >> VIRTIO_BLK_F_MQ & 1 else 1
        if not 1 <= queues <= 64:
            raise VirtioConfigError(f"{name}: the back-end reports {queues} queues; 1..64 work")
        self.queue_max_sizes = (queue_size_for(self.config.seg_max),) * queues
        self.active = False
        self._log = log.bind(device=name)

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def avail_features(self) -> int:
        features = self.backend.features() & PASSTHROUGH_FEATURES
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        return features | 1 << c.VIRTIO_F_VERSION_1

    def config_bytes(self) -> bytes:
        return bytes(self._config)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only `writeback` (CONFIG_WCE, not offered) is writable; pass it on like QEMU.
        self.backend.set_config(offset, bytes(data))

    def activate(self, ctx: ActivationContext) -> None:
        if not ctx.queues:
            raise VirtioActivationError("virtio-blk: the driver made no queue ready")
        self.backend.activate(ctx, ctx.mem_regions)
        self.active = True
        self._log.info("virtio-blk activated", features=hex(ctx.acked_features),
                       queues=[q.index for q in ctx.queues])

    def reset(self) -> None:
        self.active = False
        self.backend.reset()
