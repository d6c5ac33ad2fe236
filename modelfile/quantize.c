/*
 * quantize.c - `codemoe quantize`: an F32/F16/BF16 GGUF to one of llama-quantize's presets, writing the
 * same bytes llama-quantize writes for the same input without an importance matrix. Three parts, in the
 * order a tensor meets them:
 *   1. the type policy: which type each tensor gets for a preset (cm_quant_plan), and the tensor order;
 *   2. the row quantisers: ggml's reference algorithm for each block type (cm_quantize_row), including the
 *      K-quants' scale searches. Their float expressions keep ggml's operation order, because a different
 *      rounding anywhere flips a search decision and changes bytes;
 *   3. the file: every input key in order, general.quantization_version and general.file_type moved to the
 *      end, split keys dropped; tensor data converted row by row by the GGUF writer.
 * The formats themselves (block layouts) are engine/quants.h's.
 */
#include "quantize.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "codemoe_modelfile.h"
#include "gguf.h"
#include "gguf_writer.h"
#include "quants.h"
#include "util.h"

#define QNT_VERSION 2 /* general.quantization_version: ggml's block formats as of 2023 */

/* ============================================================ 1. presets and the type policy */

/* llama_ftype values (llama.h). */
enum {
    FT_Q4_0 = 2, FT_Q4_1 = 3, FT_Q8_0 = 7, FT_Q5_0 = 8, FT_Q5_1 = 9, FT_Q2_K = 10, FT_Q3_K_S = 11,
    FT_Q3_K_M = 12, FT_Q3_K_L = 13, FT_Q4_K_S = 14, FT_Q4_K_M = 15, FT_Q5_K_S = 16, FT_Q5_K_M = 17,
    FT_Q6_K = 18,
};

static const cm_quant_preset presets[] = {
    {"Q4_0", FT_Q4_0, GGUF_TT_Q4_0},     {"Q4_1", FT_Q4_1, GGUF_TT_Q4_1},
    {"Q5_0", FT_Q5_0, GGUF_TT_Q5_0},     {"Q5_1", FT_Q5_1, GGUF_TT_Q5_1},
    {"Q2_K", FT_Q2_K, GGUF_TT_Q2_K},     {"Q3_K_S", FT_Q3_K_S, GGUF_TT_Q3_K},
    {"Q3_K_M", FT_Q3_K_M, GGUF_TT_Q3_K}, {"Q3_K_L", FT_Q3_K_L, GGUF_TT_Q3_K},
    {"Q4_K_S", FT_Q4_K_S, GGUF_TT_Q4_K}, {"Q4_K_M", FT_Q4_K_M, GGUF_TT_Q4_K},
    {"Q5_K_S", FT_Q5_K_S, GGUF_TT_Q5_K}, {"Q5_K_M", FT_Q5_K_M, GGUF_TT_Q5_K},
    {"Q6_K", FT_Q6_K, GGUF_TT_Q6_K},     {"Q8_0", FT_Q8_0, GGUF_TT_Q8_0},
};
#define N_PRESETS (sizeof presets / sizeof presets[0])

const cm_quant_preset *cm_quant_presets(size_t *n) {
    *n = N_PRESETS;
    return presets;
}

const cm_quant_preset *cm_quant_preset_find(const char *name) {
    static const char *const alias[][2] = {{"Q3_K", "Q3_K_M"}, {"Q4_K", "Q4_K_M"}, {"Q5_K", "Q5_K_M"}};
    if (!name) return NULL;
    for (size_t i = 0; i < sizeof alias / sizeof alias[0]; i++)
        if (!strcasecmp(name, alias[i][0])) name = alias[i][1];
    for (size_t i = 0; i < N_PRESETS; i++)
        if (!strcasecmp(name, presets[i].name)) return &presets[i];
    return NULL;
}

/* The layer of a "blk.N." name, -1 for others (what sscanf("blk.%d.") leaves). */
static int name_layer(const char *name) {
    int layer = -1;
    if (sscanf(name, "blk.%d.", &layer) != 1) return -1;
    return layer;
}

static int cmp_tensor(const void *pa, const void *pb) {
    const cm_quant_tensor *a = pa, *b = pb;
    int la = name_layer(a->name), lb = name_layer(b->name);
    if (la != lb) return la < lb ? -1 : 1;
    return strcmp(a->name, b->name); /* strcmp compares as unsigned char, as std::string does */
}

void cm_quant_sort(cm_quant_tensor *t, size_t n) { qsort(t, n, sizeof *t, cmp_tensor); }

