/*
 * format.c - the OpenAI dialects as api_format tables: which parser reads a route's body and which
 * renderers (render.c) write its responses, with the stream's OpenAI ending (the include_usage chunk,
 * then "data: [DONE]").
 */
#include <stdlib.h>
#include <string.h>

#include "format.h"

const char *api_format_stream_type(const api_format *f) {
    return f->framing == API_FRAMING_NDJSON ? "application/x-ndjson" : "text/event-stream";
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
    .parse = api_parse_completion,
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
