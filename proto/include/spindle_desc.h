/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of Spindle's descriptor: the fixed-size message that names a payload
 * in a chain's shared-memory arena. The gateway, the worker processes and the eBPF programs
 * all use this layout; proto/src/descriptor.rs mirrors it and a test checks size and offsets.
 *
 * A descriptor is sent as exactly SPINDLE_DESC_SIZE bytes on a stream socket.
 * All fields are little-endian (host order on every platform Spindle runs on).
 */
#ifndef SPINDLE_DESC_H
#define SPINDLE_DESC_H

#ifdef __BPF__
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#endif

#define SPINDLE_DESC_SIZE 32
/* Function id 0 is the gateway: a descriptor sent to it ends the chain (or reports an error). */
#define SPINDLE_GATEWAY_FN 0

enum spindle_status {
	SPINDLE_STATUS_OK = 0,          /* payload in the slot is the hop's output */
	SPINDLE_STATUS_GUEST_ERROR = 1, /* the function reported an error; slot holds the message */
	SPINDLE_STATUS_TRAP = 2,        /* the function trapped; slot holds the message */
	SPINDLE_STATUS_TIMEOUT = 3,     /* the function ran out of fuel or time */
	SPINDLE_STATUS_REFUSED = 4,     /* a hop refused this descriptor (forged, stale, malformed) */
	SPINDLE_STATUS_BAD_ROUTE = 5,   /* the next hop named does not exist in this chain */
	SPINDLE_STATUS_UNDELIVERABLE = 6, /* the next hop has no live instance (kernel dataplane) */
};

struct spindle_desc {
	__u32 next_fn;    /* function id this descriptor is going to; read by eBPF at offset 0 */
	__u16 chain;      /* chain id: which arena the slot is in */
	__u8 hop;         /* number of functions the request has passed through */
	__u8 status;      /* enum spindle_status */
	__u64 request_id; /* gateway-assigned, unique per gateway run; recorded with the slot */
	__u32 slot;       /* slot index in the chain's arena */
	__u32 generation; /* slot generation when the gateway allocated it */
	__u32 len;        /* payload length in bytes, <= the arena's slot size */
	__u32 reserved;   /* must be zero */
};

#endif /* SPINDLE_DESC_H */
