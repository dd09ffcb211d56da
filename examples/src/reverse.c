/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Reverses the input by UTF-8 code point, so "añb" becomes "bña" rather than mangling
 * the two bytes of "ñ". Combining marks and other multi-code-point graphemes are not
 * kept together. Bytes that are not well-formed UTF-8 are treated as one unit each, so
 * arbitrary binary input is reversed byte for byte and never rejected.
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

/*
 * Reverse the bytes inside each multi-byte code point first; reversing the whole buffer
 * afterwards puts them back in order while reversing the code points.
 */
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
