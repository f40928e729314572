"""`pymvm run` imports only what the VM it builds uses (python -X importtime, issue 15).

The example VM (examples/vm.toml: no NIC, no API socket) is started for real on this host's
/dev/kvm and stopped with SIGTERM once the VMM logged ``vm_starting``, i.e. after every
import the build and the start made. No time bound: the list of modules that must stay out.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vm.toml"

# Never imported by a VM without NICs or an API socket.
FORBIDDEN = (
    "pyroute2",                 # host networking: TAPs, bridges, namespaces
    "pymvm.net",
    "pymvm.vhost.user",         # the vhost-user front-end and back-end framework
    "pymvm.vhost.backends",
    "pymvm.vhost.kernel",       # vhost-net / vhost-vsock
    "pymvm.images.kernel",      # the image builders (@names come from their record)
    "pymvm.images.initramfs",
    "pymvm.images.agent",
    "pymvm.nested",             # the nested-host runner: test infrastructure
    "pymvm.testing",
    "aiohttp",                  # the control API's server, only with --api-sock
    "pymvm.api.server",
    "prometheus_client",
)

# Not imported before the vCPUs start (the `vm_starting` line, logged right before them) by a
# VM without NICs or an API socket: they load after the guest's first KVM_RUN, or never.
FORBIDDEN_BEFORE_VCPUS = (
    "asyncio",                  # never, without an API socket (below)
    # structlog itself: until it runs, pymvm's loggers write its JSON lines (pymvm.logging);
    # structlog.contextvars and structlog.typing alone are imported for that.
    "structlog.processors", "structlog.stdlib", "structlog.dev", "structlog._config",
    "structlog._native", "structlog.threadlocal",
    "logging", "inspect", "uuid", "platform", "pickle", "traceback",  # what structlog imports
    "socket", "_socket",        # the seccomp filter has Linux's numbers for the families
    "copy",                     # dataclasses uses it in asdict() alone
    "termios", "pymvm.vhost",   # the back-ends' ioctl numbers: not in the VMM's filter
    "concurrent.futures",
    "ssl", "_ssl",              # libssl + libcrypto: never, without the API (vmm.run_vm)
    "hashlib", "_hashlib",      # libcrypto: only for generated MACs and vsock CIDs
    "difflib",                  # only for an unknown config key
    "ctypes",                   # only where a process drops privileges or self-tests seccomp
    "argparse", "gettext", "locale",  # `pymvm run CONFIG` is read without them (cli.run_args)
    "dataclasses",              # the start-up path's records are pymvm.record classes
    "glob",                     # the seccomp binding is looked for with os.listdir
    "select",                   # the main thread's epoll wait is made after the first KVM_RUN
)
# Never loaded by that VM, from start to SIGTERM: with no API socket its main thread waits
# in epoll (VirtualMachine.wait), so no asyncio and nothing asyncio imports (about 6 MiB
# of RSS), and never the C modules that map libssl/libcrypto.
FORBIDDEN_WHILE_RUNNING = ("asyncio", "concurrent.futures", "selectors", "socket", "_socket",
                           "ssl", "_ssl", "_hashlib", "logging", "inspect", "structlog._config")


def imported_modules(stderr: str) -> set[str]:
    """Modules that `-X importtime` reports as imported (its last column)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def before_vcpus_start(stderr: str) -> str:
    """The part of the stderr written before the `vm_starting` log line."""
    at = stderr.find('"vm_starting"')
    assert at >= 0, stderr[-2000:]
    return stderr[:at]


