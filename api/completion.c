/*
 * completion.c - POST /v1/completions (and its FIM and Tabby forms: POST /v1/fim/completions, Tabby's
 * "segments"): JSON body -> validated, tokenized api_completion_req.
 *
 * Validation errors follow OpenAI's wording (which comes from JSON-schema messages), e.g.
 * "'abc' is not of type 'number' - 'temperature'", always with the offending parameter in "param",
 * so a client can point at the field. Every length and count from the body is bounded by api_limits.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

void api_limits_default(api_limits *l) {
    l->max_body_bytes = 4u << 20;
    l->max_tokens_cap = 0;
    l->n_max = 8;
    l->logprobs_max = 5;
    l->max_stop = 32;
    l->max_prompts = 16;
    l->max_logit_bias = 1024;
    l->strict_context = 0;
    l->n_ctx = 0;
}

/* ------------------------------------------------------------ value rendering for messages */

/* A short rendering of a JSON value for an error message: strings in single quotes (as OpenAI's
 * Python backend prints them), everything else as compact JSON; long values are cut with "...". */
static void describe(const json_t *v, char *buf, size_t cap) {
    enum { MAXV = 60 };
    char tmp[MAXV + 8];
    if (json_is_string(v)) {
        size_t n = json_string_length(v);
        const char *s = json_string_value(v);
        size_t k = n > MAXV ? MAXV : n;
        while (k < n && k > 0 && ((unsigned char)s[k] & 0xc0) == 0x80) k--; /* cut at a character */
        size_t j = 0;
        for (size_t i = 0; i < k; i++) tmp[j++] = s[i] ? s[i] : ' ';
        tmp[j] = '\0';
        snprintf(buf, cap, "'%s%s'", tmp, k < n ? "..." : "");
        return;
    }
    char *d = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15));
    if (!d) { snprintf(buf, cap, "value"); return; }
    size_t n = strlen(d);
    if (n > MAXV) {
        size_t k = MAXV;
        while (k > 0 && ((unsigned char)d[k] & 0xc0) == 0x80) k--;
        snprintf(buf, cap, "%.*s...", (int)k, d);
    } else {
        snprintf(buf, cap, "%s", d);
    }
    free(d);
}

static int err_type(api_error *e, const char *param, const json_t *v, const char *type) {
    char d[96];
    describe(v, d, sizeof d);
    return api_error_set(e, 400, API_ERR_INVALID, param, NULL, "%s is not of type '%s' - '%s'", d, type, param);
}

static int err_range(api_error *e, const char *param, const json_t *v, const char *what, double bound) {
    char d[96];
    describe(v, d, sizeof d);
    return api_error_set(e, 400, API_ERR_INVALID, param, NULL, "%s is %s %g - '%s'", d, what, bound, param);
}

/* A number jansson cannot hold (1e400, an integer beyond 64 bits) fails the whole parse, at the byte
 * just past it. The body up to there is valid JSON, so a small scan finds the top-level field it
 * belongs to (counting brackets, skipping strings), and the 400 names that field like a range error. */
static int err_overflow(const char *body, size_t len, const json_error_t *je, api_error *e) {
    size_t end = je->position > 0 && (size_t)je->position <= len ? (size_t)je->position : 0;
    char key[64] = "";
    int depth = 0, want_key = 0;
    for (size_t i = 0; i < end; i++) {
        char c = body[i];
        if (c == '"') {
            size_t j = i + 1;
            while (j < end && body[j] != '"') j += body[j] == '\\' ? 2 : 1;
            if (depth == 1 && want_key) {
                size_t n = j - i - 1 < sizeof key - 1 ? j - i - 1 : sizeof key - 1;
                while (n > 0 && n < j - i - 1 && ((unsigned char)body[i + 1 + n] & 0xc0) == 0x80) n--;
                memcpy(key, body + i + 1, n);
                key[n] = '\0';
                want_key = 0;
            }
            i = j;
        } else if (c == '{' || c == '[') {
            if (++depth == 1) want_key = c == '{';
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',' && depth == 1) {
            want_key = 1;
        }
    }
    size_t start = end;
    while (start > 0 && end - start < 40 && body[start - 1] && strchr("0123456789+-.eE", body[start - 1])) start--;
    if (depth < 1 || !key[0])
        return api_error_set(e, 400, API_ERR_INVALID, NULL, NULL,
                             "We could not parse the JSON body of your request: the number %.*s is too large "
                             "(line %d, column %d).", (int)(end - start), body + start, je->line, je->column);
    return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "%.*s is too large to be represented - '%s'",
                         (int)(end - start), body + start, key);
}

/* ------------------------------------------------------------ typed field readers */
/* Each returns 0 when the field is absent or null (output untouched), 1 when set, -1 on error. */

/* The float a sampling parameter becomes. Ranges are checked on the double first (get_number); the bounds
 * are exact floats, so rounding keeps a value inside them. What a float cannot hold is a nonzero value
 * below its smallest normal magnitude: it would become 0 (which an exclusive minimum, or the sampler,
 * refuses: a 500 after the request was accepted) or a subnormal (a divisor that overflows to inf).
 * Such values are a 400 naming the parameter. Negative zero becomes zero. */
static int to_float(double x, const json_t *v, const char *param, const char *shown, float *out, api_error *e) {
    if (x != 0 && fabs(x) < FLT_MIN) {
        char d[96];
        describe(v, d, sizeof d);
        return api_error_set(e, 400, API_ERR_INVALID, param, NULL,
                             "%s is too small: the smallest nonzero magnitude accepted is %g - '%s'", d,
                             (double)FLT_MIN, shown);
    }
    *out = x == 0 ? 0.0f : (float)x;
    return 0;
}

static int get_number(json_t *o, const char *key, double lo, int lo_excl, double hi, float *out, api_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return err_type(e, key, v, "number");
    double x = json_number_value(v);
    if (lo_excl ? !(x > lo) : !(x >= lo))
        return err_range(e, key, v, lo_excl ? "less than or equal to the minimum of" : "less than the minimum of", lo);
    if (!(x <= hi)) return err_range(e, key, v, "greater than the maximum of", hi);
    if (to_float(x, v, key, key, out, e)) return -1;
    return 1;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi, long long *out, api_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v))) {
        /* 2.0 is an integer to JSON schema; one outside long long (from -2^63 to 2^63, exclusive above)
         * cannot be converted, and is outside every bound */
        double d = json_real_value(v);
        if (d >= 9223372036854775808.0) return err_range(e, key, v, "greater than the maximum of", (double)hi);
        if (d < -9223372036854775808.0) return err_range(e, key, v, "less than the minimum of", (double)lo);
        x = (long long)d;
    } else {
        return err_type(e, key, v, "integer");
    }
    if (x < lo) return err_range(e, key, v, "less than the minimum of", (double)lo);
    if (x > hi) return err_range(e, key, v, "greater than the maximum of", (double)hi);
    *out = x;
    return 1;
}

static int get_bool(json_t *o, const char *key, int *out, api_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return err_type(e, key, v, "boolean");
    *out = json_is_true(v);
    return 1;
}

static int get_string(json_t *o, const char *key, json_t **out, api_error *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return err_type(e, key, v, "string");
    *out = v;
    return 1;
}

