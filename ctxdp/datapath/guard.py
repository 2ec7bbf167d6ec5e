"""Kernel guard: stop the router's own IP stack answering packets the slow path owns.

Contract:
- ``KernelGuard(ports)`` manages one nftables table, ``inet ctxdp_guard``, in
  the network namespace of the calling process (the daemon's). ``install()``
  creates it, or atomically replaces a stale one a crashed run left behind,
  in ONE ``nft -f -`` transaction; ``remove()`` deletes it (False if it was
  not there); ``installed()`` and ``counters()`` (packets dropped per rule)
  read it back. Failures raise ``GuardError`` with nft's message.
- The table drops, on packets entering through a ctxdp port (``iifname``):
  TCP and UDP segments addressed to the router itself for which the kernel
  has NO socket (no listener, no connection, no TIME_WAIT). It also drops
  every ICMP/ICMPv6 destination-unreachable and ICMPv6 "unrecognised next
  header" the kernel itself sends out of a ctxdp port. The slow path's own
  ICMP errors are sent through AF_PACKET and never cross this hook. Everything else is untouched: ARP, ND, ping to
  the router, and TCP/UDP to the router's own services and connections
  (SSH, DHCP, its own outgoing connections) still reach the kernel.
- ``ruleset(ports)`` renders the script; port names that could break out of
  an nft string are refused (``GuardError``).

Why, at the kernel boundary. The daemon's AF_PACKET tap receives a *copy*
of every frame XDP passes: ``__netif_receive_skb_core`` delivers to
``ETH_P_ALL`` taps before tc ingress, the netfilter ``netdev`` ingress hook
and the IP layer, so whatever is dropped later, the slow path has its copy.
The original goes on into the IP stack. Transit packets die there quietly
because forwarding is off (``ip_error``/``ip6_forward`` send no ICMP when
forwarding is disabled). But packets addressed to one of the router's own
addresses are delivered locally: replies to masqueraded / SNAT-to-router
connections and DNAT port-forwards to the router's address. With no socket,
the kernel answers TCP with a RST and UDP with ICMP port unreachable, which
resets or confuses the very connection the slow path is forwarding (seen
in the lab: the client's transfer dies with ECONNRESET after the router
kernel RSTs the server's SYN-ACK). XDP hits never reach the stack, so only
misses and punts (handshake, FIN/RST, oversize) are at stake, which is
exactly where a RST hurts most.

Why the ``inet`` input hook with the ``socket`` expression, and not a drop
at ``netdev`` ingress or by port range: at ingress there is no routing
decision yet and no socket lookup, so the only ways to tell "ours" from
"the kernel's" there are a port range (masquerade keeps the client's
original port when free, so NAT ports overlap the kernel's own ephemeral
ports and the replies of the router's own connections would die) or a set
of NAT'd tuples the daemon updates for every new connection (a netlink
transaction on the packet path, racing the first reply). In the input hook
the kernel has already decided the packet is local, and ``socket`` asks the
same demultiplexer the kernel will use: "no socket" is precisely the case
in which it would answer with a RST or port unreachable. Non-TCP/UDP
protocols are left to the kernel (its own GRE, OSPF, VRRP, ICMP); for a NAT'd
flow of such a protocol the only kernel answer is "protocol unreachable",
which the output chain suppresses on ctxdp ports. IPv6 is less quiet than
IPv4 about transit: with forwarding off the kernel still answers a packet to
an address it has no route for with ICMPv6 "no route" (seen in the lab for
a DNAT on a routed public address), so the output chain drops the kernel's
destination-unreachable messages of both families on ctxdp ports: the
forwarder, not the kernel, speaks for transit traffic there.

Side effects an operator sees: a connection attempt to a closed TCP/UDP port
of the router through a ctxdp port is silently dropped rather than refused.
``accept_local`` stays 0 on purpose: it only decides whether the kernel
accepts packets with one of its own addresses as *source*; turning it on
would hand more packets to the stack, never fewer, and the slow path gets its
copy either way. The table survives the daemon when ``keep_on_restart`` keeps
XDP running (a FIN punted during the restart gap must not draw a RST); the
next start replaces it atomically.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable, Sequence

__all__ = ["GuardError", "KernelGuard", "TABLE", "ruleset"]

#: The guard's nftables table (family ``inet``): one per network namespace.
TABLE = "ctxdp_guard"

# (argv, stdin) -> (returncode, stdout, stderr); replaceable in tests.
Runner = Callable[[Sequence[str], str], tuple[int, str, str]]

_NFT_TIMEOUT = 10.0
_BAD_NAME_CHARS = frozenset('"\\\n\r\t ;{}#')


class GuardError(Exception):
    """The guard table could not be installed, read or removed."""


def _names(ports: Iterable[str]) -> str:
    names = list(dict.fromkeys(ports))
    if not names:
        raise GuardError("no ports to guard")
    for n in names:
        if not n or len(n) > 15 or any(c in _BAD_NAME_CHARS for c in n):
            raise GuardError(f"port name {n!r} cannot be used in an nft rule")
    return ", ".join(f'"{n}"' for n in names)


def ruleset(ports: Iterable[str], table: str = TABLE) -> str:
    """The nft script that creates ``inet <table>`` afresh (replacing any old one).

    The ``table``/``delete table``/``table {...}`` triple is one transaction:
    the first line makes the delete valid when nothing is there, and a
    reader never sees the namespace without a guard while it is replaced.
    """
    if not table.replace("_", "").isalnum():
        raise GuardError(f"bad table name {table!r}")
    ifs = _names(ports)
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
\tchain input {{
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tiifname != {{ {ifs} }} accept
\t\tmeta l4proto {{ tcp, udp }} socket transparent {{ 0, 1 }} accept
\t\tmeta l4proto tcp counter drop comment "no-socket-tcp"
\t\tmeta l4proto udp counter drop comment "no-socket-udp"
\t}}
\tchain output {{
\t\ttype filter hook output priority filter - 10; policy accept;
\t\toifname != {{ {ifs} }} accept
\t\ticmp type destination-unreachable counter drop comment "unreach"
\t\ticmpv6 type destination-unreachable counter drop comment "unreach6"
\t\ticmpv6 type parameter-problem icmpv6 code 1 counter drop comment "proto-unreach6"
\t}}
}}
"""


