"""Host side of a VM's network: its TAP, an optional bridge and network namespace.

``HostNetwork`` records an undo step for everything it creates or changes and, on
close(), undoes exactly those in reverse order: a bridge, namespace or TAP that existed
before is used and left in place. close() is idempotent and also runs after a failed
setup, so a half-built network never leaks.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog
from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from pymvm import state
from pymvm.net.errors import HostNetworkError
from pymvm.net.tap import MAX_NAME_LEN, Tap

log = structlog.get_logger()


@contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    # flags=0: never let pyroute2 create a namespace behind our back.
    ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _netlink_error(action: str, exc: NetlinkError) -> HostNetworkError:
    hint = {
        errno.EPERM: ": run as root (needs CAP_NET_ADMIN)",
        errno.EEXIST: ": an interface of that name already exists; choose another name",
        errno.EINVAL: ": the value is out of range for this interface",
    }.get(exc.code, "")
    return HostNetworkError(f"{action} failed: {exc.args[-1] if exc.args else exc}{hint}")


# Marks bridges pymvm created, so that the last VM using one removes it, whoever made it.
BRIDGE_ALIAS = "pymvm: created for VM networking"


def _link_alias(ipr: IPRoute, idx: int) -> str | None:
    links = ipr.get_links(idx)
    return links[0].get_attr("IFLA_IFALIAS") if links else None


class HostNetwork:
    """Owner of one VM's TAP and the host plumbing made for it.

    Close the vhost-net device using ``tap.fd`` before close(): vhost holds a reference
    to the TAP file, which keeps a TAP alive until vhost lets go of it.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._tap: Tap | None = None
        self.netns: str | None = None
        self.bridge: str | None = None

    @classmethod
    def create(
        cls,
        tap: str | None = None,
        *,
        mtu: int | None = None,
        bridge: str | None = None,
        bridge_address: str | None = None,
        netns: str | None = None,
        multi_queue: bool = False,
        tap_address: str | None = None,
        host_address: str | None = None,
    ) -> HostNetwork:
        """Open TAP ``tap`` (kernel-named if None) and bring it up, optionally inside
        network namespace ``netns`` and attached to ``bridge`` (``bridge_address`` is a
        CIDR such as ``"10.0.2.1/24"`` put on the bridge). ``host_address`` is the host's
        side of the VM's link: it goes on the bridge when there is one, else on the TAP."""
        if host_address is not None:
            if bridge is not None:
                bridge_address = host_address
            else:
                tap_address = host_address
        for what, name in (("bridge", bridge), ("network namespace", netns)):
            if name is not None and not 0 < len(name.encode()) <= MAX_NAME_LEN:
                raise HostNetworkError(
                    f"{what} name {name!r} must be 1-{MAX_NAME_LEN} bytes: choose another name"
                )
        if bridge_address is not None and bridge is None:
            raise HostNetworkError("bridge_address needs a bridge: set bridge as well")
        net = cls()
        try:
            net._setup(tap, mtu, bridge, bridge_address, netns, multi_queue, tap_address)
        except BaseException:
            net.close()
            raise
        return net

    @property
    def tap(self) -> Tap:
        if self._tap is None:
            raise HostNetworkError("host network is closed: create a new HostNetwork")
        return self._tap

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def _setup(
        self,
        tap_name: str | None,
        mtu: int | None,
        bridge: str | None,
        bridge_address: str | None,
        netns: str | None,
        multi_queue: bool,
        tap_address: str | None = None,
    ) -> None:
        self.netns, self.bridge = netns, bridge
        if netns is not None and netns not in pyroute2_netns.listnetns():
            try:
                pyroute2_netns.create(netns)
            except OSError as exc:
                raise HostNetworkError(
                    f"creating network namespace {netns!r} failed: {exc}: run as root"
                ) from None
            self._push(f"netns {netns}", lambda: pyroute2_netns.remove(netns))
            state.record("netns", name=netns)
            log.info("netns_created", netns=netns)

        with _ipr(netns) as ipr:
            tap_existed = tap_name is not None and _link_index(ipr, tap_name) is not None
        tap = Tap.open(tap_name, netns=netns, multi_queue=multi_queue)
        self._tap = tap
        self._push(f"tap {tap.name}", self._close_tap)
        if not tap_existed:  # goes with our fd, unless someone makes it persistent
            state.record("tap", name=tap.name, netns=netns)

        with _ipr(netns) as ipr:
            tap_idx = _link_index(ipr, tap.name)
            if tap_idx is None:
                raise HostNetworkError(f"TAP {tap.name!r} vanished right after it was opened")
            try:
                if mtu is not None:
                    ipr.link("set", index=tap_idx, mtu=mtu)
                ipr.link("set", index=tap_idx, state="up")
            except NetlinkError as exc:
                raise _netlink_error(f"configuring TAP {tap.name!r} (mtu={mtu})", exc) from None
            if tap_address is not None:
                self._add_address(ipr, tap.name, tap_idx, tap_address, removed_with_link=not tap_existed)
            if bridge is not None:
                self._attach_bridge(ipr, tap.name, tap_idx, tap_existed, bridge, bridge_address)
        log.info("host_network_ready", tap=tap.name, bridge=bridge, netns=netns, mtu=mtu)

    def _attach_bridge(
        self,
        ipr: IPRoute,
        tap_name: str,
        tap_idx: int,
        tap_existed: bool,
        bridge: str,
        bridge_address: str | None,
    ) -> None:
        netns = self.netns
        br_idx = _link_index(ipr, bridge)
        created = br_idx is None
        try:
            if created:
                try:
                    ipr.link("add", ifname=bridge, kind="bridge")
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    created = False  # another VM made it between our lookup and our add
                br_idx = _link_index(ipr, bridge)
                assert br_idx is not None
                if created:
                    state.record("bridge", name=bridge, netns=netns)
                    ipr.link("set", index=br_idx, ifalias=BRIDGE_ALIAS)
                    log.info("bridge_created", bridge=bridge, netns=netns)
            # A bridge pymvm made (ours or another VM's) goes with its last pymvm user.
            if created or _link_alias(ipr, br_idx) == BRIDGE_ALIAS:
                self._push(f"bridge {bridge}", lambda: self._del_bridge_if_unused(bridge))
            ipr.link("set", index=br_idx, state="up")
        except NetlinkError as exc:
            raise _netlink_error(f"creating bridge {bridge!r}", exc) from None

        if bridge_address is not None:
            try:
                iface = ipaddress.ip_interface(bridge_address)
            except ValueError:
                raise HostNetworkError(
                    f"bridge address {bridge_address!r} is not a CIDR like 10.0.2.1/24"
                ) from None
            addr, plen = str(iface.ip), iface.network.prefixlen
            try:
                ipr.addr("add", index=br_idx, address=addr, prefixlen=plen)
                state.record("address", dev=bridge, address=addr, prefixlen=plen, netns=netns)
                if not created:  # a bridge we delete takes its addresses with it
                    self._push(
                        f"address {iface} on {bridge}",
                        lambda: self._del_addr(bridge, addr, plen),
                    )
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # already there: not ours to remove
                    raise _netlink_error(f"adding {iface} to bridge {bridge!r}", exc) from None

        try:
            ipr.link("set", index=tap_idx, master=br_idx)
        except NetlinkError as exc:
            raise _netlink_error(f"attaching TAP {tap_name!r} to bridge {bridge!r}", exc) from None
        if tap_existed:  # a TAP we created leaves the bridge when it disappears
            self._push(f"{tap_name} on {bridge}", lambda: self._detach(tap_name))
        log.info("tap_attached", tap=tap_name, bridge=bridge, netns=netns)

    def _add_address(self, ipr: IPRoute, name: str, idx: int, address: str,
                     removed_with_link: bool) -> None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise HostNetworkError(f"address {address!r} for {name!r} is not a CIDR like 10.0.0.1/24") from None
        addr, plen = str(iface.ip), iface.network.prefixlen
        try:
            ipr.addr("add", index=idx, address=addr, prefixlen=plen)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:  # already there: not ours to remove
                return
            raise _netlink_error(f"adding {iface} to {name!r}", exc) from None
        state.record("address", dev=name, address=addr, prefixlen=plen, netns=self.netns)
        if not removed_with_link:
            self._push(f"address {iface} on {name}", lambda: self._del_addr(name, addr, plen))

    # ---- undo steps: each opens its own netlink socket so close() works after errors ----

    def _close_tap(self) -> None:
        if self._tap is not None:
            self._tap.close()
            self._tap = None

    def _del_bridge_if_unused(self, name: str) -> None:
        # Several VMs may share a bridge that the first of them created: the last one out
        # (no other ports left once our TAP is gone) removes it.
        with _ipr(self.netns) as ipr:
            idx = _link_index(ipr, name)
            if idx is None:
                return
            ours = self._tap.name if self._tap is not None else None
            ports = [link for link in ipr.get_links()
                     if link.get_attr("IFLA_MASTER") == idx and link.get_attr("IFLA_IFNAME") != ours]
            if ports:
                log.info("bridge_kept", bridge=name, ports=len(ports))
                return
            ipr.link("del", index=idx)

    def _del_addr(self, name: str, addr: str, plen: int) -> None:
        with _ipr(self.netns) as ipr:
            idx = _link_index(ipr, name)
            if idx is not None:
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)

    def _detach(self, name: str) -> None:
        with _ipr(self.netns) as ipr:
            idx = _link_index(ipr, name)
            if idx is not None:
                ipr.link("set", index=idx, master=0)

    def close(self) -> None:
        """Undo everything this object made, newest first; safe to call repeatedly."""
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
                log.info("host_network_undone", what=what)
            except Exception as exc:  # keep going: the other steps still need undoing
                log.warning("host_network_undo_failed", what=what, error=str(exc))
