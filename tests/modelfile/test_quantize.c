/*
 * test_quantize.c - modelfile/quantize.c: every row quantiser round-trips through the engine's reference
 * dequantiser within its format's error bound (and keeps zeros zero); the type policy gives, for each
 * preset on a 16-layer GQA model, the types llama-quantize's rules name (layer positions, output and tied
 * embeddings, 8-expert models, row-length fallbacks); cm_quantize keeps every key in order and sets
 * general.quantization_version / general.file_type last, sorts tensors, and refuses unknown presets,
 * requantisation without allow_requantize and rows no type fits, creating nothing then. Byte equality
 * is held elsewhere: with tools/quantize.py by py_quantize, with llama-quantize in docs/quantize.md.
 */
#include <math.h>
#include <stdint.h>
#include <unistd.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "gguf.h"
#include "quantize.h"
#include "quants.h"
#include "test.h"
#include "util.h"

/* ------------------------------------------------------------ row quantisers */

static uint64_t rng_state = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1 << 23)) - 1.0f;
}

static void dequant(int type, const void *q, float *y, int64_t k) {
    if (type == GGUF_TT_Q8_0) {
        const cm_block_q8_0 *b = q;
        for (int64_t i = 0; i < k; i++) y[i] = b[i / 32].qs[i % 32] * cm_fp16_to_f32(b[i / 32].d);
    } else {
        cm_quant_dequantize_ref(type, q, y, k);
    }
}

/* The round-trip error relative to the row's rms, for Gaussian-like data with an 8x outlier every 97
 * values. The bounds sit about 1.3x above what the reference quantisers reach (Q8_0 .008, Q4_0 .136,
 * Q4_1 .092, Q5_0 .069, Q5_1 .045, Q2_K .32, Q3_K .20, Q4_K .088, Q5_K .044, Q6_K .025), far below the
 * ~1.0 of a broken one. */
TEST(quantize_rows_round_trip) {
    static const struct { int type; double max_rel_rmse; } cases[] = {
        {GGUF_TT_Q8_0, 0.011}, {GGUF_TT_Q4_0, 0.18}, {GGUF_TT_Q4_1, 0.12}, {GGUF_TT_Q5_0, 0.09},
        {GGUF_TT_Q5_1, 0.06},  {GGUF_TT_Q2_K, 0.42}, {GGUF_TT_Q3_K, 0.26}, {GGUF_TT_Q4_K, 0.115},
        {GGUF_TT_Q5_K, 0.058}, {GGUF_TT_Q6_K, 0.033},
    };
    enum { K = 1024 };
    static float x[K], y[K];
    static uint8_t q[K * 2];
    for (int i = 0; i < K; i++) {
        float s = frand() + frand() + frand(); /* roughly normal */
        x[i] = (i % 97 == 0 ? 8.0f : 1.0f) * s * 0.02f;
    }
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int t = cases[c].type;
        ASSERT_TRUE(cm_quantize_type_ok(t));
        memset(q, 0xAB, sizeof q);
        cm_quantize_row(t, x, q, K);
        dequant(t, q, y, K);
        double se = 0, sx = 0;
        for (int i = 0; i < K; i++) { se += (double)(y[i] - x[i]) * (y[i] - x[i]); sx += (double)x[i] * x[i]; }
        double rel = sqrt(se / sx);
        if (!(rel <= cases[c].max_rel_rmse))
            TEST_FAIL_("%s: relative rms error %.4f > %.4f", gguf_ttype_name(t), rel, cases[c].max_rel_rmse);
        /* all-zero input: zero output, whatever the type's zero path */
        static const float zero[256];
        memset(q, 0xAB, sizeof q);
        cm_quantize_row(t, zero, q, 256);
        dequant(t, q, y, 256);
        for (int i = 0; i < 256; i++) CHECK_TRUE(y[i] == 0.0f);
    }
    ASSERT_TRUE(!cm_quantize_type_ok(GGUF_TT_F16) && !cm_quantize_type_ok(GGUF_TT_Q8_K));
}

