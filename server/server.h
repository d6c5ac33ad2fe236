/*
 * server.h - internal interfaces of `codemoe serve` (see docs/server.md for the architecture).
 *
 * Two threads, each the single owner of its state:
 * - the event-loop thread (libuv) owns every HTTP connection (libmicrohttpd driven from the loop),
 *   the metrics, and the loop side of every job;
 * - the engine worker thread (srv_sched) owns the model load, the cm_ctx, the samplers and the batch.
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
#include "metrics.h"
#include "sbuf.h"

/* ============================================================ configuration */

typedef struct srv_config {
    const char *model_path;
    char model_id[256];       /* what clients send as "model" (--model-id, else the file's basename) */
    char **aliases;           /* more names of the model (--alias, owned); see api_find_model */
    int n_aliases;
    int strict_model;         /* only the model's names select it (--strict-model) */
    int strict_context;       /* prompt + max_tokens beyond --ctx is a 400, not clamped (--strict-context) */
    int no_ui;                /* --no-ui: no playground at / (ui.c) */
    const char *host;
    int port;                 /* 0: any free port (the bound one is logged) */
    int n_threads;            /* engine compute threads */
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
} srv_config;

void srv_config_free(srv_config *c);

/* ============================================================ expert load metrics (expert_metrics.c) */

/* codemoe_expert_tokens_total{level,layer,expert,phase} (and codemoe_adapter_tokens_total) of the
 * aggregate, in Prometheus text; only the HELP/TYPE lines for an empty (dense) one. m names the MoLE
 * adapters (may be NULL). */
void srv_expert_metrics_render(const api_route_agg *a, const cm_model *m, srv_buf *b);

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
    api_route_agg routing;      /* set with done: the routing statistics summed over the job's
                                   sequences, moved to the loop by srv_sched_drain */
    int in_ready;               /* already in the ready list */
    srv_job *next_ready;

    /* ---- worker-private */
    void *w;                    /* the scheduler's state of an admitted job (scheduler.c's
                                   sched_jobstate: its sequences, routing sums); NULL before admission
                                   and once the job is done */
    int checked;                /* job_check passed (it can run once there is room) */
    srv_job *next;              /* submit list / worker queue link */
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
 * engine freed. The uv_async_t is closed; call uv_run afterwards to let it finish closing, and free the
 * struct with srv_sched_free after that. */
void srv_sched_stop(srv_sched *s);
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
    api_route_agg routing;      /* once, with done: the job's routing statistics, moved to the
                                   caller (free with api_route_agg_free); else empty */
} srv_drained;
srv_job *srv_sched_drain(srv_sched *s, srv_job *job, srv_out *dst, srv_drained *info);

/* Gauges and worker-owned histograms, copied under the lock. */
void srv_sched_stats(srv_sched *s, srv_gauges *g, srv_hist *ttft, srv_hist *itl, uint64_t *generated,
                     uint64_t *prompt);

/* Appends the per-layer expert load (summed over every finished sequence) to b. */
void srv_sched_render_experts(srv_sched *s, srv_buf *b);

/* srv_out / srv_tokvec helpers */
void srv_out_init(srv_out *o);
void srv_out_free(srv_out *o);
void srv_out_clear(srv_out *o);  /* empties, keeps the storage */
int srv_tokvec_push(srv_tokvec *v, const srv_tok *t);
void srv_tokvec_free(srv_tokvec *v);

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
/* Connects the scheduler (created after the listener, with srv_http_wake_fn() and h as its wake-up). */
void srv_http_set_sched(srv_http *h, srv_sched *s);
srv_sched_wake_fn srv_http_wake_fn(void);
/* The bound port. */
int srv_http_port(const srv_http *h);
/* Sets the callback run (loop thread) when a shutdown has drained; a failed model load starts a
 * shutdown by itself, with exit code 1. */
void srv_http_on_done(srv_http *h, void (*done)(void *), void *ud);
int srv_http_exit_code(const srv_http *h);
/* Begins graceful shutdown: stop accepting, refuse new completions (503), let in-flight ones run for
 * cfg->grace seconds, then end them (streams get an error event). `done` is called (loop thread)
 * once nothing is in flight. Then: srv_sched_stop, one more wake-up pass (srv_http_wake_fn()(h)),
 * srv_http_free, uv_run until the loop is empty, srv_http_destroy. */
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
