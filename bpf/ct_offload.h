/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* ct_offload.h — the ONE definition of the maps shared by the XDP program
 * (bpf/ct_offload.c) and userspace (ctxdp/providers/xdp.py).
 *
 * Contract:
 *  - Structs are laid out with explicit padding so that every field is
 *    naturally aligned and the compiler adds no padding of its own (checked
 *    by the _Static_asserts below). They are deliberately NOT
 *    __attribute__((packed)): packed makes clang load every multi-byte field
 *    byte by byte on the fast path and forbids native atomic adds on the
 *    counters. Every pad byte is zero when userspace writes it (hash keys
 *    compare all bytes).
 *  - Byte order is stated per field: "be" fields are network order exactly as
 *    on the wire, everything else is host order.
 *  - Python never redefines these layouts by hand without a test that checks
 *    its mirror against the ctypes types bcc derives from this header
 *    (tests/bpf/test_layout.py).
 *  - CT_MAX_CONNS may be overridden at compile time (-DCT_MAX_CONNS=N); the
 *    flow map holds two entries (one per direction) per connection.
 */
#ifndef CTXDP_CT_OFFLOAD_H
#define CTXDP_CT_OFFLOAD_H

#ifndef CT_MAX_CONNS
#define CT_MAX_CONNS 65536
#endif
#define CT_MAX_FLOWS (2 * CT_MAX_CONNS)
#define CT_MAX_PORTS 256

/* ct_flow_key.family */
enum ct_family {
	CT_FAMILY_V4 = 4,
	CT_FAMILY_V6 = 6,
};

/* ct_flow_val.flags */
enum ct_flow_flags {
	CT_F_SNAT     = 1 << 0, /* rewrite source address/port to nat_src/nat_sport */
	CT_F_DNAT     = 1 << 1, /* rewrite destination address/port to nat_dst/nat_dport */
	CT_F_TEARDOWN = 1 << 8, /* set by XDP when it punted a FIN/RST: userspace must tear down */
};

/* Index into the per-CPU ct_stats array. */
enum ct_stat {
	CT_STAT_HIT = 0,        /* forwarded by the fast path */
	CT_STAT_MISS,           /* parsed fine, no flow entry: XDP_PASS */
	CT_STAT_PUNT_FIN_RST,   /* TCP FIN or RST on an offloaded flow */
	CT_STAT_PUNT_TTL,       /* TTL / hop limit <= 1 */
	CT_STAT_PUNT_MTU,       /* larger than the egress MTU */
	CT_STAT_PUNT_IPOPT,     /* IPv4 header with options */
	CT_STAT_PUNT_FRAG,      /* IPv4 or IPv6 fragment */
	CT_STAT_PUNT_V6EXT,     /* IPv6 extension header */
	CT_STAT_PUNT_UNKNOWN,   /* not understood: non-IP, bad header, other L4 */
	CT_STAT_REDIRECT_ERR,   /* bpf_redirect_map failed (egress port not in devmap) */
	CT_STAT_MAX,
};

/* Lookup key: one entry per direction of an offloaded connection, exactly as
 * the packet looks when it arrives on ifindex. 44 bytes. */
struct ct_flow_key {
	__u32 ifindex;   /* host order: ingress interface index */
	__u8  family;    /* enum ct_family */
	__u8  proto;     /* IPPROTO_TCP / UDP / ICMP / ICMPV6 */
	__u16 pad;       /* zero */
	__be16 sport;    /* network order: L4 source port; ICMP echo: identifier */
	__be16 dport;    /* network order: L4 destination port; ICMP echo: identifier */
	__be32 src[4];   /* network order: source address; IPv4 uses src[0], rest zero */
	__be32 dst[4];   /* network order: destination address; IPv4 uses dst[0], rest zero */
};

/* What to do with a packet that matched. 96 bytes. The counters are updated
 * with atomic adds so that they are exact when several CPUs hit one entry.
 *
 * Checksum deltas: with 16-bit one's-complement arithmetic, userspace sums
 * (~w & 0xffff) + w' over every 16-bit word w -> w' the rewrite changes,
 * taking words as the CPU loads them from the packet (native order), and
 * folds the sum to 16 bits. The program then sets csum' = ~fold(~csum + S)
 * on the checksum field as loaded (RFC 1624 eqn. 3, no byte swaps; see
 * csum.h). l3_csum_delta = IPv4 address words + the TTL decrement (constant:
 * TTL <= 1 punts, so it never wraps). l4_csum_delta = pseudo-header address
 * words + port words (TCP/UDP), the echo id only (ICMPv4), or pseudo-header
 * addresses + echo id (ICMPv6). A zero IPv4 UDP checksum stays zero. Only
 * rewrites enabled by CT_F_SNAT / CT_F_DNAT enter the deltas. ICMP echo has
 * one id: it becomes nat_sport under CT_F_SNAT, else nat_dport. */
struct ct_flow_val {
	__u32 flags;        /* host order: enum ct_flow_flags */
	__u32 out_ifindex;  /* host order: egress interface index (devmap key) */
	__u8  smac[6];      /* new Ethernet source: the egress port's MAC */
	__u8  dmac[6];      /* new Ethernet destination: the next hop's MAC */
	__u16 mtu;          /* host order: egress MTU (IP datagram bytes); larger packets punt */
	__u16 pad0;         /* zero */
	__be32 nat_src[4];  /* network order: new source address when CT_F_SNAT */
	__be32 nat_dst[4];  /* network order: new destination address when CT_F_DNAT */
	__be16 nat_sport;   /* network order: new source port / echo id when CT_F_SNAT */
	__be16 nat_dport;   /* network order: new destination port / echo id when CT_F_DNAT */
	__u32 l3_csum_delta;/* folded one's-complement sum S for the IPv4 header checksum
			     * (NAT addresses + the TTL decrement); 0 for IPv6 */
	__u32 l4_csum_delta;/* folded one's-complement sum S for the TCP/UDP/ICMP(v6)
			     * checksum (pseudo-header addresses + ports / echo id) */
	__u32 slot;         /* host order: index of this connection in ct_last_used */
	__u64 packets;      /* host order: packets forwarded in this direction (atomic) */
	__u64 bytes;        /* host order: bytes (from the Ethernet header) forwarded (atomic) */
	__u64 last_used;    /* host order: bpf_ktime_get_coarse_ns() of the latest hit */
};

_Static_assert(sizeof(struct ct_flow_key) == 44, "ct_flow_key layout");
_Static_assert(sizeof(struct ct_flow_val) == 96, "ct_flow_val layout");
_Static_assert(__builtin_offsetof(struct ct_flow_val, packets) == 72, "ct_flow_val layout");

#endif /* CTXDP_CT_OFFLOAD_H */
