"""Python mirror of bpf/ct_offload.h: map keys/values, packing and checksum deltas.

Contract:
- Two flow maps, one per family (``MAP_OF``): ``ct_flows4`` keyed by
  ``KEY4`` (struct ct_flow_key4, 20 bytes) and ``ct_flows6`` keyed by ``KEY``
  (struct ct_flow_key, 44 bytes, family-generic). ``flow_key(ifindex, t)`` is
  the key the XDP program looks tuple ``t`` up with in ``MAP_OF[t.family]``;
  ``unpack_flow_key`` reverses it whatever its family (by length).
  ``pack_key`` / ``pack_key_into`` / ``unpack_key`` always use the 44-byte
  generic ``KEY`` (for IPv4 that is NOT what ct_flows4 holds).
- ``VAL`` (struct ct_flow_val) is ``80 + 16 * CNT_SLOTS`` bytes: the counters
  are per-CPU slots inside the value, and their number depends on this
  machine's possible CPUs, read once at import from sysfs (``NR_CPUS``,
  ``CNT_SLOTS``). Every build of the program must get ``cflags()`` so that the
  C struct has the same size; tests/bpf/test_layout.py checks every field
  offset against the ctypes types bcc derives from the header. Change the
  header and this module together.
- Values hold the whole tuple a packet leaves with: ``nat_src`` /
  ``nat_dst`` / ``nat_sport`` / ``nat_dport`` equal the key's fields where no
  NAT applies (the program writes them without a branch per field). ICMP
  echo: the identifier leaves as ``nat_sport`` == ``nat_dport``.
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
- Pure apart from that one sysfs read: no bcc, no syscalls.
  ``conn_entries_into`` is the batch-install fast path (both directions of a
  connection in one call, three struct calls, no intermediate objects).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import NamedTuple

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers.base import FlowDir

__all__ = [
    "CNT_OFF",
    "CNT_SLOTS",
    "CNT_SLOT_CAP",
    "CT_F_DNAT",
    "CT_F_SNAT",
    "CT_F_TEARDOWN",
    "CT_MAX_PORTS",
    "CT_STAT_MAX",
    "CT_STAT_NAMES",
    "FlowVal",
    "KEY",
    "KEY4",
    "KEY4_SIZE",
    "KEY_SIZE",
    "LAST_USED_STRIDE",
    "MAP_OF",
    "NR_CPUS",
    "STAT",
    "VAL",
    "VAL_OFF",
    "VAL_SIZE",
    "cflags",
    "cnt_slots",
    "conn_entries",
    "conn_entries_into",
    "csum_fold",
    "flow_key",
    "flowdir_entry",
    "flowdir_flags",
    "htons",
    "key_size",
    "l3_delta",
    "l4_delta",
    "ntohs",
    "pack_key",
    "pack_key4",
    "pack_key_into",
    "pack_val_into",
    "unpack_flow_key",
    "unpack_key",
    "unpack_key4",
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

#: family -> the flow map the program looks that family up in.
MAP_OF = {4: "ct_flows4", 6: "ct_flows6"}

# --- per-CPU counter slots ---------------------------------------------------

#: At most this many counter slots per value: beyond it CPUs share slots (with
#: atomic adds in the program), so memory per entry stays bounded.
CNT_SLOT_CAP = 16


def _nr_cpus() -> int:
    """The kernel's nr_cpu_ids: highest possible CPU id + 1 (what
    bpf_get_smp_processor_id() can return is below it)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
        return max(int(part.rpartition("-")[2]) for part in spec.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def cnt_slots(nr_cpus: int, cap: int = CNT_SLOT_CAP) -> int:
    """Counter slots for ``nr_cpus`` CPUs: the power of two >= min(nr_cpus, cap)."""
    n = 1
    while n < min(nr_cpus, cap):
        n <<= 1
    return n


NR_CPUS = _nr_cpus()
CNT_SLOTS = cnt_slots(NR_CPUS)


def cflags() -> list[str]:
    """The -D flags every build of ct_offload.c needs to match ``VAL``."""
    return [f"-DCT_NR_CPUS={NR_CPUS}", f"-DCT_CNT_SLOTS={CNT_SLOTS}"]


# --- structs -------------------------------------------------------------------

# struct ct_flow_key4: ifindex, src, dst, sport(be), dport(be), proto, pad[3]
KEY4 = struct.Struct("=I4s4sHHB3x")
KEY4_SIZE = KEY4.size  # 20

# struct ct_flow_key: ifindex, family, proto, pad, sport(be), dport(be), src, dst
KEY = struct.Struct("=IBBHHH16s16s")
KEY_SIZE = KEY.size  # 44
_KEY6 = struct.Struct("=IBB2xHH16s16s")  # KEY without the pad argument

# struct ct_flow_val: flags, out_ifindex, smac, dmac, mtu, pad0, nat_src,
# nat_dst, nat_sport(be), nat_dport(be), l3_csum_delta, l4_csum_delta, slot,
# last_used, then CNT_SLOTS x (packets, bytes)
VAL = struct.Struct(f"=II6s6sHH16s16sHHIIIQ{2 * CNT_SLOTS}Q")
VAL_SIZE = VAL.size  # 80 + 16 * CNT_SLOTS

#: Byte offset of every ct_flow_val field (for reading single fields out of
#: batch-lookup buffers without unpacking whole values). ``cnt`` is the first
#: slot's packets; slot i's packets / bytes are at cnt + 16 i / cnt + 16 i + 8.
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
    "last_used": 72,
    "cnt": 80,
}
CNT_OFF = VAL_OFF["cnt"]

