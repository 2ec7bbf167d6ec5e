"""ctxdp.cli: argument handling, exit codes, formatters (and ctxdp.log, used by `run`)."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import types

import pytest

from ctxdp import cli
from ctxdp.control import ControlError, ControlServer
from ctxdp.log import setup_logging

EXAMPLE = str(pathlib.Path(__file__).resolve().parents[2] / "examples" / "ctxdp.toml")

CONN_V4 = {
    "zone": 0, "proto": 6, "state": "ESTABLISHED",
    "orig": {"src": "10.0.1.5", "dst": "203.0.113.7", "sport": 40000, "dport": 443},
    "reply": {"src": "203.0.113.7", "dst": "192.0.2.1", "sport": 443, "dport": 40000},
    "offloaded": True, "packets": [10, 8], "bytes": [1500, 9000],
    "expires_in": 7199.6, "mark": 0,
}
CONN_ICMP6 = {
    "zone": 2, "proto": 58, "state": "", "offloaded": False,
    "orig": {"src": "fd00:1::5", "dst": "2001:db8::9", "sport": 77, "dport": 77},
    "reply": {"src": "2001:db8::9", "dst": "fd00:1::5", "sport": 77, "dport": 77},
    "packets": [1, 0], "bytes": [104, 0], "expires_in": None, "mark": 5,
}
FLOW = {
    "zone": 0, "provider": "xdp", "in_ifname": "lan0", "in_ifindex": 3,
    "match": {"family": 4, "proto": 6, "src": "10.0.1.5", "dst": "203.0.113.7",
              "sport": 40000, "dport": 443},
    "out": {"family": 4, "proto": 6, "src": "192.0.2.1", "dst": "203.0.113.7",
            "sport": 40000, "dport": 443},
    "out_ifname": "wan0", "out_ifindex": 4, "nat": "snat",
    "packets": 1234, "bytes": 1800000, "last_used_ago": 0.123,
}
FLOW6 = {
    "zone": 0, "in_ifname": None, "in_ifindex": 7,
    "match": {"family": 6, "proto": 17, "src": "2001:db8::9", "dst": "fd00:1::5",
              "sport": 53, "dport": 5353},
    "out": None, "out_ifname": "lan0", "out_ifindex": 3, "nat": None,
    "packets": 0, "bytes": 0, "last_used_ago": None,
}
STATS = {
    "process": {"cpu_percent": 3.25, "rss_bytes": 41943040},
    "slow_path": {"pps": 12.5, "packets": 1000},
    "fast_path": {"hits": 99, "misses": 4, "punts": {"tcp-fin": 2, "ttl": 1}, "redirect_errors": 0},
    "offload": {"enabled": True, "adds": 5, "dels": 1, "failures": {}, "pending": 0, "offloaded": 4},
    "maps": {"flows_used": 8, "flows_max": 65536},
    "extra": {"note": "x"},
}


# -- formatters ---------------------------------------------------------------------


def test_format_conntrack_lines():
    """Rows render conntrack -L style: proto, timeout, state, both directions, flags."""
    out = cli.format_conntrack({"conns": [CONN_V4, CONN_ICMP6]}).splitlines()
    assert out[0].split() == [
        "tcp", "6", "7199", "ESTABLISHED",
        "src=10.0.1.5", "dst=203.0.113.7", "sport=40000", "dport=443", "packets=10", "bytes=1500",
        "src=203.0.113.7", "dst=192.0.2.1", "sport=443", "dport=40000", "packets=8", "bytes=9000",
        "[OFFLOADED]", "mark=0", "zone=0",
    ]
    assert out[1].split() == [
        "icmpv6", "58", "-", "src=fd00:1::5", "dst=2001:db8::9", "id=77", "packets=1", "bytes=104",
        "src=2001:db8::9", "dst=fd00:1::5", "id=77", "packets=0", "bytes=0", "mark=5", "zone=2",
    ]
    assert out[2] == "ctxdp: 2 flow entries have been shown."


def test_format_flows_lines():
    """Flow rows show ingress, match, the NAT rewrite, egress and counters."""
    out = cli.format_flows({"flows": [FLOW, FLOW6]}).splitlines()
    assert out[0] == (
        "in=lan0 tcp 10.0.1.5:40000 > 203.0.113.7:443 rewrite=192.0.2.1:40000 > 203.0.113.7:443 "
        "nat=snat out=wan0 zone=0 packets=1234 bytes=1800000 used=0.12s ago provider=xdp"
    )
    assert out[1] == (
        "in=if7 udp [2001:db8::9]:53 > [fd00:1::5]:5353 out=lan0 zone=0 packets=0 bytes=0 "
        "used=never"
    )
    assert out[2] == "ctxdp: 2 offloaded entries."


def test_format_stats_sections_in_schema_order():
    """Stats print as indented sections in schema order, extras last, bytes humanised."""
    text = cli.format_stats(STATS)
    heads = [ln[:-1] for ln in text.splitlines() if not ln.startswith(" ")]
    assert heads == ["slow_path", "fast_path", "offload", "maps", "process", "extra"]
    assert "  pps: 12.50" in text
    assert "    tcp-fin: 2" in text
    assert "  failures: -" in text
    assert "  rss_bytes: 41943040 (40.0 MiB)" in text
    assert "  enabled: yes" in text


def test_format_result_summaries():
    """flush/offload/reload results get a one-line summary."""
    assert cli.format_result("flush", {"flushed": 3}) == "flushed 3 connections"
    assert cli.format_result("offload", {"enabled": False, "withdrawn": 2}) == (
        "offload disabled withdrawn=2"
    )
    assert cli.format_result("reload", {"withdrawn": 1, "rules": 4}) == "reload: withdrawn=1 rules=4"
    assert cli.format_result("reload", None) == "reload: ok"


# -- commands against a real control socket ---------------------------------------------


class FakeDaemon:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def handle(self, cmd, args):
        self.calls.append((cmd, args))
        if cmd == "conntrack":
            rows = [CONN_V4, CONN_ICMP6]
            if "zone" in args:
                rows = [r for r in rows if r["zone"] == args["zone"]]
            return {"conns": rows}
        if cmd == "flows":
            return {"flows": [FLOW]}
        if cmd == "stats":
            return STATS
        if cmd == "flush":
            return {"flushed": 2}
        if cmd == "offload":
            return {"enabled": args["enabled"]}
        if cmd == "reload":
            raise ControlError("examples/x.toml: policy.default: expected one of allow, deny")
        raise ControlError(f"unknown command {cmd}")


@pytest.fixture
def daemon():
    d = tempfile.mkdtemp(prefix="ctxdp-cli-", dir="/tmp")
    fake = FakeDaemon()
    srv = ControlServer(os.path.join(d, "c.sock"), fake)
    srv.serve_in_thread()
    fake.path = srv.path
    yield fake
    srv.close()
    shutil.rmtree(d, ignore_errors=True)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_conntrack_command_sends_zone_and_formats(daemon, capsys):
    """`conntrack --zone 2` asks for zone 2 and prints formatted rows."""
    rc, out, err = run(capsys, "--socket", daemon.path, "conntrack", "--zone", "2")
    assert rc == 0 and err == ""
    assert daemon.calls == [("conntrack", {"zone": 2})]
    assert out.splitlines()[0].startswith("icmpv6   58 - src=fd00:1::5")


def test_json_flag_prints_raw_result(daemon, capsys):
    """--json prints the daemon's result as JSON, unformatted."""
    rc, out, _ = run(capsys, "--socket", daemon.path, "flows", "--json")
    assert rc == 0 and json.loads(out) == {"flows": [FLOW]}
    rc, out, _ = run(capsys, "--socket", daemon.path, "stats", "--json")
    assert rc == 0 and json.loads(out) == STATS


