"""ICMP/ICMPv6 echo tracking and ICMP errors related to tracked connections."""

from __future__ import annotations

import pytest

from ctxdp.conntrack import CS, ConnTracker
from tests.unit.ctutil import P, TcpPeers, echo, icmp_error, tcp, udp

NEW = CS.TRK | CS.NEW
EST = CS.TRK | CS.EST
REL = CS.TRK | CS.REL
INV = CS.TRK | CS.INV

V4 = ("10.0.0.1", "10.0.0.2", "192.0.2.1")
V6 = ("2001:db8::1", "2001:db8::2", "2001:db8:ff::1")


@pytest.mark.parametrize("a,b,_r", [V4, V6])
def test_echo_request_reply(a, b, _r):
    """Echo request commits (+new, FIRST, 60 s); the reply is +est+rpl (REPLY, 30 s)."""
    ct = ConnTracker()
    r = ct.execute(P(echo(a, b, 77)), 0, 0.0, commit=True)
    c = r.conn
    assert r.state == NEW and c.state_name == "FIRST" and c.expires == 60.0
    assert c.orig.sport == c.orig.dport == 77
    r = ct.execute(P(echo(b, a, 77, reply=True)), 0, 1.0)
    assert r.state == EST | CS.RPL and r.conn is c and c.established and c.expires == 31.0
    r = ct.execute(P(echo(a, b, 77, seq=2)), 0, 2.0)
    assert r.state == EST and r.conn is c


def test_unanswered_echo_stays_new():
    """Repeated requests before any reply are +new on the same connection."""
    ct = ConnTracker()
    c = ct.execute(P(echo(*V4[:2], 5)), 0, 0.0, commit=True).conn
    r = ct.execute(P(echo(*V4[:2], 5, seq=2)), 0, 1.0)
    assert r.state == NEW and r.conn is c


def test_echo_ids_are_separate_connections():
    """Two echo ids between the same hosts are two connections."""
    ct = ConnTracker()
    c1 = ct.execute(P(echo(*V4[:2], 1)), 0, 0.0, commit=True).conn
    c2 = ct.execute(P(echo(*V4[:2], 2)), 0, 0.0, commit=True).conn
    assert c1 is not c2 and len(ct) == 2


@pytest.mark.parametrize("a,b,_r", [V4, V6])
def test_echo_reply_cannot_create(a, b, _r):
    """An echo reply without a connection is +inv and never committed."""
    ct = ConnTracker()
    r = ct.execute(P(echo(a, b, 9, reply=True)), 0, 0.0, commit=True)
    assert r.state == INV and r.reason == "icmp-not-query" and len(ct) == 0


def test_request_in_reply_direction_is_invalid():
    """A request travelling the reply way of an echo connection is +inv (type checked)."""
    ct = ConnTracker()
    ct.execute(P(echo(*V4[:2], 3)), 0, 0.0, commit=True)
    r = ct.execute(P(echo(V4[1], V4[0], 3)), 0, 0.0)
    assert r.state == INV and r.reason == "icmp-direction"


@pytest.mark.parametrize("a,b,rtr", [V4, V6])
def test_error_related_reply_direction(a, b, rtr):
    """An error quoting a client packet, sent back to the client, is +rel+rpl on that conn."""
    ct = ConnTracker()
    f = TcpPeers(a=a, b=b)
    c = f.handshake(ct).conn
    quoted = f.send("a", "PA", 100)
    r = ct.execute(P(icmp_error(rtr, a, quoted)), 0, 1.0)
    assert r.state == REL | CS.RPL and r.conn is c and r.reply
    assert ct.stats.related == 1 and c.pkts[1] == 2


@pytest.mark.parametrize("a,b,rtr", [V4, V6])
def test_error_related_original_direction(a, b, rtr):
    """An error quoting a server packet, sent to the server, is +rel (original direction)."""
    ct = ConnTracker()
    f = TcpPeers(a=a, b=b)
    c = f.handshake(ct).conn
    quoted = f.send("b", "PA", 100)
    r = ct.execute(P(icmp_error(rtr, b, quoted, kind="toobig")), 0, 1.0)
    assert r.state == REL and r.conn is c and not r.reply


def test_error_related_to_udp_and_echo():
    """Port unreachable quoting UDP, and an error quoting an echo request, are related."""
    ct = ConnTracker()
    u = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1111, 53)), 0, 0.0, commit=True).conn
    r = ct.execute(P(icmp_error("10.0.0.2", "10.0.0.1", udp("10.0.0.1", "10.0.0.2", 1111, 53))),
                   0, 0.0)
    assert r.conn is u and r.state == REL | CS.RPL
    e = ct.execute(P(echo("10.0.0.1", "10.0.0.9", 42)), 0, 0.0, commit=True).conn
    r = ct.execute(P(icmp_error("192.0.2.1", "10.0.0.1", echo("10.0.0.1", "10.0.0.9", 42))),
                   0, 0.0)
    assert r.conn is e and r.state == REL | CS.RPL


@pytest.mark.parametrize("a,b,rtr", [V4, V6])
def test_error_without_connection_is_invalid(a, b, rtr):
    """An error quoting an untracked packet is +inv and never commits a connection."""
    ct = ConnTracker()
    r = ct.execute(P(icmp_error(rtr, a, tcp(a, b, 1, 2, "S"))), 0, 0.0, commit=True)
    assert r.state == INV and r.conn is None and r.reason == "related-no-conn"
    assert len(ct) == 0


def test_error_for_expired_connection_is_invalid():
    """An error quoting a connection that has expired is not related to it."""
    ct = ConnTracker()
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0, commit=True)
    r = ct.execute(P(icmp_error("10.0.0.2", "10.0.0.1", udp("10.0.0.1", "10.0.0.2", 1, 2))),
                   0, 61.0)
    assert r.state == INV


def test_error_in_other_zone_is_not_related():
    """Related lookup is per zone."""
    ct = ConnTracker()
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 1, 0.0, commit=True)
    r = ct.execute(P(icmp_error("10.0.0.2", "10.0.0.1", udp("10.0.0.1", "10.0.0.2", 1, 2))),
                   2, 0.0)
    assert r.state == INV


def test_icmp_timeouts():
    """icmp_first and icmp_reply timeouts follow the configuration."""
    from ctxdp.conntrack import CtConfig

    ct = ConnTracker(CtConfig(timeouts={"icmp_first": 3, "icmp_reply": 4}))
    c = ct.execute(P(echo(*V4[:2], 1)), 0, 10.0, commit=True).conn
    assert c.expires == 13.0
    ct.execute(P(echo(V4[1], V4[0], 1, reply=True)), 0, 11.0)
    assert c.expires == 15.0
