/* SPDX-License-Identifier: GPL-2.0 */
/* ct_offload.c — the XDP fast path of ctxdp's connection-tracking offload.
 *
 * Contract: for every frame on a port this program is attached to,
 *  - it parses Ethernet (no VLAN), IPv4 / IPv6 and TCP / UDP / ICMP(v6) echo;
 *  - it PUNTS (XDP_PASS + its own per-CPU counter, packet untouched):
 *      * before any lookup, anything it cannot build a reliable key for:
 *        IPv4 options (IHL > 5), fragments (IPv4 MF/offset, IPv6 fragment
 *        header), IPv6 extension headers, and "unknown": non-IP (ARP, VLAN
 *        tags, ...), malformed or truncated headers, other L4 protocols,
 *        ICMP other than echo, IPv6 UDP with a zero checksum;
 *      * on a hit: TCP FIN or RST (and flags the entry, and the reverse
 *        direction's entry if it is keyed on the egress port, with
 *        CT_F_TEARDOWN so userspace tears the connection down), TTL / hop
 *        limit <= 1, an IP datagram longer than the entry's egress MTU;
 *  - it looks IPv4 up in ct_flows4 and IPv6 in ct_flows6;
 *  - on a MISS it passes the frame untouched (counter "miss");
 *  - on a HIT it reserves the egress (devmap redirect, or XDP_TX when the
 *    egress port is the ingress port) BEFORE touching the packet, so that a
 *    missing devmap port passes the frame unmodified (counter redirect_err);
 *    then it applies SNAT/DNAT with precomputed checksum deltas, rewrites
 *    both MACs, decrements TTL / hop limit, adds to this CPU's counter slot
 *    of the entry, stamps last_used in the entry and in ct_last_used[slot]
 *    when the coarse clock moved since the entry's previous stamp, and
 *    returns XDP_REDIRECT / XDP_TX (counter "hit").
 * Exactly one ct_stats counter is bumped per frame.
 *
 * Build knobs (bcc cflags):
 *   -I<dir of this file>        required: the local headers
 *   -DCT_MAX_CONNS=N            connections (each flow map holds 2N entries)
 *   -DCT_NR_CPUS=N -DCT_CNT_SLOTS=M   per-CPU counter slots (ct_offload.h;
 *        userspace passes ctxdp.providers.xdp_layout.cflags())
 *   -DCT_PIN_DIR=\"/sys/fs/bpf/ctxdp\"   declare every map pinned there:
 *        bcc adopts a map already pinned at <dir>/<name>, else creates and
 *        pins it (bcc does not compare type or sizes: the loader must).
 *   -DCT_TX_PORTS_PIN=\"path\"  adopt ct_tx_ports from this pin (default with
 *        CT_PIN_DIR: <dir>/ct_tx_ports). bcc 0.26 cannot declare a
 *        DEVMAP_HASH, so the loader creates one (bpf(2) MAP_CREATE), pins it
 *        here, then compiles; without any pin, ct_tx_ports is a plain DEVMAP
 *        array of CT_TX_PORTS_MAX slots indexed by ifindex.
 *   -DCT_FLOWS4_FLAGS=F         ct_flows4 map flags (default 0: preallocated,
 *        the fastest inserts, memory for 2N entries up front)
 *   -DCT_FLOWS6_FLAGS=F         ct_flows6 map flags (default 0: preallocated
 *        too. With BPF_F_NO_PREALLOC (1) an IPv4-mostly table would not pay
 *        for 2N IPv6 entries up front (~200 B each), but IPv6 forwarding over
 *        1000 flows cost ~6 ns more per frame: 155-160 vs 150-152 ns,
 *        0.69 vs 0.70-0.71 of the redirect ceiling in bench/e2e.py)
 *   -DCT_TEST_HOOKS             tests only: record each decision in ct_debug
 */
#include <uapi/linux/bpf.h>

#include "ct_offload.h"
#include "parsing.h"
#include "csum.h"

#ifndef CT_FLOWS4_FLAGS
#define CT_FLOWS4_FLAGS 0
#endif
#ifndef CT_FLOWS6_FLAGS
#define CT_FLOWS6_FLAGS 0
#endif
#ifndef CT_TX_PORTS_MAX
#define CT_TX_PORTS_MAX 65536
#endif

/* --- maps (their names are the userspace API) --------------------------- */

