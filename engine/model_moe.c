/*
 * model_moe.c - loads the mixture-of-experts part of "multipl_moe", "qwen3moe" and "mole" GGUF files: the
 * <arch>.* hyper-parameters and the expert / router / LoRA tensors (docs/model-format.md). The base
 * attention tensors and keys are model.c's. Every count is range-checked and every tensor must have
 * exactly the shape the hyper-parameters imply, so the forward pass needs no checks of its own.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "moe.h"
#include "util.h"

#define MAX_RANK 8192

int cm_moe_arch(const char *arch) {
    if (!arch) return CM_MOE_NONE;
    if (!strcmp(arch, "multipl_moe")) return CM_MOE_HYBRID;
    if (!strcmp(arch, "mole")) return CM_MOE_MOLE;
    if (!strcmp(arch, "qwen3moe")) return CM_MOE_SPARSE;
    return CM_MOE_NONE;
}

int cm_moe_hparams(const gguf_file *g, const char *arch, cm_model_info *in, cm_err *err) {
    if (cm_moe_arch(arch) == CM_MOE_SPARSE) return CM_OK; /* llama.cpp's qwen3moe: model.c's NeoX rope */
    in->rope_neox = cm_moe_arch(arch) == CM_MOE_HYBRID;
    char key[160];
    snprintf(key, sizeof key, "%s.rope.type", arch);
    gguf_str s;
    int rc = gguf_get_str(g, key, &s, err);
    if (rc < 0) return rc;
    if (rc == CM_OK) {
        if (gguf_str_eq(s, "neox")) in->rope_neox = 1;
        else if (gguf_str_eq(s, "normal")) in->rope_neox = 0;
        else
            return cm_err_set(err, CM_E_FORMAT, "model: %s = \"%.*s\" (expected \"neox\" or \"normal\")", key,
                              (int)(s.len > 32 ? 32 : s.len), s.ptr);
    }
    return CM_OK;
}

static int key_u32(const gguf_file *g, const char *arch, const char *key, int lo, int hi, int def, int *out,
                   cm_err *err) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    uint32_t v;
    int rc = gguf_get_u32(g, full, &v, err);
    if (rc < 0) return rc;
    if (rc == 1) {
        if (def == INT32_MIN) return cm_err_set(err, CM_E_FORMAT, "model: missing key %s", full);
        *out = def;
        return CM_OK;
    }
    if ((int64_t)v < lo || (int64_t)v > hi)
        return cm_err_set(err, CM_E_FORMAT, "model: %s = %u out of range [%d, %d]", full, v, lo, hi);
    *out = (int)v;
    return CM_OK;
}

static int key_i32(const gguf_file *g, const char *arch, const char *key, int lo, int hi, int def, int *out,
                   cm_err *err) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int32_t v;
    int rc = gguf_get_i32(g, full, &v, err);
    if (rc < 0) return rc;
    if (rc == 1) {
        *out = def;
        return CM_OK;
    }
    if (v < lo || v > hi) return cm_err_set(err, CM_E_FORMAT, "model: %s = %d out of range [%d, %d]", full, v, lo, hi);
    *out = v;
    return CM_OK;
}

static int key_f32(const gguf_file *g, const char *arch, const char *key, float lo, float hi, float def,
                   float *out, cm_err *err) {
    char full[160];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    int rc = gguf_get_f32(g, full, out, err);
    if (rc < 0) return rc;
    if (rc == 1) *out = def;
    if (!(*out >= lo && *out <= hi))
        return cm_err_set(err, CM_E_FORMAT, "model: %s = %g out of range [%g, %g]", full, (double)*out, (double)lo,
                          (double)hi);
    return CM_OK;
}

