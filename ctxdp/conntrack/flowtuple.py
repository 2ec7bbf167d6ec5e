"""FlowTuple: the public, structured 5-tuple of one direction of a connection.

Contract: addresses are raw network-order ``bytes`` (4 for IPv4, 16 for
IPv6); ports are host-order ints. For ICMP/ICMPv6 echo the echo id is both
``sport`` and ``dport`` (as in the fast-path key); for protocols without
ports both are 0. Immutable and hashable. The tracker's internal keys may be
a packed form; this type is what crosses module boundaries.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

AF_INET4 = 4
AF_INET6 = 6


class FlowTuple(NamedTuple):
    family: int  # 4 or 6
    proto: int  # IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...)
    src: bytes  # network-order source address
    dst: bytes  # network-order destination address
    sport: int  # source port, or ICMP echo id
    dport: int  # destination port, or ICMP echo id

    def reverse(self) -> FlowTuple:
        """The tuple of the opposite direction (no NAT applied)."""
        return FlowTuple(self.family, self.proto, self.dst, self.src, self.dport, self.sport)

    def __str__(self) -> str:
        s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        return f"proto={self.proto} src={s} dst={d} sport={self.sport} dport={self.dport}"
