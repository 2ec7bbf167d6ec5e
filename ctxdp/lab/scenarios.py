"""Real-traffic scenarios: functions of a ``Lab`` that prove what the router does.

Contract:
- A scenario takes a ``Lab`` whose daemon is running (``lab.start_daemon``)
  and keyword options, drives real sockets through the lab agent on the
  hosts, watches the daemon through ``lab.snapshot()``, and returns a result
  dict of what it measured. Any expectation that fails raises
  ``AssertionError`` with a message saying what was expected and what was
  seen (plus the daemon's log tail). Agents a scenario starts are killed on
  every exit path.
- Scenarios only use the ``Lab`` API, so the same code runs on namespaces
  (``NetnsLab``) and on VMs (issue 8).
- ``observe(event, data)`` (optional) is told what happens as it happens;
  ``ctxdp demo`` prints these. Events: ``connected``, ``seen`` (first time in
  conntrack), ``offloaded``, ``settled`` (exact slow-path count measured),
  ``progress`` (at most once per ``progress_every`` seconds), ``sent``,
  ``withdrawn``, ``gone``, ``idle``, ``aged``. ``data`` always has
  ``proto`` and, once known, ``conn`` (a conntrack row); ``progress`` also
  carries the router-wide live totals ``slow_forwarded_total`` and
  ``fast_hits_total``.
- Measuring the slow path exactly: a conntrack row's ``packets`` are the
  slow path's packets plus the fast path's, which the daemon folds in once
  per aging interval. When the row's count and the flow rows' counts stay
  unchanged for longer than one aging interval, a fold happened after the
  last packet, and ``row packets - flow packets`` is exactly what the slow
  path handled (``settle``). Senders use ``--step`` so the connection is
  idle at those moments: after the handshake and after the data.
- The flow scenarios build on ``tcp_transfer``: ``snat_transfer`` (masquerade, or static
  SNAT to ``NAT_POOL``), ``dnat_transfer`` (port forward on the router's
  address, or on ``PUBLIC_ADDR``), ``tcp_teardown`` (FIN / RST),
  ``policy_reload`` (``ctxdp reload`` or SIGHUP denying a running stream)
  and ``offload_toggle`` (``ctxdp offload disable`` / ``enable`` under a
  running stream). A scenario that needs other config or routes applies
  them itself (``reconfigured``, ``routed_to_router``) and undoes them on
  every exit path, so scenarios can share one daemon in any order.

Helpers for writing more scenarios: ``settle``, ``poll_until``,
``free_port``, ``conn_label``, ``reconfigured``, ``routed_to_router``.
Register a new scenario in ``SCENARIOS`` so the runner picks it up (it also
runs ``ctxdp.lab.scenarios_net.SCENARIOS``): ``python3 -m ctxdp.lab.scenarios [--spec LAB.json]
[--family 4 6] [NAME ...]`` runs scenarios on a fresh ``NetnsLab``, or on
the hosts a spec describes (``ctxdp.lab.hosts.lab_from_spec``; the VM lab),
with ``QUICK_TIMEOUTS``, prints one JSON line per run and exits 0 only if
all passed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ctxdp.lab.hosts import AgentError, Lab, Snapshot

__all__ = [
    "NAT_POOL",
    "PUBLIC_ADDR",
    "QUICK_TIMEOUTS",
    "SCENARIOS",
    "Observer",
    "conn_label",
    "dnat_transfer",
    "free_port",
    "main",
    "offload_toggle",
    "policy_reload",
    "poll_until",
    "reconfigured",
    "routed_to_router",
    "settle",
    "snat_transfer",
    "tcp_teardown",
    "tcp_transfer",
    "udp_offload_and_age",
]

Observer = Callable[[str, dict[str, Any]], None]
ConnKey = Callable[[Snapshot], "dict[str, Any] | None"]

TCP, UDP = 6, 17
_POLL = 0.25

#: Conntrack timeouts for scenario runs: aging and TCP close within seconds.
QUICK_TIMEOUTS: dict[str, float] = {
    "udp_first": 3.0, "udp_multiple": 3.0, "udp_bidir": 3.0,
    "tcp_closing": 3.0, "tcp_fin_wait": 3.0, "tcp_closed": 3.0,
}


def _noop(event: str, data: dict[str, Any]) -> None:
    pass


def free_port() -> int:
    """A port for one scenario run (random, so reruns never meet TIME_WAIT leftovers)."""
    return random.randint(20000, 59999)


def conn_label(conn: Mapping[str, Any] | None) -> str:
    """``tcp 10.0.1.2:40000 -> 10.0.2.2:5001`` for a conntrack row."""
    if not conn:
        return "?"
    o = conn.get("orig", {})
    name = {TCP: "tcp", UDP: "udp", 1: "icmp", 58: "icmpv6"}.get(int(conn.get("proto", 0)))

    def hp(a: Any, p: Any) -> str:
        return f"[{a}]:{p}" if ":" in str(a) else f"{a}:{p}"

    return f"{name} {hp(o.get('src'), o.get('sport'))} -> {hp(o.get('dst'), o.get('dport'))}"


def _fail(lab: Lab, msg: str) -> AssertionError:
    return AssertionError(f"{msg}\n--- daemon log (tail) ---\n{lab.daemon_log(25)}")


def poll_until(lab: Lab, cond: Callable[[Snapshot], Any], timeout: float, what: str,
               on_snap: Callable[[Snapshot], None] | None = None) -> tuple[Snapshot, Any]:
    """Poll snapshots until ``cond(snap)`` is truthy; (snap, value) or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        snap = lab.snapshot()
        if on_snap is not None:
            on_snap(snap)
        val = cond(snap)
        if val:
            return snap, val
        if time.monotonic() > deadline:
            raise _fail(lab, f"{what}: not seen within {timeout}s")
        time.sleep(_POLL)


