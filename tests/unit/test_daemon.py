"""ctxdp.daemon without the kernel: ``Daemon.assemble`` over fake ports, routes,
neighbours and links, with the real tracker, offload manager, policy, forwarder
and a dummy (or XDP-like dummy) provider, on a fake clock."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ctxdp import cli
from ctxdp.config import load_config, parse_config
from ctxdp.control import ControlError, ControlServer
from ctxdp.daemon import Daemon
from ctxdp.datapath.netlink import LinkState
from ctxdp.providers.dummy import DummyProvider
from tests.unit.fakes import (
    CLIENT_MAC,
    GW_MAC,
    WAN_MAC,
    FakeClock,
    FakeLinks,
    FakeXdp,
    TcpFlow,
    a,
    mac,
    topology,
)

LAN_IF, WAN_IF = 2, 3
GW = a("192.0.2.254")
PORT_ADDR = {("wan0", 4): a("192.0.2.1"), ("wan0", 6): a("2001:db8::1")}
BASE: dict[str, Any] = {
    "ports": [{"name": "lan0"}, {"name": "wan0"}],
    "offload": {"providers": ["dummy"]},
    "conntrack": {"timeouts": {"tcp_established": 100.0}},
}
MASQ = {"nat": [{"type": "masquerade", "out_port": "wan0"}]}


# -- config files -------------------------------------------------------------------


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    raise TypeError(v)


def _toml(doc: dict[str, Any], prefix: str = "") -> list[str]:
    """Just enough TOML writing for these configs: scalars, tables, arrays of tables."""
    lines: list[str] = []
    later: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            later.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {_val(v)}")
    for k, v in later:
        name = f"{prefix}{k}"
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"[[{name}]]" if isinstance(v, list) else f"[{name}]")
            lines += _toml(item, name + ".")
    return lines


def write_config(path: Path, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    full = {**BASE, **(doc or {})}
    path.write_text("\n".join(_toml(full)) + "\n")
    assert load_config(str(path)) == parse_config(full)  # the writer itself is right
    return full


# -- the rig ---------------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path):
    made: list[Daemon] = []

    def make(doc: dict[str, Any] | None = None, *, xdp: bool = False) -> SimpleNamespace:
        path = tmp_path / "ctxdp.toml"
        write_config(path, doc)
        clock = FakeClock(1000.0)
        d = Daemon(load_config(str(path)), str(path), clock=clock)
        made.append(d)
        ports, router, neigh = topology()
        links = FakeLinks()
        prov = FakeXdp() if xdp else DummyProvider()
        d.assemble(ports, router, neigh, links, [prov], xdp=prov if xdp else None,
                   port_addr=lambda n, f: PORT_ADDR.get((n, f)))
        return SimpleNamespace(d=d, clock=clock, prov=prov, router=router, neigh=neigh,
                               links=links, lan=ports.by_name("lan0"),
                               wan=ports.by_name("wan0"),
                               reconfigure=lambda doc=None: write_config(path, doc))

    yield make
    for d in made:
        d.close()


def deliver(r: SimpleNamespace, port: Any, frm: bytearray) -> list[bytes]:
    """One frame through the daemon's receive path; what the router sent anywhere."""
    port.rx.append(frm)
    r.d._rx(port)
    return r.lan.take() + r.wan.take()


def establish(r: SimpleNamespace, sport: int = 40000, dport: int = 80) -> tuple[Any, TcpFlow]:
    """A client -> server TCP handshake through the daemon; returns (conn, flow)."""
    flow = TcpFlow(("10.0.1.5", sport), ("203.0.113.7", dport), ("203.0.113.7", dport))
    out = deliver(r, r.lan, flow.send("a", "S"))
    if out:  # the server answers whatever source the router put on the wire
        f = Ether(out[0])
        flow.ends["b"] = (("203.0.113.7", dport), (f[IP].src, f[TCP].sport))
    deliver(r, r.wan, flow.send("b", "SA"))
    deliver(r, r.lan, flow.send("a", "A"))
    conn = r.d.ct.get(0, flow_tuple(sport, dport))
    assert conn is not None
    return conn, flow


def flow_tuple(sport: int, dport: int):
    from ctxdp.conntrack import FlowTuple

    return FlowTuple(4, 6, a("10.0.1.5"), a("203.0.113.7"), sport, dport)


