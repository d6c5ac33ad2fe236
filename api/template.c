/*
 * template.c - a Jinja subset interpreter for chat templates, matching @huggingface/jinja byte for byte.
 * Read top to bottom, in the order a template flows: memory and text helpers, the lexer (preprocess
 * with trim_blocks/lstrip_blocks, then tokens), the parser (tokens -> AST), the evaluator (values,
 * scopes, operators, filters, tests, statements) and the public functions of template.h.
 *
 * The reference is JavaScript, so its semantics leak into templates and we copy them on purpose:
 * numbers are doubles tagged integer or float, `==` is JavaScript's loose equality, `%` keeps the
 * sign of the dividend, str.strip('x') ignores its argument and strips whitespace, string lengths
 * count UTF-16 units, a `set` inside a for loop stays in the loop. docs/chat-templates.md lists them.
 *
 * Memory: a compiled template owns one arena (tokens' strings and AST nodes); a render allocates all
 * its values in a second arena with a byte cap and frees it whole at the end. Values never change
 * after creation except namespace() objects, so they are shared freely without reference counts.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template.h"

#define TPL_MAX_SOURCE ((size_t)1 << 20)
#define TPL_MAX_PARSE_DEPTH 128
#define TPL_MAX_EVAL_DEPTH 1024

/* ============================================================================ memory and text helpers */

/* A bump allocator: blocks of at least 64 KiB, freed together. cap == 0 means no cap. */
typedef struct arena_block {
    struct arena_block *next;
    size_t used, size;
    max_align_t data[];
} arena_block;

typedef struct arena {
    arena_block *head;
    size_t total, cap;
} arena;

static void *arena_alloc(arena *a, size_t n) {
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (n == 0) n = sizeof(max_align_t);
    if (!a->head || a->head->size - a->head->used < n) {
        size_t size = n > 65536 ? n : 65536;
        if (a->cap && a->total + size > a->cap) return NULL;
        arena_block *b = malloc(sizeof *b + size);
        if (!b) return NULL;
        b->next = a->head, b->used = 0, b->size = size;
        a->head = b;
        a->total += size;
    }
    void *p = (char *)a->head->data + a->head->used;
    a->head->used += n;
    return p;
}

static void arena_free(arena *a) {
    for (arena_block *b = a->head, *n; b; b = n) n = b->next, free(b);
    a->head = NULL, a->total = 0;
}

/* A growable byte buffer with a cap; on overflow or out-of-memory it latches `failed`. */
typedef struct strbuf {
    char *p;
    size_t n, cap, max;
    int failed;
} strbuf;

static int sb_put(strbuf *b, const char *s, size_t n) {
    if (b->failed) return -1;
    if (n > b->max - b->n) return b->failed = 1, -1;
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) return b->failed = 1, -1;
        b->p = q, b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}
static int sb_puts(strbuf *b, const char *s) { return sb_put(b, s, strlen(s)); }
static int sb_putc(strbuf *b, char c) { return sb_put(b, &c, 1); }

/* Decodes one code point of valid UTF-8 at s (n > 0 bytes left); returns its byte length. */
static int u8_dec(const unsigned char *s, size_t n, uint32_t *cp) {
    if (s[0] < 0x80 || n < 2) return *cp = s[0], 1;
    if (s[0] < 0xe0) return *cp = (uint32_t)(s[0] & 0x1f) << 6 | (s[1] & 0x3f), 2;
    if (s[0] < 0xf0 || n < 4) {
        if (n < 3) return *cp = s[0], 1;
        return *cp = (uint32_t)(s[0] & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f), 3;
    }
    return *cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 | (uint32_t)(s[2] & 0x3f) << 6 |
                 (s[3] & 0x3f), 4;
}

static int u8_enc(uint32_t cp, char *o) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xc0 | cp >> 6), o[1] = (char)(0x80 | (cp & 0x3f)), 2;
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 0x3f)), o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | cp >> 18), o[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3f)), o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static int u8_valid(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (!k || i + k > n) return 0;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xc0) != 0x80) return 0;
        uint32_t cp;
        u8_dec(s + i, n - i, &cp);
        if ((k == 2 && cp < 0x80) || (k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k;
    }
    return 1;
}

/* JavaScript's white space (String.prototype.trim, \s, and the lexer's isWhitespace agree on it). */
static int js_space(uint32_t c) {
    if (c <= 32) return c == 32 || (c >= 9 && c <= 13);
    return c == 160 || c == 5760 || (c >= 8192 && c <= 8202) || c == 8232 || c == 8233 || c == 8239 ||
           c == 8287 || c == 12288 || c == 65279;
}

/* Bytes of white space starting at s[0..n). */
static size_t ws_span(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int k = u8_dec((const unsigned char *)s + i, n - i, &cp);
        if (!js_space(cp)) break;
        i += (size_t)k;
    }
    return i;
}

/* Length of s[0..n) once white space at its end is removed. */
static size_t ws_trim_end(const char *s, size_t n) {
    while (n > 0) {
        size_t k = 1;
        while (k < n && k < 4 && ((unsigned char)s[n - k] & 0xc0) == 0x80) k++;
        uint32_t cp;
        u8_dec((const unsigned char *)s + n - k, k, &cp);
        if (!js_space(cp)) break;
        n -= k;
    }
    return n;
}

/* Number of UTF-16 units in valid UTF-8 (JavaScript's String.length). */
static size_t u16_len(const char *s, size_t n) {
    size_t units = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += (size_t)u8_dec((const unsigned char *)s + i, n - i, &cp);
        units += cp >= 0x10000 ? 2 : 1;
    }
    return units;
}

/* JavaScript's Number.prototype.toString() for a finite or non-finite double. */
static void js_num(double x, char *o, size_t cap) {
    if (isnan(x)) { snprintf(o, cap, "NaN"); return; }
    if (isinf(x)) { snprintf(o, cap, x < 0 ? "-Infinity" : "Infinity"); return; }
    if (x == 0) { snprintf(o, cap, "0"); return; }
    char e[40];
    int p;
    for (p = 1; p <= 17; p++) {  /* the shortest digit string that reads back as x */
        snprintf(e, sizeof e, "%.*e", p - 1, x);
        if (strtod(e, NULL) == x) break;
    }
    /* e is "-d.ddde+XX": split into sign, digits and the decimal exponent n (value = 0.digits * 10^n) */
    const char *s = e;
    int neg = *s == '-';
    if (neg) s++;
    char dig[24];
    int k = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.') dig[k++] = *s;
    while (k > 1 && dig[k - 1] == '0') k--;
    dig[k] = 0;
    int n = atoi(s + 1) + 1;
    char *w = o;
    size_t left = cap;
#define EMIT(...) do { \
        int r_ = snprintf(w, left, __VA_ARGS__); \
        if (r_ < 0 || (size_t)r_ >= left) return; \
        w += r_, left -= (size_t)r_; \
    } while (0)
    if (neg) EMIT("-");
    if (k <= n && n <= 21) {
        EMIT("%s", dig);
        for (int i = k; i < n; i++) EMIT("0");
    } else if (0 < n && n <= 21) {
        EMIT("%.*s.%s", n, dig, dig + n);
    } else if (-6 < n && n <= 0) {
        EMIT("0.");
        for (int i = 0; i < -n; i++) EMIT("0");
        EMIT("%s", dig);
    } else {
        EMIT("%c", dig[0]);
        if (k > 1) EMIT(".%s", dig + 1);
        EMIT("e%c%d", n - 1 < 0 ? '-' : '+', abs(n - 1));
    }
#undef EMIT
}

/* ============================================================================ lexer */

/*
 * @huggingface/jinja rewrites the source before tokenizing: one trailing newline goes, lstrip_blocks
 * removes spaces and tabs before a block or comment tag at the start of a line, trim_blocks removes the
 * newline after a block or comment tag, and {% generation %} tags vanish. Each pass here is one of its
 * regular expressions; `map` keeps, for every byte of the result, its offset in the original source so
 * that errors point into the template the user has.
 */
typedef struct srcbuf {
    char *s;
    size_t *map;  /* map[i]: source offset of s[i]; map[n] = end */
    size_t n;
} srcbuf;

static int srcbuf_init(srcbuf *b, size_t cap) {
    b->s = malloc(cap + 1);
    b->map = malloc((cap + 1) * sizeof *b->map);
    b->n = 0;
    return b->s && b->map ? 0 : -1;
}
static void srcbuf_free(srcbuf *b) { free(b->s), free(b->map), b->s = NULL, b->map = NULL; }
static void srcbuf_copy(srcbuf *o, const srcbuf *in, size_t i, size_t n) {
    memcpy(o->s + o->n, in->s + i, n);
    memcpy(o->map + o->n, in->map + i, n * sizeof *o->map);
    o->n += n;
}

/* /^[ \t]*({[#%-])/gm -> "$1" */
static void pass_lstrip(srcbuf *o, const srcbuf *in) {
    for (size_t i = 0; i < in->n;) {
        int bol = i == 0 || in->s[i - 1] == '\n' || in->s[i - 1] == '\r' ||
                  (i >= 3 && (unsigned char)in->s[i - 3] == 0xe2 && (unsigned char)in->s[i - 2] == 0x80 &&
                   ((unsigned char)in->s[i - 1] == 0xa8 || (unsigned char)in->s[i - 1] == 0xa9));
        if (bol) {
            size_t j = i;
            while (j < in->n && (in->s[j] == ' ' || in->s[j] == '\t')) j++;
            if (j + 1 < in->n && in->s[j] == '{' && strchr("#%-", in->s[j + 1]) && in->s[j + 1]) i = j;
        }
        srcbuf_copy(o, in, i, 1);
        i++;
    }
}

/* /([#%-]})\n/g -> "$1" */
static void pass_trim(srcbuf *o, const srcbuf *in) {
    for (size_t i = 0; i < in->n;) {
        if (i + 2 < in->n && in->s[i] && strchr("#%-", in->s[i]) && in->s[i + 1] == '}' && in->s[i + 2] == '\n') {
            srcbuf_copy(o, in, i, 2);
            i += 3;
        } else {
            srcbuf_copy(o, in, i, 1);
            i++;
        }
    }
}

/* /{%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/gs: the tag goes, its whitespace control applies. */
static void pass_generation(srcbuf *o, const srcbuf *in) {
    size_t last = 0;
    for (size_t i = 0; i + 1 < in->n; i++) {
        if (in->s[i] != '{' || in->s[i + 1] != '%') continue;
        size_t j = i + 2;
        int lstrip = j < in->n && in->s[j] == '-';
        j += (size_t)lstrip;
        j += ws_span(in->s + j, in->n - j);
        if (in->n - j >= 13 && !memcmp(in->s + j, "endgeneration", 13)) j += 3;
        if (in->n - j < 10 || memcmp(in->s + j, "generation", 10)) continue;
        j += 10;
        j += ws_span(in->s + j, in->n - j);
        int rstrip = j < in->n && in->s[j] == '-';
        j += (size_t)rstrip;
        if (in->n - j < 2 || in->s[j] != '%' || in->s[j + 1] != '}') continue;
        j += 2;
        size_t after = ws_span(in->s + j, in->n - j);
        size_t end = i;
        if (lstrip) end = last + ws_trim_end(in->s + last, i - last);
        srcbuf_copy(o, in, last, end - last);
        if (!rstrip) srcbuf_copy(o, in, j, after);
        last = j + after;
        i = last - 1;
    }
    srcbuf_copy(o, in, last, in->n - last);
}

typedef enum tok_type {
    T_TEXT, T_COMMENT, T_OPEN_STMT, T_CLOSE_STMT, T_OPEN_EXPR, T_CLOSE_EXPR,
    T_LPAREN, T_RPAREN, T_LCURLY, T_RCURLY, T_LSQUARE, T_RSQUARE, T_COMMA, T_DOT, T_COLON, T_PIPE,
    T_CMP, T_ADD, T_MUL, T_POW, T_EQUALS, T_STRING, T_NUMBER, T_IDENT, T_UNARY,
} tok_type;

static const char *const tok_names[] = {
    "text", "comment", "'{%'", "'%}'", "'{{'", "'}}'", "'('", "')'", "'{'", "'}'", "'['", "']'", "','",
    "'.'", "':'", "'|'", "comparison", "'+'/'-'/'~'", "'*'/'/'/'%'", "'**'", "'='", "string", "number",
    "name", "sign",
};

typedef struct token {
    tok_type type;
    const char *s;  /* text, or the unescaped string literal, or the operator/name/number */
    size_t n;
    size_t pos;     /* offset in the preprocessed source */
} token;

typedef struct lexer {
    const srcbuf *src;
    token *toks;
    size_t n, cap;
    arena *mem;
    api_template_error *err;
    const char *orig;  /* the template as given, for error positions */
} lexer;

/* Fills err: the message, and the 1-based line and byte column of source offset `off` in orig (0/0
 * without orig). */
static void set_err_v(api_template_error *err, const char *orig, size_t off, const char *fmt, va_list ap) {
    if (!err) return;
    err->line = 0, err->col = 0;
    if (orig) {
        int line = 1, col = 1;
        for (size_t i = 0; i < off; i++) {
            if (orig[i] == '\n') line++, col = 1;
            else col++;
        }
        err->line = line, err->col = col;
    }
    vsnprintf(err->message, sizeof err->message, fmt, ap);
}

static void set_err_at(api_template_error *err, const char *orig, size_t off, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    set_err_v(err, orig, off, fmt, ap);
    va_end(ap);
}

static size_t lx_orig(const lexer *L, size_t pos) { return L->src->map[pos < L->src->n ? pos : L->src->n]; }
#define LX_ERR(pos, ...) (set_err_at(L->err, L->orig, lx_orig(L, pos), __VA_ARGS__), -1)

static int lx_push(lexer *L, tok_type t, const char *s, size_t n, size_t pos) {
    if (L->n == L->cap) {
        size_t c = L->cap ? L->cap * 2 : 256;
        token *q = realloc(L->toks, c * sizeof *q);
        if (!q) return LX_ERR(pos, "out of memory");
        L->toks = q, L->cap = c;
    }
    L->toks[L->n++] = (token){t, s, n, pos};
    return 0;
}

static int is_word(int c) { return isalnum(c) || c == '_'; }
static uint32_t hex_val(char c) {  /* c is a hex digit */
    return (uint32_t)(isdigit((unsigned char)c) ? c - '0' : tolower((unsigned char)c) - 'a' + 10);
}

/* A quoted string from src[*i] (just after the quote); escapes as the reference lexer knows them. */
static int lx_string(lexer *L, size_t *i, char quote) {
    const char *s = L->src->s;
    size_t n = L->src->n, start = *i, j = *i;
    while (j < n && s[j] != quote) j += s[j] == '\\' ? 2 : 1;
    if (j >= n) return LX_ERR(start - 1, "unterminated string literal");
    char *o = arena_alloc(L->mem, j - start + 1);
    if (!o) return LX_ERR(start, "out of memory");
    size_t k = 0;
    for (size_t p = start; p < j;) {
        if (s[p] != '\\') { o[k++] = s[p++]; continue; }
        char e = s[p + 1];
        p += 2;
        if (e == 'x' || e == 'u') {
            size_t hl = e == 'x' ? 2 : 4;
            uint32_t cp = 0;
            for (size_t h = 0; h < hl; h++) {
                if (p + h >= j || !isxdigit((unsigned char)s[p + h]))
                    return LX_ERR(p - 2, "invalid hexadecimal escape sequence in string");
                cp = cp * 16 + hex_val(s[p + h]);
            }
            p += hl;
            /* a surrogate pair written as two \u escapes is one character */
            if (cp >= 0xd800 && cp < 0xdc00 && p + 6 <= j && s[p] == '\\' && s[p + 1] == 'u') {
                uint32_t lo = 0;
                int ok = 1;
                for (size_t h = 0; h < 4; h++) {
                    if (!isxdigit((unsigned char)s[p + 2 + h])) { ok = 0; break; }
                    lo = lo * 16 + hex_val(s[p + 2 + h]);
                }
                if (ok && lo >= 0xdc00 && lo < 0xe000) cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00), p += 6;
            }
            if (cp >= 0xd800 && cp < 0xe000) cp = 0xfffd;  /* a lone surrogate prints as U+FFFD */
            k += (size_t)u8_enc(cp, o + k);  /* at most 4 bytes from at least 4 source bytes */
            continue;
        }
        const char *from = "ntrbfv'\"\\", *to = "\n\t\r\b\f\v'\"\\";
        const char *f = e ? strchr(from, e) : NULL;
        if (!f) return LX_ERR(p - 2, "unexpected escaped character '\\%c' in string", e ? e : '0');
        o[k++] = to[f - from];
    }
    o[k] = 0;
    *i = j + 1;
    return lx_push(L, T_STRING, o, k, start - 1);
}

