"""CI checks of the Vagrant lab (vagrant/): what can be proved without VMs.

Covered here: the Vagrantfile parses (``ruby -c``) and says what lab.json
says (evaluated by Ruby against a recording stand-in for Vagrant's config
object), Vagrant itself accepts it (``vagrant validate``; with the libvirt
plugin when installed, so provider options are checked too), every shell
script under vagrant/ and scripts/ passes shellcheck, lab.json builds a
``Lab`` through ``lab_from_spec`` and its config is one the daemon accepts,
router.toml agrees with lab.json, and the provisioning script really runs on
this machine: ``setup`` (scripts/setup.sh, idempotent), ``net`` and
``check`` inside network namespaces holding veths with the lab's MACs.
Finally ``vagrant/run-scenarios.sh`` -- the one command the README gives --
runs end to end against three namespaces standing in for the VMs, with
``vagrant`` and ``ssh`` replaced by small transports into them.

Not covered (no VMs here): booting the box, virtio-net, the libvirt
networks, native XDP on virtio queues.

Tools that CI must have (ruby, shellcheck, vagrant) are required through
``privileged`` tests: they skip on a developer machine without them and fail
under ``CTXDP_REQUIRE_PRIVILEGED=1``.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctxdp.config import load_config, parse_config
from ctxdp.lab.hosts import Lab, VagrantHost, lab_from_spec, to_toml
from ctxdp.lab.scenarios import QUICK_TIMEOUTS
from tests.privileged import require_bcc, require_root

ROOT = Path(__file__).resolve().parents[2]
VAGRANT = ROOT / "vagrant"
SPEC_PATH = VAGRANT / "lab.json"
PROVISION = VAGRANT / "provision.sh"
ROLES = ("client", "router", "server")


def _spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


def _links() -> dict[str, dict[str, Any]]:
    return {ln["role"]: ln for ln in _spec()["links"]}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (scripts/setup.sh installs it with the test extras)")
    return path


def _run(argv: list[str], *, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------
# The Vagrantfile
# --------------------------------------------------------------------------

# A stand-in for Vagrant: every call on the config object (and on the
# objects blocks receive) is recorded as a tree and printed as JSON.
_RECORDER = r"""
require "json"

class Rec < BasicObject
  def initialize(log)
    @log = log
  end

  def method_missing(name, *args, **kw, &blk)
    ev = { "call" => name.to_s, "args" => args, "kw" => kw, "children" => [] }
    @log << ev
    if blk
      logs = ::Array.new([blk.arity.abs, 1].max) { [] }
      ev["blocks"] = logs
      blk.call(*logs.map { |l| ::Rec.new(l) })
    end
    ::Rec.new(ev["children"])
  end

  def respond_to_missing?(*) = true
end

module Vagrant
  def self.configure(version)
    log = []
    yield Rec.new(log)
    puts JSON.generate({ "version" => version, "calls" => log })
  end
end

