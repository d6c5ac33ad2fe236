/*
 * test_api.c - unit tests of api/: request validation (every rule: status, param, message), all prompt
 * forms, FIM (shared with the CLI), engine options and MoE rules, sampling mapping, stop-string
 * holdback, response/chunk/model/routing shapes (parsed back with jansson), SSE framing, and random mutations of valid bodies (run it under ASan).
 * Linked against tests/api/fake_engine.c, a byte-per-token stand-in, so token ids are exact.
 */
#include <math.h>
#include <stdint.h>

#include "../test.h"
#include "api.h"
#include "format.h"
#include "fake_engine.h"

static cm_model *g_model;
static api_model g_am;
static api_limits g_lim;

static void setup(int fim, int bos, int add_bos) {
    fake_model_free(g_model);
    fake_model_opts o = {.fim = fim, .bos = bos, .add_bos = add_bos, .eos = 1};
    g_model = fake_model_create(&o, "Fake Coder");
    g_am = (api_model){.model = g_model, .id = "fake-coder", .created = 1700000000, .n_ctx = 64};
    api_limits_default(&g_lim);
}

static int parse(const char *body, api_completion_req *r, api_error *e) {
    return api_parse_completion(body, strlen(body), &g_am, &g_lim, r, e);
}

/* Tokens of prompt p equal the given list. */
static int tokens_are(const api_completion_req *r, int p, const int32_t *want, int n) {
    if (p >= r->n_prompts || r->prompts[p].n_tokens != n) return 0;
    return memcmp(r->prompts[p].tokens, want, (size_t)n * sizeof *want) == 0;
}

/* ============================================================ errors */

/* The name a server picks a model by before it parses the body against it: the string "model" only;
 * absent, null, another type or a body that is not JSON (one with \u0000 in a string included) give none
 * (0), a name longer than the buffer none that any model can have (-1). */
TEST(request_model_name) {
    char name[16];
    static const char ok[] = "{\"prompt\":\"a\",\"model\":\"coder\"}";
    ASSERT_EQ_INT(api_request_model(ok, sizeof ok - 1, name, sizeof name), 1);
    ASSERT_STREQ(name, "coder");
    const char *none[] = {"{\"prompt\":\"a\"}", "{\"model\":null}", "{\"model\":3}", "[\"model\"]", "{bad", ""};
    for (size_t i = 0; i < sizeof none / sizeof *none; i++)
        ASSERT_EQ_INT(api_request_model(none[i], strlen(none[i]), name, sizeof name), 0);
    static const char longer[] = "{\"model\":\"0123456789abcdef\"}"; /* 16 bytes: no room for the NUL */
    ASSERT_EQ_INT(api_request_model(longer, sizeof longer - 1, name, sizeof name), -1);
    static const char nul[] = "{\"model\":\"co\\u0000der\"}";
    ASSERT_EQ_INT(api_request_model(nul, sizeof nul - 1, name, sizeof name), 0);
    /* the body need not be NUL-terminated */
    ASSERT_EQ_INT(api_request_model(ok, 24, name, sizeof name), 0); /* cut inside: not JSON */
}

TEST(error_json_shape) {
    api_error e;
    api_error_set(&e, 400, API_ERR_INVALID, "temperature", NULL, "bad %d", 7);
    char *s = api_error_json(&e);
    json_t *j = json_loads(s, 0, NULL);
    free(s);
    ASSERT_TRUE(j);
    json_t *in = json_object_get(j, "error");
    ASSERT_STREQ(json_string_value(json_object_get(in, "message")), "bad 7");
    ASSERT_STREQ(json_string_value(json_object_get(in, "type")), "invalid_request_error");
    ASSERT_STREQ(json_string_value(json_object_get(in, "param")), "temperature");
    ASSERT_TRUE(json_is_null(json_object_get(in, "code")));
    ASSERT_EQ_INT(json_object_size(in), 4);
    json_decref(j);

    api_error_set(&e, 404, API_ERR_INVALID, NULL, "model_not_found", "x");
    s = api_error_json(&e);
    j = json_loads(s, 0, NULL);
    free(s);
    in = json_object_get(j, "error");
    ASSERT_TRUE(json_is_null(json_object_get(in, "param")));
    ASSERT_STREQ(json_string_value(json_object_get(in, "code")), "model_not_found");
    json_decref(j);
}

TEST(error_http_defaults) {
    static const struct { int status; const char *type; const char *code; } cases[] = {
        {401, "authentication_error", "invalid_api_key"}, {404, "not_found_error", NULL},
        {405, "invalid_request_error", "method_not_allowed"}, {413, "invalid_request_error", "request_too_large"},
        {414, "invalid_request_error", "uri_too_long"}, {431, "invalid_request_error", "header_fields_too_large"},
        {429, "rate_limit_error", "rate_limit_exceeded"}, {500, "server_error", NULL},
        {503, "server_error", "overloaded"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        api_error e;
        api_error_http(&e, cases[i].status, NULL);
        ASSERT_EQ_INT(e.status, cases[i].status);
        ASSERT_STREQ(e.type, cases[i].type);
        if (cases[i].code) ASSERT_STREQ(e.code, cases[i].code);
        else ASSERT_TRUE(e.code == NULL);
        ASSERT_TRUE(strlen(e.message) > 10);
    }
    api_error e;
    api_error_http(&e, 401, "You didn't provide an API key.");
    ASSERT_STREQ(e.message, "You didn't provide an API key.");
    api_error_http(&e, 42, NULL); /* nonsense status: a 500, never an invalid HTTP status */
    ASSERT_EQ_INT(e.status, 500);
}

TEST(sse_framing) {
    char *s = api_sse_data("{\"a\":1}");
    ASSERT_STREQ(s, "data: {\"a\":1}\n\n");
    free(s);
    ASSERT_STREQ(API_SSE_DONE, "data: [DONE]\n\n");
    api_error e;
    api_error_http(&e, 503, NULL);
    s = api_sse_error(&e);
    ASSERT_TRUE(strncmp(s, "data: {\"error\":{", 16) == 0);
    size_t n = strlen(s);
    ASSERT_TRUE(n > 8 && strcmp(s + n - 2, "\n\n") == 0);
    ASSERT_TRUE(memchr(s, '\n', n - 2) == NULL); /* one event, one line */
    json_t *j = json_loads(s + 6, 0, NULL);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(j, "error"), "type")), "server_error");
    json_decref(j);
    free(s);
}

TEST(make_id_format) {
    char a[40], b[40];
    api_make_id(a, sizeof a, 1);
    api_make_id(b, sizeof b, 2);
    ASSERT_EQ_INT(strlen(a), 29);
    ASSERT_TRUE(strncmp(a, "cmpl-", 5) == 0);
    ASSERT_TRUE(strcmp(a, b) != 0);
    for (int i = 5; i < 29; i++) ASSERT_TRUE((a[i] >= 'a' && a[i] <= 'z') || (a[i] >= 'A' && a[i] <= 'Z') || (a[i] >= '0' && a[i] <= '9'));
}

/* ============================================================ parsing: defaults and prompt forms */

TEST(parse_defaults) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"model\":\"fake-coder\",\"prompt\":\"hi\"}", &r, &e), 0);
    int32_t want[] = {'h', 'i'};
    ASSERT_TRUE(tokens_are(&r, 0, want, 2));
    ASSERT_EQ_INT(r.n_prompts, 1);
    ASSERT_EQ_INT(r.n, 1);
    ASSERT_EQ_INT(r.max_tokens, 16);
    ASSERT_EQ_INT(r.logprobs, -1);
    ASSERT_EQ_INT(r.stream, 0);
    ASSERT_EQ_INT(r.echo, 0);
    ASSERT_EQ_INT(r.stop.n, 0);
    ASSERT_EQ_INT(r.seed_set, 0);
    ASSERT_EQ_INT(r.prompts[0].echo_from, 0);
    ASSERT_STREQ(r.prompts[0].text, "hi");
    ASSERT_NEAR(r.sampling.temperature, 1.0, 0); /* OpenAI's default, not the engine's */
    ASSERT_NEAR(r.sampling.top_p, 1.0, 0);
    ASSERT_EQ_INT(r.sampling.top_k, 0);
    ASSERT_EQ_INT(r.sampling.penalty_last_n, 0); /* OpenAI: penalties count all generated tokens */
    ASSERT_EQ_INT(r.routing, API_ROUTING_NONE);
    ASSERT_EQ_INT(r.segment_routing, API_SEGMENT_CAUSAL);
    ASSERT_STREQ(r.unknown_field, "");
    api_completion_req_free(&r);
    api_completion_req_free(&r); /* idempotent */
}

TEST(parse_all_fields) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    const char *body =
        "{\"model\":\"fake-coder\",\"prompt\":\"x\",\"max_tokens\":5,\"temperature\":0.5,\"top_p\":0.9,\"n\":3,"
        "\"best_of\":3,\"stream\":true,\"stream_options\":{\"include_usage\":true},\"logprobs\":2,\"echo\":true,"
        "\"stop\":[\"\\n\\n\",\"END\"],\"presence_penalty\":-1.5,\"frequency_penalty\":2,"
        "\"logit_bias\":{\"50\":-100,\"261\":3.5},\"seed\":-7,\"user\":\"u1\",\"top_k\":40,\"min_p\":0.05,"
        "\"repetition_penalty\":1.1,\"language\":\"python\",\"segment_routing\":\"reference\",\"routing\":\"full\","
        "\"cache_prompt\":true,\"mirostat\":0}";
    ASSERT_EQ_INT(parse(body, &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 5);
    ASSERT_NEAR(r.sampling.temperature, 0.5, 1e-7);
    ASSERT_NEAR(r.sampling.top_p, 0.9, 1e-7);
    ASSERT_EQ_INT(r.n, 3);
    ASSERT_EQ_INT(r.stream, 1);
    ASSERT_EQ_INT(r.include_usage, 1);
    ASSERT_EQ_INT(r.logprobs, 2);
    ASSERT_EQ_INT(r.sampling.n_logprobs, 2);
    ASSERT_EQ_INT(r.echo, 1);
    ASSERT_EQ_INT(r.stop.n, 2);
    ASSERT_STREQ(r.stop.s[0], "\n\n");
    ASSERT_EQ_INT(r.stop.len[1], 3);
    ASSERT_NEAR(r.sampling.presence_penalty, -1.5, 0);
    ASSERT_NEAR(r.sampling.frequency_penalty, 2, 0);
    ASSERT_EQ_INT(r.n_logit_bias, 2);
    ASSERT_EQ_INT(r.logit_bias[0].token, 50);
    ASSERT_NEAR(r.logit_bias[0].bias, -100, 0);
    ASSERT_EQ_INT(r.logit_bias[1].token, 261);
    ASSERT_NEAR(r.logit_bias[1].bias, 3.5, 0);
    ASSERT_EQ_INT(r.seed_set, 1);
    ASSERT_TRUE(r.seed == (uint64_t)-7);
    ASSERT_STREQ(r.user, "u1");
    ASSERT_EQ_INT(r.sampling.top_k, 40);
    ASSERT_NEAR(r.sampling.min_p, 0.05, 1e-7);
    ASSERT_NEAR(r.sampling.repetition_penalty, 1.1, 1e-6);
    ASSERT_STREQ(r.language, "python");
    ASSERT_EQ_INT(r.segment_routing, API_SEGMENT_REFERENCE);
    ASSERT_EQ_INT(r.routing, API_ROUTING_FULL);
    ASSERT_STREQ(r.unknown_field, "mirostat"); /* cache_prompt is known: accepted and ignored on purpose */
    ASSERT_EQ_INT(api_completion_n_choices(&r), 3);
    api_completion_req_free(&r);

    /* null is "not given" for every optional field */
    const char *nulls =
        "{\"prompt\":\"x\",\"suffix\":null,\"temperature\":null,\"top_p\":null,\"n\":null,\"stream\":null,"
        "\"stream_options\":null,\"logprobs\":null,\"echo\":null,\"stop\":null,\"presence_penalty\":null,"
        "\"frequency_penalty\":null,\"best_of\":null,\"logit_bias\":null,\"user\":null,\"seed\":null,"
        "\"model\":null,\"top_k\":null,\"min_p\":null,\"repetition_penalty\":null,\"language\":null,"
        "\"segment_routing\":null,\"routing\":null,\"parse_special\":null,\"n_predict\":null,"
        "\"cache_prompt\":null,\"segments\":null}";
    ASSERT_EQ_INT(parse(nulls, &r, &e), 0);
    ASSERT_EQ_INT(r.n, 1);
    ASSERT_EQ_INT(r.logprobs, -1);
    ASSERT_EQ_INT(r.max_tokens, 16);
    ASSERT_EQ_INT(r.has_suffix, 0);
    api_completion_req_free(&r);
}

