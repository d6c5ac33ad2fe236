/*
 * template.h - chat templates: the Jinja subset that models ship in their files
 * (`tokenizer.chat_template`), compiled once and rendered with a JSON context into the prompt text.
 * The reference is @huggingface/jinja (the implementation the JS ecosystem uses, with Hugging Face's
 * trim_blocks and lstrip_blocks both on): a template renders byte for byte as it does there, quirks
 * included (see docs/chat-templates.md for the list); tests/fixtures/template/ holds its outputs.
 *
 * Pure: no I/O, no clock (strftime_now() formats the time the caller passes in the options), no
 * globals; a compiled template is read-only, so any number of threads may render it at once.
 * Untrusted input: templates come from model files and the context from HTTP requests. Template size,
 * nesting, evaluation steps, memory and output are bounded; breaking a bound is an error, never a
 * crash or an unbounded allocation.
 */
#ifndef CM_API_TEMPLATE_H
#define CM_API_TEMPLATE_H

#include <stddef.h>
#include <jansson.h>

typedef struct api_template api_template;

/* What went wrong and where. line/col are 1-based (col in bytes) in the template source as given to
 * api_template_compile; 0/0 when the error has no place in the source (a limit, a bad context). */
typedef struct api_template_error {
    int line;
    int col;
    char message[256];
} api_template_error;

/* The caller's clock for strftime_now(): local time as the caller wants it shown. */
typedef struct api_template_time {
    int year, month, day;   /* month 1..12, day 1..31 */
    int hour, minute;
} api_template_time;

typedef struct api_template_opts {
    size_t max_output;   /* bytes of rendered text */
    size_t max_memory;   /* bytes one render may allocate for values and intermediate strings */
    long max_steps;      /* evaluation steps (expression nodes, statements, loop iterations, and one
                            step per 64 bytes copied or compared) */
    int max_depth;       /* nesting of evaluation: macro calls, nested blocks and expressions, and of
                            the context's JSON (at most 1024, the C stack's share) */
    const api_template_time *now;  /* NULL: strftime_now() is defined but calling it is an error */
} api_template_opts;

/* Defaults: 8 MiB output, 64 MiB memory, 10M steps, depth 256, no clock. Every bound must be > 0. */
void api_template_opts_default(api_template_opts *o);

/* Compiles src[0..len) (UTF-8; at most 1 MiB). Returns a template freed with api_template_free, or
 * NULL with *err filled (syntax errors carry their position; statements outside the supported subset,
 * such as {% call %} and {% filter %}, are errors too). err may be NULL. */
api_template *api_template_compile(const char *src, size_t len, api_template_error *err);
void api_template_free(api_template *t);

/* Renders t with the variables of `context` (a JSON object, borrowed: messages, tools,
 * add_generation_prompt, bos_token, eos_token, enable_thinking, any other keyword) and opts (NULL:
 * defaults). Returns the malloc'd, NUL-terminated text (the caller frees it; *out_len, if not NULL,
 * gets its length, which counts any NUL bytes the context's strings carried), or NULL with *err
 * filled: a runtime error of the template (raise_exception() included, its message kept), a broken
 * limit, or a context that is not an object or redefines a global (true, none, range, namespace...). */
char *api_template_render(const api_template *t, const json_t *context, const api_template_opts *opts,
                          size_t *out_len, api_template_error *err);

#endif
