// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Spindle's kernel dataplane: an sk_msg verdict program on the SOCKHASH of worker sockets.
 * Each 32-byte descriptor a worker sends is redirected straight into the receive queue of
 * an instance of the function it names, without the TCP/IP stack and without waking the
 * gateway. Descriptors for the gateway (next_fn 0) go on over TCP as usual. A descriptor
 * that cannot be delivered is not dropped: it goes to the gateway marked with an error.
 *
 * Instance choice: request_id % (ready instances), in the function's ready list, then the
 * following ones in it while the chosen one cannot take it (it just stopped being ready).
 * Same request, same instance, while the set of ready instances stays the same.
 *
 * The gateway's ends of the worker connections are in the map too: what the gateway writes
 * to a worker is redirected into that worker's receive queue like everything else, so a
 * worker reads one ordered queue of whole descriptors and never TCP bytes interleaved with
 * redirected ones.
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "spindle_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SPINDLE_MAX_SOCKETS);
	__type(key, struct spindle_sock_key);
	__type(value, __u32); /* socket fd on update */
} sock_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SPINDLE_MAX_SOCKETS);
	__type(key, struct spindle_sender_key);
	__type(value, struct spindle_sender);
} senders SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPINDLE_MAX_FUNCTIONS);
	__type(key, __u32);
	__type(value, struct spindle_fn_info);
} fn_info SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	/* The gateway maps it and reads and writes records in place: no syscall per request. */
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, SPINDLE_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct spindle_holder);
} holders SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_MAX_FUNCTIONS);
	__type(key, __u32);
	__type(value, struct spindle_fn_stats);
} fn_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_MAX_FUNCTIONS * SPINDLE_MAX_INSTANCES);
	__type(key, __u32); /* fn_id * SPINDLE_MAX_INSTANCES + instance */
	__type(value, __u64);
} instance_messages SEC(".maps");

/*
 * 1 once an instance has announced itself ready, 0 before and after. Its socket is in the
 * map from before it starts (a socket added while its owner is already blocked in read() is
 * not woken for redirected data), but nothing is sent to it until it is ready.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPINDLE_MAX_FUNCTIONS * SPINDLE_MAX_INSTANCES);
	__type(key, __u32); /* fn_id * SPINDLE_MAX_INSTANCES + instance */
	__type(value, __u32);
} instance_ready SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPINDLE_MAX_FUNCTIONS);
	__type(key, __u32);
	__type(value, struct spindle_ready_list);
} ready_list SEC(".maps");

static __always_inline int is_ready(struct spindle_sock_key *key)
{
	__u32 idx = key->fn_id * SPINDLE_MAX_INSTANCES + key->instance;
	__u32 *ready;

	if (key->fn_id >= SPINDLE_MAX_FUNCTIONS || key->instance >= SPINDLE_MAX_INSTANCES)
		return 0;
	ready = bpf_map_lookup_elem(&instance_ready, &idx);
	return ready && *ready;
}

static __always_inline struct spindle_fn_stats *stats_of(__u32 fn_id)
{
	return bpf_map_lookup_elem(&fn_stats, &fn_id);
}

/* Counts a redirect to `key` and records it as the holder of the descriptor's slot. */
static __always_inline void delivered(struct spindle_desc *d, struct spindle_fn_info *info,
				      struct spindle_sock_key *key)
{
	struct spindle_fn_stats *s;

	if (d->slot < info->slots && info->slot_base + d->slot < SPINDLE_MAX_SLOTS) {
		__u32 at = info->slot_base + d->slot;
		struct spindle_holder *h = bpf_map_lookup_elem(&holders, &at);

		if (h) {
			h->request_id = d->request_id;
			h->at = (__u64)key->fn_id | ((__u64)key->instance << 32);
		}
	}
	s = stats_of(key->fn_id);
	if (s) {
		s->messages++;
		s->bytes += SPINDLE_DESC_SIZE;
	}
	if (key->instance < SPINDLE_MAX_INSTANCES) {
		__u32 slot = key->fn_id * SPINDLE_MAX_INSTANCES + key->instance;
		__u64 *n = bpf_map_lookup_elem(&instance_messages, &slot);

		if (n)
			(*n)++;
	}
}

/*
 * Whether `from` holds the request `d` names: the slot's holder record (written by the
 * gateway for its own sends and by every redirect) names this request at this sender.
 * Without it, a worker could replay any live slot of its chain to any function of it.
 */
static __always_inline int holds(struct spindle_desc *d, struct spindle_sender *from)
{
	struct spindle_fn_info *mine = bpf_map_lookup_elem(&fn_info, &from->fn_id);
	struct spindle_holder *h;
	__u32 at;

	if (!mine || d->slot >= mine->slots || mine->slot_base + d->slot >= SPINDLE_MAX_SLOTS)
		return 0;
	at = mine->slot_base + d->slot;
	h = bpf_map_lookup_elem(&holders, &at);
	return h && h->request_id == d->request_id &&
	       h->at == ((__u64)from->fn_id | ((__u64)from->instance << 32));
}

