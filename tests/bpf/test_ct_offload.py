"""bpf/ct_offload.c through BPF_PROG_RUN: rewrites equal scapy-built expected
frames, every punt reason passes the frame untouched with its own counter,
misses pass, and no malformed or truncated frame is ever aborted or rewritten.
One live-frames test checks real delivery through the devmap to a veth peer."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time

import pytest

from ctxdp import bpfsys
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers import xdp_layout as L
from ctxdp.providers.base import FlowDir
from tests.bpf.conftest import BPF_DIR, ip
from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

scapy_all = pytest.importorskip("scapy.all")
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP  # noqa: E402
from scapy.layers.inet6 import (  # noqa: E402
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether  # noqa: E402

CLIENT_MAC = "02:00:00:00:00:01"
ROUTER_IN_MAC = "02:00:00:00:00:02"
ROUTER_OUT_MAC = "02:00:00:00:00:03"
NEXTHOP_MAC = "02:00:00:00:00:04"

# src, dst, nat_src, nat_dst per family
ADDRS = {
    4: ("10.0.0.2", "192.0.2.10", "203.0.113.7", "198.51.100.20"),
    6: ("fd00::2", "2001:db8::10", "2001:db8:ff::7", "fd00:1::20"),
}
SPORT, DPORT, NAT_SPORT, NAT_DPORT = 40000, 443, 61001, 8443
PROTO_NUM = {
    ("tcp", 4): 6,
    ("tcp", 6): 6,
    ("udp", 4): 17,
    ("udp", 6): 17,
    ("icmp", 4): 1,
    ("icmp", 6): 58,
}
PAYLOAD = b"0123456789abcdef" * 3  # keeps every frame above 60 bytes: no Ethernet padding
SLOT = 7
XDP_PASS, XDP_TX, XDP_REDIRECT, XDP_ABORTED = (
    bpfsys.XDP_PASS,
    bpfsys.XDP_TX,
    bpfsys.XDP_REDIRECT,
    bpfsys.XDP_ABORTED,
)


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def pton(fam: int, a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET if fam == 4 else socket.AF_INET6, a)


def frame(
    fam,
    proto,
    src,
    dst,
    sport,
    dport,
    *,
    ttl=64,
    macs=(CLIENT_MAC, ROUTER_IN_MAC),
    tcp_flags="A",
    udp_zero=False,
    payload=PAYLOAD,
    icmp_reply=False,
):
    """A frame built (and checksummed) by scapy."""
    eth = Ether(src=macs[0], dst=macs[1])
    l3 = (
        IP(src=src, dst=dst, ttl=ttl, id=4321)
        if fam == 4
        else IPv6(src=src, dst=dst, hlim=ttl, fl=7)
    )
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags=tcp_flags, seq=1000, ack=2000, window=500)
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport)
        if udp_zero:
            l4.chksum = 0
    elif fam == 4:
        l4 = ICMP(type=0 if icmp_reply else 8, id=sport, seq=3)
    else:
        l4 = (ICMPv6EchoReply if icmp_reply else ICMPv6EchoRequest)(id=sport, seq=3)
    return bytes(eth / l3 / l4 / payload)


def tuples(fam, proto, nat):
    """(match, out) FlowTuples for a NAT case: none / snat / dnat / both."""
    src, dst, nsrc, ndst = ADDRS[fam]
    icmp = proto == "icmp"
    m = (src, dst, SPORT, SPORT if icmp else DPORT)
    o_src, o_dst, o_sp, o_dp = m
    if nat in ("snat", "both"):
        o_src, o_sp = nsrc, NAT_SPORT
        if icmp:
            o_dp = NAT_SPORT
    if nat in ("dnat", "both"):
        o_dst = ndst
        if icmp:
            o_sp = o_dp = o_sp if nat == "both" else NAT_DPORT
        else:
            o_dp = NAT_DPORT
    p = PROTO_NUM[(proto, fam)]

    def ft(s, d, sp, dp):
        return FlowTuple(fam, p, pton(fam, s), pton(fam, d), sp, dp)

    return ft(*m), ft(o_src, o_dst, o_sp, o_dp), (o_src, o_dst, o_sp, o_dp)


def install(ct, fam, proto, nat, *, out_ifindex=None, mtu=1500, slot=SLOT, in_ifindex=None):
    """Install one direction; returns (key, FlowDir, out strings)."""
    m, o, o_str = tuples(fam, proto, nat)
    d = FlowDir(
        ct.ports.a_idx if in_ifindex is None else in_ifindex,
        m,
        o,
        ct.ports.b_idx if out_ifindex is None else out_ifindex,
        mac(ROUTER_OUT_MAC),
        mac(NEXTHOP_MAC),
        mtu=mtu,
    )
    key, val = L.flowdir_entry(d, slot)
    ct.install(key, val)
    return key, d, o_str


def input_frame(fam, proto, **kw):
    src, dst, _, _ = ADDRS[fam]
    return frame(fam, proto, src, dst, SPORT, SPORT if proto == "icmp" else DPORT, **kw)


def only(stats, name, n=1):
    """All counters zero except ``name`` == n."""
    want = {k: 0 for k in L.CT_STAT_NAMES}
    want[name] = n
    return stats == want


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --- correct rewrites -------------------------------------------------------------


@pytest.mark.parametrize("nat", ["none", "snat", "dnat", "both"])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
@pytest.mark.parametrize("fam", [4, 6])
def test_hit_rewrites_like_scapy(ct, fam, proto, nat):
    """A hit yields scapy's expected frame (NAT, MACs, TTL, checksums), redirects to b,
    and updates counters and last_used in the entry and in ct_last_used[slot]."""
    key, _d, (o_src, o_dst, o_sp, o_dp) = install(ct, fam, proto, nat)
    pkt = input_frame(fam, proto)
    expected = frame(
        fam, proto, o_src, o_dst, o_sp, o_dp, ttl=63, macs=(ROUTER_OUT_MAC, NEXTHOP_MAC)
    )
    t0 = mono_ns()
    r = ct.run(pkt)
    t1 = mono_ns()
    assert r.retval == XDP_REDIRECT
    assert r.data == expected
    # checksums are what scapy recomputes from scratch on the output
    parsed = Ether(r.data)
    for layer in (IP, TCP, UDP, ICMP, ICMPv6EchoRequest):
        if parsed.haslayer(layer) and hasattr(parsed[layer], "chksum"):
            parsed[layer].chksum = None
    assert bytes(parsed) == r.data
    runs, action, target, stat = ct.debug()
    assert (runs, action, target, stat) == (1, XDP_REDIRECT, ct.ports.b_idx, L.STAT["hit"])
    v = ct.entry(key)
    assert (v.packets, v.bytes) == (1, len(pkt))
    # coarse clock: same clock as CLOCK_MONOTONIC, up to one tick behind
    assert t0 - 50_000_000 <= v.last_used <= t1
    assert ct.last_used(SLOT) == v.last_used
    assert only(ct.stats(), "hit")


def test_counters_accumulate(ct):
    """Counters add up over several hits of the same entry."""
    key, _, _ = install(ct, 4, "udp", "snat")
    pkt = input_frame(4, "udp")
    for _ in range(5):
        assert ct.run(pkt).retval == XDP_REDIRECT
    v = ct.entry(key)
    assert (v.packets, v.bytes) == (5, 5 * len(pkt))
    assert only(ct.stats(), "hit", 5)


def test_counters_exact_when_cpus_hit_at_once(ct):
    """Hits run at the same time on two CPUs all count: each CPU adds to its own
    counter slot of the entry, and the slots sum to every packet and byte."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    key, _, _ = install(ct, 4, "udp", "none")
    pkt = input_frame(4, "udp", ttl=255)
    calls, repeat = 40, 200  # TTL 255 outlives 200 non-live repeats
    ctx = bpfsys.xdp_md(ct.ports.a_idx, len(pkt))
    errors: list[BaseException] = []

    def hammer(cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only: BPF_PROG_RUN runs here
            for _ in range(calls):
                assert bpfsys.prog_test_run(ct.p.prog_fd, pkt, repeat=repeat, ctx=ctx).retval == (
                    XDP_REDIRECT
                )
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    import threading  # noqa: PLC0415

    threads = [threading.Thread(target=hammer, args=(c,)) for c in cpus[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n = 2 * calls * repeat
    v = ct.entry(key)
    assert (v.packets, v.bytes) == (n, n * len(pkt))
    raw = L.VAL.unpack(bpfsys.map_lookup(ct.p.flows_fds[len(key)], key, L.VAL_SIZE))
    per_slot = raw[14::2]  # packets of every counter slot
    assert sum(per_slot) == n
    if L.CNT_SLOTS >= 2 and L.NR_CPUS <= L.CNT_SLOTS:
        assert sorted(per_slot[c & (L.CNT_SLOTS - 1)] for c in cpus[:2]) == [n // 2, n // 2]
    assert only(ct.stats(), "hit", n)


def test_ipv4_is_looked_up_in_ct_flows4_only(ct):
    """An IPv4 entry under the 44-byte generic key in ct_flows6 is never matched:
    IPv4 frames are looked up with the 20-byte key in ct_flows4."""
    m, o, _ = tuples(4, "udp", "snat")
    d = FlowDir(ct.ports.a_idx, m, o, ct.ports.b_idx, mac(ROUTER_OUT_MAC), mac(NEXTHOP_MAC))
    key4, val = L.flowdir_entry(d, SLOT)
    assert len(key4) == L.KEY4_SIZE
    ct.install(L.pack_key(ct.ports.a_idx, m), val)  # 44 bytes: lands in ct_flows6
    pkt = input_frame(4, "udp")
    assert ct.run(pkt).retval == XDP_PASS
    assert only(ct.stats(), "miss")
    ct.install(key4, val)
    assert ct.run(pkt).retval == XDP_REDIRECT


@pytest.mark.parametrize("fam", [4, 6])
def test_udp_zero_checksum(ct, fam):
    """IPv4 UDP with checksum 0 stays 0 under NAT; IPv6 UDP with checksum 0 is punted."""
    install(ct, fam, "udp", "both")
    pkt = input_frame(fam, "udp", udp_zero=True)
    r = ct.run(pkt)
    if fam == 4:
        _, (o_src, o_dst, o_sp, o_dp) = tuples(4, "udp", "both")[1:]
        assert r.retval == XDP_REDIRECT
        assert r.data == frame(
            4,
            "udp",
            o_src,
            o_dst,
            o_sp,
            o_dp,
            ttl=63,
            macs=(ROUTER_OUT_MAC, NEXTHOP_MAC),
            udp_zero=True,
        )
        assert r.data[14 + 20 + 6 : 14 + 20 + 8] == b"\0\0"
    else:
        assert (r.retval, r.data) == (XDP_PASS, pkt)
        assert only(ct.stats(), "punt_unknown")


def test_icmp_echo_reply_direction(ct):
    """An echo reply hits an entry keyed on its id and has its id translated back."""
    src, dst, nsrc, _ = ADDRS[4]
    # reply direction of an SNATed ping: arrives on b as nsrc<-dst with NAT id
    m = FlowTuple(4, 1, pton(4, dst), pton(4, nsrc), NAT_SPORT, NAT_SPORT)
    o = FlowTuple(4, 1, pton(4, dst), pton(4, src), SPORT, SPORT)
    d = FlowDir(ct.ports.b_idx, m, o, ct.ports.a_idx, mac(ROUTER_IN_MAC), mac(CLIENT_MAC))
    assert L.flowdir_flags(d) == L.CT_F_DNAT
    ct.install(*L.flowdir_entry(d, 3))
    ct.add_port(ct.ports.a_idx)
    pkt = frame(
        4,
        "icmp",
        dst,
        nsrc,
        NAT_SPORT,
        NAT_SPORT,
        icmp_reply=True,
        macs=(NEXTHOP_MAC, ROUTER_OUT_MAC),
    )
    r = ct.run(pkt, ifindex=ct.ports.b_idx)
    assert r.retval == XDP_REDIRECT
    assert r.data == frame(
        4, "icmp", dst, src, SPORT, SPORT, ttl=63, icmp_reply=True, macs=(ROUTER_IN_MAC, CLIENT_MAC)
    )
    assert ct.debug()[2] == ct.ports.a_idx


@pytest.mark.parametrize("fam", [4, 6])
def test_hairpin_uses_xdp_tx(ct, fam):
    """When the egress port is the ingress port the program returns XDP_TX."""
    install(ct, fam, "tcp", "dnat", out_ifindex=ct.ports.a_idx)
    r = ct.run(input_frame(fam, "tcp"))
    assert r.retval == XDP_TX
    assert ct.debug()[1:] == (XDP_TX, ct.ports.a_idx, L.STAT["hit"])
    assert only(ct.stats(), "hit")


def test_missing_devmap_port_passes_untouched(ct):
    """An egress port absent from ct_tx_ports passes the frame unmodified and counts it."""
    key, _, _ = install(ct, 4, "tcp", "snat", out_ifindex=ct.ports.b_idx + 1000)
    pkt = input_frame(4, "tcp")
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "redirect_err")
    v = ct.entry(key)
    assert (v.packets, v.last_used) == (0, 0)


@pytest.mark.parametrize("fam", [4, 6])
def test_mtu_boundary(ct, fam):
    """A datagram exactly at the egress MTU is forwarded; one byte over is punted."""
    pkt = input_frame(fam, "tcp")
    ip_len = len(pkt) - 14
    key, _, _ = install(ct, fam, "tcp", "none", mtu=ip_len)
    assert ct.run(pkt).retval == XDP_REDIRECT
    install(ct, fam, "tcp", "none", mtu=ip_len - 1)
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    st = ct.stats()
    assert (st["hit"], st["punt_mtu"]) == (1, 1)


# --- punts --------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ["FA", "R", "RA"])
@pytest.mark.parametrize("fam", [4, 6])
def test_fin_rst_punt_and_flag_teardown_both_directions(ct, fam, flags):
    """FIN/RST on a hit passes untouched, counts punt_fin_rst and flags both entries."""
    key, d, _ = install(ct, fam, "tcp", "snat")
    rd = FlowDir(
        ct.ports.b_idx,
        d.out.reverse(),
        d.match.reverse(),
        ct.ports.a_idx,
        mac(ROUTER_IN_MAC),
        mac(CLIENT_MAC),
    )
    rkey, rval = L.flowdir_entry(rd, SLOT)
    ct.install(rkey, rval)
    pkt = input_frame(fam, "tcp", tcp_flags=flags)
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "punt_fin_rst")
    assert ct.entry(key).flags & L.CT_F_TEARDOWN
    assert ct.entry(rkey).flags & L.CT_F_TEARDOWN
    assert ct.entry(key).packets == 0


def test_fin_on_miss_is_a_miss(ct):
    """A FIN without an entry is just a miss."""
    pkt = input_frame(4, "tcp", tcp_flags="FA")
    assert ct.run(pkt).retval == XDP_PASS
    assert only(ct.stats(), "miss")


@pytest.mark.parametrize("ttl", [0, 1])
@pytest.mark.parametrize("fam", [4, 6])
def test_ttl_punt(ct, fam, ttl):
    """TTL / hop limit <= 1 on a hit passes untouched and counts punt_ttl."""
    install(ct, fam, "udp", "snat")
    pkt = input_frame(fam, "udp", ttl=ttl)
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "punt_ttl")


def test_ttl_two_is_forwarded_with_ttl_one(ct):
    """TTL 2 is still forwarded (leaving with TTL 1)."""
    install(ct, 4, "udp", "none")
    r = ct.run(input_frame(4, "udp", ttl=2))
    assert r.retval == XDP_REDIRECT and r.data[14 + 8] == 1


def _v4(**ipkw):
    src, dst, _, _ = ADDRS[4]
    return Ether(src=CLIENT_MAC, dst=ROUTER_IN_MAC) / IP(src=src, dst=dst, **ipkw)


def _v6(*ext):
    src, dst, _, _ = ADDRS[6]
    p = Ether(src=CLIENT_MAC, dst=ROUTER_IN_MAC) / IPv6(src=src, dst=dst)
    for e in ext:
        p = p / e
    return p


PUNT_CASES = {
    "ipopt": (
        "punt_ipopt",
        lambda: (
            _v4(options=[IPOption_NOP()] * 4) / TCP(sport=SPORT, dport=DPORT, flags="A") / PAYLOAD
        ),
    ),
    "v4-mf": (
        "punt_frag",
        lambda: _v4(flags="MF") / TCP(sport=SPORT, dport=DPORT, flags="A") / PAYLOAD,
    ),
    "v4-offset": ("punt_frag", lambda: _v4(frag=100) / PAYLOAD),
    "v6-frag": (
        "punt_frag",
        lambda: _v6(IPv6ExtHdrFragment(m=1), TCP(sport=SPORT, dport=DPORT)) / PAYLOAD,
    ),
    "v6-hbh": (
        "punt_v6ext",
        lambda: _v6(IPv6ExtHdrHopByHop(), TCP(sport=SPORT, dport=DPORT)) / PAYLOAD,
    ),
    "v6-dstopt": (
        "punt_v6ext",
        lambda: _v6(IPv6ExtHdrDestOpt(), UDP(sport=SPORT, dport=DPORT)) / PAYLOAD,
    ),
    "v6-routing": (
        "punt_v6ext",
        lambda: _v6(IPv6ExtHdrRouting(), UDP(sport=SPORT, dport=DPORT)) / PAYLOAD,
    ),
    "arp": (
        "punt_unknown",
        lambda: (
            Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.2", pdst="10.0.0.1")
        ),
    ),
    "vlan": (
        "punt_unknown",
        lambda: (
            Ether(src=CLIENT_MAC, dst=ROUTER_IN_MAC)
            / Dot1Q(vlan=5)
            / IP(src=ADDRS[4][0], dst=ADDRS[4][1])
            / TCP(sport=SPORT, dport=DPORT)
            / PAYLOAD
        ),
    ),
    "gre": ("punt_unknown", lambda: _v4(proto=47) / PAYLOAD),
    "icmp-unreach": (
        "punt_unknown",
        lambda: (
            _v4()
            / ICMP(type=3, code=1)
            / IP(src=ADDRS[4][1], dst=ADDRS[4][0])
            / UDP(sport=DPORT, dport=SPORT)
        ),
    ),
    "icmp6-unreach": ("punt_unknown", lambda: _v6(ICMPv6DestUnreach()) / PAYLOAD),
    "v6-nonext": ("punt_unknown", lambda: _v6() / PAYLOAD),
}


@pytest.mark.parametrize("case", sorted(PUNT_CASES))
def test_punt_before_lookup(ct, case):
    """Options, fragments, extension headers and unknown frames pass untouched,
    each with its own counter, even though a matching entry exists."""
    for fam in (4, 6):
        for proto in ("tcp", "udp"):
            install(ct, fam, proto, "snat")
    stat, build = PUNT_CASES[case]
    pkt = bytes(build())
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), stat)


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_miss_passes_and_counts(ct, fam, proto):
    """A parseable frame without an entry passes untouched and counts a miss."""
    install(ct, fam, proto, "snat", in_ifindex=ct.ports.b_idx)  # wrong port: no match
    pkt = input_frame(fam, proto)
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "miss")
    assert ct.debug()[1:] == (XDP_PASS, 0, L.STAT["miss"])


