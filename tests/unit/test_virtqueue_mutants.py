"""Split virtqueue (pymvm/devices/virtio/queue.py): what scripts/mutation on the module
showed test_virtqueue.py leaves unchecked: chain_at (inflight resubmission), ring positions
at their edges, batch limits of pop_writable, the EVENT_IDX formula, released queues."""

from __future__ import annotations

import re
import struct

import pytest

from pymvm.devices.virtio.queue import BulkChain, DescriptorChain
from tests.unit.test_virtqueue import (
    AVAIL,
    DATA,
    INDIRECT,
    NEXT,
    WRITE,
    Driver,
    pop_writable,
)


def post(d: Driver, *heads: int, length: int = 64) -> None:
    """One writable buffer per head, published in that order."""
    for head in heads:
        d.desc(head, DATA + 0x100 * head, length, WRITE)
    d.publish(*heads)


# ---------------------------------------------------------------------------------------------
# Positions in the ring


def test_a_full_ring_pops_every_entry_in_slot_order_across_the_wrap() -> None:
    d = Driver(size=4)
    d.queue.set_last_avail(0x1_0002)  # the position is a u16
    d.avail_idx = 2
    assert d.queue.last_avail_idx == 2
    post(d, 3, 1, 0, 2)  # slots 2, 3, 0, 1: a full ring (pending == size)
    heads = [d.queue.pop_avail().head for _ in range(4)]
    assert heads == [3, 1, 0, 2]
    assert d.queue.pop_avail() is None and d.queue.broken is None


def test_has_avail_compares_the_avail_idx_not_the_first_ring_entry() -> None:
    d = Driver(size=4)
    struct.pack_into("<H", d.ram, d.off(AVAIL) + 4, 3)  # ring[0] = 3, avail idx still 0
    assert not d.queue.has_avail()


@pytest.mark.parametrize("use_pop_writable", [False, True])
def test_head_equal_to_the_queue_size_breaks_the_queue(use_pop_writable: bool) -> None:
    d = Driver(size=4)
    d.publish(4)
    if use_pop_writable:
        assert pop_writable(d, 1000)[0] == 0
    else:
        assert d.queue.pop_avail() is None
    assert d.queue.broken == "avail ring names head 4, outside the 4-entry table"


def test_pop_writable_takes_a_full_ring() -> None:
    d = Driver(size=4)
    post(d, 0, 1, 2, 3)
    got, _views, used, _ = pop_writable(d, 10_000)
    assert got == 4 * 64 and used[0::2] == [0, 1, 2, 3] and d.queue.broken is None


def test_pop_writable_takes_a_full_ring_that_wraps_after_three_entries() -> None:
    d = Driver(size=4)
    d.queue.set_last_avail(1)
    d.avail_idx = 1
    post(d, 0, 1, 2, 3)  # slots 1, 2, 3, then 0
    got, _views, used, nsegs = pop_writable(d, 10_000)
    assert used[0::2] == [0, 1, 2, 3] and got == 256 and nsegs == [1, 1, 1, 1]


def test_pop_writable_stops_at_the_chain_that_reaches_exactly_the_bytes_wanted() -> None:
    d = Driver(size=4)
    post(d, 0, 1, 2)
    got, _views, used, _ = pop_writable(d, 64)
    assert got == 64 and used == [0, 64]
    assert d.queue.last_avail_idx == 1


def test_pop_writable_on_a_broken_queue_takes_nothing() -> None:
    d = Driver(size=4)
    d.publish(9)
    d.queue.pop_avail()
    assert d.queue.broken
    post(d, 0)
    assert pop_writable(d, 100)[0] == 0


# ---------------------------------------------------------------------------------------------
# chain_at: a resubmitted head


