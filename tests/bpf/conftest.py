"""Session fixtures for the XDP fast-path tests.

Contract:
- ``ports``: two veth pairs created for this session. The router-side ends
  (``a``, ``b``) live in the test process's netns, because BPF_PROG_RUN and
  devmap updates resolve ifindexes there; the peers (``ap``, ``bp``) live in
  a namespace of their own, so live frames never leave what the test made.
  No addresses are configured. Everything is deleted at session end.
- ``ct_prog``: bpf/ct_offload.c compiled ONCE per session (1-2 s) with
  -DCT_TEST_HOOKS, a small CT_MAX_CONNS, the counter-slot flags of
  ``xdp_layout.cflags()`` and ct_tx_ports adopted from a DEVMAP_HASH this
  fixture creates and pins (the production arrangement).
  Teardown: bcc cleanup, unlink the pin, close fds.
- ``ct``: per test, the program with every map emptied first, plus helpers
  to install entries (into ct_flows4 or ct_flows6, told by the key's length)
  and run frames.
All names carry a uuid tag: other engineers run tests concurrently.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctxdp import bpfsys
from ctxdp.providers import xdp_layout as L
from tests.privileged import require_bcc, require_root

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
TEST_MAX_CONNS = 1024


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Ports:
    ns: str
    a: str
    b: str
    ap: str
    bp: str
    a_idx: int
    b_idx: int


@pytest.fixture(scope="session")
def ports():
    """Two veth pairs (a<->ap, b<->bp), peers in a private netns; removed at the end."""
    require_root()
    tag = uuid.uuid4().hex[:6]
    ns = f"ctxbpf{tag}"
    a, b = f"cxa{tag}", f"cxb{tag}"
    ap, bp = f"cxap{tag}", f"cxbp{tag}"
    ip("netns", "add", ns)
    try:
        for dev, peer in ((a, ap), (b, bp)):
            ip("link", "add", dev, "type", "veth", "peer", "name", peer, "netns", ns)
            ip("link", "set", dev, "up")
            ip("-n", ns, "link", "set", peer, "up")
        yield Ports(
            ns,
            a,
            b,
            ap,
            bp,
            int(Path(f"/sys/class/net/{a}/ifindex").read_text()),
            int(Path(f"/sys/class/net/{b}/ifindex").read_text()),
        )
    finally:
        ip("link", "del", a, check=False)
        ip("link", "del", b, check=False)
        ip("netns", "del", ns, check=False)


@dataclass
class CtProg:
    """The loaded program and its map fds."""

    bpf: object
    prog_fd: int
    flows_fds: dict[int, int]  # key size -> ct_flows4 / ct_flows6 fd
    last_used_fd: int
    stats_fd: int
    tx_fd: int
    debug_fd: int
    ncpus: int
    last_used_mm: object = None  # mmap of ct_last_used
    pins: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def ct_prog(ports):
    """bpf/ct_offload.c with test hooks, compiled and loaded once per session."""
    bcc = require_bcc()
    tag = uuid.uuid4().hex[:8]
    tx_pin = f"/sys/fs/bpf/ctxdp_test_{tag}_tx"
    tx_fd = bpfsys.map_create("devmap_hash", 4, 4, L.CT_MAX_PORTS, name="ct_tx_ports")
    b = None
    try:
        bpfsys.obj_pin(tx_fd, tx_pin)
        b = bcc.BPF(
            src_file=str(BPF_DIR / "ct_offload.c").encode(),
            cflags=[
                f"-I{BPF_DIR}",
                f"-DCT_MAX_CONNS={TEST_MAX_CONNS}",
                f'-DCT_TX_PORTS_PIN="{tx_pin}"',
                "-DCT_TEST_HOOKS",
                *L.cflags(),
            ],
        )
        fn = b.load_func(b"ct_offload_xdp", bcc.BPF.XDP)
        lu_fd = b[b"ct_last_used"].map_fd
        prog = CtProg(
            b,
            fn.fd,
            {L.KEY4_SIZE: b[b"ct_flows4"].map_fd, L.KEY_SIZE: b[b"ct_flows6"].map_fd},
            b[b"ct_last_used"].map_fd,
            b[b"ct_stats"].map_fd,
            b[b"ct_tx_ports"].map_fd,
            b[b"ct_debug"].map_fd,
            bpfsys.num_possible_cpus(),
            bpfsys.mmap_array(lu_fd, 8, TEST_MAX_CONNS),
            [tx_pin],
        )
        try:
            yield prog
        finally:
            prog.last_used_mm.close()
    finally:
        if b is not None:
            b.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tx_pin)
        os.close(tx_fd)


class Ct:
    """Per-test view of the program: install entries, run frames, read state."""

    def __init__(self, prog: CtProg, ports: Ports) -> None:
        self.p = prog
        self.ports = ports

    # -- state ---------------------------------------------------------------
    def reset(self) -> None:
        for size, fd in self.p.flows_fds.items():
            keys = [
                k
                for ks, _v, n in bpfsys.map_lookup_batch(fd, size, L.VAL_SIZE)
                for k in (bytes(ks[i * size : (i + 1) * size]) for i in range(n))
            ]
            for k in keys:
                bpfsys.map_delete(fd, k)
        zero_pc = bytes(8 * self.p.ncpus)
        for i in range(L.CT_STAT_MAX):
            bpfsys.map_update(self.p.stats_fd, struct.pack("=I", i), zero_pc)
        bpfsys.map_update(self.p.debug_fd, struct.pack("=I", 0), bytes(16))
        self.p.last_used_mm[: TEST_MAX_CONNS * 8] = bytes(TEST_MAX_CONNS * 8)
        k = None
        while (k := bpfsys.map_get_next_key(self.p.tx_fd, k, 4)) is not None:
            bpfsys.map_delete(self.p.tx_fd, k)
            k = None

    def add_port(self, ifindex: int) -> None:
        bpfsys.map_update(self.p.tx_fd, struct.pack("=I", ifindex), struct.pack("=I", ifindex))

    def install(self, key: bytes, val: bytes) -> None:
        bpfsys.map_update(self.p.flows_fds[len(key)], key, val)

    def entry(self, key: bytes) -> L.FlowVal | None:
        raw = bpfsys.map_lookup(self.p.flows_fds[len(key)], key, L.VAL_SIZE)
        return None if raw is None else L.unpack_val(raw)

    def stats(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(L.CT_STAT_NAMES):
            raw = bpfsys.map_lookup(self.p.stats_fd, struct.pack("=I", i), 8 * self.p.ncpus)
            out[name] = sum(struct.unpack(f"={self.p.ncpus}Q", raw))
        return out

    def last_used(self, slot: int) -> int:
        raw = bpfsys.map_lookup(self.p.last_used_fd, struct.pack("=I", slot), 8)
        return struct.unpack("=Q", raw)[0]

    def debug(self) -> tuple[int, int, int, int]:
        """(runs, action, target ifindex, stat) of the latest run."""
        raw = bpfsys.map_lookup(self.p.debug_fd, struct.pack("=I", 0), 16)
        return struct.unpack("=4I", raw)

    # -- running -------------------------------------------------------------
    def run(self, frame: bytes, ifindex: int | None = None) -> bpfsys.TestRun:
        return bpfsys.prog_test_run(
            self.p.prog_fd,
            frame,
            ingress_ifindex=self.ports.a_idx if ifindex is None else ifindex,
        )


@pytest.fixture
def ct(ct_prog, ports):
    """The session program with empty maps and egress port b in ct_tx_ports."""
    c = Ct(ct_prog, ports)
    c.reset()
    c.add_port(ports.b_idx)
    try:
        yield c
    finally:
        c.reset()
