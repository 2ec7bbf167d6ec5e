"""In-memory offload provider: the reference provider, with fault injection.

Contract:
- Holds offloaded connections in a dict keyed by ``(zone, orig)``; a real,
  complete provider (the daemon uses it when XDP is unavailable), it follows
  ``ctxdp.providers.base`` exactly: ``conn_add`` returns 0, ``EEXIST`` (already
  held), ``EAGAIN`` (a direction missing or its next hop unresolved),
  ``ENOSPC`` (``capacity`` reached); ``conn_del`` / ``conn_established`` /
  ``conn_policy`` return ``ENOENT`` for a connection it does not hold;
  ``conn_update`` returns the simulated last-used time (None if never
  touched) or raises ``ProviderError(ENOENT)``.
- ``calls`` records every hook invocation as ``(hook, ctx)`` (``ctx`` is None
  for ``flush``/``init``/``close``), in order, whether it came through a
  batch or a single call; ``batches`` records the size of every
  ``batch_submit``.
- ``touch(x, t)`` simulates fast-path traffic: ``x`` is a connection, an
  ``OffloadCtx``, a ``(zone, FlowTuple)`` key or a ``FlowTuple`` of either
  direction. A touch of a connection the provider does not hold is ignored
  (the fast path cannot see it) and returns False.
- Faults: ``fail_next(hook, err, count)`` makes the next ``count`` calls of
  ``hook`` fail with errno ``err`` (returned, or raised as ``ProviderError``
  for ``conn_update``) or raise ``err`` when it is an exception;
  ``fail_if(hook, pred, err)`` fails every call whose ctx matches ``pred``
  until ``clear_faults()``; ``capacity`` gives ENOSPC; ``delay`` sleeps per
  operation (a slow provider, to show lock/batch behaviour).
- ``batch=True`` gives the instance a ``batch_submit`` (one call per batch,
  per-op results); without it the manager dispatches op by op.
- Not thread-safe by itself: the offload manager serialises calls under its
  lock.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers.base import Batch, OffloadCtx, OpKind, Provider, ProviderError

__all__ = ["DummyProvider"]

Key = tuple[int, FlowTuple]
Fault = int | BaseException | type[BaseException]

_HOOK_OF = {
    OpKind.ADD: "conn_add",
    OpKind.DEL: "conn_del",
    OpKind.EST: "conn_established",
    OpKind.POLICY: "conn_policy",
    OpKind.UPD: "conn_update",
    OpKind.FLUSH: "flush",
}


class DummyProvider(Provider):
    """In-memory provider; see the module contract."""

    def __init__(
        self,
        name: str = "dummy",
        *,
        capacity: int | None = None,
        batch: bool = False,
        delay: float = 0.0,
        accept: Callable[[OffloadCtx], bool] | None = None,
        record: bool = True,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.delay = delay
        self.accept = accept  # can_offload predicate; None = everything
        self.record = record
        self.held: dict[Key, OffloadCtx] = {}
        self.last_used: dict[Key, float] = {}
        self.calls: list[tuple[str, OffloadCtx | None]] = []
        self.batches: list[int] = []
        self.counters: dict[str, int] = {}  # injected faults, flushes
        self.n_adds = 0
        self.n_dels = 0
        self._next: dict[str, list[Fault]] = {}
        self._rules: list[tuple[str, Callable[[OffloadCtx], bool], Fault]] = []
        self.closed = False
        if batch:
            self.batch_submit = self._batch_submit
        if accept is not None:  # else the base hook: the manager skips the call
            self.can_offload = lambda ctx: bool(accept(ctx))  # type: ignore[method-assign]

    # -- fault injection -------------------------------------------------------
    def fail_next(self, hook: str, err: Fault, count: int = 1) -> None:
        """The next ``count`` calls of ``hook`` fail with ``err`` (errno or exception)."""
        self._next.setdefault(hook, []).extend([err] * count)

    def fail_if(self, hook: str, pred: Callable[[OffloadCtx], bool], err: Fault) -> None:
        """Every call of ``hook`` whose ctx satisfies ``pred`` fails with ``err``."""
        self._rules.append((hook, pred, err))

    def clear_faults(self) -> None:
        self._next.clear()
        self._rules.clear()

    def _fault(self, hook: str, ctx: OffloadCtx | None) -> int:
        """0, or the injected errno; raises an injected exception."""
        err: Fault | None = None
        q = self._next.get(hook)
        if q:
            err = q.pop(0)
        elif ctx is not None:
            for h, pred, e in self._rules:
                if h == hook and pred(ctx):
                    err = e
                    break
        if err is None:
            return 0
        if isinstance(err, int):
            self._count(f"fault_{hook}")
            return err
        self._count(f"raise_{hook}")
        raise err

    # -- bookkeeping -------------------------------------------------------------
    def _count(self, k: str) -> None:
        self.counters[k] = self.counters.get(k, 0) + 1

    def _enter(self, hook: str, ctx: OffloadCtx | None) -> int:
        if self.record:
            self.calls.append((hook, ctx))
        if self.delay:
            time.sleep(self.delay)
        if self._next or self._rules:
            return self._fault(hook, ctx)
        return 0

    @staticmethod
    def key(ctx: OffloadCtx) -> Key:
        return (ctx.zone, ctx.orig)

    def holds(self, x: Any) -> bool:
        k = self._resolve(x)
        return k is not None and k in self.held

    def hooks(self, hook: str | None = None) -> list[str] | list[OffloadCtx | None]:
        """Hook names called, or with ``hook`` the ctxs it was called with."""
        if hook is None:
            return [h for h, _ in self.calls]
        return [c for h, c in self.calls if h == hook]

    def _resolve(self, x: Any) -> Key | None:
        if isinstance(x, FlowTuple):
            for k, ctx in self.held.items():
                if ctx.orig == x or ctx.reply == x:
                    return k
            return None
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], FlowTuple):
            return (x[0], x[1])
        if isinstance(x, OffloadCtx):
            return self.key(x)
        if hasattr(x, "zone") and hasattr(x, "orig"):  # a conntrack Conn
            return (x.zone, x.orig)
        return None

    def touch(self, x: Any, t: float) -> bool:
        """Simulate the fast path forwarding a packet of ``x`` at time ``t``."""
        k = self._resolve(x)
        if k is None or k not in self.held:
            return False
        if t > self.last_used.get(k, float("-inf")):
            self.last_used[k] = t
        return True

    # -- provider hooks ----------------------------------------------------------
    def init(self) -> int:
        self.closed = False
        return self._enter("init", None)

    def conn_add(self, ctx: OffloadCtx) -> int:
        err = self._enter("conn_add", ctx)
        if err:
            return err
        k = self.key(ctx)
        held = self.held
        if k in held:
            return errno.EEXIST
        if not ctx.resolved:
            return errno.EAGAIN
        if self.capacity is not None and len(held) >= self.capacity:
            return errno.ENOSPC
        held[k] = ctx
        self.n_adds += 1
        return 0

    def conn_del(self, ctx: OffloadCtx) -> int:
        err = self._enter("conn_del", ctx)
        if err:
            return err
        k = self.key(ctx)
        if self.held.pop(k, None) is None:
            return errno.ENOENT
        self.last_used.pop(k, None)
        self.n_dels += 1
        return 0

    def conn_established(self, ctx: OffloadCtx) -> int:
        err = self._enter("conn_established", ctx)
        if err:
            return err
        return 0 if self.key(ctx) in self.held else errno.ENOENT

    def conn_policy(self, ctx: OffloadCtx) -> int:
        err = self._enter("conn_policy", ctx)
        if err:
            return err
        k = self.key(ctx)
        if k not in self.held:
            return errno.ENOENT
        if not ctx.resolved:
            return errno.EAGAIN
        self.held[k] = ctx
        return 0

    def conn_update(self, ctx: OffloadCtx) -> float | None:
        err = self._enter("conn_update", ctx)
        if err:
            raise ProviderError(err, f"{self.name}: injected {errno.errorcode.get(err, err)}")
        k = self.key(ctx)
        if k not in self.held:
            raise ProviderError(errno.ENOENT, f"{self.name}: {ctx.orig} not held")
        return self.last_used.get(k)

    def flush(self) -> int:
        err = self._enter("flush", None)
        if err:
            return err
        self.held.clear()
        self.last_used.clear()
        self._count("flushes")
        return 0

    def close(self) -> None:
        if self.record:
            self.calls.append(("close", None))
        self.held.clear()
        self.last_used.clear()
        self.closed = True

    def stats(self) -> dict[str, int]:
        return {"held": len(self.held), "adds": self.n_adds, "dels": self.n_dels, **self.counters}

    # -- batch -------------------------------------------------------------------
    def _batch_submit(self, batch: Batch) -> None:
        """Native batch: every op gets its own ``err`` (and ``result`` for UPD)."""
        self.batches.append(len(batch.ops))
        bf = self._next.get("batch_submit")
        if bf:
            err = bf.pop(0)
            if not isinstance(err, int):
                raise err
            for op in batch.ops:
                op.err = err
            return
        fast = not (self.record or self.delay or self._next or self._rules)
        held, cap = self.held, self.capacity
        for op in batch.ops:
            kind = op.kind
            if fast and kind is OpKind.ADD:  # native path: no per-op call overhead
                ctx = op.ctx
                k = (ctx.zone, ctx.orig)  # type: ignore[union-attr]
                if k in held:
                    op.err = errno.EEXIST
                elif not ctx.resolved:  # type: ignore[union-attr]
                    op.err = errno.EAGAIN
                elif cap is not None and len(held) >= cap:
                    op.err = errno.ENOSPC
                else:
                    held[k] = ctx  # type: ignore[assignment]
                    self.n_adds += 1
                continue
            if kind is OpKind.UPD:
                try:
                    op.result = self.conn_update(op.ctx)  # type: ignore[arg-type]
                except ProviderError as e:
                    op.err = e.errno
                continue
            hook = getattr(self, _HOOK_OF[kind])
            op.err = hook() if kind is OpKind.FLUSH else hook(op.ctx)
