"""The virtio-net device model (virtio 1.2 spec 5.1): control plane only.

Feature negotiation and the config space live here; the rx/tx rings are handed to a NetBackend
(in-kernel vhost-net or a vhost-user process) at DRIVER_OK.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
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

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_MAX_SIZE = 256
MTU_MIN = 68  # the IPv4 minimum; Linux rejects a smaller advised MTU
MTU_MAX = 0xFFFF

# Back-end feature bits pymvm knows how to pass through. The control queue (and with it MQ) is
# deliberately absent: the VMM would have to serve it, and vhost back-ends do not.
PASSTHROUGH_FEATURES = c.feature_mask(
    c.VIRTIO_NET_F_CSUM,
    c.VIRTIO_NET_F_GUEST_CSUM,
    c.VIRTIO_NET_F_GUEST_TSO4,
    c.VIRTIO_NET_F_GUEST_TSO6,
    c.VIRTIO_NET_F_GUEST_ECN,
    c.VIRTIO_NET_F_GUEST_UFO,
    c.VIRTIO_NET_F_HOST_TSO4,
    c.VIRTIO_NET_F_HOST_TSO6,
    c.VIRTIO_NET_F_HOST_ECN,
    c.VIRTIO_NET_F_HOST_UFO,
    c.VIRTIO_NET_F_MRG_RXBUF,
    c.VIRTIO_RING_F_EVENT_IDX,
    c.VIRTIO_RING_F_INDIRECT_DESC,
)

# What every back-end kind a NIC may be swapped to implements (``swappable = true``): the
# ring layout features. The offloads are left out: DPDK's vhost PMD drops the TSO bits unless
# started with tso=1, and OVS-DPDK offers no checksum or segmentation offload without
# userspace-tso-enable; vhost-net and the built-in back-end have them all (docs/config.md).
SWAPPABLE_FEATURES = c.feature_mask(
    c.VIRTIO_NET_F_MRG_RXBUF,
    c.VIRTIO_RING_F_EVENT_IDX,
    c.VIRTIO_RING_F_INDIRECT_DESC,
)


class NetBackend(Protocol):
    """The data plane of a virtio-net device (vhost-net, vhost-user)."""

    def features(self) -> int:
        """The virtio feature bits the back-end can handle."""

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        """Start moving packets on ``ctx.queues`` with ``ctx.acked_features``."""

    def reset(self) -> None:
        """Stop using the rings; the driver may set them up again."""


def _check_mac(mac: bytes) -> bytes:
    mac = bytes(mac)
    if len(mac) != c.VIRTIO_NET_ETH_ALEN:
        raise VirtioConfigError(f"virtio-net MAC must be 6 bytes, got {len(mac)}: {mac.hex(':')}")
    if mac[0] & 1:
        raise VirtioConfigError(
            f"virtio-net MAC {mac.hex(':')} is multicast; clear the low bit of the first byte"
        )
    return mac


class VirtioNetDevice(VirtioDevice):
    """A virtio-net device with one rx/tx queue pair served by ``backend``."""

    device_type = c.VIRTIO_ID_NET

    def __init__(
        self, mac: bytes, mtu: int | None, backend: NetBackend, queue_pairs: int = 1,
        features_mask: int = PASSTHROUGH_FEATURES,
    ) -> None:
        self.mac = _check_mac(mac)
        if mtu is not None and not MTU_MIN <= mtu <= MTU_MAX:
            raise VirtioConfigError(f"virtio-net MTU {mtu} is outside {MTU_MIN}..{MTU_MAX}")
        if queue_pairs != 1:
            raise VirtioConfigError(
                f"virtio-net with {queue_pairs} queue pairs needs VIRTIO_NET_F_MQ and a control "
                "queue, which pymvm does not offer; use queue_pairs=1"
            )
        self.mtu = mtu
        self.backend = backend
        self.queue_pairs = queue_pairs
        self.queue_max_sizes = (QUEUE_MAX_SIZE,) * (2 * queue_pairs)
        self.link_up = True
        self.active = False
        #: The back-end bits the guest may be offered (SWAPPABLE_FEATURES for a swappable NIC).
        self.features_mask = features_mask & PASSTHROUGH_FEATURES
        #: What the rings were handed over with at DRIVER_OK (None while the driver is not up):
        #: a back-end swap starts the next back-end with the same context.
        self.activation: ActivationContext | None = None
        self._log = log.bind(device="virtio-net", mac=self.mac.hex(":"))

    def avail_features(self) -> int:
        own = c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_NET_F_MAC, c.VIRTIO_NET_F_STATUS)
        if self.mtu is not None:
            own |= 1 << c.VIRTIO_NET_F_MTU
        return own | (self.backend.features() & self.features_mask)

    def config_bytes(self) -> bytes:
        # struct virtio_net_config up to mtu; the driver reads it little-endian (VERSION_1).
        status = c.VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, self.queue_pairs, self.mtu or 0)

    def set_link_up(self, up: bool) -> None:
        """Change the link status the guest sees and tell it so (VIRTIO_NET_F_STATUS)."""
        if up != self.link_up:
            self.link_up = up
            self.signal_config_change()

    def activate(self, ctx: ActivationContext) -> None:
        missing = [q for q in range(2 * self.queue_pairs) if ctx.queue(q) is None]
        if missing:
            raise VirtioActivationError(
                f"virtio-net: the driver did not make queues {missing} ready; "
                "the guest driver must set up both rx and tx"
            )
        self.backend.activate(ctx, ctx.mem_regions)
        self.active = True
        self.activation = ctx
        self._log.info("virtio-net activated", features=hex(ctx.acked_features))

    def reset(self) -> None:
        self.active = False
        self.activation = None
        self.backend.reset()
