/*
 * model.c - loads a Qwen2 / Qwen3 / Llama GGUF (and the attention part of the MoE architectures, whose
 * experts model_moe.c loads): hyper-parameters, weight views into the mapping (every tensor checked for
 * exact shape and a supported type) and the tokenizer. See model.h for the layout.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels.h"
#include "kv.h"
#include "model.h"
#include "moe.h"
#include "util.h"

/* Caps against absurd (hostile) hyper-parameters: far beyond any model we could run. */
#define MAX_EMBD (1 << 16)
#define MAX_LAYER 1024
#define MAX_HEAD 1024
#define MAX_HEAD_DIM 1024
#define MAX_FF (1 << 20)
#define MAX_CTX (1 << 24)

static char *dup_str(const char *p, size_t n) {
    char *s = malloc(n + 1);
    if (!s) return NULL;
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

/* ============================================================ hyper-parameters */

/* Qwen3 and Qwen3-MoE RMS-normalise every q and k head before rope (blk.N.attn_{q,k}_norm.weight). */
static int has_qk_norm(const char *arch) { return !strcmp(arch, "qwen3") || !strcmp(arch, "qwen3moe"); }

/* <arch>.<key> as a positive int within [1, cap]; absent -> def (def < 0: required). */
static int get_dim(const gguf_file *g, const char *arch, const char *key, int def, int cap, int *out,
                   cm_err *err) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    uint32_t v;
    int rc = gguf_get_u32(g, full, &v, err);
    if (rc < 0) return rc;
    if (rc == 1) {
        if (def < 0) return cm_err_set(err, CM_E_FORMAT, "model: missing key %s", full);
        *out = def;
        return CM_OK;
    }
    if (v < 1 || v > (uint32_t)cap)
        return cm_err_set(err, CM_E_FORMAT, "model: %s = %u out of range [1, %d]", full, v, cap);
    *out = (int)v;
    return CM_OK;
}

static int get_float(const gguf_file *g, const char *arch, const char *key, float def, float *out,
                     cm_err *err) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int rc = gguf_get_f32(g, full, out, err);
    if (rc < 0) return rc;
    if (rc == 1) *out = def;
    return CM_OK;
}

/* Rope scaling as llama.cpp reads it (<arch>.rope.scaling.*). Linear divides every angle by the factor;
 * YaRN interpolates the low frequencies, keeps the high ones and scales cos/sin (forward.c rope_tables).
 * Values that no sane model has are refused rather than clamped: a wrong rope is a silently wrong model. */
#define MAX_ROPE_FACTOR 1024.0f

static int rope_key_f32(const gguf_file *g, const char *arch, const char *key, float def, float lo, float hi,
                        float *out, cm_err *err) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int rc = get_float(g, arch, key, def, out, err);
    if (rc) return rc;
    if (!(*out >= lo && *out <= hi)) /* NaN fails too */
        return cm_err_set(err, CM_E_FORMAT, "model: %s = %g out of range [%g, %g]", full, (double)*out, (double)lo,
                          (double)hi);
    return CM_OK;
}

