"""Flow scenarios with real traffic between namespaces: NAT, IPv6, UDP aging, teardown,
policy reload and offload switched off and on at runtime (issue 6, item 2).

Every test drives one ``ctxdp.lab.scenarios`` function on the module's
``running_lab`` (one daemon, one bcc compile). Scenarios that reconfigure the
daemon or add routes undo it themselves; ``restored`` checks after each test
that they did (config, offload switch, routes, daemon alive), and the fixture
checks the lab left nothing behind at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ctxdp.lab import scenarios as S

pytestmark = pytest.mark.privileged

FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]


def _routes(lab: Any) -> dict[str, str]:
    """Every host's IPv4 and IPv6 routing table, as text."""
    return {role: h.exec(["ip", "-4", "route"]) + h.exec(["ip", "-6", "route"])
            for role, h in lab.hosts.items()}


@pytest.fixture
def restored(running_lab: Any) -> Iterator[Any]:
    """The running lab; afterwards its config, offload switch and routes are as before."""
    lab = running_lab
    doc, routes = dict(lab.doc), _routes(lab)
    yield lab
    assert lab.daemon_alive(), f"the daemon died:\n{lab.daemon_log()}"
    assert lab.doc == doc, "the scenario did not restore the daemon's config"
    assert lab.ctl("stats")["offload"]["enabled"] is True, "offload left disabled"
    assert _routes(lab) == routes, "the scenario left routes behind"


# -- IPv6 ------------------------------------------------------------------------


def test_tcp_transfer_over_ipv6_is_offloaded_and_intact(restored: Any) -> None:
    """3 MB over IPv6: offloaded after the handshake, slow path flat, fast path carries it."""
    r = S.tcp_transfer(restored, family=6, nbytes=3_000_000)
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]
    assert r["slow_pkts_after_data"] - r["slow_pkts_handshake"] <= 2


# -- NAT ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masquerade_transfer_is_offloaded_and_server_sees_the_router(restored: Any,
                                                                     family: int) -> None:
    """Masquerade on the server port: intact, offloaded, the server sees the router's address."""
    lab = restored
    r = S.snat_transfer(lab, family=family)
    assert r["peer_seen"] == lab.router_addr("server", family)
    assert r["reply_tuple"]["dst"] == lab.router_addr("server", family)
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]


@pytest.mark.parametrize("family", FAMILIES)
def test_snat_to_a_pool_address_is_offloaded_and_server_sees_it(restored: Any,
                                                                family: int) -> None:
    """Static SNAT to an address no host owns (routed to the router): the server sees it."""
    r = S.snat_transfer(restored, family=family, to="pool")
    assert r["peer_seen"] == S.NAT_POOL[family]
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dnat_port_forward_on_the_router_address(restored: Any, family: int) -> None:
    """Port forward on the router's own address reaches the server's real port, offloaded."""
    lab = restored
    r = S.dnat_transfer(lab, family=family)
    assert r["peer_seen"] == lab.addr("client", family)
    assert r["public"].rsplit(":", 1)[0].strip("[]") == lab.router_addr("client", family)
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dnat_port_forward_on_a_routed_public_address(restored: Any, family: int) -> None:
    """Port forward on an address the router does not own but is routed to it, offloaded."""
    r = S.dnat_transfer(restored, family=family, public="routed")
    assert r["public"].rsplit(":", 1)[0].strip("[]") == S.PUBLIC_ADDR[family]
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]


def test_ipv6_dnat_on_a_routed_address_without_a_router_route(restored: Any) -> None:
    """IPv6 port forward on a non-local address works even without a route for it on the router."""
    S.dnat_transfer(restored, family=6, public="routed", blackhole=False, nbytes=300_000,
                    timeout=20)


# -- UDP ---------------------------------------------------------------------------


def test_udp_over_ipv6_offloaded_kept_while_active_and_aged_when_idle(restored: Any) -> None:
    """UDP/IPv6: offloaded after the reply, never aged while XDP carries it, aged when idle."""
    r = S.udp_offload_and_age(restored, family=6)
    assert r["active_s"] > r["timeout_s"]
    assert r["slow_pkts_after_active"] - r["slow_pkts_first"] <= 2
    assert r["aged_after_idle_s"] is not None


# -- teardown ------------------------------------------------------------------------


@pytest.mark.parametrize("close,family", [("fin", 4), ("rst", 4), ("rst", 6)],
                         ids=["fin-ipv4", "rst-ipv4", "rst-ipv6"])
def test_fin_or_rst_ends_the_offload_and_conntrack_closes(restored: Any, close: str,
                                                          family: int) -> None:
    """A FIN/RST is punted by XDP, withdraws the offload, and the conn leaves conntrack."""
    r = S.tcp_teardown(restored, family=family, close=close)
    assert r["punts_fin_rst"] >= 1
    if close == "rst":
        assert r["closed_state"] == "CLOSED"
    else:
        assert r["closed_state"] in ("FIN_WAIT", "CLOSING", "TIME_WAIT", "CLOSED")
    assert r["receiver_reset"] is (close == "rst")
    assert r["gone_after_s"] is not None


# -- runtime changes --------------------------------------------------------------------


@pytest.mark.parametrize("via,family", [("ctl", 4), ("ctl", 6), ("sighup", 4)],
                         ids=["reload-ipv4", "reload-ipv6", "sighup-ipv4"])
def test_policy_reload_denying_a_stream_stops_it_within_an_aging_interval(
    restored: Any, via: str, family: int
) -> None:
    """A reload that denies an offloaded stream removes it and no more bytes get through."""
    lab = restored
    r = S.policy_reload(lab, family=family, via=via)
    assert r["removed_after_s"] <= lab.aging_interval + 1.0
    assert r["refused_retransmits"] >= 1
    if via == "ctl":
        assert r["answer"]["withdrawn"] >= 1 and r["answer"]["deleted"] >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_disable_withdraws_and_enable_reoffers_a_running_stream(restored: Any,
                                                                        family: int) -> None:
    """offload disable: the slow path carries the stream on; enable: XDP takes it back."""
    r = S.offload_toggle(restored, family=family)
    assert r["slow_window_pkts"] > 0 and r["slow_window_bytes"] > 0
    assert r["fast_pkts_after_enable"][0] >= 20
