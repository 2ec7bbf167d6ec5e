"""Network-namespace labs on this machine: the topology builder and ``NetnsLab``.

Contract:
- ``Topology`` is a context manager that owns network namespaces named
  ``ctx<role>-<uuid8>`` (unique, so concurrent runs never collide). Leaving
  the ``with`` block, normally or through an exception, kills every child
  process it started and deletes every namespace; veth pairs live only
  inside those namespaces (both ends are created directly in them, never in
  the root namespace), so they go with them.
- ``RouterTopology`` builds the standard shape: ``client`` -- ``router`` --
  ``server`` (and optionally ``client2`` on a third router port), each link
  a veth pair with IPv4 and IPv6 addresses (no DAD, so IPv6 is usable at
  once) and default routes pointing at the router. Router port i is ``p<i>``
  with 10.0.(i+1).1/24 and fd00:(i+1)::1/64; the host behind it has ``eth0``
  with .2 / ::2. MACs are fixed and locally administered.
- Code runs inside a namespace in a forked child: ``ns.run(func, *args)``
  forks, ``setns()``s the child into the namespace, calls ``func`` and
  returns its (pickled) result, re-raising its exception with the child's
  traceback. ``ns.spawn(func, *args)`` does the same in the background and
  passes a ``ChildCtl`` first so the child can say ``ready()`` and poll
  ``stop_requested()``. ``setns`` does not remount /sys, so code under test
  must use netlink/ioctls, not sysfs.
- ``NetnsLab`` is a ``ctxdp.lab.hosts.Lab`` over a ``RouterTopology``: hosts
  are ``NetnsHost``s, the offload settings of the working recipe are applied
  (below), and the daemon gets its own control socket and pin directory
  (``/sys/fs/bpf/ctxdp-lab-<uid>``). ``close()`` (also on any exception
  out of the ``with`` block) stops agents and the daemon (SIGTERM first, so
  it detaches XDP and unpins), kills leftover processes, deletes the
  namespaces, then removes the pin directory and the work directory if the
  daemon could not. ``leftovers()`` lists whatever of it still exists.
- The recipe, and why: on the hosts' ``eth0`` GRO on and TX checksum offload
  off. XDP_REDIRECT into a veth silently drops frames unless the receiving
  peer has XDP or GRO on; and with TX checksum offload a veth hands frames
  up as CHECKSUM_PARTIAL (checksum not yet computed), which a real wire never
  carries and which the router would forward with a broken checksum. On the
  router ports GRO off: merged super-frames cannot be re-sent by the slow
  path.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import shutil
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctxdp.lab.hosts import Lab, Link, NetnsHost

__all__ = [
    "Child",
    "ChildCtl",
    "ChildError",
    "Netns",
    "NetnsLab",
    "RouterPort",
    "RouterTopology",
    "Topology",
    "lab_leftovers",
    "leftover_namespaces",
    "pump",
    "remove_pin_dir",
    "run",
]

BPFFS = "/sys/fs/bpf"
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def run(*argv: str, check: bool = True, timeout: float = 30) -> str:
    """Run a command, return stdout; raise with stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def leftover_namespaces(names: list[str]) -> list[str]:
    """Which of ``names`` still exist in ``ip netns list``."""
    listed = {line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()}
    return [n for n in names if n in listed]


