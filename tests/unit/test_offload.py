"""Unit tests for ctxdp.offload with the dummy provider: first against a
minimal fake tracker (so every event ordering can be driven directly), then
(last section) against the real ``ctxdp.conntrack`` tracker fed with
scapy-built packets, which is the integration that matters."""

from __future__ import annotations

import errno
import ipaddress
import threading
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctxdp.conntrack import CS, ConnTracker, CtConfig, NatAction
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.eligibility import EligibilityPolicy, Reason
from ctxdp.offload import ConnOffload, OffloadManager, flow_dir
from ctxdp.packet import parse
from ctxdp.providers.base import Batch, Op, OpKind, Provider, ProviderError
from ctxdp.providers.dummy import DummyProvider

A = bytes([10, 0, 0, 1])
B = bytes([10, 0, 1, 2])
NAT = bytes([192, 0, 2, 1])
MAC_R0 = bytes.fromhex("020000000001")  # router port 1
MAC_R1 = bytes.fromhex("020000000002")  # router port 2
MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
MAC_B2 = bytes.fromhex("02000000000c")
IF_A, IF_B = 11, 12


# ---------------------------------------------------------------------------
# fake tracker: just the Conn attributes and ConnTracker methods the manager uses
# ---------------------------------------------------------------------------
class FakeNat:
    def __init__(self, snat: bool, dnat: bool) -> None:
        self.snat, self.dnat = snat, dnat


class FakeConn:
    def __init__(self, sport: int, *, proto: int = 6, zone: int = 0, snat: bool = False) -> None:
        self.orig = FlowTuple(4, proto, A, B, sport, 80)
        self.reply = FlowTuple(4, proto, B, NAT if snat else A, 80, sport)
        self.proto = proto
        self.zone = zone
        self.nat = FakeNat(True, False) if snat else None
        self.state_name = "SYN_SENT" if proto == 6 else "FIRST"
        self.established = False
        self.mark = 0
        self.helper: str | None = None
        self.parent = None
        self.children = 0
        self.pkts = [1, 0]
        self.ext: dict | None = None
        self.seq_check = True

    def ext_dict(self) -> dict:
        if self.ext is None:
            self.ext = {}
        return self.ext


class FakeCt:
    """Records the tracker calls the manager makes; fires observer hooks on demand."""

    def __init__(self) -> None:
        self.obs: list = []
        self.table: list[FakeConn] = []
        self.seq: list[tuple[FakeConn, bool]] = []
        self.refreshed: list[tuple[FakeConn, float]] = []
        self.flushed: list[int | None] = []

    def add_observer(self, o) -> None:
        self.obs.append(o)

    def set_seq_check(self, conn, enabled: bool) -> None:
        conn.seq_check = enabled
        self.seq.append((conn, enabled))

    def refresh(self, conn, last_used: float) -> None:
        self.refreshed.append((conn, last_used))

    def conns(self, zone=None):
        return [c for c in self.table if zone is None or c.zone == zone]

    def flush(self, now: float, zone=None) -> None:
        self.flushed.append(zone)
        for c in list(self.conns(zone)):
            self.delete(c, now, "flush")

    # -- event drivers -------------------------------------------------------
    def new(self, sport: int, now: float = 0.0, **kw) -> FakeConn:
        c = FakeConn(sport, **kw)
        self.table.append(c)
        for o in self.obs:
            o.on_created(c, now)
        return c

    def establish(self, c: FakeConn, now: float = 1.0) -> None:
        old = c.state_name
        c.state_name = "ESTABLISHED" if c.proto == 6 else "BIDIR"
        c.established = True
        c.pkts = [max(c.pkts[0], 2), max(c.pkts[1], 1)]
        for o in self.obs:
            o.on_state_change(c, old, c.state_name, now)
            o.on_established(c, now)

    def state(self, c: FakeConn, new: str, now: float = 2.0) -> None:
        old, c.state_name = c.state_name, new
        c.established = new in ("ESTABLISHED", "BIDIR")
        for o in self.obs:
            o.on_state_change(c, old, new, now)

    def packet(self, c: FakeConn, reply: bool = False, now: float = 2.0) -> None:
        c.pkts[int(reply)] += 1
        for o in self.obs:
            o.on_update(c, None, reply, now)

    def delete(self, c: FakeConn, now: float = 3.0, reason: str = "expired") -> None:
        self.table.remove(c)
        for o in self.obs:
            o.on_deleted(c, now, reason)


def fwd(mgr: OffloadManager, c, *, dst_b: bytes | None = MAC_B, now: float = 1.0, **kw) -> None:
    """The slow path forwarded both directions of ``c`` (A on IF_A <-> B on IF_B)."""
    mgr.set_forwarding(c, False, flow_dir(c, False, IF_A, IF_B, MAC_R1, dst_b), now, nexthop=B)
    mgr.set_forwarding(c, True, flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A), now, nexthop=A)


def setup(*providers: Provider, policy: EligibilityPolicy | None = None, **kw):
    ct = FakeCt()
    provs = list(providers) or [DummyProvider()]
    mgr = OffloadManager(ct, provs, policy, **kw)
    return ct, mgr, provs[0]


def offloaded_conn(ct: FakeCt, mgr: OffloadManager, sport: int = 1000, **kw) -> FakeConn:
    c = ct.new(sport, **kw)
    ct.establish(c)
    fwd(mgr, c)
    return c


both = pytest.mark.parametrize("batch", [False, True], ids=["per-op", "batch_submit"])


# ---------------------------------------------------------------------------
# item 1: registry
# ---------------------------------------------------------------------------
def test_manager_registers_as_observer_and_lists_providers():
    """The manager observes the tracker and keeps every registered provider."""
    a, b = DummyProvider("a"), DummyProvider("b")
    ct, mgr, _ = setup(a, b)
    assert ct.obs == [mgr]
    assert mgr.providers() == [a, b]
    assert mgr.provider("b") is b
    assert a.hooks() == ["init"] and b.hooks() == ["init"]


def test_several_providers_each_enabled_on_its_own():
    """A disabled provider is not offered connections; an enabled one is."""
    a, b = DummyProvider("a"), DummyProvider("b")
    ct, mgr, _ = setup(a, b)
    mgr.disable_provider("b", 0.0)
    c = offloaded_conn(ct, mgr)
    assert a.holds(c) and not b.holds(c)
    assert mgr.ctx(c).held == {"a"}
    assert not mgr.provider_enabled("b") and mgr.provider_enabled("a")


def test_both_enabled_providers_hold_the_connection():
    """With two enabled providers both are offered and both hold the connection."""
    a, b = DummyProvider("a"), DummyProvider("b", batch=True)
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    assert mgr.ctx(c).held == {"a", "b"}
    assert mgr.stats["offloaded"] == 1 and mgr.stats["adds"] == 2


def test_provider_init_failure_raises_and_is_not_registered():
    """A provider whose init fails is refused with ProviderError carrying the errno."""
    bad = DummyProvider("bad")
    bad.fail_next("init", errno.ENODEV)
    ct = FakeCt()
    mgr = OffloadManager(ct)
    with pytest.raises(ProviderError) as ei:
        mgr.add_provider(bad)
    assert ei.value.errno == errno.ENODEV
    assert mgr.providers() == []


def test_provider_init_raising_is_wrapped_as_eio():
    """A provider whose init raises is refused as EIO, not with its exception."""
    bad = DummyProvider("bad")
    bad.fail_next("init", RuntimeError("boom"))
    mgr = OffloadManager(FakeCt())
    with pytest.raises(ProviderError) as ei:
        mgr.add_provider(bad)
    assert ei.value.errno == errno.EIO


def test_duplicate_provider_name_is_rejected():
    """Two providers may not share a name (holders are tracked by name)."""
    ct, mgr, _ = setup(DummyProvider("x"))
    with pytest.raises(ValueError):
        mgr.add_provider(DummyProvider("x"))


def test_add_provider_with_now_offers_existing_connections():
    """A provider added at runtime with ``now`` is offered the eligible connections."""
    ct, mgr, a = setup()
    c = offloaded_conn(ct, mgr)
    late = DummyProvider("late")
    mgr.add_provider(late, now=5.0)
    assert late.holds(c) and mgr.ctx(c).held == {"dummy", "late"}


def test_remove_provider_withdraws_and_closes():
    """Removing a provider deletes what it holds, closes it, and frees the conns."""
    ct, mgr, a = setup()
    c = offloaded_conn(ct, mgr)
    mgr.remove_provider("dummy", 4.0)
    assert a.hooks()[-2:] == ["conn_del", "close"] and a.closed
    assert not mgr.is_offloaded(c) and c.seq_check
    assert mgr.providers() == []