/* One of a fixed list of strings; returns the index via *out. */
static int get_enum(json_t *o, const char *key, const char *const *names, int n, int *out, api_error *e) {
    json_t *v = NULL;
    int rc = get_string(o, key, &v, e);
    if (rc <= 0) return rc;
    for (int i = 0; i < n; i++) {
        if (strcmp(json_string_value(v), names[i]) == 0) { *out = i; return 1; }
    }
    char d[96], list[160];
    describe(v, d, sizeof d);
    size_t off = 0;
    for (int i = 0; i < n && off < sizeof list; i++)
        off += (size_t)snprintf(list + off, sizeof list - off, "%s'%s'", i ? ", " : "", names[i]);
    return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "%s is not one of [%s] - '%s'", d, list, key);
}

/* Copies at most cap-1 bytes of src, never ending inside a UTF-8 character (messages must stay valid
 * UTF-8 to be JSON strings). */
static void copy_cut(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) {
        n = cap - 1;
        while (n > 0 && ((unsigned char)src[n] & 0xc0) == 0x80) n--;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static char *dup_json_string(const json_t *v, size_t *len) {
    size_t n = json_string_length(v);
    char *s = malloc(n + 1);
    if (!s) return NULL;
    memcpy(s, json_string_value(v), n);
    s[n] = '\0';
    if (len) *len = n;
    return s;
}

/* ------------------------------------------------------------ prompts */

static const char *const known_fields[] = {
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
    "seed", "top_k", "min_p", "repetition_penalty", "language", "segment_routing", "routing",
    "parse_special", "n_predict", "max_completion_tokens", "cache_prompt", "segments", "random_seed", "min_tokens",
    "mode",
};

/* Appends to a growing token buffer. */
typedef struct tokbuf {
    int32_t *v;
    int n, cap;
} tokbuf;

static int tokbuf_reserve(tokbuf *b, int extra) {
    if (extra < 0 || b->n > INT_MAX - extra) return -1;
    if (b->n + extra <= b->cap) return 0;
    int cap = b->cap ? b->cap : 16;
    while (cap < b->n + extra) cap = cap > INT_MAX / 2 ? INT_MAX : cap * 2;
    int32_t *v = realloc(b->v, (size_t)cap * sizeof *v);
    if (!v) return -1;
    b->v = v;
    b->cap = cap;
    return 0;
}

static int tokbuf_push(tokbuf *b, int32_t t) {
    if (tokbuf_reserve(b, 1)) return -1;
    b->v[b->n++] = t;
    return 0;
}

/* Tokenizes text onto b. Returns 0 or -1 with err set (500: the tokenizer itself failed). */
static int tokenize_into(const cm_model *m, const char *text, size_t len, int flags, tokbuf *b, api_error *e) {
    cm_err ce = {0};
    /* byte-level BPE never produces more tokens than bytes (+ BOS); retry if a tokenizer does */
    int guess = len > (size_t)INT_MAX / 2 ? INT_MAX / 2 : (int)len + 4;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (tokbuf_reserve(b, guess)) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        int n = cm_tokenize(m, text, len, flags, b->v + b->n, b->cap - b->n, &ce);
        if (n < 0)
            return api_error_set(e, 500, API_ERR_SERVER, "prompt", NULL, "tokenizer failed: %s", ce.msg);
        if (n <= b->cap - b->n) { b->n += n; return 0; }
        guess = n;
    }
    return api_error_set(e, 500, API_ERR_SERVER, "prompt", NULL, "tokenizer returned inconsistent lengths");
}

static int check_ids(const json_t *arr, int n_vocab, api_error *e) {
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        json_int_t t = json_integer_value(v);
        if (t < 0 || t >= n_vocab)
            return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL,
                                 "Invalid token id %lld in 'prompt': this model's vocabulary has %d tokens (ids 0..%d).",
                                 (long long)t, n_vocab, n_vocab - 1);
    }
    return 0;
}

static int is_int_array(const json_t *v) {
    if (!json_is_array(v) || json_array_size(v) == 0) return 0;
    size_t i;
    json_t *x;
    json_array_foreach(v, i, x) if (!json_is_integer(x)) return 0;
    return 1;
}

typedef struct prompt_src {
    const json_t *text;  /* a JSON string, or */
    const json_t *ids;   /* a JSON array of integers (exactly one of the two is set) */
} prompt_src;

/* 0 when the model has the three FIM tokens, else -1 with the 400 a "suffix" gets. */
static int fim_check(const cm_model *m, const char *model_id, api_error *e) {
    const cm_model_info *info = cm_model_get_info(m);
    if (info->fim_pre >= 0 && info->fim_suf >= 0 && info->fim_mid >= 0) return 0;
    return api_error_set(e, 400, API_ERR_INVALID, "suffix", NULL,
                         "The model '%s' does not support 'suffix': it has no fill-in-the-middle tokens.",
                         model_id ? model_id : "");
}

/* Appends the FIM arrangement (see api_fim_tokens) to b. The prefix is text (prefix non-NULL), token ids
 * used as given (prefix_ids: no BOS, as for every token prompt), or absent. *echo_from: the index of the
 * prefix's first token. The model has FIM tokens (fim_check). */
static int fim_into(const cm_model *m, const char *prefix, size_t prefix_len, const json_t *prefix_ids,
                    const char *suffix, size_t suffix_len, tokbuf *b, int *echo_from, api_error *e) {
    const cm_model_info *info = cm_model_get_info(m);
    /* the user's code is text, never control tokens, so a file containing "<|endoftext|>" cannot end
     * the prompt early */
    *echo_from = 0;
    if (prefix && info->add_bos && info->bos >= 0) {
        if (tokbuf_push(b, info->bos)) goto oom;
        *echo_from = 1;
    }
    if (tokbuf_push(b, info->fim_pre)) goto oom;
    if (prefix) {
        if (tokenize_into(m, prefix, prefix_len, 0, b, e)) return -1;
    } else if (prefix_ids) {
        size_t i;
        json_t *x;
        json_array_foreach(prefix_ids, i, x) if (tokbuf_push(b, (int32_t)json_integer_value(x))) goto oom;
    }
    if (tokbuf_push(b, info->fim_suf)) goto oom;
    if (tokenize_into(m, suffix, suffix_len, 0, b, e)) return -1;
    if (tokbuf_push(b, info->fim_mid)) goto oom;
    return 0;
oom:
    return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
}

int api_fim_tokens(const cm_model *m, const char *prefix, size_t prefix_len, const char *suffix,
                   size_t suffix_len, int32_t **tokens, int *n_tokens, api_error *e) {
    *tokens = NULL;
    *n_tokens = 0;
    const cm_model_info *info = cm_model_get_info(m);
    if (fim_check(m, info->name, e)) return -1;
    tokbuf b = {0};
    int echo_from;
    if (fim_into(m, prefix ? prefix : "", prefix ? prefix_len : 0, NULL, suffix ? suffix : "",
                 suffix ? suffix_len : 0, &b, &echo_from, e)) {
        free(b.v);
        return -1;
    }
    *tokens = b.v;
    *n_tokens = b.n;
    return 0;
}

/* Repository-level context names: the request gives file names of the context files only. */
#define FIM_REPO_NAME "project"
#define FIM_CURRENT_FILE "file"

/* Appends v[0..n) to b (n may be 0 with v NULL). */
static int tokbuf_append(tokbuf *b, const int32_t *v, int n) {
    if (n <= 0) return 0;
    if (tokbuf_reserve(b, n)) return -1;
    memcpy(b->v + b->n, v, (size_t)n * sizeof *v);
    b->n += n;
    return 0;
}