static int contains(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

/* llama-quantize quantises only 2-D and 3-D "...weight" tensors, and among those not norms, routers,
 * positional tables and a list of small special tensors of other architectures. The hybrid's segment
 * router (ffn_gate_inp_seg, a name llama.cpp does not know) stays unquantised like the token router. */
static int allows_quantization(const cm_quant_tensor *t) {
    static const char *const keep[] = {
        "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_seg.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
        "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
        "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
        "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
        "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
        "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
        "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    };
    if (t->n_dims < 2) return 0;
    /* "ends with weight" as llama-quantize tests it: the last "weight" starts 6 before the end. For a
     * name shorter than 6 with no "weight" both sides are npos, which counts as a match there. */
    size_t len = strlen(t->name), last = SIZE_MAX;
    for (const char *p = t->name; (p = strstr(p, "weight")) != NULL; p++) last = (size_t)(p - t->name);
    if (last != len - 6) return 0;
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++)
        if (contains(t->name, keep[i])) return 0;
    if (!strcmp(t->name, "position_embd.weight") || !strcmp(t->name, "token_types.weight")) return 0;
    return 1;
}

enum cat { C_TOKEN_EMBD, C_ATTN_Q, C_ATTN_V, C_ATTN_K, C_ATTN_QKV, C_ATTN_KV_B, C_ATTN_OUT, C_FFN_UP,
           C_FFN_GATE, C_FFN_DOWN, C_OUTPUT, C_OTHER };

static enum cat category(const char *name) {
    if (!strcmp(name, "output.weight")) return C_OUTPUT;
    if (!strcmp(name, "token_embd.weight") || !strcmp(name, "per_layer_token_embd.weight")) return C_TOKEN_EMBD;
    if (contains(name, "attn_qkv.weight")) return C_ATTN_QKV;
    if (contains(name, "attn_kv_b.weight")) return C_ATTN_KV_B;
    if (contains(name, "attn_v.weight")) return C_ATTN_V;
    if (contains(name, "attn_k.weight")) return C_ATTN_K;
    if (contains(name, "attn_q.weight")) return C_ATTN_Q;
    if (contains(name, "attn_output.weight")) return C_ATTN_OUT;
    if (contains(name, "ffn_up")) return C_FFN_UP;
    if (contains(name, "ffn_gate")) return C_FFN_GATE;
    if (contains(name, "ffn_down")) return C_FFN_DOWN;
    return C_OTHER;
}

/* attn_v-like tensors are the most sensitive to quantisation and share one counter. */
static int is_attn_v(enum cat c) { return c == C_ATTN_V || c == C_ATTN_QKV || c == C_ATTN_KV_B; }

/* The first and last eighth of the layers, and every third one between, get more bits. */
static int use_more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

typedef struct plan_state {
    const cm_quant_hparams *hp;
    int ftype;
    int falcon, is_70b, n_gqa;
    int tied;             /* no output.weight: the token embedding doubles as the output */
    int n_attn_v, i_attn_v, i_ffn_down, i_ffn_gate, i_ffn_up;
} plan_state;

/* The layer a feed-forward tensor belongs to: its position among its kind, or for mixtures of experts
 * (whose expert tensors need not be consecutive) the N of its "blk.N." name. */
static int ffn_layer(const plan_state *s, int counter, const char *name, int *layer, cm_err *err) {
    *layer = counter;
    if (s->hp->n_expert > 1) {
        if (sscanf(name, "blk.%d.", layer) != 1)
            return cm_err_set(err, CM_E_FORMAT, "quantize: cannot tell the layer of tensor %s", name);
        if (*layer < 0 || *layer >= s->hp->n_layer)
            return cm_err_set(err, CM_E_FORMAT, "quantize: tensor %s: layer %d outside [0, %d)", name, *layer,
                              s->hp->n_layer);
    }
    return CM_OK;
}

/* The preset's mixture: the type for tensor t before the row-length fallback. */
static int mixture_type(plan_state *s, const cm_quant_tensor *t, int type, cm_err *err) {
    const int ft = s->ftype;
    const enum cat c = category(t->name);
    int layer, rc;
    if (c == C_OUTPUT || (s->tied && c == C_TOKEN_EMBD)) {
        if (s->falcon || t->ne[0] % gguf_block_size(type) != 0) return GGUF_TT_Q8_0;
        return type != GGUF_TT_Q8_0 ? GGUF_TT_Q6_K : type;
    }
    if (c == C_TOKEN_EMBD) return type;
    if (is_attn_v(c)) {
        if (ft == FT_Q2_K) type = s->n_gqa >= 4 ? GGUF_TT_Q4_K : GGUF_TT_Q3_K;
        else if (ft == FT_Q3_K_M) type = s->i_attn_v < 2 ? GGUF_TT_Q5_K : GGUF_TT_Q4_K;
        else if (ft == FT_Q3_K_L) type = GGUF_TT_Q5_K;
        else if ((ft == FT_Q4_K_M || ft == FT_Q5_K_M) && use_more_bits(s->i_attn_v, s->n_attn_v)) type = GGUF_TT_Q6_K;
        else if (ft == FT_Q4_K_S && s->i_attn_v < 4) type = GGUF_TT_Q5_K;
        /* a 70B model shares each attn_v among 8 heads: it is small, so more bits cost little */
        if (s->is_70b && (type == GGUF_TT_Q3_K || type == GGUF_TT_Q4_K)) type = GGUF_TT_Q5_K;
        if (s->hp->n_expert == 8) type = GGUF_TT_Q8_0;
        s->i_attn_v++;
        return type;
    }
    switch (c) {
    case C_ATTN_K:
        return s->hp->n_expert == 8 ? GGUF_TT_Q8_0 : type;
    case C_FFN_DOWN: {
        if ((rc = ffn_layer(s, s->i_ffn_down, t->name, &layer, err))) return rc;
        const int n = s->hp->n_layer;
        if (ft == FT_Q2_K) type = GGUF_TT_Q3_K;
        else if (ft == FT_Q3_K_M)
            type = layer < n / 16 ? GGUF_TT_Q5_K
                 : !s->falcon || use_more_bits(layer, n) ? GGUF_TT_Q4_K : GGUF_TT_Q3_K;
        else if (ft == FT_Q3_K_L) type = s->falcon ? GGUF_TT_Q4_K : GGUF_TT_Q5_K;
        else if (ft == FT_Q4_K_M) {
            if (s->falcon)
                type = layer < n / 16 ? GGUF_TT_Q6_K : use_more_bits(layer, n) ? GGUF_TT_Q5_K : GGUF_TT_Q4_K;
            else if (use_more_bits(layer, n))
                type = GGUF_TT_Q6_K;
        } else if (ft == FT_Q5_K_M && use_more_bits(layer, n)) type = GGUF_TT_Q6_K;
        else if (ft == FT_Q4_K_S && !s->falcon && layer < n / 8) type = GGUF_TT_Q5_K;
        s->i_ffn_down++;
        return type;
    }
    case C_ATTN_OUT:
        if (s->falcon) return ft == FT_Q3_K_L ? GGUF_TT_Q4_K : type;
        if (s->hp->n_expert == 8) {
            if (ft == FT_Q2_K || ft == FT_Q3_K_S || ft == FT_Q3_K_M || ft == FT_Q4_K_S || ft == FT_Q4_K_M)
                type = GGUF_TT_Q5_K;
        } else if (ft == FT_Q2_K) type = GGUF_TT_Q3_K;
        else if (ft == FT_Q3_K_M) type = GGUF_TT_Q4_K;
        else if (ft == FT_Q3_K_L) type = GGUF_TT_Q5_K;
        return type;
    case C_FFN_GATE:
        /* no preset here changes gate/up, but an expert tensor without a layer is still an error */
        if ((rc = ffn_layer(s, s->i_ffn_gate, t->name, &layer, err))) return rc;
        s->i_ffn_gate++;
        return type;
    case C_FFN_UP:
        if ((rc = ffn_layer(s, s->i_ffn_up, t->name, &layer, err))) return rc;
        s->i_ffn_up++;
        return type;
    default:
        return type;
    }
}

/* A row length the chosen block does not divide: K-quants fall back to a legacy type of 32, and that
 * failing too, to F16; legacy types have no fallback. */
static int row_fallback(const cm_quant_tensor *t, int type, cm_err *err) {
    if (t->ne[0] % gguf_block_size(type) == 0) return type;
    int fb;
    switch (type) {
    case GGUF_TT_Q2_K: case GGUF_TT_Q3_K: fb = GGUF_TT_Q4_0; break;
    case GGUF_TT_Q4_K: fb = GGUF_TT_Q5_0; break;
    case GGUF_TT_Q5_K: fb = GGUF_TT_Q5_1; break;
    case GGUF_TT_Q6_K: fb = GGUF_TT_Q8_0; break;
    default:
        return cm_err_set(err, CM_E_UNSUPPORTED,
                          "quantize: tensor %s: row length %lld is not a multiple of %d, and %s has no fallback type",
                          t->name, (long long)t->ne[0], gguf_block_size(type), gguf_ttype_name(type));
    }
    return t->ne[0] % gguf_block_size(fb) == 0 ? fb : GGUF_TT_F16;
}

int cm_quant_plan(const cm_quant_hparams *hp, const cm_quant_preset *p, cm_quant_tensor *t, size_t n,
                  cm_err *err) {
    plan_state s = {.hp = hp, .ftype = p->ftype, .tied = 1};
    s.falcon = !strcmp(hp->arch, "falcon");
    s.n_gqa = hp->n_head_kv > 0 ? hp->n_head / hp->n_head_kv : 0;
    /* the architectures whose 80-layer size llama.cpp names 70B (llama's 80-layer MHA model is 65B) */
    s.is_70b = hp->n_layer == 80 && ((!strcmp(hp->arch, "llama") && hp->n_expert != 8 && hp->n_head != hp->n_head_kv) ||
                                     !strcmp(hp->arch, "qwen2") || !strcmp(hp->arch, "deci") ||
                                     !strcmp(hp->arch, "olmo"));
    for (size_t i = 0; i < n; i++) {
        enum cat c = category(t[i].name);
        if (is_attn_v(c)) s.n_attn_v++;
        if (c == C_OUTPUT) s.tied = 0;
    }
    for (size_t i = 0; i < n; i++) {
        t[i].target = t[i].type;
        if (!allows_quantization(&t[i])) continue;
        int type = mixture_type(&s, &t[i], p->type, err);
        if (type < 0) return type;
        type = row_fallback(&t[i], type, err);
        if (type < 0) return type;
        t[i].target = type;
    }
    return CM_OK;
}

/* ============================================================ 2. row quantisers */

#define GROUP_MAX_EPS 1e-15f /* below this a group is all zeros */

/* Round half to even, exactly as ggml's nearest_int: adding 1.5 * 2^23 leaves the rounded integer in the
 * low mantissa bits (|f| < 2^22). */
static inline int nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

static void put_f16(uint16_t *dst, float f) { *dst = cm_f32_to_fp16(f); }

/* The start of both symmetric searches: the values at -nmax/max (max: the largest-magnitude value, its
 * sign kept), clamped to [-nmax, nmax) into L, and their x^2-weighted sums. Returns 0 (L zeroed) for a
 * group of zeros. */
static int sym_start(int n, int nmax, const float *x, int8_t *L, float *max_out, float *sumlx, float *suml2) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0;
    }
    float iscale = -nmax / max;
    *sumlx = *suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        *sumlx += w * x[i] * l;
        *suml2 += w * l * l;
    }
    *max_out = max;
    return 1;
}

