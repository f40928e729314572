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


def test_the_device_records_behave_as_values() -> None:
    from pymvm.devices.virtio.device import ActivationContext, QueueConfig
    from pymvm.devices.virtio.mmio import _Queue
    from pymvm.vhost.kernel import Vring, VringHostAddrs

    q = QueueConfig(index=0, size=256, ready=True, desc_addr=1, driver_addr=2, device_addr=3)
    assert q == QueueConfig(0, 256, True, 1, 2, 3) and hash(q) == hash(QueueConfig(0, 256, True, 1, 2, 3))
    assert repr(q) == ("QueueConfig(index=0, size=256, ready=True, desc_addr=1, driver_addr=2, "
                       "device_addr=3)")
    a, b = ActivationContext(1, [q]), ActivationContext(1, [q])
    assert a.kick_fds == [] and a.kick_fds is not b.kick_fds  # a fresh list each, as default_factory
    assert a.queue(0) is q and a.queue(1) is None
    assert Vring(1, 256, 2, 3, 4).replace(size=128) == Vring(1, 128, 2, 3, 4)
    assert VringHostAddrs(desc=1, avail=2, used=3) != VringHostAddrs(1, 2, 4)
    fresh = _Queue(max_size=256, size=256)
    assert (fresh.ready, fresh.desc_addr, fresh.driver_addr, fresh.device_addr) == (False, 0, 0, 0)
    fresh.ready = True  # the transport's queue registers are mutable
    assert fresh.snapshot(2) == QueueConfig(2, 256, True, 0, 0, 0)