static int load_rope_scaling(const gguf_file *g, const char *arch, cm_model_info *in, cm_err *err) {
    char key[128];
    gguf_str st;
    in->rope_scaling = CM_ROPE_SCALING_NONE;
    in->rope_factor = in->rope_attn_factor = 1.0f;
    in->rope_orig_ctx = in->n_ctx_train;
    in->rope_beta_fast = 32.0f;
    in->rope_beta_slow = 1.0f;
    /* Llama 3.1's scaling as llama.cpp converts it: a factor per pair dividing its frequency, (E/2) F32,
     * applied before linear / YaRN scaling as ggml does */
    const gguf_tensor *ft = gguf_find_tensor(g, "rope_freqs.weight");
    in->rope_freqs = ft != NULL;
    if (ft) {
        if (ft->type != GGUF_TT_F32 || ft->n_dims != 1 || ft->ne[0] != in->head_dim / 2)
            return cm_err_set(err, CM_E_FORMAT, "model: rope_freqs.weight must be F32 of shape [%d] (head_dim / 2)",
                              in->head_dim / 2);
        for (int i = 0; i < in->head_dim / 2; i++) {
            float f;
            memcpy(&f, (const char *)ft->data + 4 * (size_t)i, 4);
            if (!(f >= 1e-3f && f <= 1e4f))
                return cm_err_set(err, CM_E_FORMAT, "model: rope_freqs.weight[%d] = %g out of range [0.001, 10000]", i,
                                  (double)f);
        }
    }
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    int rc = gguf_get_str(g, key, &st, err), has_type = rc == CM_OK;
    if (rc < 0) return rc;
    if (has_type) {
        if (gguf_str_eq(st, "none")) in->rope_scaling = CM_ROPE_SCALING_NONE;
        else if (gguf_str_eq(st, "linear")) in->rope_scaling = CM_ROPE_SCALING_LINEAR;
        else if (gguf_str_eq(st, "yarn")) in->rope_scaling = CM_ROPE_SCALING_YARN;
        else
            return cm_err_set(err, CM_E_UNSUPPORTED, "model: rope scaling \"%.*s\" is not supported (none, linear, yarn)",
                              (int)(st.len > 64 ? 64 : st.len), st.ptr);
    }
    /* the factor: .rope.scaling.factor, else the legacy .rope.scale_linear; with no type key llama.cpp takes
     * either as a linear factor (its default type is linear, a factor of 1 being no scaling) */
    const char *fkey = "rope.scaling.factor";
    snprintf(key, sizeof key, "%s.%s", arch, fkey);
    if (!gguf_find(g, key)) {
        fkey = "rope.scale_linear";
        snprintf(key, sizeof key, "%s.%s", arch, fkey);
        if (!gguf_find(g, key)) fkey = NULL;
    }
    if (has_type && in->rope_scaling == CM_ROPE_SCALING_NONE) {
        return CM_OK; /* llama.cpp ignores every other scaling key when the type says none */
    } else if (fkey) {
        if ((rc = rope_key_f32(g, arch, fkey, 1.0f, 1.0f, MAX_ROPE_FACTOR, &in->rope_factor, err))) return rc;
        if (!has_type && in->rope_factor > 1.0f) in->rope_scaling = CM_ROPE_SCALING_LINEAR;
    } else if (has_type) {
        return cm_err_set(err, CM_E_FORMAT, "model: rope scaling \"%.*s\" without %s.rope.scaling.factor",
                          (int)(st.len > 64 ? 64 : st.len), st.ptr, arch);
    }
    if (in->rope_scaling == CM_ROPE_SCALING_NONE) return CM_OK;
    if ((rc = rope_key_f32(g, arch, "rope.scaling.attn_factor", 1.0f, 1e-3f, 1e3f, &in->rope_attn_factor, err)))
        return rc;
    if (in->rope_scaling == CM_ROPE_SCALING_YARN) {
        /* absent: llama.cpp takes the training context (n_ctx_orig_yarn falls back to n_ctx_train) */
        if ((rc = get_dim(g, arch, "rope.scaling.original_context_length", in->n_ctx_train, MAX_CTX, &in->rope_orig_ctx,
                          err)) ||
            (rc = rope_key_f32(g, arch, "rope.scaling.yarn_beta_fast", 32.0f, 1e-3f, 1e4f, &in->rope_beta_fast, err)) ||
            (rc = rope_key_f32(g, arch, "rope.scaling.yarn_beta_slow", 1.0f, 1e-3f, 1e4f, &in->rope_beta_slow, err)))
            return rc;
        if (!(in->rope_beta_fast > in->rope_beta_slow))
            return cm_err_set(err, CM_E_FORMAT, "model: yarn_beta_fast %g must exceed yarn_beta_slow %g",
                              (double)in->rope_beta_fast, (double)in->rope_beta_slow);
        /* keys whose meaning is DeepSeek-specific or differs between llama.cpp versions: refuse, not guess */
        static const char *const odd[] = {"rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_attn_factor",
                                          "rope.scaling.yarn_ext_factor"};
        for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
            snprintf(key, sizeof key, "%s.%s", arch, odd[i]);
            if (gguf_find(g, key)) return cm_err_set(err, CM_E_UNSUPPORTED, "model: %s is not supported", key);
        }
    }
    return CM_OK;
}

