"""ctxdp.config: TOML parsing, defaults, and one-line field-naming errors."""

from __future__ import annotations

import copy
import ipaddress
import pathlib

import pytest

from ctxdp.config import (
    DEFAULT_CONTROL_SOCKET,
    AddrRange,
    Cidr,
    ConfigError,
    PortRange,
    load_config,
    parse_config,
)
from ctxdp.conntrack import CtConfig
from ctxdp.conntrack.config import DEFAULT_MAX_CONNS

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "ctxdp.toml"

BASE = {"ports": [{"name": "lan0"}, {"name": "wan0", "zone": 1}]}


def doc(**extra):
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(extra))
    return d


def a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def err(d) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(d)
    msg = str(ei.value)
    assert "\n" not in msg
    return ei.value


def test_minimal_config_gets_defaults():
    """Only ports given: every other section takes its documented default."""
    cfg = parse_config(BASE)
    assert [p.name for p in cfg.ports] == ["lan0", "wan0"]
    assert cfg.ports[0].zone == 0 and cfg.ports[1].zone == 1 and cfg.ports[0].offload
    assert cfg.snat == () and cfg.dnat == ()
    assert cfg.policy.default == "allow" and cfg.policy.rules == ()
    assert cfg.offload.enabled and cfg.offload.providers == ("xdp",)
    assert cfg.offload.xdp_mode == "auto" and cfg.offload.max_offloaded is None
    assert cfg.aging_interval == 1.0
    assert cfg.control_socket == DEFAULT_CONTROL_SOCKET
    assert (cfg.log_level, cfg.log_format) == ("info", "text")
    assert cfg.port("wan0").zone == 1 and cfg.port("nope") is None


def test_conntrack_defaults_match_tracker():
    """The config's conntrack defaults agree with the tracker's own defaults."""
    from ctxdp.conntrack.config import CtConfig

    cfg = parse_config(BASE).conntrack
    ct = CtConfig()
    assert cfg.max_conns == DEFAULT_MAX_CONNS
    assert cfg.tcp_seq_check == ct.tcp_seq_check
    assert cfg.default_zone_limit == ct.default_zone_limit


def test_offload_protocol_default_matches_eligibility():
    """The default offload protocol set is the eligibility policy's default."""
    from ctxdp.eligibility import EligibilityPolicy

    assert set(parse_config(BASE).offload.protocols) == set(EligibilityPolicy().protocols)


def test_example_config_loads():
    """examples/ctxdp.toml is valid and says what its comments claim."""
    cfg = load_config(str(EXAMPLE))
    assert cfg.port_names == ("lan0", "wan0")
    (masq,) = cfg.snat
    assert masq.type == "masquerade" and masq.out_port == "wan0" and masq.to is None
    assert {c.family for c in masq.src} == {4, 6}
    (fwd,) = cfg.dnat
    assert (fwd.in_port, fwd.proto, fwd.dport, fwd.to, fwd.to_port) == (
        "wan0", 6, PortRange(8080, 8080), a("10.0.1.10"), 80,
    )
    assert cfg.policy.default == "deny"
    assert [r.action for r in cfg.policy.rules] == ["deny", "allow", "allow", "allow"]
    assert cfg.policy.rules[0].dport == (PortRange(25, 25), PortRange(465, 465))
    assert cfg.offload.xdp_mode == "auto" and cfg.offload.providers == ("xdp",)
    assert cfg.aging_interval == 1.0
    assert cfg.conntrack.timeouts["tcp_established"] == 7200.0
    assert cfg.conntrack.zone_limits == {0: 1000000}


