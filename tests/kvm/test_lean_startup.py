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


def imported_modules(stderr: str) -> set[str]:
    """Modules that `-X importtime` reports as imported (its last column)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def run_until_started(config: Path, timeout: float = 120.0) -> str:
    """`python -X importtime -m pymvm.cli run CONFIG`, SIGTERMed once ``vm_starting`` is
    logged; returns its stderr (import times and the JSON log)."""
    from pymvm.images.artifacts import fresh_artifact

    if fresh_artifact("microvm-kernel") is None or fresh_artifact("test-initramfs") is None:
        pytest.skip("the example VM's kernel and initramfs are not built: run scripts/setup "
                    "(pymvm build-kernel; pymvm build-initramfs --with iperf3)")
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "pymvm.cli", "run",
                             str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stderr is not None
    err = b""
    deadline = time.monotonic() + timeout
    try:
        while b'"vm_starting"' not in err:
            left = deadline - time.monotonic()
            assert left > 0, f"pymvm run never logged vm_starting: {err[-2000:]!r}"
            ready, _, _ = select.select([proc.stderr], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)
                assert chunk or proc.poll() is None, \
                    f"pymvm run exited {proc.poll()} before vm_starting: {err[-2000:]!r}"
                err += chunk
        proc.send_signal(signal.SIGTERM)
        err += proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    return err.decode(errors="replace")


def test_the_example_vm_imports_no_networking_vhost_api_or_image_builder_module() -> None:
    modules = imported_modules(run_until_started(EXAMPLE))
    assert "pymvm.vmm" in modules and "pymvm.machine" in modules  # the parse is right
    leaked = sorted(m for m in modules
                    if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not leaked, f"imported by `pymvm run` on a VM without NICs: {leaked}"


def test_the_import_check_sees_a_forbidden_module_when_one_is_imported() -> None:
    # The parser must report what importtime printed, or the test above could never fail.
    fake = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        400 | pyroute2\n"
            "import time:        20 |         20 |   pymvm.net.tap\n")
    assert {"pyroute2", "pymvm.net.tap"} <= imported_modules(fake)
