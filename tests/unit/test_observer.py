"""Observer hooks: each hook's calls and arguments, on_update dispatch, raising observers."""

from __future__ import annotations

import logging

from ctxdp.conntrack import ConnTracker, CtObserver
from ctxdp.conntrack.observer import overrides
from tests.unit.ctutil import P, TcpPeers, udp


class Recorder(CtObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_created(self, conn, now):
        self.events.append(("created", conn, now))

    def on_established(self, conn, now):
        self.events.append(("established", conn, now))

    def on_state_change(self, conn, old, new, now):
        self.events.append(("state", old, new, now))

    def on_deleted(self, conn, now, reason):
        self.events.append(("deleted", conn, now, reason))


class UpdateRecorder(CtObserver):
    def __init__(self) -> None:
        self.updates: list[tuple] = []

    def on_update(self, conn, pkt, reply, now):
        self.updates.append((conn, pkt.tcp_flags, reply, now))


class Boom(CtObserver):
    def on_created(self, conn, now):
        raise RuntimeError("boom")

    def on_update(self, conn, pkt, reply, now):
        raise RuntimeError("boom")


def test_tcp_lifecycle_hooks_in_order():
    """created, state changes, established once, and deleted(reason) fire with the right args."""
    ct = ConnTracker()
    rec = Recorder()
    ct.add_observer(rec)
    f = TcpPeers()
    c = f.run(ct, "a", "S", now=1.0).conn
    f.run(ct, "b", "SA", now=2.0)
    f.run(ct, "a", "A", now=3.0)
    f.run(ct, "a", "PA", 10, now=4.0)
    f.run(ct, "a", "FA", now=5.0)
    ct.delete(c, 6.0, "admin")
    assert rec.events == [
        ("created", c, 1.0),
        ("state", "SYN_SENT", "SYN_RECV", 2.0),
        ("state", "SYN_RECV", "ESTABLISHED", 3.0),
        ("established", c, 3.0),
        ("state", "ESTABLISHED", "FIN_WAIT", 5.0),
        ("deleted", c, 6.0, "admin"),
    ]
    assert not ct.delete(c, 7.0)  # already gone: no second event
    assert len(rec.events) == 6


def test_established_fires_once_for_udp():
    """UDP's first reply fires on_established once; later packets do not."""
    ct = ConnTracker()
    rec = Recorder()
    ct.add_observer(rec)
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0, commit=True)
    for _ in range(3):
        ct.execute(P(udp("10.0.0.2", "10.0.0.1", 2, 1)), 0, 1.0)
    assert [e[0] for e in rec.events].count("established") == 1


def test_on_update_per_packet_only_when_overridden():
    """on_update sees every later packet of a connection, with direction; others are not dispatched."""
    ct = ConnTracker()
    rec = Recorder()
    ct.add_observer(rec)
    assert not overrides(rec, "on_update") and ct._upd_obs == []
    up = UpdateRecorder()
    ct.add_observer(up)
    assert overrides(up, "on_update") and ct._upd_obs == [up]
    f = TcpPeers()
    c = f.handshake(ct, now=1.0).conn
    assert [(u[0], u[2]) for u in up.updates] == [(c, True), (c, False)]  # not the SYN
    ct.remove_observer(up)
    f.run(ct, "a", "PA", 5)
    assert len(up.updates) == 2


def test_deleted_reasons_expired_flush_reopen():
    """on_deleted reports expired, flush and reopen."""
    ct = ConnTracker()
    rec = Recorder()
    ct.add_observer(rec)
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0, commit=True)
    ct.sweep(60.0)
    ct.execute(P(udp("10.0.0.1", "10.0.0.2", 1, 2)), 0, 0.0, commit=True)
    ct.flush(1.0)
    f = TcpPeers()
    f.handshake(ct)
    f.run(ct, "a", "R")
    TcpPeers(isn_a=5).run(ct, "a", "S")
    reasons = [e[3] for e in rec.events if e[0] == "deleted"]
    assert reasons == ["expired", "flush", "reopen"]


def test_raising_observer_is_logged_counted_and_isolated(caplog):
    """A raising observer is logged and counted; later observers and the tracker still work."""
    ct = ConnTracker()
    ct.add_observer(Boom())
    rec = Recorder()
    ct.add_observer(rec)
    with caplog.at_level(logging.ERROR, logger="ctxdp.conntrack.table"):
        f = TcpPeers()
        r = f.handshake(ct)
    assert r.conn.established
    assert ct.stats.observer_errors == 3  # on_created + two on_update
    assert rec.events[0][0] == "created"
    assert "boom" in caplog.text
