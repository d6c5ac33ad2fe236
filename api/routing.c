/*
 * routing.c - expert-routing statistics of mixture-of-experts models: sums of the engine's
 * per-sequence reports (cm_seq_routing) over a request's sequences or the server's lifetime, and the
 * JSON record of a completion's routing (GET /v1/completions/{id}/routing and the "routing" response
 * extension), with "routing": "tokens" also each token's experts (cm_seq_routing_tokens). Dense models
 * report nothing: the record has empty layers.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"

void api_route_agg_free(api_route_agg *a) {
    free(a->tok);
    free(a->seg);
    free(a->adapter);
    free(a->seg_windows);
    free(a->tokens);
    memset(a, 0, sizeof *a);
}

int api_route_agg_add_tokens(api_route_agg *a, const cm_route_tokens *t) {
    if (!t) return 0;
    if (a->tokens) return -1;
    size_t n = (size_t)t->n_tokens, nt = n * (size_t)t->n_layer * (size_t)t->k_tok,
           ns = n * (size_t)t->n_layer * (size_t)t->k_seg, na = t->adapters ? n : 0;
    /* one block, widest elements first so every array stays aligned */
    size_t sz = sizeof *t + na * sizeof(uint64_t) + (nt + ns) * sizeof(float) + n * sizeof(int32_t) +
                (nt + ns) * sizeof(int16_t) + n;
    unsigned char *mem = malloc(sz), *p = mem + sizeof *t;
    if (!mem) return -1;
    cm_route_tokens *d = (cm_route_tokens *)mem;
    *d = *t;
#define TAKE(field, count)                                                     \
    do {                                                                       \
        size_t b_ = (count) * sizeof *t->field;                                \
        if (b_) memcpy(p, t->field, b_);                                       \
        d->field = (void *)p;                                                  \
        p += b_;                                                               \
    } while (0)
    TAKE(adapters, na);
    TAKE(tok_gate, nt);
    TAKE(seg_gate, ns);
    TAKE(token, n);
    TAKE(tok_expert, nt);
    TAKE(seg_expert, ns);
    TAKE(generated, n);
#undef TAKE
    if (!t->adapters) d->adapters = NULL;
    a->tokens = d;
    return 0;
}

static int shape_same(const api_route_agg *a, const cm_routing *r) {
    return a->n_layer == r->n_layer && a->n_tok == r->n_tok_experts && a->n_seg == r->n_seg_experts &&
           a->n_windows == r->n_windows && a->n_adapters == r->n_adapters;
}

static void add_counts(cm_route_count *dst, const cm_route_count *src, size_t n) {
    for (size_t i = 0; src && i < n; i++)
        for (int k = 0; k < 2; k++) {
            dst[i].tokens[k] += src[i].tokens[k];
            dst[i].gate_sum[k] += src[i].gate_sum[k];
        }
}

int api_route_agg_add(api_route_agg *a, const cm_routing *r) {
    if (!r || r->n_layer <= 0) return 0;
    if (!a->has) {
        if (r->n_tok_experts < 0 || r->n_seg_experts < 0 || r->n_adapters < 0 || r->n_windows < 0) return -1;
        a->n_layer = r->n_layer;
        a->n_tok = r->n_tok_experts;
        a->n_seg = r->n_seg_experts;
        a->n_windows = r->n_windows;
        a->n_adapters = r->n_adapters;
        a->shared = r->shared_expert;
        a->window = r->window;
        size_t nt = (size_t)a->n_layer * (size_t)a->n_tok, ns = (size_t)a->n_layer * (size_t)a->n_seg;
        a->tok = nt ? calloc(nt, sizeof *a->tok) : NULL;
        a->seg = ns ? calloc(ns, sizeof *a->seg) : NULL;
        a->adapter = a->n_adapters ? calloc((size_t)a->n_adapters, sizeof *a->adapter) : NULL;
        a->seg_windows = ns && a->n_windows ? calloc(ns * (size_t)a->n_windows, sizeof *a->seg_windows) : NULL;
        if ((nt && !a->tok) || (ns && !a->seg) || (a->n_adapters && !a->adapter) ||
            (ns && a->n_windows && !a->seg_windows)) {
            api_route_agg_free(a);
            return -1;
        }
        a->has = 1;
    } else if (!shape_same(a, r)) {
        return -1; /* a different model cannot report into the same sum */
    }
    size_t nt = (size_t)a->n_layer * (size_t)a->n_tok, ns = (size_t)a->n_layer * (size_t)a->n_seg;
    add_counts(a->tok, r->tok, nt);
    add_counts(a->seg, r->seg, ns);
    add_counts(a->adapter, r->adapter, (size_t)a->n_adapters);
    if (a->seg_windows && r->seg_windows)
        for (size_t i = 0; i < ns * (size_t)a->n_windows; i++) a->seg_windows[i] += r->seg_windows[i];
    return 0;
}

