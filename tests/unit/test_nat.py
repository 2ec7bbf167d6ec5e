"""NAT: SNAT/DNAT tuple choice, collisions, ranges, in-place rewrites with valid checksums."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, ICMPerror, IPerror, TCPerror
from scapy.layers.inet6 import IPerror6, IPv6, UDPerror
from scapy.layers.l2 import Ether

from ctxdp.conntrack import CS, ConnTracker, NatAction
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.conntrack.nat import select_reply
from tests.unit.ctutil import (
    P,
    TcpPeers,
    checksums_ok,
    echo,
    icmp_error,
    ip,
    other,
    tcp,
    udp,
    udp_nocsum,
)

NEW = CS.TRK | CS.NEW
EST = CS.TRK | CS.EST
CLIENT, CLIENT2, SERVER, PUB, PUB2, RTR = (
    "10.0.0.1", "10.0.0.2", "198.51.100.7", "203.0.113.1", "203.0.113.2", "192.0.2.254")


def snat(addr=PUB, addr_max=None, pmin=0, pmax=0) -> NatAction:
    return NatAction("snat", ip(addr), ip(addr_max) if addr_max else None, pmin, pmax)


def run(ct, buf, now=0.0, **kw):
    """Execute a frame and return (result, scapy view of the possibly rewritten frame)."""
    r = ct.execute(P(buf), 0, now, **kw)
    return r, Ether(bytes(buf))


def test_snat_keeps_port_and_translates_both_ways():
    """SNAT rewrites the client's source (port kept when free) and replies back, checksums valid."""
    ct = ConnTracker()
    buf = tcp(CLIENT, SERVER, 40000, 80, "S", seq=1)
    r, pkt = run(ct, buf, commit=True, nat=snat())
    assert r.state == NEW | CS.SRC_NAT and r.conn.nat.snat and not r.conn.nat.dnat
    assert pkt[IP].src == PUB and pkt[TCP].sport == 40000 and checksums_ok(buf)
    c = r.conn
    assert c.orig == FlowTuple(4, 6, ip(CLIENT), ip(SERVER), 40000, 80)
    assert c.reply == FlowTuple(4, 6, ip(SERVER), ip(PUB), 80, 40000)
    back = tcp(SERVER, PUB, 80, 40000, "SA", seq=9, ack=2)
    r, pkt = run(ct, back)
    assert r.conn is c and r.reply and r.state == EST | CS.RPL | CS.SRC_NAT
    assert pkt[IP].dst == CLIENT and pkt[TCP].dport == 40000 and checksums_ok(back)


def test_snat_collision_two_clients_same_port():
    """Two clients with the same source port get distinct public ports; replies go to the right one."""
    ct = ConnTracker()
    b1 = tcp(CLIENT, SERVER, 40000, 80, "S", seq=1)
    b2 = tcp(CLIENT2, SERVER, 40000, 80, "S", seq=1)
    c1 = run(ct, b1, commit=True, nat=snat())[0].conn
    r2, pkt2 = run(ct, b2, commit=True, nat=snat())
    c2 = r2.conn
    assert c1.reply.dport == 40000
    p2 = c2.reply.dport
    assert p2 != 40000 and 1024 <= p2 <= 65535 and pkt2[TCP].sport == p2 and checksums_ok(b2)
    for conn, port, client in ((c1, 40000, CLIENT), (c2, p2, CLIENT2)):
        back = tcp(SERVER, PUB, 80, port, "SA", seq=9, ack=2)
        r, pkt = run(ct, back)
        assert r.conn is conn and pkt[IP].dst == client and pkt[TCP].dport == 40000
        assert checksums_ok(back)


def test_port_range_and_exhaustion():
    """Ports come from the given range; when it is used up the NEW connection is refused and counted."""
    ct = ConnTracker()
    nat = snat(pmin=2000, pmax=2001)
    ports = set()
    for i in range(2):
        r = run(ct, tcp(f"10.0.1.{i + 1}", SERVER, 5555, 80, "S"), commit=True, nat=nat)[0]
        ports.add(r.conn.reply.dport)
    assert ports == {2000, 2001}
    buf = tcp("10.0.1.9", SERVER, 5555, 80, "S")
    orig = bytes(buf)
    r = run(ct, buf, commit=True, nat=nat)[0]
    assert r.state == NEW and r.conn is None and r.reason == "nat-exhausted"
    assert ct.stats.refused_nat == 1 and len(ct) == 2 and bytes(buf) == orig


