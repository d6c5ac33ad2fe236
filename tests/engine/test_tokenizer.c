/*
 * test_tokenizer.c - tokenizer unit tests on tiny vocabularies written in-test with the GGUF writer:
 * BPE merge order, special-token parsing on/off (longest match), invalid UTF-8 in and out, empty input,
 * output-buffer sizing, a megabyte of spaces, NFC (qwen2 only), llama-bpe whole-word lookup, the
 * streaming detokenizer's hold-back and U+FFFD rules, hostile metadata rejected at load (the
 * tokenizer.json converter is tests/modelfile/test_convert_tokenizer.c). Also the text -> ids cases that tools/make_fixtures.py (a Python BPE, independent of this code) wrote for the fixture models.
 */
#include <glob.h>
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

#include "codemoe.h"
#include "gguf.h"
#include "gguf_writer.h"
#include "model.h"
#include "test.h"

static char tmpdir[256];

/* ------------------------------------------------------------ tiny vocabulary */

/* Ids 0..255: the byte-level token of byte i. Then merged tokens and specials, listed here. */
enum { T_EOT = 256, T_FIM_PRE, T_TOOL, T_TOOLCALL, T_AB, T_BC, T_ABC, T_SP2, T_SP4, T_IM_END, T_N };

static char byte_tok[256][4];

static void byte_tokens_init(void) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        unsigned cp = printable ? (unsigned)b : 256u + (unsigned)n++;
        char *o = byte_tok[b];
        if (cp < 0x80) { o[0] = (char)cp; o[1] = 0; }
        else { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); o[2] = 0; }
    }
}

typedef struct vocab_opts {
    const char *model, *pre;
    const char *const *merges; /* NULL: the default list */
    int n_merges;
    int n_types;               /* token_type array length (0: T_N) */
    int bad_type;              /* write a type 9 */
    int32_t bos;               /* -1: absent */
    int add_bos;
    int no_tokens;
} vocab_opts;

static const char *const default_merges[] = {
    "b c",           /* rank 0: "abc" -> a + bc */
    "a b",
    "\xc4\xa0 \xc4\xa0",              /* Ġ Ġ */
    "\xc4\xa0\xc4\xa0 \xc4\xa0\xc4\xa0", /* ĠĠ ĠĠ */
};

static cm_model *vocab_load(const vocab_opts *o, cm_err *err) {
    static int seq;
    char path[512];
    snprintf(path, sizeof path, "%s/v%d.gguf", tmpdir, seq++);
    const char *tok[T_N];
    int32_t type[T_N + 1];
    for (int b = 0; b < 256; b++) { tok[b] = byte_tok[b]; type[b] = 1; }
    tok[T_EOT] = "<|endoftext|>";    type[T_EOT] = 3;
    tok[T_FIM_PRE] = "<|fim_prefix|>"; type[T_FIM_PRE] = 3;
    tok[T_TOOL] = "<tool>";           type[T_TOOL] = 4;
    tok[T_TOOLCALL] = "<tool>call";   type[T_TOOLCALL] = 4;
    tok[T_AB] = "ab";                 type[T_AB] = 1;
    tok[T_BC] = "bc";                 type[T_BC] = 1;
    tok[T_ABC] = "abc";               type[T_ABC] = 1;
    tok[T_SP2] = "\xc4\xa0\xc4\xa0";  type[T_SP2] = 1;
    tok[T_SP4] = "\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0"; type[T_SP4] = 1;
    tok[T_IM_END] = "<|im_end|>";     type[T_IM_END] = 3;
    if (o->bad_type) type[T_AB] = 9;
    type[T_N] = 1;

    gguf_writer *w = gguf_writer_create(err);
    if (!w) return NULL;
    gguf_writer_set_str(w, "general.architecture", "qwen2");
    gguf_writer_set_str(w, "tokenizer.ggml.model", o->model ? o->model : "gpt2");
    if (o->pre) gguf_writer_set_str(w, "tokenizer.ggml.pre", o->pre);
    if (!o->no_tokens) gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", tok, T_N);
    gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", type, (uint64_t)(o->n_types ? o->n_types : T_N));
    if (o->merges) gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", o->merges, (uint64_t)o->n_merges);
    else gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", default_merges, 4);
    gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", T_EOT);
    if (o->bos >= 0) gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)o->bos);
    gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", o->add_bos);
    int rc = gguf_writer_write(w, path, err);
    gguf_writer_free(w);
    if (rc < 0) return NULL;

    cm_model *m = calloc(1, sizeof *m);
    if (gguf_open(&m->gguf, path, err) < 0 || !(m->tok = cm_tokenizer_load(&m->gguf, &m->info, err))) {
        gguf_close(&m->gguf);
        free(m);
        m = NULL;
    }
    unlink(path);
    return m;
}

