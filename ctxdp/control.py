"""Control socket: JSON lines over a root-only Unix stream socket.

Contract:
- Protocol: one request per line, ``{"cmd": "<name>", "args": {...}}`` (args
  optional; an ``"id"`` member, if present, is echoed back). One response
  line per request, in order: ``{"ok": true, "result": <json>}`` or
  ``{"ok": false, "error": "<one line>"}``. Empty lines are ignored.
- ``ControlServer(path, handler)``: ``handler.handle(cmd, args) -> Any``
  returns a JSON-able result or raises ``ControlError`` (bad request,
  unknown command: the message is sent to the client). Any other exception
  is logged and answered as ``internal error: ...``. Malformed JSON, a
  non-object request, oversized lines (``max_request`` bytes without a
  newline: answered, then that connection is closed because the stream
  cannot be resynchronised) and a result that is not JSON-serialisable all
  get an error response; none of them stops the server.
- Non-blocking and single-threaded: the server owns an epoll selector whose
  fd is ``fileno()`` (an epoll fd polls readable when any of its sockets is
  ready), so the daemon registers the server as ONE object in its own
  ``selectors`` loop (``register(sel)``, then call ``key.data()`` -- i.e.
  ``handle_events()`` -- when it is ready). The handler therefore runs in the
  daemon's loop thread and needs no locks. ``serve_in_thread()`` runs the
  same loop in a background thread for tests and tools.
- Security, because this socket can flush tables and rewrite policy: the
  socket file is created mode 0600 (bound under umask 0177, then chmod'ed,
  so it is never briefly world-accessible), its parent directory is created
  0700 if missing, and each peer's SO_PEERCRED uid must be 0 or the
  server's own euid.
- A stale socket file is replaced only when connecting to it is refused
  (nobody listening); a live server, or a path that is not a socket, makes
  ``start()`` raise ``ControlError``. ``close()`` unlinks the file only if it
  is still the one this server bound.
- ``check_args`` / ``int_arg`` / ``bool_arg`` validate request arguments in
  a handler and raise ``ControlError`` with a one-line message.
- ``ControlClient(path).call(cmd, **args)`` returns the result, raises
  ``ControlError`` for an error response and ``OSError`` when the daemon
  cannot be reached or hangs up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
from typing import Any, Protocol

__all__ = [
    "MAX_REQUEST",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "Handler",
    "bool_arg",
    "check_args",
    "int_arg",
]

log = logging.getLogger("ctxdp.control")

MAX_REQUEST = 1 << 20  # bytes in one request line; requests are small commands
MAX_CLIENTS = 64
_RECV = 65536
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class ControlError(Exception):
    """A request failed; the message is what the client sees (one line)."""


class Handler(Protocol):
    def handle(self, cmd: str, args: dict[str, Any]) -> Any: ...


def check_args(cmd: str, args: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Reject argument names a command does not take (typos must not be ignored)."""
    extra = sorted(set(args) - set(allowed))
    if extra:
        want = ", ".join(allowed) or "none"
        raise ControlError(f"{cmd}: unknown argument(s) {', '.join(extra)} (takes: {want})")


def int_arg(args: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None):
    """``args[name]`` as an int in ``lo..hi``, or ``default`` when absent/null."""
    v = args.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ControlError(f"{name}: expected an integer {lo}..{hi}, got {json.dumps(v)}")
    return v


def bool_arg(args: dict[str, Any], name: str, default: bool | None = None):
    """``args[name]`` as a bool, or ``default`` when absent/null."""
    v = args.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ControlError(f"{name}: expected true or false, got {json.dumps(v)}")
    return v


def _one_line(s: str) -> str:
    return " ".join(str(s).split()) or "error"


