"""`ctxdp demo` end to end: it passes, shows offload and aging, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from ctxdp.lab.netns import lab_leftovers
from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

DEMO = [sys.executable, "-m", "ctxdp.cli", "demo"]


def _root_xdp_links() -> set[str]:
    """Root-namespace interfaces with an XDP program attached."""
    links = json.loads(subprocess.run(["ip", "-d", "-j", "link", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    return {ln["ifname"] for ln in links if ln.get("xdp")}


def _uid(output: str) -> str:
    m = re.search(r"\(lab ([0-9a-f]{8})\)", output)
    assert m, f"demo did not name its lab:\n{output}"
    return m.group(1)


def _assert_nothing_left(uid: str, xdp_before: set[str]) -> None:
    # Only this run's uid-named objects: colleagues' tests and benchmarks
    # create their own namespaces and pins concurrently.
    assert lab_leftovers(uid) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert uid not in listed
    assert not [p for p in os.listdir("/sys/fs/bpf") if uid in p]
    assert _root_xdp_links() <= xdp_before


def test_demo_passes_shows_offload_and_aging_and_cleans_up() -> None:
    """`ctxdp demo` exits 0, prints the offload, fast-path counts and aging, leaves nothing."""
    require_bcc()
    xdp_before = _root_xdp_links()
    proc = subprocess.run([*DEMO, "--mbytes", "4", "--udp-timeout", "2"], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OFFLOADED tcp" in out and "OFFLOADED udp" in out
    assert re.search(r"fast path: [\d,]+ -> / [\d,]+ <- packets", out), out
    assert "AGED OUT udp" in out
    assert "RESULT: PASS" in out and "nothing left behind" in out
    _assert_nothing_left(_uid(out), xdp_before)


def test_demo_interrupted_mid_transfer_cleans_up_and_fails() -> None:
    """SIGTERM while traffic runs: the demo tears everything down and exits non-zero."""
    require_bcc()
    xdp_before = _root_xdp_links()
    proc = subprocess.Popen([*DEMO, "--mbytes", "40", "--rate-mbps", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"OFFLOADED tcp" not in out and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        assert b"OFFLOADED tcp" in out, out.decode()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 1, text
    assert "RESULT: FAIL - interrupted" in text
    assert "nothing left behind" in text
    _assert_nothing_left(_uid(text), xdp_before)
