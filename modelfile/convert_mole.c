/*
 * convert_mole.c - a uw-swag/mole Hugging Face checkpoint (Llama subclass, config model_type "MoE") to a
 * "mole" GGUF (docs/model-format.md). convert.c hands such a directory here.
 *
 * Checkpoint layout: the Llama tensors, except that each MLP projection p in gate/up/down is
 *   model.layers.{i}.mlp_moe.{p}_proj.shared_linear.weight           -> blk.{i}.ffn_{p}.weight
 *   model.layers.{i}.mlp_moe.{p}_proj.experts.{j}.lora_A.weight (r, in) -> blk.{i}.ffn_{p}.lora_a.<name j>
 *   model.layers.{i}.mlp_moe.{p}_proj.experts.{j}.lora_B.weight (out, r)-> blk.{i}.ffn_{p}.lora_b.<name j>
 * q/k rows are permuted as llama.cpp does for llama (the GGUF's rope is "normal"). Ranks come from the
 * lora_A shapes. Adapter names: config "adapter_names" (or "languages") if present, else the paper's
 * order (c, java, javascript, cpp, go, rust, python, csharp, shared, other) when there are 10 experts,
 * else e0, e1, ... Alphas: config "lora_alphas" (array) if present, else 32 for shared/other and 16
 * otherwise (the paper's values). "shared" and "other" name the shared and fallback adapters.
 * Matrices keep their source type (or out_type); LoRA tensors are never quantised (rows of length r).
 */
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert.h"
#include "moe.h"
#include "safetensors.h"
#include "util.h"

#define CM_MAX_SHARDS_MOLE 4096

typedef struct mole_cv {
    st_file *sh;
    int n_sh;
    json_t *cfg, *index;
    void **owned;
    int n_owned;
} mole_cv;

static const char *default_names[10] = {"c", "java", "javascript", "cpp", "go", "rust", "python", "csharp", "shared",
                                        "other"};

static int join(char *out, const char *dir, const char *name, cm_err *err) {
    if ((size_t)snprintf(out, PATH_MAX, "%s/%s", dir, name) >= PATH_MAX)
        return cm_err_set(err, CM_E_INVAL, "convert: path too long");
    return CM_OK;
}

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

int cm_convert_is_mole(const char *config_path) {
    json_error_t je;
    json_t *cfg = json_load_file(config_path, 0, &je);
    if (!cfg) return 0;
    const char *mt = json_string_value(json_object_get(cfg, "model_type"));
    int yes = mt && !strcmp(mt, "MoE");
    json_decref(cfg);
    return yes;
}

static const st_tensor *find(const mole_cv *s, const char *name) {
    for (int i = 0; i < s->n_sh; i++) {
        const st_tensor *t = st_find(&s->sh[i], name);
        if (t) return t;
    }
    return NULL;
}

