"""A client of the control API over its UNIX socket (aiohttp), for `pymvm status|pause|...`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

DEFAULT_TIMEOUT_S = 30.0


class ApiClientError(Exception):
    """The API answered with an error (``status`` is its HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ApiUnreachable(Exception):
    """Nothing answers at the socket path."""


async def _request(sock: str, method: str, path: str, body: Any, timeout: float) -> Any:
    connector = aiohttp.UnixConnector(path=sock)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            async with session.request(method, f"http://localhost{path}", json=body) as resp:
                text = await resp.text()
                if resp.content_type == "application/json":
                    payload = json.loads(text) if text else None
                else:
                    payload = text
                if resp.status >= 400:
                    message = payload.get("error") if isinstance(payload, dict) else None
                    raise ApiClientError(resp.status, message or f"HTTP {resp.status}")
                return payload
    except aiohttp.ClientConnectorError as e:
        raise ApiUnreachable(f"cannot reach the API at {sock}: {e.os_error.strerror or e}; is "
                             "the VM running with --api-sock there?") from None
    except asyncio.TimeoutError:
        raise ApiUnreachable(f"the API at {sock} did not answer within {timeout:g} s") from None


def request(sock: str, method: str, path: str, body: Any = None,
            timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """One request; returns the decoded answer or raises ApiClientError / ApiUnreachable."""
    return asyncio.run(_request(sock, method, path, body, timeout))


def describe_vm(vm: dict[str, Any]) -> str:
    """One readable line for GET /vm."""
    parts = [f"{vm['id']}: {vm['state']}", f"{vm['vcpus']} vCPU{'s' if vm['vcpus'] != 1 else ''}",
             f"{vm['memory_mib']} MiB", f"up {vm['uptime_s']:.1f} s"]
    if vm.get("boot_time_us") is not None:
        parts.append(f"booted in {vm['boot_time_us'] / 1000:.0f} ms")
    return ", ".join(parts)


def describe_net(dev: dict[str, Any]) -> str:
    net = dev.get("net", {})
    where = net.get("tap") or net.get("socket") or "?"
    return f"{dev['id']}: link {net.get('link')} ({net.get('backend')} on {where})"
