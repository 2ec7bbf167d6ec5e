"""ctxdp.datapath.forward: the slow-path packet walk, with the real tracker,
offload manager, dummy provider and policy, and fake ports/routes/neighbours."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6, in6_chksum
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import checksum

from ctxdp.config import parse_config
from ctxdp.conntrack import ConnTracker, CtConfig, FlowTuple
from ctxdp.datapath.forward import ADMIT_KEY, Forwarder
from ctxdp.eligibility import EligibilityPolicy
from ctxdp.offload import OffloadManager
from ctxdp.policy import Policy
from ctxdp.providers.dummy import DummyProvider
from tests.unit.ctutil import checksums_ok
from tests.unit.fakes import (
    CLIENT_MAC,
    GW_MAC,
    LAN_MAC,
    WAN_MAC,
    TcpFlow,
    a,
    from_lan,
    from_wan,
    mac,
    topology,
    udp,
)

LAN_IF, WAN_IF = 2, 3
PORTS = [{"name": "lan0"}, {"name": "wan0"}]
PORT_ADDR = {("wan0", 4): a("192.0.2.1"), ("wan0", 6): a("2001:db8::1"),
             ("lan0", 4): a("10.0.1.1"), ("lan0", 6): a("fd00:1::1")}


def make(doc: dict[str, Any] | None = None, **topo_kw: Any) -> SimpleNamespace:
    """A forwarder over the fake topology with a policy compiled from ``doc``."""
    ports, router, neigh = topology(**topo_kw)
    cfg = parse_config({"ports": PORTS, **(doc or {})})
    ct = ConnTracker(CtConfig())
    dummy = DummyProvider()
    mgr = OffloadManager(ct, [dummy], EligibilityPolicy())
    policy = Policy.from_config(cfg, port_addr=lambda n, f: PORT_ADDR.get((n, f)))
    fwd = Forwarder(ct, mgr, policy, router, neigh, ports, {LAN_IF: 0, WAN_IF: 0})
    fwd.min_mtu = min(p.mtu for p in ports)
    calls: list[tuple] = []
    real = mgr.set_forwarding

    def spy(conn, reply, fd, now, nexthop=None):
        calls.append((conn, reply, fd, nexthop))
        return real(conn, reply, fd, now, nexthop=nexthop)

    mgr.set_forwarding = spy  # type: ignore[method-assign]
    return SimpleNamespace(fwd=fwd, ct=ct, mgr=mgr, dummy=dummy, router=router, neigh=neigh,
                           lan=ports.by_name("lan0"), wan=ports.by_name("wan0"), fd_calls=calls)


def error_checksums_ok(raw: bytes) -> bool:
    """IP header and ICMP/ICMPv6 checksums of a router-generated error are right.

    (scapy's whole-frame recompute cannot be used: it would also recompute the
    checksums inside the quoted datagram, which ICMP errors cut short.)
    """
    e = Ether(raw)
    if IP in e:
        ip = bytes(e[IP])
        return checksum(ip[: e[IP].ihl * 4]) == 0 and checksum(bytes(e[IP].payload)) == 0
    icmp6 = bytes(e[IPv6].payload)
    return in6_chksum(58, e[IPv6], icmp6) == 0


def one(port, *, icmp_error: bool = False) -> Ether:
    """The single frame ``port`` sent since the last call, checksums checked, parsed."""
    sent = port.take()
    assert len(sent) == 1, sent
    ok = error_checksums_ok(sent[0]) if icmp_error else checksums_ok(bytearray(sent[0]))
    assert ok, Ether(sent[0]).show(dump=True)
    return Ether(sent[0])


def macs(f: Ether) -> tuple[bytes, bytes]:
    return mac(f.src), mac(f.dst)


def web_flow(**kw: Any) -> TcpFlow:
    return TcpFlow(("10.0.1.5", 40000), ("203.0.113.7", 80), ("203.0.113.7", 80), **kw)


def handshake(t: SimpleNamespace, flow: TcpFlow, now: float = 1.0) -> None:
    t.fwd.process(flow.send("a", "S"), t.lan, now)
    one(t.wan)
    t.fwd.process(flow.send("b", "SA"), t.wan, now)
    one(t.lan)
    t.fwd.process(flow.send("a", "A"), t.lan, now)
    one(t.wan)


# -- forwarding and offload --------------------------------------------------------------


def test_tcp_handshake_forwarded_rewritten_and_offloaded():
    """A handshake is forwarded with TTL-1, egress MACs, valid checksums; offloaded after ACK."""
    t = make()
    flow = web_flow()
    t.fwd.process(flow.send("a", "S"), t.lan, 1.0)
    f = one(t.wan)
    assert macs(f) == (WAN_MAC, GW_MAC)
    assert (f[IP].src, f[IP].dst, f[IP].ttl, f[TCP].flags) == ("10.0.1.5", "203.0.113.7", 63, "S")

    t.fwd.process(flow.send("b", "SA"), t.wan, 1.1)
    f = one(t.lan)
    assert macs(f) == (LAN_MAC, CLIENT_MAC)
    assert (f[IP].dst, f[IP].ttl) == ("10.0.1.5", 63)
    conn = t.ct.conns()[0]
    assert not t.mgr.is_offloaded(conn) and not t.dummy.held

    t.fwd.process(flow.send("a", "A"), t.lan, 1.2)
    assert one(t.wan)[IP].ttl == 63
    assert t.mgr.is_offloaded(conn) and t.dummy.holds(conn)
    d0, d1 = t.dummy.held[(0, conn.orig)].dirs
    assert (d0.in_ifindex, d0.out_ifindex, d0.src_mac, d0.dst_mac) == (LAN_IF, WAN_IF, WAN_MAC,
                                                                       GW_MAC)
    assert (d1.in_ifindex, d1.out_ifindex, d1.src_mac, d1.dst_mac) == (WAN_IF, LAN_IF, LAN_MAC,
                                                                       CLIENT_MAC)
    assert t.fwd.stats["forwarded"] == 3 and t.fwd.stats["new_conns"] == 1
    assert not t.fwd.dropped
    assert conn.ext[ADMIT_KEY].in_ifname == "lan0" and conn.ext[ADMIT_KEY].out_ifname == "wan0"


def test_ipv6_udp_forwarded_with_hop_limit_decremented():
    """IPv6 is forwarded like IPv4: hop limit - 1, egress MACs, valid UDP checksum."""
    t = make()
    t.fwd.process(from_lan(udp("fd00:1::5", "2001:db8:1::7", 5000, 53, hlim=9)), t.lan, 1.0)
    f = one(t.wan)
    assert macs(f) == (WAN_MAC, GW_MAC)
    assert (f[IPv6].hlim, f[UDP].dport) == (8, 53)


def test_policy_deny_drops_counts_and_tracks_nothing():
    """A NEW connection the policy denies is dropped, counted and never committed."""
    t = make({"policy": {"default": "allow", "rules": [
        {"action": "deny", "proto": "tcp", "dport": 25}]}})
    smtp = TcpFlow(("10.0.1.5", 40001), ("203.0.113.7", 25), ("203.0.113.7", 25))
    t.fwd.process(smtp.send("a", "S"), t.lan, 1.0)
    t.fwd.process(smtp.send("a", "S"), t.lan, 2.0)
    assert t.wan.take() == [] and t.lan.take() == []
    assert t.fwd.dropped["policy-deny"] == 2
    assert len(t.ct) == 0
    # Another port is still allowed.
    t.fwd.process(web_flow().send("a", "S"), t.lan, 3.0)
    one(t.wan)


def test_masquerade_rewrites_source_and_reverse_translates_the_reply():
    """Masquerade rewrites the source; the reply to that local address goes back to the client."""
    t = make({"nat": [{"type": "masquerade", "out_port": "wan0"}]})
    flow = web_flow()
    t.fwd.process(flow.send("a", "S"), t.lan, 1.0)
    f = one(t.wan)
    assert (f[IP].src, f[IP].dst, f[IP].ttl) == ("192.0.2.1", "203.0.113.7", 63)
    flow.ends["b"] = (("203.0.113.7", 80), ("192.0.2.1", f[TCP].sport))

    t.fwd.process(flow.send("b", "SA"), t.wan, 1.1)
    f = one(t.lan)
    assert macs(f) == (LAN_MAC, CLIENT_MAC)
    assert (f[IP].src, f[IP].dst, f[TCP].dport) == ("203.0.113.7", "10.0.1.5", 40000)
    t.fwd.process(flow.send("a", "A"), t.lan, 1.2)
    assert one(t.wan)[IP].src == "192.0.2.1"
    conn = t.ct.conns()[0]
    assert t.dummy.holds(conn)
    ctx = t.dummy.held[(0, conn.orig)]
    assert ctx.snat and not ctx.dnat
    assert ctx.dirs[0].out.src == a("192.0.2.1") and ctx.dirs[1].out.dst == a("10.0.1.5")
    assert t.fwd.stats["to_kernel"] == 0


def test_dnat_port_forward_to_the_routers_own_address():
    """A port-forward to the router's WAN address reaches the LAN server and replies go back."""
    t = make({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "tcp", "dport": 8080,
                       "to": "10.0.1.10", "to_port": 80}]})
    t.neigh.table[(LAN_IF, a("10.0.1.10"))] = mac("02:aa:00:00:00:10")
    flow = TcpFlow(("198.51.100.9", 5555), ("192.0.2.1", 8080), ("10.0.1.10", 80),
                   ("198.51.100.9", 5555), a_wrap=from_wan, b_wrap=from_lan)
    t.fwd.process(flow.send("a", "S"), t.wan, 1.0)
    f = one(t.lan)
    assert macs(f) == (LAN_MAC, mac("02:aa:00:00:00:10"))
    assert (f[IP].src, f[IP].dst, f[TCP].dport) == ("198.51.100.9", "10.0.1.10", 80)

    t.fwd.process(flow.send("b", "SA"), t.lan, 1.1)
    f = one(t.wan)
    assert macs(f) == (WAN_MAC, GW_MAC)
    assert (f[IP].src, f[TCP].sport, f[IP].dst) == ("192.0.2.1", 8080, "198.51.100.9")
    t.fwd.process(flow.send("a", "A"), t.wan, 1.2)
    assert one(t.lan)[TCP].dport == 80
    conn = t.ct.conns()[0]
    assert t.dummy.holds(conn) and t.dummy.held[(0, conn.orig)].dnat
    assert t.fwd.stats["to_kernel"] == 0


