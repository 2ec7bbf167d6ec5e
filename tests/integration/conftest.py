"""Fixtures for the real-traffic integration tests: namespace labs with the daemon.

Contract:
- ``netns_lab``: a built ``NetnsLab`` (no daemon), function-scoped.
- ``running_lab``: a ``NetnsLab`` with ctxdp running (``LAB_TIMEOUTS`` so
  aging happens within seconds), module-scoped so one bcc compile serves
  every scenario of a test module. A scenario that changes the config or
  stops the daemon must restore it (``lab.start_daemon(lab_config(lab))``).
- Both skip without root/bcc/bpffs (failures under CTXDP_REQUIRE_PRIVILEGED=1)
  and assert on teardown, which runs even when a test failed, that the lab
  left nothing behind (namespaces, pins, work directory, processes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from ctxdp.lab.scenarios import QUICK_TIMEOUTS
from tests.privileged import require_bcc

#: Short conntrack timeouts: aging and TCP close visible within seconds.
LAB_TIMEOUTS = QUICK_TIMEOUTS


def lab_config(lab: Any, **kw: Any) -> dict[str, Any]:
    """The integration suite's default daemon config for ``lab``."""
    kw.setdefault("timeouts", LAB_TIMEOUTS)
    return lab.config(**kw)


@contextlib.contextmanager
def _lab() -> Iterator[Any]:
    require_bcc()
    from ctxdp.lab.netns import NetnsLab

    lab = NetnsLab()
    try:
        with lab:
            yield lab
    finally:
        assert lab.leftovers() == [], f"lab {lab.uid} left behind: {lab.leftovers()}"


@pytest.fixture
def netns_lab() -> Iterator[Any]:
    with _lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def running_lab() -> Iterator[Any]:
    with _lab() as lab:
        lab.start_daemon(lab_config(lab))
        yield lab
