/* SPDX-License-Identifier: Apache-2.0 */
/* ASCII uppercase of the input. Bytes outside a-z, including UTF-8, pass unchanged. */
#include "spindle.h"

static void upper(uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] >= 'a' && p[i] <= 'z')
			p[i] -= 'a' - 'A';
}

static int handle(uint8_t *in, size_t len)
{
	/* The input buffer is ours until we return, so convert it in place: no copy. */
	upper(in, len);
	spindle_output(in, (int32_t)len);
	return 0;
}
SPINDLE_HANDLER(handle)