/* A tensor of exact shape ne[0..nd-1] (ne[0] the row length); matrices of a matrix type, vectors F32. */
static const gguf_tensor *want_tensor(const gguf_file *g, const char *name, int nd, const int64_t *ne, cm_err *err,
                                      int *rc) {
    const gguf_tensor *t = gguf_find_tensor(g, name);
    if (!t) {
        *rc = cm_err_set(err, CM_E_FORMAT, "model: missing tensor %s", name);
        return NULL;
    }
    int ok = t->n_dims <= nd || (t->n_dims == nd + 1 && t->ne[nd] == 1);
    for (int d = 0; d < GGUF_MAX_DIMS; d++) ok &= t->ne[d] == (d < nd ? ne[d] : 1);
    if (!ok) {
        char got[96], want[96];
        int o = 0, w = 0;
        for (int d = 0; d < t->n_dims && d < GGUF_MAX_DIMS; d++)
            o += snprintf(got + o, sizeof got - (size_t)o, "%s%lld", d ? ", " : "", (long long)t->ne[d]);
        if (!o) snprintf(got, sizeof got, "-");
        for (int d = 0; d < nd; d++)
            w += snprintf(want + w, sizeof want - (size_t)w, "%s%lld", d ? ", " : "", (long long)ne[d]);
        *rc = cm_err_set(err, CM_E_FORMAT, "model: tensor %s has shape [%s], expected [%s]", name, got, want);
        return NULL;
    }
    if (!cm_weight_type_ok(t->type)) {
        *rc = cm_err_set(err, CM_E_UNSUPPORTED, "model: tensor %s has type %s; supported: " CM_WEIGHT_TYPES,
                         name, gguf_ttype_name(t->type));
        return NULL;
    }
    return t;
}

/* ============================================================ multipl_moe */

/* <a>.expert_used_count, checked against the expert count with a message naming both. */
static int load_top_k(cm_moe_model *mm, const gguf_file *g, const char *a, cm_err *err) {
    char full[160];
    snprintf(full, sizeof full, "%s.expert_used_count", a);
    uint32_t k;
    int rc = gguf_get_u32(g, full, &k, err);
    if (rc < 0) return rc;
    if (rc == 1) return cm_err_set(err, CM_E_FORMAT, "model: missing key %s", full);
    if (k < 1 || k > (uint32_t)mm->n_tok)
        return cm_err_set(err, CM_E_FORMAT, "model: %s = %u (top-k) must be in [1, expert_count %d]", full, k,
                          mm->n_tok);
    mm->k_used = (int)k;
    return CM_OK;
}

/* The routers and stacked experts of every layer, token level and (n_seg > 0) segment level, with
 * exactly the counts and widths already read into mm. */
static int load_experts(cm_moe_model *mm, const gguf_file *g, const cm_model_info *in, cm_err *err) {
    int rc;
    int64_t D = in->n_embd, F = mm->f_exp;
    mm->layers = calloc((size_t)in->n_layer, sizeof *mm->layers);
    mm->experts_mem = calloc((size_t)in->n_layer * (size_t)(mm->n_tok + mm->n_seg), sizeof *mm->experts_mem);
    if (!mm->layers || !mm->experts_mem) return cm_err_set(err, CM_E_NOMEM, "model: out of memory");
    mm->router_type = -1;
    for (int il = 0; il < in->n_layer; il++) {
        cm_moe_layer *l = &mm->layers[il];
        l->tok = mm->experts_mem + (size_t)il * (size_t)(mm->n_tok + mm->n_seg);
        l->seg = l->tok + mm->n_tok;
        for (int lv = 0; lv < (mm->n_seg ? 2 : 1); lv++) {
            int ne = lv ? mm->n_seg : mm->n_tok;
            const char *sfx = lv ? "_seg" : "";
            char nm[96];
            int64_t rs[2] = {D, ne};
            snprintf(nm, sizeof nm, "blk.%d.ffn_gate_inp%s.weight", il, sfx);
            const gguf_tensor *r = want_tensor(g, nm, 2, rs, err, &rc);
            if (!r) return rc;
            if (mm->router_type >= 0 && r->type != mm->router_type)
                return cm_err_set(err, CM_E_UNSUPPORTED, "model: routers of different types (%s)", nm);
            mm->router_type = r->type;
            if (lv) l->seg_router = r->data;
            else l->tok_router = r->data;
            static const char *proj[3] = {"gate", "up", "down"};
            for (int p = 0; p < 3; p++) {
                int64_t es[3] = {p == 2 ? F : D, p == 2 ? D : F, ne};
                snprintf(nm, sizeof nm, "blk.%d.ffn_%s%s_exps.weight", il, proj[p], sfx);
                const gguf_tensor *t = want_tensor(g, nm, 3, es, err, &rc);
                if (!t) return rc;
                size_t eb = (size_t)gguf_row_bytes(t->type, es[0]) * (size_t)es[1];
                for (int e = 0; e < ne; e++) {
                    cm_moe_expert *x = lv ? &l->seg[e] : &l->tok[e];
                    const void *ptr = (const char *)t->data + (size_t)e * eb;
                    if (p == 0) x->gate = ptr, x->gate_type = t->type;
                    else if (p == 1) x->up = ptr, x->up_type = t->type;
                    else x->down = ptr, x->down_type = t->type;
                }
            }
        }
    }
    return CM_OK;
}

