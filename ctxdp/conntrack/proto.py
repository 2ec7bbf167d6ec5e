"""Per-protocol handler interface, the ``other``/``udp`` handlers and the table.

Contract (Open vSwitch's ``struct ct_l4_proto``):
- ``valid_new(pkt)``: may this packet create a connection?
- ``new_conn(pkt, now)``: a fresh, uncommitted ``Conn`` (or subclass) with
  the protocol's initial state in ``pstate``.
- ``update(conn, pkt, reply, now)`` -> one of the ``UPD_*`` codes, after
  moving ``conn.pstate``. On ``UPD_INVALID`` the handler leaves a short
  reason in ``self.reason``. The tracker, not the handler, applies the state's
  timeout (so a handler never touches expiry bookkeeping).
- ``states[i]`` names state ``i``; ``timeout_keys[i]`` is its
  ``CtConfig.timeouts`` key; ``timeouts[i]`` the resolved seconds;
  ``established_state`` is the index that counts as established.
- ``make_handlers(cfg)`` builds the table for one tracker: TCP, UDP, ICMP,
  ICMPv6, and ``other`` as the default for every other IP protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctxdp.conntrack.conn import Conn

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.config import CtConfig
    from ctxdp.packet import Packet

__all__ = [
    "UPD_OK",
    "UPD_INVALID",
    "UPD_NEW",
    "UPD_OK_NEW",
    "UPD_OK_QUIET",
    "ProtoHandler",
    "OtherHandler",
    "UdpHandler",
    "make_handlers",
]

UPD_OK = 0  # valid; ct_state +est
UPD_INVALID = 1  # invalid; ct_state +inv, connection untouched
UPD_NEW = 2  # the connection is over and this packet starts a new one (reopen)
UPD_OK_NEW = 3  # valid but the connection is still unreplied; ct_state +new
UPD_OK_QUIET = 4  # valid, +est, but the timeout must not be refreshed (pf loose path)


class ProtoHandler:
    """Base handler. Subclasses set the class attributes and override hooks."""

    name = "base"
    states: tuple[str, ...] = ()
    timeout_keys: tuple[str, ...] = ()
    established_state = -1
    conn_class: type[Conn] = Conn

    __slots__ = ("timeouts", "reason")

    def __init__(self, cfg: CtConfig) -> None:
        self.timeouts = [cfg.timeout(k) for k in self.timeout_keys]
        self.reason = ""

    def valid_new(self, pkt: Packet) -> bool:
        return True

    def new_conn(self, pkt: Packet, now: float) -> Conn:
        return self.conn_class(self, now)

    def update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> int:
        raise NotImplementedError

    def on_relearn(self, conn: Conn) -> None:
        """Sequence checking was switched back on for ``conn`` (TCP only)."""


# OVS conntrack-other.c states.
FIRST, MULTIPLE, BIDIR = 0, 1, 2


class OtherHandler(ProtoHandler):
    """Any IP protocol without a dedicated handler: unreplied / replied."""

    name = "other"
    states = ("FIRST", "MULTIPLE", "BIDIR")
    timeout_keys = ("other_first", "other_multiple", "other_bidir")
    established_state = BIDIR

    __slots__ = ()

    def update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> int:
        st = conn.pstate
        if reply:
            if st != BIDIR:
                conn.pstate = BIDIR
            return UPD_OK
        if st == BIDIR:
            return UPD_OK
        # Still unreplied: OVS reports such packets as +new (CT_UPDATE_VALID_NEW).
        conn.pstate = MULTIPLE
        return UPD_OK_NEW


class UdpHandler(OtherHandler):
    """UDP: the ``other`` state machine with its own timeout keys."""

    name = "udp"
    timeout_keys = ("udp_first", "udp_multiple", "udp_bidir")

    __slots__ = ()


def make_handlers(cfg: CtConfig) -> tuple[dict[int, ProtoHandler], ProtoHandler]:
    """The handler table for one tracker and its default (``other``) handler."""
    from ctxdp.conntrack.icmp import Icmp4Handler, Icmp6Handler  # noqa: PLC0415 - cycle
    from ctxdp.conntrack.tcp import TcpHandler  # noqa: PLC0415 - cycle

    table: dict[int, ProtoHandler] = {
        6: TcpHandler(cfg),
        17: UdpHandler(cfg),
        1: Icmp4Handler(cfg),
        58: Icmp6Handler(cfg),
    }
    return table, OtherHandler(cfg)
