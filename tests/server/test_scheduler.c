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
 *
 * Preemption (second test): every slot is held by a flooding client when two other clients each send a
 * request. What it proves:
 * - each newcomer is admitted and prefilled in the very next step: the flooding client's two jobs
 *   admitted last are preempted (they leave the batch), its first keeps running; with --no-preempt
 *   (the same run, as a control) the newcomers wait for a flood job to end;
 * - the preempted jobs resume, oldest preemption first, as soon as the newcomers end, before the
 *   flood's job that was queued all along (no starvation), and every job completes;
 * - a preempted job's text is the text of the same request run alone, greedy and seeded sampling
 *   alike (its KV, sampler and text were kept while it waited);
 * - the preemptions are reported per job (srv_drained.preemptions, what /metrics counts per client).
 * These two run with nested steps off (--no-nested-steps): they prove what happens at a step's boundary,
 * which is where a newcomer goes when its prompt cannot nest (a MoE model, a prompt longer than a
 * nested step).
 *
 * Nested steps (third test): the same preemption scenario with nested steps on; the newcomers arrive
 * during a step's forward pass (submitted from its trace). What it proves:
 * - their prompts run as a nested step inside that step (between two of its layers): the step after
 *   the interrupted one in the trace is nested and holds their whole prompts and nothing else; the
 *   interrupted step held the rows of all three flood jobs, which still got their tokens;
 * - the step after is not a light step: it carries the flood's first job again, beside the newcomers'
 *   decodes (the flood loses no step of its own);
 * - the preemption rules hold as at a boundary: the two flood jobs admitted last were parked once
 *   each and resume before the queued flood job; every text equals its text alone;
 * - with nested steps off (the same run, as a control) no step is nested.
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
    int preemptions;
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

