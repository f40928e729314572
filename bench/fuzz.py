"""Coverage-guided fuzzing (atheris / libFuzzer) of what guests and peers feed pymvm.

    bench/fuzz [-n N] [-k NAME ...] [--corpus DIR]

Each harness runs N inputs in its own process (libFuzzer ends the process when it is done
or on the first crash; a crash is counted and the harness goes on with the inputs left, up
to ``MAX_RESTARTS`` times). It prints ``fuzz_<harness>_inputs``, ``..._inputs_per_s`` and
``..._crashes`` as name=value lines, and keeps a corpus per harness (``--corpus``, default
results/fuzz/) so that a longer run starts where the last one stopped. Crash inputs are
kept in ``<corpus>/<harness>/crashes/``; each one found becomes a unit test
(tests/unit/test_hardening.py).

A crash is an exception no caller of that code expects (a bug that would cost the VMM its
guest or the back-end its front-ends), a file descriptor left open, or a vhost-user session
that ends through the last-resort handler ("internal error") instead of a protocol error.

Harnesses:

* ``vhost_user_decoder``: the sans-IO connections of all four roles (back-end and front-end
  of the main socket, both ends of the back-end channel) fed random bytes and fds in random
  pieces.
* ``backend_session``: the back-end's whole session (``_Session``) over a socketpair, fed
  message sequences (optionally after a valid handshake and memory table), its started rings
  walked as if kicked.
* ``frontend_session_client`` / ``frontend_session_server``: pymvm's vhost-user front-end
  (``VhostUserNetBackend``) connecting to, or accepting, a hostile back-end that answers the
  handshake with random bytes.
* ``virtqueue``: the split-ring walk (``pop_avail``, ``pop_writable``, ``add_used``, event
  index) over random ring memory.
* ``virtio_mmio``: the virtio-mmio register handler driven by random reads and writes.
* ``config``: the TOML config loader on random text (seeded with examples/).
* ``api``: the control API's request handling, where pymvm.api exists.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_RESTARTS = 10
HARNESSES = ("vhost_user_decoder", "backend_session", "frontend_session_client",
             "frontend_session_server", "virtqueue", "virtio_mmio", "config", "api")
#: Not run by default: a harness that crashes on purpose, to test the crash accounting.
SELFTEST = "selftest"


class FuzzCrash(AssertionError):
    """An invariant the harness checks was broken (not an exception of the code under test)."""


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------
# Harnesses: make_<name>() imports the (instrumented) code and returns the one-input function


def make_vhost_user_decoder():
    import atheris

    from pymvm.vhost.user import messages as m
    from pymvm.vhost.user.errors import VhostUserLocalError, VhostUserRemoteError
    from pymvm.vhost.user.protocol import (
        NEED_DATA,
        PEER_CLOSED,
        BackendConnection,
        BackendRequestReceiver,
        BackendRequestSender,
        FrontendConnection,
    )

    def close_message_fds(msg) -> None:
        for name in ("fd", "fds"):
            value = getattr(msg, name, None)
            for fd in (value if isinstance(value, tuple) else (value,)):
                if isinstance(fd, int):
                    os.close(fd)

    def connection(role: int, fdp):
        if role == 0:
            return BackendConnection()
        if role == 1:  # a front-end waiting for the replies to what it asked
            conn = FrontendConnection()
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                conn.send(m.GetFeatures())
            return conn
        if role == 2:
            return BackendRequestSender(reply_ack=fdp.ConsumeBool())
        return BackendRequestReceiver(reply_ack=fdp.ConsumeBool())

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        before = _fd_count()
        conn = connection(fdp.ConsumeIntInRange(0, 3), fdp)
        try:
            while fdp.remaining_bytes():
                chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
                fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fdp.ConsumeIntInRange(0, 2))] \
                    if chunk else []
                conn.receive_data(chunk, fds)
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is PEER_CLOSED:
                        break
                    close_message_fds(event)
                if not chunk:
                    break
        except VhostUserRemoteError:
            pass  # the peer broke the protocol: the connection refuses it, as it should
        except VhostUserLocalError as e:
            raise FuzzCrash(f"local error from peer input: {e}") from e
        finally:
            conn.close()
        if _fd_count() != before:
            raise FuzzCrash(f"fd leak: {before} -> {_fd_count()}")

    return one_input


def make_backend_session():
    import array
    import asyncio
    import fcntl
    import mmap
    import socket

    import atheris

    from pymvm.vhost.user import backend as b
    from pymvm.vhost.user import messages as m
    from pymvm.vhost.user.messages import FrontendRequest as FR
    from pymvm.vhost.user.messages import ProtocolFeature as PF
    from tests.unit.test_vhost_user_backend import RecordingDevice

    loop = asyncio.new_event_loop()  # never run: the harness calls the readable callback
    mem_size = 0x10000
    uva = 0x7F0000000000
    requests = [r.value for r in FR]

    def memfd(fill: bytes) -> int:
        fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, mem_size)
        with mmap.mmap(fd, mem_size) as mp:
            mp[: len(fill)] = fill
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    def handshake(fill: bytes) -> list[tuple[bytes, list[int]]]:
        msgs: list[m.Request] = [
            m.GetFeatures(), m.SetFeatures(1 << 32 | m.PROTOCOL_FEATURES_FLAG),
            m.GetProtocolFeatures(), m.SetProtocolFeatures(int(PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS)),
            m.SetOwner(), m.SetMemTable((m.MemoryRegion(0, mem_size, uva, 0),), (memfd(fill),)),
        ]
        out = []
        for msg in msgs:
            data, fds = msg.encode()
            out.append((data, fds))
        return out

    def random_message(fdp) -> tuple[bytes, list[int]]:
        kind = fdp.ConsumeIntInRange(0, 9)
        if kind == 0:  # raw bytes
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), []
        request = fdp.PickValueInList(requests) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 60)
        flags = fdp.PickValueInList([1, 1, 1 | 8, 5, 0, fdp.ConsumeInt(4) & 0xFFFFFFFF])
        if fdp.ConsumeBool():  # a vring-ish payload: small index, address inside memory
            payload = (fdp.ConsumeIntInRange(0, 3) | fdp.PickValueInList([0, 0x100, 0])).to_bytes(8, "little")
            payload += b"".join((uva + fdp.ConsumeIntInRange(0, mem_size)).to_bytes(8, "little")
                                for _ in range(fdp.ConsumeIntInRange(0, 4)))
        else:
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
        size = len(payload) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 300)
        header = m.HEADER.pack(request, flags, size)
        fds: list[int] = []
        attach = fdp.ConsumeIntInRange(0, 6)
        if attach in (1, 2):
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        elif attach == 3:
            fds.append(memfd(b""))
        elif attach == 4:
            fds.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        return header + payload, fds

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        before = _fd_count()
        front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        front.setblocking(False)
        device = RecordingDevice()
        session = b._Session(back, device, loop)
        reasons: list[str] = []
        close = session.close
        session.close = lambda reason: (reasons.append(reason), close(reason))  # type: ignore
        msgs: list[tuple[bytes, list[int]]] = []
        try:
            msgs = handshake(fdp.ConsumeBytes(4096)) if fdp.ConsumeBool() else []
            for _ in range(fdp.ConsumeIntInRange(1, 12)):
                msgs.append(random_message(fdp))
            while msgs:
                payload, fds = msgs.pop(0)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                try:
                    front.sendmsg([payload], anc)
                except OSError:
                    pass  # the session hung up already
                for fd in fds:
                    os.close(fd)
                session._on_readable()
                with_drain(front)
                for vring in session.vrings:  # as if the driver kicked every live ring
                    if vring.queue is not None:
                        vring.session._on_kick(vring) if vring.kick_fd is not None else None
                        if vring.queue is not None:
                            device.queue_kicked(vring)
                if session.closed.done():
                    break
            if fdp.ConsumeBool():
                front.shutdown(socket.SHUT_WR)
                session._on_readable()
        finally:
            for _, fds in msgs:  # not sent: the session ended first
                for fd in fds:
                    os.close(fd)
            session.close("harness done")
            front.close()
        bad = [r for r in reasons if r.startswith("internal error")]
        if bad:
            raise FuzzCrash(f"session ended through the last-resort handler: {bad[0]}")
        if _fd_count() != before:
            raise FuzzCrash(f"fd leak: {before} -> {_fd_count()}")

    def with_drain(sock) -> None:
        try:
            while sock.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass

    return one_input


def _make_frontend_session(mode: str):
    import socket
    import tempfile
    import threading

    import atheris

    from pymvm.vhost.user import messages as m
    from pymvm.vhost.user.errors import VhostUserError
    from pymvm.vhost.user.frontend import VhostUserNetBackend

    tmp = tempfile.mkdtemp(prefix="pymvm-fuzz-fe-")
    path = os.path.join(tmp, "vu.sock")
    good = [m.FeaturesReply(features=(1 << 32) | m.PROTOCOL_FEATURES_FLAG | 0x3FF),
            m.ProtocolFeaturesReply(features=0x3), m.Ack(request=m.FrontendRequest.SET_OWNER, status=0)]

    def hostile_backend(sock: socket.socket, replies: bytes) -> None:
        try:
            sock.settimeout(1)
            sock.sendall(replies)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            sock.close()

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        replies = b""
        for reply in good[: fdp.ConsumeIntInRange(0, len(good))]:  # a valid start, sometimes
            replies += reply.encode()[0]
        replies += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024))
        before, threads = _fd_count(), threading.active_count()
        peer: threading.Thread | None = None
        listener = None
        if mode == "client":  # pymvm connects to the back-end
            with __import__("contextlib").suppress(FileNotFoundError):
                os.unlink(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)

            def accept() -> None:
                listener.settimeout(2)
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                hostile_backend(conn, replies)

            peer = threading.Thread(target=accept)
        else:  # pymvm listens; the back-end connects

            def dial() -> None:
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        s.connect(path)
                    except OSError:
                        s.close()
                        time.sleep(0.001)
                        continue
                    hostile_backend(s, replies)
                    return

            peer = threading.Thread(target=dial)
        peer.start()
        frontend = None
        try:
            frontend = VhostUserNetBackend(path, mode, connect_timeout=2, request_timeout=0.5)
        except VhostUserError:
            pass  # refused the hostile back-end with a clear error: what we want
        finally:
            if frontend is not None:
                frontend.close()
            peer.join()
            if listener is not None:
                listener.close()
        deadline = time.monotonic() + 2
        while (_fd_count() != before or threading.active_count() != threads) and time.monotonic() < deadline:
            time.sleep(0.001)  # the front-end's supervisor thread ends on close
        if _fd_count() != before:
            raise FuzzCrash(f"fd leak: {before} -> {_fd_count()}")
        if threading.active_count() != threads:
            raise FuzzCrash(f"thread leak: {threads} -> {threading.active_count()}")

    return one_input


def make_frontend_session_client():
    return _make_frontend_session("client")


def make_frontend_session_server():
    return _make_frontend_session("server")


def make_virtqueue():
    import atheris

    from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue, VirtQueueError

    base, size = 0x1000, 0x8000

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        ram = bytearray(size)
        fill = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, size))
        ram[: len(fill)] = fill
        second = bytearray(0x1000)
        memory = GuestMemoryMap([(base, memoryview(ram)), (0x100000, memoryview(second))])
        qsize = fdp.PickValueInList([1, 2, 4, 8, 16, 256, fdp.ConsumeIntInRange(0, 70000)])
        addrs = [base + fdp.ConsumeIntInRange(0, size) if fdp.ConsumeIntInRange(0, 7)
                 else fdp.ConsumeIntInRange(0, 1 << 40) for _ in range(3)]
        try:
            queue = VirtQueue(memory, qsize, *addrs, event_idx=fdp.ConsumeBool(),
                              indirect=fdp.ConsumeBool(), next_avail=fdp.ConsumeIntInRange(0, 0xFFFF))
        except VirtQueueError:
            memory.release()
            return
        total = 0
        try:
            for _ in range(fdp.ConsumeIntInRange(1, 40)):
                op = fdp.ConsumeIntInRange(0, 5)
                if op == 0:
                    chain = queue.pop_avail()
                    if chain is not None:
                        for view in (*chain.readable, *chain.writable):
                            total += len(view)
                        queue.add_used(chain.head, fdp.ConsumeIntInRange(0, 1 << 32))
                elif op == 1:
                    views: list = []
                    used: list[int] = []
                    nsegs: list[int] = []
                    got = queue.pop_writable(views, used, nsegs, fdp.ConsumeIntInRange(0, 1 << 17),
                                             fdp.ConsumeIntInRange(0, 2000))
                    if got != sum(len(v) for v in views):
                        raise FuzzCrash(f"pop_writable said {got} bytes, its views hold "
                                        f"{sum(len(v) for v in views)}")
                    if used:
                        queue.add_used_batch(used)
                elif op == 2:
                    queue.needs_notification()
                elif op == 3:
                    queue.enable_notification()
                elif op == 4:
                    queue.disable_notification()
                else:  # the driver publishes more
                    off = fdp.ConsumeIntInRange(0, size - 2)
                    ram[off:off + 2] = fdp.ConsumeBytes(2).ljust(2, b"\0")
        finally:
            queue.release()
            memory.release()

    return one_input


def make_virtio_mmio():
    import atheris

    from pymvm.devices.virtio.mmio import VirtioMmioTransport
    from pymvm.devices.virtio.device import VirtioError
    from tests.unit.test_virtio_mmio import FakeDevice, FakeEventfds, FakeInterrupt

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        before = _fd_count()
        eventfds = FakeEventfds()
        transport = VirtioMmioTransport(FakeDevice(), irq=5, interrupt=FakeInterrupt(),
                                        eventfds=eventfds, mmio_base=0xD000_1000,
                                        mem_regions=("ram0",))
        try:
            for _ in range(fdp.ConsumeIntInRange(1, 64)):
                offset = fdp.ConsumeIntInRange(0, 0x1FF) & ~3 if fdp.ConsumeIntInRange(0, 7) \
                    else fdp.ConsumeIntInRange(0, 0x1000)
                length = 4 if fdp.ConsumeIntInRange(0, 7) else fdp.PickValueInList([1, 2, 8])
                if fdp.ConsumeBool():
                    buf = bytearray(length)
                    transport.read(offset, buf)
                    if len(buf) != length:
                        raise FuzzCrash(f"read at {offset:#x} changed the access size")
                else:
                    transport.write(offset, fdp.ConsumeBytes(length).ljust(length, b"\0"))
        except VirtioError:
            pass  # the device refused to activate: reported, the guest sees NEEDS_RESET
        finally:
            eventfds.deactivate(transport)
        if _fd_count() != before:
            raise FuzzCrash(f"fd leak: {before} -> {_fd_count()}")

    return one_input


def make_config():
    import tempfile

    import atheris

    from pymvm.config import ConfigError, load_config

    tmp = Path(tempfile.mkdtemp(prefix="pymvm-fuzz-config-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    kernel = tmp / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    path = tmp / "vm.toml"

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load_config(path, resolve_artifact=lambda name: kernel, available_memory_mib=lambda h: 4096)
        except ConfigError:
            pass

    return one_input


def make_selftest():
    def one_input(data: bytes) -> None:
        if data[:1] == b"C":
            raise FuzzCrash("selftest: inputs starting with C crash")

    return one_input


def make_api():
    try:
        import pymvm.api  # noqa: F401
    except ImportError:
        return None  # the control API is not in this tree
    import asyncio
    import warnings

    import aiohttp
    import atheris
    import yarl
    from aiohttp.test_utils import TestServer

    from pymvm.api.server import ApiServer
    from tests.unit.test_api import Vm

    warnings.simplefilter("ignore")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = ApiServer(Vm().controller, "/nonexistent/unused.sock")
    # A plain client session: aiohttp's TestClient keeps every response it returned until it
    # closes, which grew the harness by ~4 KiB per request (the server itself does not grow).
    test_server = TestServer(server.app())
    loop.run_until_complete(test_server.start_server())

    async def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(base_url=test_server.make_url("/"))

    client = loop.run_until_complete(session())
    methods = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS"]
    paths = ["/vm", "/vm/state", "/vm/actions", "/vm/devices", "/vm/net/net0", "/vm/net/",
             "/metrics", "/openapi.json", "/"]
    bodies = [b'{"state": "paused"}', b'{"state": "running"}', b'{"action": "stop"}',
              b'{"action": "shutdown"}', b'{"link": "down"}', b'{"link": "up"}']

    async def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        server.controller = Vm().controller  # a fresh VM: a stop must not end the fuzzing
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            method = fdp.PickValueInList(methods)
            path = fdp.PickValueInList(paths)
            if fdp.ConsumeIntInRange(0, 3) == 0:
                path += fdp.ConsumeUnicodeNoSurrogates(16).replace("?", "%3F").replace("#", "")
            body = fdp.PickValueInList(bodies) if fdp.ConsumeBool() else fdp.ConsumeBytes(
                fdp.ConsumeIntInRange(0, 300))
            try:
                if yarl.URL(path).absolute:
                    continue  # "//host..." once the client has read it: it would go elsewhere
                resp = await client.request(method, path, data=body)
            except ValueError:
                continue  # a path aiohttp's client will not send
            async with resp:
                await resp.read()
            if resp.status >= 500:
                raise FuzzCrash(f"{method} {path!r} with {body[:80]!r}: status {resp.status}")

    def one_input(data: bytes) -> None:
        loop.run_until_complete(one(data))

    return one_input


# ---------------------------------------------------------------------------------------------
# Driver


def child(name: str, runs: int, corpus: Path, crashes: Path, seeds: list[Path]) -> None:
    import atheris

    with atheris.instrument_imports(include=["pymvm"]):
        one_input = globals()[f"make_{name}"]()
    if one_input is None:
        print(f"{name}: skipped (not available in this tree)", file=sys.stderr)
        sys.exit(0)
    import logging

    import structlog

    # Logs cost time and say nothing here: the harness checks outcomes, not log lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        logger_factory=structlog.ReturnLoggerFactory(), processors=[])
    args = [sys.argv[0], f"-runs={runs}", f"-artifact_prefix={crashes}/", "-print_final_stats=1",
            "-max_len=8192", "-rss_limit_mb=4096", "-timeout=30", str(corpus), *map(str, seeds)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def seeds_for(name: str) -> list[Path]:
    """Inputs every run of ``name`` starts with: the examples for the config harness, and the
    inputs that once crashed a harness (bench/fuzz_seeds/NAME/), kept as regressions."""
    seeds = [REPO / "examples"] if name == "config" else []
    kept = REPO / "bench" / "fuzz_seeds" / name
    return seeds + ([kept] if kept.is_dir() else [])


def run_harness(name: str, runs: int, corpus_root: Path) -> dict[str, float]:
    corpus = corpus_root / name / "corpus"
    crashes = corpus_root / name / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    done, found, elapsed = 0, 0, 0.0
    for _ in range(MAX_RESTARTS + 1):
        left = runs - done
        if left <= 0:
            break
        started = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "-n", str(left),
                               "--corpus", str(corpus_root)], capture_output=True, text=True)
        elapsed += time.monotonic() - started
        out = proc.stderr
        if "skipped (not available" in out:
            return {"skipped": 1}
        units = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
        ran = int(units[-1]) if units else 0
        if proc.returncode == 0:
            done += ran if ran else left
            break
        if "Test unit written to" not in out:  # the harness itself failed, not the code under test
            raise SystemExit(f"bench/fuzz: error: harness {name} failed to run:\n{out[-3000:]}")
        found += 1
        done += max(ran, 1)
        tail = "\n".join(out.splitlines()[-25:])
        print(f"# {name}: crash after {ran} inputs; input kept in {crashes}\n{tail}", file=sys.stderr)
    return {"inputs": done, "inputs_per_s": round(done / elapsed, 1) if elapsed else 0.0,
            "crashes": found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/fuzz", description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10000, help="inputs per harness (default 10000)")
    p.add_argument("-k", action="append", choices=(*HARNESSES, SELFTEST),
                   help="run only these harnesses")
    p.add_argument("--corpus", type=Path, default=REPO / "results" / "fuzz",
                   help="corpus and crash directory (default results/fuzz)")
    p.add_argument("--child", choices=(*HARNESSES, SELFTEST), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.n, args.corpus / args.child / "corpus",
              args.corpus / args.child / "crashes", seeds_for(args.child))
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("bench/fuzz: error: atheris is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    total_crashes = 0
    print(f"# bench/fuzz -n {args.n}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs")
    for name in args.k or HARNESSES:
        result = run_harness(name, args.n, args.corpus)
        if "skipped" in result:
            print(f"# {name}: skipped (pymvm.api is not in this tree)")
            continue
        for key, value in result.items():
            print(f"fuzz_{name}_{key}={value}", flush=True)
        total_crashes += int(result["crashes"])
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
