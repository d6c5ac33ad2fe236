/*
 * quants.h - GGML's block-quantised weight formats: their byte layouts, a plain reference dequantiser
 * per type, and dot products of a quantised weight row with activations. Internal to engine/.
 *
 * Weight types (GGUF ids in gguf.h): legacy blocks of 32 values Q4_0, Q4_1, Q5_0, Q5_1 (Q8_0 lives in
 * kernels.h with its own kernels), and K-quant super-blocks of 256 values Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
 * Each layout below is the one llama.cpp writes; sizes are asserted because files are read in place.
 *
 * Activations meet a weight row in one of two formats (kernels.h, xtype):
 * - F32: the exact dequantised product, sum_i deq(w)_i * x_i (reference parity with a float model);
 * - the weight type's paired int8 format, as llama.cpp pairs them (cm_quant_vec_dot_type):
 *   Q4_0, Q5_0 (and Q8_0) x Q8_0; Q4_1, Q5_1 x Q8_1; K-quants x Q8_K. Integer sums per block are
 *   exact and turned into a float by one defined sequence (cm_qacc below), so every fast kernel is
 *   bit-exact with its reference.
 * Letters: K row length (a multiple of the type's block), QK values per block.
 */
#ifndef CM_QUANTS_H
#define CM_QUANTS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "gguf.h"

/* ------------------------------------------------------------ block layouts (all little-endian) */

/* Q8_0: x[i] = d * qs[i]. */
#define CM_QK8_0 32
typedef struct cm_block_q8_0 {
    uint16_t d; /* fp16 */
    int8_t qs[CM_QK8_0];
} cm_block_q8_0;
_Static_assert(sizeof(cm_block_q8_0) == 34, "Q8_0 block must be 34 bytes");

/* Legacy 4/5-bit blocks of 32. Nibbles: byte j holds value j (low nibble) and value j + 16 (high).
 * Q5: bit j of qh (read as a little-endian u32) is the fifth bit of value j.
 * Q4_0: x = d * (q - 8); Q4_1: x = d * q + m; Q5_0: x = d * (q - 16); Q5_1: x = d * q + m. */
#define CM_QK4 32
typedef struct cm_block_q4_0 {
    uint16_t d;
    uint8_t qs[CM_QK4 / 2];
} cm_block_q4_0;
typedef struct cm_block_q4_1 {
    uint16_t d, m;
    uint8_t qs[CM_QK4 / 2];
} cm_block_q4_1;
typedef struct cm_block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[CM_QK4 / 2];
} cm_block_q5_0;
typedef struct cm_block_q5_1 {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[CM_QK4 / 2];
} cm_block_q5_1;
_Static_assert(sizeof(cm_block_q4_0) == 18, "Q4_0 block must be 18 bytes");
_Static_assert(sizeof(cm_block_q4_1) == 20, "Q4_1 block must be 20 bytes");
_Static_assert(sizeof(cm_block_q5_0) == 22, "Q5_0 block must be 22 bytes");
_Static_assert(sizeof(cm_block_q5_1) == 24, "Q5_1 block must be 24 bytes");

/* Q8_1 (activations only): Q8_0 plus s = d * sum(qs), stored fp16, which carries Q4_1/Q5_1's m. */
typedef struct cm_block_q8_1 {
    uint16_t d, s;
    int8_t qs[32];
} cm_block_q8_1;
_Static_assert(sizeof(cm_block_q8_1) == 36, "Q8_1 block must be 36 bytes");

/* K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with its own small integer scale
 * (and min), the scales themselves scaled by the fp16 d (and dmin). */
#define CM_QK_K 256

/* Q2_K: 16 sub-blocks of 16. scales[j]: low nibble scale, high nibble min; x = d*sc*q - dmin*m.
 * q (2 bits): value 128*h + 32*s + l (h < 2, s < 4, l < 32) is bits 2s..2s+1 of qs[32*h + l]; its
 * sub-block is (128*h + 32*s + l) / 16. */
typedef struct cm_block_q2_k {
    uint8_t scales[CM_QK_K / 16];
    uint8_t qs[CM_QK_K / 4];
    uint16_t d, dmin;
} cm_block_q2_k;

