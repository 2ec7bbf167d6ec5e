/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* e2e_gen.c — the in-kernel traffic generator of bench/e2e.py (never loaded
 * by the daemon; compiled by bcc at run time).
 *
 * Contract: run with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES on the
 * generator host's veth. Every run
 *  - takes the next flow index i (per-CPU round robin over e2e_gen_cfg.nflows),
 *  - copies template i (the first E2E_HDR bytes of flow i's frame: Ethernet,
 *    IP and UDP headers with correct checksums, then zero payload) over the
 *    start of the frame,
 *  - counts the frame and returns XDP_TX, which live-frame mode turns into a
 *    redirect out of the ingress veth, i.e. into the router's port.
 * Why rewrite every run: live-frame pages are recycled without being reset,
 * so whatever the router did to a frame in place (TTL, NAT, MACs) would
 * otherwise come back in later frames. Frames shorter than E2E_HDR are
 * aborted (userspace never sends them). The payload after E2E_HDR is never
 * written by anyone on the path, so it stays zero and the precomputed UDP
 * checksums stay valid.
 */
#include <uapi/linux/bpf.h>

#define E2E_HDR 64          /* >= Ethernet + IPv6 + UDP (62) */
#define E2E_MAX_FLOWS 4096

struct e2e_tmpl {
	__u8 b[E2E_HDR];
};

struct e2e_gen_cfg {
	__u32 nflows;           /* 1..E2E_MAX_FLOWS */
};

struct e2e_gen_state {
	__u32 next;             /* next flow index on this CPU */
	__u32 pad;
	__u64 sent;             /* frames handed to XDP_TX on this CPU */
};

BPF_ARRAY(e2e_tmpl_map, struct e2e_tmpl, E2E_MAX_FLOWS);
BPF_ARRAY(e2e_gen_cfg_map, struct e2e_gen_cfg, 1);
BPF_PERCPU_ARRAY(e2e_gen_state_map, struct e2e_gen_state, 1);

/* The next flow index on this CPU; advances the round robin. */
static __always_inline __u32 e2e_next_flow(struct e2e_gen_state *st, __u32 nflows)
{
	__u32 i = st->next;

	if (i >= nflows)
		i = 0;
	st->next = i + 1;
	return i;
}

int e2e_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct e2e_gen_state *st;
	struct e2e_gen_cfg *cfg;
	struct e2e_tmpl *t;
	__u32 zero = 0, i;

	if (data + E2E_HDR > end)
		return XDP_ABORTED;
	cfg = e2e_gen_cfg_map.lookup(&zero);
	st = e2e_gen_state_map.lookup(&zero);
	if (!cfg || !st)
		return XDP_ABORTED;
	i = e2e_next_flow(st, cfg->nflows);
	t = e2e_tmpl_map.lookup(&i);
	if (!t)
		return XDP_ABORTED;
	__builtin_memcpy(data, t->b, E2E_HDR);
	st->sent++;
	return XDP_TX;
}
