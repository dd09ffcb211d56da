/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Guest side of Spindle's function ABI, for C functions built as WASI reactors
 * (clang --target=wasm32-wasi -mexec-model=reactor).
 *
 * A function module exports `memory`, `_initialize` (provided by wasi-libc's reactor
 * startup), `spindle_alloc` (src/spindle_alloc.c: link it into every reactor) and
 * `spindle_handle`, which each function defines with SPINDLE_HANDLER:
 *
 *     #include "spindle.h"
 *
 *     static int handle(uint8_t *in, size_t len)
 *     {
 *         ... work on in[0..len), which the function may modify in place ...
 *         spindle_output(in, len);
 *         return 0;
 *     }
 *     SPINDLE_HANDLER(handle)
 *
 * The handler returns 0 on success. On failure it reports why with spindle_error() (or
 * spindle_errorf(), which returns 1 so it can be returned directly) and returns nonzero.
 * SPINDLE_HANDLER frees the input buffer after the handler returns, so memory does not
 * grow per request; the handler must not keep pointers into it.
 *
 * Everything sent to spindle_output() is copied by the host before the call returns,
 * so output buffers may be freed or reused straight away.
 *
 * stdout is fully buffered when it is not a terminal, and a reactor never exits to flush
 * it: call fflush(stdout) after printf() if the line should reach the host's log now.
 * stderr is unbuffered.
 *
 * Building natively (the unit tests in test/native_test.c): define SPINDLE_NATIVE to
 * drop the Wasm import/export attributes, and SPINDLE_HANDLE_SYMBOL to give each
 * function's entry point a distinct name so several can be linked into one program.
 */
#ifndef SPINDLE_H
#define SPINDLE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef SPINDLE_NATIVE
#define SPINDLE_IMPORT(name)
#define SPINDLE_EXPORT(name)
#else
#define SPINDLE_IMPORT(name) __attribute__((import_module("spindle"), import_name(name)))
#define SPINDLE_EXPORT(name) __attribute__((export_name(name)))
#endif

#ifndef SPINDLE_HANDLE_SYMBOL
#define SPINDLE_HANDLE_SYMBOL spindle_handle
#endif

/* Sets this hop's response bytes (last call wins; never calling it means empty output). */
SPINDLE_IMPORT("output") void spindle_output(const void *ptr, int32_t len);

/* Reports an error: the request fails with HTTP 500 naming the function and message. */
SPINDLE_IMPORT("error") void spindle_error(const void *ptr, int32_t len);

/*
 * Dynamic chains only: names the function that gets this hop's output next.
 * Returns 0 if accepted, -1 if no function of that name is part of the chain.
 * An empty name, or never calling it, ends the chain and answers the client.
 */
SPINDLE_IMPORT("next") int32_t spindle_next(const void *ptr, int32_t len);

/* Exported by src/spindle_alloc.c: where the host copies each request's input. */
SPINDLE_EXPORT("spindle_alloc") void *spindle_alloc(int32_t size);

static inline void spindle_output_str(const char *s)
{
	spindle_output(s, (int32_t)strlen(s));
}

static inline void spindle_error_str(const char *s)
{
	spindle_error(s, (int32_t)strlen(s));
}

static inline int32_t spindle_next_str(const char *name)
{
	return spindle_next(name, (int32_t)strlen(name));
}

/*
 * printf-style spindle_error(). Returns 1 so a handler can `return spindle_errorf(...)`.
 * Messages longer than 255 bytes are cut: they end up in an HTTP status body and a log.
 */
__attribute__((format(printf, 1, 2))) static inline int spindle_errorf(const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	spindle_error(msg, n);
	return 1;
}

/*
 * Calls spindle_next() and turns a refusal into an error the client can act on.
 * Returns 0 if the route was accepted, otherwise the handler's failure code.
 */
static inline int spindle_route(const char *name)
{
	if (spindle_next_str(name) == 0)
		return 0;
	return spindle_errorf("function '%s' is not part of this chain", name);
}

typedef int (*spindle_handler_fn)(uint8_t *in, size_t len);

static inline int32_t spindle_dispatch_(spindle_handler_fn fn, uint8_t *ptr, int32_t len)
{
	/* Handlers always get a valid pointer, even when the host passes (0, 0). */
	static uint8_t empty[1];
	int valid = ptr != NULL && len > 0;
	int rc = fn(valid ? ptr : empty, valid ? (size_t)len : 0);

	free(ptr);
	return rc;
}

/* Defines the `spindle_handle` export around `static int fn(uint8_t *in, size_t len)`. */
#define SPINDLE_HANDLER(fn)                                                                    \
	SPINDLE_EXPORT("spindle_handle")                                                       \
	int32_t SPINDLE_HANDLE_SYMBOL(uint8_t *ptr, int32_t len);                              \
	int32_t SPINDLE_HANDLE_SYMBOL(uint8_t *ptr, int32_t len)                               \
	{                                                                                      \
		return spindle_dispatch_(fn, ptr, len);                                        \
	}

/*
 * In-place calls (docs/guest-abi.md): for a large input the host may map the request's
 * shared-memory slot into linear memory and call
 *
 *     int32_t spindle_handle_inplace(uint8_t *buf, int32_t len, int32_t cap)
 *
 * instead of spindle_handle. The input is buf[0..len); the output is written into
 * buf[0..out_len) (in place: buf is the slot) and its length returned, 0 <= out_len <= cap.
 * A negative return is a failure (report why with spindle_error() first). spindle_output()
 * must not be called, and buf must not be freed or kept: the host reserved that memory with
 * spindle_alloc() once and maps a different slot there for every call. Modules keep
 * spindle_handle for the copy path (small inputs, isolation: fresh_per_request).
 *
 * SPINDLE_INPLACE_HANDLER(fn) defines the export around
 * `static int32_t fn(uint8_t *buf, size_t len, size_t cap)`.
 */
typedef int32_t (*spindle_inplace_fn)(uint8_t *buf, size_t len, size_t cap);

#ifndef SPINDLE_INPLACE_SYMBOL
#define SPINDLE_INPLACE_SYMBOL spindle_handle_inplace
#endif

#define SPINDLE_INPLACE_HANDLER(fn)                                                            \
	SPINDLE_EXPORT("spindle_handle_inplace")                                               \
	int32_t SPINDLE_INPLACE_SYMBOL(uint8_t *buf, int32_t len, int32_t cap);                \
	int32_t SPINDLE_INPLACE_SYMBOL(uint8_t *buf, int32_t len, int32_t cap)                 \
	{                                                                                      \
		if (len < 0 || cap < len)                                                      \
			return -1;                                                             \
		return fn(buf, (size_t)len, (size_t)cap);                                      \
	}

#endif /* SPINDLE_H */
