"""Compatibility shim: the namespace topologies now live in ``ctxdp.lab.netns``.

Contract: re-exports the public names the integration tests used from here
(``Netns``, ``Topology``, ``RouterTopology``, ``pump``, ...) unchanged, and
keeps ``topology_fixture(**kw)``, the one pytest-specific helper: it turns
``RouterTopology(**kw)`` into a function-scoped fixture that skips without
root and asserts on teardown that none of its namespaces survived. The code
moved into the package because ``ctxdp demo`` ships in it and cannot import
from tests/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ctxdp.lab.netns import (
    Child,
    ChildCtl,
    ChildError,
    Netns,
    RouterPort,
    RouterTopology,
    Topology,
    leftover_namespaces,
    pump,
    run,
)
from tests.privileged import require_root

__all__ = [
    "Child",
    "ChildCtl",
    "ChildError",
    "Netns",
    "RouterPort",
    "RouterTopology",
    "Topology",
    "leftover_namespaces",
    "pump",
    "run",
    "topology_fixture",
]


def topology_fixture(**kw: Any) -> Callable[..., Iterator[RouterTopology]]:
    """A function-scoped pytest fixture yielding a built ``RouterTopology``."""

    @pytest.fixture
    def _fixture() -> Iterator[RouterTopology]:
        require_root()
        topo = RouterTopology(**kw)
        with topo:
            yield topo
        assert leftover_namespaces(topo.names) == [], "namespaces left behind"

    return _fixture
