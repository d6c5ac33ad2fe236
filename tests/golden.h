/*
 * golden.h - the golden files of tests/fixtures/golden/ (written by tools/make_fixtures.py from the
 * PyTorch reference) and their readers: one implementation for every test that compares with them.
 *
 * <name>.json: {"model": "models/<m>.gguf", "arch", "n_ctx", "tolerance": {"max_abs"}, "cases":
 * [{"tokens": [...], "logits": "golden/<name>.case<i>.f32"}], "greedy": {"prompt", "tokens", "text",
 * "n_predict"}}; a .f32 file is (n_tokens, n_vocab) little-endian floats, nothing more.
 *
 * The inventory says which test checks each golden; tests select by it, never by "it failed to load",
 * and test_forward_golden.c asserts that the directory holds exactly these files.
 */
#ifndef CM_TEST_GOLDEN_H
#define CM_TEST_GOLDEN_H

#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codemoe.h"
#include "test.h"

enum {
    GOLDEN_DENSE,     /* a dense GGUF fixture: tests/engine/test_forward_golden.c, tests/integration/test_cli.c */
    GOLDEN_MOE,       /* a hybrid, sparse or MoLE GGUF fixture: tests/engine/test_moe.c, tests/integration/test_cli.c */
    GOLDEN_HF,        /* a Hugging Face directory's logits (fixtures/hf/): tests/modelfile/test_convert.c */
    GOLDEN_TOKENIZER, /* tokenizer cases: tests/engine/test_tokenizer.c */
};

typedef struct golden_entry {
    const char *name; /* golden/<name>.json */
    int kind;         /* GOLDEN_* */
} golden_entry;

/* Every golden json, by name. Returns the table and its length in *n. */
static inline const golden_entry *golden_inventory(int *n) {
    static const golden_entry t[] = {
        {"llama-freqs", GOLDEN_DENSE},  {"llama-gqa", GOLDEN_DENSE},       {"llama-linear", GOLDEN_DENSE},
        {"llama-mha", GOLDEN_DENSE},    {"qwen2-gqa", GOLDEN_DENSE},       {"qwen2-gqa-bf16", GOLDEN_DENSE},
        {"qwen2-gqa-f16", GOLDEN_DENSE}, {"qwen2-gqa-q8_0", GOLDEN_DENSE}, {"qwen2-mha", GOLDEN_DENSE},
        {"qwen2-yarn", GOLDEN_DENSE},   {"qwen2-gqa-q4_0", GOLDEN_DENSE},  {"qwen2-k-q4_k_m", GOLDEN_DENSE},
        {"qwen2-k-q6_k", GOLDEN_DENSE},
        {"qwen3-gqa", GOLDEN_DENSE},    {"qwen3-gqa-q8_0", GOLDEN_DENSE},  {"qwen3-k-q4_k_m", GOLDEN_DENSE},
        {"qwen3-k-q6_k", GOLDEN_DENSE},
        {"hybrid-max", GOLDEN_MOE},     {"hybrid-mean", GOLDEN_MOE},       {"hybrid-prev-max", GOLDEN_MOE},
        {"hybrid-prev-mean", GOLDEN_MOE}, {"mole", GOLDEN_MOE},
        {"qwen3moe", GOLDEN_MOE},       {"qwen3moe-q8_0", GOLDEN_MOE},     {"qwen3moe-k-q4_k_m", GOLDEN_MOE},
        {"llama-freqs-hf", GOLDEN_HF},  {"llama-linear-hf", GOLDEN_HF},    {"llama-mha-bf16-hf", GOLDEN_HF},
        {"qwen2-gqa-hf", GOLDEN_HF},    {"qwen2-yarn-hf", GOLDEN_HF},      {"qwen3-gqa-hf", GOLDEN_HF},
        {"qwen3moe-hf", GOLDEN_HF},
        {"tokenizer", GOLDEN_TOKENIZER},
    };
    *n = (int)(sizeof t / sizeof t[0]);
    return t;
}

/* golden/<name>.json parsed, or NULL with the reason on stderr. The caller json_decref()s it. */
static inline json_t *golden_json(const char *name) {
    char rel[300];
    snprintf(rel, sizeof rel, "golden/%s.json", name);
    json_error_t je;
    json_t *j = json_load_file(test_fixture(rel), 0, &je);
    if (!j) fprintf(stderr, "%s: %s\n", rel, je.text);
    return j;
}

/* The fixture file rel (relative to $CM_FIXTURES) as exactly n floats (malloc'ed, the caller frees),
 * or NULL when it is missing, shorter or longer. */
