/*
 * chat.c - POST /v1/chat/completions: the messages become a prompt through the model's own chat
 * template (never a guessed one), and the rest of the body becomes the completion request it is.
 *
 * The chat fields are translated into a /v1/completions body (prompt = the rendered text with its
 * special tokens recognised, max_completion_tokens -> max_tokens, logprobs + top_logprobs ->
 * logprobs) and read by api_completion_validate, so the sampling,
 * stop, n, seed, limit and context rules have one owner; its errors name the chat parameter the client
 * sent. Only the messages' shapes are checked while the body is parsed (on the server's event loop):
 * the template is rendered with the tokenization, off the loop (api_chat_build_prompt), because its
 * cost grows with the conversation.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

api_template *api_chat_template_load(const cm_model *m, api_template_error *err) {
    memset(err, 0, sizeof *err);
    size_t len = 0;
    const char *src = cm_model_chat_template(m, &len);
    if (!src) return NULL;
    return api_template_compile(src, len, err);
}

/* A control token's text ("<|endoftext|>") as the template's bos_token / eos_token; "" when absent. */
static json_t *token_text(const cm_model *m, int32_t id) {
    char buf[256];
    int n = id >= 0 ? cm_token_bytes(m, id, 1, buf, sizeof buf) : 0;
    if (n < 0 || (size_t)n > sizeof buf) n = 0;
    json_t *s = json_stringn(buf, (size_t)n);
    return s ? s : json_string("");
}

/* A message's content as the templates expect it: a string. OpenAI's content parts
 * ([{type:"text", text}]) are joined; null stays null (assistant turns with tool calls). out NULL: only
 * checks the messages' shapes (a walk with no copies, cheap enough for the event loop). */
static int normalize_messages(const json_t *messages, json_t *out, api_error *e) {
    size_t i;
    json_t *msg;
    json_array_foreach(messages, i, msg) {
        if (!json_is_object(msg))
            return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL,
                                 "messages[%zu] is not of type 'object' - 'messages'", i);
        json_t *role = json_object_get(msg, "role");
        if (!json_is_string(role))
            return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL,
                                 "messages[%zu].role is required and must be a string - 'messages'", i);
        json_t *copy = NULL;
        if (out) {
            copy = json_copy(msg); /* shallow: the other fields (tool_calls, name) go through */
            if (!copy) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
            json_array_append_new(out, copy);
        }
        json_t *content = json_object_get(msg, "content");
        if (!content || json_is_null(content) || json_is_string(content)) continue;
        if (!json_is_array(content))
            return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL,
                                 "messages[%zu].content must be a string or an array of content parts - 'messages'",
                                 i);
        size_t total = 0, k;
        json_t *part;
        json_array_foreach(content, k, part) {
            json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
            if (!json_is_string(type) || strcmp(json_string_value(type), "text") || !json_is_string(text))
                return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL,
                                     "messages[%zu].content[%zu]: only text parts ({\"type\":\"text\",\"text\":...}) "
                                     "are supported - 'messages'", i, k);
            total += json_string_length(text);
        }
        if (!out) continue;
        char *buf = malloc(total + 1);
        if (!buf) return api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        size_t off = 0;
        json_array_foreach(content, k, part) {
            json_t *text = json_object_get(part, "text");
            memcpy(buf + off, json_string_value(text), json_string_length(text));
            off += json_string_length(text);
        }
        json_object_set_new(copy, "content", json_stringn(buf, off));
        free(buf);
    }
    return 0;
}

int api_chat_check(const api_model *m, const json_t *messages, api_error *e) {
    if (!m->chat_template) {
        const char *why = m->chat_template_error;
        if (why && why[0])
            return api_error_set(e, 400, API_ERR_INVALID, "messages", "model_not_chat_capable",
                                 "The model '%s' has a chat template this server cannot use (%s), so it cannot "
                                 "answer chat requests; use /v1/completions.", m->id ? m->id : "", why);
        return api_error_set(e, 400, API_ERR_INVALID, "messages", "model_not_chat_capable",
                             "The model '%s' has no chat template (tokenizer.chat_template), so it cannot answer "
                             "chat requests; use /v1/completions.", m->id ? m->id : "");
    }
    if (!json_is_array(messages) || json_array_size(messages) == 0) {
        if (json_is_array(messages))
            return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL, "[] is too short - 'messages'");
        return api_error_set(e, 400, API_ERR_INVALID, "messages", NULL,
                             "'messages' is a required property and must be an array - 'messages'");
    }
    return normalize_messages(messages, NULL, e);
}

