/* sbuf.c - growable byte buffer (see sbuf.h). */
#include "sbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void srv_buf_init(srv_buf *b, size_t limit) {
    memset(b, 0, sizeof *b);
    b->limit = limit;
}

void srv_buf_free(srv_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static int srv_buf_reserve(srv_buf *b, size_t extra) {
    if (extra > (size_t)-1 / 2 - b->len) { b->failed = 1; return -1; }
    size_t need = b->len + extra + 1; /* +1 keeps room for the terminating NUL */
    if (b->limit && need - 1 > b->limit) { b->failed = 1; return -1; }
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) { b->failed = 1; return -1; }
    b->data = p;
    b->cap = cap;
    return 0;
}

int srv_buf_append(srv_buf *b, const void *p, size_t n) {
    if (srv_buf_reserve(b, n)) return -1;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

int srv_buf_puts(srv_buf *b, const char *s) { return srv_buf_append(b, s, strlen(s)); }

int srv_buf_printf(srv_buf *b, const char *fmt, ...) {
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) { b->failed = 1; return -1; }
    if ((size_t)n < sizeof small) return srv_buf_append(b, small, (size_t)n);
    if (srv_buf_reserve(b, (size_t)n)) return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void srv_buf_consume(srv_buf *b, size_t n) {
    if (n >= b->len) { b->len = 0; if (b->data) b->data[0] = 0; return; }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
    b->data[b->len] = 0;
}

char *srv_buf_take(srv_buf *b, size_t *len) {
    char *p = b->data;
    if (!p) p = calloc(1, 1);
    if (len) *len = p ? b->len : 0;
    b->data = NULL;
    b->len = b->cap = 0;
    return p;
}
