"""pymvm.syscalls' allowlists use Linux's own numbers for what they narrow (issue 15: the
module takes no constant from the socket module, which `pymvm run` no longer imports)."""

from __future__ import annotations

import socket

from pymvm import syscalls


def test_the_filters_socket_families_are_the_socket_modules_numbers() -> None:
    assert (syscalls.AF_UNIX, syscalls.AF_NETLINK) == (socket.AF_UNIX, socket.AF_NETLINK)
    assert syscalls.SOCKET_FAMILIES == {"backend": (socket.AF_UNIX,),
                                        "vmm": (socket.AF_UNIX, socket.AF_NETLINK)}