def test_can_offload_false_means_no_provider():
    """When no provider's can_offload accepts the conn it is refused as no-provider."""
    p = DummyProvider(accept=lambda ctx: ctx.orig.proto == 17)
    ct, mgr, _ = setup(p)
    c = offloaded_conn(ct, mgr)
    assert not mgr.is_offloaded(c)
    assert p.hooks("conn_add") == []
    assert mgr.reason(c) == Reason.NO_PROVIDER
    assert mgr.stats["not_offloaded"][Reason.NO_PROVIDER] == 1


# ---------------------------------------------------------------------------
# item 2: offload context
# ---------------------------------------------------------------------------
def test_ctx_carries_everything_a_provider_needs():
    """The ctx given to conn_add has zone, both tuples, NAT, ports, MACs, state, mark."""
    ct, mgr, p = setup()
    c = ct.new(4242, zone=7, snat=True)
    c.mark = 0x55
    ct.establish(c)
    fwd(mgr, c)
    (ctx,) = p.hooks("conn_add")
    assert isinstance(ctx, ConnOffload) and c.ext["offload"] is ctx
    assert ctx.zone == 7
    assert ctx.orig == FlowTuple(4, 6, A, B, 4242, 80)
    assert ctx.reply == FlowTuple(4, 6, B, NAT, 80, 4242)
    assert ctx.snat and not ctx.dnat
    o, r = ctx.dirs
    assert (o.in_ifindex, o.out_ifindex, o.src_mac, o.dst_mac) == (IF_A, IF_B, MAC_R1, MAC_B)
    assert (r.in_ifindex, r.out_ifindex, r.src_mac, r.dst_mac) == (IF_B, IF_A, MAC_R0, MAC_A)
    assert ctx.proto_state == "ESTABLISHED" and ctx.mark == 0x55


def test_flow_dir_applies_nat_in_both_directions():
    """flow_dir: orig matches orig and leaves as reply reversed; reply the other way."""
    c = FakeConn(5000, snat=True)
    o = flow_dir(c, False, 1, 2, MAC_R1, MAC_B)
    r = flow_dir(c, True, 2, 1, MAC_R0, MAC_A)
    assert o.match == c.orig and o.out == FlowTuple(4, 6, NAT, B, 5000, 80)
    assert r.match == c.reply and r.out == FlowTuple(4, 6, B, A, 80, 5000)


def test_set_forwarding_with_wrong_tuple_is_refused_and_counted():
    """A FlowDir whose match is not the conn's tuple is never stored or offloaded."""
    ct, mgr, p = setup()
    c = ct.new(1000)
    ct.establish(c)
    bad = flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A)  # reply tuple given as orig
    mgr.set_forwarding(c, False, bad, 1.0)
    assert mgr.ctx(c).dirs == [None, None]
    assert mgr.stats["not_offloaded"][Reason.BAD_FORWARDING] == 1


# ---------------------------------------------------------------------------
# item 10: every ordering of add / established / del
# ---------------------------------------------------------------------------
@both
def test_established_then_forwarding_offloads_on_second_direction(batch):
    """Established first: the ADD goes out once both directions' forwarding is known."""
    ct, mgr, p = setup(DummyProvider(batch=batch))
    c = ct.new(1000)
    ct.establish(c)
    assert p.hooks("conn_add") == [] and mgr.reason(c) == Reason.NO_FORWARDING
    mgr.set_forwarding(c, False, flow_dir(c, False, IF_A, IF_B, MAC_R1, MAC_B), 1.0)
    assert p.hooks("conn_add") == []
    mgr.set_forwarding(c, True, flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A), 1.0)
    assert p.holds(c) and mgr.is_offloaded(c) and mgr.reason(c) == "offloaded"


@both
def test_forwarding_then_established_offloads_on_established(batch):
    """Forwarding known first: nothing until the conn is established, then ADD."""
    ct, mgr, p = setup(DummyProvider(batch=batch))
    c = ct.new(1000)
    fwd(mgr, c)
    assert p.hooks("conn_add") == [] and mgr.reason(c) == Reason.NOT_ESTABLISHED
    ct.establish(c)
    assert p.holds(c)


def test_delete_before_established_sends_nothing():
    """A connection deleted before it was ever eligible reaches no provider."""
    ct, mgr, p = setup()
    c = ct.new(1000)
    fwd(mgr, c)
    ct.delete(c)
    assert p.hooks() == ["init"]


@both
def test_delete_before_add_completes_in_same_batch_sends_nothing(batch):
    """ADD queued then conn deleted in the same batch: neither ADD nor DEL is sent."""
    ct, mgr, p = setup(DummyProvider(batch=batch))
    c = ct.new(1000)
    ct.establish(c)
    with mgr.batch(1.0):
        fwd(mgr, c)
        ct.delete(c)
    assert p.hooks() == ["init"] and not p.held
    assert mgr.stats["offloaded"] == 0


def test_delete_while_add_in_flight_on_another_thread_leaves_nothing():
    """A conn deleted while its ADD is inside a slow provider is deleted right after."""
    p = DummyProvider(delay=0.05)
    ct, mgr, _ = setup(p)
    c = ct.new(1000)
    ct.establish(c)
    mgr.set_forwarding(c, False, flow_dir(c, False, IF_A, IF_B, MAC_R1, MAC_B), 1.0)
    t = threading.Thread(
        target=mgr.set_forwarding,
        args=(c, True, flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A), 1.0),
    )
    t.start()
    while not p.calls[1:]:  # wait until conn_add has started
        time.sleep(0.001)
    ct.delete(c)  # the tracker deletes it while conn_add sleeps
    t.join()
    assert p.hooks() == ["init", "conn_add", "conn_del"]
    assert not p.held and mgr.stats["offloaded"] == 0 and not mgr.ctx(c).held


@both
def test_add_before_established_then_established_sends_est(batch):
    """With require_established=False: ADD on forwarding, then EST on established."""
    pol = EligibilityPolicy(require_established=False)
    ct, mgr, p = setup(DummyProvider(batch=batch), policy=pol)
    c = ct.new(1000)
    fwd(mgr, c)
    assert p.holds(c) and p.hooks("conn_add")[0].proto_state == "SYN_SENT"
    ct.establish(c)
    assert p.hooks()[1:] == ["conn_add", "conn_established"]
    assert p.hooks("conn_established")[0].proto_state == "ESTABLISHED"


@both
def test_offloaded_then_deleted_sends_del_to_holder(batch):
    """Expiry of an offloaded connection sends exactly one DEL to its holder."""
    ct, mgr, p = setup(DummyProvider(batch=batch))
    c = offloaded_conn(ct, mgr)
    ct.delete(c)
    assert p.hooks()[1:] == ["conn_add", "conn_del"] and not p.held
    assert mgr.stats["offloaded"] == 0 and mgr.stats["dels"] == 1


def test_delete_after_refused_add_sends_no_del():
    """A conn whose ADD failed (ENOSPC) is not held, so its deletion sends no DEL."""
    ct, mgr, p = setup(DummyProvider(capacity=0))
    c = offloaded_conn(ct, mgr)
    assert not mgr.is_offloaded(c) and mgr.reason(c) == Reason.ENOSPC
    ct.delete(c)
    assert p.hooks("conn_del") == []


def test_forwarding_reported_after_deletion_is_ignored():
    """set_forwarding for a conn the tracker already deleted never offers it."""
    ct, mgr, p = setup()
    c = ct.new(1000)
    ct.establish(c)
    ct.delete(c)
    fwd(mgr, c)
    assert p.hooks() == ["init"] and not mgr.is_offloaded(c)


def test_repeated_identical_forwarding_is_free():
    """set_forwarding with an unchanged decision sends nothing more."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    n = len(p.calls)
    fwd(mgr, c)
    fwd(mgr, c)
    assert len(p.calls) == n


def test_established_twice_does_not_add_twice():
    """A second established/state event for an offloaded conn sends no second ADD."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    ct.state(c, "ESTABLISHED")
    assert p.hooks("conn_add") == [mgr.ctx(c)]


# ---------------------------------------------------------------------------
# item 3: batch API
# ---------------------------------------------------------------------------
def test_batch_submits_everything_once_at_commit():
    """Ops queued in a batch reach the provider only at commit, in one batch_submit."""
    ct, mgr, p = setup(DummyProvider(batch=True))
    conns = [ct.new(1000 + i) for i in range(5)]
    with mgr.batch(1.0):
        for c in conns:
            ct.establish(c)
            fwd(mgr, c)
        assert p.hooks() == ["init"] and mgr.in_batch
    assert p.batches == [5] and len(p.held) == 5
    assert mgr.stats["batches"] == 1