load ARGV.fetch(0)
"""


def _flatten(calls: list[dict[str, Any]]) -> list[tuple[str, list, dict, list]]:
    """(dotted call path, args, kw, blocks) for every recorded call, depth first."""
    out: list[tuple[str, list, dict, list]] = []

    def walk(cs: list[dict[str, Any]], prefix: str) -> None:
        for c in cs:
            path = f"{prefix}{c['call']}"
            out.append((path, c["args"], c["kw"], c.get("blocks", [])))
            walk(c["children"], path + ".")

    walk(calls, "")
    return out


def _settings(block: list[dict[str, Any]]) -> dict[str, Any]:
    """``x.key = value`` assignments recorded in one provider block."""
    return {p[:-1]: a[0] for p, a, _, _ in _flatten(block) if p.endswith("=") and "." not in p}


def _vagrantfile_model(tmp_path: Path) -> dict[str, Any]:
    """What the Vagrantfile configures, per machine, as evaluated by Ruby."""
    rec = tmp_path / "recorder.rb"
    rec.write_text(_RECORDER)
    proc = _run([_tool("ruby"), str(rec), str(VAGRANT / "Vagrantfile")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["version"] == "2"

    def section(calls: list[dict[str, Any]]) -> dict[str, Any]:
        m: dict[str, Any] = {"networks": [], "provision": {}, "providers": {}, "synced": [],
                             "set": {}, "defines": {}}
        for path, args, kw, blocks in _flatten(calls):
            if path == "vm.network":
                m["networks"].append({"type": args[0], **kw})
            elif path == "vm.provision":
                m["provision"][args[0]] = kw
            elif path == "vm.provider":
                m["providers"].setdefault(args[0], {}).update(_settings(blocks[0]))
            elif path == "vm.synced_folder":
                m["synced"].append((args[0], args[1], kw))
            elif path == "vm.define":
                m["defines"][args[0]] = section(blocks[0])
            elif path.startswith("vm.") and path.endswith("=") and path.count(".") == 1:
                m["set"][path[3:-1]] = args[0]
        return m

    return section(doc["calls"])


@pytest.mark.privileged
def test_vagrantfile_parses() -> None:
    """`ruby -c` accepts vagrant/Vagrantfile."""
    proc = _run([_tool("ruby"), "-c", str(VAGRANT / "Vagrantfile")], timeout=60)
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


@pytest.mark.privileged
def test_vagrantfile_builds_the_lab_json_topology(tmp_path: Path) -> None:
    """Evaluated, the Vagrantfile gives each VM the MACs/addresses of lab.json on per-link networks."""
    model = _vagrantfile_model(tmp_path)
    spec, links = _spec(), _links()
    assert model["set"]["box"] == "debian/bookworm64"
    assert set(model["defines"]) == set(ROLES) == set(spec["hosts"])
    assert {"libvirt", "virtualbox"} <= set(model["providers"])
    # The repo lands where lab.json's hosts look for the agent and the CLI.
    rsync = [s for s in model["synced"] if s[2].get("type") == "rsync"]
    assert [(s[0], s[1]) for s in rsync] == [("..", spec["repo"])]
    assert ".venv/" in rsync[0][2]["rsync__exclude"]
    assert spec["ctxdp"][0].startswith(spec["repo"] + "/")

    want: dict[str, list[tuple[str, str, str]]] = {
        "router": [(ln["port_mac"], ln["port_v4"], r) for r, ln in links.items()],
        "client": [(links["client"]["host_mac"], links["client"]["host_v4"], "client")],
        "server": [(links["server"]["host_mac"], links["server"]["host_v4"], "server")],
    }
    nets_by_link: dict[str, set[tuple[str, str]]] = {}
    for role, m in model["defines"].items():
        nics = m["networks"]
        assert all(n["type"] == "private_network" and n["auto_config"] is False for n in nics)
        got = sorted((n["mac"], n["ip"]) for n in nics)
        assert got == sorted((mac.replace(":", ""), ip) for mac, ip, _ in want[role]), role
        for n, (_, _, link_role) in zip(sorted(nics, key=lambda n: n["mac"]),
                                        sorted(want[role]), strict=True):
            ln = links[link_role]
            assert ipaddress.ip_interface(f"{n['ip']}/{n['netmask']}").network.prefixlen \
                == ln["plen4"]
            # The libvirt host bridge must not take a lab address (it would take .1).
            bridge = n["libvirt__host_ip"]
            net = ipaddress.ip_network(f"{ln['port_v4']}/{ln['plen4']}", strict=False)
            assert ipaddress.ip_address(bridge) in net
            assert bridge not in (ln["port_v4"], ln["host_v4"])
            assert n["libvirt__dhcp_enabled"] is False and n["libvirt__forward_mode"] == "none"
            assert n["virtualbox__nic_type"] == "virtio"
            nets_by_link.setdefault(link_role, set()).add(
                (n["libvirt__network_name"], n["virtualbox__intnet"]))
        # Setup once, network config on every boot, with the machine's own role.
        assert m["provision"]["setup"]["inline"].endswith("/vagrant/provision.sh setup")
        assert m["provision"]["net"]["run"] == "always"
        assert m["provision"]["net"]["inline"] == f"{spec['repo']}/vagrant/provision.sh net {role}"
    # Both ends of a link share one network, and the two links are apart.
    assert all(len(v) == 1 for v in nets_by_link.values()), nets_by_link
    assert len({next(iter(v)) for v in nets_by_link.values()}) == 2

    # Native XDP on virtio-net wants curr + nr_cpu_ids <= max queue pairs.
    router = model["defines"]["router"]
    cpus = {**model["providers"]["libvirt"], **router["providers"].get("libvirt", {})}["cpus"]
    for n in router["networks"]:
        assert n["libvirt__driver_queues"] >= 2 * cpus


@pytest.mark.privileged
def test_vagrant_validate_accepts_the_vagrantfile(tmp_path: Path) -> None:
    """`vagrant validate` passes (libvirt provider options too when vagrant-libvirt is installed)."""
    vagrant = _tool("vagrant")
    work = tmp_path / "vagrant"
    work.mkdir()
    for name in ("Vagrantfile", "lab.json"):
        shutil.copy(VAGRANT / name, work / name)
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    plugins = _run([vagrant, "plugin", "list"], env=env, cwd=work).stdout
    if "vagrant-libvirt" in plugins:
        argv, env["VAGRANT_DEFAULT_PROVIDER"] = [vagrant, "validate"], "libvirt"
    else:
        argv = [vagrant, "validate", "--ignore-provider"]
    proc = _run(argv, env=env, cwd=work)
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, \
        proc.stdout + proc.stderr


@pytest.mark.privileged
def test_shell_scripts_pass_shellcheck() -> None:
    """Every *.sh under vagrant/ and scripts/ is shellcheck-clean."""
    scripts = sorted([*VAGRANT.glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])
    assert PROVISION in scripts and VAGRANT / "run-scenarios.sh" in scripts
    proc = _run([_tool("shellcheck"), *map(str, scripts)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# lab.json and router.toml
# --------------------------------------------------------------------------

_FAKE_VAGRANT = """#!/bin/sh
# Stand-in for `vagrant` (status, ssh-config): NAME's "HostName" is a netns.
set -e
case "$1" in
  status)
    for m in client router server; do
      echo "1,$m,provider-name,{provider}"
      echo "1,$m,state,running"
    done ;;
  ssh-config)
    case "$2" in {cases} *) echo "The machine with the name '$2' was not found" >&2; exit 1;; esac
    printf 'Host %s\\n  HostName %s\\n  User vagrant\\n' "$2" "$ns" ;;
  *) echo "fake vagrant: unsupported: $*" >&2; exit 1 ;;