def test_original_port_kept_inside_range():
    """A source port already inside the range is kept."""
    ct = ConnTracker()
    r = run(ct, tcp(CLIENT, SERVER, 3000, 80, "S"), commit=True, nat=snat(pmin=2000, pmax=4000))[0]
    assert r.conn.reply.dport == 3000


def test_address_range():
    """Exhausting one address's single port moves to the next address of the range."""
    ct = ConnTracker()
    nat = snat(PUB, PUB2, 7000, 7000)
    addrs = set()
    for i in range(2):
        r = run(ct, tcp(f"10.0.2.{i + 1}", SERVER, 1234, 80, "S"), commit=True, nat=nat)[0]
        addrs.add(r.conn.reply.dst)
    assert addrs == {ip(PUB), ip(PUB2)}
    r = run(ct, tcp("10.0.2.3", SERVER, 1234, 80, "S"), commit=True, nat=nat)[0]
    assert r.conn is None and r.reason == "nat-exhausted"


def test_dnat_with_port():
    """DNAT VIP:80 -> server:8080; replies are rewritten back to VIP:80, checksums valid."""
    ct = ConnTracker()
    vip, backend = "203.0.113.80", "10.9.9.9"
    nat = NatAction("dnat", ip(backend), None, 8080, 8080)
    buf = tcp(CLIENT, vip, 40000, 80, "S", seq=1)
    r, pkt = run(ct, buf, commit=True, nat=nat)
    assert r.state == NEW | CS.DST_NAT and r.conn.nat.dnat
    assert pkt[IP].dst == backend and pkt[TCP].dport == 8080 and checksums_ok(buf)
    assert r.conn.reply == FlowTuple(4, 6, ip(backend), ip(CLIENT), 8080, 40000)
    back = tcp(backend, CLIENT, 8080, 40000, "SA", seq=5, ack=2)
    r, pkt = run(ct, back)
    assert r.reply and r.state & CS.DST_NAT
    assert pkt[IP].src == vip and pkt[TCP].sport == 80 and checksums_ok(back)


def test_dnat_without_port_keeps_port():
    """DNAT with no port range changes only the address."""
    ct = ConnTracker()
    buf = udp(CLIENT, "203.0.113.53", 999, 53)
    r, pkt = run(ct, buf, commit=True, nat=NatAction("dnat", ip("10.0.0.53")))
    assert pkt[IP].dst == "10.0.0.53" and pkt[UDP].dport == 53 and checksums_ok(buf)


def test_udp_zero_checksum_stays_zero():
    """IPv4 UDP without checksum keeps checksum 0 through SNAT and reverse NAT."""
    ct = ConnTracker()
    buf = udp_nocsum(CLIENT, SERVER, 5000, 53)
    run(ct, buf, commit=True, nat=snat())
    assert Ether(bytes(buf))[UDP].chksum == 0 and checksums_ok(buf)
    back = udp_nocsum(SERVER, PUB, 53, 5000)
    _, pkt = run(ct, back)
    assert pkt[IP].dst == CLIENT and pkt[UDP].chksum == 0 and checksums_ok(back)


def test_icmp_echo_snat_translates_id_on_collision():
    """Two clients pinging with the same id get distinct ids; replies are restored."""
    ct = ConnTracker()
    run(ct, echo(CLIENT, SERVER, 7), commit=True, nat=snat())
    b2 = echo(CLIENT2, SERVER, 7)
    r, pkt = run(ct, b2, commit=True, nat=snat())
    new_id = pkt[ICMP].id
    assert new_id != 7 and r.conn.reply.sport == r.conn.reply.dport == new_id
    assert checksums_ok(b2)
    back = echo(SERVER, PUB, new_id, reply=True)
    r, pkt = run(ct, back)
    assert r.state & CS.EST and pkt[IP].dst == CLIENT2 and pkt[ICMP].id == 7
    assert checksums_ok(back)


