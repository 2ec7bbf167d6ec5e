"""rtnetlink plumbing for the single-threaded daemon: one event socket, one
request socket, and the two small caches every datapath part needs (links and
local addresses).

Contract:
- ``Netlink`` owns a raw ``NETLINK_ROUTE`` socket bound to the multicast
  groups the slow path cares about (links, addresses, routes, rules,
  neighbours). The daemon registers ``fileno()`` in its selector and calls
  ``handle_events()`` when it is readable; that call never blocks, drains at
  most ``budget`` datagrams, dispatches each decoded message to the handlers
  subscribed to its type, then runs the ``on_drained`` hooks once (so bursts
  of route events coalesce into one cache revalidation).
- If the kernel drops events because our receive buffer overflowed
  (``ENOBUFS``), every ``on_resync`` hook runs: caches re-dump the kernel
  state instead of trusting a stream with holes in it.
- ``Netlink.ipr`` is a pyroute2 ``IPRoute`` used for requests (dumps,
  ``route get``, neighbour requests). It is bound to no multicast group so
  it never queues events nobody reads.
- A handler that raises is logged and counted; it never breaks the loop.
- ``LinkWatcher`` and ``LocalAddrs`` are caches kept current from that
  stream; create the ``Netlink`` first, then the caches (each dumps the
  kernel state when constructed), then run the loop.

Why a raw socket and not ``IPRoute().bind()`` for events: pyroute2 0.9 runs
its own asyncio reader that may pull several datagrams off the socket into a
private queue. A selector would then see an idle fd while events sit unread in
userspace, and ``get()`` blocks when nothing is queued. Reading the socket
ourselves keeps "fd readable" and "events pending" the same thing; pyroute2's
``MarshalRtnl`` still does the message decoding.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

__all__ = [
    "DEFAULT_GROUPS",
    "RTM_DELADDR",
    "RTM_DELLINK",
    "RTM_DELNEIGH",
    "RTM_DELROUTE",
    "RTM_DELRULE",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWNEIGH",
    "RTM_NEWROUTE",
    "RTM_NEWRULE",
    "LinkState",
    "LinkWatcher",
    "LocalAddrs",
    "Netlink",
    "family_of",
    "mac_from_str",
    "addr_from_str",
]

log = logging.getLogger(__name__)

DEFAULT_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_NEIGH
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
    | RTMGRP_IPV4_RULE
    | RTMGRP_IPV6_RULE
)

_SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max (not exported by socket)
_IFF_UP = 0x1
_IFF_RUNNING = 0x40

Handler = Callable[[Any], None]
Hook = Callable[[], None]


def mac_from_str(text: str | None) -> bytes | None:
    """'aa:bb:cc:dd:ee:ff' (pyroute2's rendering) -> 6 bytes; None stays None."""
    if not text:
        return None
    try:
        return bytes.fromhex(text.replace(":", ""))
    except ValueError:
        return None


def addr_from_str(text: str | None) -> bytes | None:
    """Textual IPv4/IPv6 address -> network-order bytes, None if unparsable."""
    if not text:
        return None
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def family_of(addr: bytes) -> int:
    """ctxdp family (4 or 6) of a network-order address."""
    return 4 if len(addr) == 4 else 6


def _open_event_socket(groups: int, rcvbuf: int) -> socket.socket:
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    try:
        # A big buffer makes ENOBUFS (lost events -> full resync) rare even
        # when a route table is reloaded at once.
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


class Netlink:
    """Event socket + request socket for one network namespace.

    Open it inside the namespace the ports live in: both sockets stay bound
    to the namespace that was current when they were created.
    """

    def __init__(self, groups: int = DEFAULT_GROUPS, rcvbuf: int = 8 << 20) -> None:
        self.groups = groups
        self._sock = _open_event_socket(groups, rcvbuf)
        try:
            self.ipr = IPRoute(groups=0)
        except BaseException:
            self._sock.close()
            raise
        self._marshal = MarshalRtnl()
        self._subs: dict[int, list[Handler]] = {}
        self._resync: list[Hook] = []
        self._drained: list[Hook] = []
        self.stats = {
            "datagrams": 0,
            "events": 0,
            "overruns": 0,
            "decode_errors": 0,
            "handler_errors": 0,
            "resyncs": 0,
        }

    # -- registration --------------------------------------------------
    def fileno(self) -> int:
        return self._sock.fileno()

    def subscribe(self, msg_type: int, fn: Handler) -> None:
        """Call ``fn(msg)`` for every event of ``msg_type`` (RTM_* constant)."""
        self._subs.setdefault(msg_type, []).append(fn)

    def on_resync(self, fn: Hook) -> None:
        """Call ``fn()`` when events were lost and the state must be re-dumped."""
        self._resync.append(fn)

    def on_drained(self, fn: Hook) -> None:
        """Call ``fn()`` once at the end of every ``handle_events`` that saw events."""
        self._drained.append(fn)

    # -- the loop side -------------------------------------------------
    def handle_events(self, budget: int = 256) -> int:
        """Drain up to ``budget`` datagrams without blocking; return events seen."""
        seen = 0
        lost = False
        for _ in range(budget):
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped events for us; keep reading what is
                    # left, then rebuild the caches from a dump.
                    self.stats["overruns"] += 1
                    lost = True
                    continue
                log.warning("netlink event socket error: %s", exc)
                break
            self.stats["datagrams"] += 1
            seen += self._dispatch(data)
        if lost:
            self.resync()
        if seen or lost:
            self._run_hooks(self._drained)
        return seen

    def _dispatch(self, data: bytes) -> int:
        try:
            msgs = list(self._marshal.parse(data))
        except Exception:  # noqa: BLE001 - a bad datagram must not stop the loop
            self.stats["decode_errors"] += 1
            log.exception("undecodable netlink datagram")
            return 0
        for msg in msgs:
            self.stats["events"] += 1
            handlers = self._subs.get(msg["header"]["type"])
            if not handlers:
                continue
            for fn in handlers:
                try:
                    fn(msg)
                except Exception:  # noqa: BLE001
                    self.stats["handler_errors"] += 1
                    log.exception("netlink handler %r failed", fn)
        return len(msgs)

    def _run_hooks(self, hooks: list[Hook]) -> None:
        for fn in hooks:
            try:
                fn()
            except Exception:  # noqa: BLE001
                self.stats["handler_errors"] += 1
                log.exception("netlink hook %r failed", fn)

    def resync(self) -> None:
        """Re-dump every cache (called after an overrun; callable by hand)."""
        self.stats["resyncs"] += 1
        self._run_hooks(self._resync)

    def close(self) -> None:
        self._sock.close()
        self.ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class LinkState:
    """What the datapath needs to know about one interface."""

    ifindex: int
    name: str
    mac: bytes | None
    mtu: int
    admin_up: bool  # IFF_UP
    running: bool  # IFF_RUNNING: carrier/oper up (a veth whose peer is down is not)

    @property
    def usable(self) -> bool:
        """Frames sent here can reach the wire."""
        return self.admin_up and self.running


def _link_from_msg(msg: Any) -> LinkState:
    flags = msg["flags"]
    return LinkState(
        ifindex=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        mac=mac_from_str(msg.get_attr("IFLA_ADDRESS")),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        admin_up=bool(flags & _IFF_UP),
        running=bool(flags & _IFF_RUNNING),
    )


LinkCallback = Callable[[LinkState | None, LinkState | None], None]


class LinkWatcher:
    """Cache of the namespace's links with change callbacks.

    ``on_change(fn)`` calls ``fn(old, new)``: ``old`` is None for a new link,
    ``new`` is None for a removed one (RTM_DELLINK); otherwise some of name,
    MAC, MTU, admin or oper state changed. The daemon withdraws a port's
    offloaded entries when ``new is None or not new.usable``, and rewrites
    them when the MAC or MTU moved.
    """

    def __init__(self, nl: Netlink) -> None:
        self._nl = nl
        self._links: dict[int, LinkState] = {}
        self._callbacks: list[LinkCallback] = []
        nl.subscribe(RTM_NEWLINK, self._on_new)
        nl.subscribe(RTM_DELLINK, self._on_del)
        nl.on_resync(self.resync)
        self.resync()

    def on_change(self, fn: LinkCallback) -> None:
        self._callbacks.append(fn)

    def get(self, ifindex: int) -> LinkState | None:
        return self._links.get(ifindex)

    def by_name(self, name: str) -> LinkState | None:
        for link in self._links.values():
            if link.name == name:
                return link
        return None

    def __iter__(self):
        return iter(list(self._links.values()))

    def resync(self) -> None:
        fresh = {}
        for msg in self._nl.ipr.link("dump"):
            link = _link_from_msg(msg)
            fresh[link.ifindex] = link
        old_links = self._links
        self._links = fresh
        for ifindex in old_links.keys() - fresh.keys():
            self._fire(old_links[ifindex], None)
        for ifindex, link in fresh.items():
            old = old_links.get(ifindex)
            if old != link:
                self._fire(old, link)

    def _on_new(self, msg: Any) -> None:
        link = _link_from_msg(msg)
        old = self._links.get(link.ifindex)
        self._links[link.ifindex] = link
        if old != link:
            self._fire(old, link)

    def _on_del(self, msg: Any) -> None:
        old = self._links.pop(msg["index"], None)
        if old is not None:
            self._fire(old, None)

    def _fire(self, old: LinkState | None, new: LinkState | None) -> None:
        for fn in self._callbacks:
            try:
                fn(old, new)
            except Exception:  # noqa: BLE001
                log.exception("link callback %r failed", fn)


_V4_LIMITED_BCAST = b"\xff\xff\xff\xff"
_V4_ANY = b"\x00\x00\x00\x00"


class LocalAddrs:
    """The namespace's own addresses, kept current from RTM_NEWADDR/DELADDR.

    ``contains(addr)`` is exact membership (any interface: Linux is a weak
    host, a packet to any local address is delivered locally whatever port
    it came in on). ``is_local_dst(addr)`` answers the slow path's question
    "must the kernel, not the forwarder, handle a packet to addr?": our own
    and subnet-broadcast addresses (ping, BGP, SSH to the router), plus
    destinations a router never forwards (multicast, limited broadcast,
    loopback, unspecified, IPv6 link-local).
    """

    def __init__(self, nl: Netlink) -> None:
        self._nl = nl
        # One record per kernel address: (ifindex, address, prefixlen) ->
        # (address, broadcast addresses). IPv6 re-announces addresses with
        # RTM_NEWADDR on every lifetime update, so records, not counters.
        self._records: dict[tuple[int, bytes, int], tuple[bytes, tuple[bytes, ...]]] = {}
        self._own: frozenset[bytes] = frozenset()
        self._kernel: frozenset[bytes] = frozenset()
        nl.subscribe(RTM_NEWADDR, self._on_new)
        nl.subscribe(RTM_DELADDR, self._on_del)
        nl.on_resync(self.resync)
        self.resync()

    @staticmethod
    def _record(msg: Any) -> tuple[tuple[int, bytes, int], tuple[bytes, tuple[bytes, ...]]] | None:
        # IPv4: IFA_LOCAL is our address (IFA_ADDRESS is the peer on
        # point-to-point links); IPv6 only has IFA_ADDRESS.
        local = addr_from_str(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
        if local is None:
            return None
        plen = msg["prefixlen"]
        bcasts = []
        bcast = addr_from_str(msg.get_attr("IFA_BROADCAST"))
        if bcast:
            bcasts.append(bcast)
        if len(local) == 4 and plen < 31:
            # The kernel installs a broadcast route for the subnet's
            # all-ones address whether or not IFA_BROADCAST was given
            # (``ip addr add`` sets none unless told ``brd +``).
            host_bits = (1 << (32 - plen)) - 1
            bcasts.append((int.from_bytes(local, "big") | host_bits).to_bytes(4, "big"))
        return (msg["index"], local, plen), (local, tuple(bcasts))

    def _rebuild(self) -> None:
        own = {local for local, _ in self._records.values()}
        self._own = frozenset(own)
        self._kernel = frozenset(own.union(*(b for _, b in self._records.values())))

    def resync(self) -> None:
        records = {}
        for msg in self._nl.ipr.addr("dump"):
            rec = self._record(msg)
            if rec is not None:
                records[rec[0]] = rec[1]
        self._records = records
        self._rebuild()

    def _on_new(self, msg: Any) -> None:
        rec = self._record(msg)
        if rec is not None and self._records.get(rec[0]) != rec[1]:
            self._records[rec[0]] = rec[1]
            self._rebuild()

    def _on_del(self, msg: Any) -> None:
        rec = self._record(msg)
        if rec is not None and self._records.pop(rec[0], None) is not None:
            self._rebuild()

    def contains(self, addr: bytes) -> bool:
        """``addr`` is one of the namespace's own addresses."""
        return addr in self._own

    def addresses(self) -> frozenset[bytes]:
        return self._own

    def is_local_dst(self, addr: bytes) -> bool:
        if addr in self._kernel:
            return True
        if len(addr) == 4:
            first = addr[0]
            return (
                addr == _V4_LIMITED_BCAST
                or addr == _V4_ANY
                or 224 <= first <= 239  # multicast
                or first == 127  # loopback
            )
        if len(addr) == 16:
            return (
                addr[0] == 0xFF  # multicast
                or (addr[0] == 0xFE and addr[1] & 0xC0 == 0x80)  # fe80::/10
                or addr == bytes(15) + b"\x01"  # ::1
                or addr == bytes(16)  # ::
            )
        return True  # not an IP address at all: not ours to forward