#ifdef CT_PIN_DIR
BPF_TABLE_PINNED("hash", struct ct_flow_key4, struct ct_flow_val, ct_flows4,
		 CT_MAX_FLOWS, CT_PIN_DIR "/ct_flows4", CT_FLOWS4_FLAGS);
BPF_TABLE_PINNED("hash", struct ct_flow_key, struct ct_flow_val, ct_flows6,
		 CT_MAX_FLOWS, CT_PIN_DIR "/ct_flows6", CT_FLOWS6_FLAGS);
BPF_TABLE_PINNED("array", u32, u64, ct_last_used, CT_MAX_CONNS,
		 CT_PIN_DIR "/ct_last_used", BPF_F_MMAPABLE);
BPF_TABLE_PINNED("percpu_array", u32, u64, ct_stats, CT_STAT_MAX,
		 CT_PIN_DIR "/ct_stats");
#ifndef CT_TX_PORTS_PIN
#define CT_TX_PORTS_PIN CT_PIN_DIR "/ct_tx_ports"
#endif
#else
BPF_F_TABLE("hash", struct ct_flow_key4, struct ct_flow_val, ct_flows4,
	    CT_MAX_FLOWS, CT_FLOWS4_FLAGS);
BPF_F_TABLE("hash", struct ct_flow_key, struct ct_flow_val, ct_flows6,
	    CT_MAX_FLOWS, CT_FLOWS6_FLAGS);
BPF_F_TABLE("array", u32, u64, ct_last_used, CT_MAX_CONNS, BPF_F_MMAPABLE);
BPF_TABLE("percpu_array", u32, u64, ct_stats, CT_STAT_MAX);
#endif

/* Egress ports: key ifindex, value ifindex. Declared by hand (not with
 * BPF_DEVMAP) so the section can carry a pin path. */
struct ct_tx_ports_table_t {
	u32 key;
	u32 leaf;
	u64 (*redirect_map)(int, int);
	u32 max_entries;
};
#ifdef CT_TX_PORTS_PIN
__attribute__((section("maps/devmap:" CT_TX_PORTS_PIN)))
#else
__attribute__((section("maps/devmap")))
#endif
struct ct_tx_ports_table_t ct_tx_ports = { .max_entries = CT_TX_PORTS_MAX };

#ifdef CT_TEST_HOOKS
/* The verdict of the latest run: BPF_PROG_RUN without live frames does not
 * expose where a redirect would have gone, so tests read it here. */
struct ct_debug {
	__u32 runs;     /* frames seen */
	__u32 action;   /* XDP_* returned */
	__u32 target;   /* redirect / XDP_TX ifindex, 0 when none */
	__u32 stat;     /* enum ct_stat bumped */
};
BPF_ARRAY(ct_debug, struct ct_debug, 1);
#endif

/* bcc 0.26's helper list lacks it; the helper itself exists since 5.11. */
static __u64 (*ct_ktime_coarse_ns)(void) = (void *)BPF_FUNC_ktime_get_coarse_ns;

/* --- helpers ------------------------------------------------------------- */

/* What parsing found; l3/l4 point into the packet, already bounds-checked. */
struct ct_pkt {
	void  *l3;
	void  *l4;
	__u32 ip_len;    /* IP datagram length (header + payload) */
	__u8  ttl;       /* TTL / hop limit */
	__u8  tcp_flags; /* TCP flag byte, 0 otherwise */
	__u8  proto;     /* L4 protocol */
};

#define CT_TCP_FIN 0x01
#define CT_TCP_RST 0x04
#define CT_PARSED  (-1)  /* parse_* result meaning "key built, look it up" */

static __always_inline int is_v6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_AH:
	case IPPROTO_DSTOPTS:
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
	case 253: /* experiments */
	case 254:
		return 1;
	}
	return 0;
}

/* L4 of either family: fill the key's ports (sport/dport point into the
 * family's key) and the TCP flags. Returns CT_PARSED or the ct_stat to punt
 * with. */
static __always_inline int parse_l4(struct hdr_cursor *nh, void *data_end, __u8 proto,
				    __u32 l4_len, int v6, __be16 *sport, __be16 *dport,
				    struct ct_pkt *pkt)
{
	pkt->proto = proto;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th;

		if (parse_tcphdr(nh, data_end, l4_len, &th) < 0)
			return CT_STAT_PUNT_UNKNOWN;
		*sport = th->source;
		*dport = th->dest;
		pkt->tcp_flags = ((__u8 *)th)[13];
		pkt->l4 = th;
		return CT_PARSED;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh;

