/*
 * fuzz_api.c - libFuzzer driver for api/ (-Dfuzz=true, clang only), over the fake engine.
 * The first input byte picks the target:
 *   even: the rest is a request body of the dialect (byte >> 1) % 6 picks (0: /v1/completions, then
 *         chat, Ollama generate and chat, llama.cpp completion and infill); whatever parses must render
 *         in every shape of its dialect, and every error must render too.
 *   odd:  the rest is "stop1\0stop2\0...\0\0text": the text streamed byte by byte through
 *         api_stop_scan must never emit text that a later stop match cuts, and must emit everything
 *         up to the match (or all of it when no stop matches). ASCII text is also fed as byte tokens
 *         to an api_choice_state (max_tokens = its length): it must release exactly the same text.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "format.h"
#include "fake_engine.h"

static void fuzz_parse(const api_format *f, const uint8_t *data, size_t size) {
    static cm_model *m;
    static api_template *tpl;
    if (!m) {
        /* a chat template that reads every message field the dialects pass */
        fake_model_opts o = {.fim = 1, .bos = 1, .add_bos = 1, .eos = 1,
                             .chat_template = "{{ bos_token }}{% for m in messages %}<|fim_prefix|>{{ m.role }}:"
                                              "{{ m.content }}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
                                              "{% if add_generation_prompt %}<|fim_middle|>{% endif %}"};
        m = fake_model_create(&o, "fuzz");
        api_template_error te;
        tpl = api_chat_template_load(m, &te);
    }
    api_model am = {.model = m, .id = "fuzz", .n_ctx = 4096, .chat_template = tpl};
    api_limits lim;
    api_limits_default(&lim);
    api_completion_req r;
    api_error e;
    /* the dialect's validation step; a request dropped before tokenization (its client left) owns the
     * parsed body */
    int rc = f->parse((const char *)data, size, &am, &lim, &r, &e);
    if (rc == 0 && size % 3 == 1) {
        api_completion_req_free(&r);
        return;
    }
    if (rc == 0) rc = api_format_tokenize(&r, &e);
    if (rc == 0) {
        api_choice ch = {.index = 0, .text = (const char *)data, .text_len = size, .finish = API_FINISH_STOP};
        api_usage u = {0};
        api_meta meta = {.id = "cmpl-f", .created = 0};
        free(f->response(&r, &meta, &ch, 1, &u, NULL));
        free(f->chunk(&r, &meta, &ch, 1));
        free(f->stream_end(&r, &meta, &ch, 1, &u, NULL));
        api_completion_req_free(&r);
    } else {
        free(f->error(&e, 0));
        free(f->error(&e, 1));
    }
}

/* The choice state machine over the same stops and text, one byte token at a time (ASCII only: there
 * the detokenizer passes bytes through, so the text it releases must be exactly text[0..want)). */
static void fuzz_choice(const api_stops *st, const char *text, size_t len, size_t want) {
    static cm_model *m;
    if (!m) {
        fake_model_opts o = {.eos = 1};
        m = fake_model_create(&o, "fuzz");
    }
    if (len == 0 || len > 1 << 16) return;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)text[i] >= 0x80) return;
    api_choice_state c;
    if (api_choice_state_init(&c, m, st, (int)len, 1 << 20) < 0) return;
    size_t got = 0;
    int rc = 0;
    for (size_t i = 0; i < len && rc == 0; i++) {
        rc = api_choice_state_push(&c, (unsigned char)text[i], (int)i);
        size_t n;
        const char *p = api_choice_state_take(&c, &n);
        if (rc < 0 || got + n > want || memcmp(p, text + got, n) != 0) abort();
        got += n;
    }
    if (rc != 1 || got != want || c.len != want) abort();
    if (c.finish != (want < len ? API_FINISH_STOP : API_FINISH_LENGTH) || (c.stop_hit >= 0) != (want < len)) abort();
    api_choice_state_free(&c);
}

static void fuzz_stop(const uint8_t *data, size_t size) {
    api_stops st = {0};
    size_t i = 0;
    while (i < size && st.n < API_STOP_MAX) {
        const uint8_t *z = memchr(data + i, 0, size - i);
        size_t n = z ? (size_t)(z - (data + i)) : size - i;
        if (n == 0) { i++; break; } /* empty stop: end of the list */
        st.s[st.n] = (char *)(data + i);
        st.len[st.n++] = n;
        i += n + 1;
    }
    const char *text = (const char *)data + (i < size ? i : size);
    size_t len = size - (size_t)(text - (const char *)data);
    /* reference: generation stops at the first length n at which some stop is complete (the one whose
     * first occurrence ends first); the text is cut at the earliest start among the stops complete then */
    size_t end_min = (size_t)-1, first = len;
    size_t pos[API_STOP_MAX];
    for (int k = 0; k < st.n; k++) {
        const char *p = memmem(text, len, st.s[k], st.len[k]);
        pos[k] = p ? (size_t)(p - text) : (size_t)-1;
        if (p && pos[k] + st.len[k] < end_min) end_min = pos[k] + st.len[k];
    }
    for (int k = 0; k < st.n; k++)
        if (pos[k] != (size_t)-1 && pos[k] + st.len[k] <= end_min && pos[k] < first) first = pos[k];
    size_t emitted = 0, n;
    int hit = -1;
    for (n = 1; n <= len; n++) {
        size_t safe;
        hit = api_stop_scan(&st, text, n, emitted, &safe);
        if (safe < emitted || safe > n) abort();
        emitted = safe;
        if (hit >= 0) break;
    }
    if (hit >= 0) {
        if (emitted != first) abort();
    } else {
        if (first != len) abort();      /* a stop existed but was never reported */
        if (emitted > first) abort();
    }
    fuzz_choice(&st, text, len, hit >= 0 ? first : len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (data[0] & 1) fuzz_stop(data + 1, size - 1);
    else {
        static const api_format *const formats[] = {&api_format_completions, &api_format_chat,
                                                    &api_format_ollama_generate, &api_format_ollama_chat,
                                                    &api_format_llama_completion, &api_format_llama_infill};
        fuzz_parse(formats[(data[0] >> 1) % 6], data + 1, size - 1);
    }
    return 0;
}
