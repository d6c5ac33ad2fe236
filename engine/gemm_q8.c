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
 * 4 activation bytes against 32 weight bytes gives every row its own int32 lane, so a block's sum comes
 * out per row with no horizontal adds. The quad's activations stay in L1 across the tile, the tile in L2
 * across the quads. The AVX-512 families use 512-bit vectors the same way, 16 rows to a group and 64 to
 * a tile (VNNI's dpbusd / dpwssd where the family has them); see "the 512-bit path" below.
 *
 * Every output is the number cm_vec_dot_ref gives for its row and token, bit for bit: the steps of 4
 * values add up in int32 to each block's exact sum (cm_qacc, quants.h), which meets cm_qacc's one FMA
 * per block, in order, for 8 (or 16) (row, token) pairs per vector. A token's result
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
 * scale and one of min; legacy types less), plus one group's stage (tile_group), the token quad's
 * activation scales and sums and alignment slack. The same for every family (the largest tile), so a context sized under one family
 * serves any other. */
size_t CM_FAMILY_FN(cm_gemm_q_scratch_bytes)(int64_t k) {
    return (size_t)k * (ZTR + ZTR / 2 + ZGR + 16) + 8192;
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
 * row (gr, K): the group's rows unpacked before interleaving (tile_group).
 * Per token quad: xd, xs (nb, NR) f32 the activation scale (and Q8_1's s); 512-bit path: xc (NR, xcs)
 * int32. The quads' parts lie one after another, for every quad of the call when the scratch has room
 * (prepared once, not once per tile), else for one (tile_layout). */
typedef struct tile {
    int64_t k, nb;
    int kq, has_min;
    int gr, bias;     /* rows per group; added to every q as it is stored (0 on the 256-bit path) */
    uint8_t *q, *row; /* row: (gr, K) the stage of tile_group */
    float *d, *m, *xd, *xs;
    int16_t *sc, *mn;
    int32_t *xc;      /* 512-bit path, per token (xcs apart): what the bias adds (zprep_x) */
    size_t xcs;       /* K / 4 for K-quants, nb for the legacy types */
} tile;

static void *carve(char **p, size_t bytes) {
    void *r = *p;
    *p += (bytes + 63) & ~(size_t)63;
    return r;
}

/* Lays the tile and nq token quads' scales and sums out in the scratch; returns the bytes it spans. */
static size_t tile_layout(tile *t, int wtype, int64_t k, int tr, int gr, int bias, size_t nq, void *scratch) {
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
    t->row = carve(&p, (size_t)gr * (size_t)k);
    t->d = carve(&p, rows * nb * sizeof(float));
    t->m = carve(&p, rows * nb * sizeof(float));
    t->xcs = t->kq ? (size_t)k / 4 : nb;
    t->xd = carve(&p, nq * NR * nb * sizeof(float));
    t->xs = carve(&p, nq * NR * nb * sizeof(float));
    t->xc = carve(&p, nq * NR * t->xcs * sizeof(int32_t));
    if (t->kq) {
        t->sc = carve(&p, rows * nb * 32 * sizeof(int16_t));
        t->mn = carve(&p, rows * nb * 16 * sizeof(int16_t));
    }
    return (size_t)(p - (char *)scratch);
}

/* Repack group g of the tile from the weight rows wr[0..gr): each row unpacked as signed bytes into the
 * stage (gr, K) (legacy types through quants_simd.c's SIMD row unpacker, K-quants block by block through
 * the reference's), its scales into the group's d, m (K-quants: sc, mn too); then the stage interleaved
 * into the group's q with the bias added, one gather of a value quad across the gr rows per store. Done
 * per call rather than once at load: a repacked copy would double the weights' resident memory, as
 * decode reads the original blocks; this keeps the repacking a few percent of a prefill's time. */
static void tile_group(tile *t, int wtype, const char *const *wr, int g) {
    size_t gr = (size_t)t->gr, nb = (size_t)t->nb, k = (size_t)t->k;
    float *d = t->d + (size_t)g * gr * nb, *m = t->m + (size_t)g * gr * nb;
    size_t bb = (size_t)gguf_row_bytes(wtype, cm_quant_block_values(wtype));
    for (size_t r = 0; r < gr; r++) {
        int8_t *q = (int8_t *)t->row + r * k;
        if (!t->kq) {
            CM_FAMILY_FN(cm_quant_unpack_legacy_row)(wtype, wr[r], t->nb, q, d + r, m + r, gr);
            continue;
        }
        for (size_t b = 0; b < nb; b++) {
            cm_k_unpacked u;
            cm_quant_unpack_k(wtype, wr[r] + b * bb, &u);
            memcpy(q + b * CM_QK_K, u.q, CM_QK_K);
            int16_t *sc = t->sc + ((size_t)g * nb + b) * 16 * gr * 2, *mn = t->mn + ((size_t)g * nb + b) * 8 * gr * 2;
            for (int j = 0; j < 16; j++) { /* per 16 values, whatever the type's sub-block */
                int s = j * 16 / u.sub;
                sc[((size_t)j * gr + r) * 2] = sc[((size_t)j * gr + r) * 2 + 1] = u.sc[s];
                mn[((size_t)(j / 2) * gr + r) * 2 + (size_t)(j % 2)] = u.mn[s];
            }
            d[b * gr + r] = u.d;
            m[b * gr + r] = u.dmin;
        }
    }
    /* value v of row r goes to (v / 4, r, v % 4) of the group */
    uint8_t *gq = t->q + (size_t)g * gr * k;
    const uint8_t *st = t->row;
#if defined(CM_G_AVX512)
    if (gr == ZGR) {
        const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)k));
        const __m512i bias = _mm512_set1_epi8((char)t->bias);
        for (size_t v = 0; v < k; v += 4)
            _mm512_storeu_si512((void *)(gq + v * gr), _mm512_add_epi8(_mm512_i32gather_epi32(idx, (const void *)(st + v), 1), bias));
        return;
    }
