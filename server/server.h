/*
 * server.h - internal interfaces of `codemoe serve` (see docs/server.md for the architecture).
 *
 * Threads, each the single owner of its state:
 * - the event-loop thread (libuv) owns every HTTP connection (libmicrohttpd driven from the loop),
 *   the metrics, the pool of models (srv_pool) and the loop side of every job;
 * - one engine worker thread per served model (srv_sched) owns that model's load, cm_ctx, samplers and
 *   batch.
 * They talk only through the scheduler's submit list (loop -> worker, with a condition variable),
 * each job's outbox (worker -> loop, announced by a uv_async_t wake-up), and the per-job cancel flag.
 * Everything shared is behind srv_sched.mu or is an atomic.
 */
#ifndef CM_SRV_SERVER_H
#define CM_SRV_SERVER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "api.h"
#include "auth.h"
#include "codemoe.h"
#include "fairq.h"
#include "metrics.h"
#include "sbuf.h"

/* ============================================================ configuration */

/* One model of the pool as configured: a --model flag (path[,key=value...]) or an entry of the --config
 * file's "models". A field left unset (-1, or 0 for n_threads) takes the process's flag. */
enum { SRV_PACK_UNSET = -2 }; /* srv_model_spec.pack_output / pack_layers not given */

typedef struct srv_model_spec {
    char *path;               /* owned */
    char id[256];             /* what clients send as "model" ("" until srv_model_spec_finish: the file's
                                 basename without .gguf) */
    char **aliases;           /* (n_aliases) owned */
    int n_aliases;
    int n_threads;            /* compute threads reserved for it; 0: a share of the budget (docs/server.md) */
    int n_ctx, parallel, queue, n_batch, kv_type, prefix_cache; /* -1: the process's */
    long long kv_size;        /* -1: the process's; else as srv_config.kv_size */
    int kv_size_bytes;
    double max_itl_ms;        /* < 0: the process's */
    int experts_resident;     /* < 0: the process's (--experts-resident) */
    int pack_output;          /* SRV_PACK_UNSET: the process's (--pack-output); else as srv_config */
    int pack_layers;          /* SRV_PACK_UNSET: the process's (--pack-layers); else as srv_config */
    json_t *defaults;         /* the model's default request fields (api_defaults_check'd JSON object:
                                 temperature, top_p, ..., stop), owned; NULL: none */
} srv_model_spec;

/* A KV pool size: "N" tokens (at most 2^30), or N with KiB, MiB or GiB: bytes (at most 1 TiB), *bytes
 * set. Returns 0, or -1 (nothing set). */
int srv_kv_size_parse(const char *v, long long *size, int *bytes);
/* --pack-output / pack-output=, --pack-layers / pack-layers=: "auto" 0, "on" 1, "off" -1
 * (cm_ctx_params.pack_output, pack_layers). Returns 0, or -1 (nothing set). */
int srv_pack_parse(const char *v, int *mode);
/* An empty spec (everything the process's). */
void srv_model_spec_init(srv_model_spec *s);
void srv_model_spec_free(srv_model_spec *s);
/* dst (initialised or freed before) becomes a deep copy of src. -1 when out of memory (dst empty). */
int srv_model_spec_copy(srv_model_spec *dst, const srv_model_spec *src);
/* Whether two specs make the same instance (path, aliases and every setting; the id aside). */
int srv_model_spec_same(const srv_model_spec *a, const srv_model_spec *b);
/* Parses a --model value: PATH, then optional ",key=value" settings: id, alias (repeatable), ctx,
 * kv-size (tokens or N KiB|MiB|GiB), threads, parallel, queue, batch, kv-type (f16|f32), prefix-cache
 * (0|1), max-itl-ms, experts-resident, and the default sampling (api_defaults_check): temperature, top-p, top-k, min-p,
 * repetition-penalty, presence-penalty, frequency-penalty, seed, max-tokens (a number or null), stop
 * (repeatable, one string each; \n, \t and \\ stand for a newline, a tab and a backslash). A comma
 * not followed by a known key belongs to the path (or the stop string). Returns 0, or -1 with a message
 * in err (out is then empty): a default out of its range is such an error. */