/* Symmetric n values -> L in [0, 2*nmax), weights x^2, with ggml's search over 19 scales around
 * -nmax/max (make_qx_quants, rmse_type 1, no importance). Returns the scale. */
static float qx_quants(int n, int nmax, const float *x, int8_t *L) {
    float max, sumlx, suml2;
    if (!sym_start(n, nmax, x, L, &max, &sumlx, &suml2)) return 0.f;
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        float iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i]))));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's sub-block search (make_q3_quants with rmse): start from -nmax/max, then up to 5 passes that move
 * single values when that raises sumlx^2/suml2 (weights x^2). L in [0, 2*nmax). Returns the scale. */
static float q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float max, sumlx, suml2;
    if (!sym_start(n, nmax, x, L, &max, &sumlx, &suml2)) return 0.f;
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int nl = imax(-nmax, imin(nmax - 1, nearest_int(x[i] * sl2 / slx)));
                if (nl != L[i]) {
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Asymmetric n values x ~ scale * L - min with L in [0, nmax] (make_qkx2_quants): the plain min/max fit,
 * then nstep+1 trial scales (rmin + rdelta*is + nmax)/(max - min), each refit by weighted least squares,
 * kept when its weighted error (absolute when use_mad, else squared) is lower. Returns the scale;
 * *the_min receives -min (>= 0). */
static float qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                         uint8_t *Laux, float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* ------------------------------------------------------------ legacy blocks of 32 */

/* Largest-magnitude value, its sign kept (the first of equals; 0 when all are 0): Q4_0/Q5_0 map it to
 * -8/-16, the end with one more level; Q3_K/Q6_K scale their sub-block scales by it. */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    return max;
}