/* sampling: the request's fields after the prompt (max_tokens, temperature, seed). */
static void job_prepare_with(const api_model *model, int *failed, tjob *j, uint64_t client, int n_prompt, int salt,
                             const char *sampling) {
    char body[2048];
    int len = snprintf(body, sizeof body, "{\"prompt\":[");
    int n_vocab = cm_model_get_info(model->model)->n_vocab;
    for (int k = 0; k < n_prompt; k++)
        len += snprintf(body + len, sizeof body - (size_t)len, "%s%d", k ? "," : "", 3 + (k * 7 + salt * 13) % (n_vocab - 3));
    len += snprintf(body + len, sizeof body - (size_t)len, "],%s}", sampling);
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    memset(j, 0, sizeof *j);
    if (api_parse_completion(body, (size_t)len, model, &lim, &j->req, &e) < 0) {
        fprintf(stderr, "request: %s\n", e.message);
        *failed = 1;
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

static void job_prepare(sched_test *t, tjob *j, uint64_t client, int n_prompt, int salt) {
    job_prepare_with(&t->model, &t->failed, j, client, n_prompt, salt, "\"max_tokens\":6,\"temperature\":0");
}

static void job_release(tjob *j) {
    srv_out_free(&j->out);
    srv_out_free(&j->got);
    api_completion_req_free(&j->req);
}

/* Both scenarios' scheduler settings: one thread, a 256-token context, f32 KV, no prefix cache (the
 * alone runs compute everything again), the GQA fixture, the step trace. */
static void test_config(srv_config *cfg, int parallel, srv_step_trace_fn trace, void *ud, int nested) {
    cfg->no_nested = !nested;
    cfg->n_threads = 1;
    cfg->parallel = parallel;
    cfg->queue = 16;
    cfg->n_batch = N_BATCH;
    cfg->n_ctx = 256;
    cfg->kv_type = CM_KV_F32;
    cfg->prefix_cache = 0;
    cfg->model_path = test_fixture("models/qwen2-gqa.gguf");
    cfg->step_trace = trace;
    cfg->step_trace_ud = ud;
}

/* Loop thread, while the model loads: 0 still loading, 1 ready (*model set), -1 failed (*failed set, the
 * scheduler stopped, *phase 3). */
static int wait_model(srv_sched *s, api_model *model, int *failed, int *phase) {
    cm_err err;
    int n_ctx = 0;
    const cm_model *m = NULL;
    int st = srv_sched_model(s, &m, &n_ctx, &err);
    if (st == SRV_MODEL_LOADING) return 0;
    if (st != SRV_MODEL_READY) {
        fprintf(stderr, "load failed: %s\n", err.msg);
        *failed = 1;
        *phase = 3;
        srv_sched_stop(s);
        return -1;
    }
    *model = (api_model){.model = m, .id = "m", .n_ctx = n_ctx, .n_batch = N_BATCH};
    return 1;
}

/* A scheduler on a fresh loop, run until it closes (its wake callback stops it); *s is set while it runs
 * (the callbacks use it), the gauges copied at the end when g is given. Returns 0, or -1 on any failure. */
static int sched_run(uv_loop_t *loop, const srv_config *cfg, srv_sched **s, srv_sched_wake_fn wake, void *ud,
                     srv_gauges *g) {
    if (uv_loop_init(loop)) return -1;
    if (!(*s = srv_sched_create(loop, cfg, wake, ud))) return -1;
    if (uv_run(loop, UV_RUN_DEFAULT) || !srv_sched_closed(*s)) return -1;
    if (g) srv_sched_stats(*s, g, NULL, NULL, NULL, NULL);
    srv_sched_free(*s);
    return uv_loop_close(loop) ? -1 : 0;
}

/* Loop thread: every job with output is drained into its tjob (text, preemptions, done). */
static void drain_jobs(srv_sched *s) {
    for (srv_job *j = srv_sched_take(s), *next; j; j = next) {
        tjob *tj = j->owner;
        srv_drained info;
        next = srv_sched_drain(s, j, &tj->got, &info);
        size_t room = sizeof tj->text - 1 - tj->text_len;
        size_t n = tj->got.text.len < room ? tj->got.text.len : room;
        if (n) memcpy(tj->text + tj->text_len, tj->got.text.data, n);
        tj->text_len += n;
        tj->preemptions = info.preemptions;
        if (info.done) {
            tj->done = 1;
            tj->has_error = info.has_error;
            api_route_agg_free(&info.routing);
        }
    }
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
        if (wait_model(t->s, &t->model, &t->failed, &t->phase) <= 0) return;
        for (int i = 0; i < N_FLOOD; i++) job_prepare(t, &t->flood[i], CLIENT_FLOOD, FLOOD_PROMPT, i + 1);
        job_prepare(t, &t->light, CLIENT_LIGHT, LIGHT_PROMPT, 0);
        job_prepare(t, &t->alone, CLIENT_LIGHT, LIGHT_PROMPT, 0);
        if (t->failed) { t->phase = 3; srv_sched_stop(t->s); return; }
        t->phase = 1;
        if (srv_sched_submit(t->s, &t->flood[0].job) < 0) t->failed = 1; /* the others: on_step */
        return;
    }
    drain_jobs(t->s);
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
    test_config(&t->cfg, 4, on_step, t, 0);
    ASSERT_EQ_INT(sched_run(&t->loop, &t->cfg, &t->s, on_wake, t, NULL), 0);
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

/* ---------------------------------------------------------------- preemption */

/* jobs[0..P_FLOOD): the flooding client's (3 admitted, the 4th queued behind them); then the two
 * newcomers, each a client of its own */
enum { P_FLOOD = 4, P_JOBS = 6, P_PARALLEL = 3, P_FLOOD_PROMPT = 20, P_NEW_PROMPT = 10, P_ARRIVE = 3 };
enum { CLIENT_OTHER = 3 };

typedef struct pre_test {
    uv_loop_t loop;
    srv_config cfg;
    srv_sched *s;
    api_model model;
    tjob jobs[P_JOBS], alone[P_JOBS];
    int phase;               /* 0: loading; 1: the run; 2: each request alone (n_alone so far); 3: stopping */
    int n_alone;
    int rows[MAX_STEPS][P_JOBS], prefill[MAX_STEPS][P_JOBS];
    int nested[MAX_STEPS];   /* the step ran nested inside the one before it */
    int n_steps;
    int failed;
    srv_gauges gauges;       /* at the end of the run (codemoe_nested_steps_total's count) */
} pre_test;

static const char *pre_sampling(int i) {
    switch (i) {
    case 2: return "\"max_tokens\":24,\"temperature\":1,\"seed\":7"; /* seeded sampling, preempted */
    case 3: return "\"max_tokens\":8,\"temperature\":0";
    case 4: case 5: return "\"max_tokens\":6,\"temperature\":0";
    default: return "\"max_tokens\":24,\"temperature\":0";
    }
}

/* Worker thread: records the step; submits the rest of the flood after step 0, the newcomers after step
 * P_ARRIVE - 1 (so they are admitted, or not, before step P_ARRIVE). */
static void pre_on_step(void *ud, const srv_step_row *rows, int n) {
    pre_test *t = ud;
    if (t->phase != 1 || t->n_steps >= MAX_STEPS) return;
    int s = t->n_steps++;
    t->nested[s] = n > 0 && rows[0].nested;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < P_JOBS; k++)
            if (rows[r].job == &t->jobs[k].job) {
                t->rows[s][k]++;
                t->prefill[s][k] += rows[r].prompt_pos >= 0;
            }
    if (t->n_steps == 1) {
        for (int k = 1; k < P_FLOOD; k++)
            if (srv_sched_submit(t->s, &t->jobs[k].job) < 0) t->failed = 1;
    } else if (t->n_steps == P_ARRIVE) {
        for (int k = P_FLOOD; k < P_JOBS; k++)
            if (srv_sched_submit(t->s, &t->jobs[k].job) < 0) t->failed = 1;
    }
}

static void pre_on_wake(void *ud) {
    pre_test *t = ud;
    if (t->phase == 0) {
        if (wait_model(t->s, &t->model, &t->failed, &t->phase) <= 0) return;
        for (int k = 0; k < P_JOBS; k++) {
            uint64_t client = k < P_FLOOD ? CLIENT_FLOOD : k == P_FLOOD ? CLIENT_LIGHT : CLIENT_OTHER;
            int n_prompt = k < P_FLOOD ? P_FLOOD_PROMPT : P_NEW_PROMPT;
            job_prepare_with(&t->model, &t->failed, &t->jobs[k], client, n_prompt, k + 1, pre_sampling(k));
            job_prepare_with(&t->model, &t->failed, &t->alone[k], client, n_prompt, k + 1, pre_sampling(k));
        }
        if (t->failed) { t->phase = 3; srv_sched_stop(t->s); return; }
        t->phase = 1;
        if (srv_sched_submit(t->s, &t->jobs[0].job) < 0) t->failed = 1; /* the others: pre_on_step */
        return;
    }
    drain_jobs(t->s);
    int all = 1;
    for (int k = 0; k < P_JOBS; k++) all &= t->jobs[k].done;
    if (t->phase == 1 && all) t->phase = 2;
    if (t->phase == 2 && (t->n_alone == 0 || t->alone[t->n_alone - 1].done)) {
        if (t->n_alone == P_JOBS) { /* every request once more, alone, one after the other */
            t->phase = 3;
            srv_sched_stop(t->s);
        } else if (srv_sched_submit(t->s, &t->alone[t->n_alone++].job) < 0) {
            t->failed = 1;
        }
    }
}

/* Runs the scenario on a fresh scheduler; the caller checks t. */
static void pre_release(pre_test *t) {
    for (int k = 0; k < P_JOBS; k++) {
        job_release(&t->jobs[k]);
        job_release(&t->alone[k]);
    }
    free(t);
}

static int pre_run(pre_test *t, int no_preempt, int nested) {
    test_config(&t->cfg, P_PARALLEL, pre_on_step, t, nested);
    t->cfg.no_preempt = no_preempt;
    return sched_run(&t->loop, &t->cfg, &t->s, pre_on_wake, t, &t->gauges);
}

/* A whole run (the flood and newcomers, then each request alone) that went through without a failure,
 * every request done without an error; NULL otherwise. */
static pre_test *pre_finished(int no_preempt, int nested) {
    pre_test *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    int ok = pre_run(t, no_preempt, nested) == 0 && !t->failed && t->phase == 3;
    for (int k = 0; k < P_JOBS && ok; k++) ok = t->jobs[k].done && !t->jobs[k].has_error && t->alone[k].done;
    if (!ok) {
        pre_release(t);
        return NULL;
    }
    return t;
}

/* The first step at or after `from` with rows of job k (or prefill rows, prefill 1); -1: none. */
static int pre_first(const pre_test *t, int k, int from, int prefill) {
    for (int s = from; s < t->n_steps; s++)
        if (prefill ? t->prefill[s][k] : t->rows[s][k]) return s;
    return -1;
}

TEST(preemption_admits_newcomers_next_step_and_resumes_exactly) {
    pre_test *t = pre_finished(0, 0);
    ASSERT_TRUE(t != NULL);
    /* every flood job admitted is running when the newcomers arrive */
    for (int k = 0; k < P_PARALLEL; k++) ASSERT_TRUE(t->rows[P_ARRIVE - 1][k] > 0);
    /* the newcomers: their whole prompts in the next step, beside the flood's first job only */
    for (int k = P_FLOOD; k < P_JOBS; k++) {
        ASSERT_EQ_INT(pre_first(t, k, 0, 1), P_ARRIVE);
        ASSERT_EQ_INT(t->prefill[P_ARRIVE][k], P_NEW_PROMPT);
    }
    ASSERT_TRUE(t->rows[P_ARRIVE][0] > 0);
    ASSERT_EQ_INT(t->rows[P_ARRIVE][1] + t->rows[P_ARRIVE][2], 0);
    /* the two flood jobs admitted last were preempted, once each, and paused while the newcomers ran */
    ASSERT_EQ_INT(t->jobs[0].preemptions, 0);
    ASSERT_EQ_INT(t->jobs[1].preemptions, 1);
    ASSERT_EQ_INT(t->jobs[2].preemptions, 1);
    for (int k = 3; k < P_JOBS; k++) ASSERT_EQ_INT(t->jobs[k].preemptions, 0);
    int r1 = pre_first(t, 1, P_ARRIVE, 0), r2 = pre_first(t, 2, P_ARRIVE, 0), q3 = pre_first(t, 3, 0, 0);
    ASSERT_TRUE(r1 > P_ARRIVE && r2 > P_ARRIVE && q3 > 0);
    for (int k = P_FLOOD; k < P_JOBS; k++) ASSERT_TRUE(pre_first(t, k, r2 < r1 ? r2 : r1, 0) < 0); /* after they end */
    /* they resume, the one preempted first (2) no later, before the flood's queued job starts */
    ASSERT_TRUE(r2 <= r1);
    ASSERT_TRUE(r1 < q3 && r2 < q3);
    /* every text is the text of the same request alone (greedy: 0, 1, 3, 4, 5; seeded sampling: 2) */
    for (int k = 0; k < P_JOBS; k++) {
        ASSERT_TRUE(t->jobs[k].text_len > 0);
        ASSERT_EQ_INT(t->jobs[k].text_len, t->alone[k].text_len);
        ASSERT_TRUE(!memcmp(t->jobs[k].text, t->alone[k].text, t->jobs[k].text_len));
    }
    pre_release(t);
}

/* The control: the same run with --no-preempt. The newcomers wait for a flood job to end, so the test
 * above checks something preemption does. */
TEST(no_preempt_newcomers_wait_for_a_slot) {
    pre_test *t = pre_finished(1, 0);
    ASSERT_TRUE(t != NULL);
    for (int k = 0; k < P_JOBS; k++) ASSERT_EQ_INT(t->jobs[k].preemptions, 0);
    for (int k = P_FLOOD; k < P_JOBS; k++) ASSERT_TRUE(pre_first(t, k, 0, 1) > P_ARRIVE + 4);
    pre_release(t);
}

/* The newcomers arrive during step P_ARRIVE - 1's forward pass (its trace runs just before it). */
TEST(newcomers_run_nested_inside_the_running_step) {
    pre_test *t = pre_finished(0, 1);
    ASSERT_TRUE(t != NULL);
    /* the interrupted step: every admitted flood job, no newcomer */
    const int in = P_ARRIVE - 1, ns = P_ARRIVE;
    ASSERT_TRUE(!t->nested[in]);
    for (int k = 0; k < P_PARALLEL; k++) ASSERT_TRUE(t->rows[in][k] > 0);
    for (int k = P_FLOOD; k < P_JOBS; k++) ASSERT_EQ_INT(t->rows[in][k], 0);
    /* nested inside it: the newcomers' whole prompts, nothing else */
    ASSERT_TRUE(t->nested[ns]);
    for (int k = 0; k < P_FLOOD; k++) ASSERT_EQ_INT(t->rows[ns][k], 0);
    for (int k = P_FLOOD; k < P_JOBS; k++) {
        ASSERT_EQ_INT(pre_first(t, k, 0, 0), ns);
        ASSERT_EQ_INT(t->prefill[ns][k], P_NEW_PROMPT);
        ASSERT_EQ_INT(t->rows[ns][k], P_NEW_PROMPT);
    }
    /* the next step is the flood's too: its first job beside the newcomers' decodes */
    ASSERT_TRUE(!t->nested[ns + 1]);
    ASSERT_TRUE(t->rows[ns + 1][0] > 0);
    for (int k = P_FLOOD; k < P_JOBS; k++) ASSERT_EQ_INT(t->rows[ns + 1][k], 1);
    for (int s = ns + 1; s < t->n_steps; s++) ASSERT_TRUE(!t->nested[s]);
    ASSERT_EQ_INT((int)t->gauges.nested_steps, 1); /* codemoe_nested_steps_total */
    /* preemption as at a boundary: the two admitted last, once each; they resume before the queued job */
    ASSERT_EQ_INT(t->jobs[0].preemptions, 0);
    ASSERT_EQ_INT(t->jobs[1].preemptions, 1);
    ASSERT_EQ_INT(t->jobs[2].preemptions, 1);
    for (int k = 3; k < P_JOBS; k++) ASSERT_EQ_INT(t->jobs[k].preemptions, 0);
    ASSERT_EQ_INT(t->rows[ns + 1][1] + t->rows[ns + 1][2], 0);
    int r1 = pre_first(t, 1, ns, 0), r2 = pre_first(t, 2, ns, 0), q3 = pre_first(t, 3, 0, 0);
    ASSERT_TRUE(r1 > ns && r2 > ns && q3 > 0 && r1 < q3 && r2 < q3);
    for (int k = 0; k < P_JOBS; k++) {
        ASSERT_TRUE(t->jobs[k].text_len > 0);
        ASSERT_EQ_INT(t->jobs[k].text_len, t->alone[k].text_len);
        ASSERT_TRUE(!memcmp(t->jobs[k].text, t->alone[k].text, t->jobs[k].text_len));
    }
    pre_release(t);
    /* the control: nested steps off, nothing nests */
    t = pre_finished(0, 0);
    ASSERT_TRUE(t != NULL);
    for (int s = 0; s < t->n_steps; s++) ASSERT_TRUE(!t->nested[s]);
    ASSERT_EQ_INT((int)t->gauges.nested_steps, 0);
    pre_release(t);
}

/* ---------------------------------------------------------------- prompt order */

/* One client (no light steps), nested steps and speculation off. Job 0 (W) decodes throughout; the
 * others are submitted from a step's trace (at[k]: the step after whose planning job k arrives), so they
 * join the next step. A scenario: its prompts, the steps they arrive at, and whose arrival time is set
 * back (an old request, e.g. one that waited in the queue). */
enum { O_JOBS_MAX = 4 };

typedef struct order_test {
    uv_loop_t loop;
    srv_config cfg;
    srv_sched *s;
    api_model model;
    int n_jobs;
    const int *prompt, *at;
    int aged;                    /* this job's arrival is set one second back; -1: none */
    tjob jobs[O_JOBS_MAX];
    int phase; /* 0: loading; 1: the run; 3: stopping */
    int prefill[MAX_STEPS][O_JOBS_MAX];
    int n_steps;
    int failed;
} order_test;

static void order_on_step(void *ud, const srv_step_row *rows, int n) {
    order_test *t = ud;
    if (t->phase != 1 || t->n_steps >= MAX_STEPS) return;
    int s = t->n_steps++;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < t->n_jobs; k++)
            if (rows[r].job == &t->jobs[k].job && rows[r].prompt_pos >= 0) t->prefill[s][k]++;
    for (int k = 1; k < t->n_jobs; k++)
        if (t->at[k] == s) {
            if (k == t->aged) t->jobs[k].job.t_arrival_ns = uv_hrtime() - 1000000000u;
            if (srv_sched_submit(t->s, &t->jobs[k].job) < 0) t->failed = 1;
        }
}

