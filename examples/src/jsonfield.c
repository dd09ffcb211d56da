/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Outputs one top-level field of a JSON object: the field named by the FIELD environment
 * variable (set in the chain's YAML). A string value is output unquoted and unescaped
 * (as UTF-8); any other value is output as its JSON text, exactly as it appears in the
 * input. The whole input is validated first, so malformed JSON is an error even when
 * the field comes before the fault. If the field appears more than once the last one
 * wins, as in JavaScript's JSON.parse.
 *
 * Every read is bounds-checked against the input length, and nesting is limited to
 * MAX_DEPTH so hostile input cannot exhaust the (small) Wasm stack.
 */
#include "spindle.h"

enum { MAX_DEPTH = 64 };

struct parser {
	const uint8_t *s;
	size_t len;
	size_t pos;
};

static int peek(const struct parser *p)
{
	return p->pos < p->len ? p->s[p->pos] : -1;
}

static void skip_ws(struct parser *p)
{
	while (p->pos < p->len) {
		uint8_t c = p->s[p->pos];
		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		p->pos++;
	}
}

static int hex_value(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Skips a string starting at its opening quote. Returns 0, or -1 with pos at the fault. */
static int parse_string(struct parser *p)
{
	p->pos++;
	while (p->pos < p->len) {
		uint8_t c = p->s[p->pos];
		if (c == '"') {
			p->pos++;
			return 0;
		}
		if (c < 0x20)
			return -1;
		if (c != '\\') {
			p->pos++;
			continue;
		}
		p->pos++;
		switch (peek(p)) {
		case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
			p->pos++;
			break;
		case 'u':
			p->pos++;
			for (int i = 0; i < 4; i++, p->pos++)
				if (hex_value(peek(p)) < 0)
					return -1;
			break;
		default:
			return -1;
		}
	}
	return -1;
}

static int skip_digits(struct parser *p)
{
	size_t start = p->pos;
	while (peek(p) >= '0' && peek(p) <= '9')
		p->pos++;
	return p->pos > start ? 0 : -1;
}

static int parse_number(struct parser *p)
{
	if (peek(p) == '-')
		p->pos++;
	if (peek(p) == '0')
		p->pos++;
	else if (skip_digits(p) < 0)
		return -1;
	if (peek(p) == '.') {
		p->pos++;
		if (skip_digits(p) < 0)
			return -1;
	}
	if (peek(p) == 'e' || peek(p) == 'E') {
		p->pos++;
		if (peek(p) == '+' || peek(p) == '-')
			p->pos++;
		if (skip_digits(p) < 0)
			return -1;
	}
	return 0;
}

static int parse_literal(struct parser *p, const char *word)
{
	size_t n = strlen(word);
	if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0)
		return -1;
	p->pos += n;
	return 0;
}

static int parse_value(struct parser *p, int depth);

/* Parses the members of an array or object after its opening bracket. */
static int parse_container(struct parser *p, int depth, int close)
{
	p->pos++;
	skip_ws(p);
	if (peek(p) == close) {
		p->pos++;
		return 0;
	}
	for (;;) {
		if (close == '}') {
			if (peek(p) != '"' || parse_string(p) < 0)
				return -1;
			skip_ws(p);
			if (peek(p) != ':')
				return -1;
			p->pos++;
			skip_ws(p);
		}
		if (parse_value(p, depth + 1) < 0)
			return -1;
		skip_ws(p);
		if (peek(p) == close) {
			p->pos++;
			return 0;
		}
		if (peek(p) != ',')
			return -1;
		p->pos++;
		skip_ws(p);
	}
}

static int parse_value(struct parser *p, int depth)
{
	if (depth > MAX_DEPTH)
		return -1;
	switch (peek(p)) {
	case '{': return parse_container(p, depth, '}');
	case '[': return parse_container(p, depth, ']');
	case '"': return parse_string(p);
	case 't': return parse_literal(p, "true");
	case 'f': return parse_literal(p, "false");
	case 'n': return parse_literal(p, "null");
	default: return parse_number(p);
	}
}

static uint8_t *put_utf8(uint8_t *o, uint32_t cp)
{
	if (cp < 0x80) {
		*o++ = (uint8_t)cp;
	} else if (cp < 0x800) {
		*o++ = (uint8_t)(0xC0 | cp >> 6);
		*o++ = (uint8_t)(0x80 | (cp & 0x3F));
	} else if (cp < 0x10000) {
		*o++ = (uint8_t)(0xE0 | cp >> 12);
		*o++ = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
		*o++ = (uint8_t)(0x80 | (cp & 0x3F));
	} else {
		*o++ = (uint8_t)(0xF0 | cp >> 18);
		*o++ = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
		*o++ = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
		*o++ = (uint8_t)(0x80 | (cp & 0x3F));
	}
	return o;
}

static uint32_t hex4(const uint8_t *s)
{
	uint32_t v = 0;
	for (int i = 0; i < 4; i++)
		v = v << 4 | (uint32_t)hex_value(s[i]);
	return v;
}

/*
 * Decodes the body of a string that parse_string() accepted into out, which needs at
 * most n bytes: every escape is at least as long as what it stands for. Returns the
 * decoded length. Unpaired surrogates decode to U+FFFD.
 */
static size_t unescape(uint8_t *out, const uint8_t *s, size_t n)
{
	uint8_t *o = out;

	for (size_t i = 0; i < n;) {
		if (s[i] != '\\') {
			*o++ = s[i++];
			continue;
		}
		uint8_t e = s[i + 1];
		i += 2;
		switch (e) {
		case 'b': *o++ = '\b'; break;
		case 'f': *o++ = '\f'; break;
		case 'n': *o++ = '\n'; break;
		case 'r': *o++ = '\r'; break;
		case 't': *o++ = '\t'; break;
		case 'u': {
			uint32_t cp = hex4(s + i);
			i += 4;
			if (cp >= 0xD800 && cp <= 0xDBFF && n - i >= 6 && s[i] == '\\' &&
			    s[i + 1] == 'u') {
				uint32_t lo = hex4(s + i + 2);
				if (lo >= 0xDC00 && lo <= 0xDFFF) {
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
					i += 6;
				}
			}
			if (cp >= 0xD800 && cp <= 0xDFFF)
				cp = 0xFFFD;
			o = put_utf8(o, cp);
			break;
		}
		default: *o++ = e; break; /* '"', '\\' and '/' stand for themselves */
		}
	}
	return (size_t)(o - out);
}

/* Finds the last member named field; on success sets vstart and vend around its value. */
static int find_field(struct parser *p, uint8_t *scratch, const char *field, size_t *vstart,
		      size_t *vend)
{
	size_t field_len = strlen(field);
	int found = 0;

	p->pos++;
	skip_ws(p);
	if (peek(p) == '}') {
		p->pos++;
		return 0;
	}
	for (;;) {
		size_t kstart = p->pos + 1;
		if (peek(p) != '"' || parse_string(p) < 0)
			return -1;
		size_t klen = unescape(scratch, p->s + kstart, p->pos - 1 - kstart);
		skip_ws(p);
		if (peek(p) != ':')
			return -1;
		p->pos++;
		skip_ws(p);
		size_t start = p->pos;
		if (parse_value(p, 1) < 0)
			return -1;
		if (klen == field_len && memcmp(scratch, field, klen) == 0) {
			*vstart = start;
			*vend = p->pos;
			found = 1;
		}
		skip_ws(p);
		if (peek(p) == '}') {
			p->pos++;
			return found;
		}
		if (peek(p) != ',')
			return -1;
		p->pos++;
		skip_ws(p);
	}
}

static int handle(uint8_t *in, size_t len)
{
	const char *field = getenv("FIELD");
	if (!field)
		return spindle_errorf("FIELD is not set: name the field in the function's env");

	struct parser p = {in, len, 0};
	skip_ws(&p);
	if (peek(&p) != '{')
		return spindle_errorf("input is not a JSON object");

	/* Keys and the result decode into this; decoding never makes anything longer. */
	uint8_t *scratch = malloc(len);
	if (!scratch)
		return spindle_errorf("out of memory");

	size_t vstart = 0, vend = 0;
	int found = find_field(&p, scratch, field, &vstart, &vend);
	if (found >= 0) {
		skip_ws(&p);
		if (p.pos != len)
			found = -1;
	}

	int rc = 0;
	if (found < 0) {
		rc = spindle_errorf("malformed JSON at byte %zu", p.pos);
	} else if (!found) {
		rc = spindle_errorf("field '%.64s' not found", field);
	} else if (in[vstart] == '"') {
		size_t n = unescape(scratch, in + vstart + 1, vend - vstart - 2);
		spindle_output(scratch, (int32_t)n);
	} else {
		spindle_output(in + vstart, (int32_t)(vend - vstart));
	}
	free(scratch);
	return rc;
}
SPINDLE_HANDLER(handle)
