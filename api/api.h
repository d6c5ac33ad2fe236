/*
 * api.h - the OpenAI-compatible HTTP API as pure translation: request JSON -> validated engine request
 * (or an OpenAI-shaped error naming the parameter), a choice's sampled tokens -> its text and finish
 * reason (api_choice_state), engine results -> response JSON and SSE chunks. The other dialects (chat
 * completions, Ollama, llama.cpp) are api_formats over the same request (format.h).
 * No I/O, no clocks, no randomness: the server supplies ids, timestamps and seeds.
 *
 * Ownership: every `char *` returned here is malloc'd and freed by the caller with free(). Functions
 * that take a json_t * borrow it (they take their own reference when they keep it).
 *
 * Decisions (documented in openapi.yaml too):
 * - Unknown request fields are ignored (SDKs and editor plugins send extras); the first one is
 *   reported in api_completion_req.unknown_field for logging. Fields known to be sent by clients and
 *   ignored on purpose are type-checked but have no effect: "cache_prompt" (llama.cpp; the prefix
 *   cache is always on). A known field with a value this server cannot honour is a 400 naming it
 *   (e.g. best_of != n, min_tokens > 0); none is silently dropped.
 * - Special tokens in a prompt string: without `suffix`, strings like "<|fim_prefix|>" ARE recognised
 *   as control tokens, because editor plugins that do their own FIM templating send them inline
 *   (llama.cpp does the same). Extension "parse_special": false treats them as text. With `suffix`,
 *   prompt and suffix are user code and always tokenized as plain text; the FIM tokens are inserted
 *   by id: [BOS if add_bos] <fim_prefix> prompt <fim_suffix> suffix <fim_middle> (api_fim_tokens, which
 *   `codemoe complete --suffix` uses too).
 * - Token-array prompts are used exactly as given (no BOS added); every id is checked against the vocab.
 * - A request without a prompt in any form ("prompt", or Tabby's "segments") is a 400 naming
 *   "prompt" (OpenAI's reference marks it required). A prompt that tokenizes to nothing ("") becomes
 *   [BOS] (or [EOS] if the model has no BOS), like OpenAI's "<|endoftext|>": generation as from the
 *   start of a document.
 * - "model": see api_find_model (absent or null: the served model).
 * - "max_tokens" defaults to 16 (OpenAI; 64 for a Tabby request, Tabby's own default); llama.cpp's
 *   "n_predict" and OpenAI's newer "max_completion_tokens" stand for it when it is absent (two of
 *   them given: 400; n_predict -1 is null); null means
 *   "until the context is full" (capped by max_tokens_cap when set). A max_tokens beyond what the
 *   context leaves after the prompt is clamped to it (the choice then ends with finish_reason
 *   "length"), unless api_limits.strict_context asks for OpenAI's 400 context_length_exceeded. A
 *   prompt that alone fills the context is a 400 either way.
 * - Tabby's request ({language, segments: {prefix, suffix, filepath, ...}}, no "prompt") is a FIM
 *   request: prefix and suffix as "prompt" and "suffix" (a model without FIM tokens completes the
 *   prefix when the suffix is empty); its "language" picks the MoLE adapter when the model has one by
 *   that name and is otherwise left to detection (Tabby sends its editor's language ids). The other
 *   segments (filepath, git_url, declarations, relevant snippets, clipboard) are context this server
 *   does not use.
 * - Numbers: every numeric field is checked against what its conversion holds, at parse time. A float
 *   parameter (sampling, logit_bias values) nonzero but below FLT_MIN in magnitude (1e-300: it would
 *   become 0 or a subnormal) is a 400; -0 is 0. An integer field given as an integral real outside
 *   64 bits is a range error. A number jansson cannot hold at all (1e400, 99999999999999999999999)
 *   is a 400 whose param and message name the top-level field it appears in.
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
    int status;         /* HTTP status: 400, 401, 404, 405, 413, 414, 431, 429, 500, 503 */
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
    int n_batch;            /* tokens per forward pass the server runs (--batch): a reference-mode
                               segment_routing prompt must fit one; 0: no such bound */
    const char *const *aliases; /* (n_aliases) more names clients may send (--alias); borrowed */
    int n_aliases;
    int strict_name;        /* only the model's names select it (--strict-model); see api_find_model */
    const api_template *chat_template; /* compiled once at load (api_chat_template_load); NULL: chat
                                          requests are refused with chat_template_error */
    const char *chat_template_error;   /* why there is no template ("" or NULL: the model has none) */
    const json_t *defaults; /* the model's default request fields (api_defaults_check'd), borrowed; NULL:
                               none. See api_defaults_check */
} api_model;

