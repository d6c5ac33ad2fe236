/*
 * test_pool.c - the pool of models (server/pool.c) on a real loop with a real engine worker: a member
 * that is unloaded while a request holds it is freed only once the loop is done with its worker's
 * wake-up handle, also when the last request lets go from inside a close callback (a stream's request is
 * freed when its hang-up watch has closed), where that handle finishes closing one iteration later; and a
 * model whose worker thread fails to start is reported FAILED (no hang) while the pool goes on serving
 * the other model.
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

/* One sequence, one queued job, a short context: the smallest pool a test can load a model into. */
static srv_config small_config(int n_threads) {
    srv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_threads = n_threads;
    cfg.parallel = 1;
    cfg.queue = 1;
    cfg.n_batch = 16;
    cfg.n_ctx = 32;
    cfg.kv_type = CM_KV_F32;
    return cfg;
}

TEST(unload_freed_after_its_handle_closed) {
    srv_config cfg = small_config(1);
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

/* ------------------------------------------------------------ a worker thread that fails to start */

typedef struct fault_test {
    srv_pool *pool;
    srv_member *good, *bad;
    int good_state, bad_state;  /* SRV_MODEL_* as srv_pool_update reported it; -1 before */
    char bad_err[sizeof(cm_err){0}.msg];
    api_completion_req req;
    srv_job job;
    srv_out out, got;
    int submitted, job_done, job_error, generated;
    uv_timer_t watchdog;        /* a load that never reports must fail the test, not hang it */
    int timed_out, ended;
} fault_test;

static void fault_maybe_end(fault_test *ft) {
    if (ft->ended || ft->bad_state < 0 || ft->good_state < 0 || (ft->good_state == SRV_MODEL_READY && !ft->job_done))
        return;
    ft->ended = 1;
    uv_close((uv_handle_t *)&ft->watchdog, NULL);
    srv_pool_retire(ft->good);
    srv_pool_retire(ft->bad);
}

static void on_watchdog(uv_timer_t *t) {
    fault_test *ft = t->data;
    ft->timed_out = ft->ended = 1;
    uv_close((uv_handle_t *)t, NULL);
    srv_pool_stop(ft->pool); /* a worker still "loading" is stopped too: the loop can end */
}

static void on_fault_wake(void *ud, srv_member *m) {
    fault_test *ft = ud;
    cm_err err;
    int st = srv_pool_update(m, &err);
    if (st >= 0 && m == ft->bad) {
        ft->bad_state = st;
        if (st == SRV_MODEL_FAILED) snprintf(ft->bad_err, sizeof ft->bad_err, "%s", err.msg);
    }
    if (st >= 0 && m == ft->good) {
        ft->good_state = st;
        if (st == SRV_MODEL_READY) { /* a completion on the model that did load */
            const char *body = "{\"prompt\":[5,6,7,8],\"max_tokens\":3,\"temperature\":0}";
            api_limits lim;
            api_limits_default(&lim);
            api_error e;
            if (api_parse_completion(body, strlen(body), &m->model, &lim, &ft->req, &e) == 0) {
                ft->job.req = &ft->req;
                ft->job.n_choices = 1;
                ft->job.t_arrival_ns = uv_hrtime();
                ft->job.client = 1;
                ft->job.out = &ft->out;
                ft->submitted = srv_sched_submit(m->sched, &ft->job) == 0;
            }
            if (!ft->submitted) ft->job_done = ft->job_error = 1;
        }
    }
    if (m == ft->good && ft->submitted && !ft->job_done)
        for (srv_job *j = srv_sched_take(m->sched), *next; j; j = next) {
            srv_drained info;
            next = srv_sched_drain(m->sched, j, &ft->got, &info);
            ft->generated = ft->got.n_generated;
            if (info.done) {
                ft->job_done = 1;
                ft->job_error = info.has_error;
                api_route_agg_free(&info.routing);
            }
        }
    if (!m->retired) fault_maybe_end(ft);
}

TEST(worker_that_cannot_start_fails_its_load) {
    srv_config cfg = small_config(2);
    uv_loop_t loop;
    ASSERT_EQ_INT(uv_loop_init(&loop), 0);
    fault_test ft;
    memset(&ft, 0, sizeof ft);
    ft.good_state = ft.bad_state = -1;
    ASSERT_EQ_INT(uv_timer_init(&loop, &ft.watchdog), 0);
    ft.watchdog.data = &ft;
    uv_timer_start(&ft.watchdog, on_watchdog, 60000, 0);
    srv_out_init(&ft.out);
    srv_out_init(&ft.got);
    ft.pool = srv_pool_create(&loop, &cfg, on_fault_wake, &ft);
    ASSERT_TRUE(ft.pool != NULL);
    srv_pool_fault_worker_start(ft.pool, "bad");
    char err[256] = "";
    const char *ids[2] = {"good", "bad"};
    srv_member **who[2] = {&ft.good, &ft.bad};
    for (int i = 0; i < 2; i++) {
        srv_model_spec spec;
        srv_model_spec_init(&spec);
        spec.path = strdup(test_fixture("models/qwen2-gqa.gguf"));
        snprintf(spec.id, sizeof spec.id, "%s", ids[i]);
        spec.n_threads = 1;
        ASSERT_EQ_INT(srv_pool_add(ft.pool, &spec, NULL, who[i], err, sizeof err), 0);
        srv_model_spec_free(&spec);
    }
    /* without a wake-up from the worker that never ran, the bad model would stay LOADING: the watchdog
     * ends the wait */
    ASSERT_EQ_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ASSERT_TRUE(!ft.timed_out);
    ASSERT_EQ_INT(ft.bad_state, SRV_MODEL_FAILED);
    ASSERT_TRUE(strstr(ft.bad_err, "engine thread") != NULL);
    ASSERT_EQ_INT(ft.good_state, SRV_MODEL_READY);
    ASSERT_TRUE(ft.submitted && ft.job_done && !ft.job_error);
    ASSERT_TRUE(ft.generated > 0);
    ASSERT_EQ_INT(srv_pool_reap(ft.pool), 2);
    ASSERT_EQ_INT(srv_pool_count(ft.pool), 0);
    ASSERT_EQ_INT(srv_pool_threads_used(ft.pool), 0);
    srv_pool_free(ft.pool);
    api_completion_req_free(&ft.req);
    srv_out_free(&ft.out);
    srv_out_free(&ft.got);
    ASSERT_EQ_INT(uv_loop_close(&loop), 0);
}

int main(void) {
    RUN(unload_freed_after_its_handle_closed);
    RUN(worker_that_cannot_start_fails_its_load);
    return test_summary();
}
