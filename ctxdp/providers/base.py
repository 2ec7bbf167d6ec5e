"""The offload provider interface (modelled on Open vSwitch's conntrack
offload provider hooks) and the context that carries a connection to it.

Contract:
- ``conn_add`` returns 0 or a positive errno: ``ENOSPC`` (table full, stays in
  the slow path), ``EAGAIN`` (pending: e.g. next hop unresolved, offer again
  later), ``EIO`` or anything else (refused). A provider that raises is treated
  by the offload manager as returning ``EIO``.
- A connection is "held" by a provider only after ``conn_add`` returned 0;
  ``conn_del`` is only ever sent to providers that hold the connection.
- ``conn_update`` returns the last time (seconds, same clock as ``now``) the
  fast path saw either direction of the flow, ``None`` if it never did, or
  raises ``ProviderError`` when the entry is gone or unreadable (the manager
  then returns the connection to the slow path).
- ``batch_submit`` is optional. When present it receives a whole ``Batch`` and
  must set ``op.err`` (and ``op.result`` for UPD) on every op.
- ``conn_update_many`` is what the lazy aging calls, once per sweep with the
  held connections whose deadline came; override it when a bulk read is
  cheaper (the XDP provider reads an mmap).
- ``fold_counters(ctxs | None) -> int`` is optional, for providers that count
  packets per entry: add what each held connection of ``ctxs`` (None: all it
  holds) forwarded since the previous fold to ``ctx.conn.pkts`` /
  ``ctx.conn.bytes`` (``[orig, reply]``); return how many it folded. Such a
  provider also folds an entry's counters itself just before deleting or
  rewriting it (DEL, POLICY, FLUSH), so no count is lost between folds.
- Nothing here imports bcc, sockets or pyroute2.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ctxdp.conntrack.flowtuple import FlowTuple

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable


class ProviderError(Exception):
    """A provider could not complete an operation; ``errno`` says why."""

    def __init__(self, errno: int, msg: str = "") -> None:
        super().__init__(msg or f"provider error errno={errno}")
        self.errno = errno


@dataclass(slots=True, eq=False)
class FlowDir:
    """One direction of an offloaded connection, as the fast path sees it.

    ``match`` is the tuple on the wire at ``in_ifindex``; ``out`` is the tuple
    after NAT, to be written to the packet (equal to ``match`` without NAT).
    ``dst_mac`` is None while the next hop is unresolved.
    """

    in_ifindex: int
    match: FlowTuple
    out: FlowTuple
    out_ifindex: int
    src_mac: bytes | None
    dst_mac: bytes | None
    mtu: int = 1500

    @property
    def resolved(self) -> bool:
        return self.src_mac is not None and self.dst_mac is not None and self.out_ifindex > 0


#: Entries of ``OffloadCtx.priv``: one per provider kind that keeps state per
#: connection there.
PRIV_XDP = 0
PRIV_SLOTS = 1


@dataclass(slots=True, eq=False)
class OffloadCtx:
    """Everything a provider needs to offload one connection.

    ``orig`` is the original-direction tuple before NAT; ``reply`` is the
    reply-direction tuple as seen on the wire (after NAT). ``dirs[0]`` is the
    original direction, ``dirs[1]`` the reply direction; either is None until
    the slow path has forwarded a packet that way. ``priv`` is per-provider
    scratch space: one entry per provider kind that keeps per-connection
    state (index ``PRIV_XDP``...), None when unused. A list made with the
    ctx rather than a dict keyed by name: the first insert into an empty dict
    allocates its table (~120 bytes) on the install path of every offloaded
    connection.
    """

    conn: Any  # the owner ctxdp.conntrack Conn
    zone: int
    orig: FlowTuple
    reply: FlowTuple
    snat: bool = False
    dnat: bool = False
    dirs: list[FlowDir | None] = field(default_factory=lambda: [None, None])
    proto_state: str = ""
    mark: int = 0
    priv: list[Any] = field(default_factory=lambda: [None] * PRIV_SLOTS)

    @property
    def resolved(self) -> bool:
        """Both directions known and their next hops resolved.

        Written out rather than ``all(...)`` over the directions: the offload
        manager and providers ask this on every offer, and a generator costs
        about four times as much.
        """
        d0, d1 = self.dirs
        return (
            d0 is not None
            and d1 is not None
            and d0.src_mac is not None
            and d0.dst_mac is not None
            and d0.out_ifindex > 0
            and d1.src_mac is not None
            and d1.dst_mac is not None
            and d1.out_ifindex > 0
        )


class OpKind(enum.Enum):
    ADD = "add"
    DEL = "del"
    UPD = "upd"
    EST = "est"
    POLICY = "policy"
    FLUSH = "flush"


@dataclass(slots=True, eq=False)
class Op:
    """One operation in a batch; the provider fills ``err`` and ``result``."""

    kind: OpKind
    ctx: OffloadCtx | None
    err: int = 0
    result: Any = None


@dataclass(slots=True, eq=False)
class Batch:
    ops: list[Op] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self):
        return iter(self.ops)


class Provider:
    """Base class: every hook has a safe default; subclasses override."""

    name: str = "base"

    def init(self) -> int:
        """Prepare the provider; 0 or errno."""
        return 0

    def can_offload(self, ctx: OffloadCtx) -> bool:
        """Whether this provider could take ``ctx`` at all (protocol, ports...)."""
        return True

    def conn_add(self, ctx: OffloadCtx) -> int:
        raise NotImplementedError

    def conn_del(self, ctx: OffloadCtx) -> int:
        raise NotImplementedError

    def conn_established(self, ctx: OffloadCtx) -> int:
        """The connection became established (e.g. after a UDP reply)."""
        return 0

    def conn_update(self, ctx: OffloadCtx) -> float | None:
        """Last-used time of the flow, or None if the fast path never saw it."""
        return None

    def conn_policy(self, ctx: OffloadCtx) -> int:
        """The forwarding decision of ``ctx`` changed (MAC, route): rewrite it."""
        return 0

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        """Release kernel resources; called once at shutdown."""

    def stats(self) -> dict[str, int]:
        return {}

    # ``batch_submit(self, batch: Batch) -> None`` is optional: providers that
    # define it receive whole batches. Its absence is how the manager knows.
    def conn_update_many(self, ctxs: Iterable[OffloadCtx]) -> list[float | None]:
        """Aging read-back for many connections; override for a cheap bulk path."""
        return [self.conn_update(c) for c in ctxs]
