/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* ct_offload.h — the ONE definition of the maps shared by the XDP program
 * (bpf/ct_offload.c) and userspace (ctxdp/providers/xdp.py).
 *
 * Contract:
 *  - Structs are laid out with explicit padding so that every field is
 *    naturally aligned and the compiler adds no padding of its own (checked
 *    by the _Static_asserts below). They are deliberately NOT
 *    __attribute__((packed)): packed makes clang load every multi-byte field
 *    byte by byte on the fast path. Every pad byte is zero when userspace
 *    writes it (hash keys compare all bytes).
 *  - Byte order is stated per field: "be" fields are network order exactly as
 *    on the wire, everything else is host order.
 *  - Python never redefines these layouts by hand without a test that checks
 *    its mirror against the ctypes types bcc derives from this header
 *    (tests/bpf/test_layout.py).
 *  - Two flow maps, one per family: ct_flows4 (struct ct_flow_key4, 20
 *    bytes) and ct_flows6 (struct ct_flow_key, 44 bytes); both hold struct
 *    ct_flow_val. Every lookup hashes and compares the whole key, and a
 *    44-byte key costs an IPv4 hit about 13 ns more than a 20-byte one.
 *  - CT_MAX_CONNS may be overridden at compile time (-DCT_MAX_CONNS=N); each
 *    flow map holds up to two entries (one per direction) per connection.
 *  - CT_NR_CPUS (the kernel's possible CPU count) and CT_CNT_SLOTS (a power
 *    of two) size the per-CPU counters inside every flow value; userspace
 *    passes both (ctxdp.providers.xdp_layout.cflags()). Without them a build
 *    has one counter slot shared by all CPUs with atomic adds.
 */
#ifndef CTXDP_CT_OFFLOAD_H
#define CTXDP_CT_OFFLOAD_H

#ifndef CT_MAX_CONNS
#define CT_MAX_CONNS 65536
#endif
#define CT_MAX_FLOWS (2 * CT_MAX_CONNS)
#define CT_MAX_PORTS 256

#ifndef CT_CNT_SLOTS
#define CT_CNT_SLOTS 1
#endif
_Static_assert((CT_CNT_SLOTS & (CT_CNT_SLOTS - 1)) == 0, "CT_CNT_SLOTS is a power of two");
/* CT_CNT_SHARED: some CPUs share a counter slot, so adds must be atomic. */
#if !defined(CT_NR_CPUS) || CT_NR_CPUS > CT_CNT_SLOTS
#define CT_CNT_SHARED 1
#endif

/* ct_flow_key.family */
enum ct_family {
	CT_FAMILY_V4 = 4,
	CT_FAMILY_V6 = 6,
};