/* The reference tokenizer, step for step (its quirks decide where whitespace goes). */
static int lx_run(lexer *L) {
    const char *s = L->src->s;
    size_t n = L->src->n, i = 0;
    static const struct { const char *seq; tok_type t; } rules[] = {
        {"{%", T_OPEN_STMT}, {"%}", T_CLOSE_STMT}, {"{{", T_OPEN_EXPR}, {"}}", T_CLOSE_EXPR},
        {"(", T_LPAREN}, {")", T_RPAREN}, {"{", T_LCURLY}, {"}", T_RCURLY}, {"[", T_LSQUARE},
        {"]", T_RSQUARE}, {",", T_COMMA}, {".", T_DOT}, {":", T_COLON}, {"|", T_PIPE},
        {"<=", T_CMP}, {">=", T_CMP}, {"==", T_CMP}, {"!=", T_CMP}, {"<", T_CMP}, {">", T_CMP},
        {"+", T_ADD}, {"-", T_ADD}, {"~", T_ADD}, {"**", T_POW}, {"*", T_MUL}, {"//", T_MUL},
        {"/", T_MUL}, {"%", T_MUL}, {"=", T_EQUALS},
    };
    int curly = 0;
    while (i < n) {
        tok_type last = L->n ? L->toks[L->n - 1].type : (tok_type)-1;
        if (L->n == 0 || last == T_CLOSE_STMT || last == T_CLOSE_EXPR || last == T_COMMENT) {
            size_t end = i;
            for (;;) {
                const char *q = memchr(s + end, '{', n - end);
                if (!q) { end = n; break; }
                end = (size_t)(q - s);
                if (end + 1 < n && (s[end + 1] == '%' || s[end + 1] == '{' || s[end + 1] == '#')) break;
                end++;
            }
            if (end > i) {
                if (lx_push(L, T_TEXT, s + i, end - i, i)) return -1;
                i = end;
                continue;
            }
        }
        if (s[i] == '{' && i + 1 < n) {
            char nx = s[i + 1];
            if (nx == '#') {
                size_t start = i;
                i += 2;
                int before = i < n && s[i] == '-';
                i += (size_t)before;
                const char *q = NULL;
                for (size_t j = i; j + 1 < n; j++)
                    if (s[j] == '#' && s[j + 1] == '}') { q = s + j; break; }
                if (!q) return LX_ERR(start, "unterminated comment: missing '#}'");
                size_t end = (size_t)(q - s), clen = end - i;
                int after = clen > 0 && s[end - 1] == '-';
                if (before && L->n && L->toks[L->n - 1].type == T_TEXT) {
                    token *t = &L->toks[L->n - 1];
                    t->n = ws_trim_end(t->s, t->n);
                    if (t->n == 0) L->n--;
                }
                if (lx_push(L, T_COMMENT, s + i, clen - (size_t)after, start)) return -1;
                i = end + 2;
                if (after) i += ws_span(s + i, n - i);
                continue;
            }
            if (i + 2 < n && s[i + 2] == '-' && (nx == '%' || nx == '{')) {
                if (L->n && L->toks[L->n - 1].type == T_TEXT) {
                    token *t = &L->toks[L->n - 1];
                    t->n = ws_trim_end(t->s, t->n);
                    if (t->n == 0) L->n--;
                }
                if (lx_push(L, nx == '%' ? T_OPEN_STMT : T_OPEN_EXPR, s + i, 2, i)) return -1;
                if (nx == '{') curly = 0;
                i += 3;
                continue;
            }
        }
        size_t ws = ws_span(s + i, n - i);
        if (i + ws >= n) return LX_ERR(i, "unexpected end of template inside a tag");
        i += ws;
        char c = s[i];
        if (c == '-' && i + 2 < n && s[i + 2] == '}' && (s[i + 1] == '%' || s[i + 1] == '}')) {
            if (lx_push(L, s[i + 1] == '%' ? T_CLOSE_STMT : T_CLOSE_EXPR, s + i + 1, 2, i)) return -1;
            i += 3;
            i += ws_span(s + i, n - i);
            continue;
        }
        if (c == '-' || c == '+') {
            if (L->n == 0 || last == T_TEXT) return LX_ERR(i, "unexpected character '%c'", c);
            if (!(last == T_IDENT || last == T_NUMBER || last == T_STRING || last == T_RPAREN || last == T_RSQUARE)) {
                size_t start = i++;
                while (i < n && isdigit((unsigned char)s[i])) i++;
                if (i >= n) return LX_ERR(start, "unexpected end of template inside a tag");
                if (i > start + 1 && s[i] == '.' && i + 1 < n && isdigit((unsigned char)s[i + 1])) {
                    i++;
                    while (i < n && isdigit((unsigned char)s[i])) i++;
                    if (i >= n) return LX_ERR(start, "unexpected end of template inside a tag");
                }
                if (lx_push(L, i > start + 1 ? T_NUMBER : T_UNARY, s + start, i - start, start)) return -1;
                continue;
            }
        }
        int matched = 0;
        for (size_t r = 0; r < sizeof rules / sizeof rules[0]; r++) {
            size_t len = strlen(rules[r].seq);
            if (rules[r].seq[0] != c) continue;
            if (rules[r].t == T_CLOSE_EXPR && curly > 0) continue;
            if (n - i < len || memcmp(s + i, rules[r].seq, len)) continue;
            if (lx_push(L, rules[r].t, s + i, len, i)) return -1;
            if (rules[r].t == T_OPEN_EXPR) curly = 0;
            else if (rules[r].t == T_LCURLY) curly++;
            else if (rules[r].t == T_RCURLY) curly--;
            i += len;
            matched = 1;
            break;
        }
        if (matched) continue;
        if (c == '\'' || c == '"') {
            i++;
            if (lx_string(L, &i, c)) return -1;
            continue;
        }
        if (isdigit((unsigned char)c)) {
            size_t start = i;
            while (i < n && isdigit((unsigned char)s[i])) i++;
            if (i >= n) return LX_ERR(start, "unexpected end of template inside a tag");
            if (last != T_DOT && s[i] == '.' && i + 1 < n && isdigit((unsigned char)s[i + 1])) {
                i++;
                while (i < n && isdigit((unsigned char)s[i])) i++;
                if (i >= n) return LX_ERR(start, "unexpected end of template inside a tag");
            }
            if (lx_push(L, T_NUMBER, s + start, i - start, start)) return -1;
            continue;
        }
        if (is_word((unsigned char)c)) {
            size_t start = i;
            while (i < n && is_word((unsigned char)s[i])) i++;
            if (i >= n) return LX_ERR(start, "unexpected end of template inside a tag");
            if (lx_push(L, T_IDENT, s + start, i - start, start)) return -1;
            continue;
        }
        uint32_t cp;
        u8_dec((const unsigned char *)s + i, n - i, &cp);
        return LX_ERR(i, "unexpected character U+%04X", (unsigned)cp);
    }
    return 0;
}

/* ============================================================================ parser */

typedef enum nkind {
    /* expressions */
    N_STR, N_INT, N_FLOAT, N_IDENT, N_ARRAY, N_TUPLE, N_OBJECT, N_BINARY, N_UNARY, N_MEMBER, N_SLICE,
    N_CALL, N_KWARG, N_FILTER, N_TEST, N_SELECT, N_TERNARY,
    /* statements (text is an N_STR) */
    N_IF, N_FOR, N_SET, N_MACRO, N_BREAK, N_CONTINUE, N_COMMENT,
} nkind;

typedef enum binop {
    OP_OR, OP_AND, OP_EQ, OP_NE, OP_LT, OP_GT, OP_LE, OP_GE, OP_IN, OP_NOTIN,
    OP_ADD, OP_SUB, OP_CONCAT, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW,
} binop;

static const char *const op_names[] = {
    "or", "and", "==", "!=", "<", ">", "<=", ">=", "in", "not in", "+", "-", "~", "*", "/", "//", "%", "**",
};

typedef struct node node;
typedef struct nlist {
    node **v;
    size_t n;
} nlist;

/* One AST node; which fields mean what depends on k (written beside each kind's constructor). */
struct node {
    nkind k;
    size_t pos;          /* offset in the original template source */
    const char *s;       /* N_STR text, N_IDENT/N_KWARG/N_TEST/N_MACRO name */
    size_t sn;
    double num;          /* N_INT, N_FLOAT */
    int op;              /* N_BINARY binop; N_UNARY '-', '+' or '!' (not) */
    int flag;            /* N_MEMBER computed; N_TEST negated */
    node *a, *b, *c;     /* operands: N_BINARY l/r, N_MEMBER object/property, N_SLICE start/stop/step,
                            N_CALL callee, N_FILTER operand/filter (N_IDENT or N_CALL), N_TEST operand,
                            N_SELECT value/test, N_TERNARY cond/true/false, N_IF test, N_FOR var/iterable,
                            N_SET target/value (value NULL: block body), N_KWARG value */
    nlist l1, l2;        /* N_ARRAY/N_TUPLE items, N_OBJECT keys/values, N_CALL args, N_IF body/else,
                            N_FOR body/else, N_SET body, N_MACRO params/body */
};

typedef struct parser {
    const token *t;
    size_t n, i;
    int depth;
    arena *mem;
    const srcbuf *src;
    const char *orig;
    api_template_error *err;
    int failed;
} parser;

typedef struct vec {
    node **v;
    size_t n, cap;
} vec;

static size_t ps_orig(const parser *P, size_t pos) { return P->src->map[pos < P->src->n ? pos : P->src->n]; }

static node *ps_fail(parser *P, size_t pos, const char *fmt, ...) {
    if (P->failed) return NULL;
    P->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    set_err_v(P->err, P->orig, ps_orig(P, pos), fmt, ap);
    va_end(ap);
    return NULL;
}

static size_t ps_pos(const parser *P) { return P->i < P->n ? P->t[P->i].pos : P->src->n; }
static const token *ps_peek(const parser *P, size_t k) { return P->i + k < P->n ? &P->t[P->i + k] : NULL; }
static int ps_is(const parser *P, tok_type t) { return P->i < P->n && P->t[P->i].type == t; }
static int tok_word(const token *t, const char *w) {
    return t && t->type == T_IDENT && t->n == strlen(w) && !memcmp(t->s, w, t->n);
}
static int ps_word(const parser *P, const char *w) { return tok_word(ps_peek(P, 0), w); }
/* {% name ... with name one of the given words */
static int ps_stmt(const parser *P, const char *const *names) {
    if (!ps_is(P, T_OPEN_STMT)) return 0;
    for (; *names; names++)
        if (tok_word(ps_peek(P, 1), *names)) return 1;
    return 0;
}

static const token *ps_expect(parser *P, tok_type t, const char *what) {
    if (P->failed) return NULL;
    if (!ps_is(P, t)) {
        if (P->i >= P->n) ps_fail(P, ps_pos(P), "unexpected end of template: expected %s", what);
        else ps_fail(P, ps_pos(P), "expected %s, got %s", what, tok_names[P->t[P->i].type]);
        return NULL;
    }
    return &P->t[P->i++];
}

static node *nd_new(parser *P, nkind k, size_t pos) {
    node *x = arena_alloc(P->mem, sizeof *x);
    if (!x) return ps_fail(P, pos, "out of memory");
    memset(x, 0, sizeof *x);
    x->k = k, x->pos = ps_orig(P, pos);
    return x;
}

static int vec_push(parser *P, vec *v, node *x) {
    if (!x) return -1;
    if (v->n == v->cap) {
        size_t c = v->cap ? v->cap * 2 : 8;
        node **q = realloc(v->v, c * sizeof *q);
        if (!q) return ps_fail(P, ps_pos(P), "out of memory"), -1;
        v->v = q, v->cap = c;
    }
    v->v[v->n++] = x;
    return 0;
}

/* Moves v into the arena as an nlist (v is emptied either way). */
static int vec_done(parser *P, vec *v, nlist *out) {
    out->n = v->n;
    out->v = NULL;
    if (v->n) {
        out->v = arena_alloc(P->mem, v->n * sizeof *out->v);
        if (!out->v) { free(v->v); *v = (vec){0}; return ps_fail(P, ps_pos(P), "out of memory"), -1; }
        memcpy(out->v, v->v, v->n * sizeof *out->v);
    }
    free(v->v);
    *v = (vec){0};
    return P->failed ? -1 : 0;
}

static node *parse_expr(parser *P);
static node *parse_primary(parser *P);
static node *parse_any(parser *P);

/* Parses statements until one of `stops` ({% stop ...) comes; fails at the end of the template. */
static int parse_until(parser *P, const char *const *stops, const char *what, nlist *out) {
    vec v = {0};
    while (!P->failed && !ps_stmt(P, stops)) {
        if (P->i >= P->n) {
            ps_fail(P, ps_pos(P), "unexpected end of template: expected {%% %s %%}", what);
            break;
        }
        vec_push(P, &v, parse_any(P));
    }
    if (P->failed) { free(v.v); return -1; }
    return vec_done(P, &v, out);
}

static int parse_end(parser *P, const char *word) {
    if (!ps_expect(P, T_OPEN_STMT, "'{%'")) return -1;
    if (!ps_word(P, word)) return ps_fail(P, ps_pos(P), "expected '%s'", word), -1;
    P->i++;
    return ps_expect(P, T_CLOSE_STMT, "'%}'") ? 0 : -1;
}

static node *parse_seq(parser *P, int primary) {
    size_t pos = ps_pos(P);
    node *first = primary ? parse_primary(P) : parse_expr(P);
    if (!first || !ps_is(P, T_COMMA)) return first;
    vec v = {0};
    vec_push(P, &v, first);
    while (!P->failed && ps_is(P, T_COMMA)) {
        P->i++;
        vec_push(P, &v, primary ? parse_primary(P) : parse_expr(P));
    }
    node *t = nd_new(P, N_TUPLE, pos);
    if (!t || vec_done(P, &v, &t->l1)) { free(v.v); return NULL; }
    return t;
}

/* ( args ): positional then keyword (name=value); mode_params: a macro's parameter list */
static int parse_args(parser *P, int mode_params, nlist *out) {
    if (!ps_expect(P, T_LPAREN, "'('")) return -1;
    vec v = {0};
    int saw_kw = 0;
    while (!P->failed && !ps_is(P, T_RPAREN)) {
        if (P->i >= P->n) { ps_fail(P, ps_pos(P), "unexpected end of template: expected ')'"); break; }
        if (ps_is(P, T_POW) || (ps_is(P, T_MUL) && P->t[P->i].n == 1 && P->t[P->i].s[0] == '*')) {
            ps_fail(P, ps_pos(P), "argument unpacking (* and **) is not supported");
            break;
        }
        size_t pos = ps_pos(P);
        node *a = parse_expr(P);
        if (!a) break;
        if (ps_is(P, T_EQUALS)) {
            P->i++;
            if (a->k != N_IDENT) { ps_fail(P, pos, "expected a name before '='"); break; }
            node *kw = nd_new(P, N_KWARG, pos);
            if (!kw) break;
            kw->s = a->s, kw->sn = a->sn;
            kw->a = parse_expr(P);
            if (!kw->a) break;
            a = kw;
            saw_kw = 1;
        } else if (saw_kw) {
            ps_fail(P, pos, mode_params ? "non-default parameter follows default parameter"
                                        : "positional argument follows keyword argument");
            break;
        }
        if (mode_params) {
            if (a->k != N_IDENT && a->k != N_KWARG) { ps_fail(P, pos, "expected a parameter name"); break; }
            for (size_t j = 0; j < v.n; j++)
                if (v.v[j]->sn == a->sn && !memcmp(v.v[j]->s, a->s, a->sn)) {
                    ps_fail(P, pos, "duplicate parameter '%.*s'", (int)a->sn, a->s);
                    break;
                }
        }
        vec_push(P, &v, a);
        if (ps_is(P, T_COMMA)) P->i++;
    }
    if (P->failed) { free(v.v); return -1; }
    P->i++;  /* ')' */
    return vec_done(P, &v, out);
}

static node *parse_call(parser *P, node *callee);

static node *parse_member(parser *P, node *obj) {
    while (obj && !P->failed && (ps_is(P, T_DOT) || ps_is(P, T_LSQUARE))) {
        size_t pos = ps_pos(P);
        int computed = ps_is(P, T_LSQUARE);
        P->i++;
        node *m = nd_new(P, N_MEMBER, pos);
        if (!m) return NULL;
        m->a = obj, m->flag = computed;
        if (computed) {
            /* an index, or a slice with up to three parts */
            node *part[3] = {0};
            int np = 0, slice = 0;
            while (!P->failed && !ps_is(P, T_RSQUARE)) {
                if (P->i >= P->n) return ps_fail(P, ps_pos(P), "unexpected end of template: expected ']'");
                if (np == 3) return ps_fail(P, ps_pos(P), "a slice has at most three parts");
                if (ps_is(P, T_COLON)) {
                    part[np++] = NULL, P->i++, slice = 1;
                } else {
                    if (!(part[np++] = parse_expr(P))) return NULL;
                    if (ps_is(P, T_COLON)) P->i++, slice = 1;
                }
            }
            if (P->failed) return NULL;
            if (np == 0) return ps_fail(P, pos, "expected an index or a slice inside []");
            if (slice) {
                node *sl = nd_new(P, N_SLICE, pos);
                if (!sl) return NULL;
                sl->a = part[0], sl->b = np > 1 ? part[1] : NULL, sl->c = np > 2 ? part[2] : NULL;
                m->b = sl;
            } else {
                m->b = part[0];
            }
            if (!ps_expect(P, T_RSQUARE, "']'")) return NULL;
        } else {
            node *p = parse_primary(P);
            if (!p) return NULL;
            if (p->k != N_IDENT && p->k != N_INT) return ps_fail(P, pos, "expected a name or an integer after '.'");
            m->b = p;
        }
        obj = m;
    }
    return obj;
}

static node *parse_call(parser *P, node *callee) {
    size_t pos = ps_pos(P);
    if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, pos, "expression nested too deeply");
    node *c = nd_new(P, N_CALL, pos);
    if (!c) return NULL;
    c->a = callee;
    if (parse_args(P, 0, &c->l1)) return NULL;
    node *e = parse_member(P, c);
    if (e && ps_is(P, T_LPAREN)) e = parse_call(P, e);
    P->depth--;
    return e;
}

