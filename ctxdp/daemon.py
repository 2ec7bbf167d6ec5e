"""The ctxdp daemon: wires the slow path, the offload layer and the kernel.

Contract:
- ``Daemon(cfg, config_path)`` builds everything in the network namespace of
  the calling process: forwarding off (refuses to start otherwise), the
  tracker, the offload manager with its providers, AF_PACKET ports, netlink
  caches (links, addresses, routes, neighbours) and the control socket.
  ``start()`` acquires the kernel resources and hands them to
  ``assemble(ports, router, neigh, links, providers, xdp=, port_addr=)``,
  which wires the pure half (tracker, offload manager, policy, forwarder,
  event callbacks); tests call ``assemble`` with fakes instead of
  ``start()``. ``run()`` loops until ``stop()``
  or SIGTERM/SIGINT, and ``close()`` releases everything (XDP detached and
  pins removed unless ``offload.keep_on_restart``).
- Kernel guard (``ctxdp.datapath.guard``): installed at start, before any
  port opens, so the router's own stack never answers (RST, port
  unreachable) packets to its addresses that NAT connections own. Required
  when NAT is configured; kept across a ``keep_on_restart`` shutdown.
- Restart with kept maps (``offload.keep_on_restart``): shutdown refreshes
  expiry from the fast path, then writes every tracked connection
  (``ctxdp.conntrack.state``) to ``state_path(cfg)``, next to the control
  socket (bpffs holds no regular files; that directory is root-only). The
  next start adopts the pinned maps (entries are orphans), imports the
  state file (consumed: deleted once read; ignored if written on another
  boot or for another pin directory), drops connections the current policy
  would not admit, re-offers the ones that were offloaded with forwarding
  recomputed from today's FIB and neighbours (same keys, so the XDP
  provider claims the adopted entries: same slot, last-used kept, no
  interruption) and reaps the orphans nobody claimed. Expired rows get one
  grace period of two aging intervals so the first read-back can refresh
  them. ``keep_on_restart`` is re-read on reload, so ``reload`` with it off
  followed by SIGTERM ends a kept run cleanly.
- One thread, one ``selectors`` loop: port sockets, the netlink event socket
  and the control socket are registered; each receive burst is processed
  inside one offload batch. Every ``aging_interval`` the aging tick runs:
  FIN/RST teardown flags from XDP (only after a FIN/RST punt), the conntrack
  sweep of the connections due, whose offloaded ones are re-armed from the
  fast path's last-used time instead of expiring while it still carries
  them (lazy, ``ctxdp.conntrack.table``), and pending offloads retried. So a
  tick costs the connections due, not the connections offloaded or busy.
- Fast-path counters are folded into conntrack's on demand: for the
  ``conntrack`` listing (which also refreshes the listed expiries from
  last-used), for ``save_state``, and by the XDP provider just before it
  deletes or rewrites an entry.
- SIGHUP or ``ctxdp reload`` re-reads the config: a new firewall/NAT policy
  and eligibility policy. Every connection the new policy would not admit
  identically (NFP flower's merged-flow validity) is withdrawn from the fast
  path and deleted from conntrack at once, so its traffic stops within one
  aging interval at worst. Port, provider and conntrack limit changes need a
  restart.
- ``handle(cmd, args)`` answers the control socket (schemas in ``ctxdp.cli``).
- Time is ``time.monotonic()`` (CLOCK_MONOTONIC), the clock the XDP program
  stamps last-used times with.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import signal
import time
from typing import Any

from ctxdp.config import Config, ConfigError, load_config
from ctxdp.conntrack import ConnTracker, CtConfig
from ctxdp.conntrack.state import (
    HANDOFF_KEY,
    StateError,
    export_conns,
    import_conns,
    read_state_file,
    write_state_file,
)
from ctxdp.control import ControlError, ControlServer, check_args, int_arg
from ctxdp.datapath import sysctl
from ctxdp.datapath.forward import ADMIT_KEY, Forwarder
from ctxdp.datapath.guard import GuardError, KernelGuard
from ctxdp.eligibility import EligibilityPolicy
from ctxdp.offload import OffloadManager, flow_dir
from ctxdp.policy import Policy
from ctxdp.providers.base import Provider, ProviderError
from ctxdp.providers.dummy import DummyProvider

__all__ = ["Daemon", "run_daemon", "ct_config", "eligibility", "state_path"]

log = logging.getLogger("ctxdp.daemon")

_BURST = 64


def ct_config(cfg: Config) -> CtConfig:
    c = cfg.conntrack
    return CtConfig(
        max_conns=c.max_conns,
        zone_limits=dict(c.zone_limits),
        default_zone_limit=c.default_zone_limit,
        tcp_seq_check=c.tcp_seq_check,
        timeouts=dict(c.timeouts),
    )


def eligibility(cfg: Config, ifindex_of: dict[str, int]) -> EligibilityPolicy:
    o = cfg.offload
    return EligibilityPolicy(
        protocols=frozenset(o.protocols),
        zones=frozenset(o.zones) if o.zones is not None else None,
        # A port only in a reloaded config is not open (ports need a restart):
        # it has no ifindex yet, and no traffic to opt out.
        opt_out_ifindex=frozenset(
            ifindex_of[p.name] for p in cfg.ports if not p.offload and p.name in ifindex_of
        ),
        min_pkts=o.min_packets,
        max_offloaded=o.max_offloaded or o.map_size,
    )


def state_path(cfg: Config) -> str:
    """Where a keep_on_restart shutdown leaves the conntrack state for the next start.

    Next to the control socket (a root-only directory the daemon owns),
    named after the pin directory whose maps it describes.
    """
    pins = os.path.basename(cfg.offload.pin_dir.rstrip("/")) or "ctxdp"
    return os.path.join(os.path.dirname(os.path.abspath(cfg.control_socket)),
                        f"conntrack-{pins}.json")


def _boot_id() -> str:
    """This boot's id: CLOCK_MONOTONIC times in a state file are only valid on it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _addr(b: bytes) -> str:
    return str(ipaddress.ip_address(bytes(b)))


