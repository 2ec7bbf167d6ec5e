"""``ctxdp demo``: watch connections move from the slow path to XDP and age out.

Contract: ``main(argv) -> int``. Needs root and bpffs (``scripts/demo.sh``
sets both up). It builds a ``NetnsLab`` (client -- router -- server
namespaces), starts the real daemon on the router with XDP on both ports,
runs a TCP transfer and a UDP request/response flow through it with the
lab scenarios (``ctxdp.lab.scenarios``), and prints, live, what the daemon
reports: each connection entering conntrack through the slow path, the
moment it is offloaded, fast-path counters rising, the TCP close handing it
back to the slow path, and the idle UDP flow aging out of conntrack and the
XDP map. Everything is torn down on every exit path (also Ctrl-C and
SIGTERM), and the teardown is verified.

Exit status: 0 only if every scenario assertion held (offload observed,
fast-path packets counted, slow path quiet while offloaded, integrity,
aging) and nothing was left behind; 1 with the reason otherwise; 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "demo_config"]

_T0 = time.monotonic()


def _say(msg: str = "", *, stamp: bool = True) -> None:
    if stamp:
        msg = f"[{time.monotonic() - _T0:5.1f}s] {msg}"
    print(msg, flush=True)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _n(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, int | float) else "?"


def demo_config(lab: Any, *, udp_timeout: float, nat: bool) -> dict[str, Any]:
    """The demo's daemon config: allow-all policy, optional masquerade, short timeouts."""
    return lab.config(
        aging_interval=1.0,
        nat=[{"type": "masquerade", "out_port": lab.port("server")}] if nat else (),
        # Short timeouts so aging and the TCP close are visible within seconds.
        timeouts={
            "udp_first": udp_timeout, "udp_multiple": udp_timeout, "udp_bidir": udp_timeout,
            "tcp_closing": 3.0, "tcp_fin_wait": 3.0, "tcp_closed": 3.0,
        },
    )


