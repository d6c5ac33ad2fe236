/*
 * convert.c - Hugging Face model directory -> GGUF, the way llama.cpp's convert_hf_to_gguf.py does it for
 * Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM and LlamaForCausalLM, so that our GGUFs and
 * llama.cpp's are interchangeable.
 *
 * Steps: read and validate config.json; open model.safetensors, or every shard named by
 * model.safetensors.index.json; check that every expected tensor exists with the expected shape and that
 * no unexpected tensor is present (dropping a weight silently would give a wrong model); map names; for
 * llama, permute the q/k rows so that the engine's adjacent-pair rope matches HF's rotate-half; write
 * norms and biases as F32 and matrices in the requested type; add the tokenizer (convert_tokenizer.c).
 *
 * Decisions:
 * - Weights are not copied: the writer reads them from the mmapped shards while writing (only llama's
 *   permuted q/k matrices are materialised).
 * - out_type NULL keeps each matrix's source type. Q8_0 needs rows that are multiples of 32; a matrix
 *   whose row is not falls back to F16 (llama.cpp does the same).
 * - tie_word_embeddings: lm_head.weight is not written (the loader then uses token_embd). Untied with no
 *   lm_head.weight is an error.
 * - rope_scaling: "linear" (DeepSeek-Coder) and "yarn" (long-context Qwen2.5) are written as llama.cpp
 *   writes them (<arch>.rope.scaling.type / .factor / .original_context_length, and .yarn_beta_fast /
 *   .yarn_beta_slow when given); HF's attention_factor becomes .attn_factor rescaled to llama.cpp's meaning
 *   (rope_yarn_config); Llama 3.1's "llama3" becomes a rope_freqs.weight tensor as llama.cpp makes it;
 *   "default" or null means none; anything else ("dynamic", "longrope", ...) is refused rather than
 *   silently mis-converted.
 * - Qwen3: q_norm / k_norm per layer (attn_q_norm / attn_k_norm); key_length / value_length whenever
 *   head_dim * heads != hidden_size. Qwen3-MoE: mlp.gate -> ffn_gate_inp (always F32, as llama.cpp keeps
 *   routers), mlp.experts.<e>.{gate,up,down}_proj stacked into ffn_{gate,up,down}_exps (the writer takes
 *   the per-expert views as parts: no copy); expert_count, expert_used_count, expert_feed_forward_length.
 *   llama.cpp's qwen3moe always renormalises the top-k weights, so norm_topk_prob false is refused, as are
 *   dense layers among the sparse ones (decoder_sparse_step != 1, mlp_only_layers).
 * - A directory with tokenizer.json but no config.json gives a vocab-only GGUF. llama.cpp's vocab-only
 *   files carry the model's real architecture because its converter always has a config.json; we have
 *   none, so general.architecture is "none" (the loader accepts any architecture with vocab_only and
 *   refuses "none" for a full load with a clear message) and no hyper-parameters are written.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert.h"
#include "moe.h"
#include "gguf.h"
#include "safetensors.h"
#include "util.h"

#define CV_MAX_CONFIG (1u << 20)   /* config.json */
#define CV_MAX_INDEX (64u << 20)   /* model.safetensors.index.json */
#define CV_MAX_SHARDS 4096
#define CV_PI 3.14159265358979323846

typedef struct hf_config {
    const char *arch;    /* "qwen2", "qwen3", "qwen3moe" or "llama" (static) */
    int n_embd, n_layer, n_ff, n_head, n_head_kv, head_dim, n_ctx, n_vocab;
    int head_dim_explicit;
    float eps, theta;
    int tied;
    const char *rope_scaling; /* NULL, "linear" or "yarn" */
    float rope_factor;
    int rope_orig_ctx;        /* yarn: original_max_position_embeddings (0: absent) */
    float rope_attn_factor;   /* yarn: GGUF attn_factor from HF attention_factor (0: absent) */
    float rope_beta_fast, rope_beta_slow; /* yarn: beta_fast / beta_slow (0: absent) */
    double l3_factor, l3_low, l3_high, l3_orig; /* llama3: factor, low/high_freq_factor, original length */
    int qk_norm;                         /* qwen3, qwen3moe: q_norm / k_norm per layer */
    int n_expert, n_expert_used, n_ff_exp; /* qwen3moe (0: dense) */
} hf_config;

typedef struct cv_state {
    const char *dir;
    hf_config c;
    st_file *shards;
    char **shard_names;
    int n_shards;
    json_t *weight_map; /* index.json "weight_map" (NULL: single file) */
    json_t *index_root;
    void **owned;       /* permuted copies, freed after writing */
    int n_owned;
    int file_type;      /* general.file_type of the first matrix written */
} cv_state;

/* ------------------------------------------------------------ files and JSON */

static int path_join(char *out, size_t cap, const char *dir, const char *name, cm_err *err) {
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) return cm_err_set(err, CM_E_INVAL, "convert: path too long: %s/%s", dir, name);
    return CM_OK;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int load_json(const char *path, size_t max_bytes, json_t **out, cm_err *err) {
    struct stat st;
    if (stat(path, &st) != 0) return cm_err_set(err, CM_E_IO, "convert: cannot open %s: %s", path, strerror(errno));
    if ((uint64_t)st.st_size > max_bytes)
        return cm_err_set(err, CM_E_FORMAT, "convert: %s is %lld bytes (limit %zu)", path, (long long)st.st_size,
                          max_bytes);
    json_error_t je;
    *out = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!*out)
        return cm_err_set(err, CM_E_FORMAT, "convert: %s: line %d: %s", path, je.line, je.text);
    if (!json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        return cm_err_set(err, CM_E_FORMAT, "convert: %s: not a JSON object", path);
    }
    return CM_OK;
}

