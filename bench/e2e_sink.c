/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* e2e_sink.c — the XDP counting sink of bench/e2e.py (bench only).
 *
 * Contract: attached to the sink host's veth. A frame that is IPv4 or IPv6
 * carrying UDP to port e2e_sink_cfg.dport (the generator's traffic) is
 * counted in a per-CPU counter and dropped. With e2e_sink_cfg.all_ip set,
 * every IPv4/IPv6 frame is counted and dropped (used while the setup-rate
 * bench floods synthetic SYNs nobody should answer). Everything else (ARP,
 * neighbour discovery, the bench's own control traffic) is XDP_PASS, so the
 * router can still resolve the sink's MAC. Truncated headers pass.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/udp.h>

struct e2e_sink_cfg {
	__u16 dport;            /* host order: UDP port of the generator's traffic */
	__u8 all_ip;            /* 1: count and drop every IPv4/IPv6 frame */
	__u8 pad;
};

struct e2e_sink_count {
	__u64 pkts;
	__u64 bytes;
};

BPF_ARRAY(e2e_sink_cfg_map, struct e2e_sink_cfg, 1);
BPF_PERCPU_ARRAY(e2e_sink_count_map, struct e2e_sink_count, 1);

/* Cursor contract: returns the L4 protocol with *l4 set past the IP header,
 * or -1 when the frame is not IPv4/IPv6 with a complete fixed header. */
static __always_inline int e2e_parse(void *data, void *end, void **l4)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return -1;
		*l4 = (void *)ip + ip->ihl * 4;
		return ip->protocol;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		*l4 = ip6 + 1;
		return ip6->nexthdr;
	}
	return -1;
}

int e2e_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct e2e_sink_count *c;
	struct e2e_sink_cfg *cfg;
	struct udphdr *udp;
	void *l4 = 0;
	__u32 zero = 0;
	int proto;

	cfg = e2e_sink_cfg_map.lookup(&zero);
	if (!cfg)
		return XDP_PASS;
	proto = e2e_parse(data, end, &l4);
	if (proto < 0)
		return XDP_PASS;
	if (!cfg->all_ip) {
		if (proto != IPPROTO_UDP)
			return XDP_PASS;
		udp = l4;
		if ((void *)(udp + 1) > end || udp->dest != bpf_htons(cfg->dport))
			return XDP_PASS;
	}
	c = e2e_sink_count_map.lookup(&zero);
	if (c) {
		c->pkts++;
		c->bytes += end - data;
	}
	return XDP_DROP;
}
