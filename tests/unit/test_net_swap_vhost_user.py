"""A ring swap between two real vhost-user front-ends (issue 10 item 2): the old back-end's
GET_VRING_BASE answers are the new one's SET_VRING_BASE, both get the same guest memory fd
and the same kick and call eventfds; a new back-end that hangs up in the middle of the ring
set-up puts the old one back (strict start)."""

from __future__ import annotations

import os
import socket

import pytest

from pymvm.devices.swap import SwapFailed, hand_over
from pymvm.devices.virtio.net import VirtioNetDevice
from pymvm.vhost.queue_state import RingPosition
from pymvm.vhost.user.messages import FrontendRequest as FR

from .test_vhost_user_frontend import (  # noqa: F401  (fixtures)
    FakeBackend,
    connect,
    context,
    eventfds,
    frontends,
    inode,
    memory,
    sock_dir,
    write_used_idx,
)


class HangsUpAt(FakeBackend):
    """Answers like FakeBackend until ``request`` arrives, then drops the connection."""

    def __init__(self, path: str, request: FR) -> None:
        super().__init__(path)
        self.hang_at = request
        self.hung_up = False

    def _handle(self, conn, sock, msg) -> None:
        # What the front-end pipelined after the request is ignored too (it would be answered
        # out of turn, an exception in this thread).
        if FR(msg.REQUEST) is self.hang_at or self.hung_up:
            self.hung_up = True
            sock.shutdown(socket.SHUT_RDWR)
            return
        super()._handle(conn, sock, msg)


def live_device(fe, ctx) -> VirtioNetDevice:
    device = VirtioNetDevice(b"\x52\x54\x00\x00\x00\x07", None, fe)
    device.activate(ctx)
    return device


def test_the_rings_move_with_their_positions_memory_and_eventfds(sock_dir, frontends, memory,
                                                                 eventfds):
    old_be = FakeBackend(os.path.join(sock_dir, "old.sock")).start()
    new_be = FakeBackend(os.path.join(sock_dir, "new.sock")).start()
    try:
        old = connect(old_be, frontends)
        ctx = context(eventfds, memory)
        device = live_device(old, ctx)
        old_be.vring_bases = {0: 17, 1: 4242}
        write_used_idx(memory, 0, 17)
        write_used_idx(memory, 1, 4242)
        new = connect(new_be, frontends)
        resumed = hand_over(device, new, acked=ctx.acked_features)
        assert resumed == {0: RingPosition(17, 17), 1: RingPosition(4242, 4242)}
        assert old_be.requests()[-3:] == [FR.GET_VRING_BASE, FR.GET_VRING_BASE, FR.SET_STATUS]
        new_be.wait_for(lambda: FR.SET_STATUS in new_be.requests())
        assert [r.message.num for r in new_be.messages(FR.SET_VRING_BASE)] == [17, 4242]
        kicks, calls = eventfds
        assert [r.fd_inodes for r in new_be.messages(FR.SET_VRING_KICK)] == [
            (inode(kicks[0]),), (inode(kicks[1]),)]
        assert [r.fd_inodes for r in new_be.messages(FR.SET_VRING_CALL)] == [
            (inode(calls[0]),), (inode(calls[1]),)]
        assert new_be.messages(FR.SET_MEM_TABLE)[0].fd_inodes == (inode(memory.fd),)
        assert device.backend is new and new.active and not old.active
        # The kick after the start: each queue's eventfd holds one.
        assert [os.eventfd_read(fd) for fd in kicks] == [1, 1]
    finally:
        old_be.kill()
        new_be.kill()


