/*
 * gemm_q8.c - the prefill product of quantised weights with int8 activations, for one kernel family
 * (kernels_family.h; built once per family like quants_simd.c): y (N, M) = x (N, K) W (M, K)^T, x
 * already quantised row by row to the format the weight type pairs with (cm_quant_vec_dot_type).
 *
 * A decode dot unpacks every weight block it reads; a prefill batch has enough tokens to unpack each
 * weight row once and reuse it. So W is taken 32 rows at a time (a "tile"), repacked into the caller's
 * scratch through the references' own unpackers (cm_quant_unpack_*: one reading of each bit layout) as
 * plain bytes, 8 rows interleaved 4 values at a time, with their scales spread into the int16 vectors
 * the integer dots multiply by; then each quad of tokens meets the tile 8 rows at a time: a broadcast of
 * 4 activation bytes against 32 weight bytes gives every row its own int32 lane, so a block's sums come
 * out per row with no horizontal adds. The quad's activations stay in L1 across the tile, the tile in L2
 * across the quads.
 *
 * Every output is the number cm_vec_dot_ref gives for its row and token, bit for bit: each step of 4
 * values is one of cm_qacc's (quants.h) exact int32 lanes, and the lanes become a float by cm_qacc's
 * FMA sequence, block by block in order, for eight (row, token) pairs per vector. A token's result
 * therefore depends on nothing else in the batch, nor on the tile, the thread split or the kernel
 * family (the scalar family calls the reference), and equals the decode matvec's.
 */
#include <stddef.h>
#include <string.h>

#include "gguf.h"
#include "kernels.h"
#include "kernels_family.h"
#include "quants.h"
#include "util.h"

#ifndef CM_FAMILY
#error "gemm_q8.c is built once per kernel family with -DCM_FAMILY=<name> (engine/meson.build)"
#endif

/* Bit-exactness with the references needs every multiply rounded: no contraction (see quants.c). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CM_G_AVX2 1
#include <immintrin.h>
#endif

#define TR 32 /* weight rows repacked at a time: four groups */
#define GR 8  /* rows per group: one int32 lane each */
#define NR 4  /* tokens per micro-tile */

/* The scratch a tile needs, at most (K-quants: per value its byte, per 16 values and row two int16 of
 * scale and one of min; legacy types less), plus the token quad's activation scales and alignment
 * slack. */
size_t CM_FAMILY_FN(cm_gemm_q_scratch_bytes)(int64_t k) {
    return (size_t)k * (TR + TR / 2 + 16) + 8192;
}

#if defined(CM_G_AVX2)

/* Where a tile lives in the scratch: TR / GR groups of GR rows, interleaved so that one 32-byte load
 * holds 4 consecutive values of each of the group's 8 rows, and one activation broadcast of those 4
 * values meets all 8 rows (maddubs + madd leave one int32 per row: no horizontal sums). Per group:
 * q (K / 4, GR, 4) bytes: the unpacked q as int8, signed as the format defines it (maddubs takes
 *   |q| unsigned and x with q's sign);
 * d, m (nb, GR) f32: the rows' scales per block (K-quants: d, dmin);
 * K-quants: sc (nb, 16, GR, 2) int16: each 16 values' scale, twice per row (madd's pairs); mn
 *   (nb, 8, GR, 2) int16: the min of 16 values 2j, 2j + 1, to meet Q8_K's bsums.
 * Per token quad: xd, xs (nb, NR) f32 the activation scale (and Q8_1's s). */
typedef struct tile {
    int64_t k, nb;
    int kq, has_min;
    uint8_t *q, *row; /* row: (K) one row's bytes before interleaving */
    float *d, *m, *xd, *xs;
    int16_t *sc, *mn;
} tile;

static void *carve(char **p, size_t bytes) {
    void *r = *p;
    *p += (bytes + 63) & ~(size_t)63;
    return r;
}

