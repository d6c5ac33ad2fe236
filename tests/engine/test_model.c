/*
 * test_model.c - model loading validation and the context/sequence/batch contract.
 *
 * Loader: a valid fixture model (tests/fixtures/models/qwen2-gqa.gguf) is rewritten with one defect at a
 * time (wrong shape, missing tensor, bad head counts, absurd sizes, unsupported types or rope scaling,
 * partial biases, wrong architecture) and each must fail with the right code and a message naming the
 * culprit; benign variants (absent defaults, llama without biases, untied output, mixed types) load.
 * The model-level hostile corpus (tests/fixtures/bad/model/: valid GGUF, inconsistent qwen3 / qwen3moe models)
 * is refused file by file with the message its README names.
 * Qwen3-family loading: q/k norms mapped for qwen3 and qwen3moe only, head_dim from key_length, NeoX rope,
 * the sparse MoE's shape in cm_model_moe_info.
 * Context: KV exhaustion returns CM_E_NOMEM and changes nothing; bad tokens, sequences, lengths and
 * batch sizes are rejected before any state changes; logits exist exactly for requested rows.
 */
#include <unistd.h>
#include <malloc.h>
#include <sys/resource.h>

#include "../test.h"
#include "codemoe.h"
#include "gguf_writer.h"
#include "util.h"

static char tmp_path[256];

/* One defect (or variant) applied while copying the fixture. */
typedef struct mut {
    const char *drop_key;
    const char *u32_key; uint32_t u32;       /* set (replacing or adding) a u32 */
    const char *str_key; const char *str;    /* set (replacing or adding) a string */
    const char *f32_key[3]; float f32[3];     /* set (replacing or adding) up to three f32 */
    const char *arch_to;                      /* rename general.architecture and the qwen2.* keys */
    const char *drop_tensor;                  /* omit tensors whose name contains this */
    const char *reshape; int64_t ne0, ne1;    /* replace a tensor by zeros of this shape (ne1 0: vector) */
    const char *retype; int type;             /* store a tensor converted to this type */
    const char *add_tensor; int64_t add_ne0, add_ne1; /* add an F32 tensor (ne1 0: a vector) of add_fill */
    float add_fill;
} mut;

static int contains(const char *name, const char *pat) { return pat && strstr(name, pat) != NULL; }

/* Writes the fixture with `mu` applied to tmp_path. */
static int build(const mut *mu) {
    cm_err err = {0};
    gguf_file g;
    if (gguf_open(&g, test_fixture("models/qwen2-gqa.gguf"), &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    gguf_writer *w = gguf_writer_create(&err);
    int rc = 0;
    int u32_done = 0, str_done = 0, f32_done[3] = {0};
    for (uint64_t i = 0; i < g.n_kv && !rc; i++) {
        const gguf_kv *kv = &g.kv[i];
        char key[256], orig[256]; /* key as written; orig to look the value up in g */
        snprintf(orig, sizeof orig, "%.*s", (int)kv->key.len, kv->key.ptr);
        snprintf(key, sizeof key, "%s", orig);
        if (mu->drop_key && !strcmp(key, mu->drop_key)) continue;
        if (mu->arch_to && !strncmp(key, "qwen2.", 6)) {
            char k2[256];
            snprintf(k2, sizeof k2, "%s.%s", mu->arch_to, key + 6);
            snprintf(key, sizeof key, "%s", k2);
        }
        if (mu->u32_key && !strcmp(key, mu->u32_key)) {
            rc = gguf_writer_set_u32(w, key, mu->u32);
            u32_done = 1;
            continue;
        }
        int fi = -1;
        for (int j = 0; j < 3; j++)
            if (mu->f32_key[j] && !strcmp(key, mu->f32_key[j])) fi = j;
        if (fi >= 0) {
            rc = gguf_writer_set_f32(w, key, mu->f32[fi]);
            f32_done[fi] = 1;
            continue;
        }
        if (mu->str_key && !strcmp(key, mu->str_key)) {
            rc = gguf_writer_set_str(w, key, mu->str);
            str_done = 1;
            continue;
        }
        if (mu->arch_to && !strcmp(key, "general.architecture")) {
            rc = gguf_writer_set_str(w, key, mu->arch_to);
            continue;
        }
        if (kv->type == GGUF_VT_STRING) {
            gguf_str s;
            gguf_get_str(&g, orig, &s, NULL);
            char *v = strndup(s.ptr, s.len);
            rc = gguf_writer_set_str(w, key, v);
            free(v);
        } else if (kv->type == GGUF_VT_UINT32) {
            uint32_t v;
            gguf_get_u32(&g, orig, &v, NULL);
            rc = gguf_writer_set_u32(w, key, v);
        } else if (kv->type == GGUF_VT_FLOAT32) {
            float v;
            gguf_get_f32(&g, orig, &v, NULL);
            rc = gguf_writer_set_f32(w, key, v);
        } else if (kv->type == GGUF_VT_BOOL) {
            int v;
            gguf_get_bool(&g, orig, &v, NULL);
            rc = gguf_writer_set_bool(w, key, v);
        } else if (kv->type == GGUF_VT_ARRAY && kv->arr_type == GGUF_VT_STRING) {
            char **v = calloc(kv->n, sizeof *v);
            for (uint64_t j = 0; j < kv->n; j++) {
                gguf_str s = gguf_arr_str(kv, j);
                v[j] = strndup(s.ptr, s.len);
            }
            rc = gguf_writer_set_arr_str(w, key, (const char *const *)v, kv->n);
            for (uint64_t j = 0; j < kv->n; j++) free(v[j]);
            free(v);
        } else if (kv->type == GGUF_VT_ARRAY && kv->arr_type == GGUF_VT_INT32) {
            int32_t *v = calloc(kv->n, sizeof *v);
            for (uint64_t j = 0; j < kv->n; j++) v[j] = (int32_t)gguf_arr_int(kv, j);
            rc = gguf_writer_set_arr_i32(w, key, v, kv->n);
            free(v);
        } else {
            fprintf(stderr, "build: key %s of type %d not copied\n", key, kv->type);
            rc = -1;
        }
    }
    if (!rc && mu->u32_key && !u32_done) rc = gguf_writer_set_u32(w, mu->u32_key, mu->u32);
    if (!rc && mu->str_key && !str_done) rc = gguf_writer_set_str(w, mu->str_key, mu->str);
    for (int j = 0; j < 3 && !rc; j++)
        if (mu->f32_key[j] && !f32_done[j]) rc = gguf_writer_set_f32(w, mu->f32_key[j], mu->f32[j]);
    for (uint64_t i = 0; i < g.n_tensors && !rc; i++) {
        const gguf_tensor *t = &g.tensors[i];
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
        if (contains(name, mu->drop_tensor)) continue;
        if (mu->reshape && !strcmp(name, mu->reshape)) {
            int64_t ne[2] = {mu->ne0, mu->ne1 ? mu->ne1 : 1};
            float *z = calloc((size_t)(ne[0] * ne[1]), sizeof(float));
            rc = gguf_writer_add_tensor(w, name, GGUF_TT_F32, mu->ne1 ? 2 : 1, ne, GGUF_TT_F32, z, &err);
            free(z);
            continue;
        }
        int type = mu->retype && !strcmp(name, mu->retype) ? mu->type : t->type;
        rc = gguf_writer_add_tensor(w, name, type, t->n_dims, t->ne, t->type, t->data, &err);
    }
    if (!rc && mu->add_tensor) {
        int64_t ne[2] = {mu->add_ne0, mu->add_ne1 ? mu->add_ne1 : 1};
        float *z = calloc((size_t)(ne[0] * ne[1]), sizeof(float));
        for (int64_t i = 0; i < ne[0] * ne[1]; i++) z[i] = mu->add_fill;
        rc = gguf_writer_add_tensor(w, mu->add_tensor, GGUF_TT_F32, mu->add_ne1 ? 2 : 1, ne, GGUF_TT_F32, z, &err);
        free(z);
    }
    if (!rc) rc = gguf_writer_write(w, tmp_path, &err);
    if (rc) fprintf(stderr, "build: %s\n", err.msg);
    gguf_writer_free(w);
    gguf_close(&g);
    return rc;
}

static cm_model *fixture_model(void) { return cm_model_load(test_fixture("models/qwen2-gqa.gguf"), NULL, NULL); }

/* Builds with mu, loads; expects code (CM_OK: loads) and, on failure, msg containing `want`. */
static int expect(const mut *mu, int code, const char *want) {
    if (build(mu)) return 0;
    cm_err err = {0};
    cm_model_params p = {0};
    cm_model *m = cm_model_load(tmp_path, &p, &err);
    int ok;
    if (code == CM_OK) {
        ok = m != NULL;
        if (!ok) fprintf(stderr, "  unexpected error: %s\n", err.msg);
    } else {
        ok = !m && err.code == code && want && strstr(err.msg, want);
        if (!ok) fprintf(stderr, "  got code %d \"%s\", want %d \"%s\"\n", m ? 0 : err.code, err.msg, code, want);
    }
    cm_model_free(m);
    return ok;
}

TEST(valid_model_info) {
    cm_err err = {0};
    cm_model *m = cm_model_load(test_fixture("models/qwen2-gqa.gguf"), NULL, &err);
    ASSERT_TRUE(m);
    const cm_model_info *in = cm_model_get_info(m);
    ASSERT_STREQ(in->arch, "qwen2");
    ASSERT_STREQ(in->name, "qwen2-gqa");
    ASSERT_EQ_INT(in->n_embd, 64);
    ASSERT_EQ_INT(in->n_layer, 2);
    ASSERT_EQ_INT(in->n_head, 4);
    ASSERT_EQ_INT(in->n_head_kv, 2);
    ASSERT_EQ_INT(in->head_dim, 16);
    ASSERT_EQ_INT(in->n_ff, 128);
    ASSERT_EQ_INT(in->n_vocab, 300);
    ASSERT_EQ_INT(in->n_ctx_train, 256);
    ASSERT_EQ_INT(in->rope_neox, 1);
    ASSERT_EQ_INT(in->qkv_bias, 1);
    ASSERT_EQ_INT(in->tied_output, 1);
    ASSERT_EQ_INT(in->n_params, 93504);
    ASSERT_STREQ(in->weight_type, "F32");
    ASSERT_NEAR(in->rope_theta, 1e6, 1);
    ASSERT_NEAR(in->rms_eps, 1e-6, 1e-12);
    FILE *f = fopen(test_fixture("models/qwen2-gqa.gguf"), "rb");
    ASSERT_TRUE(f);
    fseek(f, 0, SEEK_END);
    ASSERT_EQ_INT(in->file_bytes, ftell(f));
    fclose(f);
    cm_model_free(m);
    cm_model_free(NULL);
    ASSERT_TRUE(cm_model_get_info(NULL) == NULL);
}

TEST(shape_errors) {
    ASSERT_TRUE(expect(&(mut){.reshape = "blk.0.attn_q.weight", .ne0 = 64, .ne1 = 32}, CM_E_FORMAT,
                       "model: tensor blk.0.attn_q.weight has shape [64, 32], expected [64, 64]"));
    ASSERT_TRUE(expect(&(mut){.reshape = "blk.1.ffn_down.weight", .ne0 = 64, .ne1 = 128}, CM_E_FORMAT,
                       "blk.1.ffn_down.weight has shape [64, 128], expected [128, 64]"));
    ASSERT_TRUE(expect(&(mut){.reshape = "blk.0.attn_norm.weight", .ne0 = 63}, CM_E_FORMAT,
                       "blk.0.attn_norm.weight has shape [63], expected [64]"));
    ASSERT_TRUE(expect(&(mut){.reshape = "token_embd.weight", .ne0 = 64, .ne1 = 299}, CM_E_FORMAT,
                       "token_embd.weight has shape [64, 299], expected [64, 300]"));
    ASSERT_TRUE(expect(&(mut){.drop_tensor = "blk.1.ffn_down.weight"}, CM_E_FORMAT,
                       "missing tensor blk.1.ffn_down.weight"));
    ASSERT_TRUE(expect(&(mut){.drop_tensor = "output_norm"}, CM_E_FORMAT, "missing tensor output_norm.weight"));
}

TEST(hparam_errors) {
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.attention.head_count_kv", .u32 = 3}, CM_E_FORMAT,
                       "head_count 4 is not a multiple of head_count_kv 3"));
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.attention.head_count", .u32 = 0}, CM_E_FORMAT,
                       "qwen2.attention.head_count = 0 out of range"));
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.embedding_length", .u32 = 1u << 20}, CM_E_FORMAT,
                       "qwen2.embedding_length = 1048576 out of range"));
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.block_count", .u32 = 4000000000u}, CM_E_FORMAT,
                       "qwen2.block_count"));
    ASSERT_TRUE(expect(&(mut){.drop_key = "qwen2.block_count"}, CM_E_FORMAT, "missing key qwen2.block_count"));
    /* 3 layers declared, 2 in the file */
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.block_count", .u32 = 3}, CM_E_FORMAT,
                       "missing tensor blk.2.attn_norm.weight"));
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.attention.key_length", .u32 = 15}, CM_E_FORMAT, "even"));
    ASSERT_TRUE(expect(&(mut){.u32_key = "qwen2.rope.dimension_count", .u32 = 8}, CM_E_UNSUPPORTED,
                       "partial rotary"));
    ASSERT_TRUE(expect(&(mut){.str_key = "general.architecture", .str = "gpt2"}, CM_E_UNSUPPORTED,
                       "architecture \"gpt2\""));
    ASSERT_TRUE(expect(&(mut){.drop_key = "general.architecture"}, CM_E_FORMAT, "general.architecture"));
}

