"""The control API: REST/JSON on a UNIX socket (aiohttp), its OpenAPI document and client.

- ``controller.py``: the one dispatcher every request goes through (Firecracker's VmmAction);
- ``server.py``: the HTTP layer, served from the VMM's asyncio loop;
- ``metrics.py``: the Prometheus collector of one VM;
- ``client.py``: what ``pymvm status|pause|...`` use;
- ``openapi.json``: the document the server serves at ``GET /openapi.json``.
"""

from pathlib import Path

OPENAPI_PATH = Path(__file__).with_name("openapi.json")


def load_server_modules() -> None:
    """Import what the VMM's API server needs, for a process that serves it and is never a
    TLS client (the VMM). aiohttp builds two client TLS contexts when it is imported, each
    loading the system's CA store (about 55 ms of CPU natively, seconds in the nested host):
    it loads with ssl hidden and skips them. urllib.request (with http.client) is imported
    first, with ssl, so that it keeps its HTTPS parts: prometheus_client needs them at the
    first scrape. Where aiohttp is imported already, this changes nothing."""
    import urllib.request  # noqa: F401

    from ..lazy import load_without

    load_without("aiohttp.web", hidden=("ssl",))
