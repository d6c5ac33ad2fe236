/*
 * ollama.c - Ollama's API for the editor plugins and chat tools that speak it: POST /api/generate
 * (prompt, suffix as fill-in-the-middle, system, raw) and POST /api/chat (messages through the model's
 * chat template), both streamed by default as newline-delimited JSON, plus the model listings
 * /api/tags, /api/show, /api/ps and /api/version.
 *
 * A request is translated into a /v1/completions body and read by api_completion_validate (one owner of
 * the sampling, stop and context rules); Ollama's options map onto it: num_predict -> max_tokens
 * (negative: until the context is full), repeat_penalty -> repetition_penalty, temperature, top_k,
 * top_p, min_p, seed, stop, presence/frequency_penalty; num_ctx below the served context caps this
 * request's prompt + completion (above it, the served context applies). "template" (a Go template) and
 * "format" (JSON / schema-constrained output) cannot be honoured: a non-empty value is a 400 naming the
 * field, and so are "images" (text models only). keep_alive is accepted and ignored (the model stays loaded). Errors are Ollama's
 * {"error": "message"}. The chat template is rendered off the event loop, with the tokenization.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "format.h"

/* Ollama's options -> completion fields (same meaning, maybe another name). */
static const struct { const char *ollama, *completion; } option_map[] = {
    {"temperature", "temperature"},       {"top_k", "top_k"},
    {"top_p", "top_p"},                   {"min_p", "min_p"},
    {"repeat_penalty", "repetition_penalty"}, {"seed", "seed"},
    {"stop", "stop"},                     {"presence_penalty", "presence_penalty"},
    {"frequency_penalty", "frequency_penalty"},
};

/* Copies root's options into c; err names the option as Ollama's clients know it. num_ctx (a smaller
 * context for this request) goes to *n_ctx (0: not given). */
static int map_options(const json_t *root, json_t *c, const api_model *m, int *n_ctx, api_error *e) {
    json_t *o = json_object_get(root, "options");
    *n_ctx = 0;
    if (!o || json_is_null(o)) return 0;
    if (!json_is_object(o)) return api_error_set(e, 400, API_ERR_INVALID, "options", NULL, "'options' must be an object");
    for (size_t i = 0; i < sizeof option_map / sizeof *option_map; i++) {
        json_t *v = json_object_get(o, option_map[i].ollama);
        if (v) json_object_set(c, option_map[i].completion, v);
    }
    json_t *np = json_object_get(o, "num_predict");
    if (np && json_is_integer(np) && json_integer_value(np) < 0) np = json_null(); /* -1, -2: no limit */
    if (np) json_object_set(c, "max_tokens", np);
    else api_format_default(c, m, "max_tokens", json_null());
    json_t *nc = json_object_get(o, "num_ctx");
    if (nc && !json_is_null(nc)) {
        if (!json_is_integer(nc) || json_integer_value(nc) < 1)
            return api_error_set(e, 400, API_ERR_INVALID, "num_ctx", NULL, "'num_ctx' must be a positive integer");
        /* more than the server runs with cannot be had: the served context applies (clients send their
         * configured size whatever the server) */
        *n_ctx = json_integer_value(nc) > INT_MAX ? INT_MAX : (int)json_integer_value(nc);
    }
    return 0;
}

/* Fields Ollama's clients may send that this server cannot honour: a 400 naming the field, never a
 * silent default. "template" is a Go template (the model's own chat template applies; an empty one
 * says nothing); "format" asks for constrained JSON output, which this server does not decode; "images"
 * needs a vision model. */
