"""NAT for the tracker: range description, collision-free tuple choice, packet rewrite.

Contract:
- ``NatAction(kind, addr_min, addr_max=None, port_min=0, port_max=0)``:
  ``kind`` is ``"snat"`` or ``"dnat"``; addresses are network-order ``bytes``
  of the packet's family; ports 0 mean "not specified".
- ``select_reply(...)`` picks, at commit time, the reply-direction key of a
  new connection so that it collides with no key in the table (OVS
  ``nat_get_unique_tuple``): every address of the range is tried (starting at
  a hash of the endpoints, so one client tends to keep one address); ports
  come from the given range (the original port first when it is inside), or,
  when none is given, the original port is kept if free and SNAT then falls
  back to the ephemeral range (``CtConfig.nat_ephemeral``). DNAT without
  ports keeps the destination port. The ICMP echo id is NAT'd like a source
  port. Returns None when the range is exhausted (at most ``MAX_PROBES``
  candidates are tried, which bounds the cost of a full huge range).
- ``NatInfo`` is what a NAT'd connection remembers: the translated and the
  original address/port of the NAT'd side.
- ``nat_packet`` / ``nat_related`` rewrite a packet in place with the
  ``ctxdp.packet`` helpers (checksums fixed incrementally): original-direction
  packets get the reply tuple's view, reply packets get the original view
  back, and ICMP errors get their quoted datagram translated as well as the
  outer address that carried the NAT'd endpoint.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctxdp.conntrack.conn import pack_key
from ctxdp.packet import rewrite_inner, set_dport, set_dst, set_sport, set_src

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Container

    from ctxdp.packet import Packet

__all__ = ["NatAction", "NatInfo", "select_reply", "nat_packet", "nat_related", "MAX_PROBES"]

# Candidate tuples tried before a NEW connection is refused. A range more
# than ~99% used may be reported exhausted early; in exchange a refused SYN
# costs at most this many dict probes (Linux stops after 128 attempts).
MAX_PROBES = 2048
# Ports tried per address before moving on, so a full first address cannot
# use up the whole budget of an address range.
MIN_PROBES_PER_ADDR = 64

_PORTED = frozenset({6, 17})  # protocols whose ports NAT may change
_ICMP = frozenset({1, 58})


@dataclass(frozen=True, slots=True)
class NatAction:
    """One NAT rule applied when a connection is committed."""

    kind: str
    addr_min: bytes
    addr_max: bytes | None = None
    port_min: int = 0
    port_max: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("snat", "dnat"):
            raise ValueError(f"NAT kind must be 'snat' or 'dnat', got {self.kind!r}")
        if len(self.addr_min) not in (4, 16):
            raise ValueError("NAT address must be 4 or 16 bytes")
        hi = self.addr_max
        if hi is not None and (len(hi) != len(self.addr_min) or hi < self.addr_min):
            raise ValueError("NAT addr_max must match addr_min's family and be >= it")
        if not 0 <= self.port_min <= 65535 or not 0 <= self.port_max <= 65535:
            raise ValueError("NAT ports must be 0..65535")
        if self.port_max and self.port_max < self.port_min:
            raise ValueError("NAT port_max < port_min")
        if self.port_max and not self.port_min:
            raise ValueError("NAT port_max given without port_min")

    @property
    def family(self) -> int:
        return 4 if len(self.addr_min) == 4 else 6

    @property
    def snat(self) -> bool:
        return self.kind == "snat"


class NatInfo:
    """Translation state of one connection.

    ``addr``/``port``: the NAT'd side as seen on the wire after translation
    (SNAT: new source; DNAT: new destination). ``oaddr``/``oport``: that side
    before translation. ``port``/``oport`` are None when the protocol has
    no port to translate.
    """

    __slots__ = ("snat", "dnat", "action", "addr", "port", "oaddr", "oport")

    def __init__(self, action: NatAction, addr: bytes, port: int | None,
                 oaddr: bytes, oport: int | None) -> None:
        self.snat = action.kind == "snat"
        self.dnat = not self.snat
        self.action = action
        self.addr = addr
        self.port = port
        self.oaddr = oaddr
        self.oport = oport

    def __repr__(self) -> str:
        return (f"<NatInfo {'snat' if self.snat else 'dnat'} {self.oaddr.hex()}:{self.oport}"
                f" -> {self.addr.hex()}:{self.port}>")


def _n_addrs(action: NatAction) -> int:
    if action.addr_max is None:
        return 1
    return int.from_bytes(action.addr_max, "big") - int.from_bytes(action.addr_min, "big") + 1


def _addrs(action: NatAction, seed: int):
    """Addresses of the range, starting at ``seed`` modulo its size."""
    lo = int.from_bytes(action.addr_min, "big")
    hi = int.from_bytes(action.addr_max, "big") if action.addr_max is not None else lo
    n = hi - lo + 1
    size = len(action.addr_min)
    first = seed % n
    for i in range(n):
        yield (lo + (first + i) % n).to_bytes(size, "big")


def _ports(lo: int, hi: int, first: int | None, seed: int, limit: int):
    """Up to ``limit`` ports of ``lo..hi``: ``first`` (if in range), then a
    seeded double-hashing walk (start and step from ``seed``, step coprime
    with the range size), so it visits every port without the clustering a
    linear scan builds up in a busy range."""
    n = hi - lo + 1
    if first is not None and lo <= first <= hi:
        yield first
    start = seed % n
    step = 1 + (seed >> 16) % n if n > 1 else 1
    while math.gcd(step, n) != 1:
        step += 1
    p = start
    for _ in range(min(n, limit)):
        port = lo + p
        if port != first:
            yield port
        p = (p + step) % n


def select_reply(
    table: Container[bytes],
    zone: int,
    proto: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    action: NatAction,
    ephemeral: tuple[int, int],
) -> tuple[bytes, NatInfo] | None:
    """Choose a collision-free reply key for a new connection (see module contract)."""
    if len(src) != len(action.addr_min):
        return None  # a NAT range of the other family cannot apply
    snat = action.kind == "snat"
    icmp = proto in _ICMP
    ported = proto in _PORTED or icmp
    aseed = zlib.crc32(src + dst)
    pseed = zlib.crc32(src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), proto)
    oaddr = src if snat else dst
    oport = sport if snat else dport  # for ICMP both are the echo id

    n_addrs = _n_addrs(action)
    if n_addrs == 1 and (not action.port_min or action.port_min <= oport <= (
            action.port_max or action.port_min)):
        # Fast path, the common case: one address, original port free.
        addr = action.addr_min
        if snat:
            rkey = pack_key(zone, proto, dst, addr, oport if icmp else dport, oport)
        else:
            rkey = pack_key(zone, proto, addr, src, oport, oport if icmp else sport)
        if rkey not in table:
            return rkey, NatInfo(action, addr, oport if ported else None, oaddr,
                                 oport if ported else None)

    # (port lo, port hi, port tried first, addresses to try)
    if not ported or (icmp and not snat):
        port_plans: list[tuple[int, int, int | None, int]] = [(oport, oport, oport, n_addrs)]
    elif action.port_min:
        port_plans = [(action.port_min, action.port_max or action.port_min, oport, n_addrs)]
    elif snat:
        # Keep the original port (on the first addresses), then go ephemeral.
        port_plans = [(oport, oport, oport, min(n_addrs, MIN_PROBES_PER_ADDR)),
                      (ephemeral[0], ephemeral[1], None, n_addrs)]
    else:
        port_plans = [(oport, oport, oport, n_addrs)]

    per_addr = max(MIN_PROBES_PER_ADDR, MAX_PROBES // n_addrs)
    budget = MAX_PROBES
    for plo, phi, pfirst, max_addrs in port_plans:
        for addr in itertools.islice(_addrs(action, aseed), max_addrs):
            for port in _ports(plo, phi, pfirst, pseed, per_addr):
                budget -= 1
                if budget < 0:
                    return None
                if snat:
                    # Reply travels dst -> translated source.
                    rkey = pack_key(zone, proto, dst, addr, port if icmp else dport, port)
                else:
                    rkey = pack_key(zone, proto, addr, src, port, port if icmp else sport)
                if rkey not in table:
                    if not ported:
                        return rkey, NatInfo(action, addr, None, oaddr, None)
                    return rkey, NatInfo(action, addr, port, oaddr, oport)
    return None


def nat_packet(buf: bytearray, pkt: Packet, info: NatInfo, reply: bool) -> None:
    """Translate a packet of a NAT'd connection in place (not an ICMP error)."""
    if info.snat:
        if reply:
            if pkt.dst != info.oaddr:
                set_dst(buf, pkt, info.oaddr)
            if info.oport is not None and pkt.dport != info.oport:
                set_dport(buf, pkt, info.oport)
        else:
            if pkt.src != info.addr:
                set_src(buf, pkt, info.addr)
            if info.port is not None and pkt.sport != info.port:
                set_sport(buf, pkt, info.port)
    else:
        if reply:
            if pkt.src != info.oaddr:
                set_src(buf, pkt, info.oaddr)
            if info.oport is not None and pkt.sport != info.oport:
                set_sport(buf, pkt, info.oport)
        else:
            if pkt.dst != info.addr:
                set_dst(buf, pkt, info.addr)
            if info.port is not None and pkt.dport != info.port:
                set_dport(buf, pkt, info.port)


