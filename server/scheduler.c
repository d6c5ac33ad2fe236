/*
 * scheduler.c - the engine worker thread: continuous batching of every running request into one
 * cm_forward per step, over a fixed budget of KV blocks shared with a prefix cache.
 *
 * The worker owns the model load, the cm_ctx (KV cache), the samplers and the batch. Each step:
 *   1. take new submissions; end cancelled jobs (their sequences are closed, so their KV blocks are
 *      free before this step's forward pass);
 *   2. admit waiting jobs in fair order (fairq.h: one queue per client, served fairly by tokens, so a
 *      client's single request waits at most one turn behind another client's burst) while sequence
 *      slots AND KV blocks remain. Admission reserves:
 *      a job's prompt leaders are opened and mapped onto the longest cached prefix
 *      (cm_seq_attach_prefix), then the blocks every sequence still needs to reach prompt + max_tokens
 *      must be covered by the pool's available blocks minus what running sequences have reserved
 *      but not taken yet. A job that does not fit is undone and waits at the head of the queue (so
 *      big requests are not starved); one that could not fit into an empty pool fails at once. So
 *      cm_forward never runs out of blocks, and no sequence ever loses its KV. Preemption (below)
 *      only takes slots: when every slot is held and a client with nothing admitted has a request
 *      waiting, a job of the client holding the most slots is parked to make room for it;
 *   3. build one batch: first one decode token for every generating sequence; then the extra work,
 *      until n_batch tokens, fewer while sequences decode and --max-itl-ms bounds the step's predicted
 *      time (chunked prefill: a long prompt never stalls the running streams), in this order:
 *      prompts whose rest fits whole, shortest first (prefill_order: the tokens left less what the
 *      prompt's wait since arrival is worth in prefill tokens, so a long prompt is not starved), then
 *      draft tokens (below), then the chunks of the other prompts in the same order (prefill-first: a
 *      short request's first token does not wait behind a long prompt's chunks or other streams'
 *      drafts, and in a burst the short prompts are answered first). Fairness within the step (step_plan): when a client with fewer
 *      open sequences than the busiest client has a prompt that has not started (a typist beside a
 *      flood), the step is a light step: only the lighter clients' rows go in, so that prompt's first
 *      token costs one step of its own instead of a step shared with the flood's decodes and prefills;
 *      never two light steps in a row, so the busiest client still gets every other step at least;
 *   4. cm_forward (a newcomer's prompt may run as a nested step inside it, below), then sample every
 *      sequence whose last token was in the batch and hand the token to
 *      its choice's api_choice_state (text, stop strings, end-of-generation, max_tokens, context
 *      limit, finish reason all live there);
 *   5. publish the new text/tokens into each job's outbox under the lock and wake the loop.
 * Choices of one prompt (n > 1): the first (the leader) prefills; the others wait without a sequence
 * and, when the leader's last prompt token has its logits, fork it (cm_seq_fork shares its blocks)
 * and sample from the same logits row with their own samplers.
 *
 * Preemption (on unless --no-preempt). A slot (--parallel) is a place in the batch; the KV memory is the
 * separate block pool, reserved per job at admission. So a preempted job keeps its sequences, their KV
 * blocks, its reservation, samplers and text: it is parked (out of `running`, its slots given back) and
 * resumes exactly where it stopped; its stream just pauses, and its tokens are those of a run that was
 * never preempted (a row's logits do not depend on the batch; its sampler's state is untouched). The
 * engine context therefore has room for 2 x parallel sequences (the KV pool stays parallel x ctx
 * unless --kv-size says otherwise); parked slots are bounded by parallel. The rules (preempt_for):
 *   - who triggers it: the first waiting job (in the fair queue's walk) of a client that has no job
 *     running or parked, when the slots free are fewer than its choices. Parked jobs never trigger it,
 *     so two clients cannot take a slot back and forth; one client alone never preempts;
 *   - whom it takes from: the client holding the most slots, and only while it holds more than the
 *     newcomer needs (a preemption never leaves the victim with fewer slots than the newcomer gets);
 *     of its jobs, the one admitted or resumed last that has made progress since (bounded churn: a job
 *     is never preempted again before it has fed or generated a token since it was admitted or resumed,
 *     and it resumes as soon as its slots are free, before any queued job);
 *   - resumption: parked jobs resume, oldest first, before anything is admitted from the fair queue
 *     (a parked job is ahead of its client's queued ones, and of everyone's: no starvation); the
 *     newcomer whose turn it was not yet is charged by the fair queue as if it were (srv_fairq_pop).
 *
 * Nested steps (dense models, unless --no-nested-steps). A request that arrives while a step's forward
 * pass runs would wait for the rest of it (the flood's decodes, a few ms; a prefill chunk, more) before
 * even being admitted. Instead the step's forward calls step_yield after each layer and each slice of
 * the output head (cm_batch.yield; a small model's decode step is mostly its output head);
 * when something was submitted meanwhile and a client with nothing running or parked is waiting, it is
 * admitted right there by the boundary's own rules (preempt_for: slots, the KV reservation, the victim
 * and churn rules; with a slot free, only if it is the fair queue's next job and nothing is parked),
 * and its prompt, if it has not started and fits SRV_NEST_MAX tokens whole, runs as a nested step: a
 * cm_forward of its rows alone on the same context (the engine keeps a second set of the per-batch
 * state), sampled and published at once; then the interrupted step goes on from its next layer. So the
 * newcomer's first token costs its own prefill plus at most one layer of the running step, not the rest
 * of that step. What stays true: a nested step holds only sequences that are not in the running batch,
 * and a row's logits do not depend on its batch, so every token is the token of a run without nesting
 * (exact; a job parked by it still gets the token of the interrupted step's row); at most one nested
 * step per step, and the busy client's step always completes (no starvation: the flood loses the
 * nested step's time, as it would lose a light step, and the newcomer's prompt has started, so the
 * next step is not a light step). Anything that does not nest (a MoE model, a longer prompt, a
 * newcomer that must wait for a slot) goes through the boundary as before.
 *
 * Prompt-lookup speculation (--spec-draft K): a greedy choice whose text repeats its context (code
 * completion copies identifiers, lines, whole blocks) drafts up to K tokens per step: the tokens that
 * followed the latest earlier occurrence of its last few tokens (prompt and output). They go into the
 * batch behind its decode token, each with logits; after the forward the sampler runs on the rows in
 * order, exactly as it would have one step at a time, and the choice keeps every draft token the
 * sampler reproduced plus the sampler's own next token; cm_seq_truncate forgets the rest. This is
 * exact because a row's logits do not depend on what else is in the batch (docs/engine.md, batch
 * invariance) and the sampler sees the same logits in the same order. Only dense models speculate:
 * a hybrid or MoLE sequence's routing state can be rolled back only to a block end, and a MoE's
 * routing statistics (the completion's routing record, the expert load in /metrics) count every
 * token its experts ran, so rejected drafts would show there.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"

/* ============================================================ small containers */

int srv_tokvec_push(srv_tokvec *v, const srv_tok *t) {
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 16;
        srv_tok *p = realloc(v->v, (size_t)cap * sizeof *p);
        if (!p) return -1;
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = *t;
    return 0;
}

void srv_tokvec_free(srv_tokvec *v) {
    free(v->v);
    v->v = NULL;
    v->n = v->cap = 0;
}

void srv_out_init(srv_out *o) {
    memset(o, 0, sizeof *o);
    srv_buf_init(&o->text, 0);
}

void srv_out_free(srv_out *o) {
    srv_buf_free(&o->text);
    srv_tokvec_free(&o->toks);
    srv_tokvec_free(&o->prompt_toks);
}

void srv_out_clear(srv_out *o) {
    o->text.len = 0;
    o->text.failed = 0;
    o->toks.n = 0;
    o->prompt_toks.n = 0;
    o->finish = API_FINISH_NONE;
    o->stop_hit = -1;
    o->ended = 0;
    o->n_generated = 0;
}

/* ============================================================ state */

/* SEQ_FORK: a choice waiting (without a sequence) for its prompt leader's last prompt token */
enum { SEQ_PREFILL = 0, SEQ_DECODE, SEQ_ENDED, SEQ_FORK };

typedef struct sched_seq {
    srv_job *job;
    int choice;
    const api_prompt *prompt;
    int seq;              /* cm sequence id; -1 before it is opened (or forked) and once closed */
    int slot;             /* holds one of the --parallel sequence slots (a waiting fork holds one too) */
    int n_follow;         /* prompt leader: choices after it that fork it (SEQ_FORK) */
    int target;           /* positions the sequence may reach: prompt + max_tokens (<= n_ctx) */
    int fork_blocks;      /* SEQ_FORK: blocks its fork and growth will take (reserved at admission) */
    cm_sampler *smp;
    int state;
    int n_fed;            /* prompt tokens already in the KV cache (or in this step's batch) */
    int32_t next_tok;     /* SEQ_DECODE: the sampled token to feed next */
    api_choice_state ch;  /* the choice's text and finish; what it has taken is in the outbox */
    srv_tokvec pending;   /* tokens generated, not yet in the outbox (logprobs only) */
    srv_tokvec prompt_lp; /* echo && logprobs: the prompt's token logprobs */
    int ended_published;
    uint64_t t_last_ns;
    /* speculation (hist != NULL: this choice speculates) */
    int32_t *hist;        /* (hist_cap) prompt and generated tokens, the last one = next_tok */
    int n_hist, hist_cap;
    int prefill_started;  /* has had prompt rows in a batch (step_plan's light steps look for the others) */
    double pf_key;        /* prefill_order's key this step */
    int n_draft;          /* draft tokens in this step's batch (after next_tok) */
    int draft_row;        /* batch row of the first of them */
    int32_t draft[SRV_SPEC_DRAFT_MAX];
} sched_seq;

typedef struct sched_jobstate {
    sched_seq *seqs;      /* (n_choices) */
    int n_open;           /* choices not ended */
    int dirty;            /* has something to publish */
    int in_batch;         /* has rows in the current batch */
    int64_t t_first_ns;   /* first token of any choice (copied to the job when published) */
    api_route_agg agg;    /* routing statistics of the job's finished sequences */
    int failed;           /* fail_err ends the job after this step's sampling */
    api_error fail_err;
    int parked;           /* preempted: in srv_sched.parked, its slots counted in seqs_parked */
    int preemptions;      /* times it was parked (published to srv_job.preemptions) */
    uint64_t turn;        /* when it was admitted or last resumed (srv_sched.turns) */
    int64_t mark;         /* job_progress then: it may be preempted once it has moved past it */
} sched_jobstate;

/* What a batch row is for. */
enum { ROW_DECODE = -1, ROW_DRAFT = -2 };
typedef struct sched_row {
    sched_seq *sq;
    int prompt_pos;       /* >= 0: prompt position of this token (prefill); ROW_DECODE, ROW_DRAFT */
    int sample;           /* sample the next token from this row's logits */
} sched_row;

struct srv_sched {
    const srv_config *cfg;
    uv_loop_t *loop;
    uv_async_t async;
    srv_sched_wake_fn wake;
    void *wake_ud;
    uv_thread_t thread;
    int thread_started;
    int closed;           /* loop thread: async's close callback has run (srv_sched_closed) */

    uv_mutex_t mu;        /* guards everything below up to the worker-private part */
    uv_cond_t cv;
    int stopping;
    int model_state;
    cm_err load_err;
    srv_job *submit_head, *submit_tail;
    srv_job *ready_head;
    srv_gauges gauges;
    api_route_agg load_pub;           /* copy of `load` for /metrics */
    srv_hist ttft, itl;
    uint64_t generated, prompt;

    /* ---- set once by the worker before model_state = READY (published under mu) */
    cm_model *model;
    int n_ctx;

