"""ctxdp.providers.xdp_layout mirrors bpf/ct_offload.h exactly, and its
checksum deltas, applied the way the XDP program applies them, give the
checksums scapy computes from scratch."""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

import pytest

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers import xdp_layout as L
from ctxdp.providers.base import FlowDir
from tests.privileged import require_bcc

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

PROBE = r"""
#include "ct_offload.h"
BPF_HASH(layout_probe, struct ct_flow_key, struct ct_flow_val, 4);
BPF_HASH(layout_probe4, struct ct_flow_key4, struct ct_flow_val, 4);
"""

# Field names of the C structs in declaration order, with the Python format
# item each one corresponds to in KEY4 / KEY / VAL. VAL's last C field is the
# counter array, which the Python format spells as 2 * CNT_SLOTS u64 items.
KEY4_FIELDS = ["ifindex", "src", "dst", "sport", "dport", "proto", "pad"]
KEY_FIELDS = ["ifindex", "family", "proto", "pad", "sport", "dport", "src", "dst"]
VAL_FIELDS = list(L.VAL_OFF)


def _struct_offsets(s: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of every item of a struct format without implicit
    padding (``Ns`` and ``Nx`` are one item of N bytes)."""
    out, off = [], 0
    fmt = s.format.lstrip("=<>!@")
    i = 0
    while i < len(fmt):
        j = i
        while fmt[j].isdigit():
            j += 1
        n = int(fmt[i:j]) if j > i else 1
        code = fmt[j]
        size = struct.calcsize("=" + code)
        if code in "sx":
            out.append((off, n))
            off += n
        else:
            for _ in range(n):
                out.append((off, size))
                off += size
        i = j + 1
    return out


@pytest.fixture(scope="module")
def bcc_types():
    """(key4, key, leaf) ctypes types bcc derives from the header, compiled once
    with the counter-slot flags every build of the program gets."""
    bcc = require_bcc()
    b = bcc.BPF(text=PROBE.encode(), cflags=[f"-I{BPF_DIR}", *L.cflags()])
    try:
        t, t4 = b[b"layout_probe"], b[b"layout_probe4"]
        yield t4.Key, t.Key, t.Leaf
    finally:
        b.cleanup()


@pytest.mark.privileged
def test_sizes_match_bcc(bcc_types):
    """KEY4 is 20 bytes, KEY 44 and VAL 80 + 16 per counter slot, as bcc sizes them."""
    key4_t, key_t, leaf_t = bcc_types
    assert ctypes.sizeof(key4_t) == L.KEY4.size == L.KEY4_SIZE == 20
    assert ctypes.sizeof(key_t) == L.KEY.size == L.KEY_SIZE == 44
    assert ctypes.sizeof(leaf_t) == L.VAL.size == L.VAL_SIZE == 80 + 16 * L.CNT_SLOTS


@pytest.mark.privileged
@pytest.mark.parametrize("which", ["key4", "key", "val"])
def test_every_field_offset_matches_bcc(bcc_types, which):
    """Every C field has the offset and size of the matching Python struct item."""
    key4_t, key_t, leaf_t = bcc_types
    ctype, pys, names = {
        "key4": (key4_t, L.KEY4, KEY4_FIELDS),
        "key": (key_t, L.KEY, KEY_FIELDS),
        "val": (leaf_t, L.VAL, VAL_FIELDS),
    }[which]
    assert [f[0] for f in ctype._fields_] == names
    items = _struct_offsets(pys)
    if which == "val":  # cnt[CNT_SLOTS]: 2 * CNT_SLOTS u64 items in Python
        cnt = items[len(names) - 1 :]
        assert cnt == [(L.CNT_OFF + 8 * i, 8) for i in range(2 * L.CNT_SLOTS)]
        items = items[: len(names) - 1] + [(L.CNT_OFF, 16 * L.CNT_SLOTS)]
    assert len(items) == len(names)
    for name, (off, size) in zip(names, items, strict=True):
        field = getattr(ctype, name)
        assert (field.offset, field.size) == (off, size), name
    if which == "val":
        assert {n: getattr(ctype, n).offset for n in names} == L.VAL_OFF


def test_counter_slots_cover_every_cpu_or_cap():
    """Counter slots are a power of two covering every CPU id (plain adds), or the
    cap (CPUs share slots, and the build makes the adds atomic)."""
    assert L.cnt_slots(1) == 1 and L.cnt_slots(2) == 2 and L.cnt_slots(3) == 4
    assert L.cnt_slots(16) == 16 and L.cnt_slots(17) == 16 and L.cnt_slots(512) == 16
    assert L.CNT_SLOTS == L.cnt_slots(L.NR_CPUS)
    assert f"-DCT_CNT_SLOTS={L.CNT_SLOTS}" in L.cflags()
    assert f"-DCT_NR_CPUS={L.NR_CPUS}" in L.cflags()


@pytest.mark.privileged
def test_packed_key_reads_back_through_bcc(bcc_types):
    """Keys packed in Python decode field by field through bcc's ctypes types."""
    key4_t, key_t, _ = bcc_types
    t = FlowTuple(4, 6, bytes([10, 0, 0, 1]), bytes([192, 168, 1, 2]), 40000, 443)
    k = key_t.from_buffer_copy(L.pack_key(7, t))
    assert (k.ifindex, k.family, k.proto, k.pad) == (7, 4, 6, 0)
    assert bytes(k.src)[:4] == t.src and bytes(k.src)[4:] == bytes(12)
    assert bytes(k.dst)[:4] == t.dst
    # __be16: the memory bytes are network order
    assert struct.pack("=H", k.sport) == (40000).to_bytes(2, "big")
    assert struct.pack("=H", k.dport) == (443).to_bytes(2, "big")
    k4 = key4_t.from_buffer_copy(L.flow_key(7, t))
    assert (k4.ifindex, k4.proto, bytes(k4.pad)) == (7, 6, bytes(3))
    assert struct.pack("=I", k4.src) == t.src and struct.pack("=I", k4.dst) == t.dst
    assert struct.pack("=H", k4.sport) == (40000).to_bytes(2, "big")
    assert struct.pack("=H", k4.dport) == (443).to_bytes(2, "big")


def test_key_roundtrip():
    """unpack_key inverts pack_key / pack_key_into, unpack_flow_key inverts
    flow_key (20 bytes for IPv4, the generic 44 for IPv6)."""
    for t in (
        FlowTuple(4, 17, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 65535),
        FlowTuple(6, 58, bytes(range(16)), bytes(range(16, 32)), 77, 77),
    ):
        buf = bytearray(100)
        L.pack_key_into(buf, 50, 3, t)
        assert bytes(buf[50:94]) == L.pack_key(3, t)
        assert L.unpack_key(buf, 50) == (3, t)
        k = L.flow_key(3, t)
        assert len(k) == L.key_size(t.family) == (20 if t.family == 4 else 44)
        assert L.unpack_flow_key(k) == (3, t)
    assert L.MAP_OF == {4: "ct_flows4", 6: "ct_flows6"}


def test_flowdir_entry_fields():
    """flowdir_entry keys the match tuple and stores the whole out tuple (the
    unchanged destination too), MACs, MTU and slot."""
    m = FlowTuple(4, 6, b"\x0a\x00\x00\x02", b"\xc0\x00\x02\x01", 1234, 80)
    o = FlowTuple(4, 6, b"\xcb\x00\x71\x05", b"\xc0\x00\x02\x01", 61000, 80)
    d = FlowDir(3, m, o, 5, b"\x02" * 6, b"\x04" * 6, mtu=1400)
    key, val = L.flowdir_entry(d, 42)
    assert L.unpack_flow_key(key) == (3, m) and len(key) == L.KEY4_SIZE
    v = L.unpack_val(val)
    assert v.flags == L.CT_F_SNAT
    assert (v.out_ifindex, v.smac, v.dmac, v.mtu, v.slot) == (5, d.src_mac, d.dst_mac, 1400, 42)
    assert v.nat_src[:4] == o.src and v.nat_sport == 61000
    assert v.nat_dst[:4] == o.dst and v.nat_dport == 80
    assert (v.packets, v.bytes, v.last_used) == (0, 0, 0)


def test_flowdir_flags():
    """SNAT/DNAT flags follow which side of the tuple changes (ICMP: one id)."""
    a, b, n = b"\x01\x01\x01\x01", b"\x02\x02\x02\x02", b"\x03\x03\x03\x03"

    def flags(m, o):
        return L.flowdir_flags(FlowDir(1, m, o, 2, b"\0" * 6, b"\0" * 6))

    tcp = FlowTuple(4, 6, a, b, 1000, 80)
    assert flags(tcp, tcp) == 0
    assert flags(tcp, tcp._replace(sport=2000)) == L.CT_F_SNAT
    assert flags(tcp, tcp._replace(dst=n, dport=8080)) == L.CT_F_DNAT
    assert flags(tcp, tcp._replace(src=n, dst=n)) == L.CT_F_SNAT | L.CT_F_DNAT
    icmp = FlowTuple(4, 1, a, b, 9, 9)
    assert flags(icmp, icmp._replace(src=n, sport=10, dport=10)) == L.CT_F_SNAT
    assert flags(icmp, icmp._replace(dst=n, sport=10, dport=10)) == L.CT_F_DNAT
    assert flags(icmp, icmp._replace(sport=10, dport=10)) == L.CT_F_SNAT


def test_unresolved_flowdir_refused():
    """An unresolved next hop cannot become a map entry."""
    t = FlowTuple(4, 6, b"\1" * 4, b"\2" * 4, 1, 2)
    with pytest.raises(ValueError):
        L.flowdir_entry(FlowDir(1, t, t, 2, b"\0" * 6, None), 0)


# --- checksum deltas, checked against scapy without the kernel ---------------


def _apply(csum_field: bytes, delta: int) -> bytes:
    """What the XDP program does: csum' = ~fold(~csum + S), on native words."""
    (c,) = struct.unpack("=H", csum_field)
    return struct.pack("=H", ~L.csum_fold((~c & 0xFFFF) + delta) & 0xFFFF)


def _nat_case(family, proto, flags, scapy):
    from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: PLC0415
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6  # noqa: PLC0415

    if family == 4:
        src, dst, nsrc, ndst = "10.0.0.2", "192.0.2.1", "203.0.113.5", "198.51.100.9"
        ip_old = IP(src=src, dst=dst, ttl=64)
        ip_new = IP(
            src=nsrc if flags & L.CT_F_SNAT else src,
            dst=ndst if flags & L.CT_F_DNAT else dst,
            ttl=63,
        )
    else:
        src, dst, nsrc, ndst = "fd00::2", "2001:db8::1", "2001:db8:ffff::5", "fd00:1::9"
        ip_old = IPv6(src=src, dst=dst, hlim=64)
        ip_new = IPv6(
            src=nsrc if flags & L.CT_F_SNAT else src,
            dst=ndst if flags & L.CT_F_DNAT else dst,
            hlim=63,
        )
    sp, dp, nsp, ndp = 40000, 53, 61000, 5353
    if proto == 6:
        l4o, l4n = (
            TCP(sport=sp, dport=dp, flags="A"),
            TCP(
                sport=nsp if flags & L.CT_F_SNAT else sp,
                dport=ndp if flags & L.CT_F_DNAT else dp,
                flags="A",
            ),
        )
    elif proto == 17:
        l4o, l4n = (
            UDP(sport=sp, dport=dp),
            UDP(sport=nsp if flags & L.CT_F_SNAT else sp, dport=ndp if flags & L.CT_F_DNAT else dp),
        )
    else:
        nid = nsp if flags & L.CT_F_SNAT else (ndp if flags & L.CT_F_DNAT else sp)
        if family == 4:
            l4o, l4n = ICMP(type=8, id=sp, seq=1), ICMP(type=8, id=nid, seq=1)
        else:
            l4o, l4n = ICMPv6EchoRequest(id=sp, seq=1), ICMPv6EchoRequest(id=nid, seq=1)
    old = scapy.raw(ip_old / l4o / b"payload-bytes")
    new = scapy.raw(ip_new / l4n / b"payload-bytes")
    fam = family
    a = 4 if fam == 4 else 16
    so = 12 if fam == 4 else 8
    t = FlowTuple(
        fam, proto, old[so : so + a], old[so + a : so + 2 * a], sp, sp if proto in (1, 58) else dp
    )
    nat_src = new[so : so + a]
    nat_dst = new[so + a : so + 2 * a]
    buf = bytearray(L.VAL_SIZE)
    L.pack_val_into(
        buf,
        0,
        match=t,
        flags=flags,
        out_ifindex=1,
        smac=b"\0" * 6,
        dmac=b"\0" * 6,
        mtu=1500,
        nat_src=nat_src,
        nat_dst=nat_dst,
        nat_sport=nsp,
        nat_dport=ndp,
        slot=0,
    )
    return old, new, L.unpack_val(buf)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [6, 17, 1])
