/*
 * format.h - the HTTP dialects one job pipeline answers: OpenAI completions and chat completions,
 * Ollama's /api/generate and /api/chat, llama.cpp's /completion and /infill. Each dialect reads its
 * request body into the one engine request (api_completion_req) and renders the pipeline's results in
 * its own shapes and framing, so the server's HTTP layer stays generic: it picks a format by route,
 * calls parse, and hands every streamed delta, the stream's end and the non-streamed result to the
 * format's renderers.
 *
 * Framing: API_FRAMING_SSE streams server-sent events ("data: {json}\n\n", OpenAI's and llama.cpp's
 * streams); API_FRAMING_NDJSON streams one JSON object per line (Ollama's streams). A renderer returns
 * the framed bytes, ready to send: malloc'd, NUL-terminated, freed by the caller; "" (still malloc'd)
 * when it has nothing to send; NULL only when out of memory.
 */
#ifndef CM_API_FORMAT_H
#define CM_API_FORMAT_H

#include "api.h"

typedef enum { API_FRAMING_SSE = 0, API_FRAMING_NDJSON } api_framing;

typedef struct api_format {
    const char *name;          /* the route's label in logs and metrics, e.g. "completions", "chat" */
    api_framing framing;       /* of a streamed response */
    /* The request body -> the engine request, validated but not tokenized yet: the contract of
     * api_completion_validate (0, or -1 with err set and nothing in out to free); the caller then runs
     * api_completion_tokenize (off its event loop) and names the parameters of its errors with
     * api_format_name_params. */
    int (*parse)(const char *body, size_t len, const api_model *m, const api_limits *lim,
                 api_completion_req *out, api_error *err);
    /* One choice's new text (and its tokens' logprobs) while streaming; delta->finish is set on the
     * choice's last delta. first: the choice's first delta of the stream. */
    char *(*chunk)(const api_completion_req *r, const api_meta *meta, const api_choice *delta, int first);
    /* After every choice of a stream ended: what the stream ends with (a usage chunk when asked for,
     * "data: [DONE]", a final "done" object). choices: (n) the choices' final state, text empty.
     * routing (extension) is borrowed; NULL omits it. */
    char *(*stream_end)(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                        const api_usage *usage, json_t *routing);
    /* The non-streamed response body (JSON). choices: (n) with their whole text. */
    char *(*response)(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                      const api_usage *usage, json_t *routing);
    /* An error: as the response body (streamed 0) or as the stream's last event (streamed 1, the status
     * already sent). */
    char *(*error)(const api_error *e, int streamed);
} api_format;

/* POST /v1/completions: OpenAI's text_completion (api_render_completion and friends). */
extern const api_format api_format_completions;
/* POST /v1/chat/completions: OpenAI's chat.completion (api_parse_chat). */
extern const api_format api_format_chat;
/* POST /v1/fim/completions (Mistral's and DeepSeek's FIM route, Continue's fimStream): a FIM request
 * (api_fim_completion_validate) answered in the chat.completion shapes those clients read
 * (choices[].message.content, streamed as choices[].delta.content). */
extern const api_format api_format_fim;

/* The Content-Type of a streamed response in this framing. */
const char *api_format_stream_type(const api_format *f);

/* ------------------------------------------------------------ what the dialects share */

/* A dialect parser's first step: empties out (bound to m, holding nothing to free) and reads the body
 * as a JSON object: 413 past lim->max_body_bytes, 400 when it is not a JSON object. New reference, or
 * NULL with e set. */
json_t *api_format_load_body(const char *body, size_t len, const api_model *m, const api_limits *lim,
                             api_completion_req *out, api_error *e);
/* Validates c, a dialect's request translated into a /v1/completions body, with
 * api_completion_validate's rules (the client's body was measured already, so the translation's size is
 * not limited; max_stop > 0 raises the stop-string limit for clients that send more than OpenAI's 4, up
 * to API_STOP_MAX). dialect (taken, may be NULL) becomes out->dialect: what the dialect's renderers read,
 * and under "params" how its parameters are named ({"max_tokens": "n_predict", ...}), which names the
 * parameter of a validation error here. The contract of api_completion_validate. */
int api_format_parse_translated(const json_t *c, json_t *dialect, const api_model *m, const api_limits *lim,
                                int max_stop, api_completion_req *out, api_error *e);
