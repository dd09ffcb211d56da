/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cat_args PATH [--write]: a WASI command that reads a file of a preopened directory
 * (`files:` in the config) named by its arguments (`args:`).
 *
 * Prints "argv:" and its argv joined by spaces on the first line, then the contents of
 * PATH, a guest path such as /data/hello.txt. PATH `-` takes the path from the request body
 * instead (one trailing newline dropped), so one function can be asked for any file. With
 * --write it first tries to open PATH for writing, which Spindle's read-only preopens
 * refuse. Any failure is one line on stderr and exit status 1 (the request fails with 500
 * and that line).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

static char path[4096];

static int fail(const char *what, const char *name)
{
	fprintf(stderr, "cannot %s %s: %s\n", what, name, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PATH [--write]\n", argv[0]);
		return 2;
	}
	printf("argv:");
	for (int i = 0; i < argc; i++)
		printf(" %s", argv[i]);
	printf("\n");

	const char *name = argv[1];
	if (strcmp(name, "-") == 0) {
		size_t n = fread(path, 1, sizeof path - 1, stdin);
		path[n] = 0;
		if (n > 0 && path[n - 1] == '\n')
			path[n - 1] = 0;
		name = path;
	}
	if (argc > 2 && strcmp(argv[2], "--write") == 0) {
		FILE *w = fopen(name, "w");
		if (!w)
			return fail("write", name);
		fclose(w);
	}
	FILE *f = fopen(name, "r");
	if (!f)
		return fail("open", name);
	char buf[4096];
	size_t n;
	while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
		if (fwrite(buf, 1, n, stdout) != n)
			return 1;
	}
	if (ferror(f))
		return fail("read", name);
	fclose(f);
	return fflush(stdout) != 0;
}
