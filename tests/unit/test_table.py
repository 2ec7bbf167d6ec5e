"""ConnTracker table: commit semantics, directions, zones, limits, marks, flush, malformed input."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ctxdp.conntrack import CS, ConnTracker, CtConfig, CtResult, NatAction
from ctxdp.packet import parse
from tests.unit.ctutil import P, TcpPeers, echo, frame, icmp_error, ip, other, tcp, udp

NEW = CS.TRK | CS.NEW
INV = CS.TRK | CS.INV


def _udp(ct, src="10.0.0.1", sport=1000, zone=0, now=0.0, **kw) -> CtResult:
    return ct.execute(P(udp(src, "10.0.0.2", sport, 53)), zone, now, commit=True, **kw)


def test_uncommitted_new_packet_creates_nothing():
    """Without commit a new packet is +trk+new, conn None, and the table stays empty."""
    ct = ConnTracker()
    r = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0)
    assert r.state == NEW and r.conn is None and not r.reply and len(ct) == 0
    assert ct.stats.created == 0


def test_both_directions_find_one_connection():
    """The original and the reply tuple map to the same Conn; get() works with either."""
    ct = ConnTracker()
    c = _udp(ct).conn
    assert ct.get(0, c.orig) is c and ct.get(0, c.reply) is c
    assert c.reply == c.orig.reverse()
    assert len(list(ct.iter_keys())) == 2 and ct.conns() == [c]


def test_zones_separate_identical_tuples():
    """The same tuple in two zones is two connections; conns(zone) and flush(zone) filter."""
    ct = ConnTracker()
    a = _udp(ct, zone=1).conn
    b = _udp(ct, zone=2).conn
    assert a is not b and a.zone == 1 and b.zone == 2 and len(ct) == 2
    assert ct.conns(1) == [a] and ct.zone_count(2) == 1
    assert ct.flush(0.0, zone=1) == 1 and not a.alive and b.alive and len(ct) == 1
    r = ct.execute(P(udp("10.0.0.2", "10.0.0.1", 53, 1000)), 2, 0.0)
    assert r.conn is b and r.reply


def test_global_limit_refuses_and_counts():
    """Beyond max_conns a NEW connection is refused (+new, no conn) and counted; room frees on delete."""
    ct = ConnTracker(CtConfig(max_conns=2))
    c1 = _udp(ct, sport=1).conn
    _udp(ct, sport=2)
    r = _udp(ct, sport=3)
    assert r.state == NEW and r.conn is None and r.reason == "limit"
    assert ct.stats.refused_limit == 1 and len(ct) == 2
    ct.delete(c1, 0.0)
    assert _udp(ct, sport=3).conn is not None


def test_zone_limits_and_default_zone_limit():
    """Per-zone limits apply to their zone; default_zone_limit covers the others."""
    ct = ConnTracker(CtConfig(zone_limits={5: 1}, default_zone_limit=2))
    assert _udp(ct, zone=5, sport=1).conn is not None
    r = _udp(ct, zone=5, sport=2)
    assert r.conn is None and r.reason == "zone-limit"
    assert _udp(ct, zone=6, sport=1).conn and _udp(ct, zone=6, sport=2).conn
    assert _udp(ct, zone=6, sport=3).conn is None
    assert ct.stats.refused_zone_limit == 2 and ct.zone_count(6) == 2


def test_zone_limit_zero_means_unlimited():
    """A zone limit of 0 means unlimited (OVS convention)."""
    ct = ConnTracker(CtConfig(zone_limits={1: 0}, default_zone_limit=1))
    assert all(_udp(ct, zone=1, sport=p).conn for p in range(1, 6))


def test_existing_connection_passes_even_at_limit():
    """Packets of committed connections are not affected by a full table."""
    ct = ConnTracker(CtConfig(max_conns=1))
    c = _udp(ct).conn
    r = ct.execute(P(udp("10.0.0.2", "10.0.0.1", 53, 1000)), 0, 0.0, commit=True)
    assert r.conn is c


def test_mark_and_labels_set_on_commit():
    """mark/labels given with commit are stored, also when re-committing an existing conn."""
    ct = ConnTracker()
    c = _udp(ct, mark=7, labels=1 << 100).conn
    assert c.mark == 7 and c.labels == 1 << 100
    _udp(ct, mark=9)
    assert c.mark == 9 and c.labels == 1 << 100
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1000, 53)), 0, 0.0, mark=11)  # no commit
    assert c.mark == 9


def test_conn_attributes_for_other_modules():
    """The Conn attributes named in the architecture contract exist with sane defaults."""
    ct = ConnTracker()
    c = _udp(ct, now=5.0).conn
    assert (c.zone, c.proto, c.created, c.nat, c.ext, c.helper, c.parent, c.children) == (
        0, 17, 5.0, None, None, None, None, 0)
    assert c.seq_check and c.state_name == "FIRST" and not c.established
    assert c.pkts == [1, 0] and c.bytes[0] == len(udp("10.0.0.1", "10.0.0.2", 1000, 53))
    c.ext_dict()["offload"] = 1
    assert c.ext == {"offload": 1}


def test_stats_as_dict():
    """stats counts packets, creations and invalid reasons and exports a plain dict."""
    ct = ConnTracker()
    _udp(ct)
    ct.execute(P(tcp("1.1.1.1", "2.2.2.2", 1, 2, "SA")), 0, 0.0, commit=True)
    d = ct.stats.as_dict()
    assert d["packets"] == 2 and d["created"] == 1 and d["invalid"] == 1
    assert d["invalid_reasons"] == {"tcp-synack-new": 1} and ct.stats["created"] == 1


def test_non_ip_and_fragments_are_invalid():
    """ARP is +inv (not-ip); IPv4 and IPv6 fragments are +inv (fragment), never committed."""
    ct = ConnTracker()
    arp = bytearray(bytes(Ether() / ARP()))
    assert ct.execute(parse(arp), 0, 0.0, commit=True).reason == "not-ip"
    f4 = frame(IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / UDP(sport=1, dport=2) / Raw(b"x"))
    f6 = frame(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=10, m=0)
               / Raw(b"y" * 16))
    for buf in (f4, f6):
        r = ct.execute(parse(buf), 0, 0.0, commit=True)
        assert r.state == INV and r.reason == "fragment"
    assert len(ct) == 0 and ct.stats.invalid_reasons == {"not-ip": 1, "fragment": 2}


def test_malformed_is_invalid_with_reason():
    """A truncated TCP header is +inv with the parser's reason."""
    ct = ConnTracker()
    buf = tcp("10.0.0.1", "10.0.0.2", 1, 2, "S")[:40]
    r = ct.execute(parse(buf), 0, 0.0, commit=True)
    assert r.state == INV and r.reason.startswith("malformed:")


