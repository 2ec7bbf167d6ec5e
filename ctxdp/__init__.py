"""ctxdp: connection tracking with an XDP fast path.

Public API lives in the submodules: ``ctxdp.packet`` (slow-path parsing and
rewrite helpers), ``ctxdp.conntrack`` (the pure userspace tracker),
``ctxdp.offload`` (provider registry, eligibility, batching) and
``ctxdp.providers`` (dummy and XDP providers).
"""

__version__ = "0.1.0"
