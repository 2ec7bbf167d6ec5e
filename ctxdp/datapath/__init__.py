"""Kernel-facing building blocks of the slow path, one concern per module.

- ``netlink``: the rtnetlink event socket (``Netlink``) the daemon puts in its
  selector, plus the link (``LinkWatcher``) and local-address
  (``LocalAddrs``) caches.
- ``ports``: ``Port`` / ``PortSet``, AF_PACKET sockets on the router ports.
- ``routing``: ``Router``, cached kernel FIB lookups with change callbacks.
- ``neigh``: ``NeighTable``, cached kernel neighbour table, resolution and
  MAC-change callbacks.
- ``sysctl``: IP forwarding off (no double forwarding).

Everything here is single-threaded and non-blocking on the receive side:
components expose file descriptors and ``handle_events()`` /
``recv_burst()``; nothing starts a thread. Submodules are imported
explicitly (``from ctxdp.datapath.ports import Port``) so that importing one
does not drag in the others.
"""

__all__ = ["neigh", "netlink", "ports", "routing", "sysctl"]