def leaked(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


# `python -m pymvm.cli` without site's .pth hooks (python -S, site-packages on sys.path by
# hand): the modules this installation's hooks import (an editable install's finder, other
# packages' hooks) do not hide what pymvm itself imports.
WITHOUT_SITE_HOOKS = ("-S", "-c", ("import sys, site; sys.path += site.getsitepackages(); "
                                    "import runpy; runpy.run_module('pymvm.cli', "
                                    "run_name='__main__', alter_sys=True)"))


def run_until_started(config: Path, timeout: float = 120.0,
                      markers: tuple[bytes, ...] = (b'"vm_starting"',),
                      python_args: tuple[str, ...] = ("-m", "pymvm.cli"),
                      env: dict[str, str] | None = None) -> str:
    """`python -X importtime -m pymvm.cli run CONFIG`, SIGTERMed a second after
    ``vm_starting`` is logged (``markers``, in that order, on stderr), with its guest and its
    main thread's wait running; returns its stderr (import times and the JSON log). The
    SIGTERM must end it with 143: that is the wait's signal handling at work."""
    from pymvm.images.artifacts import fresh_artifact

    if fresh_artifact("microvm-kernel") is None or fresh_artifact("test-initramfs") is None:
        pytest.skip("the example VM's kernel and initramfs are not built: run scripts/setup "
                    "(pymvm build-kernel; pymvm build-initramfs --with iperf3)")
    proc = subprocess.Popen([sys.executable, "-X", "importtime", *python_args, "run",
                             str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT, env=env)
    assert proc.stderr is not None
    err = b""
    deadline = time.monotonic() + timeout
    try:
        while (at := err.find(markers[0])) < 0 or any(
                (at := err.find(m, at)) < 0 for m in markers[1:]):
            left = deadline - time.monotonic()
            assert left > 0, f"pymvm run never printed {markers}: {err[-2000:]!r}"
            ready, _, _ = select.select([proc.stderr], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)
                assert chunk or proc.poll() is None, \
                    f"pymvm run exited {proc.poll()} before {markers}: {err[-2000:]!r}"
                err += chunk
        time.sleep(1.0)  # whatever the running VM imports comes meanwhile
        proc.send_signal(signal.SIGTERM)
        err += proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    return err.decode(errors="replace")


@pytest.fixture(scope="module")
def example_run() -> str:
    return run_until_started(EXAMPLE)


def test_the_example_vm_imports_no_networking_vhost_api_or_image_builder_module(
        example_run: str) -> None:
    modules = imported_modules(example_run)
    assert "pymvm.vmm" in modules and "pymvm.machine" in modules  # the parse is right
    found = leaked(modules, FORBIDDEN)
    assert not found, f"imported by `pymvm run` on a VM without NICs: {found}"


def test_the_example_vm_runs_without_asyncio_tls_or_libcrypto(example_run: str) -> None:
    before = imported_modules(before_vcpus_start(example_run))
    assert "pymvm.machine" in before and "structlog.contextvars" in before  # the split is right
    found = leaked(before, FORBIDDEN_BEFORE_VCPUS)
    assert not found, f"imported by `pymvm run` before its vCPUs start: {found}"
    assert '"vm_stopped"' in example_run and '"signal"' in example_run  # it ran until SIGTERM
    found = leaked(imported_modules(example_run), FORBIDDEN_WHILE_RUNNING)
    assert not found, f"imported by `pymvm run` of a VM without an API socket: {found}"


def test_the_import_check_sees_a_forbidden_module_when_one_is_imported() -> None:
    # The parser must report what importtime printed, or the test above could never fail.
    fake = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        400 | pyroute2\n"
            "import time:        20 |         20 |   pymvm.net.tap\n")
    assert {"pyroute2", "pymvm.net.tap"} <= imported_modules(fake)
    assert leaked(imported_modules(fake), FORBIDDEN) == ["pymvm.net.tap", "pyroute2"]
    log = fake + '{"event": "vm_starting"}\nimport time:  5 |  5 | _ssl\n'
    assert imported_modules(before_vcpus_start(log)) == imported_modules(fake)
    assert leaked(imported_modules(log), FORBIDDEN_WHILE_RUNNING) == ["_ssl"]


# ---- the vCPU run loop keeps nothing per exit (issue 15, item 3) ------------------------------

def port_io_loop(machine, exits: int) -> None:
    """A real-mode guest that makes ``exits`` OUT and ``exits`` IN exits on a port no device
    claims, then halts."""
    from .guests import Asm, load, setup_real_mode

    a = Asm(0x1000)
    a.mov_cx(exits).mov_dx(0x600)
    a.label("top").out_dx_al().in_al_dx()
    a.db(b"\x49")  # dec cx
    a.jnz("top").hlt()
    load(machine, a)
    setup_real_mode(machine.vcpus[0], 0x1000)


def retained_by_a_run(make_machine, exits: int) -> int:
    """Bytes (tracemalloc) still allocated after a guest made 2 * ``exits`` exits and its
    vCPU thread ended, beyond what was allocated before it started."""
    import gc
    import tracemalloc

    from pymvm.machine import StopKind

    from .guests import run_to_stop

    m = make_machine(1 << 20, irqchip=False)
    port_io_loop(m, exits)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    reason = run_to_stop(m, timeout=120)
    assert reason.kind is StopKind.GUEST_HALTED, reason
    assert sum(m.exit_counts[0].values()) >= 2 * exits  # the loop did see them all
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def test_the_vcpu_run_loop_keeps_no_memory_per_exit(make_machine) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        retained_by_a_run(make_machine, 100)  # warm-up: caches, code paths, the exit dict
        few = retained_by_a_run(make_machine, 1_000)
        many = retained_by_a_run(make_machine, 60_000)
    finally:
        tracemalloc.stop()
    # 118 000 exits more: even one byte kept per exit would show as 115 KiB.
    assert many - few < 16 * 1024, (few, many)


# What this machine's .pth hooks import (a CA bundle hook: importlib.resources, tempfile,
# zipfile...) and pymvm must not need before its vCPUs start: shutil, with zlib, bz2 and
# lzma, too (argparse's HelpFormatter, which asks it for the terminal's width, is not used
# by `pymvm run CONFIG`, and the VM state directory imports it only to remove a tree).
FORBIDDEN_BEFORE_VCPUS_WITHOUT_SITE_HOOKS = (
    "tempfile", "random", "zipfile", "importlib.resources", "importlib.metadata", "email",
    "certifi", "shutil", "bz2", "lzma",
)


def test_without_site_hooks_the_example_vm_imports_only_what_it_needs_before_its_vcpus(
        tmp_path: Path) -> None:
    # Its own state directory: cleaning up after a killed VMM found there would load shutil.
    env = {**os.environ, "PYMVM_STATE_DIR": str(tmp_path / "state")}
    err = run_until_started(EXAMPLE, python_args=WITHOUT_SITE_HOOKS, env=env)
    before = imported_modules(before_vcpus_start(err))
    # The split is right, and site's hooks did not run (no editable install's finder).
    assert "pymvm.machine" in before and not any("editable" in m for m in before)
    found = leaked(before, FORBIDDEN_BEFORE_VCPUS + FORBIDDEN_BEFORE_VCPUS_WITHOUT_SITE_HOOKS)
    assert not found, f"imported by `pymvm run` before its vCPUs start: {found}"
