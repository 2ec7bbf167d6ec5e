"""Unit tests for ctxdp.packet: parsing, malformed input, rewrites and ICMP errors.

Frames are built with scapy; checksums after every rewrite are compared with
scapy's own recomputation (or with a frame scapy built from scratch with the
rewritten values), never with hard-coded numbers.
"""

from __future__ import annotations

import random
import re

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from ctxdp import packet as P

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
A4, B4, C4 = "10.0.0.1", "192.0.2.7", "198.51.100.9"
A6, B6, C6 = "2001:db8::1", "2001:db8:1::7", "2001:db8:2::9"
REASON_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
ICMP6_ERRORS = (ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded, ICMPv6ParamProblem)


def eth(l3, **kw) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B, **kw) / l3)


def addr(text: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(text).packed


def rebuilt(data: bytes) -> bytes:
    """The frame as scapy rebuilds it after forgetting every checksum it can recompute.

    Inside an ICMP error the quote is kept as raw bytes (it is a fragment of a
    datagram, so its checksums are not recomputable); the ICMP checksum over
    it is recomputed. A UDP checksum of 0 ("none", IPv4) is kept.
    """
    pkt = Ether(bytes(data))
    layer = pkt
    while layer is not None and layer.name != "NoPayload" and not isinstance(layer, Raw):
        is_v4_err = isinstance(layer, ICMP) and layer.type in P.ICMP_ERROR_TYPES
        if is_v4_err or isinstance(layer, ICMP6_ERRORS):
            # Re-dissect only the 8-byte header: scapy would otherwise read a
            # long quote as RFC 4884 extensions and not rebuild it verbatim.
            header = type(layer)(layer.original[:8])
            del header.fields["chksum" if is_v4_err else "cksum"]
            parent = layer.underlayer
            parent.remove_payload()
            parent.add_payload(header / Raw(layer.original[8:]))
            break
        if "chksum" in layer.fields and not (isinstance(layer, UDP) and layer.chksum == 0):
            del layer.chksum
        if "cksum" in layer.fields:
            del layer.cksum
        layer = layer.payload
    return bytes(pkt)


def assert_checksums(buf) -> None:
    assert bytes(buf) == rebuilt(buf)


@pytest.mark.parametrize("l3,field_off", [
    (IP(src=A4, dst=B4) / TCP(), 14 + 10),
    (IP(src=A4, dst=B4) / TCP(), 34 + 16),
    (IPv6(src=A6, dst=B6) / UDP(), 54 + 6),
    (IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(), 54 + 2),
    (IP(src=A4, dst=B4) / ICMP(type=11) / Raw(bytes(IP() / TCP())), 34 + 2),
    (IPv6(src=A6, dst=B6) / ICMPv6DestUnreach() / Raw(bytes(IPv6() / TCP())), 54 + 2),
])
def test_checksum_oracle_detects_corruption(l3, field_off):
    """The scapy-based checker used below rejects a frame with one checksum byte off."""
    buf = bytearray(eth(l3))
    assert_checksums(buf)
    buf[field_off] ^= 0x01
    with pytest.raises(AssertionError):
        assert_checksums(buf)


# --- parsing: every protocol and family -------------------------------------


def test_non_ip_frame_is_valid_family_zero():
    """An ARP frame parses as valid with family 0 and the Ethernet fields filled."""
    p = P.parse(eth(ARP(psrc=A4, pdst=B4)))
    assert p.valid and p.reason == ""
    assert (p.family, p.ethertype, p.l4, p.inner) == (0, P.ETH_P_ARP, -1, None)
    assert p.eth_src == bytes.fromhex("02000000000a") and p.eth_dst == bytes.fromhex("02000000000b")


def test_tcp_ipv4_fields():
    """IPv4/TCP: addresses, ports, seq/ack, flags, window, lengths and offsets."""
    f = eth(IP(src=A4, dst=B4, ttl=33) / TCP(sport=1234, dport=80, seq=7, ack=9,
                                              flags="PA", window=999) / Raw(b"x" * 50))
    p = P.parse(f)
    assert p.valid, p.reason
    assert (p.family, p.proto, p.src, p.dst) == (4, P.IPPROTO_TCP, addr(A4), addr(B4))
    assert (p.sport, p.dport, p.seq, p.ack, p.win) == (1234, 80, 7, 9, 999)
    assert p.tcp_flags == P.PSH | P.ACK
    assert (p.ttl, p.ip_len, p.l3, p.l4, p.end) == (33, 90, 14, 34, len(f))
    assert (p.payload_len, p.wscale, p.icmp_type, p.icmp_code) == (50, -1, -1, -1)
    assert not (p.frag or p.ip_options or p.ext_hdrs) and p.vlan == -1
    assert isinstance(p.src, bytes) and hash(p.src)


def test_tcp_ipv6_fields():
    """IPv6/TCP: 16-byte addresses, hop limit and payload length from the header."""
    f = eth(IPv6(src=A6, dst=B6, hlim=12) / TCP(sport=5, dport=6, flags="FA") / Raw(b"y" * 3))
    p = P.parse(f)
    assert p.valid, p.reason
    assert (p.family, p.proto, p.src, p.dst, p.ttl) == (6, 6, addr(A6), addr(B6), 12)
    assert (p.sport, p.dport, p.tcp_flags, p.payload_len) == (5, 6, P.FIN | P.ACK, 3)
    assert (p.l3, p.l4, p.ip_len, p.ext_hdrs) == (14, 54, 63, False)


@pytest.mark.parametrize("flags,expect", [("S", 7), ("SA", 7), ("A", -1)])
def test_wscale_only_on_syn(flags, expect):
    """The window-scale option is reported on SYN and SYN-ACK only."""
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)]
    p = P.parse(eth(IP(src=A4, dst=B4) / TCP(flags=flags, options=opts)))
    assert p.valid and p.wscale == expect


