/*
 * test_server_units.c - the server's self-contained modules: API key checks (constant-time compare,
 * Bearer parsing, key files), request ids, the Prometheus rendering (cumulative buckets, series
 * table, the expert load series), the routing record store (FIFO eviction by count and by
 * serialized bytes, owners), who may read a record, the bounded byte buffer, and connection admission
 * and deadlines (conn.c, on a real loopback listener), the playground's embedded files and status record (ui.c).
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "auth.h"
#include "conn.h"
#include "metrics.h"
#include "sbuf.h"
#include "server.h"
#include "test.h"
#include "ui.h"

TEST(ct_equal_matches_memcmp) {
    ASSERT_TRUE(srv_ct_equal("abc", 3, "abc", 3));
    ASSERT_TRUE(!srv_ct_equal("abc", 3, "abd", 3));
    ASSERT_TRUE(!srv_ct_equal("abc", 3, "abcabc", 6)); /* cyclic reading must not make a prefix match */
    ASSERT_TRUE(!srv_ct_equal("abcabc", 6, "abc", 3));
    ASSERT_TRUE(!srv_ct_equal("", 0, "a", 1));
    ASSERT_TRUE(srv_ct_equal("", 0, "", 0));
}

/* srv_keys_find names the key a header carries; what a completion's creator may read back is
 * readable by that key and admin keys only (and by everyone when no keys are configured). */