def test_action_commands(daemon, capsys):
    """flush, offload enable/disable send the right requests and summarise."""
    assert run(capsys, "--socket", daemon.path, "flush")[1] == "flushed 2 connections\n"
    assert run(capsys, "--socket", daemon.path, "flush", "--zone", "7")[0] == 0
    assert run(capsys, "--socket", daemon.path, "offload", "disable")[1] == "offload disabled\n"
    assert run(capsys, "--socket", daemon.path, "offload", "enable")[1] == "offload enabled\n"
    assert daemon.calls == [
        ("flush", {}), ("flush", {"zone": 7}),
        ("offload", {"enabled": False}), ("offload", {"enabled": True}),
    ]


def test_socket_from_environment(daemon, capsys, monkeypatch):
    """Without --socket, $CTXDP_SOCKET picks the daemon."""
    monkeypatch.setenv(cli.SOCKET_ENV, daemon.path)
    rc, out, _ = run(capsys, "stats")
    assert rc == 0 and out.startswith("slow_path:")


def test_error_response_exits_1(daemon, capsys):
    """A daemon-side error prints one line naming the command and exits 1."""
    rc, out, err = run(capsys, "--socket", daemon.path, "reload")
    assert rc == 1 and out == ""
    assert err == "ctxdp: reload: examples/x.toml: policy.default: expected one of allow, deny\n"


