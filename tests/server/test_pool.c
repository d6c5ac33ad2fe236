/*
 * test_pool.c - the pool of models (server/pool.c) on a real loop with a real engine worker: a member
 * that is unloaded while a request holds it is freed only once the loop is done with its worker's
 * wake-up handle, also when the last request lets go from inside a close callback (a stream's request is
 * freed when its hang-up watch has closed), where that handle finishes closing one iteration later.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "server.h"
#include "test.h"

typedef struct {
    srv_pool *pool;
    srv_member *m;
    uv_timer_t ready;         /* waits for the member to be READY and unreferenced */
    uv_timer_t reap;          /* the reaper, as http.c's tick runs it */
    uv_idle_t watch;          /* stands for a stream's hang-up watch */
    int loaded;
    int stopped_in_close;     /* the release in the close callback stopped the worker */
    int reaped_early;         /* members srv_pool_reap freed in the first timers after the stop */
    int reaped_early_ran;
} pool_test;

/* The timers that run next: before the closing phase in which the worker's handle finishes closing. */
static void on_reap(uv_timer_t *t) {
    pool_test *pt = t->data;
    pt->reaped_early = srv_pool_reap(pt->pool);
    pt->reaped_early_ran = 1;
    uv_close((uv_handle_t *)t, NULL);
}

/* In the closing phase: the request lets go of the retired member (its worker stops and its wake-up
 * handle is closed from here), then time moves on, so the reaper's timer is due in the next iteration. */
static void on_watch_closed(uv_handle_t *hd) {
    pool_test *pt = hd->data;
    srv_member_release(pt->m);
    pt->stopped_in_close = pt->m->stopped;
    uv_sleep(5);
    uv_timer_start(&pt->reap, on_reap, 0, 0);
}

static void on_ready(uv_timer_t *t);

static void on_wake(void *ud, srv_member *m) {
    pool_test *pt = ud;
    cm_err err;
    int st = srv_pool_update(m, &err);
    if (st < 0) return;
    if (st != SRV_MODEL_READY) {
        fprintf(stderr, "load failed: %s\n", err.msg);
        srv_pool_retire(m); /* closes its worker's handle: the loop ends */
        uv_close((uv_handle_t *)&pt->ready, NULL);
        uv_close((uv_handle_t *)&pt->reap, NULL);
        uv_close((uv_handle_t *)&pt->watch, NULL);
        return;
    }
    pt->loaded = 1;
    uv_timer_start(&pt->ready, on_ready, 1, 1);
}

/* Once the first residency measurement (which holds the member too) has ended: a stream holds the model
 * while an admin unloads it, and the stream's request is the last to let go. */
static void on_ready(uv_timer_t *t) {
    pool_test *pt = t->data;
    if (pt->m->residency.busy) return;
    uv_close((uv_handle_t *)t, NULL);
    srv_member_hold(pt->m);
    srv_pool_retire(pt->m);
    uv_close((uv_handle_t *)&pt->watch, on_watch_closed);
}

TEST(unload_freed_after_its_handle_closed) {
    srv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_threads = 1;
    cfg.parallel = 1;
    cfg.queue = 1;
    cfg.n_batch = 16;
    cfg.n_ctx = 32;
    cfg.kv_type = CM_KV_F32;
    uv_loop_t loop;
    ASSERT_EQ_INT(uv_loop_init(&loop), 0);
    pool_test pt;
    memset(&pt, 0, sizeof pt);
    ASSERT_EQ_INT(uv_timer_init(&loop, &pt.ready), 0);
    ASSERT_EQ_INT(uv_timer_init(&loop, &pt.reap), 0);
    ASSERT_EQ_INT(uv_idle_init(&loop, &pt.watch), 0);
    pt.ready.data = pt.reap.data = pt.watch.data = &pt;
    pt.pool = srv_pool_create(&loop, &cfg, on_wake, &pt);
    ASSERT_TRUE(pt.pool != NULL);
    srv_model_spec spec;
    srv_model_spec_init(&spec);
    spec.path = strdup(test_fixture("models/qwen2-gqa.gguf"));
    spec.n_threads = 1;
    char err[256] = "";
    ASSERT_EQ_INT(srv_pool_add(pt.pool, &spec, NULL, &pt.m, err, sizeof err), 0);
    srv_model_spec_free(&spec);
    ASSERT_EQ_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ASSERT_TRUE(pt.loaded);
    ASSERT_TRUE(pt.stopped_in_close);
    ASSERT_TRUE(pt.reaped_early_ran);
    /* freed there, the loop would finish closing a handle inside freed memory */
    ASSERT_EQ_INT(pt.reaped_early, 0);
    ASSERT_EQ_INT(srv_pool_reap(pt.pool), 1); /* now it goes */
    ASSERT_EQ_INT(srv_pool_count(pt.pool), 0);
    ASSERT_EQ_INT(srv_pool_threads_used(pt.pool), 0);
    srv_pool_free(pt.pool);
    ASSERT_EQ_INT(uv_loop_close(&loop), 0);
}

int main(void) {
    RUN(unload_freed_after_its_handle_closed);
    return test_summary();
}