# --- bad input ---------------------------------------------------------------------


HIT_CASES = [(4, "tcp"), (4, "udp"), (4, "icmp"), (6, "tcp"), (6, "udp"), (6, "icmp")]


@pytest.mark.parametrize("fam,proto", HIT_CASES)
def test_every_truncation_passes_untouched(ct, fam, proto):
    """A hit frame cut at any length (>= 14, the test-run minimum) is never aborted
    and never rewritten."""
    install(ct, fam, proto, "both")
    pkt = input_frame(fam, proto)
    assert ct.run(pkt).retval == XDP_REDIRECT
    for n in range(14, len(pkt)):
        r = ct.run(pkt[:n])
        assert (r.retval, r.data) == (XDP_PASS, pkt[:n]), n
    st = ct.stats()
    assert st["hit"] == 1 and st["punt_unknown"] == len(pkt) - 14


def _mutate(pkt: bytes, off: int, data: bytes) -> bytes:
    return pkt[:off] + data + pkt[off + len(data) :]


def malformed_cases():
    v4 = input_frame(4, "tcp")
    v4u = input_frame(4, "udp")
    v6 = input_frame(6, "tcp")
    v6u = input_frame(6, "udp")
    ip4 = 14
    tcp4 = ip4 + 20
    tcp6 = 14 + 40
    cases = {}
    for ihl in (0, 1, 4):
        cases[f"ihl{ihl}"] = _mutate(v4, ip4, bytes([0x40 | ihl]))
    # IHL 15 with a total length shorter than 60 bytes of header
    cases["ihl15-totlen40"] = _mutate(_mutate(v4, ip4, b"\x4f"), ip4 + 2, struct.pack("!H", 40))
    cases["v4-version5"] = _mutate(v4, ip4, b"\x55")
    cases["v4-version6"] = _mutate(v4, ip4, b"\x65")
    for name, tl in (
        ("totlen-huge", 0xFFFF),
        ("totlen-over-by-1", len(v4) - 14 + 1),
        ("totlen-10", 10),
        ("totlen-25", 25),
        ("totlen-0", 0),
    ):
        cases[name] = _mutate(v4, ip4 + 2, struct.pack("!H", tl))
    for doff in (0, 4):
        cases[f"v4-doff{doff}"] = _mutate(v4, tcp4 + 12, bytes([doff << 4]))
        cases[f"v6-doff{doff}"] = _mutate(v6, tcp6 + 12, bytes([doff << 4]))
    # data offset 15 (60 bytes) in a 30-byte segment
    short4, short6 = (
        input_frame(4, "tcp", payload=b"x" * 10),
        input_frame(6, "tcp", payload=b"x" * 10),
    )
    cases["v4-doff15"] = _mutate(short4, tcp4 + 12, b"\xf0")
    cases["v6-doff15"] = _mutate(short6, tcp6 + 12, b"\xf0")
    cases["udp-len-7"] = _mutate(v4u, tcp4 + 4, struct.pack("!H", 7))
    cases["udp-len-huge"] = _mutate(v4u, tcp4 + 4, struct.pack("!H", 2000))
    cases["v6udp-len-0"] = _mutate(v6u, tcp6 + 4, struct.pack("!H", 0))
    cases["v6-version4"] = _mutate(v6, 14, b"\x45")
    cases["v6-plen-0"] = _mutate(v6, 14 + 4, b"\0\0")
    cases["v6-plen-over"] = _mutate(v6, 14 + 4, struct.pack("!H", len(v6) - 54 + 1))
    cases["v6-plen-huge"] = _mutate(v6, 14 + 4, b"\xff\xff")
    cases["v6-plen-short"] = _mutate(v6, 14 + 4, struct.pack("!H", 10))
    cases["eth-only-v4"] = v4[:14]
    cases["eth-only-v6"] = v6[:14]
    return cases