static int load_hparams(cm_model *m, const char *arch, cm_err *err) {
    const gguf_file *g = &m->gguf;
    cm_model_info *in = &m->info;
    int rc;
    if ((rc = get_dim(g, arch, "embedding_length", -1, MAX_EMBD, &in->n_embd, err)) ||
        (rc = get_dim(g, arch, "block_count", -1, MAX_LAYER, &in->n_layer, err)) ||
        (rc = get_dim(g, arch, "feed_forward_length", -1, MAX_FF, &in->n_ff, err)) ||
        (rc = get_dim(g, arch, "attention.head_count", -1, MAX_HEAD, &in->n_head, err)) ||
        (rc = get_dim(g, arch, "attention.head_count_kv", in->n_head, MAX_HEAD, &in->n_head_kv, err)) ||
        (rc = get_dim(g, arch, "context_length", 4096, MAX_CTX, &in->n_ctx_train, err)))
        return rc;
    if (in->n_head % in->n_head_kv)
        return cm_err_set(err, CM_E_FORMAT, "model: head_count %d is not a multiple of head_count_kv %d",
                          in->n_head, in->n_head_kv);
    int hd_default = in->n_embd % in->n_head == 0 ? in->n_embd / in->n_head : -1;
    if ((rc = get_dim(g, arch, "attention.key_length", hd_default, MAX_HEAD_DIM, &in->head_dim, err)))
        return rc == CM_E_FORMAT && hd_default < 0
                   ? cm_err_set(err, CM_E_FORMAT, "model: embedding_length %d is not a multiple of head_count %d",
                                in->n_embd, in->n_head)
                   : rc;
    int vlen = 0;
    if ((rc = get_dim(g, arch, "attention.value_length", in->head_dim, MAX_HEAD_DIM, &vlen, err))) return rc;
    if (vlen != in->head_dim)
        return cm_err_set(err, CM_E_UNSUPPORTED, "model: value_length %d != key_length %d", vlen, in->head_dim);
    if (in->head_dim % 2)
        return cm_err_set(err, CM_E_FORMAT, "model: head_dim %d must be even for rotary embeddings", in->head_dim);
    int rope_dim = 0;
    if ((rc = get_dim(g, arch, "rope.dimension_count", in->head_dim, MAX_HEAD_DIM, &rope_dim, err))) return rc;
    if (rope_dim != in->head_dim)
        return cm_err_set(err, CM_E_UNSUPPORTED, "model: partial rotary (rope.dimension_count %d < head_dim %d)",
                          rope_dim, in->head_dim);
    if ((uint64_t)in->n_head * in->head_dim > MAX_EMBD * 4u)
        return cm_err_set(err, CM_E_FORMAT, "model: n_head * head_dim = %llu is too large",
                          (unsigned long long)in->n_head * in->head_dim);

    /* the Qwen family (qwen2, qwen3, qwen3moe): NeoX rope, theta 1e6 unless the file says otherwise */
    int is_qwen = !strcmp(arch, "qwen2") || has_qk_norm(arch);
    if ((rc = get_float(g, arch, "attention.layer_norm_rms_epsilon", 1e-6f, &in->rms_eps, err)) ||
        (rc = get_float(g, arch, "rope.freq_base", is_qwen ? 1e6f : 10000.0f, &in->rope_theta, err)))
        return rc;
    if (!(in->rms_eps > 0.0f && in->rms_eps < 1.0f))
        return cm_err_set(err, CM_E_FORMAT, "model: rms epsilon %g out of range (0, 1)", (double)in->rms_eps);
    if (!(in->rope_theta > 1.0f && in->rope_theta < 1e12f))
        return cm_err_set(err, CM_E_FORMAT, "model: rope.freq_base %g out of range", (double)in->rope_theta);

    if ((rc = load_rope_scaling(g, arch, in, err))) return rc;
    in->rope_neox = is_qwen;
    if (cm_moe_arch(arch)) return cm_moe_hparams(g, arch, in, err);
    return CM_OK;
}

/* ============================================================ tensors */

/* Maps a tensor of exact shape (ne0) or (ne0, ne1); ne1 == 0 means a vector. Vectors (norms, biases)
 * must be F32: they are tiny and the kernels read them as f32. optional: absent leaves t->data NULL. */
