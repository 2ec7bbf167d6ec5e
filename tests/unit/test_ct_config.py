"""ctxdp.conntrack.config.CtConfig: OVS default timeouts, overrides and validation."""

from __future__ import annotations

import pytest

from ctxdp.conntrack import ConnTracker, CtConfig
from ctxdp.conntrack.config import DEFAULT_MAX_CONNS, DEFAULT_TIMEOUTS


def test_defaults_are_ovs_values():
    """Default timeouts and connection limit are Open vSwitch's userspace defaults."""
    assert DEFAULT_TIMEOUTS == {
        "tcp_first": 30, "tcp_opening": 30, "tcp_established": 86400, "tcp_closing": 900,
        "tcp_fin_wait": 45, "tcp_closed": 30, "udp_first": 60, "udp_multiple": 60,
        "udp_bidir": 30, "other_first": 60, "other_multiple": 60, "other_bidir": 30,
        "icmp_first": 60, "icmp_reply": 30,
    }
    assert DEFAULT_MAX_CONNS == 3_000_000 and CtConfig().tcp_seq_check


def test_override_one_state():
    """An override changes exactly that state's timeout."""
    cfg = CtConfig(timeouts={"tcp_closed": 5})
    assert cfg.timeout("tcp_closed") == 5.0 and cfg.timeout("tcp_fin_wait") == 45.0


@pytest.mark.parametrize("kw", [
    {"timeouts": {"tcp_establshed": 10}},
    {"timeouts": {"udp_first": 0}},
    {"max_conns": -1},
    {"zone_limits": {1: -5}},
    {"sweep_granularity": 0},
    {"nat_ephemeral": (2000, 1000)},
])
def test_bad_config_is_rejected(kw):
    """Typos and impossible values raise ValueError when the tracker is built."""
    with pytest.raises(ValueError):
        ConnTracker(CtConfig(**kw))
