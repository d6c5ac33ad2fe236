/*
 * test_server_units.c - the server's self-contained modules: API key checks (constant-time compare,
 * Bearer parsing, key files), request ids, the Prometheus rendering (cumulative buckets, series
 * table, the expert load series), the routing retention ring (FIFO eviction), and the bounded byte
 * buffer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "metrics.h"
#include "sbuf.h"
#include "server.h"
#include "test.h"

TEST(ct_equal_matches_memcmp) {
    ASSERT_TRUE(srv_ct_equal("abc", 3, "abc", 3));
    ASSERT_TRUE(!srv_ct_equal("abc", 3, "abd", 3));
    ASSERT_TRUE(!srv_ct_equal("abc", 3, "abcabc", 6)); /* cyclic reading must not make a prefix match */
    ASSERT_TRUE(!srv_ct_equal("abcabc", 6, "abc", 3));
    ASSERT_TRUE(!srv_ct_equal("", 0, "a", 1));
    ASSERT_TRUE(srv_ct_equal("", 0, "", 0));
}

TEST(keys_check_bearer) {
    srv_keys k;
    srv_keys_init(&k);
    ASSERT_EQ_INT(srv_keys_check(&k, NULL), 1); /* no keys: open */
    ASSERT_EQ_INT(srv_keys_add(&k, "  sk-one \n"), 0);
    ASSERT_EQ_INT(srv_keys_add(&k, "   "), -1);
    ASSERT_EQ_INT(srv_keys_add(&k, "sk-two"), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, NULL), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, ""), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer"), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer "), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer sk-one"), 1);
    ASSERT_EQ_INT(srv_keys_check(&k, "bearer sk-two"), 1);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer sk-one "), 1);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer sk-on"), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer sk-onex"), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "Basic sk-one"), 0);
    ASSERT_EQ_INT(srv_keys_check(&k, "sk-one"), 0);
    srv_keys_free(&k);
}

TEST(keys_load_file) {
    char path[] = "/tmp/cm_keys_XXXXXX";
    int fd = mkstemp(path);
    ASSERT_TRUE(fd >= 0);
    const char *txt = "# comment\n\nkey-a\n  key-b  \n#key-c\n";
    ASSERT_EQ_INT(write(fd, txt, strlen(txt)), (long long)strlen(txt));
    close(fd);
    srv_keys k;
    srv_keys_init(&k);
    ASSERT_EQ_INT(srv_keys_load_file(&k, path), 2);
    unlink(path);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer key-a"), 1);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer key-b"), 1);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer key-c"), 0);
    ASSERT_EQ_INT(srv_keys_load_file(&k, "/nonexistent/keys"), -1);
    srv_keys_free(&k);
}

TEST(request_ids) {
    ASSERT_TRUE(srv_request_id_ok("abc-123_X.y:z"));
    ASSERT_TRUE(!srv_request_id_ok(""));
    ASSERT_TRUE(!srv_request_id_ok(NULL));
    ASSERT_TRUE(!srv_request_id_ok("a b"));
    ASSERT_TRUE(!srv_request_id_ok("a\"b"));
    ASSERT_TRUE(!srv_request_id_ok("a\nb"));
    char longid[80];
    memset(longid, 'a', 65);
    longid[65] = 0;
    ASSERT_TRUE(!srv_request_id_ok(longid));
    longid[64] = 0;
    ASSERT_TRUE(srv_request_id_ok(longid));
    char a[40], b[40];
    srv_request_id_new(a, sizeof a);
    srv_request_id_new(b, sizeof b);
    ASSERT_EQ_INT(strlen(a), 28);
    ASSERT_TRUE(!strncmp(a, "req-", 4));
    ASSERT_TRUE(srv_request_id_ok(a));
    ASSERT_TRUE(strcmp(a, b) != 0);
}