TEST(keys_owner_and_admin) {
    srv_keys k;
    srv_keys_init(&k);
    ASSERT_EQ_INT(srv_keys_find(&k, NULL), SRV_KEY_OPEN);
    ASSERT_EQ_INT(srv_keys_may_read(&k, SRV_KEY_OPEN, SRV_KEY_OPEN), 1);
    ASSERT_EQ_INT(srv_keys_add(&k, "sk-a"), 0);
    ASSERT_EQ_INT(srv_keys_add(&k, "sk-b"), 0);
    ASSERT_EQ_INT(srv_keys_add_admin(&k, "sk-admin"), 0);
    ASSERT_EQ_INT(srv_keys_find(&k, "Bearer sk-a"), 0);
    ASSERT_EQ_INT(srv_keys_find(&k, "Bearer sk-b"), 1);
    ASSERT_EQ_INT(srv_keys_find(&k, "Bearer sk-admin"), 2);
    ASSERT_EQ_INT(srv_keys_find(&k, "Bearer sk-c"), SRV_KEY_NONE);
    ASSERT_EQ_INT(srv_keys_find(&k, NULL), SRV_KEY_NONE);
    ASSERT_EQ_INT(srv_keys_check(&k, "Bearer sk-admin"), 1); /* an admin key is a key */
    ASSERT_TRUE(srv_keys_is_admin(&k, 2) && !srv_keys_is_admin(&k, 0) && !srv_keys_is_admin(&k, SRV_KEY_OPEN));
    ASSERT_EQ_INT(srv_keys_may_read(&k, 0, 0), 1);
    ASSERT_EQ_INT(srv_keys_may_read(&k, 1, 0), 0);
    ASSERT_EQ_INT(srv_keys_may_read(&k, 0, 1), 0);
    ASSERT_EQ_INT(srv_keys_may_read(&k, 2, 0), 1);
    ASSERT_EQ_INT(srv_keys_may_read(&k, 2, 1), 1);
    ASSERT_EQ_INT(srv_keys_may_read(&k, SRV_KEY_NONE, SRV_KEY_NONE), 0);
    ASSERT_EQ_INT(srv_keys_may_read(&k, SRV_KEY_OPEN, 0), 0); /* keys came later: no open reader */
    srv_keys_free(&k);
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
    srv_model_metrics mm[2] = {{.model = "a"}, {.model = "b\"\\"}};
    mm[0].ttft = mm[1].ttft = m.ttft;
    mm[0].itl = mm[1].itl = m.itl;
    srv_hist_observe(&mm[0].ttft, 0.003); /* first bucket (0.005) */
    srv_hist_observe(&mm[0].ttft, 0.2);   /* 0.25 bucket */
    srv_hist_observe(&mm[0].ttft, 1000);  /* +Inf only */
    srv_gauges g = {.model_loaded = 1, .kv_blocks_total = 64, .kv_blocks_used = 3, .kv_blocks_cached = 5,
                    .kv_blocks_available = 61, .kv_evictions = 7, .prefix_query_tokens = 400,
                    .prefix_hit_tokens = 96, .prompt_tokens_computed = 304};
    g.step_tokens = m.step_tokens;
    srv_hist_observe(&g.step_tokens, 1);
    srv_hist_observe(&g.step_tokens, 33);
    mm[0].g = g;
    mm[1].g.kv_blocks_total = 8;
    mm[1].threads = 3;
    size_t len = 0;
    char *t = srv_metrics_render(&m, mm, 2, &len);
    ASSERT_TRUE(t != NULL);
    ASSERT_EQ_INT(strlen(t), len);
    ASSERT_TRUE(strstr(t, "codemoe_requests_total{route=\"completions\",status=\"200\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_requests_total{route=\"completions\",status=\"400\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.005\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.1\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.25\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{model=\"a\",le=\"60\"} 2\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_bucket{model=\"a\",le=\"+Inf\"} 3\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_count{model=\"a\"} 3\n"));
    ASSERT_TRUE(strstr(t, "codemoe_kv_blocks_used{model=\"a\"} 3\n"));
    /* one HELP/TYPE per metric, then a series per model; label values escaped */
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_blocks gauge\ncodemoe_kv_blocks{model=\"a\"} 64\n"
                          "codemoe_kv_blocks{model=\"b\\\"\\\\\"} 8\n"));
    ASSERT_TRUE(strstr(t, "codemoe_model_threads{model=\"b\\\"\\\\\"} 3\n"));
    ASSERT_TRUE(strstr(t, "codemoe_time_to_first_token_seconds_count{model=\"b\\\"\\\\\"} 0\n"));
    for (const char *n = t; (n = strstr(n, "# TYPE codemoe_kv_blocks ")); n++) ASSERT_TRUE(n == strstr(t, "# TYPE codemoe_kv_blocks "));
    ASSERT_TRUE(!strstr(t, "codemoe_model_resident_bytes")); /* no mapping known */
    /* Prometheus keeps the _total suffix for counters (promtool flags a gauge named so) */
    for (const char *g = strstr(t, "# TYPE "); g; g = strstr(g + 1, "# TYPE ")) {
        const char *sp = strchr(g + 7, ' ');
        ASSERT_TRUE(sp);
        if (!strncmp(sp, " gauge", 6)) ASSERT_TRUE(sp - (g + 7) < 6 || strncmp(sp - 6, "_total", 6) != 0);
    }
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_inter_token_latency_seconds histogram\n"));
    /* KV pool and prefix cache */
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_blocks_cached gauge\ncodemoe_kv_blocks_cached{model=\"a\"} 5\n"));
    ASSERT_TRUE(strstr(t, "codemoe_kv_blocks_available{model=\"a\"} 61\n"));
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_evictions_total counter\ncodemoe_kv_evictions_total{model=\"a\"} 7\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_query_tokens_total{model=\"a\"} 400\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_hit_tokens_total{model=\"a\"} 96\n"));
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_prefix_cache_hit_ratio gauge\ncodemoe_prefix_cache_hit_ratio{model=\"a\"} 0.23999999999999999\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prompt_tokens_computed_total{model=\"a\"} 304\n"));
    ASSERT_TRUE(strstr(t, "codemoe_step_tokens_bucket{model=\"a\",le=\"32\"} 1\n"));
    ASSERT_TRUE(strstr(t, "codemoe_step_tokens_bucket{model=\"a\",le=\"64\"} 2\n"));
    ASSERT_TRUE(!strstr(t, "codemoe_step_tokens_bucket{model=\"b")); /* no bucket layout: not rendered */
    ASSERT_TRUE(!strstr(t, "codemoe_kv_check_errors")); /* only with --kv-check */
    free(t);
    mm[0].g.kv_check = 1;
    mm[0].g.kv_check_errors = 0;
    mm[0].g.prefix_query_tokens = 0; /* no query yet: the ratio is 0, not NaN */
    mm[0].mapped_bytes = 4096;
    mm[0].resident_bytes = 1024;
    t = srv_metrics_render(&m, mm, 1, &len);
    ASSERT_TRUE(t != NULL);
    ASSERT_TRUE(strstr(t, "# TYPE codemoe_kv_check_errors gauge\ncodemoe_kv_check_errors{model=\"a\"} 0\n"));
    ASSERT_TRUE(strstr(t, "codemoe_prefix_cache_hit_ratio{model=\"a\"} 0\n"));
    ASSERT_TRUE(strstr(t, "codemoe_model_mapped_bytes{model=\"a\"} 4096\n"));
    ASSERT_TRUE(strstr(t, "codemoe_model_resident_bytes{model=\"a\"} 1024\n"));
    ASSERT_TRUE(!strstr(t, "model=\"b")); /* one model given */
    free(t);
    /* no model (all unloaded): the process's series, and no per-model one */
    t = srv_metrics_render(&m, NULL, 0, &len);
    ASSERT_TRUE(t && strstr(t, "codemoe_requests_total{") && !strstr(t, "codemoe_kv_blocks"));
    free(t);
    /* the series table is bounded: overflow is counted, not labelled */
    for (int s = 0; s < SRV_METRICS_MAX_SERIES + 5; s++) srv_metrics_count_request(&m, "x", 1000 + s);
    ASSERT_EQ_INT(m.n_series, SRV_METRICS_MAX_SERIES);
    ASSERT_EQ_INT(m.series_dropped, 7);
}