/* A dialect's own default for field key of its translated body c, where the dialect's differs from the
 * completion's (llama.cpp's temperature 0.8, chat's whole-context max_tokens): c[key] = v (taken) unless
 * m has a default for key, which then applies as for every dialect (api_defaults_check). */
void api_format_default(json_t *c, const api_model *m, const char *key, json_t *v);
/* The part of a dialect's parse whose cost grows with the input (rendering a chat template over the
 * messages, /infill's repository context), deferred so that it runs with the tokenization, off the
 * event loop: builds the request's prompt from args (what the dialect's parse kept of the body). r is
 * the validated request; the builder may add to r->dialect what its renderers read. Returns the prompt
 * as a /v1/completions "prompt" value (one string, or one array of token ids; new reference), or NULL
 * with e set (named as the client's field). Runs on any thread, like api_completion_tokenize. */
typedef json_t *(*api_prompt_builder)(api_completion_req *r, const json_t *args, api_error *e);
/* Leaves out's prompt to build: after a successful api_format_parse_translated of a body whose "prompt"
 * is a placeholder (""), api_completion_tokenize (api_format_tokenize) first calls build(out, args) and
 * tokenizes its prompt instead, with the body's other rules (the context, max_tokens null) applied to
 * it. args is taken (freed with out). */
void api__completion_defer_prompt(api_completion_req *out, api_prompt_builder build, json_t *args);
/* Renames e->param by dialect's "params" map (dialect: a request's api_completion_req.dialect, may be
 * NULL), so that an error names the parameter the client sent. */
void api_format_name_params(const json_t *dialect, api_error *e);
/* A parsed request's second step: api_completion_tokenize (same contract, any thread), its error named
 * in the request's dialect. */
int api_format_tokenize(api_completion_req *r, api_error *e);
/* Both steps in one call (f->parse, then api_format_tokenize), for callers without an event loop to
 * protect (tests). The contract of api_parse_completion. */
int api_format_parse_all(const api_format *f, const char *body, size_t len, const api_model *m,
                         const api_limits *lim, api_completion_req *out, api_error *e);
/* o (taken) as compact JSON: the body (API_FRAMING_SSE with event 0, or no framing), an SSE event
 * "data: ...\n\n" (SSE, event 1) or an NDJSON line "...\n" (NDJSON, event 1). NULL when o is NULL or
 * out of memory. */
char *api_format_dump(json_t *o, api_framing framing, int event);

/* ============================================================ chat */

/* The model's chat template, compiled once when the model is loaded (api_model.chat_template).
 * Returns NULL when the model has none (err->message "") or when it does not compile (err says why;
 * chat requests are then refused with that reason). */
api_template *api_chat_template_load(const cm_model *m, api_template_error *err);

/* Parses a POST /v1/chat/completions body: the messages are rendered through the model's chat template
 * (messages, add_generation_prompt true, bos_token, eos_token, tools when given) and the text is
 * tokenized with its special tokens recognised (the template writes them as text); the sampling
 * fields, stop, n, seed, user, logprobs/top_logprobs, max_tokens/max_completion_tokens (default: the
 * rest of the context) and the routing extensions follow /v1/completions' rules. A model without a
 * template is a 400 with code "model_not_chat_capable". The api_format parse contract (validation: the
 * messages' shapes; the template is rendered and the prompt tokenized by api_format_tokenize). */
int api_parse_chat(const char *body, size_t len, const api_model *m, const api_limits *lim,
                   api_completion_req *out, api_error *err);

/* The messages -> prompt text step of api_parse_chat on its own (ollama's /api/chat uses it too):
 * messages is the request's array (borrowed), tools its "tools" (NULL: none). On success returns the
 * malloc'd text (*len its length) with a BOS the tokenizer adds anyway removed; on failure NULL with e
 * set (400 naming "messages", or "model_not_chat_capable"). */
char *api_chat_prompt(const api_model *m, const json_t *messages, const json_t *tools, size_t *len,
                      api_error *e);
/* api_chat_prompt's cheap checks alone, for a parse on the event loop: the model has a usable template,
 * messages is a non-empty array of {role: string, content: string | text parts | null}. 0, or -1 with e
 * set as api_chat_prompt sets it. */
int api_chat_check(const api_model *m, const json_t *messages, api_error *e);
/* The deferred form (api_prompt_builder): args {"messages": [...], "tools": [...] (optional)}, made by
 * api_chat_defer_args (messages and tools borrowed, referenced; NULL when out of memory). The prompt is
 * api_chat_prompt's text. */
