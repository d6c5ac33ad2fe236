/*
 * stop.c - stop strings over streamed text. A stop string may be split across any number of tokens,
 * so a stream must hold back the tail of the text that could still grow into a stop string: text
 * once sent can never be taken back. Also the rules a stop string list follows (count, length), shared
 * by the request parser and `codemoe complete --stop`.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"

/* First occurrence of needle in hay[from..len), or (size_t)-1. */
static size_t find_from(const char *hay, size_t len, size_t from, const char *needle, size_t nlen) {
    if (nlen == 0 || from > len || len - from < nlen) return (size_t)-1;
    const char *p = memmem(hay + from, len - from, needle, nlen);
    return p ? (size_t)(p - hay) : (size_t)-1;
}

/* Bytes at the end of text[0..len) that form an incomplete (still growing) UTF-8 sequence. */
static size_t utf8_incomplete_tail(const char *text, size_t len) {
    size_t k = 0;
    /* walk back over at most 3 continuation bytes to the lead byte */
    while (k < 3 && k < len && ((unsigned char)text[len - 1 - k] & 0xc0) == 0x80) k++;
    if (k == len) return 0; /* only continuation bytes: not a sequence we can complete */
    unsigned char lead = (unsigned char)text[len - 1 - k];
    size_t need = lead >= 0xf0 && lead < 0xf8 ? 4 : lead >= 0xe0 && lead < 0xf0 ? 3 : lead >= 0xc0 && lead < 0xe0 ? 2 : 1;
    return need > k + 1 ? k + 1 : 0;
}

int api_stop_scan(const api_stops *st, const char *text, size_t len, size_t emitted, size_t *safe) {
    if (emitted > len) emitted = len;
    int best = -1;
    size_t best_pos = (size_t)-1;
    int n = st ? st->n : 0;
    /* A match cannot start before `emitted`: when that text was sent no stop string could begin
     * there (it would have been held back), so search only the unsent part. */
    for (int i = 0; i < n; i++) {
        size_t p = find_from(text, len, emitted, st->s[i], st->len[i]);
        if (p < best_pos) { best_pos = p; best = i; }
    }
    if (best >= 0) {
        *safe = best_pos;
        return best;
    }
    /* Hold back the longest suffix of the unsent text that is a proper prefix of some stop string. */
    size_t hold = 0, avail = len - emitted;
    for (int i = 0; i < n; i++) {
        size_t k = st->len[i] - 1;
        if (k > avail) k = avail;
        for (; k > hold; k--) {
            const char *tail = text + len - k;
            if (tail[0] == st->s[i][0] && memcmp(tail, st->s[i], k) == 0) { hold = k; break; }
        }
    }
    size_t s = len - hold;
    /* never end inside a character: a client may decode each event on its own */
    s -= utf8_incomplete_tail(text, s);
    *safe = s < emitted ? emitted : s;
    return -1;
}

int api_stops_check_count(size_t n, const api_limits *lim, const char *shown, api_error *err) {
    int max_stop = lim->max_stop < API_STOP_MAX ? lim->max_stop : API_STOP_MAX;
    if (n <= (size_t)max_stop) return 0;
    return api_error_set(err, 400, API_ERR_INVALID, "stop", NULL, "%s is too long: at most %d stop sequences - 'stop'",
                         shown, max_stop);
}

int api_stops_add(api_stops *st, const char *s, size_t len, const char *shown, api_error *err) {
    if (st->n >= API_STOP_MAX)
        return api_error_set(err, 400, API_ERR_INVALID, "stop", NULL, "%s is too long: at most %d stop sequences - 'stop'",
                             shown, API_STOP_MAX);
    if (len == 0) return api_error_set(err, 400, API_ERR_INVALID, "stop", NULL, "%s is too short - 'stop'", shown);
    if (len > API_STOP_MAX_BYTES)
        return api_error_set(err, 400, API_ERR_INVALID, "stop", NULL,
                             "%s is too long: stop sequences are limited to %d bytes - 'stop'", shown, API_STOP_MAX_BYTES);
    char *copy = malloc(len + 1);
    if (!copy) return api_error_set(err, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    memcpy(copy, s, len);
    copy[len] = '\0';
    st->s[st->n] = copy;
    st->len[st->n] = len;
    st->n++;
    return 0;
}

void api_stops_free(api_stops *st) {
    for (int i = 0; i < st->n; i++) free(st->s[i]);
    memset(st, 0, sizeof *st);
}