/* A record's JSON as the store keeps it, compared with the expected text. */
static int ret_is(srv_retention *r, const char *id, const char *want) {
    const char *v = srv_retention_get(r, id, NULL, NULL);
    return v && !strcmp(v, want);
}

TEST(retention_evicts_oldest) {
    srv_retention *r = srv_retention_create(3, 1 << 20);
    ASSERT_TRUE(r != NULL);
    char id[16];
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof id, "cmpl-%d", i);
        json_t *v = json_integer(i);
        ASSERT_EQ_INT(srv_retention_put(r, id, i, v), 0);
        json_decref(v); /* borrowed */
    }
    ASSERT_TRUE(srv_retention_get(r, "cmpl-0", NULL, NULL) == NULL);
    ASSERT_TRUE(srv_retention_get(r, "cmpl-1", NULL, NULL) == NULL);
    ASSERT_TRUE(ret_is(r, "cmpl-2", "2"));
    ASSERT_TRUE(ret_is(r, "cmpl-4", "4"));
    json_t *v = json_integer(44);
    srv_retention_put(r, "cmpl-4", 7, v); /* replaces, evicts nothing */
    json_decref(v);
    int owner = -9;
    size_t len = 0;
    ASSERT_STREQ(srv_retention_get(r, "cmpl-4", &owner, &len), "44");
    ASSERT_EQ_INT(owner, 7);
    ASSERT_EQ_INT(len, 2);
    ASSERT_TRUE(ret_is(r, "cmpl-2", "2"));
    ASSERT_TRUE(ret_is(r, "cmpl-3", "3"));
    ASSERT_EQ_INT(srv_retention_count(r), 3);
    ASSERT_EQ_INT(srv_retention_bytes(r), 4);
    ASSERT_TRUE(srv_retention_get(r, "nope", NULL, NULL) == NULL);
    /* a replaced record became the newest: cmpl-2 goes next */
    v = json_integer(5);
    srv_retention_put(r, "cmpl-5", 0, v);
    json_decref(v);
    ASSERT_TRUE(srv_retention_get(r, "cmpl-2", NULL, NULL) == NULL);
    ASSERT_TRUE(ret_is(r, "cmpl-3", "3") && ret_is(r, "cmpl-4", "44") && ret_is(r, "cmpl-5", "5"));
    srv_retention_free(r);
    srv_retention *z = srv_retention_create(0, 1 << 20); /* retention off */
    v = json_integer(1);
    ASSERT_EQ_INT(srv_retention_put(z, "a", 0, v), -1);
    ASSERT_TRUE(srv_retention_get(z, "a", NULL, NULL) == NULL);
    json_decref(v);
    srv_retention_free(z);
}

/* The byte bound: records are measured serialized, the oldest go first until the new one fits, the
 * total never passes the cap, and a record larger than the cap alone is refused without evicting. */