static node *parse_primary(parser *P) {
    if (P->failed) return NULL;
    if (P->i >= P->n) return ps_fail(P, ps_pos(P), "unexpected end of template: expected an expression");
    if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, ps_pos(P), "expression nested too deeply");
    const token *t = &P->t[P->i++];
    node *x = NULL;
    switch (t->type) {
    case T_NUMBER: {
        int is_float = memchr(t->s, '.', t->n) != NULL;
        x = nd_new(P, is_float ? N_FLOAT : N_INT, t->pos);
        if (x) {
            char buf[64];
            size_t k = t->n < sizeof buf - 1 ? t->n : sizeof buf - 1;
            memcpy(buf, t->s, k), buf[k] = 0;
            x->num = t->n < sizeof buf - 1 ? strtod(buf, NULL) : HUGE_VAL;
        }
        break;
    }
    case T_STRING: {
        /* adjacent literals concatenate: 'a' "b" */
        size_t total = t->n, j = P->i;
        while (j < P->n && P->t[j].type == T_STRING) total += P->t[j++].n;
        x = nd_new(P, N_STR, t->pos);
        if (!x) break;
        char *s = arena_alloc(P->mem, total + 1);
        if (!s) { x = ps_fail(P, t->pos, "out of memory"); break; }
        memcpy(s, t->s, t->n);
        size_t k = t->n;
        for (; P->i < j; P->i++) memcpy(s + k, P->t[P->i].s, P->t[P->i].n), k += P->t[P->i].n;
        s[k] = 0;
        x->s = s, x->sn = k;
        break;
    }
    case T_IDENT:
        x = nd_new(P, N_IDENT, t->pos);
        if (x) x->s = t->s, x->sn = t->n;
        break;
    case T_LPAREN:
        x = parse_seq(P, 0);
        if (x && !ps_expect(P, T_RPAREN, "')'")) x = NULL;
        break;
    case T_LSQUARE: {
        x = nd_new(P, N_ARRAY, t->pos);
        vec v = {0};
        while (x && !P->failed && !ps_is(P, T_RSQUARE)) {
            if (P->i >= P->n) { ps_fail(P, ps_pos(P), "unexpected end of template: expected ']'"); break; }
            vec_push(P, &v, parse_expr(P));
            if (ps_is(P, T_COMMA)) P->i++;
        }
        if (P->failed || !x) { free(v.v); x = NULL; break; }
        P->i++;
        if (vec_done(P, &v, &x->l1)) x = NULL;
        break;
    }
    case T_LCURLY: {
        x = nd_new(P, N_OBJECT, t->pos);
        vec keys = {0}, vals = {0};
        while (x && !P->failed && !ps_is(P, T_RCURLY)) {
            if (P->i >= P->n) { ps_fail(P, ps_pos(P), "unexpected end of template: expected '}'"); break; }
            if (vec_push(P, &keys, parse_expr(P))) break;
            if (!ps_expect(P, T_COLON, "':' between key and value")) break;
            if (vec_push(P, &vals, parse_expr(P))) break;
            if (ps_is(P, T_COMMA)) P->i++;
        }
        if (P->failed || !x) { free(keys.v), free(vals.v); x = NULL; break; }
        P->i++;
        if (vec_done(P, &keys, &x->l1) || vec_done(P, &vals, &x->l2)) { free(vals.v); x = NULL; }
        break;
    }
    default:
        x = ps_fail(P, t->pos, "unexpected %s", tok_names[t->type]);
    }
    P->depth--;
    return x;
}

static node *parse_unary_sign(parser *P) {
    const token *t = ps_peek(P, 0);
    if (t && (t->type == T_UNARY || t->type == T_ADD) && t->n == 1 && (t->s[0] == '-' || t->s[0] == '+')) {
        P->i++;
        if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, t->pos, "expression nested too deeply");
        node *u = nd_new(P, N_UNARY, t->pos);
        if (u) u->op = t->s[0], u->a = parse_unary_sign(P);
        P->depth--;
        return u && u->a ? u : NULL;
    }
    node *m = parse_member(P, parse_primary(P));
    if (m && ps_is(P, T_LPAREN)) return parse_call(P, m);
    return m;
}

static node *parse_filter(parser *P) {
    node *x = parse_unary_sign(P);
    while (x && ps_is(P, T_PIPE)) {
        size_t pos = ps_pos(P);
        P->i++;
        node *f = parse_primary(P);
        if (!f) return NULL;
        if (f->k != N_IDENT) return ps_fail(P, pos, "expected a filter name after '|'");
        if (ps_is(P, T_LPAREN) && !(f = parse_call(P, f))) return NULL;
        node *fx = nd_new(P, N_FILTER, pos);
        if (!fx) return NULL;
        fx->a = x, fx->b = f;
        x = fx;
    }
    return x;
}

static node *parse_test(parser *P) {
    node *x = parse_filter(P);
    while (x && ps_word(P, "is")) {
        size_t pos = ps_pos(P);
        P->i++;
        int neg = ps_word(P, "not");
        P->i += (size_t)neg;
        node *name = parse_primary(P);
        if (!name) return NULL;
        if (name->k != N_IDENT) return ps_fail(P, pos, "expected a test name after 'is'");
        node *t = nd_new(P, N_TEST, pos);
        if (!t) return NULL;
        t->a = x, t->flag = neg, t->s = name->s, t->sn = name->sn;
        x = t;
    }
    return x;
}

static node *nd_binary(parser *P, size_t pos, int op, node *l, node *r) {
    if (!l || !r) return NULL;
    node *b = nd_new(P, N_BINARY, pos);
    if (b) b->op = op, b->a = l, b->b = r;
    return b;
}

static node *parse_pow(parser *P) {
    node *x = parse_test(P);
    while (x && ps_is(P, T_POW)) {
        size_t pos = ps_pos(P);
        P->i++;
        x = nd_binary(P, pos, OP_POW, x, parse_test(P));
    }
    return x;
}

static node *parse_mul(parser *P) {
    node *x = parse_pow(P);
    while (x && ps_is(P, T_MUL)) {
        const token *t = &P->t[P->i++];
        int op = t->s[0] == '*' ? OP_MUL : t->s[0] == '%' ? OP_MOD : t->n == 2 ? OP_FLOORDIV : OP_DIV;
        x = nd_binary(P, t->pos, op, x, parse_pow(P));
    }
    return x;
}

static node *parse_add(parser *P) {
    node *x = parse_mul(P);
    while (x && ps_is(P, T_ADD)) {
        const token *t = &P->t[P->i++];
        int op = t->s[0] == '+' ? OP_ADD : t->s[0] == '-' ? OP_SUB : OP_CONCAT;
        x = nd_binary(P, t->pos, op, x, parse_mul(P));
    }
    return x;
}

static node *parse_cmp(parser *P) {
    node *x = parse_add(P);
    while (x) {
        size_t pos = ps_pos(P);
        int op;
        if (ps_word(P, "not") && tok_word(ps_peek(P, 1), "in")) op = OP_NOTIN, P->i += 2;
        else if (ps_word(P, "in")) op = OP_IN, P->i++;
        else if (ps_is(P, T_CMP)) {
            const token *t = &P->t[P->i++];
            op = t->s[0] == '=' ? OP_EQ : t->s[0] == '!' ? OP_NE : t->s[0] == '<' ? (t->n == 2 ? OP_LE : OP_LT)
                                                                                    : (t->n == 2 ? OP_GE : OP_GT);
        } else break;
        x = nd_binary(P, pos, op, x, parse_add(P));
    }
    return x;
}

static node *parse_not(parser *P) {
    node *r = NULL;
    while (ps_word(P, "not")) {
        size_t pos = ps_pos(P);
        P->i++;
        if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, pos, "expression nested too deeply");
        node *a = parse_not(P);
        P->depth--;
        if (!a) return NULL;
        if (!(r = nd_new(P, N_UNARY, pos))) return NULL;
        r->op = '!', r->a = a;
    }
    return r ? r : parse_cmp(P);
}

/* left-associative `operand (word operand)*` for the word operators and/or */
static node *parse_word_op(parser *P, const char *word, int op, node *(*operand)(parser *)) {
    node *x = operand(P);
    while (x && ps_word(P, word)) {
        size_t pos = ps_pos(P);
        P->i++;
        x = nd_binary(P, pos, op, x, operand(P));
    }
    return x;
}
static node *parse_and(parser *P) { return parse_word_op(P, "and", OP_AND, parse_not); }
static node *parse_or(parser *P) { return parse_word_op(P, "or", OP_OR, parse_and); }

/* a if b else c, and `a if b` (undefined when b is false) */
static node *parse_expr(parser *P) {
    if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, ps_pos(P), "expression nested too deeply");
    node *a = parse_or(P);
    if (a && ps_word(P, "if")) {
        size_t pos = ps_pos(P);
        P->i++;
        node *test = parse_or(P);
        if (!test) a = NULL;
        else if (ps_word(P, "else")) {
            P->i++;
            node *f = parse_expr(P), *t = f ? nd_new(P, N_TERNARY, pos) : NULL;
            if (t) t->a = test, t->b = a, t->c = f;
            a = t;
        } else {
            node *s = nd_new(P, N_SELECT, pos);
            if (s) s->a = a, s->b = test;
            a = s;
        }
    }
    P->depth--;
    return a;
}

static node *parse_if(parser *P, size_t pos) {
    node *x = nd_new(P, N_IF, pos);
    if (!x || !(x->a = parse_expr(P)) || !ps_expect(P, T_CLOSE_STMT, "'%}'")) return NULL;
    static const char *const stops[] = {"elif", "else", "endif", NULL};
    if (parse_until(P, stops, "endif", &x->l1)) return NULL;
    if (ps_stmt(P, (const char *const[]){"elif", NULL})) {
        size_t epos = ps_pos(P);
        P->i += 2;
        if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, epos, "blocks nested too deeply");
        node *alt = parse_if(P, epos);
        P->depth--;
        if (!alt) return NULL;
        x->l2.v = arena_alloc(P->mem, sizeof *x->l2.v);
        if (!x->l2.v) return ps_fail(P, epos, "out of memory");
        x->l2.v[0] = alt, x->l2.n = 1;
    } else if (ps_stmt(P, (const char *const[]){"else", NULL})) {
        P->i += 2;
        if (!ps_expect(P, T_CLOSE_STMT, "'%}'")) return NULL;
        static const char *const end[] = {"endif", NULL};
        if (parse_until(P, end, "endif", &x->l2)) return NULL;
    }
    return x;
}

static node *parse_stmt(parser *P) {
    size_t pos = ps_pos(P);
    P->i++;  /* {% */
    const token *t = ps_peek(P, 0);
    if (!t) return ps_fail(P, pos, "unexpected end of template: expected a statement");
    if (t->type != T_IDENT) return ps_fail(P, t->pos, "expected a statement name, got %s", tok_names[t->type]);
    if (++P->depth > TPL_MAX_PARSE_DEPTH) return ps_fail(P, pos, "blocks nested too deeply");
    P->i++;
    node *x = NULL;
    if (tok_word(t, "set")) {
        x = nd_new(P, N_SET, pos);
        if (x && (x->a = parse_seq(P, 0))) {
            if (ps_is(P, T_EQUALS)) {
                P->i++;
                if ((x->b = parse_seq(P, 0)) && !ps_expect(P, T_CLOSE_STMT, "'%}'")) x = NULL;
                else if (!x->b) x = NULL;
            } else if (!ps_expect(P, T_CLOSE_STMT, "'%}'") ||
                       parse_until(P, (const char *const[]){"endset", NULL}, "endset", &x->l1) ||
                       parse_end(P, "endset")) {
                x = NULL;
            }
        } else {
            x = NULL;
        }
    } else if (tok_word(t, "if")) {
        x = parse_if(P, pos);
        if (x && parse_end(P, "endif")) x = NULL;
    } else if (tok_word(t, "for")) {
        x = nd_new(P, N_FOR, pos);
        if (x && (x->a = parse_seq(P, 1))) {
            if (x->a->k != N_IDENT && x->a->k != N_TUPLE) x = ps_fail(P, pos, "expected a name or names after 'for'");
            else if (!ps_word(P, "in")) x = ps_fail(P, ps_pos(P), "expected 'in' after the loop variable");
        } else {
            x = NULL;
        }
        if (x) {
            P->i++;
            if (!(x->b = parse_expr(P)) || !ps_expect(P, T_CLOSE_STMT, "'%}'") ||
                parse_until(P, (const char *const[]){"endfor", "else", NULL}, "endfor", &x->l1))
                x = NULL;
        }
        if (x && ps_stmt(P, (const char *const[]){"else", NULL})) {
            P->i += 2;
            if (!ps_expect(P, T_CLOSE_STMT, "'%}'") ||
                parse_until(P, (const char *const[]){"endfor", NULL}, "endfor", &x->l2))
                x = NULL;
        }
        if (x && parse_end(P, "endfor")) x = NULL;
    } else if (tok_word(t, "macro")) {
        node *name = parse_primary(P);
        if (name && name->k != N_IDENT) name = ps_fail(P, pos, "expected a macro name");
        x = name ? nd_new(P, N_MACRO, pos) : NULL;
        if (x) {
            x->s = name->s, x->sn = name->sn;
            if (parse_args(P, 1, &x->l1) || !ps_expect(P, T_CLOSE_STMT, "'%}'") ||
                parse_until(P, (const char *const[]){"endmacro", NULL}, "endmacro", &x->l2) || parse_end(P, "endmacro"))
                x = NULL;
        }
    } else if (tok_word(t, "break") || tok_word(t, "continue")) {
        x = nd_new(P, tok_word(t, "break") ? N_BREAK : N_CONTINUE, pos);
        if (x && !ps_expect(P, T_CLOSE_STMT, "'%}'")) x = NULL;
    } else if (tok_word(t, "call") || tok_word(t, "filter")) {
        x = ps_fail(P, t->pos, "the {%% %.*s %%} statement is not supported", (int)t->n, t->s);
    } else {
        x = ps_fail(P, t->pos, "unknown statement '%.*s'", (int)t->n, t->s);
    }
    P->depth--;
    return x;
}

static node *parse_any(parser *P) {
    const token *t = &P->t[P->i];
    switch (t->type) {
    case T_COMMENT:
        P->i++;
        return nd_new(P, N_COMMENT, t->pos);
    case T_TEXT: {
        P->i++;
        node *x = nd_new(P, N_STR, t->pos);
        if (x) x->s = t->s, x->sn = t->n;
        return x;
    }
    case T_OPEN_STMT:
        return parse_stmt(P);
    case T_OPEN_EXPR: {
        P->i++;
        node *x = parse_expr(P);
        if (x && !ps_expect(P, T_CLOSE_EXPR, "'}}'")) return NULL;
        return x;
    }
    default:
        return ps_fail(P, t->pos, "unexpected %s", tok_names[t->type]);
    }
}

/* ============================================================================ evaluator: values */

typedef enum vt {
    V_UNDEF, V_NULL, V_BOOL, V_INT, V_FLOAT, V_STR, V_ARRAY, V_TUPLE, V_OBJECT, V_NS, V_KWARGS, V_LOOP, V_FUNC,
} vt;

/* the reference's type names, for error messages */
static const char *const vt_names[] = {
    "UndefinedValue", "NullValue", "BooleanValue", "IntegerValue", "FloatValue", "StringValue", "ArrayValue",
    "TupleValue", "ObjectValue", "NamespaceValue", "KeywordArgumentsValue", "ObjectValue", "FunctionValue",
};

typedef struct val val;
typedef struct oent {
    const char *k;
    size_t kn;
    val *v;
} oent;
typedef struct omap {  /* insertion-ordered; only namespace() objects and scopes change after creation */
    oent *e;
    size_t n, cap;
} omap;

typedef enum fkind {
    F_MACRO, F_RAISE, F_RANGE, F_STRFTIME, F_NAMESPACE,
    /* methods bound to a string */
    F_UPPER, F_LOWER, F_STRIP, F_LSTRIP, F_RSTRIP, F_TITLE, F_CAPITALIZE, F_STARTSWITH, F_ENDSWITH, F_SPLIT,
    F_REPLACE,
    /* methods bound to an object */
    F_GET, F_ITEMS, F_KEYS, F_VALUES,
} fkind;

typedef struct env env;

struct val {
    vt t;
    union {
        int b;                                         /* V_BOOL */
        double num;                                    /* V_INT, V_FLOAT */
        struct { const char *s; size_t n; } str;       /* V_STR (valid UTF-8) */
        struct { val **it; size_t n; } arr;            /* V_ARRAY, V_TUPLE */
        omap *obj;                                     /* V_OBJECT, V_NS, V_KWARGS */
        struct { size_t i, n; val **items; } loop;     /* V_LOOP: the `loop` of iteration i of n */
        struct { fkind k; val *self; const node *macro; env *scope; } fn;  /* V_FUNC */
    };
};

static val V_UNDEF_ = {.t = V_UNDEF}, V_NULL_ = {.t = V_NULL}, V_TRUE_ = {.t = V_BOOL, .b = 1},
           V_FALSE_ = {.t = V_BOOL, .b = 0};
#define UNDEF (&V_UNDEF_)
#define VNULL (&V_NULL_)
#define VBOOL(x) ((x) ? &V_TRUE_ : &V_FALSE_)

struct env {
    env *parent;
    omap vars;
};

typedef struct rctx {
    arena mem;
    const struct api_template *t;
    api_template_opts o;
    api_template_error *err;
    long steps;
    int depth;
    int failed;
} rctx;

struct api_template {
    arena mem;
    char *pre;    /* the preprocessed source, which text nodes point into */
    char *orig;   /* the source as given, for error positions */
    size_t orig_n;
    nlist body;
};

static val *rfail(rctx *R, const node *at, const char *fmt, ...) {
    if (R->failed) return NULL;
    R->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    set_err_v(R->err, at ? R->t->orig : NULL, at ? at->pos : 0, fmt, ap);
    va_end(ap);
    return NULL;
}

static void *ralloc(rctx *R, size_t n) {
    void *p = arena_alloc(&R->mem, n);
    if (!p) rfail(R, NULL, "template memory limit exceeded (%zu bytes)", R->o.max_memory);
    return p;
}

static int step(rctx *R, const node *at, size_t units) {
    R->steps += (long)(units > (size_t)R->o.max_steps ? (size_t)R->o.max_steps : units);
    if (R->steps > R->o.max_steps) {
        rfail(R, at, "template evaluation exceeded %ld steps", R->o.max_steps);
        return -1;
    }
    return R->failed ? -1 : 0;
}
#define BYTES_STEPS(n) (1 + (n) / 64)

static val *mkval(rctx *R, vt t) {
    val *v = ralloc(R, sizeof *v);
    if (v) memset(v, 0, sizeof *v), v->t = t;
    return v;
}
static val *mknum(rctx *R, vt t, double x) {
    val *v = mkval(R, t);
    if (v) v->num = x;
    return v;
}
/* A string value over s[0..n); copy: whether to copy the bytes into the render arena. */
static val *mkstr(rctx *R, const char *s, size_t n, int copy) {
    val *v = mkval(R, V_STR);
    if (!v) return NULL;
    if (copy) {
        char *c = ralloc(R, n + 1);
        if (!c) return NULL;
        if (n) memcpy(c, s, n);
        c[n] = 0;
        s = c;
    }
    v->str.s = s, v->str.n = n;
    return v;
}
static val *mkarr(rctx *R, vt t, size_t n) {
    val *v = mkval(R, t);
    if (!v) return NULL;
    v->arr.n = n;
    v->arr.it = n ? ralloc(R, n * sizeof *v->arr.it) : NULL;
    return n && !v->arr.it ? NULL : v;
}
static val *mkfn(rctx *R, fkind k, val *self) {
    val *v = mkval(R, V_FUNC);
    if (v) v->fn.k = k, v->fn.self = self;
    return v;
}
static val *mkobj(rctx *R, vt t) {
    val *v = mkval(R, t);
    if (!v) return NULL;
    v->obj = ralloc(R, sizeof *v->obj);
    if (!v->obj) return NULL;
    memset(v->obj, 0, sizeof *v->obj);
    return v;
}

