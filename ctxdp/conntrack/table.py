"""ConnTracker: the connection table and ``execute``, modelled on OVS's userspace conntrack.

Contract (docs/architecture.md, ``ctxdp.conntrack``):
- The table maps packed keys (``conn.py``) to connections; each committed
  connection has two entries, its original key and its reply key after NAT,
  so a packet in either direction finds it with one dict lookup.
- ``execute(pkt, zone, now, commit=False, nat=None, mark=None, labels=None)``
  classifies one parsed packet and returns a ``CtResult``:
  * malformed, non-IP or fragmented packets -> ``TRK|INV``;
  * a packet of a connection -> ``TRK|EST`` (or ``TRK|NEW`` while the
    connection is unreplied), ``|RPL`` in the reply direction, after the
    protocol handler accepted it; ``TRK|INV`` if the handler rejected it;
  * an ICMP/ICMPv6 error quoting a tracked packet -> ``TRK|REL`` (``|RPL``
    when it travels in the reply direction); quoting nothing tracked ->
    ``TRK|INV``;
  * anything else -> ``TRK|NEW`` with ``conn=None``, or, with ``commit``, a
    new connection (unless the handler says the packet cannot start one:
    ``TRK|INV``, or a limit / the NAT range / a reply-tuple collision refuses
    it: ``TRK|NEW`` with ``conn=None`` and ``reason`` set, counted).
  NAT'd connections get their packets rewritten in place (``SRC_NAT`` /
  ``DST_NAT`` bits are added). ``mark``/``labels`` are stored on commit.
- Expired connections are never returned: a lookup that finds one deletes
  it; ``sweep(now)`` deletes the rest and returns the next wake-up time.
- Lazy re-arm (OVS conntrack's lazy expiration): ``set_rearm(fn)`` installs
  ``fn(conns, now) -> [last_used | None, ...]`` (aligned with ``conns``), the
  fast path's last use of connections whose deadline came. A connection
  whose deadline passed is asked about only then, in ``sweep`` (one call per
  ``REARM_CHUNK`` due connections) or by a lookup that finds it past its
  deadline; a time pushes its expiry to ``last_used`` + its state's timeout
  (``refresh``) and, when that is past ``now``, it is re-filed instead of
  deleted. So offloaded traffic costs the tracker nothing until a deadline,
  and a sweep costs the connections due, never the connections that moved.
- ``insert(conn, now)`` files a connection built outside the packet path
  (the restart state import, ``ctxdp.conntrack.state``); observers get
  ``on_created``. The per-packet path does not use it.
- Nothing here reads a clock or touches the kernel; ``execute`` never raises
  for packet content (a failed rewrite is counted and reported as invalid).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ctxdp.conntrack.config import CtConfig
from ctxdp.conntrack.conn import (
    CS,
    F_DEAD,
    F_EST_SEEN,
    KEY4,
    KEY6,
    Conn,
    CtResult,
    key_of_tuple,
    reverse_key,
)
from ctxdp.conntrack.expiry import ExpiryBuckets
from ctxdp.conntrack.nat import NatAction, nat_packet, nat_related, select_reply
from ctxdp.conntrack.observer import CtObserver, overrides
from ctxdp.conntrack.proto import (
    UPD_INVALID,
    UPD_NEW,
    UPD_OK_NEW,
    UPD_OK_QUIET,
    make_handlers,
)

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.flowtuple import FlowTuple
    from ctxdp.packet import Packet

__all__ = ["ConnTracker", "CtStats"]

log = logging.getLogger(__name__)

_pack4 = KEY4.pack
_pack6 = KEY6.pack

TRK_INV = CS.TRK | CS.INV
TRK_NEW = CS.TRK | CS.NEW
TRK_EST = CS.TRK | CS.EST
TRK_EST_RPL = CS.TRK | CS.EST | CS.RPL
TRK_REL = CS.TRK | CS.REL


class CtStats:
    """Table-wide counters. ``invalid_reasons`` counts each invalid reason."""

    __slots__ = (
        "packets", "created", "deleted", "expired", "reopened", "invalid", "related",
        "refused_limit", "refused_zone_limit", "refused_nat", "refused_collision",
        "nat_errors", "observer_errors", "invalid_reasons", "deleted_reasons",
    )  # fmt: skip

    def __init__(self) -> None:
        self.packets = 0
        self.created = 0
        self.deleted = 0
        self.expired = 0
        self.reopened = 0
        self.invalid = 0
        self.related = 0
        self.refused_limit = 0
        self.refused_zone_limit = 0
        self.refused_nat = 0
        self.refused_collision = 0
        self.nat_errors = 0
        self.observer_errors = 0
        self.invalid_reasons: dict[str, int] = {}
        self.deleted_reasons: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["invalid_reasons"] = dict(self.invalid_reasons)
        d["deleted_reasons"] = dict(self.deleted_reasons)
        return d

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"CtStats({self.as_dict()})"


class ConnTracker:
    """The userspace connection tracker; see the module contract."""

    #: The sweep asks the re-arm source about this many due connections at a
    #: time: each chunk's objects stay in the CPU caches across the read, the
    #: refresh and the re-file (at 1M due connections, one pass each over
    #: the whole list missed the caches on every object).
    REARM_CHUNK = 2048

    def __init__(self, cfg: CtConfig | None = None) -> None:
        cfg = cfg if cfg is not None else CtConfig()
        cfg.validate()
        self.cfg = cfg
        self.handlers, self.default_handler = make_handlers(cfg)
        self._table: dict[bytes, Conn] = {}
        self._n = 0
        self._zone_n: dict[int, int] = {}
        self._exp = ExpiryBuckets(cfg.sweep_granularity)
        self._obs: list[CtObserver] = []
        self._upd_obs: list[CtObserver] = []
        self._rearm: Callable[[list[Conn], float], list[float | None]] | None = None
        self.stats = CtStats()

    # -- public API ------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def add_observer(self, obs: CtObserver) -> None:
        self._obs.append(obs)
        if overrides(obs, "on_update"):
            self._upd_obs.append(obs)

    def remove_observer(self, obs: CtObserver) -> None:
        if obs in self._obs:
            self._obs.remove(obs)
        if obs in self._upd_obs:
            self._upd_obs.remove(obs)

    def zone_count(self, zone: int) -> int:
        """Connections currently committed in ``zone``."""
        return self._zone_n.get(zone, 0)

    def get(self, zone: int, t: FlowTuple) -> Conn | None:
        """The connection with tuple ``t`` in either direction (reply: after NAT)."""
        return self._table.get(key_of_tuple(zone, t))

    def conns(self, zone: int | None = None) -> list[Conn]:
        """A snapshot list of the connections (of one zone, or all)."""
        out = [c for k, c in self._table.items() if k is c.key]
        if zone is not None:
            out = [c for c in out if c.zone == zone]
        return out

    def set_seq_check(self, conn: Conn, enabled: bool) -> None:
        """Switch TCP sequence checking for ``conn``; on re-enable, re-learn windows."""
        if enabled and not conn.seq_check:
            conn.handler.on_relearn(conn)
        conn.seq_check = bool(enabled)

    def refresh(self, conn: Conn, last_used: float) -> float:
        """Push expiry to ``last_used`` + the current state's timeout; never pull it in."""
        exp = last_used + conn.handler.timeouts[conn.pstate]
        if exp > conn.expires:
            conn.expires = exp
        return conn.expires

    def set_rearm(self, fn: Callable[[list[Conn], float], list[float | None]] | None) -> None:
        """Install (None: remove) the lazy re-arm source; see the module contract."""
        self._rearm = fn

    def _last_used(self, conns: list[Conn], now: float) -> list[float | None] | None:
        try:
            lus = self._rearm(conns, now)  # type: ignore[misc]
            if len(lus) != len(conns):
                raise ValueError("re-arm source returned a wrong number of times")
            return lus
        except Exception:  # noqa: BLE001 - a broken source must not stop expiry
            self.stats.observer_errors += 1
            log.exception("conntrack re-arm source failed")
            return None

    def _rearmed(self, conn: Conn, now: float) -> bool:
        """A lookup found ``conn`` past its deadline: still alive per the fast path?"""
        if self._rearm is None:
            return False
        lus = self._last_used([conn], now)
        if not lus or lus[0] is None:
            return False
        return self.refresh(conn, lus[0]) > now

    def sweep(self, now: float) -> float | None:
        """Delete connections expired at ``now`` (after the lazy re-arm); return
        the next wake-up time or None."""
        due = self._exp.due(now)
        if due and self._rearm is not None:
            dead: list[Conn] = []
            step = self.REARM_CHUNK
            for lo in range(0, len(due), step):
                chunk = due[lo : lo + step] if lo or len(due) > step else due
                lus = self._last_used(chunk, now)
                if lus is None:  # the source failed: not asked again this sweep
                    dead += due[lo:]
                    break
                dead += self._exp.rearm(chunk, lus, now)
            due = dead
        for conn in due:
            if not conn._f & F_DEAD:  # an observer may have deleted it meanwhile
                self._delete(conn, now, "expired")
        if self._exp.needs_compaction():
            self._exp.compact(self.conns())
        return self._exp.next_wakeup()

    def delete(self, conn: Conn, now: float, reason: str = "deleted") -> bool:
        """Remove ``conn``; False if it was already gone."""
        if conn._f & F_DEAD:
            return False
        self._delete(conn, now, reason)
        return True

    def flush(self, now: float, zone: int | None = None) -> int:
        """Delete every connection (of ``zone``); return how many."""
        victims = self.conns(zone)
        for c in victims:
            if not c._f & F_DEAD:
                self._delete(c, now, "flush")
        if zone is None:
            self._exp.clear()
        return len(victims)

    def insert(self, conn: Conn, now: float) -> str:
        """Add a connection built outside the packet path (state import).

        ``conn`` must carry its keys, handler, state and expiry. It is filed
        like a committed connection and observers get ``on_created``; nothing
        is counted as created. Returns "" or why it was refused: ``expired``,
        ``limit``, ``zone-limit``, ``collision`` (a key already in the table).
        """
        if conn.expires <= now:
            return "expired"
        cfg = self.cfg
        zone = conn.zone
        if cfg.max_conns and self._n >= cfg.max_conns:
            return "limit"
        zlim = cfg.zone_limits.get(zone, cfg.default_zone_limit)
        if zlim and self._zone_n.get(zone, 0) >= zlim:
            return "zone-limit"
        table = self._table
        if conn.key in table or conn.rkey in table or conn.key == conn.rkey:
            return "collision"
        conn._f &= ~F_DEAD
        table[conn.key] = conn
        table[conn.rkey] = conn
        self._n += 1
        self._zone_n[zone] = self._zone_n.get(zone, 0) + 1
        self._exp.file(conn)
        if self._obs:
            self._notify("on_created", conn, now)
        return ""

    # -- the packet path -------------------------------------------------------
    def execute(
        self,
        pkt: Packet,
        zone: int,
        now: float,
        commit: bool = False,
        nat: NatAction | None = None,
        mark: int | None = None,
        labels: int | None = None,
    ) -> CtResult:
        """Track one parsed packet; see the module contract."""
        self.stats.packets += 1
        if not pkt.valid:
            return self._invalid("malformed:" + (pkt.reason or "?"))
        fam = pkt.family
        if fam == 4:
            pack = _pack4
        elif fam == 6:
            pack = _pack6
        else:
            return self._invalid("not-ip")
        if pkt.frag:
            return self._invalid("fragment")
        proto = pkt.proto
        if pkt.inner is not None and (proto == 1 or proto == 58):
            return self._related(pkt, zone, now, pack)
        try:
            key = pack(zone, proto, pkt.src, pkt.dst, pkt.sport, pkt.dport)
        except Exception:  # noqa: BLE001 - a hand-made Packet with odd fields
            return self._invalid("bad-fields")

        conn = self._table.get(key)
        if conn is not None:
            if conn.expires <= now and not self._rearmed(conn, now):
                self._delete(conn, now, "expired")
            else:
                reply = key != conn.key
                h = conn.handler
                old = conn.pstate
                r = h.update(conn, pkt, reply, now)
                if r == UPD_INVALID:
                    return self._invalid(h.reason)
                if r == UPD_NEW:
                    self.stats.reopened += 1
                    self._delete(conn, now, "reopen")
                else:
                    i = 1 if reply else 0
                    conn.pkts[i] += 1
                    conn.bytes[i] += len(pkt.buf)
                    if r != UPD_OK_QUIET or conn.pstate != old:
                        conn.expires = now + h.timeouts[conn.pstate]
                    if conn.pstate != old:
                        self._state_changed(conn, old, now)
                    if self._upd_obs:
                        self._dispatch_update(conn, pkt, reply, now)
                    if commit:
                        if mark is not None:
                            conn.mark = mark
                        if labels is not None:
                            conn.labels = labels
                    if r == UPD_OK_NEW:
                        state = TRK_NEW
                    else:
                        state = TRK_EST_RPL if reply else TRK_EST
                    info = conn.nat
                    if info is not None:
                        state |= CS.SRC_NAT if info.snat else CS.DST_NAT
                        try:
                            nat_packet(pkt.buf, pkt, info, reply)  # type: ignore[arg-type]
                        except Exception as exc:  # noqa: BLE001 - never raise per packet
                            return self._nat_failed(exc)
                    return CtResult(state, conn, reply)

        return self._new(pkt, zone, now, key, proto, commit, nat, mark, labels)

    # -- internals ---------------------------------------------------------------
    def _invalid(self, reason: str) -> CtResult:
        st = self.stats
        st.invalid += 1
        st.invalid_reasons[reason] = st.invalid_reasons.get(reason, 0) + 1
        return CtResult(TRK_INV, None, False, reason)

    def _nat_failed(self, exc: Exception) -> CtResult:
        self.stats.nat_errors += 1
        log.warning("conntrack: NAT rewrite failed: %s", exc)
        return self._invalid("nat-rewrite-failed")

    def _refuse(self, counter: str, reason: str) -> CtResult:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        return CtResult(TRK_NEW, None, False, reason)

    def _new(
        self,
        pkt: Packet,
        zone: int,
        now: float,
        key: bytes,
        proto: int,
        commit: bool,
        nat: NatAction | None,
        mark: int | None,
        labels: int | None,
    ) -> CtResult:
        h = self.handlers.get(proto, self.default_handler)
        if not h.valid_new(pkt):
            return self._invalid(h.reason)
        if not commit:
            return CtResult(TRK_NEW, None, False)
        cfg = self.cfg
        if cfg.max_conns and self._n >= cfg.max_conns:
            return self._refuse("refused_limit", "limit")
        zlim = cfg.zone_limits.get(zone, cfg.default_zone_limit)
        if zlim and self._zone_n.get(zone, 0) >= zlim:
            return self._refuse("refused_zone_limit", "zone-limit")
        table = self._table
        info = None
        if nat is not None:
            sel = select_reply(table, zone, proto, pkt.src, pkt.dst, pkt.sport, pkt.dport, nat,
                               cfg.nat_ephemeral)
            if sel is None:
                return self._refuse("refused_nat", "nat-exhausted")
            rkey, info = sel
        else:
            rkey = reverse_key(key)
            if rkey in table:
                # Another connection's NAT already claimed our reply tuple.
                return self._refuse("refused_collision", "tuple-collision")

        conn = h.new_conn(pkt, now)
        conn.key = key
        conn.rkey = rkey
        conn.nat = info
        conn.seq_check = True
        if mark is not None:
            conn.mark = mark
        if labels is not None:
            conn.labels = labels
        conn.pkts[0] = 1
        conn.bytes[0] = len(pkt.buf)
        conn.expires = now + h.timeouts[conn.pstate]
        table[key] = conn
        table[rkey] = conn
        self._n += 1
        self._zone_n[zone] = self._zone_n.get(zone, 0) + 1
        self._exp.file(conn)
        self.stats.created += 1
        if self._obs:
            self._notify("on_created", conn, now)
        state = TRK_NEW
        if info is not None:
            state |= CS.SRC_NAT if info.snat else CS.DST_NAT
            try:
                nat_packet(pkt.buf, pkt, info, False)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - never raise per packet
                return self._nat_failed(exc)
        return CtResult(state, conn, False)

    def _related(self, pkt: Packet, zone: int, now: float, pack: Any) -> CtResult:
        """An ICMP error: find the connection of the datagram it quotes (OVS style)."""
        inner = pkt.inner
        assert inner is not None
        if not inner.valid or inner.family != pkt.family or inner.frag_off:
            return self._invalid("related-bad-quote")
        try:
            # The quote is a packet that travelled the other way: reverse it.
            key = pack(zone, inner.proto, inner.dst, inner.src, inner.dport, inner.sport)
        except Exception:  # noqa: BLE001 - a hand-made Packet with odd fields
            return self._invalid("bad-fields")
        conn = self._table.get(key)
        if conn is None or (conn.expires <= now and not self._rearmed(conn, now)):
            return self._invalid("related-no-conn")
        reply = key != conn.key
        self.stats.related += 1
        i = 1 if reply else 0
        conn.pkts[i] += 1
        conn.bytes[i] += len(pkt.buf)
        state = TRK_REL | CS.RPL if reply else TRK_REL
        info = conn.nat
        if info is not None:
            state |= CS.SRC_NAT if info.snat else CS.DST_NAT
            try:
                nat_related(pkt.buf, pkt, info, reply)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - never raise per packet
                return self._nat_failed(exc)
        return CtResult(state, conn, reply)

    def _state_changed(self, conn: Conn, old: int, now: float) -> None:
        self._exp.refile(conn)
        new = conn.pstate
        h = conn.handler
        est = new == h.established_state and not conn._f & F_EST_SEEN
        if est:
            conn._f |= F_EST_SEEN
        if self._obs:
            self._notify("on_state_change", conn, h.states[old], h.states[new], now)
            if est:
                self._notify("on_established", conn, now)

    def _delete(self, conn: Conn, now: float, reason: str) -> None:
        conn._f |= F_DEAD
        t = self._table
        if t.get(conn.key) is conn:
            del t[conn.key]
        if t.get(conn.rkey) is conn:
            del t[conn.rkey]
        self._n -= 1
        z = conn.zone
        left = self._zone_n.get(z, 0) - 1
        if left > 0:
            self._zone_n[z] = left
        else:
            self._zone_n.pop(z, None)
        self._exp.unfile(conn)
        st = self.stats
        st.deleted += 1
        if reason == "expired":
            st.expired += 1
        st.deleted_reasons[reason] = st.deleted_reasons.get(reason, 0) + 1
        if conn.ext is not None:
            parent = conn.parent
            if parent is not None and parent.children > 0:
                parent.children -= 1
        if self._obs:
            self._notify("on_deleted", conn, now, reason)

    def _notify(self, hook: str, *args: Any) -> None:
        for obs in tuple(self._obs):
            try:
                getattr(obs, hook)(*args)
            except Exception:  # noqa: BLE001 - an observer must not break the tracker
                self.stats.observer_errors += 1
                log.exception("conntrack observer %r failed in %s", obs, hook)

    def _dispatch_update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> None:
        for obs in tuple(self._upd_obs):
            try:
                obs.on_update(conn, pkt, reply, now)
            except Exception:  # noqa: BLE001 - an observer must not break the tracker
                self.stats.observer_errors += 1
                log.exception("conntrack observer %r failed in on_update", obs)

    def iter_keys(self) -> Iterator[tuple[bytes, Conn]]:
        """Raw (key, conn) table entries, two per connection (diagnostics, tests)."""
        return iter(list(self._table.items()))
