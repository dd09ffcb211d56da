// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Connection steering for the gateway's SO_REUSEPORT shards (http.shards): picks the shard
 * listener a new connection is queued on. By CPU, the shard pinned to the CPU that received
 * the SYN, so the connection's packets, its socket and its shard's thread share one CPU's
 * caches; by source hash, the same shard for every connection of one client address.
 * A selection the kernel refuses (a listener closing) falls back to its own hash.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ingress_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, SPINDLE_MAX_SHARDS);
	__type(key, __u32);
	__type(value, __u64); /* listener fd on update */
} shard_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct spindle_steer_config);
} steer_config SEC(".maps");

/* CPU -> the shard whose thread is pinned to it (the loader fills every CPU's entry). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPINDLE_STEER_MAX_CPUS);
	__type(key, __u32);
	__type(value, __u32);
} cpu_shards SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_STEER_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} steer_counters SEC(".maps");

/* murmur3's finaliser: every input bit reaches every output bit, so addresses that differ
 * only in their last byte still spread over the shards. */
static __always_inline __u32 mix(__u32 x)
{
	x ^= x >> 16;
	x *= 0x85ebca6bu;
	x ^= x >> 13;
	x *= 0xc2b2ae35u;
	x ^= x >> 16;
	return x;
}

static __always_inline __u32 source_hash(struct sk_reuseport_md *md)
{
	if (md->eth_protocol == bpf_htons(ETH_P_IP)) {
		__u32 saddr = 0;
		bpf_skb_load_bytes_relative(md, offsetof(struct iphdr, saddr), &saddr, 4,
					    BPF_HDR_START_NET);
		return mix(saddr);
	}
	__u32 words[4] = {};
	bpf_skb_load_bytes_relative(md, offsetof(struct ipv6hdr, saddr), words, 16,
				    BPF_HDR_START_NET);
	return mix(words[0] ^ words[1] ^ words[2] ^ words[3]);
}

SEC("sk_reuseport")
int spindle_steer(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct spindle_steer_config *cfg = bpf_map_lookup_elem(&steer_config, &zero);
	if (!cfg || cfg->shards == 0 || cfg->shards > SPINDLE_MAX_SHARDS)
		return SK_PASS;
	__u32 key;
	if (cfg->mode == SPINDLE_STEER_CPU) {
		__u32 cpu = bpf_get_smp_processor_id();
		__u32 *shard = bpf_map_lookup_elem(&cpu_shards, &cpu);
		key = shard ? *shard : cpu;
	} else {
		key = source_hash(md);
	}
	key %= cfg->shards;
	if (bpf_sk_select_reuseport(md, &shard_listeners, &key, 0) != 0)
		key = SPINDLE_MAX_SHARDS;
	__u64 *n = bpf_map_lookup_elem(&steer_counters, &key);
	if (n)
		*n += 1;
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
