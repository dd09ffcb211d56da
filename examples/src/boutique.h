/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Request parsing shared by the boutique functions (frontend, cart, catalog, currency).
 * A request is one text line, "op arg...", with words separated by spaces or tabs;
 * a trailing newline (as curl and echo add) is ignored.
 */
#ifndef BOUTIQUE_H
#define BOUTIQUE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct words {
	const uint8_t *s;
	size_t len;
	size_t pos;
};

struct word {
	const uint8_t *p;
	size_t n; /* 0 when there are no more words */
};

static inline int boutique_space(uint8_t c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static inline struct word next_word(struct words *w)
{
	while (w->pos < w->len && boutique_space(w->s[w->pos]))
		w->pos++;
	struct word out = {w->s + w->pos, 0};
	while (w->pos < w->len && !boutique_space(w->s[w->pos]))
		w->pos++, out.n++;
	return out;
}

/* Everything after the words read so far, without surrounding whitespace. */
static inline struct word rest_of_line(struct words *w)
{
	size_t start = w->pos, end = w->len;
	while (start < end && boutique_space(w->s[start]))
		start++;
	while (end > start && boutique_space(w->s[end - 1]))
		end--;
	struct word out = {w->s + start, end - start};
	w->pos = w->len;
	return out;
}

static inline int word_is(struct word w, const char *s)
{
	return w.n == strlen(s) && memcmp(w.p, s, w.n) == 0;
}

/* For "%.*s" in messages: long words are cut so an error stays one readable line. */
#define WORD_FMT(w) (int)((w).n < 40 ? (w).n : 40), (const char *)(w).p

#endif /* BOUTIQUE_H */
