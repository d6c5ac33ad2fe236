/*
 * test_fairq.c - the schedulers' admission order (server/fairq.c): a client's single request is
 * admitted within one turn of another client's burst, whatever either has queued or costs; backlogged
 * clients get equal tokens; ties go by arrival; unpop is exact; removal, iteration and refunds.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fairq.h"
#include "test.h"

#define N_ITEMS 256

static srv_fairq_item items[N_ITEMS];
static int n_items;

static srv_fairq_item *push(srv_fairq *q, uint64_t client, int64_t cost) {
    srv_fairq_item *it = &items[n_items++];
    memset(it, 0, sizeof *it);
    it->client = client;
    it->cost = cost;
    it->data = it;
    return srv_fairq_push(q, it) == 0 ? it : NULL;
}

static srv_fairq_item *pop(srv_fairq *q) {
    srv_fairq_item *it = srv_fairq_peek(q);
    if (it) srv_fairq_pop(q, it);
    return it;
}

/* Client 1 queues 50 requests and 3 of them are admitted; then client 2 sends one: it is the next
 * admitted (a FIFO would admit it 48th), with a typing-sized cost and with a cost 100 times larger. */
TEST(single_request_waits_one_turn) {
    for (int big = 0; big < 2; big++) {
        n_items = 0;
        srv_fairq *q = srv_fairq_create();
        ASSERT_TRUE(q);
        for (int i = 0; i < 50; i++) ASSERT_TRUE(push(q, 1, 40));
        for (int i = 0; i < 3; i++) ASSERT_EQ_INT(pop(q)->client, 1);
        srv_fairq_item *b = push(q, 2, big ? 4000 : 40);
        ASSERT_TRUE(b);
        ASSERT_EQ_INT(srv_fairq_count(q), 48);
        ASSERT_TRUE(pop(q) == b);
        /* and client 1 goes on at once, while client 2 has nothing queued */
        ASSERT_EQ_INT(pop(q)->client, 1);
        srv_fairq_free(q);
    }
}

/* Two backlogged clients with different request sizes get the same tokens, to within one request. */
TEST(backlogged_clients_share_tokens) {
    n_items = 0;
    srv_fairq *q = srv_fairq_create();
    for (int i = 0; i < 120; i++) ASSERT_TRUE(push(q, 7, 10));
    for (int i = 0; i < 120; i++) ASSERT_TRUE(push(q, 9, 30));
    int64_t served[2] = {0, 0};
    for (int i = 0; i < 100; i++) {
        srv_fairq_item *it = pop(q);
        ASSERT_TRUE(it);
        served[it->client == 9] += it->cost;
        int64_t d = served[0] - served[1];
        ASSERT_TRUE(d <= 30 && d >= -30);
    }
    ASSERT_TRUE(served[0] > 500 && served[1] > 500);
    srv_fairq_free(q);
}

/* Equal start tags go by arrival, so with one request per client the order is FIFO. */
TEST(ties_by_arrival) {
    n_items = 0;
    srv_fairq *q = srv_fairq_create();
    uint64_t order[] = {5, 3, 8, 1};
    for (int i = 0; i < 4; i++) ASSERT_TRUE(push(q, order[i], 16 + i));
    for (int i = 0; i < 4; i++) ASSERT_EQ_INT(pop(q)->client, order[i]);
    ASSERT_TRUE(srv_fairq_peek(q) == NULL);
    ASSERT_EQ_INT(srv_fairq_count(q), 0);
    srv_fairq_free(q);
}

/* A pop taken back leaves the queue exactly as it was: the same order as a twin that never popped. */
TEST(unpop_is_exact) {
    n_items = 0;
    srv_fairq *a = srv_fairq_create(), *b = srv_fairq_create();
    srv_fairq_item *ia[60], *ib[60];
    for (int i = 0; i < 60; i++) {
        uint64_t c = (uint64_t)(i % 3);
        int64_t cost = 5 + (i * 7) % 40;
        ia[i] = push(a, c, cost);
        ib[i] = push(b, c, cost);
        ASSERT_TRUE(ia[i] && ib[i]);
    }
    for (int step = 0; step < 60; step++) {
        srv_fairq_item *x = srv_fairq_peek(a);
        srv_fairq_pop(a, x);
        srv_fairq_unpop(a, x);
        ASSERT_TRUE(srv_fairq_peek(a) == x);
        ASSERT_EQ_INT(srv_fairq_count(a), 60 - step);
        srv_fairq_item *y = pop(b);
        ASSERT_TRUE(pop(a) == x);
        ASSERT_EQ_INT(x - ia[0], y - ib[0]);
    }
    srv_fairq_free(a);
    srv_fairq_free(b);
}