def test_dnat_rule_for_another_port_leaves_local_traffic_to_the_kernel():
    """Local traffic no conntrack entry or port-forward claims (SSH) stays the kernel's."""
    t = make({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "tcp", "dport": 8080,
                       "to": "10.0.1.10"}]})
    ssh = TcpFlow(("198.51.100.9", 5555), ("192.0.2.1", 22), ("192.0.2.1", 22),
                  a_wrap=from_wan)
    t.fwd.process(ssh.send("a", "S"), t.wan, 1.0)
    assert t.fwd.stats["to_kernel"] == 1 and len(t.ct) == 0
    assert t.lan.take() == [] and t.wan.take() == []


def test_packets_to_local_addresses_and_non_ip_are_left_to_the_kernel():
    """Ping/UDP to the router, and ARP, are counted as the kernel's and not tracked."""
    t = make()
    t.fwd.process(from_lan(udp("10.0.1.5", "10.0.1.1", 5000, 53)), t.lan, 1.0)
    t.fwd.process(from_lan(udp("fd00:1::5", "fd00:1::1", 5000, 53)), t.lan, 1.0)
    arp = bytearray(bytes(Ether(src=CLIENT_MAC.hex(":"), dst="ff:ff:ff:ff:ff:ff")
                          / ARP(psrc="10.0.1.5", pdst="10.0.1.1")))
    t.fwd.process(arp, t.lan, 1.0)
    assert t.fwd.stats["to_kernel"] == 3
    assert len(t.ct) == 0 and t.lan.take() == [] and t.wan.take() == []


