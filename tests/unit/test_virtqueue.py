"""Split virtqueue, device side: well-formed chains, hostile drivers, notification suppression."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pymvm.devices.virtio.queue import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    GuestMemoryMap,
    VirtQueue,
    VirtQueueError,
)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
MEM_BASE = 0x10000
MEM_SIZE = 0x10000
DESC, AVAIL, USED = MEM_BASE, MEM_BASE + 0x1000, MEM_BASE + 0x2000
DATA = MEM_BASE + 0x4000


class Driver:
    """The guest's side of a split ring, written straight into guest memory."""

    def __init__(self, size: int = 8, *, event_idx: bool = False, indirect: bool = True) -> None:
        self.ram = bytearray(MEM_SIZE)
        self.memory = GuestMemoryMap([(MEM_BASE, memoryview(self.ram))])
        self.size = size
        self.avail_idx = 0
        self.queue = VirtQueue(self.memory, size, DESC, AVAIL, USED,
                               event_idx=event_idx, indirect=indirect)

    def off(self, gpa: int) -> int:
        return gpa - MEM_BASE

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.ram, self.off(table) + 16 * i, addr, length, flags, nxt)

    def publish(self, *heads: int) -> None:
        for head in heads:
            struct.pack_into("<H", self.ram, self.off(AVAIL) + 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.ram, self.off(AVAIL) + 2, idx)

    def avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.ram, self.off(AVAIL), flags)

    def used_event(self, value: int) -> None:
        struct.pack_into("<H", self.ram, self.off(AVAIL) + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.ram, self.off(USED) + 2)[0]

    def used_flags(self) -> int:
        return struct.unpack_from("<H", self.ram, self.off(USED))[0]

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.ram, self.off(USED) + 4 + 8 * self.size)[0]

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.ram, self.off(USED) + 4 + 8 * slot)

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[self.off(gpa) : self.off(gpa) + len(data)] = data


# ---------------------------------------------------------------------------------------------
# Well-formed chains


def test_pop_avail_returns_readable_then_writable_buffers_of_a_chain() -> None:
    d = Driver()
    d.write(DATA, b"hello")
    d.desc(0, DATA, 5, NEXT, 1)
    d.desc(1, DATA + 0x100, 64, WRITE)
    d.publish(0)
    chain = d.queue.pop_avail()
    assert chain is not None and chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"hello"]
    assert chain.writable_len == 64
    chain.writable[0][:3] = b"abc"
    assert d.ram[d.off(DATA + 0x100) : d.off(DATA + 0x103)] == b"abc"
    assert d.queue.pop_avail() is None


def test_add_used_publishes_the_element_and_the_used_index() -> None:
    d = Driver()
    d.desc(3, DATA, 16, WRITE)
    d.publish(3)
    chain = d.queue.pop_avail()
    assert chain is not None
    d.queue.add_used(chain.head, 12)
    assert d.used_idx() == 1
    assert d.used(0) == (3, 12)


def test_a_length_over_32_bits_is_reported_as_the_most_a_used_element_holds() -> None:
    # Found by bench/fuzz: writable descriptors that overlap can add up to more than 4 GiB,
    # and storing that length raised ValueError out of the back-end's request path.
    d = Driver()
    d.desc(3, DATA, 16, WRITE)
    d.publish(3)
    chain = d.queue.pop_avail()
    assert chain is not None
    d.queue.add_used(chain.head, (1 << 32) + 5)
    assert d.used_idx() == 1
    assert d.used(0) == (3, 0xFFFFFFFF)


def test_next_avail_resumes_popping_where_the_front_end_said() -> None:
    d = Driver()
    d.desc(0, DATA, 4)
    d.desc(1, DATA, 8)
    d.publish(0, 1)
    q = VirtQueue(d.memory, d.size, DESC, AVAIL, USED, next_avail=1)
    chain = q.pop_avail()
    assert chain is not None and chain.head == 1
    assert q.last_avail_idx == 2


