/*
 * test_format.c - unit tests of the non-OpenAI dialects (api/ollama.c, api/llamacpp.c, api/tabby.c) and the helpers
 * they share (api/format.c) over the byte-per-token fake engine: how each request maps onto the one
 * completion request (options, defaults, FIM, the chat template, llama.cpp's warm-up), the errors naming
 * the dialect's own parameters, and the exact shapes and framing of their responses (NDJSON lines, SSE
 * events, response_fields projection).
 */
#include <stdint.h>

#include "../test.h"
#include "api.h"
#include "format.h"
#include "fake_engine.h"

static cm_model *g_model;
static api_template *g_tpl;
static api_model g_am;
static api_limits g_lim;

static void setup(void) {
    fake_model_opts o = {.fim = 1, .bos = 1, .eos = 1,
                         .chat_template = "{% for m in messages %}<|fim_prefix|>{{ m.role[0] }}:{{ m.content }}{% endfor %}"
                                          "<|fim_middle|>"};
    g_model = fake_model_create(&o, "Fake");
    api_template_error te;
    g_tpl = api_chat_template_load(g_model, &te);
    g_am = (api_model){.model = g_model, .id = "fake", .n_ctx = 64, .chat_template = g_tpl};
    api_limits_default(&g_lim);
}

static int parse(const api_format *f, const char *body, api_completion_req *r, api_error *e) {
    return api_format_parse_all(f, body, strlen(body), &g_am, &g_lim, r, e);
}

static json_t *load(const char *s) { return json_loads(s, 0, NULL); }

TEST(ollama_generate_mapping) {
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse(&api_format_ollama_generate,
                        "{\"model\":\"fake\",\"prompt\":\"ab\",\"raw\":true,\"options\":{\"num_predict\":5,\"temperature\":0.2,"
                        "\"top_k\":7,\"repeat_penalty\":1.3,\"seed\":9,\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\"],"
                        "\"num_ctx\":99999}}", &r, &e), 0);
    ASSERT_EQ_INT(r.stream, 1); /* Ollama streams by default */
    ASSERT_EQ_INT(r.max_tokens, 5);
    ASSERT_EQ_INT(r.sampling.top_k, 7);
    ASSERT_NEAR(r.sampling.repetition_penalty, 1.3, 1e-6);
    ASSERT_NEAR(r.sampling.temperature, 0.2, 1e-6);
    ASSERT_EQ_INT(r.seed_set, 1);
    ASSERT_EQ_INT(r.stop.n, 6); /* more than OpenAI's 4 */
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, 'a', 'b');
    api_completion_req_free(&r);
    /* num_predict -1: the rest of the context; not raw: system + prompt through the chat template */
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"x\",\"system\":\"s\",\"stream\":false,"
                        "\"options\":{\"num_predict\":-1}}", &r, &e), 0);
    ASSERT_EQ_INT(r.stream, 0);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, FAKE_FIM_PRE, 's', ':', 's', FAKE_FIM_PRE, 'u', ':', 'x',
               FAKE_FIM_MID);
    ASSERT_EQ_INT(r.max_tokens, 64 - 9);
    api_completion_req_free(&r);
    /* suffix: fill in the middle */
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"p\",\"suffix\":\"s\"}", &r, &e), 0);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, FAKE_FIM_PRE, 'p', FAKE_FIM_SUF, 's', FAKE_FIM_MID);
    api_completion_req_free(&r);
    /* errors name Ollama's parameters */
    /* beyond the context: clamped, or with strict_context a 400 that names num_predict */
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"p\",\"options\":{\"num_predict\":1000}}", &r, &e), 0);
    ASSERT_TRUE(r.max_tokens > 0 && r.max_tokens < 64);
    api_completion_req_free(&r);
    g_lim.strict_context = 1;
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"p\",\"options\":{\"num_predict\":1000}}", &r, &e), -1);
    g_lim.strict_context = 0;
    ASSERT_STREQ(e.param, "num_predict");
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":5}", &r, &e), -1);
    ASSERT_STREQ(e.param, "prompt");
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"p\",\"options\":3}", &r, &e), -1);
    ASSERT_STREQ(e.param, "options");
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "[1]", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    char *s = api_format_ollama_generate.error(&e, 1);
    json_t *j = load(s);
    ASSERT_TRUE(j && json_is_string(json_object_get(j, "error")) && s[strlen(s) - 1] == '\n');
    json_decref(j);
    free(s);
}