# -- unresolved next hops ----------------------------------------------------------------


def test_unresolved_next_hop_queues_resolves_and_sends_when_valid():
    """An unresolved gateway queues the frame, asks to resolve, and neigh_valid sends it."""
    t = make()
    gw = a("192.0.2.254")
    del t.neigh.table[(WAN_IF, gw)]
    t.fwd.process(web_flow().send("a", "S"), t.lan, 1.0)
    assert t.wan.take() == []
    assert t.neigh.resolves == [(WAN_IF, 4, gw)]
    assert t.fwd.stats["queued_unresolved"] == 1
    new_mac = mac("02:bb:00:00:00:99")
    t.neigh.table[(WAN_IF, gw)] = new_mac
    assert t.fwd.neigh_valid(WAN_IF, gw, new_mac) == 1
    f = one(t.wan)
    assert macs(f) == (WAN_MAC, new_mac)
    assert (f[IP].ttl, f[TCP].flags) == (63, "S")
    assert t.fwd.neigh_valid(WAN_IF, gw, new_mac) == 0  # the queue is gone


def test_queued_frames_expire_and_the_queue_is_bounded():
    """Queued frames expire after their deadline and a full queue drops its oldest; counted."""
    t = make()
    gw = a("192.0.2.254")
    del t.neigh.table[(WAN_IF, gw)]
    for i in range(17):
        t.fwd.process(from_lan(udp("10.0.1.5", "203.0.113.7", 6000 + i, 53)), t.lan, 1.0)
    assert t.fwd.dropped["unresolved-queue-full"] == 1
    assert t.fwd.expire_queued(1.5) == 0
    assert t.fwd.expire_queued(2.0) == 16
    assert t.fwd.dropped["unresolved-timeout"] == 16
    assert t.fwd.neigh_valid(WAN_IF, gw, GW_MAC) == 0
    assert t.wan.take() == []


