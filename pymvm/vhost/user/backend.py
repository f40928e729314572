"""The asyncio vhost-user back-end: a thin I/O layer over the sans-IO BackendConnection.

One :class:`VhostUserServer` serves one front-end at a time (listening on a UNIX socket, or
connecting to a front-end that listens). It maps the front-end's memory, keeps the vring
state of QEMU ``docs/interop/vhost-user.rst`` ("Ring states") and hands started rings to a
device-agnostic :class:`VhostUserDevice` (net today, blk later).

A front-end that breaks the protocol (``VhostUserRemoteError``) loses its connection only:
its rings stop, its memory is unmapped, its fds are closed, and the server accepts the next
front-end. Nothing the front-end (or the guest behind it) sends lets an exception escape to
the event loop.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import socket
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from pymvm.devices.virtio.queue import GuestMemoryMap, VirtQueue, VirtQueueError
from pymvm.devices.virtio.constants import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserError, VhostUserRemoteError
from pymvm.vhost.user.inflight import InflightQueue, queue_region_size
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import NEED_DATA, PEER_CLOSED, BackendConnection

log = structlog.get_logger()

#: One recvmsg: a whole header plus the largest payload, and up to 8 fds (spec: "Message
#: Specification" — VHOST_MEMORY_BASELINE_NREGIONS fds at most).
RECV_SIZE = m.HEADER_SIZE + m.MAX_PAYLOAD_SIZE
MAX_FDS = m.MAX_MEM_REGIONS
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: Memory slots we accept with CONFIGURE_MEM_SLOTS (the front-end may use fewer).
MAX_MEM_SLOTS = 32
#: Protocol features the framework itself implements, whatever the device.
FRAMEWORK_PROTOCOL_FEATURES = PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS


class VhostUserBackendError(VhostUserError):
    """The back-end server could not start (socket path in use, cannot bind or connect)."""


# ---------------------------------------------------------------------------------------------
# Device interface


class VhostUserDevice(ABC):
    """What a vhost-user device (net, blk...) implements; the server does the protocol."""

    #: Number of virtqueues the device has (GET_QUEUE_NUM answers this over MQ).
    num_queues: int = 1
    #: Device-specific protocol features on top of FRAMEWORK_PROTOCOL_FEATURES.
    protocol_features: PF = PF(0)

    @abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES is added for you)."""

    def set_features(self, acked: int) -> None:
        """The front-end acked ``acked`` (SET_FEATURES); configure the device's data path."""

    @abstractmethod
    def queue_started(self, vring: Vring) -> None:
        """``vring.queue`` is live (started and enabled, memory mapped); process it."""

    @abstractmethod
    def queue_stopped(self, vring: Vring) -> None:
        """``vring.queue`` is about to be released; drop every reference to guest buffers."""

    @abstractmethod
    def queue_kicked(self, vring: Vring) -> None:
        """The driver kicked ``vring``: new buffers are available."""

    def config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device's config space at ``offset`` (GET_CONFIG); b"" fails
        the request (devices with PF.CONFIG in ``protocol_features`` override this)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> int:
        """SET_CONFIG; a REPLY_ACK status (non-zero: refused)."""
        return 1

    def device_request(self, msg: m.Request) -> int:
        """A device-class request (SEND_RARP, NET_SET_MTU...); return a REPLY_ACK status."""
        log.info("vhost_user.device_request_ignored", request=msg.REQUEST.name)
        return 0

    def reset(self) -> None:
        """The front-end went away or reset the device: forget negotiated state."""


# ---------------------------------------------------------------------------------------------
# Per-connection state


@dataclass(eq=False)
class _Region:
    region: m.MemoryRegion
    map: mmap.mmap
    view: memoryview

    def contains_uva(self, uva: int) -> bool:
        r = self.region
        return r.userspace_addr <= uva < r.userspace_addr + r.memory_size

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # A view of guest memory is still referenced somewhere; the mapping goes away
            # when the garbage collector drops it. Memory stays valid until then.
            log.warning("vhost_user.unmap_deferred", gpa=hex(self.region.guest_phys_addr))


