/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* xdp_pass.c — the floor for bench/xdp_cost.py: the cost of entering an XDP
 * program through BPF_PROG_RUN and returning XDP_PASS, with no parsing. */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
