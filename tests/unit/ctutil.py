"""Scapy frame builders shared by the conntrack unit tests.

Contract: every builder returns a ``bytearray`` Ethernet frame with correct
checksums (scapy computes them), ready for ``ctxdp.packet.parse``. ``TcpPeers``
plays both ends of one TCP connection, keeping each side's sequence number,
so tests can drive realistic handshakes, data and teardowns.
"""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctxdp.conntrack import CS, ConnTracker, CtResult, cs_str
from ctxdp.packet import Packet, parse

MAC_A = "02:00:00:00:00:01"
MAC_B = "02:00:00:00:00:02"


def ip(s: str) -> bytes:
    """Text address -> network-order bytes."""
    return ipaddress.ip_address(s).packed


def _is6(addr: str) -> bool:
    return ":" in addr


def _l3(src: str, dst: str, **kw):
    return IPv6(src=src, dst=dst, **kw) if _is6(src) else IP(src=src, dst=dst, **kw)


def frame(l3pkt) -> bytearray:
    """Wrap an IP-layer scapy packet in Ethernet and build it."""
    et = 0x86DD if isinstance(l3pkt, IPv6) else 0x0800
    return bytearray(bytes(Ether(src=MAC_A, dst=MAC_B, type=et) / l3pkt))


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, seq: int = 0, ack: int = 0,
        win: int = 65535, payload: bytes = b"", options=None) -> bytearray:
    t = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=win,
            options=options or [])
    p = _l3(src, dst) / t
    if payload:
        p = p / Raw(payload)
    return frame(p)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytearray:
    return frame(_l3(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def udp_nocsum(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytearray:
    """IPv4 UDP with checksum 0 (no checksum)."""
    return frame(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport, chksum=0) / Raw(payload))


def echo(src: str, dst: str, ident: int, reply: bool = False, seq: int = 1) -> bytearray:
    if _is6(src):
        e = ICMPv6EchoReply(id=ident, seq=seq) if reply else ICMPv6EchoRequest(id=ident, seq=seq)
        return frame(IPv6(src=src, dst=dst) / e / Raw(b"ping"))
    return frame(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=seq)
                 / Raw(b"ping"))


def icmp_error(src: str, dst: str, quoted: bytearray, kind: str = "unreach") -> bytearray:
    """An ICMP(v6) error from ``src`` to ``dst`` quoting the IP datagram of ``quoted``."""
    q = bytes(quoted[14:])
    if _is6(src):
        err = ICMPv6PacketTooBig(mtu=1280) if kind == "toobig" else ICMPv6DestUnreach(code=4)
        return frame(IPv6(src=src, dst=dst) / err / Raw(q))
    return frame(IP(src=src, dst=dst) / ICMP(type=3, code=3 if kind == "unreach" else 4)
                 / Raw(q))


def other(src: str, dst: str, proto: int = 47, payload: bytes = b"\0\0\x08\0abcd") -> bytearray:
    """A packet of a protocol without a dedicated handler (default GRE)."""
    if _is6(src):
        return frame(IPv6(src=src, dst=dst, nh=proto) / Raw(payload))
    return frame(IP(src=src, dst=dst, proto=proto) / Raw(payload))


def P(buf: bytearray) -> Packet:
    """Parse, asserting the test frame itself is well-formed."""
    p = parse(buf)
    assert p.valid, p.reason
    return p


def checksums_ok(buf: bytearray) -> bool:
    """True if scapy's recomputed checksums (IP, L4, quoted datagram) equal the frame's."""
    orig = Ether(bytes(buf))
    clone = orig.copy()
    layer = clone
    while layer is not None and not isinstance(layer, Raw):
        if hasattr(layer, "chksum"):
            # UDP over IPv4 with checksum 0 means "none": must stay 0.
            if isinstance(layer, UDP) and layer.chksum == 0 and not isinstance(
                    layer.underlayer, IPv6):
                pass
            else:
                del layer.chksum
        if hasattr(layer, "cksum"):
            del layer.cksum
        layer = layer.payload if layer.payload else None
    return bytes(Ether(bytes(clone))) == bytes(orig)


def st(res: CtResult) -> str:
    return cs_str(res.state)


class TcpPeers:
    """Both ends of one TCP connection, with their sequence numbers.

    ``a`` is the client (originator), ``b`` the server. ``send(side, flags,
    n=0)`` builds the next segment from that side carrying ``n`` payload
    bytes, advancing the side's sequence number as a real stack would;
    ``run(ct, side, ...)`` also parses it and executes it through ``ct``.
    """

    def __init__(self, a: str = "10.0.0.1", b: str = "10.0.0.2", sport: int = 40000,
                 dport: int = 80, isn_a: int = 1000, isn_b: int = 5000, win: int = 64000,
                 wscale: int | None = None) -> None:
        self.addr = {"a": a, "b": b}
        self.port = {"a": sport, "b": dport}
        self.nxt = {"a": isn_a, "b": isn_b}
        self.win = win
        self.wscale = wscale

    def send(self, side: str, flags: str, n: int = 0, seq: int | None = None,
             ack: int | None = None, win: int | None = None) -> bytearray:
        other_ = "b" if side == "a" else "a"
        s = self.nxt[side] if seq is None else seq
        a = self.nxt[other_] if ack is None else ack
        opts = None
        if "S" in flags and self.wscale is not None:
            opts = [("WScale", self.wscale)]
        buf = tcp(self.addr[side], self.addr[other_], self.port[side], self.port[other_], flags,
                  seq=s % 2**32, ack=(a % 2**32) if "A" in flags else 0,
                  win=self.win if win is None else win, payload=b"d" * n, options=opts)
        if seq is None:
            adv = n + (1 if "S" in flags else 0) + (1 if "F" in flags else 0)
            self.nxt[side] = (self.nxt[side] + adv) % 2**32
        return buf

    def run(self, ct: ConnTracker, side: str, flags: str, n: int = 0, now: float = 0.0,
            zone: int = 0, commit: bool = True, **kw) -> CtResult:
        return ct.execute(P(self.send(side, flags, n, **kw)), zone, now, commit=commit)

    def handshake(self, ct: ConnTracker, now: float = 0.0, zone: int = 0) -> CtResult:
        r = self.run(ct, "a", "S", now=now, zone=zone)
        assert r.conn is not None and r.state == CS.TRK | CS.NEW, r
        r2 = self.run(ct, "b", "SA", now=now, zone=zone)
        assert r2.state & CS.EST and r2.state & CS.RPL, r2
        r3 = self.run(ct, "a", "A", now=now, zone=zone)
        assert r3.conn is r.conn and r3.conn.state_name == "ESTABLISHED", r3
        return r3
