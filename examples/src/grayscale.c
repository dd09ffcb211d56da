/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Converts a binary PPM image (P6, maxval 255) to a binary PGM (P5) using Rec. 601 luma,
 * Y = 0.299 R + 0.587 G + 0.114 B, rounded, in integer arithmetic so the result is the
 * same on every host. Comments are allowed in the header. Only the first image of a
 * multi-image file is converted; anything after it is ignored. A malformed or truncated
 * image is an error.
 */
#include "spindle.h"

/* Far beyond any request body the gateway accepts; keeps the header arithmetic small. */
#define MAX_DIMENSION 1000000u

struct reader {
	const uint8_t *s;
	size_t len;
	size_t pos;
};

static int is_space(uint8_t c)
{
	return c == ' ' || (c >= '\t' && c <= '\r');
}

static void skip_space_and_comments(struct reader *r)
{
	while (r->pos < r->len) {
		if (r->s[r->pos] == '#') {
			while (r->pos < r->len && r->s[r->pos] != '\n' && r->s[r->pos] != '\r')
				r->pos++;
		} else if (is_space(r->s[r->pos])) {
			r->pos++;
		} else {
			break;
		}
	}
}

/* Reads one header number; returns 0 on success. */
static int read_number(struct reader *r, unsigned *out)
{
	size_t start;
	unsigned v = 0;

	skip_space_and_comments(r);
	start = r->pos;
	while (r->pos < r->len && r->s[r->pos] >= '0' && r->s[r->pos] <= '9') {
		v = v * 10 + (unsigned)(r->s[r->pos] - '0');
		if (v > MAX_DIMENSION)
			return -1;
		r->pos++;
	}
	if (r->pos == start || r->pos == r->len)
		return -1;
	/* A number ends at whitespace or a comment; "12x" is not a number. */
	if (!is_space(r->s[r->pos]) && r->s[r->pos] != '#')
		return -1;
	*out = v;
	return 0;
}

static int handle(uint8_t *in, size_t len)
{
	struct reader r = {in, len, 2};
	unsigned width, height, maxval;

	if (len < 2 || in[0] != 'P' || in[1] != '6')
		return spindle_errorf("not a binary PPM image (expected \"P6\" magic)");
	if (len == 2 || (!is_space(in[2]) && in[2] != '#'))
		return spindle_errorf("malformed PPM header");
	if (read_number(&r, &width) || read_number(&r, &height) || read_number(&r, &maxval))
		return spindle_errorf("malformed PPM header");
	if (width == 0 || height == 0)
		return spindle_errorf("PPM image is empty (%ux%u)", width, height);
	if (maxval != 255)
		return spindle_errorf("PPM maxval %u is not supported (only 255)", maxval);
	/* Exactly one whitespace byte separates the header from the pixels. */
	if (!is_space(in[r.pos]))
		return spindle_errorf("malformed PPM header");
	r.pos++;

	uint64_t pixels = (uint64_t)width * height;
	if (pixels * 3 > len - r.pos)
		return spindle_errorf("truncated PPM: %ux%u needs %llu pixel bytes, got %zu", width,
				      height, (unsigned long long)(pixels * 3), len - r.pos);

	char head[48];
	int hn = snprintf(head, sizeof head, "P5\n%u %u\n255\n", width, height);
	uint8_t *out = malloc((size_t)hn + (size_t)pixels);
	if (!out)
		return spindle_errorf("out of memory for a %ux%u image", width, height);
	memcpy(out, head, (size_t)hn);

	const uint8_t *px = in + r.pos;
	uint8_t *gray = out + hn;
	for (size_t i = 0; i < (size_t)pixels; i++, px += 3)
		gray[i] = (uint8_t)((299u * px[0] + 587u * px[1] + 114u * px[2] + 500u) / 1000u);

	spindle_output(out, (int32_t)((size_t)hn + (size_t)pixels));
	free(out);
	return 0;
}
SPINDLE_HANDLER(handle)
