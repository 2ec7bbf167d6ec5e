"""Issue 5's "Done when", literally, with the shipped ``examples/ctxdp.toml``.

Contract: one privileged test builds the router the example describes (a
router namespace whose ports are named exactly as the example's
``[[ports]]``, ``lan0`` and ``wan0``, a LAN host and a WAN host), runs
``ctxdp run`` on it with the example config, and drives it only through the
``ctxdp`` CLI (``--socket S flows|conntrack|stats --json``, ``reload``), so
it proves what an operator would see:

- a LAN -> WAN TCP transfer is forwarded intact (sha256), masqueraded (the
  WAN host sees the router's wan0 address), and offloaded (conntrack says
  ``offloaded``; ``flows --json`` shows its two entries, whose packet
  counts rise between two polls while it runs);
- ``ctxdp reload`` with a config whose lan0 -> wan0 rule says ``deny``
  removes a running, offloaded connection's flow entries and conntrack
  entry, and its bytes stop reaching the WAN host, within one
  ``aging_interval`` (read from the example) plus a small margin.

The config is the example AS SHIPPED except for the two paths that must be
unique per run so that concurrent runs cannot collide: ``control_socket``
and ``offload.pin_dir`` are rewritten (textually; the test checks that the
parsed documents differ in exactly those two keys). The deny config is that
copy with the one ``action`` of the lan0 -> wan0 rule flipped (also checked
to be the only difference).

Addressing follows the example: the LAN is 10.0.1.0/24 and fd00:1::/64 and
the LAN host is 10.0.1.10, the example's port-forward target. The WAN side
uses documentation prefixes and the WAN host has NO route to the LAN, so a
reply reaches the LAN host only if masquerade rewrote the source.

Every exit path stops the traffic agents and the daemon (SIGTERM, so it
detaches XDP and unpins), deletes the namespaces and the work directory,
then asserts that nothing carrying this run's unique id is left: no
namespace, no pin directory, no work directory, no process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctxdp.lab.netns import remove_pin_dir
from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ctxdp.toml"
#: The installed CLI of the venv running the tests (``.venv/bin/ctxdp``).
CTXDP = Path(sys.executable).parent / "ctxdp"
BPFFS = "/sys/fs/bpf"
TCP = 6

# Router ports: names from the example's [[ports]]; LAN addresses from its comments.
LAN_PORT, WAN_PORT = "lan0", "wan0"
LAN_GW4, LAN_GW6 = "10.0.1.1", "fd00:1::1"
LAN_HOST4, LAN_HOST6 = "10.0.1.10", "fd00:1::10"  # the example's DNAT target
WAN_ROUTER4, WAN_ROUTER6 = "198.51.100.1", "2001:db8:100::1"
WAN_HOST4, WAN_HOST6 = "198.51.100.2", "2001:db8:100::2"

RATE_MBPS = 16.0
INTEGRITY_BYTES = 6_000_000  # ~3 s at RATE_MBPS: long enough for two flow polls
STREAM_BYTES = 60_000_000  # ~30 s at RATE_MBPS: still running when the reload lands
MARGIN_S = 0.5  # on top of one aging interval: CLI round trips + the agent's progress period
HOLD_S = 2.0  # how long the denied stream must then stay silent


# --------------------------------------------------------------------------
# Config copies
# --------------------------------------------------------------------------


def _sub_once(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == 1, f"examples/ctxdp.toml: expected one match of {pattern!r}, found {n}"
    return out


def per_run_copy(example: str, socket_path: str, pin_dir: str) -> str:
    """The example's text with only ``control_socket`` and ``offload.pin_dir`` replaced."""
    text = _sub_once(r'^control_socket = "[^"]*"', f'control_socket = "{socket_path}"', example)
    text = _sub_once(r'^pin_dir = "[^"]*"', f'pin_dir = "{pin_dir}"', text)
    want = tomllib.loads(example)
    want["control_socket"] = socket_path
    want["offload"]["pin_dir"] = pin_dir
    assert tomllib.loads(text) == want, "the per-run copy differs from the example beyond its paths"
    return text


