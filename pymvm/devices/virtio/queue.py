"""Split virtqueues (virtio 1.2 §2.7), device side, over guest memory reached through mmaps.

The driver (the guest, or a vhost-user front-end acting for it) is hostile: every index,
address and length read from the rings is checked before it is used, and every guest buffer
is a bounds-checked ``memoryview`` slice of a mapping, so nothing here can touch memory
outside the guest's. A malformed descriptor chain is returned to the driver unused (used
length 0) and logged; a ring that cannot be trusted any more (avail index jumping by more
than the queue size, a head index outside the table) marks the queue ``broken``: it then
yields nothing, and its owner should report DEVICE_NEEDS_RESET. No exception escapes
``pop_avail()``, ``add_used()`` or the notification helpers for anything the driver wrote.

Ring fields are little-endian (§2.7, VIRTIO_F_VERSION_1); native memoryview casts are used
for speed, which is correct on the little-endian hosts KVM runs on here.
"""

from __future__ import annotations

import bisect
import functools
import operator
import struct
import sys
import threading
from array import array
from collections.abc import Iterable
from itertools import repeat
from typing import Final

import structlog

from pymvm.devices.virtio.device import VirtioError

log = structlog.get_logger()

if sys.byteorder != "little":  # pragma: no cover - every KVM host pymvm targets is LE
    raise ImportError("pymvm's virtqueues assume a little-endian host")

# <linux/virtio_ring.h>
VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4
VRING_USED_F_NO_NOTIFY: Final = 1
VRING_AVAIL_F_NO_INTERRUPT: Final = 1

#: Split rings have at most 32768 entries (§2.7: Queue Size ... maximum 32768).
MAX_QUEUE_SIZE: Final = 32768
DESC_SIZE: Final = 16
#: Largest indirect table we walk; bounds the work one hostile chain can cost.
MAX_INDIRECT_DESCS: Final = MAX_QUEUE_SIZE

_DESC = struct.Struct("<QIHH")
_unpack_desc = _DESC.unpack_from

#: Log the first few dropped chains of a queue, then only every power of two (log floods).
_LOG_FIRST_DROPS: Final = 16


_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """A store->load fence (smp_mb). x86 may let a later load pass an earlier store; an
    uncontended lock acquire/release is a locked (fully fencing) instruction."""
    _barrier_lock.acquire()
    _barrier_lock.release()


class VirtQueueError(VirtioError):
    """A virtqueue cannot be set up: bad size, or rings outside / misaligned in guest memory."""