/* Tokenizes text (plain, never control tokens) into a new buffer. */
static int plain_tokens(const cm_model *m, const char *text, size_t len, tokbuf *b, api_error *e) {
    return len ? tokenize_into(m, text, len, 0, b, e) : 0;
}

/* One context file's tokens: <file_sep> name "\n" text, or "--- name ---\n" text "\n" as text when the
 * model has no file separator. */
static int fim_file_tokens(const cm_model *m, const api_fim_file *f, tokbuf *b, api_error *e) {
    const cm_model_info *info = cm_model_get_info(m);
    size_t n = f->name_len + f->text_len + 16;
    char *s = malloc(n);
    if (!s) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    size_t o = 0;
    if (info->fim_sep >= 0) {
        if (tokbuf_push(b, info->fim_sep)) { free(s); return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); }
        memcpy(s, f->name, f->name_len);
        o = f->name_len;
        s[o++] = '\n';
        memcpy(s + o, f->text, f->text_len);
        o += f->text_len;
    } else {
        memcpy(s, "--- ", 4);
        o = 4;
        memcpy(s + o, f->name, f->name_len);
        o += f->name_len;
        memcpy(s + o, " ---\n", 5);
        o += 5;
        memcpy(s + o, f->text, f->text_len);
        o += f->text_len;
        s[o++] = '\n';
    }
    int rc = plain_tokens(m, s, o, b, e);
    free(s);
    return rc;
}

int api_fim_context_tokens(const cm_model *m, const api_fim_context *c, int budget, int32_t **tokens,
                           int *n_tokens, int *truncated, api_error *e) {
    const cm_model_info *info = cm_model_get_info(m);
    *tokens = NULL;
    *n_tokens = 0;
    *truncated = 0;
    if (fim_check(m, info->name, e)) return -1;
    tokbuf pre = {0}, mid = {0}, suf = {0}, head = {0}, cur = {0}, out = {0};
    tokbuf *files = calloc((size_t)(c->n_files > 0 ? c->n_files : 1), sizeof *files);
    int rc = -1;
    if (!files) { api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); goto done; }
    if (plain_tokens(m, c->prefix, c->prefix_len, &pre, e) || plain_tokens(m, c->middle, c->middle_len, &mid, e) ||
        plain_tokens(m, c->suffix, c->suffix_len, &suf, e))
        goto done;
    for (int i = 0; i < c->n_files; i++)
        if (fim_file_tokens(m, &c->files[i], &files[i], e)) goto done;
    /* the repository header before the files, the current file's header after them */
    if (info->fim_rep >= 0) {
        if (tokbuf_push(&head, info->fim_rep)) goto oom;
        if (plain_tokens(m, FIM_REPO_NAME "\n", sizeof FIM_REPO_NAME, &head, e)) goto done;
    }
    if (info->fim_sep >= 0) {
        if (tokbuf_push(&cur, info->fim_sep)) goto oom;
        if (plain_tokens(m, FIM_CURRENT_FILE "\n", sizeof FIM_CURRENT_FILE, &cur, e)) goto done;
    }

    /* what must fit: BOS, the three FIM tokens and the text at the cursor; then the prefix (its end)
     * gets up to 3/4 of the rest, the suffix (its start) what the prefix leaves, and the files, newest
     * (last) first, what is left, each whole */
    int bos = info->add_bos && info->bos >= 0;
    long avail = (long)budget - bos - 3 - mid.n;
    if (avail < 0) {
        api_error_set(e, 400, API_ERR_INVALID, "prompt", "context_length_exceeded",
                      "The text at the cursor needs %d tokens; with the completion it does not fit this model's "
                      "context of %d tokens.", mid.n, budget);
        goto done;
    }
    long take_pre = pre.n, take_suf = suf.n;
    if (take_pre + take_suf > avail) {
        long want_pre = avail - (take_suf < avail / 4 ? take_suf : avail / 4);
        take_pre = pre.n < want_pre ? pre.n : want_pre;
        take_suf = avail - take_pre < suf.n ? avail - take_pre : suf.n;
        *truncated = 1;
    }
    long left = avail - take_pre - take_suf - head.n - cur.n;
    int first = c->n_files; /* files[first..n_files) are kept */
    while (first > 0 && left >= files[first - 1].n) left -= files[--first].n;
    if (first > 0) *truncated = 1;
    int keep_files = first < c->n_files;

    if (bos && tokbuf_push(&out, info->bos)) goto oom;
    if (keep_files) {
        if (tokbuf_append(&out, head.v, head.n)) goto oom;
        for (int i = first; i < c->n_files; i++)
            if (tokbuf_append(&out, files[i].v, files[i].n)) goto oom;
        if (tokbuf_append(&out, cur.v, cur.n)) goto oom;
    }
    const int32_t *pre_tail = take_pre ? pre.v + (pre.n - take_pre) : NULL;
    if (tokbuf_push(&out, info->fim_pre) || tokbuf_append(&out, pre_tail, (int)take_pre) ||
        tokbuf_append(&out, mid.v, mid.n) || tokbuf_push(&out, info->fim_suf) ||
        tokbuf_append(&out, suf.v, (int)take_suf) || tokbuf_push(&out, info->fim_mid))
        goto oom;
    *tokens = out.v;
    *n_tokens = out.n;
    out.v = NULL;
    rc = 0;
    goto done;
oom:
    api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
done:
    for (int i = 0; files && i < c->n_files; i++) free(files[i].v);
    free(files);
    free(pre.v); free(mid.v); free(suf.v); free(head.v); free(cur.v); free(out.v);
    return rc;
}

/* Builds one prompt's token sequence (plain or FIM) and its echo text. */
static int build_prompt(const api_model *am, const prompt_src *src, const json_t *suffix, int parse_special,
                        api_prompt *out, api_error *e) {
    const cm_model *m = am->model;
    const cm_model_info *info = cm_model_get_info(m);
    tokbuf b = {0};
    int rc = -1;
    out->echo_from = 0;
    if (suffix) {
        if (fim_into(m, src->text ? json_string_value(src->text) : NULL, src->text ? json_string_length(src->text) : 0,
                     src->ids, json_string_value(suffix), json_string_length(suffix), &b, &out->echo_from, e))
            goto fail;
    } else if (src->text) {
        int flags = CM_TOK_ADD_BOS | (parse_special ? CM_TOK_PARSE_SPECIAL : 0);
        if (tokenize_into(m, json_string_value(src->text), json_string_length(src->text), flags, &b, e)) goto fail;
        if (info->add_bos && info->bos >= 0 && b.n > 0 && b.v[0] == info->bos) out->echo_from = 1;
    } else if (src->ids) {
        size_t i;
        json_t *x;
        json_array_foreach(src->ids, i, x) if (tokbuf_push(&b, (int32_t)json_integer_value(x))) goto oom;
    }
    if (b.n == 0) {
        /* OpenAI's default prompt is "<|endoftext|>": generate as from the start of a document */
        int32_t start = info->bos >= 0 ? info->bos : info->eos;
        if (start < 0) {
            api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL,
                          "The prompt is empty and this model has no BOS or EOS token to start from.");
            goto fail;
        }
        if (tokbuf_push(&b, start)) goto oom;
        out->echo_from = 1;
    }
    /* echo text: the prompt as given */
    if (src->text) {
        out->text = dup_json_string(src->text, &out->text_len);
        if (!out->text) goto oom;
    } else if (src->ids && json_array_size(src->ids) > 0) {
        int n = (int)json_array_size(src->ids);
        int32_t *ids = suffix ? b.v + 1 : b.v;
        /* a token is rarely longer than 16 bytes; retry once with the exact size if it is */
        size_t cap = (size_t)n * 16 + 1;
        for (int attempt = 0; attempt < 2; attempt++) {
            out->text = malloc(cap);
            if (!out->text) goto oom;
            int need = cm_detokenize(m, ids, n, 1, out->text, cap - 1);
            if (need < 0) {
                api_error_set(e, 500, API_ERR_SERVER, "prompt", NULL, "could not decode the prompt tokens");
                goto fail;
            }
            if ((size_t)need < cap) { out->text[need] = '\0'; out->text_len = (size_t)need; break; }
            free(out->text);
            out->text = NULL;
            cap = (size_t)need + 1;
        }
        if (!out->text) {
            api_error_set(e, 500, API_ERR_SERVER, "prompt", NULL, "could not decode the prompt tokens");
            goto fail;
        }
    } else {
        out->text = calloc(1, 1);
        if (!out->text) goto oom;
        out->text_len = 0;
    }
    out->tokens = b.v;
    out->n_tokens = b.n;
    return 0;
