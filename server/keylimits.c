/*
 * keylimits.c - per-client limits and figures (see keylimits.h).
 *
 * The clients are one array: the keys first (one slot each, or one "open" slot without keys), then
 * the users the header has named, in slots that are reused once a user is forgotten. Handles are slot
 * indices, so a slot never moves while a request holds it. Users are found by a linear scan: a
 * request costs a few microseconds of it at the bound, next to its tokenization.
 */
#include "keylimits.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct kl_client {
    int used;               /* user slots: 0 when free */
    int key;                /* index into labels (the key), or -1: the open server */
    char user[65];          /* "" for the key itself */
    uint64_t fair_id;
    int in_flight;
    double bucket;          /* tokens; below zero: debt */
    uint64_t t_refill;      /* when bucket was last brought up to date (ns) */
    uint64_t requests, tokens, rejected_concurrency, rejected_tokens, preemptions;
} kl_client;

struct srv_keylimits {
    int max_concurrent;
    double capacity, per_ns; /* the bucket (tokens_per_minute) and its refill rate; 0: no limit */
    char (*labels)[24];      /* (n_keys) a key's label */
    int n_keys;              /* key slots: keys->n, or 1 (open) */
    kl_client *c;
    int n, cap;              /* slots in use or freed (n), allocated (cap) */
    int n_users;
    uint64_t next_id;
};

static void client_init(srv_keylimits *kl, kl_client *c, int key, const char *user, uint64_t now_ns) {
    memset(c, 0, sizeof *c);
    c->used = 1;
    c->key = key;
    snprintf(c->user, sizeof c->user, "%s", user ? user : "");
    c->fair_id = ++kl->next_id;
    c->bucket = kl->capacity;
    c->t_refill = now_ns;
}

srv_keylimits *srv_keylimits_create(const srv_keys *keys, int max_concurrent, long long tokens_per_minute) {
    srv_keylimits *kl = calloc(1, sizeof *kl);
    if (!kl) return NULL;
    kl->max_concurrent = max_concurrent > 0 ? max_concurrent : 0;
    if (tokens_per_minute > 0) {
        kl->capacity = (double)tokens_per_minute;
        kl->per_ns = (double)tokens_per_minute / 60e9;
    }
    kl->n_keys = keys->n > 0 ? keys->n : 1;
    kl->cap = kl->n_keys + 16;
    kl->labels = calloc((size_t)kl->n_keys, sizeof *kl->labels);
    kl->c = calloc((size_t)kl->cap, sizeof *kl->c);
    if (!kl->labels || !kl->c) { srv_keylimits_free(kl); return NULL; }
    for (int i = 0; i < keys->n; i++) {
        uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a: a label, not a secret-keeping digest */
        for (const unsigned char *p = (const unsigned char *)keys->keys[i]; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
        snprintf(kl->labels[i], sizeof kl->labels[i], "k-%08x", (unsigned)(h >> 32));
        for (int k = 0; k < i; k++) /* two keys with one hash prefix: the later one says which it is */
            if (!strcmp(kl->labels[k], kl->labels[i])) {
                snprintf(kl->labels[i], sizeof kl->labels[i], "k-%08x-%d", (unsigned)(h >> 32), i);
                break;
            }
    }
    if (keys->n == 0) snprintf(kl->labels[0], sizeof kl->labels[0], "open");
    for (int i = 0; i < kl->n_keys; i++) client_init(kl, &kl->c[i], i, NULL, 0);
    kl->n = kl->n_keys;
    return kl;
}

void srv_keylimits_free(srv_keylimits *kl) {
    if (!kl) return;
    free(kl->labels);
    free(kl->c);
    free(kl);
}

int srv_user_name_ok(const char *user) {
    if (!user) return 0;
    size_t n = 0;
    for (; user[n]; n++) {
        char ch = user[n];
        if (n >= 64) return 0;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || strchr("._@:+=-", ch)))
            return 0;
    }
    return n > 0;
}

/* Brings c's bucket up to now. */
static void refill(const srv_keylimits *kl, kl_client *c, uint64_t now_ns) {
    if (kl->capacity > 0 && now_ns > c->t_refill) {
        c->bucket += (double)(now_ns - c->t_refill) * kl->per_ns;
        if (c->bucket > kl->capacity) c->bucket = kl->capacity;
    }
    if (now_ns > c->t_refill) c->t_refill = now_ns;
}

/* A user slot that may be forgotten: nothing in flight, and nothing owed (a full bucket). */
static int forgettable(const srv_keylimits *kl, kl_client *c, uint64_t now_ns) {
    if (c->in_flight) return 0;
    refill(kl, c, now_ns);
    return kl->capacity <= 0 || c->bucket >= kl->capacity;
}