def test_batch_without_batch_submit_is_one_call_per_op():
    """A provider without batch_submit gets one conn_add per op for the same batch."""
    ct, mgr, p = setup(DummyProvider(batch=False))
    with mgr.batch(1.0):
        for i in range(4):
            offloaded_conn(ct, mgr, 1000 + i)
    assert p.hooks() == ["init"] + ["conn_add"] * 4 and p.batches == []
    assert mgr.stats["batches"] == 1


def test_explicit_begin_commit_and_nesting():
    """begin/commit nest: only the outermost commit submits, and it returns the op count."""
    ct, mgr, p = setup(DummyProvider(batch=True))
    mgr.begin()
    mgr.begin()
    offloaded_conn(ct, mgr, 1)
    assert mgr.commit(1.0) == 0 and p.batches == []
    offloaded_conn(ct, mgr, 2)
    assert mgr.commit(1.0) == 2 and p.batches == [2]
    assert not mgr.in_batch


def test_auto_commit_without_open_batch():
    """With no batch open each entry point submits its own ops before returning."""
    ct, mgr, p = setup(DummyProvider(batch=True))
    offloaded_conn(ct, mgr, 1)
    offloaded_conn(ct, mgr, 2)
    assert p.batches == [1, 1] and mgr.stats["batches"] == 2


def test_batch_mixes_op_kinds_in_order():
    """One batch carries ADD, POLICY and DEL of different conns, in queue order."""
    ct, mgr, p = setup(DummyProvider(batch=True))
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = offloaded_conn(ct, mgr, 2)
    p.calls.clear()
    with mgr.batch(2.0):
        ct.delete(c1)
        mgr.update_forwarding(c2, False, flow_dir(c2, False, IF_A, IF_B, MAC_R1, MAC_B2), 2.0)
        offloaded_conn(ct, mgr, 3)
    assert p.hooks() == ["conn_del", "conn_policy", "conn_add"] and p.batches[-1] == 3


def test_large_batch_is_submitted_in_chunks_in_order():
    """A batch beyond max_batch ops is submitted in max_batch-sized chunks, in order."""
    ct = FakeCt()
    p = DummyProvider(batch=True)
    mgr = OffloadManager(ct, [p], max_batch=3)
    with mgr.batch(1.0):
        conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(7)]
        assert p.batches == [3, 3]
    assert p.batches == [3, 3, 1] and all(mgr.is_offloaded(c) for c in conns)
    assert [c.orig.sport for c in p.hooks("conn_add")] == list(range(1000, 1007))


def test_policy_change_before_submission_is_honoured():
    """An ADD queued under the old policy is not sent if the policy now refuses it."""
    ct, mgr, p = setup()
    with mgr.batch(1.0):
        c = offloaded_conn(ct, mgr)  # ADD queued
        mgr.set_policy(EligibilityPolicy(zones=frozenset({5})), 1.0)
    assert p.hooks() == ["init"] and mgr.reason(c) == Reason.ZONE


@both
def test_partial_batch_failure_one_enospc_among_many(batch):
    """One ENOSPC among many ADDs: the others are held, only that one is refused."""
    p = DummyProvider(batch=batch)
    ct, mgr, _ = setup(p)
    p.fail_if("conn_add", lambda ctx: ctx.orig.sport == 1005, errno.ENOSPC)
    with mgr.batch(1.0):
        conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(10)]
    assert [mgr.is_offloaded(c) for c in conns] == [i != 5 for i in range(10)]
    assert mgr.reason(conns[5]) == Reason.ENOSPC
    assert mgr.stats["failures"] == {"ENOSPC": 1}
    assert mgr.stats["not_offloaded"] == {Reason.ENOSPC: 1}
    assert mgr.stats["adds"] == 9 and len(p.held) == 9
    assert conns[5].seq_check is True  # seq check untouched for the refused one


@both
def test_each_op_carries_its_own_error(batch):
    """Per-op errors in one batch: ADD ok, DEL ENOENT-tolerated, EST failure withdraws."""
    p = DummyProvider(batch=batch)
    ct, mgr, _ = setup(p, policy=EligibilityPolicy(require_established=False))
    c1 = ct.new(1)
    fwd(mgr, c1)  # held before established
    c2 = offloaded_conn(ct, mgr, 2)
    p.fail_next("conn_established", errno.EIO)
    with mgr.batch(2.0):
        ct.establish(c1)  # EST fails -> c1 withdrawn
        ct.delete(c2)  # DEL ok
    assert not p.held and mgr.stats["failures"] == {"EIO": 1}
    assert mgr.stats["withdrawn"] == {Reason.PROVIDER_ERROR: 1}
    assert c1.seq_check is True


def test_one_lock_is_held_around_a_whole_batch():
    """Another thread's op waits for a whole submitted batch, not just one op of it."""
    p = DummyProvider(delay=0.01)
    ct, mgr, _ = setup(p)
    conns = [ct.new(1000 + i) for i in range(5)]
    for c in conns:
        ct.establish(c)
    other = ct.new(2000)
    ct.establish(other)

    def burst() -> None:
        with mgr.batch(1.0):
            for c in conns:
                fwd(mgr, c)

    t = threading.Thread(target=burst)
    t.start()
    while len(p.calls) < 2:  # the batch is being submitted
        time.sleep(0.001)
    fwd(mgr, other)  # auto-commit from this thread: must wait for the lock
    t.join()
    sports = [ctx.orig.sport for h, ctx in p.calls if h == "conn_add"]
    assert sports == [1000, 1001, 1002, 1003, 1004, 2000]


def test_batches_are_per_thread():
    """A batch left open on one thread does not hold back another thread's ops."""
    ct, mgr, p = setup()
    opened, release = threading.Event(), threading.Event()

    def holder() -> None:
        with mgr.batch(1.0):
            opened.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    opened.wait(5)
    c = offloaded_conn(ct, mgr)
    assert p.holds(c)  # submitted by this thread's auto-commit
    release.set()
    t.join()


@both
def test_batch_submit_raising_leaves_nothing_installed(batch):
    """A provider raising mid-batch: all its ops count as EIO and ADDs are cleaned up."""
    p = DummyProvider(batch=batch)
    ct, mgr, _ = setup(p)
    p.fail_if("conn_add", lambda ctx: ctx.orig.sport == 1002, RuntimeError("driver bug"))
    with mgr.batch(1.0):
        conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(4)]
    assert mgr.stats["provider_errors"] == {"dummy": 1}
    held = {c.orig.sport for c in conns if mgr.is_offloaded(c)}
    # every conn the manager thinks is held is in the provider, and nothing else
    assert {k[1].sport for k in p.held} == held
    # a native batch that raised is undone as a whole; per-op only the raising op fails
    assert held == (set() if batch else {1000, 1001, 1003})


# ---------------------------------------------------------------------------
# item 4: offload mark
# ---------------------------------------------------------------------------
def test_enabling_offload_with_unoffloaded_conns_sends_no_deletes():
    """enable() with established, never-offloaded conns sends ADDs and no DEL."""
    ct, mgr, p = setup(enabled=False)
    conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(3)]
    assert p.hooks() == ["init"]
    assert mgr.reason(conns[0]) == Reason.DISABLED
    mgr.enable(5.0)
    assert p.hooks() == ["init"] + ["conn_add"] * 3
    assert all(mgr.is_offloaded(c) for c in conns)


