"""The built-in vhost-user-blk back-end: virtio-blk requests (virtio 1.2 §5.2.6) on a raw image.

Every chain is hostile until checked (:func:`parse_request`): a header shorter than 16 bytes,
no device-writable byte for the status, data in the wrong direction, a length that is not a
whole number of sectors, a sector range past the capacity or a discard/write-zeroes range
that overflows it is answered VIRTIO_BLK_S_IOERR (or UNSUPP for what the device does not do)
without touching the image; a chain with nowhere to put a status byte is handed back unused.
Guest buffers are the virtqueue's bounds-checked views, so no request reaches outside guest
memory, and the sector check keeps every access inside the image.

Several requests run at once, off the event loop: the loop parses chains and hands the
checked requests to a thread pool, in a few batches per kick, whose workers move data
straight between the image and the guest's buffers with ``os.preadv``/``os.pwritev`` (the
GIL is released in the syscall), write the status bytes, and return the batch to the used
ring and signal the guest once themselves, under the ring's lock (``Vring.lock``), without
waking the loop: a thread switch fewer per batch. A
read (or write) that the page cache can serve without blocking is done on the loop at once
with ``RWF_NOWAIT`` (measured: the hand-off to a thread and back costs more than the copy);
the kernel answers EAGAIN for anything that would block, and that request goes to a worker. FLUSH is ``fdatasync``; DISCARD punches a hole
and WRITE_ZEROES zeroes a range (``fallocate``).

A large read or write as Linux lays it out (an indirect table: header, up to SEG_MAX data
segments, status) is read from the table in bulk (``VirtQueue.bulk_indirect``,
:class:`~pymvm.devices.virtio.queue.BulkChain`: one copy of the table, checked and used) and
its segments go to ``preadv2``/``pwritev2`` as one iovec array made from that copy with a few
big-integer operations (:func:`iovecs`): no Python object or step per 4 KiB segment, which
was most of the cost of a 1 MiB request. Anything else takes the buffer-by-buffer path
(``parse_request``).

With INFLIGHT_SHMFD the framework records each request from fetch to completion in the
front-end's shared memory, so a back-end restarted after a crash resubmits what its
predecessor left unfinished (``Vring.resubmit``): writes are idempotent, so running one twice
is harmless, and the guest sees no error.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import queue as queues
import struct
import threading
from dataclasses import dataclass, field

import structlog

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    feature_mask,
)
from pymvm.devices.virtio.queue import BulkChain, DescriptorChain, VirtQueue
from pymvm.vhost.user.backend import VhostUserDevice, Vring
from pymvm.vhost.user.messages import ProtocolFeature as PF

log = structlog.get_logger()

SECTOR = b.SECTOR_SIZE
#: Segments per request the guest may use (virtio-blk seg_max); Linux adds header + status.
#: 510: pymvm's front-end then offers a 512-entry queue (``queue_size_for``, no chain may be
#: longer than its queue), and Linux sends 1 MiB of scattered 4 KiB pages as one request,
#: not two (254 + 2): half the chains, kicks, hand-offs and interrupts per MiB.
SEG_MAX = 510
#: Indirect tables of at least this many entries (large requests) are read in bulk: measured,
#: a 3-entry 4 KiB request costs 3.7 us walked and 6.5 us in bulk, 254 segments 99 and 60 us
#: (the preadv of an iovec array then saves more: no buffer object per segment).
BULK_MIN_DESCS = 16
#: Most sectors one DISCARD / WRITE_ZEROES segment may cover (4 GiB - 512).
MAX_DISCARD_SECTORS = 0x7FFFFF
DISCARD_ALIGNMENT_SECTORS = 8  # 4 KiB: what a host file system can punch
IOV_MAX = os.sysconf("SC_IOV_MAX")
DEFAULT_WORKERS = 16
#: The requests of one kick go to at most this many workers, in equal batches: a batch costs
#: one hand-off to a thread and one wake-up of the loop, whatever its size, so a busy queue
#: pays far less per request than one future each, and still runs requests in parallel.
PARALLEL_BATCHES = 4

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# preadv2/pwritev2 on a ready-made struct iovec array (a BulkChain's buffers): ctypes releases
# the GIL for the call, like os.preadv, without a buffer object per segment.
_IOV_ARGS = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
_preadv2 = _libc.preadv2
_pwritev2 = _libc.pwritev2
for _call in (_preadv2, _pwritev2):
    _call.argtypes = _IOV_ARGS
    _call.restype = ctypes.c_ssize_t


def _iov_transfer(call, fd: int, iov: bytes, offset: int, flags: int = 0) -> int:
    """One preadv2/pwritev2 of the struct iovec array ``iov``; bytes moved."""
    n = call(fd, iov, len(iov) // 16, offset, flags)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n


@functools.lru_cache(maxsize=32)
def _iov_lanes(count: int, to_host: int) -> tuple[int, int]:
    """For ``count`` descriptors as one little-endian integer (16 bytes each: address, then
    length | flags << 32 | next << 48): the mask that keeps address and length, and what
    turns each guest address into a host one (``to_host`` added in every address lane)."""
    mask = int.from_bytes(struct.pack("<QQ", 2**64 - 1, 2**32 - 1) * count, "little")
    lanes = int.from_bytes(struct.pack("<QQ", 1, 0) * count, "little")
    return mask, lanes * to_host


def iovecs(table: bytes, first: int, stop: int, to_host: int) -> bytes:
    """The struct iovec array of descriptors ``first`` to ``stop`` of an indirect table
    (``BulkChain.table``), each guest address plus ``to_host``: a few big-integer operations
    instead of a Python step per segment. Every address lane stays below 2**64 and at or
    above 0 (so no lane carries or borrows into the next) because each buffer was checked
    to lie inside the memory region whose host view starts ``to_host`` above its guest
    address; the caller passes only such tables."""
    count = stop - first
    mask, add = _iov_lanes(count, to_host)
    lanes = int.from_bytes(table[16 * first : 16 * stop], "little")
    return ((lanes & mask) + add).to_bytes(16 * count, "little")


@dataclass(slots=True, eq=False)
class BlkRequest:
    """One checked request: what a worker needs, and where its completion goes."""

    head: int
    type: int
    sector: int
    #: Guest buffers: IN writes into them, OUT reads from them; DISCARD/WRITE_ZEROES:
    #: the (sector, num_sectors, flags) segments; GET_ID: the id buffer.
    data: list[memoryview]
    length: int
    status: memoryview  # the 1-byte status buffer
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    vring: Vring | None = None
    queue: VirtQueue | None = None
    #: IN/OUT from a BulkChain: the data buffers as a struct iovec array (``data`` stays
    #: empty), the chain (for views, should a transfer come up short) and what keeps its
    #: memory region mapped while the kernel uses the addresses.
    iov: bytes | None = None
    chain: BulkChain | None = None
    pin: object = None


@dataclass(slots=True)
class Rejected:
    """A request answered without touching the image: ``status`` written, ``used`` bytes."""

    status: int
    reason: str


def _take(views: list[memoryview], nbytes: int) -> tuple[bytes, list[memoryview]]:
    """The first ``nbytes`` of ``views`` as bytes, and views of the rest."""
    head = bytearray()
    rest: list[memoryview] = []
    for i, v in enumerate(views):
        if len(head) < nbytes:
            n = min(nbytes - len(head), v.nbytes)
            head += v[:n]
            if n < v.nbytes:
                rest.append(v[n:])
        else:
            rest.extend(views[i:])
            break
    return bytes(head), rest


def _drop_last_byte(views: list[memoryview]) -> tuple[list[memoryview], memoryview]:
    """Split the device-writable views into data and the trailing status byte."""
    last = views[-1]
    data = views[:-1]
    if last.nbytes > 1:
        data.append(last[:-1])
    return data, last[-1:]


def _parse_bulk(chain: BulkChain, capacity: int, read_only: bool) -> BlkRequest | None:
    """The usual read or write as Linux lays it out (a 16-byte header, data buffers, a
    1-byte status), checked as parse_request would and passed on as an iovec array; None
    for anything else (parse_request then looks at it buffer by buffer)."""
    lens, split, count = chain.lens, chain.split, len(chain.lens)
    if count < 3 or lens[0] != b.REQUEST_HEADER.size or lens[-1] != 1 or split == count:
        return None
    lo, region = chain.region_gpa, chain.region
    start = chain.addr(0) - lo
    rtype, _, sector = b.REQUEST_HEADER.unpack(region[start : start + b.REQUEST_HEADER.size])
    if rtype == b.VIRTIO_BLK_T_IN:
        if split != 1:
            return None
    elif rtype == b.VIRTIO_BLK_T_OUT:
        if read_only or split != count - 1:
            return None
    else:
        return None
    n = count - 2
    if n > IOV_MAX:
        return None
    length = chain.readable_len - b.REQUEST_HEADER.size if split > 1 else chain.writable_len - 1
    if length % SECTOR or sector > capacity or length // SECTOR > capacity - sector:
        return None  # parse_request says what is wrong
    status_at = chain.addr(-1) - lo
    # The region stays mapped while this slice lives (an unmap then waits for the GC), and
    # the kernel gets addresses inside it only: every buffer was checked against it.
    pin = ctypes.c_char.from_buffer(region[:1])
    to_host = ctypes.addressof(pin) - lo
    if chain.lanes is not None:  # the table as checked, in 128-bit lanes: add to_host to each
        iov = (chain.lanes + _iov_lanes(count, to_host)[1]).to_bytes(16 * count, "little")
        iov = iov[16:-16]
    elif chain.table is not None:
        iov = iovecs(chain.table, 1, count - 1, to_host)
    else:  # a BulkChain made without its table
        iov = b"".join(map(struct.Struct("<QQ").pack, [a + to_host for a in chain.addrs[1:-1]],
                           lens[1:-1]))
    return BlkRequest(chain.head, rtype, sector, [], length,
                      region[status_at : status_at + 1], iov=iov, chain=chain, pin=pin)


def parse_request(chain: DescriptorChain, capacity: int, read_only: bool) -> BlkRequest | Rejected | None:
    """Check one chain against §5.2.6; a request to run, a rejection whose status goes in the
    status byte, or None when the chain has no device-writable byte to put a status in."""
    if type(chain) is BulkChain and (req := _parse_bulk(chain, capacity, read_only)) is not None:
        return req
    if not chain.writable:
        return None  # a status byte in a read-only buffer: nothing can be reported
    data_out, status = _drop_last_byte(chain.writable)
    if chain.readable_len < b.REQUEST_HEADER.size:
        return Rejected(b.VIRTIO_BLK_S_IOERR, f"header of {chain.readable_len} bytes, needs 16")
    raw, payload = _take(chain.readable, b.REQUEST_HEADER.size)
    rtype, _, sector = b.REQUEST_HEADER.unpack(raw)
    payload_len = chain.readable_len - b.REQUEST_HEADER.size
    out_len = chain.writable_len - 1
    if rtype == b.VIRTIO_BLK_T_IN or rtype == b.VIRTIO_BLK_T_OUT:
        if rtype == b.VIRTIO_BLK_T_IN:
            if payload_len:
                return Rejected(b.VIRTIO_BLK_S_IOERR, "read with device-readable data")
            data, length = data_out, out_len
        else:
            if read_only:
                return Rejected(b.VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            if out_len:
                return Rejected(b.VIRTIO_BLK_S_IOERR, "write with device-writable data")
            data, length = payload, payload_len
        if length % SECTOR:
            return Rejected(b.VIRTIO_BLK_S_IOERR, f"{length} bytes is not a whole number of sectors")
        if sector > capacity or length // SECTOR > capacity - sector:
            return Rejected(b.VIRTIO_BLK_S_IOERR,
                            f"sectors {sector}+{length // SECTOR} past the capacity {capacity}")
        return BlkRequest(chain.head, rtype, sector, data, length, status)
    if rtype == b.VIRTIO_BLK_T_FLUSH:
        return BlkRequest(chain.head, rtype, 0, [], 0, status)
    if rtype == b.VIRTIO_BLK_T_GET_ID:
        return BlkRequest(chain.head, rtype, 0, data_out, out_len, status)
    if rtype == b.VIRTIO_BLK_T_DISCARD or rtype == b.VIRTIO_BLK_T_WRITE_ZEROES:
        if read_only:
            return Rejected(b.VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only disk")
        if out_len or not payload_len or payload_len % b.DISCARD_SEGMENT.size:
            return Rejected(b.VIRTIO_BLK_S_IOERR, f"discard payload of {payload_len} bytes")
        if payload_len // b.DISCARD_SEGMENT.size > 1:  # max_discard_seg = max_write_zeroes_seg = 1
            return Rejected(b.VIRTIO_BLK_S_UNSUPP, "more segments than max_discard_seg")
        raw_seg, _ = _take(payload, b.DISCARD_SEGMENT.size)
        seg_sector, num, flags = b.DISCARD_SEGMENT.unpack(raw_seg)
        if rtype == b.VIRTIO_BLK_T_DISCARD and flags:
            return Rejected(b.VIRTIO_BLK_S_UNSUPP, f"discard flags {flags:#x}")
        if flags & ~b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return Rejected(b.VIRTIO_BLK_S_UNSUPP, f"write-zeroes flags {flags:#x}")
        if num > MAX_DISCARD_SECTORS:
            return Rejected(b.VIRTIO_BLK_S_IOERR, f"{num} sectors, more than the limit")
        if seg_sector > capacity or num > capacity - seg_sector:
            return Rejected(b.VIRTIO_BLK_S_IOERR,
                            f"range {seg_sector}+{num} past the capacity {capacity}")
        return BlkRequest(chain.head, rtype, seg_sector, [], 0, status,
                          segments=[(seg_sector, num, flags)])
    return Rejected(b.VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")


def _rw_all(call, fd: int, views: list[memoryview], offset: int) -> None:
    """preadv/pwritev every byte of ``views`` at ``offset``, IOV_MAX views a call."""
    views = list(views)
    while views:
        n = call(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short transfer (the image shrank?)")
        offset += n
        while n:
            v = views[0]
            if n >= v.nbytes:
                n -= v.nbytes
                views.pop(0)
            else:
                views[0] = v[n:]
                n = 0


def split_by_bytes(batch: list[BlkRequest], parts: int) -> list[list[BlkRequest]]:
    """Up to ``parts`` runs of consecutive requests holding about equal bytes (each request
    weighs its length, at least a sector); a last run under half a share joins the one
    before, so a 1 MiB write the guest split into 254 + 2 pages is one hand-off to a worker
    and one completion, not two, while 32 small random requests still go to four workers."""
    weights = [max(req.length, SECTOR) for req in batch]
    share = sum(weights) / parts
    runs: list[list[BlkRequest]] = []
    run: list[BlkRequest] = []
    held = 0
    for req, weight in zip(batch, weights, strict=True):
        run.append(req)
        held += weight
        if held >= share and len(runs) < parts - 1:
            runs.append(run)
            run, held = [], 0
    if run:
        if runs and held < share / 2:
            runs[-1] += run
        else:
            runs.append(run)
    return runs


class IoThreads:
    """A fixed set of threads running jobs from one queue: what ThreadPoolExecutor does,
    without its Future, condition and done-callback per job (the device tracks its batches
    itself), which were a third of the loop's work per 1 MiB request. Threads start on
    demand, or all at once (``start_all``: no thread can be made under a seccomp filter)."""

    def __init__(self, count: int, name: str) -> None:
        self.count, self.name = count, name
        self._jobs: queues.SimpleQueue = queues.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, fn, arg) -> None:
        if len(self._threads) < self.count:
            self._start_one()
        self._jobs.put((fn, arg))

    def start_all(self) -> None:
        while len(self._threads) < self.count:
            self._start_one()

    def _start_one(self) -> None:
        thread = threading.Thread(target=self._run, name=f"{self.name}_{len(self._threads)}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, arg = job
            try:
                fn(arg)
            except Exception:  # nobody waits for a job's result: say it here
                log.exception("vhost_user_blk.job_failed")

    def shutdown(self) -> None:
        """Finish the queued jobs, then stop every thread."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()