static int cfg_i(json_t *cfg, const char *k, int def, int lo, int hi, int *out, cm_err *err) {
    json_t *v = json_object_get(cfg, k);
    if (!v || json_is_null(v)) {
        if (def < 0) return cm_err_set(err, CM_E_FORMAT, "convert: config.json: missing %s", k);
        *out = def;
        return CM_OK;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return cm_err_set(err, CM_E_FORMAT, "convert: config.json: %s must be an integer in [%d, %d]", k, lo, hi);
    *out = (int)json_integer_value(v);
    return CM_OK;
}

static int st_type(int dt) {
    return dt == ST_F32 ? GGUF_TT_F32 : dt == ST_F16 ? GGUF_TT_F16 : dt == ST_BF16 ? GGUF_TT_BF16 : -1;
}

/* one tensor of exact HF shape (rows, cols) (cols 0: vector) -> GGUF */
static int put(mole_cv *s, gguf_writer *w, const char *hf, const char *gg, int64_t rows, int64_t cols, int out_type,
               int perm_heads, int64_t head_dim, int optional, cm_err *err) {
    const st_tensor *t = find(s, hf);
    if (!t) return optional ? CM_OK : cm_err_set(err, CM_E_FORMAT, "convert: missing tensor '%s'", hf);
    int src = st_type(t->dtype);
    if (src < 0) return cm_err_set(err, CM_E_UNSUPPORTED, "convert: tensor '%s': dtype %s is not supported", hf, t->dtype_name);
    int ok = cols ? t->n_dims == 2 && t->shape[0] == rows && t->shape[1] == cols : t->n_dims == 1 && t->shape[0] == rows;
    if (!ok)
        return cm_err_set(err, CM_E_FORMAT, "convert: tensor '%s': shape [%lld%s%lld], expected [%lld, %lld]", hf,
                          (long long)(t->n_dims ? t->shape[0] : 0), t->n_dims > 1 ? ", " : " ", (long long)(t->n_dims > 1 ? t->shape[1] : 0),
                          (long long)rows, (long long)cols);
    int dst = cols ? (out_type >= 0 ? out_type : src) : GGUF_TT_F32;
    if (dst == GGUF_TT_Q8_0 && cols % 32) dst = GGUF_TT_F16;
    const void *data = t->data;
    if (perm_heads) {
        void *p = malloc(t->nbytes ? (size_t)t->nbytes : 1);
        void **o = realloc(s->owned, (size_t)(s->n_owned + 1) * sizeof *o);
        if (o) s->owned = o;
        if (!p || !o) {
            free(p);
            return cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        }
        s->owned[s->n_owned++] = p;
        /* llama.cpp's permutation: out row h*E + 2i + j = in row h*E + j*E/2 + i */
        size_t es = src == GGUF_TT_F32 ? 4 : 2, row = (size_t)(cols ? cols : 1) * es;
        for (int h = 0; h < perm_heads; h++)
            for (int64_t i = 0; i < head_dim / 2; i++)
                for (int j = 0; j < 2; j++)
                    memcpy((char *)p + (size_t)(h * head_dim + 2 * i + j) * row,
                           (const char *)t->data + (size_t)(h * head_dim + j * (head_dim / 2) + i) * row, row);
        data = p;
    }
    int64_t ne[2] = {cols ? cols : rows, rows};
    return gguf_writer_add_tensor_ref(w, gg, dst, cols ? 2 : 1, ne, src, data, err);
}

int cm_convert_mole_hf(const char *dir, const char *out_path, int out_type, cm_err *err) {
    mole_cv s = {0};
    gguf_writer *w = NULL;
    char path[PATH_MAX], tok[PATH_MAX], tcfg[PATH_MAX];
    int rc;
    json_error_t je;
    if ((rc = join(path, dir, "config.json", err))) return rc;
    s.cfg = json_load_file(path, 0, &je);
    if (!s.cfg) return cm_err_set(err, CM_E_FORMAT, "convert: %s: %s", path, je.text);
    int D = 0, L = 0, F = 0, H = 0, HK = 0, ctx = 0, V = 0, hd = 0;
    if ((rc = cfg_i(s.cfg, "hidden_size", -1, 1, 1 << 16, &D, err)) ||
        (rc = cfg_i(s.cfg, "num_hidden_layers", -1, 1, 4096, &L, err)) ||
        (rc = cfg_i(s.cfg, "intermediate_size", -1, 1, 1 << 20, &F, err)) ||
        (rc = cfg_i(s.cfg, "num_attention_heads", -1, 1, 4096, &H, err)) ||
        (rc = cfg_i(s.cfg, "num_key_value_heads", H, 1, H, &HK, err)) ||
        (rc = cfg_i(s.cfg, "max_position_embeddings", 4096, 1, 1 << 24, &ctx, err)) ||
        (rc = cfg_i(s.cfg, "vocab_size", -1, 1, 1 << 24, &V, err)))
        goto done;
    if (H % HK || (!json_object_get(s.cfg, "head_dim") && D % H)) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: inconsistent head counts");
        goto done;
    }
    if ((rc = cfg_i(s.cfg, "head_dim", D / H, 2, 4096, &hd, err))) goto done;
    if (hd % 2) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: head_dim %d is odd", hd);
        goto done;
    }
    json_t *ev = json_object_get(s.cfg, "rms_norm_eps"), *tv = json_object_get(s.cfg, "rope_theta");
    double eps = json_is_number(ev) ? json_number_value(ev) : 1e-6, theta = json_is_number(tv) ? json_number_value(tv) : 1e4;
    if (!(eps > 0 && eps < 1 && theta > 1 && theta < 1e12)) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: rms_norm_eps or rope_theta out of range");
        goto done;
    }
    int tied = json_is_true(json_object_get(s.cfg, "tie_word_embeddings"));

    /* weights: one file, or the shards an index names */
    if ((rc = join(path, dir, "model.safetensors.index.json", err))) goto done;
    s.sh = calloc(CM_MAX_SHARDS_MOLE, sizeof *s.sh);
    if (!s.sh) {
        rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        goto done;
    }
    if (exists(path)) {
        s.index = json_load_file(path, 0, &je);
        json_t *wm = s.index ? json_object_get(s.index, "weight_map") : NULL;
        if (!json_is_object(wm)) {
            rc = cm_err_set(err, CM_E_FORMAT, "convert: %s: no weight_map", path);
            goto done;
        }
        const char *k;
        json_t *v;
        const char *seen[CM_MAX_SHARDS_MOLE];
        json_object_foreach(wm, k, v) {
            const char *f = json_string_value(v);
            if (!f || strchr(f, '/') || !strcmp(f, "..") || !*f) {
                rc = cm_err_set(err, CM_E_FORMAT, "convert: weight_map[\"%.64s\"] is not a plain file name", k);
                goto done;
            }
            int dup = 0;
            for (int i = 0; i < s.n_sh && !dup; i++) dup = !strcmp(seen[i], f);
            if (dup) continue;
            if (s.n_sh == CM_MAX_SHARDS_MOLE) {
                rc = cm_err_set(err, CM_E_FORMAT, "convert: too many shards");
                goto done;
            }
            if ((rc = join(path, dir, f, err)) || (rc = st_open(&s.sh[s.n_sh], path, err))) goto done;
            seen[s.n_sh++] = f;
        }
    } else {
        if ((rc = join(path, dir, "model.safetensors", err))) goto done;
        if ((rc = st_open(&s.sh[0], path, err))) goto done;
        s.n_sh = 1;
    }

    /* adapters: count from layer 0's gate_proj, ranks from lora_A */
    int n_ad = 0, ranks[CM_MOLE_MAX_ADAPTERS];
    char hf[256], gg[128];
    for (;; n_ad++) {
        snprintf(hf, sizeof hf, "model.layers.0.mlp_moe.gate_proj.experts.%d.lora_A.weight", n_ad);
        const st_tensor *t = find(&s, hf);
        if (!t) break;
        if (n_ad == CM_MOLE_MAX_ADAPTERS) {
            rc = cm_err_set(err, CM_E_UNSUPPORTED, "convert: more than %d experts", CM_MOLE_MAX_ADAPTERS);
            goto done;
        }
        if (t->n_dims != 2 || t->shape[0] < 1 || t->shape[0] > 8192) {
            rc = cm_err_set(err, CM_E_FORMAT, "convert: %s: bad LoRA shape", hf);
            goto done;
        }
        ranks[n_ad] = (int)t->shape[0];
    }
    if (n_ad == 0) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: a MoE (MoLE) checkpoint without mlp_moe...experts.0.lora_A tensors");
        goto done;
    }
    char names[CM_MOLE_MAX_ADAPTERS][CM_LANG_NAME_MAX + 1];
    json_t *jn = json_object_get(s.cfg, "adapter_names");
    if (!jn) jn = json_object_get(s.cfg, "languages");
    json_t *ja = json_object_get(s.cfg, "lora_alphas");
    if (jn && (!json_is_array(jn) || (int)json_array_size(jn) != n_ad)) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: adapter names must be an array of %d strings", n_ad);
        goto done;
    }
    if (ja && (!json_is_array(ja) || (int)json_array_size(ja) != n_ad)) {
        rc = cm_err_set(err, CM_E_FORMAT, "convert: config.json: lora_alphas must be an array of %d numbers", n_ad);
        goto done;
    }
    const char *np[CM_MOLE_MAX_ADAPTERS];
    int32_t r32[CM_MOLE_MAX_ADAPTERS];
    float alphas[CM_MOLE_MAX_ADAPTERS];
    int shared = -1, other = -1;
    for (int j = 0; j < n_ad; j++) {
        const char *nm = jn ? json_string_value(json_array_get(jn, (size_t)j)) : n_ad == 10 ? default_names[j] : NULL;
        char tmp[16];
        if (!nm) snprintf(tmp, sizeof tmp, "e%d", j), nm = tmp;
        if (!cm_lang_normalize(nm, strlen(nm), names[j])) {
            rc = cm_err_set(err, CM_E_FORMAT, "convert: adapter name %d is not a valid name", j);
            goto done;
        }
        np[j] = names[j];
        r32[j] = ranks[j];
        if (!strcmp(names[j], "shared")) shared = j;
        if (!strcmp(names[j], "other")) other = j;
        json_t *a = ja ? json_array_get(ja, (size_t)j) : NULL;
        alphas[j] = a ? (float)json_number_value(a) : (j == shared || j == other) ? 32.0f : 16.0f;
    }

    w = gguf_writer_create(err);
    if (!w) {
        rc = CM_E_NOMEM;
        goto done;
    }
    const char *base = strrchr(dir, '/');
    int bad = gguf_writer_set_str(w, "general.architecture", "mole") |
              gguf_writer_set_str(w, "general.name", base && base[1] ? base + 1 : dir) |
              gguf_writer_set_u32(w, "mole.context_length", (uint32_t)ctx) |
              gguf_writer_set_u32(w, "mole.embedding_length", (uint32_t)D) |
              gguf_writer_set_u32(w, "mole.block_count", (uint32_t)L) |
              gguf_writer_set_u32(w, "mole.feed_forward_length", (uint32_t)F) |
              gguf_writer_set_u32(w, "mole.attention.head_count", (uint32_t)H) |
              gguf_writer_set_u32(w, "mole.attention.head_count_kv", (uint32_t)HK) |
              gguf_writer_set_f32(w, "mole.attention.layer_norm_rms_epsilon", (float)eps) |
              gguf_writer_set_f32(w, "mole.rope.freq_base", (float)theta) |
              gguf_writer_set_u32(w, "mole.rope.dimension_count", (uint32_t)hd) |
              gguf_writer_set_str(w, "mole.rope.type", "normal") |
              gguf_writer_set_arr_str(w, "mole.adapter.names", np, (uint64_t)n_ad) |
              gguf_writer_set_arr_i32(w, "mole.adapter.ranks", r32, (uint64_t)n_ad) |
              gguf_writer_set_arr_f32(w, "mole.adapter.alphas", alphas, (uint64_t)n_ad) |
              gguf_writer_set_i32(w, "mole.adapter.shared", shared) |
              gguf_writer_set_i32(w, "mole.adapter.fallback", other);
    if (hd * H != D)
        bad |= gguf_writer_set_u32(w, "mole.attention.key_length", (uint32_t)hd) |
               gguf_writer_set_u32(w, "mole.attention.value_length", (uint32_t)hd);
    if (bad) {
        rc = cm_err_set(err, CM_E_NOMEM, "convert: out of memory");
        goto done;
    }
    int64_t Q = (int64_t)H * hd, K = (int64_t)HK * hd;
    if ((rc = put(&s, w, "model.embed_tokens.weight", "token_embd.weight", V, D, out_type, 0, 0, 0, err)) ||
        (rc = put(&s, w, "model.norm.weight", "output_norm.weight", D, 0, out_type, 0, 0, 0, err)) ||
        (!tied && (rc = put(&s, w, "lm_head.weight", "output.weight", V, D, out_type, 0, 0, 0, err))))
        goto done;
    static const char *proj[3] = {"gate", "up", "down"};
    for (int l = 0; l < L; l++) {
        struct { const char *hf, *gg; int64_t r, c; int perm, opt; } t[] = {
            {"input_layernorm.weight", "attn_norm.weight", D, 0, 0, 0},
            {"self_attn.q_proj.weight", "attn_q.weight", Q, D, H, 0},
            {"self_attn.k_proj.weight", "attn_k.weight", K, D, HK, 0},
            {"self_attn.v_proj.weight", "attn_v.weight", K, D, 0, 0},
            {"self_attn.o_proj.weight", "attn_output.weight", D, Q, 0, 0},
            {"self_attn.q_proj.bias", "attn_q.bias", Q, 0, H, 1},
            {"self_attn.k_proj.bias", "attn_k.bias", K, 0, HK, 1},
            {"self_attn.v_proj.bias", "attn_v.bias", K, 0, 0, 1},
            {"post_attention_layernorm.weight", "ffn_norm.weight", D, 0, 0, 0},
        };
        for (size_t k = 0; k < sizeof t / sizeof t[0]; k++) {
            snprintf(hf, sizeof hf, "model.layers.%d.%s", l, t[k].hf);
            snprintf(gg, sizeof gg, "blk.%d.%s", l, t[k].gg);
            if ((rc = put(&s, w, hf, gg, t[k].r, t[k].c, out_type, t[k].perm, hd, t[k].opt, err))) goto done;
        }
        for (int p = 0; p < 3; p++) {
            int64_t din = p == 2 ? F : D, dout = p == 2 ? D : F;
            snprintf(hf, sizeof hf, "model.layers.%d.mlp_moe.%s_proj.shared_linear.weight", l, proj[p]);
            snprintf(gg, sizeof gg, "blk.%d.ffn_%s.weight", l, proj[p]);
            if ((rc = put(&s, w, hf, gg, dout, din, out_type, 0, 0, 0, err))) goto done;
            for (int j = 0; j < n_ad; j++) {
                int lora_type = out_type == GGUF_TT_Q8_0 ? -1 : out_type; /* never quantised */
                snprintf(hf, sizeof hf, "model.layers.%d.mlp_moe.%s_proj.experts.%d.lora_A.weight", l, proj[p], j);
                snprintf(gg, sizeof gg, "blk.%d.ffn_%s.lora_a.%.24s", l, proj[p], names[j]);
                if ((rc = put(&s, w, hf, gg, ranks[j], din, lora_type, 0, 0, 0, err))) goto done;
                snprintf(hf, sizeof hf, "model.layers.%d.mlp_moe.%s_proj.experts.%d.lora_B.weight", l, proj[p], j);
                snprintf(gg, sizeof gg, "blk.%d.ffn_%s.lora_b.%.24s", l, proj[p], names[j]);
                if ((rc = put(&s, w, hf, gg, dout, ranks[j], lora_type, 0, 0, 0, err))) goto done;
            }
        }
    }
    if ((rc = join(tok, dir, "tokenizer.json", err)) || (rc = join(tcfg, dir, "tokenizer_config.json", err))) goto done;
    if ((rc = cm_convert_tokenizer_json(tok, exists(tcfg) ? tcfg : NULL, w, V, err))) goto done;
    rc = gguf_writer_write(w, out_path, err);
done:
    gguf_writer_free(w);
    for (int i = 0; i < s.n_sh; i++) st_close(&s.sh[i]);
    free(s.sh);
    for (int i = 0; i < s.n_owned; i++) free(s.owned[i]);
    free(s.owned);
    json_decref(s.cfg);
    json_decref(s.index);
    return rc < 0 ? rc : CM_OK;
}
