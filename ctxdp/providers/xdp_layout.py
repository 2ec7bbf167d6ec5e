"""Python mirror of bpf/ct_offload.h: map key/value packing and checksum deltas.

Contract:
- ``KEY`` (44 bytes) and ``VAL`` (96 bytes) are ``struct.Struct`` objects with
  exactly the C layout; tests/bpf/test_layout.py checks every field offset
  against the ctypes types bcc derives from the header. Change the header and
  this module together.
- Host-order fields use the native byte order. The ``__be16`` ports are
  stored in the struct as the native ``H`` whose memory bytes are network
  order (``htons``); the helpers here do that swap, so callers pass plain
  host-order port numbers everywhere.
- Checksum deltas (``l3_csum_delta`` / ``l4_csum_delta``): with 16-bit one's
  complement arithmetic, for every 16-bit word w -> w' that the fast path
  changes, S += (~w & 0xffff) + w'. Words are taken the way the CPU loads them
  from the packet (native order), so the XDP program adds S to the checksum
  field as loaded, with no byte swap: ``csum' = ~fold(~csum + S)``. S is
  stored folded to 16 bits. The IPv4 l3 delta always includes the TTL
  decrement (the TTL/protocol word drops by 0x0100 in network order; packets
  with TTL <= 1 punt, so the decrement never wraps). The l4 delta covers the
  pseudo-header addresses and the ports (TCP/UDP), the echo identifier
  (ICMPv4: no pseudo-header) or the pseudo-header addresses plus the echo
  identifier (ICMPv6). A zero IPv4 UDP checksum is left alone by the program.
- Pure: no bcc, no syscalls. Per-entry helpers are written for batch installs
  of ~1M entries/s (no per-entry objects beyond the ints struct needs).
"""

from __future__ import annotations

import struct
import sys
from typing import NamedTuple

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers.base import FlowDir

__all__ = [
    "CT_F_DNAT",
    "CT_F_SNAT",
    "CT_F_TEARDOWN",
    "CT_MAX_PORTS",
    "CT_STAT_MAX",
    "CT_STAT_NAMES",
    "FlowVal",
    "KEY",
    "KEY_SIZE",
    "LAST_USED_STRIDE",
    "STAT",
    "VAL",
    "VAL_OFF",
    "VAL_SIZE",
    "csum_fold",
    "flowdir_entry",
    "flowdir_flags",
    "pack_flowdir_into",
    "htons",
    "l3_delta",
    "l4_delta",
    "ntohs",
    "pack_key",
    "pack_key_into",
    "pack_val_into",
    "unpack_key",
    "unpack_val",
]

# enum ct_flow_flags
CT_F_SNAT = 1 << 0
CT_F_DNAT = 1 << 1
CT_F_TEARDOWN = 1 << 8

CT_MAX_PORTS = 256

# enum ct_stat, in order (the index into the per-CPU ct_stats array).
CT_STAT_NAMES = (
    "hit",
    "miss",
    "punt_fin_rst",
    "punt_ttl",
    "punt_mtu",
    "punt_ipopt",
    "punt_frag",
    "punt_v6ext",
    "punt_unknown",
    "redirect_err",
)
STAT = {name: i for i, name in enumerate(CT_STAT_NAMES)}
CT_STAT_MAX = len(CT_STAT_NAMES)

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

# struct ct_flow_key: ifindex, family, proto, pad, sport(be), dport(be), src, dst
KEY = struct.Struct("=IBBHHH16s16s")
KEY_SIZE = KEY.size  # 44

# struct ct_flow_val: flags, out_ifindex, smac, dmac, mtu, pad0, nat_src,
# nat_dst, nat_sport(be), nat_dport(be), l3_csum_delta, l4_csum_delta, slot,
# packets, bytes, last_used
VAL = struct.Struct("=II6s6sHH16s16sHHIIIQQQ")
VAL_SIZE = VAL.size  # 96