TEST(prompt_forms) {
    setup(1, 1, 1);
    api_completion_req r;
    api_error e;
    /* string: BOS added because add_bos is set; echo_from skips it */
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\"}", &r, &e), 0);
    int32_t w1[] = {FAKE_BOS, 'a', 'b'};
    ASSERT_TRUE(tokens_are(&r, 0, w1, 3));
    ASSERT_EQ_INT(r.prompts[0].echo_from, 1);
    api_completion_req_free(&r);
    /* array of strings: one prompt each, in order */
    ASSERT_EQ_INT(parse("{\"prompt\":[\"a\",\"bc\",\"\"],\"n\":2}", &r, &e), 0);
    ASSERT_EQ_INT(r.n_prompts, 3);
    ASSERT_EQ_INT(api_completion_n_choices(&r), 6);
    int32_t w2[] = {FAKE_BOS, 'b', 'c'}, w3[] = {FAKE_BOS};
    ASSERT_TRUE(tokens_are(&r, 1, w2, 3));
    ASSERT_TRUE(tokens_are(&r, 2, w3, 1)); /* "" is just BOS */
    ASSERT_STREQ(r.prompts[1].text, "bc");
    api_completion_req_free(&r);
    /* array of ints: exact ids, no BOS added; echo text decoded with control tokens shown */
    ASSERT_EQ_INT(parse("{\"prompt\":[104,105,256,261]}", &r, &e), 0);
    int32_t w4[] = {104, 105, 256, 261};
    ASSERT_TRUE(tokens_are(&r, 0, w4, 4));
    ASSERT_EQ_INT(r.prompts[0].echo_from, 0);
    ASSERT_STREQ(r.prompts[0].text, "hi<|endoftext|> world");
    api_completion_req_free(&r);
    /* array of int arrays */
    ASSERT_EQ_INT(parse("{\"prompt\":[[1,2],[3]]}", &r, &e), 0);
    int32_t w5[] = {1, 2}, w6[] = {3};
    ASSERT_EQ_INT(r.n_prompts, 2);
    ASSERT_TRUE(tokens_are(&r, 0, w5, 2));
    ASSERT_TRUE(tokens_are(&r, 1, w6, 1));
    api_completion_req_free(&r);
    /* integral reals are not token ids (JSON arrays of ints only) */
    ASSERT_EQ_INT(parse("{\"prompt\":[1.0,2]}", &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
}

TEST(prompt_default_and_empty) {
    api_completion_req r;
    api_error e;
    setup(0, 1, 0);
    /* no prompt in any form: OpenAI's reference marks it required, and a completion of nothing is
     * never what a client meant */
    ASSERT_EQ_INT(parse("{}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "prompt");
    ASSERT_STREQ(e.message, "'prompt' is a required property");
    ASSERT_EQ_INT(parse("{\"prompt\":null,\"max_tokens\":3}", &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    /* "" is a prompt: BOS exists but is not added, the start is still BOS */
    ASSERT_EQ_INT(parse("{\"prompt\":\"\"}", &r, &e), 0);
    int32_t wb[] = {FAKE_BOS};
    ASSERT_TRUE(tokens_are(&r, 0, wb, 1));
    ASSERT_EQ_INT(r.prompts[0].echo_from, 1);
    ASSERT_STREQ(r.prompts[0].text, "");
    api_completion_req_free(&r);
    setup(0, 0, 0); /* no BOS: EOS stands for "<|endoftext|>" as in OpenAI */
    ASSERT_EQ_INT(parse("{\"prompt\":\"\"}", &r, &e), 0);
    int32_t we[] = {FAKE_EOS};
    ASSERT_TRUE(tokens_are(&r, 0, we, 1));
    api_completion_req_free(&r);
    fake_model_opts o = {0};
    fake_model_free(g_model);
    g_model = fake_model_create(&o, "bare");
    g_am.model = g_model;
    ASSERT_EQ_INT(parse("{\"prompt\":\"\"}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "prompt");
}

TEST(prompt_special_tokens) {
    setup(1, 0, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":\"a<|endoftext|>\"}", &r, &e), 0);
    int32_t w1[] = {'a', FAKE_EOS};
    ASSERT_TRUE(tokens_are(&r, 0, w1, 2));
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a<s>\",\"parse_special\":false}", &r, &e), 0);
    int32_t w2[] = {'a', '<', 's', '>'};
    ASSERT_TRUE(tokens_are(&r, 0, w2, 4));
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"parse_special\":1}", &r, &e), -1);
    ASSERT_STREQ(e.param, "parse_special");
}

TEST(fim_suffix) {
    api_completion_req r;
    api_error e;
    setup(1, 1, 0);
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"suffix\":\"<s>z\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.has_suffix, 1);
    /* user code is text: "<s>" in the suffix stays three bytes */
    int32_t w1[] = {FAKE_FIM_PRE, 'a', 'b', FAKE_FIM_SUF, '<', 's', '>', 'z', FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, w1, 9));
    api_completion_req_free(&r);
    /* empty suffix: completion at the end of a file */
    ASSERT_EQ_INT(parse("{\"prompt\":\"<|fim_prefix|>\",\"suffix\":\"\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].n_tokens, 3 + 14); /* 3 FIM ids + 14 bytes */
    ASSERT_EQ_INT(r.prompts[0].tokens[1], '<');
    api_completion_req_free(&r);
    /* token-id prompt inside the FIM template */
    ASSERT_EQ_INT(parse("{\"prompt\":[7,8],\"suffix\":\"q\"}", &r, &e), 0);
    int32_t w2[] = {FAKE_FIM_PRE, 7, 8, FAKE_FIM_SUF, 'q', FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, w2, 6));
    api_completion_req_free(&r);
    /* add_bos: BOS before <fim_prefix> */
    setup(1, 1, 1);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"suffix\":\"b\"}", &r, &e), 0);
    int32_t w3[] = {FAKE_BOS, FAKE_FIM_PRE, 'a', FAKE_FIM_SUF, 'b', FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, w3, 6));
    api_completion_req_free(&r);
    /* FIM with echo is rejected */
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"suffix\":\"b\",\"echo\":true}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "echo");
    /* a model without FIM tokens */
    setup(0, 1, 0);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"suffix\":\"b\"}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "suffix");
    ASSERT_TRUE(strstr(e.message, "fill-in-the-middle") != NULL);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"suffix\":null}", &r, &e), 0); /* null suffix is fine */
    api_completion_req_free(&r);
}

/* api_fim_tokens (codemoe complete --suffix) gives exactly the ids of a "suffix" request, control-token
 * strings in prompt and suffix staying text; without FIM tokens it fails like the request does. */
TEST(fim_tokens_shared_with_requests) {
    api_completion_req r;
    api_error e;
    for (int add_bos = 0; add_bos < 2; add_bos++) {
        setup(1, 1, add_bos);
        ASSERT_EQ_INT(parse("{\"prompt\":\"x<s>\",\"suffix\":\"<|endoftext|>y\"}", &r, &e), 0);
        int32_t *ids = NULL;
        int n = 0;
        ASSERT_EQ_INT(api_fim_tokens(g_model, "x<s>", 4, "<|endoftext|>y", 14, &ids, &n, &e), 0);
        ASSERT_EQ_INT(n, 3 + add_bos + 4 + 14);
        ASSERT_TRUE(tokens_are(&r, 0, ids, n));
        free(ids);
        api_completion_req_free(&r);
    }
    setup(0, 1, 0);
    static int32_t stale[1];
    int32_t *ids = stale; /* reset on failure */
    int n = 7;
    ASSERT_EQ_INT(api_fim_tokens(g_model, "a", 1, "b", 1, &ids, &n, &e), -1);
    ASSERT_TRUE(ids == NULL && n == 0);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "suffix");
    ASSERT_TRUE(strstr(e.message, "fill-in-the-middle") != NULL);
}

/* ============================================================ parsing: every rejection */

typedef struct bad_case {
    const char *body;
    int status;
    const char *param;   /* "" = null */
    const char *message; /* substring */
    const char *code;    /* NULL = null */
} bad_case;