def link(ifindex: int = WAN_IF, *, up: bool = True, mtu: int = 1500) -> LinkState:
    name = {LAN_IF: "lan0", WAN_IF: "wan0"}.get(ifindex, f"eth{ifindex}")
    return LinkState(ifindex, name, WAN_MAC, mtu, up, up)


# -- aging -----------------------------------------------------------------------------


def test_tick_rearms_expiry_from_last_used_at_the_deadline_and_expires_idle_connections(rig):
    """Lazy aging: the tick reads last-used only when the deadline comes; fast-path
    traffic then re-arms the connection, and an idle one is deleted/withdrawn."""
    r = rig()
    conn, _ = establish(r)
    assert r.prov.holds(conn)
    assert conn.expires == pytest.approx(1100.0)
    r.prov.touch(conn, r.clock.advance(90))  # fast-path traffic at t=1090
    r.d.tick(r.clock())
    assert conn.expires == pytest.approx(1100.0)  # not due: nothing read
    assert r.prov.hooks("conn_update") == []
    r.d.tick(r.clock.advance(60))  # t=1150: due at 1100, re-armed from 1090
    assert r.d.ct.get(0, conn.orig) is conn and r.prov.holds(conn)
    assert conn.expires == pytest.approx(1190.0)
    assert len(r.prov.hooks("conn_update")) == 1
    r.d.tick(r.clock.advance(50))  # t=1200: idle for 110 s > 100 s
    assert len(r.d.ct) == 0
    assert not r.prov.holds(conn)
    assert r.d.ct.stats.deleted_reasons == {"expired": 1}


def test_tick_reads_nothing_of_connections_not_due(rig):
    """Busy or idle, a connection whose deadline has not come costs the tick no
    last-used read and no counter read."""
    r = rig(xdp=True)
    conns = [establish(r, 40000 + i)[0] for i in range(3)]
    for t in range(10):
        for c in conns:
            r.prov.touch(c, r.clock())
            r.prov.set_counters(r.d.mgr.ctx(c), (t, t), (100 * t, 100 * t))
        r.d.tick(r.clock.advance(5))
    assert r.prov.hooks("conn_update") == [] and r.prov.folds == []
    assert all(r.prov.holds(c) for c in conns)


def test_fast_path_counters_are_folded_on_demand_and_counted_once(rig):
    """Counters are folded by the conntrack listing and just before a DEL; each
    packet is counted once, and a rewrite (POLICY) loses nothing."""
    r = rig(xdp=True)
    conn, _ = establish(r)
    ctx = r.d.mgr.ctx(conn)
    base_p, base_b = list(conn.pkts), list(conn.bytes)
    r.prov.set_counters(ctx, (5, 3), (500, 300))
    r.d.tick(r.clock.advance(1))
    assert conn.pkts == base_p  # the tick folds nothing
    (row,) = r.d.handle("conntrack", {})["conns"]
    assert row["packets"] == [base_p[0] + 5, base_p[1] + 3]
    assert row["bytes"] == [base_b[0] + 500, base_b[1] + 300]
    r.d.handle("conntrack", {})
    assert conn.pkts == [base_p[0] + 5, base_p[1] + 3]  # listed twice, counted once
    r.prov.set_counters(ctx, (8, 3), (800, 300))
    r.d.mgr.update_forwarding(  # a neighbour MAC change: POLICY rewrite
        conn, False, dataclasses.replace(ctx.dirs[0], dst_mac=b"\x02" * 6), r.clock())
    assert r.d.mgr.stats["policies"] == 1
    assert conn.pkts == [base_p[0] + 8, base_p[1] + 3]  # folded before the rewrite
    r.prov.set_counters(ctx, (2, 1), (200, 100))  # counted since the rewrite
    r.d.tick(r.clock.advance(200))  # idle: expires; DEL folds what is left
    assert len(r.d.ct) == 0 and not r.prov.holds(conn)
    assert conn.pkts == [base_p[0] + 10, base_p[1] + 4]
    assert conn.bytes == [base_b[0] + 1000, base_b[1] + 400]


def test_tick_ends_offload_of_connections_xdp_flagged_fin_rst(rig):
    """A FIN/RST the XDP program flagged takes the connection back to the slow path."""
    r = rig(xdp=True)
    conn, _ = establish(r)
    r.prov.flagged.append(r.d.mgr.ctx(conn))
    r.d.tick(r.clock.advance(1))
    assert not r.prov.holds(conn) and not r.d.mgr.is_offloaded(conn)
    assert r.d.mgr.stats["withdrawn"] == {"xdp-fin-rst": 1}
    assert r.d.ct.get(0, conn.orig) is conn  # the slow path finishes the teardown