/* ------------------------------------------------------------ config.json */

/* Integer field in [lo, hi]; absent -> def (def < lo: required). */
static int cfg_int(const json_t *cfg, const char *key, int def, int lo, int hi, int *out, cm_err *err) {
    const json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) {
        if (def < lo) return cm_err_set(err, CM_E_FORMAT, "convert: config.json: missing \"%s\"", key);
        *out = def;
        return CM_OK;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return cm_err_set(err, CM_E_FORMAT, "convert: config.json: \"%s\" must be an integer in [%d, %d]", key, lo, hi);
    *out = (int)json_integer_value(v);
    return CM_OK;
}

static int cfg_float(const json_t *cfg, const char *key, double def, double lo, double hi, float *out, cm_err *err) {
    const json_t *v = json_object_get(cfg, key);
    double x = def;
    if (v && !json_is_null(v)) {
        if (!json_is_number(v))
            return cm_err_set(err, CM_E_FORMAT, "convert: config.json: \"%s\" must be a number", key);
        x = json_number_value(v);
    }
    if (!(x > lo && x <= hi))
        return cm_err_set(err, CM_E_FORMAT, "convert: config.json: \"%s\" = %g not in (%g, %g]", key, x, lo, hi);
    *out = (float)x;
    return CM_OK;
}

/* YaRN's optional fields. HF's attention_factor REPLACES the cos/sin multiplier 0.1 ln(factor) + 1, while
 * llama.cpp's <arch>.rope.scaling.attn_factor multiplies it: we write attention_factor / (0.1 ln f + 1) so
 * that the GGUF computes what transformers does. DeepSeek's mscale / mscale_all_dim and truncate=false
 * change the formula itself: refused. */
static int rope_yarn_config(const json_t *rs, hf_config *c, cm_err *err) {
    int rc;
    c->rope_orig_ctx = 0;
    c->rope_attn_factor = c->rope_beta_fast = c->rope_beta_slow = 0;
    static const char *const odd[] = {"mscale", "mscale_all_dim"};
    for (int i = 0; i < 2; i++) {
        const json_t *v = json_object_get(rs, odd[i]);
        if (v && !json_is_null(v))
            return cm_err_set(err, CM_E_UNSUPPORTED, "convert: config.json: rope_scaling \"%s\" is not supported", odd[i]);
    }
    if (json_is_false(json_object_get(rs, "truncate")))
        return cm_err_set(err, CM_E_UNSUPPORTED, "convert: config.json: rope_scaling \"truncate\": false is not supported");
    const json_t *o = json_object_get(rs, "original_max_position_embeddings");
    if (o && !json_is_null(o) && (rc = cfg_int(rs, "original_max_position_embeddings", 0, 1, 1 << 24, &c->rope_orig_ctx, err)))
        return rc;
    const json_t *a = json_object_get(rs, "attention_factor");
    if (a && !json_is_null(a)) {
        float af = 0;
        if ((rc = cfg_float(rs, "attention_factor", 0, 0, 1e3, &af, err))) return rc;
        c->rope_attn_factor = (float)(af / (0.1 * log(c->rope_factor) + 1.0));
    }
    /* HF reads these with `or`: 0 or null mean the default (32, 1) */
    const json_t *bf = json_object_get(rs, "beta_fast"), *bs = json_object_get(rs, "beta_slow");
    if (bf && !json_is_null(bf) && (rc = cfg_float(rs, "beta_fast", 0, 0, 1e4, &c->rope_beta_fast, err))) return rc;
    if (bs && !json_is_null(bs) && (rc = cfg_float(rs, "beta_slow", 0, 0, 1e4, &c->rope_beta_slow, err))) return rc;
    float fast = c->rope_beta_fast > 0 ? c->rope_beta_fast : 32, slow = c->rope_beta_slow > 0 ? c->rope_beta_slow : 1;
    if (!(fast > slow))
        return cm_err_set(err, CM_E_FORMAT, "convert: config.json: rope_scaling beta_fast %g must exceed beta_slow %g",
                          (double)fast, (double)slow);
    return CM_OK;
}

/* Llama 3.1's rope_type "llama3": llama.cpp turns it into a rope_freqs.weight tensor (no scaling keys). */
static int rope_llama3_config(const json_t *rs, hf_config *c, cm_err *err) {
    static const char *const k[] = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    double *v[] = {&c->l3_factor, &c->l3_low, &c->l3_high, &c->l3_orig};
    for (int i = 0; i < 4; i++) {
        const json_t *x = json_object_get(rs, k[i]);
        int hi = i == 3 ? 1 << 24 : 1024;
        if (!json_is_number(x) || !(json_number_value(x) > 0 && json_number_value(x) <= hi))
            return cm_err_set(err, CM_E_FORMAT, "convert: config.json: rope_scaling \"llama3\" needs \"%s\" in (0, %d]",
                              k[i], hi);
        *v[i] = json_number_value(x);
    }
    if (!(c->l3_factor >= 1 && c->l3_high > c->l3_low))
        return cm_err_set(err, CM_E_FORMAT,
                          "convert: config.json: rope_scaling \"llama3\": factor %g must be >= 1 and high_freq_factor %g "
                          "above low_freq_factor %g", c->l3_factor, c->l3_high, c->l3_low);
    return CM_OK;
}