static void vocab_free(cm_model *m) {
    if (!m) return;
    cm_tokenizer_free(m->tok);
    gguf_close(&m->gguf);
    free(m);
}

static cm_model *vocab_default(const char *pre) {
    vocab_opts o = {.pre = pre, .bos = -1};
    cm_err err = {0};
    cm_model *m = vocab_load(&o, &err);
    if (!m) fprintf(stderr, "vocab_load: %s\n", err.msg);
    return m;
}

static int tok(const cm_model *m, const char *s, size_t n, int flags, int32_t *out, int cap) {
    cm_err err = {0};
    int r = cm_tokenize(m, s, n, flags, out, cap, &err);
    if (r < 0) fprintf(stderr, "cm_tokenize: %s\n", err.msg);
    return r;
}

/* ------------------------------------------------------------ tests */

TEST(load_fills_info) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(m->info.n_vocab, T_N);
    ASSERT_STREQ(m->info.tok_model, "gpt2");
    ASSERT_STREQ(m->info.tok_pre, "qwen2");
    ASSERT_EQ_INT(m->info.eos, T_EOT);
    ASSERT_EQ_INT(m->info.bos, -1);
    ASSERT_EQ_INT(m->info.fim_pre, T_FIM_PRE); /* found by its text: the file has no fim key */
    ASSERT_EQ_INT(m->info.fim_suf, -1);
    ASSERT_TRUE(cm_token_is_eog(m, T_EOT));
    ASSERT_TRUE(cm_token_is_eog(m, T_IM_END));
    ASSERT_TRUE(!cm_token_is_eog(m, T_AB));
    ASSERT_TRUE(cm_token_is_control(m, T_EOT));
    ASSERT_TRUE(!cm_token_is_control(m, T_TOOL));
    ASSERT_TRUE(!cm_token_is_control(m, -1) && !cm_token_is_eog(m, T_N));
    size_t len = 0;
    ASSERT_STREQ(cm_token_text(m, T_SP2, &len), "\xc4\xa0\xc4\xa0");
    ASSERT_EQ_INT(len, 4);
    ASSERT_TRUE(cm_token_text(m, T_N, &len) == NULL);
    vocab_free(m);
}

TEST(bpe_merge_order) {
    /* "b c" has rank 0, "a b" rank 1: "abc" is a + bc, and no merge joins those. */
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    int32_t ids[16];
    int n = tok(m, "abc", 3, 0, ids, 16);
    ASSERT_IDS(ids, n, 'a', T_BC);
    n = tok(m, "abab", 4, 0, ids, 16);
    ASSERT_IDS(ids, n, T_AB, T_AB);
    vocab_free(m);

    /* Swapped ranks, plus "ab c": ab first, then abc. */
    static const char *const swapped[] = {"a b", "b c", "ab c"};
    vocab_opts o = {.pre = "qwen2", .merges = swapped, .n_merges = 3, .bos = -1};
    cm_err err = {0};
    m = vocab_load(&o, &err);
    ASSERT_TRUE(m);
    n = tok(m, "abc", 3, 0, ids, 16);
    ASSERT_IDS(ids, n, T_ABC);
    n = tok(m, "bcab", 4, 0, ids, 16); /* "bcab" is one regex piece: b c merge at 0, a b at 2 */
    ASSERT_IDS(ids, n, T_BC, T_AB);
    vocab_free(m);
}

TEST(llama_bpe_whole_word_lookup) {
    /* llama-bpe looks the piece up first ("ignore_merges"): "abc" is in the vocabulary. */
    cm_model *m = vocab_default("llama-bpe");
    ASSERT_TRUE(m);
    int32_t ids[16];
    int n = tok(m, "abc", 3, 0, ids, 16);
    ASSERT_IDS(ids, n, T_ABC);
    vocab_free(m);
}