def _is_lan_to_wan_allow(rule: dict[str, Any]) -> bool:
    return (rule.get("action") == "allow" and rule.get("in_port") == LAN_PORT
            and rule.get("out_port") == WAN_PORT)


def deny_copy(config: str) -> str:
    """``config`` with the lan0 -> wan0 allow rule's action flipped to deny (nothing else)."""
    text = _sub_once(
        r'^(\[\[policy\.rules\]\]\naction = )"allow"(\nin_port = "lan0"\nout_port = "wan0"\n)',
        r'\1"deny"\2', config)
    want = tomllib.loads(config)
    rules = want["policy"]["rules"]
    hits = [i for i, r in enumerate(rules) if _is_lan_to_wan_allow(r)]
    assert len(hits) == 1, f"expected one lan0 -> wan0 allow rule, found {hits}"
    rules[hits[0]]["action"] = "deny"
    assert tomllib.loads(text) == want, "the deny copy changes more than that rule's action"
    return text


# --------------------------------------------------------------------------
# The example's router, on namespaces
# --------------------------------------------------------------------------


def _cli(sock: str, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(CTXDP), "--socket", sock, *args], capture_output=True, text=True,
                          timeout=timeout)


def _cli_json(sock: str, *args: str) -> Any:
    proc = _cli(sock, *args, "--json")
    assert proc.returncode == 0, f"ctxdp {' '.join(args)} --json: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


