/*
 * render.c - engine results -> OpenAI's response shapes: the text_completion object and its streamed
 * chunks, the chat.completion object and its chunks, and the model list. Field names and nesting follow
 * OpenAI's APIs so that existing clients (openai-python, editor plugins, chat tools) parse them
 * unchanged; extensions are extra fields.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "format.h"

/* 9 significant digits round-trip a float; more would only print noise of the float->double cast */
#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if invalid (overlongs, surrogates, > U+10FFFF). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned cp;
    if (c >= 0xc2 && c <= 0xdf) { k = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { k = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 4; cp = c & 0x07; }
    else return 0;
    if (n < k) return 0;
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((k == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return k;
}

static int utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq((const unsigned char *)s + i, n - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

/* A JSON string from bytes that should be UTF-8; invalid bytes become U+FFFD rather than failing the
 * whole response (the detokenizer already guarantees validity; this is the last line of defence). */
static json_t *jstr(const char *s, size_t n) {
    if (utf8_valid(s, n)) return json_stringn(s, n);
    char *buf = malloc(n * 3 + 1);
    if (!buf) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq((const unsigned char *)s + i, n - i);
        if (k) { memcpy(buf + o, s + i, k); o += k; i += k; }
        else { memcpy(buf + o, "\xef\xbf\xbd", 3); o += 3; i++; }
    }
    json_t *j = json_stringn(buf, o);
    free(buf);
    return j;
}

json_t *api_json_text(const char *s, size_t n) { return jstr(s, n); }

static json_t *jreal(float x) {
    return isfinite(x) ? json_real((double)x) : json_null();
}

/* A token as logprobs show it: its text, or OpenAI's "bytes:\xNN..." when it is not valid UTF-8 on its
 * own (part of a multi-byte character). Adds its character count to *chars. */
static json_t *token_json(const cm_model *m, int32_t id, long *chars) {
    char small[256];
    char *b = small;
    int n = cm_token_bytes(m, id, 1, small, sizeof small);
    if (n < 0) return json_string("");
    if ((size_t)n > sizeof small) {
        b = malloc((size_t)n);
        if (!b) return NULL;
        int n2 = cm_token_bytes(m, id, 1, b, (size_t)n);
        if (n2 < 0 || n2 > n) n2 = 0;
        n = n2;
    }
    json_t *j;
    for (int i = 0; i < n; i++) *chars += ((unsigned char)b[i] & 0xc0) != 0x80;
    if (utf8_valid(b, (size_t)n)) {
        j = json_stringn(b, (size_t)n);
    } else {
        char *t = malloc(6 + (size_t)n * 4 + 1);
        if (!t) { if (b != small) free(b); return NULL; }
        size_t o = (size_t)snprintf(t, 7, "bytes:");
        for (int i = 0; i < n; i++) o += (size_t)snprintf(t + o, 5, "\\x%02x", (unsigned char)b[i]);
        j = json_stringn(t, o);
        free(t);
    }
    if (b != small) free(b);
    return j;
}

json_t *api_token_json(const cm_model *m, int32_t id) {
    long chars = 0;
    return token_json(m, id, &chars);
}

/* {tokens, token_logprobs, top_logprobs, text_offset} for lp[0..n). */
static json_t *logprobs_json(const api_completion_req *r, const api_token_lp *lp, int n, long offset) {
    const cm_model *m = r->model->model;
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    json_t *o = json_object();
    if (!tokens || !lps || !tops || !offs || !o) goto oom;
    json_object_set_new(o, "tokens", tokens);
    json_object_set_new(o, "token_logprobs", lps);
    json_object_set_new(o, "top_logprobs", tops);
    json_object_set_new(o, "text_offset", offs);
    for (int i = 0; i < n; i++) {
        json_array_append_new(offs, json_integer(offset));
        json_t *t = token_json(m, lp[i].token, &offset);
        if (!t) return json_decref(o), NULL;
        json_array_append_new(tokens, t);
        json_array_append_new(lps, jreal(lp[i].logprob));
        if (isnan(lp[i].logprob)) { /* the first prompt token has no context: null, as OpenAI */
            json_array_append_new(tops, json_null());
            continue;
        }
        json_t *top = json_object();
        if (!top) return json_decref(o), NULL;
        int k = lp[i].n_top < r->logprobs ? lp[i].n_top : r->logprobs;
        for (int j = 0; j < k && lp[i].top; j++) {
            long ignore = 0;
            json_t *tt = token_json(m, lp[i].top[j].token, &ignore);
            if (!tt) { json_decref(top); return json_decref(o), NULL; }
            json_object_set_new(top, json_string_value(tt), jreal(lp[i].top[j].logprob));
            json_decref(tt);
        }
        json_array_append_new(tops, top);
    }
    return o;
oom:
    json_decref(tokens); json_decref(lps); json_decref(tops); json_decref(offs); json_decref(o);
    return NULL;
}

static const char *finish_str(api_finish f) {
    return f == API_FINISH_STOP ? "stop" : f == API_FINISH_LENGTH ? "length" : NULL;
}

static json_t *choice_json(const api_completion_req *r, const api_choice *c) {
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "text", jstr(c->text ? c->text : "", c->text ? c->text_len : 0));
    json_object_set_new(o, "index", json_integer(c->index));
    json_object_set_new(o, "logprobs",
                        r->logprobs >= 0 ? logprobs_json(r, c->lp, c->lp ? c->n_lp : 0, c->text_offset) : json_null());
    const char *f = finish_str(c->finish);
    json_object_set_new(o, "finish_reason", f ? json_string(f) : json_null());
    /* a NULL from any *_set_new above leaves the key out; a checked dump catches nothing, so check */
    if (!json_object_get(o, "text") || !json_object_get(o, "logprobs")) { json_decref(o); return NULL; }
    return o;
}

static json_t *head_json(const api_completion_req *r, const api_meta *meta) {
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "id", json_string(meta->id ? meta->id : ""));
    json_object_set_new(o, "object", json_string("text_completion"));
    json_object_set_new(o, "created", json_integer(meta->created));
    json_object_set_new(o, "model", jstr(r->model->id ? r->model->id : "", r->model->id ? strlen(r->model->id) : 0));
    if (meta->system_fingerprint) json_object_set_new(o, "system_fingerprint", json_string(meta->system_fingerprint));
    return o;
}

