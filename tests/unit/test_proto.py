"""UDP and the default ``other`` handler: unreplied/replied states, timeouts, handler table."""

from __future__ import annotations

from ctxdp.conntrack import CS, ConnTracker, CtConfig
from ctxdp.conntrack.proto import OtherHandler, UdpHandler, make_handlers
from tests.unit.ctutil import P, other, udp

NEW = CS.TRK | CS.NEW
EST = CS.TRK | CS.EST


def test_udp_unreplied_then_replied():
    """UDP: FIRST (+new), more unreplied packets MULTIPLE (+new), a reply makes BIDIR (+est)."""
    ct = ConnTracker()
    r = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 5000, 53)), 0, 0.0, commit=True)
    c = r.conn
    assert r.state == NEW and c.state_name == "FIRST" and c.expires == 60.0
    r = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 5000, 53)), 0, 1.0)
    assert r.state == NEW and r.conn is c and c.state_name == "MULTIPLE" and c.expires == 61.0
    r = ct.execute(P(udp("10.0.0.2", "10.0.0.1", 53, 5000)), 0, 2.0)
    assert r.state == EST | CS.RPL and r.reply and c.state_name == "BIDIR" and c.established
    assert c.expires == 32.0
    r = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 5000, 53)), 0, 3.0)
    assert r.state == EST and not r.reply and c.expires == 33.0
    assert c.pkts == [3, 1]


def test_udp_timeouts_overridable():
    """udp_first / udp_bidir come from CtConfig overrides."""
    ct = ConnTracker(CtConfig(timeouts={"udp_first": 5, "udp_bidir": 7}))
    c = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0, commit=True).conn
    assert c.expires == 5.0
    ct.execute(P(udp("10.0.0.2", "10.0.0.1", 2, 1)), 0, 1.0)
    assert c.expires == 8.0


def test_udp_ipv6():
    """UDP over IPv6 is tracked with the same states."""
    ct = ConnTracker()
    c = ct.execute(P(udp("2001:db8::1", "2001:db8::2", 7, 8)), 0, 0.0, commit=True).conn
    r = ct.execute(P(udp("2001:db8::2", "2001:db8::1", 8, 7)), 0, 0.0)
    assert r.conn is c and r.reply and c.state_name == "BIDIR"


def test_other_protocol_uses_default_handler():
    """GRE (no handler of its own) is tracked by ``other`` by addresses only."""
    ct = ConnTracker()
    r = ct.execute(P(other("10.0.0.1", "10.0.0.2", 47)), 0, 0.0, commit=True)
    c = r.conn
    assert r.state == NEW and c.handler.name == "other" and c.proto == 47
    assert c.orig.sport == 0 and c.orig.dport == 0 and c.expires == 60.0
    r = ct.execute(P(other("10.0.0.2", "10.0.0.1", 47)), 0, 1.0)
    assert r.conn is c and r.state == EST | CS.RPL and c.expires == 31.0


def test_other_protocol_ipv6():
    """An unknown protocol over IPv6 also goes to ``other``."""
    ct = ConnTracker()
    c = ct.execute(P(other("2001:db8::1", "2001:db8::2", 132)), 0, 0.0, commit=True).conn
    assert c is not None and c.handler.name == "other" and c.family == 6


def test_handler_table():
    """make_handlers maps TCP/UDP/ICMP/ICMPv6 and returns ``other`` as the default."""
    table, default = make_handlers(CtConfig())
    assert {p: h.name for p, h in table.items()} == {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}
    assert isinstance(default, OtherHandler) and not isinstance(default, UdpHandler)
    for h in [*table.values(), default]:
        assert len(h.states) == len(h.timeout_keys) == len(h.timeouts)
        assert 0 <= h.established_state < len(h.states)