int srv_model_spec_parse(const char *v, srv_model_spec *out, char *err, size_t err_cap);
/* The same from a JSON object {path, id, aliases:[...], ctx, kv_size (number: tokens, or "N MiB"),
 * threads, parallel, queue, batch, kv_type, prefix_cache (bool), max_itl_ms, experts_resident, temperature, top_p, top_k,
 * min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, max_tokens, stop (a string or an
 * array of strings)}; unknown keys and bad values are errors. */
int srv_model_spec_from_json(const json_t *o, srv_model_spec *out, char *err, size_t err_cap);
/* Fills the id from the path when none was given. */
void srv_model_spec_finish(srv_model_spec *s);
/* Reads a --config file: {"models": [spec, ...]} (at least one; ids unique). On success returns 0 and
 * *specs (owned: free each with srv_model_spec_free, then the array) holds *n specs; -1 with a message
 * in err otherwise (nothing to free). */
int srv_config_file_read(const char *path, srv_model_spec **specs, int *n, char *err, size_t err_cap);

/* What a test sees of a step (srv_config.step_trace): one batch row, in the batch's order. */
typedef struct srv_job srv_job;
typedef struct srv_step_row {
    const srv_job *job;
    int choice;
    int prompt_pos;           /* >= 0: a prompt token (prefill); -1: a decode token; -2: a draft token */
    int nested;               /* 1: a nested step, run inside the forward pass of the step traced before it */
} srv_step_row;
typedef void (*srv_step_trace_fn)(void *ud, const srv_step_row *rows, int n);

/* The settings of the process (flags), and, in a model's own view (srv_pool: the process's settings
 * with the model's spec applied), of one model: the model fields and the scheduler's settings
 * (n_threads .. kv_check) are the model's there. */
typedef struct srv_config {
    const char *model_path;   /* a model's view only */
    char model_id[256];       /* a model's view only: what clients send as "model" */
    char **aliases;           /* a model's view only: more names of the model (borrowed from its spec);
                                 see api_find_model */
    int n_aliases;
    srv_model_spec *models;   /* (n_models) the models to serve at start (--model, --config); owned */
    int n_models;
    const char *config_path;  /* --config: re-read on SIGHUP; NULL: none */
    int strict_model;         /* only the model's names select it (--strict-model) */
    int strict_context;       /* prompt + max_tokens beyond --ctx is a 400, not clamped (--strict-context) */
    int no_ui;                /* --no-ui: no playground at / (ui.c) */
    const char *host;
    int port;                 /* 0: any free port (the bound one is logged) */
    int n_threads;            /* the process: the budget of compute threads all models share (--threads);
                                 a model's view: its reserved share */
    int n_ctx;                /* tokens per sequence (0: the model's training context) */
    int parallel;             /* max sequences in the batch (a request with n choices takes n) */
    int queue;                /* max requests waiting for a slot; beyond: 429 */
    int n_batch;              /* max tokens per cm_forward (prefill chunking) */
    long long kv_size;        /* KV pool: tokens (kv_size_bytes 0) or bytes (kv_size_bytes 1); 0: the default,
                                 parallel x ctx */
    int kv_size_bytes;
    int kv_type;              /* CM_KV_F32 or CM_KV_F16 (--kv-type) */
    int prefix_cache;         /* share computed prompt blocks across requests (--no-prefix-cache: 0) */
    double max_itl_ms;        /* soft inter-token latency bound that limits prefill per step (0: off) */
    int spec_draft;           /* prompt-lookup speculation: draft tokens per greedy sequence and step (0: off;
                                 at most SRV_SPEC_DRAFT_MAX; see scheduler.c) */
    int experts_resident;     /* MoE experts per layer kept in memory (cm_ctx_params; 0: no limit) */
    int pack_output;          /* the output head kept repacked (cm_ctx_params.pack_output: 0 auto, 1 on, -1 off) */
    int pack_layers;          /* the layers' matrices kept repacked (cm_ctx_params.pack_layers: 0 auto, 1 on, -1 off) */
    int kv_check;             /* run cm_ctx_kv_check after every step (--kv-check, CODEMOE_KV_CHECK=1) */
    srv_keys keys;            /* API keys; none: no auth */
    char **cors;              /* allowed origins (owned); "*" allows any */
    int n_cors;
    size_t max_body;          /* bytes */
    double request_timeout;   /* seconds a completion may take (0: none) */
    int idle_timeout;         /* seconds an idle connection stays open */
    double header_timeout;    /* seconds to complete a request's headers (0: none); see conn.h */
    double min_body_rate;     /* bytes/s a body must average after header_timeout (0: off) */
    int max_conn_per_ip;      /* open connections from one address; beyond: 503 (0: no cap) */
    double grace;             /* seconds in-flight requests get on SIGTERM */
    int routing_retention;    /* completions whose routing records are kept, at most */
    size_t routing_retention_bytes; /* and at most this many bytes of them (serialized) */
    size_t stream_buffer;     /* bytes a slow reader may fall behind before its stream is ended */
    int max_connections;      /* open connections; beyond: 503 at accept */
    const char *user_header;  /* a header naming the user of a shared key, trusted (--user-header); NULL: none */
    int key_max_concurrent;   /* completions in flight per client; beyond: 429 (0: no limit) */
    long long key_tokens_per_minute; /* prompt + generated tokens per client per minute (0: no limit) */
    int no_preempt;           /* --no-preempt: never park a running job to give a waiting client a slot
                                 (scheduler.c, preemption) */
    int no_nested;            /* --no-nested-steps: a newcomer's prompt waits for the running step to end
                                 (scheduler.c, nested steps) */
    /* ---- tests only (zero in the server) */
    srv_step_trace_fn step_trace; /* called on the worker thread, without the scheduler's lock, before each
                                     forward pass with the batch's rows (valid during the call) */
    void *step_trace_ud;
    int fault_worker_start;       /* the worker thread fails to start, as if the system refused it
                                     (srv_pool_fault_worker_start) */
} srv_config;