static int refuse_unsupported(const json_t *root, api_error *e) {
    json_t *t = json_object_get(root, "template");
    if (t && !json_is_null(t) && !(json_is_string(t) && json_string_length(t) == 0))
        return api_error_set(e, 400, API_ERR_INVALID, "template", NULL,
                             "'template' is not supported: Ollama's templates are Go templates; this server renders "
                             "the model's own chat template (send raw: true with a prompt you formatted yourself)");
    json_t *im = json_object_get(root, "images");
    if (json_is_array(im) && json_array_size(im) > 0)
        return api_error_set(e, 400, API_ERR_INVALID, "images", NULL, "'images' is not supported: this server's models read text only");
    json_t *f = json_object_get(root, "format");
    if (f && !json_is_null(f) && !(json_is_string(f) && json_string_length(f) == 0))
        return api_error_set(e, 400, API_ERR_INVALID, "format", NULL,
                             "'format' is not supported: this server has no constrained (JSON / schema) decoding");
    return 0;
}

/* Fills c (the translated body) from an Ollama request: model, stream (default true), options. */
static int common_fields(json_t *root, json_t *c, const api_model *m, int *n_ctx, api_error *e) {
    if (refuse_unsupported(root, e)) return -1;
    json_t *v = json_object_get(root, "model");
    if (v) json_object_set(c, "model", v);
    v = json_object_get(root, "stream");
    json_object_set(c, "stream", v && !json_is_null(v) ? v : json_true());
    return map_options(root, c, m, n_ctx, e);
}

/* A string field or absent/null; anything else is a 400 naming it. */
static int opt_string(const json_t *root, const char *key, const json_t **out, api_error *e) {
    json_t *v = json_object_get(root, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "'%s' must be a string", key);
    *out = v;
    return 0;
}

/* The prompt fields of /api/generate into c; a prompt that goes through the chat template is left to
 * build off the loop: *chat gets api_chat_build_prompt's args. */
static int generate_prompt(const json_t *root, json_t *c, const api_model *m, json_t **chat, api_error *e) {
    const json_t *prompt, *suffix, *system;
    if (opt_string(root, "prompt", &prompt, e) || opt_string(root, "suffix", &suffix, e) ||
        opt_string(root, "system", &system, e))
        return -1;
    const char *ptext = prompt ? json_string_value(prompt) : "";
    size_t plen = prompt ? json_string_length(prompt) : 0;
    if (suffix && json_string_length(suffix) > 0) {
        /* fill in the middle: the model's FIM tokens around the user's code */
        json_object_set_new(c, "prompt", json_stringn(ptext, plen));
        json_object_set(c, "suffix", (json_t *)suffix);
        return 0;
    }
    if (json_is_true(json_object_get(root, "raw")) || !m->chat_template) {
        /* raw, or a base model whose Ollama template would be "{{ .Prompt }}" */
        json_object_set_new(c, "prompt", json_stringn(ptext, plen));
        return 0;
    }
    json_t *msgs = json_array();
    if (system) json_array_append_new(msgs, json_pack("{s:s,s:O}", "role", "system", "content", system));
    json_array_append_new(msgs, json_pack("{s:s,s:s%}", "role", "user", "content", ptext, plen));
    *chat = msgs ? api_chat_defer_args(msgs, NULL) : NULL;
    json_decref(msgs);
    if (!*chat) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    return 0;
}

/* The messages of /api/chat: checked here, rendered off the loop (*chat: api_chat_build_prompt's args). */
static int chat_prompt(const json_t *root, json_t *c, const api_model *m, json_t **chat, api_error *e) {
    (void)c;
    json_t *messages = json_object_get(root, "messages");
    if (api_chat_check(m, messages, e)) return -1;
    if (!(*chat = api_chat_defer_args(messages, json_object_get(root, "tools"))))
        return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    return 0;
}

/* Ollama's "load the model" request: /api/generate with no prompt, suffix or system, /api/chat with no
 * messages. Clients send it to preload a model; it generates nothing and ends with done_reason "load". */
static int is_load(const json_t *root, int chat) {
    if (chat) {
        json_t *msgs = json_object_get(root, "messages");
        return json_is_array(msgs) && json_array_size(msgs) == 0;
    }
    static const char *const keys[] = {"prompt", "suffix", "system"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        json_t *v = json_object_get(root, keys[i]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0)) return 0;
    }
    return 1;
}

