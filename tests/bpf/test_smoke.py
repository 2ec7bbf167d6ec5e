"""Smoke test: bcc compiles, loads and attaches a trivial XDP program to a veth
inside a namespace this test creates, and everything is removed afterwards."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

PROG = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(smoke_hits, u64, 1);
int smoke_pass(struct xdp_md *ctx) {
    int zero = 0;
    u64 *v = smoke_hits.lookup(&zero);
    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@pytest.fixture
def veth_ns():
    """A namespace holding one end of a veth pair; deleted on every exit path."""
    tag = uuid.uuid4().hex[:6]
    ns, a, b = f"ctxsmk{tag}", f"smka{tag}", f"smkb{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
        ip("link", "set", a, "up")
        ip("-n", ns, "link", "set", b, "up")
        yield ns, a
    finally:
        ip("link", "del", a, check=False)
        ip("netns", "del", ns, check=False)


def test_bcc_loads_and_attaches_xdp(veth_ns):
    """A trivial XDP program compiles, attaches natively to a veth and detaches."""
    bcc = require_bcc()
    ns, dev = veth_ns
    b = bcc.BPF(text=PROG)
    fn = b.load_func("smoke_pass", bcc.BPF.XDP)
    b.attach_xdp(dev, fn, 0)
    try:
        out = ip("-d", "link", "show", dev).stdout
        assert "xdp" in out
    finally:
        b.remove_xdp(dev, 0)
        b.cleanup()
    assert "prog/xdp" not in ip("-d", "link", "show", dev).stdout