def test_tick_expires_idle_and_keeps_busy_connection(rig):
    """Fast-path traffic keeps a conn through many deadlines; the idle one expires on time."""
    r = rig(xdp=True)
    busy, _ = establish(r, 40001)
    idle, _ = establish(r, 40002)
    r.prov.touch(idle, r.clock.advance(10))  # t=1010: idle's last packet
    for _ in range(50):  # t=1020..1500
        r.prov.touch(busy, r.clock.advance(5))
        r.d.tick(r.clock.advance(5))
        assert r.d.ct.get(0, busy.orig) is busy
        assert (r.d.ct.get(0, idle.orig) is idle) == (r.clock() < 1110.0)
    assert r.prov.holds(busy) and not r.prov.holds(idle)


def test_tick_scans_teardown_flags_only_when_fin_rst_punts_moved(rig):
    """The flow-map flag scan runs on the first tick and then only after a FIN/RST punt."""
    r = rig(xdp=True)
    conn, _ = establish(r)
    r.d.tick(r.clock.advance(1))
    r.d.tick(r.clock.advance(1))
    assert r.prov.scans == 1
    r.prov.flagged.append(r.d.mgr.ctx(conn))
    r.prov.prog_stats["punt_fin_rst"] += 1
    r.d.tick(r.clock.advance(1))
    assert r.prov.scans == 2 and not r.d.mgr.is_offloaded(conn)
    assert r.d.mgr.stats["withdrawn"] == {"xdp-fin-rst": 1}


# -- reload: merged-flow validity --------------------------------------------------------


def test_reload_with_denying_policy_withdraws_deletes_and_stops_traffic(rig):
    """A denying reload withdraws and deletes the connection; its traffic stops."""
    r = rig()
    conn, flow = establish(r)
    assert r.prov.holds(conn)
    r.reconfigure({"policy": {"default": "deny"}})
    assert r.d.reload() == {"withdrawn": 1, "deleted": 1}
    assert not r.prov.holds(conn) and len(r.d.ct) == 0
    assert deliver(r, r.lan, flow.send("a", "A", 100)) == []


def test_reload_withdraws_only_what_the_new_policy_rejects(rig):
    """Connections the new policy still admits identically stay offloaded."""
    r = rig()
    web, _ = establish(r, 40000, 80)
    tls, _ = establish(r, 40001, 443)
    r.reconfigure({"policy": {"default": "allow",
                              "rules": [{"action": "deny", "proto": "tcp", "dport": 443}]}})
    assert r.d.reload() == {"withdrawn": 1, "deleted": 1}
    assert r.prov.holds(web) and not r.prov.holds(tls)
    assert r.d.ct.conns() == [web]


def test_reload_with_changed_nat_rule_withdraws_and_deletes(rig):
    """A changed NAT rule withdraws and deletes the connection; an identical reload does not."""
    r = rig(MASQ)
    conn, _ = establish(r)
    assert conn.reply.dst == a("192.0.2.1") and r.prov.holds(conn)
    r.reconfigure(MASQ)
    assert r.d.reload() == {"withdrawn": 0, "deleted": 0}
    assert r.prov.holds(conn)
    r.reconfigure({"nat": [{"type": "snat", "out_port": "wan0", "to": "192.0.2.50"}]})
    assert r.d.reload() == {"withdrawn": 1, "deleted": 1}
    assert not r.prov.holds(conn) and len(r.d.ct) == 0


def test_reload_with_narrower_offload_protocols_keeps_the_connection_in_the_slow_path(rig):
    """An eligibility change withdraws the offload but keeps the admitted connection."""
    r = rig()
    conn, _ = establish(r)
    r.reconfigure({"offload": {"providers": ["dummy"], "protocols": ["udp"]}})
    assert r.d.reload() == {"withdrawn": 0, "deleted": 0}
    assert not r.prov.holds(conn)
    assert r.d.ct.conns() == [conn]


def test_reload_errors_keep_the_old_config(rig):
    """A broken config file is a ControlError from the control socket; nothing changes."""
    r = rig()
    conn, _ = establish(r)
    old = r.d.policy
    Path(r.d.config_path).write_text("\n".join(_toml(BASE)) + "\n[policy]\ndefault = 'maybe'\n")
    with pytest.raises(ControlError, match="reload failed: policy.default"):
        r.d.handle("reload", {})
    assert r.d.policy is old and r.prov.holds(conn)
    r.d.config_path = None
    with pytest.raises(ControlError, match="no config file"):
        r.d.handle("reload", {})