def test_syn_without_wscale():
    """A SYN without the option has wscale -1."""
    p = P.parse(eth(IP(src=A4, dst=B4) / TCP(flags="S", options=[("MSS", 1460)])))
    assert p.valid and p.wscale == -1


def test_malformed_tcp_options_do_not_invalidate():
    """A bad option length stops the option walk but the segment stays valid."""
    tcp = bytearray(bytes(TCP(flags="S", options=[("MSS", 1460), ("WScale", 3)])))
    tcp[21] = 0  # MSS option length 0
    p = P.parse(eth(IP(src=A4, dst=B4, proto=6) / Raw(bytes(tcp))))
    assert p.valid and p.wscale == -1


@pytest.mark.parametrize("ip", [IP(src=A4, dst=B4), IPv6(src=A6, dst=B6)])
def test_udp(ip):
    """UDP ports and payload length for both families."""
    p = P.parse(eth(ip / UDP(sport=53, dport=4000) / Raw(b"z" * 11)))
    assert p.valid and (p.proto, p.sport, p.dport, p.payload_len) == (17, 53, 4000, 11)


@pytest.mark.parametrize("l3,itype", [
    (IP(src=A4, dst=B4) / ICMP(type=8, id=0x1234, seq=1), P.ICMP_ECHO_REQUEST),
    (IP(src=A4, dst=B4) / ICMP(type=0, id=0x1234, seq=1), P.ICMP_ECHO_REPLY),
    (IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=0x1234, seq=1), P.ICMPV6_ECHO_REQUEST),
    (IPv6(src=A6, dst=B6) / ICMPv6EchoReply(id=0x1234, seq=1), P.ICMPV6_ECHO_REPLY),
])
def test_icmp_echo_id_is_both_ports(l3, itype):
    """ICMP/ICMPv6 echo request and reply put the echo id in sport and dport."""
    p = P.parse(eth(l3 / Raw(b"ping")))
    assert p.valid and (p.icmp_type, p.icmp_code) == (itype, 0)
    assert (p.sport, p.dport, p.inner, p.payload_len) == (0x1234, 0x1234, None, 4)


def test_icmp_other_type_has_no_ports():
    """A non-echo, non-error ICMP message (timestamp) has type/code but ports 0."""
    p = P.parse(eth(IP(src=A4, dst=B4) / ICMP(type=13, id=5)))
    assert p.valid and (p.icmp_type, p.sport, p.dport, p.inner) == (13, 0, 0, None)


def test_other_protocol_is_opaque():
    """An unknown IP protocol (GRE) is valid with l4 set and no ports."""
    p = P.parse(eth(IP(src=A4, dst=B4, proto=47) / Raw(b"\x00" * 12)))
    assert p.valid and (p.proto, p.l4, p.sport, p.dport, p.payload_len) == (47, 34, 0, 0, 12)


def test_ipv4_options_flagged():
    """IHL > 5 sets ip_options and moves the L4 offset past the options."""
    p = P.parse(eth(IP(src=A4, dst=B4, options=b"\x94\x04\x00\x00") / UDP(sport=1, dport=2)))
    assert p.valid and p.ip_options and p.l4 == 14 + 24 and (p.sport, p.dport) == (1, 2)


def test_ethernet_padding_ignored():
    """A short IPv4 packet padded to 60 bytes ends at tot_len, not at the frame end."""
    f = eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(b"a"))
    padded = f + b"\x00" * (60 - len(f))
    p = P.parse(padded)
    assert p.valid and p.end == len(f) and p.payload_len == 1 and p.ip_len == 29


@pytest.mark.parametrize("tag", [Dot1Q(vlan=42), Dot1AD(vlan=42)])
def test_vlan_tag_skipped(tag):
    """One 802.1Q or 802.1ad tag is skipped; vlan holds the VID."""
    p = P.parse(bytes(Ether(src=MAC_A, dst=MAC_B) / tag / IP(src=A4, dst=B4) / TCP()))
    assert p.valid and p.vlan == 42 and p.ethertype == P.ETH_P_IP and p.l3 == 18
    assert p.l4 == 38 and p.family == 4


def test_double_tag_is_not_parsed():
    """QinQ: only the outer tag is skipped, the frame is valid non-IP."""
    f = bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP() / TCP())
    p = P.parse(f)
    assert p.valid and p.vlan == 5 and p.family == 0 and p.ethertype == P.ETH_P_8021Q


def test_ipv6_extension_header_chain():
    """Hop-by-hop, routing, destination options and AH are walked to TCP."""
    ah = AH(nh=6, payloadlen=4, spi=1, seq=1, icv=b"\x00" * 12)  # (4 + 2) * 4 = 24 bytes
    l3 = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[C6])
          / IPv6ExtHdrDestOpt() / ah / TCP(sport=7, dport=8))
    f = eth(l3)
    p = P.parse(f)
    assert p.valid, p.reason
    assert p.ext_hdrs and p.proto == 6 and (p.sport, p.dport) == (7, 8)
    assert p.l4 == len(f) - 20 and not p.frag


@pytest.mark.parametrize("last,proto", [(ESP(spi=1, seq=1, data=b"e" * 16), 50),
                                        (Raw(b""), 59)])