def _guard_against_shrink(region: m.MemoryRegion, fd: int, length: int,
                          allow_unsealed: bool) -> None:
    """Make sure the front-end cannot take the region's pages away under us.

    A mapped file that shrinks turns every access past its new end into SIGBUS, which
    Python cannot survive: one ``ftruncate`` by the front-end would kill the back-end. So a
    region's fd must be a memfd sealed with F_SEAL_SHRINK (QEMU's memory-backend-memfd and
    pymvm seal theirs). A memfd that still allows sealing is sealed here; one that cannot be
    sealed (created without MFD_ALLOW_SEALING, as DPDK's) or an fd that is no memfd
    (hugetlbfs or tmpfs files) is refused unless the back-end was started with
    ``allow_unsealed`` (the operator trusts the front-end). The fd must also cover the whole
    region: a mapping past the end of the file faults the same way.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None  # not a memfd: no seals at all
    if seals is not None and not seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            seals |= fcntl.F_SEAL_SHRINK
    where = (f"memory region gpa={region.guest_phys_addr:#x} size={region.memory_size:#x}")
    if not (seals is not None and seals & fcntl.F_SEAL_SHRINK) and not allow_unsealed:
        what = "not a memfd" if seals is None else "a memfd that cannot be sealed"
        raise VhostUserRemoteError(
            f"{where}: its fd is {what}, so the front-end could shrink it and crash the "
            f"back-end; pass a memfd with F_SEAL_SHRINK (or MFD_ALLOW_SEALING), or start the "
            f"back-end with --allow-unsealed-memory if the front-end is trusted"
        )
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise VhostUserRemoteError(f"{where}: cannot stat its fd: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < length:
        raise VhostUserRemoteError(
            f"{where}: needs {length:#x} bytes of its fd (mmap_offset + size), "
            f"the file has {st.st_size:#x}"
        )


def _map_region(region: m.MemoryRegion, fd: int, allow_unsealed: bool = False) -> _Region:
    """mmap ``mmap_offset + memory_size`` bytes of ``fd`` shared (as libvhost-user does: the
    offset need not be page aligned) and view the region's part of it."""
    try:
        if region.memory_size == 0:
            raise VhostUserRemoteError("memory region of size 0")
        length = region.mmap_offset + region.memory_size
        _guard_against_shrink(region, fd, length, allow_unsealed)
        mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as e:
        raise VhostUserRemoteError(
            f"cannot mmap memory region gpa={region.guest_phys_addr:#x} "
            f"size={region.memory_size:#x} offset={region.mmap_offset:#x}: {e}"
        ) from None
    view = memoryview(mapping)[region.mmap_offset :]
    return _Region(region, mapping, view)


