"""The slow-path forwarding pipeline: one received frame in, at most one out.

Contract:
- ``Forwarder(ct, mgr, policy, router, neigh, ports, zones)`` takes its
  collaborators by duck type so unit tests can hand it fakes: ``router`` has
  ``lookup(family, dst) -> Route | None``; ``neigh`` has ``lookup(ifindex,
  addr) -> mac | None`` and ``resolve(ifindex, family, addr) -> bool``;
  ``ports`` has ``by_ifindex(ifindex)`` returning objects with ``name``,
  ``ifindex``, ``mac``, ``mtu``, ``send(frame) -> bool`` and
  ``is_local_dst(addr)``.
- ``process(frame, in_port, now)`` runs the packet walk of the design brief:
  parse; leave the kernel what is its own (non-IP, and packets to a local
  address unless conntrack or a port-forward claims them: NAT comes before
  the local decision); TTL check (ICMP time exceeded);
  conntrack lookup; for NEW: DNAT decision, route, policy, commit with NAT;
  route the (translated) packet; MTU check (ICMP fragmentation needed /
  packet too big); next-hop MAC (unresolved: resolve, queue briefly); TTL
  decrement and MAC rewrite; transmit; tell the offload manager how each
  direction of the connection was forwarded. It never raises: every outcome
  is counted in ``stats`` (``forwarded``, ``dropped[reason]``, ...).
- ``frame`` must be a ``bytearray``: NAT, TTL and MACs are rewritten in place.
- Time is passed in (``now``); nothing here reads a clock.

One NAT per connection: the tracker commits a single ``NatAction``. When
the policy asks for both DNAT and SNAT (hairpin NAT), DNAT wins and
``stats["nat_double"]`` counts it (documented in the README).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any

from ctxdp import packet as P
from ctxdp.conntrack import CS, FlowTuple
from ctxdp.policy import AdmitInfo, NatUnavailable, translate
from ctxdp.providers.base import FlowDir

__all__ = ["Forwarder", "ADMIT_KEY"]

log = logging.getLogger(__name__)

#: ``conn.ext`` key holding the ``AdmitInfo`` a reload re-checks.
ADMIT_KEY = "admit"

_UNRES_QLEN = 16  # frames queued per unresolved next hop (kernel: unres_qlen ~ 101)
_UNRES_TTL = 1.0  # seconds a queued frame waits for its next hop


def _tuple(pkt: P.Packet) -> FlowTuple:
    return FlowTuple(pkt.family, pkt.proto, pkt.src, pkt.dst, pkt.sport, pkt.dport)


def _as_sent(frame: bytearray, match: FlowTuple) -> P.Packet:
    """A copy of ``frame`` with NAT undone: the datagram as its sender sent it
    (``match`` is its tuple before conntrack), for the quote of an ICMP error."""
    buf = bytearray(frame)
    p = P.parse(buf)
    if p.src != match.src:
        P.set_src(buf, p, match.src)
    if p.dst != match.dst:
        P.set_dst(buf, p, match.dst)
    if p.sport != match.sport:
        P.set_sport(buf, p, match.sport)
    if p.dport != match.dport:
        P.set_dport(buf, p, match.dport)
    return p


class Forwarder:
    """Forward frames the XDP program passed up (misses and punts)."""

    def __init__(
        self,
        ct: Any,
        mgr: Any,
        policy: Any,
        router: Any,
        neigh: Any,
        ports: Any,
        zones: dict[int, int] | None = None,
    ) -> None:
        self.ct = ct
        self.mgr = mgr
        self.policy = policy
        self.router = router
        self.neigh = neigh
        self.ports = ports
        self.zones = zones if zones is not None else {}
        self.min_mtu = 1500
        # (ifindex, next hop) -> deque of (deadline, frame, out_port)
        self._unres: dict[tuple[int, bytes], deque] = {}
        self.stats: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    # -- helpers -----------------------------------------------------------
    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def _icmp_error(self, frame: bytearray, pkt: P.Packet, in_port: Any, kind: str,
                    mtu: int = 0) -> None:
        """Send an ICMP error about ``pkt`` back where it came from.

        It goes out of the ingress port to the frame's source MAC (the
        previous hop), from the router address the kernel would pick toward
        the sender. ``pkt`` must describe the datagram as the sender sent it.
        """
        if not P.icmp_error_allowed(pkt, kind):
            self.stats["icmp_suppressed"] += 1
            return
        back = self.router.lookup(pkt.family, pkt.src)
        src = back.prefsrc if back is not None else None
        if src is None:
            self.stats["icmp_no_source"] += 1
            return
        try:
            ip = P.build_icmp_error(pkt, kind, src_addr=src, mtu=mtu)
        except Exception:  # noqa: BLE001 - a quote we cannot build is just not sent
            self.stats["icmp_build_errors"] += 1
            return
        et = b"\x08\x00" if pkt.family == 4 else b"\x86\xdd"
        if in_port.send(bytes(pkt.eth_src) + bytes(in_port.mac) + et + ip):
            self.stats["icmp_" + kind] += 1

    # -- the packet walk -----------------------------------------------------
    def process(self, frame: bytearray, in_port: Any, now: float) -> None:
        try:
            self._process(frame, in_port, now)
        except Exception:  # noqa: BLE001 - one bad packet never stops the loop
            self._drop("internal-error")
            log.exception("slow path: packet processing failed")

    def _process(self, frame: bytearray, in_port: Any, now: float) -> None:
        self.stats["rx"] += 1
        pkt = P.parse(frame)
        if not pkt.valid:
            self._drop("malformed")
            return
        zone = self.zones.get(in_port.ifindex, 0)
        if pkt.family == 0 or (
            in_port.is_local_dst(pkt.dst) and not self._claims_local(pkt, in_port, zone)
        ):
            self.stats["to_kernel"] += 1  # ARP, ND, ping to the router: the kernel's
            return
        if pkt.ttl <= 1:
            # Checked before conntrack so the ICMP quotes the datagram exactly
            # as the sender sent it, as a kernel router's does.
            self._icmp_error(frame, pkt, in_port, "time-exceeded")
            self._drop("ttl-exceeded")
            return
        # Oversized frames need the sender's view of the datagram for a PMTU
        # error, and NAT is about to rewrite it in place: keep a copy only then
        # (a route MTU below every port's is handled by undoing NAT on a copy).
        orig_frame = bytes(frame) if pkt.ip_len > self.min_mtu else None

        match = _tuple(pkt)
        res = self.ct.execute(pkt, zone, now)
        st = res.state
        if st & CS.INV:
            self._drop("ct-invalid")
            return
        conn = res.conn
        if conn is None:
            conn = self._new(pkt, match, in_port, zone, now)
            if conn is None:
                return
            reply = False
        else:
            reply = res.reply

        route = self.router.lookup(pkt.family, pkt.dst)
        if route is None or not route.forwardable:
            self._drop("no-route")
            return
        out_port = self.ports.by_ifindex(route.oif)
        if out_port is None:
            self._drop("egress-not-a-port")
            return
        mtu = route.mtu or out_port.mtu
        if pkt.ip_len > mtu:
            df = pkt.family == 6 or (frame[pkt.l3 + 6] & 0x40)
            if df:
                if orig_frame is not None:
                    sent = P.parse(bytearray(orig_frame))
                else:
                    sent = _as_sent(frame, match)
                self._icmp_error(frame, sent, in_port, "too-big", mtu)
                self._drop("mtu-exceeded")
            else:
                self._drop("needs-fragmentation")
            return

        nh = route.next_hop
        dmac = self.neigh.lookup(route.oif, nh)
        if conn is not None and not (st & CS.REL):
            fd = FlowDir(in_port.ifindex, match, _tuple(pkt), route.oif, out_port.mac, dmac, mtu)
            self.mgr.set_forwarding(conn, reply, fd, now, nexthop=nh)
        P.dec_ttl(frame, pkt)
        if dmac is None:
            self._queue(route.oif, nh, pkt.family, frame, out_port, now)
            return
        P.set_macs(frame, out_port.mac, dmac, pkt)
        if out_port.send(frame):
            self.stats["forwarded"] += 1
        else:
            self._drop("tx-error")

    def _claims_local(self, pkt: P.Packet, in_port: Any, zone: int) -> bool:
        """Whether a packet to one of the router's own addresses is still ours.

        NAT comes before the local-or-forward decision (the kernel's
        PREROUTING): the reply of a masqueraded connection, a port-forward
        to the router's address, and an ICMP error about either are all
        addressed to us but belong to a tracked (or DNAT-able) connection.
        Everything else to a local address is the kernel's (ping, SSH).
        """
        t = _tuple(pkt)
        if self.ct.get(zone, t) is not None:
            return True
        inner = pkt.inner
        if inner is not None and self.ct.get(zone, _tuple(inner).reverse()) is not None:
            return True
        return self.policy.dnat_for(in_port.name, t)[0] is not None

    def _new(self, pkt: P.Packet, orig: FlowTuple, in_port: Any, zone: int, now: float):
        """Admit and commit a NEW connection; None (counted) when refused."""
        in_name = in_port.name
        try:
            dnat, _ = self.policy.dnat_for(in_name, orig)
            target = translate(orig, dnat)
            route = self.router.lookup(pkt.family, target.dst)
            if route is None or not route.forwardable:
                self._drop("no-route")
                return None
            out_port = self.ports.by_ifindex(route.oif)
            if out_port is None:
                self._drop("egress-not-a-port")
                return None
            adm = self.policy.evaluate(in_name, out_port.name, orig)
        except NatUnavailable:
            self._drop("nat-unavailable")
            return None
        if not adm.verdict.allow:
            self._drop("policy-deny")
            return None
        nat = adm.nat
        action = None
        if nat is not None:
            action = nat.dnat if nat.dnat is not None else nat.snat
            if nat.dnat is not None and nat.snat is not None:
                self.stats["nat_double"] += 1
        res = self.ct.execute(pkt, zone, now, commit=True, nat=action)
        conn = res.conn
        if conn is None or res.state & CS.INV:
            self._drop("ct-refused")
            return None
        if conn.ext is None:
            conn.ext = {}
        conn.ext[ADMIT_KEY] = AdmitInfo(in_name, out_port.name, orig, nat)
        self.stats["new_conns"] += 1
        return conn

    # -- unresolved next hops ----------------------------------------------------
    def _queue(self, oif: int, nh: bytes, family: int, frame: bytearray, out_port: Any,
               now: float) -> None:
        key = (oif, nh)
        q = self._unres.get(key)
        if q is None:
            q = self._unres[key] = deque()
        if len(q) >= _UNRES_QLEN:
            q.popleft()
            self._drop("unresolved-queue-full")
        q.append((now + _UNRES_TTL, frame, out_port))
        self.stats["queued_unresolved"] += 1
        self.neigh.resolve(oif, family, nh)

    def neigh_valid(self, ifindex: int, addr: bytes, mac: bytes) -> int:
        """Next hop ``addr`` resolved to ``mac``: send what waited for it."""
        q = self._unres.pop((ifindex, addr), None)
        n = 0
        while q:
            _, frame, out_port = q.popleft()
            P.set_macs(frame, out_port.mac, mac)
            if out_port.send(frame):
                self.stats["forwarded"] += 1
                n += 1
            else:
                self._drop("tx-error")
        return n

    def expire_queued(self, now: float) -> int:
        """Drop (and count) frames whose next hop did not resolve in time."""
        n = 0
        for key in list(self._unres):
            q = self._unres[key]
            while q and q[0][0] <= now:
                q.popleft()
                n += 1
            if not q:
                del self._unres[key]
        if n:
            self.dropped["unresolved-timeout"] += n
        return n