		if (parse_udphdr(nh, data_end, l4_len, &uh) < 0)
			return CT_STAT_PUNT_UNKNOWN;
		if (v6 && !uh->check)	/* invalid on IPv6: not ours to fix */
			return CT_STAT_PUNT_UNKNOWN;
		*sport = uh->source;
		*dport = uh->dest;
		pkt->l4 = uh;
		return CT_PARSED;
	}
	if (proto == (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP)) {
		struct ct_icmp_echo *ic;
		int type = parse_icmp_echo(nh, data_end, l4_len, &ic);

		if (v6 ? (type != ICMPV6_ECHO_REQUEST && type != ICMPV6_ECHO_REPLY)
		       : (type != ICMP_ECHO && type != ICMP_ECHOREPLY))
			return CT_STAT_PUNT_UNKNOWN;	/* includes type == -1 */
		*sport = ic->id;
		*dport = ic->id;
		pkt->l4 = ic;
		return CT_PARSED;
	}
	return CT_STAT_PUNT_UNKNOWN;
}

static __always_inline int parse_v4(struct hdr_cursor *nh, void *data_end,
				    struct ct_flow_key4 *key, struct ct_pkt *pkt)
{
	struct iphdr *iph;
	int proto = parse_iphdr(nh, data_end, &iph);

	if (proto < 0)
		return CT_STAT_PUNT_UNKNOWN;
	if (iph->ihl != 5)
		return CT_STAT_PUNT_IPOPT;
	if (iph->frag_off & CT_HTONS(CT_IP_MF | CT_IP_OFFSET))
		return CT_STAT_PUNT_FRAG;
	pkt->l3 = iph;
	pkt->ip_len = CT_NTOHS(iph->tot_len);
	pkt->ttl = iph->ttl;
	key->proto = proto;
	key->src = iph->saddr;
	key->dst = iph->daddr;
	return parse_l4(nh, data_end, proto, pkt->ip_len - sizeof(*iph), 0,
			&key->sport, &key->dport, pkt);
}

static __always_inline int parse_v6(struct hdr_cursor *nh, void *data_end,
				    struct ct_flow_key *key, struct ct_pkt *pkt)
{
	struct ipv6hdr *ip6h;
	int proto = parse_ip6hdr(nh, data_end, &ip6h);

	if (proto < 0)
		return CT_STAT_PUNT_UNKNOWN;
	if (proto == IPPROTO_FRAGMENT)
		return CT_STAT_PUNT_FRAG;
	if (is_v6_ext(proto))
		return CT_STAT_PUNT_V6EXT;
	pkt->l3 = ip6h;
	pkt->ip_len = sizeof(*ip6h) + CT_NTOHS(ip6h->payload_len);
	pkt->ttl = ip6h->hop_limit;
	key->family = CT_FAMILY_V6;
	key->proto = proto;
	__builtin_memcpy(key->src, &ip6h->saddr, 16);
	__builtin_memcpy(key->dst, &ip6h->daddr, 16);
	return parse_l4(nh, data_end, proto, pkt->ip_len - sizeof(*ip6h), 1,
			&key->sport, &key->dport, pkt);
}

/* FIN/RST: best effort, flag the opposite direction's entry too. Its key is
 * the rewritten tuple (always complete in the value) reversed, arriving on
 * our egress port (symmetric routing); when that guess is wrong, userspace
 * still tears both down from the one flag. Only runs for FIN/RST, so the
 * extra lookup is off the hot path. Clobbers *key. */
static __always_inline void flag_reverse4(struct ct_flow_key4 *key, struct ct_flow_val *v)
{
	struct ct_flow_val *rv;

	key->ifindex = v->out_ifindex;
	key->src = v->nat_dst[0];
	key->dst = v->nat_src[0];
	key->sport = v->nat_dport;
	key->dport = v->nat_sport;
	rv = ct_flows4.lookup(key);
	if (rv)
		rv->flags |= CT_F_TEARDOWN;
}

static __always_inline void flag_reverse6(struct ct_flow_key *key, struct ct_flow_val *v)
{
	struct ct_flow_val *rv;

	key->ifindex = v->out_ifindex;
	__builtin_memcpy(key->src, v->nat_dst, 16);
	__builtin_memcpy(key->dst, v->nat_src, 16);
	key->sport = v->nat_dport;
	key->dport = v->nat_sport;
	rv = ct_flows6.lookup(key);
	if (rv)
		rv->flags |= CT_F_TEARDOWN;
}