class GuestMemoryMap:
    """Guest-physical address -> ``memoryview`` translation over a set of mapped regions.

    ``regions`` are ``(gpa, view)`` pairs; each ``view`` is a writable, C-contiguous byte
    view of that region (a slice of an mmap: the VMM's own guest RAM, or a vhost-user
    back-end's mapping of the front-end's memory). Every lookup is bounds-checked; nothing
    returns a view that reaches outside a region.
    """

    def __init__(self, regions: Iterable[tuple[int, memoryview]]) -> None:
        ordered = sorted(regions, key=lambda r: r[0])
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._views: list[memoryview] = []
        for gpa, view in ordered:
            if view.readonly or view.itemsize != 1 or not view.c_contiguous:
                raise VirtQueueError(
                    f"guest memory region at {gpa:#x} is not a writable contiguous byte view; "
                    f"pass memoryview(mmap) slices"
                )
            size = view.nbytes
            if gpa < 0 or size == 0 or gpa + size > 1 << 64:
                raise VirtQueueError(
                    f"guest memory region at {gpa:#x} of {size:#x} bytes is empty or does not "
                    f"fit a 64-bit address space"
                )
            if self._ends and gpa < self._ends[-1]:
                raise VirtQueueError(
                    f"guest memory region at {gpa:#x} overlaps the region ending at "
                    f"{self._ends[-1]:#x}; regions must be disjoint"
                )
            self._starts.append(gpa)
            self._ends.append(gpa + size)
            self._views.append(view)
        #: (start, end, view) of the largest region: where guest RAM, and so almost every
        #: buffer, lives; ``VirtQueue.pop_writable`` checks it inline before a lookup.
        self.largest: tuple[int, int, memoryview] | None = None
        if self._views:
            i = max(range(len(self._views)), key=lambda j: self._ends[j] - self._starts[j])
            self.largest = (self._starts[i], self._ends[i], self._views[i])

    @property
    def regions(self) -> list[tuple[int, int]]:
        """The (gpa, size) of every region, in address order."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def contiguous(self, gpa: int, length: int) -> memoryview | None:
        """A view of ``[gpa, gpa+length)`` if one region holds all of it, else None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or length < 0:
            return None
        offset = gpa - self._starts[i]
        if gpa + length > self._ends[i]:
            return None
        return self._views[i][offset : offset + length]

    def segments(self, gpa: int, length: int) -> list[memoryview] | None:
        """Views covering ``[gpa, gpa+length)``, split where it crosses adjacent regions;
        None if any byte of it is outside guest memory."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or length < 0:
            return None
        end = gpa + length
        if end <= self._ends[i]:
            offset = gpa - self._starts[i]
            return [self._views[i][offset : offset + length]]
        if gpa >= self._ends[i]:
            return None
        out: list[memoryview] = []
        while True:
            start = self._starts[i]
            stop = min(end, self._ends[i])
            out.append(self._views[i][gpa - start : stop - start])
            if stop == end:
                return out
            gpa = stop
            i += 1
            if i == len(self._starts) or self._starts[i] != gpa:
                return None  # a hole follows this region

    def release(self) -> None:
        """Drop the region views (so the owner can close the mappings)."""
        self.largest = None
        self._starts.clear()
        self._ends.clear()
        self._views.clear()


class DescriptorChain:
    """One available buffer: its head index and the guest buffers it names (§2.7.5).

    ``readable`` are the device-readable (driver-written) parts in order, ``writable`` the
    device-writable ones; each is a list of bounds-checked views into guest memory.
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int | None = None, writable_len: int | None = None) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        # Byte counts, summed once (the walk knows them): back-ends test them per packet.
        self.readable_len = sum(v.nbytes for v in readable) if readable_len is None else readable_len
        self.writable_len = sum(v.nbytes for v in writable) if writable_len is None else writable_len

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable_len}B/"
                f"{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})")


class BulkChain(DescriptorChain):
    """A chain read in bulk from an indirect table (:func:`_straight_table`): its buffers,
    all inside the memory region ``region`` (guest-physical ``region_gpa`` onwards), as
    ``addrs``/``lens`` lists, the first ``split`` device-readable and the rest
    device-writable. ``readable``/``writable`` views are made only when asked for: a
    device that hands the addresses to the kernel (preadv/pwritev) skips one Python
    object per descriptor, which was most of a 1 MiB disk request's cost."""

    __slots__ = ("_addrs", "_views", "lanes", "lens", "region", "region_gpa", "split", "table")

    def __init__(self, head: int, region: memoryview, region_gpa: int, addrs: list[int] | None,
                 lens: list[int], split: int, table: bytes | None = None,
                 lanes: int | None = None) -> None:
        self.head = head
        self.region, self.region_gpa = region, region_gpa
        self._addrs, self.lens, self.split = addrs, lens, split
        #: The indirect table as read and checked (16 bytes an entry), when there was one:
        #: ``addrs`` (listed only when asked for) and ``lens`` come from it, and a device may
        #: take them from it in bulk.
        self.table = table
        #: The same as one integer of 128-bit lanes (address + length << 64), when the
        #: bounds check made it (:func:`_lanes_inside`).
        self.lanes = lanes
        self.readable_len = sum(lens[:split])
        self.writable_len = sum(lens[split:])
        self._views: list[memoryview] | None = None

    @property
    def addrs(self) -> list[int]:
        """The buffers' guest addresses."""
        if self._addrs is None:
            assert self.table is not None
            self._addrs = memoryview(self.table).cast("Q")[0::2].tolist()
        return self._addrs

    def addr(self, i: int) -> int:
        """Buffer ``i``'s guest address (without listing them all)."""
        if self._addrs is None and self.table is not None:
            return _U64_AT(self.table, 16 * (i % len(self.lens)))[0]
        return self.addrs[i]

    def views(self, first: int = 0, stop: int | None = None) -> list[memoryview]:
        """Views of buffers ``first`` to ``stop`` (all by default)."""
        addrs, lens = self.addrs[first:stop], self.lens[first:stop]
        starts = list(map(operator.sub, addrs, repeat(self.region_gpa, len(addrs))))
        return list(map(self.region.__getitem__,
                        map(slice, starts, map(operator.add, starts, lens))))

    @property
    def readable(self) -> list[memoryview]:  # type: ignore[override]
        if self._views is None:
            self._views = self.views()
        return self._views[: self.split]

    @property
    def writable(self) -> list[memoryview]:  # type: ignore[override]
        if self._views is None:
            self._views = self.views()
        return self._views[self.split :]


