/*
 * convert_tokenizer.c - Hugging Face tokenizer.json (+ tokenizer_config.json) -> tokenizer.ggml.* keys.
 *
 * Only byte-level BPE tokenizers (model.type "BPE" with a ByteLevel pre-tokenizer or decoder) are
 * converted; the pre-tokenizer name is recognised from its regex(es), because the name is all that the
 * GGUF carries and the engine picks its regexes by name (tokenizer.c):
 *   ByteLevel(use_regex) or Split(GPT-2 regex)      -> "gpt-2"
 *   Split(cl100k-like regex with \p{N})             -> "qwen2"
 *   Split(cl100k-like regex with \p{N}{1,3})        -> "llama-bpe"
 *   Sequence of the five DeepSeek-Coder Splits      -> "deepseek-coder"
 * Anything else is CM_E_UNSUPPORTED with the regex in the message: guessing would give wrong ids.
 *
 * Token types follow llama.cpp's converter: vocabulary entries are normal (1); an added token is control
 * (3) when it is marked special or looks like one (<|...|>, <｜...｜>), else user-defined (4). Ids missing
 * from both vocab and added_tokens, and padding up to the model's embedding rows, get "[PAD<i>]" with type
 * unused (5).
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "util.h"

#define CT_MAX_VOCAB (1 << 24)

static const char re_gpt2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char re_qwen2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char re_llama3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *const re_deepseek_coder[] = {
    "[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe0\xa0\x80-\xe4\xb8\x80\xea\xb0\x80-\xed\x9f\xbf]+", /* [一-龥ࠀ-一가-퟿]+ */
    "\\p{N}",
};

typedef struct ct_state {
    int n;              /* tokens */
    char **tok;         /* (n) owned strings */
    int32_t *type;      /* (n) */
    const char **merges;/* (n_merges) owned strings */
    uint64_t n_merges;
    json_t *vocab;      /* model.vocab, borrowed from the root */
    json_t *added;      /* added_tokens array, borrowed */
} ct_state;

static void ct_free(ct_state *s) {
    if (s->tok)
        for (int i = 0; i < s->n; i++) free(s->tok[i]);
    free(s->tok);
    free(s->type);
    if (s->merges)
        for (uint64_t i = 0; i < s->n_merges; i++) free((char *)s->merges[i]);
    free(s->merges);
}

/* Collects the regexes of the Split pre-tokenizers (in order) and whether a ByteLevel one with
 * use_regex appears. Returns the count, or -1 for a component we do not know. */
static int collect_pre(const json_t *pt, const char **re, int max, int *n, int *bl_regex, int *bytelevel) {
    if (!pt || json_is_null(pt)) return 0;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type) return -1;
    if (strcmp(type, "Sequence") == 0) {
        const json_t *arr = json_object_get(pt, "pretokenizers");
        size_t i;
        const json_t *v;
        if (!json_is_array(arr)) return -1;
        json_array_foreach(arr, i, v) if (collect_pre(v, re, max, n, bl_regex, bytelevel) < 0) return -1;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        const json_t *ur = json_object_get(pt, "use_regex");
        *bytelevel = 1;
        if (!ur || json_is_true(ur)) *bl_regex = 1; /* use_regex defaults to true */
        return 0;
    }
    if (strcmp(type, "Split") == 0) {
        const json_t *pat = json_object_get(pt, "pattern");
        const char *r = json_string_value(json_object_get(pat, "Regex"));
        const char *behavior = json_string_value(json_object_get(pt, "behavior"));
        if (!r || (behavior && strcmp(behavior, "Isolated") != 0) || json_is_true(json_object_get(pt, "invert")))
            return -1;
        if (*n >= max) return -1;
        re[(*n)++] = r;
        return 0;
    }
    return -1;
}