def _samples() -> list[tuple[bytearray, NatAction | None]]:
    v4 = NatAction("snat", ip("203.0.113.1"))
    v6 = NatAction("snat", ip("2001:db8:ff::1"))
    syn = tcp("10.0.0.1", "10.0.0.2", 1, 2, "S", seq=7,
              options=[("MSS", 1460), ("WScale", 7), ("NOP", None)])
    return [
        (syn, v4),
        (tcp("2001:db8::1", "2001:db8::2", 1, 2, "S", options=[("WScale", 3)]), v6),
        (udp("10.0.0.1", "10.0.0.2", 1, 2), v4),
        (udp("2001:db8::1", "2001:db8::2", 1, 2), v6),
        (echo("10.0.0.1", "10.0.0.2", 3), v4),
        (echo("2001:db8::1", "2001:db8::2", 3), v6),
        (icmp_error("192.0.2.1", "10.0.0.1", syn), v4),
        (icmp_error("2001:db8::9", "2001:db8::1", udp("2001:db8::1", "2001:db8::2", 1, 2)), v6),
        (other("10.0.0.1", "10.0.0.2"), v4),
    ]


@pytest.mark.parametrize("idx", range(9))
def test_truncated_at_every_length_never_raises(idx):
    """Every prefix of every sample frame goes through execute (commit + NAT) without raising."""
    full, nat = _samples()[idx]
    ct = ConnTracker()
    # Pre-track the connections the samples relate to, so truncated errors find them.
    TcpPeers(a="10.0.0.1", b="10.0.0.2", sport=1, dport=2, isn_a=7).run(ct, "a", "S")
    ct.execute(P(udp("2001:db8::1", "2001:db8::2", 1, 2)), 0, 0.0, commit=True)
    for n in range(len(full) + 1):
        buf = bytearray(full[:n])
        r = ct.execute(parse(buf), 0, 1.0, commit=True, nat=nat)
        assert isinstance(r, CtResult) and r.state & CS.TRK
        if r.state & CS.INV:
            assert r.conn is None and r.reason
    assert len(ct) == len(ct.conns())


