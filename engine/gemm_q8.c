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
 * across the quads. The AVX-512 families use 512-bit vectors the same way, 16 rows to a group and 64 to
 * a tile (VNNI's dpbusd / dpwssd where the family has them); see "the 512-bit path" below.
 *
 * Every output is the number cm_vec_dot_ref gives for its row and token, bit for bit: each step of 4
 * values is one of cm_qacc's (quants.h) exact int32 lanes, and the lanes become a float by cm_qacc's
 * FMA sequence, block by block in order, for 8 (or 16) (row, token) pairs per vector. A token's result
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
#if defined(CM_G_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define CM_G_AVX512 1
#endif
#if defined(CM_G_AVX512) && defined(__AVX512VNNI__)
#define CM_G_VNNI 1
#endif

#define TR 32 /* weight rows repacked at a time (256-bit path): four groups */
#define GR 8  /* rows per group (256-bit path): one int32 lane each */
#define ZTR 64 /* the same for the 512-bit path: four groups of ZGR */
#define ZGR 16
#define NR 4  /* tokens per micro-tile */

/* The scratch a tile needs, at most (K-quants: per value its byte, per 16 values and row two int16 of
 * scale and one of min; legacy types less), plus the token quad's activation scales and sums and
 * alignment slack. The same for every family (the largest tile), so a context sized under one family
 * serves any other. */
size_t CM_FAMILY_FN(cm_gemm_q_scratch_bytes)(int64_t k) {
    return (size_t)k * (ZTR + ZTR / 2 + 16) + 8192;
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
    int gr, bias;     /* rows per group; added to every q as it is stored (0 on the 256-bit path) */
    uint8_t *q, *row; /* row: (K) one row's bytes before interleaving */
    float *d, *m, *xd, *xs;
    int16_t *sc, *mn;
    int32_t *xc;      /* 512-bit path: (NR, K / 4) per token and 4 values, what the bias adds */
} tile;

static void *carve(char **p, size_t bytes) {
    void *r = *p;
    *p += (bytes + 63) & ~(size_t)63;
    return r;
}

static void tile_layout(tile *t, int wtype, int64_t k, int tr, int gr, int bias, void *scratch) {
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    t->k = k;
    t->gr = gr;
    t->bias = bias;
    t->kq = cm_quant_block_values(wtype) == CM_QK_K;
    t->nb = k / (t->kq ? CM_QK_K : 32);
    t->has_min = wtype == GGUF_TT_Q2_K || wtype == GGUF_TT_Q4_K || wtype == GGUF_TT_Q5_K ||
                 wtype == GGUF_TT_Q4_1 || wtype == GGUF_TT_Q5_1; /* K-quants: dmin; legacy: m */
    size_t nb = (size_t)t->nb;
    t->sc = t->mn = NULL;
    size_t rows = (size_t)tr;
    t->q = carve(&p, rows * (size_t)k);
    t->row = carve(&p, (size_t)k);
    t->d = carve(&p, rows * nb * sizeof(float));
    t->m = carve(&p, rows * nb * sizeof(float));
    t->xd = carve(&p, NR * nb * sizeof(float));
    t->xs = carve(&p, NR * nb * sizeof(float));
    t->xc = carve(&p, NR * (size_t)k / 4 * sizeof(int32_t));
    if (t->kq) {
        t->sc = carve(&p, rows * nb * 32 * sizeof(int16_t));
        t->mn = carve(&p, rows * nb * 16 * sizeof(int16_t));
    }
}

/* Repack weight row `wr` into tile row i: group i / gr, row i % gr of it. */
static void tile_row(tile *t, int wtype, const void *wr, int i) {
    size_t bb = (size_t)gguf_row_bytes(wtype, cm_quant_block_values(wtype)), gr = (size_t)t->gr;
    size_t g = (size_t)i / gr, r = (size_t)i % gr, nb = (size_t)t->nb, k = (size_t)t->k;
    uint8_t *q = t->row;
    float *d = t->d + g * gr * nb, *m = t->m + g * gr * nb;
    for (size_t b = 0; b < nb; b++) {
        const char *blk = (const char *)wr + b * bb;
        if (!t->kq) {
            cm_legacy_unpacked u;
            cm_quant_unpack_legacy(wtype, blk, &u);
            memcpy(q + b * 32, u.q, 32);
            d[b * gr + r] = u.d;
            m[b * gr + r] = u.m;
            continue;
        }
        cm_k_unpacked u;
        cm_quant_unpack_k(wtype, blk, &u);
        memcpy(q + b * CM_QK_K, u.q, CM_QK_K);
        int16_t *sc = t->sc + (g * nb + b) * 16 * gr * 2, *mn = t->mn + (g * nb + b) * 8 * gr * 2;
        for (int j = 0; j < 16; j++) { /* per 16 values, whatever the type's sub-block */
            int s = j * 16 / u.sub;
            sc[((size_t)j * gr + r) * 2] = sc[((size_t)j * gr + r) * 2 + 1] = u.sc[s];
            mn[((size_t)(j / 2) * gr + r) * 2 + (size_t)(j % 2)] = u.mn[s];
        }
        d[b * gr + r] = u.d;
        m[b * gr + r] = u.dmin;
    }
    if (t->bias)
        for (size_t v = 0; v < k; v++) q[v] = (uint8_t)(q[v] + t->bias);
    /* value v of row r goes to (v / 4, r, v % 4) of the group */
    uint8_t *gq = t->q + g * gr * k;
    for (size_t v = 0; v < k; v += 4) memcpy(gq + (v / 4 * gr + r) * 4, q + v, 4);
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
    tile_layout(&t, wtype, k, TR, GR, 0, scratch);
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

#if defined(CM_G_AVX512)
/* ------------------------------------------------------------ the 512-bit path (AVX-512 families)
 *
 * The same tiles with 16 rows per group, so one 64-byte load holds 4 values of each of 16 rows and
 * one activation broadcast meets them all. The bytes are stored unsigned, u = q + bias (the type's
 * offset: 128 for Q8_0, 8 for Q4_0, 16 for Q5_0, 4 for Q3_K, 32 for Q6_K, else 0), because the byte dots
 * (VNNI's dpbusd, maddubs) take one operand unsigned; what the bias adds is taken off exactly per token
 * and 4 values, from the activation sums in t->xc. Lanes and their FMA sequence are cm_qacc's, as above. */

/* The type's bias, and whether this family's 512-bit path takes the type: without VNNI the legacy
 * types go through maddubs, whose int16 pair sums only Q8_0's u up to 255 could overflow. */
static int zbias(int wtype) {
    switch (wtype) {
    case GGUF_TT_Q8_0: return 128;
    case GGUF_TT_Q4_0: return 8;
    case GGUF_TT_Q5_0: return 16;
    case GGUF_TT_Q3_K: return 4;
    case GGUF_TT_Q6_K: return 32;
    default: return 0;
    }
}

static int ztakes(int wtype) {
#if defined(CM_G_VNNI)
    return 1;
#else
    return wtype != GGUF_TT_Q8_0;
#endif
}

static inline __m512i zbcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* 1.5 * 2^23 as a float's bits. A lane's exact sum i (|i| <= 4 * 128 * 127 < 2^22) added to them as an
 * integer reads as the float 1.5 * 2^23 + i, exactly (the floats in [2^23, 2^24) are the integers);
 * subtracting 1.5 * 2^23 leaves (float)i. That is cm_qacc's conversion done by an integer add folded
 * into the dot's initial value and a float subtraction, which the CPU issues on more ports than the
 * conversion instruction. */
#define ZMAGIC 0x4B400000
#define ZMAGIC_F 12582912.0f

/* The bias's share per 4 activation bytes, for the nb blocks of row x (blocks `xbytes` apart, qs at
 * `qoff`, 32 bytes per block: legacy; 256: K-quants) into xc (K / 4). Legacy: ZMAGIC - bias * (x0 + x1 +
 * x2 + x3) as int32 (the initial value of the lane's dot). K-quants: bias * (x0 + x1), bias * (x2 + x3) as two
 * int16 (what maddubs's pairs exceed q * x by). */
static void zprep_x(const tile *t, const char *x, size_t xbytes, size_t qoff, int32_t *xc) {
    const __m256i bias = _mm256_set1_epi8((char)t->bias);
    int per = t->kq ? CM_QK_K / 32 : 1;
    for (int64_t b = 0; b < t->nb; b++)
        for (int c = 0; c < per; c++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (size_t)b * xbytes + qoff + 32 * (size_t)c));
            __m256i p = _mm256_maddubs_epi16(bias, xv); /* |pair| <= 2 * 128 * 127: no saturation */
            if (!t->kq) p = _mm256_sub_epi32(_mm256_set1_epi32(ZMAGIC), _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
            _mm256_storeu_si256((__m256i *)(xc + (b * per + c) * 8), p);
        }
}

/* One cm_qacc lane of 16 rows for 4 values as floats: u (the group's 64 bytes) against the 4 activation
 * bytes at x, started from c (ZMAGIC less the bias's share), so (float) of the exact sum of q * x. */
static inline __m512 zdot4(__m512i u, const void *x, int32_t c) {
#if defined(CM_G_VNNI)
    __m512i i = _mm512_dpbusd_epi32(_mm512_set1_epi32(c), u, zbcast32(x));
#else /* u <= 31 here: maddubs's pairs stay within int16 */
    __m512i i = _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(u, zbcast32(x)), _mm512_set1_epi16(1)),
                                 _mm512_set1_epi32(c));