    /* ---- worker-private */
    cm_ctx *ctx;
    const cm_model_info *info;
    srv_fairq *waitq;                 /* submitted, not admitted (created with the scheduler) */
    srv_job **running;                /* (parallel) admitted jobs */
    int n_running;
    int seqs_used;                    /* slots held by the running jobs */
    srv_job **parked;                 /* (parallel) preempted jobs, oldest first */
    int n_parked;
    int seqs_parked;                  /* slots the parked jobs give back when they resume (<= parallel) */
    uint64_t turns;                   /* admissions and resumptions so far (sched_jobstate.turn) */
    uint64_t l_preemptions;
    uint64_t l_nested;                /* nested steps run (step_yield) */
    int32_t *b_tok, *b_seq;           /* (n_batch) */
    int8_t *b_logits;                 /* (n_batch) */
    int8_t *b_gen;                    /* (n_batch) 1: a generated token (routing statistics) */
    sched_row *rows;                  /* (n_batch) */
    cm_sampler **smp_free;            /* (parallel) idle samplers, made at load: a vocabulary-sized sampler
                                         costs more to create (clearing its arrays) than a short request's
                                         prefill */
    int n_smp_free;
    cm_token_logprob top[CM_LOGPROBS_MAX];
    /* worker-local copies of the histograms, merged under the lock at publish time */
    srv_hist l_ttft, l_itl;
    uint64_t l_generated, l_prompt, l_steps, l_batch_tokens;
    uint64_t l_prompt_computed, l_prefix_query, l_prefix_hit, l_kv_check_errors;
    uint64_t l_spec_drafted, l_spec_accepted;
    int spec_model;                   /* the model's kind can speculate (dense) */
    api_route_agg load;               /* expert load over every finished sequence */
    int load_dirty;
    int blocks_total;                 /* KV pool size in blocks */
    /* --max-itl-ms: a step's time is predicted as base + prefill tokens x per_tok (EWMAs, ns; 0 until
     * measured): base from steps without prefill, per_tok from the rest */
    double base_ns, per_tok_ns;
    int kv_check;                     /* run cm_ctx_kv_check after every step */
    int step_delay_ms;                /* CODEMOE_SERVE_STEP_DELAY_MS (tests): sleep before each forward */
    srv_hist l_step_tokens;           /* tokens per forward pass */
    int *a_seq, *a_got;               /* (parallel) job_admit scratch: sequence ids, positions reused */
    srv_job **a_vic;                  /* (parallel) preempt_for scratch: the jobs it parked */
    int *r_load;                      /* (parallel) step scratch: open sequences of running[i]'s client */
    sched_seq **p_order;              /* (parallel) step scratch: the prompts to feed, in prefill_order's order */
    int *g_rows;                      /* (n_batch) step scratch: the rows greedy samplers take (step_greedy) */
    int32_t *g_tok;                   /* (n_batch) their tokens by row, -1 for the other rows */
    int32_t *g_out;                   /* (n_batch) cm_logits_argmax's results, in g_rows' order */
    int prev_light;                   /* the last step was a light step (step_plan) */
    srv_step_row *trace;              /* (n_batch) cfg->step_trace's rows (tests); NULL without one */
    /* nested steps (the file's opening comment): on for dense models unless --no-nested-steps */
    int nest_on, nest_max;            /* nest_max: tokens of a nested step at most (SRV_NEST_MAX, n_batch) */
    atomic_int submitted;             /* the submit list is not empty (set under mu, read by step_yield) */
    int nest_done;                    /* the step in flight has had its nested step */
    uint64_t nest_turn;               /* s->turns when the step in flight began: later turns are its newcomers */
    int32_t *n_tok, *n_seq;           /* (SRV_NEST_MAX) the nested step's batch; swapped with b_tok.. rows */
    int8_t *n_logits, *n_gen;
    sched_row *n_rows;
    srv_step_row *n_trace;
};

/* Tokens of a nested step at most: the uncached end of a typist's prompt; a newcomer with more waits
 * for the light step after the running one. */
enum { SRV_NEST_MAX = 32 };

/* ============================================================ helpers */

static int64_t sched_now(void) { return (int64_t)uv_hrtime(); }

static sched_jobstate *js(srv_job *j) { return (sched_jobstate *)j->w; }

/* A sampler for a new sequence: an idle one reset to sp, else a new one. */
static cm_sampler *sampler_take(srv_sched *s, const cm_sampling *sp, cm_err *ce) {
    if (s->n_smp_free == 0) return cm_sampler_create(s->model, sp, ce);
    cm_sampler *smp = s->smp_free[--s->n_smp_free];
    if (cm_sampler_reset(smp, sp, ce) == CM_OK) return smp;
    s->smp_free[s->n_smp_free++] = smp;
    return NULL;
}

static void sampler_give(srv_sched *s, cm_sampler *smp) {
    if (!smp) return;
    if (s->smp_free && s->n_smp_free < s->cfg->parallel) s->smp_free[s->n_smp_free++] = smp;
    else cm_sampler_free(smp);
}

static void seq_release(srv_sched *s, sched_seq *q) {
    if (q->seq >= 0) {
        /* the engine's report lives until the close: fold it into the job's and the server's sums */
        const cm_routing *rt = cm_seq_routing(s->ctx, q->seq);
        if (rt) {
            api_route_agg_add(&js(q->job)->agg, rt);
            api_route_agg_add_tokens(&js(q->job)->agg, cm_seq_routing_tokens(s->ctx, q->seq));
            api_route_agg_add(&s->load, rt);
            s->load_dirty = 1;
        }
        cm_seq_close(s->ctx, q->seq);
        q->seq = -1;
    }
    if (q->slot) {
        q->slot = 0;
        if (js(q->job)->parked) s->seqs_parked--;
        else s->seqs_used--;
    }
    sampler_give(s, q->smp);
    q->smp = NULL;
}

/* Ends one choice: its text ends with finish unless it has ended already (then its own finish stays),
 * and its sequence is released. */
static void seq_end(srv_sched *s, sched_seq *q, api_finish finish) {
    if (q->state == SEQ_ENDED) return;
    api_choice_state_end(&q->ch, finish);
    q->state = SEQ_ENDED;
    seq_release(s, q);
    sched_jobstate *st = js(q->job);
    st->n_open--;
    st->dirty = 1;
}

/* ============================================================ publishing (worker -> loop) */

/* Moves what the worker produced into the outbox; caller holds s->mu. */
static void publish_job(srv_sched *s, srv_job *j) {
    sched_jobstate *st = js(j);
    for (int i = 0; st && i < j->n_choices; i++) {
        sched_seq *q = &st->seqs[i];
        srv_out *o = &j->out[i];
        if (q->prompt_lp.n) {
            for (int k = 0; k < q->prompt_lp.n; k++) srv_tokvec_push(&o->prompt_toks, &q->prompt_lp.v[k]);
            q->prompt_lp.n = 0;
        }
        size_t n;
        const char *text = api_choice_state_take(&q->ch, &n);
        if (n) srv_buf_append(&o->text, text, n);
        /* tokens go out with their text: while a tail is held back, so are its tokens */
        if (q->pending.n && (q->ch.emitted == q->ch.len || q->state == SEQ_ENDED)) {
            for (int k = 0; k < q->pending.n; k++) srv_tokvec_push(&o->toks, &q->pending.v[k]);
            q->pending.n = 0;
        }
        o->n_generated = q->ch.n_gen;
        if (q->state == SEQ_ENDED && !q->ended_published) {
            o->ended = 1;
            o->finish = q->ch.finish;
            o->stop_hit = q->ch.stop_hit;
            q->ended_published = 1;
        }
    }
    if (st) {
        j->t_first_token_ns = st->t_first_ns;
        j->preemptions = st->preemptions;
    }
    if (!j->in_ready) {
        j->in_ready = 1;
        j->next_ready = s->ready_head;
        s->ready_head = j;
    }
}

static void job_free_state(srv_job *j) {
    sched_jobstate *st = js(j);
    if (!st) return;
    for (int i = 0; i < j->n_choices; i++) {
        api_choice_state_free(&st->seqs[i].ch);
        srv_tokvec_free(&st->seqs[i].pending);
        srv_tokvec_free(&st->seqs[i].prompt_lp);
        free(st->seqs[i].hist);
    }
    free(st->seqs);
    api_route_agg_free(&st->agg);
    free(st);
    j->w = NULL;
}

/* Takes j out of `running`, keeping the others in the order they were admitted (the order prompts are
 * served in). */
static void running_remove(srv_sched *s, srv_job *j) {
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i] == j) {
            memmove(&s->running[i], &s->running[i + 1], (size_t)(--s->n_running - i) * sizeof *s->running);
            return;
        }
}

/* Ends a whole job: closes its sequences; err (may be NULL) makes it fail. Publishes it as done;
 * after this the worker never touches the job again (the loop may free it as soon as it sees done,
 * so everything worker-side is released first). Caller must not hold s->mu. */
static void job_finish(srv_sched *s, srv_job *j, const api_error *err) {
    sched_jobstate *st = js(j);
    if (j->charged) { /* what the fair queue charged (job_cost) and the job did not use goes back */
        int64_t used = j->prompt_tokens;
        for (int i = 0; st && i < j->n_choices; i++) used += st->seqs[i].ch.n_gen;
        srv_fairq_refund(s->waitq, j->client, j->charged - used);
        j->charged = 0;
    }
    if (st)
        for (int i = 0; i < j->n_choices; i++) {
            sched_seq *q = &st->seqs[i];
            if (q->state != SEQ_ENDED) seq_end(s, q, API_FINISH_NONE);
        }
    running_remove(s, j);
    for (int i = 0; i < s->n_parked; i++)
        if (s->parked[i] == j) {
            memmove(&s->parked[i], &s->parked[i + 1], (size_t)(--s->n_parked - i) * sizeof *s->parked);
            break;
        }
    api_route_agg routing = {0};
    if (st && !err) { /* the sums move to the loop, which renders the record (api_routing_json) */
        routing = st->agg;
        memset(&st->agg, 0, sizeof st->agg);
    }
    uv_mutex_lock(&s->mu);
    publish_job(s, j);
    if (err && !j->has_error) { j->has_error = 1; j->err = *err; }
    j->routing = routing;
    uv_mutex_unlock(&s->mu);
    job_free_state(j);
    uv_mutex_lock(&s->mu);
    j->done = 1;
    if (!j->in_ready) { j->in_ready = 1; j->next_ready = s->ready_head; s->ready_head = j; }
    uv_mutex_unlock(&s->mu);
}

static void cancel_error(int reason, api_error *e) {
    switch (reason) {
    case SRV_CANCEL_TIMEOUT:
        api_error_set(e, 504, API_ERR_SERVER, NULL, "timeout", "The request timed out (--request-timeout).");
        break;
    case SRV_CANCEL_SHUTDOWN:
        api_error_set(e, 503, API_ERR_SERVER, NULL, "server_shutting_down",
                      "The server is shutting down; the request was not completed.");
        break;
    default:
        api_error_set(e, 499, API_ERR_SERVER, NULL, "cancelled", "The request was cancelled.");
        break;
    }
}

/* ============================================================ admission */

/* Positions a choice's sequence may reach: its prompt and max_tokens (the API keeps that <= n_ctx). */
static int choice_target(const srv_sched *s, const api_completion_req *r, const api_prompt *p) {
    long long t = (long long)p->n_tokens + (r->max_tokens > 0 ? r->max_tokens : 0);
    return t > s->n_ctx ? s->n_ctx : (int)t;
}

static int blocks_for(int positions) { return (positions + CM_KV_BLOCK_TOKENS - 1) / CM_KV_BLOCK_TOKENS; }

/* Blocks a fork of a leader holding `prompt` positions takes until it reaches target: a copy of the
 * partial last block (full blocks are shared), then its own growth. */
