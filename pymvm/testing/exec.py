"""`pymvm exec SOCK -- CMD...`: run a command in a running VM through its guest agent.

The guest's CID comes from the control API (GET /vm/devices, the vsock device); the command
runs through the agent over AF_VSOCK from this host. Exit status: the command's; 128+N when
a signal N killed it; 124 when --timeout killed it; 2 for usage errors (no API, no vsock
device, no agent).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_TIMED_OUT = 124  # as timeout(1)


class ExecError(Exception):
    """The command could not be run in the VM (one line: what and the fix)."""


def guest_cid(sock: str) -> int:
    from pymvm.api.client import ApiClientError, ApiUnreachable, request

    try:
        answer = request(sock, "GET", "/vm/devices")
    except ApiUnreachable as e:
        raise ExecError(str(e)) from None
    except ApiClientError as e:
        raise ExecError(f"the API at {sock} refused GET /vm/devices: {e.message}") from None
    for device in answer.get("devices", []):
        if device.get("type") == "vsock" and device.get("vsock", {}).get("cid") is not None:
            return int(device["vsock"]["cid"])
    raise ExecError(f"the VM at {sock} has no vsock device: add a [vsock] table to its config "
                    "and start it again")


def exec_in_vm(sock: str, argv: Sequence[str], *, timeout: float | None = None,
               port: int | None = None, stdin: bool = False) -> int:
    from .agent import DEFAULT_PORT, AgentClient, AgentError, vsock_connector

    if not argv:
        raise ExecError("no command given: pymvm exec SOCK -- CMD [ARG...]")
    cid = guest_cid(sock)
    client = AgentClient(vsock_connector(cid, port or DEFAULT_PORT))
    data = sys.stdin.buffer.read() if stdin else None
    try:
        result = client.run(list(argv), input=data, timeout=timeout)
    except AgentError as e:
        raise ExecError(f"{e} (is the guest's agent running? the VM must boot an initramfs "
                        "from 'pymvm build-initramfs')") from None
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    if result.timed_out:
        print(f"pymvm: {argv[0]} timed out after {timeout:g} s and was killed", file=sys.stderr)
        return EXIT_TIMED_OUT
    if result.signal:
        return 128 + result.signal
    return result.returncode