#endif
    return _mm512_sub_ps(_mm512_castsi512_ps(i), _mm512_set1_ps(ZMAGIC_F));
}

static inline __m512 zsum_lanes(const __m512 L[8]) {
    return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(L[0], L[4]), _mm512_add_ps(L[2], L[6])),
                         _mm512_add_ps(_mm512_add_ps(L[1], L[5]), _mm512_add_ps(L[3], L[7])));
}

/* The micro-kernels below take a group (16 rows) against the quad's tokens two at a time, so that each
 * weight load serves both, and walk K in chunks of ZKC values so that the group's chunk is still in L1
 * when the second pair reads it; a pair's cm_qacc state waits in `st` between chunks. Blocks still meet
 * each (row, token) in order, so the chunking changes no result. */
#define ZKC 1024

/* The cm_qacc state of a group and the quad: lane l of (row r, token j) at st[(j * 9 + l) * ZGR + r], e
 * at l = 8. */
#define ZST_FLOATS (NR * 9 * ZGR)

static void zst_total(const float *st, float *out) {
    for (int j = 0; j < NR; j++) {
        __m512 L[8];
        for (int l = 0; l < 8; l++) L[l] = _mm512_loadu_ps(st + (j * 9 + l) * ZGR);
        _mm512_storeu_ps(out + j * ZGR, _mm512_add_ps(zsum_lanes(L), _mm512_loadu_ps(st + (j * 9 + 8) * ZGR)));
    }
}