def test_sweep_after_disable_still_deletes_what_is_offloaded():
    """disable(withdraw=False) keeps entries; expiry afterwards still DELs them."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    mgr.disable(4.0, withdraw=False)
    assert p.holds(c) and mgr.is_offloaded(c)
    new = offloaded_conn(ct, mgr, 2000)  # no new offloads while disabled
    assert not mgr.is_offloaded(new)
    ct.delete(c)
    ct.delete(new)
    assert p.hooks("conn_del") == [mgr.ctx(c)] and not p.held


def test_disable_withdraws_every_connection_and_enable_offers_them_again():
    """disable() DELs all (conns stay in the slow path, seq check on); enable() re-adds."""
    ct, mgr, p = setup()
    conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(3)]
    mgr.disable(4.0)
    assert not p.held and all(c.seq_check for c in conns) and not mgr.enabled
    assert ct.table == conns  # still tracked
    assert mgr.stats["withdrawn"] == {Reason.DISABLED: 3}
    mgr.enable(5.0)
    assert len(p.held) == 3 and all(c.seq_check is False for c in conns)


def test_conn_del_only_goes_to_providers_that_hold_the_conn():
    """Of two providers, the one that refused the ADD never sees a DEL."""
    a, b = DummyProvider("a"), DummyProvider("b", capacity=0)
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    assert mgr.ctx(c).held == {"a"}
    ct.delete(c)
    assert a.hooks("conn_del") and not b.hooks("conn_del")


def test_disable_provider_withdraws_only_its_connections():
    """Disabling one provider DELs its entries; conns also held elsewhere stay offloaded."""
    a = DummyProvider("a", accept=lambda ctx: ctx.orig.sport != 1001)
    b = DummyProvider("b", accept=lambda ctx: ctx.orig.sport < 2000)
    ct, mgr, _ = setup(a, b)
    shared = offloaded_conn(ct, mgr, 1000)
    only_b = offloaded_conn(ct, mgr, 1001)
    only_a = offloaded_conn(ct, mgr, 2000)
    assert mgr.ctx(only_b).held == {"b"} and mgr.ctx(shared).held == {"a", "b"}
    mgr.disable_provider("b", 5.0)
    assert not b.held and len(b.hooks("conn_del")) == 2
    assert mgr.ctx(shared).held == {"a"} and shared.seq_check is False
    assert not mgr.is_offloaded(only_b) and only_b.seq_check is True
    assert mgr.is_offloaded(only_a) and not a.hooks("conn_del")
    mgr.enable_provider("b", 6.0)
    assert b.holds(shared) and b.holds(only_b) and not b.holds(only_a)


def test_disabled_provider_without_withdraw_still_gets_dels():
    """disable_provider(withdraw=False) keeps its entries and their DELs still reach it."""
    a, b = DummyProvider("a"), DummyProvider("b")
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    mgr.disable_provider("b", 4.0, withdraw=False)
    late = offloaded_conn(ct, mgr, 2)
    assert mgr.ctx(late).held == {"a"}
    ct.delete(c)
    assert b.hooks("conn_del") == [mgr.ctx(c)] and not b.held


# ---------------------------------------------------------------------------
# item 5: TCP sequence checking
# ---------------------------------------------------------------------------
def test_seq_check_off_while_offloaded_and_on_after_withdraw():
    """set_seq_check(False) when first accepted; (True) when the conn returns."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    assert ct.seq == [(c, False)]
    assert mgr.withdraw(c, 3.0, "route-change") is True
    assert ct.seq == [(c, False), (c, True)]
    assert mgr.stats["withdrawn"] == {"route-change": 1}


def test_fin_seen_by_tracker_withdraws_and_reenables_seq_check():
    """A TCP state change away from ESTABLISHED (FIN/RST) un-offloads the conn."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    ct.state(c, "FIN_WAIT_1")
    assert not p.held and c.seq_check is True
    assert mgr.stats["withdrawn"] == {Reason.NOT_ESTABLISHED: 1}
    fwd(mgr, c, dst_b=MAC_B2)  # later forwarding does not re-offload a closing conn
    assert not mgr.is_offloaded(c)


def test_seq_check_left_alone_for_udp():
    """UDP connections are offloaded without touching TCP sequence checking."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr, proto=17)
    assert mgr.is_offloaded(c) and ct.seq == []


def test_seq_check_calls_are_made_outside_the_lock():
    """The tracker may call back into the manager from set_seq_check without deadlock."""
    ct, mgr, p = setup()
    seen = []

    def reentrant(conn, enabled):
        seen.append(mgr.is_offloaded(conn))
        mgr.retry_pending(9.0)  # takes the lock if it has anything to do

    ct.set_seq_check = reentrant
    offloaded_conn(ct, mgr)
    assert seen == [True]


# ---------------------------------------------------------------------------
# item 6: eligibility through the manager
# ---------------------------------------------------------------------------
def test_min_packets_rechecked_on_update_and_counted_once():
    """Below min_pkts nothing is offered; the packet that reaches it triggers the ADD."""
    ct, mgr, p = setup(policy=EligibilityPolicy(min_pkts=6))
    c = offloaded_conn(ct, mgr)  # 3 packets
    assert mgr.reason(c) == Reason.MIN_PKTS
    ct.packet(c)
    ct.packet(c, reply=True)
    assert not mgr.is_offloaded(c)
    ct.packet(c)  # 6th packet
    assert mgr.is_offloaded(c)
    assert mgr.stats["not_offloaded"] == {Reason.MIN_PKTS: 1}


def test_on_update_is_free_when_nothing_waits():
    """Per-packet updates of non-waiting conns reach no provider."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    n = len(p.calls)
    for _ in range(10):
        ct.packet(c)
    assert len(p.calls) == n and not mgr._watch


def test_cap_on_offloaded_connections():
    """Beyond max_offloaded conns are refused as cap; a freed slot is used on next packet."""
    ct, mgr, p = setup(policy=EligibilityPolicy(max_offloaded=2))
    c1, c2, c3 = (offloaded_conn(ct, mgr, 1000 + i) for i in range(3))
    assert [mgr.is_offloaded(c) for c in (c1, c2, c3)] == [True, True, False]
    assert mgr.reason(c3) == Reason.CAP
    ct.delete(c1)
    ct.packet(c3)
    assert mgr.is_offloaded(c3) and mgr.stats["offloaded"] == 2


def test_cap_applies_within_one_batch():
    """The cap counts ADDs planned earlier in the same batch."""
    ct, mgr, p = setup(DummyProvider(batch=True), policy=EligibilityPolicy(max_offloaded=3))
    with mgr.batch(1.0):
        conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(5)]
    assert sum(mgr.is_offloaded(c) for c in conns) == 3 and p.batches == [3]
    assert mgr.stats["not_offloaded"] == {Reason.CAP: 2}


@pytest.mark.parametrize(
    "policy, tweak, reason",
    [
        (EligibilityPolicy(protocols=frozenset({17})), None, Reason.PROTO),
        (EligibilityPolicy(zones=frozenset({1})), None, Reason.ZONE),
        (EligibilityPolicy(opt_out_ifindex=frozenset({IF_B})), None, Reason.PORT_OPT_OUT),
        (EligibilityPolicy(), lambda c: setattr(c, "helper", "ftp"), Reason.HELPER),
        (EligibilityPolicy(), lambda c: setattr(c, "parent", object()), Reason.RELATED),
        (EligibilityPolicy(), lambda c: setattr(c, "children", 1), Reason.HAS_CHILDREN),
    ],
    ids=["proto", "zone", "port-opt-out", "helper", "related", "has-children"],
)
def test_refusals_are_recorded_as_countable_reasons(policy, tweak, reason):
    """Each policy refusal leaves the conn in the slow path with its reason counted."""
    ct, mgr, p = setup(policy=policy)
    c = ct.new(1000)
    if tweak:
        tweak(c)
    ct.establish(c)
    fwd(mgr, c)
    assert not mgr.is_offloaded(c) and p.hooks() == ["init"]
    assert mgr.reason(c) == reason
    assert mgr.stats["not_offloaded"] == {reason: 1}


def test_master_offloaded_once_its_children_are_gone():
    """has-children is transient: the master is offered on the packet after they end."""
    ct, mgr, p = setup()
    c = ct.new(21)
    c.children = 1
    ct.establish(c)
    fwd(mgr, c)
    assert mgr.reason(c) == Reason.HAS_CHILDREN
    c.children = 0
    ct.packet(c)
    assert mgr.is_offloaded(c)


def test_waiting_reasons_counted_only_for_conns_that_never_offloaded():
    """not-established / no-forwarding are counted once, at deletion, never for offloaded."""
    ct, mgr, p = setup()
    one_way = ct.new(1, proto=17)  # never replied
    fwd(mgr, one_way)
    no_fwd = ct.new(2)
    ct.establish(no_fwd)
    ok = offloaded_conn(ct, mgr, 3)
    assert mgr.stats["not_offloaded"] == {}
    for c in (one_way, no_fwd, ok):
        ct.delete(c)
    assert mgr.stats["not_offloaded"] == {Reason.NOT_ESTABLISHED: 1, Reason.NO_FORWARDING: 1}


def test_set_policy_withdraws_refused_and_offers_allowed():
    """Replacing the policy takes back what it refuses and offers what it allows."""
    ct, mgr, p = setup(policy=EligibilityPolicy(zones=frozenset({0})))
    z0 = offloaded_conn(ct, mgr, 1, zone=0)
    z1 = offloaded_conn(ct, mgr, 2, zone=1)
    assert mgr.is_offloaded(z0) and not mgr.is_offloaded(z1)
    mgr.set_policy(EligibilityPolicy(zones=frozenset({1})), 5.0)
    assert not mgr.is_offloaded(z0) and mgr.is_offloaded(z1)
    assert mgr.stats["withdrawn"] == {Reason.ZONE: 1}


def test_port_opt_out_after_offload_withdraws_on_forwarding_change():
    """Forwarding moved to an opted-out port: the offloaded conn is withdrawn."""
    ct, mgr, p = setup(policy=EligibilityPolicy(opt_out_ifindex=frozenset({99})))
    c = offloaded_conn(ct, mgr)
    mgr.update_forwarding(c, False, flow_dir(c, False, IF_A, 99, MAC_R1, MAC_B), 3.0)
    assert not mgr.is_offloaded(c) and not p.held
    assert mgr.reason(c) == Reason.PORT_OPT_OUT


# ---------------------------------------------------------------------------
# pending (EAGAIN), neighbours, forwarding changes
# ---------------------------------------------------------------------------
@both
def test_unresolved_next_hop_is_pending_until_neighbour_resolves(batch):
    """dst_mac None: no provider call, pending; neigh_resolved installs it."""
    ct, mgr, p = setup(DummyProvider(batch=batch))
    c = ct.new(1000)
    ct.establish(c)
    fwd(mgr, c, dst_b=None)
    assert p.hooks() == ["init"] and mgr.reason(c) == Reason.NEIGH_UNRESOLVED
    assert mgr.stats["pending"] == 1 and mgr.pending() == [mgr.ctx(c)]
    assert mgr.neigh_resolved(IF_B, B, MAC_B, 2.0) == 1
    assert p.holds(c) and mgr.stats["pending"] == 0
    assert p.held[DummyProvider.key(mgr.ctx(c))].dirs[0].dst_mac == MAC_B


def test_provider_eagain_is_pending_and_retried():
    """A provider's EAGAIN leaves the conn pending; retry_pending offers it again."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    p.fail_next("conn_add", errno.EAGAIN)
    c = offloaded_conn(ct, mgr)
    assert not mgr.is_offloaded(c) and mgr.reason(c) == Reason.EAGAIN
    assert mgr.stats["pending"] == 1 and mgr.stats["failures"] == {"EAGAIN": 1}
    ct.packet(c)  # pending conns are not retried per packet
    assert len(p.hooks("conn_add")) == 1
    assert mgr.retry_pending(3.0) == 1
    assert mgr.is_offloaded(c) and mgr.stats["pending"] == 0


