"""Conntrack configuration: limits, timeouts and the global TCP sequence switch.

Contract: ``CtConfig`` is a plain dataclass read once by ``ConnTracker``.
Timeouts are seconds, keyed by the state names in ``DEFAULT_TIMEOUTS``;
``timeouts`` overrides any subset and an unknown key is a ``ValueError``
(a typo must not silently fall back to a default). The defaults are Open
vSwitch's userspace defaults (lib/conntrack-tp.c): TCP first packet 30 s,
opening 30 s, established 24 h, closing 15 min, fin-wait 45 s, closed 30 s;
UDP/other first 60 s, multiple 60 s, bidirectional 30 s; ICMP first 60 s,
reply 30 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CtConfig", "DEFAULT_TIMEOUTS", "DEFAULT_MAX_CONNS"]

# OVS's DEFAULT_N_CONN_LIMIT.
DEFAULT_MAX_CONNS = 3_000_000

DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_first": 30.0,  # only the originator has spoken (SYN_SENT)
    "tcp_opening": 30.0,  # handshake in progress (SYN_RECV)
    "tcp_established": 24 * 3600.0,
    "tcp_closing": 15 * 60.0,  # one side sent FIN
    "tcp_fin_wait": 45.0,  # both sides sent FIN, not both acked
    "tcp_closed": 30.0,  # both FINs acked, or RST
    "udp_first": 60.0,
    "udp_multiple": 60.0,  # more packets, still unreplied
    "udp_bidir": 30.0,  # replied
    "other_first": 60.0,
    "other_multiple": 60.0,
    "other_bidir": 30.0,
    "icmp_first": 60.0,
    "icmp_reply": 30.0,
}


@dataclass(slots=True)
class CtConfig:
    """Tracker-wide settings; see the module docstring for the contract."""

    # Global connection limit (0 = unlimited).
    max_conns: int = DEFAULT_MAX_CONNS
    # zone -> max connections in that zone; zones not listed use
    # ``default_zone_limit`` (0 = unlimited).
    zone_limits: dict[int, int] = field(default_factory=dict)
    default_zone_limit: int = 0
    timeouts: dict[str, float] = field(default_factory=dict)
    # Global TCP sequence/window checking (OVS ``tcp_seq_chk``); each
    # connection also has its own ``seq_check`` switch.
    tcp_seq_check: bool = True
    # Expiry bucket width in seconds: connections are deleted by ``sweep`` at
    # most this late (a lookup never returns an expired connection).
    sweep_granularity: float = 1.0
    # SNAT port range used when the NAT action gives no ports and the
    # original port is taken (OVS MIN/MAX_NAT_EPHEMERAL_PORT).
    nat_ephemeral: tuple[int, int] = (1024, 65535)

    def timeout(self, name: str) -> float:
        """The effective timeout of state ``name`` (override or default)."""
        return float(self.timeouts.get(name, DEFAULT_TIMEOUTS[name]))

    def validate(self) -> None:
        """Raise ValueError for settings the tracker cannot honour."""
        unknown = set(self.timeouts) - set(DEFAULT_TIMEOUTS)
        if unknown:
            raise ValueError(f"unknown conntrack timeout(s): {sorted(unknown)}")
        for name, val in self.timeouts.items():
            if not val > 0:
                raise ValueError(f"timeout {name} must be > 0, got {val!r}")
        if self.max_conns < 0 or self.default_zone_limit < 0:
            raise ValueError("limits must be >= 0")
        if any(v < 0 for v in self.zone_limits.values()):
            raise ValueError("zone limits must be >= 0")
        if not self.sweep_granularity > 0:
            raise ValueError("sweep_granularity must be > 0")
        lo, hi = self.nat_ephemeral
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad nat_ephemeral range {self.nat_ephemeral}")

    def zone_limit(self, zone: int) -> int:
        """Connection limit of ``zone`` (0 = unlimited)."""
        return self.zone_limits.get(zone, self.default_zone_limit)