def test_ipv6_walk_stops_at_esp_and_no_next_header(last, proto):
    """ESP and no-next-header end the walk; the packet is valid with no ports."""
    l3 = IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt(nh=proto) / last
    p = P.parse(eth(l3))
    assert p.valid and p.proto == proto and p.ext_hdrs and (p.sport, p.dport) == (0, 0)


def test_ipv4_fragments():
    """IPv4: the first fragment parses UDP (length spans the datagram), the rest have no L4."""
    frags = fragment(IP(src=A4, dst=B4, id=9) / UDP(sport=11, dport=22) / Raw(b"q" * 200),
                     fragsize=64)
    first, second = P.parse(eth(frags[0])), P.parse(eth(frags[1]))
    assert first.valid and first.frag and first.frag_off == 0
    assert (first.l4, first.sport, first.dport, first.payload_len) == (34, 11, 22, 200)
    assert second.valid and second.frag and second.frag_off == 64
    assert (second.l4, second.sport, second.dport, second.proto) == (-1, 0, 0, 17)
    assert second.payload_len == 64


def test_df_is_not_a_fragment():
    """The DF bit alone does not make a datagram a fragment."""
    p = P.parse(eth(IP(src=A4, dst=B4, flags="DF") / TCP()))
    assert p.valid and not p.frag and p.l4 == 34


def test_ipv6_fragments():
    """IPv6: a first fragment walks on to TCP, a non-first one stops with l4 -1."""
    first = P.parse(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(m=1, offset=0, id=3)
                        / TCP(sport=1, dport=2)))
    rest = P.parse(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(nh=6, m=0, offset=10, id=3)
                       / Raw(b"r" * 40)))
    assert first.valid and first.frag and first.ext_hdrs and (first.sport, first.dport) == (1, 2)
    assert rest.valid and rest.frag and rest.frag_off == 80
    assert (rest.l4, rest.proto, rest.sport, rest.payload_len) == (-1, 6, 0, 40)


def test_input_buffer_types_agree():
    """bytes, bytearray and memoryview parse to the same fields; buf is the given object."""
    f = eth(IPv6(src=A6, dst=B6) / UDP(sport=9, dport=10))
    results = []
    for obj in (f, bytearray(f), memoryview(f), memoryview(bytearray(f))):
        p = P.parse(obj)
        assert p.buf is obj
        results.append(tuple(getattr(p, s) for s in P.Packet.__slots__ if s != "buf"))
    assert all(r == results[0] for r in results)


# --- ICMP errors and the quoted datagram ------------------------------------

V4_ERRORS = [(3, 1), (3, 4), (4, 0), (5, 1), (11, 0), (12, 0)]


@pytest.mark.parametrize("itype,code", V4_ERRORS)
@pytest.mark.parametrize("quoted_l4,proto,ports", [
    (TCP(sport=1000, dport=443, seq=77), 6, (1000, 443)),
    (UDP(sport=1001, dport=53), 17, (1001, 53)),
    (ICMP(type=8, id=0x42), 1, (0x42, 0x42)),
])
def test_icmp4_error_inner(itype, code, quoted_l4, proto, ports):
    """ICMPv4 errors parse the quoted datagram (full quote) into inner."""
    quote = bytes(IP(src=B4, dst=C4) / quoted_l4 / Raw(b"d" * 30))
    p = P.parse(eth(IP(src=A4, dst=B4) / ICMP(type=itype, code=code) / Raw(quote)))
    assert p.valid, p.reason
    assert (p.icmp_type, p.icmp_code, p.sport, p.dport) == (itype, code, 0, 0)
    inner = p.inner
    assert inner is not None and inner.valid and inner.inner is None
    assert (inner.src, inner.dst, inner.proto) == (addr(B4), addr(C4), proto)
    assert (inner.sport, inner.dport, inner.l3) == (*ports, p.l4 + 8)


def test_icmp4_error_quote_of_ip_plus_8():
    """A quote of IP header + 8 bytes of TCP is valid: ports and seq, tot_len beyond the data."""
    full = bytes(IP(src=B4, dst=C4) / TCP(sport=1000, dport=443, seq=77) / Raw(b"d" * 100))
    p = P.parse(eth(IP(src=A4, dst=B4) / ICMP(type=11) / Raw(full[:28])))
    assert p.valid, p.reason
    i = p.inner
    assert i.valid and (i.sport, i.dport, i.seq, i.tcp_flags) == (1000, 443, 77, 0)
    assert i.ip_len == len(full) and i.end == p.end and i.payload_len == 100


@pytest.mark.parametrize("cls", [ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded,
                                 ICMPv6ParamProblem])
@pytest.mark.parametrize("quoted_l4,ports", [
    (TCP(sport=2000, dport=22), (2000, 22)),
    (UDP(sport=2001, dport=123), (2001, 123)),
    (ICMPv6EchoRequest(id=0x77), (0x77, 0x77)),
])
def test_icmp6_error_inner(cls, quoted_l4, ports):
    """ICMPv6 errors parse the quoted IPv6 datagram into inner."""
    quote = bytes(IPv6(src=B6, dst=C6) / quoted_l4 / Raw(b"d" * 30))
    p = P.parse(eth(IPv6(src=A6, dst=B6) / cls() / Raw(quote)))
    assert p.valid, p.reason
    assert p.inner.valid and (p.inner.src, p.inner.dst) == (addr(B6), addr(C6))
    assert (p.inner.sport, p.inner.dport) == ports


