"""ctxdp.providers._fastadd (the compiled common case of XdpProvider._add_run)
against its Python definition: the same keys and value bytes as
xdp_layout.conn_entries_into, the same index updates, and a clean stop, with
nothing changed, at every op that is not the common case.

No kernel needed: the function works on the provider's Python state (the
buffers, the key index, the slot allocator, a ct_last_used view), built here.
Tests with the kernel, for both ADD paths, are in tests/bpf/test_xdp.py. The
native writer (``_fastadd.Writer``) is tested at the end, on real BPF maps
(root).
"""

from __future__ import annotations

import errno
import os
import random
import struct
import time

import pytest

from ctxdp import bpfsys
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers import xdp_layout as L
from ctxdp.providers.base import FlowDir, OffloadCtx, Op, OpKind
from ctxdp.providers.keyindex import KeyIndex
from ctxdp.providers.xdp import _FASTADD, _PRIV, _Held, _Pending
from tests.privileged import require_root

VS = L.VAL_SIZE
MAC = [bytes([2, 0, 0, 0, 0, i]) for i in range(4)]


def test_the_extension_is_built():
    """scripts/setup.sh builds the extension; without it installs run at Python speed."""
    assert _FASTADD is not None, "ctxdp.providers._fastadd is not built (gcc, python3-dev?)"


pytestmark = pytest.mark.skipif(_FASTADD is None, reason="extension not built (test above fails)")


class State:
    """The XdpProvider state add_new works on, for ``n`` slots."""

    def __init__(self, n: int, run_len: int) -> None:
        self.p4 = _Pending(4, bytearray(2 * L.KEY4_SIZE * run_len), bytearray(2 * VS * run_len))
        self.p6 = _Pending(6, bytearray(2 * L.KEY_SIZE * run_len), bytearray(2 * VS * run_len))
        self.idx = KeyIndex(n)
        self.free = list(range(n - 1, -1, -1))
        self.lu_buf = bytearray(b"\xff" * 8 * n)  # "stamped": a new slot must be zeroed
        self.lu = memoryview(self.lu_buf).cast("Q")
        self.by_slot: list[_Held | None] = [None] * n

    def add(self, ops: list[Op], i: int = 0) -> tuple[int, int]:
        return _FASTADD.add_new(  # type: ignore[union-attr]
            ops, i, len(ops), self.p4, self.p6, self.idx, self.free, 0, self.lu,
            self.by_slot, 7, _PRIV, VS,
        )  # fmt: skip


def conn(rng: random.Random, fam: int, proto: int, nat: str) -> OffloadCtx:
    """A random connection of ``fam``/``proto`` with ``nat`` in none/snat/dnat."""
    alen = 4 if fam == 4 else 16
    a, b, pub = (rng.randbytes(alen) for _ in range(3))
    echo = proto in (1, 58)
    sp = rng.choice([0, 1, 80, 0x1234, 65535, rng.randrange(65536)])
    dp = sp if echo else rng.randrange(65536)
    np_ = rng.randrange(65536)
    orig = FlowTuple(fam, proto, a, b, sp, dp)
    if nat == "snat":
        reply = FlowTuple(fam, proto, b, pub, dp if not echo else np_, np_)
    elif nat == "dnat":
        reply = FlowTuple(fam, proto, pub, a, np_, np_ if echo else sp)
    else:
        reply = orig.reverse()
    d0 = FlowDir(3, orig, reply.reverse(), 4, MAC[0], MAC[1], rng.choice([1280, 1500, 9000]))
    d1 = FlowDir(4, reply, orig.reverse(), 3, MAC[2], MAC[3], 1500)
    return OffloadCtx(conn=None, zone=0, orig=orig, reply=reply, dirs=[d0, d1])


def mixed(n: int, seed: int = 1) -> list[OffloadCtx]:
    rng = random.Random(seed)
    kinds = [(4, 6), (4, 17), (4, 1), (6, 6), (6, 17), (6, 58)]
    return [conn(rng, *rng.choice(kinds), rng.choice(["none", "snat", "dnat"])) for _ in range(n)]