/* Rope scaling keys on the qwen2 fixture: what loads (and into which cm_model_info values), what is refused. */
#define RS "qwen2.rope.scaling."
TEST(rope_scaling_keys) {
    /* the fixtures as llama.cpp writes them */
    cm_model *m = cm_model_load(test_fixture("models/llama-linear.gguf"), NULL, NULL);
    ASSERT_TRUE(m);
    const cm_model_info *in = cm_model_get_info(m);
    ASSERT_EQ_INT(in->rope_scaling, CM_ROPE_SCALING_LINEAR);
    ASSERT_NEAR(in->rope_factor, 4, 0);
    ASSERT_NEAR(in->rope_attn_factor, 1, 0);
    cm_model_free(m);
    m = cm_model_load(test_fixture("models/qwen2-yarn.gguf"), NULL, NULL);
    ASSERT_TRUE(m);
    in = cm_model_get_info(m);
    ASSERT_EQ_INT(in->rope_scaling, CM_ROPE_SCALING_YARN);
    ASSERT_NEAR(in->rope_factor, 4, 0);
    ASSERT_EQ_INT(in->rope_orig_ctx, 32);
    ASSERT_NEAR(in->rope_beta_fast, 32, 0);
    ASSERT_NEAR(in->rope_beta_slow, 1, 0);
    cm_model_free(m);
    m = fixture_model();
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_scaling, CM_ROPE_SCALING_NONE);
    ASSERT_NEAR(cm_model_get_info(m)->rope_factor, 1, 0);
    cm_model_free(m);

    /* benign: YaRN without an original length takes context_length; the legacy linear key; "none" ignores
     * the rest (llama.cpp does) */
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn", .f32_key = {RS "factor", RS "attn_factor"},
                              .f32 = {8, 0.5f}}, CM_OK, NULL));
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_orig_ctx, 256);
    ASSERT_NEAR(cm_model_get_info(m)->rope_attn_factor, 0.5, 0);
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.f32_key = {"qwen2.rope.scale_linear"}, .f32 = {2}}, CM_OK, NULL));
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_scaling, CM_ROPE_SCALING_LINEAR);
    ASSERT_NEAR(cm_model_get_info(m)->rope_factor, 2, 0);
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.f32_key = {RS "factor"}, .f32 = {3}}, CM_OK, NULL)); /* no type: linear */
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_scaling, CM_ROPE_SCALING_LINEAR);
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "none", .f32_key = {RS "factor"}, .f32 = {0}}, CM_OK, NULL));
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_scaling, CM_ROPE_SCALING_NONE);
    ASSERT_NEAR(cm_model_get_info(m)->rope_factor, 1, 0);
    cm_model_free(m);

    /* refused: unknown types, missing or out-of-range values, keys we do not implement */
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "dynamic", .f32_key = {RS "factor"}, .f32 = {2}},
                       CM_E_UNSUPPORTED, "rope scaling \"dynamic\" is not supported (none, linear, yarn)"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn"}, CM_E_FORMAT,
                       "rope scaling \"yarn\" without qwen2.rope.scaling.factor"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "linear", .f32_key = {RS "factor"}, .f32 = {0.5f}},
                       CM_E_FORMAT, "qwen2.rope.scaling.factor = 0.5 out of range [1, 1024]"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "linear", .f32_key = {RS "factor"}, .f32 = {NAN}},
                       CM_E_FORMAT, "qwen2.rope.scaling.factor = nan out of range"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn", .f32_key = {RS "factor"}, .f32 = {INFINITY}},
                       CM_E_FORMAT, "qwen2.rope.scaling.factor = inf out of range"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "linear", .f32_key = {RS "factor"}, .f32 = {2048}},
                       CM_E_FORMAT, "out of range [1, 1024]"));
    ASSERT_TRUE(expect(&(mut){.f32_key = {"qwen2.rope.scale_linear"}, .f32 = {-1}}, CM_E_FORMAT,
                       "qwen2.rope.scale_linear = -1 out of range"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn", .f32_key = {RS "factor"}, .f32 = {4},
                              .u32_key = RS "original_context_length", .u32 = 0},
                       CM_E_FORMAT, "qwen2.rope.scaling.original_context_length = 0 out of range"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn", .f32_key = {RS "factor", RS "attn_factor"},
                              .f32 = {4, 0}}, CM_E_FORMAT, "qwen2.rope.scaling.attn_factor = 0 out of range"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn",
                              .f32_key = {RS "factor", RS "yarn_beta_fast", RS "yarn_beta_slow"}, .f32 = {4, 1, 2}},
                       CM_E_FORMAT, "yarn_beta_fast 1 must exceed yarn_beta_slow 2"));
    ASSERT_TRUE(expect(&(mut){.str_key = RS "type", .str = "yarn",
                              .f32_key = {RS "factor", RS "yarn_log_multiplier"}, .f32 = {4, 0.1f}},
                       CM_E_UNSUPPORTED, "qwen2.rope.scaling.yarn_log_multiplier is not supported"));
    /* rope_freqs.weight (Llama 3.1, as llama.cpp converts it): F32 (E/2), every factor in range */
    ASSERT_TRUE(expect(&(mut){.add_tensor = "rope_freqs.weight", .add_ne0 = 8, .add_ne1 = 2, .add_fill = 1},
                       CM_E_FORMAT, "rope_freqs.weight must be F32 of shape [8]"));
    ASSERT_TRUE(expect(&(mut){.add_tensor = "rope_freqs.weight", .add_ne0 = 7, .add_fill = 1}, CM_E_FORMAT,
                       "rope_freqs.weight must be F32 of shape [8]"));
    ASSERT_TRUE(expect(&(mut){.add_tensor = "rope_freqs.weight", .add_ne0 = 8}, CM_E_FORMAT,
                       "rope_freqs.weight[0] = 0 out of range [0.001, 10000]"));
    ASSERT_TRUE(expect(&(mut){.add_tensor = "rope_freqs.weight", .add_ne0 = 8, .add_fill = NAN}, CM_E_FORMAT,
                       "rope_freqs.weight[0] = nan"));
    m = cm_model_load(test_fixture("models/llama-freqs.gguf"), NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_freqs, 1);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_scaling, CM_ROPE_SCALING_NONE);
    cm_model_free(m);
}