def test_enospc_retried_by_retry_pending_once_space_frees():
    """ENOSPC stays in the slow path; retry_pending re-offers after space is freed."""
    p = DummyProvider(capacity=1)
    ct, mgr, _ = setup(p)
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = offloaded_conn(ct, mgr, 2)
    assert mgr.reason(c2) == Reason.ENOSPC
    ct.delete(c1)
    mgr.retry_pending(4.0)
    assert mgr.is_offloaded(c2)


def test_neighbour_mac_change_sends_policy_with_new_mac():
    """A next hop's MAC changing rewrites the offloaded entry (POLICY), no DEL."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    mgr.neigh_resolved(IF_B, B, MAC_B2, 3.0)
    assert p.hooks()[-1] == "conn_policy" and not p.hooks("conn_del")
    assert p.held[DummyProvider.key(mgr.ctx(c))].dirs[0].dst_mac == MAC_B2
    assert mgr.stats["policies"] == 1
    assert mgr.neigh_resolved(IF_B, B, MAC_B2, 3.0) == 0  # same MAC: nothing


def test_neighbour_gone_withdraws_and_reinstalls_on_resolve():
    """Neighbour invalid: DEL and pending; resolved again: ADD again."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    assert mgr.neigh_gone(IF_B, B, 3.0) == 1
    assert not p.held and c.seq_check and mgr.reason(c) == Reason.NEIGH_UNRESOLVED
    mgr.neigh_resolved(IF_B, B, MAC_B, 4.0)
    assert p.holds(c) and c.seq_check is False


def test_update_forwarding_sends_policy_to_holders():
    """update_forwarding with a new route/MAC sends POLICY with the new decision."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    new = flow_dir(c, False, IF_A, 13, MAC_R1, MAC_B2, mtu=9000)
    mgr.update_forwarding(c, False, new, 3.0)
    ctx = p.hooks("conn_policy")[0]
    assert ctx.dirs[0] is new


def test_failed_policy_update_withdraws_the_conn():
    """If a provider cannot rewrite an entry it must not keep the stale one."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    c = offloaded_conn(ct, mgr)
    p.fail_next("conn_policy", errno.EIO)
    mgr.update_forwarding(c, False, flow_dir(c, False, IF_A, IF_B, MAC_R1, MAC_B2), 3.0)
    assert p.hooks()[-2:] == ["conn_policy", "conn_del"] and not p.held
    assert not mgr.is_offloaded(c) and c.seq_check


# ---------------------------------------------------------------------------
# item 7: aging
# ---------------------------------------------------------------------------
@both
def test_age_refreshes_tracker_from_last_used(batch):
    """age() reads last-used per conn and calls ct.refresh with it."""
    p = DummyProvider(batch=batch)
    ct, mgr, _ = setup(p)
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = offloaded_conn(ct, mgr, 2)
    p.touch(c1, 50.0)
    p.touch(mgr.ctx(c2).reply, 60.0)  # a reply-direction packet
    assert mgr.age(70.0) == 2
    assert sorted(ct.refreshed, key=lambda x: x[1]) == [(c1, 50.0), (c2, 60.0)]
    if batch:
        assert p.batches[-1] == 2


def test_age_skips_flows_never_seen_by_fast_path():
    """A conn the fast path never forwarded is not refreshed (no last-used)."""
    ct, mgr, p = setup()
    offloaded_conn(ct, mgr)
    assert mgr.age(70.0) == 0 and ct.refreshed == []


def test_age_uses_newest_time_over_all_holders():
    """With two holders the tracker is refreshed from the newer last-used."""
    a, b = DummyProvider("a"), DummyProvider("b", batch=True)
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    a.touch(c, 10.0)
    b.touch(c, 20.0)
    mgr.age(30.0)
    assert ct.refreshed == [(c, 20.0)]


@both
def test_age_error_returns_conn_to_slow_path_with_no_stale_entry(batch):
    """A read-back error: DEL to all holders, seq check on, nothing left anywhere."""
    a, b = DummyProvider("a", batch=batch), DummyProvider("b")
    ct, mgr, _ = setup(a, b)
    bad = offloaded_conn(ct, mgr, 1)
    good = offloaded_conn(ct, mgr, 2)
    a.touch(good, 5.0)
    a.fail_if("conn_update", lambda ctx: ctx.orig.sport == 1, errno.EIO)
    mgr.age(10.0)
    assert not a.holds(bad) and not b.holds(bad) and not mgr.is_offloaded(bad)
    assert bad.seq_check is True and mgr.stats["withdrawn"] == {"aging-error": 1}
    assert mgr.is_offloaded(good) and ct.refreshed == [(good, 5.0)]
    assert mgr.stats["stale"] == 0
    # re-offered only after the slow path forwards it again
    fwd(mgr, bad)
    assert mgr.is_offloaded(bad)


def test_age_entry_vanished_is_withdrawn():
    """An entry missing from the provider (ENOENT on read) is not kept as offloaded."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    p.held.clear()  # e.g. the map was cleared behind our back
    mgr.age(10.0)
    assert not mgr.is_offloaded(c) and mgr.stats["failures"] == {"ENOENT": 2}


def test_age_bulk_read_raising_falls_back_per_conn():
    """If conn_update_many raises, each conn is read alone; only the bad one leaves."""

    class Bulk(DummyProvider):
        def conn_update_many(self, ctxs):
            raise RuntimeError("bulk read broken")

    p = Bulk()
    ct, mgr, _ = setup(p)
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = offloaded_conn(ct, mgr, 2)
    p.touch(c1, 7.0)
    p.fail_if("conn_update", lambda ctx: ctx.orig.sport == 2, RuntimeError("bad entry"))
    assert mgr.age(10.0) == 1
    assert mgr.is_offloaded(c1) and not mgr.is_offloaded(c2) and not p.holds(c2)
    assert mgr.stats["provider_errors"] == {"dummy": 1}


def test_last_used_reads_only_the_offloaded_connections_asked_for():
    """The lazy re-arm source: one bulk read per provider for the conns asked
    about; the newest time over holders; None for not offloaded / never seen."""
    a, b = DummyProvider("a"), DummyProvider("b", batch=True)
    ct, mgr, _ = setup(a, b)
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = offloaded_conn(ct, mgr, 2)
    c3 = offloaded_conn(ct, mgr, 3)
    plain = ct.new(4)
    a.touch(c1, 10.0)
    b.touch(c1, 20.0)
    b.touch(c3, 5.0)
    n_a = len(a.hooks("conn_update"))
    assert mgr.last_used([c1, plain, c2], 30.0) == [20.0, None, None]
    assert len(a.hooks("conn_update")) == n_a + 2  # c1 and c2 only, not c3
    assert ct.refreshed == []  # the tracker refreshes; the manager only answers


def test_last_used_read_error_withdraws_and_counts_as_used_now():
    """A failed read at the deadline: back to the slow path, alive one more timeout."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    good = offloaded_conn(ct, mgr, 1)
    bad = offloaded_conn(ct, mgr, 2)
    p.touch(good, 5.0)
    p.fail_if("conn_update", lambda ctx: ctx.orig.sport == 2, errno.EIO)
    assert mgr.last_used([good, bad], 10.0) == [5.0, 10.0]
    assert not p.holds(bad) and not mgr.is_offloaded(bad) and bad.seq_check is True
    assert mgr.stats["withdrawn"] == {"aging-error": 1} and mgr.is_offloaded(good)
    fwd(mgr, bad)  # offered again only after the slow path forwards it again
    assert mgr.is_offloaded(bad)


