"""Kernel IP forwarding off in the router's namespace: no double forwarding.

Contract:
- ``disable_forwarding()`` turns IPv4 and IPv6 forwarding off for the
  network namespace of the calling process, checks that every forwarding
  switch really reads 0 afterwards, and returns the previous values for
  ``restore()``. If a switch cannot be written or does not stick it raises
  ``ForwardingError`` naming it; the daemon then refuses to start.
- ``forwarding_enabled()`` lists the switches that are on (global,
  default and per-interface); the daemon can call it every aging interval
  to notice an operator turning forwarding back on.
- ``root`` (default ``/proc/sys``) exists for tests only.

Why: the slow path receives packets through AF_PACKET taps, which get a
*copy*; the original skb continues into the kernel IP stack. Every packet
the XDP program passes (misses and punts) would therefore be forwarded
twice, once by us (with conntrack, NAT and policy) and once by the kernel
(without them, leaking un-NATed traffic past the firewall). With
forwarding off the kernel drops transit packets silently (IPv4
``ip_error`` and IPv6 ``ip6_forward`` only count them, no ICMP), while it
still answers ARP/ND and handles packets to its own addresses.

/proc/sys/net is per network namespace and resolves against the namespace
of the process that opens the file, so this acts on the namespace the
daemon runs in (``ip netns exec`` or ``setns``).

Side effect to know about: an IPv6 interface with forwarding off behaves as
a host and accepts router advertisements (``accept_ra=1``). Set
``accept_ra=0`` on the ports if RAs may appear on those links.
"""

from __future__ import annotations

import os

__all__ = [
    "FORWARDING_KEYS",
    "ForwardingError",
    "disable_forwarding",
    "forwarding_enabled",
    "read_sysctl",
    "restore",
    "write_sysctl",
]

PROC_SYS = "/proc/sys"

# The switches we write. Writing ip_forward also rewrites
# net.ipv4.conf.{all,default,<every device>}.forwarding, and writing
# net.ipv6.conf.all.forwarding propagates to default and every device.
FORWARDING_KEYS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


class ForwardingError(RuntimeError):
    """IP forwarding could not be turned off; the daemon must not start."""


def read_sysctl(key: str, root: str = PROC_SYS) -> str:
    with open(os.path.join(root, key)) as f:
        return f.read().strip()


def write_sysctl(key: str, value: str, root: str = PROC_SYS) -> None:
    with open(os.path.join(root, key), "w") as f:
        f.write(f"{value}\n")


def _ipv6_present(root: str) -> bool:
    # IPv6 may be compiled out or disabled; then there is nothing to forward.
    return os.path.isdir(os.path.join(root, "net/ipv6/conf/all"))


def forwarding_enabled(root: str = PROC_SYS) -> list[str]:
    """Every forwarding switch that is not 0 (dotted sysctl names)."""
    keys = ["net/ipv4/ip_forward"]
    families = ["ipv4"] + (["ipv6"] if _ipv6_present(root) else [])
    for fam in families:
        conf = os.path.join(root, "net", fam, "conf")
        try:
            devices = sorted(os.listdir(conf))
        except OSError:
            continue
        keys += [f"net/{fam}/conf/{dev}/forwarding" for dev in devices]
    on = []
    for key in keys:
        try:
            value = read_sysctl(key, root)
        except OSError:
            continue  # a device vanished between listdir and open
        if value != "0":
            on.append(key.replace("/", "."))
    return on


def disable_forwarding(root: str = PROC_SYS) -> dict[str, str]:
    """Turn forwarding off and verify; return {key: previous value}."""
    saved: dict[str, str] = {}
    for key in FORWARDING_KEYS:
        if key.startswith("net/ipv6/") and not _ipv6_present(root):
            continue
        dotted = key.replace("/", ".")
        try:
            saved[key] = read_sysctl(key, root)
            write_sysctl(key, "0", root)
        except OSError as exc:
            raise ForwardingError(
                f"cannot turn off {dotted}: {exc.strerror or exc}; refusing to run, "
                "the kernel would forward every packet a second time"
            ) from exc
    still_on = forwarding_enabled(root)
    if still_on:
        raise ForwardingError(
            "IP forwarding is still on after disabling it ("
            + ", ".join(still_on)
            + "); refusing to run, the kernel would forward every packet a second time"
        )
    return saved


def restore(saved: dict[str, str], root: str = PROC_SYS) -> None:
    """Write back what ``disable_forwarding`` returned (tests, clean shutdown)."""
    for key, value in saved.items():
        write_sysctl(key, value, root)
