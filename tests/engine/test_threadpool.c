/*
 * test_threadpool.c - engine/threadpool.c: cm_pool_run runs every task index exactly once, with the
 * thread argument in range, for any thread count (1 = the caller alone, more threads than tasks, more
 * tasks than threads), for runs issued back to back (the generation ticket must never let a late
 * thread run a task of a finished run twice or of the next run early), for n_tasks <= 0 (nothing
 * runs), and for a run issued from inside a task of another pool (nested dispatch). cm_pool_run_split:
 * the same for uneven and empty shares; a thread runs its own share from the front and others take
 * from the back only (what it ran of its share is a prefix of it), and a thread stuck in a task leaves
 * the rest of its share to the others.
 */
#include <time.h>
#include <stdatomic.h>
#include <stdint.h>

#include "test.h"
#include "threadpool.h"

#define MAX_TASKS 4096

typedef struct counts {
    atomic_int hits[MAX_TASKS];
    atomic_int bad_thread; /* thread index out of [0, n_threads) */
    int n_threads;
} counts;

static void count_task(void *ud, int task, int thread) {
    counts *c = ud;
    if (thread < 0 || thread >= c->n_threads) atomic_fetch_add(&c->bad_thread, 1);
    if (task >= 0 && task < MAX_TASKS) atomic_fetch_add(&c->hits[task], 1);
}

static void clear(counts *c, int n_threads) {
    for (int i = 0; i < MAX_TASKS; i++) atomic_store(&c->hits[i], 0);
    atomic_store(&c->bad_thread, 0);
    c->n_threads = n_threads;
}

/* Every index in [0, n) ran exactly once, none beyond. Returns the first wrong index or -1. */
static int first_wrong(counts *c, int n) {
    for (int i = 0; i < MAX_TASKS; i++)
        if (atomic_load(&c->hits[i]) != (i < n ? 1 : 0)) return i;
    return -1;
}

static counts cnt;

TEST(every_task_exactly_once_any_thread_count) {
    const int threads[] = {1, 2, 3, 4, 7, 16};
    const int tasks[] = {1, 2, 3, 5, 16, 17, 100, 1000, MAX_TASKS};
    for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
        cm_err err = {0};
        cm_pool *p = cm_pool_create(threads[t], &err);
        ASSERT_TRUE(p != NULL);
        ASSERT_EQ_INT(cm_pool_size(p), threads[t]);
        for (size_t k = 0; k < sizeof tasks / sizeof tasks[0]; k++) {
            clear(&cnt, threads[t]);
            cm_pool_run(p, count_task, &cnt, tasks[k]);
            int w = first_wrong(&cnt, tasks[k]);
            if (w >= 0) TEST_FAIL_("%d threads, %d tasks: task %d ran %d times", threads[t], tasks[k], w,
                                   atomic_load(&cnt.hits[w]));
            ASSERT_EQ_INT(atomic_load(&cnt.bad_thread), 0);
        }
        cm_pool_free(p);
    }
}

TEST(nothing_runs_for_no_tasks) {
    cm_err err = {0};
    cm_pool *p = cm_pool_create(3, &err);
    ASSERT_TRUE(p != NULL);
    clear(&cnt, 3);
    cm_pool_run(p, count_task, &cnt, 0);
    cm_pool_run(p, count_task, &cnt, -5);
    ASSERT_EQ_INT(first_wrong(&cnt, 0), -1);
    cm_pool_free(p);
    cm_pool_free(NULL);
}

/* Many short runs back to back, as a decode step issues them: each run's counts are checked before
 * the next starts, so a task of run r executed during run r+1 shows up as a wrong count. */
TEST(repeated_runs_back_to_back) {
    cm_err err = {0};
    cm_pool *p = cm_pool_create(4, &err);
    ASSERT_TRUE(p != NULL);
    for (int r = 0; r < 3000; r++) {
        int n = 1 + (r * 7) % 13;
        clear(&cnt, 4);
        cm_pool_run(p, count_task, &cnt, n);
        int w = first_wrong(&cnt, n);
        if (w >= 0) {
            TEST_FAIL_("run %d (%d tasks): task %d ran %d times", r, n, w, atomic_load(&cnt.hits[w]));
            break;
        }
    }
    cm_pool_free(p);
}

typedef struct nested {
    cm_pool *inner;
    counts *c;
    atomic_int outer_runs;
} nested;

static void outer_task(void *ud, int task, int thread) {
    nested *n = ud;
    atomic_fetch_add(&n->outer_runs, 1);
    cm_pool_run(n->inner, count_task, n->c, 500); /* the outer run has one task: one caller of inner */
}

