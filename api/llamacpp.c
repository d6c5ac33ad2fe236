/*
 * llamacpp.c - llama.cpp server's native endpoints, as editor plugins (llama.vscode, llama.vim) call
 * them: POST /completion (prompt string or token ids) and POST /infill (input_prefix, input_suffix,
 * input_extra [{filename, text}], prompt: repository-level fill in the middle, api_fim_context_tokens).
 *
 * A request is translated into a /v1/completions body (llama.cpp's sampling defaults: temperature 0.8,
 * top_k 40, top_p 0.95, min_p 0.05; n_predict -> max_tokens, negative: until the context is full;
 * repeat_penalty -> repetition_penalty; seed -1: random) and read by api_completion_validate.
 * n_indent and t_max_predict_ms are honoured as llama.cpp honours them (api_completion_req). "model",
 * cache_prompt (the prefix cache is always on), samplers, t_max_prompt_ms (llama.cpp does not implement
 * it either), id_slot and the other llama.cpp options are accepted and ignored. /infill's repository
 * context is checked here but built off the event loop, with the tokenization (infill_build). The
 * response is llama.cpp's {content, stop, tokens_predicted, tokens_evaluated, tokens_cached, truncated,
 * stop_type ("eos" | "word" | "limit"), stopping_word, generation_settings, timings{...}}, projected onto
 * "response_fields" ("timings/prompt_n" style paths) when the request names them; streamed as SSE
 * events {content, stop:false} and the final object with stop:true (no [DONE]).
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

/* llama.cpp option -> completion field (same meaning). */
static const struct { const char *from, *to; } option_map[] = {
    {"temperature", "temperature"}, {"top_k", "top_k"}, {"top_p", "top_p"}, {"min_p", "min_p"},
    {"repeat_penalty", "repetition_penalty"}, {"presence_penalty", "presence_penalty"},
    {"frequency_penalty", "frequency_penalty"}, {"stop", "stop"}, {"stream", "stream"},
};

/* The completion body c gets llama.cpp's defaults and the request's options. */
static void map_options(json_t *root, json_t *c, const api_model *m) {
    api_format_default(c, m, "temperature", json_real(0.8));
    api_format_default(c, m, "top_k", json_integer(40));
    api_format_default(c, m, "top_p", json_real(0.95));
    api_format_default(c, m, "min_p", json_real(0.05));
    for (size_t i = 0; i < sizeof option_map / sizeof *option_map; i++) {
        json_t *v = json_object_get(root, option_map[i].from);
        if (v) json_object_set(c, option_map[i].to, v);
    }
    json_t *seed = json_object_get(root, "seed");
    if (json_is_integer(seed) && json_integer_value(seed) >= 0) json_object_set(c, "seed", seed);
    json_t *np = json_object_get(root, "n_predict");
    if (!np) np = json_object_get(root, "max_tokens"); /* llama.cpp's alias */
    if (np && json_is_integer(np) && json_integer_value(np) < 0) np = json_null(); /* the client's "no limit" */
    if (np) json_object_set(c, "max_tokens", np);
    else api_format_default(c, m, "max_tokens", json_null());
}

/* llama.cpp's limits that act while a choice is generated (the server's scheduler applies them):
 * n_indent, t_max_predict_ms. Absent, null or <= 0: off. */
static int parse_generation_limits(json_t *root, api_completion_req *out, api_error *e) {
    static const char *const keys[] = {"n_indent", "t_max_predict_ms"};
    int *dst[] = {&out->n_indent, &out->t_max_predict_ms};
    for (int k = 0; k < 2; k++) {
        json_t *v = json_object_get(root, keys[k]);
        if (!v || json_is_null(v)) continue;
        if (!json_is_integer(v))
            return api_error_set(e, 400, API_ERR_INVALID, keys[k], NULL, "'%s' must be an integer", keys[k]);
        json_int_t x = json_integer_value(v);
        *dst[k] = x <= 0 ? 0 : x > INT_MAX ? INT_MAX : (int)x;
    }
    return 0;
}

