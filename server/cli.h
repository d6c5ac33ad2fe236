/*
 * cli.h - flag parsing and small output helpers shared by the cmd_*.c subcommands and serve's model specs
 * (header-only, static).
 *
 * Flags are "--name VALUE" or "--name=VALUE"; a value that does not parse completely (trailing junk,
 * out of range) is a usage error. Every helper prints its own message to stderr, prefixed by the
 * subcommand, and returns 0 on error so callers can `return 2` (usage) right away.
 */
#ifndef CM_CLI_H
#define CM_CLI_H

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codemoe.h"

/* Does argv[*i] name flag `name`? If it takes a value, *val gets it (from "=..." or the next argument,
 * advancing *i). Returns 1 matched, 0 not this flag, -1 matched but the value is missing. */
static inline int cli_flag(int argc, char **argv, int *i, const char *name, const char **val) {
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return 0;
    if (!val) return a[n] == '\0';
    if (a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (a[n] != '\0') return 0;
    if (*i + 1 >= argc) return -1;
    *val = argv[++*i];
    return 1;
}

/* The whole of s as a base-10 integer in [lo, hi] into *out, printing nothing. Returns 0 ok, -1 not one
 * (trailing junk, out of range); *out is untouched then. */
static inline int cli_parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static inline int cli_int(const char *cmd, const char *flag, const char *s, long lo, long hi, int *out) {
    if (cli_parse_int(s, lo, hi, out) < 0) {
        fprintf(stderr, "codemoe %s: %s expects an integer in [%ld, %ld], got '%s'\n", cmd, flag, lo, hi, s);
        return 0;
    }
    return 1;
}

static inline int cli_u64(const char *cmd, const char *flag, const char *s, unsigned long long *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end || *s == '-') {
        fprintf(stderr, "codemoe %s: %s expects a non-negative integer, got '%s'\n", cmd, flag, s);
        return 0;
    }
    *out = v;
    return 1;
}

static inline int cli_float(const char *cmd, const char *flag, const char *s, double lo, double hi,
                            float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "codemoe %s: %s expects a number in [%g, %g], got '%s'\n", cmd, flag, lo, hi, s);
        return 0;
    }
    *out = (float)v;
    return 1;
}

/* --kv-type f16|f32: the KV cache's element type (cm_ctx_params.kv_type). CLI_KV_TYPE_DEFAULT is what
 * serve, complete and bench use without the flag: f16, which halves KV memory at no speed cost that
 * could be measured (docs/engine.md has the numbers). The library's own default stays f32. */
#define CLI_KV_TYPE_DEFAULT CM_KV_F16
#define CLI_KV_TYPE_HELP "  --kv-type f16|f32       KV cache element type; f16 (default) halves KV memory\n"
static inline int cli_kv_type(const char *cmd, const char *flag, const char *s, int *out) {
    if (!strcmp(s, "f32") || !strcmp(s, "f16")) {
        *out = s[1] == '1' ? CM_KV_F16 : CM_KV_F32;
        return 1;
    }
    fprintf(stderr, "codemoe %s: %s expects f16 or f32, got '%s'\n", cmd, flag, s);
    return 0;
}

/* Reads a whole file (at most max bytes) into a NUL-terminated malloc'd buffer. NULL + message on error. */
static inline char *cli_read_file(const char *cmd, const char *path, size_t max, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "codemoe %s: cannot open '%s': %s\n", cmd, path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (n == cap) {
            if (cap >= max) {
                fprintf(stderr, "codemoe %s: '%s' is larger than %zu bytes\n", cmd, path, max);
                free(buf);
                buf = NULL;
                break;
            }
            cap = cap * 2 > max ? max : cap * 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            if (ferror(f)) {
                fprintf(stderr, "codemoe %s: error reading '%s'\n", cmd, path);
                free(buf);
                buf = NULL;
            }
            break;
        }
    }
    fclose(f);
    if (!buf) return NULL;
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if the bytes there are not one. */
static inline int cli_utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int len;
    unsigned min;
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) len = 2, min = 0x80;
    else if ((c & 0xf0) == 0xe0) len = 3, min = 0x800;
    else if ((c & 0xf8) == 0xf0) len = 4, min = 0x10000;
    else return 0;
    if ((size_t)len > n) return 0;
    unsigned cp = c & (0x7f >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

/* Writes bytes as a JSON string literal (quotes included). Valid UTF-8 passes through; control
 * characters, quote and backslash are escaped; a byte that is not part of valid UTF-8 (half of a
 * character split across tokens) is written as \u00XX, its Latin-1 reading. */
static inline void cli_json_string(FILE *f, const char *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c == '"' || c == '\\') {
            fputc('\\', f);
            fputc((int)c, f);
            i++;
        } else if (c == '\n') { fputs("\\n", f); i++; }
        else if (c == '\t') { fputs("\\t", f); i++; }
        else if (c == '\r') { fputs("\\r", f); i++; }
        else if (c < 0x20 || c == 0x7f) { fprintf(f, "\\u%04x", c); i++; }
        else {
            int l = cli_utf8_len(s + i, n - i);
            if (l == 0) {
                fprintf(f, "\\u%04x", c);
                i++;
            } else {
                fwrite(s + i, 1, (size_t)l, f);
                i += (size_t)l;
            }
        }
    }
    fputc('"', f);
}

#endif