static void order_on_wake(void *ud) {
    order_test *t = ud;
    if (t->phase == 0) {
        if (wait_model(t->s, &t->model, &t->failed, &t->phase) <= 0) return;
        for (int k = 0; k < t->n_jobs; k++)
            job_prepare_with(&t->model, &t->failed, &t->jobs[k], CLIENT_FLOOD, t->prompt[k], k + 1,
                             k == 0 ? "\"max_tokens\":24,\"temperature\":0" : "\"max_tokens\":4,\"temperature\":0");
        if (t->failed) { t->phase = 3; srv_sched_stop(t->s); return; }
        t->phase = 1;
        if (srv_sched_submit(t->s, &t->jobs[0].job) < 0) t->failed = 1;
        return;
    }
    drain_jobs(t->s);
    int all = 1;
    for (int k = 0; k < t->n_jobs; k++) all &= t->jobs[k].done;
    if (t->phase == 1 && all) {
        t->phase = 3;
        srv_sched_stop(t->s);
    }
}

/* Runs a scenario to the end: every job done with text, step 0 W's prompt alone. NULL on failure. */
static order_test *order_run(int n_jobs, const int *prompt, const int *at, int aged) {
    order_test *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->n_jobs = n_jobs, t->prompt = prompt, t->at = at, t->aged = aged;
    test_config(&t->cfg, 4, order_on_step, t, 0);
    int ok = sched_run(&t->loop, &t->cfg, &t->s, order_on_wake, t, NULL) == 0 && !t->failed && t->phase == 3 &&
             t->n_steps > 3 && t->prefill[0][0] == prompt[0];
    for (int k = 0; k < n_jobs; k++) {
        ok = ok && t->jobs[k].done && !t->jobs[k].has_error && t->jobs[k].text_len > 0;
        job_release(&t->jobs[k]);
    }
    if (!ok) {
        free(t);
        return NULL;
    }
    return t;
}