/* Logits of the fixture prompt [5, 17, 42, ..] (40 tokens) under the mutation mu, into out (40 x 300). */
static int logits_with(const mut *mu, float *out) {
    if (build(mu)) return 0;
    cm_model *m = cm_model_load(tmp_path, NULL, NULL);
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = 64, .n_batch_max = 64};
    cm_ctx *c = m ? cm_ctx_create(m, &cp, NULL) : NULL;
    int32_t tok[40], seq[40];
    int8_t want[40];
    int s = c ? cm_seq_open(c, NULL) : -1;
    for (int i = 0; i < 40; i++) tok[i] = (i * 37 + 5) % 300, seq[i] = s, want[i] = 1;
    cm_batch b = {.n = 40, .token = tok, .seq = seq, .logits = want};
    int ok = s >= 0 && cm_forward(c, &b, NULL) == CM_OK;
    for (int i = 0; ok && i < 40; i++) memcpy(out + (size_t)i * 300, cm_logits(c, i), 300 * sizeof(float));
    cm_ctx_free(c);
    cm_model_free(m);
    return ok;
}

/* Scaling changes the logits, and the ways of saying the same scaling agree bit for bit: rope_freqs all 4
 * = linear 4 = the legacy scale_linear 4; YaRN with factor 1 is no scaling. */
TEST(rope_scaling_equivalences) {
    static float base[40 * 300], lin[40 * 300], freqs[40 * 300], legacy[40 * 300], yarn1[40 * 300];
    ASSERT_TRUE(logits_with(&(mut){.drop_key = "none"}, base));
    ASSERT_TRUE(logits_with(&(mut){.str_key = "qwen2.rope.scaling.type", .str = "linear",
                                   .f32_key = {"qwen2.rope.scaling.factor"}, .f32 = {4}}, lin));
    ASSERT_TRUE(logits_with(&(mut){.add_tensor = "rope_freqs.weight", .add_ne0 = 8, .add_fill = 4}, freqs));
    ASSERT_TRUE(logits_with(&(mut){.f32_key = {"qwen2.rope.scale_linear"}, .f32 = {4}}, legacy));
    /* YaRN with factor 1 is no scaling at all (mscale 1, interpolation = extrapolation) */
    ASSERT_TRUE(logits_with(&(mut){.str_key = "qwen2.rope.scaling.type", .str = "yarn",
                                   .f32_key = {"qwen2.rope.scaling.factor"}, .f32 = {1}}, yarn1));
    double d = 0;
    for (int i = 300; i < 40 * 300; i++) d = fmax(d, fabs((double)lin[i] - base[i]));
    ASSERT_TRUE(d > 1e-2); /* the scaling matters from position 1 on */
    for (int i = 0; i < 300; i++) ASSERT_TRUE(lin[i] == base[i]); /* but not at position 0 */
    ASSERT_TRUE(!memcmp(lin, freqs, sizeof lin));
    ASSERT_TRUE(!memcmp(lin, legacy, sizeof lin));
    d = 0; /* r * inv + (1 - r) * inv may round differently from inv: equal to float precision */
    for (int i = 0; i < 40 * 300; i++) d = fmax(d, fabs((double)yarn1[i] - base[i]));
    ASSERT_TRUE(d < 1e-5);
}
#undef RS

/* Block-quantised files load, each tensor keeping its own type; weight_type names the majority type. */
TEST(block_type_models) {
    static const struct { const char *file, *wtype, *embd, *out, *v0; } cases[] = {
        {"models/qwen2-gqa-q4_0.gguf", "Q4_0", "Q4_0", NULL, "Q4_0"},
        {"models/qwen2-k-q4_k_m.gguf", "Q4_K", "Q4_K", "Q6_K", "Q6_K"},
        {"models/qwen2-k-q6_k.gguf", "Q6_K", "Q6_K", "Q6_K", "Q6_K"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cm_err err = {0};
        cm_model *m = cm_model_load(test_fixture(cases[i].file), NULL, &err);
        if (!m) { TEST_FAIL_("%s: %s", cases[i].file, err.msg); continue; }
        ASSERT_STREQ(cm_model_get_info(m)->weight_type, cases[i].wtype);
        gguf_file g;
        ASSERT_EQ_INT(gguf_open(&g, test_fixture(cases[i].file), &err), CM_OK);
        ASSERT_STREQ(gguf_ttype_name(gguf_find_tensor(&g, "token_embd.weight")->type), cases[i].embd);
        if (cases[i].out) ASSERT_STREQ(gguf_ttype_name(gguf_find_tensor(&g, "output.weight")->type), cases[i].out);
        ASSERT_STREQ(gguf_ttype_name(gguf_find_tensor(&g, "blk.0.attn_v.weight")->type), cases[i].v0);
        gguf_close(&g);
        cm_model_free(m);
    }
}

TEST(type_and_bias_rules) {
    ASSERT_TRUE(expect(&(mut){.retype = "blk.0.attn_norm.weight", .type = GGUF_TT_F16}, CM_E_UNSUPPORTED,
                       "blk.0.attn_norm.weight has type F16"));
    ASSERT_TRUE(expect(&(mut){.drop_tensor = "blk.0.attn_k.bias"}, CM_E_FORMAT, "blk.0 has 2 of the 3"));
    ASSERT_TRUE(expect(&(mut){.drop_tensor = "blk.1.attn_q.w"}, CM_E_FORMAT, "missing tensor blk.1.attn_q.weight"));
    ASSERT_TRUE(expect(&(mut){.drop_tensor = ".bias"}, CM_E_FORMAT, "qwen2 requires"));
    /* benign: a matrix of another type, absent defaults, llama without biases, untied output */
    ASSERT_TRUE(expect(&(mut){.retype = "blk.0.ffn_up.weight", .type = GGUF_TT_Q8_0}, CM_OK, NULL));
    ASSERT_TRUE(expect(&(mut){.retype = "blk.1.attn_v.weight", .type = GGUF_TT_BF16}, CM_OK, NULL));
    ASSERT_TRUE(expect(&(mut){.drop_key = "qwen2.rope.freq_base"}, CM_OK, NULL));
    cm_model *m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_NEAR(cm_model_get_info(m)->rope_theta, 1e6, 1); /* qwen2's default */
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.arch_to = "llama", .drop_tensor = ".bias", .drop_key = "qwen2.rope.freq_base"},
                       CM_OK, NULL));
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->qkv_bias, 0);
    ASSERT_EQ_INT(cm_model_get_info(m)->rope_neox, 0);
    ASSERT_NEAR(cm_model_get_info(m)->rope_theta, 10000, 1e-3); /* llama's default */
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.add_tensor = "output.weight", .add_ne0 = 64, .add_ne1 = 300}, CM_OK, NULL));
    m = cm_model_load(tmp_path, NULL, NULL);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->tied_output, 0);
    ASSERT_EQ_INT(cm_model_get_info(m)->n_params, 93504 + 64 * 300);
    cm_model_free(m);
    ASSERT_TRUE(expect(&(mut){.add_tensor = "output.weight", .add_ne0 = 64, .add_ne1 = 301}, CM_E_FORMAT,
                       "output.weight has shape [64, 301], expected [64, 300]"));
}

