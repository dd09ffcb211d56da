/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Native unit tests for the example functions. Each function's source is compiled for the
 * host with SPINDLE_NATIVE (no Wasm attributes) and its entry point renamed handle_<name>;
 * this file stands in for the Spindle host: it implements the imports, copies each input
 * into a buffer from spindle_alloc() exactly as the host does, and checks what comes back.
 * Built with ASan and UBSan, so an out-of-bounds read on malformed input fails the run.
 *
 * usage: native_test PATH_TO_NATIVE_ROT13_CMD
 */
#define _POSIX_C_SOURCE 200809L
#include "spindle.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int32_t (*handler)(uint8_t *ptr, int32_t len);

int32_t handle_uppercase(uint8_t *, int32_t);
int32_t handle_reverse(uint8_t *, int32_t);
int32_t handle_frame(uint8_t *, int32_t);
int32_t handle_wordcount(uint8_t *, int32_t);
int32_t handle_jsonfield(uint8_t *, int32_t);
int32_t handle_sha256(uint8_t *, int32_t);
int32_t handle_grayscale(uint8_t *, int32_t);
int32_t handle_faulty(uint8_t *, int32_t);
int32_t handle_sleepy(uint8_t *, int32_t);
int32_t handle_frontend(uint8_t *, int32_t);
int32_t handle_cart(uint8_t *, int32_t);
int32_t handle_catalog(uint8_t *, int32_t);
int32_t handle_currency(uint8_t *, int32_t);
int32_t handle_uppercase_inplace(uint8_t *, int32_t);
int32_t handle_reverse_inplace(uint8_t *, int32_t);
int32_t inplace_uppercase_inplace(uint8_t *, int32_t, int32_t);
int32_t inplace_reverse_inplace(uint8_t *, int32_t, int32_t);

/* ---- the fake host ---- */

#define DEFAULT_CHAIN "frontend cart catalog currency"

static struct {
	uint8_t *out;
	size_t out_len;
	char err[512];
	int err_calls;
	char next[64];
	int next_calls;
	const char *chain; /* names next() accepts, space-separated */
} host;

void spindle_output(const void *ptr, int32_t len)
{
	free(host.out);
	host.out = malloc(len > 0 ? (size_t)len : 1);
	memcpy(host.out, ptr, (size_t)len);
	host.out_len = (size_t)len;
}

void spindle_error(const void *ptr, int32_t len)
{
	size_t n = (size_t)len < sizeof host.err - 1 ? (size_t)len : sizeof host.err - 1;
	memcpy(host.err, ptr, n);
	host.err[n] = '\0';
	host.err_calls++;
}

int32_t spindle_next(const void *ptr, int32_t len)
{
	size_t n = (size_t)len;
	const char *c = host.chain;

	host.next_calls++;
	snprintf(host.next, sizeof host.next, "%.*s", (int)len, (const char *)ptr);
	if (n == 0)
		return 0;
	while (*c) {
		size_t w = strcspn(c, " ");
		if (w == n && memcmp(c, ptr, n) == 0)
			return 0;
		c += w;
		c += strspn(c, " ");
	}
	return -1;
}

/* Runs one request the way the host does; returns the handler's result. */
static int32_t run(handler fn, const void *in, size_t len, const char *chain)
{
	free(host.out);
	memset(&host, 0, sizeof host);
	host.chain = chain ? chain : DEFAULT_CHAIN;

	/* Exactly len bytes, so ASan catches a read one past the end. */
	uint8_t *buf = spindle_alloc((int32_t)len);
	if (!buf) {
		fprintf(stderr, "spindle_alloc(%zu) failed\n", len);
		exit(2);
	}
	memcpy(buf, in, len);
	return fn(buf, (int32_t)len);
}

/* ---- reporting ---- */

static int passed, failed;

static void print_bytes(const char *label, const void *p, size_t n)
{
	const uint8_t *b = p;
	fprintf(stderr, "    %s (%zu bytes): \"", label, n);
	for (size_t i = 0; i < n && i < 200; i++) {
		if (b[i] >= 0x20 && b[i] < 0x7F && b[i] != '"' && b[i] != '\\')
			fputc(b[i], stderr);
		else
			fprintf(stderr, "\\x%02x", b[i]);
	}
	fprintf(stderr, n > 200 ? "\"...\n" : "\"\n");
}

static void verdict(const char *name, const char *problem)
{
	if (!problem) {
		passed++;
		return;
	}
	failed++;
	fprintf(stderr, "FAIL %s: %s\n", name, problem);
}

/* A failing handler must say why, and a succeeding one must not report an error. */
static const char *consistency(int32_t rc)
{
	if (rc != 0 && host.err_calls == 0)
		return "failed without calling error()";
	if (rc == 0 && host.err_calls != 0)
		return "called error() but returned 0";
	return NULL;
}

/* ---- table-driven cases ---- */

struct tcase {
	const char *name;
	handler fn;
	const char *in;
	size_t in_len;
	const char *field; /* FIELD for jsonfield; NULL unsets it */
	const char *chain; /* functions in the chain; NULL means DEFAULT_CHAIN */
	int fails;         /* expect a nonzero return and an error() call */
	const char *err;   /* expected substring of the error message */
	const char *out;   /* expected output, compared when check_out is set */
	size_t out_len;
	int check_out;
	const char *next; /* expected next() name; NULL means next() must not be called */
};

