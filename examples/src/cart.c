/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The boutique's cart:
 *   cart add ITEM            -> "cart: added ITEM"
 *   cart show                -> "cart: empty" or "cart: N items: a, b, ..."
 *   cart total AMOUNT CUR    -> rewrites the request to "convert AMOUNT CUR" and routes it
 *                               to currency: a dynamic hop chosen by a function other
 *                               than the frontend.
 *
 * The cart lives in this instance's linear memory, so it lasts exactly as long as the
 * host keeps reusing the instance, and each instance (worker) has its own. That makes
 * it a demonstration of reactor state, not a store: "cart add" answers the same either way.
 */
#include "boutique.h"
#include "spindle.h"

enum { CART_MAX = 16, ITEM_MAX = 40 };

static char items[CART_MAX][ITEM_MAX + 1];
static int item_count;

static int add(struct words *w)
{
	struct word item = rest_of_line(w);

	if (item.n == 0)
		return spindle_errorf("usage: cart add ITEM");
	if (item.n > ITEM_MAX)
		return spindle_errorf("item name longer than %d bytes", ITEM_MAX);
	if (item_count == CART_MAX)
		return spindle_errorf("cart is full (%d items)", CART_MAX);
	memcpy(items[item_count], item.p, item.n);
	items[item_count][item.n] = '\0';
	item_count++;

	char out[16 + ITEM_MAX];
	int n = snprintf(out, sizeof out, "cart: added %.*s", (int)item.n, (const char *)item.p);
	spindle_output(out, n);
	return 0;
}

static int show(void)
{
	char out[32 + CART_MAX * (ITEM_MAX + 2)];
	int n;

	if (item_count == 0) {
		spindle_output_str("cart: empty");
		return 0;
	}
	n = snprintf(out, sizeof out, "cart: %d item%s:", item_count, item_count == 1 ? "" : "s");
	for (int i = 0; i < item_count; i++)
		n += snprintf(out + n, sizeof out - (size_t)n, "%s %s", i ? "," : "", items[i]);
	spindle_output(out, n);
	return 0;
}

static int total(struct words *w)
{
	struct word amount = next_word(w);
	struct word currency = next_word(w);

	if (amount.n == 0 || currency.n == 0 || next_word(w).n != 0)
		return spindle_errorf("usage: cart total AMOUNT CURRENCY");
	/* Longer words are certainly invalid; refusing them here means none is ever cut. */
	if (amount.n > 20 || currency.n > 8)
		return spindle_errorf("cart total: amount or currency too long");

	char out[96];
	int n = snprintf(out, sizeof out, "convert %.*s %.*s", (int)amount.n,
			 (const char *)amount.p, (int)currency.n, (const char *)currency.p);
	spindle_output(out, n);
	return spindle_route("currency");
}

static int handle(uint8_t *in, size_t len)
{
	struct words w = {in, len, 0};
	struct word op = next_word(&w);
	struct word sub = next_word(&w);

	if (!word_is(op, "cart"))
		return spindle_errorf("not a cart request: '%.*s'", WORD_FMT(op));
	if (word_is(sub, "add"))
		return add(&w);
	if (word_is(sub, "show") && next_word(&w).n == 0)
		return show();
	if (word_is(sub, "total"))
		return total(&w);
	return spindle_errorf("usage: cart add ITEM | cart show | cart total AMOUNT CURRENCY");
}
SPINDLE_HANDLER(handle)
