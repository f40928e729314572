"""The blocking vhost-user socket layer (pymvm/vhost/user/socket_io.py) on a socketpair: a
reply is written to the peer end before the request that it answers is sent, so no thread
is needed. Written for the survivors of scripts/mutation on that module."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserLocalError, VhostUserRequestFailed
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import NEED_DATA, BackendConnection
from pymvm.vhost.user.socket_io import (
    MAX_FDS,
    FrontendChannel,
    VhostUserDisconnected,
    recv_with_fds,
    send_with_fds,
)

FEATURES = m.PROTOCOL_FEATURES_FLAG | 1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def reply(peer: socket.socket, *replies: m.Reply) -> None:
    """Queue ``replies`` on the peer's end, for requests the channel sends next."""
    for r in replies:
        send_with_fds(peer, *r.encode())


def requests_seen(peer: socket.socket) -> list[m.Request]:
    """The requests the channel wrote so far (the peer end read without blocking)."""
    conn = BackendConnection()
    conn.offered_features = FEATURES
    conn.offered_protocol_features = PF.REPLY_ACK | PF.MQ
    peer.setblocking(False)
    try:
        while True:
            try:
                data, fds = recv_with_fds(peer)
            except BlockingIOError:
                break
            conn.receive_data(data, fds)
    finally:
        peer.setblocking(True)
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        seen.append(event)
    return seen


def channel_past_features(sock: socket.socket, peer: socket.socket,
                          protocol: PF | None = None, timeout: float = 5.0) -> FrontendChannel:
    ch = FrontendChannel(sock, timeout)
    reply(peer, m.FeaturesReply(FEATURES))
    assert ch.request(m.GetFeatures()) == m.FeaturesReply(FEATURES)
    if protocol is not None:
        reply(peer, m.ProtocolFeaturesReply(protocol))
        ch.request(m.GetProtocolFeatures())
        assert ch.request(m.SetProtocolFeatures(protocol)) is None
    return ch


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------
# send_with_fds / recv_with_fds


def test_fds_ride_once_with_the_first_chunk_of_a_send_bigger_than_the_socket_buffer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)  # as FrontendChannel does: sendmsg then sends what fits, not all
    b.settimeout(3)
    r, w = os.pipe()
    data = bytes(range(256)) * 1024  # 256 KiB: several sendmsg calls
    got = bytearray()
    fds: list[int] = []

    def reader() -> None:
        while len(got) < len(data):
            try:
                chunk, more = recv_with_fds(b, 4096)
            except TimeoutError:
                return
            if not chunk:
                return
            got.extend(chunk)
            fds.extend(more)

    t = threading.Thread(target=reader)
    t.start()
    try:
        send_with_fds(a, data, [r])
        t.join(20)
        assert bytes(got) == data
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
    finally:
        for fd in [r, w, *fds]:
            os.close(fd)
        a.close()
        b.close()


def test_send_without_fds_sends_no_control_message(pair) -> None:
    a, b = pair
    send_with_fds(a, b"abc")
    data, anc, _flags, _addr = b.recvmsg(16, socket.CMSG_SPACE(4 * MAX_FDS))
    assert data == b"abc" and anc == []


