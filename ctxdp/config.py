"""Daemon configuration: TOML in, frozen typed dataclasses out.

Contract:
- ``load_config(path)`` reads TOML with ``tomllib``; ``parse_config(dict)``
  validates an already-parsed document. Both return a ``Config`` or raise
  ``ConfigError``, whose message is ONE line that starts with the dotted path
  of the offending field, e.g. ``ports[1].zone: expected an integer
  0..65535, got "x"``. ``ConfigError.field`` holds that path alone.
- Unknown keys are errors (typo protection); every value is type-checked.
- Addresses are parsed once here into network-order ``bytes`` (4 or 16) plus
  a family (4 or 6), the same representation ``FlowTuple`` uses, so the
  policy never reparses strings. IPv4 and IPv6 are accepted everywhere.
- Cross references are checked: every port named by a NAT or policy rule
  must be a configured ``[[ports]]`` entry.
- This module imports nothing heavy (no bcc, pyroute2 or sockets) so the
  CLI and unit tests can load a config anywhere.

See ``examples/ctxdp.toml`` for a commented document covering every key.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "DNAT_PROTOS",
    "PROTO_NAMES",
    "PORT_PROTOS",
    "AddrRange",
    "Cidr",
    "Config",
    "ConfigError",
    "ConntrackConfig",
    "DnatRule",
    "OffloadConfig",
    "PolicyConfig",
    "PolicyRule",
    "PortConfig",
    "PortRange",
    "SnatRule",
    "load_config",
    "parse_config",
    "proto_name",
]

DEFAULT_CONTROL_SOCKET = "/run/ctxdp/ctxdp.sock"

#: Protocol names accepted wherever a protocol is configured.
PROTO_NAMES: dict[str, int] = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
}
#: Protocols whose tuples carry real ports (ICMP's "ports" are the echo id).
PORT_PROTOS = frozenset({6, 17, 132, 136})
#: Protocols whose ports the tracker's NAT can rewrite (so DNAT can match them).
DNAT_PROTOS = frozenset({6, 17})

XDP_MODES = ("native", "generic", "auto")
KNOWN_PROVIDERS = ("xdp", "dummy")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
IFNAMSIZ = 16  # kernel limit including the NUL, so names are at most 15 chars

_TIMEOUT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def proto_name(proto: int) -> str:
    """Short lowercase name of an IP protocol number (``"6"`` style if unknown)."""
    for name, num in PROTO_NAMES.items():
        if num == proto:
            return name
    return str(proto)


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line naming the field."""

    def __init__(self, field: str, msg: str) -> None:
        # One line, printable: a key or value from the file may hold anything.
        field = "".join(c if c.isprintable() else "?" for c in field)
        msg = "".join(c if c.isprintable() else " " for c in msg)
        super().__init__(f"{field}: {msg}" if field else msg)
        self.field = field
        self.msg = msg


# --------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive port range; a single port has ``lo == hi``."""

    lo: int
    hi: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True, slots=True)
class Cidr:
    """An IP prefix. ``network`` is the network-order address with host bits cleared."""

    family: int
    network: bytes
    prefixlen: int

    def contains(self, family: int, addr: bytes) -> bool:
        """Whether ``addr`` (network-order bytes of ``family``) lies in the prefix."""
        if family != self.family or len(addr) != len(self.network):
            return False
        shift = len(addr) * 8 - self.prefixlen
        a = int.from_bytes(addr, "big") >> shift
        return a == int.from_bytes(self.network, "big") >> shift

    def __str__(self) -> str:
        return f"{ipaddress.ip_address(self.network)}/{self.prefixlen}"


@dataclass(frozen=True, slots=True)
class AddrRange:
    """An inclusive address range of one family; a single address has ``lo == hi``."""

    family: int
    lo: bytes
    hi: bytes

    def __str__(self) -> str:
        lo, hi = ipaddress.ip_address(self.lo), ipaddress.ip_address(self.hi)
        return str(lo) if self.lo == self.hi else f"{lo}-{hi}"


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortConfig:
    """One ``[[ports]]`` entry: an interface the daemon forwards on."""

    name: str
    zone: int = 0
    offload: bool = True  # per-port opt-out of the fast path