#: Byte offset of every ct_flow_val field (for reading single fields out of
#: batch-lookup buffers without unpacking whole values).
VAL_OFF = {
    "flags": 0,
    "out_ifindex": 4,
    "smac": 8,
    "dmac": 14,
    "mtu": 20,
    "pad0": 22,
    "nat_src": 24,
    "nat_dst": 40,
    "nat_sport": 56,
    "nat_dport": 58,
    "l3_csum_delta": 60,
    "l4_csum_delta": 64,
    "slot": 68,
    "packets": 72,
    "bytes": 80,
    "last_used": 88,
}

#: ct_last_used is an array of u64: slot i is at byte i * LAST_USED_STRIDE.
LAST_USED_STRIDE = 8

_LITTLE = sys.byteorder == "little"


def htons(port: int) -> int:
    """The native u16 whose memory bytes are ``port`` in network order."""
    if _LITTLE:
        return ((port & 0xFF) << 8) | (port >> 8)
    return port


ntohs = htons  # the swap is its own inverse

# --- checksum deltas ---------------------------------------------------------
#
# One's-complement 16-bit arithmetic is arithmetic modulo 0xffff (0 and 0xffff
# both mean zero), and 2**16 == 1 (mod 0xffff). So the sum of the native
# 16-bit words of a byte string is int.from_bytes(string, native) % 0xffff,
# and sum(~w + w') over changed words is (N(new) - N(old)) % 0xffff. That makes
# a delta a couple of big-int operations instead of a per-word loop, which
# matters at a million entries per second.

_ORDER = sys.byteorder
# The TTL/protocol word as the CPU loads it changes by "one TTL": bytes
# [ttl, proto] -> [ttl - 1, proto], i.e. it drops by N(b"\x01\x00").
_TTL_DEC = -int.from_bytes(b"\x01\x00", _ORDER)