TEST(vocab_only) {
    /* tensors are not looked at: a broken one does not matter, but no context can be made */
    ASSERT_TRUE(build(&(mut){.drop_tensor = "blk.0."}) == 0);
    cm_model_params p = {.vocab_only = 1};
    cm_err err = {0};
    cm_model *m = cm_model_load(tmp_path, &p, &err);
    ASSERT_TRUE(m);
    ASSERT_EQ_INT(cm_model_get_info(m)->n_vocab, 300);
    cm_ctx_params cp = {.n_ctx = 16, .n_batch_max = 4};
    ASSERT_TRUE(cm_ctx_create(m, &cp, &err) == NULL);
    ASSERT_EQ_INT(err.code, CM_E_INVAL);
    cm_model_free(m);
}

/* ------------------------------------------------------------ context contract */

static cm_model *fixture(void) { return cm_model_load(test_fixture("models/qwen2-gqa.gguf"), NULL, NULL); }

static int fwd(cm_ctx *c, int n, const int32_t *tok, const int32_t *seq, cm_err *err) {
    cm_batch b = {.n = n, .token = tok, .seq = seq, .logits = NULL};
    return cm_forward(c, &b, err);
}

TEST(kv_exhaustion_changes_nothing) {
    cm_model *m = fixture();
    ASSERT_TRUE(m);
    /* 2 blocks of 32 tokens for everyone */
    cm_ctx_params p = {.n_threads = 2, .n_seq_max = 2, .n_ctx = 128, .n_batch_max = 64, .kv_tokens = 64};
    cm_err err = {0};
    cm_ctx *c = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(c);
    cm_kv_stats st;
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_total, 2);
    ASSERT_EQ_INT(st.block_tokens, 32);
    int32_t tok[64], seq[64];
    for (int i = 0; i < 64; i++) tok[i] = (i * 7) % 300;
    int a = cm_seq_open(c, NULL), b = cm_seq_open(c, NULL);
    ASSERT_TRUE(a >= 0 && b >= 0 && a != b);
    ASSERT_EQ_INT(cm_seq_open(c, &err), CM_E_NOMEM); /* n_seq_max */
    for (int i = 0; i < 64; i++) seq[i] = a;
    ASSERT_EQ_INT(fwd(c, 40, tok, seq, &err), CM_OK);
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_used, 2);
    float keep[300];
    memcpy(keep, cm_logits(c, 39), sizeof keep);
    /* b needs a block: none left; a batch mixing a (fits in its block) and b fails as a whole */
    int32_t mix_seq[2] = {a, b}, mix_tok[2] = {5, 6};
    ASSERT_EQ_INT(fwd(c, 2, mix_tok, mix_seq, &err), CM_E_NOMEM);
    ASSERT_TRUE(strstr(err.msg, "KV pool exhausted"));
    ASSERT_EQ_INT(cm_seq_len(c, a), 40);
    ASSERT_EQ_INT(cm_seq_len(c, b), 0);
    ASSERT_TRUE(cm_logits(c, 0) == NULL); /* the old batch's logits are gone after any forward */
    /* a alone fits in its second block, and equals what it would have been */
    ASSERT_EQ_INT(fwd(c, 1, &mix_tok[0], &a, &err), CM_OK);
    ASSERT_EQ_INT(cm_seq_len(c, a), 41);
    /* shrinking a frees its second block for b */
    ASSERT_EQ_INT(cm_seq_truncate(c, a, 20, &err), CM_OK);
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_used, 1);
    ASSERT_EQ_INT(fwd(c, 1, &mix_tok[1], &b, &err), CM_OK);
    cm_seq_close(c, a);
    cm_seq_close(c, b);
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_used, 0);
    /* the same 40 tokens again give the same logits */
    a = cm_seq_open(c, NULL);
    for (int i = 0; i < 40; i++) seq[i] = a;
    ASSERT_EQ_INT(fwd(c, 40, tok, seq, &err), CM_OK);
    ASSERT_TRUE(!memcmp(keep, cm_logits(c, 39), sizeof keep));
    cm_ctx_free(c);
    cm_model_free(m);
}

TEST(batch_validation) {
    cm_model *m = fixture();
    ASSERT_TRUE(m);
    cm_ctx_params p = {.n_threads = 1, .n_seq_max = 2, .n_ctx = 8, .n_batch_max = 16};
    cm_err err = {0};
    cm_ctx *c = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(c);
    int s = cm_seq_open(c, NULL);
    int32_t tok[20] = {0}, seq[20];
    for (int i = 0; i < 20; i++) seq[i] = s;
    ASSERT_EQ_INT(fwd(c, 0, tok, seq, &err), CM_E_INVAL);
    ASSERT_EQ_INT(fwd(c, 17, tok, seq, &err), CM_E_INVAL);       /* > n_batch_max */
    ASSERT_EQ_INT(fwd(c, 9, tok, seq, &err), CM_E_RANGE);        /* > n_ctx */
    tok[3] = 300;
    ASSERT_EQ_INT(fwd(c, 4, tok, seq, &err), CM_E_RANGE);        /* token outside the vocabulary */
    tok[3] = -1;
    ASSERT_EQ_INT(fwd(c, 4, tok, seq, &err), CM_E_RANGE);
    tok[3] = 0;
    seq[2] = 1;                                                  /* not open */
    ASSERT_EQ_INT(fwd(c, 4, tok, seq, &err), CM_E_RANGE);
    seq[2] = 7;                                                  /* no such slot */
    ASSERT_EQ_INT(fwd(c, 4, tok, seq, &err), CM_E_RANGE);
    seq[2] = s;
    ASSERT_EQ_INT(cm_seq_len(c, s), 0);
    ASSERT_EQ_INT(cm_seq_len(c, 1), CM_E_RANGE);
    /* logits NULL: only the last token of each sequence */
    ASSERT_EQ_INT(fwd(c, 8, tok, seq, &err), CM_OK);
    ASSERT_TRUE(cm_logits(c, 7) != NULL);
    for (int i = 0; i < 7; i++) ASSERT_TRUE(cm_logits(c, i) == NULL);
    ASSERT_TRUE(cm_logits(c, 8) == NULL && cm_logits(c, -1) == NULL);
    ASSERT_EQ_INT(fwd(c, 1, tok, seq, &err), CM_E_RANGE);        /* the sequence is full */
    ASSERT_EQ_INT(cm_seq_truncate(c, s, 9, &err), CM_E_RANGE);
    ASSERT_EQ_INT(cm_seq_truncate(c, s, 0, &err), CM_OK);
    /* explicit flags, two sequences interleaved */
    int s2 = cm_seq_open(c, NULL);
    int32_t seq2[4] = {s, s2, s, s2};
    int8_t want[4] = {1, 0, 0, 1};
    cm_batch b = {.n = 4, .token = tok, .seq = seq2, .logits = want};
    ASSERT_EQ_INT(cm_forward(c, &b, &err), CM_OK);
    ASSERT_TRUE(cm_logits(c, 0) && !cm_logits(c, 1) && !cm_logits(c, 2) && cm_logits(c, 3));
    ASSERT_EQ_INT(cm_seq_len(c, s), 2);
    ASSERT_EQ_INT(cm_seq_len(c, s2), 2);
    cm_seq_close(c, 5); /* no-op */
    cm_ctx_free(c);
    cm_ctx_free(NULL);
    cm_ctx_params bad = {.n_threads = -1};
    ASSERT_TRUE(cm_ctx_create(m, &bad, &err) == NULL && err.code == CM_E_INVAL);
    cm_model_free(m);
}

/* ------------------------------------------------------------ a forward nested in a yield hook */

typedef struct nest_probe {
    cm_ctx *c;
    int calls, at;            /* hook calls so far; the call that runs the nested batch */
    const cm_batch *nested;   /* run at call `at` */
    int rc, rc_bad[4];        /* its result; the refused nested batches' */
    const cm_batch *bad[4];
    float got[300];           /* logits of the nested batch's last token, read inside the hook */
} nest_probe;