# -- neighbour, route and link events ----------------------------------------------------


def test_neighbour_mac_change_rewrites_the_offloaded_entry(rig):
    """A next hop's new MAC reaches the provider as a POLICY rewrite of the entry."""
    r = rig()
    conn, _ = establish(r)
    new = mac("02:bb:00:00:00:77")
    r.neigh.set(WAN_IF, GW, new)
    ctx = r.d.mgr.ctx(conn)
    assert r.prov.hooks("conn_policy") == [ctx]
    held = r.prov.held[(0, conn.orig)]
    assert held.dirs[0].dst_mac == new and held.dirs[1].dst_mac == CLIENT_MAC
    assert r.prov.holds(conn)


def test_neighbour_gone_withdraws_and_return_reinstalls(rig):
    """A next hop going invalid withdraws the entry; resolving again reinstalls it."""
    r = rig()
    conn, _ = establish(r)
    r.neigh.set(WAN_IF, GW, None)
    assert not r.prov.holds(conn)
    assert r.d.mgr.reason(conn) == "neigh-unresolved"
    r.neigh.set(WAN_IF, GW, GW_MAC)
    assert r.prov.holds(conn)


def test_unresolved_next_hop_is_pending_until_the_neighbour_resolves(rig):
    """With the gateway unresolved frames wait and offload is pending until it resolves."""
    r = rig()
    del r.neigh.table[(WAN_IF, GW)]
    flow = TcpFlow(("10.0.1.5", 40000), ("203.0.113.7", 80), ("203.0.113.7", 80))
    assert deliver(r, r.lan, flow.send("a", "S")) == []
    assert len(deliver(r, r.wan, flow.send("b", "SA"))) == 1
    assert deliver(r, r.lan, flow.send("a", "A")) == []
    conn = r.d.ct.conns()[0]
    assert conn.state_name == "ESTABLISHED"
    assert r.d.mgr.reason(conn) == "neigh-unresolved" and not r.prov.holds(conn)
    assert (WAN_IF, 4, GW) in r.neigh.resolves
    r.neigh.set(WAN_IF, GW, GW_MAC)
    sent = r.wan.take()
    assert [Ether(f)[TCP].flags for f in sent] == ["S", "A"]
    assert all(mac(Ether(f).dst) == GW_MAC for f in sent)
    assert r.prov.holds(conn)


def test_route_change_withdraws_and_the_new_path_is_offloaded(rig):
    """A route change withdraws the connection; it is offloaded again via the new gateway."""
    r = rig()
    conn, flow = establish(r)
    new_gw_mac = mac("02:bb:00:00:00:53")
    r.neigh.table[(WAN_IF, a("192.0.2.253"))] = new_gw_mac
    r.router.replace("0.0.0.0/0", WAN_IF, via="192.0.2.253", src="192.0.2.1")
    assert not r.prov.holds(conn)
    assert r.d.mgr.stats["withdrawn"] == {"route-change": 1}
    out = deliver(r, r.lan, flow.send("a", "A", 10))
    assert mac(Ether(out[0]).dst) == new_gw_mac
    deliver(r, r.wan, flow.send("b", "A", 10))
    assert r.prov.held[(0, conn.orig)].dirs[0].dst_mac == new_gw_mac


def test_port_down_withdraws_its_connections(rig):
    """A port going down withdraws its connections; other links' events are ignored."""
    r = rig()
    conn, _ = establish(r)
    r.links.fire(link(9), link(9, up=False))
    assert r.prov.holds(conn)
    r.links.fire(link(), link(up=False))
    assert not r.prov.holds(conn)
    assert r.d.mgr.stats["withdrawn"] == {"port-down": 1}


def test_port_removed_or_mtu_changed_withdraws_and_updates_min_mtu(rig):
    """A port MTU change or removal withdraws its connections and updates min_mtu."""
    r = rig()
    conn, flow = establish(r)
    r.wan.mtu = 1400  # PortSet's own link watcher refreshes the port first
    r.links.fire(link(), link(mtu=1400))
    assert not r.prov.holds(conn)
    assert r.d.min_mtu == r.d.fwd.min_mtu == 1400
    deliver(r, r.lan, flow.send("a", "A", 10))
    deliver(r, r.wan, flow.send("b", "A", 10))
    assert r.prov.holds(conn)
    r.links.fire(link(mtu=1400), None)
    assert not r.prov.holds(conn)
    assert r.d.mgr.stats["withdrawn"] == {"port-changed": 1, "port-down": 1}


