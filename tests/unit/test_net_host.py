"""HostNetwork on this host: TAP + bridge + netns are created, and exactly those removed."""

from __future__ import annotations

import contextlib
import json
import errno
import os
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from pymvm.net.errors import HostNetworkError
from pymvm.net import host
from pymvm.net.host import HostNetwork

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun",
)


class Names:
    def __init__(self) -> None:
        sfx = os.urandom(3).hex()
        self.tap, self.bridge, self.netns = f"pmt{sfx}", f"pmbr{sfx}", f"pmns{sfx}"


@pytest.fixture
def names() -> Iterator[Names]:
    n = Names()
    try:
        yield n
    finally:  # never leak test interfaces, whatever the test did
        for ifname in (n.tap, n.bridge):
            subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        if n.netns in pyroute2_netns.listnetns():
            pyroute2_netns.remove(n.netns)


def link(name: str, netns: str | None = None):
    if netns is not None and netns not in pyroute2_netns.listnetns():
        return None
    with IPRoute(netns=netns, flags=0) if netns else IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return ipr.get_links(found[0])[0] if found else None


def addresses(name: str, netns: str | None = None) -> set[str]:
    with IPRoute(netns=netns, flags=0) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)}


def test_tap_on_new_bridge_in_new_netns_is_built_and_fully_removed(names: Names) -> None:
    net = HostNetwork.create(
        names.tap, mtu=1400, bridge=names.bridge, bridge_address="10.213.0.1/24", netns=names.netns
    )
    try:
        assert names.netns in pyroute2_netns.listnetns()
        tap, br = link(names.tap, names.netns), link(names.bridge, names.netns)
        assert tap is not None and br is not None
        assert tap.get_attr("IFLA_MTU") == 1400
        assert tap.get_attr("IFLA_OPERSTATE") != "DOWN" and tap["flags"] & 1  # IFF_UP
        assert br["flags"] & 1
        assert tap.get_attr("IFLA_MASTER") == br["index"]
        assert "10.213.0.1/24" in addresses(names.bridge, names.netns)
        assert link(names.tap) is None and link(names.bridge) is None  # not in the host ns
    finally:
        net.close()
    assert names.netns not in pyroute2_netns.listnetns()
    assert link(names.tap) is None and link(names.bridge) is None
    net.close()  # idempotent


def test_existing_bridge_and_netns_are_kept_and_only_our_address_removed(names: Names) -> None:
    pyroute2_netns.create(names.netns)
    with IPRoute(netns=names.netns, flags=0) as ipr:
        ipr.link("add", ifname=names.bridge, kind="bridge")
    with HostNetwork.create(
        names.tap, bridge=names.bridge, bridge_address="10.214.0.1/24", netns=names.netns
    ) as net:
        assert link(names.tap, names.netns).get_attr("IFLA_MASTER") == link(
            names.bridge, names.netns
        )["index"]
        assert net.tap.netns == names.netns
    assert names.netns in pyroute2_netns.listnetns()
    assert link(names.bridge, names.netns) is not None
    assert "10.214.0.1/24" not in addresses(names.bridge, names.netns)
    assert link(names.tap, names.netns) is None


def test_preexisting_persistent_tap_is_used_detached_and_not_deleted(names: Names) -> None:
    subprocess.run(
        ["ip", "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"], check=True
    )
    with HostNetwork.create(names.tap, bridge=names.bridge):
        assert link(names.tap).get_attr("IFLA_MASTER") == link(names.bridge)["index"]
    tap = link(names.tap)
    assert tap is not None, "a TAP the user made must survive"
    assert not tap.get_attr("IFLA_MASTER")
    assert link(names.bridge) is None


def test_tap_only_without_bridge_comes_up_in_host_netns() -> None:
    with HostNetwork.create() as net:
        name = net.tap.name
        assert link(name)["flags"] & 1
    assert link(name) is None