class BlkBackend(VhostUserDevice):
    """A virtio-blk device on the raw image open at ``fd`` (``size`` bytes)."""

    protocol_features = PF.CONFIG | PF.INFLIGHT_SHMFD | PF.MQ

    def __init__(self, fd: int, size: int, *, read_only: bool = False, serial: str = "",
                 num_queues: int = 1, workers: int = DEFAULT_WORKERS,
                 inline_nowait: bool = True) -> None:
        if not 1 <= num_queues <= 64:
            raise ValueError(f"{num_queues} queues: 1..64 work")
        self.fd = fd
        self.capacity = size // SECTOR
        self.read_only = read_only
        self.serial = serial.encode()[: b.VIRTIO_BLK_ID_BYTES]
        self.num_queues = num_queues
        self.config_space = b.BlkConfig(
            capacity=self.capacity, seg_max=SEG_MAX, blk_size=SECTOR, num_queues=num_queues,
            max_discard_sectors=MAX_DISCARD_SECTORS, max_discard_seg=1,
            discard_sector_alignment=DISCARD_ALIGNMENT_SECTORS,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS, max_write_zeroes_seg=1,
            write_zeroes_may_unmap=1).pack()
        self._pool = IoThreads(workers, "blk-io")
        #: Batches handed to the workers and not finished, per ring (under ``_idle``).
        self._outstanding: dict[int, int] = {}
        self._idle = threading.Condition()
        #: Rings with the rest of a kick scheduled on the loop (queue_kicked's budget).
        self._again: dict[int, VirtQueue] = {}
        #: Try reads and writes on the loop first with RWF_NOWAIT (served from the page
        #: cache without blocking, or refused with EAGAIN and handed to a worker).
        self._nowait = {b.VIRTIO_BLK_T_IN: inline_nowait, b.VIRTIO_BLK_T_OUT: inline_nowait}
        self.stats = {"requests": 0, "rejected": 0, "errors": 0, "resubmitted": 0, "inline": 0}

    # -- VhostUserDevice ------------------------------------------------------------------

    def features(self) -> int:
        bits = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
                            VIRTIO_RING_F_INDIRECT_DESC, b.VIRTIO_BLK_F_SEG_MAX,
                            b.VIRTIO_BLK_F_BLK_SIZE, b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_MQ)
        if self.read_only:
            bits |= 1 << b.VIRTIO_BLK_F_RO
        else:
            bits |= feature_mask(b.VIRTIO_BLK_F_DISCARD, b.VIRTIO_BLK_F_WRITE_ZEROES)
        return bits

    def config(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > len(self.config_space):
            return b""
        return self.config_space[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> int:
        log.info("vhost_user_blk.set_config_ignored", offset=offset, size=len(data))
        return 1  # nothing writable (no CONFIG_WCE)

    def queue_started(self, vring: Vring) -> None:
        queue = vring.queue
        assert queue is not None
        queue.bulk_indirect = BULK_MIN_DESCS  # parse_request takes BulkChains
        batch: list[BlkRequest] = []
        with vring.lock:
            for head in vring.resubmit:
                chain = queue.chain_at(head)
                if chain is None:
                    if vring.inflight is not None:  # handed back unused by chain_at
                        vring.inflight.end_used(head, queue.next_used_idx)
                    continue
                self.stats["resubmitted"] += 1
                self._handle(vring, queue, chain, batch)
            if vring.resubmit:
                log.info("vhost_user_blk.resubmitted", vring=vring.index,
                         requests=len(vring.resubmit))
                vring.resubmit = ()
                vring.signal_used()
        self._dispatch(vring, batch)

    def queue_stopped(self, vring: Vring) -> None:
        # Requests still running write into guest memory the framework is about to let go:
        # finish them and return them to the ring first (GET_VRING_BASE then is exact).
        with self._idle:
            self._idle.wait_for(lambda: not self._outstanding.get(vring.index))

    def queue_kicked(self, vring: Vring) -> None:
        queue = vring.queue
        if queue is None:
            return
        batch: list[BlkRequest] = []
        # At most one ring's worth of chains per turn of the loop (vhost's "weight"): a driver
        # cannot have more outstanding, unless it publishes as fast as we complete, or a
        # request's own data lands in its avail ring (an IN buffer laid over the ring, read
        # on the loop, republishes chains: without a bound that loop never returned, and the
        # back-end stopped serving its socket and signals). The rest waits one turn.
        budget = queue.size
        more = False
        # The workers return requests to this ring meanwhile (under the same lock).
        with vring.lock:
            while True:
                queue.disable_notification()
                while (chain := vring.pop()) is not None:
                    self._handle(vring, queue, chain, batch)
                    budget -= 1
                    if not budget:
                        break
                more = queue.enable_notification()
                if not more or not budget:
                    break
            vring.signal_used()  # for what was answered at once (rejected, served inline)
        self._dispatch(vring, batch)
        if more and self._again.get(vring.index) is not queue:
            self._again[vring.index] = queue
            asyncio.get_running_loop().call_soon(self._kicked_again, vring, queue)

    def _kicked_again(self, vring: Vring, queue: VirtQueue) -> None:
        """The rest of a kick whose chains exceeded one turn's budget."""
        if self._again.get(vring.index) is queue:
            del self._again[vring.index]
        if vring.queue is queue:  # not stopped or restarted meanwhile
            self.queue_kicked(vring)

    def reset(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: not any(self._outstanding.values()))

    def start_workers(self) -> None:
        """Start every I/O thread now (the pool starts them on demand otherwise): after the
        seccomp filter is installed no new thread can be made."""
        self._pool.start_all()

    def close(self) -> None:
        self._pool.shutdown()

    # -- requests -------------------------------------------------------------------------

    def _handle(self, vring: Vring, queue: VirtQueue, chain: DescriptorChain,
                batch: list[BlkRequest]) -> None:
        """Check one chain: answer it at once if it is rejected, else add it to ``batch``."""
        self.stats["requests"] += 1
        req = parse_request(chain, self.capacity, self.read_only)
        if req is None:
            self.stats["rejected"] += 1
            log.warning("vhost_user_blk.no_status_byte", vring=vring.index, head=chain.head)
            vring.put_used(chain.head, 0)
            return
        if isinstance(req, Rejected):
            self.stats["rejected"] += 1
            if self.stats["rejected"] & (self.stats["rejected"] - 1) == 0:
                log.warning("vhost_user_blk.request_rejected", vring=vring.index,
                            head=chain.head, reason=req.reason, status=req.status)
            chain.writable[-1][-1] = req.status
            vring.put_used(chain.head, 1)
            return
        if self._nowait.get(req.type) and self._try_nowait(req):
            self.stats["inline"] += 1
            req.status[0] = b.VIRTIO_BLK_S_OK
            vring.put_used(chain.head, req.length + 1 if req.type == b.VIRTIO_BLK_T_IN else 1)
            return
        req.vring, req.queue = vring, queue
        batch.append(req)

    def _try_nowait(self, req: BlkRequest) -> bool:
        """The whole transfer at once without blocking (RWF_NOWAIT), or False: a worker does
        it (again: a partial transfer is simply redone there, reads and writes being
        idempotent). A file system without RWF_NOWAIT support is not asked again."""
        if len(req.data) > IOV_MAX:
            return False
        try:
            if req.iov is not None:
                call = _preadv2 if req.type == b.VIRTIO_BLK_T_IN else _pwritev2
                n = _iov_transfer(call, self.fd, req.iov, req.sector * SECTOR, os.RWF_NOWAIT)
            elif req.type == b.VIRTIO_BLK_T_IN:
                n = os.preadv(self.fd, req.data, req.sector * SECTOR, os.RWF_NOWAIT)
            else:
                n = os.pwritev(self.fd, req.data, req.sector * SECTOR, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait[req.type] = False
                log.info("vhost_user_blk.nowait_unsupported", type=req.type, error=str(e))
            return False
        return n == req.length

    def _dispatch(self, vring: Vring, batch: list[BlkRequest]) -> None:
        """Hand ``batch`` to the workers in up to PARALLEL_BATCHES parts."""
        if not batch:
            return
        parts = [batch] if len(batch) == 1 else split_by_bytes(batch, PARALLEL_BATCHES)
        with self._idle:
            self._outstanding[vring.index] = self._outstanding.get(vring.index, 0) + len(parts)
        for part in parts:
            self._pool.submit(self._execute_batch, part)

    def _execute_batch(self, batch: list[BlkRequest]) -> None:
        """In a worker thread: run the requests (all of one ring), then return them to the
        used ring and signal the guest once, from here: waking the event loop to do that
        would cost a thread switch per batch. The ring's lock keeps this apart from the
        loop's own use of the ring and from the server replacing the call fd; a ring stopped
        meanwhile waits for this batch first (queue_stopped), so the check below only guards
        against a batch that outlived its queue some other way."""
        vring, queue = batch[0].vring, batch[0].queue
        assert vring is not None
        try:
            done = []
            for req in batch:
                used = self._execute(req)
                if used is not None:
                    done.append((req.head, used))
            if done:
                with vring.lock:
                    if vring.queue is queue:  # else restarted meanwhile: not expected there
                        for head, used in done:
                            vring.put_used(head, used)
                        vring.signal_used()
        finally:
            with self._idle:
                self._outstanding[vring.index] -= 1
                if not self._outstanding[vring.index]:
                    self._idle.notify_all()

    def _execute(self, req: BlkRequest) -> int | None:
        """Do one request's I/O and write its status byte; the used length (None: the
        guest memory went away, nothing to complete)."""
        used = 1
        try:
            if req.iov is not None:
                self._transfer_iov(req)
                if req.type == b.VIRTIO_BLK_T_IN:
                    used += req.length
            elif req.type == b.VIRTIO_BLK_T_IN:
                _rw_all(os.preadv, self.fd, req.data, req.sector * SECTOR)
                used += req.length
            elif req.type == b.VIRTIO_BLK_T_OUT:
                _rw_all(os.pwritev, self.fd, req.data, req.sector * SECTOR)
            elif req.type == b.VIRTIO_BLK_T_FLUSH:
                os.fdatasync(self.fd)
            elif req.type == b.VIRTIO_BLK_T_GET_ID:
                ident = self.serial.ljust(b.VIRTIO_BLK_ID_BYTES, b"\0")
                offset = 0
                for view in req.data:
                    n = min(view.nbytes, len(ident) - offset)
                    view[:n] = ident[offset : offset + n]
                    offset += n
                used += offset
            else:
                for sector, num, flags in req.segments:
                    self._zero_range(req.type, sector * SECTOR, num * SECTOR, flags)
            status = b.VIRTIO_BLK_S_OK
        except OSError as e:
            status = b.VIRTIO_BLK_S_IOERR
            self.stats["errors"] += 1
            log.warning("vhost_user_blk.io_error", type=req.type, sector=req.sector,
                        length=req.length, error=str(e))
        except ValueError as e:  # a guest buffer released under us: the ring is gone
            log.warning("vhost_user_blk.request_abandoned", error=str(e))
            return None
        try:
            req.status[0] = status
        except ValueError:
            return None
        return used

    def _transfer_iov(self, req: BlkRequest) -> None:
        """An IN/OUT from a BulkChain: one preadv2/pwritev2 on its iovec array; a short
        transfer (rare: a signal, the image shrinking) is done again from views."""
        assert req.iov is not None and req.chain is not None
        read = req.type == b.VIRTIO_BLK_T_IN
        offset = req.sector * SECTOR
        if _iov_transfer(_preadv2 if read else _pwritev2, self.fd, req.iov, offset) == req.length:
            return
        _rw_all(os.preadv if read else os.pwritev, self.fd, req.chain.views(1, -1), offset)

    def _zero_range(self, rtype: int, offset: int, length: int, flags: int) -> None:
        if not length:
            return
        if rtype == b.VIRTIO_BLK_T_DISCARD or flags & b.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if rtype == b.VIRTIO_BLK_T_DISCARD:
                    return  # discard is a hint: a file system that cannot punch keeps the data
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        zeros = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(self.fd, zeros[: min(length, len(zeros))], offset)
            offset += n
            length -= n
