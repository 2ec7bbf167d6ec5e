"""TCP handler: handshake, data, teardown, windows, retransmits, reopen, seq_check."""

from __future__ import annotations

import pytest

from ctxdp.conntrack import CS, ConnTracker, CtConfig, TcpConn
from ctxdp.conntrack.tcp import TcpHandler, peer_states, tcp_invalid_flags
from tests.unit.ctutil import P, TcpPeers, st, tcp

EST = CS.TRK | CS.EST
EST_RPL = CS.TRK | CS.EST | CS.RPL
NEW = CS.TRK | CS.NEW
INV = CS.TRK | CS.INV


def established(ct: ConnTracker | None = None, **kw) -> tuple[ConnTracker, TcpPeers, TcpConn]:
    ct = ct if ct is not None else ConnTracker()
    f = TcpPeers(**kw)
    r = f.handshake(ct)
    return ct, f, r.conn  # type: ignore[return-value]


def test_handshake_states_and_flags():
    """SYN commits +new (SYN_SENT), SYN-ACK is +est+rpl (SYN_RECV), ACK makes ESTABLISHED."""
    ct = ConnTracker()
    f = TcpPeers()
    r = f.run(ct, "a", "S")
    assert r.state == NEW and r.conn is not None and not r.reply
    c = r.conn
    assert c.state_name == "SYN_SENT" and not c.established
    assert peer_states(c) == ("SYN_SENT", "CLOSED")
    r = f.run(ct, "b", "SA")
    assert r.state == EST_RPL and r.conn is c and r.reply
    assert c.state_name == "SYN_RECV"
    r = f.run(ct, "a", "A")
    assert r.state == EST and c.state_name == "ESTABLISHED" and c.established
    assert peer_states(c) == ("ESTABLISHED", "ESTABLISHED")
    assert len(ct) == 1 and ct.stats.created == 1


def test_syn_retransmit_is_new_until_answered():
    """A retransmitted SYN matches the connection and stays +new while the server is silent."""
    ct = ConnTracker()
    f = TcpPeers()
    c = f.run(ct, "a", "S").conn
    r = ct.execute(P(f.send("a", "S", seq=1000)), 0, 1.0)
    assert r.conn is c and r.state == NEW
    assert c.pkts == [2, 0]


def test_data_both_ways_counts_packets_and_bytes():
    """Data and acks in both directions are +est; per-direction counters add up."""
    ct, f, c = established()
    for _ in range(5):
        assert f.run(ct, "a", "PA", 1000).state == EST
        assert f.run(ct, "b", "PA", 300).state == EST_RPL
    assert c.pkts == [2 + 5, 1 + 5]
    assert c.bytes[0] > 5 * 1000 and c.bytes[1] > 5 * 300


def test_out_of_window_data_is_invalid_and_counted():
    """A segment beyond the receiver's window is +inv, counted, and leaves the conn untouched."""
    ct, f, c = established()
    before = (c.lo0, c.hi0, c.pkts[:])
    r = ct.execute(P(f.send("a", "PA", 100, seq=f.nxt["a"] + 10_000_000)), 0, 1.0)
    assert r.state == INV and r.conn is None and r.reason == "tcp-out-of-window"
    assert (c.lo0, c.hi0, c.pkts) == before
    assert ct.stats.invalid == 1 and ct.stats.invalid_reasons["tcp-out-of-window"] == 1


def test_too_old_segment_is_invalid():
    """A segment more than one window behind what was already sent is +inv."""
    ct, f, c = established(win=1000)
    for _ in range(20):
        f.run(ct, "a", "PA", 1000)
        f.run(ct, "b", "A")
    r = ct.execute(P(f.send("a", "PA", 100, seq=f.nxt["a"] - 10_000)), 0, 1.0)
    assert r.state == INV


def test_ack_of_unsent_data_is_invalid():
    """Acking far beyond what the other side sent is +inv (ack skew check)."""
    ct, f, _ = established()
    r = ct.execute(P(f.send("b", "A", ack=f.nxt["a"] + 200_000)), 0, 1.0)
    assert r.state == INV and r.reason == "tcp-out-of-window"