def test_icmp6_error_inner_with_extension_headers_truncated_quote():
    """An ICMPv6 error quoting IPv6 + HBH + 8 bytes of UDP gives a valid inner with ports."""
    full = bytes(IPv6(src=B6, dst=C6) / IPv6ExtHdrHopByHop() / UDP(sport=5, dport=6)
                 / Raw(b"u" * 2000))
    p = P.parse(eth(IPv6(src=A6, dst=B6) / ICMPv6TimeExceeded() / Raw(full[:56])))
    assert p.valid and p.inner.valid and p.inner.ext_hdrs
    assert (p.inner.sport, p.inner.dport, p.inner.ip_len) == (5, 6, len(full))


def test_icmp_error_with_short_quote_is_invalid():
    """Fewer than 8 bytes of quoted L4 make the error invalid with an inner- reason."""
    full = bytes(IP(src=B4, dst=C4) / TCP())
    p = P.parse(eth(IP(src=A4, dst=B4) / ICMP(type=3, code=1) / Raw(full[:24])))
    assert not p.valid and p.reason == "inner-truncated-tcp" and p.inner is not None


def test_icmp_error_quoting_other_family_is_invalid():
    """ICMPv4 quoting an IPv6 header is rejected (bad inner version)."""
    quote = bytes(IPv6(src=B6, dst=C6) / UDP())
    p = P.parse(eth(IP(src=A4, dst=B4) / ICMP(type=3, code=1) / Raw(quote)))
    assert not p.valid and p.reason == "inner-bad-version"


def test_parse_ip_strict_and_bad_family():
    """parse_ip(quoted=False) rejects a truncated datagram; an unknown family is bad-family."""
    full = bytes(IP(src=B4, dst=C4) / TCP() / Raw(b"x" * 10))
    assert P.parse_ip(full[:40], 0, 4).valid
    strict = P.parse_ip(full[:40], 0, 4, quoted=False)
    assert not strict.valid and strict.reason == "bad-tot-len"
    assert P.parse_ip(full, 0, 4, quoted=False).valid
    assert P.parse_ip(full, 0, 5).reason == "bad-family"


# --- malformed input --------------------------------------------------------

ALL_ATTRS = P.Packet.__slots__


def _sample_frames() -> list[bytes]:
    tcp_quote = bytes(IP(src=B4, dst=C4) / TCP(sport=1, dport=2) / Raw(b"x" * 20))
    v6_quote = bytes(IPv6(src=B6, dst=C6) / UDP(sport=1, dport=2) / Raw(b"x" * 20))
    opts = [("MSS", 1460), ("WScale", 7)]
    return [
        eth(IP(src=A4, dst=B4) / TCP(flags="S", options=opts) / Raw(b"p" * 10)),
        eth(IP(src=A4, dst=B4, options=b"\x94\x04\x00\x00") / UDP() / Raw(b"p" * 10)),
        eth(IP(src=A4, dst=B4) / ICMP(type=8, id=3) / Raw(b"p" * 4)),
        eth(IP(src=A4, dst=B4) / ICMP(type=11) / Raw(tcp_quote)),
        eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[C6])
            / IPv6ExtHdrFragment(m=1) / TCP(flags="S", options=opts)),
        eth(IPv6(src=A6, dst=B6) / ICMPv6DestUnreach() / Raw(v6_quote)),
        eth(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=9)),
        bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=3) / IP(src=A4, dst=B4) / UDP()),
    ]


def _check_consistent(p: P.Packet) -> None:
    for name in ALL_ATTRS:
        getattr(p, name)  # every attribute is always present
    assert p.reason != "internal-error", "parser relied on its exception safety net"
    if p.valid:
        assert p.reason == ""
    else:
        assert REASON_RE.match(p.reason), p.reason


@pytest.mark.parametrize("index", range(8))
def test_every_truncation(index):
    """Each cut of a valid frame parses without raising; only the full frame is valid."""
    frame = _sample_frames()[index]
    for n in range(len(frame) + 1):
        for obj in (frame[:n], memoryview(frame)[:n]):
            p = P.parse(obj)
            _check_consistent(p)
            assert p.valid == (n == len(frame)), (n, p.reason)


@pytest.mark.parametrize("index", [0, 1, 3, 4, 5])
def test_every_truncation_with_lengths_fixed(index):
    """Cut frames whose IP length is patched to match: a cut L3/L4 header is invalid."""
    frame = _sample_frames()[index]
    full = P.parse(frame)
    header_end = full.l4 + (8 if full.proto != 6 else (frame[full.l4 + 12] >> 4) * 4)
    for n in range(full.l3 + (20 if full.family == 4 else 40), len(frame) + 1):
        cut = bytearray(frame[:n])
        if full.family == 4:
            cut[full.l3 + 2:full.l3 + 4] = (n - full.l3).to_bytes(2, "big")
        else:
            cut[full.l3 + 4:full.l3 + 6] = (n - full.l3 - 40).to_bytes(2, "big")
        p = P.parse(cut)
        _check_consistent(p)
        if n < header_end:
            assert not p.valid and "truncated" in p.reason, (n, p.reason)
        elif full.inner is None and full.proto != P.IPPROTO_UDP:
            # UDP keeps its own length field, which the cut contradicts.
            assert p.valid, (n, p.reason)


