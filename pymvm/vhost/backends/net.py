"""The built-in vhost-user net back-end: virtqueues <-> a TAP with virtio-net headers.

Queue 0 is RX (TAP -> guest), queue 1 is TX (guest -> TAP) (virtio 1.2 §5.1.2). The TAP is
opened with IFF_VNET_HDR and the header size the guest negotiated, so the virtio_net_hdr
passes through untouched and checksum / segmentation offloads are the TAP's job: the guest
may send GSO frames of up to 64 KiB and receive them when it acked the GUEST_* offloads.

Batching: each wakeup (kick or TAP readable) processes everything available and signals the
call eventfd at most once. Back-pressure: when the guest has no RX buffers the packet just
read is kept, TAP reading stops, and the guest's next RX kick resumes it.

RX without a copy: with mergeable buffers a 64 KiB TSO packet fills 16-45 guest buffers, and
per-buffer Python work is what limits host->guest throughput. So RX buffers are popped in
batches (``VirtQueue.pop_writable``: one bounds check per single-descriptor chain) and
held; once they can take the largest packet, ``readv`` on the TAP writes straight into them,
and the buffers the packet filled go to the used ring in one slice store. With fewer
buffers than that (a small ring, a guest short of memory, or buffers so small that readv
would need more than IOV_MAX of them) the packet is read into a scratch buffer and copied,
as it is without MRG_RXBUF.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct

import structlog

from pymvm.devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    feature_mask,
)
from pymvm.devices.virtio.queue import VirtQueue
from pymvm.net.tap import Tap
from pymvm.vhost.kernel import TAP_OFFLOAD_FEATURES, VHOST_RING_FEATURES
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.backend import VhostUserDevice, Vring

log = structlog.get_logger()

RX_QUEUE = 0
TX_QUEUE = 1

#: VERSION_1, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC and the TAP's checksum/GSO offloads.
OFFERED_FEATURES = VHOST_RING_FEATURES | TAP_OFFLOAD_FEATURES
#: struct virtio_net_hdr (legacy, no MRG_RXBUF) and virtio_net_hdr_v1 / _mrg_rxbuf.
HDR_LEN_LEGACY = 10
HDR_LEN = 12
_NUM_BUFFERS = struct.Struct("<H")  # at offset 10 of the 12-byte header
#: Largest frame a TAP hands us: 64 KiB of GSO payload plus headers; generous on purpose.
MAX_PACKET = 65550 + HDR_LEN
#: Guest buffer bytes that, once held, let a TAP read go straight into them: the scratch
#: buffer's size, the most any read takes (a larger frame is lost either way).
RX_DIRECT_ROOM = MAX_PACKET + 4096
#: readv takes at most this many buffers (EINVAL beyond); a guest posting buffers so small
#: that more are needed gets the copy path.
IOV_MAX = os.sysconf("SC_IOV_MAX")
#: Packets moved per TAP wakeup before yielding to the loop (keeps TX kicks responsive).
RX_BATCH = 256
ETH_P_RARP = 0x8035


def rarp_frame(mac: bytes) -> bytes:
    """A gratuitous RARP announcing ``mac`` (what QEMU sends after migration), padded to 60."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP) + arp).ljust(60, b"\0")


