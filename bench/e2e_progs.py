"""Bench-side XDP programs of bench/e2e.py and the frames they send.

Contract:
- ``udp_frame(family, size, ...)`` builds one Ethernet/IP/UDP frame of
  exactly ``size`` bytes (no FCS) with correct IP and UDP checksums over a
  zero payload (so every frame the generator emits is one a real host could
  have sent: nf_conntrack and the slow path may check checksums).
- ``Progs()`` compiles bench/e2e_gen.c, e2e_sink.c and e2e_redirect.c once
  with bcc (in the calling process; the fds are inherited by forked children
  that enter a namespace). Its methods configure them: ``set_flows`` loads
  the generator's templates; ``sink_config`` / ``sink_count`` drive the sink;
  ``set_ceiling`` fills the bare redirect's MACs and egress port (from
  inside the router namespace: a devmap resolves an ifindex in the netns of
  the caller).
- ``attach(ns, ifname, fd)`` / ``detach(ns, ifname)`` attach and remove an
  XDP program (native mode) inside a namespace of the lab; the caller owns
  detaching, and deleting the namespace removes it anyway.
- ``generate(ctl, fd, frame, ifindex, repeat, cpu)`` is the body of the
  generator child (run in the generator namespace): BPF_PROG_RUN with live
  frames, ``repeat`` frames per call, until the parent asks it to stop.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path
from typing import Any

from ctxdp import bpfsys

__all__ = ["Progs", "attach", "calibrate", "detach", "generate", "udp_frame", "E2E_HDR", "MAX_FLOWS"]

BENCH = Path(__file__).resolve().parent
E2E_HDR = 64  # bytes of each template the generator copies (e2e_gen.c)
MAX_FLOWS = 4096
_XDP_FLAGS_DRV_MODE = 1 << 2


def _csum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (already complemented)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(family: int, size: int, src_mac: bytes, dst_mac: bytes, src: str, dst: str,
              sport: int, dport: int, ttl: int = 64) -> bytes:
    """Ethernet + IPv4/IPv6 + UDP, ``size`` bytes in all, zero payload."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if family == 4:
        ip_len = size - 14
        udp_len = ip_len - 20
        pseudo = s + d + struct.pack("!BBH", 0, 17, udp_len)
    else:
        udp_len = size - 14 - 40
        pseudo = s + d + struct.pack("!IxxxB", udp_len, 17)
    if udp_len < 8:
        raise ValueError(f"{size} bytes cannot hold IPv{family} + UDP")
    payload = bytes(udp_len - 8)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0)
    c = _csum(pseudo + udp + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, udp_len, c)
    if family == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0x4000, ttl, 17, 0, s, d)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        et = 0x0800
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, ttl, s, d)
        et = 0x86DD
    return dst_mac + src_mac + struct.pack("!H", et) + hdr + udp + payload


def attach(ns: Any, ifname: str, fd: int) -> None:
    """Attach XDP program ``fd`` to ``ifname`` inside namespace ``ns`` (a lab Netns)."""
    ns.run(_attach_here, ifname, fd)


def _attach_here(ifname: str, fd: int) -> None:
    from bcc import libbcc  # noqa: PLC0415 - bcc only inside the bench

    if libbcc.lib.bpf_attach_xdp(ifname.encode(), fd, _XDP_FLAGS_DRV_MODE) < 0:
        raise OSError(f"attaching XDP to {ifname} failed")


def detach(ns: Any, ifname: str) -> None:
    """Remove any XDP program from ``ifname`` in ``ns`` (no error if none)."""
    ns.ip("link", "set", "dev", ifname, "xdp", "off", check=False)


def _map_update_here(fd: int, key: bytes, val: bytes) -> None:
    bpfsys.map_update(fd, key, val)