/* --spec-draft's default and bound */
#define SRV_SPEC_DRAFT_DEFAULT 0 /* off: measured to cost other streams' latency (docs/benchmarks.md) */
#define SRV_SPEC_DRAFT_MAX 32

void srv_config_free(srv_config *c);

/* ============================================================ expert load metrics (expert_metrics.c) */

/* The HELP/TYPE lines of codemoe_expert_tokens_total (adapters 0) or codemoe_adapter_tokens_total (1). */
void srv_expert_metrics_header(int adapters, srv_buf *b);
/* The series of one model's aggregate, without HELP/TYPE: codemoe_expert_tokens_total{<label>,level,layer,
 * expert,phase} (adapters 0; none for an empty, dense, aggregate) or codemoe_adapter_tokens_total{<label>,
 * adapter,name,phase} (1; MoLE models only). label: the model's label pair (srv_metrics_model_label). m
 * names the MoLE adapters (may be NULL). */
void srv_expert_metrics_render(const api_route_agg *a, const cm_model *m, const char *label, int adapters, srv_buf *b);

/* ============================================================ jobs (one completion request) */

enum { SRV_CANCEL_NONE = 0, SRV_CANCEL_CLIENT, SRV_CANCEL_TIMEOUT, SRV_CANCEL_SHUTDOWN, SRV_CANCEL_SLOW };

/* One generated token as reported to the client (logprobs requested) or counted (not requested). */
typedef struct srv_tok {
    int32_t token;
    float logprob;                           /* NAN: none (the first echoed prompt token) */
    int n_top;
    cm_token_logprob top[CM_LOGPROBS_MAX];
} srv_tok;

typedef struct srv_tokvec {
    srv_tok *v;
    int n, cap;
} srv_tokvec;

/* One choice's output that the loop has not taken yet (worker -> loop, under srv_sched.mu). The loop
 * swaps these buffers with its own empty ones, so steady-state streaming allocates nothing here. */
