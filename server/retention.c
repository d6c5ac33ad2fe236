/*
 * retention.c - bounded store of per-completion routing statistics keyed by completion id, for
 * GET /v1/completions/{id}/routing. A ring of the newest `capacity` entries (FIFO eviction) plus a
 * linear lookup: capacity is small (hundreds to a few thousand) and lookups are rare, so a hash
 * table would buy nothing. Loop-thread only.
 */
#include <stdlib.h>
#include <string.h>

#include "server.h"

typedef struct ret_entry {
    char id[64];
    json_t *value;
} ret_entry;

struct srv_retention {
    ret_entry *e;   /* (capacity) ring */
    int capacity;
    int head;       /* next slot to write */
    int n;
};

srv_retention *srv_retention_create(int capacity) {
    srv_retention *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->capacity = capacity > 0 ? capacity : 0;
    if (r->capacity) {
        r->e = calloc((size_t)r->capacity, sizeof *r->e);
        if (!r->e) { free(r); return NULL; }
    }
    return r;
}

void srv_retention_free(srv_retention *r) {
    if (!r) return;
    for (int i = 0; i < r->capacity; i++) json_decref(r->e[i].value);
    free(r->e);
    free(r);
}

static ret_entry *find(srv_retention *r, const char *id) {
    for (int i = 0; i < r->n; i++) {
        int k = (r->head - 1 - i + r->capacity) % r->capacity;
        if (!strcmp(r->e[k].id, id)) return &r->e[k];
    }
    return NULL;
}

void srv_retention_put(srv_retention *r, const char *id, json_t *value) {
    if (!r || !r->capacity || strlen(id) >= sizeof r->e[0].id) { json_decref(value); return; }
    ret_entry *e = find(r, id);
    if (!e) {
        e = &r->e[r->head];
        r->head = (r->head + 1) % r->capacity;
        if (r->n < r->capacity) r->n++;
        memcpy(e->id, id, strlen(id) + 1);
    }
    json_decref(e->value);
    e->value = value;
}

json_t *srv_retention_get(srv_retention *r, const char *id) {
    if (!r || !r->capacity || !id) return NULL;
    ret_entry *e = find(r, id);
    return e ? e->value : NULL;
}
