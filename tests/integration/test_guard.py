"""The kernel guard against real namespaces: masquerade works only because of it.

Each test builds its own ``NetnsLab`` (torn down on every exit path; the
guard table lives in the router namespace and goes with it) and asserts
that nothing was left behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ctxdp.datapath.guard import TABLE, GuardError, KernelGuard, ruleset
from ctxdp.lab import scenarios
from ctxdp.lab.netns import Topology
from tests.integration.conftest import lab_config
from tests.privileged import require_bcc, require_root

pytestmark = pytest.mark.privileged


# -- helpers -------------------------------------------------------------------


def _snmp(host: Any) -> dict[str, int]:
    """The namespace's kernel MIB counters (``Tcp.OutRsts``, ``Icmp6.OutDestUnreachs``...)."""
    out: dict[str, int] = {}
    lines = host.exec(["cat", "/proc/net/snmp"]).splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        sec, names = head.split(":", 1)
        for n, v in zip(names.split(), vals.split(":", 1)[1].split(), strict=False):
            out[f"{sec}.{n}"] = int(v)
    for line in host.exec(["cat", "/proc/net/snmp6"]).splitlines():
        name, _, v = line.partition(" ")
        if name.startswith("Icmp6"):
            out["Icmp6." + name[len("Icmp6"):]] = int(v.strip())
    return out


def _table_present(lab: Any) -> bool:
    out = lab.router.exec(["nft", "list", "tables"], check=False)
    return f"inet {TABLE}" in out


def _guard_counters(lab: Any) -> dict[str, int]:
    """The guard's drop counters, read with nft inside the lab's router namespace."""
    out = lab.router.exec(["nft", "-j", "list", "table", "inet", TABLE])
    return KernelGuard(["p0"], run=lambda argv, stdin: (0, out, "")).counters()


def _masq_config(lab: Any) -> dict[str, Any]:
    return lab_config(lab, nat=[{"type": "masquerade", "out_port": lab.port("server")}])


def _udp_exchange(lab: Any, count: int = 5) -> dict[str, Any]:
    port = scenarios.free_port()
    echo = lab.agent("server", ["udp-echo", "--port", str(port), "--idle-exit", "1",
                                "--timeout", "20"])
    try:
        echo.wait("listening", 10)
        req = lab.agent("client", ["udp-req", "--dst", lab.addr("server"), "--port", str(port),
                                   "--count", str(count), "--interval", "0.05",
                                   "--timeout", "20"])
        try:
            return req.result(30)
        finally:
            req.kill()
    finally:
        echo.kill()


@pytest.fixture
def masq_lab() -> Iterator[Any]:
    """A NetnsLab whose daemon masquerades client->server traffic on the server port."""
    require_bcc()
    from ctxdp.lab.netns import NetnsLab

    lab = NetnsLab()
    try:
        with lab:
            lab.start_daemon(_masq_config(lab))
            yield lab
    finally:
        assert lab.leftovers() == [], f"lab {lab.uid} left behind: {lab.leftovers()}"


# -- the table itself ------------------------------------------------------------


def _guard_lifecycle() -> dict[str, Any]:
    """Run in a fresh namespace: stale table replaced, install twice, remove twice."""
    def nft(*args: str, stdin: str | None = None) -> str:
        return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                              check=True).stdout

    # A crashed run's leftover with different content.
    nft("-f", "-", stdin=f"table inet {TABLE} {{\n chain stale {{\n }}\n}}\n")
    g = KernelGuard(["p0", "p1"])
    g.install()
    first = nft("list", "table", "inet", TABLE)
    g.install()
    second = nft("list", "table", "inet", TABLE)
    res = {"first": first, "second": second, "installed": g.installed(),
           "counters": g.counters(), "removed": g.remove(), "removed_again": g.remove(),
           "installed_after": g.installed()}
    return res


def test_install_replaces_a_stale_table_atomically_and_remove_is_idempotent() -> None:
    """install() swaps a leftover table for the guard (twice = same rules); remove() twice is safe."""
    require_root()
    with Topology() as topo:
        ns = topo.add_ns("guard")
        r = ns.run(_guard_lifecycle)
    assert "chain stale" not in r["first"]
    assert "socket transparent" in r["first"] and 'iifname != { "p0", "p1" }' in r["first"]
    assert r["first"] == r["second"], "a second install must leave the same single table"
    assert r["installed"] is True
    assert r["counters"] == {"no-socket-tcp": 0, "no-socket-udp": 0,
                             "unreach": 0, "unreach6": 0, "proto-unreach6": 0}
    assert (r["removed"], r["removed_again"], r["installed_after"]) == (True, False, False)