/* rope_freqs (E/2) as llama.cpp's converter computes them: per pair, with wavelength 2 pi / inv_freq,
 * 1 below original / high_freq_factor, factor above original / low_freq_factor, and 1 / ((1 - s) / factor
 * + s) between, s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor). */
static void llama3_rope_freqs(const hf_config *c, float *out) {
    for (int i0 = 0; i0 < c->head_dim; i0 += 2) {
        double wavelen = 2 * CV_PI / (1.0 / pow((double)c->theta, (double)i0 / c->head_dim)), f;
        if (wavelen < c->l3_orig / c->l3_high) f = 1.0;
        else if (wavelen > c->l3_orig / c->l3_low) f = c->l3_factor;
        else {
            double sm = (c->l3_orig / wavelen - c->l3_low) / (c->l3_high - c->l3_low);
            f = 1.0 / ((1 - sm) / c->l3_factor + sm);
        }
        out[i0 / 2] = (float)f;
    }
}

/* Qwen3-MoE's expert fields: every layer sparse, softmax top-k renormalised (what llama.cpp's qwen3moe
 * computes); anything else would convert into a different model, so it is refused. */
static int moe_config(const json_t *cfg, hf_config *c, cm_err *err) {
    int rc, step = 1;
    if ((rc = cfg_int(cfg, "num_experts", 0, 1, CM_MOE_MAX_EXPERTS, &c->n_expert, err)) ||
        (rc = cfg_int(cfg, "num_experts_per_tok", 0, 1, c->n_expert, &c->n_expert_used, err)) ||
        (rc = cfg_int(cfg, "moe_intermediate_size", 0, 1, 1 << 20, &c->n_ff_exp, err)) ||
        (rc = cfg_int(cfg, "decoder_sparse_step", 1, 1, 1 << 16, &step, err)))
        return rc;
    if (!json_is_true(json_object_get(cfg, "norm_topk_prob")))
        return cm_err_set(err, CM_E_UNSUPPORTED, "convert: config.json: norm_topk_prob must be true (llama.cpp's "
                          "qwen3moe renormalises the top-k expert weights)");
    const json_t *dense = json_object_get(cfg, "mlp_only_layers");
    if (step != 1 || (dense && !(json_is_array(dense) && json_array_size(dense) == 0)))
        return cm_err_set(err, CM_E_UNSUPPORTED, "convert: config.json: dense layers among the sparse ones "
                          "(decoder_sparse_step %d, mlp_only_layers) are not supported", step);
    return CM_OK;
}

static int load_config(cv_state *s, const char *path, cm_err *err) {
    json_t *cfg;
    int rc = load_json(path, CV_MAX_CONFIG, &cfg, err);
    if (rc) return rc;
    hf_config *c = &s->c;
    const char *a = json_string_value(json_array_get(json_object_get(cfg, "architectures"), 0));
    const char *mt = json_string_value(json_object_get(cfg, "model_type"));
    if (a ? !strcmp(a, "Qwen2ForCausalLM") : (mt && !strcmp(mt, "qwen2"))) c->arch = "qwen2";
    else if (a ? !strcmp(a, "Qwen3ForCausalLM") : (mt && !strcmp(mt, "qwen3"))) c->arch = "qwen3";
    else if (a ? !strcmp(a, "Qwen3MoeForCausalLM") : (mt && !strcmp(mt, "qwen3_moe"))) c->arch = "qwen3moe";
    else if (a ? !strcmp(a, "LlamaForCausalLM") : (mt && !strcmp(mt, "llama"))) c->arch = "llama";
    else {
        rc = cm_err_set(err, CM_E_UNSUPPORTED,
                        "convert: architecture \"%.64s\" is not supported (Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "Qwen3MoeForCausalLM, LlamaForCausalLM)",
                        a ? a : mt ? mt : "(none)");
        goto out;
    }
    c->qk_norm = !strcmp(c->arch, "qwen3") || !strcmp(c->arch, "qwen3moe");
    if (!strcmp(c->arch, "qwen3moe") && (rc = moe_config(cfg, c, err))) goto out;
    if ((rc = cfg_int(cfg, "hidden_size", 0, 1, 1 << 16, &c->n_embd, err)) ||
        (rc = cfg_int(cfg, "num_hidden_layers", 0, 1, 4096, &c->n_layer, err)) ||
        (rc = cfg_int(cfg, "intermediate_size", 0, 1, 1 << 20, &c->n_ff, err)) ||
        (rc = cfg_int(cfg, "num_attention_heads", 0, 1, 4096, &c->n_head, err)) ||
        (rc = cfg_int(cfg, "num_key_value_heads", c->n_head, 1, c->n_head, &c->n_head_kv, err)) ||
        (rc = cfg_int(cfg, "max_position_embeddings", 4096, 1, 1 << 24, &c->n_ctx, err)) ||
        (rc = cfg_int(cfg, "vocab_size", 0, 1, 1 << 24, &c->n_vocab, err)))
        goto out;
    c->head_dim_explicit = json_is_integer(json_object_get(cfg, "head_dim"));
    if (!c->head_dim_explicit && c->n_embd % c->n_head) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: hidden_size %d not divisible by num_attention_heads %d",
                        c->n_embd, c->n_head);
        goto out;
    }
    if ((rc = cfg_int(cfg, "head_dim", c->n_embd / c->n_head, 2, 4096, &c->head_dim, err))) goto out;
    if (c->head_dim % 2) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: head_dim %d is odd (rope needs pairs)", c->head_dim);
        goto out;
    }
    if (c->n_head % c->n_head_kv) {
        rc = cm_err_set(err, CM_E_FORMAT,
                        "convert: config.json: num_attention_heads %d not a multiple of num_key_value_heads %d",
                        c->n_head, c->n_head_kv);
        goto out;
    }
    if ((rc = cfg_float(cfg, "rms_norm_eps", 1e-6, 0, 1, &c->eps, err)) ||
        (rc = cfg_float(cfg, "rope_theta", !strcmp(c->arch, "qwen2") ? 1e6 : 1e4, 0, 1e12, &c->theta, err)))
        goto out;
    const json_t *rs = json_object_get(cfg, "rope_scaling");
    if (rs && !json_is_null(rs)) {
        /* transformers spells the kind "rope_type" (new) or "type" (old) */
        const char *rt = json_string_value(json_object_get(rs, "rope_type"));
        if (!rt) rt = json_string_value(json_object_get(rs, "type"));
        if (rt && (!strcmp(rt, "linear") || !strcmp(rt, "yarn"))) {
            c->rope_scaling = !strcmp(rt, "linear") ? "linear" : "yarn";
            /* the loader's range: a factor below 1 would compress positions, which no model we know does */
            if ((rc = cfg_float(rs, "factor", 0, 0, 1024, &c->rope_factor, err))) goto out;
            if (!(c->rope_factor >= 1.0f)) {
                rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: rope_scaling \"factor\" = %g not in [1, 1024]",
                                (double)c->rope_factor);
                goto out;
            }
            if (!strcmp(rt, "yarn") && (rc = rope_yarn_config(rs, c, err))) goto out;
        } else if (rt && !strcmp(rt, "llama3")) {
            c->rope_scaling = "llama3";
            if ((rc = rope_llama3_config(rs, c, err))) goto out;
        } else if (!rt || strcmp(rt, "default")) {
            rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: config.json: rope_scaling \"%.32s\" is not supported",
                            rt ? rt : "?");
            goto out;
        }
    }
    const json_t *tie = json_object_get(cfg, "tie_word_embeddings");
    if (tie && !json_is_boolean(tie)) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: tie_word_embeddings must be a boolean");
        goto out;
    }
    /* transformers' default is true for Qwen2 and false for Llama */
    c->tied = tie ? json_is_true(tie) : !strcmp(c->arch, "qwen2");