def settle(lab: Lab, key: ConnKey, timeout: float = 15.0) -> tuple[Snapshot, dict[str, Any], int]:
    """Wait until a connection's counters are folded and still; (snap, conn, slow packets).

    See the module contract: stable row and flow counts for longer than an
    aging interval mean the fold is complete, so the difference is exact.
    """
    need = lab.aging_interval + 0.3
    deadline = time.monotonic() + timeout
    last: tuple | None = None
    since = 0.0
    while True:
        snap = lab.snapshot(stats=False)
        conn = key(snap)
        sig = None if conn is None else (Snapshot.conn_pkts(conn), tuple(snap.fast_pkts(conn)))
        if sig is not None and sig == last:
            if snap.t - since >= need:
                return snap, conn, sig[0] - sum(sig[1])
        else:
            last, since = sig, snap.t
        if time.monotonic() > deadline:
            raise _fail(lab, f"counters of {conn_label(conn)} did not settle within {timeout}s "
                             f"(last {sig})")
        time.sleep(_POLL)


def _totals(snap: Snapshot) -> dict[str, Any]:
    """Router-wide live counters: slow-path packets forwarded, fast-path hits."""
    st = snap.stats or {}
    return {"slow_forwarded_total": (st.get("slow_path") or {}).get("forwarded"),
            "fast_hits_total": (st.get("fast_path") or {}).get("hits")}


def _why_not(snap: Snapshot) -> str:
    off = snap.stats.get("offload", {}) if snap.stats else {}
    return (f"offload stats: not_offloaded={off.get('not_offloaded')} "
            f"failures={off.get('failures')} pending={off.get('pending')}")


# --------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------