/* L4 NAT: ports / echo id, then the checksum by the precomputed delta.
 * The bound is re-checked per protocol: the verifier cannot tie the l4
 * pointer's checked length to the protocol byte kept on the stack. */
static __always_inline void nat_l4(void *l4, void *data_end, __u8 proto,
				   struct ct_flow_val *v)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return;
		th->source = v->nat_sport;
		th->dest = v->nat_dport;
		th->check = csum_apply(th->check, v->l4_csum_delta);
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return;
		uh->source = v->nat_sport;
		uh->dest = v->nat_dport;
		uh->check = csum_apply_udp(uh->check, v->l4_csum_delta);
	} else {
		struct ct_icmp_echo *ic = l4;

		if ((void *)(ic + 1) > data_end)
			return;
		ic->id = v->nat_sport;
		ic->checksum = csum_apply(ic->checksum, v->l4_csum_delta);
	}
}

static __always_inline void rewrite_v4(struct ct_pkt *pkt, void *data_end,
				       struct ct_flow_val *v)
{
	struct iphdr *iph = pkt->l3;

	iph->ttl--;
	iph->check = csum_apply(iph->check, v->l3_csum_delta);
	if (v->flags & (CT_F_SNAT | CT_F_DNAT)) {
		iph->saddr = v->nat_src[0];
		iph->daddr = v->nat_dst[0];
		nat_l4(pkt->l4, data_end, pkt->proto, v);
	}
}

static __always_inline void rewrite_v6(struct ct_pkt *pkt, void *data_end,
				       struct ct_flow_val *v)
{
	struct ipv6hdr *ip6h = pkt->l3;

	ip6h->hop_limit--;
	if (v->flags & (CT_F_SNAT | CT_F_DNAT)) {
		__builtin_memcpy(&ip6h->saddr, v->nat_src, 16);
		__builtin_memcpy(&ip6h->daddr, v->nat_dst, 16);
		nat_l4(pkt->l4, data_end, pkt->proto, v);
	}
}

/* struct ethhdr is packed, so memcpy into it goes byte by byte (24 loads and
 * stores). Both MACs sit at even offsets in the frame and in the value, so
 * copy them as 16-bit words instead. */
static __always_inline void set_macs(struct ethhdr *eth, struct ct_flow_val *v)
{
	__u16 *d = (__u16 *)eth;
	__u16 *dm = (__u16 *)v->dmac;
	__u16 *sm = (__u16 *)v->smac;

	d[0] = dm[0];
	d[1] = dm[1];
	d[2] = dm[2];
	d[3] = sm[0];
	d[4] = sm[1];
	d[5] = sm[2];
}

/* This CPU's counter slot: no other CPU writes it, so plain adds are exact
 * (XDP runs with preemption off). CT_CNT_SHARED: CPUs share slots, so the
 * adds are atomic. bpf_get_smp_processor_id is inlined by the verifier. */
static __always_inline void count_hit(struct ct_flow_val *v, __u64 len)
{
	struct ct_flow_cnt *c = &v->cnt[bpf_get_smp_processor_id() & (CT_CNT_SLOTS - 1)];

#ifdef CT_CNT_SHARED
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, len);
#else
	c->packets += 1;
	c->bytes += len;
#endif
}

/* last_used in the entry and ct_last_used[slot]. The coarse clock moves once
 * per tick, so a busy flow rewrites both (cache lines other CPUs read) only
 * when it moved. The two directions share the slot; each writes it when its
 * own stamp moves, so the slot holds the latest stamp of either. */
static __always_inline void stamp(struct ct_flow_val *v)
{
	__u64 now = ct_ktime_coarse_ns(), *lu;
	__u32 slot;

	if (v->last_used == now)
		return;
	v->last_used = now;
	slot = v->slot;
	lu = ct_last_used.lookup(&slot);
	if (lu)
		*lu = now;
}

static __always_inline void ct_count(__u32 idx)
{
	u64 *c = ct_stats.lookup(&idx);

	if (c)
		*c += 1;	/* per-CPU slot: no atomics needed */
}

/* Everything after the lookup: miss, FIN/RST punt, the other punt checks
 * and forwarding. Inlined once per family with v6 a constant, so each copy
 * only touches the header whose bounds its own parser proved. The caller
 * has already flagged the reverse entry of a FIN/RST (its key type is the
 * family's). */
