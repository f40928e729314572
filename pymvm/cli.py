"""`pymvm ...`: run and validate VMs, build the guest kernel and the test initramfs.

User errors (bad config, unloadable kernel, missing host support) print one line on
stderr, `pymvm: error: ...`, and exit with status 2; no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import structlog

from . import logging as pymvm_logging

if TYPE_CHECKING:
    import argparse

EXIT_USAGE = 2


def _resolve_artifact(name: str) -> Path:
    """Resolve the `@name` shorthand of a config's kernel/initrd to a built artifact."""
    from .config import ConfigError
    from .images.artifacts import fresh_artifact

    # Recorded by the last build with its inputs' sizes and times: no builder import, no hashing.
    if name in ("microvm-kernel", "test-initramfs") and (recorded := fresh_artifact(name)):
        return recorded
    if name == "microvm-kernel":
        from .images.kernel import kernel_status

        images = kernel_status()
        if images is None:
            raise ConfigError("the microVM kernel is not built yet: run 'pymvm build-kernel'")
        return images.vmlinux
    if name == "test-initramfs":
        from .images.initramfs import initramfs_status

        path = initramfs_status()
        if path is None:
            raise ConfigError("the test initramfs is not built yet: run 'pymvm build-initramfs'")
        return path
    raise ConfigError(f"unknown artifact @{name}: use @microvm-kernel or @test-initramfs")