def test_indirect_table_is_walked_when_negotiated() -> None:
    d = Driver()
    table = DATA + 0x1000
    d.desc(0, DATA, 10, NEXT, 1, table=table)
    d.desc(1, DATA + 0x200, 100, WRITE, table=table)
    d.desc(5, table, 32, INDIRECT)
    d.publish(5)
    chain = d.queue.pop_avail()
    assert chain is not None and chain.head == 5
    assert chain.readable_len == 10 and chain.writable_len == 100


def test_buffer_straddling_adjacent_regions_is_split_into_views() -> None:
    a, b = bytearray(0x1000), bytearray(0x1000)
    mem = GuestMemoryMap([(0x2000, memoryview(b)), (0x1000, memoryview(a))])
    segs = mem.segments(0x1FF0, 0x20)
    assert segs is not None and [s.nbytes for s in segs] == [0x10, 0x10]
    assert mem.segments(0x2FF0, 0x20) is None  # runs off the end


# ---------------------------------------------------------------------------------------------
# Hostile drivers: bad chains are dropped (used length 0), never raise


def dropped(d: Driver, head: int) -> None:
    assert d.queue.pop_avail() is None
    assert d.used_idx() == 1 and d.used(0) == (head, 0)
    assert d.queue.broken is None and d.queue.dropped_chains == 1


def test_descriptor_loop_is_dropped() -> None:
    d = Driver()
    d.desc(0, DATA, 4, NEXT, 1)
    d.desc(1, DATA, 4, NEXT, 0)
    d.publish(0)
    dropped(d, 0)


def test_next_index_outside_the_table_is_dropped() -> None:
    d = Driver()
    d.desc(0, DATA, 4, NEXT, 8)
    d.publish(0)
    dropped(d, 0)


def test_buffer_outside_guest_memory_is_dropped() -> None:
    d = Driver()
    d.desc(0, MEM_BASE + MEM_SIZE - 4, 8)
    d.publish(0)
    dropped(d, 0)


def test_buffer_with_a_huge_address_is_dropped() -> None:
    d = Driver()
    d.desc(0, 2**64 - 4, 0xFFFFFFFF, WRITE)
    d.publish(0)
    dropped(d, 0)


def test_readable_buffer_after_a_writable_one_is_dropped() -> None:
    d = Driver()
    d.desc(0, DATA, 4, WRITE | NEXT, 1)
    d.desc(1, DATA, 4)
    d.publish(0)
    dropped(d, 0)


def test_indirect_descriptor_without_the_feature_is_dropped() -> None:
    d = Driver(indirect=False)
    d.desc(0, DATA, 16, INDIRECT)
    d.publish(0)
    dropped(d, 0)


def test_nested_indirect_table_is_dropped() -> None:
    d = Driver()
    table = DATA + 0x1000
    d.desc(0, table, 16, INDIRECT, table=table)
    d.desc(0, table, 16, INDIRECT)
    d.publish(0)
    dropped(d, 0)


@pytest.mark.parametrize("length, flags", [(24, INDIRECT), (0, INDIRECT), (16, INDIRECT | NEXT)])
def test_malformed_indirect_descriptor_is_dropped(length: int, flags: int) -> None:
    d = Driver()
    d.desc(0, DATA + 0x1000, length, flags, 1)
    d.desc(1, DATA, 4)
    d.publish(0)
    dropped(d, 0)


def test_loop_inside_an_indirect_table_is_dropped() -> None:
    d = Driver()
    table = DATA + 0x1000
    d.desc(0, DATA, 4, NEXT, 1, table=table)
    d.desc(1, DATA, 4, NEXT, 0, table=table)
    d.desc(0, table, 32, INDIRECT)
    d.publish(0)
    dropped(d, 0)


def test_good_chain_after_a_dropped_one_is_still_returned() -> None:
    d = Driver()
    d.desc(0, DATA, 4, NEXT, 0)  # self loop
    d.desc(1, DATA, 4)
    d.publish(0, 1)
    chain = d.queue.pop_avail()
    assert chain is not None and chain.head == 1
    assert d.used(0) == (0, 0)


