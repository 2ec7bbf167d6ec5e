"""Preconditions for privileged tests: one place that says why a test skips.

Contract: ``require_root()`` / ``require_bcc()`` call ``pytest.skip`` with a
reason; the conftest hook turns that skip into a failure under CI.
"""

from __future__ import annotations

import os

import pytest


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def require_bcc():
    require_root()
    try:
        import bcc  # noqa: PLC0415 - the import itself is the precondition
    except ImportError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"bcc not importable: {exc}")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("bpffs not mounted on /sys/fs/bpf")
    return bcc