def nat_related(buf: bytearray, pkt: Packet, info: NatInfo, reply: bool) -> None:
    """Translate an ICMP error related to a NAT'd connection, in place.

    ``reply``: the error travels in the connection's reply direction (it
    quotes an original-direction packet as it left the NAT). The quote is
    rewritten like a packet of the *opposite* direction; the outer address
    is rewritten only where it is the NAT'd endpoint itself.
    """
    inner = pkt.inner
    assert inner is not None
    if info.snat:
        if reply:
            # Quote: translated-src -> peer. Error goes to the translated address.
            rewrite_inner(buf, pkt, src=info.oaddr if inner.src != info.oaddr else None,
                          sport=_port_change(inner.sport, info.oport))
            if pkt.dst == info.addr:
                set_dst(buf, pkt, info.oaddr)
        else:
            # Quote: peer -> original src (a reply packet seen inside).
            rewrite_inner(buf, pkt, dst=info.addr if inner.dst != info.addr else None,
                          dport=_port_change(inner.dport, info.port))
            if pkt.src == info.oaddr:
                set_src(buf, pkt, info.addr)
    else:
        if reply:
            # Quote: originator -> translated dst. Error comes from that side.
            rewrite_inner(buf, pkt, dst=info.oaddr if inner.dst != info.oaddr else None,
                          dport=_port_change(inner.dport, info.oport))
            if pkt.src == info.addr:
                set_src(buf, pkt, info.oaddr)
        else:
            # Quote: original dst -> originator (a reply packet seen outside).
            rewrite_inner(buf, pkt, src=info.addr if inner.src != info.addr else None,
                          sport=_port_change(inner.sport, info.port))
            if pkt.dst == info.oaddr:
                set_dst(buf, pkt, info.addr)


def _port_change(cur: int, want: int | None) -> int | None:
    return None if want is None or cur == want else want