static int fork_blocks(int prompt, int target) { return blocks_for(target) - prompt / CM_KV_BLOCK_TOKENS; }

/* Blocks that running sequences have reserved and not taken yet: what each still needs to reach its
 * target, and the whole reservation of each choice waiting to fork. */
static int blocks_reserved(srv_sched *s) {
    int sum = 0;
    for (int i = 0; i < s->n_running + s->n_parked; i++) {
        srv_job *j = i < s->n_running ? s->running[i] : s->parked[i - s->n_running];
        sched_jobstate *st = js(j);
        for (int c = 0; c < j->n_choices; c++) {
            sched_seq *q = &st->seqs[c];
            if (q->state == SEQ_FORK) {
                sum += q->fork_blocks;
            } else if (q->state != SEQ_ENDED && q->seq >= 0) {
                int len = cm_seq_len(s->ctx, q->seq);
                int need = cm_seq_blocks_needed(s->ctx, q->seq, q->target > len ? q->target - len : 0);
                if (need > 0) sum += need;
            }
        }
    }
    return sum;
}

/* How far a job has come: prompt tokens fed plus tokens generated, over its choices. Preemption's
 * churn bound compares it with the job's mark (sched_jobstate). */
static int64_t job_progress(srv_job *j) {
    int64_t p = 0;
    for (int i = 0; i < j->n_choices; i++) p += js(j)->seqs[i].n_fed + js(j)->seqs[i].ch.n_gen;
    return p;
}

/* Whether the job can ever run: 0, or -1 with the reason in e (a prompt longer than the context, or
 * more KV blocks than the whole pool: such a job would wait forever). */
static int job_check(const srv_sched *s, const srv_job *j, api_error *e) {
    const api_completion_req *r = j->req;
    int cold = 0; /* blocks the job takes from an empty pool with an empty cache */
    for (int i = 0; i < j->n_choices; i++) {
        const api_prompt *p = &r->prompts[api_completion_prompt_of(r, i)];
        if (p->n_tokens < 1 || p->n_tokens > s->n_ctx) {
            api_error_set(e, 400, API_ERR_INVALID, "prompt", "context_length_exceeded",
                          "This model's maximum context length is %d tokens, however you requested %d tokens "
                          "in the prompt. Please reduce the prompt.", s->n_ctx, p->n_tokens);
            return -1;
        }
        int t = choice_target(s, r, p);
        int follows = i != api_completion_first_choice(r, i);
        cold += follows ? fork_blocks(p->n_tokens, t) : blocks_for(t);
    }
    if (cold > s->blocks_total) {
        api_error_set(e, 400, API_ERR_INVALID, "max_tokens", "kv_budget_exceeded",
                      "This request needs %d KV blocks of %d tokens (prompt + max_tokens of each of its %d "
                      "choices), but the server's whole KV pool (--kv-size) is %d blocks. Reduce max_tokens, "
                      "n or the prompt.", cold, CM_KV_BLOCK_TOKENS, j->n_choices, s->blocks_total);
        return -1;
    }
    return 0;
}

/* What the fair queue charges a job when it is admitted: the tokens it may take, each prompt once
 * plus max_tokens per choice (at most the context); what it does not use is refunded when it ends. */
static int64_t job_cost(const srv_sched *s, const srv_job *j) {
    const api_completion_req *r = j->req;
    int64_t cost = 0;
    for (int i = 0; i < j->n_choices; i++) {
        const api_prompt *p = &r->prompts[api_completion_prompt_of(r, i)];
        int t = choice_target(s, r, p);
        cost += i == api_completion_first_choice(r, i) ? t : t - p->n_tokens;
    }
    return cost;
}

/* Closes the sequences job_admit opened for a job that does not run (yet). */
static void admit_undo(srv_sched *s, int n) {
    for (int i = 0; i < n; i++)
        if (s->a_seq[i] >= 0) cm_seq_close(s->ctx, s->a_seq[i]);
}

/* Takes the job at the head of the queue into the batch if the KV pool can hold it to the end.
 * Returns 1 when the job left the queue (admitted, or finished with an error), 0 when it must wait
 * for blocks (then nothing of it is left in the engine: its sequences were closed, and the cached
 * blocks it had attached are back in the cache). The fit is decided before anything is allocated:
 * a job waiting for room is retried every step. */
static int job_admit(srv_sched *s, srv_job *j) {
    api_error e;
    const api_completion_req *r = j->req;
    const int nc = j->n_choices; /* <= parallel, the size of a_seq and a_got */
    if (job_check(s, j, &e) < 0) {
        job_finish(s, j, &e);
        return 1;
    }
    /* open the sequences, map them onto the cache, and count the blocks they still need */
    int need = 0, err_at = -1;
    for (int i = 0; i < nc; i++) s->a_seq[i] = -1;
    for (int i = 0; i < nc && err_at < 0; i++) {
        const api_prompt *p = &r->prompts[api_completion_prompt_of(r, i)];
        int target = choice_target(s, r, p);
        s->a_got[i] = 0;
        if (i != api_completion_first_choice(r, i)) { /* forks its prompt's first choice later */
            need += fork_blocks(p->n_tokens, target);
            continue;
        }
        cm_err ce = {0};
        int seq = s->a_seq[i] = cm_seq_open(s->ctx, &ce);
        if (seq < 0) {
            api_error_set(&e, 503, API_ERR_SERVER, NULL, "overloaded", "no sequence slot: %s", ce.msg);
            err_at = i;
            break;
        }
        /* the options api/ resolved (dense models ignore them); set before the cache lookup, whose
         * key includes them. The sequence is empty, so the engine has no reason to refuse them. */
        if (cm_seq_set_options(s->ctx, seq, &p->opts, &ce) < 0) {
            api_error_set(&e, 500, API_ERR_SERVER, NULL, NULL, "sequence options: %s", ce.msg);
            err_at = i;
            break;
        }
        /* echoed prompt logprobs need the logits of every echoed position: reuse only what precedes */
        int n_key = p->n_tokens;
        if (r->echo && r->logprobs >= 0 && n_key > p->echo_from + 1) n_key = p->echo_from + 1;
        /* per-token routing: every position must run its experts, so the prefix cache is not consulted
         * (api/ admits it for one sequence only, never forked) */
        if (r->routing == API_ROUTING_TOKENS) {
            n_key = 0;
            if (cm_seq_routing_tokens_enable(s->ctx, seq, target, &ce) < 0) {
                api_error_set(&e, 503, API_ERR_SERVER, NULL, "overloaded", "routing detail: %s", ce.msg);
                err_at = i;
                break;
            }
        }
        int got = cm_seq_attach_prefix(s->ctx, seq, p->tokens, n_key, &ce);
        if (got < 0) {
            api_error_set(&e, 500, API_ERR_SERVER, NULL, NULL, "prefix cache: %s", ce.msg);
            err_at = i;
            break;
        }
        s->a_got[i] = got;
        int nd = cm_seq_blocks_needed(s->ctx, seq, target - got);
        if (nd > 0) need += nd;
    }
    if (err_at >= 0) {
        admit_undo(s, nc);
        job_finish(s, j, &e);
        return 1;
    }
    /* availability after attaching: attached blocks left the evictable set */
    cm_kv_stats kv;
    cm_ctx_kv_stats(s->ctx, &kv);
    if (need > kv.blocks_available - blocks_reserved(s)) {
        admit_undo(s, nc);
        return 0;
    }
    /* it fits: the job's state */
    sched_jobstate *st = calloc(1, sizeof *st);
    if (st) st->seqs = calloc((size_t)nc, sizeof *st->seqs);
    if (!st || !st->seqs) {
        free(st);
        admit_undo(s, nc);
        api_error_http(&e, 500, "out of memory");
        job_finish(s, j, &e);
        return 1;
    }
    j->w = st;
    int prompt_total = 0, cached = 0, query = 0;
    for (int i = 0; i < nc; i++) {
        sched_seq *q = &st->seqs[i];
        q->job = j;
        q->choice = i;
        q->prompt = &r->prompts[api_completion_prompt_of(r, i)];
        q->target = choice_target(s, r, q->prompt);
        q->seq = s->a_seq[i];
        q->n_fed = s->a_got[i];
        q->slot = 1;
        s->seqs_used++;
        q->state = SEQ_PREFILL;
        const int first = api_completion_first_choice(r, i);
        if (i != first) {
            q->state = SEQ_FORK;
            q->fork_blocks = fork_blocks(q->prompt->n_tokens, q->target);
            st->seqs[first].n_follow++;
        }
        if (i == first) {
            prompt_total += q->prompt->n_tokens;
            query += q->prompt->n_tokens - 1;
            cached += q->n_fed;
        }
        st->n_open++;
    }
    s->running[s->n_running++] = j;
    st->turn = ++s->turns;
    st->mark = job_progress(j);
    for (int i = 0; i < j->n_choices; i++) {
        sched_seq *q = &st->seqs[i];
        cm_err ce = {0};
        if (api_choice_state_init(&q->ch, s->model, &r->stop, r->max_tokens, s->n_ctx) < 0) {
            api_error_http(&e, 500, "out of memory");
            job_finish(s, j, &e);
            return 1;
        }
        api_choice_state_set_indent(&q->ch, r->n_indent);
        cm_sampling sp;
        api_completion_sampling(r, i, &sp);
        sp.n_logprobs = r->logprobs > 0 ? r->logprobs : 0;
        if (sp.n_logprobs > CM_LOGPROBS_MAX) sp.n_logprobs = CM_LOGPROBS_MAX;
        q->smp = sampler_take(s, &sp, &ce);
        if (!q->smp) {
            api_error_set(&e, 500, API_ERR_SERVER, NULL, NULL, "sampler: %s", ce.msg);
            job_finish(s, j, &e);
            return 1;
        }
        for (int k = 0; k < q->prompt->n_tokens; k++) cm_sampler_accept_prompt(q->smp, q->prompt->tokens[k]);
        q->t_last_ns = 0;
        /* speculation needs a deterministic choice (acceptance is the point) and changes nothing the
         * response reports: no logprobs (rows would be skipped), no routing detail */
        if (s->spec_model && s->cfg->spec_draft > 0 && r->max_tokens > 1 && (sp.temperature <= 0 || sp.top_k == 1) &&
            r->logprobs < 0 && r->routing == API_ROUTING_NONE) {
            q->hist_cap = q->target + 1;
            q->hist = malloc((size_t)q->hist_cap * sizeof *q->hist);
            if (q->hist) { /* without it the choice just does not speculate */
                memcpy(q->hist, q->prompt->tokens, (size_t)q->prompt->n_tokens * sizeof *q->hist);
                q->n_hist = q->prompt->n_tokens;
            }
        }
        if (r->echo && r->logprobs >= 0) {
            /* the first echoed token has no context to be predicted from: null, like OpenAI */
            srv_tok t = {.token = q->prompt->tokens[q->prompt->echo_from < q->prompt->n_tokens ? q->prompt->echo_from : 0],
                         .logprob = NAN};
            if (q->prompt->echo_from < q->prompt->n_tokens) srv_tokvec_push(&q->prompt_lp, &t);
        }
        if (r->max_tokens <= 0) {
            /* max_tokens 0: no generation; still prefill when the prompt's logprobs or its routing
             * statistics are wanted (scoring) or the prompt is to be cached (warm-up), else end right
             * away */
            if (!(r->echo && r->logprobs >= 0) && r->routing == API_ROUTING_NONE && !r->prefill)
                seq_end(s, q, API_FINISH_LENGTH);
        }
    }
    s->l_prompt += (uint64_t)prompt_total;
    s->l_prefix_query += (uint64_t)query;
    s->l_prefix_hit += (uint64_t)cached;
    uv_mutex_lock(&s->mu);
    j->admitted = 1;
    j->prompt_tokens = prompt_total;
    j->cached_tokens = cached;
    publish_job(s, j);
    uv_mutex_unlock(&s->mu);
    if (st->n_open == 0) job_finish(s, j, NULL);
    return 1;
}

