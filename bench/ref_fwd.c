/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* ref_fwd.c — the minimal reference forwarder bench/xdp_cost.py compares the
 * ct_offload fast path against (issue 4: "5-tuple hash lookup, MAC rewrite,
 * counter, redirect").
 *
 * Contract: IPv4 TCP/UDP only, no NAT, no TTL, no punts, no last-used. Parse
 * Ethernet + IPv4 + ports with bounds checks, look the 5-tuple up in a hash
 * map, on a hit rewrite both MACs, count the packet exactly (even with
 * several CPUs on one entry) and redirect through a devmap; everything else
 * is XDP_PASS. It is deliberately the least a forwarder can do, done the
 * cheapest way ct_offload knows for each step (MACs copied as 16-bit words,
 * the counter in a per-CPU slot of the value: see ct_offload.h), so the
 * ratio ct_offload/ref_fwd is the price of conntrack offload features and
 * never of a handicapped reference.
 *
 * Build knobs:
 *   Key shape, because the hash of a wider key costs real time:
 *   default          struct ref_key: the classic compact 5-tuple, 16 bytes
 *                    (addresses, ports, protocol) — THE reference of the bar;
 *   -DREF_KEY_CT4    struct ct_flow_key4 from bpf/ct_offload.h: the key
 *                    ct_offload looks IPv4 up with (adds the ingress ifindex);
 *   -DREF_KEY_WIDE   struct ct_flow_key from bpf/ct_offload.h: the 44-byte
 *                    family-generic key (ct_offload's IPv6 key).
 *   -DREF_ATOMIC     one counter shared by all CPUs with an atomic add
 *                    instead of per-CPU slots (what exact counters cost the
 *                    classic way).
 * Every build needs -I<repo>/bpf and xdp_layout.cflags() (ct_offload.h
 * sizes the counter slots). Only the knob differs between the builds, so
 * the steps between them are the price of the key or counter alone.
 *
 * Its egress map is the same kind ct_offload uses (a DEVMAP_HASH keyed by
 * ifindex, which bcc 0.26 cannot declare: the bench creates it, pins it and
 * passes -DREF_TX_PIN="path"), so the comparison is about conntrack
 * features, not map types. Without REF_TX_PIN it falls back to a DEVMAP.
 * Compiled by bcc at run time (bench only; never loaded by the daemon).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "ct_offload.h"

#if defined(REF_KEY_CT4)
typedef struct ct_flow_key4 ref_key_t;
#elif defined(REF_KEY_WIDE)
typedef struct ct_flow_key ref_key_t;
#else
struct ref_key {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u32 proto;     /* u8 value, widened so the key has no padding */
};
typedef struct ref_key ref_key_t;
#endif

struct ref_val {
	__u32 out_ifindex;
	__u8 smac[6];
	__u8 dmac[6];
	__u64 packets[CT_CNT_SLOTS];  /* per-CPU slots, like ct_flow_val.cnt */
};

BPF_HASH(ref_flows, ref_key_t, struct ref_val, 1024);
#ifdef REF_TX_PIN
struct ref_tx_ports_table_t {
	u32 key;
	u32 leaf;
	u64 (*redirect_map)(int, int);
	u32 max_entries;
};
__attribute__((section("maps/devmap:" REF_TX_PIN)))
struct ref_tx_ports_table_t ref_tx_ports = { .max_entries = 256 };
#else
BPF_DEVMAP(ref_tx_ports, 256);  /* keyed by egress ifindex (< 256 here) */
#endif

/* Cursor contract: returns the L4 protocol with *iph pointing at the IPv4
 * header, or -1 when the frame is not a well-formed option-less IPv4 packet. */
static __always_inline int ref_parse_v4(void *data, void *end, struct iphdr **iph)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	*iph = (void *)(eth + 1);
	if ((void *)(*iph + 1) > end || (*iph)->ihl != 5)
		return -1;
	return (*iph)->protocol;
}

int ref_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	ref_key_t k = {};
	struct ref_val *v;
	struct iphdr *iph;
	__be16 *ports;
	__u16 *d, *dm, *sm;
	int proto;

	proto = ref_parse_v4(data, end, &iph);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return XDP_PASS;
	ports = (void *)(iph + 1);
	if ((void *)(ports + 2) > end)
		return XDP_PASS;
#if defined(REF_KEY_CT4)
	k.ifindex = ctx->ingress_ifindex;
	k.src = iph->saddr;
	k.dst = iph->daddr;
#elif defined(REF_KEY_WIDE)
	k.ifindex = ctx->ingress_ifindex;
	k.family = CT_FAMILY_V4;
	k.src[0] = iph->saddr;
	k.dst[0] = iph->daddr;
#else
	k.src = iph->saddr;
	k.dst = iph->daddr;
#endif
	k.sport = ports[0];
	k.dport = ports[1];
	k.proto = proto;
	v = ref_flows.lookup(&k);
	if (!v)
		return XDP_PASS;
	/* Both MACs sit at even offsets in the frame and in the value. */
	d = data;
	dm = (__u16 *)v->dmac;
	sm = (__u16 *)v->smac;
	d[0] = dm[0];
	d[1] = dm[1];
	d[2] = dm[2];
	d[3] = sm[0];
	d[4] = sm[1];
	d[5] = sm[2];
#if defined(REF_ATOMIC)
	__sync_fetch_and_add(&v->packets[0], 1);
#elif defined(CT_CNT_SHARED)
	__sync_fetch_and_add(&v->packets[bpf_get_smp_processor_id() & (CT_CNT_SLOTS - 1)], 1);
#else
	v->packets[bpf_get_smp_processor_id() & (CT_CNT_SLOTS - 1)] += 1;
#endif
	return ref_tx_ports.redirect_map(v->out_ifindex, 0);
}
