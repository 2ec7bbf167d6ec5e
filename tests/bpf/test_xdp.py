"""ctxdp.providers.xdp against the real kernel: attaching (native, generic,
fallback, rollback), both direction entries written and removed, ENOSPC
without half-written pairs, batches, aging through the mmap stamped by the
program under BPF_PROG_RUN, FIN teardown flags, pin/adopt/flush across
provider instances, and a close() that leaves nothing behind.

Every kernel object (netns, veth, XDP attachment, pin directory) carries a
uuid tag and is removed by a fixture finaliser that runs even on failure.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctxdp import bpfsys
from ctxdp.conntrack.flowtuple import FlowTuple
from ctxdp.providers import xdp as xdp_mod
from ctxdp.providers import xdp_layout as L
from ctxdp.providers.base import (
    PRIV_XDP,
    Batch,
    FlowDir,
    OffloadCtx,
    Op,
    OpKind,
    ProviderError,
)
from ctxdp.providers.keyindex import PyKeyIndex
from ctxdp.providers.xdp import XdpProvider
from tests.privileged import require_bcc, require_root

pytestmark = pytest.mark.privileged

TAG = uuid.uuid4().hex[:6]
PIN_PREFIX = f"/sys/fs/bpf/ctxdp-t{TAG}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def xdp_mode(dev: str) -> str | None:
    """'native', 'generic' or None: what `ip -d link` says is attached to ``dev``."""
    out = ip("-d", "link", "show", "dev", dev).stdout
    if "xdpgeneric" in out:
        return "generic"
    if "prog/xdp" in out:
        return "native"
    return None


@dataclass
class XPorts:
    ns: str
    a: str  # router-side ends, in this process's netns
    b: str
    big: str  # MTU 9000: veth refuses native XDP for it (ERANGE)
    a_idx: int
    b_idx: int


def _ifindex(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/ifindex").read_text())


def _detach_everything(*devs: str) -> None:
    for d in devs:
        ip("link", "set", "dev", d, "xdpgeneric", "off", check=False)
        ip("link", "set", "dev", d, "xdpdrv", "off", check=False)


@pytest.fixture(scope="module")
def xports():
    """Three veth pairs with peers in a private netns; all deleted at the end."""
    require_root()
    ns = f"ctxxdp{TAG}"
    a, b, big = f"xpa{TAG}", f"xpb{TAG}", f"xpj{TAG}"
    ip("netns", "add", ns)
    try:
        for i, dev in enumerate((a, b, big)):
            mtu = ["mtu", "9000"] if dev == big else []
            peer = ["peer", "name", f"xpp{i}{TAG}", *mtu, "netns", ns]
            ip("link", "add", dev, *mtu, "type", "veth", *peer)
            ip("link", "set", dev, "up")
            ip("-n", ns, "link", "set", f"xpp{i}{TAG}", "up")
        yield XPorts(ns, a, b, big, _ifindex(a), _ifindex(b))
    finally:
        _detach_everything(a, b, big)
        for dev in (a, b, big):
            ip("link", "del", dev, check=False)
        ip("netns", "del", ns, check=False)
        for p in Path("/sys/fs/bpf").glob(f"ctxdp-t{TAG}*"):
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True, params=["compiled-add", "python-add"])
def add_path(request):
    """Every test runs twice: ADD runs through the compiled common case
    (ctxdp/providers/_fastadd.c) and through the Python definition alone,
    with the Python key index too (what runs without the extension)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(XdpProvider, "compiled_add", request.param == "compiled-add")
        if request.param == "python-add":
            mp.setattr(xdp_mod, "KeyIndex", PyKeyIndex)
        yield request.param