typedef struct srv_out {
    srv_buf text;            /* new completion text */
    srv_tokvec toks;         /* new tokens (with logprobs when requested) */
    srv_tokvec prompt_toks;  /* echo && logprobs: the prompt's tokens, once, before any output */
    int n_generated;         /* tokens generated so far (absolute) */
    api_finish finish;       /* set once, when the choice ends */
    int stop_hit;            /* with finish: the stop string that ended the choice (api_choice_state) */
    int ended;
} srv_out;

typedef struct srv_job srv_job;
struct srv_job {
    /* ---- set by the loop before srv_sched_submit, read-only for both threads afterwards */
    const api_completion_req *req;
    int n_choices;
    uint64_t t_arrival_ns;      /* uv_hrtime() at request arrival */
    uint64_t client;            /* who it is for: jobs of one client share a fair queue (srv_keylimits_fair_id) */
    void *owner;                /* the loop's request (never touched by the worker) */

    /* ---- loop -> worker */
    atomic_int cancel;          /* SRV_CANCEL_*; the worker ends the job at its next step */

    /* ---- worker -> loop, under srv_sched.mu */
    srv_out *out;               /* (n_choices) */
    int admitted;               /* got its sequences */
    int done;                   /* terminal: the worker will never touch the job again */
    int has_error;
    api_error err;              /* has_error: why it failed (before or during generation) */
    int prompt_tokens;          /* usage: prompt tokens summed over choices' prompts (once per prompt) */
    int cached_tokens;          /* usage: of those, reused from the prefix cache */
    int64_t t_first_token_ns;   /* 0 until the first token */
    int preemptions;            /* times it was preempted (parked to give another client a slot) */
    api_route_agg routing;      /* set with done: the routing statistics summed over the job's
                                   sequences, moved to the loop by srv_sched_drain */
    int in_ready;               /* already in the ready list */
    srv_job *next_ready;

    /* ---- worker-private */
    void *w;                    /* the scheduler's state of an admitted job (scheduler.c's
                                   sched_jobstate: its sequences, routing sums); NULL before admission
                                   and once the job is done */
    int checked;                /* job_check passed (it can run once there is room) */
    srv_fairq_item fq;          /* its place in the worker's fair queue (client, cost in tokens) */
    int64_t charged;            /* tokens the fair queue charged it at admission (0: not admitted);
                                   what it did not use is refunded when it ends */
    srv_job *next;              /* submit list link */
};

/* ============================================================ scheduler (engine worker thread) */

enum { SRV_MODEL_LOADING = 0, SRV_MODEL_READY, SRV_MODEL_FAILED };

typedef struct srv_sched srv_sched;

/* Called on the loop thread when the model state changed or jobs have new output. */
typedef void (*srv_sched_wake_fn)(void *ud);

/* Creates the scheduler and starts the worker thread, which loads the model (the caller's loop is
 * already listening, so /health can answer 503 meanwhile). wake is called on the loop thread (via a
 * uv_async_t on loop). Returns NULL on failure (nothing started). */
srv_sched *srv_sched_create(uv_loop_t *loop, const srv_config *cfg, srv_sched_wake_fn wake, void *ud);
/* Stops the worker: every job not done yet ends with err (shutdown), the thread is joined and the
 * engine freed. The uv_async_t is closed; call uv_run afterwards to let it finish closing
 * (srv_sched_closed), and free the struct with srv_sched_free only after that. */
void srv_sched_stop(srv_sched *s);
/* Whether the loop is done with the scheduler's wake-up handle (its close callback has run): from then
 * on srv_sched_free may run. A stop from inside another handle's close callback finishes closing one
 * loop iteration later than a stop from anywhere else. */
int srv_sched_closed(const srv_sched *s);
void srv_sched_free(srv_sched *s);

/* SRV_MODEL_*; when READY, *model (immutable, usable from any thread) and *n_ctx are set. When FAILED,
 * err holds the reason. */
int srv_sched_model(srv_sched *s, const cm_model **model, int *n_ctx, cm_err *err);

/* Hands a job to the worker. The job and its req must stay alive until the loop has seen job->done
 * (srv_sched_take). Returns 0, or -1 if the worker is stopping (the job was not taken). */