def test_head_outside_the_table_breaks_the_queue() -> None:
    d = Driver()
    d.publish(8)
    assert d.queue.pop_avail() is None
    assert d.queue.broken is not None
    assert d.used_idx() == 0


def test_avail_index_jumping_past_the_queue_size_breaks_the_queue() -> None:
    d = Driver()
    d.set_avail_idx(d.size + 1)
    assert d.queue.pop_avail() is None
    assert d.queue.broken is not None and not d.queue.has_avail()


def test_released_queue_pops_nothing_and_ignores_add_used() -> None:
    d = Driver()
    d.desc(0, DATA, 4)
    d.publish(0)
    d.queue.release()
    assert d.queue.pop_avail() is None
    d.queue.add_used(0, 4)
    assert d.used_idx() == 0


@pytest.mark.parametrize("size, desc, avail, used", [
    (6, DESC, AVAIL, USED),  # not a power of two
    (65536, DESC, AVAIL, USED),  # too big for a split ring
    (8, DESC + 8, AVAIL, USED),  # misaligned table
    (8, DESC, AVAIL, USED + 2),  # misaligned used ring
    (8, MEM_BASE + MEM_SIZE - 64, AVAIL, USED),  # table runs out of memory
    (8, DESC, AVAIL, 0x100),  # used ring below guest memory
])
def test_bad_ring_layout_is_refused_at_setup(size: int, desc: int, avail: int, used: int) -> None:
    memory = GuestMemoryMap([(MEM_BASE, memoryview(bytearray(MEM_SIZE)))])
    with pytest.raises(VirtQueueError):
        VirtQueue(memory, size, desc, avail, used)


def test_overlapping_memory_regions_are_refused() -> None:
    with pytest.raises(VirtQueueError):
        GuestMemoryMap([(0, memoryview(bytearray(0x2000))), (0x1000, memoryview(bytearray(0x1000)))])


# ---------------------------------------------------------------------------------------------
# Notification suppression


def use_one(d: Driver, head: int = 0) -> None:
    d.desc(head, DATA, 4)
    d.publish(head)
    chain = d.queue.pop_avail()
    assert chain is not None
    d.queue.add_used(chain.head, 0)


def test_flags_mode_notifies_unless_the_driver_sets_no_interrupt() -> None:
    d = Driver()
    use_one(d)
    assert d.queue.needs_notification()
    assert not d.queue.needs_notification()  # nothing new used since
    d.avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    use_one(d)
    assert not d.queue.needs_notification()


def test_event_idx_notifies_only_when_used_index_crosses_used_event() -> None:
    d = Driver(event_idx=True)
    use_one(d)
    assert d.queue.needs_notification()  # first signal is always sent
    d.used_event(5)  # "tell me when used idx passes 5"
    use_one(d)
    assert not d.queue.needs_notification()
    for _ in range(4):
        use_one(d)
    assert d.queue.needs_notification()  # used idx went 2 -> 6, crossing 5


def test_disable_and_enable_notification_use_the_used_flags_without_event_idx() -> None:
    d = Driver()
    d.queue.disable_notification()
    assert d.used_flags() == VRING_USED_F_NO_NOTIFY
    assert d.queue.enable_notification() is False
    assert d.used_flags() == 0


def test_enable_notification_writes_avail_event_and_reports_pending_buffers() -> None:
    d = Driver(event_idx=True)
    use_one(d)
    d.desc(1, DATA, 4)
    d.publish(1)
    assert d.queue.enable_notification() is True
    assert d.avail_event() == 1


# ---------------------------------------------------------------------------------------------
# Batched receive buffers: pop_writable and add_used_batch


def pop_writable(d: Driver, want: int, min_len: int = 1) -> tuple[int, list, list, list]:
    views: list[memoryview] = []
    used: list[int] = []
    nsegs: list[int] = []
    got = d.queue.pop_writable(views, used, nsegs, want, min_len)
    return got, views, used, nsegs


