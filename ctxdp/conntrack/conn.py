"""Connection objects, ct_state flags and the packed table key.

Contract:
- ``CS`` holds Open vSwitch's ct_state bits as plain ints (an IntFlag would
  cost an object per packet): NEW, EST, REL, RPL, INV, TRK, SRC_NAT, DST_NAT.
- A table key is ``bytes``: zone (u16), IP protocol (u8), source address,
  destination address, source port (u16), destination port (u16), all
  network order; the address length (4/16) gives the family, so an IPv4 key
  is 15 bytes and an IPv6 key 39. For ICMP echo both ports are the echo id;
  for protocols without ports both are 0 (the ``FlowTuple`` convention).
- ``Conn`` stores only its two keys (original, and reply after NAT); ``orig``
  and ``reply`` decode ``FlowTuple`` views on demand. This keeps a tracked
  connection well under 1 KiB, which matters at a million connections.
- ``pkts`` / ``bytes`` are ``[orig, reply]`` lists, ``ext`` is created on
  first use, TCP peer state lives inline in ``TcpConn`` slots. The zone is
  read from the key; ``helper``/``parent``/``children`` (ALG relations, rare)
  are kept in ``ext`` under ``_``-prefixed names.
"""

from __future__ import annotations

from struct import Struct
from typing import TYPE_CHECKING, Any

from ctxdp.conntrack.flowtuple import FlowTuple

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.nat import NatInfo
    from ctxdp.conntrack.proto import ProtoHandler

__all__ = [
    "CS",
    "cs_str",
    "Conn",
    "TcpConn",
    "CtResult",
    "pack_key",
    "key_of_tuple",
    "tuple_of_key",
    "zone_of_key",
    "reverse_key",
    "KEY4",
    "KEY6",
]


class CS:
    """ct_state bits, numerically equal to OVS's ``CS_*`` flags."""

    NEW = 0x01
    EST = 0x02
    REL = 0x04
    RPL = 0x08
    INV = 0x10
    TRK = 0x20
    SRC_NAT = 0x40
    DST_NAT = 0x80


_CS_NAMES = (
    (CS.NEW, "new"),
    (CS.EST, "est"),
    (CS.REL, "rel"),
    (CS.RPL, "rpl"),
    (CS.INV, "inv"),
    (CS.TRK, "trk"),
    (CS.SRC_NAT, "snat"),
    (CS.DST_NAT, "dnat"),
)


def cs_str(state: int) -> str:
    """``ovs-ofctl`` style rendering, e.g. ``+trk+est+rpl`` (``-trk`` for 0)."""
    parts = [f"+{name}" for bit, name in _CS_NAMES if state & bit]
    return "".join(parts) or "-trk"


KEY4 = Struct("!HB4s4sHH")
KEY6 = Struct("!HB16s16sHH")
_K4_LEN = KEY4.size
_pack4 = KEY4.pack
_pack6 = KEY6.pack


