"""The interface every virtio device model implements, whatever its transport.

A device here is only the control plane: feature bits, config space, and what to do when the
driver says DRIVER_OK or resets. The data plane (the virtqueues) lives in a vhost back-end that
``activate()`` hands the negotiated rings and eventfds to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from pymvm.record import FrozenRecord

log = structlog.get_logger()


class VirtioError(Exception):
    """A virtio device or transport could not be built or driven."""


class VirtioConfigError(VirtioError):
    """A device was given parameters it cannot work with (bad MAC, MTU, queue count...)."""


class VirtioActivationError(VirtioError):
    """A device refused the driver's setup at DRIVER_OK (missing queue, bad back-end...)."""


class QueueConfig(FrozenRecord):
    """One virtqueue as the driver set it up (spec 2.7, split ring); addresses are GPAs."""

    __slots__ = ("index", "size", "ready", "desc_addr", "driver_addr", "device_addr")
    index: int
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int  # the available ring
    device_addr: int  # the used ring

    def __init__(self, index: int, size: int, ready: bool, desc_addr: int, driver_addr: int,
                 device_addr: int) -> None:
        self._init(index, size, ready, desc_addr, driver_addr, device_addr)


class ActivationContext(FrozenRecord):
    """Everything a device needs to start its data plane at DRIVER_OK.

    ``queues`` holds only the queues the driver marked ready, in index order; ``kick_fds[i]``
    and ``call_fds[i]`` belong to ``queues[i]`` (empty when the transport has no eventfd
    plumbing). ``mem_regions`` is the guest memory layout the VMM gave the transport, passed
    through untouched for back-ends that map guest memory (vhost SET_MEM_TABLE).
    """

    __slots__ = ("acked_features", "queues", "kick_fds", "call_fds", "mem_regions")
    acked_features: int
    queues: list[QueueConfig]
    kick_fds: list[int]
    call_fds: list[int]
    mem_regions: Sequence[Any]

    def __init__(self, acked_features: int, queues: list[QueueConfig],
                 kick_fds: list[int] | None = None, call_fds: list[int] | None = None,
                 mem_regions: Sequence[Any] = ()) -> None:
        self._init(acked_features, queues, [] if kick_fds is None else kick_fds,
                   [] if call_fds is None else call_fds, mem_regions)

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def queue(self, index: int) -> QueueConfig | None:
        """The ready queue with virtqueue index ``index``, or None if the driver left it off."""
        for queue in self.queues:
            if queue.index == index:
                return queue
        return None


class TransportSignals(Protocol):
    """What a device may ask of the transport that carries it."""

    def signal_needs_reset(self) -> None:
        """Set DEVICE_NEEDS_RESET and raise a configuration change interrupt (spec 2.1.2)."""

    def signal_config_change(self) -> None:
        """Bump ConfigGeneration and raise a configuration change interrupt."""


class VirtioDevice(ABC):
    """One virtio device type (net, blk, ...), independent of the transport.

    Subclasses set ``device_type`` (a VIRTIO_ID_*) and ``queue_max_sizes`` (one entry per
    virtqueue) and implement the abstract methods. The transport calls ``bind_transport`` when
    it wraps the device, which lets the device raise notifications through it.
    """

    device_type: int
    queue_max_sizes: tuple[int, ...]

    _transport: TransportSignals | None = None

    @abstractmethod
    def avail_features(self) -> int:
        """The 64-bit feature set the device offers (VIRTIO_F_VERSION_1 included)."""

    def read_config(self, offset: int, data: bytearray) -> None:
        """Fill ``data`` from config space at ``offset``; bytes past the end read as 0."""
        config = self.config_bytes()
        chunk = config[offset : offset + len(data)]  # b"" from the end on
        data[:] = chunk + bytes(len(data) - len(chunk))
        if len(chunk) < len(data):
            log.warning(
                "virtio config read past the end",
                device_type=self.device_type,
                offset=offset,
                length=len(data),
                config_size=len(config),
            )

    def write_config(self, offset: int, data: bytes) -> None:
        """Config space is read-only unless a device says otherwise (net's is)."""
        log.warning(
            "virtio config write ignored: config space is read-only",
            device_type=self.device_type,
            offset=offset,
            length=len(data),
        )

    def config_bytes(self) -> bytes:
        """The whole config space, little-endian; devices override this or read_config."""
        return b""

    @abstractmethod
    def activate(self, ctx: ActivationContext) -> None:
        """Start the data plane; raise (any exception) to refuse, the transport then sets
        DEVICE_NEEDS_RESET."""

    @abstractmethod
    def reset(self) -> None:
        """Stop the data plane: called on a device reset after a successful activate()."""

    def bind_transport(self, transport: TransportSignals) -> None:
        if self._transport is not None and self._transport is not transport:
            raise VirtioError(
                f"virtio device type {self.device_type} is already attached to a transport; "
                "build one device object per transport"
            )
        self._transport = transport

    def signal_needs_reset(self) -> None:
        """Tell the driver the device broke and needs a reset (spec 2.1.2)."""
        if self._transport is None:
            log.warning(
                "virtio needs-reset signal dropped: no transport", device_type=self.device_type
            )
            return
        self._transport.signal_needs_reset()

    def signal_config_change(self) -> None:
        """Tell the driver the config space changed (e.g. link status)."""
        if self._transport is not None:
            self._transport.signal_config_change()
