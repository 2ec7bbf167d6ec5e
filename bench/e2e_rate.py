"""Forwarding rate of bench/e2e.py: generator ns -> router ns -> sink ns on veth.

Contract:
- ``Rig(lab, progs, cpu)`` binds a ``NetnsLab`` (client = generator, server
  = sink) to the bench programs: the sink (bench/e2e_sink.c) is attached to
  the server's eth0 for the rig's whole life and detached by ``close()``.
- ``CASES``: (family, frame size, flows). IPv4 flows are SNATed by every
  system (masquerade to the router's p1 address); IPv6 is routed with
  conntrack and no NAT (ctxdp has no NAT66 rule here; the kernel and OVS get
  the same treatment). Flow i is client:20000+i -> server:9000 over UDP.
- ``Rig.measure(case, duration, warmup)`` loads the case's templates, starts
  the generator child in the client namespace (live frames, pinned to one
  CPU), waits ``warmup``, and counts sink packets over ``duration`` seconds
  of wall time: Mpps delivered, plus the generator's offered Mpps.
- ``SYSTEMS``: name -> context manager ``system(rig)`` that sets up one
  router configuration, yields a ``probe()`` (a dict of the system's own
  counters, used to check that the packets took the path the row names),
  and on every exit path takes all of it down again (daemon stopped with
  SIGTERM so it detaches XDP and unpins; XDP programs detached; nft table
  deleted; forwarding off again; OVS processes killed and their run
  directory removed).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import e2e_progs as EP

__all__ = ["CASES", "Case", "Rig", "SYSTEMS", "SYSTEM_NOTES", "daemon_doc", "establish_udp"]

GEN_BASE_PORT = 20000
SINK_PORT = 9000
LONG = 3600.0  # conntrack timeouts during the bench: nothing may expire mid-run


@dataclass(frozen=True)
class Case:
    family: int
    size: int
    flows: int

    @property
    def label(self) -> str:
        fam = "v4 SNAT" if self.family == 4 else "v6"
        return f"{fam} {self.size}B {self.flows}fl"


CASES = [Case(f, s, n) for f in (4, 6) for s in (64, 1514) for n in (1, 1000)]


class Rig:
    """The lab, the programs, and where the generator runs; see the contract."""

    def __init__(self, lab: Any, progs: EP.Progs, cpu: int = 0) -> None:
        self.lab = lab
        self.progs = progs
        self.cpu = cpu
        topo = lab.topo
        self.gen_ns, self.router_ns, self.sink_ns = topo.client, topo.router, topo.server
        self.pc, self.ps = topo.port("client"), topo.port("server")
        self.gen_ifindex = self.gen_ns.ifindex("eth0")
        self.p1_ifindex = self.router_ns.ifindex("p1")
        self.progs.sink_config(SINK_PORT)
        EP.attach(self.sink_ns, "eth0", progs.sink_fd)

    def addrs(self, family: int) -> tuple[str, str]:
        if family == 4:
            return self.pc.peer_v4, self.ps.peer_v4
        return self.pc.peer_v6, self.ps.peer_v6

    def frames(self, case: Case) -> list[bytes]:
        src, dst = self.addrs(case.family)
        return [EP.udp_frame(case.family, case.size, self.pc.peer_mac, self.pc.mac, src, dst,
                             GEN_BASE_PORT + i, SINK_PORT) for i in range(case.flows)]

    def measure(self, case: Case, duration: float, warmup: float,
                probe: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
        frames = self.frames(case)
        self.progs.set_flows(frames)
        # Every BPF_PROG_RUN call costs ~30 ms of set-up and tear-down on this
        # kernel (page pool), so the generator must make few, long calls: a
        # short calibration call gives the kernel's ns per frame, and each
        # real call is sized to outlast warmup + window at that rate.
        # The same calls measure the CPU cost of the whole in-line chain: with
        # live frames the kernel times the generator loop including the
        # softirq work it triggers on its CPU (router XDP, sink), but not the
        # time the thread was preempted, so the median of three is robust to
        # other tenants of the machine. Work done on other threads (a
        # userspace forwarder) is not in it.
        costs = [self.gen_ns.run(EP.calibrate, self.progs.gen_fd, frames[0],
                                 self.gen_ifindex, 1 << 17, self.cpu) for _ in range(3)]
        ns_per_frame = statistics.median(costs)
        repeat = int(1e9 / max(ns_per_frame, 1.0) * (warmup + duration + 1.0))
        repeat = max(1 << 16, min(repeat, (1 << 31) - 1))
        child = self.gen_ns.spawn(EP.generate, self.progs.gen_fd, frames[0], self.gen_ifindex,
                                  repeat, self.cpu)
        try:
            child.wait_ready()
            time.sleep(warmup)
            p0 = probe() if probe else {}
            c0, g0, t0 = self.progs.sink_count()[0], self.progs.gen_sent(), time.monotonic()
            time.sleep(duration)
            c1, g1, t1 = self.progs.sink_count()[0], self.progs.gen_sent(), time.monotonic()
            p1 = probe() if probe else {}
        finally:
            child.stop()
        calls = child.result(timeout=120)
        dt = t1 - t0
        return {
            "mpps": (c1 - c0) / dt / 1e6,
            "offered_mpps": (g1 - g0) / dt / 1e6,
            "seconds": dt,
            "delivered": c1 - c0,
            "gen_ns_per_frame": ns_per_frame,
            "gen_calls": calls,
            "path": {k: p1.get(k, 0) - p0.get(k, 0) for k in p1},  # deltas over the window
            "path_after": p1,
        }

    def close(self) -> None:
        EP.detach(self.sink_ns, "eth0")


# --------------------------------------------------------------------------
# Establishing UDP flows through ctxdp (request + reply through the slow path)
# --------------------------------------------------------------------------


def _udp_echo(ctl: Any, port: int) -> int:
    """Server side: echo every datagram on ``port`` (v4 and v6) until stopped."""
    import selectors  # noqa: PLC0415

    sel = selectors.DefaultSelector()
    socks = []
    for af, any_ in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(af, socket.SOCK_DGRAM)
        if af == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind((any_, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    sel.register(ctl.stop_fd(), selectors.EVENT_READ)
    ctl.ready()
    n = 0
    while not ctl.stop_requested():
        for key, _ in sel.select(0.5):
            if key.fileobj is ctl.stop_fd() or key.fd == ctl.stop_fd():
                continue
            s = key.fileobj
            while True:
                try:
                    data, peer = s.recvfrom(2048)
                except BlockingIOError:
                    break
                s.sendto(data, peer)
                n += 1
    for s in socks:
        s.close()
    return n


def _udp_requests(family: int, src: str, dst: str, sports: list[int], dport: int,
                  timeout: float) -> int:
    """Client side: one datagram from each source port, wait for the echoes; replies seen."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    socks = []
    for sp in sports:
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.bind((src, sp))
        s.setblocking(False)
        socks.append(s)
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    tries = 0
    while len(got) < len(socks) and time.monotonic() < deadline and tries < 5:
        tries += 1
        for i, s in enumerate(socks):
            if i not in got:
                s.sendto(b"e2e", (dst, dport))
                time.sleep(0.0002)  # pace: the slow path is a Python loop
        end = min(deadline, time.monotonic() + 2.0)
        while len(got) < len(socks) and time.monotonic() < end:
            for i, s in enumerate(socks):
                if i in got:
                    continue
                try:
                    s.recv(64)
                    got.add(i)
                except BlockingIOError:
                    pass
            time.sleep(0.01)
    for s in socks:
        s.close()
    return len(got)


