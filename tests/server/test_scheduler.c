/*
 * test_scheduler.c - the engine worker (server/scheduler.c) on a real loop with a fixture model: how it
 * composes its steps when one client floods and another sends one request. What it proves:
 * - a new prompt of a client with fewer open sequences than the flooding one is prefilled in the next
 *   step, in a step of its own: none of the flood's prefill chunks, decodes or drafts share it, although
 *   the flood still has prompt tokens queued;
 * - the flood is not starved: the step after that one carries the flood's rows again;
 * - the composition changes nothing the client sees: the request's text under the flood equals its text
 *   alone (batch invariance), and every flood request completes.
 * The steps are observed through the scheduler's step trace (srv_config.step_trace). The jobs are
 * submitted from inside it (on the worker thread, between steps), so the order of events does not depend
 * on timing: the first flood job from the loop; the other flood jobs in the trace of step 0 (admitted
 * together before step 1); the light job in the trace of step 1, so it is admitted before step 2 beside
 * three flood jobs that still have prompt tokens queued.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "server.h"
#include "test.h"

enum { N_FLOOD = 3, FLOOD_PROMPT = 100, LIGHT_PROMPT = 10, MAX_STEPS = 256, N_BATCH = 64 };
enum { CLIENT_FLOOD = 1, CLIENT_LIGHT = 2 };

typedef struct tjob {
    srv_job job;
    api_completion_req req;
    srv_out out, got;
    char text[512];
    size_t text_len;
    int done, has_error;
} tjob;

/* What one step held: rows of the flood (prefill, decode) and of the light request. */
typedef struct tstep {
    int flood_prefill, flood_decode, light_prefill, light_decode;
} tstep;

typedef struct sched_test {
    uv_loop_t loop;
    srv_config cfg;
    srv_sched *s;
    api_model model;
    tjob flood[N_FLOOD], light, alone;
    int phase;               /* 0: loading; 1: flood + light running; 2: the light prompt alone; 3: stopping */
    int light_submitted;     /* from the trace (worker thread), read by the loop after the jobs are done */
    tstep steps[MAX_STEPS];
    int n_steps;
    int flood_left_at_light; /* flood prompt tokens not yet in a batch when the light prompt started */
    int failed;
} sched_test;

static void job_prepare(sched_test *t, tjob *j, uint64_t client, int n_prompt, int salt) {
    char body[2048];
    int len = snprintf(body, sizeof body, "{\"prompt\":[");
    int n_vocab = cm_model_get_info(t->model.model)->n_vocab;
    for (int k = 0; k < n_prompt; k++)
        len += snprintf(body + len, sizeof body - (size_t)len, "%s%d", k ? "," : "", 3 + (k * 7 + salt * 13) % (n_vocab - 3));
    len += snprintf(body + len, sizeof body - (size_t)len, "],\"max_tokens\":6,\"temperature\":0}");
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    memset(j, 0, sizeof *j);
    if (api_parse_completion(body, (size_t)len, &t->model, &lim, &j->req, &e) < 0) {
        fprintf(stderr, "request: %s\n", e.message);
        t->failed = 1;
        return;
    }
    srv_out_init(&j->out);
    srv_out_init(&j->got);
    j->job.req = &j->req;
    j->job.n_choices = 1;
    j->job.t_arrival_ns = uv_hrtime();
    j->job.client = client;
    j->job.owner = j;
    j->job.out = &j->out;
}

static void job_release(tjob *j) {
    srv_out_free(&j->out);
    srv_out_free(&j->got);
    api_completion_req_free(&j->req);
}

/* Worker thread: records the step; submits the other flood jobs after step 0, the light job after step 1. */
static void on_step(void *ud, const srv_step_row *rows, int n) {
    sched_test *t = ud;
    if (t->phase != 1 || t->n_steps >= MAX_STEPS) return;
    tstep *st = &t->steps[t->n_steps++];
    for (int r = 0; r < n; r++) {
        int light = rows[r].job == &t->light.job, prefill = rows[r].prompt_pos >= 0;
        if (light) ++*(prefill ? &st->light_prefill : &st->light_decode);
        else ++*(prefill ? &st->flood_prefill : &st->flood_decode);
    }
    if (t->n_steps == 1) {
        for (int i = 1; i < N_FLOOD; i++)
            if (srv_sched_submit(t->s, &t->flood[i].job) < 0) t->failed = 1;
    } else if (t->n_steps == 2) {
        int fed = 0;
        for (int s = 0; s < t->n_steps; s++) fed += t->steps[s].flood_prefill;
        t->flood_left_at_light = N_FLOOD * FLOOD_PROMPT - fed;
        t->light_submitted = 1;
        if (srv_sched_submit(t->s, &t->light.job) < 0) t->failed = 1;
    }
}

static int all_done(sched_test *t) {
    if (t->phase == 2) return t->alone.done;
    for (int i = 0; i < N_FLOOD; i++)
        if (!t->flood[i].done) return 0;
    return t->light.done;
}