out:
    json_decref(cfg);
    return rc;
}

/* ------------------------------------------------------------ shards */

static int shard_name_ok(const char *n) {
    return *n && !strchr(n, '/') && !strchr(n, '\\') && strcmp(n, ".") && strcmp(n, "..") &&
           strlen(n) < 256;
}

static int add_shard(cv_state *s, const char *name, cm_err *err) {
    for (int i = 0; i < s->n_shards; i++)
        if (!strcmp(s->shard_names[i], name)) return CM_OK;
    if (!shard_name_ok(name))
        return cm_err_set(err, CM_E_FORMAT, "convert: shard name \"%.100s\" is not a plain file name", name);
    if (s->n_shards >= CV_MAX_SHARDS)
        return cm_err_set(err, CM_E_FORMAT, "convert: more than %d shards", CV_MAX_SHARDS);
    if (s->n_shards % 16 == 0) {
        st_file *f = realloc(s->shards, (size_t)(s->n_shards + 16) * sizeof *f);
        if (f) s->shards = f;
        char **n = realloc(s->shard_names, (size_t)(s->n_shards + 16) * sizeof *n);
        if (n) s->shard_names = n;
        if (!f || !n) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    }
    char path[PATH_MAX];
    int rc = path_join(path, sizeof path, s->dir, name, err);
    if (rc) return rc;
    if (!(s->shard_names[s->n_shards] = strdup(name))) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    if ((rc = st_open(&s->shards[s->n_shards], path, err))) {
        free(s->shard_names[s->n_shards]);
        return rc;
    }
    s->n_shards++;
    return CM_OK;
}

static int open_weights(cv_state *s, cm_err *err) {
    char path[PATH_MAX];
    int rc = path_join(path, sizeof path, s->dir, "model.safetensors.index.json", err);
    if (rc) return rc;
    if (file_exists(path)) {
        if ((rc = load_json(path, CV_MAX_INDEX, &s->index_root, err))) return rc;
        s->weight_map = json_object_get(s->index_root, "weight_map");
        if (!json_is_object(s->weight_map) || json_object_size(s->weight_map) == 0)
            return cm_err_set(err, CM_E_FORMAT, "convert: %s: no \"weight_map\" object", path);
        const char *k;
        json_t *v;
        json_object_foreach(s->weight_map, k, v) {
            if (!json_is_string(v))
                return cm_err_set(err, CM_E_FORMAT, "convert: %s: weight_map[\"%.100s\"] is not a string", path, k);
            if ((rc = add_shard(s, json_string_value(v), err))) return rc;
        }
        return CM_OK;
    }
    if ((rc = path_join(path, sizeof path, s->dir, "model.safetensors", err))) return rc;
    if (!file_exists(path)) {
        char bin[PATH_MAX];
        int has_bin = path_join(bin, sizeof bin, s->dir, "pytorch_model.bin", NULL) == CM_OK && file_exists(bin);
        return cm_err_set(err, CM_E_IO, "convert: %s has neither model.safetensors nor model.safetensors.index.json%s",
                          s->dir, has_bin ? " (pytorch_model.bin is not supported: re-save with safetensors)" : "");
    }
    return add_shard(s, "model.safetensors", err);
}