static const bad_case bad_cases[] = {
    {"{\"prompt\":", 400, "", "We could not parse the JSON body", NULL},
    {"", 400, "", "We could not parse the JSON body", NULL},
    {"[1,2]", 400, "", "[1,2] is not of type 'object'", NULL},
    {"\"x\"", 400, "", "is not of type 'object'", NULL},
    {"{\"temperature\":\"abc\"}", 400, "temperature", "'abc' is not of type 'number' - 'temperature'", NULL},
    {"{\"temperature\":-0.1}", 400, "temperature", "-0.1 is less than the minimum of 0 - 'temperature'", NULL},
    {"{\"temperature\":2.5}", 400, "temperature", "2.5 is greater than the maximum of 2 - 'temperature'", NULL},
    {"{\"temperature\":true}", 400, "temperature", "true is not of type 'number'", NULL},
    {"{\"top_p\":0}", 400, "top_p", "0 is less than or equal to the minimum of 0 - 'top_p'", NULL},
    {"{\"top_p\":1.01}", 400, "top_p", "greater than the maximum of 1", NULL},
    {"{\"top_p\":[]}", 400, "top_p", "[] is not of type 'number'", NULL},
    {"{\"n\":0}", 400, "n", "0 is less than the minimum of 1 - 'n'", NULL},
    {"{\"n\":9}", 400, "n", "9 is greater than the maximum of 8 - 'n'", NULL},
    {"{\"n\":1.5}", 400, "n", "1.5 is not of type 'integer' - 'n'", NULL},
    {"{\"n\":\"2\"}", 400, "n", "'2' is not of type 'integer'", NULL},
    {"{\"best_of\":2}", 400, "best_of", "best_of (2) must equal n (1)", NULL},
    {"{\"best_of\":0}", 400, "best_of", "less than the minimum of 1", NULL},
    {"{\"max_tokens\":-1}", 400, "max_tokens", "-1 is less than the minimum of 0 - 'max_tokens'", NULL},
    {"{\"max_tokens\":\"16\"}", 400, "max_tokens", "is not of type 'integer'", NULL},
    {"{\"stream\":1}", 400, "stream", "1 is not of type 'boolean' - 'stream'", NULL},
    {"{\"stream_options\":{\"include_usage\":true}}", 400, "stream_options",
     "The 'stream_options' parameter is only allowed when 'stream' is enabled.", NULL},
    {"{\"stream\":true,\"stream_options\":[]}", 400, "stream_options", "is not of type 'object'", NULL},
    {"{\"stream\":true,\"stream_options\":{\"include_usage\":\"yes\"}}", 400, "stream_options.include_usage",
     "'yes' is not of type 'boolean'", NULL},
    {"{\"logprobs\":6}", 400, "logprobs", "6 is greater than the maximum of 5 - 'logprobs'", NULL},
    {"{\"logprobs\":-1}", 400, "logprobs", "less than the minimum of 0", NULL},
    {"{\"logprobs\":true}", 400, "logprobs", "true is not of type 'integer'", NULL},
    {"{\"echo\":\"true\"}", 400, "echo", "is not of type 'boolean'", NULL},
    {"{\"stop\":5}", 400, "stop", "5 is not valid under any of the given schemas - 'stop'", NULL},
    {"{\"stop\":\"\"}", 400, "stop", "'' is too short - 'stop'", NULL},
    {"{\"stop\":[\"a\",\"\"]}", 400, "stop", "'' is too short", NULL},
    {"{\"stop\":[\"a\",3]}", 400, "stop", "3 is not of type 'string' - 'stop'", NULL},
    {"{\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\",\"12\",\"13\",\"14\",\"15\",\"16\","
     "\"17\",\"18\",\"19\",\"20\",\"21\",\"22\",\"23\",\"24\",\"25\",\"26\",\"27\",\"28\",\"29\",\"30\",\"31\",\"32\",\"33\"]}",
     400, "stop", "is too long: at most 32 stop sequences", NULL},
    {"{\"presence_penalty\":-2.01}", 400, "presence_penalty", "less than the minimum of -2", NULL},
    {"{\"frequency_penalty\":3}", 400, "frequency_penalty", "greater than the maximum of 2", NULL},
    {"{\"frequency_penalty\":null,\"presence_penalty\":{}}", 400, "presence_penalty", "{} is not of type 'number'", NULL},
    {"{\"logit_bias\":[1]}", 400, "logit_bias", "[1] is not of type 'object' - 'logit_bias'", NULL},
    {"{\"logit_bias\":{\"abc\":1}}", 400, "logit_bias", "Invalid key in 'logit_bias': 'abc'", NULL},
    {"{\"logit_bias\":{\"-1\":1}}", 400, "logit_bias", "Invalid key in 'logit_bias'", NULL},
    {"{\"logit_bias\":{\"12 \":1}}", 400, "logit_bias", "Invalid key", NULL},
    {"{\"logit_bias\":{\"300\":1}}", 400, "logit_bias", "Invalid token id 300 in 'logit_bias'", NULL},
    {"{\"logit_bias\":{\"99999999999\":1}}", 400, "logit_bias", "Invalid key", NULL},
    {"{\"logit_bias\":{\"5\":101}}", 400, "logit_bias", "between -100 and 100", NULL},
    {"{\"logit_bias\":{\"5\":\"x\"}}", 400, "logit_bias", "'x' is not of type 'number' - 'logit_bias.5'", NULL},
    {"{\"seed\":1.5}", 400, "seed", "is not of type 'integer' - 'seed'", NULL},
    {"{\"seed\":\"1\"}", 400, "seed", "is not of type 'integer'", NULL},
    {"{\"user\":5}", 400, "user", "5 is not of type 'string' - 'user'", NULL},
    {"{\"model\":5}", 400, "model", "5 is not of type 'string' - 'model'", NULL},
    {"{\"prompt\":\"a\",\"n_predict\":4,\"max_tokens\":4}", 400, "n_predict", "'n_predict' and 'max_tokens' both set", NULL},
    {"{\"prompt\":\"a\",\"n_predict\":-2}", 400, "n_predict", "less than the minimum of -1 - 'n_predict'", NULL},
    {"{\"prompt\":\"a\",\"n_predict\":\"8\"}", 400, "n_predict", "is not of type 'integer'", NULL},
    {"{\"prompt\":\"a\",\"cache_prompt\":1}", 400, "cache_prompt", "1 is not of type 'boolean' - 'cache_prompt'", NULL},
    {"{}", 400, "prompt", "'prompt' is a required property", NULL},
    {"{\"max_tokens\":4}", 400, "prompt", "'prompt' is a required property", NULL},
    {"{\"segments\":[]}", 400, "segments", "[] is not of type 'object' - 'segments'", NULL},
    {"{\"segments\":{\"prefix\":\"a\"},\"mode\":\"next_edit_suggestion\"}", 400, "mode",
     "'next_edit_suggestion' is not one of ['standard'] - 'mode'", NULL},
    {"{\"segments\":{}}", 400, "prompt", "'prefix' is a required property - 'segments'", NULL},
    {"{\"segments\":{\"prefix\":1}}", 400, "segments.prefix", "1 is not of type 'string'", NULL},
    {"{\"segments\":{\"prefix\":\"a\",\"suffix\":[]}}", 400, "segments.suffix", "is not of type 'string'", NULL},
    {"{\"top_k\":-1}", 400, "top_k", "less than the minimum of 0 - 'top_k'", NULL},
    {"{\"top_k\":0.5}", 400, "top_k", "is not of type 'integer'", NULL},
    {"{\"min_p\":1.5}", 400, "min_p", "greater than the maximum of 1", NULL},
    {"{\"repetition_penalty\":0}", 400, "repetition_penalty", "less than or equal to the minimum of 0", NULL},
    {"{\"language\":[]}", 400, "language", "is not of type 'string'", NULL},
    {"{\"segment_routing\":\"random\"}", 400, "segment_routing",
     "'random' is not one of ['causal', 'reference'] - 'segment_routing'", NULL},
    {"{\"routing\":\"all\"}", 400, "routing", "'all' is not one of ['none', 'summary', 'full', 'tokens'] - 'routing'",
     NULL},
    {"{\"prompt\":\"a\",\"routing\":\"tokens\",\"n\":2}", 400, "routing", "a single prompt and n 1", NULL},
    {"{\"prompt\":[\"a\",\"b\"],\"routing\":\"tokens\"}", 400, "routing", "(this request has 2 prompts and n 1)",
     NULL},
    {"{\"routing\":1}", 400, "routing", "is not of type 'string'", NULL},
    {"{\"suffix\":1}", 400, "suffix", "1 is not of type 'string' - 'suffix'", NULL},
    {"{\"prompt\":5}", 400, "prompt", "5 is not valid under any of the given schemas - 'prompt'", NULL},
    {"{\"prompt\":[]}", 400, "prompt", "[] is too short - 'prompt'", NULL},
    {"{\"prompt\":[\"a\",1]}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":[1,\"a\"]}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":[[1],[]]}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":[[1],2]}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":[true]}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":{}}", 400, "prompt", "is not valid under any of the given schemas", NULL},
    {"{\"prompt\":[300]}", 400, "prompt", "Invalid token id 300 in 'prompt'", NULL},
    {"{\"prompt\":[[0],[-1]]}", 400, "prompt", "Invalid token id -1 in 'prompt'", NULL},
    {"{\"prompt\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
     400, "prompt", "at most 16 per request", NULL},
    /* context: n_ctx is 64 in these tests */
    {"{\"prompt\":\"0123456789012345678901234567890123456789012345678901234567890123456789\",\"max_tokens\":0}", 400,
     "prompt", "(70 in your prompt; 0 for the completion)", "context_length_exceeded"},
};

TEST(rejections) {
    setup(1, 1, 0);
    for (size_t i = 0; i < sizeof bad_cases / sizeof *bad_cases; i++) {
        const bad_case *c = &bad_cases[i];
        api_completion_req r;
        api_error e;
        memset(&e, 0, sizeof e);
        int rc = parse(c->body, &r, &e);
        if (rc != -1) {
            TEST_FAIL_("case %zu %s: accepted", i, c->body);
            api_completion_req_free(&r);
            continue;
        }
        api_completion_req_free(&r); /* safe after failure */
        CHECK_TRUE(e.status == c->status);
        CHECK_TRUE(strcmp(e.param, c->param) == 0);
        CHECK_TRUE(strstr(e.message, c->message) != NULL);
        CHECK_TRUE(c->code ? e.code && strcmp(e.code, c->code) == 0 : e.code == NULL);
        if (e.status != c->status || strcmp(e.param, c->param) || !strstr(e.message, c->message))
            fprintf(stderr, "  case %zu %s -> %d param='%s' message=\"%s\"\n", i, c->body, e.status, e.param, e.message);
    }
}

TEST(body_limit_and_model_match) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    g_lim.max_body_bytes = 10;
    ASSERT_EQ_INT(parse("{\"prompt\":\"hello\"}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 413);
    ASSERT_STREQ(e.code, "request_too_large");
    g_lim.max_body_bytes = 1 << 20;
    /* general.name matches too; the id is what /v1/models lists */
    ASSERT_EQ_INT(parse("{\"model\":\"Fake Coder\",\"prompt\":\"a\"}", &r, &e), 0);
    api_completion_req_free(&r);
    ASSERT_TRUE(api_find_model(&g_am, 1, "fake-coder") == &g_am);
    /* a body need not be NUL-terminated, and may hold NUL inside strings */
    const char body[] = "{\"prompt\":\"a\\u0000b\"}XXXX";
    ASSERT_EQ_INT(api_parse_completion(body, sizeof body - 5, &g_am, &g_lim, &r, &e), 0);
    int32_t w[] = {'a', 0, 'b'};
    ASSERT_TRUE(tokens_are(&r, 0, w, 3));
    api_completion_req_free(&r);
    /* a long value is cut in the message, not the message buffer overrun */
    char big[2000];
    snprintf(big, sizeof big, "{\"temperature\":\"%0900d\"}", 0);
    ASSERT_EQ_INT(parse(big, &r, &e), -1);
    ASSERT_TRUE(strstr(e.message, "...' is not of type 'number' - 'temperature'") != NULL);
    /* stop strings are bounded in bytes (512 accepted, 513 not) */
    char stop[700];
    snprintf(stop, sizeof stop, "{\"prompt\":\"a\",\"stop\":\"%0512d\"}", 0);
    ASSERT_EQ_INT(parse(stop, &r, &e), 0);
    ASSERT_EQ_INT(r.stop.len[0], 512);
    api_completion_req_free(&r);
    snprintf(stop, sizeof stop, "{\"stop\":[\"%0513d\"]}", 0);
    ASSERT_EQ_INT(parse(stop, &r, &e), -1);
    ASSERT_STREQ(e.param, "stop");
    ASSERT_TRUE(strstr(e.message, "limited to 512 bytes") != NULL);
    /* request text quoted in a message is cut on a character boundary: the error stays valid JSON */
    const char *wide = "{\"logit_bias\":{\"a\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9\":1}}";
    ASSERT_EQ_INT(parse(wide, &r, &e), -1);
    ASSERT_STREQ(e.param, "logit_bias");
    char *js = api_error_json(&e);
    json_t *j = json_loads(js, 0, NULL);
    free(js);
    ASSERT_TRUE(j);
    ASSERT_TRUE(strstr(json_string_value(json_object_get(json_object_get(j, "error"), "message")),
                       "Invalid key in 'logit_bias': 'a\xc3\xa9") != NULL);
    json_decref(j);
}

/* api_completion_validate tokenizes nothing (a server runs it on its event loop) yet refuses a text
 * that cannot fit whatever its tokens; api_completion_tokenize builds the prompts and applies the exact
 * context rule, with today's message. The fake vocabulary's longest token is "<|fim_prefix|>" (14
 * bytes), so 63 * 14 bytes after the BOS may still fit a 64-token context and one byte more cannot. */
TEST(validate_then_tokenize) {
    setup(1, 1, 1);
    api_completion_req r;
    api_error e;
    const char *body = "{\"prompt\":[\"abc\",\"de\"],\"n\":2}";
    ASSERT_EQ_INT(api_completion_validate(body, strlen(body), &g_am, &g_lim, &r, &e), 0);
    ASSERT_EQ_INT(r.n_prompts, 2);
    ASSERT_EQ_INT(api_completion_n_choices(&r), 4);
    ASSERT_TRUE(r.prompts[0].tokens == NULL && r.prompts[1].tokens == NULL);
    ASSERT_EQ_INT(api_completion_tokenize(&r, &e), 0);
    const int32_t want[] = {FAKE_BOS, 'a', 'b', 'c'};
    ASSERT_TRUE(tokens_are(&r, 0, want, 4));
    ASSERT_EQ_INT(r.prompts[1].n_tokens, 3);
    ASSERT_TRUE(r.pending == NULL);
    api_completion_req_free(&r);
    /* validated, never tokenized (a client that left): freeing releases the parsed body */
    ASSERT_EQ_INT(api_completion_validate(body, strlen(body), &g_am, &g_lim, &r, &e), 0);
    api_completion_req_free(&r);

    size_t fit = 63 * 14; /* + BOS: the bound is exactly 64 */
    char *b = malloc(fit + 64);
    ASSERT_TRUE(b);
    for (int over = 0; over < 2; over++) {
        size_t n = fit + (size_t)over;
        int k = snprintf(b, 32, "{\"prompt\":\"");
        memset(b + k, 'x', n);
        snprintf(b + k + n, 32, "\",\"max_tokens\":0}");
        int rc = api_completion_validate(b, strlen(b), &g_am, &g_lim, &r, &e);
        if (over) {
            ASSERT_EQ_INT(rc, -1);
            ASSERT_EQ_INT(e.status, 400);
            ASSERT_STREQ(e.code, "context_length_exceeded");
            ASSERT_STREQ(e.param, "prompt");
            ASSERT_TRUE(strstr(e.message, "at least 65 in your prompt") != NULL);
            continue;
        }
        ASSERT_EQ_INT(rc, 0);
        /* it fits the bound but not the context: the exact count decides after tokenization */
        ASSERT_EQ_INT(api_completion_tokenize(&r, &e), -1);
        ASSERT_EQ_INT(e.status, 400);
        ASSERT_STREQ(e.code, "context_length_exceeded");
        ASSERT_TRUE(strstr(e.message, "(883 in your prompt; 0 for the completion)") != NULL);
        api_completion_req_free(&r); /* safe, holds nothing */
    }
    free(b);
}

TEST(max_tokens_resolution) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":\"abcd\",\"max_tokens\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 60); /* the rest of the 64-token context */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":[\"a\",\"abcdef\"],\"max_tokens\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 58); /* the longest prompt decides */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abcd\",\"max_tokens\":60}", &r, &e), 0); /* exactly full */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abcd\",\"max_tokens\":0,\"echo\":true}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 0);
    api_completion_req_free(&r);
    g_lim.max_tokens_cap = 8;
    ASSERT_EQ_INT(parse("{\"prompt\":\"abcd\",\"max_tokens\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 8);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abcd\",\"max_tokens\":9}", &r, &e), -1);
    ASSERT_STREQ(e.param, "max_tokens");
    ASSERT_TRUE(strstr(e.message, "at most 8") != NULL);
    g_lim.max_tokens_cap = 0;
    /* a prompt that fills the context leaves nothing for max_tokens: null */
    char body[200];
    snprintf(body, sizeof body, "{\"prompt\":\"%064d\",\"max_tokens\":null}", 0);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.code, "context_length_exceeded");
    ASSERT_STREQ(e.param, "prompt");
    /* limits are the server's: raise logprobs_max to the engine's 20 */
    g_lim.logprobs_max = 20;
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"logprobs\":20}", &r, &e), 0);
    api_completion_req_free(&r);
}

