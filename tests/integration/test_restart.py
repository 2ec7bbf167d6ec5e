"""Restart with kept maps: a masqueraded TCP transfer survives SIGTERM + restart.

The last tests drive the daemon's handoff logic (save, restore, re-offer,
policy re-check) over the unit tests' kernel-free fakes; they need no root.

The daemon runs with ``offload.keep_on_restart`` and masquerade (the hard
case: replies are addressed to the router, so without the conntrack handoff
the new daemon could not tell them from the kernel's own traffic). The
lab (namespaces, pins, state file in its work directory, guard table in the
router namespace) is torn down on every exit path and checked for leftovers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ctxdp.config import parse_config
from ctxdp.daemon import Daemon, state_path
from ctxdp.datapath.guard import TABLE
from ctxdp.lab import scenarios
from tests.integration.conftest import LAB_TIMEOUTS
from tests.privileged import require_bcc
from tests.unit.fakes import FakeClock, FakeLinks, FakeXdp, TcpFlow, a, mac, topology

pytestmark = pytest.mark.privileged

TCP = 6
EST_TIMEOUT = 5.0  # short, so only aging read-back keeps the imported conn alive
RATE_MBPS = 8.0
NBYTES = 12_000_000  # ~12 s at RATE_MBPS


@pytest.fixture
def lab() -> Iterator[Any]:
    require_bcc()
    from ctxdp.lab.netns import NetnsLab

    lab = NetnsLab()
    try:
        with lab:
            yield lab
    finally:
        assert lab.leftovers() == [], f"lab {lab.uid} left behind: {lab.leftovers()}"


def _config(lab: Any, keep: bool) -> dict[str, Any]:
    return lab.config(
        offload={"keep_on_restart": keep},
        nat=[{"type": "masquerade", "out_port": lab.port("server")}],
        timeouts={**LAB_TIMEOUTS, "tcp_established": EST_TIMEOUT},
    )


def _xdp_ports(lab: Any) -> list[str]:
    """Router ports with an XDP program attached."""
    out = []
    for port in (lab.port("client"), lab.port("server")):
        if " xdp" in lab.router.exec(["ip", "-d", "link", "show", "dev", port]):
            out.append(port)
    return out


def _guard_present(lab: Any) -> bool:
    return f"inet {TABLE}" in lab.router.exec(["nft", "list", "tables"], check=False)


def test_transfer_survives_sigterm_and_restart_with_kept_maps(lab: Any) -> None:
    """A rate-limited masqueraded TCP transfer keeps going across SIGTERM + restart:
    integrity holds, the conn is offloaded again at once with zero slow-path packets,
    aging keeps it alive, and a final shutdown without keep leaves nothing behind."""
    doc = _config(lab, keep=True)
    lab.start_daemon(doc)
    state_file = state_path(parse_config(doc))
    port = scenarios.free_port()
    rx = lab.agent("server", ["tcp-recv", "--port", str(port), "--timeout", "60"])
    rx.wait("listening", 15)
    tx = lab.agent("client", ["tcp-send", "--dst", lab.addr("server"), "--port", str(port),
                              "--bytes", str(NBYTES), "--rate-mbps", str(RATE_MBPS), "--step",
                              "--timeout", "60"])
    local = tx.wait("connected", 15)["local"]

    def key(snap: Any) -> dict[str, Any] | None:
        return snap.find_conn(TCP, src=local[0], sport=int(local[1]), dport=port)

    scenarios.poll_until(lab, lambda s: (c := key(s)) and c["offloaded"], 5.0,
                         "offload after the handshake")
    tx.send("go")
    t_go = time.monotonic()
    time.sleep(3.0)
    snap, before = scenarios.poll_until(
        lab, lambda s: (c := key(s)) and c["offloaded"] and all(s.fast_pkts(c)) and c, 3.0,
        "fast path carrying the data before the restart")
    fast_before = snap.fast_pkts(before)

    # -- SIGTERM with keep: the fast path and the guard stay, the state is written.
    assert lab.stop_daemon() == 0, lab.daemon_log()
    t_down = time.monotonic()
    assert _xdp_ports(lab) == [lab.port("client"), lab.port("server")]
    assert os.path.isdir(lab.pin_dir) and os.path.isfile(state_file)
    assert _guard_present(lab), "the guard must outlive a keep shutdown"
    assert tx.poll_event("sent") is None, "the transfer must still be running at the restart"

    lab.start_daemon(doc)
    gap = time.monotonic() - t_down
    assert not os.path.exists(state_file), "the state file is consumed at start"
    snap, after = scenarios.poll_until(lab, lambda s: key(s), 3.0, "conn imported")
    # Offloaded straight from the handoff: the new daemon forwarded nothing itself.
    assert after["offloaded"], after
    assert snap.stats["slow_path"].get("forwarded", 0) == 0, snap.stats["slow_path"]
    assert after["state"] == "ESTABLISHED" and after["reply"]["dst"] == lab.router_addr("server")
    flows = snap.flows_of(after)
    assert all(f is not None and not f["orphan"] for f in flows), flows
    assert not any(f["orphan"] for f in snap.flows), "unclaimed orphans must be reaped"

    # The data keeps flowing through XDP; aging keeps the imported conn alive
    # although its established timeout is shorter than the rest of the transfer.
    last = snap
    while tx.poll_event("sent") is None:
        assert time.monotonic() - t_go < 40, "sender stalled after the restart"
        last = lab.snapshot()
        c = key(last)
        assert c is not None and c["offloaded"], f"lost after the restart: {c}"
        assert 0 < c["expires_in"] <= EST_TIMEOUT + lab.aging_interval, c
        time.sleep(0.5)
    c = key(last)
    assert sum(last.fast_pkts(c)) > 0
    assert last.stats["slow_path"].get("forwarded", 0) <= 2, last.stats["slow_path"]
    assert last.stats["offload"]["adds"] >= 1

    tx.send("close")
    sres, rres = tx.result(30), rx.result(30)
    assert (rres["bytes"], rres["sha256"]) == (NBYTES, sres["sha256"]), (sres, rres)
    assert rres["peer"][0] == lab.router_addr("server")
    # No stall: the paced send took about NBYTES / rate, restart gap included.
    assert sres["seconds"] < NBYTES * 8 / (RATE_MBPS * 1e6) + 3, (sres, gap)
    scenarios.poll_until(lab, lambda s: (c := key(s)) is not None and not c["offloaded"]
                         and c["state"] in ("FIN_WAIT", "CLOSING", "TIME_WAIT", "CLOSED"),
                         5.0, "FIN handled by the slow path of the new daemon")

    # -- Final shutdown without keep: nothing of the fast path remains.
    lab.reload(_config(lab, keep=False))
    assert lab.stop_daemon() == 0, lab.daemon_log()
    assert _xdp_ports(lab) == []
    assert not os.path.exists(lab.pin_dir)
    assert not _guard_present(lab)
    assert not os.path.exists(state_file)
    print(f"restart gap {gap:.2f}s; fast pkts before {fast_before}; transfer "
          f"{sres['seconds']}s at {sres['mbps']} Mbit/s")


def test_restart_after_a_crash_reaps_orphans_and_replaces_the_stale_guard(lab: Any) -> None:
    """After SIGKILL (no state written) the next start replaces the leftover guard table,
    reaps every orphaned map entry, and the flow is picked up again by the slow path."""
    doc = _config(lab, keep=True)
    lab.start_daemon(doc)
    port = scenarios.free_port()
    echo = lab.agent("server", ["udp-echo", "--port", str(port), "--idle-exit", "3",
                                "--timeout", "40"])
    echo.wait("listening", 10)
    req = lab.agent("client", ["udp-req", "--dst", lab.addr("server"), "--port", str(port),
                               "--count", "60", "--interval", "0.1", "--timeout", "40"])
    local = req.wait("replied", 10)["local"]

    def key(snap: Any) -> dict[str, Any] | None:
        return snap.find_conn(17, src=local[0], sport=int(local[1]), dport=port)

    scenarios.poll_until(lab, lambda s: (c := key(s)) and c["offloaded"], 5.0, "UDP offload")
    lab.signal_daemon("KILL")
    lab.stop_daemon()
    assert _xdp_ports(lab) and os.path.isdir(lab.pin_dir) and _guard_present(lab)
    assert not os.path.exists(state_path(parse_config(doc))), "a crash writes no state"
    lab.router.exec(["nft", "add", "chain", "inet", TABLE, "stale_marker"])

    lab.start_daemon(doc)
    tables = lab.router.exec(["nft", "list", "table", "inet", TABLE])
    assert "stale_marker" not in tables and "socket transparent" in tables
    assert "1 orphans reaped" in lab.daemon_log(), lab.daemon_log()
    snap, c = scenarios.poll_until(lab, lambda s: (c := key(s)) and c["offloaded"] and c, 5.0,
                                   "the flow picked up and offloaded again")
    assert not any(f["orphan"] for f in snap.flows), snap.flows
    res = req.result(40)
    assert res["replies"] >= res["sent"] - 2, res
    echo.kill()

    lab.reload(_config(lab, keep=False))
    assert lab.stop_daemon() == 0, lab.daemon_log()
    assert _xdp_ports(lab) == [] and not os.path.exists(lab.pin_dir)
    assert not _guard_present(lab)


# -- the handoff logic without a kernel (fake ports, routes, neighbours) --------------

_WAN_IF = 3
_GW = a("192.0.2.254")
_PORT_ADDR = {("wan0", 4): a("192.0.2.1")}


def _fake_daemon(tmp_path: Any, clock: FakeClock, **over: Any) -> tuple[Daemon, Any, Any]:
    doc = {
        "ports": [{"name": "lan0"}, {"name": "wan0"}],
        "control_socket": str(tmp_path / "ctl.sock"),
        "offload": {"providers": ["dummy"], "keep_on_restart": True},
        "nat": [{"type": "masquerade", "out_port": "wan0"}],
        "conntrack": {"timeouts": {"tcp_established": 100.0}},
        **over,
    }
    d = Daemon(parse_config(doc), None, clock=clock)
    ports, router, neigh = topology()
    prov = FakeXdp()
    d.assemble(ports, router, neigh, FakeLinks(), [prov], xdp=prov,
               port_addr=lambda n, f: _PORT_ADDR.get((n, f)))
    return d, prov, neigh


def _deliver(d: Daemon, port_name: str, frm: bytearray) -> list[bytes]:
    port = d.ports.by_name(port_name)
    port.rx.append(frm)
    d._rx(port)
    return [f for p in d.ports for f in p.take()]


def _masq_conn(d: Daemon) -> tuple[Any, TcpFlow]:
    flow = TcpFlow(("10.0.1.5", 40000), ("203.0.113.7", 80), ("203.0.113.7", 80),
                   ("192.0.2.1", 40000))
    for side, port, flags in (("a", "lan0", "S"), ("b", "wan0", "SA"), ("a", "lan0", "A")):
        assert _deliver(d, port, flow.send(side, flags)), f"{flags} not forwarded"
    (conn,) = d.ct.conns()
    assert d.mgr.is_offloaded(conn)
    return conn, flow


def test_restore_reoffers_with_todays_neighbours_and_keeps_nat_replies(tmp_path: Any) -> None:
    """A restored masqueraded conn is offloaded again (today's gateway MAC), and a reply
    to the router's address is forwarded as the same connection, never a new one."""
    clock = FakeClock(1000.0)
    old, _, _ = _fake_daemon(tmp_path, clock)
    conn, flow = _masq_conn(old)
    assert old.save_state(clock()) == 1
    old.close()

    clock.advance(2.0)
    new, prov, neigh = _fake_daemon(tmp_path, clock)
    neigh.table[(_WAN_IF, _GW)] = mac("02:00:00:00:99:99")  # gateway MAC changed meanwhile
    res = new.restore_state(clock())
    assert (res["imported"], res["reoffered"], res["not_admitted"]) == (1, 1, 0), res
    (c2,) = new.ct.conns()
    assert (c2.orig, c2.reply) == (conn.orig, conn.reply) and prov.holds(c2.ext["offload"])
    assert new.mgr.ctx(c2).dirs[0].dst_mac == mac("02:00:00:00:99:99")
    assert not os.path.exists(state_path(new.cfg)), "consumed"
    out = _deliver(new, "wan0", flow.send("b", "A", n=10))
    assert len(out) == 1 and new.ct.conns() == [c2] and new.fwd.stats["new_conns"] == 0
    new.close()


def test_restore_drops_connections_the_new_policy_denies(tmp_path: Any) -> None:
    """A conn the restarted daemon's policy would not admit is deleted, not re-offered."""
    clock = FakeClock(1000.0)
    old, _, _ = _fake_daemon(tmp_path, clock)
    _masq_conn(old)
    old.save_state(clock())
    old.close()
    new, prov, _ = _fake_daemon(tmp_path, clock, policy={"default": "deny"})
    res = new.restore_state(clock())
    assert (res["imported"], res["not_admitted"], res["reoffered"]) == (1, 1, 0), res
    assert len(new.ct) == 0 and not prov.held
    new.close()


def test_restore_ignores_a_state_file_from_another_boot(tmp_path: Any) -> None:
    """Monotonic times of another boot mean nothing: such a file is consumed but not imported."""
    clock = FakeClock(1000.0)
    old, _, _ = _fake_daemon(tmp_path, clock)
    _masq_conn(old)
    old.save_state(clock())
    old.close()
    path = state_path(old.cfg)
    doc = json.loads(open(path).read())
    doc["meta"]["boot_id"] = "another-boot"
    with open(path, "w") as f:
        json.dump(doc, f)
    new, _, _ = _fake_daemon(tmp_path, clock)
    assert new.restore_state(clock())["imported"] == 0 and len(new.ct) == 0
    assert not os.path.exists(path)
    new.close()