static void tile_layout(tile *t, int wtype, int64_t k, void *scratch) {
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    t->k = k;
    t->kq = cm_quant_block_values(wtype) == CM_QK_K;
    t->nb = k / (t->kq ? CM_QK_K : 32);
    t->has_min = wtype == GGUF_TT_Q2_K || wtype == GGUF_TT_Q4_K || wtype == GGUF_TT_Q5_K ||
                 wtype == GGUF_TT_Q4_1 || wtype == GGUF_TT_Q5_1; /* K-quants: dmin; legacy: m */
    size_t nb = (size_t)t->nb;
    t->sc = t->mn = NULL;
    t->q = carve(&p, (size_t)TR * (size_t)k);
    t->row = carve(&p, (size_t)k);
    t->d = carve(&p, TR * nb * sizeof(float));
    t->m = carve(&p, TR * nb * sizeof(float));
    t->xd = carve(&p, NR * nb * sizeof(float));
    t->xs = carve(&p, NR * nb * sizeof(float));
    if (t->kq) {
        t->sc = carve(&p, TR * nb * 32 * sizeof(int16_t));
        t->mn = carve(&p, TR * nb * 16 * sizeof(int16_t));
    }
}

/* Repack weight row `wr` into tile row i. */
static void tile_row(tile *t, int wtype, const void *wr, int i) {
    size_t bb = (size_t)gguf_row_bytes(wtype, cm_quant_block_values(wtype));
    size_t g = (size_t)(i / GR), r = (size_t)(i % GR), nb = (size_t)t->nb, k = (size_t)t->k;
    uint8_t *q = t->row;
    float *d = t->d + g * GR * nb, *m = t->m + g * GR * nb;
    for (size_t b = 0; b < nb; b++) {
        const char *blk = (const char *)wr + b * bb;
        if (!t->kq) {
            cm_legacy_unpacked u;
            cm_quant_unpack_legacy(wtype, blk, &u);
            memcpy(q + b * 32, u.q, 32);
            d[b * GR + r] = u.d;
            m[b * GR + r] = u.m;
            continue;
        }
        cm_k_unpacked u;
        cm_quant_unpack_k(wtype, blk, &u);
        memcpy(q + b * CM_QK_K, u.q, CM_QK_K);
        int16_t *sc = t->sc + (g * nb + b) * 16 * GR * 2, *mn = t->mn + (g * nb + b) * 8 * GR * 2;
        for (int j = 0; j < 16; j++) { /* per 16 values, whatever the type's sub-block */
            int s = j * 16 / u.sub;
            sc[((size_t)j * GR + r) * 2] = sc[((size_t)j * GR + r) * 2 + 1] = u.sc[s];
            mn[((size_t)(j / 2) * GR + r) * 2 + (size_t)(j % 2)] = u.mn[s];
        }
        d[b * GR + r] = u.d;
        m[b * GR + r] = u.dmin;
    }
    /* value v of row r goes to (v / 4, r, v % 4) of the group */
    uint8_t *gq = t->q + g * GR * k;
    for (size_t v = 0; v < k; v += 4) memcpy(gq + (v / 4 * GR + r) * 4, q + v, 4);
}

static inline __m256i bcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Four weight values of 8 rows (w, signed bytes) times 4 activation bytes at x: per row the int32 sum
 * of the four products, i.e. one cm_qacc lane of one block (|q| <= 128 and |x| <= 127 keep maddubs'
 * pairs within int16). `mul` weights the pairs (1, or a K-quant's sub-block scale). */
static inline __m256i lane4(__m256i w, const void *x, __m256i mul) {
    __m256i aw = _mm256_sign_epi8(w, w), xv = _mm256_sign_epi8(bcast32(x), w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), mul);
}

/* The cm_qacc state of 8 rows x NR tokens: lane l of (row r, token j) at acc[(j * 9 + l) * GR + r],
 * the scalar term e at l = 8. */
#define ACC_FLOATS (NR * 9 * GR)