#endif
    const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)k));
    const __m256i bias = _mm256_set1_epi8((char)t->bias);
    for (size_t v = 0; v < k; v += 4)
        _mm256_storeu_si256((__m256i *)(gq + v * gr),
                            _mm256_add_epi8(_mm256_i32gather_epi32((const int *)(const void *)(st + v), idx, 1), bias));
}

/* Group by group, the tile of weight rows [a, a + rows) (a partial group repeats its last row). */
static void tile_fill(tile *t, int wtype, const void *w, size_t rb, int64_t a, int rows, int groups) {
    for (int g = 0; g < groups; g++) {
        const char *wr[ZGR];
        for (int r = 0; r < t->gr; r++) {
            int i = g * t->gr + r;
            wr[r] = (const char *)w + (size_t)(a + (i < rows ? i : rows - 1)) * rb;
        }
        tile_group(t, wtype, wr, g);
    }
}

/* A legacy token quad's activation scales per block, (nb, NR): Q8_0's d, or Q8_1's d and s. */
static void quad_scales(tile *t, int xt, const char *const xr[NR]) {
    for (int64_t b = 0; b < t->nb; b++)
        for (int j = 0; j < NR; j++) {
            float sx = 0.0f, dx;
            if (xt == GGUF_TT_Q8_1) {
                const cm_block_q8_1 *xb = (const cm_block_q8_1 *)xr[j] + b;
                dx = _cvtsh_ss(xb->d);
                sx = _cvtsh_ss(xb->s);
            } else {
                dx = _cvtsh_ss(((const cm_block_q8_0 *)xr[j])[b].d);
            }
            t->xd[NR * b + j] = dx;
            t->xs[NR * b + j] = sx;
        }
}