static int map_tensor(cm_model *m, cm_tensor *t, const char *name, int64_t ne0, int64_t ne1, int optional,
                      cm_err *err) {
    const gguf_tensor *gt = gguf_find_tensor(&m->gguf, name);
    memset(t, 0, sizeof *t);
    if (!gt) {
        if (optional) return CM_OK;
        return cm_err_set(err, CM_E_FORMAT, "model: missing tensor %s", name);
    }
    int is_vec = ne1 == 0;
    int shape_ok = gt->ne[0] == ne0 && gt->ne[2] == 1 && gt->ne[3] == 1 &&
                   (is_vec ? gt->ne[1] == 1 && gt->n_dims <= 1 : gt->ne[1] == ne1 && gt->n_dims <= 2);
    if (!shape_ok) {
        char got[96], want[64];
        int o = snprintf(got, sizeof got, "[");
        for (int i = 0; i < gt->n_dims && i < GGUF_MAX_DIMS; i++)
            o += snprintf(got + o, sizeof got - (size_t)o, "%s%lld", i ? ", " : "", (long long)gt->ne[i]);
        snprintf(got + o, sizeof got - (size_t)o, "]");
        if (is_vec)
            snprintf(want, sizeof want, "[%lld]", (long long)ne0);
        else
            snprintf(want, sizeof want, "[%lld, %lld]", (long long)ne0, (long long)ne1);
        return cm_err_set(err, CM_E_FORMAT, "model: tensor %s has shape %s, expected %s", name, got, want);
    }
    if (is_vec ? gt->type != GGUF_TT_F32 : !cm_weight_type_ok(gt->type))
        return cm_err_set(err, CM_E_UNSUPPORTED, "model: tensor %s has type %s; supported: %s", name,
                          gguf_ttype_name(gt->type), is_vec ? "F32" : CM_WEIGHT_TYPES);
    t->data = gt->data;
    t->type = gt->type;
    t->ne0 = ne0;
    t->ne1 = is_vec ? 1 : ne1;
    return CM_OK;
}

static int load_tensors(cm_model *m, cm_err *err) {
    cm_model_info *in = &m->info;
    int64_t D = in->n_embd, V = in->n_vocab, F = in->n_ff;
    int64_t QD = (int64_t)in->n_head * in->head_dim, KD = (int64_t)in->n_head_kv * in->head_dim;
    int rc;
    if ((rc = map_tensor(m, &m->tok_embd, "token_embd.weight", D, V, 0, err)) ||
        (rc = map_tensor(m, &m->output_norm, "output_norm.weight", D, 0, 0, err)) ||
        (rc = map_tensor(m, &m->output, "output.weight", D, V, 1, err)))
        return rc;
    in->tied_output = m->output.data == NULL;
    if (in->tied_output) m->output = m->tok_embd;

    m->layers = calloc((size_t)in->n_layer, sizeof *m->layers);
    if (!m->layers) return cm_err_set(err, CM_E_NOMEM, "model: out of memory");
    int n_bias = 0;
    for (int i = 0; i < in->n_layer; i++) {
        cm_layer *l = &m->layers[i];
        char nm[96];
#define T(field, suffix, ne0, ne1, opt)                                     \
        snprintf(nm, sizeof nm, "blk.%d.%s", i, suffix);                    \
        if ((rc = map_tensor(m, &l->field, nm, ne0, ne1, opt, err))) return rc;
        T(attn_norm, "attn_norm.weight", D, 0, 0)
        T(wq, "attn_q.weight", D, QD, 0)
        T(wk, "attn_k.weight", D, KD, 0)
        T(wv, "attn_v.weight", D, KD, 0)
        T(wo, "attn_output.weight", QD, D, 0)
        T(bq, "attn_q.bias", QD, 0, 1)
        T(bk, "attn_k.bias", KD, 0, 1)
        T(bv, "attn_v.bias", KD, 0, 1)
        if (has_qk_norm(in->arch)) { /* other architectures do not have them (and do not read them) */
            T(q_norm, "attn_q_norm.weight", in->head_dim, 0, 0)
            T(k_norm, "attn_k_norm.weight", in->head_dim, 0, 0)
        }
        T(ffn_norm, "ffn_norm.weight", D, 0, 0)
        int kind = cm_moe_arch(in->arch);
        int no_ffn = kind == CM_MOE_HYBRID || kind == CM_MOE_SPARSE; /* experts replace the dense FFN */
        T(w_gate, "ffn_gate.weight", D, F, no_ffn)
        T(w_up, "ffn_up.weight", D, F, no_ffn)
        T(w_down, "ffn_down.weight", F, D, no_ffn)
#undef T
        int nb = !!l->bq.data + !!l->bk.data + !!l->bv.data;
        if (nb != 0 && nb != 3)
            return cm_err_set(err, CM_E_FORMAT, "model: blk.%d has %d of the 3 q/k/v biases", i, nb);
        n_bias += nb ? 1 : 0;
    }
    /* qwen2 always has q/k/v biases; llama may (attention_bias) but then in every layer */
    if (n_bias != 0 && n_bias != in->n_layer)
        return cm_err_set(err, CM_E_FORMAT, "model: q/k/v biases in %d of %d layers", n_bias, in->n_layer);
    if (!strcmp(in->arch, "qwen2") && n_bias == 0)
        return cm_err_set(err, CM_E_FORMAT, "model: qwen2 requires blk.N.attn_q/k/v.bias");
    in->qkv_bias = n_bias > 0;
    if (cm_moe_arch(in->arch) && !(m->moe = cm_moe_load(&m->gguf, in->arch, in, err))) return CM_E_FORMAT;

    /* parameter count over every tensor in the file; weight type = type holding most matrix elements */
    uint64_t per_type[64] = {0};
    in->n_params = 0;
    for (uint64_t t = 0; t < m->gguf.n_tensors; t++) {
        const gguf_tensor *gt = &m->gguf.tensors[t];
        uint64_t n = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) n *= (uint64_t)gt->ne[d];
        in->n_params += n;
        if (gt->ne[1] > 1 && gt->type >= 0 && gt->type < 64) per_type[gt->type] += n;
    }
    int best = m->tok_embd.type;
    for (int t = 0; t < 64; t++)
        if (per_type[t] > per_type[best]) best = t;
    m->weight_type = strdup(gguf_ttype_name(best));
    if (!m->weight_type) return cm_err_set(err, CM_E_NOMEM, "model: out of memory");
    in->weight_type = m->weight_type;
    return CM_OK;
}

