/*
 * test_chat.c - unit tests of api/chat.c and the chat shapes of api/render.c over the byte-per-token
 * fake engine: the messages -> template -> tokens path (special tokens the template writes become
 * their ids, content parts are joined, a template's BOS is not doubled, tools reach the template), the
 * refusal of a model without a usable template, the chat field mapping onto the completion rules
 * (max_completion_tokens, logprobs/top_logprobs, the default max_tokens) with errors naming the chat
 * parameter, and the chat.completion / chunk / usage-chunk JSON.
 */
#include <stdint.h>

#include "../test.h"
#include "api.h"
#include "format.h"
#include "fake_engine.h"

/* A template writing the fake vocabulary's control tokens: <|fim_prefix|> (257) opens a turn,
 * <|fim_middle|> (258) is the generation prompt. */
static const char *const TEMPLATE =
    "{{ bos_token }}{% if tools %}T{{ tools | length }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
    "<|fim_prefix|>{{ m.role[0] }}:{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|fim_middle|>{% endif %}";

static cm_model *g_model;
static api_template *g_tpl;
static api_model g_am;
static api_limits g_lim;
static char g_tpl_error[256];

static void setup(const char *tpl, int add_bos) {
    fake_model_free(g_model);
    api_template_free(g_tpl);
    fake_model_opts o = {.bos = 1, .add_bos = add_bos, .eos = 1, .chat_template = tpl};
    g_model = fake_model_create(&o, "Fake Chat");
    api_template_error te;
    g_tpl = api_chat_template_load(g_model, &te);
    snprintf(g_tpl_error, sizeof g_tpl_error, "%s", g_tpl ? "" : te.message); /* "" when there is none */
    g_am = (api_model){.model = g_model, .id = "fake-chat", .n_ctx = 64, .chat_template = g_tpl,
                       .chat_template_error = g_tpl_error};
    api_limits_default(&g_lim);
}

static int parse(const char *body, api_completion_req *r, api_error *e) {
    return api_format_parse_all(&api_format_chat, body, strlen(body), &g_am, &g_lim, r, e);
}

TEST(chat_prompt_tokens) {
    setup(TEMPLATE, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                        "{\"type\":\"text\",\"text\":\"b\"}]}]}", &r, &e), 0);
    /* bos_token "<s>" (260) as text, then <|fim_prefix|> u : a b <|fim_middle|> */
    ASSERT_EQ_INT(r.n_prompts, 1);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, FAKE_BOS, FAKE_FIM_PRE, 'u', ':', 'a', 'b', FAKE_FIM_MID);
    ASSERT_EQ_INT(r.max_tokens, 64 - 7); /* chat default: the rest of the context */
    ASSERT_EQ_INT(r.logprobs, -1);
    api_completion_req_free(&r);
}

TEST(chat_bos_not_doubled) {
    setup(TEMPLATE, 1); /* the tokenizer adds BOS; the template writes it too */
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r, &e), 0);
    ASSERT_IDS(r.prompts[0].tokens, r.prompts[0].n_tokens, FAKE_BOS, FAKE_FIM_PRE, 'u', ':', 'x', FAKE_FIM_MID);
    api_completion_req_free(&r);
}

TEST(chat_tools_reach_template) {
    setup(TEMPLATE, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\"},{}]}",
                        &r, &e), 0);
    ASSERT_IDS(r.prompts[0].tokens, 3, FAKE_BOS, 'T', '2');
    api_completion_req_free(&r);
}

TEST(chat_refused_without_template) {
    setup(NULL, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r, &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.code, "model_not_chat_capable");
    ASSERT_STREQ(e.param, "messages");
    ASSERT_TRUE(strstr(e.message, "no chat template"));
    setup("{% if %}", 0); /* does not compile: the reason is named */
    ASSERT_TRUE(g_tpl == NULL && g_tpl_error[0]);
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r, &e), -1);
    ASSERT_STREQ(e.code, "model_not_chat_capable");
    ASSERT_TRUE(strstr(e.message, "cannot use") && strstr(e.message, g_tpl_error));
}

TEST(chat_message_errors) {
    setup(TEMPLATE, 0);
    api_completion_req r;
    api_error e;
    static const char *const bad[] = {
        "{}", "{\"messages\":[]}", "{\"messages\":\"hi\"}", "{\"messages\":[1]}", "{\"messages\":[{\"content\":\"x\"}]}",
        "{\"messages\":[{\"role\":\"user\",\"content\":5}]}",
        "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{}}]}]}",
        "{\"messages\":[{\"role\":\"bad\",\"content\":\"x\"}]}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        ASSERT_EQ_INT(parse(bad[i], &r, &e), -1);
        ASSERT_EQ_INT(e.status, 400);
        ASSERT_STREQ(e.param, "messages");
    }
    ASSERT_TRUE(strstr(e.message, "no bad roles")); /* raise_exception's message reaches the client */
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}", &r, &e), -1); /* bad JSON */
    ASSERT_EQ_INT(e.status, 400);
}

