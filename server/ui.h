/*
 * ui.h - the playground `codemoe serve` answers at / (off with --no-ui): static files from server/ui/,
 * embedded into the binary at build time (server/embed_ui.py writes ui_assets.c), and the JSON of
 * GET /v1/status that the page polls for its live server view.
 */
#ifndef SRV_UI_H
#define SRV_UI_H

#include <stddef.h>

#include "metrics.h"

typedef struct srv_ui_asset {
    const char *path;          /* URL path: /ui/<file name> */
    const char *ctype;         /* Content-Type */
    const unsigned char *data; /* (len) bytes, static */
    size_t len;
} srv_ui_asset;

/* The embedded files (ui_assets.c). */
extern const srv_ui_asset srv_ui_assets[];
extern const int srv_ui_n_assets;

/* The file a GET of url serves: "/" is /ui/index.html. NULL when url names none. */
const srv_ui_asset *srv_ui_find(const char *url);

/* GET /v1/status: {object: "server.status", model, model_state ("loading", "ok", "error",
 * "shutting_down"), queue_length, requests_running, sequences_running, kv: {blocks_total, blocks_used,
 * blocks_cached, block_tokens}, prefix_cache: {query_tokens, hit_tokens, hit_ratio (null before any
 * query)}, prompt_tokens, generated_tokens}. malloc'ed JSON text; NULL when out of memory. */
char *srv_status_json(const srv_gauges *g, const char *model, const char *model_state, uint64_t prompt_tokens,
                      uint64_t generated_tokens);

#endif