def _v4(**kw) -> bytearray:
    return bytearray(eth(IP(src=A4, dst=B4, **kw) / TCP() / Raw(b"x" * 8)))


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f.__setitem__(14, 0x44), "bad-ihl"),
    (lambda f: f.__setitem__(14, 0x4F), "truncated-ipv4"),
    (lambda f: f.__setitem__(14, 0x55), "bad-version"),
    (lambda f: f.__setitem__(slice(16, 18), (19).to_bytes(2, "big")), "bad-tot-len"),
    (lambda f: f.__setitem__(slice(16, 18), (200).to_bytes(2, "big")), "bad-tot-len"),
    (lambda f: f.__setitem__(46, 0x40), "bad-doff"),
    (lambda f: f.__setitem__(46, 0xF0), "truncated-tcp"),
])
def test_malformed_ipv4_tcp(mutate, reason):
    """Specific header corruptions give the documented reason."""
    f = _v4()
    mutate(f)
    p = P.parse(f)
    assert not p.valid and p.reason == reason


def test_malformed_udp_length():
    """UDP length below 8 or beyond the datagram is bad-udp-len."""
    for ulen in (7, 100):
        f = bytearray(eth(IP(src=A4, dst=B4) / UDP() / Raw(b"x" * 8)))
        f[38:40] = ulen.to_bytes(2, "big")
        assert P.parse(f).reason == "bad-udp-len"


def test_malformed_ipv6():
    """IPv6: a wrong version and a payload length beyond the frame are rejected."""
    f = bytearray(eth(IPv6(src=A6, dst=B6) / UDP()))
    f[14] = 0x40
    assert P.parse(f).reason == "bad-version"
    f = bytearray(eth(IPv6(src=A6, dst=B6) / UDP()))
    f[18:20] = (9).to_bytes(2, "big")
    assert P.parse(f).reason == "bad-payload-len"


def test_ipv6_extension_header_overrunning_payload():
    """An extension header whose length runs past the payload is truncated-ext."""
    f = bytearray(eth(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / UDP()))
    f[55] = 5  # 48-byte header in a 16-byte payload
    p = P.parse(f)
    assert not p.valid and p.reason == "truncated-ext"


def test_random_garbage_never_raises():
    """Seeded random frames (raw, IP-typed and mutated valid ones) never raise or crash."""
    rng = random.Random(0xC7D9)
    samples = _sample_frames()
    seen_valid = seen_invalid = 0
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            f = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        elif kind == 1:
            et = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00"])
            f = bytes(12) + et + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        else:
            f = bytearray(rng.choice(samples))
            for _ in range(rng.randrange(1, 4)):
                f[rng.randrange(14, len(f))] = rng.getrandbits(8)
        p = P.parse(f)
        _check_consistent(p)
        seen_valid += p.valid
        seen_invalid += not p.valid
    assert seen_valid and seen_invalid


def test_non_buffer_input_is_invalid_not_raised():
    """Even a non-buffer argument gives an invalid Packet instead of an exception."""
    p = P.parse(None)  # type: ignore[arg-type]
    assert not p.valid and p.reason == "internal-error"


# --- rewrites ---------------------------------------------------------------

FLOWS4 = [
    IP(src=A4, dst=B4) / TCP(sport=1111, dport=80, flags="A") / Raw(b"t" * 21),
    IP(src=A4, dst=B4) / UDP(sport=1111, dport=53) / Raw(b"u" * 9),
    IP(src=A4, dst=B4, options=b"\x94\x04\x00\x00") / TCP(sport=1, dport=2),
]
FLOWS6 = [
    IPv6(src=A6, dst=B6) / TCP(sport=1111, dport=80, flags="A") / Raw(b"t" * 21),
    IPv6(src=A6, dst=B6) / UDP(sport=1111, dport=53) / Raw(b"u" * 9),
    IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2),
]


@pytest.mark.parametrize("l3", FLOWS4 + FLOWS6)
def test_address_and_port_rewrites_match_scapy(l3):
    """set_src/set_dst/set_sport/set_dport keep every checksum equal to scapy's."""
    buf = bytearray(eth(l3))
    p = P.parse(buf)
    new_src, new_dst = (addr(C4), addr("203.0.113.5")) if p.family == 4 else (
        addr(C6), addr("2001:db8:ffff::1"))
    P.set_src(buf, p, new_src)
    assert_checksums(buf)
    P.set_dst(buf, p, new_dst)
    assert_checksums(buf)
    P.set_sport(buf, p, 40000)
    assert_checksums(buf)
    P.set_dport(buf, p, 8443)
    assert_checksums(buf)
    again = P.parse(buf)
    assert (again.src, again.dst, again.sport, again.dport) == (new_src, new_dst, 40000, 8443)
    assert (p.src, p.dst, p.sport, p.dport) == (new_src, new_dst, 40000, 8443)


def test_random_rewrites_match_scapy():
    """Many random address/port rewrites (v4 and v6) keep checksums equal to scapy's."""
    rng = random.Random(7)
    for i in range(120):
        l3 = (FLOWS4 + FLOWS6)[i % 6]
        buf = bytearray(eth(l3))
        p = P.parse(buf)
        size = 4 if p.family == 4 else 16
        P.set_src(buf, p, rng.randbytes(size))
        P.set_dst(buf, p, rng.randbytes(size))
        P.set_sport(buf, p, rng.randrange(65536))
        P.set_dport(buf, p, rng.randrange(65536))
        assert_checksums(buf)


def test_udp_zero_checksum_stays_zero_ipv4():
    """An IPv4 UDP checksum of 0 (none) survives address and port rewrites as 0."""
    buf = bytearray(eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2, chksum=0) / Raw(b"x")))
    p = P.parse(buf)
    P.set_src(buf, p, addr(C4))
    P.set_dport(buf, p, 99)
    assert buf[p.l4 + 6:p.l4 + 8] == b"\x00\x00"
    assert_checksums(buf)  # the IPv4 header checksum is still right