TEST(retention_bounded_in_bytes) {
    const size_t cap = 1000;
    srv_retention *r = srv_retention_create(1024, cap);
    ASSERT_TRUE(r != NULL);
    char id[16], pad[400];
    size_t total = 0;
    int first_kept = 0;
    size_t sizes[64];
    for (int i = 0; i < 64; i++) {
        /* {"p":"xxx..."}: 8 bytes of framing + a payload of 50..349 bytes */
        size_t n = 50 + (size_t)(i * 37) % 300;
        memset(pad, 'x', n);
        pad[n] = 0;
        json_t *v = json_pack("{s:s}", "p", pad);
        snprintf(id, sizeof id, "cmpl-%d", i);
        ASSERT_EQ_INT(srv_retention_put(r, id, 0, v), 0);
        json_decref(v);
        sizes[i] = n + 8;
        total += sizes[i];
        while (total > cap) total -= sizes[first_kept++];
        ASSERT_EQ_INT(srv_retention_bytes(r), total);
        ASSERT_TRUE(srv_retention_bytes(r) <= cap);
        ASSERT_EQ_INT(srv_retention_count(r), i + 1 - first_kept);
        for (int k = 0; k <= i; k++) {
            snprintf(id, sizeof id, "cmpl-%d", k);
            size_t len = 0;
            const char *got = srv_retention_get(r, id, NULL, &len);
            if ((got != NULL) != (k >= first_kept)) {
                TEST_FAIL_("after put %d: record %d %s (oldest kept should be %d)", i, k, got ? "kept" : "gone",
                           first_kept);
                return;
            }
            if (got) ASSERT_EQ_INT(len, sizes[k]);
        }
    }
    /* too large alone: refused, nothing evicted */
    size_t before = srv_retention_bytes(r);
    char *big = malloc(cap + 1);
    memset(big, 'y', cap);
    big[cap] = 0;
    json_t *v = json_pack("{s:s}", "p", big);
    ASSERT_EQ_INT(srv_retention_put(r, "cmpl-big", 0, v), -1);
    json_decref(v);
    free(big);
    ASSERT_EQ_INT(srv_retention_bytes(r), before);
    ASSERT_TRUE(srv_retention_get(r, "cmpl-big", NULL, NULL) == NULL);
    srv_retention_free(r);
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
    srv_expert_metrics_header(0, &b);
    srv_expert_metrics_render(&a, NULL, "model=\"m\"", 0, &b);
    ASSERT_TRUE(strstr(b.data, "# TYPE codemoe_expert_tokens_total counter\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{") == NULL);
    srv_buf_free(&b);
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    srv_buf_init(&b, 0);
    srv_expert_metrics_render(&a, NULL, "model=\"m\"", 0, &b);
    srv_expert_metrics_render(&a, NULL, "model=\"m\"", 1, &b);
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{model=\"m\",level=\"token\",layer=\"1\",expert=\"2\",phase=\"prompt\"} 6\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{model=\"m\",level=\"token\",layer=\"1\",expert=\"2\",phase=\"generated\"} 2\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{model=\"m\",level=\"segment\",layer=\"0\",expert=\"1\",phase=\"prompt\"} 8\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_adapter_tokens_total") == NULL); /* no adapters */
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
    srv_expert_metrics_render(&a, NULL, "model=\"m\"", 0, &b);
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{model=\"m\",level=\"token\",layer=\"0\",expert=\"127\",phase=\"prompt\"} 7\n"));
    ASSERT_TRUE(strstr(b.data, "codemoe_expert_tokens_total{model=\"m\",level=\"token\",layer=\"0\",expert=\"0\",phase=\"generated\"} 0\n"));
    ASSERT_TRUE(strstr(b.data, "level=\"segment\"") == NULL);
    srv_buf_free(&b);
    api_route_agg_free(&a);
}

/* --model PATH[,key=value...]: the path ends where a known setting starts (a path may hold commas), every
 * setting lands in its field, bad values and unknown keys in JSON are refused, the id defaults to the
 * file name. */
