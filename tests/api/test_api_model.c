/*
 * test_api_model.c - api/ against the real engine and the fixture models: prompts tokenize exactly as
 * cm_tokenize does (BOS, special tokens, FIM built from the model's own FIM ids), token prompts echo
 * their decoded text, logprobs render real token bytes, and a seeded generation run through
 * api_choice_state + api_render_chunk yields, concatenated, exactly the non-streamed text cut at the
 * stop string (the server's streaming loop in miniature, on the engine's real detokenizer); every
 * numeric field at extreme values is either a 400 naming it or parameters the real sampler accepts; and
 * the repository-level FIM prompt in the model's own format and its trimming to a budget.
 */
#include <math.h>

#include "../test.h"
#include "api.h"

static cm_model *load(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "models/%s.gguf", name);
    cm_model_params mp = {.n_threads = 1};
    cm_err err = {0};
    cm_model *m = cm_model_load(test_fixture(path), &mp, &err);
    if (!m) fprintf(stderr, "load %s: %s\n", path, err.msg);
    return m;
}

static int tokenize(const cm_model *m, const char *text, int flags, int32_t *out, int cap) {
    return cm_tokenize(m, text, strlen(text), flags, out, cap, NULL);
}

TEST(prompts_match_engine_tokenizer) {
    cm_model *m = load("qwen2-gqa");
    ASSERT_TRUE(m);
    const cm_model_info *info = cm_model_get_info(m);
    api_model am = {.model = m, .id = "qwen2-gqa", .n_ctx = 256};
    api_limits lim;
    api_limits_default(&lim);
    api_completion_req r;
    api_error e;
    int32_t want[128];

    /* plain text with an inline control token: recognised by default */
    const char *body = "{\"prompt\":\"def f(x):<|endoftext|>\"}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    int n = tokenize(m, "def f(x):<|endoftext|>", CM_TOK_ADD_BOS | CM_TOK_PARSE_SPECIAL, want, 128);
    ASSERT_TRUE(n > 1);
    ASSERT_EQ_INT(r.prompts[0].n_tokens, n);
    ASSERT_TRUE(memcmp(r.prompts[0].tokens, want, (size_t)n * 4) == 0);
    ASSERT_TRUE(info->eos >= 0);
    ASSERT_EQ_INT(r.prompts[0].tokens[n - 1], info->eos);
    api_completion_req_free(&r);

    /* parse_special false: the same text is bytes, no EOS inside */
    body = "{\"prompt\":\"def f(x):<|endoftext|>\",\"parse_special\":false}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    for (int i = 0; i < r.prompts[0].n_tokens; i++) ASSERT_TRUE(r.prompts[0].tokens[i] != info->eos);
    api_completion_req_free(&r);

    /* FIM from the model's ids; prompt and suffix as plain text */
    ASSERT_TRUE(info->fim_pre >= 0 && info->fim_suf >= 0 && info->fim_mid >= 0);
    body = "{\"prompt\":\"def f(x):\\n    return \",\"suffix\":\"\\nprint(f(1))<|endoftext|>\"}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    int np = tokenize(m, "def f(x):\n    return ", 0, want, 128);
    int k = 0;
    const int32_t *t = r.prompts[0].tokens;
    if (info->add_bos && info->bos >= 0) ASSERT_EQ_INT(t[k++], info->bos);
    ASSERT_EQ_INT(t[k++], info->fim_pre);
    ASSERT_TRUE(memcmp(t + k, want, (size_t)np * 4) == 0);
    k += np;
    ASSERT_EQ_INT(t[k++], info->fim_suf);
    int ns = tokenize(m, "\nprint(f(1))<|endoftext|>", 0, want, 128);
    ASSERT_TRUE(memcmp(t + k, want, (size_t)ns * 4) == 0);
    k += ns;
    ASSERT_EQ_INT(t[k++], info->fim_mid);
    ASSERT_EQ_INT(r.prompts[0].n_tokens, k);
    api_completion_req_free(&r);

    /* token prompt: echo text is the decoded ids */
    n = tokenize(m, "hello world", 0, want, 128);
    char buf[512];
    int off = snprintf(buf, sizeof buf, "{\"prompt\":[");
    for (int i = 0; i < n; i++) off += snprintf(buf + off, sizeof buf - (size_t)off, "%s%d", i ? "," : "", want[i]);
    snprintf(buf + off, sizeof buf - (size_t)off, "],\"echo\":true}");
    ASSERT_EQ_INT(api_parse_completion(buf, strlen(buf), &am, &lim, &r, &e), 0);
    ASSERT_STREQ(r.prompts[0].text, "hello world");
    api_completion_req_free(&r);

    /* ids past the vocabulary */
    snprintf(buf, sizeof buf, "{\"prompt\":[1,%d]}", info->n_vocab);
    ASSERT_EQ_INT(api_parse_completion(buf, strlen(buf), &am, &lim, &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    cm_model_free(m);
}

/* Generation of a request (its sampling settings, choice 0) through api_choice_state, as the server runs
 * it. stream != 0: the client text is the concatenation of rendered chunks of each released piece (parsed
 * back from the SSE JSON); else the choice's whole text at the end. Returns its length (out holds it). */
static int generate(const cm_model *m, const api_completion_req *r, int stream, char *out, size_t cap,
                    api_finish *finish) {
    cm_err err = {0};
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = 256, .n_batch_max = 256};
    cm_ctx *c = cm_ctx_create(m, &cp, &err);
    if (!c) { fprintf(stderr, "ctx: %s\n", err.msg); return -1; }
    int seq = cm_seq_open(c, &err);
    cm_sampling sp;
    api_completion_sampling(r, 0, &sp);
    cm_sampler *s = cm_sampler_create(m, &sp, &err);
    const api_prompt *p = &r->prompts[0];
    int32_t seqs[256];
    for (int i = 0; i < p->n_tokens; i++) seqs[i] = seq;
    cm_batch b = {.n = p->n_tokens, .token = p->tokens, .seq = seqs};
    if (!s || cm_forward(c, &b, &err)) { fprintf(stderr, "forward: %s\n", err.msg); return -1; }
    const float *logits = cm_logits(c, p->n_tokens - 1);

    api_choice_state ch;
    if (api_choice_state_init(&ch, m, &r->stop, r->max_tokens, cp.n_ctx) < 0) return -1;
    api_meta meta = {.id = "cmpl-t", .created = 1};
    size_t got = 0;
    for (int rc = 0; rc == 0;) {
        float lp;
        cm_token_logprob top[20];
        int32_t tok = cm_sampler_sample(s, logits, &lp, top);
        rc = api_choice_state_push(&ch, tok, cm_seq_len(c, seq));
        if (rc < 0) return -1;
        size_t n;
        const char *piece = api_choice_state_take(&ch, &n);
        if (stream && n > 0) {
            api_choice chunk = {.index = 0, .text = piece, .text_len = n};
            char *ev = api_render_chunk(r, &meta, &chunk);
            json_t *j = json_loads(ev + 6, 0, NULL);
            const char *t = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
            size_t tl = strlen(t);
            if (got + tl < cap) { memcpy(out + got, t, tl); got += tl; }
            json_decref(j);
            free(ev);
        }
        if (rc) break;
        cm_batch nb = {.n = 1, .token = &tok, .seq = &seq};
        if (cm_forward(c, &nb, &err)) return -1;
        logits = cm_logits(c, 0);
    }
    if (!stream) {
        got = ch.len < cap ? ch.len : cap - 1;
        memcpy(out, ch.text, got);
    }
    out[got] = '\0';
    *finish = ch.finish;
    api_choice_state_free(&ch);
    cm_sampler_free(s);
    cm_ctx_free(c);
    return (int)got;
}

TEST(streamed_equals_full_with_stops) {
    cm_model *m = load("qwen2-gqa");
    ASSERT_TRUE(m);
    api_model am = {.model = m, .id = "q", .n_ctx = 256};
    api_limits lim;
    api_limits_default(&lim);
    api_completion_req r;
    api_error e;
    const char *body = "{\"prompt\":\"def fibonacci(n):\\n    if n\",\"max_tokens\":24,\"temperature\":1,\"seed\":5}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    char full[4096], streamed[4096];
    api_finish f1, f2;
    int n = generate(m, &r, 0, full, sizeof full, &f1);
    ASSERT_TRUE(n > 4);
    ASSERT_EQ_INT(generate(m, &r, 1, streamed, sizeof streamed, &f2), n);
    ASSERT_STREQ(streamed, full);
    api_completion_req_free(&r);

    /* every 2- and 3-byte window of the output as a stop string: the streamed text is the full text
     * cut at the first match, whichever tokens the stop spans */
    int tried = 0;
    for (int w = 2; w <= 3; w++) {
        for (int at = 0; at + w <= n; at++) {
            char stop[8];
            memcpy(stop, full + at, (size_t)w);
            stop[w] = '\0';
            json_t *req = json_pack("{s:s, s:i, s:i, s:i, s:[s]}", "prompt", "def fibonacci(n):\n    if n", "max_tokens",
                                    24, "temperature", 1, "seed", 5, "stop", stop);
            if (!req) continue; /* the window cut a UTF-8 character: not a valid JSON string */
            char *b = json_dumps(req, JSON_COMPACT);
            json_decref(req);
            ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), 0);
            free(b);
            int k = generate(m, &r, 1, streamed, sizeof streamed, &f2);
            tried++;
            size_t cut = (size_t)(strstr(full, stop) - full);
            CHECK_TRUE(k == (int)cut && memcmp(streamed, full, cut) == 0);
            CHECK_TRUE(f2 == API_FINISH_STOP);
            api_completion_req_free(&r);
        }
    }
    fprintf(stderr, "  %d stop strings over %d bytes of seeded output \"%s\"\n", tried, n, full);
    CHECK_TRUE(tried >= 10);
    cm_model_free(m);
}