TEST(special_tokens_on_off) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    const char *s = "x<|endoftext|>y";
    int32_t ids[64];
    int n = tok(m, s, strlen(s), CM_TOK_PARSE_SPECIAL, ids, 64);
    ASSERT_IDS(ids, n, 'x', T_EOT, 'y');
    /* off: the string is text, byte by byte (no merges apply): x < | endoftext | > y */
    n = tok(m, s, strlen(s), 0, ids, 64);
    ASSERT_EQ_INT(n, (int)strlen(s));
    for (int i = 0; i < n; i++) ASSERT_TRUE(ids[i] < 256 && ids[i] != T_EOT);
    /* longest match at a position: "<tool>call" beats "<tool>", user-defined tokens split too */
    s = "<tool>call <tool>ca";
    n = tok(m, s, strlen(s), CM_TOK_PARSE_SPECIAL, ids, 64);
    ASSERT_IDS(ids, n, T_TOOLCALL, ' ', T_TOOL, 'c', 'a');
    /* adjacent specials, and a special at the very end */
    s = "<|endoftext|><|fim_prefix|>";
    n = tok(m, s, strlen(s), CM_TOK_PARSE_SPECIAL, ids, 64);
    ASSERT_IDS(ids, n, T_EOT, T_FIM_PRE);
    /* a prefix of a special is plain text */
    s = "<|endoftext|";
    n = tok(m, s, strlen(s), CM_TOK_PARSE_SPECIAL, ids, 64);
    ASSERT_EQ_INT(n, (int)strlen(s));
    vocab_free(m);
}

TEST(control_tokens_render_only_when_asked) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    char buf[64];
    ASSERT_EQ_INT(cm_token_bytes(m, T_EOT, 0, buf, sizeof buf), 0);
    ASSERT_EQ_INT(cm_token_bytes(m, T_EOT, 1, buf, sizeof buf), 13);
    ASSERT_TRUE(memcmp(buf, "<|endoftext|>", 13) == 0);
    ASSERT_EQ_INT(cm_token_bytes(m, T_TOOL, 0, buf, sizeof buf), 6); /* user-defined: always text */
    ASSERT_EQ_INT(cm_token_bytes(m, T_SP4, 0, buf, sizeof buf), 4);
    ASSERT_TRUE(memcmp(buf, "    ", 4) == 0);
    ASSERT_EQ_INT(cm_token_bytes(m, 0x0a, 0, buf, sizeof buf), 1);
    ASSERT_EQ_INT(buf[0], '\n');
    ASSERT_TRUE(cm_token_bytes(m, T_N, 0, buf, sizeof buf) < 0);
    ASSERT_TRUE(cm_token_bytes(m, -5, 0, buf, sizeof buf) < 0);
    int32_t ids[] = {'a', T_EOT, 'b'};
    ASSERT_EQ_INT(cm_detokenize(m, ids, 3, 0, buf, sizeof buf), 2);
    ASSERT_EQ_INT(cm_detokenize(m, ids, 3, 1, buf, sizeof buf), 15);
    ASSERT_TRUE(memcmp(buf, "a<|endoftext|>b", 15) == 0);
    vocab_free(m);
}

TEST(every_byte_and_invalid_utf8) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    char all[256];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    int32_t ids[1024];
    int n = tok(m, all, 256, CM_TOK_PARSE_SPECIAL, ids, 1024);
    ASSERT_TRUE(n > 0 && n <= 256);
    /* the raw bytes of the tokens give the input back exactly */
    char back[512];
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        int w = cm_token_bytes(m, ids[i], 1, back + k, sizeof back - k);
        ASSERT_TRUE(w >= 0);
        k += (size_t)w;
    }
    ASSERT_EQ_INT(k, 256);
    ASSERT_TRUE(memcmp(back, all, 256) == 0);

    /* invalid sequences decode to U+FFFD, valid text around them survives */
    const char *bad = "ok\xff\xc3(\xe2\x82 end\xf0\x9f\x98";
    n = tok(m, bad, strlen(bad), 0, ids, 1024);
    ASSERT_TRUE(n > 0);
    char out[128];
    int dn = cm_detokenize(m, ids, n, 0, out, sizeof out);
    const char *want = "ok\xef\xbf\xbd\xef\xbf\xbd(\xef\xbf\xbd end\xef\xbf\xbd";
    ASSERT_EQ_INT(dn, (int)strlen(want));
    ASSERT_TRUE(memcmp(out, want, (size_t)dn) == 0);
    vocab_free(m);
}