# The configuration part of a value, with last_used and the counters as
# zero-filled pad bytes (struct zero-fills them): what installs write. _VAL2
# is two of them back to back, both values of a connection in one call.
_VAL_BODY = f"II6s6sH2x16s16sHHIII8x{16 * CNT_SLOTS}x"
_VAL_NEW = struct.Struct("=" + _VAL_BODY)
_VAL2 = struct.Struct("=" + _VAL_BODY * 2)
assert _VAL_NEW.size == VAL_SIZE

#: ct_last_used is an array of u64: slot i is at byte i * LAST_USED_STRIDE.
LAST_USED_STRIDE = 8

_LITTLE = sys.byteorder == "little"


def key_size(family: int) -> int:
    """Key size of the flow map of ``family``."""
    return KEY4_SIZE if family == 4 else KEY_SIZE


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


def pack_key4(ifindex: int, t: FlowTuple) -> bytes:
    """The ct_flow_key4 (ct_flows4) of IPv4 tuple ``t`` arriving on ``ifindex``."""
    return KEY4.pack(ifindex, t.src, t.dst, htons(t.sport), htons(t.dport), t.proto)


def pack_key_into(buf, off: int, ifindex: int, t: FlowTuple) -> None:
    """Write the generic 44-byte ct_flow_key of ``t`` at ``buf[off:]``."""
    KEY.pack_into(
        buf, off, ifindex, t.family, t.proto, 0, htons(t.sport), htons(t.dport), t.src, t.dst
    )


def pack_key(ifindex: int, t: FlowTuple) -> bytes:
    """The generic 44-byte ct_flow_key of ``t`` (ct_flows6's key for IPv6)."""
    return KEY.pack(ifindex, t.family, t.proto, 0, htons(t.sport), htons(t.dport), t.src, t.dst)


def flow_key(ifindex: int, t: FlowTuple) -> bytes:
    """The key the program looks ``t`` up with, in ``MAP_OF[t.family]``."""
    return pack_key4(ifindex, t) if t.family == 4 else pack_key(ifindex, t)


def unpack_key4(buf, off: int = 0) -> tuple[int, FlowTuple]:
    """(ifindex, FlowTuple) of a packed ct_flow_key4."""
    ifindex, src, dst, sp, dp, proto = KEY4.unpack_from(buf, off)
    return ifindex, FlowTuple(4, proto, src, dst, ntohs(sp), ntohs(dp))


def unpack_key(buf, off: int = 0) -> tuple[int, FlowTuple]:
    """(ifindex, FlowTuple) of a packed generic ct_flow_key."""
    ifindex, fam, proto, _pad, sp, dp, src, dst = KEY.unpack_from(buf, off)
    alen = 4 if fam == 4 else 16
    return ifindex, FlowTuple(fam, proto, src[:alen], dst[:alen], ntohs(sp), ntohs(dp))


