"""Offload providers: targets that accept offloaded connections.

``base`` defines the interface; ``dummy`` is the in-memory reference with
fault injection; ``xdp`` writes the BPF maps of ``bpf/ct_offload.c`` (bcc).
"""