typedef struct api_limits {
    size_t max_body_bytes;  /* larger bodies: 413 */
    int max_tokens_cap;     /* 0: no cap beyond the context */
    int n_max;              /* max "n" (and "best_of") */
    int logprobs_max;       /* max "logprobs" (OpenAI's legacy API: 5; at most CM_LOGPROBS_MAX) */
    int max_stop;           /* max stop strings (OpenAI: 4; editor plugins send a dozen or more) */
    int max_prompts;        /* max prompts in one request (array prompt forms) */
    int max_logit_bias;     /* max logit_bias entries */
    int strict_context;     /* 1: prompt + max_tokens beyond the context is a 400 (OpenAI); 0: max_tokens
                               is clamped to what the context leaves (--strict-context) */
    int n_ctx;              /* 0: the model's context (api_model.n_ctx); else a smaller one a request asks
                               for (Ollama's num_ctx), which its prompt + completion must fit; a larger
                               one has no effect */
} api_limits;

/* A model's default sampling (the server's per-model settings): a JSON object of completion-body fields,
 * among temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed,
 * max_tokens (null: until the context is full) and stop, with the values and ranges a request may send.
 * A request of any dialect takes the model's default for each of these it does not send itself (under
 * any of its names: n_predict and max_completion_tokens for max_tokens, random_seed for seed; a field
 * sent as null counts as not sent, but max_tokens null): the defaults enter where api_completion_validate
 * reads the body, so they win over a dialect's own defaults (llama.cpp's temperature 0.8, Tabby's 64
 * tokens, chat's whole context) and lose to the request's fields. /v1/models shows them as "defaults".
 * api_defaults_check: 0 when d (NULL: none) is such an object with stop counted against lim; else -1 with
 * e naming the field (400). api_model_has_default: whether m has a default for that field (key as
 * above); a dialect asks it before it writes a default of its own (api_format_default). */
int api_defaults_check(const json_t *d, const api_limits *lim, api_error *e);
int api_model_has_default(const api_model *m, const char *key);

/* 4 MiB body, no max_tokens cap, n <= 8, logprobs <= 5, 32 stops, 16 prompts, 1024 bias entries,
 * max_tokens clamped to the context. */
void api_limits_default(api_limits *l);

/* ============================================================ completion request */

#define API_STOP_MAX 64          /* hard bound on api_limits.max_stop */
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
    cm_seq_options opts;   /* engine options for this prompt's sequences (cm_seq_set_options): segment
                              mode from segment_routing; MoLE language from "language", else the
                              text's Markdown fences (-1, the engine's fence tracker decides), else
                              cm_lang_detect's guess (cm_lang_for_request) */
} api_prompt;

/* "routing": none, summary, full (+ per-window segment detail), tokens (full + per-token detail; one
 * sequence only: a single prompt and n 1, else 400 param "routing") */
typedef enum { API_ROUTING_NONE = 0, API_ROUTING_SUMMARY, API_ROUTING_FULL, API_ROUTING_TOKENS } api_routing_mode;
typedef enum { API_SEGMENT_CAUSAL = 0, API_SEGMENT_REFERENCE } api_segment_routing;
/* Which request form a body was read as: POST /v1/completions (with Tabby's form), or the Mistral /
 * DeepSeek FIM route (POST /v1/fim/completions, whose own rules api_fim_completion_validate applies and
 * whose responses api_format_fim renders in the chat-completion shape those clients read). */