def test_full_sections_parse():
    """Every section's keys are converted to typed values (v4 and v6)."""
    cfg = parse_config(doc(
        nat=[
            {"type": "snat", "out_port": "wan0", "to": "192.0.2.1-192.0.2.9", "ports": "1024-2047"},
            {"type": "snat", "out_port": "wan0", "to": "2001:db8::1", "src": "fd00::/8"},
            {"type": "dnat", "in_port": "wan0", "proto": "udp", "dport": "5000-5010",
             "to": "fd00::10", "dst": ["2001:db8::/32"]},
        ],
        policy={"default": "DENY", "rules": [
            {"action": "allow", "src": ["10.0.0.0/8", "fd00::/8"], "proto": 17,
             "dport": [53, "1000-2000"], "out_port": "wan0"},
        ]},
        offload={"enabled": False, "providers": [], "xdp_mode": "native", "map_size": 1024,
                 "keep_on_restart": True, "protocols": ["tcp", 17], "zones": [0, 5],
                 "min_packets": 3, "max_offloaded": 100},
        conntrack={"max_conns": 10, "zone_limits": {"default": 7, "5": 2},
                   "tcp_seq_check": False, "timeouts": {"udp_first": 5, "tcp_closed": 0.5}},
        aging_interval=0.25, control_socket="/tmp/x.sock", log_level="debug", log_format="json",
    ))
    s0, s1 = cfg.snat
    assert s0.to == AddrRange(4, a("192.0.2.1"), a("192.0.2.9")) and s0.ports == PortRange(1024, 2047)
    assert s1.to == AddrRange(6, a("2001:db8::1"), a("2001:db8::1")) and s1.src[0].family == 6
    (d,) = cfg.dnat
    assert (d.proto, d.family, d.to, d.to_port, d.dport) == (17, 6, a("fd00::10"), None, PortRange(5000, 5010))
    assert cfg.policy.default == "deny"
    (r,) = cfg.policy.rules
    assert r.proto == 17 and r.dport == (PortRange(53, 53), PortRange(1000, 2000)) and r.out_port == "wan0"
    o = cfg.offload
    assert (o.enabled, o.providers, o.xdp_mode, o.map_size, o.keep_on_restart) == (
        False, (), "native", 1024, True)
    assert (o.protocols, o.zones, o.min_packets, o.max_offloaded) == ((6, 17), (0, 5), 3, 100)
    ct = cfg.conntrack
    assert (ct.max_conns, dict(ct.zone_limits), ct.default_zone_limit, ct.tcp_seq_check) == (
        10, {5: 2}, 7, False)
    assert ct.timeouts == {"udp_first": 5.0, "tcp_closed": 0.5}
    assert (cfg.aging_interval, cfg.control_socket, cfg.log_level, cfg.log_format) == (
        0.25, "/tmp/x.sock", "debug", "json")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"ports": [{"name": "lan0"}, {"name": "wan0", "zone": "x"}]},
         'ports[1].zone: expected an integer 0..65535, got "x"'),
        ({"ports": [{"name": "lan0", "zone": 70000}]}, "ports[0].zone: expected an integer 0..65535, got 70000"),
        ({"ports": [{"name": "lan0", "zone": True}]}, "ports[0].zone: expected an integer 0..65535, got true"),
        ({"ports": [{"name": "lan0", "zon": 1}]}, "ports[0].zon: unknown key"),
        ({"ports": [{"zone": 1}]}, "ports[0].name: missing required key"),
        ({"ports": [{"name": "a" * 16}]}, "ports[0].name: expected an interface name"),
        ({"ports": [{"name": "lan0"}, {"name": "lan0"}]}, 'ports[1].name: duplicate port "lan0"'),
        ({"ports": []}, "ports: expected at least one"),
        ({"ports": {"name": "x"}}, "ports: expected an array of tables, got a table"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"nat": [{"out_port": "wan0"}]}, "nat[0].type: missing required key"),
        ({"nat": [{"type": "fullcone", "out_port": "wan0"}]}, "nat[0].type: expected one of snat, masquerade, dnat"),
        ({"nat": [{"type": "snat", "out_port": "wan0"}]}, "nat[0].to: missing required key"),
        ({"nat": [{"type": "snat", "out_port": "wan9", "to": "1.2.3.4"}]},
         'nat[0].out_port: unknown port "wan9" (configured: lan0, wan0)'),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3.4-1.2.3.1"}]}, "nat[0].to: range start is above its end"),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3.4-::1"}]}, "nat[0].to: range mixes IPv4 and IPv6"),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3"}]}, "nat[0].to: expected an address or range"),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3.4", "ports": "9-2"}]}, "nat[0].ports: range start is above its end"),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3.4", "ports": "0-10"}]}, "nat[0].ports: expected a port 1..65535"),
        ({"nat": [{"type": "snat", "out_port": "wan0", "to": "1.2.3.4", "src": "fd00::/8"}]},
         "nat[0].src: fd00::/8 is IPv6 but 'to' is IPv4"),
        ({"nat": [{"type": "masquerade", "out_port": "wan0", "to": "1.2.3.4"}]}, "nat[0].to: not allowed with masquerade"),
        ({"nat": [{"type": "masquerade", "out_port": "wan0", "in_port": "lan0"}]}, "nat[0].in_port: unknown key"),
        ({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "icmp", "dport": 1, "to": "10.0.0.1"}]},
         'nat[0].proto: expected tcp or udp, got "icmp"'),
        ({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "tcp", "to": "10.0.0.1"}]}, "nat[0].dport: missing required key"),
        ({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "tcp", "dport": 80, "to": "10.0.0.1", "to_port": 0}]},
         "nat[0].to_port: expected an integer 1..65535, got 0"),
        ({"nat": [{"type": "dnat", "in_port": "wan0", "proto": "tcp", "dport": 80, "to": "10.0.0.1", "dst": ["1.0.0.0/8", "::/0"]}]},
         "nat[0].dst[1]: ::/0 is IPv6 but 'to' is IPv4"),
        ({"policy": {"default": "reject"}}, 'policy.default: expected one of allow, deny, got "reject"'),
        ({"policy": {"rules": [{"action": "allow", "dprot": 22}]}}, "policy.rules[0].dprot: unknown key"),
        ({"policy": {"rules": [{"in_port": "lan0"}]}}, "policy.rules[0].action: missing required key"),
        ({"policy": {"rules": [{"action": "allow"}, {"action": "allow", "src": "10.0.0.0/33"}]}},
         'policy.rules[1].src: expected an address or CIDR prefix, got "10.0.0.0/33"'),
        ({"policy": {"rules": [{"action": "allow", "src": ["10.0.0.0/8", 5]}]}}, "policy.rules[0].src[1]: expected a string, got 5"),
        ({"policy": {"rules": [{"action": "allow", "src": "10.0.0.0/8", "dst": "fd00::/8"}]}},
         "policy.rules[0].dst: no prefix shares a family"),
        ({"policy": {"rules": [{"action": "allow", "proto": "icmp", "dport": 1}]}}, "policy.rules[0].dport: protocol icmp has no ports"),
        ({"policy": {"rules": [{"action": "allow", "proto": "gre"}]}}, "policy.rules[0].proto: expected a protocol"),
        ({"policy": {"rules": [{"action": "allow", "dport": [80, "x"]}]}}, 'policy.rules[0].dport[1]: expected a port 1..65535 or a range "lo-hi", got "x"'),
        ({"policy": {"rules": [{"action": "allow", "out_port": "eth9"}]}}, 'policy.rules[0].out_port: unknown port "eth9"'),
        ({"offload": {"providers": ["xdp", "tc"]}}, 'offload.providers[1]: expected one of xdp, dummy, got "tc"'),
        ({"offload": {"providers": []}}, "offload.providers: empty while offload.enabled is true"),
        ({"offload": {"providers": ["xdp", "xdp"]}}, "offload.providers: lists a provider twice"),
        ({"offload": {"xdp_mode": "skb"}}, "offload.xdp_mode: expected one of native, generic, auto"),
        ({"offload": {"map_size": 0}}, "offload.map_size: expected an integer"),
        ({"offload": {"pin_dir": "/tmp/x"}}, "offload.pin_dir: expected a directory under /sys/fs/bpf/"),
        ({"offload": {"zones": [1, -1]}}, "offload.zones[1]: expected an integer 0..65535, got -1"),
        ({"offload": {"enable": True}}, "offload.enable: unknown key"),
        ({"conntrack": {"timeouts": {"tcp_establshed": 10}}}, "conntrack.timeouts.tcp_establshed: unknown timeout name"),
        ({"conntrack": {"timeouts": {"udp_first": 0}}}, "conntrack.timeouts.udp_first: expected a number"),
        ({"conntrack": {"zone_limits": {"x": 1}}}, 'conntrack.zone_limits."x": expected a zone number'),
        ({"conntrack": {"zone_limits": {"1": "many"}}}, 'conntrack.zone_limits."1": expected an integer'),
        ({"conntrack": {"max_conns": 1.5}}, "conntrack.max_conns: expected an integer"),
        ({"aging_interval": 0}, "aging_interval: expected a number"),
        ({"aging_interval": "1s"}, 'aging_interval: expected a number 0.01..3600 (seconds), got "1s"'),
        ({"control_socket": "relative.sock"}, "control_socket: expected an absolute file path"),
        ({"log_level": "loud"}, 'log_level: expected one of debug, info, warning, error, critical, got "loud"'),
        ({"log_format": "xml"}, "log_format: expected one of text, json"),
    ],
)
def test_errors_name_the_field(extra, expected):
    """Each invalid value gives one line that starts with its field path."""
    e = err(doc(**extra))
    assert str(e).startswith(expected), str(e)
    assert str(e).startswith(e.field + ": ")


