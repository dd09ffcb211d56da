/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Counts like wc(1): {"bytes":N,"words":N,"lines":N}. Words are runs of bytes other than
 * ASCII whitespace (space, \t, \n, \v, \f, \r); lines are '\n' bytes, so a last line
 * without a newline is not counted, as in wc -l.
 */
#include "spindle.h"

static int is_space(uint8_t c)
{
	/* Not isspace(): its answer would depend on the locale. */
	return c == ' ' || (c >= '\t' && c <= '\r');
}

static int handle(uint8_t *in, size_t len)
{
	size_t words = 0, lines = 0;
	int in_word = 0;

	for (size_t i = 0; i < len; i++) {
		if (in[i] == '\n')
			lines++;
		if (is_space(in[i])) {
			in_word = 0;
		} else if (!in_word) {
			in_word = 1;
			words++;
		}
	}

	char out[96];
	int n = snprintf(out, sizeof out, "{\"bytes\":%zu,\"words\":%zu,\"lines\":%zu}", len,
			 words, lines);
	spindle_output(out, n);
	return 0;
}
SPINDLE_HANDLER(handle)