TEST(model_names) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    /* one model served: any name selects it (llama.vscode sends "", LangChain its own default) */
    const char *names[] = {"\"\"", "\"gpt-3.5-turbo-instruct\"", "\"fake-coder\"", "null"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char body[128];
        snprintf(body, sizeof body, "{\"model\":%s,\"prompt\":\"a\"}", names[i]);
        ASSERT_EQ_INT(parse(body, &r, &e), 0);
        ASSERT_TRUE(r.model == &g_am);
        api_completion_req_free(&r);
    }
    ASSERT_TRUE(api_find_model(&g_am, 1, "anything") == &g_am);
    /* --strict-model: only the id, an alias or general.name */
    static const char *const aliases[] = {"coder", "starcoder"};
    g_am.aliases = aliases;
    g_am.n_aliases = 2;
    g_am.strict_name = 1;
    ASSERT_TRUE(api_find_model(&g_am, 1, "fake-coder") == &g_am);
    ASSERT_TRUE(api_find_model(&g_am, 1, "starcoder") == &g_am);
    ASSERT_TRUE(api_find_model(&g_am, 1, "Fake Coder") == &g_am);
    ASSERT_TRUE(api_find_model(&g_am, 1, "") == NULL);
    ASSERT_TRUE(api_find_model(&g_am, 1, "fake") == NULL);
    ASSERT_EQ_INT(parse("{\"model\":\"coder\",\"prompt\":\"a\"}", &r, &e), 0);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"model\":\"gpt-4\",\"prompt\":\"a\"}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 404);
    ASSERT_STREQ(e.param, "model");
    ASSERT_STREQ(e.code, "model_not_found");
    ASSERT_TRUE(strstr(e.message, "The model 'gpt-4' does not exist") != NULL);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\"}", &r, &e), 0); /* absent: the served model, strict or not */
    api_completion_req_free(&r);
    /* several models served: strict whatever the flag */
    api_model two[2] = {g_am, g_am};
    two[0].strict_name = two[1].strict_name = 0;
    two[1].id = "other";
    two[1].n_aliases = 0;
    ASSERT_TRUE(api_find_model(two, 2, "other") == &two[1]);
    ASSERT_TRUE(api_find_model(two, 2, "gpt-4") == NULL);
    /* the model list shows the aliases */
    char *js = api_render_model(&g_am);
    json_t *j = json_loads(js, 0, NULL);
    free(js);
    ASSERT_EQ_INT(json_array_size(json_object_get(j, "aliases")), 2);
    ASSERT_STREQ(json_string_value(json_array_get(json_object_get(j, "aliases"), 1)), "starcoder");
    json_decref(j);
    g_am.aliases = NULL;
    g_am.n_aliases = 0;
    g_am.strict_name = 0;
}

TEST(context_clamp_and_strict) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    /* Continue asks for 4096 tokens: what the 64-token context leaves after the prompt */
    ASSERT_EQ_INT(parse("{\"prompt\":[1,2,3,4,5,6,7,8,9,10],\"max_tokens\":4096}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 54);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"01234567890123456789012345678901234567890123456789\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 14); /* the default 16, clamped */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"0123\",\"n_predict\":100}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 60);
    api_completion_req_free(&r);
    /* a prompt that alone fills the context is still an error */
    char body[200];
    snprintf(body, sizeof body, "{\"prompt\":\"%064d\",\"max_tokens\":1}", 0);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.code, "context_length_exceeded");
    ASSERT_STREQ(e.param, "prompt");
    snprintf(body, sizeof body, "{\"prompt\":\"%070d\",\"max_tokens\":0}", 0);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    /* --strict-context: OpenAI's 400 */
    g_lim.strict_context = 1;
    ASSERT_EQ_INT(parse("{\"prompt\":[1,2,3,4,5,6,7,8,9,10],\"max_tokens\":60}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "max_tokens");
    ASSERT_STREQ(e.code, "context_length_exceeded");
    ASSERT_STREQ(e.message, "This model's maximum context length is 64 tokens, however you requested 70 tokens (10 in "
                            "your prompt; 60 for the completion). Please reduce your prompt; or completion length.");
    ASSERT_EQ_INT(parse("{\"prompt\":\"01234567890123456789012345678901234567890123456789\"}", &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    ASSERT_TRUE(strstr(e.message, "you requested 66 tokens (50 in your prompt; 16 for the completion)") != NULL);
    ASSERT_EQ_INT(parse("{\"prompt\":\"0123\",\"max_tokens\":60}", &r, &e), 0); /* exactly full */
    api_completion_req_free(&r);
    g_lim.strict_context = 0;
}

TEST(n_predict) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"n_predict\":7}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 7);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"n_predict\":-1}", &r, &e), 0); /* llama.cpp: until the context is full */
    ASSERT_EQ_INT(r.max_tokens, 62);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"n_predict\":0}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 0);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"n_predict\":5,\"max_tokens\":null}", &r, &e), -1);
    ASSERT_STREQ(e.param, "n_predict");
    /* OpenAI's newer name, which Continue's fimStream sends */
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"max_completion_tokens\":6,\"n_predict\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 6);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"max_tokens\":6,\"max_completion_tokens\":6}", &r, &e), -1);
    ASSERT_STREQ(e.param, "max_completion_tokens");
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"max_completion_tokens\":-1}", &r, &e), -1);
    ASSERT_STREQ(e.param, "max_completion_tokens");
    g_lim.max_tokens_cap = 8;
    ASSERT_EQ_INT(parse("{\"prompt\":\"ab\",\"n_predict\":9}", &r, &e), -1);
    ASSERT_STREQ(e.param, "n_predict"); /* the error names the field the client sent */
    ASSERT_TRUE(strstr(e.message, "n_predict is too large: 9") != NULL);
    g_lim.max_tokens_cap = 0;
}

/* Tabby's agent: {language, segments: {prefix, suffix, filepath, git_url, declarations, ...}} */
TEST(tabby_segments) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    const char *body =
        "{\"language\":\"python\",\"segments\":{\"prefix\":\"ab\",\"suffix\":\"c\",\"filepath\":\"x.py\","
        "\"git_url\":\"https://example.invalid/r.git\",\"declarations\":[{\"filepath\":\"y.py\",\"text\":\"def y(): pass\"}],"
        "\"relevant_snippets_from_changed_files\":[],\"clipboard\":\"\"},\"temperature\":0.1,\"mode\":\"standard\"}";
    g_am.n_ctx = 256;
    ASSERT_EQ_INT(parse(body, &r, &e), 0);
    g_am.n_ctx = 64;
    int32_t want[] = {FAKE_FIM_PRE, 'a', 'b', FAKE_FIM_SUF, 'c', FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, want, 6));
    ASSERT_EQ_INT(r.tabby, 1);
    ASSERT_EQ_INT(r.has_suffix, 1);
    ASSERT_EQ_INT(r.max_tokens, 64); /* Tabby's default */
    ASSERT_STREQ(r.language, "python");
    ASSERT_STREQ(r.prompts[0].text, "ab");
    api_completion_req_free(&r);
    /* no suffix: FIM at the end of the file */
    ASSERT_EQ_INT(parse("{\"segments\":{\"prefix\":\"ab\"},\"max_tokens\":3}", &r, &e), 0);
    int32_t want2[] = {FAKE_FIM_PRE, 'a', 'b', FAKE_FIM_SUF, FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, want2, 5));
    ASSERT_EQ_INT(r.max_tokens, 3);
    api_completion_req_free(&r);
    /* "prompt" wins over segments */
    ASSERT_EQ_INT(parse("{\"prompt\":\"x\",\"segments\":{\"prefix\":\"ab\"}}", &r, &e), 0);
    ASSERT_EQ_INT(r.tabby, 0);
    ASSERT_EQ_INT(r.max_tokens, 16);
    api_completion_req_free(&r);
    /* a model without FIM tokens completes the prefix, unless there is a suffix to fill before */
    setup(0, 1, 0);
    ASSERT_EQ_INT(parse("{\"segments\":{\"prefix\":\"ab\",\"suffix\":\"\"}}", &r, &e), 0);
    int32_t want3[] = {'a', 'b'};
    ASSERT_TRUE(tokens_are(&r, 0, want3, 2));
    ASSERT_EQ_INT(r.has_suffix, 0);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"segments\":{\"prefix\":\"ab\",\"suffix\":\"c\"}}", &r, &e), -1);
    ASSERT_STREQ(e.param, "suffix");
}

static int parse_fim(const char *body, api_completion_req *r, api_error *e) {
    return api_parse_fim_completion(body, strlen(body), &g_am, &g_lim, r, e);
}

/* POST /v1/fim/completions: Mistral's / DeepSeek's request, answered in the chat shape */
TEST(fim_chat_shape) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse_fim("{\"model\":\"codestral-latest\",\"prompt\":\"ab\",\"suffix\":\"c\",\"max_tokens\":4,"
                            "\"stop\":[\"\\n\"],\"stream\":true,\"random_seed\":5,\"min_tokens\":0}", &r, &e), 0);
    int32_t want[] = {FAKE_FIM_PRE, 'a', 'b', FAKE_FIM_SUF, 'c', FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, want, 6));
    ASSERT_EQ_INT(r.shape, API_SHAPE_FIM_CHAT);
    ASSERT_EQ_INT(r.seed_set, 1);
    ASSERT_TRUE(r.seed == 5);
    ASSERT_EQ_INT(r.stop.n, 1);
    api_meta meta = {.id = "cmpl-x", .created = 1};
    api_choice c = {.index = 0, .text = "de", .text_len = 2, .finish = API_FINISH_NONE};
    const api_format *f = &api_format_fim; /* the route's renderers: the chat shapes */
    char *ev = f->chunk(&r, &meta, &c, 0);
    ASSERT_TRUE(ev && !strncmp(ev, "data: ", 6));
    json_t *j = json_loads(ev + 6, JSON_DISABLE_EOF_CHECK, NULL);
    free(ev);
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "chat.completion.chunk");
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(c0, "delta"), "content")), "de");
    ASSERT_TRUE(json_is_null(json_object_get(c0, "finish_reason")));
    ASSERT_TRUE(json_object_get(c0, "text") == NULL);
    json_decref(j);
    api_completion_req_free(&r);
    /* suffix defaults to "": FIM at the end of the file */
    ASSERT_EQ_INT(parse_fim("{\"prompt\":\"ab\",\"max_tokens\":2}", &r, &e), 0);
    int32_t want2[] = {FAKE_FIM_PRE, 'a', 'b', FAKE_FIM_SUF, FAKE_FIM_MID};
    ASSERT_TRUE(tokens_are(&r, 0, want2, 5));
    api_choice full = {.index = 0, .text = "x", .text_len = 1, .finish = API_FINISH_LENGTH};
    api_usage u = {.prompt_tokens = 5, .completion_tokens = 1};
    char *s = f->response(&r, &meta, &full, 1, &u, NULL);
    j = json_loads(s, 0, NULL);
    free(s);
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "chat.completion");
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(c0, "message"), "role")), "assistant");
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(c0, "message"), "content")), "x");
    ASSERT_STREQ(json_string_value(json_object_get(c0, "finish_reason")), "length");
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")), 6);
    json_decref(j);
    api_completion_req_free(&r);
    /* what the shape cannot carry, and Mistral's fields this server cannot honour, are 400s */
    static const struct { const char *body, *param; } bad[] = {
        {"{\"suffix\":\"c\"}", "prompt"},
        {"{\"prompt\":[1,2]}", "prompt"},
        {"{\"prompt\":\"a\",\"echo\":true}", "echo"},
        {"{\"prompt\":\"a\",\"logprobs\":1}", "logprobs"},
        {"{\"prompt\":\"a\",\"min_tokens\":3}", "min_tokens"},
        {"{\"prompt\":\"a\",\"seed\":1,\"random_seed\":2}", "random_seed"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        memset(&e, 0, sizeof e);
        CHECK_TRUE(parse_fim(bad[i].body, &r, &e) == -1);
        CHECK_TRUE(e.status == 400 && strcmp(e.param, bad[i].param) == 0);
        if (strcmp(e.param, bad[i].param)) fprintf(stderr, "  %s -> param '%s': %s\n", bad[i].body, e.param, e.message);
    }
    setup(0, 1, 0); /* no FIM tokens: the endpoint cannot serve it */
    ASSERT_EQ_INT(parse_fim("{\"prompt\":\"a\"}", &r, &e), -1);
    ASSERT_STREQ(e.param, "suffix");
}

