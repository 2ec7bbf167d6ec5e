"""Lab hosts and the ``Lab``: what scenarios talk to, wherever the hosts are.

Contract:
- ``Host`` is the protocol a scenario may use on a machine: ``name``,
  ``exec(argv, check, timeout, input) -> stdout`` (``HostError`` on failure
  when ``check``), ``popen(argv, **kw) -> Popen`` for a streaming process
  (the lab agent), ``spawn(argv, log) -> Job`` for a background process
  that outlives any one call (the daemon; ``Job.stop()`` ends it),
  ``write_file`` / ``read_file``, and two argv prefixes: ``agent`` (runs
  ``ctxdp/lab/traffic.py``) and ``ctxdp`` (runs the ctxdp CLI).
- ``NetnsHost`` is a network namespace on this machine; commands enter it
  with ``nsenter --net`` rather than ``ip netns exec`` because the latter
  remounts /sys, which hides the bpffs at /sys/fs/bpf the daemon pins maps
  on. Every process it starts gets PR_SET_PDEATHSIG, so nothing outlives the
  Python process that built the lab, even when that process is killed.
- ``SshHost`` / ``VagrantHost`` run the same argv over ssh (``sudo -n``),
  for the three-VM lab of issue 8. They are written against the same
  contract but are NOT exercised by this repository's tests (no VMs here).
- ``Lab`` groups the hosts by role (``client``, ``router``, ``server``,
  optional ``client2``), the ``Link`` facts of each router port, and the
  daemon on the router: ``config()`` builds a config document,
  ``start_daemon`` / ``stop_daemon`` / ``reload`` / ``signal_daemon``,
  ``ctl`` / ``ctl_many`` / ``snapshot`` query it through the agent's ``ctl``
  command executed on the router (one process per poll, any number of
  requests). ``AgentProc.latest(name)`` is the newest event of a streaming
  agent (e.g. a receiver's ``progress``). Scenarios use only
  this class, so the same scenario code runs on namespaces and on VMs.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "AgentError",
    "AgentProc",
    "Host",
    "HostError",
    "Job",
    "Lab",
    "LabError",
    "Link",
    "NetnsHost",
    "Snapshot",
    "SshHost",
    "VagrantHost",
    "lab_from_spec",
    "to_toml",
]

AGENT_PATH = Path(__file__).with_name("traffic.py")
_PR_SET_PDEATHSIG = 1


class HostError(RuntimeError):
    """A command on a host failed (``check=True``)."""

    def __init__(self, host: str, argv: Sequence[str], rc: int, stderr: str) -> None:
        self.host, self.argv, self.rc, self.stderr = host, list(argv), rc, stderr
        super().__init__(f"{host}: {shlex.join(argv)} failed ({rc}): {stderr.strip()[-500:]}")


class LabError(RuntimeError):
    """The lab (daemon, control socket) is not in the state a call needs."""


class AgentError(RuntimeError):
    """The lab agent reported an error or ended without a result."""


# --------------------------------------------------------------------------
# Hosts
# --------------------------------------------------------------------------


class Job(Protocol):
    """A background process on a host (see ``Host.spawn``)."""

    pid: int

    def alive(self) -> bool: ...

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status if known."""
        ...


class Host(Protocol):
    """One lab machine; see the module contract."""

    name: str
    agent: tuple[str, ...]
    ctxdp: tuple[str, ...]

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> str: ...

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen: ...

    def spawn(self, argv: Sequence[str], log: str) -> Job: ...

    def write_file(self, path: str, text: str) -> None: ...

    def read_file(self, path: str) -> str: ...


def _pdeathsig(sig: int) -> Callable[[], None]:
    """preexec_fn: deliver ``sig`` to the child when its parent dies.

    The kernel keeps the setting across execve (nsenter execs the target
    without forking), so a crashed or SIGKILLed lab builder still takes its
    daemon and traffic processes with it.
    """

    def _set() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return _set