TEST(ollama_load_request) {
    api_completion_req r;
    api_error e;
    /* no prompt, suffix or system: Ollama's "load the model", nothing generated */
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"model\":\"fake\",\"prompt\":\"\"}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 0);
    api_meta meta = {.id = "cmpl-x"};
    api_choice c = {.text = "", .finish = API_FINISH_LENGTH};
    api_usage u = {0};
    char *s = api_format_ollama_generate.response(&r, &meta, &c, 1, &u, NULL);
    ASSERT_TRUE(s && strstr(s, "\"done_reason\":\"load\""));
    free(s);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_ollama_chat, "{\"messages\":[]}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 0);
    api_completion_req_free(&r);
    /* a system prompt alone is a generation */
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"system\":\"s\",\"options\":{\"num_predict\":2}}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 2);
    api_completion_req_free(&r);
}

TEST(ollama_shapes) {
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse(&api_format_ollama_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r, &e), 0);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, FAKE_FIM_PRE, 'u', ':', 'x', FAKE_FIM_MID);
    api_meta meta = {.id = "cmpl-x", .created = 86400};
    api_choice d = {.text = "hi", .text_len = 2};
    char *s = api_format_ollama_chat.chunk(&r, &meta, &d, 1);
    ASSERT_STREQ(s, "{\"model\":\"fake\",\"created_at\":\"1970-01-02T00:00:00Z\",\"message\":{\"role\":\"assistant\","
                    "\"content\":\"hi\"},\"done\":false}\n");
    free(s);
    d.text_len = 0;
    s = api_format_ollama_chat.chunk(&r, &meta, &d, 0);
    ASSERT_STREQ(s, ""); /* nothing to say: the finish goes out with the final object */
    free(s);
    api_usage u = {.prompt_tokens = 5, .completion_tokens = 2, .prompt_ns = 1000, .gen_ns = 500};
    d.finish = API_FINISH_STOP;
    s = api_format_ollama_chat.stream_end(&r, &meta, &d, 1, &u, NULL);
    json_t *j = load(s);
    ASSERT_TRUE(j && s[strlen(s) - 1] == '\n');
    ASSERT_TRUE(json_is_true(json_object_get(j, "done")));
    ASSERT_STREQ(json_string_value(json_object_get(j, "done_reason")), "stop");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "total_duration")), 1500);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "eval_count")), 2);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "prompt_eval_duration")), 1000);
    ASSERT_TRUE(!json_object_get(j, "context")); /* chat has no context field */
    json_decref(j);
    free(s);
    api_completion_req_free(&r);

    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"x\",\"raw\":true}", &r, &e), 0);
    api_choice c = {.text = "abc", .text_len = 3, .finish = API_FINISH_LENGTH};
    s = api_format_ollama_generate.response(&r, &meta, &c, 1, &u, NULL);
    j = load(s);
    ASSERT_STREQ(json_string_value(json_object_get(j, "response")), "abc");
    ASSERT_STREQ(json_string_value(json_object_get(j, "done_reason")), "length");
    ASSERT_EQ_INT(json_array_size(json_object_get(j, "context")), 0);
    ASSERT_TRUE(s[strlen(s) - 1] == '}'); /* a body, not a line */
    json_decref(j);
    free(s);
    api_completion_req_free(&r);

    /* the listings */
    s = api_render_ollama_tags(&g_am, 1, 1);
    j = load(s);
    json_t *m0 = json_array_get(json_object_get(j, "models"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(m0, "name")), "fake");
    ASSERT_EQ_INT(json_integer_value(json_object_get(m0, "context_length")), 64);
    json_decref(j);
    free(s);
    const api_model *found = NULL;
    ASSERT_EQ_INT(api_ollama_show_model("{\"name\":\"fake\"}", 15, &g_am, 1, &found, &e), 0);
    ASSERT_TRUE(found == &g_am);
    /* one model served: any name selects it, unless strict_name */
    found = NULL;
    ASSERT_EQ_INT(api_ollama_show_model("{\"model\":\"nope\"}", 16, &g_am, 1, &found, &e), 0);
    ASSERT_TRUE(found == &g_am);
    g_am.strict_name = 1;
    ASSERT_EQ_INT(api_ollama_show_model("{\"model\":\"nope\"}", 16, &g_am, 1, &found, &e), -1);
    g_am.strict_name = 0;
    ASSERT_EQ_INT(e.status, 404);
    s = api_render_ollama_show(&g_am);
    j = load(s);
    json_t *caps = json_object_get(j, "capabilities");
    ASSERT_EQ_INT(json_array_size(caps), 3);
    ASSERT_STREQ(json_string_value(json_array_get(caps, 2)), "chat");
    json_decref(j);
    free(s);
}