def test_retransmit_is_accepted():
    """Re-sending an already seen segment is +est, not +inv."""
    ct, f, _ = established()
    seq = f.nxt["a"]
    f.run(ct, "a", "PA", 500)
    f.run(ct, "b", "A")
    r = ct.execute(P(f.send("a", "PA", 500, seq=seq)), 0, 1.0)
    assert r.state == EST


def test_fin_teardown_both_ways():
    """FIN/ACK each way walks FIN_WAIT -> CLOSING -> TIME_WAIT with OVS timeouts."""
    ct, f, c = established()
    r = f.run(ct, "a", "FA", now=10.0)
    assert r.state == EST and c.state_name == "FIN_WAIT" and c.expires == 10.0 + 15 * 60
    r = f.run(ct, "b", "FA", now=11.0)
    assert r.state == EST_RPL and c.state_name == "CLOSING" and c.expires == 11.0 + 45
    r = f.run(ct, "a", "A", now=12.0)
    assert c.state_name == "TIME_WAIT" and c.expires == 12.0 + 30
    assert peer_states(c) == ("FIN_WAIT_2", "FIN_WAIT_2")


def test_half_close_keeps_data_flowing():
    """After one side's FIN the other side may still send data (FIN_WAIT)."""
    ct, f, c = established()
    f.run(ct, "a", "FA")
    f.run(ct, "b", "A")
    assert f.run(ct, "b", "PA", 200).state == EST_RPL
    assert f.run(ct, "a", "A").state == EST
    assert c.state_name == "FIN_WAIT"


def test_rst_in_window_closes():
    """An RST with the expected sequence number moves the connection to CLOSED (30 s)."""
    ct, f, c = established()
    r = f.run(ct, "b", "R", now=5.0)
    assert r.state == EST_RPL and c.state_name == "CLOSED" and c.expires == 35.0


def test_rst_out_of_window_is_invalid():
    """An RST whose sequence number is not exactly expected is +inv and changes nothing."""
    ct, f, c = established()
    r = ct.execute(P(f.send("b", "R", seq=f.nxt["b"] + 5000)), 0, 1.0)
    assert r.state == INV and r.reason == "tcp-rst-seq"
    assert c.state_name == "ESTABLISHED"


def test_syn_reopens_time_wait_connection():
    """A new SYN on a TIME_WAIT connection deletes it and commits a fresh one."""
    ct, f, c = established()
    f.run(ct, "a", "FA")
    f.run(ct, "b", "FA")
    f.run(ct, "a", "A")
    assert c.state_name == "TIME_WAIT"
    g = TcpPeers(isn_a=777_777)
    r = g.run(ct, "a", "S", now=3.0)
    assert r.state == NEW and r.conn is not None and r.conn is not c
    assert not c.alive and r.conn.state_name == "SYN_SENT"
    assert len(ct) == 1 and ct.stats.reopened == 1
    assert ct.stats.deleted_reasons == {"reopen": 1}


def test_syn_reopens_closed_after_rst():
    """A SYN after an RST (CLOSED) reopens; without commit it is +new and the old one is gone."""
    ct, f, c = established()
    f.run(ct, "a", "R")
    r = TcpPeers(isn_a=9).run(ct, "a", "S", commit=False)
    assert r.state == NEW and r.conn is None and len(ct) == 0 and not c.alive


def test_syn_on_established_does_not_reopen():
    """A SYN with an unrelated ISN on an ESTABLISHED connection is +inv, not a reopen."""
    ct, f, c = established()
    r = ct.execute(P(f.send("a", "S", seq=3_000_000_000)), 0, 1.0)
    assert r.state == INV and c.alive and ct.stats.reopened == 0