def test_pop_writable_takes_chains_until_they_hold_the_bytes_wanted() -> None:
    d = Driver()
    for i in range(4):
        d.desc(i, DATA + 0x100 * i, 0x80, WRITE)
    d.publish(0, 1, 2, 3)
    got, views, used, nsegs = pop_writable(d, 0x81)  # more than one buffer, less than two
    assert got == 0x100 and used == [0, 0x80, 1, 0x80] and nsegs == [1, 1]
    assert [v.nbytes for v in views] == [0x80, 0x80]
    views[1][:3] = b"abc"  # each view is the guest's buffer itself
    assert d.ram[d.off(DATA + 0x100) : d.off(DATA + 0x103)] == b"abc"
    assert d.queue.last_avail_idx == 2 and d.used_idx() == 0  # nothing used yet
    got, _, used, _ = pop_writable(d, 1 << 20)  # the ring runs dry first
    assert got == 0x100 and used == [2, 0x80, 3, 0x80]


def test_pop_writable_walks_multi_buffer_and_indirect_chains() -> None:
    d = Driver()
    d.desc(0, DATA, 0x10, WRITE | NEXT, 1)
    d.desc(1, DATA + 0x100, 0x20, WRITE)
    d.desc(2, DATA + 0x1000, 32, INDIRECT)
    d.desc(0, DATA + 0x200, 0x30, WRITE | NEXT, 1, table=DATA + 0x1000)
    d.desc(1, DATA + 0x300, 0x40, WRITE, table=DATA + 0x1000)
    d.publish(0, 2)
    got, views, used, nsegs = pop_writable(d, 1 << 20)
    assert got == 0xA0 and used == [0, 0x30, 2, 0x70] and nsegs == [2, 2]
    assert [v.nbytes for v in views] == [0x10, 0x20, 0x30, 0x40]


@pytest.mark.parametrize("flags, addr, length, why", [
    (0, DATA, 0x80, "device-readable"),  # a TX-style buffer on a receive queue
    (WRITE, DATA, 4, "shorter than"),  # below min_len
    (WRITE, MEM_BASE + MEM_SIZE - 8, 0x80, "outside guest memory"),
    (INDIRECT, DATA, 0x80, "shorter than"),  # an indirect table of empty descriptors
])
def test_pop_writable_hands_back_unusable_chains_and_goes_on(flags: int, addr: int, length: int,
                                                             why: str) -> None:
    d = Driver()
    d.desc(0, addr, length, flags)
    d.desc(1, DATA + 0x800, 0x80, WRITE)
    d.publish(0, 1)
    with capture_logs() as logs:
        got, views, used, _ = pop_writable(d, 1 << 20, min_len=12)
    assert [e["event"] for e in logs] == ["virtqueue.chain_dropped"] and why in logs[0]["reason"]
    assert got == 0x80 and used == [1, 0x80] and len(views) == 1
    assert d.used_idx() == 1 and d.used(0) == (0, 0)  # the bad chain came back unused
    assert d.queue.dropped_chains == 1 and d.queue.broken is None


def test_pop_writable_breaks_the_queue_on_a_corrupt_ring() -> None:
    d = Driver()
    d.desc(0, DATA, 0x80, WRITE)
    d.publish(0, 8)  # head 8 is outside the 8-entry table
    got, _, used, _ = pop_writable(d, 1 << 20)
    assert got == 0x80 and used == [0, 0x80] and d.queue.broken is not None
    assert pop_writable(d, 1 << 20)[0] == 0
    d2 = Driver()
    d2.set_avail_idx(9)
    assert pop_writable(d2, 1 << 20)[0] == 0 and d2.queue.broken is not None


def test_pop_writable_on_a_released_queue_pops_nothing() -> None:
    d = Driver()
    d.desc(0, DATA, 0x80, WRITE)
    d.publish(0)
    d.queue.release()
    assert pop_writable(d, 1 << 20)[0] == 0


