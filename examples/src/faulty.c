/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Misbehaves on request, for testing how the host contains a failing function.
 * The input (ignoring surrounding whitespace) selects the fault:
 *   trap   executes an unreachable instruction
 *   loop   spins forever without calling anything, so only fuel or a deadline stops it
 *   oom    allocates 1 MiB blocks until malloc fails (memory.grow refused), then traps
 *   error  reports "requested error" through spindle_error()
 *   print  writes a line to stdout and one to stderr, then echoes
 *   sleep MS  blocks for MS milliseconds (WASI poll_oneoff: no fuel is burnt), then echoes
 * Anything else is echoed back unchanged.
 */
/* nanosleep is POSIX, hidden under plain -std=c11. */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "spindle.h"

/* Written through a volatile so the compiler can neither drop the allocations nor free them. */
static void *volatile hoard;

static int is(const uint8_t *word, size_t n, const char *want)
{
	return n == strlen(want) && memcmp(word, want, n) == 0;
}

static int handle(uint8_t *in, size_t len)
{
	const uint8_t *word = in;
	size_t n = len;

	while (n && (*word == ' ' || (*word >= '\t' && *word <= '\r')))
		word++, n--;
	while (n && (word[n - 1] == ' ' || (word[n - 1] >= '\t' && word[n - 1] <= '\r')))
		n--;

	if (is(word, n, "trap"))
		__builtin_trap();

	if (is(word, n, "loop")) {
		volatile uint64_t spins = 0;
		for (;;)
			spins++;
	}

	if (is(word, n, "oom")) {
		/*
		 * Each block records the previous one so all stay reachable. Writing through
		 * the NULL malloc finally returns would not trap in Wasm (address 0 is ordinary
		 * linear memory), so trap explicitly.
		 */
		for (;;) {
			void **block = malloc(1 << 20);
			if (!block)
				__builtin_trap();
			*block = hoard;
			hoard = block;
		}
	}

	if (is(word, n, "error")) {
		spindle_error_str("requested error");
		return 1;
	}

	if (n > 6 && memcmp(word, "sleep ", 6) == 0) {
		unsigned long ms = 0;
		for (size_t i = 6; i < n && word[i] >= '0' && word[i] <= '9' && ms < 3600000; i++)
			ms = ms * 10 + (unsigned long)(word[i] - '0');
		struct timespec t = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
		nanosleep(&t, NULL);
	}

	if (is(word, n, "print")) {
		printf("faulty: print requested (%zu bytes of input)\n", len);
		/* stdout is fully buffered off a terminal and a reactor never exits to flush it. */
		fflush(stdout);
		fprintf(stderr, "faulty: this line goes to stderr\n");
	}

	spindle_output(in, (int32_t)len);
	return 0;
}
SPINDLE_HANDLER(handle)