TEST(model_spec_parse) {
    srv_model_spec s;
    char err[200];
    ASSERT_EQ_INT(srv_model_spec_parse("/m/a,b.gguf,id=x,alias=y,alias=z,ctx=2048,kv-size=64MiB,threads=3,parallel=2,"
                                       "kv-type=f32,prefix-cache=0,max-itl-ms=12.5", &s, err, sizeof err), 0);
    ASSERT_TRUE(!strcmp(s.path, "/m/a,b.gguf"));
    ASSERT_TRUE(!strcmp(s.id, "x"));
    ASSERT_EQ_INT(s.n_aliases, 2);
    ASSERT_TRUE(!strcmp(s.aliases[1], "z"));
    ASSERT_EQ_INT(s.n_ctx, 2048);
    ASSERT_EQ_INT(s.kv_size, 64 << 20);
    ASSERT_EQ_INT(s.kv_size_bytes, 1);
    ASSERT_EQ_INT(s.n_threads, 3);
    ASSERT_EQ_INT(s.parallel, 2);
    ASSERT_EQ_INT(s.kv_type, CM_KV_F32);
    ASSERT_EQ_INT(s.prefix_cache, 0);
    ASSERT_TRUE(s.max_itl_ms == 12.5);
    ASSERT_EQ_INT(s.queue, -1); /* not given: the process's */
    ASSERT_EQ_INT(s.pack_output, SRV_PACK_UNSET);
    ASSERT_EQ_INT(s.pack_layers, SRV_PACK_UNSET);
    srv_model_spec c;
    ASSERT_EQ_INT(srv_model_spec_copy(&c, &s), 0);
    ASSERT_TRUE(srv_model_spec_same(&c, &s));
    c.n_ctx = 1024;
    ASSERT_TRUE(!srv_model_spec_same(&c, &s));
    srv_model_spec_free(&c);
    srv_model_spec_free(&s);
    ASSERT_EQ_INT(srv_model_spec_parse("dir/tiny.gguf", &s, err, sizeof err), 0);
    ASSERT_TRUE(!s.id[0]);
    srv_model_spec_finish(&s);
    ASSERT_TRUE(!strcmp(s.id, "tiny"));
    srv_model_spec_free(&s);
    ASSERT_EQ_INT(srv_model_spec_parse("a.gguf,ctx=x", &s, err, sizeof err), -1);
    ASSERT_TRUE(strstr(err, "ctx=x"));
    ASSERT_EQ_INT(srv_model_spec_parse("a.gguf,threads=0", &s, err, sizeof err), -1);
    ASSERT_EQ_INT(srv_model_spec_parse(",id=x", &s, err, sizeof err), -1);
    static const char *const packs[] = {"off", "auto", "on"};
    for (int i = 0; i < 3; i++) {
        char spec[96];
        snprintf(spec, sizeof spec, "a.gguf,pack-output=%s,pack-layers=%s", packs[i], packs[2 - i]);
        ASSERT_EQ_INT(srv_model_spec_parse(spec, &s, err, sizeof err), 0);
        ASSERT_EQ_INT(s.pack_output, i - 1);
        ASSERT_EQ_INT(s.pack_layers, 1 - i);
        srv_model_spec_free(&s);
    }
    ASSERT_EQ_INT(srv_model_spec_parse("a.gguf,pack-output=1", &s, err, sizeof err), -1);
    ASSERT_EQ_INT(srv_model_spec_parse("a.gguf,pack-layers=yes", &s, err, sizeof err), -1);
    /* the JSON form */
    json_t *o = json_loads("{\"path\":\"p.gguf\",\"aliases\":[\"q\"],\"kv_size\":\"1GiB\",\"threads\":2,"
                           "\"prefix_cache\":false,\"max_itl_ms\":5}", 0, NULL);
    ASSERT_EQ_INT(srv_model_spec_from_json(o, &s, err, sizeof err), 0);
    ASSERT_TRUE(!strcmp(s.aliases[0], "q"));
    ASSERT_EQ_INT(s.kv_size, 1 << 30);
    ASSERT_EQ_INT(s.prefix_cache, 0);
    ASSERT_EQ_INT(s.n_threads, 2);
    ASSERT_TRUE(s.max_itl_ms == 5);
    srv_model_spec_free(&s);
    json_decref(o);
    o = json_loads("{\"path\":\"p.gguf\",\"temprature\":1}", 0, NULL);
    ASSERT_EQ_INT(srv_model_spec_from_json(o, &s, err, sizeof err), -1);
    ASSERT_TRUE(strstr(err, "temprature"));
    json_decref(o);
    o = json_loads("{\"id\":\"x\"}", 0, NULL);
    ASSERT_EQ_INT(srv_model_spec_from_json(o, &s, err, sizeof err), -1); /* no path */
    json_decref(o);
}

/* A model's default sampling: --model keys and the JSON form give the same defaults object (the API's
 * spelling), a stop string may hold a comma and escapes, the values are api/'s rules (a default a request
 * could not send is a startup error naming it), and two specs differing only in their defaults differ. */