TEST(render_real_token_bytes) {
    cm_model *m = load("qwen2-gqa");
    ASSERT_TRUE(m);
    api_model am = {.model = m, .id = "q", .n_ctx = 256};
    api_limits lim;
    api_limits_default(&lim);
    api_completion_req r;
    api_error e;
    const char *body = "{\"prompt\":\"x\",\"logprobs\":1}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    /* every token renders as a JSON string: valid UTF-8 text or "bytes:\xNN" */
    int nv = cm_model_get_info(m)->n_vocab;
    api_token_lp *lp = calloc((size_t)nv, sizeof *lp);
    for (int i = 0; i < nv; i++) lp[i] = (api_token_lp){.token = i, .logprob = -1.0f};
    api_choice ch = {.index = 0, .text = "", .text_len = 0, .lp = lp, .n_lp = nv};
    api_usage u = {0};
    api_meta meta = {.id = "cmpl-b", .created = 0};
    char *s = api_render_completion(&r, &meta, &ch, 1, &u, NULL);
    json_t *j = json_loads(s, JSON_ALLOW_NUL, NULL); /* token 0 is the byte 0x00: "\u0000" is valid JSON */
    free(s);
    free(lp);
    ASSERT_TRUE(j);
    json_t *tokens = json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs"), "tokens");
    ASSERT_EQ_INT(json_array_size(tokens), nv);
    int n_bytes = 0;
    for (int i = 0; i < nv; i++) n_bytes += strncmp(json_string_value(json_array_get(tokens, i)), "bytes:", 6) == 0;
    ASSERT_TRUE(n_bytes >= 64); /* the byte tokens 0x80..0xff alone are not UTF-8 */
    json_decref(j);
    api_completion_req_free(&r);
    cm_model_free(m);
}

