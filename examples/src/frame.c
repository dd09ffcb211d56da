/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Wraps the input as a JSON object: {"result":"<input as a JSON string>","bytes":N}.
 * N is the input's length in bytes. Bytes that are not well-formed UTF-8 become
 * U+FFFD, so the output is valid JSON whatever the input.
 */
#include "spindle.h"

/* Length of the well-formed UTF-8 sequence at p (RFC 3629), or 0 if there is none. */
static size_t utf8_valid(const uint8_t *p, size_t avail)
{
	uint8_t lo = 0x80, hi = 0xBF;
	size_t n;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xC2 && p[0] <= 0xDF)
		n = 2;
	else if (p[0] >= 0xE0 && p[0] <= 0xEF)
		n = 3;
	else if (p[0] >= 0xF0 && p[0] <= 0xF4)
		n = 4;
	else
		return 0;
	/* Second-byte ranges rule out overlong forms, surrogates and code points > U+10FFFF. */
	if (p[0] == 0xE0)
		lo = 0xA0;
	else if (p[0] == 0xED)
		hi = 0x9F;
	else if (p[0] == 0xF0)
		lo = 0x90;
	else if (p[0] == 0xF4)
		hi = 0x8F;
	if (n > avail || p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if ((p[i] & 0xC0) != 0x80)
			return 0;
	return n;
}

/* Writes the JSON string body for in[0..len) to out; returns the bytes written. */
static size_t json_escape(uint8_t *out, const uint8_t *in, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	uint8_t *o = out;

	for (size_t i = 0; i < len;) {
		uint8_t c = in[i];
		size_t n = utf8_valid(in + i, len - i);

		if (n == 0) {
			memcpy(o, "\\ufffd", 6);
			o += 6;
			i++;
			continue;
		}
		if (n > 1) {
			memcpy(o, in + i, n);
			o += n;
			i += n;
			continue;
		}
		i++;
		switch (c) {
		case '"': *o++ = '\\'; *o++ = '"'; break;
		case '\\': *o++ = '\\'; *o++ = '\\'; break;
		case '\b': *o++ = '\\'; *o++ = 'b'; break;
		case '\f': *o++ = '\\'; *o++ = 'f'; break;
		case '\n': *o++ = '\\'; *o++ = 'n'; break;
		case '\r': *o++ = '\\'; *o++ = 'r'; break;
		case '\t': *o++ = '\\'; *o++ = 't'; break;
		default:
			if (c < 0x20) {
				memcpy(o, "\\u00", 4);
				o[4] = hex[c >> 4];
				o[5] = hex[c & 15];
				o += 6;
			} else {
				*o++ = c;
			}
		}
	}
	return (size_t)(o - out);
}

static int handle(uint8_t *in, size_t len)
{
	static const char head[] = "{\"result\":\"";
	/* Room for ",\"bytes\":" plus a size_t in decimal plus "}". */
	enum { TAIL_MAX = 32 };

	/*
	 * Each input byte escapes to at most 6 bytes ("\u001f" or "\ufffd"), and the
	 * result's length must fit the i32 that spindle_output() takes.
	 */
	if (len > (INT32_MAX - sizeof head - TAIL_MAX) / 6)
		return spindle_errorf("input too large (%zu bytes)", len);
	size_t cap = sizeof head + 6 * len + TAIL_MAX;
	uint8_t *out = malloc(cap);
	if (!out)
		return spindle_errorf("out of memory for %zu bytes of output", cap);

	size_t n = sizeof head - 1;
	memcpy(out, head, n);
	n += json_escape(out + n, in, len);
	n += (size_t)snprintf((char *)out + n, cap - n, "\",\"bytes\":%zu}", len);

	spindle_output(out, (int32_t)n);
	free(out);
	return 0;
}
SPINDLE_HANDLER(handle)