/* The tensor called name, or NULL. With an index, it must be in the shard the index names. */
static const st_tensor *find_st(const cv_state *s, const char *name, cm_err *err, int *rc) {
    *rc = CM_OK;
    if (!s->weight_map) return st_find(&s->shards[0], name);
    const char *file = json_string_value(json_object_get(s->weight_map, name));
    if (!file) return NULL;
    for (int i = 0; i < s->n_shards; i++) {
        if (strcmp(s->shard_names[i], file)) continue;
        const st_tensor *t = st_find(&s->shards[i], name);
        if (!t) *rc = cm_err_set(err, CM_E_FORMAT, "convert: index puts '%s' in %s, which does not hold it", name, file);
        return t;
    }
    return NULL;
}

/* ------------------------------------------------------------ tensor mapping */

/* vectors (norms, biases) and routers are always written as F32; an expert matrix is one part of its
 * stacked GGUF tensor (expert index `expert` of n_expert, written when the last part is seen) */
enum { KIND_MATRIX, KIND_VECTOR, KIND_ROUTER, KIND_EXPERT };
enum { PERM_NONE, PERM_Q, PERM_K };

typedef struct expect {
    char hf[128], gguf[64];
    int kind, perm, optional, expert;
    int64_t rows, cols; /* HF shape (rows, cols); vectors: (rows) with cols = 0 */
} expect;

static int st_to_gguf_type(int dt) {
    return dt == ST_F32 ? GGUF_TT_F32 : dt == ST_F16 ? GGUF_TT_F16 : dt == ST_BF16 ? GGUF_TT_BF16 : -1;
}

static int file_type_of(int tt) {
    /* llama_ftype: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32 */
    return tt == GGUF_TT_F16 ? 1 : tt == GGUF_TT_Q8_0 ? 7 : tt == GGUF_TT_BF16 ? 32 : 0;
}

/* llama.cpp's permute: rows of each head reordered from HF's (2, E/2) halves to interleaved pairs:
 * out row h*E + 2*i + j = in row h*E + j*E/2 + i. w: (n_h*E, cols) of esize-byte elements. */
static void permute_rows(const uint8_t *in, uint8_t *out, int n_h, int64_t E, int64_t cols, size_t esize) {
    size_t row = (size_t)cols * esize;
    for (int h = 0; h < n_h; h++)
        for (int64_t i = 0; i < E / 2; i++)
            for (int j = 0; j < 2; j++)
                memcpy(out + (size_t)(h * E + 2 * i + j) * row, in + (size_t)(h * E + j * (E / 2) + i) * row, row);
}

static int build_expect(const hf_config *c, expect **out, int *n_out, cm_err *err) {
    int per_layer = 12, n = 0;
    expect *e = calloc((size_t)c->n_layer * (size_t)(per_layer + 3 + 3 * c->n_expert) + 3, sizeof *e);
    if (!e) return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    const int64_t D = c->n_embd, QE = (int64_t)c->n_head * c->head_dim, KE = (int64_t)c->n_head_kv * c->head_dim;
    const int qwen2 = !strcmp(c->arch, "qwen2");
#define ADD(hf_, gg_, kind_, perm_, opt_, r_, c_) do { expect *x_ = &e[n++]; \
        snprintf(x_->hf, sizeof x_->hf, "%s", hf_); snprintf(x_->gguf, sizeof x_->gguf, "%s", gg_); \
        x_->kind = kind_; x_->perm = perm_; x_->optional = opt_; x_->rows = r_; x_->cols = c_; x_->expert = -1; } while (0)
    ADD("model.embed_tokens.weight", "token_embd.weight", KIND_MATRIX, PERM_NONE, 0, c->n_vocab, D);
    char hf[128], gg[64];
    static const struct { const char *hf, *gg; int kind, perm, bias; } lt[] = {
        {"input_layernorm.weight", "attn_norm.weight", KIND_VECTOR, PERM_NONE, 0},
        {"self_attn.q_proj.weight", "attn_q.weight", KIND_MATRIX, PERM_Q, 0},
        {"self_attn.k_proj.weight", "attn_k.weight", KIND_MATRIX, PERM_K, 0},
        {"self_attn.v_proj.weight", "attn_v.weight", KIND_MATRIX, PERM_NONE, 0},
        {"self_attn.q_proj.bias", "attn_q.bias", KIND_VECTOR, PERM_Q, 1},
        {"self_attn.k_proj.bias", "attn_k.bias", KIND_VECTOR, PERM_K, 1},
        {"self_attn.v_proj.bias", "attn_v.bias", KIND_VECTOR, PERM_NONE, 1},
        {"self_attn.o_proj.weight", "attn_output.weight", KIND_MATRIX, PERM_NONE, 0},
        {"post_attention_layernorm.weight", "ffn_norm.weight", KIND_VECTOR, PERM_NONE, 0},
        {"mlp.gate_proj.weight", "ffn_gate.weight", KIND_MATRIX, PERM_NONE, 0},
        {"mlp.up_proj.weight", "ffn_up.weight", KIND_MATRIX, PERM_NONE, 0},
        {"mlp.down_proj.weight", "ffn_down.weight", KIND_MATRIX, PERM_NONE, 0},
    };
    for (int l = 0; l < c->n_layer; l++) {
        for (int k = 0; k < per_layer; k++) {
            if (c->n_expert && !strncmp(lt[k].hf, "mlp.", 4)) continue; /* the experts replace the dense FFN */
            int64_t rows, cols;
            const char *g = lt[k].gg;
            if (!strncmp(g, "attn_q", 6)) rows = QE, cols = D;
            else if (!strncmp(g, "attn_k", 6) || !strncmp(g, "attn_v", 6)) rows = KE, cols = D;
            else if (!strcmp(g, "attn_output.weight")) rows = D, cols = QE;
            else if (!strcmp(g, "ffn_down.weight")) rows = D, cols = c->n_ff;
            else if (!strncmp(g, "ffn_gate", 8) || !strncmp(g, "ffn_up", 6)) rows = c->n_ff, cols = D;
            else rows = D, cols = 0; /* norms */
            if (lt[k].kind == KIND_VECTOR) cols = 0;
            snprintf(hf, sizeof hf, "model.layers.%d.%s", l, lt[k].hf);
            snprintf(gg, sizeof gg, "blk.%d.%s", l, g);
            /* biases: required for qwen2, optional (attention_bias) for llama */
            ADD(hf, gg, lt[k].kind, qwen2 ? PERM_NONE : lt[k].perm, lt[k].bias && !qwen2, rows, cols);
        }
        if (c->qk_norm) { /* qwen3: one RMS norm weight per head dimension, for q and for k */
            snprintf(hf, sizeof hf, "model.layers.%d.self_attn.q_norm.weight", l);
            snprintf(gg, sizeof gg, "blk.%d.attn_q_norm.weight", l);
            ADD(hf, gg, KIND_VECTOR, PERM_NONE, 0, c->head_dim, 0);
            snprintf(hf, sizeof hf, "model.layers.%d.self_attn.k_norm.weight", l);
            snprintf(gg, sizeof gg, "blk.%d.attn_k_norm.weight", l);
            ADD(hf, gg, KIND_VECTOR, PERM_NONE, 0, c->head_dim, 0);
        }
        if (c->n_expert) {
            snprintf(hf, sizeof hf, "model.layers.%d.mlp.gate.weight", l);
            snprintf(gg, sizeof gg, "blk.%d.ffn_gate_inp.weight", l);
            ADD(hf, gg, KIND_ROUTER, PERM_NONE, 0, c->n_expert, D);
            static const char *const proj[3] = {"gate", "up", "down"};
            for (int p = 0; p < 3; p++)
                for (int x = 0; x < c->n_expert; x++) {
                    snprintf(hf, sizeof hf, "model.layers.%d.mlp.experts.%d.%s_proj.weight", l, x, proj[p]);
                    snprintf(gg, sizeof gg, "blk.%d.ffn_%s_exps.weight", l, proj[p]);
                    ADD(hf, gg, KIND_EXPERT, PERM_NONE, 0, p == 2 ? D : c->n_ff_exp, p == 2 ? c->n_ff_exp : D);
                    e[n - 1].expert = x;
                }
        }
    }
    ADD("model.norm.weight", "output_norm.weight", KIND_VECTOR, PERM_NONE, 0, D, 0);
    ADD("lm_head.weight", "output.weight", KIND_MATRIX, PERM_NONE, c->tied, c->n_vocab, D);
