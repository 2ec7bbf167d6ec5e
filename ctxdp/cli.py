"""The ``ctxdp`` command: run the daemon, or talk to it over the control socket.

Contract: ``main(argv=None) -> int``. Exit codes: 0 success, 2 bad usage or
a bad config (one line on stderr naming the argument or field), 1 runtime
failure (``ctxdp: cannot reach daemon at PATH: <reason>``, an error response).
Heavy modules are imported lazily: ``run`` imports ``ctxdp.daemon.run_daemon``
and ``demo`` imports ``ctxdp.demo.main`` only when invoked, so the client
commands work without bcc or pyroute2.

Commands and the control requests they send (``{"cmd": C, "args": A}``):

| CLI | cmd | args | result |
| --- | --- | --- | --- |
| ``conntrack [--zone Z]`` | ``conntrack`` | ``{"zone": Z}`` (optional) | ``{"conns": [ConnRow]}`` |
| ``flows`` | ``flows`` | ``{}`` | ``{"flows": [FlowRow]}`` |
| ``stats`` | ``stats`` | ``{}`` | ``Stats`` |
| ``flush [--zone Z]`` | ``flush`` | ``{"zone": Z}`` (optional) | ``{"flushed": n}`` |
| ``reload`` | ``reload`` | ``{}`` | ``{"withdrawn": n, ...}`` |
| ``offload enable|disable`` | ``offload`` | ``{"enabled": bool}`` | ``{"enabled": bool, ...}`` |

Row schemas the daemon returns (addresses are text, e.g. ``"10.0.0.1"`` or
``"fd00::1"``; extra keys are allowed and shown by ``--json`` only):

ConnRow::

    {"zone": 0, "proto": 6, "state": "ESTABLISHED",
     "orig":  {"src": "10.0.0.2", "dst": "10.1.0.2", "sport": 40000, "dport": 80},
     "reply": {"src": "10.1.0.2", "dst": "192.0.2.1", "sport": 80, "dport": 40000},
     "offloaded": true, "packets": [orig, reply], "bytes": [orig, reply],
     "expires_in": 431999.2, "mark": 0}

  (``reply`` is the reply tuple after NAT; ICMP echo ids are ``sport``/``dport``.)

FlowRow (one per offloaded direction)::

    {"zone": 0, "provider": "xdp",
     "in_ifname": "lan0", "in_ifindex": 3,
     "match": {"family": 4, "proto": 6, "src": ..., "dst": ..., "sport": .., "dport": ..},
     "out": {... same keys: the tuple written to the packet, after NAT ...},
     "out_ifname": "wan0", "out_ifindex": 4,
     "nat": "snat" | "dnat" | "snat+dnat" | null,
     "packets": 120, "bytes": 170000, "last_used_ago": 0.21 | null}

Stats (sections may carry more keys; they are printed generically)::

    {"slow_path": {"pps": 12.5, "packets": 1000, "bytes": ..., "dropped": {reason: n}},
     "fast_path": {"hits": n, "misses": n, "punts": {reason: n}, "redirect_errors": n},
     "offload":   {"enabled": true, "adds": n, "dels": n, "failures": {errno_name: n},
                   "pending": n, "offloaded": n},
     "maps":      {"flows_used": n, "flows_max": n},
     "conntrack": {"conns": n, ...},
     "process":   {"cpu_percent": 3.2, "rss_bytes": 41943040}}
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ctxdp.config import DEFAULT_CONTROL_SOCKET, ConfigError, load_config, proto_name

__all__ = ["format_conntrack", "format_flows", "format_result", "format_stats", "main"]

PROG = "ctxdp"
SOCKET_ENV = "CTXDP_SOCKET"
_ICMP = (1, 58)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _zone(s: str) -> int:
    try:
        z = int(s, 10)
    except ValueError:
        z = -1
    if not 0 <= z <= 65535:
        raise argparse.ArgumentTypeError(f"expected an integer 0..65535, got {s!r}")
    return z


def _build_parser() -> _Parser:
    p = _Parser(prog=PROG, description="Connection tracking with an XDP fast path.")
    p.add_argument(
        "--socket", metavar="PATH",
        help=f"control socket (default: ${SOCKET_ENV} or {DEFAULT_CONTROL_SOCKET})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", "-c", required=True, metavar="FILE")
    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("--config", "-c", required=True, metavar="FILE")

    ct = sub.add_parser("conntrack", help="list tracked connections (like conntrack -L)")
    ct.add_argument("--zone", type=_zone, metavar="Z")
    ct.add_argument("--json", action="store_true", help="print the raw JSON result")
    fl = sub.add_parser("flows", help="list offloaded fast-path entries")
    fl.add_argument("--json", action="store_true")
    st = sub.add_parser("stats", help="slow path, fast path, offload and process statistics")
    st.add_argument("--json", action="store_true")
    fu = sub.add_parser("flush", help="delete tracked connections (and their offloads)")
    fu.add_argument("--zone", type=_zone, metavar="Z")
    sub.add_parser("reload", help="re-read the config; withdraw flows it no longer admits")
    of = sub.add_parser("offload", help="switch the fast path on or off")
    of.add_argument("state", choices=("enable", "disable"))
    # Arguments after ``demo`` belong to the demo itself (see main()).
    sub.add_parser(
        "demo", add_help=False, help="build a namespace topology and show offload live"
    )
    return p


# --------------------------------------------------------------------------
# Formatters (pure: dict in, text out)
# --------------------------------------------------------------------------


def _hostport(addr: Any, port: Any) -> str:
    a = str(addr)
    try:
        if ipaddress.ip_address(a).version == 6:
            a = f"[{a}]"
    except ValueError:
        pass
    return f"{a}:{port}"


def _dir(t: dict[str, Any], proto: int, packets: Any = None, nbytes: Any = None) -> str:
    parts = [f"src={t.get('src', '?')}", f"dst={t.get('dst', '?')}"]
    if proto in _ICMP:
        parts.append(f"id={t.get('sport', 0)}")
    elif t.get("sport") or t.get("dport"):
        parts += [f"sport={t.get('sport', 0)}", f"dport={t.get('dport', 0)}"]
    if packets is not None:
        parts += [f"packets={packets}", f"bytes={nbytes}"]
    return " ".join(parts)


def _pair(v: Any, i: int) -> Any:
    if isinstance(v, list | tuple) and len(v) > i:
        return v[i]
    return 0


def format_conntrack(result: Any) -> str:
    """``conntrack -L``-style lines, one per connection."""
    rows = result.get("conns", []) if isinstance(result, dict) else list(result or [])
    lines = []
    for r in rows:
        proto = int(r.get("proto", 0))
        exp = r.get("expires_in")
        head = [f"{proto_name(proto):<8}", f"{proto:<2}", "-" if exp is None else str(int(exp))]
        if r.get("state"):
            head.append(str(r["state"]))
        pk, by = r.get("packets"), r.get("bytes")
        body = [
            _dir(r.get("orig", {}), proto, _pair(pk, 0), _pair(by, 0)),
            _dir(r.get("reply", {}), proto, _pair(pk, 1), _pair(by, 1)),
        ]
        tail = ["[OFFLOADED]"] if r.get("offloaded") else []
        tail += [f"mark={r.get('mark', 0)}", f"zone={r.get('zone', 0)}"]
        lines.append(" ".join(head + body + tail))
    lines.append(f"{PROG}: {len(rows)} flow entries have been shown.")
    return "\n".join(lines)


def _age(v: Any) -> str:
    if v is None:
        return "never"
    return f"{float(v):.2f}s ago"


def _ends(t: dict[str, Any], proto: int) -> str:
    if proto in _ICMP:
        return f"{t.get('src')} > {t.get('dst')} id={t.get('sport', 0)}"
    src = _hostport(t.get("src"), t.get("sport", 0))
    return f"{src} > {_hostport(t.get('dst'), t.get('dport', 0))}"


def format_flows(result: Any) -> str:
    """One line per offloaded direction: ingress, match, rewrite, egress, counters."""
    rows = result.get("flows", []) if isinstance(result, dict) else list(result or [])
    lines = []
    for r in rows:
        m, o = r.get("match", {}), r.get("out") or r.get("match", {})
        proto = int(m.get("proto", 0))
        in_if = r.get("in_ifname") or f"if{r.get('in_ifindex', '?')}"
        out_if = r.get("out_ifname") or f"if{r.get('out_ifindex', '?')}"

        parts = [f"in={in_if}", proto_name(proto), _ends(m, proto)]
        if o != m:
            parts.append(f"rewrite={_ends(o, proto)}")
        if r.get("nat"):
            parts.append(f"nat={r['nat']}")
        parts += [
            f"out={out_if}", f"zone={r.get('zone', 0)}",
            f"packets={r.get('packets', 0)}", f"bytes={r.get('bytes', 0)}",
            f"used={_age(r.get('last_used_ago'))}",
        ]
        if r.get("provider"):
            parts.append(f"provider={r['provider']}")
        lines.append(" ".join(parts))
    lines.append(f"{PROG}: {len(rows)} offloaded entries.")
    return "\n".join(lines)


_STATS_ORDER = ("slow_path", "fast_path", "offload", "maps", "conntrack", "process")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _scalar(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        s = f"{v:.2f}"
    elif v is None:
        s = "-"
    elif isinstance(v, list | tuple):
        s = ", ".join(str(x) for x in v) or "-"
    else:
        s = str(v)
    if key.endswith("bytes") and isinstance(v, int | float) and not isinstance(v, bool):
        s += f" ({_human_bytes(v)})"
    return s


def _tree(d: dict[str, Any], indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for k, v in d.items():
        if isinstance(v, dict):
            if not v:
                out.append(f"{pad}{k}: -")
                continue
            out.append(f"{pad}{k}:")
            _tree(v, indent + 1, out)
        else:
            out.append(f"{pad}{k}: {_scalar(str(k), v)}")


def format_stats(stats: dict[str, Any]) -> str:
    """Indented sections in schema order, then any extra sections."""
    ordered = {k: stats[k] for k in _STATS_ORDER if k in stats}
    ordered.update({k: v for k, v in stats.items() if k not in ordered})
    out: list[str] = []
    _tree(ordered, 0, out)
    return "\n".join(out)


def format_result(cmd: str, result: Any) -> str:
    """Short human summary of flush/reload/offload results."""
    if cmd == "flush" and isinstance(result, dict) and "flushed" in result:
        return f"flushed {result['flushed']} connections"
    if cmd == "offload" and isinstance(result, dict) and "enabled" in result:
        extra = {k: v for k, v in result.items() if k != "enabled"}
        tail = "".join(f" {k}={_scalar(k, v)}" for k, v in extra.items())
        return f"offload {'enabled' if result['enabled'] else 'disabled'}{tail}"
    if isinstance(result, dict):
        body = " ".join(f"{k}={_scalar(k, v)}" for k, v in result.items())
        return f"{cmd}: {body}" if body else f"{cmd}: ok"
    return f"{cmd}: {'ok' if result in (None, True) else result}"


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"{PROG}: {' '.join(msg.split())}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        _err(f"{args.config}: {e}")
        return 2
    try:
        from ctxdp.daemon import run_daemon  # lazy: pulls in bcc and pyroute2
    except ImportError as e:
        _err(f"cannot start the daemon: {e}")
        return 1
    return int(run_daemon(cfg, args.config) or 0)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        _err(f"{args.config}: {e}")
        return 2
    print(
        f"{args.config}: ok ({len(cfg.ports)} ports, {len(cfg.dnat) + len(cfg.snat)} NAT rules, "
        f"{len(cfg.policy.rules)} policy rules)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ctxdp.demo import main as demo_main  # lazy: builds namespaces, needs root
    except ImportError as e:
        _err(f"demo not available: {e}")
        return 1
    return int(demo_main(list(args.demo_args)) or 0)


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    cmd = args.command
    if cmd in ("conntrack", "flush"):
        return cmd, ({"zone": args.zone} if args.zone is not None else {})
    if cmd == "offload":
        return "offload", {"enabled": args.state == "enable"}
    return cmd, {}


def _cmd_client(args: argparse.Namespace) -> int:
    from ctxdp.control import ControlClient, ControlError

    path = args.socket or os.environ.get(SOCKET_ENV) or DEFAULT_CONTROL_SOCKET
    cmd, req = _request(args)
    try:
        with ControlClient(path) as client:
            result = client.call(cmd, **req)
    except ControlError as e:
        _err(f"{cmd}: {e}")
        return 1
    except OSError as e:
        _err(f"cannot reach daemon at {path}: {e.strerror or e}")
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=False))
    elif cmd == "conntrack":
        print(format_conntrack(result))
    elif cmd == "flows":
        print(format_flows(result))
    elif cmd == "stats":
        print(format_stats(result if isinstance(result, dict) else {"result": result}))
    else:
        print(format_result(cmd, result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "demo":
            # Everything after "demo" goes to the demo, which parses it itself.
            at = next(
                i for i, a in enumerate(argv) if a == "demo" and (i == 0 or argv[i - 1] != "--socket")
            )
            args.demo_args = argv[at + 1 :]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except _UsageError as e:
        _err(str(e))
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "demo":
            return _cmd_demo(args)
        return _cmd_client(args)
    except BrokenPipeError:  # `ctxdp conntrack | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