def test_chain_at_gives_the_chain_without_popping_it() -> None:
    d = Driver(size=4)
    d.desc(0, DATA, 16, NEXT, 1)
    d.desc(1, DATA + 0x100, 32, WRITE)
    d.publish(0)
    chain = d.queue.chain_at(0)
    assert (chain.head, chain.readable_len, chain.writable_len) == (0, 16, 32)
    assert d.queue.last_avail_idx == 0 and d.queue.has_avail()


@pytest.mark.parametrize("head", [4, -1])
def test_chain_at_a_head_outside_the_table_breaks_the_queue(head: int) -> None:
    d = Driver(size=4)
    assert d.queue.chain_at(head) is None
    assert d.queue.broken == f"resubmitted head {head} is outside the 4-entry table"


def test_chain_at_the_last_head_is_allowed() -> None:
    d = Driver(size=4)
    d.desc(3, DATA, 8, WRITE)
    assert d.queue.chain_at(3).head == 3


def test_chain_at_a_malformed_chain_hands_it_back_unused() -> None:
    d = Driver(size=4)
    d.desc(2, DATA, 8, NEXT, 9)  # next outside the table
    assert d.queue.chain_at(2) is None
    assert d.queue.broken is None and d.queue.dropped_chains == 1
    assert d.used(0) == (2, 0) and d.used_idx() == 1


def test_chain_at_on_a_broken_or_released_queue_gives_nothing() -> None:
    d = Driver(size=4)
    d.desc(0, DATA, 8, WRITE)
    d.publish(7)
    d.queue.pop_avail()
    assert d.queue.broken and d.queue.chain_at(0) is None
    d2 = Driver(size=4)
    d2.desc(0, DATA, 8, WRITE)
    d2.queue.release()
    assert d2.queue.chain_at(0) is None


# ---------------------------------------------------------------------------------------------
# Giving chains back, releasing


def test_drop_chain_returns_the_head_with_length_zero_and_counts_it() -> None:
    d = Driver(size=4)
    post(d, 1)
    chain = d.queue.pop_avail()
    d.queue.drop_chain(chain, "too short")
    assert d.used(0) == (1, 0) and d.used_idx() == 1 and d.queue.dropped_chains == 1


def test_release_marks_the_queue_released_keeping_an_earlier_reason() -> None:
    d = Driver(size=4)
    d.queue.release()
    assert d.queue.broken == "released"
    d2 = Driver(size=4)
    d2.publish(9)
    d2.queue.pop_avail()
    reason = d2.queue.broken
    d2.queue.release()
    assert d2.queue.broken == reason


def test_a_released_queue_ignores_batches_and_notification_calls() -> None:
    d = Driver(size=4)
    d.queue.release()
    d.queue.add_used_batch([0, 1])
    d.queue.disable_notification()
    assert d.queue.needs_notification() is False
    assert d.queue.enable_notification() is False


def test_released_memory_map_has_no_largest_region() -> None:
    d = Driver(size=4)
    d.queue.release()
    d.memory.release()
    assert d.memory.largest is None and d.memory.regions == []


# ---------------------------------------------------------------------------------------------
# Notifications


def test_disable_notification_leaves_the_used_flags_alone_with_event_idx() -> None:
    d = Driver(size=4, event_idx=True)
    d.queue.disable_notification()
    assert d.used_flags() == 0


@pytest.mark.parametrize(("old", "new", "used_event", "notify"), [
    (0, 1, 0, True),        # crossed: new - event - 1 = 0 < 1
    (2, 3, 0, False),       # event long passed: 2 >= 1
    (0, 2, 0xFFFF, False),  # new - event - 1 = 2, not below new - old = 2
    (2, 3, 1, False),       # event 1 was already signalled at old 2
    (1, 3, 2, True),        # event 2 crossed in this batch
])
def test_event_idx_notifies_exactly_when_the_used_event_is_crossed(old, new, used_event, notify) -> None:
    d = Driver(size=8, event_idx=True)
    for _ in range(old):
        d.queue.add_used(0, 0)
    d.queue.needs_notification()  # the first signal: now "old" is what the driver knows
    for _ in range(new - old):
        d.queue.add_used(0, 0)
    d.used_event(used_event)
    assert d.queue.needs_notification() is notify


