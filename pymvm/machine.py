"""A running KVM machine: VM fd, guest memory, MMIO/PIO buses and the vCPU threads.

This is the part shared by Linux boots (pymvm.vmm) and the small guest programs of the
kvm test tier: it knows nothing about kernels or config files. Each vCPU has one thread
blocked in KVM_RUN; exits are dispatched to the buses from that thread.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import os
import signal
import struct
import threading
from typing import Callable

import structlog

from . import layout
from .devices.bus import Bus
from .kvm import EXIT_INTERRUPTED, FastRead, FastReadTable, Kvm, KvmError, Vcpu, Vm, constants as k
from .kvm.vcpu import (
    _IO_DIRECTION, _MMIO_DATA, _MMIO_PHYS_ADDR, EXIT_NAMES,
)
from .memory import GuestMemory
from .record import FrozenRecord

log = structlog.get_logger()

# The signal that knocks a vCPU thread out of KVM_RUN (EINTR); its handler does nothing.
KICK_SIGNAL = signal.SIGUSR1


class StopKind(enum.Enum):
    GUEST_RESET = "guest-reset"  # i8042 reset, triple fault, KVM reset event
    GUEST_SHUTDOWN = "guest-shutdown"  # KVM shutdown event
    GUEST_HALTED = "guest-halted"  # HLT with no in-kernel irqchip (test programs)
    SIGNAL = "signal"  # SIGINT/SIGTERM to the VMM
    REQUESTED = "requested"  # the embedding program (or the control API's "stop") asked
    ERROR = "error"  # the guest or the VMM failed


class StopReason(FrozenRecord):
    """Why the VM stopped, and the exit status `pymvm run` ends with."""

    __slots__ = ("kind", "message", "exit_status")
    kind: StopKind
    message: str
    exit_status: int

    def __init__(self, kind: StopKind, message: str, exit_status: int) -> None:
        self._init(kind, message, exit_status)


class MachineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # every vCPU thread parked outside KVM_RUN
    STOPPING = "stopping"
    STOPPED = "stopped"
    CLOSED = "closed"


class MachineStateError(Exception):
    """An operation was asked of a machine in a state that does not allow it."""


class StateError(MachineStateError):
    """``operation`` needs the machine in one of ``required``; it is in ``state``."""

    def __init__(self, operation: str, state: MachineState,
                 required: tuple[MachineState, ...]) -> None:
        self.operation = operation
        self.state = state
        self.required = required
        allowed = " or ".join(s.value for s in required)
        super().__init__(f"{operation}() needs the machine {allowed}, it is {state.value}")


def requires_state(*states: MachineState):
    """Refuse a call unless the machine is in one of ``states`` (qemu.qmp's pattern)."""

    def wrap(func):
        @functools.wraps(func)
        def inner(self, *args, **kwargs):
            if self.state not in states:
                raise StateError(func.__name__, self.state, states)
            return func(self, *args, **kwargs)

        return inner

    return wrap


def _install_kick_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, lambda *_: None)


