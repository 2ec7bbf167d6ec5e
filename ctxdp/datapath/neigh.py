"""Next-hop MAC addresses for the slow path: a cache of the kernel
neighbour table, kept current by netlink, with mlx5-style change callbacks.

Contract:
- ``NeighTable(nl)`` dumps the kernel table when constructed and then
  follows RTM_NEWNEIGH/RTM_DELNEIGH events (IPv4 ARP and IPv6 ND entries;
  bridge FDB and proxy entries are ignored).
- ``lookup(ifindex, addr)`` returns the MAC only for a *valid* entry:
  REACHABLE, STALE, DELAY, PROBE, PERMANENT or NOARP with a link-layer
  address. STALE is usable, as in the kernel: it will re-confirm the
  neighbour the next time it sends there itself.
- ``resolve(ifindex, family, addr)`` asks the kernel to resolve an
  unresolved next hop and returns True if a request was sent. It does
  nothing for an entry that is already valid and at most once per
  ``resolve_interval`` seconds per (ifindex, addr).
- ``on_change(fn)`` calls ``fn(ifindex, addr, old_mac, new_mac)`` whenever
  the *usable* MAC of a neighbour changes: ``None -> mac`` (became valid:
  install pending offloads), ``mac -> other`` (rewrite entries),
  ``mac -> None`` (FAILED, INCOMPLETE or deleted: withdraw entries).
  Transitions that keep the same usable MAC (REACHABLE <-> STALE ...) are
  not reported.

How resolution is triggered: an RTM_NEWNEIGH request with the ``NTF_USE``
flag for (ifindex, addr). The kernel's ``neigh_add`` then calls
``neigh_event_send()`` on the entry (creating it if needed), which is
exactly what an outgoing packet would do: the entry goes INCOMPLETE, the
kernel sends ARP requests / ND neighbour solicitations with its own retry
and FAILED logic, and the answer arrives to us as an RTM_NEWNEIGH event.
It needs no IP forwarding, sends no data packet, has no source-address or
route dependency (unlike sending a dummy UDP datagram to the next hop), and
works the same for IPv4 and IPv6. One hazard: NTF_USE on a PERMANENT entry
demotes it to a dynamic one that then fails, so ``resolve`` first asks the
kernel for the entry (RTM_GETNEIGH) and never touches a valid one.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import (
    NTF_PROXY,
    NTF_USE,
    NUD_DELAY,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_NONE,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
)

from ctxdp.datapath.netlink import (
    RTM_DELNEIGH,
    RTM_NEWNEIGH,
    Netlink,
    addr_from_str,
    mac_from_str,
)

__all__ = [
    "NUD_FAILED",
    "NUD_INCOMPLETE",
    "NUD_PERMANENT",
    "NUD_REACHABLE",
    "NUD_STALE",
    "NUD_VALID",
    "NeighTable",
    "Neighbour",
]

log = logging.getLogger(__name__)

NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_ZERO_MAC = bytes(6)


@dataclass(frozen=True, slots=True)
class Neighbour:
    ifindex: int
    addr: bytes  # network order, 4 or 16 bytes
    mac: bytes | None
    state: int  # NUD_* bit

    @property
    def usable_mac(self) -> bytes | None:
        """The MAC to put in frames, or None while the entry is not valid."""
        if self.state & NUD_VALID and self.mac is not None and self.mac != _ZERO_MAC:
            return self.mac
        return None


NeighCallback = Callable[[int, bytes, bytes | None, bytes | None], None]


def _neigh_from_msg(msg: Any) -> Neighbour | None:
    if msg["family"] not in (socket.AF_INET, socket.AF_INET6) or msg["flags"] & NTF_PROXY:
        return None
    addr = addr_from_str(msg.get_attr("NDA_DST"))
    if addr is None:
        return None
    return Neighbour(
        ifindex=msg["ifindex"],
        addr=addr,
        mac=mac_from_str(msg.get_attr("NDA_LLADDR")),
        state=msg["state"],
    )


class NeighTable:
    """Kernel neighbour table cache with resolution and change callbacks."""

    def __init__(
        self,
        nl: Netlink,
        *,
        resolve_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nl = nl
        self._entries: dict[tuple[int, bytes], Neighbour] = {}
        self._callbacks: list[NeighCallback] = []
        self._last_request: dict[tuple[int, bytes], float] = {}
        self.resolve_interval = resolve_interval
        self._clock = clock
        self.stats = {
            "events": 0,
            "changes": 0,
            "resolve_requests": 0,
            "resolve_limited": 0,
            "resolve_already_valid": 0,
            "resolve_errors": 0,
        }
        nl.subscribe(RTM_NEWNEIGH, self._on_new)
        nl.subscribe(RTM_DELNEIGH, self._on_del)
        nl.on_resync(self.resync)
        self.resync()

    # -- queries -------------------------------------------------------------
    def lookup(self, ifindex: int, addr: bytes) -> bytes | None:
        entry = self._entries.get((ifindex, bytes(addr)))
        return entry.usable_mac if entry is not None else None

    def get(self, ifindex: int, addr: bytes) -> Neighbour | None:
        return self._entries.get((ifindex, bytes(addr)))

    def __len__(self) -> int:
        return len(self._entries)

    def on_change(self, fn: NeighCallback) -> None:
        self._callbacks.append(fn)

    # -- resolution ----------------------------------------------------------
    def resolve(self, ifindex: int, family: int, addr: bytes, now: float | None = None) -> bool:
        """Ask the kernel to resolve ``addr`` on ``ifindex``; True if asked."""
        key = (ifindex, bytes(addr))
        if self.lookup(*key) is not None:
            self.stats["resolve_already_valid"] += 1
            return False
        now = self._clock() if now is None else now
        last = self._last_request.get(key)
        if last is not None and now - last < self.resolve_interval:
            self.stats["resolve_limited"] += 1
            return False
        self._last_request[key] = now
        if len(self._last_request) > 4096:
            horizon = now - self.resolve_interval
            self._last_request = {k: t for k, t in self._last_request.items() if t >= horizon}
        af = _AF.get(family)
        if af is None:
            self.stats["resolve_errors"] += 1
            return False
        dst = socket.inet_ntop(af, key[1])
        ipr = self._nl.ipr
        # Guard against demoting a valid (e.g. PERMANENT) entry our cache has
        # not heard of yet: ask the kernel first.
        try:
            for msg in ipr.neigh("get", dst=dst, ifindex=ifindex, family=af):
                entry = _neigh_from_msg(msg)
                if entry is not None and entry.usable_mac is not None:
                    self._apply(entry)
                    self.stats["resolve_already_valid"] += 1
                    return False
        except NetlinkError:
            pass  # ENOENT: no entry yet, the normal case
        try:
            ipr.neigh("replace", dst=dst, ifindex=ifindex, family=af,
                      flags=NTF_USE, state=NUD_NONE)
        except (NetlinkError, OSError) as exc:
            self.stats["resolve_errors"] += 1
            log.warning("neighbour resolve %s on ifindex %d failed: %s", dst, ifindex, exc)
            return False
        self.stats["resolve_requests"] += 1
        return True

    # -- event side ----------------------------------------------------------
    def resync(self) -> None:
        fresh: dict[tuple[int, bytes], Neighbour] = {}
        for msg in self._nl.ipr.neigh("dump"):
            entry = _neigh_from_msg(msg)
            if entry is not None:
                fresh[(entry.ifindex, entry.addr)] = entry
        old_entries = self._entries
        self._entries = fresh
        for key in old_entries.keys() | fresh.keys():
            old = old_entries.get(key)
            new = fresh.get(key)
            self._report(key, old.usable_mac if old else None, new.usable_mac if new else None)

    def _on_new(self, msg: Any) -> None:
        self.stats["events"] += 1
        entry = _neigh_from_msg(msg)
        if entry is not None:
            self._apply(entry)

    def _on_del(self, msg: Any) -> None:
        self.stats["events"] += 1
        entry = _neigh_from_msg(msg)
        if entry is None:
            return
        key = (entry.ifindex, entry.addr)
        old = self._entries.pop(key, None)
        if old is not None:
            self._report(key, old.usable_mac, None)

    def _apply(self, entry: Neighbour) -> None:
        key = (entry.ifindex, entry.addr)
        old = self._entries.get(key)
        self._entries[key] = entry
        self._report(key, old.usable_mac if old else None, entry.usable_mac)

    def _report(self, key: tuple[int, bytes], old: bytes | None, new: bytes | None) -> None:
        if old == new:
            return
        self.stats["changes"] += 1
        if new is not None:
            self._last_request.pop(key, None)
        for fn in self._callbacks:
            try:
                fn(key[0], key[1], old, new)
            except Exception:  # noqa: BLE001
                log.exception("neighbour callback %r failed", fn)