/* ============================================================ preemption (see the file's opening comment) */

/* Slots a running or parked job holds. */
static int job_slots(srv_job *j) {
    int n = 0;
    for (int i = 0; i < j->n_choices; i++) n += js(j)->seqs[i].slot;
    return n;
}

/* Takes a running job out of the batch; its sequences and KV stay. */
static void job_park(srv_sched *s, srv_job *j) {
    sched_jobstate *st = js(j);
    int slots = job_slots(j);
    running_remove(s, j);
    s->parked[s->n_parked++] = j;
    s->seqs_used -= slots;
    s->seqs_parked += slots;
    st->parked = 1;
}

/* Puts parked job parked[i] back into the batch; fresh: as a new turn (a real resumption), else as it
 * was before job_park (undoing a preemption that did not happen). */
static void job_resume(srv_sched *s, int i, int fresh) {
    srv_job *j = s->parked[i];
    sched_jobstate *st = js(j);
    memmove(&s->parked[i], &s->parked[i + 1], (size_t)(--s->n_parked - i) * sizeof *s->parked);
    st->parked = 0;
    int slots = job_slots(j);
    s->seqs_parked -= slots;
    s->seqs_used += slots;
    s->running[s->n_running++] = j;
    if (fresh) {
        st->turn = ++s->turns;
        st->mark = job_progress(j);
    }
}

/* Resumes parked jobs, oldest first, while their slots are free. Returns how many stay parked. */
static int resume_parked(srv_sched *s) {
    while (s->n_parked && s->n_running < s->cfg->parallel &&
           s->cfg->parallel - s->seqs_used >= job_slots(s->parked[0]))
        job_resume(s, 0, 1);
    return s->n_parked;
}

/* Whether client has a job running or parked. */
static int client_active(const srv_sched *s, uint64_t client) {
    for (int i = 0; i < s->n_running; i++)
        if (s->running[i]->client == client) return 1;
    for (int i = 0; i < s->n_parked; i++)
        if (s->parked[i]->client == client) return 1;
    return 0;
}

/* The job to preempt for a newcomer needing `need` slots: of the client holding the most slots (more
 * than need), its job admitted or resumed last that has progressed since; NULL when none may be taken. */
static srv_job *preempt_victim(srv_sched *s, int need) {
    srv_job *best = NULL;
    int best_load = 0;
    for (int i = 0; i < s->n_running; i++) {
        srv_job *j = s->running[i];
        sched_jobstate *st = js(j);
        int slots = job_slots(j);
        if (st->failed || slots == 0 || job_progress(j) <= st->mark) continue;
        if (s->seqs_parked + slots > s->cfg->parallel) continue; /* the engine has room for parallel more */
        int load = 0;
        for (int k = 0; k < s->n_running; k++)
            if (s->running[k]->client == j->client) load += job_slots(s->running[k]);
        if (load <= need) continue;
        if (!best || load > best_load || (load == best_load && st->turn > js(best)->turn)) {
            best = j;
            best_load = load;
        }
    }
    return best;
}

/* Admits the waiting job it (its client has nothing running or parked) by parking jobs of the busiest
 * clients until its slots are free. Returns 1 when it left the queue (admitted, or failed), 0 when
 * nothing changed (no job may be preempted, or it does not fit the KV pool: then the parked jobs are
 * resumed at once, uncounted, as if nothing had happened). */
static int preempt_for(srv_sched *s, srv_fairq_item *it) {
    srv_job *j = it->data;
    int need = j->n_choices, n_vic = 0;
    while ((s->cfg->parallel - s->seqs_used < need || s->n_running == s->cfg->parallel) && n_vic < s->cfg->parallel) {
        srv_job *v = preempt_victim(s, need);
        if (!v) break;
        job_park(s, v);
        s->a_vic[n_vic++] = v;
    }
    int room = s->cfg->parallel - s->seqs_used >= need && s->n_running < s->cfg->parallel;
    int left = 0;
    if (room) {
        srv_fairq_pop(s->waitq, it);
        j->charged = it->cost;
        left = job_admit(s, j);
        if (!left) {
            j->charged = 0;
            srv_fairq_unpop(s->waitq, it);
        }
    }
    if (!left) { /* undo, newest first: parked[] ends with this call's victims */
        while (n_vic--) job_resume(s, s->n_parked - 1, 0);
        return 0;
    }
    for (int k = 0; k < n_vic; k++) {
        js(s->a_vic[k])->preemptions++;
        js(s->a_vic[k])->dirty = 1;
        s->l_preemptions++;
    }
    return 1;
}

/* Every slot is held (or too few are free): a client with nothing admitted that has a job waiting takes
 * slots from the busiest client (preempt_for), each such client's first waiting job in turn. */
static void preempt_waiting(srv_sched *s) {
    if (s->cfg->no_preempt || !s->n_running) return;
    for (srv_fairq_item *it = srv_fairq_first(s->waitq), *nx; it; it = nx) {
        nx = srv_fairq_next(s->waitq, it);
        srv_job *j = it->data;
        if (client_active(s, it->client) || j->n_choices > s->cfg->parallel) continue;
        if (s->cfg->parallel - s->seqs_used >= j->n_choices && s->n_running < s->cfg->parallel) continue;
        /* the walk goes on from the next client: this one's later jobs wait for its first */
        while (nx && nx->client == it->client) nx = srv_fairq_next(s->waitq, nx);
        preempt_for(s, it);
    }
}

/* ============================================================ one step */

/* Handles the token sampled for q: the server's bookkeeping (latency histograms, generated-token
 * count, logprobs) around the choice's own state machine. seq_len: positions in the sequence before
 * this token (api_choice_state_push's; with speculation the KV cache may hold more for a moment). */
static void seq_on_token(srv_sched *s, sched_seq *q, int32_t tok, float lp, int n_top, int seq_len) {
    srv_job *j = q->job;
    const api_completion_req *r = j->req;
    int64_t now = sched_now();
    if (!js(j)->t_first_ns) {
        js(j)->t_first_ns = now;
        srv_hist_observe(&s->l_ttft, (double)(now - (int64_t)j->t_arrival_ns) / 1e9);
    }
    if (q->t_last_ns) srv_hist_observe(&s->l_itl, (double)(now - (int64_t)q->t_last_ns) / 1e9);
    q->t_last_ns = (uint64_t)now;
    js(j)->dirty = 1;
    const int n_gen = q->ch.n_gen;
    /* llama.cpp's t_max_predict_ms counts from the first token; the choice then ends at a newline */
    if (r->t_max_predict_ms > 0 && now - js(j)->t_first_ns > (int64_t)r->t_max_predict_ms * 1000000)
        api_choice_state_time_up(&q->ch);
    int rc = api_choice_state_push(&q->ch, tok, seq_len);
    if (q->hist && q->n_hist < q->hist_cap) q->hist[q->n_hist++] = tok;
    if (q->ch.n_gen > n_gen) { /* a generated token (end-of-generation is not one) */
        s->l_generated++;
        if (r->logprobs >= 0) {
            srv_tok t = {.token = tok, .logprob = lp, .n_top = n_top};
            if (n_top) memcpy(t.top, s->top, (size_t)n_top * sizeof *t.top);
            srv_tokvec_push(&q->pending, &t);
        }
    }
    if (rc < 0) { /* out of memory growing the text (the sampler only returns valid ids) */
        sched_jobstate *st = js(j);
        if (!st->failed) api_error_http(&st->fail_err, 500, "out of memory");
        st->failed = 1;
        seq_end(s, q, API_FINISH_NONE);
        return;
    }
    if (rc > 0) {
        seq_end(s, q, q->ch.finish);
        return;
    }
    q->next_tok = tok;
    q->state = SEQ_DECODE;
}

/* Ends the choices waiting to fork leader q (its prompt ended without a token to continue from). */
static void followers_end(srv_sched *s, sched_seq *q, api_finish finish) {
    sched_seq *seqs = js(q->job)->seqs;
    for (int k = 1; k <= q->n_follow; k++)
        if (seqs[q->choice + k].state == SEQ_FORK) seq_end(s, &seqs[q->choice + k], finish);
}

/* Extra tokens (prefill and drafts) the step may add to n_decode decode tokens (at most n_batch in
 * all). While sequences decode and --max-itl-ms is set, as many as keep the step's predicted time
 * within the bound, but at least one block, so every prompt progresses. */
static int prefill_budget(const srv_sched *s, int n_decode) {
    int room = s->cfg->n_batch - n_decode;
    if (n_decode == 0 || s->cfg->max_itl_ms <= 0 || s->per_tok_ns <= 0) return room;
    double fit = (s->cfg->max_itl_ms * 1e6 - s->base_ns) / s->per_tok_ns;
    int cap = fit < CM_KV_BLOCK_TOKENS ? CM_KV_BLOCK_TOKENS : fit > room ? room : (int)fit;
    return cap < room ? cap : room;
}

static void ewma(double *avg, double x) { *avg = *avg > 0 ? 0.8 * *avg + 0.2 * x : x; }

/* Takes the submissions (in their order) into the worker's fair queue; returns whether the scheduler
 * is stopping. */
static int take_submissions(srv_sched *s) {
    uv_mutex_lock(&s->mu);
    srv_job *sub = s->submit_head;
    s->submit_head = s->submit_tail = NULL;
    atomic_store_explicit(&s->submitted, 0, memory_order_relaxed);
    int stopping = s->stopping;
    uv_mutex_unlock(&s->mu);
    while (sub) {
        srv_job *j = sub;
        sub = j->next;
        j->next = NULL;
        j->fq = (srv_fairq_item){.client = j->client, .cost = job_cost(s, j), .data = j};
        if (srv_fairq_push(s->waitq, &j->fq) < 0) {
            api_error e;
            api_error_http(&e, 500, "out of memory");
            job_finish(s, j, &e);
        }
    }
    return stopping;
}

/* Speculation: the n-gram lengths prompt lookup tries, longest first (a longer match predicts better;
 * one token alone matches too often to be worth the rows). */
enum { SPEC_NGRAM_MAX = 4, SPEC_NGRAM_MIN = 2 };
/* Drafts only fill a batch up to this many rows: below 16 rows the engine's products read each weight
 * once for all rows (the matvec, or the int8 GEMM from a few rows on; docs/engine.md), so a draft row costs little of
 * what a step costs anyway; beyond, every row pays full price and the drafts would slow the other
 * streams' steps down more than they save. */
enum { SPEC_BATCH_ROWS = 16 };

/* Prompt lookup over h[0..n): finds the latest earlier occurrence of the last g tokens (g from
 * SPEC_NGRAM_MAX down to SPEC_NGRAM_MIN) and copies at most max of the tokens that followed it into
 * out. Returns how many (0: no occurrence, or max <= 0). */
static int draft_lookup(const int32_t *h, int n, int max, int32_t *out) {
    if (max <= 0) return 0;
    for (int g = SPEC_NGRAM_MAX; g >= SPEC_NGRAM_MIN; g--) {
        if (n < g + 1) continue;
        const int32_t *tail = h + n - g;
        for (int p = n - g - 1; p >= 0; p--) {
            if (h[p] != tail[0] || memcmp(h + p, tail, (size_t)g * sizeof *h)) continue;
            int k = n - (p + g);
            if (k > max) k = max;
            memcpy(out, h + p + g, (size_t)k * sizeof *h);
            return k;
        }
    }
    return 0;
}

