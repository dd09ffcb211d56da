/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The `spindle_alloc` export, linked into every reactor. The host copies each request's
 * input into the buffer it returns; SPINDLE_HANDLER frees it after the handler runs.
 */
#include "spindle.h"

void *spindle_alloc(int32_t size)
{
	if (size < 0)
		return NULL;
	/* A zero-length request still gets a distinct, freeable pointer: 0 means failure. */
	return malloc(size > 0 ? (size_t)size : 1);
}
