"""ctxdp.policy: first-match filter, NAT selection and merged-flow validity."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from ctxdp.config import parse_config
from ctxdp.conntrack import NatAction
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.policy import AdmitInfo, NatUnavailable, Policy, translate

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


def a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def ft(src: str, dst: str, proto: int = TCP, sport: int = 40000, dport: int = 80) -> FlowTuple:
    fam = ipaddress.ip_address(src).version
    return FlowTuple(fam, proto, a(src), a(dst), sport, dport)


PORTS = [{"name": "lan0"}, {"name": "wan0"}, {"name": "dmz0", "zone": 2}]
ADDRS = {("wan0", 4): a("192.0.2.1"), ("wan0", 6): a("2001:db8::1")}


def pol(port_addr=None, **sections) -> Policy:
    d = {"ports": copy.deepcopy(PORTS), **copy.deepcopy(sections)}
    return Policy.from_config(
        parse_config(d), port_addr or (lambda ifname, fam: ADDRS.get((ifname, fam)))
    )


ROUTER = {
    "nat": [
        {"type": "dnat", "in_port": "wan0", "proto": "tcp", "dport": 8080, "to": "10.0.1.10",
         "to_port": 80},
        {"type": "dnat", "in_port": "wan0", "proto": "udp", "dport": "5000-5010",
         "to": "fd00:1::10", "dst": "2001:db8::/64"},
        {"type": "snat", "out_port": "dmz0", "to": "172.16.0.1-172.16.0.4", "ports": "2000-2999"},
        {"type": "masquerade", "out_port": "wan0", "src": ["10.0.1.0/24", "fd00:1::/64"]},
    ],
    "policy": {"default": "deny", "rules": [
        {"action": "deny", "in_port": "lan0", "proto": "tcp", "dport": [25, 465]},
        {"action": "allow", "in_port": "lan0", "out_port": "wan0"},
        {"action": "allow", "in_port": "wan0", "proto": "tcp", "dst": "10.0.1.10", "dport": 80},
        {"action": "allow", "in_port": "wan0", "dst": "fd00:1::/64", "proto": "udp",
         "dport": "5000-5010"},
    ]},
}


# -- filter -------------------------------------------------------------------


def test_first_match_wins():
    """An earlier deny beats a later allow that also matches."""
    p = pol(**ROUTER)
    smtp = p.decide("lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=25))
    assert not smtp.allow and smtp.rule_id == 0
    web = p.decide("lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=443))
    assert web.allow and web.rule_id == 1


def test_default_applies_when_nothing_matches():
    """No matching rule: the default decides and rule_id is None."""
    v = pol(**ROUTER).decide("wan0", "lan0", ft("203.0.113.7", "10.0.1.5", dport=22))
    assert not v.allow and v.rule_id is None
    v = pol(policy={"default": "allow"}).decide("wan0", "lan0", ft("1.1.1.1", "10.0.1.5"))
    assert v.allow and v.rule_id is None


def test_out_port_rules_need_a_routing_decision():
    """A rule naming out_port never matches while the egress is unknown."""
    p = pol(**ROUTER)
    assert p.decide("lan0", None, ft("10.0.1.5", "203.0.113.7", dport=443)).rule_id is None
    assert p.decide("lan0", "dmz0", ft("10.0.1.5", "172.16.0.9", dport=443)).rule_id is None


def test_cidr_matching_v4_v6_and_family_isolation():
    """Prefixes match their own family only; lists mix families."""
    p = pol(policy={"default": "deny", "rules": [
        {"action": "allow", "src": ["10.0.0.0/8", "fd00::/8"]},
        {"action": "allow", "dst": "::/0", "proto": "icmpv6"},
    ]})
    assert p.decide("lan0", "wan0", ft("10.9.9.9", "1.1.1.1")).rule_id == 0
    assert p.decide("lan0", "wan0", ft("fd12::1", "2001:db8::5")).rule_id == 0
    assert p.decide("lan0", "wan0", ft("11.0.0.1", "1.1.1.1")).rule_id is None
    assert p.decide("lan0", "wan0", ft("fe80::1", "2001:db8::5")).rule_id is None
    # ::/0 must not swallow IPv4 traffic.
    assert p.decide("lan0", "wan0", ft("11.0.0.1", "1.1.1.1", proto=ICMPV6, sport=1, dport=1)).rule_id is None
    assert p.decide("lan0", "wan0", ft("fe80::1", "ff02::1", proto=ICMPV6, sport=1, dport=1)).rule_id == 1


def test_port_ranges_and_icmp_ids():
    """dport ranges bound inclusively; an ICMP echo id is never a port."""
    p = pol(policy={"default": "deny", "rules": [{"action": "allow", "dport": [22, "8000-8100"]}]})
    assert p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", dport=22)).allow
    assert p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", proto=UDP, dport=8000)).allow
    assert p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", dport=8100)).allow
    assert not p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", dport=8101)).allow
    assert not p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", dport=23)).allow
    assert not p.decide("lan0", "wan0", ft("10.0.0.1", "10.0.0.2", proto=ICMP, sport=22, dport=22)).allow


# -- NAT ------------------------------------------------------------------------


def test_dnat_port_forward_selection():
    """DNAT matches in_port, proto, dport (and dst), and builds a conntrack NatAction."""
    p = pol(**ROUTER)
    d = p.nat_for("wan0", None, ft("203.0.113.7", "192.0.2.1", sport=5555, dport=8080))
    assert d is not None and d.snat is None and d.dnat_rule == 0
    assert isinstance(d.dnat, NatAction)
    assert (d.dnat.kind, d.dnat.addr_min, d.dnat.port_min, d.dnat.port_max) == ("dnat", a("10.0.1.10"), 80, 80)
    # Wrong port, wrong proto or wrong ingress port: no DNAT.
    assert p.nat_for("wan0", None, ft("203.0.113.7", "192.0.2.1", dport=8081)) is None
    assert p.nat_for("wan0", None, ft("203.0.113.7", "192.0.2.1", proto=UDP, dport=8080)) is None
    assert p.nat_for("lan0", None, ft("10.0.1.5", "192.0.2.1", dport=8080)) is None


def test_dnat_v6_with_dst_match_keeps_port():
    """An IPv6 DNAT rule honours its dst prefix and leaves the port when to_port is unset."""
    p = pol(**ROUTER)
    t = ft("2001:db8:ffff::9", "2001:db8::1", proto=UDP, sport=9, dport=5005)
    dnat, rule = p.dnat_for("wan0", t)
    assert rule == 1 and dnat.addr_min == a("fd00:1::10") and dnat.port_min == 0
    assert translate(t, dnat) == t._replace(dst=a("fd00:1::10"))
    outside = t._replace(dst=a("2001:db9::1"))
    assert p.dnat_for("wan0", outside) == (None, None)


def test_snat_range_and_ports():
    """A static SNAT rule yields its address range and port range."""
    p = pol(**ROUTER)
    d = p.nat_for("lan0", "dmz0", ft("10.0.1.5", "172.16.9.9"))
    assert d.dnat is None and d.snat_rule == 2
    s = d.snat
    assert (s.kind, s.addr_min, s.addr_max, s.port_min, s.port_max) == (
        "snat", a("172.16.0.1"), a("172.16.0.4"), 2000, 2999)
    # The static rule is IPv4: an IPv6 tuple leaving dmz0 gets no SNAT.
    assert p.nat_for("lan0", "dmz0", ft("fd00:1::5", "fd00:2::9")) is None


def test_masquerade_uses_egress_address_per_family():
    """Masquerade takes the egress port's address of the tuple's family."""
    p = pol(**ROUTER)
    d4 = p.nat_for("lan0", "wan0", ft("10.0.1.5", "203.0.113.7"))
    d6 = p.nat_for("lan0", "wan0", ft("fd00:1::5", "2001:db8:5::7"))
    assert d4.snat.addr_min == a("192.0.2.1") and d4.snat.addr_max is None
    assert d6.snat.addr_min == a("2001:db8::1")
    # Source outside the rule's prefixes: no masquerade.
    assert p.nat_for("lan0", "wan0", ft("10.0.9.5", "203.0.113.7")) is None


def test_masquerade_without_address_raises():
    """No address of the family on the egress port: NatUnavailable, never a silent pass."""
    p = pol(port_addr=lambda ifname, fam: None, **ROUTER)
    with pytest.raises(NatUnavailable, match="wan0"):
        p.nat_for("lan0", "wan0", ft("10.0.1.5", "203.0.113.7"))


def test_evaluate_filters_post_dnat_tuple():
    """The filter sees the translated destination, like a FORWARD chain."""
    p = pol(**ROUTER)
    orig = ft("203.0.113.7", "192.0.2.1", sport=5555, dport=8080)
    adm = p.evaluate("wan0", "lan0", orig)
    assert adm.verdict.allow and adm.verdict.rule_id == 2
    assert adm.nat.dnat.addr_min == a("10.0.1.10") and adm.nat.snat is None
    # A rule written against the pre-DNAT tuple does not match.
    pre = copy.deepcopy(ROUTER)
    pre["policy"]["rules"][2].update(dst="192.0.2.1", dport=8080)
    denied = pol(**pre).evaluate("wan0", "lan0", orig)
    assert not denied.verdict.allow and denied.verdict.rule_id is None and denied.nat is None


def test_nat_actions_commit_in_the_tracker():
    """The NatAction a policy builds is accepted by the real tracker and applied."""
    from scapy.layers.inet import IP
    from scapy.layers.inet import TCP as STCP
    from scapy.layers.l2 import Ether

    from ctxdp.conntrack import ConnTracker, CtConfig
    from ctxdp.packet import parse

    p = pol(**ROUTER)
    frame = bytearray(bytes(Ether() / IP(src="10.0.1.5", dst="203.0.113.7") / STCP(sport=40000, dport=443, flags="S")))
    pkt = parse(frame)
    orig = FlowTuple(4, TCP, pkt.src, pkt.dst, pkt.sport, pkt.dport)
    nat = p.nat_for("lan0", "wan0", orig)
    ct = ConnTracker(CtConfig())
    res = ct.execute(pkt, 0, 1.0, commit=True, nat=nat.snat)
    assert res.conn is not None
    assert res.conn.reply.dst == a("192.0.2.1")


# -- merged-flow validity ---------------------------------------------------------


def admitted(p: Policy, in_if: str, out_if: str, orig: FlowTuple) -> AdmitInfo:
    adm = p.evaluate(in_if, out_if, orig)
    assert adm.verdict.allow
    return AdmitInfo(in_if, out_if, orig, adm.nat)


def test_still_admits_unchanged_and_unrelated_changes():
    """The same policy, or one with an unrelated rule added, keeps the connection."""
    p = pol(**ROUTER)
    info = admitted(p, "lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=443))
    assert p.still_admits(info)
    assert pol(**ROUTER).still_admits(info)
    changed = copy.deepcopy(ROUTER)
    changed["policy"]["rules"].insert(0, {"action": "deny", "in_port": "dmz0"})
    assert pol(**changed).still_admits(info)


def test_still_admits_withdraws_on_deny():
    """A reload that denies the connection's tuple withdraws it."""
    p = pol(**ROUTER)
    info = admitted(p, "lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=443))
    changed = copy.deepcopy(ROUTER)
    changed["policy"]["rules"].insert(0, {"action": "deny", "dst": "203.0.113.0/24"})
    assert not pol(**changed).still_admits(info)


def test_still_admits_withdraws_on_nat_change():
    """Edited DNAT target, removed masquerade, or a new egress address each withdraw."""
    p = pol(**ROUTER)
    fwd = admitted(p, "wan0", "lan0", ft("203.0.113.7", "192.0.2.1", sport=5555, dport=8080))
    out = admitted(p, "lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=443))

    new_port = copy.deepcopy(ROUTER)
    new_port["nat"][0]["to_port"] = 81
    new_port["policy"]["rules"][2]["dport"] = [80, 81]
    assert not pol(**new_port).still_admits(fwd)
    assert pol(**new_port).still_admits(out)

    no_masq = copy.deepcopy(ROUTER)
    del no_masq["nat"][3]
    assert not pol(**no_masq).still_admits(out)

    moved = {("wan0", 4): a("192.0.2.99")}
    assert not pol(port_addr=lambda i, f: moved.get((i, f)), **ROUTER).still_admits(out)
    assert not pol(port_addr=lambda i, f: None, **ROUTER).still_admits(out)


def test_still_admits_keeps_connection_readmitted_by_another_rule():
    """If the admitting rule goes but another rule allows the same tuple, it stays."""
    p = pol(**ROUTER)
    info = admitted(p, "lan0", "wan0", ft("10.0.1.5", "203.0.113.7", dport=443))
    changed = copy.deepcopy(ROUTER)
    changed["policy"]["rules"][1] = {"action": "allow", "src": "10.0.0.0/8"}
    assert pol(**changed).still_admits(info)


def test_fingerprints_track_content_not_position():
    """Moving a rule keeps its fingerprint; editing it changes it and the policy's."""
    p = pol(**ROUTER)
    moved = copy.deepcopy(ROUTER)
    moved["policy"]["rules"].insert(0, {"action": "deny", "in_port": "dmz0", "comment": "new"})
    q = pol(**moved)
    assert q.rule_fingerprint(2) == p.rule_fingerprint(1)
    assert q.decide("lan0", "wan0", ft("10.0.1.5", "1.1.1.1")).fingerprint == p.rule_fingerprint(1)
    assert q.fingerprint != p.fingerprint
    assert pol(**ROUTER).fingerprint == p.fingerprint
    commented = copy.deepcopy(ROUTER)
    commented["policy"]["rules"][1]["comment"] = "just a note"
    assert pol(**commented).fingerprint == p.fingerprint
