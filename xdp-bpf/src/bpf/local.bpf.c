// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Same-host clients of the gateway, accelerated (ingress.local_redirect; optional, off by
 * default): a sock_ops program on a cgroup puts both ends of every established loopback
 * connection to a service port in a SOCKHASH, keyed by the connection as each end sees it;
 * an sk_msg program on that map hands every message one end sends straight to the other
 * end's receive queue, skipping TCP/IP for the payload. Connections made before the program
 * was attached, or whose other end is not in the map, go over TCP as usual.
 */
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ingress_maps.h"

#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SPINDLE_LOCAL_MAX_SOCKETS);
	__type(key, struct spindle_local_key);
	__type(value, __u64);
} local_sockets SEC(".maps");

/* The service ports (host order), 0-terminated. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPINDLE_GUARD_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} local_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPINDLE_LOCAL_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} local_counters SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&local_counters, &what);
	if (n)
		*n += 1;
}

static __always_inline int service_port(__u32 port)
{
#pragma unroll
	for (__u32 i = 0; i < SPINDLE_GUARD_MAX_PORTS; i++) {
		__u32 key = i;
		__u32 *p = bpf_map_lookup_elem(&local_ports, &key);
		if (!p || *p == 0)
			return 0;
		if (*p == port)
			return 1;
	}
	return 0;
}

static __always_inline void v4_mapped(__u8 *out, __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Both ends on this host: loopback (127/8, ::1), or the same address at both ends. */
static __always_inline int same_host(const struct spindle_local_key *k)
{
	const __u32 *r = (const __u32 *)k->remote;
	if (k->remote[10] == 0xff && k->remote[11] == 0xff && k->remote[12] == 127 && r[0] == 0 &&
	    r[1] == 0 && k->remote[8] == 0 && k->remote[9] == 0)
		return 1;
	if (r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == bpf_htonl(1))
		return 1;
	return same_addr(k->remote, k->local);
}

SEC("sockops")
int spindle_local_sockops(struct bpf_sock_ops *ops)
{
	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	struct spindle_local_key key = {};
	key.local_port = ops->local_port;
	/* Network order in the upper 16 bits: a 32-bit swap yields the port. */
	key.remote_port = bpf_ntohl(ops->remote_port);
	/* The gateway's end was accepted on a service port; a client's end connected to one. */
	__u32 port = ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB ? key.local_port
								     : key.remote_port;
	if (!service_port(port))
		return 1;
	if (ops->family == AF_INET) {
		v4_mapped(key.local, ops->local_ip4);
		v4_mapped(key.remote, ops->remote_ip4);
	} else if (ops->family == AF_INET6) {
		__u32 l[4] = {ops->local_ip6[0], ops->local_ip6[1], ops->local_ip6[2],
			      ops->local_ip6[3]};
		__u32 r[4] = {ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2],
			      ops->remote_ip6[3]};
		__builtin_memcpy(key.local, l, 16);
		__builtin_memcpy(key.remote, r, 16);
	} else {
		return 1;
	}
	if (!same_host(&key))
		return 1;
	if (bpf_sock_hash_update(ops, &local_sockets, &key, BPF_NOEXIST) == 0)
		count(SPINDLE_LOCAL_SOCKETS_ADDED);
	else
		count(SPINDLE_LOCAL_ADD_FAILED);
	return 1;
}

SEC("sk_msg")
int spindle_local_redirect(struct sk_msg_md *msg)
{
	/* The other end's key: its local is this end's remote. */
	struct spindle_local_key peer = {};
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	if (msg->family == AF_INET) {
		v4_mapped(peer.local, msg->remote_ip4);
		v4_mapped(peer.remote, msg->local_ip4);
	} else {
		__u32 l[4] = {msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
			      msg->remote_ip6[3]};
		__u32 r[4] = {msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2],
			      msg->local_ip6[3]};
		__builtin_memcpy(peer.local, l, 16);
		__builtin_memcpy(peer.remote, r, 16);
	}
	int verdict = bpf_msg_redirect_hash(msg, &local_sockets, &peer, BPF_F_INGRESS);
	count(verdict == SK_PASS ? SPINDLE_LOCAL_REDIRECTED : SPINDLE_LOCAL_PASSED);
	/* No peer in the map: SK_PASS sends it over TCP as usual. */
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