static inline __m256i bcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Four weight values of 8 rows (w, signed bytes) times 4 activation bytes at x: per row the int32 sum
 * of the four products (|q| <= 128 and |x| <= 127 keep maddubs' pairs within int16). `mul` weights the
 * pairs (1, or a K-quant's sub-block scale). */
static inline __m256i lane4(__m256i w, const void *x, __m256i mul) {
    __m256i aw = _mm256_sign_epi8(w, w), xv = _mm256_sign_epi8(bcast32(x), w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), mul);
}

/* Legacy types and Q8_0: group g (8 rows) x 4 tokens (xq[j]: their rows; blocks `xbytes` apart, qs at
 * `qoff`). A block's 8 steps of 4 values add up in int32, exactly, to each row's block sum, which meets
 * cm_qacc's one FMA. Each weight load serves the four tokens, whose accumulators stay in registers. */
static void micro_legacy(const tile *t, int g, const char *const xq[NR], size_t xbytes, size_t qoff, float *out) {
    const uint8_t *q = t->q + (size_t)g * GR * (size_t)t->k;
    const float *dp = t->d + (size_t)g * GR * (size_t)t->nb, *mp = t->m + (size_t)g * GR * (size_t)t->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NR], e[NR];
    for (int j = 0; j < NR; j++) acc[j] = e[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * 32 * GR;
        __m256i is[NR];
        for (int j = 0; j < NR; j++) is[j] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(qb + 32 * s));
            for (int j = 0; j < NR; j++)
                is[j] = _mm256_add_epi32(is[j], lane4(w, xq[j] + (size_t)b * xbytes + qoff + 4 * s, ones));
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++) {
            __m256 sv = _mm256_mul_ps(d, _mm256_set1_ps(t->xd[NR * b + j]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j]), sv, acc[j]);
        }
        if (t->has_min) { /* e = fmaf(m, s_x, e) */
            __m256 m = _mm256_loadu_ps(mp + GR * b);
            for (int j = 0; j < NR; j++) e[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(t->xs[NR * b + j]), e[j]);
        }
    }
    for (int j = 0; j < NR; j++) _mm256_storeu_ps(out + j * GR, _mm256_add_ps(acc[j], e[j]));
}

/* K-quants: the same shape over super-blocks of 256, xk[j] the tokens' Q8_K rows: the super-block's
 * scaled sums add up in int32 before its one FMA. */
static void micro_k(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out) {
    const uint8_t *q = t->q + (size_t)g * GR * (size_t)t->k;
    size_t gb = (size_t)g * (size_t)t->nb;
    const float *dp = t->d + gb * GR, *mp = t->m + gb * GR;
    const __m256 neg = _mm256_set1_ps(-0.0f);
    __m256 acc[NR], e[NR];
    for (int j = 0; j < NR; j++) acc[j] = e[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        __m256i is[NR];
        for (int j = 0; j < NR; j++) is[j] = _mm256_setzero_si256();
        const uint8_t *qb = q + (size_t)b * CM_QK_K * GR;
        const int16_t *sc = t->sc + (gb + (size_t)b) * 16 * GR * 2;
        for (int sb = 0; sb < 16; sb++) {
            __m256i scv = _mm256_loadu_si256((const __m256i *)(sc + sb * GR * 2));
            for (int s = 0; s < 4; s++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(qb + (size_t)(4 * sb + s) * 32));
                for (int j = 0; j < NR; j++)
                    is[j] = _mm256_add_epi32(is[j], lane4(w, xk[j][b].qs + 16 * sb + 4 * s, scv));
            }
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j]), _mm256_mul_ps(d, _mm256_set1_ps(xk[j][b].d)), acc[j]);
        if (t->has_min) { /* e = fmaf((float)imin, -(dmin * d_x), e), imin from Q8_K's bsums */
            const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * GR * 2;
            __m256 dmin = _mm256_loadu_ps(mp + GR * b);
            for (int j = 0; j < NR; j++) {
                __m256i mins = _mm256_setzero_si256();
                for (int jj = 0; jj < 8; jj++)
                    mins = _mm256_add_epi32(mins, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(mn + jj * GR * 2)),
                                                                    bcast32(xk[j][b].bsums + 2 * jj)));
                __m256 c = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_set1_ps(xk[j][b].d)), neg);
                e[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), c, e[j]);
            }
        }
    }
    for (int j = 0; j < NR; j++) _mm256_storeu_ps(out + j * GR, _mm256_add_ps(acc[j], e[j]));
}