class NetBackend(VhostUserDevice):
    """A virtio-net device whose packets go to and come from ``tap``."""

    num_queues = 2

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.tap_fd = tap.fd
        os.set_blocking(self.tap_fd, False)
        self.hdr_len = HDR_LEN
        self.mergeable = False
        self.rx: Vring | None = None
        self.tx: Vring | None = None
        self._scratch = bytearray(RX_DIRECT_ROOM)
        self._scratch_view = memoryview(self._scratch)
        self._pending: int | None = None  # length of a packet read but not yet delivered
        # RX buffers popped from the guest and not yet used, in ring order: their views,
        # flat [head, bytes, ...] pairs (VirtQueue.pop_writable), views per chain, bytes.
        self._rx_views: list[memoryview] = []
        self._rx_used: list[int] = []
        self._rx_nsegs: list[int] = []
        self._rx_room = 0
        self._tap_reading = False
        # rx_direct: packets the TAP wrote straight into guest buffers (of rx_packets).
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "rx_packets": 0, "rx_dropped": 0,
                      "rx_direct": 0}

    # -- VhostUserDevice ------------------------------------------------------------------

    def features(self) -> int:
        return OFFERED_FEATURES

    def set_features(self, acked: int) -> None:
        modern = acked & feature_mask(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_LEN if modern else HDR_LEN_LEGACY
        self.mergeable = bool(acked >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.tap.set_vnet_hdr_size(self.hdr_len)
        flags = self.tap.set_offload(acked)
        log.info("vhost_user_net.features", acked=hex(acked), hdr_len=self.hdr_len,
                 mergeable=self.mergeable, tap_offloads=hex(flags))

    def queue_started(self, vring: Vring) -> None:
        if vring.index == RX_QUEUE:
            self.rx = vring
            self._resume_tap()
        elif vring.index == TX_QUEUE:
            self.tx = vring

    def queue_stopped(self, vring: Vring) -> None:
        if vring is self.rx:
            self._pause_tap()
            self._return_held(vring.queue)
            self._pending = None
            self.rx = None
        elif vring is self.tx:
            self.tx = None

    def queue_kicked(self, vring: Vring) -> None:
        if vring is self.tx:
            self._process_tx()
        elif vring is self.rx:
            assert vring.queue is not None
            vring.queue.disable_notification()
            self._resume_tap()
            self._process_rx()

    def device_request(self, msg: m.Request) -> int:
        if isinstance(msg, m.SendRarp):
            self._write_tap([bytes(self.hdr_len), rarp_frame(bytes(msg.mac))])
            log.info("vhost_user_net.rarp_sent", mac=bytes(msg.mac).hex(":"))
            return 0
        if isinstance(msg, m.NetSetMtu):
            log.info("vhost_user_net.mtu", mtu=msg.mtu, tap=self.tap.name)
            return 0
        return super().device_request(msg)

    def reset(self) -> None:
        if self.rx is not None:
            self.queue_stopped(self.rx)
        self.tx = None
        self._pause_tap()
        self._pending = None
        self._return_held(None)

    # -- TX: guest -> TAP ------------------------------------------------------------------

    def _write_tap(self, buffers: list) -> bool:
        try:
            os.writev(self.tap_fd, buffers)
            return True
        except OSError as e:
            # EIO: TAP down; EINVAL: a header the TAP rejects (bad GSO from the guest);
            # EAGAIN: TAP queue full. All cost one packet, never the queue.
            self.stats["tx_dropped"] += 1
            if self.stats["tx_dropped"] & (self.stats["tx_dropped"] - 1) == 0:
                log.warning("vhost_user_net.tx_dropped", error=errno.errorcode.get(e.errno, str(e)),
                            dropped=self.stats["tx_dropped"])
            return False

    def _process_tx(self) -> None:
        vring = self.tx
        if vring is None or vring.queue is None:
            return
        queue: VirtQueue = vring.queue
        hdr_len = self.hdr_len
        sent = 0
        while True:
            queue.disable_notification()
            while (chain := queue.pop_avail()) is not None:
                if chain.writable:
                    queue.drop_chain(chain, "TX chain has device-writable buffers")
                    continue
                if chain.readable_len < hdr_len:
                    queue.drop_chain(chain, f"TX chain shorter than the {hdr_len}-byte header")
                    continue
                if self._write_tap(chain.readable):
                    sent += 1
                queue.add_used(chain.head, 0)
            if not queue.enable_notification():
                break
        self.stats["tx_packets"] += sent
        vring.signal_used()

    # -- RX: TAP -> guest ------------------------------------------------------------------

    def _resume_tap(self) -> None:
        if not self._tap_reading and self.rx is not None:
            asyncio.get_running_loop().add_reader(self.tap_fd, self._process_rx)
            self._tap_reading = True

    def _pause_tap(self) -> None:
        if self._tap_reading:
            self._tap_reading = False
            try:
                asyncio.get_running_loop().remove_reader(self.tap_fd)
            except RuntimeError:
                pass  # the loop is gone: nothing is watching the fd any more

    def _process_rx(self) -> None:
        vring = self.rx
        if vring is None or vring.queue is None:
            self._pause_tap()
            return
        queue = vring.queue
        hdr_len = self.hdr_len
        direct = self.mergeable
        moved = 0
        while moved < RX_BATCH:
            if self._pending is None:
                if direct and self._rx_room < RX_DIRECT_ROOM:
                    self._rx_room += queue.pop_writable(
                        self._rx_views, self._rx_used, self._rx_nsegs,
                        RX_DIRECT_ROOM - self._rx_room, hdr_len)
                if direct and self._rx_room >= RX_DIRECT_ROOM and len(self._rx_views) <= IOV_MAX:
                    # Enough guest buffers held for the largest packet: the TAP writes
                    # straight into them, no copy here.
                    length = self._read_tap(self._rx_views)
                    if length is None:
                        break
                    if length >= hdr_len:
                        self._complete(queue, length)
                        self.stats["rx_direct"] += 1
                        moved += 1
                    continue
                self._pending = self._read_tap([self._scratch])
                if self._pending is None:
                    break
                if self._pending < hdr_len:
                    self._pending = None
                    continue
            if not self._deliver(queue, self._pending):
                # No guest buffers: keep the packet, stop reading, wait for an RX kick.
                if queue.enable_notification():
                    continue
                self._pause_tap()
                break
            self._pending = None
            moved += 1
        vring.signal_used()

    def _read_tap(self, buffers: list) -> int | None:
        """One packet from the TAP into ``buffers``, its length; None: nothing to read now
        (or a failed read, logged)."""
        try:
            return os.readv(self.tap_fd, buffers)
        except BlockingIOError:
            return None
        except OSError as e:
            log.warning("vhost_user_net.tap_read_failed", error=str(e))
            return None

    def _deliver(self, queue: VirtQueue, length: int) -> bool:
        """Copy the packet in scratch[:length] into guest buffers; False: not enough of them."""
        if self.mergeable and self._rx_room < length or not self._rx_used:
            self._rx_room += queue.pop_writable(
                self._rx_views, self._rx_used, self._rx_nsegs,
                length - self._rx_room if self.mergeable else 1, self.hdr_len)
        if not self._rx_used or (self.mergeable and self._rx_room < length):
            return False
        if not self.mergeable and self._rx_used[1] < length:
            # Without MRG_RXBUF a packet must fit one chain: drop it, keep the buffer.
            self.stats["rx_dropped"] += 1
            return True
        _write_at(self._rx_views, 0, self._scratch_view[:length])
        self._complete(queue, length)
        return True

    def _complete(self, queue: VirtQueue, length: int) -> None:
        """The first held chains now hold a ``length``-byte packet: set its num_buffers and
        hand them to the guest."""
        used = self._rx_used
        nsegs = self._rx_nsegs
        chains = 0
        held = 0
        while held < length:
            held += used[2 * chains + 1]
            chains += 1
        entries = used[: 2 * chains]
        entries[-1] -= held - length  # the last buffer is filled only in part
        segs = chains if len(nsegs) == len(self._rx_views) else sum(nsegs[:chains])
        if self.hdr_len == HDR_LEN:
            first = self._rx_views[0]
            if first.nbytes >= HDR_LEN:
                _NUM_BUFFERS.pack_into(first, 10, chains)
            else:  # a header split over buffers (legal, if odd)
                _write_at(self._rx_views, 10, _NUM_BUFFERS.pack(chains))
        del self._rx_views[:segs]
        del used[: 2 * chains]
        del nsegs[:chains]
        self._rx_room -= held
        queue.add_used_batch(entries)
        self.stats["rx_packets"] += 1

    def _return_held(self, queue: VirtQueue | None) -> None:
        """Give back the buffers held for packets that never came, uncompleted: they are the
        last ones popped, in ring order, so the ring's next available entry moves back over
        them (GET_VRING_BASE then reports a position before them and the next back-end
        takes them again). Completing them with length 0 instead would count as receive
        errors in the guest."""
        if queue is not None and self._rx_used:
            chains = len(self._rx_used) // 2
            queue.set_last_avail(queue.last_avail_idx - chains)
        self._rx_views.clear()
        self._rx_used.clear()
        self._rx_nsegs.clear()
        self._rx_room = 0


def _write_at(views: list[memoryview], offset: int, data: bytes | memoryview) -> None:
    """Write ``data`` at byte ``offset`` of the buffers ``views`` (in order)."""
    for view in views:
        if offset < view.nbytes:
            n = min(len(data), view.nbytes - offset)
            view[offset : offset + n] = data[:n]
            data = data[n:]
            if not data:
                return
            offset = 0
        else:
            offset -= view.nbytes