# ---------------------------------------------------------------------------------------------
# Indirect tables read in bulk


def bulk_indirect_chain(writable_len: int) -> Driver:
    """Head 2: an indirect table (read in bulk) of a 16-byte readable and a writable buffer."""
    d = Driver(size=4)
    table = DATA + 0x1000
    d.desc(0, DATA, 16, NEXT, 1, table=table)
    d.desc(1, DATA + 0x200, writable_len, WRITE, 0, table=table)
    d.desc(2, table, 32, INDIRECT)
    d.queue.bulk_indirect = 1
    d.publish(2)
    return d


def test_bulk_chain_keeps_its_head() -> None:
    d = bulk_indirect_chain(32)
    chain = d.queue.pop_avail()
    assert isinstance(chain, BulkChain) and chain.head == 2


def test_bulk_table_with_a_length_over_2_gib_is_dropped_as_outside_memory() -> None:
    d = bulk_indirect_chain(0x8000_0000)
    assert d.queue.pop_avail() is None
    assert d.used(0) == (2, 0) and d.queue.dropped_chains == 1


# ---------------------------------------------------------------------------------------------
# Chains built by a device, and the used ring's slots


def test_descriptor_chain_sums_its_views_unless_given_the_lengths() -> None:
    ram = bytearray(16)
    view = memoryview(ram)
    chain = DescriptorChain(1, [view[0:3], view[3:7]], [view[7:12]])
    assert (chain.readable_len, chain.writable_len) == (7, 5)
    given = DescriptorChain(1, [view[0:3]], [view[3:4]], readable_len=100, writable_len=200)
    assert (given.readable_len, given.writable_len) == (100, 200)


def test_used_entries_go_to_consecutive_slots_and_wrap_at_the_ring_size() -> None:
    d = Driver(size=4)
    for i in range(6):
        d.queue.add_used(i, 10 + i)
    assert [d.used(s) for s in range(4)] == [(4, 14), (5, 15), (2, 12), (3, 13)]
    assert d.used_idx() == 6


def test_a_used_length_of_exactly_2_to_the_32_is_reported_as_the_most_a_used_element_holds() -> None:
    d = Driver(size=4)
    d.queue.add_used(0, 1 << 32)
    d.queue.add_used(1, 0xFFFF_FFFF)
    assert d.used(0) == (0, 0xFFFF_FFFF) and d.used(1) == (1, 0xFFFF_FFFF)


def test_indirect_table_of_one_descriptor_is_walked() -> None:
    d = Driver(size=4)
    table = DATA + 0x1000
    d.desc(0, DATA, 24, WRITE, 0, table=table)
    d.desc(1, table, 16, INDIRECT)
    d.publish(1)
    chain = d.queue.pop_avail()
    assert chain is not None and (chain.head, chain.writable_len) == (1, 24)


