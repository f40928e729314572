"""Where a split virtqueue stands, for every back-end kind (vhost-net, vhost-user).

rust-vmm's virtio-queue has ``QueueState`` for the same purpose: the position of a ring is the
part of a device's state that lives neither in guest memory nor in the transport, so it is
what a back-end hands over when it stops (``VHOST_GET_VRING_BASE``, vhost-user
``GET_VRING_BASE``) and what the next back-end resumes at (``SET_VRING_BASE``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple


class RingPosition(NamedTuple):
    """Where a split ring stands: the next available entry the device will take, and the
    used ring's idx (what the device has returned)."""

    next_avail: int
    used_idx: int

    @property
    def in_flight(self) -> int:
        """Buffers taken from the available ring but not returned (0 after a clean stop)."""
        return (self.next_avail - self.used_idx) & 0xFFFF

    def resume_at(self) -> int:
        """Where the next back-end starts taking buffers: ``next_avail`` after a clean stop.
        Buffers a stopped back-end took and never returned would stay lost to the guest, and
        a back-end such as DPDK sets its used index to the base it is given: so resume at
        the used idx and let the next back-end process them again (a re-sent packet, or a
        receive buffer filled again)."""
        return self.used_idx if self.in_flight else self.next_avail


def read_u16(regions: Sequence[Any], hva: int) -> int | None:
    """A little-endian u16 of guest memory at host address ``hva``; None outside it."""
    for region in regions:
        offset = hva - region.host_addr
        if 0 <= offset <= region.size - 2:
            view = getattr(region, "view", None)
            if view is not None:  # a released view raises instead of touching unmapped memory
                try:
                    return int.from_bytes(view[offset:offset + 2], "little")
                except ValueError:
                    return None
            return ctypes.c_uint16.from_address(hva).value
    return None


def used_idx_at(regions: Sequence[Any], used_ring_hva: int) -> int:
    """The ``idx`` of the used ring at ``used_ring_hva`` (0 when guest memory is gone)."""
    value = read_u16(regions, used_ring_hva + 2)  # struct vring_used { flags; idx; ... }
    return 0 if value is None else value