static void on_wake(void *ud) {
    sched_test *t = ud;
    if (t->phase == 0) {
        cm_err err;
        int n_ctx = 0;
        const cm_model *m = NULL;
        int st = srv_sched_model(t->s, &m, &n_ctx, &err);
        if (st == SRV_MODEL_LOADING) return;
        if (st != SRV_MODEL_READY) {
            fprintf(stderr, "load failed: %s\n", err.msg);
            t->failed = 1;
            t->phase = 3;
            srv_sched_stop(t->s);
            return;
        }
        t->model = (api_model){.model = m, .id = "m", .n_ctx = n_ctx, .n_batch = N_BATCH};
        for (int i = 0; i < N_FLOOD; i++) job_prepare(t, &t->flood[i], CLIENT_FLOOD, FLOOD_PROMPT, i + 1);
        job_prepare(t, &t->light, CLIENT_LIGHT, LIGHT_PROMPT, 0);
        job_prepare(t, &t->alone, CLIENT_LIGHT, LIGHT_PROMPT, 0);
        if (t->failed) { t->phase = 3; srv_sched_stop(t->s); return; }
        t->phase = 1;
        if (srv_sched_submit(t->s, &t->flood[0].job) < 0) t->failed = 1; /* the others: on_step */
        return;
    }
    for (srv_job *j = srv_sched_take(t->s), *next; j; j = next) {
        tjob *tj = j->owner;
        srv_drained info;
        next = srv_sched_drain(t->s, j, &tj->got, &info);
        size_t room = sizeof tj->text - 1 - tj->text_len;
        size_t n = tj->got.text.len < room ? tj->got.text.len : room;
        if (n) memcpy(tj->text + tj->text_len, tj->got.text.data, n);
        tj->text_len += n;
        if (info.done) {
            tj->done = 1;
            tj->has_error = info.has_error;
            api_route_agg_free(&info.routing);
        }
    }
    if (t->phase == 1 && all_done(t)) {
        t->phase = 2; /* the light prompt once more, alone (the prefix cache is off: computed again) */
        if (srv_sched_submit(t->s, &t->alone.job) < 0) t->failed = 1;
    } else if (t->phase == 2 && all_done(t)) {
        t->phase = 3;
        srv_sched_stop(t->s);
    }
}

TEST(light_prompt_steps_alone_ahead_of_flood_prefill) {
    sched_test *t = calloc(1, sizeof *t);
    ASSERT_TRUE(t != NULL);
    t->cfg.n_threads = 1;
    t->cfg.parallel = 4;
    t->cfg.queue = 16;
    t->cfg.n_batch = N_BATCH;
    t->cfg.n_ctx = 256;
    t->cfg.kv_type = CM_KV_F32;
    t->cfg.prefix_cache = 0;
    t->cfg.model_path = test_fixture("models/qwen2-gqa.gguf");
    t->cfg.step_trace = on_step;
    t->cfg.step_trace_ud = t;
    ASSERT_EQ_INT(uv_loop_init(&t->loop), 0);
    t->s = srv_sched_create(&t->loop, &t->cfg, on_wake, t);
    ASSERT_TRUE(t->s != NULL);
    ASSERT_EQ_INT(uv_run(&t->loop, UV_RUN_DEFAULT), 0);
    ASSERT_TRUE(srv_sched_closed(t->s));
    srv_sched_free(t->s);
    ASSERT_EQ_INT(uv_loop_close(&t->loop), 0);
    ASSERT_TRUE(!t->failed);
    ASSERT_EQ_INT(t->phase, 3);
    for (int i = 0; i < N_FLOOD; i++) ASSERT_TRUE(t->flood[i].done && !t->flood[i].has_error);
    ASSERT_TRUE(t->light.done && !t->light.has_error && t->alone.done && !t->alone.has_error);
    /* the light request arrived while the flood still had prompt tokens to feed */
    ASSERT_TRUE(t->light_submitted);
    ASSERT_TRUE(t->flood_left_at_light > N_BATCH);
    int first = -1;
    for (int s = 0; s < t->n_steps && first < 0; s++)
        if (t->steps[s].light_prefill) first = s;
    /* admitted at the step after the one it was submitted in, its whole prompt in that step, alone */
    ASSERT_EQ_INT(first, 2);
    ASSERT_EQ_INT(t->steps[first].light_prefill, LIGHT_PROMPT);
    ASSERT_EQ_INT(t->steps[first].flood_prefill, 0);
    ASSERT_EQ_INT(t->steps[first].flood_decode, 0);
    /* and the flood goes on in the step after */
    ASSERT_TRUE(first + 1 < t->n_steps);
    ASSERT_TRUE(t->steps[first + 1].flood_prefill + t->steps[first + 1].flood_decode > 0);
    /* the same text as alone */
    ASSERT_TRUE(t->light.text_len > 0);
    ASSERT_EQ_INT(t->light.text_len, t->alone.text_len);
    ASSERT_TRUE(!memcmp(t->light.text, t->alone.text, t->light.text_len));
    for (int i = 0; i < N_FLOOD; i++) job_release(&t->flood[i]);
    job_release(&t->light);
    job_release(&t->alone);
    free(t);
}

int main(void) {
    RUN(light_prompt_steps_alone_ahead_of_flood_prefill);
    return test_summary();
}