@pytest.mark.parametrize("hang_at", [FR.SET_VRING_ADDR, FR.SET_VRING_CALL, FR.SET_STATUS])
def test_a_new_backend_hanging_up_during_the_set_up_puts_the_old_one_back(
        sock_dir, frontends, memory, eventfds, hang_at):
    old_be = FakeBackend(os.path.join(sock_dir, "old.sock")).start()
    new_be = HangsUpAt(os.path.join(sock_dir, "new.sock"), hang_at).start()
    try:
        old = connect(old_be, frontends)
        ctx = context(eventfds, memory)
        device = live_device(old, ctx)
        old_be.vring_bases = {0: 9, 1: 11}
        write_used_idx(memory, 0, 9)
        write_used_idx(memory, 1, 11)
        new = connect(new_be, frontends)
        with pytest.raises(SwapFailed, match="hung up while its rings were set up"):
            hand_over(device, new, acked=ctx.acked_features)
        assert device.backend is old and old.active
        # The old back-end was set up again at the positions it reported.
        old_be.wait_for(lambda: len(old_be.messages(FR.SET_VRING_BASE)) == 4)
        assert [r.message.num for r in old_be.messages(FR.SET_VRING_BASE)][2:] == [9, 11]
    finally:
        old_be.kill()
        new_be.kill()


def test_features_and_memory_table_reach_the_new_backend_before_the_old_one_stops(
        sock_dir, frontends, memory, eventfds):
    """The data plane's gap is only the rings' hand-over: SET_FEATURES and the memory table
    go to the new back-end while the old one still serves, once, and not again at start."""
    old_be = FakeBackend(os.path.join(sock_dir, "old.sock")).start()
    new_be = FakeBackend(os.path.join(sock_dir, "new.sock")).start()
    try:
        old = connect(old_be, frontends)
        ctx = context(eventfds, memory)
        device = live_device(old, ctx)
        new = connect(new_be, frontends)
        seen_at_stop: list[list[FR]] = []
        stop = old.stop

        def stop_and_look():
            seen_at_stop.append(new_be.requests())
            return stop()

        old.stop = stop_and_look
        hand_over(device, new, acked=ctx.acked_features)
        assert FR.SET_FEATURES in seen_at_stop[0] and FR.SET_MEM_TABLE in seen_at_stop[0]
        assert FR.SET_VRING_BASE not in seen_at_stop[0] and FR.SET_VRING_KICK not in seen_at_stop[0]
        new_be.wait_for(lambda: FR.SET_STATUS in new_be.requests())
        assert new_be.requests().count(FR.SET_FEATURES) == 1
        assert new_be.requests().count(FR.SET_MEM_TABLE) == 1
        assert device.backend is new and new.active
    finally:
        old_be.kill()
        new_be.kill()


def test_a_new_backend_that_refuses_its_memory_table_is_refused_before_the_old_one_stops(
        sock_dir, frontends, memory, eventfds):
    old_be = FakeBackend(os.path.join(sock_dir, "old.sock")).start()
    new_be = HangsUpAt(os.path.join(sock_dir, "new.sock"), FR.SET_MEM_TABLE).start()
    try:
        old = connect(old_be, frontends)
        ctx = context(eventfds, memory)
        device = live_device(old, ctx)
        new = connect(new_be, frontends)
        with pytest.raises(SwapFailed, match="keeps serving"):
            hand_over(device, new, acked=ctx.acked_features)
        assert FR.GET_VRING_BASE not in old_be.requests()  # never stopped
        assert device.backend is old and old.active
    finally:
        old_be.kill()
        new_be.kill()


def test_a_refusal_in_the_pipelined_ring_setup_raises_after_every_reply_and_the_channel_stays_in_step(
        sock_dir, frontends, memory, eventfds):
    """The ring set-up goes back to back: a refused SET_VRING_ADDR in the middle raises once
    all replies were read, and the next request on the same connection gets its own reply."""
    be = FakeBackend(os.path.join(sock_dir, "be.sock")).start()
    try:
        fe = connect(be, frontends)
        be.refuse = {FR.SET_VRING_ADDR}
        with pytest.raises(Exception, match="SET_VRING_ADDR"):
            fe.start(context(eventfds, memory), memory.regions, strict=True)
        # Every request of the set-up reached the back-end (none waited for the refusal).
        assert be.requests().count(FR.SET_VRING_ADDR) == 2
        assert FR.SET_STATUS in be.requests()
        be.refuse = set()
        fe.start(context(eventfds, memory), memory.regions, strict=True)
        assert fe.active and fe.connected
        positions = fe.stop()
        assert set(positions) == {0, 1}
    finally:
        be.kill()
