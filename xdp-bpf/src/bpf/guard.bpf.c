// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Spindle's ingress guard, on the interface the gateway listens on (TC ingress by default,
 * native XDP where asked). Strict mode lets through only what the node serves or needs:
 * TCP to the service ports, answers to the node's own connections (TCP and DNS to the
 * ephemeral range), ARP, ICMP and DHCP answers; everything else is dropped before the stack
 * sees it, by reason. Both modes hold every source to a rate of new connections (SYN without ACK) to
 * the service ports, in an LRU hash of per-source buckets. Rate-only mode (on `lo`, where the
 * workers' own connections run too) drops nothing else.
 *
 * The decision is one function over the packet's bytes; the TC and XDP entry points only
 * translate it. It reads headers with bounds checks against data_end only: no helper
 * copies, no verifier tricks.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ingress_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spindle_guard_config);
} guard_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the loader sets ingress.guard.sources */
	__type(key, struct spindle_source);
	__type(value, struct spindle_bucket);
} guard_sources SEC(".maps");

/* All sources' bucket: its GCRA timestamp, for guard_config.total_*. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} guard_total SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_GUARD_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} guard_counters SEC(".maps");

#define IP_FRAGMENT_BITS 0x3fff /* more-fragments flag and offset */
#define IPV6_EXT_HEADERS 4      /* extension headers walked before giving up */

static __always_inline int port_in(const __u16 *ports, __u16 port)
{
#pragma unroll
	for (int i = 0; i < SPINDLE_GUARD_MAX_PORTS; i++) {
		if (ports[i] == 0)
			return 0;
		if (ports[i] == port)
			return 1;
	}
	return 0;
}

static __always_inline int ephemeral(const struct spindle_guard_config *cfg, __u16 port)
{
	return port >= cfg->ephemeral_low && port <= cfg->ephemeral_high;
}

/* A new connection its source's bucket admitted: within the rate of all sources too? */
static __always_inline int admit_total(const struct spindle_guard_config *cfg, __u64 now)
{
	if (cfg->total_interval_ns == 0)
		return SPINDLE_GUARD_PASS_SERVICE;
	__u32 zero = 0;
	__u64 *tat = bpf_map_lookup_elem(&guard_total, &zero);
	if (!tat)
		return SPINDLE_GUARD_PASS_SERVICE;
	__u64 old = *tat;
	__u64 from = old > now ? old : now;
	if (from - now > cfg->total_tolerance_ns)
		return SPINDLE_GUARD_DROP_THROTTLED_ALL;
	/* Every CPU updates the one bucket: a compare-and-swap, so two admissions are never
	 * counted as one. Losing the race admits this one without charging it (at most one
	 * per racing CPU), rather than retrying in a loop. */
	__sync_val_compare_and_swap(tat, old, from + cfg->total_interval_ns);
	return SPINDLE_GUARD_PASS_SERVICE;
}

/* A new connection from `src`: within its rate and all sources', or throttled. */
static __always_inline int admit_syn(const struct spindle_guard_config *cfg,
				     const struct spindle_source *src)
{
	__u64 now = bpf_ktime_get_ns();
	struct spindle_bucket *b = bpf_map_lookup_elem(&guard_sources, src);
	if (!b) {
		struct spindle_bucket fresh = {
			.tat_ns = now + cfg->syn_interval_ns,
			.admitted = 1,
		};
		/* A full LRU evicts its least recent source: a flood of sources cannot grow it. */
		bpf_map_update_elem(&guard_sources, src, &fresh, BPF_ANY);
		return admit_total(cfg, now);
	}
	__u64 tat = b->tat_ns > now ? b->tat_ns : now;
	if (tat - now > cfg->syn_tolerance_ns) {
		__sync_fetch_and_add(&b->throttled, 1);
		return SPINDLE_GUARD_DROP_THROTTLED;
	}
	/* Two CPUs may both read the old time and both admit: at most one extra connection per
	 * CPU per race, which a lock would cost every SYN to prevent. */
	b->tat_ns = tat + cfg->syn_interval_ns;
	__sync_fetch_and_add(&b->admitted, 1);
	return admit_total(cfg, now);
}

static __always_inline int tcp_verdict(const struct spindle_guard_config *cfg,
				       const struct tcphdr *tcp,
				       const struct spindle_source *src)
{
	__u16 port = bpf_ntohs(tcp->dest);
	int fresh = tcp->syn && !tcp->ack;
	if (port_in(cfg->tcp_ports, port))
		return fresh ? admit_syn(cfg, src) : SPINDLE_GUARD_PASS_SERVICE;
	if (cfg->mode == SPINDLE_GUARD_RATE_ONLY)
		return SPINDLE_GUARD_PASS_UNGUARDED;
	/* SYN-ACKs and the rest of the node's own outgoing connections. */
	if (!fresh && ephemeral(cfg, port))
		return SPINDLE_GUARD_PASS_REPLY;
	return SPINDLE_GUARD_DROP_PORT;
}

static __always_inline int udp_verdict(const struct spindle_guard_config *cfg,
				       const struct udphdr *udp)
{
	__u16 port = bpf_ntohs(udp->dest);
	if (cfg->mode == SPINDLE_GUARD_RATE_ONLY)
		return SPINDLE_GUARD_PASS_UNGUARDED;
	if (port_in(cfg->udp_ports, port))
		return SPINDLE_GUARD_PASS_UDP;
	/* Answers from a name server (peers given by DNS name are re-resolved). */
	if (bpf_ntohs(udp->source) == 53 && ephemeral(cfg, port))
		return SPINDLE_GUARD_PASS_REPLY;
	/* DHCP answers (v4 server 67 -> client 68, v6 547 -> 546): a node that leases its
	 * address on this interface must keep it. */
	if ((bpf_ntohs(udp->source) == 67 && port == 68) ||
	    (bpf_ntohs(udp->source) == 547 && port == 546))
		return SPINDLE_GUARD_PASS_CONTROL;
	return SPINDLE_GUARD_DROP_PORT;
}

