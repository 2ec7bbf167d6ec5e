"""Firewall and NAT policy for NEW connections (pure; no kernel, no clock).

Contract:
- ``Policy.from_config(cfg, port_addr=None)`` compiles a ``ctxdp.config.Config``.
  ``port_addr(ifname, family) -> bytes | None`` returns a port's primary
  address (network-order bytes); the daemon supplies it from its netlink view
  and it is only consulted for masquerade.
- The pipeline for a NEW connection whose original tuple is ``orig``:
    1. ``dnat_for(in_ifname, orig)`` on ingress, before routing (like a
       PREROUTING hook); ``translate(orig, dnat)`` is what gets routed;
    2. ``decide(in_ifname, out_ifname, translated)`` -- the filter sees the
       post-DNAT, pre-SNAT tuple, as a kernel FORWARD hook does; first
       matching rule wins, else the default;
    3. ``nat_for(in_ifname, out_ifname, orig)`` gives the whole NAT decision
       (DNAT + SNAT/masquerade by egress port) to commit with the connection.
  ``evaluate(in_ifname, out_ifname, orig)`` does 2 and 3 in one call.
- Rules that name ``out_port`` never match while ``out_ifname`` is None.
  Rules with ``dport`` only match protocols that have ports (TCP, UDP, SCTP,
  UDP-Lite): an ICMP echo id is never taken for a port.
- NAT actions are ``ctxdp.conntrack.NatAction`` objects (imported lazily so
  this module loads without the tracker). A masquerade whose port has no
  address of the packet's family raises ``NatUnavailable``: the daemon must
  drop the packet rather than leak an untranslated source.
- Merged-flow validity (NFP flower): an offloaded connection depends on the
  rule that admitted it and the NAT decided for it. ``still_admits(info)``
  re-runs the pipeline for ``info`` (``in_ifname``, ``out_ifname``, ``orig``,
  ``nat`` as originally applied) against THIS policy and says whether the
  connection would still be created identically. The daemon calls it on
  every reload and withdraws the connections it rejects.
- Each rule has ``rule_id`` (its position in the config) and a content
  ``fingerprint`` that ignores position and comment, so a reload can tell
  which rules really changed; ``Policy.fingerprint`` covers the whole policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ctxdp.config import PORT_PROTOS, Config, DnatRule, PolicyRule, SnatRule
from ctxdp.conntrack.flowtuple import FlowTuple

__all__ = [
    "Admission",
    "AdmitInfo",
    "NatDecision",
    "NatUnavailable",
    "Policy",
    "PortAddrFn",
    "Verdict",
    "nat_key",
    "translate",
]

PortAddrFn = Callable[[str, int], "bytes | None"]


class NatUnavailable(Exception):
    """NAT is required but cannot be performed (e.g. masquerade without an address)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of the filter: ``rule_id`` None means the default policy decided."""

    allow: bool
    rule_id: int | None = None
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class NatDecision:
    """The NAT chosen for a NEW connection; either action may be None.

    ``dnat_rule`` / ``snat_rule`` are the ``rule_id`` (index in ``[[nat]]``)
    of the rules that chose them, for logs and the control socket.
    """

    dnat: Any = None  # ctxdp.conntrack.NatAction (kind "dnat") or None
    snat: Any = None  # ctxdp.conntrack.NatAction (kind "snat") or None
    dnat_rule: int | None = None
    snat_rule: int | None = None

    def key(self) -> tuple:
        """A comparable value: equal keys mean the same translation."""
        return (nat_key(self.dnat), nat_key(self.snat))

    @property
    def actions(self) -> tuple[Any, ...]:
        """The non-None actions, DNAT first."""
        return tuple(a for a in (self.dnat, self.snat) if a is not None)


@dataclass(frozen=True, slots=True)
class Admission:
    """Result of ``Policy.evaluate``: the filter verdict and the NAT to apply."""

    verdict: Verdict
    nat: NatDecision | None


@dataclass(frozen=True, slots=True)
class AdmitInfo:
    """What ``still_admits`` needs about a connection (any object with these works)."""

    in_ifname: str
    out_ifname: str | None
    orig: FlowTuple
    nat: NatDecision | None = None


class _ConnInfo(Protocol):
    in_ifname: str
    out_ifname: str | None
    orig: FlowTuple
    nat: NatDecision | None


def nat_key(action: Any) -> tuple | None:
    """Comparable value of one ``NatAction`` (None stays None)."""
    if action is None:
        return None
    amax = getattr(action, "addr_max", None) or action.addr_min
    return (action.kind, bytes(action.addr_min), bytes(amax), action.port_min, action.port_max)


def translate(t: FlowTuple, dnat: Any) -> FlowTuple:
    """The tuple after ``dnat`` (None: unchanged): what the router routes and filters.

    With an address range the lowest address stands in; the tracker picks the
    final one, and the daemon should route on the committed reply tuple.
    """
    if dnat is None:
        return t
    dport = dnat.port_min if dnat.port_min else t.dport
    return t._replace(dst=bytes(dnat.addr_min), dport=dport)


def _nat_action(kind: str, addr_min: bytes, addr_max: bytes | None, port_min: int, port_max: int):
    from ctxdp.conntrack import NatAction  # lazy: keep policy importable on its own

    return NatAction(
        kind=kind, addr_min=addr_min, addr_max=addr_max, port_min=port_min, port_max=port_max
    )


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _rule_fingerprint(r: PolicyRule) -> str:
    return _fingerprint(
        "rule", r.action, r.in_port, r.out_port, r.src, r.dst, r.proto, r.dport
    )


def _dports_match(ranges, t: FlowTuple) -> bool:
    if t.proto not in PORT_PROTOS:
        return False
    return any(pr.lo <= t.dport <= pr.hi for pr in ranges)


def _rule_matches(r: PolicyRule, in_if: str, out_if: str | None, t: FlowTuple) -> bool:
    if r.in_port is not None and r.in_port != in_if:
        return False
    if r.out_port is not None and r.out_port != out_if:
        return False
    if r.proto is not None and r.proto != t.proto:
        return False
    if r.src and not any(c.contains(t.family, t.src) for c in r.src):
        return False
    if r.dst and not any(c.contains(t.family, t.dst) for c in r.dst):
        return False
    return not r.dport or _dports_match(r.dport, t)


def _dnat_matches(r: DnatRule, in_if: str, t: FlowTuple) -> bool:
    return (
        r.in_port == in_if
        and r.family == t.family
        and r.proto == t.proto
        and r.dport.lo <= t.dport <= r.dport.hi
        and (not r.dst or any(c.contains(t.family, t.dst) for c in r.dst))
    )


def _snat_matches(r: SnatRule, out_if: str, t: FlowTuple) -> bool:
    if r.out_port != out_if:
        return False
    if r.to is not None and r.to.family != t.family:
        return False
    return not r.src or any(c.contains(t.family, t.src) for c in r.src)


class Policy:
    """Compiled filter + NAT rules. Immutable; a reload builds a new one."""

    def __init__(
        self,
        rules: tuple[PolicyRule, ...] = (),
        default_allow: bool = True,
        dnat: tuple[DnatRule, ...] = (),
        snat: tuple[SnatRule, ...] = (),
        port_addr: PortAddrFn | None = None,
    ) -> None:
        self.rules = rules
        self.default_allow = default_allow
        self.dnat_rules = dnat
        self.snat_rules = snat
        self.port_addr = port_addr
        self._fps = tuple(_rule_fingerprint(r) for r in rules)
        self._default = Verdict(default_allow, None, "default-allow" if default_allow else "default-deny")
        self._verdicts = tuple(
            Verdict(r.action == "allow", r.index, fp) for r, fp in zip(rules, self._fps, strict=True)
        )
        nat_parts = tuple(
            (r.in_port, r.proto, r.dport, r.family, r.to, r.to_port, r.dst) for r in dnat
        ) + tuple((r.type, r.out_port, r.to, r.ports, r.src) for r in snat)
        self.fingerprint = _fingerprint("policy", default_allow, self._fps, nat_parts)

    @classmethod
    def from_config(cls, cfg: Config, port_addr: PortAddrFn | None = None) -> Policy:
        return cls(
            cfg.policy.rules, cfg.policy.default == "allow", cfg.dnat, cfg.snat, port_addr
        )

    def rule_fingerprint(self, rule_id: int) -> str:
        """Content fingerprint of the rule at position ``rule_id``."""
        return self._fps[rule_id]

    # -- filter -------------------------------------------------------------

    def decide(self, in_ifname: str, out_ifname: str | None, t: FlowTuple) -> Verdict:
        """Filter verdict for a NEW connection (``t`` is the post-DNAT tuple)."""
        for r, v in zip(self.rules, self._verdicts, strict=True):
            if _rule_matches(r, in_ifname, out_ifname, t):
                return v
        return self._default

    # -- NAT ----------------------------------------------------------------

    def dnat_for(self, in_ifname: str, t: FlowTuple) -> tuple[Any, int | None]:
        """(NatAction or None, rule_id) for DNAT on ingress; first match wins."""
        for r in self.dnat_rules:
            if _dnat_matches(r, in_ifname, t):
                port = r.to_port or 0
                return _nat_action("dnat", r.to, None, port, port), r.index
        return None, None

    def snat_for(self, out_ifname: str, t: FlowTuple) -> tuple[Any, int | None]:
        """(NatAction or None, rule_id) for SNAT/masquerade on egress; first match wins.

        Raises ``NatUnavailable`` when the matching rule is a masquerade and
        the port has no address of the tuple's family.
        """
        for r in self.snat_rules:
            if not _snat_matches(r, out_ifname, t):
                continue
            lo, hi = (r.ports.lo, r.ports.hi) if r.ports else (0, 0)
            if r.to is not None:
                amax = r.to.hi if r.to.hi != r.to.lo else None
                return _nat_action("snat", r.to.lo, amax, lo, hi), r.index
            addr = self.port_addr(out_ifname, t.family) if self.port_addr else None
            if not addr:
                raise NatUnavailable(
                    f"masquerade on {out_ifname}: no IPv{t.family} address on the port"
                )
            return _nat_action("snat", bytes(addr), None, lo, hi), r.index
        return None, None

    def nat_for(self, in_ifname: str, out_ifname: str | None, t: FlowTuple) -> NatDecision | None:
        """The NAT for a NEW connection with original tuple ``t``, or None.

        With ``out_ifname`` None (before routing) only DNAT is decided.
        """
        dnat, drule = self.dnat_for(in_ifname, t)
        snat = srule = None
        if out_ifname is not None:
            snat, srule = self.snat_for(out_ifname, translate(t, dnat))
        if dnat is None and snat is None:
            return None
        return NatDecision(dnat, snat, drule, srule)

    def evaluate(self, in_ifname: str, out_ifname: str | None, orig: FlowTuple) -> Admission:
        """Filter verdict and NAT for a NEW connection, given its egress port.

        NAT is only computed when the verdict allows; ``NatUnavailable``
        propagates.
        """
        dnat, _ = self.dnat_for(in_ifname, orig)
        verdict = self.decide(in_ifname, out_ifname, translate(orig, dnat))
        if not verdict.allow:
            return Admission(verdict, None)
        return Admission(verdict, self.nat_for(in_ifname, out_ifname, orig))

    # -- merged-flow validity -------------------------------------------------

    def still_admits(self, info: _ConnInfo) -> bool:
        """Whether this policy would create ``info``'s connection with the same NAT.

        False when the filter now denies it, when the DNAT or SNAT it would
        get differs from ``info.nat`` (rule edited, added or removed, or a
        masquerade address changed), or when NAT is now unavailable.
        """
        try:
            adm = self.evaluate(info.in_ifname, info.out_ifname, info.orig)
        except NatUnavailable:
            return False
        if not adm.verdict.allow:
            return False
        old = info.nat.key() if info.nat is not None else (None, None)
        new = adm.nat.key() if adm.nat is not None else (None, None)
        return old == new