static int load_hybrid(cm_moe_model *mm, const gguf_file *g, const char *a, const cm_model_info *in, cm_err *err) {
    int rc;
    if ((rc = key_u32(g, a, "expert_count", 1, CM_HYBRID_MAX_EXPERTS, INT32_MIN, &mm->n_tok, err)) ||
        (rc = key_i32(g, a, "expert_shared_index", INT32_MIN, INT32_MAX, -1, &mm->shared, err)) ||
        (rc = key_u32(g, a, "expert_feed_forward_length", 1, 1 << 20, in->n_ff, &mm->f_exp, err)) ||
        (rc = key_u32(g, a, "segment.expert_count", 0, CM_HYBRID_MAX_EXPERTS, INT32_MIN, &mm->n_seg, err)) ||
        (rc = load_top_k(mm, g, a, err)))
        return rc;
    char full[160];
    /* the shared index is checked against the count with a message naming both */
    if (mm->shared < -1 || mm->shared >= mm->n_tok)
        return cm_err_set(err, CM_E_FORMAT, "model: %s.expert_shared_index = %d out of range [-1, %d)", a, mm->shared,
                          mm->n_tok);
    mm->pooling = CM_POOL_MAX;
    mm->mode_default = CM_SEGMENT_CAUSAL;
    mm->route = CM_SEGMENT_ROUTE_PREFIX;
    if (mm->n_seg > 0) {
        if ((rc = key_u32(g, a, "segment.window", 1, 1 << 20, INT32_MIN, &mm->window, err)) ||
            (rc = key_u32(g, a, "segment.bucket", 1, CM_HYBRID_MAX_EXPERTS, mm->n_seg, &mm->bucket, err)) ||
            (rc = key_f32(g, a, "segment.capacity", 1e-6f, 1e6f, 1.0f, &mm->capacity, err)) ||
            (rc = key_f32(g, a, "segment.gate_scale", -1e6f, 1e6f, 1.0f / (float)mm->window, &mm->gate_scale, err)))
            return rc;
        /* string keys: name, its two values (mapped to 0 and 1 of the field), the field */
        struct { const char *key, *v0, *v1; int *out, c0, c1; } sk[3] = {
            {"segment.pooling", "max", "mean", &mm->pooling, CM_POOL_MAX, CM_POOL_MEAN},
            {"segment.mode_default", "causal", "reference", &mm->mode_default, CM_SEGMENT_CAUSAL, CM_SEGMENT_REFERENCE},
            {"segment.route", "prefix", "previous", &mm->route, CM_SEGMENT_ROUTE_PREFIX, CM_SEGMENT_ROUTE_PREVIOUS},
        };
        for (int i = 0; i < 3; i++) {
            snprintf(full, sizeof full, "%s.%s", a, sk[i].key);
            gguf_str s;
            if ((rc = gguf_get_str(g, full, &s, err)) < 0) return rc;
            if (rc == 1) continue;
            if (gguf_str_eq(s, sk[i].v0)) *sk[i].out = sk[i].c0;
            else if (gguf_str_eq(s, sk[i].v1)) *sk[i].out = sk[i].c1;
            else
                return cm_err_set(err, CM_E_FORMAT, "model: %s = \"%.*s\" (expected \"%s\" or \"%s\")", full,
                                  (int)(s.len > 32 ? 32 : s.len), s.ptr, sk[i].v0, sk[i].v1);
        }
        int c = (int)floor((double)mm->capacity);
        mm->seg_causal_top = c < 1 ? 1 : c > mm->n_seg ? mm->n_seg : c;
    }
    if ((rc = key_f32(g, a, "fusion.token", -1e6f, 1e6f, 1.0f, &mm->a_tok, err)) ||
        (rc = key_f32(g, a, "fusion.segment", -1e6f, 1e6f, mm->n_seg ? 1.0f : 0.0f, &mm->a_seg, err)))
        return rc;
    return load_experts(mm, g, in, err);
}