@pytest.mark.parametrize("flags", ["SF", "SR", "F", "P", "U", ""])
def test_invalid_flag_combinations(flags):
    """Flag combinations no stack sends are +inv on new and existing connections."""
    assert tcp_invalid_flags(P(tcp("1.1.1.1", "2.2.2.2", 1, 2, flags)).tcp_flags)
    ct, f, _ = established()
    r = ct.execute(P(f.send("a", flags)), 0, 1.0)
    assert r.state == INV and r.reason == "tcp-bad-flags"
    r = ct.execute(P(tcp("1.1.1.1", "2.2.2.2", 1, 2, flags)), 0, 1.0, commit=True)
    assert r.state == INV and len(ct) == 1


def test_synack_cannot_create():
    """A SYN-ACK with no connection is +inv and is not committed (OVS rule)."""
    ct = ConnTracker()
    r = ct.execute(P(tcp("1.1.1.1", "2.2.2.2", 1, 2, "SA")), 0, 1.0, commit=True)
    assert r.state == INV and r.reason == "tcp-synack-new" and len(ct) == 0


def test_midstream_pickup():
    """A plain ACK may commit (picked up mid-stream); both directions then pass liberally."""
    ct = ConnTracker()
    f = TcpPeers(isn_a=123_456, isn_b=987_654)
    r = f.run(ct, "a", "PA", 100)
    assert r.state == NEW and r.conn is not None
    c = r.conn
    assert f.run(ct, "b", "PA", 1000).state == EST_RPL
    for _ in range(3):
        assert f.run(ct, "a", "PA", 2000).state == EST
        assert f.run(ct, "b", "PA", 50_000).state == EST_RPL
    assert c.state_name == "ESTABLISHED"


def test_window_scaling():
    """With window scaling a segment inside the scaled window but beyond the raw one passes."""
    ct, f, c = established(wscale=7, win=1000)
    assert c.ws0 & 0x0F == 7 and c.ws1 & 0x0F == 7
    # The server's first scaled ack opens 1000 << 7 = 128000 bytes of window;
    # 60000 bytes in flight exceed the raw 1000-byte window many times over.
    assert f.run(ct, "b", "A").state == EST_RPL
    for _ in range(6):
        assert f.run(ct, "a", "PA", 10_000).state == EST
    assert f.run(ct, "b", "A").state == EST_RPL


def test_window_scale_only_one_side_disables_scaling():
    """If only the client offers window scaling, neither side is scaled."""
    ct = ConnTracker()
    f = TcpPeers(wscale=7, win=1000)
    c = f.run(ct, "a", "S").conn
    f.wscale = None
    f.run(ct, "b", "SA")
    f.run(ct, "a", "A")
    assert c.ws0 == 0 and c.ws1 == 0  # the offer is withdrawn (OVS)
    r = ct.execute(P(f.send("a", "PA", 100, seq=f.nxt["a"] + 100_000)), 0, 1.0)
    assert r.state == INV


def test_sequence_wraparound():
    """Sequence numbers wrapping past 2**32 stay in window."""
    ct, f, c = established(isn_a=2**32 - 3000, isn_b=2**32 - 10)
    for _ in range(5):
        assert f.run(ct, "a", "PA", 1000).state == EST
        assert f.run(ct, "b", "PA", 100).state == EST_RPL
    assert c.lo0 < 10_000 and c.lo1 < 10_000


def test_ipv6_handshake_and_data():
    """TCP over IPv6 is tracked the same way."""
    ct, f, c = established(a="2001:db8::1", b="2001:db8::2")
    assert c.family == 6 and len(c.key) == 39
    assert f.run(ct, "a", "PA", 100).state == EST
    assert f.run(ct, "b", "A").state == EST_RPL


def test_global_seq_check_off_accepts_out_of_window():
    """With CtConfig.tcp_seq_check off, out-of-window segments are +est."""
    ct, f, _ = established(ConnTracker(CtConfig(tcp_seq_check=False)))
    r = ct.execute(P(f.send("a", "PA", 100, seq=f.nxt["a"] + 10_000_000)), 0, 1.0)
    assert r.state == EST