static void gemm_avx2(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                      int64_t ldy, int64_t r0, int64_t r1, void *scratch) {
    tile t;
    tile_layout(&t, wtype, k, TR, GR, 0, 1, scratch);
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    int xt = cm_quant_vec_dot_type(wtype);
    size_t xbytes = xt == GGUF_TT_Q8_1 ? sizeof(cm_block_q8_1) : sizeof(cm_block_q8_0);
    size_t qoff = xt == GGUF_TT_Q8_1 ? offsetof(cm_block_q8_1, qs) : offsetof(cm_block_q8_0, qs);
    for (int64_t a = r0; a < r1; a += TR) {
        int rows = r1 - a < TR ? (int)(r1 - a) : TR, groups = (rows + GR - 1) / GR;
        tile_fill(&t, wtype, w, rb, a, rows, groups);
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            const char *xr[NR];
            for (int j = 0; j < NR; j++) xr[j] = (const char *)x + (size_t)(t0 + (j < nt ? j : nt - 1)) * x_stride;
            if (!t.kq) quad_scales(&t, xt, xr);
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
 * (VNNI's dpbusd, maddubs) take one operand unsigned; what the bias adds is taken off exactly, from the
 * activation sums in t->xc. The block sums and their FMAs are cm_qacc's, as above. */

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

/* The bias's share for the nb blocks of row x (blocks `xbytes` apart, qs at `qoff`) into xc. Legacy
 * (32-value blocks): -bias * (x0 + .. + x31) per block, the initial value of its dot. K-quants (256):
 * bias * (x0 + x1), bias * (x2 + x3) as two int16 per 4 values (what maddubs's pairs exceed q * x by). */
static void zprep_x(const tile *t, const char *x, size_t xbytes, size_t qoff, int32_t *xc) {
    const __m256i bias = _mm256_set1_epi8((char)t->bias);
    for (int64_t b = 0; b < t->nb; b++) {
        const char *xb = x + (size_t)b * xbytes + qoff;
        if (!t->kq) {
            __m256i p = _mm256_maddubs_epi16(bias, _mm256_loadu_si256((const __m256i *)xb)); /* no saturation */
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(_mm256_madd_epi16(p, _mm256_set1_epi16(1))),
                                      _mm256_extracti128_si256(_mm256_madd_epi16(p, _mm256_set1_epi16(1)), 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
            xc[b] = -_mm_cvtsi128_si32(s);
            continue;
        }
        for (int c = 0; c < CM_QK_K / 32; c++)
            _mm256_storeu_si256((__m256i *)(xc + (b * 8 + c) * 8),
                                _mm256_maddubs_epi16(bias, _mm256_loadu_si256((const __m256i *)(xb + 32 * c))));
    }
}

/* acc + the int32 dot of 4 values of 16 rows (u, the group's 64 bytes) with the 4 activation bytes at x. */
static inline __m512i zdot4(__m512i acc, __m512i u, const void *x) {
#if defined(CM_G_VNNI)
    return _mm512_dpbusd_epi32(acc, u, zbcast32(x));
#else /* u <= 31 here: maddubs's pairs stay within int16 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, zbcast32(x)), _mm512_set1_epi16(1)));
#endif
}

/* Legacy types and Q8_0: group g (16 rows) x the quad's tokens; out[j * ZGR + r] is (row r, token j).
 * Each weight load serves all four tokens; a block's sums run in two int32 chains per token (even and
 * odd steps, the first started at the bias's share) added before the block's one FMA. */
static void zmicro_legacy(const tile *t, int g, const char *const xq[NR], size_t xbytes, size_t qoff, float *out) {
    const uint8_t *q = t->q + (size_t)g * ZGR * (size_t)t->k;
    const float *dp = t->d + (size_t)g * ZGR * (size_t)t->nb, *mp = t->m + (size_t)g * ZGR * (size_t)t->nb;
    size_t kq4 = t->xcs;
    __m512 acc[NR], e[NR];
    for (int j = 0; j < NR; j++) acc[j] = e[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * 32 * ZGR;
        const char *xb[NR];
        __m512i i0[NR], i1[NR];
        for (int j = 0; j < NR; j++) {
            xb[j] = xq[j] + (size_t)b * xbytes + qoff;
            i0[j] = _mm512_set1_epi32(t->xc[(size_t)j * kq4 + (size_t)b]);
            i1[j] = _mm512_setzero_si512();
        }
        for (int s = 0; s < 8; s += 2) {
            __m512i u0 = _mm512_loadu_si512((const void *)(qb + 64 * s));
            __m512i u1 = _mm512_loadu_si512((const void *)(qb + 64 * (s + 1)));
            for (int j = 0; j < NR; j++) {
                i0[j] = zdot4(i0[j], u0, xb[j] + 4 * s);
                i1[j] = zdot4(i1[j], u1, xb[j] + 4 * s + 4);
            }
        }
        __m512 d = _mm512_loadu_ps(dp + ZGR * b);
        for (int j = 0; j < NR; j++) {
            __m512 sv = _mm512_mul_ps(d, _mm512_set1_ps(t->xd[NR * b + j]));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0[j], i1[j])), sv, acc[j]);
        }
        if (t->has_min) { /* e = fmaf(m, s_x, e) */
            __m512 m = _mm512_loadu_ps(mp + ZGR * b);
            for (int j = 0; j < NR; j++) e[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(t->xs[NR * b + j]), e[j]);
        }
    }
    for (int j = 0; j < NR; j++) _mm512_storeu_ps(out + j * ZGR, _mm512_add_ps(acc[j], e[j]));
}

/* sum += p * scale over pairs (the scales of 16 rows, twice each). */
static inline __m512i zmadd_acc(__m512i acc, __m512i p, __m512i sc) {
#if defined(CM_G_VNNI)
    return _mm512_dpwssd_epi32(acc, p, sc);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, sc));