def test_bad_bridge_address_fails_and_undoes_bridge_and_netns(names: Names) -> None:
    with pytest.raises(HostNetworkError, match="not a CIDR"):
        HostNetwork.create(
            names.tap, bridge=names.bridge, bridge_address="10.0.0.300/24", netns=names.netns
        )
    assert names.netns not in pyroute2_netns.listnetns()
    assert link(names.bridge) is None and link(names.tap) is None


def test_out_of_range_mtu_fails_with_host_network_error_and_removes_the_tap(names: Names) -> None:
    with pytest.raises(HostNetworkError, match=f"configuring TAP '{names.tap}'"):
        HostNetwork.create(names.tap, mtu=10)
    assert link(names.tap) is None


def test_bridge_address_without_bridge_is_refused() -> None:
    with pytest.raises(HostNetworkError, match="^bridge_address needs a bridge: set bridge as well$"):
        HostNetwork.create(bridge_address="10.0.0.1/24")


def test_too_long_bridge_name_is_refused() -> None:
    with pytest.raises(HostNetworkError, match="bridge name .* must be 1-15 bytes"):
        HostNetwork.create(bridge="b" * 16)


def test_tap_property_after_close_raises() -> None:
    net = HostNetwork.create()
    net.close()
    with pytest.raises(HostNetworkError, match="closed"):
        _ = net.tap


def test_host_address_goes_on_the_tap_without_a_bridge_and_on_the_bridge_with_one(names: Names) -> None:
    with HostNetwork.create(names.tap, host_address="10.214.0.1/24"):
        assert "10.214.0.1/24" in addresses(names.tap)
    assert link(names.tap) is None
    with HostNetwork.create(names.tap, bridge=names.bridge, host_address="10.214.1.1/24"):
        assert "10.214.1.1/24" in addresses(names.bridge)
        assert not any(a.startswith("10.214.") for a in addresses(names.tap))
    assert link(names.bridge) is None


# ---- bridges shared with others: another VM's, or one the user made ---------------------------


def ports_of(bridge: str) -> set[str]:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)[0]
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                if link.get_attr("IFLA_MASTER") == idx}


def add_veth(name: str) -> None:
    """A port for a bridge that is none of pymvm's (a veth pair; its peer goes with it)."""
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"],
                   check=True)


def test_bridge_shared_by_two_vms_stays_until_the_last_one_closes(names: Names) -> None:
    first = HostNetwork.create(bridge=names.bridge)  # pymvm makes the bridge
    second = HostNetwork.create(bridge=names.bridge)  # and finds it there
    try:
        assert ports_of(names.bridge) == {first.tap.name, second.tap.name}
        first.close()
        assert link(names.bridge) is not None, "the other VM is still on the bridge"
        assert ports_of(names.bridge) == {second.tap.name}
        second_tap = second.tap.name
    finally:
        first.close()
        second.close()
    assert link(names.bridge) is None  # the last pymvm user took the bridge it made
    assert link(second_tap) is None


def test_pymvm_bridge_that_gained_a_foreign_port_is_kept(names: Names) -> None:
    port = f"pmv{names.tap[3:]}"
    try:
        with HostNetwork.create(bridge=names.bridge):
            add_veth(port)
            subprocess.run(["ip", "link", "set", port, "master", names.bridge], check=True)
        assert link(names.bridge) is not None
        assert ports_of(names.bridge) == {port}
    finally:
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def test_user_made_bridge_keeps_its_ports_and_loses_only_our_tap(names: Names) -> None:
    port = f"pmv{names.tap[3:]}"
    subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
    try:
        add_veth(port)
        subprocess.run(["ip", "link", "set", port, "master", names.bridge], check=True)
        with HostNetwork.create(bridge=names.bridge) as net:
            assert ports_of(names.bridge) == {port, net.tap.name}
        assert link(names.bridge) is not None
        assert ports_of(names.bridge) == {port}
    finally:
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def test_preexisting_tap_is_detached_from_a_user_made_bridge_and_both_are_kept(
        names: Names) -> None:
    subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
    subprocess.run(
        ["ip", "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"], check=True
    )
    with HostNetwork.create(names.tap, bridge=names.bridge):
        assert link(names.tap).get_attr("IFLA_MASTER") == link(names.bridge)["index"]
    assert link(names.bridge) is not None, "a bridge the user made must survive"
    tap = link(names.tap)
    assert tap is not None, "a TAP the user made must survive"
    assert not tap.get_attr("IFLA_MASTER"), "our attachment must be undone"
    assert ports_of(names.bridge) == set()