/* Q8_0 rounds half away from zero (ggml's file quantiser): 2.5 steps -> 3, -2.5 -> -3. */
TEST(quantize_q8_0_rounds_half_away) {
    float x[32] = {0};
    x[0] = 127.0f;
    x[1] = 2.5f;
    x[2] = -2.5f;
    cm_block_q8_0 b;
    cm_quantize_row(GGUF_TT_Q8_0, x, &b, 32);
    ASSERT_EQ_INT(b.qs[0], 127);
    ASSERT_EQ_INT(b.qs[1], 3);
    ASSERT_EQ_INT(b.qs[2], -3);
    ASSERT_EQ_INT(cm_fp16_to_f32(b.d) == 1.0f, 1);
}

/* ------------------------------------------------------------ the type policy */

enum { NL = 16 };
#define MAXT (NL * 9 + 4)

typedef struct shape_model {
    cm_quant_tensor t[MAXT];
    char names[MAXT][48];
    size_t n;
} shape_model;

static void add(shape_model *m, const char *name, int64_t ne0, int64_t ne1, int64_t ne2) {
    cm_quant_tensor *t = &m->t[m->n];
    snprintf(m->names[m->n], sizeof m->names[0], "%s", name);
    t->name = m->names[m->n++];
    t->ne[0] = ne0; t->ne[1] = ne1; t->ne[2] = ne2; t->ne[3] = 1;
    t->n_dims = ne2 > 1 ? 3 : ne1 > 1 ? 2 : 1;
    t->type = GGUF_TT_F32;
}

/* A qwen2-like model: D = 256, FFN 512, 8 heads over 2 KV heads, 16 layers; experts > 0: stacked expert
 * FFNs instead. */