static inline float *golden_f32(const char *rel, size_t n) {
    FILE *f = fopen(test_fixture(rel), "rb");
    if (!f) return NULL;
    float *p = malloc((n ? n : 1) * sizeof(float));
    size_t got = p ? fread(p, sizeof(float), n, f) : 0;
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != n || extra) {
        free(p);
        return NULL;
    }
    return p;
}

/* A JSON array of token ids into out. Returns the count, or -1 when a is not an array of integers or
 * has more than cap elements. */
static inline int golden_ids(const json_t *a, int32_t *out, int cap) {
    if (!json_is_array(a) || (int)json_array_size(a) > cap) return -1;
    for (size_t i = 0; i < json_array_size(a); i++) {
        const json_t *v = json_array_get(a, i);
        if (!json_is_integer(v)) return -1;
        out[i] = (int32_t)json_integer_value(v);
    }
    return (int)json_array_size(a);
}

/* What f16 K/V (CM_KV_F16) adds to a golden's logit tolerance: K and V rounded to half floats (relative
 * 2^-11) move logits by up to 3.9e-3 on the D=64 fixtures and 2.5e-2 on the D=256 K-quant ones
 * (measured: prefill, decode, mixed batches, 1 and 3 threads). Errors f16 storage alone could make (a
 * wrong stride, head or conversion) move them by 1e-1 and more; greedy tokens must still match. */
#define GOLDEN_KV_F16_TOL 5e-2

/* max |a - b| over n values; a NaN on either side counts as infinitely wrong (returns NaN). */
static inline double golden_max_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) {
        double x = fabs((double)a[i] - (double)b[i]);
        if (!(x <= d)) d = x;
    }
    return d;
}

/* A JSON array of MoLE adapter ids (a case's "adapter_sets" entry) as a cm_batch.adapters mask. */
static inline uint64_t golden_set_mask(const json_t *a) {
    uint64_t m = 0;
    for (size_t i = 0; i < json_array_size(a); i++) m |= 1ull << json_integer_value(json_array_get(a, i));
    return m;
}

/* The fixture model rel (e.g. "models/mole.gguf"), or NULL with the reason on stderr. */
static inline cm_model *golden_load_model(const char *rel) {
    cm_err err = {0};
    cm_model_params mp = {0};
    cm_model *m = cm_model_load(test_fixture(rel), &mp, &err);
    if (!m) fprintf(stderr, "%s: %s\n", rel, err.msg);
    return m;
}

/* Called before each cm_forward of golden_run_seq: the sequence and the positions [pos0, pos0 + k) the
 * batch's tokens 0..k-1 take (to attribute engine traces to positions). */
typedef void (*golden_batch_fn)(void *ud, int seq, int pos0, int k);

/* Feeds tok[0..n) to a new sequence of c (options o, may be NULL; MoLE adapter sets `sets` for
 * CM_ADAPTERS_BATCH, may be NULL) in batches of `step` tokens (0: all at once), copies the logits of
 * every position into out (n, V), and closes the sequence. Returns 0, or the failing code with the
 * reason on stderr. */
static inline int golden_run_seq(cm_ctx *c, int V, const int32_t *tok, int n, int step, const cm_seq_options *o,
                                 const uint64_t *sets, float *out, golden_batch_fn on_batch, void *ud) {
    cm_err err = {0};
    int s = cm_seq_open(c, &err);
    if (s < 0) return s;
    int rc = 0;
    if (o && (rc = cm_seq_set_options(c, s, o, &err)) != 0) {
        fprintf(stderr, "options: %s\n", err.msg);
        cm_seq_close(c, s);
        return rc;
    }
    if (step <= 0) step = n;
    int32_t *seqs = malloc((size_t)(n > 0 ? n : 1) * sizeof *seqs);
    int8_t *want = malloc((size_t)(n > 0 ? n : 1));
    if (!seqs || !want) rc = CM_E_NOMEM;
    for (int i = 0; !rc && i < n; i++) seqs[i] = s, want[i] = 1;
    for (int i0 = 0; !rc && i0 < n; i0 += step) {
        int k = n - i0 < step ? n - i0 : step;
        if (on_batch) on_batch(ud, s, i0, k);
        cm_batch b = {.n = k, .token = tok + i0, .seq = seqs, .logits = want, .adapters = sets ? sets + i0 : NULL};
        if ((rc = cm_forward(c, &b, &err)) != 0) {
            fprintf(stderr, "forward: %s\n", err.msg);
            break;
        }
        for (int i = 0; i < k; i++) memcpy(out + (size_t)(i0 + i) * V, cm_logits(c, i), (size_t)V * sizeof(float));
    }
    free(seqs);
    free(want);
    cm_seq_close(c, s);
    return rc;
}

#endif