esac
"""

# Stand-in for `ssh -F CFG [-o X]... HOST CMD...`: like ssh, it joins CMD
# with spaces for the remote shell, which runs in HOST's netns.
_FAKE_SSH = """#!/bin/sh
cfg=""
while [ $# -gt 0 ]; do
  case "$1" in
    -F) cfg="$2"; shift 2 ;;
    -o) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"; shift
ns="$(awk -v h="$host" '$1 == "Host" {{ cur = $2 }} cur == h && $1 == "HostName" {{ print $2; exit }}' "$cfg")"
[ -n "$ns" ] || {{ echo "fake ssh: no HostName for $host in $cfg" >&2; exit 255; }}
exec nsenter --net=/run/netns/"$ns" env PATH="{bin}:$PATH" sh -c "$*"
"""

_FAKE_SUDO = """#!/bin/sh
# Stand-in for `sudo -n` (the test already runs as root).
[ "$1" = -n ] && shift
exec "$@"
"""


def _fake_bin(tmp_path: Path, netns: dict[str, str], provider: str = "libvirt") -> Path:
    """A bin/ directory with fake vagrant, ssh and sudo aimed at ``netns`` (role -> netns)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    cases = " ".join(f'{role}) ns={ns};;' for role, ns in netns.items())
    files = {
        "vagrant": _FAKE_VAGRANT.replace("{provider}", provider).replace("{cases}", cases),
        "ssh": _FAKE_SSH.format(bin=bin_dir),
        "sudo": _FAKE_SUDO,
    }
    for name, text in files.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_lab_json_builds_a_vagrant_lab_whose_config_the_daemon_accepts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lab_from_spec(lab.json) gives VagrantHosts over ssh and a daemon config parse_config takes."""
    bin_dir = _fake_bin(tmp_path, {r: f"ns-{r}" for r in ROLES})
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = _spec()
    spec["vagrant_dir"] = str(tmp_path)  # where VagrantHost writes the ssh configs
    lab = lab_from_spec(spec)
    assert set(lab.hosts) == set(ROLES)
    for role, host in lab.hosts.items():
        assert isinstance(host, VagrantHost)
        cfg = tmp_path / f".ssh-config-{role}"
        assert host.ssh_argv == ["ssh", "-F", str(cfg), "-o", "LogLevel=ERROR", role]
        assert f"HostName ns-{role}" in cfg.read_text()
        assert host.ctxdp == tuple(spec["ctxdp"])
        # The agent path inside the VM is this repository's agent under "repo".
        assert host.agent[1] == f"{spec['repo']}/ctxdp/lab/traffic.py"
        assert (ROOT / Path(host.agent[1]).relative_to(spec["repo"])).is_file()
    # The CLI path is scripts/setup.sh's venv (ROOT/.venv) console script.
    assert Path(spec["ctxdp"][0]).relative_to(spec["repo"]) == Path(".venv/bin/ctxdp")
    assert "ctxdp = " in (ROOT / "pyproject.toml").read_text()
    assert lab.xdp_mode == "native" and lab.port("client") != lab.port("server")
    for fam in (4, 6):
        for role in ("client", "server"):
            a = ipaddress.ip_address(lab.addr(role, fam))
            r = ipaddress.ip_address(lab.router_addr(role, fam))
            assert a.version == r.version == fam and a != r
    doc = lab.config(timeouts=QUICK_TIMEOUTS)
    Lab._check_config(to_toml(doc))  # raises LabError naming the field if rejected
    cfg = parse_config(tomllib.loads(to_toml(doc)))
    assert cfg.port_names == tuple(ln["port"] for ln in spec["links"])
    assert cfg.offload.xdp_mode == "native"


def test_lab_json_subnets_are_distinct_and_each_link_is_one_subnet() -> None:
    """Each link's ends share one v4 and one v6 prefix; the links' prefixes differ; MACs unique."""
    links = _spec()["links"]
    nets = set()
    macs = []
    for ln in links:
        for fam in (4, 6):
            p = ln[f"plen{fam}"]
            a = ipaddress.ip_interface(f"{ln[f'port_v{fam}']}/{p}").network
            b = ipaddress.ip_interface(f"{ln[f'host_v{fam}']}/{p}").network
            assert a == b and a.version == fam
            nets.add(a)
        macs += [ln["port_mac"], ln["host_mac"]]
    assert len(nets) == 2 * len(links)
    assert len(set(macs)) == len(macs)
    assert all(int(m.split(":")[0], 16) & 1 == 0 for m in macs), "MACs must be unicast"


def test_router_toml_runs_native_xdp_on_the_lab_ports() -> None:
    """vagrant/router.toml loads, names lab.json's router ports, asks for native XDP."""
    cfg = load_config(str(VAGRANT / "router.toml"))
    assert cfg.port_names == tuple(ln["port"] for ln in _spec()["links"])
    assert cfg.offload.xdp_mode == "native" and "xdp" in cfg.offload.providers
    # The scenario runner's daemon must never share its socket or pins.
    assert cfg.control_socket != _spec()["socket_path"]
    assert cfg.offload.pin_dir != _spec()["pin_dir"]


