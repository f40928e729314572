"""seccomp allowlists for the VMM and the built-in back-ends (libseccomp's Python binding).

Installed once set-up is done (:func:`install`), for every thread of the process at once
(SECCOMP_FILTER_FLAG_TSYNC), with no_new_privs. A syscall outside the list traps
(SECCOMP_RET_TRAP): a SIGSYS handler written in C (``_build.py``) logs one JSON line naming
the syscall (``seccomp_violation``) and the process dies by SIGSYS. The lists, and why each
entry is there, are in docs/seccomp.md; the reason of each entry is also kept next to it
below, so the two cannot drift far apart.

The binding is libseccomp's own (``import seccomp``). Debian packages it as python3-seccomp
for Debian's python3; when the interpreter running pymvm is another build of the same
Python version (pyenv, say), the same extension module is loaded from Debian's directory,
if its ABI tag matches this interpreter's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

import structlog

log = structlog.get_logger()


class SeccompError(Exception):
    """The filter could not be built or installed."""


# ---------------------------------------------------------------------------------------------
# Allowlists: syscall name -> why the process makes it after set-up

#: Everything a CPython process needs to keep running: memory, threads' locks, signals,
#: time, logging, exiting.
PYTHON_RUNTIME: dict[str, str] = {
    "brk": "CPython's allocator (malloc) grows the heap",
    "mmap": "malloc's large blocks; mapping guest memory regions sent by a peer",
    "munmap": "freeing large blocks; unmapping guest memory of a closed session",
    "mremap": "realloc of large blocks",
    "madvise": "malloc returns freed memory to the kernel",
    "futex": "the GIL, locks and condition variables",
    "rt_sigaction": "installing signal handlers (SIGINT/SIGTERM), and the SIGSYS reporter restoring the default",
    "rt_sigprocmask": "threads block signals meant for the main thread",
    "rt_sigreturn": "returning from any signal handler",
    "sigaltstack": "CPython's per-thread signal stack",
    "getpid": "asyncio and logging; the SIGSYS reporter names the process",
    "gettid": "the SIGSYS reporter names the thread",
    "tgkill": "the SIGSYS reporter kills its own thread; signalling vCPU threads out of KVM_RUN",
    "clock_gettime": "time.monotonic/time.time when the vDSO is not used",
    "clock_nanosleep": "time.sleep",
    "nanosleep": "time.sleep on older libcs",
    "gettimeofday": "timestamps on older libcs",
    "getrandom": "hash seeds and random module state",
    "sched_yield": "lock hand-off between threads",
    "restart_syscall": "a syscall interrupted by a signal resumes",
    "write": "log lines on stderr; eventfd signals (call/err/irqfd); serial output",
    "read": ("eventfd kicks; the main thread's wake-up pipe (asyncio's, or "
             "`VirtualMachine.wait`'s); terminal input"),
    "close": "closing fds of ended sessions, rings and sockets",
    "fcntl": "O_NONBLOCK on sockets; F_GET_SEALS/F_ADD_SEALS on guest memfds; F_DUPFD_CLOEXEC (mmap)",
    "fstat": "checking an fd's type and size",
    "newfstatat": "fstat through AT_EMPTY_PATH (glibc 2.33+)",
    "statx": "os.stat on newer libcs",
    "lseek": "file position of log and state files",
    "epoll_wait": "the asyncio event loop; `VirtualMachine.wait` without an API",
    "epoll_pwait": "the same (some libcs)",
    "epoll_ctl": "the event loop or the wait watching fds",
    "epoll_create1": "a new event loop, or the wait's epoll set (made after the first `KVM_RUN`)",
    "poll": "waiting on one socket with a timeout (front-end requests)",
    "ppoll": "the same on some libcs",
    "pselect6": "select() with a timeout",
    "exit": "a thread ends",
    "exit_group": "the process ends",
}

#: The built-in vhost-user back-end, once its TAP is open and its socket bound.
BACKEND: dict[str, str] = {
    **PYTHON_RUNTIME,
    "readv": "TAP -> guest receive buffers (RX, straight into guest memory)",
    "writev": "guest transmit buffers -> TAP (TX)",
    "recvmsg": "vhost-user messages and the fds they carry",
    "sendmsg": "vhost-user replies",
    "recvfrom": "asyncio's wake-up socketpair",
    "sendto": "asyncio's wake-up socketpair",
    "accept4": "the next front-end connects",
    "listen": "its socket, bound before the filter, is listened on once the back-end serves",
    "getsockname": "asyncio inspecting accepted sockets",
    "getpeername": "asyncio inspecting accepted sockets",
    "getsockopt": "asyncio's connect completion (--client mode)",
    "setsockopt": "asyncio socket options",
    "connect": "--client mode reconnects to the front-end's socket",
    "shutdown": "closing a session's socket",
    "unlink": "removing its socket file at shutdown",
    "ioctl": "TUNSETOFFLOAD/TUNSETVNETHDRSZ when the driver acks features; FIONBIO on sockets",
}

#: The built-in vhost-user-blk back-end, once its image is open, its socket bound and its I/O
#: threads started: the protocol part of the net back-end's list (no TAP), plus image I/O and
#: the inflight region.
BLK_BACKEND: dict[str, str] = {
    **{name: why for name, why in BACKEND.items() if name not in ("readv", "writev", "ioctl")},
    "ioctl": "FIONBIO on sockets; FIOCLEX; TCGETS (no TAP, no other request)",
    "preadv": "image -> guest buffers: reads in the I/O threads",
    "pwritev": "guest buffers -> image: writes in the I/O threads",
    "preadv2": "reads tried on the event loop with RWF_NOWAIT (page cache hits)",
    "pwritev2": "writes tried on the event loop with RWF_NOWAIT",
    "pwrite64": "WRITE_ZEROES on a file system without FALLOC_FL_ZERO_RANGE",
    "fdatasync": "VIRTIO_BLK_T_FLUSH",
    "listen": "its socket, bound before the filter, is listened on once the back-end serves",
    "fallocate": "DISCARD (punch a hole) and WRITE_ZEROES (zero a range)",
    "memfd_create": "the inflight region a front-end asks for (GET_INFLIGHT_FD)",
    "ftruncate": "sizing the inflight region",
}

#: The VMM: vCPU threads, the asyncio loop, the control API, vhost-net/vhost-user plumbing,
#: teardown, and what a live back-end swap needs (a spawned back-end inherits this filter).
VMM: dict[str, str] = {
    **BACKEND,
    # A built-in blk back-end the VMM restarts runs under this filter too (filters are
    # inherited): everything it does must be here as well.
    **{name: why for name, why in BLK_BACKEND.items() if name not in BACKEND},
    "flock": "a restarted blk back-end takes the image lock on the fd it inherits (a no-op: "
             "the VMM's file description holds it)",
    "ioctl": "KVM_RUN and the vCPU/VM ioctls; vhost-net's and vhost-vsock's VHOST_* (ring "
             "set-up, VHOST_VSOCK_SET_RUNNING) when the driver starts or resets a device; TAP "
             "offloads; FIONBIO",
    "eventfd2": "new kick/call eventfds when a device is (re)activated",
    "socket": "UNIX sockets to vhost-user back-ends and the control API; netlink (TAP/bridge teardown)",
    "socketpair": "a new event loop's wake-up pair",
    "bind": "netlink sockets; the control API's listening socket",
    "listen": "the control API's socket; vhost-user server mode",
    "openat": "opening /dev/vhost-net for a new or swapped device; files during teardown",
    "open": "the same on older ABIs",
    "getdents64": "removing the state and socket directories at exit",
    "unlinkat": "removing the state and socket directories at exit",
    "rmdir": "removing the state and socket directories at exit",
    "mkdir": "a socket directory for a swapped-in back-end",
    "mkdirat": "the same through mkdirat",
    "rename": "atomic state files",
    "renameat": "atomic state files",
    "renameat2": "atomic state files",
    "readlink": "resolving paths (spawning a back-end)",
    "access": "finding the back-end's executable",
    "faccessat": "the same through faccessat",
    "faccessat2": "the same through faccessat2",
    "getcwd": "path resolution",
    "chdir": "subprocess children (before exec)",
    "mprotect": "guard pages of new thread stacks",
    "clone": "new threads (executor, supervisor); spawning a back-end (subprocess)",
    "clone3": "new threads on newer libcs",
    "vfork": "subprocess spawning a back-end",
    "execve": "the spawned back-end's exec (it then installs its own, stricter filter)",
    "wait4": "reaping a back-end process",
    "waitid": "reaping a back-end process",
    "kill": "stopping a back-end process (SIGTERM, then SIGKILL)",
    "pipe2": "subprocess's error pipe",
    "dup": "subprocess stdio",
    "dup2": "subprocess stdio",
    "dup3": "subprocess stdio",
    "set_robust_list": "every new thread",
    "rseq": "every new thread (glibc 2.35+)",
    "prctl": "naming threads; a spawned back-end's parent-death signal",
    "sched_getaffinity": "os.cpu_count in thread pools",
    "getuid": "subprocess and pwd lookups",
    "geteuid": "subprocess and pwd lookups",
    "getgid": "subprocess and pwd lookups",
    "getegid": "subprocess and pwd lookups",
    "sysinfo": "memory checks",
    "uname": "platform checks in libraries",
    "pread64": "reading /proc files",
    "pwrite64": "writing files at an offset",
    "ftruncate": "state files",
    "fsync": "state files",
    "umask": "subprocess",
    "setsid": "subprocess (start_new_session)",
    "getppid": "subprocess",
    "close_range": "subprocess closing inherited fds",
    "setns": "`ip netns exec` of a back-end inside a network namespace",
    "unshare": "`ip netns exec` (a private mount namespace)",
    "mount": "`ip netns exec` mounts /sys for the namespace",
    "umount2": "`ip netns exec`",
    "seccomp": "a spawned back-end installs its own filter",
    "setresuid": "a spawned back-end drops privileges",
    "setresgid": "a spawned back-end drops privileges",
    "setgroups": "a spawned back-end drops privileges",
    "capget": "a spawned back-end checks its capabilities",
    "capset": "a spawned back-end drops its capabilities",
    "getrlimit": "subprocess",
    "prlimit64": "subprocess / resource limits",
    "arch_prctl": "a spawned process's TLS set-up",
    "set_tid_address": "a spawned process's start",
    "getxattr": "file capability checks at exec",
    "lgetxattr": "file capability checks at exec",
    "memfd_create": "CPython internals (ctypes) in a spawned process",
    "mincore": "allocators",
    "ioprio_get": "libraries",
    "sched_getparam": "threads",
    "sched_getscheduler": "threads",
    "getpgrp": "subprocess",
    "getsid": "subprocess",
    "fchmod": "socket file permissions",
    "fchown": "socket file ownership for an unprivileged back-end",
    "chmod": "socket file permissions",
    "getitimer": "libraries",
    "alarm": "libraries",
    "timerfd_create": "libraries' timers",
    "timerfd_settime": "libraries' timers",
    "sendmmsg": "batched sends",
    "recvmmsg": "batched receives",
}

# Linux's numbers for them (<linux/socket.h>; tests/unit/test_seccomp_lists.py compares them
# with the socket module's): importing socket (which makes enums of its constants) or even
# _socket (a shared library) costs `pymvm run` before its vCPUs start (issue 15).
AF_UNIX = 1
AF_NETLINK = 16

#: Socket families a filtered process may create (arg 0 of socket(2)).
SOCKET_FAMILIES = {"backend": (AF_UNIX,), "vmm": (AF_UNIX, AF_NETLINK)}


# ---------------------------------------------------------------------------------------------
# The binding


_DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def _load_binding() -> ModuleType:
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp
    except ImportError:
        pass
    suffixes = importlib.machinery.EXTENSION_SUFFIXES  # this interpreter's ABI tags
    # Debian's seccomp.*.so, found without glob (and fnmatch's regular expressions: issue 15).
    try:
        names = os.listdir(_DEBIAN_DIST_PACKAGES)
    except OSError:
        names = []
    for path in sorted(os.path.join(_DEBIAN_DIST_PACKAGES, name) for name in names
                       if name.startswith("seccomp.") and name.endswith(".so") and len(name) > 10):
        if not any(path.endswith(s) for s in suffixes if s != ".so"):
            continue
        spec = importlib.util.spec_from_file_location("seccomp", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["seccomp"] = module
        return module
    raise SeccompError(
        "libseccomp's Python binding is not installed for Python "
        f"{sys.version_info.major}.{sys.version_info.minor}: apt-get install python3-seccomp "
        "(or turn the filters off: --no-seccomp / seccomp = false)"
    )


def available() -> bool:
    try:
        _load_binding()
        return True
    except SeccompError:
        return False


def _name_syscalls(sc: ModuleType, lib) -> None:
    arch = sc.Arch()  # the native one (system_arch()'s value overflows resolve_syscall)
    for nr in range(lib.PYMVM_MAX_SYSCALL):
        try:
            name = sc.resolve_syscall(arch, nr)
        except (ValueError, RuntimeError, OverflowError):
            continue
        if isinstance(name, bytes):
            name = name.decode()
        if name and not name.startswith("UNKNOWN"):
            lib.pymvm_set_syscall_name(nr, name.encode())


def backend_ioctls() -> tuple[int, ...]:
    """The only ioctl requests the back-end makes after set-up."""
    import termios

    from pymvm.vhost._vhost_cffi import lib as tun

    return (tun.TUNSETOFFLOAD, tun.TUNSETVNETHDRSZ, tun.TUNGETVNETHDRSZ,
            termios.FIONBIO, termios.FIOCLEX, termios.TCGETS)


def prepare(*, backend: bool = True) -> None:
    """Load everything :func:`install` needs now: a process that drops privileges first may
    no longer be able to read the interpreter's library directory afterwards. The VMM's
    filter (``backend=False``) narrows no ioctl, so it needs none of the back-ends' ioctl
    numbers (termios, the TUN ones)."""
    if backend:
        import termios  # noqa: F401

        from pymvm.vhost import _vhost_cffi  # noqa: F401

    if os.environ.get("PYMVM_SECCOMP_SELF_TEST"):
        import ctypes  # noqa: F401  (the self-test's syscall; not loaded otherwise: issue 15)

    from . import _sigsys_cffi  # noqa: F401

    _load_binding()


def install(process: str, allow: dict[str, str], *, socket_families: tuple[int, ...] = (),
            ioctl_requests: tuple[int, ...] = (), log_fd: int = 2) -> int:
    """Install the allowlist ``allow`` on every thread of this process; returns how many
    syscalls it allows. ``socket_families`` / ``ioctl_requests`` narrow socket(2) and
    ioctl(2) to those argument values. Irreversible: call once set-up is done."""
    sc = _load_binding()
    from ._sigsys_cffi import lib

    if "openat" not in allow:  # no module can be read once the filter is on
        from ..lazy import load_pending

        load_pending()
    _name_syscalls(sc, lib)
    if lib.pymvm_install_sigsys_reporter(log_fd, process.encode()) != 0:
        raise SeccompError("cannot install the SIGSYS handler")
    filt = sc.SyscallFilter(defaction=sc.TRAP)
    allowed = 0
    for name in allow:
        if (name == "socket" and socket_families) or (name == "ioctl" and ioctl_requests):
            continue
        try:
            filt.add_rule(sc.ALLOW, name)
            allowed += 1
        except (ValueError, RuntimeError, OSError):
            pass  # not a syscall on this architecture (open, rename...): nothing to allow
    if "socket" in allow and socket_families:
        for family in socket_families:
            filt.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
        allowed += 1
    if "ioctl" in allow and ioctl_requests:
        for request in ioctl_requests:
            filt.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))
        allowed += 1
    try:
        filt.set_attr(sc.Attr.CTL_TSYNC, 1)  # every thread, vCPUs included
        filt.load()
    except (OSError, RuntimeError, ValueError) as e:
        raise SeccompError(f"cannot load the {process} seccomp filter: {e}") from None
    log.info("seccomp_installed", process=process, syscalls=allowed)
    return allowed


def install_backend() -> int:
    return install("vhost-user-backend", BACKEND, socket_families=SOCKET_FAMILIES["backend"],
                   ioctl_requests=backend_ioctls())


def blk_backend_ioctls() -> tuple[int, ...]:
    """The only ioctl requests the blk back-end makes after set-up."""
    import termios

    return (termios.FIONBIO, termios.FIOCLEX, termios.TCGETS)


def install_blk_backend() -> int:
    return install("vhost-user-blk-backend", BLK_BACKEND,
                   socket_families=SOCKET_FAMILIES["backend"],
                   ioctl_requests=blk_backend_ioctls())


def install_vmm() -> int:
    return install("vmm", VMM, socket_families=SOCKET_FAMILIES["vmm"])


def self_test_forbidden_syscall() -> None:
    """Make a syscall no list allows (used by the tests through PYMVM_SECCOMP_SELF_TEST)."""
    import ctypes

    sc = _load_binding()
    nr = sc.resolve_syscall(sc.Arch(), "reboot")
    # reboot(2) with bad magic numbers: never allowed, and EINVAL even if it got through.
    ctypes.CDLL(None, use_errno=True).syscall(nr, 0, 0, 0, 0)


def run_self_test_if_asked(where: str) -> None:
    """Tests set PYMVM_SECCOMP_SELF_TEST=<where> to inject a forbidden syscall right after
    the filter is installed at ``where`` ("backend" or "vmm")."""
    if os.environ.get("PYMVM_SECCOMP_SELF_TEST") == where:
        self_test_forbidden_syscall()