# -- ICMP errors the router generates ----------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_ttl_one_gets_time_exceeded_back_out_the_ingress_port(family):
    """TTL 1 gets ICMP time exceeded out the ingress port to the source MAC, quoting it."""
    t = make()
    src, dst = ("10.0.1.5", "203.0.113.7") if family == 4 else ("fd00:1::5", "2001:db8:1::7")
    kw = {"ttl": 1} if family == 4 else {"hlim": 1}
    frm = from_lan(udp(src, dst, 5000, 33434, b"probe", **kw))
    sent_dgram = bytes(frm[14:])
    t.fwd.process(frm, t.lan, 1.0)
    assert t.wan.take() == []
    f = one(t.lan, icmp_error=True)
    assert macs(f) == (LAN_MAC, CLIENT_MAC)
    if family == 4:
        assert (f[IP].src, f[IP].dst, f[ICMP].type, f[ICMP].code) == ("10.0.1.1", src, 11, 0)
        assert bytes(f[ICMP].payload) == sent_dgram
        assert f[IPerror].ttl == 1
    else:
        assert (f[IPv6].src, f[IPv6].dst) == ("fd00:1::1", src)
        assert f[ICMPv6TimeExceeded].code == 0
        assert bytes(f[ICMPv6TimeExceeded].payload) == sent_dgram
    assert t.fwd.dropped["ttl-exceeded"] == 1
    assert t.fwd.stats["icmp_time-exceeded"] == 1
    assert len(t.ct) == 0


@pytest.mark.parametrize("where", ["route", "port"])
def test_oversize_df_gets_frag_needed_with_the_mtu_quoting_the_senders_view(where):
    """Oversize DF gets frag-needed with the MTU, to and quoting the sender before NAT."""
    if where == "route":
        t = make({"nat": [{"type": "masquerade", "out_port": "wan0"}]})
        t.router.replace("0.0.0.0/0", WAN_IF, via="192.0.2.254", src="192.0.2.1", mtu=1400)
    else:
        t = make({"nat": [{"type": "masquerade", "out_port": "wan0"}]}, wan_mtu=1400)
    frm = from_lan(udp("10.0.1.5", "203.0.113.7", 5000, 9, b"z" * 1450, flags="DF"))
    sent_dgram = bytes(frm[14:])
    t.fwd.process(frm, t.lan, 1.0)
    assert t.wan.take() == []
    f = one(t.lan, icmp_error=True)
    assert macs(f) == (LAN_MAC, CLIENT_MAC)
    assert (f[IP].src, f[IP].dst) == ("10.0.1.1", "10.0.1.5")
    assert (f[ICMP].type, f[ICMP].code, f[ICMP].nexthopmtu) == (3, 4, 1400)
    quote = bytes(f[ICMP].payload)
    assert quote == sent_dgram[:len(quote)] and len(quote) >= 28
    assert t.fwd.dropped["mtu-exceeded"] == 1


