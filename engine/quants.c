/*
 * quants.c - GGML block formats (see quants.h): reference dequantisers and dot products, and the entry
 * points of their fast twins.
 *
 * The references read every format through one unpacking step per type (integers per value, integer
 * scale and min per sub-block), so the bit layout of each type is written exactly once for them; the
 * fast kernels (quants_simd.c, one build per kernel family) decode the same layouts with SIMD shifts and
 * masks, and are held equal to the references by tests/engine/test_quants.c (the references are held to
 * tools/gguf.py's independent reading by a golden file). A block's integer dot product is exact in int32
 * either way, and both sides turn it into a float by the same steps (cm_qacc, quants.h), which is what
 * makes the int8 paths bit-exact.
 */
#include "quants.h"

#include <math.h>
#include <string.h>

#include "gguf.h"
#include "kernels_family.h"
#include "kernels_order.h"
#include "util.h"

/* The references and the Python golden round after every multiply: no fused multiply-adds. GCC in C11
 * mode does not contract; the pragma keeps clang, whose default has changed between versions, from it. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

int cm_quant_is_block_type(int type) {
    switch (type) {
    case GGUF_TT_Q4_0: case GGUF_TT_Q4_1: case GGUF_TT_Q5_0: case GGUF_TT_Q5_1:
    case GGUF_TT_Q2_K: case GGUF_TT_Q3_K: case GGUF_TT_Q4_K: case GGUF_TT_Q5_K: case GGUF_TT_Q6_K:
        return 1;
    default:
        return 0;
    }
}

int cm_quant_vec_dot_type(int wtype) {
    switch (wtype) {
    case GGUF_TT_Q4_0: case GGUF_TT_Q5_0: case GGUF_TT_Q8_0: return GGUF_TT_Q8_0;
    case GGUF_TT_Q4_1: case GGUF_TT_Q5_1: return GGUF_TT_Q8_1;
    case GGUF_TT_Q2_K: case GGUF_TT_Q3_K: case GGUF_TT_Q4_K: case GGUF_TT_Q5_K: case GGUF_TT_Q6_K:
        return GGUF_TT_Q8_K;
    default:
        return -1;
    }
}


/* ============================================================ reference unpacking */

void cm_quant_unpack_legacy(int type, const void *blk, cm_legacy_unpacked *u) {
    if (type == GGUF_TT_Q8_0) { /* weights of Q8_0 meet Q8_0 activations in the int8 dot */
        const cm_block_q8_0 *b = blk;
        u->d = cm_fp16_to_f32(b->d);
        u->m = 0.0f;
        memcpy(u->q, b->qs, 32);
        return;
    }
    const uint8_t *qs;
    uint32_t qh = 0;
    int bias = 0, bits5 = 0;
    u->m = 0.0f;
    switch (type) {
    case GGUF_TT_Q4_0: {
        const cm_block_q4_0 *b = blk;
        u->d = cm_fp16_to_f32(b->d); qs = b->qs; bias = 8;
        break;
    }
    case GGUF_TT_Q4_1: {
        const cm_block_q4_1 *b = blk;
        u->d = cm_fp16_to_f32(b->d); u->m = cm_fp16_to_f32(b->m); qs = b->qs;
        break;
    }
    case GGUF_TT_Q5_0: {
        const cm_block_q5_0 *b = blk;
        u->d = cm_fp16_to_f32(b->d); qs = b->qs; bias = 16; bits5 = 1;
        memcpy(&qh, b->qh, 4);
        break;
    }
    default: {
        const cm_block_q5_1 *b = blk;
        u->d = cm_fp16_to_f32(b->d); u->m = cm_fp16_to_f32(b->m); qs = b->qs; bits5 = 1;
        memcpy(&qh, b->qh, 4);
        break;
    }
    }
    for (int j = 0; j < 16; j++) {
        int lo = qs[j] & 0xF, hi = qs[j] >> 4;
        if (bits5) {
            lo |= (int)((qh >> j) & 1) << 4;
            hi |= (int)((qh >> (j + 16)) & 1) << 4;
        }
        u->q[j] = (int8_t)(lo - bias);
        u->q[j + 16] = (int8_t)(hi - bias);
    }
}