/* Legacy types and Q8_0: out[j * ZGR + r] is (row r, token j). */
static void zmicro_legacy(const tile *t, int g, const char *const xq[NR], size_t xbytes, size_t qoff, float *out) {
    const uint8_t *q = t->q + (size_t)g * ZGR * (size_t)t->k;
    const float *dp = t->d + (size_t)g * ZGR * (size_t)t->nb, *mp = t->m + (size_t)g * ZGR * (size_t)t->nb;
    size_t kq4 = (size_t)t->k / 4;
    float st[ZST_FLOATS];
    memset(st, 0, sizeof st);
    for (int64_t b0 = 0; b0 < t->nb; b0 += ZKC / 32) {
        int64_t b1 = t->nb - b0 < ZKC / 32 ? t->nb : b0 + ZKC / 32;
        for (int j = 0; j < NR; j += 2) {
            float *s0p = st + (size_t)j * 9 * ZGR, *s1p = s0p + 9 * ZGR;
            __m512 L0[8], L1[8];
            for (int l = 0; l < 8; l++) {
                L0[l] = _mm512_loadu_ps(s0p + l * ZGR);
                L1[l] = _mm512_loadu_ps(s1p + l * ZGR);
            }
            __m512 e0 = _mm512_loadu_ps(s0p + 8 * ZGR), e1 = _mm512_loadu_ps(s1p + 8 * ZGR);
            const int32_t *c0 = t->xc + (size_t)j * kq4, *c1 = c0 + kq4;
            for (int64_t b = b0; b < b1; b++) {
                const uint8_t *qb = q + (size_t)b * 32 * ZGR;
                const char *x0 = xq[j] + (size_t)b * xbytes + qoff, *x1 = xq[j + 1] + (size_t)b * xbytes + qoff;
                __m512 d = _mm512_loadu_ps(dp + ZGR * b);
                __m512 s0 = _mm512_mul_ps(d, _mm512_set1_ps(t->xd[NR * b + j]));
                __m512 s1 = _mm512_mul_ps(d, _mm512_set1_ps(t->xd[NR * b + j + 1]));
                for (int s = 0; s < 8; s++) {
                    __m512i u = _mm512_loadu_si512((const void *)(qb + 64 * s));
                    L0[s] = _mm512_fmadd_ps(zdot4(u, x0 + 4 * s, c0[8 * b + s]), s0, L0[s]);
                    L1[s] = _mm512_fmadd_ps(zdot4(u, x1 + 4 * s, c1[8 * b + s]), s1, L1[s]);
                }
                if (t->has_min) { /* e = fmaf(m, s_x, e) */
                    __m512 m = _mm512_loadu_ps(mp + ZGR * b);
                    e0 = _mm512_fmadd_ps(m, _mm512_set1_ps(t->xs[NR * b + j]), e0);
                    e1 = _mm512_fmadd_ps(m, _mm512_set1_ps(t->xs[NR * b + j + 1]), e1);
                }
            }
            for (int l = 0; l < 8; l++) {
                _mm512_storeu_ps(s0p + l * ZGR, L0[l]);
                _mm512_storeu_ps(s1p + l * ZGR, L1[l]);
            }
            _mm512_storeu_ps(s0p + 8 * ZGR, e0);
            _mm512_storeu_ps(s1p + 8 * ZGR, e1);
        }
    }
    zst_total(st, out);
}

