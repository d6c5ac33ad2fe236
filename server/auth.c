/* auth.c - API keys, constant-time comparison, request ids (see auth.h). */
#include "auth.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

void srv_keys_init(srv_keys *k) { k->keys = NULL; k->admin = NULL; k->n = 0; }

void srv_keys_free(srv_keys *k) {
    for (int i = 0; i < k->n; i++) {
        /* scrub: keys are secrets */
        volatile char *p = k->keys[i];
        while (*p) *p++ = 0;
        free(k->keys[i]);
    }
    free(k->keys);
    free(k->admin);
    k->keys = NULL;
    k->admin = NULL;
    k->n = 0;
}

static int keys_add(srv_keys *k, const char *key, int admin) {
    while (*key && isspace((unsigned char)*key)) key++;
    size_t n = strlen(key);
    while (n && isspace((unsigned char)key[n - 1])) n--;
    if (!n || n > 4096) return -1;
    char **keys = realloc(k->keys, (size_t)(k->n + 1) * sizeof *keys);
    if (!keys) return -1;
    k->keys = keys;
    unsigned char *adm = realloc(k->admin, (size_t)(k->n + 1));
    if (!adm) return -1;
    k->admin = adm;
    char *c = malloc(n + 1);
    if (!c) return -1;
    memcpy(c, key, n);
    c[n] = 0;
    k->admin[k->n] = (unsigned char)(admin != 0);
    k->keys[k->n++] = c;
    return 0;
}

int srv_keys_add(srv_keys *k, const char *key) { return keys_add(k, key, 0); }

int srv_keys_add_admin(srv_keys *k, const char *key) { return keys_add(k, key, 1); }

int srv_keys_load_file(srv_keys *k, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[4200];
    int added = 0;
    while (fgets(line, sizeof line, f)) {
        const char *s = line;
        while (*s && isspace((unsigned char)*s)) s++;
        if (!*s || *s == '#') continue;
        if (srv_keys_add(k, s) == 0) added++;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { errno = EIO; return -1; }
    return added;
}

int srv_ct_equal(const char *a, size_t alen, const char *b, size_t blen) {
    /* Compare over the longer length, reading both strings cyclically, and fold the length
     * difference into the result: no early exit. */
    size_t n = alen > blen ? alen : blen;
    unsigned diff = (unsigned)(alen != blen);
    if (!alen || !blen) return alen == blen;
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)a[i % alen] ^ (unsigned char)b[i % blen];
    return diff == 0;
}

int srv_keys_find(const srv_keys *k, const char *authorization) {
    if (k->n == 0) return SRV_KEY_OPEN;
    if (!authorization) return SRV_KEY_NONE;
    /* "Bearer" is case-insensitive per RFC 6750's use of the auth-scheme token */
    if (strncasecmp(authorization, "Bearer ", 7)) return SRV_KEY_NONE;
    const char *tok = authorization + 7;
    while (*tok == ' ') tok++;
    size_t tlen = strlen(tok);
    while (tlen && (tok[tlen - 1] == ' ' || tok[tlen - 1] == '\t')) tlen--;
    /* every key is compared and the index selected with a mask, never a branch on the comparison */
    unsigned found = (unsigned)SRV_KEY_NONE;
    for (int i = 0; i < k->n; i++) {
        unsigned mask = 0u - (unsigned)srv_ct_equal(tok, tlen, k->keys[i], strlen(k->keys[i]));
        found = (mask & (unsigned)i) | (~mask & found);
    }
    return (int)found;
}

int srv_keys_check(const srv_keys *k, const char *authorization) {
    return srv_keys_find(k, authorization) != SRV_KEY_NONE;
}

int srv_keys_may_read(const srv_keys *k, int reader, int owner) {
    if (k->n == 0) return 1;
    if (reader < 0 || reader >= k->n) return 0;
    return reader == owner || k->admin[reader];
}

int srv_request_id_ok(const char *s) {
    if (!s) return 0;
    size_t n = 0;
    for (; s[n]; n++) {
        unsigned char c = (unsigned char)s[n];
        if (n >= 64) return 0;
        if (!(isalnum(c) || c == '.' || c == '_' || c == ':' || c == '-')) return 0;
    }
    return n > 0;
}

void srv_random_id(const char *prefix, char *out, size_t cap) {
    unsigned char r[12];
    if (getrandom(r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
        /* entropy pool not ready (early boot): ids only need to be unique, not secret */
        static _Thread_local uint64_t ctr;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (++ctr * 0x9E3779B97F4A7C15ull);
        for (int i = 0; i < 12; i++) { x ^= x >> 29; x *= 0xBF58476D1CE4E5B9ull; r[i] = (unsigned char)(x >> 56); }
    }
    static const char hex[] = "0123456789abcdef";
    char h[25];
    for (int i = 0; i < 12; i++) { h[2 * i] = hex[r[i] >> 4]; h[2 * i + 1] = hex[r[i] & 15]; }
    h[24] = 0;
    snprintf(out, cap, "%s%s", prefix, h);
}

void srv_request_id_new(char *out, size_t cap) { srv_random_id("req-", out, cap); }

uint64_t srv_random_u64(void) {
    uint64_t x;
    if (getrandom(&x, sizeof x, GRND_NONBLOCK) == (ssize_t)sizeof x) return x;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30);
    x ^= x >> 31; x *= 0x9E3779B97F4A7C15ull; x ^= x >> 29;
    return x;
}

int srv_keys_is_admin(const srv_keys *k, int who) { return who >= 0 && who < k->n && k->admin[who]; }
