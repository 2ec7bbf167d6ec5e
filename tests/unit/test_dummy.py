"""Unit tests for ctxdp.providers.dummy: the in-memory reference provider."""

from __future__ import annotations

import errno
import time

import pytest

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers.base import Batch, FlowDir, OffloadCtx, Op, OpKind, ProviderError
from ctxdp.providers.dummy import DummyProvider

A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 1, 2])
MAC = bytes.fromhex("020000000001")


def ctx(sport: int = 1000, *, zone: int = 0, resolved: bool = True) -> OffloadCtx:
    orig = FlowTuple(4, 6, A, B, sport, 80)
    reply = orig.reverse()
    c = OffloadCtx(conn=None, zone=zone, orig=orig, reply=reply)
    c.dirs = [
        FlowDir(1, orig, orig, 2, MAC, MAC if resolved else None),
        FlowDir(2, reply, reply, 1, MAC, MAC),
    ]
    return c


class ConnLike:
    def __init__(self, c: OffloadCtx) -> None:
        self.zone, self.orig = c.zone, c.orig


def test_add_del_roundtrip_and_call_log():
    """conn_add holds the conn, conn_del releases it, every call is recorded in order."""
    p = DummyProvider()
    c = ctx()
    assert p.conn_add(c) == 0 and p.holds(c)
    assert p.conn_del(c) == 0 and not p.holds(c)
    assert p.calls == [("conn_add", c), ("conn_del", c)]
    assert p.stats() == {"held": 0, "adds": 1, "dels": 1}


def test_errno_contract():
    """EEXIST on re-add, EAGAIN when unresolved, ENOENT for del/est/policy of unknown."""
    p = DummyProvider()
    c = ctx()
    p.conn_add(c)
    assert p.conn_add(c) == errno.EEXIST
    assert p.conn_add(ctx(2, resolved=False)) == errno.EAGAIN
    other = ctx(3)
    assert p.conn_del(other) == errno.ENOENT
    assert p.conn_established(other) == errno.ENOENT
    assert p.conn_policy(other) == errno.ENOENT
    assert p.conn_established(c) == 0


def test_same_tuple_in_two_zones_is_two_entries():
    """Entries are keyed by zone and original tuple."""
    p = DummyProvider()
    assert p.conn_add(ctx(zone=1)) == 0 and p.conn_add(ctx(zone=2)) == 0
    assert len(p.held) == 2


def test_capacity_gives_enospc():
    """A full provider answers ENOSPC and holds nothing more."""
    p = DummyProvider(capacity=2)
    assert [p.conn_add(ctx(i)) for i in range(3)] == [0, 0, errno.ENOSPC]
    assert len(p.held) == 2


def test_policy_replaces_the_entry():
    """conn_policy stores the new forwarding decision; unresolved is EAGAIN."""
    p = DummyProvider()
    c = ctx()
    p.conn_add(c)
    c2 = ctx()
    assert p.conn_policy(c2) == 0 and p.held[p.key(c)] is c2
    assert p.conn_policy(ctx(resolved=False)) == errno.EAGAIN


def test_touch_and_conn_update_simulate_last_used():
    """touch() by ctx, conn, key or either tuple sets last-used; it never goes back."""
    p = DummyProvider()
    c = ctx()
    p.conn_add(c)
    assert p.conn_update(c) is None
    assert p.touch(c, 5.0) and p.conn_update(c) == 5.0
    assert p.touch(c.reply, 7.0) and p.conn_update(c) == 7.0
    assert p.touch(ConnLike(c), 6.0) and p.conn_update(c) == 7.0
    assert p.touch((0, c.orig), 9.0) and p.conn_update(c) == 9.0
    assert not p.touch(ctx(2), 9.0)  # not held: the fast path cannot see it


def test_conn_update_of_unknown_raises_enoent():
    """Reading a conn the provider does not hold raises ProviderError(ENOENT)."""
    p = DummyProvider()
    with pytest.raises(ProviderError) as ei:
        p.conn_update(ctx())
    assert ei.value.errno == errno.ENOENT


def test_update_many_reads_every_conn():
    """conn_update_many returns one last-used per ctx, in order."""
    p = DummyProvider()
    cs = [ctx(i) for i in range(3)]
    for c in cs:
        p.conn_add(c)
    p.touch(cs[1], 4.0)
    assert p.conn_update_many(cs) == [None, 4.0, None]


def test_fail_next_errno_then_recovers():
    """fail_next returns the errno for count calls, then the hook works again."""
    p = DummyProvider()
    p.fail_next("conn_add", errno.EIO, count=2)
    assert p.conn_add(ctx(1)) == errno.EIO and p.conn_add(ctx(2)) == errno.EIO
    assert p.conn_add(ctx(3)) == 0
    assert p.counters["fault_conn_add"] == 2 and len(p.held) == 1