def test_add_used_batch_wraps_around_the_ring_and_publishes_once() -> None:
    d = Driver(size=4)
    for i in range(4):
        d.desc(i, DATA + 0x100 * i, 0x80, WRITE)
    d.publish(0, 1, 2)
    _, _, used, _ = pop_writable(d, 0x180)
    d.queue.add_used_batch(used)
    assert d.used_idx() == 3 and [d.used(s) for s in range(3)] == [(0, 0x80), (1, 0x80), (2, 0x80)]
    d.publish(3, 0, 1)  # slots 3, 0, 1: this batch wraps
    _, _, used, _ = pop_writable(d, 0x180)
    used[-1] = 5  # the last buffer only partly filled
    d.queue.add_used_batch(used)
    assert d.used_idx() == 6
    assert [d.used(s) for s in (3, 0, 1)] == [(3, 0x80), (0, 0x80), (1, 5)]
    d.queue.add_used_batch([])
    assert d.used_idx() == 6


# ---------------------------------------------------------------------------------------------
# Property tests: whatever the driver writes, nothing raises and nothing escapes memory


#: Whatever a hostile driver can write into an 8-entry ring: descriptors (addr, len, flags,
#: next) aimed in and around guest memory, avail ring heads and idx, an indirect table.
HOSTILE_RING = {
    "descs": st.lists(
        st.tuples(
            st.one_of(st.integers(0, 2**64 - 1), st.integers(MEM_BASE - 64, MEM_BASE + MEM_SIZE + 64)),
            st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 256)),
            st.integers(0, 7),
            st.integers(0, 0xFFFF) | st.integers(0, 9),
        ),
        min_size=8, max_size=8,
    ),
    "heads": st.lists(st.integers(0, 0xFFFF) | st.integers(0, 9), max_size=12),
    "avail_idx": st.integers(0, 0xFFFF) | st.integers(0, 12),
    "table": st.binary(min_size=64, max_size=64),
}


def hostile_driver(descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int,
                   table: bytes) -> Driver:
    d = Driver()
    for i, (addr, length, flags, nxt) in enumerate(descs):
        d.desc(i, addr, length, flags, nxt)
    d.write(DATA + 0x1000, table)  # a random indirect table some descriptors may point at
    for i, head in enumerate(heads):
        struct.pack_into("<H", d.ram, d.off(AVAIL) + 4 + 2 * (i % 8), head)
    d.set_avail_idx(avail_idx)
    return d


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**HOSTILE_RING)
def test_hostile_rings_never_raise_and_every_buffer_is_inside_guest_memory(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int, table: bytes,
) -> None:
    d = hostile_driver(descs, heads, avail_idx, table)
    popped = 0
    for _ in range(20):
        chain = d.queue.pop_avail()
        if chain is None:
            break
        popped += 1
        assert chain.head < d.size
        for view in chain.readable + chain.writable:
            # every view is a slice of the single region: it cannot be longer than guest RAM
            assert view.obj is d.ram and 0 < view.nbytes <= MEM_SIZE
        d.queue.add_used(chain.head, 0)
    # every chain the device consumed, good or dropped, went back through the used ring
    assert d.used_idx() == popped + d.queue.dropped_chains
    assert d.queue.last_avail_idx == d.used_idx() or d.queue.broken is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**HOSTILE_RING, want=st.integers(1, 4096))
def test_hostile_rings_give_pop_writable_only_writable_buffers_inside_guest_memory(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int, table: bytes,
    want: int,
) -> None:
    d = hostile_driver(descs, heads, avail_idx, table)
    views: list[memoryview] = []
    used: list[int] = []
    nsegs: list[int] = []
    got = 0
    for _ in range(4):
        got += d.queue.pop_writable(views, used, nsegs, want, 12)
    assert sum(v.nbytes for v in views) == got == sum(used[1::2])
    assert sum(nsegs) == len(views) and len(nsegs) * 2 == len(used)
    for view in views:
        assert view.obj is d.ram and 0 < view.nbytes <= MEM_SIZE
    for head, length in zip(used[::2], used[1::2], strict=True):
        assert head < d.size and length >= 12
    d.queue.add_used_batch(used)
    assert d.used_idx() == len(nsegs) + d.queue.dropped_chains
    assert d.queue.last_avail_idx == d.used_idx() or d.queue.broken is not None