def test_per_connection_seq_check_off():
    """conn.seq_check off accepts out-of-window segments on that connection only."""
    ct, f, c = established()
    _, g, d = established(ct, sport=41000)
    ct.set_seq_check(c, False)
    assert ct.execute(P(f.send("a", "PA", 1, seq=f.nxt["a"] + 10**7)), 0, 1.0).state == EST
    assert ct.execute(P(g.send("a", "PA", 1, seq=g.nxt["a"] + 10**7)), 0, 1.0).state == INV


def _offload_gap(f: TcpPeers, nbytes_a: int, nbytes_b: int) -> None:
    """Simulate traffic the slow path never saw (carried by the fast path)."""
    f.nxt["a"] = (f.nxt["a"] + nbytes_a) % 2**32
    f.nxt["b"] = (f.nxt["b"] + nbytes_b) % 2**32


def test_seq_check_reenable_relearns_windows():
    """Re-enabling seq_check after an offload gap re-learns windows: mid-stream packets stay valid."""
    ct, f, c = established(win=1000)
    ct.set_seq_check(c, False)
    _offload_gap(f, 3_000_000_000, 50_000_000)
    ct.set_seq_check(c, True)
    assert c.seq_check
    assert f.run(ct, "a", "PA", 500).state == EST
    assert f.run(ct, "a", "PA", 500).state == EST
    assert f.run(ct, "b", "PA", 700).state == EST_RPL
    for _ in range(5):
        assert f.run(ct, "a", "PA", 800).state == EST
        assert f.run(ct, "b", "A").state == EST_RPL
    # Judging has resumed: a wild segment is invalid again.
    r = ct.execute(P(f.send("a", "PA", 10, seq=f.nxt["a"] + 10**8)), 0, 1.0)
    assert r.state == INV


def test_seq_check_reenable_reply_first():
    """Re-learning works whichever direction speaks first after the gap."""
    ct, f, c = established(win=1000)
    ct.set_seq_check(c, False)
    _offload_gap(f, 70_000, 2_000_000_000)
    ct.set_seq_check(c, True)
    assert f.run(ct, "b", "PA", 10).state == EST_RPL
    assert f.run(ct, "a", "A").state == EST
    assert f.run(ct, "b", "PA", 900).state == EST_RPL


def test_reenable_without_relearn_would_be_invalid():
    """The nf_flowtable problem: flipping the attribute back without re-learning marks packets +inv."""
    ct, f, c = established(win=1000)
    ct.set_seq_check(c, False)
    _offload_gap(f, 3_000_000_000, 50_000_000)
    c.seq_check = True  # bypasses ConnTracker.set_seq_check on purpose
    assert f.run(ct, "a", "PA", 500).state == INV


def test_fin_rst_state_changes_while_seq_check_off():
    """With seq_check off the state machine still follows FIN and RST."""
    ct, f, c = established()
    ct.set_seq_check(c, False)
    f.run(ct, "a", "FA")
    assert c.state_name == "FIN_WAIT"
    f.run(ct, "b", "R")
    assert c.state_name == "CLOSED"


def test_handler_timeouts_follow_config():
    """Per-state TCP timeouts come from CtConfig overrides."""
    h = TcpHandler(CtConfig(timeouts={"tcp_established": 100.0}))
    assert h.timeouts[h.states.index("ESTABLISHED")] == 100.0
    assert h.timeouts[h.states.index("SYN_SENT")] == 30.0


def test_first_and_opening_timeouts():
    """SYN gets tcp_first (30 s), SYN-ACK tcp_opening (30 s), ACK tcp_established (24 h)."""
    ct = ConnTracker(CtConfig(timeouts={"tcp_first": 11, "tcp_opening": 22}))
    f = TcpPeers()
    c = f.run(ct, "a", "S", now=100.0).conn
    assert c.expires == 111.0
    f.run(ct, "b", "SA", now=101.0)
    assert c.expires == 123.0
    f.run(ct, "a", "A", now=102.0)
    assert c.expires == 102.0 + 86400
    assert st(f.run(ct, "a", "PA", 1, now=103.0)) == "+est+trk"