typedef enum { API_SHAPE_TEXT = 0, API_SHAPE_FIM_CHAT } api_shape;

typedef struct api__pending api__pending;

typedef struct api_completion_req {
    const api_model *model;
    api_prompt *prompts;   /* (n_prompts) built by api_completion_tokenize (zeroed before) */
    int n_prompts;
    int n;                 /* choices per prompt; total choices = n_prompts * n */
    int max_tokens;        /* resolved (final after api_completion_tokenize): explicit value, 16, or
                              (null) the context left by the longest prompt, capped by max_tokens_cap */
    int stream;
    int include_usage;     /* stream_options.include_usage */
    int logprobs;          /* -1: none (JSON null); else top alternatives per token (0..logprobs_max) */
    int echo;
    int has_suffix;        /* FIM request: prompts are FIM sequences */
    api_shape shape;       /* the request form (its route) */
    int tabby;             /* the prompt came from Tabby's "segments" */
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
    int n_indent;                        /* llama.cpp's n_indent (0: off): a choice ends (finish "length")
                                            at a line after its first whose first non-blank byte sits
                                            at a column below it; see api_choice_state_set_indent */
    int t_max_predict_ms;                /* llama.cpp's t_max_predict_ms (0: off): once a choice has been
                                            generating this long (from the request's first token), it
                                            ends (finish "length") at its next token with a newline; the
                                            server's clock decides (api_choice_state_time_up) */
    int prefill;                         /* max_tokens 0: still compute the prompt, so that its KV enters
                                            the prefix cache (llama.cpp's n_predict 0 cache warm-up) */
    json_t *dialect;                     /* what a dialect's renderer needs from its request (llama.cpp's
                                            response_fields, truncated), set by its parser; owned, or NULL */
    api__pending *pending;               /* private: the parsed body between api_completion_validate and
                                            api_completion_tokenize; NULL once the prompts are built */
} api_completion_req;

/* A POST /v1/completions body becomes a request in two steps, so that a server can keep the second,
 * whose cost grows with the prompts, off its event loop:
 *
 * api_completion_validate: parses the body of len bytes (need not be NUL-terminated) and checks every
 * rule that needs no tokens, against the model and limits: JSON, field types and ranges, counts, token
 * ids, "language" a MoLE model has no adapter for (400, param "language"), and whether a prompt can fit
 * the context at all (cm_tokenize_min_tokens: 400 context_length_exceeded when even the fewest tokens
 * its text could give do not fit). Its cost is the JSON parse and a walk over token-id arrays. On
 * success returns 0; out->n_prompts is known (so api_completion_n_choices works) but the prompts are
 * not built yet: out keeps the parsed body privately until api_completion_tokenize. On failure returns
 * -1, err describes it (status 400/404/413, 500 out of memory) and out holds nothing to free (freeing it
 * anyway is safe).
 *
 * api_completion_tokenize: builds every prompt (a dialect's deferred prompt first: a rendered chat
 * template, /infill's repository context, format.h; then tokenization, FIM layout, echo text) and resolves its
 * engine options, then the rules that need token counts: the context (400 context_length_exceeded) and
 * segment_routing "reference" on a hybrid model with max_tokens > 0 or a prompt longer than m->n_batch
 * (400, param "segment_routing"). No I/O and no shared state but the immutable model: it may run on any
 * thread, as long as nothing else touches out meanwhile. On success returns 0 and out owns its
 * allocations (free with api_completion_req_free). On failure returns -1, err describes it (400, or 500
 * if the tokenizer failed) and out holds nothing to free.
 *
 * api_parse_completion: both in one call, for callers without an event loop to protect (the CLI, tests). */
int api_completion_validate(const char *body, size_t len, const api_model *m, const api_limits *lim,
                            api_completion_req *out, api_error *err);