static json_t *usage_json(const api_usage *u) {
    json_t *o = json_object(), *d = json_object();
    if (!o || !d) { json_decref(o); json_decref(d); return NULL; }
    json_object_set_new(o, "prompt_tokens", json_integer(u->prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(u->completion_tokens));
    json_object_set_new(o, "total_tokens", json_integer((json_int_t)u->prompt_tokens + u->completion_tokens));
    json_object_set_new(d, "cached_tokens", json_integer(u->cached_tokens));
    json_object_set_new(o, "prompt_tokens_details", d);
    return o;
}

static char *dump_free(json_t *o) {
    if (!o) return NULL;
    char *s = json_dumps(o, DUMP_FLAGS);
    json_decref(o);
    return s;
}

char *api_render_completion(const api_completion_req *r, const api_meta *meta, const api_choice *choices,
                            int n_choices, const api_usage *usage, json_t *routing) {
    json_t *o = head_json(r, meta), *arr = json_array();
    if (!o || !arr) { json_decref(o); json_decref(arr); return NULL; }
    json_object_set_new(o, "choices", arr);
    for (int i = 0; i < n_choices; i++) {
        json_t *c = choice_json(r, &choices[i]);
        if (!c) { json_decref(o); return NULL; }
        json_array_append_new(arr, c);
    }
    json_t *u = usage_json(usage);
    if (!u) { json_decref(o); return NULL; }
    json_object_set_new(o, "usage", u);
    if (routing) json_object_set(o, "routing", routing);
    return dump_free(o);
}

/* Wraps a rendered object as an SSE event. */
static char *sse_free(json_t *o) {
    char *j = dump_free(o);
    if (!j) return NULL;
    char *s = api_sse_data(j);
    free(j);
    return s;
}

char *api_render_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *delta) {
    json_t *o = head_json(r, meta), *arr = json_array();
    if (!o || !arr) { json_decref(o); json_decref(arr); return NULL; }
    json_object_set_new(o, "choices", arr);
    json_t *c = choice_json(r, delta);
    if (!c) { json_decref(o); return NULL; }
    json_array_append_new(arr, c);
    if (r->include_usage) json_object_set_new(o, "usage", json_null());
    return sse_free(o);
}