int srv_keylimits_client(srv_keylimits *kl, int key, const char *user, uint64_t now_ns) {
    int k = key >= 0 && key < kl->n_keys ? key : 0; /* SRV_KEY_OPEN: the one open slot */
    if (!user || !*user) return k;
    int free_slot = -1;
    for (int i = kl->n_keys; i < kl->n; i++) {
        kl_client *c = &kl->c[i];
        if (!c->used) { if (free_slot < 0) free_slot = i; continue; }
        if (c->key == k && !strcmp(c->user, user)) return i;
    }
    if (kl->n_users >= SRV_KEYLIMITS_MAX_USERS) {
        free_slot = -1;
        for (int i = kl->n_keys; i < kl->n && free_slot < 0; i++)
            if (kl->c[i].used && forgettable(kl, &kl->c[i], now_ns)) {
                kl->c[i].used = 0;
                kl->n_users--;
                free_slot = i;
            }
        if (free_slot < 0) return k; /* every user is busy: counted as its key */
    }
    if (free_slot < 0) {
        if (kl->n == kl->cap) {
            int cap = kl->cap * 2;
            kl_client *p = realloc(kl->c, (size_t)cap * sizeof *p);
            if (!p) return k;
            kl->c = p;
            kl->cap = cap;
        }
        free_slot = kl->n++;
    }
    client_init(kl, &kl->c[free_slot], k, user, now_ns);
    kl->n_users++;
    return free_slot;
}

uint64_t srv_keylimits_fair_id(const srv_keylimits *kl, int c) { return kl->c[c].fair_id; }

int srv_keylimits_begin(srv_keylimits *kl, int c, uint64_t now_ns, int *retry_after) {
    kl_client *cl = &kl->c[c];
    *retry_after = 0;
    if (kl->max_concurrent && cl->in_flight >= kl->max_concurrent) {
        cl->rejected_concurrency++;
        *retry_after = 1;
        return SRV_LIMIT_CONCURRENCY;
    }
    refill(kl, cl, now_ns);
    if (kl->capacity > 0 && cl->bucket <= 0) {
        cl->rejected_tokens++;
        double s = (-cl->bucket / kl->per_ns) / 1e9;
        *retry_after = s < 1 ? 1 : s > 86400 ? 86400 : (int)s + (s > (int)s); /* up to the second after */
        return SRV_LIMIT_TOKENS;
    }
    cl->in_flight++;
    cl->requests++;
    return SRV_LIMIT_OK;
}

void srv_keylimits_charge(srv_keylimits *kl, int c, long long tokens, uint64_t now_ns) {
    kl_client *cl = &kl->c[c];
    if (tokens <= 0) return;
    refill(kl, cl, now_ns);
    cl->tokens += (uint64_t)tokens;
    if (kl->capacity > 0) cl->bucket -= (double)tokens;
}

void srv_keylimits_preempted(srv_keylimits *kl, int c, int n) {
    if (n > 0) kl->c[c].preemptions += (uint64_t)n;
}

void srv_keylimits_end(srv_keylimits *kl, int c) {
    if (kl->c[c].in_flight > 0) kl->c[c].in_flight--;
}

double srv_keylimits_bucket(srv_keylimits *kl, int c, uint64_t now_ns) {
    refill(kl, &kl->c[c], now_ns);
    return kl->capacity > 0 ? kl->c[c].bucket : 0;
}

typedef enum { COL_REQUESTS, COL_TOKENS, COL_IN_FLIGHT, COL_BUCKET, COL_REJ_CONC, COL_REJ_TOK, COL_PREEMPT } kl_col;

static void render_family(srv_keylimits *kl, srv_buf *b, const char *name, const char *type, const char *help,
                          kl_col col, const char *reason) {
    for (int i = 0; i < kl->n; i++) {
        kl_client *c = &kl->c[i];
        if (!c->used) continue;
        double v = col == COL_REQUESTS ? (double)c->requests : col == COL_TOKENS ? (double)c->tokens
                   : col == COL_IN_FLIGHT ? c->in_flight : col == COL_BUCKET ? c->bucket
                   : col == COL_REJ_CONC ? (double)c->rejected_concurrency : col == COL_REJ_TOK ? (double)c->rejected_tokens
                   : (double)c->preemptions;
        if (help) srv_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
        help = NULL;
        /* the user passed srv_user_name_ok and labels are ours: nothing to escape */
        srv_buf_printf(b, "%s{key=\"%s\",user=\"%s\"%s%s%s} %.17g\n", name, kl->labels[c->key], c->user,
                       reason ? ",reason=\"" : "", reason ? reason : "", reason ? "\"" : "", v);
    }
}

void srv_keylimits_render(srv_keylimits *kl, uint64_t now_ns, srv_buf *b) {
    for (int i = 0; i < kl->n; i++)
        if (kl->c[i].used) refill(kl, &kl->c[i], now_ns);
    render_family(kl, b, "codemoe_key_requests_total", "counter",
                  "Completion requests let in, per client (key, and user with --user-header).", COL_REQUESTS, NULL);
    render_family(kl, b, "codemoe_key_tokens_total", "counter",
                  "Prompt and generated tokens used, per client.", COL_TOKENS, NULL);
    render_family(kl, b, "codemoe_key_requests_in_flight", "gauge",
                  "Completion requests in flight, per client (what --key-max-concurrent bounds).", COL_IN_FLIGHT, NULL);
    render_family(kl, b, "codemoe_key_rejected_total", "counter",
                  "Completion requests refused with 429 by a per-client limit, by reason.", COL_REJ_CONC, "concurrency");
    render_family(kl, b, "codemoe_key_rejected_total", "counter", NULL, COL_REJ_TOK, "tokens");
    render_family(kl, b, "codemoe_key_preemptions_total", "counter",
                  "Times a running completion of the client was preempted (paused) to give another client a slot.",
                  COL_PREEMPT, NULL);
    if (kl->capacity > 0)
        render_family(kl, b, "codemoe_key_token_bucket", "gauge",
                      "Tokens left in the client's --key-tokens-per-minute bucket (negative: owed).", COL_BUCKET, NULL);
}