oom:
    api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
fail:
    free(b.v);
    free(out->text);
    out->text = NULL;
    return rc;
}

/* Classifies the "prompt" value into prompt sources (srcs has room for max_prompts + 1). */
static int classify_prompt(json_t *p, int n_vocab, int max_prompts, prompt_src *srcs, int *n_src, api_error *e) {
    char d[96];
    *n_src = 0;
    if (!p || json_is_null(p)) return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL, "'prompt' is a required property");
    if (json_is_string(p)) {
        srcs[0] = (prompt_src){.text = p};
        *n_src = 1;
        return 0;
    }
    if (!json_is_array(p)) goto invalid;
    size_t n = json_array_size(p);
    if (n == 0) return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL, "[] is too short - 'prompt'");
    json_t *first = json_array_get(p, 0);
    if (json_is_integer(first)) {
        if (!is_int_array(p)) goto invalid;
        if (check_ids(p, n_vocab, e)) return -1;
        srcs[0] = (prompt_src){.ids = p};
        *n_src = 1;
        return 0;
    }
    if (n > (size_t)max_prompts) {
        describe(p, d, sizeof d);
        return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL,
                             "%s is too long: %zu prompts, this server accepts at most %d per request - 'prompt'",
                             d, n, max_prompts);
    }
    size_t i;
    json_t *x;
    if (json_is_string(first)) {
        json_array_foreach(p, i, x) {
            if (!json_is_string(x)) goto invalid;
            srcs[i] = (prompt_src){.text = x};
        }
    } else if (json_is_array(first)) {
        json_array_foreach(p, i, x) {
            if (!is_int_array(x)) goto invalid;
            if (check_ids(x, n_vocab, e)) return -1;
            srcs[i] = (prompt_src){.ids = x};
        }
    } else {
        goto invalid;
    }
    *n_src = (int)n;
    return 0;
invalid:
    describe(p, d, sizeof d);
    return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL,
                         "%s is not valid under any of the given schemas - 'prompt'", d);
}

/* ------------------------------------------------------------ stop, logit_bias */

static int parse_stop(json_t *o, const api_limits *lim, api_stops *st, api_error *e) {
    json_t *v = json_object_get(o, "stop");
    char d[96];
    if (!v || json_is_null(v)) return 0;
    size_t n = 1;
    if (json_is_array(v)) {
        n = json_array_size(v);
        if (api_stops_check_count(n, lim, "", e)) { /* render the (maybe large) array only to report it */
            describe(v, d, sizeof d);
            return api_stops_check_count(n, lim, d, e);
        }
    } else if (!json_is_string(v)) {
        describe(v, d, sizeof d);
        return api_error_set(e, 400, API_ERR_INVALID, "stop", NULL,
                             "%s is not valid under any of the given schemas - 'stop'", d);
    }
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_string(x)) return err_type(e, "stop", x, "string");
        describe(x, d, sizeof d);
        if (api_stops_add(st, json_string_value(x), json_string_length(x), d, e)) return -1;
    }
    return 0;
}

static int parse_logit_bias(json_t *o, const api_limits *lim, int n_vocab, api_completion_req *r, api_error *e) {
    json_t *v = json_object_get(o, "logit_bias");
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v)) return err_type(e, "logit_bias", v, "object");
    size_t n = json_object_size(v);
    if (n == 0) return 0;
    if (n > (size_t)lim->max_logit_bias)
        return api_error_set(e, 400, API_ERR_INVALID, "logit_bias", NULL,
                             "Too many entries in 'logit_bias': %zu (the limit is %d).", n, lim->max_logit_bias);
    r->logit_bias = calloc(n, sizeof *r->logit_bias);
    if (!r->logit_bias) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    const char *key;
    json_t *x;
    json_object_foreach(v, key, x) {
        char k[24];
        copy_cut(k, sizeof k, key);
        /* keys are decimal token ids: digits only, no sign, no spaces */
        char *end;
        size_t klen = strlen(key);
        long long id = -1;
        if (klen > 0 && klen <= 10 && key[0] >= '0' && key[0] <= '9') id = strtoll(key, &end, 10);
        else end = (char *)key;
        if (klen == 0 || *end != '\0' || id < 0)
            return api_error_set(e, 400, API_ERR_INVALID, "logit_bias", NULL,
                                 "Invalid key in 'logit_bias': '%s'. Keys must be token ids (non-negative integers as strings).",
                                 k);
        if (id >= n_vocab)
            return api_error_set(e, 400, API_ERR_INVALID, "logit_bias", NULL,
                                 "Invalid token id %lld in 'logit_bias': this model's vocabulary has %d tokens (ids 0..%d).",
                                 id, n_vocab, n_vocab - 1);
        if (!json_is_number(x)) {
            char d[96];
            describe(x, d, sizeof d);
            return api_error_set(e, 400, API_ERR_INVALID, "logit_bias", NULL,
                                 "%s is not of type 'number' - 'logit_bias.%s'", d, k);
        }
        double b = json_number_value(x);
        if (!(b >= -100 && b <= 100)) {
            char d[96];
            describe(x, d, sizeof d);
            return api_error_set(e, 400, API_ERR_INVALID, "logit_bias", NULL,
                                 "%s is out of range: logit_bias values must be between -100 and 100 - 'logit_bias.%s'",
                                 d, k);
        }
        char shown[40];
        snprintf(shown, sizeof shown, "logit_bias.%s", k);
        if (to_float(b, x, "logit_bias", shown, &r->logit_bias[r->n_logit_bias].bias, e)) return -1;
        r->logit_bias[r->n_logit_bias].token = (int32_t)id;
        r->n_logit_bias++;
    }
    return 0;
}

/* ------------------------------------------------------------ engine options */