/* The include_usage event: head (taken) with choices [], usage and routing. */
static char *usage_chunk(json_t *o, const api_usage *usage, json_t *routing) {
    json_t *arr = json_array(), *u = usage_json(usage);
    if (!o || !arr || !u) { json_decref(o); json_decref(arr); json_decref(u); return NULL; }
    json_object_set_new(o, "choices", arr);
    json_object_set_new(o, "usage", u);
    if (routing) json_object_set(o, "routing", routing);
    return sse_free(o);
}

char *api_render_usage_chunk(const api_completion_req *r, const api_meta *meta, const api_usage *usage,
                             json_t *routing) {
    return usage_chunk(head_json(r, meta), usage, routing);
}

/* ------------------------------------------------------------ chat completions */

/* A token's raw bytes as chat logprobs show them: {token, logprob, bytes:[...]} (bytes: the UTF-8
 * bytes, so a client can join tokens that split a character). */
static json_t *chat_token_json(const cm_model *m, int32_t id, float logprob) {
    char small[256];
    int n = cm_token_bytes(m, id, 1, small, sizeof small);
    if (n < 0 || (size_t)n > sizeof small) n = n < 0 ? 0 : (int)sizeof small; /* longer tokens: cut */
    long ignore = 0;
    json_t *t = token_json(m, id, &ignore), *bytes = json_array(), *o = json_object();
    if (!t || !bytes || !o) { json_decref(t); json_decref(bytes); json_decref(o); return NULL; }
    for (int i = 0; i < n; i++) json_array_append_new(bytes, json_integer((unsigned char)small[i]));
    json_object_set_new(o, "token", t);
    json_object_set_new(o, "logprob", jreal(logprob));
    json_object_set_new(o, "bytes", bytes);
    return o;
}

/* {content:[{token, logprob, bytes, top_logprobs:[{token, logprob, bytes}]}]} for lp[0..n). */
static json_t *chat_logprobs_json(const api_completion_req *r, const api_token_lp *lp, int n) {
    const cm_model *m = r->model->model;
    json_t *arr = json_array(), *o = json_object();
    if (!arr || !o) { json_decref(arr); json_decref(o); return NULL; }
    json_object_set_new(o, "content", arr);
    json_object_set_new(o, "refusal", json_null());
    for (int i = 0; i < n; i++) {
        json_t *e = chat_token_json(m, lp[i].token, lp[i].logprob), *top = json_array();
        if (!e || !top) { json_decref(e); json_decref(top); json_decref(o); return NULL; }
        int k = lp[i].n_top < r->logprobs ? lp[i].n_top : r->logprobs;
        for (int j = 0; j < k && lp[i].top; j++) {
            json_t *t = chat_token_json(m, lp[i].top[j].token, lp[i].top[j].logprob);
            if (!t) { json_decref(top); json_decref(e); json_decref(o); return NULL; }
            json_array_append_new(top, t);
        }
        json_object_set_new(e, "top_logprobs", top);
        json_array_append_new(arr, e);
    }
    return o;
}

