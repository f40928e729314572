"""One VM's life: build it from a config, run it, stop it.

The main thread owns the VMM's own events (signals, terminal input, the stop request):
with a control API in an asyncio loop that also serves the API (VirtualMachine.run),
without one in a plain epoll wait (VirtualMachine.wait), so that such a VMM never loads
asyncio. Every vCPU runs in its own thread blocked in KVM_RUN (pymvm.machine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import BinaryIO

import structlog

from . import layout
from .boot import cpu as boot_cpu
from .boot.loader import LoadedKernel, load_initrd, load_kernel
from .boot.acpi import build_acpi_tables, resolve_acpi, write_acpi_tables
from .boot.mptable import build_mptable
from .boot.params import write_boot_data
from .config import NetConfig, VmConfig
from .devices.acpi_pm import AcpiPmDevice
from .devices.boot_timer import BootTimer, process_start_monotonic_ns
from .devices.i8042 import I8042
from .devices.manager import DeviceManager
from .devices.serial import OUTPUT_FLUSH_INTERVAL_S, Serial8250
from .machine import Machine, MachineState, StopKind, StopReason

log = structlog.get_logger()

# Exit statuses of `pymvm run` (documented in the README).
EXIT_OK = 0  # the guest rebooted or powered off
EXIT_VM_ERROR = 1  # the guest crashed the vCPU or KVM failed
EXIT_USAGE = 2  # bad config or command line
# EXIT_API_STOP = 3: ended by the control API's "stop" action (pymvm.api.controller,
# imported only with an API socket)
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class VmmError(Exception):
    """The VM could not be built."""


class VirtualMachine:
    """A Linux guest built from a VmConfig. Owns the Machine, its devices and files."""

    def __init__(self, config: VmConfig, *, serial_out: BinaryIO | None = None,
                 start_ns: int | None = None) -> None:
        self.config = config
        self.start_ns = start_ns if start_ns is not None else process_start_monotonic_ns()
        self._serial_file: BinaryIO | None = None
        self.machine: Machine | None = None
        self.kernel: LoadedKernel | None = None
        self.cmdline = ""
        self.devices: DeviceManager | None = None  # owns every virtio device and its parts
        self.acpi = False  # ACPI tables instead of the MP table ([boot] acpi)
        self._build(serial_out)

    # ---- build -------------------------------------------------------------------------------
    def _build(self, serial_out: BinaryIO | None) -> None:
        cfg = self.config
        try:
            self.machine = m = Machine(cfg.machine.memory_mib << 20, vcpus=cfg.machine.vcpus,
                                       hugepages=cfg.machine.hugepages)
            assert m.memory is not None

            # Legacy devices.
            out = serial_out if serial_out is not None else self._open_serial_output()
            self.serial = Serial8250(out, m.irq_eventfd(layout.SERIAL_IRQ))
            m.pio_bus.insert(self.serial, layout.COM1_PORT, 8, "com1")
            self.i8042 = I8042(self._on_i8042_reset, m.irq_eventfd(layout.I8042_IRQ))
            m.pio_bus.insert(self.i8042, layout.I8042_DATA_PORT, 5, "i8042")
            self.boot_timer = BootTimer(self.start_ns)
            m.mmio_bus.insert(self.boot_timer, layout.BOOT_TIMER_ADDR, layout.BOOT_TIMER_SIZE, "boot-timer")
            # ACPI ([boot] acpi, docs/config.md): tables instead of the MP table and the
            # virtio_mmio.device= arguments, and the FADT's power registers.
            self.acpi = resolve_acpi(cfg.boot.acpi, cfg.boot.kernel)
            if self.acpi:
                m.pio_bus.insert(AcpiPmDevice(self._on_acpi_power_off, self._on_acpi_reset),
                                 layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT, "acpi-pm")

            # virtio-mmio devices; their data planes live in vhost back-ends.
            self.devices = DeviceManager(m)
            for index, net in enumerate(cfg.net):
                self.devices.add_net(index, net)
            for index, block in enumerate(cfg.block):
                self.devices.add_block(index, block)
            if cfg.vsock is not None:
                self.devices.add_vsock(cfg.vsock)

            # Kernel, initrd, command line, boot_params, then ACPI tables or the MP table.
            self.kernel = load_kernel(m.memory, cfg.boot.kernel)
            initrd = load_initrd(m.memory, cfg.boot.initrd, self.kernel) if cfg.boot.initrd else None
            self.cmdline = self._cmdline()
            reserved = [(layout.ACPI_TABLES_START, layout.ACPI_TABLES_SIZE)] if self.acpi else []
            write_boot_data(m.memory, self.kernel, self.cmdline, initrd, reserved)
            if self.acpi:
                write_acpi_tables(m.memory, build_acpi_tables(cfg.machine.vcpus,
                                                              self.devices.mmio_devices()))
            else:
                m.memory.write(layout.MPTABLE_START, build_mptable(cfg.machine.vcpus))
            boot_cpu.write_gdt(m.memory)
            boot_cpu.write_page_tables(m.memory)

            supported = m.kvm.supported_cpuid()
            for vcpu in m.vcpus:
                entry = self.kernel.entry if vcpu.id == 0 else None
                accepted = boot_cpu.configure_vcpu(vcpu, supported, cfg.machine.vcpus, entry)
                if accepted != len(boot_cpu.boot_msrs()):
                    log.warning("msrs_partially_set", vcpu=vcpu.id, accepted=accepted)
            log.info("vm_built", kernel=str(cfg.boot.kernel), kernel_kind=self.kernel.kind,
                     entry=hex(self.kernel.entry), vcpus=cfg.machine.vcpus,
                     memory_mib=cfg.machine.memory_mib, acpi=self.acpi, cmdline=self.cmdline)
        except BaseException:
            self.close()
            raise

    def _open_serial_output(self) -> BinaryIO | None:
        s = self.config.serial
        if s.output == "stdout":
            return sys.stdout.buffer
        if s.output == "file":
            assert s.path is not None
            self._serial_file = open(s.path, "ab", buffering=0)
            return self._serial_file
        return None

    def _cmdline(self) -> str:
        assert self.devices is not None
        # With ACPI the guest finds the devices in the DSDT: no virtio_mmio.device= (a kernel
        # with both would register each device twice).
        fragments = self.devices.cmdline_fragments(discovery=not self.acpi)
        return " ".join([self.config.boot.cmdline, *fragments])

    def _on_i8042_reset(self) -> None:
        assert self.machine is not None
        self.machine.request_stop(StopReason(StopKind.GUEST_RESET, "guest reset (i8042)", 0))

    def _on_acpi_power_off(self) -> None:
        assert self.machine is not None
        self.machine.request_stop(StopReason(StopKind.GUEST_SHUTDOWN, "guest powered off (ACPI S5)", 0))

    def _on_acpi_reset(self) -> None:
        assert self.machine is not None
        self.machine.request_stop(StopReason(StopKind.GUEST_RESET, "guest reset (ACPI reset register)", 0))

    # ---- control API -------------------------------------------------------------------------
    def controlled(self):
        """What the control API sees and steers of this VM."""
        from .api.controller import ControlledVm

        cfg = self.config
        assert self.machine is not None
        return ControlledVm(
            id=cfg.id, machine=self.machine, devices=self.devices, vcpus=cfg.machine.vcpus,
            memory_mib=cfg.machine.memory_mib, kernel=str(cfg.boot.kernel),
            started_ns=self.start_ns, boot_time_us=lambda: self.boot_timer.boot_time_us,
            ctrl_alt_del=self.i8042.send_ctrl_alt_del)

    async def _start_api(self, path: Path):
        from .api.controller import Controller
        from .api.metrics import VmMetrics
        from .api.server import ApiServer

        controlled = self.controlled()
        server = ApiServer(Controller(controlled, VmMetrics(controlled)), path)
        await server.start()
        return server

    # ---- run ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPUs, under the seccomp filter. run() and wait() start them themselves
        unless this was called before."""
        assert self.machine is not None
        self._confine()  # set-up is done: the vCPU threads start under the filter
        log.info("vm_starting")
        self.machine.start()

    async def run(self, api_socket: Path | None = None) -> StopReason:
        """Run until the guest stops or a signal arrives; returns why it stopped. With
        ``api_socket`` the control API is served there from this loop, before any vCPU runs
        (so only with no API socket may start() have come first; run_vm then uses wait())."""
        m = self.machine
        assert m is not None
        loop = asyncio.get_running_loop()
        api = await self._start_api(api_socket) if api_socket is not None else None
        stopped: asyncio.Future[StopReason] = loop.create_future()

        def on_stop(reason: StopReason) -> None:
            loop.call_soon_threadsafe(lambda: stopped.done() or stopped.set_result(reason))

        m.on_stop = on_stop
        if m.stop_reason is not None:  # stopped before on_stop was set (vCPUs started early)
            on_stop(m.stop_reason)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        stdin_fd = self._watch_stdin(loop)
        flusher = loop.create_task(self._flush_serial_periodically())
        try:
            if m.state is MachineState.CREATED:
                self.start()
            reason = await stopped
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            if stdin_fd is not None:
                loop.remove_reader(stdin_fd)
            flusher.cancel()
            if api is not None:
                await api.close()  # removes the socket
        await loop.run_in_executor(None, m.join)
        self.serial.flush()
        return reason

    def wait(self) -> StopReason:
        """Run until the guest stops or SIGINT/SIGTERM arrives, without an event loop; returns
        why it stopped. For a VM with no control API (run_vm), whose main thread has only
        this to do: sleep in epoll on a wake-up pipe (written by a stop, by the signal
        module's C handler whichever thread the signal lands on, and when a partial serial
        line starts to wait) and on terminal input, and push partial lines out
        OUTPUT_FLUSH_INTERVAL_S after the wake-up, as run() does with asyncio: at most one
        wake-up per interval however much the guest prints, none while nothing waits.
        asyncio, with what it imports, is about 6 MiB of RSS and, in the nested host, a
        large share of a second of CPU taken from the guest's boot (issue 15); such a VM
        never loads it."""
        import threading

        m = self.machine
        assert m is not None
        lock = threading.Lock()  # a stop from another thread never writes to a closed pipe
        closed = False
        r = w = -1
        ep = None
        previous: dict[int, object] = {}
        wakeup_set = False
        old_wakeup = -1

        def wake() -> None:
            with lock:
                if not closed:
                    try:
                        os.write(w, b"w")
                    except BlockingIOError:  # full: the loop wakes anyway
                        pass

        def on_stop(reason: StopReason) -> None:
            wake()

        try:
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            # Left in place afterwards: once closed, wake() does nothing, and a thread that
            # read the attribute just before could not call None.
            m.on_stop = on_stop
            self.serial.on_partial = wake
            if m.stop_reason is not None:  # stopped before on_stop was set (vCPUs started early)
                on_stop(m.stop_reason)
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal_frame)
            old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            wakeup_set = True
            if m.state is MachineState.CREATED and m.stop_reason is None:
                self.start()
            # After the first KVM_RUN (select is a shared library to load): the pipe has kept
            # whatever came meanwhile.
            import select

            ep = select.epoll()
            ep.register(r, select.EPOLLIN)
            stdin_fd = self._watch_stdin_fd(ep)
            flush_at: float | None = None  # when partial output waiting now goes out
            while m.stop_reason is None:
                timeout = None if flush_at is None else max(0.0, flush_at - time.monotonic())
                for fd, _ in ep.poll(timeout):
                    if fd == r:
                        try:
                            while os.read(r, 512):
                                pass
                        except BlockingIOError:
                            pass
                        if flush_at is None:  # whatever woke it, a partial line may wait
                            flush_at = time.monotonic() + OUTPUT_FLUSH_INTERVAL_S
                    elif fd == stdin_fd and not self._pass_terminal_input(fd):
                        ep.unregister(fd)
                        stdin_fd = None
                if flush_at is not None and time.monotonic() >= flush_at:
                    self.serial.flush_partial()
                    flush_at = None
            reason = m.stop_reason
            m.join()  # under this wait's handlers still: a signal now changes nothing
        finally:
            if wakeup_set:
                signal.set_wakeup_fd(old_wakeup)
            with lock:
                closed = True
            if ep is not None:
                ep.close()
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            # Last: until here a signal is this wait's, and cannot raise out of the cleanup.
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.serial.flush()
        return reason

    def _on_signal_frame(self, signum: int, frame: object) -> None:
        self._on_signal(signum)

    def _watch_stdin_fd(self, ep) -> int | None:
        """Register terminal input with ``ep`` as run() does with its loop: not when serial
        input is off, and not for what epoll refuses (a regular file, as asyncio refuses it)."""
        if not self.config.serial.input or self.config.serial.output == "none":
            return None
        import select

        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
            ep.register(fd, select.EPOLLIN)
        except (AttributeError, OSError, ValueError):
            return None
        return fd

    def _confine(self) -> None:
        from .sandbox import settings

        if settings.seccomp:
            from . import syscalls

            syscalls.install_vmm()
            syscalls.run_self_test_if_asked("vmm")

    async def _flush_serial_periodically(self) -> None:
        # Whole lines are written by the vCPU thread; partial ones (prompts) are pushed here.
        while True:
            await asyncio.sleep(OUTPUT_FLUSH_INTERVAL_S)
            self.serial.flush()

    def _on_signal(self, signum: int) -> None:
        assert self.machine is not None
        name = signal.Signals(signum).name
        self.machine.request_stop(StopReason(StopKind.SIGNAL, f"received {name}", 128 + signum))

    def _watch_stdin(self, loop: asyncio.AbstractEventLoop) -> int | None:
        if not self.config.serial.input or self.config.serial.output == "none":
            return None
        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return None

        def readable() -> None:
            if not self._pass_terminal_input(fd):
                loop.remove_reader(fd)

        try:
            loop.add_reader(fd, readable)
        except (PermissionError, ValueError, OSError):  # regular files cannot be polled
            return None
        return fd

    def _pass_terminal_input(self, fd: int) -> bool:
        """Pass what the terminal has to the guest's serial port; False at EOF (stop
        watching it: the guest keeps running)."""
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if data:
            self.serial.enqueue_input(data)
        return bool(data)

    def fast_mmio_reads(self) -> int:
        """Guest MMIO reads the vCPUs answered in C (their counters outlive the machine)."""
        closed = getattr(self, "_closed_fast_reads", None)
        if closed is not None:  # the devices are gone, their counters are not
            return sum(f.hits for f in closed)
        if self.devices is None:
            return 0
        return sum(d.fast_read.hits for d in self.devices.mmio_devices() if d.fast_read is not None)

    # ---- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.machine is not None:
            try:
                self.machine.close()  # vCPUs stopped first: no device activity while undoing
            except Exception as e:  # the host resources below must be undone regardless
                log.warning("teardown_step_failed", step="Machine.close", error=str(e))
        if self.devices is not None:
            # The C loop's hit counts are logged after teardown (vm_stopped): keep their handles.
            self._closed_fast_reads = [d.fast_read for d in self.devices.mmio_devices()
                                       if d.fast_read is not None]
            self.devices.close()  # each device: back-end, host network, plumbing
        self.machine = None
        if getattr(self, "serial", None) is not None:
            self.serial.flush()
        if self._serial_file is not None:
            self._serial_file.close()
            self._serial_file = None