static val *omap_get(const omap *m, const char *k, size_t kn) {
    for (size_t i = 0; i < m->n; i++)
        if (m->e[i].kn == kn && !memcmp(m->e[i].k, k, kn)) return m->e[i].v;
    return NULL;
}

/* Sets k (borrowed; it must live as long as the render) to v, replacing or appending. */
static int omap_set(rctx *R, omap *m, const char *k, size_t kn, val *v) {
    if (step(R, NULL, BYTES_STEPS(m->n * 8))) return -1;
    for (size_t i = 0; i < m->n; i++)
        if (m->e[i].kn == kn && !memcmp(m->e[i].k, k, kn)) return m->e[i].v = v, 0;
    if (m->n == m->cap) {
        size_t c = m->cap ? m->cap * 2 : 8;
        oent *e = ralloc(R, c * sizeof *e);
        if (!e) return -1;
        if (m->n) memcpy(e, m->e, m->n * sizeof *e);
        m->e = e, m->cap = c;
    }
    m->e[m->n++] = (oent){k, kn, v};
    return 0;
}

static val *env_lookup(const env *e, const char *k, size_t kn) {
    for (; e; e = e->parent) {
        val *v = omap_get(&e->vars, k, kn);
        if (v) return v;
    }
    return UNDEF;
}

static env *env_new(rctx *R, env *parent) {
    env *e = ralloc(R, sizeof *e);
    if (e) memset(e, 0, sizeof *e), e->parent = parent;
    return e;
}

static int is_container(const val *v) { return v->t == V_OBJECT || v->t == V_NS || v->t == V_KWARGS || v->t == V_LOOP; }
static int is_object(const val *v) { return v->t == V_OBJECT || v->t == V_KWARGS || v->t == V_LOOP; }  /* ObjectValue */
static int is_array(const val *v) { return v->t == V_ARRAY || v->t == V_TUPLE; }                     /* ArrayValue */
static int is_num(const val *v) { return v->t == V_INT || v->t == V_FLOAT; }

/* The entries of `loop` as an object (only built when a template uses it as a whole). */
static omap *loop_map(rctx *R, const val *v) {
    static const char *const names[] = {"index", "index0", "revindex", "revindex0", "first", "last", "length",
                                        "previtem", "nextitem"};
    omap *m = ralloc(R, sizeof *m);
    oent *e = ralloc(R, 9 * sizeof *e);
    if (!m || !e) return NULL;
    size_t i = v->loop.i, n = v->loop.n;
    val *vals[9] = {
        mknum(R, V_INT, (double)(i + 1)), mknum(R, V_INT, (double)i), mknum(R, V_INT, (double)(n - i)),
        mknum(R, V_INT, (double)(n - i - 1)), VBOOL(i == 0), VBOOL(i + 1 == n), mknum(R, V_INT, (double)n),
        i > 0 ? v->loop.items[i - 1] : UNDEF, i + 1 < n ? v->loop.items[i + 1] : UNDEF,
    };
    for (int k = 0; k < 9; k++) {
        if (!vals[k]) return NULL;
        e[k] = (oent){names[k], strlen(names[k]), vals[k]};
    }
    m->e = e, m->n = m->cap = 9;
    return m;
}

static omap *obj_map(rctx *R, const val *v) { return v->t == V_LOOP ? loop_map(R, v) : v->obj; }

static int truthy(const val *v) {
    switch (v->t) {
    case V_UNDEF: case V_NULL: return 0;
    case V_BOOL: return v->b;
    case V_INT: case V_FLOAT: return v->num != 0 && !isnan(v->num);
    case V_STR: return v->str.n > 0;
    case V_ARRAY: case V_TUPLE: return v->arr.n > 0;
    case V_OBJECT: case V_KWARGS: return v->obj->n > 0;
    default: return 1;  /* namespace, loop, function */
    }
}

/* ---------------------------------------------------------------------------- text of values */

/* JSON.stringify of a string, optionally with every UTF-16 unit >= 0x7f escaped (ensure_ascii). */
static int json_quote(strbuf *b, const char *s, size_t n, int ascii) {
    sb_putc(b, '"');
    size_t run = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[16];
        uint32_t cp = c;
        int k = 1;
        if (c >= 0x80) k = u8_dec((const unsigned char *)s + i, n - i, &cp);
        if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\b') esc = "\\b";
        else if (c == '\f') esc = "\\f";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c < 0x20) snprintf(tmp, sizeof tmp, "\\u%04x", c), esc = tmp;
        else if (ascii && cp >= 0x7f) {
            if (cp >= 0x10000)
                snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", 0xd800 + ((cp - 0x10000) >> 10),
                         0xdc00 + ((cp - 0x10000) & 0x3ff));
            else
                snprintf(tmp, sizeof tmp, "\\u%04x", cp);
            esc = tmp;
        }
        if (esc) {
            sb_put(b, s + i - run, run), run = 0;
            sb_puts(b, esc);
        } else {
            run += (size_t)k;
        }
        i += (size_t)k;
    }
    sb_put(b, s + n - run, run);
    return sb_putc(b, '"');
}

static void float_text(double x, char *o, size_t cap) {  /* FloatValue.toString() */
    if (x == 0 && signbit(x)) snprintf(o, cap, "-0.0");
    else if (isfinite(x) && x == floor(x) && fabs(x) < 1e21) snprintf(o, cap, "%.1f", x);
    else js_num(x, o, cap);
}

typedef struct json_opts {
    int indent;         /* <= 0: none */
    int ascii, sort;
    const char *item_sep, *key_sep;  /* NULL: by indent */
    size_t isn, ksn;
} json_opts;

static int to_json(rctx *R, const val *v, const json_opts *o, int depth, int undef_null, strbuf *b);

/* RuntimeValue.toString(): what {{ v }} prints (undefined and none print nothing, decided by the caller) */
static int to_text(rctx *R, const val *v, strbuf *b) {
    char num[64];
    switch (v->t) {
    case V_UNDEF: return sb_puts(b, "undefined");
    case V_NULL: return sb_puts(b, "null");
    case V_BOOL: return sb_puts(b, v->b ? "true" : "false");
    case V_INT: js_num(v->num, num, sizeof num); return sb_puts(b, num);
    case V_FLOAT: float_text(v->num, num, sizeof num); return sb_puts(b, num);
    case V_STR: return sb_put(b, v->str.s, v->str.n);
    case V_FUNC: rfail(R, NULL, "cannot convert a function to text"); return -1;
    default: {
        json_opts o = {0};
        return to_json(R, v, &o, 0, 0, b);
    }
    }
}

/* JavaScript's String(v.value): how `~` and string `+` see a value */
static int js_text(rctx *R, const val *v, strbuf *b) {
    char num[64];
    switch (v->t) {
    case V_INT: case V_FLOAT: js_num(v->num, num, sizeof num); return sb_puts(b, num);
    case V_ARRAY: case V_TUPLE:
        for (size_t i = 0; i < v->arr.n; i++) {
            if (i) sb_putc(b, ',');
            if (to_text(R, v->arr.it[i], b) && R->failed) return -1;
        }
        return b->failed ? -1 : 0;
    case V_OBJECT: case V_NS: case V_KWARGS: case V_LOOP: return sb_puts(b, "[object Map]");
    default: return to_text(R, v, b);
    }
}

static int key_cmp(const void *a, const void *b) {
    const oent *x = a, *y = b;
    size_t n = x->kn < y->kn ? x->kn : y->kn;
    int c = memcmp(x->k, y->k, n);
    return c ? c : (x->kn > y->kn) - (x->kn < y->kn);
}

/* toJSON() of the reference: JSON.stringify spacing (", " and ": " without indent) and its options. */
static int to_json(rctx *R, const val *v, const json_opts *o, int depth, int undef_null, strbuf *b) {
    if (depth > R->o.max_depth) { rfail(R, NULL, "value nested too deeply for tojson"); return -1; }
    if (step(R, NULL, 1)) return -1;
    char num[64];
    switch (v->t) {
    case V_NULL: return sb_puts(b, "null");
    case V_UNDEF: return sb_puts(b, undef_null ? "null" : "undefined");
    case V_BOOL: return sb_puts(b, v->b ? "true" : "false");
    case V_INT: case V_FLOAT:
        if (!isfinite(v->num)) return sb_puts(b, "null");
        js_num(v->num, num, sizeof num);
        return sb_puts(b, num);
    case V_STR:
        if (step(R, NULL, BYTES_STEPS(v->str.n))) return -1;
        return json_quote(b, v->str.s, v->str.n, o->ascii);
    case V_ARRAY: case V_NS: case V_OBJECT: case V_LOOP: break;
    default: rfail(R, NULL, "Cannot convert to JSON: %s", vt_names[v->t]); return -1;
    }
    const char *isep = o->item_sep ? o->item_sep : o->indent > 0 ? "," : ", ";
    size_t isn = o->item_sep ? o->isn : strlen(isep);
    const char *ksep = o->key_sep ? o->key_sep : ": ";
    size_t ksn = o->key_sep ? o->ksn : 2;
    int ind = o->indent > 0;
    /* newline + indent * depth: the padding of the closing bracket; children get one indent more */
#define PAD(d) do { sb_putc(b, '\n'); for (long p_ = 0; p_ < (long)o->indent * (d); p_++) sb_putc(b, ' '); } while (0)
    if (v->t == V_ARRAY) {
        sb_putc(b, '[');
        for (size_t i = 0; i < v->arr.n; i++) {
            if (i) sb_put(b, isep, isn);
            if (ind) PAD(depth + 1);
            if (to_json(R, v->arr.it[i], o, depth + 1, undef_null, b)) return -1;
        }
        if (ind && v->arr.n) PAD(depth);
        return sb_putc(b, ']');
    }
    omap *m = obj_map(R, v);
    if (!m) return -1;
    oent *e = m->e;
    if (o->sort && m->n > 1) {  /* localeCompare in the reference; byte order here (ASCII keys agree) */
        e = ralloc(R, m->n * sizeof *e);
        if (!e) return -1;
        memcpy(e, m->e, m->n * sizeof *e);
        qsort(e, m->n, sizeof *e, key_cmp);
    }
    sb_putc(b, '{');
    for (size_t i = 0; i < m->n; i++) {
        if (i) sb_put(b, isep, isn);
        if (ind) PAD(depth + 1);
        json_quote(b, e[i].k, e[i].kn, o->ascii);
        sb_put(b, ksep, ksn);
        if (to_json(R, e[i].v, o, depth + 1, undef_null, b)) return -1;
    }
    if (ind && m->n) PAD(depth);
#undef PAD
    return sb_putc(b, '}');
}

/* A string value from a strbuf that collected it (the buffer is freed). */
static val *sb_val(rctx *R, strbuf *b, const node *at) {
    if (b->failed) {
        free(b->p);
        if (R->failed) return NULL;
        return rfail(R, at, "template output exceeds %zu bytes", R->o.max_output);
    }
    val *v = R->failed ? NULL : mkstr(R, b->p ? b->p : "", b->n, 1);
    free(b->p);
    return v;
}
#define SB_INIT(R) ((strbuf){NULL, 0, 0, (R)->o.max_output, 0})

/* to_json as a string value */
static val *json_val(rctx *R, const val *v, const json_opts *o, int undef_null, const node *at) {
    strbuf b = SB_INIT(R);
    if (to_json(R, v, o, 0, undef_null, &b) && R->failed) {
        free(b.p);
        return NULL;
    }
    return sb_val(R, &b, at);  /* a buffer that overflowed becomes the output-size error */
}

/* ---------------------------------------------------------------------------- comparisons */

/* JavaScript's ToNumber for a string. */
static double js_str_num(const char *s, size_t n) {
    size_t a = ws_span(s, n);
    n = ws_trim_end(s, n);
    if (a >= n) return 0;
    char buf[128];
    size_t k = n - a;
    if (k >= sizeof buf) return NAN;
    memcpy(buf, s + a, k), buf[k] = 0;
    const char *p = buf;
    if (k > 2 && p[0] == '0' && strchr("xXoObB", p[1])) {
        int base = p[1] == 'x' || p[1] == 'X' ? 16 : p[1] == 'o' || p[1] == 'O' ? 8 : 2;
        double x = 0;
        for (p += 2; *p; p++) {
            int d = isxdigit((unsigned char)*p) ? (int)hex_val(*p) : 99;
            if (d >= base) return NAN;
            x = x * base + d;
        }
        return x;
    }
    if (*p == '+' || *p == '-') p++;
    if (!strcmp(p, "Infinity")) return buf[0] == '-' ? -INFINITY : INFINITY;
    /* digits, an optional fraction and exponent: what strtod takes minus inf/nan/hex */
    const char *q = p;
    int digits = 0;
    while (isdigit((unsigned char)*q)) q++, digits++;
    if (*q == '.') for (q++; isdigit((unsigned char)*q); q++) digits++;
    if (!digits) return NAN;
    if (*q == 'e' || *q == 'E') {
        q++;
        if (*q == '+' || *q == '-') q++;
        if (!isdigit((unsigned char)*q)) return NAN;
        while (isdigit((unsigned char)*q)) q++;
    }
    if (*q) return NAN;
    return strtod(buf, NULL);
}

static int is_primitive(const val *v) { return v->t <= V_STR; }

/* `==`: JavaScript's loose equality of the two values' payloads. */
static int loose_eq(rctx *R, const val *a, const val *b) {
    if ((a->t == V_UNDEF || a->t == V_NULL) || (b->t == V_UNDEF || b->t == V_NULL))
        return (a->t == V_UNDEF || a->t == V_NULL) && (b->t == V_UNDEF || b->t == V_NULL);
    if (!is_primitive(a) && !is_primitive(b)) {
        if (a->t == V_LOOP && b->t == V_LOOP) return a->loop.items == b->loop.items && a->loop.i == b->loop.i;
        return a == b;
    }
    if (!is_primitive(a) || !is_primitive(b)) {  /* an object against a primitive: the object's text */
        const val *o = is_primitive(a) ? b : a, *p = is_primitive(a) ? a : b;
        if (o->t == V_FUNC) return 0;
        strbuf sb = SB_INIT(R);
        js_text(R, o, &sb);
        val *s = sb_val(R, &sb, NULL);
        return s ? loose_eq(R, s, p) : 0;
    }
    if (a->t == V_STR && b->t == V_STR) return a->str.n == b->str.n && !memcmp(a->str.s, b->str.s, a->str.n);
    double x = a->t == V_STR ? js_str_num(a->str.s, a->str.n) : a->t == V_BOOL ? a->b : a->num;
    double y = b->t == V_STR ? js_str_num(b->str.s, b->str.n) : b->t == V_BOOL ? b->b : b->num;
    return x == y;
}

/* `===` on the payloads (membership in a list, equalto) */
static int strict_eq(const val *a, const val *b) {
    if (is_num(a) && is_num(b)) return a->num == b->num;
    if (a->t != b->t) {
        return (is_object(a) && is_object(b)) || (is_array(a) && is_array(b)) ? a == b : 0;
    }
    switch (a->t) {
    case V_UNDEF: case V_NULL: return 1;
    case V_BOOL: return a->b == b->b;
    case V_STR: return a->str.n == b->str.n && !memcmp(a->str.s, b->str.s, a->str.n);
    case V_LOOP: return a->loop.items == b->loop.items && a->loop.i == b->loop.i;
    default: return a == b;
    }
}

static int ascii_lower_cmp(const char *a, size_t an, const char *b, size_t bn, int case_sensitive) {
    size_t n = an < bn ? an : bn;
    for (size_t i = 0; i < n; i++) {
        int x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (!case_sensitive) x = tolower(x), y = tolower(y);
        if (x != y) return x < y ? -1 : 1;
    }
    return (an > bn) - (an < bn);
}

/* compareRuntimeValues: numbers (and booleans) by value, strings (case-insensitive unless asked) by
 * code unit; anything else is an error. Returns -2 on error. */
static int compare_vals(rctx *R, const val *a, const val *b, int case_sensitive, const node *at) {
    if (a->t == V_NULL && b->t == V_NULL) return 0;
    if (a->t == V_UNDEF && b->t == V_UNDEF) return 0;
    int an = is_num(a) || a->t == V_BOOL, bn = is_num(b) || b->t == V_BOOL;
    if (an && bn) {
        double x = a->t == V_BOOL ? a->b : a->num, y = b->t == V_BOOL ? b->b : b->num;
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a->t == V_STR && b->t == V_STR) return ascii_lower_cmp(a->str.s, a->str.n, b->str.s, b->str.n, case_sensitive);
    rfail(R, at, "Cannot compare %s with %s", vt_names[a->t], vt_names[b->t]);
    return -2;
}

/* ============================================================================ evaluator: expressions */

static val *ev(rctx *R, env *e, const node *x);
static int render(rctx *R, env *e, const nlist *body, strbuf *out);

typedef struct args {   /* evaluated call arguments: positional, then keyword ones */
    val **pos;
    size_t np;
    omap *kw;           /* NULL when there were none */
} args;

static int eval_args(rctx *R, env *e, const nlist *l, args *a) {
    memset(a, 0, sizeof *a);
    if (l->n) {
        a->pos = ralloc(R, l->n * sizeof *a->pos);
        if (!a->pos) return -1;
    }
    for (size_t i = 0; i < l->n; i++) {
        const node *x = l->v[i];
        if (x->k == N_KWARG) continue;
        if (!(a->pos[a->np++] = ev(R, e, x))) return -1;
    }
    for (size_t i = 0; i < l->n; i++) {
        const node *x = l->v[i];
        if (x->k != N_KWARG) continue;
        if (!a->kw) {
            val *k = mkobj(R, V_KWARGS);
            if (!k) return -1;
            a->kw = k->obj;
        }
        if (omap_get(a->kw, x->s, x->sn))
            return rfail(R, x, "Got multiple values for keyword argument '%.*s'", (int)x->sn, x->s), -1;
        val *v = ev(R, e, x->a);
        if (!v || omap_set(R, a->kw, x->s, x->sn, v)) return -1;
    }
    return 0;
}