static __always_inline int ct_found(struct xdp_md *ctx, void *data, void *data_end,
				    struct ethhdr *eth, struct ct_pkt *pkt, struct ct_flow_val *v,
				    const int v6, int *stat, __u32 *target)
{
	__u32 out;
	int act;

	if (!v) {
		*stat = CT_STAT_MISS;
		return XDP_PASS;
	}
	if (pkt->tcp_flags & (CT_TCP_FIN | CT_TCP_RST)) {
		v->flags |= CT_F_TEARDOWN;
		*stat = CT_STAT_PUNT_FIN_RST;
		return XDP_PASS;
	}
	if (pkt->ttl <= 1) {
		*stat = CT_STAT_PUNT_TTL;
		return XDP_PASS;
	}
	if (pkt->ip_len > v->mtu) {
		*stat = CT_STAT_PUNT_MTU;
		return XDP_PASS;
	}

	/* Reserve the egress first: bpf_redirect_map only records the target
	 * (the redirect happens after we return), so a missing port can still
	 * hand the slow path an untouched frame. */
	out = v->out_ifindex;
	if (out == ctx->ingress_ifindex) {
		act = XDP_TX;
	} else {
		act = ct_tx_ports.redirect_map(out, XDP_PASS);
		if (act != XDP_REDIRECT) {
			*stat = CT_STAT_REDIRECT_ERR;
			return XDP_PASS;
		}
	}

	if (v6)
		rewrite_v6(pkt, data_end, v);
	else
		rewrite_v4(pkt, data_end, v);
	set_macs(eth, v);
	count_hit(v, (__u64)(data_end - data));
	stamp(v);

	*stat = CT_STAT_HIT;
	*target = out;
	return act;
}

static __always_inline int ct_v4(struct xdp_md *ctx, struct hdr_cursor *nh, void *data,
				 void *data_end, struct ethhdr *eth, int *stat, __u32 *target)
{
	struct ct_flow_key4 key = {};
	struct ct_pkt pkt = {};
	struct ct_flow_val *v;
	int r = parse_v4(nh, data_end, &key, &pkt);

	if (r != CT_PARSED) {
		*stat = r;
		return XDP_PASS;
	}
	key.ifindex = ctx->ingress_ifindex;
	v = ct_flows4.lookup(&key);
	if (v && (pkt.tcp_flags & (CT_TCP_FIN | CT_TCP_RST)))
		flag_reverse4(&key, v);
	return ct_found(ctx, data, data_end, eth, &pkt, v, 0, stat, target);
}

static __always_inline int ct_v6(struct xdp_md *ctx, struct hdr_cursor *nh, void *data,
				 void *data_end, struct ethhdr *eth, int *stat, __u32 *target)
{
	struct ct_flow_key key = {};
	struct ct_pkt pkt = {};
	struct ct_flow_val *v;
	int r = parse_v6(nh, data_end, &key, &pkt);

	if (r != CT_PARSED) {
		*stat = r;
		return XDP_PASS;
	}
	key.ifindex = ctx->ingress_ifindex;
	v = ct_flows6.lookup(&key);
	if (v && (pkt.tcp_flags & (CT_TCP_FIN | CT_TCP_RST)))
		flag_reverse6(&key, v);
	return ct_found(ctx, data, data_end, eth, &pkt, v, 1, stat, target);
}

/* Everything but the final count; *stat says which counter to bump and
 * *target where the frame goes. */
static __always_inline int ct_process(struct xdp_md *ctx, int *stat, __u32 *target)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	int r;

	r = parse_ethhdr(&nh, data_end, &eth);
	if (r == CT_HTONS(ETH_P_IP))
		return ct_v4(ctx, &nh, data, data_end, eth, stat, target);
	if (r == CT_HTONS(ETH_P_IPV6))
		return ct_v6(ctx, &nh, data, data_end, eth, stat, target);
	*stat = CT_STAT_PUNT_UNKNOWN;
	return XDP_PASS;
}

int ct_offload_xdp(struct xdp_md *ctx)
{
	int stat = CT_STAT_PUNT_UNKNOWN;
	__u32 target = 0;
	int act = ct_process(ctx, &stat, &target);

	ct_count(stat);
#ifdef CT_TEST_HOOKS
	{
		int zero = 0;
		struct ct_debug *dbg = ct_debug.lookup(&zero);

		if (dbg) {
			dbg->runs++;
			dbg->action = act;
			dbg->target = target;
			dbg->stat = stat;
		}
	}
#endif
	return act;
}
