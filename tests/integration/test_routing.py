"""Router: kernel FIB lookups, caching, and invalidation from route/link events."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest

from ctxdp.datapath.netlink import Netlink
from ctxdp.datapath.routing import RTN_LOCAL, Router
from tests.integration import topo as topo_mod

pytestmark = pytest.mark.privileged

topo = topo_mod.topology_fixture()


def _a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _lookups() -> dict:
    nl = Netlink()
    r = Router(nl)
    p0, p1 = socket.if_nametoindex("p0"), socket.if_nametoindex("p1")

    conn4 = r.lookup(4, _a("10.0.2.2"))
    assert conn4 is not None and conn4.forwardable
    assert (conn4.oif, conn4.gateway, conn4.next_hop) == (p1, None, _a("10.0.2.2"))
    assert conn4.prefsrc == _a("10.0.2.1")
    conn6 = r.lookup(6, _a("fd00:1::2"))
    assert conn6 is not None and (conn6.oif, conn6.gateway) == (p0, None)

    local = r.lookup(4, _a("10.0.1.1"))
    assert local is not None and local.rtype == RTN_LOCAL and not local.forwardable

    assert r.lookup(4, _a("203.0.113.7")) is None  # no default route in the router
    assert r.lookup(6, _a("2001:db8::7")) is None

    _ip("route", "add", "10.98.0.0/16", "via", "10.0.2.2", "mtu", "1400")
    _ip("-6", "route", "add", "fd98::/64", "via", "fd00:2::2")
    _ip("route", "add", "unreachable", "10.97.0.0/16")
    nl.handle_events()
    gw4 = r.lookup(4, _a("10.98.3.4"))
    assert gw4 is not None
    assert (gw4.oif, gw4.gateway, gw4.next_hop, gw4.mtu) == (p1, _a("10.0.2.2"), _a("10.0.2.2"), 1400)
    gw6 = r.lookup(6, _a("fd98::9"))
    assert gw6 is not None and (gw6.oif, gw6.gateway) == (p1, _a("fd00:2::2"))
    assert r.lookup(4, _a("10.97.0.1")) is None

    before = r.stats["kernel_lookups"]
    for _ in range(5):
        assert r.lookup(4, _a("10.98.3.4")) == gw4
    assert r.stats["kernel_lookups"] == before
    nl.close()
    return {}


def test_lookup_follows_the_kernel_fib(topo):
    """Connected, gatewayed (with MTU metric), local and missing routes come back as the
    kernel decides, for IPv4 and IPv6, and repeated lookups are served from the cache."""
    topo.router.run(_lookups)


def _invalidation() -> dict:
    nl = Netlink()
    r = Router(nl)
    changes: list = []
    r.on_change(lambda fam, dst, old, new: changes.append((fam, dst, old, new)))
    p0, p1 = socket.if_nametoindex("p0"), socket.if_nametoindex("p1")
    dst4, dst6, other = _a("10.99.1.1"), _a("fd99::1"), _a("10.0.2.2")

    assert r.lookup(4, dst4) is None  # cached negative
    assert r.lookup(6, dst6) is None
    assert r.lookup(4, other) is not None

    _ip("route", "add", "10.99.0.0/16", "via", "10.0.2.2")
    _ip("-6", "route", "add", "fd99::/64", "via", "fd00:2::2")
    assert topo_mod.pump(nl, lambda: len(changes) >= 2)
    got = {c[1]: c for c in changes}
    assert got[dst4][2] is None and got[dst4][3].oif == p1
    assert got[dst6][2] is None and got[dst6][3].gateway == _a("fd00:2::2")
    assert other not in got, "a route change outside the prefix revalidated 10.0.2.2"

    changes.clear()
    _ip("route", "replace", "10.99.0.0/16", "via", "10.0.1.2")
    assert topo_mod.pump(nl, lambda: any(c[1] == dst4 for c in changes))
    (_, _, old, new), = [c for c in changes if c[1] == dst4]
    assert (old.oif, old.gateway) == (p1, _a("10.0.2.2"))
    assert (new.oif, new.gateway) == (p0, _a("10.0.1.2"))
    kl = r.stats["kernel_lookups"]
    assert r.lookup(4, dst4) == new and r.stats["kernel_lookups"] == kl

    changes.clear()
    _ip("route", "del", "10.99.0.0/16")
    assert topo_mod.pump(nl, lambda: any(c[1] == dst4 for c in changes))
    assert [c[3] for c in changes if c[1] == dst4] == [None]
    assert r.lookup(4, dst4) is None

    # IPv4 drops routes through a downed device without RTM_DELROUTE; the
    # link event alone must invalidate the connected destination, and only
    # destinations routed through that link are asked again.
    via_p0 = _a("10.0.1.2")
    assert r.lookup(4, via_p0).oif == p0
    queried: list = []
    real_query = r._query
    r._query = lambda fam, dst: queried.append(dst) or real_query(fam, dst)
    changes.clear()
    _ip("link", "set", "p1", "down")
    assert topo_mod.pump(nl, lambda: any(c[1] == other for c in changes))
    assert [c[3] for c in changes if c[1] == other] == [None]
    assert via_p0 not in queried and dst4 not in queried
    nl.close()
    return {}


def test_cache_invalidates_and_reports_changes(topo):
    """Adding, replacing and deleting a route, and downing a port, each report
    (family, dst, old, new) for the affected cached destinations, update the cache,
    and leave destinations outside the change alone."""
    topo.router.run(_invalidation)


def _input_lookup_refused() -> str:
    proc = subprocess.run(
        ["ip", "route", "get", "10.0.2.2", "from", "10.0.1.2", "iif", "p0"],
        capture_output=True, text=True,
    )
    return proc.stderr if proc.returncode else "ok: " + proc.stdout


def test_kernel_refuses_input_lookups_without_forwarding(topo):
    """With forwarding off the kernel refuses an input (iif) route lookup for a transit
    destination, which is why Router does output lookups."""
    topo.router.exec("sysctl", "-qw", "net.ipv4.ip_forward=0")
    out = topo.router.run(_input_lookup_refused)
    assert not out.startswith("ok"), out
