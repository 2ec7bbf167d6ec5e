"""Slow-path ports: one AF_PACKET socket per router interface.

Contract:
- ``Port(name)`` opens a non-blocking ``AF_PACKET``/``SOCK_RAW`` socket bound
  to the interface, in the network namespace current at construction.
  ``fileno()`` goes into the daemon's selector; ``recv_burst()`` returns at
  most ``max_n`` frames (each a fresh ``bytearray`` the caller owns and may
  rewrite in place or keep queued) and never blocks; ``send(frame)`` returns
  ``True``/``False`` and never raises: every failure is counted.
- Only IPv4/IPv6 frames addressed to the port's own unicast MAC are
  returned. Everything else (ARP, ND's multicast, broadcast, frames for
  another host seen because a peer floods or we are promiscuous) belongs to
  the kernel or to nobody; a classic BPF socket filter drops it in the
  kernel before it is copied to us, and a Python check backs it up while
  the filter is being replaced after a MAC change.
- ``is_local_dst(addr)`` says the kernel must handle a packet to ``addr``
  (the router's own addresses, kept current from netlink by ``LocalAddrs``):
  the slow path skips those frames.

Where these frames come from: the XDP program on the port runs first. Hits
are redirected to the egress port and never reach the stack; misses and
punts return ``XDP_PASS``, enter the stack, and AF_PACKET taps get a copy
(``__netif_receive_skb_core`` delivers to ``ETH_P_ALL`` taps before the IP
layer). The kernel IP layer still sees the original: it answers ARP and
packets to its own addresses, and drops transit packets silently because
forwarding is off (see ``sysctl.py``), so each transit packet is forwarded
exactly once, by us.

Receive side caveat: if GRO is on for an ingress port, the tap sees merged
TCP super-frames larger than the MTU. Buffers are 64 KiB so nothing is
truncated (truncated frames would be counted and dropped), but re-sending a
super-frame on an egress port fails with EMSGSIZE; keep GRO off on ports
whose frames the slow path forwards.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from ctxdp.datapath.netlink import LinkState, LinkWatcher, LocalAddrs

__all__ = ["Port", "PortCounters", "PortSet"]

log = logging.getLogger(__name__)

# Linux constants Python's socket module does not export.
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20
PACKET_OUTGOING = 4  # sll_pkttype of frames we (or the kernel) transmitted
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
ETH_HLEN = 14
_ETYPE_IPV4 = b"\x08\x00"
_ETYPE_IPV6 = b"\x86\xdd"

# Transient transmit failures: the frame is dropped and counted.
_TX_DROP_ERRNOS = {errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK}


@dataclass(slots=True)
class PortCounters:
    rx: int = 0  # frames handed out by recv_burst
    rx_filtered: int = 0  # dropped by the Python backstop (not IP / not our MAC)
    rx_truncated: int = 0  # larger than the receive buffer: dropped
    rx_errors: int = 0
    kernel_drops: int = 0  # PACKET_STATISTICS tp_drops: socket queue overflowed
    tx: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # ENOBUFS/EAGAIN: queue full, frame dropped
    tx_too_big: int = 0  # EMSGSIZE: larger than the egress MTU
    tx_errors: int = 0  # any other error (link down, device gone, ...)
    tx_errno: dict[int, int] = field(default_factory=dict)


def _ifreq(name: str) -> bytes:
    return struct.pack("16s16x", name.encode())


def _filter_program(mac: bytes) -> list[tuple[int, int, int, int]]:
    """cBPF: accept IPv4/IPv6 frames whose destination MAC is ``mac``.

    Offsets are from the Ethernet header (SOCK_RAW packet sockets filter
    the frame as it appears on the wire).
    """
    ld_h, ld_w, jeq, ret = 0x28, 0x20, 0x15, 0x06
    hi = int.from_bytes(mac[:4], "big")
    lo = int.from_bytes(mac[4:6], "big")
    return [
        (ld_h, 0, 0, 12),  # 0: A = ethertype
        (jeq, 1, 0, 0x0800),  # 1: IPv4 -> 3
        (jeq, 0, 5, 0x86DD),  # 2: IPv6 -> 3, else drop (8)
        (ld_w, 0, 0, 0),  # 3: A = dst MAC bytes 0..3
        (jeq, 0, 3, hi),  # 4: else drop
        (ld_h, 0, 0, 4),  # 5: A = dst MAC bytes 4..5
        (jeq, 0, 1, lo),  # 6: else drop
        (ret, 0, 0, 0x40000),  # 7: accept the whole frame
        (ret, 0, 0, 0),  # 8: drop
    ]


def _attach_filter(sock: socket.socket, mac: bytes) -> None:
    prog = _filter_program(mac)
    insns = b"".join(struct.pack("HBBI", *i) for i in prog)
    buf = ctypes.create_string_buffer(insns)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _set_buf(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    # The *FORCE variants let root go past net.core.[rw]mem_max, which is
    # small by default; a deep queue absorbs bursts of first packets.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


class Port:
    """One router interface as the slow path sees it."""

    def __init__(
        self,
        name: str,
        *,
        local: LocalAddrs | None = None,
        rcvbuf: int = 4 << 20,
        sndbuf: int = 1 << 20,
        bufsize: int = 65536 + ETH_HLEN,
    ) -> None:
        self.name = name
        self.ifindex = socket.if_nametoindex(name)
        self.counters = PortCounters()
        self._local = local
        # Protocol 0: the socket receives nothing until bind() names a
        # protocol, so no frame slips in before the filter is attached.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            self._sock = sock
            self.mac, self.mtu = self._read_mac_mtu()
            _attach_filter(sock, self.mac)
            # Without this an ETH_P_ALL tap also receives every frame sent
            # on the interface (dev_queue_xmit_nit): the kernel's own
            # transmissions and those of any other packet socket (a second
            # daemon during a restart, a capture tool injecting) would come
            # up as "received" and be forwarded again. The kernel already
            # skips the sending socket itself, and the MAC filter rejects
            # frames addressed to other hosts, but a frame to our own MAC
            # sent by someone else gets past both. Outgoing frames are never
            # ours to forward; this drops them before they are even cloned.
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                self._ignore_outgoing = True
            except OSError:  # pre-4.20 kernel: check sll_pkttype per frame
                self._ignore_outgoing = False
            _set_buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
            _set_buf(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            sock.bind((name, ETH_P_ALL))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)

    # -- identity --------------------------------------------------------
    def _read_mac_mtu(self) -> tuple[bytes, int]:
        # ioctls on our own socket answer for the socket's namespace
        # (sysfs would answer for whichever namespace mounted /sys).
        hw = fcntl.ioctl(self._sock.fileno(), SIOCGIFHWADDR, _ifreq(self.name))
        mtu = fcntl.ioctl(self._sock.fileno(), SIOCGIFMTU, _ifreq(self.name))
        return bytes(hw[18:24]), struct.unpack_from("i", mtu, 16)[0]

    def refresh(self, link: LinkState | None = None) -> bool:
        """Re-read MAC and MTU (from ``link`` if given); True if either changed.

        A new MAC replaces the socket filter so frames to the new address
        are accepted.
        """
        if link is not None and link.mac is not None:
            mac, mtu = link.mac, link.mtu
        else:
            try:
                mac, mtu = self._read_mac_mtu()
            except OSError as exc:
                log.warning("port %s: cannot read MAC/MTU: %s", self.name, exc)
                return False
        changed = mac != self.mac or mtu != self.mtu
        if mac != self.mac:
            _attach_filter(self._sock, mac)
            self.mac = mac
        self.mtu = mtu
        return changed

    def fileno(self) -> int:
        return self._sock.fileno()

    def is_local_dst(self, addr: bytes) -> bool:
        """True when a packet to ``addr`` is the kernel's, not the forwarder's."""
        if self._local is None:
            raise RuntimeError("Port was created without a LocalAddrs cache")
        return self._local.is_local_dst(addr)

    # -- receive ---------------------------------------------------------
    def recv_burst(self, max_n: int = 64) -> list[bytearray]:
        """Up to ``max_n`` queued frames for the slow path; never blocks."""
        out: list[bytearray] = []
        buf, view, mac = self._buf, self._view, self.mac
        cap = len(buf)
        c = self.counters
        for _ in range(max_n):
            try:
                if self._ignore_outgoing:
                    # MSG_TRUNC: the return value is the real frame length,
                    # so an oversize frame is detected, not silently cut.
                    n = self._sock.recv_into(buf, cap, socket.MSG_TRUNC)
                else:
                    n, addr = self._sock.recvfrom_into(buf, cap, socket.MSG_TRUNC)
                    if addr[2] == PACKET_OUTGOING:
                        continue
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # e.g. ENETDOWN when the link went down under us; the link
                # watcher tells the daemon, we just stop this burst.
                c.rx_errors += 1
                log.debug("port %s: recv error %s", self.name, exc)
                break
            if n > cap:
                c.rx_truncated += 1
                continue
            if n < ETH_HLEN or buf[0:6] != mac or buf[12:14] not in (_ETYPE_IPV4, _ETYPE_IPV6):
                c.rx_filtered += 1
                continue
            out.append(bytearray(view[:n]))
        c.rx += len(out)
        return out

    # -- transmit --------------------------------------------------------
    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Transmit one complete Ethernet frame; False (and counted) on failure."""
        c = self.counters
        try:
            n = self._sock.send(frame)
        except OSError as exc:
            code = exc.errno or 0
            c.tx_errno[code] = c.tx_errno.get(code, 0) + 1
            if code in _TX_DROP_ERRNOS:
                c.tx_dropped += 1
            elif code == errno.EMSGSIZE:
                c.tx_too_big += 1
            else:
                c.tx_errors += 1
            return False
        c.tx += 1
        c.tx_bytes += n
        return True

    # -- bookkeeping -----------------------------------------------------
    def poll_kernel_stats(self) -> None:
        """Fold PACKET_STATISTICS into the counters (the kernel resets it on read)."""
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return
        _packets, drops = struct.unpack("II", raw)
        self.counters.kernel_drops += drops

    def stats(self) -> dict[str, object]:
        self.poll_kernel_stats()
        out = asdict(self.counters)
        out.update(name=self.name, ifindex=self.ifindex, mtu=self.mtu, mac=self.mac.hex(":"))
        return out

    def close(self) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"Port({self.name!r}, ifindex={self.ifindex}, mac={self.mac.hex(':')})"


