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

Helpers for writing more scenarios: ``settle``, ``poll_until``,
``free_port``, ``conn_label``. Register a new scenario in ``SCENARIOS`` so
the runner picks it up: ``python3 -m ctxdp.lab.scenarios [--spec LAB.json]
[--family 4 6] [NAME ...]`` runs scenarios on a fresh ``NetnsLab``, or on
the hosts a spec describes (``ctxdp.lab.hosts.lab_from_spec``; the VM lab),
with ``QUICK_TIMEOUTS``, prints one JSON line per run and exits 0 only if
all passed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ctxdp.lab.hosts import AgentError, Lab, Snapshot

__all__ = [
    "QUICK_TIMEOUTS",
    "SCENARIOS",
    "Observer",
    "conn_label",
    "free_port",
    "poll_until",
    "settle",
    "tcp_transfer",
    "main",
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
    it is gone). ``connect_addr``/``connect_port`` default to ``dst``'s
    address and the listening port (set them for DNAT); ``expect_peer`` is
    the source address the server must see (SNAT).
    """
    emit = observe or _noop
    port = port or free_port()
    caddr = connect_addr or lab.addr(dst, family)
    cport = connect_port or port
    t_start = time.monotonic()
    rx = lab.agent(dst, ["tcp-recv", "--port", str(port), "--family", str(family),
                         "--timeout", str(timeout)])
    tx = None
    try:
        rx.wait("listening", 15)
        tx = lab.agent(src, ["tcp-send", "--dst", caddr, "--port", str(cport),
                             "--bytes", str(nbytes), "--rate-mbps", str(rate_mbps), "--step",
                             "--timeout", str(timeout)])
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

        # 3. Close: FIN goes to the slow path, which ends the offload.
        tx.send("close")
        sres = tx.result(timeout)
        rres = rx.result(timeout)
        snap, conn_closed = poll_until(
            lab, lambda s: (c := key(s)) is not None and not c.get("offloaded")
            and not any(s.flows_of(c)) and c, 5.0, "offload withdrawn after FIN")
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
    if conn_closed.get("state") not in ("FIN_WAIT", "CLOSING", "TIME_WAIT", "CLOSED"):
        problems.append(f"after close conntrack says {conn_closed.get('state')}")
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
# Runner
# --------------------------------------------------------------------------

#: name -> scenario; each is called as ``fn(lab, family=F)``.
SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "tcp_transfer": tcp_transfer,
    "udp_offload_and_age": udp_offload_and_age,
}


def _run_all(lab: Lab, names: Sequence[str], families: Sequence[int]) -> int:
    lab.start_daemon(lab.config(timeouts=QUICK_TIMEOUTS))
    failed = 0
    for name in names:
        for fam in families:
            t0 = time.monotonic()
            try:
                res: dict[str, Any] = {"ok": True, "result": SCENARIOS[name](lab, family=fam)}
            except AssertionError as exc:
                failed += 1
                res = {"ok": False, "error": str(exc)}
            line = {"scenario": name, "family": fam, "seconds": round(time.monotonic() - t0, 1)}
            print(json.dumps({**line, **res}), flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ctxdp.lab.scenarios",
                                description="Run lab scenarios against a running ctxdp.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {list(SCENARIOS)}")
    p.add_argument("--family", type=int, nargs="+", choices=(4, 6), default=[4, 6])
    p.add_argument("--spec", help="JSON lab description (VMs); default: a fresh netns lab")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    names = a.names or list(SCENARIOS)
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