def test_random_corruption_never_raises():
    """Random byte corruption of sample frames never makes execute raise (seeded, repeatable)."""
    rnd = random.Random(1234)
    ct = ConnTracker()
    samples = _samples()
    for i in range(3000):
        full, nat = samples[i % len(samples)]
        buf = bytearray(full)
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(14, len(buf))] = rnd.randrange(256)
        r = ct.execute(parse(buf), rnd.randrange(3), float(i), commit=True,
                       nat=nat if rnd.random() < 0.5 else None)
        assert r.state & CS.TRK
    ct.sweep(1e9)
    assert len(ct) == 0


@pytest.mark.parametrize("a,b,pub,rtr", [
    ("10.0.0.1", "10.0.0.2", "203.0.113.1", "192.0.2.1"),
    ("2001:db8::1", "2001:db8::2", "2001:db8:ff::1", "2001:db8::9"),
])
def test_truncated_nat_related_errors_never_raise(a, b, pub, rtr):
    """ICMP errors about a SNAT'd connection, cut at every length, are translated or +inv, never raise."""
    ct = ConnTracker()
    syn = tcp(a, b, 1, 2, "S", seq=7)
    c = ct.execute(P(syn), 0, 0.0, commit=True, nat=NatAction("snat", ip(pub))).conn
    full = icmp_error(rtr, pub, syn)  # quotes the translated SYN
    related = 0
    for n in range(len(full) + 1):
        r = ct.execute(parse(bytearray(full[:n])), 0, 1.0)
        assert r.state & CS.TRK
        if r.state & CS.REL:
            assert r.conn is c
            related += 1
    assert related >= 1


def test_lazy_rearm_refiles_due_connections_the_source_saw_lately():
    """At its deadline a connection is re-armed from the re-arm source's
    last-used (expiry = last_used + timeout) instead of deleted; a None, an
    old time or a raising source lets it expire. Only due conns are asked."""
    ct = ConnTracker(CtConfig(timeouts={"udp_first": 10.0, "udp_multiple": 10.0}))
    busy = _udp(ct, sport=1, now=0.0).conn
    idle = _udp(ct, sport=2, now=0.0).conn
    late = _udp(ct, sport=3, now=5.0).conn
    asked: list[list] = []
    seen = {id(busy): 8.0, id(idle): 0.5}

    def source(conns, now):
        asked.append(list(conns))
        return [seen.get(id(c)) for c in conns]

    ct.set_rearm(source)
    ct.REARM_CHUNK = 1  # asked in chunks: one connection per call here
    ct.sweep(11.0)
    assert sorted(len(a) for a in asked) == [1, 1]
    assert {id(c) for a in asked for c in a} == {id(busy), id(idle)}  # not `late`
    assert ct.get(0, busy.orig) is busy and busy.expires == 18.0
    assert ct.get(0, idle.orig) is None and ct.get(0, late.orig) is late
    seen[id(late)] = 14.0
    assert ct.execute(P(udp("10.0.0.1", "10.0.0.2", 3, 53)), 0, 16.0).conn is late
    assert ct.stats.expired == 1  # the lookup past its deadline asked and kept it

    def broken(conns, now):
        raise RuntimeError("source gone")

    ct.set_rearm(broken)
    ct.sweep(40.0)
    assert len(ct) == 0 and ct.stats.observer_errors == 1
