/*
 * test_threadpool.c - engine/threadpool.c: cm_pool_run runs every task index exactly once, with the
 * thread argument in range, for any thread count (1 = the caller alone, more threads than tasks, more
 * tasks than threads), for runs issued back to back (the generation ticket must never let a late
 * thread run a task of a finished run twice or of the next run early), for n_tasks <= 0 (nothing
 * runs), and for a run issued from inside a task of another pool (nested dispatch).
 */
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

int main(void) {
    RUN(every_task_exactly_once_any_thread_count);
    RUN(nothing_runs_for_no_tasks);
    RUN(repeated_runs_back_to_back);
    RUN(nested_dispatch_on_another_pool);
    return test_summary();
}