class _Printer:
    """Scenario observer: one readable line per thing a person wants to see."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab

    def __call__(self, event: str, d: dict[str, Any]) -> None:
        from ctxdp.lab.scenarios import conn_label

        label = conn_label(d.get("conn")) if d.get("conn") else None
        tcp = d.get("proto") == 6
        if event == "connected":
            _say(f"client {d['local'][0]} port {d['local'][1]} connected to "
                 f"{d['dst']} port {d['dport']}")
        elif event == "seen":
            _say(f"slow path: {label} entered conntrack, state {d['conn'].get('state')}, "
                 f"{d['slow_pkts']} packets handled in Python so far")
        elif event == "offloaded":
            what = "the handshake" if tcp else "the first reply"
            _say(f"OFFLOADED {label} to XDP {d['after_s']:.2f}s after {what} "
                 f"(both directions written to the fast-path map)")
        elif event == "settled":
            if d["phase"] in ("handshake", "first exchange"):
                _say(f"  slow path has handled exactly {d['slow_pkts']} packets of it so far")
            else:
                fp = d.get("fast_pkts") or [0, 0]
                _say(f"  after the {d['phase']}: fast path forwarded {_n(fp[0])} + {_n(fp[1])} "
                     f"packets; slow path still exactly {d['slow_pkts']}")
        elif event == "progress":
            fp, fb = d["fast_pkts"], d["fast_bytes"]
            rate = f", {_n(d['fast_pps'])} pkt/s" if d.get("fast_pps") else ""
            extra = (f", conntrack expires in {d['expires_in']:.1f}s (kept fresh by XDP)"
                     if not tcp and d.get("expires_in") is not None else "")
            _say(f"  fast path: {_n(fp[0])} -> / {_n(fp[1])} <- packets "
                 f"({_mb(fb[0] + fb[1])}{rate}); router slow path forwarded "
                 f"{_n(d.get('slow_forwarded_total'))} packets in total{extra}")
        elif event == "sent":
            if tcp:
                _say(f"sender done: {_mb(d['bytes'])} in {d['seconds']:.1f}s")
            else:
                _say(f"requester done: {d['replies']}/{d['sent']} replies over "
                     f"{d['seconds']:.1f}s (longer than the {self.lab.timeout('udp_bidir'):g}s "
                     f"UDP timeout)")
        elif event == "withdrawn":
            _say(f"FIN: {label} back to the slow path, offload withdrawn, "
                 f"conntrack {d['state']}")
        elif event == "gone":
            _say(f"{label} left conntrack {d['after_s']:.1f}s after closing")
        elif event == "idle":
            exp = d["expires_in"]
            when = (f"expires in {exp:.1f}s" if exp >= 0
                    else "expired, removed at the next aging pass")
            _say(f"  idle {d['idle_s']:.1f}s: {label} still in conntrack, {when}")
        elif event == "aged":
            _say(f"AGED OUT {label}: gone from conntrack and the XDP map after "
                 f"{d['idle_s']:.1f}s idle (timeout {d['timeout']:g}s)")


def _xdp_progs(lab: Any) -> dict[str, str]:
    """Router port -> attached XDP mode/program id, as the kernel reports it."""
    import json

    out = {}
    for link in json.loads(lab.router.exec(["ip", "-d", "-j", "link", "show"])):
        xdp = link.get("xdp")
        if xdp:
            mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("mode"), "?")
            out[link["ifname"]] = f"{mode} prog {xdp.get('prog', {}).get('id', '?')}"
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxdp demo", description=__doc__.split("\n")[0])
    p.add_argument("--family", type=int, choices=(4, 6), default=4, help="IP version")
    p.add_argument("--nat", action="store_true",
                   help="masquerade on the server-side port (the server sees the router)")
    p.add_argument("--mbytes", type=float, default=16.0, help="TCP transfer size (MB)")
    p.add_argument("--rate-mbps", type=float, default=40.0, help="TCP sending rate")
    p.add_argument("--udp-timeout", type=float, default=4.0,
                   help="conntrack UDP timeout (s), i.e. how soon the idle flow ages")
    return p


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind through the lab's teardown


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0)
    if os.geteuid() != 0:
        print("ctxdp demo: needs root (it creates network namespaces and attaches XDP); "
              "run: sudo ./scripts/demo.sh", file=sys.stderr)
        return 1
    if not os.path.ismount("/sys/fs/bpf"):
        print("ctxdp demo: bpffs is not mounted on /sys/fs/bpf; run scripts/setup.sh "
              "(or: mount -t bpf bpf /sys/fs/bpf)", file=sys.stderr)
        return 1
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace) -> int:
    from ctxdp.lab import scenarios
    from ctxdp.lab.hosts import HostError, LabError
    from ctxdp.lab.netns import NetnsLab

    global _T0
    _T0 = time.monotonic()
    fam = args.family
    results: dict[str, Any] = {}
    failure = None
    lab = NetnsLab()
    try:
        with lab:
            c, s = lab.links["client"], lab.links["server"]
            _say(f"ctxdp demo (lab {lab.uid}): client {c.host_addr(fam)} --[{c.port} router "
                 f"{s.port}]-- server {s.host_addr(fam)}, IPv{fam}"
                 + (", masquerade on " + s.port if args.nat else ""))
            _say(f"network namespaces {', '.join(lab.topo.names)} built")
            lab.start_daemon(demo_config(lab, udp_timeout=args.udp_timeout, nat=args.nat))
            progs = _xdp_progs(lab)
            _say("ctxdp running on the router; XDP attached: "
                 + ", ".join(f"{k} ({v})" for k, v in sorted(progs.items())))
            if sorted(progs) != sorted(ln.port for ln in lab.links.values()):
                raise AssertionError(f"XDP not attached to every router port: {progs}")
            _say(f"(inspect it yourself meanwhile: ctxdp --socket {lab.socket_path} flows)")
            printer = _Printer(lab)

            nbytes = int(args.mbytes * 1e6)
            _say()
            _say(f"== TCP: {_mb(nbytes)} from client to server at {args.rate_mbps:g} Mbit/s")
            results["tcp"] = scenarios.tcp_transfer(
                lab, family=fam, nbytes=nbytes, rate_mbps=args.rate_mbps, wait_gone=True,
                expect_peer=lab.router_addr("server", fam) if args.nat else None,
                observe=printer, timeout=max(60.0, nbytes * 8 / args.rate_mbps / 1e6 * 3),
            )
            t = results["tcp"]
            _say(f"integrity: the server received {_mb(t['bytes'])} with the sender's sha256 "
                 f"{t['sha256'][:16]}... (source seen: {t['peer_seen']})")

            _say()
            _say(f"== UDP: request/response every 0.1s, then idle (timeout {args.udp_timeout:g}s)")
            results["udp"] = scenarios.udp_offload_and_age(lab, family=fam, observe=printer)
            _say()
    except AssertionError as exc:
        failure = f"check failed: {exc}"
    except KeyboardInterrupt:
        failure = "interrupted"
    except (LabError, HostError, OSError) as exc:
        failure = f"lab error: {exc}"
    left = lab.leftovers() if lab._built else []
    _say("cleaned up: daemon stopped, namespaces deleted"
         + (f"; LEFT BEHIND: {left}" if left else ", nothing left behind"))
    if failure is None and left:
        failure = f"teardown left {left}"
    if failure is not None:
        _say(f"RESULT: FAIL - {failure}")
        return 1
    t, u = results["tcp"], results["udp"]
    _say(f"RESULT: PASS - TCP offloaded {t['offloaded_after_s']:.2f}s after the handshake, "
         f"{_n(sum(t['fast_pkts']))} packets forwarded by XDP vs {t['slow_pkts_after_data']} "
         f"in the slow path, integrity ok; UDP offloaded after the reply, "
         f"{_n(sum(u['fast_pkts']))} packets by XDP, aged out after "
         f"{u['aged_after_idle_s']:.1f}s idle")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