static void q4_0_row(const float *x, cm_block_q4_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK4; b++, x += CM_QK4) {
        const float d = signed_absmax(x, CM_QK4) / -8;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(&y[b].d, d);
        for (int j = 0; j < CM_QK4 / 2; j++) {
            int lo = imin(15, (int)(x[j] * id + 8.5f)), hi = imin(15, (int)(x[j + 16] * id + 8.5f));
            y[b].qs[j] = (uint8_t)(lo | hi << 4);
        }
    }
}

/* The start of an offset block (Q4_1, Q5_1): d = (max - min) / levels and m = min, both stored as fp16.
 * Returns 1/d (0 for a flat block); *mn receives the unrounded min the values are measured from. */
static float offset_block(const float *x, float levels, uint16_t *d_out, uint16_t *m_out, float *mn) {
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < CM_QK4; j++) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    const float d = (hi - lo) / levels;
    put_f16(d_out, d);
    put_f16(m_out, lo);
    *mn = lo;
    return d ? 1.0f / d : 0.0f;
}

static void q4_1_row(const float *x, cm_block_q4_1 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK4; b++, x += CM_QK4) {
        float mn;
        const float id = offset_block(x, 15, &y[b].d, &y[b].m, &mn);
        for (int j = 0; j < CM_QK4 / 2; j++) {
            int lo = imin(15, (int)((x[j] - mn) * id + 0.5f)), hi = imin(15, (int)((x[j + 16] - mn) * id + 0.5f));
            y[b].qs[j] = (uint8_t)(lo | hi << 4);
        }
    }
}