@dataclass
class ExampleRouter:
    """The namespaces, the daemon and the traffic agents of one run."""

    topo: Any  # ctxdp.lab.netns.Topology
    uid: str
    workdir: str
    socket: str
    pin_dir: str
    config_path: str
    log_path: str
    router: Any = None  # NetnsHost
    lan: Any = None
    wan: Any = None
    job: Any = None  # LocalJob of the daemon
    agents: list[Any] = field(default_factory=list)
    daemon_rc: int | None = None
    pins_left_by_daemon: list[str] = field(default_factory=list)

    # -- control, through the CLI ---------------------------------------
    def conntrack(self) -> list[dict[str, Any]]:
        return list(_cli_json(self.socket, "conntrack")["conns"])

    def flows(self) -> list[dict[str, Any]]:
        return list(_cli_json(self.socket, "flows")["flows"])

    def stats(self) -> dict[str, Any]:
        return dict(_cli_json(self.socket, "stats"))

    def log(self, tail: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return "(no daemon log)"

    def agent(self, host: Any, argv: list[str]) -> Any:
        from ctxdp.lab.hosts import AgentProc

        ap = AgentProc(host, argv)
        self.agents.append(ap)
        return ap

    # -- daemon ----------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        # nsenter --net, not ``ip netns exec``: the latter remounts /sys and
        # so hides the bpffs the daemon pins its maps on (NetnsHost.wrap).
        self.job = self.router.spawn([str(CTXDP), "run", "--config", self.config_path],
                                     self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.job.alive(), f"ctxdp run exited during start-up:\n{self.log()}"
            if _cli(self.socket, "stats", "--json").returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(
            f"ctxdp not answering on {self.socket} after {timeout}s:\n{self.log()}")

    def close(self) -> list[str]:
        """Tear everything down (each step even if an earlier one failed); leftovers."""
        for ap in self.agents:
            ap.kill()
        if self.job is not None:
            self.daemon_rc = self.job.stop(15.0)
            # SIGTERM without keep_on_restart: the daemon unpins itself.
            if os.path.isdir(self.pin_dir):
                self.pins_left_by_daemon = sorted(os.listdir(self.pin_dir)) or ["(empty dir)"]
        self.topo.close()
        remove_pin_dir(self.pin_dir)  # the daemon failed to unpin: clean up anyway
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        from ctxdp.lab.netns import leftover_namespaces

        out = [f"netns {n}" for n in leftover_namespaces(self.topo.names)]
        out += [p for p in (self.pin_dir, self.workdir) if os.path.lexists(p)]
        if self.job is not None and self.job.alive():
            out.append(f"daemon pid {self.job.pid}")
        out += [f"process {pid}" for pid in _pids_mentioning(self.uid)]
        if self.pins_left_by_daemon:
            out.append(f"pins the daemon did not remove on SIGTERM: {self.pins_left_by_daemon}")
        return out


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (our unique id)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _build(er: ExampleRouter) -> None:
    from ctxdp.lab.hosts import NetnsHost

    topo = er.topo
    router, lan, wan = topo.add_ns("router"), topo.add_ns("lan"), topo.add_ns("wan")
    # add_veth brings both ends up; ethtool comes after, in NetnsLab's order.
    topo.add_veth(router, LAN_PORT, lan, "eth0", "02:00:00:00:01:01", "02:00:00:00:02:01")
    topo.add_veth(router, WAN_PORT, wan, "eth0", "02:00:00:00:01:02", "02:00:00:00:02:02")
    er.router = NetnsHost(router.name, name="router")
    er.lan = NetnsHost(lan.name, name="lan")
    er.wan = NetnsHost(wan.name, name="wan")
    for host in (er.lan, er.wan):
        # XDP_REDIRECT into a veth is dropped unless the peer has GRO on; TX
        # checksum offload would hand the router CHECKSUM_PARTIAL frames.
        host.exec(["ethtool", "-K", "eth0", "gro", "on", "tx", "off"])
    for port in (LAN_PORT, WAN_PORT):
        # GRO super-frames could not be re-sent by the slow path.
        er.router.exec(["ethtool", "-K", port, "gro", "off"])
    router.ip("addr", "add", f"{LAN_GW4}/24", "dev", LAN_PORT)
    router.ip("-6", "addr", "add", f"{LAN_GW6}/64", "dev", LAN_PORT, "nodad")
    router.ip("addr", "add", f"{WAN_ROUTER4}/24", "dev", WAN_PORT)
    router.ip("-6", "addr", "add", f"{WAN_ROUTER6}/64", "dev", WAN_PORT, "nodad")
    lan.ip("addr", "add", f"{LAN_HOST4}/24", "dev", "eth0")
    lan.ip("-6", "addr", "add", f"{LAN_HOST6}/64", "dev", "eth0", "nodad")
    lan.ip("route", "add", "default", "via", LAN_GW4)
    lan.ip("-6", "route", "add", "default", "via", LAN_GW6)
    # The WAN host knows only its own link: no route to the LAN prefixes.
    wan.ip("addr", "add", f"{WAN_HOST4}/24", "dev", "eth0")
    wan.ip("-6", "addr", "add", f"{WAN_HOST6}/64", "dev", "eth0", "nodad")


@pytest.fixture
def example_router() -> Iterator[ExampleRouter]:
    """The example's router with ``ctxdp run`` on it; asserts a clean teardown."""
    require_bcc()
    assert CTXDP.exists(), f"{CTXDP} missing: install the package into the venv"
    from ctxdp.lab.netns import Topology

    topo = Topology()
    uid = topo.uid
    workdir = f"/tmp/ctxdp-example-{uid}"
    er = ExampleRouter(
        topo=topo, uid=uid, workdir=workdir, socket=f"{workdir}/ctl.sock",
        pin_dir=f"{BPFFS}/ctxdp-example-{uid}", config_path=f"{workdir}/ctxdp.toml",
        log_path=f"{workdir}/ctxdp.log",
    )
    left: list[str] = []
    try:
        os.makedirs(workdir, mode=0o700)
        Path(er.config_path).write_text(
            per_run_copy(EXAMPLE.read_text(), er.socket, er.pin_dir))
        _build(er)
        er.start()
        yield er
    finally:
        left = er.close()
    assert left == [], f"run {uid} left behind: {left}"


# --------------------------------------------------------------------------
# Helpers over CLI output
# --------------------------------------------------------------------------


def _find_conn(conns: list[dict[str, Any]], sport: int, dport: int) -> dict[str, Any] | None:
    for c in conns:
        o = c.get("orig", {})
        if (int(c.get("proto", -1)) == TCP and o.get("src") == LAN_HOST4
                and int(o.get("sport", -1)) == sport and o.get("dst") == WAN_HOST4
                and int(o.get("dport", -1)) == dport):
            return c
    return None


def _flow_pair(flows: list[dict[str, Any]], conn: dict[str, Any]) -> list[dict[str, Any] | None]:
    """[lan0 entry (original tuple), wan0 entry (reply tuple)] of ``conn``."""
    def key(t: dict[str, Any]) -> tuple:
        return (t.get("src"), t.get("dst"), int(t.get("sport", -1)), int(t.get("dport", -1)))

    want = [(LAN_PORT, key(conn["orig"])), (WAN_PORT, key(conn["reply"]))]
    out: list[dict[str, Any] | None] = [None, None]
    for f in flows:
        m = f.get("match", {})
        if int(m.get("proto", -1)) != TCP:
            continue
        for i, (port, k) in enumerate(want):
            if f.get("in_ifname") == port and key(m) == k:
                out[i] = f
    return out


def _poll(what: str, fn: Callable[[], Any], timeout: float, er: ExampleRouter,
          every: float = 0.05) -> Any:
    """``fn()``'s first truthy value within ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{er.log()}")
        time.sleep(every)


def _received(rx: Any) -> int:
    ev = rx.latest("progress")
    return int(ev["bytes"]) if ev else 0


def _sender_done(tx: Any) -> bool:
    """True once the sender reported its result; a sender that failed has not."""
    from ctxdp.lab.hosts import AgentError

    try:
        return tx.poll_event("result") is not None
    except AgentError:  # e.g. its deadline passed with data unsent: stalled
        return False


def _open_offloaded(er: ExampleRouter, port: int, nbytes: int,
                    timeout: float) -> tuple[Any, Any, int, dict[str, Any]]:
    """Receiver on the WAN host, paced sender on the LAN host, offloaded before any data."""
    rx = er.agent(er.wan, ["tcp-recv", "--port", str(port), "--progress", "0.1",
                           "--timeout", str(timeout)])
    rx.wait("listening", 15)
    tx = er.agent(er.lan, ["tcp-send", "--dst", WAN_HOST4, "--port", str(port),
                           "--bytes", str(nbytes), "--rate-mbps", str(RATE_MBPS), "--step",
                           "--timeout", str(timeout)])
    local = tx.wait("connected", 15)["local"]
    assert local[0] == LAN_HOST4, local
    sport = int(local[1])
    conn = _poll("the connection offloaded after the handshake",
                 lambda: (c := _find_conn(er.conntrack(), sport, port)) and c["offloaded"] and c,
                 5.0, er)
    tx.send("go")
    return rx, tx, sport, conn


def _rising_flows(er: ExampleRouter, conn: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Two ``flows --json`` polls ~1 s apart, both entries present; their packet counts."""
    first = _poll("both flow entries present and counting",
                  lambda: (p := _flow_pair(er.flows(), conn))[0] and p[1]
                  and p[0]["packets"] > 0 and p,
                  5.0, er)
    time.sleep(1.0)
    second = _flow_pair(er.flows(), conn)
    assert second[0] and second[1], f"a flow entry vanished while the data ran: {second}"
    before = [int(f["packets"]) for f in first]
    after = [int(f["packets"]) for f in second]
    return before, after


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


def test_example_config_forwards_offloads_and_reload_deny_stops_traffic(
        example_router: ExampleRouter) -> None:
    """With examples/ctxdp.toml: LAN->WAN TCP is masqueraded, intact, offloaded with rising
    flow counters, and a reload denying lan0->wan0 removes a running connection and stops
    its bytes within one aging interval."""
    er = example_router
    example = tomllib.loads(Path(er.config_path).read_text())
    aging = float(example["aging_interval"])

    # -- 1. forwarding, masquerade, integrity, offload, rising counters ----------
    rx, tx, sport, conn = _open_offloaded(er, 5001, INTEGRITY_BYTES, 60.0)
    assert conn["reply"]["dst"] == WAN_ROUTER4, f"not masqueraded to wan0's address: {conn}"
    before, after = _rising_flows(er, conn)
    assert all(a > b for a, b in zip(after, before, strict=True)), (
        f"flow packet counts did not rise between polls: lan0/wan0 {before} -> {after}")
    ct_row = _find_conn(er.conntrack(), sport, 5001)
    assert ct_row is not None and ct_row["offloaded"], f"not offloaded mid-transfer: {ct_row}"
    tx.wait("sent", 60)
    tx.send("go")  # --step: the second go-ahead lets the sender close (FIN)
    sent, got = tx.result(60), rx.result(60)
    assert got["bytes"] == sent["bytes"] == INTEGRITY_BYTES, (sent, got)
    assert got["sha256"] == sent["sha256"], "payload corrupted between LAN and WAN host"
    assert got["peer"][0] == WAN_ROUTER4, f"WAN host saw {got['peer']}, not wan0's address"
    print(f"\ntransfer: {INTEGRITY_BYTES} B in {got['seconds']} s, peer {got['peer']}, "
          f"flow packets lan0/wan0 {before} -> {after}")

    # -- 2. reload with lan0 -> wan0 denied stops a running offloaded stream -------
    rx, tx, sport, conn = _open_offloaded(er, 5002, STREAM_BYTES, 90.0)
    s_before, s_after = _rising_flows(er, conn)
    assert all(a > b for a, b in zip(s_after, s_before, strict=True)), (s_before, s_after)
    _poll("the WAN host receiving the stream", lambda: _received(rx) > 0, 5.0, er)
    drops0 = er.stats()["slow_path"].get("dropped") or {}

    Path(er.config_path).write_text(deny_copy(Path(er.config_path).read_text()))
    b_req = _received(rx)
    t_req = time.monotonic()
    last = {"bytes": b_req, "rise": 0.0}

    def sample() -> None:
        """Note when the WAN host's byte count last grew (seconds after the request)."""
        b = _received(rx)
        if b != last["bytes"]:
            last["bytes"], last["rise"] = b, time.monotonic() - t_req

    proc = _cli(er.socket, "reload")
    t_answer = time.monotonic() - t_req
    assert proc.returncode == 0, f"ctxdp reload failed: {proc.stderr.strip()}\n{er.log()}"
    answer = dict(re.findall(r"(\w+)=(\d+)", proc.stdout))
    assert int(answer.get("withdrawn", 0)) >= 1 and int(answer.get("deleted", 0)) >= 1, (
        f"reload did not withdraw and delete the stream: {proc.stdout.strip()}")

    def gone() -> bool:
        sample()
        return (_find_conn(er.conntrack(), sport, 5002) is None
                and _flow_pair(er.flows(), conn) == [None, None])

    _poll("flow entries and conntrack entry removed", gone, aging + MARGIN_S, er)
    t_gone = time.monotonic() - t_req

    # The WAN host's byte count must stop growing within one aging interval
    # (+ margin) and then stay put for HOLD_S.
    while time.monotonic() - t_req < aging + MARGIN_S + HOLD_S:
        sample()
        time.sleep(0.05)
    last_bytes, t_last_rise = last["bytes"], last["rise"]
    assert t_last_rise <= aging + MARGIN_S, (
        f"the WAN host still received bytes {t_last_rise:.2f}s after the reload "
        f"(aging interval {aging}s)")
    assert last_bytes < STREAM_BYTES and not _sender_done(tx), "the denied stream completed"
    drops1 = er.stats()["slow_path"].get("dropped") or {}
    refused = {k: int(v) - int(drops0.get(k, 0)) for k, v in drops1.items()
               if int(v) > int(drops0.get(k, 0))}
    assert refused.get("policy-deny", 0) + refused.get("ct-invalid", 0) > 0, (
        f"the sender's retransmissions were not refused by the slow path: {refused}")
    print(f"stream: flow packets lan0/wan0 {s_before} -> {s_after}; "
          f"reload answered {proc.stdout.strip()!r} after {t_answer:.2f}s; "
          f"entries gone after {t_gone:.2f}s; WAN host's last new byte seen "
          f"{t_last_rise:.2f}s after the request ({last_bytes - b_req} B after it, "
          f"{last_bytes} B total); slow-path drops since: {refused}")