/* B and A arrive together, C a step later. Step 1: B's prompt fits whole, A's does not and a chunk of it
 * fills the step. Step 2: A's rest (shorter, and waiting longer) before C, whose last rows go to step 3:
 * a prompt whose chunk filled a step is not the one that waits. */
TEST(started_prompt_finishes_before_later_ones) {
    enum { W, B, A, C };
    static const int prompt[] = {8, 30, 60, 40}, at[] = {-1, 0, 0, 1};
    order_test *t = order_run(4, prompt, at, -1);
    ASSERT_TRUE(t != NULL);
    /* step 1: W's decode, B whole, a chunk of A filling the batch */
    ASSERT_EQ_INT(t->prefill[1][B], prompt[B]);
    const int chunk = N_BATCH - 1 - prompt[B];
    ASSERT_EQ_INT(t->prefill[1][A], chunk);
    ASSERT_EQ_INT(t->prefill[1][C], 0);
    /* step 2 (two decodes): A's rest first, then as much of C as fits; C's last rows in step 3 */
    ASSERT_EQ_INT(t->prefill[2][A], prompt[A] - chunk);
    ASSERT_EQ_INT(t->prefill[2][C], N_BATCH - 2 - (prompt[A] - chunk));
    ASSERT_EQ_INT(t->prefill[3][C], prompt[C] - t->prefill[2][C]);
    free(t);
}