/* Q3_K: 16 sub-blocks of 16, x = d * (sc - 32) * (q - 4). q's low 2 bits are placed as in Q2_K; its
 * third bit, for value 128*h + 32*s + l, is bit 4*h + s of hmask[l]. The sixteen 6-bit sc: low 4 bits
 * in scales[j] (j < 8) or scales[j - 8] >> 4, high 2 bits at bit 2*(j / 4) of scales[8 + j % 4]. */
typedef struct cm_block_q3_k {
    uint8_t hmask[CM_QK_K / 8];
    uint8_t qs[CM_QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} cm_block_q3_k;

/* Q4_K: 8 sub-blocks of 32, x = d*sc*q - dmin*m with 6-bit sc, m (cm_q4k_scale_min). Value 64*c + l
 * (l < 32) is the low nibble of qs[32*c + l], value 64*c + 32 + l its high nibble. */
typedef struct cm_block_q4_k {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[CM_QK_K / 2];
} cm_block_q4_k;

/* Q5_K: Q4_K plus a fifth bit: for value 64*c + 32*half + l it is bit 2*c + half of qh[l]. */
typedef struct cm_block_q5_k {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[CM_QK_K / 8];
    uint8_t qs[CM_QK_K / 2];
} cm_block_q5_k;

/* Q6_K: 16 sub-blocks of 16, x = d * scales[j] * (q - 32), q 6 bits. Value 128*h + 32*s + l (l < 32)
 * takes its low 4 bits from the low nibble of ql[64*h + l] (s = 0), of ql[64*h + 32 + l] (s = 1), or
 * the high nibble of those (s = 2, 3), and its top 2 bits from bits 2s..2s+1 of qh[32*h + l]. */
typedef struct cm_block_q6_k {
    uint8_t ql[CM_QK_K / 2];
    uint8_t qh[CM_QK_K / 4];
    int8_t scales[CM_QK_K / 16];
    uint16_t d;
} cm_block_q6_k;

/* Q8_K (activations only): f32 d, x = d * qs, and the sum of each 16 qs (for the mins). */
typedef struct cm_block_q8_k {
    float d;
    int8_t qs[CM_QK_K];
    int16_t bsums[CM_QK_K / 16];
} cm_block_q8_k;

_Static_assert(sizeof(cm_block_q2_k) == 84, "Q2_K block must be 84 bytes");
_Static_assert(sizeof(cm_block_q3_k) == 110, "Q3_K block must be 110 bytes");
_Static_assert(sizeof(cm_block_q4_k) == 144, "Q4_K block must be 144 bytes");
_Static_assert(sizeof(cm_block_q5_k) == 176, "Q5_K block must be 176 bytes");
_Static_assert(sizeof(cm_block_q6_k) == 210, "Q6_K block must be 210 bytes");
_Static_assert(sizeof(cm_block_q8_k) == 292, "Q8_K block must be 292 bytes");

/* Sub-block j (< 8) of Q4_K/Q5_K's 12 packed bytes: j < 4 keeps sc, m in the low 6 bits of bytes j,
 * j + 4; j >= 4 has its low 4 bits in byte j + 4 (sc low nibble, m high) and its top 2 bits in the
 * spare top bits of bytes j - 4 (sc) and j (m). */
static inline void cm_q4k_scale_min(int j, const uint8_t *s, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* ------------------------------------------------------------ shared by quants.c and quants_simd.c */

/* Values and bytes per block: gguf.c's type table is their one home (the structs' sizes are asserted
 * in quants.h and compared with it in tests/engine/test_quants.c). */
static inline int cm_quant_block_values(int type) {
    return gguf_block_size(type);
}

static inline size_t cm_quant_block_bytes(int type) {
    return (size_t)gguf_row_bytes(type, gguf_block_size(type));
}

/* How an int8 dot turns a row's exact integer block sums into one float. The references (quants.c) and
 * every fast kernel (quants_simd.c, gemm_q8.c) follow this definition operation for operation, which is
 * what makes them bit-exact; it is llama.cpp's scalar scheme (one float accumulator, one FMA per block):
 * - a block (32 values for Q8_0 and the legacy types, 256 for K-quants) gives one exact int32 sum of
 *   q * x (K-quants: each product times its sub-block's integer scale, q signed as the format defines
 *   it; |sum| < 2^31 for every type), however a kernel groups its additions;
 * - acc = fmaf((float)isum, s, acc), s = d_w * d_x rounded to float, blocks in order;
 * - a scalar term e = fmaf(a, b, e) per block: Q4_1/Q5_1 a = m, b = s_x (their offsets); K-quants with
 *   mins (Q2_K, Q4_K, Q5_K) a = (float)(sum over sub-blocks of min * sum of x), b = -(dmin * d_x);
 *   none for the other types;
 * - the result is acc + e.
 * The order depends on K alone, never on how many rows or tokens one call covers. Kernels may hold a
 * block's sum in several int32 lanes (isum below: eight, any split) as long as the lanes are added
 * exactly before the one conversion. */
typedef struct cm_qacc {
    float acc;
    float e;
} cm_qacc;

static inline void cm_qacc_block(cm_qacc *a, const int32_t isum[8], float s) {
    int32_t t = 0;
    for (int l = 0; l < 8; l++) t += isum[l];
    a->acc = fmaf((float)t, s, a->acc);
}

static inline float cm_qacc_total(const cm_qacc *a) {
    return a->acc + a->e;
}

/* Q4_K/Q5_K's twelve packed bytes -> sc[0..7] in bytes 0..7 and m[0..7] in bytes 8..15 of out (the
 * layout of cm_q4k_scale_min, four sub-blocks at a time). */
static inline void cm_q4k_scales_mins(const uint8_t *s, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
    uint32_t mins_lo = u[1] & m6;
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
    u[2] = mins_lo;
    u[0] &= m6;
    memcpy(out, u, 16);
}

/* Q3_K's sixteen 6-bit scales (layout above), minus their offset 32. */
static inline void cm_q3k_scales(const uint8_t *s, int sc[16]) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
        int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = (lo | hi << 4) - 32;
    }
}

