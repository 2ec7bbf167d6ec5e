/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* e2e_redirect.c — router-side programs of bench/e2e.py that are not ctxdp
 * (bench only; compiled by bcc at run time).
 *
 *  e2e_redirect: the ceiling. Redirects EVERY frame to the one egress port in
 *    e2e_tx (a DEVMAP, as ct_offload uses a devmap, so both get the same
 *    bulked transmit) after rewriting both MACs from e2e_fwd_cfg. No parsing,
 *    no lookup, no TTL, no NAT: the least a forwarder can do.
 *  e2e_pass: XDP_PASS. Attached to the router's ingress port for the systems
 *    that forward in the kernel or in Open vSwitch, because frames redirected
 *    into a veth are dropped unless its peer has an XDP program (or GRO).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

struct e2e_fwd_cfg {
	__u8 smac[6];           /* egress port's MAC */
	__u8 dmac[6];           /* next hop's MAC */
};

BPF_ARRAY(e2e_fwd_cfg_map, struct e2e_fwd_cfg, 1);
BPF_DEVMAP(e2e_tx, 1);      /* slot 0: the egress port */

int e2e_redirect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct e2e_fwd_cfg *cfg;
	__u32 zero = 0;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	cfg = e2e_fwd_cfg_map.lookup(&zero);
	if (!cfg)
		return XDP_DROP;
	__builtin_memcpy(eth->h_source, cfg->smac, 6);
	__builtin_memcpy(eth->h_dest, cfg->dmac, 6);
	return e2e_tx.redirect_map(0, 0);
}

int e2e_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
