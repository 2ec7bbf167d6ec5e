"""The lab agent: real-socket traffic and control-socket queries, stdlib only.

Contract:
- Runs on any lab host with a plain ``python3`` (3.9+), as
  ``python3 -m ctxdp.lab.traffic CMD ...`` or as a script
  (``python3 /path/to/ctxdp/lab/traffic.py CMD ...``); it imports nothing
  outside the standard library, so a VM needs only this one file.
- Output is JSON lines on stdout. Every line is an object with an
  ``"event"`` member; the last line of a successful run is
  ``{"event": "result", ...}`` and the exit status is 0. A failure prints
  ``{"event": "error", "error": "<one line>"}`` and exits 1. Progress
  events (``listening``, ``connected``, ``replied``, ``sent``) come first so
  a driver can sequence the other hosts on them.
- ``--step`` makes a sender stop at each phase boundary and wait for one line
  on stdin before going on; that is how a scenario measures the router's
  counters while the connection is idle (see ``ctxdp.lab.scenarios``).
- Every command has a deadline (``--timeout``), so a process a driver lost
  track of (e.g. behind an ssh session) ends by itself.

Commands:
- ``tcp-recv --port P [--family 4|6] [--bind A] [--progress S]
  [--allow-reset]``: accept one connection, read to EOF; result ``bytes``,
  ``sha256``, ``seconds`` (first to last data byte), ``peer`` (the source
  address the server saw: NAT shows here), ``reset``. ``--progress`` adds
  a ``progress`` event (``bytes`` so far) every S seconds, data or not, so
  a driver sees a stalled stream as it stalls; ``--allow-reset`` ends a
  connection reset by the peer with a result (``reset: true``) instead of
  an error.
- ``tcp-send --dst A --port P --bytes N [--rate-mbps R] [--step]
  [--close fin|rst]``: send N random bytes; events ``connected``
  (``local``, ``peer``), ``sent``; result ``bytes``, ``sha256``,
  ``seconds``, ``mbps``, ``local``, ``close``. ``--close rst`` waits until
  the peer has acknowledged every byte, then closes with SO_LINGER 0, so
  the kernel ends the connection with a RST instead of a FIN.
- ``udp-echo --port P [--idle-exit S]``: echo datagrams until idle for S
  seconds after the first; result ``echoed``, ``peers``.
- ``udp-req --dst A --port P --count N --interval S [--step]``: N
  request/response exchanges; event ``replied`` after the first reply;
  result ``sent``, ``replies``, ``lost``, ``local``, ``rtt_ms_avg``.
- ``ctl --socket PATH CMD[=JSONARGS] ...``: send control requests to a
  ctxdp daemon over its JSON-lines Unix socket (the protocol of
  ``ctxdp.control``); result ``responses``: one ``{"ok", "result"|"error"}``
  per request, in order. Batching several requests in one process keeps a
  remote poll to a single round trip.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import select
import socket
import struct
import sys
import termios
import time

__all__ = ["main"]

_CHUNK = 32 * 1024


class _Fail(Exception):
    """A failure reported as one JSON error line."""


def _emit(event: str, **data: object) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _family_of(addr: str) -> int:
    return 6 if ":" in addr else 4


def _endpoint(sa: tuple) -> list:
    return [sa[0], sa[1]]


def _wait_stdin(deadline: float, what: str) -> None:
    """Block until one line arrives on stdin (``--step``) or the deadline."""
    left = deadline - time.monotonic()
    r, _, _ = select.select([sys.stdin], [], [], max(left, 0))
    if not r:
        raise _Fail(f"no go-ahead on stdin for {what} before the deadline")
    sys.stdin.readline()


# --- TCP -------------------------------------------------------------------


def cmd_tcp_recv(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.timeout
    s = socket.socket(_af(a.family), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind or ("::" if a.family == 6 else "0.0.0.0"), a.port))
    s.listen(1)
    s.settimeout(a.timeout)
    _emit("listening", port=a.port, family=a.family)
    try:
        conn, peer = s.accept()
    except TimeoutError:
        raise _Fail(f"no connection on port {a.port} within {a.timeout}s") from None
    h = hashlib.sha256()
    n = 0
    t0 = t1 = None
    reset = False
    next_progress = time.monotonic() + a.progress if a.progress else None
    with conn:
        while True:
            now = time.monotonic()
            if next_progress is not None and now >= next_progress:
                _emit("progress", bytes=n)
                next_progress = now + a.progress
            if now >= deadline:
                raise _Fail(f"transfer not finished within {a.timeout}s ({n} bytes)")
            wait = deadline - now
            if next_progress is not None:
                wait = min(wait, next_progress - now)
            r, _, _ = select.select([conn], [], [], max(wait, 0))
            if not r:
                continue
            try:
                b = conn.recv(1 << 16)
            except ConnectionResetError:
                if not a.allow_reset:
                    raise
                reset = True
                break
            if not b:
                break
            t1 = time.monotonic()
            t0 = t0 or t1
            h.update(b)
            n += len(b)
    secs = (t1 - t0) if t0 is not None and t1 is not None else 0.0
    _emit("result", bytes=n, sha256=h.hexdigest(), seconds=round(secs, 3), peer=_endpoint(peer),
          reset=reset)


def cmd_tcp_send(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.timeout
    s = socket.create_connection((a.dst, a.port), timeout=min(a.timeout, 10))
    s.settimeout(a.timeout)
    _emit("connected", local=_endpoint(s.getsockname()), peer=_endpoint(s.getpeername()))
    if a.step:
        _wait_stdin(deadline, "sending")
    h = hashlib.sha256()
    sent = 0
    t0 = time.monotonic()
    bps = a.rate_mbps * 1e6 / 8 if a.rate_mbps else 0.0
    while sent < a.bytes:
        block = os.urandom(min(_CHUNK, a.bytes - sent))
        h.update(block)
        s.sendall(block)
        sent += len(block)
        if bps:
            # Pace: sleep until this many bytes are due at the target rate.
            ahead = t0 + sent / bps - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if time.monotonic() > deadline:
            raise _Fail(f"sending not finished within {a.timeout}s ({sent} bytes)")
    secs = time.monotonic() - t0
    _emit("sent", bytes=sent, seconds=round(secs, 3))
    if a.step:
        _wait_stdin(deadline, "closing")
    local = _endpoint(s.getsockname())
    if a.close == "rst":
        _wait_acked(s, deadline)
        # Linger on with a zero timeout: close() discards the connection and
        # the kernel sends a RST rather than a FIN (tcp_disconnect path).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    mbps = sent * 8 / secs / 1e6 if secs > 0 else 0.0
    _emit("result", bytes=sent, sha256=h.hexdigest(), seconds=round(secs, 3),
          mbps=round(mbps, 1), local=local, close=a.close)


def _wait_acked(s: socket.socket, deadline: float) -> None:
    """Wait until the peer acknowledged everything sent (SIOCOUTQ reads 0).

    A RST discards whatever is still queued, so without this the receiver
    could lose the tail of the data and the integrity check would blame the
    router for what the sender threw away.
    """
    buf = bytearray(4)
    while True:
        fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, buf)  # == SIOCOUTQ for sockets
        if int.from_bytes(buf, sys.byteorder) == 0:
            return
        if time.monotonic() > deadline:
            raise _Fail("peer did not acknowledge all data before the deadline")
        time.sleep(0.01)


# --- UDP -------------------------------------------------------------------


def cmd_udp_echo(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.timeout
    s = socket.socket(_af(a.family), socket.SOCK_DGRAM)
    s.bind((a.bind or ("::" if a.family == 6 else "0.0.0.0"), a.port))
    _emit("listening", port=a.port, family=a.family)
    echoed = 0
    peers: list[list] = []
    last = None
    while True:
        now = time.monotonic()
        wait = deadline - now
        if last is not None:
            wait = min(wait, last + a.idle_exit - now)
        if wait <= 0:
            break
        r, _, _ = select.select([s], [], [], wait)
        if not r:
            continue
        data, peer = s.recvfrom(1 << 16)
        s.sendto(data, peer)
        echoed += 1
        last = time.monotonic()
        if _endpoint(peer) not in peers:
            peers.append(_endpoint(peer))
    _emit("result", echoed=echoed, peers=peers)


def cmd_udp_req(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.timeout
    s = socket.socket(_af(_family_of(a.dst)), socket.SOCK_DGRAM)
    if a.sport:
        s.bind(("::" if _family_of(a.dst) == 6 else "0.0.0.0", a.sport))
    s.connect((a.dst, a.port))
    local = _endpoint(s.getsockname())
    pad = b"x" * max(a.size - 8, 0)
    replies = 0
    rtts: list[float] = []
    for seq in range(a.count):
        t_send = time.monotonic()
        s.send(seq.to_bytes(8, "big") + pad)
        got = False
        while True:
            left = t_send + a.reply_timeout - time.monotonic()
            r, _, _ = select.select([s], [], [], max(left, 0))
            if not r:
                break
            try:
                data = s.recv(1 << 16)
            except ConnectionRefusedError:  # an ICMP port unreachable came back
                continue
            if data[:8] == seq.to_bytes(8, "big"):
                got = True
                break
        if got:
            replies += 1
            rtts.append(time.monotonic() - t_send)
        if seq == 0:
            _emit("replied", local=local, ok=got)
            if a.step:
                _wait_stdin(deadline, "the remaining requests")
        elif a.interval:
            time.sleep(max(t_send + a.interval - time.monotonic(), 0))
        if time.monotonic() > deadline:
            raise _Fail(f"requests not finished within {a.timeout}s")
    avg = sum(rtts) / len(rtts) * 1000 if rtts else None
    _emit("result", sent=a.count, replies=replies, lost=a.count - replies, local=local,
          rtt_ms_avg=None if avg is None else round(avg, 3))


# --- control socket ----------------------------------------------------------


def _parse_req(text: str) -> dict:
    cmd, sep, raw = text.partition("=")
    args = json.loads(raw) if sep else {}
    if not isinstance(args, dict):
        raise _Fail(f"arguments of {cmd!r} must be a JSON object")
    return {"cmd": cmd, "args": args}


def cmd_ctl(a: argparse.Namespace) -> None:
    reqs = [_parse_req(r) for r in a.requests]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(a.timeout)
    try:
        s.connect(a.socket)
    except OSError as exc:
        raise _Fail(f"cannot reach daemon at {a.socket}: {exc.strerror or exc}") from None
    buf = bytearray()
    out = []
    with s:
        # Pipelined: all requests first, then the answers in order.
        s.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
        while len(out) < len(reqs):
            nl = buf.find(b"\n")
            if nl < 0:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise _Fail("daemon closed the control connection")
                buf += chunk
                continue
            out.append(json.loads(bytes(buf[:nl])))
            del buf[: nl + 1]
    _emit("result", responses=out)


# --- entry -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctxdp.lab.traffic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, timeout: float = 60.0) -> None:
        sp.add_argument("--timeout", type=float, default=timeout, help="overall deadline (s)")

    r = sub.add_parser("tcp-recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--family", type=int, choices=(4, 6), default=4)
    r.add_argument("--bind")
    r.add_argument("--progress", type=float, default=0.0,
                   help="emit a progress event every this many seconds (0: never)")
    r.add_argument("--allow-reset", action="store_true",
                   help="a reset by the peer ends the transfer with a result, not an error")
    common(r)
    t = sub.add_parser("tcp-send")
    t.add_argument("--dst", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--bytes", type=int, required=True)
    t.add_argument("--rate-mbps", type=float, default=0.0, help="pace to this rate (0: flat out)")
    t.add_argument("--step", action="store_true", help="wait for stdin before sending and closing")
    t.add_argument("--close", choices=("fin", "rst"), default="fin",
                   help="end with a FIN (close) or a RST (SO_LINGER 0 close)")
    common(t)
    e = sub.add_parser("udp-echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--family", type=int, choices=(4, 6), default=4)
    e.add_argument("--bind")
    e.add_argument("--idle-exit", type=float, default=5.0, help="exit after this long idle")
    common(e)
    q = sub.add_parser("udp-req")
    q.add_argument("--dst", required=True)
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--count", type=int, default=10)
    q.add_argument("--interval", type=float, default=0.1)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--sport", type=int, default=0)
    q.add_argument("--reply-timeout", type=float, default=1.0)
    q.add_argument("--step", action="store_true", help="wait for stdin after the first reply")
    common(q)
    c = sub.add_parser("ctl")
    c.add_argument("--socket", required=True)
    c.add_argument("requests", nargs="+", metavar="CMD[=JSONARGS]")
    common(c, 30.0)
    return p


_COMMANDS = {
    "tcp-recv": cmd_tcp_recv,
    "tcp-send": cmd_tcp_send,
    "udp-echo": cmd_udp_echo,
    "udp-req": cmd_udp_req,
    "ctl": cmd_ctl,
}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        _COMMANDS[a.cmd](a)
    except (_Fail, OSError, ValueError) as exc:
        _emit("error", error=" ".join(str(exc).split()) or type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        _emit("error", error="interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
