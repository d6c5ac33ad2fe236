/*
 * error.c - OpenAI-shaped errors and SSE framing. The error body is what OpenAI's clients parse:
 * {"error": {"message", "type", "param", "code"}}, with param and code null when they do not apply.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

int api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                  const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    e->type = type ? type : API_ERR_INVALID;
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

void api_error_http(api_error *e, int status, const char *detail) {
    const char *type = API_ERR_INVALID, *code = NULL, *msg;
    switch (status) {
    case 400: msg = "The request is invalid."; break;
    case 401:
        type = API_ERR_AUTH; code = "invalid_api_key";
        msg = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.";
        break;
    case 404: type = API_ERR_NOT_FOUND; msg = "Unknown request URL. Please check the URL for typos."; break;
    case 405: code = "method_not_allowed"; msg = "Method not allowed for this URL."; break;
    case 413: code = "request_too_large"; msg = "The request body is too large."; break;
    case 414: code = "uri_too_long"; msg = "The request URL is too long."; break;
    case 431: code = "header_fields_too_large"; msg = "The request's header fields are too large."; break;
    case 429:
        type = API_ERR_RATE_LIMIT; code = "rate_limit_exceeded";
        msg = "Too many requests: the server's queue is full. Please retry later.";
        break;
    case 503:
        type = API_ERR_SERVER; code = "overloaded";
        msg = "The server is not ready or is shutting down. Please retry later.";
        break;
    default:
        type = API_ERR_SERVER;
        msg = "The server had an error while processing your request.";
        if (status < 400 || status > 599) status = 500;
        break;
    }
    api_error_set(e, status, type, NULL, code, "%s", detail ? detail : msg);
}

char *api_error_json(const api_error *e) {
    json_t *in = json_object();
    if (!in) return NULL;
    /* the message is ours, but may quote request bytes: fall back to a fixed text if not UTF-8 */
    json_t *msg = json_string(e->message);
    json_object_set_new(in, "message", msg ? msg : json_string("invalid request"));
    json_object_set_new(in, "type", json_string(e->type ? e->type : API_ERR_SERVER));
    json_object_set_new(in, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(in, "code", e->code ? json_string(e->code) : json_null());
    json_t *root = json_object();
    if (!root) { json_decref(in); return NULL; }
    json_object_set_new(root, "error", in);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

char *api_sse_data(const char *json) {
    size_t n = strlen(json);
    char *s = malloc(n + 9);
    if (!s) return NULL;
    memcpy(s, "data: ", 6);
    memcpy(s + 6, json, n);
    memcpy(s + 6 + n, "\n\n", 3);
    return s;
}

char *api_sse_error(const api_error *e) {
    char *j = api_error_json(e);
    if (!j) return NULL;
    char *s = api_sse_data(j);
    free(j);
    return s;
}

void api_make_id(char *buf, size_t cap, uint64_t rnd) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    char tail[25];
    uint64_t x = rnd;
    for (int i = 0; i < 24; i++) {
        /* splitmix64 step: spreads a weak seed (a counter) over all 24 characters */
        x += 0x9e3779b97f4a7c15ull;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        tail[i] = alphabet[z % 62];
    }
    tail[24] = '\0';
    snprintf(buf, cap, "cmpl-%s", tail);
}
