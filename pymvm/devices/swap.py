"""Moving a live virtio-net device's rings from one back-end to another.

pymvm owns the control plane of every data plane it uses: guest memory, the ring addresses
the driver programmed, and the kick (ioeventfd) and call (irqfd) eventfds. So a ring can be
handed from one back-end to another while the guest runs (issue 10): the old back-end stops
and reports where each ring stands (:class:`~pymvm.vhost.queue_state.RingPosition`), the new
one gets the same memory table, ring addresses and eventfds and resumes at those positions,
and every queue is kicked and signalled once so that a notification that fell between the
two is not lost. Nothing the driver sees changes: same features, same rings, same MAC.

If the new back-end fails at any point (refuses a request, hangs up, dies), the old one is
started again at the saved positions and the error is raised: the guest keeps its network.

Back-ends here only need ``features()``, ``start(ctx, regions, positions)`` and ``stop()``
(VhostNetBackend and the vhost-user front-ends have them), so the hand-over is tested with
fakes (tests/unit/test_net_swap.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from .virtio import constants as c

log = structlog.get_logger()

_NET_FEATURE_NAMES = {
    c.VIRTIO_NET_F_CSUM: "CSUM",
    c.VIRTIO_NET_F_GUEST_CSUM: "GUEST_CSUM",
    c.VIRTIO_NET_F_GUEST_TSO4: "GUEST_TSO4",
    c.VIRTIO_NET_F_GUEST_TSO6: "GUEST_TSO6",
    c.VIRTIO_NET_F_GUEST_ECN: "GUEST_ECN",
    c.VIRTIO_NET_F_GUEST_UFO: "GUEST_UFO",
    c.VIRTIO_NET_F_HOST_TSO4: "HOST_TSO4",
    c.VIRTIO_NET_F_HOST_TSO6: "HOST_TSO6",
    c.VIRTIO_NET_F_HOST_ECN: "HOST_ECN",
    c.VIRTIO_NET_F_HOST_UFO: "HOST_UFO",
    c.VIRTIO_NET_F_MRG_RXBUF: "MRG_RXBUF",
    c.VIRTIO_RING_F_INDIRECT_DESC: "RING_INDIRECT_DESC",
    c.VIRTIO_RING_F_EVENT_IDX: "RING_EVENT_IDX",
    c.VIRTIO_F_VERSION_1: "VERSION_1",
}


def feature_names(bits: int) -> list[str]:
    """VIRTIO_NET_F_* / VIRTIO_RING_F_* names of ``bits`` (unknown ones as ``bit N``)."""
    names = []
    for bit in range(64):
        if bits >> bit & 1:
            names.append(_NET_FEATURE_NAMES.get(bit, f"bit {bit}"))
    return names


class SwapError(Exception):
    """A back-end swap did not happen; the old back-end still serves the device."""

    status = 409


class SwapRefused(SwapError):
    """The swap would change what the guest sees (a feature it uses) or the device cannot
    be swapped now; nothing was touched."""

    status = 409


class SwapFailed(SwapError):
    """The new back-end failed; the old one was put back at the saved ring positions.
    409 like a refusal: the request conflicts with the state of the new back-end, and the
    VMM itself is fine (a 5xx would say it is not)."""

    status = 409


class SwappableBackend(Protocol):
    def features(self) -> int: ...

    def start(self, ctx: Any, mem_regions: Any, positions: Any = None, *,
              strict: bool = False) -> None: ...

    def stop(self) -> Mapping[int, Any]: ...


class SwappableDevice(Protocol):
    backend: Any
    activation: Any
    features_mask: int


def missing_features(device: SwappableDevice, acked: int, new: SwappableBackend) -> int:
    """Back-end feature bits the guest uses (``acked``; before FEATURES_OK: what it is offered)
    that ``new`` lacks."""
    used = acked if acked else device.backend.features()
    return used & device.features_mask & ~new.features()


def notify(ctx: Any) -> None:
    """Kick every queue (the new back-end looks at the avail ring) and signal every call
    eventfd (the guest looks at the used ring): whatever the driver or the old back-end did
    between stop and start is seen. A spurious kick or interrupt is harmless."""
    for fd in (*ctx.kick_fds, *ctx.call_fds):
        try:
            os.eventfd_write(fd, 1)
        except OSError as e:
            log.warning("swap_notify_failed", fd=fd, error=str(e))


def hand_over(device: SwappableDevice, new: SwappableBackend, *, acked: int = 0,
              lock: threading.RLock | None = None,
              on_old_lost: Any = None) -> dict[int, Any]:
    """Make ``new`` the data plane of ``device``; returns the positions the rings resumed at.

    Under ``lock`` (the transport's: no driver reset or DRIVER_OK in between): refuse when
    ``new`` lacks a feature in use (SwapRefused); with a live driver stop the old back-end,
    start ``new`` at the positions it reported, then notify. If ``new`` fails, the old
    back-end is started again at the same positions (SwapFailed); if even that fails,
    ``on_old_lost`` is called (the transport's DEVICE_NEEDS_RESET) and SwapFailed says so.
    The old back-end is left stopped, not closed: the caller closes it.
    """
    from ..vhost.queue_state import RingPosition

    lock = lock or threading.RLock()
    with lock:
        missing = missing_features(device, acked, new)
        if missing:
            raise SwapRefused("the new back-end lacks features the guest negotiated: "
                              f"{', '.join(feature_names(missing))}; use a back-end that offers "
                              "them, or declare the NIC swappable = true in the config")
        old = device.backend
        ctx = device.activation
        if ctx is None:  # the driver has not started the rings: nothing to move
            device.backend = new
            log.info("net_backend_swapped", rings="not started")
            return {}
        regions = ctx.mem_regions
        prepare = getattr(new, "prepare", None)
        if prepare is not None:
            # What needs no stopped ring (features, memory table) goes to the new back-end
            # while the old one still serves: the gap below is only the rings' hand-over.
            try:
                prepare(ctx, regions)
            except BaseException as e:
                log.warning("swap_new_backend_failed", error=str(e), stage="prepare")
                raise SwapFailed(f"the new back-end failed: {e}; the old back-end keeps "
                                 "serving the device") from None
        t_stop = time.monotonic()
        stopped = old.stop()
        positions = {q: RingPosition(p.resume_at(), p.used_idx) for q, p in stopped.items()}
        t_start = time.monotonic()
        try:
            # strict: a back-end that hangs up during the set-up raises instead of waiting
            # for a reconnect, so that the old one comes back now.
            new.start(ctx, regions, positions, strict=True)
        except BaseException as e:
            log.warning("swap_new_backend_failed", error=str(e), positions=positions)
            try:
                new.stop()
            except Exception as stop_error:  # it failed already: best effort
                log.debug("swap_new_backend_stop_failed", error=str(stop_error))
            try:
                old.start(ctx, regions, positions)
            except BaseException as restore_error:
                log.error("swap_old_backend_not_restored", error=str(restore_error))
                if on_old_lost is not None:
                    on_old_lost()
                raise SwapFailed(f"the new back-end failed ({e}) and the old one could not be "
                                 f"restarted ({restore_error}); the guest must reset the "
                                 "device") from None
            notify(ctx)
            raise SwapFailed(f"the new back-end failed: {e}; the old back-end serves the "
                             "device again") from None
        device.backend = new
        notify(ctx)
        t_end = time.monotonic()
        # The data plane's own gap: from the old back-end's stop to the new one's start.
        log.info("net_backend_swapped", positions={q: tuple(p) for q, p in positions.items()},
                 stop_ms=round((t_start - t_stop) * 1000, 1),
                 start_ms=round((t_end - t_start) * 1000, 1))
        return positions