class StopSignal(BaseException):
    """SIGINT/SIGTERM arrived while the VM was being built: unwind, clean up, exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop_signal(signum: int, frame: object) -> None:
    raise StopSignal(signum)


def run_vm(config: VmConfig, api_socket: Path | None = None) -> int:
    """Build and run a VM in the foreground; returns the process exit status. The control
    API is served on ``api_socket``, else on the config's ``[api] socket`` if set."""
    started = time.monotonic()
    api_socket = api_socket if api_socket is not None else config.api.socket
    if api_socket is not None:
        from .api import load_server_modules

        load_server_modules()  # before anything imports aiohttp (its TLS contexts: issue 15)
        from .api.server import check_socket_path

        check_socket_path(api_socket)  # a live VMM there: refuse before building anything
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _raise_stop_signal) for s in stop_signals}
    vm: VirtualMachine | None = None
    try:
        try:
            vm = VirtualMachine(config)  # undoes its own partial work if a signal lands here
        except StopSignal as stop:
            log.info("vm_stopped", reason="signal", detail=f"received {stop} while building",
                     exit_status=128 + stop.signum)
            return 128 + stop.signum
        try:
            if api_socket is None:
                # No control API: nothing needs an event loop, and asyncio is never loaded
                # (VirtualMachine.wait; issue 15).
                reason = vm.wait()  # its own handlers take over meanwhile
            else:
                reason = asyncio.run(vm.run(api_socket))  # the loop's own handlers take over
        except StopSignal as stop:  # between the build and the loop's handlers
            reason = StopReason(StopKind.SIGNAL, f"received {stop}", 128 + stop.signum)
    finally:
        # Teardown must finish: a second signal now is ignored, not raised mid-cleanup.
        for s in stop_signals:
            signal.signal(s, signal.SIG_IGN)
        if vm is not None:
            vm.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("vm_stopped", reason=reason.kind.value, detail=reason.message,
             exit_status=reason.exit_status, boot_time_us=vm.boot_timer.boot_time_us,
             fast_mmio_reads=vm.fast_mmio_reads(),
             runtime_s=round(time.monotonic() - started, 3))
    return reason.exit_status