/* Either request: body -> translated body (prompt by the dialect's function, then the common fields)
 * -> the completion rules. A prompt through the chat template is rendered later, off the loop. */
static int parse_request(const char *body, size_t len, const api_model *m, const api_limits *lim,
                         int (*prompt)(const json_t *, json_t *, const api_model *, json_t **, api_error *),
                         int chat, api_completion_req *out, api_error *e) {
    json_t *root = api_format_load_body(body, len, m, lim, out, e);
    if (!root) return -1;
    json_t *c = json_object(), *args = NULL;
    int rc = -1, load = is_load(root, chat), n_ctx = 0;
    if (!c) api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    else if ((load || !prompt(root, c, m, &args, e)) && !common_fields(root, c, m, &n_ctx, e)) {
        if (load) { /* the completion rules require a prompt: the empty text, and nothing generated */
            json_object_set_new(c, "prompt", json_string(""));
            json_object_set_new(c, "max_tokens", json_integer(0));
        }
        if (args) { /* the template's text, with its special tokens, replaces "" off the loop */
            json_object_set_new(c, "prompt", json_string(""));
            json_object_set_new(c, "parse_special", json_true());
        }
        /* num_ctx: prompt and completion must fit the smaller context this request asks for */
        api_limits l = *lim;
        if (n_ctx > 0) l.n_ctx = n_ctx;
        /* Ollama clients send more stop strings than OpenAI's 4; errors name Ollama's options */
        json_t *d = json_pack("{s:b,s:{s:s,s:s}}", "load", load, "params", "max_tokens", "num_predict",
                              "repetition_penalty", "repeat_penalty");
        if (!d) api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        else rc = api_format_parse_translated(c, d, m, &l, API_STOP_MAX, out, e);
        if (rc == 0 && args) {
            api__completion_defer_prompt(out, api_chat_build_prompt, args);
            args = NULL;
        }
    }
    json_decref(args);
    json_decref(c);
    json_decref(root);
    return rc;
}

static int parse_generate(const char *body, size_t len, const api_model *m, const api_limits *lim,
                          api_completion_req *out, api_error *e) {
    return parse_request(body, len, m, lim, generate_prompt, 0, out, e);
}

static int parse_chat(const char *body, size_t len, const api_model *m, const api_limits *lim,
                      api_completion_req *out, api_error *e) {
    return parse_request(body, len, m, lim, chat_prompt, 1, out, e);
}

/* ------------------------------------------------------------ responses */

static void iso_time(int64_t t, char *buf, size_t cap) {
    time_t tt = (time_t)t;
    struct tm tm;
    if (!gmtime_r(&tt, &tm)) { snprintf(buf, cap, "1970-01-01T00:00:00Z"); return; }
    strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static json_t *head(const api_completion_req *r, const api_meta *meta) {
    char ts[32];
    iso_time(meta->created, ts, sizeof ts);
    const char *id = r->model->id ? r->model->id : "";
    return json_pack("{s:o,s:s}", "model", api_json_text(id, strlen(id)), "created_at", ts);
}

/* The text as /api/generate ("response") or /api/chat (message) carries it. */
static void set_text(json_t *o, int chat, const char *text, size_t len) {
    json_t *t = api_json_text(text ? text : "", text ? len : 0);
    if (chat) json_object_set_new(o, "message", json_pack("{s:s,s:o}", "role", "assistant", "content", t));
    else json_object_set_new(o, "response", t);
}

/* The final object: done, done_reason, the counts and durations (ns), an empty context. */
static char *final_line(const api_completion_req *r, const api_meta *meta, int chat, const api_choice *c,
                        const api_usage *u, int ndjson) {
    json_t *o = head(r, meta);
    if (!o) return NULL;
    set_text(o, chat, c ? c->text : "", c ? c->text_len : 0);
    json_object_set_new(o, "done", json_true());
    const char *reason = json_is_true(json_object_get(r->dialect, "load")) ? "load"
                         : c && c->finish == API_FINISH_STOP ? "stop" : "length";
    json_object_set_new(o, "done_reason", json_string(reason));
    if (!chat) json_object_set_new(o, "context", json_array());
    json_object_set_new(o, "total_duration", json_integer(u->prompt_ns + u->gen_ns));
    json_object_set_new(o, "load_duration", json_integer(0));
    json_object_set_new(o, "prompt_eval_count", json_integer(u->prompt_tokens));
    json_object_set_new(o, "prompt_eval_duration", json_integer(u->prompt_ns));
    json_object_set_new(o, "eval_count", json_integer(u->completion_tokens));
    json_object_set_new(o, "eval_duration", json_integer(u->gen_ns));
    return api_format_dump(o, API_FRAMING_NDJSON, ndjson);
}

static char *chunk(const api_completion_req *r, const api_meta *meta, const api_choice *d, int chat) {
    if (!d->text_len) return strdup(""); /* the finish goes out with the final object */
    json_t *o = head(r, meta);
    if (!o) return NULL;
    set_text(o, chat, d->text, d->text_len);
    json_object_set_new(o, "done", json_false());
    return api_format_dump(o, API_FRAMING_NDJSON, 1);
}

static char *gen_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *d, int first) {
    (void)first;
    return chunk(r, meta, d, 0);
}