TEST(nested_dispatch_on_another_pool) {
    cm_err err = {0};
    cm_pool *outer = cm_pool_create(3, &err), *inner = cm_pool_create(3, &err);
    ASSERT_TRUE(outer && inner);
    nested n = {.inner = inner, .c = &cnt};
    for (int r = 0; r < 50; r++) {
        clear(&cnt, 3);
        atomic_store(&n.outer_runs, 0);
        cm_pool_run(outer, outer_task, &n, 1);
        ASSERT_EQ_INT(atomic_load(&n.outer_runs), 1);
        ASSERT_EQ_INT(first_wrong(&cnt, 500), -1);
        /* and the inner pool directly from this thread between nested runs */
        clear(&cnt, 3);
        cm_pool_run(inner, count_task, &cnt, 37);
        ASSERT_EQ_INT(first_wrong(&cnt, 37), -1);
    }
    cm_pool_free(outer);
    cm_pool_free(inner);
}

typedef struct owners {
    atomic_int thread_of[MAX_TASKS]; /* 1 + the thread that ran the task */
    int slow_thread;                /* this thread sleeps in every task it runs; -1: none */
} owners;

static void owner_task(void *ud, int task, int thread) {
    owners *o = ud;
    atomic_store(&o->thread_of[task], thread + 1);
    if (thread == o->slow_thread) nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
}

static owners own;

TEST(split_shares_every_task_once_own_share_from_the_front) {
    const int nt = 4;
    /* uneven, empty and one-task shares, and a run not starting at task 0 */
    const int splits[][5] = {{0, 10, 20, 30, 40}, {0, 0, 0, 0, 100}, {0, 100, 100, 100, 100}, {0, 1, 2, 3, 4},
                             {0, 3, 3, 50, 51}, {7, 7, 60, 61, 300}, {0, 0, 0, 0, 0}};
    cm_err err = {0};
    cm_pool *p = cm_pool_create(nt, &err);
    ASSERT_TRUE(p != NULL);
    own.slow_thread = -1;
    for (int rep = 0; rep < 300; rep++) {
        const int *first = splits[rep % (int)(sizeof splits / sizeof splits[0])];
        for (int i = 0; i < MAX_TASKS; i++) atomic_store(&own.thread_of[i], 0);
        cm_pool_run_split(p, owner_task, &own, first);
        for (int t = 0; t < MAX_TASKS; t++) {
            int ran = atomic_load(&own.thread_of[t]) != 0;
            if (ran != (t >= first[0] && t < first[nt])) {
                TEST_FAIL_("split %d: task %d ran %d", rep % 7, t, ran);
                goto out;
            }
        }
        for (int i = 0; i < nt; i++) { /* the owner's tasks: a prefix of its share */
            int t = first[i];
            while (t < first[i + 1] && atomic_load(&own.thread_of[t]) == i + 1) t++;
            for (; t < first[i + 1]; t++)
                if (atomic_load(&own.thread_of[t]) == i + 1) {
                    TEST_FAIL_("split %d: thread %d ran task %d of its share after another thread's", rep % 7, i, t);
                    goto out;
                }
        }
    }
out:
    cm_pool_free(p);
}

/* Thread 1 sleeps 20 ms in every task it runs: thread 0, done with its own share, takes the rest of
 * thread 1's (were it to wait instead, thread 0 would run none of them). */
TEST(split_a_stuck_thread_leaves_its_share_to_the_others) {
    cm_err err = {0};
    cm_pool *p = cm_pool_create(2, &err);
    ASSERT_TRUE(p != NULL);
    own.slow_thread = 1;
    const int first[3] = {0, 4, 12};
    for (int i = 0; i < MAX_TASKS; i++) atomic_store(&own.thread_of[i], 0);
    cm_pool_run_split(p, owner_task, &own, first);
    int by0 = 0;
    for (int t = 0; t < 12; t++) {
        ASSERT_TRUE(atomic_load(&own.thread_of[t]) != 0);
        by0 += t >= 4 && atomic_load(&own.thread_of[t]) == 1;
    }
    ASSERT_TRUE(by0 >= 1);
    own.slow_thread = -1;
    cm_pool_free(p);
}

int main(void) {
    RUN(every_task_exactly_once_any_thread_count);
    RUN(nothing_runs_for_no_tasks);
    RUN(repeated_runs_back_to_back);
    RUN(nested_dispatch_on_another_pool);
    RUN(split_shares_every_task_once_own_share_from_the_front);
    RUN(split_a_stuck_thread_leaves_its_share_to_the_others);
    return test_summary();
}