def _tuple_row(t: Any) -> dict[str, Any]:
    return {"family": t.family, "proto": t.proto, "src": _addr(t.src), "dst": _addr(t.dst),
            "sport": t.sport, "dport": t.dport}


class Daemon:
    """The router: see the module contract."""

    def __init__(self, cfg: Config, config_path: str | None = None, *, clock=time.monotonic):
        self.cfg = cfg
        self.config_path = config_path
        self.clock = clock
        self._stop = False
        self._reload = False
        self._closed = False
        self._ready = False  # started (and state restored): close() may save state
        self._sel = selectors.DefaultSelector()
        self.started_at = clock()
        self._pps_mark = (self.started_at, 0)
        self.pps = 0.0
        self._fin_rst_mark: int | None = None  # punt_fin_rst at the last flag scan
        self.xdp = None
        self.nl = self.ports = self.router = self.neigh = self.links = self.local = None
        self.control = None
        self.guard: Any = None
        self._saved_sysctl: dict[str, str] | None = None
        self._addr_fn = self._port_addr
        self._port_addrs: dict[tuple[str, int], bytes | None] = {}
        self._proc: Any = None  # one psutil handle: cpu_percent measures between calls

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> Daemon:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        from ctxdp.datapath.neigh import NeighTable
        from ctxdp.datapath.netlink import (
            RTM_DELADDR,
            RTM_NEWADDR,
            LinkWatcher,
            LocalAddrs,
            Netlink,
        )
        from ctxdp.datapath.ports import PortSet
        from ctxdp.datapath.routing import Router

        cfg = self.cfg
        # No double forwarding: AF_PACKET gets a copy of every passed frame;
        # with kernel forwarding on, the original would be forwarded as well.
        self._saved_sysctl = sysctl.disable_forwarding()
        self._install_guard()
        self.nl = Netlink()
        self.links = LinkWatcher(self.nl)
        self.local = LocalAddrs(self.nl)
        # Masquerade asks for a port's address on every NEW connection; cache
        # it and forget it whenever the kernel's addresses change.
        for msg_type in (RTM_NEWADDR, RTM_DELADDR):
            self.nl.subscribe(msg_type, self._forget_port_addrs)
        self.nl.on_resync(self._forget_port_addrs)
        self.ports = PortSet(list(cfg.port_names), local=self.local)
        self.ports.watch(self.links)
        providers = self._make_providers()
        self.assemble(self.ports, Router(self.nl), NeighTable(self.nl), self.links, providers,
                      xdp=self.xdp)

        for port in self.ports:
            self._sel.register(port.fileno(), selectors.EVENT_READ, ("port", port))
        self._sel.register(self.nl.fileno(), selectors.EVENT_READ, ("netlink", None))
        self.control = ControlServer(cfg.control_socket, self).start()
        self.control.register(self._sel)
        if cfg.offload.keep_on_restart:
            try:
                self.restore_state(self.clock())
            except Exception:  # noqa: BLE001 - a bad handoff must not stop the router
                log.exception("restoring conntrack state; continuing with what was imported")
        else:
            self._discard_state()
        self._ready = True
        log.info("ctxdp started: ports=%s providers=%s offload=%s",
                 ",".join(cfg.port_names), ",".join(p.name for p in self.mgr.providers()),
                 "on" if cfg.offload.enabled else "off")

    def assemble(self, ports: Any, router: Any, neigh: Any, links: Any,
                 providers: list[Provider], *, xdp: Any = None,
                 port_addr: Any = None) -> Daemon:
        """Wire the pure half of the router over kernel parts that are ready.

        ``_start`` calls it with the real port set, router, neighbour table
        and link watcher; unit tests call it with fakes and never ``start()``,
        so the tracker, offload manager, policy, forwarder and event callbacks
        under test are wired exactly as in production. ``xdp`` is the XDP
        provider (teardown flags, fast-path counters, flows, map stats) when
        one is among ``providers``; ``port_addr(ifname, family)`` replaces the
        netlink lookup of masquerade addresses.
        """
        cfg = self.cfg
        self.ports, self.router, self.neigh, self.links = ports, router, neigh, links
        self.xdp = xdp
        if port_addr is not None:
            self._addr_fn = port_addr
        ifindex_of = {p.name: p.ifindex for p in ports}
        self.min_mtu = min(p.mtu for p in ports)

        self.ct = ConnTracker(ct_config(cfg))
        self.mgr = OffloadManager(
            self.ct, (), eligibility(cfg, ifindex_of), enabled=cfg.offload.enabled
        )
        for p in providers:
            self.mgr.add_provider(p)
        self.policy = Policy.from_config(cfg, port_addr=self._addr_fn)
        zones = {ifindex_of[p.name]: p.zone for p in cfg.ports}
        self.fwd = Forwarder(self.ct, self.mgr, self.policy, router, neigh, ports, zones)
        self.fwd.min_mtu = self.min_mtu

        neigh.on_change(self._on_neigh)
        router.on_change(self._on_route)
        links.on_change(self._on_link)
        return self

    def _install_guard(self) -> None:
        """Keep the kernel from answering packets to our addresses that NAT owns.

        See ``ctxdp.datapath.guard``: without it the router's stack RSTs the
        replies of masqueraded connections. It is required when NAT is
        configured; without NAT nothing the slow path owns is addressed to
        the router, so a missing nft only earns a warning.
        """
        try:
            guard = KernelGuard(self.cfg.port_names)
            guard.install()
        except GuardError as exc:
            if self.cfg.snat or self.cfg.dnat:
                raise GuardError(f"NAT needs the kernel guard: {exc}") from exc
            log.warning("kernel guard not installed (%s); without NAT it is not needed", exc)
            return
        self.guard = guard
        log.info("kernel guard installed: nft table inet %s on %s", guard.table,
                 ",".join(guard.ports))

    def _make_providers(self) -> list[Provider]:
        o = self.cfg.offload
        out: list[Provider] = []
        for name in o.providers:
            if name == "dummy":
                out.append(DummyProvider(record=False))
                continue
            from ctxdp.providers.xdp import XdpProvider  # bcc only when asked for

            xdp = XdpProvider(
                list(self.cfg.port_names), mode=o.xdp_mode, max_conns=o.map_size,
                pin_dir=o.pin_dir, keep=o.keep_on_restart,
                on_start="adopt" if o.keep_on_restart else "flush",
            )
            try:
                xdp.start()
            except ProviderError as exc:
                if "dummy" in o.providers:
                    log.warning("xdp provider unavailable (%s); continuing with dummy", exc)
                    continue
                raise
            self.xdp = xdp
            out.append(xdp)
        return out

    def _forget_port_addrs(self, *_: Any) -> None:
        self._port_addrs.clear()

    def _port_addr(self, ifname: str, family: int) -> bytes | None:
        """Primary address of a port (masquerade source), cached until the
        next address event (a netlink dump costs ~0.4 ms per NEW connection)."""
        key = (ifname, family)
        if key in self._port_addrs:
            return self._port_addrs[key]
        addr = self._read_port_addr(ifname, family)
        self._port_addrs[key] = addr
        return addr

    def _read_port_addr(self, ifname: str, family: int) -> bytes | None:
        """Primary address of a port as the kernel lists it."""
        port = self.ports.by_name(ifname) if self.ports else None
        if port is None:
            return None
        try:
            fam = 2 if family == 4 else 10
            for msg in self.nl.ipr.get_addr(family=fam, index=port.ifindex):
                a = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if a and not ipaddress.ip_address(a).is_link_local:
                    return ipaddress.ip_address(a).packed
        except Exception:  # noqa: BLE001 - no address is an answer, not a crash
            log.exception("reading addresses of %s", ifname)
        return None

    def stop(self, *_: Any) -> None:
        self._stop = True

    def request_reload(self, *_: Any) -> None:
        self._reload = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self.clock()
        if self.control is not None:
            try:
                self.control.unregister(self._sel)
            except Exception:  # noqa: BLE001
                pass
            self.control.close()
        mgr = getattr(self, "mgr", None)
        if mgr is not None and self._ready and self.cfg.offload.keep_on_restart:
            try:
                self.save_state(now)
            except Exception:  # noqa: BLE001 - closing must go on; the next start reaps
                log.exception("saving conntrack state for the restart")
        if mgr is not None and not self.cfg.offload.keep_on_restart:
            try:
                mgr.close(now)
            except Exception:  # noqa: BLE001 - closing must go on
                log.exception("closing offload manager")
        for p in (mgr.providers() if mgr is not None else []):
            try:
                p.close()
            except Exception:  # noqa: BLE001
                log.exception("closing provider %s", p.name)
        if self.xdp is not None and self.xdp not in (mgr.providers() if mgr else []):
            self.xdp.close()
        if self.ports is not None:
            self.ports.close()
        if self.nl is not None:
            self.nl.close()
        self._close_guard()
        self._sel.close()
        if self._saved_sysctl is not None:
            # Forwarding stays off: turning it back on silently would start
            # forwarding without policy. Operators re-enable it deliberately.
            pass
        log.info("ctxdp stopped")

    def _close_guard(self) -> None:
        if self.guard is None:
            return
        if self.cfg.offload.keep_on_restart:
            # XDP keeps forwarding until the next start: a FIN it punts in the
            # gap must not draw a RST. The next start replaces the table.
            log.info("kernel guard kept for the restart")
            return
        try:
            self.guard.remove()
        except GuardError as exc:
            log.error("removing the kernel guard: %s", exc)

    # -- restart handoff ----------------------------------------------------------
    def save_state(self, now: float) -> int:
        """Write every tracked connection for the next start; returns how many."""
        mgr = self.mgr
        with mgr.batch(now):
            mgr.age(now)  # expiry as of the fast path's last use
        mgr.fold_counters()
        conns = self.ct.conns()
        rows = export_conns(self.ct, conns)
        meta = {"boot_id": _boot_id(), "pin_dir": self.cfg.offload.pin_dir, "saved_at": now,
                "ports": {p.name: p.ifindex for p in self.ports} if self.ports else {}}
        path = state_path(self.cfg)
        write_state_file(path, rows, meta)
        log.info("saved %d connections (%d offloaded) to %s for the restart", len(rows),
                 sum(1 for r in rows if r["offloaded"]), path)
        return len(rows)

    def _discard_state(self) -> None:
        """Without keep_on_restart the maps were flushed: an old state file is stale."""
        try:
            os.unlink(state_path(self.cfg))
            log.info("discarded a stale conntrack state file (maps were flushed)")
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("removing a stale conntrack state file: %s", exc)

    def restore_state(self, now: float) -> dict[str, Any]:
        """Import the state a keep_on_restart shutdown left, re-offer, reap orphans."""
        out = {"imported": 0, "reoffered": 0, "not_admitted": 0, "reaped": 0, "skipped": {}}
        path = state_path(self.cfg)
        rows: list[Any] = []
        try:
            meta, rows = read_state_file(path)
        except StateError as exc:
            log.info("no conntrack state to restore: %s", exc)
        else:
            try:
                os.unlink(path)  # consumed: never imported twice
            except OSError as exc:
                log.warning("removing %s: %s", path, exc)
            if meta.get("boot_id") != _boot_id() or meta.get("pin_dir") != self.cfg.offload.pin_dir:
                log.warning("%s was written on another boot or for other pins: ignored", path)
                rows = []
        if rows:
            skipped: dict[str, int] = {}
            conns = import_conns(self.ct, rows, now, grace=2 * self.cfg.aging_interval,
                                 skipped=skipped)
            out["imported"], out["skipped"] = len(conns), skipped
            with self.mgr.batch(now):
                for conn in conns:
                    h = conn.ext.pop(HANDOFF_KEY, None) if conn.ext else None
                    admit = conn.ext.get(ADMIT_KEY) if conn.ext else None
                    if admit is not None and not self.policy.still_admits(admit):
                        self.ct.delete(conn, now, "policy-restore")
                        out["not_admitted"] += 1
                    elif h and h["offloaded"] and self._reoffer(conn, h["dirs"], admit, now):
                        out["reoffered"] += 1
        reap = getattr(self.xdp, "reap_orphans", None)
        if reap is not None:
            try:
                out["reaped"] = reap()
            except ProviderError as exc:
                log.error("reaping orphaned fast-path entries: %s", exc)
        claimed = self.xdp.stats().get("claimed", 0) if self.xdp is not None else 0
        log.info("restored %d connections from %s: %d re-offered, %d fast-path entries claimed, "
                 "%d no longer admitted, %d orphans reaped, skipped %s", out["imported"], path,
                 out["reoffered"], claimed, out["not_admitted"], out["reaped"], out["skipped"])
        return out

    def _reoffer(self, conn: Any, dirs: list[Any], admit: Any, now: float) -> bool:
        """Offer an imported connection with today's forwarding for each direction.

        Only the ingress port comes from the state; egress, MACs, next hop and
        MTU are looked up now, as the slow path would for a packet. An
        unresolved next hop is asked for and the offload waits (pending).
        """
        fds = []
        for i, d in enumerate(dirs):
            if d is None:
                return False
            in_port = self.ports.by_ifindex(d["in_ifindex"])
            if in_port is None or (i == 0 and admit is not None
                                   and in_port.name != admit.in_ifname):
                return False
            out = conn.orig.reverse() if i else conn.reply.reverse()
            route = self.router.lookup(out.family, out.dst)
            if route is None or not route.forwardable:
                return False
            out_port = self.ports.by_ifindex(route.oif)
            if out_port is None:
                return False
            nh = route.next_hop
            dmac = self.neigh.lookup(route.oif, nh)
            if dmac is None:
                self.neigh.resolve(route.oif, out.family, nh)
            fd = flow_dir(conn, bool(i), in_port.ifindex, route.oif, out_port.mac, dmac,
                          route.mtu or out_port.mtu)
            fds.append((fd, nh))
        for i, (fd, nh) in enumerate(fds):
            self.mgr.set_forwarding(conn, bool(i), fd, now, nexthop=nh)
        return True

    # -- main loop ---------------------------------------------------------------
    def run(self) -> int:
        interval = self.cfg.aging_interval
        next_tick = self.clock() + interval
        while not self._stop:
            if self._reload:
                self._reload = False
                try:
                    self.reload()
                except (ConfigError, ControlError, OSError) as exc:
                    log.error("reload failed, keeping the old config: %s", exc)
            timeout = max(0.0, min(next_tick - self.clock(), 0.5))
            for key, _ in self._sel.select(timeout):
                kind, obj = key.data if isinstance(key.data, tuple) else ("control", key.data)
                if kind == "port":
                    self._rx(obj)
                elif kind == "netlink":
                    self.nl.handle_events()
                else:
                    obj()
            now = self.clock()
            if now >= next_tick:
                self.tick(now)
                next_tick = now + interval
        return 0

    def _rx(self, port: Any) -> None:
        frames = port.recv_burst(_BURST)
        if not frames:
            return
        now = self.clock()
        with self.mgr.batch(now):
            for f in frames:
                self.fwd.process(f, port, now)

    def tick(self, now: float) -> None:
        """The aging interval: teardown flags, sweep of what is due (offloaded
        connections re-armed from last-used), pending retries."""
        mgr = self.mgr
        with mgr.batch(now):
            if self.xdp is not None:
                self._teardown_flagged(now)
            self.ct.sweep(now)
            mgr.retry_pending(now)
        self.fwd.expire_queued(now)
        t0, n0 = self._pps_mark
        n = self.fwd.stats["rx"]
        if now > t0:
            self.pps = (n - n0) / (now - t0)
        self._pps_mark = (now, n)

    def _teardown_flagged(self, now: float) -> None:
        """Withdraw the connections XDP flagged CT_F_TEARDOWN.

        The flag scan walks both flow maps, so it runs only when the
        program's ``punt_fin_rst`` counter moved since the last scan: XDP
        sets the flag before it counts the punt, and the slow path sees the
        punted FIN/RST anyway (the scan is the backup). The counter is read
        before the scan, so a punt racing with the scan is scanned again.
        """
        xdp = self.xdp
        stat = getattr(xdp, "stat", None)
        mark = None
        if stat is not None:
            try:
                mark = stat("punt_fin_rst")
            except ProviderError as exc:
                log.warning("reading punt counter: %s", exc)
            if mark is not None and mark == self._fin_rst_mark:
                return
        try:
            for ctx in xdp.teardown_flagged():
                self.mgr.withdraw(ctx.conn, now, "xdp-fin-rst")
        except ProviderError as exc:
            log.warning("reading teardown flags: %s", exc)
            return
        self._fin_rst_mark = mark

    # -- events ------------------------------------------------------------------
    def _on_neigh(self, ifindex: int, addr: bytes, old: bytes | None, new: bytes | None) -> None:
        now = self.clock()
        if new is not None:
            self.fwd.neigh_valid(ifindex, addr, new)
            n = self.mgr.neigh_resolved(ifindex, addr, new, now)
            log.info("neighbour %s on %d -> %s: %d flow directions updated",
                     _addr(addr), ifindex, new.hex(":"), n)
        else:
            n = self.mgr.neigh_gone(ifindex, addr, now)
            log.info("neighbour %s on %d gone: %d flow directions withdrawn",
                     _addr(addr), ifindex, n)

    def _on_route(self, family: int, dst: bytes, old: Any, new: Any) -> None:
        now = self.clock()
        n = self.mgr.withdraw_where(
            lambda c: any(d is not None and d.out.dst == dst for d in c.dirs), now, "route-change"
        )
        if n:
            log.info("route to %s changed: %d connections back to the slow path", _addr(dst), n)

    def _on_link(self, old: Any, new: Any) -> None:
        ifindex = (new or old).ifindex
        if self.ports is None or self.ports.by_ifindex(ifindex) is None:
            return
        now = self.clock()
        if new is None or not new.usable or (old is not None and (old.mac, old.mtu) != (new.mac, new.mtu)):
            n = self.mgr.withdraw_ifindex(ifindex, now, "port-down" if new is None or not new.usable
                                          else "port-changed")
            if new is not None:
                self.min_mtu = self.fwd.min_mtu = min(p.mtu for p in self.ports)
            log.info("port %s changed: %d connections withdrawn", (new or old).name, n)

    # -- reload ------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        if not self.config_path:
            raise ControlError("no config file to reload from")
        new = load_config(self.config_path)
        if new.port_names != self.cfg.port_names:
            log.warning("reload: port changes need a restart; keeping %s", self.cfg.port_names)
        if (new.snat or new.dnat) and self.guard is None and self._saved_sysctl is not None:
            # NAT added by a reload on a daemon that started without the
            # guard (nft failed then, which NAT-less configs tolerate): the
            # new NAT'd replies would draw RSTs from the router's stack.
            try:
                guard = KernelGuard(self.cfg.port_names)
                guard.install()
            except GuardError as exc:
                raise ControlError(f"reload refused: NAT needs the kernel guard: {exc}") from exc
            self.guard = guard
            log.info("kernel guard installed on reload: NAT was added")
        now = self.clock()
        self.cfg = new
        if self.xdp is not None:
            # Re-read so that reload + SIGTERM can end a kept run cleanly.
            self.xdp.keep = new.offload.keep_on_restart
        self.policy = Policy.from_config(new, port_addr=self._addr_fn)
        self.fwd.policy = self.policy
        ifindex_of = {p.name: p.ifindex for p in self.ports}
        self.mgr.set_policy(eligibility(new, ifindex_of), now)
        withdrawn = deleted = 0
        with self.mgr.batch(now):
            for conn in self.ct.conns():
                info = conn.ext.get(ADMIT_KEY) if conn.ext else None
                if info is None or self.policy.still_admits(info):
                    continue
                withdrawn += bool(self.mgr.withdraw(conn, now, "policy-reload"))
                self.ct.delete(conn, now, "policy-reload")
                deleted += 1
        log.info("reloaded %s: %d connections no longer admitted (%d were offloaded)",
                 self.config_path, deleted, withdrawn)
        return {"withdrawn": withdrawn, "deleted": deleted}

    # -- control socket --------------------------------------------------------
    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "conntrack":
            check_args(cmd, args, ("zone",))
            zone = int_arg(args, "zone", 0, 65535)
            conns = self.ct.conns(zone)
            self.mgr.refresh(conns, self.clock())  # expiry as of the fast path's last use
            self.mgr.fold_counters(conns)
            return {"conns": [self._conn_row(c) for c in conns]}
        if cmd == "flows":
            check_args(cmd, args, ())
            return {"flows": self._flow_rows()}
        if cmd == "stats":
            check_args(cmd, args, ())
            return self.stats()
        if cmd == "flush":
            check_args(cmd, args, ("zone",))
            zone = int_arg(args, "zone", 0, 65535)
            before = len(self.ct)
            self.mgr.flush(self.clock(), zone)
            return {"flushed": before - len(self.ct)}
        if cmd == "reload":
            check_args(cmd, args, ())
            try:
                return self.reload()
            except ConfigError as exc:
                raise ControlError(f"reload failed: {exc}") from exc
        if cmd == "offload":
            check_args(cmd, args, ("enabled",))
            en = args.get("enabled")
            if not isinstance(en, bool):
                raise ControlError("offload: 'enabled' must be true or false")
            now = self.clock()
            if en:
                self.mgr.enable(now)
            else:
                self.mgr.disable(now)
            return {"enabled": self.mgr.enabled, "offloaded": self.mgr.stats["offloaded"]}
        raise ControlError(f"unknown command {cmd!r}")

    def _conn_row(self, c: Any) -> dict[str, Any]:
        now = self.clock()
        o, r = c.orig, c.reply
        return {
            "zone": c.zone, "proto": c.proto, "state": c.state_name,
            "orig": {"src": _addr(o.src), "dst": _addr(o.dst), "sport": o.sport, "dport": o.dport},
            "reply": {"src": _addr(r.src), "dst": _addr(r.dst), "sport": r.sport, "dport": r.dport},
            "offloaded": self.mgr.is_offloaded(c),
            "packets": list(c.pkts), "bytes": list(c.bytes),
            "expires_in": round(c.expires - now, 3), "mark": c.mark,
        }

    def _flow_rows(self) -> list[dict[str, Any]]:
        if self.xdp is None:
            return []
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        rows = []
        for fr in self.xdp.flows():
            v = fr.val
            ctx = fr.ctx
            d = ctx.dirs[fr.dir] if ctx is not None and fr.dir >= 0 else None
            port_in = self.ports.by_ifindex(fr.ifindex)
            port_out = self.ports.by_ifindex(v.out_ifindex)
            nat = "+".join(n for n, f in (("snat", v.flags & 1), ("dnat", v.flags & 2)) if f)
            rows.append({
                "zone": ctx.zone if ctx is not None else None,
                "provider": "xdp",
                "in_ifname": port_in.name if port_in else None, "in_ifindex": fr.ifindex,
                "match": _tuple_row(fr.match),
                "out": _tuple_row(d.out) if d is not None else None,
                "out_ifname": port_out.name if port_out else None,
                "out_ifindex": v.out_ifindex,
                "nat": nat or None,
                "packets": v.packets, "bytes": v.bytes,
                "last_used_ago": round((now_ns - v.last_used) / 1e9, 3) if v.last_used else None,
                "orphan": ctx is None,
            })
        return rows

    def stats(self) -> dict[str, Any]:
        import psutil

        fast: dict[str, Any] = {}
        maps: dict[str, Any] = {}
        if self.xdp is not None:
            s = self.xdp.stats()
            punts = {k[len("punt_"):]: v for k, v in s.items() if k.startswith("punt_")}
            fast = {"hits": s.get("hit", 0), "misses": s.get("miss", 0), "punts": punts,
                    "redirect_errors": s.get("redirect_err", 0)}
            maps = {"flows_used": s.get("entries", 0), "flows_max": 2 * s.get("capacity_conns", 0),
                    "conns_used": s.get("conns", 0), "conns_max": s.get("capacity_conns", 0),
                    "key_index_bytes": s.get("index_bytes", 0)}
        ms = self.mgr.stats
        if self._proc is None:
            self._proc = psutil.Process()
        proc = self._proc
        return {
            "slow_path": {"pps": round(self.pps, 1), **dict(self.fwd.stats),
                          "dropped": dict(self.fwd.dropped)},
            "fast_path": fast,
            "offload": {"enabled": self.mgr.enabled, **ms},
            "maps": maps,
            "conntrack": {"conns": len(self.ct), **self.ct.stats.as_dict()},
            "process": {"cpu_percent": proc.cpu_percent(None), "rss_bytes": proc.memory_info().rss},
        }


def run_daemon(cfg: Config, config_path: str | None = None) -> int:
    """``ctxdp run``: start, loop until SIGTERM/SIGINT, shut down cleanly."""
    from ctxdp.log import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    if os.geteuid() != 0:
        log.error("ctxdp run needs root (XDP, AF_PACKET, sysctl)")
        return 1
    d = Daemon(cfg, config_path)
    try:
        d.start()
    except sysctl.ForwardingError as exc:
        log.error("refusing to start: cannot turn kernel forwarding off: %s", exc)
        return 1
    except GuardError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    except (ProviderError, ControlError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    signal.signal(signal.SIGTERM, d.stop)
    signal.signal(signal.SIGINT, d.stop)
    signal.signal(signal.SIGHUP, d.request_reload)
    try:
        return d.run()
    finally:
        d.close()