TEST(llama_completion_mapping_and_shapes) {
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"seed\":-1,\"model\":\"anything\"}", &r, &e), 0);
    /* llama.cpp's defaults; n_predict absent: the rest of the context; seed -1: random; model ignored */
    ASSERT_NEAR(r.sampling.temperature, 0.8, 1e-6);
    ASSERT_EQ_INT(r.sampling.top_k, 40);
    ASSERT_NEAR(r.sampling.top_p, 0.95, 1e-6);
    ASSERT_NEAR(r.sampling.min_p, 0.05, 1e-6);
    ASSERT_EQ_INT(r.seed_set, 0);
    ASSERT_EQ_INT(r.stream, 0);
    ASSERT_EQ_INT(r.max_tokens, 64 - 2);
    ASSERT_EQ_INT(r.prefill, 0);
    api_meta meta = {.id = "cmpl-x"};
    api_choice d = {.text = "z", .text_len = 1};
    char *s = api_format_llama_completion.chunk(&r, &meta, &d, 1);
    ASSERT_STREQ(s, "data: {\"index\":0,\"content\":\"z\",\"tokens\":[],\"stop\":false,\"id_slot\":0}\n\n");
    free(s);
    api_usage u = {.prompt_tokens = 10, .completion_tokens = 4, .cached_tokens = 6, .prompt_ns = 2000000,
                   .gen_ns = 4000000};
    api_choice c = {.text = "done", .text_len = 4, .finish = API_FINISH_LENGTH};
    s = api_format_llama_completion.response(&r, &meta, &c, 1, &u, NULL);
    json_t *j = load(s);
    ASSERT_STREQ(json_string_value(json_object_get(j, "content")), "done");
    ASSERT_TRUE(json_is_true(json_object_get(j, "stop")));
    ASSERT_STREQ(json_string_value(json_object_get(j, "stop_type")), "limit");
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "tokens_cached")), 6);
    ASSERT_EQ_INT(json_integer_value(json_object_get(j, "tokens_evaluated")), 10);
    json_t *t = json_object_get(j, "timings");
    ASSERT_EQ_INT(json_integer_value(json_object_get(t, "prompt_n")), 4); /* computed, not reused */
    ASSERT_NEAR(json_number_value(json_object_get(t, "prompt_ms")), 2.0, 1e-9);
    ASSERT_NEAR(json_number_value(json_object_get(t, "predicted_per_second")), 1000.0, 1e-6);
    json_decref(j);
    free(s);
    s = api_format_llama_completion.stream_end(&r, &meta, &c, 1, &u, NULL);
    ASSERT_TRUE(!strncmp(s, "data: {", 7) && strstr(s, "\"stop\":true") && !strstr(s, "[DONE]"));
    free(s);
    api_completion_req_free(&r);

    /* response_fields: only the named paths, each under its path; [""] is an empty object */
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"n_predict\":0,\"response_fields\":"
                        "[\"content\",\"timings/prompt_n\",\"timings/nope\",\"tokens_cached\"]}", &r, &e), 0);
    ASSERT_EQ_INT(r.prefill, 1); /* n_predict 0: compute the prompt into the cache */
    s = api_format_llama_completion.response(&r, &meta, &c, 1, &u, NULL);
    ASSERT_STREQ(s, "{\"content\":\"done\",\"timings/prompt_n\":4,\"tokens_cached\":6}");
    free(s);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"response_fields\":[\"\"]}", &r, &e), 0);
    s = api_format_llama_completion.response(&r, &meta, &c, 1, &u, NULL);
    ASSERT_STREQ(s, "{}");
    free(s);
    api_completion_req_free(&r);
    /* errors name llama.cpp's parameters */
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"n_predict\":100}", &r, &e), 0);
    ASSERT_TRUE(r.max_tokens > 0 && r.max_tokens < 64);
    api_completion_req_free(&r);
    g_lim.strict_context = 1;
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"n_predict\":100}", &r, &e), -1);
    g_lim.strict_context = 0;
    ASSERT_STREQ(e.param, "n_predict");
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"repeat_penalty\":0}", &r, &e), -1);
    ASSERT_STREQ(e.param, "repeat_penalty");
}

