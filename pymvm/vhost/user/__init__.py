"""vhost-user: the sans-IO protocol (messages, protocol) and, on top, the socket layers."""

from pymvm.vhost.user.errors import (
    VhostUserError,
    VhostUserLocalError,
    VhostUserProtocolError,
    VhostUserRemoteError,
    VhostUserRequestFailed,
)
from pymvm.vhost.user.messages import (
    PROTOCOL_FEATURES_FLAG,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    FrontendRequest,
    MemoryRegion,
    ProtocolFeature,
)
from pymvm.vhost.user.protocol import (
    NEED_DATA,
    PEER_CLOSED,
    BackendConnection,
    BackendRequestReceiver,
    BackendRequestSender,
    ConnectionState,
    FrontendConnection,
)

__all__ = [
    "NEED_DATA",
    "PEER_CLOSED",
    "PROTOCOL_FEATURES_FLAG",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "BackendConnection",
    "BackendRequest",
    "BackendRequestReceiver",
    "BackendRequestSender",
    "ConnectionState",
    "FrontendConnection",
    "FrontendRequest",
    "MemoryRegion",
    "ProtocolFeature",
    "VhostUserError",
    "VhostUserLocalError",
    "VhostUserProtocolError",
    "VhostUserRemoteError",
    "VhostUserRequestFailed",
]