def test_udp_computed_zero_is_sent_as_ffff():
    """When a UDP rewrite makes the checksum come out as 0, 0xffff is written (as scapy does)."""
    buf = bytearray(eth(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(b"x")))
    p = P.parse(buf)
    csum = int.from_bytes(buf[p.l4 + 6:p.l4 + 8], "big")
    # Choose the new sport so that csum + old - new == 0 (mod 0xffff).
    P.set_sport(buf, p, (csum + 1) % 0xFFFF)
    assert buf[p.l4 + 6:p.l4 + 8] == b"\xff\xff"
    assert_checksums(buf)


@pytest.mark.parametrize("l3", [
    IP(src=A4, dst=B4) / ICMP(type=8, id=5, seq=1) / Raw(b"ping"),
    IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=5, seq=1) / Raw(b"ping"),
])
def test_icmp_echo_id_rewrite(l3):
    """Rewriting the echo id (and addresses) fixes the ICMP/ICMPv6 checksum."""
    buf = bytearray(eth(l3))
    p = P.parse(buf)
    P.set_sport(buf, p, 0xBEEF)
    assert (p.sport, p.dport) == (0xBEEF, 0xBEEF)
    assert_checksums(buf)
    P.set_src(buf, p, addr(C4) if p.family == 4 else addr(C6))
    assert_checksums(buf)
    assert P.parse(buf).sport == 0xBEEF


def test_dec_ttl_every_value():
    """dec_ttl from 255 down to 0 keeps the IPv4 header checksum equal to scapy's."""
    buf = bytearray(eth(IP(src=A4, dst=B4, ttl=255) / TCP()))
    p = P.parse(buf)
    for expect in range(254, -1, -1):
        assert P.dec_ttl(buf, p) == expect
        assert buf[p.l3 + 8] == expect == p.ttl
        if expect % 17 == 0:
            assert_checksums(buf)
    assert_checksums(buf)
    with pytest.raises(ValueError):
        P.dec_ttl(buf, p)


def test_dec_ttl_ipv6():
    """dec_ttl decrements the IPv6 hop limit; no checksum covers it."""
    buf = bytearray(eth(IPv6(src=A6, dst=B6, hlim=2) / UDP()))
    p = P.parse(buf)
    assert P.dec_ttl(buf, p) == 1 and P.parse(buf).ttl == 1
    assert_checksums(buf)


def test_set_macs():
    """set_macs writes destination then source MAC and updates the Packet."""
    buf = bytearray(eth(IP(src=A4, dst=B4) / UDP()))
    p = P.parse(buf)
    P.set_macs(buf, b"\x02" * 6, b"\x04" * 6, p)
    e = Ether(bytes(buf))
    assert (e.src, e.dst) == ("02:02:02:02:02:02", "04:04:04:04:04:04")
    assert (p.eth_src, p.eth_dst) == (b"\x02" * 6, b"\x04" * 6)


def test_rewrite_first_fragment_matches_whole_datagram():
    """On a first fragment the L4 checksum is updated as on the unfragmented datagram."""
    whole = IP(src=A4, dst=B4, id=4) / UDP(sport=10, dport=20) / Raw(b"f" * 300)
    full_buf = bytearray(eth(whole))
    frag_buf = bytearray(eth(fragment(whole, fragsize=128)[0]))
    for b in (full_buf, frag_buf):
        p = P.parse(b)
        P.set_src(b, p, addr(C4))
        P.set_sport(b, p, 4321)
    assert full_buf[42:44] == frag_buf[42:44]  # UDP checksum field
    assert_checksums(full_buf)


def test_rewrite_non_first_fragment():
    """A non-first fragment gets its IP header fixed; ports cannot be set."""
    frag = fragment(IP(src=A4, dst=B4) / UDP() / Raw(b"f" * 300), fragsize=128)[1]
    buf = bytearray(eth(frag))
    p = P.parse(buf)
    P.set_dst(buf, p, addr(C4))
    assert_checksums(buf)
    with pytest.raises(ValueError):
        P.set_sport(buf, p, 1)


def test_rewrite_misuse_raises():
    """Wrong address size, invalid packets and portless protocols raise ValueError."""
    buf = bytearray(eth(IP(src=A4, dst=B4, proto=47) / Raw(b"x" * 4)))
    p = P.parse(buf)
    with pytest.raises(ValueError):
        P.set_src(buf, p, addr(A6))
    with pytest.raises(ValueError):
        P.set_dport(buf, p, 1)
    with pytest.raises(ValueError):
        P.set_src(buf, P.parse(b"\x00"), addr(A4))


def _icmp4_error(quote: bytes, itype=3, code=3) -> bytes:
    return eth(IP(src=C4, dst=A4) / ICMP(type=itype, code=code) / Raw(quote))


def _icmp6_error(quote: bytes) -> bytes:
    return eth(IPv6(src=C6, dst=A6) / ICMPv6DestUnreach(code=4) / Raw(quote))


