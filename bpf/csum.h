/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* csum.h — incremental Internet checksum update with a precomputed delta.
 *
 * Contract: userspace (ctxdp/providers/xdp_layout.py) precomputes, per flow
 * entry, S = sum over every changed 16-bit word w -> w' of (~w + w'), in
 * one's-complement arithmetic, with words taken as the CPU loads them from
 * the packet and S folded to 16 bits. Then RFC 1624 eqn. 3 gives
 *     csum' = ~(~csum + S)      (one's-complement sum, end-around carry)
 * on the checksum field exactly as loaded — no byte swaps on the fast path,
 * and a single add however many words the NAT changes.
 */
#ifndef CTXDP_CSUM_H
#define CTXDP_CSUM_H

static __always_inline __u16 csum_apply(__u16 csum, __u32 delta)
{
	__u32 s = (__u16)~csum + delta;	/* <= 0xffff + 0xfffe */

	s = (s & 0xffff) + (s >> 16);	/* <= 0x10000 */
	s = (s & 0xffff) + (s >> 16);	/* <= 0xffff */
	return (__u16)~s;
}

/* UDP over IPv4: a zero checksum means "none" and stays zero; a computed
 * zero is sent as 0xffff (RFC 768). Either form of 0xffff is byte-order free. */
static __always_inline __u16 csum_apply_udp(__u16 csum, __u32 delta)
{
	__u16 c;

	if (!csum)
		return 0;
	c = csum_apply(csum, delta);
	return c ? c : 0xffff;
}

#endif /* CTXDP_CSUM_H */