class _InvalidChain(Exception):
    """Internal: the chain being walked is malformed (never leaves this module)."""


class VirtQueue:
    """The device side of one split virtqueue.

    ``desc_gpa``/``avail_gpa``/``used_gpa`` are guest-physical addresses of the descriptor
    table, available ring and used ring. ``next_avail`` is where to resume popping (vhost-user
    SET_VRING_BASE); ``next_used`` defaults to the used ring's current idx.
    """

    def __init__(
        self,
        memory: GuestMemoryMap,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int | None = None,
        name: str = "vq",
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtQueueError(
                f"{name}: queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}"
            )
        for what, gpa, align in (("descriptor table", desc_gpa, 16), ("available ring", avail_gpa, 2),
                                  ("used ring", used_gpa, 4)):
            if gpa % align:
                raise VirtQueueError(
                    f"{name}: {what} at {gpa:#x} is not {align}-byte aligned (virtio 1.2 §2.7)"
                )
        desc = memory.contiguous(desc_gpa, DESC_SIZE * size)
        avail = memory.contiguous(avail_gpa, 6 + 2 * size)
        used = memory.contiguous(used_gpa, 6 + 8 * size)
        for what, view, gpa in (("descriptor table", desc, desc_gpa), ("available ring", avail, avail_gpa),
                                ("used ring", used, used_gpa)):
            if view is None:
                raise VirtQueueError(
                    f"{name}: {what} at {gpa:#x} for {size} entries is not inside one guest "
                    f"memory region; the driver gave a bad ring address"
                )
        assert desc is not None and avail is not None and used is not None
        # The device writes the used ring: laid over the available ring or the descriptor
        # table, each used entry would change what the driver published, and a walk that
        # gives chains back (dropping them) could feed itself forever.
        used_end = used_gpa + 6 + 8 * size
        for what, gpa, length in (("available ring", avail_gpa, 6 + 2 * size),
                                  ("descriptor table", desc_gpa, DESC_SIZE * size)):
            if gpa < used_end and used_gpa < gpa + length:
                raise VirtQueueError(
                    f"{name}: used ring at {used_gpa:#x} for {size} entries overlaps the {what} "
                    f"at {gpa:#x}; the driver gave a bad ring address"
                )
        self.name = name
        self.size = size
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc = desc
        self._avail16 = avail.cast("H")  # [0] flags, [1] idx, [2+i] ring, [2+size] used_event
        self._used16 = used.cast("H")  # [0] flags, [1] idx, [2+4*size] avail_event
        self._used32 = used[4 : 4 + 8 * size].cast("I")  # [2i] id, [2i+1] len
        self._views = [desc, avail, used, self._avail16, self._used16, self._used32]
        self._last_avail = next_avail & 0xFFFF
        self._next_used = self._used16[1] if next_used is None else next_used & 0xFFFF
        self._signalled_used = self._next_used
        self._signalled_valid = False
        self.broken: str | None = None
        self.dropped_chains = 0
        #: Read indirect tables of the usual shape and at least this many entries in bulk
        #: (:class:`BulkChain`); 0: never. A device that passes guest addresses straight to
        #: the kernel (blk) sets it: below some 20 entries the plain walk costs less.
        self.bulk_indirect = 0

    # -- state ----------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """The next avail ring slot to pop (what vhost-user GET_VRING_BASE reports)."""
        return self._last_avail

    @property
    def next_used_idx(self) -> int:
        return self._next_used

    def set_last_avail(self, idx: int) -> None:
        """Resume popping at avail ring position ``idx`` (inflight recovery)."""
        self._last_avail = idx & 0xFFFF

    def has_avail(self) -> bool:
        return self.broken is None and self._avail16[1] != self._last_avail

    def release(self) -> None:
        """Drop every view of guest memory this queue holds; it is unusable afterwards."""
        self.broken = self.broken or "released"
        for view in reversed(self._views):
            view.release()
        self._views.clear()

    # -- the driver's buffers -------------------------------------------------------------

    def pop_avail(self) -> DescriptorChain | None:
        """The next well-formed available chain, or None (ring empty or broken).

        Malformed chains met on the way are handed back to the driver with used length 0.
        """
        if self.broken is not None:
            return None
        try:
            while True:
                pending = (self._avail16[1] - self._last_avail) & 0xFFFF
                if pending == 0:
                    return None
                if pending > self.size:
                    self._break(f"avail idx is {pending} entries ahead, more than the queue size")
                    return None
                head = self._avail16[2 + (self._last_avail & (self.size - 1))]
                self._last_avail = (self._last_avail + 1) & 0xFFFF
                if head >= self.size:
                    # Not a descriptor we could hand back: the ring itself is corrupt.
                    self._break(f"avail ring names head {head}, outside the {self.size}-entry table")
                    return None
                try:
                    return self._walk(head)
                except _InvalidChain as e:
                    self._drop(head, str(e))
        except (ValueError, IndexError, TypeError, struct.error) as e:  # released views
            self._break(f"ring access failed: {e}")
            return None

    def chain_at(self, head: int) -> DescriptorChain | None:
        """The chain at descriptor ``head`` without popping it: a request a dead back-end
        took from the ring and a restarted one resubmits (inflight tracking). A malformed
        chain or head is handed back unused; None then."""
        if self.broken is not None or not self._views:
            return None
        if not 0 <= head < self.size:
            self._break(f"resubmitted head {head} is outside the {self.size}-entry table")
            return None
        try:
            return self._walk(head)
        except _InvalidChain as e:
            self._drop(head, str(e))
        except (ValueError, IndexError, TypeError, struct.error) as e:  # released views
            self._break(f"ring access failed: {e}")
        return None

    def pop_writable(self, views: list[memoryview], used: list[int], nsegs: list[int],
                     want: int, min_len: int) -> int:
        """Pop available chains of device-writable buffers until they hold ``want`` bytes or
        the ring is empty; the number of bytes they hold.

        The receive-side batch form of ``pop_avail``, for devices that fill many small
        buffers per packet (virtio-net's mergeable RX buffers): each chain's buffers are
        appended to ``views``, its ``head, writable bytes`` pair to ``used`` (ready for
        ``add_used_batch`` once the length is known) and its buffer count to ``nsegs``. A
        chain of one writable descriptor in the largest memory region, the shape drivers
        post, is checked inline; any other goes through the full walk. Chains that hold
        device-readable buffers or fewer than ``min_len`` bytes are handed back unused.
        """
        if self.broken is not None or not self._views:
            return 0
        got = 0
        size = self.size
        mask = size - 1
        avail16 = self._avail16
        desc = self._desc
        unpack = _unpack_desc
        largest = self.memory.largest
        lo, hi, region = largest if largest is not None else (0, 0, None)
        last = self._last_avail
        write = VRING_DESC_F_WRITE
        # At most one ring's worth per call: the buffers handed out (or dropped) may lie over
        # the available ring, and writing them must not keep one call going forever.
        budget = size
        try:
            while got < want and budget > 0:
                pending = (avail16[1] - last) & 0xFFFF
                if pending == 0:
                    break
                if pending > size:
                    self._break(f"avail idx is {pending} entries ahead, more than the queue size")
                    break
                pending = min(pending, budget)
                # The published entries up to the ring's end, in one read.
                start = last & mask
                for head in avail16[2 + start : 2 + min(start + pending, size)].tolist():
                    last = (last + 1) & 0xFFFF
                    budget -= 1
                    if head >= size:
                        self._break(f"avail ring names head {head}, outside the {size}-entry table")
                        return got
                    addr, length, flags, _ = unpack(desc, head << 4)
                    if flags == write and length >= min_len and lo <= addr and addr + length <= hi:
                        views.append(region[addr - lo : addr - lo + length])  # type: ignore[index]
                        used += (head, length)
                        nsegs.append(1)
                        got += length
                    else:
                        got += self._pop_writable_slow(head, views, used, nsegs, min_len)
                    if got >= want:
                        break
        except (ValueError, IndexError, TypeError, struct.error) as e:  # released views
            self._break(f"ring access failed: {e}")
        finally:
            self._last_avail = last
        return got

    def _pop_writable_slow(self, head: int, views: list[memoryview], used: list[int],
                           nsegs: list[int], min_len: int) -> int:
        try:
            chain = self._walk(head)
        except _InvalidChain as e:
            self._drop(head, str(e))
            return 0
        if chain.readable:
            self._drop(head, "device-readable buffers in a chain the device only writes to")
            return 0
        if chain.writable_len < min_len:
            self._drop(head, f"chain of {chain.writable_len} bytes, shorter than the "
                             f"{min_len} the device needs")
            return 0
        views += chain.writable
        used += (head, chain.writable_len)
        nsegs.append(len(chain.writable))
        return chain.writable_len

    def _walk(self, head: int) -> DescriptorChain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table = self._desc
        table_size = self.size
        index = head
        budget = table_size  # a chain longer than its table must loop (§2.7.5.2)
        in_indirect = False
        memory = self.memory
        largest = memory.largest
        lo, hi, region = largest if largest is not None else (0, 0, None)
        readable_len = writable_len = 0
        while True:
            if budget == 0:
                raise _InvalidChain(f"chain from head {head} is longer than its table (a loop?)")
            budget -= 1
            addr, length, flags, nxt = _unpack_desc(table, index << 4)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise _InvalidChain("indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC is off")
                if in_indirect:
                    raise _InvalidChain("indirect descriptor inside an indirect table (§2.7.5.3.1)")
                if flags & VRING_DESC_F_NEXT:
                    raise _InvalidChain("descriptor sets both INDIRECT and NEXT (§2.7.5.3.1)")
                count = length // DESC_SIZE
                if length % DESC_SIZE or not 0 < count <= MAX_INDIRECT_DESCS:
                    raise _InvalidChain(f"indirect table of {length} bytes is empty, ragged or too big")
                view = memory.contiguous(addr, length)
                if view is None:
                    raise _InvalidChain(f"indirect table at {addr:#x}+{length:#x} is outside guest memory")
                if (self.bulk_indirect and count >= self.bulk_indirect and not readable
                        and not writable and region is not None):
                    chain = _straight_table(head, view, count, lo, hi, region)
                    if chain is not None:
                        return chain
                table, table_size, index, budget, in_indirect = view, count, 0, count, True
                continue
            if length:
                if lo <= addr and addr + length <= hi:  # the usual case, checked inline
                    segs = [region[addr - lo : addr - lo + length]]  # type: ignore[index]
                else:
                    segs = memory.segments(addr, length)
                    if segs is None:
                        raise _InvalidChain(f"buffer {addr:#x}+{length:#x} is outside guest memory")
                if flags & VRING_DESC_F_WRITE:
                    writable += segs
                    writable_len += length
                elif writable:
                    raise _InvalidChain("device-readable buffer after a device-writable one (§2.7.4.2)")
                else:
                    readable += segs
                    readable_len += length
            if not flags & VRING_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, readable_len, writable_len)
            if nxt >= table_size:
                raise _InvalidChain(f"next index {nxt} is outside the {table_size}-entry table")
            index = nxt

    def _drop(self, head: int, reason: str) -> None:
        self.dropped_chains += 1
        n = self.dropped_chains
        if n <= _LOG_FIRST_DROPS or not n & (n - 1):
            log.warning("virtqueue.chain_dropped", queue=self.name, head=head, reason=reason,
                        dropped=n)
        self.add_used(head, 0)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            log.error("virtqueue.broken", queue=self.name, reason=reason,
                      hint="the driver corrupted the ring; the device needs a reset")
            self.broken = reason

    def drop_chain(self, chain: DescriptorChain, reason: str) -> None:
        """Give back a chain the device cannot use (wrong buffer directions, too short...)."""
        self._drop(chain.head, reason)

    def add_used(self, head: int, length: int) -> None:
        """Return ``head`` to the driver with ``length`` bytes written, and publish used idx."""
        if not self._views:
            return
        slot = self._next_used & (self.size - 1)
        self._used32[2 * slot] = head
        # The used length is 32 bits: a chain whose writable descriptors overlap can add up
        # to more (a hostile guest's), and the most a device reports then is 2^32 - 1.
        self._used32[2 * slot + 1] = length if length <= 0xFFFFFFFF else 0xFFFFFFFF
        self._next_used = (self._next_used + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the idx that publishes it.
        self._used16[1] = self._next_used

    def add_used_batch(self, entries: list[int]) -> None:
        """Return many chains at once: ``entries`` is ``[head, length, head, length, ...]``
        (as ``pop_writable`` builds it), written in one or two slice stores, then one used
        idx update publishes them all."""
        if not self._views or not entries:
            return
        count = len(entries) // 2
        slot = self._next_used & (self.size - 1)
        first = min(count, self.size - slot)
        self._used32[2 * slot : 2 * (slot + first)] = array("I", entries[: 2 * first])
        if count > first:  # the batch wraps around the end of the ring
            self._used32[: 2 * (count - first)] = array("I", entries[2 * first :])
        self._next_used = (self._next_used + count) & 0xFFFF
        self._used16[1] = self._next_used

    # -- notifications (§2.7.7, §2.7.10) --------------------------------------------------

    def needs_notification(self) -> bool:
        """Whether to signal the driver for the used entries added since the last call.

        Call once per batch; it records what the driver has been told about.
        """
        if not self._views:
            return False
        old, new = self._signalled_used, self._next_used
        valid = self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        if valid and old == new:
            return False
        full_barrier()  # our used idx store before reading the driver's suppression fields
        if self.event_idx:
            if not valid:
                return True
            used_event = self._avail16[2 + self.size]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT

    def disable_notification(self) -> None:
        """Ask the driver not to kick while the device is busy polling the ring."""
        if self._views and not self.event_idx:
            self._used16[0] = VRING_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for a kick when more buffers come; True if some already came (poll again)."""
        if not self._views:
            return False
        if self.event_idx:
            self._used16[2 + 4 * self.size] = self._last_avail
        else:
            self._used16[0] = 0
        full_barrier()  # publish "kick me" before re-reading avail idx, or a kick is lost
        return self.has_avail()


_NEXT_ONLY: Final = frozenset((VRING_DESC_F_NEXT,))
_NEXT_WRITE: Final = frozenset((VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,))
_NEXT_ANY: Final = _NEXT_ONLY | _NEXT_WRITE


@functools.lru_cache(maxsize=64)
def _disk_shapes(count: int) -> dict[bytes, int]:
    """The flags and next fields (one u32 each: flags | next << 16) of a ``count``-entry
    table in the two shapes Linux's virtio-blk builds, mapped to their split: a read (one
    readable header, then writable data and status) and a write (readable header and data,
    a writable status)."""
    def links(split: int) -> bytes:
        words = [(VRING_DESC_F_NEXT | (VRING_DESC_F_WRITE if i >= split else 0)) | (i + 1) << 16
                 for i in range(count - 1)]
        words.append(VRING_DESC_F_WRITE if split < count else 0)
        return array("I", words).tobytes()

    return {links(split): split for split in {1, count - 1}}


def _straight_table(head: int, table: memoryview, count: int, lo: int, hi: int,
                    region: memoryview) -> BulkChain | None:
    """The chain an indirect table describes, read in bulk, when it has the shape drivers
    build (Linux's virtio_ring for a disk request of up to seg_max segments): entry i names
    i + 1 as next and the last none, device-readable buffers then device-writable ones, no
    empty buffer, every buffer inside the memory region ``[lo, hi)`` (``region``). None for
    anything else, which the descriptor-by-descriptor walk then checks (rejecting or
    accepting it) as before; this accepts nothing that walk would not, with C loops
    (memoryview casts, byte compares, map) instead of Python ones.

    The table is copied once and everything is checked on, and taken from, that copy
    (``BulkChain.table``): a guest rewriting it meanwhile changes nothing."""
    raw = table.tobytes()
    words = memoryview(raw).cast("I")
    split = _disk_shapes(count).get(words[3::4].tobytes())
    if split is None:
        split = _straight_split(memoryview(raw).cast("H"), count)
        if split is None:
            return None
    lens = words[2::4].tolist()
    if 0 in lens:
        return None
    if hi < _U64:
        lanes = _lanes_inside(raw, count, lo, hi)
        if lanes is None:
            return None
        return BulkChain(head, region, lo, None, lens, split, raw, lanes)
    addrs = memoryview(raw).cast("Q")[0::2].tolist()  # a region that ends at 2**64
    if min(addrs) < lo or max(map(operator.add, addrs, lens)) > hi:
        return None
    return BulkChain(head, region, lo, addrs, lens, split, raw)


_U64: Final = 1 << 64
_U64_AT = struct.Struct("<Q").unpack_from


@functools.lru_cache(maxsize=64)
def _bounds_lanes(count: int, lo: int, hi: int) -> tuple[int, int, int, int, int, int]:
    """The constants of :func:`_lanes_inside` for ``count`` lanes and the bounds
    ``[lo, hi)``: masks for the addresses, the lengths (shifted down) and both, bit 64 of
    every lane, and 2**64 - lo and 2**64 - 1 - hi in every lane."""
    one = int.from_bytes(struct.pack("<QQ", 1, 0) * count, "little")  # 1 in every lane
    carry = one << 64
    return (carry - one, one * 0xFFFFFFFF, (carry - one) | one * 0xFFFFFFFF << 64, carry,
            one * (_U64 - lo), one * (_U64 - 1 - hi))


def _lanes_inside(raw: bytes, count: int, lo: int, hi: int) -> int | None:
    """The ``count``-entry table ``raw`` as one integer of 128-bit lanes, a buffer's address
    + length << 64 each (flags and next masked off), if every buffer lies in ``[lo, hi)``
    (``hi`` < 2**64); else None. A few big-integer operations over the whole table: a sum
    that reaches bit 64 of its lane says which side of a bound its buffer is on, and none
    reaches bit 128 (addresses stay below 2**64, lengths below 2**32), so no lane carries
    into the next."""
    addr_mask, len_mask, keep, carry, above_lo, below_hi = _bounds_lanes(count, lo, hi)
    table = int.from_bytes(raw, "little")
    addrs = table & addr_mask
    # addr >= lo  <=>  addr + 2**64 - lo carries into bit 64, in every lane
    if (addrs + above_lo) & carry != carry:
        return None
    # addr + len <= hi  <=>  addr + len + 2**64 - 1 - hi does not, in any lane
    if (addrs + ((table >> 64) & len_mask) + below_hi) & carry:
        return None
    return table & keep


def _straight_split(halves: memoryview, count: int) -> int | None:
    """How many leading entries of a straight table are device-readable (the general
    shapes: any split), or None if the table is not straight."""
    flags = halves[6::8].tolist()
    last = flags.pop()
    if last & ~VRING_DESC_F_WRITE:  # NEXT, INDIRECT or unknown flags on the last entry
        return None
    nexts = halves[7::8].tolist()
    del nexts[-1]
    if nexts != list(range(1, count)):
        return None
    kinds = set(flags)
    if last:  # readable buffers (maybe none), then writable ones
        if kinds <= _NEXT_ONLY:
            return count - 1
        if kinds <= _NEXT_ANY:
            split = flags.index(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE)
            if not set(flags[split:]) <= _NEXT_WRITE:
                return None
            return split
        return None
    if kinds <= _NEXT_ONLY:
        return count
    return None
