"""Slow-path conntrack benchmark: packets/s and bytes of memory per connection.

Contract: prints one table. Throughput rows (one core, same run):
  * baselines: packed-key build + dict lookup (the floor of any table), and
    ``ctxdp.packet.parse`` alone;
  * established TCP: ``execute`` on pre-parsed packets, and parse + execute,
    over many established connections, alternating directions with valid,
    advancing seq/ack (every result is checked to be +est);
  * new connections: parse + execute(commit=True) of SYNs, with and without
    SNAT.
Memory rows: RSS growth (psutil) per established connection at 100k and 1M
connections, each measured in a fresh child process so freed arenas of an
earlier run cannot hide growth; a baseline row shows the floor of two dict
entries with packed keys per connection. Frames are built once from a
template and patched with struct (checksums are not maintained: conntrack
does not verify them).

Usage: python bench/conntrack.py [--quick] [--mem 100000,1000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ctxdp.conntrack import CS, ConnTracker, CtConfig, NatAction  # noqa: E402
from ctxdp.conntrack.conn import KEY4  # noqa: E402
from ctxdp.packet import parse  # noqa: E402

ETH = bytes.fromhex("020000000002" "020000000001" "0800")
SYN, ACK, PSH = 0x02, 0x10, 0x08
SERVER = bytes([10, 200, 0, 1])


def tcp_frame(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int,
              payload: int = 0, win: int = 64000) -> bytearray:
    """Ethernet/IPv4/TCP frame (no options), checksums left zero."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + payload, 0, 0x4000, 64, 6, 0, src, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, win, 0, 0)
    return bytearray(ETH + ip + tcp + b"d" * payload)


def server_addr(i: int) -> bytes:
    return bytes([10, 200, 0, 1 + i])


def client_addr(i: int) -> bytes:
    return (0x0A000000 + 0x10000 + i).to_bytes(4, "big")  # 10.1.0.0 + i


def handshake(ct: ConnTracker, i: int, isn_a: int, isn_b: int, now: float) -> None:
    a = client_addr(i)
    for f in (
        tcp_frame(a, SERVER, 40000, 80, SYN, isn_a, 0),
        tcp_frame(SERVER, a, 80, 40000, SYN | ACK, isn_b, isn_a + 1),
        tcp_frame(a, SERVER, 40000, 80, ACK, isn_a + 1, isn_b + 1),
    ):
        ct.execute(parse(f), 0, now, commit=True)


def established_frames(nconn: int, rounds: int, isn_a: int, isn_b: int) -> list[bytearray]:
    """rounds x nconn x (client data 100 B, server ack): valid advancing seq/ack."""
    frames = []
    sa = [isn_a + 1] * nconn
    for _ in range(rounds):
        for i in range(nconn):
            a = client_addr(i)
            frames.append(tcp_frame(a, SERVER, 40000, 80, PSH | ACK, sa[i], isn_b + 1, 100))
            sa[i] += 100
            frames.append(tcp_frame(SERVER, a, 80, 40000, ACK, isn_b + 1, sa[i], 0))
    return frames


def fresh_established(nconn: int, isn_a: int, isn_b: int) -> ConnTracker:
    ct = ConnTracker()
    for i in range(nconn):
        handshake(ct, i, isn_a, isn_b, 1.0)
    return ct