class Machine:
    """KVM VM + memory + buses + vCPUs. Owns every fd it opens."""

    def __init__(self, memory_size: int, *, vcpus: int = 1, hugepages: bool = False,
                 irqchip: bool = True, kvm: Kvm | None = None) -> None:
        self.state = MachineState.CREATED
        self.mmio_bus = Bus("mmio")
        self.pio_bus = Bus("pio")
        self.irqchip = irqchip
        self._threads: list[threading.Thread] = []
        # Guards stop_reason, the pause request and immediate_exit; vCPUs park on it.
        self._run_cond = threading.Condition()
        self._pause_requested = False
        self._parked = 0
        #: Exits the Python run loop handled, by KVM exit reason (EXIT_INTERRUPTED = -1),
        #: one list per vCPU (plain list stores: no lock on the hot path).
        self.exit_counts: list[dict[int, int]] = []
        self._stopped = threading.Event()
        self.stop_reason: StopReason | None = None
        self.on_stop: Callable[[StopReason], None] | None = None
        self._eventfds: list[int] = []
        self.fast_reads = FastReadTable()
        self._owns_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        try:
            self.kvm.require()
            max_vcpus = self.kvm.max_vcpus()
            if not 1 <= vcpus <= max_vcpus:
                raise KvmError(f"{vcpus} vCPUs requested, this host's KVM allows 1 to {max_vcpus}")
            self.vm = self.kvm.create_vm()
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.memory = GuestMemory(memory_size, hugepages=hugepages)
            for region in self.memory.regions:
                self.vm.set_user_memory_region(region.gpa, region.size, region.host_addr)
            self.vcpus: list[Vcpu] = [self.vm.create_vcpu(i) for i in range(vcpus)]
        except BaseException:
            self.close()
            raise

    # ---- interrupts ------------------------------------------------------------------------
    def irq_eventfd(self, gsi: int) -> Callable[[], None]:
        """An edge-triggered interrupt line for a device: an eventfd bound to ``gsi`` by irqfd."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        assert self.vm is not None
        self.vm.register_irqfd(fd, gsi)

        def trigger() -> None:
            if fd not in self._eventfds:  # closed with the machine: never touch a reused fd
                return
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:  # counter saturated: an interrupt is pending anyway
                pass

        return trigger

    @requires_state(MachineState.CREATED)
    def add_fast_read(self, addr: int, value: int = 0) -> FastRead:
        """A 4-byte MMIO register at guest-physical ``addr`` whose reads the vCPUs answer in C
        from the returned FastRead (its device keeps it current with ``set``), never
        reaching the bus. Other accesses there still go to the bus."""
        return self.fast_reads.add(addr, value)

    # ---- running ---------------------------------------------------------------------------
    @requires_state(MachineState.CREATED)
    def start(self) -> None:
        _install_kick_handler()
        self.state = MachineState.RUNNING
        self.exit_counts = [{} for _ in self.vcpus]
        for vcpu in self.vcpus:
            vcpu.use_fast_reads(self.fast_reads)
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(self._vcpu_thread, vcpu),
                                 name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        self._stopped.wait(timeout)
        return self.stop_reason

    def request_stop(self, reason: StopReason) -> None:
        """Stop every vCPU; thread-safe and idempotent (the first reason wins). Works on a
        paused machine too: parked vCPUs wake and leave."""
        with self._run_cond:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            if self.state in (MachineState.RUNNING, MachineState.PAUSED):
                self.state = MachineState.STOPPING
            # Under the lock: a vCPU leaving its parking spot cannot clear this again.
            for vcpu in self.vcpus:
                if vcpu.fd >= 0:
                    vcpu.set_immediate_exit(True)
            self._run_cond.notify_all()
        log.info("vm_stopping", reason=reason.kind.value, detail=reason.message, exit_status=reason.exit_status)
        self._kick_vcpus()
        self._stopped.set()
        on_stop = self.on_stop  # read once: another thread may replace it meanwhile
        if on_stop is not None:
            on_stop(reason)

    def _kick_vcpus(self) -> None:
        me = threading.current_thread()
        for t in self._threads:
            if t is not me and t.is_alive() and t.ident is not None:
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    # ---- pause / resume --------------------------------------------------------------------
    @requires_state(MachineState.RUNNING, MachineState.PAUSED)
    def pause(self, timeout: float | None = 10.0) -> None:
        """Park every vCPU thread outside KVM_RUN; returns once all are parked (the guest
        then makes no progress). Idempotent. Raises TimeoutError if a vCPU is held up
        longer than ``timeout`` inside a device (the pause stays requested)."""
        with self._run_cond:
            if self.state == MachineState.PAUSED:
                return
            self._pause_requested = True
            for vcpu in self.vcpus:
                if vcpu.fd >= 0:
                    vcpu.set_immediate_exit(True)  # an entry racing the kick returns at once
        self._kick_vcpus()
        with self._run_cond:
            if not self._run_cond.wait_for(
                    lambda: self._parked >= self._live_vcpu_threads() or self.stop_reason is not None,
                    timeout):
                raise TimeoutError(f"vCPUs did not park within {timeout} s")
            if self.stop_reason is not None:
                self._pause_requested = False
                raise StateError("pause", self.state, (MachineState.RUNNING, MachineState.PAUSED))
            self.state = MachineState.PAUSED
        log.info("vm_paused")

    @requires_state(MachineState.RUNNING, MachineState.PAUSED)
    def resume(self) -> None:
        """Let parked vCPUs enter the guest again; idempotent."""
        with self._run_cond:
            if self.state == MachineState.RUNNING and not self._pause_requested:
                return
            self._pause_requested = False
            if self.state == MachineState.PAUSED:
                self.state = MachineState.RUNNING
            self._run_cond.notify_all()
        log.info("vm_resumed")

    @property
    def paused_vcpus(self) -> int:
        """How many vCPU threads are parked now."""
        return self._parked

    def _live_vcpu_threads(self) -> int:
        return sum(1 for t in self._threads if t.is_alive())

    def _park(self, vcpu: Vcpu) -> None:
        """Called by a vCPU thread out of KVM_RUN: wait while a pause is requested, then
        clear immediate_exit unless the machine is stopping (all under the lock that pause()
        and request_stop() set it under, so neither request is lost)."""
        with self._run_cond:
            if self._pause_requested and self.stop_reason is None:
                self._parked += 1
                self._run_cond.notify_all()
                try:
                    self._run_cond.wait_for(
                        lambda: not self._pause_requested or self.stop_reason is not None)
                finally:
                    self._parked -= 1
            if self.stop_reason is None and not self._pause_requested:
                vcpu.set_immediate_exit(False)

    def join(self, timeout: float = 5.0) -> None:
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(timeout)
                if t.is_alive():
                    # Still inside KVM_RUN: kick again (the signal may have raced the entry).
                    if t.ident is not None:
                        signal.pthread_kill(t.ident, KICK_SIGNAL)
                    t.join(timeout)
        if self.state == MachineState.STOPPING:
            self.state = MachineState.STOPPED

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        structlog.contextvars.bind_contextvars(vcpu=vcpu.id)
        try:
            self._run_loop(vcpu)
        except Exception as e:  # a bug or a KVM failure: stop the VM, never hang it
            log.exception("vcpu_failed")
            self.request_stop(StopReason(StopKind.ERROR, f"vcpu {vcpu.id}: {e}", 1))

    def _run_loop(self, vcpu: Vcpu) -> None:
        # The hot path of the VMM: every port and MMIO access of the guest comes through
        # here, so field offsets are bound to locals and lookups are cached per address.
        pio_read, pio_write = self._cached_dispatch(self.pio_bus)
        mmio_read, mmio_write = self._cached_dispatch(self.mmio_bus)
        page = vcpu.run_page
        view = vcpu._run_view
        io_fields = struct.Struct("=BBHIQ").unpack_from
        mmio_fields = struct.Struct("=Q8sIB").unpack_from
        io_off, mmio_off = _IO_DIRECTION, _MMIO_PHYS_ADDR
        mmio_data_off = _MMIO_DATA
        EXIT_IO, EXIT_MMIO, IO_OUT = k.KVM_EXIT_IO, k.KVM_EXIT_MMIO, k.KVM_EXIT_IO_OUT
        run = vcpu.run
        # Exits counted per kind for the metrics: one dict update next to a bus dispatch.
        counts = self.exit_counts[vcpu.id] if vcpu.id < len(self.exit_counts) else {}
        while self.stop_reason is None:
            reason = run()
            counts[reason] = counts.get(reason, 0) + 1
            if reason == EXIT_IO:
                direction, size, port, count, offset = io_fields(page, io_off)
                if direction == IO_OUT:
                    for i in range(count):
                        start = offset + i * size
                        pio_write(port, page[start:start + size])
                else:
                    for i in range(count):
                        start = offset + i * size
                        buf = bytearray(b"\xff" * size)  # open bus reads all ones
                        pio_read(port, buf)
                        view[start:start + size] = buf
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = mmio_fields(page, mmio_off)
                length = min(length, 8)
                if is_write:
                    mmio_write(addr, data[:length])
                else:
                    buf = bytearray(b"\xff" * length)
                    mmio_read(addr, buf)
                    view[mmio_data_off:mmio_data_off + length] = buf
            elif reason == EXIT_INTERRUPTED or reason == k.KVM_EXIT_INTR:
                self._park(vcpu)  # a kick: a pause or a stop request (signals are rare)
            else:
                self._handle_other_exit(vcpu, reason)

    @staticmethod
    def _cached_dispatch(bus: Bus):
        """Bus read/write with a per-address cache of (device, base): guests hit few addresses."""
        cache: dict[int, tuple[object, int] | None] = {}

        def resolve(addr: int):
            try:
                return cache[addr]
            except KeyError:
                found = bus.lookup(addr)
                hit = None if found is None else (found[0], found[1].base)
                if len(cache) < 4096:
                    cache[addr] = hit
                return hit

        def read(addr: int, buf: bytearray) -> None:
            hit = resolve(addr)
            if hit is not None:
                hit[0].read(addr - hit[1], buf)

        def write(addr: int, data: bytes) -> None:
            hit = resolve(addr)
            if hit is not None:
                hit[0].write(addr - hit[1], data)

        return read, write

    def _handle_other_exit(self, vcpu: Vcpu, reason: int) -> None:
        if reason == k.KVM_EXIT_HLT:
            self.request_stop(StopReason(StopKind.GUEST_HALTED, f"vcpu {vcpu.id} halted", 0))
        elif reason == k.KVM_EXIT_SHUTDOWN:
            self.request_stop(StopReason(StopKind.GUEST_RESET, "guest reset (triple fault)", 0))
        elif reason == k.KVM_EXIT_SYSTEM_EVENT:
            event = vcpu.system_event_type()
            if event == k.KVM_SYSTEM_EVENT_SHUTDOWN:
                self.request_stop(StopReason(StopKind.GUEST_SHUTDOWN, "guest powered off", 0))
            elif event == k.KVM_SYSTEM_EVENT_RESET:
                self.request_stop(StopReason(StopKind.GUEST_RESET, "guest reset", 0))
            else:
                self.request_stop(StopReason(StopKind.ERROR, f"guest system event {event} (crash)", 1))
        elif reason == k.KVM_EXIT_INTERNAL_ERROR:
            regs = vcpu.get_regs()
            self.request_stop(StopReason(
                StopKind.ERROR, f"KVM internal error on vcpu {vcpu.id} at rip {regs.rip:#x}: "
                f"{vcpu.internal_error()}", 1))
        elif reason == k.KVM_EXIT_FAIL_ENTRY:
            self.request_stop(StopReason(
                StopKind.ERROR, f"KVM entry failed on vcpu {vcpu.id}: hardware reason "
                f"{vcpu.fail_entry_reason():#x}", 1))
        else:
            name = EXIT_NAMES.get(reason, str(reason))
            self.request_stop(StopReason(StopKind.ERROR, f"unexpected exit {name} on vcpu {vcpu.id}", 1))

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        if self.state == MachineState.CLOSED:
            return
        if self.state in (MachineState.RUNNING, MachineState.PAUSED, MachineState.STOPPING):
            self.request_stop(StopReason(StopKind.REQUESTED, "machine closed", 0))
            self.join()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._owns_kvm:
            self.kvm.close()
        self.state = MachineState.CLOSED

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