int api_completion_tokenize(api_completion_req *out, api_error *err);
int api_parse_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                         api_completion_req *out, api_error *err);
void api_completion_req_free(api_completion_req *r);

/* POST /v1/fim/completions (Mistral's and DeepSeek's FIM request, which Continue's fimStream posts):
 * "prompt" (a string, required) is the code before the cursor, "suffix" (default "") the code after
 * it; the other fields and every rule are those of /v1/completions, except that "echo" and "logprobs"
 * are not offered (400), "random_seed" (Mistral) stands for "seed" and "min_tokens" may only be 0. The
 * request is rendered by api_format_fim (format.h). api_fim_completion_validate is api_completion_validate for this
 * body (api_completion_tokenize then builds its prompts); api_parse_fim_completion is both in one call.
 * Return values and ownership as theirs. */
int api_fim_completion_validate(const char *body, size_t len, const api_model *m, const api_limits *lim,
                                api_completion_req *out, api_error *err);
int api_parse_fim_completion(const char *body, size_t len, const api_model *m, const api_limits *lim,
                             api_completion_req *out, api_error *err);

/* The engine options a prompt runs with: one rule for the server and `codemoe complete`. Segment mode:
 * CM_SEGMENT_CAUSAL, or CM_SEGMENT_REFERENCE when asked (never the model's own default, so a request
 * means the same on every model). For a model with MoLE adapters, the language: `language` when given
 * (an adapter name or alias; one the model has no adapter for is a 400 naming "language"), else the
 * text's Markdown fences decide per token, else cm_lang_detect's guess (cm_lang_for_request). Models
 * without adapters ignore `language`. text may be NULL (only `language` is checked then). Returns 0, or
 * -1 with e set and *out unspecified. */
int api_seq_options(const cm_model *m, const char *language, api_segment_routing seg, const char *text,
                    size_t len, cm_seq_options *out, api_error *e);

/* The fill-in-the-middle prompt, one rule for the API's "suffix" and `codemoe complete --suffix`:
 * [BOS if add_bos] <fim_prefix> prefix <fim_suffix> suffix <fim_middle>, prefix and suffix tokenized as
 * plain text (user code: a control-token string in it is text, never a token), the FIM tokens inserted by
 * id. On success returns 0 and *tokens (malloc'd, caller frees) holds *n_tokens ids. On failure returns
 * -1 with e set (400 param "suffix": the model has no FIM tokens; 500: the tokenizer failed or out of
 * memory) and *tokens NULL. */
int api_fim_tokens(const cm_model *m, const char *prefix, size_t prefix_len, const char *suffix,
                   size_t suffix_len, int32_t **tokens, int *n_tokens, api_error *e);

/* Repository-level fill in the middle (llama.cpp's /infill): the FIM prompt of api_fim_tokens preceded by
 * other files of the project, in the model's own repository format where it has one:
 *   [BOS if add_bos] [<repo_name> "project\n"] {<file_sep> name "\n" text}... [<file_sep> "file\n"]
 *   <fim_prefix> prefix middle <fim_suffix> suffix <fim_middle>
 * (without a file separator each file is the text "--- name ---\n" text "\n"; without a repo-name
 * token there is no header). Every text is tokenized as plain text. The result fits `budget` tokens:
 * the prefix keeps its end (up to 3/4 of the room), the suffix its start, and the files, newest (last)
 * first, only whole; *truncated says whether anything was cut. Same return contract as api_fim_tokens
 * (400 "context_length_exceeded" when middle alone does not fit). */
typedef struct api_fim_file {
    const char *name;    /* (name_len) file name as the client gave it */
    size_t name_len;
    const char *text;    /* (text_len) */
    size_t text_len;
} api_fim_file;
typedef struct api_fim_context {
    const char *prefix, *middle, *suffix;  /* middle: the text typed after prefix, before the cursor */
    size_t prefix_len, middle_len, suffix_len;
    const api_fim_file *files;             /* (n_files) borrowed, oldest first */
    int n_files;
} api_fim_context;
int api_fim_context_tokens(const cm_model *m, const api_fim_context *c, int budget, int32_t **tokens,
                           int *n_tokens, int *truncated, api_error *e);

