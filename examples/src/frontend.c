/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Entry point of the boutique chain, after SPRIGHT's Online Boutique frontend: it looks
 * at the request's op and picks the next function at run time. The request itself is
 * passed on unchanged as this hop's output.
 *   cart ...     -> cart
 *   product ...  -> catalog
 *   convert ...  -> currency
 *   home, empty  -> answers "welcome to the boutique" itself
 */
#include "boutique.h"
#include "spindle.h"

static const struct {
	const char *op;
	const char *function;
} routes[] = {
	{"cart", "cart"},
	{"product", "catalog"},
	{"convert", "currency"},
};

static int handle(uint8_t *in, size_t len)
{
	struct words w = {in, len, 0};
	struct word op = next_word(&w);

	if (op.n == 0 || word_is(op, "home")) {
		spindle_output_str("welcome to the boutique");
		return 0;
	}
	for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
		if (word_is(op, routes[i].op)) {
			spindle_output(in, (int32_t)len);
			return spindle_route(routes[i].function);
		}
	}
	return spindle_errorf("unknown op '%.*s'", WORD_FMT(op));
}
SPINDLE_HANDLER(handle)