static val *kwarg(const args *a, const char *name) { return a->kw ? omap_get(a->kw, name, strlen(name)) : NULL; }
/* positional i, else keyword `name`, else NULL */
static val *arg_or(const args *a, size_t i, const char *name) { return i < a->np ? a->pos[i] : kwarg(a, name); }

/* The calling convention of the reference's functions: positionals, then one KeywordArgumentsValue. */
static val **args_flat(rctx *R, const args *a, size_t *n) {
    *n = a->np + (a->kw && a->kw->n ? 1 : 0);
    val **v = ralloc(R, (*n + 1) * sizeof *v);
    if (!v) return NULL;
    if (a->np) memcpy(v, a->pos, a->np * sizeof *v);
    if (*n > a->np) {
        val *k = mkval(R, V_KWARGS);
        if (!k) return NULL;
        k->obj = a->kw;
        v[a->np] = k;
    }
    return v;
}

/* ---------------------------------------------------------------------------- string methods */

static val *str_trim(rctx *R, const val *s, int left, int right) {
    size_t a = left ? ws_span(s->str.s, s->str.n) : 0, n = s->str.n;
    if (right) n = a + ws_trim_end(s->str.s + a, n - a);
    return mkstr(R, s->str.s + a, n - a, 0);
}

static val *str_case(rctx *R, const val *s, int mode) {  /* 'u'pper, 'l'ower, 't'itle, 'c'apitalize: ASCII */
    char *o = ralloc(R, s->str.n + 1);
    if (!o) return NULL;
    memcpy(o, s->str.s, s->str.n), o[s->str.n] = 0;
    for (size_t i = 0; i < s->str.n; i++) {
        unsigned char c = (unsigned char)o[i];
        if (mode == 'u') o[i] = (char)toupper(c);
        else if (mode == 'l') o[i] = (char)tolower(c);
        else if (mode == 't') {  /* /\b\w/g: a word character after a non-word one (ASCII \w) */
            int prev_word = i > 0 && is_word((unsigned char)s->str.s[i - 1]);
            if (is_word(c) && !prev_word) o[i] = (char)toupper(c);
        } else if (mode == 'c' && i == 0) o[i] = (char)toupper(c);
    }
    return mkstr(R, o, s->str.n, 0);
}

static int has_affix(const val *s, const val *p, int end) {
    if (p->str.n > s->str.n) return 0;
    return !memcmp(s->str.s + (end ? s->str.n - p->str.n : 0), p->str.s, p->str.n);
}

static val *str_affix(rctx *R, const val *s, val **a, size_t n, int end, const node *at) {
    const char *name = end ? "endswith" : "startswith";
    if (n == 0) return rfail(R, at, "%s() requires at least one argument", name);
    if (a[0]->t == V_STR) return VBOOL(has_affix(s, a[0], end));
    if (is_array(a[0])) {
        for (size_t i = 0; i < a[0]->arr.n; i++) {
            if (a[0]->arr.it[i]->t != V_STR) return rfail(R, at, "%s() tuple elements must be strings", name);
            if (has_affix(s, a[0]->arr.it[i], end)) return &V_TRUE_;
        }
        return &V_FALSE_;
    }
    return rfail(R, at, "%s() argument must be a string or tuple of strings", name);
}

static int arr_push(rctx *R, val *arr, size_t *cap, val *x) {
    if (!x) return -1;
    if (arr->arr.n == *cap) {
        size_t c = *cap ? *cap * 2 : 8;
        val **it = ralloc(R, c * sizeof *it);
        if (!it) return -1;
        if (arr->arr.n) memcpy(it, arr->arr.it, arr->arr.n * sizeof *it);
        arr->arr.it = it, *cap = c;
    }
    arr->arr.it[arr->arr.n++] = x;
    return step(R, NULL, 1);
}

/* str.split(sep=None, maxsplit=-1) as the reference does it */
static val *str_split(rctx *R, const val *s, val **a, size_t n, const node *at) {
    const val *sep = n > 0 ? a[0] : VNULL, *max = n > 1 ? a[1] : NULL;
    if (sep->t != V_STR && sep->t != V_NULL) return rfail(R, at, "sep argument must be a string or null");
    if (max && max->t != V_INT) return rfail(R, at, "maxsplit argument must be a number");
    double maxsplit = max ? max->num : -1;
    val *out = mkarr(R, V_ARRAY, 0);
    size_t cap = 0;
    if (!out) return NULL;
    const char *p = s->str.s;
    size_t len = s->str.n;
    if (sep->t == V_NULL) {
        size_t i = ws_span(p, len);
        while (i < len) {
            size_t w = i;
            while (w < len) {
                size_t k = ws_span(p + w, len - w);
                if (k) break;
                uint32_t cp;
                w += (size_t)u8_dec((const unsigned char *)p + w, len - w, &cp);
            }
            if (maxsplit >= 0 && (double)out->arr.n >= maxsplit) {
                if (arr_push(R, out, &cap, mkstr(R, p + i, len - i, 0))) return NULL;
                break;
            }
            if (arr_push(R, out, &cap, mkstr(R, p + i, w - i, 0))) return NULL;
            i = w + ws_span(p + w, len - w);
        }
        return out;
    }
    if (sep->str.n == 0) return rfail(R, at, "empty separator");
    size_t i = 0;
    for (;;) {
        if (maxsplit >= 0 && (double)out->arr.n >= maxsplit) {
            if (arr_push(R, out, &cap, mkstr(R, p + i, len - i, 0))) return NULL;
            break;
        }
        const char *q = sep->str.n <= len - i ? memmem(p + i, len - i, sep->str.s, sep->str.n) : NULL;
        if (!q) {
            if (arr_push(R, out, &cap, mkstr(R, p + i, len - i, 0))) return NULL;
            break;
        }
        if (arr_push(R, out, &cap, mkstr(R, p + i, (size_t)(q - p) - i, 0))) return NULL;
        i = (size_t)(q - p) + sep->str.n;
    }
    return out;
}

/* str.replace(old, new, count=None): count < 0 or None replaces all; an empty `old` matches between
 * every two characters and at both ends */
static val *str_replace(rctx *R, const val *s, val **a, size_t n, const node *at) {
    if (n < 2) return rfail(R, at, "replace() requires at least two arguments");
    if (a[0]->t != V_STR || a[1]->t != V_STR) return rfail(R, at, "replace() arguments must be strings");
    const val *count = VNULL;
    if (n > 2) {
        if (a[2]->t == V_KWARGS) {
            val *c = omap_get(a[2]->obj, "count", 5);
            count = c ? c : VNULL;
        } else {
            count = a[2];
        }
    }
    if (count->t != V_INT && count->t != V_NULL)
        return rfail(R, at, "replace() count argument must be a number or null");
    double left = count->t == V_NULL || count->num < 0 ? INFINITY : count->num;
    if (left == 0) return (val *)s;
    const char *p = s->str.s, *o = a[0]->str.s, *w = a[1]->str.s;
    size_t len = s->str.n, on = a[0]->str.n, wn = a[1]->str.n;
    strbuf b = SB_INIT(R);
    size_t i = 0;
    if (on == 0) {
        for (;;) {
            if (left > 0) sb_put(&b, w, wn), left--;
            if (i >= len) break;
            uint32_t cp;
            int k = u8_dec((const unsigned char *)p + i, len - i, &cp);
            sb_put(&b, p + i, (size_t)k);
            i += (size_t)k;
            if (b.failed) break;
        }
    } else {
        while (i < len) {
            const char *q = left > 0 && on <= len - i ? memmem(p + i, len - i, o, on) : NULL;
            if (!q) break;
            sb_put(&b, p + i, (size_t)(q - p) - i);
            sb_put(&b, w, wn);
            left--;
            i = (size_t)(q - p) + on;
            if (b.failed) break;
        }
        sb_put(&b, p + i, len - i);
    }
    if (step(R, at, BYTES_STEPS(b.n))) { free(b.p); return NULL; }
    return sb_val(R, &b, at);
}

/* ---------------------------------------------------------------------------- functions */

static int fmt_date(rctx *R, const char *f, size_t n, strbuf *b, const node *at) {
    static const char *const mon[] = {"January", "February", "March", "April", "May", "June", "July",
                                      "August", "September", "October", "November", "December"};
    const api_template_time *t = R->o.now;
    if (!t) { rfail(R, at, "strftime_now: no clock was given to the renderer"); return -1; }
    int m = t->month >= 1 && t->month <= 12 ? t->month - 1 : 0;
    char tmp[32];
    for (size_t i = 0; i < n; i++) {
        if (f[i] != '%' || i + 1 >= n || !strchr("YmdbBHM%", f[i + 1]) || !f[i + 1]) { sb_putc(b, f[i]); continue; }
        switch (f[++i]) {
        case 'Y': snprintf(tmp, sizeof tmp, "%d", t->year); break;
        case 'm': snprintf(tmp, sizeof tmp, "%02d", m + 1); break;
        case 'd': snprintf(tmp, sizeof tmp, "%02d", t->day); break;
        case 'b': snprintf(tmp, sizeof tmp, "%.3s", mon[m]); break;
        case 'B': snprintf(tmp, sizeof tmp, "%s", mon[m]); break;
        case 'H': snprintf(tmp, sizeof tmp, "%02d", t->hour); break;
        case 'M': snprintf(tmp, sizeof tmp, "%02d", t->minute); break;
        default: snprintf(tmp, sizeof tmp, "%%"); break;
        }
        sb_puts(b, tmp);
    }
    return 0;
}

static val *call_macro(rctx *R, const val *fn, val **a, size_t n, const node *at) {
    const node *m = fn->fn.macro;
    if (++R->depth > R->o.max_depth)
        return rfail(R, at, "macro calls nested too deeply (max_depth %d)", R->o.max_depth);
    env *scope = env_new(R, fn->fn.scope);
    if (!scope) return NULL;
    omap *kw = NULL;
    if (n && a[n - 1]->t == V_KWARGS) {
        kw = ralloc(R, sizeof *kw);
        if (!kw) return NULL;
        memset(kw, 0, sizeof *kw);
        omap *src = a[--n]->obj;
        for (size_t i = 0; i < src->n; i++)
            if (omap_set(R, kw, src->e[i].k, src->e[i].kn, src->e[i].v)) return NULL;
    }
    const node **pending = ralloc(R, (m->l1.n + 1) * sizeof *pending);
    if (!pending) return NULL;
    for (size_t i = 0; i < m->l1.n; i++) {
        const node *p = m->l1.v[i];
        val *v = i < n ? a[i] : NULL;
        if (!v && kw) {
            for (size_t j = 0; j < kw->n; j++)
                if (kw->e[j].kn == p->sn && !memcmp(kw->e[j].k, p->s, p->sn)) {
                    v = kw->e[j].v;
                    memmove(kw->e + j, kw->e + j + 1, (kw->n - j - 1) * sizeof *kw->e);
                    kw->n--;
                    break;
                }
        }
        pending[i] = !v && p->k == N_KWARG ? p : NULL;
        if (omap_set(R, &scope->vars, p->s, p->sn, v ? v : UNDEF)) return NULL;
    }
    if (kw && kw->n)
        return rfail(R, at, "macro '%.*s' takes no keyword argument '%.*s'", (int)m->sn, m->s, (int)kw->e[0].kn,
                     kw->e[0].k);
    if (n > m->l1.n) return rfail(R, at, "macro '%.*s' takes not more than %zu argument(s)", (int)m->sn, m->s, m->l1.n);
    for (size_t i = 0; i < m->l1.n; i++) {
        if (!pending[i]) continue;
        val *v = ev(R, scope, pending[i]->a);
        if (!v || omap_set(R, &scope->vars, pending[i]->s, pending[i]->sn, v)) return NULL;
    }
    strbuf b = SB_INIT(R);
    int rc = render(R, scope, &m->l2, &b);
    R->depth--;
    if (rc > 0) { free(b.p); return rfail(R, at, "'break' or 'continue' outside of a loop"); }
    if (rc < 0) { free(b.p); return NULL; }
    return sb_val(R, &b, at);
}

static val *call_fn(rctx *R, const val *fn, val **a, size_t n, const node *at) {
    const val *s = fn->fn.self;
    switch (fn->fn.k) {
    case F_MACRO: return call_macro(R, fn, a, n, at);
    case F_RAISE: {
        /* the reference throws new Error(args): the message is the arguments joined by ',' */
        strbuf b = SB_INIT(R);
        for (size_t i = 0; i < n; i++) {
            if (i) sb_putc(&b, ',');
            if (a[i]->t == V_KWARGS) sb_puts(&b, "[object Map]");
            else to_text(R, a[i], &b);
        }
        if (!R->failed) rfail(R, at, "%.*s", (int)(b.n < 200 ? b.n : 200), b.p ? b.p : "");
        free(b.p);
        return NULL;
    }
    case F_RANGE: {
        double v[3] = {0, 0, 1};
        if (n < 1 || n > 3) return rfail(R, at, "range() takes 1 to 3 arguments");
        for (size_t i = 0; i < n; i++) {
            if (!is_num(a[i])) return rfail(R, at, "range() arguments must be numbers");
            v[i] = a[i]->num;
        }
        double start = n == 1 ? 0 : v[0], stop = n == 1 ? v[0] : v[1], st = v[2];
        if (st == 0) return rfail(R, at, "range() step must not be zero");
        double count = st > 0 ? ceil((stop - start) / st) : ceil((start - stop) / -st);
        if (!(count > 0)) count = 0;
        if (count > (double)R->o.max_steps) return rfail(R, at, "range() of %.0f items exceeds the step limit", count);
        if (step(R, at, (size_t)count)) return NULL;
        val *out = mkarr(R, V_ARRAY, (size_t)count);
        if (!out) return NULL;
        for (size_t i = 0; i < (size_t)count; i++) {
            double x = start + st * (double)i;
            if (!(out->arr.it[i] = mknum(R, x == floor(x) ? V_INT : V_FLOAT, x))) return NULL;
        }
        return out;
    }
    case F_STRFTIME: {
        if (n < 1 || a[0]->t != V_STR) return rfail(R, at, "strftime_now() needs a format string");
        strbuf b = SB_INIT(R);
        if (fmt_date(R, a[0]->str.s, a[0]->str.n, &b, at)) { free(b.p); return NULL; }
        return sb_val(R, &b, at);
    }
    case F_NAMESPACE: {
        val *ns = mkobj(R, V_NS);
        if (!ns) return NULL;
        size_t np = n && a[n - 1]->t == V_KWARGS ? n - 1 : n;
        if (np > 1) return rfail(R, at, "namespace expected at most 1 argument, got %zu", np);
        if (np == 1) {
            const val *src = a[0];
            if (is_object(src)) {
                omap *m = obj_map(R, src);
                for (size_t i = 0; m && i < m->n; i++)
                    if (omap_set(R, ns->obj, m->e[i].k, m->e[i].kn, m->e[i].v)) return NULL;
                if (!m) return NULL;
            } else if (is_array(src)) {
                for (size_t i = 0; i < src->arr.n; i++) {
                    const val *p = src->arr.it[i];
                    if (!is_array(p) || p->arr.n != 2)
                        return rfail(R, at, "namespace expected an object or an iterable of [key, value] pairs");
                    if (p->arr.it[0]->t != V_STR) return rfail(R, at, "namespace keys must be strings");
                    if (omap_set(R, ns->obj, p->arr.it[0]->str.s, p->arr.it[0]->str.n, p->arr.it[1])) return NULL;
                }
            } else {
                return rfail(R, at, "'%s' object is not iterable", vt_names[src->t]);
            }
        }
        if (np < n)
            for (size_t i = 0; i < a[n - 1]->obj->n; i++) {
                oent *e = &a[n - 1]->obj->e[i];
                if (omap_set(R, ns->obj, e->k, e->kn, e->v)) return NULL;
            }
        return ns;
    }
    case F_UPPER: return str_case(R, s, 'u');
    case F_LOWER: return str_case(R, s, 'l');
    case F_TITLE: return str_case(R, s, 't');
    case F_CAPITALIZE: return str_case(R, s, 'c');
    case F_STRIP: return str_trim(R, s, 1, 1);   /* the reference ignores the characters argument */
    case F_LSTRIP: return str_trim(R, s, 1, 0);
    case F_RSTRIP: return str_trim(R, s, 0, 1);
    case F_STARTSWITH: return str_affix(R, s, a, n, 0, at);
    case F_ENDSWITH: return str_affix(R, s, a, n, 1, at);
    case F_SPLIT: return str_split(R, s, a, n, at);
    case F_REPLACE: return str_replace(R, s, a, n, at);
    case F_GET: {
        if (n < 1 || a[0]->t != V_STR)
            return rfail(R, at, "Object key must be a string: got %s", n ? vt_names[a[0]->t] : "UndefinedValue");
        omap *m = obj_map(R, s);
        if (!m) return NULL;
        val *v = omap_get(m, a[0]->str.s, a[0]->str.n);
        return v ? v : n > 1 ? a[1] : VNULL;
    }
    case F_ITEMS: case F_KEYS: case F_VALUES: {
        omap *m = obj_map(R, s);
        val *out = m ? mkarr(R, V_ARRAY, m->n) : NULL;
        if (!out || step(R, at, m->n)) return NULL;
        for (size_t i = 0; i < m->n; i++) {
            val *k = fn->fn.k == F_VALUES ? m->e[i].v : mkstr(R, m->e[i].k, m->e[i].kn, 0);
            if (!k) return NULL;
            if (fn->fn.k == F_ITEMS) {
                val *pair = mkarr(R, V_ARRAY, 2);
                if (!pair) return NULL;
                pair->arr.it[0] = k, pair->arr.it[1] = m->e[i].v;
                k = pair;
            }
            out->arr.it[i] = k;
        }
        return out;
    }
    }
    return rfail(R, at, "unknown function");
}

