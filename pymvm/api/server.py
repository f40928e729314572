"""The control API's HTTP layer: aiohttp on a UNIX socket, served from the VMM's asyncio loop
(plain `GET /vm` requests are answered by the fast path in fastpath.py).

Handlers only parse: each request becomes an ApiRequest for the Controller. Every answer is
JSON (``/metrics`` is Prometheus text); every error is ``{"error": "..."}`` with 400, 404, 405
or 409, and anything unexpected is logged and answered 500 without a traceback on the wire.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from . import OPENAPI_PATH
from .controller import ApiRequest, Controller, VmmAction
from .errors import ApiError, ApiSocketError, BadRequest, MethodNotAllowed, NotFound
from .fastpath import protocol_factory
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = structlog.get_logger()

SOCKET_MODE = 0o600
# Bodies are a few bytes of JSON; anything much larger is a client bug.
MAX_BODY = 64 * 1024
# Bytes asked of the kernel per read on a client connection (set by FastPathProtocol).
# asyncio's default (256 KiB) is above malloc's mmap threshold: every request then maps,
# shrinks and unmaps a fresh buffer (three system calls and a page fault; measured: a third
# of the server's CPU time per `GET /vm`). A request is a few hundred bytes; a larger one
# just takes several reads.
READ_SIZE = 16 * 1024


def check_socket_path(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` when a live server answers there or it is not a socket; a stale
    socket (nobody listening) is left for ``bind_socket`` to replace."""
    p = Path(path)
    if not p.parent.is_dir():
        raise ApiSocketError(f"API socket {p}: directory {p.parent} does not exist; create it "
                             "or choose another path")
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiSocketError(f"API socket {p} exists and is not a socket; remove it or choose "
                             "another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(p))
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # stale: whoever made it is gone
        raise ApiSocketError(f"API socket {p}: cannot check whether another VMM serves it "
                             f"({e.strerror or e}); choose another path") from None
    finally:
        probe.close()
    raise ApiSocketError(f"API socket {p} is served by another running VMM; stop it or choose "
                         "another --api-sock path")


def bind_socket(path: str | os.PathLike[str]) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0600 from its creation on."""
    check_socket_path(path)
    p = str(path)
    try:
        os.unlink(p)  # stale (check_socket_path found nobody listening)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # umask rather than chmod after bind: the socket is never reachable by others.
        old = os.umask(0o177)
        try:
            sock.bind(p)
        finally:
            os.umask(old)
        os.chmod(p, SOCKET_MODE)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ApiSocketError(f"API socket {p}: cannot listen there ({e.strerror or e}); choose "
                             "another path") from None
    return sock


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps({"error": message}), status=status,
                        content_type="application/json", headers=headers)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e.status, e.message)
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        return _error(405, f"{request.method} is not allowed on {request.path}; use {allowed}",
                      headers={"Allow": allowed})
    except web.HTTPNotFound:
        return _error(404, f"no such path {request.path}; GET /openapi.json lists the API")
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body too large; the API takes at most {MAX_BODY} bytes")
    except web.HTTPException as e:
        return _error(e.status, e.reason)
    except Exception:
        log.exception("api_handler_failed", method=request.method, path=request.path)
        return _error(500, "internal error in the VMM; see its log")


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("the request has no body; send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply; send a flat JSON object") from None


class ApiServer:
    """Serves ``controller`` on the UNIX socket ``path`` until ``close()``."""

    def __init__(self, controller: Controller, path: str | os.PathLike[str]) -> None:
        self.controller = controller
        self.path = str(path)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._fast_connections: set[asyncio.Transport] = set()  # not handed to aiohttp (yet)
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._openapi = OPENAPI_PATH.read_bytes()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors_as_json], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/vm", self._simple(VmmAction.GET_VM), allow_head=False)
        r.add_put("/vm/state", self._with_body(VmmAction.SET_STATE))
        r.add_put("/vm/actions", self._with_body(VmmAction.ACTION, status=202))
        r.add_get("/vm/devices", self._simple(VmmAction.GET_DEVICES), allow_head=False)
        r.add_get("/vm/net/{id}", self._net_get, allow_head=False)
        r.add_patch("/vm/net/{id}", self._net_patch)
        r.add_put("/vm/net/{id}/backend", self._net_swap)
        r.add_get("/metrics", self._metrics, allow_head=False)
        r.add_get("/openapi.json", self._openapi_doc, allow_head=False)
        return app

    def _simple(self, action: VmmAction):
        async def handler(request: web.Request) -> web.Response:
            return _json(await self.controller.dispatch(ApiRequest(action)))
        return handler

    def _with_body(self, action: VmmAction, status: int = 200):
        async def handler(request: web.Request) -> web.Response:
            body = await _read_json(request)
            return _json(await self.controller.dispatch(ApiRequest(action, body=body)), status)
        return handler

    async def _net_get(self, request: web.Request) -> web.Response:
        req = ApiRequest(VmmAction.GET_NET, device_id=request.match_info["id"])
        return _json(await self.controller.dispatch(req))

    async def _net_patch(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        # An unknown device is 404 whatever the body says.
        self.controller.net_device(device_id)
        body = await _read_json(request)
        req = ApiRequest(VmmAction.PATCH_NET, device_id=device_id, body=body)
        return _json(await self.controller.dispatch(req))

    async def _net_swap(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        self.controller.net_device(device_id)  # an unknown device is 404 whatever the body
        body = await _read_json(request)
        req = ApiRequest(VmmAction.SWAP_NET, device_id=device_id, body=body)
        return _json(await self.controller.dispatch(req))

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await self.controller.dispatch(ApiRequest(VmmAction.METRICS))
        return web.Response(body=text, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _openapi_doc(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def start(self) -> None:
        """Bind (mode 0600, a stale socket replaced) and serve on the running loop."""
        self._sock = bind_socket(self.path)
        self._ino = os.stat(self.path).st_ino
        from pymvm import state  # removed by `pymvm cleanup` if this VMM is killed

        state.record("socket", path=self.path, ino=self._ino)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        # Each connection starts on the fast path for GET /vm and is handed to aiohttp's
        # handler (the app above) as soon as anything else comes (fastpath.py).
        self._server = await asyncio.get_running_loop().create_unix_server(
            self.protocol_factory(), sock=self._sock)
        log.info("api_listening", socket=self.path)

    def protocol_factory(self):
        """Connections served as on the API socket (the tests serve TCP with it too);
        only after ``start()``."""
        assert self._runner is not None and self._runner.server is not None
        return protocol_factory(self.controller, self._runner.server, READ_SIZE,
                                self._fast_connections)

    async def close(self) -> None:
        """Stop serving and remove the socket (only if it is still ours)."""
        if self._server is not None:
            self._server.close()  # stops listening; open connections are closed below
            self._server = None
        for transport in list(self._fast_connections):
            transport.close()
        self._fast_connections.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ino is not None:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._ino = None


__all__ = ["ApiServer", "bind_socket", "check_socket_path", "NotFound", "MethodNotAllowed"]