#undef ADD
    *out = e;
    *n_out = n;
    return CM_OK;
}

static int is_ignored(const char *name) {
    size_t n = strlen(name);
    static const char suffix[] = "rotary_emb.inv_freq";
    return n >= sizeof suffix - 1 && !strcmp(name + n - (sizeof suffix - 1), suffix);
}

static int parse_out_type(const char *s, int *out) {
    if (!s) { *out = -1; return 1; }
    if (!strcmp(s, "f32")) *out = GGUF_TT_F32;
    else if (!strcmp(s, "f16")) *out = GGUF_TT_F16;
    else if (!strcmp(s, "bf16")) *out = GGUF_TT_BF16;
    else if (!strcmp(s, "q8_0")) *out = GGUF_TT_Q8_0;
    else return 0;
    return 1;
}

static int add_tensors(cv_state *s, gguf_writer *w, int out_type, cm_err *err) {
    expect *ex = NULL;
    int n_ex = 0, rc = build_expect(&s->c, &ex, &n_ex, err);
    if (rc) return rc;
    /* one stacked expert tensor's parts (views into the shards), gathered until its last expert */
    const void **parts = s->c.n_expert ? calloc((size_t)s->c.n_expert, sizeof *parts) : NULL;
    int parts_src = -1;
    if (s->c.n_expert && !parts) {
        free(ex);
        return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
    }
    /* every tensor present must be expected (or ignorable), so that nothing is dropped silently */
    for (int i = 0; i < s->n_shards && !rc; i++) {
        for (uint64_t j = 0; j < s->shards[i].n_tensors && !rc; j++) {
            const char *nm = s->shards[i].tensors[j].name;
            int known = is_ignored(nm);
            for (int k = 0; k < n_ex && !known; k++) known = !strcmp(ex[k].hf, nm);
            if (!known)
                rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: %s: unexpected tensor '%s' (not part of a %s model we can convert)",
                                s->shard_names[i], nm, s->c.arch);
        }
    }
    if (!rc && s->weight_map) {
        const char *k;
        json_t *v;
        json_object_foreach(s->weight_map, k, v) {
            const st_tensor *t = find_st(s, k, err, &rc);
            if (rc) break;
            (void)t;
        }
    }
    s->file_type = -1;
    for (int k = 0; k < n_ex && !rc; k++) {
        const expect *e = &ex[k];
        const st_tensor *t = find_st(s, e->hf, err, &rc);
        if (rc) break;
        if (!t) {
            if (e->optional) continue;
            rc = cm_err_set(err, CM_E_FORMAT, "convert: missing tensor '%s'%s", e->hf,
                            !strcmp(e->hf, "lm_head.weight") ? " (and tie_word_embeddings is false)" : "");
            break;
        }
        if (!strcmp(e->hf, "lm_head.weight") && s->c.tied) continue; /* tied: the loader reuses token_embd */
        int src = st_to_gguf_type(t->dtype);
        if (src < 0) {
            rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: tensor '%s': dtype %s is not supported (F32, F16, BF16)",
                            e->hf, t->dtype_name);
            break;
        }
        int shape_ok = e->cols ? (t->n_dims == 2 && t->shape[0] == e->rows && t->shape[1] == e->cols)
                               : (t->n_dims == 1 && t->shape[0] == e->rows);
        if (!shape_ok) {
            char got[96] = "";
            size_t off = 0;
            for (int d = 0; d < t->n_dims && off < sizeof got - 24; d++)
                off += (size_t)snprintf(got + off, sizeof got - off, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
            if (e->cols)
                rc = cm_err_set(err, CM_E_FORMAT, "convert: tensor '%s': shape [%s], expected [%lld, %lld]", e->hf, got,
                                (long long)e->rows, (long long)e->cols);
            else
                rc = cm_err_set(err, CM_E_FORMAT, "convert: tensor '%s': shape [%s], expected [%lld]", e->hf, got,
                                (long long)e->rows);
            break;
        }
        int dst = GGUF_TT_F32;
        if (e->kind == KIND_MATRIX || e->kind == KIND_EXPERT) {
            dst = out_type >= 0 ? out_type : src;
            if (dst == GGUF_TT_Q8_0 && e->cols % 32) dst = GGUF_TT_F16;
            if (s->file_type < 0) s->file_type = file_type_of(dst);
        }
        if (e->kind == KIND_EXPERT) {
            if (e->expert == 0) parts_src = src;
            if (src != parts_src) {
                rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: tensor '%s': dtype %s differs from expert 0's", e->hf,
                                t->dtype_name);
                break;
            }
            parts[e->expert] = t->data;
            if (e->expert + 1 < s->c.n_expert) continue;
            /* all experts seen: (n_expert, rows, cols) */
            int64_t ne3[3] = {e->cols, e->rows, s->c.n_expert};
            rc = gguf_writer_add_tensor_parts(w, e->gguf, dst, 3, ne3, src, parts, s->c.n_expert, err);
            continue;
        }
        const void *data = t->data;
        if (e->perm != PERM_NONE && !strcmp(s->c.arch, "llama")) {
            void *p = malloc(t->nbytes ? (size_t)t->nbytes : 1);
            void **o = realloc(s->owned, (size_t)(s->n_owned + 1) * sizeof *o);
            if (o) s->owned = o;
            if (!p || !o) {
                free(p);
                rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
                break;
            }
            s->owned[s->n_owned++] = p;
            int n_h = e->perm == PERM_Q ? s->c.n_head : s->c.n_head_kv;
            permute_rows(t->data, p, n_h, s->c.head_dim, e->cols ? e->cols : 1, src == GGUF_TT_F32 ? 4 : 2);
            data = p;
        }
        /* GGUF dims are innermost first: ne[0] = HF's last dimension */
        int64_t ne[2] = {e->cols ? e->cols : e->rows, e->rows};
        rc = gguf_writer_add_tensor_ref(w, e->gguf, dst, e->cols ? 2 : 1, ne, src, data, err);
    }
    free(ex);
    free(parts);
    if (s->file_type < 0) s->file_type = 0;
    if (!rc && s->c.rope_scaling && !strcmp(s->c.rope_scaling, "llama3")) {
        float *ff = malloc((size_t)s->c.head_dim / 2 * sizeof *ff);
        void **o = realloc(s->owned, (size_t)(s->n_owned + 1) * sizeof *o);
        if (o) s->owned = o;
        if (!ff || !o) {
            free(ff);
            return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        }
        s->owned[s->n_owned++] = ff;
        llama3_rope_freqs(&s->c, ff);
        int64_t ne[1] = {s->c.head_dim / 2};
        rc = gguf_writer_add_tensor_ref(w, "rope_freqs.weight", GGUF_TT_F32, 1, ne, GGUF_TT_F32, ff, err);
    }
    return rc;
}

