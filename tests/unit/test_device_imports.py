"""What a VM with a vsock device or a vhost-net NIC imports for its devices (issue 15).

tests/kvm/test_lean_startup.py checks the example VM, which has no device: these modules are
the ones a VM with a vsock device (the testing kit's, bench/boot's first-exec VM) or a
vhost-net NIC adds before its first KVM_RUN. Their records are pymvm.record classes: a
``@dataclass`` compiles its methods when its module is imported, and one without a docstring
loads ``inspect`` (with ast, dis, tokenize and linecache) to write one.
"""

from __future__ import annotations

import subprocess
import sys

DEVICE_PATH_MODULES = (
    "pymvm.devices.virtio.mmio",
    "pymvm.devices.virtio.plumbing",
    "pymvm.devices.virtio.vsock",
    "pymvm.vhost.kernel",
)


def test_device_modules_load_neither_dataclasses_nor_inspect() -> None:
    code = (
        "import sys\n"
        f"for name in {DEVICE_PATH_MODULES!r}: __import__(name)\n"
        "from pymvm import lazy\n"
        "loaded = [m for m in ('dataclasses', 'ast', 'dis', 'tokenize') if m in sys.modules]\n"
        "loaded += [m for m in ('inspect',) if m in sys.modules and not lazy.is_pending(m)]\n"
        "print(','.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "", f"loaded on the device path: {proc.stdout.strip()}"