@pytest.mark.parametrize("flags", [0, L.CT_F_SNAT, L.CT_F_DNAT, L.CT_F_SNAT | L.CT_F_DNAT])
def test_deltas_reproduce_scapy_checksums(family, proto, flags):
    """Applying l3/l4 deltas to the old checksums yields scapy's new checksums."""
    scapy = pytest.importorskip("scapy.all")
    if proto == 1 and family == 6:
        proto = 58
    old, new, v = _nat_case(family, proto, flags, scapy)
    l4 = 20 if family == 4 else 40
    ck = {6: 16, 17: 6, 1: 2, 58: 2}[proto]
    if family == 4:
        assert _apply(old[10:12], v.l3_csum_delta) == new[10:12]
    else:
        assert v.l3_csum_delta == 0
    if flags:
        assert _apply(old[l4 + ck : l4 + ck + 2], v.l4_csum_delta) == new[l4 + ck : l4 + ck + 2]
    else:
        assert v.l4_csum_delta == 0
        assert old[l4 + ck : l4 + ck + 2] == new[l4 + ck : l4 + ck + 2]


def test_native_order_assumption():
    """The host is little-endian or big-endian and htons matches socket.htons."""
    import socket  # noqa: PLC0415

    assert sys.byteorder in ("little", "big")
    for p in (0, 1, 0x1234, 0xFFFF, 443):
        assert L.htons(p) == socket.htons(p)