/* ------------------------------------------------------------ per type */

/* Is `type` one of the block types above (weights, not Q8_0)? */
int cm_quant_is_block_type(int type);

/* The activation format that `wtype` pairs with for int8 dots (GGUF_TT_Q8_0, GGUF_TT_Q8_1 or
 * GGUF_TT_Q8_K), or -1 when wtype has none (float types). Q8_0 weights pair with Q8_0. */
int cm_quant_vec_dot_type(int wtype);

/* One block as integers, the form every reference reads a layout through (the int8 GEMM's row
 * unpackers, quants_simd.c, are held to it), so each bit layout has one reference decoding. Legacy (Q4_0, Q4_1, Q5_0,
 * Q5_1, and Q8_0 weights): x_i = d * q[i] + m (m 0 for Q4_0, Q5_0). K-quants: x_v = (d * sc[s]) * q[v] - dmin * mn[s],
 * s = v / sub (mn 0 and dmin 0 for the types without mins). `blk` points at one block of `type`. */
typedef struct cm_legacy_unpacked {
    int8_t q[32];
    float d, m;
} cm_legacy_unpacked;

typedef struct cm_k_unpacked {
    int8_t q[CM_QK_K];
    int16_t sc[16], mn[16];
    int sub;       /* values per sub-block: 16 or 32 */
    int has_min;
    float d, dmin;
} cm_k_unpacked;

void cm_quant_unpack_legacy(int type, const void *blk, cm_legacy_unpacked *u);
void cm_quant_unpack_k(int type, const void *blk, cm_k_unpacked *u);

/* cm_quant_unpack_k of nb consecutive blocks of a K-quant row, in the shape the int8 GEMM's repacking
 * (gemm_q8.c) reads: q (nb * 256) the blocks' q; block b's d and dmin at d[b], dmin[b]; and each 16
 * values' scale and min (those of the sub-block holding them, sc[j * 16 / sub]) at sc16[16 * b + j],
 * mn16[16 * b + j]. The fast one decodes q with the SIMD group decoders of the dots; bit-exact pair. */
void cm_quant_unpack_k_row_ref(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin, int16_t *sc16,
                               int16_t *mn16);