def test_error_message_stays_one_line_with_hostile_keys():
    """A key with control characters cannot break the one-line error."""
    e = err(doc(conntrack={"timeouts": {"bad\nname": 1}}))
    assert "\n" not in str(e) and e.field.startswith("conntrack.timeouts.bad")


def test_load_config_reports_syntax_and_missing_file(tmp_path):
    """TOML syntax errors and unreadable files are ConfigError, one line."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[[ports]]\nname = \n")
    with pytest.raises(ConfigError, match="TOML syntax error") as ei:
        load_config(str(bad))
    assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))


def test_load_config_roundtrip(tmp_path):
    """A TOML file on disk goes through the same validation as a dict."""
    f = tmp_path / "c.toml"
    f.write_text('[[ports]]\nname = "eth1"\nzone = 3\n[offload]\nproviders = ["dummy"]\n')
    cfg = load_config(str(f))
    assert cfg.ports[0].zone == 3 and cfg.offload.providers == ("dummy",)


@pytest.mark.parametrize(
    ("prefix", "inside", "outside"),
    [
        ("10.1.0.0/16", "10.1.255.3", "10.2.0.1"),
        ("0.0.0.0/0", "203.0.113.9", "::1"),
        ("192.0.2.7/32", "192.0.2.7", "192.0.2.8"),
        ("fd00:1::/64", "fd00:1::abcd", "fd00:2::1"),
        ("::/0", "2001:db8::1", "10.0.0.1"),
        ("2001:db8::1/128", "2001:db8::1", "2001:db8::2"),
    ],
)
def test_cidr_contains(prefix, inside, outside):
    """Prefix matching works at /0, mid-length and full length for both families."""
    c = parse_config(doc(policy={"rules": [{"action": "allow", "src": prefix}]})).policy.rules[0].src[0]
    assert isinstance(c, Cidr)
    ip_in, ip_out = ipaddress.ip_address(inside), ipaddress.ip_address(outside)
    assert c.contains(ip_in.version, ip_in.packed)
    assert not c.contains(ip_out.version, ip_out.packed)


def test_cidr_host_bits_are_cleared():
    """A prefix written with host bits set is normalised to its network."""
    c = parse_config(doc(policy={"rules": [{"action": "allow", "dst": "10.1.2.3/8"}]})).policy.rules[0].dst[0]
    assert str(c) == "10.0.0.0/8"


def test_port_range_forms():
    """Ports accept an integer, a numeric string and a "lo-hi" range."""
    rules = parse_config(doc(policy={"rules": [{"action": "allow", "dport": [22, "80", " 8000-8100 "]}]})).policy.rules
    assert rules[0].dport == (PortRange(22, 22), PortRange(80, 80), PortRange(8000, 8100))
    assert 8050 in rules[0].dport[2] and 8101 not in rules[0].dport[2]


def test_sections_map_onto_tracker_and_eligibility_types():
    """Config fields feed CtConfig and EligibilityPolicy one to one and pass their checks."""
    from ctxdp.eligibility import EligibilityPolicy

    cfg = load_config(str(EXAMPLE))
    ct = cfg.conntrack
    CtConfig(
        max_conns=ct.max_conns, zone_limits=dict(ct.zone_limits),
        default_zone_limit=ct.default_zone_limit, timeouts=dict(ct.timeouts),
        tcp_seq_check=ct.tcp_seq_check,
    ).validate()
    o = cfg.offload
    pol = EligibilityPolicy(
        protocols=frozenset(o.protocols), zones=None if o.zones is None else frozenset(o.zones),
        min_pkts=o.min_packets, max_offloaded=o.max_offloaded or o.map_size,
    )
    assert pol.protocols == frozenset({1, 6, 17, 58})