class PortSet:
    """The daemon's ports, by name, ifindex and file descriptor.

    ``watch(links)`` keeps each port's MAC/MTU current from link events; the
    daemon subscribes to the same ``LinkWatcher`` for down/removed handling.
    """

    def __init__(self, names: list[str] | tuple[str, ...] = (), *, local: LocalAddrs | None = None,
                 **port_kw: int) -> None:
        self._local = local
        self._port_kw = port_kw
        self._by_index: dict[int, Port] = {}
        self._by_name: dict[str, Port] = {}
        self._by_fd: dict[int, Port] = {}
        try:
            for name in names:
                self.add(name)
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Port:
        if name in self._by_name:
            return self._by_name[name]
        port = Port(name, local=self._local, **self._port_kw)
        self._by_index[port.ifindex] = port
        self._by_name[name] = port
        self._by_fd[port.fileno()] = port
        return port

    def remove(self, name: str) -> None:
        port = self._by_name.pop(name, None)
        if port is None:
            return
        self._by_index.pop(port.ifindex, None)
        self._by_fd.pop(port.fileno(), None)
        port.close()

    def by_ifindex(self, ifindex: int) -> Port | None:
        return self._by_index.get(ifindex)

    def by_name(self, name: str) -> Port | None:
        return self._by_name.get(name)

    def by_fd(self, fd: int) -> Port | None:
        return self._by_fd.get(fd)

    def watch(self, links: LinkWatcher) -> None:
        links.on_change(self._on_link)

    def _on_link(self, old: LinkState | None, new: LinkState | None) -> None:
        if new is None:
            return
        port = self._by_index.get(new.ifindex)
        if port is not None:
            port.refresh(new)

    def __iter__(self) -> Iterator[Port]:
        return iter(list(self._by_index.values()))

    def __len__(self) -> int:
        return len(self._by_index)

    def __contains__(self, ifindex: object) -> bool:
        return ifindex in self._by_index

    def close(self) -> None:
        for port in list(self._by_name.values()):
            port.close()
        self._by_index.clear()
        self._by_name.clear()
        self._by_fd.clear()
