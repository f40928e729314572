"""Native block data-plane benchmark: no guest, a Python driver in place of Linux's virtio-blk.

    python bench/block_native.py [-t SECONDS] [-r ROUNDS] [--dir DIR] [--depth N]

bench/block needs the nested host (Linux guests do not boot on the development machine's
KVM); this measures the back-ends' side of its 1 MiB sequential jobs directly. pymvm's
vhost-user front-end sets up (a) pymvm's built-in back-end (``pymvm vhost-user blk``, its
seccomp filter on, as the VMM starts it) and (b) qemu-storage-daemon's vhost-user-blk export
on one raw image, in turns; a driver in this process then plays the guest on one split ring
in pymvm's guest memory, of the size pymvm's virtio-blk model offers for that back-end (512
for the built-in's seg_max 510, 256 for qsd's 126), as Linux's virtio_blk lays out a 1 MiB
O_DIRECT request from 256 scattered 4 KiB pages: split at the back-end's seg_max into chains
(one for the built-in, 126 + 126 + 4 for qsd), each an indirect table (header, data pages,
status byte),
EVENT_IDX for kicks and interrupts (an interrupt asked for on the next used entry, as Linux
re-arms). ``--depth`` 1 (the default) is fio's psync job of bench/block: one 1 MiB request
at a time, so each one's latency is the rate.

Per back-end: 1 MiB sequential read and write rates (MiB/s), the back-end process's CPU
time per MiB (user + system of all its threads, from /proc; and the user part alone), and
the chains, kicks and interrupts per MiB the driver saw, medians over the rounds, then
``native_builtin_vs_qsd_seq=`` (the mean of the read and write rate ratios) and
``native_builtin_vs_qsd_cpu=`` (qsd's CPU per MiB over the built-in's: above 1, the built-in
costs less). The image is written in full first; by default it lives on /dev/shm (tmpfs,
like the nested host's /tmp: no RWF_NOWAIT there, so the built-in serves every request
from a worker thread, as in bench/block). Each request's status and used length are
checked, and after each back-end's run one read is compared with the image file.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.devices.virtio.queue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from pymvm.memory import GuestMemory

PAGE = 4096
MIB = 1 << 20
PAGES_PER_REQ = MIB // PAGE
MAX_QSIZE = 512
DESC, AVAIL, USED = 0x10000, 0x14000, 0x15000
TABLES = 0x20000  # indirect table of ring slot d at TABLES + 0x2000 * d
HEADERS = 0x200000  # header of slot d at HEADERS + 0x100 * d, its status byte at + 0x80
DATA = 0x400000  # data pages: 64 MiB, each request takes 256 of them at random
DATA_PAGES = 64 * MIB // PAGE
MEMORY = DATA + DATA_PAGES * PAGE
START_TIMEOUT_S = 60
_DESC = struct.Struct("<QIHH")


class Driver:
    """A virtio-blk driver on one split ring (EVENT_IDX, indirect tables), as Linux uses it."""

    def __init__(self, memory: GuestMemory, qsize: int, seg_max: int, kick: int,
                 call: int) -> None:
        self.mem = memory.view(0, MEMORY)
        self.qsize = qsize
        self.avail16 = self.mem[AVAIL : AVAIL + 6 + 2 * qsize].cast("H")
        self.used16 = self.mem[USED : USED + 6 + 8 * qsize].cast("H")
        self.used32 = self.mem[USED + 4 : USED + 4 + 8 * qsize].cast("I")
        self.seg_max = min(seg_max, qsize - 2)
        self.kick, self.call = kick, call
        self.poller = select.poll()  # the front-end may make the call eventfd non-blocking
        self.poller.register(call, select.POLLIN)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(qsize))
        self.rng = random.Random(1)
        #: What the guest side pays for: chains published, kicks, interrupts taken.
        self.counts = {"chains": 0, "kicks": 0, "irqs": 0}
        #: slot -> (expected used length, status offset)
        self.pending: dict[int, tuple[int, int]] = {}

    def submit(self, rtype: int, sector: int, pages: list[int]) -> None:
        """One 1 MiB request: ``pages`` split at seg_max into chains, each published and
        kicked (when the device asks for kicks) as Linux's blk-mq does one request."""
        write = VRING_DESC_F_WRITE if rtype == b.VIRTIO_BLK_T_IN else 0
        for first in range(0, len(pages), self.seg_max):
            part = pages[first : first + self.seg_max]
            d = self.free.pop()
            head_at, status_at = HEADERS + 0x100 * d, HEADERS + 0x100 * d + 0x80
            self.mem[head_at : head_at + 16] = b.REQUEST_HEADER.pack(rtype, 0, sector)
            self.mem[status_at] = 0xFF
            sector += len(part) * PAGE // 512
            n = len(part) + 2
            table = bytearray(16 * n)
            _DESC.pack_into(table, 0, head_at, 16, VRING_DESC_F_NEXT, 1)
            for i, page in enumerate(part, 1):
                _DESC.pack_into(table, 16 * i, DATA + page * PAGE, PAGE,
                                VRING_DESC_F_NEXT | write, i + 1)
            _DESC.pack_into(table, 16 * (n - 1), status_at, 1, VRING_DESC_F_WRITE, 0)
            self.mem[TABLES + 0x2000 * d : TABLES + 0x2000 * d + len(table)] = table
            _DESC.pack_into(self.mem, DESC + 16 * d, TABLES + 0x2000 * d, len(table),
                            VRING_DESC_F_INDIRECT, 0)
            self.pending[d] = (1 + len(part) * PAGE if write else 1, status_at)
            self.avail16[2 + self.avail_idx % self.qsize] = d
            old = self.avail_idx
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self.avail16[1] = self.avail_idx
            event = self.used16[2 + 4 * self.qsize]  # avail_event
            self.counts["chains"] += 1
            if (self.avail_idx - event - 1) & 0xFFFF < (self.avail_idx - old) & 0xFFFF:
                os.eventfd_write(self.kick, 1)
                self.counts["kicks"] += 1

    def reap(self) -> int:
        """Wait for an interrupt, then take every used entry; how many."""
        got = 0
        while True:
            idx = self.used16[1]
            while self.last_used != idx:
                slot = self.last_used % self.qsize
                d, length = self.used32[2 * slot], self.used32[2 * slot + 1]
                want, status_at = self.pending.pop(d)
                if length != want or self.mem[status_at] != b.VIRTIO_BLK_S_OK:
                    raise RuntimeError(f"request at slot {d}: used length {length} (want "
                                       f"{want}), status {self.mem[status_at]}")
                self.free.append(d)
                self.last_used = (self.last_used + 1) & 0xFFFF
                got += 1
            self.avail16[2 + self.qsize] = self.last_used  # used_event: the next one interrupts
            if got and self.used16[1] == self.last_used:
                return got
            if self.used16[1] != self.last_used:
                continue
            self.poller.poll()  # until the back-end signals (the GIL released)
            try:
                os.eventfd_read(self.call)
                self.counts["irqs"] += 1
            except BlockingIOError:
                pass

    def run(self, rtype: int, seconds: float, depth: int, capacity: int) -> int:
        """Sequential 1 MiB requests for ``seconds``, ``depth`` at a time; MiB moved."""
        sector, done, inflight = 0, 0, 0
        chains_per_req = -(-PAGES_PER_REQ // self.seg_max)
        end = time.monotonic() + seconds
        while True:
            while inflight < depth and time.monotonic() < end:
                if sector + MIB // 512 > capacity:
                    sector = 0
                self.submit(rtype, sector, self.rng.sample(range(DATA_PAGES), PAGES_PER_REQ))
                sector += MIB // 512
                inflight += chains_per_req
            if not inflight:
                return done // chains_per_req
            got = self.reap()
            inflight -= got
            done += got
            if not inflight and time.monotonic() >= end:
                return done // chains_per_req


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system time of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def start_backend(name: str, image: Path, sock: Path, wrap: list[str]) -> subprocess.Popen:
    if name == "builtin":
        argv = [*wrap, sys.executable, "-m", "pymvm.cli", "vhost-user", "blk", "--socket", str(sock),
                "--image", str(image)]
    else:
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            raise RuntimeError("qemu-storage-daemon not found: apt-get install qemu-system-common")
        export = f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"
        argv = [qsd, "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--export", export]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    wait_for(sock, proc, name)
    return proc


def measure(name: str, image: Path, tmp: Path, seconds: float, depth: int,
            wrap: list[str]) -> dict[str, float]:
    """Both jobs against a fresh ``name`` back-end: MiB/s and back-end CPU ms per MiB."""
    from pymvm.vhost.user.frontend import VhostUserBlkBackend

    sock = tmp / f"{name}.sock"
    proc = start_backend(name, image, sock, wrap)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    fe = VhostUserBlkBackend(str(sock), connect_timeout=START_TIMEOUT_S)
    results: dict[str, float] = {}
    try:
        model = b.VirtioBlkDevice(fe)
        features = fe.features() & model.avail_features() & (
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << b.VIRTIO_BLK_F_SEG_MAX
            | 1 << b.VIRTIO_BLK_F_BLK_SIZE | 1 << b.VIRTIO_BLK_F_FLUSH)
        for bit in (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, b.VIRTIO_BLK_F_SEG_MAX):
            if not features >> bit & 1:
                raise RuntimeError(f"{name} does not offer feature bit {bit}")
        with GuestMemory(MEMORY) as memory:
            qsize = min(model.queue_max_sizes[0], MAX_QSIZE)  # Linux takes the most offered
            queue = QueueConfig(index=0, size=qsize, ready=True, desc_addr=DESC,
                                driver_addr=AVAIL, device_addr=USED)
            model.activate(ActivationContext(acked_features=features, queues=[queue],
                                             kick_fds=[kick], call_fds=[call],
                                             mem_regions=memory.regions))
            drv = Driver(memory, qsize, model.config.seg_max, kick, call)
            drv.mem[DATA : DATA + DATA_PAGES * PAGE] = bytes(range(256)) * (DATA_PAGES * 16)
            drv.run(b.VIRTIO_BLK_T_IN, 0.3, depth, model.capacity)  # warm-up
            for job, rtype in (("seqread", b.VIRTIO_BLK_T_IN), ("seqwrite", b.VIRTIO_BLK_T_OUT)):
                drv.counts = dict.fromkeys(drv.counts, 0)
                (user0, sys0), t0 = cpu_seconds(proc.pid), time.monotonic()
                mib = drv.run(rtype, seconds, depth, model.capacity)
                (user, sys_), wall = cpu_seconds(proc.pid), time.monotonic() - t0
                results[job] = mib / wall
                results[f"{job}_cpu_ms"] = 1000 * (user - user0 + sys_ - sys0) / mib
                results[f"{job}_user_ms"] = 1000 * (user - user0) / mib
                for what, n in drv.counts.items():
                    results[f"{job}_{what}"] = n / mib
            # One read compared with the file: the data landed at the right guest addresses.
            pages = drv.rng.sample(range(DATA_PAGES), PAGES_PER_REQ)
            drv.submit(b.VIRTIO_BLK_T_IN, 2048, pages)
            while drv.pending:
                drv.reap()
            want = os.pread(os.open(image, os.O_RDONLY | os.O_CLOEXEC), MIB, 2048 * 512)
            got = b"".join(bytes(drv.mem[DATA + p * PAGE : DATA + (p + 1) * PAGE]) for p in pages)
            if got != want:
                raise RuntimeError(f"{name}: a 1 MiB read does not match the image")
            fe.stop()
            del drv
    finally:
        fe.close()
        os.close(kick)
        os.close(call)
        stop(proc)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", type=float, default=3.0, help="seconds per job (default 3)")
    ap.add_argument("-r", "--rounds", type=int, default=3, help="rounds, medians (default 3)")
    ap.add_argument("--depth", type=int, default=1, help="1 MiB requests in flight (default 1)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the image lives (default /dev/shm: tmpfs)")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--backends", default="builtin,qsd")
    ap.add_argument("--wrap", default="", help="command prefix for the built-in back-end "
                    "(e.g. 'strace -f -c -o FILE'; its CPU time is then the wrapper's)")
    args = ap.parse_args()
    names = args.backends.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="pymvm-blkn-", dir=args.dir))
    try:
        image = tmp / "disk.img"
        with open(image, "wb") as f:
            chunk = os.urandom(MIB)
            f.writelines(chunk for _ in range(args.size_mib))
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                runs[name].append(measure(name, image, tmp, args.t, args.depth, args.wrap.split()))
                r = runs[name][-1]
                print(f"# {name}: " + ", ".join(
                    f"{job} {r[job]:.0f} MiB/s, {r[f'{job}_cpu_ms']:.2f} ms CPU/MiB "
                    f"({r[f'{job}_user_ms']:.2f} user), per MiB {r[f'{job}_chains']:.1f} "
                    f"chains {r[f'{job}_kicks']:.1f} kicks {r[f'{job}_irqs']:.1f} irqs"
                    for job in ("seqread", "seqwrite")), flush=True)
        med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]}
               for n in names}
        for n in names:
            print(" ".join(f"{n}_{k}={v:.2f}" for k, v in med[n].items()))
        if "builtin" in med and "qsd" in med:
            bi, q = med["builtin"], med["qsd"]
            seq = (bi["seqread"] / q["seqread"] + bi["seqwrite"] / q["seqwrite"]) / 2
            cpu = (q["seqread_cpu_ms"] / bi["seqread_cpu_ms"]
                   + q["seqwrite_cpu_ms"] / bi["seqwrite_cpu_ms"]) / 2
            print(f"native_builtin_vs_qsd_seq={seq:.2f}")
            print(f"native_builtin_vs_qsd_cpu={cpu:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
