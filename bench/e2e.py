#!/usr/bin/env python3
"""End-to-end benchmarks of ctxdp against the real alternatives, in one run (root).

Contract: ``bench/e2e.py [--quick]`` builds a netns lab (client = generator,
router, server = sink; ``ctxdp.lab.netns.NetnsLab``), and measures, in this
order and in the same run:

1. Forwarding rate (bench/e2e_rate.py): in-kernel live-frame generator ->
   router -> XDP counting sink, for every case (IPv4 SNAT / IPv6, 64 B /
   1514 B frames, 1 / 1000 flows) and every system (bare XDP redirect =
   ceiling, ctxdp offloaded, ctxdp slow path, kernel + nf_conntrack + nft
   masquerade, Open vSwitch userspace datapath with ct()). Systems are
   interleaved per repetition; the table shows the median of ``--reps``.
2. Offload latency (bench/e2e_latency.py): handshake done -> first segment
   forwarded by XDP, p50/p99 over ``--latency-conns`` TCP connections.
3. Connection setup rate and aging cost (bench/e2e_scale.py): the real
   Daemon in the router namespace fed synthetic handshakes; setup rate with
   N offloaded connections present, and the daemon's aging tick over them.

It prints the tables and the verdict on each bar of issue 7, writes
``bench/out/e2e.json`` (every raw sample) and ``bench/out/e2e.png``, and on
every exit path (including SIGTERM/Ctrl-C) removes the namespaces, XDP
programs, pins, nft table and OVS processes it created, then checks that
nothing of the lab is left.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import e2e_progs as EP  # noqa: E402
import e2e_rate as R  # noqa: E402

OUT = BENCH / "out"
CEILING, OFFLOAD, SLOW, KERNEL = "xdp-redirect", "ctxdp-offload", "ctxdp-slow", "kernel-nft"
BARS = {"ceiling_ratio": 0.70, "kernel_factor": 4.0, "latency_p99_ms": 10.0, "aging_1m_s": 1.0}


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (1 rep, small sizes)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--duration", type=float, help="seconds counted per rate sample")
    ap.add_argument("--warmup", type=float, help="seconds before counting")
    ap.add_argument("--systems", default=",".join(R.SYSTEMS))
    ap.add_argument("--cases", default="all", help="all, or e.g. 4:64:1,6:1514:1000")
    ap.add_argument("--skip", default="", help="comma list of: rate,latency,scale")
    ap.add_argument("--latency-conns", type=int)
    ap.add_argument("--levels", help="present connections for the setup rate, e.g. 0,10000")
    ap.add_argument("--aging-at", help="connection counts for the aging pass")
    ap.add_argument("--sample", type=int, help="new connections timed per setup-rate point")
    ap.add_argument("--cpu", type=int, default=0, help="CPU the generator runs on (-1: any)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.duration = a.duration or (1.0 if q else 2.0)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if q else 0.5)
    a.latency_conns = a.latency_conns or (200 if q else 1000)
    a.levels = [int(x) for x in (a.levels or ("0,10000" if q else "0,10000,100000,1000000"))
                .split(",") if x != ""]
    a.aging_at = [int(x) for x in (a.aging_at or ("100000" if q else "100000,1000000"))
                  .split(",") if x != ""]
    a.sample = a.sample or (2000 if q else 10000)
    a.skip = {x for x in a.skip.split(",") if x}
    a.systems = [s for s in a.systems.split(",") if s]
    for s in a.systems:
        if s not in R.SYSTEMS:
            ap.error(f"unknown system {s!r}; known: {', '.join(R.SYSTEMS)}")
    if a.cases == "all":
        a.cases = list(R.CASES)
    else:
        a.cases = [R.Case(*map(int, c.split(":"))) for c in a.cases.split(",")]
    return a


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def run_rate(rig: R.Rig, a: argparse.Namespace, log: Any) -> dict[str, Any]:
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in a.systems}
    errors: dict[str, str] = {}
    for rep in range(a.reps):
        for name in a.systems:
            if name in errors:
                continue
            t = time.monotonic()
            try:
                with R.SYSTEMS[name](rig) as probe:
                    setup = time.monotonic() - t
                    for case in a.cases:
                        r = rig.measure(case, a.duration, a.warmup, probe)
                        samples[name].setdefault(case.label, []).append(r)
                        log(f"  rep {rep + 1}/{a.reps} {name:<14} {case.label:<18} "
                            f"{r['mpps']:7.3f} Mpps (offered {r['offered_mpps']:.3f}) {r['path']}")
                log(f"  {name}: set-up {setup:.1f} s")
            except Exception as exc:  # noqa: BLE001 - one system failing is a result
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                log(f"  {name}: NOT MEASURED: {errors[name]}")
    med = {s: {c: statistics.median(x["mpps"] for x in v) for c, v in cs.items()}
           for s, cs in samples.items()}
    cost = {s: {c: statistics.median(x["gen_ns_per_frame"] for x in v) for c, v in cs.items()}
            for s, cs in samples.items()}
    return {"samples": samples, "median_mpps": med, "median_chain_ns": cost, "errors": errors,
            "established": getattr(rig, "established", None),
            "cases": [c.label for c in a.cases], "systems": a.systems,
            "notes": {s: R.SYSTEM_NOTES[s] for s in a.systems}}


def run_latency(rig: R.Rig, a: argparse.Namespace) -> dict[str, Any]:
    from e2e_latency import offload_latency  # noqa: PLC0415

    lab = rig.lab
    lab.start_daemon(R.daemon_doc(rig, True))
    try:
        return offload_latency(lab, conns=a.latency_conns)
    finally:
        lab.stop_daemon()


def run_scale(rig: R.Rig, a: argparse.Namespace) -> dict[str, Any]:
    from e2e_scale import scale  # noqa: PLC0415

    return scale(rig.lab, rig.progs, a.levels, a.sample, a.aging_at)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}"


def verdicts(res: dict[str, Any]) -> dict[str, Any]:
    """Each bar of issue 7: the numbers it was judged on and pass/miss."""
    out: dict[str, Any] = {}
    rate = res.get("rate")
    if rate:
        med = rate["median_mpps"]
        ceil, off, ker = med.get(CEILING, {}), med.get(OFFLOAD, {}), med.get(KERNEL, {})
        cases = [c for c in rate["cases"] if c in off]
        if ceil and cases:
            ratios = {c: off[c] / ceil[c] for c in cases if ceil.get(c)}
            cost = rate.get("median_chain_ns", {})
            cc, co = cost.get(CEILING, {}), cost.get(OFFLOAD, {})
            out["offload_vs_ceiling"] = {
                "bar": f">= {BARS['ceiling_ratio']:.0%} of the ceiling in every case",
                "per_case": ratios, "min": min(ratios.values()),
                "met": all(r >= BARS["ceiling_ratio"] for r in ratios.values()),
                "cpu_cost_ratio_per_case": {c: cc[c] / co[c] for c in cases
                                            if cc.get(c) and co.get(c)}}
        if ker and cases:
            facs = {c: off[c] / ker[c] for c in cases if ker.get(c)}
            out["offload_vs_kernel"] = {
                "bar": f">= {BARS['kernel_factor']:.0f}x kernel+nf_conntrack+masquerade "
                       "in every case",
                "per_case": facs, "min": min(facs.values()),
                "met": all(f >= BARS["kernel_factor"] for f in facs.values())}
    lat = res.get("latency")
    if lat and "p99_ms" in lat:
        out["offload_latency_p99"] = {"bar": f"p99 <= {BARS['latency_p99_ms']} ms",
                                      "p99_ms": lat["p99_ms"],
                                      "met": lat["p99_ms"] <= BARS["latency_p99_ms"]}
    sc = res.get("scale")
    if sc:
        big = [x for x in sc.get("aging", []) if x["level"] >= 1_000_000]
        if big:
            x = big[-1]
            out["aging_1m"] = {"bar": f"daemon tick over 1M, worst case <= {BARS['aging_1m_s']} s",
                               "tick_wall_s": x["tick_wall_s"],
                               "cases_wall_s": {k: v["wall_s"] for k, v in x["cases"].items()},
                               "met": x["tick_wall_s"] <= BARS["aging_1m_s"]}
    return out


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    p = lines.append
    meta = res["meta"]
    p(f"ctxdp e2e bench  {meta['date']}  kernel {meta['kernel']}  {meta['cpus']} CPUs  "
      f"loadavg {meta['loadavg_end']}  ({meta['mode']})")
    rate = res.get("rate")
    if rate:
        med, systems = rate["median_mpps"], [s for s in rate["systems"]]
        p("")
        p(f"1. Forwarding rate, Mpps delivered to the sink (median of {meta['reps']}; "
          f"{meta['duration']} s windows; x = ratio to the {CEILING} ceiling)")
        head = f"{'case':<18}" + "".join(f"{s:>22}" for s in systems)
        p(head)
        for c in rate["cases"]:
            row = f"{c:<18}"
            ceil = med.get(CEILING, {}).get(c)
            for s in systems:
                v = med.get(s, {}).get(c)
                if v is None:
                    row += f"{'not measured':>22}"
                else:
                    x = f" ({v / ceil:.2f}x)" if ceil else ""
                    row += f"{_fmt(v) + x:>22}"
            p(row)
        for s, e in rate["errors"].items():
            p(f"  {s}: not measured: {e}")
        cost = rate.get("median_chain_ns", {})
        p("")
        p("1b. CPU cost of the in-line chain, ns per frame as the kernel timed the generator "
          "(generator + router + sink on one CPU; preemption by other tenants excluded; "
          "x = ceiling ns / system ns). Work on other threads (ctxdp-slow's Python loop, "
          "OVS's poller) is NOT in these figures: only the XDP/kernel systems compare here.")
        p(head)
        for c in rate["cases"]:
            row = f"{c:<18}"
            ceil = cost.get(CEILING, {}).get(c)
            for s in systems:
                v = cost.get(s, {}).get(c)
                x = f" ({ceil / v:.2f}x)" if v and ceil else ""
                row += f"{'-' if v is None else f'{v:.0f}{x}':>22}"
            p(row)
        for s in systems:
            p(f"  {s}: {rate['notes'][s]}")
    lat = res.get("latency")
    if lat:
        p("")
        if "error" in lat:
            p(f"2. Offload latency: not measured: {lat['error']}")
        else:
            p(f"2. Offload latency, handshake -> first XDP-forwarded segment, "
              f"{lat['measured']} of {lat['conns']} TCP connections "
              f"(excluded {lat['excluded']}, bound widened for probes/retransmits "
              f"{lat.get('widened', 0)}, not offloaded within {lat['window_ms']:.0f} ms: "
              f"{lat['censored']}; resolution {lat['interval_ms']} ms)")
            p(f"   p50 {_fmt(lat['p50_ms'])} ms   p99 {_fmt(lat['p99_ms'])} ms   "
              f"max {_fmt(lat['max_ms'])} ms   (lower bounds: p50 {_fmt(lat['p50_lower_ms'])}, "
              f"p99 {_fmt(lat['p99_lower_ms'])}); slow-path segments before offload: "
              f"median {lat['slow_path_segments_p50']}, max {lat['slow_path_segments_max']}")
    sc = res.get("scale")
    if sc:
        p("")
        if "error" in sc:
            p(f"3./4. Setup rate and aging: not measured: {sc['error']}")
        else:
            p("3. New TCP connections/s through the slow path (real Daemon, synthetic "
              "handshakes, each ending offloaded)")
            p(f"{'present (offloaded)':>20}{'shipped':>12}{'cached masq':>14}{'CPU/wall':>10}"
              f"{'RSS MB':>9}")
            by: dict[int, dict[str, Any]] = {}
            for x in sc["setup"]:
                by.setdefault(x["present"], {})[x["variant"]] = x
            for n, v in sorted(by.items()):
                s, c = v.get("shipped"), v.get("cached-masq-addr")
                p(f"{n:>20,}{_fmt(s and s['conns_per_s'], 0):>12}"
                  f"{_fmt(c and c['conns_per_s'], 0):>14}"
                  f"{_fmt(s and s['cpu_s'] / s['wall_s'], 2):>10}"
                  f"{_fmt((c or s)['rss_mb'], 0):>9}")
            p("")
            p("4. Aging: the daemon's tick (teardown flags, sweep of the connections due with "
              "the lazy re-arm, retries), median; wall / CPU in s")
            p("   busy: every slot restamped before the tick; idle: none; all-due: every "
              "connection due in this tick and re-armed from a fresh stamp")
            p(f"{'conns':>10}{'busy':>18}{'idle':>18}{'all-due':>18}{'first tick':>12}")
            for x in sc["aging"]:
                cs = x["cases"]
                cells = "".join(f"{cs[k]['wall_s']:>9.4f} /{cs[k]['cpu_s']:>7.3f}"
                                for k in ("busy", "idle", "all-due"))
                p(f"{x['conns']:>10,}{cells}{x['first_tick_wall_s']:>12.3f}")
    if rate and rate["median_mpps"].get(SLOW):
        v = rate["median_mpps"][SLOW]
        p("")
        p("Slow path's own forwarding rate (no bar): " + ", ".join(
            f"{c} {v[c] * 1e3:.0f} kpps" for c in rate["cases"] if c in v))
    p("")
    p("Bars (issue 7):")
    for name, v in res["verdicts"].items():
        detail = ""
        if "per_case" in v:
            worst = min(v["per_case"], key=v["per_case"].get)
            detail = f"min {v['min']:.2f} ({worst})"
        elif "p99_ms" in v:
            detail = f"p99 {_fmt(v['p99_ms'])} ms"
        elif "tick_wall_s" in v:
            detail = "tick " + ", ".join(f"{k} {t:.3f}" for k, t in v["cases_wall_s"].items())
            detail += " s"
        p(f"  {name:<22} {v['bar']:<58} {detail:<34} {'MET' if v['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    rate = res.get("rate")
    ax = axes[0][0]
    if rate:
        med = rate["median_mpps"]
        systems = [s for s in rate["systems"] if med.get(s)]
        n = max(len(systems), 1)
        for i, s in enumerate(systems):
            xs = [j + i / (n + 1) for j in range(len(rate["cases"]))]
            ax.bar(xs, [med[s].get(c, 0) for c in rate["cases"]], width=1 / (n + 1), label=s)
        ax.set_xticks([j + (n - 1) / (2 * (n + 1)) for j in range(len(rate["cases"]))])
        ax.set_xticklabels(rate["cases"], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Mpps")
        ax.set_title("forwarding rate (median)")
        top = max((v for s in systems for v in med[s].values()), default=1.0)
        ax.set_ylim(0, top * 1.35)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    lat = res.get("latency")
    ax = axes[0][1]
    if lat and lat.get("latencies_ms"):
        xs = sorted(x if x is not None else float("inf") for x in lat["latencies_ms"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step([x if math.isfinite(x) else lat["window_ms"] for x in xs], ys, where="post")
        ax.axvline(BARS["latency_p99_ms"], color="r", ls="--", label="bar p99 10 ms")
        ax.set_xlabel("ms from handshake to first XDP-forwarded segment")
        ax.set_ylabel("CDF")
        ax.set_title("offload latency")
        ax.legend(fontsize=8)
    sc = res.get("scale")
    if sc and "setup" in sc:
        ax = axes[1][0]
        for variant in ("shipped", "cached-masq-addr"):
            pts = [(max(x["present"], 1), x["conns_per_s"]) for x in sc["setup"]
                   if x["variant"] == variant]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=variant)
        ax.set_xscale("log")
        ax.set_xlabel("offloaded connections present (0 plotted at 1)")
        ax.set_ylabel("new connections / s")
        ax.set_title("slow-path connection setup rate")
        ax.legend(fontsize=8)
        ax = axes[1][1]
        pts = [(x["conns"], x["tick_wall_s"], x["tick_cpu_s"]) for x in sc.get("aging", [])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label="tick wall (worst case)")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="s",
                    label="tick CPU (worst case)")
            ax.axhline(BARS["aging_1m_s"], color="r", ls="--", label="bar 1 s @ 1M")
            ax.set_xscale("log")
            ax.set_xlabel("offloaded connections")
            ax.set_ylabel("seconds per aging pass")
            ax.set_title("aging cost")
            ax.legend(fontsize=8)
    fig.suptitle(f"ctxdp e2e bench {res['meta']['date']} kernel {res['meta']['kernel']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if os.geteuid() != 0:
        print("e2e: run as root (namespaces, XDP, bpffs)", file=sys.stderr)
        return 1
    from ctxdp.lab.netns import NetnsLab  # noqa: PLC0415

    signal.signal(signal.SIGTERM, _sigterm)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "kernel": platform.release(),
        "cpus": os.cpu_count(), "mode": "quick" if a.quick else "full", "reps": a.reps,
        "duration": a.duration, "warmup": a.warmup, "generator_cpu": a.cpu,
        "loadavg_start": " ".join(open("/proc/loadavg").read().split()[:3]),
    }}
    t0 = time.monotonic()
    progs = EP.Progs()
    leftovers: list[str] = []
    try:
        lab = NetnsLab()
        with lab:
            rig = R.Rig(lab, progs, cpu=a.cpu)
            try:
                if "rate" not in a.skip:
                    log("forwarding rate ...")
                    res["rate"] = run_rate(rig, a, log)
                if "latency" not in a.skip:
                    log("offload latency ...")
                    try:
                        res["latency"] = run_latency(rig, a)
                    except Exception as exc:  # noqa: BLE001 - reported, not hidden
                        res["latency"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                if "scale" not in a.skip:
                    log("setup rate and aging ...")
                    try:
                        res["scale"] = run_scale(rig, a)
                    except Exception as exc:  # noqa: BLE001
                        res["scale"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            finally:
                rig.close()
        leftovers = lab.leftovers()
    finally:
        progs.close()
    res["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    res["meta"]["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    res["meta"]["leftovers"] = leftovers
    res["verdicts"] = verdicts(res)
    text = report(res)
    print(text)
    res["table"] = text
    (out_dir / "e2e.json").write_text(json.dumps(res, indent=1, default=str))
    if not a.no_plot:
        plot(res, out_dir / "e2e.png")
    print(f"\nwrote {out_dir / 'e2e.json'}" + ("" if a.no_plot else f" and {out_dir / 'e2e.png'}")
          + f" in {res['meta']['seconds']} s" + (f"; LEFTOVERS: {leftovers}" if leftovers else ""))
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
