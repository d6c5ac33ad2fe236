/*
 * api.h - the OpenAI-compatible HTTP API as pure translation: request JSON -> validated engine request
 * (or an OpenAI-shaped error naming the parameter), engine results -> response JSON and SSE chunks.
 * No I/O, no clocks, no randomness: the server supplies ids, timestamps and seeds.
 *
 * Ownership: every `char *` returned here is malloc'd and freed by the caller with free(). Functions
 * that take a json_t * borrow it (they take their own reference when they keep it).
 *
 * Decisions (documented in openapi.yaml too):
 * - Unknown request fields are ignored (SDKs and editor plugins send extras such as llama.cpp's
 *   "cache_prompt"); the first one is reported in api_completion_req.unknown_field for logging.
 * - Special tokens in a prompt string: without `suffix`, strings like "<|fim_prefix|>" ARE recognised
 *   as control tokens, because editor plugins that do their own FIM templating send them inline
 *   (llama.cpp does the same). Extension "parse_special": false treats them as text. With `suffix`,
 *   prompt and suffix are user code and always tokenized as plain text; the FIM tokens are inserted
 *   by id: [BOS if add_bos] <fim_prefix> prompt <fim_suffix> suffix <fim_middle>.
 * - Token-array prompts are used exactly as given (no BOS added); every id is checked against the vocab.
 * - A missing "prompt" or one that tokenizes to nothing becomes [BOS] (or [EOS] if the model has no
 *   BOS), like OpenAI's "<|endoftext|>" default: generation as from the start of a document.
 * - A missing "model" means the loaded model; a wrong one is 404 code "model_not_found".
 * - "max_tokens" defaults to 16 (OpenAI); null means "until the context is full" (capped by
 *   max_tokens_cap when set).
 * - Choice i (i = prompt_index * n + j, OpenAI's order) samples with seed + i, so n > 1 choices differ
 *   yet a request with a seed is reproducible. Without "seed" the server draws one (seed_set == 0).
 */
#ifndef CM_API_H
#define CM_API_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "codemoe.h"
#include "template.h"  /* chat templates (Jinja subset) */

/* ============================================================ errors */

#define API_ERR_INVALID "invalid_request_error"
#define API_ERR_AUTH "authentication_error"
#define API_ERR_NOT_FOUND "not_found_error"
#define API_ERR_RATE_LIMIT "rate_limit_error"
#define API_ERR_SERVER "server_error"

typedef struct api_error {
    int status;         /* HTTP status: 400, 401, 404, 405, 413, 429, 500, 503 */
    const char *type;   /* one of API_ERR_* (static string) */
    const char *code;   /* static string or NULL (JSON null), e.g. "model_not_found",
                           "context_length_exceeded", "invalid_api_key" */
    char param[64];     /* offending request field, "" = JSON null */
    char message[512];
} api_error;