def test_ruleset_refuses_port_names_that_would_escape_the_nft_string() -> None:
    """A port name with a quote, brace or space is rejected before nft ever sees it."""
    for bad in ('p0"', "p 0", "p0}", "", "x" * 16):
        with pytest.raises(GuardError):
            ruleset([bad])
    with pytest.raises(GuardError):
        ruleset([])


# -- with the daemon and real traffic ---------------------------------------------


def test_masquerade_transfer_succeeds_and_router_services_still_answer(masq_lab: Any) -> None:
    """With the guard a masqueraded TCP transfer (v4 and v6) completes intact, the server
    sees the router's address, and ping / a TCP service on the router keep working."""
    lab = masq_lab
    assert _table_present(lab), "the daemon must install the guard when NAT is configured"
    before = _snmp(lab.router)

    r4 = scenarios.tcp_transfer(lab, nbytes=2_000_000, rate_mbps=20,
                                expect_peer=lab.router_addr("server"), timeout=30)
    assert r4["peer_seen"] == lab.router_addr("server")
    r6 = scenarios.tcp_transfer(lab, family=6, nbytes=1_000_000, rate_mbps=20,
                                expect_peer=lab.router_addr("server", 6), timeout=30)
    assert r6["peer_seen"] == lab.router_addr("server", 6)
    udp = _udp_exchange(lab)
    assert udp["replies"] == udp["sent"], udp

    # The router's own services: ping on both sides, a TCP listener on the router.
    lab.client.exec(["ping", "-c", "2", "-W", "2", lab.router_addr("client")])
    lab.server.exec(["ping", "-c", "2", "-W", "2", lab.router_addr("server")])
    lab.client.exec(["ping", "-6", "-c", "2", "-W", "2", lab.router_addr("client", 6)])
    port = scenarios.free_port()
    srv = lab.agent("router", ["tcp-recv", "--port", str(port), "--timeout", "20"])
    srv.wait("listening", 10)
    cli = lab.agent("client", ["tcp-send", "--dst", lab.router_addr("client"), "--port",
                               str(port), "--bytes", "200000", "--timeout", "20"])
    sent, got = cli.result(30), srv.result(30)
    assert (got["bytes"], got["sha256"]) == (200_000, sent["sha256"])

    after = _snmp(lab.router)
    # The kernel never answered the NAT'd traffic: no RST, no port unreachable.
    assert after["Tcp.OutRsts"] == before["Tcp.OutRsts"], (before, after)
    assert after["Icmp.OutDestUnreachs"] == before["Icmp.OutDestUnreachs"]
    assert after["Icmp6.OutDestUnreachs"] == before["Icmp6.OutDestUnreachs"]
    counters = _guard_counters(lab)
    # At least each SYN-ACK (v4, v6) and the UDP replies went through the guard.
    assert counters["no-socket-tcp"] >= 2 and counters["no-socket-udp"] >= 1, counters

    lab.stop_daemon()
    assert not _table_present(lab), "a normal shutdown must remove the guard table"


def test_without_the_guard_the_router_kernel_resets_masqueraded_connections(
    masq_lab: Any,
) -> None:
    """Deleting the guard table makes the router's stack RST the masqueraded handshake
    (the transfer dies) and answer UDP replies with port unreachable."""
    lab = masq_lab
    lab.router.exec(["nft", "delete", "table", "inet", TABLE])
    before = _snmp(lab.router)
    with pytest.raises(AssertionError) as ei:
        scenarios.tcp_transfer(lab, nbytes=1_000_000, rate_mbps=20,
                               expect_peer=lab.router_addr("server"), timeout=20)
    udp = _udp_exchange(lab, count=3)
    after = _snmp(lab.router)
    print("failure mode without the guard:", str(ei.value).splitlines()[0])
    assert after["Tcp.OutRsts"] > before["Tcp.OutRsts"], (before, after)
    # UDP still gets its replies (the slow path forwarded them too), but the
    # kernel told the server "port unreachable" for the ones it saw.
    assert udp["replies"] == udp["sent"], udp
    assert after["Icmp.OutDestUnreachs"] > before["Icmp.OutDestUnreachs"], (before, after)


def test_counters_parse_the_json_nft_prints() -> None:
    """counters() maps each commented rule to its packet count from ``nft -j``."""
    doc = {"nftables": [{"metainfo": {}}, {"rule": {"comment": "no-socket-tcp", "expr": [
        {"match": {}}, {"counter": {"packets": 7, "bytes": 420}}, {"drop": None}]}},
        {"rule": {"expr": [{"accept": None}]}}]}
    g = KernelGuard(["p0"], run=lambda argv, stdin: (0, json.dumps(doc), ""))
    assert g.counters() == {"no-socket-tcp": 7}