TEST(empty_input_and_bos) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    int32_t ids[4] = {-7};
    ASSERT_EQ_INT(tok(m, "", 0, CM_TOK_PARSE_SPECIAL, ids, 4), 0);
    ASSERT_EQ_INT(tok(m, NULL, 0, 0, NULL, 0), 0);
    ASSERT_EQ_INT(tok(m, "", 0, CM_TOK_ADD_BOS, ids, 4), 0); /* no BOS in this vocabulary */
    ASSERT_EQ_INT(cm_detokenize(m, ids, 0, 0, NULL, 0), 0);
    vocab_free(m);

    vocab_opts o = {.pre = "qwen2", .bos = T_IM_END, .add_bos = 1};
    cm_err err = {0};
    m = vocab_load(&o, &err);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(m->info.add_bos, 1);
    int n = tok(m, "a", 1, CM_TOK_ADD_BOS, ids, 4);
    ASSERT_IDS(ids, n, T_IM_END, 'a');
    n = tok(m, "a", 1, 0, ids, 4);
    ASSERT_IDS(ids, n, 'a');
    vocab_free(m);
}

TEST(output_buffer_too_small) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    int32_t ids[8] = {0};
    const char *s = "x y z w v";
    int need = tok(m, s, strlen(s), 0, NULL, 0);
    ASSERT_EQ_INT(need, 9);
    ids[3] = -99;
    ASSERT_EQ_INT(tok(m, s, strlen(s), 0, ids, 3), 9);
    ASSERT_EQ_INT(ids[3], -99); /* nothing written past cap */
    cm_err err = {0};
    ASSERT_EQ_INT(cm_tokenize(m, s, strlen(s), 0, NULL, 3, &err), CM_E_INVAL);
    /* detokenize reports the full size and writes only cap bytes */
    int32_t full[9];
    ASSERT_EQ_INT(tok(m, s, strlen(s), 0, full, 9), 9);
    char out[4] = {0, 0, 0, 'Z'};
    ASSERT_EQ_INT(cm_detokenize(m, full, 9, 0, out, 3), 9);
    ASSERT_TRUE(memcmp(out, "x y", 3) == 0 && out[3] == 'Z');
    vocab_free(m);
}

TEST(megabyte_of_spaces) {
    /* one 1 MiB regex piece through the heap BPE: merges Ġ+Ġ and ĠĠ+ĠĠ give 4-space tokens */
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    size_t n = 1 << 20;
    char *s = malloc(n);
    memset(s, ' ', n);
    int32_t *ids = malloc(n * sizeof *ids);
    int k = tok(m, s, n, CM_TOK_PARSE_SPECIAL, ids, (int)n);
    ASSERT_EQ_INT(k, (int)(n / 4));
    for (int i = 0; i < k; i++) CHECK_TRUE(ids[i] == T_SP4);
    char *back = malloc(n);
    ASSERT_EQ_INT(cm_detokenize(m, ids, k, 0, back, n), (int)n);
    ASSERT_TRUE(memcmp(back, s, n) == 0);
    /* and the same with newlines and tabs mixed in, under every pre-tokenizer */
    for (size_t i = 0; i < n; i += 7) s[i] = i % 2 ? '\n' : '\t';
    const char *pres[] = {"qwen2", "llama-bpe", "gpt-2", "deepseek-coder"};
    for (int p = 0; p < 4; p++) {
        cm_model *mp = vocab_default(pres[p]);
        ASSERT_TRUE(mp);
        k = tok(mp, s, n, 0, ids, (int)n);
        ASSERT_TRUE(k > 0);
        ASSERT_EQ_INT(cm_detokenize(mp, ids, k, 0, back, n), (int)n);
        ASSERT_TRUE(memcmp(back, s, n) == 0);
        vocab_free(mp);
    }
    free(s);
    free(ids);
    free(back);
    vocab_free(m);
}