/* The engine options of one prompt's sequences (see api_prompt.opts). */
int api_seq_options(const cm_model *m, const char *language, api_segment_routing seg, const char *text,
                    size_t len, cm_seq_options *out, api_error *e) {
    cm_seq_options_default(out);
    out->segment_mode = seg == API_SEGMENT_REFERENCE ? CM_SEGMENT_REFERENCE : CM_SEGMENT_CAUSAL;
    if (cm_model_n_adapters(m) <= 0) return 0; /* only MoLE models have adapters; the others ignore it */
    if (language && cm_model_adapter_id(m, language) < 0)
        return api_error_set(e, 400, API_ERR_INVALID, "language", NULL,
                             "This model has no adapter for language '%.64s'.", language);
    const char *lang = cm_lang_for_request(language, text ? text : "", text ? len : 0);
    out->language = lang ? cm_model_adapter_id(m, lang) : -1;
    return 0;
}

/* The engine routes reference segments over the whole text in one forward pass, after which the
 * sequence takes no more tokens: scoring only, and each prompt must fit one batch. */
static int check_reference_segments(const api_model *am, const api_completion_req *r, int longest, api_error *e) {
    cm_moe_info mi;
    cm_model_moe_info(am->model, &mi);
    if (r->segment_routing != API_SEGMENT_REFERENCE || mi.kind != CM_MOE_KIND_HYBRID) return 0;
    if (r->max_tokens == 0 && (am->n_batch <= 0 || longest <= am->n_batch)) return 0;
    if (am->n_batch > 0)
        return api_error_set(e, 400, API_ERR_INVALID, "segment_routing", NULL,
                             "segment_routing 'reference' scores a complete text: it needs max_tokens 0 and a prompt "
                             "of at most %d tokens (--batch).", am->n_batch);
    return api_error_set(e, 400, API_ERR_INVALID, "segment_routing", NULL,
                         "segment_routing 'reference' scores a complete text: it needs max_tokens 0.");
}

/* ------------------------------------------------------------ the request */

int api_model_named(const api_model *m, const char *name) {
    if (m->id && strcmp(m->id, name) == 0) return 1;
    for (int i = 0; i < m->n_aliases; i++)
        if (m->aliases[i] && strcmp(m->aliases[i], name) == 0) return 1;
    const cm_model_info *info = m->model ? cm_model_get_info(m->model) : NULL;
    return info && info->name && info->name[0] && strcmp(info->name, name) == 0;
}

const api_model *api_find_model(const api_model *models, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (api_model_named(&models[i], name)) return &models[i];
    /* with one model there is nothing to choose: clients that cannot be told its name still work */
    if (n == 1 && !models[0].strict_name) return &models[0];
    return NULL;
}

int api_request_model(const char *body, size_t len, char *name, size_t cap) {
    json_t *root = json_loadb(body, len, 0, NULL);
    json_t *v = json_object_get(root, "model");
    int rc = 0;
    if (json_is_string(v)) {
        size_t n = json_string_length(v);
        rc = n < cap ? 1 : -1; /* (a NUL inside never gets here: json_loadb refuses \u0000) */
        if (rc > 0) memcpy(name, json_string_value(v), n + 1);
    }
    json_decref(root);
    return rc;
}

/* What api_completion_validate leaves for api_completion_tokenize: the parsed body (whose strings the
 * prompt sources point into) and the settings that need the prompts' token counts. */
struct api__pending {
    json_t *root;            /* owned reference */
    prompt_src *srcs;        /* (n_prompts) into root, or into built */
    json_t *prompt;          /* the prompt value: "prompt", or Tabby's segments.prefix; into root, or NULL */
    const json_t *suffix;    /* FIM suffix: into root, or empty_suffix, or NULL (no FIM) */
    json_t *empty_suffix;    /* owned "" for a FIM request without a suffix */
    int parse_special;
    int max_tokens_null;     /* "max_tokens": null: the context the longest prompt leaves */
    int explicit_max;        /* a length was given as a number */
    const char *max_tokens_key; /* the field that gave it (errors name it): "max_tokens" or an alias */
    long long max_tokens;    /* explicit value or the default (16; Tabby's 64) */
    api_limits lim;          /* a copy: the caller's may be gone when the prompts are tokenized */
    api_prompt_builder build; /* a dialect's prompt still to build (api__completion_defer_prompt), or NULL */
    json_t *build_args;      /* what build reads; owned */
    json_t *built;           /* the prompt build made (srcs point into it); owned */
};

/* The FIM suffix of a request: "suffix" (/v1/fim/completions: "" when absent), or Tabby's
 * segments.suffix (with its prefix as the prompt). Sets p->suffix (NULL: not a FIM request). */
static int parse_suffix(json_t *root, const api_model *m, api_completion_req *r, api__pending *p, api_error *e) {
    json_t *s = NULL;
    if (r->tabby) {
        json_t *seg = json_object_get(root, "segments");
        json_t *pre = json_object_get(seg, "prefix");
        if (!pre || json_is_null(pre))
            return api_error_set(e, 400, API_ERR_INVALID, "prompt", NULL, "'prefix' is a required property - 'segments'");
        if (!json_is_string(pre)) return err_type(e, "segments.prefix", pre, "string");
        p->prompt = pre;
        s = json_object_get(seg, "suffix");
        if (s && json_is_null(s)) s = NULL;
        if (s && !json_is_string(s)) return err_type(e, "segments.suffix", s, "string");
        const cm_model_info *info = cm_model_get_info(m->model);
        int has_fim = info->fim_pre >= 0 && info->fim_suf >= 0 && info->fim_mid >= 0;
        /* a model without FIM tokens can still continue the code before the cursor */
        if (!has_fim && (!s || json_string_length(s) == 0)) return 0;
    } else if (get_string(root, "suffix", &s, e) < 0) {
        return -1;
    }
    if (!s && (r->shape == API_SHAPE_FIM_CHAT || r->tabby) && !(s = p->empty_suffix = json_string("")))
        return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    if (!s) return 0;
    if (fim_check(m->model, m->id, e)) return -1;
    if (r->echo)
        return api_error_set(e, 400, API_ERR_INVALID, "echo", NULL, "'echo' cannot be used together with 'suffix'.");
    p->suffix = s;
    r->has_suffix = 1;
    return 0;
}

/* "max_tokens", or another client's name for it: llama.cpp's "n_predict" (-1: as max_tokens null),
 * OpenAI's newer "max_completion_tokens" (Continue's fimStream sends it). At most one may be given. */
static int parse_max_tokens(json_t *root, api__pending *p, api_error *e) {
    static const struct { const char *key; long long lo; } names[] = {
        {"max_tokens", 0}, {"n_predict", -1}, {"max_completion_tokens", 0}};
    const char *given = NULL;
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        json_t *v = json_object_get(root, names[k].key);
        if (!v) continue;
        if (json_is_null(v) && k > 0) continue; /* an alias set to null says nothing */
        if (given)
            return api_error_set(e, 400, API_ERR_INVALID, names[k].key, NULL,
                                 "'%s' and '%s' both set the completion length; send one of them.", names[k].key,
                                 given);
        given = names[k].key;
        long long i64 = 0;
        int rc = get_int(root, names[k].key, names[k].lo, INT_MAX, &i64, e);
        if (rc < 0) return -1;
        if (!rc || i64 < 0) { p->max_tokens_null = 1; continue; }
        p->max_tokens = i64;
        p->explicit_max = 1;
        p->max_tokens_key = names[k].key;
    }
    return 0;
}