def timed(fn) -> float:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def bench_throughput(quick: bool) -> list[tuple[str, int, float, str]]:
    nconn = 1000
    rounds = 25 if quick else 100
    isn_a, isn_b = 1000, 5_000_000
    frames = established_frames(nconn, rounds, isn_a, isn_b)
    n = len(frames)
    rows: list[tuple[str, int, float, str]] = []

    parsed = [parse(f) for f in frames]
    ct0 = fresh_established(nconn, isn_a, isn_b)
    table = ct0._table  # the real table, for the dict-lookup floor
    pack = KEY4.pack

    def lookup_loop() -> None:
        get = table.get
        for p in parsed:
            get(pack(0, p.proto, p.src, p.dst, p.sport, p.dport))

    rows.append(("baseline: key pack + dict lookup", n, timed(lookup_loop), "pre-parsed"))

    def parse_loop() -> None:
        for f in frames:
            parse(f)

    rows.append(("baseline: parse only", n, timed(parse_loop), "ctxdp.packet.parse"))

    bad = [0]
    ct1 = fresh_established(nconn, isn_a, isn_b)

    def exec_loop() -> None:
        ex = ct1.execute
        nb = 0
        for p in parsed:
            if not ex(p, 0, 2.0).state & CS.EST:
                nb += 1
        bad[0] = nb

    rows.append(("established TCP: execute only", n, timed(exec_loop),
                 f"pre-parsed; non-est={bad[0]}"))

    ct2 = fresh_established(nconn, isn_a, isn_b)

    def full_loop() -> None:
        ex = ct2.execute
        nb = 0
        for f in frames:
            if not ex(parse(f), 0, 2.0).state & CS.EST:
                nb += 1
        bad[0] = nb

    rows.append(("established TCP: parse + execute", n, timed(full_loop),
                 f"{nconn} conns, both dirs; non-est={bad[0]}"))

    nsyn = 20_000 if quick else 100_000
    # Distinct source ports (and a new server every 50k clients): NAT keeps
    # the original port, as for most real clients.
    syns = [tcp_frame(client_addr(i), server_addr(i // 50_000), 10_000 + i % 50_000, 80, SYN,
                      1000, 0) for i in range(nsyn)]
    # Every client uses source port 40000 to one server: each SNAT after the
    # first must search the ephemeral range (up to ~30% full here).
    nsame = 20_000
    same = [tcp_frame(client_addr(i), SERVER, 40000, 80, SYN, 1000, 0) for i in range(nsame)]
    pub = NatAction("snat", bytes([203, 0, 113, 1]))
    for label, frames_, nat in (("new conns: SYN parse + commit", syns, None),
                                ("new conns: SYN parse + commit + SNAT", syns, pub),
                                ("new conns: + SNAT, port search", same, pub)):
        ct = ConnTracker()
        made = [0]

        def new_loop(ct=ct, nat=nat, made=made, frames_=frames_) -> None:
            ex = ct.execute
            for f in frames_:
                ex(parse(f), 0, 1.0, commit=True, nat=nat)
            made[0] = len(ct)

        rows.append((label, len(frames_), timed(new_loop), f"committed={made[0]}"))
        del ct
    return rows


# -- memory (child processes) ---------------------------------------------------


def mem_child(n: int, kind: str) -> dict:
    import psutil  # noqa: PLC0415 - only the memory child needs it

    proc = psutil.Process()
    gc.collect()
    t0 = time.perf_counter()
    if kind == "dict-floor":
        rss0 = proc.memory_info().rss
        d: dict[bytes, int] = {}
        for i in range(n):
            a = client_addr(i)
            d[KEY4.pack(0, 6, a, SERVER, 40000, 80)] = i
            d[KEY4.pack(0, 6, SERVER, a, 80, 40000)] = i
        gc.collect()
        rss1 = proc.memory_info().rss
        return {"n": n, "kind": kind, "delta": rss1 - rss0, "secs": time.perf_counter() - t0,
                "len": len(d) // 2}
    ct = ConnTracker(CtConfig(max_conns=0))
    # Reused frames patched per connection: nothing but the tracker keeps memory.
    f_syn = tcp_frame(client_addr(0), SERVER, 40000, 80, SYN, 1000, 0)
    f_sa = tcp_frame(SERVER, client_addr(0), 80, 40000, SYN | ACK, 5_000_000, 1001)
    f_da = tcp_frame(client_addr(0), SERVER, 40000, 80, PSH | ACK, 1001, 5_000_001, 1000)
    f_db = tcp_frame(SERVER, client_addr(0), 80, 40000, PSH | ACK, 5_000_001, 2001, 1000)
    rss0 = proc.memory_info().rss
    ex = ct.execute
    est = 0
    for i in range(n):
        a = client_addr(i)
        f_syn[26:30] = a
        f_sa[30:34] = a
        f_da[26:30] = a
        f_db[30:34] = a
        ex(parse(f_syn), 0, 1.0, commit=True)
        ex(parse(f_sa), 0, 1.0)
        ex(parse(f_da), 0, 1.0)
        if ex(parse(f_db), 0, 1.0).conn.established:
            est += 1
    gc.collect()
    rss1 = proc.memory_info().rss
    return {"n": n, "kind": kind, "delta": rss1 - rss0, "secs": time.perf_counter() - t0,
            "len": len(ct), "established": est}


def run_mem_child(n: int, kind: str) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--mem-child", str(n), "--kind", kind],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    ap.add_argument("--mem", default="100000,1000000", help="connection counts for memory rows")
    ap.add_argument("--mem-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="tracker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        print(json.dumps(mem_child(args.mem_child, args.kind)))
        return

    print(f"python {sys.version.split()[0]}, pid {os.getpid()}, one core (no threads)")
    print()
    print(f"{'throughput':44s} {'packets':>9s} {'pkts/s':>11s} {'ns/pkt':>8s}  notes")
    print("-" * 100)
    for label, n, secs, note in bench_throughput(args.quick):
        print(f"{label:44s} {n:9d} {n / secs:11,.0f} {secs / n * 1e9:8.0f}  {note}")
    print()
    print(f"{'memory (RSS growth, fresh process each)':44s} {'conns':>9s} {'bytes/conn':>11s}"
          f" {'secs':>8s}  notes")
    print("-" * 100)
    for n in [int(x) for x in args.mem.split(",") if x]:
        base = run_mem_child(n, "dict-floor")
        print(f"{'baseline: 2 dict entries, packed keys':44s} {n:9d}"
              f" {base['delta'] / n:11.0f} {base['secs']:8.1f}  floor of any 2-key table")
        r = run_mem_child(n, "tracker")
        print(f"{'tracker: established TCP conns':44s} {r['len']:9d} {r['delta'] / n:11.0f}"
              f" {r['secs']:8.1f}  4 pkts/conn; established={r['established']}")


if __name__ == "__main__":
    main()
