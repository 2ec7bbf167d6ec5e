"""The ctxdp lab: hosts, topologies, real traffic and scenarios, for tests and the demo.

Contract: ``ctxdp.lab.hosts`` (the ``Host`` protocol, ``Lab``),
``ctxdp.lab.netns`` (namespaces on this machine, ``NetnsLab``),
``ctxdp.lab.traffic`` (the stdlib-only agent every host runs) and
``ctxdp.lab.scenarios`` (functions taking a ``Lab``). This package module
imports nothing itself: ``python3 -m ctxdp.lab.traffic`` must stay cheap
and dependency-free on any host.
"""

__all__: list[str] = []