def unpack_flow_key(key: bytes) -> tuple[int, FlowTuple]:
    """(ifindex, FlowTuple) of a key of either flow map (told apart by length)."""
    return unpack_key4(key) if len(key) == KEY4_SIZE else unpack_key(key)


# --- values ------------------------------------------------------------------


class FlowVal(NamedTuple):
    """A decoded ct_flow_val (ports in host order, addresses 16 bytes,
    counters summed over the per-CPU slots)."""

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
    rewrite). Only the rewrites the flags ask for happen: without CT_F_SNAT
    the source address/port stay as in ``match`` whatever ``nat_src`` /
    ``nat_sport`` hold (and the value stores ``match``'s), likewise for
    CT_F_DNAT. For ICMP echo the identifier becomes ``nat_sport`` under
    CT_F_SNAT, else ``nat_dport`` under CT_F_DNAT. ``packets`` / ``nbytes``
    go to counter slot 0.
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
    counters = [0] * (2 * CNT_SLOTS)
    counters[0], counters[1] = packets, nbytes
    VAL.pack_into(
        buf,
        off,
        flags,
        out_ifindex,
        smac,
        dmac,
        mtu,
        0,
        new_src,
        new_dst,
        htons(new_sport),
        htons(new_dport),
        l3,
        l4,
        slot,
        last_used,
        *counters,
    )


def unpack_val(buf, off: int = 0) -> FlowVal:
    """Decode the ct_flow_val at ``buf[off:]`` (counters summed over slots)."""
    f = VAL.unpack_from(buf, off)
    cnt = f[14:]
    return FlowVal(
        f[0],  # flags
        f[1],  # out_ifindex
        f[2],  # smac
        f[3],  # dmac
        f[4],  # mtu (f[5] is pad0)
        f[6],  # nat_src
        f[7],  # nat_dst
        ntohs(f[8]),
        ntohs(f[9]),
        f[10],  # l3_csum_delta
        f[11],  # l4_csum_delta
        f[12],  # slot
        sum(cnt[0::2]),
        sum(cnt[1::2]),
        f[13],  # last_used
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


def _icmp_flags_l4(proto: int, srcs: bool, dsts: bool, msp: int, osp: int, d: int) -> tuple:
    """(flags, l4 delta) of an ICMP / ICMPv6 echo direction: one identifier,
    charged to SNAT unless only the destination moves (``flowdir_flags``).
    ``d`` is the address part of the delta; ports are native-order words."""
    flags = (CT_F_SNAT if srcs else 0) | (CT_F_DNAT if dsts else 0)
    if msp != osp:
        flags = flags or CT_F_SNAT
        pd = osp - msp
    else:
        pd = 0
    return flags, (pd if proto == IPPROTO_ICMP else d + pd) % 0xFFFF


def conn_entries_into(
    vbuf,
    voff: int,
    d0: FlowDir,
    d1: FlowDir,
    slot: int,
    *,
    _fb=int.from_bytes,  # bound as locals: this runs a million times a second
    _o=_ORDER,
    _sw=_SWAP,
    _ttl=_TTL_DEC,
    _k4=KEY4.pack,
    _k6=_KEY6.pack,
    _v2=_VAL2.pack_into,
    _icmps=_ICMPS,
) -> tuple[bytes, bytes]:
    """Pack a connection's two direction entries: returns both keys, writes
    both values at ``vbuf[voff:voff + 2 * VAL_SIZE]``.

    The batch-install fast path: keys (as ``bytes``, ready to be index keys)
    for ``MAP_OF[family]`` (20 or 44 bytes), the two ct_flow_vals back to
    back into the caller's buffer (no allocation per connection), flags and
    both checksum deltas computed inline (same results as ``flowdir_flags``
    + ``pack_val_into``), last_used and the counters zero.
    Both directions must be resolved; ValueError if they differ in family or
    protocol (no map entry pair can hold that).
    Written out for both directions (no loop, no per-direction call) because
    that halves its cost; when ``d1`` is ``d0`` reversed, as conntrack builds
    it, the address words of its deltas are ``d0``'s negated.
    """
    fam, proto, msrc, mdst, msp, mdp = d0.match
    _f, _p, osrc, odst, osp, odp = d0.out
    fam1, proto1, msrc1, mdst1, msp1, mdp1 = d1.match
    _f1, _p1, osrc1, odst1, osp1, odp1 = d1.out
    if fam != fam1 or proto != proto1:
        raise ValueError("the two directions differ in family or protocol")
    hmsp, hmdp, hosp, hodp = _sw[msp], _sw[mdp], _sw[osp], _sw[odp]
    hmsp1, hmdp1, hosp1, hodp1 = _sw[msp1], _sw[mdp1], _sw[osp1], _sw[odp1]
    # Address part of the deltas: native words new - old (0 when nothing moves).
    s0, t0 = msrc != osrc, mdst != odst
    a0 = (_fb(osrc, _o) - _fb(msrc, _o) if s0 else 0) + (_fb(odst, _o) - _fb(mdst, _o) if t0 else 0)
    if msrc1 is odst and mdst1 is osrc and osrc1 is mdst and odst1 is msrc:
        s1, t1, a1 = t0, s0, -a0  # d1 == d0 reversed (same address objects)
    else:
        s1, t1 = msrc1 != osrc1, mdst1 != odst1
        a1 = (_fb(osrc1, _o) - _fb(msrc1, _o) if s1 else 0) + (
            _fb(odst1, _o) - _fb(mdst1, _o) if t1 else 0
        )
    if proto in _icmps:
        f0, l40 = _icmp_flags_l4(proto, s0, t0, hmsp, hosp, a0)
        f1, l41 = _icmp_flags_l4(proto, s1, t1, hmsp1, hosp1, a1)
    else:
        f0 = (CT_F_SNAT if s0 or msp != osp else 0) | (CT_F_DNAT if t0 or mdp != odp else 0)
        f1 = (CT_F_SNAT if s1 or msp1 != osp1 else 0) | (CT_F_DNAT if t1 or mdp1 != odp1 else 0)
        l40 = (a0 + hosp - hmsp + hodp - hmdp) % 0xFFFF if f0 else 0
        l41 = (a1 + hosp1 - hmsp1 + hodp1 - hmdp1) % 0xFFFF if f1 else 0
    if fam == 4:
        l30, l31 = (a0 + _ttl) % 0xFFFF, (a1 + _ttl) % 0xFFFF
        k0 = _k4(d0.in_ifindex, msrc, mdst, hmsp, hmdp, proto)
        k1 = _k4(d1.in_ifindex, msrc1, mdst1, hmsp1, hmdp1, proto)
    else:
        l30 = l31 = 0
        k0 = _k6(d0.in_ifindex, fam, proto, hmsp, hmdp, msrc, mdst)
        k1 = _k6(d1.in_ifindex, fam, proto, hmsp1, hmdp1, msrc1, mdst1)
    _v2(
        vbuf, voff,
        f0, d0.out_ifindex, d0.src_mac, d0.dst_mac, d0.mtu,
        osrc, odst, hosp, hodp, l30, l40, slot,
        f1, d1.out_ifindex, d1.src_mac, d1.dst_mac, d1.mtu,
        osrc1, odst1, hosp1, hodp1, l31, l41, slot,
    )  # fmt: skip
    return k0, k1


def conn_entries(d0: FlowDir, d1: FlowDir, slot: int) -> tuple[bytes, bytes, bytes]:
    """(key 0, key 1, both values) of a connection: ``conn_entries_into`` with
    a buffer of its own."""
    vals = bytearray(2 * VAL_SIZE)
    k0, k1 = conn_entries_into(vals, 0, d0, d1, slot)
    return k0, k1, bytes(vals)


def flowdir_entry(d: FlowDir, slot: int) -> tuple[bytes, bytes]:
    """(key, value) bytes for one direction of an offloaded connection.

    The key is ``flow_key(d.in_ifindex, d.match)``; the value rewrites to
    ``d.out``, sets the MACs (``d`` must be resolved), egress port and MTU,
    and points at ``slot`` in ct_last_used. Counters start at zero.
    """
    if d.src_mac is None or d.dst_mac is None:
        raise ValueError("flow direction has no resolved next hop")
    key, _k, vals = conn_entries(d, d, slot)
    return key, vals[:VAL_SIZE]