static void make_model(shape_model *m, int tied, int experts, int64_t D) {
    char n[48];
    m->n = 0;
    add(m, "token_embd.weight", D, 300, 1);
    if (!tied) add(m, "output.weight", D, 300, 1);
    add(m, "output_norm.weight", D, 1, 1);
    for (int l = 0; l < NL; l++) {
        static const char *const mats[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"};
        for (int j = 0; j < 6; j++) {
            snprintf(n, sizeof n, "blk.%d.%s%s.weight", l, mats[j], experts && j >= 4 ? "_exps" : "");
            add(m, n, D, j == 1 || j == 2 ? 64 : j >= 4 ? 512 : D, experts && j >= 4 ? experts : 1);
        }
        snprintf(n, sizeof n, "blk.%d.ffn_down%s.weight", l, experts ? "_exps" : "");
        add(m, n, 512, D, experts ? experts : 1);
        snprintf(n, sizeof n, "blk.%d.attn_norm.weight", l);
        add(m, n, D, 1, 1);
        if (experts) {
            snprintf(n, sizeof n, "blk.%d.ffn_gate_inp.weight", l);
            add(m, n, D, experts, 1);
        }
    }
    cm_quant_sort(m->t, m->n);
}

static int target_of(const shape_model *m, const char *name) {
    for (size_t i = 0; i < m->n; i++)
        if (!strcmp(m->t[i].name, name)) return m->t[i].target;
    return -1;
}

static int layer_target(const shape_model *m, int l, const char *what) {
    char n[48];
    snprintf(n, sizeof n, "blk.%d.%s.weight", l, what);
    return target_of(m, n);
}

/* One character per type in the expectation strings below. */
static int type_of(char c) {
    switch (c) {
    case '0': return GGUF_TT_Q4_0; case '1': return GGUF_TT_Q4_1; case '5': return GGUF_TT_Q5_0;
    case '6': return GGUF_TT_Q5_1; case '8': return GGUF_TT_Q8_0; case 'b': return GGUF_TT_Q2_K;
    case 'c': return GGUF_TT_Q3_K; case 'd': return GGUF_TT_Q4_K; case 'e': return GGUF_TT_Q5_K;
    case 'f': return GGUF_TT_Q6_K; case 'h': return GGUF_TT_F16; default: return GGUF_TT_F32;
    }
}

/* Per preset, as llama-quantize's rules read for 16 layers (more bits at layers 0 1 4 7 10 13 14 15) and
 * n_head / n_head_kv = 4: attn_v and ffn_down per layer, then output, token_embd (untied), attn_output,
 * and the other matrices. */
static const struct {
    const char *preset;
    const char *attn_v, *ffn_down;
    char output, token_embd, attn_output, other;
} policy[] = {
    {"Q4_0", "0000000000000000", "0000000000000000", 'f', '0', '0', '0'},
    {"Q4_1", "1111111111111111", "1111111111111111", 'f', '1', '1', '1'},
    {"Q5_0", "5555555555555555", "5555555555555555", 'f', '5', '5', '5'},
    {"Q5_1", "6666666666666666", "6666666666666666", 'f', '6', '6', '6'},
    {"Q8_0", "8888888888888888", "8888888888888888", '8', '8', '8', '8'},
    {"Q2_K", "dddddddddddddddd", "cccccccccccccccc", 'f', 'b', 'c', 'b'},
    {"Q3_K_S", "cccccccccccccccc", "cccccccccccccccc", 'f', 'c', 'c', 'c'},
    {"Q3_K_M", "eedddddddddddddd", "eddddddddddddddd", 'f', 'c', 'd', 'c'},
    {"Q3_K_L", "eeeeeeeeeeeeeeee", "eeeeeeeeeeeeeeee", 'f', 'c', 'e', 'c'},
    {"Q4_K_S", "eeeedddddddddddd", "eedddddddddddddd", 'f', 'd', 'd', 'd'},
    {"Q4_K_M", "ffddfddfddfddfff", "ffddfddfddfddfff", 'f', 'd', 'd', 'd'},
    {"Q5_K_S", "eeeeeeeeeeeeeeee", "eeeeeeeeeeeeeeee", 'f', 'e', 'e', 'e'},
    {"Q5_K_M", "ffeefeefeefeefff", "ffeefeefeefeefff", 'f', 'e', 'e', 'e'},
    {"Q6_K", "ffffffffffffffff", "ffffffffffffffff", 'f', 'f', 'f', 'f'},
};

TEST(quantize_policy_per_preset) {
    static shape_model m;
    cm_quant_hparams hp = {.arch = "qwen2", .n_layer = NL, .n_head = 8, .n_head_kv = 2};
    cm_err err = {0};
    size_t np;
    cm_quant_presets(&np);
    ASSERT_EQ_INT(np, sizeof policy / sizeof policy[0]);
    for (size_t p = 0; p < np; p++) {
        const cm_quant_preset *pr = cm_quant_preset_find(policy[p].preset);
        ASSERT_TRUE(pr != NULL);
        make_model(&m, 0, 0, 256);
        ASSERT_EQ_INT(cm_quant_plan(&hp, pr, m.t, m.n, &err), CM_OK);
        for (int l = 0; l < NL; l++) {
            int av = layer_target(&m, l, "attn_v"), fd = layer_target(&m, l, "ffn_down");
            if (av != type_of(policy[p].attn_v[l]) || fd != type_of(policy[p].ffn_down[l]))
                TEST_FAIL_("%s layer %d: attn_v %s ffn_down %s", pr->name, l, gguf_ttype_name(av), gguf_ttype_name(fd));
            CHECK_TRUE(layer_target(&m, l, "attn_output") == type_of(policy[p].attn_output));
            CHECK_TRUE(layer_target(&m, l, "attn_q") == type_of(policy[p].other));
            CHECK_TRUE(layer_target(&m, l, "attn_k") == type_of(policy[p].other));
            CHECK_TRUE(layer_target(&m, l, "ffn_up") == type_of(policy[p].other));
            CHECK_TRUE(layer_target(&m, l, "attn_norm") == GGUF_TT_F32);
        }
        CHECK_TRUE(target_of(&m, "output.weight") == type_of(policy[p].output));
        CHECK_TRUE(target_of(&m, "token_embd.weight") == type_of(policy[p].token_embd));
        CHECK_TRUE(target_of(&m, "output_norm.weight") == GGUF_TT_F32);
        /* tied embeddings: the token embedding takes the output's rule */
        make_model(&m, 1, 0, 256);
        ASSERT_EQ_INT(cm_quant_plan(&hp, pr, m.t, m.n, &err), CM_OK);
        CHECK_TRUE(target_of(&m, "token_embd.weight") == type_of(policy[p].output));
    }
    ASSERT_TRUE(cm_quant_preset_find("q4_k") == cm_quant_preset_find("Q4_K_M"));
    ASSERT_TRUE(cm_quant_preset_find("IQ2_XXS") == NULL && cm_quant_preset_find("F16") == NULL);
}

/* Sorting: tensors outside layers first, then by layer number (10 after 2), by name within. */
TEST(quantize_sort_order) {
    static shape_model m;
    m.n = 0;
    add(&m, "blk.10.attn_q.weight", 32, 32, 1);
    add(&m, "output.weight", 32, 32, 1);
    add(&m, "blk.2.ffn_up.weight", 32, 32, 1);
    add(&m, "blk.2.attn_q.weight", 32, 32, 1);
    add(&m, "blk.x.bad", 32, 1, 1);
    add(&m, "a.weight", 32, 1, 1);
    cm_quant_sort(m.t, m.n);
    static const char *const want[] = {"a.weight", "blk.x.bad", "output.weight", "blk.2.attn_q.weight",
                                       "blk.2.ffn_up.weight", "blk.10.attn_q.weight"};
    for (int i = 0; i < 6; i++) ASSERT_STREQ(m.t[i].name, want[i]);
}

/* 8 experts: attn_v and attn_k to Q8_0, attn_output to Q5_K; expert tensors find their layer by name;
 * routers stay F32. */
TEST(quantize_policy_eight_experts) {
    static shape_model m;
    cm_quant_hparams hp = {.arch = "llama", .n_layer = NL, .n_expert = 8, .n_head = 8, .n_head_kv = 2};
    cm_err err = {0};
    make_model(&m, 0, 8, 256);
    ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find("Q4_K_M"), m.t, m.n, &err), CM_OK);
    for (int l = 0; l < NL; l++) {
        CHECK_TRUE(layer_target(&m, l, "attn_v") == GGUF_TT_Q8_0);
        CHECK_TRUE(layer_target(&m, l, "attn_k") == GGUF_TT_Q8_0);
        CHECK_TRUE(layer_target(&m, l, "attn_output") == GGUF_TT_Q5_K);
        CHECK_TRUE(layer_target(&m, l, "ffn_gate_inp") == GGUF_TT_F32);
        CHECK_TRUE(layer_target(&m, l, "ffn_up_exps") == GGUF_TT_Q4_K);
        int more = l < 2 || l >= 14 || (l - 2) % 3 == 2;
        CHECK_TRUE(layer_target(&m, l, "ffn_down_exps") == (more ? GGUF_TT_Q6_K : GGUF_TT_Q4_K));
    }
    /* an expert tensor outside "blk.N." cannot be placed */
    add(&m, "ffn_down_exps.weight", 512, 256, 8);
    cm_quant_sort(m.t, m.n);
    ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find("Q4_K_M"), m.t, m.n, &err), CM_E_FORMAT);
}