@dataclass(eq=False)
class Vring:
    """One vring's state as the front-end configured it, and its live queue when running."""

    index: int
    num: int = 0
    addr: m.SetVringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    #: SET_VRING_KICK arrived since the last GET_VRING_BASE ("started", spec "Ring states").
    started: bool = False
    enabled: bool = False
    queue: VirtQueue | None = None
    #: This ring's inflight record (INFLIGHT_SHMFD), and the heads a dead back-end left
    #: unfinished, for the device to run again before popping new ones.
    inflight: InflightQueue | None = None
    resubmit: tuple[int, ...] = ()
    _err_reported: bool = False
    #: Held while the call and error fds change: a device that returns buffers and signals
    #: from its own threads (blk's workers) holds it around put_used/signal_used, so that it
    #: never writes to an fd number the server just closed (and something else reused).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def pop(self):
        """The next available chain (``VirtQueue.pop_avail``), recorded as in flight."""
        queue = self.queue
        if queue is None:
            return None
        chain = queue.pop_avail()
        inflight = self.inflight
        if inflight is not None:
            if chain is not None:
                inflight.fetched(chain.head)
            if queue.dropped_chains:  # malformed chains went straight to the used ring
                inflight.sync_used_idx(queue.next_used_idx)
        return chain

    def put_used(self, head: int, length: int) -> None:
        """Return ``head`` to the driver, in the order the inflight record needs."""
        queue = self.queue
        if queue is None:
            return
        inflight = self.inflight
        if inflight is None:
            queue.add_used(head, length)
            return
        inflight.begin_used(head)
        queue.add_used(head, length)
        inflight.end_used(head, queue.next_used_idx)

    def signal_used(self) -> None:
        """Notify the driver of used buffers, once per batch, if it wants to be told."""
        queue = self.queue
        if queue is None:
            return
        if queue.needs_notification() and self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError as e:
                log.warning("vhost_user.call_failed", vring=self.index, error=str(e))
        if queue.broken is not None:
            self.report_error()

    def report_error(self) -> None:
        """Signal the error eventfd once for a broken ring (the front-end sets NEEDS_RESET)."""
        if self._err_reported:
            return
        self._err_reported = True
        if self.err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.err_fd, 1)

    def _close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            with self.lock:
                fd = getattr(self, name)
                setattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _replace_fd(self, name: str, fd: int | None) -> None:
        """Install ``fd`` as the call or error fd (see ``lock``) and close the old one."""
        with self.lock:
            old = getattr(self, name)
            setattr(self, name, fd)
        if old is not None:
            os.close(old)