/* Total choices (n_prompts * n); choice i belongs to prompt i / n. */
static inline int api_completion_n_choices(const api_completion_req *r) { return r->n_prompts * r->n; }

static inline int api__choices_per_prompt(const api_completion_req *r) { return r->n > 0 ? r->n : 1; }
/* The prompt that choice i (0 <= i < api_completion_n_choices) belongs to: i / n, OpenAI's order.
 * Never past the last prompt, so the result always indexes r->prompts of a parsed request. */
static inline int api_completion_prompt_of(const api_completion_req *r, int choice) {
    int p = choice / api__choices_per_prompt(r);
    return p < r->n_prompts ? p : r->n_prompts - 1;
}
/* The first choice of choice i's prompt (prompt * n): the one a server prefills the prompt for, which
 * the prompt's other choices may continue from. */
static inline int api_completion_first_choice(const api_completion_req *r, int choice) {
    return api_completion_prompt_of(r, choice) * api__choices_per_prompt(r);
}

/* The sampler settings for choice i: r->sampling with seed = r->seed + i and logit_bias pointing into
 * r (valid while r lives; cm_sampler_create copies it). */
void api_completion_sampling(const api_completion_req *r, int choice, cm_sampling *out);

/* Number of characters (UTF-8 code points) of a prompt's text: the text_offset of the first completion
 * token when echo is off. */
long api_prompt_chars(const api_completion_req *r, int prompt);

/* ============================================================ stop strings */

/* The rules of a request's "stop" (and of `codemoe complete --stop`). `shown` is the offending value
 * as the error message should quote it (the caller's rendering, e.g. "'abc'").
 * api_stops_check_count: whether n stop strings are allowed (at most lim->max_stop, never more than
 * API_STOP_MAX). api_stops_add: appends a copy of s[0..len) (1..API_STOP_MAX_BYTES bytes; NULs
 * allowed) to st. Both return 0, or -1 with err set (400, param "stop"; api_stops_add: 500 when out
 * of memory) and st unchanged. api_stops_free releases the copies and empties st. */
int api_stops_check_count(size_t n, const api_limits *lim, const char *shown, api_error *err);
int api_stops_add(api_stops *st, const char *s, size_t len, const char *shown, api_error *err);
void api_stops_free(api_stops *st);

/* Looks for stop strings in text[0..len), the choice's completion text so far (excluding echo), of
 * which text[0..emitted) has already been sent. Returns the index of the stop string that matches
 * earliest (generation must end; *safe = the match position: send text[emitted..*safe), drop the rest),
 * or -1 with *safe = how far text may be sent now: everything except a tail that could still become a
 * stop string, and never ending inside an incomplete UTF-8 sequence. *safe >= emitted always.
 * When generation ends for another reason, the caller sends the whole remaining text. */
int api_stop_scan(const api_stops *st, const char *text, size_t len, size_t emitted, size_t *safe);

/* ============================================================ tokenizer endpoints (llama.cpp's) */

/* POST /tokenize: {content, add_special (default false: no BOS), parse_special (default true: control
 * token strings are tokens), with_pieces (default false)} -> {"tokens":[id, ...]}, or with_pieces
 * {"tokens":[{"id":..,"piece":..}, ...]} where a piece is the token's text, or its bytes as an array of
 * numbers when they are not valid UTF-8 on their own. POST /detokenize: {tokens:[id, ...]} ->
 * {"content": text} (control tokens shown as their text; bytes of an unfinished character as U+FFFD).
 * Both return the response (malloc'd), or NULL with e set: 400 naming the field, 413 (a body over
 * lim->max_body_bytes), 500 (the tokenizer failed, out of memory). No shared state but the immutable
 * model: they may run on any thread (the server runs them on libuv's pool). */
