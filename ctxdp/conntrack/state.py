"""Conntrack state handoff across a daemon restart: export / import of connections.

Contract:
- ``export_conns(ct, conns) -> list[dict]``: one JSON-able row per live
  connection: zone, original and reply tuples, protocol state by name, TCP
  peer windows, NAT (the action and the chosen translation), mark, labels,
  counters, created / expiry times (CLOCK_MONOTONIC seconds, meaningful only
  on the same boot), whether a provider held it (``offloaded``) and, from the
  offload context, each direction's forwarding (``dirs``: ingress/egress
  ifindex, MACs, MTU, next hop). ``conn.ext["admit"]`` (a
  ``ctxdp.policy.AdmitInfo``) is exported too.
- ``import_conns(ct, rows, now, grace=0.0) -> list[Conn]`` rebuilds them and
  files them with ``ct.insert`` (observers see ``on_created``). Expired rows
  are dropped unless ``grace`` > 0, which keeps them ``grace`` seconds more:
  a connection the fast path carried while no daemon ran gets its expiry
  from the next aging read-back instead of being lost. TCP connections come
  back with sequence checking on and both windows to be re-learned
  (``ct.set_seq_check`` liberal mode), so their next packets are never
  judged against windows that moved while the fast path carried them. Each
  imported connection gets ``conn.ext[HANDOFF_KEY]`` = ``{"offloaded": bool,
  "dirs": [dict | None, dict | None]}`` (decoded: MACs and next hop as
  ``bytes``) for the daemon to re-offer it; the daemon pops it.
- Bad rows never raise: each is skipped and counted in ``skipped`` (by
  reason) when a dict is given; so are rows the tracker refuses (limits,
  collisions).
- ``write_state_file(path, rows, meta)`` writes atomically (temp file in the
  same directory, fsync, rename; mode 0600); ``read_state_file(path)`` returns
  ``(meta, rows)`` or raises ``StateError``.
- Pure apart from the two file functions: no clock, no kernel.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from ctxdp.conntrack.conn import F_EST_SEEN, Conn, TcpConn, pack_key
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.conntrack.nat import NatAction, NatInfo

__all__ = [
    "FORMAT",
    "HANDOFF_KEY",
    "StateError",
    "VERSION",
    "export_conns",
    "import_conns",
    "read_state_file",
    "write_state_file",
]

FORMAT = "ctxdp-conntrack-state"
VERSION = 1
#: ``conn.ext`` key under which an imported connection carries its handoff info.
HANDOFF_KEY = "handoff"
_ADMIT_KEY = "admit"  # ctxdp.datapath.forward.ADMIT_KEY (not imported: layering)
_MAX_FILE = 512 << 20  # 65536 conns are ~60 MB of JSON; refuse anything absurd
_TCP_FIELDS = ("lo", "hi", "mw", "ws", "st")
_M32 = 0xFFFFFFFF


class StateError(Exception):
    """The state file is missing, unreadable or not ours."""


class _Bad(Exception):
    """One row cannot be imported (the reason is the message)."""


# -- encoding ------------------------------------------------------------------


def _a(b: bytes) -> str:
    return str(ipaddress.ip_address(bytes(b)))


def _tuple(t: FlowTuple) -> list[Any]:
    return [_a(t.src), _a(t.dst), t.sport, t.dport]


def _action(a: Any) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"kind": a.kind, "addr_min": _a(a.addr_min),
            "addr_max": _a(a.addr_max) if a.addr_max is not None else None,
            "port_min": a.port_min, "port_max": a.port_max}


def _nat(info: NatInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"action": _action(info.action), "addr": _a(info.addr), "port": info.port,
            "oaddr": _a(info.oaddr), "oport": info.oport}


def _admit(info: Any) -> dict[str, Any] | None:
    if info is None:
        return None
    o = info.orig
    nat = info.nat
    return {
        "in_ifname": info.in_ifname, "out_ifname": info.out_ifname,
        "orig": [o.family, o.proto, *_tuple(o)],
        "nat": None if nat is None else {
            "dnat": _action(nat.dnat), "snat": _action(nat.snat),
            "dnat_rule": nat.dnat_rule, "snat_rule": nat.snat_rule},
    }


def _mac(m: bytes | None) -> str | None:
    return None if m is None else bytes(m).hex(":")


def _dirs(ctx: Any) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = [None, None]
    if ctx is None:
        return out
    nh = getattr(ctx, "nexthop", [None, None])
    for i, d in enumerate(ctx.dirs):
        if d is None:
            continue
        out[i] = {"in_ifindex": d.in_ifindex, "out_ifindex": d.out_ifindex,
                  "src_mac": _mac(d.src_mac), "dst_mac": _mac(d.dst_mac), "mtu": d.mtu,
                  "nexthop": _a(nh[i]) if nh[i] is not None else None}
    return out


def export_conns(ct: Any, conns: Iterable[Conn]) -> list[dict[str, Any]]:
    """Rows for the live connections among ``conns`` (see the module contract)."""
    rows = []
    for c in conns:
        if not c.alive:
            continue
        o, r = c.orig, c.reply
        ext = c.ext or {}
        ctx = ext.get("offload")
        row: dict[str, Any] = {
            "zone": c.zone, "family": o.family, "proto": o.proto,
            "orig": _tuple(o), "reply": _tuple(r),
            "state": c.state_name, "est_seen": bool(c._f & F_EST_SEEN),
            "created": c.created, "expires": c.expires,
            "mark": c.mark, "labels": c.labels,
            "pkts": list(c.pkts), "bytes": list(c.bytes),
            "nat": _nat(c.nat),
            "admit": _admit(ext.get(_ADMIT_KEY)),
            "offloaded": bool(ctx is not None and getattr(ctx, "held", None)),
            "dirs": _dirs(ctx),
        }
        if isinstance(c, TcpConn):
            row["tcp"] = [[getattr(c, f + str(i)) for f in _TCP_FIELDS] for i in (0, 1)]
        rows.append(row)
    return rows


# -- decoding ------------------------------------------------------------------


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"bad {what}")
    return v


def _family(v: Any) -> int:
    if v not in (4, 6) or type(v) is not int:
        raise _Bad("bad family")
    return v


def _num(v: Any, what: str) -> float:
    if type(v) not in (int, float) or v != v:  # NaN
        raise _Bad(f"bad {what}")
    return float(v)


def _addr(v: Any, family: int, what: str) -> bytes:
    try:
        b = ipaddress.ip_address(v).packed
    except (ValueError, TypeError):
        raise _Bad(f"bad {what}") from None
    if len(b) != (4 if family == 4 else 16):
        raise _Bad(f"{what} of the wrong family")
    return b


def _ft(v: Any, family: int, proto: int, what: str) -> FlowTuple:
    if not isinstance(v, list) or len(v) != 4:
        raise _Bad(f"bad {what}")
    return FlowTuple(family, proto, _addr(v[0], family, what), _addr(v[1], family, what),
                     _int(v[2], 0, 65535, what), _int(v[3], 0, 65535, what))


def _dec_action(v: Any, family: int) -> NatAction | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _Bad("bad nat action")
    try:
        return NatAction(
            kind=v["kind"], addr_min=_addr(v["addr_min"], family, "nat addr"),
            addr_max=None if v.get("addr_max") is None
            else _addr(v["addr_max"], family, "nat addr"),
            port_min=_int(v.get("port_min", 0), 0, 65535, "nat port"),
            port_max=_int(v.get("port_max", 0), 0, 65535, "nat port"))
    except (KeyError, ValueError) as exc:
        raise _Bad(f"bad nat action: {exc}") from None


def _opt_port(v: Any) -> int | None:
    return None if v is None else _int(v, 0, 65535, "nat port")


def _dec_nat(v: Any, family: int) -> NatInfo | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _Bad("bad nat")
    action = _dec_action(v.get("action"), family)
    if action is None:
        raise _Bad("nat without action")
    return NatInfo(action, _addr(v.get("addr"), family, "nat addr"), _opt_port(v.get("port")),
                   _addr(v.get("oaddr"), family, "nat addr"), _opt_port(v.get("oport")))


def _dec_admit(v: Any) -> Any:
    if v is None:
        return None
    from ctxdp.policy import AdmitInfo, NatDecision  # lazy: policy needs ctxdp.config

    if not isinstance(v, dict) or not isinstance(v.get("in_ifname"), str):
        raise _Bad("bad admit")
    o = v.get("orig")
    if not isinstance(o, list) or len(o) != 6:
        raise _Bad("bad admit tuple")
    fam = _family(o[0])
    orig = _ft(o[2:], fam, _int(o[1], 0, 255, "admit proto"), "admit tuple")
    out = v.get("out_ifname")
    if out is not None and not isinstance(out, str):
        raise _Bad("bad admit out_ifname")
    nat = v.get("nat")
    dec = None
    if nat is not None:
        if not isinstance(nat, dict):
            raise _Bad("bad admit nat")
        rules = [nat.get("dnat_rule"), nat.get("snat_rule")]
        if any(x is not None and type(x) is not int for x in rules):
            raise _Bad("bad admit nat rule")
        dec = NatDecision(_dec_action(nat.get("dnat"), fam), _dec_action(nat.get("snat"), fam),
                          rules[0], rules[1])
    return AdmitInfo(v["in_ifname"], out, orig, dec)


def _dec_mac(v: Any) -> bytes | None:
    if v is None:
        return None
    try:
        b = bytes.fromhex(str(v).replace(":", ""))
    except ValueError:
        raise _Bad("bad mac") from None
    if len(b) != 6:
        raise _Bad("bad mac")
    return b


def _dec_dirs(v: Any, family: int) -> list[dict[str, Any] | None]:
    if not isinstance(v, list) or len(v) != 2:
        raise _Bad("bad dirs")
    out: list[dict[str, Any] | None] = [None, None]
    for i, d in enumerate(v):
        if d is None:
            continue
        if not isinstance(d, dict):
            raise _Bad("bad dir")
        nh = d.get("nexthop")
        out[i] = {
            "in_ifindex": _int(d.get("in_ifindex"), 1, 2**31 - 1, "ifindex"),
            "out_ifindex": _int(d.get("out_ifindex"), 1, 2**31 - 1, "ifindex"),
            "src_mac": _dec_mac(d.get("src_mac")), "dst_mac": _dec_mac(d.get("dst_mac")),
            "mtu": _int(d.get("mtu"), 68, 65535, "mtu"),
            "nexthop": None if nh is None else _addr(nh, family, "nexthop"),
        }
    return out


def _build(ct: Any, row: Any) -> Conn:
    if not isinstance(row, dict):
        raise _Bad("row is not an object")
    family = _family(row.get("family"))
    proto = _int(row.get("proto"), 0, 255, "proto")
    zone = _int(row.get("zone"), 0, 65535, "zone")
    orig = _ft(row.get("orig"), family, proto, "orig")
    reply = _ft(row.get("reply"), family, proto, "reply")
    h = ct.handlers.get(proto, ct.default_handler)
    try:
        pstate = h.states.index(row.get("state"))
    except ValueError:
        raise _Bad("unknown state") from None
    created = _num(row.get("created"), "created")
    conn = h.conn_class(h, created)
    conn.key = pack_key(zone, proto, orig.src, orig.dst, orig.sport, orig.dport)
    conn.rkey = pack_key(zone, proto, reply.src, reply.dst, reply.sport, reply.dport)
    conn.pstate = pstate
    conn.expires = _num(row.get("expires"), "expires")
    conn.mark = _int(row.get("mark", 0), 0, _M32, "mark")
    conn.labels = _int(row.get("labels", 0), 0, (1 << 128) - 1, "labels")
    for name in ("pkts", "bytes"):
        v = row.get(name, [0, 0])
        if not isinstance(v, list) or len(v) != 2:
            raise _Bad(f"bad {name}")
        setattr(conn, name, [_int(x, 0, 2**64 - 1, name) for x in v])
    conn.nat = _dec_nat(row.get("nat"), family)
    if row.get("est_seen"):
        conn._f |= F_EST_SEEN
    if isinstance(conn, TcpConn):
        peers = row.get("tcp")
        if not isinstance(peers, list) or len(peers) != 2:
            raise _Bad("tcp connection without peer state")
        for i, p in enumerate(peers):
            if not isinstance(p, list) or len(p) != 5:
                raise _Bad("bad tcp peer state")
            lo, hi, mw, ws, st = p
            setattr(conn, f"lo{i}", _int(lo, 0, _M32, "tcp seq"))
            setattr(conn, f"hi{i}", _int(hi, 0, _M32, "tcp seq"))
            setattr(conn, f"mw{i}", _int(mw, 0, 1 << 31, "tcp window"))
            setattr(conn, f"ws{i}", _int(ws, 0, 255, "tcp wscale"))
            setattr(conn, f"st{i}", _int(st, 0, 10, "tcp peer state"))
    admit = _dec_admit(row.get("admit"))
    ext = conn.ext_dict()
    if admit is not None:
        ext[_ADMIT_KEY] = admit
    ext[HANDOFF_KEY] = {"offloaded": bool(row.get("offloaded")),
                        "dirs": _dec_dirs(row.get("dirs", [None, None]), family)}
    return conn


def import_conns(ct: Any, rows: Iterable[Any], now: float, *, grace: float = 0.0,
                 skipped: dict[str, int] | None = None) -> list[Conn]:
    """Rebuild ``rows`` into ``ct`` (see the module contract); the connections filed."""
    out: list[Conn] = []

    def skip(reason: str) -> None:
        if skipped is not None:
            skipped[reason] = skipped.get(reason, 0) + 1

    for row in rows:
        try:
            conn = _build(ct, row)
        except _Bad as exc:
            skip(str(exc))
            continue
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            skip("bad row")
            continue
        if conn.expires <= now:
            if grace <= 0:
                skip("expired")
                continue
            conn.expires = now + grace
        if isinstance(conn, TcpConn):
            # Windows moved while the fast path carried the flow: re-learn
            # them from the next packet of each peer (liberal, never invalid).
            conn.seq_check = False
            ct.set_seq_check(conn, True)
        why = ct.insert(conn, now)
        if why:
            skip(why)
            continue
        out.append(conn)
    return out


# -- the file --------------------------------------------------------------------


def write_state_file(path: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write the state atomically, readable by root only (OSError on failure)."""
    doc = {"format": FORMAT, "version": VERSION, "meta": meta, "conns": rows}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_state_file(path: str) -> tuple[dict[str, Any], list[Any]]:
    """``(meta, rows)`` of a state file; StateError if absent or not ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise StateError(f"no state file {path}") from None
    except OSError as exc:
        raise StateError(f"reading {path}: {exc}") from exc
    if len(raw) > _MAX_FILE:
        raise StateError(f"{path} is larger than {_MAX_FILE} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise StateError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{path} is not a ctxdp state file")
    if doc.get("version") != VERSION:
        raise StateError(f"{path} has version {doc.get('version')!r}, expected {VERSION}")
    meta, rows = doc.get("meta"), doc.get("conns")
    if not isinstance(meta, dict) or not isinstance(rows, list):
        raise StateError(f"{path} is malformed")
    return meta, rows
