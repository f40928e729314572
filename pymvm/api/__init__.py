"""The control API: REST/JSON on a UNIX socket (aiohttp), its OpenAPI document and client.

- ``controller.py``: the one dispatcher every request goes through (Firecracker's VmmAction);
- ``server.py``: the HTTP layer, served from the VMM's asyncio loop;
- ``metrics.py``: the Prometheus collector of one VM;
- ``client.py``: what ``pymvm status|pause|...`` use;
- ``openapi.json``: the document the server serves at ``GET /openapi.json``.
"""

from pathlib import Path

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