TEST(metrics_render) {
    srv_metrics m;
    srv_metrics_init(&m);
    srv_metrics_count_request(&m, "completions", 200);
    srv_metrics_count_request(&m, "completions", 200);
    srv_metrics_count_request(&m, "completions", 400);
    srv_hist_observe(&m.ttft, 0.003); /* first bucket (0.005) */
    srv_hist_observe(&m.ttft, 0.2);   /* 0.25 bucket */
    srv_hist_observe(&m.ttft, 1000);  /* +Inf only */
    srv_gauges g = {.model_loaded = 1, .kv_blocks_total = 64, .kv_blocks_used = 3, .kv_blocks_cached = 5,
                    .kv_blocks_available = 61, .kv_evictions = 7, .prefix_query_tokens = 400,
                    .prefix_hit_tokens = 96, .prompt_tokens_computed = 304};
    g.step_tokens = m.step_tokens;
    srv_hist_observe(&g.step_tokens, 1);
    srv_hist_observe(&g.step_tokens, 33);
    size_t len = 0;
    char *t = srv_metrics_render(&m, &g, &len);
    ASSERT_TRUE(t != NULL);
    ASSERT_EQ_INT(strlen(t), len);
    ASSERT_TRUE(strstr(t, "codemoe_requests_total{route=\"completions\",status=\"200\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_requests_total{route=\"completions\",status=\"400\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{le=\"60\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_count 3\n"));
    ASSERT_TRUE(strstr(t, "codemoe_kv_blocks_used 3\n"));
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_blocks gauge\ncodemoe_kv_blocks 64\n"));
    /* Prometheus keeps the _total suffix for counters (promtool flags a gauge named so) */
    for (const char *g = strstr(t, "# TYPE "); g; g = strstr(g + 1, "# TYPE ")) {
        const char *sp = strchr(g + 7, ' ');
        ASSERT_TRUE(sp);
        if (!strncmp(sp, " gauge", 6)) ASSERT_TRUE(sp - (g + 7) < 6 || strncmp(sp - 6, "_total", 6) != 0);
    }
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_inter_token_latency_seconds histogram\n"));
    /* KV pool and prefix cache */
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_blocks_cached gauge\ncodemoe_kv_blocks_cached 5\n"));
    ASSERT_TRUE(strstr(t, "codemoe_kv_blocks_available 61\n"));
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_evictions_total counter\ncodemoe_kv_evictions_total 7\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_query_tokens_total 400\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_hit_tokens_total 96\n"));
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_prefix_cache_hit_ratio gauge\ncodemoe_prefix_cache_hit_ratio 0.23999999999999999\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prompt_tokens_computed_total 304\n"));
    ASSERT_TRUE(strstr(t, "codemoe_step_tokens_bucket{le=\"32\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_step_tokens_bucket{le=\"64\"} 2\n"));
    ASSERT_TRUE(!strstr(t, "codemoe_kv_check_errors")); /* only with --kv-check */
    free(t);
    g.kv_check = 1;
    g.kv_check_errors = 0;
    g.prefix_query_tokens = 0; /* no query yet: the ratio is 0, not NaN */
    t = srv_metrics_render(&m, &g, &len);
    ASSERT_TRUE(t != NULL);
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_check_errors gauge\ncodemoe_kv_check_errors 0\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_hit_ratio 0\n"));
    free(t);
    /* the series table is bounded: overflow is counted, not labelled */
    for (int s = 0; s < SRV_METRICS_MAX_SERIES + 5; s++) srv_metrics_count_request(&m, "x", 1000 + s);
    ASSERT_EQ_INT(m.n_series, SRV_METRICS_MAX_SERIES);
    ASSERT_EQ_INT(m.series_dropped, 7);
}

TEST(retention_evicts_oldest) {
    srv_retention *r = srv_retention_create(3);
    ASSERT_TRUE(r != NULL);
    char id[16];
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof id, "cmpl-%d", i);
        srv_retention_put(r, id, json_integer(i));
    }
    ASSERT_TRUE(srv_retention_get(r, "cmpl-0") == NULL);
    ASSERT_TRUE(srv_retention_get(r, "cmpl-1") == NULL);
    ASSERT_EQ_INT(json_integer_value(srv_retention_get(r, "cmpl-2")), 2);
    ASSERT_EQ_INT(json_integer_value(srv_retention_get(r, "cmpl-4")), 4);
    srv_retention_put(r, "cmpl-4", json_integer(44)); /* replace in place, evicts nothing */
    ASSERT_EQ_INT(json_integer_value(srv_retention_get(r, "cmpl-4")), 44);
    ASSERT_EQ_INT(json_integer_value(srv_retention_get(r, "cmpl-2")), 2);
    ASSERT_TRUE(srv_retention_get(r, "nope") == NULL);
    srv_retention_free(r);
    srv_retention *z = srv_retention_create(0); /* retention off */
    srv_retention_put(z, "a", json_integer(1));
    ASSERT_TRUE(srv_retention_get(z, "a") == NULL);
    srv_retention_free(z);
}