/* Row lengths: 96 (not a multiple of 256) falls back K -> legacy; 48 (not of 32) to F16; the output
 * with a row the K block does not divide is Q8_0 (and a legacy preset's Q6_K output falls back to it);
 * legacy types have no fallback. */
TEST(quantize_policy_row_fallbacks) {
    static shape_model m;
    cm_quant_hparams hp = {.arch = "llama", .n_layer = NL, .n_head = 8, .n_head_kv = 2};
    cm_err err = {0};
    static const struct { const char *preset; int q, v0, v2, out; } want[] = {
        {"Q2_K", GGUF_TT_Q4_0, GGUF_TT_Q5_0, GGUF_TT_Q5_0, GGUF_TT_Q8_0},   /* attn_v Q4_K -> Q5_0 */
        {"Q3_K_M", GGUF_TT_Q4_0, GGUF_TT_Q5_1, GGUF_TT_Q5_0, GGUF_TT_Q8_0}, /* Q5_K -> Q5_1, Q4_K -> Q5_0 */
        {"Q4_K_M", GGUF_TT_Q5_0, GGUF_TT_Q8_0, GGUF_TT_Q5_0, GGUF_TT_Q8_0}, /* Q6_K -> Q8_0 */
        {"Q5_K_S", GGUF_TT_Q5_1, GGUF_TT_Q5_1, GGUF_TT_Q5_1, GGUF_TT_Q8_0},
        {"Q4_0", GGUF_TT_Q4_0, GGUF_TT_Q4_0, GGUF_TT_Q4_0, GGUF_TT_Q8_0},   /* Q6_K -> Q8_0 */
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        make_model(&m, 0, 0, 96);
        ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find(want[i].preset), m.t, m.n, &err), CM_OK);
        CHECK_TRUE(layer_target(&m, 0, "attn_q") == want[i].q);
        CHECK_TRUE(layer_target(&m, 0, "attn_v") == want[i].v0);
        CHECK_TRUE(layer_target(&m, 2, "attn_v") == want[i].v2);
        if (target_of(&m, "output.weight") != want[i].out)
            TEST_FAIL_("%s: output %s", want[i].preset, gguf_ttype_name(target_of(&m, "output.weight")));
    }
    make_model(&m, 0, 0, 48);
    ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find("Q4_K_S"), m.t, m.n, &err), CM_E_UNSUPPORTED);
    /* without the output (whose Q8_0 has no fallback), the matrices go to F16 */
    make_model(&m, 1, 0, 48);
    for (size_t i = 0; i < m.n; i++)
        if (!strcmp(m.t[i].name, "token_embd.weight")) m.t[i].ne[0] = 64;
    ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find("Q4_K_S"), m.t, m.n, &err), CM_OK);
    CHECK_TRUE(layer_target(&m, 3, "attn_q") == GGUF_TT_F16);
    CHECK_TRUE(layer_target(&m, 3, "ffn_up") == GGUF_TT_F16);
    ASSERT_EQ_INT(cm_quant_plan(&hp, cm_quant_preset_find("Q4_0"), m.t, m.n, &err), CM_E_UNSUPPORTED);
    ASSERT_TRUE(strstr(err.msg, "no fallback") != NULL);
}

