/*
 * kernels_order.h - the one operation order of every float kernel, so that the plain references
 * (kernels.c, quants.c) and every kernel family's SIMD code (kernels_simd.c, quants_simd.c) give the same
 * bits: a result never depends on which family runs it. Internal to engine/.
 *
 * Float dots: dot(w, x) over K values, w of any weight type times f32 x (cm_vec_dot with F32 x, the
 * matvecs of those, cm_dot_f32 / cm_dot_f16, rmsnorm's sum of squares):
 * - w_i is the f32 value cm_dequantize_row_ref gives (exact for F16, BF16 and Q8_0, where d * q has at
 *   most 19 significant bits; the block types' defined dequantisation otherwise);
 * - value i belongs to lane i % 64 of 64 lanes that start at +0: acc_l = fmaf(w_i, x_i, acc_l), i in
 *   increasing order;
 * - the result is the halving tree of the lanes: acc_l += acc_{l+32} for l < 32, then acc_l += acc_{l+16}
 *   for l < 16, ... down to acc_0 += acc_1 (cm_lanes_total), one rounding per addition.
 * Attention's scores are not dots of this kind: each is one FMA chain along the head dim from +0
 * (cm_att_scores_heads_ref), so that keys side by side in a vector's lanes need no reduction.
 * A sum (softmax's denominator) is the same with acc_l = acc_l + x_i. 64 lanes are four zmm or eight ymm
 * accumulators, enough independent chains to hide the FMA latency with either; the tree is the one both
 * reduce in (zmm (s0 + s2) + (s1 + s3), ymm ((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7)), then the
 * 256-, 128-, 64- and 32-bit halves), and a tail is only lanes left unfed.
 *
 * exp (softmax, silu): cm_exp_def below, one polynomial every family evaluates lane by lane with the
 * same roundings (cm_exp_row exposes it): within 1 ulp of glibc's expf for every float, subnormal results
 * and overflow included (checked over all 2^32 inputs once; tests/engine/test_kernels.c checks a sample
 * of them against expf and every family's against this one, bit for bit); 0 from -104 down, +inf for
 * results beyond FLT_MAX, NaN for NaN.
 *
 * Element-wise kernels, per element, each operation rounded once, in this order:
 * - rmsnorm: ss = dot(x, x) as above; s = 1 / sqrtf(ss / K + eps); y_i = w_i * (x_i * s)
 * - softmax: m = max_i x_i; e_i = exp(x_i - m); S = sum e_i as above; x_i = e_i / S
 * - silu_mul: g_i = (g_i / (1 + exp(-g_i))) * u_i
 * - axpy, axpy_f16: y_i = fmaf(a, x_i, y_i) (x_i converted exactly from f16)
 * - add: x_i + b_i; rope: x0 c - x1 s and x1 c + x0 s, each product rounded (no fma)
 * A fused multiply-add happens where these say fmaf and nowhere else: engine/meson.build compiles the
 * engine with -ffp-contract=off, so no compiler fuses a * b + c on its own.
 */
#ifndef CM_KERNELS_ORDER_H
#define CM_KERNELS_ORDER_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gguf.h"
#include "quants.h"
#include "util.h"

#define CM_LANES 64

/* The halving tree over acc[0..63] (consumed). */
static inline float cm_lanes_total(float acc[CM_LANES]) {
    for (int h = CM_LANES / 2; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) acc[l] = acc[l] + acc[l + h];
    return acc[0];
}

/* Weight i of a row of F32, F16, BF16 or Q8_0 as f32, as every dot converts it (exact: Q8_0's d * q has
 * at most 19 bits). The SIMD paths convert whole vectors the same way and call this for tails. */
static inline float cm_weight_f32(int wtype, const void *w, int64_t i) {
    switch (wtype) {
    case GGUF_TT_F16: return cm_fp16_to_f32(((const uint16_t *)w)[i]);
    case GGUF_TT_BF16: return cm_bf16_to_f32(((const uint16_t *)w)[i]);
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = (const cm_block_q8_0 *)w + i / CM_QK8_0;
        return cm_fp16_to_f32(b->d) * (float)b->qs[i % CM_QK8_0];
    }
    default: return ((const float *)w)[i];
    }
}

/* dot(w, x) of n f32 values as defined above. */
static inline float cm_lanes_dot(const float *w, const float *x, int64_t n) {
    float acc[CM_LANES] = {0};
    for (int64_t i = 0; i < n; i++) acc[i % CM_LANES] = fmaf(w[i], x[i], acc[i % CM_LANES]);
    return cm_lanes_total(acc);
}

/* cm_exp_def's constants, which the SIMD versions (kernels_simd.c) use by these names: the clamps, log2(e),
 * 1.5 * 2^23 (rounds to an integer), ln2 in a high and a low part, and P(r) highest power first. */
#define CM_EXP_MAX 89.0f
#define CM_EXP_MIN (-104.0f)
#define CM_EXP_LOG2E 1.44269504088896341f
#define CM_EXP_ROUND 12582912.0f
#define CM_EXP_LN2_HI 0.693359375f
#define CM_EXP_LN2_LO (-2.12194440e-4f)
#define CM_EXP_P5 1.9875691500E-4f
#define CM_EXP_P4 1.3981999507E-3f
#define CM_EXP_P3 8.3334519073E-3f
#define CM_EXP_P2 4.1665795894E-2f
#define CM_EXP_P1 1.6666665459E-1f
#define CM_EXP_P0 5.0000001201E-1f

/* e^x, as every family computes it: x clamped to [-104, 89] (a NaN stays NaN); x = n ln2 + r with
 * n = x log2(e) rounded to the nearest integer (ties to even) and r = x - n ln2 in two fmaf steps (ln2 in
 * a high part exact in 9 bits and a low part), |r| <= ~ln2/2; e^r = 1 + r + r^2 P(r), P Cephes' degree-5
 * polynomial by Horner in fmaf; then p 2^n rounded once (subnormal results and overflow to +inf
 * included: AVX-512's scalef, or two exact-or-once-rounded multiplies by 2^n1 2^n2, n1 + n2 = n). */
static inline float cm_exp_def(float x) {
    x = CM_EXP_MAX < x ? CM_EXP_MAX : x; /* as minps(89, x) and maxps(-104, x): a NaN x passes through */
    x = CM_EXP_MIN > x ? CM_EXP_MIN : x;
    /* x log2(e) + 1.5 * 2^23 has no bits below 1: rounding to it is nearbyintf's (|x log2(e)| < 2^22) */
    float t = x * CM_EXP_LOG2E + CM_EXP_ROUND;
    float n = t - CM_EXP_ROUND;
    float r = fmaf(-n, CM_EXP_LN2_HI, x);
    r = fmaf(-n, CM_EXP_LN2_LO, r);
    float p = CM_EXP_P5;
    p = fmaf(p, r, CM_EXP_P4);
    p = fmaf(p, r, CM_EXP_P3);
    p = fmaf(p, r, CM_EXP_P2);
    p = fmaf(p, r, CM_EXP_P1);
    p = fmaf(p, r, CM_EXP_P0);
    p = fmaf(p, r * r, r + 1.0f);
    /* n in [-150, 128] is the low bits of t; 2^n as 2^n1 2^n2, each a normal float, p 2^n1 exact */
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    int32_t ni = (int32_t)(tb - 0x4B400000u), n1 = ni / 2, n2 = ni - n1;
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

#endif
