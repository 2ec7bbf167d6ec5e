"""Offload eligibility policy: may this connection go to the fast path now?

Contract:
- ``EligibilityPolicy.check(conn, dirs)`` is pure: it reads the connection's
  attributes (``proto``, ``zone``, ``state_name``, ``established``, ``helper``,
  ``parent``, ``children``, ``pkts``) and the known forwarding directions and
  returns ``""`` when the policy allows offload, else one reason string from
  ``Reason``. It never calls a provider and never reads a clock.
- "Established" means: TCP in state ``ESTABLISHED`` (after the three-way
  handshake, and not after FIN/RST); every other protocol (UDP, ICMP echo,
  other) once the tracker has seen a reply (``conn.established``). With
  ``require_established=False`` a connection may be offloaded as soon as both
  directions have been forwarded (the manager then sends EST when it becomes
  established); this is off by default because a TCP flow offloaded during
  the handshake hides its final ACK from the tracker.
- Helpers and related connections are never offloaded (unless allowed): an
  ALG must see every packet, and a related child (an FTP data channel, an
  ICMP error's flow) is tied to its master's lifetime. A master with live
  children is also kept in the slow path by default.
- Reasons are a fixed vocabulary so that refusals can be counted.
- The cap on offloaded connections and provider availability are checked by
  the manager (they depend on its state), with ``Reason.CAP`` and
  ``Reason.NO_PROVIDER``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

    from ctxdp.providers.base import FlowDir

__all__ = ["EligibilityPolicy", "Reason", "TRANSIENT_REASONS", "TCP", "UDP", "ICMP", "ICMPV6"]

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


class Reason:
    """Why a connection is not in the fast path (countable, kebab-case)."""

    DISABLED = "disabled"  # offload switched off globally
    NO_PROVIDER = "no-provider"  # no enabled provider, or none would take it
    PROTO = "proto"  # protocol not in the policy
    ZONE = "zone"  # zone not in the policy
    HELPER = "helper"  # connection has an ALG helper
    RELATED = "related"  # connection is a related child of another
    HAS_CHILDREN = "has-children"  # connection is the master of live related ones
    NOT_ESTABLISHED = "not-established"  # TCP before/after ESTABLISHED; others before a reply
    MIN_PKTS = "min-pkts"  # fewer packets than the policy's minimum so far
    NO_FORWARDING = "no-forwarding"  # slow path has not forwarded both directions yet
    BAD_FORWARDING = "bad-forwarding"  # a FlowDir whose match is not the conn's tuple
    PORT_OPT_OUT = "port-opt-out"  # ingress or egress port opted out of offload
    CAP = "cap"  # the cap on offloaded connections is reached
    NEIGH_UNRESOLVED = "neigh-unresolved"  # pending: a next hop has no MAC yet
    EAGAIN = "eagain"  # pending: a provider asked to be offered again later
    ENOSPC = "enospc"  # a provider's table is full
    PROVIDER_ERROR = "provider-error"  # a provider refused with another errno / raised


# Refusals that can clear on their own as packets flow; the manager re-checks
# such connections from the per-packet ``on_update`` hook (and only those).
TRANSIENT_REASONS = frozenset({Reason.MIN_PKTS, Reason.CAP, Reason.HAS_CHILDREN})


@dataclass(slots=True)
class EligibilityPolicy:
    """Configurable offload policy; ``None`` for a set means "any"."""

    protocols: frozenset[int] = field(default_factory=lambda: frozenset({TCP, UDP, ICMP, ICMPV6}))
    zones: frozenset[int] | None = None
    opt_out_ifindex: frozenset[int] = field(default_factory=frozenset)
    min_pkts: int = 0  # packets seen by the slow path, both directions together
    max_offloaded: int | None = None  # cap on connections held by any provider
    allow_helpers: bool = False
    allow_related: bool = False
    require_established: bool = True

    def established(self, conn: Any) -> bool:
        """The connection is in the state the policy calls established."""
        if conn.proto == TCP:
            return conn.state_name == "ESTABLISHED"
        return bool(conn.established)

    def check_conn(self, conn: Any) -> str:
        """Reason the connection itself (not its forwarding) is refused, or ""."""
        if conn.proto not in self.protocols:
            return Reason.PROTO
        if self.zones is not None and conn.zone not in self.zones:
            return Reason.ZONE
        if not self.allow_helpers and conn.helper:
            return Reason.HELPER
        if not self.allow_related:
            if conn.parent is not None:
                return Reason.RELATED
            if conn.children:
                return Reason.HAS_CHILDREN
        if self.require_established and not self.established(conn):
            return Reason.NOT_ESTABLISHED
        if self.min_pkts and sum(conn.pkts) < self.min_pkts:
            return Reason.MIN_PKTS
        return ""

    def check_dirs(self, dirs: Sequence[FlowDir | None]) -> str:
        """Reason the forwarding decision is refused, or "" (both dirs known)."""
        if dirs[0] is None or dirs[1] is None:
            return Reason.NO_FORWARDING
        if self.opt_out_ifindex:
            for d in dirs:
                if d.in_ifindex in self.opt_out_ifindex or d.out_ifindex in self.opt_out_ifindex:
                    return Reason.PORT_OPT_OUT
        return ""

    def check(self, conn: Any, dirs: Sequence[FlowDir | None]) -> str:
        """Full policy verdict: "" when the connection may be offloaded."""
        return self.check_conn(conn) or self.check_dirs(dirs)