/* ------------------------------------------------------------ the file */

static const char *tmp_out(const char *tag) {
    static char buf[128];
    snprintf(buf, sizeof buf, "/tmp/cm_test_quantize_%s_%d.gguf", tag, (int)getpid());
    return buf;
}

TEST(quantize_file_keys_and_order) {
    const char *in = test_fixture("models/llama-gqa.gguf"), *out = tmp_out("keys");
    cm_quantize_params p;
    cm_quantize_default(&p);
    ASSERT_STREQ(p.preset, "Q4_K_M");
    p.preset = "q5_0";
    cm_err err = {0};
    ASSERT_EQ_INT(cm_quantize(in, out, &p, &err), CM_OK);
    gguf_file a, b;
    ASSERT_EQ_INT(gguf_open(&a, in, &err), CM_OK);
    int rc = gguf_open(&b, out, &err);
    unlink(out);
    ASSERT_EQ_INT(rc, CM_OK);
    /* every input key but general.file_type, in order, then the two quantisation keys */
    uint64_t j = 0;
    for (uint64_t i = 0; i < a.n_kv; i++) {
        if (gguf_str_eq(a.kv[i].key, "general.file_type")) continue;
        CHECK_TRUE(a.kv[i].key.len == b.kv[j].key.len && !memcmp(a.kv[i].key.ptr, b.kv[j].key.ptr, a.kv[i].key.len));
        CHECK_TRUE(a.kv[i].type == b.kv[j].type && a.kv[i].n == b.kv[j].n);
        j++;
    }
    ASSERT_EQ_INT(b.n_kv, j + 2);
    ASSERT_TRUE(gguf_str_eq(b.kv[j].key, "general.quantization_version"));
    ASSERT_TRUE(gguf_str_eq(b.kv[j + 1].key, "general.file_type"));
    uint32_t ft = 0;
    ASSERT_EQ_INT(gguf_get_u32(&b, "general.file_type", &ft, &err), CM_OK);
    ASSERT_EQ_INT(ft, 8);
    /* tensors: output_norm, token_embd, then layer 0 by name */
    ASSERT_TRUE(gguf_str_eq(b.tensors[0].name, "output_norm.weight"));
    ASSERT_TRUE(gguf_str_eq(b.tensors[1].name, "token_embd.weight"));
    ASSERT_TRUE(gguf_str_eq(b.tensors[2].name, "blk.0.attn_k.weight"));
    ASSERT_EQ_INT(b.tensors[1].type, GGUF_TT_Q8_0); /* tied: the output's Q6_K, whose 64-row falls back */
    ASSERT_EQ_INT(gguf_find_tensor(&b, "blk.1.ffn_up.weight")->type, GGUF_TT_Q5_0);
    ASSERT_EQ_INT(gguf_find_tensor(&b, "blk.1.attn_norm.weight")->type, GGUF_TT_F32);
    gguf_close(&a);
    gguf_close(&b);
}