@settings(max_examples=150, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=4),
    gpa=st.integers(0, 20 * 256),
    length=st.integers(1, 6 * 256),
)
def test_memory_segments_match_a_byte_by_byte_model(
    layout: list[tuple[int, int]], gpa: int, length: int,
) -> None:
    # Regions of 256-byte pages separated by 0-3 page gaps; each byte holds its own gpa % 251.
    regions, owner = [], {}
    cursor = 0
    for gap, pages in layout:
        cursor += gap * 256
        size = pages * 256
        data = bytearray((cursor + i) % 251 for i in range(size))
        regions.append((cursor, memoryview(data)))
        owner.update({cursor + i: True for i in range(size)})
        cursor += size
    mem = GuestMemoryMap(regions)
    segs = mem.segments(gpa, length)
    inside = all(a in owner for a in range(gpa, gpa + length))
    if not inside:
        assert segs is None
        return
    assert segs is not None
    assert b"".join(bytes(s) for s in segs) == bytes((gpa + i) % 251 for i in range(length))


# ---------------------------------------------------------------------------------------------
# Indirect tables read in bulk (BulkChain): the same chains as the descriptor-by-descriptor walk


def walk_outcome(d: Driver, bulk: bool) -> tuple:
    from pymvm.devices.virtio.queue import _InvalidChain

    d.queue.bulk_indirect = 1 if bulk else 0
    try:
        chain = d.queue._walk(0)
    except _InvalidChain as e:
        return ("dropped", str(e))
    return ("chain", chain.readable_len, chain.writable_len,
            [(v.obj is d.ram, bytes(v)) for v in chain.readable],
            [(v.obj is d.ram, bytes(v)) for v in chain.writable])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.integers(-0x100, MEM_SIZE + 0x100), st.sampled_from([0, 1, 16, 512, 4096]),
                                  st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, NEXT | INDIRECT, 8]),
                                  st.integers(0, 9)), min_size=1, max_size=9),
       straight=st.booleans(), first_write=st.integers(0, 9))
def test_indirect_table_read_in_bulk_gives_the_chain_the_walk_gives(
        entries: list[tuple[int, int, int, int]], straight: bool, first_write: int) -> None:
    """Hostile tables (any flags, next indices, lengths, addresses in or out of memory) and
    well-formed ones: the bulk reading and the walk agree on the chain, or on dropping it."""
    d = Driver()
    d.ram[:] = bytes(i % 251 for i in range(MEM_SIZE))  # a view's bytes tell where it points
    table = DATA + 0x1000
    n = len(entries)
    for i, (offset, length, flags, nxt) in enumerate(entries):
        if straight:  # the shape drivers build: the bulk path must take it
            flags = (NEXT if i < n - 1 else 0) | (WRITE if i >= first_write else 0)
            nxt = i + 1 if i < n - 1 else 0
        d.desc(i, MEM_BASE + offset, length, flags, nxt, table=table)
    d.desc(0, table, 16 * n, INDIRECT)
    assert walk_outcome(d, True) == walk_outcome(d, False)