/* Fills e. param and code may be NULL. Returns -1 so that `return api_error_set(...)` reads well. */
int api_error_set(api_error *e, int status, const char *type, const char *param, const char *code,
                  const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
/* A generic error for a status the server produces itself (401, 404 route, 405, 413, 429, 500, 503)
 * with OpenAI's type and a default message; detail (may be NULL) replaces the message. */
void api_error_http(api_error *e, int status, const char *detail);
/* {"error":{"message":..,"type":..,"param":..|null,"code":..|null}}. NULL only on out-of-memory. */
char *api_error_json(const api_error *e);

/* ============================================================ served model and limits */

/* One model as the server exposes it. The strings are borrowed and must outlive every request. */
typedef struct api_model {
    const cm_model *model;  /* tokenizer, vocabulary, FIM ids */
    const char *id;         /* the "model" value clients send and /v1/models lists */
    int64_t created;        /* unix time for /v1/models (e.g. file mtime) */
    int n_ctx;              /* tokens per sequence the server runs with (prompt + completion) */
    json_t *meta;           /* extra fields merged into the /v1/models entry (MoE experts, adapters,
                               languages when the engine reports them); may be NULL; borrowed */
} api_model;

typedef struct api_limits {
    size_t max_body_bytes;  /* larger bodies: 413 */
    int max_tokens_cap;     /* 0: no cap beyond the context */
    int n_max;              /* max "n" (and "best_of") */
    int logprobs_max;       /* max "logprobs" (OpenAI's legacy API: 5; engine supports up to 20) */
    int max_stop;           /* max stop strings (OpenAI: 4) */
    int max_prompts;        /* max prompts in one request (array prompt forms) */
    int max_logit_bias;     /* max logit_bias entries */
} api_limits;

/* 4 MiB body, no max_tokens cap, n <= 8, logprobs <= 5, 4 stops, 16 prompts, 1024 bias entries. */
void api_limits_default(api_limits *l);

/* ============================================================ completion request */

#define API_STOP_MAX 16          /* hard bound on api_limits.max_stop */
#define API_STOP_MAX_BYTES 512   /* longest accepted stop string */

typedef struct api_stops {
    int n;
    char *s[API_STOP_MAX];       /* owned, NUL-terminated (may contain NULs: use len) */
    size_t len[API_STOP_MAX];    /* > 0 */
} api_stops;

typedef struct api_prompt {
    int32_t *tokens;       /* (n_tokens) model input, BOS / FIM tokens included; owned */
    int n_tokens;
    int echo_from;         /* index of the first token the user wrote (1 after an added BOS): the
                              tokens whose logprobs echo reports */
    char *text;            /* the prompt as the client gave it (ids: decoded), for echo; owned */
    size_t text_len;
} api_prompt;

typedef enum { API_ROUTING_NONE = 0, API_ROUTING_SUMMARY, API_ROUTING_FULL } api_routing_mode;
typedef enum { API_SEGMENT_CAUSAL = 0, API_SEGMENT_REFERENCE } api_segment_routing;

typedef struct api_completion_req {
    const api_model *model;
    api_prompt *prompts;   /* (n_prompts) */
    int n_prompts;
    int n;                 /* choices per prompt; total choices = n_prompts * n */
    int max_tokens;        /* resolved: explicit value, 16, or (null) the context left by the longest
                              prompt, capped by max_tokens_cap */
    int stream;
    int include_usage;     /* stream_options.include_usage */
    int logprobs;          /* -1: none (JSON null); else top alternatives per token (0..logprobs_max) */
    int echo;
    int has_suffix;        /* FIM request: prompts are FIM sequences */
    api_stops stop;
    cm_sampling sampling;  /* everything except seed and logit_bias pointers: see api_completion_sampling */
    cm_logit_bias *logit_bias; /* (n_logit_bias) owned */
    int n_logit_bias;
    uint64_t seed;
    int seed_set;          /* 0: no "seed" given; the server sets seed itself before sampling */
    char *user;            /* owned or NULL */
    char *language;        /* extension (MoLE language hint); owned or NULL */
    api_segment_routing segment_routing; /* extension */
    api_routing_mode routing;            /* extension: routing stats in the response */
    char unknown_field[64];              /* first ignored field, "" if none (for a log line) */
} api_completion_req;

/* Parses and validates a POST /v1/completions body of len bytes (need not be NUL-terminated) against
 * the model and limits, tokenizing every prompt. On success returns 0 and out owns its allocations
 * (free with api_completion_req_free). On failure returns -1, err describes it (status 400/404/413, or
 * 500 if the tokenizer failed) and out holds nothing to free (freeing it anyway is safe). */
int api_parse_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                         api_completion_req *out, api_error *err);
void api_completion_req_free(api_completion_req *r);

/* Total choices (n_prompts * n); choice i belongs to prompt i / n. */
static inline int api_completion_n_choices(const api_completion_req *r) { return r->n_prompts * r->n; }

/* The sampler settings for choice i: r->sampling with seed = r->seed + i and logit_bias pointing into
 * r (valid while r lives; cm_sampler_create copies it). */
void api_completion_sampling(const api_completion_req *r, int choice, cm_sampling *out);

/* Number of characters (UTF-8 code points) of a prompt's text: the text_offset of the first completion
 * token when echo is off. */
long api_prompt_chars(const api_completion_req *r, int prompt);

/* ============================================================ stop strings */