/* A builtin property of a non-container value (the reference's `builtins` maps). NULL: none. */
static val *builtin_of(rctx *R, val *v, const char *k, size_t kn) {
    static const struct { const char *name; fkind k; } smethods[] = {
        {"upper", F_UPPER}, {"lower", F_LOWER}, {"strip", F_STRIP}, {"title", F_TITLE},
        {"capitalize", F_CAPITALIZE}, {"rstrip", F_RSTRIP}, {"lstrip", F_LSTRIP}, {"startswith", F_STARTSWITH},
        {"endswith", F_ENDSWITH}, {"split", F_SPLIT}, {"replace", F_REPLACE},
    }, omethods[] = {{"get", F_GET}, {"items", F_ITEMS}, {"keys", F_KEYS}, {"values", F_VALUES}};
    if (v->t == V_STR) {
        if (kn == 6 && !memcmp(k, "length", 6)) return mknum(R, V_INT, (double)u16_len(v->str.s, v->str.n));
        for (size_t i = 0; i < sizeof smethods / sizeof smethods[0]; i++)
            if (strlen(smethods[i].name) == kn && !memcmp(smethods[i].name, k, kn)) return mkfn(R, smethods[i].k, v);
    } else if (is_array(v)) {
        if (kn == 6 && !memcmp(k, "length", 6)) return mknum(R, V_INT, (double)v->arr.n);
    } else if (is_object(v)) {
        for (size_t i = 0; i < sizeof omethods / sizeof omethods[0]; i++)
            if (strlen(omethods[i].name) == kn && !memcmp(omethods[i].name, k, kn)) return mkfn(R, omethods[i].k, v);
    }
    return NULL;
}

/* The value of `loop.<k>` without building the whole object. NULL: no such entry. */
static val *loop_get(rctx *R, const val *v, const char *k, size_t kn) {
    size_t i = v->loop.i, n = v->loop.n;
#define IS(w) (kn == sizeof(w) - 1 && !memcmp(k, w, kn))
    if (IS("index")) return mknum(R, V_INT, (double)(i + 1));
    if (IS("index0")) return mknum(R, V_INT, (double)i);
    if (IS("revindex")) return mknum(R, V_INT, (double)(n - i));
    if (IS("revindex0")) return mknum(R, V_INT, (double)(n - i - 1));
    if (IS("first")) return VBOOL(i == 0);
    if (IS("last")) return VBOOL(i + 1 == n);
    if (IS("length")) return mknum(R, V_INT, (double)n);
    if (IS("previtem")) return i > 0 ? v->loop.items[i - 1] : UNDEF;
    if (IS("nextitem")) return i + 1 < n ? v->loop.items[i + 1] : UNDEF;
#undef IS
    return NULL;
}

/* obj.k / obj[k] with k a string: entry, else builtin (objects), else undefined */
static val *get_attr(rctx *R, val *o, const char *k, size_t kn) {
    val *v = NULL;
    if (o->t == V_LOOP) v = loop_get(R, o, k, kn);
    else if (is_container(o)) v = omap_get(o->obj, k, kn);
    if (!v && R->failed) return NULL;
    if (!v && o->t != V_NS) v = builtin_of(R, o, k, kn);
    if (!v && R->failed) return NULL;
    return v ? v : UNDEF;
}

/* Code points of a string as an index. */
static size_t cp_count(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}
static size_t cp_offset(const char *s, size_t n, size_t idx) {  /* byte offset of code point idx */
    size_t i = 0;
    for (; i < n && idx; idx--) {
        uint32_t cp;
        i += (size_t)u8_dec((const unsigned char *)s + i, n - i, &cp);
    }
    return i;
}

static val *eval_member(rctx *R, env *e, const node *x) {
    val *o = ev(R, e, x->a);
    if (!o) return NULL;
    const node *p = x->b;
    if (x->flag && p->k == N_SLICE) {
        if (!is_array(o) && o->t != V_STR) return rfail(R, x, "Slice object must be an array or string");
        val *part[3];
        const node *pn[3] = {p->a, p->b, p->c};
        static const char *const names[] = {"start", "stop", "step"};
        for (int i = 0; i < 3; i++) {
            part[i] = pn[i] ? ev(R, e, pn[i]) : UNDEF;
            if (!part[i]) return NULL;
            if (part[i]->t != V_INT && part[i]->t != V_UNDEF)
                return rfail(R, x, "Slice %s must be numeric or undefined", names[i]);
        }
        double len = (double)(o->t == V_STR ? cp_count(o->str.s, o->str.n) : o->arr.n);
        double st = part[2]->t == V_INT ? part[2]->num : 1, dir = st > 0 ? 1 : st < 0 ? -1 : 0;
        double start, stop;
        if (dir >= 0) {
            start = part[0]->t == V_INT ? part[0]->num : 0;
            start = start < 0 ? fmax(len + start, 0) : fmin(start, len);
            stop = part[1]->t == V_INT ? part[1]->num : len;
            stop = stop < 0 ? fmax(len + stop, 0) : fmin(stop, len);
        } else {
            start = part[0]->t == V_INT ? part[0]->num : len - 1;
            start = start < 0 ? fmax(len + start, -1) : fmin(start, len - 1);
            stop = part[1]->t == V_INT ? part[1]->num : -1;
            stop = stop < -1 ? fmax(len + stop, -1) : fmin(stop, len - 1);
        }
        size_t cnt = 0;
        if (dir != 0)
            for (double i = start; dir * i < dir * stop; i += st) cnt++;
        if (step(R, x, cnt)) return NULL;
        if (o->t == V_STR) {
            strbuf b = SB_INIT(R);
            for (double i = start; dir != 0 && dir * i < dir * stop; i += st) {
                size_t off = cp_offset(o->str.s, o->str.n, (size_t)i);
                uint32_t cp;
                int k = u8_dec((const unsigned char *)o->str.s + off, o->str.n - off, &cp);
                sb_put(&b, o->str.s + off, (size_t)k);
            }
            return sb_val(R, &b, x);
        }
        val *out = mkarr(R, V_ARRAY, cnt);
        if (!out) return NULL;
        size_t k = 0;
        for (double i = start; dir != 0 && dir * i < dir * stop; i += st) out->arr.it[k++] = o->arr.it[(size_t)i];
        return out;
    }
    val *prop;
    if (x->flag) prop = ev(R, e, p);
    else if (p->k == N_INT) prop = mknum(R, V_INT, p->num);
    else prop = mkstr(R, p->s, p->sn, 0);
    if (!prop) return NULL;
    if (is_container(o)) {
        if (prop->t != V_STR) return rfail(R, x, "Cannot access property with non-string: got %s", vt_names[prop->t]);
        return get_attr(R, o, prop->str.s, prop->str.n);
    }
    if (is_array(o) || o->t == V_STR) {
        if (prop->t == V_INT) {  /* Array.prototype.at: negative counts from the end */
            double len = (double)(o->t == V_STR ? cp_count(o->str.s, o->str.n) : o->arr.n), i = prop->num;
            if (i < 0) i += len;
            if (!(i >= 0 && i < len)) return UNDEF;  /* NaN (0 // 0) included */
            if (is_array(o)) return o->arr.it[(size_t)i];
            size_t off = cp_offset(o->str.s, o->str.n, (size_t)i);
            uint32_t cp;
            int k = u8_dec((const unsigned char *)o->str.s + off, o->str.n - off, &cp);
            return mkstr(R, o->str.s + off, (size_t)k, 0);
        }
        if (prop->t == V_STR) return get_attr(R, o, prop->str.s, prop->str.n);
        return rfail(R, x, "Cannot access property with non-string/non-number: got %s", vt_names[prop->t]);
    }
    if (prop->t != V_STR) return rfail(R, x, "Cannot access property with non-string: got %s", vt_names[prop->t]);
    return UNDEF;
}

/* ---------------------------------------------------------------------------- operators */

static val *concat_text(rctx *R, const val *a, const val *b, const node *at, int undef_empty) {
    strbuf sb = SB_INIT(R);
    if (!(undef_empty && a->t == V_UNDEF)) js_text(R, a, &sb);
    if (!(undef_empty && b->t == V_UNDEF)) js_text(R, b, &sb);
    if (R->failed) { free(sb.p); return NULL; }
    if (step(R, at, BYTES_STEPS(sb.n))) { free(sb.p); return NULL; }
    return sb_val(R, &sb, at);
}

/* evaluateBinaryExpression, branch for branch */
static val *eval_binary(rctx *R, env *e, const node *x) {
    int op = x->op;
    val *l = ev(R, e, x->a);
    if (!l) return NULL;
    if (op == OP_AND) return truthy(l) ? ev(R, e, x->b) : l;
    if (op == OP_OR) return truthy(l) ? l : ev(R, e, x->b);
    val *r = ev(R, e, x->b);
    if (!r) return NULL;
    if (op == OP_EQ || op == OP_NE) {
        int eq = loose_eq(R, l, r);
        if (R->failed) return NULL;
        return VBOOL(op == OP_EQ ? eq : !eq);
    }
    if (is_num(l) && is_num(r) && op != OP_CONCAT && op != OP_POW) {
        double a = l->num, b = r->num;
        vt t = l->t == V_FLOAT || r->t == V_FLOAT ? V_FLOAT : V_INT;
        switch (op) {
        case OP_ADD: return mknum(R, t, a + b);
        case OP_SUB: return mknum(R, t, a - b);
        case OP_MUL: return mknum(R, t, a * b);
        case OP_DIV: return mknum(R, V_FLOAT, a / b);
        case OP_FLOORDIV: return mknum(R, t, floor(a / b));
        case OP_MOD: return mknum(R, t, fmod(a, b));
        case OP_LT: return VBOOL(a < b);
        case OP_GT: return VBOOL(a > b);
        case OP_GE: return VBOOL(a >= b);
        case OP_LE: return VBOOL(a <= b);
        default: break;
        }
    } else if (l->t == V_UNDEF || r->t == V_UNDEF) {
        if (r->t == V_UNDEF && (op == OP_IN || op == OP_NOTIN)) return VBOOL(op == OP_NOTIN);
        if (op == OP_CONCAT && l->t != V_NULL && r->t != V_NULL) return concat_text(R, l, r, x, 1);
        return rfail(R, x, "Cannot perform operation %s on undefined values", op_names[op]);
    } else if (l->t == V_NULL || r->t == V_NULL) {
        return rfail(R, x, "Cannot perform operation on null values");
    } else if (op == OP_CONCAT) {
        return concat_text(R, l, r, x, 0);
    } else if (op == OP_POW && (is_num(l) || l->t == V_BOOL) && (is_num(r) || r->t == V_BOOL)) {
        double a = l->t == V_BOOL ? l->b : l->num, b = r->t == V_BOOL ? r->b : r->num;
        if (a == 0 && b < 0) return rfail(R, x, "0.0 cannot be raised to a negative power");
        double p = pow(a, b);
        if (!isfinite(p)) return rfail(R, x, "Exponentiation result is not a finite real number");
        return mknum(R, l->t == V_FLOAT || r->t == V_FLOAT || b < 0 ? V_FLOAT : V_INT, p);
    } else if (is_array(l) && is_array(r)) {
        if (op == OP_ADD) {
            if (step(R, x, l->arr.n + r->arr.n)) return NULL;
            val *out = mkarr(R, V_ARRAY, l->arr.n + r->arr.n);
            if (!out) return NULL;
            if (l->arr.n) memcpy(out->arr.it, l->arr.it, l->arr.n * sizeof *out->arr.it);
            if (r->arr.n) memcpy(out->arr.it + l->arr.n, r->arr.it, r->arr.n * sizeof *out->arr.it);
            return out;
        }
    } else if (is_array(r)) {
        if (op == OP_IN || op == OP_NOTIN) {
            if (step(R, x, r->arr.n)) return NULL;
            int member = 0;
            for (size_t i = 0; i < r->arr.n && !member; i++) member = strict_eq(r->arr.it[i], l);
            return VBOOL(op == OP_IN ? member : !member);
        }
    }
    if ((l->t == V_STR || r->t == V_STR) && op == OP_ADD) return concat_text(R, l, r, x, 0);
    if (l->t == V_STR && r->t == V_STR && (op == OP_IN || op == OP_NOTIN)) {
        if (step(R, x, BYTES_STEPS(r->str.n))) return NULL;
        int in = l->str.n == 0 || (l->str.n <= r->str.n && memmem(r->str.s, r->str.n, l->str.s, l->str.n));
        return VBOOL(op == OP_IN ? in : !in);
    }
    if (l->t == V_STR && is_object(r) && (op == OP_IN || op == OP_NOTIN)) {
        omap *m = obj_map(R, r);
        if (!m || step(R, x, BYTES_STEPS(m->n * 8))) return NULL;
        int in = omap_get(m, l->str.s, l->str.n) != NULL;
        return VBOOL(op == OP_IN ? in : !in);
    }
    return rfail(R, x, "Unknown operator \"%s\" between %s and %s", op_names[op], vt_names[l->t], vt_names[r->t]);
}

/* ---------------------------------------------------------------------------- tests */

static const char *const test_names[] = {
    "boolean", "callable", "odd", "even", "false", "true", "none", "string", "number", "integer", "iterable",
    "mapping", "sequence", "lower", "upper", "defined", "undefined", "equalto", "eq", NULL,
};

static int test_known(const char *name, size_t n) {
    for (const char *const *q = test_names; *q; q++)
        if (strlen(*q) == n && !memcmp(*q, name, n)) return 1;
    return 0;
}

/* Environment.TESTS; b is the second operand of equalto (undefined in `x is eq`). -1: error. */
static int run_test(rctx *R, const char *name, size_t n, const val *a, const val *b, const node *at) {
#define IS(w) (n == sizeof(w) - 1 && !memcmp(name, w, n))
    if (IS("boolean")) return a->t == V_BOOL;
    if (IS("callable")) return a->t == V_FUNC;
    if (IS("odd") || IS("even")) {
        if (a->t != V_INT) return rfail(R, at, "cannot %.*s on %s", (int)n, name, vt_names[a->t]), -1;
        int odd = fmod(a->num, 2) != 0;
        return IS("odd") ? odd : !odd;
    }
    if (IS("false")) return a->t == V_BOOL && !a->b;
    if (IS("true")) return a->t == V_BOOL && a->b;
    if (IS("none")) return a->t == V_NULL;
    if (IS("string")) return a->t == V_STR;
    if (IS("number")) return is_num(a);
    if (IS("integer")) return a->t == V_INT;
    if (IS("iterable")) return a->t == V_ARRAY || a->t == V_STR;  /* not a tuple: the reference checks the type name */
    if (IS("mapping")) return is_object(a);
    if (IS("sequence")) return is_array(a) || is_object(a) || a->t == V_STR;
    if (IS("lower") || IS("upper")) {
        if (a->t != V_STR) return 0;
        for (size_t i = 0; i < a->str.n; i++) {
            int c = (unsigned char)a->str.s[i];
            if (IS("lower") ? isupper(c) : islower(c)) return 0;
        }
        return 1;
    }
    if (IS("defined")) return a->t != V_UNDEF;
    if (IS("undefined")) return a->t == V_UNDEF;
    if (IS("equalto") || IS("eq")) return strict_eq(a, b ? b : UNDEF);
#undef IS
    return rfail(R, at, "Unknown test: %.*s", (int)n, name), -1;
}

/* ---------------------------------------------------------------------------- filters */

/* JavaScript's Array.prototype.join over the payloads (null and undefined join as "") */
static val *join_values(rctx *R, const val *arr, const char *sep, size_t sn, const node *at) {
    strbuf b = SB_INIT(R);
    for (size_t i = 0; i < arr->arr.n && !R->failed; i++) {
        if (i) sb_put(&b, sep, sn);
        const val *v = arr->arr.it[i];
        if (v->t == V_UNDEF || v->t == V_NULL) continue;
        js_text(R, v, &b);
    }
    if (R->failed) { free(b.p); return NULL; }
    if (step(R, at, BYTES_STEPS(b.n))) { free(b.p); return NULL; }
    return sb_val(R, &b, at);
}

/* getAttributeValue: a dotted path through objects and list indices */
static val *attr_path(rctx *R, val *item, const char *path, size_t n) {
    val *v = item;
    for (size_t i = 0; i <= n;) {
        size_t j = i;
        while (j < n && path[j] != '.') j++;
        if (is_container(v)) {
            v = v->t == V_LOOP ? loop_get(R, v, path + i, j - i) : omap_get(v->obj, path + i, j - i);
            if (!v) v = UNDEF;
        } else if (is_array(v)) {
            char buf[32];
            size_t k = j - i < sizeof buf - 1 ? j - i : sizeof buf - 1;
            memcpy(buf, path + i, k), buf[k] = 0;
            char *end;
            long idx = strtol(buf, &end, 10);
            if (end == buf || idx < 0 || (size_t)idx >= v->arr.n) return UNDEF;
            v = v->arr.it[idx];
        } else {
            return UNDEF;
        }
        i = j + 1;
    }
    return v;
}

/* A stable merge sort with compare_vals (JavaScript's sort is stable). */
static int sort_vals(rctx *R, val **v, size_t n, int reverse, int cs, const char *attr, size_t an, const node *at) {
    if (n < 2) return 0;
    val **tmp = ralloc(R, n * sizeof *tmp);
    if (!tmp) return -1;
    for (size_t w = 1; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n, i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                val *a = attr ? attr_path(R, v[i], attr, an) : v[i], *b = attr ? attr_path(R, v[j], attr, an) : v[j];
                if (!a || !b) return -1;
                int c = compare_vals(R, a, b, cs, at);
                if (c == -2 || step(R, at, 1)) return -1;
                if (reverse) c = -c;
                tmp[k++] = c <= 0 ? v[i++] : v[j++];
            }
            while (i < mid) tmp[k++] = v[i++];
            while (j < hi) tmp[k++] = v[j++];
        }
        memcpy(v, tmp, n * sizeof *v);
    }
    return 0;
}

