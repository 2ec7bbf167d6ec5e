"""Kernel-free stand-ins for the slow path's collaborators, shared by the
forwarder and daemon unit tests.

Contract:
- ``FakePort`` / ``FakePortSet`` have the duck type ``Forwarder`` and
  ``Daemon`` use from ``ctxdp.datapath.ports``: ``name``, ``ifindex``,
  ``mac``, ``mtu``, ``send(frame) -> bool`` (frames are kept in ``sent``;
  ``fail_tx`` makes it fail), ``recv_burst(n)`` (delivers the frames
  appended to ``rx``), ``is_local_dst(addr)`` (one address set shared
  by the whole set, as the kernel's local table is namespace-wide), and
  ``by_ifindex`` / ``by_name`` / iteration / ``close``.
- ``FakeRouter`` answers ``lookup(family, dst)`` with the REAL ``Route``
  type by longest-prefix match over routes added with ``add``. ``replace``
  / ``remove`` change the table and, like the real router's revalidation,
  call every ``on_change`` callback with ``(family, dst, old, new)`` for each
  destination looked up before whose forwarding decision changed.
- ``FakeNeigh`` has ``lookup`` / ``resolve`` (recorded in ``resolves``) /
  ``on_change``; ``set(ifindex, addr, mac | None)`` changes an entry and
  reports ``(ifindex, addr, old, new)`` when the usable MAC changed.
- ``FakeLinks`` has ``on_change`` and ``fire(old, new)`` with the real
  ``LinkState`` type.
- ``FakeXdp`` is a ``DummyProvider`` (wrapped) named ``xdp`` with the XDP provider's
  extra read-outs the daemon uses: ``teardown_flagged()`` (``scans`` counts
  them), ``counters()``, ``flows()``, ``stat()`` and ``stats()`` in the XDP
  provider's key vocabulary, and its counter folding: ``fold_counters``
  (``folds`` records the ctx ids of each call) adds what ``set_counters``
  set since the previous fold to the conn, and ``conn_del`` /
  ``conn_policy`` / ``flush`` fold before they act, as the real one does.
- ``FakeClock`` is a settable monotonic clock (``clock()``, ``advance``).
- Frame builders return ``bytearray`` Ethernet frames built by scapy, with the
  MACs of the fixed test topology below; ``TcpFlow`` plays both ends of a TCP
  connection through the router, keeping sequence numbers.
- Callbacks are not wrapped: an exception in the code under test reaches the
  test instead of being logged away.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from ctxdp.datapath.netlink import LinkState
from ctxdp.datapath.routing import RTN_UNICAST, Route
from ctxdp.providers.base import OffloadCtx
from ctxdp.providers.dummy import DummyProvider

__all__ = [
    "CLIENT_MAC",
    "GW_MAC",
    "LAN_MAC",
    "WAN_MAC",
    "FakeClock",
    "FakeFlowRow",
    "FakeFlowVal",
    "FakeLinks",
    "FakeNeigh",
    "FakePort",
    "FakePortSet",
    "FakeRouter",
    "FakeXdp",
    "TcpFlow",
    "a",
    "frame",
    "from_lan",
    "from_wan",
    "mac",
    "topology",
    "udp",
]


def a(s: str) -> bytes:
    """Text address -> network-order bytes."""
    return ipaddress.ip_address(s).packed


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


# -- the test topology ----------------------------------------------------------------
#
#   client 10.0.1.5 / fd00:1::5           gateway 192.0.2.254 / 2001:db8::fe
#        |  (CLIENT_MAC)                        |  (GW_MAC)
#   lan0 ifindex 2, 10.0.1.1, fd00:1::1    wan0 ifindex 3, 192.0.2.1, 2001:db8::1
#                         \__ router __/
#   servers beyond the gateway: 203.0.113.7, 2001:db8:1::7 (default routes).

LAN_MAC = mac("02:00:00:00:01:01")
WAN_MAC = mac("02:00:00:00:02:01")
CLIENT_MAC = mac("02:aa:00:00:00:05")
GW_MAC = mac("02:bb:00:00:00:fe")
LAN_IF, WAN_IF = 2, 3


class FakePort:
    """A router port that records what it transmits."""

    def __init__(self, name: str, ifindex: int, mac_: bytes, mtu: int = 1500,
                 local: set[bytes] | None = None) -> None:
        self.name = name
        self.ifindex = ifindex
        self.mac = mac_
        self.mtu = mtu
        self.local = local if local is not None else set()
        self.sent: list[bytes] = []
        self.rx: list[bytearray] = []
        self.fail_tx = False

    def recv_burst(self, max_n: int = 64) -> list[bytearray]:
        """Up to ``max_n`` of the frames queued in ``rx`` (the daemon's receive path)."""
        out, self.rx = self.rx[:max_n], self.rx[max_n:]
        return out

    def send(self, frame_: bytes | bytearray | memoryview) -> bool:
        if self.fail_tx:
            return False
        self.sent.append(bytes(frame_))
        return True

    def is_local_dst(self, addr: bytes) -> bool:
        return bytes(addr) in self.local

    def take(self) -> list[bytes]:
        """The frames sent since the last ``take``."""
        out, self.sent = self.sent, []
        return out

    def __repr__(self) -> str:
        return f"FakePort({self.name!r}, {self.ifindex})"


class FakePortSet:
    def __init__(self, ports: Iterable[FakePort]) -> None:
        self._ports = {p.ifindex: p for p in ports}
        self.closed = False

    def by_ifindex(self, ifindex: int) -> FakePort | None:
        return self._ports.get(ifindex)

    def by_name(self, name: str) -> FakePort | None:
        return next((p for p in self._ports.values() if p.name == name), None)

    def __iter__(self) -> Iterator[FakePort]:
        return iter(list(self._ports.values()))

    def __len__(self) -> int:
        return len(self._ports)

    def __contains__(self, ifindex: object) -> bool:
        return ifindex in self._ports

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class _RouteSpec:
    family: int
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    oif: int
    gateway: bytes | None
    prefsrc: bytes | None
    mtu: int | None
    rtype: int


class FakeRouter:
    """Longest-prefix match over a route list; see the module contract."""

    def __init__(self) -> None:
        self._routes: list[_RouteSpec] = []
        self._callbacks: list[Callable[[int, bytes, Route | None, Route | None], None]] = []
        self._seen: dict[tuple[int, bytes], Route | None] = {}
        self.lookups = 0

    def _spec(self, prefix: str, oif: int, via: str | None, src: str | None, mtu: int | None,
              rtype: int) -> _RouteSpec:
        net = ipaddress.ip_network(prefix)
        return _RouteSpec(net.version, net, oif, a(via) if via else None, a(src) if src else None,
                          mtu, rtype)

    def add(self, prefix: str, oif: int, *, via: str | None = None, src: str | None = None,
            mtu: int | None = None, rtype: int = RTN_UNICAST) -> None:
        self._routes.append(self._spec(prefix, oif, via, src, mtu, rtype))
        self._revalidate()

    def replace(self, prefix: str, oif: int, **kw: Any) -> None:
        self._drop(prefix)
        self.add(prefix, oif, **kw)

    def remove(self, prefix: str) -> None:
        self._drop(prefix)
        self._revalidate()

    def _drop(self, prefix: str) -> None:
        net = ipaddress.ip_network(prefix)
        self._routes = [r for r in self._routes if r.net != net]

    def _compute(self, family: int, dst: bytes) -> Route | None:
        addr = ipaddress.ip_address(bytes(dst))
        best = None
        for r in self._routes:
            if r.family == family and addr in r.net:
                if best is None or r.net.prefixlen > best.net.prefixlen:
                    best = r
        if best is None:
            return None
        return Route(family, bytes(dst), best.oif, best.gateway, best.prefsrc, best.mtu,
                     best.rtype)

    def lookup(self, family: int, dst: bytes, *, iif: int | None = None) -> Route | None:
        self.lookups += 1
        r = self._compute(family, dst)
        self._seen[(family, bytes(dst))] = r
        return r

    def on_change(self, fn: Callable[[int, bytes, Route | None, Route | None], None]) -> None:
        self._callbacks.append(fn)

    def _revalidate(self) -> None:
        for (family, dst), old in list(self._seen.items()):
            new = self._compute(family, dst)
            self._seen[(family, dst)] = new
            same = (old is None and new is None) or (old is not None and old.same_forwarding(new))
            if not same:
                for fn in self._callbacks:
                    fn(family, dst, old, new)


class FakeNeigh:
    """Neighbour table: (ifindex, addr) -> MAC; see the module contract."""

    def __init__(self) -> None:
        self.table: dict[tuple[int, bytes], bytes] = {}
        self.resolves: list[tuple[int, int, bytes]] = []
        self._callbacks: list[Callable[[int, bytes, bytes | None, bytes | None], None]] = []

    def lookup(self, ifindex: int, addr: bytes) -> bytes | None:
        return self.table.get((ifindex, bytes(addr)))

    def resolve(self, ifindex: int, family: int, addr: bytes, now: float | None = None) -> bool:
        self.resolves.append((ifindex, family, bytes(addr)))
        return True

    def on_change(self, fn: Callable[[int, bytes, bytes | None, bytes | None], None]) -> None:
        self._callbacks.append(fn)

    def set(self, ifindex: int, addr: bytes, mac_: bytes | None) -> None:
        key = (ifindex, bytes(addr))
        old = self.table.get(key)
        if mac_ is None:
            self.table.pop(key, None)
        else:
            self.table[key] = mac_
        if old != mac_:
            for fn in self._callbacks:
                fn(ifindex, bytes(addr), old, mac_)


class FakeLinks:
    def __init__(self) -> None:
        self._callbacks: list[Callable[[LinkState | None, LinkState | None], None]] = []

    def on_change(self, fn: Callable[[LinkState | None, LinkState | None], None]) -> None:
        self._callbacks.append(fn)

    def fire(self, old: LinkState | None, new: LinkState | None) -> None:
        for fn in self._callbacks:
            fn(old, new)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


@dataclass
class FakeFlowVal:
    """The fields of the XDP provider's decoded flow value that the daemon reads."""

    out_ifindex: int
    flags: int
    packets: int
    bytes: int
    last_used: int  # ns, CLOCK_MONOTONIC; 0 = never


@dataclass
class FakeFlowRow:
    ifindex: int
    match: Any
    val: FakeFlowVal
    ctx: OffloadCtx | None
    dir: int


class FakeXdp:
    """A dummy provider named ``xdp`` that also answers the XDP provider's read-outs.

    It wraps rather than subclasses ``DummyProvider``, whose ``counters``
    attribute (fault counts) would hide the XDP provider's ``counters()``;
    every provider hook and dummy helper is forwarded to ``dummy``.
    """

    name = "xdp"

    def __init__(self, **kw: Any) -> None:
        self.dummy = DummyProvider("xdp", **kw)
        self.flagged: list[OffloadCtx] = []
        self.fast: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.prog_stats: dict[str, int] = {"hit": 0, "miss": 0, "punt_fin_rst": 0,
                                           "punt_ttl": 0, "redirect_err": 0}
        self.capacity_conns = 1024
        self.folded: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.folds: list[set[int]] = []
        self.scans = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.dummy, attr)

    def fold_counters(self, ctxs: Iterable[OffloadCtx] | None = None) -> int:
        ctxs = list(self.held.values()) if ctxs is None else [c for c in ctxs if self.holds(c)]
        self.folds.append({id(c) for c in ctxs})
        for ctx in ctxs:
            pk, by = self.fast.get(id(ctx), ((0, 0), (0, 0)))
            opk, oby = self.folded.get(id(ctx), ((0, 0), (0, 0)))
            for i in (0, 1):
                if pk[i] >= opk[i] and by[i] >= oby[i]:
                    ctx.conn.pkts[i] += pk[i] - opk[i]
                    ctx.conn.bytes[i] += by[i] - oby[i]
                else:  # the entry was rewritten: its counters restarted
                    ctx.conn.pkts[i] += pk[i]
                    ctx.conn.bytes[i] += by[i]
            self.folded[id(ctx)] = (pk, by)
        return len(ctxs)

    def conn_del(self, ctx: OffloadCtx) -> int:
        if self.holds(ctx):
            self.fold_counters([ctx])
        err = self.dummy.conn_del(ctx)
        if not err:
            self.fast.pop(id(ctx), None)
            self.folded.pop(id(ctx), None)
        return err

    def conn_policy(self, ctx: OffloadCtx) -> int:
        """A rewrite restarts the entry's counters (as the XDP value write does)."""
        if self.holds(ctx):
            self.fold_counters([ctx])
        err = self.dummy.conn_policy(ctx)
        if not err:
            self.fast[id(ctx)] = self.folded[id(ctx)] = ((0, 0), (0, 0))
        return err

    def flush(self) -> int:
        self.fold_counters(None)
        self.fast.clear()
        self.folded.clear()
        return self.dummy.flush()

    def teardown_flagged(self) -> list[OffloadCtx]:
        self.scans += 1
        out, self.flagged = self.flagged, []
        return [c for c in out if self.holds(c)]

    def set_counters(self, ctx: OffloadCtx, pkts: tuple[int, int], nbytes: tuple[int, int]) -> None:
        """Cumulative fast-path counters of a held connection, as the maps hold them."""
        self.fast[id(ctx)] = (pkts, nbytes)

    def counters(self) -> list[tuple[OffloadCtx, tuple[int, int], tuple[int, int]]]:
        out = []
        for ctx in self.held.values():
            pk, by = self.fast.get(id(ctx), ((0, 0), (0, 0)))
            out.append((ctx, pk, by))
        return out

    def flows(self) -> list[FakeFlowRow]:
        rows = []
        for ctx in self.held.values():
            pk, by = self.fast.get(id(ctx), ((0, 0), (0, 0)))
            flags = (1 if ctx.snat else 0) | (2 if ctx.dnat else 0)
            for i, d in enumerate(ctx.dirs):
                if d is None:
                    continue
                rows.append(FakeFlowRow(d.in_ifindex, d.match,
                                        FakeFlowVal(d.out_ifindex, flags, pk[i], by[i], 0),
                                        ctx, i))
        return rows

    def stat(self, name: str) -> int:
        return self.prog_stats[name]

    def stats(self) -> dict[str, int]:
        out = dict(self.prog_stats)
        out.update(conns=len(self.held), entries=2 * len(self.held),
                   capacity_conns=self.capacity_conns, index_bytes=4096)
        return out