/* 5-bit values q[32] -> low nibbles (value j and j + 16 share byte j) and the fifth bits in qh. */
static void pack_q5(const int *q, uint8_t *qs, uint8_t qh_out[4]) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0xF) | (q[j + 16] & 0xF) << 4);
        qh |= (uint32_t)((q[j] >> 4) & 1) << j;
        qh |= (uint32_t)((q[j + 16] >> 4) & 1) << (j + 16);
    }
    memcpy(qh_out, &qh, 4);
}

static void q5_0_row(const float *x, cm_block_q5_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK4; b++, x += CM_QK4) {
        const float d = signed_absmax(x, CM_QK4) / -16;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(&y[b].d, d);
        int q[CM_QK4];
        for (int j = 0; j < CM_QK4; j++) q[j] = imin(31, (int)(x[j] * id + 16.5f));
        pack_q5(q, y[b].qs, y[b].qh);
    }
}

static void q5_1_row(const float *x, cm_block_q5_1 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK4; b++, x += CM_QK4) {
        float mn;
        const float id = offset_block(x, 31, &y[b].d, &y[b].m, &mn);
        int q[CM_QK4];
        for (int j = 0; j < CM_QK4; j++) q[j] = (int)((x[j] - mn) * id + 0.5f);
        pack_q5(q, y[b].qs, y[b].qh);
    }
}

/* Q8_0 for files rounds half away from zero (roundf), unlike the engine's activation quantiser. */
static void q8_0_row(const float *x, cm_block_q8_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK8_0; b++, x += CM_QK8_0) {
        float amax = 0;
        for (int j = 0; j < CM_QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_f16(&y[b].d, d);
        for (int j = 0; j < CM_QK8_0; j++) y[b].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* ------------------------------------------------------------ K-quant super-blocks of 256 */

/* 2-bit values L[256] -> qs[64]: value 128*h + 32*s + l at bits 2s of qs[32*h + l] (Q2_K, Q3_K). */
static void pack_crumbs(const int8_t *L, uint8_t *qs) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const int8_t *v = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)(v[0] | v[32] << 2 | v[64] << 4 | v[96] << 6);
        }
}

static void q2_k_row(const float *x, cm_block_q2_k *y, int64_t k) {
    uint8_t L[CM_QK_K], Laux[16];
    float weights[16], mins[16], scales[16];
    for (int64_t b = 0; b < k / CM_QK_K; b++, x += CM_QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; j++) {
            for (int l = 0; l < 16; l++) weights[l] = fabsf(x[16 * j + l]);
            scales[j] = qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        /* sub-block scales and mins as 4-bit multiples of max/15 */
        if (max_scale > 0) {
            float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; j++) y[b].scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
            put_f16(&y[b].d, max_scale / 15.f);
        } else {
            memset(y[b].scales, 0, 16);
            put_f16(&y[b].d, 0.f);
        }
        if (max_min > 0) {
            float iscale = 15.f / max_min;
            for (int j = 0; j < 16; j++) y[b].scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            put_f16(&y[b].dmin, max_min / 15.f);
        } else {
            put_f16(&y[b].dmin, 0.f);
        }
        /* requantise each value against the stored (rounded) scale and min */
        for (int j = 0; j < 16; j++) {
            const float d = cm_fp16_to_f32(y[b].d) * (y[b].scales[j] & 0xF);
            if (!d) continue;
            const float dm = cm_fp16_to_f32(y[b].dmin) * (y[b].scales[j] >> 4);
            for (int i = 0; i < 16; i++)
                L[16 * j + i] = (uint8_t)imax(0, imin(3, nearest_int((x[16 * j + i] + dm) / d)));
        }
        pack_crumbs((const int8_t *)L, y[b].qs);
    }
}