int srv_sched_submit(srv_sched *s, srv_job *job);
/* Asks the worker to end a job (reason SRV_CANCEL_*); idempotent; its sequences are closed at the
 * worker's next step. */
void srv_sched_cancel(srv_sched *s, srv_job *job, int reason);

/* Loop thread: takes the list of jobs with new output. Walk it only with srv_sched_drain, which must
 * be called for every job in it (the list links stay owned by the scheduler until then). */
srv_job *srv_sched_take(srv_sched *s);
/* Swaps job->out[i] into dst[i] (the loop's buffers, emptied here: their storage is recycled to the
 * worker) and copies the job's state into info. Returns the next job of the taken list. Once
 * info->done, the worker has let go of the job and the loop may free it. */
typedef struct srv_drained {
    int done, admitted, has_error, prompt_tokens, cached_tokens;
    api_error err;
    int64_t t_first_token_ns;
    int preemptions;            /* times the job was preempted so far (absolute) */
    api_route_agg routing;      /* once, with done: the job's routing statistics, moved to the
                                   caller (free with api_route_agg_free); else empty */
} srv_drained;
srv_job *srv_sched_drain(srv_sched *s, srv_job *job, srv_out *dst, srv_drained *info);

/* Gauges and worker-owned histograms, copied under the lock. */
void srv_sched_stats(srv_sched *s, srv_gauges *g, srv_hist *ttft, srv_hist *itl, uint64_t *generated,
                     uint64_t *prompt);

/* Appends the per-layer expert load (summed over every finished sequence) to b: the series of
 * srv_expert_metrics_render with label and adapters. */
void srv_sched_render_experts(srv_sched *s, const char *label, int adapters, srv_buf *b);

/* srv_out / srv_tokvec helpers */
void srv_out_init(srv_out *o);
void srv_out_free(srv_out *o);
void srv_out_clear(srv_out *o);  /* empties, keeps the storage */
int srv_tokvec_push(srv_tokvec *v, const srv_tok *t);
void srv_tokvec_free(srv_tokvec *v);

/* ============================================================ the pool of models (pool.c) */

#define SRV_POOL_MAX 64   /* models served at once, at most */

typedef struct srv_pool srv_pool;
typedef struct srv_member srv_member;

/* How much of a model's file is in memory (cm_model_residency), measured on libuv's thread pool because
 * a mincore over tens of GB and a read of smaps are no work for the loop thread. Owned by its member. */
#define SRV_RESIDENCY_REFRESH_MS 2000 /* the figures are at most this old (plus one measurement) */
typedef struct srv_residency {
    size_t mapped, cached, resident; /* bytes, as of the last measurement that ended (0 before) */
    uint64_t started_at;             /* uv_now() when the last measurement started; 0: none yet */
    uint64_t n_done;                 /* measurements ended */
    int busy;                        /* one is in flight: it holds a reference to the member */
    uv_work_t work;
    const cm_model *model;           /* what the one in flight measures; its results land in next */
    size_t next[3];
} srv_residency;

/* One served model instance, as the loop sees it. Loop thread only; the worker reads cfg (immutable
 * while it runs). Created by srv_pool_add, freed by the pool once retired and released by every request
 * and its worker has stopped. */
struct srv_member {
    srv_pool *pool;
    srv_model_spec spec;        /* owned: what it was loaded from */
    srv_config cfg;             /* its view of the settings: the process's with spec applied (see
                                   srv_config); the key and CORS lists are the process's, borrowed */
    srv_sched *sched;           /* its engine worker, KV pool and batch */
    api_model model;            /* names from spec; model, n_ctx and template once READY */
    api_template *chat_template;
    char chat_template_error[256];
    int state;                  /* SRV_MODEL_* as the loop last saw it (srv_pool_update) */
    int startup;                /* one of the models the process started with */
    int retired;                /* unloaded or replaced: no name finds it, stopped once unreferenced */
    int n_refs;                 /* requests using it (srv_member_hold / srv_member_release) */
    int n_jobs, n_tokenizing;   /* completions in flight, and being tokenized: its queue bound */
    int threads;                /* compute threads it holds of the budget (cfg.n_threads until it is
                                   replaced: its replacement holds them then) */
    srv_member *replaces;       /* the live instance this one replaces once READY, or NULL */
    void *waiter;               /* http.c: the admin request waiting for the load, or NULL */
    srv_member *next;           /* live list (srv_pool_first), or retired / stopped list */
    int stopped;                /* its worker was stopped: it waits in the stopped list for srv_pool_reap */
    srv_residency residency;    /* its model file's residency as last measured (srv_member_residency) */
};

