"""Network-level scenarios: neighbours, MTU and PMTU, a full map, hostile traffic.

Contract (the same as ``ctxdp.lab.scenarios``, which has the helpers):
- A scenario takes a ``Lab`` whose daemon is running and keyword options,
  drives real sockets through the lab agent, changes the network only with
  commands any lab host has (``ip``, ``sysctl``), watches the daemon with
  ``lab.snapshot()``, and returns a dict of what it measured. A failed
  expectation raises ``AssertionError`` naming what was expected and seen,
  with the daemon's log tail. Whatever a scenario changes (a MAC, an MTU, a
  sysctl, the daemon's config) it restores on every exit path; the agents
  it starts are killed on every exit path.
- Only the ``Lab`` / ``Host`` API is used, so the same code runs on
  namespaces (``NetnsLab``) and on the VMs of issue 8. The hostile-traffic
  scenario runs a scapy script with the client host's ``python3`` (the
  agent's interpreter): a VM needs scapy installed (Debian:
  python3-scapy). Everything else is stdlib and iproute2.
- ``SCENARIOS`` maps a name to a scenario called as ``fn(lab, family=F)``;
  ``python3 -m ctxdp.lab.scenarios`` runs them along with its own.

Scenarios:
- ``neigh_mac_change``: the server's MAC changes during an offloaded
  transfer and the server announces it (gratuitous ARP / unsolicited NA);
  the offloaded flow is rewritten in place (POLICY) and keeps carrying it.
- ``neigh_removal``: deleting the router's neighbour entry of the server
  withdraws the connection's entries; they come back once it resolves.
- ``mtu_pmtu``: a smaller MTU on the server-facing port: oversized packets
  punt to the slow path, which sends ICMP fragmentation needed / packet too
  big; the client learns the path MTU and the transfer completes, offloaded.
- ``map_full``: a daemon with a tiny map: the connections that do not fit
  stay in the slow path and still carry their transfers intact.
- ``hostile_traffic``: malformed and spoofed frames from the client while
  an offloaded transfer runs: the daemon survives and counts them, TTL 1
  draws ICMP time exceeded, the transfer completes intact.
- ``spoofed_rst``: a blind RST, outside the window, on an offloaded
  connection leaves it ESTABLISHED (and offloaded again).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import select
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ctxdp.lab.hosts import AgentError, Host, Lab, Snapshot
from ctxdp.lab.scenarios import conn_label, free_port, poll_until, settle

__all__ = [
    "HOSTILE_KINDS",
    "SCENARIOS",
    "Transfer",
    "hostile_traffic",
    "map_full",
    "mtu_pmtu",
    "neigh_mac_change",
    "neigh_removal",
    "spoofed_rst",
]

TCP = 6
_POLL = 0.25


def _fail(lab: Lab, msg: str) -> AssertionError:
    return AssertionError(f"{msg}\n--- daemon log (tail) ---\n{lab.daemon_log(25)}")


# --------------------------------------------------------------------------
# Host facts through iproute2 / sysctl (work the same on namespaces and VMs)
# --------------------------------------------------------------------------


def _ip_json(host: Host, *args: str) -> list[dict[str, Any]]:
    out = host.exec(["ip", "-j", *args]).strip()
    return json.loads(out) if out else []


def _link(host: Host, ifname: str) -> dict[str, Any]:
    rows = _ip_json(host, "link", "show", "dev", ifname)
    if not rows:
        raise AssertionError(f"{host.name}: no interface {ifname}")
    return rows[0]


def _neigh(lab: Lab, role: str, family: int) -> dict[str, Any] | None:
    """The router's neighbour entry for ``role``'s address (None: no entry)."""
    rows = _ip_json(lab.router, f"-{family}", "neigh", "show", "to", lab.addr(role, family),
                    "dev", lab.port(role))
    return rows[0] if rows else None


def _neigh_mac(lab: Lab, role: str, family: int) -> str | None:
    """The MAC of a usable router neighbour entry for ``role`` (None: none)."""
    n = _neigh(lab, role, family)
    if n is None or not n.get("lladdr"):
        return None
    if set(n.get("state", [])) & {"FAILED", "INCOMPLETE"}:
        return None
    return str(n["lladdr"]).lower()


def _route_mtu(host: Host, family: int, dst: str) -> int | None:
    """The path MTU ``host`` holds for ``dst`` (a PMTU exception), if any."""
    for r in _ip_json(host, f"-{family}", "route", "get", dst):
        for m in r.get("metrics", []):
            if isinstance(m, dict) and "mtu" in m:
                return int(m["mtu"])
    return None


def _flush_route_cache(host: Host, family: int) -> None:
    """Forget learned path MTUs (so a rerun sees PMTU discovery happen again)."""
    host.exec(["ip", f"-{family}", "route", "flush", "cache"])


@contextmanager
def _sysctls(host: Host, values: Mapping[str, str]) -> Iterator[None]:
    """Set sysctls on ``host`` for the block, then put the old values back."""
    old: dict[str, str] = {}
    try:
        for k, v in values.items():
            old[k] = host.exec(["sysctl", "-n", k]).strip()
            host.exec(["sysctl", "-qw", f"{k}={v}"])
        yield
    finally:
        for k, v in old.items():
            host.exec(["sysctl", "-qw", f"{k}={v}"], check=False)


def _random_mac() -> str:
    """A locally administered unicast MAC, fresh per run."""
    return "02:c7:" + ":".join(f"{random.randint(0, 255):02x}" for _ in range(4))


def _stat(snap: Snapshot, *path: str) -> Any:
    cur: Any = snap.stats
    for p in path:
        cur = (cur or {}).get(p)
    return cur


def _count(snap: Snapshot, *path: str) -> int:
    v = _stat(snap, *path)
    if isinstance(v, dict):
        return int(sum(v.values()))
    return int(v or 0)


# --------------------------------------------------------------------------
# A TCP transfer driven phase by phase
# --------------------------------------------------------------------------


class Transfer:
    """One TCP transfer ``src`` -> ``dst`` through the router, step by step.

    ``start()``: receiver listening, sender connected and paused after the
    handshake. ``go()``: send the data (paced at ``rate_mbps``). ``finish()``:
    wait until every byte is sent, close, and return the two agents'
    results; ``problems()`` then says whether the receiver got exactly the
    bytes sent. ``kill()`` ends both agents (always call it, e.g. in
    ``finally``).
    """

    def __init__(self, lab: Lab, *, family: int = 4, nbytes: int = 4_000_000,
                 rate_mbps: float = 20.0, src: str = "client", dst: str = "server",
                 port: int | None = None, timeout: float = 60.0) -> None:
        self.lab = lab
        self.family = family
        self.nbytes = nbytes
        self.rate_mbps = rate_mbps
        self.src, self.dst = src, dst
        self.port = port or free_port()
        self.addr = lab.addr(dst, family)
        self.timeout = timeout
        self.rx: Any = None
        self.tx: Any = None
        self.local: list[Any] = []
        self.sres: dict[str, Any] | None = None
        self.rres: dict[str, Any] | None = None

    def start(self) -> Transfer:
        lab = self.lab
        self.rx = lab.agent(self.dst, ["tcp-recv", "--port", str(self.port), "--family",
                                       str(self.family), "--timeout", str(self.timeout)])
        self.rx.wait("listening", 15)
        self.tx = lab.agent(self.src, ["tcp-send", "--dst", self.addr, "--port", str(self.port),
                                       "--bytes", str(self.nbytes), "--rate-mbps",
                                       str(self.rate_mbps), "--step", "--timeout",
                                       str(self.timeout)])
        self.local = self.tx.wait("connected", 15)["local"]
        return self

    @property
    def sport(self) -> int:
        return int(self.local[1])

    def key(self, snap: Snapshot) -> dict[str, Any] | None:
        """This transfer's conntrack row in ``snap``."""
        return snap.find_conn(TCP, src=self.local[0], sport=self.sport, dport=self.port)

    def offloaded(self, snap: Snapshot) -> dict[str, Any] | None:
        c = self.key(snap)
        return c if c is not None and c.get("offloaded") else None

    def go(self) -> None:
        self.tx.send("go")

    def sending(self) -> bool:
        """True until the sender has written every byte."""
        return self.tx.poll_event("sent") is None

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.tx.wait("sent", self.timeout)
        self.tx.send("close")
        self.sres = self.tx.result(self.timeout)
        self.rres = self.rx.result(self.timeout)
        return self.sres, self.rres

    def problems(self) -> list[str]:
        s, r = self.sres or {}, self.rres or {}
        if (r.get("bytes"), r.get("sha256")) != (self.nbytes, s.get("sha256")):
            return [f"integrity of port {self.port}: sent {self.nbytes} bytes sha256 "
                    f"{str(s.get('sha256'))[:16]}, received {r.get('bytes')} sha256 "
                    f"{str(r.get('sha256'))[:16]}"]
        return []

    def kill(self) -> None:
        for ap in (self.tx, self.rx):
            if ap is not None:
                ap.kill()