def test_entries_and_indexes_match_the_python_definition():
    """Keys, value bytes, slots and every index update equal the Python path's."""
    ctxs = mixed(300)
    ops = [Op(OpKind.ADD, c, err=-1) for c in ctxs]
    st = State(512, len(ops))
    assert st.add(ops) == (300, 300)
    seen = {4: 0, 6: 0}
    for i, (op, ctx) in enumerate(zip(ops, ctxs, strict=True)):
        slot = i  # free[-1] first, as the Python path pops it
        want = bytearray(2 * VS)
        k0, k1 = L.conn_entries_into(want, 0, ctx.dirs[0], ctx.dirs[1], slot)
        p = st.p4 if len(k0) == L.KEY4_SIZE else st.p6
        j = seen[p.fam]
        seen[p.fam] += 1
        ks = len(k0)
        assert p.written[j] is op and p.kbuf[2 * ks * j : 2 * ks * (j + 1)] == k0 + k1
        assert p.vbuf[2 * VS * j : 2 * VS * (j + 1)] == want, f"values of op {i}"
        h = ctx.priv[_PRIV]
        assert type(h) is _Held and (h.slot, h.ctx, h.gen) == (slot, ctx, 7)
        assert st.idx.keys(slot) == (k0, k1) and st.by_slot[slot] is h
        assert (st.idx.find(k0), st.idx.find(k1)) == (2 * slot, 2 * slot + 1)
        assert st.lu[slot] == 0 and op.err == 0
    assert (len(st.p4.written), len(st.p6.written)) == (seen[4], seen[6])
    assert len(st.free) == 512  # the caller trims the consumed tail
    assert st.lu[400] == 2**64 - 1  # slots not handed out are left alone
    assert len(st.idx) == 600 and st.idx.keys(400) == ()


def _bad_cases() -> dict[str, object]:
    def unresolved(c, st):
        c.dirs[1].dst_mac = None

    def one_direction(c, st):
        c.dirs[1] = None

    def held(c, st):
        c.priv[_PRIV] = object()

    def key_owned(c, st):
        k0, k1 = L.conn_entries_into(bytearray(2 * VS), 0, c.dirs[0], c.dirs[1], 0)
        st.idx.put(9, (k1,))

    def same_key_twice(c, st):
        c.dirs[1] = c.dirs[0]

    def two_families(c, st):
        c.dirs[1] = mixed(1, seed=9)[0].dirs[1]
        c.dirs[1].match = c.dirs[1].match._replace(family=6, src=bytes(16), dst=bytes(16))

    def short_mac(c, st):
        c.dirs[0].src_mac = b"\x02\x00"

    def big_mtu(c, st):
        c.dirs[0].mtu = 70000

    def port_out_of_range(c, st):
        c.dirs[0].match = c.dirs[0].match._replace(sport=70000)

    def bool_ifindex(c, st):
        c.dirs[0].in_ifindex = True

    def subclass(c, st):
        class Ctx(OffloadCtx):
            __slots__ = ()

        return Ctx(conn=None, zone=0, orig=c.orig, reply=c.reply, dirs=c.dirs)

    return {f.__name__: f for f in (unresolved, one_direction, held, key_owned,
                                    same_key_twice, two_families, short_mac, big_mtu,
                                    port_out_of_range, bool_ifindex, subclass)}


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_stops_at_an_uncommon_op_without_touching_it(case):
    """An op that is not the common case ends the call at its index, unchanged."""
    good, bad, after = mixed(3, seed=5)
    bad.dirs = [d for d in bad.dirs]
    st = State(16, 3)
    replaced = _bad_cases()[case](bad, st)
    if replaced is not None:
        bad = replaced
    ops = [Op(OpKind.ADD, c, err=-1) for c in (good, bad, after)]
    owned = {s: st.idx.keys(s) for s in range(16)}
    priv = list(bad.priv)
    assert st.add(ops) == (1, 1)
    assert ops[1].err == -1 and bad.priv == priv
    mine = good.priv[_PRIV].slot
    assert {s: st.idx.keys(s) for s in range(16) if s != mine} == {
        s: k for s, k in owned.items() if s != mine}
    assert st.by_slot.count(None) == 15
    assert st.add(ops, 2) == (3, 1)  # and it resumes after it


def test_no_free_slot_handles_nothing():
    """With the allocator empty every op is left to Python (ENOSPC there)."""
    ops = [Op(OpKind.ADD, c, err=-1) for c in mixed(2)]
    st = State(4, 2)
    st.free = []
    assert st.add(ops) == (0, 0)
    assert [o.err for o in ops] == [-1, -1] and len(st.idx) == 0