TEST(model_spec_defaults) {
    srv_model_spec s, j;
    char err[300];
    ASSERT_EQ_INT(srv_model_spec_parse("m.gguf,temperature=0.2,top-p=0.9,top-k=40,min-p=0.05,repetition-penalty=1.1,"
                                       "presence-penalty=0.5,frequency-penalty=-1,seed=7,max-tokens=32,stop=\\n\\n,"
                                       "stop=a,b,id=x", &s, err, sizeof err), 0);
    ASSERT_TRUE(!strcmp(s.id, "x"));
    json_t *o = json_loads("{\"path\":\"m.gguf\",\"id\":\"x\",\"temperature\":0.2,\"top_p\":0.9,\"top_k\":40,"
                           "\"min_p\":0.05,\"repetition_penalty\":1.1,\"presence_penalty\":0.5,\"frequency_penalty\":-1.0,"
                           "\"seed\":7,\"max_tokens\":32,\"stop\":[\"\\n\\n\",\"a,b\"]}", 0, NULL);
    ASSERT_EQ_INT(srv_model_spec_from_json(o, &j, err, sizeof err), 0);
    json_decref(o);
    ASSERT_TRUE(json_equal(s.defaults, j.defaults));
    ASSERT_TRUE(srv_model_spec_same(&s, &j));
    srv_model_spec c;
    ASSERT_EQ_INT(srv_model_spec_copy(&c, &s), 0);
    ASSERT_TRUE(srv_model_spec_same(&c, &s));
    json_object_set_new(c.defaults, "temperature", json_real(0.3));
    ASSERT_TRUE(!srv_model_spec_same(&c, &s));
    srv_model_spec_free(&c);
    srv_model_spec_free(&s);
    srv_model_spec_free(&j);
    /* a single stop string in JSON; max_tokens null (the whole context) */
    o = json_loads("{\"path\":\"m.gguf\",\"stop\":\"x\",\"max_tokens\":null}", 0, NULL);
    ASSERT_EQ_INT(srv_model_spec_from_json(o, &j, err, sizeof err), 0);
    ASSERT_EQ_INT((int)json_array_size(json_object_get(j.defaults, "stop")), 1);
    ASSERT_TRUE(json_is_null(json_object_get(j.defaults, "max_tokens")));
    srv_model_spec_free(&j);
    json_decref(o);
    ASSERT_EQ_INT(srv_model_spec_parse("m.gguf,max-tokens=null", &s, err, sizeof err), 0);
    srv_model_spec_free(&s);
    /* without defaults there is no object */
    ASSERT_EQ_INT(srv_model_spec_parse("m.gguf,ctx=64", &s, err, sizeof err), 0);
    ASSERT_TRUE(s.defaults == NULL);
    srv_model_spec_free(&s);
    static const char *const bad[] = {"m.gguf,temperature=3", "m.gguf,temperature=hot", "m.gguf,top-k=1.5",
                                      "m.gguf,top-p=0", "m.gguf,max-tokens=-1", "m.gguf,stop="};
    static const char *const named[] = {"temperature", "temperature", "top-k", "top_p", "max_tokens", "stop"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ASSERT_EQ_INT(srv_model_spec_parse(bad[i], &s, err, sizeof err), -1);
        ASSERT_TRUE(strstr(err, named[i]) != NULL);
    }
    static const char *const bad_json[] = {"{\"path\":\"m\",\"temperature\":\"0.2\"}", "{\"path\":\"m\",\"seed\":true}",
                                           "{\"path\":\"m\",\"stop\":[1]}", "{\"path\":\"m\",\"min_p\":2}"};
    for (size_t i = 0; i < sizeof bad_json / sizeof *bad_json; i++) {
        o = json_loads(bad_json[i], 0, NULL);
        ASSERT_EQ_INT(srv_model_spec_from_json(o, &s, err, sizeof err), -1);
        json_decref(o);
    }
}