#define IN(s) .in = (s), .in_len = sizeof(s) - 1
#define OUT(s) .out = (s), .out_len = sizeof(s) - 1, .check_out = 1
#define FAILS(s) .fails = 1, .err = (s)

static const struct tcase cases[] = {
	/* uppercase */
	{"uppercase ascii", handle_uppercase, IN("Hello, world! 123"), OUT("HELLO, WORLD! 123")},
	{"uppercase leaves utf-8 alone", handle_uppercase, IN("w\xc3\xb6rld"), OUT("W\xc3\xb6RLD")},
	{"uppercase empty", handle_uppercase, IN(""), OUT("")},

	/* reverse */
	{"reverse ascii", handle_reverse, IN("abc"), OUT("cba")},
	{"reverse 2-byte code point", handle_reverse, IN("a\xc3\xb1" "b"), OUT("b\xc3\xb1" "a")},
	{"reverse 4-byte code point", handle_reverse, IN("\xf0\x9f\x98\x80x"), OUT("x\xf0\x9f\x98\x80")},
	{"reverse mixed", handle_reverse, IN("\xe2\x82\xac" "1\xc3\xa9"), OUT("\xc3\xa9" "1\xe2\x82\xac")},
	{"reverse invalid utf-8 bytewise", handle_reverse, IN("\xff" "ab\xc3"), OUT("\xc3" "ba\xff")},
	{"reverse empty", handle_reverse, IN(""), OUT("")},

	/* frame */
	{"frame plain", handle_frame, IN("hello"), OUT("{\"result\":\"hello\",\"bytes\":5}")},
	{"frame escapes", handle_frame, IN("say \"hi\"\\\n\t\x01"),
	 OUT("{\"result\":\"say \\\"hi\\\"\\\\\\n\\t\\u0001\",\"bytes\":12}")},
	{"frame keeps utf-8", handle_frame, IN("\xc3\xa9\xf0\x9f\x98\x80"),
	 OUT("{\"result\":\"\xc3\xa9\xf0\x9f\x98\x80\",\"bytes\":6}")},
	{"frame replaces invalid utf-8", handle_frame, IN("a\xff\xed\xa0\x80"),
	 OUT("{\"result\":\"a\\ufffd\\ufffd\\ufffd\\ufffd\",\"bytes\":5}")},
	{"frame replaces overlong and out-of-range", handle_frame, IN("\xc0\x80\xf5\x80\x80\x80"),
	 OUT("{\"result\":\"\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\",\"bytes\":6}")},
	{"frame keeps the largest code point", handle_frame, IN("\xf4\x8f\xbf\xbf"),
	 OUT("{\"result\":\"\xf4\x8f\xbf\xbf\",\"bytes\":4}")},
	{"frame truncated sequence", handle_frame, IN("\xe2\x82"),
	 OUT("{\"result\":\"\\ufffd\\ufffd\",\"bytes\":2}")},
	{"frame empty", handle_frame, IN(""), OUT("{\"result\":\"\",\"bytes\":0}")},

	/* wordcount */
	{"wordcount text", handle_wordcount, IN("hello world\nfoo  bar\n"),
	 OUT("{\"bytes\":21,\"words\":4,\"lines\":2}")},
	{"wordcount no final newline", handle_wordcount, IN("one two"),
	 OUT("{\"bytes\":7,\"words\":2,\"lines\":0}")},
	{"wordcount only space", handle_wordcount, IN(" \t\r\n\v\f"),
	 OUT("{\"bytes\":6,\"words\":0,\"lines\":1}")},
	{"wordcount empty", handle_wordcount, IN(""), OUT("{\"bytes\":0,\"words\":0,\"lines\":0}")},

	/* jsonfield */
	{"jsonfield string with escapes", handle_jsonfield,
	 IN("{\"a\":1,\"b\":\"x\\\"y\\\\\\n\\u00e9\\ud83d\\ude00\\/\"}"), .field = "b",
	 OUT("x\"y\\\n\xc3\xa9\xf0\x9f\x98\x80/")},
	{"jsonfield number", handle_jsonfield, IN("{\"n\": -12.5e+3 , \"m\":0}"), .field = "n",
	 OUT("-12.5e+3")},
	{"jsonfield literal", handle_jsonfield, IN("{\"t\":true,\"f\":false,\"z\":null}"),
	 .field = "f", OUT("false")},
	{"jsonfield nested raw", handle_jsonfield,
	 IN("{\"a\":{\"b\":[1, 2,{\"c\":null}]},\"d\":true}"), .field = "a",
	 OUT("{\"b\":[1, 2,{\"c\":null}]}")},
	{"jsonfield ignores nested keys", handle_jsonfield, IN("{\"a\":{\"x\":1},\"x\":2}"),
	 .field = "x", OUT("2")},
	{"jsonfield escaped key", handle_jsonfield, IN("{\"\\u0062\":2}"), .field = "b", OUT("2")},
	{"jsonfield last duplicate wins", handle_jsonfield, IN("{\"a\":1,\"a\":2}"), .field = "a",
	 OUT("2")},
	{"jsonfield lone surrogate", handle_jsonfield, IN("{\"a\":\"\\ud800x\"}"), .field = "a",
	 OUT("\xef\xbf\xbdx")},
	{"jsonfield whitespace", handle_jsonfield, IN(" \n{\t\"a\" : \"v\" }\r\n"), .field = "a",
	 OUT("v")},
	{"jsonfield empty string value", handle_jsonfield, IN("{\"a\":\"\"}"), .field = "a", OUT("")},
	{"jsonfield missing field", handle_jsonfield, IN("{\"a\":1}"), .field = "zz",
	 FAILS("field 'zz' not found")},
	{"jsonfield empty object", handle_jsonfield, IN("{}"), .field = "a", FAILS("not found")},
	{"jsonfield array", handle_jsonfield, IN("[1,2]"), .field = "a", FAILS("not a JSON object")},
	{"jsonfield empty input", handle_jsonfield, IN(""), .field = "a", FAILS("not a JSON object")},
	{"jsonfield trailing comma", handle_jsonfield, IN("{\"a\":1,}"), .field = "a",
	 FAILS("malformed JSON at byte 7")},
	{"jsonfield trailing data", handle_jsonfield, IN("{\"a\":1} x"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield leading zero", handle_jsonfield, IN("{\"a\":01}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield bad escape", handle_jsonfield, IN("{\"a\":\"\\x\"}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield short \\u", handle_jsonfield, IN("{\"a\":\"\\u12\"}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield raw control char", handle_jsonfield, IN("{\"a\":\"x\ny\"}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield truncated", handle_jsonfield, IN("{\"a\":\"abc"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield bad literal", handle_jsonfield, IN("{\"a\":tru}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield fault after field", handle_jsonfield, IN("{\"a\":1,\"b\":[}"), .field = "a",
	 FAILS("malformed JSON")},
	{"jsonfield FIELD unset", handle_jsonfield, IN("{\"a\":1}"), FAILS("FIELD is not set")},

	/* sha256 */
	{"sha256 abc", handle_sha256, IN("abc"),
	 OUT("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")},
	{"sha256 empty", handle_sha256, IN(""),
	 OUT("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")},
	{"sha256 two blocks", handle_sha256,
	 IN("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
	 OUT("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")},

	/* grayscale: red and blue pixels, with a comment in the header */
	{"grayscale 2x1", handle_grayscale, IN("P6\n# two pixels\n2 1\n255\n\xff\x00\x00\x00\x00\xff"),
	 OUT("P5\n2 1\n255\n\x4c\x1d")},
	{"grayscale white black green", handle_grayscale,
	 IN("P6 3#c\n1 255 \xff\xff\xff\x00\x00\x00\x00\xff\x00"), OUT("P5\n3 1\n255\n\xff\x00\x96")},
	{"grayscale ignores trailing data", handle_grayscale, IN("P6 1 1 255\n\x10\x10\x10P6 1 1"),
	 OUT("P5\n1 1\n255\n\x10")},
	{"grayscale truncated pixels", handle_grayscale, IN("P6\n2 1\n255\n\xff\x00\x00\x00\x00"),
	 FAILS("truncated PPM")},
	{"grayscale ascii ppm", handle_grayscale, IN("P3\n1 1\n255\n0 0 0\n"), FAILS("not a binary PPM")},
	{"grayscale 16-bit", handle_grayscale, IN("P6\n1 1\n65535\n\0\0\0\0\0\0"), FAILS("maxval 65535")},
	{"grayscale zero width", handle_grayscale, IN("P6 0 1 255\n"), FAILS("empty")},
	{"grayscale header at eof", handle_grayscale, IN("P6\n2 1\n255"), FAILS("malformed PPM header")},
	{"grayscale junk in number", handle_grayscale, IN("P6\n2x 1\n255\n"), FAILS("malformed PPM header")},
	{"grayscale huge dimension", handle_grayscale, IN("P6 99999999999 1 255\n"),
	 FAILS("malformed PPM header")},
	{"grayscale huge image", handle_grayscale, IN("P6 1000000 1000000 255\n\0\0\0"),
	 FAILS("truncated PPM")},
	{"grayscale magic only", handle_grayscale, IN("P6"), FAILS("malformed PPM header")},
	{"grayscale empty", handle_grayscale, IN(""), FAILS("not a binary PPM")},

	/* faulty: the harmless modes (trap and loop run in a child process below) */
	{"faulty echo", handle_faulty, IN("hello"), OUT("hello")},
	{"faulty near miss echoes", handle_faulty, IN("traps"), OUT("traps")},
	{"faulty error", handle_faulty, IN("error\n"), FAILS("requested error")},
	{"faulty sleep echoes", handle_faulty, IN("sleep 1"), OUT("sleep 1")},

	/* sleepy (how long each request waits is checked in sleepy_waits) */
	{"sleepy echoes", handle_sleepy, IN("hello spindle"), OUT("hello spindle")},
	{"sleepy empty", handle_sleepy, IN(""), OUT("")},
	{"sleepy sleep=0 echoes", handle_sleepy, IN("sleep=0"), OUT("sleep=0")},
	{"sleepy sleep=N then text", handle_sleepy, IN("sleep=1\nrest"), OUT("sleep=1\nrest")},
	{"sleepy prefix only is default", handle_sleepy, IN("sleep"), OUT("sleep")},
	{"sleepy other case is default", handle_sleepy, IN("SLEEP=x"), OUT("SLEEP=x")},
	{"sleepy leading zeros", handle_sleepy, IN("sleep=0000"), OUT("sleep=0000")},
	{"sleepy no digits", handle_sleepy, IN("sleep="), FAILS("bad sleep")},
	{"sleepy not a number", handle_sleepy, IN("sleep=x"), FAILS("bad sleep")},
	{"sleepy junk after digits", handle_sleepy, IN("sleep=5ms"), FAILS("bad sleep")},
	{"sleepy negative", handle_sleepy, IN("sleep=-1"), FAILS("bad sleep")},
	{"sleepy too long", handle_sleepy, IN("sleep=1001"), FAILS("0..=1000 ms")},
	{"sleepy huge", handle_sleepy, IN("sleep=99999999999999999999999"), FAILS("bad sleep")},

	/* frontend */
	{"frontend cart", handle_frontend, IN("cart add shoes"), OUT("cart add shoes"), .next = "cart"},
	{"frontend product", handle_frontend, IN("product OLJCESPC7Z\n"), OUT("product OLJCESPC7Z\n"),
	 .next = "catalog"},
	{"frontend convert", handle_frontend, IN("  convert 12 EUR"), OUT("  convert 12 EUR"),
	 .next = "currency"},
	{"frontend home", handle_frontend, IN("home"), OUT("welcome to the boutique")},
	{"frontend empty", handle_frontend, IN(""), OUT("welcome to the boutique")},
	{"frontend blank line", handle_frontend, IN(" \r\n"), OUT("welcome to the boutique")},
	{"frontend unknown op", handle_frontend, IN("fly away"), FAILS("unknown op 'fly'")},
	{"frontend op prefix is not op", handle_frontend, IN("carts"), FAILS("unknown op 'carts'")},
	{"frontend route missing from chain", handle_frontend, IN("cart show"), .chain = "catalog",
	 FAILS("function 'cart' is not part of this chain"), .next = "cart"},

	/* cart (state carries over between these cases, as in one reused instance) */
	{"cart empty", handle_cart, IN("cart show"), OUT("cart: empty")},
	{"cart add", handle_cart, IN("cart add blue shoes\n"), OUT("cart: added blue shoes")},
	{"cart add another", handle_cart, IN("cart  add   mug "), OUT("cart: added mug")},
	{"cart show items", handle_cart, IN("cart show\n"), OUT("cart: 2 items: blue shoes, mug")},
	{"cart total routes to currency", handle_cart, IN("cart total 12.50 eur\n"),
	 OUT("convert 12.50 eur"), .next = "currency"},
	{"cart total without currency in chain", handle_cart, IN("cart total 1 EUR"),
	 .chain = "frontend cart", FAILS("not part of this chain"), .next = "currency"},
	{"cart add nothing", handle_cart, IN("cart add  "), FAILS("usage: cart add ITEM")},
	{"cart total missing currency", handle_cart, IN("cart total 12"), FAILS("usage")},
	{"cart total extra word", handle_cart, IN("cart total 12 EUR now"), FAILS("usage")},
	{"cart total overlong amount", handle_cart, IN("cart total 123456789012345678901 EUR"),
	 FAILS("too long")},
	{"cart unknown subcommand", handle_cart, IN("cart frobnicate"), FAILS("usage")},
	{"cart wrong op", handle_cart, IN("product X"), FAILS("not a cart request")},
	{"cart item too long", handle_cart, IN("cart add 12345678901234567890123456789012345678901"),
	 FAILS("longer than 40")},

	/* catalog */
	{"catalog sunglasses", handle_catalog, IN("product OLJCESPC7Z"),
	 OUT("product OLJCESPC7Z: Sunglasses, 19.99 USD")},
	{"catalog watch", handle_catalog, IN("product 1YMWWN1N4O\n"),
	 OUT("product 1YMWWN1N4O: Watch, 109.99 USD")},
	{"catalog unknown id", handle_catalog, IN("product NOPE"), FAILS("unknown product 'NOPE'")},
	{"catalog no id", handle_catalog, IN("product"), FAILS("usage: product ID")},
	{"catalog two ids", handle_catalog, IN("product a b"), FAILS("usage")},

	/* currency */
	{"currency eur", handle_currency, IN("convert 12 EUR"), OUT("12.00 USD = 11.04 EUR")},
	{"currency jpy lowercase", handle_currency, IN("convert 12.5 jpy\n"),
	 OUT("12.50 USD = 1868.75 JPY")},
	{"currency usd", handle_currency, IN("convert 7.25 USD"), OUT("7.25 USD = 7.25 USD")},
	{"currency rounds half up", handle_currency, IN("convert 0.01 EUR"), OUT("0.01 USD = 0.01 EUR")},
	{"currency rounds down", handle_currency, IN("convert 0.05 GBP"), OUT("0.05 USD = 0.04 GBP")},
	{"currency largest amount", handle_currency, IN("convert 999999999.99 INR"),
	 OUT("999999999.99 USD = 83199999999.17 INR")},
	{"currency too large", handle_currency, IN("convert 1000000000 EUR"), FAILS("bad amount")},
	{"currency three decimals", handle_currency, IN("convert 12.345 EUR"), FAILS("bad amount")},
	{"currency negative", handle_currency, IN("convert -1 EUR"), FAILS("bad amount '-1'")},
	{"currency exponent", handle_currency, IN("convert 1e3 EUR"), FAILS("bad amount")},
	{"currency bare dot", handle_currency, IN("convert 12. EUR"), FAILS("bad amount")},
	{"currency no whole part", handle_currency, IN("convert .5 EUR"), FAILS("bad amount")},
	{"currency unknown", handle_currency, IN("convert 12 XYZ"), FAILS("unknown currency 'XYZ'")},
	{"currency missing code", handle_currency, IN("convert 12"), FAILS("usage")},
	{"currency wrong op", handle_currency, IN("cart total 1 EUR"), FAILS("usage")},
};

static void set_field(const char *field)
{
	if (field)
		setenv("FIELD", field, 1);
	else
		unsetenv("FIELD");
}

static void run_case(const struct tcase *c)
{
	set_field(c->field);
	int32_t rc = run(c->fn, c->in, c->in_len, c->chain);
	const char *problem = consistency(rc);

	if (!problem && c->fails && rc == 0)
		problem = "succeeded, expected failure";
	if (!problem && !c->fails && rc != 0)
		problem = "failed";
	if (!problem && c->err && !strstr(host.err, c->err))
		problem = "wrong error message";
	if (!problem && c->check_out &&
	    (host.out_len != c->out_len || memcmp(host.out ? (void *)host.out : "", c->out, c->out_len)))
		problem = "wrong output";
	if (!problem && !c->next && host.next_calls)
		problem = "called next() unexpectedly";
	if (!problem && c->next && (!host.next_calls || strcmp(host.next, c->next)))
		problem = "wrong next()";

	verdict(c->name, problem);
	if (problem) {
		print_bytes("input", c->in, c->in_len);
		if (host.out)
			print_bytes("output", host.out, host.out_len);
		if (c->check_out)
			print_bytes("expected", c->out, c->out_len);
		fprintf(stderr, "    rc %d, error \"%s\", next %s%s%s\n", rc, host.err,
			host.next_calls ? "\"" : "", host.next_calls ? host.next : "not called",
			host.next_calls ? "\"" : "");
	}
}

/* ---- checks that need more than one request ---- */

static void check_output(const char *name, handler fn, const void *in, size_t len,
			 const char *want)
{
	int32_t rc = run(fn, in, len, NULL);
	const char *problem = consistency(rc);
	if (!problem && rc != 0)
		problem = host.err;
	if (!problem && (host.out_len != strlen(want) || memcmp(host.out, want, host.out_len)))
		problem = "wrong output";
	verdict(name, problem);
	if (problem && host.out)
		print_bytes("output", host.out, host.out_len);
}

static void sha256_lengths(void)
{
	/* SHA-256 of n 'a's, around the padding boundaries (55/56, 63/64, 119/120 bytes). */
	static const struct {
		size_t n;
		const char *hex;
	} v[] = {
		{1, "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"},
		{55, "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318"},
		{56, "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a"},
		{63, "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34"},
		{64, "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"},
		{65, "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"},
		{119, "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb"},
		{120, "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c"},
		{128, "6836cf13bac400e9105071cd6af47084dfacad4e5e302c94bfed24e013afb73e"},
		{1000000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
	};
	char *a = malloc(1000000);
	memset(a, 'a', 1000000);
	for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
		char name[64];
		snprintf(name, sizeof name, "sha256 of %zu 'a's", v[i].n);
		check_output(name, handle_sha256, a, v[i].n, v[i].hex);
	}
	free(a);
}

static void grayscale_large(void)
{
	/* A 300x200 gradient: exercises a multi-line header and the per-pixel formula. */
	enum { W = 300, H = 200 };
	const char *head = "P6\n# generated\n300 200\n# maxval next\n255\n";
	size_t hn = strlen(head), n = hn + (size_t)W * H * 3;
	uint8_t *img = malloc(n);
	memcpy(img, head, hn);
	for (size_t i = 0; i < (size_t)W * H; i++) {
		img[hn + 3 * i] = (uint8_t)i;
		img[hn + 3 * i + 1] = (uint8_t)(i >> 3);
		img[hn + 3 * i + 2] = (uint8_t)(i * 7);
	}
	int32_t rc = run(handle_grayscale, img, n, NULL);
	const char *problem = consistency(rc);
	const char *want_head = "P5\n300 200\n255\n";
	size_t wn = strlen(want_head);
	if (!problem && rc != 0)
		problem = host.err;
	if (!problem && (host.out_len != wn + (size_t)W * H || memcmp(host.out, want_head, wn)))
		problem = "wrong output size or header";
	for (size_t i = 0; !problem && i < (size_t)W * H; i++) {
		const uint8_t *px = img + hn + 3 * i;
		double y = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2];
		if (host.out[wn + i] != (uint8_t)(y + 0.5))
			problem = "pixel differs from the floating-point formula";
	}
	verdict("grayscale 300x200 gradient", problem);
	free(img);
}

static void jsonfield_depth(void)
{
	/* Deep nesting must be refused cleanly, not recurse off the end of the stack. */
	enum { DEEP = 100000 };
	char *doc = malloc(2 * DEEP + 16);
	size_t n = 0;
	n += (size_t)sprintf(doc, "{\"a\":");
	memset(doc + n, '[', DEEP);
	n += DEEP;
	memset(doc + n, ']', DEEP);
	n += DEEP;
	doc[n++] = '}';

	set_field("a");
	int32_t rc = run(handle_jsonfield, doc, n, NULL);
	const char *problem = consistency(rc);
	if (!problem && (rc == 0 || !strstr(host.err, "malformed JSON")))
		problem = "deep nesting was not refused";
	verdict("jsonfield refuses 100000-deep nesting", problem);

	n = (size_t)sprintf(doc, "{\"a\":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}");
	check_output("jsonfield accepts 20-deep nesting", handle_jsonfield, doc, n,
		     "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]");
	free(doc);
}

static void cart_fills_up(void)
{
	int32_t rc = 0;
	/* Two items are already in the cart from the table; fill the other 14. */
	for (int i = 0; i < 14; i++) {
		rc = run(handle_cart, "cart add x", 10, NULL);
		if (rc)
			break;
	}
	const char *problem = rc ? "could not fill the cart" : NULL;
	if (!problem) {
		rc = run(handle_cart, "cart add one too many", 21, NULL);
		problem = consistency(rc);
		if (!problem && (rc == 0 || !strstr(host.err, "cart is full")))
			problem = "17th item was accepted";
	}
	verdict("cart holds 16 items", problem);
}

static void empty_pointer(void)
{
	/* The host may pass (0, 0) for an empty body without calling spindle_alloc. */
	int32_t rc = handle_uppercase(NULL, 0);
	verdict("handler accepts a null empty input", rc == 0 ? NULL : "failed");
}

/* Property: jsonfield recovers frame's input from its JSON (valid UTF-8 input). */
static void frame_round_trip(void)
{
	const char *in = "quotes \" backslash \\ tab \t nl \n ctl \x1f \xc3\xa9 \xf0\x9f\x98\x80";
	size_t len = strlen(in);
	const char *problem = NULL;

	if (run(handle_frame, in, len, NULL) != 0)
		problem = "frame failed";
	if (!problem) {
		uint8_t *framed = host.out;
		size_t framed_len = host.out_len;
		host.out = NULL;
		set_field("result");
		if (run(handle_jsonfield, framed, framed_len, NULL) != 0)
			problem = host.err;
		else if (host.out_len != len || memcmp(host.out, in, len))
			problem = "round trip changed the text";
		free(framed);
	}
	verdict("frame output parses back to the input", problem);
}

/* ---- malformed input never crashes ---- */

static uint32_t rng_state = 12345;

static uint32_t rng(void)
{
	/* xorshift32: deterministic, so a failure reproduces. */
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return rng_state;
}

/*
 * Feeds each handler every prefix of each of its table inputs, byte-mutated copies and
 * random bytes. ASan/UBSan abort the run on any bad access; here we check that every
 * failure is reported through error() and every frame output re-parses as JSON.
 */
static void fuzz(void)
{
	static const struct {
		const char *name;
		handler fn;
	} targets[] = {
		{"uppercase", handle_uppercase}, {"reverse", handle_reverse},
		{"frame", handle_frame},         {"wordcount", handle_wordcount},
		{"jsonfield", handle_jsonfield}, {"sha256", handle_sha256},
		{"grayscale", handle_grayscale}, {"frontend", handle_frontend},
		{"cart", handle_cart},           {"catalog", handle_catalog},
		{"currency", handle_currency},
	};
	static const char alphabet[] = "{}[]\":,\\u0123456789.eE+-tfnrlasP6 \n\t#\x80\xc3\xff";
	uint8_t buf[256];

	for (size_t t = 0; t < sizeof targets / sizeof targets[0]; t++) {
		const char *problem = NULL;
		size_t runs = 0;

		set_field("a");
		for (size_t c = 0; c < sizeof cases / sizeof cases[0] && !problem; c++) {
			if (cases[c].fn != targets[t].fn || cases[c].in_len > sizeof buf)
				continue;
			size_t len = cases[c].in_len;
			for (size_t cut = 0; cut <= len && !problem; cut++, runs++)
				problem = consistency(run(targets[t].fn, cases[c].in, cut, NULL));
			for (int m = 0; m < 200 && !problem; m++, runs++) {
				memcpy(buf, cases[c].in, len);
				for (int k = 0; len && k < 3; k++)
					buf[rng() % len] = (uint8_t)alphabet[rng() % (sizeof alphabet - 1)];
				problem = consistency(run(targets[t].fn, buf, len, NULL));
			}
		}
		for (int r = 0; r < 2000 && !problem; r++, runs++) {
			size_t len = rng() % 64;
			for (size_t i = 0; i < len; i++)
				buf[i] = r % 2 ? (uint8_t)rng()
					       : (uint8_t)alphabet[rng() % (sizeof alphabet - 1)];
			problem = consistency(run(targets[t].fn, buf, len, NULL));
			if (!problem && targets[t].fn == handle_frame) {
				uint8_t *framed = host.out;
				size_t framed_len = host.out_len;
				host.out = NULL;
				set_field("result");
				if (run(handle_jsonfield, framed, framed_len, NULL) != 0)
					problem = "frame produced JSON that jsonfield rejects";
				set_field("a");
				free(framed);
			}
		}

		char name[64];
		snprintf(name, sizeof name, "%s survives %zu malformed inputs", targets[t].name, runs);
		verdict(name, problem);
	}
}

/* Milliseconds one sleepy request takes, wall clock; -1 if it failed. */
static double sleepy_ms(const char *in)
{
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	int32_t rc = run(handle_sleepy, in, strlen(in), NULL);
	clock_gettime(CLOCK_MONOTONIC, &b);
	if (rc != 0)
		return -1;
	return (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
}

/*
 * sleepy waits at least what it is asked (2 ms by default). Only lower bounds, and one
 * upper bound far above any scheduling delay: a loaded machine may wake a sleeper late.
 */
static void sleepy_waits(void)
{
	static const struct {
		const char *in;
		double at_least;
	} v[] = {{"hello", 2}, {"", 2}, {"sleep=5", 5}, {"sleep=12 and text", 12}, {"sleep=0", 0}};
	for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
		char name[64];
		snprintf(name, sizeof name, "sleepy \"%s\" waits >= %.0f ms", v[i].in, v[i].at_least);
		double ms = sleepy_ms(v[i].in);
		verdict(name, ms < 0 ? "failed" : ms < v[i].at_least ? "woke too early"
					  : ms > v[i].at_least + 500 ? "slept far too long" : NULL);
		if (ms >= 0 && (ms < v[i].at_least || ms > v[i].at_least + 500))
			fprintf(stderr, "    took %.3f ms\n", ms);
	}
}

/*
 * sleepy's parser on malformed input. Not in fuzz(): its random inputs would each wait the
 * default 2 ms. Here every input starts with "sleep=" and its only digit is 0, so a valid
 * one waits 0 ms.
 */
static void sleepy_fuzz(void)
{
	static const char alphabet[] = "0 \n\t=x-+.ms\x80\xff";
	uint8_t buf[64];
	const char *problem = NULL;
	size_t runs = 0;

	memcpy(buf, "sleep=", 6);
	for (int r = 0; r < 2000 && !problem; r++, runs++) {
		size_t len = 6 + rng() % 16;
		for (size_t i = 6; i < len; i++) {
			buf[i] = r % 2 ? (uint8_t)rng() : (uint8_t)alphabet[rng() % (sizeof alphabet - 1)];
			if (buf[i] >= '1' && buf[i] <= '9')
				buf[i] = 'x';
		}
		int32_t rc = run(handle_sleepy, buf, len, NULL);
		problem = consistency(rc);
		if (!problem && rc == 0 && (host.out_len != len || memcmp(host.out, buf, len)))
			problem = "did not echo its input";
	}
	char name[64];
	snprintf(name, sizeof name, "sleepy survives %zu malformed inputs", runs);
	verdict(name, problem);
}

/* ---- faults that end the process: run them in a child ---- */

/* Forks, runs one request with stdout/stderr sent to capture (if any); returns the wait status. */
static int run_in_child(handler fn, const char *in, unsigned timeout, const char *capture)
{
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		exit(2);
	}
	if (pid == 0) {
		if (capture) {
			int fd = open(capture, O_WRONLY | O_CREAT | O_TRUNC, 0600);
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		alarm(timeout);
		int32_t rc = run(fn, in, strlen(in), NULL);
		/* _exit: skip LeakSanitizer's exit-time scan in the child. */
		_exit(rc == 0 ? 0 : 1);
	}
	int status;
	waitpid(pid, &status, 0);
	return status;
}

static void faulty_in_child(void)
{
	int st = run_in_child(handle_faulty, "trap", 5, NULL);
	verdict("faulty trap kills the process",
		WIFSIGNALED(st) && (WTERMSIG(st) == SIGILL || WTERMSIG(st) == SIGTRAP)
			? NULL
			: "did not die of SIGILL/SIGTRAP");

	st = run_in_child(handle_faulty, " loop\n", 1, NULL);
	verdict("faulty loop spins until killed",
		WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM ? NULL : "did not run until the alarm");

	char path[] = "/tmp/spindle-native-test-XXXXXX";
	int fd = mkstemp(path);
	close(fd);
	st = run_in_child(handle_faulty, "print", 5, path);
	char text[512] = "";
	FILE *f = fopen(path, "r");
	size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
	text[n] = '\0';
	if (f)
		fclose(f);
	unlink(path);
	verdict("faulty print writes stdout and stderr",
		WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(text, "print requested") &&
				strstr(text, "goes to stderr")
			? NULL
			: "missing output");
}

/* ---- the WASI command, run as a program ---- */

static void rot13_cmd(const char *exe, const char *name, const char *in, size_t len,
		      const char *want)
{
	char in_path[] = "/tmp/spindle-rot13-in-XXXXXX", out_path[] = "/tmp/spindle-rot13-out-XXXXXX";
	int in_fd = mkstemp(in_path), out_fd = mkstemp(out_path);
	const char *problem = NULL;

	if (write(in_fd, in, len) != (ssize_t)len)
		problem = "could not write the input file";
	lseek(in_fd, 0, SEEK_SET);
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		dup2(in_fd, 0);
		dup2(out_fd, 1);
		execl(exe, exe, (char *)NULL);
		_exit(127);
	}
	int st;
	waitpid(pid, &st, 0);
	if (!problem && !(WIFEXITED(st) && WEXITSTATUS(st) == 0))
		problem = "did not exit 0";

	char *got = malloc(len + 1);
	ssize_t n = pread(out_fd, got, len + 1, 0);
	if (!problem && (n != (ssize_t)len || memcmp(got, want, len)))
		problem = "wrong output";
	free(got);
	close(in_fd);
	close(out_fd);
	unlink(in_path);
	unlink(out_path);
	verdict(name, problem);
}

static void rot13_tests(const char *exe)
{
	rot13_cmd(exe, "rot13_cmd hello", "Hello, World!\n", 14, "Uryyb, Jbeyq!\n");
	rot13_cmd(exe, "rot13_cmd empty", "", 0, "");

	/* Larger than its 4 KiB buffer, so it must stream across reads. */
	enum { N = 100000 };
	char *in = malloc(N), *want = malloc(N);
	for (size_t i = 0; i < N; i++) {
		in[i] = (char)(i % 128);
		want[i] = in[i] >= 'a' && in[i] <= 'z'   ? (char)('a' + (in[i] - 'a' + 13) % 26)
			  : in[i] >= 'A' && in[i] <= 'Z' ? (char)('A' + (in[i] - 'A' + 13) % 26)
							 : in[i];
	}
	rot13_cmd(exe, "rot13_cmd 100000 bytes", in, N, want);
	free(in);
	free(want);
}

/*
 * The in-place variants give what the plain functions give, through either entry point:
 * spindle_handle (copy path) and spindle_handle_inplace on a buffer of exactly `cap` bytes
 * (ASan catches a write past it), for random bytes (ASCII, UTF-8, invalid sequences).
 */
static void inplace_variants_agree(void)
{
	static const struct {
		const char *name;
		handler plain, copy_path;
		int32_t (*inplace)(uint8_t *, int32_t, int32_t);
	} pairs[] = {
		{"uppercase_inplace", handle_uppercase, handle_uppercase_inplace,
		 inplace_uppercase_inplace},
		{"reverse_inplace", handle_reverse, handle_reverse_inplace, inplace_reverse_inplace},
	};
	static const char alphabet[] = "abcXYZ \n\xc3\xb1\xe2\x82\xac\xf0\x9f\x98\x80\xff\x80";

	for (size_t p = 0; p < sizeof pairs / sizeof pairs[0]; p++) {
		const char *problem = NULL;
		for (int round = 0; round < 300 && !problem; round++) {
			size_t len = rng() % 200, cap = len + rng() % 8;
			uint8_t in[200], *buf = malloc(cap ? cap : 1);
			for (size_t i = 0; i < len; i++)
				in[i] = (uint8_t)alphabet[rng() % (sizeof alphabet - 1)];
			if (run(pairs[p].plain, in, len, NULL) != 0) {
				problem = "the plain function failed";
				free(buf);
				break;
			}
			uint8_t *want = malloc(host.out_len ? host.out_len : 1);
			size_t want_len = host.out_len;
			memcpy(want, host.out, want_len);
			if (run(pairs[p].copy_path, in, len, NULL) != 0 || host.out_len != want_len ||
			    memcmp(host.out, want, want_len) != 0)
				problem = "spindle_handle differs from the plain function";
			memcpy(buf, in, len);
			int32_t n = pairs[p].inplace(buf, (int32_t)len, (int32_t)cap);
			if (!problem && (n != (int32_t)want_len || memcmp(buf, want, want_len) != 0))
				problem = "spindle_handle_inplace differs from the plain function";
			if (!problem && (pairs[p].inplace(buf, -1, 4) >= 0 ||
					 pairs[p].inplace(buf, 5, 4) >= 0))
				problem = "accepted a length outside 0..=cap";
			free(want);
			free(buf);
		}
		verdict(pairs[p].name, problem);
	}
}

int main(int argc, char **argv)
{
	inplace_variants_agree();
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		run_case(&cases[i]);
	sha256_lengths();
	grayscale_large();
	jsonfield_depth();
	cart_fills_up();
	empty_pointer();
	frame_round_trip();
	fuzz();
	sleepy_waits();
	sleepy_fuzz();
	faulty_in_child();
	if (argc > 1)
		rot13_tests(argv[1]);
	else
		fprintf(stderr, "note: no rot13_cmd path given, skipping the command tests\n");

	free(host.out);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