static val *indent_text(rctx *R, const val *s, const char *ind, size_t in, int first, int blank, const node *at) {
    strbuf b = SB_INIT(R);
    const char *p = s->str.s;
    size_t n = s->str.n, i = 0, line = 0;
    for (;;) {
        const char *nl = memchr(p + i, '\n', n - i);
        size_t end = nl ? (size_t)(nl - p) : n;
        if ((first || line > 0) && (blank || end > i)) sb_put(&b, ind, in);
        sb_put(&b, p + i, end - i);
        if (!nl) break;
        sb_putc(&b, '\n');
        i = end + 1, line++;
    }
    if (step(R, at, BYTES_STEPS(b.n))) { free(b.p); return NULL; }
    return sb_val(R, &b, at);
}

/* JavaScript's parseInt(s, 10) / parseFloat(s); NAN when there is no number */
static double js_parse_num(const char *s, size_t n, int integer) {
    size_t a = ws_span(s, n);
    char buf[128];
    size_t k = n - a < sizeof buf - 1 ? n - a : sizeof buf - 1;
    memcpy(buf, s + a, k), buf[k] = 0;
    const char *p = buf;
    int neg = *p == '-';
    if (*p == '+' || *p == '-') p++;
    if (!integer && !strncmp(p, "Infinity", 8)) return neg ? -INFINITY : INFINITY;
    const char *q = p;
    while (isdigit((unsigned char)*q)) q++;
    if (integer) {
        if (q == p) return NAN;
        double x = 0;
        for (const char *d = p; d < q; d++) x = x * 10 + (*d - '0');
        return neg ? -x : x;
    }
    const char *r = q;
    if (*r == '.') { r++; while (isdigit((unsigned char)*r)) r++; }
    if (r == p || (r == p + 1 && *p == '.')) return NAN;
    if (*r == 'e' || *r == 'E') {
        const char *t = r + 1;
        if (*t == '+' || *t == '-') t++;
        if (isdigit((unsigned char)*t)) { while (isdigit((unsigned char)*t)) t++; r = t; }
    }
    char num[128];
    size_t m = (size_t)(r - buf);
    memcpy(num, buf, m), num[m] = 0;
    return strtod(num, NULL);
}

static val *num_or_zero(rctx *R, double x, int integer) {
    if (isnan(x)) x = 0;
    return mknum(R, integer ? V_INT : V_FLOAT, x);
}

static val *apply_filter(rctx *R, env *e, val *v, const node *f, const node *at);

static val *filter_plain(rctx *R, val *v, const char *name, size_t n, const node *at) {
#define IS(w) (n == sizeof(w) - 1 && !memcmp(name, w, n))
    if (IS("safe")) return v;
    if (IS("tojson")) {
        json_opts o = {0};
        return json_val(R, v, &o, 1, at);
    }
    if (is_array(v)) {
        if (IS("list")) return v;
        if (IS("first") || IS("last")) {
            if (!v->arr.n) return rfail(R, at, "'%.*s' of an empty list", (int)n, name);
            return v->arr.it[IS("first") ? 0 : v->arr.n - 1];
        }
        if (IS("length")) return mknum(R, V_INT, (double)v->arr.n);
        if (IS("reverse") || IS("sort") || IS("unique")) {
            if (step(R, at, v->arr.n)) return NULL;
            val *out = mkarr(R, V_ARRAY, v->arr.n);
            if (!out) return NULL;
            if (IS("reverse"))
                for (size_t i = 0; i < v->arr.n; i++) out->arr.it[i] = v->arr.it[v->arr.n - 1 - i];
            else if (IS("sort")) {
                if (v->arr.n) memcpy(out->arr.it, v->arr.it, v->arr.n * sizeof *out->arr.it);
                if (sort_vals(R, out->arr.it, out->arr.n, 0, 0, NULL, 0, at)) return NULL;
            } else {
                size_t k = 0;
                for (size_t i = 0; i < v->arr.n; i++) {
                    int seen = 0;
                    for (size_t j = 0; j < k && !seen; j++) seen = strict_eq(out->arr.it[j], v->arr.it[i]);
                    if (step(R, at, BYTES_STEPS(k))) return NULL;
                    if (!seen) out->arr.it[k++] = v->arr.it[i];
                }
                out->arr.n = k;
            }
            return out;
        }
        if (IS("join")) return join_values(R, v, "", 0, at);
        if (IS("string")) {
            json_opts o = {0};
            return json_val(R, v, &o, 0, at);
        }
        return rfail(R, at, "Unknown ArrayValue filter: %.*s", (int)n, name);
    }
    if (v->t == V_STR) {
        if (IS("length")) return mknum(R, V_INT, (double)u16_len(v->str.s, v->str.n));
        if (IS("upper")) return str_case(R, v, 'u');
        if (IS("lower")) return str_case(R, v, 'l');
        if (IS("title")) return str_case(R, v, 't');
        if (IS("capitalize")) return str_case(R, v, 'c');
        if (IS("trim")) return str_trim(R, v, 1, 1);
        if (IS("indent")) return indent_text(R, v, "    ", 4, 0, 0, at);
        if (IS("join") || IS("string")) return v;
        if (IS("int") || IS("float")) return num_or_zero(R, js_parse_num(v->str.s, v->str.n, IS("int")), IS("int"));
        return rfail(R, at, "Unknown StringValue filter: %.*s", (int)n, name);
    }
    if (is_num(v)) {
        if (IS("abs")) return mknum(R, v->t, fabs(v->num));
        if (IS("int")) return mknum(R, V_INT, trunc(v->num) + 0.0);
        if (IS("float")) return mknum(R, V_FLOAT, v->num);
        if (IS("string")) {
            strbuf b = SB_INIT(R);
            to_text(R, v, &b);
            return sb_val(R, &b, at);
        }
        return rfail(R, at, "Unknown NumericValue filter: %.*s", (int)n, name);
    }
    if (is_object(v)) {
        if (IS("items")) return call_fn(R, &(val){.t = V_FUNC, .fn = {.k = F_ITEMS, .self = v}}, NULL, 0, at);
        if (IS("length")) {
            omap *m = obj_map(R, v);
            return m ? mknum(R, V_INT, (double)m->n) : NULL;
        }
        val *b = builtin_of(R, v, name, n);
        if (b) return b->t == V_FUNC ? call_fn(R, b, NULL, 0, at) : b;
        return R->failed ? NULL : rfail(R, at, "Unknown ObjectValue filter: %.*s", (int)n, name);
    }
    if (v->t == V_BOOL) {
        if (IS("bool")) return v;
        if (IS("int")) return mknum(R, V_INT, v->b);
        if (IS("float")) return mknum(R, V_FLOAT, v->b);
        if (IS("string")) return mkstr(R, v->b ? "true" : "false", v->b ? 4 : 5, 0);
        return rfail(R, at, "Unknown BooleanValue filter: %.*s", (int)n, name);
    }
#undef IS
    return rfail(R, at, "Cannot apply filter \"%.*s\" to type: %s", (int)n, name, vt_names[v->t]);
}

static val *filter_call(rctx *R, env *e, val *v, const node *f, const node *at) {
    const char *name = f->a->s;
    size_t n = f->a->sn;
    args a;
    if (eval_args(R, e, &f->l1, &a)) return NULL;
#define IS(w) (n == sizeof(w) - 1 && !memcmp(name, w, n))
    if (IS("tojson")) {
        json_opts o = {0};
        val *ind = kwarg(&a, "indent"), *asc = kwarg(&a, "ensure_ascii"), *srt = kwarg(&a, "sort_keys"),
            *sep = kwarg(&a, "separators");
        if (ind && ind->t != V_INT && ind->t != V_NULL) return rfail(R, at, "If set, indent must be a number");
        if (asc && asc->t != V_BOOL) return rfail(R, at, "If set, ensure_ascii must be a boolean");
        if (srt && srt->t != V_BOOL) return rfail(R, at, "If set, sort_keys must be a boolean");
        if (ind && ind->t == V_INT) {
            if (!(ind->num >= 0)) return rfail(R, at, "Invalid count value: %g", ind->num);
            if (ind->num > 64) return rfail(R, at, "tojson indent %g is larger than 64", ind->num);
            o.indent = (int)ind->num;
        }
        o.ascii = asc && asc->b, o.sort = srt && srt->b;
        if (sep && is_array(sep)) {
            if (sep->arr.n != 2 || sep->arr.it[0]->t != V_STR || sep->arr.it[1]->t != V_STR)
                return rfail(R, at, "separators must be a tuple of two strings");
            o.item_sep = sep->arr.it[0]->str.s, o.isn = sep->arr.it[0]->str.n;
            o.key_sep = sep->arr.it[1]->str.s, o.ksn = sep->arr.it[1]->str.n;
        } else if (sep && sep->t != V_NULL) {
            return rfail(R, at, "If set, separators must be a tuple of two strings");
        }
        return json_val(R, v, &o, 1, at);
    }
    if (IS("join")) {
        val *sep = arg_or(&a, 0, "separator");
        if (!sep) sep = mkstr(R, "", 0, 0);
        if (!sep) return NULL;
        if (v->t != V_STR && !is_array(v))
            return rfail(R, at, "Cannot apply filter \"join\" to type: %s", vt_names[v->t]);
        if (sep->t != V_STR) return rfail(R, at, "separator must be a string");
        if (is_array(v)) return join_values(R, v, sep->str.s, sep->str.n, at);
        strbuf b = SB_INIT(R);
        for (size_t i = 0; i < v->str.n;) {
            uint32_t cp;
            int k = u8_dec((const unsigned char *)v->str.s + i, v->str.n - i, &cp);
            if (i) sb_put(&b, sep->str.s, sep->str.n);
            sb_put(&b, v->str.s + i, (size_t)k);
            i += (size_t)k;
        }
        if (step(R, at, BYTES_STEPS(b.n))) { free(b.p); return NULL; }
        return sb_val(R, &b, at);
    }
    if (IS("int") || IS("float")) {
        int integer = IS("int");
        val *def = arg_or(&a, 0, "default");
        if (v->t == V_STR) {
            double x = js_parse_num(v->str.s, v->str.n, integer);
            if (isnan(x)) return def ? def : mknum(R, integer ? V_INT : V_FLOAT, 0);
            return mknum(R, integer ? V_INT : V_FLOAT, x);
        }
        if (is_num(v)) return integer ? mknum(R, V_INT, trunc(v->num) + 0.0) : mknum(R, V_FLOAT, v->num);
        if (v->t == V_BOOL) return mknum(R, integer ? V_INT : V_FLOAT, v->b);
        return rfail(R, at, "Cannot apply filter \"%.*s\" to type: %s", (int)n, name, vt_names[v->t]);
    }
    if (IS("default")) {
        val *def = a.np > 0 ? a.pos[0] : mkstr(R, "", 0, 0), *boolean = arg_or(&a, 1, "boolean");
        if (!def) return NULL;
        if (boolean && boolean->t != V_BOOL) return rfail(R, at, "`default` filter flag must be a boolean");
        if (v->t == V_UNDEF || (boolean && boolean->b && !truthy(v))) return def;
        return v;
    }
    if (is_array(v)) {
        if (IS("sort")) {
            val *rev = arg_or(&a, 0, "reverse"), *cs = arg_or(&a, 1, "case_sensitive");
            val *attr = arg_or(&a, 2, "attribute");
            if (rev && rev->t != V_BOOL) return rfail(R, at, "reverse must be a boolean");
            if (cs && cs->t != V_BOOL) return rfail(R, at, "case_sensitive must be a boolean");
            if (attr && attr->t != V_STR && attr->t != V_INT && attr->t != V_NULL)
                return rfail(R, at, "attribute must be a string, integer, or null");
            char num[64];
            const char *ap = NULL;
            size_t an = 0;
            if (attr && attr->t == V_STR) ap = attr->str.s, an = attr->str.n;
            else if (attr && attr->t == V_INT) js_num(attr->num, num, sizeof num), ap = num, an = strlen(num);
            val *out = mkarr(R, V_ARRAY, v->arr.n);
            if (!out) return NULL;
            if (v->arr.n) memcpy(out->arr.it, v->arr.it, v->arr.n * sizeof *out->arr.it);
            if (sort_vals(R, out->arr.it, out->arr.n, rev && rev->b, cs && cs->b, ap, an, at)) return NULL;
            return out;
        }
        if (IS("selectattr") || IS("rejectattr")) {
            int select = IS("selectattr");
            for (size_t i = 0; i < v->arr.n; i++)
                if (!is_container(v->arr.it[i]))
                    return rfail(R, at, "`%.*s` can only be applied to array of objects", (int)n, name);
            for (size_t i = 0; i < f->l1.n; i++)
                if (f->l1.v[i]->k != N_STR) return rfail(R, at, "arguments of `%.*s` must be strings", (int)n, name);
            if (a.np < 1) return rfail(R, at, "`%.*s` needs an attribute name", (int)n, name);
            const val *attr = a.pos[0], *test = a.np > 1 ? a.pos[1] : NULL, *cmp = a.np > 2 ? a.pos[2] : NULL;
            if (test && !test_known(test->str.s, test->str.n))
                return rfail(R, at, "Unknown test: %.*s", (int)test->str.n, test->str.s);
            val *out = mkarr(R, V_ARRAY, 0);
            size_t cap = 0;
            if (!out) return NULL;
            for (size_t i = 0; i < v->arr.n; i++) {
                val *it = v->arr.it[i];
                val *x = it->t == V_LOOP ? loop_get(R, it, attr->str.s, attr->str.n)
                                         : omap_get(it->obj, attr->str.s, attr->str.n);
                int r = 0;
                if (x) r = test ? run_test(R, test->str.s, test->str.n, x, cmp, at) : truthy(x);
                if (r < 0) return NULL;
                if ((select ? r : !r) && arr_push(R, out, &cap, it)) return NULL;
            }
            return out;
        }
        if (IS("map")) {
            val *attr = kwarg(&a, "attribute"), *def = kwarg(&a, "default");
            if (!attr) return rfail(R, at, "`map` expressions without `attribute` set are not currently supported.");
            if (attr->t != V_STR) return rfail(R, at, "attribute must be a string");
            val *out = mkarr(R, V_ARRAY, v->arr.n);
            if (!out || step(R, at, v->arr.n)) return NULL;
            for (size_t i = 0; i < v->arr.n; i++) {
                if (!is_container(v->arr.it[i])) return rfail(R, at, "items in map must be an object");
                val *x = attr_path(R, v->arr.it[i], attr->str.s, attr->str.n);
                if (!x) return NULL;
                out->arr.it[i] = x->t == V_UNDEF ? (def ? def : UNDEF) : x;
            }
            return out;
        }
        return rfail(R, at, "Unknown ArrayValue filter: %.*s", (int)n, name);
    }
    if (v->t == V_STR) {
        if (IS("indent")) {
            val *w = arg_or(&a, 0, "width"), *first = arg_or(&a, 1, "first"), *blank = arg_or(&a, 2, "blank");
            if (w && w->t != V_INT && w->t != V_STR) return rfail(R, at, "width must be an integer or a string");
            char spaces[256];
            const char *ind = spaces;
            size_t in = 4;
            if (w && w->t == V_STR) ind = w->str.s, in = w->str.n;
            else if (w) {
                if (w->num > (double)sizeof spaces) return rfail(R, at, "indent width %g is too large", w->num);
                in = w->num > 0 ? (size_t)w->num : 0;
            }
            memset(spaces, ' ', sizeof spaces);
            return indent_text(R, v, ind, in, first && truthy(first), blank && truthy(blank), at);
        }
        if (IS("replace")) {
            size_t fn;
            val **flat = args_flat(R, &a, &fn);
            if (!flat) return NULL;
            if (fn == a.np) {  /* the reference always passes the keyword object, empty or not */
                val *k = mkobj(R, V_KWARGS);
                if (!k) return NULL;
                flat[fn++] = k;
            }
            return str_replace(R, v, flat, fn, at);
        }
        return rfail(R, at, "Unknown StringValue filter: %.*s", (int)n, name);
    }
    if (is_object(v)) {
        val *b = builtin_of(R, v, name, n);
        if (b && b->t == V_FUNC) {
            size_t fn;
            val **flat = args_flat(R, &a, &fn);
            return flat ? call_fn(R, b, flat, fn, at) : NULL;
        }
        return R->failed ? NULL : rfail(R, at, "Unknown ObjectValue filter: %.*s", (int)n, name);
    }
#undef IS
    return rfail(R, at, "Cannot apply filter \"%.*s\" to type: %s", (int)n, name, vt_names[v->t]);
}

static val *apply_filter(rctx *R, env *e, val *v, const node *f, const node *at) {
    if (f->k == N_IDENT) return filter_plain(R, v, f->s, f->sn, at);
    if (f->a->k != N_IDENT) return rfail(R, at, "Unknown filter");
    return filter_call(R, e, v, f, at);
}

/* ---------------------------------------------------------------------------- expressions */