static json_t *chat_head_json(const api_completion_req *r, const api_meta *meta, const char *object) {
    json_t *o = head_json(r, meta);
    if (!o) return NULL;
    char id[96];
    snprintf(id, sizeof id, "chat%s", meta->id ? meta->id : ""); /* "chatcmpl-...", as OpenAI's */
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "object", json_string(object));
    return o;
}

/* A choice (full) or a delta (chunk): message or delta {role, content}, logprobs, finish_reason. */
static json_t *chat_choice_json(const api_completion_req *r, const api_choice *c, int chunk, int first) {
    json_t *o = json_object(), *msg = json_object();
    if (!o || !msg) { json_decref(o); json_decref(msg); return NULL; }
    json_object_set_new(o, "index", json_integer(c->index));
    if (!chunk || first) json_object_set_new(msg, "role", json_string("assistant"));
    if (!chunk || c->text_len || first) {
        json_t *t = jstr(c->text ? c->text : "", c->text ? c->text_len : 0);
        if (!t) { json_decref(o); json_decref(msg); return NULL; }
        json_object_set_new(msg, "content", t);
    }
    if (!chunk) json_object_set_new(msg, "refusal", json_null());
    json_object_set_new(o, chunk ? "delta" : "message", msg);
    json_t *lp = r->logprobs >= 0 ? chat_logprobs_json(r, c->lp, c->lp ? c->n_lp : 0) : json_null();
    if (!lp) { json_decref(o); return NULL; }
    json_object_set_new(o, "logprobs", lp);
    const char *f = finish_str(c->finish);
    json_object_set_new(o, "finish_reason", f ? json_string(f) : json_null());
    return o;
}

char *api_render_chat(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                      const api_usage *usage, json_t *routing) {
    json_t *o = chat_head_json(r, meta, "chat.completion"), *arr = json_array();
    if (!o || !arr) { json_decref(o); json_decref(arr); return NULL; }
    json_object_set_new(o, "choices", arr);
    for (int i = 0; i < n; i++) {
        json_t *c = chat_choice_json(r, &choices[i], 0, 0);
        if (!c) { json_decref(o); return NULL; }
        json_array_append_new(arr, c);
    }
    json_t *u = usage_json(usage);
    if (!u) { json_decref(o); return NULL; }
    json_object_set_new(o, "usage", u);
    if (routing) json_object_set(o, "routing", routing);
    return dump_free(o);
}

char *api_render_chat_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *delta,
                            int first) {
    json_t *o = chat_head_json(r, meta, "chat.completion.chunk"), *arr = json_array();
    if (!o || !arr) { json_decref(o); json_decref(arr); return NULL; }
    json_object_set_new(o, "choices", arr);
    json_t *c = chat_choice_json(r, delta, 1, first);
    if (!c) { json_decref(o); return NULL; }
    json_array_append_new(arr, c);
    if (r->include_usage) json_object_set_new(o, "usage", json_null());
    return sse_free(o);
}

char *api_render_chat_usage_chunk(const api_completion_req *r, const api_meta *meta, const api_usage *usage,
                                  json_t *routing) {
    return usage_chunk(chat_head_json(r, meta, "chat.completion.chunk"), usage, routing);
}

/* ------------------------------------------------------------ models */