def calibrate(fd: int, frame: bytes, ifindex: int, repeat: int, cpu: int) -> float:
    """One live-frame call of ``repeat`` frames; the kernel's ns per frame."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    r = bpfsys.prog_test_run(fd, frame, repeat=repeat, ctx=bpfsys.xdp_md(ifindex, len(frame)),
                             flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES)
    return float(r.duration_ns)


def generate(ctl: Any, fd: int, frame: bytes, ifindex: int, repeat: int, cpu: int) -> int:
    """Generator child: live-frame runs until stopped; number of runs made."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    ctx = bpfsys.xdp_md(ifindex, len(frame))
    ctl.ready()
    calls = 0
    while not ctl.stop_requested():
        bpfsys.prog_test_run(fd, frame, repeat=repeat, ctx=ctx,
                             flags=bpfsys.BPF_F_TEST_XDP_LIVE_FRAMES)
        calls += 1
    return calls


class Progs:
    """The three bench programs, compiled once; see the module contract."""

    def __init__(self) -> None:
        from bcc import BPF  # noqa: PLC0415

        self._gen = BPF(src_file=str(BENCH / "e2e_gen.c").encode())
        self._sink = BPF(src_file=str(BENCH / "e2e_sink.c").encode())
        self._redir = BPF(src_file=str(BENCH / "e2e_redirect.c").encode())
        self.gen_fd = self._gen.load_func(b"e2e_gen", BPF.XDP).fd
        self.sink_fd = self._sink.load_func(b"e2e_sink", BPF.XDP).fd
        self.redirect_fd = self._redir.load_func(b"e2e_redirect", BPF.XDP).fd
        self.pass_fd = self._redir.load_func(b"e2e_pass", BPF.XDP).fd

    # -- generator -------------------------------------------------------------
    def set_flows(self, frames: list[bytes]) -> None:
        """Templates: flow i sends ``frames[i]``'s first E2E_HDR bytes."""
        if not 1 <= len(frames) <= MAX_FLOWS:
            raise ValueError(f"1..{MAX_FLOWS} flows")
        fd = self._gen[b"e2e_tmpl_map"].map_fd
        for i, f in enumerate(frames):
            bpfsys.map_update(fd, struct.pack("=I", i), f[:E2E_HDR])
        bpfsys.map_update(self._gen[b"e2e_gen_cfg_map"].map_fd, struct.pack("=I", 0),
                          struct.pack("=I", len(frames)))

    def gen_sent(self) -> int:
        """Frames the generator has handed to XDP_TX, all CPUs."""
        return sum(int(v.sent) for v in self._gen[b"e2e_gen_state_map"][0])

    # -- sink ------------------------------------------------------------------
    def sink_config(self, dport: int, all_ip: bool = False) -> None:
        """Count and drop UDP to ``dport`` (0: nothing) or, ``all_ip``, every IP frame."""
        bpfsys.map_update(self._sink[b"e2e_sink_cfg_map"].map_fd, struct.pack("=I", 0),
                          struct.pack("=HBx", dport, int(all_ip)))

    def sink_count(self) -> tuple[int, int]:
        """(packets, bytes) the sink has counted, all CPUs."""
        vals = self._sink[b"e2e_sink_count_map"][0]
        return sum(int(v.pkts) for v in vals), sum(int(v.bytes) for v in vals)

    # -- ceiling ---------------------------------------------------------------
    def set_ceiling(self, router_ns: Any, out_ifindex: int, smac: bytes, dmac: bytes) -> None:
        """Egress port and MACs of the bare redirect (devmap set inside the router ns)."""
        bpfsys.map_update(self._redir[b"e2e_fwd_cfg_map"].map_fd, struct.pack("=I", 0),
                          smac + dmac)
        router_ns.run(_map_update_here, self._redir[b"e2e_tx"].map_fd, struct.pack("=I", 0),
                      struct.pack("=I", out_ifindex))

    def close(self) -> None:
        for b in (self._gen, self._sink, self._redir):
            b.cleanup()
