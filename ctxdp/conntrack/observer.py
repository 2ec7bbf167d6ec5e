"""Observer hooks: how other modules (the offload manager) follow connections.

Contract:
- Subclass ``CtObserver`` and override any of ``on_created``,
  ``on_established``, ``on_state_change``, ``on_update`` and ``on_deleted``;
  register with ``ConnTracker.add_observer``. Hooks run synchronously inside
  the tracker call that caused them, in registration order.
- ``on_update`` runs for every packet matched to an existing connection
  (not for the packet that created it, nor for related ICMP errors), after
  the state hooks for that packet, and only for observers that override it,
  so the per-packet path pays nothing when nobody listens.
- ``on_established`` fires once per connection, the first time it reaches
  its protocol's established state; ``on_state_change`` fires on every
  protocol state change with the old and new state names.
- ``on_deleted(conn, now, reason)``: reason is ``expired``, ``flush``,
  ``reopen`` (TCP port reuse), or whatever the caller of ``delete`` gave.
- A hook that raises is logged and counted (``stats.observer_errors``); the
  tracker carries on and the other observers still run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ctxdp.conntrack.conn import Conn
    from ctxdp.packet import Packet

__all__ = ["CtObserver", "overrides"]


class CtObserver:
    """No-op base: override the hooks you need."""

    def on_created(self, conn: Conn, now: float) -> None:
        """A connection was committed."""

    def on_established(self, conn: Conn, now: float) -> None:
        """The connection reached its established state for the first time."""

    def on_state_change(self, conn: Conn, old: str, new: str, now: float) -> None:
        """The protocol state changed from ``old`` to ``new``."""

    def on_update(self, conn: Conn, pkt: Packet, reply: bool, now: float) -> None:
        """A packet of an existing connection was processed (valid, not related)."""

    def on_deleted(self, conn: Conn, now: float, reason: str) -> None:
        """The connection left the table."""


def overrides(obs: CtObserver, hook: str) -> bool:
    """True if ``obs``'s class overrides ``hook`` (so it must be dispatched)."""
    return getattr(type(obs), hook, None) is not getattr(CtObserver, hook)
