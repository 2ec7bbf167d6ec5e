"""Unit tests for ctxdp.eligibility: the pure offload policy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.eligibility import TRANSIENT_REASONS, EligibilityPolicy, Reason
from ctxdp.providers.base import FlowDir

T = FlowTuple(4, 6, b"\x0a\0\0\1", b"\x0a\0\0\2", 1, 2)
MAC = b"\2\0\0\0\0\1"


def conn(**kw):
    base = dict(
        proto=6,
        zone=0,
        state_name="ESTABLISHED",
        established=True,
        helper=None,
        parent=None,
        children=0,
        pkts=[2, 1],
    )
    base.update(kw)
    return SimpleNamespace(**base)


def dirs(in_if: int = 1, out_if: int = 2):
    return [FlowDir(in_if, T, T, out_if, MAC, MAC), FlowDir(out_if, T, T, in_if, MAC, MAC)]


def test_default_policy_allows_established_tcp_with_forwarding():
    """An established TCP conn with both directions known is eligible by default."""
    assert EligibilityPolicy().check(conn(), dirs()) == ""


@pytest.mark.parametrize(
    "state, ok",
    [("SYN_SENT", False), ("SYN_RECV", False), ("ESTABLISHED", True), ("FIN_WAIT_1", False)],
)
def test_tcp_established_means_state_established(state, ok):
    """TCP is eligible only in ESTABLISHED: not during the handshake, not after FIN."""
    r = EligibilityPolicy().check_conn(conn(state_name=state, established=ok))
    assert r == ("" if ok else Reason.NOT_ESTABLISHED)


@pytest.mark.parametrize("proto", [17, 1, 58])
def test_udp_and_icmp_established_after_a_reply(proto):
    """UDP and ICMP echo are eligible once the tracker saw a reply."""
    p = EligibilityPolicy()
    assert p.check_conn(conn(proto=proto, state_name="FIRST", established=False)) == (
        Reason.NOT_ESTABLISHED
    )
    assert p.check_conn(conn(proto=proto, state_name="BIDIR", established=True)) == ""


def test_require_established_off_allows_handshake():
    """require_established=False lets a not-yet-established conn through."""
    p = EligibilityPolicy(require_established=False)
    assert p.check_conn(conn(state_name="SYN_RECV", established=False)) == ""


def test_protocols_and_zones():
    """Protocols and zones outside the policy are refused with their reason."""
    p = EligibilityPolicy(protocols=frozenset({17}), zones=frozenset({3}))
    assert p.check_conn(conn()) == Reason.PROTO
    assert p.check_conn(conn(proto=17, zone=4)) == Reason.ZONE
    assert p.check_conn(conn(proto=17, zone=3)) == ""


def test_port_opt_out_on_either_side():
    """A conn entering or leaving through an opted-out port is refused."""
    p = EligibilityPolicy(opt_out_ifindex=frozenset({7}))
    assert p.check_dirs(dirs(7, 2)) == Reason.PORT_OPT_OUT
    assert p.check_dirs(dirs(1, 7)) == Reason.PORT_OPT_OUT
    assert p.check_dirs(dirs(1, 2)) == ""


def test_forwarding_must_be_known_both_ways():
    """A missing direction is no-forwarding."""
    d = dirs()
    assert EligibilityPolicy().check_dirs([d[0], None]) == Reason.NO_FORWARDING
    assert EligibilityPolicy().check_dirs([None, None]) == Reason.NO_FORWARDING


def test_min_pkts_counts_both_directions():
    """min_pkts compares with the sum of both directions' packet counts."""
    p = EligibilityPolicy(min_pkts=4)
    assert p.check_conn(conn(pkts=[2, 1])) == Reason.MIN_PKTS
    assert p.check_conn(conn(pkts=[2, 2])) == ""


def test_helpers_related_and_masters():
    """Helpers, related children and masters with children stay in the slow path."""
    p = EligibilityPolicy()
    assert p.check_conn(conn(helper="ftp")) == Reason.HELPER
    assert p.check_conn(conn(parent=object())) == Reason.RELATED
    assert p.check_conn(conn(children=2)) == Reason.HAS_CHILDREN
    lax = EligibilityPolicy(allow_helpers=True, allow_related=True)
    assert lax.check_conn(conn(helper="ftp", parent=object(), children=2)) == ""


def test_transient_reasons_are_the_ones_packets_can_clear():
    """Only min-pkts, cap and has-children are re-checked per packet."""
    assert TRANSIENT_REASONS == {Reason.MIN_PKTS, Reason.CAP, Reason.HAS_CHILDREN}