def topology(*, lan_mtu: int = 1500, wan_mtu: int = 1500) -> tuple[FakePortSet, FakeRouter,
                                                                    FakeNeigh]:
    """Ports, routes and resolved neighbours of the diagram above."""
    local = {a("10.0.1.1"), a("192.0.2.1"), a("fd00:1::1"), a("2001:db8::1")}
    lan = FakePort("lan0", LAN_IF, LAN_MAC, lan_mtu, local)
    wan = FakePort("wan0", WAN_IF, WAN_MAC, wan_mtu, local)
    ports = FakePortSet([lan, wan])
    r = FakeRouter()
    r.add("10.0.1.0/24", LAN_IF, src="10.0.1.1")
    r.add("192.0.2.0/24", WAN_IF, src="192.0.2.1")
    r.add("0.0.0.0/0", WAN_IF, via="192.0.2.254", src="192.0.2.1")
    r.add("fd00:1::/64", LAN_IF, src="fd00:1::1")
    r.add("2001:db8::/64", WAN_IF, src="2001:db8::1")
    r.add("::/0", WAN_IF, via="2001:db8::fe", src="2001:db8::1")
    n = FakeNeigh()
    n.table[(LAN_IF, a("10.0.1.5"))] = CLIENT_MAC
    n.table[(LAN_IF, a("fd00:1::5"))] = CLIENT_MAC
    n.table[(WAN_IF, a("192.0.2.254"))] = GW_MAC
    n.table[(WAN_IF, a("2001:db8::fe"))] = GW_MAC
    return ports, r, n


