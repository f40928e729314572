"""The vhost-user exception hierarchy.

Modelled on h11: a protocol error is either *local* (our own code asked for something the
protocol forbids: a bug in the caller) or *remote* (the peer sent something malformed or
out of order: the I/O layer should drop that one connection).
"""

from __future__ import annotations

from enum import IntEnum


class VhostUserError(Exception):
    """Base of every vhost-user error."""


class VhostUserProtocolError(VhostUserError):
    """The vhost-user protocol was violated, by us (local) or by the peer (remote)."""


class VhostUserLocalError(VhostUserProtocolError):
    """We misused the protocol API: sent a message out of order, bad fields, wrong reply."""


class VhostUserRemoteError(VhostUserProtocolError):
    """The peer sent a malformed or unexpected message; close this connection."""


class VhostUserRequestFailed(VhostUserRemoteError):
    """The peer answered a request with a non-zero status (REPLY_ACK or a u64 status reply).

    The stream itself is still well-formed: the connection stays usable, but the request
    did not take effect.
    """

    def __init__(self, request: IntEnum, status: int) -> None:
        self.request = request
        self.status = status
        super().__init__(
            f"peer reported failure status {status:#x} for {request.name}; "
            f"check the peer's log for why it rejected the request"
        )
