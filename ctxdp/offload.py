"""Conntrack offload manager: provider registry, batching, eligibility, offload mark.

Modelled on Open vSwitch's conntrack offload provider interface, with
nf_flowtable's per-direction entries and mlx5's pending-neighbour handling.

Contract:
- ``OffloadManager(ct, providers, policy)`` registers itself as a conntrack
  observer. Each connection gets one ``ConnOffload`` (an ``OffloadCtx``) in
  ``conn.ext["offload"]``.
- A connection is offered to providers only when the global switch is on,
  the ``EligibilityPolicy`` allows it, the slow path has forwarded both
  directions (``set_forwarding``), and both next hops are resolved. An
  unresolved next hop makes the offload *pending* (reason
  ``neigh-unresolved``); ``neigh_resolved`` or ``retry_pending`` offers it
  again. A provider's ``EAGAIN`` is pending too; ``ENOSPC`` is retried only by
  ``retry_pending``; other refusals (``EIO``, a raise) are offered again only
  when something changes (forwarding, policy, switches). Refusals that
  packets can clear (``min-pkts``, ``cap``, ``has-children``) are re-checked
  from the per-packet ``on_update`` hook, which is free for other conns.
- ``withdraw`` (and ``withdraw_where`` / ``_ifindex`` / ``_mac``) forgets the
  connection's forwarding: it is offered again once the slow path has
  forwarded both directions again. Switch-offs and neighbour loss keep it.
- Offload mark: a connection is offloaded only once a provider accepted it
  (``ctx.held``, ``is_offloaded``). DEL, EST, POLICY and UPD go only to the
  providers that hold the connection, whatever the enabled switches say. So
  enabling offload sends no deletes, and a sweep after ``disable(...,
  withdraw=False)`` still deletes what is still offloaded.
- TCP sequence checking is switched off (``ct.set_seq_check(conn, False)``)
  when the first provider accepts a connection, and back on (the tracker
  re-learns the windows in liberal mode) when the last one lets it go:
  FIN/RST seen by the tracker, withdraw, provider disable, aging error.
- Batching: every entry point queues operations. Inside ``with
  mgr.batch(now):`` (or ``begin()`` ... ``commit(now)``) they are submitted
  together when the outermost batch ends; outside a batch each entry point
  submits its own operations before returning (auto-commit), so single-packet
  paths work unbatched. The daemon opens one batch per receive burst and one
  around ``ct.sweep``. A batch that grows to ``max_batch`` operations is
  submitted in chunks of that size (order kept), bounding memory and
  latency. Batches are per thread; ONE ``threading.Lock`` is held around the
  submission of a whole batch (never per operation). Providers with
  ``batch_submit`` get one ``Batch`` per submission; the others one call per
  operation, inside the same lock hold.
- Eligibility is judged when an ADD is queued and again at submission if
  the configuration (policy, switches, providers) changed in between, so a
  connection is offloaded only if policy allows it at the time of offload.
- Targets are decided at submission, under the lock, from the holders at
  that moment (a planned ADD counts as a holder for later ops of the same
  batch), so a DEL queued before an ADD completed still reaches the provider
  that accepted it, and an ADD of a connection deleted meanwhile is dropped or
  undone. Provider-visible state is never left behind.
- A provider that raises never breaks the tracker or the manager: the
  operation counts as ``EIO`` and ``stats["provider_errors"][name]`` grows.
  After a raise in ADD (or a whole batch) the manager sends a cleanup DEL. A
  DEL that fails (other than ``ENOENT``) is kept and retried by ``age`` and
  ``retry_pending`` until it succeeds.
- Tracker calls (``set_seq_check``, ``refresh``, ``flush``) are made after the
  lock is released, so a tracker that calls observers back cannot deadlock.
- Aging is lazy (OVS conntrack style): the manager installs ``last_used`` as
  the tracker's re-arm source (``ct.set_rearm``), so an offloaded
  connection's last-used time is read only when its deadline comes, in bulk
  per sweep; nothing is read per aging tick for connections that are not
  due. ``age`` is the full O(offloaded) read-back, for state export.
- Fast-path counters are folded into ``conn.pkts`` / ``conn.bytes`` on demand
  (``fold_counters``: listings, state export); providers fold an entry's
  counters themselves just before they delete or rewrite it.
- ``stats["not_offloaded"][reason]`` counts each time a connection enters a
  refusal reason (``ctxdp.eligibility.Reason``); the two "not yet" reasons
  ``not-established`` and ``no-forwarding`` are counted only when a
  connection is deleted without ever having been offloaded, so that every
  normal connection is not counted as refused on its way to offload.
- Nothing here reads a clock or imports bcc, sockets or pyroute2.

Daemon-facing API: ``batch(now)`` / ``begin`` / ``commit``;
``set_forwarding`` (``flow_dir`` builds the ``FlowDir``),
``update_forwarding``, ``neigh_resolved``, ``neigh_gone``, ``retry_pending``,
``age``, ``last_used``, ``refresh``, ``fold_counters``, ``withdraw``,
``withdraw_where``, ``withdraw_ifindex``, ``withdraw_mac``, ``flush``, ``enable`` / ``disable``, ``enable_provider`` /
``disable_provider``, ``add_provider`` / ``remove_provider``, ``set_policy``,
``close``; lookups ``is_offloaded``, ``reason``, ``ctx``, ``offloaded``,
``pending``, ``stats``.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ctxdp.conntrack.observer import CtObserver
from ctxdp.eligibility import TRANSIENT_REASONS, EligibilityPolicy, Reason
from ctxdp.providers.base import (
    Batch,
    FlowDir,
    OffloadCtx,
    Op,
    OpKind,
    Provider,
    ProviderError,
)

__all__ = [
    "OffloadManager",
    "ConnOffload",
    "EligibilityPolicy",
    "Reason",
    "flow_dir",
    "errno_name",
]

log = logging.getLogger(__name__)

_RAISED = object()  # op.result marker: the provider raised on this op

TCP = 6
_PENDING_REASONS = frozenset({Reason.NEIGH_UNRESOLVED, Reason.EAGAIN})
_WAITING_REASONS = frozenset({Reason.NOT_ESTABLISHED, Reason.NO_FORWARDING})
# Stats counter names per successful op kind.
_DONE = {
    OpKind.ADD: "adds",
    OpKind.DEL: "dels",
    OpKind.EST: "ests",
    OpKind.POLICY: "policies",
    OpKind.UPD: "updates",
    OpKind.FLUSH: "flushes",
}


def errno_name(err: int) -> str:
    """Symbolic errno (``ENOSPC``) for stats keys; the number if unknown."""
    return _errno.errorcode.get(err, str(err))


@dataclass(slots=True, eq=False)
class ConnOffload(OffloadCtx):
    """The per-connection ``OffloadCtx`` plus the manager's bookkeeping.

    ``held``: names of providers that accepted the connection (the offload
    mark). ``pending``: providers that answered EAGAIN. ``reason``: why the
    connection is not offloaded (``""`` when offloaded or not evaluated).
    ``nexthop``: next-hop address per direction, for neighbour events.
    """

    held: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    reason: str = ""
    nexthop: list[bytes | None] = field(default_factory=lambda: [None, None])
    dead: bool = False
    ever_offloaded: bool = False
    seq_off: bool = False
    offloaded_at: float | None = None


def flow_dir(
    conn: Any,
    reply: bool,
    in_ifindex: int,
    out_ifindex: int,
    src_mac: bytes | None,
    dst_mac: bytes | None,
    mtu: int = 1500,
) -> FlowDir:
    """The ``FlowDir`` of one direction of ``conn`` with its NAT applied.

    Original direction: matches ``conn.orig``, leaves as the reverse of the
    reply tuple; reply direction: matches ``conn.reply``, leaves as the
    reverse of the original tuple.
    """
    if reply:
        match, out = conn.reply, conn.orig.reverse()
    else:
        match, out = conn.orig, conn.reply.reverse()
    return FlowDir(in_ifindex, match, out, out_ifindex, src_mac, dst_mac, mtu)


def _same_dir(a: FlowDir, b: FlowDir) -> bool:
    return (
        a.in_ifindex == b.in_ifindex
        and a.out_ifindex == b.out_ifindex
        and a.src_mac == b.src_mac
        and a.dst_mac == b.dst_mac
        and a.mtu == b.mtu
        and a.match == b.match
        and a.out == b.out
    )


# One queued intent: kind, ctx (None for FLUSH), target provider names (None
# = decided at submission), arg: for DEL ``force`` (send even to a provider
# not holding it), for ADD the config generation it was judged under.
_Intent = tuple[OpKind, "ConnOffload | None", "frozenset[str] | None", Any]


class _Entry:
    """A registered provider and its switch."""

    __slots__ = ("provider", "name", "enabled", "held", "stale", "batch_submit", "can_offload")

    def __init__(self, provider: Provider, enabled: bool) -> None:
        self.provider = provider
        self.name = provider.name
        self.enabled = enabled
        self.held: set[ConnOffload] = set()  # connections this provider holds
        self.stale: set[ConnOffload] = set()  # DELs that failed, to retry
        self.batch_submit = getattr(provider, "batch_submit", None)
        # None when the provider keeps the base "accept everything" hook: the
        # per-op call is then skipped.
        co = provider.can_offload
        self.can_offload = None if getattr(co, "__func__", None) is Provider.can_offload else co


class OffloadManager(CtObserver):
    """Offers eligible connections to providers and keeps them consistent."""

    def __init__(
        self,
        ct: Any,
        providers: Iterable[Provider] = (),
        policy: EligibilityPolicy | None = None,
        *,
        enabled: bool = True,
        max_batch: int = 1024,
    ) -> None:
        self.ct = ct
        self.max_batch = max(1, max_batch)
        self.policy = policy if policy is not None else EligibilityPolicy()
        self._enabled = enabled
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._fwd: set[ConnOffload] = set()  # live ctxs with any forwarding known
        self._watch: set[ConnOffload] = set()  # transient refusals, re-checked per packet
        self._pending: set[ConnOffload] = set()  # unresolved next hop / EAGAIN
        self._retry: set[ConnOffload] = set()  # ENOSPC
        self._n_offloaded = 0
        # Bumped by every config change (policy, switches, providers): an ADD
        # judged under the current generation need not be judged again at
        # submission, only checked for deletion and next-hop resolution.
        self._gen = 0
        self._n_enabled = 0
        self._c: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._withdrawn: Counter[str] = Counter()
        self._perrors: Counter[str] = Counter()
        for p in providers:
            self.add_provider(p)
        ct.add_observer(self)
        set_rearm = getattr(ct, "set_rearm", None)
        if set_rearm is not None:  # lazy aging: the tracker asks at each deadline
            set_rearm(self.last_used)

    # ------------------------------------------------------------------
    # registry and runtime configuration
    # ------------------------------------------------------------------
    def add_provider(
        self, provider: Provider, *, enabled: bool = True, now: float | None = None
    ) -> None:
        """Register and ``init`` a provider; with ``now``, offer it existing connections.

        Raises ``ProviderError`` when ``init`` fails (the daemon then falls
        back to another provider) and ``ValueError`` for a duplicate name.
        """
        if provider.name in self._entries:
            raise ValueError(f"provider {provider.name!r} already registered")
        try:
            rc = provider.init()
        except ProviderError:
            raise
        except Exception as e:  # a broken provider must not take the daemon down
            raise ProviderError(_errno.EIO, f"{provider.name}: init raised {e!r}") from e
        if rc:
            raise ProviderError(rc, f"{provider.name}: init failed: {errno_name(rc)}")
        self._entries[provider.name] = _Entry(provider, enabled)
        self._config_changed()
        if enabled and now is not None:
            self._offer_all(now, frozenset((provider.name,)))
            self._auto(now)

    def remove_provider(self, name: str, now: float) -> None:
        """Withdraw every connection the provider holds, then ``close`` and drop it."""
        ent = self._entries[name]
        ent.enabled = False
        self._config_changed()
        self.begin(now)
        try:
            for ctx in list(ent.held):
                self._enqueue(OpKind.DEL, ctx, frozenset((name,)))
                self._withdrawn[Reason.NO_PROVIDER] += 1
        finally:
            self.commit(now)
        del self._entries[name]
        self._config_changed()
        self._close_provider(ent)

    def _config_changed(self) -> None:
        self._gen += 1
        self._n_enabled = sum(e.enabled for e in self._entries.values())

    def providers(self) -> list[Provider]:
        return [e.provider for e in self._entries.values()]

    def provider(self, name: str) -> Provider:
        return self._entries[name].provider

    def provider_enabled(self, name: str) -> bool:
        return self._entries[name].enabled

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self, now: float) -> None:
        """Turn offload on: offer every eligible connection; sends no DEL."""
        self.begin(now)
        try:
            self._enabled = True
            self._config_changed()
            self._offer_all(now)
        finally:
            self.commit(now)

    def disable(self, now: float, *, withdraw: bool = True) -> None:
        """Turn offload off. ``withdraw`` (default) takes every connection back
        to the slow path; ``withdraw=False`` only stops new offloads and lets
        the offloaded ones end normally (their DELs still go out)."""
        self.begin(now)
        try:
            self._enabled = False
            self._config_changed()
            for ctx in list(self._pending | self._retry | self._watch):
                self._note(ctx, Reason.DISABLED)
            if withdraw:
                for ent in self._entries.values():
                    for ctx in list(ent.held):
                        self._withdraw_ctx(ctx, Reason.DISABLED, forget=False)
        finally:
            self.commit(now)

    def enable_provider(self, name: str, now: float) -> None:
        """Enable one provider and offer it every eligible connection."""
        self.begin(now)
        try:
            self._entries[name].enabled = True
            self._config_changed()
            self._offer_all(now, frozenset((name,)))
        finally:
            self.commit(now)

    def disable_provider(self, name: str, now: float, *, withdraw: bool = True) -> None:
        """Disable one provider; ``withdraw`` takes back what it holds (those
        it alone held return to the slow path)."""
        self.begin(now)
        try:
            ent = self._entries[name]
            ent.enabled = False
            self._config_changed()
            if withdraw:
                for ctx in list(ent.held):
                    self._enqueue(OpKind.DEL, ctx, frozenset((name,)))
                    self._withdrawn[Reason.DISABLED] += 1
        finally:
            self.commit(now)

    def set_policy(self, policy: EligibilityPolicy, now: float) -> None:
        """Replace the policy: withdraw what it now refuses, offer what it allows."""
        self.policy = policy
        self._config_changed()
        self.begin(now)
        try:
            for ctx in list(self._fwd):
                r = self._verdict(ctx) if ctx.held else ""
                if r and r not in _PENDING_REASONS:
                    self._withdraw_ctx(ctx, r, forget=False)
                    self._note(ctx, r)
                else:
                    self._consider(ctx)
        finally:
            self.commit(now)

    def close(self, now: float) -> None:
        """Shutdown: delete every offloaded entry, then close the providers."""
        self.begin(now)
        try:
            for ent in self._entries.values():
                ent.enabled = False
                for ctx in list(ent.held):
                    self._enqueue(OpKind.DEL, ctx, frozenset((ent.name,)))
            self._config_changed()
        finally:
            self.commit(now)
        for ent in self._entries.values():
            self._close_provider(ent)

    # ------------------------------------------------------------------
    # batching
    # ------------------------------------------------------------------
    def _q(self) -> list[_Intent]:
        tls = self._tls
        q = getattr(tls, "q", None)
        if q is None:
            q = tls.q = []
            tls.depth = 0
            tls.now = 0.0
        return q

    def begin(self, now: float | None = None) -> None:
        """Open a batch on this thread (nestable). ``now`` stamps the chunks
        submitted early when the batch grows past ``max_batch``."""
        self._q()
        self._tls.depth += 1
        if now is not None:
            self._tls.now = now

    def commit(self, now: float) -> int:
        """Close a batch; the outermost close submits it. Returns ops dispatched."""
        self._q()
        tls = self._tls
        tls.now = now
        if tls.depth > 0:
            tls.depth -= 1
        if tls.depth:
            return 0
        return self._submit_queue(now)

    @contextmanager
    def batch(self, now: float) -> Iterator[OffloadManager]:
        """``with mgr.batch(now):`` queue everything inside, submit once at the end."""
        self.begin(now)
        try:
            yield self
        finally:
            self.commit(now)

    @property
    def in_batch(self) -> bool:
        self._q()
        return self._tls.depth > 0

    def _enqueue(
        self,
        kind: OpKind,
        ctx: ConnOffload | None,
        targets: frozenset[str] | None = None,
        arg: Any = False,
    ) -> None:
        q = self._q()
        q.append((kind, ctx, targets, arg))
        if len(q) >= self.max_batch:  # bound memory and latency: submit this chunk now
            self._submit_queue(self._tls.now)

    def _auto(self, now: float) -> None:
        """Auto-commit: submit now unless a batch is open on this thread."""
        q = self._q()
        if q and not self._tls.depth:
            self._submit_queue(now)

    def _submit_queue(self, now: float) -> int:
        tls = self._tls
        q = tls.q
        if not q:
            return 0
        tls.q = []
        return self._submit(q, now)

    def _submit(self, intents: list[_Intent], now: float) -> int:
        touched: set[ConnOffload] = set()
        n = 0
        with self._lock:
            self._c["batches"] += 1
            rounds = intents
            while rounds:
                batches, outcome = self._resolve(rounds)
                rounds, k = self._dispatch(batches, outcome, now, touched)
                n += k
        self._sync_seq(touched)
        return n

    # ------------------------------------------------------------------
    # resolution: intents -> per-provider batches (under the lock)
    # ------------------------------------------------------------------
    def _resolve(self, intents: list[_Intent]) -> tuple[dict[str, Batch], dict[ConnOffload, str]]:
        """Turn intents into per-provider batches. Targets come from the
        holders at this moment, updated as the batch is planned (an ADD
        planned earlier counts as a holder for a later DEL of the batch)."""
        batches: dict[str, Batch] = {}
        outcome: dict[ConnOffload, str] = {}  # filled by _dispatch: failed ADDs -> reason
        plan: dict[ConnOffload, set[str]] = {}  # planned holders per ctx
        new = 0
        cap = self.policy.max_offloaded
        gen = self._gen
        entries = self._entries
        ADD, DEL, FLUSH = OpKind.ADD, OpKind.DEL, OpKind.FLUSH

        for kind, ctx, targets, arg in intents:
            if kind is FLUSH:
                for name, ent in entries.items():
                    if targets is None or name in targets:
                        self._put(batches, name, Op(FLUSH, None))
                        for c in ent.held:
                            held = plan.get(c)
                            if held is None:
                                held = plan[c] = set(c.held)
                            held.discard(name)
                continue
            assert ctx is not None
            held = plan.get(ctx)
            if held is None:
                held = plan[ctx] = set(ctx.held)
            if kind is ADD:
                if ctx.dead:
                    continue
                # Judged at enqueue; judge again only if the config changed
                # since, or a next hop went away meanwhile.
                r = self._verdict(ctx) if arg != gen or not ctx.resolved else ""
                if not r and not held and cap is not None and self._n_offloaded + new >= cap:
                    r = Reason.CAP
                if r:
                    self._note(ctx, r)
                    continue
                conn = ctx.conn
                ctx.proto_state = conn.state_name
                ctx.mark = conn.mark
                offered = False
                for name, ent in entries.items():
                    if not ent.enabled or name in held or (targets and name not in targets):
                        continue
                    if ent.can_offload is not None and not self._can_offload(ent, ctx):
                        continue
                    b = batches.get(name)
                    if b is None:
                        b = batches[name] = Batch()
                    b.ops.append(Op(ADD, ctx))
                    if not held:
                        new += 1
                    held.add(name)
                    offered = True
                if not offered and not held:
                    self._note(ctx, Reason.NO_PROVIDER)
            elif kind is DEL:
                names = set(held) if not arg else set(targets or ())
                if targets is not None:
                    names &= targets
                for name in names:
                    if name in entries:
                        self._put(batches, name, Op(DEL, ctx))
                        held.discard(name)
            else:  # EST, POLICY, UPD go to holders only
                if kind is not OpKind.UPD:
                    self._refresh_ctx(ctx)
                for name in held:
                    if targets is None or name in targets:
                        self._put(batches, name, Op(kind, ctx))
        return batches, outcome

    @staticmethod
    def _put(batches: dict[str, Batch], name: str, op: Op) -> None:
        b = batches.get(name)
        if b is None:
            b = batches[name] = Batch()
        b.ops.append(op)

    def _can_offload(self, ent: _Entry, ctx: ConnOffload) -> bool:
        try:
            return bool(ent.can_offload(ctx))  # type: ignore[misc]
        except Exception:
            self._provider_raised(ent, "can_offload")
            return False

    # ------------------------------------------------------------------
    # dispatch and results (under the lock)
    # ------------------------------------------------------------------
    def _dispatch(
        self,
        batches: dict[str, Batch],
        outcome: dict[ConnOffload, str],
        now: float,
        touched: set[ConnOffload],
    ) -> tuple[list[_Intent], int]:
        follow: list[_Intent] = []
        n = adds = 0
        ADD = OpKind.ADD
        for name, batch in batches.items():
            ent = self._entries[name]
            raised = self._call(ent, batch)
            n += len(batch.ops)
            held_by, stale = ent.held, ent.stale
            for op in batch.ops:
                ctx = op.ctx
                if op.kind is ADD and not op.err:  # the common case, inline
                    if not ctx.held:
                        self._n_offloaded += 1
                        ctx.offloaded_at = now
                        ctx.ever_offloaded = True
                    ctx.held.add(name)
                    held_by.add(ctx)
                    if stale:
                        stale.discard(ctx)
                    touched.add(ctx)
                    if ctx.reason or ctx.pending:  # was refused/pending before
                        ctx.pending.discard(name)
                        outcome.setdefault(ctx, "")
                    adds += 1
                    if ctx.dead:  # deleted while the ADD was in flight
                        follow.append((OpKind.DEL, ctx, frozenset((name,)), False))
                    continue
                self._result(ent, op, raised, outcome, now, touched, follow)
        self._c["ops"] += n
        self._c["adds"] += adds
        for ctx, r in outcome.items():
            if ctx.held:
                if ctx.reason or ctx.pending:
                    self._note(ctx, "")
            else:
                self._note(ctx, r or Reason.PROVIDER_ERROR)
        return follow, n

    def _call(self, ent: _Entry, batch: Batch) -> bool:
        """Run a batch on one provider; True if the provider raised as a whole."""
        if ent.batch_submit is not None:
            try:
                ent.batch_submit(batch)
            except Exception:
                self._provider_raised(ent, "batch_submit")
                for op in batch.ops:
                    op.err = _errno.EIO
                return True
            return False
        p = ent.provider
        for op in batch.ops:
            k = op.kind
            try:
                if k is OpKind.ADD:
                    op.err = int(p.conn_add(op.ctx) or 0)
                elif k is OpKind.DEL:
                    op.err = int(p.conn_del(op.ctx) or 0)
                elif k is OpKind.UPD:
                    op.result = p.conn_update(op.ctx)
                elif k is OpKind.EST:
                    op.err = int(p.conn_established(op.ctx) or 0)
                elif k is OpKind.POLICY:
                    op.err = int(p.conn_policy(op.ctx) or 0)
                else:
                    op.err = int(p.flush() or 0)
            except ProviderError as e:
                op.err = e.errno or _errno.EIO
            except Exception:
                self._provider_raised(ent, k.value)
                op.err = _errno.EIO
                op.result = _RAISED
        return False

    def _provider_raised(self, ent: _Entry, hook: str) -> None:
        first = not self._perrors[ent.name]
        self._perrors[ent.name] += 1
        log.warning("offload provider %s raised in %s", ent.name, hook, exc_info=first)

    def _result(
        self,
        ent: _Entry,
        op: Op,
        raised: bool,
        outcome: dict[ConnOffload, str],
        now: float,
        touched: set[ConnOffload],
        follow: list[_Intent],
    ) -> None:
        err, ctx, name, kind = op.err, op.ctx, ent.name, op.kind
        if err:
            self._failures[errno_name(err)] += 1
        else:
            self._c[_DONE[kind]] += 1
        if kind is OpKind.FLUSH:
            if err:  # entries may remain: fall back to one DEL per held conn
                for c in list(ent.held):
                    follow.append((OpKind.DEL, c, frozenset((name,)), True))
            else:
                for c in list(ent.held):
                    self._release(ent, c, touched)
                ent.stale.clear()
            return
        assert ctx is not None
        if kind is OpKind.ADD:  # failures only: _dispatch handles success inline
            if err == _errno.EAGAIN:
                ctx.pending.add(name)
                r = Reason.EAGAIN
            elif err == _errno.ENOSPC:
                r = Reason.ENOSPC
            else:
                r = Reason.PROVIDER_ERROR
            prev = outcome.get(ctx, "")  # several providers: EAGAIN > ENOSPC > error
            if not prev or r == Reason.EAGAIN or (r == Reason.ENOSPC and prev != Reason.EAGAIN):
                outcome[ctx] = r
            if raised or op.result is _RAISED:  # may be half-installed: clean up
                follow.append((OpKind.DEL, ctx, frozenset((name,)), True))
        elif kind is OpKind.DEL:
            self._release(ent, ctx, touched)
            if err and err != _errno.ENOENT:
                ent.stale.add(ctx)
            else:
                ent.stale.discard(ctx)
        elif kind is OpKind.UPD:
            pass  # read by age()
        elif err:  # EST / POLICY refused: the entry may be wrong, take it out
            follow.append((OpKind.DEL, ctx, frozenset((name,)), False))
            self._withdrawn[Reason.PROVIDER_ERROR] += 1

    def _release(self, ent: _Entry, ctx: ConnOffload, touched: set[ConnOffload]) -> None:
        if ent.name in ctx.held:
            ctx.held.discard(ent.name)
            ent.held.discard(ctx)
            if not ctx.held:
                self._n_offloaded -= 1
                ctx.offloaded_at = None
            touched.add(ctx)

    def _sync_seq(self, touched: Iterable[ConnOffload]) -> None:
        """Outside the lock: TCP sequence checking off while held, on otherwise."""
        for ctx in touched:
            off = bool(ctx.held) and not ctx.dead
            if off == ctx.seq_off or ctx.dead:
                continue
            ctx.seq_off = off
            if ctx.conn.proto != TCP:
                continue
            try:
                self.ct.set_seq_check(ctx.conn, not off)
            except Exception:
                self._c["tracker_errors"] += 1
                log.exception("set_seq_check failed")

    # ------------------------------------------------------------------
    # eligibility bookkeeping
    # ------------------------------------------------------------------
    def _ctx(self, conn: Any) -> ConnOffload:
        ext = conn.ext_dict()
        ctx = ext.get("offload")
        if ctx is None:
            nat = conn.nat
            ctx = ConnOffload(
                conn=conn,
                zone=conn.zone,
                orig=conn.orig,
                reply=conn.reply,
                snat=bool(nat is not None and nat.snat),
                dnat=bool(nat is not None and nat.dnat),
                proto_state=conn.state_name,
                mark=conn.mark,
            )
            ext["offload"] = ctx
        return ctx

    @staticmethod
    def _get(conn: Any) -> ConnOffload | None:
        ext = conn.ext
        return ext.get("offload") if ext else None

    @staticmethod
    def _refresh_ctx(ctx: ConnOffload) -> None:
        conn = ctx.conn
        ctx.proto_state = conn.state_name
        ctx.mark = conn.mark

    def _verdict(self, ctx: ConnOffload) -> str:
        """Why ``ctx`` may not be offloaded now ("" = offer it). Cap excluded."""
        if not self._enabled:
            return Reason.DISABLED
        r = self.policy.check(ctx.conn, ctx.dirs)
        if r:
            return r
        if not self._n_enabled:
            return Reason.NO_PROVIDER
        if not ctx.resolved:
            return Reason.NEIGH_UNRESOLVED
        return ""

    def _note(self, ctx: ConnOffload, reason: str) -> None:
        """Record the current refusal reason and file ctx in the retry sets."""
        if reason != ctx.reason:
            ctx.reason = reason
            if reason and reason not in _WAITING_REASONS:
                self._refused[reason] += 1
        if reason in TRANSIENT_REASONS:
            self._watch.add(ctx)
        else:
            self._watch.discard(ctx)
        if reason in _PENDING_REASONS or ctx.pending:
            self._pending.add(ctx)
        else:
            self._pending.discard(ctx)
        if reason == Reason.ENOSPC:
            self._retry.add(ctx)
        else:
            self._retry.discard(ctx)

    def _consider(self, ctx: ConnOffload, targets: frozenset[str] | None = None) -> None:
        """Queue an ADD when ctx is eligible and some enabled provider lacks it."""
        if ctx.dead:
            return
        entries = self._entries
        if ctx.held and all(
            n in ctx.held for n, e in entries.items() if e.enabled and (not targets or n in targets)
        ):
            return
        r = self._verdict(ctx)
        cap = self.policy.max_offloaded
        if not r and not ctx.held and cap is not None and self._n_offloaded >= cap:
            r = Reason.CAP
        if r:
            if not ctx.held:
                self._note(ctx, r)
            return
        self._enqueue(OpKind.ADD, ctx, targets, self._gen)

    def _offer_all(self, now: float, targets: frozenset[str] | None = None) -> None:
        for ctx in list(self._fwd):
            self._consider(ctx, targets)

    def _withdraw_ctx(self, ctx: ConnOffload, reason: str, *, forget: bool) -> bool:
        was = bool(ctx.held)
        if was:
            self._withdrawn[reason] += 1
        self._enqueue(OpKind.DEL, ctx)
        if forget:
            ctx.dirs = [None, None]
            ctx.nexthop = [None, None]
            self._fwd.discard(ctx)
            self._note(ctx, "")
        return was

    # ------------------------------------------------------------------
    # conntrack observer hooks
    # ------------------------------------------------------------------
    def on_created(self, conn: Any, now: float) -> None:
        self._ctx(conn)

    def on_established(self, conn: Any, now: float) -> None:
        ctx = self._ctx(conn)
        if ctx.dead:
            return
        ctx.proto_state = conn.state_name
        if ctx.held:
            self._enqueue(OpKind.EST, ctx)
        self._consider(ctx)
        self._auto(now)

    def on_state_change(self, conn: Any, old: str, new: str, now: float) -> None:
        ctx = self._get(conn)
        if ctx is None or ctx.dead:
            return
        ctx.proto_state = new
        if ctx.held:
            r = self._verdict(ctx)
            if r and r not in _PENDING_REASONS:  # e.g. FIN/RST: TCP left ESTABLISHED
                self._withdraw_ctx(ctx, r, forget=False)
                self._note(ctx, r)
        else:
            self._consider(ctx)
        self._auto(now)

    def on_update(self, conn: Any, pkt: Any, reply: bool, now: float) -> None:
        if not self._watch:
            return
        ext = conn.ext
        ctx = ext.get("offload") if ext else None
        if ctx is not None and ctx in self._watch:
            self._consider(ctx)
            self._auto(now)

    def on_deleted(self, conn: Any, now: float, reason: str) -> None:
        ctx = self._get(conn)
        if ctx is None:
            return
        if not ctx.ever_offloaded and not ctx.held:
            r = ctx.reason or self._verdict(ctx)
            if r in _WAITING_REASONS:
                self._refused[r] += 1
        ctx.dead = True
        self._fwd.discard(ctx)
        self._watch.discard(ctx)
        self._pending.discard(ctx)
        self._retry.discard(ctx)
        if ctx.held:
            self._enqueue(OpKind.DEL, ctx)
            self._auto(now)

    # ------------------------------------------------------------------
    # forwarding decisions and neighbours (called by the datapath)
    # ------------------------------------------------------------------
    def set_forwarding(
        self, conn: Any, reply: bool, fd: FlowDir, now: float, nexthop: bytes | None = None
    ) -> None:
        """The slow path forwarded a packet of ``conn`` in direction ``reply``
        as ``fd``. Cheap when nothing changed; a change on an offloaded
        connection is sent as POLICY (or withdraws it if no longer allowed).
        ``nexthop`` (gateway or destination address) keys neighbour events."""
        ctx = self._ctx(conn)
        if ctx.dead:
            return
        i = 1 if reply else 0
        if fd.match != (ctx.reply if reply else ctx.orig):
            self._refused[Reason.BAD_FORWARDING] += 1
            log.warning("set_forwarding: %s does not match %r", fd.match, conn)
            return
        old = ctx.dirs[i]
        if nexthop is not None:
            ctx.nexthop[i] = nexthop
        if old is not None and _same_dir(old, fd):
            return
        ctx.dirs[i] = fd
        self._fwd.add(ctx)
        self._redecide(ctx)
        self._auto(now)

    def update_forwarding(
        self, conn: Any, reply: bool, fd: FlowDir, now: float, nexthop: bytes | None = None
    ) -> None:
        """A direction's forwarding changed (route, MAC): same as ``set_forwarding``."""
        self.set_forwarding(conn, reply, fd, now, nexthop)

    def _redecide(self, ctx: ConnOffload) -> None:
        """After a forwarding change: POLICY to holders, withdraw, or offer."""
        if ctx.held:
            r = self._verdict(ctx)
            if r:
                self._withdraw_ctx(ctx, r, forget=False)
                self._note(ctx, r)
            else:
                self._enqueue(OpKind.POLICY, ctx)
                self._consider(ctx)
        else:
            self._consider(ctx)

    def _nh_dirs(self, ifindex: int, addr: bytes) -> Iterator[tuple[ConnOffload, int, FlowDir]]:
        for ctx in list(self._fwd):
            for i in (0, 1):
                d = ctx.dirs[i]
                if d is not None and d.out_ifindex == ifindex and ctx.nexthop[i] == addr:
                    yield ctx, i, d

    def neigh_resolved(self, ifindex: int, addr: bytes, mac: bytes, now: float) -> int:
        """Neighbour ``addr`` on ``ifindex`` is (now) at ``mac``: install the
        flows pending on it, rewrite (POLICY) offloaded ones whose MAC changed.
        Returns the number of directions updated."""
        self.begin(now)
        try:
            n = 0
            for ctx, i, d in self._nh_dirs(ifindex, addr):
                if d.dst_mac == mac:
                    continue
                ctx.dirs[i] = FlowDir(
                    d.in_ifindex, d.match, d.out, d.out_ifindex, d.src_mac, mac, d.mtu
                )
                n += 1
                self._redecide(ctx)
        finally:
            self.commit(now)
        return n

    def neigh_gone(self, ifindex: int, addr: bytes, now: float) -> int:
        """Neighbour ``addr`` on ``ifindex`` became invalid: withdraw the flows
        using it; they stay pending until it resolves again."""
        self.begin(now)
        try:
            n = 0
            for ctx, i, d in self._nh_dirs(ifindex, addr):
                if d.dst_mac is None:
                    continue
                ctx.dirs[i] = FlowDir(
                    d.in_ifindex, d.match, d.out, d.out_ifindex, d.src_mac, None, d.mtu
                )
                n += 1
                self._redecide(ctx)
        finally:
            self.commit(now)
        return n

    def retry_pending(self, now: float) -> int:
        """Offer again every pending (EAGAIN, unresolved) and ENOSPC connection,
        and retry failed DELs. Returns the number of connections re-offered."""
        self.begin(now)
        try:
            ctxs = list(self._pending | self._retry)
            for ctx in ctxs:
                ctx.pending.clear()
                self._consider(ctx)
            self._queue_stale()
        finally:
            self.commit(now)
        return len(ctxs)

    def _queue_stale(self) -> None:
        for ent in self._entries.values():
            for ctx in list(ent.stale):
                self._enqueue(OpKind.DEL, ctx, frozenset((ent.name,)), True)

    # ------------------------------------------------------------------
    # withdraw / flush / aging
    # ------------------------------------------------------------------
    def withdraw(self, conn: Any, now: float, reason: str = "manual") -> bool:
        """Take ``conn`` back to the slow path: DEL to its holders, sequence
        checking back on (liberal re-learn). Its forwarding is forgotten, so it
        is offered again only once the slow path has forwarded both directions
        again. Returns whether it was offloaded."""
        ctx = self._get(conn)
        if ctx is None or ctx.dead:
            return False
        was = self._withdraw_ctx(ctx, reason, forget=True)
        self._auto(now)
        return was

    def withdraw_where(self, pred: Callable[[ConnOffload], bool], now: float, reason: str) -> int:
        """``withdraw`` every connection with known forwarding for which
        ``pred(ctx)`` holds. Returns the number that were offloaded."""
        self.begin(now)
        try:
            n = 0
            for ctx in list(self._fwd):
                if pred(ctx):
                    n += self._withdraw_ctx(ctx, reason, forget=True)
        finally:
            self.commit(now)
        return n

    def withdraw_ifindex(self, ifindex: int, now: float, reason: str = "port-down") -> int:
        """Withdraw every connection entering or leaving through ``ifindex``."""
        return self.withdraw_where(
            lambda c: any(
                d is not None and ifindex in (d.in_ifindex, d.out_ifindex) for d in c.dirs
            ),
            now,
            reason,
        )

    def withdraw_mac(self, mac: bytes, now: float, reason: str = "neigh-gone") -> int:
        """Withdraw every connection whose next-hop MAC is ``mac``."""
        return self.withdraw_where(
            lambda c: any(d is not None and d.dst_mac == mac for d in c.dirs), now, reason
        )

    def flush(self, now: float, zone: int | None = None, *, flush_ct: bool = True) -> int:
        """Conntrack flush with offload: one FLUSH per provider (all zones) or
        DELs for the zone's offloaded connections, then (``flush_ct``)
        ``ct.flush(now, zone)``. Returns the number of ops dispatched."""
        self.begin(now)
        try:
            if zone is None:
                self._enqueue(OpKind.FLUSH, None)
            else:
                for ent in self._entries.values():
                    for ctx in list(ent.held):
                        if ctx.zone == zone:
                            self._enqueue(OpKind.DEL, ctx, frozenset((ent.name,)))
        finally:
            n = self.commit(now)
        if flush_ct:
            self.ct.flush(now, zone)
        return n

    def age(self, now: float) -> int:
        """Full read-back: read every provider's last-used times of all the
        connections it holds (``batch_submit`` with UPD ops, else
        ``conn_update_many``), refresh the tracker from the newest, and take
        connections whose read failed back to the slow path (DEL to all
        holders). Failed DELs are retried. Returns the number of connections
        refreshed. O(offloaded): the aging tick does not call it (the tracker
        asks ``last_used`` lazily, at each deadline); ``save_state`` does, so
        the exported expiries are current."""
        best: dict[ConnOffload, float] = {}
        bad: set[ConnOffload] = set()
        touched: set[ConnOffload] = set()
        with self._lock:
            self._c["agings"] += 1
            for ent in list(self._entries.values()):
                ctxs = [c for c in ent.held if not c.dead]
                if not ctxs:
                    continue
                for ctx, err, t in self._read_last_used(ent, ctxs):
                    if err:
                        self._failures[errno_name(err)] += 1
                        bad.add(ctx)
                    else:
                        self._c["updates"] += 1
                        if t is not None and t > best.get(ctx, float("-inf")):
                            best[ctx] = t
            rounds: list[_Intent] = []
            for ctx in bad:
                self._withdrawn["aging-error"] += 1
                rounds.append((OpKind.DEL, ctx, None, False))
            for ent in self._entries.values():
                for ctx in ent.stale:
                    rounds.append((OpKind.DEL, ctx, frozenset((ent.name,)), True))
            while rounds:
                batches, outcome = self._resolve(rounds)
                rounds, _ = self._dispatch(batches, outcome, now, touched)
            for ctx in bad:  # offered again only after the slow path forwards it again
                ctx.dirs = [None, None]
                self._fwd.discard(ctx)
                self._note(ctx, "")
        self._sync_seq(touched)
        n = 0
        for ctx, t in best.items():
            if ctx.dead:
                continue
            try:
                self.ct.refresh(ctx.conn, t)
                n += 1
            except Exception:
                self._c["tracker_errors"] += 1
                log.exception("ct.refresh failed")
        return n

    def last_used(self, conns: list[Any], now: float) -> list[float | None]:
        """The lazy re-arm source the tracker calls for connections whose
        deadline came (``ct.set_rearm``; see ``ctxdp.conntrack.table``): per
        connection, aligned with ``conns``, the newest last-used time among
        the providers holding it, or None (not offloaded, or the fast path
        never forwarded it). One ``conn_update_many`` per provider (the XDP
        provider reads its mmap'ed slots: no syscall). A connection whose read
        fails is taken back to the slow path (``aging-error``: DEL to all
        holders, forwarding forgotten) and counts as used at ``now``, so it
        gets one more timeout in the slow path instead of being cut while it
        may be busy."""
        out: list[float | None] = [None] * len(conns)
        # Comprehensions, not a loop with appends: at 1M due connections
        # (all created in the same second) this is a good part of the sweep.
        ctxs = [x for c in conns
                if (e := c.ext) and (x := e.get("offload")) is not None and x.held and not x.dead]
        if not ctxs:
            return out
        bad: list[ConnOffload] = []
        with self._lock:
            entries = self._entries
            if len(entries) == 1 and len(ctxs) == len(conns):
                # The common case, written out: one provider holds them all.
                (ent,) = entries.values()
                errs, times = self._read_many(ent, ctxs)
                if not any(errs):
                    self._c["updates"] += len(ctxs)
                    return times
            if len(ctxs) == len(conns):
                idx: list[int] = list(range(len(conns)))
            else:
                xs = [e.get("offload") if (e := c.ext) else None for c in conns]
                idx = [i for i, x in enumerate(xs) if x is not None and x.held and not x.dead]
            for ent in entries.values():
                if not ent.held:
                    continue
                name = ent.name
                if len(entries) == 1:
                    mine, pos = ctxs, idx
                else:
                    sel = [k for k, c in enumerate(ctxs) if name in c.held]
                    mine, pos = [ctxs[k] for k in sel], [idx[k] for k in sel]
                if not mine:
                    continue
                for i, ctx, err, t in zip(pos, mine, *self._read_many(ent, mine), strict=True):
                    if err:
                        self._failures[errno_name(err)] += 1
                        bad.append(ctx)
                        out[i] = now
                    elif t is not None:
                        prev = out[i]
                        if prev is None or t > prev:
                            out[i] = t
            self._c["updates"] += len(ctxs) - len(bad)
        if bad:
            for ctx in bad:
                if ctx.held:
                    self._withdraw_ctx(ctx, "aging-error", forget=True)
            self._auto(now)
        return out

    def _read_many(
        self, ent: _Entry, ctxs: list[ConnOffload]
    ) -> tuple[list[int], list[float | None]]:
        """(errnos, last-used times) of ``ctxs`` from one provider: one bulk
        ``conn_update_many``, else one ``conn_update`` each (so one bad entry
        does not hide the others)."""
        try:
            res = list(ent.provider.conn_update_many(ctxs))
            if len(res) != len(ctxs):
                raise ValueError("conn_update_many returned a wrong number of results")
            return [0] * len(ctxs), res
        except Exception:
            pass
        errs: list[int] = []
        times: list[float | None] = []
        for ctx in ctxs:
            try:
                times.append(ent.provider.conn_update(ctx))
                errs.append(0)
            except ProviderError as e:
                times.append(None)
                errs.append(e.errno or _errno.EIO)
            except Exception:
                self._provider_raised(ent, "conn_update")
                times.append(None)
                errs.append(_errno.EIO)
        return errs, times

    def refresh(self, conns: list[Any], now: float) -> int:
        """Push the tracker's expiry of ``conns`` to what the fast path last
        saw (``last_used`` + ``ct.refresh``), e.g. before listing them; the
        lazy re-arm would do it anyway at their deadline. Returns how many
        moved."""
        n = 0
        for conn, t in zip(conns, self.last_used(conns, now), strict=True):
            if t is not None:
                try:
                    self.ct.refresh(conn, t)
                    n += 1
                except Exception:
                    self._c["tracker_errors"] += 1
                    log.exception("ct.refresh failed")
        return n

    def fold_counters(self, conns: Iterable[Any] | None = None) -> int:
        """Add what the fast path forwarded since the last fold to the
        connections' ``pkts`` / ``bytes`` now: of ``conns``, or (None) of every
        offloaded connection, through each provider's optional
        ``fold_counters``. Counters are folded on demand (conntrack listing,
        state export) and by the providers themselves just before an entry is
        deleted or rewritten, never per aging tick. Returns the number of
        (provider, connection) folds."""
        n = 0
        with self._lock:
            for ent in self._entries.values():
                fn = getattr(ent.provider, "fold_counters", None)
                if fn is None or not ent.held:
                    continue
                ctxs = None
                if conns is not None:
                    ctxs = []
                    for c in conns:
                        ext = c.ext
                        ctx = ext.get("offload") if ext else None
                        if ctx is not None and ent.name in ctx.held:
                            ctxs.append(ctx)
                    if not ctxs:
                        continue
                try:
                    n += int(fn(ctxs) or 0)
                except ProviderError as e:
                    self._failures[errno_name(e.errno or _errno.EIO)] += 1
                    log.warning("folding %s counters: %s", ent.name, e)
                except Exception:
                    self._provider_raised(ent, "fold_counters")
        return n

    def _read_last_used(
        self, ent: _Entry, ctxs: list[ConnOffload]
    ) -> list[tuple[ConnOffload, int, float | None]]:
        if ent.batch_submit is not None:
            batch = Batch([Op(OpKind.UPD, c) for c in ctxs])
            self._call(ent, batch)
            self._c["ops"] += len(batch.ops)
            return [(op.ctx, op.err, op.result) for op in batch.ops]  # type: ignore[misc]
        try:
            res = list(ent.provider.conn_update_many(ctxs))
            if len(res) != len(ctxs):
                raise ValueError("conn_update_many returned a wrong number of results")
            self._c["ops"] += len(ctxs)
            return [(c, 0, t) for c, t in zip(ctxs, res, strict=True)]
        except Exception:  # one bad entry must not hide the others: go one by one
            pass
        batch = Batch([Op(OpKind.UPD, c) for c in ctxs])
        for op in batch.ops:
            try:
                op.result = ent.provider.conn_update(op.ctx)
            except ProviderError as e:
                op.err = e.errno or _errno.EIO
            except Exception:
                self._provider_raised(ent, "conn_update")
                op.err = _errno.EIO
        self._c["ops"] += len(batch.ops)
        return [(op.ctx, op.err, op.result) for op in batch.ops]  # type: ignore[misc]

    def _close_provider(self, ent: _Entry) -> None:
        try:
            ent.provider.close()
        except Exception:
            self._provider_raised(ent, "close")

    # ------------------------------------------------------------------
    # lookups and stats
    # ------------------------------------------------------------------
    def is_offloaded(self, conn: Any) -> bool:
        ctx = self._get(conn)
        return bool(ctx is not None and ctx.held)

    def ctx(self, conn: Any) -> ConnOffload | None:
        """The connection's offload context, if the manager has seen it."""
        return self._get(conn)

    def reason(self, conn: Any) -> str:
        """ "offloaded", or why not (a ``Reason``), "" if never evaluated."""
        ctx = self._get(conn)
        if ctx is None:
            return ""
        return "offloaded" if ctx.held else ctx.reason

    def offloaded(self, provider: str | None = None) -> list[ConnOffload]:
        """Contexts held by ``provider`` (or by any provider)."""
        if provider is not None:
            return list(self._entries[provider].held)
        out: set[ConnOffload] = set()
        for e in self._entries.values():
            out |= e.held
        return list(out)

    def pending(self) -> list[ConnOffload]:
        return list(self._pending)

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: op counters, failures by errno, refusal and withdraw
        reasons, provider exceptions, and the current offloaded/pending counts."""
        s: dict[str, Any] = {
            k: self._c[k]
            for k in ("adds", "dels", "ests", "policies", "updates", "flushes", "batches", "ops")
        }
        s["agings"] = self._c["agings"]
        s["tracker_errors"] = self._c["tracker_errors"]
        s["failures"] = dict(self._failures)
        s["not_offloaded"] = dict(self._refused)
        s["withdrawn"] = dict(self._withdrawn)
        s["provider_errors"] = dict(self._perrors)
        s["offloaded"] = self._n_offloaded
        s["pending"] = len(self._pending)
        s["stale"] = sum(len(e.stale) for e in self._entries.values())
        return s
