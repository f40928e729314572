"""Exceptions of the vhost package: one-line messages that name the problem and the fix."""


class VhostError(Exception):
    """A vhost back-end (in-kernel vhost-net or vhost-user) could not be set up or driven."""


class VhostIoctlError(VhostError):
    """A vhost ioctl failed; carries the ioctl name and errno."""

    def __init__(self, ioctl: str, errno_: int, message: str) -> None:
        super().__init__(message)
        self.ioctl = ioctl
        self.errno = errno_