/* Appends the plain-text tokens of s to want at *k. */
static void push_text(const cm_model *m, const char *s, int32_t *want, int *k) {
    *k += tokenize(m, s, 0, want + *k, 1024 - *k);
}

TEST(fim_context_layout_and_trimming) {
    /* qwen2-chat has Qwen2.5-Coder's <|repo_name|> and <|file_sep|>: the repository format */
    cm_model *m = load("qwen2-chat");
    ASSERT_TRUE(m);
    const cm_model_info *info = cm_model_get_info(m);
    ASSERT_TRUE(info->fim_rep >= 0 && info->fim_sep >= 0);
    api_fim_file files[2] = {{"a.py", 4, "x = 1\n", 6}, {"b.py", 4, "y = 2\n", 6}};
    api_fim_context c = {.prefix = "def f(x):\n", .prefix_len = 10, .middle = "    ", .middle_len = 4,
                         .suffix = "\nprint(f(1))\n", .suffix_len = 13, .files = files, .n_files = 2};
    int32_t *toks = NULL, want[1024];
    int n = 0, trunc = -1, k = 0;
    api_error e;
    ASSERT_EQ_INT(api_fim_context_tokens(m, &c, 256, &toks, &n, &trunc, &e), 0);
    want[k++] = info->fim_rep;
    push_text(m, "project\n", want, &k);
    want[k++] = info->fim_sep;
    push_text(m, "a.py\nx = 1\n", want, &k);
    want[k++] = info->fim_sep;
    push_text(m, "b.py\ny = 2\n", want, &k);
    want[k++] = info->fim_sep;
    push_text(m, "file\n", want, &k);
    want[k++] = info->fim_pre;
    push_text(m, "def f(x):\n", want, &k);
    push_text(m, "    ", want, &k);
    want[k++] = info->fim_suf;
    push_text(m, "\nprint(f(1))\n", want, &k);
    want[k++] = info->fim_mid;
    ASSERT_EQ_INT(trunc, 0);
    ASSERT_EQ_INT(n, k);
    ASSERT_TRUE(memcmp(toks, want, (size_t)n * sizeof *toks) == 0);
    free(toks);

    /* a budget for one file: the newest stays whole, the older is dropped */
    int one_file = n - (1 + tokenize(m, "a.py\nx = 1\n", 0, want, 1024));
    ASSERT_EQ_INT(api_fim_context_tokens(m, &c, one_file, &toks, &n, &trunc, &e), 0);
    ASSERT_EQ_INT(trunc, 1);
    ASSERT_EQ_INT(n, one_file);
    ASSERT_EQ_INT(toks[0], info->fim_rep);
    k = 0;
    push_text(m, "project\n", want, &k);
    ASSERT_EQ_INT(toks[1 + k], info->fim_sep);
    int nb = tokenize(m, "b.py\ny = 2\n", 0, want, 1024);
    int32_t got_b[64];
    memcpy(got_b, toks + 2 + k, (size_t)nb * sizeof *toks);
    ASSERT_TRUE(memcmp(got_b, want, (size_t)nb * sizeof *toks) == 0);
    free(toks);

    /* a tight budget: no files, the prefix keeps its end, the suffix its start */
    ASSERT_EQ_INT(api_fim_context_tokens(m, &c, 12, &toks, &n, &trunc, &e), 0);
    ASSERT_EQ_INT(trunc, 1);
    ASSERT_EQ_INT(n, 12);
    ASSERT_EQ_INT(toks[0], info->fim_pre);
    ASSERT_EQ_INT(toks[n - 1], info->fim_mid);
    int np = tokenize(m, "def f(x):\n", 0, want, 1024);
    int nm = tokenize(m, "    ", 0, want + np, 1024 - np);
    int at = 1; /* toks[1..) ends with the prefix's last tokens, then the middle */
    while (at + 1 < n && toks[at + 1] != info->fim_suf) at++;
    ASSERT_EQ_INT(toks[at], want[np + nm - 1]);
    free(toks);
    /* too small for the text at the cursor */
    ASSERT_EQ_INT(api_fim_context_tokens(m, &c, 3, &toks, &n, &trunc, &e), -1);
    ASSERT_STREQ(e.code, "context_length_exceeded");
    cm_model_free(m);

    /* qwen2-gqa has no repository tokens: files are text sections, no header */
    m = load("qwen2-gqa");
    ASSERT_TRUE(m);
    info = cm_model_get_info(m);
    ASSERT_TRUE(info->fim_rep < 0 && info->fim_sep < 0);
    c.n_files = 1;
    ASSERT_EQ_INT(api_fim_context_tokens(m, &c, 256, &toks, &n, &trunc, &e), 0);
    k = 0;
    push_text(m, "--- a.py ---\nx = 1\n\n", want, &k);
    want[k++] = info->fim_pre;
    ASSERT_TRUE(n > k);
    ASSERT_TRUE(memcmp(toks, want, (size_t)k * sizeof *toks) == 0);
    free(toks);
    cm_model_free(m);
}

