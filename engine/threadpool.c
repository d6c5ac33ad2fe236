/*
 * threadpool.c - persistent compute threads sharing a run's tasks, each thread its own share first.
 *
 * A run's tasks are split into one contiguous range per thread (cm_pool_run_split says where; an even
 * split otherwise). A thread takes its own range's tasks from the front, in order, then takes what is
 * left of the others' from their backs: the tasks a thread is given run there unless it comes late, so
 * a forward pass can hand each thread the same tokens in every step, and a thread the OS preempts
 * holds up no more than the task it holds. Each range is one atomic word (generation, front, back) on
 * its own cache line, claimed by CAS, so a thread that wakes late can never run a task of a finished
 * run: its CAS expects its own generation. The caller publishes a run by writing its job into slot
 * generation & 1 and its ranges, then storing the new generation in the ticket, which the workers
 * watch. The caller waits for the run's tasks to be done, not for every thread to check in.
 * Workers spin briefly between runs (a decode step issues hundreds of runs back to back), then sleep
 * on a condition variable, so an idle engine costs no CPU.
 */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
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

typedef struct pool_job {
    cm_task_fn fn;
    void *ctx;
} pool_job;

/* A thread's range of a run: generation (16 bits) << 48 | front << 24 | back; tasks [front, back) are
 * left. The generation's low bits suffice: a thread whose CAS succeeds with a generation g' = g mod
 * 2^16 claims a task of the run in flight, whose job is in slot g' & 1 = g & 1. */
typedef struct pool_range {
    _Alignas(64) _Atomic uint64_t v;
} pool_range;

#define RANGE_BITS 24
#define RANGE_MASK ((UINT64_C(1) << RANGE_BITS) - 1)
#define RANGE_GEN(g) ((uint64_t)((g) & 0xffffu) << 48)

typedef struct pool_worker {
    cm_pool *pool;
    int index;
    pthread_t tid;
} pool_worker;

struct cm_pool {
    int n_threads;
    pool_worker *workers;     /* (n_threads - 1) */
    int n_started;
    uint32_t generation;      /* caller's copy of the current generation */
    pool_job job[2];          /* slot generation & 1 */
    pool_range *range;        /* (n_threads) thread i's share of the current run */
    _Alignas(64) _Atomic uint64_t ticket; /* generation << 32: a new run */
    _Alignas(64) atomic_int n_done;       /* tasks of the current run finished */
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t wake;      /* a new generation or stop */
};

/* Claims and runs tasks of generation g until none is left: thread's own range from the front, then
 * the others' from the back, the next thread's first. */
static void pool_drain(cm_pool *p, uint32_t g, int thread) {
    const uint64_t tag = RANGE_GEN(g);
    const pool_job *j = &p->job[g & 1];
    for (int k = 0; k < p->n_threads; k++) {
        pool_range *r = &p->range[(thread + k) % p->n_threads];
        uint64_t v = atomic_load_explicit(&r->v, memory_order_acquire);
        for (;;) {
            if ((v & RANGE_GEN(0xffffu)) != tag) return; /* a later run: this one is over */
            uint64_t front = v >> RANGE_BITS & RANGE_MASK, back = v & RANGE_MASK;
            if (front >= back) break;
            uint64_t nv = k ? v - 1 : v + (UINT64_C(1) << RANGE_BITS);
            if (!atomic_compare_exchange_weak_explicit(&r->v, &v, nv, memory_order_acq_rel, memory_order_acquire))
                continue; /* v reloaded */
            j->fn(j->ctx, (int)(k ? back - 1 : front), thread); /* the CAS proved the run in flight is g's */
            atomic_fetch_add_explicit(&p->n_done, 1, memory_order_release);
            v = atomic_load_explicit(&r->v, memory_order_acquire);
        }
    }
}

static void *pool_main(void *arg) {
    pool_worker *w = arg;
    cm_pool *p = w->pool;
    uint32_t seen = 0; /* generation already drained; 0 is the state at create */
    for (;;) {
        uint32_t g;
        int spins = 0;
        while ((g = (uint32_t)(atomic_load_explicit(&p->ticket, memory_order_acquire) >> 32)) == seen &&
               !atomic_load_explicit(&p->stop, memory_order_relaxed) && spins < POOL_SPIN) {
            CM_PAUSE();
            spins++;
        }
        if (g == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            while ((g = (uint32_t)(atomic_load(&p->ticket) >> 32)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        pool_drain(p, g, w->index);
        seen = g;
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
    p->range = aligned_alloc(64, (size_t)n_threads * sizeof *p->range);
    if (!p->range) {
        free(p);
        cm_err_set(err, CM_E_NOMEM, "threadpool: out of memory");
        return NULL;
    }
    for (int i = 0; i < n_threads; i++) atomic_init(&p->range[i].v, 0);
    atomic_init(&p->ticket, 0);
    atomic_init(&p->n_done, 0);
    atomic_init(&p->stop, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
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
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    free(p->range);
    free(p);
}

int cm_pool_size(const cm_pool *p) { return p ? p->n_threads : 1; }

void cm_pool_run_split(cm_pool *p, cm_task_fn fn, void *ctx, const int *first) {
    const int nt = p ? p->n_threads : 1, n_tasks = first[nt] - first[0];
    if (n_tasks <= 0) return;
    if (nt == 1 || n_tasks == 1 || first[nt] > (int)RANGE_MASK) { /* (more tasks than a range holds: never, in practice) */
        for (int t = first[0]; t < first[nt]; t++) fn(ctx, t, 0);
        return;
    }
    uint32_t g = ++p->generation;
    if (g == 0) g = ++p->generation; /* 0 means "nothing yet" to a fresh worker */
    p->job[g & 1].fn = fn;
    p->job[g & 1].ctx = ctx;
    /* n_done first: a thread whose generation has these low 16 bits (one 65536 runs late) may claim a
     * task as soon as a range is stored (release: with the job slot and n_done written before) */
    atomic_store_explicit(&p->n_done, 0, memory_order_relaxed);
    for (int i = 0; i < nt; i++)
        atomic_store_explicit(&p->range[i].v, RANGE_GEN(g) | (uint64_t)first[i] << RANGE_BITS | (uint64_t)first[i + 1],
                              memory_order_release);
    /* release: a thread that reads this ticket also sees the job slot and the ranges written above */
    atomic_store_explicit(&p->ticket, (uint64_t)g << 32, memory_order_release);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    pool_drain(p, g, 0);

    /* Only tasks other threads are running remain. Yield rather than sleep: they end within a task's
     * time, and if a worker was preempted mid-task, yielding lets it run on this core. */
    int spins = 0;
    while (atomic_load_explicit(&p->n_done, memory_order_acquire) < n_tasks) {
        if (++spins < 2000)
            CM_PAUSE();
        else
            sched_yield();
    }
}

void cm_pool_run(cm_pool *p, cm_task_fn fn, void *ctx, int n_tasks) {
    int first[CM_POOL_MAX_THREADS + 1], nt = p ? p->n_threads : 1;
    if (n_tasks <= 0) return;
    for (int i = 0; i <= nt; i++) first[i] = (int)((int64_t)n_tasks * i / nt);
    cm_pool_run_split(p, fn, ctx, first);
}