def test_send_to_a_closed_peer_raises_broken_pipe_not_sigpipe(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(BrokenPipeError):
        send_with_fds(a, b"x" * 10)


def test_received_fds_come_back_in_order_and_close_on_exec(pair) -> None:
    a, b = pair
    pipes = [os.pipe() for _ in range(MAX_FDS)]
    sent = [p[0] for p in pipes]
    send_with_fds(a, b"hello", sent)
    data, fds = recv_with_fds(b)
    try:
        assert data == b"hello"
        assert [os.fstat(f).st_ino for f in fds] == [os.fstat(f).st_ino for f in sent]
        assert all(not os.get_inheritable(f) for f in fds)
    finally:
        for f in fds + [x for p in pipes for x in p]:
            os.close(f)


def test_recv_returns_empty_bytes_and_no_fds_at_eof(pair) -> None:
    a, b = pair
    a.close()
    assert recv_with_fds(b) == (b"", [])


def test_recv_reads_at_most_the_given_size(pair) -> None:
    a, b = pair
    a.sendall(b"0123456789")
    assert recv_with_fds(b, 4) == (b"0123", [])
    assert recv_with_fds(b) == (b"456789", [])


# ---------------------------------------------------------------------------------------------
# FrontendChannel.request


def test_request_returns_its_reply_and_none_for_a_request_without_one(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer)
    assert ch.request(m.SetOwner()) is None
    assert [type(r) for r in requests_seen(peer)] == [m.GetFeatures, m.SetOwner]
    assert ch.broken is None


def test_request_with_no_reply_in_time_breaks_the_channel_naming_request_and_timeout(pair) -> None:
    sock, _peer = pair
    ch = FrontendChannel(sock, 0.2)
    start = time.monotonic()
    with pytest.raises(VhostUserDisconnected,
                       match=r"^vhost-user back-end lost: no reply to GET_FEATURES within 0.2 s$"):
        ch.request(m.GetFeatures())
    assert time.monotonic() - start < 3
    assert ch.broken == "no reply to GET_FEATURES within 0.2 s"
    with pytest.raises(VhostUserDisconnected,
                       match=re.escape("socket already failed (no reply to GET_FEATURES within")):
        ch.request(m.GetFeatures())


def test_reply_trickling_in_past_the_timeout_still_times_out(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 0.5)
    data = m.FeaturesReply(FEATURES).encode()[0]
    stop = threading.Event()

    def trickle() -> None:
        for byte in data[:-1]:
            if stop.wait(0.1):
                return
            peer.send(bytes([byte]))

    t = threading.Thread(target=trickle)
    t.start()
    try:
        with pytest.raises(VhostUserDisconnected, match="no reply to GET_FEATURES within 0.5 s"):
            ch.request(m.GetFeatures())
    finally:
        stop.set()
        t.join()


def test_request_to_a_closed_peer_breaks_the_channel_naming_the_error(pair) -> None:
    sock, peer = pair
    peer.close()
    ch = FrontendChannel(sock, 1.0)
    with pytest.raises(VhostUserDisconnected, match=r"lost: GET_FEATURES: Broken pipe$"):
        ch.request(m.GetFeatures())
    assert ch.broken == "GET_FEATURES: Broken pipe"


def test_peer_closing_before_the_reply_breaks_the_channel(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 5.0)
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(VhostUserDisconnected, match="lost: GET_FEATURES: .*peer closed the "
                                                    "connection before replying to GET_FEATURES"):
        ch.request(m.GetFeatures())


def test_malformed_reply_breaks_the_channel_naming_the_request(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 5.0)
    reply(peer, m.ProtocolFeaturesReply(0))  # answers another request
    with pytest.raises(VhostUserDisconnected, match=r"lost: GET_FEATURES: .*reply to "
                                                    r"GET_PROTOCOL_FEATURES while waiting"):
        ch.request(m.GetFeatures())
    assert ch.broken is not None


def test_local_protocol_error_raises_before_any_io_and_leaves_the_channel_usable(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 5.0)
    with pytest.raises(VhostUserLocalError):
        ch.request(m.SetMemTable(regions=(), fds=()))  # before SET_OWNER
    assert ch.broken is None
    assert requests_seen(peer) == []


def test_refused_request_raises_request_failed_and_the_channel_stays_usable(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.REPLY_ACK)
    reply(peer, m.Ack(FR.SET_OWNER, 3))
    with pytest.raises(VhostUserRequestFailed) as failed:
        ch.request(m.SetOwner(need_reply=True))
    assert failed.value.status == 3 and ch.broken is None
    reply(peer, m.Ack(FR.SET_VRING_NUM, 0))
    assert ch.request(m.SetVringNum(index=0, num=8, need_reply=True)) == m.Ack(FR.SET_VRING_NUM, 0)


def test_request_sets_the_timeout_on_the_socket_before_sending(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer)
    sock.settimeout(None)
    ch.request(m.SetOwner())  # no reply: only the send used the socket
    assert sock.gettimeout() == 5.0


def test_request_gets_a_reply_already_waiting_even_with_a_timeout_under_a_second(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 0.5)
    reply(peer, m.FeaturesReply(FEATURES))
    assert ch.request(m.GetFeatures()) == m.FeaturesReply(FEATURES)


def test_fds_of_a_reply_reach_the_caller(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.INFLIGHT_SHMFD)
    ch.request(m.SetOwner())
    r, w = os.pipe()
    try:
        reply(peer, m.InflightFdReply(mmap_size=4096, mmap_offset=0, num_queues=1,
                                      queue_size=8, fd=r))
        got = ch.request(m.GetInflightFd(num_queues=1, queue_size=8))
        assert isinstance(got, m.InflightFdReply)
        assert os.fstat(got.fd).st_ino == os.fstat(r).st_ino and got.fd != r
        os.close(got.fd)
    finally:
        os.close(r)
        os.close(w)


def test_fds_of_requests_reach_the_peer_from_request_and_pipeline(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer)
    ch.request(m.SetOwner())
    requests_seen(peer)
    r, w = os.pipe()
    try:
        ch.request(m.SetVringKick(index=0, fd=r))
        ch.pipeline([m.SetVringCall(index=0, fd=w)])
        data, fds = recv_with_fds(peer)
        data2, fds2 = (b"", []) if len(fds) == 2 else recv_with_fds(peer)
        got = fds + fds2
        assert [os.fstat(f).st_ino for f in got] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
        for f in got:
            os.close(f)
    finally:
        os.close(r)
        os.close(w)


def test_pipeline_on_a_closed_socket_breaks_before_naming_any_request(pair) -> None:
    sock, _peer = pair
    ch = FrontendChannel(sock, 1.0)
    sock.close()
    with pytest.raises(VhostUserDisconnected, match=r"^vhost-user back-end lost: \?: "):
        ch.pipeline([m.GetFeatures()])


def test_send_to_a_closed_peer_raises_even_where_sigpipe_would_kill_the_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    pid = os.fork()
    if pid == 0:  # the child: SIGPIPE's default action (termination), as in a C embedder
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            send_with_fds(a, b"x")
        except BrokenPipeError:
            os._exit(7)
        os._exit(1)
    a.close()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


def test_credentials_a_peer_passes_are_not_taken_for_fds(pair) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    send_with_fds(a, b"hi")
    assert recv_with_fds(b) == (b"hi", [])


# ---------------------------------------------------------------------------------------------
# FrontendChannel.requests / pipeline


def test_requests_sends_back_to_back_and_returns_replies_in_order_with_none_for_no_reply(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.REPLY_ACK | PF.MQ)
    reply(peer, m.Ack(FR.SET_OWNER, 0), m.QueueNumReply(4))
    got = ch.requests([m.SetOwner(need_reply=True), m.SetVringNum(index=0, num=8),
                       m.GetQueueNum()])
    assert got == [m.Ack(FR.SET_OWNER, 0), None, m.QueueNumReply(4)]
    assert ch.broken is None


def test_pipeline_reads_every_reply_and_returns_the_first_refusal(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.REPLY_ACK | PF.MQ)
    ch.request(m.SetOwner())
    reply(peer, m.Ack(FR.SET_VRING_NUM, 1), m.Ack(FR.SET_VRING_BASE, 2), m.QueueNumReply(2))
    replies, failure = ch.pipeline([m.SetVringNum(index=0, num=8, need_reply=True),
                                    m.SetVringBase(index=0, num=0, need_reply=True),
                                    m.GetQueueNum()])
    assert replies == [None, None, m.QueueNumReply(2)]
    assert isinstance(failure, VhostUserRequestFailed)
    assert failure.request is FR.SET_VRING_NUM and failure.status == 1
    assert ch.conn.replies_owed == 0 and ch.broken is None
    reply(peer, m.Ack(FR.SET_VRING_NUM, 1))
    with pytest.raises(VhostUserRequestFailed, match="SET_VRING_NUM"):
        ch.requests([m.SetVringNum(index=0, num=8, need_reply=True)])


def test_pipeline_whose_first_request_is_refused_locally_raises_and_sends_nothing(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 5.0)
    with pytest.raises(VhostUserLocalError, match="SET_MEM_TABLE before SET_OWNER"):
        ch.pipeline([m.SetMemTable(regions=(), fds=()), m.GetFeatures()])
    assert ch.broken is None
    assert requests_seen(peer) == []


def test_pipeline_refused_locally_after_requests_went_out_breaks_the_channel(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 5.0)
    with pytest.raises(VhostUserDisconnected, match=r"SET_MEM_TABLE before SET_OWNER.*\(after 2 "
                                                    r"requests sent unanswered\)"):
        ch.pipeline([m.GetFeatures(), m.ResetOwner(), m.SetMemTable(regions=(), fds=())])
    assert "after 2 requests sent unanswered" in ch.broken
    assert [type(r) for r in requests_seen(peer)] == [m.GetFeatures, m.ResetOwner]


def test_pipeline_on_a_broken_channel_raises_at_once(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 0.1)
    with pytest.raises(VhostUserDisconnected):
        ch.request(m.GetFeatures())
    with pytest.raises(VhostUserDisconnected, match=re.escape("socket already failed (no reply")):
        ch.pipeline([m.GetFeatures()])


def test_pipeline_with_no_reply_in_time_names_the_request_waited_for(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.MQ)
    ch.timeout = 0.2
    with pytest.raises(VhostUserDisconnected, match=r"lost: no reply to GET_QUEUE_NUM within 0.2 s$"):
        ch.pipeline([m.SetOwner(), m.GetQueueNum()])


def test_pipeline_to_a_closed_peer_names_the_request_and_error(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer)
    peer.close()
    with pytest.raises(VhostUserDisconnected, match=r"lost: SET_OWNER: Broken pipe$"):
        ch.pipeline([m.SetOwner()])


def test_pipeline_with_a_malformed_reply_breaks_naming_the_request(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.MQ)
    reply(peer, m.MaxMemSlotsReply(1))
    with pytest.raises(VhostUserDisconnected, match=r"lost: GET_QUEUE_NUM: .*GET_MAX_MEM_SLOTS"):
        ch.pipeline([m.SetOwner(), m.GetQueueNum()])
    assert ch.broken is not None


def test_pipeline_peer_closing_before_a_reply_breaks_the_channel(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer, protocol=PF.MQ)
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(VhostUserDisconnected, match="lost: GET_QUEUE_NUM: .*peer closed the "
                                                    "connection before replying to GET_QUEUE_NUM"):
        ch.pipeline([m.GetQueueNum()])


def test_pipeline_sets_the_timeout_on_the_socket(pair) -> None:
    sock, peer = pair
    ch = channel_past_features(sock, peer)
    sock.settimeout(None)
    ch.pipeline([m.SetOwner()])
    assert sock.gettimeout() == 5.0


# ---------------------------------------------------------------------------------------------
# shutdown / close


def test_shutdown_wakes_a_reader_blocked_on_the_socket_and_keeps_the_fd(pair) -> None:
    sock, peer = pair
    ch = FrontendChannel(sock, 30.0)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            ch.request(m.GetFeatures())
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    ch.shutdown()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(errors[0], VhostUserDisconnected)
    assert sock.fileno() >= 0
    ch.shutdown()  # not connected any more: no error


def test_close_closes_the_socket_and_the_connection(pair) -> None:
    sock, _peer = pair
    ch = FrontendChannel(sock, 1.0)
    ch.close()
    assert sock.fileno() == -1
    with pytest.raises(VhostUserLocalError, match="next_event after close"):
        ch.conn.next_event()
