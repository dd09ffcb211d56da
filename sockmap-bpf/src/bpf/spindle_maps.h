/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of the maps shared by sockmap.bpf.c and the Rust loader
 * (sockmap-bpf/src/maps.rs mirrors these structs; a test checks sizes and offsets).
 */
#ifndef SPINDLE_MAPS_H
#define SPINDLE_MAPS_H

#include "../../../shm/include/spindle_desc.h"

#define SPINDLE_MAX_FUNCTIONS 1024 /* function ids 0..1023 (0 is the gateway) */
#define SPINDLE_MAX_INSTANCES 64   /* instances per function */
#define SPINDLE_MAX_SLOTS (1 << 20) /* arena slots over all chains */
#define SPINDLE_MAX_SOCKETS (SPINDLE_MAX_FUNCTIONS * 4)

/* sock_hash key: one worker instance's socket. */
struct spindle_sock_key {
	__u32 fn_id;
	__u32 instance;
};

/* sender_by_port value, keyed by the worker socket's local port: who is sending. */
struct spindle_sender {
	__u32 fn_id;
	__u32 instance;
	__u32 chain;
	__u32 pad;
};

/* fn_info value, keyed by function id. instances == 0 means no such function. */
struct spindle_fn_info {
	__u32 chain;
	__u32 instances;
	__u32 slot_base; /* this chain's first index in holders */
	__u32 slots;     /* this chain's arena slot count */
};

/* holders value, keyed by slot_base + slot: where the kernel last sent the request in it. */
struct spindle_holder {
	__u64 request_id;
	__u32 fn_id;
	__u32 instance;
};

/* fn_stats value (per CPU), keyed by function id. */
struct spindle_fn_stats {
	__u64 messages;          /* descriptors redirected to this function */
	__u64 bytes;             /* bytes redirected to this function */
	__u64 redirect_failures; /* descriptors for this function with no live instance */
	__u64 returned;          /* descriptors this function sent that went back to the gateway marked failed */
	__u64 to_gateway;        /* descriptors this function sent to the gateway (chain end or error) */
};

#endif /* SPINDLE_MAPS_H */