def test_oversize_without_df_is_dropped_not_fragmented():
    """Without DF the router would fragment; the slow path drops and counts instead."""
    t = make(wan_mtu=1400)
    t.fwd.process(from_lan(udp("10.0.1.5", "203.0.113.7", 5000, 9, b"z" * 1450)), t.lan, 1.0)
    assert t.wan.take() == [] and t.lan.take() == []
    assert t.fwd.dropped["needs-fragmentation"] == 1


def test_ipv6_oversize_gets_packet_too_big():
    """IPv6 never fragments in transit: packet too big with the egress MTU."""
    t = make(wan_mtu=1280)
    frm = from_lan(udp("fd00:1::5", "2001:db8:1::7", 5000, 9, b"z" * 1300))
    t.fwd.process(frm, t.lan, 1.0)
    assert t.wan.take() == []
    f = one(t.lan, icmp_error=True)
    assert macs(f) == (LAN_MAC, CLIENT_MAC)
    assert (f[IPv6].src, f[IPv6].dst) == ("fd00:1::1", "fd00:1::5")
    assert f[ICMPv6PacketTooBig].mtu == 1280
    assert bytes(f[ICMPv6PacketTooBig].payload)[:40] == bytes(frm[14:54])
    assert t.fwd.dropped["mtu-exceeded"] == 1


# -- drops -------------------------------------------------------------------------------


def test_no_route_is_dropped_and_counted():
    """Without a route the packet is dropped as no-route and no connection is kept."""
    t = make()
    t.router.remove("0.0.0.0/0")
    t.fwd.process(web_flow().send("a", "S"), t.lan, 1.0)
    assert t.fwd.dropped["no-route"] == 1
    assert t.wan.take() == [] and len(t.ct) == 0


def test_tx_failure_is_counted():
    """A transmit error on the egress port counts as tx-error, not forwarded."""
    t = make()
    t.wan.fail_tx = True
    t.fwd.process(web_flow().send("a", "S"), t.lan, 1.0)
    assert t.fwd.dropped["tx-error"] == 1 and t.fwd.stats["forwarded"] == 0


def test_every_truncation_of_a_valid_frame_is_counted_as_malformed():
    """Every prefix of a valid frame is counted as malformed; no output, no internal error."""
    t = make()
    frames = [web_flow().send("a", "S"),
              from_lan(udp("fd00:1::5", "2001:db8:1::7", 5000, 53, b"abcdef"))]
    n = 0
    for full in frames:
        for cut in range(len(full)):
            t.fwd.process(bytearray(full[:cut]), t.lan, 1.0)
            n += 1
    assert t.fwd.dropped == {"malformed": n}
    assert t.fwd.stats["rx"] == n
    assert t.wan.take() == [] and t.lan.take() == [] and len(t.ct) == 0


def test_garbage_never_raises_and_is_counted():
    """Random bytes are counted as malformed or the kernel's, never an internal error."""
    t = make()
    rng = random.Random(5)
    n = 0
    for i in range(300):
        g = bytearray(rng.randbytes(rng.randrange(0, 120)))
        if i % 2 and len(g) >= 14:
            g[12:14] = b"\x08\x00" if i % 4 == 1 else b"\x86\xdd"
        t.fwd.process(g, t.lan, 1.0)
        n += 1
    assert "internal-error" not in t.fwd.dropped
    assert t.fwd.stats["rx"] == n
    accounted = sum(t.fwd.dropped.values()) + t.fwd.stats["to_kernel"] + \
        t.fwd.stats["forwarded"] + t.fwd.stats["queued_unresolved"]
    assert accounted == n


# -- related ICMP errors -------------------------------------------------------------------


