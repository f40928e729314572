"""Inflight I/O tracking for split rings (QEMU docs/interop/vhost-user.rst, "Inflight I/O
tracking"; VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).

The back-end records in a shared-memory region which descriptor heads it has taken from the
available ring and not yet returned. The front-end keeps the region (it got the fd with
GET_INFLIGHT_FD) and hands it to a restarted back-end (SET_INFLIGHT_FD), which resubmits what
the dead one left unfinished, so the guest sees neither an error nor a lost request.

Layout, per queue, the queues back to back, each padded to 64 bytes::

    struct QueueRegionSplit {          struct DescStateSplit {
        u64 features;                      u8  inflight;
        u16 version;        (1)            u8  padding[5];
        u16 desc_num;       (queue size)   u16 next;
        u16 last_batch_head;               u64 counter;   (fetch order)
        u16 used_idx;                  };
        DescStateSplit desc[desc_num];
    };

Sans-IO: :class:`InflightQueue` works on any writable byte view, the back-end's mapping of
the region or a test's bytearray.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

QUEUE_HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
ALIGNMENT = 64
VERSION = 1
_VERSION_OFF, _DESC_NUM_OFF, _LAST_BATCH_OFF, _USED_IDX_OFF = 8, 10, 12, 14
_U16 = struct.Struct("<H")


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, 64-byte aligned (as libvhost-user sizes it)."""
    raw = QUEUE_HEADER.size + DESC_STATE.size * queue_size
    return (raw + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def region_size(num_queues: int, queue_size: int) -> int:
    return num_queues * queue_region_size(queue_size)


@dataclass(frozen=True)
class Recovery:
    """What a restarted back-end does with a queue: resubmit ``heads`` (in fetch order) and
    resume popping the available ring at ``next_avail``."""

    heads: tuple[int, ...]
    next_avail: int


class InflightQueue:
    """One queue's part of the inflight region."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        if len(view) < queue_region_size(queue_size):
            raise ValueError(f"inflight region of {len(view)} bytes is too small for "
                             f"{queue_size} descriptors")
        self.view = view
        self.queue_size = queue_size
        self._counter = 0

    # -- fields ---------------------------------------------------------------------------

    def _u16(self, offset: int) -> int:
        return _U16.unpack_from(self.view, offset)[0]

    @property
    def desc_num(self) -> int:
        return self._u16(_DESC_NUM_OFF)

    @property
    def used_idx(self) -> int:
        return self._u16(_USED_IDX_OFF)

    @property
    def last_batch_head(self) -> int:
        return self._u16(_LAST_BATCH_OFF)

    def _desc_off(self, head: int) -> int:
        return QUEUE_HEADER.size + DESC_STATE.size * head

    def is_inflight(self, head: int) -> bool:
        return self.view[self._desc_off(head)] == 1

    def counter(self, head: int) -> int:
        return DESC_STATE.unpack_from(self.view, self._desc_off(head))[2]

    # -- back-end operations --------------------------------------------------------------

    def recover(self, used_idx: int) -> Recovery:
        """Called when the queue starts: ``used_idx`` is the used ring's idx in guest memory.

        A fresh region (desc_num 0, or another queue size) is initialized: nothing in flight.
        Otherwise a completion the dead back-end published in the used ring but did not
        record (it died between the two) is cleared first (spec: last_batch_head), then the
        heads still marked inflight are returned in the order they were fetched.
        """
        used_idx &= 0xFFFF
        if self.desc_num != self.queue_size or self._u16(_VERSION_OFF) != VERSION:
            self.view[: queue_region_size(self.queue_size)] = bytes(queue_region_size(self.queue_size))
            QUEUE_HEADER.pack_into(self.view, 0, 0, VERSION, self.queue_size, 0, used_idx)
            self._counter = 0
            return Recovery((), used_idx)
        if self.used_idx != used_idx:
            last = self.last_batch_head
            if last < self.queue_size:
                self.view[self._desc_off(last)] = 0
            _U16.pack_into(self.view, _USED_IDX_OFF, used_idx)
        pending = []
        top = 0
        for head in range(self.queue_size):
            inflight, _, counter = DESC_STATE.unpack_from(self.view, self._desc_off(head))
            top = max(top, counter)
            if inflight == 1:
                pending.append((counter, head))
            elif inflight:  # garbage from a hostile front-end: not ours to resubmit
                self.view[self._desc_off(head)] = 0
        pending.sort()
        self._counter = top
        return Recovery(tuple(h for _, h in pending), (used_idx + len(pending)) & 0xFFFF)

    def fetched(self, head: int) -> None:
        """``head`` was taken from the available ring (before the request runs)."""
        self._counter += 1
        DESC_STATE.pack_into(self.view, self._desc_off(head), 1, 0, self._counter)

    def begin_used(self, head: int) -> None:
        """About to publish ``head`` in the used ring."""
        _U16.pack_into(self.view, _LAST_BATCH_OFF, head)

    def end_used(self, head: int, used_idx: int) -> None:
        """``head`` is in the used ring, whose idx is now ``used_idx``."""
        self.view[self._desc_off(head)] = 0
        _U16.pack_into(self.view, _USED_IDX_OFF, used_idx & 0xFFFF)

    def sync_used_idx(self, used_idx: int) -> None:
        """The used idx moved without a tracked completion (a malformed chain handed back)."""
        _U16.pack_into(self.view, _USED_IDX_OFF, used_idx & 0xFFFF)

    def pending(self) -> list[int]:
        """Heads marked inflight now (for tests and logs)."""
        return [h for h in range(self.queue_size) if self.is_inflight(h)]