def tcp_transfer(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 8_000_000,
    rate_mbps: float = 40.0,
    port: int | None = None,
    src: str = "client",
    dst: str = "server",
    connect_addr: str | None = None,
    connect_port: int | None = None,
    expect_peer: str | None = None,
    mtu: int = 1500,
    slow_growth_max: int = 2,
    wait_gone: bool = False,
    close: str = "fin",
    observe: Observer | None = None,
    progress_every: float = 1.0,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Send ``nbytes`` over TCP from ``src`` to ``dst`` through the router; check offload.

    Asserts: the receiver got exactly the bytes sent (sha256); the
    connection was offloaded after the handshake, before any data; the slow
    path handled at most ``slow_growth_max`` of its packets after that
    (exact counts, see ``settle``), while the fast path's original-direction
    counters reached the transfer's size (>= 95 % of the minimum segment
    count at ``mtu``, and of the bytes); closing withdraws the offload and
    leaves the connection closing/closed in conntrack (``wait_gone``: until
    it is gone). ``close="rst"`` ends it with a RST instead of a FIN (the
    sender waits for every byte to be acked, then closes with SO_LINGER 0):
    the receiver must see the reset and conntrack must say CLOSED.
    ``connect_addr``/``connect_port`` default to ``dst``'s
    address and the listening port (set them for DNAT); ``expect_peer`` is
    the source address the server must see (SNAT).
    """
    emit = observe or _noop
    if close not in ("fin", "rst"):
        raise ValueError(f"close={close!r}: expected 'fin' or 'rst'")
    port = port or free_port()
    caddr = connect_addr or lab.addr(dst, family)
    cport = connect_port or port
    t_start = time.monotonic()
    rx = lab.agent(dst, ["tcp-recv", "--port", str(port), "--family", str(family),
                         "--timeout", str(timeout)]
                   + (["--allow-reset"] if close == "rst" else []))
    tx = None
    try:
        rx.wait("listening", 15)
        tx = lab.agent(src, ["tcp-send", "--dst", caddr, "--port", str(cport),
                             "--bytes", str(nbytes), "--rate-mbps", str(rate_mbps), "--step",
                             "--close", close, "--timeout", str(timeout)])
        local = tx.wait("connected", 15)["local"]
        t_conn = time.monotonic()
        base = {"proto": TCP, "local": local, "dst": caddr, "dport": cport}
        emit("connected", dict(base))

        def key(snap: Snapshot) -> dict[str, Any] | None:
            return snap.find_conn(TCP, src=local[0], sport=int(local[1]), dport=cport)

        # 1. Handshake done, no data yet: the connection must get offloaded.
        seen: list[dict[str, Any]] = []

        def note_seen(snap: Snapshot) -> None:
            c = key(snap)
            if c is not None and not seen:
                seen.append(c)
                emit("seen", {**base, "conn": c, "slow_pkts": Snapshot.conn_pkts(c)})

        try:
            snap, conn = poll_until(lab, lambda s: (c := key(s)) and c.get("offloaded") and c,
                                    5.0, "offload after the TCP handshake", note_seen)
        except AssertionError as exc:
            last = lab.snapshot()
            raise AssertionError(f"{exc}\nconn={key(last)}\n{_why_not(last)}") from None
        t_off = time.monotonic()
        emit("offloaded", {**base, "conn": conn, "after_s": round(t_off - t_conn, 3),
                           "slow_pkts": Snapshot.conn_pkts(conn)})
        _, conn, slow_hs = settle(lab, key)
        emit("settled", {**base, "conn": conn, "phase": "handshake", "slow_pkts": slow_hs})

        # 2. The data: watch the fast path carry it.
        tx.send("go")
        t_data = time.monotonic()
        gaps = 0
        last_emit = 0.0
        prev_fast = 0
        while tx.poll_event("sent") is None:
            if time.monotonic() - t_data > timeout:
                raise _fail(lab, f"sender not done after {timeout}s")
            snap = lab.snapshot()
            conn = key(snap)
            if conn is None or not conn.get("offloaded"):
                gaps += 1
            elif snap.t - last_emit >= progress_every:
                fp = snap.fast_pkts(conn)
                rate = (sum(fp) - prev_fast) / (snap.t - last_emit) if last_emit else None
                emit("progress", {**base, "conn": conn, "fast_pkts": fp,
                                  "fast_bytes": snap.fast_bytes(conn), "fast_pps": rate,
                                  **_totals(snap)})
                last_emit, prev_fast = snap.t, sum(fp)
            time.sleep(_POLL)
        sent = tx.wait("sent")
        emit("sent", {**base, "bytes": sent["bytes"], "seconds": sent["seconds"]})
        snap, conn, slow_end = settle(lab, key)
        fast_pkts, fast_bytes = snap.fast_pkts(conn), snap.fast_bytes(conn)
        emit("settled", {**base, "conn": conn, "phase": "data", "slow_pkts": slow_end,
                         "fast_pkts": fast_pkts, "fast_bytes": fast_bytes})
        if not conn.get("offloaded"):
            raise _fail(lab, f"{conn_label(conn)} no longer offloaded after the data: {conn}")

        # 3. Close: the FIN (or RST) goes to the slow path, which ends the offload.
        tx.send("close")
        sres = tx.result(timeout)
        rres = rx.result(timeout)
        snap, conn_closed = poll_until(
            lab, lambda s: (c := key(s)) is not None and not c.get("offloaded")
            and not any(s.flows_of(c)) and c, 5.0, f"offload withdrawn after {close.upper()}")
        t_closed = time.monotonic()
        emit("withdrawn", {**base, "conn": conn_closed, "state": conn_closed.get("state")})
        gone_after = None
        if wait_gone:
            limit = max(lab.timeout(n) for n in ("tcp_closing", "tcp_fin_wait", "tcp_closed"))
            poll_until(lab, lambda s: key(s) is None, limit + 3 * lab.aging_interval + 3,
                       "closed connection leaving conntrack")
            gone_after = round(time.monotonic() - t_closed, 2)
            emit("gone", {**base, "conn": conn_closed, "after_s": gone_after})
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        rx.kill()
        if tx is not None:
            tx.kill()

    # Verdicts on what was measured above.
    payload = mtu - (40 if family == 6 else 20) - 20
    min_segs = math.ceil(nbytes / payload)
    problems = []
    if (rres["bytes"], rres["sha256"]) != (nbytes, sres["sha256"]):
        problems.append(f"integrity: sent {nbytes} bytes sha256 {sres['sha256'][:16]}, "
                        f"received {rres['bytes']} sha256 {rres['sha256'][:16]}")
    if slow_end - slow_hs > slow_growth_max:
        problems.append(f"slow path kept forwarding: {slow_hs} packets after the handshake, "
                        f"{slow_end} after the data (allowed growth {slow_growth_max})")
    if fast_pkts[0] < 0.95 * min_segs or fast_bytes[0] < 0.95 * nbytes:
        problems.append(f"fast path carried too little: {fast_pkts[0]} packets / {fast_bytes[0]} "
                        f"bytes in the original direction, transfer needs >= {min_segs} "
                        f"segments / {nbytes} bytes")
    if gaps:
        problems.append(f"connection missing or not offloaded in {gaps} polls during the data")
    closed_ok = ("CLOSED",) if close == "rst" else ("FIN_WAIT", "CLOSING", "TIME_WAIT", "CLOSED")
    if conn_closed.get("state") not in closed_ok:
        problems.append(f"after the {close.upper()} conntrack says {conn_closed.get('state')}, "
                        f"expected one of {closed_ok}")
    if close == "rst" and not rres.get("reset"):
        problems.append("the receiver did not see the connection reset")
    if expect_peer is not None and rres["peer"][0] != expect_peer:
        problems.append(f"server saw source {rres['peer'][0]}, expected {expect_peer}")
    if problems:
        raise _fail(lab, f"tcp_transfer {conn_label(conn)}: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "bytes": nbytes,
        "sha256": sres["sha256"],
        "seconds": sres["seconds"],
        "mbps": sres["mbps"],
        "peer_seen": rres["peer"][0],
        "offloaded_after_s": round(t_off - t_conn, 3),
        "slow_pkts_handshake": slow_hs,
        "slow_pkts_after_data": slow_end,
        "fast_pkts": fast_pkts,
        "fast_bytes": fast_bytes,
        "min_segments": min_segs,
        "closed_state": conn_closed.get("state"),
        "close": close,
        "receiver_reset": bool(rres.get("reset")),
        "gone_after_s": gone_after,
        "elapsed_s": round(time.monotonic() - t_start, 2),
    }


# --------------------------------------------------------------------------
# UDP
# --------------------------------------------------------------------------


def udp_offload_and_age(
    lab: Lab,
    *,
    family: int = 4,
    port: int | None = None,
    interval: float = 0.1,
    active_s: float | None = None,
    src: str = "client",
    dst: str = "server",
    slow_growth_max: int = 2,
    max_lost: int = 0,
    check_aging: bool = True,
    observe: Observer | None = None,
    progress_every: float = 1.0,
) -> dict[str, Any]:
    """UDP request/response: offloaded after the reply, kept while active, aged when idle.

    Asserts: after the first exchange the flow is offloaded; during
    ``active_s`` of traffic (default 1.5 x the ``udp_bidir`` timeout + 1 s,
    so longer than the timeout) it stays offloaded in every poll, no
    exchange is lost, and the slow path handles at most ``slow_growth_max``
    more packets (so conntrack never aged and re-created it: the fast path's
    last-used times kept it alive); once idle it leaves both conntrack and
    the map no earlier than the timeout minus an aging interval and no later
    than the timeout plus three intervals and 2 s.
    """
    emit = observe or _noop
    port = port or free_port()
    ttl = lab.timeout("udp_bidir")
    active = active_s if active_s is not None else ttl * 1.5 + 1
    count = max(int(active / interval) + 1, 3)
    addr = lab.addr(dst, family)
    t_start = time.monotonic()
    echo = lab.agent(dst, ["udp-echo", "--port", str(port), "--family", str(family),
                           "--idle-exit", "3", "--timeout", str(active + ttl + 60)])
    req = None
    try:
        echo.wait("listening", 15)
        req = lab.agent(src, ["udp-req", "--dst", addr, "--port", str(port), "--count",
                              str(count), "--interval", str(interval), "--step",
                              "--timeout", str(active + 60)])
        first = req.wait("replied", 15)
        if not first.get("ok"):
            raise _fail(lab, f"first UDP request to {addr}:{port} got no reply")
        local = first["local"]
        base = {"proto": UDP, "local": local, "dst": addr, "dport": port}

        def key(snap: Snapshot) -> dict[str, Any] | None:
            return snap.find_conn(UDP, src=local[0], sport=int(local[1]), dport=port)

        t_reply = time.monotonic()
        seen: list[dict[str, Any]] = []

        def note_seen(snap: Snapshot) -> None:
            c = key(snap)
            if c is not None and not seen:
                seen.append(c)
                emit("seen", {**base, "conn": c, "slow_pkts": Snapshot.conn_pkts(c)})

        try:
            snap, conn = poll_until(lab, lambda s: (c := key(s)) and c.get("offloaded") and c,
                                    3.0, "UDP offload after the first reply", note_seen)
        except AssertionError as exc:
            last = lab.snapshot()
            raise AssertionError(f"{exc}\nconn={key(last)}\n{_why_not(last)}") from None
        emit("offloaded", {**base, "conn": conn, "after_s": round(time.monotonic() - t_reply, 3),
                           "slow_pkts": Snapshot.conn_pkts(conn)})
        _, conn, slow_first = settle(lab, key)
        emit("settled", {**base, "conn": conn, "phase": "first exchange",
                         "slow_pkts": slow_first})

        # Active: more than a timeout's worth of traffic, all through XDP.
        req.send("go")
        t_go = time.monotonic()
        gaps = []
        last_emit = 0.0
        while req.poll_event("result") is None:
            if time.monotonic() - t_go > active + 30:
                raise _fail(lab, "UDP requester did not finish")
            snap = lab.snapshot()
            conn = key(snap)
            if conn is None or not conn.get("offloaded"):
                gaps.append(round(snap.t - t_go, 2))
            elif snap.t - last_emit >= progress_every:
                emit("progress", {**base, "conn": conn, "fast_pkts": snap.fast_pkts(conn),
                                  "fast_bytes": snap.fast_bytes(conn),
                                  "expires_in": conn.get("expires_in"),
                                  "active_s": round(snap.t - t_go, 1), **_totals(snap)})
                last_emit = snap.t
            time.sleep(_POLL)
        res = req.result(10)
        t_last = time.monotonic()
        emit("sent", {**base, "sent": res["sent"], "replies": res["replies"],
                      "seconds": round(t_last - t_go, 2)})
        snap, conn, slow_end = settle(lab, key)
        fast = snap.fast_pkts(conn)
        emit("settled", {**base, "conn": conn, "phase": "active phase", "slow_pkts": slow_end,
                         "fast_pkts": fast})

        # Idle: aged out of conntrack and the map.
        aged_after = None
        if check_aging:
            def gone(s: Snapshot) -> bool:
                if key(s) is not None:
                    return False
                return not any(f.get("match", {}).get("proto") == UDP
                               and int(f["match"].get("sport", -1)) == int(local[1])
                               for f in s.flows)

            last_idle = [0.0]

            def tick(s: Snapshot) -> None:
                c = key(s)
                if c is not None and s.t - last_idle[0] >= progress_every:
                    emit("idle", {**base, "conn": c, "idle_s": round(s.t - t_last, 1),
                                  "expires_in": c.get("expires_in"),
                                  "offloaded": c.get("offloaded")})
                    last_idle[0] = s.t

            poll_until(lab, gone, ttl + 3 * lab.aging_interval + 10, "idle UDP flow aged out",
                       tick)
            aged_after = round(time.monotonic() - t_last, 2)
            emit("aged", {**base, "conn": conn, "idle_s": aged_after, "timeout": ttl})
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        echo.kill()
        if req is not None:
            req.kill()

    problems = []
    if active <= ttl:
        problems.append(f"active phase {active}s is not longer than the udp_bidir timeout {ttl}s")
    if gaps:
        problems.append(f"flow missing or not offloaded while active at t={gaps[:5]}s")
    if res["lost"] > max_lost:
        problems.append(f"{res['lost']} of {res['sent']} exchanges lost")
    if slow_end - slow_first > slow_growth_max:
        problems.append(f"slow path handled {slow_end - slow_first} packets while the flow "
                        f"was offloaded (allowed {slow_growth_max})")
    if sum(fast) < 2 * (count - 1) - 2 * max_lost - slow_growth_max:
        problems.append(f"fast path counted {fast}, expected about {count - 1} each way")
    if aged_after is not None:
        lo, hi = ttl - lab.aging_interval, ttl + 3 * lab.aging_interval + 2
        if not lo <= aged_after <= hi:
            problems.append(f"aged out after {aged_after}s idle, expected {lo:g}..{hi:g}s")
    if problems:
        raise _fail(lab, "udp_offload_and_age: " + "; ".join(problems))
    return {
        "conn": conn_label(conn),
        "exchanges": res["sent"],
        "replies": res["replies"],
        "active_s": round(t_last - t_go, 2),
        "timeout_s": ttl,
        "slow_pkts_first": slow_first,
        "slow_pkts_after_active": slow_end,
        "fast_pkts": fast,
        "aged_after_idle_s": aged_after,
        "elapsed_s": round(time.monotonic() - t_start, 2),
    }


# --------------------------------------------------------------------------
# Config and routes a scenario changes, and undoes on every exit path
# --------------------------------------------------------------------------

#: Addresses on no lab link, routed to the router by the NAT scenarios: a
#: static SNAT source and a DNAT "public" address. RFC 2544 benchmarking
#: and RFC 3849 documentation space, so they never clash with a real network.
NAT_POOL: dict[int, str] = {4: "198.18.200.10", 6: "2001:db8:c7::10"}
PUBLIC_ADDR: dict[int, str] = {4: "198.18.201.1", 6: "2001:db8:c8::1"}


def _ip(text: Any) -> str:
    """An address in canonical text (IPv6 compressed), for comparisons."""
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return str(text)


def _hp(addr: Any, port: Any) -> str:
    """``addr:port``, bracketed for IPv6."""
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _host_prefix(addr: str) -> str:
    return f"{addr}/{128 if ':' in addr else 32}"


@contextlib.contextmanager
def reconfigured(lab: Lab, **changes: Any) -> Iterator[dict[str, Any]]:
    """Reload the daemon with ``changes`` (top-level config keys) over the running
    config; reload the previous config on exit, whatever happened."""
    base = dict(lab.doc) if lab.doc is not None else lab.config()
    doc = {**base, **changes}
    lab.reload(doc)
    try:
        yield doc
    finally:
        lab.reload(base)


@contextlib.contextmanager
def routed_to_router(lab: Lab, addr: str, roles: Sequence[str],
                     blackhole: bool = True) -> Iterator[None]:
    """Route ``addr`` (on no lab link) from hosts ``roles`` to the router; undo on exit.

    Each host gets a host route via the router's address on its link (a
    netns host's default route already points there; a VM's usually does
    not). The router gets a blackhole route for ``addr``, as a NAT router
    owns its pool: the slow path has its AF_PACKET copy of every frame, and
    the blackhole makes the router's own stack drop the original silently.
    Without it an IPv6 router stack with no route answers "no route"
    (ICMPv6) even with forwarding off, and that aborts a connecting client.
    """
    v = ["-6"] if ":" in addr else ["-4"]
    prefix = _host_prefix(addr)
    undo: list[tuple[Any, list[str]]] = []
    try:
        for role in roles:
            via = lab.router_addr(role, 6 if ":" in addr else 4)
            lab.host(role).exec(["ip", *v, "route", "replace", prefix, "via", via])
            undo.append((lab.host(role), ["ip", *v, "route", "del", prefix, "via", via]))
        if blackhole:
            lab.router.exec(["ip", *v, "route", "replace", "blackhole", prefix])
            undo.append((lab.router, ["ip", *v, "route", "del", "blackhole", prefix]))
        yield
    finally:
        for host, argv in reversed(undo):
            host.exec(argv, check=False)


def _watcher(observe: Observer | None, into: dict[str, Any]) -> Observer:
    """An observer that keeps each event's first data (and time) and passes it on."""
    emit = observe or _noop

    def watch(event: str, data: dict[str, Any]) -> None:
        into.setdefault(event, {**data, "_t": time.monotonic()})
        into.setdefault("_all", []).append((event, time.monotonic(), data))
        emit(event, data)

    return watch