TEST(nfc_only_for_qwen2) {
    const char *s = "e\xcc\x81"; /* e + COMBINING ACUTE: NFC is U+00E9 (c3 a9) */
    int32_t ids[8];
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    int n = tok(m, s, 3, 0, ids, 8);
    ASSERT_IDS(ids, n, 0xc3, 0xa9);
    vocab_free(m);
    m = vocab_default("gpt-2");
    ASSERT_TRUE(m);
    n = tok(m, s, 3, 0, ids, 8);
    ASSERT_IDS(ids, n, 'e', 0xcc, 0x81);
    vocab_free(m);
}

/* cm_tokenize_min_tokens never exceeds what cm_tokenize produces, under every pre-tokenizer (qwen2's NFC
 * included: Hangul jamo L+V+T compose 9 bytes into 3), and is exact for a text of the longest special
 * token repeated. */
TEST(min_tokens_is_a_lower_bound) {
    static const char *const texts[] = {
        "", " ", "abc", "<|fim_prefix|><|fim_prefix|><|fim_prefix|>", "\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8",
        "e\xcc\x81" "e\xcc\x81" "e\xcc\x81", "\xce\xb1\xcc\x93\xcc\x80\xcd\x85", "\xff\xfe\x80",
    };
    const char *pres[] = {"gpt-2", "llama-bpe", "deepseek-coder", "qwen2"};
    size_t n = 1 << 16;
    char *s = malloc(n);
    int32_t *ids = malloc(n * sizeof *ids);
    ASSERT_TRUE(s && ids);
    for (int p = 0; p < 4; p++) {
        cm_model *m = vocab_default(pres[p]);
        ASSERT_TRUE(m);
        ASSERT_EQ_INT(cm_tokenize_min_tokens(m, 0), 0);
        for (size_t t = 0; t < sizeof texts / sizeof *texts; t++) {
            /* each text repeated to fill the buffer, so the bound is far from 0 */
            size_t tl = strlen(texts[t]), len = 0;
            if (!tl) continue;
            while (len + tl <= n) { memcpy(s + len, texts[t], tl); len += tl; }
            for (int flags = 0; flags <= CM_TOK_PARSE_SPECIAL; flags += CM_TOK_PARSE_SPECIAL) {
                int k = tok(m, s, len, flags, ids, (int)n);
                ASSERT_TRUE(k >= 0);
                size_t lb = cm_tokenize_min_tokens(m, len);
                if ((size_t)k < lb) {
                    TEST_FAIL_("%s: text %zu (flags %d): %d tokens < bound %zu", pres[p], t, flags, k, lb);
                    return;
                }
            }
        }
        vocab_free(m);
    }
    /* 14-byte "<|fim_prefix|>" is the longest token: without NFC the bound is reached */
    cm_model *m = vocab_default("gpt-2");
    ASSERT_TRUE(m);
    size_t len = 0;
    for (int i = 0; i < 100; i++) { memcpy(s + len, "<|fim_prefix|>", 14); len += 14; }
    ASSERT_EQ_INT(tok(m, s, len, CM_TOK_PARSE_SPECIAL, ids, (int)n), 100);
    ASSERT_EQ_INT(cm_tokenize_min_tokens(m, len), 100);
    ASSERT_EQ_INT(cm_tokenize_min_tokens(m, len + 1), 101);
    vocab_free(m);
    free(s);
    free(ids);
}

TEST(detok_streaming) {
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    cm_detok d;
    char out[64];
    cm_detok_init(&d, 0);
    /* é split across two byte tokens: nothing, then the whole character */
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xc3, out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xa9, out, sizeof out), 2);
    ASSERT_TRUE(memcmp(out, "\xc3\xa9", 2) == 0);
    /* a 4-byte emoji in 4 pushes */
    const unsigned char emoji[] = {0xf0, 0x9f, 0x98, 0x80};
    for (int i = 0; i < 3; i++) ASSERT_EQ_INT(cm_detok_push(&d, m, emoji[i], out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_push(&d, m, emoji[3], out, sizeof out), 4);
    /* a lead byte followed by ASCII: U+FFFD then the ASCII */
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xe2, out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_push(&d, m, 'a', out, sizeof out), 4);
    ASSERT_TRUE(memcmp(out, "\xef\xbf\xbd" "a", 4) == 0);
    /* a stray continuation byte: U+FFFD at once */
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0x80, out, sizeof out), 3);
    /* surrogate lead ED A0: invalid second byte, two replacements (ED, then A0) */
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xed, out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xa0, out, sizeof out), 6);
    /* incomplete at the end: flush gives one U+FFFD, then nothing */
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xf0, out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0x9f, out, sizeof out), 0);
    ASSERT_EQ_INT(cm_detok_flush(&d, out, sizeof out), 3);
    ASSERT_TRUE(memcmp(out, "\xef\xbf\xbd", 3) == 0);
    ASSERT_EQ_INT(cm_detok_flush(&d, out, sizeof out), 0);
    /* control tokens: nothing unless special; bad ids and tiny buffers are errors, state kept */
    ASSERT_EQ_INT(cm_detok_push(&d, m, T_EOT, out, sizeof out), 0);
    cm_detok_init(&d, 1);
    ASSERT_EQ_INT(cm_detok_push(&d, m, T_EOT, out, sizeof out), 13);
    ASSERT_EQ_INT(cm_detok_push(&d, m, T_EOT, out, 5), CM_E_RANGE);
    ASSERT_EQ_INT(cm_detok_push(&d, m, T_N, out, sizeof out), CM_E_RANGE);
    ASSERT_EQ_INT(cm_detok_push(&d, m, 0xc3, out, sizeof out), 0);
    ASSERT_EQ_INT(d.npend, 1);
    vocab_free(m);
}

