"""The sans-IO vhost-user state machines: what mutation testing (scripts/mutation on
pymvm/vhost/user/protocol.py) showed the older tests left unchecked: the exact texts of the
refusals, the initial and recorded feature state, fd attribution at message boundaries, and
what close() does to the connection's state."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserLocalError, VhostUserRemoteError
from pymvm.vhost.user.messages import FrontendRequest as FR
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import (
    NEED_DATA,
    BackendConnection,
    ConnectionState,
    FrontendConnection,
)
from tests.unit.test_vhost_user_protocol import is_open

PROTO = m.PROTOCOL_FEATURES_FLAG


@pytest.fixture
def pipe_fd() -> Iterator[list[int]]:
    """Real fds (pipe read ends); those the code under test left open are closed after."""
    made: list[int] = []
    yield made
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def new_fd(made: list[int]) -> int:
    r, w = os.pipe()
    os.close(w)
    made.append(r)
    return r


def feed(conn, message: m.Message) -> m.Message:
    data, fds = message.encode()
    conn.receive_data(data, fds)
    return conn.next_event()


def backend_that_offered(virtio: int = PROTO | 1, protocol: int | None = None) -> BackendConnection:
    """A back-end that answered GET_FEATURES (and GET_PROTOCOL_FEATURES) and got SET_OWNER;
    no SET_PROTOCOL_FEATURES yet."""
    b = BackendConnection()
    feed(b, m.GetFeatures())
    b.send(m.FeaturesReply(virtio))
    if protocol is not None:
        feed(b, m.GetProtocolFeatures())
        b.send(m.ProtocolFeaturesReply(protocol))
    feed(b, m.SetOwner())
    return b


def frontend_that_heard(virtio: int = PROTO | 1, protocol: int | None = None) -> FrontendConnection:
    """A front-end that read the GET_FEATURES (and GET_PROTOCOL_FEATURES) reply."""
    f = FrontendConnection()
    f.send(m.GetFeatures())
    f.receive_data(*m.FeaturesReply(virtio).encode())
    f.next_event()
    if protocol is not None:
        f.send(m.GetProtocolFeatures())
        f.receive_data(*m.ProtocolFeaturesReply(protocol).encode())
        f.next_event()
    return f


# ---------------------------------------------------------------------------------------------
# Feature state


def test_fresh_connections_know_no_features_and_have_negotiated_none() -> None:
    f, b = FrontendConnection(), BackendConnection()
    assert f.acked_features is None and f.backend_protocol_features is None
    assert f.protocol_features == PF(0)
    assert b.acked_features is None and b.offered_features is None
    assert b.offered_protocol_features == PF(0) and b.protocol_features == PF(0)


def test_acked_virtio_features_are_recorded_on_both_sides() -> None:
    f = frontend_that_heard(virtio=PROTO | 0b111)
    f.send(m.SetFeatures(0b101))
    assert f.acked_features == 0b101
    b = backend_that_offered(virtio=PROTO | 0b111)
    feed(b, m.SetFeatures(0b101))
    assert b.acked_features == 0b101


def test_frontend_may_ack_feature_bit_0_when_the_backend_offers_it() -> None:
    f = frontend_that_heard(virtio=PROTO | 1)
    f.send(m.SetFeatures(1))
    assert f.acked_features == 1


def test_frontend_refuses_a_gated_request_before_any_protocol_feature_is_negotiated() -> None:
    f = frontend_that_heard(protocol=PF.MQ)
    f.send(m.SetOwner())
    with pytest.raises(VhostUserLocalError, match="GET_QUEUE_NUM needs protocol feature MQ"):
        f.send(m.GetQueueNum())


def test_backend_refuses_a_gated_request_before_it_offered_any_protocol_feature() -> None:
    b = backend_that_offered()
    with pytest.raises(VhostUserRemoteError, match="GET_QUEUE_NUM needs protocol feature MQ, "
                                                   "which we did not offer"):
        feed(b, m.GetQueueNum())


def test_backend_refuses_set_protocol_features_before_it_offered_any() -> None:
    b = backend_that_offered()
    with pytest.raises(VhostUserRemoteError, match="sets 0x1 which we did not offer"):
        feed(b, m.SetProtocolFeatures(PF.MQ))


def test_backend_accepts_a_request_gated_by_a_feature_it_offered_before_set_protocol_features() -> None:
    b = backend_that_offered(protocol=PF.MQ)
    assert feed(b, m.GetQueueNum()) == m.GetQueueNum()
    assert b.reply_owed is FR.GET_QUEUE_NUM


def test_set_log_base_owes_no_ack_when_log_shmfd_was_offered_but_not_negotiated(pipe_fd) -> None:
    b = backend_that_offered(protocol=PF.LOG_SHMFD | PF.MQ)
    feed(b, m.SetProtocolFeatures(PF.MQ))
    msg = feed(b, m.SetLogBase(mmap_size=0x1000, mmap_offset=0, fd=new_fd(pipe_fd)))
    assert isinstance(msg, m.SetLogBase)
    assert b.reply_owed is None


# ---------------------------------------------------------------------------------------------
# Refusal texts name what is wrong


def test_unoffered_virtio_feature_bits_are_named_exactly_by_the_backend() -> None:
    b = backend_that_offered(virtio=PROTO | 0b001)
    with pytest.raises(VhostUserRemoteError, match=r"SET_FEATURES acks 0x2 which we did not offer"):
        feed(b, m.SetFeatures(0b011))


def test_unoffered_protocol_feature_bits_are_named_exactly_by_the_backend() -> None:
    b = backend_that_offered(protocol=PF.MQ)
    with pytest.raises(VhostUserRemoteError, match=r"SET_PROTOCOL_FEATURES sets 0x2 which"):
        feed(b, m.SetProtocolFeatures(PF.MQ | PF.LOG_SHMFD))


def test_unoffered_virtio_feature_bits_are_named_exactly_by_the_frontend() -> None:
    f = frontend_that_heard(virtio=PROTO | 0b001)
    with pytest.raises(VhostUserLocalError, match=r"SET_FEATURES acks 0x2 which the back-end did "
                                                  r"not offer; use negotiate_features\(\)"):
        f.send(m.SetFeatures(0b011))


def test_unoffered_protocol_feature_bits_are_named_exactly_by_the_frontend() -> None:
    f = frontend_that_heard(protocol=PF.MQ)
    with pytest.raises(VhostUserLocalError, match=r"SET_PROTOCOL_FEATURES sets 0x2 which the "):
        f.send(m.SetProtocolFeatures(PF.MQ | PF.LOG_SHMFD))


def test_negotiating_before_the_backend_answered_names_the_request_to_send() -> None:
    f = FrontendConnection()
    with pytest.raises(VhostUserLocalError, match="features unknown; send GetFeatures and read"):
        f.negotiate_features(1)
    with pytest.raises(VhostUserLocalError,
                       match="protocol features unknown; send GetProtocolFeatures and read"):
        f.negotiate_protocol_features(1)


def test_protocol_feature_requests_name_why_bit_30_is_missing_exactly() -> None:
    with pytest.raises(VhostUserLocalError, match=r"reply, which has not arrived$"):
        FrontendConnection().send(m.GetProtocolFeatures())
    with pytest.raises(VhostUserLocalError, match=r"reply, which lacks it$"):
        frontend_that_heard(virtio=1).send(m.GetProtocolFeatures())


def test_sending_after_close_names_the_state() -> None:
    f = FrontendConnection()
    f.close()
    with pytest.raises(VhostUserLocalError, match="cannot send on a connection in state CLOSED"):
        f.send(m.GetFeatures())


def test_a_failed_connection_names_its_first_error_on_every_later_read() -> None:
    b = BackendConnection()
    b.receive_data(m.Header(FR.GET_FEATURES, 0, 0).pack())
    with pytest.raises(VhostUserRemoteError, match="version 0") as first:
        b.next_event()
    with pytest.raises(VhostUserRemoteError,
                       match=re.escape(f"connection already failed ({first.value}); close it")):
        b.next_event()


def test_reading_after_close_says_so() -> None:
    f = FrontendConnection()
    f.close()
    with pytest.raises(VhostUserLocalError, match="next_event after close"):
        f.next_event()


def test_feeding_data_after_eof_says_to_stop_reading() -> None:
    f = FrontendConnection()
    f.receive_data(b"")
    with pytest.raises(VhostUserLocalError,
                       match="receive_data after the connection was closed; stop reading"):
        f.receive_data(b"x")


def test_fds_passed_with_eof_are_closed_and_refused(pipe_fd) -> None:
    fd = new_fd(pipe_fd)
    f = FrontendConnection()
    with pytest.raises(VhostUserLocalError, match="fds passed with EOF; pass data with fds"):
        f.receive_data(b"", [fd])
    assert not is_open(fd)


def test_oversized_ack_is_refused_naming_the_request_it_answers() -> None:
    f = frontend_that_heard(protocol=PF.REPLY_ACK)
    f.send(m.SetProtocolFeatures(PF.REPLY_ACK))
    f.send(m.SetOwner(need_reply=True))
    f.receive_data(m.Header(FR.SET_OWNER, m.VHOST_USER_VERSION | m.REPLY_FLAG, 16).pack())
    with pytest.raises(VhostUserRemoteError, match="SET_OWNER ack payload of 16 bytes, at most 8"):
        f.next_event()


def test_request_arriving_at_the_frontend_is_named() -> None:
    f = FrontendConnection()
    f.receive_data(m.GetFeatures().encode()[0])
    with pytest.raises(VhostUserRemoteError,
                       match="peer sent request GET_FEATURES on a channel where it may only reply"):
        f.next_event()


def test_frontend_refusing_a_non_request_names_its_type() -> None:
    with pytest.raises(VhostUserLocalError,
                       match="can only send FrontendRequest requests, not FeaturesReply"):
        FrontendConnection().send(m.FeaturesReply(0))  # type: ignore[arg-type]


def test_backend_refuses_a_back_end_channel_reply_on_the_main_socket() -> None:
    b = BackendConnection()
    feed(b, m.GetFeatures())
    with pytest.raises(VhostUserLocalError,
                       match="can only send replies to FrontendRequest, not BackendAck"):
        b.send(m.BackendAck(m.BackendRequest.CONFIG_CHANGE_MSG, 0))
    assert b.reply_owed is FR.GET_FEATURES


def test_backend_refusing_an_unasked_reply_names_its_request() -> None:
    with pytest.raises(VhostUserLocalError, match="reply to GET_FEATURES but no request awaits"):
        BackendConnection().send(m.FeaturesReply(0))


def test_backend_refusing_a_wrong_reply_names_both_types() -> None:
    b = BackendConnection()
    feed(b, m.GetFeatures())
    with pytest.raises(VhostUserLocalError, match="ProtocolFeaturesReply for GET_PROTOCOL_FEATURES, "
                                                  "but GET_FEATURES awaits a FeaturesReply"):
        b.send(m.ProtocolFeaturesReply(0))


# ---------------------------------------------------------------------------------------------
# Fd attribution at message boundaries and close()


def test_fds_sent_with_the_first_byte_of_the_next_message_belong_to_that_message(pipe_fd) -> None:
    b = backend_that_offered()
    fd = new_fd(pipe_fd)
    first = m.GetFeatures().encode()[0]
    kick = m.SetVringKick(index=0, fd=fd).encode()[0]
    b.receive_data(first + kick[:1], [fd])  # last byte with the fd: the kick's first
    b.receive_data(kick[1:])
    assert b.next_event() == m.GetFeatures()
    assert b.next_event() == m.SetVringKick(index=0, fd=fd)
    assert b.next_event() is NEED_DATA


def test_fds_after_a_buffered_partial_message_go_to_the_message_with_their_last_byte(pipe_fd) -> None:
    b = backend_that_offered()
    fd = new_fd(pipe_fd)
    first = m.GetFeatures().encode()[0]
    kick = m.SetVringKick(index=0, fd=fd).encode()[0]
    b.receive_data(first[:11])
    b.receive_data(first[11:] + kick, [fd])
    assert b.next_event() == m.GetFeatures()
    assert b.next_event() == m.SetVringKick(index=0, fd=fd)


def test_close_moves_an_open_connection_to_closed_and_keeps_an_error() -> None:
    f = FrontendConnection()
    f.close()
    assert f.state is ConnectionState.CLOSED
    b = BackendConnection()
    b.receive_data(m.Header(FR.GET_FEATURES, 0, 0).pack())
    with pytest.raises(VhostUserRemoteError):
        b.next_event()
    b.close()
    assert b.state is ConnectionState.ERROR