/* Adds prefill rows of q (its next prompt tokens) to the batch while nb < lim; returns nb. */
static int prefill_rows(srv_sched *s, sched_seq *q, int nb, int lim) {
    srv_job *j = q->job;
    const api_prompt *p = q->prompt;
    int want_lp = j->req->echo && j->req->logprobs >= 0;
    /* reference segment routing sees the whole text at once: its prompt goes into one batch or waits
     * for a step with room (the loop checked that it fits in --batch); the latency budget cannot split
     * it */
    if (j->req->segment_routing == API_SEGMENT_REFERENCE && q->n_fed == 0) {
        if (nb + p->n_tokens > s->cfg->n_batch) return nb;
        lim = s->cfg->n_batch;
    }
    while (q->n_fed < p->n_tokens && nb < lim) {
        int pos = q->n_fed++;
        int last = pos == p->n_tokens - 1;
        int lp = want_lp && pos >= p->echo_from && !last;
        s->b_tok[nb] = p->tokens[pos];
        s->b_seq[nb] = q->seq;
        s->b_logits[nb] = (int8_t)(last || lp);
        s->b_gen[nb] = 0;
        s->rows[nb] = (sched_row){q, pos, last && j->req->max_tokens > 0};
        js(j)->in_batch = 1;
        nb++;
    }
    return nb;
}

/* Adds q's draft tokens (prompt lookup, at most the rows left before lim) behind its decode row. The
 * draft stays within the positions admission reserved for q (its target), so it never takes a KV
 * block nobody counted. Returns nb. */
static int draft_rows(srv_sched *s, sched_seq *q, int nb, int lim, int max) {
    int len = cm_seq_len(s->ctx, q->seq); /* next_tok goes to position len */
    if (max > q->target - len - 1) max = q->target - len - 1;
    if (max > lim - nb) max = lim - nb;
    q->n_draft = draft_lookup(q->hist, q->n_hist, max, q->draft);
    q->draft_row = nb;
    for (int k = 0; k < q->n_draft; k++, nb++) {
        s->b_tok[nb] = q->draft[k];
        s->b_seq[nb] = q->seq;
        s->b_logits[nb] = 1;
        s->b_gen[nb] = 1;
        s->rows[nb] = (sched_row){q, ROW_DRAFT, 0};
    }
    return nb;
}

/* After the forward pass: q's decode row r and its draft rows. Samples them in order, as one step at a
 * time would, while the sampler reproduces the draft; keeps those draft tokens and the sampler's next
 * one, forgets the rest of the draft in the KV cache, then hands the tokens to the choice one by one
 * (which may end it on any of them: stop string, end-of-generation, max_tokens). */
static void verify_draft(srv_sched *s, sched_seq *q, int r) {
    const int n_draft = q->n_draft;
    q->n_draft = 0;
    const int len0 = cm_seq_len(s->ctx, q->seq) - 1 - n_draft; /* next_tok's position */
    int32_t toks[SRV_SPEC_DRAFT_MAX + 1];
    int acc = 0, lg_row = r;
    for (;;) {
        const float *lg = cm_logits(s->ctx, lg_row);
        if (!lg) break;
        toks[acc] = cm_sampler_sample(q->smp, lg, NULL, NULL);
        if (acc == n_draft || toks[acc] != q->draft[acc]) { acc++; break; }
        lg_row = q->draft_row + acc++;
    }
    /* toks[0..acc): the generated tokens; the first acc - 1 of them are the draft tokens kept */
    s->l_spec_drafted += (uint64_t)n_draft;
    s->l_spec_accepted += (uint64_t)(acc > 0 ? acc - 1 : 0);
    cm_err ce = {0};
    if (acc == 0 || (acc - 1 < n_draft && cm_seq_truncate(s->ctx, q->seq, len0 + acc, &ce) < 0)) {
        sched_jobstate *st = js(q->job);
        if (!st->failed) api_error_set(&st->fail_err, 500, API_ERR_SERVER, NULL, NULL, "speculation: %s", ce.msg);
        st->failed = 1;
        seq_end(s, q, API_FINISH_NONE);
        return;
    }
    for (int k = 0; k < acc && q->state == SEQ_DECODE; k++) seq_on_token(s, q, toks[k], 0, 0, len0 + 1 + k);
}

/* Fairness within a step: whether this step is a light step, one that serves only the jobs of light
 * clients (s->r_load[i] < the returned bound: clients with fewer open sequences than the busiest one).
 * It is one when a light client has a prompt that has not started (a new request of a client that is
 * not flooding); then that prompt is prefilled in a step of its own client's (and the other light
 * clients') rows, without the busy client's decodes, prefills and drafts, so its first token costs
 * what it costs alone. Never two light steps in a row: the busy clients lose at most every other step.
 * Fills s->r_load; returns the load at or above which a job waits this step (INT_MAX: none waits). */
static int step_plan(srv_sched *s) {
    int max_load = 0;
    for (int i = 0; i < s->n_running; i++) {
        int load = 0;
        for (int k = 0; k < s->n_running; k++)
            if (s->running[k]->client == s->running[i]->client) load += js(s->running[k])->n_open;
        s->r_load[i] = load;
        if (load > max_load) max_load = load;
    }
    int light_new = 0;
    for (int i = 0; i < s->n_running && !light_new && !s->prev_light; i++) {
        if (s->r_load[i] >= max_load) continue;
        for (int c = 0; c < s->running[i]->n_choices; c++) {
            const sched_seq *q = &js(s->running[i])->seqs[c];
            if (q->state == SEQ_PREFILL && !q->prefill_started) light_new = 1;
        }
    }
    s->prev_light = light_new;
    return light_new ? max_load : INT_MAX;
}

/* The prompts this step may feed (jobs of clients below wait_load) into s->p_order, in the order they are
 * served: by the tokens left to feed less the tokens their wait since arrival is worth at the measured
 * prefill rate (the shortest remaining prompt first, as good as shorter the longer it has waited; before
 * any rate is measured, the shortest first). So in a burst a short prompt's first token does not wait
 * behind a long one's prefill, and a long prompt is not starved: once it has waited as long as a
 * newcomer's prefill would take, it goes first. Equal keys keep admission order. Returns the count. */
static int prefill_order(srv_sched *s, int wait_load) {
    const double per_tok = s->per_tok_ns, now = (double)sched_now();
    int n = 0;
    for (int i = 0; i < s->n_running; i++) {
        if (s->r_load[i] >= wait_load) continue;
        srv_job *j = s->running[i];
        for (int c = 0; c < j->n_choices && n < s->cfg->parallel; c++) {
            sched_seq *q = &js(j)->seqs[c];
            if (q->state != SEQ_PREFILL) continue;
            q->pf_key = (double)(q->prompt->n_tokens - q->n_fed);
            if (per_tok > 0) q->pf_key -= (now - (double)j->t_arrival_ns) / per_tok;
            int k = n++;
            for (; k > 0 && s->p_order[k - 1]->pf_key > q->pf_key; k--) s->p_order[k] = s->p_order[k - 1];
            s->p_order[k] = q;
        }
    }
    return n;
}

static void step_run(srv_sched *s, int nb, int n_decode, int n_drafted, int nested);

static void step(srv_sched *s) {
    const int n_batch = s->cfg->n_batch;
    int nb = 0;
    for (int i = 0; i < s->n_running; i++) js(s->running[i])->in_batch = 0;
    const int wait_load = step_plan(s); /* jobs of clients this loaded wait for the next step */
    /* decode rows first: every generating sequence advances by one token each step */
    for (int i = 0; i < s->n_running; i++) {
        if (s->r_load[i] >= wait_load) continue;
        sched_jobstate *st = js(s->running[i]);
        for (int c = 0; c < s->running[i]->n_choices && nb < n_batch; c++) {
            sched_seq *q = &st->seqs[c];
            q->n_draft = 0;
            if (q->state != SEQ_DECODE) continue;
            s->b_tok[nb] = q->next_tok;
            s->b_seq[nb] = q->seq;
            s->b_logits[nb] = 1;
            s->b_gen[nb] = 1;
            s->rows[nb] = (sched_row){q, ROW_DECODE, 1};
            st->in_batch = 1;
            nb++;
        }
    }
    const int n_decode = nb;
    const int limit = n_decode + prefill_budget(s, n_decode);
    /* prefill-first: prompts whose rest fits whole into what the step has left, in prefill_order's
     * order (shortest first, a long wait counting as a shorter rest); the budget bounds them, so the
     * running streams still get their token every step */
    const int n_pf = prefill_order(s, wait_load);
    for (int k = 0; k < n_pf && nb < limit; k++) {
        sched_seq *q = s->p_order[k];
        if (q->prompt->n_tokens - q->n_fed <= limit - nb) nb = prefill_rows(s, q, nb, limit);
    }
    /* then the decoding sequences' drafts, the rows below SPEC_BATCH_ROWS shared out evenly */
    int n_spec = 0;
    for (int i = 0; i < s->n_running; i++)
        for (int c = 0; c < s->running[i]->n_choices; c++)
            n_spec += s->r_load[i] < wait_load && js(s->running[i])->seqs[c].state == SEQ_DECODE &&
                      js(s->running[i])->seqs[c].hist;
    int per = n_spec && nb < SPEC_BATCH_ROWS ? (SPEC_BATCH_ROWS - nb) / n_spec : 0;
    if (per > s->cfg->spec_draft) per = s->cfg->spec_draft;
    for (int i = 0; i < s->n_running && nb < limit && per > 0; i++) {
        srv_job *j = s->running[i];
        for (int c = 0; c < j->n_choices && nb < limit && s->r_load[i] < wait_load; c++) {
            sched_seq *q = &js(j)->seqs[c];
            if (q->state == SEQ_DECODE && q->hist) nb = draft_rows(s, q, nb, limit, per);
        }
    }
    /* then the other prompts' chunks, in the same order, until the batch (or the latency budget) is
     * full */
    for (int k = 0; k < n_pf && nb < limit; k++) nb = prefill_rows(s, s->p_order[k], nb, limit);
    int n_drafted = 0;
    for (int r = n_decode; r < nb; r++) {
        if (s->rows[r].prompt_pos >= 0) s->rows[r].sq->prefill_started = 1;
        else n_drafted++;
    }
    if (nb == 0) return;
    if (s->step_delay_ms > 0) uv_sleep((unsigned)s->step_delay_ms); /* test hook, see worker_load */
    s->nest_done = 0;
    s->nest_turn = s->turns;
    step_run(s, nb, n_decode, n_drafted, 0);
}

/* Swaps the step's batch arrays with the nested step's. */
static void nest_swap(srv_sched *s) {
    int32_t *t = s->b_tok; s->b_tok = s->n_tok; s->n_tok = t;
    t = s->b_seq; s->b_seq = s->n_seq; s->n_seq = t;
    int8_t *g = s->b_logits; s->b_logits = s->n_logits; s->n_logits = g;
    g = s->b_gen; s->b_gen = s->n_gen; s->n_gen = g;
    sched_row *r = s->rows; s->rows = s->n_rows; s->n_rows = r;
    srv_step_row *tr = s->trace; s->trace = s->n_trace; s->n_trace = tr;
}

/* Whether job j was admitted after the step in flight began (by its yield hook) and may nest: a
 * reference-routing request never does. */
static int nest_newcomer(const srv_sched *s, srv_job *j) {
    return js(j)->turn > s->nest_turn && j->req->segment_routing != API_SEGMENT_REFERENCE;
}

/* The yield hook of a step's forward pass (cm_batch.yield), between two of its layers or slices of its
 * output head: when a client with nothing running or parked has sent a request meanwhile, admits it as
 * the step's boundary would (preempt_for: the same slots, KV reservation and preemption rules) and runs
 * its prompt as a nested step, so its first token does not wait for the rest of the running step. At
 * most one nested step per step; only prompts that have not started and fit SRV_NEST_MAX whole. */