TEST(llama_infill_prompt) {
    api_completion_req r;
    api_error e;
    /* the fake model has no repository tokens: a file is a text section before the FIM prompt */
    ASSERT_EQ_INT(parse(&api_format_llama_infill, "{\"input_prefix\":\"P\",\"input_suffix\":\"S\",\"prompt\":\"m\","
                        "\"input_extra\":[{\"filename\":\"f\",\"text\":\"t\"}],\"n_predict\":4}", &r, &e), 0);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, '-', '-', '-', ' ', 'f', ' ', '-', '-', '-', '\n', 't', '\n',
               FAKE_FIM_PRE, 'P', 'm', FAKE_FIM_SUF, 'S', FAKE_FIM_MID);
    ASSERT_EQ_INT(r.max_tokens, 4);
    ASSERT_TRUE(json_is_false(json_object_get(r.dialect, "truncated")));
    api_completion_req_free(&r);
    /* a prefix longer than the context keeps its end and says so */
    char body[512];
    char pre[201];
    memset(pre, 'a', 200);
    pre[200] = 0;
    snprintf(body, sizeof body, "{\"input_prefix\":\"%sZ\",\"n_predict\":4}", pre);
    ASSERT_EQ_INT(parse(&api_format_llama_infill, body, &r, &e), 0);
    ASSERT_TRUE(json_is_true(json_object_get(r.dialect, "truncated")));
    ASSERT_EQ_INT(r.prompts[0].n_tokens, 64 - 4);
    ASSERT_EQ_INT(r.prompts[0].tokens[r.prompts[0].n_tokens - 3], 'Z');
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_llama_infill, "{\"input_extra\":[{\"text\":5}]}", &r, &e), -1);
    ASSERT_STREQ(e.param, "input_extra");
    ASSERT_EQ_INT(parse(&api_format_llama_infill, "{\"input_prefix\":[1]}", &r, &e), -1);
    ASSERT_STREQ(e.param, "input_prefix");
}

/* llama.cpp's stop_type: "word" with the stop string that ended it, "eos", "limit". */
TEST(llama_stop_type) {
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"stop\":[\"x\",\"yz\"]}", &r, &e), 0);
    api_meta meta = {.id = "cmpl-x"};
    api_usage u = {.prompt_tokens = 2, .completion_tokens = 1};
    static const struct { api_finish finish; int stop_word; const char *type, *word; } cases[] = {
        {API_FINISH_STOP, 2, "word", "yz"}, {API_FINISH_STOP, 0, "eos", ""}, {API_FINISH_LENGTH, 0, "limit", ""},
        {API_FINISH_STOP, 3, "eos", ""}, /* out of range: no word to name */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        api_choice c = {.text = "a", .text_len = 1, .finish = cases[i].finish, .stop_word = cases[i].stop_word};
        char *s = api_format_llama_completion.response(&r, &meta, &c, 1, &u, NULL);
        json_t *j = load(s);
        ASSERT_STREQ(json_string_value(json_object_get(j, "stop_type")), cases[i].type);
        ASSERT_STREQ(json_string_value(json_object_get(j, "stopping_word")), cases[i].word);
        json_decref(j);
        free(s);
    }
    api_completion_req_free(&r);
    /* n_indent and t_max_predict_ms reach the request (<= 0: off); other types are a 400 naming them */
    ASSERT_EQ_INT(parse(&api_format_llama_infill, "{\"input_prefix\":\"P\",\"n_indent\":4,\"t_max_predict_ms\":250}", &r, &e), 0);
    ASSERT_EQ_INT(r.n_indent, 4);
    ASSERT_EQ_INT(r.t_max_predict_ms, 250);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"a\",\"n_indent\":-1,\"t_max_predict_ms\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.n_indent, 0);
    ASSERT_EQ_INT(r.t_max_predict_ms, 0);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"a\",\"t_max_predict_ms\":\"1s\"}", &r, &e), -1);
    ASSERT_STREQ(e.param, "t_max_predict_ms");
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"a\",\"n_indent\":1.5}", &r, &e), -1);
    ASSERT_STREQ(e.param, "n_indent");
}