def pack_key(zone: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The packed table key of one direction (see the module contract)."""
    if len(src) == 4:
        return _pack4(zone, proto, src, dst, sport, dport)
    return _pack6(zone, proto, src, dst, sport, dport)


def reverse_key(key: bytes) -> bytes:
    """The key of the opposite direction (no NAT): swap addresses and ports."""
    if len(key) == _K4_LEN:
        z, p, s, d, sp, dp = KEY4.unpack(key)
        return _pack4(z, p, d, s, dp, sp)
    z, p, s, d, sp, dp = KEY6.unpack(key)
    return _pack6(z, p, d, s, dp, sp)


def key_of_tuple(zone: int, t: FlowTuple) -> bytes:
    """Packed key of ``t`` in ``zone``."""
    return pack_key(zone, t.proto, t.src, t.dst, t.sport, t.dport)


def tuple_of_key(key: bytes) -> FlowTuple:
    """Decode a packed key into a ``FlowTuple`` (zone dropped)."""
    if len(key) == _K4_LEN:
        _, p, s, d, sp, dp = KEY4.unpack(key)
        return FlowTuple(4, p, s, d, sp, dp)
    _, p, s, d, sp, dp = KEY6.unpack(key)
    return FlowTuple(6, p, s, d, sp, dp)


def zone_of_key(key: bytes) -> int:
    return (key[0] << 8) | key[1]


# Conn._f bits.
F_DEAD = 0x01  # deleted from the table; stale timer entries skip it
F_EST_SEEN = 0x02  # on_established already dispatched
F_RELEARN0 = 0x04  # TCP: originator's window must be re-learned
F_RELEARN1 = 0x08  # TCP: responder's window must be re-learned
F_RELEARN = F_RELEARN0 | F_RELEARN1


class Conn:
    """One tracked (committed) connection. Mutated only by its ``ConnTracker``."""

    __slots__ = (
        "key",  # packed original-direction key (includes the zone)
        "rkey",  # packed reply-direction key, after NAT
        "handler",  # the ProtoHandler that owns pstate
        "pstate",  # protocol state index into handler.states
        "expires",
        "created",
        "mark",
        "labels",
        "nat",  # None or NatInfo
        "ext",  # None until a module stores something
        "seq_check",
        "pkts",
        "bytes",
        "_tslot",  # expiry bucket this conn is filed in, None when unfiled
        "_f",
    )

    def __init__(self, handler: ProtoHandler, now: float) -> None:
        self.key = b""
        self.rkey = b""
        self.handler = handler
        self.pstate = 0
        self.expires = now
        self.created = now
        self.mark = 0
        self.labels = 0
        self.nat: NatInfo | None = None
        self.ext: dict[str, Any] | None = None
        self.seq_check = True
        self.pkts = [0, 0]
        self.bytes = [0, 0]
        self._tslot: float | None = None
        self._f = 0

    # -- views ---------------------------------------------------------------
    @property
    def orig(self) -> FlowTuple:
        """Original-direction tuple, as the originator sent it (before NAT)."""
        return tuple_of_key(self.key)

    @property
    def reply(self) -> FlowTuple:
        """Reply-direction tuple as it appears on the wire (after NAT)."""
        return tuple_of_key(self.rkey)

    @property
    def zone(self) -> int:
        """Conntrack zone (stored in the key)."""
        k = self.key
        return (k[0] << 8) | k[1]

    # ALG relations are rare, so they live in ``ext`` instead of costing
    # three slots on every connection.
    @property
    def helper(self) -> str | None:
        """ALG helper name, or None."""
        e = self.ext
        return None if e is None else e.get("_helper")

    @helper.setter
    def helper(self, name: str | None) -> None:
        self.ext_dict()["_helper"] = name

    @property
    def parent(self) -> Conn | None:
        """Master connection of a related (expected) connection, or None."""
        e = self.ext
        return None if e is None else e.get("_parent")

    @parent.setter
    def parent(self, conn: Conn | None) -> None:
        self.ext_dict()["_parent"] = conn

    @property
    def children(self) -> int:
        """Number of live related connections whose ``parent`` is this one."""
        e = self.ext
        return 0 if e is None else e.get("_children", 0)

    @children.setter
    def children(self, n: int) -> None:
        self.ext_dict()["_children"] = n

    @property
    def proto(self) -> int:
        return self.key[2]

    @property
    def family(self) -> int:
        return 4 if len(self.key) == _K4_LEN else 6

    @property
    def state_name(self) -> str:
        """Protocol state name, e.g. ``ESTABLISHED``, ``SYN_SENT``, ``BIDIR``."""
        return self.handler.states[self.pstate]

    @property
    def established(self) -> bool:
        """True while the connection is in its protocol's established state
        (TCP ESTABLISHED, UDP/other replied, ICMP echo replied)."""
        return self.pstate == self.handler.established_state

    @property
    def alive(self) -> bool:
        """False once the connection has been deleted from its tracker."""
        return not self._f & F_DEAD

    @property
    def timeout_name(self) -> str:
        """Name of the timeout (``CtConfig.timeouts`` key) of the current state."""
        return self.handler.timeout_keys[self.pstate]

    def ext_dict(self) -> dict[str, Any]:
        """``ext``, created on first use (modules may also test ``ext is None``)."""
        e = self.ext
        if e is None:
            e = self.ext = {}
        return e

    def __repr__(self) -> str:
        return (
            f"<Conn zone={self.zone} {self.orig} state={self.state_name}"
            f"{' nat' if self.nat else ''} expires={self.expires:.3f}>"
        )


class TcpConn(Conn):
    """A TCP connection: ``Conn`` plus the pf/OVS per-peer window state inline.

    Peer 0 is the originator, peer 1 the responder. ``lo``: highest sequence
    number sent + 1 (seqlo); ``hi``: highest sequence the peer may send
    (the other end's ack + window, seqhi); ``mw``: largest unscaled window
    seen; ``ws``: window-scale byte (OVS encoding: 0x80 = option seen,
    0x40 = unknown, low nibble = shift); ``st``: per-peer TCP state (OVS
    ``CT_DPIF_TCPS_*`` numbering).
    """

    __slots__ = ("lo0", "hi0", "mw0", "ws0", "st0", "lo1", "hi1", "mw1", "ws1", "st1")

    def __init__(self, handler: ProtoHandler, now: float) -> None:
        super().__init__(handler, now)
        self.lo0 = self.hi0 = self.mw0 = self.ws0 = self.st0 = 0
        self.lo1 = self.hi1 = self.mw1 = self.ws1 = self.st1 = 0


class CtResult:
    """What ``ConnTracker.execute`` tells the caller about one packet.

    ``state``: CS bits; ``conn``: the connection or None; ``reply``: packet
    travels in the reply direction; ``reason``: why the packet is invalid or
    a new connection was refused (``""`` otherwise).
    """

    __slots__ = ("state", "conn", "reply", "reason")

    def __init__(self, state: int, conn: Conn | None, reply: bool, reason: str = "") -> None:
        self.state = state
        self.conn = conn
        self.reply = reply
        self.reason = reason

    @property
    def invalid(self) -> bool:
        return bool(self.state & CS.INV)

    def __repr__(self) -> str:
        r = f" reason={self.reason}" if self.reason else ""
        return f"<CtResult {cs_str(self.state)} conn={self.conn!r}{r}>"
