/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ROT13 of stdin to stdout: an ordinary WASI command (plain main, no Spindle exports),
 * built without -mexec-model=reactor. Spindle runs such a module in a fresh instance per
 * request with the request body as stdin and stdout as the response, so unmodified WASI
 * programs can be chain functions.
 */
#include <stdio.h>

static int rot13(int c)
{
	if (c >= 'a' && c <= 'z')
		return 'a' + (c - 'a' + 13) % 26;
	if (c >= 'A' && c <= 'Z')
		return 'A' + (c - 'A' + 13) % 26;
	return c;
}

int main(void)
{
	char buf[4096];
	size_t n;

	/* Stream in chunks: memory stays constant however large the request is. */
	while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
		for (size_t i = 0; i < n; i++)
			buf[i] = (char)rot13((unsigned char)buf[i]);
		if (fwrite(buf, 1, n, stdout) != n)
			return 1;
	}
	if (ferror(stdin) || fflush(stdout) != 0)
		return 1;
	return 0;
}