/* out[j * GR + r] = cm_qacc_total of (row r, token j). */
static void acc_total(const float *acc, float *out) {
    for (int j = 0; j < NR; j++) {
        const float *a = acc + (size_t)j * 9 * GR;
        __m256 L[9];
        for (int l = 0; l < 9; l++) L[l] = _mm256_loadu_ps(a + l * GR);
        __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(L[0], L[4]), _mm256_add_ps(L[2], L[6])),
                                 _mm256_add_ps(_mm256_add_ps(L[1], L[5]), _mm256_add_ps(L[3], L[7])));
        _mm256_storeu_ps(out + j * GR, _mm256_add_ps(v, L[8]));
    }
}

/* Legacy types and Q8_0: group g (8 rows) x 4 tokens (xq[j]: their rows; blocks `xbytes` apart, qs at
 * `qoff`). Step s of a block (values 4s..4s+3) is exactly lane s of cm_qacc. One token at a time, so
 * its eight lane accumulators and e stay in registers; the group's bytes stay in L1/L2 across tokens. */
static void micro_legacy(const tile *t, int g, const char *const xq[NR], size_t xbytes, size_t qoff, float *out) {
    const uint8_t *q = t->q + (size_t)g * GR * (size_t)t->k;
    const float *dp = t->d + (size_t)g * GR * (size_t)t->nb, *mp = t->m + (size_t)g * GR * (size_t)t->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int j = 0; j < NR; j++) {
        __m256 L[8], e = _mm256_setzero_ps();
        for (int l = 0; l < 8; l++) L[l] = _mm256_setzero_ps();
        for (int64_t b = 0; b < t->nb; b++) {
            const uint8_t *qb = q + (size_t)b * 32 * GR;
            const char *xb = xq[j] + (size_t)b * xbytes + qoff;
            __m256 sv = _mm256_mul_ps(_mm256_loadu_ps(dp + GR * b), _mm256_set1_ps(t->xd[NR * b + j]));
            for (int s = 0; s < 8; s++) {
                __m256i is = lane4(_mm256_loadu_si256((const __m256i *)(qb + 32 * s)), xb + 4 * s, ones);
                L[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sv, L[s]);
            }
            if (t->has_min) /* e = fmaf(m, s_x, e) */
                e = _mm256_fmadd_ps(_mm256_loadu_ps(mp + GR * b), _mm256_set1_ps(t->xs[NR * b + j]), e);
        }
        __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(L[0], L[4]), _mm256_add_ps(L[2], L[6])),
                                 _mm256_add_ps(_mm256_add_ps(L[1], L[5]), _mm256_add_ps(L[3], L[7])));
        _mm256_storeu_ps(out + j * GR, _mm256_add_ps(v, e));
    }
}

/* K-quants: the same shape over super-blocks of 256, xk[j] the tokens' Q8_K rows. Values 16 sb + 4 s ..
 * + 3 are lane 4 (sb % 2) + s of cm_qacc. */