@pytest.fixture
def make(xports):
    """Factory of providers on unique pin dirs; every one is closed (keep off),
    its ports detached and its pin dir removed after the test, pass or fail."""
    require_bcc()
    made: list[XdpProvider] = []

    def _make(ports=None, **kw) -> XdpProvider:
        kw.setdefault("pin_dir", f"{PIN_PREFIX}-{uuid.uuid4().hex[:6]}")
        kw.setdefault("max_conns", 64)
        p = XdpProvider(ports if ports is not None else [xports.a, xports.b], **kw)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.keep = False
        with contextlib.suppress(Exception):
            p.close()
    _detach_everything(xports.a, xports.b, xports.big)
    for p in made:
        shutil.rmtree(p.pin_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(xports, add_path):
    """One started provider for the map-operation tests (compiled once)."""
    require_bcc()
    p = XdpProvider([xports.a, xports.b], max_conns=64, pin_dir=f"{PIN_PREFIX}-shared")
    try:
        p.start()
        yield p
    finally:
        p.keep = False
        with contextlib.suppress(Exception):
            p.close()
        _detach_everything(xports.a, xports.b)
        shutil.rmtree(p.pin_dir, ignore_errors=True)


@pytest.fixture
def prov(shared):
    """The shared provider, flushed before and after the test."""
    assert shared.flush() == 0
    yield shared
    shared.flush()


# --- connections ------------------------------------------------------------------

MAC_A = bytes.fromhex("020000000a01")  # router port a
MAC_B = bytes.fromhex("020000000b01")  # router port b
MAC_CLIENT = bytes.fromhex("02000000c001")
MAC_SERVER = bytes.fromhex("02000000d001")


def v4(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


def v6(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, s)


def make_ctx(
    xp: XPorts, n: int = 0, *, snat: bool = True, proto: int = 6, fam: int = 4
) -> OffloadCtx:
    """A client(a) -> server(b) connection #n, SNATed to 192.168.1.1 (IPv6:
    fd01::1) by default."""
    if fam == 4:
        client, server, pub = v4("10.0.0.2"), v4("192.168.1.2"), v4("192.168.1.1")
    else:
        client, server, pub = v6("fd00::2"), v6("fd01::2"), v6("fd01::1")
    cport, sport = 40000 + n, 80
    orig = FlowTuple(fam, proto, client, server, cport, sport)
    if snat:
        reply = FlowTuple(fam, proto, server, pub, sport, 50000 + n)
    else:
        reply = orig.reverse()
    d0 = FlowDir(xp.a_idx, orig, reply.reverse(), xp.b_idx, MAC_B, MAC_SERVER, 1500)
    d1 = FlowDir(xp.b_idx, reply, orig.reverse(), xp.a_idx, MAC_A, MAC_CLIENT, 1500)
    return OffloadCtx(conn=None, zone=0, orig=orig, reply=reply, snat=snat, dirs=[d0, d1])


def bcc_entries(p: XdpProvider) -> dict[tuple, object]:
    """ct_flows4 as bcc's own ctypes types see it: (ifindex, src, sport) -> leaf."""
    t = p.table[b"ct_flows4"]
    out = {}
    for k, v in t.items():
        out[(k.ifindex, struct.pack("=I", k.src), socket_ntohs(k.sport))] = (k, v)
    return out


def leaf_packets(v) -> int:
    """Packets of a bcc ct_flow_val leaf: the sum of its per-CPU counter slots."""
    return sum(c.packets for c in v.cnt)


def socket_ntohs(x: int) -> int:
    return int.from_bytes(x.to_bytes(2, "little"), "big")


def tcp_frame(d: FlowDir, flags: str = "A") -> bytes:
    from scapy.layers.inet import IP, TCP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415
    from scapy.layers.l2 import Ether  # noqa: PLC0415
    from scapy.packet import Raw  # noqa: PLC0415

    m = d.match
    if m.family == 4:
        l3 = IP(
            src=socket.inet_ntop(socket.AF_INET, m.src),
            dst=socket.inet_ntop(socket.AF_INET, m.dst),
            ttl=64,
        )
    else:
        l3 = IPv6(
            src=socket.inet_ntop(socket.AF_INET6, m.src),
            dst=socket.inet_ntop(socket.AF_INET6, m.dst),
            hlim=64,
        )
    pkt = (
        Ether(src="02:00:00:00:00:99", dst="02:00:00:00:00:98")
        / l3
        / TCP(sport=m.sport, dport=m.dport, flags=flags, seq=1, ack=1)
        / Raw(b"x" * 20)
    )
    return bytes(pkt)


def map_lens(p: XdpProvider) -> dict[int, int]:
    """Entries per family's flow map."""
    return {
        fam: sum(n for _k, _v, n in bpfsys.map_lookup_batch(fd, L.key_size(fam), L.VAL_SIZE))
        for fam, fd in p.flows_fds.items()
    }


def run(p: XdpProvider, frame: bytes, ifindex: int) -> bpfsys.TestRun:
    return bpfsys.prog_test_run(p.prog_fd, frame, ingress_ifindex=ifindex)


def map_len(p: XdpProvider) -> int:
    return sum(
        n
        for fam, fd in p.flows_fds.items()
        for _k, _v, n in bpfsys.map_lookup_batch(fd, L.key_size(fam), L.VAL_SIZE)
    )


# --- attaching ------------------------------------------------------------------------


def test_start_attaches_native_pins_and_fills_tx_ports(make, xports):
    """start() attaches natively to every port, pins the maps, lists both ports."""
    p = make()
    p.start()
    assert p.attached == {xports.a: "native", xports.b: "native"}
    assert xdp_mode(xports.a) == "native" and xdp_mode(xports.b) == "native"
    assert set(os.listdir(p.pin_dir)) == {
        "ct_flows4",
        "ct_flows6",
        "ct_last_used",
        "ct_stats",
        "ct_tx_ports",
    }
    tx = p.table[b"ct_tx_ports"].map_fd
    keys = set()
    k = bpfsys.map_get_next_key(tx, None, 4)
    while k is not None:
        keys.add(struct.unpack("=I", k)[0])
        k = bpfsys.map_get_next_key(tx, k, 4)
    assert keys == {xports.a_idx, xports.b_idx}
    assert p.stats()["ports_native"] == 2


def test_generic_mode_is_forced(make, xports):
    """mode='generic' attaches in skb mode even where native would work."""
    p = make(mode="generic")
    p.start()
    assert set(p.attached.values()) == {"generic"}
    assert xdp_mode(xports.a) == "generic"


def test_auto_falls_back_to_generic_with_warning(make, xports, caplog):
    """mode='auto' uses generic, with a warning, on a port that refuses native."""
    p = make([xports.a, xports.big])
    with caplog.at_level(logging.WARNING, logger="ctxdp.providers.xdp"):
        p.start()
    assert p.attached == {xports.a: "native", xports.big: "generic"}
    assert xdp_mode(xports.big) == "generic"
    assert any("generic" in r.getMessage() for r in caplog.records)


def test_native_mode_failure_rolls_back_earlier_ports(make, xports):
    """mode='native' fails hard on the second port and detaches the first."""
    p = make([xports.a, xports.big], mode="native")
    with pytest.raises(ProviderError) as ei:
        p.start()
    assert ei.value.errno == errno.ERANGE
    assert xdp_mode(xports.a) is None and xdp_mode(xports.big) is None
    assert not os.path.exists(p.pin_dir)
    assert not p.started


def test_missing_port_rolls_back(make, xports):
    """A port that does not exist fails start() with ENODEV and leaves nothing attached."""
    p = make([xports.a, f"nope{TAG}"])
    with pytest.raises(ProviderError) as ei:
        p.start()
    assert ei.value.errno == errno.ENODEV
    assert xdp_mode(xports.a) is None
    assert not os.path.exists(p.pin_dir)


def test_init_returns_errno_instead_of_raising(make, xports):
    """init() reports a failed start as an errno for the offload manager."""
    p = make([f"nope{TAG}"])
    assert p.init() == errno.ENODEV
    assert isinstance(p.init_error, ProviderError)


def test_pin_dir_off_bpffs_is_refused_clearly(make, tmp_path):
    """A pin dir outside bpffs fails with a message that says how to mount it."""
    p = make(pin_dir=str(tmp_path / "pins"))
    with pytest.raises(ProviderError, match="mount -t bpf"):
        p.start()


def test_close_detaches_and_unpins(make, xports):
    """close() (keep=False) removes the XDP program from every port and the pins."""
    p = make()
    p.start()
    p.close()
    assert xdp_mode(xports.a) is None and xdp_mode(xports.b) is None
    assert not os.path.exists(p.pin_dir)
    p.close()  # idempotent


# --- installing -----------------------------------------------------------------------


def test_conn_add_writes_both_directions(prov, xports):
    """conn_add writes the two entries bcc reads back with the right keys and values."""
    ctx = make_ctx(xports)
    assert prov.conn_add(ctx) == 0
    ents = bcc_entries(prov)
    assert len(ents) == 2
    k0, v0 = ents[(xports.a_idx, v4("10.0.0.2"), 40000)]
    k1, v1 = ents[(xports.b_idx, v4("192.168.1.2"), 80)]
    assert (k0.proto, socket_ntohs(k0.dport)) == (6, 80)
    assert struct.pack("=I", k0.dst) == v4("192.168.1.2")
    assert struct.pack("=I", k1.dst) == v4("192.168.1.1")
    assert socket_ntohs(k1.dport) == 50000
    assert v0.slot == v1.slot == prov.slot_of(ctx)
    assert v0.flags == L.CT_F_SNAT and v1.flags == L.CT_F_DNAT
    assert bytes(bytearray(v0.nat_src))[:4] == v4("192.168.1.1")
    assert socket_ntohs(v0.nat_sport) == 50000
    assert bytes(bytearray(v1.nat_dst))[:4] == v4("10.0.0.2")
    assert socket_ntohs(v1.nat_dport) == 40000
    assert (v0.out_ifindex, v1.out_ifindex) == (xports.b_idx, xports.a_idx)
    assert bytes(bytearray(v0.smac)) == MAC_B and bytes(bytearray(v0.dmac)) == MAC_SERVER
    assert bytes(bytearray(v1.smac)) == MAC_A and bytes(bytearray(v1.dmac)) == MAC_CLIENT
    assert v0.mtu == 1500 and leaf_packets(v0) == 0
    s = prov.stats()
    assert (s["conns"], s["entries"], s["adds"]) == (1, 2, 1)


def test_unresolved_connection_is_eagain(prov, xports):
    """A missing direction or next hop gives EAGAIN and writes nothing."""
    ctx = make_ctx(xports)
    ctx.dirs[1] = None
    assert prov.conn_add(ctx) == errno.EAGAIN
    ctx = make_ctx(xports)
    ctx.dirs[0].dst_mac = None
    assert prov.conn_add(ctx) == errno.EAGAIN
    assert map_len(prov) == 0 and prov.stats()["conns"] == 0


def test_unpackable_direction_is_einval(prov, xports):
    """A direction the map cannot encode (MTU > 65535) is EINVAL, not an exception."""
    ctx = make_ctx(xports)
    ctx.dirs[1].mtu = 70000
    assert prov.conn_add(ctx) == errno.EINVAL
    assert map_len(prov) == 0 and prov.slot_of(ctx) is None


def test_key_owned_by_another_connection_is_eexist(prov, xports):
    """Two connections never own one key: the second add is EEXIST, the first intact."""
    a, b = make_ctx(xports), make_ctx(xports)
    assert prov.conn_add(a) == 0
    assert prov.conn_add(b) == errno.EEXIST
    assert map_len(prov) == 2 and prov.slot_of(b) is None


def test_clash_on_the_reply_key_only_leaves_the_original_key_free(prov, xports):
    """A connection whose reply key is taken is EEXIST and its free key stays free."""
    a = make_ctx(xports, 0)
    assert prov.conn_add(a) == 0
    b = make_ctx(xports, 1)
    b.dirs[1] = a.dirs[1]  # same reply entry as a, different original one
    assert prov.conn_add(b) == errno.EEXIST
    c = make_ctx(xports, 1)  # b's original key must not be left claimed
    assert prov.conn_add(c) == 0
    assert map_len(prov) == 4


def test_readd_rewrites_in_place(prov, xports):
    """Adding a held connection again (or conn_policy) rewrites it on the same slot."""
    ctx = make_ctx(xports)
    assert prov.conn_add(ctx) == 0
    slot = prov.slot_of(ctx)
    ctx.dirs[0].dst_mac = bytes.fromhex("02000000d002")
    assert prov.conn_policy(ctx) == 0
    assert prov.slot_of(ctx) == slot and map_len(prov) == 2
    _k, v0 = bcc_entries(prov)[(xports.a_idx, v4("10.0.0.2"), 40000)]
    assert bytes(bytearray(v0.dmac)) == bytes.fromhex("02000000d002")
    assert prov.conn_add(ctx) == 0 and prov.stats()["conns"] == 1


def test_policy_batch_rewrites_held_and_refuses_unknown(prov, xports):
    """A POLICY run rewrites every held connection in place; unknown ones get ENOENT."""
    ctxs = [make_ctx(xports, i) for i in range(4)]
    prov.batch_submit(Batch([Op(OpKind.ADD, c) for c in ctxs[:3]]))
    slots = [prov.slot_of(c) for c in ctxs[:3]]
    for c in ctxs:
        c.dirs[0].dst_mac = bytes.fromhex("02000000d0ff")
    ops = [Op(OpKind.POLICY, c) for c in ctxs]
    prov.batch_submit(Batch(ops))
    assert [o.err for o in ops] == [0, 0, 0, errno.ENOENT]
    assert [prov.slot_of(c) for c in ctxs[:3]] == slots and map_len(prov) == 6
    dmacs = {
        bytes(bytearray(v.dmac)) for k, v in bcc_entries(prov).values() if k.ifindex == xports.a_idx
    }
    assert dmacs == {bytes.fromhex("02000000d0ff")}


def test_conn_del_removes_both_and_frees_the_slot(prov, xports):
    """conn_del deletes both entries; the slot is reused; a second del is ENOENT."""
    ctx = make_ctx(xports)
    prov.conn_add(ctx)
    free = prov.stats()["free_slots"]
    assert prov.conn_del(ctx) == 0
    assert map_len(prov) == 0
    assert prov.stats()["free_slots"] == free + 1
    assert prov.conn_del(ctx) == errno.ENOENT
    with pytest.raises(ProviderError):
        prov.conn_update(ctx)


def test_batch_submit_runs_each_kind_in_order(prov, xports):
    """One batch: ADDs (one unresolved), UPD, EST, DEL all get their own result."""
    ctxs = [make_ctx(xports, i) for i in range(10)]
    bad = make_ctx(xports, 99)
    bad.dirs[1] = None
    ops = [Op(OpKind.ADD, c) for c in ctxs] + [Op(OpKind.ADD, bad)]
    ops += [Op(OpKind.UPD, ctxs[0]), Op(OpKind.EST, ctxs[1]), Op(OpKind.DEL, ctxs[2])]
    ops += [Op(OpKind.DEL, ctxs[3]), Op(OpKind.UPD, ctxs[3])]
    prov.batch_submit(Batch(ops))
    assert [o.err for o in ops[:10]] == [0] * 10
    assert ops[10].err == errno.EAGAIN
    assert (ops[11].err, ops[11].result) == (0, None)  # never hit
    assert ops[12].err == 0 and ops[13].err == 0 and ops[14].err == 0
    assert ops[15].err == errno.ENOENT
    assert map_len(prov) == 2 * 8
    assert len({prov.slot_of(c) for c in ctxs[4:]}) == 6


def test_flush_deletes_everything(prov, xports):
    """flush() empties both flow maps and forgets every connection."""
    ctxs = [make_ctx(xports, i) for i in range(5)]
    prov.batch_submit(Batch([Op(OpKind.ADD, c) for c in ctxs]))
    assert map_len(prov) == 10
    assert prov.flush() == 0
    assert map_len(prov) == 0
    assert prov.stats()["conns"] == 0 and prov.slot_of(ctxs[0]) is None


def test_families_go_to_their_own_maps(prov, xports):
    """One batch of IPv4 and IPv6 connections: IPv4 entries land in ct_flows4,
    IPv6 ones in ct_flows6, each op succeeds, and deletes find both maps."""
    ctxs = [make_ctx(xports, i, fam=4 if i % 2 else 6) for i in range(6)]
    ops = [Op(OpKind.ADD, c) for c in ctxs]
    prov.batch_submit(Batch(ops))
    assert [o.err for o in ops] == [0] * 6
    assert map_lens(prov) == {4: 6, 6: 6}
    assert len({prov.slot_of(c) for c in ctxs}) == 6
    dels = [Op(OpKind.DEL, c) for c in ctxs[:3]]
    prov.batch_submit(Batch(dels))
    assert [o.err for o in dels] == [0] * 3
    assert map_lens(prov) == {4: 4, 6: 2}
    fams = sorted(r.match.family for r in prov.flows())
    assert fams == [4, 4, 4, 4, 6, 6]


def test_ipv6_connection_is_forwarded_and_counted(prov, xports):
    """An IPv6 connection installed by the provider is hit by the program through
    ct_flows6 and its per-direction counters and last-used read back."""
    ctx = make_ctx(xports, fam=6)
    assert prov.conn_add(ctx) == 0
    f0 = tcp_frame(ctx.dirs[0])
    assert run(prov, f0, xports.a_idx).retval == bpfsys.XDP_REDIRECT
    ((c, pkts, byts),) = prov.counters()
    assert c is ctx and pkts == (1, 0) and byts == (len(f0), 0)
    assert prov.conn_update(ctx) is not None


def test_directions_of_two_families_are_einval(prov, xports):
    """A connection whose directions are of different families is refused (EINVAL)."""
    ctx = make_ctx(xports)
    ctx.dirs[1] = make_ctx(xports, fam=6).dirs[1]
    assert prov.conn_add(ctx) == errno.EINVAL
    assert map_lens(prov) == {4: 0, 6: 0} and prov.slot_of(ctx) is None


# --- the fast path writes, the provider reads --------------------------------------------


def test_aging_reads_the_stamp_the_program_wrote(prov, xports):
    """A packet run through the program stamps last-used; conn_update(_many) reads
    it through the mmap as seconds on time.monotonic()'s clock."""
    ctx, other = make_ctx(xports, 0), make_ctx(xports, 1)
    prov.conn_add(ctx)
    prov.conn_add(other)
    assert prov.conn_update(ctx) is None
    t0 = time.monotonic()
    res = run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx)
    t1 = time.monotonic()
    assert res.retval == bpfsys.XDP_REDIRECT
    lu = prov.conn_update(ctx)
    # The program uses the coarse clock: it may lag by a tick (<= 10 ms).
    assert t0 - 0.02 <= lu <= t1 + 0.001
    assert prov.conn_update_many([ctx, other]) == [lu, None]
    _k, v0 = bcc_entries(prov)[(xports.a_idx, v4("10.0.0.2"), 40000)]
    assert v0.last_used == prov.last_used_ns(ctx) and leaf_packets(v0) == 1
    assert prov.stats()["hit"] >= 1


def test_counters_per_direction(prov, xports):
    """counters() reports the program's packet/byte counts for each direction."""
    ctx = make_ctx(xports)
    prov.conn_add(ctx)
    f0, f1 = tcp_frame(ctx.dirs[0]), tcp_frame(ctx.dirs[1])
    for _ in range(2):
        assert run(prov, f0, xports.a_idx).retval == bpfsys.XDP_REDIRECT
    assert run(prov, f1, xports.b_idx).retval == bpfsys.XDP_REDIRECT
    ((c, pkts, byts),) = prov.counters()
    assert c is ctx and pkts == (2, 1) and byts == (2 * len(f0), len(f1))


def test_fin_flags_the_connection_for_teardown(prov, xports):
    """A FIN is punted by the program and teardown_flagged() returns its connection."""
    ctx, other = make_ctx(xports, 0), make_ctx(xports, 1)
    prov.conn_add(ctx)
    prov.conn_add(other)
    assert prov.teardown_flagged() == []
    assert run(prov, tcp_frame(ctx.dirs[0], "FA"), xports.a_idx).retval == bpfsys.XDP_PASS
    assert prov.teardown_flagged() == [ctx]
    assert prov.stats()["punt_fin_rst"] >= 1


@pytest.mark.parametrize("walk_share", [1e9, 0.0], ids=["lookups", "walk"])
def test_fold_counters_adds_each_packet_once_across_rewrite_delete_and_flush(
        prov, xports, monkeypatch, walk_share):
    """fold_counters adds what the entries counted since the last fold to the
    conn; a POLICY rewrite (which restarts the entry's counters), a DEL and a
    FLUSH fold first, so no packet is lost or counted twice. Both read modes:
    one lookup per entry, and one lookup-batch walk."""
    monkeypatch.setattr(prov, "WALK_SHARE", walk_share)
    ctx, other = make_ctx(xports, 0), make_ctx(xports, 1)
    for c in (ctx, other):
        c.conn = SimpleNamespace(pkts=[0, 0], bytes=[0, 0])
        assert prov.conn_add(c) == 0
    f0, f1 = tcp_frame(ctx.dirs[0]), tcp_frame(ctx.dirs[1])
    for f, idx in ((f0, xports.a_idx), (f0, xports.a_idx), (f1, xports.b_idx)):
        assert run(prov, f, idx).retval == bpfsys.XDP_REDIRECT
    assert prov.fold_counters([ctx]) == 1
    assert ctx.conn.pkts == [2, 1] and ctx.conn.bytes == [2 * len(f0), len(f1)]
    assert prov.fold_counters(None) == 2  # all held: nothing new
    assert ctx.conn.pkts == [2, 1] and other.conn.pkts == [0, 0]
    assert run(prov, f0, xports.a_idx).retval == bpfsys.XDP_REDIRECT
    ctx.dirs[0] = FlowDir(ctx.dirs[0].in_ifindex, ctx.dirs[0].match, ctx.dirs[0].out,
                          ctx.dirs[0].out_ifindex, MAC_B, MAC_CLIENT, 1500)
    pol = Op(OpKind.POLICY, ctx)
    prov.batch_submit(Batch([pol]))
    assert pol.err == 0 and ctx.conn.pkts == [3, 1]  # folded before the rewrite
    assert run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval == bpfsys.XDP_REDIRECT
    assert run(prov, f1, xports.b_idx).retval == bpfsys.XDP_REDIRECT
    assert prov.conn_del(ctx) == 0  # folds what it deletes
    assert ctx.conn.pkts == [4, 2] and prov.fold_counters([ctx]) == 0
    g0 = tcp_frame(other.dirs[0])
    assert run(prov, g0, xports.a_idx).retval == bpfsys.XDP_REDIRECT
    assert prov.flush() == 0  # lookup-and-delete batch: folds what it takes out
    assert other.conn.pkts == [1, 0] and other.conn.bytes == [len(g0), 0]
    assert map_lens(prov) == {4: 0, 6: 0}


def one_packet_in(prov, xports) -> OffloadCtx:
    """A connection offloaded to ``prov`` (with a conn to fold into) whose
    orig entry forwarded one packet."""
    ctx = make_ctx(xports, 0)
    ctx.conn = SimpleNamespace(pkts=[0, 0], bytes=[0, 0])
    assert prov.conn_add(ctx) == 0
    assert run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval == bpfsys.XDP_REDIRECT
    return ctx


def test_packets_right_after_a_policy_rewrite_are_counted(prov, xports, monkeypatch):
    """A packet the fast path forwards the moment a POLICY rewrite lands is folded
    into the conn too: the rewrite restarts the entry at zero, and so its base."""
    ctx = one_packet_in(prov, xports)
    add_run = prov._add_run

    def add_run_then_traffic(ops):  # the write, then a packet before anything else runs
        add_run(ops)
        assert run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval == bpfsys.XDP_REDIRECT

    monkeypatch.setattr(prov, "_add_run", add_run_then_traffic)
    ctx.dirs[0] = FlowDir(ctx.dirs[0].in_ifindex, ctx.dirs[0].match, ctx.dirs[0].out,
                          ctx.dirs[0].out_ifindex, MAC_B, MAC_CLIENT, 1500)
    pol = Op(OpKind.POLICY, ctx)
    prov.batch_submit(Batch([pol]))
    assert pol.err == 0 and ctx.conn.pkts == [1, 0]  # folded before the rewrite
    assert prov.fold_counters([ctx]) == 1 and ctx.conn.pkts == [2, 0]


def test_a_policy_rewrite_takes_the_entries_out_before_it_writes(prov, xports, monkeypatch):
    """The rewrite folds counts taken out with the entries (final), so a packet in
    the gap misses to the slow path instead of counting into an entry then lost."""
    ctx = one_packet_in(prov, xports)
    read, gap = prov._read, []

    def read_then_traffic(hs, **kw):
        out = read(hs, **kw)
        if kw.get("take"):  # between the take and the new entries' write
            gap.append(run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval)
        return out

    monkeypatch.setattr(prov, "_read", read_then_traffic)
    pol = Op(OpKind.POLICY, ctx)
    prov.batch_submit(Batch([pol]))
    assert gap == [bpfsys.XDP_PASS]  # a miss: the slow path forwards and counts it
    assert pol.err == 0 and ctx.conn.pkts == [1, 0] and map_lens(prov)[4] == 2
    assert run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval == bpfsys.XDP_REDIRECT
    assert prov.fold_counters([ctx]) == 1 and ctx.conn.pkts == [2, 0]


def test_a_del_takes_the_entries_out_as_it_reads_them(prov, xports, monkeypatch):
    """A DEL of a few connections folds counts taken out with the entries: the
    packet right after is a miss, not a count lost in a deleted entry."""
    monkeypatch.setattr(prov, "WALK_SHARE", 1e9)  # a lookup per entry, not a walk
    ctx = one_packet_in(prov, xports)
    read, gap = prov._read, []

    def read_then_traffic(hs, **kw):
        out = read(hs, **kw)
        gap.append((kw.get("take"), run(prov, tcp_frame(ctx.dirs[0]), xports.a_idx).retval))
        return out

    monkeypatch.setattr(prov, "_read", read_then_traffic)
    assert prov.conn_del(ctx) == 0
    assert gap == [(True, bpfsys.XDP_PASS)] and ctx.conn.pkts == [1, 0]
    assert map_lens(prov) == {4: 0, 6: 0} and prov.slot_of(ctx) is None


def test_policy_rewrite_without_lookup_and_delete(prov, xports, monkeypatch):
    """A kernel without BPF_MAP_LOOKUP_AND_DELETE_ELEM (EINVAL up front): the rewrite
    reads the counters, then overwrites, and stops asking."""
    lookup_many, calls = bpfsys.map_lookup_many, []

    def old_kernel(*a, delete=False, **kw):
        calls.append(delete)
        if delete:
            raise OSError(errno.EINVAL, "bpf(MAP_LOOKUP_AND_DELETE_ELEM): Invalid argument")
        return lookup_many(*a, **kw)

    monkeypatch.setattr(bpfsys, "map_lookup_many", old_kernel)
    monkeypatch.setattr(prov, "_has_lookup_del_elem", True)
    ctx = one_packet_in(prov, xports)
    for _ in range(2):
        pol = Op(OpKind.POLICY, ctx)
        prov.batch_submit(Batch([pol]))
        assert pol.err == 0
    assert calls == [True] and ctx.conn.pkts == [1, 0]  # asked once; then a read (a walk here)
    assert map_lens(prov)[4] == 2


def test_stat_reads_one_program_counter(prov, xports):
    """stat("punt_fin_rst") moves with a punted RST (the daemon's flag-scan gate)."""
    ctx = make_ctx(xports, 0)
    prov.conn_add(ctx)
    punts = prov.stat("punt_fin_rst")
    assert run(prov, tcp_frame(ctx.dirs[0], "RA"), xports.a_idx).retval == bpfsys.XDP_PASS
    assert prov.stat("punt_fin_rst") == punts + 1


# --- capacity -------------------------------------------------------------------------


def fill_foreign(p: XdpProvider, n: int) -> None:
    """Write ``n`` IPv4 entries no connection owns straight into ct_flows4."""
    keys, vals = bytearray(n * L.KEY4_SIZE), bytearray(n * L.VAL_SIZE)
    for i in range(n):
        L.KEY4.pack_into(keys, i * L.KEY4_SIZE, 999, b"\1" * 4, b"\2" * 4, i, i, 17)
    bpfsys.map_update_batch(p.flows_fds[4], keys, vals, n)


def test_enospc_when_slots_run_out(make, xports):
    """With CT_MAX_CONNS=4 the fifth connection is ENOSPC, counted, nothing written."""
    p = make(max_conns=4)
    p.start()
    ctxs = [make_ctx(xports, i) for i in range(5)]
    assert [p.conn_add(c) for c in ctxs] == [0, 0, 0, 0, errno.ENOSPC]
    assert map_len(p) == 8
    s = p.stats()
    assert (s["enospc"], s["conns"], s["free_slots"]) == (1, 4, 0)
    assert p.conn_del(ctxs[0]) == 0 and p.conn_add(ctxs[4]) == 0


def test_full_map_rolls_back_a_half_written_pair(make, xports):
    """When the kernel map fills after the first entry of a pair, that entry is
    removed again: ENOSPC, and no half connection stays in the map."""
    p = make(max_conns=4)
    p.start()
    # Seven foreign entries leave room for exactly one: the pair cannot fit.
    fill_foreign(p, 7)
    ctx = make_ctx(xports)
    ops = [Op(OpKind.ADD, ctx)]
    p.batch_submit(Batch(ops))
    assert ops[0].err == errno.ENOSPC
    assert map_len(p) == 7
    s = p.stats()
    assert (s["rollbacks"], s["enospc"], s["conns"], s["free_slots"]) == (1, 1, 0, 4)


# --- restart --------------------------------------------------------------------------


def test_keep_then_adopt_keeps_forwarding_state(make, xports):
    """keep=True leaves XDP attached and maps pinned; a new provider adopting them
    sees the connection, and re-adding it claims the same slot and stamp."""
    p1 = make(keep=True)
    p1.start()
    ctx = make_ctx(xports)
    assert p1.conn_add(ctx) == 0
    run(p1, tcp_frame(ctx.dirs[0]), xports.a_idx)
    slot, stamp = p1.slot_of(ctx), p1.last_used_ns(ctx)
    p1.close()
    assert xdp_mode(xports.a) == "native" and os.path.exists(p1.pin_dir)

    p2 = make(pin_dir=p1.pin_dir, on_start="adopt")
    p2.start()
    s = p2.stats()
    assert (s["orphans"], s["entries"], s["adopted"]) == (1, 2, 1)
    ctx2 = make_ctx(xports)  # the restarted daemon's view of the same connection
    assert p2.conn_add(ctx2) == 0
    assert p2.slot_of(ctx2) == slot and p2.last_used_ns(ctx2) == stamp
    s = p2.stats()
    assert (s["orphans"], s["conns"], s["claimed"], s["entries"]) == (0, 1, 1, 2)
    p2.close()
    assert xdp_mode(xports.a) is None and not os.path.exists(p1.pin_dir)


def test_keep_then_flush_starts_empty(make, xports):
    """on_start='flush' ignores what a kept run left: empty map, all slots free."""
    p1 = make(keep=True)
    p1.start()
    p1.conn_add(make_ctx(xports))
    p1.close()
    p2 = make(pin_dir=p1.pin_dir, on_start="flush")
    p2.start()
    assert map_len(p2) == 0
    s = p2.stats()
    assert (s["orphans"], s["free_slots"]) == (0, 64)


def test_unclaimed_orphans_are_reaped(make, xports):
    """reap_orphans() deletes adopted entries nobody claimed and frees their slots."""
    p1 = make(keep=True)
    p1.start()
    p1.conn_add(make_ctx(xports, 0))
    p1.conn_add(make_ctx(xports, 1))
    p1.close()
    p2 = make(pin_dir=p1.pin_dir)
    p2.start()
    assert p2.conn_add(make_ctx(xports, 0)) == 0
    assert p2.reap_orphans() == 1
    assert map_len(p2) == 2 and p2.stats()["free_slots"] == 63


def test_pins_of_an_older_layout_are_dropped(make, xports, caplog):
    """A pin this build does not know (the single ct_flows of builds before the
    per-family maps) makes the start begin from fresh maps, with a warning."""
    p1 = make(keep=True)
    p1.start()
    p1.conn_add(make_ctx(xports))
    p1.close()
    fd = bpfsys.map_create("hash", L.KEY_SIZE, 96, 16, name="ct_flows")
    try:
        bpfsys.obj_pin(fd, os.path.join(p1.pin_dir, "ct_flows"))
    finally:
        os.close(fd)
    p2 = make(pin_dir=p1.pin_dir)
    with caplog.at_level(logging.WARNING, logger="ctxdp.providers.xdp"):
        p2.start()
    assert map_len(p2) == 0 and p2.stats()["orphans"] == 0
    assert "ct_flows" not in os.listdir(p2.pin_dir)
    assert any("does not use" in r.getMessage() for r in caplog.records)


def test_pins_of_another_size_are_not_adopted(make, xports, caplog):
    """Pinned maps built for another CT_MAX_CONNS are replaced, with a warning."""
    p1 = make(keep=True, max_conns=64)
    p1.start()
    p1.conn_add(make_ctx(xports))
    p1.close()
    p2 = make(pin_dir=p1.pin_dir, max_conns=128)
    with caplog.at_level(logging.WARNING, logger="ctxdp.providers.xdp"):
        p2.start()
    assert map_len(p2) == 0 and p2.stats()["orphans"] == 0
    assert any("fresh maps" in r.getMessage() for r in caplog.records)


def test_pipelined_chunks_roll_back_exactly_the_refused(make, xports):
    """A run written in pipelined chunks installs what fits and rolls back exactly
    the connections the kernel refused, including one half-written pair."""
    p = make(max_conns=16)
    p.start()
    p.PIPELINE_CHUNK = 4  # 16 ADDs -> three chunks through the writer, the last by the caller
    fill_foreign(p, 7)  # room for 12 pairs and one lone entry
    ctxs = [make_ctx(xports, i) for i in range(16)]
    ops = [Op(OpKind.ADD, c) for c in ctxs]
    p.batch_submit(Batch(ops))
    # The caller's last chunk and the writer's run at once, so which four the
    # full map refuses depends on how they interleave; how many does not.
    ok = [c for c, o in zip(ctxs, ops, strict=True) if o.err == 0]
    refused = [c for c, o in zip(ctxs, ops, strict=True) if o.err == errno.ENOSPC]
    assert (len(ok), len(refused)) == (12, 4)
    assert map_len(p) == 7 + 24
    s = p.stats()
    assert (s["conns"], s["enospc"], s["rollbacks"], s["free_slots"]) == (12, 4, 1, 4)
    assert all(p.slot_of(c) is None for c in refused)
    assert p.conn_update_many(ok) == [None] * 12


def test_long_runs_are_pipelined_and_land_whole(make, xports, add_path):
    """A 600-ADD run of both families (in chunks through the native writer on the
    compiled path) installs every connection; a second run reuses the writer."""
    p = make(max_conns=1024)
    p.start()
    ctxs = [make_ctx(xports, i, fam=4 if i % 2 else 6) for i in range(600)]
    for part in (ctxs[:400], ctxs[400:]):
        ops = [Op(OpKind.ADD, c) for c in part]
        p.batch_submit(Batch(ops))
        assert [o.err for o in ops] == [0] * len(part)
    assert map_len(p) == 1200 and p.stats()["conns"] == 600
    assert sorted(p.slot_of(c) for c in ctxs) == list(range(600))
    assert (p._writer is not None) == (add_path == "compiled-add")
    assert (type(p._idx) is PyKeyIndex) == (add_path == "python-add")
    assert (p.stats()["index_bytes"] > 0) == (add_path == "compiled-add")  # taken at start
    assert all(p._idx.find(k) >= 0 for c in ctxs for k in p._keys(c.priv[PRIV_XDP]))


def test_restart_in_another_mode_replaces_the_kept_program(make, xports):
    """A kept generic attachment is replaced by a native one on restart (the kernel
    refuses both at once; the provider drops the old mode first)."""
    p1 = make(keep=True, mode="generic")
    p1.start()
    p1.close()
    assert xdp_mode(xports.a) == "generic"
    p2 = make(pin_dir=p1.pin_dir, mode="native")
    p2.start()
    assert p2.attached == {xports.a: "native", xports.b: "native"}
    assert xdp_mode(xports.a) == "native"
    p2.close()
    assert xdp_mode(xports.a) is None


def test_kernel_without_batch_commands_falls_back_to_single_ops(prov, xports, monkeypatch):
    """When BPF_MAP_UPDATE/DELETE_BATCH are unknown (EINVAL, count untouched) the
    provider switches to single-element updates and deletes, with the same results."""

    def no_batch(fd, keys, *a, **kw):
        count = a[1] if len(a) > 1 else a[0]
        raise bpfsys.BatchError(errno.EINVAL, count, "unsupported")

    monkeypatch.setattr(bpfsys, "map_update_batch", no_batch)
    monkeypatch.setattr(bpfsys, "map_delete_batch", no_batch)
    monkeypatch.setattr(prov, "_has_batch", True)
    monkeypatch.setattr(prov, "_has_del_batch", True)
    ctxs = [make_ctx(xports, i) for i in range(3)]
    ops = [Op(OpKind.ADD, c) for c in ctxs]
    prov.batch_submit(Batch(ops))
    assert [o.err for o in ops] == [0, 0, 0] and map_len(prov) == 6
    assert prov.conn_del(ctxs[0]) == 0 and map_len(prov) == 4
    assert not prov._has_batch and not prov._has_del_batch
