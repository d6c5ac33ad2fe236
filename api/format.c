/*
 * format.c - what every dialect shares (reading its body, the translated request's rules, framing), and
 * the OpenAI dialects as api_format tables: which parser reads a route's body and which renderers
 * (render.c) write its responses, with the stream's OpenAI ending (the include_usage chunk, then
 * "data: [DONE]").
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

const char *api_format_stream_type(const api_format *f) {
    return f->framing == API_FRAMING_NDJSON ? "application/x-ndjson" : "text/event-stream";
}

json_t *api_format_load_body(const char *body, size_t len, const api_model *m, const api_limits *lim,
                             api_completion_req *out, api_error *e) {
    memset(out, 0, sizeof *out);
    out->model = m;
    out->logprobs = -1;
    if (len > lim->max_body_bytes) {
        api_error_set(e, 413, API_ERR_INVALID, NULL, "request_too_large",
                      "The request body is %zu bytes; this server accepts at most %zu.", len, lim->max_body_bytes);
        return NULL;
    }
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, &je);
    if (!root) {
        api_error_set(e, 400, API_ERR_INVALID, NULL, NULL,
                      "We could not parse the JSON body of your request: %s (line %d, column %d).", je.text,
                      je.line, je.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        api_error_set(e, 400, API_ERR_INVALID, NULL, NULL, "The request body must be a JSON object.");
        return NULL;
    }
    return root;
}

int api_format_parse_translated(const json_t *c, json_t *dialect, const api_model *m, const api_limits *lim,
                                int max_stop, api_completion_req *out, api_error *e) {
    char *canon = json_dumps(c, JSON_COMPACT);
    if (!canon) {
        json_decref(dialect);
        memset(out, 0, sizeof *out);
        out->model = m;
        out->logprobs = -1;
        return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    }
    api_limits l = *lim;
    l.max_body_bytes = SIZE_MAX;
    if (max_stop > 0) l.max_stop = max_stop < API_STOP_MAX ? max_stop : API_STOP_MAX;
    int rc = api_completion_validate(canon, strlen(canon), m, &l, out, e);
    free(canon);
    if (rc) {
        api_format_name_params(dialect, e);
        json_decref(dialect);
        return rc;
    }
    out->dialect = dialect;
    return 0;
}

void api_format_default(json_t *c, const api_model *m, const char *key, json_t *v) {
    if (api_model_has_default(m, key)) json_decref(v);
    else json_object_set_new(c, key, v);
}

void api_format_name_params(const json_t *dialect, api_error *e) {
    json_t *to = json_object_get(json_object_get(dialect, "params"), e->param);
    if (json_is_string(to)) snprintf(e->param, sizeof e->param, "%s", json_string_value(to));
}

int api_format_tokenize(api_completion_req *r, api_error *e) {
    json_t *dialect = json_incref(r->dialect); /* a failed tokenization empties r */
    int rc = api_completion_tokenize(r, e);
    if (rc) api_format_name_params(dialect, e);
    json_decref(dialect);
    return rc;
}

int api_format_parse_all(const api_format *f, const char *body, size_t len, const api_model *m,
                         const api_limits *lim, api_completion_req *out, api_error *e) {
    if (f->parse(body, len, m, lim, out, e)) return -1;
    return api_format_tokenize(out, e);
}

char *api_format_dump(json_t *o, api_framing framing, int event) {
    if (!o) return NULL;
    /* 9 significant digits round-trip a float; more would only print the float->double cast's noise */
    char *j = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(o);
    if (!j || !event) return j;
    if (framing == API_FRAMING_SSE) {
        char *s = api_sse_data(j);
        free(j);
        return s;
    }
    size_t n = strlen(j);
    char *s = realloc(j, n + 2);
    if (!s) { free(j); return NULL; }
    s[n] = '\n';
    s[n + 1] = 0;
    return s;
}

/* The usage event (when stream_options.include_usage) followed by [DONE]. */
static char *openai_end(char *usage_event) {
    size_t n = usage_event ? strlen(usage_event) : 0;
    char *s = malloc(n + sizeof API_SSE_DONE);
    if (s) {
        if (n) memcpy(s, usage_event, n);
        memcpy(s + n, API_SSE_DONE, sizeof API_SSE_DONE);
    }
    free(usage_event);
    return s;
}

static char *openai_error(const api_error *e, int streamed) {
    return streamed ? api_sse_error(e) : api_error_json(e);
}

/* ------------------------------------------------------------ /v1/completions */

static char *cmpl_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *delta, int first) {
    (void)first;
    return api_render_chunk(r, meta, delta);
}

static char *cmpl_stream_end(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                             const api_usage *usage, json_t *routing) {
    (void)choices;
    (void)n;
    if (!r->include_usage) return openai_end(NULL);
    char *u = api_render_usage_chunk(r, meta, usage, routing);
    return u ? openai_end(u) : NULL;
}

const api_format api_format_completions = {
    .name = "completions",
    .framing = API_FRAMING_SSE,
    .parse = api_completion_validate,
    .chunk = cmpl_chunk,
    .stream_end = cmpl_stream_end,
    .response = api_render_completion,
    .error = openai_error,
};

/* ------------------------------------------------------------ /v1/chat/completions */

static char *chat_stream_end(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                             const api_usage *usage, json_t *routing) {
    (void)choices;
    (void)n;
    if (!r->include_usage) return openai_end(NULL);
    char *u = api_render_chat_usage_chunk(r, meta, usage, routing);
    return u ? openai_end(u) : NULL;
}

const api_format api_format_chat = {
    .name = "chat",
    .framing = API_FRAMING_SSE,
    .parse = api_parse_chat,
    .chunk = api_render_chat_chunk,
    .stream_end = chat_stream_end,
    .response = api_render_chat,
    .error = openai_error,
};

/* ------------------------------------------------------------ /v1/fim/completions */

const api_format api_format_fim = {
    .name = "fim_completions",
    .framing = API_FRAMING_SSE,
    .parse = api_fim_completion_validate,
    .chunk = api_render_chat_chunk,
    .stream_end = chat_stream_end,
    .response = api_render_chat,
    .error = openai_error,
};
