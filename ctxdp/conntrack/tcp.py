"""TCP handler: the pf / Open vSwitch state machine with sequence and window tracking.

Contract:
- Each peer keeps seqlo (highest sequence sent + 1), seqhi (highest sequence
  it may send: the other end's ack + scaled window), max_win and the window
  scale, as in pf and OVS lib/conntrack-tcp.c (Guido van Rooij's algorithm).
  A segment must end inside the receiver's window, start no more than one
  window back (retransmits pass), and ack no further than the other side has
  sent (± a window); otherwise it is invalid and the connection is untouched.
  A RST must carry (almost) exactly the expected sequence number.
- SYN without ACK when both peers are at FIN_WAIT_2 or later (closed or
  TIME_WAIT) returns ``UPD_NEW``: the tracker deletes and re-creates the
  connection (port reuse).
- Sequence checking is skipped when ``CtConfig.tcp_seq_check`` or
  ``conn.seq_check`` is off (state transitions still happen). When a
  connection's check is switched back on, each peer's next segment re-seeds
  its seqlo/max_win and the other peer's seqhi instead of being judged, and
  judging resumes once both peers have been re-seeded: windows that moved
  while the fast path carried the flow never make mid-stream packets invalid.
- Connection states (``pstate``) are the timeout classes OVS derives from the
  two peer states: SYN_SENT (first packet only), SYN_RECV (opening),
  ESTABLISHED, FIN_WAIT (one side closing), CLOSING (both sent FIN),
  TIME_WAIT (both FINs acked) and CLOSED (reset).
- Packets reported +new: originator packets while the responder has not
  spoken yet (like Linux); everything else valid is +est.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctxdp.conntrack.conn import F_RELEARN, F_RELEARN0, F_RELEARN1, Conn, TcpConn
from ctxdp.conntrack.proto import (
    UPD_INVALID,
    UPD_NEW,
    UPD_OK,
    UPD_OK_NEW,
    UPD_OK_QUIET,
    ProtoHandler,
)

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.config import CtConfig
    from ctxdp.packet import Packet

__all__ = [
    "TcpHandler",
    "TCPS_CLOSED",
    "TCPS_SYN_SENT",
    "TCPS_ESTABLISHED",
    "TCPS_CLOSING",
    "TCPS_FIN_WAIT_2",
    "TCPS_TIME_WAIT",
    "PEER_STATE_NAMES",
    "tcp_invalid_flags",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSING",
    "TIME_WAIT",
    "CLOSED",
]

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# Per-peer states, numbered like OVS's CT_DPIF_TCPS_* (only some are used).
TCPS_CLOSED = 0
TCPS_SYN_SENT = 2
TCPS_ESTABLISHED = 4
TCPS_CLOSING = 7
TCPS_FIN_WAIT_2 = 9
TCPS_TIME_WAIT = 10
PEER_STATE_NAMES = {
    0: "CLOSED", 1: "LISTEN", 2: "SYN_SENT", 3: "SYN_RECV", 4: "ESTABLISHED",
    5: "CLOSE_WAIT", 6: "FIN_WAIT_1", 7: "CLOSING", 8: "LAST_ACK", 9: "FIN_WAIT_2",
    10: "TIME_WAIT",
}  # fmt: skip

# Connection states (pstate): index into TcpHandler.states / timeout_keys.
SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSING, TIME_WAIT, CLOSED = range(7)

WS_FLAG = 0x80  # window scale option seen
WS_UNKNOWN = 0x40  # connection picked up mid-stream: scale unknown, be liberal
WS_MASK = 0x0F
MAX_WSCALE = 14
MAXACKWINDOW = 0xFFFF + 1500  # pf's fudge: one max window plus a packet

M32 = 0xFFFFFFFF
H32 = 0x80000000


def tcp_invalid_flags(flags: int) -> bool:
    """Flag combinations no TCP stack sends (pf's normalisation rules)."""
    if flags & SYN:
        if flags & (RST | FIN):
            return True
    elif not flags & (ACK | RST):
        return True
    return bool(not flags & ACK and flags & (FIN | PSH | URG))


_BAD_FLAGS = tuple(tcp_invalid_flags(f) for f in range(256))


def _ws_of(pkt: Packet) -> int:
    """OVS-encoded window scale of a SYN segment."""
    v = pkt.wscale
    if v < 0:
        return 0
    return (v if v < MAX_WSCALE else MAX_WSCALE) | WS_FLAG


def _cls(s: int, d: int) -> int:
    """Connection state from the two peer states (OVS's timeout choice)."""
    if s >= TCPS_FIN_WAIT_2 and d >= TCPS_FIN_WAIT_2:
        return CLOSED if (s == TCPS_TIME_WAIT or d == TCPS_TIME_WAIT) else TIME_WAIT
    if s >= TCPS_CLOSING and d >= TCPS_CLOSING:
        return CLOSING
    if s < TCPS_ESTABLISHED or d < TCPS_ESTABLISHED:
        return SYN_RECV
    if s >= TCPS_CLOSING or d >= TCPS_CLOSING:
        return FIN_WAIT
    return ESTABLISHED


class TcpHandler(ProtoHandler):
    """pf/OVS TCP tracking; see the module docstring."""

    name = "tcp"
    states = ("SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSING", "TIME_WAIT",
              "CLOSED")
    timeout_keys = ("tcp_first", "tcp_opening", "tcp_established", "tcp_closing",
                    "tcp_fin_wait", "tcp_closed", "tcp_closed")
    established_state = ESTABLISHED
    conn_class = TcpConn

    __slots__ = ("seq_check",)

    def __init__(self, cfg: CtConfig) -> None:
        super().__init__(cfg)
        self.seq_check = cfg.tcp_seq_check

    def valid_new(self, pkt: Packet) -> bool:
        flags = pkt.tcp_flags
        if _BAD_FLAGS[flags & 0xFF]:
            self.reason = "tcp-bad-flags"
            return False
        # SYN|ACK may not create a connection: only a fresh SYN, or a
        # connection picked up mid-stream (plain ACK), may (OVS rule).
        if flags & SYN and flags & ACK:
            self.reason = "tcp-synack-new"
            return False
        return True

    def new_conn(self, pkt: Packet, now: float) -> Conn:
        c = TcpConn(self, now)
        flags = pkt.tcp_flags
        seq = pkt.seq
        c.lo0 = seq
        hi = seq + pkt.payload_len + 1
        if flags & SYN:
            hi += 1
            c.ws0 = ws = _ws_of(pkt)
        else:
            c.ws0 = c.ws1 = ws = WS_UNKNOWN
        mw = pkt.win or 1
        sws = ws & WS_MASK
        if sws:
            mw = -(-mw >> sws)  # ceil division by 2**sws
        c.mw0 = mw
        if flags & FIN:
            hi += 1
        c.hi0 = hi & M32
        c.hi1 = 1
        c.mw1 = 1
        c.st0 = TCPS_SYN_SENT
        c.st1 = TCPS_CLOSED
        c.pstate = SYN_SENT
        return c

    def on_relearn(self, conn: Conn) -> None:
        conn._f |= F_RELEARN

    def update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> int:  # noqa: C901
        c: TcpConn = conn  # type: ignore[assignment]
        flags = pkt.tcp_flags
        if _BAD_FLAGS[flags & 0xFF]:
            self.reason = "tcp-bad-flags"
            return UPD_INVALID
        if reply:
            s_lo, s_hi, s_mw, s_ws, s_st = c.lo1, c.hi1, c.mw1, c.ws1, c.st1
            d_lo, d_hi, d_mw, d_ws, d_st = c.lo0, c.hi0, c.mw0, c.ws0, c.st0
        else:
            s_lo, s_hi, s_mw, s_ws, s_st = c.lo0, c.hi0, c.mw0, c.ws0, c.st0
            d_lo, d_hi, d_mw, d_ws, d_st = c.lo1, c.hi1, c.mw1, c.ws1, c.st1

        if (
            flags & (SYN | ACK) == SYN
            and d_st >= TCPS_FIN_WAIT_2
            and s_st >= TCPS_FIN_WAIT_2
        ):
            return UPD_NEW  # port reuse: the tracker re-creates the connection

        sws = dws = 0
        if not flags & SYN:
            if s_ws & WS_FLAG and d_ws & WS_FLAG:
                sws = s_ws & WS_MASK
                dws = d_ws & WS_MASK
            elif s_ws & WS_UNKNOWN and d_ws & WS_UNKNOWN:
                sws = dws = MAX_WSCALE

        win = pkt.win
        seq = orig_seq = pkt.seq
        ack = pkt.ack
        end = seq + pkt.payload_len
        if flags & SYN:
            end += 1
        if flags & FIN:
            end += 1
        end &= M32
        check_ackskew = True
        if s_st < TCPS_SYN_SENT:
            # First packet from this end.
            if flags & SYN and d_ws & WS_FLAG:
                s_ws = _ws_of(pkt)
                if s_ws & WS_FLAG:
                    sws = s_ws & WS_MASK
                    win = -(-win >> sws)
                    dws = d_ws & WS_MASK
                else:
                    # The other end offered scaling, this one did not: none.
                    d_mw <<= d_ws & WS_MASK
                    d_ws = 0
            s_lo = seq
            s_st = TCPS_SYN_SENT
            nh = (end + max(1, d_mw << dws)) & M32
            if s_hi == 1 or ((nh - s_hi) & M32) < H32:
                s_hi = nh
                check_ackskew = False  # picking up a new or running connection
            if win > s_mw:
                s_mw = win

        if not flags & ACK:
            ack = d_lo  # pass the ack-skew check
        elif ack == 0 and flags & RST:
            ack = d_lo  # broken stacks send RST|ACK with ack 0

        pend = end  # the segment's real end, before the easing below
        if seq == end:
            # No data: do not let a stale sequence number make it invalid.
            seq = end = s_lo

        f = c._f
        relearn = f & F_RELEARN
        if relearn:
            # Sequence checking was switched back on: re-seed this peer from
            # the packet instead of judging it (windows moved meanwhile).
            sbit = F_RELEARN1 if reply else F_RELEARN0
            if f & sbit:
                c._f = f & ~sbit
                s_lo = pend
                s_mw = win or 1
                if flags & ACK:
                    d_hi = (ack + max(win << sws, 1)) & M32
            ok = True
        elif not (self.seq_check and c.seq_check):
            ok = True
        else:
            # Judge the segment (pf): in window, not too old, sane ack.
            if check_ackskew:
                ackskew = (d_lo - ack) & M32
                if ackskew >= H32:
                    ackskew -= 0x100000000
            else:
                ackskew = 0
            ok = (
                ((s_hi - end) & M32) < H32
                and ((seq - (s_lo - (d_mw << dws))) & M32) < H32
                and ackskew >= -MAXACKWINDOW
                and ackskew <= (MAXACKWINDOW << sws)
                and (
                    not flags & RST
                    or orig_seq == s_lo
                    or orig_seq == ((s_lo + 1) & M32)
                    or ((orig_seq + 1) & M32) == s_lo
                )
            )

        if ok:
            if s_mw < win:
                s_mw = win
            if 0 < ((end - s_lo) & M32) < H32:
                s_lo = end
            t = ack + (win << sws)
            if ((t - d_hi) & M32) < H32:
                d_hi = (ack + max(win << sws, 1)) & M32
            if flags & SYN and s_st < TCPS_SYN_SENT:
                s_st = TCPS_SYN_SENT
            if flags & FIN and s_st < TCPS_CLOSING:
                s_st = TCPS_CLOSING
            if flags & ACK:
                if d_st == TCPS_SYN_SENT:
                    d_st = TCPS_ESTABLISHED
                elif d_st == TCPS_CLOSING:
                    d_st = TCPS_FIN_WAIT_2
            if flags & RST:
                s_st = d_st = TCPS_TIME_WAIT
            res = UPD_OK
        elif (
            (d_st < TCPS_SYN_SENT or d_st >= TCPS_FIN_WAIT_2 or s_st >= TCPS_FIN_WAIT_2)
            and ((s_hi + MAXACKWINDOW - end) & M32) < H32
            and ((seq - (s_lo - MAXACKWINDOW)) & M32) < H32
        ):
            # pf's loose path: shotgunned SYNs, a connection picked up after
            # establishment, stray packets right after close. Valid, but the
            # timeout is not refreshed so a flood cannot keep it alive.
            if s_mw < win:
                s_mw = win
            if 0 < ((end - s_lo) & M32) < H32:
                s_lo = end
            t = ack + (win << sws)
            if ((t - d_hi) & M32) < H32:
                d_hi = (ack + max(win << sws, 1)) & M32
            if flags & FIN and s_st < TCPS_CLOSING:
                s_st = TCPS_CLOSING
            if flags & RST:
                s_st = d_st = TCPS_TIME_WAIT
            res = UPD_OK_QUIET
        else:
            self.reason = "tcp-rst-seq" if flags & RST else "tcp-out-of-window"
            return UPD_INVALID

        if reply:
            c.lo1, c.hi1, c.mw1, c.ws1, c.st1 = s_lo, s_hi, s_mw, s_ws, s_st
            c.lo0, c.hi0, c.mw0, c.ws0, c.st0 = d_lo, d_hi, d_mw, d_ws, d_st
            c.pstate = _cls(s_st, d_st)
        else:
            c.lo0, c.hi0, c.mw0, c.ws0, c.st0 = s_lo, s_hi, s_mw, s_ws, s_st
            c.lo1, c.hi1, c.mw1, c.ws1, c.st1 = d_lo, d_hi, d_mw, d_ws, d_st
            c.pstate = _cls(s_st, d_st)
            if d_st == TCPS_CLOSED and res == UPD_OK:
                return UPD_OK_NEW  # the responder has not answered yet
        return res


def peer_states(conn: TcpConn) -> tuple[str, str]:
    """Per-peer state names (originator, responder), for diagnostics."""
    return PEER_STATE_NAMES[conn.st0], PEER_STATE_NAMES[conn.st1]