int api_route_agg_copy(api_route_agg *dst, const api_route_agg *src) {
    api_route_agg_free(dst);
    if (!src->has) return 0;
    *dst = *src;
    dst->tok = dst->seg = dst->adapter = NULL;
    dst->seg_windows = NULL;
    dst->tokens = NULL;
    size_t nt = (size_t)src->n_layer * (size_t)src->n_tok, ns = (size_t)src->n_layer * (size_t)src->n_seg;
    size_t nw = ns * (size_t)src->n_windows;
    if ((nt && !(dst->tok = malloc(nt * sizeof *dst->tok))) || (ns && !(dst->seg = malloc(ns * sizeof *dst->seg))) ||
        (src->n_adapters && !(dst->adapter = malloc((size_t)src->n_adapters * sizeof *dst->adapter))) ||
        (src->seg_windows && nw && !(dst->seg_windows = malloc(nw * sizeof *dst->seg_windows)))) {
        api_route_agg_free(dst);
        return -1;
    }
    if (nt) memcpy(dst->tok, src->tok, nt * sizeof *dst->tok);
    if (ns) memcpy(dst->seg, src->seg, ns * sizeof *dst->seg);
    if (src->n_adapters) memcpy(dst->adapter, src->adapter, (size_t)src->n_adapters * sizeof *dst->adapter);
    if (dst->seg_windows) memcpy(dst->seg_windows, src->seg_windows, nw * sizeof *dst->seg_windows);
    return 0;
}

static json_t *counts_json(const cm_route_count *c, int n, const char *key) {
    json_t *arr = json_array();
    for (int e = 0; arr && e < n; e++) {
        const cm_route_count *x = &c[e];
        json_t *o = json_pack("{s:i,s:I,s:I,s:f,s:f}", key, e, "prompt_tokens", (json_int_t)x->tokens[0],
                              "generated_tokens", (json_int_t)x->tokens[1], "prompt_mean_gate",
                              x->tokens[0] ? x->gate_sum[0] / x->tokens[0] : 0.0, "generated_mean_gate",
                              x->tokens[1] ? x->gate_sum[1] / x->tokens[1] : 0.0);
        if (o) json_array_append_new(arr, o);
    }
    return arr;
}

/* ids[0..k) up to the first unused slot (-1), and their gates */
static void slots_json(const int16_t *ids, const float *gates, int k, json_t *id_out, json_t *gate_out) {
    json_t *i_arr = json_array(), *g_arr = json_array();
    for (int j = 0; j < k && ids[j] >= 0; j++) {
        json_array_append_new(i_arr, json_integer(ids[j]));
        json_array_append_new(g_arr, json_real(gates[j]));
    }
    json_array_append_new(id_out, i_arr);
    json_array_append_new(gate_out, g_arr);
}

/* One level (token or segment) of position p: per layer its ids under id_key and gates under gate_key;
 * ids and gates are (n_tokens, n_layer, k). */
static void level_json(json_t *o, const cm_route_tokens *t, int p, int k, const int16_t *ids, const float *gates,
                       const char *id_key, const char *gate_key) {
    json_t *ex = json_array(), *g = json_array();
    for (int l = 0; ex && g && l < t->n_layer; l++) {
        size_t row = ((size_t)p * t->n_layer + l) * (size_t)k;
        slots_json(ids + row, gates + row, k, ex, g);
    }
    json_object_set_new(o, id_key, ex);
    json_object_set_new(o, gate_key, g);
}

/* One object per recorded position: {position, id, text, generated, experts, gates (per layer),
 * segment_experts, segment_gates (per layer, hybrid), adapters (MoLE)}. */