static val *ev_(rctx *R, env *e, const node *x) {
    switch (x->k) {
    case N_STR: return mkstr(R, x->s, x->sn, 0);
    case N_INT: return mknum(R, V_INT, x->num);
    case N_FLOAT: return mknum(R, V_FLOAT, x->num);
    case N_IDENT: return env_lookup(e, x->s, x->sn);
    case N_ARRAY: case N_TUPLE: {
        val *out = mkarr(R, x->k == N_ARRAY ? V_ARRAY : V_TUPLE, x->l1.n);
        for (size_t i = 0; out && i < x->l1.n; i++)
            if (!(out->arr.it[i] = ev(R, e, x->l1.v[i]))) return NULL;
        return out;
    }
    case N_OBJECT: {
        val *out = mkobj(R, V_OBJECT);
        for (size_t i = 0; out && i < x->l1.n; i++) {
            val *k = ev(R, e, x->l1.v[i]);
            if (!k) return NULL;
            if (k->t != V_STR) return rfail(R, x->l1.v[i], "Object keys must be strings: got %s", vt_names[k->t]);
            val *v = ev(R, e, x->l2.v[i]);
            if (!v || omap_set(R, out->obj, k->str.s, k->str.n, v)) return NULL;
        }
        return out;
    }
    case N_BINARY: return eval_binary(R, e, x);
    case N_UNARY: {
        val *a = ev(R, e, x->a);
        if (!a) return NULL;
        if (x->op == '!') return VBOOL(!truthy(a));
        if (!is_num(a) && a->t != V_BOOL) return rfail(R, x, "Unknown operator \"%c\" for %s", x->op, vt_names[a->t]);
        double n = (a->t == V_BOOL ? a->b : a->num) * (x->op == '-' ? -1 : 1);
        return mknum(R, a->t == V_FLOAT ? V_FLOAT : V_INT, n);
    }
    case N_MEMBER: return eval_member(R, e, x);
    case N_CALL: {
        args a;
        if (eval_args(R, e, &x->l1, &a)) return NULL;
        val *fn = ev(R, e, x->a);
        if (!fn) return NULL;
        if (fn->t != V_FUNC)
            return rfail(R, x, "Cannot call something that is not a function: got %s", vt_names[fn->t]);
        size_t n;
        val **flat = args_flat(R, &a, &n);
        return flat ? call_fn(R, fn, flat, n, x) : NULL;
    }
    case N_FILTER: {
        val *v = ev(R, e, x->a);
        return v ? apply_filter(R, e, v, x->b, x) : NULL;
    }
    case N_TEST: {
        val *v = ev(R, e, x->a);
        if (!v) return NULL;
        int r = run_test(R, x->s, x->sn, v, NULL, x);
        return r < 0 ? NULL : VBOOL(x->flag ? !r : r);
    }
    case N_SELECT: {
        val *t = ev(R, e, x->b);
        if (!t) return NULL;
        return truthy(t) ? ev(R, e, x->a) : UNDEF;
    }
    case N_TERNARY: {
        val *c = ev(R, e, x->a);
        if (!c) return NULL;
        return ev(R, e, truthy(c) ? x->b : x->c);
    }
    case N_KWARG: case N_SLICE: break;
    default: break;
    }
    return rfail(R, x, "this construct cannot be used as a value here");
}

static val *ev(rctx *R, env *e, const node *x) {
    if (R->failed || step(R, x, 1)) return NULL;
    if (++R->depth > R->o.max_depth) return rfail(R, x, "evaluation nested too deeply (max_depth %d)", R->o.max_depth);
    val *v = ev_(R, e, x);
    R->depth--;
    if (!v && !R->failed) rfail(R, x, "out of memory");
    return v;
}

/* ============================================================================ evaluator: statements */

enum { RC_OK = 0, RC_BREAK = 1, RC_CONTINUE = 2, RC_ERR = -1 };

static int bind_loop_var(rctx *R, env *scope, const node *var, val *cur) {
    if (var->k == N_IDENT) return omap_set(R, &scope->vars, var->s, var->sn, cur);
    for (size_t j = 0; j < var->l1.n; j++) {
        const node *t = var->l1.v[j];
        if (t->k != N_IDENT) return rfail(R, t, "Cannot unpack non-identifier type: %s", "expression"), -1;
        if (omap_set(R, &scope->vars, t->s, t->sn, j < cur->arr.n ? cur->arr.it[j] : UNDEF)) return -1;
    }
    return 0;
}

static int render_for(rctx *R, env *e, const node *x, strbuf *out) {
    env *scope = env_new(R, e);
    if (!scope) return RC_ERR;
    const node *it_node = x->b, *test = NULL;
    if (it_node->k == N_SELECT) test = it_node->b, it_node = it_node->a;
    val *it = ev(R, scope, it_node);
    if (!it) return RC_ERR;
    if (!is_array(it) && !is_object(it))
        return rfail(R, x, "Expected iterable or object type in for loop: got %s", vt_names[it->t]), RC_ERR;
    if (is_object(it) && !(it = call_fn(R, &(val){.t = V_FUNC, .fn = {.k = F_KEYS, .self = it}}, NULL, 0, x)))
        return RC_ERR;
    const node *var = x->a;
    val **items = it->arr.it;
    size_t n = it->arr.n;
    if (var->k != N_IDENT || test) {
        items = n ? ralloc(R, n * sizeof *items) : NULL;
        if (n && !items) return RC_ERR;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            val *cur = it->arr.it[i];
            if (var->k == N_TUPLE) {
                if (cur->t != V_ARRAY)
                    return rfail(R, x, "Cannot unpack non-iterable type: %s", vt_names[cur->t]), RC_ERR;
                if (cur->arr.n != var->l1.n)
                    return rfail(R, x, "Too %s items to unpack", var->l1.n > cur->arr.n ? "few" : "many"), RC_ERR;
            }
            if (test) {
                env *ls = env_new(R, scope);
                if (!ls || bind_loop_var(R, ls, var, cur)) return RC_ERR;
                val *t = ev(R, ls, test);
                if (!t) return RC_ERR;
                if (!truthy(t)) continue;
            }
            items[k++] = cur;
        }
        n = k;
    }
    int none = 1;
    for (size_t i = 0; i < n; i++) {
        if (step(R, x, 1)) return RC_ERR;
        val *loop = mkval(R, V_LOOP);
        if (!loop) return RC_ERR;
        loop->loop.i = i, loop->loop.n = n, loop->loop.items = items;
        if (omap_set(R, &scope->vars, "loop", 4, loop) || bind_loop_var(R, scope, var, items[i])) return RC_ERR;
        size_t mark = out->n;
        int rc = render(R, scope, &x->l1, out);
        if (rc == RC_ERR) return RC_ERR;
        if (rc != RC_OK) {  /* the iteration's own output is dropped, as when the reference throws */
            out->n = mark;
            if (out->p) out->p[mark] = 0;
            if (rc == RC_BREAK) break;
            continue;
        }
        none = 0;
    }
    return none ? render(R, scope, &x->l2, out) : RC_OK;
}

static int exec_set(rctx *R, env *e, const node *x) {
    val *rhs;
    if (x->b) {
        rhs = ev(R, e, x->b);
    } else {
        strbuf b = SB_INIT(R);
        int rc = render(R, e, &x->l1, &b);
        if (rc != RC_OK) { free(b.p); return rc; }
        rhs = sb_val(R, &b, x);
    }
    if (!rhs) return RC_ERR;
    const node *t = x->a;
    if (t->k == N_IDENT) return omap_set(R, &e->vars, t->s, t->sn, rhs) ? RC_ERR : RC_OK;
    if (t->k == N_TUPLE) {
        if (!is_array(rhs)) return rfail(R, x, "Cannot unpack non-iterable type in set: %s", vt_names[rhs->t]), RC_ERR;
        if (rhs->arr.n != t->l1.n)
            return rfail(R, x, "Too %s items to unpack in set", t->l1.n > rhs->arr.n ? "few" : "many"), RC_ERR;
        for (size_t i = 0; i < t->l1.n; i++) {
            if (t->l1.v[i]->k != N_IDENT) return rfail(R, x, "Cannot unpack to non-identifier in set"), RC_ERR;
            if (omap_set(R, &e->vars, t->l1.v[i]->s, t->l1.v[i]->sn, rhs->arr.it[i])) return RC_ERR;
        }
        return RC_OK;
    }
    if (t->k == N_MEMBER) {
        val *o = ev(R, e, t->a);
        if (!o) return RC_ERR;
        if (o->t != V_NS) return rfail(R, x, "cannot assign attribute on non-namespace object"), RC_ERR;
        if (t->b->k != N_IDENT) return rfail(R, x, "Cannot assign to member with non-identifier property"), RC_ERR;
        return omap_set(R, o->obj, t->b->s, t->b->sn, rhs) ? RC_ERR : RC_OK;
    }
    return rfail(R, x, "Invalid left-hand side of an assignment"), RC_ERR;
}

/* Renders a block into out. RC_BREAK/RC_CONTINUE travel up to the enclosing for loop. */
static int render(rctx *R, env *e, const nlist *body, strbuf *out) {
    if (++R->depth > R->o.max_depth)
        return rfail(R, NULL, "blocks nested too deeply (max_depth %d)", R->o.max_depth), RC_ERR;
    int rc = RC_OK;
    for (size_t i = 0; i < body->n && rc == RC_OK; i++) {
        const node *x = body->v[i];
        if (step(R, x, 1)) { rc = RC_ERR; break; }
        switch (x->k) {
        case N_STR:
            if (step(R, x, BYTES_STEPS(x->sn)) || sb_put(out, x->s, x->sn)) rc = RC_ERR;
            break;
        case N_IF: {
            val *t = ev(R, e, x->a);
            rc = !t ? RC_ERR : render(R, e, truthy(t) ? &x->l1 : &x->l2, out);
            break;
        }
        case N_FOR: rc = render_for(R, e, x, out); break;
        case N_SET: rc = exec_set(R, e, x); break;
        case N_COMMENT: break;
        case N_MACRO: {
            val *fn = mkfn(R, F_MACRO, NULL);
            if (!fn) { rc = RC_ERR; break; }
            fn->fn.macro = x, fn->fn.scope = e;
            if (omap_set(R, &e->vars, x->s, x->sn, fn)) rc = RC_ERR;
            break;
        }
        case N_BREAK: rc = RC_BREAK; break;
        case N_CONTINUE: rc = RC_CONTINUE; break;
        default: {
            val *v = ev(R, e, x);
            if (!v) rc = RC_ERR;
            else if (v->t != V_NULL && v->t != V_UNDEF) {
                size_t before = out->n;
                if (to_text(R, v, out) || step(R, x, BYTES_STEPS(out->n - before))) rc = RC_ERR;
            }
        }
        }
        if (out->failed && rc != RC_ERR) rc = RC_ERR;
    }
    if (out->failed && !R->failed) rfail(R, NULL, "template output exceeds %zu bytes", R->o.max_output);
    R->depth--;
    return rc;
}

/* ============================================================================ public functions */

void api_template_opts_default(api_template_opts *o) {
    memset(o, 0, sizeof *o);
    o->max_output = (size_t)8 << 20;
    o->max_memory = (size_t)64 << 20;
    o->max_steps = 10 * 1000 * 1000;
    o->max_depth = 256;
}

api_template *api_template_compile(const char *src, size_t len, api_template_error *err) {
    if (err) memset(err, 0, sizeof *err);
    if (!src && len) { set_err_at(err, NULL, 0, "no template"); return NULL; }
    if (!src) src = "";
    if (len > TPL_MAX_SOURCE) {
        set_err_at(err, NULL, 0, "template larger than %zu bytes", TPL_MAX_SOURCE);
        return NULL;
    }
    if (!u8_valid((const unsigned char *)src, len)) {
        set_err_at(err, NULL, 0, "template is not valid UTF-8");
        return NULL;
    }
    api_template *t = calloc(1, sizeof *t);
    srcbuf a = {0}, b = {0};
    lexer L = {0};
    if (!t || !(t->orig = malloc(len + 1)) || srcbuf_init(&a, len) || srcbuf_init(&b, len)) {
        set_err_at(err, NULL, 0, "out of memory");
        goto fail;
    }
    if (len) memcpy(t->orig, src, len);
    t->orig[len] = 0, t->orig_n = len;
    /* the reference's preprocessing passes, ping-ponging between a and b */
    memcpy(a.s, src, len);
    for (size_t i = 0; i <= len; i++) a.map[i] = i;
    a.n = len;
    if (a.n && a.s[a.n - 1] == '\n') a.n--;
    pass_lstrip(&b, &a), b.map[b.n] = a.map[a.n], a.n = 0;
    pass_trim(&a, &b), a.map[a.n] = b.map[b.n], b.n = 0;
    pass_generation(&b, &a), b.map[b.n] = a.map[a.n];
    b.s[b.n] = 0;
    L.src = &b, L.mem = &t->mem, L.err = err, L.orig = t->orig;
    if (lx_run(&L)) goto fail;
    parser P = {L.toks, L.n, 0, 0, &t->mem, &b, t->orig, err, 0};
    vec body = {0};
    while (!P.failed && P.i < P.n) vec_push(&P, &body, parse_any(&P));
    if (P.failed) { free(body.v); goto fail; }
    if (vec_done(&P, &body, &t->body)) goto fail;
    free(L.toks);
    srcbuf_free(&a);
    t->pre = b.s;  /* text nodes point into it */
    free(b.map);
    return t;
fail:
    free(L.toks);
    srcbuf_free(&a), srcbuf_free(&b);
    api_template_free(t);
    return NULL;
}

void api_template_free(api_template *t) {
    if (!t) return;
    arena_free(&t->mem);
    free(t->pre);
    free(t->orig);
    free(t);
}

/* Array-index keys ("0", "17") come first, in numeric order, as Object.entries orders them. */
static int index_key(const char *k, size_t n, double *out) {
    if (n == 0 || n > 10 || (n > 1 && k[0] == '0')) return 0;
    double x = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)k[i])) return 0;
        x = x * 10 + (k[i] - '0');
    }
    *out = x;
    return x < 4294967295.0;
}

/* JSON -> value, as convertToRuntimeValues sees what JSON.parse made of it. */
static val *from_json(rctx *R, const json_t *j, int depth) {
    if (depth > R->o.max_depth) return rfail(R, NULL, "context nested too deeply (max_depth %d)", R->o.max_depth);
    if (step(R, NULL, 1)) return NULL;
    switch (json_typeof(j)) {
    case JSON_NULL: return VNULL;
    case JSON_TRUE: return &V_TRUE_;
    case JSON_FALSE: return &V_FALSE_;
    case JSON_INTEGER: return mknum(R, V_INT, (double)json_integer_value(j));
    case JSON_REAL: {
        double x = json_real_value(j);
        return mknum(R, isfinite(x) && x == floor(x) ? V_INT : V_FLOAT, x);
    }
    case JSON_STRING: {
        const char *s = json_string_value(j);
        size_t n = json_string_length(j);
        if (!u8_valid((const unsigned char *)s, n)) return rfail(R, NULL, "context string is not valid UTF-8");
        return mkstr(R, s, n, 0);
    }
    case JSON_ARRAY: {
        val *out = mkarr(R, V_ARRAY, json_array_size(j));
        for (size_t i = 0; out && i < out->arr.n; i++)
            if (!(out->arr.it[i] = from_json(R, json_array_get(j, i), depth + 1))) return NULL;
        return out;
    }
    case JSON_OBJECT: {
        val *out = mkobj(R, V_OBJECT);
        if (!out) return NULL;
        const char *k;
        size_t kn;
        json_t *v;
        double idx;
        for (int pass = 0; pass < 2; pass++) {
            size_t first = out->obj->n;
            json_object_keylen_foreach((json_t *)j, k, kn, v) {
                if (index_key(k, kn, &idx) != (pass == 0)) continue;
                val *x = from_json(R, v, depth + 1);
                if (!x || omap_set(R, out->obj, k, kn, x)) return NULL;
            }
            if (pass == 0)  /* numeric order for the index keys (insertion sort: there are few) */
                for (size_t a = first + 1; a < out->obj->n; a++) {
                    oent t = out->obj->e[a];
                    double ti = 0;
                    index_key(t.k, t.kn, &ti);
                    size_t b = a;
                    for (double bi = 0; b > first; b--) {
                        index_key(out->obj->e[b - 1].k, out->obj->e[b - 1].kn, &bi);
                        if (bi <= ti) break;
                        out->obj->e[b] = out->obj->e[b - 1];
                    }
                    out->obj->e[b] = t;
                }
        }
        return out;
    }
    }
    return rfail(R, NULL, "unsupported JSON value in the context");
}

char *api_template_render(const api_template *t, const json_t *context, const api_template_opts *opts,
                          size_t *out_len, api_template_error *err) {
    if (err) memset(err, 0, sizeof *err);
    if (out_len) *out_len = 0;
    rctx R = {0};
    if (opts) R.o = *opts;
    else api_template_opts_default(&R.o);
    R.t = t, R.err = err, R.mem.cap = R.o.max_memory;
    if (R.o.max_depth > TPL_MAX_EVAL_DEPTH) R.o.max_depth = TPL_MAX_EVAL_DEPTH;  /* the C stack is the real bound */
    if (!t || R.o.max_depth <= 0 || R.o.max_steps <= 0 || R.o.max_memory == 0 || R.o.max_output == 0) {
        set_err_at(err, NULL, 0, t ? "invalid render options (a bound is zero)" : "no template");
        return NULL;
    }
    strbuf out = {NULL, 0, 0, R.o.max_output, 0};
    char *result = NULL;
    env *g = env_new(&R, NULL);
    if (!g) goto done;
    /* setupGlobals, then the context; a context key may not redefine a global */
    static const struct { const char *name; int kind; } globals[] = {
        {"namespace", F_NAMESPACE}, {"false", -1}, {"true", -2}, {"none", -3}, {"raise_exception", F_RAISE},
        {"range", F_RANGE}, {"strftime_now", F_STRFTIME}, {"True", -2}, {"False", -1}, {"None", -3},
    };
    for (size_t i = 0; i < sizeof globals / sizeof globals[0]; i++) {
        int k = globals[i].kind;
        val *v = k == -1 ? &V_FALSE_ : k == -2 ? &V_TRUE_ : k == -3 ? VNULL : mkfn(&R, (fkind)k, NULL);
        if (!v || omap_set(&R, &g->vars, globals[i].name, strlen(globals[i].name), v)) goto done;
    }
    if (context) {
        if (!json_is_object(context)) { rfail(&R, NULL, "the template context must be a JSON object"); goto done; }
        val *ctx = from_json(&R, context, 0);
        if (!ctx) goto done;
        for (size_t i = 0; i < ctx->obj->n; i++) {
            oent *e = &ctx->obj->e[i];
            if (omap_get(&g->vars, e->k, e->kn)) {
                rfail(&R, NULL, "Variable already declared: %.*s", (int)e->kn, e->k);
                goto done;
            }
            if (omap_set(&R, &g->vars, e->k, e->kn, e->v)) goto done;
        }
    }
    int rc = render(&R, g, &t->body, &out);
    if (rc > 0) rfail(&R, NULL, "'break' or 'continue' outside of a loop");
    if (rc != RC_OK || R.failed) goto done;
    result = out.p ? out.p : calloc(1, 1);
    if (!result) { set_err_at(err, NULL, 0, "out of memory"); goto done; }
    if (out_len) *out_len = out.n;
    out.p = NULL;
done:
    if (!result && !R.failed && err && !err->message[0]) set_err_at(err, NULL, 0, "out of memory");
    free(out.p);
    arena_free(&R.mem);
    return result;
}