/* POST /tokenize and /detokenize (llama.cpp's fields and defaults) */
TEST(tokenize_routes) {
    setup(1, 1, 1);
    api_error e;
    const char *b = "{\"content\":\"a<|endoftext|>\"}";
    char *s = api_tokenize(b, strlen(b), &g_am, &g_lim, &e);
    ASSERT_STREQ(s, "{\"tokens\":[97,256]}"); /* parse_special on, no BOS by default */
    free(s);
    b = "{\"content\":\"a<|endoftext|>\",\"add_special\":true,\"parse_special\":false}";
    s = api_tokenize(b, strlen(b), &g_am, &g_lim, &e);
    ASSERT_TRUE(s && !strncmp(s, "{\"tokens\":[260,97,60,124,", 25)); /* BOS, then the control string as bytes */
    free(s);
    /* pieces: text, or the bytes of a cut character as numbers */
    b = "{\"content\":\"a\\u00e9\",\"with_pieces\":true}";
    s = api_tokenize(b, strlen(b), &g_am, &g_lim, &e);
    ASSERT_STREQ(s, "{\"tokens\":[{\"id\":97,\"piece\":\"a\"},{\"id\":195,\"piece\":[195]},{\"id\":169,\"piece\":[169]}]}");
    free(s);
    b = "{\"tokens\":[97,261,256,262]}";
    s = api_detokenize(b, strlen(b), &g_am, &g_lim, &e);
    ASSERT_STREQ(s, "{\"content\":\"a world<|endoftext|>x\xef\xbf\xbd\"}"); /* control text shown; a cut character as U+FFFD */
    free(s);
    b = "{\"tokens\":[]}";
    s = api_detokenize(b, strlen(b), &g_am, &g_lim, &e);
    ASSERT_STREQ(s, "{\"content\":\"\"}");
    free(s);
    static const struct { const char *body; int tok; const char *param; } bad[] = {
        {"{}", 1, "content"}, {"{\"content\":5}", 1, "content"}, {"{\"content\":\"a\",\"with_pieces\":1}", 1, "with_pieces"},
        {"[1]", 1, ""}, {"{\"content\":", 1, ""}, {"{}", 0, "tokens"}, {"{\"tokens\":[300]}", 0, "tokens"},
        {"{\"tokens\":[-1]}", 0, "tokens"}, {"{\"tokens\":[\"a\"]}", 0, "tokens"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        memset(&e, 0, sizeof e);
        s = bad[i].tok ? api_tokenize(bad[i].body, strlen(bad[i].body), &g_am, &g_lim, &e)
                       : api_detokenize(bad[i].body, strlen(bad[i].body), &g_am, &g_lim, &e);
        CHECK_TRUE(s == NULL && e.status == 400 && strcmp(e.param, bad[i].param) == 0);
        free(s);
    }
    g_lim.max_body_bytes = 4;
    b = "{\"content\":\"a\"}";
    ASSERT_TRUE(api_tokenize(b, strlen(b), &g_am, &g_lim, &e) == NULL);
    ASSERT_EQ_INT(e.status, 413);
    api_limits_default(&g_lim);
}

TEST(sampling_per_choice) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":[\"a\",\"b\"],\"n\":2,\"seed\":100,\"temperature\":0.7,\"top_k\":5,"
                        "\"logit_bias\":{\"7\":1}}", &r, &e), 0);
    ASSERT_EQ_INT(api_completion_n_choices(&r), 4);
    cm_sampling s[4];
    for (int i = 0; i < 4; i++) api_completion_sampling(&r, i, &s[i]);
    for (int i = 0; i < 4; i++) {
        ASSERT_TRUE(s[i].seed == 100u + (uint64_t)i);
        ASSERT_NEAR(s[i].temperature, 0.7, 1e-7);
        ASSERT_EQ_INT(s[i].top_k, 5);
        ASSERT_EQ_INT(s[i].n_logit_bias, 1);
        ASSERT_TRUE(s[i].logit_bias == r.logit_bias);
    }
    /* the server picks the seed when none was given, then the same mapping applies */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"n\":2}", &r, &e), 0);
    ASSERT_EQ_INT(r.seed_set, 0);
    r.seed = 42;
    api_completion_sampling(&r, 1, &s[0]);
    ASSERT_TRUE(s[0].seed == 43);
    ASSERT_TRUE(s[0].logit_bias == NULL);
    api_completion_req_free(&r);
}

/* ============================================================ stop strings */

static api_stops make_stops(const char *const *s, int n) {
    api_stops st = {.n = n};
    for (int i = 0; i < n; i++) { st.s[i] = (char *)s[i]; st.len[i] = strlen(s[i]); }
    return st;
}

TEST(stop_basic) {
    const char *s1[] = {"\n\n", "END"};
    api_stops st = make_stops(s1, 2);
    size_t safe;
    /* nothing that could start a stop: all safe */
    ASSERT_EQ_INT(api_stop_scan(&st, "hello", 5, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 5);
    /* trailing "E" or "EN" or "\n" could begin a stop: held back */
    ASSERT_EQ_INT(api_stop_scan(&st, "helloEN", 7, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 5);
    ASSERT_EQ_INT(api_stop_scan(&st, "hello\n", 6, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 5);
    /* the held tail turns out not to be a stop: released */
    ASSERT_EQ_INT(api_stop_scan(&st, "helloENx", 8, 5, &safe), -1);
    ASSERT_EQ_INT(safe, 8);
    /* a match: cut at its start */
    ASSERT_EQ_INT(api_stop_scan(&st, "ab\n\ncd", 6, 0, &safe), 0);
    ASSERT_EQ_INT(safe, 2);
    ASSERT_EQ_INT(api_stop_scan(&st, "abENDcd\n\n", 9, 2, &safe), 1);
    ASSERT_EQ_INT(safe, 2);
    /* earliest match wins regardless of list order */
    ASSERT_EQ_INT(api_stop_scan(&st, "xEND\n\n", 6, 0, &safe), 1);
    ASSERT_EQ_INT(safe, 1);
    /* no stops at all */
    ASSERT_EQ_INT(api_stop_scan(NULL, "abc", 3, 1, &safe), -1);
    ASSERT_EQ_INT(safe, 3);
    api_stops none = {0};
    ASSERT_EQ_INT(api_stop_scan(&none, "abc", 3, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 3);
    /* emitted past the end is clamped */
    ASSERT_EQ_INT(api_stop_scan(&st, "abc", 3, 9, &safe), -1);
    ASSERT_EQ_INT(safe, 3);
}

TEST(stop_overlapping_prefixes) {
    /* "abcd" and "bcx": "abc" tail could be either; hold the longest candidate */
    const char *s1[] = {"abcd", "bcx"};
    api_stops st = make_stops(s1, 2);
    size_t safe;
    ASSERT_EQ_INT(api_stop_scan(&st, "zzabc", 5, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 2);
    ASSERT_EQ_INT(api_stop_scan(&st, "zzabcx", 6, 2, &safe), 1);
    ASSERT_EQ_INT(safe, 3);
    /* a stop that is a repeat of its own prefix: "aab" over "aaaab" */
    const char *s2[] = {"aab"};
    st = make_stops(s2, 1);
    ASSERT_EQ_INT(api_stop_scan(&st, "aaaa", 4, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 2);
    ASSERT_EQ_INT(api_stop_scan(&st, "aaaab", 5, 2, &safe), 0);
    ASSERT_EQ_INT(safe, 2);
    /* one stop a prefix of another: the shorter matches first */
    const char *s3[] = {"foobar", "foo"};
    st = make_stops(s3, 2);
    ASSERT_EQ_INT(api_stop_scan(&st, "xfoob", 5, 0, &safe), 1);
    ASSERT_EQ_INT(safe, 1);
}

/* Streams `text` token by token (pieces given by cuts), as the server does, and returns what a client
 * receives plus whether a stop matched. Checks that nothing sent is ever cut later. */
static int stream_through(const api_stops *st, const char *text, const size_t *cuts, int ncuts, char *got,
                          size_t *got_len) {
    size_t emitted = 0, len = 0;
    *got_len = 0;
    for (int i = 0; i <= ncuts; i++) {
        len = i < ncuts ? cuts[i] : strlen(text);
        size_t safe;
        int m = api_stop_scan(st, text, len, emitted, &safe);
        if (safe < emitted) return -2;
        memcpy(got + *got_len, text + emitted, safe - emitted);
        *got_len += safe - emitted;
        emitted = safe;
        if (m >= 0) return m;
    }
    /* generation ended for another reason: the held tail goes out */
    memcpy(got + *got_len, text + emitted, len - emitted);
    *got_len += len - emitted;
    return -1;
}

TEST(stop_streaming_spans_tokens) {
    const char *s1[] = {"</code>", "\n\n\n"};
    api_stops st = make_stops(s1, 2);
    const char *text = "x = 1</co" "de> tail";
    /* every way of cutting the text into two tokens gives the same client-visible result */
    for (size_t a = 0; a <= strlen(text); a++) {
        for (size_t b = a; b <= strlen(text); b++) {
            size_t cuts[2] = {a, b};
            char got[64];
            size_t n;
            int m = stream_through(&st, text, cuts, 2, got, &n);
            ASSERT_EQ_INT(m, 0);
            ASSERT_EQ_INT(n, 5);
            ASSERT_TRUE(memcmp(got, "x = 1", 5) == 0);
        }
    }
    /* no stop in the end: everything arrives, including a tail that looked like a stop */
    const char *t2 = "abc</co";
    size_t cuts[3] = {2, 4, 6};
    char got[64];
    size_t n;
    ASSERT_EQ_INT(stream_through(&st, t2, cuts, 3, got, &n), -1);
    ASSERT_EQ_INT(n, strlen(t2));
    ASSERT_TRUE(memcmp(got, t2, n) == 0);
}

TEST(stop_utf8) {
    /* stop strings and text in UTF-8: matches and holdback work on bytes but end on characters */
    const char *s1[] = {"\xc3\xa9t\xc3\xa9", "\xe2\x82\xac"}; /* "été", "€" */
    api_stops st = make_stops(s1, 2);
    size_t safe;
    const char *t = "caf\xc3\xa9"; /* "café": its "é" may begin "été" */
    ASSERT_EQ_INT(api_stop_scan(&st, t, strlen(t), 0, &safe), -1);
    ASSERT_EQ_INT(safe, 3);
    const char *t2 = "\xc3\xa9t\xc3\xa9!";
    ASSERT_EQ_INT(api_stop_scan(&st, t2, strlen(t2), 0, &safe), 0);
    ASSERT_EQ_INT(safe, 0);
    const char *t3 = "1\xe2\x82\xac";
    ASSERT_EQ_INT(api_stop_scan(&st, t3, strlen(t3), 0, &safe), 1);
    ASSERT_EQ_INT(safe, 1);
    /* an incomplete character at the end is never sent, stop or not */
    const char *s2[] = {"zz"};
    st = make_stops(s2, 1);
    const char *t4 = "ab\xe4\xb8"; /* first two bytes of a 3-byte character */
    ASSERT_EQ_INT(api_stop_scan(&st, t4, 4, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 2);
    const char *t5 = "ab\xe4\xb8\xad";
    ASSERT_EQ_INT(api_stop_scan(&st, t5, 5, 2, &safe), -1);
    ASSERT_EQ_INT(safe, 5);
    const char *t6 = "a\xf0\x9f\x98"; /* 3 of 4 bytes of an emoji */
    ASSERT_EQ_INT(api_stop_scan(&st, t6, 4, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 1);
    /* stray continuation bytes are not an incomplete character: they go out (as U+FFFD later) */
    const char *t7 = "a\x80";
    ASSERT_EQ_INT(api_stop_scan(&st, t7, 2, 0, &safe), -1);
    ASSERT_EQ_INT(safe, 2);
}

/* ============================================================ rendering */

static json_t *load(const char *s) {
    json_error_t je;
    json_t *j = json_loads(s, 0, &je);
    if (!j) fprintf(stderr, "bad JSON (%s): %s\n", je.text, s);
    return j;
}

TEST(render_completion_shape) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":[\"ab\",\"c\"],\"n\":1}", &r, &e), 0);
    api_choice ch[2] = {
        {.index = 0, .text = "xy\n", .text_len = 3, .finish = API_FINISH_STOP},
        {.index = 1, .text = "z", .text_len = 1, .finish = API_FINISH_LENGTH},
    };
    api_usage u = {.prompt_tokens = 3, .completion_tokens = 5, .cached_tokens = 1};
    api_meta meta = {.id = "cmpl-abc", .created = 1700000001};
    char *s = api_render_completion(&r, &meta, ch, 2, &u, NULL);
    json_t *j = load(s);
    free(s);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(j, "id")), "cmpl-abc");
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "text_completion");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "created")), 1700000001);
    ASSERT_STREQ(json_string_value(json_object_get(j, "model")), "fake-coder");
    ASSERT_TRUE(json_object_get(j, "system_fingerprint") == NULL);
    ASSERT_TRUE(json_object_get(j, "routing") == NULL);
    json_t *c = json_object_get(j, "choices");
    ASSERT_EQ_INT(json_array_size(c), 2);
    json_t *c0 = json_array_get(c, 0), *c1 = json_array_get(c, 1);
    ASSERT_STREQ(json_string_value(json_object_get(c0, "text")), "xy\n");
    ASSERT_EQ_INT(json_integer_value(json_object_get(c0, "index")), 0);
    ASSERT_TRUE(json_is_null(json_object_get(c0, "logprobs")));
    ASSERT_STREQ(json_string_value(json_object_get(c0, "finish_reason")), "stop");
    ASSERT_STREQ(json_string_value(json_object_get(c1, "finish_reason")), "length");
    ASSERT_EQ_INT(json_object_size(c0), 4);
    json_t *us = json_object_get(j, "usage");
    ASSERT_EQ_INT(json_integer_value(json_object_get(us, "prompt_tokens")), 3);
    ASSERT_EQ_INT(json_integer_value(json_object_get(us, "completion_tokens")), 5);
    ASSERT_EQ_INT(json_integer_value(json_object_get(us, "total_tokens")), 8);
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_object_get(us, "prompt_tokens_details"), "cached_tokens")), 1);
    json_decref(j);

    /* fingerprint and routing extension; invalid UTF-8 text is repaired, not dropped */
    json_t *routing = json_pack("{s:s}", "mode", "summary");
    meta.system_fingerprint = "fp_codemoe";
    ch[0].text = "ok\xff";
    s = api_render_completion(&r, &meta, ch, 1, &u, routing);
    j = load(s);
    free(s);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(j, "system_fingerprint")), "fp_codemoe");
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(j, "routing"), "mode")), "summary");
    ASSERT_STREQ(json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text")),
                 "ok\xef\xbf\xbd");
    ASSERT_EQ_INT(routing->refcount, 1); /* borrowed, not stolen */
    json_decref(routing);
    json_decref(j);
    api_completion_req_free(&r);
}