def test_real_lazy_rearm_expires_idle_and_keeps_the_busy_connection():
    """Sweep-only aging (no age()): each deadline re-arms the busy conn from its
    last-used; the idle one expires at last-used + timeout, with one DEL."""
    p = DummyProvider(batch=True)
    r = Router(p, cfg=CtConfig(timeouts={"tcp_established": 10.0}))
    busy, idle = TcpFlow(r, 40001), TcpFlow(r, 40002)
    busy.handshake(now=1.0)
    idle.handshake(now=1.0)
    p.touch(idle.conn, 4.0)  # last fast-path packet of the idle one
    for t in range(5, 60, 2):
        p.touch(busy.conn, t - 0.5)
        with r.mgr.batch(float(t)):
            r.ct.sweep(float(t))
        alive = {f.conn for f in (busy, idle) if r.ct.get(0, f.conn.orig) is f.conn}
        assert busy.conn in alive
        assert (idle.conn in alive) == (t < 14.0)  # 4 + 10
    assert r.mgr.is_offloaded(busy.conn) and not r.mgr.is_offloaded(idle.conn)
    assert r.p.hooks("conn_del") == [idle.conn.ext["offload"]]
    # read only at deadlines: about one read per 10 s timeout, not one per sweep
    assert len(p.hooks("conn_update")) <= 2 * (60 // 10) + 2


def test_real_lookup_past_the_deadline_asks_the_fast_path_before_deleting():
    """A slow-path packet (e.g. a punted FIN) of an offloaded conn whose deadline
    passed between sweeps finds it alive when the fast path used it lately."""
    r = Router(cfg=CtConfig(timeouts={"tcp_established": 10.0}))
    f = TcpFlow(r)
    f.handshake(now=1.0)  # expires at 11
    r.p.touch(f.conn, 9.0)
    res = f.run("a", "PA", 12.0, 10)  # past 11, before any sweep
    assert res.conn is f.conn and not res.state & CS.INV
    assert r.ct.stats.deleted == 0


def test_failed_delete_is_retried_until_no_stale_entry_remains():
    """A DEL that fails is kept and re-sent by age() until the provider lets go."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    c = offloaded_conn(ct, mgr)
    p.fail_next("conn_del", errno.EBUSY)
    ct.delete(c)
    assert p.holds(c) and mgr.stats["stale"] == 1
    mgr.age(10.0)
    assert not p.held and mgr.stats["stale"] == 0


# ---------------------------------------------------------------------------
# deletion and flush
# ---------------------------------------------------------------------------
@both
def test_flush_sends_one_flush_and_no_dels(batch):
    """mgr.flush(): one FLUSH per provider, then the tracker flush sends no DEL."""
    p = DummyProvider(batch=batch)
    ct, mgr, _ = setup(p)
    for i in range(3):
        offloaded_conn(ct, mgr, 1000 + i)
    mgr.flush(5.0)
    assert p.hooks()[-1] == "flush" and not p.hooks("conn_del")
    assert ct.flushed == [None] and ct.table == [] and not p.held
    assert mgr.stats["offloaded"] == 0 and mgr.stats["flushes"] == 1


def test_flush_zone_sends_dels_for_that_zone_only():
    """A per-zone flush DELs only that zone's offloaded conns."""
    ct, mgr, p = setup()
    z1 = offloaded_conn(ct, mgr, 1, zone=1)
    z2 = offloaded_conn(ct, mgr, 2, zone=2)
    mgr.flush(5.0, zone=1)
    assert p.hooks("conn_del") == [mgr.ctx(z1)] and not p.hooks("flush")
    assert mgr.is_offloaded(z2) and ct.table == [z2]


def test_failed_flush_falls_back_to_dels():
    """If FLUSH fails the manager deletes every held conn one by one."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    conns = [offloaded_conn(ct, mgr, 1000 + i) for i in range(2)]
    p.fail_next("flush", errno.EIO)
    mgr.flush(5.0, flush_ct=False)
    assert len(p.hooks("conn_del")) == 2 and not p.held
    assert not any(mgr.is_offloaded(c) for c in conns)


def test_tracker_flush_without_manager_sends_dels():
    """A plain ct.flush (not via the manager) still removes every entry with DELs."""
    ct, mgr, p = setup()
    for i in range(3):
        offloaded_conn(ct, mgr, 1000 + i)
    ct.flush(5.0)
    assert len(p.hooks("conn_del")) == 3 and not p.held


# ---------------------------------------------------------------------------
# raising providers
# ---------------------------------------------------------------------------
def test_provider_raising_in_conn_add_counts_eio_and_cleans_up():
    """conn_add raising: EIO, counted, a cleanup DEL is sent, the manager carries on."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    p.fail_next("conn_add", RuntimeError("boom"))
    c = offloaded_conn(ct, mgr)
    assert not mgr.is_offloaded(c) and mgr.reason(c) == Reason.PROVIDER_ERROR
    assert mgr.stats["provider_errors"] == {"dummy": 1}
    assert mgr.stats["failures"] == {"EIO": 1, "ENOENT": 1}  # the cleanup DEL found nothing
    assert p.hooks()[-2:] == ["conn_add", "conn_del"]
    c2 = offloaded_conn(ct, mgr, 2)
    assert mgr.is_offloaded(c2)


def test_provider_raising_in_can_offload_is_contained():
    """can_offload raising counts as a provider error and refuses that provider only."""

    class Picky(DummyProvider):
        def can_offload(self, ctx):
            raise ValueError("nope")

    a, b = Picky("picky"), DummyProvider("ok")
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    assert mgr.ctx(c).held == {"ok"} and mgr.stats["provider_errors"] == {"picky": 1}


def test_provider_raising_in_conn_del_is_retried():
    """conn_del raising: the entry is kept as stale and deleted by the next retry."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    c = offloaded_conn(ct, mgr)
    p.fail_next("conn_del", OSError("EBADF"))
    mgr.withdraw(c, 3.0)
    assert p.holds(c) and mgr.stats["stale"] == 1 and not mgr.is_offloaded(c)
    mgr.retry_pending(4.0)
    assert not p.held and mgr.stats["stale"] == 0


def test_provider_raising_provider_error_is_an_errno_not_a_crash():
    """ProviderError from a hook is that errno (not counted as a provider exception)."""
    p = DummyProvider()
    ct, mgr, _ = setup(p)
    p.fail_next("conn_add", ProviderError(errno.E2BIG))
    c = offloaded_conn(ct, mgr)
    assert not mgr.is_offloaded(c) and mgr.stats["failures"]["E2BIG"] == 1
    assert mgr.stats["provider_errors"] == {}
    assert p.hooks()[-1] == "conn_add"  # a clean refusal needs no cleanup DEL


# ---------------------------------------------------------------------------
# withdraw lookups, close, stats
# ---------------------------------------------------------------------------
def test_withdraw_forgets_forwarding_until_slow_path_forwards_again():
    """After withdraw the conn is re-offered only once both directions are forwarded."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    mgr.withdraw(c, 3.0)
    assert mgr.ctx(c).dirs == [None, None]
    mgr.set_forwarding(c, False, flow_dir(c, False, IF_A, IF_B, MAC_R1, MAC_B), 4.0)
    assert not mgr.is_offloaded(c)
    mgr.set_forwarding(c, True, flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A), 4.0)
    assert mgr.is_offloaded(c)
    assert mgr.withdraw(ct.new(5), 5.0) is False  # never offloaded