def _recv_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_message_fds(msg: m.Message) -> None:
    fds: list[int] = []
    for name in ("fd", "fds"):
        value = getattr(msg, name, None)
        if isinstance(value, int):
            fds.append(value)
        elif isinstance(value, tuple):
            fds.extend(value)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Session:
    """One front-end connection: protocol state, mapped memory, vrings."""

    def __init__(self, sock: socket.socket, device: VhostUserDevice,
                 loop: asyncio.AbstractEventLoop, *, allow_unsealed_memory: bool = False) -> None:
        self.sock = sock
        self.device = device
        self.loop = loop
        self.allow_unsealed_memory = allow_unsealed_memory
        self.conn = BackendConnection()
        self.regions: list[_Region] = []
        self.memory: GuestMemoryMap | None = None
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.acked_features = 0
        #: The inflight region (GET/SET_INFLIGHT_FD): mapping, its view from mmap_offset,
        #: queue count and queue size.
        self.inflight: tuple[mmap.mmap, memoryview, int, int] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.log = log.bind(peer=sock.fileno())
        self._handlers: dict[type[m.Message], Callable[[m.Request], m.Reply | int | None]] = {
            m.GetFeatures: self._get_features,
            m.SetFeatures: self._set_features,
            m.GetProtocolFeatures: self._get_protocol_features,
            m.SetProtocolFeatures: lambda msg: None,  # recorded by BackendConnection
            m.SetOwner: lambda msg: None,
            m.ResetOwner: self._reset_owner,
            m.GetQueueNum: lambda msg: m.QueueNumReply(num_queues=self.device.num_queues),
            m.GetMaxMemSlots: lambda msg: m.MaxMemSlotsReply(slots=MAX_MEM_SLOTS),
            m.SetMemTable: self._set_mem_table,
            m.AddMemReg: self._add_mem_reg,
            m.RemMemReg: self._rem_mem_reg,
            m.SetVringNum: self._set_vring_num,
            m.SetVringAddr: self._set_vring_addr,
            m.SetVringBase: self._set_vring_base,
            m.GetVringBase: self._get_vring_base,
            m.SetVringKick: self._set_vring_kick,
            m.SetVringCall: self._set_vring_call,
            m.SetVringErr: self._set_vring_err,
            m.SetVringEnable: self._set_vring_enable,
            m.GetConfig: self._get_config,
            m.SetConfig: lambda msg: self.device.set_config(msg.offset, msg.data),
            m.GetInflightFd: self._get_inflight_fd,
            m.SetInflightFd: self._set_inflight_fd,
            m.SendRarp: self.device.device_request,
            m.NetSetMtu: self.device.device_request,
        }
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    # -- socket I/O -----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            while not self.closed.done():
                try:
                    data, ancdata, flags, _ = self.sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionResetError:
                    data, ancdata, flags = b"", [], 0
                fds = _recv_fds(ancdata)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise VhostUserRemoteError(
                        f"message carried more than {MAX_FDS} fds (ancillary data truncated)"
                    )
                self.conn.receive_data(data, fds)
                self._drain()
                if not data:
                    return
        except VhostUserRemoteError as e:
            self.close(f"protocol error: {e}")
        except Exception as e:  # a bug here must cost one connection, not the server
            self.log.exception("vhost_user.session_failed")
            self.close(f"internal error: {e!r}")

    def _drain(self) -> None:
        while not self.closed.done():
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if event is PEER_CLOSED:
                self.close("front-end closed the connection")
                return
            assert isinstance(event, m.Request)
            self._handle(event)

    def _send(self, reply: m.Reply) -> None:
        data, fds = self.conn.send(reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], anc)
        except OSError as e:
            raise VhostUserRemoteError(f"cannot send {reply.wire_request().name} reply: {e}") from None
        if sent != len(data):
            raise VhostUserRemoteError("front-end does not read its replies (socket buffer full)")

    def _handle(self, msg: m.Request) -> None:
        handler = self._handlers.get(type(msg))
        self.log.debug("vhost_user.request", request=msg.REQUEST.name)
        if handler is None:
            _close_message_fds(msg)
            self.log.warning("vhost_user.unsupported_request", request=msg.REQUEST.name)
            result: m.Reply | int | None = 1
        else:
            result = handler(msg)
        if isinstance(result, m.Reply):
            self._send(result)
        elif self.conn.reply_owed == msg.REQUEST:
            self._send(m.Ack(request=m.FrontendRequest(msg.REQUEST), status=result or 0))

    def close(self, reason: str) -> None:
        """Stop the rings, unmap memory, close every fd; idempotent."""
        if self.closed.done():
            return
        self.log.info("vhost_user.disconnected", reason=reason)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        for vring in self.vrings:
            self._stop(vring)
            vring._close_fds()
        with contextlib.suppress(Exception):
            self.device.reset()
        self._unmap()
        self._unmap_inflight()
        self.conn.close()
        self.sock.close()
        self.closed.set_result(None)  # the reason is logged above

    # -- rings ----------------------------------------------------------------------------

    def _vring(self, index: int, fd: int | None = None) -> Vring:
        """The vring at ``index``; a bad index closes ``fd`` (the message's, now ours)."""
        if not 0 <= index < len(self.vrings):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise VhostUserRemoteError(
                f"vring index {index} out of range: this device has {len(self.vrings)} queues"
            )
        return self.vrings[index]

    def _uva_to_gpa(self, uva: int, what: str) -> int:
        for r in self.regions:
            if r.contains_uva(uva):
                return r.region.guest_phys_addr + (uva - r.region.userspace_addr)
        raise VhostUserRemoteError(f"{what} address {uva:#x} is in no memory region")

    def _maybe_start(self, vring: Vring) -> None:
        if vring.queue is not None or not (vring.started and vring.enabled):
            return
        if vring.addr is None or self.memory is None or vring.num == 0:
            return
        addr = vring.addr
        inflight = self._inflight_queue(vring)
        try:
            queue = VirtQueue(
                self.memory, vring.num,
                self._uva_to_gpa(addr.desc_user_addr, "descriptor table"),
                self._uva_to_gpa(addr.avail_user_addr, "available ring"),
                self._uva_to_gpa(addr.used_user_addr, "used ring"),
                event_idx=bool(self.acked_features >> VIRTIO_RING_F_EVENT_IDX & 1),
                indirect=bool(self.acked_features >> VIRTIO_RING_F_INDIRECT_DESC & 1),
                next_avail=vring.base,
                name=f"vring{vring.index}",
            )
        except VirtQueueError as e:
            raise VhostUserRemoteError(str(e)) from None
        if vring.kick_fd is not None:
            try:
                self.loop.add_reader(vring.kick_fd, self._on_kick, vring)
            except (OSError, ValueError) as e:  # a regular file or /dev/null: epoll says EPERM
                queue.release()
                raise VhostUserRemoteError(
                    f"kick fd of vring {vring.index} cannot be polled ({e}); send an eventfd"
                ) from None
        vring.inflight, vring.resubmit = inflight, ()
        if inflight is not None:
            # A restarted back-end: resubmit what the last one took and never returned, and
            # pop from where it stopped (spec "Inflight I/O tracking").
            recovery = inflight.recover(queue.next_used_idx)
            vring.resubmit = recovery.heads
            queue.set_last_avail(recovery.next_avail)
        vring.queue = queue
        vring._err_reported = False
        self.log.info("vhost_user.vring_started", vring=vring.index, size=vring.num,
                      base=vring.base, used=queue.next_used_idx, resubmit=len(vring.resubmit))
        self.device.queue_started(vring)
        # Buffers made available before the kick fd existed would otherwise wait forever.
        if vring.queue is not None and queue.has_avail():
            self.device.queue_kicked(vring)

    def _stop(self, vring: Vring) -> None:
        queue = vring.queue
        if queue is None:
            return
        if vring.kick_fd is not None:
            self.loop.remove_reader(vring.kick_fd)
        try:
            self.device.queue_stopped(vring)
        except Exception:
            self.log.exception("vhost_user.device_stop_failed", vring=vring.index)
        vring.base = queue.last_avail_idx
        vring.queue = None
        vring.inflight, vring.resubmit = None, ()
        queue.release()
        self.log.info("vhost_user.vring_stopped", vring=vring.index, base=vring.base)

    def _on_kick(self, vring: Vring) -> None:
        fd = vring.kick_fd
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as e:
            self.log.warning("vhost_user.kick_read_failed", vring=vring.index, error=str(e))
            self.loop.remove_reader(fd)
            return
        if vring.queue is None:
            return
        try:
            self.device.queue_kicked(vring)
        except Exception:
            self.log.exception("vhost_user.kick_failed", vring=vring.index)
            if vring.queue is not None:
                vring.queue.broken = vring.queue.broken or "device failed processing the ring"
            vring.report_error()

    def _restart_all(self, change: Callable[[], None]) -> None:
        """Stop the live rings, apply a memory change, start them again (same indices)."""
        live = [v for v in self.vrings if v.queue is not None]
        for vring in live:
            self._stop(vring)
        change()
        for vring in live:
            self._maybe_start(vring)

    # -- memory ---------------------------------------------------------------------------

    def _unmap(self) -> None:
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        for r in self.regions:
            r.close()
        self.regions = []

    def _rebuild_memory(self, regions: list[_Region]) -> None:
        try:
            memory = GuestMemoryMap((r.region.guest_phys_addr, r.view) for r in regions)
        except VirtQueueError as e:
            for r in regions:
                r.close()
            raise VhostUserRemoteError(f"bad memory table: {e}") from None
        old = self.regions
        if self.memory is not None:
            self.memory.release()
        self.regions, self.memory = regions, memory
        for r in old:
            if r not in regions:
                r.close()

    def _map_all(self, regions: tuple[m.MemoryRegion, ...], fds: tuple[int, ...]) -> list[_Region]:
        mapped: list[_Region] = []
        try:
            for region, fd in zip(regions, fds):  # as many: the messages' parsing checks
                mapped.append(_map_region(region, fd, self.allow_unsealed_memory))
        except BaseException:
            for r in mapped:
                r.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return mapped

    def _set_mem_table(self, msg: m.SetMemTable) -> None:
        mapped = self._map_all(msg.regions, msg.fds)
        self._restart_all(lambda: self._rebuild_memory(mapped))
        self.log.info("vhost_user.mem_table", regions=[
            (hex(r.guest_phys_addr), hex(r.memory_size)) for r in msg.regions])

    def _add_mem_reg(self, msg: m.AddMemReg) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            os.close(msg.fd)
            raise VhostUserRemoteError(f"ADD_MEM_REG beyond the {MAX_MEM_SLOTS} slots we offered")
        (new,) = self._map_all((msg.region,), (msg.fd,))
        self._restart_all(lambda: self._rebuild_memory([*self.regions, new]))

    def _rem_mem_reg(self, msg: m.RemMemReg) -> None:
        want = msg.region
        keep = [r for r in self.regions if not (
            r.region.guest_phys_addr == want.guest_phys_addr
            and r.region.memory_size == want.memory_size
            and r.region.userspace_addr == want.userspace_addr)]
        if len(keep) == len(self.regions):
            raise VhostUserRemoteError(f"REM_MEM_REG of unknown region at {want.guest_phys_addr:#x}")
        self._restart_all(lambda: self._rebuild_memory(keep))

    # -- handlers -------------------------------------------------------------------------

    def _get_features(self, msg: m.Request) -> m.Reply:
        return m.FeaturesReply(features=self.device.features() | m.PROTOCOL_FEATURES_FLAG)

    def _set_features(self, msg: m.SetFeatures) -> None:
        self.acked_features = msg.features
        self.device.set_features(msg.features)
        for vring in self.vrings:
            if vring.queue is not None:  # EVENT_IDX/INDIRECT may have changed
                vring.queue.event_idx = bool(msg.features >> VIRTIO_RING_F_EVENT_IDX & 1)
                vring.queue.indirect = bool(msg.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)

    def _get_protocol_features(self, msg: m.Request) -> m.Reply:
        features = FRAMEWORK_PROTOCOL_FEATURES | self.device.protocol_features
        if self.device.num_queues > 2:
            features |= PF.MQ
        return m.ProtocolFeaturesReply(features=int(features))

    def _get_config(self, msg: m.GetConfig) -> m.Reply:
        data = self.device.config(msg.offset, msg.size) if msg.size else b""
        if len(data) != msg.size:
            data = b""  # spec: a zero-length payload tells the front-end it failed
        return m.ConfigReply(offset=msg.offset, data=data, flags=msg.flags)

    # -- inflight I/O tracking (INFLIGHT_SHMFD) --------------------------------------------

    def _inflight_queue(self, vring: Vring) -> InflightQueue | None:
        if self.inflight is None:
            return None
        _, view, num_queues, queue_size = self.inflight
        if vring.index >= num_queues or vring.num != queue_size:
            self.log.warning("vhost_user.inflight_unusable", vring=vring.index, size=vring.num,
                             inflight_queues=num_queues, inflight_queue_size=queue_size)
            return None
        size = queue_region_size(queue_size)
        return InflightQueue(view[vring.index * size : (vring.index + 1) * size], queue_size)

    def _unmap_inflight(self) -> None:
        if self.inflight is not None:
            mapping, view, _, _ = self.inflight
            self.inflight = None
            view.release()
            with contextlib.suppress(BufferError):  # a queue still holds a view: freed with it
                mapping.close()

    def _get_inflight_fd(self, msg: m.GetInflightFd) -> m.Reply:
        if not (1 <= msg.num_queues <= len(self.vrings) and 1 <= msg.queue_size <= 32768):
            raise VhostUserRemoteError(
                f"GET_INFLIGHT_FD for {msg.num_queues} queues of {msg.queue_size}: this device "
                f"has {len(self.vrings)} queues of at most 32768 entries")
        size = msg.num_queues * queue_region_size(msg.queue_size)
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Sealed before the front-end sees it: nobody can shrink it under our mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self._unmap_inflight()
        self.inflight = (mapping, memoryview(mapping), msg.num_queues, msg.queue_size)
        region = queue_region_size(msg.queue_size)
        for index in range(msg.num_queues):  # every queue starts "nothing in flight"
            InflightQueue(self.inflight[1][index * region : (index + 1) * region],
                          msg.queue_size).recover(0)
        self.log.info("vhost_user.inflight_created", queues=msg.num_queues,
                      queue_size=msg.queue_size, size=size)
        reply = m.InflightFdReply(mmap_size=size, mmap_offset=0, num_queues=msg.num_queues,
                                  queue_size=msg.queue_size, fd=fd)
        try:
            self._send(reply)
        finally:
            os.close(fd)  # the front-end has its copy; our mapping stays
        return None  # type: ignore[return-value]

    def _set_inflight_fd(self, msg: m.SetInflightFd) -> None:
        fd = msg.fd
        try:
            if not (1 <= msg.num_queues <= len(self.vrings) and 1 <= msg.queue_size <= 32768):
                raise VhostUserRemoteError(
                    f"SET_INFLIGHT_FD for {msg.num_queues} queues of {msg.queue_size}: this "
                    f"device has {len(self.vrings)} queues of at most 32768 entries")
            need = msg.num_queues * queue_region_size(msg.queue_size)
            if msg.mmap_size < need:
                raise VhostUserRemoteError(
                    f"SET_INFLIGHT_FD region of {msg.mmap_size} bytes; {msg.num_queues} queues "
                    f"of {msg.queue_size} need {need}")
            region = m.MemoryRegion(0, msg.mmap_size, 0, msg.mmap_offset)
            mapped = _map_region(region, fd, self.allow_unsealed_memory)
        finally:
            os.close(fd)
        self._unmap_inflight()
        self.inflight = (mapped.map, mapped.view, msg.num_queues, msg.queue_size)
        self.log.info("vhost_user.inflight_set", queues=msg.num_queues, queue_size=msg.queue_size)

    def _reset_owner(self, msg: m.Request) -> None:
        for vring in self.vrings:
            self._stop(vring)
            vring._close_fds()
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.acked_features = 0
        self.device.reset()

    def _set_vring_num(self, msg: m.SetVringNum) -> None:
        vring = self._vring(msg.index)
        vring.num = msg.num
        if vring.queue is not None:
            self._stop(vring)
            self._maybe_start(vring)

    def _set_vring_addr(self, msg: m.SetVringAddr) -> None:
        vring = self._vring(msg.index)
        vring.addr = msg
        if vring.queue is not None:
            self._stop(vring)
            self._maybe_start(vring)

    def _set_vring_base(self, msg: m.SetVringBase) -> None:
        vring = self._vring(msg.index)
        if msg.num > 0xFFFF:
            raise VhostUserRemoteError(f"SET_VRING_BASE {msg.num:#x} does not fit a split ring's u16")
        vring.base = msg.num

    def _get_vring_base(self, msg: m.GetVringBase) -> m.Reply:
        vring = self._vring(msg.index)
        self._stop(vring)
        vring.started = False
        # The ring is stopped: its kick fd is no longer ours to watch (spec "Ring states").
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
            vring.kick_fd = None
        return m.VringBaseReply(index=msg.index, num=vring.base)

    def _set_vring_kick(self, msg: m.SetVringKick) -> None:
        vring = self._vring(msg.index, msg.fd)
        self._stop(vring)
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
        vring.kick_fd = msg.fd
        if msg.fd is None:
            self.log.warning("vhost_user.kick_polling_unsupported", vring=msg.index,
                             hint="the ring is only processed on the call of SET_VRING_KICK")
        vring.started = True
        if not self.acked_features & m.PROTOCOL_FEATURES_FLAG:
            vring.enabled = True  # spec: without protocol features rings start enabled
        self._maybe_start(vring)

    def _set_vring_call(self, msg: m.SetVringCall) -> None:
        self._vring(msg.index, msg.fd)._replace_fd("call_fd", msg.fd)

    def _set_vring_err(self, msg: m.SetVringErr) -> None:
        self._vring(msg.index, msg.fd)._replace_fd("err_fd", msg.fd)

    def _set_vring_enable(self, msg: m.SetVringEnable) -> None:
        vring = self._vring(msg.index)
        vring.enabled = msg.enable
        if msg.enable:
            self._maybe_start(vring)
        else:
            self._stop(vring)