#endif
}

/* K-quants: the same over super-blocks of 256, all four tokens per weight load, two int32 chains per
 * token (sub-blocks of even and odd index) added before the super-block's one FMA. */
static void zmicro_k(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out) {
    const uint8_t *q = t->q + (size_t)g * ZGR * (size_t)t->k;
    size_t gb = (size_t)g * (size_t)t->nb, kq4 = t->xcs;
    const float *dp = t->d + gb * ZGR, *mp = t->m + gb * ZGR;
    const __m512 neg = _mm512_set1_ps(-0.0f);
    __m512 acc[NR], e[NR];
    for (int j = 0; j < NR; j++) acc[j] = e[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * CM_QK_K * ZGR;
        const int16_t *sc = t->sc + (gb + (size_t)b) * 16 * ZGR * 2;
        __m512i is[2][NR];
        for (int j = 0; j < NR; j++) is[0][j] = is[1][j] = _mm512_setzero_si512();
        for (int sp = 0; sp < 16; sp += 2)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) { /* h constant after unrolling: is[h] stays in registers */
                int sb = sp + h;
                __m512i scv = _mm512_loadu_si512((const void *)(sc + sb * ZGR * 2));
                for (int s = 0; s < 4; s++) {
                    __m512i u = _mm512_loadu_si512((const void *)(qb + (size_t)(4 * sb + s) * 64));
                    int v = 16 * sb + 4 * s;
                    for (int j = 0; j < NR; j++) {
                        __m512i p = _mm512_maddubs_epi16(u, zbcast32(xk[j][b].qs + v)); /* u <= 63: exact */
                        if (t->bias) p = _mm512_sub_epi16(p, _mm512_set1_epi32(t->xc[(size_t)j * kq4 + 64 * (size_t)b + (size_t)v / 4]));
                        is[h][j] = zmadd_acc(is[h][j], p, scv);
                    }
                }
            }
        __m512 d = _mm512_loadu_ps(dp + ZGR * b);
        for (int j = 0; j < NR; j++) {
            __m512 sv = _mm512_mul_ps(d, _mm512_set1_ps(xk[j][b].d));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(is[0][j], is[1][j])), sv, acc[j]);
        }
        if (t->has_min) { /* e = fmaf((float)imin, -(dmin * d_x), e), imin from Q8_K's bsums */
            const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * ZGR * 2;
            __m512 dmin = _mm512_loadu_ps(mp + ZGR * b);
            for (int j = 0; j < NR; j++) {
                __m512i mins = _mm512_setzero_si512();
                for (int jj = 0; jj < 8; jj++)
                    mins = zmadd_acc(mins, _mm512_loadu_si512((const void *)(mn + jj * ZGR * 2)),
                                     zbcast32(xk[j][b].bsums + 2 * jj));
                __m512 c = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(xk[j][b].d)), neg);
                e[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), c, e[j]);
            }
        }
    }
    for (int j = 0; j < NR; j++) _mm512_storeu_ps(out + j * ZGR, _mm512_add_ps(acc[j], e[j]));
}