char *api_tokenize(const char *body, size_t len, const api_model *m, const api_limits *lim, api_error *e);
char *api_detokenize(const char *body, size_t len, const api_model *m, const api_limits *lim, api_error *e);

/* ============================================================ one choice, token by token */

/* Why a choice ended: finish_reason null, "stop", "length". */
typedef enum { API_FINISH_NONE = 0, API_FINISH_STOP, API_FINISH_LENGTH } api_finish;

/*
 * The state of one choice while its tokens are sampled: the only place that turns sampled ids into
 * the text a client may see and decides when the choice ends. For each token, in this order:
 *   1. end-of-generation (cm_token_is_eog) ends the choice, finish "stop"; the token is not counted
 *      and adds no text;
 *   2. otherwise it counts (n_gen) and its text is detokenized; bytes of a character split across
 *      tokens wait for the rest;
 *   3. stop strings (api_stop_scan): a match ends the choice, finish "stop", and cuts the text at the
 *      match (what the detokenizer still holds came after it and is dropped); a tail that could still
 *      grow into a stop string is held back;
 *   4. n_indent (when set): a line after the first whose first byte other than ' ' and '\t' (a
 *      newline included: an empty line) sits at a column below n_indent ends the choice, finish
 *      "length", the text cut before that byte (llama.cpp's rule; whether a line passes is decided
 *      by the token that brings that byte, so nothing after the cut was released);
 *   5. after api_choice_state_time_up: a token whose text holds a newline ends it, finish "length",
 *      that token's text kept (llama.cpp's t_max_predict_ms);
 *   6. n_gen >= max_tokens, or a sequence that the token would fill (seq_len + 1 >= n_ctx), ends it,
 *      finish "length".
 * A choice that ends for any reason but a stop string releases all its text: the held-back tail and
 * an incomplete character (as U+FFFD). Text once released is final.
 *
 * Use: init once (allocates), push every sampled token until push returns 1, take the released text
 * after each push; end a choice that stops for an outside reason (cancelled, nothing to generate,
 * failed); reset to start another choice with the same buffer. After init nothing allocates unless a
 * choice's text outgrows every earlier one (the buffer doubles), so per-token work is allocation-free.
 */
typedef struct api_choice_state {
    /* read-only for the caller */
    char *text;             /* (len) the completion text so far; not NUL-terminated, may hold NULs */
    size_t len;
    size_t emitted;         /* text[0..emitted) is released: final, may be sent */
    size_t taken;           /* text[0..taken) was handed out by api_choice_state_take */
    int n_gen;              /* tokens generated (end-of-generation not counted) */
    int ended;
    api_finish finish;      /* why it ended; API_FINISH_NONE while running or when ended from outside */
    int stop_hit;           /* index of the stop string that ended it, -1 if none */
    /* private */
    const cm_model *model;
    const api_stops *stop;
    int max_tokens, n_ctx;
    int n_indent;           /* 0: off (api_choice_state_set_indent) */
    int line_open;          /* n_indent: text[line..) is a line whose indentation is not decided yet */
    size_t line;            /* n_indent: where the scan for the next line (or the open line) starts */
    int time_up;            /* api_choice_state_time_up was called */
    size_t cap;             /* allocated bytes of text: before each token >= len + piece_max */
    size_t piece_max;       /* cm_detok_max_bytes: the most one token (and the final flush) adds */
    cm_detok dt;
} api_choice_state;

/* Binds c to model m (borrowed), allocates its text buffer and starts a choice as reset does.
 * Returns 0, or -1 when out of memory (then c owns nothing; ending and freeing it are still safe). */
int api_choice_state_init(api_choice_state *c, const cm_model *m, const api_stops *stop, int max_tokens,
                          int n_ctx);
/* Starts a new choice in c, keeping its buffer. stop (borrowed, must outlive the choice; NULL: none);
 * max_tokens: tokens the choice may generate; n_ctx: positions its sequence may hold (prompt
 * included). */
