/* SPDX-License-Identifier: Apache-2.0 */
/*
 * An I/O-bound function: waits 2 ms per request without using the CPU, then echoes the
 * input. It stands in for a function that spends its time waiting on a backend, the load
 * for which adding instances helps even on a machine with few cores (bench/scale.sh).
 *
 * The wait is clock_nanosleep, which wasi-libc turns into one WASI poll_oneoff with a
 * relative CLOCK_MONOTONIC subscription; the host blocks the worker thread for it, so no
 * fuel is burnt while waiting.
 *
 * An input that starts with "sleep=N" (N in milliseconds, 0..=1000, decimal digits)
 * waits N ms instead; after the digits comes the end of the input or ASCII whitespace,
 * then anything. "sleep=" followed by anything else is an error. Every other input waits
 * the default 2 ms. The output is always the input, unchanged. A wait as long as the
 * function's timeout_ms (default 1000) is cut short by the host's watchdog (504).
 */
/* clock_nanosleep is POSIX, hidden under plain -std=c11. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <time.h>

#include "spindle.h"

#define DEFAULT_SLEEP_MS 2
#define MAX_SLEEP_MS 1000

static const char PREFIX[] = "sleep=";

static int is_space(uint8_t c)
{
	return c == ' ' || (c >= '\t' && c <= '\r');
}

/* The sleep the input asks for, in ms, or -1 if it starts with "sleep=" but is malformed. */
static long requested_ms(const uint8_t *in, size_t len)
{
	size_t plen = sizeof PREFIX - 1;

	if (len < plen || memcmp(in, PREFIX, plen) != 0)
		return DEFAULT_SLEEP_MS;
	size_t i = plen;
	long ms = 0;
	while (i < len && in[i] >= '0' && in[i] <= '9') {
		ms = ms * 10 + (in[i] - '0');
		if (ms > MAX_SLEEP_MS)
			return -1;
		i++;
	}
	if (i == plen || (i < len && !is_space(in[i])))
		return -1;
	return ms;
}

static int handle(uint8_t *in, size_t len)
{
	long ms = requested_ms(in, len);
	if (ms < 0)
		return spindle_errorf("bad sleep: want sleep=N with N in 0..=%d ms", MAX_SLEEP_MS);

	struct timespec t = {(time_t)(ms / 1000), (ms % 1000) * 1000000L};
	/* No signals in WASI; natively, a signal cuts the wait short: sleep the rest. */
	int rc;
	while ((rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &t, &t)) == EINTR)
		;
	if (rc != 0)
		return spindle_errorf("clock_nanosleep failed: error %d", rc);

	spindle_output(in, (int32_t)len);
	return 0;
}
SPINDLE_HANDLER(handle)