/* Token quad t0 / NR's activation rows into xr (a short last quad repeats its last token), and unless
 * `prepared`, their scales and bias sums into the tile's current quad slot. */
static void zquad(tile *t, int xt, size_t xbytes, size_t qoff, const void *x, size_t x_stride, int n, int t0,
                  int prepared, const char *xr[NR]) {
    int nt = n - t0 < NR ? n - t0 : NR;
    for (int j = 0; j < NR; j++) {
        xr[j] = (const char *)x + (size_t)(t0 + (j < nt ? j : nt - 1)) * x_stride;
        if (!prepared && (t->bias || !t->kq)) zprep_x(t, xr[j], xbytes, qoff, t->xc + (size_t)j * t->xcs); /* legacy: 0 for bias 0 */
    }
    if (!prepared && !t->kq) quad_scales(t, xt, xr);
}

static void gemm_avx512(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                        int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes) {
    tile t;
    size_t nq = ((size_t)n + NR - 1) / NR;
    int all = tile_layout(&t, wtype, k, ZTR, ZGR, zbias(wtype), nq, scratch) <= scratch_bytes;
    if (!all) tile_layout(&t, wtype, k, ZTR, ZGR, zbias(wtype), 1, scratch);
    size_t rb = (size_t)gguf_row_bytes(wtype, k), nb = (size_t)t.nb;
    int xt = cm_quant_vec_dot_type(wtype);
    size_t xbytes = xt == GGUF_TT_Q8_1 ? sizeof(cm_block_q8_1) : xt == GGUF_TT_Q8_K ? sizeof(cm_block_q8_k)
                                                                                   : sizeof(cm_block_q8_0);
    size_t qoff = xt == GGUF_TT_Q8_1 ? offsetof(cm_block_q8_1, qs) : xt == GGUF_TT_Q8_K ? offsetof(cm_block_q8_k, qs)
                                                                                     : offsetof(cm_block_q8_0, qs);
    float *xd0 = t.xd, *xs0 = t.xs;
    int32_t *xc0 = t.xc;
    const char *xr[NR];
    if (all) /* every quad's scales and sums once, for all the tiles */
        for (size_t q = 0; q < nq; q++) {
            t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xc = xc0 + q * NR * t.xcs;
            zquad(&t, xt, xbytes, qoff, x, x_stride, n, (int)q * NR, 0, xr);
        }
    for (int64_t a = r0; a < r1; a += ZTR) {
        int rows = r1 - a < ZTR ? (int)(r1 - a) : ZTR, groups = (rows + ZGR - 1) / ZGR;
        tile_fill(&t, wtype, w, rb, a, rows, groups);
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            if (all) {
                size_t q = (size_t)t0 / NR;
                t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xc = xc0 + q * NR * t.xcs;
            }
            zquad(&t, xt, xbytes, qoff, x, x_stride, n, t0, all, xr);
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
                             int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes) {
#if defined(CM_G_AVX512)
    if ((wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) && ztakes(wtype)) {
        gemm_avx512(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes);
        return;
    }
#endif
#if defined(CM_G_AVX2)
    if (wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) {
        gemm_avx2(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch);
        return;
    }
#endif
    (void)scratch, (void)scratch_bytes;
    cm_matvec_rows_ref(wtype, cm_quant_vec_dot_type(wtype), w, k, x, x_stride, n, y, ldy, r0, r1);
}
