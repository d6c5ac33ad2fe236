/*
 * auth.h - API keys and the other per-request header checks of `codemoe serve`: Bearer tokens
 * (compared in constant time), CORS origins, and request ids.
 */
#ifndef CM_SRV_AUTH_H
#define CM_SRV_AUTH_H

#include <stddef.h>
#include <stdint.h>

typedef struct srv_keys {
    char **keys;            /* (n) owned */
    unsigned char *admin;   /* (n) 1: an admin key, which may also read what other keys created */
    int n;
} srv_keys;

void srv_keys_init(srv_keys *k);
void srv_keys_free(srv_keys *k);
/* Adds a copy of key (surrounding whitespace trimmed). Empty keys are refused (-1). */
int srv_keys_add(srv_keys *k, const char *key);
/* The same for an admin key (--admin-key). */
int srv_keys_add_admin(srv_keys *k, const char *key);
/* Adds one key per non-empty line of the file; lines starting with '#' are comments.
 * Returns the number added, or -1 if the file cannot be read (errno set). */
int srv_keys_load_file(srv_keys *k, const char *path);
/* Checks an Authorization header value. With no keys configured everything is allowed (1).
 * Otherwise 1 only for "Bearer <key>" with a configured key. The comparison touches every byte of
 * every key regardless of where a mismatch is, so timing reveals neither key contents nor which
 * key matched (it does reveal the number of keys and is linear in the header length). */
int srv_keys_check(const srv_keys *k, const char *authorization);

/* Who a request is, for what it may read back (routing records): the index of the key an
 * Authorization header carries (found in constant time, as srv_keys_check), SRV_KEY_OPEN when no keys
 * are configured (everyone is the same client), SRV_KEY_NONE when it carries no configured key. */
enum { SRV_KEY_NONE = -1, SRV_KEY_OPEN = -2 };
int srv_keys_find(const srv_keys *k, const char *authorization);
/* Whether the caller `reader` (an srv_keys_find result) may read what `owner` created: the same key,
 * an admin key, or no keys configured. */
int srv_keys_may_read(const srv_keys *k, int reader, int owner);

/* Whether the caller `who` (an srv_keys_find result) holds an admin key (--admin-key). */
int srv_keys_is_admin(const srv_keys *k, int who);

/* Constant-time equality of two byte strings of possibly different lengths (time depends only on
 * the lengths). */
int srv_ct_equal(const char *a, size_t alen, const char *b, size_t blen);

/* A client-supplied X-Request-Id is used only if it is 1..64 chars of [A-Za-z0-9._:-]: it is echoed
 * in a header and written into the JSON log, so anything else is replaced by a generated id. */
int srv_request_id_ok(const char *s);
/* Writes a fresh random id ("req-" + 24 hex digits) into out (cap >= 32). */
void srv_request_id_new(char *out, size_t cap);
/* Writes prefix + 24 random hex digits (e.g. "cmpl-..."). */
void srv_random_id(const char *prefix, char *out, size_t cap);
/* 64 random bits (getrandom; a clock-derived value if the pool is not ready yet). */
uint64_t srv_random_u64(void);

#endif