def test_unreachable_daemon_exits_1(capsys, tmp_path):
    """No daemon: one line 'cannot reach daemon at PATH: reason', exit 1."""
    path = str(tmp_path / "none.sock")
    rc, _, err = run(capsys, "--socket", path, "stats")
    assert rc == 1
    assert err == f"ctxdp: cannot reach daemon at {path}: No such file or directory\n"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["conntrack", "--zone", "x"], "argument --zone: expected an integer 0..65535, got 'x'"),
        (["flush", "--zone", "70000"], "argument --zone"),
        (["offload", "maybe"], "argument state: invalid choice: 'maybe'"),
        (["stats", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: COMMAND"),
        (["run"], "required: --config"),
    ],
)
def test_usage_errors_exit_2_on_one_line(capsys, argv, needle):
    """Bad arguments: exit 2 with a single stderr line naming the argument."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and err.startswith("ctxdp: ")


def test_check_command(capsys, tmp_path):
    """`check` accepts the example and rejects a bad file naming the field, exit 2."""
    rc, out, _ = run(capsys, "check", "--config", EXAMPLE)
    assert rc == 0 and "ok (2 ports, 2 NAT rules, 4 policy rules)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[ports]]\nname = "lan0"\nzone = "x"\n')
    rc, out, err = run(capsys, "check", "--config", str(bad))
    assert rc == 2 and out == ""
    assert err == f'ctxdp: {bad}: ports[0].zone: expected an integer 0..65535, got "x"\n'


def test_run_loads_config_then_calls_daemon(capsys, monkeypatch):
    """`run` hands the parsed Config and its path to ctxdp.daemon.run_daemon."""
    seen = {}

    def run_daemon(cfg, path):
        seen["cfg"], seen["path"] = cfg, path
        return 3

    monkeypatch.setitem(sys.modules, "ctxdp.daemon", types.SimpleNamespace(run_daemon=run_daemon))
    rc, _, _ = run(capsys, "run", "--config", EXAMPLE)
    assert rc == 3 and seen["path"] == EXAMPLE and seen["cfg"].port_names == ("lan0", "wan0")


def test_run_with_bad_config_never_starts_daemon(capsys, monkeypatch, tmp_path):
    """A config error stops `run` with exit 2 before the daemon is imported."""
    monkeypatch.setitem(sys.modules, "ctxdp.daemon", None)  # importing it would fail
    bad = tmp_path / "b.toml"
    bad.write_text('[[ports]]\nname = "lan0"\n[offload]\nxdp_mode = "fast"\n')
    rc, _, err = run(capsys, "run", "--config", str(bad))
    assert rc == 2 and "offload.xdp_mode: expected one of native, generic, auto" in err


def test_demo_gets_its_own_arguments(capsys, monkeypatch):
    """Everything after `demo` (even --help) is passed to ctxdp.demo.main."""
    got = []
    monkeypatch.setitem(
        sys.modules, "ctxdp.demo", types.SimpleNamespace(main=lambda a: got.append(a) or 0)
    )
    assert run(capsys, "demo", "--help", "--v6")[0] == 0
    assert run(capsys, "--socket", "demo", "demo")[0] == 0
    assert got == [["--help", "--v6"], []]


# -- ctxdp.log (the logging `run` sets up) ----------------------------------------------------


def test_json_logging_one_object_per_line():
    """JSON logs carry ts/level/logger/msg plus ctx fields, one line per record."""
    buf = io.StringIO()
    setup_logging("debug", "json", stream=buf)
    try:
        lg = logging.getLogger("ctxdp.test")
        lg.info("offloaded\nconn", extra={"ctx": {"zone": 3, "msg": "shadow", "obj": {1}}})
        try:
            raise ValueError("bad")
        except ValueError:
            lg.exception("failed")
        lines = buf.getvalue().splitlines()
        assert len(lines) == 2
        rec = json.loads(lines[0])
        assert rec["level"] == "info" and rec["logger"] == "ctxdp.test"
        assert rec["msg"] == "offloaded\nconn" and rec["zone"] == 3 and rec["obj"] == "{1}"
        assert rec["ts"].endswith("Z")
        assert "ValueError: bad" in json.loads(lines[1])["exc"]
    finally:
        setup_logging("info", "text", stream=io.StringIO())


def test_text_logging_and_reconfigure():
    """Text logs are single lines with key=value; reconfiguring replaces the handler and level."""
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", stream=first)
    lg = logging.getLogger("ctxdp.test")
    lg.debug("hidden")
    lg.warning("two\nlines", extra={"ctx": {"port": "wan0", "why": "a b"}})
    setup_logging("error", "text", stream=second)
    lg.warning("dropped")
    text = first.getvalue()
    assert "hidden" not in text and text.count("\n") == 1
    assert 'WARNING ctxdp.test: two\\nlines port=wan0 why="a b"' in text
    assert second.getvalue() == ""
    assert sum(1 for h in logging.getLogger("ctxdp").handlers if hasattr(h, "_ctxdp_handler")) == 1
    with pytest.raises(ValueError):
        setup_logging("loud", "text")