/* ============================================================ qwen3moe
 *
 * As llama.cpp reads it: expert_count and expert_used_count required, expert_feed_forward_length
 * optional (default feed_forward_length / expert_used_count, llama.cpp's fallback); softmax over every
 * expert, the top k renormalised to sum 1 (llama.cpp's qwen3moe graph always normalises; HF's
 * norm_topk_prob), no shared expert, no segment level. */

static int load_sparse(cm_moe_model *mm, const gguf_file *g, const char *a, const cm_model_info *in, cm_err *err) {
    int rc;
    if ((rc = key_u32(g, a, "expert_count", 1, CM_MOE_MAX_EXPERTS, INT32_MIN, &mm->n_tok, err)) ||
        (rc = load_top_k(mm, g, a, err)))
        return rc;
    int f_def = in->n_ff / mm->k_used > 0 ? in->n_ff / mm->k_used : 1;
    if ((rc = key_u32(g, a, "expert_feed_forward_length", 1, 1 << 20, f_def, &mm->f_exp, err))) return rc;
    mm->shared = -1;
    mm->n_seg = 0;
    mm->a_tok = 1.0f;
    mm->a_seg = 0.0f;
    mm->pooling = CM_POOL_MAX;
    mm->mode_default = CM_SEGMENT_CAUSAL;
    return load_experts(mm, g, in, err);
}

/* ============================================================ mole */

static int name_ok(gguf_str s) {
    if (s.len == 0 || s.len > CM_LANG_NAME_MAX) return 0;
    for (uint64_t i = 0; i < s.len; i++) {
        char ch = s.ptr[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) return 0;
    }
    return 1;
}

