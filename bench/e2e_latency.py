"""Offload latency of bench/e2e.py: handshake done -> first packet forwarded by XDP.

Contract: ``offload_latency(lab, conns, packets, interval)`` needs the lab's
daemon running with offload on and returns percentiles in milliseconds plus
the raw per-connection figures.

Method (no polling, so the bench does not steal CPU from the daemon it is
timing): the client opens ``conns`` TCP connections to a server one after
the other. For each, ``t_hs`` is CLOCK_MONOTONIC right after ``connect()``
returns (the client has sent the handshake's final ACK); then it sends
``packets`` one-byte segments (TCP_NODELAY), ``interval`` seconds apart,
recording each send time. Once every connection is done the daemon's
``flows`` (the XDP map entries) give, per connection, how many of its
client-to-server packets XDP forwarded: ``k``. A flow entry only ever starts
matching, so the first ``packets - k`` segments took the slow path and
segment ``j = packets - k`` was the first one XDP forwarded; its latency is
``t_send[j] - t_hs``: an upper bound, at most one interval above the true
moment the entry appeared (reported as the resolution). ``k == 0`` means
"not offloaded within the window" (counted as censored, and any percentile
reaching them is reported as above the window).
Guards: TCP_INFO gives the segments each socket sent. ``packets + 2``
(SYN, ACK, data) is the normal case. ``e`` more (tail-loss probes or
retransmissions, typically when the slow path stalled) may have been
forwarded by XDP and inflate ``k``: the first fast data segment is then
taken as ``j = packets - k + e`` (an upper bound; such connections are
counted as ``widened``, never dropped, since dropping them would hide
exactly the slow cases). Fewer segments than sends means segments merged
and the count no longer maps to send order: excluded and counted (the
client's initial congestion window is raised so data never waits for ACKs,
which is what would merge them).
"""

from __future__ import annotations

import math
import socket
import struct
import time
from typing import Any

__all__ = ["offload_latency", "percentile"]

PORT = 5201
_TCPI_RETRANS = 100  # struct tcp_info: tcpi_total_retrans (u32)
_TCPI_SEGS_OUT = 136  # struct tcp_info: tcpi_segs_out (u32)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); inf entries count as above everything."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def _tcp_sink(ctl: Any, family: int, port: int) -> int:
    """Server: accept every connection, read and discard until stopped."""
    import selectors  # noqa: PLC0415

    af = socket.AF_INET if family == 4 else socket.AF_INET6
    ls = socket.socket(af, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0" if family == 4 else "::", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, "listen")
    ctl.ready()
    n = 0
    while not ctl.stop_requested():
        for key, _ in sel.select(0.2):
            if key.data == "listen":
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn")
                n += 1
                continue
            try:
                data = key.fileobj.recv(65536)
            except (BlockingIOError, ConnectionError):
                data = b"x"
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
    return n


def _client(ctl: Any, family: int, dst: str, port: int, conns: int, packets: int,
            interval: float) -> list[dict[str, Any]]:
    """Client: sequential connections, timed sends; per-connection records."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    out, socks = [], []
    try:
        for _ in range(conns):
            s = socket.socket(af, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            s.connect((dst, port))
            t_hs = time.monotonic()
            sends = []
            for i in range(packets):
                due = t_hs + i * interval
                while (now := time.monotonic()) < due:
                    time.sleep(min(due - now, 0.0002))
                sends.append(time.monotonic())
                s.send(b"x")
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            retrans = struct.unpack_from("=I", info, _TCPI_RETRANS)[0]
            segs_out = struct.unpack_from("=I", info, _TCPI_SEGS_OUT)[0]
            out.append({"sport": s.getsockname()[1], "t_hs": t_hs, "sends": sends,
                        "segs_out": segs_out, "retrans": retrans})
            socks.append(s)
        time.sleep(0.2)  # the last segments reach the router before the flows are read
        for rec, s in zip(out, socks, strict=True):
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            rec["segs_out"] = struct.unpack_from("=I", info, _TCPI_SEGS_OUT)[0]
            rec["retrans"] = struct.unpack_from("=I", info, _TCPI_RETRANS)[0]
        # Closing sends FIN, which withdraws the offload (and its counters):
        # the sockets stay open until the parent has read the flows.
        ctl.ready()
        ctl.stop_requested(timeout=300)
        return out
    finally:
        for s in socks:
            s.close()


def offload_latency(lab: Any, conns: int = 1000, packets: int = 40,
                    interval: float = 0.0005, family: int = 4) -> dict[str, Any]:
    topo = lab.topo
    client, server = topo.client, topo.server
    pc, ps = topo.port("client"), topo.port("server")
    dst = ps.peer_v4 if family == 4 else ps.peer_v6
    src = pc.peer_v4 if family == 4 else pc.peer_v6
    gw = pc.v4 if family == 4 else pc.v6
    client.ip("-6" if family == 6 else "-4", "route", "replace", "default", "via", gw,
              "dev", "eth0", "initcwnd", "100")
    srv = server.spawn(_tcp_sink, family, PORT)
    try:
        srv.wait_ready()
        cli = client.spawn(_client, family, dst, PORT, conns, packets, interval)
        try:
            cli.wait_ready(timeout=conns * (packets * interval + 1.0) + 60)
            flows = lab.ctl("flows")["flows"]
        finally:
            cli.stop()
        recs = cli.result(timeout=60)
    finally:
        srv.stop()
        srv.result(timeout=30)
    fast: dict[int, int] = {}
    for f in flows:
        m = f["match"]
        if m["proto"] == 6 and m["dport"] == PORT and m["src"] == src:
            fast[m["sport"]] = int(f["packets"])
    lat, lower, excluded, censored, widened, slow_pkts = [], [], 0, 0, 0, []
    for r in recs:
        extra = r["segs_out"] - (packets + 2)
        if extra < 0:  # segments merged: counts no longer map to send times
            excluded += 1
            continue
        k = fast.get(r["sport"], 0)
        # ``extra`` segments (tail-loss probes, retransmissions) may have
        # been among the k fast ones: assume they all were, which moves the
        # first fast data segment later, never earlier (an upper bound).
        j = packets - k + extra
        widened += extra > 0
        if k == 0 or j >= packets:
            censored += 1
            lat.append(math.inf)
            continue
        slow_pkts.append(j)
        lat.append((r["sends"][j] - r["t_hs"]) * 1e3)
        j_lo = packets - k  # the optimistic reading, for the lower bound
        lower.append(((r["sends"][j_lo - 1] - r["t_hs"]) * 1e3) if j_lo > 0 else 0.0)
    window = packets * interval * 1e3
    return {
        "conns": conns, "measured": len(lat), "excluded": excluded, "censored": censored,
        "widened": widened,
        "packets_per_conn": packets, "interval_ms": interval * 1e3, "window_ms": window,
        "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "p50_lower_ms": percentile(lower, 50), "p99_lower_ms": percentile(lower, 99),
        "slow_path_segments_p50": percentile(slow_pkts, 50),
        "slow_path_segments_max": max(slow_pkts) if slow_pkts else None,
        "latencies_ms": [round(x, 4) if math.isfinite(x) else None for x in lat],
    }
