"""Process confinement for pymvm's child back-ends: die with the parent, drop privileges.

* :func:`exit_with_parent`: PR_SET_PDEATHSIG, so a back-end ends when the VMM that started
  it dies, SIGKILL included; and a getppid() check for a VMM that died before the prctl.
  The signal is sent when the *thread* that forked the child exits, so back-ends are
  started from the VMM's main thread. Changing credentials clears the setting:
  :func:`drop_privileges` sets it again.
* :func:`drop_privileges`: after set-up (TAP open, socket bound), become an unprivileged
  user with no capabilities at all, no supplementary groups and no_new_privs.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys

import structlog

from .lazy import load_pending

log = structlog.get_logger()

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

#: Default user a built-in back-end runs as once it is set up.
DEFAULT_BACKEND_USER = "nobody"

_libc = None  # ctypes.CDLL of libc, made on first use: `pymvm run` itself never needs it


class Settings:
    """Process-wide confinement choices, set once by the CLI (``pymvm run`` options)."""

    #: User the built-in back-ends drop to once set up; None keeps them as they started.
    backend_user: str | None = None
    #: seccomp allowlists for the VMM and the back-ends it starts (``pymvm run`` turns them
    #: on unless --no-seccomp; off for library use, such as the tests' in-process VMs).
    seccomp: bool = False


settings = Settings()


class SandboxError(Exception):
    """Confinement could not be applied (unknown user, prctl refused)."""


def _prctl(option: int, arg2: int = 0) -> int:
    global _libc
    import ctypes  # only the back-ends confine themselves: not on the VMM's start-up (issue 15)

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                      ctypes.c_ulong(0), ctypes.c_ulong(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl({option}) failed: {os.strerror(err)}")
    return ret


def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent dies; exit now if ``parent_pid`` is already gone."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:  # re-parented before the prctl took effect
        log.warning("parent_gone", parent_pid=parent_pid, ppid=os.getppid())
        sys.stderr.flush()
        os._exit(0)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_privileges(user: str, *, parent_pid: int | None = None) -> None:
    """Become ``user`` (name or numeric uid) with no capabilities, for good.

    setgroups/setgid/setuid to the user (the kernel clears the permitted and effective
    capability sets when all uids become non-zero), the bounding and ambient sets are
    emptied first (so not even a file capability can bring one back), and no_new_privs
    forbids gaining privileges through execve.
    """
    load_pending()  # asyncio, if still pending: the user may not read the interpreter's files
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except (KeyError, ValueError):
        if not user.isdigit():
            raise SandboxError(f"unknown user {user!r}: pass an existing user name or a uid") from None
        uid = gid = int(user)
    if uid == 0:
        raise SandboxError("the back-end user must not be root (uid 0): choose an unprivileged user")
    _prctl(PR_SET_KEEPCAPS, 0)
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except SandboxError:
        pass  # kernels before 4.3 have no ambient set
    if os.geteuid() == 0:
        for cap in range(last_cap() + 1):
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except SandboxError:
                pass  # not in the bounding set already
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if parent_pid is not None:  # credential changes clear the parent-death signal
        exit_with_parent(parent_pid)
    log.info("privileges_dropped", uid=uid, gid=gid)


def capabilities() -> dict[str, int]:
    """This process's capability sets from /proc/self/status (CapInh, CapPrm, CapEff, ...)."""
    caps = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, value = line.split(":")
                caps[key] = int(value, 16)
    return caps
