/* SPDX-License-Identifier: Apache-2.0 */
/*
 * reverse (by UTF-8 code point, invalid bytes one unit each; see reverse.c) with an in-place
 * entry point besides the copy path: the host maps a large request's slot into linear memory
 * and the code points are reversed where they are (docs/guest-abi.md "In-place calls").
 */
#include "spindle.h"

static void reverse_bytes(uint8_t *p, size_t n)
{
	for (size_t i = 0, j = n; i + 1 < j; i++, j--) {
		uint8_t t = p[i];
		p[i] = p[j - 1];
		p[j - 1] = t;
	}
}

/* Length of the code point starting at p[0], or 1 if it is not a complete sequence. */
static size_t utf8_unit(const uint8_t *p, size_t avail)
{
	size_t want;

	if (p[0] >= 0xC2 && p[0] <= 0xDF)
		want = 2;
	else if (p[0] >= 0xE0 && p[0] <= 0xEF)
		want = 3;
	else if (p[0] >= 0xF0 && p[0] <= 0xF4)
		want = 4;
	else
		return 1;
	if (want > avail)
		return 1;
	for (size_t i = 1; i < want; i++)
		if ((p[i] & 0xC0) != 0x80)
			return 1;
	return want;
}

/* Reverses each multi-byte code point, then the whole buffer: code points reversed. */
static void reverse_utf8(uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len;) {
		size_t n = utf8_unit(p + i, len - i);
		reverse_bytes(p + i, n);
		i += n;
	}
	reverse_bytes(p, len);
}

static int handle(uint8_t *in, size_t len)
{
	reverse_utf8(in, len);
	spindle_output(in, (int32_t)len);
	return 0;
}
SPINDLE_HANDLER(handle)

static int32_t handle_inplace(uint8_t *buf, size_t len, size_t cap)
{
	(void)cap;
	reverse_utf8(buf, len);
	return (int32_t)len;
}
SPINDLE_INPLACE_HANDLER(handle_inplace)
