/*
 * metrics.h - Prometheus metrics of `codemoe serve`.
 *
 * The struct is owned by the event-loop thread: only the loop updates and renders it (the worker's
 * numbers arrive as a snapshot, srv_sched_stats, taken under the scheduler's lock), so no field needs
 * a lock or an atomic.
 */
#ifndef CM_SRV_METRICS_H
#define CM_SRV_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define SRV_HIST_MAX_BUCKETS 16

typedef struct srv_hist {
    int n_bounds;
    double bounds[SRV_HIST_MAX_BUCKETS];  /* upper bounds in seconds, ascending; +Inf is implicit */
    uint64_t counts[SRV_HIST_MAX_BUCKETS + 1]; /* non-cumulative; counts[n_bounds] is the +Inf bucket */
    double sum;
    uint64_t count;
} srv_hist;

void srv_hist_init(srv_hist *h, const double *bounds, int n_bounds);
void srv_hist_observe(srv_hist *h, double v);

#define SRV_METRICS_MAX_SERIES 64
#define SRV_TABBY_EVENT_TYPES 3 /* view, select, dismiss (api_tabby_event_kind) */

typedef struct srv_req_series {
    char route[24];   /* a fixed route label ("completions", "models", ...), never the raw path */
    int status;
    uint64_t count;
} srv_req_series;

/* Worker-side gauges, copied from the scheduler (see srv_sched_stats in server.h). */
typedef struct srv_gauges {
    int model_loaded;
    int queue_depth;        /* requests waiting for a slot */
    int requests_running;   /* requests with sequences in the batch */
    int seqs_running;
    int requests_preempted; /* admitted requests parked by preemption (holding KV, not in the batch) */
    uint64_t preemptions;   /* jobs parked to give a waiting client a slot */
    uint64_t nested_steps;  /* newcomers' prompts run inside a running step's forward pass */
    int kv_blocks_total, kv_blocks_used, kv_block_tokens;
    int kv_blocks_cached;   /* in the prefix cache, held by no sequence (evictable) */
    int kv_blocks_available;/* free + cached */
    uint64_t kv_evictions;  /* cached blocks taken back for new positions */
    uint64_t prefix_query_tokens; /* prompt tokens of admitted prompts offered to the cache (all but the last) */
    uint64_t prefix_hit_tokens;   /* of those, reused */
    uint64_t prompt_tokens_computed; /* prompt tokens run through the model */
    uint64_t decode_steps;  /* cm_forward calls */
    uint64_t batch_tokens;  /* tokens over all cm_forward calls */
    uint64_t spec_drafted;  /* prompt-lookup draft tokens verified (--spec-draft) */
    uint64_t spec_accepted; /* of those, the model agreed with (kept) */
    int kv_check;           /* --kv-check is on: kv_check_errors is rendered */
    uint64_t kv_check_errors; /* inconsistent blocks found by cm_ctx_kv_check, summed over steps */
    srv_hist step_tokens;   /* tokens per forward pass (rendered when it has bounds) */
} srv_gauges;

/* One served model's figures, rendered with a model label (the worker's: srv_sched_stats). */
typedef struct srv_model_metrics {
    const char *model;            /* its id: the value of the "model" label */
    srv_gauges g;
    srv_hist ttft;                /* time to first token, seconds */
    srv_hist itl;                 /* inter-token latency, seconds */
    uint64_t prompt_tokens;
    uint64_t generated_tokens;
    int threads;                  /* compute threads it holds of the budget */
    uint64_t mapped_bytes;        /* its model file's mapping (0: unknown) */
    uint64_t cached_bytes;        /* of which pages are in the page cache (mincore) */
    uint64_t resident_bytes;      /* of which pages the process has faulted in (its Rss) */
} srv_model_metrics;

typedef struct srv_metrics {
    srv_req_series series[SRV_METRICS_MAX_SERIES];
    int n_series;
    uint64_t series_dropped;      /* (route, status) pairs beyond the table: counted, not labelled */
    uint64_t cancelled;           /* generations ended because the client left */
    uint64_t timeouts;            /* generations ended by --request-timeout */
    uint64_t rejected_queue_full; /* 429s */
    uint64_t slow_readers;        /* streams ended because the client did not read */
    uint64_t connections_active;
    uint64_t routing_store_bytes;   /* the routing record store: serialized bytes held */
    uint64_t routing_store_records; /* and records */
    uint64_t conn_open;           /* TCP connections admitted and not closed yet (conn.c) */
    uint64_t conn_rejected_limit; /* refused with 503: --max-connections reached */
    uint64_t conn_rejected_per_ip;/* refused with 503: --max-conn-per-ip reached */
    uint64_t conn_header_timeouts;/* shut down: headers not complete within --header-timeout */
    uint64_t conn_body_timeouts;  /* shut down: body slower than --min-body-rate */
    const char *tabby_event_type[SRV_TABBY_EVENT_TYPES]; /* Tabby's telemetry (POST /v1/events): each kind's
                                     label (a static string from api/), NULL until one is seen */
    uint64_t tabby_events[SRV_TABBY_EVENT_TYPES];
    srv_hist ttft, itl;           /* bucket layouts only: the workers keep the counts (srv_model_metrics) */
    srv_hist e2e;                 /* request duration of completions, seconds */
    srv_hist step_tokens;         /* bucket layout only: the worker keeps the counts (srv_gauges) */
} srv_metrics;

void srv_metrics_init(srv_metrics *m);
void srv_metrics_count_request(srv_metrics *m, const char *route, int status);
/* One Tabby telemetry event of kind (0 <= kind < SRV_TABBY_EVENT_TYPES) labelled type (static). */
void srv_metrics_count_tabby_event(srv_metrics *m, int kind, const char *type);
/* Renders the Prometheus text exposition format (version 0.0.4) into a malloc'ed string that the
 * caller frees; NULL on allocation failure. The process's series, then each metric of a model once, with
 * a series per model of models (n of them; the names are unique) labelled model="id". */
char *srv_metrics_render(const srv_metrics *m, const srv_model_metrics *models, int n, size_t *len);
/* Writes model="value" with value escaped for the exposition format (\\, \", \n), truncated to fit cap. */
void srv_metrics_model_label(const char *model, char *out, size_t cap);

#endif