static json_t *tokens_json(const cm_route_tokens *t, const cm_model *m) {
    json_t *arr = json_array();
    for (int p = 0; arr && p < t->n_tokens; p++) {
        json_t *o = json_pack("{s:i}", "position", p);
        if (!o) continue;
        if (t->token[p] < 0) { /* reused from the prefix cache: no expert ran for it */
            json_object_set_new(o, "id", json_null());
            json_array_append_new(arr, o);
            continue;
        }
        json_object_set_new(o, "id", json_integer(t->token[p]));
        if (m) json_object_set_new(o, "text", api_token_json(m, t->token[p]));
        json_object_set_new(o, "generated", json_boolean(t->generated[p]));
        if (t->k_tok) level_json(o, t, p, t->k_tok, t->tok_expert, t->tok_gate, "experts", "gates");
        if (t->k_seg) level_json(o, t, p, t->k_seg, t->seg_expert, t->seg_gate, "segment_experts", "segment_gates");
        if (t->adapters) {
            json_t *ad = json_array();
            for (int i = 0; ad && i < 64; i++)
                if (t->adapters[p] >> i & 1) json_array_append_new(ad, json_integer(i));
            json_object_set_new(o, "adapters", ad);
        }
        json_array_append_new(arr, o);
    }
    return arr;
}

json_t *api_routing_json(const api_route_agg *a, const cm_model *m, const api_routing_info *info) {
    json_t *o = json_object();
    json_t *layers = json_array();
    if (!o || !layers) { json_decref(o); json_decref(layers); return NULL; }
    const char *id = info->id ? info->id : "", *model = info->model ? info->model : "";
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "object", json_string("completion.routing"));
    json_object_set_new(o, "created", json_integer((json_int_t)info->created));
    json_object_set_new(o, "model", json_string(model));
    json_object_set_new(o, "prompt_tokens", json_integer(info->prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(info->completion_tokens));
    json_object_set_new(o, "layers", layers);
    if (!a->has) return o;
    const int full = info->full;
    json_object_set_new(o, "n_layer", json_integer(a->n_layer));
    json_object_set_new(o, "token_experts", json_integer(a->n_tok));
    json_object_set_new(o, "shared_expert", json_integer(a->shared));
    json_object_set_new(o, "segment_experts", json_integer(a->n_seg));
    json_object_set_new(o, "window", json_integer(a->window));
    for (int l = 0; l < a->n_layer; l++) {
        json_t *lo = json_pack("{s:i}", "layer", l);
        if (!lo) continue;
        if (a->n_tok) json_object_set_new(lo, "token", counts_json(a->tok + (size_t)l * a->n_tok, a->n_tok, "expert"));
        if (a->n_seg) {
            json_object_set_new(lo, "segment", counts_json(a->seg + (size_t)l * a->n_seg, a->n_seg, "expert"));
            if (full && a->seg_windows) {
                /* (n_seg, n_windows): tokens of window w routed to segment expert e */
                json_t *w = json_array();
                for (int e = 0; w && e < a->n_seg; e++) {
                    json_t *row = json_array();
                    const uint32_t *src = a->seg_windows + ((size_t)l * a->n_seg + e) * a->n_windows;
                    int last = a->n_windows; /* trailing windows the sequence never reached are dropped */
                    while (last > 0 && !src[last - 1]) last--;
                    for (int k = 0; row && k < last; k++) json_array_append_new(row, json_integer(src[k]));
                    if (row) json_array_append_new(w, row);
                }
                if (w) json_object_set_new(lo, "segment_windows", w);
            }
        }
        json_array_append_new(layers, lo);
    }
    if (info->tokens && a->tokens) {
        json_object_set_new(o, "tokens", tokens_json(a->tokens, m));
        json_object_set_new(o, "tokens_dropped", json_integer(a->tokens->n_dropped));
    }
    if (a->n_adapters) {
        json_t *ad = counts_json(a->adapter, a->n_adapters, "adapter");
        for (int i = 0; ad && i < a->n_adapters; i++) {
            const char *name = cm_model_adapter_name(m, i);
            if (name) json_object_set_new(json_array_get(ad, (size_t)i), "name", json_string(name));
        }
        json_object_set_new(o, "adapters", ad);
    }
    return o;
}