# --------------------------------------------------------------------------
# provision.sh, for real
# --------------------------------------------------------------------------


def _ns_run(ns: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return _run(["nsenter", f"--net=/run/netns/{ns}", *argv], timeout=timeout)


def _kill_netns(ns: str) -> None:
    """Kill whatever runs in ``ns``, then delete it."""
    pids = _run(["ip", "netns", "pids", ns], timeout=10).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", ns], timeout=10)


@pytest.fixture
def netns_factory() -> Iterator[Any]:
    """make(tag) -> a fresh uniquely named netns with lo up; all deleted at teardown."""
    made: list[str] = []

    def make(tag: str) -> str:
        ns = f"ctxvg{tag}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        made.append(ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            _kill_netns(ns)


def _veth(ns_a: str, name_a: str, mac_a: str | None, ns_b: str, name_b: str,
          mac_b: str | None = None) -> None:
    """A veth pair between two namespaces (created inside ns_a, never in the root netns)."""
    tmp = f"vt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", tmp,
                    "netns", ns_b], check=True, timeout=10)
    subprocess.run(["ip", "-n", ns_b, "link", "set", tmp, "name", name_b], check=True, timeout=10)
    for ns, name, mac in ((ns_a, name_a, mac_a), (ns_b, name_b, mac_b)):
        if mac:
            subprocess.run(["ip", "-n", ns, "link", "set", name, "address", mac], check=True,
                           timeout=10)
        subprocess.run(["ip", "-n", ns, "link", "set", name, "up"], check=True, timeout=10)


