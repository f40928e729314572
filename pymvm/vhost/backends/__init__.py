"""Built-in vhost-user back-ends (device implementations over pymvm.vhost.user.backend)."""

from pymvm.vhost.backends.net import NetBackend

__all__ = ["NetBackend"]
