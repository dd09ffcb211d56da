/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The boutique's product catalog: "product ID" -> one line describing the product, e.g.
 * "product OLJCESPC7Z: Sunglasses, 19.99 USD". IDs follow Online Boutique's catalog.
 */
#include "boutique.h"
#include "spindle.h"

static const struct product {
	const char *id;
	const char *name;
	unsigned price_cents; /* USD */
} products[] = {
	{"OLJCESPC7Z", "Sunglasses", 1999},
	{"66VCHSJNUP", "Tank Top", 1899},
	{"1YMWWN1N4O", "Watch", 10999},
	{"L9ECAV7KIM", "Loafers", 8999},
	{"2ZYFJ3GM2N", "Hairdryer", 2499},
};

static int handle(uint8_t *in, size_t len)
{
	struct words w = {in, len, 0};
	struct word op = next_word(&w);
	struct word id = next_word(&w);

	if (!word_is(op, "product") || id.n == 0 || next_word(&w).n != 0)
		return spindle_errorf("usage: product ID");

	for (size_t i = 0; i < sizeof products / sizeof products[0]; i++) {
		const struct product *p = &products[i];
		if (!word_is(id, p->id))
			continue;
		char out[128];
		int n = snprintf(out, sizeof out, "product %s: %s, %u.%02u USD", p->id, p->name,
				 p->price_cents / 100, p->price_cents % 100);
		spindle_output(out, n);
		return 0;
	}
	return spindle_errorf("unknown product '%.*s'", WORD_FMT(id));
}
SPINDLE_HANDLER(handle)