TEST(chat_field_mapping) {
    setup(TEMPLATE, 0);
    api_completion_req r;
    api_error e;
    const char *m = "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]";
    char body[512];
    snprintf(body, sizeof body, "{%s,\"max_tokens\":9,\"max_completion_tokens\":5,\"logprobs\":true,\"top_logprobs\":3,"
             "\"temperature\":0.5,\"stop\":\"q\",\"n\":2,\"seed\":4}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), 0);
    ASSERT_EQ_INT(r.max_tokens, 5);
    ASSERT_EQ_INT(r.logprobs, 3);
    ASSERT_EQ_INT(r.n, 2);
    ASSERT_EQ_INT(r.seed_set, 1);
    ASSERT_EQ_INT(r.stop.n, 1);
    ASSERT_NEAR(r.sampling.temperature, 0.5, 1e-6);
    api_completion_req_free(&r);
    snprintf(body, sizeof body, "{%s,\"logprobs\":true}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), 0);
    ASSERT_EQ_INT(r.logprobs, 0);
    api_completion_req_free(&r);
    /* errors name the chat parameter */
    snprintf(body, sizeof body, "{%s,\"top_logprobs\":2}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.param, "top_logprobs");
    snprintf(body, sizeof body, "{%s,\"logprobs\":true,\"top_logprobs\":99}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.param, "top_logprobs");
    snprintf(body, sizeof body, "{%s,\"logprobs\":1}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.param, "logprobs");
    snprintf(body, sizeof body, "{%s,\"max_completion_tokens\":1000}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), 0); /* clamped to the context */
    api_completion_req_free(&r);
    g_lim.strict_context = 1;
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    g_lim.strict_context = 0;
    ASSERT_STREQ(e.code, "context_length_exceeded");
    ASSERT_STREQ(e.param, "max_completion_tokens");
    snprintf(body, sizeof body, "{%s,\"temperature\":\"hot\"}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    ASSERT_STREQ(e.param, "temperature");
    /* one model served: any name selects it, unless strict_name */
    snprintf(body, sizeof body, "{%s,\"model\":\"other\"}", m);
    ASSERT_EQ_INT(parse(body, &r, &e), 0);
    api_completion_req_free(&r);
    g_am.strict_name = 1;
    ASSERT_EQ_INT(parse(body, &r, &e), -1);
    g_am.strict_name = 0;
    ASSERT_EQ_INT(e.status, 404);
}

TEST(chat_render_shapes) {
    setup(TEMPLATE, 0);
    api_completion_req r;
    api_error e;
    ASSERT_EQ_INT(parse("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,\"top_logprobs\":1,"
                        "\"stream\":true,\"stream_options\":{\"include_usage\":true}}", &r, &e), 0);
    api_meta meta = {.id = "cmpl-abc", .created = 5};
    cm_token_logprob top = {.token = 'h', .logprob = -0.5f};
    api_token_lp lp = {.token = 'h', .logprob = -0.5f, .top = &top, .n_top = 1};
    api_choice c = {.index = 0, .text = "h", .text_len = 1, .finish = API_FINISH_STOP, .lp = &lp, .n_lp = 1};
    api_usage u = {.prompt_tokens = 6, .completion_tokens = 1};
    char *s = api_render_chat(&r, &meta, &c, 1, &u, NULL);
    json_t *j = json_loads(s, 0, NULL);
    free(s);
    ASSERT_TRUE(j);
    ASSERT_STREQ(json_string_value(json_object_get(j, "id")), "chatcmpl-abc");
    ASSERT_STREQ(json_string_value(json_object_get(j, "object")), "chat.completion");
    json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(ch, "message"), "role")), "assistant");
    ASSERT_STREQ(json_string_value(json_object_get(json_object_get(ch, "message"), "content")), "h");
    ASSERT_STREQ(json_string_value(json_object_get(ch, "finish_reason")), "stop");
    json_t *t0 = json_array_get(json_object_get(json_object_get(ch, "logprobs"), "content"), 0);
    ASSERT_STREQ(json_string_value(json_object_get(t0, "token")), "h");
    ASSERT_EQ_INT(json_integer_value(json_array_get(json_object_get(t0, "bytes"), 0)), 'h');
    ASSERT_EQ_INT(json_array_size(json_object_get(t0, "top_logprobs")), 1);
    ASSERT_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")), 7);
    json_decref(j);

    /* chunks: the first delta carries the role, later ones only content; an empty last delta is {} */
    api_choice d = {.index = 0, .text = "", .text_len = 0};
    s = api_render_chat_chunk(&r, &meta, &d, 1);
    ASSERT_TRUE(!strncmp(s, "data: ", 6) && strstr(s, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}") &&
                strstr(s, "\"usage\":null") && strstr(s, "chat.completion.chunk"));
    free(s);
    d = (api_choice){.index = 0, .text = "", .text_len = 0, .finish = API_FINISH_LENGTH};
    s = api_render_chat_chunk(&r, &meta, &d, 0);
    ASSERT_TRUE(strstr(s, "\"delta\":{}") && strstr(s, "\"finish_reason\":\"length\""));
    free(s);
    s = api_format_chat.stream_end(&r, &meta, &d, 1, &u, NULL);
    ASSERT_TRUE(strstr(s, "\"choices\":[],\"usage\":{") && strstr(s, "data: [DONE]\n\n"));
    free(s);
    api_completion_req_free(&r);
}

int main(void) {
    RUN(chat_prompt_tokens);
    RUN(chat_bos_not_doubled);
    RUN(chat_tools_reach_template);
    RUN(chat_refused_without_template);
    RUN(chat_message_errors);
    RUN(chat_field_mapping);
    RUN(chat_render_shapes);
    fake_model_free(g_model);
    api_template_free(g_tpl);
    return test_summary();
}