/* The sampler's fields of a body (or of a model's defaults): their types and ranges, in one place. */
static int parse_sampling(json_t *root, cm_sampling *s, api_error *e) {
    long long i64 = 0;
    int rc;
    if (get_number(root, "temperature", 0, 0, 2, &s->temperature, e) < 0) return -1;
    if (get_number(root, "top_p", 0, 1, 1, &s->top_p, e) < 0) return -1;
    if (get_number(root, "presence_penalty", -2, 0, 2, &s->presence_penalty, e) < 0) return -1;
    if (get_number(root, "frequency_penalty", -2, 0, 2, &s->frequency_penalty, e) < 0) return -1;
    if (get_number(root, "min_p", 0, 0, 1, &s->min_p, e) < 0) return -1;
    if (get_number(root, "repetition_penalty", 0, 1, 1e6, &s->repetition_penalty, e) < 0) return -1;
    if ((rc = get_int(root, "top_k", 0, INT_MAX, &i64, e)) < 0) return -1;
    if (rc) s->top_k = (int)i64;
    return 0;
}

/* The fields a model may give defaults for (api_model.defaults), each with the request fields that, when
 * a request sends one of them, replace the default (the names other clients use for the same setting). */
static const struct { const char *key, *also[2]; } default_fields[] = {
    {"temperature", {0}},        {"top_p", {0}},
    {"top_k", {0}},              {"min_p", {0}},
    {"repetition_penalty", {0}}, {"presence_penalty", {0}},
    {"frequency_penalty", {0}},  {"seed", {"random_seed"}},
    {"stop", {0}},               {"max_tokens", {"n_predict", "max_completion_tokens"}},
};

static int default_index(const char *key) {
    for (size_t k = 0; k < sizeof default_fields / sizeof *default_fields; k++)
        if (!strcmp(default_fields[k].key, key)) return (int)k;
    return -1;
}

int api_defaults_check(const json_t *defaults, const api_limits *lim, api_error *e) {
    if (!defaults) return 0;
    if (!json_is_object(defaults))
        return api_error_set(e, 400, API_ERR_INVALID, NULL, NULL, "a model's defaults must be a JSON object");
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)defaults, key, v) {
        if (default_index(key) < 0)
            return api_error_set(e, 400, API_ERR_INVALID, NULL, NULL, "'%.64s' cannot have a model default", key);
        if (json_is_null(v) && strcmp(key, "max_tokens"))
            return api_error_set(e, 400, API_ERR_INVALID, key, NULL, "the default of '%s' cannot be null", key);
    }
    json_t *root = (json_t *)defaults; /* the getters only read */
    cm_sampling s;
    cm_sampling_default(&s);
    if (parse_sampling(root, &s, e)) return -1;
    long long i64;
    if (get_int(root, "seed", LLONG_MIN, LLONG_MAX, &i64, e) < 0) return -1;
    if (get_int(root, "max_tokens", 0, INT_MAX, &i64, e) < 0) return -1;
    api_stops st = {0};
    int rc = parse_stop(root, lim, &st, e);
    api_stops_free(&st);
    return rc ? -1 : 0;
}

/* A request takes the model's default for each field it does not send (under any of its names); "null"
 * counts as not sent, but for max_tokens, where null asks for the whole context. */
static int apply_defaults(json_t *root, const json_t *defaults) {
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)defaults, key, v) {
        int k = default_index(key);
        if (k < 0) continue; /* api_defaults_check refused it */
        int sent = 0;
        const char *names[3] = {key, default_fields[k].also[0], default_fields[k].also[1]};
        for (int i = 0; i < 3 && names[i]; i++) {
            json_t *x = json_object_get(root, names[i]);
            if (x && (!json_is_null(x) || (k == default_index("max_tokens") && i == 0))) sent = 1;
        }
        if (!sent && json_object_set(root, key, v)) return -1;
    }
    return 0;
}

int api_model_has_default(const api_model *m, const char *key) {
    return m && m->defaults && json_object_get(m->defaults, key) != NULL;
}

static int parse_fields(json_t *root, const api_model *m, const api_limits *lim, api_completion_req *r,
                        api__pending *p, api_error *e) {
    const cm_model_info *info = cm_model_get_info(m->model);
    long long i64 = 0;
    int rc, b = 0;
    json_t *s = NULL;

    /* first ignored field, for the server's log */
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        size_t k;
        for (k = 0; k < sizeof known_fields / sizeof *known_fields; k++)
            if (strcmp(key, known_fields[k]) == 0) break;
        if (k == sizeof known_fields / sizeof *known_fields) {
            copy_cut(r->unknown_field, sizeof r->unknown_field, key);
            break;
        }
    }

    if (parse_sampling(root, &r->sampling, e)) return -1;

    if ((rc = get_int(root, "n", 1, lim->n_max, &i64, e)) < 0) return -1;
    if (rc) r->n = (int)i64;
    if ((rc = get_int(root, "best_of", 1, lim->n_max, &i64, e)) < 0) return -1;
    if (rc && i64 != r->n)
        return api_error_set(e, 400, API_ERR_INVALID, "best_of", NULL,
                             "best_of (%lld) must equal n (%d): ranking extra candidates server-side is not supported.",
                             i64, r->n);

    if (parse_max_tokens(root, p, e)) return -1;
    /* llama.cpp's flag; the prefix cache is always on, so there is nothing to switch */
    if (get_bool(root, "cache_prompt", &b, e) < 0) return -1;

    if (get_bool(root, "stream", &r->stream, e) < 0) return -1;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) return err_type(e, "stream_options", so, "object");
        if (!r->stream)
            return api_error_set(e, 400, API_ERR_INVALID, "stream_options", NULL,
                                 "The 'stream_options' parameter is only allowed when 'stream' is enabled.");
        json_t *iu = json_object_get(so, "include_usage");
        if (iu && !json_is_null(iu)) {
            if (!json_is_boolean(iu)) return err_type(e, "stream_options.include_usage", iu, "boolean");
            r->include_usage = json_is_true(iu);
        }
    }

    if ((rc = get_int(root, "logprobs", 0, lim->logprobs_max, &i64, e)) < 0) return -1;
    if (rc) r->logprobs = (int)i64;
    r->sampling.n_logprobs = r->logprobs > 0 ? r->logprobs : 0;

    if (get_bool(root, "echo", &r->echo, e) < 0) return -1;
    if (parse_stop(root, lim, &r->stop, e)) return -1;
    if (parse_logit_bias(root, lim, info->n_vocab, r, e)) return -1;

    if ((rc = get_int(root, "seed", LLONG_MIN, LLONG_MAX, &i64, e)) < 0) return -1;
    if (rc) { r->seed = (uint64_t)i64; r->seed_set = 1; }
    if (r->shape == API_SHAPE_FIM_CHAT) {
        /* Mistral's names; the completion shape has no place for echo or logprobs */
        if ((rc = get_int(root, "random_seed", LLONG_MIN, LLONG_MAX, &i64, e)) < 0) return -1;
        if (rc && r->seed_set)
            return api_error_set(e, 400, API_ERR_INVALID, "random_seed", NULL,
                                 "'random_seed' and 'seed' both set the seed; send one of them.");
        if (rc) { r->seed = (uint64_t)i64; r->seed_set = 1; }
        if ((rc = get_int(root, "min_tokens", 0, 0, &i64, e)) < 0) return -1;
        if (r->echo)
            return api_error_set(e, 400, API_ERR_INVALID, "echo", NULL, "'echo' is not supported on /v1/fim/completions.");
        if (r->logprobs >= 0)
            return api_error_set(e, 400, API_ERR_INVALID, "logprobs", NULL,
                                 "'logprobs' is not supported on /v1/fim/completions.");
    }

    if ((rc = get_string(root, "user", &s, e)) < 0) return -1;
    if (rc && !(r->user = dup_json_string(s, NULL))) goto oom;
    if ((rc = get_string(root, "language", &s, e)) < 0) return -1;
    if (rc && !(r->language = dup_json_string(s, NULL))) goto oom;
    /* Tabby sends its editor's language id whatever the model: one the model has no adapter for is
     * left to detection rather than refused */
    cm_seq_options lso;
    if (r->language && api_seq_options(m->model, r->language, API_SEGMENT_CAUSAL, NULL, 0, &lso, e) < 0) {
        if (!r->tabby) return -1;
        free(r->language);
        r->language = NULL;
    }

    static const char *const seg_names[] = {"causal", "reference"};
    static const char *const routing_names[] = {"none", "summary", "full", "tokens"};
    if ((rc = get_enum(root, "segment_routing", seg_names, 2, &b, e)) < 0) return -1;
    if (rc) r->segment_routing = (api_segment_routing)b;
    if ((rc = get_enum(root, "routing", routing_names, 4, &b, e)) < 0) return -1;
    if (rc) r->routing = (api_routing_mode)b;
    /* Tabby's mode: its "next_edit_suggestion" needs an edit history this server does not read */
    static const char *const mode_names[] = {"standard"};
    if (get_enum(root, "mode", mode_names, 1, &b, e) < 0) return -1;
    if (get_bool(root, "parse_special", &p->parse_special, e) < 0) return -1;
    if (parse_suffix(root, m, r, p, e)) return -1;

    if ((rc = get_string(root, "model", &s, e)) < 0) return -1;
    if (rc && !api_find_model(m, 1, json_string_value(s))) {
        char d[96];
        describe(s, d, sizeof d);
        return api_error_set(e, 404, API_ERR_INVALID, "model", "model_not_found",
                             "The model %s does not exist. This server serves '%s' (see GET /v1/models).", d,
                             m->id ? m->id : "");
    }
    return 0;
