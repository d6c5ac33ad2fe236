/*
 * tokens.c - llama.cpp's tokenizer endpoints, which editor plugins (llama.vscode, llama.vim) call to
 * count and cut context: POST /tokenize and POST /detokenize, JSON body -> response JSON, with the
 * served model's own tokenizer. Field names and defaults follow llama.cpp's server.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"

/* The body as a JSON object, or NULL with e set (413, 400). */
static json_t *load_object(const char *body, size_t len, const api_limits *lim, api_error *e) {
    if (len > lim->max_body_bytes) {
        api_error_set(e, 413, API_ERR_INVALID, NULL, "request_too_large",
                      "The request body is %zu bytes; this server accepts at most %zu.", len, lim->max_body_bytes);
        return NULL;
    }
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL | JSON_DECODE_ANY, &je);
    if (!root) {
        api_error_set(e, 400, API_ERR_INVALID, NULL, NULL,
                      "We could not parse the JSON body of your request: %s (line %d, column %d).", je.text, je.line,
                      je.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        api_error_set(e, 400, API_ERR_INVALID, NULL, NULL, "The request body is not of type 'object'");
        json_decref(root);
        return NULL;
    }
    return root;
}

/* The response body: res dumped and released; NULL with e set (500) when out of memory (res NULL
 * included: it could not be built). */
static char *dump_body(json_t *res, api_error *e) {
    char *out = res ? json_dumps(res, JSON_COMPACT) : NULL;
    json_decref(res);
    if (!out) api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    return out;
}

/* An optional boolean field: 0 when absent or null (*out untouched), -1 with e set on a wrong type. */
static int opt_bool(json_t *o, const char *key, int *out, api_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v))
        return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "'%s' is not of type 'boolean'", key);
    *out = json_is_true(v);
    return 0;
}

/* A token's piece: its text, or its bytes as an array of numbers when they are not valid UTF-8 on their
 * own (part of a character), as llama.cpp shows them. */
static json_t *piece_json(const cm_model *m, int32_t id) {
    char small[256];
    char *b = small;
    int n = cm_token_bytes(m, id, 1, small, sizeof small);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof small) {
        if (!(b = malloc((size_t)n))) return NULL;
        int n2 = cm_token_bytes(m, id, 1, b, (size_t)n);
        n = n2 < 0 || n2 > n ? 0 : n2;
    }
    json_t *j = json_stringn(b, (size_t)n); /* NULL for invalid UTF-8 */
    if (!j && (j = json_array()))
        for (int i = 0; i < n; i++) json_array_append_new(j, json_integer((unsigned char)b[i]));
    if (b != small) free(b);
    return j;
}

/* {"tokens": [...]} for ids[0..n): ids, or {id, piece} objects. NULL when out of memory. */
static json_t *tokens_json(const cm_model *m, const int32_t *ids, int n, int with_pieces) {
    json_t *arr = json_array();
    json_t *res = arr ? json_pack("{s:o}", "tokens", arr) : NULL;
    for (int i = 0; res && i < n; i++) {
        json_t *t = json_integer(ids[i]);
        if (t && with_pieces) {
            json_t *p = piece_json(m, ids[i]);
            t = p ? json_pack("{s:o,s:o}", "id", t, "piece", p) : (json_decref(t), NULL);
        }
        if (!t || json_array_append_new(arr, t)) { json_decref(res); res = NULL; }
    }
    return res;
}

char *api_tokenize(const char *body, size_t len, const api_model *am, const api_limits *lim, api_error *e) {
    json_t *root = load_object(body, len, lim, e);
    if (!root) return NULL;
    char *out = NULL;
    int32_t *ids = NULL;
    int add_special = 0, parse_special = 1, with_pieces = 0;
    json_t *content = json_object_get(root, "content");
    if (!content || json_is_null(content)) {
        api_error_set(e, 400, API_ERR_INVALID, "content", NULL, "'content' is a required property");
        goto done;
    }
    if (!json_is_string(content)) {
        api_error_set(e, 400, API_ERR_INVALID, "content", NULL, "'content' is not of type 'string'");
        goto done;
    }
    if (opt_bool(root, "add_special", &add_special, e) || opt_bool(root, "parse_special", &parse_special, e) ||
        opt_bool(root, "with_pieces", &with_pieces, e))
        goto done;
    int flags = (add_special ? CM_TOK_ADD_BOS : 0) | (parse_special ? CM_TOK_PARSE_SPECIAL : 0);
    const char *text = json_string_value(content);
    size_t n_text = json_string_length(content);
    cm_err ce = {0};
    int n = cm_tokenize(am->model, text, n_text, flags, NULL, 0, &ce); /* how many: then exactly that */
    if (n >= 0 && !(ids = malloc(((size_t)n + 1) * sizeof *ids))) {
        out = dump_body(NULL, e);
        goto done;
    }
    if (n >= 0 && cm_tokenize(am->model, text, n_text, flags, ids, n, &ce) != n) n = -1;
    if (n < 0) api_error_set(e, 500, API_ERR_SERVER, "content", NULL, "tokenizer failed: %s", ce.msg);
    else out = dump_body(tokens_json(am->model, ids, n, with_pieces), e);
done:
    free(ids);
    json_decref(root);
    return out;
}

char *api_detokenize(const char *body, size_t len, const api_model *am, const api_limits *lim, api_error *e) {
    json_t *root = load_object(body, len, lim, e);
    if (!root) return NULL;
    char *out = NULL, *text = NULL;
    const cm_model_info *info = cm_model_get_info(am->model);
    json_t *tokens = json_object_get(root, "tokens");
    size_t n = json_is_array(tokens) ? json_array_size(tokens) : 0;
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    if (!json_is_array(tokens)) {
        api_error_set(e, 400, API_ERR_INVALID, "tokens", NULL, "'tokens' is a required property (an array of token ids)");
        goto done;
    }
    for (size_t i = 0; ids && i < n; i++) {
        json_t *x = json_array_get(tokens, i);
        json_int_t t = json_is_integer(x) ? json_integer_value(x) : -1;
        if (t < 0 || t >= info->n_vocab) {
            api_error_set(e, 400, API_ERR_INVALID, "tokens", NULL,
                          "Invalid token at index %zu in 'tokens': this model's vocabulary has %d tokens (ids 0..%d).",
                          i, info->n_vocab, info->n_vocab - 1);
            goto done;
        }
        ids[i] = (int32_t)t;
    }
    /* control tokens are shown as their text, as llama.cpp does */
    int need = ids ? cm_detokenize(am->model, ids, (int)n, 1, NULL, 0) : -1;
    if (need >= 0 && (text = malloc((size_t)need + 1)) &&
        cm_detokenize(am->model, ids, (int)n, 1, text, (size_t)need + 1) == need) {
        json_t *s = api_json_text(text, (size_t)need);
        out = dump_body(s ? json_pack("{s:o}", "content", s) : NULL, e);
    } else {
        out = dump_body(NULL, e); /* out of memory: cm_detokenize fails on nothing else for valid ids */
    }
done:
    free(text);
    free(ids);
    json_decref(root);
    return out;
}