static void q3_k_row(const float *x, cm_block_q3_k *y, int64_t k) {
    int8_t L[CM_QK_K];
    float scales[16];
    for (int64_t b = 0; b < k / CM_QK_K; b++, x += CM_QK_K) {
        for (int j = 0; j < 16; j++) scales[j] = q3_quants(16, 4, x + 16 * j, L + 16 * j);
        const float max_scale = signed_absmax(scales, 16);
        memset(y[b].scales, 0, 12);
        if (max_scale) {
            /* 6-bit signed scales, the largest-magnitude one at -32 */
            float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; j++) {
                int l = imax(-32, imin(31, (int8_t)nearest_int(iscale * scales[j]))) + 32;
                if (j < 8) y[b].scales[j] = (uint8_t)(l & 0xF);
                else y[b].scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
                y[b].scales[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
            }
            put_f16(&y[b].d, 1 / iscale);
        } else {
            put_f16(&y[b].d, 0.f);
        }
        for (int j = 0; j < 16; j++) {
            int sc = j < 8 ? y[b].scales[j] & 0xF : y[b].scales[j - 8] >> 4;
            sc = (sc | ((y[b].scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) - 32;
            const float d = cm_fp16_to_f32(y[b].d) * sc;
            if (!d) continue;
            for (int i = 0; i < 16; i++)
                L[16 * j + i] = (int8_t)(imax(-4, imin(3, nearest_int(x[16 * j + i] / d))) + 4);
        }
        /* third bit of value j: bit j / 32 of hmask[j % 32] */
        memset(y[b].hmask, 0, sizeof y[b].hmask);
        for (int j = 0; j < CM_QK_K; j++)
            if (L[j] > 3) {
                y[b].hmask[j % 32] |= (uint8_t)(1 << (j / 32));
                L[j] -= 4;
            }
        pack_crumbs(L, y[b].qs);
    }
}

/* Q4_K/Q5_K: 8 sub-blocks of 32 fitted by qkx2_quants (weights: rms of the sub-block + |x|), then the
 * scales and mins stored as 6-bit multiples of max/63 and every value requantised against them.
 * L receives the values (0..nmax). */
static void k_scale_min_row(const float *x, int nmax, float rmin, int nstep, uint8_t *L, uint16_t *d_out,
                            uint16_t *dmin_out, uint8_t s12[12]) {
    uint8_t Laux[32];
    float weights[32], mins[8], scales[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]), lm = (uint8_t)nearest_int(inv_min * mins[j]);
        if (ls > 63) ls = 63;
        if (lm > 63) lm = 63;
        if (j < 4) {
            s12[j] = ls;
            s12[j + 4] = lm;
        } else {
            s12[j + 4] = (uint8_t)((ls & 0xF) | (lm & 0xF) << 4);
            s12[j - 4] |= (uint8_t)((ls >> 4) << 6);
            s12[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    put_f16(d_out, max_scale / 63.f);
    put_f16(dmin_out, max_min / 63.f);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        cm_q4k_scale_min(j, s12, &sc, &m);
        const float d = cm_fp16_to_f32(*d_out) * sc;
        if (!d) continue;
        const float dm = cm_fp16_to_f32(*dmin_out) * m;
        for (int i = 0; i < 32; i++)
            L[32 * j + i] = (uint8_t)imax(0, imin(nmax, nearest_int((x[32 * j + i] + dm) / d)));
    }
}

static void q4_k_row(const float *x, cm_block_q4_k *y, int64_t k) {
    uint8_t L[CM_QK_K];
    for (int64_t b = 0; b < k / CM_QK_K; b++, x += CM_QK_K) {
        k_scale_min_row(x, 15, -1.f, 20, L, &y[b].d, &y[b].dmin, y[b].scales);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) y[b].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | L[64 * c + 32 + l] << 4);
    }
}

static void q5_k_row(const float *x, cm_block_q5_k *y, int64_t k) {
    uint8_t L[CM_QK_K];
    for (int64_t b = 0; b < k / CM_QK_K; b++, x += CM_QK_K) {
        k_scale_min_row(x, 31, -0.5f, 15, L, &y[b].d, &y[b].dmin, y[b].scales);
        memset(y[b].qh, 0, sizeof y[b].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                if (lo > 15) { lo -= 16; y[b].qh[l] |= (uint8_t)(1 << (2 * c)); }
                if (hi > 15) { hi -= 16; y[b].qh[l] |= (uint8_t)(1 << (2 * c + 1)); }
                y[b].qs[32 * c + l] = (uint8_t)(lo | hi << 4);
            }
    }
}

static void q6_k_row(const float *x, cm_block_q6_k *y, int64_t k) {
    int8_t L[CM_QK_K];
    float scales[16];
    for (int64_t b = 0; b < k / CM_QK_K; b++, x += CM_QK_K) {
        for (int j = 0; j < 16; j++) scales[j] = qx_quants(16, 32, x + 16 * j, L + 16 * j);
        const float max_scale = signed_absmax(scales, 16);
        if (fabsf(max_scale) < GROUP_MAX_EPS) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        /* 8-bit signed scales, the largest-magnitude one at -128 (clamped to 127 on the other side) */
        float iscale = -128.f / max_scale;
        put_f16(&y[b].d, 1 / iscale);
        for (int j = 0; j < 16; j++) y[b].scales[j] = (int8_t)imin(127, nearest_int(iscale * scales[j]));
        for (int j = 0; j < 16; j++) {
            const float d = cm_fp16_to_f32(y[b].d) * y[b].scales[j];
            if (!d) continue;
            for (int i = 0; i < 16; i++)
                L[16 * j + i] = (int8_t)(imax(-32, imin(31, nearest_int(x[16 * j + i] / d))) + 32);
        }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const int8_t *v = L + 128 * h + l;
                y[b].ql[64 * h + l] = (uint8_t)((v[0] & 0xF) | (v[64] & 0xF) << 4);
                y[b].ql[64 * h + 32 + l] = (uint8_t)((v[32] & 0xF) | (v[96] & 0xF) << 4);
                y[b].qh[32 * h + l] = (uint8_t)(v[0] >> 4 | (v[32] >> 4) << 2 | (v[64] >> 4) << 4 | (v[96] >> 4) << 6);
            }
    }
}