static int load_mole(cm_moe_model *mm, const gguf_file *g, const char *a, const cm_model_info *in, cm_err *err) {
    char full[160];
    const gguf_kv *kn, *kr, *ka;
    snprintf(full, sizeof full, "%s.adapter.names", a);
    kn = gguf_find(g, full);
    snprintf(full, sizeof full, "%s.adapter.ranks", a);
    kr = gguf_find(g, full);
    snprintf(full, sizeof full, "%s.adapter.alphas", a);
    ka = gguf_find(g, full);
    if (!kn || !kr || !ka)
        return cm_err_set(err, CM_E_FORMAT, "model: missing key %s.adapter.%s", a, !kn ? "names" : !kr ? "ranks" : "alphas");
    if (kn->type != GGUF_VT_ARRAY || kn->arr_type != GGUF_VT_STRING)
        return cm_err_set(err, CM_E_FORMAT, "model: %s.adapter.names must be an array of strings", a);
    for (int i = 0; i < 2; i++) {
        const gguf_kv *k = i ? ka : kr;
        if (k->type != GGUF_VT_ARRAY || k->arr_type == GGUF_VT_STRING || k->arr_type == GGUF_VT_ARRAY)
            return cm_err_set(err, CM_E_FORMAT, "model: %s.adapter.%s must be a numeric array", a, i ? "alphas" : "ranks");
    }
    if (kn->n > CM_MOLE_MAX_ADAPTERS)
        return cm_err_set(err, CM_E_UNSUPPORTED, "model: %llu adapters (at most %d)", (unsigned long long)kn->n,
                          CM_MOLE_MAX_ADAPTERS);
    if (kr->n != kn->n || ka->n != kn->n)
        return cm_err_set(err, CM_E_FORMAT, "model: %llu adapter names but %llu ranks and %llu alphas",
                          (unsigned long long)kn->n, (unsigned long long)kr->n, (unsigned long long)ka->n);
    int n = (int)kn->n;
    mm->n_adapters = n;
    mm->n_ff = in->n_ff;
    mm->names = calloc((size_t)n + 1, sizeof *mm->names);
    mm->ranks = calloc((size_t)n + 1, sizeof *mm->ranks);
    mm->alphas = calloc((size_t)n + 1, sizeof *mm->alphas);
    mm->scales = calloc((size_t)n + 1, sizeof *mm->scales);
    mm->lora = calloc((size_t)in->n_layer * 3 * (size_t)n + 1, sizeof *mm->lora);
    if (!mm->names || !mm->ranks || !mm->alphas || !mm->scales || !mm->lora)
        return cm_err_set(err, CM_E_NOMEM, "model: out of memory");
    for (int i = 0; i < n; i++) {
        gguf_str s = gguf_arr_str(kn, (uint64_t)i);
        if (!name_ok(s))
            return cm_err_set(err, CM_E_FORMAT, "model: adapter name %d \"%.*s\" must be [a-z0-9_]{1,%d}", i,
                              (int)(s.len > 32 ? 32 : s.len), s.ptr, CM_LANG_NAME_MAX);
        memcpy(mm->names[i], s.ptr, s.len);
        mm->names[i][s.len] = 0;
        for (int j = 0; j < i; j++)
            if (!strcmp(mm->names[j], mm->names[i]))
                return cm_err_set(err, CM_E_FORMAT, "model: adapter name \"%s\" appears twice", mm->names[i]);
        int64_t r = gguf_arr_int(kr, (uint64_t)i);
        double al = gguf_arr_float(ka, (uint64_t)i);
        if (r < 1 || r > MAX_RANK)
            return cm_err_set(err, CM_E_FORMAT, "model: adapter %s rank %lld out of range [1, %d]", mm->names[i],
                              (long long)r, MAX_RANK);
        if (!(fabs(al) < 1e6))
            return cm_err_set(err, CM_E_FORMAT, "model: adapter %s alpha %g is not a finite value", mm->names[i], al);
        mm->ranks[i] = (int)r;
        mm->alphas[i] = (float)al;
        mm->scales[i] = (float)(al / sqrt((double)r)); /* rsLoRA */
        if (r > mm->max_rank) mm->max_rank = (int)r;
    }
    int rc;
    if ((rc = key_i32(g, a, "adapter.shared", -1, n - 1, -1, &mm->ad_shared, err)) ||
        (rc = key_i32(g, a, "adapter.fallback", -1, n - 1, -1, &mm->ad_fallback, err)))
        return rc;
    int64_t D = in->n_embd, F = in->n_ff;
    static const char *proj[3] = {"gate", "up", "down"};
    for (int il = 0; il < in->n_layer; il++)
        for (int p = 0; p < 3; p++) {
            int64_t din = p == 2 ? F : D, dout = p == 2 ? D : F;
            for (int ad = 0; ad < n; ad++) {
                cm_lora *lo = &mm->lora[((size_t)il * 3 + (size_t)p) * (size_t)n + (size_t)ad];
                char nm[128];
                int64_t sa[2] = {din, mm->ranks[ad]}, sb[2] = {mm->ranks[ad], dout};
                snprintf(nm, sizeof nm, "blk.%d.ffn_%s.lora_a.%s", il, proj[p], mm->names[ad]);
                const gguf_tensor *ta = want_tensor(g, nm, 2, sa, err, &rc);
                if (!ta) return rc;
                snprintf(nm, sizeof nm, "blk.%d.ffn_%s.lora_b.%s", il, proj[p], mm->names[ad]);
                const gguf_tensor *tb = want_tensor(g, nm, 2, sb, err, &rc);
                if (!tb) return rc;
                lo->a = ta->data;
                lo->b = tb->data;
                lo->a_type = ta->type;
                lo->b_type = tb->type;
            }
        }
    return CM_OK;
}

cm_moe_model *cm_moe_load(const gguf_file *g, const char *arch, const cm_model_info *in, cm_err *err) {
    int kind = cm_moe_arch(arch);
    if (kind == CM_MOE_NONE) {
        cm_err_set(err, CM_E_UNSUPPORTED, "model: \"%s\" is not a mixture-of-experts architecture", arch ? arch : "");
        return NULL;
    }
    cm_moe_model *mm = calloc(1, sizeof *mm);
    if (!mm) {
        cm_err_set(err, CM_E_NOMEM, "model: out of memory");
        return NULL;
    }
    mm->kind = kind;
    mm->n_layer = in->n_layer;
    mm->d = in->n_embd;
    mm->shared = mm->ad_shared = mm->ad_fallback = -1;
    int rc = kind == CM_MOE_HYBRID   ? load_hybrid(mm, g, arch, in, err)
             : kind == CM_MOE_SPARSE ? load_sparse(mm, g, arch, in, err)
                                     : load_mole(mm, g, arch, in, err);
    if (rc < 0) {
        cm_moe_model_free(mm);
        return NULL;
    }
    return mm;
}

void cm_moe_model_free(cm_moe_model *mm) {
    if (!mm) return;
    free(mm->layers);
    free(mm->experts_mem);
    free(mm->names);
    free(mm->ranks);
    free(mm->alphas);
    free(mm->scales);
    free(mm->lora);
    free(mm);
}