static int detect_pre(const json_t *root, const char **pre, cm_err *err) {
    const char *re[8];
    int n = 0, bl_regex = 0, bytelevel = 0;
    const json_t *pt = json_object_get(root, "pre_tokenizer");
    if (collect_pre(pt, re, 8, &n, &bl_regex, &bytelevel) < 0) {
        char *dump = json_dumps(pt, JSON_COMPACT);
        cm_err_set(err, CM_E_UNSUPPORTED, "convert: unsupported pre_tokenizer %.200s", dump ? dump : "?");
        free(dump);
        return CM_E_UNSUPPORTED;
    }
    const char *dec = json_string_value(json_object_get(json_object_get(root, "decoder"), "type"));
    if (!bytelevel && !(dec && strcmp(dec, "ByteLevel") == 0))
        return cm_err_set(err, CM_E_UNSUPPORTED,
                          "convert: not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer or decoder); "
                          "SentencePiece-style BPE is not supported");
    *pre = NULL;
    if (n == 0 && bl_regex) *pre = "gpt-2";
    else if (n == 1 && !bl_regex && strcmp(re[0], re_qwen2) == 0) *pre = "qwen2";
    else if (n == 1 && !bl_regex && strcmp(re[0], re_llama3) == 0) *pre = "llama-bpe";
    else if (n == 1 && !bl_regex && strcmp(re[0], re_gpt2) == 0) *pre = "gpt-2";
    else if (n == 5 && !bl_regex) {
        int same = 1;
        for (int i = 0; i < 5; i++) same &= strcmp(re[i], re_deepseek_coder[i]) == 0;
        if (same) *pre = "deepseek-coder";
    }
    if (!*pre)
        return cm_err_set(err, CM_E_UNSUPPORTED,
                          "convert: unrecognised pre-tokenizer (%d split regexes%s; first: %.120s)", n,
                          bl_regex ? " + ByteLevel regex" : "", n ? re[0] : "-");
    return CM_OK;
}

static int looks_special(const char *s) {
    size_t n = strlen(s);
    if (n >= 4 && memcmp(s, "<|", 2) == 0 && memcmp(s + n - 2, "|>", 2) == 0) return 1;
    /* DeepSeek's fullwidth bars: <｜ ... ｜> */
    if (n >= 8 && memcmp(s, "<\xef\xbd\x9c", 4) == 0 && memcmp(s + n - 4, "\xef\xbd\x9c>", 4) == 0) return 1;
    return 0;
}

/* A JSON string without embedded NULs (a GGUF string could carry one, but the writer takes C strings). */
static const char *json_cstr(const json_t *v) {
    const char *s = json_string_value(v);
    if (s && strlen(s) != json_string_length(v)) return NULL;
    return s;
}

static int32_t find_token(const ct_state *s, const char *text) {
    if (!text) return -1;
    for (int i = s->n - 1; i >= 0; i--) /* added tokens sit at the end: search from there */
        if (s->tok[i] && strcmp(s->tok[i], text) == 0) return i;
    return -1;
}

/* tokenizer_config.json's bos_token / eos_token / pad_token: a string or {"content": ...}. */
static const char *config_token(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_string_value(v);
}

