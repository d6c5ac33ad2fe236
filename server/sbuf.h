/*
 * sbuf.h - a growable byte buffer for the server: response bodies, SSE chunks, metrics text.
 *
 * Appends never truncate silently: on allocation failure (or when the buffer would pass `limit`,
 * if set) the append returns -1, leaves the contents unchanged and sets `failed`, so a caller can
 * build a whole document and check once at the end.
 */
#ifndef CM_SRV_SBUF_H
#define CM_SRV_SBUF_H

#include <stdarg.h>
#include <stddef.h>

typedef struct srv_buf {
    char *data;   /* NUL-terminated when len > 0 */
    size_t len;
    size_t cap;
    size_t limit; /* 0: no limit */
    int failed;
} srv_buf;

void srv_buf_init(srv_buf *b, size_t limit);
void srv_buf_free(srv_buf *b);
int srv_buf_append(srv_buf *b, const void *p, size_t n);
int srv_buf_puts(srv_buf *b, const char *s);
int srv_buf_printf(srv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the first n bytes (n <= len). */
void srv_buf_consume(srv_buf *b, size_t n);
/* Hands the malloc'ed data to the caller (who frees it) and empties the buffer. Never NULL unless
 * allocation fails: an empty buffer yields "". */
char *srv_buf_take(srv_buf *b, size_t *len);

#endif
