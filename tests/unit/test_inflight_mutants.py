"""Inflight I/O tracking (pymvm/vhost/user/inflight.py) on a bytearray: the edges that
scripts/mutation on the module showed untested (region sizes at the 64-byte boundary, the
header fields' offsets, recovery of a region left by a dead or hostile peer)."""

from __future__ import annotations

import struct

import pytest

from pymvm.vhost.user import inflight as inf


def region(queue_size: int, extra: int = 0) -> tuple[bytearray, inf.InflightQueue]:
    raw = bytearray(inf.queue_region_size(queue_size) + extra)
    return raw, inf.InflightQueue(memoryview(raw), queue_size)


def header(raw: bytearray) -> tuple[int, int, int, int, int]:
    return inf.QUEUE_HEADER.unpack_from(raw)


def desc(raw: bytearray, head: int) -> tuple[int, int, int]:
    return inf.DESC_STATE.unpack_from(raw, 16 + 16 * head)


@pytest.mark.parametrize(("queue_size", "size"), [(1, 64), (3, 64), (4, 128), (7, 128), (8, 192)])
def test_queue_region_is_header_plus_16_bytes_per_descriptor_rounded_up_to_64(queue_size, size) -> None:
    assert inf.queue_region_size(queue_size) == size


def test_region_holds_every_queue_back_to_back() -> None:
    assert inf.region_size(3, 4) == 3 * 128
    assert inf.region_size(1, 256) == 4160


def test_a_view_smaller_than_one_queue_region_is_refused_naming_both_sizes() -> None:
    with pytest.raises(ValueError, match="inflight region of 127 bytes is too small for 4 descriptors"):
        inf.InflightQueue(memoryview(bytearray(127)), 4)
    inf.InflightQueue(memoryview(bytearray(128)), 4)  # exactly one queue's region


def test_header_fields_are_read_at_their_spec_offsets() -> None:
    raw, q = region(8)
    inf.QUEUE_HEADER.pack_into(raw, 0, 0xFFFF_FFFF_FFFF_FFFF, 1, 8, 5, 0x1234)
    assert (q.desc_num, q.last_batch_head, q.used_idx) == (8, 5, 0x1234)
    assert q.queue_size == 8 and q.view.obj is raw


def test_fresh_region_is_zeroed_and_its_header_written_leaving_bytes_past_it_alone() -> None:
    raw, q = region(4, extra=8)
    raw[:] = b"\xAA" * len(raw)
    assert q.recover(0x1_0007) == inf.Recovery((), 7)  # used idx is a u16
    assert header(raw) == (0, 1, 4, 0, 7)
    assert raw[16:128] == bytes(112)
    assert raw[128:] == b"\xAA" * 8
    assert q.pending() == []


def test_region_of_another_version_starts_clean() -> None:
    raw, q = region(4)
    q.recover(0)
    q.fetched(2)
    struct.pack_into("<H", raw, 8, 2)  # version 2
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(3) == inf.Recovery((), 3)
    assert again.pending() == [] and header(raw)[1] == 1


def test_fetch_order_restarts_at_one_when_a_region_is_started_fresh() -> None:
    raw, q = region(4)
    q.recover(0)
    q.fetched(1)
    q.fetched(3)
    struct.pack_into("<H", raw, 10, 0)  # desc_num 0: a region nobody initialized
    q.recover(0)
    q.fetched(2)
    assert desc(raw, 2) == (1, 0, 1)


def test_fetched_marks_the_head_inflight_with_next_zero_and_its_fetch_number() -> None:
    raw, q = region(4)
    q.recover(0)
    struct.pack_into("<H", raw, 16 + 16 * 2 + 6, 0xBEEF)  # stale next
    q.fetched(2)
    q.fetched(0)
    assert desc(raw, 2) == (1, 0, 1) and desc(raw, 0) == (1, 0, 2)
    assert q.is_inflight(2) and q.counter(2) == 1 and q.counter(0) == 2
    assert q.pending() == [0, 2]


def test_end_used_clears_the_head_and_stores_the_used_idx_as_a_u16() -> None:
    raw, q = region(4)
    q.recover(0)
    q.fetched(1)
    q.begin_used(1)
    assert q.last_batch_head == 1
    q.end_used(1, 0x1_0002)
    assert not q.is_inflight(1) and q.used_idx == 2
    q.sync_used_idx(0x2_0009)
    assert q.used_idx == 9


def test_recovery_continues_fetch_numbers_after_the_highest_even_of_a_finished_head() -> None:
    raw, q = region(4)
    q.recover(0)
    for head in (0, 1, 2):
        q.fetched(head)
    q.begin_used(2)
    q.end_used(2, 1)  # head 2 (fetch number 3) finished
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(1) == inf.Recovery((0, 1), 3)
    again.fetched(3)
    assert again.counter(3) == 4


def test_recovery_with_the_used_idx_recorded_clears_nothing() -> None:
    raw, q = region(4)
    q.recover(5)
    q.fetched(1)
    q.begin_used(1)  # published intent, but the used idx never moved
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(5) == inf.Recovery((1,), 6)
    assert again.is_inflight(1)


def test_recovery_ignores_a_last_batch_head_outside_the_queue() -> None:
    raw, q = region(4)
    q.recover(0)
    q.fetched(3)
    struct.pack_into("<H", raw, 12, 4)  # last_batch_head = queue size: no such head
    raw[16 + 16 * 4] = 0x5A  # where head 4 would be: the region's padding
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(1) == inf.Recovery((3,), 2)
    assert again.used_idx == 1
    assert raw[16 + 16 * 4] == 0x5A


def test_recovery_clears_garbage_inflight_bytes_and_resubmits_only_real_ones() -> None:
    raw, q = region(4)
    q.recover(0)
    q.fetched(1)
    raw[16 + 16 * 2] = 7  # a hostile front-end's byte
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(0) == inf.Recovery((1,), 1)
    assert raw[16 + 16 * 2] == 0 and raw[16 + 16 * 1] == 1


def test_next_avail_wraps_at_16_bits() -> None:
    raw, q = region(4)
    q.recover(0xFFFF)
    q.fetched(0)
    q.fetched(1)
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(0xFFFF) == inf.Recovery((0, 1), 1)


def test_fetch_numbers_start_at_one_after_recovering_a_region_where_nothing_was_fetched() -> None:
    raw, q = region(4)
    q.recover(0)
    again = inf.InflightQueue(memoryview(raw), 4)
    assert again.recover(0) == inf.Recovery((), 0)
    again.fetched(2)
    assert again.counter(2) == 1
