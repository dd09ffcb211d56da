/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A function whose warm state is exactly 1 MiB: a table built once (in _initialize) that
 * every request reads end to end, answering {"sum":S,"served":N}. It is the guest of the
 * remote-fork benchmark: a child forked from a warm instance must bring in the whole table
 * before its first answer, so the fork's cost for 1 MiB touched can be measured (and a
 * child answering the parent's sum shows the table came from the parent, not from a
 * rebuild).
 */
#include "spindle.h"

#define TABLE_BYTES (1u << 20)

static uint64_t table[TABLE_BYTES / sizeof(uint64_t)];
static uint64_t served;

__attribute__((constructor)) static void init(void)
{
	uint64_t x = 0x9e3779b97f4a7c15u;
	for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		table[i] = x | 1; /* never zero: every page of the table holds data */
	}
}

static int handle(uint8_t *in, size_t len)
{
	(void)in;
	(void)len;
	uint64_t sum = 0;
	for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
		sum += table[i];
	served++;
	char out[80];
	int n = snprintf(out, sizeof out, "{\"sum\":%llu,\"served\":%llu}",
			 (unsigned long long)sum, (unsigned long long)served);
	spindle_output(out, n);
	return 0;
}

SPINDLE_HANDLER(handle)
