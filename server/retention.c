/*
 * retention.c - bounded store of per-completion routing records keyed by completion id, for
 * GET /v1/completions/{id}/routing. Records are kept serialized (the bytes the endpoint serves, and
 * the measure of the byte bound), each with the API key that created it, in a ring of the newest ones:
 * a put evicts the oldest records until both the record count and the byte total fit. Lookup is
 * linear: the store holds hundreds to a few thousand records and lookups are rare, so a hash table
 * would buy nothing. Loop-thread only.
 */
#include <stdlib.h>
#include <string.h>

#include "server.h"

typedef struct ret_entry {
    char id[64];
    int owner;
    char *json;     /* compact serialization, NUL-terminated */
    size_t len;     /* strlen(json): what the entry counts against max_bytes */
} ret_entry;

struct srv_retention {
    ret_entry *e;   /* (capacity) ring: the n newest end just before head */
    int capacity;
    size_t max_bytes;
    int head;       /* next slot to write */
    int n;
    size_t bytes;   /* sum of len over the n entries */
};

srv_retention *srv_retention_create(int max_records, size_t max_bytes) {
    srv_retention *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->capacity = max_records > 0 && max_bytes > 0 ? max_records : 0;
    r->max_bytes = max_bytes;
    if (r->capacity) {
        r->e = calloc((size_t)r->capacity, sizeof *r->e);
        if (!r->e) { free(r); return NULL; }
    }
    return r;
}

void srv_retention_free(srv_retention *r) {
    if (!r) return;
    for (int i = 0; i < r->capacity; i++) free(r->e[i].json);
    free(r->e);
    free(r);
}

/* The slot of the i-th newest entry (0: the newest). */
static int slot(const srv_retention *r, int i) { return (r->head - 1 - i + 2 * r->capacity) % r->capacity; }

static ret_entry *find(srv_retention *r, const char *id) {
    for (int i = 0; i < r->n; i++) {
        ret_entry *e = &r->e[slot(r, i)];
        if (!strcmp(e->id, id)) return e;
    }
    return NULL;
}

static void entry_clear(srv_retention *r, ret_entry *e) {
    r->bytes -= e->len;
    free(e->json);
    memset(e, 0, sizeof *e);
}

static void evict_oldest(srv_retention *r) {
    entry_clear(r, &r->e[slot(r, r->n - 1)]);
    r->n--;
}

int srv_retention_put(srv_retention *r, const char *id, int owner, const json_t *value) {
    if (!r || !r->capacity || !id || strlen(id) >= sizeof r->e[0].id || !value) return -1;
    size_t len = 0;
    char *json = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!json) return -1;
    len = strlen(json);
    if (len > r->max_bytes) { free(json); return -1; }
    /* a record under the same id is replaced: drop the old one first (ids are unique in practice) */
    ret_entry *old = find(r, id);
    if (old) {
        /* close the gap so the ring stays contiguous: move every newer entry one slot back */
        int i = 0;
        while (&r->e[slot(r, i)] != old) i++;
        entry_clear(r, old);
        for (; i > 0; i--) {
            r->e[slot(r, i)] = r->e[slot(r, i - 1)];
            memset(&r->e[slot(r, i - 1)], 0, sizeof r->e[0]);
        }
        r->head = (r->head - 1 + r->capacity) % r->capacity;
        r->n--;
    }
    while (r->n > 0 && (r->n == r->capacity || r->bytes + len > r->max_bytes)) evict_oldest(r);
    ret_entry *e = &r->e[r->head];
    r->head = (r->head + 1) % r->capacity;
    r->n++;
    memcpy(e->id, id, strlen(id) + 1);
    e->owner = owner;
    e->json = json;
    e->len = len;
    r->bytes += len;
    return 0;
}

const char *srv_retention_get(srv_retention *r, const char *id, int *owner, size_t *len) {
    if (!r || !r->capacity || !id) return NULL;
    ret_entry *e = find(r, id);
    if (!e) return NULL;
    if (owner) *owner = e->owner;
    if (len) *len = e->len;
    return e->json;
}

size_t srv_retention_bytes(const srv_retention *r) { return r ? r->bytes : 0; }

int srv_retention_count(const srv_retention *r) { return r ? r->n : 0; }