/* ------------------------------------------------------------ metadata */

static int set_hparams(gguf_writer *w, const hf_config *c, int file_type) {
    char k[96];
    int bad = 0;
#define KEY(suffix) (snprintf(k, sizeof k, "%s.%s", c->arch, suffix), k)
    bad |= gguf_writer_set_u32(w, "general.file_type", (uint32_t)file_type);
    bad |= gguf_writer_set_u32(w, KEY("context_length"), (uint32_t)c->n_ctx);
    bad |= gguf_writer_set_u32(w, KEY("embedding_length"), (uint32_t)c->n_embd);
    bad |= gguf_writer_set_u32(w, KEY("block_count"), (uint32_t)c->n_layer);
    bad |= gguf_writer_set_u32(w, KEY("feed_forward_length"), (uint32_t)c->n_ff);
    bad |= gguf_writer_set_u32(w, KEY("attention.head_count"), (uint32_t)c->n_head);
    bad |= gguf_writer_set_u32(w, KEY("attention.head_count_kv"), (uint32_t)c->n_head_kv);
    bad |= gguf_writer_set_f32(w, KEY("attention.layer_norm_rms_epsilon"), c->eps);
    bad |= gguf_writer_set_f32(w, KEY("rope.freq_base"), c->theta);
    bad |= gguf_writer_set_u32(w, KEY("rope.dimension_count"), (uint32_t)c->head_dim);
    if (c->head_dim * c->n_head != c->n_embd) {
        bad |= gguf_writer_set_u32(w, KEY("attention.key_length"), (uint32_t)c->head_dim);
        bad |= gguf_writer_set_u32(w, KEY("attention.value_length"), (uint32_t)c->head_dim);
    }
    if (!strcmp(c->arch, "llama")) bad |= gguf_writer_set_u32(w, KEY("vocab_size"), (uint32_t)c->n_vocab);
    if (c->n_expert) {
        bad |= gguf_writer_set_u32(w, KEY("expert_count"), (uint32_t)c->n_expert);
        bad |= gguf_writer_set_u32(w, KEY("expert_used_count"), (uint32_t)c->n_expert_used);
        bad |= gguf_writer_set_u32(w, KEY("expert_feed_forward_length"), (uint32_t)c->n_ff_exp);
    }
    if (c->rope_scaling && strcmp(c->rope_scaling, "llama3")) { /* llama3: the rope_freqs tensor only */
        bad |= gguf_writer_set_str(w, KEY("rope.scaling.type"), c->rope_scaling);
        bad |= gguf_writer_set_f32(w, KEY("rope.scaling.factor"), c->rope_factor);
        if (c->rope_orig_ctx)
            bad |= gguf_writer_set_u32(w, KEY("rope.scaling.original_context_length"), (uint32_t)c->rope_orig_ctx);
        if (c->rope_attn_factor > 0) bad |= gguf_writer_set_f32(w, KEY("rope.scaling.attn_factor"), c->rope_attn_factor);
        if (c->rope_beta_fast > 0) bad |= gguf_writer_set_f32(w, KEY("rope.scaling.yarn_beta_fast"), c->rope_beta_fast);
        if (c->rope_beta_slow > 0) bad |= gguf_writer_set_f32(w, KEY("rope.scaling.yarn_beta_slow"), c->rope_beta_slow);
    }
#undef KEY
    return bad ? CM_E_NOMEM : CM_OK;
}