int cm_quantize_type_ok(int type) { return type == GGUF_TT_Q8_0 || cm_quant_is_block_type(type); }

void cm_quantize_row(int type, const float *x, void *y, int64_t k) {
    switch (type) {
    case GGUF_TT_Q8_0: q8_0_row(x, y, k); break;
    case GGUF_TT_Q4_0: q4_0_row(x, y, k); break;
    case GGUF_TT_Q4_1: q4_1_row(x, y, k); break;
    case GGUF_TT_Q5_0: q5_0_row(x, y, k); break;
    case GGUF_TT_Q5_1: q5_1_row(x, y, k); break;
    case GGUF_TT_Q2_K: q2_k_row(x, y, k); break;
    case GGUF_TT_Q3_K: q3_k_row(x, y, k); break;
    case GGUF_TT_Q4_K: q4_k_row(x, y, k); break;
    case GGUF_TT_Q5_K: q5_k_row(x, y, k); break;
    case GGUF_TT_Q6_K: q6_k_row(x, y, k); break;
    default: break;
    }
}

/* ============================================================ 3. the file */

/* Copies one input key to w as llama-quantize's gguf_set_kv does: numbers and bools byte for byte,
 * strings up to their first NUL (it passes them on as C strings). */
static int copy_kv(gguf_writer *w, const gguf_kv *kv, const char *key) {
    if (kv->type != GGUF_VT_STRING && !(kv->type == GGUF_VT_ARRAY && kv->arr_type == GGUF_VT_STRING)) {
        if (kv->type == GGUF_VT_ARRAY) return gguf_writer_set_arr(w, key, kv->arr_type, kv->data, kv->n);
        return gguf_writer_set_scalar(w, key, kv->type, kv->data);
    }
    uint64_t n = kv->type == GGUF_VT_ARRAY ? kv->n : 1;
    char **s = calloc(n ? n : 1, sizeof *s);
    int rc = s ? CM_OK : CM_E_NOMEM;
    for (uint64_t i = 0; i < n && !rc; i++) {
        gguf_str v = gguf_arr_str(kv, i);
        size_t len = strnlen(v.ptr, v.len);
        if (!(s[i] = malloc(len + 1))) rc = CM_E_NOMEM;
        else { memcpy(s[i], v.ptr, len); s[i][len] = 0; }
    }
    if (!rc) rc = kv->type == GGUF_VT_ARRAY ? gguf_writer_set_arr_str(w, key, (const char *const *)s, n)
                                            : gguf_writer_set_str(w, key, s[0]);
    for (uint64_t i = 0; s && i < n; i++) free(s[i]);
    free(s);
    return rc;
}

static char *str_dup(gguf_str s) {
    char *p = malloc(s.len + 1);
    if (p) { memcpy(p, s.ptr, s.len); p[s.len] = 0; }
    return p;
}

/* <arch>.<suffix> as an integer: a scalar, or element 0 of a per-layer array. 1 when absent. */
static int arch_int(const gguf_file *g, const char *arch, const char *suffix, int *out, cm_err *err) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type == GGUF_VT_ARRAY) {
        if (kv->n == 0 || kv->arr_type == GGUF_VT_STRING || kv->arr_type == GGUF_VT_FLOAT32 ||
            kv->arr_type == GGUF_VT_FLOAT64)
            return cm_err_set(err, CM_E_FORMAT, "quantize: %s: expected integers", key);
        *out = (int)gguf_arr_int(kv, 0);
        return CM_OK;
    }
    uint32_t v;
    int rc = gguf_get_u32(g, key, &v, err);
    if (rc == CM_OK) *out = (int)v;
    return rc;
}

static int read_hparams(const gguf_file *g, cm_quant_hparams *hp, char **arch, cm_err *err) {
    gguf_str a;
    int rc = gguf_get_str(g, "general.architecture", &a, err);
    if (rc == 1) return cm_err_set(err, CM_E_FORMAT, "quantize: general.architecture missing");
    if (rc) return rc;
    if (!(*arch = str_dup(a))) return cm_err_set(err, CM_E_NOMEM, "quantize: out of memory");
    memset(hp, 0, sizeof *hp);
    hp->arch = *arch;
    if ((rc = arch_int(g, *arch, "block_count", &hp->n_layer, err)) == 1)
        return cm_err_set(err, CM_E_FORMAT, "quantize: %s.block_count missing", *arch);
    if (rc) return rc;
    if ((rc = arch_int(g, *arch, "expert_count", &hp->n_expert, err)) < 0) return rc;
    if ((rc = arch_int(g, *arch, "attention.head_count", &hp->n_head, err)) < 0) return rc;
    hp->n_head_kv = hp->n_head;
    if ((rc = arch_int(g, *arch, "attention.head_count_kv", &hp->n_head_kv, err)) < 0) return rc;
    return CM_OK;
}

void cm_quantize_default(cm_quantize_params *p) {
    memset(p, 0, sizeof *p);
    p->preset = "Q4_K_M";
}