/* ct_flow_val.flags */
enum ct_flow_flags {
	CT_F_SNAT     = 1 << 0, /* source address/port change (to nat_src/nat_sport) */
	CT_F_DNAT     = 1 << 1, /* destination address/port change (to nat_dst/nat_dport) */
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

/* IPv4 lookup key (map ct_flows4): one entry per direction of an offloaded
 * connection, exactly as the packet looks when it arrives on ifindex.
 * 20 bytes; addresses and ports in the order the headers carry them. */
struct ct_flow_key4 {
	__u32  ifindex;  /* host order: ingress interface index */
	__be32 src;      /* network order: source address */
	__be32 dst;      /* network order: destination address */
	__be16 sport;    /* network order: L4 source port; ICMP echo: identifier */
	__be16 dport;    /* network order: L4 destination port; ICMP echo: identifier */
	__u8   proto;    /* IPPROTO_TCP / UDP / ICMP */
	__u8   pad[3];   /* zero */
};

/* Family-generic lookup key; the key of map ct_flows6 (family 6, full
 * 16-byte addresses). 44 bytes. */
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

/* One CPU's share of an entry's counters. */
struct ct_flow_cnt {
	__u64 packets;   /* host order: packets forwarded in this direction */
	__u64 bytes;     /* host order: bytes (from the Ethernet header) forwarded */
};

/* What to do with a packet that matched. 80 + 16 * CT_CNT_SLOTS bytes.
 *
 * Rewrite: nat_src/nat_dst/nat_sport/nat_dport always hold the whole tuple
 * the packet leaves with (fields NAT does not change are copies of the
 * key's), so the program writes them without a branch per field whenever
 * CT_F_SNAT or CT_F_DNAT is set. ICMP echo: the identifier leaves as
 * nat_sport (== nat_dport).
 *
 * Counters: exact when several CPUs hit one entry, without atomics. CPU c
 * adds to cnt[c & (CT_CNT_SLOTS - 1)] only; userspace sums the slots. A
 * locked add cost ~4-5 ns on the hit path here (two per packet), a per-CPU
 * slot nothing measurable, and unlike a PERCPU_HASH only the counters (not the
 * whole value) are replicated per CPU. With more CPUs than slots
 * (CT_CNT_SHARED) CPUs share slots and the adds become atomic: still exact,
 * with memory bounded by the slot count.
 *
 * Checksum deltas: with 16-bit one's-complement arithmetic, userspace sums
 * (~w & 0xffff) + w' over every 16-bit word w -> w' the rewrite changes,
 * taking words as the CPU loads them from the packet (native order), and
 * folds the sum to 16 bits. The program then sets csum' = ~fold(~csum + S)
 * on the checksum field as loaded (RFC 1624 eqn. 3, no byte swaps; see
 * csum.h). l3_csum_delta = IPv4 address words + the TTL decrement (constant:
 * TTL <= 1 punts, so it never wraps). l4_csum_delta = pseudo-header address
 * words + port words (TCP/UDP), the echo id only (ICMPv4), or pseudo-header
 * addresses + echo id (ICMPv6). A zero IPv4 UDP checksum stays zero. */
struct ct_flow_val {
	__u32 flags;        /* host order: enum ct_flow_flags */
	__u32 out_ifindex;  /* host order: egress interface index (devmap key) */
	__u8  smac[6];      /* new Ethernet source: the egress port's MAC */
	__u8  dmac[6];      /* new Ethernet destination: the next hop's MAC */
	__u16 mtu;          /* host order: egress MTU (IP datagram bytes); larger packets punt */
	__u16 pad0;         /* zero */
	__be32 nat_src[4];  /* network order: source address the packet leaves with
			     * (IPv4 uses nat_src[0], rest zero) */
	__be32 nat_dst[4];  /* network order: destination address it leaves with */
	__be16 nat_sport;   /* network order: source port / echo id it leaves with */
	__be16 nat_dport;   /* network order: destination port / echo id it leaves with */
	__u32 l3_csum_delta;/* folded one's-complement sum S for the IPv4 header checksum
			     * (NAT addresses + the TTL decrement); 0 for IPv6 */
	__u32 l4_csum_delta;/* folded one's-complement sum S for the TCP/UDP/ICMP(v6)
			     * checksum (pseudo-header addresses + ports / echo id) */
	__u32 slot;         /* host order: index of this connection in ct_last_used */
	__u64 last_used;    /* host order: bpf_ktime_get_coarse_ns() of the latest hit */
	struct ct_flow_cnt cnt[CT_CNT_SLOTS]; /* per-CPU counters (see above) */
};

_Static_assert(sizeof(struct ct_flow_key4) == 20, "ct_flow_key4 layout");
_Static_assert(sizeof(struct ct_flow_key) == 44, "ct_flow_key layout");
_Static_assert(__builtin_offsetof(struct ct_flow_val, cnt) == 80, "ct_flow_val layout");
_Static_assert(sizeof(struct ct_flow_val) == 80 + 16 * CT_CNT_SLOTS, "ct_flow_val layout");

#endif /* CTXDP_CT_OFFLOAD_H */