static char *chat_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *d, int first) {
    (void)first;
    return chunk(r, meta, d, 1);
}

static char *gen_end(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                     const api_usage *u, json_t *routing) {
    (void)routing;
    return final_line(r, meta, 0, n > 0 ? c : NULL, u, 1);
}

static char *chat_end(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                      const api_usage *u, json_t *routing) {
    (void)routing;
    return final_line(r, meta, 1, n > 0 ? c : NULL, u, 1);
}

static char *gen_response(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                          const api_usage *u, json_t *routing) {
    (void)routing;
    return final_line(r, meta, 0, n > 0 ? c : NULL, u, 0);
}

static char *chat_response(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                           const api_usage *u, json_t *routing) {
    (void)routing;
    return final_line(r, meta, 1, n > 0 ? c : NULL, u, 0);
}

static char *ollama_error(const api_error *e, int streamed) {
    json_t *o = json_pack("{s:o}", "error", api_json_text(e->message, strlen(e->message)));
    return api_format_dump(o, API_FRAMING_NDJSON, streamed);
}

char *api_ollama_error_json(const api_error *e) { return ollama_error(e, 0); }

const api_format api_format_ollama_generate = {
    .name = "ollama_generate",
    .framing = API_FRAMING_NDJSON,
    .parse = parse_generate,
    .chunk = gen_chunk,
    .stream_end = gen_end,
    .response = gen_response,
    .error = ollama_error,
};

const api_format api_format_ollama_chat = {
    .name = "ollama_chat",
    .framing = API_FRAMING_NDJSON,
    .parse = parse_chat,
    .chunk = chat_chunk,
    .stream_end = chat_end,
    .response = chat_response,
    .error = ollama_error,
};

/* ------------------------------------------------------------ models */

/* "1.5B", "494M", "12K": Ollama's parameter_size. */
static void param_size(uint64_t n, char *buf, size_t cap) {
    if (n >= 1000000000ull) snprintf(buf, cap, "%.1fB", (double)n / 1e9);
    else if (n >= 1000000ull) snprintf(buf, cap, "%.0fM", (double)n / 1e6);
    else snprintf(buf, cap, "%.0fK", (double)n / 1e3);
}

static json_t *details_json(const api_model *m) {
    const cm_model_info *in = cm_model_get_info(m->model);
    char ps[32];
    param_size(in->n_params, ps, sizeof ps);
    const char *arch = in->arch ? in->arch : "";
    return json_pack("{s:s,s:s,s:o,s:[o],s:s,s:o}", "parent_model", "", "format", "gguf", "family",
                     api_json_text(arch, strlen(arch)), "families", api_json_text(arch, strlen(arch)),
                     "parameter_size", ps, "quantization_level",
                     api_json_text(in->weight_type ? in->weight_type : "", in->weight_type ? strlen(in->weight_type) : 0));
}