def test_related_icmp_error_is_forwarded_but_not_a_forwarding_decision():
    """A related ICMP error is forwarded but never reported as the conn's forwarding."""
    t = make()
    flow = web_flow()
    handshake(t, flow)
    conn = t.ct.conns()[0]
    assert t.dummy.holds(conn)
    n_calls = len(t.fd_calls)
    quoted = bytes(flow.send("a", "A", 10)[14:])
    err = from_wan(IP(src="198.51.100.1", dst="10.0.1.5") / ICMP(type=3, code=1) / Raw(quoted))
    t.fwd.process(err, t.wan, 2.0)
    f = one(t.lan)
    assert (f[IP].src, f[IP].dst, f[IP].ttl, f[ICMP].type) == ("198.51.100.1", "10.0.1.5", 63, 3)
    assert len(t.fd_calls) == n_calls
    assert t.dummy.holds(conn)
    assert t.dummy.hooks().count("conn_policy") == 0


def test_related_icmp_error_to_the_masquerade_address_is_translated_and_forwarded():
    """A PMTU error to the masquerade address is translated and forwarded to the client."""
    t = make({"nat": [{"type": "masquerade", "out_port": "wan0"}]})
    flow = web_flow()
    t.fwd.process(flow.send("a", "S"), t.lan, 1.0)
    out = one(t.wan)
    nat_port = out[TCP].sport
    quoted = bytes(out[IP])
    err = from_wan(IP(src="198.51.100.1", dst="192.0.2.1") / ICMP(type=3, code=4, nexthopmtu=1400)
                   / Raw(quoted))
    t.fwd.process(err, t.wan, 1.1)
    f = one(t.lan)
    assert (f[IP].dst, f[ICMP].type, f[ICMP].code) == ("10.0.1.5", 3, 4)
    assert (f[IPerror].src, f[IPerror].dst) == ("10.0.1.5", "203.0.113.7")
    assert nat_port and t.fwd.stats["to_kernel"] == 0


def test_forwarding_decision_reported_per_direction_with_next_hop():
    """Each direction's tuples, egress and next hop are reported to the offload manager."""
    t = make()
    flow = web_flow()
    handshake(t, flow)
    conn = t.ct.conns()[0]
    dirs = {(reply, fd.match, fd.out, fd.out_ifindex, nh) for _, reply, fd, nh in t.fd_calls}
    assert dirs == {
        (False, conn.orig, conn.orig, WAN_IF, a("192.0.2.254")),
        (True, conn.reply, conn.reply, LAN_IF, a("10.0.1.5")),
    }
    assert all(c is conn for c, *_ in t.fd_calls)
    assert conn.orig == FlowTuple(4, 6, a("10.0.1.5"), a("203.0.113.7"), 40000, 80)


def test_fin_on_the_slow_path_ends_the_offload_and_is_forwarded():
    """A punted FIN ends the offload (DEL) and is forwarded by the slow path."""
    t = make()
    flow = web_flow()
    handshake(t, flow)
    conn = t.ct.conns()[0]
    assert t.dummy.holds(conn)
    t.fwd.process(flow.send("a", "FA"), t.lan, 2.0)
    assert one(t.wan)[TCP].flags == "FA"
    assert not t.dummy.holds(conn) and not t.mgr.is_offloaded(conn)
    assert conn.state_name != "ESTABLISHED"


def test_ping_through_masquerade_reply_comes_back_to_the_client():
    """An echo reply to the masquerade address is translated back to the client."""
    t = make({"nat": [{"type": "masquerade", "out_port": "wan0"}]})
    t.fwd.process(from_lan(IP(src="10.0.1.5", dst="203.0.113.7") / ICMP(id=77, seq=1)), t.lan,
                  1.0)
    out = one(t.wan)
    assert out[IP].src == "192.0.2.1"
    reply = IP(src="203.0.113.7", dst="192.0.2.1") / ICMP(type=0, id=out[ICMP].id, seq=1)
    t.fwd.process(from_wan(reply), t.wan, 1.1)
    f = one(t.lan)
    assert (f[IP].dst, f[ICMP].type, f[ICMP].id) == ("10.0.1.5", 0, 77)
    conn = t.ct.conns()[0]
    assert t.dummy.holds(conn)
