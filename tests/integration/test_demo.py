"""`ctxdp demo` end to end: it passes, shows offload and aging, and leaves nothing behind."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from ctxdp.lab.netns import lab_leftovers
from tests.privileged import require_bcc

pytestmark = pytest.mark.privileged

DEMO = [sys.executable, "-m", "ctxdp.cli", "demo"]


_SYS_BPF = 321  # x86_64
_BPF_PROG_GET_FD_BY_ID = 13


def _prog_exists(prog_id: int) -> bool:
    """Whether the kernel still holds BPF program ``prog_id`` (BPF_PROG_GET_FD_BY_ID)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 3)(prog_id, 0, 0)  # prog_id, next_id, open_flags
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())
    return False


def _xdp_prog_ids(output: str) -> set[int]:
    ids = {int(m) for m in re.findall(r"\((?:native|generic) prog (\d+)\)", output)}
    assert ids, f"demo did not show its XDP attachments:\n{output}"
    return ids


def _uid(output: str) -> str:
    m = re.search(r"\(lab ([0-9a-f]{8})\)", output)
    assert m, f"demo did not name its lab:\n{output}"
    return m.group(1)


def _assert_nothing_left(output: str) -> None:
    # Only this run's own objects: colleagues' tests and benchmarks create
    # namespaces, pins and root-namespace XDP attachments concurrently.
    uid = _uid(output)
    assert lab_leftovers(uid) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert uid not in listed
    assert not [p for p in os.listdir("/sys/fs/bpf") if uid in p]
    # The XDP program the demo attached is gone: detached and unloaded.
    deadline = time.monotonic() + 5
    while (alive := {i for i in _xdp_prog_ids(output) if _prog_exists(i)}) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"XDP program(s) {alive} still loaded"


def test_demo_passes_shows_offload_and_aging_and_cleans_up() -> None:
    """`ctxdp demo` exits 0, prints the offload, fast-path counts and aging, leaves nothing."""
    require_bcc()
    proc = subprocess.run([*DEMO, "--mbytes", "4", "--udp-timeout", "2"], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OFFLOADED tcp" in out and "OFFLOADED udp" in out
    assert re.search(r"fast path: [\d,]+ -> / [\d,]+ <- packets", out), out
    assert "AGED OUT udp" in out
    assert "RESULT: PASS" in out and "nothing left behind" in out
    _assert_nothing_left(out)


def test_demo_interrupted_mid_transfer_cleans_up_and_fails() -> None:
    """SIGTERM while traffic runs: the demo tears everything down and exits non-zero."""
    require_bcc()
    proc = subprocess.Popen([*DEMO, "--mbytes", "40", "--rate-mbps", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"OFFLOADED tcp" not in out and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 1)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        assert b"OFFLOADED tcp" in out, out.decode()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode()
    assert proc.returncode == 1, text
    assert "RESULT: FAIL - interrupted" in text
    assert "nothing left behind" in text
    _assert_nothing_left(text)