/* lane += sum over pairs of p * scale (the scales of 16 rows, twice each). */
static inline __m512i zmadd_acc(__m512i acc, __m512i p, __m512i sc) {
#if defined(CM_G_VNNI)
    return _mm512_dpwssd_epi32(acc, p, sc);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, sc));
#endif
}

/* K-quants: the same over super-blocks of 256; a super-block's lanes stay int32 (cm_qacc adds its
 * sub-blocks' scaled sums exactly) and meet the float state once per super-block. Values 16 sb + 4 s ..
 * + 3 are lane 4 (sb % 2) + s. */
static void zmicro_k(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out) {
    const uint8_t *q = t->q + (size_t)g * ZGR * (size_t)t->k;
    size_t gb = (size_t)g * (size_t)t->nb, kq4 = (size_t)t->k / 4;
    const float *dp = t->d + gb * ZGR, *mp = t->m + gb * ZGR;
    const __m512 neg = _mm512_set1_ps(-0.0f);
    float st[ZST_FLOATS];
    memset(st, 0, sizeof st);
    for (int64_t b = 0; b < t->nb; b++) /* one super-block is a quarter of ZKC: chunks of one */
        for (int j = 0; j < NR; j += 2) {
            const cm_block_q8_k *xa = xk[j] + b, *xb = xk[j + 1] + b;
            __m512i I0[8], I1[8];
            for (int l = 0; l < 8; l++) I0[l] = I1[l] = _mm512_setzero_si512();
            const uint8_t *qb = q + (size_t)b * CM_QK_K * ZGR;
            const int16_t *sc = t->sc + (gb + (size_t)b) * 16 * ZGR * 2;
            const int32_t *cb0 = t->xc + (size_t)j * kq4 + 64 * b, *cb1 = cb0 + kq4;
            for (int sp = 0; sp < 16; sp += 2) /* sub-blocks sp, sp + 1: lanes 0..3, 4..7 (constant indices */
#pragma GCC unroll 2                               /* keep I0, I1 in registers) */
                for (int h = 0; h < 2; h++) {
                    int sb = sp + h;
                    __m512i scv = _mm512_loadu_si512((const void *)(sc + sb * ZGR * 2));
#pragma GCC unroll 4
                    for (int s = 0; s < 4; s++) {
                        __m512i u = _mm512_loadu_si512((const void *)(qb + (size_t)(4 * sb + s) * 64));
                        int l = 4 * h + s, v = 16 * sb + 4 * s;
                        __m512i p0 = _mm512_maddubs_epi16(u, zbcast32(xa->qs + v)); /* u <= 63: exact */
                        __m512i p1 = _mm512_maddubs_epi16(u, zbcast32(xb->qs + v));
                        if (t->bias) {
                            p0 = _mm512_sub_epi16(p0, _mm512_set1_epi32(cb0[v / 4]));
                            p1 = _mm512_sub_epi16(p1, _mm512_set1_epi32(cb1[v / 4]));
                        }
                        I0[l] = zmadd_acc(I0[l], p0, scv);
                        I1[l] = zmadd_acc(I1[l], p1, scv);
                    }
                }
            float *s0p = st + (size_t)j * 9 * ZGR, *s1p = s0p + 9 * ZGR;
            __m512 d = _mm512_loadu_ps(dp + ZGR * b);
            __m512 s0 = _mm512_mul_ps(d, _mm512_set1_ps(xa->d)), s1 = _mm512_mul_ps(d, _mm512_set1_ps(xb->d));
            for (int l = 0; l < 8; l++) {
                _mm512_storeu_ps(s0p + l * ZGR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(I0[l]), s0,
                                                                _mm512_loadu_ps(s0p + l * ZGR)));
                _mm512_storeu_ps(s1p + l * ZGR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(I1[l]), s1,
                                                                _mm512_loadu_ps(s1p + l * ZGR)));
            }
            if (t->has_min) { /* e = fmaf((float)imin, -(dmin * d_x), e), imin from Q8_K's bsums */
                const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * ZGR * 2;
                __m512i m0 = _mm512_setzero_si512(), m1 = m0;
                for (int jj = 0; jj < 8; jj++) {
                    __m512i mv = _mm512_loadu_si512((const void *)(mn + jj * ZGR * 2));
                    m0 = zmadd_acc(m0, mv, zbcast32(xa->bsums + 2 * jj));
                    m1 = zmadd_acc(m1, mv, zbcast32(xb->bsums + 2 * jj));
                }
                __m512 dmin = _mm512_loadu_ps(mp + ZGR * b);
                __m512 n0 = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(xa->d)), neg);
                __m512 n1 = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(xb->d)), neg);
                _mm512_storeu_ps(s0p + 8 * ZGR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(m0), n0, _mm512_loadu_ps(s0p + 8 * ZGR)));
                _mm512_storeu_ps(s1p + 8 * ZGR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(m1), n1, _mm512_loadu_ps(s1p + 8 * ZGR)));
            }
        }
    zst_total(st, out);
}