def test_ipv6_snat():
    """SNAT works for IPv6 (address and pseudo-header checksum)."""
    ct = ConnTracker()
    nat = NatAction("snat", ip("2001:db8:ffff::1"))
    buf = tcp("2001:db8::1", "2001:db8:1::1", 1000, 443, "S")
    r, pkt = run(ct, buf, commit=True, nat=nat)
    assert pkt[IPv6].src == "2001:db8:ffff::1" and checksums_ok(buf)
    back = tcp("2001:db8:1::1", "2001:db8:ffff::1", 443, 1000, "SA", ack=1)
    r, pkt = run(ct, back)
    assert r.reply and pkt[IPv6].dst == "2001:db8::1" and checksums_ok(back)


def test_nat_range_of_other_family_is_refused():
    """An IPv4 NAT range cannot apply to an IPv6 connection: refused, not crashed."""
    ct = ConnTracker()
    r = run(ct, tcp("2001:db8::1", "2001:db8::2", 1, 2, "S"), commit=True, nat=snat())[0]
    assert r.conn is None and r.reason == "nat-exhausted"


def test_other_protocol_nat_is_address_only():
    """GRE (no ports) is SNAT'd by address; a second client with the same peer needs another address."""
    ct = ConnTracker()
    buf = other(CLIENT, SERVER)
    r, pkt = run(ct, buf, commit=True, nat=snat())
    assert pkt[IP].src == PUB and r.conn.reply.dport == 0 and checksums_ok(buf)
    r = run(ct, other(CLIENT2, SERVER), commit=True, nat=snat())[0]
    assert r.reason == "nat-exhausted"


def test_icmp_error_reverse_translated_snat():
    """An error sent to the public address about a SNAT'd packet reaches the client, quote restored."""
    ct = ConnTracker()
    f = TcpPeers(a=CLIENT, b=SERVER, sport=40000)
    syn = f.send("a", "S")
    c = ct.execute(P(syn), 0, 0.0, commit=True, nat=snat(pmin=6000, pmax=6000)).conn
    quoted = bytearray(syn)  # already translated: PUB:6000 -> SERVER:80
    err = icmp_error(RTR, PUB, quoted)
    r, pkt = run(ct, err)
    assert r.conn is c and r.state == CS.TRK | CS.REL | CS.RPL | CS.SRC_NAT
    assert pkt[IP].dst == CLIENT and pkt[IP].src == RTR
    assert pkt[IPerror].src == CLIENT and pkt[TCPerror].sport == 40000
    assert checksums_ok(err)


def test_icmp_error_reverse_translated_dnat_ipv6():
    """An ICMPv6 error from a DNAT backend gets the VIP back in outer source and quote."""
    ct = ConnTracker()
    vip, be, cl = "2001:db8:80::1", "2001:db8:99::9", "2001:db8::1"
    out = udp(cl, vip, 5000, 53)
    c = ct.execute(P(out), 0, 0.0, commit=True, nat=NatAction("dnat", ip(be))).conn
    err = icmp_error(be, cl, out)  # backend: port unreachable, quoting cl -> be
    r, pkt = run(ct, err)
    assert r.conn is c and r.reply and r.state & CS.DST_NAT
    assert pkt[IPv6].src == vip and pkt[IPerror6].dst == vip and pkt[UDPerror].dport == 53
    assert checksums_ok(err)


def test_icmp_error_original_direction_snat():
    """An error from inside about a reply packet is translated to the public view."""
    ct = ConnTracker()
    f = TcpPeers(a=CLIENT, b=SERVER, sport=40000)
    c = ct.execute(P(f.send("a", "S")), 0, 0.0, commit=True, nat=snat(pmin=6000, pmax=6000)).conn
    back = tcp(SERVER, PUB, 80, 6000, "SA", seq=5000, ack=1001)
    ct.execute(P(back), 0, 0.0)  # now SERVER:80 -> CLIENT:40000 as seen inside
    err = icmp_error(CLIENT, SERVER, back)
    r, pkt = run(ct, err)
    assert r.conn is c and not r.reply and r.state & CS.REL
    assert pkt[IP].src == PUB and pkt[IPerror].dst == PUB and pkt[TCPerror].dport == 6000
    assert checksums_ok(err)


def test_non_nat_commit_colliding_with_nat_reply_is_refused():
    """A plain connection whose reply tuple is already a NAT'd connection's is refused, not merged."""
    ct = ConnTracker()
    run(ct, tcp(CLIENT, SERVER, 40000, 80, "S"), commit=True, nat=snat())
    r = run(ct, tcp(PUB, SERVER, 40000, 80, "S"), commit=True)[0]
    # PUB:40000 -> SERVER:80 reverses to the SNAT'd connection's reply key.
    assert r.conn is None and r.reason == "tuple-collision" and ct.stats.refused_collision == 1