@dataclass(frozen=True, slots=True)
class SnatRule:
    """Source NAT on egress ``out_port``.

    ``type`` is ``"snat"`` (translate to ``to``) or ``"masquerade"`` (translate
    to the egress port's primary address of the packet's family, looked up at
    connection time; ``to`` is None). ``ports`` limits the source ports used
    (None: keep the original port when free). ``src`` restricts the rule to
    these source prefixes (empty: any source).
    """

    index: int
    type: str
    out_port: str
    to: AddrRange | None = None
    ports: PortRange | None = None
    src: tuple[Cidr, ...] = ()


@dataclass(frozen=True, slots=True)
class DnatRule:
    """Destination NAT (port forward) on ingress ``in_port``.

    Matches ``proto`` and a destination port in ``dport`` (and, when ``dst``
    is non-empty, a destination inside one of those prefixes); translates the
    destination to ``to`` (family ``family``) and, when ``to_port`` is set,
    the destination port to ``to_port``.
    """

    index: int
    in_port: str
    proto: int
    dport: PortRange
    family: int
    to: bytes
    to_port: int | None = None
    dst: tuple[Cidr, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One ``[[policy.rules]]`` entry. Empty / None matchers match anything.

    ``dport`` non-empty means the rule only matches protocols with ports
    (TCP, UDP, SCTP, UDP-Lite) whose destination port is in one of the ranges.
    Prefix lists may mix families; a prefix only matches addresses of its own.
    """

    index: int
    action: str  # "allow" | "deny"
    in_port: str | None = None
    out_port: str | None = None
    src: tuple[Cidr, ...] = ()
    dst: tuple[Cidr, ...] = ()
    proto: int | None = None
    dport: tuple[PortRange, ...] = ()
    comment: str = ""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``[policy]``: first matching rule wins, else ``default``. NEW connections only."""

    default: str = "allow"
    rules: tuple[PolicyRule, ...] = ()


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    """``[offload]``: providers, XDP attachment and eligibility knobs.

    ``map_size`` sizes the fast-path maps (max offloaded connections the
    provider can hold); ``max_offloaded`` is the eligibility cap the offload
    manager enforces (None: ``map_size``). ``zones`` None means every zone.
    """

    enabled: bool = True
    providers: tuple[str, ...] = ("xdp",)
    xdp_mode: str = "auto"
    map_size: int = 65536
    keep_on_restart: bool = False
    pin_dir: str = "/sys/fs/bpf/ctxdp"
    protocols: tuple[int, ...] = (1, 6, 17, 58)
    zones: tuple[int, ...] | None = None
    min_packets: int = 0
    max_offloaded: int | None = None


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """``[conntrack]``: table limits, TCP checking and timeout overrides.

    ``zone_limits`` maps zone -> max connections (0 = unlimited) and zones
    not listed get ``default_zone_limit`` (TOML key ``"default"`` inside
    ``zone_limits``); ``timeouts`` maps a tracker timeout name (the keys of
    ``ctxdp.conntrack.config.DEFAULT_TIMEOUTS``, e.g. ``tcp_established``)
    -> seconds. Treat both dicts as read-only. The fields map one to one
    onto ``ctxdp.conntrack.CtConfig``.
    """

    max_conns: int = 3_000_000  # the tracker's (and OVS's) default
    zone_limits: Mapping[int, int] = field(default_factory=dict)
    default_zone_limit: int = 0
    tcp_seq_check: bool = True
    timeouts: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration."""

    ports: tuple[PortConfig, ...]
    snat: tuple[SnatRule, ...] = ()
    dnat: tuple[DnatRule, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    offload: OffloadConfig = OffloadConfig()
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    aging_interval: float = 1.0
    control_socket: str = DEFAULT_CONTROL_SOCKET
    log_level: str = "info"
    log_format: str = "text"

    def port(self, name: str) -> PortConfig | None:
        """The port called ``name``, or None."""
        for p in self.ports:
            if p.name == name:
                return p
        return None

    @property
    def port_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.ports)


# --------------------------------------------------------------------------
# Scalar validators: each takes the value and its field path
# --------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    """Render a TOML value for an error message, on one line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v if len(v) <= 64 else v[:61] + "...")
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return repr(v)