json_t *api_chat_build_prompt(api_completion_req *r, const json_t *args, api_error *e);
json_t *api_chat_defer_args(const json_t *messages, const json_t *tools);

/* OpenAI chat shapes (render.c): the chat.completion object, a chat.completion.chunk event with
 * delta {role (first), content} and finish_reason, and the include_usage chunk. */
char *api_render_chat(const api_completion_req *r, const api_meta *meta, const api_choice *choices, int n,
                      const api_usage *usage, json_t *routing);
char *api_render_chat_chunk(const api_completion_req *r, const api_meta *meta, const api_choice *delta,
                            int first);
char *api_render_chat_usage_chunk(const api_completion_req *r, const api_meta *meta, const api_usage *usage,
                                  json_t *routing);

/* ============================================================ Ollama (ollama.c) */

/* POST /api/generate and POST /api/chat: NDJSON streams (stream defaults to true) of
 * {model, created_at, response | message:{role, content}, done:false}, ended by
 * {..., done:true, done_reason, [context:[]], total_duration, load_duration, prompt_eval_count,
 * prompt_eval_duration, eval_count, eval_duration} (durations in ns); not streamed: the final object with
 * the whole text. Errors: {"error": "message"}. */
extern const api_format api_format_ollama_generate;
extern const api_format api_format_ollama_chat;
/* {"error": "message"}, Ollama's error body. NULL only when out of memory. */
char *api_ollama_error_json(const api_error *e);
/* GET /api/tags (running 0) and GET /api/ps (running 1: with expires_at, size_vram, context_length):
 * {models:[{name, model, modified_at, size, digest, details:{format, family, families,
 * parameter_size, quantization_level}}]}. */
char *api_render_ollama_tags(const api_model *models, int n, int running);
/* The model a POST /api/show body names ("model", or the older "name"): 0 with *out set, or -1 with e
 * set (400 no name, 404 unknown). */
int api_ollama_show_model(const char *body, size_t len, const api_model *models, int n, const api_model **out,
                          api_error *e);
/* POST /api/show: {license, modelfile, parameters, template (the chat template source, or
 * "{{ .Prompt }}"), details, model_info, capabilities ["completion", "insert" (FIM), "chat"],
 * modified_at}. */
char *api_render_ollama_show(const api_model *m);
/* GET /api/version: {"version": the Ollama release whose API this follows}. */
char *api_render_ollama_version(void);

/* ============================================================ llama.cpp (llamacpp.c) */

/* POST /completion (prompt string or token ids) and POST /infill (input_prefix, input_suffix,
 * input_extra, prompt: api_fim_context_tokens): llama.cpp server's shapes, {content, stop,
 * tokens_predicted, tokens_evaluated, tokens_cached, truncated, stop_type ("eos" | "word" | "limit",
 * from the choice's finish and api_choice.stop_word), stopping_word, generation_settings,
 * timings{prompt_n, prompt_ms, prompt_per_token_ms, prompt_per_second, predicted_n, predicted_ms,
 * predicted_per_token_ms, predicted_per_second, cache_n}}, projected onto response_fields when the
 * request names them; streams are SSE {content, stop:false}... then the final object. n_indent and
 * t_max_predict_ms go to api_completion_req (the server's scheduler applies them); /infill's repository
 * context is built by api_format_tokenize (a deferred prompt). */
extern const api_format api_format_llama_completion;
extern const api_format api_format_llama_infill;

/* ============================================================ Tabby (tabby.c) */

/* Tabby's completion telemetry, POST /v1/events. */
typedef enum { API_TABBY_VIEW = 0, API_TABBY_SELECT, API_TABBY_DISMISS, API_TABBY_EVENT_KINDS } api_tabby_event_kind;
/* "view", "select", "dismiss" ("" for anything else). */
const char *api_tabby_event_name(api_tabby_event_kind k);
/* Reads an event body ({type, completion_id, choice_index, view_id?, elapsed?}; select_kind: the query
 * parameter, NULL when absent, else "line"). 0 with *kind set, or -1 with e set (413 past
 * lim->max_body_bytes, 400 naming the field). Nothing is kept: the server counts the kinds. */
int api_tabby_event(const char *body, size_t len, const api_limits *lim, const char *select_kind,
                    api_tabby_event_kind *kind, api_error *e);

#endif /* CM_API_FORMAT_H */