/* The server's expert load (an api_route_agg, api/routing.c) as Prometheus series: one per level,
 * layer, expert and phase with the summed counts, and nothing but the HELP/TYPE lines for a dense model. */
TEST(expert_metrics_render) {
    cm_route_count tok[2 * 3] = {{{1, 2}, {0.5, 1.0}}}, seg[2 * 2] = {{{0, 0}, {0, 0}}, {{4, 0}, {2.0, 0}}};
    tok[3 * 1 + 2] = (cm_route_count){{3, 1}, {1.5, 0.25}}; /* layer 1, expert 2 */
    cm_routing r = {.n_layer = 2, .n_tok_experts = 3, .shared_expert = 0, .n_seg_experts = 2, .window = 8,
                    .n_windows = 0, .n_adapters = 0, .tok = tok, .seg = seg};
    api_route_agg a = {0};
    srv_buf b;
    srv_buf_init(&b, 0);
    srv_expert_metrics_render(&a, NULL, &b);
    ASSERT_TRUE(strstr(b.data, "# TYPE codemoe_expert_tokens_total counter\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{") == NULL);
    srv_buf_free(&b);
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    srv_buf_init(&b, 0);
    srv_expert_metrics_render(&a, NULL, &b);
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{level=\"token\",layer=\"1\",expert=\"2\",phase=\"prompt\"} 6\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{level=\"token\",layer=\"1\",expert=\"2\",phase=\"generated\"} 2\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{level=\"segment\",layer=\"0\",expert=\"1\",phase=\"prompt\"} 8\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_adapter_tokens_total") == NULL);
    srv_buf_free(&b);
    api_route_agg_free(&a);
}

/* A sparse MoE (128 experts, no shared one, no segment level): a series for every expert, none for segments. */
TEST(expert_metrics_sparse) {
    cm_route_count tok[128] = {{{0, 0}, {0, 0}}};
    tok[127] = (cm_route_count){{7, 3}, {3.5, 1.5}};
    cm_routing r = {.n_layer = 1, .n_tok_experts = 128, .shared_expert = -1, .tok = tok};
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    srv_buf b;
    srv_buf_init(&b, 0);
    srv_expert_metrics_render(&a, NULL, &b);
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{level=\"token\",layer=\"0\",expert=\"127\",phase=\"prompt\"} 7\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{level=\"token\",layer=\"0\",expert=\"0\",phase=\"generated\"} 0\n"));
    ASSERT_TRUE(strstr(b.data, "level=\"segment\"") == NULL);
    srv_buf_free(&b);
    api_route_agg_free(&a);
}

TEST(buf_limit) {
    srv_buf b;
    srv_buf_init(&b, 10);
    ASSERT_EQ_INT(srv_buf_puts(&b, "12345"), 0);
    ASSERT_EQ_INT(srv_buf_printf(&b, "%d", 67890), 0);
    ASSERT_EQ_INT(b.len, 10);
    ASSERT_EQ_INT(srv_buf_puts(&b, "x"), -1); /* over the limit: refused, contents intact */
    ASSERT_TRUE(b.failed);
    ASSERT_STREQ(b.data, "1234567890");
    srv_buf_consume(&b, 4);
    ASSERT_STREQ(b.data, "567890");
    srv_buf_free(&b);
    srv_buf_init(&b, 0);
    for (int i = 0; i < 1000; i++) srv_buf_printf(&b, "%04d", i);
    ASSERT_EQ_INT(b.len, 4000);
    ASSERT_TRUE(!memcmp(b.data + 3996, "0999", 4));
    size_t n;
    char *s = srv_buf_take(&b, &n);
    ASSERT_EQ_INT(n, 4000);
    ASSERT_EQ_INT(b.len, 0);
    free(s);
}

int main(void) {
    RUN(ct_equal_matches_memcmp);
    RUN(keys_check_bearer);
    RUN(keys_load_file);
    RUN(request_ids);
    RUN(metrics_render);
    RUN(retention_evicts_oldest);
    RUN(expert_metrics_render);
    RUN(expert_metrics_sparse);
    RUN(buf_limit);
    return test_summary();
}