def _table(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(path, f"expected a table, got {_fmt(v)}")
    return v


def _array(v: Any, path: str, what: str = "an array of tables") -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(path, f"expected {what}, got {_fmt(v)}")
    return v


def _keys(tbl: dict[str, Any], path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()):
    for k in tbl:
        if k not in allowed:
            sub = f"{path}.{k}" if path else k
            raise ConfigError(sub, f"unknown key (expected one of: {', '.join(allowed)})")
    for k in required:
        if k not in tbl:
            sub = f"{path}.{k}" if path else k
            raise ConfigError(sub, "missing required key")


def _int(v: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(path, f"expected an integer {lo}..{hi}, got {_fmt(v)}")
    return v


def _num(v: Any, path: str, lo: float, hi: float) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if not ok or not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(path, f"expected a number {lo:g}..{hi:g} (seconds), got {_fmt(v)}")
    return float(v)


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(path, f"expected true or false, got {_fmt(v)}")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(path, f"expected a string, got {_fmt(v)}")
    return v


def _choice(v: Any, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v.lower() not in choices:
        raise ConfigError(path, f"expected one of {', '.join(choices)}, got {_fmt(v)}")
    return v.lower()


def _ifname(v: Any, path: str) -> str:
    s = _str(v, path)
    if not s or len(s) >= IFNAMSIZ or s in (".", "..") or any(c in s for c in "/: \t\n"):
        raise ConfigError(path, f"expected an interface name (1-15 chars, no '/', ':' or spaces), got {_fmt(v)}")
    return s


def _addr(v: Any, path: str) -> tuple[int, bytes]:
    s = _str(v, path)
    try:
        a = ipaddress.ip_address(s.strip())
    except ValueError:
        raise ConfigError(path, f"expected an IPv4 or IPv6 address, got {_fmt(v)}") from None
    return a.version, a.packed


def _addr_range(v: Any, path: str) -> AddrRange:
    s = _str(v, path)
    lo_s, sep, hi_s = s.partition("-")
    fam, lo = _addr_part(lo_s, path, v)
    if not sep:
        return AddrRange(fam, lo, lo)
    fam2, hi = _addr_part(hi_s, path, v)
    if fam2 != fam:
        raise ConfigError(path, f"range mixes IPv4 and IPv6, got {_fmt(v)}")
    if lo > hi:
        raise ConfigError(path, f"range start is above its end, got {_fmt(v)}")
    return AddrRange(fam, lo, hi)


def _addr_part(s: str, path: str, whole: Any) -> tuple[int, bytes]:
    try:
        a = ipaddress.ip_address(s.strip())
    except ValueError:
        raise ConfigError(
            path, f"expected an address or range \"a-b\", got {_fmt(whole)}"
        ) from None
    return a.version, a.packed


def _cidr(v: Any, path: str) -> Cidr:
    s = _str(v, path)
    try:
        n = ipaddress.ip_network(s.strip(), strict=False)
    except ValueError:
        raise ConfigError(path, f"expected an address or CIDR prefix, got {_fmt(v)}") from None
    return Cidr(n.version, n.network_address.packed, n.prefixlen)


def _cidrs(v: Any, path: str) -> tuple[Cidr, ...]:
    """A prefix or an array of prefixes."""
    if isinstance(v, list):
        if not v:
            raise ConfigError(path, "expected at least one prefix, got an empty array")
        return tuple(_cidr(x, f"{path}[{i}]") for i, x in enumerate(v))
    return (_cidr(v, path),)


def _port_range(v: Any, path: str, lo: int = 1) -> PortRange:
    """``80``, ``"80"`` or ``"8000-8100"``."""
    if isinstance(v, int) and not isinstance(v, bool):
        return PortRange(*(2 * (_int(v, path, lo, 65535),)))
    msg = f"expected a port {lo}..65535 or a range \"lo-hi\", got {_fmt(v)}"
    if not isinstance(v, str):
        raise ConfigError(path, msg)
    a, sep, b = v.strip().partition("-")
    try:
        p_lo, p_hi = int(a), int(b if sep else a)
    except ValueError:
        raise ConfigError(path, msg) from None
    if not (lo <= p_lo <= 65535 and lo <= p_hi <= 65535):
        raise ConfigError(path, msg)
    if p_lo > p_hi:
        raise ConfigError(path, f"range start is above its end, got {_fmt(v)}")
    return PortRange(p_lo, p_hi)


def _port_ranges(v: Any, path: str) -> tuple[PortRange, ...]:
    if isinstance(v, list):
        if not v:
            raise ConfigError(path, "expected at least one port, got an empty array")
        return tuple(_port_range(x, f"{path}[{i}]") for i, x in enumerate(v))
    return (_port_range(v, path),)


def _proto(v: Any, path: str) -> int:
    if isinstance(v, str) and v.lower() in PROTO_NAMES:
        return PROTO_NAMES[v.lower()]
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
        return v
    names = ", ".join(PROTO_NAMES)
    raise ConfigError(path, f"expected a protocol ({names}) or a number 0..255, got {_fmt(v)}")


def _known_port(name: str, path: str, ports: tuple[str, ...]) -> str:
    if name not in ports:
        raise ConfigError(path, f"unknown port {_fmt(name)} (configured: {', '.join(ports)})")
    return name


def _same_family(cidrs: tuple[Cidr, ...], family: int, path: str, other: str) -> None:
    """Every prefix must be of ``family`` (else it could never match)."""
    for i, c in enumerate(cidrs):
        if c.family != family:
            sub = f"{path}[{i}]" if len(cidrs) > 1 else path
            raise ConfigError(sub, f"{c} is IPv{c.family} but {other} is IPv{family}")


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _parse_ports(doc: dict[str, Any]) -> tuple[PortConfig, ...]:
    if "ports" not in doc:
        raise ConfigError("ports", "missing required key (at least one [[ports]] entry)")
    arr = _array(doc["ports"], "ports")
    if not arr:
        raise ConfigError("ports", "expected at least one [[ports]] entry")
    out: list[PortConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(arr):
        path = f"ports[{i}]"
        t = _table(raw, path)
        _keys(t, path, ("name", "zone", "offload"), ("name",))
        name = _ifname(t["name"], f"{path}.name")
        if name in seen:
            raise ConfigError(f"{path}.name", f"duplicate port {_fmt(name)}")
        seen.add(name)
        zone = _int(t.get("zone", 0), f"{path}.zone", 0, 65535)
        offload = _bool(t.get("offload", True), f"{path}.offload")
        out.append(PortConfig(name, zone, offload))
    return tuple(out)


_SNAT_KEYS = ("type", "out_port", "to", "ports", "src")
_DNAT_KEYS = ("type", "in_port", "proto", "dport", "to", "to_port", "dst")


def _parse_nat(doc: dict[str, Any], ports: tuple[str, ...]):
    snat: list[SnatRule] = []
    dnat: list[DnatRule] = []
    for i, raw in enumerate(_array(doc.get("nat", []), "nat")):
        path = f"nat[{i}]"
        t = _table(raw, path)
        if "type" not in t:
            raise ConfigError(f"{path}.type", "missing required key (snat, masquerade or dnat)")
        kind = _choice(t["type"], f"{path}.type", ("snat", "masquerade", "dnat"))
        if kind == "dnat":
            dnat.append(_parse_dnat(t, path, i, ports))
            continue
        _keys(t, path, _SNAT_KEYS, ("out_port",) + (("to",) if kind == "snat" else ()))
        out_port = _known_port(_ifname(t["out_port"], f"{path}.out_port"), f"{path}.out_port", ports)
        to = None
        if kind == "masquerade":
            if "to" in t:
                raise ConfigError(
                    f"{path}.to", "not allowed with masquerade (it uses the port's address)"
                )
        else:
            to = _addr_range(t["to"], f"{path}.to")
        pr = _port_range(t["ports"], f"{path}.ports") if "ports" in t else None
        src = _cidrs(t["src"], f"{path}.src") if "src" in t else ()
        if to is not None:
            _same_family(src, to.family, f"{path}.src", "'to'")
        snat.append(SnatRule(i, kind, out_port, to, pr, src))
    return tuple(snat), tuple(dnat)


def _parse_dnat(t: dict[str, Any], path: str, index: int, ports: tuple[str, ...]) -> DnatRule:
    _keys(t, path, _DNAT_KEYS, ("in_port", "proto", "dport", "to"))
    in_port = _known_port(_ifname(t["in_port"], f"{path}.in_port"), f"{path}.in_port", ports)
    proto = _proto(t["proto"], f"{path}.proto")
    if proto not in DNAT_PROTOS:
        raise ConfigError(f"{path}.proto", f"expected tcp or udp, got {_fmt(t['proto'])}")
    dport = _port_range(t["dport"], f"{path}.dport")
    fam, to = _addr(t["to"], f"{path}.to")
    to_port = _int(t["to_port"], f"{path}.to_port", 1, 65535) if "to_port" in t else None
    dst = _cidrs(t["dst"], f"{path}.dst") if "dst" in t else ()
    _same_family(dst, fam, f"{path}.dst", "'to'")
    return DnatRule(index, in_port, proto, dport, fam, to, to_port, dst)


_RULE_KEYS = ("action", "in_port", "out_port", "src", "dst", "proto", "dport", "comment")


def _parse_policy(doc: dict[str, Any], ports: tuple[str, ...]) -> PolicyConfig:
    t = _table(doc.get("policy", {}), "policy")
    _keys(t, "policy", ("default", "rules"))
    default = _choice(t.get("default", "allow"), "policy.default", ("allow", "deny"))
    rules: list[PolicyRule] = []
    for i, raw in enumerate(_array(t.get("rules", []), "policy.rules")):
        path = f"policy.rules[{i}]"
        r = _table(raw, path)
        _keys(r, path, _RULE_KEYS, ("action",))
        action = _choice(r["action"], f"{path}.action", ("allow", "deny"))
        in_port = out_port = None
        if "in_port" in r:
            in_port = _known_port(_ifname(r["in_port"], f"{path}.in_port"), f"{path}.in_port", ports)
        if "out_port" in r:
            out_port = _known_port(
                _ifname(r["out_port"], f"{path}.out_port"), f"{path}.out_port", ports
            )
        src = _cidrs(r["src"], f"{path}.src") if "src" in r else ()
        dst = _cidrs(r["dst"], f"{path}.dst") if "dst" in r else ()
        sf, df = {c.family for c in src}, {c.family for c in dst}
        if sf and df and not sf & df:
            raise ConfigError(
                f"{path}.dst", "no prefix shares a family with 'src', so the rule never matches"
            )
        proto = _proto(r["proto"], f"{path}.proto") if "proto" in r else None
        dport = _port_ranges(r["dport"], f"{path}.dport") if "dport" in r else ()
        if dport and proto is not None and proto not in PORT_PROTOS:
            raise ConfigError(f"{path}.dport", f"protocol {proto_name(proto)} has no ports")
        comment = _str(r.get("comment", ""), f"{path}.comment")
        rules.append(PolicyRule(i, action, in_port, out_port, src, dst, proto, dport, comment))
    return PolicyConfig(default, tuple(rules))


_OFFLOAD_KEYS = (
    "enabled", "providers", "xdp_mode", "map_size", "keep_on_restart", "pin_dir",
    "protocols", "zones", "min_packets", "max_offloaded",
)


def _parse_offload(doc: dict[str, Any]) -> OffloadConfig:
    t = _table(doc.get("offload", {}), "offload")
    _keys(t, "offload", _OFFLOAD_KEYS)
    d = OffloadConfig()
    enabled = _bool(t.get("enabled", d.enabled), "offload.enabled")
    providers = d.providers
    if "providers" in t:
        arr = _array(t["providers"], "offload.providers", "an array of provider names")
        providers = tuple(
            _choice(p, f"offload.providers[{i}]", KNOWN_PROVIDERS) for i, p in enumerate(arr)
        )
        if len(set(providers)) != len(providers):
            raise ConfigError("offload.providers", "lists a provider twice")
        if enabled and not providers:
            raise ConfigError("offload.providers", "empty while offload.enabled is true")
    xdp_mode = _choice(t.get("xdp_mode", d.xdp_mode), "offload.xdp_mode", XDP_MODES)
    map_size = _int(t.get("map_size", d.map_size), "offload.map_size", 1, 1 << 24)
    keep = _bool(t.get("keep_on_restart", d.keep_on_restart), "offload.keep_on_restart")
    pin_dir = _str(t.get("pin_dir", d.pin_dir), "offload.pin_dir")
    if not pin_dir.startswith("/sys/fs/bpf/") or ".." in pin_dir.split("/"):
        raise ConfigError("offload.pin_dir", f"expected a directory under /sys/fs/bpf/, got {_fmt(pin_dir)}")
    protocols = d.protocols
    if "protocols" in t:
        arr = _array(t["protocols"], "offload.protocols", "an array of protocols")
        protocols = tuple(_proto(p, f"offload.protocols[{i}]") for i, p in enumerate(arr))
    zones = None
    if "zones" in t:
        arr = _array(t["zones"], "offload.zones", "an array of zone numbers")
        zones = tuple(_int(z, f"offload.zones[{i}]", 0, 65535) for i, z in enumerate(arr))
    min_packets = _int(t.get("min_packets", d.min_packets), "offload.min_packets", 0, 1 << 31)
    max_off = None
    if "max_offloaded" in t:
        max_off = _int(t["max_offloaded"], "offload.max_offloaded", 0, 1 << 24)
    return OffloadConfig(
        enabled, providers, xdp_mode, map_size, keep, pin_dir, protocols, zones, min_packets,
        max_off,
    )


def _parse_conntrack(doc: dict[str, Any]) -> ConntrackConfig:
    t = _table(doc.get("conntrack", {}), "conntrack")
    _keys(t, "conntrack", ("max_conns", "zone_limits", "tcp_seq_check", "timeouts"))
    d = ConntrackConfig()
    max_conns = _int(t.get("max_conns", d.max_conns), "conntrack.max_conns", 1, 1 << 26)
    limits: dict[int, int] = {}
    default_limit = 0
    for k, v in _table(t.get("zone_limits", {}), "conntrack.zone_limits").items():
        path = f"conntrack.zone_limits.{_fmt(k)}"
        if k == "default":
            default_limit = _int(v, path, 0, 1 << 26)
            continue
        try:
            zone = int(k)
        except ValueError:
            raise ConfigError(path, 'expected a zone number 0..65535 or "default" as the key') from None
        if not 0 <= zone <= 65535:
            raise ConfigError(path, "expected a zone number 0..65535 as the key")
        limits[zone] = _int(v, path, 0, 1 << 26)
    seq = _bool(t.get("tcp_seq_check", d.tcp_seq_check), "conntrack.tcp_seq_check")
    timeouts: dict[str, float] = {}
    known = _known_timeout_names()
    for k, v in _table(t.get("timeouts", {}), "conntrack.timeouts").items():
        path = f"conntrack.timeouts.{k}"
        if not _TIMEOUT_NAME.match(k) or (known is not None and k not in known):
            hint = f" (expected one of: {', '.join(sorted(known))})" if known else ""
            raise ConfigError(path, f"unknown timeout name{hint}")
        timeouts[k] = _num(v, path, 0.001, 30 * 86400.0)
    return ConntrackConfig(max_conns, limits, default_limit, seq, timeouts)


def _known_timeout_names() -> frozenset[str] | None:
    """The tracker's timeout names; None (syntax check only) if it is absent.

    Imported lazily from the tracker's own pure config module so a typo is
    caught here with a field path rather than later as a bare ValueError.
    """
    try:
        from ctxdp.conntrack.config import DEFAULT_TIMEOUTS
    except ImportError:
        return None
    return frozenset(DEFAULT_TIMEOUTS)


_TOP_KEYS = (
    "ports", "nat", "policy", "offload", "conntrack", "aging_interval", "control_socket",
    "log_level", "log_format",
)


def parse_config(doc: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document and build a ``Config``."""
    doc = _table(dict(doc) if isinstance(doc, Mapping) else doc, "")
    _keys(doc, "", _TOP_KEYS)
    ports = _parse_ports(doc)
    names = tuple(p.name for p in ports)
    snat, dnat = _parse_nat(doc, names)
    policy = _parse_policy(doc, names)
    offload = _parse_offload(doc)
    ct = _parse_conntrack(doc)
    aging = _num(doc.get("aging_interval", 1.0), "aging_interval", 0.01, 3600.0)
    sock = _str(doc.get("control_socket", DEFAULT_CONTROL_SOCKET), "control_socket")
    if not sock.startswith("/") or sock.endswith("/") or len(sock.encode()) > 107:
        raise ConfigError(
            "control_socket", f"expected an absolute file path of at most 107 bytes, got {_fmt(sock)}"
        )
    level = _choice(doc.get("log_level", "info"), "log_level", LOG_LEVELS)
    fmt = _choice(doc.get("log_format", "text"), "log_format", LOG_FORMATS)
    return Config(ports, snat, dnat, policy, offload, ct, aging, sock, level, fmt)


def load_config(path: str) -> Config:
    """Read and validate the TOML file at ``path``.

    Unreadable files and TOML syntax errors are ``ConfigError`` too, with an
    empty ``field``; the caller prefixes the file name.
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text: {e.reason}") from None
    return parse_config(doc)
