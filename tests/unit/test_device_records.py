"""The device path's records (pymvm.record classes, issue 15) behave as the dataclasses they
replaced: keyword or positional construction, defaults (a fresh list each), equality,
hashing of the frozen ones, repr, replace(), and the mmio transport's mutable registers."""

from __future__ import annotations


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
    assert a.call_fds == [] and a.call_fds is not b.call_fds and a.mem_regions == ()
    assert a.queue(0) is q and a.queue(1) is None
    assert Vring(1, 256, 2, 3, 4).replace(size=128) == Vring(1, 128, 2, 3, 4)
    assert VringHostAddrs(desc=1, avail=2, used=3) != VringHostAddrs(1, 2, 4)
    fresh = _Queue(max_size=256, size=256)
    assert (fresh.ready, fresh.desc_addr, fresh.driver_addr, fresh.device_addr) == (False, 0, 0, 0)
    fresh.ready = True  # the transport's queue registers are mutable
    assert fresh.snapshot(2) == QueueConfig(2, 256, True, 0, 0, 0)
