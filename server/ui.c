/*
 * ui.c - the playground's files (embedded by server/embed_ui.py into ui_assets.c) looked up by URL,
 * and the status record GET /v1/status serves (the page's live server view; /metrics has the same
 * gauges for Prometheus).
 */
#include <jansson.h>
#include <string.h>

#include "ui.h"

const srv_ui_asset *srv_ui_find(const char *url) {
    if (!strcmp(url, "/") || !strcmp(url, "/ui") || !strcmp(url, "/ui/")) url = "/ui/index.html";
    for (int i = 0; i < srv_ui_n_assets; i++)
        if (!strcmp(srv_ui_assets[i].path, url)) return &srv_ui_assets[i];
    return NULL;
}

char *srv_status_json(const srv_gauges *g, const char *model, const char *model_state, uint64_t prompt_tokens,
                      uint64_t generated_tokens) {
    json_t *ratio = g->prefix_query_tokens ? json_real((double)g->prefix_hit_tokens / (double)g->prefix_query_tokens)
                                           : json_null();
    json_t *o = json_pack("{s:s,s:s,s:s,s:i,s:i,s:i,s:{s:i,s:i,s:i,s:i},s:{s:I,s:I,s:o},s:I,s:I}", "object",
                          "server.status", "model", model, "model_state", model_state, "queue_length",
                          g->queue_depth, "requests_running", g->requests_running, "sequences_running",
                          g->seqs_running, "kv", "blocks_total", g->kv_blocks_total, "blocks_used",
                          g->kv_blocks_used, "blocks_cached", g->kv_blocks_cached, "block_tokens",
                          g->kv_block_tokens, "prefix_cache", "query_tokens", (json_int_t)g->prefix_query_tokens,
                          "hit_tokens", (json_int_t)g->prefix_hit_tokens, "hit_ratio", ratio, "prompt_tokens",
                          (json_int_t)prompt_tokens, "generated_tokens", (json_int_t)generated_tokens);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}
