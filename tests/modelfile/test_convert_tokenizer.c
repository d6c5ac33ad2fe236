/*
 * test_convert_tokenizer.c - modelfile/convert_tokenizer.c: Hugging Face tokenizer.json (+
 * tokenizer_config.json) -> tokenizer.ggml.* keys. Each case is converted, written as a vocab-only GGUF
 * and loaded by the engine: token types, padding to the model's rows (holes named [PAD<i>]), both
 * merge spellings, pre-tokenizer detection (qwen2, gpt-2), BOS from the post-processor template and
 * the config, and every malformed or unsupported input refused with its code.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "codemoe.h"
#include "convert.h"
#include "test.h"

static char tmpdir[256];

static int write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

/* Converts json (+ optional config) into a vocab-only GGUF (as cm_convert_hf does for a directory with
 * only a tokenizer) and loads it through the public API; NULL with err on failure. */
static cm_model *convert_load(const char *json, const char *config, int n_vocab_model, cm_err *err) {
    char jp[512], cp[512], gp[512];
    snprintf(jp, sizeof jp, "%s/tokenizer.json", tmpdir);
    snprintf(cp, sizeof cp, "%s/tokenizer_config.json", tmpdir);
    snprintf(gp, sizeof gp, "%s/conv.gguf", tmpdir);
    write_file(jp, json);
    if (config) write_file(cp, config);
    gguf_writer *w = gguf_writer_create(err);
    int rc = w ? gguf_writer_set_str(w, "general.architecture", "none") : CM_E_NOMEM;
    if (rc >= 0) rc = cm_convert_tokenizer_json(jp, config ? cp : NULL, w, n_vocab_model, err);
    if (rc >= 0) rc = gguf_writer_write(w, gp, err);
    gguf_writer_free(w);
    unlink(jp);
    unlink(cp);
    if (rc < 0) return NULL;
    cm_model_params mp = {.vocab_only = 1};
    cm_model *m = cm_model_load(gp, &mp, err);
    unlink(gp);
    return m;
}

/* A byte-level tokenizer.json with a 6-token vocabulary (no byte coverage: fine for conversion). */
#define TJ_HEAD "{\"added_tokens\": [" \
    "{\"id\": 6, \"content\": \"<|endoftext|>\", \"special\": true}," \
    "{\"id\": 7, \"content\": \"<|fim_prefix|>\", \"special\": false}," \
    "{\"id\": 9, \"content\": \"<tool>\", \"special\": false}]," \
    "\"normalizer\": {\"type\": \"NFC\"},"
#define TJ_MODEL "\"decoder\": {\"type\": \"ByteLevel\"}," \
    "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3, \"abc\": 4, \"\\u0120\": 5}," \
    "\"merges\": [[\"a\", \"b\"], \"ab c\"]}}"
#define PRE_QWEN "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": " \
    "{\"Regex\": \"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}," \
    " \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"use_regex\": false}]},"

