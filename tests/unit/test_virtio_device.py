"""The transport-independent virtio device interface (pymvm/devices/virtio/device.py): config
space reads at and past its end, feature bits of an activation, binding to a transport."""

from __future__ import annotations

import pytest

from pymvm.devices.virtio.device import ActivationContext, VirtioDevice, VirtioError


class Device(VirtioDevice):
    """The least a device model implements; ``config`` is its config space, if it has one."""

    device_type = 42
    queue_max_sizes = (8,)

    def __init__(self, config: bytes | None = None) -> None:
        self.config = config

    def avail_features(self) -> int:
        return 1 << 32

    def config_bytes(self) -> bytes:
        return super().config_bytes() if self.config is None else self.config

    def activate(self, ctx: ActivationContext) -> None:
        pass

    def reset(self) -> None:
        pass


def read(device: VirtioDevice, offset: int, length: int) -> bytes:
    data = bytearray(b"\xee" * length)  # what the caller's buffer held before
    device.read_config(offset, data)
    return bytes(data)


def test_a_device_without_config_space_reads_zeros() -> None:
    assert read(Device(), 0, 4) == bytes(4)


def test_a_config_read_straddling_the_end_gets_the_last_bytes_then_zeros() -> None:
    device = Device(bytes(range(1, 9)))
    assert read(device, 4, 4) == bytes([5, 6, 7, 8])
    assert read(device, 6, 4) == bytes([7, 8, 0, 0])


@pytest.mark.parametrize("offset", [8, 9, 0x100])
def test_a_config_read_at_or_past_the_end_reads_zeros(offset: int) -> None:
    assert read(Device(bytes(range(1, 9))), offset, 4) == bytes(4)


def test_has_feature_reports_only_the_acked_bits() -> None:
    ctx = ActivationContext(acked_features=(1 << 32) | (1 << 5), queues=[])
    assert ctx.has_feature(32) and ctx.has_feature(5)
    assert not ctx.has_feature(0) and not ctx.has_feature(6) and not ctx.has_feature(33)


def test_a_device_bound_to_a_second_transport_is_refused_naming_the_fix() -> None:
    device = Device()
    first, second = object(), object()
    device.bind_transport(first)  # type: ignore[arg-type]
    device.bind_transport(first)  # type: ignore[arg-type]  # the same one again is fine
    with pytest.raises(VirtioError, match=r"^virtio device type 42 is already attached to a "
                                          r"transport; build one device object per transport$"):
        device.bind_transport(second)  # type: ignore[arg-type]