/* The completion rules over c; errors name llama.cpp's parameters. */
static int finish_parse(json_t *root, json_t *c, const api_model *m, const api_limits *lim,
                        api_completion_req *out, api_error *e) {
    json_t *rf = json_object_get(root, "response_fields");
    json_t *d = json_pack("{s:b,s:O?,s:{s:s,s:s,s:s}}", "truncated", 0, "response_fields",
                          json_is_array(rf) ? rf : NULL, "params", "max_tokens", "n_predict", "repetition_penalty",
                          "repeat_penalty", "suffix", "input_suffix");
    if (!d) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    /* editor plugins send more stop strings than OpenAI's 4 */
    if (api_format_parse_translated(c, d, m, lim, API_STOP_MAX, out, e)) return -1;
    if (parse_generation_limits(root, out, e)) {
        api_completion_req_free(out);
        return -1;
    }
    /* n_predict 0: the plugins' cache warm-up */
    json_t *mt = json_object_get(c, "max_tokens");
    out->prefill = json_is_integer(mt) && json_integer_value(mt) == 0;
    return 0;
}

static int parse_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                            api_completion_req *out, api_error *e) {
    json_t *root = api_format_load_body(body, len, m, lim, out, e), *c = json_object();
    int rc = -1;
    if (root && c) {
        json_t *p = json_object_get(root, "prompt");
        if (p) json_object_set(c, "prompt", p);
        map_options(root, c, m);
        rc = finish_parse(root, c, m, lim, out, e);
    } else if (root) {
        api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    }
    json_decref(c);
    json_decref(root);
    return rc;
}