static void nest_hook(void *ud) {
    nest_probe *p = ud;
    if (p->calls++ != p->at) return;
    for (int i = 0; i < 4; i++) p->rc_bad[i] = p->bad[i] ? cm_forward(p->c, p->bad[i], NULL) : CM_OK;
    p->rc = cm_forward(p->c, p->nested, NULL);
    const float *lg = p->rc == CM_OK ? cm_logits(p->c, p->nested->n - 1) : NULL;
    if (lg) memcpy(p->got, lg, sizeof p->got);
}

/* A batch of sequence B run inside the yield hook of a batch of sequence A, between two of its layers:
 * both give the logits each gives alone, and both sequences continue as if they had run one after the
 * other. Batches the hook may not nest are refused without changing anything. */
TEST(nested_forward_in_yield_hook) {
    cm_model *m = fixture();
    ASSERT_TRUE(m);
    const int n_layer = cm_model_get_info(m)->n_layer;
    cm_ctx_params p = {.n_threads = 2, .n_seq_max = 3, .n_ctx = 128, .n_batch_max = 64};
    cm_err err = {0};
    int32_t ta[40], tb[7], sa[40], sb[7];
    for (int i = 0; i < 40; i++) ta[i] = (i * 11 + 3) % 300;
    for (int i = 0; i < 7; i++) tb[i] = (i * 29 + 7) % 300;
    /* alone: A's 40 tokens, then one more; B's first token, its next 5 (positions 1..5, so a nested
     * batch's positions differ from the outer one's rows), then one more */
    float ref_a[300], ref_a2[300], ref_b[300], ref_b2[300];
    cm_ctx *r = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(r);
    int a = cm_seq_open(r, NULL), b = cm_seq_open(r, NULL);
    for (int i = 0; i < 40; i++) sa[i] = a;
    for (int i = 0; i < 7; i++) sb[i] = b;
    ASSERT_EQ_INT(fwd(r, 40, ta, sa, &err), CM_OK);
    memcpy(ref_a, cm_logits(r, 39), sizeof ref_a);
    ASSERT_EQ_INT(fwd(r, 1, tb, sb, &err), CM_OK);
    ASSERT_EQ_INT(fwd(r, 5, tb + 1, sb, &err), CM_OK);
    memcpy(ref_b, cm_logits(r, 4), sizeof ref_b);
    ASSERT_EQ_INT(fwd(r, 1, &ta[0], sa, &err), CM_OK);
    memcpy(ref_a2, cm_logits(r, 0), sizeof ref_a2);
    ASSERT_EQ_INT(fwd(r, 1, &tb[6], sb, &err), CM_OK);
    memcpy(ref_b2, cm_logits(r, 0), sizeof ref_b2);
    /* a context without n_batch_nested refuses to nest */
    nest_probe pr = {.c = r, .at = 0};
    int c0 = cm_seq_open(r, NULL);
    int32_t sc[6] = {c0, c0, c0, c0, c0, c0};
    cm_batch nb = {.n = 5, .token = tb, .seq = sc};
    pr.nested = &nb;
    cm_batch ob = {.n = 1, .token = ta, .seq = sa, .yield = nest_hook, .yield_ud = &pr};
    ASSERT_EQ_INT(cm_forward(r, &ob, &err), CM_OK);
    ASSERT_EQ_INT(pr.rc, CM_E_INVAL);
    ASSERT_EQ_INT(cm_seq_len(r, c0), 0);
    cm_ctx_free(r);
    /* nested: B's 5 tokens after the first layer of A's 40 (the fixture has two layers) */
    p.n_batch_nested = 5;
    cm_ctx *c = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(c);
    a = cm_seq_open(c, NULL);
    b = cm_seq_open(c, NULL);
    for (int i = 0; i < 40; i++) sa[i] = a;
    for (int i = 0; i < 7; i++) sb[i] = b;
    ASSERT_EQ_INT(fwd(c, 1, tb, sb, &err), CM_OK);
    int32_t mix[5] = {b, b, a, b, b};   /* a sequence of the outer batch */
    int32_t tb6[6] = {0};
    cm_batch big = {.n = 6, .token = tb6, .seq = sb};       /* more than n_batch_nested */
    cm_batch with_a = {.n = 5, .token = tb + 1, .seq = mix};
    cm_batch hooked = {.n = 5, .token = tb + 1, .seq = sb, .yield = nest_hook};
    cm_batch good = {.n = 5, .token = tb + 1, .seq = sb};
    pr = (nest_probe){.c = c, .at = 0, .nested = &good, .bad = {&big, &with_a, &hooked, NULL}};
    hooked.yield_ud = &pr;
    cm_batch outer = {.n = 40, .token = ta, .seq = sa, .yield = nest_hook, .yield_ud = &pr};
    ASSERT_EQ_INT(cm_forward(c, &outer, &err), CM_OK);
    ASSERT_EQ_INT(pr.calls, n_layer + 1); /* after every layer, and after the output head's one slice */
    for (int i = 0; i < 3; i++) ASSERT_EQ_INT(pr.rc_bad[i], CM_E_INVAL);
    ASSERT_EQ_INT(pr.rc, CM_OK);
    ASSERT_TRUE(!memcmp(pr.got, ref_b, sizeof ref_b));
    ASSERT_TRUE(!memcmp(cm_logits(c, 39), ref_a, sizeof ref_a));
    ASSERT_EQ_INT(cm_seq_len(c, a), 40);
    ASSERT_EQ_INT(cm_seq_len(c, b), 6);
    /* both continue as alone */
    ASSERT_EQ_INT(fwd(c, 1, &ta[0], sa, &err), CM_OK);
    ASSERT_TRUE(!memcmp(cm_logits(c, 0), ref_a2, sizeof ref_a2));
    ASSERT_EQ_INT(fwd(c, 1, &tb[6], sb, &err), CM_OK);
    ASSERT_TRUE(!memcmp(cm_logits(c, 0), ref_b2, sizeof ref_b2));
    /* nested after the output head of a decode batch: its logits are computed, and kept */
    pr = (nest_probe){.c = c, .at = n_layer, .nested = &good, .rc = -100};
    int b2 = cm_seq_open(c, NULL);
    int32_t sb2[5] = {b2, b2, b2, b2, b2};
    ASSERT_EQ_INT(fwd(c, 1, tb, sb2, &err), CM_OK);
    good.seq = sb2;
    cm_batch dec = {.n = 1, .token = &ta[1], .seq = sa, .yield = nest_hook, .yield_ud = &pr};
    float ref_a3[300];
    ASSERT_EQ_INT(cm_forward(c, &dec, &err), CM_OK);
    ASSERT_EQ_INT(pr.rc, CM_OK);
    ASSERT_TRUE(!memcmp(pr.got, ref_b, sizeof ref_b));
    memcpy(ref_a3, cm_logits(c, 0), sizeof ref_a3);
    ASSERT_EQ_INT(cm_seq_truncate(c, a, 41, &err), CM_OK); /* the same token again, without a hook */
    ASSERT_EQ_INT(fwd(c, 1, &ta[1], sa, &err), CM_OK);
    ASSERT_TRUE(!memcmp(cm_logits(c, 0), ref_a3, sizeof ref_a3));
    /* outside a hook a batch is never nested (and n_batch_max bounds it, not n_batch_nested) */
    ASSERT_EQ_INT(fwd(c, 6, tb6, sb, &err), CM_OK);
    cm_ctx_free(c);
    /* the output head in slices of 64 rows (5 hook calls after the layers): one logits row (matvec)
     * and 20 (the int8 GEMM of the Q8_0 fixture; f32 weights with 20 rows take sgemm, unsliced), every
     * logit as without a hook */
    for (int k = 0; k < 4; k++) {
    int quant = k >= 2, rows = k % 2 ? 20 : 1;
    cm_model *mq = cm_model_load(test_fixture(quant ? "models/qwen2-gqa-q8_0.gguf" : "models/qwen2-gqa.gguf"), NULL, NULL);
    ASSERT_TRUE(mq);
    setenv("CODEMOE_YIELD_VOCAB_ROWS", "64", 1);
    cm_ctx_params pq = p;
    pq.n_batch_nested = 0;
    cm_ctx *q = cm_ctx_create(mq, &pq, &err);
    unsetenv("CODEMOE_YIELD_VOCAB_ROWS");
    ASSERT_TRUE(q);
    int8_t all[20];
    memset(all, 1, sizeof all);
    {
        int x1 = cm_seq_open(q, NULL), x2 = cm_seq_open(q, NULL);
        int32_t s1[20], s2[20];
        for (int i = 0; i < 20; i++) s1[i] = x1, s2[i] = x2;
        /* the sliced run first: nothing left in the logits buffer can make it pass */
        pr = (nest_probe){.c = q, .at = -1};
        cm_batch sliced = {.n = 20, .token = ta, .seq = s1, .logits = rows > 1 ? all : NULL, .yield = nest_hook,
                           .yield_ud = &pr};
        ASSERT_EQ_INT(cm_forward(q, &sliced, &err), CM_OK);
        ASSERT_EQ_INT(pr.calls, n_layer + (rows == 1 || quant ? 5 : 0));
        static float keep[20][300];
        for (int i = 20 - rows; i < 20; i++) memcpy(keep[i], cm_logits(q, i), sizeof keep[i]);
        cm_batch plain = {.n = 20, .token = ta, .seq = s2, .logits = rows > 1 ? all : NULL};
        ASSERT_EQ_INT(cm_forward(q, &plain, &err), CM_OK);
        for (int i = 20 - rows; i < 20; i++) ASSERT_TRUE(!memcmp(keep[i], cm_logits(q, i), sizeof keep[i]));
        cm_seq_close(q, x1);
        cm_seq_close(q, x2);
    }
    cm_ctx_free(q);
    cm_model_free(mq);
    }
    /* n_batch_nested above n_batch_max is refused; mixture-of-experts models do not nest */
    p.n_batch_nested = 65;
    ASSERT_TRUE(cm_ctx_create(m, &p, &err) == NULL && err.code == CM_E_INVAL);
    cm_model_free(m);
    m = cm_model_load(test_fixture("models/qwen3moe.gguf"), NULL, NULL);
    ASSERT_TRUE(m);
    p.n_batch_nested = 5;
    ASSERT_TRUE(cm_ctx_create(m, &p, &err) == NULL && err.code == CM_E_INVAL);
    p.n_batch_nested = 0;
    c = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(c);
    cm_ctx_free(c);
    cm_model_free(m);
}