/* general.name: the directory's last component. */
static void dir_basename(const char *dir, char *out, size_t cap) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t b = n;
    while (b > 0 && dir[b - 1] != '/') b--;
    size_t len = n - b < cap - 1 ? n - b : cap - 1;
    memcpy(out, dir + b, len);
    out[len] = 0;
}

/* ------------------------------------------------------------ entry point */

int cm_convert_hf(const char *hf_dir, const char *out_path, const char *out_type, cm_err *err) {
    if (!hf_dir || !out_path) return cm_err_set(err, CM_E_INVAL, "convert: missing directory or output path");
    int otype;
    if (!parse_out_type(out_type, &otype))
        return cm_err_set(err, CM_E_INVAL, "convert: unknown output type \"%s\" (f32, f16, bf16, q8_0)", out_type);
    cv_state s;
    memset(&s, 0, sizeof s);
    s.dir = hf_dir;
    char cfg_path[PATH_MAX], tok_path[PATH_MAX], tcfg_path[PATH_MAX], name[128];
    int rc;
    if ((rc = path_join(cfg_path, sizeof cfg_path, hf_dir, "config.json", err)) ||
        (rc = path_join(tok_path, sizeof tok_path, hf_dir, "tokenizer.json", err)) ||
        (rc = path_join(tcfg_path, sizeof tcfg_path, hf_dir, "tokenizer_config.json", err)))
        return rc;
    struct stat st;
    if (stat(hf_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return cm_err_set(err, CM_E_IO, "convert: %s is not a directory", hf_dir);
    int have_cfg = file_exists(cfg_path), have_tok = file_exists(tok_path);
    if (!have_tok)
        return cm_err_set(err, CM_E_IO, "convert: %s has no tokenizer.json%s", hf_dir,
                          have_cfg ? "" : " (nor config.json)");
    if (have_cfg && cm_convert_is_mole(cfg_path)) /* uw-swag/mole checkpoint: convert_mole.c */
        return cm_convert_mole_hf(hf_dir, out_path, otype, err);
    gguf_writer *w = gguf_writer_create(err);
    if (!w) return CM_E_NOMEM;
    dir_basename(hf_dir, name, sizeof name);
    if (!have_cfg) {
        if (gguf_writer_set_str(w, "general.architecture", "none") || gguf_writer_set_str(w, "general.name", name)) {
            rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
            goto done;
        }
        if ((rc = cm_convert_tokenizer_json(tok_path, file_exists(tcfg_path) ? tcfg_path : NULL, w, 0, err))) goto done;
        rc = gguf_writer_write(w, out_path, err);
        goto done;
    }
    if ((rc = load_config(&s, cfg_path, err)) || (rc = open_weights(&s, err))) goto done;
    if (gguf_writer_set_str(w, "general.architecture", s.c.arch) || gguf_writer_set_str(w, "general.name", name)) {
        rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        goto done;
    }
    if ((rc = add_tensors(&s, w, otype, err))) goto done;
    if (set_hparams(w, &s.c, out_type ? file_type_of(otype) : s.file_type)) {
        rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        goto done;
    }
    if ((rc = cm_convert_tokenizer_json(tok_path, file_exists(tcfg_path) ? tcfg_path : NULL, w, s.c.n_vocab, err)))
        goto done;
    rc = gguf_writer_write(w, out_path, err);
done:
    gguf_writer_free(w);
    for (int i = 0; i < s.n_shards; i++) {
        st_close(&s.shards[i]);
        free(s.shard_names[i]);
    }
    free(s.shards);
    free(s.shard_names);
    for (int i = 0; i < s.n_owned; i++) free(s.owned[i]);
    free(s.owned);
    json_decref(s.index_root);
    return rc;
}