def _load(path: str):
    from .config import load_config

    return load_config(Path(path), resolve_artifact=_resolve_artifact)


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: ok (vm {config.id}: {config.machine.vcpus} vCPUs, "
          f"{config.machine.memory_mib} MiB, kernel {config.boot.kernel})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from .hostcheck import can_boot_linux_here
    from .vmm import StopSignal, _raise_stop_signal, run_vm

    # From here on SIGINT/SIGTERM unwind through the cleanup paths (status 128+N). main() may
    # run in-process (tests): the handlers before it come back however this returns, or every
    # later SIGTERM to that process (a forked helper's included) would raise StopSignal.
    previous = {s: signal.signal(s, _raise_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, StopSignal, run_vm, can_boot_linux_here)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace, StopSignal, run_vm, can_boot_linux_here) -> int:  # noqa: N803
    try:
        config = _load(args.config)
        if args.api_sock is not None:  # the command line wins over [api] socket
            from .config import ApiConfig

            config = config.replace(api=ApiConfig(Path(args.api_sock).absolute()))
        structlog.contextvars.bind_contextvars(vm_id=config.id)
        ok, why = can_boot_linux_here()
        if not ok:
            structlog.get_logger().warning(
                "host_cannot_boot_linux", reason=why,
                hint="run it in the nested KVM host: python -m pymvm.nested -- pymvm run " + args.config)
    except StopSignal as stop:
        return 128 + stop.signum
    from . import sandbox, state

    if not args.no_seccomp:  # a missing binding is a one-line error before anything is built
        from . import syscalls

        syscalls.prepare(backend=False)
    saved = (sandbox.settings.backend_user, sandbox.settings.seccomp)
    sandbox.settings.backend_user = args.backend_user or None
    sandbox.settings.seccomp = not args.no_seccomp
    try:
        # Host resources are recorded as they are made; a killed VMM's are undone by the next run.
        with state.vm_state(config.id):
            return run_vm(config)
    finally:  # main() may be called in-process (tests): leave the process as it was
        sandbox.settings.backend_user, sandbox.settings.seccomp = saved


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Undo the host resources of VMMs that died without cleaning up (kill -9, OOM)."""
    from .state import cleanup_stale, state_root

    done = cleanup_stale()
    for name, undone in done.items():
        print(f"{name}: removed {', '.join(undone) if undone else 'nothing (already gone)'}")
    if not done:
        print(f"nothing to clean up in {state_root()}")
    return 0


# ---- control API clients: `pymvm status|pause|resume|shutdown|stop SOCK`, `pymvm net ...` ----
EXIT_API_ERROR = 1


def _api_call(args: argparse.Namespace, method: str, path: str, body: object,
              describe) -> int:
    import json

    from .api.client import ApiClientError, ApiUnreachable, request

    try:
        answer = request(args.sock, method, path, body)
    except ApiUnreachable as e:
        print(f"pymvm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiClientError as e:
        print(f"pymvm: error: {e.message} (HTTP {e.status})", file=sys.stderr)
        return EXIT_API_ERROR
    print(json.dumps(answer, indent=2) if args.json else describe(answer))
    return 0


def cmd_api_status(args: argparse.Namespace) -> int:
    from .api.client import describe_vm

    return _api_call(args, "GET", "/vm", None, describe_vm)


def cmd_api_state(args: argparse.Namespace) -> int:
    from .api.client import describe_vm

    state = "paused" if args.command == "pause" else "running"
    return _api_call(args, "PUT", "/vm/state", {"state": state}, describe_vm)


def cmd_api_action(args: argparse.Namespace) -> int:
    def describe(answer: dict) -> str:
        if answer["action"] == "shutdown":
            return "shutdown requested: Ctrl-Alt-Del sent to the guest"
        return f"stopping: pymvm run exits with status {answer['exit_status']}"

    return _api_call(args, "PUT", "/vm/actions", {"action": args.command}, describe)


def cmd_api_net(args: argparse.Namespace) -> int:
    import os
    from urllib.parse import quote

    from .api.client import describe_net

    path = f"/vm/net/{quote(args.id, safe='')}"
    if args.backend is not None:
        if args.link is not None:
            print("pymvm: error: give --link or --backend, not both", file=sys.stderr)
            return EXIT_USAGE
        body: dict[str, str] = {"backend": args.backend}
        if args.socket is not None:
            body["socket"] = os.path.abspath(args.socket)
        if args.socket_mode is not None:
            body["socket_mode"] = args.socket_mode
        return _api_call(args, "PUT", f"{path}/backend", body, describe_net)
    if args.socket is not None or args.socket_mode is not None:
        print("pymvm: error: --socket and --socket-mode go with --backend vhost-user",
              file=sys.stderr)
        return EXIT_USAGE
    if args.link is None:
        return _api_call(args, "GET", path, None, describe_net)
    return _api_call(args, "PATCH", path, {"link": args.link}, describe_net)


def cmd_exec(args: argparse.Namespace) -> int:
    from .testing.exec import ExecError, exec_in_vm

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        return exec_in_vm(args.sock, command, timeout=args.timeout, port=args.port,
                          stdin=args.stdin)
    except ExecError as e:
        print(f"pymvm: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_build_kernel(args: argparse.Namespace) -> int:
    from .images.kernel import build_kernel

    if args.nested_host:
        if args.acpi:
            from .config import ConfigError

            raise ConfigError("--nested-host and --acpi are different kernels: give one of them")
        from .images.hostkernel import build_host_kernel

        host = build_host_kernel(jobs=args.jobs,
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(host.bzimage)
        return 0
    images = build_kernel(jobs=args.jobs, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                          acpi=args.acpi)
    print(images.vmlinux)
    print(images.bzimage)
    return 0


def cmd_build_initramfs(args: argparse.Namespace) -> int:
    from .images.initramfs import DEFAULT_MODULES, build_initramfs

    path = build_initramfs(out=Path(args.output) if args.output else None,
                           extra_binaries=args.with_binaries,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True),
                           modules=DEFAULT_MODULES if args.modules else (),
                           kernel_release=args.kernel_release)
    print(path)
    return 0


async def _serve_until_signal(server, confine=None) -> None:
    """Serve a vhost-user back-end until SIGINT/SIGTERM (or until serving fails).
    ``confine`` (a seccomp installer) runs once the loop and the socket are set up; a server
    only bound so far listens after it, when it can answer at once."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if confine is not None:
        confine()
    server.listen()
    serving = asyncio.create_task(server.serve_forever())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (serving, stopping):
        task.cancel()
    await asyncio.gather(serving, stopping, return_exceptions=True)
    if serving.done() and not serving.cancelled() and serving.exception() is not None:
        raise serving.exception()  # type: ignore[misc]


def cmd_build_rootfs(args: argparse.Namespace) -> int:
    from .images.rootfs import build_rootfs

    path = build_rootfs(Path(args.output), size_mib=args.size_mib,
                        extra_binaries=args.with_binaries,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(path)
    return 0


def cmd_vhost_user_net(args: argparse.Namespace) -> int:
    """Serve a TAP to one vhost-user front-end at a time until SIGINT/SIGTERM."""
    import asyncio
    import signal

    from .net.tap import Tap
    from .vhost.backends.net import NetBackend
    from .vhost.user.backend import VhostUserServer
    from .vhost.user.errors import VhostUserError

    from . import sandbox

    log = structlog.get_logger().bind(device="vhost-user-net", tap=args.tap, socket=args.socket)
    if args.parent_pid is not None:
        sandbox.exit_with_parent(args.parent_pid)

    if args.tap_fd is not None:
        # The VMM owns the TAP (and brought it up): serve the fd it passed us.
        import os

        try:
            os.fstat(args.tap_fd)
        except OSError as e:
            print(f"pymvm: error: --tap-fd {args.tap_fd} is not an open fd ({e.strerror}); "
                  "pass a TAP fd this process inherited", file=sys.stderr)
            return EXIT_USAGE
        tap_cm = Tap(args.tap_fd, args.tap or f"fd{args.tap_fd}")
    elif args.tap is None:
        print("pymvm: error: give --tap NAME or --tap-fd N", file=sys.stderr)
        return EXIT_USAGE
    else:
        tap_cm = Tap.open(args.tap)
    with tap_cm as tap:
        if args.tap_fd is None:  # pyroute2 only here: a VMM's back-end (--tap-fd) starts leaner
            from pyroute2 import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                with IPRoute() as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname=tap.name)[0], state="up")
            except (NetlinkError, IndexError) as e:
                print(f"pymvm: error: cannot bring TAP {tap.name} up: {e}", file=sys.stderr)
                return EXIT_USAGE
        backend = NetBackend(tap)
        server = VhostUserServer(args.socket, backend, client=args.client,
                                 allow_unsealed_memory=args.allow_unsealed_memory)
        # Bound while we may still write where the socket goes; listening only once set up
        # (privileges, the event loop, seccomp: seconds in a loaded emulated host), so that a
        # front-end is refused and retries until then rather than time out on its first
        # request (the VMM's GET_FEATURES did, after 5 s, in a nested e2e run).
        server.bind()
        if not args.no_seccomp:
            from . import syscalls

            syscalls.prepare()
        if args.user:  # set up: the rest needs only the TAP fd and the socket
            user_errors()  # imported now: the new user may not read the interpreter's files
            sandbox.drop_privileges(args.user, parent_pid=args.parent_pid)
        log.info("vhost_user_net.start", mode="client" if args.client else "server")
        confine = None
        if not args.no_seccomp:
            from . import syscalls

            def confine() -> None:
                syscalls.install_backend()
                syscalls.run_self_test_if_asked("backend")
        try:
            asyncio.run(_serve_until_signal(server, confine))
        except VhostUserError as e:
            print(f"pymvm: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            server.close()
            log.info("vhost_user_net.stop", **backend.stats)
    return 0


def cmd_vhost_user_blk(args: argparse.Namespace) -> int:
    """Serve a raw image to one vhost-user front-end at a time until SIGINT/SIGTERM."""
    import asyncio
    import os

    from . import sandbox
    from .images.disk import lock_fd, open_image
    from .vhost.backends.blk import BlkBackend
    from .vhost.user.backend import VhostUserServer
    from .vhost.user.errors import VhostUserError

    if args.parent_pid is not None:
        sandbox.exit_with_parent(args.parent_pid)
    if not 1 <= args.num_queues <= 64:
        print(f"pymvm: error: --num-queues {args.num_queues}: use 1..64", file=sys.stderr)
        return EXIT_USAGE
    if args.image_fd is not None:
        fd, path = args.image_fd, f"fd {args.image_fd}"
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            print(f"pymvm: error: --image-fd {fd}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
        lock_fd(fd, args.read_only, path)  # the VMM's lock: same file description, a no-op
    else:
        image = open_image(args.image, read_only=args.read_only)
        fd, path, size = image.fd, args.image, image.size
    log = structlog.get_logger().bind(device="vhost-user-blk", image=str(path), socket=args.socket)
    backend = BlkBackend(fd, size, read_only=args.read_only, serial=args.serial,
                         num_queues=args.num_queues, workers=args.workers)
    server = VhostUserServer(args.socket, backend, client=args.client,
                             allow_unsealed_memory=args.allow_unsealed_memory)
    try:
        # Bound while we may still write where the socket goes; listening only once set up
        # (threads, privileges, seccomp: seconds in an emulated host), so that a front-end
        # is refused and retries until then rather than time out on its first request.
        server.bind()
        confine = None
        if not args.no_seccomp:
            from . import syscalls

            syscalls.prepare()
            backend.start_workers()  # the I/O threads exist before the filter

            def confine() -> None:
                syscalls.install_blk_backend()
                syscalls.run_self_test_if_asked("backend")
        if args.user:
            user_errors()  # imported now: the new user may not read the interpreter's files
            sandbox.drop_privileges(args.user, parent_pid=args.parent_pid)
        log.info("vhost_user_blk.start", mode="client" if args.client else "server",
                 sectors=backend.capacity, read_only=args.read_only)
        asyncio.run(_serve_until_signal(server, confine))
    except VhostUserError as e:
        print(f"pymvm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        server.close()
        backend.close()
        log.info("vhost_user_blk.stop", **backend.stats)
    return 0


LOG_LEVELS = ("debug", "info", "warning", "error")


class _SkippedParser:
    """Stands in for the parser of a subcommand this run does not use: takes every call."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self


class _OnlySubparsers:
    """``add_parser`` builds the one subcommand ``only`` and skips the others (issue 15:
    argparse and its gettext look-ups cost `pymvm run` about 6 ms of CPU for all 18)."""

    def __init__(self, action, only: str) -> None:
        self._action, self._only, self.built = action, only, False

    def add_parser(self, name: str, **kwargs):
        if name != self._only:
            return _SkippedParser()
        self.built = True
        return self._action.add_parser(name, **kwargs)


def command_named(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names when the options before it are all plain --log-level
    ones (then its parser alone is built); None when the whole parser is needed."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--log-level" and i + 1 < len(argv) and argv[i + 1] in LOG_LEVELS:
            i += 2
        elif argv[i].partition("=")[::2] in (("--log-level", lv) for lv in LOG_LEVELS):
            i += 1
        else:
            return None
    return argv[i] if i < len(argv) else None


def run_args(argv: list[str]) -> SimpleNamespace | None:
    """``pymvm [--log-level LEVEL] run [--no-seccomp] [--backend-user USER] [--api-sock PATH]
    CONFIG`` read as the whole parser reads it, without argparse (issue 15: importing it, with
    gettext and locale, and building the run parser took about 4 ms of `pymvm run`'s start-up);
    None for anything else (help, abbreviated or repeated options, ``--``, a value that starts
    with "-", a missing or second CONFIG), which argparse parses or refuses as before."""
    i, log_level = 0, "info"
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--log-level" and i + 1 < len(argv) and argv[i + 1] in LOG_LEVELS:
            log_level, i = argv[i + 1], i + 2
        elif argv[i].startswith("--log-level=") and argv[i][len("--log-level="):] in LOG_LEVELS:
            log_level, i = argv[i][len("--log-level="):], i + 1
        else:
            return None
    if argv[i:i + 1] != ["run"]:
        return None
    values: dict[str, object] = {"no_seccomp": False, "backend_user": "nobody", "api_sock": None}
    options = {"--backend-user": "backend_user", "--api-sock": "api_sock"}
    config: str | None = None
    seen: set[str] = set()
    rest = iter(argv[i + 1:])
    for arg in rest:
        if not arg.startswith("-"):
            if config is not None:
                return None
            config = arg
            continue
        name, eq, value = arg.partition("=")
        dest = "no_seccomp" if arg == "--no-seccomp" else options.get(name)
        if dest is None or dest in seen:
            return None
        seen.add(dest)
        if dest == "no_seccomp":
            values[dest] = True
            continue
        if not eq:
            value = next(rest, "-")
            if value.startswith("-"):
                return None
        values[dest] = value
    if config is None:
        return None
    return SimpleNamespace(log_level=log_level, command="run", config=config, func=cmd_run,
                           **values)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, that subcommand's parser alone (the others, and the
    help that lists them, are not built: see :func:`command_named`)."""
    import argparse

    p = argparse.ArgumentParser(prog="pymvm", description="A KVM microVM monitor with vhost data planes.")
    p.add_argument("--log-level", default="info", choices=list(LOG_LEVELS))
    sub = p.add_subparsers(dest="command", required=True)
    if only is not None:
        sub = p.only = _OnlySubparsers(sub, only)  # type: ignore[attr-defined]
        # Its own errors (unrecognized arguments) show the usage listing every subcommand.
        p.error = lambda message: build_parser().error(message)  # type: ignore[method-assign]

    run = sub.add_parser("run", help="boot a VM from a TOML file, in the foreground")
    run.add_argument("config")
    run.add_argument("--no-seccomp", action="store_true",
                     help="run the VMM and its built-in back-ends without their seccomp "
                          "allowlists (docs/seccomp.md)")
    run.add_argument("--backend-user", default="nobody", metavar="USER",
                     help="user the built-in vhost-user back-ends run as once set up "
                          "(default nobody; '' keeps them root)")
    run.add_argument("--api-sock", metavar="PATH", default=None,
                     help="serve the control API on this UNIX socket (overrides [api] socket)")
    run.set_defaults(func=cmd_run)

    for name, func, what in (
            ("status", cmd_api_status, "show a running VM's state (GET /vm)"),
            ("pause", cmd_api_state, "pause a running VM's vCPUs"),
            ("resume", cmd_api_state, "resume a paused VM"),
            ("shutdown", cmd_api_action, "ask the guest to shut down (Ctrl-Alt-Del)"),
            ("stop", cmd_api_action, "end a VM at once (pymvm run exits with status 3)")):
        client = sub.add_parser(name, help=what)
        client.add_argument("sock", metavar="SOCK", help="the VM's API socket (--api-sock)")
        client.add_argument("--json", action="store_true", help="print the API's JSON answer")
        client.set_defaults(func=func)
    net = sub.add_parser("net", help="show a VM's NIC, or set its link up or down")
    net.add_argument("sock", metavar="SOCK", help="the VM's API socket (--api-sock)")
    net.add_argument("id", metavar="ID", help="the NIC's id ([[net]] id)")
    net.add_argument("--link", choices=["up", "down"], default=None)
    net.add_argument("--backend", choices=["vhost-net", "builtin", "vhost-user"], default=None,
                     help="move the NIC's data plane to this back-end while the guest runs "
                          "(builtin: a fresh pymvm back-end process)")
    net.add_argument("--socket", metavar="PATH", help="the vhost-user back-end's socket")
    net.add_argument("--socket-mode", choices=["client", "server"], default=None,
                     help="client (default): connect to it; server: listen there for it")
    net.add_argument("--json", action="store_true", help="print the API's JSON answer")
    net.set_defaults(func=cmd_api_net)

    ex = sub.add_parser("exec", help="run a command in a running VM through its guest agent "
                                      "(vsock); exits with the command's status")
    ex.add_argument("sock", metavar="SOCK", help="the VM's API socket (--api-sock)")
    ex.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="kill the command (its process group) after this long; exit 124")
    ex.add_argument("--port", type=int, default=None, help="the agent's vsock port (default 1024)")
    ex.add_argument("-i", "--stdin", action="store_true", help="send this stdin to the command")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    ex.set_defaults(func=cmd_exec)

    cl = sub.add_parser("cleanup", help="remove TAPs, bridges, back-ends and sockets left by "
                                        "VMMs that were killed (state in $PYMVM_STATE_DIR or /run/pymvm)")
    cl.set_defaults(func=cmd_cleanup)

    val = sub.add_parser("validate", help="check a VM's TOML file without starting it")
    val.add_argument("config")
    val.set_defaults(func=cmd_validate)

    bk = sub.add_parser("build-kernel", help="build (or find cached) the microVM guest kernel")
    bk.add_argument("-j", "--jobs", type=int, default=None)
    bk.add_argument("--acpi", action="store_true",
                    help="the ACPI variant (devices and power-off through ACPI tables)")
    bk.add_argument("--nested-host", action="store_true",
                    help="instead, the nested KVM host's 6.12 kernel (an issue 8 experiment: "
                    "PYMVM_NESTED_KERNEL=6.12)")
    bk.set_defaults(func=cmd_build_kernel)

    bi = sub.add_parser("build-initramfs", help="build (or find cached) the test initramfs")
    bi.add_argument("-o", "--output")
    bi.add_argument("--with", dest="with_binaries", action="append", default=[],
                    metavar="BINARY", help="also include a host binary and its libraries (e.g. iperf3)")
    bi.add_argument("--modules", action="store_true",
                    help="add the virtio modules of an installed distribution kernel and their "
                         "dependencies (loaded by /init): for kernels such as Debian's")
    bi.add_argument("--kernel-release", metavar="RELEASE",
                    help="whose modules (/lib/modules/RELEASE); default: the newest "
                         "/boot/vmlinuz-* with modules installed")
    bi.set_defaults(func=cmd_build_initramfs)

    br = sub.add_parser("build-rootfs", help="build an ext4 root disk image with the test "
                                              "initramfs's tree and init ([[block]] root = true)")
    br.add_argument("-o", "--output", default="rootfs.ext4", help="image to write (replaced)")
    br.add_argument("--size-mib", type=int, default=256, help="image size in MiB (default 256)")
    br.add_argument("--with", dest="with_binaries", action="append", default=[],
                    metavar="BINARY", help="also include a host binary and its libraries (e.g. fio)")
    br.set_defaults(func=cmd_build_rootfs)

    vu = sub.add_parser("vhost-user", help="run a built-in vhost-user back-end")
    vu_sub = vu.add_subparsers(dest="backend", required=True)
    vun = vu_sub.add_parser("net", help="vhost-user net back-end forwarding to a TAP")
    vun.add_argument("--socket", required=True, metavar="PATH", help="vhost-user UNIX socket")
    vun.add_argument("--tap", metavar="NAME", help="TAP to create or attach to")
    vun.add_argument("--tap-fd", type=int, metavar="N",
                     help="serve the TAP behind inherited fd N (the VMM's) instead of opening "
                          "--tap by name; --tap then only names it in logs")
    vun.add_argument("--client", action="store_true",
                     help="connect to a front-end listening on --socket instead of listening")
    vun.add_argument("--no-seccomp", action="store_true",
                     help="serve without the back-end's seccomp allowlist (docs/seccomp.md)")
    vun.add_argument("--parent-pid", type=int, metavar="PID",
                     help="exit when process PID (the VMM that started us) dies")
    vun.add_argument("--user", metavar="USER",
                     help="once the TAP and socket are set up, run as USER with no capabilities")
    vun.add_argument("--allow-unsealed-memory", action="store_true",
                     help="accept guest memory fds the front-end could shrink (memfds without "
                          "F_SEAL_SHRINK, hugetlbfs files; DPDK's virtio-user): only for a "
                          "trusted front-end, a shrink kills the back-end (SIGBUS)")
    vun.set_defaults(func=cmd_vhost_user_net)
    vub = vu_sub.add_parser("blk", help="vhost-user-blk back-end serving a raw image")
    vub.add_argument("--socket", required=True, metavar="PATH", help="vhost-user UNIX socket")
    image = vub.add_mutually_exclusive_group(required=True)
    image.add_argument("--image", metavar="FILE", help="raw disk image (locked while served)")
    image.add_argument("--image-fd", type=int, metavar="FD",
                       help="an open (and locked) image inherited from the VMM")
    vub.add_argument("--read-only", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    vub.add_argument("--serial", default="", help="what GET_ID answers (at most 20 bytes)")
    vub.add_argument("--num-queues", type=int, default=1, help="request queues (1..64)")
    vub.add_argument("--workers", type=int, default=16, help="I/O threads (requests in flight)")
    vub.add_argument("--client", action="store_true",
                     help="connect to a front-end listening on --socket instead of listening")
    vub.add_argument("--parent-pid", type=int, metavar="PID",
                     help="exit when process PID (the VMM that started us) dies")
    vub.add_argument("--user", metavar="USER",
                     help="once the image and socket are open, run as USER with no capabilities")
    vub.add_argument("--no-seccomp", action="store_true",
                     help="serve without the blk back-end's seccomp allowlist (docs/seccomp.md)")
    vub.add_argument("--allow-unsealed-memory", action="store_true",
                     help="accept guest memory fds the front-end could shrink (see 'net')")
    vub.set_defaults(func=cmd_vhost_user_blk)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    from .boot.loader import BootError
    from .config import ConfigError
    from .kvm import KvmError
    from .memory import GuestMemoryError

    errors: list[type[BaseException]] = [ConfigError, BootError, GuestMemoryError, KvmError]
    for mod, name in (("pymvm.images.kernel", "KernelBuildError"),
                      ("pymvm.images.initramfs", "InitramfsError"),
                      ("pymvm.devices.bus", "BusError"),
                      ("pymvm.vmm", "VmmError"),
                      ("pymvm.devices.manager", "DeviceManagerError"),
                      ("pymvm.api.errors", "ApiSocketError"),
                      ("pymvm.vhost.errors", "VhostError"),
                      ("pymvm.net.errors", "NetError"),
                      ("pymvm.devices.virtio.device", "VirtioError"),
                      ("pymvm.nested", "NestedHostError"),
                      ("pymvm.images.disk", "DiskImageError"),
                      ("pymvm.vhost.user.errors", "VhostUserError"),
                      ("pymvm.sandbox", "SandboxError"),
                      ("pymvm.syscalls", "SeccompError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args: argparse.Namespace | SimpleNamespace | None = run_args(argv)
    if args is None:
        parser = build_parser(only=command_named(argv))
        if getattr(parser, "only", None) is not None and not parser.only.built:
            parser = build_parser()  # not a subcommand: the whole parser says so, as always
        args = parser.parse_args(argv)
    pymvm_logging.configure(args.log_level)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"pymvm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