/*
 * Sends the descriptor back to the gateway (the sender's TCP peer) marked with `status`.
 * next_fn keeps the destination that failed, for the gateway's message; len 0 says the slot
 * holds no error text.
 */
static __always_inline int give_back(struct spindle_desc *d, __u32 sender_fn, __u8 status)
{
	struct spindle_fn_stats *s = stats_of(sender_fn);

	d->status = status;
	/*
	 * A refusal carries no payload. An undeliverable request keeps its length: the
	 * gateway holds it until an instance of the next function is ready and sends it on.
	 */
	if (status != SPINDLE_STATUS_UNDELIVERABLE)
		d->len = 0;
	if (s) {
		s->returned++;
		s->to_gateway++;
	}
	return SK_PASS;
}

SEC("sk_msg")
int spindle_redirect(struct sk_msg_md *msg)
{
	struct spindle_sender_key sender;
	struct spindle_sock_key key;
	struct spindle_fn_info *info;
	struct spindle_ready_list *ready;
	struct spindle_sender *from;
	struct spindle_fn_stats *s;
	struct spindle_desc *d;
	__u32 start, i, n;

	/* A short write: wait for the rest of the descriptor, then decide on the whole. */
	if (msg->size < SPINDLE_DESC_SIZE) {
		bpf_msg_cork_bytes(msg, SPINDLE_DESC_SIZE);
		return SK_PASS;
	}
	/* One verdict per descriptor, even when a worker writes a batch in one call. */
	bpf_msg_apply_bytes(msg, SPINDLE_DESC_SIZE);
	if (bpf_msg_pull_data(msg, 0, SPINDLE_DESC_SIZE, 0))
		return SK_PASS; /* cannot look: the gateway checks it */
	d = msg->data;
	if ((void *)(d + 1) > msg->data_end)
		return SK_PASS;

	sender.local_port = msg->local_port;
	/* Network order in the upper 16 bits (as in sock_ops), so a 32-bit swap yields the port. */
	sender.remote_port = bpf_ntohl(msg->remote_port);
	from = bpf_map_lookup_elem(&senders, &sender);
	if (!from)
		return SK_PASS; /* not a socket we registered */

	if (from->fn_id == SPINDLE_GATEWAY_FN) {
		/* The gateway picked the instance by picking the connection: deliver to its peer. */
		key.fn_id = from->peer_fn;
		key.instance = from->instance;
		info = bpf_map_lookup_elem(&fn_info, &key.fn_id);
		if (info && d->next_fn == key.fn_id &&
		    bpf_msg_redirect_hash(msg, &sock_hash, &key, BPF_F_INGRESS) == SK_PASS) {
			delivered(d, info, &key);
			return SK_PASS;
		}
		/*
		 * Passing it on would send it over TCP to the same worker, out of order with
		 * redirected descriptors. The instance is going away (its socket left the map);
		 * the gateway fails what it held when it reaps it.
		 */
		s = stats_of(key.fn_id);
		if (s)
			s->dropped++;
		return SK_DROP;
	}

	if (d->next_fn == SPINDLE_GATEWAY_FN) {
		s = stats_of(from->fn_id);
		if (s)
			s->to_gateway++;
		return SK_PASS;
	}
	if (d->chain != from->chain || d->status != SPINDLE_STATUS_OK)
		return give_back(d, from->fn_id, SPINDLE_STATUS_REFUSED);

	if (d->next_fn >= SPINDLE_MAX_FUNCTIONS)
		return give_back(d, from->fn_id, SPINDLE_STATUS_BAD_ROUTE);
	key.fn_id = d->next_fn;
	info = bpf_map_lookup_elem(&fn_info, &key.fn_id);
	if (!info || info->instances == 0 || info->chain != d->chain)
		return give_back(d, from->fn_id, SPINDLE_STATUS_BAD_ROUTE);
	if (!holds(d, from))
		return give_back(d, from->fn_id, SPINDLE_STATUS_REFUSED);

	ready = bpf_map_lookup_elem(&ready_list, &key.fn_id);
	n = ready ? ready->count : 0;
	if (n > SPINDLE_MAX_INSTANCES)
		n = SPINDLE_MAX_INSTANCES;
	if (ready && n) {
		start = (__u32)(d->request_id % n);
		for (i = 0; i < SPINDLE_MAX_INSTANCES && i < n; i++) {
			key.instance = ready->instances[((start + i) % n) & (SPINDLE_MAX_INSTANCES - 1)];
			if (!is_ready(&key))
				continue;
			if (bpf_msg_redirect_hash(msg, &sock_hash, &key, BPF_F_INGRESS) != SK_PASS)
				continue;
			delivered(d, info, &key);
			return SK_PASS;
		}
	}

	s = stats_of(key.fn_id);
	if (s)
		s->redirect_failures++;
	return give_back(d, from->fn_id, SPINDLE_STATUS_UNDELIVERABLE);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
