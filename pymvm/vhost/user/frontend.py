"""The VMM's vhost-user front-end, one for every device type: the data plane of a virtio
device (net, blk...) served by another process.

The device model says what differs per type (QEMU's vhost-user-blk/-net and Cloud Hypervisor's
``vu_common_ctrl`` split it the same way): the feature bits that may pass between guest and
back-end (``features_mask``), the protocol features it needs (CONFIG for a config space read
with GET_CONFIG, INFLIGHT_SHMFD for disks), and its queues, which come with the rings at
``start``. :class:`VhostUserNetBackend` and :class:`VhostUserBlkBackend` are thin users.

The back-end (DPDK testpmd, OVS-DPDK, pymvm's built-in one) maps guest RAM through the memfd
we pass, reads the rings at the userspace addresses we give (our mapping: the spec's
"front-end virtual addresses"), is kicked through the ioeventfds and signals the guest through
the irqfds, exactly like in-kernel vhost-net (pymvm.vhost.kernel) but over a unix socket
(QEMU docs/interop/vhost-user.rst).

Threads: ``activate``/``reset`` run on a vCPU thread (an MMIO write to the status register)
and do blocking round trips, each bounded by ``request_timeout``. A supervisor thread waits
for the back-end to hang up and then reconnects, forever until ``close()``: client mode dials
the same path again, server mode accepts the next back-end. A lost back-end never raises into
the vCPU thread: the VM keeps running, its net device just moves no packets until the
back-end is back, when the handshake is redone and an active device's rings are replayed.

Ring positions: ``stop()`` returns each ring's :class:`RingPosition` (the next available
entry, from GET_VRING_BASE, and the used ring's idx) and ``start()`` accepts positions to
resume at (SET_VRING_BASE), so a ring can move from one back-end to another. A back-end that
died cannot answer GET_VRING_BASE, so the replay after a reconnect starts each ring at the
used ring's ``idx`` as it is in guest memory (the last buffer the dead back-end returned), as
QEMU does without inflight tracking: buffers it had taken but not returned are processed
again (a re-sent or dropped packet, not a stuck ring). With inflight tracking (disks) the
front-end keeps the back-end's inflight region (GET_INFLIGHT_FD) and hands it to the next one
(SET_INFLIGHT_FD), which resubmits the unfinished requests and resumes after them.
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext
from pymvm.vhost.errors import VhostError
from pymvm.vhost.kernel import (
    OFFERED_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VringHostAddrs,
    vring_host_addrs,
)
from pymvm.vhost.queue_state import RingPosition
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserError, VhostUserRequestFailed
from pymvm.vhost.user.messages import PROTOCOL_FEATURES_FLAG
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.socket_io import FrontendChannel, VhostUserDisconnected

log = structlog.get_logger()

SocketMode = Literal["client", "server"]

#: Protocol features pymvm uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = (
    PF.REPLY_ACK | PF.MQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
)
#: The virtio-net bits pymvm can pass between guest and back-end (the same set as vhost-net).
GUEST_FEATURES = OFFERED_FEATURES
#: SET_STATUS at activation: everything a driver has set once it said DRIVER_OK.
DRIVER_OK_STATUS = (c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
                    | c.VIRTIO_CONFIG_S_FEATURES_OK | c.VIRTIO_CONFIG_S_DRIVER_OK)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 5.0
RECONNECT_MIN_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0
_CLOSE_JOIN_TIMEOUT = 5.0


class VhostUserFrontendError(VhostUserError):
    """The vhost-user back-end could not be reached, or refused to set up the device."""


@dataclass
class _InflightRegion:
    """The back-end's inflight region (GET_INFLIGHT_FD), kept for the next back-end."""

    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def close(self) -> None:  # once: the front-end drops the region under its lock with it
        os.close(self.fd)


@dataclass(frozen=True)
class _Activation:
    """What activate() was given: replayed as is after a reconnect."""

    ctx: ActivationContext
    regions: tuple[Any, ...]
    ring_addrs: tuple[VringHostAddrs, ...]