/* Every numeric field of a request against the values a float or an integer conversion cannot hold
 * (denormals, values that round to 0 or overflow, +-1e308, 2^53, 2^63, negative zero) and numbers
 * jansson itself cannot hold (1e400, an integer beyond 64 bits): each is either accepted, and then the
 * engine's sampler accepts the parameters it became (never a 500 after a 200), or a 400 that names the
 * field. */
TEST(numeric_extremes_accepted_or_named) {
    cm_model *m = load("qwen2-gqa");
    ASSERT_TRUE(m);
    api_model am = {.model = m, .id = "qwen2-gqa", .n_ctx = 256};
    api_limits lim;
    api_limits_default(&lim);
    static const char *const fields[] = {"temperature", "top_p", "presence_penalty", "frequency_penalty",
                                         "min_p", "repetition_penalty", "top_k", "n", "best_of",
                                         "max_tokens", "logprobs", "seed", "logit_bias"};
    static const char *const values[] = {
        "0", "-0", "-0.0", "0.0", "1e-300", "-1e-300", "1e-45", "-1e-45", "4e-39", "1.1754942e-38",
        "1.1754944e-38", "1e-38", "0.5", "1", "1.0", "2", "-2", "1e6", "1000000.0000001", "3.4028235e38",
        "3.5e38", "1e308", "-1e308", "1.7976931348623157e308", "9007199254740992", "9007199254740993",
        "9007199254740992.0", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
        "9223372036854775808.0", "-9223372036854775809", "1.8446744073709552e19", "1e400", "-1e400",
        "99999999999999999999999", "-99999999999999999999999", "1e-400",
    };
    int accepted = 0, refused = 0;
    for (size_t f = 0; f < sizeof fields / sizeof *fields; f++) {
        for (size_t v = 0; v < sizeof values / sizeof *values; v++) {
            char body[256];
            if (!strcmp(fields[f], "logit_bias"))
                snprintf(body, sizeof body, "{\"prompt\":\"x\",\"max_tokens\":1,\"logit_bias\":{\"5\":%s}}", values[v]);
            else if (!strcmp(fields[f], "max_tokens"))
                snprintf(body, sizeof body, "{\"prompt\":\"x\",\"max_tokens\":%s}", values[v]);
            else
                snprintf(body, sizeof body, "{\"prompt\":\"x\",\"max_tokens\":1,\"%s\":%s}", fields[f], values[v]);
            api_completion_req r;
            api_error e;
            memset(&e, 0, sizeof e);
            if (api_parse_completion(body, strlen(body), &am, &lim, &r, &e) == 0) {
                for (int c = 0; c < api_completion_n_choices(&r); c++) {
                    cm_sampling sp;
                    api_completion_sampling(&r, c, &sp);
                    cm_err err = {0};
                    cm_sampler *smp = cm_sampler_create(m, &sp, &err);
                    if (!smp) {
                        TEST_FAIL_("%s: accepted, but the sampler refuses it: %s", body, err.msg);
                        api_completion_req_free(&r);
                        return;
                    }
                    cm_sampler_free(smp);
                }
                api_completion_req_free(&r);
                accepted++;
            } else if (e.status != 400 || strcmp(e.param, fields[f]) ||
                       (!strstr(e.message, fields[f]) && !(e.code && !strcmp(e.code, "context_length_exceeded")))) {
                TEST_FAIL_("%s: %d param '%s': %s", body, e.status, e.param, e.message);
                return;
            } else {
                refused++;
            }
        }
    }
    fprintf(stderr, "  %d accepted, %d refused with the field named\n", accepted, refused);
    /* a few pinned outcomes */
    api_completion_req r;
    api_error e;
    const char *b = "{\"prompt\":\"x\",\"repetition_penalty\":1e-300}";
    ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), -1);
    ASSERT_STREQ(e.param, "repetition_penalty");
    b = "{\"prompt\":\"x\",\"temperature\":-0.0,\"frequency_penalty\":-0.0}";
    ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), 0);
    ASSERT_TRUE(r.sampling.temperature == 0 && !signbit(r.sampling.temperature));
    ASSERT_TRUE(r.sampling.frequency_penalty == 0 && !signbit(r.sampling.frequency_penalty));
    api_completion_req_free(&r);
    b = "{\"prompt\":[1, 2, 99999999999999999999999]}";
    ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    ASSERT_TRUE(strstr(e.message, "99999999999999999999999 is too large") != NULL);
    b = "{\"seed\":9223372036854775807,\"top_p\":1e400}";
    ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), -1);
    ASSERT_STREQ(e.param, "top_p");
    b = "[1e400]";
    ASSERT_EQ_INT(api_parse_completion(b, strlen(b), &am, &lim, &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "");
    cm_model_free(m);
}

int main(void) {
    RUN(prompts_match_engine_tokenizer);
    RUN(streamed_equals_full_with_stops);
    RUN(render_real_token_bytes);
    RUN(fim_context_layout_and_trimming);
    RUN(numeric_extremes_accepted_or_named);
    return test_summary();
}