def establish_udp(rig: Rig, flows: int, timeout: float = 60.0) -> dict[str, int]:
    """Make ``flows`` UDP connections per family established and offloaded in ctxdp.

    Request and echo go through the slow path (the sink ignores everything
    while its port is 0), then the daemon's own conntrack rows are polled
    until every generator tuple is marked offloaded.
    """
    lab = rig.lab
    rig.progs.sink_config(0)
    echo = rig.sink_ns.spawn(_udp_echo, SINK_PORT)
    replies = {}
    try:
        echo.wait_ready()
        sports = [GEN_BASE_PORT + i for i in range(flows)]
        for fam in (4, 6):
            src, dst = rig.addrs(fam)
            replies[fam] = rig.gen_ns.run(_udp_requests, fam, src, dst, sports, SINK_PORT,
                                          timeout, timeout=timeout + 30)
    finally:
        echo.stop()
        with contextlib.suppress(Exception):
            echo.result(timeout=10)
        rig.progs.sink_config(SINK_PORT)
    want = set(range(GEN_BASE_PORT, GEN_BASE_PORT + flows))
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while True:
        rows = lab.ctl("conntrack")["conns"]
        counts = {"v4": 0, "v6": 0}
        for r in rows:
            o = r["orig"]
            if r["proto"] == 17 and o["dport"] == SINK_PORT and o["sport"] in want \
                    and r["offloaded"]:
                counts["v6" if ":" in o["src"] else "v4"] += 1
        if counts["v4"] == flows and counts["v6"] == flows:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counts} of {flows} flows per family offloaded "
                               f"(replies {replies})\n{lab.daemon_log(20)}")
        time.sleep(0.5)
    return {**counts, "replies_v4": replies[4], "replies_v6": replies[6]}


# --------------------------------------------------------------------------
# The systems
# --------------------------------------------------------------------------