TEST(quantize_refusals) {
    cm_quantize_params p;
    cm_quantize_default(&p);
    cm_err err = {0};
    const char *out = tmp_out("refuse");
    unlink(out);
    p.preset = "IQ2_XXS";
    ASSERT_EQ_INT(cm_quantize(test_fixture("models/qwen2-gqa.gguf"), out, &p, &err), CM_E_INVAL);
    ASSERT_TRUE(strstr(err.msg, "IQ2_XXS") != NULL);
    /* an already quantised input: refused unless allowed; keeping its own type is no requantisation */
    p.preset = "Q4_0";
    ASSERT_EQ_INT(cm_quantize(test_fixture("models/qwen2-gqa-q8_0.gguf"), out, &p, &err), CM_E_UNSUPPORTED);
    ASSERT_TRUE(strstr(err.msg, "--allow-requantize") != NULL);
    ASSERT_TRUE(access(out, F_OK) != 0);
    p.allow_requantize = 1;
    ASSERT_EQ_INT(cm_quantize(test_fixture("models/qwen2-gqa-q8_0.gguf"), out, &p, &err), CM_OK);
    unlink(out);
    p.allow_requantize = 0;
    p.preset = "Q8_0";
    ASSERT_EQ_INT(cm_quantize(test_fixture("models/qwen2-gqa-q8_0.gguf"), out, &p, &err), CM_OK);
    unlink(out);
    ASSERT_EQ_INT(cm_quantize("/nonexistent.gguf", out, &p, &err), CM_E_IO);
    ASSERT_TRUE(access(out, F_OK) != 0);
}

int main(void) {
    RUN(quantize_rows_round_trip);
    RUN(quantize_q8_0_rounds_half_away);
    RUN(quantize_policy_per_preset);
    RUN(quantize_sort_order);
    RUN(quantize_policy_eight_experts);
    RUN(quantize_policy_row_fallbacks);
    RUN(quantize_file_keys_and_order);
    RUN(quantize_refusals);
    return test_summary();
}
