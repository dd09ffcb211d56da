// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * The node's routing fast path, on the TC ingress of the node's veths (the host ends of the
 * links to client and gateway namespaces). A packet the node would route out of another
 * managed veth is handed straight to that veth's peer, in its namespace, with
 * bpf_redirect_peer: no second pass through the node's routing, netfilter or backlog. The
 * route and the next hop's MAC come from the node's own FIB (bpf_fib_lookup), so the fast
 * path forwards exactly where the kernel would; what it cannot decide (no route, next hop
 * unresolved, TTL expiring, not IP) goes to the stack unchanged, which answers it the slow
 * way, ARP and ICMP errors included.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ingress_maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* The devices packets may be redirected to: ifindex -> 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} fast_path_devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_FAST_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} fast_path_counters SEC(".maps");

static __always_inline int count(int what, int action)
{
	__u32 key = what;
	__u64 *n = bpf_map_lookup_elem(&fast_path_counters, &key);
	if (n)
		*n += 1;
	return action;
}

/* What the router would do to the IPv4 header: TTL one less, checksum patched (RFC 1624). */
static __always_inline void ipv4_forwarded(struct iphdr *ip)
{
	__u32 sum = ip->check;
	sum += bpf_htons(0x0100);
	ip->check = (__u16)(sum + (sum >= 0xffff));
	ip->ttl--;
}

SEC("tcx/ingress")
int spindle_fast_path(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return count(SPINDLE_FAST_MALFORMED, TC_ACT_UNSPEC);

	struct bpf_fib_lookup fib = {};
	struct iphdr *ip = NULL;
	struct ipv6hdr *ip6 = NULL;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return count(SPINDLE_FAST_MALFORMED, TC_ACT_UNSPEC);
		if (ip->ttl <= 1)
			return count(SPINDLE_FAST_TTL, TC_ACT_UNSPEC);
		fib.family = AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.tot_len = bpf_ntohs(ip->tot_len);
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return count(SPINDLE_FAST_MALFORMED, TC_ACT_UNSPEC);
		if (ip6->hop_limit <= 1)
			return count(SPINDLE_FAST_TTL, TC_ACT_UNSPEC);
		fib.family = AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
		fib.l4_protocol = ip6->nexthdr;
		fib.tot_len = bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	} else {
		return count(SPINDLE_FAST_NOT_IP, TC_ACT_UNSPEC);
	}
	fib.ifindex = skb->ingress_ifindex;

	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return count(SPINDLE_FAST_NO_NEIGHBOUR, TC_ACT_UNSPEC);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		/* For this namespace, unroutable, or needing fragmentation: the stack's call. */
		return count(SPINDLE_FAST_LOCAL, TC_ACT_UNSPEC);
	__u32 out = fib.ifindex;
	if (!bpf_map_lookup_elem(&fast_path_devices, &out))
		return count(SPINDLE_FAST_NOT_MANAGED, TC_ACT_UNSPEC);

	if (ip)
		ipv4_forwarded(ip);
	else if (ip6)
		ip6->hop_limit--;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return count(SPINDLE_FAST_REDIRECTED, bpf_redirect_peer(out, 0));
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