# ---- addresses on a TAP that existed before, and netlink errors -------------------------------


def test_host_address_on_a_preexisting_tap_is_removed_at_close_and_the_tap_kept(
        names: Names) -> None:
    subprocess.run(["ip", "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"],
                   check=True)
    with HostNetwork.create(names.tap, host_address="10.215.0.1/24"):
        assert "10.215.0.1/24" in addresses(names.tap)
    assert link(names.tap) is not None
    assert not any(a.startswith("10.215.") for a in addresses(names.tap))


def test_address_already_on_a_preexisting_tap_is_left_there(names: Names) -> None:
    subprocess.run(["ip", "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"],
                   check=True)
    subprocess.run(["ip", "addr", "add", "10.216.0.1/24", "dev", names.tap], check=True)
    with HostNetwork.create(names.tap, host_address="10.216.0.1/24"):
        assert "10.216.0.1/24" in addresses(names.tap)
    assert "10.216.0.1/24" in addresses(names.tap), "not ours to remove"


def test_bad_tap_address_names_the_tap_and_leaves_nothing(names: Names) -> None:
    with pytest.raises(HostNetworkError,
                       match=rf"address '10.0.0.300/24' for '{names.tap}' is not a CIDR"):
        HostNetwork.create(names.tap, tap_address="10.0.0.300/24")
    assert link(names.tap) is None


def test_bridge_made_by_someone_else_between_lookup_and_add_is_used_and_kept(
        names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another VM (or the user) creates the bridge after our lookup: our add gets EEXIST.
    subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
    real_index = host._link_index
    looked_up: list[str] = []

    def first_lookup_misses(ipr, name: str):
        if name == names.bridge and name not in looked_up:
            looked_up.append(name)
            return None
        return real_index(ipr, name)

    monkeypatch.setattr(host, "_link_index", first_lookup_misses)
    with HostNetwork.create(names.tap, bridge=names.bridge) as net:
        assert link(names.tap).get_attr("IFLA_MASTER") == link(names.bridge)["index"]
        assert net.bridge == names.bridge
    assert looked_up == [names.bridge]
    assert link(names.bridge) is not None, "a bridge we did not make must survive"
    assert not link(names.bridge).get_attr("IFLA_IFALIAS")  # and is not marked as ours


@pytest.mark.parametrize(("code", "hint"), [
    (errno.EPERM, ": run as root (needs CAP_NET_ADMIN)"),
    (errno.EEXIST, ": an interface of that name already exists; choose another name"),
    (errno.EINVAL, ": the value is out of range for this interface"),
    (errno.ENODEV, ""),
])
def test_netlink_errors_name_the_action_the_kernel_message_and_a_hint(
        code: int, hint: str) -> None:
    err = host._netlink_error("creating bridge 'br0'", NetlinkError(code, "kernel says no"))
    assert isinstance(err, HostNetworkError)
    assert str(err) == f"creating bridge 'br0' failed: kernel says no{hint}"


# ---- a user's namespace, refused netlink requests, name limits --------------------------------


def test_in_a_users_netns_our_bridge_goes_and_the_netns_stays(names: Names) -> None:
    pyroute2_netns.create(names.netns)
    with HostNetwork.create(names.tap, bridge=names.bridge, netns=names.netns):
        assert link(names.bridge, names.netns) is not None
    assert names.netns in pyroute2_netns.listnetns()
    assert link(names.bridge, names.netns) is None, "the bridge we made goes with us"
    assert link(names.tap, names.netns) is None


def test_in_a_users_netns_a_users_tap_is_detached_from_a_users_bridge(names: Names) -> None:
    pyroute2_netns.create(names.netns)
    ns = ["ip", "-n", names.netns]
    subprocess.run([*ns, "link", "add", names.bridge, "type", "bridge"], check=True)
    subprocess.run([*ns, "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"],
                   check=True)
    with HostNetwork.create(names.tap, bridge=names.bridge, netns=names.netns,
                            host_address="10.217.0.1/24"):
        assert link(names.tap, names.netns).get_attr("IFLA_MASTER") == link(
            names.bridge, names.netns)["index"]
    tap = link(names.tap, names.netns)
    assert tap is not None and not tap.get_attr("IFLA_MASTER")
    assert link(names.bridge, names.netns) is not None
    assert not any(a.startswith("10.217.") for a in addresses(names.bridge, names.netns))


def test_address_already_on_a_users_bridge_is_left_there(names: Names) -> None:
    subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "10.218.0.1/24", "dev", names.bridge], check=True)
    with HostNetwork.create(names.tap, bridge=names.bridge, host_address="10.218.0.1/24"):
        pass
    assert "10.218.0.1/24" in addresses(names.bridge), "not ours to remove"


