/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of the ingress programs' maps: guard.bpf.c, fast_path.bpf.c,
 * steer.bpf.c and the Rust loader (xdp-bpf/src/maps.rs mirrors these structs; a test checks
 * every size and offset).
 */
#ifndef SPINDLE_INGRESS_MAPS_H
#define SPINDLE_INGRESS_MAPS_H

#include <linux/types.h>

#define SPINDLE_GUARD_MAX_PORTS 16 /* TCP ports and UDP ports, each */
#define SPINDLE_MAX_SHARDS 64      /* http.shards' limit */
#define SPINDLE_STEER_MAX_CPUS 1024 /* CPUs the steering program knows a shard for */

/* guard_config.mode */
#define SPINDLE_GUARD_STRICT 1     /* drop what is not allowed */
#define SPINDLE_GUARD_RATE_ONLY 2  /* only throttle new connections to the service ports */

/*
 * The guard's settings, one entry (array key 0), written by the loader before it attaches.
 * Ports are in host order; a 0 port ends a list early.
 */
struct spindle_guard_config {
	__u32 mode;
	__u32 pad;
	/* Per source: a new connection may come every syn_interval_ns on average, and up to
	 * burst at once, where syn_tolerance_ns = (burst - 1) * syn_interval_ns (a GCRA: the
	 * bucket's whole state is one timestamp). */
	__u64 syn_interval_ns;
	__u64 syn_tolerance_ns;
	/* The same for all sources together (0: no such limit): spoofed sources each stay
	 * under their own rate, so only a limit over all of them holds a spread flood. */
	__u64 total_interval_ns;
	__u64 total_tolerance_ns;
	/* Where replies to this host's own connections arrive (net.ipv4.ip_local_port_range). */
	__u16 ephemeral_low;
	__u16 ephemeral_high;
	__u16 tcp_ports[SPINDLE_GUARD_MAX_PORTS]; /* the service ports */
	__u16 udp_ports[SPINDLE_GUARD_MAX_PORTS];
	__u32 pad2;
};

/* The guard's LRU hash key: the source address, IPv4 as ::ffff:a.b.c.d. */
struct spindle_source {
	__u8 addr[16];
};

/* The guard's LRU hash value: one source's token bucket and what it cost that source. */
struct spindle_bucket {
	/* The GCRA's theoretical arrival time, in bpf_ktime_get_ns() nanoseconds. */
	__u64 tat_ns;
	__u64 admitted;
	__u64 throttled;
};

/* The guard's verdicts: indexes of its per-CPU counter array. */
enum spindle_guard_counter {
	SPINDLE_GUARD_PASS_SERVICE = 0,  /* TCP to a service port (new ones within their rate) */
	SPINDLE_GUARD_PASS_REPLY,        /* TCP or DNS answers to this host's own connections */
	SPINDLE_GUARD_PASS_CONTROL,      /* ARP, ICMP, ICMPv6: the network needs them */
	SPINDLE_GUARD_PASS_UDP,          /* UDP to an allowed port */
	SPINDLE_GUARD_PASS_UNGUARDED,    /* rate-only mode: anything that is not a new connection */
	SPINDLE_GUARD_DROP_PORT,         /* TCP or UDP to a port nothing here serves */
	SPINDLE_GUARD_DROP_THROTTLED,    /* a new connection over its source's rate */
	SPINDLE_GUARD_DROP_FRAGMENT,     /* IP fragments: no service here is reached by them */
	SPINDLE_GUARD_DROP_MALFORMED,    /* headers cut short or inconsistent */
	SPINDLE_GUARD_DROP_PROTOCOL,     /* another IP protocol or link-layer type */
	SPINDLE_GUARD_DROP_THROTTLED_ALL, /* a new connection over the rate of all sources */
	SPINDLE_GUARD_COUNTERS,
};

/* The fast path's verdicts: indexes of its per-CPU counter array. */
enum spindle_fast_path_counter {
	SPINDLE_FAST_REDIRECTED = 0, /* handed straight into the peer namespace */
	SPINDLE_FAST_NOT_IP,         /* ARP and the like: the stack answers them */
	SPINDLE_FAST_LOCAL,          /* for this namespace itself, or no route */
	SPINDLE_FAST_NOT_MANAGED,    /* routed out of a device the fast path does not own */
	SPINDLE_FAST_NO_NEIGHBOUR,   /* next hop not resolved yet: the stack resolves it */
	SPINDLE_FAST_TTL,            /* would expire: the stack sends the ICMP error */
	SPINDLE_FAST_MALFORMED,      /* headers cut short: left to the stack to refuse */
	SPINDLE_FAST_COUNTERS,
};

/* steer_config.mode */
#define SPINDLE_STEER_CPU 1         /* the shard of the CPU that received the SYN */
#define SPINDLE_STEER_SOURCE_HASH 2 /* a hash of the client's address: a client keeps its shard */

struct spindle_steer_config {
	__u32 mode;
	__u32 shards;
};

/* steering's per-CPU counters: [shard] = connections put there, [SPINDLE_MAX_SHARDS] =
 * selections the kernel refused (the socket left the group), left to its own hash. */
#define SPINDLE_STEER_COUNTERS (SPINDLE_MAX_SHARDS + 1)

/*
 * Same-host acceleration (local.bpf.c): a socket's key in the SOCKHASH, as the socket sees
 * its connection. Addresses are IPv6 (IPv4 as ::ffff:a.b.c.d), ports in host order.
 */
struct spindle_local_key {
	__u8 local[16];
	__u8 remote[16];
	__u32 local_port;
	__u32 remote_port;
};

#define SPINDLE_LOCAL_MAX_SOCKETS 65536 /* both ends of every accelerated connection */

/* local.bpf.c's per-CPU counters. */
enum spindle_local_counter {
	SPINDLE_LOCAL_SOCKETS_ADDED = 0, /* a same-host end of a service connection */
	SPINDLE_LOCAL_ADD_FAILED,        /* the map was full (or the socket went) */
	SPINDLE_LOCAL_REDIRECTED,        /* messages handed straight to the peer socket */
	SPINDLE_LOCAL_PASSED,            /* messages whose peer is not in the map: over TCP */
	SPINDLE_LOCAL_COUNTERS,
};

#endif
