/*
 * upcycle.c - dense qwen2/llama GGUF -> "multipl_moe" (every expert a copy of the dense FFN) or "mole"
 * (zero-initialised LoRA adapters). Metadata is copied key by key with <base>.* renamed to <arch>.*;
 * the base's rope style is written as <arch>.rope.type so a llama base keeps its "normal" rope.
 * Tensors other than the FFN's are passed through unchanged (by reference into the mapping).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "gguf.h"
#include "model.h"
#include "moe.h"
#include "util.h"

void cm_upcycle_default(cm_upcycle_params *p) {
    memset(p, 0, sizeof *p);
    p->n_experts = 6;
    p->top_k = 2;
    p->shared = CM_UPCYCLE_SHARED_LAST;
    p->n_seg_experts = 6;
    p->window = 64;
    p->pooling = "max";
    p->capacity = 1.0f;
    p->bucket = 4;
    p->a_tok = 0.7f;
    p->a_seg = 0.3f;
    p->mode_default = "causal";
    p->seed = 1;
    p->rank_lang = 16;
    p->rank_shared = 48;
    p->rank_other = 64;
    p->alpha_lang = 16;
    p->alpha_shared = 32;
    p->alpha_other = 32;
}

/* splitmix64 + Box-Muller: reproducible noise from the seed alone */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_normal(uint64_t *s) {
    double u1 = ((double)(rng_next(s) >> 11) + 1.0) / 9007199254740993.0;
    double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Copy one metadata entry, renaming <from>.* to <to>.*. */
static int copy_kv(gguf_writer *w, const gguf_kv *kv, const char *from, const char *to, cm_err *err) {
    char key[256];
    size_t fl = strlen(from);
    if (kv->key.len >= 200) return CM_OK; /* no key we need is that long */
    if (kv->key.len > fl && !memcmp(kv->key.ptr, from, fl) && kv->key.ptr[fl] == '.')
        snprintf(key, sizeof key, "%s%.*s", to, (int)(kv->key.len - fl), kv->key.ptr + fl);
    else
        snprintf(key, sizeof key, "%.*s", (int)kv->key.len, kv->key.ptr);
    if (!strcmp(key, "general.architecture")) return gguf_writer_set_str(w, key, to);
    int t = kv->type == GGUF_VT_ARRAY ? kv->arr_type : kv->type;
    int rc = 0;
    if (kv->type == GGUF_VT_ARRAY) {
        uint64_t n = kv->n;
        if (t == GGUF_VT_STRING) {
            char **v = calloc(n + 1, sizeof *v);
            if (!v) return cm_err_set(err, CM_E_NOMEM, "upcycle: out of memory");
            for (uint64_t i = 0; i < n && rc == 0; i++) {
                gguf_str s = gguf_arr_str(kv, i);
                v[i] = malloc(s.len + 1);
                if (!v[i]) rc = -1;
                else memcpy(v[i], s.ptr, s.len), v[i][s.len] = 0;
            }
            if (rc == 0) rc = gguf_writer_set_arr_str(w, key, (const char *const *)v, n);
            for (uint64_t i = 0; i < n; i++) free(v[i]);
            free(v);
        } else if (t == GGUF_VT_FLOAT32 || t == GGUF_VT_FLOAT64) {
            float *v = malloc((n + 1) * sizeof *v);
            if (!v) return cm_err_set(err, CM_E_NOMEM, "upcycle: out of memory");
            for (uint64_t i = 0; i < n; i++) v[i] = (float)gguf_arr_float(kv, i);
            rc = gguf_writer_set_arr_f32(w, key, v, n);
            free(v);
        } else if (t != GGUF_VT_ARRAY) {
            int32_t *v = malloc((n + 1) * sizeof *v);
            if (!v) return cm_err_set(err, CM_E_NOMEM, "upcycle: out of memory");
            for (uint64_t i = 0; i < n; i++) v[i] = (int32_t)gguf_arr_int(kv, i);
            rc = gguf_writer_set_arr_i32(w, key, v, n);
            free(v);
        }
    } else if (t == GGUF_VT_STRING) {
        gguf_str s = gguf_arr_str(kv, 0);
        char *v = malloc(s.len + 1);
        if (!v) return cm_err_set(err, CM_E_NOMEM, "upcycle: out of memory");
        memcpy(v, s.ptr, s.len);
        v[s.len] = 0;
        rc = gguf_writer_set_str(w, key, v);
        free(v);
    } else if (t == GGUF_VT_BOOL) {
        rc = gguf_writer_set_bool(w, key, (int)gguf_arr_int(kv, 0));
    } else if (t == GGUF_VT_FLOAT32 || t == GGUF_VT_FLOAT64) {
        rc = gguf_writer_set_f32(w, key, (float)gguf_arr_float(kv, 0));
    } else if (t == GGUF_VT_INT8 || t == GGUF_VT_INT16 || t == GGUF_VT_INT32 || t == GGUF_VT_INT64) {
        rc = gguf_writer_set_i32(w, key, (int32_t)gguf_arr_int(kv, 0));
    } else {
        rc = gguf_writer_set_u32(w, key, (uint32_t)gguf_arr_int(kv, 0));
    }
    return rc < 0 ? cm_err_set(err, CM_E_NOMEM, "upcycle: cannot copy key %s", key) : CM_OK;
}

static int check_params(const cm_upcycle_params *p, cm_err *err) {
    if (p->mole_langs) return CM_OK;
    if (p->n_experts < 1 || p->n_experts > CM_HYBRID_MAX_EXPERTS)
        return cm_err_set(err, CM_E_INVAL, "upcycle: --experts %d out of range [1, %d]", p->n_experts, CM_HYBRID_MAX_EXPERTS);
    if (p->top_k < 1 || p->top_k > p->n_experts)
        return cm_err_set(err, CM_E_INVAL, "upcycle: --top-k %d must be in [1, experts %d]", p->top_k, p->n_experts);
    if (p->shared < CM_UPCYCLE_SHARED_LAST || p->shared >= p->n_experts)
        return cm_err_set(err, CM_E_INVAL, "upcycle: --shared %d out of range [-1, %d)", p->shared, p->n_experts);
    if (p->n_seg_experts < 0 || p->n_seg_experts > CM_HYBRID_MAX_EXPERTS)
        return cm_err_set(err, CM_E_INVAL, "upcycle: --segment-experts %d out of range [0, %d]", p->n_seg_experts,
                          CM_HYBRID_MAX_EXPERTS);
    if (p->window < 1) return cm_err_set(err, CM_E_INVAL, "upcycle: --window %d must be >= 1", p->window);
    if (p->bucket < 1 || p->bucket > CM_HYBRID_MAX_EXPERTS)
        return cm_err_set(err, CM_E_INVAL, "upcycle: --bucket %d out of range [1, %d]", p->bucket, CM_HYBRID_MAX_EXPERTS);
    if (!(p->capacity > 0 && p->capacity <= 1e6f)) return cm_err_set(err, CM_E_INVAL, "upcycle: --capacity must be > 0");
    if (!p->pooling || (strcmp(p->pooling, "max") && strcmp(p->pooling, "mean")))
        return cm_err_set(err, CM_E_INVAL, "upcycle: --pooling must be max or mean");
    if (!p->mode_default || (strcmp(p->mode_default, "causal") && strcmp(p->mode_default, "reference")))
        return cm_err_set(err, CM_E_INVAL, "upcycle: --mode must be causal or reference");
    if (!(fabsf(p->a_tok) < 1e6f && fabsf(p->a_seg) < 1e6f && fabsf(p->gate_scale) < 1e6f && p->router_std >= 0 &&
          p->router_std < 1e3f))
        return cm_err_set(err, CM_E_INVAL, "upcycle: fusion weights, gate scale or router noise out of range");
    return CM_OK;
}

/* blocks of memory that must live until the writer has written */
typedef struct keep {
    void **p;
    size_t n, cap;
} keep;

static void *keep_alloc(keep *k, size_t bytes) {
    if (k->n == k->cap) {
        size_t cap = k->cap ? 2 * k->cap : 64;
        void **q = realloc(k->p, cap * sizeof *q);
        if (!q) return NULL;
        k->p = q;
        k->cap = cap;
    }
    void *b = calloc(1, bytes ? bytes : 1);
    if (b) k->p[k->n++] = b;
    return b;
}

static int add_ref(gguf_writer *w, const char *name, int type, int nd, const int64_t *ne, const void *data,
                   cm_err *err) {
    return gguf_writer_add_tensor_ref(w, name, type, nd, ne, type, data, err);
}

int cm_upcycle(const char *dense_path, const char *out_path, const cm_upcycle_params *p, cm_err *err) {
    if (!dense_path || !out_path || !p) return cm_err_set(err, CM_E_INVAL, "upcycle: no input, output or params");
    int rc = check_params(p, err);
    if (rc < 0) return rc;
    cm_model_params mp = {0};
    cm_model *m = cm_model_load(dense_path, &mp, err);
    if (!m) return CM_E_FORMAT;
    const cm_model_info *in = &m->info;
    keep k = {0};
    gguf_writer *w = NULL;
    if (strcmp(in->arch, "qwen2") && strcmp(in->arch, "llama")) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED, "upcycle: %s is \"%s\"; a dense qwen2 or llama model is needed",
                        dense_path, in->arch);
        goto out;
    }
    int mole = p->mole_langs != NULL;
    const char *arch = mole ? "mole" : "multipl_moe";
    w = gguf_writer_create(err);
    if (!w) {
        rc = CM_E_NOMEM;
        goto out;
    }
    const gguf_file *g = &m->gguf;
    for (uint64_t i = 0; i < g->n_kv; i++)
        if ((rc = copy_kv(w, &g->kv[i], in->arch, arch, err)) < 0) goto out;
    char key[160];