/* The --config file: a list of models, ids unique (defaulted from the paths), nothing but "models". */
TEST(config_file_read) {
    char path[] = "/tmp/cm_pool_cfg_XXXXXX";
    int fd = mkstemp(path);
    ASSERT_TRUE(fd >= 0);
    const char *good = "{\"models\":[{\"path\":\"a/x.gguf\"},{\"path\":\"b.gguf\",\"id\":\"y\",\"ctx\":64}]}";
    ASSERT_EQ_INT(write(fd, good, strlen(good)), (long)strlen(good));
    close(fd);
    srv_model_spec *specs = NULL;
    int n = 0;
    char err[300];
    ASSERT_EQ_INT(srv_config_file_read(path, &specs, &n, err, sizeof err), 0);
    ASSERT_EQ_INT(n, 2);
    ASSERT_TRUE(!strcmp(specs[0].id, "x"));
    ASSERT_TRUE(!strcmp(specs[1].id, "y"));
    ASSERT_EQ_INT(specs[1].n_ctx, 64);
    for (int i = 0; i < n; i++) srv_model_spec_free(&specs[i]);
    free(specs);
    static const char *bad[] = {"{\"models\":[]}", "{\"models\":[{\"path\":\"x.gguf\"},{\"path\":\"d/x.gguf\"}]}",
                                "{\"models\":[{\"path\":\"x.gguf\"}],\"threads\":2}", "{\"models\":[{\"ctx\":1}]}", "[1"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        FILE *f = fopen(path, "w");
        ASSERT_TRUE(f != NULL);
        fputs(bad[i], f);
        fclose(f);
        ASSERT_EQ_INT(srv_config_file_read(path, &specs, &n, err, sizeof err), -1);
        ASSERT_TRUE(specs == NULL && n == 0 && err[0]);
    }
    unlink(path);
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

/* ------------------------------------------------------------ conn.c */

typedef struct added {
    int n;
    int fd[4];
    srv_conn *c[4];
} added;

static int record_add(void *ud, int fd, const struct sockaddr *addr, socklen_t len, srv_conn *c) {
    added *a = ud;
    (void)addr;
    (void)len;
    if (a->n == 4) return -1;
    a->fd[a->n] = fd;
    a->c[a->n++] = c;
    return 0;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { close(fd); return -1; }
    return fd;
}

/* Reads until EOF (the server closed or shut down its side) into buf; returns the bytes read. */
static size_t read_all(int fd, char *buf, size_t cap) {
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t n = 0;
    ssize_t k;
    while (n + 1 < cap && (k = recv(fd, buf + n, cap - 1 - n, 0)) > 0) n += (size_t)k;
    buf[n] = 0;
    return n;
}

TEST(conns_admission_and_deadlines) {
    uv_loop_t loop;
    ASSERT_EQ_INT(uv_loop_init(&loop), 0);
    srv_metrics m;
    srv_metrics_init(&m);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    srv_conn_limits lim = {.max_connections = 3, .max_per_ip = 2, .header_timeout = 1, .idle_timeout = 5,
                           .min_body_rate = 100};
    added a = {0};
    srv_conns *cs = srv_conns_create(&loop, (struct sockaddr *)&sa, sizeof sa, &lim, &m, record_add, &a);
    ASSERT_TRUE(cs != NULL);
    int port = srv_conns_port(cs);
    ASSERT_TRUE(port > 0);
    /* the per-address cap (2) admits two; the third gets the canned 503 and EOF */
    int cl[3];
    for (int i = 0; i < 3; i++) ASSERT_TRUE((cl[i] = connect_to(port)) >= 0);
    for (int k = 0; k < 200 && a.n + (int)m.conn_rejected_per_ip < 3; k++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    ASSERT_EQ_INT(a.n, 2);
    ASSERT_EQ_INT(m.conn_rejected_per_ip, 1);
    ASSERT_EQ_INT(srv_conns_count(cs), 2);
    ASSERT_EQ_INT(m.conn_open, 2);
    char buf[2048];
    read_all(cl[2], buf, sizeof buf);
    ASSERT_TRUE(!strncmp(buf, "HTTP/1.1 503 ", 13));
    ASSERT_TRUE(strstr(buf, "\r\nRetry-After: 1\r\n") != NULL);
    ASSERT_TRUE(strstr(buf, "\r\n\r\n{\"error\":{\"message\":") != NULL);
    /* body rate: after the header timeout's grace, 50 bytes in 2 s is under 100 B/s, 1000 is not */
    uint64_t t = uv_hrtime();
    srv_conn_headers_done(a.c[0], t);
    srv_conn_body(a.c[0], 50);
    srv_conn_headers_done(a.c[1], t);
    srv_conn_body(a.c[1], 1000);
    ASSERT_EQ_INT(srv_conns_check(cs, t + 500000000ull), 0);
    ASSERT_EQ_INT(srv_conns_check(cs, t + 2000000000ull), 1);
    ASSERT_EQ_INT(m.conn_body_timeouts, 1);
    ASSERT_EQ_INT(read_all(cl[0], buf, sizeof buf), 0); /* shut down: the client reads EOF */
    /* a request being handled has no deadline; kept alive, it has idle + header timeout */
    srv_conn_busy(a.c[1]);
    ASSERT_EQ_INT(srv_conns_check(cs, t + 100000000000ull), 0);
    srv_conn_request_done(a.c[1], t);
    ASSERT_EQ_INT(srv_conns_check(cs, t + 5900000000ull), 0);
    srv_conn_request_line(a.c[1], t + 5000000000ull); /* a request line: at most header timeout more */
    ASSERT_EQ_INT(srv_conns_check(cs, t + 5900000000ull), 0);
    ASSERT_EQ_INT(srv_conns_check(cs, t + 6100000000ull), 1);
    ASSERT_EQ_INT(m.conn_header_timeouts, 1);
    /* the front end reports the closes; the listener goes */
    for (int i = 0; i < a.n; i++) {
        srv_conn_closed(a.c[i]);
        close(a.fd[i]);
    }
    ASSERT_EQ_INT(srv_conns_count(cs), 0);
    for (int i = 0; i < 3; i++) close(cl[i]);
    srv_conns_close(cs);
    uv_run(&loop, UV_RUN_DEFAULT);
    srv_conns_free(cs);
    ASSERT_EQ_INT(uv_loop_close(&loop), 0);
}

/* The playground's embedded files by URL ("/" is the page), and the status record: its fields from the
 * gauges, hit_ratio null before any prefix query. */
TEST(ui_files_and_status) {
    const srv_ui_asset *a = srv_ui_find("/");
    ASSERT_TRUE(a != NULL);
    ASSERT_STREQ(a->path, "/ui/index.html");
    ASSERT_TRUE(strstr(a->ctype, "text/html") != NULL);
    ASSERT_TRUE(a->len > 100 && strstr((const char *)a->data, "/ui/app.js") != NULL);
    ASSERT_TRUE(srv_ui_find("/ui/index.html") == a);
    a = srv_ui_find("/ui/app.js");
    ASSERT_TRUE(a && strstr(a->ctype, "javascript") && a->data[a->len] == 0);
    ASSERT_TRUE(srv_ui_find("/ui/style.css") != NULL);
    ASSERT_TRUE(srv_ui_find("/ui/nope.js") == NULL);
    ASSERT_TRUE(srv_ui_find("/index.html") == NULL);
    ASSERT_TRUE(srv_ui_find("/ui/../ui/app.js") == NULL);

    srv_gauges g = {.queue_depth = 3, .requests_running = 2, .seqs_running = 5, .kv_blocks_total = 64,
                    .kv_blocks_used = 10, .kv_blocks_cached = 4, .kv_block_tokens = 32};
    char *s = srv_status_json(&g, "m", "ok", 100, 7);
    ASSERT_TRUE(s != NULL);
    json_t *j = json_loads(s, 0, NULL);
    free(s);
    ASSERT_TRUE(j != NULL);
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "server.status");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "queue_length")), 3);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "sequences_running")), 5);
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "kv"), "blocks_cached")), 4);
    ASSERT_TRUE(json_is_null(json_object_get(json_object_get(j, "prefix_cache"), "hit_ratio")));
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "generated_tokens")), 7);
    json_decref(j);
    g.prefix_query_tokens = 200;
    g.prefix_hit_tokens = 50;
    s = srv_status_json(&g, "m", "ok", 0, 0);
    j = json_loads(s, 0, NULL);
    free(s);
    ASSERT_NEAR(json_real_value(json_object_get(json_object_get(j, "prefix_cache"), "hit_ratio")), 0.25, 1e-12);
    json_decref(j);
}

int main(void) {
    RUN(ct_equal_matches_memcmp);
    RUN(ui_files_and_status);
    RUN(keys_check_bearer);
    RUN(keys_load_file);
    RUN(request_ids);
    RUN(metrics_render);
    RUN(model_spec_parse);
    RUN(model_spec_defaults);
    RUN(config_file_read);
    RUN(retention_evicts_oldest);
    RUN(retention_bounded_in_bytes);
    RUN(keys_owner_and_admin);
    RUN(expert_metrics_render);
    RUN(expert_metrics_sparse);
    RUN(buf_limit);
    RUN(conns_admission_and_deadlines);
    return test_summary();
}