MALFORMED = malformed_cases()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_headers_pass_untouched(ct, name):
    """Bad IHL, lying lengths, bad data offsets and wrong versions are punted as
    unknown, untouched, although a matching entry exists."""
    for fam, proto in HIT_CASES:
        install(ct, fam, proto, "both")
    pkt = MALFORMED[name]
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "punt_unknown")


def test_ihl15_within_frame_is_an_option_punt(ct):
    """IHL 15 whose 60-byte header fits the datagram is read as options and punted."""
    install(ct, 4, "tcp", "both")
    pkt = _mutate(input_frame(4, "tcp"), 14, b"\x4f")
    r = ct.run(pkt)
    assert (r.retval, r.data) == (XDP_PASS, pkt)
    assert only(ct.stats(), "punt_ipopt")


def test_garbage_and_bit_flips_never_abort(ct):
    """Random garbage behind IP ethertypes, and random corruption of hit frames,
    are never aborted; any changed output must come from a legitimate hit."""
    for fam, proto in HIT_CASES:
        install(ct, fam, proto, "both")
    rng = random.Random(20240604)
    bases = [input_frame(f, p) for f, p in HIT_CASES]
    for i in range(600):
        if i % 3 == 0:
            et = rng.choice([b"\x08\x00", b"\x86\xdd"])
            pkt = bytes(12) + et + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        else:
            pkt = bytearray(rng.choice(bases))
            for _ in range(rng.randrange(1, 4)):
                pkt[rng.randrange(14, len(pkt))] = rng.randrange(256)
            pkt = bytes(pkt)
        r = ct.run(pkt)
        assert r.retval != XDP_ABORTED
        if r.retval == XDP_PASS:
            assert r.data == pkt
        else:
            assert r.retval == XDP_REDIRECT and ct.debug()[3] == L.STAT["hit"]


