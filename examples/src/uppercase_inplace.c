/* SPDX-License-Identifier: Apache-2.0 */
/*
 * uppercase (ASCII a-z -> A-Z, everything else unchanged) with both entry points: the copy
 * path (spindle_handle) and the in-place one (spindle_handle_inplace), which the host calls
 * for large inputs with the request's slot mapped into linear memory, so the bytes are
 * converted where they are and never copied (docs/guest-abi.md "In-place calls").
 */
#include "spindle.h"

static void upper(uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] >= 'a' && p[i] <= 'z')
			p[i] -= 'a' - 'A';
}

static int handle(uint8_t *in, size_t len)
{
	upper(in, len);
	spindle_output(in, (int32_t)len);
	return 0;
}
SPINDLE_HANDLER(handle)

static int32_t handle_inplace(uint8_t *buf, size_t len, size_t cap)
{
	(void)cap;
	upper(buf, len);
	return (int32_t)len;
}
SPINDLE_INPLACE_HANDLER(handle_inplace)
