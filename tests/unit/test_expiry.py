"""Expiry: per-state timeouts, sweep/next wake-up with a fake clock, refresh, lazy buckets."""

from __future__ import annotations

from ctxdp.conntrack import ConnTracker, CtConfig
from ctxdp.conntrack.conn import Conn
from ctxdp.conntrack.expiry import ExpiryBuckets
from ctxdp.conntrack.proto import OtherHandler
from tests.unit.ctutil import P, TcpPeers, echo, udp


def _udp(ct, n=0, now=0.0, zone=0):
    return ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1000 + n, 53)), zone, now, commit=True).conn


def _conn(expires: float) -> Conn:
    c = Conn(OtherHandler(CtConfig()), 0.0)
    c.expires = expires
    return c


def test_sweep_deletes_exactly_when_due_and_reports_next_wakeup():
    """A UDP conn (60 s) survives sweep(59.9), goes at sweep(60); wake-ups follow the buckets."""
    ct = ConnTracker()
    c = _udp(ct, now=0.0)
    d = _udp(ct, 1, now=10.5)
    assert ct.sweep(1.0) == 60.0
    assert ct.sweep(59.9) == 60.0 and c.alive
    assert ct.sweep(60.0) == 71.0 and not c.alive and d.alive
    assert ct.sweep(71.0) is None and not d.alive and len(ct) == 0
    assert ct.stats.expired == 2 and ct.stats.deleted_reasons == {"expired": 2}


def test_activity_moves_expiry_and_sweep_refiles():
    """Traffic pushes expiry out without re-filing; the due sweep re-files instead of deleting."""
    ct = ConnTracker()
    c = _udp(ct, now=0.0)
    ct.execute(P(udp("10.0.0.2", "10.0.0.1", 53, 1000)), 0, 50.0)  # BIDIR: 50 + 30
    assert c.expires == 80.0
    assert ct.sweep(60.0) == 80.0 and c.alive
    assert ct.sweep(80.0) is None and not c.alive


def test_state_change_to_shorter_timeout_is_honoured():
    """ESTABLISHED (24 h) then RST (30 s): the sweep deletes 30 s later, not a day later."""
    ct = ConnTracker()
    f = TcpPeers()
    c = f.handshake(ct, now=0.0).conn
    # Filed at the SYN's 30 s: that sweep finds it alive and re-files it.
    assert ct.sweep(1.0) == 30.0
    assert ct.sweep(30.0) == 86400.0 and c.alive
    f.run(ct, "a", "R", now=100.0)
    assert ct.sweep(100.0) == 130.0
    ct.sweep(130.0)
    assert not c.alive


def test_each_tcp_state_timeout():
    """Every TCP state gets its own configured timeout."""
    names = ["tcp_first", "tcp_opening", "tcp_established", "tcp_closing", "tcp_fin_wait",
             "tcp_closed"]
    cfg = CtConfig(timeouts={n: float(i + 1) for i, n in enumerate(names)})
    ct = ConnTracker(cfg)
    f = TcpPeers()
    seen = {}
    c = f.run(ct, "a", "S", now=0.0).conn
    seen[c.state_name] = c.expires
    for side, flags in (("b", "SA"), ("a", "A"), ("a", "FA"), ("b", "FA"), ("a", "A")):
        f.run(ct, side, flags, now=0.0)
        seen[c.state_name] = c.expires
    assert seen == {"SYN_SENT": 1.0, "SYN_RECV": 2.0, "ESTABLISHED": 3.0, "FIN_WAIT": 4.0,
                    "CLOSING": 5.0, "TIME_WAIT": 6.0}
    assert c.timeout_name == "tcp_closed"


def test_each_udp_and_icmp_state_timeout():
    """UDP first/multiple/bidir and ICMP first/reply timeouts are applied per state."""
    cfg = CtConfig(timeouts={"udp_first": 1, "udp_multiple": 2, "udp_bidir": 3,
                             "icmp_first": 4, "icmp_reply": 5})
    ct = ConnTracker(cfg)
    c = _udp(ct)
    assert c.expires == 1.0
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1000, 53)), 0, 0.0)
    assert c.expires == 2.0
    ct.execute(P(udp("10.0.0.2", "10.0.0.1", 53, 1000)), 0, 0.0)
    assert c.expires == 3.0
    e = ct.execute(P(echo("10.0.0.1", "10.0.0.2", 1)), 0, 0.0, commit=True).conn
    assert e.expires == 4.0
    ct.execute(P(echo("10.0.0.2", "10.0.0.1", 1, reply=True)), 0, 0.0)
    assert e.expires == 5.0


def test_refresh_pushes_out_never_pulls_in():
    """refresh(conn, last_used) sets last_used + state timeout only if that is later."""
    ct = ConnTracker()
    c = _udp(ct, now=0.0)  # FIRST: 60 s
    assert ct.refresh(c, 100.0) == 160.0 and c.expires == 160.0
    assert ct.refresh(c, 50.0) == 160.0
    assert ct.sweep(60.0) == 160.0 and c.alive
    ct.sweep(160.0)
    assert not c.alive


def test_expired_conn_is_not_found_before_sweep():
    """A lookup after expiry but before any sweep treats the packet as new."""
    ct = ConnTracker()
    c = _udp(ct, now=0.0)
    r = ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1000, 53)), 0, 60.0, commit=True)
    assert r.conn is not c and r.conn is not None and not c.alive
    assert ct.stats.expired == 1 and len(ct) == 1


def test_granularity_rounds_wakeups_up():
    """With 5 s buckets an expiry at 61 s wakes the sweep at 65 s."""
    ct = ConnTracker(CtConfig(sweep_granularity=5.0))
    c = _udp(ct, now=1.0)
    assert ct.sweep(2.0) == 65.0
    ct.sweep(64.9)
    assert c.alive
    ct.sweep(65.0)
    assert not c.alive


def test_due_only_touches_due_buckets():
    """due(now) pops the buckets that are due and leaves later ones alone."""
    b = ExpiryBuckets(1.0)
    conns = [_conn(float(t)) for t in range(1, 101)]
    for c in conns:
        b.file(c)
    assert b.stats()["buckets"] == 100
    out = b.due(10.0)
    assert out == conns[:10] and b.stats()["buckets"] == 90 and len(b) == 90
    assert b.next_wakeup() == 11.0


def test_refile_earlier_and_stale_entries():
    """Moving expiry earlier re-files; the old entry is skipped as stale."""
    b = ExpiryBuckets(1.0)
    c = _conn(100.0)
    b.file(c)
    c.expires = 5.0
    b.refile(c)
    assert b.next_wakeup() == 5.0
    assert b.due(5.0) == [c]
    assert b.due(100.0) == [] and b.stats()["stale"] == 0 and b.next_wakeup() is None


def test_deleted_entries_are_compacted():
    """Many deletions leave stale entries that the sweep compacts away."""
    ct = ConnTracker()
    conns = [_udp(ct, n) for n in range(5000)]
    for c in conns[:4990]:
        ct.delete(c, 1.0)
    assert ct._exp.stats()["stale"] == 4990
    ct.sweep(1.0)
    assert ct._exp.stats() == {"buckets": 1, "live": 10, "stale": 0}
    assert ct.sweep(60.0) is None and len(ct) == 0


def test_flush_clears_timers():
    """flush() deletes everything and leaves nothing to wake up for."""
    ct = ConnTracker()
    for n in range(10):
        _udp(ct, n)
    assert ct.flush(1.0) == 10 and len(ct) == 0 and ct.sweep(1.0) is None