def test_fail_next_exception_raises():
    """fail_next with an exception raises it from the hook."""
    p = DummyProvider()
    p.fail_next("conn_del", RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        p.conn_del(ctx())


def test_fail_on_conn_update_raises_provider_error():
    """An injected errno on conn_update is raised as ProviderError with that errno."""
    p = DummyProvider()
    c = ctx()
    p.conn_add(c)
    p.fail_next("conn_update", errno.EIO)
    with pytest.raises(ProviderError) as ei:
        p.conn_update(c)
    assert ei.value.errno == errno.EIO


def test_fail_if_rule_until_cleared():
    """fail_if fails matching ctxs only, every time, until clear_faults."""
    p = DummyProvider()
    p.fail_if("conn_add", lambda c: c.orig.sport == 2, errno.EAGAIN)
    assert [p.conn_add(ctx(i)) for i in (1, 2, 2)] == [0, errno.EAGAIN, errno.EAGAIN]
    p.clear_faults()
    assert p.conn_add(ctx(2)) == 0


def test_slow_provider_sleeps_per_op():
    """delay makes every op take at least that long."""
    p = DummyProvider(delay=0.02)
    t0 = time.monotonic()
    p.conn_add(ctx(1))
    p.conn_add(ctx(2))
    assert time.monotonic() - t0 >= 0.04


def test_batch_flag_controls_batch_submit():
    """Only batch=True instances have batch_submit (the manager's dispatch switch)."""
    assert not hasattr(DummyProvider(), "batch_submit")
    assert callable(DummyProvider(batch=True).batch_submit)


def test_batch_submit_sets_every_op_result():
    """batch_submit fills err per op (ENOSPC among oks) and result for UPD."""
    p = DummyProvider(batch=True, capacity=2)
    c1, c2, c3 = ctx(1), ctx(2), ctx(3)
    b = Batch([Op(OpKind.ADD, c1), Op(OpKind.ADD, c2), Op(OpKind.ADD, c3)])
    p.batch_submit(b)
    assert [op.err for op in b] == [0, 0, errno.ENOSPC]
    p.touch(c1, 3.0)
    b2 = Batch(
        [
            Op(OpKind.UPD, c1),
            Op(OpKind.UPD, c3),
            Op(OpKind.EST, c2),
            Op(OpKind.POLICY, c2),
            Op(OpKind.DEL, c2),
            Op(OpKind.FLUSH, None),
        ]
    )
    p.batch_submit(b2)
    assert [(op.err, op.result) for op in b2] == [
        (0, 3.0),
        (errno.ENOENT, None),
        (0, None),
        (0, None),
        (0, None),
        (0, None),
    ]
    assert p.batches == [3, 6] and not p.held
    assert [h for h, _ in p.calls][-6:] == [
        "conn_update",
        "conn_update",
        "conn_established",
        "conn_policy",
        "conn_del",
        "flush",
    ]


def test_batch_submit_fault_for_whole_batch():
    """fail_next('batch_submit', errno) fails every op; an exception is raised."""
    p = DummyProvider(batch=True)
    b = Batch([Op(OpKind.ADD, ctx(1)), Op(OpKind.ADD, ctx(2))])
    p.fail_next("batch_submit", errno.EIO)
    p.batch_submit(b)
    assert [op.err for op in b] == [errno.EIO, errno.EIO] and not p.held
    p.fail_next("batch_submit", RuntimeError("driver"))
    with pytest.raises(RuntimeError):
        p.batch_submit(Batch([Op(OpKind.ADD, ctx(3))]))


def test_flush_close_and_init():
    """flush empties the table; close releases it and marks the provider closed."""
    p = DummyProvider()
    assert p.init() == 0
    p.conn_add(ctx(1))
    p.touch(ctx(1), 1.0)
    assert p.flush() == 0 and not p.held and not p.last_used
    p.conn_add(ctx(2))
    p.close()
    assert p.closed and not p.held
    assert p.hooks() == ["init", "conn_add", "flush", "conn_add", "close"]


def test_can_offload_predicate():
    """accept= is the provider's can_offload."""
    p = DummyProvider(accept=lambda c: c.zone == 1)
    assert p.can_offload(ctx(zone=1)) and not p.can_offload(ctx(zone=2))
    assert DummyProvider().can_offload(ctx())


def test_record_false_keeps_no_call_log():
    """record=False (daemon/bench use) keeps the table but not the call log."""
    p = DummyProvider(record=False)
    p.conn_add(ctx())
    assert p.calls == [] and len(p.held) == 1


def test_native_batch_path_matches_single_calls():
    """Without call log or faults batch_submit takes its fast path with the same errnos."""
    p = DummyProvider(batch=True, capacity=2, record=False)
    c1 = ctx(1)
    b = Batch(
        [
            Op(OpKind.ADD, c1),
            Op(OpKind.ADD, c1),
            Op(OpKind.ADD, ctx(2, resolved=False)),
            Op(OpKind.ADD, ctx(3)),
            Op(OpKind.ADD, ctx(4)),
        ]
    )
    p.batch_submit(b)
    assert [op.err for op in b] == [0, errno.EEXIST, errno.EAGAIN, 0, errno.ENOSPC]
    assert len(p.held) == 2 and p.stats()["adds"] == 2