def test_withdraw_where_by_ifindex_and_mac():
    """withdraw_ifindex / withdraw_mac select flows by port and by next-hop MAC."""
    ct, mgr, p = setup()
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = ct.new(2)
    ct.establish(c2)
    mgr.set_forwarding(c2, False, flow_dir(c2, False, IF_A, 20, MAC_R1, MAC_B2), 1.0)
    mgr.set_forwarding(c2, True, flow_dir(c2, True, 20, IF_A, MAC_R0, MAC_A), 1.0)
    assert mgr.withdraw_ifindex(20, 2.0) == 1
    assert mgr.is_offloaded(c1) and not mgr.is_offloaded(c2)
    assert mgr.withdraw_mac(MAC_B, 3.0) == 1 and not mgr.is_offloaded(c1)
    assert mgr.stats["withdrawn"] == {"port-down": 1, "neigh-gone": 1}


def test_close_deletes_everything_and_closes_providers():
    """close() DELs every offloaded entry and closes every provider."""
    a, b = DummyProvider("a"), DummyProvider("b", batch=True)
    ct, mgr, _ = setup(a, b)
    c = offloaded_conn(ct, mgr)
    mgr.close(9.0)
    assert not a.held and not b.held and a.closed and b.closed
    assert not mgr.is_offloaded(c)


def test_stats_snapshot_has_every_counter():
    """stats exposes adds, dels, failures by errno, pending, offloaded, reasons, errors."""
    ct, mgr, p = setup()
    c = offloaded_conn(ct, mgr)
    ct.delete(c)
    s = mgr.stats
    for k in (
        "adds",
        "dels",
        "failures",
        "pending",
        "offloaded",
        "not_offloaded",
        "provider_errors",
        "withdrawn",
        "batches",
        "ops",
        "stale",
    ):
        assert k in s
    assert (s["adds"], s["dels"], s["offloaded"], s["pending"]) == (1, 1, 0, 0)


def test_stats_counts_offloaded_now_and_pending():
    """offloaded and pending are current counts, not totals."""
    ct, mgr, p = setup()
    c1 = offloaded_conn(ct, mgr, 1)
    c2 = ct.new(2)
    ct.establish(c2)
    fwd(mgr, c2, dst_b=None)
    assert (mgr.stats["offloaded"], mgr.stats["pending"]) == (1, 1)
    ct.delete(c1)
    ct.delete(c2)
    assert (mgr.stats["offloaded"], mgr.stats["pending"]) == (0, 0)


def test_manual_batch_objects_and_op_types_are_the_base_ones():
    """Providers receive base Batch/Op objects with ADD kinds and per-op err fields."""
    got: list[Batch] = []

    class Spy(DummyProvider):
        def __init__(self):
            super().__init__("spy", batch=True)
            inner = self.batch_submit

            def submit(b):
                got.append(b)
                inner(b)

            self.batch_submit = submit

    ct, mgr, _ = setup(Spy())
    offloaded_conn(ct, mgr)
    (b,) = got
    (op,) = b.ops
    assert isinstance(b, Batch) and isinstance(op, Op)
    assert op.kind is OpKind.ADD and op.err == 0


# ---------------------------------------------------------------------------
# the real tracker, driven by scapy-built packets
# ---------------------------------------------------------------------------
IP_A, IP_B, IP_NAT = "10.0.0.1", "10.0.1.2", "192.0.2.1"
GAP = 50_000_000  # bytes the fast path carried while the conn was offloaded