# -- control commands ----------------------------------------------------------------------


CONN_KEYS = {"zone", "proto", "state", "orig", "reply", "offloaded", "packets", "bytes",
             "expires_in", "mark"}
FLOW_KEYS = {"zone", "provider", "in_ifname", "in_ifindex", "match", "out", "out_ifname",
             "out_ifindex", "nat", "packets", "bytes", "last_used_ago"}
TUPLE_KEYS = {"family", "proto", "src", "dst", "sport", "dport"}


def test_conntrack_rows_follow_the_connrow_schema(rig):
    """conntrack returns JSON-able ConnRow dicts with the NATed reply, filtered by zone."""
    r = rig(MASQ)
    conn, _ = establish(r)
    res = json.loads(json.dumps(r.d.handle("conntrack", {})))
    (row,) = res["conns"]
    assert set(row) == CONN_KEYS
    assert row["orig"] == {"src": "10.0.1.5", "dst": "203.0.113.7", "sport": 40000, "dport": 80}
    assert row["reply"]["src"] == "203.0.113.7" and row["reply"]["dst"] == "192.0.2.1"
    assert row["reply"]["dport"] == conn.reply.dport
    assert (row["zone"], row["proto"], row["state"], row["offloaded"]) == (0, 6, "ESTABLISHED",
                                                                          True)
    assert row["packets"] == [2, 1] and row["expires_in"] == pytest.approx(100.0)
    assert r.d.handle("conntrack", {"zone": 0})["conns"] == res["conns"]
    assert r.d.handle("conntrack", {"zone": 7}) == {"conns": []}
    assert "ESTABLISHED" in cli.format_conntrack(res)


def test_flows_rows_follow_the_flowrow_schema(rig):
    """``flows`` lists each offloaded direction with ports, tuples, NAT and counters."""
    r = rig(MASQ, xdp=True)
    conn, _ = establish(r)
    r.prov.set_counters(r.d.mgr.ctx(conn), (7, 4), (700, 400))
    rows = json.loads(json.dumps(r.d.handle("flows", {})))["flows"]
    assert len(rows) == 2
    for row in rows:
        assert FLOW_KEYS <= set(row)
        assert set(row["match"]) == TUPLE_KEYS and set(row["out"]) == TUPLE_KEYS
    orig, reply = sorted(rows, key=lambda x: x["in_ifindex"])
    assert (orig["in_ifname"], orig["out_ifname"], orig["nat"], orig["packets"]) == (
        "lan0", "wan0", "snat", 7)
    assert orig["match"]["src"] == "10.0.1.5" and orig["out"]["src"] == "192.0.2.1"
    assert (reply["in_ifname"], reply["out_ifname"], reply["packets"]) == ("wan0", "lan0", 4)
    assert reply["out"]["dst"] == "10.0.1.5"
    assert "nat=snat" in cli.format_flows({"flows": rows})


def test_flush_and_offload_switch_commands(rig):
    """flush empties tracker and provider (by zone too); offload disable/enable toggles."""
    r = rig()
    conn, _ = establish(r)
    assert r.d.handle("offload", {"enabled": False}) == {"enabled": False, "offloaded": 0}
    assert not r.prov.holds(conn)
    assert r.d.handle("offload", {"enabled": True}) == {"enabled": True, "offloaded": 1}
    assert r.prov.holds(conn)
    assert r.d.handle("flush", {"zone": 3}) == {"flushed": 0}
    assert r.prov.holds(conn)
    assert r.d.handle("flush", {}) == {"flushed": 1}
    assert len(r.d.ct) == 0 and not r.prov.held


@pytest.mark.parametrize("cmd,args,msg", [
    ("bogus", {}, "unknown command"),
    ("conntrack", {"zone": "x"}, "zone: expected an integer"),
    ("conntrack", {"zone": 70000}, "zone: expected an integer"),
    ("conntrack", {"zne": 1}, "unknown argument"),
    ("flows", {"x": 1}, "unknown argument"),
    ("stats", {"json": True}, "unknown argument"),
    ("flush", {"zone": -1}, "zone: expected an integer"),
    ("offload", {}, "'enabled' must be true or false"),
    ("offload", {"enabled": "yes"}, "'enabled' must be true or false"),
    ("reload", {"now": True}, "unknown argument"),
])
def test_bad_control_requests_are_control_errors(rig, cmd, args, msg):
    """Malformed requests raise ControlError with a message naming the problem."""
    r = rig()
    with pytest.raises(ControlError, match=msg):
        r.d.handle(cmd, args)