/* Every file of tests/fixtures/bad/model/ is refused by cm_model_load for the reason its name gives. */
static const struct { const char *file, *msg; } bad_models[] = {
    {"qwen3moe_expert_count_mismatch.gguf", "tensor blk.0.ffn_gate_inp.weight has shape [16, 4], expected [16, 5]"},
    {"qwen3moe_top_k_above_count.gguf", "qwen3moe.expert_used_count = 5 (top-k) must be in [1, expert_count 4]"},
    {"qwen3moe_top_k_zero.gguf", "qwen3moe.expert_used_count = 0 (top-k) must be in [1, expert_count 4]"},
    {"qwen3moe_missing_down_exps.gguf", "missing tensor blk.0.ffn_down_exps.weight"},
    {"qwen3moe_up_exps_shape.gguf", "tensor blk.0.ffn_up_exps.weight has shape [16, 8, 3], expected [16, 8, 4]"},
    {"qwen3_missing_k_norm.gguf", "missing tensor blk.0.attn_k_norm.weight"},
};

static void bad_model_refused(const char *path, const char *name, void *ud) {
    int *seen = ud;
    size_t i = 0, n = sizeof bad_models / sizeof bad_models[0];
    while (i < n && strcmp(bad_models[i].file, name)) i++;
    if (i == n) {
        TEST_FAIL_("bad/model/%s is not in test_model.c's table", name);
        return;
    }
    (*seen)++;
    cm_err err = {0};
    cm_model *m = cm_model_load(path, NULL, &err);
    if (m) {
        TEST_FAIL_("bad/model/%s was loaded", name);
        cm_model_free(m);
    } else if (!strstr(err.msg, bad_models[i].msg)) {
        TEST_FAIL_("bad/model/%s: \"%s\" lacks \"%s\"", name, err.msg, bad_models[i].msg);
    }
}

TEST(bad_model_corpus) {
    int seen = 0;
    ASSERT_EQ_INT(test_foreach_fixture("bad/model", ".gguf", bad_model_refused, &seen),
                  (int)(sizeof bad_models / sizeof bad_models[0]));
    ASSERT_EQ_INT(seen, (int)(sizeof bad_models / sizeof bad_models[0]));
}

/* The Qwen3 family as llama.cpp writes it: q/k norms, head_dim (key_length) != D / H, NeoX rope, theta
 * 1e6 by default; the sparse MoE reports its experts and top-k and no shared expert or segment level. */
TEST(qwen3_models) {
    cm_err err = {0};
    cm_model *m = cm_model_load(test_fixture("models/qwen3-gqa.gguf"), NULL, &err);
    ASSERT_TRUE(m);
    const cm_model_info *in = cm_model_get_info(m);
    ASSERT_STREQ(in->arch, "qwen3");
    ASSERT_EQ_INT(in->head_dim, 32);
    ASSERT_TRUE(in->head_dim != in->n_embd / in->n_head);
    ASSERT_EQ_INT(in->rope_neox, 1);
    ASSERT_EQ_INT(in->qkv_bias, 0);
    cm_moe_info mi;
    cm_model_moe_info(m, &mi);
    ASSERT_EQ_INT(mi.kind, CM_MOE_KIND_DENSE);
    cm_model_free(m);
    m = cm_model_load(test_fixture("models/qwen3moe.gguf"), NULL, &err);
    ASSERT_TRUE(m);
    in = cm_model_get_info(m);
    ASSERT_STREQ(in->arch, "qwen3moe");
    ASSERT_EQ_INT(in->rope_neox, 1);
    ASSERT_TRUE(in->head_dim != in->n_embd / in->n_head);
    cm_model_moe_info(m, &mi);
    ASSERT_EQ_INT(mi.kind, CM_MOE_KIND_SPARSE);
    ASSERT_EQ_INT(mi.n_experts, 8);
    ASSERT_EQ_INT(mi.top_k, 2);
    ASSERT_EQ_INT(mi.shared_expert, -1);
    ASSERT_EQ_INT(mi.n_seg_experts, 0);
    cm_model_free(m);
    /* a Q4_K_M-style file: expert tensors of one layer in different types (Q4_K, Q5_0 / Q8_0 down) */
    m = cm_model_load(test_fixture("models/qwen3moe-k-q4_k_m.gguf"), NULL, &err);
    ASSERT_TRUE(m);
    ASSERT_STREQ(cm_model_get_info(m)->weight_type, "Q4_K");
    cm_model_free(m);
    /* the q/k norms belong to the Qwen3 family only: a qwen2 file does not read them */
    ASSERT_TRUE(expect(&(mut){.add_tensor = "blk.0.attn_q_norm.weight", .add_ne0 = 7, .add_ne1 = 0}, CM_OK, NULL));
    /* ... and a qwen3 file must have them */
    ASSERT_TRUE(expect(&(mut){.arch_to = "qwen3"}, CM_E_FORMAT, "missing tensor blk.0.attn_q_norm.weight"));
}

/* cm_model_decode_bytes against the file's own tensor listing (cm_model_foreach): a dense model reads
 * every tensor once per token (an untied embedding one row of it), a sparse MoE only k of its E experts
 * of each stacked expert tensor; K and V add n_layer x 2 x kv_dim elements per position. */
typedef struct {
    uint64_t all, exps, embd_row, embd;
    int64_t n_experts;
} tensor_sums;
static void sum_tensor(void *ud, const char *name, const char *type, int n_dims, const int64_t *dims,
                       uint64_t offset, uint64_t nbytes) {
    (void)type, (void)offset;
    tensor_sums *s = ud;
    s->all += nbytes;
    if (strstr(name, "_exps.")) {
        s->exps += nbytes;
        ASSERT_EQ_INT(n_dims, 3);
        s->n_experts = dims[2];
    }
    if (!strcmp(name, "token_embd.weight")) s->embd = nbytes, s->embd_row = nbytes / (uint64_t)dims[1];
}