TEST(render_logprobs) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":\"hi\",\"logprobs\":2,\"echo\":true}", &r, &e), 0);
    cm_token_logprob top1[3] = {{FAKE_WORLD, -0.25f}, {'a', -1.5f}, {'b', -2.0f}};
    cm_token_logprob top2[2] = {{0xe4, -0.5f}, {FAKE_EOS, -1.0f}};
    api_token_lp lp[4] = {
        {.token = 'h', .logprob = NAN},            /* first prompt token: null */
        {.token = 'i', .logprob = -3.0f, .top = top1, .n_top = 3},
        {.token = FAKE_WORLD, .logprob = -0.25f, .top = top1, .n_top = 3},
        {.token = 0xe4, .logprob = -INFINITY, .top = top2, .n_top = 2},
    };
    api_choice ch = {.index = 0, .text = "hi world", .text_len = 8, .finish = API_FINISH_LENGTH, .lp = lp,
                     .n_lp = 4, .text_offset = 0};
    api_usage u = {.prompt_tokens = 2, .completion_tokens = 2};
    api_meta meta = {.id = "cmpl-x", .created = 1};
    char *s = api_render_completion(&r, &meta, &ch, 1, &u, NULL);
    json_t *j = load(s);
    free(s);
    ASSERT_TRUE(j);
    json_t *l = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
    ASSERT_TRUE(json_is_object(l));
    json_t *tok = json_object_get(l, "tokens"), *tlp = json_object_get(l, "token_logprobs");
    json_t *top = json_object_get(l, "top_logprobs"), *off = json_object_get(l, "text_offset");
    ASSERT_EQ_INT(json_array_size(tok), 4);
    ASSERT_STREQ(json_string_value(json_array_get(tok, 0)), "h");
    ASSERT_STREQ(json_string_value(json_array_get(tok, 2)), " world");
    ASSERT_STREQ(json_string_value(json_array_get(tok, 3)), "bytes:\\xe4"); /* OpenAI's form for partial bytes */
    ASSERT_TRUE(json_is_null(json_array_get(tlp, 0)));
    ASSERT_NEAR(json_real_value(json_array_get(tlp, 1)), -3.0, 1e-6);
    ASSERT_TRUE(json_is_null(json_array_get(tlp, 3))); /* non-finite: null, JSON has no -inf */
    ASSERT_TRUE(json_is_null(json_array_get(top, 0)));
    json_t *t1 = json_array_get(top, 1);
    ASSERT_EQ_INT(json_object_size(t1), 2); /* capped at logprobs=2 though 3 were given */
    ASSERT_NEAR(json_real_value(json_object_get(t1, " world")), -0.25, 1e-6);
    ASSERT_NEAR(json_real_value(json_object_get(t1, "a")), -1.5, 1e-6);
    json_t *t3 = json_array_get(top, 3);
    ASSERT_NEAR(json_real_value(json_object_get(t3, "<|endoftext|>")), -1.0, 1e-6);
    ASSERT_EQ_INT(json_integer_value(json_array_get(off, 0)), 0);
    ASSERT_EQ_INT(json_integer_value(json_array_get(off, 1)), 1);
    ASSERT_EQ_INT(json_integer_value(json_array_get(off, 2)), 2);
    ASSERT_EQ_INT(json_integer_value(json_array_get(off, 3)), 8);
    json_decref(j);
    /* without echo the first completion token sits after the prompt's characters */
    ASSERT_EQ_INT(api_prompt_chars(&r, 0), 2);
    ASSERT_EQ_INT(api_prompt_chars(&r, 5), 0);
    api_completion_req_free(&r);
    /* logprobs 0: token and its logprob, empty alternatives */
    ASSERT_EQ_INT(parse("{\"prompt\":\"h\\u00e9\",\"logprobs\":0}", &r, &e), 0);
    ASSERT_EQ_INT(api_prompt_chars(&r, 0), 2);
    ch.lp = lp + 2;
    ch.n_lp = 1;
    ch.text_offset = api_prompt_chars(&r, 0);
    s = api_render_completion(&r, &meta, &ch, 1, &u, NULL);
    j = load(s);
    free(s);
    l = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
    ASSERT_EQ_INT(json_object_size(json_array_get(json_object_get(l, "top_logprobs"), 0)), 0);
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_object_get(l, "text_offset"), 0)), 2);
    json_decref(j);
    api_completion_req_free(&r);
}

TEST(render_chunks) {
    setup(1, 1, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"stream\":true,\"stream_options\":{\"include_usage\":true},\"n\":2}", &r, &e), 0);
    api_meta meta = {.id = "cmpl-s", .created = 5};
    api_choice d = {.index = 1, .text = "pi", .text_len = 2};
    char *s = api_render_chunk(&r, &meta, &d);
    ASSERT_TRUE(strncmp(s, "data: ", 6) == 0);
    size_t n = strlen(s);
    ASSERT_TRUE(strcmp(s + n - 2, "\n\n") == 0);
    ASSERT_TRUE(memchr(s, '\n', n - 2) == NULL);
    json_t *j = load(s + 6);
    free(s);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "text_completion");
    ASSERT_STREQ(json_string_value(json_object_get(j, "id")), "cmpl-s");
    ASSERT_TRUE(json_is_null(json_object_get(j, "usage")));
    json_t *c = json_array_get(json_object_get(j, "choices"), 0);
    ASSERT_EQ_INT(json_array_size(json_object_get(j, "choices")), 1);
    ASSERT_STREQ(json_string_value(json_object_get(c, "text")), "pi");
    ASSERT_EQ_INT(json_integer_value(json_object_get(c, "index")), 1);
    ASSERT_TRUE(json_is_null(json_object_get(c, "finish_reason")));
    ASSERT_TRUE(json_is_null(json_object_get(c, "logprobs")));
    json_decref(j);
    /* the last delta of a choice carries finish_reason; text may be empty */
    d.text = "";
    d.text_len = 0;
    d.finish = API_FINISH_STOP;
    s = api_render_chunk(&r, &meta, &d);
    j = load(s + 6);
    free(s);
    c = json_array_get(json_object_get(j, "choices"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(c, "finish_reason")), "stop");
    ASSERT_STREQ(json_string_value(json_object_get(c, "text")), "");
    json_decref(j);
    /* the usage event: no choices */
    api_usage u = {.prompt_tokens = 1, .completion_tokens = 7};
    s = api_render_usage_chunk(&r, &meta, &u, NULL);
    ASSERT_TRUE(strncmp(s, "data: ", 6) == 0);
    j = load(s + 6);
    free(s);
    ASSERT_EQ_INT(json_array_size(json_object_get(j, "choices")), 0);
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")), 8);
    json_decref(j);
    api_completion_req_free(&r);
    /* without include_usage the chunks have no usage key at all (as OpenAI) */
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"stream\":true,\"logprobs\":1}", &r, &e), 0);
    cm_token_logprob top[1] = {{'p', -0.1f}};
    api_token_lp lp[1] = {{.token = 'p', .logprob = -0.1f, .top = top, .n_top = 1}};
    d = (api_choice){.index = 0, .text = "p", .text_len = 1, .lp = lp, .n_lp = 1, .text_offset = 7};
    s = api_render_chunk(&r, &meta, &d);
    j = load(s + 6);
    free(s);
    ASSERT_TRUE(json_object_get(j, "usage") == NULL);
    json_t *l = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
    ASSERT_STREQ(json_string_value(json_array_get(json_object_get(l, "tokens"), 0)), "p");
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_object_get(l, "text_offset"), 0)), 7);
    json_decref(j);
    api_completion_req_free(&r);
}

static const char *const mole_names[] = {"python", "rust", "shared", "other"};

/* A hybrid (6 token experts, top-2, shared 5, 4 segment experts of window 8), a sparse MoE (128 experts,
 * top-8, as Qwen3-Coder-30B-A3B) or a MoLE model (python, rust, shared, other) on the fake vocabulary,
 * as g_model. */
static void setup_moe(int kind) {
    fake_model_free(g_model);
    static cm_moe_info hyb = {.kind = CM_MOE_KIND_HYBRID, .n_experts = 6, .top_k = 2, .shared_expert = 5,
                              .n_seg_experts = 4, .window = 8, .segment_mode_default = CM_SEGMENT_CAUSAL,
                              .shared_adapter = -1, .fallback_adapter = -1};
    static cm_moe_info mole = {.kind = CM_MOE_KIND_MOLE, .shared_expert = -1, .n_adapters = 4,
                               .shared_adapter = 2, .fallback_adapter = 3};
    static cm_moe_info sparse = {.kind = CM_MOE_KIND_SPARSE, .n_experts = 128, .top_k = 8, .shared_expert = -1,
                                 .shared_adapter = -1, .fallback_adapter = -1};
    fake_model_opts o = {.fim = 1, .bos = 1, .eos = 1,
                         .moe = kind == CM_MOE_KIND_HYBRID ? &hyb : kind == CM_MOE_KIND_SPARSE ? &sparse : &mole,
                         .adapters = mole_names};
    g_model = fake_model_create(&o, "Fake MoE");
    g_am = (api_model){.model = g_model, .id = "fake-moe", .created = 1700000000, .n_ctx = 64, .n_batch = 16};
    api_limits_default(&g_lim);
}

