/* SPDX-License-Identifier: Apache-2.0 */
/*
 * uppercase (ASCII a-z -> A-Z, everything else unchanged) with an in-place entry point
 * besides uppercase.c's copy path: the host calls it for large inputs with the request's slot
 * mapped into linear memory, so the bytes are converted where they are and never copied
 * (docs/guest-abi.md "In-place calls").
 */
#include "uppercase.c"

static int32_t handle_inplace(uint8_t *buf, size_t len, size_t cap)
{
	(void)cap;
	upper(buf, len);
	return (int32_t)len;
}
SPINDLE_INPLACE_HANDLER(handle_inplace)