/* Iteration sees every item once; removing the item just seen keeps the walk going; removed items are
 * never admitted and cost nothing. */
TEST(remove_while_iterating) {
    n_items = 0;
    srv_fairq *q = srv_fairq_create();
    for (int i = 0; i < 30; i++) ASSERT_TRUE(push(q, (uint64_t)(i % 4), 10));
    int seen = 0, removed = 0;
    for (srv_fairq_item *it = srv_fairq_first(q), *nx; it; it = nx) {
        nx = srv_fairq_next(q, it);
        seen++;
        if ((it - items) % 2 == 0) { srv_fairq_remove(q, it); it->data = NULL; removed++; }
    }
    ASSERT_EQ_INT(seen, 30);
    ASSERT_EQ_INT(srv_fairq_count(q), 30 - removed);
    int left = 0;
    for (srv_fairq_item *it; (it = pop(q));) { ASSERT_TRUE(it->data != NULL); left++; }
    ASSERT_EQ_INT(left, 30 - removed);
    srv_fairq_free(q);
}

/* Tokens charged and not used go back: after a request charged 1000 that used 5, its client's next
 * request comes after one of another client's, not after all of them. */
TEST(refund_moves_the_client_back) {
    for (int refund = 0; refund < 2; refund++) {
        n_items = 0;
        srv_fairq *q = srv_fairq_create();
        ASSERT_EQ_INT(pop(q) == NULL, 1);
        push(q, 1, 1000);
        ASSERT_EQ_INT(pop(q)->client, 1);
        if (refund) srv_fairq_refund(q, 1, 995);
        for (int i = 0; i < 5; i++) push(q, 2, 10);
        srv_fairq_item *a = push(q, 1, 10);
        int before = 0;
        while (pop(q) != a) before++;
        ASSERT_EQ_INT(before, refund ? 1 : 5);
        srv_fairq_free(q);
    }
}

/* An idle client saves no credit: after a long time alone, client 2 does not get a run of turns. */
TEST(no_credit_while_idle) {
    n_items = 0;
    srv_fairq *q = srv_fairq_create();
    for (int i = 0; i < 100; i++) push(q, 1, 10);
    for (int i = 0; i < 90; i++) pop(q);
    for (int i = 0; i < 10; i++) push(q, 2, 10);
    /* 10 of each left: they alternate, client 2 first */
    for (int i = 0; i < 20; i++) ASSERT_EQ_INT(pop(q)->client, i % 2 ? 1 : 2);
    srv_fairq_free(q);
}

/* Many clients come and go: the queue forgets those with nothing queued and no lead, and stays right. */
TEST(many_clients) {
    n_items = 0;
    srv_fairq *q = srv_fairq_create();
    for (int round = 0; round < 4; round++) {
        for (int c = 0; c < 50; c++) ASSERT_TRUE(push(q, (uint64_t)(1000 * round + c), 8));
        for (int c = 0; c < 50; c++) ASSERT_EQ_INT(pop(q)->client, 1000 * round + c);
        n_items = 0;
    }
    ASSERT_EQ_INT(srv_fairq_count(q), 0);
    srv_fairq_free(q);
}

int main(void) {
    RUN(single_request_waits_one_turn);
    RUN(backlogged_clients_share_tokens);
    RUN(ties_by_arrival);
    RUN(unpop_is_exact);
    RUN(remove_while_iterating);
    RUN(refund_moves_the_client_back);
    RUN(no_credit_while_idle);
    RUN(many_clients);
    return test_summary();
}
