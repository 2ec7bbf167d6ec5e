"""The lab itself: NetnsLab build/teardown, the agent, control, and the base scenarios."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

from ctxdp.config import parse_config
from ctxdp.lab import scenarios
from ctxdp.lab.hosts import AgentError, SshHost, lab_from_spec, to_toml
from ctxdp.lab.netns import NetnsLab, lab_leftovers
from tests.integration.conftest import lab_config
from tests.privileged import require_bcc, require_root

pytestmark = pytest.mark.privileged


def test_to_toml_writes_a_config_the_daemon_parses() -> None:
    """A lab config document survives to_toml -> tomllib -> parse_config unchanged."""
    doc = {
        "aging_interval": 0.5,
        "control_socket": "/tmp/x.sock",
        "ports": [{"name": "p0"}, {"name": "p1", "zone": 2}],
        "nat": [{"type": "masquerade", "out_port": "p1"}],
        "policy": {"default": "deny", "rules": [{"action": "allow", "dport": [80, "8000-8100"]}]},
        "conntrack": {"timeouts": {"udp_bidir": 3.0}},
    }
    assert tomllib.loads(to_toml(doc)) == doc
    cfg = parse_config(tomllib.loads(to_toml(doc)))
    assert cfg.ports[1].zone == 2 and cfg.conntrack.timeouts["udp_bidir"] == 3.0


def test_netns_lab_builds_hosts_with_the_offload_recipe_and_leaves_nothing() -> None:
    """Hosts reach the router, eth0 has GRO on/TX csum off, router ports GRO off; close removes all."""
    require_root()
    with NetnsLab() as lab:
        uid = lab.uid
        assert set(lab.hosts) == {"client", "router", "server"}
        lab.client.exec(["ping", "-c", "1", "-W", "2", lab.router_addr("client")])
        feats = lab.client.exec(["ethtool", "-k", "eth0"])
        assert "generic-receive-offload: on" in feats
        assert "tx-checksumming: off" in feats
        assert "generic-receive-offload: off" in lab.router.exec(["ethtool", "-k", "p0"])
        assert lab_leftovers(uid), "the lab's namespaces should exist while it is open"
    assert lab.leftovers() == []
    assert lab_leftovers(uid) == []


def test_netns_lab_tears_down_a_running_daemon_when_the_block_raises() -> None:
    """An exception inside the with-block still stops the daemon and removes pins and namespaces."""
    require_bcc()
    lab = NetnsLab()
    with pytest.raises(RuntimeError, match="boom"), lab:
        lab.start_daemon(lab_config(lab))
        assert os.path.isdir(lab.pin_dir)
        raise RuntimeError("boom")
    assert not lab.daemon_alive()
    assert lab.leftovers() == []


def test_netns_lab_removes_the_pins_of_a_killed_daemon() -> None:
    """A SIGKILLed daemon cannot unpin its maps; the lab's teardown removes them."""
    require_bcc()
    with NetnsLab() as lab:
        lab.start_daemon(lab_config(lab))
        lab._job.proc.kill()  # no SIGTERM: the daemon gets no chance to clean up
        lab._job.proc.wait(10)
        assert os.listdir(lab.pin_dir), "a killed daemon should leave its pins"
    assert lab.leftovers() == []


def test_ctl_agrees_with_the_cli_json(running_lab) -> None:
    """lab.ctl (agent over the socket) returns what `ctxdp --socket S stats --json` prints."""
    lab = running_lab
    via_agent = lab.ctl("stats")
    out = lab.router.exec([*lab.router.ctxdp, "--socket", lab.socket_path, "stats", "--json"])
    via_cli = json.loads(out)
    assert set(via_agent) == set(via_cli)
    assert via_agent["offload"]["enabled"] is True


def test_agent_reports_a_refused_connection_as_an_error(running_lab) -> None:
    """tcp-send to a port nobody listens on ends with an error event, not a hang."""
    lab = running_lab
    ap = lab.agent("client", ["tcp-send", "--dst", lab.addr("server"), "--port", "9",
                              "--bytes", "10", "--timeout", "10"])
    with pytest.raises(AgentError, match="refused"):
        ap.result(15)


def test_tcp_transfer_ipv4_is_offloaded_after_the_handshake(running_lab) -> None:
    """8 MB over IPv4: offloaded before any data, slow path flat, fast path carries it, sha ok."""
    r = scenarios.tcp_transfer(running_lab, family=4, nbytes=8_000_000)
    assert r["slow_pkts_after_data"] - r["slow_pkts_handshake"] <= 2
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]
    assert r["closed_state"] in ("FIN_WAIT", "CLOSING", "TIME_WAIT", "CLOSED")


def test_udp_flow_offloaded_kept_while_active_and_aged_when_idle(running_lab) -> None:
    """UDP: offloaded after the reply, never aged while XDP carries it, aged out when idle."""
    r = scenarios.udp_offload_and_age(running_lab, family=4)
    assert r["active_s"] > r["timeout_s"]
    assert r["slow_pkts_after_active"] - r["slow_pkts_first"] <= 2
    assert r["aged_after_idle_s"] is not None


def test_spec_lab_over_an_argv_transport_runs_the_same_scenario(netns_lab) -> None:
    """lab_from_spec + SshHost (nsenter and sh -c standing in for ssh) run daemon and tcp_transfer."""
    require_bcc()
    base = netns_lab
    spec = {
        "hosts": {role: {"ssh": ["nsenter", f"--net=/run/netns/{h.ns}", "sh", "-c"]}
                  for role, h in base.hosts.items()},
        "repo": str(Path(__file__).resolve().parents[2]),
        "ctxdp": [sys.executable, "-m", "ctxdp.cli"],
        "sudo": False,
        "links": [dataclasses.asdict(ln) for ln in base.links.values()],
        "workdir": f"{base.workdir}/spec",
        "socket_path": f"{base.workdir}/spec.sock",
        "pin_dir": base.pin_dir,
    }
    lab = lab_from_spec(spec)
    assert all(isinstance(h, SshHost) for h in lab.hosts.values())
    with lab:
        lab.start_daemon(lab_config(lab))
        pid = lab._job.pid
        r = scenarios.tcp_transfer(lab, nbytes=2_000_000)
    assert r["fast_pkts"][0] >= 0.95 * r["min_segments"]
    assert not os.path.exists(f"/proc/{pid}/exe") or "ctxdp" not in Path(
        f"/proc/{pid}/cmdline").read_text(errors="replace"), "remote-style daemon not stopped"
    assert not os.path.isdir(base.pin_dir), "daemon stopped by pid should have unpinned"