/* Dense models have no "moe" object; hybrid, sparse and MoLE models describe their experts with typed fields. */
TEST(render_models) {
    setup(1, 1, 0);
    char *s = api_render_models(&g_am, 1);
    json_t *j = load(s);
    free(s);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "list");
    json_t *d = json_object_get(j, "data");
    ASSERT_EQ_INT(json_array_size(d), 1);
    json_t *m0 = json_array_get(d, 0);
    ASSERT_STREQ(json_string_value(json_object_get(m0, "id")), "fake-coder");
    ASSERT_STREQ(json_string_value(json_object_get(m0, "object")), "model");
    ASSERT_EQ_INT(json_integer_value(json_object_get(m0, "created")), 1700000000);
    ASSERT_STREQ(json_string_value(json_object_get(m0, "owned_by")), "codemoe");
    ASSERT_STREQ(json_string_value(json_object_get(m0, "architecture")), "qwen2");
    ASSERT_EQ_INT(json_integer_value(json_object_get(m0, "context_length")), 64);
    ASSERT_EQ_INT(json_integer_value(json_object_get(m0, "n_vocab")), FAKE_VOCAB);
    ASSERT_TRUE(json_is_true(json_object_get(m0, "fim")));
    ASSERT_TRUE(json_object_get(m0, "moe") == NULL);
    json_decref(j);

    setup_moe(CM_MOE_KIND_HYBRID);
    s = api_render_model(&g_am);
    j = load(s);
    free(s);
    ASSERT_STREQ(json_string_value(json_object_get(j, "id")), "fake-moe");
    json_t *moe = json_object_get(j, "moe");
    ASSERT_STREQ(json_string_value(json_object_get(moe, "kind")), "hybrid");
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "experts")), 6);
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "top_k")), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "shared_expert")), 5);
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "segment_experts")), 4);
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "window")), 8);
    ASSERT_STREQ(json_string_value(json_object_get(moe, "segment_routing_default")), "causal");
    ASSERT_STREQ(json_string_value(json_object_get(moe, "segment_route")), "prefix");
    ASSERT_TRUE(json_object_get(moe, "adapters") == NULL);
    json_decref(j);

    setup_moe(CM_MOE_KIND_SPARSE);
    s = api_render_model(&g_am);
    j = load(s);
    free(s);
    moe = json_object_get(j, "moe");
    ASSERT_STREQ(json_string_value(json_object_get(moe, "kind")), "sparse");
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "experts")), 128);
    ASSERT_EQ_INT(json_integer_value(json_object_get(moe, "top_k")), 8);
    ASSERT_EQ_INT(json_object_size(moe), 3); /* no shared expert, segment or adapter fields */
    json_decref(j);

    setup_moe(CM_MOE_KIND_MOLE);
    s = api_render_model(&g_am);
    j = load(s);
    free(s);
    moe = json_object_get(j, "moe");
    ASSERT_STREQ(json_string_value(json_object_get(moe, "kind")), "mole");
    json_t *ad = json_object_get(moe, "adapters"), *langs = json_object_get(moe, "languages");
    ASSERT_EQ_INT(json_array_size(ad), 4);
    ASSERT_STREQ(json_string_value(json_array_get(ad, 2)), "shared");
    ASSERT_EQ_INT(json_array_size(langs), 2); /* shared and fallback are not languages */
    ASSERT_STREQ(json_string_value(json_array_get(langs, 0)), "python");
    ASSERT_STREQ(json_string_value(json_array_get(langs, 1)), "rust");
    ASSERT_TRUE(json_object_get(moe, "experts") == NULL);
    json_decref(j);
}

/* ============================================================ engine options and MoE request rules */

/* Every prompt carries the engine options its sequences run with; the MoLE language is resolved (and
 * an unknown one refused) when the body is parsed. */
TEST(seq_options_resolved) {
    api_completion_req r;
    api_error e;
    setup(1, 1, 0);
    ASSERT_EQ_INT(parse("{\"prompt\":[\"a\",\"b\"],\"language\":\"cobol\"}", &r, &e), 0); /* dense: ignored */
    ASSERT_EQ_INT(r.n_prompts, 2);
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ_INT(r.prompts[i].opts.segment_mode, CM_SEGMENT_CAUSAL);
        ASSERT_EQ_INT(r.prompts[i].opts.adapter_routing, CM_ADAPTERS_AUTO);
        ASSERT_EQ_INT(r.prompts[i].opts.language, -1);
    }
    api_completion_req_free(&r);

    setup_moe(CM_MOE_KIND_MOLE);
    ASSERT_EQ_INT(parse("{\"prompt\":[\"a\",\"b\"],\"language\":\"rust\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].opts.language, 1);
    ASSERT_EQ_INT(r.prompts[1].opts.language, 1);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].opts.language, -1); /* no field: the fence tracker decides */
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"a\",\"language\":\"cobol\"}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "language");
    ASSERT_TRUE(strstr(e.message, "'cobol'") != NULL);

    setup_moe(CM_MOE_KIND_HYBRID);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abc\",\"max_tokens\":0,\"segment_routing\":\"reference\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].opts.segment_mode, CM_SEGMENT_REFERENCE);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abc\",\"segment_routing\":\"causal\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].opts.segment_mode, CM_SEGMENT_CAUSAL); /* never the model's own default */
    api_completion_req_free(&r);
}

/* Reference segment routing scores a complete text in one forward pass: max_tokens 0 and every prompt
 * within the server's batch, checked at parse time, on hybrid models only. */
TEST(reference_segments_rule) {
    api_completion_req r;
    api_error e;
    setup_moe(CM_MOE_KIND_HYBRID); /* n_batch 16 */
    const char *bad[] = {
        "{\"prompt\":\"abc\",\"segment_routing\":\"reference\"}",                  /* max_tokens 16 */
        "{\"prompt\":\"abc\",\"max_tokens\":null,\"segment_routing\":\"reference\"}",
        "{\"prompt\":\"0123456789abcdefg\",\"max_tokens\":0,\"segment_routing\":\"reference\"}", /* 17 */
        "{\"prompt\":[\"a\",\"0123456789abcdefg\"],\"max_tokens\":0,\"segment_routing\":\"reference\"}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ASSERT_EQ_INT(parse(bad[i], &r, &e), -1);
        ASSERT_EQ_INT(e.status, 400);
        ASSERT_STREQ(e.param, "segment_routing");
        ASSERT_TRUE(strstr(e.message, "at most 16 tokens") != NULL);
    }
    ASSERT_EQ_INT(parse("{\"prompt\":\"0123456789abcdef\",\"max_tokens\":0,\"segment_routing\":\"reference\"}", &r, &e), 0);
    api_completion_req_free(&r);
    /* causal has no such rule, and dense models ignore the field */
    ASSERT_EQ_INT(parse("{\"prompt\":\"0123456789abcdefg\",\"segment_routing\":\"causal\"}", &r, &e), 0);
    api_completion_req_free(&r);
    setup_moe(CM_MOE_KIND_MOLE);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abc\",\"segment_routing\":\"reference\"}", &r, &e), 0);
    api_completion_req_free(&r);
    setup(1, 1, 0);
    ASSERT_EQ_INT(parse("{\"prompt\":\"abc\",\"segment_routing\":\"reference\"}", &r, &e), 0);
    api_completion_req_free(&r);
}

/* ============================================================ routing statistics */

static const api_routing_info rinfo = {.id = "cmpl-x", .created = 1700000001, .model = "fake-moe",
                                       .prompt_tokens = 5, .completion_tokens = 2, .full = 1};

/* A dense model's record: the identity and "layers": [], nothing else. */
TEST(routing_json_dense) {
    setup(1, 1, 0);
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, NULL), 0);
    ASSERT_EQ_INT(a.has, 0);
    json_t *j = api_routing_json(&a, g_model, &rinfo);
    ASSERT_TRUE(j);
    ASSERT_EQ_INT(json_object_size(j), 7);
    ASSERT_STREQ(json_string_value(json_object_get(j, "id")), "cmpl-x");
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "completion.routing");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "created")), 1700000001);
    ASSERT_STREQ(json_string_value(json_object_get(j, "model")), "fake-moe");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "prompt_tokens")), 5);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "completion_tokens")), 2);
    ASSERT_TRUE(json_is_array(json_object_get(j, "layers")));
    ASSERT_EQ_INT(json_array_size(json_object_get(j, "layers")), 0);
    json_decref(j);
    api_route_agg_free(&a);
}

/* Two sequences' reports of a 2-layer hybrid (3 token experts, shared 0, 2 segment experts, 3 windows)
 * sum into one record: counts, mean gates, the shared expert, and segment windows in "full" mode only;
 * a report of another shape is refused. */
TEST(routing_json_hybrid) {
    setup_moe(CM_MOE_KIND_HYBRID);
    cm_route_count tok[2 * 3] = {{{1, 2}, {0.5, 1.0}}}, seg[2 * 2] = {{{0, 0}, {0, 0}}, {{4, 0}, {2.0, 0}}};
    uint32_t win[2 * 2 * 3] = {0};
    win[3 * 1 + 0] = 4; /* layer 0, segment expert 1, window 0 */
    tok[3 * 1 + 2] = (cm_route_count){{3, 1}, {1.5, 0.25}}; /* layer 1, expert 2 */
    cm_routing r = {.n_layer = 2, .n_tok_experts = 3, .shared_expert = 0, .n_seg_experts = 2, .window = 8,
                    .n_windows = 3, .n_adapters = 0, .tok = tok, .seg = seg, .seg_windows = win, .adapter = NULL};
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    cm_routing other = r;
    other.n_tok_experts = 4;
    ASSERT_EQ_INT(api_route_agg_add(&a, &other), -1);
    json_t *j = api_routing_json(&a, g_model, &rinfo);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "n_layer")), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "token_experts")), 3);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "shared_expert")), 0);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "segment_experts")), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "window")), 8);
    ASSERT_TRUE(json_object_get(j, "adapters") == NULL);
    json_t *layers = json_object_get(j, "layers");
    ASSERT_EQ_INT(json_array_size(layers), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_array_get(layers, 1), "layer")), 1);
    json_t *e = json_array_get(json_object_get(json_array_get(layers, 1), "token"), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "expert")), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "prompt_tokens")), 6);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "generated_tokens")), 2);
    ASSERT_NEAR(json_real_value(json_object_get(e, "prompt_mean_gate")), 0.5, 1e-12);
    ASSERT_NEAR(json_real_value(json_object_get(e, "generated_mean_gate")), 0.25, 1e-12);
    e = json_array_get(json_object_get(json_array_get(layers, 0), "token"), 0);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "prompt_tokens")), 2);
    ASSERT_NEAR(json_real_value(json_object_get(e, "generated_mean_gate")), 0.5, 1e-12);
    e = json_array_get(json_object_get(json_array_get(layers, 0), "segment"), 1);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "prompt_tokens")), 8);
    ASSERT_NEAR(json_real_value(json_object_get(e, "prompt_mean_gate")), 0.5, 1e-12);
    ASSERT_NEAR(json_real_value(json_object_get(e, "generated_mean_gate")), 0.0, 0); /* no tokens: 0 */
    json_t *w = json_object_get(json_array_get(layers, 0), "segment_windows");
    ASSERT_EQ_INT(json_array_size(w), 2);
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_array_get(w, 1), 0)), 8);
    ASSERT_EQ_INT(json_array_size(json_array_get(w, 1)), 1); /* trailing empty windows dropped */
    ASSERT_EQ_INT(json_array_size(json_array_get(w, 0)), 0);
    json_decref(j);
    api_routing_info summary = rinfo;
    summary.full = 0;
    j = api_routing_json(&a, g_model, &summary);
    ASSERT_TRUE(json_object_get(json_array_get(json_object_get(j, "layers"), 0), "segment_windows") == NULL);
    ASSERT_TRUE(json_object_get(json_array_get(json_object_get(j, "layers"), 0), "segment") != NULL);
    json_decref(j);
    api_route_agg cp = {0};
    ASSERT_EQ_INT(api_route_agg_copy(&cp, &a), 0);
    ASSERT_EQ_INT(cp.tok[3 * 1 + 2].tokens[0], 6);
    ASSERT_TRUE(cp.tok != a.tok);
    api_route_agg_free(&cp);
    api_route_agg_free(&a);
    ASSERT_EQ_INT(a.has, 0);
}