@pytest.mark.parametrize("make_inner,cut", [
    (lambda s, d, sp, dp: IP(src=s, dst=d) / TCP(sport=sp, dport=dp, seq=5) / Raw(b"i" * 40),
     None),
    (lambda s, d, sp, dp: IP(src=s, dst=d) / TCP(sport=sp, dport=dp, seq=5) / Raw(b"i" * 40),
     28),
    (lambda s, d, sp, dp: IP(src=s, dst=d) / UDP(sport=sp, dport=dp) / Raw(b"i" * 9), None),
    (lambda s, d, sp, dp: IP(src=s, dst=d) / UDP(sport=sp, dport=dp, chksum=0) / Raw(b"i"),
     None),
    (lambda s, d, sp, dp: IP(src=s, dst=d) / ICMP(type=8, id=sp, seq=1) / Raw(b"i" * 7), None),
])
def test_rewrite_inner_ipv4_matches_scapy(make_inner, cut):
    """rewrite_inner on an ICMPv4 error equals the error scapy builds around the rewritten quote."""
    is_icmp = "ICMP" in repr(make_inner(A4, B4, 1, 1))
    before = bytes(make_inner(A4, B4, 1000, 443))
    buf = bytearray(_icmp4_error(before[:cut]))
    outer = P.parse(buf)
    assert outer.valid, outer.reason
    if is_icmp:  # an echo id is both ports
        P.rewrite_inner(buf, outer, src=addr(C4), sport=2222)
        after = bytes(make_inner(C4, B4, 2222, 2222))
    else:
        P.rewrite_inner(buf, outer, src=addr(C4), dst=addr("203.0.113.1"), sport=2222,
                        dport=8080)
        after = bytes(make_inner(C4, "203.0.113.1", 2222, 8080))
    assert bytes(buf) == _icmp4_error(after[:cut])
    i = outer.inner
    assert i.src == addr(C4) and i.sport == 2222


@pytest.mark.parametrize("make_inner,cut", [
    (lambda s, d, sp, dp: IPv6(src=s, dst=d) / TCP(sport=sp, dport=dp) / Raw(b"i" * 40), None),
    (lambda s, d, sp, dp: IPv6(src=s, dst=d) / TCP(sport=sp, dport=dp) / Raw(b"i" * 40), 48),
    (lambda s, d, sp, dp: IPv6(src=s, dst=d) / UDP(sport=sp, dport=dp) / Raw(b"i" * 9), None),
])
def test_rewrite_inner_ipv6_matches_scapy(make_inner, cut):
    """rewrite_inner on an ICMPv6 error (pseudo-header checksum) equals scapy's rebuild."""
    before = bytes(make_inner(A6, B6, 1000, 443))
    buf = bytearray(_icmp6_error(before[:cut]))
    outer = P.parse(buf)
    P.rewrite_inner(buf, outer, src=addr(C6), dport=8080)
    after = bytes(make_inner(C6, B6, 1000, 8080))
    assert bytes(buf) == _icmp6_error(after[:cut])
    assert (outer.inner.src, outer.inner.dport) == (addr(C6), 8080)


def test_rewrite_inner_icmpv6_echo_quote():
    """An ICMPv6 echo quoted in an error gets its id and inner ICMPv6 checksum fixed."""
    mk = lambda s, i: IPv6(src=s, dst=B6) / ICMPv6EchoRequest(id=i, seq=3) / Raw(b"e" * 5)  # noqa: E731
    buf = bytearray(_icmp6_error(bytes(mk(A6, 7))))
    outer = P.parse(buf)
    P.rewrite_inner(buf, outer, src=addr(C6), dport=99)
    assert bytes(buf) == _icmp6_error(bytes(mk(C6, 99)))


def test_rewrite_inner_refused_change_keeps_checksums():
    """A refused inner port change (quoted non-first fragment) leaves a consistent frame."""
    frag = fragment(IP(src=A4, dst=B4) / UDP() / Raw(b"f" * 300), fragsize=128)[1]
    buf = bytearray(_icmp4_error(bytes(frag)[:60]))
    outer = P.parse(buf)
    assert outer.valid and outer.inner.l4 == -1
    with pytest.raises(ValueError):
        P.rewrite_inner(buf, outer, src=addr(C4), sport=1)
    assert outer.inner.src == addr(C4)
    assert_checksums(buf)
    assert scapy_checksum(bytes(buf[outer.inner.l3:outer.inner.l3 + 20])) == 0


def test_rewrite_inner_requires_error():
    """rewrite_inner on a packet without a quoted datagram raises ValueError."""
    buf = bytearray(eth(IP(src=A4, dst=B4) / TCP()))
    with pytest.raises(ValueError):
        P.rewrite_inner(buf, P.parse(buf), src=addr(C4))


def test_outer_rewrite_of_icmp_error():
    """Outer set_dst on an ICMPv4 error fixes only the IP header; on ICMPv6, the pseudo-header."""
    for f in (_icmp4_error(bytes(IP(src=A4, dst=B4) / UDP())),
              _icmp6_error(bytes(IPv6(src=A6, dst=B6) / UDP()))):
        buf = bytearray(f)
        p = P.parse(buf)
        P.set_dst(buf, p, addr(B4) if p.family == 4 else addr(B6))
        assert_checksums(buf)


# --- checksum helpers -------------------------------------------------------