oom:
    return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
}

static void pending_free(api__pending *p) {
    if (!p) return;
    json_decref(p->root);
    json_decref(p->build_args);
    json_decref(p->built);
    json_decref(p->empty_suffix);
    free(p->srcs);
    free(p);
}

/* Tokens a prompt needs at least: exact for token ids, cm_tokenize_min_tokens for text; plus the BOS and
 * FIM tokens build_prompt adds. */
static long long prompt_min_tokens(const api_model *am, const api__pending *p, const prompt_src *src) {
    const cm_model_info *info = cm_model_get_info(am->model);
    long long n = 0;
    if (src->ids) n = (long long)json_array_size(src->ids);
    else if (src->text) n = (long long)cm_tokenize_min_tokens(am->model, json_string_length(src->text));
    if (p->suffix) {
        n += 3 + (long long)cm_tokenize_min_tokens(am->model, json_string_length(p->suffix));
        if (src->text && info->add_bos && info->bos >= 0) n++;
    } else if (src->text && info->add_bos && info->bos >= 0) {
        n++;
    }
    return n > 0 ? n : 1; /* an empty prompt becomes [BOS] */
}

/* The one rule of prompt + max_tokens against the context (OpenAI counts both). longest: the longest
 * prompt's tokens, exact, or (exact 0) a lower bound that already shows the request cannot fit.
 * Sets *max_tokens (resolved for "max_tokens": null). 0, or -1 with the 400 context_length_exceeded
 * (or max_tokens above the server's cap). */
static int check_context(const api_model *am, const api_limits *lim, const api__pending *p, long long longest,
                         int exact, long long *max_tokens, api_error *e) {
    int n_ctx = lim->n_ctx > 0 && lim->n_ctx < am->n_ctx ? lim->n_ctx : am->n_ctx;
    long long mt = p->max_tokens;
    if (p->max_tokens_null) {
        mt = (long long)n_ctx - longest;
        if (lim->max_tokens_cap > 0 && mt > lim->max_tokens_cap) mt = lim->max_tokens_cap;
    } else if (lim->max_tokens_cap > 0 && mt > lim->max_tokens_cap) {
        return api_error_set(e, 400, API_ERR_INVALID, p->max_tokens_key, NULL,
                             "%s is too large: %lld. This server generates at most %d tokens per completion.",
                             p->max_tokens_key, mt, lim->max_tokens_cap);
    }
    /* Editor plugins ask for more than a small local context holds (Continue: 4096): the completion
     * gets what is left and ends with "length" there, unless the server keeps OpenAI's rule. A prompt
     * that leaves no room for a wanted token is an error either way. */
    if (!lim->strict_context && longest < n_ctx && longest + mt > n_ctx) mt = (long long)n_ctx - longest;
    *max_tokens = mt;
    if (longest > n_ctx || mt < 0 || (p->max_tokens_null && mt < 1) || longest + mt > n_ctx) {
        long long want = longest + (mt > 0 ? mt : 0);
        const char *param = longest < n_ctx && p->explicit_max ? p->max_tokens_key : "prompt";
        if (!exact)
            return api_error_set(e, 400, API_ERR_INVALID, param, "context_length_exceeded",
                                 "This model's maximum context length is %d tokens, however you requested at least "
                                 "%lld tokens (at least %lld in your prompt; %lld for the completion). Please reduce "
                                 "your prompt; or completion length.",
                                 n_ctx, want, longest, mt > 0 ? mt : 0);
        return api_error_set(e, 400, API_ERR_INVALID, param, "context_length_exceeded",
                             "This model's maximum context length is %d tokens, however you requested %lld tokens "
                             "(%lld in your prompt; %lld for the completion). Please reduce your prompt; or completion length.",
                             n_ctx, want, longest, mt > 0 ? mt : 0);
    }
    return 0;
}

