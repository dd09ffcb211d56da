/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of the maps shared by sockmap.bpf.c and the Rust loader
 * (sockmap-bpf/src/maps.rs mirrors these structs; a test checks sizes and offsets).
 */
#ifndef SPINDLE_MAPS_H
#define SPINDLE_MAPS_H

#include "spindle_desc.h" /* proto/include: the wire contract */

#define SPINDLE_MAX_FUNCTIONS 1024 /* function ids 0..1023 (0 is the gateway) */
#define SPINDLE_MAX_INSTANCES 64   /* instances per function */
#define SPINDLE_MAX_SLOTS (1 << 20) /* arena slots over all chains */
#define SPINDLE_MAX_SOCKETS (SPINDLE_MAX_FUNCTIONS * 4) /* both ends of every worker connection */

/*
 * sock_hash key. A worker's end of its gateway connection: {fn_id, instance}. The gateway's
 * end: {SPINDLE_GATEWAY_FN, connection number}; it is in the map only so that the program
 * sees what the gateway sends.
 */
struct spindle_sock_key {
	__u32 fn_id;
	__u32 instance;
};

/*
 * senders key: a socket's (local port, remote port), both in host order. One port alone is
 * not unique: the gateway's accepted ends share their listener's port, and connect() reuses
 * ephemeral ports across different peers; the pair is unique on loopback.
 */
struct spindle_sender_key {
	__u32 local_port;
	__u32 remote_port;
};

/*
 * senders value: who sends on that socket. For a worker end: its function and instance.
 * For a gateway end: fn_id SPINDLE_GATEWAY_FN, and the worker instance at the other end
 * (peer_fn, instance), which is where everything the gateway writes on it must go.
 */
struct spindle_sender {
	__u32 fn_id;
	__u32 instance;
	__u32 chain;
	__u32 peer_fn;
};

/* fn_info value, keyed by function id. instances == 0 means no such function. */
struct spindle_fn_info {
	__u32 chain;
	__u32 instances;
	__u32 slot_base; /* this chain's first index in holders */
	__u32 slots;     /* this chain's arena slot count */
};

/*
 * holders value, keyed by slot_base + slot: where the kernel last sent the request in it.
 * `at` is fn_id | instance << 32, written with one 64-bit store so a reader never sees the
 * function of one redirect with the instance of another.
 */
struct spindle_holder {
	__u64 request_id;
	__u64 at;
};

/*
 * ready_list value, keyed by function id: the numbers of its ready instances, in
 * instances[0..count). The program picks request_id % count in it, so load spreads evenly
 * over the ready instances however their numbers are scattered (autoscaling and reloads
 * leave gaps). The gateway rewrites the whole value on every readiness change; a reader may
 * see it mid-update, which is why every pick is checked against instance_ready too.
 */
struct spindle_ready_list {
	__u32 count;
	__u32 instances[SPINDLE_MAX_INSTANCES];
};

/* fn_stats value (per CPU), keyed by function id. */
struct spindle_fn_stats {
	__u64 messages;          /* descriptors redirected to this function */
	__u64 bytes;             /* bytes redirected to this function */
	__u64 redirect_failures; /* descriptors for this function with no live instance */
	__u64 returned;          /* descriptors this function sent that went back to the gateway marked failed */
	__u64 to_gateway;        /* descriptors this function sent to the gateway (chain end, error, ready) */
	__u64 dropped;           /* descriptors the gateway sent to this function's instance that could not be put in its socket (instance going away) */
};

#endif /* SPINDLE_MAPS_H */