/* The "moe" object of a model entry (see api_render_model), NULL for a dense model. */
static json_t *moe_json(const cm_model *m) {
    cm_moe_info mi;
    cm_model_moe_info(m, &mi);
    if (mi.kind == CM_MOE_KIND_HYBRID) {
        return json_pack("{s:s,s:i,s:i,s:o,s:i,s:i,s:s,s:s}", "kind", "hybrid", "experts", mi.n_experts, "top_k",
                         mi.top_k, "shared_expert", mi.shared_expert >= 0 ? json_integer(mi.shared_expert) : json_null(),
                         "segment_experts", mi.n_seg_experts, "window", mi.window, "segment_routing_default",
                         mi.segment_mode_default == CM_SEGMENT_REFERENCE ? "reference" : "causal", "segment_route",
                         mi.segment_route == CM_SEGMENT_ROUTE_PREVIOUS ? "previous" : "prefix");
    }
    if (mi.kind == CM_MOE_KIND_SPARSE) /* qwen3moe: token-level experts only */
        return json_pack("{s:s,s:i,s:i}", "kind", "sparse", "experts", mi.n_experts, "top_k", mi.top_k);
    if (mi.kind != CM_MOE_KIND_MOLE) return NULL;
    json_t *o = json_pack("{s:s,s:[],s:[]}", "kind", "mole", "adapters", "languages");
    json_t *ad = json_object_get(o, "adapters"), *langs = json_object_get(o, "languages");
    for (int i = 0; o && i < mi.n_adapters; i++) {
        /* names come from the model file: jstr keeps the JSON valid whatever their bytes */
        const char *name = cm_model_adapter_name(m, i);
        if (!name) continue;
        json_array_append_new(ad, jstr(name, strlen(name)));
        if (i != mi.shared_adapter && i != mi.fallback_adapter) json_array_append_new(langs, jstr(name, strlen(name)));
    }
    return o;
}

static json_t *model_json(const api_model *am) {
    const cm_model_info *info = am->model ? cm_model_get_info(am->model) : NULL;
    json_t *o = json_object();
    if (!o) return NULL;
    const char *id = am->id ? am->id : "";
    json_object_set_new(o, "id", jstr(id, strlen(id)));
    json_object_set_new(o, "object", json_string("model"));
    json_object_set_new(o, "created", json_integer(am->created));
    json_object_set_new(o, "owned_by", json_string("codemoe"));
    if (am->n_aliases > 0) {
        json_t *al = json_array();
        for (int i = 0; al && i < am->n_aliases; i++)
            if (am->aliases[i]) json_array_append_new(al, jstr(am->aliases[i], strlen(am->aliases[i])));
        if (al) json_object_set_new(o, "aliases", al);
    }
    json_object_set_new(o, "context_length", json_integer(am->n_ctx));
    if (info) {
        if (info->arch) json_object_set_new(o, "architecture", jstr(info->arch, strlen(info->arch)));
        if (info->name && info->name[0]) json_object_set_new(o, "name", jstr(info->name, strlen(info->name)));
        json_object_set_new(o, "n_ctx_train", json_integer(info->n_ctx_train));
        json_object_set_new(o, "n_vocab", json_integer(info->n_vocab));
        json_object_set_new(o, "n_params", json_integer((json_int_t)info->n_params));
        if (info->weight_type) json_object_set_new(o, "weight_type", jstr(info->weight_type, strlen(info->weight_type)));
        json_object_set_new(o, "fim", json_boolean(info->fim_pre >= 0 && info->fim_suf >= 0 && info->fim_mid >= 0));
    }
    json_object_set_new(o, "chat", json_boolean(am->chat_template != NULL));
    json_t *moe = am->model ? moe_json(am->model) : NULL;
    if (moe) json_object_set_new(o, "moe", moe);
    /* what a request that sends none of these fields gets (api_defaults_check) */
    if (am->defaults && json_object_size(am->defaults))
        json_object_set_new(o, "defaults", json_deep_copy(am->defaults));
    return o;
}

char *api_render_model(const api_model *m) {
    return dump_free(model_json(m));
}

char *api_render_models(const api_model *models, int n) {
    json_t *o = json_object(), *arr = json_array();
    if (!o || !arr) { json_decref(o); json_decref(arr); return NULL; }
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", arr);
    for (int i = 0; i < n; i++) {
        json_t *m = model_json(&models[i]);
        if (!m) { json_decref(o); return NULL; }
        json_array_append_new(arr, m);
    }
    return dump_free(o);
}
