"""ctxdp.providers.keyindex: the key -> slot index, its Python definition
(PyKeyIndex) and the compiled one (_fastadd.KeyIndex) held to it.

No kernel needed. The compiled table is small here (a few hundred entries),
so long probe chains, wrap-around at the table's end and the backward
shift of removals all occur.
"""

from __future__ import annotations

import random

import pytest

from ctxdp.providers import keyindex
from ctxdp.providers.keyindex import KMAX, PyKeyIndex

try:
    from ctxdp.providers._fastadd import KeyIndex as CKeyIndex
except ImportError:  # test_fastadd.py fails for that already
    CKeyIndex = None

IMPLS = [PyKeyIndex] + ([CKeyIndex] if CKeyIndex is not None else [])
K = [bytes([i]) * 20 for i in range(8)]  # IPv4-sized keys
K6 = [bytes([0x60 + i]) * 44 for i in range(4)]  # IPv6-sized keys


def test_the_compiled_index_is_the_one_used():
    """With the extension built, KeyIndex is the compiled one."""
    assert CKeyIndex is not None and keyindex.KeyIndex is CKeyIndex


@pytest.fixture(params=IMPLS, ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def idx(request):
    return request.param(16)


def test_put_then_find_keys_and_dir_of(idx):
    """A slot's keys are found as 2*slot+dir, listed in dir order and matched in a buffer."""
    idx.put(3, (K[0], K[1]))
    idx.put(5, [K6[0]])
    assert (idx.find(K[0]), idx.find(K[1]), idx.find(K6[0]), idx.find(K[2])) == (6, 7, 10, -1)
    assert idx.find(bytearray(K[1])) == 7 and idx.find(memoryview(K[1])) == 7
    assert idx.keys(3) == (K[0], K[1]) and idx.keys(5) == (K6[0],) and idx.keys(0) == ()
    buf = b"x" + K[2] + K[1]
    assert idx.dir_of(3, buf, 21, 20) == 1 and idx.dir_of(3, buf, 1, 20) == -1
    assert idx.dir_of(5, K6[0], 0, 44) == 0 and idx.dir_of(5, K6[0], 0, 20) == -1
    assert len(idx) == 3


def test_put_replaces_the_slots_keys(idx):
    """A second put releases the keys the slot no longer holds, and may reuse one."""
    idx.put(3, (K[0], K[1]))
    idx.put(3, (K[1], K[2]))
    assert (idx.find(K[0]), idx.find(K[1]), idx.find(K[2])) == (-1, 6, 7)
    idx.drop(3)
    assert idx.keys(3) == () and len(idx) == 0 and idx.find(K[1]) == -1
    idx.put(4, (K[1],))  # released keys are free for anyone
    assert idx.find(K[1]) == 8


@pytest.mark.parametrize(
    "keys, err",
    [
        ((K[0], K[1], K[2]), ValueError),  # three keys
        ((K[0], K[0]), ValueError),  # the same key twice
        ((K[0], K6[0]), ValueError),  # two lengths
        ((b"",), ValueError),  # too short
        ((bytes(KMAX + 1),), ValueError),  # too long
        ((K[5],), ValueError),  # held by slot 2
        ((K[0], "x"), TypeError),  # not bytes-like
    ],
)
def test_a_bad_put_changes_nothing(idx, keys, err):
    """Every refused put raises and leaves the index as it was."""
    idx.put(1, (K[3], K[4]))
    idx.put(2, (K[5],))
    with pytest.raises(err):
        idx.put(1, keys)
    assert idx.keys(1) == (K[3], K[4]) and idx.keys(2) == (K[5],) and len(idx) == 3
    assert idx.find(K[0]) == -1


def test_slots_and_buffers_out_of_range(idx):
    """Slot numbers outside the index and reads outside a buffer are IndexErrors."""
    for call in (lambda: idx.keys(16), lambda: idx.put(-1, ()), lambda: idx.drop(16),
                 lambda: idx.dir_of(16, K[0], 0, 20), lambda: idx.dir_of(0, K[0], 1, 20)):
        with pytest.raises(IndexError):
            call()
    with pytest.raises(TypeError):
        idx.put(0, K[0])  # bytes, not a sequence of keys
    with pytest.raises(ValueError):
        idx.find(b"")


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_size_limits(impl):
    """nslots must be 1..2**28."""
    for n in (0, (1 << 28) + 1):
        with pytest.raises(ValueError):
            impl(n)


def test_clear(idx):
    """clear() empties every slot."""
    idx.put(0, (K[0], K[1]))
    idx.put(15, (K6[1], K6[2]))
    idx.clear()
    assert len(idx) == 0 and idx.keys(0) == () and idx.find(K6[1]) == -1
    idx.put(1, (K[0],))
    assert idx.find(K[0]) == 2


@pytest.mark.skipif(CKeyIndex is None, reason="extension not built")
def test_compiled_index_takes_its_memory_up_front():
    """The compiled index maps room for every slot at construction (nbytes)."""
    small, big = CKeyIndex(1), CKeyIndex(1 << 16)
    assert small.nbytes > 0 and big.nbytes >= (1 << 16) * 2 * 20


def _run(impl, seed: int, nslots: int, steps: int) -> list:
    """Apply a random op sequence; return every observable result."""
    rng = random.Random(seed)
    pool = [rng.randbytes(20) for _ in range(3 * nslots)] + [
        rng.randbytes(44) for _ in range(nslots)
    ]
    idx = impl(nslots)
    out: list = []
    for _ in range(steps):
        r = rng.random()
        slot = rng.randrange(nslots)
        try:
            if r < 0.45:
                n = rng.choice([0, 1, 2, 2, 2])
                keys = rng.sample(pool[: 3 * nslots], n) if rng.random() < 0.8 else [
                    rng.choice(pool[3 * nslots :])]
                idx.put(slot, tuple(keys))
                out.append(("put", slot))
            elif r < 0.6:
                idx.drop(slot)
                out.append(("drop", slot))
            elif r < 0.85:
                k = rng.choice(pool)
                out.append(("find", idx.find(k)))
            elif r < 0.95:
                ks = idx.keys(slot)
                out.append(("keys", ks))
                if ks:
                    buf = rng.randbytes(7) + ks[-1]
                    out.append(("dir", idx.dir_of(slot, buf, 7, len(ks[-1]))))
            else:
                out.append(("len", len(idx)))
        except (ValueError, IndexError) as exc:
            out.append(("err", type(exc).__name__))
    out.append(("final", sorted((idx.find(k), k) for k in pool)))
    out.append(("slots", [idx.keys(s) for s in range(nslots)], len(idx)))
    return out


@pytest.mark.skipif(CKeyIndex is None, reason="extension not built")
@pytest.mark.parametrize("seed", range(6))
def test_compiled_index_follows_the_definition(seed):
    """Random puts, drops and lookups give the same results in both implementations."""
    nslots = [4, 16, 64, 100, 128, 250][seed]
    assert _run(CKeyIndex, seed, nslots, 4000) == _run(PyKeyIndex, seed, nslots, 4000)


@pytest.mark.skipif(CKeyIndex is None, reason="extension not built")
def test_compiled_index_at_full_load_and_churn():
    """Every slot holding two keys (the design load), then churn, loses no key."""
    n = 2048
    rng = random.Random(7)
    idx = CKeyIndex(n)
    held: dict[int, tuple[bytes, bytes]] = {}
    for s in range(n):
        held[s] = (rng.randbytes(20), rng.randbytes(20))
        idx.put(s, held[s])
    for _ in range(5):
        for s in rng.sample(range(n), n // 2):
            idx.drop(s)
            held[s] = (rng.randbytes(44), rng.randbytes(44)) if s % 3 else (rng.randbytes(20),)
            idx.put(s, held[s])
        assert len(idx) == sum(len(k) for k in held.values())
        assert all(idx.find(k) == 2 * s + d for s, ks in held.items() for d, k in enumerate(ks))