void api_choice_state_reset(api_choice_state *c, const api_stops *stop, int max_tokens, int n_ctx);
/* Releases the buffer; c is zeroed (a zeroed state is safe to free again). */
void api_choice_state_free(api_choice_state *c);
/* The choice's indentation limit (rule 4; a request's n_indent, 0: off). Set after init or reset, before
 * the first push. */
void api_choice_state_set_indent(api_choice_state *c, int n_indent);
/* The caller's clock says the choice's time is up (rule 5): it ends at its next token with a newline.
 * reset clears it. */
void api_choice_state_time_up(api_choice_state *c);

/* Feeds the token sampled for the choice. seq_len: positions already in the choice's sequence, this
 * token not included. Returns 0 when the choice goes on (the caller feeds tok to the model next), 1
 * when it has ended (finish and stop_hit say why; every byte of text that will ever be released is),
 * -1 when tok is outside the vocabulary or the buffer could not grow (nothing changed; the caller
 * ends the choice). On an ended choice returns 1 and changes nothing. */
int api_choice_state_push(api_choice_state *c, int32_t tok, int seq_len);
/* Ends the choice for a reason outside its text (finish may be API_FINISH_NONE: cancelled, failed),
 * releasing all its text. Does nothing to an ended choice. */
void api_choice_state_end(api_choice_state *c, api_finish finish);
/* The text released since the last call: text[taken..emitted), its length in *len (0: nothing new);
 * marks it taken. The pointer is valid until the next push, end, reset or free. */
const char *api_choice_state_take(api_choice_state *c, size_t *len);

/* ============================================================ responses */

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
    int stop_word;              /* finish STOP: 1 + the index in r->stop of the stop string that ended
                                   the choice (api_choice_state.stop_hit + 1); 0: end-of-generation */
    const api_token_lp *lp;     /* (n_lp) tokens covered by this text; ignored when r->logprobs < 0 */
    int n_lp;
    long text_offset;           /* character offset of lp[0] in prompt + completion text: 0 with echo,
                                   api_prompt_chars() without; chunks: running offset */
} api_choice;

typedef struct api_usage {
    int prompt_tokens, completion_tokens, cached_tokens;
    int64_t prompt_ns;     /* arrival to the first token (queue + prefill); 0: unknown */
    int64_t gen_ns;        /* first token to the end; 0: unknown */
} api_usage;

/* Identity of one response (the same for all chunks of a stream). */
typedef struct api_meta {
    const char *id;                  /* "cmpl-..." (see api_make_id) */
    int64_t created;                 /* unix seconds */
    const char *system_fingerprint;  /* NULL: omitted */
} api_meta;

/* A JSON string from bytes that should be UTF-8 (model output, names from model files): invalid bytes
 * become U+FFFD instead of failing the response. New reference; NULL only when out of memory. */
json_t *api_json_text(const char *s, size_t n);
/* A token as logprobs (and the routing detail) show it: its text, or "bytes:\xNN..." when its bytes are not
 * valid UTF-8 on their own (part of a character). New reference; NULL when out of memory. */
json_t *api_token_json(const cm_model *m, int32_t id);

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

/* ============================================================ routing statistics */

/* A sum of the engine's cm_routing reports of one model: a request's sequences (the "routing" record)
 * or the server's lifetime (expert load metrics). Counts only; the shape comes from the first report.
 * Zero-initialise it ({0}); release with api_route_agg_free. */
typedef struct api_route_agg {
    int has;                       /* a report was added (a dense model never adds one) */
    int n_layer, n_tok, n_seg, n_windows, n_adapters, shared, window;
    cm_route_count *tok;           /* (n_layer, n_tok) */
    cm_route_count *seg;           /* (n_layer, n_seg) */
    cm_route_count *adapter;       /* (n_adapters) */
    uint32_t *seg_windows;         /* (n_layer, n_seg, n_windows) */
    cm_route_tokens *tokens;       /* a copy of one sequence's per-token detail (one allocation), or NULL */
} api_route_agg;

/* Adds a report (NULL, as dense models give, adds nothing). -1 on allocation failure or a report of
 * another shape (then nothing is added). */