/* The burst of the next two tests: L, S and T arrive together, L first, while W decodes. */
enum { W, L, S, T };
static const int prompt[] = {8, 50, 10, 12}, at[] = {-1, 0, 0, 0};

/* Shortest first: S and T whole in step 1 (their first tokens come out of it), a chunk of L fills the
 * rest and L's last rows follow in step 2. In arrival order L and S would have taken step 1 and T only
 * a chunk of it. */
TEST(shortest_prompt_first_in_a_burst) {
    order_test *t = order_run(4, prompt, at, -1);
    ASSERT_TRUE(t != NULL);
    ASSERT_EQ_INT(t->prefill[1][S], prompt[S]);
    ASSERT_EQ_INT(t->prefill[1][T], prompt[T]);
    ASSERT_EQ_INT(t->prefill[1][L], N_BATCH - 1 - prompt[S] - prompt[T]);
    ASSERT_EQ_INT(t->prefill[2][L], prompt[L] - t->prefill[1][L]);
    free(t);
}

/* The same burst, but L arrived a second ago (it waited in the queue): its wait outweighs its length,
 * so it goes whole into step 1 before the short ones; S fits beside it, T gets the chunk left. */
TEST(long_waiting_prompt_goes_before_shorter_newcomers) {
    order_test *t = order_run(4, prompt, at, L);
    ASSERT_TRUE(t != NULL);
    ASSERT_EQ_INT(t->prefill[1][L], prompt[L]);
    ASSERT_EQ_INT(t->prefill[1][S], prompt[S]);
    ASSERT_EQ_INT(t->prefill[1][T], N_BATCH - 1 - prompt[L] - prompt[S]);
    ASSERT_EQ_INT(t->prefill[2][T], prompt[T] - t->prefill[1][T]);
    free(t);
}

int main(void) {
    RUN(light_prompt_steps_alone_ahead_of_flood_prefill);
    RUN(preemption_admits_newcomers_next_step_and_resumes_exactly);
    RUN(no_preempt_newcomers_wait_for_a_slot);
    RUN(newcomers_run_nested_inside_the_running_step);
    RUN(started_prompt_finishes_before_later_ones);
    RUN(shortest_prompt_first_in_a_burst);
    RUN(long_waiting_prompt_goes_before_shorter_newcomers);
    return test_summary();
}