def test_bridge_name_that_is_no_bridge_is_refused_naming_tap_and_bridge(names: Names) -> None:
    port = f"pmv{names.tap[3:]}"
    add_veth(port)
    try:
        with pytest.raises(HostNetworkError,
                           match=rf"^attaching TAP '{names.tap}' to bridge '{port}' failed: "):
            HostNetwork.create(names.tap, bridge=port)
        assert link(names.tap) is None and link(port) is not None
    finally:
        subprocess.run(["ip", "link", "del", port], capture_output=True)


def test_bridge_the_kernel_refuses_to_create_is_reported_and_nothing_left(names: Names) -> None:
    with pytest.raises(HostNetworkError, match=r"^creating bridge 'br x' failed: "):
        HostNetwork.create(names.tap, bridge="br x")  # the kernel takes no spaces in names
    assert link(names.tap) is None


@pytest.mark.parametrize("where", ["tap", "bridge"])
def test_refused_address_is_reported_naming_it_and_nothing_left(
        names: Names, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    real_ipr = host._ipr

    class RefusingAddresses:
        def __init__(self, ipr: IPRoute) -> None:
            self._ipr = ipr

        def __getattr__(self, name: str):
            return getattr(self._ipr, name)

        def addr(self, command: str, *args, **kwargs):
            if command == "add":
                raise NetlinkError(errno.EPERM, "Operation not permitted")
            return self._ipr.addr(command, *args, **kwargs)

    @contextlib.contextmanager
    def refusing_ipr(netns):
        with real_ipr(netns) as ipr:
            yield RefusingAddresses(ipr)

    monkeypatch.setattr(host, "_ipr", refusing_ipr)
    bridge = names.bridge if where == "bridge" else None
    device = names.bridge if where == "bridge" else names.tap
    target = f"bridge '{device}'" if where == "bridge" else f"'{device}'"
    with pytest.raises(HostNetworkError, match=(
            rf"^adding 10.219.0.1/24 to {target} failed: Operation not permitted: run as root")):
        HostNetwork.create(names.tap, bridge=bridge, host_address="10.219.0.1/24")
    assert link(names.tap) is None and link(names.bridge) is None


@pytest.mark.parametrize(("what", "key"), [("bridge", "bridge"),
                                           ("network namespace", "netns")])
def test_names_of_1_to_15_bytes_are_taken_and_others_refused(what: str, key: str) -> None:
    for bad in ("", "n" * 16):
        with pytest.raises(HostNetworkError,
                           match=rf"^{what} name '{bad}' must be 1-15 bytes: choose another"):
            HostNetwork.create(**{key: bad})


def test_a_15_byte_bridge_name_is_taken(names: Names) -> None:
    name = (names.bridge + "x" * 15)[:15]
    try:
        with HostNetwork.create(bridge=name):
            assert link(name) is not None
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_multi_queue_tap_is_made_when_asked(names: Names) -> None:
    iff_multi_queue = 0x0100  # <linux/if_tun.h>
    with HostNetwork.create(names.tap, multi_queue=True):
        flags = int(open(f"/sys/class/net/{names.tap}/tun_flags").read(), 16)
        assert flags & iff_multi_queue
    with HostNetwork.create(names.tap):
        flags = int(open(f"/sys/class/net/{names.tap}/tun_flags").read(), 16)
        assert not flags & iff_multi_queue


def test_netns_that_cannot_be_created_is_reported_and_nothing_left(
        names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(host.pyroute2_netns, "create", refuse)
    with pytest.raises(HostNetworkError, match=(
            rf"^creating network namespace '{names.netns}' failed: .*Operation not permitted.*: "
            "run as root$")):
        HostNetwork.create(names.tap, netns=names.netns)
    assert names.netns not in pyroute2_netns.listnetns() and link(names.tap) is None


# ---- what a VMM records for the cleanup after it dies (pymvm.state) ---------------------------


def recorded(st) -> list[dict]:
    from pymvm import state

    return [json.loads(line) for line in (st.path / state.RESOURCES).read_text().splitlines()]


def test_created_bridge_netns_and_addresses_are_recorded_for_cleanup(
        names: Names, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymvm import state

    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path))
    with state.vm_state("rec") as st:
        with HostNetwork.create(names.tap, bridge=names.bridge, netns=names.netns,
                                host_address="10.220.0.1/24"):
            records = recorded(st)
    assert {"kind": "netns", "name": names.netns} in records
    assert {"kind": "bridge", "name": names.bridge, "netns": names.netns} in records
    assert {"kind": "tap", "name": names.tap, "netns": names.netns} in records
    assert {"kind": "address", "dev": names.bridge, "address": "10.220.0.1", "prefixlen": 24,
            "netns": names.netns} in records


def test_addresses_put_on_existing_devices_are_recorded_for_cleanup(
        names: Names, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymvm import state

    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path))
    subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "tuntap", "add", "name", names.tap, "mode", "tap", "vnet_hdr"],
                   check=True)
    with state.vm_state("rec") as st:
        with HostNetwork.create(names.tap, bridge=names.bridge, host_address="10.221.0.1/24"):
            pass
        with HostNetwork.create(names.tap, host_address="10.221.1.1/24"):
            records = recorded(st)
    assert {"kind": "address", "dev": names.bridge, "address": "10.221.0.1", "prefixlen": 24,
            "netns": None} in records
    assert {"kind": "address", "dev": names.tap, "address": "10.221.1.1", "prefixlen": 24,
            "netns": None} in records
    assert not any(r["kind"] in ("bridge", "tap") for r in records)  # none of them are ours


def test_address_on_a_users_tap_in_a_netns_is_recorded_with_the_netns(
        names: Names, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymvm import state

    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path))
    pyroute2_netns.create(names.netns)
    subprocess.run(["ip", "-n", names.netns, "tuntap", "add", "name", names.tap, "mode", "tap",
                    "vnet_hdr"], check=True)
    with state.vm_state("rec") as st:
        with HostNetwork.create(names.tap, netns=names.netns, host_address="10.222.0.1/24"):
            records = recorded(st)
    assert {"kind": "address", "dev": names.tap, "address": "10.222.0.1", "prefixlen": 24,
            "netns": names.netns} in records


def test_a_one_byte_bridge_name_is_taken() -> None:
    try:
        with HostNetwork.create(bridge="~"):
            assert link("~") is not None
    finally:
        subprocess.run(["ip", "link", "del", "~"], capture_output=True)
    assert link("~") is None
