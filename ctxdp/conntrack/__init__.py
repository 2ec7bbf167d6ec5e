"""ctxdp.conntrack: the pure userspace connection tracker (Open vSwitch style).

Contract: see docs/architecture.md. No clock reads, sockets, bcc or pyroute2;
every call that needs time takes ``now`` (CLOCK_MONOTONIC seconds).
"""

from ctxdp.conntrack.config import DEFAULT_TIMEOUTS, CtConfig
from ctxdp.conntrack.conn import CS, Conn, CtResult, TcpConn, cs_str
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.conntrack.nat import NatAction, NatInfo
from ctxdp.conntrack.observer import CtObserver
from ctxdp.conntrack.table import ConnTracker, CtStats

__all__ = [
    "CS",
    "Conn",
    "ConnTracker",
    "CtConfig",
    "CtObserver",
    "CtResult",
    "CtStats",
    "DEFAULT_TIMEOUTS",
    "FlowTuple",
    "NatAction",
    "NatInfo",
    "TcpConn",
    "cs_str",
]
