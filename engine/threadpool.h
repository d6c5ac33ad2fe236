/*
 * threadpool.h - a small persistent pool of compute threads for one forward pass at a time.
 *
 * cm_pool_run() hands n_tasks task indices to the pool's threads (the caller is thread 0 and works too)
 * and returns when all have run. Each thread has a contiguous share of the tasks, which it runs in order
 * unless it comes late: a thread that has run its own takes the others' from their ends, so a thread
 * that the OS preempts does not hold up the others' share. cm_pool_run_split() says which share is whose
 * (a forward pass gives each thread the same tokens in every step, so that the activations a thread
 * writes are mostly the ones it reads next); cm_pool_run() splits them evenly. Workers spin briefly between runs (a decode step issues
 * a few hundred runs back to back) and then sleep on a condition variable, so an idle engine costs no CPU.
 * Nothing is allocated per run. A pool belongs to one caller thread at a time.
 */
#ifndef CM_THREADPOOL_H
#define CM_THREADPOOL_H

#include "codemoe.h"

typedef struct cm_pool cm_pool;

/* fn(ctx, task, thread): task in [0, n_tasks), thread in [0, n_threads) (for per-thread scratch). */
typedef void (*cm_task_fn)(void *ctx, int task, int thread);

#define CM_POOL_MAX_THREADS 256

/* n_threads >= 1 (the caller counts as one; n_threads - 1 threads are started). NULL on failure. */
cm_pool *cm_pool_create(int n_threads, cm_err *err);
/* Stops and joins the workers. NULL is a no-op. */
void cm_pool_free(cm_pool *p);
int cm_pool_size(const cm_pool *p);
/* Runs fn for every task in [0, n_tasks) and returns when all are done. n_tasks <= 0 does nothing. */
void cm_pool_run(cm_pool *p, cm_task_fn fn, void *ctx, int n_tasks);
/* The same for the tasks [first[0], first[n]) (n = cm_pool_size(p)), thread i's share
 * [first[i], first[i + 1]); first is non-decreasing. */
void cm_pool_run_split(cm_pool *p, cm_task_fn fn, void *ctx, const int *first);

#endif