TEST(decode_bytes) {
    static const char *files[] = {"models/qwen2-gqa.gguf", "models/qwen2-gqa-q8_0.gguf", "models/qwen2-k-q4_k_m.gguf",
                                  "models/llama-gqa.gguf", "models/qwen3-k-q4_k_m.gguf", "models/qwen3moe.gguf",
                                  "models/qwen3moe-k-q4_k_m.gguf"};
    int tied_seen = 0, untied_seen = 0, moe_seen = 0;
    for (size_t f = 0; f < sizeof files / sizeof *files; f++) {
        cm_err err = {0};
        cm_model *m = cm_model_load(test_fixture(files[f]), NULL, &err);
        ASSERT_TRUE(m);
        const cm_model_info *in = cm_model_get_info(m);
        tensor_sums s = {0};
        cm_model_foreach(m, NULL, sum_tensor, &s);
        uint64_t want = s.all;
        if (!in->tied_output) want -= s.embd - s.embd_row;
        cm_moe_info mi;
        cm_model_moe_info(m, &mi);
        if (mi.kind == CM_MOE_KIND_SPARSE) {
            ASSERT_EQ_INT(s.n_experts, mi.n_experts);
            ASSERT_TRUE(mi.top_k < mi.n_experts);
            want -= s.exps - s.exps / (uint64_t)mi.n_experts * (uint64_t)mi.top_k;
            moe_seen++;
        } else {
            ASSERT_EQ_INT(s.exps, 0);
        }
        tied_seen += in->tied_output, untied_seen += !in->tied_output;
        uint64_t kv_pos = (uint64_t)in->n_layer * 2 * (uint64_t)(in->n_head_kv * in->head_dim);
        ASSERT_EQ_INT(cm_model_decode_bytes(m, 0, CM_KV_F32), want + kv_pos * 4);
        ASSERT_EQ_INT(cm_model_decode_bytes(m, 0, CM_KV_F16), want + kv_pos * 2);
        ASSERT_EQ_INT(cm_model_decode_bytes(m, 99, CM_KV_F16), want + kv_pos * 2 * 100);
        ASSERT_EQ_INT(cm_model_decode_bytes(m, -1, CM_KV_F16), 0);
        ASSERT_EQ_INT(cm_model_decode_bytes(m, 0, 7), 0);
        cm_model_free(m);
    }
    ASSERT_TRUE(tied_seen > 0 && untied_seen > 0 && moe_seen == 2);
    ASSERT_EQ_INT(cm_model_decode_bytes(NULL, 0, CM_KV_F32), 0);
}

/* The three contexts of a packing test on a fixture (off, auto, forced: setting -1, 0, 1 through set),
 * each checked for its packed bytes (bytes): none off; auto and forced as the two flags say. */
typedef struct pack_ctxs {
    cm_ctx *c[3]; /* off, auto, forced */
} pack_ctxs;
static int pack_ctxs_open(pack_ctxs *pc, const cm_model *m, cm_ctx_params p, void (*set)(cm_ctx_params *, int),
                          size_t (*bytes)(const cm_ctx *), int auto_packs, int forced_packs) {
    cm_err err = {0};
    for (int i = 0; i < 3; i++) {
        set(&p, i - 1);
        pc->c[i] = cm_ctx_create(m, &p, &err);
    }
    if (!pc->c[0] || !pc->c[1] || !pc->c[2]) return 0;
    CHECK_TRUE(bytes(pc->c[0]) == 0);
    CHECK_TRUE((bytes(pc->c[1]) > 0) == auto_packs);
    CHECK_TRUE((bytes(pc->c[2]) > 0) == forced_packs);
    return 1;
}
static void pack_ctxs_close(pack_ctxs *pc) {
    for (int i = 0; i < 3; i++) cm_ctx_free(pc->c[i]);
}
static void set_pack_output(cm_ctx_params *p, int v) { p->pack_output = v; }
static void set_pack_layers(cm_ctx_params *p, int v) { p->pack_layers = v; }

/* The packed output head (cm_ctx_params.pack_output): the same logits, bit for bit, as the head repacked
 * per call, for one logits row (the matvec) and several (the int8 GEMM, from two rows on when packed),
 * with the fixture's 300-row vocabulary ending in a partial group; Q8_0 and Q4_0 heads are packed by
 * default, a K-quant head only when asked; never with -1, nor in the scalar family (no int8 GEMM). */
TEST(packed_output_head_same_logits) {
    static const char *files[] = {"models/qwen2-gqa-q8_0.gguf", "models/qwen2-gqa-q4_0.gguf", "models/qwen2-k-q4_k_m.gguf"};
    const int simd = strcmp(cm_kernels_isa(), "scalar") != 0;
    for (int f = 0; f < 3; f++) {
        cm_model *m = cm_model_load(test_fixture(files[f]), NULL, NULL);
        ASSERT_TRUE(m);
        const int V = cm_model_get_info(m)->n_vocab;
        cm_err err = {0};
        pack_ctxs pc;
        cm_ctx_params p0 = {.n_threads = 2, .n_seq_max = 2, .n_ctx = 64, .n_batch_max = 24};
        ASSERT_TRUE(pack_ctxs_open(&pc, m, p0, set_pack_output, cm_ctx_output_pack_bytes, simd && f < 2, simd));
        cm_ctx *plain = pc.c[0], *packed = f < 2 ? pc.c[1] : pc.c[2];
        int32_t tok[24], seq[24];
        int8_t want[24];
        static const int rows[] = {1, 2, 3, 5, 16, 24};
        for (size_t k = 0; k < sizeof rows / sizeof *rows; k++) {
            int n = rows[k];
            for (int i = 0; i < n; i++) tok[i] = (i * 37 + (int)k * 11 + 5) % V, want[i] = 1;
            float *ref = malloc((size_t)n * (size_t)V * sizeof(float));
            cm_ctx *cs[2] = {plain, packed};
            for (int c = 0; c < 2; c++) {
                int sq = cm_seq_open(cs[c], NULL);
                for (int i = 0; i < n; i++) seq[i] = sq;
                cm_batch b = {.n = n, .token = tok, .seq = seq, .logits = want};
                ASSERT_EQ_INT(cm_forward(cs[c], &b, &err), CM_OK);
                for (int i = 0; i < n; i++) {
                    const float *lg = cm_logits(cs[c], i);
                    ASSERT_TRUE(lg != NULL);
                    if (c == 0) memcpy(ref + (size_t)i * V, lg, (size_t)V * sizeof(float));
                    else if (memcmp(ref + (size_t)i * V, lg, (size_t)V * sizeof(float)))
                        TEST_FAIL_("%s, %d logits rows: row %d differs packed", files[f], n, i);
                }
                cm_seq_close(cs[c], sq);
            }
            free(ref);
        }
        pack_ctxs_close(&pc);
        cm_model_free(m);
    }
}

/* The packed layers (cm_ctx_params.pack_layers): the same logits, bit for bit, as the layers repacked per
 * call, for decode steps of 1 to 16 rows (the matvec for one, the packed int8 GEMM from two) and a
 * prefill (which takes the file's weights); Q8_0 and Q4_0 layers are packed by default, K-quant ones
 * only when asked; never with -1, nor in the scalar family. */
TEST(packed_layers_same_logits) {
    static const char *files[] = {"models/qwen2-gqa-q8_0.gguf", "models/qwen2-gqa-q4_0.gguf", "models/qwen2-k-q4_k_m.gguf"};
    const int simd = strcmp(cm_kernels_isa(), "scalar") != 0;
    for (int f = 0; f < 3; f++) {
        cm_model *m = cm_model_load(test_fixture(files[f]), NULL, NULL);
        ASSERT_TRUE(m);
        const int V = cm_model_get_info(m)->n_vocab;
        cm_err err = {0};
        pack_ctxs pc;
        cm_ctx_params p0 = {.n_threads = 2, .n_seq_max = 16, .n_ctx = 64, .n_batch_max = 40};
        ASSERT_TRUE(pack_ctxs_open(&pc, m, p0, set_pack_layers, cm_ctx_layers_pack_bytes, simd && f < 2, simd));
        cm_ctx *cs[2] = {pc.c[0], f < 2 ? pc.c[1] : pc.c[2]};
        int sq[2][16];
        for (int c = 0; c < 2; c++)
            for (int k = 0; k < 16; k++) sq[c][k] = cm_seq_open(cs[c], NULL);
        /* a 40-token prompt on sequence 0, then steps of 1, 2, 3, 5, 16 rows over the 16 sequences */
        static const int rows[] = {40, 1, 2, 3, 5, 16};
        for (size_t k = 0; k < sizeof rows / sizeof *rows; k++) {
            int n = rows[k];
            float *ref = malloc((size_t)n * (size_t)V * sizeof(float));
            ASSERT_TRUE(ref);
            for (int c = 0; c < 2; c++) {
                int32_t tok[40], seq[40];
                int8_t want[40];
                for (int i = 0; i < n; i++)
                    tok[i] = (i * 41 + (int)k * 13 + 3) % V, seq[i] = sq[c][k == 0 ? 0 : i], want[i] = 1;
                cm_batch b = {.n = n, .token = tok, .seq = seq, .logits = want};
                ASSERT_EQ_INT(cm_forward(cs[c], &b, &err), CM_OK);
                for (int i = 0; i < n; i++) {
                    const float *lg = cm_logits(cs[c], i);
                    ASSERT_TRUE(lg != NULL);
                    if (c == 0) memcpy(ref + (size_t)i * V, lg, (size_t)V * sizeof(float));
                    else if (memcmp(ref + (size_t)i * V, lg, (size_t)V * sizeof(float)))
                        TEST_FAIL_("%s, a step of %d rows: row %d differs packed", files[f], n, i);
                }
            }
            free(ref);
        }
        pack_ctxs_close(&pc);
        cm_model_free(m);
    }
}