def ipaddress_packed(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def _frame(l3) -> bytearray:
    return bytearray(bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:01") / l3))


class Router:
    """The slow path in miniature: conntrack, then set_forwarding for A(IF_A) <-> B(IF_B)."""

    def __init__(self, *provs: Provider, policy=None, cfg=None, nat=None, resolved=True):
        self.ct = ConnTracker(cfg or CtConfig())
        self.p = provs[0] if provs else DummyProvider()
        self.mgr = OffloadManager(self.ct, list(provs) or [self.p], policy)
        self.nat = nat
        self.mac_b = MAC_B if resolved else None

    def slow(self, buf: bytearray, now: float, zone: int = 0):
        res = self.ct.execute(parse(buf), zone, now, commit=True, nat=self.nat)
        c = res.conn
        if c is not None and not res.state & (CS.INV | CS.REL):
            if res.reply:
                fd = flow_dir(c, True, IF_B, IF_A, MAC_R0, MAC_A)
                self.mgr.set_forwarding(c, True, fd, now, nexthop=A)
            else:
                fd = flow_dir(c, False, IF_A, IF_B, MAC_R1, self.mac_b)
                self.mgr.set_forwarding(c, False, fd, now, nexthop=B)
        return res


class TcpFlow:
    """Both peers of one TCP connection A:sport -> B:80, tracking sequence numbers."""

    def __init__(self, r: Router, sport: int = 40000) -> None:
        self.r, self.sport = r, sport
        self.nxt = {"a": 1000, "b": 7_000_000}
        self.conn = None

    def seg(self, who: str, flags: str, n: int = 0) -> bytearray:
        other = "b" if who == "a" else "a"
        ack = self.nxt[other] if "A" in flags else 0
        if who == "a":
            l3 = IP(src=IP_A, dst=IP_B) / TCP(sport=self.sport, dport=80)
        else:
            l3 = IP(src=IP_B, dst=IP_A) / TCP(sport=80, dport=self.sport)
        l3[TCP].flags, l3[TCP].seq, l3[TCP].ack, l3[TCP].window = flags, self.nxt[who], ack, 65535
        if n:
            l3 = l3 / Raw(b"x" * n)
        self.nxt[who] = (self.nxt[who] + n + ("S" in flags) + ("F" in flags)) % 2**32
        return _frame(l3)

    def run(self, who: str, flags: str, now: float, n: int = 0):
        """Send a segment through the slow path."""
        res = self.r.slow(self.seg(who, flags, n), now)
        self.conn = res.conn or self.conn
        return res

    def fast(self, now: float, gap: int = GAP) -> None:
        """The fast path carried ``gap`` bytes each way: the slow path saw none of it."""
        self.nxt["a"] = (self.nxt["a"] + gap) % 2**32
        self.nxt["b"] = (self.nxt["b"] + gap) % 2**32
        assert self.r.p.touch(self.conn, now)

    def handshake(self, now: float = 1.0):
        assert self.run("a", "S", now).state & CS.NEW
        assert self.run("b", "SA", now).state & CS.EST
        return self.run("a", "A", now)


def test_real_tcp_offloaded_after_handshake_with_seq_check_off():
    """SYN, SYN-ACK, ACK through the real tracker: offloaded on ESTABLISHED, seq check off."""
    r = Router()
    f = TcpFlow(r)
    f.run("a", "S", 1.0)
    f.run("b", "SA", 1.0)
    assert not r.mgr.is_offloaded(f.conn) and f.conn.seq_check
    f.run("a", "A", 1.0)
    assert r.mgr.is_offloaded(f.conn) and r.p.holds(f.conn)
    assert f.conn.seq_check is False
    ctx = r.p.hooks("conn_add")[0]
    assert ctx.proto_state == "ESTABLISHED" and ctx.orig == f.conn.orig


def test_real_control_far_advanced_seq_is_invalid_without_offload():
    """Control: a never-offloaded conn rejects a segment 50 MB ahead (the check is live)."""
    r = Router(policy=EligibilityPolicy(protocols=frozenset({17})))
    f = TcpFlow(r)
    f.handshake()
    f.nxt["a"] += GAP
    assert f.run("a", "PA", 2.0, 100).state & CS.INV


def test_real_withdraw_then_far_advanced_packets_are_not_invalid():
    """After un-offload the next packets, 50 MB further on both sides, stay valid."""
    r = Router()
    f = TcpFlow(r)
    f.handshake()
    f.fast(5.0)
    assert r.mgr.withdraw(f.conn, 6.0, "route-change")
    assert f.conn.seq_check is True and not r.p.held
    for who in ("a", "b", "a", "b"):
        res = f.run(who, "PA", 7.0, 500)
        assert not res.state & CS.INV, r.ct.stats.invalid_reasons
    assert r.ct.stats.invalid == 0


def test_real_fin_punted_from_fast_path_withdraws_and_teardown_is_valid():
    """A FIN (punted by XDP) with far-advanced seq ends the offload; the close is valid."""
    r = Router()
    f = TcpFlow(r)
    f.handshake()
    f.fast(5.0)
    res = f.run("a", "FA", 6.0)  # seq check still off while offloaded: accepted
    assert not res.state & CS.INV and f.conn.state_name != "ESTABLISHED"
    assert not r.mgr.is_offloaded(f.conn) and not r.p.held and f.conn.seq_check
    assert r.mgr.stats["withdrawn"] == {Reason.NOT_ESTABLISHED: 1}
    for who, flags in (("b", "A"), ("b", "PA"), ("b", "FA"), ("a", "A")):
        res = f.run(who, flags, 7.0, 10 if "P" in flags else 0)
        assert not res.state & CS.INV, (who, flags, r.ct.stats.invalid_reasons)
    assert not r.mgr.is_offloaded(f.conn)  # a closing conn is never re-offered


def test_real_rst_withdraws_and_expiry_sends_no_second_del():
    """RST from the server un-offloads; the later expiry sends no further DEL."""
    r = Router(cfg=CtConfig(timeouts={"tcp_closed": 5.0}))
    f = TcpFlow(r)
    f.handshake()
    f.fast(2.0)
    assert not f.run("b", "R", 3.0).state & CS.INV
    assert not r.p.held and len(r.p.hooks("conn_del")) == 1
    r.ct.sweep(100.0)
    assert len(r.ct) == 0 and len(r.p.hooks("conn_del")) == 1


def test_real_udp_offloaded_after_reply_without_seq_calls():
    """UDP is offloaded once the reply was forwarded (BIDIR)."""
    r = Router()
    out = _frame(IP(src=IP_A, dst=IP_B) / UDP(sport=5353, dport=53) / Raw(b"q"))
    back = _frame(IP(src=IP_B, dst=IP_A) / UDP(sport=53, dport=5353) / Raw(b"a"))
    c = r.slow(out, 1.0).conn
    r.slow(bytearray(out), 1.1)
    assert not r.mgr.is_offloaded(c)
    r.slow(back, 1.2)
    assert r.mgr.is_offloaded(c) and c.state_name == "BIDIR" and c.seq_check is True


def test_real_icmp_echo_offloaded_after_reply():
    """ICMP echo is offloaded after the echo reply (both directions keyed by the id)."""
    r = Router()
    req = _frame(IP(src=IP_A, dst=IP_B) / ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    rep = _frame(IP(src=IP_B, dst=IP_A) / ICMP(type=0, id=77, seq=1) / Raw(b"ping"))
    c = r.slow(req, 1.0).conn
    r.slow(rep, 1.0)
    assert r.mgr.is_offloaded(c) and r.p.hooks("conn_add")[0].orig.sport == 77


def test_real_snat_ctx_carries_translated_reply_tuple():
    """With SNAT the ctx has snat set and the reply tuple addressed to the NAT address."""
    nat = NatAction("snat", ipaddress_packed(IP_NAT))
    r = Router(nat=nat)
    out = _frame(IP(src=IP_A, dst=IP_B) / UDP(sport=5000, dport=53) / Raw(b"q"))
    c = r.slow(out, 1.0).conn
    back = _frame(IP(src=IP_B, dst=IP_NAT) / UDP(sport=53, dport=c.reply.dport) / Raw(b"a"))
    r.slow(back, 1.0)
    (ctx,) = r.p.hooks("conn_add")
    assert ctx.snat and not ctx.dnat
    assert ctx.reply.dst == ipaddress_packed(IP_NAT)
    assert ctx.dirs[0].out.src == ipaddress_packed(IP_NAT)  # orig leaves translated
    assert ctx.dirs[1].out.dst == ipaddress_packed(IP_A)  # reply leaves untranslated


def test_real_min_pkts_rechecked_from_tracker_updates():
    """min_pkts: the tracker's per-packet on_update triggers the ADD at the threshold."""
    r = Router(policy=EligibilityPolicy(min_pkts=6))
    f = TcpFlow(r)
    f.handshake()  # 3 packets
    assert r.mgr.reason(f.conn) == Reason.MIN_PKTS
    f.run("b", "PA", 2.0, 10)
    f.run("a", "A", 2.0)
    assert not r.mgr.is_offloaded(f.conn)
    f.run("a", "PA", 2.0, 10)  # 6th packet
    assert r.mgr.is_offloaded(f.conn)


def test_real_aging_keeps_offloaded_conn_alive_then_expiry_deletes():
    """Last-used read-back pushes expiry out; without fast-path traffic it expires with DEL."""
    r = Router(cfg=CtConfig(timeouts={"tcp_established": 10.0}))
    f = TcpFlow(r)
    f.handshake(now=1.0)  # expires at 11
    r.p.touch(f.conn, 9.0)
    assert r.mgr.age(9.5) == 1 and f.conn.expires == 19.0
    r.ct.sweep(15.0)
    assert len(r.ct) == 1 and r.mgr.is_offloaded(f.conn)
    r.ct.sweep(25.0)
    assert len(r.ct) == 0 and not r.p.held
    assert r.p.hooks("conn_del") == [f.conn.ext["offload"]]


def test_real_sweep_after_disable_without_withdraw_deletes_offloaded():
    """Offload disabled (no withdraw), then expiry: the offloaded entry is still deleted."""
    r = Router(cfg=CtConfig(timeouts={"tcp_established": 10.0}))
    f = TcpFlow(r)
    f.handshake()
    r.mgr.disable(2.0, withdraw=False)
    with r.mgr.batch(30.0):
        r.ct.sweep(30.0)
    assert not r.p.held and len(r.p.hooks("conn_del")) == 1


def test_real_enable_after_disabled_start_sends_no_deletes():
    """Offload enabled with live never-offloaded conns: ADDs only, zero DELs."""
    r = Router()
    r.mgr.disable(0.0)
    flows = [TcpFlow(r, 40000 + i) for i in range(3)]
    for fl in flows:
        fl.handshake()
    r.mgr.enable(2.0)
    assert r.p.hooks()[1:] == ["conn_add"] * 3
    assert all(fl.conn.seq_check is False for fl in flows)


def test_real_unresolved_neighbour_pending_until_resolved():
    """Next hop without MAC: pending; neigh_resolved installs it with the MAC."""
    r = Router(resolved=False)
    f = TcpFlow(r)
    f.handshake()
    assert r.mgr.reason(f.conn) == Reason.NEIGH_UNRESOLVED and r.p.hooks() == ["init"]
    r.mgr.neigh_resolved(IF_B, B, MAC_B, 2.0)
    assert r.mgr.is_offloaded(f.conn) and f.conn.seq_check is False


def test_real_flush_via_manager():
    """mgr.flush(): providers get one FLUSH, the tracker is emptied, no DELs."""
    r = Router(DummyProvider(batch=True))
    for i in range(4):
        TcpFlow(r, 40000 + i).handshake()
    r.mgr.flush(3.0)
    assert len(r.ct) == 0 and not r.p.held and not r.p.hooks("conn_del")
    assert r.p.hooks()[-1] == "flush"


def test_real_raising_provider_never_breaks_the_tracker():
    """A provider raising in every hook: every packet still tracked, no observer errors."""

    class Broken(DummyProvider):
        def _enter(self, hook, ctx):
            if hook != "init":
                raise RuntimeError(f"broken {hook}")
            return 0

    r = Router(Broken("broken"))
    f = TcpFlow(r)
    f.handshake()
    assert not r.mgr.is_offloaded(f.conn) and f.conn.seq_check
    for who, flags in (("a", "PA"), ("b", "PA"), ("a", "FA"), ("b", "FA"), ("a", "A")):
        res = f.run(who, flags, 2.0, 10 if "P" in flags else 0)
        assert not res.state & CS.INV
    r.mgr.age(3.0)
    r.ct.flush(4.0)
    assert r.ct.stats.observer_errors == 0 and r.ct.stats.invalid == 0
    assert r.mgr.stats["provider_errors"]["broken"] >= 1
    assert r.mgr.stats["offloaded"] == 0


def test_real_delete_by_tracker_while_batch_open():
    """Expiry inside the daemon's burst batch: DEL submitted with the batch, nothing stale."""
    r = Router(DummyProvider(batch=True), cfg=CtConfig(timeouts={"tcp_established": 10.0}))
    f1, f2 = TcpFlow(r, 1), TcpFlow(r, 2)
    f1.handshake(1.0)
    with r.mgr.batch(20.0):
        f2.handshake(20.0)  # ADD queued
        r.ct.sweep(20.0)  # f1 expires: DEL queued
        assert len(r.p.held) == 1
    assert r.p.batches[-1] == 2 and r.p.holds(f2.conn) and not r.p.holds(f1.conn)