def test_runs_out_of_slots_part_way():
    """It hands out the free slots it was given (their very int objects), then stops."""
    ops = [Op(OpKind.ADD, c, err=-1) for c in mixed(5)]
    st = State(3, 5)
    st.free = [1000 + i for i in (2, 1, 0)]  # not cached small ints: identity tells
    pool = list(st.free)
    st.by_slot += [None] * 1000
    st.lu = memoryview(bytearray(8 * 1003)).cast("Q")
    st.idx = KeyIndex(1003)
    assert st.add(ops) == (3, 3)
    slots = [c.priv[_PRIV].slot for c in (o.ctx for o in ops[:3])]
    assert sorted(slots) == [1000, 1001, 1002]
    assert all(any(s is p for p in pool) for s in slots)


# --- Writer: update-batches in a native thread (needs root: real BPF maps) --------

KW = struct.Struct("=I")
VW = struct.Struct("=Q")


@pytest.fixture
def wmap():
    """A 64-entry hash map u32 -> u64 and a Writer; both closed afterwards."""
    require_root()
    fd = bpfsys.map_create("hash", 4, 8, 64, name="t_fastadd_w")
    w = _FASTADD.Writer()  # type: ignore[union-attr]
    try:
        yield fd, w
    finally:
        w.close()
        os.close(fd)


def entries(n: int, base: int = 0) -> tuple[bytes, bytearray]:
    return (
        b"".join(KW.pack(base + i) for i in range(n)),
        bytearray(b"".join(VW.pack(7 * (base + i)) for i in range(n))),
    )


def in_map(fd: int) -> dict[int, int]:
    out = {}
    for kb, vb, n in bpfsys.map_lookup_batch(fd, 4, 8):
        for i in range(n):
            out[KW.unpack_from(kb, 4 * i)[0]] = VW.unpack_from(vb, 8 * i)[0]
    return out


@pytest.mark.privileged
def test_writer_jobs_land_in_order_with_their_counts(wmap):
    """Every submitted job is written by the thread and wait() reports all entries done."""
    fd, w = wmap
    jobs = [w.submit(fd, *entries(10, 10 * j), 10) for j in range(4)]
    assert [w.wait(j) for j in jobs] == [(10, 0)] * 4
    assert in_map(fd) == {i: 7 * i for i in range(40)}


@pytest.mark.privileged
def test_writer_reports_a_partial_write_like_bpfsys(wmap):
    """A map that fills mid-job gives (entries written, E2BIG); a bad fd refuses up front."""
    fd, w = wmap
    assert w.wait(w.submit(fd, *entries(70), 70)) == (64, errno.E2BIG)
    assert len(in_map(fd)) == 64
    assert w.wait(w.submit(-1, *entries(2), 2)) == (0, errno.EBADF)


@pytest.mark.privileged
def test_writer_holds_the_buffers_until_waited_for(wmap):
    """A job's bytearray cannot be resized until wait(); then it can."""
    fd, w = wmap
    keys, vals = entries(3)
    job = w.submit(fd, keys, vals, 3)
    with pytest.raises(BufferError):
        vals.extend(b"x")
    assert w.wait(job) == (3, 0)
    vals.extend(b"x")
    with pytest.raises(ValueError):
        w.wait(job)


@pytest.mark.privileged
def test_writer_wakes_after_sleeping_and_close_drains(wmap):
    """After the thread slept, wake() and submit still reach it; close() writes what is queued."""
    fd, w = wmap
    w.wake()
    time.sleep(0.01)  # past the thread's polling time: it sleeps
    assert w.wait(w.submit(fd, *entries(2), 2)) == (2, 0)
    time.sleep(0.01)
    w.wake()
    w.submit(fd, *entries(2, 2), 2)  # never waited for
    w.close()
    assert sorted(in_map(fd)) == [0, 1, 2, 3]


@pytest.mark.privileged
def test_writer_works_in_a_forked_child(wmap):
    """A child forked after the thread started gets a writer thread of its own."""
    fd, w = wmap
    assert w.wait(w.submit(fd, *entries(2), 2)) == (2, 0)  # the parent's thread runs
    pid = os.fork()
    if pid == 0:  # child: without its own thread, wait() would block forever
        ok = False
        try:
            ok = w.wait(w.submit(fd, *entries(2, 2), 2)) == (2, 0)
            w.close()
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if done == (0, 0):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's writer never ran its job")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert sorted(in_map(fd)) == [0, 1, 2, 3]
    assert w.wait(w.submit(fd, *entries(1, 4), 1)) == (1, 0)  # the parent's is unharmed