void cm_quant_unpack_k(int type, const void *blk, cm_k_unpacked *u) {
    memset(u->mn, 0, sizeof u->mn);
    u->has_min = 0;
    u->dmin = 0.0f;
    switch (type) {
    case GGUF_TT_Q2_K: {
        const cm_block_q2_k *b = blk;
        u->sub = 16; u->has_min = 1;
        u->d = cm_fp16_to_f32(b->d); u->dmin = cm_fp16_to_f32(b->dmin);
        for (int s = 0; s < 16; s++) { u->sc[s] = b->scales[s] & 0xF; u->mn[s] = b->scales[s] >> 4; }
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) u->q[128 * h + 32 * s + l] = (int8_t)((b->qs[32 * h + l] >> (2 * s)) & 3);
        break;
    }
    case GGUF_TT_Q3_K: {
        const cm_block_q3_k *b = blk;
        u->sub = 16;
        u->d = cm_fp16_to_f32(b->d);
        int sc[16];
        cm_q3k_scales(b->scales, sc);
        for (int j = 0; j < 16; j++) u->sc[j] = (int16_t)sc[j];
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) {
                    int lo = (b->qs[32 * h + l] >> (2 * s)) & 3;
                    int high = (b->hmask[l] >> (4 * h + s)) & 1;
                    u->q[128 * h + 32 * s + l] = (int8_t)(lo - (high ? 0 : 4));
                }
        break;
    }
    case GGUF_TT_Q4_K:
    case GGUF_TT_Q5_K: {
        const uint8_t *scales, *qs, *qh = NULL;
        uint16_t d, dmin;
        if (type == GGUF_TT_Q4_K) {
            const cm_block_q4_k *b = blk;
            scales = b->scales; qs = b->qs; d = b->d; dmin = b->dmin;
        } else {
            const cm_block_q5_k *b = blk;
            scales = b->scales; qs = b->qs; qh = b->qh; d = b->d; dmin = b->dmin;
        }
        u->sub = 32; u->has_min = 1;
        u->d = cm_fp16_to_f32(d); u->dmin = cm_fp16_to_f32(dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            cm_q4k_scale_min(j, scales, &sc, &m);
            u->sc[j] = sc;
            u->mn[j] = m;
        }
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                int lo = qs[32 * c + l] & 0xF, hi = qs[32 * c + l] >> 4;
                if (qh) {
                    lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                    hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                u->q[64 * c + l] = (int8_t)lo;
                u->q[64 * c + 32 + l] = (int8_t)hi;
            }
        break;
    }
    default: {
        const cm_block_q6_k *b = blk;
        u->sub = 16;
        u->d = cm_fp16_to_f32(b->d);
        for (int j = 0; j < 16; j++) u->sc[j] = b->scales[j];
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) {
                    uint8_t lb = b->ql[64 * h + 32 * (s & 1) + l];
                    int low = s < 2 ? lb & 0xF : lb >> 4;
                    int top = (b->qh[32 * h + l] >> (2 * s)) & 3;
                    u->q[128 * h + 32 * s + l] = (int8_t)((low | top << 4) - 32);
                }
        break;
    }
    }
}

void cm_quant_unpack_k_row_ref(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin, int16_t *sc16,
                               int16_t *mn16) {
    size_t bb = cm_quant_block_bytes(type);
    for (int64_t b = 0; b < nb; b++) {
        cm_k_unpacked u;
        cm_quant_unpack_k(type, (const char *)w + (size_t)b * bb, &u);
        memcpy(q + b * CM_QK_K, u.q, CM_QK_K);
        d[b] = u.d;
        dmin[b] = u.dmin;
        for (int j = 0; j < 16; j++) {
            sc16[16 * b + j] = u.sc[j * 16 / u.sub];
            mn16[16 * b + j] = u.mn[j * 16 / u.sub];
        }
    }
}

/* ============================================================ reference dequantisation */