TEST(convert_tokenizer_json) {
    cm_err err = {0};
    cm_model *m = convert_load(TJ_HEAD PRE_QWEN TJ_MODEL, "{\"eos_token\": {\"content\": \"<|endoftext|>\"},"
                               " \"model_max_length\": 1000000000000000019884624838656}", 12, &err);
    if (!m) fprintf(stderr, "%s\n", err.msg);
    ASSERT_TRUE(m);
    ASSERT_STREQ(cm_model_get_info(m)->tok_pre, "qwen2");
    ASSERT_EQ_INT(cm_model_get_info(m)->n_vocab, 12);        /* padded to the model's rows */
    ASSERT_EQ_INT(cm_model_get_info(m)->eos, 6);
    ASSERT_EQ_INT(cm_model_get_info(m)->fim_pre, 7);
    ASSERT_TRUE(cm_token_is_control(m, 6));
    ASSERT_TRUE(cm_token_is_control(m, 7));    /* not special in HF, but looks like a control token */
    ASSERT_TRUE(!cm_token_is_control(m, 9));   /* user-defined */
    ASSERT_STREQ(cm_token_text(m, 8, NULL), "[PAD8]"); /* hole between added ids */
    ASSERT_STREQ(cm_token_text(m, 11, NULL), "[PAD11]");
    char b[8];
    ASSERT_EQ_INT(cm_token_bytes(m, 11, 0, b, sizeof b), 0); /* unused: renders as nothing */
    int32_t ids[8];
    int n = cm_tokenize(m, "abc", 3, 0, ids, 8, NULL);
    ASSERT_IDS(ids, n, 4);                     /* both merge spellings understood */
    n = cm_tokenize(m, "<tool>ab", 8, CM_TOK_PARSE_SPECIAL, ids, 8, NULL);
    ASSERT_IDS(ids, n, 9, 3);
    cm_model_free(m);

    /* GPT-2 style: ByteLevel with its own regex */
    m = convert_load(TJ_HEAD "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false}," TJ_MODEL,
                     NULL, 0, &err);
    ASSERT_TRUE(m);
    ASSERT_STREQ(cm_model_get_info(m)->tok_pre, "gpt-2");
    ASSERT_EQ_INT(cm_model_get_info(m)->n_vocab, 10);
    ASSERT_EQ_INT(cm_model_get_info(m)->eos, 6);             /* <|endoftext|> without a config */
    ASSERT_EQ_INT(cm_model_get_info(m)->add_bos, 0);
    cm_model_free(m);

    /* BOS added when the post-processor template inserts it (Llama-3), unless the config says no */
#define TJ_TEMPLATE "\"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": " \
    "{\"id\": \"<|endoftext|>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}]},"
    m = convert_load(TJ_HEAD TJ_TEMPLATE PRE_QWEN TJ_MODEL, "{\"bos_token\": \"<|endoftext|>\"}", 0, &err);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->bos, 6);
    ASSERT_EQ_INT(cm_model_get_info(m)->add_bos, 1);
    int32_t bids[4];
    n = cm_tokenize(m, "ab", 2, CM_TOK_ADD_BOS, bids, 4, NULL);
    ASSERT_IDS(bids, n, 6, 3);
    cm_model_free(m);
    m = convert_load(TJ_HEAD TJ_TEMPLATE PRE_QWEN TJ_MODEL,
                     "{\"bos_token\": \"<|endoftext|>\", \"add_bos_token\": false}", 0, &err);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->add_bos, 0);
    cm_model_free(m);
}

TEST(convert_rejects) {
    cm_err err = {0};
    struct { const char *json; int n_model; int code; const char *what; } cases[] = {
        {TJ_HEAD PRE_QWEN TJ_MODEL, 5, CM_E_FORMAT, "model has fewer rows than tokens"},
        {TJ_HEAD "\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}, \"behavior\": \"Isolated\"},"
         TJ_MODEL, 0, CM_E_UNSUPPORTED, "unknown regex"},
        {TJ_HEAD "\"pre_tokenizer\": {\"type\": \"Metaspace\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}}",
         0, CM_E_UNSUPPORTED, "SentencePiece-style"},
        {"{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", 0, CM_E_UNSUPPORTED, "unigram"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}}, \"decoder\": {\"type\": \"ByteLevel\"},"
         " \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", 0, CM_E_FORMAT, "negative id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"},"
         " \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", 0, CM_E_FORMAT, "duplicate id"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [5]}, \"decoder\": {\"type\": \"ByteLevel\"},"
         " \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", 0, CM_E_FORMAT, "merge not a string"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [[\"a b\", \"c\"]]}, \"decoder\": "
         "{\"type\": \"ByteLevel\"}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", 0, CM_E_UNSUPPORTED, "merge part with a space"},
        {"{\"model\": ", 0, CM_E_IO, "truncated json"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memset(&err, 0, sizeof err);
        cm_model *m = convert_load(cases[i].json, NULL, cases[i].n_model, &err);
        if (m) {
            TEST_FAIL_("%s: converted", cases[i].what);
            cm_model_free(m);
            continue;
        }
        if (err.code != cases[i].code) TEST_FAIL_("%s: code %d (%s)", cases[i].what, err.code, err.msg);
        else fprintf(stderr, "  %s -> %s\n", cases[i].what, err.msg);
    }
}


int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/cm_convtok_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(convert_tokenizer_json);
    RUN(convert_rejects);
    rmdir(tmpdir);
    return test_summary();
}
