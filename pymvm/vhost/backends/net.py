"""The built-in vhost-user net back-end: virtqueues <-> a TAP with virtio-net headers.

Queue 0 is RX (TAP -> guest), queue 1 is TX (guest -> TAP) (virtio 1.2 §5.1.2). The TAP is
opened with IFF_VNET_HDR and the header size the guest negotiated, so the virtio_net_hdr
passes through untouched and checksum / segmentation offloads are the TAP's job: the guest
may send GSO frames of up to 64 KiB and receive them when it acked the GUEST_* offloads.

Batching: each wakeup (kick or TAP readable) processes everything available and signals the
call eventfd at most once. Back-pressure: when the guest has no RX buffers the packet just
read is kept, TAP reading stops, and the guest's next RX kick resumes it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections import deque

import structlog

from pymvm.devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    feature_mask,
)
from pymvm.devices.virtio.queue import DescriptorChain, VirtQueue
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
        self._scratch = bytearray(MAX_PACKET + 4096)
        self._scratch_view = memoryview(self._scratch)
        self._pending: int | None = None  # length of a packet read but not yet delivered
        self._spare: deque[DescriptorChain] = deque()  # RX chains popped, not yet used
        self._tap_reading = False
        self.stats = {"tx_packets": 0, "tx_dropped": 0, "rx_packets": 0, "rx_dropped": 0}

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
            queue = vring.queue
            # Hand back chains we held for a packet that never came (no used length).
            while self._spare:
                chain = self._spare.popleft()
                if queue is not None:
                    queue.add_used(chain.head, 0)
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
        self._spare.clear()

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
        moved = 0
        while moved < RX_BATCH:
            if self._pending is None:
                try:
                    self._pending = os.readv(self.tap_fd, [self._scratch])
                except BlockingIOError:
                    break
                except OSError as e:
                    log.warning("vhost_user_net.tap_read_failed", error=str(e))
                    break
                if self._pending < self.hdr_len:
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

    def _take_chain(self, queue: VirtQueue) -> DescriptorChain | None:
        if self._spare:
            return self._spare.popleft()
        while (chain := queue.pop_avail()) is not None:
            if chain.readable:
                queue.drop_chain(chain, "RX chain has device-readable buffers")
            elif chain.writable_len < self.hdr_len:
                queue.drop_chain(chain, f"RX buffer shorter than the {self.hdr_len}-byte header")
            else:
                return chain
        return None

    def _deliver(self, queue: VirtQueue, length: int) -> bool:
        """Copy the packet in scratch[:length] into guest buffers; False: not enough of them."""
        chains: list[DescriptorChain] = []
        room = 0
        while room < length:
            chain = self._take_chain(queue)
            if chain is None:
                self._spare.extendleft(reversed(chains))
                return False
            chains.append(chain)
            room += chain.writable_len
            if not self.mergeable:
                break
        if room < length:  # no MRG_RXBUF and the guest's buffer is too small: drop
            self._spare.appendleft(chains[0])
            self.stats["rx_dropped"] += 1
            return True
        if self.hdr_len == HDR_LEN:
            _NUM_BUFFERS.pack_into(self._scratch, 10, len(chains))
        src = self._scratch_view
        offset = 0
        for chain in chains:
            written = 0
            for seg in chain.writable:
                n = min(seg.nbytes, length - offset)
                seg[:n] = src[offset : offset + n]
                offset += n
                written += n
                if offset == length:
                    break
            queue.add_used(chain.head, written)
        self.stats["rx_packets"] += 1
        return True
