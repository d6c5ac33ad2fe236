/*
 * metrics.c - counters and histograms of `codemoe serve`, rendered as Prometheus text.
 * Owned by the event-loop thread (see metrics.h); every name is prefixed codemoe_.
 */
#include "metrics.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "sbuf.h"

void srv_hist_init(srv_hist *h, const double *bounds, int n_bounds) {
    memset(h, 0, sizeof *h);
    if (n_bounds > SRV_HIST_MAX_BUCKETS) n_bounds = SRV_HIST_MAX_BUCKETS;
    h->n_bounds = n_bounds;
    memcpy(h->bounds, bounds, (size_t)n_bounds * sizeof *bounds);
}

void srv_hist_observe(srv_hist *h, double v) {
    if (!(v >= 0)) v = 0; /* NaN or a clock step backwards: count it in the first bucket */
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

void srv_metrics_init(srv_metrics *m) {
    static const double ttft[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
    static const double e2e[] = {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
    static const double step[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
    memset(m, 0, sizeof *m);
    srv_hist_init(&m->ttft, ttft, (int)(sizeof ttft / sizeof *ttft));
    srv_hist_init(&m->itl, itl, (int)(sizeof itl / sizeof *itl));
    srv_hist_init(&m->e2e, e2e, (int)(sizeof e2e / sizeof *e2e));
    srv_hist_init(&m->step_tokens, step, (int)(sizeof step / sizeof *step));
}

void srv_metrics_count_request(srv_metrics *m, const char *route, int status) {
    for (int i = 0; i < m->n_series; i++) {
        srv_req_series *s = &m->series[i];
        if (s->status == status && !strcmp(s->route, route)) { s->count++; return; }
    }
    if (m->n_series == SRV_METRICS_MAX_SERIES) { m->series_dropped++; return; }
    srv_req_series *s = &m->series[m->n_series++];
    snprintf(s->route, sizeof s->route, "%s", route);
    s->status = status;
    s->count = 1;
}

void srv_metrics_count_tabby_event(srv_metrics *m, int kind, const char *type) {
    if (kind < 0 || kind >= SRV_TABBY_EVENT_TYPES) return;
    m->tabby_event_type[kind] = type;
    m->tabby_events[kind]++;
}

static void render_hist(srv_buf *b, const char *name, const char *help, const srv_hist *h) {
    srv_buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        srv_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    srv_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    srv_buf_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->count);
}

static void render_scalar(srv_buf *b, const char *name, const char *type, const char *help, double v) {
    srv_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

void srv_metrics_model_label(const char *model, char *out, size_t cap) {
    size_t n = 0;
    const char pre[] = "model=\"";
    if (cap < sizeof pre + 1) { if (cap) out[0] = 0; return; }
    memcpy(out, pre, sizeof pre - 1);
    n = sizeof pre - 1;
    for (const char *p = model; *p && n + 3 < cap; p++) {
        if (*p == '\\' || *p == '"') { out[n++] = '\\'; out[n++] = *p; }
        else if (*p == '\n') { out[n++] = '\\'; out[n++] = 'n'; }
        else out[n++] = *p;
    }
    out[n++] = '"';
    out[n] = 0;
}

/* A histogram's series with the label set lab (e.g. model="x") before le. */
static void render_hist_series(srv_buf *b, const char *name, const char *lab, const srv_hist *h) {
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        srv_buf_printf(b, "%s_bucket{%s,le=\"%g\"} %llu\n", name, lab, h->bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    srv_buf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, lab, (unsigned long long)cum);
    srv_buf_printf(b, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, lab, h->sum, name, lab, (unsigned long long)h->count);
}

/* The figure of each model a metric has, read by offset (as double, int, or uint64_t). */
enum { F_U64, F_INT, F_RATIO, F_HIST };
typedef struct model_metric {
    const char *name, *type, *help;
    int kind;
    size_t off;       /* into srv_model_metrics */
} model_metric;

#define MM(f) offsetof(srv_model_metrics, f)
static const model_metric model_metrics[] = {
    {"codemoe_prompt_tokens_total", "counter", "Prompt tokens processed (all choices).", F_U64, MM(prompt_tokens)},
    {"codemoe_generated_tokens_total", "counter", "Tokens generated.", F_U64, MM(generated_tokens)},
    {"codemoe_time_to_first_token_seconds", "histogram", "Time from request arrival to the first generated token.",
     F_HIST, MM(ttft)},
    {"codemoe_inter_token_latency_seconds", "histogram", "Time between consecutive generated tokens of a sequence.",
     F_HIST, MM(itl)},
    {"codemoe_model_loaded", "gauge", "1 when the model is loaded and serving.", F_INT, MM(g.model_loaded)},
    {"codemoe_model_threads", "gauge", "Compute threads the model holds of the --threads budget.", F_INT, MM(threads)},
    {"codemoe_model_mapped_bytes", "gauge", "Bytes of the model file mapped into memory.", F_U64, MM(mapped_bytes)},
    {"codemoe_model_cached_bytes", "gauge",
     "Bytes of the model file in the page cache (mincore over its mapping, measured every few seconds).", F_U64,
     MM(cached_bytes)},
    {"codemoe_model_resident_bytes", "gauge",
     "Bytes of the model file's mapping this process has faulted in (its Rss, measured every few seconds).", F_U64,
     MM(resident_bytes)},
    {"codemoe_queue_depth", "gauge", "Completion requests waiting for a batch slot.", F_INT, MM(g.queue_depth)},
    {"codemoe_requests_running", "gauge", "Completion requests being generated.", F_INT, MM(g.requests_running)},
    {"codemoe_sequences_running", "gauge", "Sequences (choices) in the batch.", F_INT, MM(g.seqs_running)},
    {"codemoe_requests_preempted", "gauge",
     "Completion requests preempted and not resumed yet (they keep their KV blocks, out of the batch).", F_INT,
     MM(g.requests_preempted)},
    {"codemoe_preemptions_total", "counter",
     "Running requests preempted to give a slot to a client with nothing admitted.", F_U64, MM(g.preemptions)},
    {"codemoe_nested_steps_total", "counter",
     "Steps that ran a newcomer's prompt inside another step's forward pass (nested steps).", F_U64,
     MM(g.nested_steps)},
    {"codemoe_kv_blocks", "gauge", "KV cache blocks in the pool.", F_INT, MM(g.kv_blocks_total)},
    {"codemoe_kv_blocks_used", "gauge", "KV cache blocks in use.", F_INT, MM(g.kv_blocks_used)},
    {"codemoe_kv_block_tokens", "gauge", "Tokens per KV cache block.", F_INT, MM(g.kv_block_tokens)},
    {"codemoe_kv_blocks_cached", "gauge", "KV cache blocks kept in the prefix cache and held by no request (evictable).",
     F_INT, MM(g.kv_blocks_cached)},
    {"codemoe_kv_blocks_available", "gauge", "KV cache blocks new positions can take (free + cached).", F_INT,
     MM(g.kv_blocks_available)},
    {"codemoe_kv_evictions_total", "counter", "Cached KV blocks evicted to make room for new positions.", F_U64,
     MM(g.kv_evictions)},
    {"codemoe_prefix_cache_query_tokens_total", "counter",
     "Prompt tokens looked up in the prefix cache (each prompt but its last token).", F_U64, MM(g.prefix_query_tokens)},
    {"codemoe_prefix_cache_hit_tokens_total", "counter", "Prompt tokens reused from the prefix cache instead of computed.",
     F_U64, MM(g.prefix_hit_tokens)},
    {"codemoe_prefix_cache_hit_ratio", "gauge", "Prefix cache hit tokens / query tokens since start (0 before any query).",
     F_RATIO, 0},
    {"codemoe_prompt_tokens_computed_total", "counter",
     "Prompt tokens run through the model (cache hits and forked choices are not recomputed).", F_U64,
     MM(g.prompt_tokens_computed)},
    {"codemoe_kv_check_errors", "gauge",
     "Inconsistent KV blocks found by the per-step pool check (--kv-check); must stay 0.", F_U64, MM(g.kv_check_errors)},
    {"codemoe_step_tokens", "histogram", "Tokens per batched forward pass (decode and prefill).", F_HIST,
     MM(g.step_tokens)},
    {"codemoe_decode_steps_total", "counter", "Batched forward passes run.", F_U64, MM(g.decode_steps)},
    {"codemoe_batch_tokens_total", "counter", "Tokens processed over all forward passes.", F_U64, MM(g.batch_tokens)},
    {"codemoe_spec_draft_tokens_total", "counter",
     "Prompt-lookup draft tokens verified in forward passes (--spec-draft).", F_U64, MM(g.spec_drafted)},
    {"codemoe_spec_accepted_tokens_total", "counter",
     "Draft tokens the model agreed with: generated without a forward pass of their own.", F_U64, MM(g.spec_accepted)},
};
#undef MM

/* Whether model k has the metric: --kv-check's only with it, the step histogram once it has bounds. */
static int model_has(const model_metric *mm, const srv_model_metrics *k) {
    if (!strcmp(mm->name, "codemoe_kv_check_errors")) return k->g.kv_check;
    if (!strcmp(mm->name, "codemoe_step_tokens")) return k->g.step_tokens.n_bounds > 0;
    if (!strncmp(mm->name, "codemoe_model_", 14) && strstr(mm->name, "_bytes")) return k->mapped_bytes > 0;
    return 1;
}

static void render_models(srv_buf *b, const srv_model_metrics *models, int n) {
    for (size_t i = 0; i < sizeof model_metrics / sizeof *model_metrics; i++) {
        const model_metric *mm = &model_metrics[i];
        int any = 0;
        for (int k = 0; k < n; k++) any |= model_has(mm, &models[k]);
        if (!any) continue;
        srv_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", mm->name, mm->help, mm->name, mm->type);
        for (int k = 0; k < n; k++) {
            const srv_model_metrics *x = &models[k];
            if (!model_has(mm, x)) continue;
            char lab[300];
            srv_metrics_model_label(x->model, lab, sizeof lab);
            const char *base = (const char *)x + mm->off;
            double v = 0;
            switch (mm->kind) {
            case F_HIST: render_hist_series(b, mm->name, lab, (const srv_hist *)base); continue;
            case F_U64: v = (double)*(const uint64_t *)base; break;
            case F_INT: v = (double)*(const int *)base; break;
            case F_RATIO:
                v = x->g.prefix_query_tokens ? (double)x->g.prefix_hit_tokens / (double)x->g.prefix_query_tokens : 0.0;
                break;
            }
            srv_buf_printf(b, "%s{%s} %.17g\n", mm->name, lab, v);
        }
    }
}

char *srv_metrics_render(const srv_metrics *m, const srv_model_metrics *models, int n, size_t *len) {
    srv_buf b;
    srv_buf_init(&b, 0);
    srv_buf_puts(&b, "# HELP codemoe_requests_total HTTP requests by route and status code.\n"
                     "# TYPE codemoe_requests_total counter\n");
    for (int i = 0; i < m->n_series; i++)
        srv_buf_printf(&b, "codemoe_requests_total{route=\"%s\",status=\"%d\"} %llu\n", m->series[i].route,
                       m->series[i].status, (unsigned long long)m->series[i].count);
    if (m->series_dropped)
        srv_buf_printf(&b, "codemoe_requests_total{route=\"other\",status=\"other\"} %llu\n",
                       (unsigned long long)m->series_dropped);
    render_scalar(&b, "codemoe_requests_cancelled_total", "counter",
                  "Generations cancelled because the client disconnected.", (double)m->cancelled);
    render_scalar(&b, "codemoe_requests_timed_out_total", "counter",
                  "Generations ended by the request timeout.", (double)m->timeouts);
    render_scalar(&b, "codemoe_requests_rejected_total", "counter",
                  "Completion requests rejected with 429 because the queue was full.",
                  (double)m->rejected_queue_full);
    srv_buf_puts(&b, "# HELP codemoe_tabby_events_total Tabby agent completion events (POST /v1/events) by type.\n"
                     "# TYPE codemoe_tabby_events_total counter\n");
    for (int i = 0; i < SRV_TABBY_EVENT_TYPES; i++)
        if (m->tabby_event_type[i])
            srv_buf_printf(&b, "codemoe_tabby_events_total{type=\"%s\"} %llu\n", m->tabby_event_type[i],
                           (unsigned long long)m->tabby_events[i]);
    render_scalar(&b, "codemoe_slow_reader_streams_total", "counter",
                  "Streams ended because the client did not read fast enough.", (double)m->slow_readers);
    render_hist(&b, "codemoe_request_duration_seconds", "Duration of completion requests.", &m->e2e);
    render_scalar(&b, "codemoe_http_connections", "gauge", "Open HTTP requests being handled.",
                  (double)m->connections_active);
    render_scalar(&b, "codemoe_routing_store_bytes", "gauge",
                  "Serialized bytes of the routing records kept for GET /v1/completions/{id}/routing.",
                  (double)m->routing_store_bytes);
    render_scalar(&b, "codemoe_routing_store_records", "gauge", "Routing records kept.",
                  (double)m->routing_store_records);
    render_scalar(&b, "codemoe_tcp_connections", "gauge", "Open client TCP connections.", (double)m->conn_open);
    srv_buf_printf(&b, "# HELP codemoe_connections_rejected_total Connections answered 503 and closed at accept.\n"
                       "# TYPE codemoe_connections_rejected_total counter\n"
                       "codemoe_connections_rejected_total{reason=\"max_connections\"} %llu\n"
                       "codemoe_connections_rejected_total{reason=\"max_conn_per_ip\"} %llu\n",
                   (unsigned long long)m->conn_rejected_limit, (unsigned long long)m->conn_rejected_per_ip);
    srv_buf_printf(&b, "# HELP codemoe_connections_timed_out_total Connections shut down for slow headers or a slow body.\n"
                       "# TYPE codemoe_connections_timed_out_total counter\n"
                       "codemoe_connections_timed_out_total{phase=\"headers\"} %llu\n"
                       "codemoe_connections_timed_out_total{phase=\"body\"} %llu\n",
                   (unsigned long long)m->conn_header_timeouts, (unsigned long long)m->conn_body_timeouts);
    render_models(&b, models, n);
    if (b.failed) { srv_buf_free(&b); return NULL; }
    return srv_buf_take(&b, len);
}