static void dequant_block_ref(int type, const void *blk, float *y) {
    if (cm_quant_block_values(type) == CM_QK4) {
        cm_legacy_unpacked u;
        cm_quant_unpack_legacy(type, blk, &u);
        if (type == GGUF_TT_Q4_1 || type == GGUF_TT_Q5_1)
            for (int i = 0; i < 32; i++) y[i] = u.d * (float)u.q[i] + u.m;
        else
            for (int i = 0; i < 32; i++) y[i] = u.d * (float)u.q[i];
        return;
    }
    cm_k_unpacked u;
    cm_quant_unpack_k(type, blk, &u);
    for (int s = 0; s < CM_QK_K / u.sub; s++) {
        float dl = u.d * (float)u.sc[s], ml = u.dmin * (float)u.mn[s];
        const int8_t *q = u.q + s * u.sub;
        if (u.has_min)
            for (int l = 0; l < u.sub; l++) y[s * u.sub + l] = dl * (float)q[l] - ml;
        else
            for (int l = 0; l < u.sub; l++) y[s * u.sub + l] = dl * (float)q[l];
    }
}

void cm_quant_dequantize_ref(int type, const void *w, float *y, int64_t k) {
    int qk = cm_quant_block_values(type);
    size_t bb = cm_quant_block_bytes(type);
    for (int64_t b = 0; b < k / qk; b++) dequant_block_ref(type, (const char *)w + (size_t)b * bb, y + b * qk);
}

#define DEQ_REF(name, TYPE, tt) \
    void cm_dequantize_row_##name##_ref(const TYPE *w, float *y, int64_t k) { cm_quant_dequantize_ref(tt, w, y, k); }
DEQ_REF(q4_0, cm_block_q4_0, GGUF_TT_Q4_0)
DEQ_REF(q4_1, cm_block_q4_1, GGUF_TT_Q4_1)
DEQ_REF(q5_0, cm_block_q5_0, GGUF_TT_Q5_0)
DEQ_REF(q5_1, cm_block_q5_1, GGUF_TT_Q5_1)
DEQ_REF(q2_k, cm_block_q2_k, GGUF_TT_Q2_K)
DEQ_REF(q3_k, cm_block_q3_k, GGUF_TT_Q3_K)
DEQ_REF(q4_k, cm_block_q4_k, GGUF_TT_Q4_K)
DEQ_REF(q5_k, cm_block_q5_k, GGUF_TT_Q5_K)
DEQ_REF(q6_k, cm_block_q6_k, GGUF_TT_Q6_K)
#undef DEQ_REF

/* ============================================================ activation quantisation */

void cm_quantize_row_q8_1_ref(const float *x, cm_block_q8_1 *y, int64_t k) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            y[b].qs[i] = (int8_t)nearbyintf(xb[i] * id);
            sum += y[b].qs[i];
        }
        y[b].d = cm_f32_to_fp16(d);
        y[b].s = cm_f32_to_fp16(d * (float)sum);
    }
}

void cm_quantize_row_q8_k_ref(const float *x, cm_block_q8_k *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK_K; b++) {
        const float *xb = x + b * CM_QK_K;
        float amax = 0.0f;
        for (int i = 0; i < CM_QK_K; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        for (int i = 0; i < CM_QK_K; i++) {
            float v = nearbyintf(xb[i] * id); /* x * (1/d) may round to 127.00001: keep it in int8 */
            y[b].qs[i] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
        }
        for (int j = 0; j < CM_QK_K / 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += y[b].qs[16 * j + i];
            y[b].bsums[j] = (int16_t)s;
        }
    }
}

/* ============================================================ reference dot products */

/* kernels_order.h's float dot of the dequantised row with x: value i in lane i % 64. */
float cm_quant_dot_f32_ref(int wtype, int64_t k, const void *w, const float *x) {
    int qk = cm_quant_block_values(wtype);
    size_t bb = cm_quant_block_bytes(wtype);
    float y[CM_QK_K], acc[CM_LANES] = {0};
    for (int64_t b = 0; b < k / qk; b++) {
        dequant_block_ref(wtype, (const char *)w + (size_t)b * bb, y);
        for (int i = 0; i < qk; i++) {
            int64_t v = b * qk + i;
            acc[v % CM_LANES] = fmaf(y[i], x[v], acc[v % CM_LANES]);
        }
    }
    return cm_lanes_total(acc);
}