static int build_tokens(ct_state *s, const json_t *root, int n_vocab_model, cm_err *err) {
    const json_t *model = json_object_get(root, "model");
    s->vocab = json_object_get(model, "vocab");
    s->added = json_object_get(root, "added_tokens");
    if (!json_is_object(s->vocab) || json_object_size(s->vocab) == 0)
        return cm_err_set(err, CM_E_FORMAT, "convert: tokenizer.json has no model.vocab object");
    if (s->added && !json_is_array(s->added))
        return cm_err_set(err, CM_E_FORMAT, "convert: tokenizer.json added_tokens is not an array");

    json_int_t max_id = -1;
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)s->vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= CT_MAX_VOCAB)
            return cm_err_set(err, CM_E_FORMAT, "convert: vocab entry \"%.60s\" has a bad id", key);
        if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
    }
    size_t i;
    json_array_foreach((json_t *)s->added, i, v) {
        const json_t *id = json_object_get(v, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= CT_MAX_VOCAB ||
            !json_cstr(json_object_get(v, "content")))
            return cm_err_set(err, CM_E_FORMAT, "convert: added_tokens[%zu] has a bad id or content", i);
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    int n_tok = (int)max_id + 1;
    if (n_vocab_model > 0 && n_vocab_model < n_tok)
        return cm_err_set(err, CM_E_FORMAT, "convert: tokenizer has %d tokens but the model only %d embedding rows",
                          n_tok, n_vocab_model);
    s->n = n_vocab_model > n_tok ? n_vocab_model : n_tok;
    s->tok = calloc((size_t)s->n, sizeof *s->tok);
    s->type = calloc((size_t)s->n, sizeof *s->type);
    if (!s->tok || !s->type) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");

    json_object_foreach((json_t *)s->vocab, key, v) {
        int id = (int)json_integer_value(v);
        if (s->tok[id]) return cm_err_set(err, CM_E_FORMAT, "convert: vocab id %d is used twice", id);
        s->tok[id] = strdup(key);
        s->type[id] = 1;
        if (!s->tok[id]) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    }
    json_array_foreach((json_t *)s->added, i, v) {
        int id = (int)json_integer_value(json_object_get(v, "id"));
        const char *content = json_cstr(json_object_get(v, "content"));
        free(s->tok[id]);
        s->tok[id] = strdup(content);
        if (!s->tok[id]) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        s->type[id] = json_is_true(json_object_get(v, "special")) || looks_special(content) ? 3 : 4;
    }
    for (int k = 0; k < s->n; k++) {
        if (s->tok[k]) continue;
        char buf[32];
        snprintf(buf, sizeof buf, "[PAD%d]", k);
        s->tok[k] = strdup(buf);
        s->type[k] = 5;
        if (!s->tok[k]) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    }
    return CM_OK;
}

static int build_merges(ct_state *s, const json_t *root, cm_err *err) {
    const json_t *merges = json_object_get(json_object_get(root, "model"), "merges");
    if (!merges) return CM_OK;
    if (!json_is_array(merges)) return cm_err_set(err, CM_E_FORMAT, "convert: model.merges is not an array");
    s->n_merges = json_array_size(merges);
    s->merges = calloc(s->n_merges ? s->n_merges : 1, sizeof *s->merges);
    if (!s->merges) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    size_t i;
    const json_t *v;
    json_array_foreach((json_t *)merges, i, v) {
        if (json_is_string(v)) {
            s->merges[i] = strdup(json_string_value(v));
        } else if (json_is_array(v) && json_array_size(v) == 2 && json_cstr(json_array_get(v, 0)) &&
                   json_cstr(json_array_get(v, 1))) {
            /* newer tokenizer.json: ["a", "b"] -> "a b" */
            const char *a = json_string_value(json_array_get(v, 0)), *b = json_string_value(json_array_get(v, 1));
            size_t la = strlen(a), lb = strlen(b);
            /* GGUF joins the parts with a space and splits at the first one after the first byte */
            if (la == 0 || lb == 0 || strchr(a + 1, ' '))
                return cm_err_set(err, CM_E_UNSUPPORTED, "convert: model.merges[%zu] [\"%.40s\", \"%.40s\"] cannot "
                                  "be written as \"a b\"", i, a, b);
            char *m = malloc(la + lb + 2);
            if (m) {
                memcpy(m, a, la);
                m[la] = ' ';
                memcpy(m + la + 1, b, lb + 1);
            }
            s->merges[i] = m;
        } else {
            return cm_err_set(err, CM_E_FORMAT, "convert: model.merges[%zu] is neither \"a b\" nor [a, b]", i);
        }
        if (!s->merges[i]) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    }
    return CM_OK;
}

