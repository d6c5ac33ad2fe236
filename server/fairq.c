/*
 * fairq.c - per-client queues served by start-time fair queuing over tokens (see fairq.h for the
 * policy and its one-turn bound).
 *
 * The clients are a small array scanned linearly: it holds the clients with items queued and those
 * whose finish tag is still ahead of the virtual time (they have been served recently; forgetting them
 * would let them jump the queue). A client with nothing queued and its tag at or behind the virtual
 * time starts at the virtual time anyway, so it is dropped when room is needed.
 */
#include "fairq.h"

#include <stdlib.h>

typedef struct fq_flow {
    uint64_t client;
    int64_t finish;           /* virtual tokens served up to */
    srv_fairq_item *head, *tail;
} fq_flow;

struct srv_fairq {
    fq_flow *flows;
    int n_flows, cap;
    int count;                /* items queued */
    int64_t vtime;            /* start tag of the last admitted item */
    uint64_t seq;             /* arrivals so far */
    /* what the last pop changed, for srv_fairq_unpop */
    srv_fairq_item *undo_it;
    int64_t undo_vtime, undo_finish;
};

srv_fairq *srv_fairq_create(void) { return calloc(1, sizeof(srv_fairq)); }

void srv_fairq_free(srv_fairq *q) {
    if (!q) return;
    free(q->flows);
    free(q);
}

static int64_t item_cost(const srv_fairq_item *it) { return it->cost < 1 ? 1 : it->cost; }

static int64_t flow_start(const srv_fairq *q, const fq_flow *f) { return f->finish > q->vtime ? f->finish : q->vtime; }

static fq_flow *flow_find(const srv_fairq *q, uint64_t client) {
    for (int i = 0; i < q->n_flows; i++)
        if (q->flows[i].client == client) return &q->flows[i];
    return NULL;
}

/* Drops the clients that have nothing queued and no lead over the virtual time. */
static void flows_compact(srv_fairq *q) {
    int n = 0;
    for (int i = 0; i < q->n_flows; i++) {
        fq_flow *f = &q->flows[i];
        if (!f->head && f->finish <= q->vtime) continue;
        q->flows[n++] = *f;
    }
    q->n_flows = n;
}

int srv_fairq_push(srv_fairq *q, srv_fairq_item *it) {
    fq_flow *f = flow_find(q, it->client);
    if (!f) {
        if (q->n_flows == q->cap) flows_compact(q);
        if (q->n_flows == q->cap) {
            int cap = q->cap ? q->cap * 2 : 8;
            fq_flow *p = realloc(q->flows, (size_t)cap * sizeof *p);
            if (!p) return -1;
            q->flows = p;
            q->cap = cap;
        }
        f = &q->flows[q->n_flows++];
        *f = (fq_flow){.client = it->client, .finish = q->vtime};
    }
    it->seq = q->seq++;
    it->next = NULL;
    if (f->tail) f->tail->next = it;
    else f->head = it;
    f->tail = it;
    q->count++;
    q->undo_it = NULL;
    return 0;
}

srv_fairq_item *srv_fairq_peek(const srv_fairq *q) {
    const fq_flow *best = NULL;
    int64_t best_start = 0;
    for (int i = 0; i < q->n_flows; i++) {
        const fq_flow *f = &q->flows[i];
        if (!f->head) continue;
        int64_t s = flow_start(q, f);
        if (!best || s < best_start || (s == best_start && f->head->seq < best->head->seq)) {
            best = f;
            best_start = s;
        }
    }
    return best ? best->head : NULL;
}

void srv_fairq_pop(srv_fairq *q, srv_fairq_item *it) {
    fq_flow *f = flow_find(q, it->client);
    if (!f || f->head != it) return; /* not a head: a caller bug, and nothing to charge */
    q->undo_it = it;
    q->undo_vtime = q->vtime;
    q->undo_finish = f->finish;
    int64_t start = flow_start(q, f);
    q->vtime = start;
    f->finish = start + item_cost(it);
    f->head = it->next;
    if (!f->head) f->tail = NULL;
    it->next = NULL;
    q->count--;
}

void srv_fairq_unpop(srv_fairq *q, srv_fairq_item *it) {
    if (q->undo_it != it) return;
    q->undo_it = NULL;
    fq_flow *f = flow_find(q, it->client); /* still there: pop never drops a client */
    if (!f) return;
    q->vtime = q->undo_vtime;
    f->finish = q->undo_finish;
    it->next = f->head;
    f->head = it;
    if (!f->tail) f->tail = it;
    q->count++;
}

void srv_fairq_remove(srv_fairq *q, srv_fairq_item *it) {
    fq_flow *f = flow_find(q, it->client);
    if (!f) return;
    srv_fairq_item *prev = NULL;
    for (srv_fairq_item *x = f->head; x; prev = x, x = x->next) {
        if (x != it) continue;
        if (prev) prev->next = x->next;
        else f->head = x->next;
        if (f->tail == x) f->tail = prev;
        x->next = NULL;
        q->count--;
        q->undo_it = NULL;
        return;
    }
}

void srv_fairq_refund(srv_fairq *q, uint64_t client, int64_t tokens) {
    fq_flow *f = flow_find(q, client);
    if (f && tokens > 0) f->finish -= tokens;
}

int srv_fairq_count(const srv_fairq *q) { return q->count; }

static srv_fairq_item *first_from(const srv_fairq *q, int i) {
    for (; i < q->n_flows; i++)
        if (q->flows[i].head) return q->flows[i].head;
    return NULL;
}

srv_fairq_item *srv_fairq_first(const srv_fairq *q) { return first_from(q, 0); }

srv_fairq_item *srv_fairq_next(const srv_fairq *q, const srv_fairq_item *it) {
    if (it->next) return it->next;
    const fq_flow *f = flow_find(q, it->client);
    return f ? first_from(q, (int)(f - q->flows) + 1) : NULL;
}