class LocalJob:
    """A ``Job`` backed by a local ``Popen``."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
            return None


class NetnsHost:
    """A network namespace on this machine (``/run/netns/<ns>``)."""

    def __init__(self, ns: str, *, name: str | None = None,
                 track: Callable[[subprocess.Popen], None] | None = None) -> None:
        self.ns = ns
        self.name = name or ns
        self._track = track
        self.agent = (sys.executable, str(AGENT_PATH))
        self.ctxdp = (sys.executable, "-m", "ctxdp.cli")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", *argv]

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> str:
        proc = subprocess.run(self.wrap(argv), capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            raise HostError(self.name, argv, proc.returncode, proc.stderr)
        return proc.stdout

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("preexec_fn", _pdeathsig(signal.SIGKILL))
        proc = subprocess.Popen(self.wrap(argv), **kw)
        if self._track is not None:
            self._track(proc)
        return proc

    def spawn(self, argv: Sequence[str], log: str) -> LocalJob:
        with open(log, "ab") as out:
            # Own session: a terminal's Ctrl-C reaches only the lab builder,
            # which then stops the job in order (SIGTERM lets the daemon
            # detach XDP and unpin its maps).
            proc = subprocess.Popen(
                self.wrap(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig(signal.SIGTERM),
            )
        if self._track is not None:
            self._track(proc)
        return LocalJob(proc)

    # Same mount namespace as the builder: plain file access.
    def write_file(self, path: str, text: str) -> None:
        Path(path).write_text(text)

    def read_file(self, path: str) -> str:
        return Path(path).read_text(errors="replace")

    def __repr__(self) -> str:
        return f"NetnsHost({self.name})"


class RemoteJob:
    """A ``Job`` on a remote host, known by its pid there."""

    def __init__(self, host: SshHost, pid: int) -> None:
        self.host = host
        self.pid = pid

    def alive(self) -> bool:
        try:
            self.host.exec(["kill", "-0", str(self.pid)], timeout=15)
        except HostError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> int | None:
        self.host.exec(["kill", "-TERM", str(self.pid)], check=False, timeout=15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return None
            time.sleep(0.5)
        self.host.exec(["kill", "-KILL", str(self.pid)], check=False, timeout=15)
        return None


class SshHost:
    """A machine reached with ``ssh`` (UNTESTED here: no VMs on this machine).

    ``ssh_argv`` is everything before the remote command, e.g.
    ``["ssh", "-F", "ssh_config", "router"]``. Commands run as root through
    ``sudo -n`` unless ``sudo=False``. ``repo`` is the ctxdp checkout on the
    host (the agent runs from it with the host's ``python3``); ``ctxdp`` the
    argv of the installed CLI.
    """

    def __init__(self, name: str, ssh_argv: Sequence[str], *, repo: str = "/vagrant",
                 ctxdp: Sequence[str] = ("ctxdp",), sudo: bool = True) -> None:
        self.name = name
        self.ssh_argv = list(ssh_argv)
        self.sudo = sudo
        self.agent = ("python3", f"{repo}/ctxdp/lab/traffic.py")
        self.ctxdp = tuple(ctxdp)

    def _remote(self, argv: Sequence[str]) -> list[str]:
        cmd = shlex.join(argv)
        return [*self.ssh_argv, f"sudo -n {cmd}" if self.sudo else cmd]

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> str:
        proc = subprocess.run(self._remote(argv), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise HostError(self.name, argv, proc.returncode, proc.stderr)
        return proc.stdout

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self._remote(argv), **kw)

    def spawn(self, argv: Sequence[str], log: str) -> RemoteJob:
        # setsid + nohup: the job must survive the ssh session that started
        # it; $! is its pid because setsid does not fork in a background job.
        inner = f"nohup setsid {shlex.join(argv)} >>{shlex.quote(log)} 2>&1 </dev/null & echo $!"
        out = self.exec(["sh", "-c", inner])
        return RemoteJob(self, int(out.split()[-1]))

    def write_file(self, path: str, text: str) -> None:
        self.exec(["sh", "-c", f"cat > {shlex.quote(path)}"], input=text)

    def read_file(self, path: str) -> str:
        return self.exec(["cat", path])

    def __repr__(self) -> str:
        return f"SshHost({self.name})"


class VagrantHost(SshHost):
    """A Vagrant VM, reached with the ssh config ``vagrant ssh-config`` prints.

    UNTESTED here (no VMs on this machine). One ``vagrant ssh-config`` call
    per host, then plain ssh: ``vagrant ssh -c`` costs seconds per command.
    """

    def __init__(self, name: str, vagrant_dir: str, **kw: Any) -> None:
        cfg = subprocess.run(["vagrant", "ssh-config", name], cwd=vagrant_dir, check=True,
                             capture_output=True, text=True, timeout=120).stdout
        path = Path(vagrant_dir) / f".ssh-config-{name}"
        path.write_text(cfg)
        super().__init__(name, ["ssh", "-F", str(path), "-o", "LogLevel=ERROR", name], **kw)


# --------------------------------------------------------------------------
# The agent, driven from the lab builder
# --------------------------------------------------------------------------


class AgentProc:
    """A running lab agent (``ctxdp/lab/traffic.py``): its JSON-lines events."""

    def __init__(self, host: Host, argv: Sequence[str]) -> None:
        self.host = host
        self.argv = list(argv)
        self.proc = host.popen([*host.agent, *argv], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self._buf = bytearray()
        self._eof = False

    def _pump(self, timeout: float) -> bool:
        """Read what is available (up to ``timeout``); False at EOF."""
        if self._eof:
            return False
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], max(timeout, 0))
        if not r:
            return True
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if line:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"event": "noise", "text": line.decode(errors="replace")})
        return True

    def _find(self, name: str) -> dict[str, Any] | None:
        for ev in self.events:
            if ev.get("event") == "error":
                raise AgentError(f"{self.host.name}: {self.argv[0]}: {ev.get('error')}")
            if ev.get("event") == name:
                return ev
        return None

    def wait(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first event called ``name``; AgentError on error, EOF or timeout."""
        deadline = time.monotonic() + timeout
        while (ev := self._find(name)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{self.host.name}: {self.argv[0]}: no {name!r} "
                                 f"event within {timeout}s")
            if not self._pump(min(left, 0.5)):
                if (ev := self._find(name)) is not None:
                    return ev
                raise AgentError(f"{self.host.name}: {self.argv[0]} ended without {name!r}: "
                                 f"{self._stderr()}")
        return ev

    def poll_event(self, name: str) -> dict[str, Any] | None:
        """Non-blocking: the event if it has arrived."""
        self._pump(0)
        return self._find(name)

    def latest(self, name: str) -> dict[str, Any] | None:
        """Non-blocking: the most recent event called ``name`` so far (e.g. ``progress``)."""
        while self._pump(0) and self._buf_pending():
            pass
        self._find("")  # raises AgentError if the agent reported an error
        for ev in reversed(self.events):
            if ev.get("event") == name:
                return ev
        return None

    def _buf_pending(self) -> bool:
        r, _, _ = select.select([self.proc.stdout.fileno()], [], [], 0)
        return bool(r)

    def send(self, line: str = "go") -> None:
        """One line to the agent's stdin (the ``--step`` go-ahead)."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        ev = self.wait("result", timeout)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return ev

    def _stderr(self) -> str:
        try:
            self.proc.wait(2)
            return (self.proc.stderr.read() or b"").decode(errors="replace").strip()[-500:]
        except (subprocess.TimeoutExpired, OSError, ValueError):
            return "(no stderr)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> AgentProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --------------------------------------------------------------------------
# TOML (the config the daemon reads)
# --------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(doc: Mapping[str, Any], _prefix: str = "") -> str:
    """Write a config document (scalars, arrays, tables, arrays of tables)."""
    lines: list[str] = []
    for k, v in doc.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            lines.append(f"{json.dumps(str(k))} = {_toml_value(v)}")
    for k, v in doc.items():
        key = f"{_prefix}{json.dumps(str(k))}"
        if isinstance(v, dict):
            lines.append(f"\n[{key}]")
            lines.append(to_toml(v, key + ".").strip("\n"))
        elif _is_table_array(v):
            for item in v:
                lines.append(f"\n[[{key}]]")
                lines.append(to_toml(item, key + ".").strip("\n"))
    return "\n".join(x for x in lines if x != "") + "\n"


# --------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One router port and the host behind it (addresses as text)."""

    role: str  # "client", "server", "client2"
    port: str  # router interface name
    port_mac: str
    port_v4: str
    port_v6: str
    host_if: str
    host_mac: str
    host_v4: str
    host_v6: str
    plen4: int = 24
    plen6: int = 64

    def host_addr(self, family: int = 4) -> str:
        return self.host_v6 if family == 6 else self.host_v4

    def router_addr(self, family: int = 4) -> str:
        return self.port_v6 if family == 6 else self.port_v4


def _ip(text: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return str(text)


def _key(t: Mapping[str, Any]) -> tuple[str, str, int, int]:
    return (_ip(t.get("src")), _ip(t.get("dst")), int(t.get("sport", 0)), int(t.get("dport", 0)))


@dataclass
class Snapshot:
    """One poll of the daemon: conntrack rows, flow rows, stats, local time."""

    t: float
    conns: list[dict[str, Any]]
    flows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)

    def find_conn(self, proto: int, *, src: str | None = None, sport: int | None = None,
                  dst: str | None = None, dport: int | None = None) -> dict[str, Any] | None:
        """The first connection whose ORIGINAL tuple matches every given field."""
        for c in self.conns:
            if int(c.get("proto", -1)) != proto:
                continue
            o = c.get("orig", {})
            if src is not None and _ip(o.get("src")) != _ip(src):
                continue
            if dst is not None and _ip(o.get("dst")) != _ip(dst):
                continue
            if sport is not None and int(o.get("sport", -1)) != sport:
                continue
            if dport is not None and int(o.get("dport", -1)) != dport:
                continue
            return c
        return None

    def flows_of(self, conn: Mapping[str, Any]) -> list[dict[str, Any] | None]:
        """[original-direction flow row, reply-direction flow row] (None if absent)."""
        proto = int(conn.get("proto", -1))
        want = [_key(conn.get("orig", {})), _key(conn.get("reply", {}))]
        out: list[dict[str, Any] | None] = [None, None]
        for f in self.flows:
            m = f.get("match", {})
            if int(m.get("proto", -2)) != proto:
                continue
            k = _key(m)
            for i in (0, 1):
                if k == want[i] and out[i] is None:
                    out[i] = f
        return out

    def fast_pkts(self, conn: Mapping[str, Any]) -> list[int]:
        """Packets XDP forwarded for each direction, as the maps say now."""
        return [int(f.get("packets", 0)) if f else 0 for f in self.flows_of(conn)]

    def fast_bytes(self, conn: Mapping[str, Any]) -> list[int]:
        return [int(f.get("bytes", 0)) if f else 0 for f in self.flows_of(conn)]

    @staticmethod
    def conn_pkts(conn: Mapping[str, Any]) -> int:
        """Both directions of the connection's packet counter (slow + folded fast)."""
        p = conn.get("packets") or [0, 0]
        return int(sum(p))


class Lab:
    """Hosts by role, link facts, and the ctxdp daemon on the router."""

    ROLES = ("client", "router", "server", "client2")

    def __init__(
        self,
        hosts: Mapping[str, Host],
        links: Iterable[Link],
        *,
        workdir: str,
        socket_path: str,
        pin_dir: str = "/sys/fs/bpf/ctxdp",
        xdp_mode: str = "native",
        name: str = "lab",
    ) -> None:
        self.hosts = dict(hosts)
        self.links = {ln.role: ln for ln in links}
        self.workdir = workdir  # on the router: config, log
        self.socket_path = socket_path
        self.pin_dir = pin_dir
        self.xdp_mode = xdp_mode
        self.name = name
        self.config_path = f"{workdir}/ctxdp.toml"
        self.log_path = f"{workdir}/ctxdp.log"
        self.doc: dict[str, Any] | None = None
        self._job: Job | None = None
        self._agents: list[AgentProc] = []

    # -- hosts and addresses ---------------------------------------------
    def host(self, role: str) -> Host:
        try:
            return self.hosts[role]
        except KeyError:
            raise LabError(f"this lab has no {role!r} host") from None

    @property
    def client(self) -> Host:
        return self.host("client")

    @property
    def router(self) -> Host:
        return self.host("router")

    @property
    def server(self) -> Host:
        return self.host("server")

    def addr(self, role: str, family: int = 4) -> str:
        """The address of host ``role`` on its link to the router."""
        return self.links[role].host_addr(family)

    def router_addr(self, role: str, family: int = 4) -> str:
        """The router's own address on the port facing ``role``."""
        return self.links[role].router_addr(family)

    def port(self, role: str) -> str:
        """The router port facing ``role``."""
        return self.links[role].port

    def agent(self, role: str, argv: Sequence[str]) -> AgentProc:
        """Start the lab agent on ``role``; killed by ``close()`` if still running."""
        ap = AgentProc(self.host(role), argv)
        self._agents.append(ap)
        return ap

    # -- config ----------------------------------------------------------
    def config(
        self,
        *,
        policy: Mapping[str, Any] | None = None,
        nat: Sequence[Mapping[str, Any]] = (),
        offload: Mapping[str, Any] | None = None,
        conntrack: Mapping[str, Any] | None = None,
        timeouts: Mapping[str, float] | None = None,
        aging_interval: float = 1.0,
        log_level: str = "info",
        ports: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A daemon config document for this lab (policy allow, XDP on every port).

        Keyword sections are merged over the lab's defaults (``offload`` keys
        over ``providers=["xdp"]``, the lab's ``xdp_mode`` and ``pin_dir``).
        """
        off = {"providers": ["xdp"], "xdp_mode": self.xdp_mode, "pin_dir": self.pin_dir}
        off.update(offload or {})
        ct = dict(conntrack or {})
        if timeouts:
            ct["timeouts"] = {**ct.get("timeouts", {}), **timeouts}
        doc: dict[str, Any] = {
            "aging_interval": aging_interval,
            "control_socket": self.socket_path,
            "log_level": log_level,
            "ports": list(ports) if ports is not None
            else [{"name": ln.port} for ln in self.links.values()],
            "policy": dict(policy or {"default": "allow"}),
            "offload": off,
        }
        if nat:
            doc["nat"] = [dict(n) for n in nat]
        if ct:
            doc["conntrack"] = ct
        return doc

    def _write_config(self, doc: Mapping[str, Any]) -> None:
        text = to_toml(doc)
        self._check_config(text)
        self.router.exec(["mkdir", "-p", self.workdir])
        self.router.write_file(self.config_path, text)
        self.doc = dict(doc)

    @staticmethod
    def _check_config(text: str) -> None:
        """Fail here, naming the field, rather than in a daemon log on the router."""
        from ctxdp.config import ConfigError, parse_config  # light: no bcc, no sockets

        try:
            parse_config(tomllib.loads(text))
        except (ConfigError, tomllib.TOMLDecodeError) as exc:
            raise LabError(f"lab config rejected: {exc}\n{text}") from exc

    @property
    def aging_interval(self) -> float:
        return float((self.doc or {}).get("aging_interval", 1.0))

    def timeout(self, name: str) -> float:
        """The conntrack timeout ``name`` the running config gives (or the default)."""
        from ctxdp.conntrack.config import DEFAULT_TIMEOUTS

        over = ((self.doc or {}).get("conntrack") or {}).get("timeouts") or {}
        return float(over.get(name, DEFAULT_TIMEOUTS[name]))

    # -- daemon ----------------------------------------------------------
    def start_daemon(self, doc: Mapping[str, Any] | None = None, *, timeout: float = 60.0) -> None:
        """Write the config, start ``ctxdp run`` on the router, wait for its socket."""
        if self._job is not None and self._job.alive():
            raise LabError("the daemon is already running")
        self._write_config(doc if doc is not None else self.config())
        self._job = self.router.spawn([*self.router.ctxdp, "run", "--config", self.config_path],
                                      self.log_path)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self._job.alive():
                raise LabError(f"ctxdp exited during start-up:\n{self.daemon_log()}")
            try:
                self.ctl("stats")
                return
            except LabError as exc:
                last = str(exc)
            time.sleep(0.3)
        self.stop_daemon()
        raise LabError(f"ctxdp not answering after {timeout}s ({last}):\n{self.daemon_log()}")

    def stop_daemon(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the daemon (it detaches XDP and unpins), SIGKILL if it hangs."""
        job, self._job = self._job, None
        if job is None:
            return None
        return job.stop(timeout)

    def daemon_alive(self) -> bool:
        return self._job is not None and self._job.alive()

    def signal_daemon(self, sig: str = "HUP") -> None:
        """Send signal ``sig`` (a ``kill -s`` name: HUP, TERM...) to the daemon on the router."""
        if self._job is None or not self._job.alive():
            raise LabError("the daemon is not running")
        self.router.exec(["kill", "-s", sig, str(self._job.pid)])

    def daemon_log(self, tail: int = 40) -> str:
        try:
            lines = self.router.read_file(self.log_path).splitlines()
        except (OSError, HostError):
            return "(no daemon log)"
        return "\n".join(lines[-tail:])

    def reload(self, doc: Mapping[str, Any], *, via: str = "ctl") -> Any:
        """Write a new config and make the daemon re-read it.

        ``via="ctl"``: the ``reload`` control request; returns the daemon's
        answer once the reload is done. ``via="sighup"``: SIGHUP, which the
        daemon handles on its next loop turn; returns None, so the caller
        polls for the effect.
        """
        if via not in ("ctl", "sighup"):
            raise ValueError(f"reload via {via!r}: expected 'ctl' or 'sighup'")
        self._write_config(doc)
        if via == "sighup":
            self.signal_daemon("HUP")
            return None
        return self.ctl("reload")

    # -- control ---------------------------------------------------------
    def ctl_many(self, reqs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        """Several control requests in one round trip; results in order."""
        argv = [*self.router.agent, "ctl", "--socket", self.socket_path]
        argv += [f"{c}={json.dumps(dict(a))}" if a else c for c, a in reqs]
        try:
            out = self.router.exec(argv, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            raise LabError("control request timed out") from None
        ev = None
        for line in out.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
        if not ev or ev.get("event") != "result":
            raise LabError((ev or {}).get("error") or f"no answer from ctl: {out.strip()!r}")
        results = []
        for (cmd, _), resp in zip(reqs, ev["responses"], strict=True):
            if not resp.get("ok"):
                raise LabError(f"{cmd}: {resp.get('error')}")
            results.append(resp.get("result"))
        return results

    def ctl(self, cmd: str, **args: Any) -> Any:
        """One control request (``conntrack``, ``flows``, ``stats``, ``reload``, ...)."""
        return self.ctl_many([(cmd, args)])[0]

    def snapshot(self, stats: bool = True) -> Snapshot:
        reqs: list[tuple[str, Mapping[str, Any]]] = [("conntrack", {}), ("flows", {})]
        if stats:
            reqs.append(("stats", {}))
        res = self.ctl_many(reqs)
        return Snapshot(
            t=time.monotonic(),
            conns=list(res[0].get("conns", [])),
            flows=list(res[1].get("flows", [])),
            stats=dict(res[2]) if stats else {},
        )

    # -- teardown --------------------------------------------------------
    def close(self) -> None:
        """Stop agents and the daemon. Subclasses add their own teardown."""
        for ap in self._agents:
            ap.kill()
        self._agents.clear()
        self.stop_daemon()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# A lab described in JSON (VMs)
# --------------------------------------------------------------------------


def lab_from_spec(spec: Mapping[str, Any]) -> Lab:
    """Build a ``Lab`` of ssh/Vagrant hosts from a JSON-able description.

    ``{"hosts": {ROLE: {"vagrant": NAME} | {"ssh": [argv...]}, ...},
    "vagrant_dir": DIR, "repo": "/vagrant", "ctxdp": ["ctxdp"], "sudo": true,
    "links": [{Link fields}, ...], "workdir": ..., "socket_path": ...,
    "pin_dir": ..., "xdp_mode": "native"}``. Roles need ``client``,
    ``router`` and ``server``; every link names the router port and both
    ends' addresses (see ``Link``). The ssh path is exercised in this
    repository's tests through an ``nsenter ... sh -c`` transport; real ssh
    and Vagrant are not.
    """
    common = {"repo": spec.get("repo", "/vagrant"), "ctxdp": tuple(spec.get("ctxdp", ["ctxdp"])),
              "sudo": bool(spec.get("sudo", True))}
    hosts: dict[str, Host] = {}
    for role, h in spec["hosts"].items():
        if "vagrant" in h:
            hosts[role] = VagrantHost(h["vagrant"], spec.get("vagrant_dir", "."), **common)
        else:
            hosts[role] = SshHost(role, h["ssh"], **common)
    missing = {"client", "router", "server"} - set(hosts)
    if missing:
        raise LabError(f"lab spec lacks hosts: {sorted(missing)}")
    return Lab(
        hosts, [Link(**ln) for ln in spec["links"]],
        workdir=spec.get("workdir", "/tmp/ctxdp-lab"),
        socket_path=spec.get("socket_path", "/run/ctxdp/lab.sock"),
        pin_dir=spec.get("pin_dir", "/sys/fs/bpf/ctxdp"),
        xdp_mode=spec.get("xdp_mode", "native"),
        name=spec.get("name", "spec"),
    )