def test_indirect_table_of_the_largest_size_allowed_is_walked() -> None:
    from pymvm.devices.virtio.queue import MAX_INDIRECT_DESCS, GuestMemoryMap, VirtQueue

    ram = bytearray(0x10_0000 + 16 * MAX_INDIRECT_DESCS)
    memory = GuestMemoryMap([(0, memoryview(ram))])
    queue = VirtQueue(memory, 4, 0, 0x100, 0x200, indirect=True)
    table = 0x10_0000
    for i in range(MAX_INDIRECT_DESCS):  # a chain of MAX_INDIRECT_DESCS empty buffers
        last = i == MAX_INDIRECT_DESCS - 1
        struct.pack_into("<QIHH", ram, table + 16 * i, 0x1000, 0, 0 if last else NEXT, i + 1)
    struct.pack_into("<QIHH", ram, 0, table, 16 * MAX_INDIRECT_DESCS, INDIRECT, 0)
    struct.pack_into("<HHH", ram, 0x100, 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    chain = queue.pop_avail()
    assert chain is not None and chain.head == 0 and queue.dropped_chains == 0


def test_indirect_table_exactly_as_long_as_the_bulk_threshold_is_read_in_bulk() -> None:
    d = Driver(size=4)
    table = DATA + 0x1000
    d.desc(0, DATA, 16, NEXT, 1, table=table)
    d.desc(1, DATA + 0x200, 32, WRITE, 0, table=table)
    d.desc(2, table, 32, INDIRECT)
    d.queue.bulk_indirect = 2
    d.publish(2)
    assert isinstance(d.queue.pop_avail(), BulkChain)


# ---------------------------------------------------------------------------------------------
# Set-up refusals, exactly


def ring_queue(size: int, desc: int, avail: int, used: int, **kw):
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue

    ram = bytearray(0x10000)
    return VirtQueue(GuestMemoryMap([(0, memoryview(ram))]), size, desc, avail, used, **kw), ram


@pytest.mark.parametrize("size", [0, 3, 32769, 65536])
def test_queue_sizes_that_are_no_power_of_two_in_range_are_refused_exactly(size: int) -> None:
    from pymvm.devices.virtio.queue import VirtQueueError

    with pytest.raises(VirtQueueError, match=f"^vq: queue size {size} is not a power of two in "
                                             f"1..32768$"):
        ring_queue(size, 0, 0x1000, 0x2000)


@pytest.mark.parametrize("size", [1, 2])
def test_the_smallest_queue_sizes_are_accepted(size: int) -> None:
    q, _ = ring_queue(size, 0, 0x1000, 0x2000)
    assert q.size == size and q.name == "vq"


@pytest.mark.parametrize(("desc", "avail", "used", "what", "gpa", "align"), [
    (8, 0x1000, 0x2000, "descriptor table", 8, 16),
    (0, 0x1001, 0x2000, "available ring", 0x1001, 2),
    (0, 0x1000, 0x2002, "used ring", 0x2002, 4),
])
def test_each_misaligned_ring_is_named_exactly(desc, avail, used, what, gpa, align) -> None:
    from pymvm.devices.virtio.queue import VirtQueueError

    with pytest.raises(VirtQueueError, match=re.escape(
            f"vq: {what} at {gpa:#x} is not {align}-byte aligned (virtio 1.2 §2.7)")):
        ring_queue(4, desc, avail, used)


@pytest.mark.parametrize(("desc", "avail", "used", "what", "gpa"), [
    (0x10000 - 16 * 4 + 16, 0x1000, 0x2000, "descriptor table", 0x10000 - 48),
    (0, 0x10000 - 6 - 8 + 2, 0x2000, "available ring", 0x10000 - 12),
    (0, 0x1000, 0x10000 - 36, "used ring", 0x10000 - 36),
])
def test_each_ring_past_the_end_of_memory_is_named_exactly(desc, avail, used, what, gpa) -> None:
    from pymvm.devices.virtio.queue import VirtQueueError

    with pytest.raises(VirtQueueError, match=re.escape(
            f"vq: {what} at {gpa:#x} for 4 entries is not inside one guest memory region; the "
            f"driver gave a bad ring address")):
        ring_queue(4, desc, avail, used)


def test_rings_ending_exactly_at_the_end_of_memory_are_accepted() -> None:
    q, _ = ring_queue(4, 0x10000 - 64, 0x10000 - 64 - 14 - 2, 0x10000 - 64 - 16 - 40)
    assert q.size == 4


@pytest.mark.parametrize(("avail", "desc", "what", "gpa"), [
    (0x2000 + 6 + 32 - 2, 0, "available ring", 0x2000 + 36),  # starts on the used ring's last byte pair
    (0x1000, 0x2000 - 64 + 16, "descriptor table", 0x2000 - 48),  # ends inside the used ring
])
def test_a_used_ring_overlapping_another_ring_is_refused_exactly(avail, desc, what, gpa) -> None:
    from pymvm.devices.virtio.queue import VirtQueueError

    with pytest.raises(VirtQueueError, match=re.escape(
            f"vq: used ring at 0x2000 for 4 entries overlaps the {what} at {gpa:#x}; the driver "
            f"gave a bad ring address")):
        ring_queue(4, desc, avail, 0x2000)


def test_rings_right_next_to_the_used_ring_are_accepted() -> None:
    used_end = 0x2000 + 6 + 8 * 4
    q, _ = ring_queue(4, 0x2000 - 64, used_end, 0x2000)  # table just before, avail just after
    assert q.size == 4


def test_next_used_given_is_a_u16_and_otherwise_read_from_the_used_ring() -> None:
    q, _ = ring_queue(4, 0, 0x1000, 0x2000, next_used=0x1_0003)
    assert q.next_used_idx == 3
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue

    ram = bytearray(0x10000)
    struct.pack_into("<HH", ram, 0x2000, 0, 9)
    q2 = VirtQueue(GuestMemoryMap([(0, memoryview(ram))]), 4, 0, 0x1000, 0x2000)
    assert q2.next_used_idx == 9 and q2.bulk_indirect == 0
    assert not q2.event_idx and not q2.indirect


def test_memory_map_names_the_largest_region_and_refuses_bad_ones_exactly() -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueueError

    small, big = bytearray(0x1000), bytearray(0x3000)
    m = GuestMemoryMap([(0x10000, memoryview(big)), (0, memoryview(small))])
    assert m.regions == [(0, 0x1000), (0x10000, 0x3000)]
    assert m.largest[:2] == (0x10000, 0x13000)
    with pytest.raises(VirtQueueError, match=re.escape(
            "guest memory region at 0x0 is not a writable contiguous byte view; pass "
            "memoryview(mmap) slices")):
        GuestMemoryMap([(0, memoryview(bytes(16)))])
    with pytest.raises(VirtQueueError, match=re.escape(
            "guest memory region at 0x0 of 0x0 bytes is empty or does not fit a 64-bit address "
            "space")):
        GuestMemoryMap([(0, memoryview(bytearray(0)))])
    with pytest.raises(VirtQueueError, match="region at 0xfffffffffffffff0 of 0x20 bytes"):
        GuestMemoryMap([((1 << 64) - 16, memoryview(bytearray(32)))])
    GuestMemoryMap([((1 << 64) - 16, memoryview(bytearray(16)))])  # ends exactly at 2^64
    GuestMemoryMap([(0, memoryview(bytearray(1)))])
    with pytest.raises(VirtQueueError, match=re.escape(
            "guest memory region at 0x8 overlaps the region ending at 0x10; regions must be "
            "disjoint")):
        GuestMemoryMap([(0, memoryview(bytearray(16))), (8, memoryview(bytearray(16)))])


# ---------------------------------------------------------------------------------------------
# Memory maps of several regions (the second mutation pass over queue.py)


def pattern(size: int, seed: int) -> bytearray:
    """Bytes that tell where a view points: byte i of region ``seed`` is (seed + i) % 251."""
    return bytearray((seed + i) % 251 for i in range(size))


def test_two_memory_regions_at_the_same_address_are_refused_as_overlapping() -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueueError

    with pytest.raises(VirtQueueError, match="region at 0x1000 overlaps the region ending at 0x1010"):
        GuestMemoryMap([(0x1000, memoryview(bytearray(16))), (0x1000, memoryview(bytearray(32)))])


@pytest.mark.parametrize("view", [memoryview(bytearray(32))[::2], memoryview(bytearray(32)).cast("I")],
                         ids=["strided", "4-byte items"])
def test_memory_regions_that_are_not_contiguous_bytes_are_refused(view: memoryview) -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueueError

    with pytest.raises(VirtQueueError, match="is not a writable contiguous byte view"):
        GuestMemoryMap([(0, view)])


def test_the_largest_region_is_found_when_it_comes_first_in_address_order() -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap

    big, small = bytearray(0x3000), bytearray(0x1000)
    m = GuestMemoryMap([(0, memoryview(big)), (0x10000, memoryview(small))])
    assert m.largest[:2] == (0, 0x3000) and m.largest[2].obj is big


def three_adjacent_regions():
    from pymvm.devices.virtio.queue import GuestMemoryMap

    data = [pattern(0x100, seed) for seed in (1, 2, 3)]
    memory = GuestMemoryMap([(0x1000 + 0x100 * i, memoryview(b)) for i, b in enumerate(data)])
    return memory, data


def test_segments_inside_a_later_region_are_that_regions_bytes() -> None:
    memory, data = three_adjacent_regions()
    segs = memory.segments(0x1210, 0x20)
    assert [bytes(s) for s in segs] == [bytes(data[2][0x10:0x30])]


def test_segments_across_three_adjacent_regions_are_split_at_each_boundary() -> None:
    memory, data = three_adjacent_regions()
    segs = memory.segments(0x10F0, 0x120)
    assert [bytes(s) for s in segs] == [bytes(data[0][0xF0:]), bytes(data[1]), bytes(data[2][:0x10])]
    segs = memory.segments(0x11F0, 0x20)  # from the second region into the third
    assert [bytes(s) for s in segs] == [bytes(data[1][0xF0:]), bytes(data[2][:0x10])]


def test_segments_below_the_first_region_are_outside_memory() -> None:
    memory, _ = three_adjacent_regions()
    assert memory.segments(0x10, 0x10) is None
    assert memory.segments(0xFF0, 0x20) is None  # starts below, ends inside
    assert memory.contiguous(0x10, 0x10) is None


def two_region_queue(**kw):
    """A queue whose rings and RAM are in a large region at 0, with a small second region
    (0x100 bytes at 0x20000) such as a vhost-user front-end's extra memory slot."""
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue

    ram, extra = bytearray(0x10000), pattern(0x100, 7)
    memory = GuestMemoryMap([(0, memoryview(ram)), (0x20000, memoryview(extra))])
    return VirtQueue(memory, 4, 0, 0x1000, 0x2000, **kw), ram, extra


def test_a_buffer_in_a_smaller_memory_region_is_popped_as_a_view_of_that_region() -> None:
    queue, ram, extra = two_region_queue()
    struct.pack_into("<QIHH", ram, 0, 0x20010, 0x20, NEXT, 1)
    struct.pack_into("<QIHH", ram, 16, 0x20080, 0x40, WRITE, 0)
    struct.pack_into("<HHH", ram, 0x1000, 0, 1, 0)  # avail idx 1, ring[0] = head 0
    chain = queue.pop_avail()
    assert chain is not None and queue.broken is None
    assert [bytes(v) for v in chain.readable] == [bytes(extra[0x10:0x30])]
    assert [v.obj for v in chain.writable] == [extra] and chain.writable_len == 0x40


def test_a_chain_of_several_readable_then_writable_buffers_keeps_every_buffer_in_order() -> None:
    d = Driver(size=8)
    d.ram[:] = pattern(len(d.ram), 0)
    d.desc(0, DATA, 5, NEXT, 1)
    d.desc(1, DATA + 0x100, 7, NEXT, 2)
    d.desc(2, DATA + 0x200, 11, NEXT | WRITE, 3)
    d.desc(3, DATA + 0x300, 13, WRITE)
    d.publish(0)
    chain = d.queue.pop_avail()
    o = d.off(DATA)
    assert [bytes(v) for v in chain.readable] == [bytes(d.ram[o : o + 5]),
                                                 bytes(d.ram[o + 0x100 : o + 0x107])]
    assert [v.nbytes for v in chain.writable] == [11, 13]
    assert (chain.readable_len, chain.writable_len) == (12, 24)


# ---------------------------------------------------------------------------------------------
# Queue sizes and ring layout at their limits


def test_a_queue_of_the_largest_size_is_accepted() -> None:
    from pymvm.devices.virtio.queue import MAX_QUEUE_SIZE, GuestMemoryMap, VirtQueue

    ram = bytearray(0x100000)
    q = VirtQueue(GuestMemoryMap([(0, memoryview(ram))]), MAX_QUEUE_SIZE, 0, 0x80000, 0xA0000)
    assert q.size == 32768


def test_an_available_ring_that_ends_where_the_used_ring_starts_is_accepted() -> None:
    q, _ = ring_queue(4, 0, 0x2000 - (6 + 2 * 4), 0x2000)
    assert q.size == 4


def test_an_available_ring_whose_used_event_lies_on_the_used_ring_is_refused() -> None:
    from pymvm.devices.virtio.queue import VirtQueueError

    avail = 0x2000 - (6 + 2 * 4) + 2  # its last field, used_event, is the used ring's flags
    with pytest.raises(VirtQueueError, match=re.escape(
            f"overlaps the available ring at {avail:#x}")):
        ring_queue(4, 0, avail, 0x2000)


# ---------------------------------------------------------------------------------------------
# Ring fields are unsigned 16-bit values (§2.7: le16)


def test_ring_indices_above_0x7fff_are_unsigned() -> None:
    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue

    ram = bytearray(0x10000)
    struct.pack_into("<HH", ram, 0x2000, 0, 0x9000)  # used idx, as a restarted queue finds it
    q = VirtQueue(GuestMemoryMap([(0, memoryview(ram))]), 4, 0, 0x1000, 0x2000, next_avail=0x8000)
    assert q.next_used_idx == 0x9000
    struct.pack_into("<QIHH", ram, 16 * 2, 0x4000, 8, WRITE, 0)
    struct.pack_into("<HHH", ram, 0x1000, 0, 0x8001, 2)  # avail idx 0x8001, ring[0] = head 2
    assert q.has_avail()
    chain = q.pop_avail()
    assert chain is not None and chain.head == 2 and not q.has_avail()
    q.add_used(chain.head, 8)
    assert struct.unpack_from("<H", ram, 0x2002)[0] == 0x9001 and q.next_used_idx == 0x9001


@pytest.mark.parametrize("use_pop_writable", [False, True])
def test_avail_ring_head_0xffff_breaks_the_queue(use_pop_writable: bool) -> None:
    d = Driver(size=4)
    d.desc(3, DATA, 64, WRITE)
    d.publish(0xFFFF)
    if use_pop_writable:
        assert pop_writable(d, 1000)[0] == 0
    else:
        assert d.queue.pop_avail() is None
    assert d.queue.broken == "avail ring names head 65535, outside the 4-entry table"


def test_the_first_notification_check_with_event_idx_signals_whatever_used_event_says() -> None:
    # The device cannot know what the driver was told before (a new or restarted queue).
    d = Driver(size=8, event_idx=True)
    d.used_event(5)
    d.queue.add_used(0, 0)
    assert d.queue.needs_notification() is True
    d.queue.add_used(0, 0)
    assert d.queue.needs_notification() is False  # used idx 2 has not crossed used_event 5


def test_every_dropped_chain_is_counted() -> None:
    d = Driver(size=4)
    d.desc(0, DATA, 8, NEXT, 9)  # next outside the table
    d.desc(1, DATA, 8, NEXT, 9)
    d.publish(0, 1)
    assert d.queue.pop_avail() is None
    assert d.queue.dropped_chains == 2 and d.used_idx() == 2


def test_pop_writable_takes_a_chain_of_several_buffers_holding_exactly_min_len() -> None:
    d = Driver(size=4)
    d.desc(0, DATA, 8, WRITE | NEXT, 1)
    d.desc(1, DATA + 0x100, 4, WRITE)
    d.publish(0)
    got, _views, used, nsegs = pop_writable(d, 100, min_len=12)
    assert (got, used, nsegs) == (12, [0, 12], [2]) and d.queue.dropped_chains == 0


def bulk_table_chain(entries: list[tuple[int, int, int, int]]):
    """Head 0 names an indirect table of ``entries`` (offset from DATA, length, flags, next),
    with bulk reading on; what popping it gives (None: dropped) and the queue."""
    d = Driver(size=4)
    table = DATA + 0x1000
    for i, (offset, length, flags, nxt) in enumerate(entries):
        d.desc(i, DATA + offset, length, flags, nxt, table=table)
    d.desc(0, table, 16 * len(entries), INDIRECT)
    d.queue.bulk_indirect = 1
    d.publish(0)
    return d.queue.pop_avail(), d


def test_a_bulk_table_whose_next_fields_skip_an_entry_gives_the_chain_they_name() -> None:
    chain, _ = bulk_table_chain([(0, 16, NEXT, 2), (0x100, 32, NEXT, 2), (0x200, 64, WRITE, 0)])
    assert not isinstance(chain, BulkChain)
    assert (chain.readable_len, chain.writable_len) == (16, 64)  # entry 1 is not in it


def test_a_bulk_table_whose_first_entry_names_itself_next_is_a_loop_and_dropped() -> None:
    chain, d = bulk_table_chain([(0, 16, NEXT, 0), (0x100, 32, WRITE, 0)])
    assert chain is None and d.queue.dropped_chains == 1 and d.used(0) == (0, 0)


def test_a_bulk_table_whose_last_entry_carries_a_stray_next_value_is_still_read() -> None:
    # The last entry has no NEXT flag, so its next field means nothing (Linux leaves it 0).
    chain, _ = bulk_table_chain([(0, 16, NEXT, 1), (0x100, 32, NEXT, 2), (0x200, 1, WRITE, 7)])
    assert isinstance(chain, BulkChain) and chain.split == 2
    assert (chain.readable_len, chain.writable_len) == (48, 1)


def test_a_bulk_table_with_a_readable_buffer_after_a_writable_one_is_dropped() -> None:
    chain, d = bulk_table_chain([(0, 16, NEXT, 1), (0x100, 32, NEXT | WRITE, 2),
                                 (0x200, 8, NEXT, 3), (0x300, 1, WRITE, 0)])
    assert chain is None and d.queue.dropped_chains == 1


@pytest.mark.parametrize(("entries", "split"), [
    ([(0, 16, NEXT, 1), (0x100, 32, NEXT | WRITE, 2), (0x200, 1, WRITE, 7)], 1),
    ([(0, 16, NEXT, 1), (0x100, 32, NEXT, 2), (0x200, 1, 0, 7)], 3),  # all device-readable
])
def test_straight_bulk_tables_of_other_shapes_than_linux_disk_requests_are_read_in_bulk(
        entries, split: int) -> None:
    chain, _ = bulk_table_chain(entries)
    assert isinstance(chain, BulkChain) and chain.split == split
    assert chain.lens == [16, 32, 1]


def test_a_bulk_chain_at_the_top_of_the_address_space_is_the_regions_bytes() -> None:
    from pymvm.devices.virtio.queue import _straight_table

    lo, ram = 2**64 - 0x10000, bytearray(range(256)) * 256
    entries = [(lo + 0x10, 16, NEXT, 1), (2**64 - 2, 2, WRITE, 0)]
    table = memoryview(b"".join(struct.pack("<QIHH", *e) for e in entries))
    chain = _straight_table(5, table, 2, lo, 2**64, memoryview(ram))
    assert isinstance(chain, BulkChain) and chain.head == 5
    assert [bytes(v) for v in chain.readable] == [bytes(range(0x10, 0x20))]
    assert [bytes(v) for v in chain.writable] == [bytes([0xFE, 0xFF])]
