"""The XDP provider's key -> slot index: which connection holds each map key.

Contract:

- ``KeyIndex(nslots)``: ``nslots`` slots (one per offloaded connection, the
  provider's slot numbers), each holding the keys of that connection's
  direction entries: at most two (dir 0 and 1), distinct, of one length
  (1..44 bytes; a key's length tells its family's map). A key is held by
  at most one (slot, dir) -- the provider's guarantee that no two
  connections own one map entry.
- ``find(key) -> int``: ``2 * slot + dir`` holding ``key`` (any bytes-like
  object), or -1.
- ``keys(slot) -> tuple[bytes, ...]``: the slot's keys, in dir order.
- ``put(slot, keys)``: the slot holds exactly ``keys`` (a tuple or list)
  from now on, its earlier keys released. ValueError, with nothing
  changed, when a key is held by another slot, the two keys are equal or
  differ in length, or a length is out of range; IndexError for a slot out
  of range.
- ``drop(slot)`` is ``put(slot, ())``; ``clear()`` empties every slot.
- ``dir_of(slot, buf, off, klen) -> int``: the dir of ``slot`` whose key is
  ``buf[off:off + klen]``, or -1 (for entries of a lookup-batch buffer,
  without slicing it).
- ``len(index)``: keys held.

``KeyIndex`` is ``_fastadd.KeyIndex`` when the extension is built: its
memory for every slot is mapped and populated at construction (about
``100 * nslots`` bytes, ``nbytes`` tells), so installing a connection
allocates nothing for its keys and never grows a table. Why that matters:
on this project's VMs the first touch of fresh memory costs ~10 us per
page, and a dict of key bytes plus two bytes objects and a tuple per
connection made that the largest cost of a bulk install
(docs/architecture.md). ``PyKeyIndex`` is the definition, in Python: the
fallback without the extension, and what tests/unit/test_keyindex.py holds
the compiled one to.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["KMAX", "KeyIndex", "PyKeyIndex"]

#: The longest key (struct ct_flow_key, the IPv6 map's key).
KMAX = 44


class PyKeyIndex:
    """The key -> slot index in Python dicts; see the module contract."""

    __slots__ = ("_ref", "_keys", "nslots")

    def __init__(self, nslots: int) -> None:
        if not 1 <= nslots <= 1 << 28:
            raise ValueError("KeyIndex: nslots must be in 1..268435456")
        self.nslots = nslots
        self._ref: dict[bytes, int] = {}
        self._keys: list[tuple[bytes, ...]] = [()] * nslots

    @property
    def nbytes(self) -> int:
        return 0  # grows with use; nothing is taken up front

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            raise IndexError(f"KeyIndex: slot {slot} out of range")
        return slot

    def find(self, key) -> int:
        k = bytes(key)
        if not 1 <= len(k) <= KMAX:
            raise ValueError(f"KeyIndex: a key is 1..{KMAX} bytes, not {len(k)}")
        return self._ref.get(k, -1)

    def keys(self, slot: int) -> tuple[bytes, ...]:
        return self._keys[self._slot(slot)]

    def put(self, slot: int, keys: Sequence) -> None:
        self._slot(slot)
        if not isinstance(keys, (tuple, list)):
            raise TypeError("KeyIndex.put: keys must be a tuple or a list")
        if len(keys) > 2:
            raise ValueError("KeyIndex.put: at most two keys per slot")
        new = tuple(bytes(k) for k in keys)
        for k in new:
            if not 1 <= len(k) <= KMAX:
                raise ValueError(f"KeyIndex: a key is 1..{KMAX} bytes, not {len(k)}")
        if len(new) == 2 and (len(new[0]) != len(new[1]) or new[0] == new[1]):
            raise ValueError("KeyIndex.put: a slot's two keys are distinct and of one length")
        for d, k in enumerate(new):
            ref = self._ref.get(k, -1)
            if ref >= 0 and ref >> 1 != slot:
                raise ValueError(f"KeyIndex.put: key {d} is held by slot {ref >> 1}")
        for k in self._keys[slot]:
            del self._ref[k]
        for d, k in enumerate(new):
            self._ref[k] = 2 * slot + d
        self._keys[slot] = new

    def drop(self, slot: int) -> None:
        self.put(slot, ())

    def dir_of(self, slot: int, buf, off: int, klen: int) -> int:
        if off < 0 or klen < 0 or off + klen > len(buf):
            raise IndexError("KeyIndex.dir_of: key outside the buffer")
        k = bytes(memoryview(buf)[off : off + klen])
        for d, held in enumerate(self.keys(slot)):
            if held == k:
                return d
        return -1

    def clear(self) -> None:
        self._ref.clear()
        self._keys = [()] * self.nslots

    def __len__(self) -> int:
        return len(self._ref)


try:  # the compiled one (ctxdp/providers/_fastadd.c over _keyindex.h)
    from ctxdp.providers._fastadd import KeyIndex
except ImportError:  # not built: the definition does the job
    KeyIndex = PyKeyIndex  # type: ignore[misc,assignment]