static long minor_faults(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

/* prefault_buffers: a fresh context's first step (a full batch with logits for every sequence) takes
 * almost no page faults; without it, it takes one per page of the buffers it writes first. malloc would
 * hide the difference: its own filling (MALLOC_PERTURB_, which the test runner sets) touches new
 * buffers, and freed memory comes back already resident; here the filling is off, every buffer of 64
 * KiB or more is a fresh mapping, and the test runs first. */
TEST(prefault_buffers_spare_the_first_step_its_faults) {
    mallopt(M_PERTURB, 0);
    mallopt(M_MMAP_THRESHOLD, 64 << 10);
    cm_model *m = fixture();
    ASSERT_TRUE(m);
    const int V = cm_model_get_info(m)->n_vocab;
    long faults[2] = {0, 0};
    for (int pf = 0; pf <= 1; pf++) {
        cm_err err = {0};
        cm_ctx_params p = {.n_threads = 1, .n_seq_max = 4, .n_ctx = 1024, .n_batch_max = 512, .prefault_buffers = pf};
        cm_ctx *c = cm_ctx_create(m, &p, &err);
        ASSERT_TRUE(c);
        int sq[4];
        for (int k = 0; k < 4; k++) sq[k] = cm_seq_open(c, NULL);
        static int32_t tok[512], seq[512];
        static int8_t want[512];
        for (int i = 0; i < 512; i++) tok[i] = (i * 7 + 1) % V, seq[i] = sq[i / 128], want[i] = i % 128 == 127;
        cm_batch b = {.n = 512, .token = tok, .seq = seq, .logits = want};
        long f0 = minor_faults();
        ASSERT_EQ_INT(cm_forward(c, &b, &err), CM_OK);
        faults[pf] = minor_faults() - f0;
        cm_ctx_free(c);
    }
    fprintf(stderr, "  first step's page faults: %ld without prefault_buffers, %ld with\n", faults[0], faults[1]);
#if defined(__SANITIZE_ADDRESS__)
    /* AddressSanitizer's allocator and shadow memory fault on their own schedule: counted, not judged */
#else
    CHECK_TRUE(faults[1] < 16);
    CHECK_TRUE(faults[0] > 64);
#endif
    cm_model_free(m);
}

/* A long prefill batch at 2 and 3 threads gives the logits 1 thread gives, bit for bit: each thread
 * takes its share of the tokens through every step of a layer, the int8 GEMM's included (forward.c
 * token_split), and no row may depend on where a split falls. Two sequences of 130 and 71 tokens,
 * every row's logits. */
TEST(long_prefill_same_on_threads) {
    static const char *files[] = {"models/qwen2-gqa-q8_0.gguf", "models/qwen2-gqa-q4_0.gguf", "models/qwen2-k-q4_k_m.gguf"};
    enum { NA = 130, NB = 71, N = NA + NB };
    for (int f = 0; f < 3; f++) {
        cm_model *m = cm_model_load(test_fixture(files[f]), NULL, NULL);
        ASSERT_TRUE(m);
        const int V = cm_model_get_info(m)->n_vocab;
        float *ref = malloc((size_t)N * (size_t)V * sizeof(float));
        ASSERT_TRUE(ref);
        for (int threads = 1; threads <= 3; threads++) {
            cm_err err = {0};
            cm_ctx_params p = {.n_threads = threads, .n_seq_max = 2, .n_ctx = 256, .n_batch_max = N};
            cm_ctx *c = cm_ctx_create(m, &p, &err);
            ASSERT_TRUE(c);
            int sa = cm_seq_open(c, NULL), sb = cm_seq_open(c, NULL);
            int32_t tok[N], seq[N];
            int8_t want[N];
            for (int i = 0; i < N; i++) {
                tok[i] = (i * 29 + 3) % V, seq[i] = i < NA ? sa : sb, want[i] = 1;
            }
            cm_batch b = {.n = N, .token = tok, .seq = seq, .logits = want};
            ASSERT_EQ_INT(cm_forward(c, &b, &err), CM_OK);
            for (int i = 0; i < N; i++) {
                const float *lg = cm_logits(c, i);
                ASSERT_TRUE(lg != NULL);
                if (threads == 1) memcpy(ref + (size_t)i * V, lg, (size_t)V * sizeof(float));
                else if (memcmp(ref + (size_t)i * V, lg, (size_t)V * sizeof(float))) {
                    TEST_FAIL_("%s: row %d differs at %d threads", files[f], i, threads);
                    break;
                }
            }
            cm_ctx_free(c);
        }
        free(ref);
        cm_model_free(m);
    }
}

/* cm_logits_argmax: every row's token is the greedy sampler's for that row (two threads, rows in any
 * order, one repeated); a row without logits is refused with out untouched. cm_sampler_take with that
 * token gives what cm_sampler_sample gives: the same log-probabilities, the same recorded history. */
TEST(logits_argmax_is_the_greedy_sample) {
    cm_model *m = fixture();
    ASSERT_TRUE(m);
    const int V = cm_model_get_info(m)->n_vocab;
    cm_err err = {0};
    cm_ctx_params p = {.n_threads = 2, .n_seq_max = 1, .n_ctx = 64, .n_batch_max = 16};
    cm_ctx *c = cm_ctx_create(m, &p, &err);
    ASSERT_TRUE(c);
    int32_t tok[12], seq[12];
    int8_t want[12];
    int sq = cm_seq_open(c, NULL);
    for (int i = 0; i < 12; i++) tok[i] = (i * 53 + 7) % V, seq[i] = sq, want[i] = i != 4;
    cm_batch b = {.n = 12, .token = tok, .seq = seq, .logits = want};
    ASSERT_EQ_INT(cm_forward(c, &b, &err), CM_OK);
    static const int rows[] = {11, 0, 3, 7, 7, 1, 10, 2};
    const int n = (int)(sizeof rows / sizeof *rows);
    int32_t out[8];
    ASSERT_EQ_INT(cm_logits_argmax(c, n, rows, out), 0);
    cm_sampling sp;
    cm_sampling_default(&sp);
    sp.temperature = 0.0f;
    sp.n_logprobs = 3;
    cm_sampler *a = cm_sampler_create(m, &sp, &err), *t = cm_sampler_create(m, &sp, &err);
    ASSERT_TRUE(a && t && cm_sampler_is_greedy(a));
    for (int i = 0; i < n; i++) {
        const float *lg = cm_logits(c, rows[i]);
        float lpa = 0, lpt = 0;
        cm_token_logprob ta[3], tt[3];
        int32_t ga = cm_sampler_sample(a, lg, &lpa, ta);
        if (out[i] != ga) TEST_FAIL_("row %d: argmax %d, greedy sample %d", rows[i], out[i], ga);
        CHECK_TRUE(cm_sampler_take(t, lg, out[i], &lpt, tt) == ga);
        CHECK_TRUE(lpa == lpt && !memcmp(ta, tt, sizeof ta));
    }
    int32_t keep[8] = {-7, -7, -7, -7, -7, -7, -7, -7};
    static const int bad[] = {0, 4};
    CHECK_TRUE(cm_logits_argmax(c, 2, bad, keep) == -1);
    CHECK_TRUE(keep[0] == -7);
    sp.temperature = 0.7f;
    cm_sampler *r = cm_sampler_create(m, &sp, &err);
    ASSERT_TRUE(r);
    CHECK_TRUE(!cm_sampler_is_greedy(r));
    cm_sampler_free(r);
    cm_sampler_free(a);
    cm_sampler_free(t);
    cm_ctx_free(c);
    cm_model_free(m);
}

int main(void) {
    snprintf(tmp_path, sizeof tmp_path, "%s/cm_test_model_%d.gguf", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (int)getpid());
    RUN(prefault_buffers_spare_the_first_step_its_faults); /* first: no earlier test's freed memory to reuse */
    RUN(valid_model_info);
    RUN(shape_errors);
    RUN(hparam_errors);
    RUN(rope_scaling_keys);
    RUN(rope_scaling_equivalences);
    RUN(type_and_bias_rules);
    RUN(block_type_models);
    RUN(vocab_only);
    RUN(kv_exhaustion_changes_nothing);
    RUN(batch_validation);
    RUN(bad_model_corpus);
    RUN(qwen3_models);
    RUN(decode_bytes);
    RUN(nested_forward_in_yield_hook);
    RUN(packed_output_head_same_logits);
    RUN(long_prefill_same_on_threads);
    RUN(packed_layers_same_logits);
    RUN(logits_argmax_is_the_greedy_sample);
    unlink(tmp_path);
    return test_summary();
}
