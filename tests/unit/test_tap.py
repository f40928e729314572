"""TAP offload mapping, and real TAP devices on this host (/dev/net/tun, as root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from pymvm.net.errors import TapError
from pymvm.net.tap import Tap, tap_offload_flags
from pymvm.vhost._vhost_cffi import lib

needs_tun = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun",
)

CSUM = 1 << lib.VIRTIO_NET_F_GUEST_CSUM
TSO4 = 1 << lib.VIRTIO_NET_F_GUEST_TSO4
TSO6 = 1 << lib.VIRTIO_NET_F_GUEST_TSO6
ECN = 1 << lib.VIRTIO_NET_F_GUEST_ECN
UFO = 1 << lib.VIRTIO_NET_F_GUEST_UFO


def test_no_guest_csum_means_no_tap_offloads() -> None:
    assert tap_offload_flags(TSO4 | TSO6 | ECN | UFO) == 0


def test_guest_receive_offloads_map_to_tun_flags() -> None:
    assert tap_offload_flags(CSUM) == lib.TUN_F_CSUM
    assert tap_offload_flags(CSUM | TSO4) == lib.TUN_F_CSUM | lib.TUN_F_TSO4
    assert tap_offload_flags(CSUM | TSO4 | TSO6 | ECN | UFO) == (
        lib.TUN_F_CSUM | lib.TUN_F_TSO4 | lib.TUN_F_TSO6 | lib.TUN_F_TSO_ECN | lib.TUN_F_UFO
    )


def test_guest_ecn_without_tso_is_not_offloaded() -> None:
    assert tap_offload_flags(CSUM | ECN) == lib.TUN_F_CSUM


def test_host_side_offloads_do_not_change_tap_flags() -> None:
    host = (1 << lib.VIRTIO_NET_F_CSUM) | (1 << lib.VIRTIO_NET_F_HOST_TSO4)
    assert tap_offload_flags(host) == 0


def test_too_long_name_is_refused_before_touching_the_kernel() -> None:
    with pytest.raises(TapError, match="longer than 15 bytes"):
        Tap.open("x" * 16)


def _link_kind(name: str, netns: str | None = None) -> str | None:
    with IPRoute(netns=netns, flags=0) if netns else IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        return link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND")


@pytest.fixture
def suffix() -> str:
    return os.urandom(3).hex()


@pytest.fixture
def netns_name(suffix: str) -> Iterator[str]:
    name = f"pmtap{suffix}"
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        pyroute2_netns.remove(name)


@needs_tun
def test_kernel_named_tap_exists_while_open_and_vanishes_on_close() -> None:
    tap = Tap.open()
    try:
        assert tap.name.startswith("pymvm")
        assert _link_kind(tap.name) == "tun"
    finally:
        tap.close()
    assert _link_kind(tap.name) is None
    tap.close()  # idempotent
    with pytest.raises(TapError, match="closed"):
        _ = tap.fd


@needs_tun
def test_tap_has_vnet_header_settable_to_12_and_accepts_offloads(suffix: str) -> None:
    with Tap.open(f"pmt{suffix}") as tap:
        out = subprocess.run(
            ["ip", "-d", "link", "show", tap.name], capture_output=True, text=True, check=True
        ).stdout
        assert "vnet_hdr on" in out and "pi off" in out
        tap.set_vnet_hdr_size(12)
        assert tap.vnet_hdr_size() == 12
        assert tap.set_offload(CSUM | TSO4 | TSO6 | ECN | UFO) & lib.TUN_F_TSO6


@needs_tun
def test_second_open_of_a_held_tap_name_reports_busy(suffix: str) -> None:
    with Tap.open(f"pmt{suffix}") as tap:
        with pytest.raises(TapError, match="is busy: .* choose another name"):
            Tap.open(tap.name)


@needs_tun
def test_name_of_a_non_tap_interface_is_refused() -> None:
    with pytest.raises(TapError, match="exists and is not a TAP"):
        Tap.open("lo")


@needs_tun
def test_tap_opened_in_a_netns_lives_there_only(netns_name: str, suffix: str) -> None:
    name = f"pmt{suffix}"
    with Tap.open(name, netns=netns_name) as tap:
        assert tap.netns == netns_name
        assert _link_kind(name, netns_name) == "tun"
        assert _link_kind(name) is None
    assert _link_kind(name, netns_name) is None


@needs_tun
def test_tap_in_missing_netns_raises_tap_error(suffix: str) -> None:
    with pytest.raises(TapError, match="cannot enter network namespace"):
        Tap.open(netns=f"pmnone{suffix}")
    assert f"pmnone{suffix}" not in pyroute2_netns.listnetns()