static void step_yield(void *ud) {
    srv_sched *s = ud;
    if (s->nest_done || !atomic_load_explicit(&s->submitted, memory_order_acquire)) return;
    if (take_submissions(s)) return; /* stopping: the worker's loop ends everything */
    for (srv_fairq_item *it = srv_fairq_first(s->waitq), *nx; it; it = nx) {
        nx = srv_fairq_next(s->waitq, it);
        srv_job *j = it->data;
        if (client_active(s, it->client) || j->n_choices > s->cfg->parallel) continue;
        while (nx && nx->client == it->client) nx = srv_fairq_next(s->waitq, nx);
        /* with a slot free, only the job the step's boundary would admit first (no job parked: those
         * resume first); without one, preemption's own rules */
        int room = s->cfg->parallel - s->seqs_used >= j->n_choices && s->n_running < s->cfg->parallel;
        if (room ? s->n_parked > 0 || it != srv_fairq_peek(s->waitq) : s->cfg->no_preempt) continue;
        preempt_for(s, it);
    }
    /* the newcomers admitted now: their prompts, if all of them fit */
    for (int i = 0; i < s->n_running; i++) js(s->running[i])->in_batch = 0; /* the step's own: past failing */
    int nb = 0, fits = 1;
    for (int i = 0; i < s->n_running && fits; i++) {
        srv_job *j = s->running[i];
        if (!nest_newcomer(s, j)) continue;
        for (int c = 0; c < j->n_choices; c++) {
            const sched_seq *q = &js(j)->seqs[c];
            if (q->state == SEQ_PREFILL && !q->prefill_started) nb += q->prompt->n_tokens - q->n_fed;
        }
        fits = nb <= s->nest_max;
    }
    if (nb == 0 || !fits) return;
    nest_swap(s);
    nb = 0;
    for (int i = 0; i < s->n_running; i++) {
        srv_job *j = s->running[i];
        if (!nest_newcomer(s, j)) continue;
        for (int c = 0; c < j->n_choices; c++) {
            sched_seq *q = &js(j)->seqs[c];
            if (q->state == SEQ_PREFILL && !q->prefill_started) nb = prefill_rows(s, q, nb, s->nest_max);
        }
    }
    for (int r = 0; r < nb; r++) s->rows[r].sq->prefill_started = 1;
    s->nest_done = 1;
    s->l_nested++;
    step_run(s, nb, 0, 0, 1);
    nest_swap(s);
    /* its first tokens go out now */
    uv_mutex_lock(&s->mu);
    for (int i = 0; i < s->n_running; i++) {
        srv_job *j = s->running[i];
        if (js(j)->turn > s->nest_turn && js(j)->dirty) { publish_job(s, j); js(j)->dirty = 0; }
    }
    uv_mutex_unlock(&s->mu);
    uv_async_send(&s->async);
}

/* The greedy tokens of the step's sampled rows (a decode row without drafts, a prompt's last row) whose
 * sampler is plain greedy, into s->g_tok by row, all at once on the engine's threads
 * (cm_logits_argmax); the other rows' -1 (their samplers run as before). */
static void step_greedy(srv_sched *s, int nb) {
    int n = 0;
    for (int r = 0; r < nb; r++) {
        const sched_row *row = &s->rows[r];
        const sched_seq *q = row->sq;
        s->g_tok[r] = -1;
        if (q->state == SEQ_ENDED || !row->sample || (row->prompt_pos == ROW_DECODE && q->n_draft > 0)) continue;
        if (cm_sampler_is_greedy(q->smp) && cm_logits(s->ctx, r)) s->g_rows[n++] = r;
    }
    if (n < 2) return; /* one row: the sampler's own argmax costs the same */
    if (cm_logits_argmax(s->ctx, n, s->g_rows, s->g_out) < 0) return;
    for (int i = 0; i < n; i++) s->g_tok[s->g_rows[i]] = s->g_out[i];
}

/* Runs the batch step() (or step_yield: nested) built: the forward pass, then sampling. */
static void step_run(srv_sched *s, int nb, int n_decode, int n_drafted, int nested) {
    if (s->trace) {
        for (int r = 0; r < nb; r++)
            s->trace[r] = (srv_step_row){s->rows[r].sq->job, s->rows[r].sq->choice, s->rows[r].prompt_pos, nested};
        s->cfg->step_trace(s->cfg->step_trace_ud, s->trace, nb);
    }
    srv_hist_observe(&s->l_step_tokens, nb);
    uint64_t t0 = uv_hrtime();
    cm_batch b = {.n = nb, .token = s->b_tok, .seq = s->b_seq, .logits = s->b_logits, .generated = s->b_gen,
                  .yield = s->nest_on && !nested ? step_yield : NULL, .yield_ud = s};
    cm_err ce = {0};
    if (cm_forward(s->ctx, &b, &ce) < 0) {
        /* nothing was appended: fail every job that had a row in this batch (admission reserves the
         * blocks every sequence can take, so running out of them here is a bug, not load) */
        api_error e;
        api_error_set(&e, 500, API_ERR_SERVER, NULL, NULL, "inference failed: %s", ce.msg);
        json_t *f = json_pack("{s:i,s:s}", "code", ce.code, "error", ce.msg);
        srv_log("error", "cm_forward failed", f);
        json_decref(f);
        for (int i = s->n_running - 1; i >= 0; i--)
            if (js(s->running[i])->in_batch) job_finish(s, s->running[i], &e);
        return;
    }
    s->l_steps++;
    s->l_batch_tokens += (uint64_t)nb;
    s->l_prompt_computed += (uint64_t)(nb - n_decode - n_drafted);
    const int n_vocab = s->info->n_vocab;
    step_greedy(s, nb);
    for (int r = 0; r < nb; r++) {
        sched_row *row = &s->rows[r];
        sched_seq *q = row->sq;
        if (q->state == SEQ_ENDED || row->prompt_pos == ROW_DRAFT) continue; /* drafts: with their decode row */
        if (row->prompt_pos == ROW_DECODE && q->n_draft > 0) {
            verify_draft(s, q, r);
            continue;
        }
        if (row->prompt_pos >= 0 && s->b_logits[r] && q->job->req->echo && q->job->req->logprobs >= 0 &&
            row->prompt_pos + 1 < q->prompt->n_tokens) {
            int n_top = q->job->req->logprobs > CM_LOGPROBS_MAX ? CM_LOGPROBS_MAX : q->job->req->logprobs;
            srv_tok t = {.token = q->prompt->tokens[row->prompt_pos + 1], .n_top = n_top};
            const float *lg = cm_logits(s->ctx, r);
            t.logprob = lg ? cm_logprobs(n_vocab, lg, t.token, t.top, n_top) : NAN;
            srv_tokvec_push(&q->prompt_lp, &t);
            /* choices waiting to fork this prompt echo the same logprobs */
            for (int k = 1; k <= q->n_follow; k++) srv_tokvec_push(&js(q->job)->seqs[q->choice + k].prompt_lp, &t);
            js(q->job)->dirty = 1;
        }
        int last_prompt = row->prompt_pos >= 0 && row->prompt_pos == q->prompt->n_tokens - 1;
        if (last_prompt && !row->sample) {
            seq_end(s, q, API_FINISH_LENGTH); /* max_tokens 0 with echo logprobs: prompt done */
            followers_end(s, q, API_FINISH_LENGTH);
            continue;
        }
        if (!row->sample) continue;
        const float *lg = cm_logits(s->ctx, r);
        if (!lg) {
            seq_end(s, q, API_FINISH_NONE);
            if (last_prompt) followers_end(s, q, API_FINISH_NONE);
            continue;
        }
        /* the choices waiting for this prompt continue the leader (sharing its blocks) before the
         * leader's first token, and sample from the same logits with their own samplers */
        int n_forked = 0;
        for (int k = 1; last_prompt && k <= q->n_follow; k++) {
            sched_seq *f = &js(q->job)->seqs[q->choice + k];
            if (f->state != SEQ_FORK) continue;
            cm_err fe = {0};
            f->seq = cm_seq_fork(s->ctx, q->seq, &fe);
            if (f->seq < 0) {
                sched_jobstate *st = js(q->job);
                if (!st->failed) api_error_set(&st->fail_err, 500, API_ERR_SERVER, NULL, NULL, "fork: %s", fe.msg);
                st->failed = 1;
                seq_end(s, f, API_FINISH_NONE);
                continue;
            }
            f->n_fed = f->prompt->n_tokens;
            f->state = SEQ_DECODE;
            n_forked++;
        }
        float lp = 0;
        int want_lp = q->job->req->logprobs >= 0;
        int n_top = q->job->req->logprobs > 0 ? q->job->req->logprobs : 0;
        if (n_top > CM_LOGPROBS_MAX) n_top = CM_LOGPROBS_MAX;
        int32_t tok = s->g_tok[r] >= 0 ? cm_sampler_take(q->smp, lg, s->g_tok[r], want_lp ? &lp : NULL, want_lp ? s->top : NULL)
                                       : cm_sampler_sample(q->smp, lg, want_lp ? &lp : NULL, want_lp ? s->top : NULL);
        seq_on_token(s, q, tok, lp, n_top, cm_seq_len(s->ctx, q->seq));
        for (int k = 1; n_forked && k <= q->n_follow; k++) {
            sched_seq *f = &js(q->job)->seqs[q->choice + k];
            if (f->state != SEQ_DECODE || f->ch.n_gen) continue;
            tok = cm_sampler_sample(f->smp, lg, want_lp ? &lp : NULL, want_lp ? s->top : NULL);
            seq_on_token(s, f, tok, lp, n_top, cm_seq_len(s->ctx, f->seq));
        }
    }
    for (int i = s->n_running - 1; i >= 0; i--)
        if (js(s->running[i])->failed) job_finish(s, s->running[i], &js(s->running[i])->fail_err);
    /* a job parked by a nested step (step_yield) still had rows in this step */
    for (int i = s->n_parked - 1; i >= 0; i--)
        if (js(s->parked[i])->failed) job_finish(s, s->parked[i], &js(s->parked[i])->fail_err);
    /* the latency model: steps without prefill give the base, the others the cost per prefill token
     * (a step with a nested one inside is longer than its own rows: --max-itl-ms bounds the step
     * around it, a newcomer's cost is not the flood's) */
    if (nested || s->nest_done) return;
    double dt = (double)(uv_hrtime() - t0);
    if (nb == n_decode) ewma(&s->base_ns, dt);
    else {
        double pf = dt - s->base_ns; /* timing noise must not make prefill look free */
        ewma(&s->per_tok_ns, (pf > dt * 0.25 ? pf : dt * 0.25) / (nb - n_decode));
    }
}

/* ============================================================ worker thread */

static void publish_stats_locked(srv_sched *s) {
    srv_gauges *g = &s->gauges;
    int queued = 0;
    queued += srv_fairq_count(s->waitq);
    for (srv_job *j = s->submit_head; j; j = j->next) queued++;
    g->queue_depth = queued;
    g->requests_running = s->n_running;
    g->seqs_running = s->seqs_used;
    g->requests_preempted = s->n_parked;
    g->preemptions = s->l_preemptions;
    g->nested_steps = s->l_nested;
    if (s->ctx) {
        cm_kv_stats kv;
        cm_ctx_kv_stats(s->ctx, &kv);
        g->kv_blocks_total = kv.blocks_total;
        g->kv_blocks_used = kv.blocks_used;
        g->kv_block_tokens = kv.block_tokens;
        g->kv_blocks_cached = kv.blocks_cached;
        g->kv_blocks_available = kv.blocks_available;
        g->kv_evictions = kv.evictions;
    }
    g->prefix_query_tokens = s->l_prefix_query;
    g->prefix_hit_tokens = s->l_prefix_hit;
    g->prompt_tokens_computed = s->l_prompt_computed;
    g->kv_check = s->kv_check;
    g->kv_check_errors = s->l_kv_check_errors;
    g->step_tokens = s->l_step_tokens;
    if (s->load_dirty) {
        api_route_agg_copy(&s->load_pub, &s->load);
        s->load_dirty = 0;
    }
    g->decode_steps = s->l_steps;
    g->batch_tokens = s->l_batch_tokens;
    g->spec_drafted = s->l_spec_drafted;
    g->spec_accepted = s->l_spec_accepted;
    s->ttft = s->l_ttft;
    s->itl = s->l_itl;
    s->generated = s->l_generated;
    s->prompt = s->l_prompt;
}

