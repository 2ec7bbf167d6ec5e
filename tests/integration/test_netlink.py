"""Netlink event hub and link watcher: port down/up/removed callbacks, resync on overrun."""

from __future__ import annotations

import socket
import subprocess
import tempfile

import pytest

from ctxdp.datapath.netlink import LinkWatcher, LocalAddrs, Netlink
from tests.integration import topo as topo_mod

pytestmark = pytest.mark.privileged

topo = topo_mod.topology_fixture()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _link_events(client_ns: str) -> dict:
    nl = Netlink()
    links = LinkWatcher(nl)
    seen: list = []
    links.on_change(lambda old, new: seen.append((old, new)))
    p0, p1 = socket.if_nametoindex("p0"), socket.if_nametoindex("p1")
    assert links.get(p0).usable and links.by_name("p1").ifindex == p1

    def last(ifindex):
        ev = [(o, n) for o, n in seen if (o or n).ifindex == ifindex]
        return ev[-1] if ev else (None, None)

    # Admin down on our side.
    _ip("link", "set", "p1", "down")
    assert topo_mod.pump(nl, lambda: last(p1)[1] is not None and not last(p1)[1].admin_up)
    assert last(p1)[0].usable and not last(p1)[1].usable
    # Carrier loss: the peer downs its end; p0 stays admin up but not running.
    subprocess.run(["ip", "-n", client_ns, "link", "set", "eth0", "down"], check=True)
    assert topo_mod.pump(nl, lambda: last(p0)[1] is not None and not last(p0)[1].running)
    assert last(p0)[1].admin_up and not last(p0)[1].usable
    subprocess.run(["ip", "-n", client_ns, "link", "set", "eth0", "up"], check=True)
    assert topo_mod.pump(nl, lambda: links.get(p0).usable)
    # A new link appears (old None), then is removed (new None).
    _ip("link", "add", "x0", "type", "veth", "peer", "name", "x1")
    assert topo_mod.pump(nl, lambda: links.by_name("x0") is not None)
    x0 = links.by_name("x0").ifindex
    assert last(x0)[0] is None
    _ip("link", "del", "x0")
    assert topo_mod.pump(nl, lambda: links.get(x0) is None)
    assert last(x0)[1] is None and last(x0)[0].name == "x0"
    nl.close()
    return {}


def test_link_watcher_reports_down_carrier_new_and_removed(topo):
    """Admin down, carrier loss (peer down), a new link and a deleted link each reach
    on_change with the right old/new LinkState; usable tracks admin and oper state."""
    topo.router.run(_link_events, topo.client.name)


def _overrun() -> dict:
    # A tiny receive buffer (the kernel's minimum) overflows on a burst.
    nl = Netlink(rcvbuf=1)
    links = LinkWatcher(nl)
    addrs = LocalAddrs(nl)
    resyncs: list = []
    nl.on_resync(lambda: resyncs.append(1))
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
        for i in range(400):
            f.write(f"route add 10.{50 + i // 250}.{i % 250}.0/24 dev p0\n")
        f.flush()
        _ip("-batch", f.name)
    # These land in a full buffer and are lost: only a resync can see them.
    _ip("link", "set", "p1", "down")
    _ip("addr", "add", "10.0.1.200/32", "dev", "p0")
    p1 = socket.if_nametoindex("p1")
    while nl.handle_events():
        pass
    out = dict(
        overruns=nl.stats["overruns"],
        resyncs=len(resyncs),
        p1_admin_up=links.get(p1).admin_up,
        new_addr=addrs.contains(bytes([10, 0, 1, 200])),
    )
    nl.close()
    return out


def test_overrun_triggers_resync(topo):
    """When the event socket overflows (ENOBUFS), every cache re-dumps, so a link going
    down and an address added during the overflow are still seen."""
    res = topo.router.run(_overrun)
    assert res["overruns"] >= 1 and res["resyncs"] >= 1
    assert res["p1_admin_up"] is False
    assert res["new_addr"] is True


def _bad_handler() -> dict:
    nl = Netlink()
    links = LinkWatcher(nl)
    calls: list = []

    def boom(old, new):
        raise RuntimeError("handler bug")

    links.on_change(boom)
    links.on_change(lambda old, new: calls.append(new))
    _ip("link", "set", "p1", "mtu", "1300")
    ok = topo_mod.pump(nl, lambda: any(n is not None and n.mtu == 1300 for n in calls))
    nl.close()
    return dict(ok=ok)


def test_failing_callback_does_not_stop_the_others(topo):
    """A callback that raises is logged; later callbacks still run and the loop goes on."""
    assert topo.router.run(_bad_handler)["ok"]