# ---------------------------------------------------------------------------------------------
# Server


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket file; refuse a live one or anything that is not a socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VhostUserBackendError(f"{path} exists and is not a socket: choose another --socket path")
    probe = socket.socket(socket.AF_UNIX)  # a stream socket (the default)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a process that died
        return
    finally:
        probe.close()
    raise VhostUserBackendError(f"{path} is in use by another back-end: stop it or choose another path")


class VhostUserServer:
    """Serves ``device`` to one front-end at a time over the UNIX socket ``path``.

    ``client=True``: connect to a front-end listening at ``path`` (QEMU ``server=on``) and
    reconnect when it goes away; otherwise listen there and accept front-ends in turn.
    """

    def __init__(self, path: str, device: VhostUserDevice, *, client: bool = False,
                 reconnect_delay: float = 1.0, allow_unsealed_memory: bool = False,
                 listener: socket.socket | None = None) -> None:
        self.path = path
        self.device = device
        self.allow_unsealed_memory = allow_unsealed_memory
        self.client = client
        self.reconnect_delay = reconnect_delay
        #: A listening socket made (and bound) by whoever started us, or None to bind ``path``.
        self._listener: socket.socket | None = listener
        self._listening = listener is not None  # a listener we are given already listens
        if listener is not None:
            listener.setblocking(False)
        self.session: _Session | None = None
        self.sessions_served = 0

    def bind(self) -> None:
        """Create the socket file now (while this process may still write where it goes),
        without accepting yet: a front-end that connects before :meth:`listen` is refused
        (and retries) instead of waiting on a request nobody reads."""
        if self.client or self._listener is not None:
            return
        _prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX)  # a stream socket, close-on-exec (the defaults)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise VhostUserBackendError(f"cannot listen on {self.path}: {e.strerror}") from None
        sock.setblocking(False)
        self._listener = sock
        self._listening = False

    def listen(self) -> None:
        """Accept connections from now on (binding first if :meth:`bind` was not called), so
        callers can connect as soon as this returns."""
        self.bind()
        if self.client or self._listening:
            return
        assert self._listener is not None
        try:
            self._listener.listen(4)
        except OSError as e:
            raise VhostUserBackendError(f"cannot listen on {self.path}: {e.strerror}") from None
        self._listening = True
        log.info("vhost_user.listening", socket=self.path)

    async def _accept(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self.client:
            while True:
                sock = socket.socket(socket.AF_UNIX)  # stream, close-on-exec: the defaults
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, self.path)
                    log.info("vhost_user.connected", socket=self.path)
                    return sock
                except OSError as e:
                    sock.close()
                    if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                        raise VhostUserBackendError(f"cannot connect to {self.path}: {e.strerror}") from None
                    await asyncio.sleep(self.reconnect_delay)
        self.listen()
        assert self._listener is not None
        sock, _ = await loop.sock_accept(self._listener)
        log.info("vhost_user.accepted", socket=self.path)
        return sock

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                sock = await self._accept()
                self.session = _Session(sock, self.device, loop,
                                        allow_unsealed_memory=self.allow_unsealed_memory)
                self.sessions_served += 1
                try:
                    await asyncio.shield(self.session.closed)
                finally:
                    self.session.close("back-end shutting down")
                    self.session = None
                if self.client:
                    await asyncio.sleep(self.reconnect_delay)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the current front-end and stop listening; removes the socket file we made."""
        if self.session is not None:
            self.session.close("back-end shutting down")
            self.session = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):  # gone, or not ours to remove after a privilege drop
                os.unlink(self.path)
            log.info("vhost_user.stopped_listening", socket=self.path)