# --- live frames --------------------------------------------------------------------

SINK = rb"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
BPF_ARRAY(sink_cnt, u64, 1);
/* Counts only IPv4 UDP frames (what the test sends) and drops everything:
 * the veth's own ARP/ND/MLD chatter would otherwise be counted too. */
int ct_sink(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *iph = data + sizeof(*eth);
    if ((void *)(iph + 1) > end || eth->h_proto != htons(ETH_P_IP) ||
        iph->protocol != IPPROTO_UDP)
        return XDP_DROP;
    int zero = 0;
    u64 *c = sink_cnt.lookup(&zero);
    if (c)
        __sync_fetch_and_add(c, 1);
    return XDP_DROP;
}
"""


def in_netns(ns: str, fn):
    """Run fn() in a thread switched into netns ``ns`` (setns only moves the
    calling thread, so the test process itself stays where it is)."""
    import ctypes  # noqa: PLC0415
    import threading  # noqa: PLC0415

    result: dict = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed back to the caller
            result["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture
def sink(ports):
    """An XDP counter-and-drop program on peer bp (in the test netns); detached after."""
    bcc = require_bcc()
    b = bcc.BPF(text=SINK)
    attached = False
    try:
        fn = b.load_func(b"ct_sink", bcc.BPF.XDP)
        in_netns(ports.ns, lambda: b.attach_xdp(ports.bp.encode(), fn, 0))
        attached = True
        assert "xdp" in ip("-n", ports.ns, "-d", "link", "show", ports.bp).stdout
        yield b[b"sink_cnt"]
    finally:
        if attached:
            in_netns(ports.ns, lambda: b.remove_xdp(ports.bp.encode(), 0))
        b.cleanup()


def test_live_frames_reach_the_egress_peer(ct, sink):
    """With BPF_F_TEST_XDP_LIVE_FRAMES, hit frames are really redirected through
    ct_tx_ports to port b and arrive at its veth peer."""
    key, _, _ = install(ct, 4, "udp", "none")
    n = 100  # TTL 255 survives every page reuse within n frames
    pkt = input_frame(4, "udp", ttl=255)
    before = sink[0].value
    r = bpfsys.prog_test_run(
        ct.p.prog_fd,
        pkt,
        repeat=n,
        ingress_ifindex=ct.ports.a_idx,
        flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES,
    )
    assert r.data == b""
    deadline = time.monotonic() + 2
    while sink[0].value - before < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink[0].value - before == n
    assert ct.entry(key).packets == n
    assert ct.stats()["hit"] == n


# --- pinning --------------------------------------------------------------------------


def test_pinned_build_is_adopted_by_the_next_load():
    """With -DCT_PIN_DIR every map is pinned under the directory, ct_tx_ports is
    the DEVMAP_HASH the loader pinned there first, and a second load adopts the
    same maps with their contents."""
    bcc = require_bcc()
    pin_dir = f"/sys/fs/bpf/ctxdp_test_{os.urandom(4).hex()}"
    names = ("ct_flows4", "ct_flows6", "ct_last_used", "ct_stats", "ct_tx_ports")
    os.mkdir(pin_dir)
    tx_fd = None
    loaded = []
    try:
        tx_fd = bpfsys.map_create("devmap_hash", 4, 4, L.CT_MAX_PORTS, name="ct_tx_ports")
        bpfsys.obj_pin(tx_fd, f"{pin_dir}/ct_tx_ports")
        cflags = [f"-I{BPF_DIR}", "-DCT_MAX_CONNS=512", f'-DCT_PIN_DIR="{pin_dir}"', *L.cflags()]

        def load():
            b = bcc.BPF(src_file=str(BPF_DIR / "ct_offload.c").encode(), cflags=cflags)
            loaded.append(b)
            b.load_func(b"ct_offload_xdp", bcc.BPF.XDP)
            return b, {n: bpfsys.map_info(b[n.encode()].map_fd) for n in names}

        b1, info1 = load()
        assert sorted(os.listdir(pin_dir)) == sorted(names)
        for name, key_size in (("ct_flows4", 20), ("ct_flows6", 44)):
            i = info1[name]
            assert (i.type, i.max_entries) == (bpfsys.MAP_TYPE["hash"], 1024)
            assert (i.key_size, i.value_size) == (key_size, L.VAL_SIZE)
        assert not info1["ct_flows4"].flags & bpfsys.BPF_F_NO_PREALLOC
        assert not info1["ct_flows6"].flags & bpfsys.BPF_F_NO_PREALLOC
        assert info1["ct_last_used"].type == bpfsys.MAP_TYPE["array"]
        assert info1["ct_last_used"].flags & bpfsys.BPF_F_MMAPABLE
        assert info1["ct_last_used"].max_entries == 512
        assert info1["ct_stats"].type == bpfsys.MAP_TYPE["percpu_array"]
        assert info1["ct_tx_ports"].type == bpfsys.MAP_TYPE["devmap_hash"]
        assert info1["ct_tx_ports"].id == bpfsys.map_info(tx_fd).id
        m = FlowTuple(4, 6, b"\x0a\0\0\x01", b"\x0a\0\0\x02", 1, 2)
        key, val = L.flowdir_entry(FlowDir(1, m, m, 2, b"\1" * 6, b"\2" * 6), 5)
        assert len(key) == L.KEY4_SIZE
        bpfsys.map_update(b1[b"ct_flows4"].map_fd, key, val)
        b1.cleanup()
        loaded.remove(b1)

        b2, info2 = load()
        assert {n: i.id for n, i in info2.items()} == {n: i.id for n, i in info1.items()}
        assert bpfsys.map_lookup(b2[b"ct_flows4"].map_fd, key, L.VAL_SIZE) == val
    finally:
        for b in loaded:
            b.cleanup()
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{pin_dir}/{n}")
        os.rmdir(pin_dir)
        if tx_fd is not None:
            os.close(tx_fd)