/* ggml's quantised types (those llama-quantize refuses to requantise without --allow-requantize) */
static int is_quantized(int type) { return type == GGUF_TT_Q8_0 || cm_quant_is_block_type(type); }

int cm_quantize(const char *in_path, const char *out_path, const cm_quantize_params *p, cm_err *err) {
    const cm_quant_preset *preset = cm_quant_preset_find(p->preset);
    if (!preset)
        return cm_err_set(err, CM_E_INVAL, "quantize: unknown type \"%s\" (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, "
                          "Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K)", p->preset ? p->preset : "");
    gguf_file g;
    int rc = gguf_open(&g, in_path, err);
    if (rc) return rc;
    char *arch = NULL;
    cm_quant_tensor *t = calloc(g.n_tensors ? g.n_tensors : 1, sizeof *t);
    gguf_writer *w = NULL;
    if (!t) { rc = cm_err_set(err, CM_E_NOMEM, "quantize: out of memory"); goto done; }
    /* the output is always laid out at the default alignment, as llama-quantize does */
    uint32_t align = GGUF_DEFAULT_ALIGNMENT;
    if ((rc = gguf_get_u32(&g, "general.alignment", &align, err)) < 0) goto done;
    if (align != GGUF_DEFAULT_ALIGNMENT) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED, "quantize: general.alignment %u (only %d is written)", align,
                        GGUF_DEFAULT_ALIGNMENT);
        goto done;
    }
    cm_quant_hparams hp;
    if ((rc = read_hparams(&g, &hp, &arch, err))) goto done;

    for (uint64_t i = 0; i < g.n_tensors; i++) {
        const gguf_tensor *gt = &g.tensors[i];
        if (!(t[i].name = str_dup(gt->name))) { rc = cm_err_set(err, CM_E_NOMEM, "quantize: out of memory"); goto done; }
        t[i].n_dims = 1;
        for (int d = 0; d < 4; d++) {
            t[i].ne[d] = d < gt->n_dims ? gt->ne[d] : 1;
            if (t[i].ne[d] > 1) t[i].n_dims = d + 1;
        }
        t[i].type = gt->type;
        t[i].target = (int)i; /* remembers the input index through the sort; cm_quant_plan overwrites it */
    }
    uint64_t *src = malloc((g.n_tensors ? g.n_tensors : 1) * sizeof *src);
    if (!src) { rc = cm_err_set(err, CM_E_NOMEM, "quantize: out of memory"); goto done; }
    cm_quant_sort(t, g.n_tensors);
    for (uint64_t i = 0; i < g.n_tensors; i++) src[i] = (uint64_t)t[i].target;
    rc = cm_quant_plan(&hp, preset, t, g.n_tensors, err);
    for (uint64_t i = 0; i < g.n_tensors && !rc; i++) {
        if (t[i].target != t[i].type && is_quantized(t[i].type) && !p->allow_requantize)
            rc = cm_err_set(err, CM_E_UNSUPPORTED,
                            "quantize: tensor %s is already %s: requantizing is refused without --allow-requantize",
                            t[i].name, gguf_ttype_name(t[i].type));
    }
    if (rc) { free(src); goto done; }

    if (!(w = gguf_writer_create(err))) { free(src); rc = CM_E_NOMEM; goto done; }
    for (uint64_t i = 0; i < g.n_kv && !rc; i++) {
        char *key = str_dup(g.kv[i].key); /* keys hold no NUL: the reader refuses them */
        rc = key ? copy_kv(w, &g.kv[i], key) : CM_E_NOMEM;
        free(key);
    }
    /* llama-quantize sets these two last (replacing any earlier value in place of appending) and drops
     * the split keys: the output is always one file */
    gguf_writer_remove(w, "general.quantization_version");
    if (!rc) rc = gguf_writer_set_u32(w, "general.quantization_version", QNT_VERSION);
    gguf_writer_remove(w, "general.file_type");
    if (!rc) rc = gguf_writer_set_u32(w, "general.file_type", (uint32_t)preset->ftype);
    gguf_writer_remove(w, "split.no");
    gguf_writer_remove(w, "split.count");
    gguf_writer_remove(w, "split.tensors.count");
    if (rc) { free(src); rc = cm_err_set(err, CM_E_NOMEM, "quantize: out of memory"); goto done; }
    for (uint64_t i = 0; i < g.n_tensors && !rc; i++) {
        const gguf_tensor *gt = &g.tensors[src[i]];
        rc = gguf_writer_add_tensor_ref(w, t[i].name, t[i].target, t[i].n_dims, t[i].ne, gt->type, gt->data, err);
    }
    free(src);
    if (!rc) rc = gguf_writer_write(w, out_path, err);
done:
    gguf_writer_free(w);
    for (uint64_t i = 0; t && i < g.n_tensors; i++) free((char *)t[i].name);
    free(t);
    free(arch);
    gguf_close(&g);
    return rc;
}
