"""NeighTable: kernel-driven resolution and the valid/MAC-change/invalid callbacks."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest

from ctxdp.datapath.neigh import NUD_FAILED, NeighTable
from ctxdp.datapath.netlink import Netlink
from tests.integration import topo as topo_mod

pytestmark = pytest.mark.privileged

topo = topo_mod.topology_fixture()


def _a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _resolve(client_ns: str, client_mac: bytes) -> dict:
    nl = Netlink()
    nt = NeighTable(nl)
    events: list = []
    nt.on_change(lambda *ev: events.append(ev))
    p0 = socket.if_nametoindex("p0")
    out: dict = {}
    for fam, text in ((4, "10.0.1.2"), (6, "fd00:1::2")):
        addr = _a(text)
        assert nt.lookup(p0, addr) is None
        assert nt.resolve(p0, fam, addr, now=100.0) is True
        assert nt.resolve(p0, fam, addr, now=100.5) is False, "not rate limited"
        assert topo_mod.pump(nl, lambda a=addr: nt.lookup(p0, a) is not None), text
        assert nt.lookup(p0, addr) == client_mac
        assert (p0, addr, None, client_mac) in events
        assert nt.resolve(p0, fam, addr, now=200.0) is False  # already valid: no request

    # The peer changes its MAC and then talks to us: its ARP request / ND
    # solicitation carries the new address and overrides our entry.
    events.clear()
    new_peer = _mac("02:00:00:00:0a:0a")
    subprocess.run(["ip", "-n", client_ns, "link", "set", "eth0", "address", "02:00:00:00:0a:0a"],
                   check=True)
    for target in ("10.0.1.1", "fd00:1::1"):
        subprocess.run(["ip", "netns", "exec", client_ns, "ping", "-c1", "-W2", target],
                       check=True, capture_output=True)
    for text in ("10.0.1.2", "fd00:1::2"):
        addr = _a(text)
        assert topo_mod.pump(nl, lambda a=addr: nt.lookup(p0, a) == new_peer), text
        assert (p0, addr, client_mac, new_peer) in events

    # An administrative replace changes the MAC too.
    events.clear()
    subprocess.run(["ip", "neigh", "replace", "10.0.1.2", "lladdr", "02:00:00:00:0b:0b",
                    "dev", "p0", "nud", "reachable"], check=True)
    assert topo_mod.pump(nl, lambda: len(events) >= 1)
    assert events == [(p0, _a("10.0.1.2"), new_peer, _mac("02:00:00:00:0b:0b"))]

    # Deleting the entry makes it invalid.
    events.clear()
    subprocess.run(["ip", "neigh", "del", "10.0.1.2", "dev", "p0"], check=True)
    assert topo_mod.pump(nl, lambda: len(events) >= 1)
    assert events == [(p0, _a("10.0.1.2"), _mac("02:00:00:00:0b:0b"), None)]
    assert nt.lookup(p0, _a("10.0.1.2")) is None
    out["stats"] = dict(nt.stats)
    nl.close()
    return out


def test_resolve_and_change_callbacks(topo):
    """resolve() makes the kernel resolve IPv4 and IPv6 next hops (reported None -> MAC),
    a peer MAC change and `ip neigh replace` report old -> new, deletion reports MAC ->
    None, and resolve() is rate limited and skips valid entries."""
    cport = topo.port("client")
    res = topo.router.run(_resolve, topo.client.name, cport.peer_mac)
    assert res["stats"]["resolve_requests"] == 2


def _permanent_guard() -> dict:
    nl = Netlink()
    nt = NeighTable(nl)
    p0 = socket.if_nametoindex("p0")
    subprocess.run(["ip", "neigh", "add", "10.0.1.50", "lladdr", "02:00:00:00:00:50",
                    "dev", "p0", "nud", "permanent"], check=True)
    # Events not drained yet: the cache has not heard of the entry, so only
    # the kernel query protects it from NTF_USE's demotion.
    asked = nt.resolve(p0, 4, _a("10.0.1.50"))
    state = subprocess.run(["ip", "neigh", "show", "10.0.1.50", "dev", "p0"],
                           capture_output=True, text=True, check=True).stdout
    mac = nt.lookup(p0, _a("10.0.1.50"))
    nl.close()
    return dict(asked=asked, state=state, mac=mac)


def test_resolve_never_touches_a_permanent_entry(topo):
    """resolve() on a PERMANENT entry the cache has not seen yet sends no NTF_USE, so the
    entry stays PERMANENT (NTF_USE would demote it), and the cache learns it."""
    res = topo.router.run(_permanent_guard)
    assert res["asked"] is False
    assert "PERMANENT" in res["state"]
    assert res["mac"] == _mac("02:00:00:00:00:50")


def _unresolvable() -> dict:
    nl = Netlink()
    nt = NeighTable(nl)
    events: list = []
    nt.on_change(lambda *ev: events.append(ev))
    p0 = socket.if_nametoindex("p0")
    addr = _a("10.0.1.77")  # nobody answers
    asked = nt.resolve(p0, 4, addr)
    failed = topo_mod.pump(
        nl, lambda: (e := nt.get(p0, addr)) is not None and e.state == NUD_FAILED, timeout=10
    )
    nl.close()
    return dict(asked=asked, failed=failed, mac=nt.lookup(p0, addr), events=events)


def test_unanswered_resolution_fails_without_callbacks(topo):
    """A next hop nobody answers for goes FAILED; lookup stays None and no change is
    reported (it never had a usable MAC)."""
    res = topo.router.run(_unresolvable, timeout=30)
    assert res["asked"] and res["failed"]
    assert res["mac"] is None and res["events"] == []