/* A sparse MoE's record (Qwen3-Coder-30B-A3B's shape: 128 experts, top-8, one layer here): every expert's
 * token counts, shared_expert -1, no segment level. */
TEST(routing_json_sparse) {
    setup_moe(CM_MOE_KIND_SPARSE);
    cm_route_count tok[128] = {{{0, 0}, {0, 0}}};
    tok[127] = (cm_route_count){{5, 2}, {2.5, 0.5}};
    cm_routing r = {.n_layer = 1, .n_tok_experts = 128, .shared_expert = -1, .tok = tok};
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    json_t *j = api_routing_json(&a, g_model, &rinfo);
    ASSERT_TRUE(j);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "token_experts")), 128);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "shared_expert")), -1);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "segment_experts")), 0);
    json_t *l0 = json_array_get(json_object_get(j, "layers"), 0);
    ASSERT_TRUE(json_object_get(l0, "segment") == NULL);
    json_t *t = json_object_get(l0, "token");
    ASSERT_EQ_INT(json_array_size(t), 128);
    json_t *e = json_array_get(t, 127);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "expert")), 127);
    ASSERT_EQ_INT(json_integer_value(json_object_get(e, "prompt_tokens")), 5);
    ASSERT_NEAR(json_real_value(json_object_get(e, "generated_mean_gate")), 0.25, 1e-12);
    json_decref(j);
    api_route_agg_free(&a);
}

/* "routing": "tokens": a sequence's per-token detail becomes one object per position (token text, its
 * experts and gates per layer up to the first unused slot, segment experts); one copy per record, not
 * carried by api_route_agg_copy, and only rendered when asked for. */
TEST(routing_json_tokens) {
    setup_moe(CM_MOE_KIND_HYBRID);
    cm_route_count tok[2 * 3] = {{{0, 0}, {0, 0}}};
    cm_routing r = {.n_layer = 2, .n_tok_experts = 3, .shared_expert = 0, .n_seg_experts = 2, .window = 8, .tok = tok};
    /* 2 positions, 2 layers, k_tok 2, k_seg 2 (the second slot unused) */
    int32_t ids[2] = {'a', 'b'};
    int8_t gen[2] = {0, 1};
    int16_t te[2 * 2 * 2] = {2, 0, 1, 0, 1, 0, 2, 0}, se[2 * 2 * 2] = {1, -1, 0, -1, 0, 1, 1, -1};
    float tg[8] = {0.75f, 0.25f, 0.5f, 0.5f, 0.6f, 0.4f, 0.9f, 0.1f}, sg[8] = {0.125f, 0, 0.25f, 0, 0.5f, 0.25f, 1, 0};
    cm_route_tokens t = {.n_tokens = 2, .n_dropped = 3, .n_layer = 2, .k_tok = 2, .k_seg = 2, .shared_expert = 0,
                         .window = 8, .token = ids, .generated = gen, .tok_expert = te, .tok_gate = tg,
                         .seg_expert = se, .seg_gate = sg};
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    ASSERT_EQ_INT(api_route_agg_add_tokens(&a, NULL), 0);
    ASSERT_EQ_INT(api_route_agg_add_tokens(&a, &t), 0);
    ASSERT_EQ_INT(api_route_agg_add_tokens(&a, &t), -1); /* one sequence's detail per record */
    te[0] = 1;                                              /* the record holds a copy */
    api_routing_info info = rinfo;
    info.tokens = 1;
    json_t *j = api_routing_json(&a, g_model, &info);
    ASSERT_TRUE(j);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "tokens_dropped")), 3);
    json_t *arr = json_object_get(j, "tokens");
    ASSERT_EQ_INT(json_array_size(arr), 2);
    json_t *p0 = json_array_get(arr, 0), *p1 = json_array_get(arr, 1);
    ASSERT_EQ_INT(json_integer_value(json_object_get(p1, "position")), 1);
    ASSERT_EQ_INT(json_integer_value(json_object_get(p0, "id")), 'a');
    ASSERT_STREQ(json_string_value(json_object_get(p0, "text")), "a");
    ASSERT_TRUE(json_is_false(json_object_get(p0, "generated")));
    ASSERT_TRUE(json_is_true(json_object_get(p1, "generated")));
    json_t *ex = json_object_get(p0, "experts");
    ASSERT_EQ_INT(json_array_size(ex), 2);
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_array_get(ex, 0), 0)), 2);
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_array_get(ex, 1), 0)), 1);
    ASSERT_NEAR(json_real_value(json_array_get(json_array_get(json_object_get(p0, "gates"), 0), 0)), 0.75, 1e-7);
    json_t *s0 = json_object_get(p0, "segment_experts"), *s1 = json_object_get(p1, "segment_experts");
    ASSERT_EQ_INT(json_array_size(json_array_get(s0, 0)), 1); /* the unused slot is left out */
    ASSERT_EQ_INT(json_array_size(json_array_get(s1, 0)), 2);
    ASSERT_NEAR(json_real_value(json_array_get(json_array_get(json_object_get(p1, "segment_gates"), 1), 0)), 1.0, 1e-7);
    ASSERT_TRUE(json_object_get(p0, "adapters") == NULL);
    json_decref(j);
    j = api_routing_json(&a, g_model, &rinfo); /* not asked for: not rendered */
    ASSERT_TRUE(json_object_get(j, "tokens") == NULL);
    json_decref(j);
    api_route_agg cp = {0};
    ASSERT_EQ_INT(api_route_agg_copy(&cp, &a), 0);
    ASSERT_TRUE(cp.tokens == NULL);
    api_route_agg_free(&cp);
    api_route_agg_free(&a);
    ASSERT_TRUE(a.tokens == NULL);
}

/* A MoLE report: no layers of experts, tokens per adapter with the adapters' names from the model. */
TEST(routing_json_mole) {
    setup_moe(CM_MOE_KIND_MOLE);
    cm_route_count ad[4] = {{{3, 1}, {3.0, 1.0}}, {{0, 0}, {0, 0}}, {{3, 1}, {6.0, 2.0}}, {{2, 0}, {1.0, 0}}};
    cm_routing r = {.n_layer = 2, .shared_expert = -1, .n_adapters = 4, .adapter = ad};
    api_route_agg a = {0};
    ASSERT_EQ_INT(api_route_agg_add(&a, &r), 0);
    json_t *j = api_routing_json(&a, g_model, &rinfo);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "token_experts")), 0);
    json_t *l0 = json_array_get(json_object_get(j, "layers"), 0);
    ASSERT_TRUE(json_object_get(l0, "token") == NULL && json_object_get(l0, "segment") == NULL);
    json_t *ads = json_object_get(j, "adapters");
    ASSERT_EQ_INT(json_array_size(ads), 4);
    json_t *x = json_array_get(ads, 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(x, "adapter")), 2);
    ASSERT_STREQ(json_string_value(json_object_get(x, "name")), "shared");
    ASSERT_EQ_INT(json_integer_value(json_object_get(x, "prompt_tokens")), 3);
    ASSERT_EQ_INT(json_integer_value(json_object_get(x, "generated_tokens")), 1);
    ASSERT_NEAR(json_real_value(json_object_get(x, "prompt_mean_gate")), 2.0, 1e-12);
    ASSERT_STREQ(json_string_value(json_object_get(json_array_get(ads, 3), "name")), "other");
    json_decref(j);
    api_route_agg_free(&a);
}

/* ============================================================ robustness */

static uint64_t rng_state = 0x1234567;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

/* Random byte edits, splices and token swaps of valid bodies: parse never crashes or leaks (ASan), and
 * whatever it accepts is a well-formed request that renders. */
TEST(fuzz_mutations) {
    setup(1, 1, 1);
    g_am.n_ctx = 4096;
    static const char *seeds[] = {
        "{\"model\":\"fake-coder\",\"prompt\":\"def f(x):\",\"max_tokens\":8,\"temperature\":0.2,\"stop\":[\"\\n\\n\"]}",
        "{\"prompt\":[\"a\",\"b\"],\"n\":2,\"logprobs\":3,\"echo\":true,\"logit_bias\":{\"5\":-100},\"seed\":1}",
        "{\"prompt\":[[1,2,3],[4]],\"suffix\":\"}\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
        "{\"prompt\":[10,20,30],\"top_k\":3,\"min_p\":0.1,\"routing\":\"full\",\"segment_routing\":\"reference\"}",
    };
    static const char *frags[] = {"null", "true", "-1", "1e400", "[]", "{}", "\"\"", "\"\\u0000\"", "[[]]", ",",
                                  ":", "\"prompt\"", "99999999999999999999", "0.5", "\"\\ud800\"", "[1,"};
    char buf[1024];
    int accepted = 0;
    for (int it = 0; it < 30000; it++) {
        const char *sd = seeds[rnd() % 4];
        size_t n = strlen(sd);
        memcpy(buf, sd, n);
        int edits = 1 + (int)(rnd() % 4);
        for (int k = 0; k < edits; k++) {
            size_t pos = n ? rnd() % n : 0;
            switch (rnd() % 4) {
            case 0: buf[pos] = (char)(rnd() & 0xff); break;                       /* flip a byte */
            case 1: if (n > 1) { memmove(buf + pos, buf + pos + 1, n - pos - 1); n--; } break; /* delete */
            case 2: {                                                               /* insert a fragment */
                const char *f = frags[rnd() % (sizeof frags / sizeof *frags)];
                size_t fl = strlen(f);
                if (n + fl < sizeof buf) { memmove(buf + pos + fl, buf + pos, n - pos); memcpy(buf + pos, f, fl); n += fl; }
                break;
            }
            default: n = pos; break;                                                /* truncate */
            }
        }
        api_completion_req r;
        api_error e;
        int rc = api_parse_completion(buf, n, &g_am, &g_lim, &r, &e);
        if (rc == 0) {
            accepted++;
            CHECK_TRUE(r.n_prompts >= 1 && r.n >= 1 && r.max_tokens >= 0);
            for (int p = 0; p < r.n_prompts; p++) CHECK_TRUE(r.prompts[p].n_tokens >= 1);
            api_choice ch = {.index = 0, .text = buf, .text_len = n, .finish = API_FINISH_STOP};
            api_usage u = {0};
            api_meta meta = {.id = "cmpl-f", .created = 0};
            char *s = api_render_completion(&r, &meta, &ch, 1, &u, NULL);
            CHECK_TRUE(s != NULL);
            free(s);
            api_completion_req_free(&r);
        } else {
            CHECK_TRUE(e.status == 400 || e.status == 404 || e.status == 413);
            char *s = api_error_json(&e);
            CHECK_TRUE(s != NULL);
            free(s);
        }
    }
    CHECK_TRUE(accepted > 100); /* the mutations must also exercise the success path */
    fprintf(stderr, "  fuzz: %d of 30000 mutated bodies accepted\n", accepted);
}

int main(void) {
    RUN(request_model_name);
    RUN(error_json_shape);
    RUN(error_http_defaults);
    RUN(sse_framing);
    RUN(make_id_format);
    RUN(parse_defaults);
    RUN(parse_all_fields);
    RUN(prompt_forms);
    RUN(prompt_default_and_empty);
    RUN(prompt_special_tokens);
    RUN(fim_suffix);
    RUN(fim_tokens_shared_with_requests);
    RUN(rejections);
    RUN(body_limit_and_model_match);
    RUN(validate_then_tokenize);
    RUN(max_tokens_resolution);
    RUN(model_names);
    RUN(context_clamp_and_strict);
    RUN(n_predict);
    RUN(tabby_segments);
    RUN(fim_chat_shape);
    RUN(tokenize_routes);
    RUN(sampling_per_choice);
    RUN(stop_basic);
    RUN(stop_overlapping_prefixes);
    RUN(stop_streaming_spans_tokens);
    RUN(stop_utf8);
    RUN(render_completion_shape);
    RUN(render_logprobs);
    RUN(render_chunks);
    RUN(render_models);
    RUN(seq_options_resolved);
    RUN(reference_segments_rule);
    RUN(routing_json_dense);
    RUN(routing_json_hybrid);
    RUN(routing_json_sparse);
    RUN(routing_json_tokens);
    RUN(routing_json_mole);
    RUN(fuzz_mutations);
    fake_model_free(g_model);
    return test_summary();
}