# -- stats and the CLI's text formatter ---------------------------------------------------


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for ln in text.splitlines():
        if not ln.startswith(" "):
            cur = ln.split(":")[0]
            out[cur] = [ln]
        elif cur is not None:
            out[cur].append(ln)
    return out


def _offloaded_with_stats(rig) -> SimpleNamespace:
    r = rig(xdp=True)
    establish(r)
    r.prov.prog_stats.update(hit=7, miss=3, punt_fin_rst=2)
    r.d.tick(r.clock.advance(1))
    return r


def test_stats_sections_and_values(rig):
    """stats reports every section from the live slow path, XDP, manager and tracker."""
    r = _offloaded_with_stats(rig)
    s = json.loads(json.dumps(r.d.handle("stats", {})))
    assert list(s) == ["slow_path", "fast_path", "offload", "maps", "conntrack", "process"]
    assert s["slow_path"]["forwarded"] == 3 and s["slow_path"]["dropped"] == {}
    assert s["fast_path"]["hits"] == 7 and s["fast_path"]["punts"]["fin_rst"] == 2
    assert s["offload"]["offloaded"] == 1 and s["offload"]["enabled"] is True
    assert s["maps"]["flows_used"] == 2 and s["maps"]["conns_max"] == 1024
    assert s["maps"]["key_index_bytes"] == 4096
    assert s["conntrack"]["conns"] == 1
    assert s["process"]["rss_bytes"] > 0


def test_cli_text_formatter_renders_every_section_of_the_real_stats(rig):
    """format_stats prints content under every section of the daemon's real stats."""
    r = _offloaded_with_stats(rig)
    text = cli.format_stats(json.loads(json.dumps(r.d.handle("stats", {}))))
    secs = _sections(text)
    assert list(secs) == ["slow_path", "fast_path", "offload", "maps", "conntrack", "process"]
    for name, lines in secs.items():
        assert lines[0] == f"{name}:" and len(lines) > 1, (name, text)
    assert "  forwarded: 3" in secs["slow_path"]
    assert "  hits: 7" in secs["fast_path"] and "    fin_rst: 2" in secs["fast_path"]
    assert "  offloaded: 1" in secs["offload"] and "  enabled: yes" in secs["offload"]
    assert "  flows_used: 2" in secs["maps"] and "  conns: 1" in secs["conntrack"]
    assert any(ln.startswith("  rss_bytes: ") and "MiB" in ln for ln in secs["process"])


def test_ctxdp_stats_against_the_daemon_over_the_control_socket(rig, capsys):
    """`ctxdp stats` over a real control socket prints the formatter's sections and keys."""
    r = _offloaded_with_stats(rig)
    d = tempfile.mkdtemp(prefix="ctxdp-dmn-", dir="/tmp")
    srv = ControlServer(os.path.join(d, "c.sock"), r.d)
    try:
        srv.serve_in_thread()
        assert cli.main(["--socket", srv.path, "stats"]) == 0
        out, err = capsys.readouterr()
    finally:
        srv.close()
        shutil.rmtree(d, ignore_errors=True)
    assert err == ""
    want = cli.format_stats(json.loads(json.dumps(r.d.handle("stats", {}))))

    def keys(text: str) -> list[str]:
        return [ln.split(":")[0] for ln in text.splitlines()]

    assert keys(out) == keys(want)
    assert all(len(lines) > 1 for lines in _sections(out).values()), out


def test_reload_with_an_added_port_keeps_running_and_applies_the_policy(rig):
    """A reload adding a port (offload off) does not fail and still applies the policy."""
    r = rig()
    conn, _ = establish(r)
    r.reconfigure({"ports": [*BASE["ports"], {"name": "dmz0", "offload": False}],
                   "policy": {"default": "deny"}})
    assert r.d.handle("reload", {}) == {"withdrawn": 1, "deleted": 1}
    assert not r.prov.holds(conn)


def test_process_cpu_percent_measures_since_the_previous_stats_call(rig):
    """process.cpu_percent measures CPU used since the previous stats call (not always 0)."""
    import time

    r = rig()
    r.d.handle("stats", {})
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < 0.05:
        x += 1
    assert r.d.handle("stats", {})["process"]["cpu_percent"] > 0