def _region_fd(region: Any) -> int:
    fd = getattr(region, "fd", None)
    if not isinstance(fd, int) or fd < 0:
        raise VhostUserFrontendError(
            f"guest memory at GPA {region.gpa:#x} has no file descriptor: a vhost-user back-end "
            "maps guest RAM through a shared memfd/hugetlbfs fd; anonymous or private memory "
            "cannot be shared (use pymvm.memory.GuestMemory)"
        )
    return fd


def _read_u16(regions: Sequence[Any], hva: int) -> int:
    """A little-endian u16 of guest memory at host address ``hva``."""
    for region in regions:
        offset = hva - region.host_addr
        if 0 <= offset <= region.size - 2:
            view = getattr(region, "view", None)
            if view is not None:  # a released view raises instead of touching unmapped memory
                return int.from_bytes(view[offset:offset + 2], "little")
            return ctypes.c_uint16.from_address(hva).value
    raise VhostUserFrontendError(f"host address {hva:#x} is not inside guest memory")


class VhostUserFrontend:
    """A virtio device's data plane in a vhost-user back-end reached at ``socket_path``.

    ``mode="client"``: connect to a back-end listening there, retrying for up to
    ``connect_timeout`` seconds while it starts. ``mode="server"``: listen there and wait as
    long for a back-end (an OVS-DPDK ``dpdkvhostuserclient`` port) to connect. The handshake
    runs in the constructor, so ``features()`` answers at once.

    ``features_mask``: the virtio feature bits the device model can pass through;
    ``protocol_features``: the protocol features to use when offered, ``required`` those
    without which the device cannot work; ``inflight``: track in-flight requests in shared
    memory (INFLIGHT_SHMFD) so that a restarted back-end resubmits them.
    """

    device_name = "vhost-user"

    def __init__(self, socket_path: str | os.PathLike[str], mode: SocketMode = "client", *,
                 features_mask: int = -1,
                 protocol_features: PF = WANTED_PROTOCOL_FEATURES,
                 required_protocol_features: PF = PF(0),
                 inflight: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._features_mask = features_mask
        self._wanted_protocol = protocol_features | required_protocol_features
        self._required_protocol = required_protocol_features
        self._use_inflight = inflight
        self._inflight: _InflightRegion | None = None
        #: GET_QUEUE_NUM of the current connection (None: the back-end has no MQ). It and the
        #: connection's features below are set by _handshake, before the constructor returns.
        self.backend_queues: int | None
        if mode not in ("client", "server"):
            raise VhostUserFrontendError(
                f"vhost-user socket mode {mode!r} is unknown; use 'client' or 'server'"
            )
        self.socket_path = str(socket_path)
        self.mode: SocketMode = mode
        self.request_timeout = request_timeout
        self._log = log.bind(device=self.device_name, socket=self.socket_path, mode=mode)
        self._lock = threading.RLock()  # one request sequence on the socket at a time
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # readable once closed
        self._closed = False
        self._listener: socket.socket | None = None
        self._listener_ino: int  # set with _listener
        self._channel: FrontendChannel | None = None
        self._connecting: FrontendChannel | None = None
        self._connected = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._device_features: int  # what the guest is offered; fixed for the VM's life
        self._backend_features: int  # this connection's GET_FEATURES
        self._protocol_features: PF
        self._max_mem_slots: int
        self._added_regions: set[m.MemoryRegion]  # ADD_MEM_REG done on this connection
        self._activation: _Activation | None = None
        #: (channel, features, regions) that prepare() sent ahead of start()
        self._prepared: tuple[FrontendChannel, int, tuple[Any, ...]] | None = None
        #: How many connections were established (1 after the constructor).
        self.connections = 0
        try:
            if mode == "server":
                self._listen()
            sock = self._connect_initial(connect_timeout)
            channel = FrontendChannel(sock, request_timeout)
            try:
                self._handshake(channel, first=True)
            except VhostUserDisconnected as e:
                channel.close()
                raise VhostUserFrontendError(f"{e}; check the back-end's log") from None
            except BaseException:
                channel.close()
                raise
            self._set_channel(channel)
        except BaseException:
            self.close()
            raise
        ctx = contextvars.copy_context()  # the thread's logs carry the VM's bound context
        self._supervisor = threading.Thread(
            target=ctx.run, args=(self._supervise,), daemon=True,
            name=f"vhost-user-{Path(self.socket_path).name}",
        )
        self._supervisor.start()

    # ---- the device model's interface ---------------------------------------------------------

    def features(self) -> int:
        """The back-end's virtio features that the device model can offer the guest."""
        return self._device_features

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the back-end's config space at ``offset`` (GET_CONFIG)."""
        with self._lock:
            channel = self._channel
            if channel is None:
                raise VhostUserFrontendError(
                    f"vhost-user back-end {self.socket_path} is not connected: no config space")
            if not self._protocol_features & PF.CONFIG:
                raise VhostUserFrontendError(
                    f"the vhost-user back-end at {self.socket_path} does not offer "
                    "VHOST_USER_PROTOCOL_F_CONFIG: it has no config space to read")
            try:
                reply = channel.request(m.GetConfig(offset, size))
            except VhostUserDisconnected as e:
                self._lost(channel, str(e))
                raise VhostUserFrontendError(f"{e}; check the back-end's log") from None
            except VhostUserRequestFailed:
                raise VhostUserFrontendError(
                    f"the vhost-user back-end refused GET_CONFIG of {size} bytes at {offset}"
                ) from None
            assert isinstance(reply, m.ConfigReply)
            return reply.data

    def set_config(self, offset: int, data: bytes) -> None:
        """Write the back-end's config space (SET_CONFIG); a refusal is logged, not raised
        (the guest wrote a config field, which must not fail the vCPU)."""
        with self._lock:
            channel = self._channel
            if channel is None or not self._protocol_features & PF.CONFIG:
                self._log.warning("vhost_user_set_config_dropped", offset=offset, size=len(data))
                return
            try:
                channel.request(m.SetConfig(offset, bytes(data), need_reply=self._ack()))
            except VhostUserDisconnected as e:
                self._lost(channel, str(e))
            except VhostUserRequestFailed as e:
                self._log.warning("vhost_user_set_config_refused", status=e.status)

    @property
    def protocol_features(self) -> PF:
        """The protocol features in force on the current connection."""
        return self._protocol_features

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def active(self) -> bool:
        return self._activation is not None

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until a back-end is connected (and replayed); False on timeout."""
        return self._connected.wait(timeout)

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        """Hand the rings to the back-end from their start (a driver's DRIVER_OK)."""
        self.start(ctx, mem_regions)

    def reset(self) -> dict[int, int]:
        """Stop the rings; returns {queue index: next available entry} (GET_VRING_BASE)."""
        return {q: pos.next_avail for q, pos in self.stop().items()}

    def start(self, ctx: ActivationContext, mem_regions: Sequence[Any],
              positions: dict[int, RingPosition] | None = None, *, strict: bool = False) -> None:
        """Hand the rings to the back-end, each resuming at ``positions[queue].next_avail``
        (SET_VRING_BASE; 0 for a queue not given). Refusals raise; a lost back-end only
        logs (the rings start when it is back), unless ``strict`` (a back-end swap, which
        puts the old back-end back instead): then a lost back-end raises too."""
        with self._lock:
            if self._closed:
                raise VhostUserFrontendError(f"vhost-user back-end {self.socket_path} is closed")
            if self._activation is not None:
                raise VhostUserFrontendError(f"{self.device_name} is already active: stop() first")
            activation = self._prepare(ctx, mem_regions)
            bases = {q.index: (positions[q.index].next_avail if positions and q.index in positions
                               else 0) for q in ctx.queues}
            channel = self._channel
            if channel is None and strict:
                raise VhostUserFrontendError(
                    f"vhost-user back-end {self.socket_path} is not connected")
            if channel is None:
                self._activation = activation
                self._log.warning("vhost_user_activate_deferred",
                                  reason="back-end not connected; rings start when it is back")
                return
            try:
                self._start(channel, activation, bases)
            except VhostUserDisconnected as e:
                self._lost(channel, str(e))
                if strict:
                    raise VhostUserFrontendError(
                        f"the vhost-user back-end at {self.socket_path} hung up while its rings "
                        f"were set up: {e}") from None
                self._activation = activation  # replayed once the back-end is back
                return
            except VhostUserRequestFailed as e:
                raise VhostUserFrontendError(
                    f"vhost-user back-end refused {e.request.name} (status {e.status:#x}); "
                    "check the back-end's log"
                ) from None
            self._activation = activation
            self._log.info("vhost_user_activated", features=hex(ctx.acked_features),
                           queues=[q.index for q in ctx.queues])

    def prepare(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        """Before a swap stops the old back-end: send what does not touch the rings yet (the
        features and the memory table), so that start() after the stop only sets the rings
        up and the data plane's gap is shorter. Raises like start(); nothing runs yet."""
        with self._lock:
            if self._closed or self._activation is not None:
                raise VhostUserFrontendError(
                    f"vhost-user back-end {self.socket_path} is closed or already active")
            channel = self._channel
            if channel is None:
                raise VhostUserFrontendError(
                    f"vhost-user back-end {self.socket_path} is not connected")
            if self._use_inflight:  # the inflight region comes first: start() does it all
                return
            activation = self._prepare(ctx, mem_regions)
            try:
                features = self._set_features(channel, ctx)
                self._send_mem_table(channel, activation.regions)
            except VhostUserDisconnected as e:
                self._lost(channel, str(e))
                raise VhostUserFrontendError(
                    f"the vhost-user back-end at {self.socket_path} hung up: {e}") from None
            except VhostUserRequestFailed as e:
                raise VhostUserFrontendError(
                    f"vhost-user back-end refused {e.request.name} (status {e.status:#x}); "
                    "check the back-end's log") from None
            self._prepared = (channel, features, activation.regions)

    def stop(self) -> dict[int, RingPosition]:
        """Stop the rings; returns each queue's position: the next available entry from
        GET_VRING_BASE (the used idx when the back-end cannot answer) and the used idx."""
        with self._lock:
            activation, self._activation = self._activation, None
            if activation is None:
                return {}
            bases: dict[int, int] = {}
            channel = self._channel
            if channel is not None:
                try:
                    bases = self._stop(channel, activation)
                except VhostUserDisconnected as e:
                    self._lost(channel, str(e))
                except VhostUserRequestFailed as e:
                    self._log.warning("vhost_user_stop_refused", request=e.request.name,
                                      status=e.status)
            positions: dict[int, RingPosition] = {}
            for q, addrs in zip(activation.ctx.queues, activation.ring_addrs):
                used = self._used_idx(activation, addrs)
                if q.index not in bases:  # the back-end could not tell: trust the used ring
                    bases[q.index] = used
                positions[q.index] = RingPosition(bases[q.index], used)
            if self._inflight is not None:  # the rings were stopped cleanly: nothing to redo
                self._inflight.close()
                self._inflight = None
            self._log.info("vhost_user_reset", vring_bases=bases)
            return positions

    def announce(self, mac: bytes) -> bool:
        """Ask the back-end to announce the guest's MAC on its network (SEND_RARP: a RARP
        frame, so that a switch learns the port), as QEMU does after a migration; False
        when the back-end does not offer VHOST_USER_PROTOCOL_F_RARP or is not connected."""
        with self._lock:
            channel = self._channel
            if channel is None or not self._protocol_features & PF.RARP:
                return False
            try:
                channel.request(m.SendRarp(bytes(mac)))
            except VhostUserDisconnected as e:
                self._lost(channel, str(e))
                return False
            self._log.info("vhost_user_rarp_sent", mac=bytes(mac).hex(":"))
            return True

    def close(self) -> None:
        """Disconnect, stop reconnecting (promptly) and release the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._wake, 1)
        for channel in (self._channel, self._connecting):
            if channel is not None:
                channel.shutdown()  # a blocked request or handshake returns at once
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(_CLOSE_JOIN_TIMEOUT)
            if supervisor.is_alive():
                self._log.warning("vhost_user_supervisor_still_running")
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._connected.clear()
            self._activation = None
            if self._inflight is not None:
                self._inflight.close()
                self._inflight = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_own_socket()
        if supervisor is None or not supervisor.is_alive():
            os.close(self._wake)
        self._log.info("vhost_user_closed")

    # ---- activation --------------------------------------------------------------------------

    def _prepare(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> _Activation:
        """Check and translate everything before the back-end hears about it."""
        n = len(ctx.queues)
        if len(ctx.kick_fds) != n or len(ctx.call_fds) != n:
            raise VhostUserFrontendError(
                f"{n} queues but {len(ctx.kick_fds)} kick and {len(ctx.call_fds)} call eventfds: "
                "the transport must register one ioeventfd and one irqfd per queue"
            )
        regions = tuple(mem_regions)
        if not regions:
            raise VhostUserFrontendError("no guest memory regions: the back-end needs a mem table")
        for region in regions:
            _region_fd(region)
        event_idx = bool(ctx.acked_features & VIRTIO_RING_F_EVENT_IDX)
        try:
            addrs = tuple(vring_host_addrs(regions, q, event_idx) for q in ctx.queues)
        except VhostError as e:
            raise VhostUserFrontendError(str(e)) from None
        return _Activation(ctx, regions, addrs)

    def _ack(self) -> bool:
        return bool(self._protocol_features & PF.REPLY_ACK)

    def _set_features(self, channel: FrontendChannel, ctx: ActivationContext) -> int:
        """SET_FEATURES with what the guest acked (and the protocol features flag)."""
        acked = ctx.acked_features & self._features_mask
        missing = acked & ~self._backend_features
        if missing:
            raise VhostUserFrontendError(
                f"the back-end no longer offers features {missing:#x} the guest negotiated; "
                "restart it with the same options"
            )
        features = acked | (self._backend_features & PROTOCOL_FEATURES_FLAG)
        channel.request(m.SetFeatures(features, need_reply=self._ack()))
        return features

    def _start(self, channel: FrontendChannel, activation: _Activation,
               bases: dict[int, int]) -> None:
        ctx, ack = activation.ctx, self._ack()
        prepared, self._prepared = self._prepared, None
        wanted = ((ctx.acked_features & self._features_mask)
                  | (self._backend_features & PROTOCOL_FEATURES_FLAG))
        if prepared is not None and prepared[0] is channel and prepared[1:] == (
                wanted, activation.regions):
            features = wanted  # prepare() sent them on this connection
        else:
            features = self._set_features(channel, ctx)
            self._set_inflight(channel, ctx)
            self._send_mem_table(channel, activation.regions)
        # Sent back to back and acked at the end (FrontendChannel.requests): one round trip
        # for the whole ring set-up, which is the data plane's gap in a swap.
        rings: list[m.Request] = []
        # _prepare made one ring address and checked one kick and call fd per queue
        for q, addrs, kick, call in zip(ctx.queues, activation.ring_addrs, ctx.kick_fds,
                                        ctx.call_fds):
            rings += [
                m.SetVringNum(q.index, q.size, need_reply=ack),
                m.SetVringBase(q.index, bases[q.index], need_reply=ack),
                m.SetVringAddr(q.index, 0, addrs.desc, addrs.used, addrs.avail, 0,
                               need_reply=ack),
                m.SetVringKick(q.index, kick, need_reply=ack),
                m.SetVringCall(q.index, call, need_reply=ack),
            ]
        if features & PROTOCOL_FEATURES_FLAG:  # rings start disabled (spec: SET_VRING_ENABLE)
            rings += [m.SetVringEnable(q.index, True, need_reply=ack) for q in ctx.queues]
        if self._protocol_features & PF.STATUS:  # DPDK waits for DRIVER_OK when STATUS is on
            rings.append(m.SetStatus(DRIVER_OK_STATUS, need_reply=ack))
        channel.requests(rings)

    def _set_inflight(self, channel: FrontendChannel, ctx: ActivationContext) -> None:
        """With INFLIGHT_SHMFD: the region from the first back-end (GET_INFLIGHT_FD), handed to
        this one (SET_INFLIGHT_FD) before its rings start."""
        if not (self._use_inflight and self._protocol_features & PF.INFLIGHT_SHMFD):
            return
        sizes = {q.size for q in ctx.queues}
        if len(sizes) != 1:
            self._log.warning("vhost_user_inflight_off", reason="queues of different sizes")
            return
        if self._inflight is None:
            num_queues = max(q.index for q in ctx.queues) + 1
            reply = channel.request(m.GetInflightFd(num_queues=num_queues,
                                                    queue_size=sizes.pop()))
            assert isinstance(reply, m.InflightFdReply)
            self._inflight = _InflightRegion(reply.fd, reply.mmap_size, reply.mmap_offset,
                                             reply.num_queues, reply.queue_size)
        r = self._inflight
        channel.request(m.SetInflightFd(r.mmap_size, r.mmap_offset, r.num_queues, r.queue_size,
                                        r.fd, need_reply=self._ack()))

    def _send_mem_table(self, channel: FrontendChannel, regions: tuple[Any, ...]) -> None:
        ack = self._ack()
        table = [(m.MemoryRegion(r.gpa, r.size, r.host_addr, r.fd_offset), _region_fd(r))
                 for r in regions]
        if self._protocol_features & PF.CONFIGURE_MEM_SLOTS:
            if len(table) > self._max_mem_slots:
                raise VhostUserFrontendError(
                    f"guest memory has {len(table)} regions, the back-end takes at most "
                    f"{self._max_mem_slots} (GET_MAX_MEM_SLOTS)"
                )
            for region, fd in table:
                if region not in self._added_regions:
                    channel.request(m.AddMemReg(region, fd, need_reply=ack))
                    self._added_regions.add(region)
            return
        if len(table) > m.MAX_MEM_REGIONS:
            raise VhostUserFrontendError(
                f"guest memory has {len(table)} regions, SET_MEM_TABLE carries at most "
                f"{m.MAX_MEM_REGIONS}; the back-end lacks CONFIGURE_MEM_SLOTS"
            )
        channel.request(m.SetMemTable(tuple(r for r, _ in table), tuple(fd for _, fd in table),
                                      need_reply=ack))

    def _stop(self, channel: FrontendChannel, activation: _Activation) -> dict[int, int]:
        """Disable and stop every ring (one round trip: the requests go back to back); a
        refusal is logged, and the bases the back-end did report are kept."""
        ack = self._ack()
        queues = activation.ctx.queues
        requests: list[m.Request] = (
            [m.SetVringEnable(q.index, False, need_reply=ack) for q in queues]
            if self._backend_features & PROTOCOL_FEATURES_FLAG else [])
        requests += [m.GetVringBase(q.index) for q in queues]
        if self._protocol_features & PF.STATUS:
            requests.append(m.SetStatus(0, need_reply=ack))
        replies, refused = channel.pipeline(requests)
        if refused is not None:
            self._log.warning("vhost_user_stop_refused", request=refused.request.name,
                              status=refused.status)
        bases: dict[int, int] = {}
        for reply in replies:
            if isinstance(reply, m.VringBaseReply):
                bases[reply.index] = reply.num
        return bases

    def _used_idx(self, activation: _Activation, addrs: VringHostAddrs) -> int:
        try:
            return _read_u16(activation.regions, addrs.used + 2)  # struct vring_used.idx
        except (VhostUserFrontendError, ValueError):
            return 0  # guest memory is gone (VM teardown): nothing will run the ring again

    # ---- connection ----------------------------------------------------------------------------

    def _listen(self) -> None:
        path = self.socket_path
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX)  # a stream socket, close-on-exec (the defaults)
        try:
            listener.bind(path)
            listener.listen(1)
            ino = os.stat(path).st_ino
        except OSError as e:
            listener.close()
            raise VhostUserFrontendError(
                f"cannot listen on vhost-user socket {path}: {e.strerror}; "
                "check the directory exists and the path is not another file"
            ) from None
        self._listener = listener
        self._listener_ino = ino

    def _unlink_own_socket(self) -> None:
        try:
            if os.stat(self.socket_path).st_ino == self._listener_ino:
                os.unlink(self.socket_path)
        except OSError:
            pass  # already gone, or replaced by someone else's socket: leave it

    def _dial(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)  # a stream socket, close-on-exec (the defaults)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _accept(self, timeout: float | None) -> socket.socket | None:
        """The next back-end on the listener; None on timeout or close()."""
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        ready = dict(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
        if self._closed or self._listener.fileno() not in ready:
            return None
        sock, _ = self._listener.accept()  # FrontendChannel sets its timeout before each use
        return sock

    def _connect_initial(self, timeout: float) -> socket.socket:
        if self.mode == "server":
            sock = self._accept(timeout)
            if sock is None:
                raise VhostUserFrontendError(
                    f"no vhost-user back-end connected to {self.socket_path} within "
                    f"{timeout:g} s; start it (e.g. OVS dpdkvhostuserclient) or raise the timeout"
                )
            return sock
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._dial()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() >= deadline:
                    raise VhostUserFrontendError(
                        f"no vhost-user back-end listening on {self.socket_path} after "
                        f"{timeout:g} s ({e.strerror}); start the back-end first"
                    ) from None
            except OSError as e:
                raise VhostUserFrontendError(
                    f"cannot connect to vhost-user socket {self.socket_path}: {e.strerror}"
                ) from None
            time.sleep(RECONNECT_MIN_DELAY)

    def _handshake(self, channel: FrontendChannel, *, first: bool) -> None:
        reply = channel.request(m.GetFeatures())
        assert isinstance(reply, m.FeaturesReply)
        features = reply.features
        if first:
            if not features & VIRTIO_F_VERSION_1:
                raise VhostUserFrontendError(
                    f"the vhost-user back-end at {self.socket_path} lacks VIRTIO_F_VERSION_1 "
                    "(modern virtio); pymvm offers only modern devices"
                )
            self._device_features = features & self._features_mask
        protocol = PF(0)
        backend_queues = None
        if features & PROTOCOL_FEATURES_FLAG:
            channel.request(m.GetProtocolFeatures())
            protocol = channel.conn.negotiate_protocol_features(self._wanted_protocol)
            channel.request(m.SetProtocolFeatures(protocol))
            if protocol & PF.MQ:
                queues = channel.request(m.GetQueueNum())
                assert isinstance(queues, m.QueueNumReply)
                backend_queues = queues.num_queues
                self._log.debug("vhost_user_queue_num", queues=queues.num_queues)
        missing = self._required_protocol & ~protocol
        if missing:
            raise VhostUserFrontendError(
                f"the vhost-user back-end at {self.socket_path} does not offer protocol "
                f"features {missing!r} that {self.device_name} needs; use a back-end that does")
        self.backend_queues = backend_queues
        # Acked when REPLY_ACK is on: the handshake ends once the back-end took ownership.
        channel.request(m.SetOwner(need_reply=bool(protocol & PF.REPLY_ACK)))
        if protocol & PF.CONFIGURE_MEM_SLOTS:  # only then is _max_mem_slots read
            slots = channel.request(m.GetMaxMemSlots())
            assert isinstance(slots, m.MaxMemSlotsReply)
            self._max_mem_slots = slots.slots
        self._backend_features = features
        self._protocol_features = protocol
        self._added_regions = set()
        self._log.info("vhost_user_connected", features=hex(features),
                       protocol_features=hex(protocol))

    def _set_channel(self, channel: FrontendChannel) -> None:
        self._channel = channel
        self.connections += 1
        self._connected.set()

    def _lost(self, channel: FrontendChannel, why: str) -> None:
        """Seen on a request: wake the supervisor (it sees a hang-up) to reconnect."""
        self._log.warning("vhost_user_backend_lost", reason=why)
        channel.shutdown()

    # ---- supervisor thread -----------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            while not self._closed:
                channel = self._channel
                if channel is not None:
                    self._wait_hangup(channel)
                    if self._closed:
                        return
                    with self._lock:
                        self._drop(channel)
                self._reconnect()
        except Exception:
            self._log.exception("vhost_user_supervisor_failed")

    def _wait_hangup(self, channel: FrontendChannel) -> None:
        # POLLRDHUP, not POLLIN: replies are the request path's to read; HUP/ERR always wake.
        poller = select.poll()
        poller.register(channel.sock.fileno(), select.POLLRDHUP)
        poller.register(self._wake, select.POLLIN)
        poller.poll()

    def _drop(self, channel: FrontendChannel) -> None:
        if self._channel is not channel:
            return
        self._channel = None
        self._connected.clear()
        channel.close()
        self._log.warning("vhost_user_disconnected", active=self._activation is not None,
                          reason=channel.broken or "back-end hung up")

    def _sleep(self, seconds: float) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        poller.poll(int(seconds * 1000))

    def _reconnect(self) -> None:
        """Until connected or closed: reach a back-end, redo the handshake, replay."""
        delay = RECONNECT_MIN_DELAY
        while not self._closed:
            try:
                sock = self._accept(None) if self.mode == "server" else self._dial()
            except OSError as e:
                self._log.debug("vhost_user_reconnect_failed", error=e.strerror or str(e))
                self._sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            if sock is None:
                return  # closed
            channel = FrontendChannel(sock, self.request_timeout)
            self._connecting = channel
            try:
                with self._lock:
                    if self._closed:
                        channel.close()
                        return
                    self._handshake(channel, first=False)
                    self._set_channel(channel)
                    self._replay(channel)
            except VhostUserError as e:  # died again, or a peer we cannot talk to yet
                self._log.warning("vhost_user_reconnect_failed", error=str(e))
                with self._lock:
                    self._drop(channel)
                    if self._channel is not channel:
                        channel.close()
                self._sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            finally:
                self._connecting = None
            self._log.info("vhost_user_reconnected", connections=self.connections)
            return

    def _replay(self, channel: FrontendChannel) -> None:
        activation = self._activation
        if activation is None:
            return
        bases = {q.index: self._used_idx(activation, addrs)
                 for q, addrs in zip(activation.ctx.queues, activation.ring_addrs)}
        try:
            self._start(channel, activation, bases)
        except (VhostUserFrontendError, VhostUserRequestFailed) as e:
            # The guest still thinks the device runs; it gets packets again after its next reset.
            self._activation = None
            self._log.error("vhost_user_replay_refused", error=str(e))
            return
        self._log.info("vhost_user_replayed", vring_bases=bases)


class VhostUserNetBackend(VhostUserFrontend):
    """virtio-net's data plane in a vhost-user back-end: the generic front-end with the
    virtio-net features pymvm passes through (the same set as vhost-net)."""

    device_name = "vhost-user-net"

    def __init__(self, socket_path: str | os.PathLike[str], mode: SocketMode = "client", *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        super().__init__(socket_path, mode, features_mask=GUEST_FEATURES,
                         protocol_features=WANTED_PROTOCOL_FEATURES | PF.RARP,
                         connect_timeout=connect_timeout, request_timeout=request_timeout)


class VhostUserBlkBackend(VhostUserFrontend):
    """virtio-blk's data plane in a vhost-user-blk back-end (pymvm's built-in one,
    qemu-storage-daemon, SPDK): its config space comes with GET_CONFIG, and in-flight
    requests are tracked in shared memory so that a restarted back-end finishes them."""

    device_name = "vhost-user-blk"

    def __init__(self, socket_path: str | os.PathLike[str], mode: SocketMode = "client", *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        from pymvm.devices.virtio.blk import PASSTHROUGH_FEATURES

        super().__init__(socket_path, mode,
                         features_mask=PASSTHROUGH_FEATURES | VIRTIO_F_VERSION_1,  # a mask here
                         protocol_features=WANTED_PROTOCOL_FEATURES | PF.INFLIGHT_SHMFD,
                         required_protocol_features=PF.CONFIG, inflight=True,
                         connect_timeout=connect_timeout, request_timeout=request_timeout)
