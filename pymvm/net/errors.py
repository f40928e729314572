"""Exceptions of the net package: one-line messages that name the problem and the fix."""


class NetError(Exception):
    """Host networking (TAP, bridge, network namespace) could not be set up."""


class TapError(NetError):
    """A TAP device could not be opened or configured."""


class HostNetworkError(NetError):
    """A bridge, address or network namespace could not be created or attached."""