/* A string field (absent or null: ""); -1 with e set when it is something else. */
static int text_field(json_t *root, const char *key, const char **s, size_t *n, api_error *e) {
    json_t *v = json_object_get(root, key);
    *s = "";
    *n = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "'%s' must be a string", key);
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* An /infill body's repository context: prefix, suffix, the text typed so far ("prompt") and the
 * input_extra files (*files: malloc'd, caller frees; its strings point into root). 0, or -1 with e set
 * (400 naming the field) and *files NULL. A walk over the body: the parse checks it on the loop, the
 * builder reads it again off the loop. */
static int infill_context(json_t *root, api_fim_context *fc, api_fim_file **files, api_error *e) {
    memset(fc, 0, sizeof *fc);
    *files = NULL;
    if (text_field(root, "input_prefix", &fc->prefix, &fc->prefix_len, e) ||
        text_field(root, "input_suffix", &fc->suffix, &fc->suffix_len, e) ||
        text_field(root, "prompt", &fc->middle, &fc->middle_len, e))
        return -1;
    json_t *extra = json_object_get(root, "input_extra");
    if (!extra || json_is_null(extra)) return 0;
    if (!json_is_array(extra))
        return api_error_set(e, 400, API_ERR_INVALID, "input_extra", NULL, "'input_extra' must be an array of {filename, text}");
    api_fim_file *f = calloc(json_array_size(extra) + 1, sizeof *f);
    if (!f) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    size_t i;
    json_t *x;
    json_array_foreach(extra, i, x) {
        json_t *fn = json_object_get(x, "filename"), *tx = json_object_get(x, "text");
        if (!json_is_object(x) || !json_is_string(tx) || (fn && !json_is_null(fn) && !json_is_string(fn))) {
            free(f);
            return api_error_set(e, 400, API_ERR_INVALID, "input_extra", NULL,
                                 "input_extra[%zu] must be {\"filename\": string, \"text\": string}", i);
        }
        api_fim_file *y = &f[fc->n_files++];
        y->name = json_is_string(fn) ? json_string_value(fn) : "";
        y->name_len = json_is_string(fn) ? json_string_length(fn) : 0;
        y->text = json_string_value(tx);
        y->text_len = json_string_length(tx);
    }
    fc->files = *files = f;
    return 0;
}

/* The deferred half of /infill (api_prompt_builder): args {"body": the request, "budget": tokens}; the
 * prompt is the repository context's token ids, and the dialect learns whether it was truncated. */
static json_t *infill_build(api_completion_req *r, const json_t *args, api_error *e) {
    api_fim_context fc;
    api_fim_file *files = NULL;
    int32_t *toks = NULL;
    int n = 0, truncated = 0;
    json_t *ids = NULL;
    if (infill_context(json_object_get(args, "body"), &fc, &files, e) ||
        api_fim_context_tokens(r->model->model, &fc, (int)json_integer_value(json_object_get(args, "budget")), &toks,
                               &n, &truncated, e))
        goto done;
    ids = json_array();
    for (int i = 0; ids && i < n; i++)
        if (json_array_append_new(ids, json_integer(toks[i]))) { json_decref(ids); ids = NULL; }
    if (!ids || (r->dialect && json_object_set_new(r->dialect, "truncated", json_boolean(truncated)))) {
        json_decref(ids);
        ids = NULL;
        api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    }
done:
    free(toks);
    free(files);
    return ids;
}

static int parse_infill(const char *body, size_t len, const api_model *m, const api_limits *lim,
                        api_completion_req *out, api_error *e) {
    json_t *root = api_format_load_body(body, len, m, lim, out, e), *c = json_object(), *args = NULL;
    api_fim_file *files = NULL;
    int rc = -1;
    if (!root) goto done;
    if (!c) { api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); goto done; }
    api_fim_context fc;
    if (infill_context(root, &fc, &files, e)) goto done; /* the shapes only: tokens are counted off the loop */
    map_options(root, c, m);
    /* room for the prompt: the context less what the completion may need (a quarter when unbounded) */
    json_t *mt = json_object_get(c, "max_tokens");
    long reserve = json_is_integer(mt) ? (long)json_integer_value(mt) : m->n_ctx / 4;
    int budget = reserve < m->n_ctx ? m->n_ctx - (int)reserve : 0;
    /* the repository context is built with the tokenization (infill_build); "" holds its place */
    json_object_set_new(c, "prompt", json_string(""));
    if (!(args = json_pack("{s:O,s:i}", "body", root, "budget", budget))) {
        api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        goto done;
    }
    rc = finish_parse(root, c, m, lim, out, e);
    if (rc == 0) {
        api__completion_defer_prompt(out, infill_build, args);
        args = NULL;
    }
done:
    free(files);
    json_decref(args);
    json_decref(c);
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------ responses */

static double ms(int64_t ns) { return (double)ns / 1e6; }

/* The final object (content: the whole text, or "" at the end of a stream). */
static json_t *final_json(const api_completion_req *r, const api_choice *c, const api_usage *u) {
    int evaluated = u->prompt_tokens - u->cached_tokens;
    double pms = ms(u->prompt_ns), gms = ms(u->gen_ns);
    int word = c && c->finish == API_FINISH_STOP && c->stop_word > 0 && c->stop_word <= r->stop.n;
    const char *stop_type = !c || c->finish == API_FINISH_LENGTH ? "limit" : word ? "word" : "eos";
    json_t *stopping_word = word ? api_json_text(r->stop.s[c->stop_word - 1], r->stop.len[c->stop_word - 1])
                                 : json_string("");
    const char *id = r->model->id ? r->model->id : "";
    json_t *truncated = r->dialect ? json_object_get(r->dialect, "truncated") : NULL;
    json_t *timings = json_pack("{s:i,s:f,s:f,s:f,s:i,s:f,s:f,s:f,s:i}", "prompt_n", evaluated, "prompt_ms", pms,
                                "prompt_per_token_ms", evaluated ? pms / evaluated : 0.0, "prompt_per_second",
                                pms > 0 ? evaluated * 1e3 / pms : 0.0, "predicted_n", u->completion_tokens,
                                "predicted_ms", gms, "predicted_per_token_ms",
                                u->completion_tokens ? gms / u->completion_tokens : 0.0, "predicted_per_second",
                                gms > 0 ? u->completion_tokens * 1e3 / gms : 0.0, "cache_n", u->cached_tokens);
    json_t *settings = json_pack("{s:i,s:i,s:f,s:i,s:f,s:f,s:I}", "n_ctx", r->model->n_ctx, "n_predict", r->max_tokens,
                                 "temperature", (double)r->sampling.temperature, "top_k", r->sampling.top_k, "top_p",
                                 (double)r->sampling.top_p, "min_p", (double)r->sampling.min_p, "seed",
                                 (json_int_t)r->seed);
    return json_pack("{s:i,s:o,s:[],s:i,s:b,s:o,s:i,s:i,s:o,s:s,s:b,s:s,s:o,s:i,s:o}", "index", 0, "content",
                     api_json_text(c && c->text ? c->text : "", c && c->text ? c->text_len : 0), "tokens", "id_slot", 0,
                     "stop", 1, "model", api_json_text(id, strlen(id)), "tokens_predicted", u->completion_tokens,
                     "tokens_evaluated", u->prompt_tokens, "generation_settings", settings, "prompt", "", "truncated",
                     json_is_true(truncated), "stop_type", stop_type, "stopping_word", stopping_word, "tokens_cached",
                     u->cached_tokens, "timings", timings);
}

/* llama.cpp's response_fields: only the named fields, each under its path ("timings/prompt_n"). */
static json_t *project(const api_completion_req *r, json_t *o) {
    json_t *rf = r->dialect ? json_object_get(r->dialect, "response_fields") : NULL;
    if (!o || !json_is_array(rf) || json_array_size(rf) == 0) return o;
    json_t *p = json_object();
    size_t i;
    json_t *f;
    json_array_foreach(rf, i, f) {
        if (!p || !json_is_string(f)) continue;
        const char *path = json_string_value(f);
        json_t *v = o;
        char key[128];
        for (const char *s = path; v && *s;) {
            const char *slash = strchr(s, '/');
            size_t n = slash ? (size_t)(slash - s) : strlen(s);
            if (n >= sizeof key) { v = NULL; break; }
            memcpy(key, s, n);
            key[n] = 0;
            v = json_object_get(v, key);
            s += n + (slash ? 1 : 0);
        }
        if (v && path[0]) json_object_set(p, path, v);
    }
    json_decref(o);
    return p;
}

static char *lc_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *d, int first) {
    (void)r;
    (void)meta;
    (void)first;
    if (!d->text_len) return strdup(""); /* the stop goes out with the final object */
    json_t *o = json_pack("{s:i,s:o,s:[],s:b,s:i}", "index", 0, "content", api_json_text(d->text, d->text_len),
                          "tokens", "stop", 0, "id_slot", 0);
    return api_format_dump(o, API_FRAMING_SSE, 1);
}

static char *lc_stream_end(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                           const api_usage *u, json_t *routing) {
    (void)meta;
    (void)routing;
    return api_format_dump(project(r, final_json(r, n > 0 ? c : NULL, u)), API_FRAMING_SSE, 1);
}

static char *lc_response(const api_completion_req *r, const api_meta *meta, const api_choice *c, int n,
                         const api_usage *u, json_t *routing) {
    (void)meta;
    (void)routing;
    return api_format_dump(project(r, final_json(r, n > 0 ? c : NULL, u)), API_FRAMING_SSE, 0);
}

static char *lc_error(const api_error *e, int streamed) {
    return streamed ? api_sse_error(e) : api_error_json(e);
}

const api_format api_format_llama_completion = {
    .name = "llama_completion",
    .framing = API_FRAMING_SSE,
    .parse = parse_completion,
    .chunk = lc_chunk,
    .stream_end = lc_stream_end,
    .response = lc_response,
    .error = lc_error,
};

const api_format api_format_llama_infill = {
    .name = "llama_infill",
    .framing = API_FRAMING_SSE,
    .parse = parse_infill,
    .chunk = lc_chunk,
    .stream_end = lc_stream_end,
    .response = lc_response,
    .error = lc_error,
};
