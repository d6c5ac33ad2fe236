/*
 * metrics.c - counters and histograms of `codemoe serve`, rendered as Prometheus text.
 * Owned by the event-loop thread (see metrics.h); every name is prefixed codemoe_.
 */
#include "metrics.h"

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

char *srv_metrics_render(const srv_metrics *m, const srv_gauges *g, size_t *len) {
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
    render_scalar(&b, "codemoe_prompt_tokens_total", "counter", "Prompt tokens processed (all choices).",
                  (double)m->prompt_tokens);
    render_scalar(&b, "codemoe_generated_tokens_total", "counter", "Tokens generated.",
                  (double)m->generated_tokens);
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
    render_hist(&b, "codemoe_time_to_first_token_seconds", "Time from request arrival to the first generated token.",
                &m->ttft);
    render_hist(&b, "codemoe_inter_token_latency_seconds", "Time between consecutive generated tokens of a sequence.",
                &m->itl);
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
    render_scalar(&b, "codemoe_model_loaded", "gauge", "1 when the model is loaded and serving.",
                  (double)g->model_loaded);
    render_scalar(&b, "codemoe_queue_depth", "gauge", "Completion requests waiting for a batch slot.",
                  (double)g->queue_depth);
    render_scalar(&b, "codemoe_requests_running", "gauge", "Completion requests being generated.",
                  (double)g->requests_running);
    render_scalar(&b, "codemoe_sequences_running", "gauge", "Sequences (choices) in the batch.",
                  (double)g->seqs_running);
    render_scalar(&b, "codemoe_kv_blocks", "gauge", "KV cache blocks in the pool.", (double)g->kv_blocks_total);
    render_scalar(&b, "codemoe_kv_blocks_used", "gauge", "KV cache blocks in use.", (double)g->kv_blocks_used);
    render_scalar(&b, "codemoe_kv_block_tokens", "gauge", "Tokens per KV cache block.", (double)g->kv_block_tokens);
    render_scalar(&b, "codemoe_kv_blocks_cached", "gauge",
                  "KV cache blocks kept in the prefix cache and held by no request (evictable).",
                  (double)g->kv_blocks_cached);
    render_scalar(&b, "codemoe_kv_blocks_available", "gauge",
                  "KV cache blocks new positions can take (free + cached).", (double)g->kv_blocks_available);
    render_scalar(&b, "codemoe_kv_evictions_total", "counter",
                  "Cached KV blocks evicted to make room for new positions.", (double)g->kv_evictions);
    render_scalar(&b, "codemoe_prefix_cache_query_tokens_total", "counter",
                  "Prompt tokens looked up in the prefix cache (each prompt but its last token).",
                  (double)g->prefix_query_tokens);
    render_scalar(&b, "codemoe_prefix_cache_hit_tokens_total", "counter",
                  "Prompt tokens reused from the prefix cache instead of computed.", (double)g->prefix_hit_tokens);
    render_scalar(&b, "codemoe_prefix_cache_hit_ratio", "gauge",
                  "Prefix cache hit tokens / query tokens since start (0 before any query).",
                  g->prefix_query_tokens ? (double)g->prefix_hit_tokens / (double)g->prefix_query_tokens : 0.0);
    render_scalar(&b, "codemoe_prompt_tokens_computed_total", "counter",
                  "Prompt tokens run through the model (cache hits and forked choices are not recomputed).",
                  (double)g->prompt_tokens_computed);
    if (g->kv_check)
        render_scalar(&b, "codemoe_kv_check_errors", "gauge",
                      "Inconsistent KV blocks found by the per-step pool check (--kv-check); must stay 0.",
                      (double)g->kv_check_errors);
    if (g->step_tokens.n_bounds)
        render_hist(&b, "codemoe_step_tokens", "Tokens per batched forward pass (decode and prefill).",
                    &g->step_tokens);
    render_scalar(&b, "codemoe_decode_steps_total", "counter", "Batched forward passes run.",
                  (double)g->decode_steps);
    render_scalar(&b, "codemoe_batch_tokens_total", "counter", "Tokens processed over all forward passes.",
                  (double)g->batch_tokens);
    if (b.failed) { srv_buf_free(&b); return NULL; }
    return srv_buf_take(&b, len);
}