def test_conn_entries_match_reference_path():
    """The inlined batch packer (conn_entries, both directions at once) equals
    flowdir_flags + flow_key + pack_val_into for each direction, whether or
    not the second direction is the first one reversed."""
    import random  # noqa: PLC0415

    rng = random.Random(4)
    for _ in range(500):
        fam = rng.choice([4, 6])
        alen = 4 if fam == 4 else 16
        proto = rng.choice([6, 17, 1 if fam == 4 else 58])

        def addr():
            return bytes(rng.randrange(256) for _ in range(alen))  # noqa: B023

        sp, dp = rng.randrange(65536), rng.randrange(65536)
        if proto in (1, 58):
            dp = sp
        m = FlowTuple(fam, proto, addr(), addr(), sp, dp)
        o = m
        if rng.random() < 0.5:
            o = o._replace(src=addr())
        if rng.random() < 0.5:
            o = o._replace(dst=addr())
        if rng.random() < 0.5:
            nid = rng.randrange(65536)
            o = o._replace(sport=nid, dport=nid if proto in (1, 58) else o.dport)
        if proto not in (1, 58) and rng.random() < 0.5:
            o = o._replace(dport=rng.randrange(65536))
        d0 = FlowDir(rng.randrange(1, 1000), m, o, 9, b"\x02" * 6, b"\x04" * 6, mtu=1500)
        if rng.random() < 0.7:  # the reply direction, as the offload manager builds it
            m1, o1 = o.reverse(), m.reverse()
        else:  # unrelated (e.g. rewritten by a policy change): nothing derived from d0
            m1 = FlowTuple(fam, proto, addr(), addr(), sp ^ 1, sp ^ 1 if proto in (1, 58) else 7)
            o1 = m1._replace(src=addr()) if rng.random() < 0.5 else m1
        d1 = FlowDir(9, m1, o1, 3, b"\x06" * 6, b"\x08" * 6, mtu=9000)
        slot = rng.randrange(1 << 20)
        k0, k1, vals = L.conn_entries(d0, d1, slot)
        assert len(vals) == 2 * L.VAL_SIZE
        for d, key, val in ((d0, k0, vals[: L.VAL_SIZE]), (d1, k1, vals[L.VAL_SIZE :])):
            ref = bytearray(L.VAL_SIZE)
            L.pack_val_into(
                ref,
                0,
                match=d.match,
                flags=L.flowdir_flags(d),
                out_ifindex=d.out_ifindex,
                smac=d.src_mac,
                dmac=d.dst_mac,
                mtu=d.mtu,
                nat_src=d.out.src,
                nat_dst=d.out.dst,
                nat_sport=d.out.sport,
                nat_dport=d.out.dport,
                slot=slot,
            )
            assert key == L.flow_key(d.in_ifindex, d.match)
            assert val == bytes(ref)
            assert L.flowdir_entry(d, slot) == (key, val)


def test_enums_match_header():
    """CT_STAT_NAMES follows enum ct_stat's order and the flag values match the header."""
    import re  # noqa: PLC0415

    text = (BPF_DIR / "ct_offload.h").read_text()
    body = re.search(r"enum ct_stat \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*CT_STAT_([A-Z0-9_]+)", body, re.M)
    assert names[-1] == "MAX"
    assert [n.lower() for n in names[:-1]] == list(L.CT_STAT_NAMES)
    assert L.CT_STAT_MAX == len(names) - 1
    flags = dict(re.findall(r"(CT_F_[A-Z]+)\s*=\s*1 << (\d+)", text))
    assert {k: 1 << int(v) for k, v in flags.items()} == {
        "CT_F_SNAT": L.CT_F_SNAT,
        "CT_F_DNAT": L.CT_F_DNAT,
        "CT_F_TEARDOWN": L.CT_F_TEARDOWN,
    }
    assert f"#define CT_MAX_PORTS {L.CT_MAX_PORTS}" in text
