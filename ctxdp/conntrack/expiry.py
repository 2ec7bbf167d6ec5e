"""Lazy expiry buckets: O(due) sweeps and an O(1), usually free, per-packet path.

Contract:
- A connection is filed in the bucket ``ceil(expires / g)`` (``g`` = the
  granularity) and remembers it in ``conn._tslot``. The per-packet path only
  moves ``conn.expires`` later; it does not re-file. Only when expiry moves
  *earlier* (a state change to a shorter timeout) must ``refile`` be called.
- ``due(now)`` pops every bucket whose time ``<= now`` and returns the
  connections whose ``expires <= now``; the others in those buckets (their
  expiry moved later) are re-filed. Entries whose ``_tslot`` no longer
  matches (re-filed or deleted) are stale and skipped. So a sweep costs the
  number of entries due, not the table size.
- ``next_wakeup()`` is the earliest bucket time, never later than the true
  next expiry rounded up to the granularity (it may be earlier, harmlessly).
- ``rearm(conns, last_used, now)`` re-files due connections whose expiry a
  newer last-used time pushed past ``now`` (the tracker's lazy re-arm).
- Deleting calls ``unfile``; stale entries are compacted away once they
  outnumber the live ones, so deleted connections cannot pile up.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

from ctxdp.conntrack.conn import F_DEAD

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable

    from ctxdp.conntrack.conn import Conn

__all__ = ["ExpiryBuckets"]

_COMPACT_SLACK = 4096


class ExpiryBuckets:
    """Timer buckets keyed by integer slot = ceil(expires / granularity)."""

    __slots__ = ("gran", "_buckets", "_heap", "_live", "_stale")

    def __init__(self, granularity: float = 1.0) -> None:
        self.gran = granularity
        self._buckets: dict[int, list[Conn]] = {}
        self._heap: list[int] = []
        self._live = 0
        self._stale = 0

    def __len__(self) -> int:
        return self._live

    def slot_of(self, expires: float) -> int:
        return math.ceil(expires / self.gran)

    def file(self, conn: Conn) -> None:
        """File a connection that is not filed yet (new connection)."""
        self._put(conn, math.ceil(conn.expires / self.gran))
        self._live += 1

    def rearm(self, conns: list[Conn], last_used: list[float | None], now: float) -> list[Conn]:
        """The lazy re-arm of connections ``due`` returned: push each one's
        expiry to its ``last_used`` time + its state's timeout (never
        earlier), file again those now alive past ``now``, and return the
        others (to be expired). One loop, written out: at 1M connections due
        together, every pass and call per connection shows."""
        buckets, heap, g, ceil = self._buckets, self._heap, self.gran, math.ceil
        push = heapq.heappush
        dead: list[Conn] = []
        n = 0
        for c, t in zip(conns, last_used, strict=True):
            if t is not None:
                exp = t + c.handler.timeouts[c.pstate]
                if exp > c.expires:
                    c.expires = exp
                else:
                    exp = c.expires
                if exp > now:
                    if c._f & F_DEAD:  # deleted meanwhile: neither filed nor expired
                        continue
                    slot = ceil(exp / g)
                    b = buckets.get(slot)
                    if b is None:
                        buckets[slot] = [c]
                        push(heap, slot)
                    else:
                        b.append(c)
                    c._tslot = slot
                    n += 1
                    continue
            dead.append(c)
        self._live += n
        return dead

    def _put(self, conn: Conn, slot: int) -> None:
        b = self._buckets.get(slot)
        if b is None:
            self._buckets[slot] = [conn]
            heapq.heappush(self._heap, slot)
        else:
            b.append(conn)
        conn._tslot = slot

    def refile(self, conn: Conn) -> None:
        """Call after ``conn.expires`` may have moved earlier than its bucket."""
        cur = conn._tslot
        if cur is None:
            return
        slot = math.ceil(conn.expires / self.gran)
        if slot < cur:
            self._stale += 1  # the old entry stays behind, now stale
            self._put(conn, slot)

    def unfile(self, conn: Conn) -> None:
        """Forget a deleted connection (its entry becomes stale)."""
        if conn._tslot is not None:
            conn._tslot = None
            self._live -= 1
            self._stale += 1

    def due(self, now: float) -> list[Conn]:
        """Connections expired at ``now``, unfiled; see the module contract."""
        out: list[Conn] = []
        heap = self._heap
        buckets = self._buckets
        limit = math.floor(now / self.gran)
        while heap and heap[0] <= limit:
            slot = heapq.heappop(heap)
            for c in buckets.pop(slot):
                if c._tslot != slot:
                    self._stale -= 1
                elif c.expires <= now:
                    c._tslot = None
                    self._live -= 1
                    out.append(c)
                else:
                    self._put(c, math.ceil(c.expires / self.gran))
        return out

    def next_wakeup(self) -> float | None:
        """Time of the earliest non-empty bucket, None when nothing is filed."""
        if not self._heap:
            return None
        return self._heap[0] * self.gran

    def needs_compaction(self) -> bool:
        return self._stale > self._live + _COMPACT_SLACK

    def compact(self, live: Iterable[Conn]) -> None:
        """Rebuild the buckets from the live connections, dropping stale entries."""
        self.clear()
        for c in live:
            self._put(c, math.ceil(c.expires / self.gran))
            self._live += 1

    def clear(self) -> None:
        for b in self._buckets.values():
            for c in b:
                c._tslot = None
        self._buckets.clear()
        self._heap.clear()
        self._live = 0
        self._stale = 0

    def stats(self) -> dict[str, int]:
        return {"buckets": len(self._buckets), "live": self._live, "stale": self._stale}