int cm_convert_tokenizer_json(const char *tokenizer_json_path, const char *tokenizer_config_path,
                              gguf_writer *w, int n_vocab_model, cm_err *err) {
    json_error_t je;
    json_t *root = json_load_file(tokenizer_json_path, 0, &je);
    if (!root)
        return cm_err_set(err, CM_E_IO, "convert: %s: %s (line %d)", tokenizer_json_path, je.text, je.line);
    json_t *cfg = NULL;
    ct_state s = {0};
    int rc;
    if (tokenizer_config_path) {
        /* only strings and booleans are read from it; model_max_length can exceed int64 */
        cfg = json_load_file(tokenizer_config_path, JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg) {
            rc = cm_err_set(err, CM_E_IO, "convert: %s: %s (line %d)", tokenizer_config_path, je.text, je.line);
            goto done;
        }
    }
    const json_t *model = json_object_get(root, "model");
    const char *mtype = json_string_value(json_object_get(model, "type"));
    if (!mtype || strcmp(mtype, "BPE") != 0) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: tokenizer model type '%s' is not supported (BPE only)",
                        mtype ? mtype : "?");
        goto done;
    }
    const char *pre = NULL;
    if ((rc = detect_pre(root, &pre, err)) < 0) goto done;
    if ((rc = build_tokens(&s, root, n_vocab_model, err)) < 0) goto done;
    if ((rc = build_merges(&s, root, err)) < 0) goto done;

    /* Special ids: tokenizer_config.json when given, else the conventional <|endoftext|> as EOS. */
    int32_t bos = -1, eos = -1, pad = -1, eot = -1;
    int add_bos = -1;
    if (cfg) {
        bos = find_token(&s, config_token(cfg, "bos_token"));
        eos = find_token(&s, config_token(cfg, "eos_token"));
        pad = find_token(&s, config_token(cfg, "pad_token"));
        const json_t *ab = json_object_get(cfg, "add_bos_token");
        if (json_is_boolean(ab)) add_bos = json_is_true(ab);
    }
    if (eos < 0) eos = find_token(&s, "<|endoftext|>");
    if (eot < 0) eot = find_token(&s, "<|eot_id|>");
    if (eot < 0) eot = find_token(&s, "<|im_end|>");
    if (add_bos < 0) {
        /* No explicit flag: BOS is added when the post-processor template inserts it (Llama-3). */
        add_bos = 0;
        if (bos >= 0) {
            char *pp = json_dumps(json_object_get(root, "post_processor"), JSON_COMPACT);
            char *quoted = malloc(strlen(s.tok[bos]) + 3);
            if (pp && quoted) {
                sprintf(quoted, "\"%s\"", s.tok[bos]);
                add_bos = strstr(pp, quoted) != NULL;
            }
            free(pp);
            free(quoted);
        }
    }
    int32_t fim_pre = find_token(&s, "<|fim_prefix|>"), fim_suf = find_token(&s, "<|fim_suffix|>"),
            fim_mid = find_token(&s, "<|fim_middle|>");
    if (fim_pre < 0) fim_pre = find_token(&s, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>");
    if (fim_suf < 0) fim_suf = find_token(&s, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>");
    if (fim_mid < 0) fim_mid = find_token(&s, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>");

    rc = CM_OK;
    rc |= gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    rc |= gguf_writer_set_str(w, "tokenizer.ggml.pre", pre);
    rc |= gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)s.tok, (uint64_t)s.n);
    rc |= gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", s.type, (uint64_t)s.n);
    if (s.n_merges) rc |= gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", s.merges, s.n_merges);
    if (bos >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)bos);
    if (eos >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
    if (eot >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.eot_token_id", (uint32_t)eot);
    if (pad >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)pad);
    if (fim_pre >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.fim_pre_token_id", (uint32_t)fim_pre);
    if (fim_suf >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.fim_suf_token_id", (uint32_t)fim_suf);
    if (fim_mid >= 0) rc |= gguf_writer_set_u32(w, "tokenizer.ggml.fim_mid_token_id", (uint32_t)fim_mid);
    rc |= gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", add_bos);
    if (rc != CM_OK) rc = cm_err_set(err, CM_E_NOMEM, "convert: could not add tokenizer keys to the GGUF writer");
done:
    ct_free(&s);
    json_decref(cfg);
    json_decref(root);
    return rc;
}