def test_checksum_matches_scapy_and_updates_agree():
    """checksum() equals scapy's; csum_update16/32/bytes equal a full recomputation."""
    rng = random.Random(3)
    for n in list(range(0, 9)) + [63, 64, 1500]:
        data = rng.randbytes(n)
        assert P.checksum(data) == scapy_checksum(data), n
    assert P.checksum(b"\x00\x00") == 0xFFFF
    data = bytearray(rng.randbytes(40))
    c = P.checksum(data)
    for _ in range(200):
        off = rng.randrange(0, 19) * 2
        old16, new16 = int.from_bytes(data[off:off + 2], "big"), rng.randrange(65536)
        data[off:off + 2] = new16.to_bytes(2, "big")
        c = P.csum_update16(c, old16, new16)
        assert c == P.checksum(data)
        off = rng.randrange(0, 9) * 2
        old32, new32 = int.from_bytes(data[off:off + 4], "big"), rng.getrandbits(32)
        data[off:off + 4] = new32.to_bytes(4, "big")
        c = P.csum_update32(c, old32, new32)
        assert c == P.checksum(data)
        old = bytes(data[8:24])
        data[8:24] = rng.randbytes(16)
        c = P.csum_update_bytes(c, old, data[8:24])
        assert c == P.checksum(data)


# --- ICMP errors built by the router ----------------------------------------


def _checks_out(dgram: bytes) -> None:
    """Scapy recomputes the same checksums for an Ethernet-wrapped datagram."""
    assert_checksums(eth(IP(dgram) if dgram[0] >> 4 == 4 else IPv6(dgram)))


def test_build_icmp4_time_exceeded():
    """IPv4 time-exceeded quotes the offending datagram (here whole) with valid checksums."""
    orig = eth(IP(src=A4, dst=B4, ttl=1) / TCP(sport=3, dport=4) / Raw(b"x" * 30))
    p = P.parse(orig)
    out = P.build_icmp_error(p, P.ICMP_ERR_TIME_EXCEEDED, src_addr=addr(C4))
    s = IP(out)
    assert (s.src, s.dst, s[ICMP].type, s[ICMP].code) == (C4, A4, 11, 0)
    assert out[28:] == orig[14:]
    _checks_out(out)
    back = P.parse(eth(IP(out)))
    assert back.valid and back.inner.sport == 3 and back.inner.dst == addr(B4)


def test_build_icmp4_frag_needed_quote_limit():
    """IPv4 frag-needed carries the next-hop MTU and keeps the whole error within 576 bytes."""
    orig = eth(IP(src=A4, dst=B4, flags="DF") / UDP(sport=3, dport=4) / Raw(b"x" * 1400))
    out = P.build_icmp_error(P.parse(orig), "frag-needed", src_addr=addr(C4), mtu=1280)
    s = IP(out)
    assert (s[ICMP].type, s[ICMP].code, s[ICMP].nexthopmtu) == (3, 4, 1280)
    assert len(out) == 576 and out[28:] == orig[14:14 + 548]
    _checks_out(out)


def test_build_icmp6_errors():
    """ICMPv6 time-exceeded and packet-too-big quote up to 1280 bytes with a valid checksum."""
    orig = eth(IPv6(src=A6, dst=B6) / UDP(sport=3, dport=4) / Raw(b"x" * 1400))
    p = P.parse(orig)
    te = P.build_icmp_error(p, P.ICMP_ERR_TIME_EXCEEDED, src_addr=addr(C6))
    big = P.build_icmp_error(p, P.ICMP_ERR_TOO_BIG, src_addr=addr(C6), mtu=1400)
    assert IPv6(te)[ICMPv6TimeExceeded].code == 0
    assert IPv6(big)[ICMPv6PacketTooBig].mtu == 1400
    for out in (te, big):
        assert len(out) == 1280 and out[48:] == orig[14:14 + 1232]
        assert (IPv6(out).src, IPv6(out).dst) == (C6, A6)
        _checks_out(out)
    small = P.build_icmp_error(P.parse(eth(IPv6(src=A6, dst=B6) / UDP())), "time-exceeded",
                               src_addr=addr(C6))
    assert len(small) == 40 + 8 + 48
    _checks_out(small)


def test_build_icmp_error_rejects_bad_requests():
    """Unknown kinds and wrong-size source addresses raise ValueError."""
    p = P.parse(eth(IP(src=A4, dst=B4) / UDP()))
    with pytest.raises(ValueError):
        P.build_icmp_error(p, "nope", src_addr=addr(C4))
    with pytest.raises(ValueError):
        P.build_icmp_error(p, "time-exceeded", src_addr=addr(C6))


@pytest.mark.parametrize("frame,kind,allowed", [
    (eth(IP(src=A4, dst=B4) / TCP()), "time-exceeded", True),
    (eth(IP(src=A4, dst=B4) / ICMP(type=3) / Raw(bytes(IP() / UDP()))), "time-exceeded", False),
    (eth(IP(src=A4, dst=B4) / ICMP(type=8)), "time-exceeded", True),
    (eth(IP(src=A4, dst="224.0.0.5") / UDP()), "time-exceeded", False),
    (eth(IP(src="0.0.0.0", dst=B4) / UDP()), "time-exceeded", False),
    (eth(IP(src=A4, dst=B4, frag=10) / Raw(b"x" * 8)), "time-exceeded", False),
    (bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src=A4, dst=B4) / UDP()),
     "time-exceeded", False),
    (eth(IPv6(src=A6, dst=B6) / UDP()), "too-big", True),
    (eth(IPv6(src=A6, dst="ff02::1") / UDP()), "time-exceeded", False),
    (eth(IPv6(src=A6, dst="ff02::1") / UDP()), "too-big", True),
    (eth(IPv6(src=A6, dst=B6) / ICMPv6TimeExceeded() / Raw(bytes(IPv6() / UDP()))),
     "too-big", False),
])
def test_icmp_error_allowed(frame, kind, allowed):
    """ICMP errors are never sent about errors, non-first fragments, multicast or bad sources."""
    assert P.icmp_error_allowed(P.parse(frame), kind) is allowed