def csum_fold(s: int) -> int:
    """Fold a non-negative sum to 16 bits with end-around carry."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _n(b: bytes) -> int:
    """The native 16-bit words of ``b`` as one integer (sum them with % 0xffff)."""
    return int.from_bytes(b, _ORDER)


def l3_delta(family: int, old_src: bytes, new_src: bytes, old_dst: bytes, new_dst: bytes) -> int:
    """IPv4 header checksum delta: address changes plus the TTL decrement; 0 for IPv6."""
    if family != 4:
        return 0
    return (_n(new_src) - _n(old_src) + _n(new_dst) - _n(old_dst) + _TTL_DEC) % 0xFFFF


def l4_delta(
    family: int,
    proto: int,
    old_src: bytes,
    new_src: bytes,
    old_dst: bytes,
    new_dst: bytes,
    old_sport: int,
    new_sport: int,
    old_dport: int,
    new_dport: int,
) -> int:
    """L4 checksum delta for the rewrite old -> new (see the module contract).

    ICMP / ICMPv6 echo carry one identifier: ``old_sport`` -> ``new_sport``
    (the dport arguments are ignored).
    """
    if proto == IPPROTO_ICMP:  # no pseudo-header
        return (htons(new_sport) - htons(old_sport)) % 0xFFFF
    s = _n(new_src) - _n(old_src) + _n(new_dst) - _n(old_dst)
    if proto == IPPROTO_ICMPV6:
        return (s + htons(new_sport) - htons(old_sport)) % 0xFFFF
    return (s + htons(new_sport) - htons(old_sport) + htons(new_dport) - htons(old_dport)) % 0xFFFF


# --- keys --------------------------------------------------------------------


def pack_key_into(buf, off: int, ifindex: int, t: FlowTuple) -> None:
    """Write the ct_flow_key of tuple ``t`` arriving on ``ifindex`` at ``buf[off:]``."""
    KEY.pack_into(
        buf, off, ifindex, t.family, t.proto, 0, htons(t.sport), htons(t.dport), t.src, t.dst
    )


def pack_key(ifindex: int, t: FlowTuple) -> bytes:
    """The ct_flow_key of tuple ``t`` arriving on ``ifindex``."""
    return KEY.pack(ifindex, t.family, t.proto, 0, htons(t.sport), htons(t.dport), t.src, t.dst)


def unpack_key(buf, off: int = 0) -> tuple[int, FlowTuple]:
    """(ifindex, FlowTuple) of a packed key."""
    ifindex, fam, proto, _pad, sp, dp, src, dst = KEY.unpack_from(buf, off)
    alen = 4 if fam == 4 else 16
    return ifindex, FlowTuple(fam, proto, src[:alen], dst[:alen], ntohs(sp), ntohs(dp))


# --- values ------------------------------------------------------------------


class FlowVal(NamedTuple):
    """A decoded ct_flow_val (ports in host order, addresses 16 bytes)."""

    flags: int
    out_ifindex: int
    smac: bytes
    dmac: bytes
    mtu: int
    nat_src: bytes
    nat_dst: bytes
    nat_sport: int
    nat_dport: int
    l3_csum_delta: int
    l4_csum_delta: int
    slot: int
    packets: int
    bytes: int
    last_used: int


def pack_val_into(
    buf,
    off: int,
    *,
    match: FlowTuple,
    flags: int,
    out_ifindex: int,
    smac: bytes,
    dmac: bytes,
    mtu: int,
    nat_src: bytes,
    nat_dst: bytes,
    nat_sport: int,
    nat_dport: int,
    slot: int,
    packets: int = 0,
    nbytes: int = 0,
    last_used: int = 0,
) -> None:
    """Write a ct_flow_val at ``buf[off:]``, computing both checksum deltas.

    ``match`` is the tuple the entry's key matches (the packet before the
    rewrite). Only the rewrites the flags ask for enter the deltas: without
    CT_F_SNAT the source address/port stay as in ``match`` whatever
    ``nat_src``/``nat_sport`` hold, and likewise for CT_F_DNAT. For ICMP echo
    the identifier becomes ``nat_sport`` under CT_F_SNAT, else ``nat_dport``
    under CT_F_DNAT (the program does the same).
    """
    src, dst, sport, dport = match.src, match.dst, match.sport, match.dport
    new_src = nat_src if flags & CT_F_SNAT else src
    new_dst = nat_dst if flags & CT_F_DNAT else dst
    if match.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if flags & CT_F_SNAT:
            new_sport = nat_sport
        elif flags & CT_F_DNAT:
            new_sport = nat_dport
        else:
            new_sport = sport
        new_dport = new_sport
    else:
        new_sport = nat_sport if flags & CT_F_SNAT else sport
        new_dport = nat_dport if flags & CT_F_DNAT else dport
    fam = match.family
    l3 = l3_delta(fam, src, new_src, dst, new_dst)
    if flags & (CT_F_SNAT | CT_F_DNAT):
        l4 = l4_delta(
            fam, match.proto, src, new_src, dst, new_dst, sport, new_sport, dport, new_dport
        )
    else:
        l4 = 0
    VAL.pack_into(
        buf,
        off,
        flags,
        out_ifindex,
        smac,
        dmac,
        mtu,
        0,
        nat_src,
        nat_dst,
        htons(nat_sport),
        htons(nat_dport),
        l3,
        l4,
        slot,
        packets,
        nbytes,
        last_used,
    )


def unpack_val(buf, off: int = 0) -> FlowVal:
    """Decode the ct_flow_val at ``buf[off:]``."""
    (
        flags,
        out_ifindex,
        smac,
        dmac,
        mtu,
        _pad0,
        nat_src,
        nat_dst,
        nsp,
        ndp,
        l3,
        l4,
        slot,
        packets,
        nbytes,
        last_used,
    ) = VAL.unpack_from(buf, off)
    return FlowVal(
        flags,
        out_ifindex,
        smac,
        dmac,
        mtu,
        nat_src,
        nat_dst,
        ntohs(nsp),
        ntohs(ndp),
        l3,
        l4,
        slot,
        packets,
        nbytes,
        last_used,
    )


def flowdir_flags(d: FlowDir) -> int:
    """CT_F_SNAT if source address/port change, CT_F_DNAT if destination does."""
    m, o = d.match, d.out
    flags = 0
    if m.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        # One echo identifier: charge its change to whichever side is
        # translated (SNAT when neither address changes).
        if m.src != o.src:
            flags |= CT_F_SNAT
        if m.dst != o.dst:
            flags |= CT_F_DNAT
        if m.sport != o.sport and not flags:
            flags = CT_F_SNAT
        return flags
    if m.src != o.src or m.sport != o.sport:
        flags |= CT_F_SNAT
    if m.dst != o.dst or m.dport != o.dport:
        flags |= CT_F_DNAT
    return flags


_ICMPS = (IPPROTO_ICMP, IPPROTO_ICMPV6)
# htons as a table lookup: an index is cheaper than a call in the batch loop.
_SWAP = tuple(htons(p) for p in range(65536))
_KEY_PACK_INTO = KEY.pack_into
_VAL_PACK_INTO = VAL.pack_into


def pack_flowdir_into(
    kbuf,
    koff: int,
    vbuf,
    voff: int,
    d: FlowDir,
    slot: int,
    *,
    _fb=int.from_bytes,  # bound as locals: this runs a million times a second
    _o=_ORDER,
    _sw=_SWAP,
    _kp=_KEY_PACK_INTO,
    _vp=_VAL_PACK_INTO,
) -> int:
    """Pack one direction's key at ``kbuf[koff:]`` and value at ``vbuf[voff:]``.

    The batch-install fast path: flags and both checksum deltas computed
    inline (same results as ``flowdir_flags`` + ``pack_val_into``), no
    intermediate objects. ``d`` must be resolved. Returns the flags.
    """
    fam, proto, msrc, mdst, msp, mdp = d.match
    _f, _p, osrc, odst, osp, odp = d.out
    hmsp, hmdp, hosp, hodp = _sw[msp], _sw[mdp], _sw[osp], _sw[odp]
    _kp(kbuf, koff, d.in_ifindex, fam, proto, 0, hmsp, hmdp, msrc, mdst)
    # Address part of both deltas (0 when nothing moves).
    a = 0
    if msrc != osrc:
        a = _fb(osrc, _o) - _fb(msrc, _o)
    if mdst != odst:
        a += _fb(odst, _o) - _fb(mdst, _o)
    l3 = (a + _TTL_DEC) % 0xFFFF if fam == 4 else 0
    if proto in _ICMPS:
        flags = (CT_F_SNAT if msrc != osrc else 0) | (CT_F_DNAT if mdst != odst else 0)
        if msp != osp:
            flags = flags or CT_F_SNAT
            pd = hosp - hmsp
        else:
            pd = 0
        l4 = (pd if proto == IPPROTO_ICMP else a + pd) % 0xFFFF
    else:
        flags = (CT_F_SNAT if msrc != osrc or msp != osp else 0) | (
            CT_F_DNAT if mdst != odst or mdp != odp else 0
        )
        l4 = (a + hosp - hmsp + hodp - hmdp) % 0xFFFF if flags else 0
    _vp(
        vbuf,
        voff,
        flags,
        d.out_ifindex,
        d.src_mac,
        d.dst_mac,
        d.mtu,
        0,
        osrc,
        odst,
        hosp,
        hodp,
        l3,
        l4,
        slot,
        0,
        0,
        0,
    )
    return flags


def flowdir_entry(d: FlowDir, slot: int) -> tuple[bytes, bytes]:
    """(key, value) bytes for one direction of an offloaded connection.

    The key is ``d.match`` on ``d.in_ifindex``; the value rewrites to
    ``d.out``, sets the MACs (``d`` must be resolved), egress port and MTU,
    and points at ``slot`` in ct_last_used. Counters start at zero.
    """
    if d.src_mac is None or d.dst_mac is None:
        raise ValueError("flow direction has no resolved next hop")
    key = bytearray(KEY_SIZE)
    val = bytearray(VAL_SIZE)
    pack_flowdir_into(key, 0, val, 0, d, slot)
    return bytes(key), bytes(val)