#define KEY(s) (snprintf(key, sizeof key, "%s.%s", arch, s), key)
    gguf_writer_set_str(w, KEY("rope.type"), in->rope_neox ? "neox" : "normal");
    gguf_writer_set_f32(w, KEY("rope.freq_base"), in->rope_theta); /* the base's default made explicit */
    int64_t D = in->n_embd, F = in->n_ff;
    uint64_t seed = p->seed;

    /* every tensor but the dense FFN (hybrid) passes through */
    for (uint64_t t = 0; t < g->n_tensors; t++) {
        const gguf_tensor *gt = &g->tensors[t];
        char name[300];
        snprintf(name, sizeof name, "%.*s", (int)(gt->name.len > 256 ? 256 : gt->name.len), gt->name.ptr);
        int is_ffn = strstr(name, ".ffn_gate.weight") || strstr(name, ".ffn_up.weight") || strstr(name, ".ffn_down.weight");
        if (is_ffn && !mole) continue;
        if ((rc = add_ref(w, name, gt->type, gt->n_dims, gt->ne, gt->data, err)) < 0) goto out;
    }

    if (!mole) {
        int shared = p->shared == CM_UPCYCLE_SHARED_LAST ? p->n_experts - 1 : p->shared;
        gguf_writer_set_u32(w, KEY("expert_count"), (uint32_t)p->n_experts);
        gguf_writer_set_u32(w, KEY("expert_used_count"), (uint32_t)p->top_k);
        gguf_writer_set_i32(w, KEY("expert_shared_index"), shared);
        gguf_writer_set_u32(w, KEY("expert_feed_forward_length"), (uint32_t)F);
        gguf_writer_set_u32(w, KEY("segment.expert_count"), (uint32_t)p->n_seg_experts);
        gguf_writer_set_u32(w, KEY("segment.window"), (uint32_t)p->window);
        gguf_writer_set_str(w, KEY("segment.pooling"), p->pooling);
        gguf_writer_set_f32(w, KEY("segment.capacity"), p->capacity);
        gguf_writer_set_u32(w, KEY("segment.bucket"), (uint32_t)p->bucket);
        gguf_writer_set_f32(w, KEY("segment.gate_scale"), p->gate_scale != 0 ? p->gate_scale : 1.0f / (float)p->window);
        gguf_writer_set_f32(w, KEY("fusion.token"), p->a_tok);
        gguf_writer_set_f32(w, KEY("fusion.segment"), p->a_seg);
        gguf_writer_set_str(w, KEY("segment.mode_default"), p->mode_default);
        for (int il = 0; il < in->n_layer; il++) {
            const cm_layer *l = &m->layers[il];
            for (int lv = 0; lv < (p->n_seg_experts ? 2 : 1); lv++) {
                int ne = lv ? p->n_seg_experts : p->n_experts;
                const char *sfx = lv ? "_seg" : "";
                char nm[96];
                float *r = keep_alloc(&k, (size_t)ne * (size_t)D * sizeof(float));
                if (!r) goto oom;
                if (p->router_std > 0)
                    for (int64_t i = 0; i < ne * D; i++) r[i] = p->router_std * rng_normal(&seed);
                int64_t rs[2] = {D, ne};
                snprintf(nm, sizeof nm, "blk.%d.ffn_gate_inp%s.weight", il, sfx);
                if ((rc = add_ref(w, nm, GGUF_TT_F32, 2, rs, r, err)) < 0) goto out;
                const cm_tensor *src[3] = {&l->w_gate, &l->w_up, &l->w_down};
                static const char *proj[3] = {"gate", "up", "down"};
                for (int pi = 0; pi < 3; pi++) {
                    const cm_tensor *s = src[pi];
                    size_t bytes = (size_t)gguf_row_bytes(s->type, s->ne0) * (size_t)s->ne1;
                    char *st = keep_alloc(&k, bytes * (size_t)ne);
                    if (!st) goto oom;
                    for (int e = 0; e < ne; e++) memcpy(st + (size_t)e * bytes, s->data, bytes);
                    int64_t es[3] = {s->ne0, s->ne1, ne};
                    snprintf(nm, sizeof nm, "blk.%d.ffn_%s%s_exps.weight", il, proj[pi], sfx);
                    if ((rc = add_ref(w, nm, s->type, 3, es, st, err)) < 0) goto out;
                }
            }
        }
    } else {
        /* adapters: the languages, then shared and other */
        char names[CM_MOLE_MAX_ADAPTERS][CM_LANG_NAME_MAX + 1];
        int n = 0;
        const char *s = p->mole_langs;
        while (*s) {
            const char *e = strchr(s, ',');
            size_t len = e ? (size_t)(e - s) : strlen(s);
            if (n >= CM_MOLE_MAX_ADAPTERS - 2) {
                rc = cm_err_set(err, CM_E_INVAL, "upcycle: too many languages (at most %d)", CM_MOLE_MAX_ADAPTERS - 2);
                goto out;
            }
            if (!cm_lang_normalize(s, len, names[n])) {
                rc = cm_err_set(err, CM_E_INVAL, "upcycle: bad language name \"%.*s\"", (int)(len > 32 ? 32 : len), s);
                goto out;
            }
            for (const char *c = names[n]; *c; c++)
                if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_')) {
                    rc = cm_err_set(err, CM_E_INVAL, "upcycle: language \"%s\" must be [a-z0-9_]", names[n]);
                    goto out;
                }
            for (int j = 0; j < n; j++)
                if (!strcmp(names[j], names[n])) {
                    rc = cm_err_set(err, CM_E_INVAL, "upcycle: language \"%s\" given twice", names[n]);
                    goto out;
                }
            n++;
            s = e ? e + 1 : s + len;
        }
        int nl = n;
        strcpy(names[n++], "shared");
        strcpy(names[n++], "other");
        const char *nptr[CM_MOLE_MAX_ADAPTERS];
        int32_t ranks[CM_MOLE_MAX_ADAPTERS];
        float alphas[CM_MOLE_MAX_ADAPTERS];
        for (int a = 0; a < n; a++) {
            nptr[a] = names[a];
            ranks[a] = a < nl ? p->rank_lang : a == nl ? p->rank_shared : p->rank_other;
            alphas[a] = a < nl ? p->alpha_lang : a == nl ? p->alpha_shared : p->alpha_other;
            if (ranks[a] < 1 || ranks[a] > 8192) {
                rc = cm_err_set(err, CM_E_INVAL, "upcycle: rank %d out of range [1, 8192]", ranks[a]);
                goto out;
            }
        }
        gguf_writer_set_arr_str(w, KEY("adapter.names"), nptr, (uint64_t)n);
        gguf_writer_set_arr_i32(w, KEY("adapter.ranks"), ranks, (uint64_t)n);
        gguf_writer_set_arr_f32(w, KEY("adapter.alphas"), alphas, (uint64_t)n);
        gguf_writer_set_i32(w, KEY("adapter.shared"), nl);
        gguf_writer_set_i32(w, KEY("adapter.fallback"), nl + 1);
        static const char *proj[3] = {"gate", "up", "down"};
        for (int il = 0; il < in->n_layer; il++)
            for (int pi = 0; pi < 3; pi++) {
                int64_t din = pi == 2 ? F : D, dout = pi == 2 ? D : F;
                for (int a = 0; a < n; a++) {
                    int64_t r = ranks[a];
                    float *A = keep_alloc(&k, (size_t)(r * din) * sizeof(float));
                    float *B = keep_alloc(&k, (size_t)(dout * r) * sizeof(float)); /* zeros */
                    if (!A || !B) goto oom;
                    float sd = (float)(1.0 / sqrt((double)din));
                    for (int64_t i = 0; i < r * din; i++) A[i] = sd * rng_normal(&seed);
                    char nm[128];
                    int64_t sa[2] = {din, r}, sb[2] = {r, dout};
                    snprintf(nm, sizeof nm, "blk.%d.ffn_%s.lora_a.%.24s", il, proj[pi], names[a]);
                    if ((rc = add_ref(w, nm, GGUF_TT_F32, 2, sa, A, err)) < 0) goto out;
                    snprintf(nm, sizeof nm, "blk.%d.ffn_%s.lora_b.%.24s", il, proj[pi], names[a]);
                    if ((rc = add_ref(w, nm, GGUF_TT_F32, 2, sb, B, err)) < 0) goto out;
                }
            }
    }
#undef KEY
    rc = gguf_writer_write(w, out_path, err);
    goto out;
oom:
    rc = cm_err_set(err, CM_E_NOMEM, "upcycle: out of memory");
out:
    gguf_writer_free(w);
    for (size_t i = 0; i < k.n; i++) free(k.p[i]);
    free(k.p);
    cm_model_free(m);
    return rc < 0 ? rc : CM_OK;
}