static int worker_load(srv_sched *s) {
    cm_err err = {0};
    /* test hook: stretch the load so tests can observe /health 503 while loading */
    const char *delay = getenv("CODEMOE_SERVE_LOAD_DELAY_MS");
    if (delay && atoi(delay) > 0) uv_sleep((unsigned)atoi(delay));
    cm_model_params mp = {.n_threads = s->cfg->n_threads, .vocab_only = 0};
    cm_model *m = cm_model_load(s->cfg->model_path, &mp, &err);
    cm_ctx *ctx = NULL;
    if (m) {
        const cm_model_info *info = cm_model_get_info(m);
        int n_ctx = s->cfg->n_ctx > 0 ? s->cfg->n_ctx : info->n_ctx_train;
        if (n_ctx <= 0) n_ctx = 2048;
        /* --kv-size: tokens, or bytes: the whole blocks that fit, at the engine's bytes per block */
        /* preemption parks up to parallel sequences beside the running ones (the opening comment); the
         * pool's default stays what parallel sequences need to reach the context at once */
        const int n_seq = s->cfg->no_preempt ? s->cfg->parallel : 2 * s->cfg->parallel;
        long long kv_tokens = s->cfg->kv_size;
        if (!kv_tokens)
            kv_tokens = (long long)s->cfg->parallel * ((n_ctx + CM_KV_BLOCK_TOKENS - 1) / CM_KV_BLOCK_TOKENS) *
                        CM_KV_BLOCK_TOKENS;
        double block_bytes = (double)cm_ctx_kv_block_bytes(m, s->cfg->kv_type), tok_bytes = block_bytes / CM_KV_BLOCK_TOKENS;
        if (s->cfg->kv_size_bytes)
            kv_tokens = (long long)((double)s->cfg->kv_size / block_bytes) * CM_KV_BLOCK_TOKENS;
        if (!s->cfg->kv_size && kv_tokens > (1ll << 30)) {
            snprintf(err.msg, sizeof err.msg, "the default KV pool (--parallel x --ctx) is %lld tokens: more than 2^30 "
                     "(set --kv-size)", kv_tokens);
        } else if (kv_tokens < 1 || kv_tokens > (1ll << 30)) {
            snprintf(err.msg, sizeof err.msg, "--kv-size %lld%s is %lld tokens of %.0f bytes: outside [1, 2^30]",
                     s->cfg->kv_size, s->cfg->kv_size_bytes ? " bytes" : "", kv_tokens, tok_bytes);
        } else {
            /* nested steps: dense models (the engine nests only those) */
            cm_moe_info mi;
            cm_model_moe_info(m, &mi);
            s->nest_max = s->cfg->n_batch < SRV_NEST_MAX ? s->cfg->n_batch : SRV_NEST_MAX;
            s->nest_on = !s->cfg->no_nested && mi.kind == CM_MOE_KIND_DENSE;
            cm_ctx_params cp = {.n_threads = s->cfg->n_threads, .n_seq_max = n_seq, .n_ctx = n_ctx,
                                .n_batch_max = s->cfg->n_batch, .kv_tokens = (int)kv_tokens,
                                .prefix_cache = s->cfg->prefix_cache, .kv_type = s->cfg->kv_type,
                                .experts_resident = s->cfg->experts_resident,
                                .n_batch_nested = s->nest_on ? s->nest_max : 0,
                                .pack_output = s->cfg->pack_output, .pack_layers = s->cfg->pack_layers,
                                .kv_prefault = 1, .prefault_buffers = 1};
            ctx = cm_ctx_create(m, &cp, &err);
        }
        if (ctx) {
            cm_kv_stats kv;
            cm_ctx_kv_stats(ctx, &kv);
            s->blocks_total = kv.blocks_total;
            const char *env = getenv("CODEMOE_KV_CHECK");
            s->kv_check = s->cfg->kv_check || (env && !strcmp(env, "1"));
            /* test hook: slow every step down so tests can act in the middle of a prefill */
            env = getenv("CODEMOE_SERVE_STEP_DELAY_MS");
            s->step_delay_ms = env ? atoi(env) : 0;
            json_t *f = json_pack("{s:i,s:i,s:i,s:s,s:f,s:b,s:f,s:b,s:f,s:f}", "blocks", kv.blocks_total, "block_tokens",
                                  kv.block_tokens, "tokens", kv.blocks_total * kv.block_tokens, "type",
                                  s->cfg->kv_type == CM_KV_F16 ? "f16" : "f32", "mib",
                                  (double)kv.blocks_total * block_bytes / (1 << 20), "prefix_cache",
                                  s->cfg->prefix_cache != 0, "max_itl_ms", s->cfg->max_itl_ms,
                                  "kv_check", s->kv_check, "output_pack_mib",
                                  (double)cm_ctx_output_pack_bytes(ctx) / (1 << 20), "layers_pack_mib",
                                  (double)cm_ctx_layers_pack_bytes(ctx) / (1 << 20));
            if (f) json_object_set_new(f, "model", json_string(s->cfg->model_id));
            srv_log("info", "kv pool", f);
            json_decref(f);
            s->info = info;
            s->n_ctx = n_ctx;
            cm_moe_info moe;
            cm_model_moe_info(m, &moe);
            s->spec_model = moe.kind == CM_MOE_KIND_DENSE; /* why only dense: the file's opening comment */
            int nb = s->cfg->n_batch;
            s->b_tok = malloc((size_t)nb * sizeof *s->b_tok);
            s->b_seq = malloc((size_t)nb * sizeof *s->b_seq);
            s->b_logits = malloc((size_t)nb);
            s->b_gen = malloc((size_t)nb);
            s->rows = malloc((size_t)nb * sizeof *s->rows);
            s->running = calloc((size_t)s->cfg->parallel, sizeof *s->running);
            s->smp_free = calloc((size_t)s->cfg->parallel, sizeof *s->smp_free);
            s->a_seq = malloc((size_t)s->cfg->parallel * sizeof *s->a_seq);
            s->a_got = malloc((size_t)s->cfg->parallel * sizeof *s->a_got);
            s->a_vic = malloc((size_t)s->cfg->parallel * sizeof *s->a_vic);
            s->parked = calloc((size_t)s->cfg->parallel, sizeof *s->parked);
            s->r_load = malloc((size_t)s->cfg->parallel * sizeof *s->r_load);
            s->p_order = malloc((size_t)s->cfg->parallel * sizeof *s->p_order);
            s->g_rows = malloc((size_t)nb * sizeof *s->g_rows);
            s->g_tok = malloc((size_t)nb * sizeof *s->g_tok);
            s->g_out = malloc((size_t)nb * sizeof *s->g_out);
            if (s->cfg->step_trace) s->trace = malloc((size_t)nb * sizeof *s->trace);
            if (s->nest_on) {
                s->n_tok = malloc(SRV_NEST_MAX * sizeof *s->n_tok);
                s->n_seq = malloc(SRV_NEST_MAX * sizeof *s->n_seq);
                s->n_logits = malloc(SRV_NEST_MAX);
                s->n_gen = malloc(SRV_NEST_MAX);
                s->n_rows = malloc(SRV_NEST_MAX * sizeof *s->n_rows);
                if (s->cfg->step_trace) s->n_trace = malloc(SRV_NEST_MAX * sizeof *s->n_trace);
                if (!s->n_tok || !s->n_seq || !s->n_logits || !s->n_gen || !s->n_rows ||
                    (s->cfg->step_trace && !s->n_trace))
                    s->nest_on = 0; /* without them, steps just do not nest */
            }
            if (!s->b_tok || !s->b_seq || !s->b_logits || !s->b_gen || !s->rows || !s->running || !s->smp_free ||
                !s->a_seq || !s->a_got || !s->a_vic || !s->parked || !s->r_load || !s->p_order || !s->g_rows || !s->g_tok || !s->g_out ||
                (s->cfg->step_trace && !s->trace)) {
                snprintf(err.msg, sizeof err.msg, "out of memory");
                cm_ctx_free(ctx);
                ctx = NULL;
            }
        }
    }
    if (ctx) { /* every slot's sampler now, not when the first requests arrive: creating one writes
                * vocabulary-sized arrays (a fresh server's first burst of 16 requests spent 5 ms of page
                * faults admitting them) */
        cm_sampling dflt;
        cm_sampling_default(&dflt);
        cm_sampler *smp;
        while (s->n_smp_free < s->cfg->parallel && (smp = cm_sampler_create(m, &dflt, NULL)))
            s->smp_free[s->n_smp_free++] = smp;
    }
    uv_mutex_lock(&s->mu);
    if (ctx) {
        s->model = m;
        s->ctx = ctx;
        s->model_state = SRV_MODEL_READY;
        s->gauges.model_loaded = 1;
        publish_stats_locked(s);
    } else {
        s->model_state = SRV_MODEL_FAILED;
        s->load_err = err;
    }
    uv_mutex_unlock(&s->mu);
    if (!ctx) cm_model_free(m);
    uv_async_send(&s->async);
    return ctx ? 0 : -1;
}

