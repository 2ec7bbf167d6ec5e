"""Ports on real veths: what reaches the slow path, what it sends, what it ignores."""

from __future__ import annotations

import ipaddress
import selectors
import socket
import subprocess
import time

import pytest

from ctxdp.datapath.netlink import LinkWatcher, LocalAddrs, Netlink
from ctxdp.datapath.ports import Port, PortSet
from tests.integration import topo as topo_mod

pytestmark = pytest.mark.privileged

topo = topo_mod.topology_fixture()

ETH_P_ALL = 0x0003
MARKER = b"ctxdp-port-test-"
FOREIGN_MAC = bytes.fromhex("020000009999")
BCAST_MAC = b"\xff" * 6


def _ip4(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp4_frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, payload: bytes) -> bytes:
    """A valid Ethernet/IPv4/UDP frame (UDP checksum 0 = none)."""
    udp = (12345).to_bytes(2, "big") + (9).to_bytes(2, "big")
    udp += (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    hdr = bytearray(
        b"\x45\x00" + (20 + len(udp)).to_bytes(2, "big") + b"\0\0\0\0\x40\x11\0\0"
        + _ip4(src) + _ip4(dst)
    )
    hdr[10:12] = _csum(bytes(hdr)).to_bytes(2, "big")
    return dst_mac + src_mac + b"\x08\x00" + bytes(hdr) + udp


def _raw_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    return s


def _send_frames(ifname: str, frames: list[bytes]) -> None:
    with _raw_socket(ifname) as s:
        for f in frames:
            s.send(f)


def _capture(ctl, ifname: str, marker: bytes, timeout: float) -> list[bytes]:
    """Server side: frames containing ``marker`` received on ``ifname``."""
    got = []
    with _raw_socket(ifname) as s:
        s.settimeout(0.05)
        ctl.ready()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not got:
            try:
                data, addr = s.recvfrom(65536)
            except TimeoutError:
                continue
            if marker in data and addr[2] != socket.PACKET_OUTGOING:
                got.append(data)
    return got


def _router_forward(ctl, marker: bytes, dst_mac: bytes) -> dict:
    """Router side: receive on p0, forward the marker frame out of p1, and check
    that no outgoing frame on p1 (ours or another socket's) is received."""
    ports = PortSet(["p0", "p1"])
    p0, p1 = ports.by_name("p0"), ports.by_name("p1")
    # Control: a plain tap on p1 WITHOUT PACKET_IGNORE_OUTGOING sees our
    # own transmission, proving the Port would see it too without the option.
    tap = _raw_socket("p1")
    tap.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(p0.fileno(), selectors.EVENT_READ)
    ctl.ready()
    received: list[bytearray] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(marker in f for f in received):
        sel.select(0.1)
        received += p0.recv_burst()
    time.sleep(0.2)  # let the foreign/broadcast frames sent after it arrive
    received += p0.recv_burst()
    out = dict(
        received=[bytes(f) for f in received],
        p0=p0.stats(),
    )
    frame = next(f for f in received if marker in f)
    frame[0:6] = dst_mac  # rewrite in place: recv_burst hands out bytearrays
    frame[6:12] = p1.mac
    out["sent"] = p1.send(frame)
    # The kernel never loops a frame back to the socket that sent it, and
    # the MAC filter rejects frames to other hosts; a frame to p1's own MAC
    # sent by *another* socket gets past both, so only
    # PACKET_IGNORE_OUTGOING keeps it out of the slow path.
    selfie = bytearray(frame)
    selfie[0:6] = p1.mac
    with _raw_socket("p1") as other:
        other.send(selfie)
    time.sleep(0.3)
    echoed = [bytes(f) for f in p1.recv_burst() if marker in f and f[6:12] == p1.mac]
    tapped = []
    while True:
        try:
            data = tap.recv(65536)
        except BlockingIOError:
            break
        if marker in data and data[6:12] == p1.mac:
            tapped.append(data)
    out.update(echoed=echoed, tapped=tapped, p1=p1.stats(), p1_mac=p1.mac, p0_mac=p0.mac)
    ports.close()
    return out


def test_port_receives_forwards_and_ignores_its_own_sends(topo):
    """A frame to the router MAC reaches Port p0, frames for other MACs and broadcasts do
    not, send() on p1 reaches the server, and no outgoing frame comes back up on p1."""
    cport, sport = topo.port("client"), topo.port("server")
    marker = MARKER + topo.uid.encode()
    # Destination 10.0.2.99 exists nowhere: the server's kernel drops it
    # silently instead of answering with an ICMP error that quotes the marker.
    good = udp4_frame(cport.mac, cport.peer_mac, cport.peer_v4, "10.0.2.99", marker + b"good")
    foreign = udp4_frame(FOREIGN_MAC, cport.peer_mac, cport.peer_v4, "10.0.2.99", marker + b"frgn")
    bcast = udp4_frame(BCAST_MAC, cport.peer_mac, cport.peer_v4, "10.0.2.99", marker + b"bcst")

    server = topo.server.spawn(_capture, sport.peer_if, marker + b"good", 8.0)
    router = topo.router.spawn(_router_forward, marker, sport.peer_mac)
    server.wait_ready()
    router.wait_ready()
    topo.client.run(_send_frames, cport.peer_if, [good, foreign, bcast])
    res = router.result(timeout=20)
    captured = server.result(timeout=20)

    assert [f[len(f) - 4 :] for f in res["received"]] == [b"good"]
    assert res["p0"]["rx"] == 1
    assert res["sent"] is True and res["p1"]["tx"] == 1
    assert len(res["tapped"]) == 2, "control tap should see both outgoing frames"
    assert res["echoed"] == [], "an outgoing frame came back up through the Port"
    assert len(captured) == 1
    assert captured[0][0:6] == sport.peer_mac and captured[0][6:12] == sport.mac
    assert captured[0][14:] == good[14:]


def _send_errors() -> dict:
    """Router side: send() on a downed port and an oversize frame."""
    p1 = Port("p1")
    big = bytes(14 + p1.mtu + 100)
    ok_big = p1.send(big)
    subprocess.run(["ip", "link", "set", "p1", "down"], check=True)
    ok_down = p1.send(bytes(60))
    stats = p1.stats()
    p1.close()
    return dict(ok_big=ok_big, ok_down=ok_down, stats=stats)


def test_send_counts_errors_instead_of_raising(topo):
    """send() returns False and counts oversize frames and a downed link, never raises."""
    res = topo.router.run(_send_errors)
    assert res["ok_big"] is False and res["stats"]["tx_too_big"] == 1
    assert res["ok_down"] is False and res["stats"]["tx_errors"] == 1
    assert res["stats"]["tx"] == 0


def _local_dst() -> dict:
    nl = Netlink()
    port = Port("p0", local=LocalAddrs(nl))
    out = {
        "own": port.is_local_dst(_ip4("10.0.1.1")),
        "other_port": port.is_local_dst(_ip4("10.0.2.1")),
        "v6": port.is_local_dst(ipaddress.ip_address("fd00:1::1").packed),
        "bcast": port.is_local_dst(_ip4("10.0.1.255")),
        "mcast": port.is_local_dst(_ip4("224.0.0.5")),
        "transit": port.is_local_dst(_ip4("10.0.2.2")),
        "transit6": port.is_local_dst(ipaddress.ip_address("fd00:2::2").packed),
    }
    new = _ip4("10.0.1.100")
    subprocess.run(["ip", "addr", "add", "10.0.1.100/32", "dev", "p0"], check=True)
    out["added"] = topo_mod.pump(nl, lambda: port.is_local_dst(new))
    subprocess.run(["ip", "addr", "del", "10.0.1.100/32", "dev", "p0"], check=True)
    out["removed"] = topo_mod.pump(nl, lambda: not port.is_local_dst(new))
    port.close()
    nl.close()
    return out


def test_is_local_dst_tracks_router_addresses(topo):
    """Router addresses (any port), broadcast and multicast are the kernel's; transit
    destinations are not; an address added or removed later is seen via netlink."""
    res = topo.router.run(_local_dst)
    assert res["own"] and res["other_port"] and res["v6"] and res["bcast"] and res["mcast"]
    assert not res["transit"] and not res["transit6"]
    assert res["added"] and res["removed"]


def _mac_change(ctl, new_mac: str) -> dict:
    """Router side: change p0's MAC and MTU; the PortSet follows link events."""
    nl = Netlink()
    links = LinkWatcher(nl)
    ports = PortSet(["p0"])
    ports.watch(links)
    p0 = ports.by_name("p0")
    mac = bytes.fromhex(new_mac.replace(":", ""))
    subprocess.run(["ip", "link", "set", "p0", "address", new_mac, "mtu", "1400"], check=True)
    followed = topo_mod.pump(nl, lambda: p0.mac == mac and p0.mtu == 1400)
    ctl.ready()
    sel = selectors.DefaultSelector()
    sel.register(p0.fileno(), selectors.EVENT_READ)
    got: list[bytearray] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not got:
        sel.select(0.1)
        got += p0.recv_burst()
    ports.close()
    nl.close()
    return dict(followed=followed, got=[bytes(f) for f in got])


def test_port_follows_mac_and_mtu_changes(topo):
    """After p0's MAC and MTU change, the Port reports the new values and accepts
    frames sent to the new MAC."""
    cport = topo.port("client")
    new_mac = "02:00:00:00:07:07"
    router = topo.router.spawn(_mac_change, new_mac)
    router.wait_ready()
    frame = udp4_frame(bytes.fromhex(new_mac.replace(":", "")), cport.peer_mac,
                       cport.peer_v4, "10.0.2.99", MARKER + b"newmac")
    topo.client.run(_send_frames, cport.peer_if, [frame])
    res = router.result(timeout=20)
    assert res["followed"]
    assert [f[-6:] for f in res["got"]] == [b"newmac"]