def _subprocess_runner(argv: Sequence[str], stdin: str) -> tuple[int, str, str]:
    try:
        p = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                           timeout=_NFT_TIMEOUT)
    except FileNotFoundError as exc:
        raise GuardError(f"{argv[0]} not found: install nftables") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuardError(f"{' '.join(argv)} timed out") from exc
    return p.returncode, p.stdout, p.stderr


class KernelGuard:
    """The ``inet ctxdp_guard`` table for a set of ports; see the module contract."""

    def __init__(self, ports: Iterable[str], *, table: str = TABLE, nft: str = "nft",
                 run: Runner | None = None) -> None:
        self.ports = tuple(ports)
        self.table = table
        self.nft = nft
        self._run = run or _subprocess_runner
        self._script = ruleset(self.ports, table)  # validate names now, not at install

    def _nft(self, args: Sequence[str], stdin: str = "") -> tuple[int, str, str]:
        return self._run([self.nft, *args], stdin)

    def install(self) -> None:
        """Create or atomically replace the table; GuardError on failure."""
        rc, _out, err = self._nft(["-f", "-"], self._script)
        if rc != 0:
            raise GuardError(f"installing nft table inet {self.table}: {err.strip() or rc}")

    def installed(self) -> bool:
        rc, _out, _err = self._nft(["list", "table", "inet", self.table])
        return rc == 0

    def remove(self) -> bool:
        """Delete the table; False if it was not there. GuardError on other failures."""
        rc, _out, err = self._nft(["delete", "table", "inet", self.table])
        if rc == 0:
            return True
        if "No such file" in err or not self.installed():
            return False
        raise GuardError(f"removing nft table inet {self.table}: {err.strip() or rc}")

    def counters(self) -> dict[str, int]:
        """Packets dropped so far per rule comment (``no-socket-tcp``, ...)."""
        rc, out, err = self._nft(["-j", "list", "table", "inet", self.table])
        if rc != 0:
            raise GuardError(f"reading nft table inet {self.table}: {err.strip() or rc}")
        try:
            items = json.loads(out).get("nftables", [])
        except ValueError as exc:
            raise GuardError(f"unreadable nft json: {exc}") from exc
        res: dict[str, int] = {}
        for it in items:
            rule = it.get("rule") if isinstance(it, dict) else None
            if not rule or "comment" not in rule:
                continue
            for e in rule.get("expr", []):
                if isinstance(e, dict) and "counter" in e:
                    res[rule["comment"]] = int(e["counter"].get("packets", 0))
        return res