/* Everything not a TCP or UDP header that starts at l4: by protocol. */
static __always_inline int l4_verdict(const struct spindle_guard_config *cfg, __u8 proto,
				      void *l4, void *end, const struct spindle_source *src)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return SPINDLE_GUARD_DROP_MALFORMED;
		return tcp_verdict(cfg, tcp, src);
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return SPINDLE_GUARD_DROP_MALFORMED;
		return udp_verdict(cfg, udp);
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
		return SPINDLE_GUARD_PASS_CONTROL;
	if (cfg->mode == SPINDLE_GUARD_RATE_ONLY)
		return SPINDLE_GUARD_PASS_UNGUARDED;
	return SPINDLE_GUARD_DROP_PROTOCOL;
}

static __always_inline int ipv4_verdict(const struct spindle_guard_config *cfg, void *l3,
					void *end)
{
	struct iphdr *ip = l3;
	if ((void *)(ip + 1) > end)
		return SPINDLE_GUARD_DROP_MALFORMED;
	__u32 header = ip->ihl * 4;
	if (header < sizeof(*ip))
		return SPINDLE_GUARD_DROP_MALFORMED;
	if (ip->frag_off & bpf_htons(IP_FRAGMENT_BITS))
		return cfg->mode == SPINDLE_GUARD_RATE_ONLY ? SPINDLE_GUARD_PASS_UNGUARDED
							     : SPINDLE_GUARD_DROP_FRAGMENT;
	struct spindle_source src = {};
	src.addr[10] = 0xff;
	src.addr[11] = 0xff;
	__builtin_memcpy(&src.addr[12], &ip->saddr, 4);
	/* ihl is 4 bits: header <= 60, which bounds the offset for the verifier. */
	return l4_verdict(cfg, ip->protocol, l3 + header, end, &src);
}

static __always_inline int ipv6_verdict(const struct spindle_guard_config *cfg, void *l3,
					void *end)
{
	struct ipv6hdr *ip6 = l3;
	if ((void *)(ip6 + 1) > end)
		return SPINDLE_GUARD_DROP_MALFORMED;
	struct spindle_source src;
	__builtin_memcpy(src.addr, &ip6->saddr, 16);
	__u8 next = ip6->nexthdr;
	void *at = (void *)(ip6 + 1);
#pragma unroll
	for (int i = 0; i < IPV6_EXT_HEADERS; i++) {
		if (next == IPPROTO_FRAGMENT)
			return cfg->mode == SPINDLE_GUARD_RATE_ONLY ? SPINDLE_GUARD_PASS_UNGUARDED
								     : SPINDLE_GUARD_DROP_FRAGMENT;
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS)
			break;
		struct ipv6_opt_hdr *opt = at;
		if ((void *)(opt + 1) > end)
			return SPINDLE_GUARD_DROP_MALFORMED;
		next = opt->nexthdr;
		at += (opt->hdrlen + 1) * 8;
	}
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS)
		/* More extension headers than any service traffic carries. */
		return cfg->mode == SPINDLE_GUARD_RATE_ONLY ? SPINDLE_GUARD_PASS_UNGUARDED
							     : SPINDLE_GUARD_DROP_MALFORMED;
	return l4_verdict(cfg, next, at, end, &src);
}

/* The guard's decision for the frame in [data, end): a spindle_guard_counter. */
static __always_inline int guard_verdict(void *data, void *end)
{
	__u32 zero = 0;
	const struct spindle_guard_config *cfg = bpf_map_lookup_elem(&guard_config, &zero);
	/* Not configured yet (the loader writes it before attaching): let everything by. */
	if (!cfg || cfg->mode == 0)
		return SPINDLE_GUARD_PASS_UNGUARDED;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return SPINDLE_GUARD_DROP_MALFORMED;
	void *l3 = (void *)(eth + 1);
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		return ipv4_verdict(cfg, l3, end);
	case bpf_htons(ETH_P_IPV6):
		return ipv6_verdict(cfg, l3, end);
	case bpf_htons(ETH_P_ARP):
		return SPINDLE_GUARD_PASS_CONTROL;
	default:
		return cfg->mode == SPINDLE_GUARD_RATE_ONLY ? SPINDLE_GUARD_PASS_UNGUARDED
							     : SPINDLE_GUARD_DROP_PROTOCOL;
	}
}

static __always_inline int count(int verdict)
{
	__u32 key = verdict;
	__u64 *n = bpf_map_lookup_elem(&guard_counters, &key);
	if (n)
		*n += 1; /* per-CPU: no other writer */
	return verdict < SPINDLE_GUARD_DROP_PORT;
}

SEC("tcx/ingress")
int spindle_guard_tc(struct __sk_buff *skb)
{
	int pass = count(guard_verdict((void *)(long)skb->data, (void *)(long)skb->data_end));
	/* TC_ACT_UNSPEC: on to the next program on the hook, if any, then the stack. */
	return pass ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

SEC("xdp")
int spindle_guard_xdp(struct xdp_md *ctx)
{
	int pass = count(guard_verdict((void *)(long)ctx->data, (void *)(long)ctx->data_end));
	return pass ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
