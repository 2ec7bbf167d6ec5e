"""Conntrack state export/import (the restart handoff), without root or a kernel."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ctxdp.conntrack import CS, ConnTracker, CtConfig, CtObserver, FlowTuple, NatAction
from ctxdp.conntrack.conn import F_EST_SEEN, F_RELEARN
from ctxdp.conntrack.state import (
    HANDOFF_KEY,
    StateError,
    export_conns,
    import_conns,
    read_state_file,
    write_state_file,
)
from ctxdp.policy import AdmitInfo, NatDecision
from ctxdp.providers.base import FlowDir
from tests.unit.ctutil import P, echo, ip, tcp, udp

CLI, SRV, RTR = "10.0.1.2", "10.0.2.2", "10.0.2.1"
TCP_PEER = ("lo", "hi", "mw", "ws", "st")


def _masq_tcp(ct: ConnTracker, now: float = 10.0):
    """A masqueraded TCP connection (client -> server, source NAT'd to RTR) with data."""
    masq = NatAction("snat", ip(RTR))
    r = ct.execute(P(tcp(CLI, SRV, 40000, 80, "S", seq=1000)), 0, now, commit=True, nat=masq)
    conn = r.conn
    assert conn is not None
    ct.execute(P(tcp(SRV, RTR, 80, 40000, "SA", seq=5000, ack=1001)), 0, now)
    ct.execute(P(tcp(CLI, SRV, 40000, 80, "A", seq=1001, ack=5001)), 0, now)
    ct.execute(P(tcp(CLI, SRV, 40000, 80, "PA", seq=1001, ack=5001, payload=b"x" * 100)), 0, now)
    assert conn.state_name == "ESTABLISHED"
    conn.mark, conn.labels = 7, 1 << 100
    conn.ext_dict()["admit"] = AdmitInfo(
        "p0", "p1", FlowTuple(4, 6, ip(CLI), ip(SRV), 40000, 80),
        NatDecision(snat=masq, snat_rule=0))
    return conn


def _round_trip(ct: ConnTracker, conns, now: float, **kw):
    ct2 = ConnTracker(ct.cfg)
    rows = json.loads(json.dumps(export_conns(ct, conns)))  # what the file holds
    return ct2, import_conns(ct2, rows, now, **kw)


def test_tcp_masquerade_round_trip_keeps_tuples_nat_state_and_peers() -> None:
    """A masqueraded TCP conn comes back with the same tuples, NAT, state, windows and counters."""
    ct = ConnTracker()
    c = _masq_tcp(ct)
    ct2, [c2] = _round_trip(ct, [c], now=11.0)
    assert (c2.orig, c2.reply, c2.zone, c2.state_name) == (c.orig, c.reply, 0, "ESTABLISHED")
    assert c2.reply.dst == ip(RTR) and c2.nat is not None and c2.nat.snat
    assert (c2.nat.addr, c2.nat.port, c2.nat.oaddr, c2.nat.oport) == (
        c.nat.addr, c.nat.port, c.nat.oaddr, c.nat.oport)
    assert c2.nat.action == c.nat.action
    for f in TCP_PEER:
        for i in (0, 1):
            assert getattr(c2, f"{f}{i}") == getattr(c, f"{f}{i}"), f"{f}{i}"
    assert (c2.pkts, c2.bytes, c2.mark, c2.labels) == (c.pkts, c.bytes, 7, 1 << 100)
    assert (c2.created, c2.expires) == (c.created, c.expires)
    assert c2._f & F_EST_SEEN and c2.established
    assert ct2.get(0, c.reply) is c2 and len(ct2) == 1


def test_imported_tcp_relearns_windows_so_mid_stream_packets_are_valid_and_natd() -> None:
    """After import a segment 10 MB further on is valid (windows re-learned) and NAT'd;
    the same segment is invalid in a tracker that kept judging windows."""
    ct = ConnTracker(CtConfig(tcp_seq_check=True))
    c = _masq_tcp(ct)
    ct2, [c2] = _round_trip(ct, [c], now=11.0)
    assert c2.seq_check and c2._f & F_RELEARN
    far = 1101 + 10_000_000
    res_old = ct.execute(P(tcp(CLI, SRV, 40000, 80, "A", seq=far, ack=5001,
                               payload=b"y" * 50)), 0, 12.0)
    assert res_old.state & CS.INV, "the exporting tracker must find it out of window"
    buf = tcp(CLI, SRV, 40000, 80, "A", seq=far, ack=5001, payload=b"y" * 50)
    pkt = P(buf)
    res = ct2.execute(pkt, 0, 12.0)
    assert res.conn is c2 and not res.state & CS.INV and res.state & CS.SRC_NAT
    assert pkt.src == ip(RTR), "original-direction packet must leave with the masquerade source"
    back = P(tcp(SRV, RTR, 80, 40000, "A", seq=5001, ack=far + 50))
    r2 = ct2.execute(back, 0, 12.0)
    assert r2.conn is c2 and r2.reply and not r2.state & CS.INV and back.dst == ip(CLI)


def test_udp_dnat_round_trip_and_reply_lookup() -> None:
    """A DNAT'd UDP flow is found in both directions after import and keeps its translation."""
    ct = ConnTracker()
    fwd = NatAction("dnat", ip("10.0.1.10"), port_min=53, port_max=53)
    r = ct.execute(P(udp("10.0.2.2", RTR, 5555, 5353)), 3, 1.0, commit=True, nat=fwd)
    ct.execute(P(udp("10.0.1.10", "10.0.2.2", 53, 5555)), 3, 1.0)
    c = r.conn
    ct2, [c2] = _round_trip(ct, [c], now=2.0)
    assert (c2.zone, c2.state_name, c2.nat.dnat) == (3, c.state_name, True)
    pkt = P(udp("10.0.2.2", RTR, 5555, 5353))
    res = ct2.execute(pkt, 3, 2.5)
    assert res.conn is c2 and pkt.dst == ip("10.0.1.10") and pkt.dport == 53


def test_ipv6_echo_round_trip() -> None:
    """An ICMPv6 echo connection survives the round trip (addresses, echo id, state)."""
    ct = ConnTracker()
    r = ct.execute(P(echo("fd00:1::2", "fd00:2::2", 77)), 0, 1.0, commit=True)
    ct.execute(P(echo("fd00:2::2", "fd00:1::2", 77, reply=True)), 0, 1.0)
    ct2, [c2] = _round_trip(ct, [r.conn], now=1.5)
    assert (c2.orig, c2.reply, c2.state_name) == (r.conn.orig, r.conn.reply,
                                                  r.conn.state_name)
    assert ct2.execute(P(echo("fd00:2::2", "fd00:1::2", 77, reply=True, seq=2)), 0, 1.6).conn is c2


def test_admit_info_round_trip_is_equivalent_for_reload_checks() -> None:
    """The imported AdmitInfo equals the original, NAT decision key included."""
    ct = ConnTracker()
    c = _masq_tcp(ct)
    _, [c2] = _round_trip(ct, [c], now=11.0)
    a, b = c.ext["admit"], c2.ext["admit"]
    assert (b.in_ifname, b.out_ifname, b.orig) == (a.in_ifname, a.out_ifname, a.orig)
    assert b.nat.key() == a.nat.key() and b.nat.snat_rule == 0 and b.nat.dnat is None


class _Ctx:
    def __init__(self, dirs, nexthop, held) -> None:
        self.dirs, self.nexthop, self.held = dirs, nexthop, held


def test_forwarding_dirs_and_offload_mark_are_handed_over_decoded() -> None:
    """Exported dirs come back under HANDOFF_KEY with MACs and next hops as bytes."""
    ct = ConnTracker()
    c = _masq_tcp(ct)
    d0 = FlowDir(2, c.orig, c.reply.reverse(), 3, b"\x02\0\0\0\x01\x02", b"\x02\0\0\0\x02\x02",
                 1500)
    c.ext["offload"] = _Ctx([d0, None], [ip(SRV), None], {"xdp"})
    _, [c2] = _round_trip(ct, [c], now=11.0)
    h = c2.ext[HANDOFF_KEY]
    assert h["offloaded"] is True and h["dirs"][1] is None
    assert h["dirs"][0] == {"in_ifindex": 2, "out_ifindex": 3, "src_mac": d0.src_mac,
                            "dst_mac": d0.dst_mac, "mtu": 1500, "nexthop": ip(SRV)}


def test_expired_rows_are_dropped_unless_a_grace_is_given() -> None:
    """Expired rows are skipped (counted); with grace they live until now + grace."""
    ct = ConnTracker()
    c = _masq_tcp(ct, now=10.0)
    late = c.expires + 5
    skipped: dict[str, int] = {}
    _, got = _round_trip(ct, [c], now=late, skipped=skipped)
    assert got == [] and skipped == {"expired": 1}
    ct2, [c2] = _round_trip(ct, [c], now=late, grace=3.0)
    assert c2.expires == late + 3.0
    assert ct2.sweep(late + 3.5) is None and len(ct2) == 0, "grace ends in a normal expiry"


def test_bad_rows_are_skipped_and_counted_while_good_ones_import() -> None:
    """Garbage rows never raise: each is skipped with a reason; the good row still imports."""
    ct = ConnTracker()
    good = export_conns(ct, [_masq_tcp(ct)])[0]
    bad = [None, {}, dict(good, family=5), dict(good, orig=["x", SRV, 1, 2]),
           dict(good, state="NOPE"), {k: v for k, v in good.items() if k != "tcp"},
           dict(good, reply=[SRV, "fd00::1", 80, 40000]), dict(good, pkts="many"),
           dict(good, nat={"action": None}), dict(good, dirs=[{"in_ifindex": -1}, None]),
           dict(good, admit={"in_ifname": 3})]
    skipped: dict[str, int] = {}
    ct2 = ConnTracker()
    got = import_conns(ct2, [*bad, good], 11.0, skipped=skipped)
    assert len(got) == 1 and len(ct2) == 1
    assert sum(skipped.values()) == len(bad), skipped


def test_import_refuses_collisions_and_limits() -> None:
    """A row whose key is already tracked, or beyond max_conns, is refused (counted)."""
    ct = ConnTracker()
    rows = export_conns(ct, [_masq_tcp(ct)])
    skipped: dict[str, int] = {}
    assert import_conns(ct, rows, 11.0, skipped=skipped) == []
    assert skipped == {"collision": 1} and len(ct) == 1
    full = ConnTracker(CtConfig(max_conns=1))
    full.execute(P(udp("1.1.1.1", "2.2.2.2", 1, 2)), 0, 11.0, commit=True)
    skipped.clear()
    assert import_conns(full, rows, 11.0, skipped=skipped) == [] and skipped == {"limit": 1}


def test_observers_see_imported_connections_created() -> None:
    """Import notifies on_created, so the offload manager gets its per-connection context."""
    seen = []

    class Obs(CtObserver):
        def on_created(self, conn, now):
            seen.append((conn, now))

    ct = ConnTracker()
    rows = export_conns(ct, [_masq_tcp(ct)])
    ct2 = ConnTracker()
    ct2.add_observer(Obs())
    got = import_conns(ct2, rows, 11.0)
    assert seen == [(got[0], 11.0)]


def test_state_file_is_atomic_private_and_checked(tmp_path) -> None:
    """write/read round-trips rows and meta, mode 0600, no temp left; foreign files refused."""
    ct = ConnTracker()
    rows = export_conns(ct, [_masq_tcp(ct)])
    path = str(tmp_path / "sub" / "state.json")
    write_state_file(path, rows, {"boot_id": "b", "pin_dir": "/sys/fs/bpf/x"})
    meta, back = read_state_file(path)
    assert meta == {"boot_id": "b", "pin_dir": "/sys/fs/bpf/x"} and back == rows
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path / "sub") == ["state.json"]
    with pytest.raises(StateError):
        read_state_file(str(tmp_path / "absent.json"))
    for text in ("not json", '{"format": "other"}',
                 '{"format": "ctxdp-conntrack-state", "version": 99, "meta": {}, "conns": []}',
                 '{"format": "ctxdp-conntrack-state", "version": 1, "meta": [], "conns": []}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(StateError):
            read_state_file(str(tmp_path / "bad.json"))