# -- frames ---------------------------------------------------------------------------


def _l3(src: str, dst: str, **kw: Any) -> ScapyPacket:
    return IPv6(src=src, dst=dst, **kw) if ":" in src else IP(src=src, dst=dst, **kw)


def frame(l3: ScapyPacket, src_mac: bytes, dst_mac: bytes) -> bytearray:
    et = 0x86DD if isinstance(l3, IPv6) else 0x0800
    return bytearray(bytes(Ether(src=src_mac.hex(":"), dst=dst_mac.hex(":"), type=et) / l3))


def from_lan(l3: ScapyPacket) -> bytearray:
    """``l3`` as the client puts it on the wire to the router's LAN port."""
    return frame(l3, CLIENT_MAC, LAN_MAC)


def from_wan(l3: ScapyPacket) -> bytearray:
    """``l3`` as the upstream gateway puts it on the wire to the router's WAN port."""
    return frame(l3, GW_MAC, WAN_MAC)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x", **ip_kw: Any):
    """A scapy UDP datagram (IP layer down), to wrap with ``from_lan``/``from_wan``."""
    return _l3(src, dst, **ip_kw) / UDP(sport=sport, dport=dport) / Raw(payload)


class TcpFlow:
    """Both ends of a TCP connection through the router, with sequence numbers.

    Side ``"a"`` (the client, on ``a_wrap``'s port) sends from ``a`` to
    ``a_to``; side ``"b"`` (the server) sends from ``b`` to ``b_to``. With NAT
    the two views differ (``b_to`` is what the server sees of the client).
    Endpoints are ``(address, port)``.
    """

    def __init__(self, a_: tuple[str, int], a_to: tuple[str, int], b: tuple[str, int],
                 b_to: tuple[str, int] | None = None, *,
                 a_wrap: Callable[[ScapyPacket], bytearray] = from_lan,
                 b_wrap: Callable[[ScapyPacket], bytearray] = from_wan,
                 isn_a: int = 1000, isn_b: int = 9000, ttl: int = 64) -> None:
        self.ends = {"a": (a_, a_to), "b": (b, b_to if b_to is not None else a_)}
        self.wrap = {"a": a_wrap, "b": b_wrap}
        self.nxt = {"a": isn_a, "b": isn_b}
        self.ttl = ttl

    def send(self, side: str, flags: str, n: int = 0, **ip_kw: Any) -> bytearray:
        other = "b" if side == "a" else "a"
        (src, sport), (dst, dport) = self.ends[side]
        ack = self.nxt[other] if "A" in flags else 0
        kw = {"ttl" if ":" not in src else "hlim": self.ttl, **ip_kw}
        p = _l3(src, dst, **kw) / TCP(sport=sport, dport=dport, flags=flags,
                                      seq=self.nxt[side], ack=ack, window=64000)
        if n:
            p = p / Raw(b"d" * n)
        self.nxt[side] += n + ("S" in flags) + ("F" in flags)
        return self.wrap[side](p)