/* What grows with the body (a chat template over the messages, /infill's repository context) is built
 * by the second step (api_format_tokenize, off the server's loop), never by the parse: after the parse
 * the prompt is not built, after the second step it is the one both steps in one call build. */
TEST(heavy_prompts_are_built_by_the_second_step) {
    static const struct { const api_format *f; const char *body; } cases[] = {
        {&api_format_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2}"},
        {&api_format_ollama_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"options\":{\"num_predict\":2}}"},
        {&api_format_ollama_generate, "{\"prompt\":\"hi\",\"options\":{\"num_predict\":2}}"},
        {&api_format_llama_infill, "{\"input_prefix\":\"P\",\"input_extra\":[{\"filename\":\"f\",\"text\":\"t\"}],\"n_predict\":2}"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        api_completion_req r, whole;
        api_error e;
        ASSERT_EQ_INT(cases[i].f->parse(cases[i].body, strlen(cases[i].body), &g_am, &g_lim, &r, &e), 0);
        ASSERT_EQ_INT(r.n_prompts, 1);
        ASSERT_TRUE(r.prompts[0].tokens == NULL);
        ASSERT_EQ_INT(api_format_tokenize(&r, &e), 0);
        ASSERT_EQ_INT(parse(cases[i].f, cases[i].body, &whole, &e), 0);
        ASSERT_EQ_INT(r.prompts[0].n_tokens, whole.prompts[0].n_tokens);
        for (int k = 0; k < r.prompts[0].n_tokens; k++) ASSERT_EQ_INT(r.prompts[0].tokens[k], whole.prompts[0].tokens[k]);
        ASSERT_TRUE(r.prompts[0].n_tokens > 3);
        ASSERT_EQ_INT(r.max_tokens, 2);
        api_completion_req_free(&r);
        api_completion_req_free(&whole);
    }
    /* the cheap rules stay with the parse: the messages' shapes, a completion length that cannot fit */
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":{\"a\":1}}]}";
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(api_format_chat.parse(body, strlen(body), &g_am, &g_lim, &r, &e), -1); /* shapes: on the parse */
    ASSERT_STREQ(e.param, "messages");
    body = "{\"input_prefix\":\"P\",\"n_predict\":70}";
    g_lim.strict_context = 1;
    ASSERT_EQ_INT(api_format_llama_infill.parse(body, strlen(body), &g_am, &g_lim, &r, &e), -1);
    g_lim.strict_context = 0;
    ASSERT_STREQ(e.param, "n_predict");
}

/* Ollama's num_ctx: a smaller context caps prompt + completion; a larger one changes nothing. */
TEST(ollama_num_ctx) {
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"abc\",\"raw\":true,\"options\":{\"num_ctx\":10,\"num_predict\":50}}", &r, &e), 0);
    ASSERT_EQ_INT(r.prompts[0].n_tokens + r.max_tokens, 10);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"abc\",\"raw\":true,\"options\":{\"num_ctx\":1000,\"num_predict\":50}}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 50);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"abcdefgh\",\"raw\":true,\"options\":{\"num_ctx\":4}}", &r, &e), -1);
    ASSERT_STREQ(e.code, "context_length_exceeded");
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"a\",\"options\":{\"num_ctx\":\"big\"}}", &r, &e), -1);
    ASSERT_STREQ(e.param, "num_ctx");
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"a\",\"template\":\"{{ .Prompt }}\"}", &r, &e), -1);
    ASSERT_STREQ(e.param, "template");
    ASSERT_EQ_INT(parse(&api_format_ollama_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"format\":\"json\"}", &r, &e), -1);
    ASSERT_STREQ(e.param, "format");
}

