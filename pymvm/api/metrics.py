"""Prometheus metrics of one VM (``GET /metrics``), read from the VMM's own counters at scrape
time: nothing on the vCPU hot path calls into prometheus_client.

- vCPU exits the Python run loop handled, by vCPU and kind (``Machine.exit_counts``);
- InterruptStatus reads the vCPUs answered in C (``FastRead.hits``), by device;
- per NIC, packets and bytes from the guest's point of view, read from its TAP's counters
  (the TAP sees every packet whatever the back-end: vhost-net, vhost-user, built-in);
- vhost-user reconnects, by device;
- the guest's boot time and the VMM's uptime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog

from ..kvm import EXIT_INTERRUPTED
from ..kvm.vcpu import EXIT_NAMES

if TYPE_CHECKING:
    from .controller import ControlledVm

log = structlog.get_logger()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exit_kind(reason: int) -> str:
    if reason == EXIT_INTERRUPTED:
        return "interrupted"
    name = EXIT_NAMES.get(reason)
    return name.removeprefix("KVM_EXIT_").lower() if name else str(reason)


def tap_counters(tap: str, netns: str | None) -> dict[str, int] | None:
    """The TAP's kernel counters (IFLA_STATS64), or None if it is gone."""
    from pyroute2 import IPRoute, NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr = NetNS(netns) if netns else IPRoute()
    except Exception as e:  # the namespace may be gone at shutdown
        log.debug("metrics_netns_unavailable", netns=netns, error=str(e))
        return None
    try:
        found = ipr.link_lookup(ifname=tap)
        if not found:
            return None
        stats = ipr.get_links(found[0])[0].get_attr("IFLA_STATS64")
        return dict(stats) if stats else None
    except NetlinkError:
        return None
    finally:
        ipr.close()


class VmCollector:
    """A prometheus_client custom collector over one ControlledVm."""

    def __init__(self, vm: ControlledVm) -> None:
        self.vm = vm

    def describe(self) -> list[Any]:
        return []  # metrics are only known at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        vm = self.vm
        exits = CounterMetricFamily("pymvm_vcpu_exits", "vCPU exits handled by the Python run "
                                    "loop, by kind", labels=["vcpu", "kind"])
        for vcpu, counts in enumerate(list(vm.machine.exit_counts)):
            for reason, n in sorted(counts.copy().items()):
                exits.add_metric([str(vcpu), exit_kind(reason)], n)
        yield exits

        devices = vm.devices.mmio_devices() if vm.devices is not None else []
        fast = CounterMetricFamily("pymvm_fast_mmio_reads", "InterruptStatus reads answered by "
                                   "the vCPU's C loop without an exit to Python", labels=["device"])
        for d in devices:
            if d.fast_read is not None:
                fast.add_metric([d.id], d.fast_read.hits)
        yield fast

        packets = CounterMetricFamily("pymvm_net_packets", "Packets of a NIC from the guest's "
                                      "view (its TAP's counters)", labels=["device", "direction"])
        octets = CounterMetricFamily("pymvm_net_bytes", "Bytes of a NIC from the guest's view "
                                     "(its TAP's counters)", labels=["device", "direction"])
        reconnects = CounterMetricFamily("pymvm_vhost_user_reconnects", "Connections to a "
                                         "vhost-user back-end after the first", labels=["device"])
        link = GaugeMetricFamily("pymvm_net_link_up", "1 when the guest sees the NIC's carrier",
                                 labels=["device"])
        for d in devices:
            if d.kind != "net":
                continue
            link.add_metric([d.id], 1 if getattr(d.device, "link_up", True) else 0)
            connections = getattr(d.backend.obj, "connections", None)
            if isinstance(connections, int):
                reconnects.add_metric([d.id], max(0, connections - 1))
            tap = d.info.get("tap")
            stats = tap_counters(tap, d.info.get("netns")) if tap else None
            if stats is None:
                continue
            # What the TAP receives the guest sent, and the reverse.
            packets.add_metric([d.id, "tx"], stats.get("rx_packets", 0))
            packets.add_metric([d.id, "rx"], stats.get("tx_packets", 0))
            octets.add_metric([d.id, "tx"], stats.get("rx_bytes", 0))
            octets.add_metric([d.id, "rx"], stats.get("tx_bytes", 0))
        yield from (packets, octets, reconnects, link)

        boot = GaugeMetricFamily("pymvm_guest_boot_time_seconds", "From the VMM's start to the "
                                 "guest's write to the boot timer (absent before it)")
        boot_us = vm.boot_time_us()
        if boot_us is not None:
            boot.add_metric([], boot_us / 1e6)
        yield boot
        yield GaugeMetricFamily("pymvm_uptime_seconds", "Seconds since the VMM started",
                                value=(time.monotonic_ns() - vm.started_ns) / 1e9)
        paused = vm.machine.state.value == "paused"
        yield GaugeMetricFamily("pymvm_vm_paused", "1 while the vCPUs are parked", value=int(paused))


class VmMetrics:
    """One CollectorRegistry per VM (never the process-global one). prometheus_client is
    imported at the first scrape, not with the API: a VM nobody scrapes never loads it."""

    def __init__(self, vm: ControlledVm) -> None:
        self.vm = vm
        self._registry: Any = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(VmCollector(self.vm))
            self._registry = registry
        return self._registry

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