def test_well_formed_indirect_table_is_read_in_bulk_and_views_come_on_demand() -> None:
    from pymvm.devices.virtio.queue import BulkChain

    d = Driver()
    table = DATA + 0x1000
    d.desc(0, DATA, 16, NEXT, 1, table=table)
    d.desc(1, DATA + 0x200, 512, NEXT | WRITE, 2, table=table)
    d.desc(2, DATA + 0x800, 512, NEXT | WRITE, 3, table=table)
    d.desc(3, DATA + 0x100, 1, WRITE, 0, table=table)
    d.desc(0, table, 64, INDIRECT)
    d.queue.bulk_indirect = 1
    d.publish(0)
    chain = d.queue.pop_avail()
    assert isinstance(chain, BulkChain)
    assert chain.addrs == [DATA, DATA + 0x200, DATA + 0x800, DATA + 0x100]
    assert chain.lens == [16, 512, 512, 1] and chain.split == 1
    assert (chain.readable_len, chain.writable_len) == (16, 1025)
    assert [v.nbytes for v in chain.writable] == [512, 512, 1]
    chain.writable[0][:3] = b"abc"
    assert d.ram[d.off(DATA + 0x200) : d.off(DATA + 0x203)] == b"abc"
    d.queue.bulk_indirect = 5  # tables shorter than the device's threshold are walked
    d.publish(0)
    assert type(d.queue.pop_avail()).__name__ == "DescriptorChain"
    d.queue.bulk_indirect = 0  # devices that did not ask keep plain chains
    d.publish(0)
    assert type(d.queue.pop_avail()).__name__ == "DescriptorChain"


@pytest.mark.parametrize("addr, length, inside", [
    (0x1000, 16, True),  # the first byte of the region
    (0xFFF, 16, False),  # one byte before it
    (0x5000 - 16, 16, True),  # ending at its last byte
    (0x5000 - 15, 16, False),  # one byte past it
    (0x1000, 0xFFFF_FFFF, False),  # the longest length a descriptor holds
    (2**64 - 1, 1, False),  # the top of the address space
    (0, 1, False),
])
def test_bulk_bounds_check_refuses_any_buffer_reaching_outside_the_region(
        addr: int, length: int, inside: bool) -> None:
    from pymvm.devices.virtio.queue import _lanes_inside

    # the buffer under test among others well inside, with flags and next set (masked off)
    entries = [(0x2000, 512, 3, 1), (addr, length, 0xFFFF, 0xFFFF), (0x3000, 4096, 2, 0)]
    raw = b"".join(struct.pack("<QIHH", *e) for e in entries)
    lanes = _lanes_inside(raw, 3, 0x1000, 0x5000)
    assert (lanes is not None) is inside
    assert (_lanes_inside(raw[16:32], 1, 0x1000, 0x5000) is not None) is inside
    if inside:  # address and length in each lane, flags and next gone
        assert lanes.to_bytes(48, "little") == b"".join(
            struct.pack("<QQ", a, n) for a, n, _, _ in entries)


def test_bulk_bounds_check_at_the_ends_of_the_address_space() -> None:
    from pymvm.devices.virtio.queue import _lanes_inside

    top = struct.pack("<QIHH", 2**64 - 2, 1, 0, 0)
    assert _lanes_inside(top, 1, 0, 2**64 - 1) is not None  # [2**64 - 2, 2**64 - 1)
    assert _lanes_inside(struct.pack("<QIHH", 2**64 - 2, 2, 0, 0), 1, 0, 2**64 - 1) is None
    assert _lanes_inside(struct.pack("<QIHH", 0, 1, 0, 0), 1, 0, 1) is not None


def test_bulk_table_in_a_region_ending_at_2_pow_64_is_checked_buffer_by_buffer() -> None:
    from pymvm.devices.virtio.queue import BulkChain, _straight_table

    lo, region = 2**64 - 0x10000, memoryview(bytearray(0x10000))
    good = [(lo, 16, NEXT, 1), (lo + 0x1000, 4096, NEXT | WRITE, 2), (2**64 - 1, 1, WRITE, 0)]
    table = memoryview(b"".join(struct.pack("<QIHH", *e) for e in good))
    chain = _straight_table(5, table, 3, lo, 2**64, region)
    assert isinstance(chain, BulkChain) and chain.addrs == [e[0] for e in good]
    assert chain.addr(-1) == 2**64 - 1 and chain.split == 1
    bad = good[:2] + [(2**64 - 1, 2, WRITE, 0)]  # one byte past the end of the space
    table = memoryview(b"".join(struct.pack("<QIHH", *e) for e in bad))
    assert _straight_table(5, table, 3, lo, 2**64, region) is None
