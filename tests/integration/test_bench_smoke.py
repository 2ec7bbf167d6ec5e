"""Smoke run of bench/e2e.py: every part of the harness runs and cleans up (no timing asserted)."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path

import pytest

from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _e2e():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("e2e")


def test_frames_have_the_size_and_checksums_a_host_would_send() -> None:
    """udp_frame builds exactly `size` bytes whose IPv4/UDP and IPv6/UDP checksums verify."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    ep = importlib.import_module("e2e_progs")
    mac_a, mac_b = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    for fam, src, dst in ((4, "10.0.1.2", "10.0.2.2"), (6, "fd00:1::2", "fd00:2::2")):
        for size in (64, 1514):
            raw = ep.udp_frame(fam, size, mac_a, mac_b, src, dst, 20001, 9000)
            assert len(raw) == size
            pkt = Ether(raw)
            redo = Ether(raw)
            del redo[UDP].chksum  # scapy recomputes what is deleted
            if fam == 4:
                del redo[IP].chksum
            redo = Ether(bytes(redo))
            assert pkt[UDP].chksum == redo[UDP].chksum != 0
            if fam == 4:
                assert pkt[IP].chksum == redo[IP].chksum
            else:
                assert pkt[IPv6].plen == size - 54
            assert (pkt.src, pkt.dst) == ("02:00:00:00:00:01", "02:00:00:00:00:02")
            assert pkt[UDP].dport == 9000


def test_e2e_quick_run_measures_every_part_and_leaves_nothing(tmp_path: Path) -> None:
    """A tiny e2e run fills every section of the JSON and leaves no namespace or pin behind."""
    require_bcc()
    e2e = _e2e()
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--quick", "--reps", "1", "--duration", "0.2", "--warmup", "0.1",
            "--cases", "4:64:1,6:64:1000",
            "--systems", "xdp-redirect,ctxdp-offload,ctxdp-slow,kernel-nft",
            "--latency-conns", "5", "--levels", "0", "--aging-at", "1000", "--sample", "200",
            "--out", str(tmp_path)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        argv.append("--no-plot")
    try:
        rc = e2e.main(argv)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert rc == 0
    res = json.loads((tmp_path / "e2e.json").read_text())
    assert res["meta"]["leftovers"] == []
    rate = res["rate"]
    assert rate["errors"] == {}
    for system in ("xdp-redirect", "ctxdp-offload", "ctxdp-slow", "kernel-nft"):
        for case in ("v4 SNAT 64B 1fl", "v6 64B 1000fl"):
            (sample,) = rate["samples"][system][case]
            assert sample["delivered"] > 0, (system, case)
    # Offloaded traffic really went through the XDP fast path, slow traffic did not.
    for case, (sample,) in rate["samples"]["ctxdp-offload"].items():
        assert sample["path"]["fast_hits"] >= sample["delivered"] > 0, case
    for case, (sample,) in rate["samples"]["ctxdp-slow"].items():
        assert sample["path"]["fast_hits"] == 0 and sample["path"]["slow_forwarded"] > 0, case
    assert rate["established"]["v4"] == rate["established"]["v6"] == 1000
    lat = res["latency"]
    assert "error" not in lat and lat["measured"] + lat["excluded"] == 5
    sc = res["scale"]
    assert "error" not in sc, sc.get("error")
    assert {x["variant"] for x in sc["setup"]} == {"shipped", "cached-masq-addr"}
    assert all(x["offloaded"] == x["new"] == 200 for x in sc["setup"])
    (aging,) = sc["aging"]
    assert aging["conns"] == 1000 and aging["still_offloaded"] == 1000
    assert set(aging["cases"]) == {"busy", "idle", "all-due"}
    assert "Bars (issue 7):" in res["table"]
    if "--no-plot" not in argv:
        assert (tmp_path / "e2e.png").stat().st_size > 0