def _addrs(ns: str, dev: str) -> set[str]:
    out = _ns_run(ns, ["ip", "-j", "addr", "show", "dev", dev])
    assert out.returncode == 0, out.stderr
    return {f"{a['local']}/{a['prefixlen']}" for link in json.loads(out.stdout)
            for a in link["addr_info"] if a.get("scope") == "global"}


@pytest.mark.privileged
def test_provision_setup_runs_scripts_setup_on_this_debian_machine() -> None:
    """`provision.sh setup` runs scripts/setup.sh here (idempotent) and ends with a ready venv."""
    require_root()
    proc = _run([str(PROVISION), "setup"], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setup: ready:" in proc.stdout


@pytest.mark.privileged
def test_provision_net_configures_the_router_ports_by_mac(netns_factory) -> None:
    """In a netns, net renames the router NICs by MAC, addresses them, GRO off; check passes after."""
    require_root()
    links = _links()
    router, peer = netns_factory("r"), netns_factory("p")
    for i, ln in enumerate(links.values()):
        _veth(router, f"eth{i + 7}", ln["port_mac"], peer, f"peer{i}")
    before = _ns_run(router, [str(PROVISION), "check", "router"])
    assert before.returncode == 1 and "FAIL" in before.stdout, before.stdout
    proc = _ns_run(router, [str(PROVISION), "net", "--no-persist", "router"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for ln in links.values():
        port = ln["port"]
        assert _addrs(router, port) == {f"{ln['port_v4']}/{ln['plen4']}",
                                        f"{ln['port_v6']}/{ln['plen6']}"}
        mac = json.loads(_ns_run(router, ["ip", "-j", "link", "show", "dev", port]).stdout)[0]
        assert mac["address"] == ln["port_mac"] and "UP" in mac["flags"]
        assert "generic-receive-offload: off" in _ns_run(router, ["ethtool", "-k", port]).stdout
    # The check is a separate, read-only pass that now agrees.
    after = _ns_run(router, [str(PROVISION), "check", "router"])
    assert after.returncode == 0 and "FAIL" not in after.stdout, after.stdout
    # A second run (every `vagrant up`) renames nothing and keeps the addresses.
    again = _ns_run(router, [str(PROVISION), "net", "--no-persist", "router"])
    assert again.returncode == 0 and "renamed" not in again.stdout, again.stdout


@pytest.mark.privileged
def test_provision_net_gives_a_host_its_address_and_routes_via_the_router(
        netns_factory) -> None:
    """In a netns, net for the client: lab0 by MAC, GRO on, TX csum off, routes to the server side."""
    require_root()
    links = _links()
    me, other = links["client"], links["server"]
    host, peer = netns_factory("c"), netns_factory("p")
    _veth(host, "eth9", me["host_mac"], peer, "peer0")
    proc = _ns_run(host, [str(PROVISION), "net", "--no-persist", "client"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dev = me["host_if"]
    assert _addrs(host, dev) == {f"{me['host_v4']}/{me['plen4']}",
                                 f"{me['host_v6']}/{me['plen6']}"}
    feats = _ns_run(host, ["ethtool", "-k", dev]).stdout
    assert "generic-receive-offload: on" in feats and "tx-checksumming: off" in feats
    for fam, flag in ((4, "-4"), (6, "-6")):
        net = ipaddress.ip_interface(f"{other[f'host_v{fam}']}/{other[f'plen{fam}']}").network
        routes = json.loads(_ns_run(host, ["ip", "-j", flag, "route", "show", str(net)]).stdout)
        assert [(r.get("gateway"), r.get("dev")) for r in routes] == [(me[f"port_v{fam}"], dev)]
    # The wrong role on this machine is a clear failure, not a half-configured host.
    wrong = _ns_run(host, [str(PROVISION), "check", "server"])
    assert wrong.returncode == 1 and "FAIL" in wrong.stdout


@pytest.mark.privileged
def test_provision_rejects_bad_usage_and_unknown_roles() -> None:
    """No command -> 2 with usage; an unknown role -> 1 naming the lab's hosts."""
    require_root()
    usage = _run([str(PROVISION)], timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    bad = _run([str(PROVISION), "check", "gateway"], timeout=30)
    assert bad.returncode == 1 and "'gateway' is not a host" in bad.stderr


# --------------------------------------------------------------------------
# The README's one command, against namespaces standing in for the VMs
# --------------------------------------------------------------------------


@pytest.mark.privileged
def test_run_scenarios_passes_against_netns_stand_ins_for_the_vms(
        tmp_path: Path, netns_factory) -> None:
    """provision.sh net in 3 netns + vagrant/run-scenarios.sh: scenarios pass, flows shown, XDP native."""
    require_bcc()
    spec = copy.deepcopy(_spec())
    links = {ln["role"]: ln for ln in spec["links"]}
    ns = {role: netns_factory(role[0]) for role in ROLES}
    # Wires with the lab's MACs, under names provision.sh must rename.
    _veth(ns["client"], "ens5", links["client"]["host_mac"],
          ns["router"], "ens5", links["client"]["port_mac"])
    _veth(ns["router"], "ens6", links["server"]["port_mac"],
          ns["server"], "ens5", links["server"]["host_mac"])
    tag = uuid.uuid4().hex[:8]
    spec.update({
        "vagrant_dir": str(tmp_path),
        "repo": str(ROOT),
        "ctxdp": [str(ROOT / ".venv" / "bin" / "ctxdp")],
        "workdir": str(tmp_path / "work"),
        "socket_path": str(tmp_path / "ctl.sock"),
        "pin_dir": f"/sys/fs/bpf/ctxvg-{tag}",
    })
    spec_file = tmp_path / "lab.json"
    spec_file.write_text(json.dumps(spec))
    try:
        for role in ROLES:
            p = _ns_run(ns[role], [str(PROVISION), "net", "--no-persist", "--spec",
                                   str(spec_file), role])
            assert p.returncode == 0, f"{role}: {p.stdout}{p.stderr}"
        bin_dir = _fake_bin(tmp_path, ns)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "CTXDP_LAB_SPEC": str(spec_file), "CTXDP_FLOWS_POLL": "0.5"}
        env.pop("CTXDP_XDP_MODE", None)
        # Exactly the README's command: no arguments.
        proc = _run([str(VAGRANT / "run-scenarios.sh")], env=env, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert sorted((r["scenario"], r["family"]) for r in runs) == [
            ("tcp_transfer", 4), ("tcp_transfer", 6),
            ("udp_offload_and_age", 4), ("udp_offload_and_age", 6)]
        assert all(r["ok"] for r in runs), out
        tcp4 = next(r["result"] for r in runs if r["scenario"] == "tcp_transfer"
                    and r["family"] == 4)
        assert tcp4["fast_pkts"][0] >= 0.95 * tcp4["min_segments"]
        assert "4/4 scenario runs passed" in proc.stderr
        # The watcher showed the router's fast path while it held entries.
        assert "[router] $ ctxdp flows" in proc.stdout, out
        assert f"[router] {links['client']['port']}: XDP mode: xdp" in proc.stdout, out
        assert "provider=xdp" in proc.stdout
    finally:
        for role in ROLES:
            _kill_netns(ns[role])
        shutil.rmtree(spec["pin_dir"], ignore_errors=True)