def test_nat_rewrite_on_readonly_buffer_is_counted_not_raised():
    """A NAT'd packet in an immutable buffer cannot be rewritten: +inv and counted."""
    ct = ConnTracker()
    r = ct.execute(P(bytes(tcp(CLIENT, SERVER, 1, 2, "S"))), 0, 0.0, commit=True, nat=snat())
    assert r.state == CS.TRK | CS.INV and r.reason == "nat-rewrite-failed"
    assert ct.stats.nat_errors == 1


def test_select_reply_ephemeral_fallback():
    """Without ports, SNAT tries the original port on every address, then the ephemeral range."""
    taken = set()
    args = (0, 6, ip(CLIENT), ip(SERVER), 40000, 80)
    k1, i1 = select_reply(taken, *args, snat(), (1024, 65535))
    assert i1.port == 40000
    taken.add(k1)
    k2, i2 = select_reply(taken, *args, snat(), (30000, 30001))
    assert i2.port in (30000, 30001)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="masq", addr_min=b"\1\2\3\4"),
        dict(kind="snat", addr_min=b"\1\2\3"),
        dict(kind="snat", addr_min=b"\1\2\3\4", addr_max=b"\1\2\3\3"),
        dict(kind="snat", addr_min=b"\1\2\3\4", port_min=10, port_max=5),
        dict(kind="snat", addr_min=b"\1\2\3\4", port_max=5),
        dict(kind="dnat", addr_min=b"\1\2\3\4", port_min=70000),
    ],
)
def test_nat_action_validation(kw):
    """Malformed NAT actions are rejected when built, not when a packet arrives."""
    with pytest.raises(ValueError):
        NatAction(**kw)


def test_reply_tuple_lookup_by_get():
    """ct.get finds a NAT'd connection by its original and by its post-NAT reply tuple."""
    ct = ConnTracker()
    c = run(ct, tcp(CLIENT, SERVER, 1, 2, "S"), commit=True, nat=snat())[0].conn
    assert ct.get(0, c.orig) is c and ct.get(0, c.reply) is c
    assert ct.get(0, c.orig.reverse()) is None  # pre-NAT reverse is not on the wire


def test_icmp_echo_quote_in_error_translated():
    """An error quoting a SNAT'd echo request restores the client's id and address."""
    ct = ConnTracker()
    run(ct, echo(CLIENT, SERVER, 7), commit=True, nat=snat())
    b2 = echo(CLIENT2, SERVER, 7)
    c2 = run(ct, b2, commit=True, nat=snat())[0].conn
    err = icmp_error(RTR, PUB, b2)
    r, pkt = run(ct, err)
    assert r.conn is c2 and pkt[IP].dst == CLIENT2 and pkt[IPerror].src == CLIENT2
    assert pkt[ICMPerror].id == 7
    assert checksums_ok(err)


def test_full_range_is_allocated_without_collisions_then_refused():
    """Double hashing hands out every port of a 1000-port range exactly once, then refuses."""
    taken: set[bytes] = set()
    ports = set()
    for i in range(1000):
        src = bytes([10, 1, i >> 8, i & 255])
        k, info = select_reply(taken, 0, 6, src, ip(SERVER), 5555, 80, snat(pmin=3000, pmax=3999),
                               (1024, 65535))
        assert k not in taken
        taken.add(k)
        ports.add(info.port)
    assert ports == set(range(3000, 4000))
    assert select_reply(taken, 0, 6, ip("10.9.9.9"), ip(SERVER), 5555, 80,
                        snat(pmin=3000, pmax=3999), (1024, 65535)) is None


def test_huge_address_range_still_reaches_ephemeral_ports():
    """With a /16 range whose original ports are all taken, SNAT still finds an ephemeral port."""
    nat = snat("203.0.0.0", "203.0.255.255")

    class AllOriginalPortsTaken:
        def __contains__(self, key: bytes) -> bool:
            return key.endswith((5555).to_bytes(2, "big"))

    k, info = select_reply(AllOriginalPortsTaken(), 0, 6, ip(CLIENT), ip(SERVER), 5555, 80, nat,
                           (1024, 65535))
    assert info.port != 5555 and 1024 <= info.port <= 65535