def daemon_doc(rig: Rig, offload: bool) -> dict[str, Any]:
    lab = rig.lab
    return lab.config(
        nat=[{"type": "masquerade", "out_port": "p1", "src": ["10.0.1.0/24"]}],
        offload={"enabled": offload},
        timeouts={"udp_first": LONG, "udp_multiple": LONG, "udp_bidir": LONG},
        log_level="warning",
    )


def _ctxdp_probe(rig: Rig) -> Callable[[], dict[str, int]]:
    def probe() -> dict[str, int]:
        st = rig.lab.ctl("stats")
        fast = st.get("fast_path") or {}
        return {"fast_hits": int(fast.get("hits", 0)), "fast_misses": int(fast.get("misses", 0)),
                "slow_forwarded": int(st["slow_path"].get("forwarded", 0))}
    return probe


@contextlib.contextmanager
def ctxdp_offload(rig: Rig, flows: int = 1000) -> Iterator[Callable[[], dict[str, int]]]:
    """The real daemon, every generator flow established and offloaded to XDP first."""
    rig.lab.start_daemon(daemon_doc(rig, True))
    try:
        rig.established = establish_udp(rig, flows)
        yield _ctxdp_probe(rig)
    finally:
        rig.lab.stop_daemon()


@contextlib.contextmanager
def ctxdp_slow(rig: Rig) -> Iterator[Callable[[], dict[str, int]]]:
    """The real daemon with offload disabled: XDP attached, every packet a miss."""
    rig.lab.start_daemon(daemon_doc(rig, False))
    try:
        yield _ctxdp_probe(rig)
    finally:
        rig.lab.stop_daemon()


_NFT = """
table inet {name} {{
    chain e2e_fwd {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ct state new iifname "p0" oifname "p1" accept
    }}
    chain e2e_snat {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "p1" ip saddr 10.0.1.0/24 masquerade
    }}
}}
"""


def _forwarding(rig: Rig, on: bool) -> None:
    v = "1" if on else "0"
    rig.lab.router.exec(["sysctl", "-qw", f"net.ipv4.ip_forward={v}",
                         f"net.ipv6.conf.all.forwarding={v}"])


@contextlib.contextmanager
def kernel_nft(rig: Rig) -> Iterator[Callable[[], dict[str, int]]]:
    """Linux forwarding + nf_conntrack (stateful forward chain) + nft masquerade."""
    router = rig.lab.router
    name = f"e2e_{rig.lab.uid}"
    try:
        router.exec(["nft", "-f", "-"], input=_NFT.format(name=name))
        _forwarding(rig, True)
        EP.attach(rig.router_ns, "p0", rig.progs.pass_fd)

        def probe() -> dict[str, int]:
            # Entries in nf_conntrack (this kernel leaves the per-CPU
            # "found" statistics at zero, so the table itself is the proof).
            out = router.exec(["conntrack", "-C"], check=False).strip()
            return {"nf_conntrack_entries": int(out) if out.isdigit() else -1}

        yield probe
    finally:
        EP.detach(rig.router_ns, "p0")
        _forwarding(rig, False)
        router.exec(["nft", "delete", "table", "inet", name], check=False)
        router.exec(["conntrack", "-F"], check=False)


@contextlib.contextmanager
def xdp_redirect(rig: Rig) -> Iterator[Callable[[], dict[str, int]]]:
    """The ceiling: bare XDP redirect of every frame to p1 with a MAC rewrite."""
    rig.progs.set_ceiling(rig.router_ns, rig.p1_ifindex, rig.ps.mac, rig.ps.peer_mac)
    EP.attach(rig.router_ns, "p0", rig.progs.redirect_fd)
    try:
        yield lambda: {}
    finally:
        EP.detach(rig.router_ns, "p0")


def ovs_netdev(rig: Rig) -> contextlib.AbstractContextManager:
    from e2e_ovs import ovs_netdev as impl  # noqa: PLC0415

    return impl(rig)


SYSTEMS: dict[str, Callable[[Rig], contextlib.AbstractContextManager]] = {
    "xdp-redirect": xdp_redirect,
    "ctxdp-offload": ctxdp_offload,
    "ctxdp-slow": ctxdp_slow,
    "kernel-nft": kernel_nft,
    "ovs-netdev": ovs_netdev,
}

SYSTEM_NOTES = {
    "xdp-redirect": "ceiling: XDP redirect of every frame to p1, MACs rewritten, nothing else",
    "ctxdp-offload": "ctxdp run, all generator flows established + offloaded (XDP fast path)",
    "ctxdp-slow": "ctxdp run with offload disabled: XDP misses, Python slow path forwards",
    "kernel-nft": "kernel forwarding + nf_conntrack (ct state rules) + nft masquerade",
    "ovs-netdev": "Open vSwitch userspace datapath, AF_PACKET ports, ct(commit,nat)",
}
