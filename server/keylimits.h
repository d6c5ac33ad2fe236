/*
 * keylimits.h - who a completion request is for (a client: an API key, or a user of a key named by the
 * trusted user header), the server-wide per-client limits (completions in flight, tokens per minute)
 * and the per-client figures of /metrics.
 *
 * A client's id for the fair queues (fairq.h) comes from here, so every scheduler sees the same
 * clients; the limits and counters are server-wide, not per model. Owned by the event-loop thread:
 * nothing here locks.
 *
 * Tokens per minute is a token bucket of that many tokens, refilled continuously (N/60 per second). A
 * request is let in while the bucket is above zero, and what it uses (prompt + generated tokens) is
 * taken out as it runs, so the bucket can go below zero (a debt the refill pays off): a client is never
 * cut off mid-generation, and the time it must wait before the next request is exact.
 *
 * Labels: a key is named in /metrics by "k-" and 8 hex digits of a hash of the key (never the key
 * itself), "open" when the server has no keys; a user by the header's value, which must be 1..64
 * characters of [A-Za-z0-9._@:+=-].
 */
#ifndef CM_SRV_KEYLIMITS_H
#define CM_SRV_KEYLIMITS_H

#include <stdint.h>

#include "auth.h"
#include "sbuf.h"

/* Users (key, user header value) remembered at once; beyond, a new user counts as its key until an
 * idle one (nothing in flight, bucket full) is forgotten. */
#define SRV_KEYLIMITS_MAX_USERS 1024

enum { SRV_LIMIT_OK = 0, SRV_LIMIT_CONCURRENCY, SRV_LIMIT_TOKENS };

typedef struct srv_keylimits srv_keylimits;

/* keys is read here (for the labels) and not kept. max_concurrent: completions in flight per client
 * (0: no limit); tokens_per_minute: prompt + generated tokens per client (0: no limit). NULL when out
 * of memory. */
srv_keylimits *srv_keylimits_create(const srv_keys *keys, int max_concurrent, long long tokens_per_minute);
void srv_keylimits_free(srv_keylimits *kl);

/* Whether a user header value is usable as a user's name (and label): 1..64 of [A-Za-z0-9._@:+=-]. */
int srv_user_name_ok(const char *user);

/* The client a request is: key is its srv_keys_find result (an index, or SRV_KEY_OPEN), user the
 * trusted user header's value (NULL or "": the key itself; must pass srv_user_name_ok). Returns the
 * client's handle (>= 0), valid until the next call of srv_keylimits_client unless the client has a
 * request in flight (srv_keylimits_begin .. srv_keylimits_end), which keeps it. */
int srv_keylimits_client(srv_keylimits *kl, int key, const char *user, uint64_t now_ns);
/* The id of client c in the fair queues: distinct for distinct clients, stable while it is known. */
uint64_t srv_keylimits_fair_id(const srv_keylimits *kl, int c);

/* Lets a request of client c in (SRV_LIMIT_OK: it is in flight until srv_keylimits_end), or refuses
 * it: SRV_LIMIT_CONCURRENCY (as many in flight as allowed) or SRV_LIMIT_TOKENS (the bucket is empty);
 * then *retry_after is the whole seconds (>= 1) after which it would be let in: for tokens, when the
 * bucket is above zero again; for concurrency, 1 (unknown). Refusals are counted. */
int srv_keylimits_begin(srv_keylimits *kl, int c, uint64_t now_ns, int *retry_after);
/* Takes tokens (prompt or generated) that a request of client c used out of its bucket. */
void srv_keylimits_charge(srv_keylimits *kl, int c, long long tokens, uint64_t now_ns);
/* A request of client c was preempted n more times (the scheduler parked it to give a slot to a client
 * with nothing admitted): counted in codemoe_key_preemptions_total. */
void srv_keylimits_preempted(srv_keylimits *kl, int c, int n);
/* The request let in by srv_keylimits_begin is over. */
void srv_keylimits_end(srv_keylimits *kl, int c);

/* The bucket's level now (tokens; negative: debt), for tests; 0 without a tokens limit. */
double srv_keylimits_bucket(srv_keylimits *kl, int c, uint64_t now_ns);
/* Appends the per-client series (codemoe_key_*{key,user}) in Prometheus text. */
void srv_keylimits_render(srv_keylimits *kl, uint64_t now_ns, srv_buf *b);

#endif