/* Called on the loop thread when m's worker reports (model state or job output). */
typedef void (*srv_pool_wake_fn)(void *ud, srv_member *m);

/* An empty pool whose models' workers report through wake(ud, member). cfg (borrowed, must outlive
 * the pool) gives the process's settings and the thread budget (cfg->n_threads). NULL when out of
 * memory. */
srv_pool *srv_pool_create(uv_loop_t *loop, const srv_config *cfg, srv_pool_wake_fn wake, void *ud);
/* Starts the models of cfg->models: every model with threads= keeps that many, the others share the
 * rest of the budget equally (at least one each). Returns 0, or -1 with the reason in err (the budget
 * is too small, a name is taken twice, a worker cannot start; the models started are left to
 * srv_pool_stop and srv_pool_free). */
int srv_pool_start(srv_pool *p, char *err, size_t err_cap);
/* Starts loading one more model (spec is copied). Its threads: spec->n_threads, else those of the
 * instance it replaces, else every thread of the budget no model holds. replaces: a live member it
 * takes over from once READY (its names may be the same; its threads count as free for this one).
 * Returns 0 and *out, or an HTTP status with the reason in err: 409 (a name is taken, the thread budget
 * or the pool is full), 500. */
int srv_pool_add(srv_pool *p, const srv_model_spec *spec, srv_member *replaces, srv_member **out, char *err,
                 size_t err_cap);
/* Takes in m's worker's model state; returns the state when it changed (SRV_MODEL_READY: m serves, and
 * the instance it replaces is retired, unless m was retired while it loaded; SRV_MODEL_FAILED: *err says
 * why), else -1. */
int srv_pool_update(srv_member *m, cm_err *err);
/* The live model a request's "model" names (api_find_model's rules over every ready or loading
 * model); name NULL (no "model" given): the first live model. NULL: none. */
srv_member *srv_pool_find(srv_pool *p, const char *name);
/* The live models in order (then ->next), NULL when none; and their number. */
srv_member *srv_pool_first(srv_pool *p);
int srv_pool_count(const srv_pool *p);
/* The api_model of every READY live model into out (up to SRV_POOL_MAX), its member into who (may be
 * NULL). Returns the count. */
int srv_pool_views(srv_pool *p, api_model *out, srv_member **who);
/* Takes m out of service: no name finds it from now; its in-flight requests finish; once no request
 * holds it its worker stops and its memory (model mapping, KV) is freed. A replacement of m that is
 * still loading is retired with it. Idempotent. */
void srv_pool_retire(srv_member *m);
void srv_member_hold(srv_member *m);
void srv_member_release(srv_member *m);
/* The residency of m's model file as last measured (0s before the first measurement has ended, or when
 * the model is not loaded): never measured on the calling (loop) thread. Starts a measurement on libuv's
 * pool when none is in flight and the last started SRV_RESIDENCY_REFRESH_MS ago or more; the
 * measurement holds m (srv_member_hold), so an unload or replace meanwhile stops m only once it ended.
 * The loop does not end while one is in flight (a uv_work_t is an active request). */
void srv_member_residency(srv_member *m, size_t *mapped, size_t *cached, size_t *resident);
/* Tests only: every member started under model_id from now on gets a worker whose thread fails to start (the
 * load then ends FAILED); NULL: none. The id is copied. */
void srv_pool_fault_worker_start(srv_pool *p, const char *model_id);
/* Threads of the budget held by models (live, or retired and not stopped yet). */
int srv_pool_threads_used(const srv_pool *p);
/* Frees the members whose workers have stopped and whose wake-up handles have finished closing
 * (srv_sched_closed); returns how many it freed. Call from a timer. */