static int validate(const char *body, size_t len, const api_model *m, const api_limits *lim, api_shape shape,
                    api_completion_req *r, api_error *e) {
    memset(r, 0, sizeof *r);
    r->model = m;
    r->shape = shape;
    r->n = 1;
    r->logprobs = -1;
    cm_sampling_default(&r->sampling);
    r->sampling.temperature = 1.0f; /* OpenAI's default */
    r->sampling.top_p = 1.0f;
    r->sampling.top_k = 0;
    r->sampling.min_p = 0.0f;
    r->sampling.repetition_penalty = 1.0f;
    r->sampling.presence_penalty = 0.0f;
    r->sampling.frequency_penalty = 0.0f;
    /* OpenAI's presence/frequency penalties count every generated token, not a recent window. */
    r->sampling.penalty_last_n = 0;
    r->sampling.n_logprobs = 0;
    r->sampling.logit_bias = NULL;
    r->sampling.n_logit_bias = 0;

    if (len > lim->max_body_bytes)
        return api_error_set(e, 413, API_ERR_INVALID, NULL, "request_too_large",
                             "The request body is %zu bytes; this server accepts at most %zu.", len,
                             lim->max_body_bytes);
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL | JSON_DECODE_ANY, &je);
    if (!root) {
        if (json_error_code(&je) == json_error_numeric_overflow) return err_overflow(body, len, &je, e);
        return api_error_set(e, 400, API_ERR_INVALID, NULL, NULL,
                             "We could not parse the JSON body of your request: %s (line %d, column %d).",
                             je.text, je.line, je.column);
    }
    if (!json_is_object(root)) {
        char d[96];
        describe(root, d, sizeof d);
        api_error_set(e, 400, API_ERR_INVALID, NULL, NULL, "%s is not of type 'object'", d);
        json_decref(root);
        return -1;
    }

    if (m->defaults && apply_defaults(root, m->defaults)) {
        json_decref(root);
        return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    }
    const cm_model_info *info = cm_model_get_info(m->model);
    int n_src = 0;
    api__pending *p = calloc(1, sizeof *p);
    if (!p) { json_decref(root); return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); }
    r->pending = p;
    p->root = root;
    p->parse_special = 1;
    p->max_tokens = 16;
    p->max_tokens_key = "max_tokens";
    p->lim = *lim;
    p->prompt = json_object_get(root, "prompt");
    if (json_is_null(p->prompt)) p->prompt = NULL;
    json_t *segments = json_object_get(root, "segments");
    if (!p->prompt && shape == API_SHAPE_TEXT && segments && !json_is_null(segments)) {
        if (!json_is_object(segments)) { err_type(e, "segments", segments, "object"); goto fail; }
        r->tabby = 1;
        p->max_tokens = 64; /* Tabby's default completion length; its agent sends none */
    }
    if (shape == API_SHAPE_FIM_CHAT && p->prompt && !json_is_string(p->prompt)) {
        err_type(e, "prompt", p->prompt, "string");
        goto fail;
    }
    if (parse_fields(root, m, lim, r, p, e)) goto fail;
    const json_t *suffix = p->suffix;

    p->srcs = calloc((size_t)(lim->max_prompts > 0 ? lim->max_prompts : 1) + 1, sizeof *p->srcs);
    if (!p->srcs) { api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); goto fail; }
    if (classify_prompt(p->prompt, info->n_vocab, lim->max_prompts > 0 ? lim->max_prompts : 1, p->srcs,
                        &n_src, e))
        goto fail;
    r->prompts = calloc((size_t)n_src, sizeof *r->prompts);
    if (!r->prompts) { api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); goto fail; }
    r->n_prompts = n_src;
    if (r->routing == API_ROUTING_TOKENS && n_src * r->n != 1) {
        api_error_set(e, 400, API_ERR_INVALID, "routing", NULL,
                      "routing \"tokens\" records the tokens of one sequence: it needs a single prompt and n 1 "
                      "(this request has %d prompts and n %d).", n_src, r->n);
        goto fail;
    }

    /* what can be decided before tokenizing: a prompt that cannot fit whatever its tokens, and the
     * reference-segment rules on that lower bound */
    long long longest = 0, mt = 0;
    int exact = !suffix; /* token ids are counted exactly, text only bounded */
    for (int i = 0; i < n_src; i++) {
        long long k = prompt_min_tokens(m, p, &p->srcs[i]);
        if (k > longest) longest = k;
        if (p->srcs[i].text) exact = 0;
    }
    if (check_context(m, &p->lim, p, longest, exact, &mt, e)) goto fail;
    r->max_tokens = (int)mt;
    if (check_reference_segments(m, r, longest > INT_MAX ? INT_MAX : (int)longest, e)) goto fail;
    return 0;
fail:
    api_completion_req_free(r);
    return -1;
}

int api_completion_tokenize(api_completion_req *r, api_error *e) {
    api__pending *p = r->pending;
    const api_model *m = r->model;
    if (!p) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "the request was not validated");
    if (p->build) {
        /* the dialect's prompt replaces the placeholder it was validated with */
        const cm_model_info *info = cm_model_get_info(m->model);
        int n_src = 0;
        if (!(p->built = p->build(r, p->build_args, e))) goto fail;
        p->build = NULL;
        if (classify_prompt(p->built, info->n_vocab, 1, p->srcs, &n_src, e)) goto fail;
        if (n_src != r->n_prompts) {
            api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "a dialect built %d prompts for %d", n_src, r->n_prompts);
            goto fail;
        }
    }
    long long longest = 0;
    for (int i = 0; i < r->n_prompts; i++) {
        if (build_prompt(m, &p->srcs[i], p->suffix, p->parse_special, &r->prompts[i], e)) goto fail;
        if (api_seq_options(m->model, r->language, r->segment_routing, r->prompts[i].text, r->prompts[i].text_len,
                            &r->prompts[i].opts, e) < 0)
            goto fail;
        if (r->prompts[i].n_tokens > longest) longest = r->prompts[i].n_tokens;
    }
    long long mt = 0;
    if (check_context(m, &p->lim, p, longest, 1, &mt, e)) goto fail;
    r->max_tokens = (int)mt;
    if (check_reference_segments(m, r, (int)longest, e)) goto fail;
    pending_free(p);
    r->pending = NULL;
    return 0;
fail:
    api_completion_req_free(r);
    return -1;
}

void api__completion_defer_prompt(api_completion_req *r, api_prompt_builder build, json_t *args) {
    if (!r->pending) { json_decref(args); return; }
    json_decref(r->pending->build_args);
    r->pending->build = build;
    r->pending->build_args = args;
}

int api_completion_validate(const char *body, size_t len, const api_model *m, const api_limits *lim,
                            api_completion_req *r, api_error *e) {
    return validate(body, len, m, lim, API_SHAPE_TEXT, r, e);
}

int api_fim_completion_validate(const char *body, size_t len, const api_model *m, const api_limits *lim,
                                api_completion_req *r, api_error *e) {
    return validate(body, len, m, lim, API_SHAPE_FIM_CHAT, r, e);
}

int api_parse_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                         api_completion_req *r, api_error *e) {
    if (api_completion_validate(body, len, m, lim, r, e)) return -1;
    return api_completion_tokenize(r, e);
}

int api_parse_fim_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                             api_completion_req *r, api_error *e) {
    if (api_fim_completion_validate(body, len, m, lim, r, e)) return -1;
    return api_completion_tokenize(r, e);
}

void api_completion_req_free(api_completion_req *r) {
    if (!r) return;
    pending_free(r->pending);
    for (int i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].tokens);
        free(r->prompts[i].text);
    }
    free(r->prompts);
    api_stops_free(&r->stop);
    free(r->logit_bias);
    free(r->user);
    free(r->language);
    json_decref(r->dialect);
    const api_model *m = r->model;
    memset(r, 0, sizeof *r);
    r->model = m;
    r->logprobs = -1;
}

void api_completion_sampling(const api_completion_req *r, int choice, cm_sampling *out) {
    *out = r->sampling;
    out->seed = r->seed + (uint64_t)choice;
    out->logit_bias = r->logit_bias;
    out->n_logit_bias = r->n_logit_bias;
}

long api_prompt_chars(const api_completion_req *r, int prompt) {
    if (prompt < 0 || prompt >= r->n_prompts) return 0;
    const api_prompt *p = &r->prompts[prompt];
    long n = 0;
    for (size_t i = 0; i < p->text_len; i++) n += ((unsigned char)p->text[i] & 0xc0) != 0x80;
    return n;
}
