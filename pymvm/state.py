"""Per-VM state directory: what host resources a running VMM made, so a killed one's are undone.

A VMM that exits normally (or on SIGINT/SIGTERM) undoes its own TAPs, bridges, addresses,
namespaces, back-end processes and sockets. One killed with SIGKILL (or by the OOM killer)
cannot, so each resource is also recorded here as it is created, one JSON line appended per
resource (a single ``write`` on an ``O_APPEND`` file: a kill leaves whole lines only):

    ${PYMVM_STATE_DIR:-/run/pymvm}/<vm-id>.<pid>/owner.json      {"pid", "start_time", "vm_id"}
    ${PYMVM_STATE_DIR:-/run/pymvm}/<vm-id>.<pid>/resources.jsonl {"kind": "tap", "name": ...}

``pymvm run`` removes its directory when it has undone everything itself, and first cleans up
after any earlier VMM whose process is gone (:func:`cleanup_stale`); ``pymvm cleanup`` does
only the latter. Resources are undone newest first and each step tolerates the resource
being gone already. A bridge is only removed while it still carries pymvm's alias and no
other interface is attached to it (another VM may use it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

STATE_DIR_ENV = "PYMVM_STATE_DIR"
DEFAULT_STATE_DIR = "/run/pymvm"
RESOURCES = "resources.jsonl"
OWNER = "owner.json"

_current: VmState | None = None


def state_root() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or
    None if it does not exist: together with the pid it names one process, not a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def is_alive(pid: int, start_time: int | None) -> bool:
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


class VmState:
    """The state directory of one running VMM (this process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path / RESOURCES,
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    @classmethod
    def create(cls, vm_id: str, root: Path | None = None) -> VmState:
        root = root or state_root()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in vm_id)[:64]
        pid = os.getpid()
        path = root / f"{safe}.{pid}"
        partial = root / f".{safe}.{pid}.new"  # renamed once its owner file is complete
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.exists():  # a dead VMM's directory whose pid we now have
                cleanup_dir(path)
            _rmtree(partial)
            partial.mkdir(mode=0o700)
            (partial / OWNER).write_text(json.dumps(
                {"pid": pid, "start_time": process_start_time(pid), "vm_id": vm_id}))
            partial.rename(path)
        except OSError as e:
            from .vmm import VmmError

            raise VmmError(f"cannot create the VM state directory {path}: {e.strerror} "
                           f"(set {STATE_DIR_ENV} to a writable directory)") from None
        return cls(path)

    def record(self, kind: str, **fields: Any) -> None:
        if self._fd is None:
            return
        line = json.dumps({"kind": kind, **fields}, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as e:
            log.warning("state_record_failed", kind=kind, error=str(e))

    def remove(self) -> None:
        """Everything was undone by its owner: forget it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _rmtree(self.path)


def _rmtree(path: str | Path) -> None:
    """``shutil.rmtree(path, ignore_errors=True)``; shutil (which imports zlib, bz2 and lzma)
    is loaded only when there is something to remove, not by every VMM's start (issue 15)."""
    if os.path.lexists(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def current() -> VmState | None:
    return _current


def record(kind: str, **fields: Any) -> None:
    """Record a host resource this VMM just created (no-op outside ``pymvm run``)."""
    if _current is not None:
        _current.record(kind, **fields)


@contextlib.contextmanager
def vm_state(vm_id: str) -> Iterator[VmState]:
    """Clean up after dead VMMs, then keep this VMM's state directory while it runs."""
    global _current
    cleanup_stale()
    state = VmState.create(vm_id)
    _current = state
    try:
        yield state
    finally:
        _current = None
        state.remove()


# ---------------------------------------------------------------------------------------------
# Undoing a dead VMM's resources


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in (path / RESOURCES).read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def _undo_process(rec: dict[str, Any]) -> None:
    pid, start = int(rec["pid"]), rec.get("start_time")
    if not is_alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_alive(pid, start) and time.monotonic() < deadline:
        # A zombie still has /proc/PID/stat until its parent (init) reaps it.
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.02)


def _with_ipr(netns: str | None, func) -> None:
    from pyroute2 import IPRoute, netns as pyroute2_netns

    if netns and netns not in pyroute2_netns.listnetns():
        return
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        func(ipr)
    finally:
        ipr.close()


def _undo_link(rec: dict[str, Any]) -> None:
    def undo(ipr) -> None:
        found = ipr.link_lookup(ifname=rec["name"])
        if found:
            ipr.link("del", index=found[0])

    _with_ipr(rec.get("netns"), undo)


def _undo_bridge(rec: dict[str, Any]) -> None:
    from .net.host import BRIDGE_ALIAS

    def undo(ipr) -> None:
        found = ipr.link_lookup(ifname=rec["name"])
        if not found:
            return
        idx = found[0]
        links = ipr.get_links()
        alias = next((link.get_attr("IFLA_IFALIAS") for link in links if link["index"] == idx), None)
        ports = [link for link in links if link.get_attr("IFLA_MASTER") == idx]
        if alias == BRIDGE_ALIAS and not ports:
            ipr.link("del", index=idx)
        else:
            log.info("cleanup_bridge_kept", bridge=rec["name"], ports=len(ports))

    _with_ipr(rec.get("netns"), undo)


def _undo_address(rec: dict[str, Any]) -> None:
    from pyroute2 import NetlinkError

    def undo(ipr) -> None:
        found = ipr.link_lookup(ifname=rec["dev"])
        if found:
            with contextlib.suppress(NetlinkError):  # gone already
                ipr.addr("del", index=found[0], address=rec["address"], prefixlen=rec["prefixlen"])

    _with_ipr(rec.get("netns"), undo)


def _undo_netns(rec: dict[str, Any]) -> None:
    from pyroute2 import netns as pyroute2_netns

    if rec["name"] in pyroute2_netns.listnetns():
        pyroute2_netns.remove(rec["name"])


def _undo_path(rec: dict[str, Any]) -> None:
    path = rec["path"]
    if "ino" in rec:  # only the very file it made (another VMM may have bound the path since)
        try:
            if os.lstat(path).st_ino != rec["ino"]:
                return
        except FileNotFoundError:
            return
    if os.path.isdir(path) and not os.path.islink(path):
        _rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_UNDO = {
    "process": _undo_process,
    "tap": _undo_link,
    "bridge": _undo_bridge,
    "address": _undo_address,
    "netns": _undo_netns,
    "socket": _undo_path,
    "dir": _undo_path,
}
# Processes first (they hold TAP fds and sockets), TAPs before the bridges they are ports
# of, namespaces last; within a kind, newest first.
_ORDER = {"process": 0, "socket": 1, "dir": 1, "tap": 2, "address": 3, "bridge": 4, "netns": 5}


def cleanup_dir(path: Path) -> list[str]:
    """Undo every resource recorded in ``path`` (its owner must be dead) and remove it."""
    records = list(reversed(_read_records(path)))
    records.sort(key=lambda r: _ORDER.get(r.get("kind", ""), 9))  # stable: newest first
    undone = []
    for rec in records:
        undo = _UNDO.get(rec.get("kind", ""))
        if undo is None:
            continue
        what = f"{rec['kind']} {rec.get('name') or rec.get('path') or rec.get('pid') or rec.get('address')}"
        try:
            undo(rec)
            undone.append(what)
        except Exception as e:  # keep going: the rest still needs undoing
            log.warning("cleanup_step_failed", what=what, error=str(e))
    _rmtree(path)
    log.info("cleanup_done", state_dir=str(path), undone=undone)
    return undone


def cleanup_stale(root: Path | None = None) -> dict[str, list[str]]:
    """Clean up after every VMM under ``root`` whose process no longer runs."""
    root = root or state_root()
    done: dict[str, list[str]] = {}
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return done
    for path in entries:
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            owner = json.loads((path / OWNER).read_text())
        except (FileNotFoundError, ValueError):
            owner = None
        if owner is not None and is_alive(int(owner["pid"]), owner.get("start_time")):
            continue
        done[path.name] = cleanup_dir(path)
    return done
