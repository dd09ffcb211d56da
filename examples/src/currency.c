/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The boutique's currency converter: "convert AMOUNT CUR" converts AMOUNT US dollars,
 * e.g. "convert 12 EUR" -> "12.00 USD = 11.04 EUR". AMOUNT has at most two decimals and
 * is below one billion; CUR is matched case-insensitively. All arithmetic is in integer
 * cents and rates in units of 1/10000, rounded half up, so results never depend on how
 * a float prints.
 */
#include "boutique.h"
#include "spindle.h"

#define RATE_SCALE 10000u
#define MAX_WHOLE_DIGITS 9

static const struct rate {
	char code[4];
	uint32_t per_usd; /* units of the currency per USD, times RATE_SCALE */
} rates[] = {
	{"USD", 10000},  {"EUR", 9200},  {"GBP", 7900},   {"JPY", 1495000},
	{"CAD", 13600},  {"CHF", 8800},  {"INR", 832000},
};

/* Parses "123", "123.4" or "123.45" into cents; returns 0 on success. */
static int parse_cents(struct word w, uint64_t *cents)
{
	size_t i = 0, whole_digits = 0, frac_digits = 0;
	uint64_t whole = 0, frac = 0;

	for (; i < w.n && w.p[i] >= '0' && w.p[i] <= '9'; i++, whole_digits++)
		whole = whole * 10 + (w.p[i] - '0');
	if (whole_digits == 0 || whole_digits > MAX_WHOLE_DIGITS)
		return -1;
	if (i < w.n && w.p[i] == '.') {
		for (i++; i < w.n && w.p[i] >= '0' && w.p[i] <= '9'; i++, frac_digits++)
			frac = frac * 10 + (w.p[i] - '0');
		if (frac_digits == 0 || frac_digits > 2)
			return -1;
		if (frac_digits == 1)
			frac *= 10;
	}
	if (i != w.n)
		return -1;
	*cents = whole * 100 + frac;
	return 0;
}

static const struct rate *find_rate(struct word w)
{
	if (w.n != 3)
		return NULL;
	for (size_t i = 0; i < sizeof rates / sizeof rates[0]; i++) {
		size_t k = 0;
		/* An ASCII letter and its lowercase differ only in bit 0x20. */
		while (k < 3 && (w.p[k] & ~0x20) == rates[i].code[k])
			k++;
		if (k == 3)
			return &rates[i];
	}
	return NULL;
}

static int handle(uint8_t *in, size_t len)
{
	struct words w = {in, len, 0};
	struct word op = next_word(&w);
	struct word amount = next_word(&w);
	struct word code = next_word(&w);
	uint64_t cents;

	if (!word_is(op, "convert") || code.n == 0 || next_word(&w).n != 0)
		return spindle_errorf("usage: convert AMOUNT CURRENCY");
	if (parse_cents(amount, &cents) != 0)
		return spindle_errorf("bad amount '%.*s' (want e.g. 12 or 12.50, below 1e9)",
				      WORD_FMT(amount));
	const struct rate *r = find_rate(code);
	if (!r)
		return spindle_errorf("unknown currency '%.*s'", WORD_FMT(code));

	/* cents < 1e11 and per_usd < 2e6, so the product fits easily in 64 bits. */
	uint64_t converted = (cents * r->per_usd + RATE_SCALE / 2) / RATE_SCALE;

	char out[96];
	int n = snprintf(out, sizeof out, "%llu.%02llu USD = %llu.%02llu %s",
			 (unsigned long long)(cents / 100), (unsigned long long)(cents % 100),
			 (unsigned long long)(converted / 100),
			 (unsigned long long)(converted % 100), r->code);
	spindle_output(out, n);
	return 0;
}
SPINDLE_HANDLER(handle)
