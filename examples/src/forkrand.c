/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Draws random numbers, and shows how a function stays correct when the host forks it
 * from a snapshot: {"served":N,"random":R}, where N counts the requests this instance
 * (and, before a fork, its parent) served and R is the next number of its PRNG.
 *
 * The PRNG state lives in linear memory, so every instance forked from one snapshot
 * would inherit the same state and draw the same sequence. The host calls the
 * spindle_on_fork export in each child before its first request: reseeding there from
 * WASI random_get gives every child its own sequence, while the counter, which is meant
 * to be inherited, carries on from the parent's. "forks" counts the reseeds this
 * instance's memory has seen.
 */
#include <wasi/api.h>

#include "spindle.h"

static uint64_t state;
static uint64_t served;
static uint64_t forks;

static void seed(void)
{
	uint64_t s = 0;

	/* A failure leaves a fixed seed: still a valid, if predictable, state. */
	if (__wasi_random_get((uint8_t *)&s, sizeof s) != __WASI_ERRNO_SUCCESS)
		s = 0x9e3779b97f4a7c15u;
	state = s ? s : 1; /* xorshift's one bad state is zero */
}

/* Runs in _initialize (wasi-libc calls constructors there): once per cold instance. */
__attribute__((constructor)) static void init(void)
{
	seed();
}

/* xorshift64*: small, and good enough for a demonstration. */
static uint64_t next(void)
{
	state ^= state >> 12;
	state ^= state << 25;
	state ^= state >> 27;
	return state * 0x2545f4914f6cdd1du;
}

SPINDLE_EXPORT("spindle_on_fork") void spindle_on_fork(void);
void spindle_on_fork(void)
{
	forks++;
	seed();
}

static int handle(uint8_t *in, size_t len)
{
	(void)in;
	(void)len;
	served++;
	char out[96];
	int n = snprintf(out, sizeof out, "{\"served\":%llu,\"random\":%llu,\"forks\":%llu}",
			 (unsigned long long)served, (unsigned long long)next(),
			 (unsigned long long)forks);
	spindle_output(out, n);
	return 0;
}
SPINDLE_HANDLER(handle)