TEST(hostile_metadata_rejected) {
    cm_err err;
    struct { vocab_opts o; int code; const char *what; } cases[] = {
        {{.pre = "qwen2", .merges = (const char *const[]){"a zz"}, .n_merges = 1, .bos = -1}, CM_E_FORMAT,
         "merge with an unknown token"},
        {{.pre = "qwen2", .merges = (const char *const[]){"c a"}, .n_merges = 1, .bos = -1}, CM_E_FORMAT,
         "merge whose result is not a token"},
        {{.pre = "qwen2", .merges = (const char *const[]){"ab"}, .n_merges = 1, .bos = -1}, CM_E_FORMAT,
         "merge without a space"},
        {{.pre = "qwen2", .n_types = T_N + 1, .bos = -1}, CM_E_FORMAT, "token_type longer than tokens"},
        {{.pre = "qwen2", .n_types = 10, .bos = -1}, CM_E_FORMAT, "token_type shorter than tokens"},
        {{.pre = "qwen2", .bad_type = 1, .bos = -1}, CM_E_FORMAT, "token type 9"},
        {{.pre = "qwen2", .bos = T_N}, CM_E_FORMAT, "bos id out of range"},
        {{.pre = "qwen2", .bos = -1, .no_tokens = 1}, CM_E_FORMAT, "no tokens"},
        {{.model = "llama", .pre = "default", .bos = -1}, CM_E_UNSUPPORTED, "SentencePiece"},
        {{.pre = "falcon-9000", .bos = -1}, CM_E_UNSUPPORTED, "unknown pre-tokenizer"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memset(&err, 0, sizeof err);
        cm_model *m = vocab_load(&cases[i].o, &err);
        if (m) {
            TEST_FAIL_("%s: loaded", cases[i].what);
            vocab_free(m);
            continue;
        }
        if (err.code != cases[i].code) TEST_FAIL_("%s: code %d (%s)", cases[i].what, err.code, err.msg);
        else fprintf(stderr, "  %s -> %s\n", cases[i].what, err.msg);
    }
    /* no pre key: the GPT-2 regex */
    vocab_opts o = {.bos = -1};
    memset(&err, 0, sizeof err);
    cm_model *m = vocab_load(&o, &err);
    ASSERT_TRUE(m);
    ASSERT_STREQ(m->info.tok_pre, "default");
    vocab_free(m);
}

TEST(public_api_rejects_bad_args) {
    cm_err err = {0};
    int32_t ids[4];
    ASSERT_EQ_INT(cm_tokenize(NULL, "a", 1, 0, ids, 4, &err), CM_E_INVAL);
    cm_model empty = {0};
    ASSERT_EQ_INT(cm_tokenize(&empty, "a", 1, 0, ids, 4, &err), CM_E_INVAL);
    ASSERT_TRUE(cm_token_text(&empty, 0, NULL) == NULL);
    ASSERT_TRUE(cm_detokenize(&empty, ids, 1, 0, NULL, 0) < 0);
}

/* ------------------------------------------------------------ properties */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Random byte strings drawn from pieces that stress the regexes and the specials: every pre-tokenizer
 * must give tokens whose bytes are the input exactly (qwen2 too when the text is ASCII, which NFC
 * leaves alone), and whose decode is valid UTF-8 of the expected length class. */
TEST(random_roundtrip) {
    static const char *const parts[] = {
        " ", "  ", "\t", "\n", "\r\n", "a", "b", "c", "abc", "Z", "7", "42", "'s", "'LL", "_", "(", "){", ";",
        "<|endoftext|>", "<|end", "<tool>", "call", "\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\xcc\x81",
        "\x80", "\xff", "\xc3", "\xed\xa0\x80", "\xef\xbb\xbf", "\xe2\x80\xa8", "\x00",
    };
    const int n_parts = (int)(sizeof parts / sizeof *parts);
    const char *pres[] = {"gpt-2", "llama-bpe", "deepseek-coder", "qwen2"};
    char text[512], back[1024];
    int32_t ids[512];
    for (int p = 0; p < 4; p++) {
        cm_model *m = vocab_default(pres[p]);
        ASSERT_TRUE(m);
        for (int it = 0; it < 3000; it++) {
            size_t len = 0;
            int ascii = 1, k = (int)(rnd() % 24);
            for (int j = 0; j < k; j++) {
                const char *q = parts[rnd() % (uint32_t)n_parts];
                size_t ql = q[0] ? strlen(q) : 1; /* "\x00" is one NUL byte */
                memcpy(text + len, q, ql);
                for (size_t x = 0; x < ql; x++) ascii &= (unsigned char)q[x] < 0x80;
                len += ql;
            }
            int flags = rnd() % 2 ? CM_TOK_PARSE_SPECIAL : 0;
            int n = tok(m, text, len, flags, ids, 512);
            ASSERT_TRUE(n >= 0 && n <= (int)len);
            if (p < 3 || ascii) {
                size_t bl = 0;
                for (int i = 0; i < n; i++) bl += (size_t)cm_token_bytes(m, ids[i], 1, back + bl, sizeof back - bl);
                if (bl != len || memcmp(back, text, len) != 0) {
                    TEST_FAIL_("%s: round trip of %zu bytes gave %zu (iteration %d, flags %d)", pres[p], len, bl, it,
                               flags);
                    break;
                }
            }
            int dn = cm_detokenize(m, ids, n, 1, back, sizeof back);
            ASSERT_TRUE(dn >= 0 && (size_t)dn <= 3 * len + 3);
        }
        vocab_free(m);
    }
}

typedef struct thread_job {
    const cm_model *m;
    const char *text;
    size_t len;
    const int32_t *want;
    int n_want;
    int bad;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *j = arg;
    int32_t ids[4096];
    for (int it = 0; it < 50; it++) {
        int n = cm_tokenize(j->m, j->text, j->len, CM_TOK_PARSE_SPECIAL, ids, 4096, NULL);
        if (n != j->n_want || memcmp(ids, j->want, (size_t)n * sizeof *ids) != 0) j->bad++;
    }
    return NULL;
}

TEST(shared_between_threads) {
    /* one tokenizer, four threads: results identical to a single-threaded run (scratch is per call) */
    cm_model *m = vocab_default("qwen2");
    ASSERT_TRUE(m);
    char text[2048];
    size_t len = 0;
    static const char unit[] = "abc  ab<|endoftext|>\tcaf\xc3\xa9 e\xcc\x81 42\n";
    while (len + sizeof unit < sizeof text) {
        memcpy(text + len, unit, sizeof unit - 1);
        len += sizeof unit - 1;
    }
    int32_t want[4096];
    int n = tok(m, text, len, CM_TOK_PARSE_SPECIAL, want, 4096);
    ASSERT_TRUE(n > 0);
    pthread_t th[4];
    thread_job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (thread_job){m, text, len, want, n, 0};
        ASSERT_EQ_INT(pthread_create(&th[i], NULL, thread_main, &jobs[i]), 0);
    }
    int bad = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        bad += jobs[i].bad;
    }
    ASSERT_EQ_INT(bad, 0);
    vocab_free(m);
}