/* The int8 dot as cm_qacc (quants.h) defines it: an exact integer sum per block, then the float steps. */
float cm_quant_dot_q_ref(int wtype, int64_t k, const void *w, const void *x) {
    int qk = cm_quant_block_values(wtype);
    size_t bb = cm_quant_block_bytes(wtype);
    cm_qacc acc = {0.0f, 0.0f};
    for (int64_t b = 0; b < k / qk; b++) {
        const void *blk = (const char *)w + (size_t)b * bb;
        int32_t isum[8] = {0};
        if (qk == CM_QK4) {
            cm_legacy_unpacked u;
            cm_quant_unpack_legacy(wtype, blk, &u);
            const int8_t *xq;
            float dx, sx = 0.0f;
            int has_m = cm_quant_vec_dot_type(wtype) == GGUF_TT_Q8_1;
            if (has_m) {
                const cm_block_q8_1 *xb = (const cm_block_q8_1 *)x + b;
                xq = xb->qs; dx = cm_fp16_to_f32(xb->d); sx = cm_fp16_to_f32(xb->s);
            } else {
                const cm_block_q8_0 *xb = (const cm_block_q8_0 *)x + b;
                xq = xb->qs; dx = cm_fp16_to_f32(xb->d);
            }
            for (int i = 0; i < 32; i++) isum[i / 4] += (int32_t)u.q[i] * xq[i];
            cm_qacc_block(&acc, isum, u.d * dx);
            if (has_m) acc.e = fmaf(u.m, sx, acc.e);
        } else {
            cm_k_unpacked u;
            cm_quant_unpack_k(wtype, blk, &u);
            const cm_block_q8_k *xb = (const cm_block_q8_k *)x + b;
            int32_t imin = 0;
            for (int v = 0; v < CM_QK_K; v++) isum[(v % 32) / 4] += u.sc[v / u.sub] * ((int32_t)u.q[v] * xb->qs[v]);
            for (int s = 0; s < CM_QK_K / u.sub; s++) {
                int32_t xs = 0;
                for (int l = 0; l < u.sub; l++) xs += xb->qs[s * u.sub + l];
                imin += u.mn[s] * xs;
            }
            cm_qacc_block(&acc, isum, u.d * xb->d);
            if (u.has_min) acc.e = fmaf((float)imin, -(u.dmin * xb->d), acc.e);
        }
    }
    return cm_qacc_total(&acc);
}

/* ============================================================ the fast entry points */

/* The kernel family's versions (kernels.c chose the family; see kernels_family.h). */
void cm_quant_dequantize(int type, const void *w, float *y, int64_t k) { cm__kops->quant_dequantize(type, w, y, k); }

void cm_quant_unpack_k_row(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin, int16_t *sc16,
                           int16_t *mn16) {
    cm__kops->quant_unpack_k_row(type, w, nb, q, d, dmin, sc16, mn16);
}

float cm_quant_dot_q(int wtype, int64_t k, const void *w, const void *x) {
    return cm__kops->quant_dot_q(wtype, k, w, x);
}

void cm_quant_matvec_q(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                       int64_t ldy, int64_t r0, int64_t r1) {
    cm__kops->quant_matvec_q(wtype, w, k, x, x_stride, n, y, ldy, r0, r1);
}

void cm_quant_matvec_f32(int wtype, const void *w, int64_t k, const float *x, size_t x_stride, int n,
                         float *y, int64_t ldy, int64_t r0, int64_t r1) {
    cm__kops->quant_matvec_f32(wtype, w, k, x, x_stride, n, y, ldy, r0, r1);
}

float cm_quant_dot_f32(int wtype, int64_t k, const void *w, const float *x) {
    float y;
    cm__kops->quant_matvec_f32(wtype, w, k, x, 0, 1, &y, 1, 0, 1);
    return y;
}