static void micro_k(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out) {
    const uint8_t *q = t->q + (size_t)g * GR * (size_t)t->k;
    size_t gb = (size_t)g * (size_t)t->nb;
    const float *dp = t->d + gb * GR, *mp = t->m + gb * GR;
    const __m256 neg = _mm256_set1_ps(-0.0f);
    float acc[ACC_FLOATS];
    for (int i = 0; i < ACC_FLOATS; i++) acc[i] = 0.0f;
    for (int64_t b = 0; b < t->nb; b++) {
        __m256i is[NR][8];
        for (int j = 0; j < NR; j++)
            for (int l = 0; l < 8; l++) is[j][l] = _mm256_setzero_si256();
        const uint8_t *qb = q + (size_t)b * CM_QK_K * GR;
        const int16_t *sc = t->sc + (gb + (size_t)b) * 16 * GR * 2;
        for (int sb = 0; sb < 16; sb++) {
            __m256i scv = _mm256_loadu_si256((const __m256i *)(sc + sb * GR * 2));
            for (int s = 0; s < 4; s++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(qb + (size_t)(4 * sb + s) * 32));
                int l = 4 * (sb % 2) + s;
                for (int j = 0; j < NR; j++)
                    is[j][l] = _mm256_add_epi32(is[j][l], lane4(w, xk[j][b].qs + 16 * sb + 4 * s, scv));
            }
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++) {
            __m256 sv = _mm256_mul_ps(d, _mm256_set1_ps(xk[j][b].d));
            for (int l = 0; l < 8; l++) {
                float *a = acc + ((size_t)j * 9 + (size_t)l) * GR;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j][l]), sv, _mm256_loadu_ps(a)));
            }
        }
        if (t->has_min) { /* e = fmaf((float)imin, -(dmin * d_x), e), imin from Q8_K's bsums */
            const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * GR * 2;
            __m256 dmin = _mm256_loadu_ps(mp + GR * b);
            for (int j = 0; j < NR; j++) {
                __m256i mins = _mm256_setzero_si256();
                for (int jj = 0; jj < 8; jj++)
                    mins = _mm256_add_epi32(mins, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(mn + jj * GR * 2)),
                                                                    bcast32(xk[j][b].bsums + 2 * jj)));
                __m256 c = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_set1_ps(xk[j][b].d)), neg);
                float *a = acc + ((size_t)j * 9 + 8) * GR;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), c, _mm256_loadu_ps(a)));
            }
        }
    }
    acc_total(acc, out);
}

static void gemm_avx2(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                      int64_t ldy, int64_t r0, int64_t r1, void *scratch) {
    tile t;
    tile_layout(&t, wtype, k, scratch);
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    int xt = cm_quant_vec_dot_type(wtype);
    size_t xbytes = xt == GGUF_TT_Q8_1 ? sizeof(cm_block_q8_1) : sizeof(cm_block_q8_0);
    size_t qoff = xt == GGUF_TT_Q8_1 ? offsetof(cm_block_q8_1, qs) : offsetof(cm_block_q8_0, qs);
    for (int64_t a = r0; a < r1; a += TR) {
        int rows = r1 - a < TR ? (int)(r1 - a) : TR, groups = (rows + GR - 1) / GR;
        for (int i = 0; i < groups * GR; i++) /* a partial group repeats its last row */
            tile_row(&t, wtype, (const char *)w + (size_t)(a + (i < rows ? i : rows - 1)) * rb, i);
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            const char *xr[NR];
            for (int j = 0; j < NR; j++) xr[j] = (const char *)x + (size_t)(t0 + (j < nt ? j : nt - 1)) * x_stride;
            if (!t.kq)
                for (int64_t b = 0; b < t.nb; b++)
                    for (int j = 0; j < NR; j++) {
                        float sx = 0.0f, dx;
                        if (xt == GGUF_TT_Q8_1) {
                            const cm_block_q8_1 *xb = (const cm_block_q8_1 *)xr[j] + b;
                            dx = _cvtsh_ss(xb->d);
                            sx = _cvtsh_ss(xb->s);
                        } else {
                            dx = _cvtsh_ss(((const cm_block_q8_0 *)xr[j])[b].d);
                        }
                        t.xd[NR * b + j] = dx;
                        t.xs[NR * b + j] = sx;
                    }
            for (int g = 0; g < groups; g++) {
                float out[NR * GR];
                if (t.kq) micro_k(&t, g, (const cm_block_q8_k *const *)xr, out);
                else micro_legacy(&t, g, xr, xbytes, qoff, out);
                for (int j = 0; j < nt; j++)
                    for (int r = 0; r < GR && GR * g + r < rows; r++)
                        y[(int64_t)(t0 + j) * ldy + a + GR * g + r] = out[j * GR + r];
            }
        }
    }
}
#endif

void CM_FAMILY_FN(cm_gemm_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                             int64_t ldy, int64_t r0, int64_t r1, void *scratch) {
#if defined(CM_G_AVX2)
    if (wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) {
        gemm_avx2(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch);
        return;
    }
#endif
    (void)scratch;
    cm_matvec_rows_ref(wtype, cm_quant_vec_dot_type(wtype), w, k, x, x_stride, n, y, ldy, r0, r1);
}
