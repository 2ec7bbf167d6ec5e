/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* parsing.h — bounds-checked header parsers for the XDP fast path.
 *
 * Contract (every parse_* helper):
 *  - takes a cursor (struct hdr_cursor: the next unparsed byte) and data_end;
 *  - on success stores a pointer to the header in *hdr, advances the cursor
 *    past the header, and returns the NEXT header type (an ETH_P_* in network
 *    order for Ethernet, an IPPROTO_* for IP) or 0 for L4 headers;
 *  - on any malformation (truncated, impossible length field) returns -1 and
 *    leaves the cursor unspecified: the caller punts the packet as unknown.
 * Semantic checks that are *not* malformation (options, fragments, extension
 * headers) are left to the caller, which punts them with their own counter.
 * Every pointer is checked against data_end before it is read, so the
 * verifier accepts the program and bad input can never be read out of bounds.
 */
#ifndef CTXDP_PARSING_H
#define CTXDP_PARSING_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define CT_HTONS(x) ((__be16)__builtin_bswap16((__u16)(x)))
#define CT_NTOHS(x) ((__u16)__builtin_bswap16((__u16)(x)))
#else
#define CT_HTONS(x) ((__be16)(x))
#define CT_NTOHS(x) ((__u16)(x))
#endif

#define CT_IP_MF     0x2000
#define CT_IP_OFFSET 0x1fff

struct hdr_cursor {
	void *pos;
};

/* Ethernet without VLAN: returns h_proto (network order). A VLAN tag is
 * returned as its TPID, which the caller does not understand (punt). */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end,
					struct ethhdr **hdr)
{
	struct ethhdr *eth = nh->pos;

	if ((void *)(eth + 1) > data_end)
		return -1;
	nh->pos = eth + 1;
	*hdr = eth;
	return eth->h_proto;
}

/* IPv4: version 4, IHL >= 5, total length covering the header and fitting in
 * the frame (Ethernet padding after it is allowed). The cursor moves past the
 * header *including options*. Returns the protocol. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **hdr)
{
	struct iphdr *iph = nh->pos;
	__u32 hlen, tot;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != 4 || iph->ihl < 5)
		return -1;
	hlen = iph->ihl * 4;
	tot = CT_NTOHS(iph->tot_len);
	if (tot < hlen || (void *)iph + tot > data_end)
		return -1;
	nh->pos = (void *)iph + hlen;
	*hdr = iph;
	return iph->protocol;
}

/* IPv6 fixed header: version 6, payload length non-zero (no jumbograms) and
 * fitting in the frame. Returns nexthdr. */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
					struct ipv6hdr **hdr)
{
	struct ipv6hdr *ip6h = nh->pos;
	__u32 plen;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (ip6h->version != 6)
		return -1;
	plen = CT_NTOHS(ip6h->payload_len);
	if (plen == 0 || (void *)(ip6h + 1) + plen > data_end)
		return -1;
	nh->pos = ip6h + 1;
	*hdr = ip6h;
	return ip6h->nexthdr;
}

/* TCP: the fixed header and data offset >= 5 whose options fit in l4_len
 * (the L4 bytes the IP header claims). */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					__u32 l4_len, struct tcphdr **hdr)
{
	struct tcphdr *th = nh->pos;
	__u32 doff;

	if ((void *)(th + 1) > data_end)
		return -1;
	doff = th->doff * 4;
	if (doff < sizeof(*th) || doff > l4_len)
		return -1;
	nh->pos = (void *)th + doff;
	*hdr = th;
	return 0;
}

/* UDP: the header, and a length field within [8, l4_len]. */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end,
					__u32 l4_len, struct udphdr **hdr)
{
	struct udphdr *uh = nh->pos;
	__u32 len;

	if ((void *)(uh + 1) > data_end)
		return -1;
	len = CT_NTOHS(uh->len);
	if (len < sizeof(*uh) || len > l4_len)
		return -1;
	nh->pos = uh + 1;
	*hdr = uh;
	return 0;
}

/* ICMPv4 and ICMPv6 share the layout the fast path needs: type, code,
 * checksum, then the echo identifier and sequence (8 bytes in all).
 * Returns the type; the caller accepts echo request/reply only. */
struct ct_icmp_echo {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be16 id;
	__be16 seq;
};

static __always_inline int parse_icmp_echo(struct hdr_cursor *nh, void *data_end,
					   __u32 l4_len, struct ct_icmp_echo **hdr)
{
	struct ct_icmp_echo *ic = nh->pos;

	if ((void *)(ic + 1) > data_end || l4_len < sizeof(*ic))
		return -1;
	nh->pos = ic + 1;
	*hdr = ic;
	return ic->type;
}

#endif /* CTXDP_PARSING_H */
