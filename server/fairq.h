/*
 * fairq.h - the admission order of one scheduler: one FIFO queue per client (an API key, or a user
 * named by the trusted user header), served fairly by tokens, so that one client's burst does not
 * delay another client's request by more than one turn.
 *
 * The policy is start-time fair queuing over tokens, the virtual-time form of deficit round robin:
 * each client has a finish tag F (the virtual tokens it has been served up to), the queue a virtual
 * time V (the start tag of the item admitted last). A client's head item starts at S = max(V, F);
 * the next item admitted is the head with the smallest S (ties: the earlier arrival). Admitting it
 * sets V = S and F = S + cost. So a client that has just arrived starts at V, before every client
 * that was served since (their F is past V): a single request waits for at most the one item whose
 * start tag equals V, whatever the other clients have queued; over time every backlogged client gets
 * the same tokens. An idle client's lead over V is at most its last item's cost (no credit is
 * saved up while idle, and no debt beyond one item is kept).
 *
 * Items are the caller's (embedded in its job); the queue links them and never frees them.
 * Single-threaded (the scheduler's worker thread owns it).
 */
#ifndef CM_SRV_FAIRQ_H
#define CM_SRV_FAIRQ_H

#include <stdint.h>

typedef struct srv_fairq_item srv_fairq_item;
struct srv_fairq_item {
    /* ---- set by the caller before srv_fairq_push */
    uint64_t client;          /* who it is for (any stable id: equal ids share a queue) */
    int64_t cost;             /* tokens it is charged when admitted (values < 1 count as 1) */
    void *data;               /* the caller's (never touched) */
    /* ---- the queue's */
    uint64_t seq;             /* arrival order */
    srv_fairq_item *next;
};

typedef struct srv_fairq srv_fairq;

/* NULL when out of memory. */
srv_fairq *srv_fairq_create(void);
/* Frees the queue, not the items still in it. */
void srv_fairq_free(srv_fairq *q);

/* Appends it at the end of its client's queue. Returns 0, or -1 when out of memory (it is not queued). */
int srv_fairq_push(srv_fairq *q, srv_fairq_item *it);
/* The item to admit next (the head with the smallest start tag), NULL when empty. Stable: it stays the
 * answer until something is pushed, popped or removed. */
srv_fairq_item *srv_fairq_peek(const srv_fairq *q);
/* Takes the item srv_fairq_peek returned out of the queue and charges its client its cost. Any client's
 * head item may be taken so (the scheduler's preemption admits a client with nothing admitted out of
 * turn): it is charged from its own start tag, which becomes the virtual time. */
void srv_fairq_pop(srv_fairq *q, srv_fairq_item *it);
/* Undoes the srv_fairq_pop just made (nothing else happened in between): it is the head again, and
 * the charge is taken back. For an item that turned out not to fit yet. */
void srv_fairq_unpop(srv_fairq *q, srv_fairq_item *it);
/* Takes a queued item out without charging (cancelled, or failed before admission). */
void srv_fairq_remove(srv_fairq *q, srv_fairq_item *it);
/* Gives back tokens an admitted item was charged and did not use (it ended early): its client's
 * finish tag moves back by that much. A client the queue has forgotten is not charged anyway. */
void srv_fairq_refund(srv_fairq *q, uint64_t client, int64_t tokens);

/* Items queued. */
int srv_fairq_count(const srv_fairq *q);
/* Walks every queued item (client by client, each in arrival order): first, then next of the last one
 * seen; NULL at the end. Removing the item just returned is allowed when its next was taken first. */
srv_fairq_item *srv_fairq_first(const srv_fairq *q);
srv_fairq_item *srv_fairq_next(const srv_fairq *q, const srv_fairq_item *it);

#endif
