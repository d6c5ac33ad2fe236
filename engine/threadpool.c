/*
 * threadpool.c - persistent compute threads: a generation counter publishes each run, an atomic task
 * counter shares its tasks out, a done counter ends it. Spin first (runs come in quick succession
 * during a forward pass), then sleep on a condvar (an idle server must not burn cores).
 */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CM_PAUSE() _mm_pause()
#else
#define CM_PAUSE() ((void)0)
#endif

#include "util.h"

/* Spin iterations before sleeping: with PAUSE ~ tens of ns each, a few hundred microseconds. */
#define POOL_SPIN 20000

typedef struct pool_worker {
    cm_pool *pool;
    int index;
    pthread_t tid;
} pool_worker;

struct cm_pool {
    int n_threads;
    pool_worker *workers;     /* (n_threads - 1) */
    int n_started;

    /* the current run; written by the caller before the generation is bumped */
    cm_task_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next_task;
    atomic_int n_done;        /* workers finished with this run */
    atomic_uint generation;
    atomic_int stop;

    pthread_mutex_t mu;
    pthread_cond_t wake;      /* generation changed or stop */
    pthread_cond_t done;      /* n_done reached n_threads - 1 */
};

static void pool_work(cm_pool *p, int thread) {
    cm_task_fn fn = p->fn;
    void *ctx = p->ctx;
    int n = p->n_tasks;
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);
        if (t >= n) break;
        fn(ctx, t, thread);
    }
}

static void *pool_main(void *arg) {
    pool_worker *w = arg;
    cm_pool *p = w->pool;
    unsigned seen = 0; /* the generation at create: a worker that starts late must not skip run 1 */
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_relaxed) && spins < POOL_SPIN) {
            CM_PAUSE();
            spins++;
        }
        if (g == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        pool_work(p, w->index);
        if (atomic_fetch_add_explicit(&p->n_done, 1, memory_order_acq_rel) + 1 == p->n_threads - 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

cm_pool *cm_pool_create(int n_threads, cm_err *err) {
    if (n_threads < 1 || n_threads > CM_POOL_MAX_THREADS) {
        cm_err_set(err, CM_E_INVAL, "threadpool: n_threads %d out of range [1, %d]", n_threads,
                   CM_POOL_MAX_THREADS);
        return NULL;
    }
    cm_pool *p = calloc(1, sizeof *p);
    if (!p) {
        cm_err_set(err, CM_E_NOMEM, "threadpool: out of memory");
        return NULL;
    }
    p->n_threads = n_threads;
    atomic_init(&p->next_task, 0);
    atomic_init(&p->n_done, 0);
    atomic_init(&p->generation, 0);
    atomic_init(&p->stop, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers) {
            cm_pool_free(p);
            cm_err_set(err, CM_E_NOMEM, "threadpool: out of memory");
            return NULL;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            p->workers[i].pool = p;
            p->workers[i].index = i + 1;
            if (pthread_create(&p->workers[i].tid, NULL, pool_main, &p->workers[i]) != 0) {
                cm_pool_free(p);
                cm_err_set(err, CM_E_NOMEM, "threadpool: cannot start thread %d of %d", i + 1, n_threads);
                return NULL;
            }
            p->n_started++;
        }
    }
    return p;
}

void cm_pool_free(cm_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_started; i++) pthread_join(p->workers[i].tid, NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    free(p);
}

int cm_pool_size(const cm_pool *p) { return p ? p->n_threads : 1; }

void cm_pool_run(cm_pool *p, cm_task_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0) return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&p->n_done, 0, memory_order_relaxed);
    /* release: workers that see the new generation also see the job fields above */
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    pool_work(p, 0);

    int want = p->n_threads - 1, spins = 0;
    while (atomic_load_explicit(&p->n_done, memory_order_acquire) < want && spins < POOL_SPIN) {
        CM_PAUSE();
        spins++;
    }
    if (atomic_load_explicit(&p->n_done, memory_order_acquire) < want) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->n_done) < want) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