static void worker_main(void *arg) {
    srv_sched *s = arg;
    if (worker_load(s) < 0) return;
    for (;;) {
        uv_mutex_lock(&s->mu);
        while (!s->stopping && !s->submit_head && !srv_fairq_count(s->waitq) && s->n_running == 0 && s->n_parked == 0)
            uv_cond_wait(&s->cv, &s->mu);
        uv_mutex_unlock(&s->mu);
        int stopping = take_submissions(s);
        if (stopping) {
            for (srv_fairq_item *it = srv_fairq_first(s->waitq); it; it = srv_fairq_next(s->waitq, it))
                atomic_store(&((srv_job *)it->data)->cancel, SRV_CANCEL_SHUTDOWN);
            for (int i = 0; i < s->n_running; i++) atomic_store(&s->running[i]->cancel, SRV_CANCEL_SHUTDOWN);
            for (int i = 0; i < s->n_parked; i++) atomic_store(&s->parked[i]->cancel, SRV_CANCEL_SHUTDOWN);
        }
        /* 1. cancellations */
        for (int i = s->n_running + s->n_parked - 1; i >= 0; i--) {
            srv_job *j = i < s->n_running ? s->running[i] : s->parked[i - s->n_running];
            int why = atomic_load(&j->cancel);
            if (why) {
                api_error e;
                cancel_error(why, &e);
                job_finish(s, j, why == SRV_CANCEL_CLIENT || why == SRV_CANCEL_SLOW ? NULL : &e);
            }
        }
        for (srv_fairq_item *it = srv_fairq_first(s->waitq), *nx; it; it = nx) {
            nx = srv_fairq_next(s->waitq, it);
            srv_job *j = it->data;
            int why = atomic_load(&j->cancel);
            api_error e;
            /* a job that could never fit fails now, not when it reaches the head of the queue */
            int never = !why && !j->checked && job_check(s, j, &e) < 0;
            j->checked = 1;
            if (!why && !never) continue;
            srv_fairq_remove(s->waitq, it);
            if (why) cancel_error(why, &e);
            job_finish(s, j, why == SRV_CANCEL_CLIENT || why == SRV_CANCEL_SLOW ? NULL : &e);
        }
        if (stopping) break;
        /* 2. admission: parked jobs first; then in the fair queue's order (the job whose turn it is goes
         * first or nobody does); then preemption for a client with nothing admitted */
        int n_parked = resume_parked(s);
        srv_fairq_item *head;
        while (!n_parked && (head = srv_fairq_peek(s->waitq)) && s->n_running < s->cfg->parallel &&
               s->cfg->parallel - s->seqs_used >= ((srv_job *)head->data)->n_choices) {
            /* popped (charged) first: job_admit may finish the job, after which it is not ours */
            srv_job *j = head->data;
            srv_fairq_pop(s->waitq, head);
            j->charged = head->cost;
            if (!job_admit(s, j)) { /* not enough KV blocks yet: it stays first */
                j->charged = 0;
                srv_fairq_unpop(s->waitq, head);
                break;
            }
        }
        if ((head = srv_fairq_peek(s->waitq)) && ((srv_job *)head->data)->n_choices > s->cfg->parallel) {
            /* can never fit (the loop refuses these; defensive) */
            srv_job *j = head->data;
            srv_fairq_remove(s->waitq, head);
            api_error e;
            api_error_set(&e, 400, API_ERR_INVALID, "n", NULL, "n is larger than the server's --parallel");
            job_finish(s, j, &e);
        }
        preempt_waiting(s);
        /* 3-4. one batched forward pass */
        step(s);
        if (s->kv_check) {
            char why[256] = "";
            int bad = cm_ctx_kv_check(s->ctx, why, sizeof why);
            if (bad > 0) {
                if (!s->l_kv_check_errors) {
                    json_t *f = json_pack("{s:i,s:s}", "blocks", bad, "first", why);
                    srv_log("error", "kv check failed", f);
                    json_decref(f);
                }
                s->l_kv_check_errors += (uint64_t)bad;
            }
        }
        /* 5. publish */
        uv_mutex_lock(&s->mu);
        for (int i = s->n_running + s->n_parked - 1; i >= 0; i--) { /* parked: their preemption count */
            srv_job *j = i < s->n_running ? s->running[i] : s->parked[i - s->n_running];
            if (js(j)->dirty) { publish_job(s, j); js(j)->dirty = 0; }
        }
        publish_stats_locked(s);
        uv_mutex_unlock(&s->mu);
        for (int i = s->n_running - 1; i >= 0; i--)
            if (js(s->running[i])->n_open == 0) job_finish(s, s->running[i], NULL);
        for (int i = s->n_parked - 1; i >= 0; i--) /* ended in the step that a nested step parked it in */
            if (js(s->parked[i])->n_open == 0) job_finish(s, s->parked[i], NULL);
        uv_mutex_lock(&s->mu);
        publish_stats_locked(s);
        uv_mutex_unlock(&s->mu);
        uv_async_send(&s->async);
    }
    /* stopping: everything still here ends with a shutdown error */
    api_error e;
    cancel_error(SRV_CANCEL_SHUTDOWN, &e);
    while (s->n_running) job_finish(s, s->running[0], &e);
    while (s->n_parked) job_finish(s, s->parked[0], &e);
    for (srv_fairq_item *it; (it = srv_fairq_first(s->waitq));) {
        srv_fairq_remove(s->waitq, it);
        job_finish(s, it->data, &e);
    }
    uv_mutex_lock(&s->mu);
    publish_stats_locked(s);
    uv_mutex_unlock(&s->mu);
    uv_async_send(&s->async);
}

/* ============================================================ loop-side API */

static void sched_on_async(uv_async_t *a) {
    srv_sched *s = a->data;
    s->wake(s->wake_ud);
}

/* The loop is done with the handle only now, not at uv_close: a handle closed from a close callback
 * finishes closing one loop iteration later. */
static void sched_on_closed(uv_handle_t *hd) {
    srv_sched *s = hd->data;
    s->closed = 1;
}

srv_sched *srv_sched_create(uv_loop_t *loop, const srv_config *cfg, srv_sched_wake_fn wake, void *ud) {
    srv_sched *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->cfg = cfg;
    s->loop = loop;
    s->wake = wake;
    s->wake_ud = ud;
    srv_metrics m; /* only for the bucket layout */
    srv_metrics_init(&m);
    s->ttft = s->l_ttft = m.ttft;
    s->itl = s->l_itl = m.itl;
    s->l_step_tokens = m.step_tokens;
    if (!(s->waitq = srv_fairq_create())) { free(s); return NULL; }
    if (uv_mutex_init(&s->mu)) { srv_fairq_free(s->waitq); free(s); return NULL; }
    if (uv_cond_init(&s->cv)) { uv_mutex_destroy(&s->mu); srv_fairq_free(s->waitq); free(s); return NULL; }
    if (uv_async_init(loop, &s->async, sched_on_async)) {
        uv_cond_destroy(&s->cv);
        uv_mutex_destroy(&s->mu);
        srv_fairq_free(s->waitq);
        free(s);
        return NULL;
    }
    s->async.data = s;
    if (cfg->fault_worker_start || uv_thread_create(&s->thread, worker_main, s)) {
        /* no worker will ever wake the loop: wake it once now, so that the caller's wake-up sees the
         * model state FAILED (srv_sched_model) and whoever waits for the load gets its answer;
         * srv_sched_stop closes the handle */
        s->thread_started = 0;
        uv_async_send(&s->async);
        return s;
    }
    s->thread_started = 1;
    return s;
}

void srv_sched_stop(srv_sched *s) {
    if (!s) return;
    uv_mutex_lock(&s->mu);
    s->stopping = 1;
    uv_cond_signal(&s->cv);
    uv_mutex_unlock(&s->mu);
    if (s->thread_started) {
        uv_thread_join(&s->thread);
        s->thread_started = 0;
    }
    /* jobs submitted after the worker's last look */
    api_error e;
    cancel_error(SRV_CANCEL_SHUTDOWN, &e);
    uv_mutex_lock(&s->mu);
    while (s->submit_head) {
        srv_job *j = s->submit_head;
        s->submit_head = j->next;
        j->has_error = 1;
        j->err = e;
        j->done = 1;
        if (!j->in_ready) { j->in_ready = 1; j->next_ready = s->ready_head; s->ready_head = j; }
    }
    s->submit_tail = NULL;
    uv_mutex_unlock(&s->mu);
    cm_ctx_free(s->ctx);
    s->ctx = NULL;
    if (!uv_is_closing((uv_handle_t *)&s->async)) uv_close((uv_handle_t *)&s->async, sched_on_closed);
}

int srv_sched_closed(const srv_sched *s) { return s->closed; }

void srv_sched_free(srv_sched *s) {
    if (!s) return;
    while (s->n_smp_free > 0) cm_sampler_free(s->smp_free[--s->n_smp_free]);
    free(s->smp_free);
    cm_model_free(s->model);
    free(s->b_tok);
    free(s->b_seq);
    free(s->b_logits);
    free(s->b_gen);
    free(s->rows);
    api_route_agg_free(&s->load);
    api_route_agg_free(&s->load_pub);
    free(s->running);
    free(s->a_seq);
    free(s->a_got);
    free(s->a_vic);
    free(s->parked);
    free(s->r_load);
    free(s->trace);
    free(s->p_order);
    free(s->g_rows);
    free(s->g_tok);
    free(s->g_out);
    free(s->n_tok);
    free(s->n_seq);
    free(s->n_logits);
    free(s->n_gen);
    free(s->n_rows);
    free(s->n_trace);
    srv_fairq_free(s->waitq);
    uv_cond_destroy(&s->cv);
    uv_mutex_destroy(&s->mu);
    free(s);
}

int srv_sched_model(srv_sched *s, const cm_model **model, int *n_ctx, cm_err *err) {
    uv_mutex_lock(&s->mu);
    int st = s->thread_started || s->model_state != SRV_MODEL_LOADING ? s->model_state : SRV_MODEL_FAILED;
    if (st == SRV_MODEL_READY) {
        if (model) *model = s->model;
        if (n_ctx) *n_ctx = s->n_ctx;
    } else if (st == SRV_MODEL_FAILED && err) {
        *err = s->load_err;
        if (!err->msg[0]) snprintf(err->msg, sizeof err->msg, "could not start the engine thread");
    }
    uv_mutex_unlock(&s->mu);
    return st;
}

int srv_sched_submit(srv_sched *s, srv_job *job) {
    job->next = NULL;
    job->done = job->admitted = job->has_error = job->in_ready = 0;
    job->prompt_tokens = job->cached_tokens = job->checked = 0;
    job->charged = 0;
    job->preemptions = 0;
    uv_mutex_lock(&s->mu);
    if (s->stopping || s->model_state != SRV_MODEL_READY) { uv_mutex_unlock(&s->mu); return -1; }
    if (s->submit_tail) s->submit_tail->next = job;
    else s->submit_head = job;
    s->submit_tail = job;
    atomic_store_explicit(&s->submitted, 1, memory_order_release);
    s->gauges.queue_depth++;
    uv_cond_signal(&s->cv);
    uv_mutex_unlock(&s->mu);
    return 0;
}

void srv_sched_cancel(srv_sched *s, srv_job *job, int reason) {
    int none = SRV_CANCEL_NONE;
    atomic_compare_exchange_strong(&job->cancel, &none, reason);
    uv_mutex_lock(&s->mu);
    uv_cond_signal(&s->cv);
    uv_mutex_unlock(&s->mu);
}

srv_job *srv_sched_take(srv_sched *s) {
    uv_mutex_lock(&s->mu);
    srv_job *head = s->ready_head;
    s->ready_head = NULL;
    uv_mutex_unlock(&s->mu);
    return head;
}

static void swap_out(srv_out *a, srv_out *b) {
    srv_out t = *a;
    *a = *b;
    *b = t;
}

srv_job *srv_sched_drain(srv_sched *s, srv_job *job, srv_out *dst, srv_drained *info) {
    uv_mutex_lock(&s->mu);
    srv_job *next = NULL;
    if (job->in_ready) { next = job->next_ready; job->in_ready = 0; job->next_ready = NULL; }
    for (int i = 0; i < job->n_choices; i++) {
        srv_out_clear(&dst[i]);
        swap_out(&job->out[i], &dst[i]);
        /* absolute counters stay with the outbox */
        job->out[i].n_generated = dst[i].n_generated;
    }
    info->done = job->done;
    info->admitted = job->admitted;
    info->has_error = job->has_error;
    info->err = job->err;
    info->prompt_tokens = job->prompt_tokens;
    info->cached_tokens = job->cached_tokens;
    info->t_first_token_ns = job->t_first_token_ns;
    info->preemptions = job->preemptions;
    memset(&info->routing, 0, sizeof info->routing);
    if (job->done) { info->routing = job->routing; memset(&job->routing, 0, sizeof job->routing); }
    uv_mutex_unlock(&s->mu);
    return next;
}

void srv_sched_render_experts(srv_sched *s, const char *label, int adapters, srv_buf *b) {
    uv_mutex_lock(&s->mu);
    srv_expert_metrics_render(&s->load_pub, s->model, label, adapters, b);
    uv_mutex_unlock(&s->mu);
}

void srv_sched_stats(srv_sched *s, srv_gauges *g, srv_hist *ttft, srv_hist *itl, uint64_t *generated,
                     uint64_t *prompt) {
    uv_mutex_lock(&s->mu);
    *g = s->gauges;
    if (ttft) *ttft = s->ttft;
    if (itl) *itl = s->itl;
    if (generated) *generated = s->generated;
    if (prompt) *prompt = s->prompt;
    uv_mutex_unlock(&s->mu);
}
