"""Open vSwitch userspace datapath as a forwarding-rate system of bench/e2e.py.

Contract:
- ``ovs_available() -> str | None``: None when ovsdb-server, ovs-vswitchd,
  ovs-vsctl, ovs-ofctl and the vswitch schema are installed (Debian's
  ``openvswitch-switch``), else the reason it cannot be measured.
- ``ovs_netdev(rig)`` is a context manager: inside the router namespace it
  starts a private ovsdb-server and ovs-vswitchd (own run directory under
  /tmp, own sockets, so a system OVS is never touched), creates a bridge
  with ``datapath_type=netdev`` (the userspace datapath) over p0 and p1
  (type ``system``: AF_PACKET sockets on the veths; Debian's build has no
  AF_XDP ports), and installs an OpenFlow pipeline equivalent to the other
  systems': IPv4 from p0 goes through ``ct(commit, nat(src=<p1 address>))``
  (masquerade keeping the source port when free), IPv6 through
  ``ct(commit)``; replies through ``ct(nat)``; then MACs are rewritten, the
  TTL is decremented and the packet goes out of the other port. Everything
  else is dropped by OVS (the router's kernel still answers ARP/ND on its
  own copies). It yields a probe counting packets of the p0 -> p1 rule
  (proof the traffic went through ct()). On exit the bridge is deleted, both
  daemons are terminated and the run directory is removed, on every path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import e2e_progs as EP

__all__ = ["ovs_available", "ovs_netdev"]

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
_BINS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl")


def ovs_available() -> str | None:
    missing = [b for b in _BINS if shutil.which(b) is None]
    if missing:
        return f"not installed ({', '.join(missing)} missing; apt-get install openvswitch-switch)"
    if not os.path.exists(SCHEMA):
        return f"{SCHEMA} missing"
    return None


def _flows(ps: Any, pc: Any) -> str:
    """The OpenFlow pipeline (ofctl add-flows text)."""
    out_v4 = f"mod_dl_src:{ps.mac.hex(':')},mod_dl_dst:{ps.peer_mac.hex(':')},dec_ttl,output:p1"
    back = f"mod_dl_src:{pc.mac.hex(':')},mod_dl_dst:{pc.peer_mac.hex(':')},dec_ttl,output:p0"
    return "\n".join([
        f"table=0,priority=100,ip,in_port=p0,actions=ct(commit,zone=1,nat(src={ps.v4}),table=1)",
        "table=0,priority=100,ip,in_port=p1,actions=ct(zone=1,nat,table=1)",
        "table=0,priority=100,ipv6,in_port=p0,actions=ct(commit,zone=1,table=1)",
        "table=0,priority=100,ipv6,in_port=p1,actions=ct(zone=1,table=1)",
        "table=0,priority=0,actions=drop",
        f"table=1,priority=100,ip,in_port=p0,ct_state=+trk-inv,actions={out_v4}",
        f"table=1,priority=100,ipv6,in_port=p0,ct_state=+trk-inv,actions={out_v4}",
        f"table=1,priority=100,ip,in_port=p1,ct_state=+trk+est-inv,actions={back}",
        f"table=1,priority=100,ipv6,in_port=p1,ct_state=+trk+est-inv,actions={back}",
        "table=1,priority=0,actions=drop",
    ]) + "\n"


@contextlib.contextmanager
def ovs_netdev(rig: Any) -> Iterator[Callable[[], dict[str, int]]]:
    why = ovs_available()
    if why:
        raise RuntimeError(f"Open vSwitch {why}")
    router = rig.lab.router
    d = f"/tmp/ctxdp-e2e-ovs-{rig.lab.uid}"
    env = {**os.environ, "OVS_RUNDIR": d, "OVS_LOGDIR": d, "OVS_DBDIR": d}
    db = f"unix:{d}/db.sock"
    procs: list[subprocess.Popen] = []

    def vsctl(*args: str) -> str:
        return router.exec(["env", f"OVS_RUNDIR={d}", "ovs-vsctl", f"--db={db}", "--timeout=20",
                            *args])

    def ofctl(*args: str, input: str | None = None) -> str:
        return router.exec(["env", f"OVS_RUNDIR={d}", "ovs-ofctl", "-O", "OpenFlow13", *args],
                           input=input)

    try:
        os.makedirs(d, mode=0o700)
        subprocess.run(["ovsdb-tool", "create", f"{d}/conf.db", SCHEMA], check=True,
                       capture_output=True)
        procs.append(router.popen(
            ["ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock",
             f"--unixctl={d}/ovsdb.ctl", f"--log-file={d}/ovsdb.log"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_path(f"{d}/db.sock", procs[-1])
        vsctl("--no-wait", "init")
        procs.append(router.popen(
            ["ovs-vswitchd", db, f"--unixctl={d}/vswitchd.ctl", f"--log-file={d}/vswitchd.log"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_path(f"{d}/vswitchd.ctl", procs[-1])
        vsctl("add-br", "e2ebr", "--", "set", "bridge", "e2ebr", "datapath_type=netdev",
              "protocols=OpenFlow13", "fail_mode=secure")
        vsctl("add-port", "e2ebr", "p0", "--", "add-port", "e2ebr", "p1")
        ofctl("del-flows", "e2ebr")
        ofctl("add-flows", "e2ebr", "-", input=_flows(rig.ps, rig.pc))
        EP.attach(rig.router_ns, "p0", rig.progs.pass_fd)

        def probe() -> dict[str, int]:
            text = ofctl("dump-flows", "e2ebr", "table=1")
            n = 0
            for line in text.splitlines():
                if "in_port=p0" in line or "in_port=1" in line:
                    m = re.search(r"n_packets=(\d+)", line)
                    n += int(m.group(1)) if m else 0
            return {"ovs_ct_forwarded": n}

        yield probe
    finally:
        EP.detach(rig.router_ns, "p0")
        if procs:
            with contextlib.suppress(Exception):
                vsctl("--if-exists", "del-br", "e2ebr")
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def _wait_path(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[3] if len(proc.args) > 3 else proc.args} exited "
                               f"({proc.returncode}) before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not created within {timeout}s")
        time.sleep(0.1)