int srv_pool_reap(srv_pool *p);
/* Shutdown: stops every worker (srv_sched_stop: jobs not done end with an error). Then one more wake-up
 * pass for each live or retired member, uv_run until the handles are closed, srv_pool_free. */
void srv_pool_stop(srv_pool *p);
/* Calls wake for every member that still has a worker (the last pass of a shutdown). */
void srv_pool_wake_all(srv_pool *p);
void srv_pool_free(srv_pool *p);

/* ============================================================ routing retention */

/* A bounded store of per-completion routing records, keyed by completion id, each with the API key
 * that created it. Records are kept serialized (compact JSON: what GET /v1/completions/{id}/routing
 * serves); a record's size is its serialized length. The newest records are kept while there are at
 * most max_records of them and their sizes sum to at most max_bytes: a put evicts the oldest first.
 * Loop-thread only. Create returns NULL when out of memory; max_records or max_bytes 0 keeps nothing. */
typedef struct srv_retention srv_retention;
srv_retention *srv_retention_create(int max_records, size_t max_bytes);
void srv_retention_free(srv_retention *r);
/* Stores value's serialization (value is borrowed) under id for owner (an srv_keys_find result),
 * replacing a record with the same id. Returns 0, or -1 with nothing stored (and nothing evicted) when
 * the record alone is over max_bytes, the store keeps nothing, or out of memory. */
int srv_retention_put(srv_retention *r, const char *id, int owner, const json_t *value);
/* The record's JSON (borrowed: valid until the next put or free; *len bytes, NUL-terminated) and
 * owner; NULL if unknown or evicted. owner and len may be NULL. */
const char *srv_retention_get(srv_retention *r, const char *id, int *owner, size_t *len);
/* What the store holds now: the records' summed sizes, and their number. */
size_t srv_retention_bytes(const srv_retention *r);
int srv_retention_count(const srv_retention *r);

/* ============================================================ HTTP front end */

typedef struct srv_http srv_http;

/* Starts listening on cfg->host:cfg->port (the loop thread drives libmicrohttpd). Returns NULL and
 * writes the reason to stderr on failure. */
srv_http *srv_http_start(uv_loop_t *loop, srv_config *cfg);
/* Connects the pool (created after the listener, with srv_http_wake_fn() and h as its wake-up). */
void srv_http_set_pool(srv_http *h, srv_pool *p);
srv_pool_wake_fn srv_http_wake_fn(void);
/* SIGHUP: makes the pool match specs (n of them, borrowed): a model whose id is not served is loaded,
 * one whose path or settings changed is replaced, a served model not in specs is unloaded. What cannot
 * be done (a name taken, the thread budget) is logged and left as it is. */
void srv_http_apply_config(srv_http *h, const srv_model_spec *specs, int n);
/* The bound port. */
int srv_http_port(const srv_http *h);
/* Sets the callback run (loop thread) when a shutdown has drained; a failed model load starts a
 * shutdown by itself, with exit code 1. */
void srv_http_on_done(srv_http *h, void (*done)(void *), void *ud);
int srv_http_exit_code(const srv_http *h);
/* Begins graceful shutdown: stop accepting, refuse new completions (503), let in-flight ones run for
 * cfg->grace seconds, then end them (streams get an error event). `done` is called (loop thread)
 * once nothing is in flight. Then: srv_pool_stop, one more wake-up pass (srv_pool_wake_all),
 * srv_http_free, uv_run until the loop is empty, srv_http_destroy, srv_pool_free. */
void srv_http_shutdown(srv_http *h, void (*done)(void *), void *ud);
void srv_http_free(srv_http *h);
void srv_http_destroy(srv_http *h);

/* ============================================================ logging */

/* One JSON line on stderr: {"ts":..., "level":..., "msg":..., <fields>}. fields is borrowed (may be
 * NULL). Thread-safe (a single fputs of a whole line). */
void srv_log(const char *level, const char *msg, json_t *fields);
/* Monotonic nanoseconds (the same clock as uv_hrtime). */
uint64_t srv_now_ns(void);

#endif