/* Tabby's telemetry events: the agent's LogEventRequest shapes, and 400s naming the field. */
TEST(tabby_events) {
    api_error e;
    api_tabby_event_kind k = API_TABBY_EVENT_KINDS;
    const char *view = "{\"type\":\"view\",\"completion_id\":\"cmpl-1\",\"choice_index\":0,\"view_id\":\"v\"}";
    ASSERT_EQ_INT(api_tabby_event(view, strlen(view), &g_lim, NULL, &k, &e), 0);
    ASSERT_EQ_INT(k, API_TABBY_VIEW);
    ASSERT_STREQ(api_tabby_event_name(k), "view");
    const char *sel = "{\"type\":\"select\",\"completion_id\":\"c\",\"choice_index\":1,\"elapsed\":12,\"select_kind\":\"line\"}";
    ASSERT_EQ_INT(api_tabby_event(sel, strlen(sel), &g_lim, "line", &k, &e), 0);
    ASSERT_EQ_INT(k, API_TABBY_SELECT);
    ASSERT_EQ_INT(api_tabby_event(sel, strlen(sel), &g_lim, "word", &k, &e), -1);
    ASSERT_STREQ(e.param, "select_kind");
    static const struct { const char *body, *param; } bad[] = {
        {"{\"type\":\"click\",\"completion_id\":\"c\",\"choice_index\":0}", "type"},
        {"{\"type\":\"dismiss\",\"choice_index\":0}", "completion_id"},
        {"{\"type\":\"dismiss\",\"completion_id\":\"c\",\"choice_index\":-1}", "choice_index"},
        {"{\"type\":\"dismiss\",\"completion_id\":\"c\",\"choice_index\":0,\"elapsed\":\"1s\"}", "elapsed"},
        {"{\"type\":\"dismiss\",\"completion_id\":\"c\",\"choice_index\":0,\"view_id\":3}", "view_id"},
        {"[]", ""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ASSERT_EQ_INT(api_tabby_event(bad[i].body, strlen(bad[i].body), &g_lim, NULL, &k, &e), -1);
        ASSERT_EQ_INT(e.status, 400);
        ASSERT_STREQ(e.param, bad[i].param);
    }
}

/* A model's default sampling enters where every dialect's request is read: a request that sends a field
 * keeps its own value, one that does not gets the model's, which wins over the dialect's own default
 * (llama.cpp's temperature, chat's and Ollama's whole-context length, Tabby's 64 tokens). */
TEST(model_defaults_every_dialect) {
    json_t *d = load("{\"temperature\":0.3,\"top_k\":5,\"top_p\":0.5,\"min_p\":0.1,\"repetition_penalty\":1.2,"
                     "\"presence_penalty\":0.4,\"frequency_penalty\":-0.5,\"seed\":77,\"max_tokens\":7,"
                     "\"stop\":[\"\\n\\n\",\"zz\"]}");
    api_error e;
    ASSERT_EQ_INT(api_defaults_check(d, &g_lim, &e), 0);
    api_model saved = g_am;
    g_am.defaults = d;
    static const struct { const api_format *f; const char *body; } forms[] = {
        {&api_format_completions, "{\"prompt\":\"ab\"}"},
        {&api_format_completions, "{\"segments\":{\"prefix\":\"ab\",\"suffix\":\"c\"}}"}, /* Tabby */
        {&api_format_fim, "{\"prompt\":\"ab\",\"suffix\":\"c\"}"},
        {&api_format_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"ab\"}]}"},
        {&api_format_llama_completion, "{\"prompt\":\"ab\"}"},
        {&api_format_llama_infill, "{\"input_prefix\":\"ab\",\"input_suffix\":\"c\"}"},
        {&api_format_ollama_generate, "{\"prompt\":\"ab\",\"raw\":true,\"options\":{}}"},
        {&api_format_ollama_chat, "{\"messages\":[{\"role\":\"user\",\"content\":\"ab\"}],\"options\":{}}"},
    };
    for (size_t i = 0; i < sizeof forms / sizeof *forms; i++) {
        api_completion_req r;
        ASSERT_EQ_INT(parse(forms[i].f, forms[i].body, &r, &e), 0);
        ASSERT_NEAR(r.sampling.temperature, 0.3, 1e-6);
        ASSERT_EQ_INT(r.sampling.top_k, 5);
        ASSERT_NEAR(r.sampling.top_p, 0.5, 1e-6);
        ASSERT_NEAR(r.sampling.min_p, 0.1, 1e-6);
        ASSERT_NEAR(r.sampling.repetition_penalty, 1.2, 1e-6);
        ASSERT_NEAR(r.sampling.presence_penalty, 0.4, 1e-6);
        ASSERT_NEAR(r.sampling.frequency_penalty, -0.5, 1e-6);
        ASSERT_EQ_INT(r.seed_set, 1);
        ASSERT_EQ_INT((int)r.seed, 77);
        ASSERT_EQ_INT(r.max_tokens, 7);
        ASSERT_EQ_INT(r.stop.n, 2);
        ASSERT_EQ_INT((int)r.stop.len[0], 2);
        api_completion_req_free(&r);
    }
    /* the request's own fields, under any of their names, win */
    api_completion_req r;
    ASSERT_EQ_INT(parse(&api_format_completions, "{\"prompt\":\"ab\",\"temperature\":0.9,\"top_k\":0,\"seed\":1,"
                        "\"stop\":\"q\",\"n_predict\":3}", &r, &e), 0);
    ASSERT_NEAR(r.sampling.temperature, 0.9, 1e-6);
    ASSERT_EQ_INT(r.sampling.top_k, 0);
    ASSERT_NEAR(r.sampling.top_p, 0.5, 1e-6);
    ASSERT_EQ_INT((int)r.seed, 1);
    ASSERT_EQ_INT(r.max_tokens, 3);
    ASSERT_EQ_INT(r.stop.n, 1);
    api_completion_req_free(&r);
    /* max_tokens null is a request's own choice (the whole context); other nulls are "not sent" */
    ASSERT_EQ_INT(parse(&api_format_completions, "{\"prompt\":\"ab\",\"max_tokens\":null,\"temperature\":null}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 64 - 2);
    ASSERT_NEAR(r.sampling.temperature, 0.3, 1e-6);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_llama_completion, "{\"prompt\":\"ab\",\"temperature\":0.0,\"n_predict\":-1}", &r, &e), 0);
    ASSERT_NEAR(r.sampling.temperature, 0.0, 1e-6);
    ASSERT_EQ_INT(r.max_tokens, 64 - 2);
    api_completion_req_free(&r);
    ASSERT_EQ_INT(parse(&api_format_ollama_generate, "{\"prompt\":\"ab\",\"raw\":true,\"options\":{\"num_predict\":2,"
                        "\"temperature\":1.5}}", &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 2);
    ASSERT_NEAR(r.sampling.temperature, 1.5, 1e-6);
    api_completion_req_free(&r);
    /* /v1/models shows them */
    char *m = api_render_model(&g_am);
    ASSERT_TRUE(strstr(m, "\"defaults\":{\"temperature\":0.3") != NULL);
    free(m);
    g_am = saved;
    m = api_render_model(&g_am);
    ASSERT_TRUE(strstr(m, "\"defaults\"") == NULL);
    free(m);
    json_decref(d);
}

/* A default a request could not send is refused, naming the field. */
TEST(model_defaults_checked) {
    static const struct { const char *json, *param; } bad[] = {
        {"{\"temperature\":3}", "temperature"},        {"{\"top_p\":0}", "top_p"},
        {"{\"top_k\":-1}", "top_k"},                   {"{\"min_p\":\"x\"}", "min_p"},
        {"{\"repetition_penalty\":0}", "repetition_penalty"}, {"{\"presence_penalty\":9}", "presence_penalty"},
        {"{\"frequency_penalty\":true}", "frequency_penalty"}, {"{\"seed\":1.5}", "seed"},
        {"{\"max_tokens\":-2}", "max_tokens"},         {"{\"stop\":[1]}", "stop"},
        {"{\"stop\":\"\"}", "stop"},                   {"{\"temperature\":null}", "temperature"},
        {"{\"n\":2}", ""},                             {"{\"logit_bias\":{}}", ""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        json_t *d = load(bad[i].json);
        api_error e;
        ASSERT_EQ_INT(api_defaults_check(d, &g_lim, &e), -1);
        ASSERT_EQ_INT(e.status, 400);
        ASSERT_STREQ(e.param, bad[i].param);
        json_decref(d);
    }
    json_t *d = load("{\"max_tokens\":null,\"seed\":-3,\"stop\":\"x\"}");
    api_error e;
    ASSERT_EQ_INT(api_defaults_check(d, &g_lim, &e), 0);
    ASSERT_EQ_INT(api_defaults_check(NULL, &g_lim, &e), 0);
    json_decref(d);
}

int main(void) {
    setup();
    RUN(ollama_generate_mapping);
    RUN(ollama_load_request);
    RUN(ollama_shapes);
    RUN(llama_completion_mapping_and_shapes);
    RUN(llama_infill_prompt);
    RUN(llama_stop_type);
    RUN(heavy_prompts_are_built_by_the_second_step);
    RUN(ollama_num_ctx);
    RUN(tabby_events);
    RUN(model_defaults_every_dialect);
    RUN(model_defaults_checked);
    fake_model_free(g_model);
    api_template_free(g_tpl);
    return test_summary();
}