# --------------------------------------------------------------------------
# NAT
# --------------------------------------------------------------------------


def snat_transfer(
    lab: Lab,
    *,
    family: int = 4,
    to: str | None = None,
    nbytes: int = 3_000_000,
    rate_mbps: float = 40.0,
    observe: Observer | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``tcp_transfer`` with source NAT on the server-facing port.

    ``to=None``: masquerade, so the server must see the router's own
    address on its link (the router's stack is kept from resetting the
    replies by the daemon's kernel guard). ``to="pool"`` (the lab's
    ``NAT_POOL`` address) or an address: static SNAT to an address no host
    owns, routed to the router (``routed_to_router``). The config is
    reloaded with the NAT rule and restored afterwards. Asserts everything
    ``tcp_transfer`` does (integrity, offload after the handshake, slow path
    flat, fast path carrying the transfer, FIN withdrawal) plus: the server
    saw the NAT address as the source, and conntrack's reply tuple is
    addressed to it (the translation the fast path applies).
    """
    if to == "pool":
        to = NAT_POOL[family]
    out_port = lab.port("server")
    if to is None:
        rule: dict[str, Any] = {"type": "masquerade", "out_port": out_port}
        expect = lab.router_addr("server", family)
    else:
        rule = {"type": "snat", "out_port": out_port, "to": to}
        expect = to
    seen: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if to is not None:
            stack.enter_context(routed_to_router(lab, to, ("server",)))
        stack.enter_context(reconfigured(lab, nat=[rule]))
        r = tcp_transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps,
                         expect_peer=expect, observe=_watcher(observe, seen), timeout=timeout)
    reply = seen["offloaded"]["conn"]["reply"]
    if _ip(reply.get("dst")) != _ip(expect):
        raise _fail(lab, f"snat_transfer: conntrack reply tuple {reply} is not addressed to "
                         f"the NAT address {expect}")
    return {**r, "nat": rule["type"], "nat_addr": expect, "reply_tuple": reply}


def dnat_transfer(
    lab: Lab,
    *,
    family: int = 4,
    public: str | None = None,
    blackhole: bool = True,
    nbytes: int = 3_000_000,
    rate_mbps: float = 40.0,
    observe: Observer | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A TCP port-forward: the client connects to ``public``:F, the server accepts on port S.

    ``public=None``: the router's own address on the client's link (the
    classic port forward; the kernel guard keeps the router's stack from
    resetting it). ``public="routed"`` (the lab's ``PUBLIC_ADDR``) or an
    address: one no host owns, routed to the router (``routed_to_router``),
    so the router's stack never thinks the connection is its own. The DNAT
    rule matches that destination (``dst``) and the forwarded port F on the
    client's port and rewrites to the server's address and its real port S
    != F (``blackhole=False`` leaves out the router's blackhole route, to
    show what it prevents). Asserts everything ``tcp_transfer`` does, plus: the server saw the
    client's own address (no SNAT), and conntrack's reply tuple comes from
    the server's real address and port.
    """
    pub = PUBLIC_ADDR[family] if public == "routed" else public
    pub = pub or lab.router_addr("client", family)
    fport = free_port()
    real = free_port()
    while real == fport:
        real = free_port()
    server = lab.addr("server", family)
    rule = {"type": "dnat", "in_port": lab.port("client"), "proto": "tcp", "dport": fport,
            "to": server, "to_port": real, "dst": _host_prefix(pub)}
    seen: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if public is not None:
            stack.enter_context(routed_to_router(lab, pub, ("client",), blackhole))
        stack.enter_context(reconfigured(lab, nat=[rule]))
        r = tcp_transfer(lab, family=family, nbytes=nbytes, rate_mbps=rate_mbps, port=real,
                         connect_addr=pub, connect_port=fport,
                         expect_peer=lab.addr("client", family),
                         observe=_watcher(observe, seen), timeout=timeout)
    reply = seen["offloaded"]["conn"]["reply"]
    if (_ip(reply.get("src")), int(reply.get("sport", -1))) != (_ip(server), real):
        raise _fail(lab, f"dnat_transfer: conntrack reply tuple {reply} does not come from "
                         f"the server's real endpoint {server}:{real}")
    return {**r, "public": _hp(pub, fport), "forwarded_to": _hp(server, real),
            "reply_tuple": reply}


# --------------------------------------------------------------------------
# Teardown
# --------------------------------------------------------------------------


def _punts(snap: Snapshot) -> int:
    return int(((snap.stats.get("fast_path") or {}).get("punts") or {}).get("fin_rst", 0))


def tcp_teardown(
    lab: Lab,
    *,
    family: int = 4,
    close: str = "fin",
    nbytes: int = 500_000,
    observe: Observer | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """A FIN (``close="fin"``) or RST (``"rst"``) ends the offload; conntrack closes cleanly.

    Runs a short offloaded ``tcp_transfer`` (which already checks the
    withdrawal and the closed state) and asserts explicitly: the XDP program
    punted the FIN/RST to the slow path (its ``fin_rst`` punt counter grew);
    the connection's flow entries were gone and it was no longer offloaded
    within an aging interval (+ 2 s of polling) of the close; conntrack
    said FIN_WAIT/CLOSING/TIME_WAIT/CLOSED after a FIN and CLOSED after a
    RST; the RST reached the receiver; and the connection then left
    conntrack by its closing timeout (nothing left behind).
    """
    seen: dict[str, Any] = {}
    punts0 = _punts(lab.snapshot())
    r = tcp_transfer(lab, family=family, nbytes=nbytes, rate_mbps=20.0, close=close,
                     wait_gone=True, observe=_watcher(observe, seen), timeout=timeout)
    punts1 = _punts(lab.snapshot())
    # The close is sent right after the data phase settled (the last "settled").
    t_close = [t for ev, t, d in seen["_all"] if ev == "settled"][-1]
    withdrawn_after = seen["withdrawn"]["_t"] - t_close
    problems = []
    if punts1 <= punts0:
        problems.append(f"the XDP fin_rst punt counter did not grow ({punts0} -> {punts1})")
    if withdrawn_after > lab.aging_interval + 2.0:
        problems.append(f"offload withdrawn {withdrawn_after:.2f}s after the close")
    if close == "rst" and not r["receiver_reset"]:
        problems.append("the receiver did not see the RST")
    if r["gone_after_s"] is None:
        problems.append("the connection never left conntrack")
    if problems:
        raise _fail(lab, f"tcp_teardown ({close}) {r['conn']}: " + "; ".join(problems))
    return {**r, "punts_fin_rst": punts1 - punts0,
            "withdrawn_after_close_s": round(withdrawn_after, 2)}


# --------------------------------------------------------------------------
# Streams the operator changes under: policy reload, offload off and on
# --------------------------------------------------------------------------


class _Stream:
    """A paced TCP stream client -> server, offloaded and flowing, for the runtime scenarios.

    ``open()`` starts a receiver that reports progress every 0.1 s and a
    sender paced at ``rate_mbps`` that waits (``--step``) until the
    connection is offloaded, then sends ``nbytes``; it returns once XDP
    carries the data. ``close()`` kills both agents (every exit path).
    """

    def __init__(self, lab: Lab, family: int, nbytes: int, rate_mbps: float,
                 timeout: float) -> None:
        self.lab, self.family, self.nbytes = lab, family, nbytes
        self.rate_mbps, self.timeout = rate_mbps, timeout
        self.port = free_port()
        self.addr = lab.addr("server", family)
        self.rx: Any = None
        self.tx: Any = None
        self.local: list[Any] = []

    def key(self, snap: Snapshot) -> dict[str, Any] | None:
        return snap.find_conn(TCP, src=self.local[0], sport=int(self.local[1]), dport=self.port)

    def flows(self, snap: Snapshot) -> list[dict[str, Any]]:
        """Flow rows of this stream (either direction), by the client's port."""
        sport = int(self.local[1])
        return [f for f in snap.flows
                if int(f.get("match", {}).get("proto", -1)) == TCP
                and sport in (int(f["match"].get("sport", -1)), int(f["match"].get("dport", -1)))]

    def received(self) -> int:
        ev = self.rx.latest("progress")
        return int(ev["bytes"]) if ev else 0

    def open(self, min_fast_pkts: int = 50) -> tuple[Snapshot, dict[str, Any]]:
        lab = self.lab
        self.rx = lab.agent("server", ["tcp-recv", "--port", str(self.port), "--family",
                                       str(self.family), "--progress", "0.1",
                                       "--timeout", str(self.timeout)])
        self.rx.wait("listening", 15)
        self.tx = lab.agent("client", ["tcp-send", "--dst", self.addr, "--port", str(self.port),
                                       "--bytes", str(self.nbytes), "--rate-mbps",
                                       str(self.rate_mbps), "--step",
                                       "--timeout", str(self.timeout)])
        self.local = self.tx.wait("connected", 15)["local"]
        poll_until(lab, lambda s: (c := self.key(s)) and c.get("offloaded"), 5.0,
                   "offload after the TCP handshake")
        self.tx.send("go")
        return poll_until(
            lab, lambda s: (c := self.key(s)) and c.get("offloaded")
            and s.fast_pkts(c)[0] >= min_fast_pkts and self.received() > 0 and c,
            10.0, f"the stream flowing through XDP ({min_fast_pkts}+ packets) to the server")

    def label(self) -> str:
        return f"tcp {_hp(*self.local)} -> {_hp(self.addr, self.port)}"

    def close(self) -> None:
        for ap in (self.tx, self.rx):
            if ap is not None:
                ap.kill()


def _deny_policy(base: Mapping[str, Any], addr: str, port: int) -> dict[str, Any]:
    """``base``'s policy with one deny rule for TCP to ``addr``:``port`` put first."""
    pol = dict(base.get("policy") or {"default": "allow"})
    rule = {"action": "deny", "proto": "tcp", "dst": _host_prefix(addr), "dport": port,
            "comment": "flow scenario: deny the running stream"}
    pol["rules"] = [rule, *(pol.get("rules") or [])]
    return pol


def policy_reload(
    lab: Lab,
    *,
    family: int = 4,
    via: str = "ctl",
    rate_mbps: float = 16.0,
    observe: Observer | None = None,
    timeout: float = 40.0,
) -> dict[str, Any]:
    """A reload whose policy denies an offloaded, streaming connection stops it in one interval.

    A paced stream is offloaded and carried by XDP; then the config is
    rewritten with a deny rule for it (default unchanged) and reloaded
    (``via="ctl"``: ``ctxdp reload``; ``"sighup"``: SIGHUP to the daemon).
    Asserts: the connection left conntrack and its flow entries the map
    within one aging interval (+ 1 s of polling) of the request (the ctl
    answer counts it withdrawn and deleted); from one aging interval after
    the request on, for 2 s: no byte reached the server, the router-wide
    fast-path hit counter stood still, and the slow path refused the
    sender's retransmissions (its policy-deny / ct-invalid drops grew).
    The previous config is restored on every exit path.
    """
    emit = observe or _noop
    stream = _Stream(lab, family, int(rate_mbps * 1e6 / 8 * timeout), rate_mbps, timeout)
    base = dict(lab.doc) if lab.doc is not None else lab.config()
    reloaded = False
    try:
        snap, conn = stream.open()
        emit("offloaded", {"proto": TCP, "conn": conn, "fast_pkts": snap.fast_pkts(conn)})
        rx_before = stream.received()
        t_req = time.monotonic()
        answer = lab.reload({**base, "policy": _deny_policy(base, stream.addr, stream.port)},
                            via=via)
        reloaded = True
        snap, _ = poll_until(lab, lambda s: stream.key(s) is None and not stream.flows(s),
                             lab.aging_interval + 5.0, "the denied connection removed")
        gone_after = snap.t - t_req
        emit("withdrawn", {"proto": TCP, "conn": conn, "after_s": round(gone_after, 2)})

        # From one aging interval after the request (+ one progress period
        # and the pipe) the stream must stand still.
        time.sleep(max(t_req + lab.aging_interval + 0.3 - time.monotonic(), 0))
        s1 = lab.snapshot()
        b1 = stream.received()
        time.sleep(2.0)
        s2 = lab.snapshot()
        b2 = stream.received()
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        stream.close()
        if reloaded:
            lab.reload(base)

    def refused(s: Snapshot) -> int:
        d = (s.stats.get("slow_path") or {}).get("dropped") or {}
        return int(d.get("policy-deny", 0)) + int(d.get("ct-invalid", 0))

    hits = [int((s.stats.get("fast_path") or {}).get("hits", 0)) for s in (s1, s2)]
    problems = []
    if via == "ctl" and (not answer or answer.get("deleted", 0) < 1
                         or answer.get("withdrawn", 0) < 1):
        problems.append(f"reload answered {answer}, expected the stream withdrawn and deleted")
    if gone_after > lab.aging_interval + 1.0:
        problems.append(f"connection still present {gone_after:.2f}s after the reload "
                        f"(aging interval {lab.aging_interval}s)")
    if b2 != b1:
        problems.append(f"the server still received {b2 - b1} bytes from "
                        f"{lab.aging_interval + 0.3:.1f}s after the reload on")
    if hits[1] != hits[0]:
        problems.append(f"fast-path hits still grew by {hits[1] - hits[0]} after the reload")
    if refused(s2) <= refused(snap):
        problems.append("the slow path refused no retransmission of the denied stream")
    if problems:
        raise _fail(lab, f"policy_reload via {via} {stream.label()}: " + "; ".join(problems))
    return {
        "conn": stream.label(),
        "via": via,
        "answer": answer,
        "received_before": rx_before,
        "received_final": b2,
        "removed_after_s": round(gone_after, 2),
        "refused_retransmits": refused(s2) - refused(snap),
        "slow_path_drops": _drops_delta(snap, s2),
    }


def _drops_delta(a: Snapshot, b: Snapshot) -> dict[str, int]:
    """Slow-path drop reasons that grew from ``a`` to ``b``, and by how much."""
    da = (a.stats.get("slow_path") or {}).get("dropped") or {}
    db = (b.stats.get("slow_path") or {}).get("dropped") or {}
    return {k: int(v) - int(da.get(k, 0)) for k, v in db.items() if int(v) > int(da.get(k, 0))}


def offload_toggle(
    lab: Lab,
    *,
    family: int = 4,
    nbytes: int = 10_000_000,
    rate_mbps: float = 16.0,
    slow_window: float = 1.5,
    observe: Observer | None = None,
    timeout: float = 40.0,
) -> dict[str, Any]:
    """``ctxdp offload disable`` withdraws a streaming connection; ``enable`` re-offers it.

    A paced stream is offloaded and carried by XDP. Asserts: after
    ``offload`` ``enabled=false`` the connection is no longer offloaded and
    its flow entries are gone within an aging interval (+ 1 s); for
    ``slow_window`` seconds it stays in conntrack, un-offloaded, in every
    poll while the server keeps receiving (at least half the paced rate)
    and the connection's slow-path packet count grows; after
    ``enabled=true`` it is offloaded again and XDP carries it (fresh flow
    entries counting packets) before the data ends; the transfer completes
    intact (sha256). Offload is switched back on on every exit path.
    """
    emit = observe or _noop
    stream = _Stream(lab, family, nbytes, rate_mbps, timeout)
    disabled = False
    try:
        snap, conn = stream.open(min_fast_pkts=30)
        emit("offloaded", {"proto": TCP, "conn": conn, "fast_pkts": snap.fast_pkts(conn)})
        fast_first = snap.fast_pkts(conn)

        t_dis = time.monotonic()
        off = lab.ctl("offload", enabled=False)
        disabled = True
        snap, conn = poll_until(
            lab, lambda s: (c := stream.key(s)) and not c.get("offloaded")
            and not stream.flows(s) and c, lab.aging_interval + 5.0,
            "withdrawal after offload disable")
        withdrawn_after = snap.t - t_dis
        emit("withdrawn", {"proto": TCP, "conn": conn, "after_s": round(withdrawn_after, 2)})
        enabled_stat = (snap.stats.get("offload") or {}).get("enabled")

        # The slow path carries it now.
        b0, p0, t0 = stream.received(), Snapshot.conn_pkts(conn), snap.t
        gaps: list[str] = []
        while time.monotonic() - t0 < slow_window:
            time.sleep(_POLL)
            snap = lab.snapshot(stats=False)
            c = stream.key(snap)
            if c is None or c.get("offloaded") or stream.flows(snap):
                gaps.append(f"t={snap.t - t0:.2f}s conn={'present' if c else 'absent'} "
                            f"offloaded={c and c.get('offloaded')} flows={len(stream.flows(snap))}")
            elif c is not None:
                conn = c
        b1, p1, t1 = stream.received(), Snapshot.conn_pkts(conn), snap.t
        if stream.tx.poll_event("sent") is not None:
            raise _fail(lab, f"{stream.label()}: the data ended during the slow-path window; "
                             f"raise nbytes")

        t_en = time.monotonic()
        on = lab.ctl("offload", enabled=True)
        disabled = False
        snap, conn = poll_until(
            lab, lambda s: (c := stream.key(s)) and c.get("offloaded")
            and s.fast_pkts(c)[0] >= 20 and c, lab.aging_interval + 5.0,
            "re-offload after offload enable, XDP carrying the stream")
        reoffloaded_after = snap.t - t_en
        fast_again = snap.fast_pkts(conn)
        emit("offloaded", {"proto": TCP, "conn": conn, "fast_pkts": fast_again})
        late = stream.tx.poll_event("sent") is not None

        sres = stream.tx.wait("sent", timeout)
        stream.tx.send("close")
        sres = stream.tx.result(timeout)
        rres = stream.rx.result(timeout)
    except AgentError as exc:
        raise _fail(lab, f"traffic agent failed: {exc}") from exc
    finally:
        if disabled:
            lab.ctl("offload", enabled=True)
        stream.close()

    want_bytes = 0.5 * rate_mbps * 1e6 / 8 * (t1 - t0)
    problems = []
    if off.get("enabled") is not False or enabled_stat is not False:
        problems.append(f"offload disable answered {off}, stats enabled={enabled_stat}")
    if on.get("enabled") is not True:
        problems.append(f"offload enable answered {on}")
    if withdrawn_after > lab.aging_interval + 1.0:
        problems.append(f"withdrawn {withdrawn_after:.2f}s after disable")
    if gaps:
        problems.append(f"while disabled the connection was not in the slow path: {gaps[:3]}")
    if b1 - b0 < want_bytes:
        problems.append(f"server got {b1 - b0} bytes in {t1 - t0:.2f}s through the slow path, "
                        f"expected >= {want_bytes:.0f}")
    if p1 <= p0:
        problems.append(f"slow-path packet count did not grow while disabled ({p0} -> {p1})")
    if late:
        problems.append("the data ended before XDP carried the stream again")
    if (rres["bytes"], rres["sha256"]) != (nbytes, sres["sha256"]):
        problems.append(f"integrity: sent {nbytes} bytes sha256 {sres['sha256'][:16]}, "
                        f"received {rres['bytes']} sha256 {rres['sha256'][:16]}")
    if problems:
        raise _fail(lab, f"offload_toggle {stream.label()}: " + "; ".join(problems))
    return {
        "conn": stream.label(),
        "bytes": nbytes,
        "sha256": sres["sha256"],
        "fast_pkts_before_disable": fast_first,
        "withdrawn_after_s": round(withdrawn_after, 2),
        "slow_window_bytes": b1 - b0,
        "slow_window_pkts": p1 - p0,
        "slow_window_s": round(t1 - t0, 2),
        "reoffloaded_after_s": round(reoffloaded_after, 2),
        "fast_pkts_after_enable": fast_again,
    }


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------

#: name -> scenario; each is called as ``fn(lab, family=F)``.
SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "tcp_transfer": tcp_transfer,
    "udp_offload_and_age": udp_offload_and_age,
    "snat_masquerade": snat_transfer,
    "snat_pool": functools.partial(snat_transfer, to="pool"),
    "dnat_router_addr": dnat_transfer,
    "dnat_routed_addr": functools.partial(dnat_transfer, public="routed"),
    "tcp_teardown_fin": tcp_teardown,
    "tcp_teardown_rst": functools.partial(tcp_teardown, close="rst"),
    "policy_reload": policy_reload,
    "policy_reload_sighup": functools.partial(policy_reload, via="sighup"),
    "offload_toggle": offload_toggle,
}


def _registry() -> dict[str, Callable[..., dict[str, Any]]]:
    """Every scenario the runner knows: these and ``ctxdp.lab.scenarios_net.SCENARIOS``."""
    from ctxdp.lab.scenarios_net import SCENARIOS as NET  # it imports this module: load late

    return {**SCENARIOS, **NET}


def _run_all(lab: Lab, names: Sequence[str], families: Sequence[int]) -> int:
    lab.start_daemon(lab.config(timeouts=QUICK_TIMEOUTS))
    registry = _registry()
    failed = 0
    for name in names:
        for fam in families:
            t0 = time.monotonic()
            try:
                res: dict[str, Any] = {"ok": True, "result": registry[name](lab, family=fam)}
            except AssertionError as exc:
                failed += 1
                res = {"ok": False, "error": str(exc)}
            line = {"scenario": name, "family": fam, "seconds": round(time.monotonic() - t0, 1)}
            print(json.dumps({**line, **res}), flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ctxdp.lab.scenarios",
                                description="Run lab scenarios against a running ctxdp.")
    known = _registry()
    p.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {list(known)}")
    p.add_argument("--family", type=int, nargs="+", choices=(4, 6), default=[4, 6])
    p.add_argument("--spec", help="JSON lab description (VMs); default: a fresh netns lab")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in known]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {list(known)}")
    names = a.names or list(known)
    if a.spec:
        from ctxdp.lab.hosts import lab_from_spec

        with open(a.spec) as f:
            lab: Lab = lab_from_spec(json.load(f))
    else:
        from ctxdp.lab.netns import NetnsLab

        lab = NetnsLab()
    with lab:
        failed = _run_all(lab, names, a.family)
    total = len(names) * len(a.family)
    print(f"{total - failed}/{total} scenario runs passed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