static json_t *entry_json(const api_model *m) {
    const cm_model_info *in = cm_model_get_info(m->model);
    char ts[32];
    iso_time(m->created, ts, sizeof ts);
    const char *id = m->id ? m->id : "";
    return json_pack("{s:o,s:o,s:s,s:I,s:s,s:o}", "name", api_json_text(id, strlen(id)), "model",
                     api_json_text(id, strlen(id)), "modified_at", ts, "size", (json_int_t)in->file_bytes, "digest", "",
                     "details", details_json(m));
}

char *api_render_ollama_tags(const api_model *models, int n, int running) {
    json_t *arr = json_array();
    for (int i = 0; arr && i < n; i++) {
        json_t *e = entry_json(&models[i]);
        if (e && running) {
            json_object_set_new(e, "expires_at", json_string("2318-01-01T00:00:00Z")); /* never unloaded */
            json_object_set_new(e, "size_vram", json_integer(0));
            json_object_set_new(e, "context_length", json_integer(models[i].n_ctx));
        }
        json_array_append_new(arr, e);
    }
    return api_format_dump(json_pack("{s:o}", "models", arr), API_FRAMING_NDJSON, 0);
}

int api_ollama_show_model(const char *body, size_t len, const api_model *models, int n, const api_model **out,
                          api_error *e) {
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    json_t *name = json_object_get(root, "model");
    if (!json_is_string(name)) name = json_object_get(root, "name");
    int rc = 0;
    if (!json_is_string(name)) {
        rc = api_error_set(e, 400, API_ERR_INVALID, "model", NULL, "model is required");
    } else if (!(*out = api_find_model(models, n, json_string_value(name)))) {
        rc = api_error_set(e, 404, API_ERR_NOT_FOUND, "model", "model_not_found", "model '%.200s' not found",
                           json_string_value(name));
    }
    json_decref(root);
    return rc;
}

char *api_render_ollama_show(const api_model *m) {
    const cm_model_info *in = cm_model_get_info(m->model);
    size_t tlen = 0;
    const char *tpl = cm_model_chat_template(m->model, &tlen);
    const char *arch = in->arch ? in->arch : "";
    char key[96];
    json_t *info = json_pack("{s:o,s:I,s:I}", "general.architecture", api_json_text(arch, strlen(arch)),
                             "general.parameter_count", (json_int_t)in->n_params, "tokenizer.ggml.vocab_size",
                             (json_int_t)in->n_vocab);
    snprintf(key, sizeof key, "%.64s.context_length", arch);
    if (info) json_object_set_new(info, key, json_integer(m->n_ctx));
    json_t *caps = json_pack("[s]", "completion");
    if (caps && in->fim_pre >= 0 && in->fim_suf >= 0 && in->fim_mid >= 0) json_array_append_new(caps, json_string("insert"));
    if (caps && m->chat_template) json_array_append_new(caps, json_string("chat"));
    char ts[32];
    iso_time(m->created, ts, sizeof ts);
    json_t *o = json_pack("{s:s,s:s,s:s,s:o,s:o,s:o,s:o,s:s}", "license", "", "modelfile", "", "parameters", "",
                          "template", tpl ? api_json_text(tpl, tlen) : json_string("{{ .Prompt }}"), "details",
                          details_json(m), "model_info", info, "capabilities", caps, "modified_at", ts);
    return api_format_dump(o, API_FRAMING_NDJSON, 0);
}

/* The Ollama release whose API this layer follows (suffix, done_reason, capabilities in /api/show):
 * clients that check the version before using a feature see one that has them. */
#define OLLAMA_API_VERSION "0.9.0"

char *api_render_ollama_version(void) {
    return api_format_dump(json_pack("{s:s}", "version", OLLAMA_API_VERSION), API_FRAMING_NDJSON, 0);
}