/* ============================================================ load / free */

cm_model *cm_model_load(const char *path, const cm_model_params *params, cm_err *err) {
    cm_model_params defp = {0};
    if (!params) params = &defp;
    if (!path) {
        cm_err_set(err, CM_E_INVAL, "model: no path");
        return NULL;
    }
    cm_model *m = calloc(1, sizeof *m);
    if (!m) {
        cm_err_set(err, CM_E_NOMEM, "model: out of memory");
        return NULL;
    }
    if (gguf_open(&m->gguf, path, err) < 0) {
        free(m);
        return NULL;
    }
    cm_model_info *in = &m->info;
    in->file_bytes = m->gguf.size;
    in->bos = in->eos = in->eot = in->pad = -1;
    in->fim_pre = in->fim_suf = in->fim_mid = in->fim_rep = in->fim_sep = -1;

    gguf_str s = {0};
    int rc = gguf_get_str(&m->gguf, "general.architecture", &s, err);
    if (rc == 1 && !params->vocab_only) rc = cm_err_set(err, CM_E_FORMAT, "model: missing general.architecture");
    if (rc < 0) goto fail;
    m->arch = rc == CM_OK ? dup_str(s.ptr, s.len > 64 ? 64 : s.len) : strdup("");
    rc = gguf_get_str(&m->gguf, "general.name", &s, err);
    if (rc < 0) goto fail;
    m->name = rc == CM_OK ? dup_str(s.ptr, s.len > 256 ? 256 : s.len) : strdup("");
    if (!m->arch || !m->name) {
        rc = cm_err_set(err, CM_E_NOMEM, "model: out of memory");
        goto fail;
    }
    in->arch = m->arch;
    in->name = m->name;

    m->tok = cm_tokenizer_load(&m->gguf, in, err);
    if (!m->tok) {
        rc = CM_E_FORMAT;
        goto fail;
    }
    if (params->vocab_only) {
        m->weight_type = strdup("");
        in->weight_type = m->weight_type ? m->weight_type : "";
        return m;
    }
    if (strcmp(m->arch, "qwen2") && strcmp(m->arch, "llama") && strcmp(m->arch, "qwen3") && !cm_moe_arch(m->arch)) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED,
                        "model: architecture \"%s\" is not supported (qwen2, qwen3, llama, qwen3moe, multipl_moe, mole)",
                        m->arch);
        goto fail;
    }
    if (in->n_vocab < 1) {
        rc = cm_err_set(err, CM_E_FORMAT, "model: empty vocabulary");
        goto fail;
    }
    if ((rc = load_hparams(m, m->arch, err)) < 0 || (rc = load_tensors(m, err)) < 0) goto fail;
    return m;