static void gemm_avx512(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                        int64_t ldy, int64_t r0, int64_t r1, void *scratch) {
    tile t;
    tile_layout(&t, wtype, k, ZTR, ZGR, zbias(wtype), scratch);
    size_t rb = (size_t)gguf_row_bytes(wtype, k), kq4 = (size_t)k / 4;
    int xt = cm_quant_vec_dot_type(wtype);
    size_t xbytes = xt == GGUF_TT_Q8_1 ? sizeof(cm_block_q8_1) : xt == GGUF_TT_Q8_K ? sizeof(cm_block_q8_k)
                                                                                   : sizeof(cm_block_q8_0);
    size_t qoff = xt == GGUF_TT_Q8_1 ? offsetof(cm_block_q8_1, qs) : xt == GGUF_TT_Q8_K ? offsetof(cm_block_q8_k, qs)
                                                                                     : offsetof(cm_block_q8_0, qs);
    for (int64_t a = r0; a < r1; a += ZTR) {
        int rows = r1 - a < ZTR ? (int)(r1 - a) : ZTR, groups = (rows + ZGR - 1) / ZGR;
        for (int i = 0; i < groups * ZGR; i++) /* a partial group repeats its last row */
            tile_row(&t, wtype, (const char *)w + (size_t)(a + (i < rows ? i : rows - 1)) * rb, i);
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            const char *xr[NR];
            for (int j = 0; j < NR; j++) {
                xr[j] = (const char *)x + (size_t)(t0 + (j < nt ? j : nt - 1)) * x_stride;
                if (t.bias || !t.kq) zprep_x(&t, xr[j], xbytes, qoff, t.xc + (size_t)j * kq4);
            }
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
                float out[NR * ZGR];
                if (t.kq) zmicro_k(&t, g, (const cm_block_q8_k *const *)xr, out);
                else zmicro_legacy(&t, g, xr, xbytes, qoff, out);
                for (int j = 0; j < nt; j++)
                    for (int r = 0; r < ZGR && ZGR * g + r < rows; r++)
                        y[(int64_t)(t0 + j) * ldy + a + ZGR * g + r] = out[j * ZGR + r];
            }
        }
    }
}
#endif
#endif

void CM_FAMILY_FN(cm_gemm_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                             int64_t ldy, int64_t r0, int64_t r1, void *scratch) {
#if defined(CM_G_AVX512)
    if ((wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) && ztakes(wtype)) {
        gemm_avx512(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch);
        return;
    }
#endif
#if defined(CM_G_AVX2)
    if (wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) {
        gemm_avx2(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch);
        return;
    }
#endif
    (void)scratch;
    cm_matvec_rows_ref(wtype, cm_quant_vec_dot_type(wtype), w, k, x, x_stride, n, y, ldy, r0, r1);
}