int api_route_agg_add(api_route_agg *a, const cm_routing *r);
/* dst (freed first) becomes a copy of src's counts (not its per-token detail). -1 on allocation failure
 * (dst is then empty). */
int api_route_agg_copy(api_route_agg *dst, const api_route_agg *src);
/* Keeps a copy of a sequence's per-token detail (cm_seq_routing_tokens; NULL adds nothing). The record
 * holds one sequence's: -1 when a copy is there already, or on allocation failure (nothing changes). */
int api_route_agg_add_tokens(api_route_agg *a, const cm_route_tokens *t);
void api_route_agg_free(api_route_agg *a);

/* What identifies a completion's routing record. Strings are borrowed. */
typedef struct api_routing_info {
    const char *id;               /* the completion id ("cmpl-...") */
    int64_t created;              /* unix seconds */
    const char *model;            /* the served model's id */
    int prompt_tokens, completion_tokens;
    int full;                     /* "routing": "full" or "tokens": per-window segment detail */
    int tokens;                   /* "routing": "tokens": the per-token detail */
} api_routing_info;

/* The record GET /v1/completions/{id}/routing serves and the "routing" response extension carries:
 * {id, object:"completion.routing", created, model, prompt_tokens, completion_tokens,
 *  layers:[{layer, token:[{expert, prompt_tokens, generated_tokens, prompt_mean_gate,
 *  generated_mean_gate}], segment:[...same...], segment_windows:[[tokens per window] per segment expert]
 *  (full only; trailing empty windows dropped)}], n_layer, token_experts, shared_expert,
 *  segment_experts, window, adapters:[{adapter, name, ...counts}] (MoLE), and with info->tokens and a
 *  detail: tokens:[{position, id, text, generated, experts:[[ids] per layer], gates, segment_experts,
 *  segment_gates (hybrid), adapters:[ids] (MoLE)}], tokens_dropped}. A dense model (an empty
 * aggregate) has only "layers": [] beside the identity. m names the adapters (may be NULL). New
 * reference; NULL on allocation failure. */
json_t *api_routing_json(const api_route_agg *a, const cm_model *m, const api_routing_info *info);

/* ============================================================ models */

/* GET /v1/models: {"object":"list","data":[model, ...]}. */
char *api_render_models(const api_model *models, int n);
/* GET /v1/models/{id}: {id, object:"model", created, owned_by:"codemoe", [aliases], architecture,
 * context_length, n_vocab, n_params, weight_type, fim, [moe]}; moe (mixture-of-experts models only,
 * from cm_model_moe_info): hybrid {kind:"hybrid", experts, top_k, shared_expert (null: none),
 * segment_experts, window, segment_routing_default:"causal"|"reference", segment_route:"prefix"|"previous"},
 * MoLE {kind:"mole",
 * adapters:[names by id], languages:[the adapters a request's "language" selects: all but the shared
 * and fallback ones]}; [defaults] (the model's default request fields, api_defaults_check). */
char *api_render_model(const api_model *m);
/* Whether name is one of m's names: its id, an alias, or the model file's general.name. */
int api_model_named(const api_model *m, const char *name);
/* The model a request's "model" value selects: the one named so (api_model_named); otherwise, while a
 * single model is served and it is not strict_name, that model, whatever the name (editor plugins send
 * "" and SDKs their own defaults such as "gpt-3.5-turbo-instruct"). NULL: no such model (404
 * model_not_found). */
const api_model *api_find_model(const api_model *models, int n, const char *name);
/* The "model" a request body names, for a server that picks one of several models before it parses the
 * body against that model: 1 with a copy in name (NUL-terminated) when the body is a JSON object whose
 * "model" is a string shorter than cap; -1 when that string is longer (no model has such a name); 0
 * otherwise (absent, null, not a string, not JSON: the parse reports what is wrong). */
int api_request_model(const char *body, size_t len, char *name, size_t cap);

#endif /* CM_API_H */
