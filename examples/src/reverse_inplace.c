/* SPDX-License-Identifier: Apache-2.0 */
/*
 * reverse (by UTF-8 code point, invalid bytes one unit each) with an in-place entry point
 * besides reverse.c's copy path: the host maps a large request's slot into linear memory and
 * the code points are reversed where they are (docs/guest-abi.md "In-place calls").
 */
#include "reverse.c"

static int32_t handle_inplace(uint8_t *buf, size_t len, size_t cap)
{
	(void)cap;
	reverse_utf8(buf, len);
	return (int32_t)len;
}
SPINDLE_INPLACE_HANDLER(handle_inplace)