/* ------------------------------------------------------------ fixture goldens */

/* ids == expected (a JSON array); prints the first difference. */
static int ids_match(const char *what, const int32_t *ids, int n, const json_t *want) {
    int nw = (int)json_array_size(want);
    for (int i = 0; i < n || i < nw; i++) {
        long long g = i < n ? ids[i] : -1, w = i < nw ? (long long)json_integer_value(json_array_get(want, (size_t)i)) : -1;
        if (g != w) {
            fprintf(stderr, "  %s: %d tokens, expected %d; at %d got %lld want %lld\n", what, n, nw, i, g, w);
            return 0;
        }
    }
    return 1;
}

TEST(fixture_model_goldens) {
    char pat[4096];
    snprintf(pat, sizeof pat, "%s", test_fixture("golden/*.json"));
    glob_t gl;
    ASSERT_EQ_INT(glob(pat, 0, NULL, &gl), 0);
    int checked = 0;
    for (size_t f = 0; f < gl.gl_pathc; f++) {
        json_t *j = json_load_file(gl.gl_pathv[f], 0, NULL);
        const char *model = json_string_value(json_object_get(j, "model"));
        if (!model) { json_decref(j); continue; } /* hf_dir goldens: covered by the converter's tests */
        int flags = json_is_false(json_object_get(j, "special_tokens_parsed")) ? 0 : CM_TOK_PARSE_SPECIAL;
        cm_err err = {0};
        cm_model *m = calloc(1, sizeof *m);
        if (gguf_open(&m->gguf, test_fixture(model), &err) < 0 || !(m->tok = cm_tokenizer_load(&m->gguf, &m->info, &err))) {
            TEST_FAIL_("%s: %s", model, err.msg);
            gguf_close(&m->gguf);
            free(m);
            json_decref(j);
            continue;
        }
        int32_t ids[4096];
        char out[16384];
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(j, "cases"), i, c) {
            json_t *jt = json_object_get(c, "text");
            if (!jt) continue;
            const char *text = json_string_value(jt);
            size_t len = json_string_length(jt);
            int n = cm_tokenize(m, text, len, flags, ids, 4096, &err);
            char what[256];
            snprintf(what, sizeof what, "%s case %zu", gl.gl_pathv[f], i);
            CHECK_TRUE(ids_match(what, ids, n, json_object_get(c, "tokens")));
            int dn = cm_detokenize(m, ids, n > 0 ? n : 0, 1, out, sizeof out);
            CHECK_TRUE(dn == (int)len && memcmp(out, text, len) == 0); /* fixture texts are NFC */
            checked++;
        }
        json_t *g = json_object_get(j, "greedy");
        if (json_object_get(g, "text")) {
            json_t *jt = json_object_get(g, "text");
            int n = cm_tokenize(m, json_string_value(jt), json_string_length(jt), flags, ids, 4096, &err);
            CHECK_TRUE(ids_match(gl.gl_pathv[f], ids, n, json_object_get(g, "prompt")));
            json_t *gt = json_object_get(g, "tokens"), *to = json_object_get(g, "text_out");
            int ng = (int)json_array_size(gt);
            for (int k = 0; k < ng && k < 4096; k++) ids[k] = (int32_t)json_integer_value(json_array_get(gt, (size_t)k));
            int dn = cm_detokenize(m, ids, ng, 1, out, sizeof out);
            CHECK_TRUE(to && dn == (int)json_string_length(to) && memcmp(out, json_string_value(to), (size_t)dn) == 0);
            checked++;
        }
        vocab_free(m);
        json_decref(j);
    }
    globfree(&gl);
    fprintf(stderr, "  %d fixture cases checked\n", checked);
    ASSERT_TRUE(checked >= 15);
}

int main(void) {
    byte_tokens_init();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/cm_tok_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(load_fills_info);
    RUN(bpe_merge_order);
    RUN(llama_bpe_whole_word_lookup);
    RUN(special_tokens_on_off);
    RUN(control_tokens_render_only_when_asked);
    RUN(every_byte_and_invalid_utf8);
    RUN(empty_input_and_bos);
    RUN(output_buffer_too_small);
    RUN(megabyte_of_spaces);
    RUN(nfc_only_for_qwen2);
    RUN(min_tokens_is_a_lower_bound);
    RUN(detok_streaming);
    RUN(hostile_metadata_rejected);
    RUN(public_api_rejects_bad_args);
    RUN(random_roundtrip);
    RUN(shared_between_threads);
    RUN(fixture_model_goldens);
    rmdir(tmpdir);
    return test_summary();
}
