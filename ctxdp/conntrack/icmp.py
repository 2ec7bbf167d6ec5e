"""ICMP and ICMPv6 echo handlers (OVS lib/conntrack-icmp.c).

Contract:
- Only queries create connections: ICMP echo, timestamp and information
  requests; ICMPv6 echo request. The echo id is the "port" of the key (both
  source and destination port), so NAT can rewrite it like a port.
- States: FIRST (request seen) and REPLY (answered, counts as established).
- The key holds no ICMP type, so the handler checks the direction instead:
  a query travelling in the reply direction, or an answer in the original
  direction, is invalid.
- ICMP *errors* never reach a handler: the tracker relates them to the
  connection of the datagram they quote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctxdp.conntrack.proto import UPD_INVALID, UPD_OK, UPD_OK_NEW, ProtoHandler

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.conn import Conn
    from ctxdp.packet import Packet

__all__ = ["Icmp4Handler", "Icmp6Handler", "ICMP_FIRST", "ICMP_REPLY"]

ICMP_FIRST, ICMP_REPLY = 0, 1

# ICMPv4: echo request 8 / reply 0, timestamp 13 / 14, information 15 / 16.
_V4_QUERY = frozenset({8, 13, 15})
_V4_ANSWER = frozenset({0, 14, 16})
# ICMPv6: echo request 128 / reply 129.
_V6_QUERY = frozenset({128})
_V6_ANSWER = frozenset({129})


class Icmp4Handler(ProtoHandler):
    """ICMPv4 queries; see the module docstring."""

    name = "icmp"
    states = ("FIRST", "REPLY")
    timeout_keys = ("icmp_first", "icmp_reply")
    established_state = ICMP_REPLY
    queries: frozenset[int] = _V4_QUERY
    answers: frozenset[int] = _V4_ANSWER

    __slots__ = ()

    def valid_new(self, pkt: Packet) -> bool:
        if pkt.icmp_type in self.queries:
            return True
        self.reason = "icmp-not-query"
        return False

    def update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> int:
        t = pkt.icmp_type
        if reply:
            if t not in self.answers:
                self.reason = "icmp-direction"
                return UPD_INVALID
            conn.pstate = ICMP_REPLY
            return UPD_OK
        if t not in self.queries:
            self.reason = "icmp-direction"
            return UPD_INVALID
        return UPD_OK if conn.pstate == ICMP_REPLY else UPD_OK_NEW


class Icmp6Handler(Icmp4Handler):
    """ICMPv6 echo; see the module docstring."""

    name = "icmp6"
    queries = _V6_QUERY
    answers = _V6_ANSWER

    __slots__ = ()
