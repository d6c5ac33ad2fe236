/*
 * fuzz_template.c - libFuzzer driver for the chat-template interpreter (api/template.c; -Dfuzz=true,
 * clang only). Input: "template\0context": the bytes before the first NUL are the template, the rest a
 * JSON context (anything that is not a JSON object renders with a small default conversation).
 * Whatever compiles must render or fail with a message, within small bounds, and never crash.
 * Seeds: tests/api/fuzz_corpus_template/.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *z = memchr(data, 0, size);
    size_t tlen = z ? (size_t)(z - data) : size;
    api_template_error e;
    api_template *t = api_template_compile((const char *)data, tlen, &e);
    if (!t) {
        if (!e.message[0]) abort();
        return 0;
    }
    json_t *ctx = NULL;
    if (z) ctx = json_loadb((const char *)z + 1, size - tlen - 1, 0, NULL);
    if (!json_is_object(ctx)) {
        json_decref(ctx);
        ctx = json_loads("{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, "
                         "{\"role\": \"user\", \"content\": \" hi \"}, {\"role\": \"assistant\", "
                         "\"content\": \"<think>r</think>a\", \"tool_calls\": [{\"function\": "
                         "{\"name\": \"f\", \"arguments\": {\"x\": 1}}}]}], \"tools\": [{\"type\": \"function\"}], "
                         "\"add_generation_prompt\": true, \"bos_token\": \"<s>\"}", 0, NULL);
    }
    api_template_opts o;
    api_template_opts_default(&o);
    o.max_steps = 200000, o.max_output = 1 << 20, o.max_memory = 16 << 20, o.max_depth = 64;
    api_template_time now = {2024, 9, 5, 14, 7};
    o.now = &now;
    size_t n;
    char *out = api_template_render(t, ctx, &o, &n, &e);
    if (!out && !e.message[0]) abort();
    if (out && n > o.max_output) abort();
    free(out);
    json_decref(ctx);
    api_template_free(t);
    return 0;
}