class _Client:
    __slots__ = ("sock", "inbuf", "outbuf", "closing", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False  # close once outbuf is flushed
        self.events = selectors.EVENT_READ


class ControlServer:
    """Non-blocking JSON-lines server; see the module docstring."""

    def __init__(
        self, path: str, handler: Handler, *, max_request: int = MAX_REQUEST,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_request = max_request
        self.max_clients = max_clients
        self._sel = selectors.EpollSelector()
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._ino: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.stats = {"requests": 0, "errors": 0, "clients": 0, "rejected": 0}

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> ControlServer:
        """Bind and listen; raises ``ControlError`` / ``OSError`` on failure."""
        _prepare_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The mode is set by the umask at bind time; 0177 leaves 0600, so
            # there is no window where another user could connect.
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._ino = (st.st_dev, st.st_ino)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, None)
        log.info("control socket listening", extra={"ctx": {"path": self.path}})
        return self

    def fileno(self) -> int:
        """The epoll fd: readable whenever any control socket needs service."""
        return self._sel.fileno()

    def register(self, selector: selectors.BaseSelector, data: Any = None) -> None:
        """Register in the caller's selector; ``data`` defaults to ``handle_events``."""
        selector.register(self, selectors.EVENT_READ, data or self.handle_events)

    def unregister(self, selector: selectors.BaseSelector) -> None:
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(self)

    def serve_in_thread(self) -> threading.Thread:
        """Run ``handle_events`` in a daemon thread until ``close()``."""
        if self._listener is None:
            self.start()

        def loop() -> None:
            while not self._stop.is_set():
                self.handle_events(0.05)

        t = threading.Thread(target=loop, name="ctxdp-control", daemon=True)
        self._thread = t
        t.start()
        return t

    def close(self) -> None:
        """Stop serving, close every connection and remove our socket file."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in list(self._clients):
            self._drop(fd)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
        self._sel.close()

    def __enter__(self) -> ControlServer:
        return self if self._listener is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- event loop -------------------------------------------------------------

    def handle_events(self, timeout: float | None = 0.0) -> int:
        """Service every ready socket once; returns the number of events handled."""
        try:
            events = self._sel.select(timeout)
        except (OSError, ValueError):  # closed under us (thread mode shutdown)
            return 0
        for key, mask in events:
            if key.fileobj is self._listener:
                self._accept()
                continue
            fd = key.fd
            if mask & selectors.EVENT_READ and fd in self._clients:
                self._read(fd)
            if mask & selectors.EVENT_WRITE and fd in self._clients:
                self._flush(fd)
        return len(events)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(16):  # bounded burst; level-triggered epoll brings us back
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE etc.: keep serving the others
                log.warning("control accept failed: %s", e)
                return
            sock.setblocking(False)
            err = self._refuse_reason(sock)
            if err:
                self.stats["rejected"] += 1
                with contextlib.suppress(OSError):
                    sock.send(_encode_error(err))
                sock.close()
                continue
            c = _Client(sock)
            self._clients[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, None)
            self.stats["clients"] += 1

    def _refuse_reason(self, sock: socket.socket) -> str:
        if len(self._clients) >= self.max_clients:
            return "too many control connections"
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _pid, uid, _gid = _UCRED.unpack(cred)
        except OSError as e:
            return f"cannot read peer credentials: {e.strerror}"
        if uid not in (0, os.geteuid()):
            log.warning("control connection refused", extra={"ctx": {"uid": uid}})
            return "permission denied"
        return ""

    def _read(self, fd: int) -> None:
        c = self._clients[fd]
        try:
            data = c.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:  # peer finished sending; answer what is complete, then close
            c.closing = True
            if not c.outbuf:
                self._drop(fd)
            else:
                self._flush(fd)  # stops watching EVENT_READ: EOF would stay readable
            return
        if c.closing:  # after an oversized line we only drain until the reply is out
            return
        c.inbuf += data
        oversized = False
        while True:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                oversized = len(c.inbuf) > self.max_request
                break
            if nl > self.max_request:
                oversized = True
                break
            line = bytes(c.inbuf[:nl])
            del c.inbuf[: nl + 1]
            if line.strip():
                c.outbuf += self._dispatch(line)
        if oversized:
            self.stats["errors"] += 1
            c.outbuf += _encode_error(f"request too long (limit {self.max_request} bytes)")
            c.inbuf.clear()
            c.closing = True
        if c.outbuf:
            self._flush(fd)

    def _flush(self, fd: int) -> None:
        c = self._clients[fd]
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # peer went away (EPIPE, ECONNRESET)
                self._drop(fd)
                return
            del c.outbuf[:n]
        if not c.outbuf and c.closing:
            self._drop(fd)
            return
        want = (0 if c.closing else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if c.outbuf else 0
        )
        if want != c.events:
            c.events = want
            self._sel.modify(c.sock, want, None)

    def _drop(self, fd: int) -> None:
        c = self._clients.pop(fd, None)
        if c is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(c.sock)
        c.sock.close()

    # -- requests ---------------------------------------------------------------

    def _dispatch(self, line: bytes) -> bytes:
        self.stats["requests"] += 1
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            self.stats["errors"] += 1
            return _encode_error(f"malformed JSON: {e}")
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            self.stats["errors"] += 1
            return _encode_error('request must be an object with a string "cmd"', rid)
        args = req.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            self.stats["errors"] += 1
            return _encode_error('"args" must be an object', rid)
        cmd = req["cmd"]
        try:
            result = self.handler.handle(cmd, args)
        except ControlError as e:
            self.stats["errors"] += 1
            return _encode_error(str(e), rid)
        except Exception as e:  # noqa: BLE001 - a handler bug must not kill the daemon
            self.stats["errors"] += 1
            log.exception("control command failed", extra={"ctx": {"cmd": cmd[:64]}})
            return _encode_error(f"internal error: {type(e).__name__}: {e}", rid)
        resp: dict[str, Any] = {"ok": True, "result": result}
        if rid is not None:
            resp["id"] = rid
        try:
            return json.dumps(resp, separators=(",", ":")).encode() + b"\n"
        except (TypeError, ValueError) as e:
            self.stats["errors"] += 1
            log.error("control result not JSON-serialisable", extra={"ctx": {"cmd": cmd[:64]}})
            return _encode_error(f"internal error: result not JSON-serialisable: {e}", rid)


def _encode_error(msg: str, rid: Any = None) -> bytes:
    resp: dict[str, Any] = {"ok": False, "error": _one_line(msg)}
    if rid is not None:
        resp["id"] = rid
    try:
        return json.dumps(resp, separators=(",", ":")).encode() + b"\n"
    except (TypeError, ValueError):  # an unencodable id
        return json.dumps({"ok": False, "error": _one_line(msg)}).encode() + b"\n"


def _prepare_path(path: str) -> None:
    """Create the parent directory (0700) and remove a stale socket file."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # makedirs' mode is filtered by the umask
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody is listening: a crashed daemon left it behind.
        log.info("removing stale control socket", extra={"ctx": {"path": path}})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise ControlError(f"cannot probe existing socket {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise ControlError(f"another ctxdp daemon is already listening on {path}")


class ControlClient:
    """Blocking client; one connection, reused across calls."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except BaseException:
                s.close()
                raise
            self._sock = s
        return self._sock

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return the raw response object."""
        sock = self._connect()
        line = json.dumps({"cmd": cmd, "args": args or {}}, separators=(",", ":")).encode()
        try:
            try:
                sock.sendall(line + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                # The server may have refused us (permissions, too many
                # clients) and hung up before reading: its reason is queued.
                sock.settimeout(min(self.timeout or 1.0, 1.0))
            while b"\n" not in self._buf:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("daemon closed the connection")
                self._buf += chunk
        except BaseException:
            self.close()
            raise
        nl = self._buf.find(b"\n")
        raw = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        try:
            resp = json.loads(raw)
        except ValueError as e:
            self.close()
            raise ConnectionError(f"daemon sent malformed JSON: {e}") from None
        if not isinstance(resp, dict) or "ok" not in resp:
            raise ConnectionError("daemon sent a response without 'ok'")
        return resp

    def call(self, cmd: str, **args: Any) -> Any:
        """Run ``cmd`` and return its result; ``ControlError`` on an error response."""
        resp = self.request(cmd, args)
        if not resp["ok"]:
            raise ControlError(str(resp.get("error", "unknown error")))
        return resp.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
