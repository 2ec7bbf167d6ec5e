"""Forwarding off in the router namespace, verified, restorable, and refused loudly."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ctxdp.datapath import sysctl
from tests.integration import topo as topo_mod
from tests.privileged import require_root

pytestmark = pytest.mark.privileged


@pytest.fixture
def ns() -> Iterator[topo_mod.Netns]:
    require_root()
    t = topo_mod.Topology()
    with t:
        box = t.add_ns("sysctl")
        box.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        yield box
    assert topo_mod.leftover_namespaces(t.names) == []


def _cycle() -> dict:
    sysctl.write_sysctl("net/ipv4/ip_forward", "1")
    sysctl.write_sysctl("net/ipv6/conf/all/forwarding", "1")
    on_before = sysctl.forwarding_enabled()
    saved = sysctl.disable_forwarding()
    after = {k: sysctl.read_sysctl(k) for k in ("net/ipv4/ip_forward",
                                               "net/ipv4/conf/v0/forwarding",
                                               "net/ipv6/conf/all/forwarding",
                                               "net/ipv6/conf/v0/forwarding")}
    on_after = sysctl.forwarding_enabled()
    sysctl.write_sysctl("net/ipv4/conf/v0/forwarding", "1")  # someone re-enables one port
    on_port = sysctl.forwarding_enabled()
    sysctl.restore(saved)
    restored = (sysctl.read_sysctl("net/ipv4/ip_forward"),
                sysctl.read_sysctl("net/ipv6/conf/all/forwarding"))
    return dict(on_before=on_before, saved=saved, after=after, on_after=on_after,
                on_port=on_port, restored=restored)


def test_disable_verify_and_restore(ns):
    """disable_forwarding() turns IPv4 and IPv6 forwarding off everywhere in the namespace
    and returns the old values, forwarding_enabled() notices a port re-enabled later, and
    restore() puts the old values back."""
    res = ns.run(_cycle)
    assert "net.ipv4.conf.v0.forwarding" in res["on_before"]
    assert res["saved"] == {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"}
    assert set(res["after"].values()) == {"0"}
    assert res["on_after"] == []
    assert res["on_port"] == ["net.ipv4.conf.v0.forwarding"]
    assert res["restored"] == ("1", "1")


def test_other_namespaces_are_untouched(ns):
    """Disabling forwarding in the child's namespace leaves the test's own namespace as
    it was (the switches are per namespace)."""
    before = sysctl.read_sysctl("net/ipv4/ip_forward")
    ns.run(sysctl.disable_forwarding)
    assert sysctl.read_sysctl("net/ipv4/ip_forward") == before


def _fake_tree(root: str, devices: dict[str, str]) -> None:
    for fam in ("ipv4", "ipv6"):
        for dev, value in devices.items():
            os.makedirs(f"{root}/net/{fam}/conf/{dev}", exist_ok=True)
            with open(f"{root}/net/{fam}/conf/{dev}/forwarding", "w") as f:
                f.write(value + "\n")
    with open(f"{root}/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")


def test_refuses_when_a_switch_does_not_stick(tmp_path):
    """If a forwarding switch still reads 1 after disabling (here a fake /proc/sys where
    writes do not propagate to devices), ForwardingError names it."""
    _fake_tree(str(tmp_path), {"all": "1", "default": "1", "eth9": "1"})
    with pytest.raises(sysctl.ForwardingError, match=r"net\.ipv4\.conf\.eth9\.forwarding"):
        sysctl.disable_forwarding(root=str(tmp_path))


def test_refuses_when_a_switch_cannot_be_written(tmp_path):
    """If a forwarding switch cannot be written, ForwardingError names it."""
    _fake_tree(str(tmp_path), {"all": "1"})
    os.remove(f"{tmp_path}/net/ipv6/conf/all/forwarding")
    os.mkdir(f"{tmp_path}/net/ipv6/conf/all/forwarding")  # writing a directory fails
    with pytest.raises(sysctl.ForwardingError, match=r"net\.ipv6\.conf\.all\.forwarding"):
        sysctl.disable_forwarding(root=str(tmp_path))