void cm_quant_unpack_k_row(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin, int16_t *sc16,
                           int16_t *mn16);

/* Dequantise one row: w (K/QK blocks of the type) -> y (K) f32. K a multiple of the block. The
 * references are the definition of each format; tests/fixtures/golden/quants.gguf (made by
 * tools/gguf.py's independent implementation) holds them to it bit for bit. */
void cm_dequantize_row_q4_0_ref(const cm_block_q4_0 *w, float *y, int64_t k);
void cm_dequantize_row_q4_1_ref(const cm_block_q4_1 *w, float *y, int64_t k);
void cm_dequantize_row_q5_0_ref(const cm_block_q5_0 *w, float *y, int64_t k);
void cm_dequantize_row_q5_1_ref(const cm_block_q5_1 *w, float *y, int64_t k);
void cm_dequantize_row_q2_k_ref(const cm_block_q2_k *w, float *y, int64_t k);
void cm_dequantize_row_q3_k_ref(const cm_block_q3_k *w, float *y, int64_t k);
void cm_dequantize_row_q4_k_ref(const cm_block_q4_k *w, float *y, int64_t k);
void cm_dequantize_row_q5_k_ref(const cm_block_q5_k *w, float *y, int64_t k);
void cm_dequantize_row_q6_k_ref(const cm_block_q6_k *w, float *y, int64_t k);

/* Either by type (a block type above); the fast one is bit-exact with the reference. */
void cm_quant_dequantize_ref(int type, const void *w, float *y, int64_t k);
void cm_quant_dequantize(int type, const void *w, float *y, int64_t k);

/* Activations x (K) f32 -> one row of Q8_1 (K % 32 == 0) or Q8_K (K % 256 == 0) blocks:
 * d = max|x| / 127, q = round-half-even(x / d) (Q8_K: clamped to +-127 and bsums filled). Run once
 * per token per matrix group; Q8_K, which prefill runs for every row of a batch, also has a fast
 * version (kernels_simd.c), bit-exact with the reference for finite x. */
void cm_quantize_row_q8_1_ref(const float *x, cm_block_q8_1 *y, int64_t k);
void cm_quantize_row_q8_k_ref(const float *x, cm_block_q8_k *y, int64_t k);
void cm_quantize_row_q8_k(const float *x, cm_block_q8_k *y, int64_t k);

/* dot(w (K) of block type wtype, x (K) f32): the dequantised row times x, summed as kernels_order.h's
 * float dot defines (64 lanes by value index, then a fixed tree). Bit-exact pair: the fast one
 * dequantises 256 values at a time and feeds the same lanes, whatever rows a matvec call covers. */
float cm_quant_dot_f32_ref(int wtype, int64_t k, const void *w, const float *x);
float cm_quant_dot_f32(int wtype, int64_t k, const void *w, const float *x);

/* dot(w (K) of block type wtype or Q8_0, x (K) in cm_quant_vec_dot_type(wtype)), summed as cm_qacc
 * defines. Bit-exact pair. */
float cm_quant_dot_q_ref(int wtype, int64_t k, const void *w, const void *x);
float cm_quant_dot_q(int wtype, int64_t k, const void *w, const void *x);

/* y[n*ldy + r] = cm_quant_dot_q(W row r, x_n) for n < N, r in [r0, r1), bit for bit: the fast kernels
 * run several rows of W against one quantised x at a time (x is read once for them and their
 * accumulation chains overlap). x_n = x + n * x_stride bytes, each a row in cm_quant_vec_dot_type. */
void cm_quant_matvec_q(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                       int64_t ldy, int64_t r0, int64_t r1);

/* y[n*ldy + r] = cm_quant_dot_f32(W row r, x_n) for n < N, r in [r0, r1): each weight chunk is
 * dequantised once for all N rows, and every y is the same number cm_quant_dot_f32 returns.
 * x_n = x + n * x_stride bytes. */
void cm_quant_matvec_f32(int wtype, const void *w, int64_t k, const float *x, size_t x_stride, int n,
                         float *y, int64_t ldy, int64_t r0, int64_t r1);

#endif