fail:
    cm_model_free(m);
    return NULL;
}

void cm_model_free(cm_model *m) {
    if (!m) return;
    cm_tokenizer_free(m->tok);
    free(m->layers);
    cm_moe_model_free(m->moe);
    free(m->arch);
    free(m->name);
    free(m->weight_type);
    gguf_close(&m->gguf);
    free(m);
}

const cm_model_info *cm_model_get_info(const cm_model *m) { return m ? &m->info : NULL; }

/* Walks the file's tensors rather than the model's views so that every tensor forward.c reads is counted
 * once, whatever the architecture; the names decide the share of a tensor a token reads. */
uint64_t cm_model_decode_bytes(const cm_model *m, int n_past, int kv_type) {
    size_t elt = cm_kv_elt_bytes(kv_type);
    if (!m || !m->layers || n_past < 0 || !elt) return 0;
    const cm_model_info *in = &m->info;
    const cm_moe_model *mm = m->moe;
    uint64_t total = 0;
    for (uint64_t t = 0; t < m->gguf.n_tensors; t++) {
        const gguf_tensor *gt = &m->gguf.tensors[t];
        char name[96];
        snprintf(name, sizeof name, "%.*s", (int)(gt->name.len < 95 ? gt->name.len : 95), gt->name.ptr);
        uint64_t b = gt->nbytes;
        if (!strcmp(name, "token_embd.weight") && !in->tied_output) {
            b = gguf_row_bytes(gt->type, gt->ne[0]); /* a lookup; the output matrix is its own tensor */
        } else if (mm && strstr(name, "_seg_exps.")) {
            b = b / (uint64_t)mm->n_seg * (uint64_t)mm->seg_causal_top;
        } else if (mm && strstr(name, "_exps.")) {
            b = b / (uint64_t)mm->n_tok * (uint64_t)mm->k_used;
        } else if (mm && mm->n_adapters > 0 && (strstr(name, ".lora_a.") || strstr(name, ".lora_b."))) {
            int runs = mm->ad_shared >= 0 && mm->n_adapters > 1 ? 2 : 1;
            b = b * (uint64_t)runs / (uint64_t)mm->n_adapters;
        }
        total += b;
    }
    uint64_t kv_pos = (uint64_t)in->n_layer * 2 * (uint64_t)in->n_head_kv * (uint64_t)in->head_dim * elt;
    return total + kv_pos * ((uint64_t)n_past + 1);
}

/* The Rss of the mapping that starts at addr, from /proc/self/smaps (0 if not found). */
static size_t mapping_rss(const void *addr) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512];
    int in = 0;
    size_t rss = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            if (in) break;
            in = lo == (unsigned long)(uintptr_t)addr;
        } else if (in && !strncmp(line, "Rss:", 4)) {
            rss = (size_t)strtoull(line + 4, NULL, 10) * 1024;
        }
    }
    fclose(f);
    return rss;
}

int cm_model_residency(const cm_model *m, size_t *mapped, size_t *cached, size_t *rss) {
    *mapped = *cached = *rss = 0;
    if (!m || !m->gguf.owns_map || !m->gguf.map) return 0;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return -1;
    size_t size = (size_t)m->gguf.size, n_pages = (size + (size_t)page - 1) / (size_t)page;
    unsigned char *vec = malloc(n_pages ? n_pages : 1);
    if (!vec) return -1;
    /* the mapping starts page-aligned (mmap) */
    if (mincore((void *)m->gguf.map, size, vec) != 0) { free(vec); return -1; }
    size_t pages = 0;
    for (size_t i = 0; i < n_pages; i++) pages += vec[i] & 1;
    free(vec);
    size_t bytes = pages * (size_t)page;
    *mapped = size;
    *cached = bytes > size ? size : bytes;
    *rss = mapping_rss(m->gguf.map);
    return 0;
}

const char *cm_model_chat_template(const cm_model *m, size_t *len) {
    *len = 0;
    gguf_str s = {0};
    cm_err err = {0};
    if (!m || gguf_get_str(&m->gguf, "tokenizer.chat_template", &s, &err) != CM_OK) return NULL;
    *len = (size_t)s.len;
    return s.ptr;
}