char *api_chat_prompt(const api_model *m, const json_t *messages, const json_t *tools, size_t *len,
                      api_error *e) {
    if (api_chat_check(m, messages, e)) return NULL;
    const cm_model *cm = m->model;
    const cm_model_info *info = cm_model_get_info(cm);
    json_t *ctx = json_object(), *msgs = json_array();
    if (!ctx || !msgs) {
        json_decref(ctx);
        json_decref(msgs);
        api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        return NULL;
    }
    json_object_set_new(ctx, "messages", msgs);
    if (normalize_messages(messages, msgs, e)) { json_decref(ctx); return NULL; }
    json_object_set_new(ctx, "add_generation_prompt", json_true());
    json_object_set_new(ctx, "bos_token", token_text(cm, info->bos));
    json_object_set_new(ctx, "eos_token", token_text(cm, info->eos));
    if (tools && json_is_array(tools) && json_array_size(tools)) json_object_set(ctx, "tools", (json_t *)tools);
    api_template_error te;
    size_t n = 0;
    char *text = api_template_render(m->chat_template, ctx, NULL, &n, &te);
    json_decref(ctx);
    if (!text) {
        /* raise_exception() is how templates reject a conversation (roles out of order, ...) */
        api_error_set(e, 400, API_ERR_INVALID, "messages", NULL, "The chat template rejected the messages: %s",
                      te.message);
        return NULL;
    }
    /* templates that write bos_token themselves would get a second BOS from the tokenizer */
    if (info->add_bos && info->bos >= 0) {
        char bos[256];
        int bn = cm_token_bytes(cm, info->bos, 1, bos, sizeof bos);
        if (bn > 0 && (size_t)bn <= sizeof bos && (size_t)bn <= n && !memcmp(text, bos, (size_t)bn)) {
            memmove(text, text + bn, n - (size_t)bn + 1);
            n -= (size_t)bn;
        }
    }
    *len = n;
    return text;
}

json_t *api_chat_build_prompt(api_completion_req *r, const json_t *args, api_error *e) {
    size_t n = 0;
    char *text = api_chat_prompt(r->model, json_object_get(args, "messages"), json_object_get(args, "tools"), &n, e);
    if (!text) return NULL;
    json_t *s = json_stringn(text, n);
    free(text);
    if (!s) api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
    return s;
}

json_t *api_chat_defer_args(const json_t *messages, const json_t *tools) {
    json_t *a = json_pack("{s:O}", "messages", messages);
    if (a && tools && json_is_array(tools) && json_array_size(tools)) json_object_set(a, "tools", (json_t *)tools);
    return a;
}

/* Fields a chat body shares with a completions body, copied as they are. */
static const char *const shared_fields[] = {
    "model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "seed", "top_k", "min_p", "repetition_penalty", "language",
    "segment_routing", "routing",
};

int api_parse_chat(const char *body, size_t len, const api_model *m, const api_limits *lim,
                   api_completion_req *out, api_error *e) {
    json_t *root = api_format_load_body(body, len, m, lim, out, e);
    if (!root) return -1;
    int rc = -1, max_completion = 0;
    json_t *c = json_object();
    if (!c) { api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory"); goto done; }
    for (size_t i = 0; i < sizeof shared_fields / sizeof *shared_fields; i++) {
        json_t *v = json_object_get(root, shared_fields[i]);
        if (v) json_object_set(c, shared_fields[i], v);
    }
    /* OpenAI chat: no max_tokens means "until the context is full" */
    json_t *mt = json_object_get(root, "max_completion_tokens");
    if (mt && !json_is_null(mt)) max_completion = 1;
    else mt = json_object_get(root, "max_tokens");
    if (mt) json_object_set(c, "max_tokens", mt);
    else api_format_default(c, m, "max_tokens", json_null());
    json_t *lp = json_object_get(root, "logprobs"), *top = json_object_get(root, "top_logprobs");
    if (lp && !json_is_null(lp) && !json_is_boolean(lp)) {
        api_error_set(e, 400, API_ERR_INVALID, "logprobs", NULL, "'logprobs' must be a boolean - 'logprobs'");
        goto done;
    }
    if (top && !json_is_null(top)) {
        if (!json_is_true(lp)) {
            api_error_set(e, 400, API_ERR_INVALID, "top_logprobs", NULL,
                          "'top_logprobs' requires 'logprobs' to be true - 'top_logprobs'");
            goto done;
        }
        json_object_set(c, "logprobs", top);
    } else if (json_is_true(lp)) {
        json_object_set_new(c, "logprobs", json_integer(0));
    }
    json_t *messages = json_object_get(root, "messages");
    if (api_chat_check(m, messages, e)) goto done;
    json_t *args = api_chat_defer_args(messages, json_object_get(root, "tools"));
    /* the template is rendered off the loop (api_chat_build_prompt); "" holds its place meanwhile */
    json_object_set_new(c, "prompt", json_string(""));
    json_object_set_new(c, "parse_special", json_true()); /* the template writes its special tokens as text */
    /* errors name the chat parameters the client sent */
    json_t *d = json_pack("{s:{s:s,s:s,s:s}}", "params", "prompt", "messages", "logprobs", "top_logprobs",
                          "max_tokens", max_completion ? "max_completion_tokens" : "max_tokens");
    if (!d || !args) {
        json_decref(d);
        json_decref(args);
        api_error_set(e, 500, API_ERR_SERVER, NULL, NULL, "out of memory");
        goto done;
    }
    rc = api_format_parse_translated(c, d, m, lim, 0, out, e);
    if (rc == 0) api__completion_defer_prompt(out, api_chat_build_prompt, args);
    else json_decref(args);
done:
    json_decref(c);
    json_decref(root);
    return rc;
}