/* Looks for stop strings in text[0..len), the choice's completion text so far (excluding echo), of
 * which text[0..emitted) has already been sent. Returns the index of the stop string that matches
 * earliest (generation must end; *safe = the match position: send text[emitted..*safe), drop the rest),
 * or -1 with *safe = how far text may be sent now: everything except a tail that could still become a
 * stop string, and never ending inside an incomplete UTF-8 sequence. *safe >= emitted always.
 * When generation ends for another reason, the caller sends the whole remaining text. */
int api_stop_scan(const api_stops *st, const char *text, size_t len, size_t emitted, size_t *safe);

/* ============================================================ responses */

typedef enum { API_FINISH_NONE = 0, API_FINISH_STOP, API_FINISH_LENGTH } api_finish;

/* One token's log-probability entry, as the sampler reports it. */
typedef struct api_token_lp {
    int32_t token;
    float logprob;                 /* NAN: JSON null (the first echoed prompt token) */
    const cm_token_logprob *top;   /* (n_top) alternatives, most likely first; may be NULL */
    int n_top;
} api_token_lp;

/* A choice (full response) or a choice's delta (stream chunk). */
typedef struct api_choice {
    int index;                  /* choice index (prompt_index * n + j) */
    const char *text;           /* full: echo text + completion; chunk: the new text */
    size_t text_len;
    api_finish finish;          /* NONE renders null (chunks before the last) */
    const api_token_lp *lp;     /* (n_lp) tokens covered by this text; ignored when r->logprobs < 0 */
    int n_lp;
    long text_offset;           /* character offset of lp[0] in prompt + completion text: 0 with echo,
                                   api_prompt_chars() without; chunks: running offset */
} api_choice;

typedef struct api_usage {
    int prompt_tokens, completion_tokens, cached_tokens;
} api_usage;

/* Identity of one response (the same for all chunks of a stream). */
typedef struct api_meta {
    const char *id;                  /* "cmpl-..." (see api_make_id) */
    int64_t created;                 /* unix seconds */
    const char *system_fingerprint;  /* NULL: omitted */
} api_meta;

/* Writes "cmpl-" + 24 characters derived from rnd into buf (>= 32 bytes). */
void api_make_id(char *buf, size_t cap, uint64_t rnd);

/* The non-streamed response: {id, object:"text_completion", created, model, [system_fingerprint],
 * choices:[{text, index, logprobs:{tokens, token_logprobs, top_logprobs, text_offset}|null,
 * finish_reason}], usage:{prompt_tokens, completion_tokens, total_tokens,
 * prompt_tokens_details:{cached_tokens}}, [routing]}. routing (extension) is borrowed; NULL omits it.
 * Returns NULL only on out-of-memory. */
char *api_render_completion(const api_completion_req *r, const api_meta *meta, const api_choice *choices,
                            int n_choices, const api_usage *usage, json_t *routing);

/* One SSE event for one choice's delta: "data: {id, object:"text_completion", created, model,
 * choices:[{text, index, logprobs, finish_reason}] [, usage:null when include_usage]}\n\n". */
char *api_render_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *delta);
/* The final usage event sent when stream_options.include_usage: choices [] and usage (and routing, an
 * extension, when given). */
char *api_render_usage_chunk(const api_completion_req *r, const api_meta *meta, const api_usage *usage,
                             json_t *routing);

/* ============================================================ SSE framing */

#define API_SSE_DONE "data: [DONE]\n\n"
/* "data: <json>\n\n" (json must be one line, as jansson's compact dump is). */
char *api_sse_data(const char *json);
/* "data: {"error":{...}}\n\n": a failure after the stream has started (HTTP status already sent). */
char *api_sse_error(const api_error *e);

/* ============================================================ models */

/* GET /v1/models: {"object":"list","data":[model, ...]}. */
char *api_render_models(const api_model *models, int n);
/* GET /v1/models/{id}: {id, object:"model", created, owned_by:"codemoe", architecture,
 * context_length, n_vocab, n_params, weight_type, fim, ...meta}. */
char *api_render_model(const api_model *m);
/* The model whose id (or general.name) equals name, or NULL. */
const api_model *api_find_model(const api_model *models, int n, const char *name);

#endif /* CM_API_H */
