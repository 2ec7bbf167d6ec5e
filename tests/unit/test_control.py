"""ctxdp.control: JSON-lines control socket server and client (no root needed)."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from ctxdp.control import (
    ControlClient,
    ControlError,
    ControlServer,
    bool_arg,
    check_args,
    int_arg,
)


class Handler:
    """Echo/stat handler that records calls; a few commands misbehave on purpose."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def handle(self, cmd, args):
        self.calls.append((cmd, args))
        if cmd == "echo":
            return args
        if cmd == "big":
            return {"blob": "x" * args["n"]}
        if cmd == "bad":
            raise ControlError("zone must be an integer")
        if cmd == "crash":
            raise RuntimeError("boom")
        if cmd == "unjsonable":
            return {"s": {1, 2}}
        raise ControlError(f"unknown command {cmd!r}")


@pytest.fixture
def sockdir():
    # Short path: sun_path is limited to 108 bytes and pytest's tmp_path can be long.
    d = tempfile.mkdtemp(prefix="ctxdp-ctl-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir):
    h = Handler()
    srv = ControlServer(os.path.join(sockdir, "run", "ctxdp.sock"), h)
    srv.serve_in_thread()
    srv.test_handler = h
    yield srv
    srv.close()


def raw_exchange(path: str, data: bytes, lines: int, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes and read ``lines`` response lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(data)
        buf = b""
        while buf.count(b"\n") < lines:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return [json.loads(x) for x in buf.splitlines()]
    finally:
        s.close()


def test_call_roundtrip(server):
    """A call returns the handler's result and passes args through."""
    with ControlClient(server.path) as c:
        assert c.call("echo", zone=3, flag=True) == {"zone": 3, "flag": True}
        assert c.call("echo") == {}
    assert server.test_handler.calls[0] == ("echo", {"zone": 3, "flag": True})


def test_error_responses_keep_connection(server):
    """ControlError, unknown commands and handler crashes answer ok=false; the connection stays usable."""
    with ControlClient(server.path) as c:
        with pytest.raises(ControlError, match="zone must be an integer"):
            c.call("bad")
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            c.call("nope")
        with pytest.raises(ControlError, match="internal error: RuntimeError: boom"):
            c.call("crash")
        with pytest.raises(ControlError, match="not JSON-serialisable"):
            c.call("unjsonable")
        assert c.call("echo", ok=1) == {"ok": 1}


def test_malformed_requests_get_errors(server):
    """Bad JSON, non-objects and bad args each get an error line, in order, with ids echoed."""
    req = (
        b"{not json\n"
        b"[1,2]\n"
        b'{"cmd": 5}\n'
        b'{"cmd": "echo", "args": [1]}\n'
        b"\n"
        b'{"cmd": "echo", "args": {"a": 1}, "id": 7}\n'
        b"\xff\xfe\n"
    )
    out = raw_exchange(server.path, req, 6)
    assert [r["ok"] for r in out] == [False, False, False, False, True, False]
    assert out[0]["error"].startswith("malformed JSON")
    assert "string \"cmd\"" in out[1]["error"] and "string \"cmd\"" in out[2]["error"]
    assert out[3]["error"] == '"args" must be an object'
    assert out[4] == {"ok": True, "result": {"a": 1}, "id": 7}
    assert out[5]["error"].startswith("malformed JSON")


def test_oversized_line_is_refused_and_server_survives(sockdir):
    """A line over the limit gets an error and that connection is closed; others still work."""
    path = os.path.join(sockdir, "s.sock")
    with ControlServer(path, Handler(), max_request=1024) as srv:
        srv.serve_in_thread()
        out = raw_exchange(path, b"x" * 2000, 1)
        assert out == [{"ok": False, "error": "request too long (limit 1024 bytes)"}]
        complete = json.dumps({"cmd": "echo", "args": {"p": "y" * 1500}}).encode() + b"\n"
        out = raw_exchange(path, complete, 1)
        assert out[0]["ok"] is False and "too long" in out[0]["error"]
        assert ControlClient(path).call("echo", v=1) == {"v": 1}


def test_large_response_survives_partial_writes(server):
    """A multi-megabyte result arrives intact through non-blocking partial sends."""
    n = 8 * 1024 * 1024
    with ControlClient(server.path) as c:
        assert len(c.call("big", n=n)["blob"]) == n
        assert c.call("echo", after=True) == {"after": True}


def test_socket_and_dir_permissions_ignore_umask(sockdir):
    """Socket is 0600 and a created parent dir 0700 even under umask 0."""
    path = os.path.join(sockdir, "new", "ctl.sock")
    old = os.umask(0)
    try:
        srv = ControlServer(path, Handler()).start()
    finally:
        os.umask(old)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_stale_socket_is_replaced(sockdir):
    """A socket file nobody listens on is removed and the server starts."""
    path = os.path.join(sockdir, "s.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # file stays behind, like after a crash
    with ControlServer(path, Handler()) as srv:
        srv.serve_in_thread()
        assert ControlClient(path).call("echo", a=1) == {"a": 1}


def test_live_socket_is_not_replaced(server):
    """Starting a second server on a live socket fails and the first keeps serving."""
    with pytest.raises(ControlError, match="already listening"):
        ControlServer(server.path, Handler()).start()
    assert ControlClient(server.path).call("echo", still=1) == {"still": 1}


def test_non_socket_path_is_never_removed(sockdir):
    """A regular file at the socket path is left alone and start() refuses."""
    path = os.path.join(sockdir, "notasock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, Handler()).start()
    with open(path) as f:
        assert f.read() == "precious"


def test_close_leaves_a_replacement_socket(sockdir):
    """close() only unlinks the socket it bound, not one that replaced it."""
    path = os.path.join(sockdir, "s.sock")
    srv = ControlServer(path, Handler()).start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    try:
        srv.close()
        assert os.path.exists(path)
    finally:
        other.close()


def test_selector_integration_single_thread(sockdir):
    """Registered in a caller's selector, the server answers from the caller's loop."""
    path = os.path.join(sockdir, "s.sock")
    srv = ControlServer(path, Handler()).start()
    sel = selectors.DefaultSelector()
    srv.register(sel)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cli.connect(path)
        cli.setblocking(False)
        cli.sendall(b'{"cmd":"echo","args":{"n":1}}\n{"cmd":"echo","args":{"n":2}}\n')
        buf = b""
        deadline = time.monotonic() + 5
        while buf.count(b"\n") < 2 and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                key.data()
            try:
                buf += cli.recv(65536)
            except BlockingIOError:
                pass
        assert [json.loads(x)["result"] for x in buf.splitlines()] == [{"n": 1}, {"n": 2}]
    finally:
        cli.close()
        srv.unregister(sel)
        sel.close()
        srv.close()


def test_client_reports_unreachable_daemon(sockdir):
    """No server: the client raises OSError (the CLI turns it into exit 1)."""
    with pytest.raises(OSError):
        ControlClient(os.path.join(sockdir, "absent.sock")).call("stats")


def test_client_sees_hangup_as_connection_error(sockdir):
    """A server that closes without answering gives ConnectionError, not a hang."""
    path = os.path.join(sockdir, "mute.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    try:
        c = ControlClient(path, timeout=5)
        c._connect()
        conn, _ = lst.accept()
        conn.close()
        with pytest.raises(ConnectionError):
            c.call("stats")
    finally:
        lst.close()


def test_refused_client_reads_the_reason(sockdir):
    """A connection the server refuses reports the server's reason, not a broken pipe."""
    path = os.path.join(sockdir, "full.sock")
    h = Handler()
    with ControlServer(path, h, max_clients=0) as srv:
        srv.serve_in_thread()
        with pytest.raises(ControlError, match="too many control connections"):
            ControlClient(path).call("echo")
    assert h.calls == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_other_users_are_refused(server):
    """An unprivileged uid can neither open the 0600 socket nor pass the peer-credential check."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX); \n"
        "try:\n s.connect(sys.argv[1])\nexcept PermissionError: print('EACCES'); sys.exit()\n"
        "print(s.recv(4096).decode().strip())\n"
    )

    def as_nobody():
        return subprocess.run(
            [sys.executable, "-c", probe, server.path], user=65534, capture_output=True,
            text=True, timeout=20, cwd="/",
        ).stdout.strip()

    assert as_nobody() == "EACCES"
    parent = os.path.dirname(server.path)
    os.chmod(parent, 0o755)
    os.chmod(os.path.dirname(parent), 0o755)
    os.chmod(server.path, 0o666)  # defeat the file mode: the peer check must still refuse
    assert json.loads(as_nobody()) == {"ok": False, "error": "permission denied"}
    assert server.stats["rejected"] == 1
    assert server.test_handler.calls == []


def test_argument_helpers():
    """Handler argument helpers accept good values and reject bad ones in one line."""
    assert int_arg({"zone": 3}, "zone", 0, 65535) == 3
    assert int_arg({}, "zone", 0, 65535) is None and int_arg({"zone": None}, "zone", 0, 9, 7) == 7
    for bad in ("3", True, -1, 70000, 1.5):
        with pytest.raises(ControlError, match="zone: expected an integer 0..65535"):
            int_arg({"zone": bad}, "zone", 0, 65535)
    assert bool_arg({"enabled": False}, "enabled") is False
    with pytest.raises(ControlError, match='enabled: expected true or false, got "yes"'):
        bool_arg({"enabled": "yes"}, "enabled")
    check_args("flush", {"zone": 1}, ("zone",))
    with pytest.raises(ControlError, match=r"flush: unknown argument\(s\) zon \(takes: zone\)"):
        check_args("flush", {"zon": 1}, ("zone",))