def _offloaded_after_handshake(lab: Lab, t: Transfer, timeout: float = 5.0) -> dict[str, Any]:
    try:
        return poll_until(lab, t.offloaded, timeout, "offload after the TCP handshake")[1]
    except AssertionError as exc:
        last = lab.snapshot()
        off = last.stats.get("offload", {})
        raise AssertionError(f"{exc}\nconn={t.key(last)}\nnot_offloaded="
                             f"{off.get('not_offloaded')} failures={off.get('failures')}") from None


def _fast_carrying(lab: Lab, t: Transfer, pkts: int, timeout: float = 15.0) -> Snapshot:
    """Poll until the fast path forwarded ``pkts`` packets of ``t``'s original direction."""
    def cond(s: Snapshot) -> Any:
        c = t.offloaded(s)
        return c is not None and s.fast_pkts(c)[0] >= pkts
    return poll_until(lab, cond, timeout, f"fast path forwarding {pkts} packets of the transfer")[0]


# --------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------


def neigh_mac_change(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 6_000_000,
    rate_mbps: float = 20.0,
    src: str = "client",
    dst: str = "server",
    new_mac: str | None = None,
    change_at_pkts: int = 1000,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The server's MAC changes mid-transfer: the offloaded flow is rewritten and goes on.

    The server host announces its new MAC itself (``arp_notify`` /
    ``ndisc_notify``: the kernel sends a gratuitous ARP / an unsolicited
    neighbour advertisement when the address changes), as a real host does.
    Asserts: the router's neighbour entry takes the new MAC; the daemon
    sends the offloaded connection a POLICY rewrite (offload ``policies``
    counter) without withdrawing it, and it stays offloaded; the fast path
    keeps forwarding the transfer afterwards (frames still carrying the old
    MAC would be dropped by the server and stall it); the receiver gets
    exactly the bytes sent. The MAC changes once the fast path has
    forwarded ``change_at_pkts`` packets of the transfer. The old MAC is put
    back on every exit path.

    Also measured, not asserted: the flow entry's packet counter just before
    the change (``entry_pkts_before_change``) and right after the rewrite
    (``entry_pkts_after_rewrite``), and ``row_pkts`` (the conntrack row's
    packets, slow path plus folded fast-path counts) against
    ``min_segments``, the fewest segments the transfer can take.
    """
    link = lab.links[dst]
    host = lab.host(dst)
    ifname = link.host_if
    old_mac = str(_link(host, ifname)["address"]).lower()
    new_mac = (new_mac or _random_mac()).lower()
    announce = {f"net.ipv4.conf.{ifname}.arp_notify": "1",
                f"net.ipv6.conf.{ifname}.ndisc_notify": "1"}
    t0 = time.monotonic()
    t = Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, src=src, dst=dst,
                 timeout=timeout)
    changed = False
    try:
        with _sysctls(host, announce):
            t.start()
            _offloaded_after_handshake(lab, t)
            t.go()
            snap = _fast_carrying(lab, t, change_at_pkts)
            conn = t.key(snap)
            policies0 = _count(snap, "offload", "policies")
            withdrawn0 = _count(snap, "offload", "withdrawn")
            fast0 = snap.fast_pkts(conn)[0]

            host.exec(["ip", "link", "set", "dev", ifname, "address", new_mac])
            changed = True
            t_change = time.monotonic()
            while _neigh_mac(lab, dst, family) != new_mac:
                if time.monotonic() - t_change > 5:
                    raise _fail(lab, f"router's neighbour entry for {t.addr} is still "
                                     f"{_neigh(lab, dst, family)} 5 s after the server "
                                     f"announced {new_mac}")
                time.sleep(0.05)
            t_learned = time.monotonic()
            snap, conn = poll_until(
                lab, lambda s: (c := t.key(s)) is not None
                and _count(s, "offload", "policies") > policies0 and c, 5.0,
                "POLICY rewrite of the offloaded connection after the MAC change")
            t_rewritten = time.monotonic()
            fast1 = snap.fast_pkts(conn)[0]
            gaps = 0
            while t.sending():
                if time.monotonic() - t_change > timeout:
                    raise _fail(lab, f"sender not done {timeout}s after the MAC change")
                if t.offloaded(lab.snapshot(stats=False)) is None:
                    gaps += 1
                time.sleep(_POLL)
            snap, conn, _slow = settle(lab, t.key)
            fast_end = snap.fast_pkts(conn)
            row_pkts = int((conn.get("packets") or [0])[0])
            snap = lab.snapshot()
            withdrawn1 = _count(snap, "offload", "withdrawn")
            policies1 = _count(snap, "offload", "policies")
            t.finish()
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        t.kill()
        if changed:
            _restore_mac(lab, dst, family, ifname, old_mac)

    problems = t.problems()
    if gaps:
        problems.append(f"connection not offloaded in {gaps} polls after the MAC change")
    if withdrawn1 != withdrawn0:
        problems.append(f"the connection was withdrawn ({withdrawn0} -> {withdrawn1} "
                        "withdrawals) instead of rewritten in place")
    min_segs = math.ceil(nbytes / (1500 - (40 if family == 6 else 20) - 32))
    min_after = max(min_segs - change_at_pkts, 0) // 2
    if fast_end[0] - fast1 < min_after:
        problems.append(f"fast path forwarded {fast_end[0] - fast1} packets after the "
                        f"rewrite, expected >= {min_after}")
    if problems:
        raise _fail(lab, f"neigh_mac_change {conn_label(conn)}: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "old_mac": old_mac,
        "new_mac": new_mac,
        "learned_after_s": round(t_learned - t_change, 3),
        "rewritten_after_s": round(t_rewritten - t_change, 3),
        "policies": policies1 - policies0,
        "entry_pkts_before_change": fast0,
        "entry_pkts_after_rewrite": fast1,
        "fast_pkts_since_rewrite": fast_end[0] - fast1,
        "fast_pkts": fast_end,
        "row_pkts": row_pkts,
        "min_segments": min_segs,
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


def _restore_mac(lab: Lab, role: str, family: int, ifname: str, mac: str) -> None:
    """Put ``mac`` back on ``role``'s interface and make sure the router knows it.

    The announcement normally updates the router; if it did not, deleting
    the router's entry makes it resolve afresh on the next packet.
    """
    host = lab.host(role)
    host.exec(["ip", "link", "set", "dev", ifname, "address", mac], check=False)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if _neigh_mac(lab, role, family) in (mac, None):
            return
        time.sleep(0.05)
    lab.router.exec(["ip", f"-{family}", "neigh", "del", lab.addr(role, family), "dev",
                     lab.port(role)], check=False)


def neigh_removal(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 6_000_000,
    rate_mbps: float = 20.0,
    src: str = "client",
    dst: str = "server",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The router's neighbour entry of the server goes away: entries withdrawn, then back.

    Twice: (1) while the connection is idle after the handshake, so the
    withdrawn state can be watched: both flow entries leave the map, the
    connection is no longer offloaded, and for two aging intervals its
    entries stay out while the neighbour has no valid entry (pending, as
    mlx5 does); then the data starts, the slow path resolves
    the neighbour and the connection is offloaded again with fresh entries.
    (2) in the middle of the data, where withdrawal and re-offload follow
    each other within milliseconds: the offload ``withdrawn`` and ``adds``
    counters must both grow and the connection end up offloaded. The
    receiver must get exactly the bytes sent.
    """
    t0 = time.monotonic()
    t = Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, src=src, dst=dst,
                 timeout=timeout)
    del_argv = ["ip", f"-{family}", "neigh", "del", lab.addr(dst, family), "dev", lab.port(dst)]
    host_mac = str(_link(lab.host(dst), lab.links[dst].host_if)["address"]).lower()
    try:
        t.start()
        snap0 = lab.snapshot()
        _offloaded_after_handshake(lab, t)

        # 1. Idle: watch the entries go, and stay gone.
        lab.router.exec(del_argv)
        t_del = time.monotonic()
        snap, conn = poll_until(
            lab, lambda s: (c := t.key(s)) is not None and not c.get("offloaded")
            and not any(s.flows_of(c)) and c, 5.0,
            "flow entries withdrawn after the neighbour entry was deleted")
        idle_withdrawn_after = round(time.monotonic() - t_del, 3)
        withdrawn_idle = {k: v - _stat(snap0, "offload", "withdrawn").get(k, 0)
                          for k, v in (_stat(snap, "offload", "withdrawn") or {}).items()
                          if v != _stat(snap0, "offload", "withdrawn").get(k, 0)}
        # Two aging intervals (whose ticks retry pending offloads) with no
        # packet: the entries must not come back unless the neighbour did.
        idle_bad: list[str] = []
        idle_end = time.monotonic() + 2 * lab.aging_interval
        while time.monotonic() < idle_end:
            s = lab.snapshot(stats=False)
            c = t.key(s)
            if c is None:
                idle_bad.append("the connection left conntrack")
            elif (c.get("offloaded") or any(s.flows_of(c))) and _neigh_mac(
                    lab, dst, family) is None:
                idle_bad.append(f"offloaded={c.get('offloaded')} flows={s.flows_of(c)}")
            time.sleep(_POLL)

        # Data: the slow path needs the neighbour, resolves it, offload returns.
        t.go()
        t_go = time.monotonic()
        snap = _fast_carrying(lab, t, 100, timeout=10)
        back_after = round(time.monotonic() - t_go, 3)
        mac_back = _neigh_mac(lab, dst, family)

        # 2. During the data.
        adds0 = _count(snap, "offload", "adds")
        wd0 = _count(snap, "offload", "withdrawn")
        lab.router.exec(del_argv)
        t_del2 = time.monotonic()
        snap, conn = poll_until(
            lab, lambda s: _count(s, "offload", "withdrawn") > wd0
            and _count(s, "offload", "adds") > adds0 and t.offloaded(s), 10.0,
            "withdrawal and re-offload after the neighbour was deleted mid-transfer")
        again_after = round(time.monotonic() - t_del2, 3)
        fast_new0 = snap.fast_pkts(conn)[0]
        while t.sending():
            if time.monotonic() - t_del2 > timeout:
                raise _fail(lab, f"sender not done {timeout}s after the second deletion")
            time.sleep(_POLL)
        snap, conn, _slow = settle(lab, t.key)
        fast_end = snap.fast_pkts(conn)
        offloaded_end = bool(conn.get("offloaded"))
        t.finish()
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        t.kill()

    problems = t.problems()
    if idle_bad:
        problems.append(f"while idle with no valid neighbour entry: {idle_bad[:3]}")
    if mac_back != host_mac:
        problems.append(f"router resolved {t.addr} to {mac_back}, the host has {host_mac}")
    if not offloaded_end:
        problems.append("connection not offloaded at the end of the data")
    if fast_end[0] <= fast_new0:
        problems.append(f"re-installed entries forwarded nothing ({fast_new0} -> {fast_end[0]})")
    if problems:
        raise _fail(lab, f"neigh_removal {conn_label(conn)}: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "idle_withdrawn_after_s": idle_withdrawn_after,
        "withdrawn_reasons": withdrawn_idle,
        "reoffloaded_after_data_s": back_after,
        "mid_transfer_reoffloaded_after_s": again_after,
        "fast_pkts_final_entries": fast_end,
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


# --------------------------------------------------------------------------
# MTU and path MTU discovery
# --------------------------------------------------------------------------


def mtu_pmtu(
    lab: Lab,
    *,
    family: int = 4,
    mtu: int = 1280,
    nbytes: int = 4_000_000,
    rate_mbps: float = 40.0,
    src: str = "client",
    dst: str = "server",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A smaller MTU on the server-facing port: punts, ICMP, PMTU discovery, completion.

    The router's port toward ``dst`` gets ``mtu`` while ``dst`` keeps its
    larger one, so the server still advertises a full-size MSS and the
    client's first full segments do not fit: PMTU discovery is the only way
    the transfer can complete (IPv4: Linux sets DF on TCP). Asserts: the
    connection is offloaded after the handshake; oversized segments punt to
    the slow path (XDP ``mtu`` punt counter), which answers with ICMP
    fragmentation needed / packet too big (``icmp_too-big``); the client
    caches a path MTU of ``mtu`` for the server; the slow path handled no
    more of the connection's packets than those punts (exact counts,
    ``settle``); the fast path carried the data in packets no larger than
    ``mtu``; the receiver got exactly the bytes sent. The port's MTU and the
    client's route cache are restored on every exit path.
    """
    port = lab.port(dst)
    old_mtu = int(_link(lab.router, port)["mtu"])
    client = lab.host(src)
    t0 = time.monotonic()
    t = Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, src=src, dst=dst,
                 timeout=timeout)
    try:
        _flush_route_cache(client, family)
        pmtu_before = _route_mtu(client, family, t.addr)
        lab.router.exec(["ip", "link", "set", "dev", port, "mtu", str(mtu)])
        try:
            t.start()
            _offloaded_after_handshake(lab, t)
            snap, conn, slow_hs = settle(lab, t.key)
            punts0 = _count(snap := lab.snapshot(), "fast_path", "punts", "mtu")
            icmp0 = _count(snap, "slow_path", "icmp_too-big")
            t.go()
            gaps = 0
            while t.sending():
                if time.monotonic() - t0 > timeout:
                    raise _fail(lab, f"sender not done after {timeout}s")
                snap = lab.snapshot()
                if t.offloaded(snap) is None:
                    gaps += 1
                time.sleep(_POLL)
            snap, conn, slow_end = settle(lab, t.key)
            fast_pkts, fast_bytes = snap.fast_pkts(conn), snap.fast_bytes(conn)
            snap = lab.snapshot()
            punts = _count(snap, "fast_path", "punts", "mtu") - punts0
            icmp = _count(snap, "slow_path", "icmp_too-big") - icmp0
            pmtu = _route_mtu(client, family, t.addr)
            t.finish()
        except AgentError as exc:
            raise _fail(lab, f"traffic agent failed: {exc}") from exc
        finally:
            t.kill()
            lab.router.exec(["ip", "link", "set", "dev", port, "mtu", str(old_mtu)], check=False)
    finally:
        _flush_route_cache(client, family)

    problems = t.problems()
    if pmtu_before is not None:
        problems.append(f"the client already had a path MTU {pmtu_before} before the run")
    if punts < 1:
        problems.append("no packet punted to the slow path for exceeding the egress MTU")
    if icmp < 1:
        problems.append("the slow path sent no ICMP fragmentation needed / packet too big")
    if pmtu != mtu:
        problems.append(f"client's path MTU to {t.addr} is {pmtu}, expected {mtu}")
    if slow_end - slow_hs > punts + 2:
        problems.append(f"slow path handled {slow_end - slow_hs} packets of the connection "
                        f"during the data, more than the {punts} MTU punts (+2)")
    if gaps:
        problems.append(f"connection not offloaded in {gaps} polls during the data")
    if fast_bytes[0] < 0.95 * nbytes:
        problems.append(f"fast path carried {fast_bytes[0]} of {nbytes} bytes")
    # Frames the fast path forwarded are at most the MTU plus 14 Ethernet bytes.
    avg = fast_bytes[0] / fast_pkts[0] if fast_pkts[0] else 0
    if avg > mtu + 14:
        problems.append(f"fast path frames average {avg:.0f} bytes, above MTU {mtu} + 14")
    if problems:
        raise _fail(lab, f"mtu_pmtu {conn_label(conn)}: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "mtu": mtu,
        "mtu_punts": punts,
        "icmp_too_big": icmp,
        "client_pmtu": pmtu,
        "slow_pkts_during_data": slow_end - slow_hs,
        "fast_pkts": fast_pkts,
        "fast_bytes": fast_bytes,
        "fast_frame_avg": round(avg, 1),
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


# --------------------------------------------------------------------------
# A full map
# --------------------------------------------------------------------------


@contextmanager
def _daemon_config(lab: Lab, doc: Mapping[str, Any]) -> Iterator[None]:
    """Restart the daemon with ``doc`` for the block, then with the config it had."""
    saved = copy.deepcopy(lab.doc) if lab.doc is not None else lab.config()
    lab.stop_daemon()
    try:
        lab.start_daemon(doc)
        yield
    finally:
        lab.stop_daemon()
        lab.start_daemon(saved)


def _settle_many(lab: Lab, ts: list[Transfer], timeout: float = 15.0
                 ) -> tuple[Snapshot, list[dict[str, Any]], list[int]]:
    """``settle`` for several transfers at once: rows, and slow-path packets of each."""
    need = lab.aging_interval + 0.3
    deadline = time.monotonic() + timeout
    last: tuple | None = None
    since = 0.0
    while True:
        snap = lab.snapshot()
        conns = [t.key(snap) for t in ts]
        sig = None if None in conns else tuple(
            (Snapshot.conn_pkts(c), tuple(snap.fast_pkts(c))) for c in conns)
        if sig is not None and sig == last:
            if snap.t - since >= need:
                return snap, conns, [p - sum(f) for p, f in sig]  # type: ignore[misc]
        else:
            last, since = sig, snap.t
        if time.monotonic() > deadline:
            raise _fail(lab, f"counters did not settle within {timeout}s (last {sig})")
        time.sleep(_POLL)


def map_full(
    lab: Lab,
    *,
    family: int = 4,
    conns: int = 4,
    map_size: int = 2,
    max_offloaded: int | None = None,
    nbytes: int = 1_500_000,
    rate_mbps: float = 30.0,
    src: str = "client",
    dst: str = "server",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """More connections than the map holds: the excess stay in the slow path and work.

    Restarts the daemon with ``offload.map_size = map_size`` (and
    ``max_offloaded`` if given) and restores its config afterwards. With
    the default cap (``max_offloaded`` = ``map_size``) the offload manager
    refuses the excess (``not_offloaded["cap"]``); with a larger cap the
    XDP provider does (``failures["ENOSPC"]``). Asserts: exactly
    ``map_size`` of the ``conns`` connections are offloaded (the map is
    full: ``maps.conns_used``) and the refusal is counted for the others;
    during the data the offloaded set never changes; every transfer arrives
    intact; the slow path carried the whole of each refused connection
    (no flow entries, slow-path packets >= its segments) and almost none of
    an offloaded one.
    """
    doc = copy.deepcopy(lab.doc) if lab.doc is not None else lab.config()
    off = dict(doc.get("offload") or {})
    off["map_size"] = map_size
    if max_offloaded is not None:
        off["max_offloaded"] = max_offloaded
    doc["offload"] = off
    refusal = ("failures", "ENOSPC") if (max_offloaded or map_size) > map_size else (
        "not_offloaded", "cap")
    excess = conns - map_size
    t0 = time.monotonic()
    ts: list[Transfer] = []
    with _daemon_config(lab, doc):
        try:
            for _ in range(conns):
                ts.append(Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps,
                                   src=src, dst=dst, timeout=timeout).start())

            def judged(s: Snapshot) -> Any:
                rows = [t.key(s) for t in ts]
                if any(c is None or c.get("state") != "ESTABLISHED" for c in rows):
                    return None
                n_off = sum(bool(c.get("offloaded")) for c in rows)  # type: ignore[union-attr]
                refused = int((_stat(s, "offload", refusal[0]) or {}).get(refusal[1], 0))
                return n_off == map_size and refused >= excess and rows

            try:
                snap, rows = poll_until(lab, judged, 10.0,
                                        f"{map_size} offloaded and {excess} refused ({refusal})")
            except AssertionError as exc:
                s = lab.snapshot()
                raise AssertionError(f"{exc}\nconns={[t.key(s) for t in ts]}\n"
                                     f"offload={s.stats.get('offload')}") from None
            offloaded = {i for i, c in enumerate(rows) if c.get("offloaded")}
            maps = dict(snap.stats.get("maps") or {})
            for t in ts:
                t.go()
            changes = 0
            while any(t.sending() for t in ts):
                if time.monotonic() - t0 > timeout:
                    raise _fail(lab, f"senders not done after {timeout}s")
                s = lab.snapshot(stats=False)
                now_off = {i for i, t in enumerate(ts) if t.offloaded(s) is not None}
                changes += now_off != offloaded
                time.sleep(_POLL)
            snap, rows, slow = _settle_many(lab, ts)
            fast = [snap.fast_pkts(c) for c in rows]
            flows = [sum(f is not None for f in snap.flows_of(c)) for c in rows]
            stats_off = dict(snap.stats.get("offload") or {})
            for t in ts:
                t.finish()
        except AgentError as exc:
            raise _fail(lab, f"traffic agent failed: {exc}") from exc
        finally:
            for t in ts:
                t.kill()

    problems = [p for t in ts for p in t.problems()]
    segs = math.ceil(nbytes / 1460)
    if maps.get("conns_used") != map_size or maps.get("conns_max") != map_size:
        problems.append(f"map not full: {maps}")
    if changes:
        problems.append(f"the offloaded set changed in {changes} polls during the data")
    for i in range(conns):
        label = conn_label(rows[i])
        if i in offloaded:
            if fast[i][0] < 0.95 * segs or slow[i] > 10:
                problems.append(f"offloaded {label}: fast {fast[i]}, slow {slow[i]} packets")
        elif flows[i] or sum(fast[i]) or slow[i] < segs:
            problems.append(f"refused {label}: {flows[i]} flow entries, fast {fast[i]}, "
                            f"slow {slow[i]} packets (needs >= {segs})")
    if problems:
        raise _fail(lab, "map_full: " + "; ".join(problems))
    return {
        "conns": conns,
        "map_size": map_size,
        "refusal": f"{refusal[0]}[{refusal[1]}]",
        "refusals_counted": (stats_off.get(refusal[0]) or {}).get(refusal[1]),
        "offloaded": sorted(offloaded),
        "maps": maps,
        "slow_pkts": slow,
        "fast_pkts": fast,
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


# --------------------------------------------------------------------------
# Hostile traffic
# --------------------------------------------------------------------------

#: Run on the client host by its python3 with scapy; argv[1] is a JSON object
#: (iface, smac, dmac, seed, kinds, the good connection's tuple, addresses).
#: JSON-lines events: ``ready`` (scapy loaded), ``sent`` (every frame is
#: out: count per kind, the sequence numbers seen), ``result`` (adds which
#: families got ICMP time exceeded back for their TTL-1 packets).
_HOSTILE_SCRIPT = r'''
import json, random, sys, time
def emit(event, **kw):
    print(json.dumps({"event": event, **kw}), flush=True)
p = json.loads(sys.argv[1])
import logging
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import (Ether, IP, IPv6, TCP, UDP, ICMP, Raw, IPOption, IPv6ExtHdrFragment,
                       IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting,
                       ICMPv6TimeExceeded, AsyncSniffer, sendp, sniff, conf)
conf.verb = 0
rng = random.Random(p["seed"])
iface, eth = p["iface"], Ether(src=p["smac"], dst=p["dmac"])
g, gf = p["good"], p["good"]["family"]
src = {4: p["src4"], 6: p["src6"]}
dst = {4: p["dst4"], 6: p["dst6"]}
def icmp_te(x):
    if IP in x and ICMP in x and x[ICMP].type == 11:
        return 4
    if IPv6 in x and ICMPv6TimeExceeded in x:
        return 6
    return 0
sniffer = AsyncSniffer(iface=iface, lfilter=lambda x: icmp_te(x) != 0, store=True)
sniffer.start()
emit("ready")

# The good connection's sequence numbers, from one of its own data segments.
seg = sniff(iface=iface, count=1, timeout=10, lfilter=lambda x: TCP in x
            and x[TCP].sport == g["sport"] and x[TCP].dport == g["dport"])
if not seg:
    emit("error", error="no segment of the good connection seen")
    sys.exit(1)
seq, ack = seg[0][TCP].seq, seg[0][TCP].ack
bad_seq = (seq + 0x80000000) & 0xffffffff   # half the sequence space away: outside any window
def ipx(f, **kw):
    return IP(src=src[4], dst=dst[4], **kw) if f == 4 else IPv6(src=src[6], dst=dst[6], **kw)
def good(flags="A"):
    return TCP(sport=g["sport"], dport=g["dport"], flags=flags, seq=bad_seq, ack=ack)
def other():
    return TCP(sport=40000, dport=40001, flags="A")
def udp():
    return UDP(sport=rng.randint(1024, 65535), dport=rng.randint(1024, 65535))
kinds = {}
def add(kind, frames):
    kinds.setdefault(kind, []).extend(f if isinstance(f, bytes) else bytes(f) for f in frames)

for f in (4, 6):
    for l4 in (good() if f == gf else other(), udp()):
        full = bytes(eth / ipx(f) / l4 / Raw(b"x" * 8))
        # Every cut of the frame, the IP header still claiming the whole datagram.
        add("truncated", [full[:n] for n in range(14, len(full))])
        # Every cut of the L4 header inside a consistent IP datagram.
        l4b, nh = bytes(l4), (6 if TCP in l4 else 17)
        ip = IP(src=src[4], dst=dst[4], proto=nh) if f == 4 else IPv6(src=src[6], dst=dst[6], nh=nh)
        add("truncated", [eth / ip / Raw(l4b[:n]) for n in range(0, 20 if nh == 6 else 8)])
# Header length, total length and version lies.
base4 = bytes(eth / ipx(4) / other())
for ihl in (0, 1, 2, 3, 4, 6, 10, 15):
    add("bad_ihl", [base4[:14] + bytes([0x40 | ihl]) + base4[15:]])
for tot in (0, 1, 19, 20, 30, len(base4) - 14 + 1, 1500, 65535):
    add("bad_len", [base4[:16] + tot.to_bytes(2, "big") + base4[18:]])
base6 = bytes(eth / ipx(6) / other())
for plen in (0, 1, 19, len(base6) - 54 + 1, 65535):
    add("bad_len", [base6[:18] + plen.to_bytes(2, "big") + base6[20:]])
add("bad_version", [base4[:14] + bytes([v << 4 | 5]) + base4[15:] for v in (0, 5, 6, 15)])
# Fragments of both families: first (with an L4 header), middle, last; never completing.
for f in (4, 6):
    l4 = good() if f == gf else udp()
    nh = 6 if TCP in l4 else 17
    for off, more in ((0, True), (64, True), (128, False)):
        ident = rng.randint(1, 0xffff)
        body = l4 / Raw(b"f" * 16) if off == 0 else Raw(bytes(rng.getrandbits(8) for _ in range(24)))
        if f == 4:
            add("fragment", [eth / IP(src=src[4], dst=dst[4], id=ident, proto=nh,
                                      flags="MF" if more else 0, frag=off // 8) / body])
        else:
            add("fragment", [eth / ipx(6) / IPv6ExtHdrFragment(id=ident, offset=off // 8,
                                                               m=int(more), nh=nh) / body])
# IPv4 options and IPv6 extension headers (the good tuple in its own family).
l4_4 = good() if gf == 4 else other()
l4_6 = good() if gf == 6 else other()
opt4 = bytes(eth / IP(src=src[4], dst=dst[4], options=[IPOption(b"\x01\x01\x01\x00")]) / l4_4)
add("ipv4_options", [opt4,   # NOPs; then record route; then an option longer than the header
                     eth / IP(src=src[4], dst=dst[4], options=[IPOption(b"\x07\x27\x04" + bytes(36))]) / l4_4,
                     opt4[:34] + b"\x07\x40\x04\x00" + opt4[38:]])
add("ipv6_ext", [eth / ipx(6) / IPv6ExtHdrHopByHop() / l4_6,
                 eth / ipx(6) / IPv6ExtHdrDestOpt() / l4_6,
                 eth / ipx(6) / IPv6ExtHdrRouting() / l4_6,
                 eth / ipx(6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                 / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / l4_6])
add("ipv6_ext", [bytes(eth / ipx(6) / IPv6ExtHdrDestOpt() / l4_6)[:14 + 40 + 4]])
# Random garbage: IPv4, IPv6 and other ethertypes with random bodies.
hdr = bytes.fromhex(p["dmac"].replace(":", "")) + bytes.fromhex(p["smac"].replace(":", ""))
for _ in range(64):
    et = rng.choice([0x0800, 0x86dd, rng.randint(0x0600, 0xffff)])
    body = bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if body and et in (0x0800, 0x86dd):
        body[0] = 0x45 if et == 0x0800 else 0x60
    add("garbage", [hdr + et.to_bytes(2, "big") + bytes(body)])
# TTL / hop limit 1: the good tuple (the fast path punts it) and a UDP datagram per family.
add("ttl1", [eth / ipx(gf, **({"ttl": 1} if gf == 4 else {"hlim": 1})) / good(),
             eth / ipx(4, ttl=1) / udp() / Raw(b"t"), eth / ipx(6, hlim=1) / udp() / Raw(b"t")])
# Last (they end the offload): RST and FIN spoofed on the good tuple, outside any window.
add("rst", [eth / ipx(gf) / good("R"), eth / ipx(gf) / good("RA")])
add("fin", [eth / ipx(gf) / good("FA")])
order = [k for k in ("truncated", "bad_ihl", "bad_len", "bad_version", "fragment",
                     "ipv4_options", "ipv6_ext", "garbage", "ttl1", "rst", "fin")
         if not p["kinds"] or k in p["kinds"]]
for k in order:
    sendp(kinds[k], iface=iface)
emit("sent", sent={k: len(kinds[k]) for k in order}, seq=seq, bad_seq=bad_seq)
want = {4, 6} if "ttl1" in order else set()
deadline = time.monotonic() + 3
while time.monotonic() < deadline and not want <= {icmp_te(x) for x in sniffer.results or []}:
    time.sleep(0.1)
got = sniffer.stop() or []
emit("result", time_exceeded=sorted({icmp_te(x) for x in got}))
'''

#: Every kind of frame the script can send, in order.
HOSTILE_KINDS = ("truncated", "bad_ihl", "bad_len", "bad_version", "fragment", "ipv4_options",
                 "ipv6_ext", "garbage", "ttl1", "rst", "fin")
#: Fast-path punt counters the full hostile mix must make grow.
_PUNTS = ("unknown", "frag", "ipopt", "v6ext", "ttl", "fin_rst")


class _Script:
    """A python script on a host, read as JSON-lines events (like the agent)."""

    def __init__(self, host: Host, code: str, arg: str) -> None:
        self.host = host
        self.proc = host.popen([host.agent[0], "-c", code, arg], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    def wait(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while True:
            for ev in self.events:
                if ev.get("event") == "error":
                    raise AgentError(f"{self.host.name}: script: {ev.get('error')}")
                if ev.get("event") == name:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{self.host.name}: script: no {name!r} within {timeout}s")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not r:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.proc.wait(5)
                err = (self.proc.stderr.read() or b"").decode(errors="replace")  # type: ignore[union-attr]
                raise AgentError(f"{self.host.name}: script ended (rc {self.proc.returncode}) "
                                 f"without {name!r}: {err.strip()[-800:]}")
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            pass


def _hostile_run(lab: Lab, t: Transfer, src: str, dst: str, kinds: tuple[str, ...],
                 seed: int) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Start the script, start the data, let it fire; (sent event, result event, overlapped).

    ``overlapped``: the good transfer was still sending when the last frame went out.
    """
    link = lab.links[src]
    client = lab.host(src)
    params = {
        "iface": link.host_if, "smac": str(_link(client, link.host_if)["address"]),
        "dmac": link.port_mac, "seed": seed, "kinds": list(kinds),
        "src4": lab.addr(src, 4), "src6": lab.addr(src, 6),
        "dst4": lab.addr(dst, 4), "dst6": lab.addr(dst, 6),
        "good": {"family": t.family, "sport": t.sport, "dport": t.port},
    }
    script = _Script(client, _HOSTILE_SCRIPT, json.dumps(params))
    try:
        script.wait("ready", 30)
        t.go()
        sent = script.wait("sent", 30)
        overlapped = t.sending()
        res = script.wait("result", 10)
    finally:
        script.kill()
    return sent, res, overlapped


def hostile_traffic(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 8_000_000,
    rate_mbps: float = 12.0,
    src: str = "client",
    dst: str = "server",
    seed: int | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Malformed and spoofed frames from the client during an offloaded transfer.

    The client sends (scapy, raw frames to the router's port): every cut of
    TCP and UDP frames of both families (the good connection's tuple among
    them), every cut of the L4 header inside a consistent IP datagram, bad
    IHL, bad total / payload lengths, bad IP versions, first / middle / last
    fragments of both families, IPv4 options, IPv6 extension headers,
    random garbage, TTL / hop limit 1, and last RST and FIN spoofed on the
    good connection with a sequence number half the sequence space away
    (outside any window). Asserts: the frames went out while the good
    transfer was running; the daemon is alive and answers; the slow path
    dropped malformed frames; every fast-path punt counter for these kinds
    grew; the client got ICMP time exceeded back for its TTL-1 packets (both
    families); the good transfer arrived intact. Reported, not asserted:
    the good connection's conntrack state afterwards (see ``spoofed_rst``).
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    t0 = time.monotonic()
    t = Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, src=src, dst=dst,
                 timeout=timeout)
    try:
        t.start()
        _offloaded_after_handshake(lab, t)
        snap0 = lab.snapshot()
        sent, res, overlapped = _hostile_run(lab, t, src, dst, HOSTILE_KINDS, seed)
        alive_after_burst = lab.daemon_alive()
        snap1 = lab.snapshot()
        while t.sending():
            if time.monotonic() - t0 > timeout:
                raise _fail(lab, f"good transfer not sent after {timeout}s")
            time.sleep(_POLL)
        t.finish()
        snap = lab.snapshot()
    except AgentError as exc:
        raise _fail(lab, f"traffic agent or hostile script failed: {exc}") from exc
    finally:
        t.kill()

    def delta(*path: str) -> int:
        return _count(snap, *path) - _count(snap0, *path)

    punts = {k: delta("fast_path", "punts", k) for k in _PUNTS}
    drop0 = _stat(snap0, "slow_path", "dropped") or {}
    dropped = {k: v - int(drop0.get(k, 0))
               for k, v in (_stat(snap, "slow_path", "dropped") or {}).items()
               if v != int(drop0.get(k, 0))}
    conn = t.key(snap1)
    problems = t.problems()
    if not overlapped:
        problems.append("the good transfer had finished before the last hostile frame went out")
    if not alive_after_burst or not lab.daemon_alive():
        problems.append("the daemon died")
    if dropped.get("malformed", 0) < 1:
        problems.append(f"slow path dropped no malformed frame (dropped: {dropped})")
    missing = [k for k, v in punts.items() if v < 1]
    if missing:
        problems.append(f"fast-path punt counters did not grow: {missing} (punts: {punts})")
    if res.get("time_exceeded") != [4, 6]:
        problems.append(f"ICMP time exceeded came back for families {res.get('time_exceeded')},"
                        " expected [4, 6]")
    if problems:
        raise _fail(lab, f"hostile_traffic (seed {seed}): " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "seed": seed,
        "sent": sent["sent"],
        "frames": sum(sent["sent"].values()),
        "overlapped_transfer": overlapped,
        "punts": punts,
        "slow_dropped": dropped,
        "ct_invalid": delta("conntrack", "invalid"),
        "time_exceeded": res.get("time_exceeded"),
        "conn_state_after": (conn or {}).get("state"),
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


def spoofed_rst(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 6_000_000,
    rate_mbps: float = 12.0,
    src: str = "client",
    dst: str = "server",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A RST spoofed on an offloaded connection, outside any window, changes nothing.

    The client sends two RSTs (RST, RST|ACK) with the good connection's
    tuple and a sequence number half the sequence space away from the one
    it is using, as a blind attacker would. The fast path punts them (it
    never judges sequence numbers); the slow path must find them outside
    the window. Asserts: ``fin_rst`` punts grew; the connection is
    ESTABLISHED in conntrack and offloaded again within three aging
    intervals; the transfer arrives intact.
    """
    t0 = time.monotonic()
    t = Transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, src=src, dst=dst,
                 timeout=timeout)
    try:
        t.start()
        _offloaded_after_handshake(lab, t)
        snap0 = lab.snapshot()
        _sent, _res, overlapped = _hostile_run(lab, t, src, dst, ("rst",), 0)
        t_rst = time.monotonic()
        limit = 3 * lab.aging_interval + 1
        states: list[str] = []

        def back(s: Snapshot) -> Any:
            c = t.key(s)
            states.append((c or {}).get("state", "gone"))
            return c is not None and c.get("state") == "ESTABLISHED" and c.get("offloaded") and c

        try:
            snap, conn = poll_until(lab, back, limit, "connection ESTABLISHED and offloaded "
                                                      "after the spoofed RST")
            ok_after = round(time.monotonic() - t_rst, 3)
        except AssertionError:
            snap, conn, ok_after = lab.snapshot(), None, None
        while t.sending():
            if time.monotonic() - t0 > timeout:
                raise _fail(lab, f"good transfer not sent after {timeout}s")
            time.sleep(_POLL)
        t.finish()
    except AgentError as exc:
        raise _fail(lab, f"traffic agent or script failed: {exc}") from exc
    finally:
        t.kill()

    punts = _count(snap, "fast_path", "punts", "fin_rst") - _count(snap0, "fast_path", "punts",
                                                                   "fin_rst")
    seen = list(dict.fromkeys(states))
    problems = t.problems()
    if not overlapped:
        problems.append("the transfer had finished before the spoofed RST went out")
    if punts < 1:
        problems.append("the fast path did not punt the spoofed RST")
    if conn is None:
        problems.append(f"connection not ESTABLISHED and offloaded within {limit:g}s of the "
                        f"spoofed RST; conntrack states seen: {seen}")
    if problems:
        raise _fail(lab, "spoofed_rst: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "fin_rst_punts": punts,
        "states_seen": seen,
        "reoffloaded_after_s": ok_after,
        "elapsed_s": round(time.monotonic() - t0, 2),
    }


#: name -> scenario, each called as ``fn(lab, family=F)`` by the runner.
SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "neigh_mac_change": neigh_mac_change,
    "neigh_removal": neigh_removal,
    "mtu_pmtu": mtu_pmtu,
    "map_full": map_full,
    "hostile_traffic": hostile_traffic,
    "spoofed_rst": spoofed_rst,
}