def pump(source: Any, cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Feed ``source`` (anything with ``fileno()`` and ``handle_events()``,
    e.g. a ``ctxdp.datapath.netlink.Netlink``) until ``cond()`` holds or
    ``timeout`` passes; return ``cond()``. Runs in the child, like the daemon's
    selector loop would.
    """
    deadline = time.monotonic() + timeout
    while not cond():
        left = deadline - time.monotonic()
        if left <= 0:
            return cond()
        select.select([source.fileno()], [], [], min(left, 0.1))
        source.handle_events()
    return True


def _setns(name: str) -> None:
    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class ChildError(Exception):
    """Raised in the parent when the child's function raised."""


class ChildCtl:
    """The child's end of the control pipes."""

    def __init__(self, ready_w: int, stop_r: int) -> None:
        self._ready_w = ready_w
        self._stop_r = stop_r

    def ready(self) -> None:
        """Tell the parent the child is set up (sockets open, ...)."""
        os.write(self._ready_w, b"r")

    def stop_requested(self, timeout: float = 0.0) -> bool:
        """True once the parent called ``Child.stop()`` (waits up to timeout)."""
        r, _, _ = select.select([self._stop_r], [], [], timeout)
        return bool(r)

    def stop_fd(self) -> int:
        """Readable once stop is requested (for the child's own selector)."""
        return self._stop_r


class Child:
    """A forked process running one function inside a namespace."""

    def __init__(self, ns: str, func: Callable[..., Any], args: tuple, with_ctl: bool) -> None:
        res_r, res_w = os.pipe()
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into the caller
            code = 0
            try:
                os.close(res_r)
                os.close(ready_r)
                os.close(stop_w)
                _setns(ns)
                ctl_args = (ChildCtl(ready_w, stop_r),) if with_ctl else ()
                payload = pickle.dumps(("ok", func(*ctl_args, *args)))
            except BaseException as exc:  # noqa: BLE001 - everything goes to the parent
                tb = traceback.format_exc()
                try:
                    payload = pickle.dumps(("err", exc, tb))
                except Exception:  # noqa: BLE001 - unpicklable exception
                    payload = pickle.dumps(("err", RuntimeError(repr(exc)), tb))
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(res_w, view) :]
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        os.close(res_w)
        os.close(ready_w)
        os.close(stop_r)
        self.pid = pid
        self.ns = ns
        self._res_r = res_r
        self._ready_r = ready_r
        self._stop_w = stop_w
        self._done = False
        self._outcome: tuple | None = None

    def wait_ready(self, timeout: float = 10.0) -> None:
        r, _, _ = select.select([self._ready_r, self._res_r], [], [], timeout)
        if self._ready_r in r and os.read(self._ready_r, 1):
            return
        if self._res_r in r:
            self.result(timeout=timeout)  # raises the child's error if it died
            raise ChildError("child finished without calling ready()")
        raise TimeoutError(f"child in {self.ns} not ready after {timeout}s")

    def stop(self) -> None:
        try:
            os.write(self._stop_w, b"s")
        except OSError:
            pass

    def result(self, timeout: float = 30.0) -> Any:
        if self._outcome is None:
            self._outcome = self._collect(timeout)
        if self._outcome[0] == "ok":
            return self._outcome[1]
        _, exc, tb = self._outcome
        raise ChildError(f"in netns {self.ns}:\n{tb}") from exc

    def _collect(self, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"child in {self.ns} still running after {timeout}s")
            r, _, _ = select.select([self._res_r], [], [], left)
            if not r:
                continue
            data = os.read(self._res_r, 1 << 16)
            if not data:
                break
            chunks.append(data)
        self._reap()
        if not chunks:
            return ("err", ChildError("child died without a result"), "(no traceback)")
        return pickle.loads(b"".join(chunks))

    def _reap(self) -> None:
        if not self._done:
            os.waitpid(self.pid, 0)
            self._done = True
            for fd in (self._res_r, self._ready_r, self._stop_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def kill(self) -> None:
        if self._done:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap()

    @property
    def alive(self) -> bool:
        return not self._done


class Netns:
    """One namespace of a topology."""

    def __init__(self, topo: Topology, role: str, name: str) -> None:
        self.topo = topo
        self.role = role
        self.name = name

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n NAME args``."""
        return run("ip", "-n", self.name, *args, check=check)

    def exec(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """Run a command inside the namespace; stdout."""
        return run("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout)

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen:
        """Start a long-running command inside; killed at topology teardown."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.topo._procs.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-qw", f"{key}={value}")

    def run(self, func: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Call ``func(*args)`` in a forked child inside this namespace."""
        child = Child(self.name, func, args, with_ctl=False)
        self.topo._children.append(child)
        return child.result(timeout)

    def spawn(self, func: Callable[..., Any], *args: Any) -> Child:
        """Start ``func(ctl, *args)`` in a child inside this namespace."""
        child = Child(self.name, func, args, with_ctl=True)
        self.topo._children.append(child)
        return child

    def ifindex(self, ifname: str) -> int:
        return int(self.exec("cat", f"/sys/class/net/{ifname}/ifindex").strip())

    def mac(self, ifname: str) -> bytes:
        text = self.exec("cat", f"/sys/class/net/{ifname}/address").strip()
        return bytes.fromhex(text.replace(":", ""))

    def __repr__(self) -> str:
        return f"Netns({self.role}={self.name})"


class Topology:
    """Namespaces and veth pairs, all removed on exit."""

    def __init__(self) -> None:
        self.uid = uuid.uuid4().hex[:8]
        self.namespaces: dict[str, Netns] = {}
        self._children: list[Child] = []
        self._procs: list[subprocess.Popen] = []

    @property
    def names(self) -> list[str]:
        return [ns.name for ns in self.namespaces.values()]

    def add_ns(self, role: str) -> Netns:
        name = f"ctx{role}-{self.uid}"
        run("ip", "netns", "add", name)
        ns = Netns(self, role, name)
        self.namespaces[role] = ns
        # IPv6 addresses usable immediately: no duplicate address detection.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.ip("link", "set", "lo", "up")
        return ns

    def add_veth(self, a: Netns, a_if: str, b: Netns, b_if: str,
                 a_mac: str | None = None, b_mac: str | None = None) -> None:
        # Created inside ``a`` with the peer placed straight into ``b``: the
        # names never exist in the root namespace, so they cannot collide.
        argv = ["link", "add", a_if]
        if a_mac:
            argv += ["address", a_mac]
        argv += ["type", "veth", "peer", "name", b_if, "netns", b.name]
        if b_mac:
            argv += ["address", b_mac]
        a.ip(*argv)
        a.ip("link", "set", a_if, "up")
        b.ip("link", "set", b_if, "up")

    def close(self) -> None:
        for child in self._children:
            child.kill()
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces.values():
            run("ip", "netns", "del", ns.name, check=False)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RouterPort:
    """One router port and the host on the other end of its veth."""

    index: int
    name: str  # in the router namespace
    mac: bytes
    v4: str  # router's address
    v6: str
    peer: Netns
    peer_if: str
    peer_mac: bytes
    peer_v4: str
    peer_v6: str
    plen4: int = 24
    plen6: int = 64


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class RouterTopology(Topology):
    """client -- router -- server (+ client2), IPv4 and IPv6.

    Port i of the router has 10.0.(i+1).1/24 and fd00:(i+1)::1/64; its peer
    has .2 / ::2 and a default route via the router. p0 faces ``client``,
    p1 ``server``, p2 ``client2``.
    """

    def __init__(self, *, second_client: bool = False) -> None:
        super().__init__()
        self.second_client = second_client
        self.ports: list[RouterPort] = []

    def __enter__(self) -> RouterTopology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.router = self.add_ns("router")
        self.client = self.add_ns("client")
        self.server = self.add_ns("server")
        self.client2 = self.add_ns("client2") if self.second_client else None
        peers = [self.client, self.server] + ([self.client2] if self.client2 else [])
        for i, peer in enumerate(peers):
            n = i + 1
            port = RouterPort(
                index=i,
                name=f"p{i}",
                mac=_mac(f"02:00:00:00:01:{n:02x}"),
                v4=f"10.0.{n}.1",
                v6=f"fd00:{n}::1",
                peer=peer,
                peer_if="eth0",
                peer_mac=_mac(f"02:00:00:00:02:{n:02x}"),
                peer_v4=f"10.0.{n}.2",
                peer_v6=f"fd00:{n}::2",
            )
            self.add_veth(self.router, port.name, peer, port.peer_if,
                          port.mac.hex(":"), port.peer_mac.hex(":"))
            self.router.ip("addr", "add", f"{port.v4}/24", "dev", port.name)
            self.router.ip("-6", "addr", "add", f"{port.v6}/64", "dev", port.name, "nodad")
            peer.ip("addr", "add", f"{port.peer_v4}/24", "dev", port.peer_if)
            peer.ip("-6", "addr", "add", f"{port.peer_v6}/64", "dev", port.peer_if, "nodad")
            peer.ip("route", "add", "default", "via", port.v4)
            peer.ip("-6", "route", "add", "default", "via", port.v6)
            self.ports.append(port)

    def port(self, role: str) -> RouterPort:
        """The router port facing ``role`` (client, server, client2)."""
        for p in self.ports:
            if p.peer.role == role:
                return p
        raise KeyError(role)


# --------------------------------------------------------------------------
# NetnsLab
# --------------------------------------------------------------------------


def _text_mac(b: bytes) -> str:
    return b.hex(":")


def lab_leftovers(uid: str) -> list[str]:
    """What a ``NetnsLab`` with this uid left behind (namespaces, pins, files)."""
    out = [f"netns {n}" for n in leftover_namespaces(
        [f"ctx{r}-{uid}" for r in ("router", "client", "server", "client2")])]
    for path in (f"{BPFFS}/ctxdp-lab-{uid}", f"/tmp/ctxdp-lab-{uid}"):
        if os.path.lexists(path):
            out.append(path)
    return out


def remove_pin_dir(path: str) -> None:
    """Unlink every pin in ``path`` and the directory itself, if present.

    A daemon that is killed (or fails to shut down) leaves its pinned maps;
    unpinning is what releases them in the kernel.
    """
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class NetnsLab(Lab):
    """A ``Lab`` on namespaces of this machine; see the module contract."""

    def __init__(self, *, second_client: bool = False, xdp_mode: str = "native") -> None:
        self.topo = RouterTopology(second_client=second_client)
        uid = self.topo.uid
        self.uid = uid
        self._workdir = f"/tmp/ctxdp-lab-{uid}"
        super().__init__(
            {}, (), workdir=self._workdir, socket_path=f"{self._workdir}/ctl.sock",
            pin_dir=f"{BPFFS}/ctxdp-lab-{uid}", xdp_mode=xdp_mode, name=f"netns-{uid}",
        )
        self._built = False

    def __enter__(self) -> NetnsLab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def build(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("a netns lab needs root (namespaces, XDP, bpffs)")
        os.makedirs(self._workdir, mode=0o700)
        self.topo.__enter__()
        self._built = True
        track = self.topo._procs.append
        self.hosts = {ns.role: NetnsHost(ns.name, name=ns.role, track=track)
                      for ns in self.topo.namespaces.values()}
        links = []
        for p in self.topo.ports:
            self.hosts[p.peer.role].exec(["ethtool", "-K", p.peer_if, "gro", "on", "tx", "off"])
            self.router.exec(["ethtool", "-K", p.name, "gro", "off"])
            links.append(Link(
                role=p.peer.role, port=p.name, port_mac=_text_mac(p.mac), port_v4=p.v4,
                port_v6=p.v6, host_if=p.peer_if, host_mac=_text_mac(p.peer_mac),
                host_v4=p.peer_v4, host_v6=p.peer_v6, plen4=p.plen4, plen6=p.plen6,
            ))
        self.links = {ln.role: ln for ln in links}

    def close(self) -> None:
        try:
            super().close()  # agents, then the daemon: SIGTERM so it unpins
        finally:
            self.topo.close()
            remove_pin_dir(self.pin_dir)  # the daemon was killed: its pins stay
            shutil.rmtree(self._workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Anything of this lab still present (empty after ``close()``)."""
        out = lab_leftovers(self.uid)
        if self.daemon_alive():
            out.append("daemon process")
        out += [f"process {p.pid}" for p in self.topo._procs if p.poll() is None]
        return out
