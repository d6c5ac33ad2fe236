/*
 * gemm_q8.c - the prefill product of quantised weights with int8 activations, for one kernel family
 * (kernels_family.h; built once per family like quants_simd.c): y (N, M) = x (N, K) W (M, K)^T, x
 * already quantised row by row to the format the weight type pairs with (cm_quant_vec_dot_type).
 *
 * A decode dot unpacks every weight block it reads; a prefill batch has enough tokens to unpack each
 * weight row once and reuse it. So W is taken 64 rows at a time (a "tile"), repacked into the caller's
 * scratch through quants_simd.c's row unpackers (the dots' SIMD decoders, held byte for byte to the
 * references' cm_quant_unpack_* by the tests) as plain bytes, 8 rows interleaved 4 values at a time,
 * with their scales spread into the int16 vectors the integer dots multiply by; then each quad of
 * tokens meets the tile 8 rows at a time: a broadcast of 4 activation bytes against 32 weight bytes
 * gives every row its own int32 lane, so a block's sum comes out per row with no horizontal adds. The
 * quad's activations stay in L1 across the tile, the tile in L2 across the quads. On the 256-bit path
 * the products' int16 pair sums add up over several steps before they are widened, and signed weights
 * meet the activations offset to unsigned, their offset taken off per row and block from the repacking
 * ("the 256-bit path" below). The AVX-512 families use 512-bit vectors the same way, 16 rows to a
 * group (VNNI's dpbusd / dpwssd where the family has them); see "the 512-bit path" below.
 *
 * Every output is the number cm_vec_dot_ref gives for its row and token, bit for bit: the steps of 4
 * values add up in int32 to each block's exact sum (cm_qacc, quants.h), which meets cm_qacc's one FMA
 * per block, in order, for 8 (or 16) (row, token) pairs per vector. A token's result
 * therefore depends on nothing else in the batch, nor on the tile, the thread split or the kernel
 * family (the scalar family calls the reference), and equals the decode matvec's.
 */
#include <stddef.h>
#include <stdlib.h>
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

#define TR 64 /* weight rows repacked at a time (256-bit path): eight groups */
#define GR 8  /* rows per group (256-bit path): one int32 lane each */
#define ZTR 64 /* the same for the 512-bit path: four groups of ZGR */
#define ZGR 16
#define NR 4  /* tokens per micro-tile */
#define PK_GROUP_MAJOR 32 /* tokens up to which a packed matrix's window runs group by group */

/* The scratch a tile needs, at most (K-quants: per value its byte, per 16 values and row two int16 of
 * scale and one of min; legacy types less: per value its byte, per block and row two f32 scales and an
 * int32 correction), plus one group's stage (tile_group), the token quad's activation bytes, scales and
 * sums and alignment slack. The same for every family (the largest tile), so a context sized under one
 * family serves any other. */
size_t CM_FAMILY_FN(cm_gemm_q_scratch_bytes)(int64_t k) {
    return (size_t)k * (ZTR + ZTR / 2 + ZGR + 16) + 8192;
}

/* The rows of x from which cm_gemm_q beats the matvec kernels on the same weights: below it the matvec's
 * one pass per token costs less than unpacking a tile. Measured per family on a Zen 5 core (weights of
 * width 256 to 1536, in cache and out), where the two cost the same: the legacy types and Q8_0 from 4-5
 * rows, the K-quants from 7 to past 16 (Q6_K's many small scales make its tiles dear; 16, what it was
 * before, stands for "not below"). The results are the same bits either way. */
int CM_FAMILY_FN(cm_gemm_q_min_rows)(int wtype) {
#if defined(CM_G_AVX2)
    enum { VNNI = 0, Z = 1, Y = 2 };
#if defined(CM_G_VNNI)
    const int f = VNNI;
#elif defined(CM_G_AVX512)
    const int f = Z;
#else
    const int f = Y;
#endif
    /*                                     VNNI  AVX-512  AVX2 */
    static const unsigned char kq[5][3] = {{14, 16, 16},  /* Q2_K */
                                           {10, 11, 11},  /* Q3_K */
                                           {9, 12, 10},   /* Q4_K */
                                           {8, 10, 8},    /* Q5_K */
                                           {16, 16, 12}}; /* Q6_K */
    switch (wtype) {
    case GGUF_TT_Q8_0:
    case GGUF_TT_Q4_0:
    case GGUF_TT_Q4_1:
    case GGUF_TT_Q5_0:
    case GGUF_TT_Q5_1: return 5;
    case GGUF_TT_Q2_K: return kq[0][f];
    case GGUF_TT_Q3_K: return kq[1][f];
    case GGUF_TT_Q4_K: return kq[2][f];
    case GGUF_TT_Q5_K: return kq[3][f];
    case GGUF_TT_Q6_K: return kq[4][f];
    default: return 16;
    }
#else
    (void)wtype;
    return 16; /* the scalar family's product is the reference matvec itself */
#endif
}

#if defined(CM_G_AVX2)

#define CM_ALWAYS_INLINE static inline __attribute__((always_inline))

/* Where a tile lives in the scratch: TR / GR groups of GR rows, interleaved so that one 32-byte load
 * holds 4 consecutive values of each of the group's 8 rows, and one activation broadcast of those 4
 * values meets all 8 rows (maddubs + madd leave one int32 per row: no horizontal sums). Per group:
 * q (K / 4, GR, 4) bytes: the unpacked q as int8, signed as the format defines it, plus `bias` (the
 *   512-bit path's; 0 on the 256-bit path);
 * d, m (nb, GR) f32: the rows' scales per block (K-quants: d, dmin);
 * K-quants: sc (nb, 16, GR, 2) int16: each 16 values' scale, twice per row (madd's pairs); mn
 *   (nb, 8, GR, 2) int16: the min of 16 values 2j, 2j + 1, to meet Q8_K's bsums;
 * flip types (the 256-bit path's signed q but Q8_0's, see flips): corr (nb, GR) int32, each row's
 *   -128 * sum over the block of its q (K-quants: times each 16 values' scale).
 * row (gr, K): the group's rows unpacked before interleaving (tile_group).
 * Per token quad: xd, xs (nb, NR) f32 the activation scale (and Q8_1's s); 256-bit path: xq (NR, K)
 * the activation bytes, plain or (flip) plus 128; 512-bit path: xc (NR, xcs) int32. The quads' parts
 * lie one after another, for every quad of the call when the scratch has room (prepared once, not once
 * per tile), else for one (tile_layout). */
typedef struct tile {
    int64_t k, nb;
    int kq, has_min;
    int gr, bias;     /* rows per group; added to every q as it is stored (0 on the 256-bit path) */
    int flip;         /* 256-bit path: q signed, x taken as x + 128 (see flips) */
    int s32;          /* K-quants, VNNI's 512-bit path: sc holds one int32 per sub-block and row, and mn
                       * (types without mins) the scales, for the bias's share (zmicro_k_vnni) */
    int nsub;         /* K-quants: sub-blocks per super-block, 8 (32 values each) or 16 */
    uint8_t *q, *row; /* row: (gr, K) the stage of tile_group */
    float *d, *m, *xd, *xs;
    int16_t *sc, *mn;
    int32_t *xc;      /* 512-bit path, per token (xcs apart): what the bias adds (zprep_x) */
    size_t xcs;       /* K / 4 for K-quants, nb for the legacy types */
    int32_t *corr;    /* 256-bit path, flip types */
    uint8_t *xq;      /* 256-bit path */
} tile;

static void *carve(char **p, size_t bytes) {
    void *r = *p;
    *p += (bytes + 63) & ~(size_t)63;
    return r;
}

/* The tile's shape and flags for wtype (its arrays: tile_layout, or a pack's window). */
static void tile_flags(tile *t, int wtype, int64_t k, int gr, int bias, int flip) {
    t->k = k;
    t->gr = gr;
    t->bias = bias;
    t->flip = flip;
    t->s32 = 0;
    t->kq = cm_quant_block_values(wtype) == CM_QK_K;
    t->nsub = wtype == GGUF_TT_Q4_K || wtype == GGUF_TT_Q5_K ? 8 : 16;
    t->nb = k / (t->kq ? CM_QK_K : 32);
    t->has_min = wtype == GGUF_TT_Q2_K || wtype == GGUF_TT_Q4_K || wtype == GGUF_TT_Q5_K ||
                 wtype == GGUF_TT_Q4_1 || wtype == GGUF_TT_Q5_1; /* K-quants: dmin; legacy: m */
}

/* Lays the tile and nq token quads' activation parts out in the scratch (the 256-bit path's, gr == GR,
 * or the 512-bit path's); returns the bytes it spans. */
static size_t tile_layout(tile *t, int wtype, int64_t k, int tr, int gr, int bias, int flip, size_t nq,
                          void *scratch) {
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    tile_flags(t, wtype, k, gr, bias, flip);
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
    t->xc = carve(&p, gr == GR ? 0 : nq * NR * t->xcs * sizeof(int32_t));
    t->corr = carve(&p, flip ? rows * nb * sizeof(int32_t) : 0);
    t->xq = carve(&p, gr == GR ? nq * NR * (size_t)k : 0);
    if (t->kq) {
        t->sc = carve(&p, rows * nb * 32 * sizeof(int16_t));
        t->mn = carve(&p, rows * nb * 16 * sizeof(int16_t));
    }
    return (size_t)(p - (char *)scratch);
}

/* The sum of 16 int8 (the unsigned sum of q + 128, less 16 * 128). */
static inline int32_t sum16_i8(const int8_t *q) {
    __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(const void *)q), _mm_set1_epi8((char)0x80));
    v = _mm_sad_epu8(v, _mm_setzero_si128());
    return _mm_cvtsi128_si32(v) + _mm_extract_epi16(v, 4) - 16 * 128;
}

/* Repack group g of the tile from the weight rows wr[0..gr): each row unpacked as signed bytes into the
 * stage (gr, K) by quants_simd.c's SIMD row unpackers (bit-exact with the references' own), its scales
 * into the group's d, m (K-quants: sc, mn too), a flip tile's corr from the stage's sums; then the stage
 * interleaved into the group's q with the bias added, by in-register transposes of the stage's 4-byte
 * quads. Done per call rather than once at load: a repacked copy would double the weights' resident
 * memory, as decode reads the original blocks; this keeps the repacking a few percent of a prefill's
 * time. */
static void tile_group(tile *t, int wtype, const char *const *wr, int g) {
    size_t gr = (size_t)t->gr, nb = (size_t)t->nb, k = (size_t)t->k;
    float *d = t->d + (size_t)g * gr * nb, *m = t->m + (size_t)g * gr * nb;
    int32_t *corr = t->flip ? t->corr + (size_t)g * gr * nb : NULL;
    size_t bb = (size_t)gguf_row_bytes(wtype, cm_quant_block_values(wtype));
    const int nsub = t->nsub;
    int32_t *sc32g = (int32_t *)(void *)t->sc + (size_t)g * nb * (size_t)nsub * gr;
    for (size_t r = 0; r < gr; r++) {
        int8_t *q = (int8_t *)t->row + r * k;
        if (!t->kq) {
            CM_FAMILY_FN(cm_quant_unpack_legacy_row)(wtype, wr[r], t->nb, q, d + r, m + r, gr);
            if (corr)
                for (size_t b = 0; b < nb; b++)
                    corr[b * gr + r] = -128 * (sum16_i8(q + 32 * b) + sum16_i8(q + 32 * b + 16));
            continue;
        }
        /* the row's q straight into the stage, its scales a few blocks at a time */
        for (size_t b0 = 0; b0 < nb; b0 += 8) {
            size_t nbc = nb - b0 < 8 ? nb - b0 : 8;
            float bd[8], bm[8];
            int16_t sc16[8 * 16], mn16[8 * 16];
            CM_FAMILY_FN(cm_quant_unpack_k_row)(wtype, wr[r] + b0 * bb, (int64_t)nbc, q + b0 * CM_QK_K, bd, bm, sc16, mn16);
            for (size_t i = 0; i < nbc; i++) {
                size_t b = b0 + i;
                const int16_t *bs = sc16 + 16 * i, *bn = mn16 + 16 * i;
                int16_t *sc = t->sc + ((size_t)g * nb + b) * 16 * gr * 2, *mn = t->mn + ((size_t)g * nb + b) * 8 * gr * 2;
                d[b * gr + r] = bd[i];
                m[b * gr + r] = bm[i];
                if (t->s32) { /* sc (nb, nsub, gr) int32, the sub-blocks' scales; mn the pairs (mins or scales) */
                    int32_t *sc32 = sc32g + b * (size_t)nsub * gr + r;
                    const int16_t *pm = t->has_min ? bn : bs;
                    for (int s = 0; s < nsub; s++) sc32[(size_t)s * gr] = bs[s * (16 / nsub)];
                    for (int jj = 0; jj < 8; jj++) memcpy(mn + ((size_t)jj * gr + r) * 2, pm + 2 * jj, 2 * sizeof(int16_t));
                    continue;
                }
                int32_t qs = 0; /* sum of q times the scales, for corr */
                for (int j = 0; j < 16; j++) {
                    sc[((size_t)j * gr + r) * 2] = sc[((size_t)j * gr + r) * 2 + 1] = bs[j];
                    mn[((size_t)(j / 2) * gr + r) * 2 + (size_t)(j % 2)] = bn[j];
                    if (corr) qs += bs[j] * sum16_i8(q + b * CM_QK_K + 16 * j);
                }
                if (corr) corr[b * gr + r] = -128 * qs;
            }
        }
    }
    /* value v of row r goes to (v / 4, r, v % 4) of the group: a transpose of (gr, K / 4) 4-byte
     * quads, done square by square in registers (gr x gr quads: 64 values of each of 16 rows, or 32 of
     * each of 8), the last part of a row (K % 64 or K % 32 values) by gathers */
    uint8_t *gq = t->q + (size_t)g * gr * k;
    const uint8_t *st = t->row;
    size_t v = 0;
#if defined(CM_G_AVX512)
    if (gr == ZGR) {
        const __m512i bias = _mm512_set1_epi8((char)t->bias);
        for (; v + 64 <= k; v += 64) {
            __m512i r[16], s[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(st + (size_t)i * k + v));
            for (int i = 0; i < 8; i++) { /* per 128-bit lane: quads c, c of rows 2i, 2i + 1 (c = 4L .. 4L + 3) */
                s[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                s[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 4; i++) { /* r[4i + j], lane L: quad 4L + j of rows 4i .. 4i + 3 */
                r[4 * i] = _mm512_unpacklo_epi64(s[4 * i], s[4 * i + 2]);
                r[4 * i + 1] = _mm512_unpackhi_epi64(s[4 * i], s[4 * i + 2]);
                r[4 * i + 2] = _mm512_unpacklo_epi64(s[4 * i + 1], s[4 * i + 3]);
                r[4 * i + 3] = _mm512_unpackhi_epi64(s[4 * i + 1], s[4 * i + 3]);
            }
            for (int j = 0; j < 4; j++) { /* quad 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
                __m512i p0 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(2, 0, 2, 0));
                __m512i p1 = _mm512_shuffle_i32x4(r[j], r[4 + j], _MM_SHUFFLE(3, 1, 3, 1));
                __m512i q0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(2, 0, 2, 0));
                __m512i q1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], _MM_SHUFFLE(3, 1, 3, 1));
                __m512i o[4] = {_mm512_shuffle_i32x4(p0, q0, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(p1, q1, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(p0, q0, _MM_SHUFFLE(3, 1, 3, 1)),
                                _mm512_shuffle_i32x4(p1, q1, _MM_SHUFFLE(3, 1, 3, 1))};
                for (int L = 0; L < 4; L++)
                    _mm512_storeu_si512((void *)(gq + (v + 4 * (size_t)(4 * L + j)) * gr), _mm512_add_epi8(o[L], bias));
            }
        }
        const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)k));
        for (; v < k; v += 4)
            _mm512_storeu_si512((void *)(gq + v * gr), _mm512_add_epi8(_mm512_i32gather_epi32(idx, (const void *)(st + v), 1), bias));
        return;
    }
#endif
    const __m256i bias = _mm256_set1_epi8((char)t->bias);
    for (; v + 32 <= k; v += 32) {
        __m256i r[8], s[8];
        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(const void *)(st + (size_t)i * k + v));
        for (int i = 0; i < 4; i++) {
            s[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            s[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; i++) { /* r[4i + j], lane L: quad 4L + j of rows 4i .. 4i + 3 */
            r[4 * i] = _mm256_unpacklo_epi64(s[4 * i], s[4 * i + 2]);
            r[4 * i + 1] = _mm256_unpackhi_epi64(s[4 * i], s[4 * i + 2]);
            r[4 * i + 2] = _mm256_unpacklo_epi64(s[4 * i + 1], s[4 * i + 3]);
            r[4 * i + 3] = _mm256_unpackhi_epi64(s[4 * i + 1], s[4 * i + 3]);
        }
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_si256((__m256i *)(void *)(gq + (v + 4 * (size_t)j) * gr),
                                _mm256_add_epi8(_mm256_permute2x128_si256(r[j], r[4 + j], 0x20), bias));
            _mm256_storeu_si256((__m256i *)(void *)(gq + (v + 4 * (size_t)(4 + j)) * gr),
                                _mm256_add_epi8(_mm256_permute2x128_si256(r[j], r[4 + j], 0x31), bias));
        }
    }
    const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)k));
    for (; v < k; v += 4)
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

/* A matrix repacked once (cm_gemm_q_pack): every group of its rows as tile_group lays a group out, the
 * groups one after another in each array, so a tile that starts at a multiple of the group is a window
 * of them (pack_window) and its products are the same bits as after tile_fill. The family part of a
 * cm_gemm_pack (kernels_family.h), one allocation with the arrays after it. */
typedef struct gpack {
    tile t;                   /* the flags, and the arrays' bases (q, d, m, corr, sc, mn) at group 0 */
    int z;                    /* the 512-bit path's tiles (else the 256-bit path's) */
    size_t sq, sdm, ssc, smn; /* per group: q bytes; d, m, corr entries; sc, mn int16 */
    int cached;               /* small enough to stay in L2 between calls (a small model's layer matrix) */
} gpack;

/* Points the weight arrays of t (flags as the pack's) at the pack's groups from row a on (a % gr == 0). */
static void pack_window(tile *t, const gpack *p, int64_t a) {
    size_t g = (size_t)(a / p->t.gr);
    t->q = p->t.q + g * p->sq;
    t->d = p->t.d + g * p->sdm;
    t->m = p->t.m + g * p->sdm;
    t->corr = p->t.corr ? p->t.corr + g * p->sdm : NULL;
    t->sc = p->t.sc ? p->t.sc + g * p->ssc : NULL;
    t->mn = p->t.mn ? p->t.mn + g * p->smn : NULL;
}

/* While a tile meets the tokens, the next tile's weight rows come into L2 a slice per token quad (T1:
 * the L1 prefetches would queue behind the line-fill buffers), so that repacking it reads cache rather
 * than memory: rows [a, a + rows) of W, rb bytes each, in nq slices; slice q now. */
static inline void prefetch_tile_slice(const void *w, size_t rb, int64_t a, int64_t rows, size_t nq, size_t q) {
    if (rows <= 0) return;
    const char *p = (const char *)w + (size_t)a * rb;
    size_t lines = ((size_t)rows * rb + 63) / 64, per = (lines + nq - 1) / nq;
    for (size_t l = q * per; l < q * per + per && l < lines; l++) _mm_prefetch(p + 64 * l, _MM_HINT_T1);
}

static inline __m256i bcast32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* ------------------------------------------------------------ the 256-bit path (AVX2)
 *
 * maddubs multiplies unsigned bytes by signed ones. The types whose q are unsigned (Q4_1, Q5_1, Q2_K,
 * Q4_K, Q5_K) meet the activations as they are; the signed ones (Q4_0, Q5_0, Q3_K, Q6_K) "flip": the
 * activation bytes are taken as x + 128 (one xor per byte, in quad_prep), unsigned, and each row's
 * -128 * sum of q (corr, from the repacking) takes the offset off again, exactly. Q8_0, whose
 * products could exceed maddubs's int16 pairs either way, multiplies |q| by x with q's sign.
 * The int16 pair sums of `chain` steps of 4 values add up in int16 before one madd widens them: a
 * pair is at most 2 * 8 * 255 = 4080 in magnitude for Q4_0 (flipped; Q4_1: 2 * 15 * 128), so eight
 * steps stay below 32768; four of the 5-bit types' 2 * 16 * 255 or 2 * 31 * 128 (Q5_K's too), two of
 * Q6_K's 2 * 32 * 255. Every block's int32 sum is therefore exact, and so is what cm_qacc's one FMA
 * per block sees. */

/* Whether wtype's tile flips (its q are signed, Q8_0 aside). */
static int flips(int wtype) {
    return wtype == GGUF_TT_Q4_0 || wtype == GGUF_TT_Q5_0 || wtype == GGUF_TT_Q3_K || wtype == GGUF_TT_Q6_K;
}

/* The quad's activations for the 256-bit micro-kernels into the tile's current quad slot: their bytes,
 * (NR, K), plus 128 when the tile flips, and (legacy types) their scales per block, (nb, NR): Q8_0's d,
 * or Q8_1's d and s (xs is only read with Q8_1, by the weight types with a min). */
static void quad_prep(tile *t, int xt, const char *const xr[NR]) {
    const size_t k = (size_t)t->k, nb = (size_t)t->nb;
    const __m256i f = _mm256_set1_epi8(t->flip ? (char)0x80 : 0);
    for (int j = 0; j < NR; j++) {
        uint8_t *dst = t->xq + (size_t)j * k;
        if (xt == GGUF_TT_Q8_K) {
            const cm_block_q8_k *xb = (const cm_block_q8_k *)xr[j];
            for (size_t b = 0; b < nb; b++)
                for (size_t c = 0; c < CM_QK_K; c += 32)
                    _mm256_storeu_si256((__m256i *)(dst + b * CM_QK_K + c),
                                        _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xb[b].qs + c)), f));
        } else if (xt == GGUF_TT_Q8_1) {
            const cm_block_q8_1 *xb = (const cm_block_q8_1 *)xr[j];
            for (size_t b = 0; b < nb; b++) {
                _mm256_storeu_si256((__m256i *)(dst + 32 * b),
                                    _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb[b].qs), f));
                t->xd[NR * b + (size_t)j] = _cvtsh_ss(xb[b].d);
                t->xs[NR * b + (size_t)j] = _cvtsh_ss(xb[b].s);
            }
        } else {
            const cm_block_q8_0 *xb = (const cm_block_q8_0 *)xr[j];
            for (size_t b = 0; b < nb; b++) {
                _mm256_storeu_si256((__m256i *)(dst + 32 * b),
                                    _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb[b].qs), f));
                t->xd[NR * b + (size_t)j] = _cvtsh_ss(xb[b].d);
            }
        }
    }
}

/* int16 pair sums of four values of 8 rows (w, the group's 32 bytes) with one token's four activation
 * bytes at x: x unsigned against signed q when the tile flips, else unsigned q against signed x. */
CM_ALWAYS_INLINE __m256i pairs4(__m256i w, const uint8_t *x, int flip) {
    return flip ? _mm256_maddubs_epi16(bcast32(x), w) : _mm256_maddubs_epi16(w, bcast32(x));
}

/* Q8_0: four values of 8 rows (w, signed bytes) times 4 activation bytes at x, per row the int32 sum
 * (|q| <= 128 and |x| <= 127 keep maddubs' pairs within int16). */
static inline __m256i lane4(__m256i w, const void *x) {
    __m256i aw = _mm256_sign_epi8(w, w), xv = _mm256_sign_epi8(bcast32(x), w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), _mm256_set1_epi16(1));
}

/* The legacy min terms of group g, e = fmaf(m, s_x, e) per block in order, a chain apart from acc's
 * (cm_qacc keeps the two apart, so computing it after acc's gives the same bits); out (NR, GR) gets
 * acc + e. */
static void finish_legacy(const tile *t, int g, const __m256 acc[NR], float *out) {
    const float *mp = t->m + (size_t)g * GR * (size_t)t->nb;
    for (int j = 0; j < NR; j++) {
        __m256 e = _mm256_setzero_ps();
        if (t->has_min)
            for (int64_t b = 0; b < t->nb; b++)
                e = _mm256_fmadd_ps(_mm256_loadu_ps(mp + GR * b), _mm256_set1_ps(t->xs[NR * b + j]), e);
        _mm256_storeu_ps(out + j * GR, _mm256_add_ps(acc[j], e));
    }
}

/* Q8_0 weights: group g (8 rows) x the quad (t->xq). A block's 8 steps of 4 values add up in int32 to
 * each row's block sum, which meets cm_qacc's one FMA. */
static void micro_q8_0(const tile *t, int g, const char *const xr[NR], float *out) {
    (void)xr;
    const size_t k = (size_t)t->k;
    const uint8_t *q = t->q + (size_t)g * GR * k;
    const float *dp = t->d + (size_t)g * GR * (size_t)t->nb;
    __m256 acc[NR];
    for (int j = 0; j < NR; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * 32 * GR, *xb = t->xq + (size_t)b * 32;
        __m256i is[NR];
        for (int j = 0; j < NR; j++) is[j] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(qb + 32 * s));
            for (int j = 0; j < NR; j++) is[j] = _mm256_add_epi32(is[j], lane4(w, xb + (size_t)j * k + 4 * s));
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++) {
            __m256 sv = _mm256_mul_ps(d, _mm256_set1_ps(t->xd[NR * b + j]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j]), sv, acc[j]);
        }
    }
    finish_legacy(t, g, acc, out);
}

/* Legacy block types: group g x the quad (t->xq), `chain` steps per madd (see above). Each weight load
 * serves the four tokens, whose sums stay in registers. */
CM_ALWAYS_INLINE void micro_legacy(const tile *t, int g, int flip, int chain, float *out) {
    const size_t k = (size_t)t->k;
    const uint8_t *q = t->q + (size_t)g * GR * k;
    const float *dp = t->d + (size_t)g * GR * (size_t)t->nb;
    const int32_t *cp = t->corr + (size_t)g * GR * (size_t)t->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NR];
    for (int j = 0; j < NR; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * 32 * GR, *xb = t->xq + (size_t)b * 32;
        __m256i is[NR];
        __m256i c = flip ? _mm256_loadu_si256((const __m256i *)(cp + GR * b)) : _mm256_setzero_si256();
        for (int j = 0; j < NR; j++) is[j] = c;
        for (int s0 = 0; s0 < 8; s0 += chain) {
            __m256i p[NR];
            for (int j = 0; j < NR; j++) p[j] = _mm256_setzero_si256();
#pragma GCC unroll 2
            for (int s = s0; s < s0 + chain; s++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(qb + 32 * s));
                for (int j = 0; j < NR; j++) p[j] = _mm256_add_epi16(p[j], pairs4(w, xb + (size_t)j * k + 4 * s, flip));
            }
            for (int j = 0; j < NR; j++) is[j] = _mm256_add_epi32(is[j], _mm256_madd_epi16(p[j], ones));
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++) {
            __m256 sv = _mm256_mul_ps(d, _mm256_set1_ps(t->xd[NR * b + j]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j]), sv, acc[j]);
        }
    }
    finish_legacy(t, g, acc, out);
}

/* K-quants: the same shape over super-blocks of 256, xk[j] the tokens' Q8_K rows (for d and bsums; their
 * bytes are in t->xq): each 16 values' pair sums meet their scale in madd, and the super-block's
 * scaled sums add up in int32 before its one FMA. */
CM_ALWAYS_INLINE void micro_k(const tile *t, int g, const cm_block_q8_k *const xk[NR], int flip, int chain,
                              float *out) {
    const size_t k = (size_t)t->k;
    const uint8_t *q = t->q + (size_t)g * GR * k;
    size_t gb = (size_t)g * (size_t)t->nb;
    const float *dp = t->d + gb * GR, *mp = t->m + gb * GR;
    const int32_t *cp = t->corr + gb * GR;
    const __m256 neg = _mm256_set1_ps(-0.0f);
    __m256 acc[NR];
    for (int j = 0; j < NR; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * CM_QK_K * GR, *xb = t->xq + (size_t)b * CM_QK_K;
        const int16_t *sc = t->sc + (gb + (size_t)b) * 16 * GR * 2;
        __m256i is[NR];
        __m256i c = flip ? _mm256_loadu_si256((const __m256i *)(cp + GR * b)) : _mm256_setzero_si256();
        for (int j = 0; j < NR; j++) is[j] = c;
        for (int sb = 0; sb < 16; sb++) {
            __m256i scv = _mm256_loadu_si256((const __m256i *)(sc + sb * GR * 2));
            for (int s0 = 0; s0 < 4; s0 += chain) {
                __m256i p[NR];
                for (int s = s0; s < s0 + chain; s++) {
                    __m256i w = _mm256_loadu_si256((const __m256i *)(qb + (size_t)(4 * sb + s) * 32));
                    for (int j = 0; j < NR; j++) {
                        __m256i m = pairs4(w, xb + (size_t)j * k + 16 * sb + 4 * s, flip);
                        p[j] = s == s0 ? m : _mm256_add_epi16(p[j], m);
                    }
                }
                for (int j = 0; j < NR; j++) is[j] = _mm256_add_epi32(is[j], _mm256_madd_epi16(p[j], scv));
            }
        }
        __m256 d = _mm256_loadu_ps(dp + GR * b);
        for (int j = 0; j < NR; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[j]), _mm256_mul_ps(d, _mm256_set1_ps(xk[j][b].d)), acc[j]);
    }
    /* the min terms, e = fmaf((float)imin, -(dmin * d_x), e) per super-block in order (imin from Q8_K's
     * bsums): a chain apart from acc's, as in finish_legacy */
    for (int j = 0; j < NR; j++) {
        __m256 e = _mm256_setzero_ps();
        if (t->has_min)
            for (int64_t b = 0; b < t->nb; b++) {
                const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * GR * 2;
                __m256i mins = _mm256_setzero_si256();
                for (int jj = 0; jj < 8; jj++)
                    mins = _mm256_add_epi32(mins, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(mn + jj * GR * 2)),
                                                                    bcast32(xk[j][b].bsums + 2 * jj)));
                __m256 cm = _mm256_xor_ps(_mm256_mul_ps(_mm256_loadu_ps(mp + GR * b), _mm256_set1_ps(xk[j][b].d)), neg);
                e = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), cm, e);
            }
        _mm256_storeu_ps(out + j * GR, _mm256_add_ps(acc[j], e));
    }
}

/* One micro-kernel per weight type, its flip and chain constant. */
typedef void (*micro_fn)(const tile *t, int g, const char *const xr[NR], float *out);
#define MICRO_LEGACY(T, FLIP, CHAIN)                                                        \
    static void micro_##T(const tile *t, int g, const char *const xr[NR], float *out) {     \
        (void)xr;                                                                           \
        micro_legacy(t, g, FLIP, CHAIN, out);                                               \
    }
#define MICRO_K(T, FLIP, CHAIN)                                                             \
    static void micro_##T(const tile *t, int g, const char *const xr[NR], float *out) {     \
        micro_k(t, g, (const cm_block_q8_k *const *)xr, FLIP, CHAIN, out);                  \
    }
MICRO_LEGACY(Q4_0, 1, 8) MICRO_LEGACY(Q4_1, 0, 8) MICRO_LEGACY(Q5_0, 1, 4) MICRO_LEGACY(Q5_1, 0, 4)
MICRO_K(Q2_K, 0, 4) MICRO_K(Q3_K, 1, 4) MICRO_K(Q4_K, 0, 4) MICRO_K(Q5_K, 0, 4) MICRO_K(Q6_K, 1, 2)

static micro_fn micro_for(int wtype) {
    switch (wtype) {
    case GGUF_TT_Q4_0: return micro_Q4_0;
    case GGUF_TT_Q4_1: return micro_Q4_1;
    case GGUF_TT_Q5_0: return micro_Q5_0;
    case GGUF_TT_Q5_1: return micro_Q5_1;
    case GGUF_TT_Q2_K: return micro_Q2_K;
    case GGUF_TT_Q3_K: return micro_Q3_K;
    case GGUF_TT_Q4_K: return micro_Q4_K;
    case GGUF_TT_Q5_K: return micro_Q5_K;
    case GGUF_TT_Q6_K: return micro_Q6_K;
    default: return micro_q8_0;
    }
}

/* Token quad t0 / NR's activation rows into xr (a short last quad repeats its last token). */
static void quad_rows(const void *x, size_t x_stride, int n, int t0, const char *xr[NR]) {
    int nt = n - t0 < NR ? n - t0 : NR;
    for (int j = 0; j < NR; j++) xr[j] = (const char *)x + (size_t)(t0 + (j < nt ? j : nt - 1)) * x_stride;
}

static void gemm_avx2(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                      int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes, const gpack *pk) {
    tile t;
    size_t nq = ((size_t)n + NR - 1) / NR;
    int flip = flips(wtype);
    int all = tile_layout(&t, wtype, k, TR, GR, 0, flip, nq, scratch) <= scratch_bytes;
    if (!all) tile_layout(&t, wtype, k, TR, GR, 0, flip, 1, scratch);
    size_t rb = (size_t)gguf_row_bytes(wtype, k), nb = (size_t)t.nb;
    int xt = cm_quant_vec_dot_type(wtype);
    micro_fn micro = micro_for(wtype);
    float *xd0 = t.xd, *xs0 = t.xs;
    uint8_t *xq0 = t.xq;
    const char *xr[NR];
    if (all) /* every quad's bytes and scales once, for all the tiles (the first tile's rows coming in) */
        for (size_t q = 0; q < nq; q++) {
            if (!pk) prefetch_tile_slice(w, rb, r0, (r1 - r0 < TR ? r1 - r0 : TR), nq, q);
            t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xq = xq0 + q * NR * (size_t)k;
            quad_rows(x, x_stride, n, (int)q * NR, xr);
            quad_prep(&t, xt, xr);
        }
    for (int64_t a = r0; a < r1; a += TR) {
        int rows = r1 - a < TR ? (int)(r1 - a) : TR, groups = (rows + GR - 1) / GR;
        if (pk) pack_window(&t, pk, a);
        else tile_fill(&t, wtype, w, rb, a, rows, groups);
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            if (!pk) prefetch_tile_slice(w, rb, a + TR, (r1 - a - TR < TR ? r1 - a - TR : TR), nq, (size_t)t0 / NR);
            quad_rows(x, x_stride, n, t0, xr);
            if (all) {
                size_t q = (size_t)t0 / NR;
                t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xq = xq0 + q * NR * (size_t)k;
            } else {
                quad_prep(&t, xt, xr);
            }
            for (int g = 0; g < groups; g++) {
                float out[NR * GR];
                micro(&t, g, xr, out);
                for (int j = 0; j < nt; j++) {
                    float *yr = y + (int64_t)(t0 + j) * ldy + a + GR * g;
                    if (GR * g + GR <= rows)
                        _mm256_storeu_ps(yr, _mm256_loadu_ps(out + j * GR));
                    else
                        for (int r = 0; GR * g + r < rows; r++) yr[r] = out[j * GR + r];
                }
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
 * activation sums in t->xc (K-quants on VNNI: from Q8_K's bsums, zmicro_k_vnni). The block sums and their
 * FMAs are cm_qacc's, as above.
 *
 * The micro-tiles: with VNNI, the legacy types and Q8_0 meet the whole tile (up to 4 groups, 64 rows)
 * per token quad in one call (zmicro_legacy), so each weight load serves the quad's 4 tokens and each
 * activation broadcast the tile's 4 groups, into 16 independent int32 chains; the K-quants, and the
 * legacy types in the family without VNNI, meet one group per call (zmicro_k_vnni, zmicro_k,
 * zmicro_legacy_group). */

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

/* acc + the int32 dot of 4 values of 16 rows (u, the group's 64 bytes) with 4 activation bytes (xv,
 * broadcast). */
/* The lanes of group g that hold rows of a tile of `rows` rows. */
static inline __mmask16 zgroup_mask(int rows, int g) {
    int left = rows - ZGR * g;
    return left >= ZGR ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* A one-group micro-kernel's out (out[j * ZGR + r] is row r, token j) into y: group g of the tile, nt
 * tokens (the quad's first row at y, ldy apart), `rows` rows of the tile. */
static inline void zstore_group(float *y, int64_t ldy, int g, int rows, int nt, const float *out) {
    __mmask16 mk = zgroup_mask(rows, g);
    for (int j = 0; j < nt; j++) _mm512_mask_storeu_ps(y + (int64_t)j * ldy + ZGR * g, mk, _mm512_loadu_ps(out + j * ZGR));
}

static inline __m512i zdot4(__m512i acc, __m512i u, __m512i xv) {
#if defined(CM_G_VNNI)
    return _mm512_dpbusd_epi32(acc, u, xv);
#else /* u <= 31 here: maddubs's pairs stay within int16 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, xv), _mm512_set1_epi16(1)));
#endif
}

#if defined(CM_G_VNNI)
/* Legacy types and Q8_0 with VNNI: the tile's G groups (G * 16 rows) x the quad's 4 tokens, written
 * straight to y (the quad's first row, ldy apart; nt tokens, `rows` rows of the tile). Per step of 4
 * values, one load per group and one broadcast per token feed G * 4 dpbusd into as many int32 chains,
 * one per (group, token), each started at the bias's share; a block's chains are its sums, exact, and
 * meet the block's one FMA each. The float accumulators (G * 4 vectors) would not fit the registers
 * beside the chains, so between blocks they live in `acc` (L1): the first block starts them at 0, the
 * blocks between read and write them, the last one adds the min terms and stores to y. The min terms'
 * chain (types with m), which cm_qacc keeps apart from acc's, runs before the blocks (the same bits).
 * zlegacy_block is one block of it. */
CM_ALWAYS_INLINE void zlegacy_block(const tile *t, int G, const char *const xq[NR], size_t xbytes, size_t qoff,
                                    size_t b, int first, int last, float *acc, const float *e, float *y,
                                    int64_t ldy, int nt, int rows) {
    const size_t k = (size_t)t->k, nb = (size_t)t->nb, kq4 = t->xcs;
    const uint8_t *qb = t->q + b * 32 * ZGR;
    const char *xb[NR];
    __m512i is[4][NR];
    for (int j = 0; j < NR; j++) {
        xb[j] = xq[j] + b * xbytes + qoff;
        __m512i c = _mm512_set1_epi32(t->xc[(size_t)j * kq4 + b]);
        for (int g = 0; g < G; g++) is[g][j] = c;
    }
    for (int s = 0; s < 8; s++) {
        __m512i u[4];
        for (int g = 0; g < G; g++) u[g] = _mm512_loadu_si512((const void *)(qb + (size_t)g * ZGR * k + 64 * s));
        for (int j = 0; j < NR; j++) {
            __m512i xv = zbcast32(xb[j] + 4 * s);
            for (int g = 0; g < G; g++) is[g][j] = zdot4(is[g][j], u[g], xv);
        }
    }
    for (int g = 0; g < G; g++) {
        __m512 d = _mm512_loadu_ps(t->d + ((size_t)g * nb + b) * ZGR);
        __mmask16 mk = zgroup_mask(rows, g);
        for (int j = 0; j < NR; j++) {
            float *a = acc + (j * G + g) * ZGR;
            __m512 sv = _mm512_mul_ps(d, _mm512_set1_ps(t->xd[NR * b + (size_t)j]));
            __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[g][j]), sv, first ? _mm512_setzero_ps() : _mm512_load_ps(a));
            if (!last)
                _mm512_store_ps(a, r);
            else if (j < nt) /* cm_qacc_total: acc + e, e = 0 without mins */
                _mm512_mask_storeu_ps(y + (int64_t)j * ldy + ZGR * g, mk,
                                      _mm512_add_ps(r, e ? _mm512_load_ps(e + (j * G + g) * ZGR) : _mm512_setzero_ps()));
        }
    }
}

/* The blocks in order, as zlegacy_block above says; e (NR, G, ZGR) the min terms. */
CM_ALWAYS_INLINE void zmicro_legacy(const tile *t, int G, const char *const xq[NR], size_t xbytes, size_t qoff,
                                    float *y, int64_t ldy, int nt, int rows) {
    const size_t nb = (size_t)t->nb;
    float acc[NR * ZTR] __attribute__((aligned(64))), e[NR * ZTR] __attribute__((aligned(64)));
    if (t->has_min) /* e = fmaf(m, s_x, e), all blocks in order */
        for (int g = 0; g < G; g++) {
            __m512 ev[NR];
            for (int j = 0; j < NR; j++) ev[j] = _mm512_setzero_ps();
            for (size_t b = 0; b < nb; b++) {
                __m512 m = _mm512_loadu_ps(t->m + ((size_t)g * nb + b) * ZGR);
                for (int j = 0; j < NR; j++) ev[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(t->xs[NR * b + (size_t)j]), ev[j]);
            }
            for (int j = 0; j < NR; j++) _mm512_store_ps(e + (j * G + g) * ZGR, ev[j]);
        }
    const float *ep = t->has_min ? e : NULL;
    if (nb == 1) {
        for (int i = 0; i < NR * G; i++) _mm512_store_ps(acc + ZGR * i, _mm512_setzero_ps());
    } else {
        zlegacy_block(t, G, xq, xbytes, qoff, 0, 1, 0, acc, ep, y, ldy, nt, rows);
        for (size_t b = 1; b + 1 < nb; b++) zlegacy_block(t, G, xq, xbytes, qoff, b, 0, 0, acc, ep, y, ldy, nt, rows);
    }
    zlegacy_block(t, G, xq, xbytes, qoff, nb - 1, 0, 1, acc, ep, y, ldy, nt, rows);
}

/* The quad against the tile's `groups` groups, into y (the quad's first row, ldy apart; nt tokens, `rows`
 * rows of the tile): one kernel per tile width (constant G: the chains and loads unrolled). */
static void zmicro_legacy_wide(const tile *t, int groups, const char *const xq[NR], size_t xbytes, size_t qoff,
                               float *y, int64_t ldy, int nt, int rows) {
    switch (groups) {
    case 4: zmicro_legacy(t, 4, xq, xbytes, qoff, y, ldy, nt, rows); break;
    case 3: zmicro_legacy(t, 3, xq, xbytes, qoff, y, ldy, nt, rows); break;
    case 2: zmicro_legacy(t, 2, xq, xbytes, qoff, y, ldy, nt, rows); break;
    default: zmicro_legacy(t, 1, xq, xbytes, qoff, y, ldy, nt, rows); break;
    }
}
#endif

/* One group (16 rows) x the quad's tokens at a time, into out (out[j * ZGR + r] is row r, token j). Each
 * weight load serves all four tokens; a block's sums run in two int32 chains per token (even and odd
 * steps, the first started at the bias's share) added before the block's one FMA. The family without
 * VNNI takes it for every product (the tile-wide blocking above, with maddubs + madd in place of dpbusd,
 * measured 5-10% slower on a Zen 5 core); with VNNI, the products of a packed matrix (the output head's
 * few logits rows over a vocabulary): streaming a window from memory one group after the other, it ran
 * them at 1.35 ms against the tile-wide kernel's 2.4 (151936 x 256 Q8_0, 1 to 4 rows, one thread). */
CM_ALWAYS_INLINE void zmicro_legacy_group(const tile *t, int g, const char *const xq[NR], size_t xbytes,
                                          size_t qoff, float *out) {
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
                i0[j] = zdot4(i0[j], u0, zbcast32(xb[j] + 4 * s));
                i1[j] = zdot4(i1[j], u1, zbcast32(xb[j] + 4 * s + 4));
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

#if defined(CM_G_VNNI)
/* Two quads (8 tokens) against one group of a packed matrix of a type without mins (Q8_0, Q4_0, Q5_0:
 * the output head), into out (out[j * ZGR + r], j < 8): each weight load serves eight tokens, half the
 * loads per dpbusd of the quad's kernel; every token's chains, FMA and store are zmicro_legacy_group's
 * for that token (ta: the first quad's scales and bias sums, tb: the second's). 151936 x 256 Q8_0, one
 * thread (build/gemm_rows): 8 rows 1.73-1.82 ms against 2.13-2.18 one quad at a time. */
CM_ALWAYS_INLINE void zmicro_legacy_group8(const tile *ta, const tile *tb, int g, const char *const xa[NR],
                                           const char *const xb2[NR], size_t xbytes, size_t qoff, float *out) {
    const uint8_t *q = ta->q + (size_t)g * ZGR * (size_t)ta->k;
    const float *dp = ta->d + (size_t)g * ZGR * (size_t)ta->nb;
    size_t kq4 = ta->xcs;
    __m512 acc[2 * NR];
    for (int j = 0; j < 2 * NR; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < ta->nb; b++) {
        const uint8_t *qb = q + (size_t)b * 32 * ZGR;
        __m512i i0[2 * NR], i1[2 * NR];
        for (int j = 0; j < NR; j++) {
            i0[j] = _mm512_set1_epi32(ta->xc[(size_t)j * kq4 + (size_t)b]);
            i0[NR + j] = _mm512_set1_epi32(tb->xc[(size_t)j * kq4 + (size_t)b]);
            i1[j] = i1[NR + j] = _mm512_setzero_si512();
        }
        for (int s = 0; s < 8; s += 2) {
            __m512i u0 = _mm512_loadu_si512((const void *)(qb + 64 * s));
            __m512i u1 = _mm512_loadu_si512((const void *)(qb + 64 * (s + 1)));
            for (int j = 0; j < 2 * NR; j++) {
                const char *xj = (j < NR ? xa[j] : xb2[j - NR]) + (size_t)b * xbytes + qoff + 4 * s;
                i0[j] = zdot4(i0[j], u0, zbcast32(xj));
                i1[j] = zdot4(i1[j], u1, zbcast32(xj + 4));
            }
        }
        __m512 d = _mm512_loadu_ps(dp + ZGR * b);
        for (int j = 0; j < 2 * NR; j++) {
            float xd = j < NR ? ta->xd[NR * b + j] : tb->xd[NR * b + (j - NR)];
            __m512 sv = _mm512_mul_ps(d, _mm512_set1_ps(xd));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0[j], i1[j])), sv, acc[j]);
        }
    }
    for (int j = 0; j < 2 * NR; j++) _mm512_storeu_ps(out + j * ZGR, acc[j]);
}
#endif

/* The quad against the tile's `groups` groups, one at a time, into y as above. */
static void zmicro_legacy_groups(const tile *t, int groups, const char *const xq[NR], size_t xbytes, size_t qoff,
                                 float *y, int64_t ldy, int nt, int rows) {
    for (int g = 0; g < groups; g++) {
        float out[NR * ZGR];
        zmicro_legacy_group(t, g, xq, xbytes, qoff, out);
        zstore_group(y, ldy, g, rows, nt, out);
    }
}

/* sum += p * scale over pairs (the scales of 16 rows, twice each). */
static inline __m512i zmadd_acc(__m512i acc, __m512i p, __m512i sc) {
#if defined(CM_G_VNNI)
    return _mm512_dpwssd_epi32(acc, p, sc);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, sc));
#endif
}

/* Each of a tile group's rows' sum over the 16-value parts of one super-block of mn (its int16 pairs:
 * the mins, or for types without them the scales) times Q8_K's bsums of activation row xb. */
static inline __m512i zmn_bsums(const int16_t *mn, const cm_block_q8_k *xb) {
    __m512i acc = _mm512_setzero_si512();
    for (int jj = 0; jj < 8; jj++)
        acc = zmadd_acc(acc, _mm512_loadu_si512((const void *)(mn + jj * ZGR * 2)), zbcast32(xb->bsums + 2 * jj));
    return acc;
}

/* K-quants: one group (16 rows) x the quad's tokens over super-blocks of 256, into out (out[j * ZGR + r]
 * is row r, token j); all four tokens per weight load, two int32 chains per token (sub-blocks of even
 * and odd index) added before the super-block's one FMA. */
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
                __m512i mins = zmn_bsums(mn, &xk[j][b]);
                __m512 c = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(xk[j][b].d)), neg);
                e[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), c, e[j]);
            }
        }
    }
    for (int j = 0; j < NR; j++) _mm512_storeu_ps(out + j * ZGR, _mm512_add_ps(acc[j], e[j]));
}

#if defined(CM_G_VNNI)
/* K-quants with VNNI (the tile's s32 layout): dpbusd sums 4 products of u = q + bias and x per row in
 * int32, so a sub-block's dot (16 or 32 values) takes one instruction per 4 values and no int16 stage;
 * it then meets the sub-block's int32 scale in one multiply. What the bias adds, bias * (sum over the
 * 16-value parts of scale * their x sum), comes off once per super-block from Q8_K's bsums (mn holds the
 * scales there), the way the mins' sum is made for the types with mins. All of it is exact in int32
 * (wrapping adds and multiplies, the super-block's sum within int32), so the super-block's sum and its
 * one FMA are cm_qacc's, as above. */
CM_ALWAYS_INLINE void zmicro_k_vnni(const tile *t, int g, const cm_block_q8_k *const xk[NR], int nsub, int bias,
                                    int has_min, float *out) {
    const int steps = CM_QK_K / nsub / 4; /* dpbusd steps per sub-block */
    const uint8_t *q = t->q + (size_t)g * ZGR * (size_t)t->k;
    size_t gb = (size_t)g * (size_t)t->nb;
    const float *dp = t->d + gb * ZGR, *mp = t->m + gb * ZGR;
    const int32_t *scp = (const int32_t *)(const void *)t->sc + gb * (size_t)nsub * ZGR;
    const __m512 neg = _mm512_set1_ps(-0.0f);
    __m512 acc[NR], e[NR];
    for (int j = 0; j < NR; j++) acc[j] = e[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < t->nb; b++) {
        const uint8_t *qb = q + (size_t)b * CM_QK_K * ZGR;
        const int32_t *sc = scp + (size_t)b * (size_t)nsub * ZGR;
        __m512i is[NR];
        for (int j = 0; j < NR; j++) is[j] = _mm512_setzero_si512();
        for (int s = 0; s < nsub; s++) {
            __m512i dd[NR];
            for (int j = 0; j < NR; j++) dd[j] = _mm512_setzero_si512();
            for (int st = 0; st < steps; st++) {
                __m512i u = _mm512_loadu_si512((const void *)(qb + (size_t)(s * steps + st) * 64));
                int v = s * steps * 4 + 4 * st;
                for (int j = 0; j < NR; j++) dd[j] = _mm512_dpbusd_epi32(dd[j], u, zbcast32(xk[j][b].qs + v));
            }
            __m512i scv = _mm512_loadu_si512((const void *)(sc + (size_t)s * ZGR));
            for (int j = 0; j < NR; j++) is[j] = _mm512_add_epi32(is[j], _mm512_mullo_epi32(dd[j], scv));
        }
        if (bias || has_min) { /* sum over the 16-value parts of mn * bsums */
            const int16_t *mn = t->mn + (gb + (size_t)b) * 8 * ZGR * 2;
            __m512 dmin = _mm512_loadu_ps(mp + ZGR * b);
            for (int j = 0; j < NR; j++) {
                __m512i ms = zmn_bsums(mn, &xk[j][b]);
                if (bias) {
                    is[j] = _mm512_sub_epi32(is[j], _mm512_mullo_epi32(ms, _mm512_set1_epi32(bias)));
                } else { /* e = fmaf((float)imin, -(dmin * d_x), e) */
                    __m512 c = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(xk[j][b].d)), neg);
                    e[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ms), c, e[j]);
                }
            }
        }
        __m512 d = _mm512_loadu_ps(dp + ZGR * b);
        for (int j = 0; j < NR; j++) {
            __m512 sv = _mm512_mul_ps(d, _mm512_set1_ps(xk[j][b].d));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[j]), sv, acc[j]);
        }
    }
    for (int j = 0; j < NR; j++) _mm512_storeu_ps(out + j * ZGR, _mm512_add_ps(acc[j], e[j]));
}

/* One per K-quant, its sub-block size, bias and mins constant. */
typedef void (*zmicro_fn)(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out);
#define ZMICRO_K(T, NSUB, BIAS, MIN)                                                                \
    static void zmicro_##T(const tile *t, int g, const cm_block_q8_k *const xk[NR], float *out) {   \
        zmicro_k_vnni(t, g, xk, NSUB, BIAS, MIN, out);                                              \
    }
ZMICRO_K(Q2_K, 16, 0, 1) ZMICRO_K(Q3_K, 16, 4, 0) ZMICRO_K(Q4_K, 8, 0, 1) ZMICRO_K(Q5_K, 8, 0, 1)
ZMICRO_K(Q6_K, 16, 32, 0)

static zmicro_fn zmicro_for(int wtype) {
    switch (wtype) {
    case GGUF_TT_Q2_K: return zmicro_Q2_K;
    case GGUF_TT_Q3_K: return zmicro_Q3_K;
    case GGUF_TT_Q4_K: return zmicro_Q4_K;
    case GGUF_TT_Q5_K: return zmicro_Q5_K;
    case GGUF_TT_Q6_K: return zmicro_Q6_K;
    default: return NULL;
    }
}
#endif

/* Token quad t0 / NR's activation rows into xr (a short last quad repeats its last token), and unless
 * `prepared`, their scales and bias sums into the tile's current quad slot. */
static void zquad(tile *t, int xt, size_t xbytes, size_t qoff, const void *x, size_t x_stride, int n, int t0,
                  int prepared, const char *xr[NR]) {
    quad_rows(x, x_stride, n, t0, xr);
    if (prepared) return;
    if ((t->bias && !t->s32) || !t->kq) /* legacy: 0 for bias 0 */
        for (int j = 0; j < NR; j++) zprep_x(t, xr[j], xbytes, qoff, t->xc + (size_t)j * t->xcs);
    if (!t->kq) quad_scales(t, xt, xr);
}

#if defined(CM_G_VNNI)
/* A packed window (no mins) against n tokens, NR < n <= PK_GROUP_MAJOR, group-major: all of the
 * tokens against one group (two quads per call, a last odd or short quad alone), then the next group,
 * so the window's memory comes in while the earlier groups' products run, where quad after quad over
 * the whole window left the memory idle after the first (151936 x 256 Q8_0, one thread,
 * build/gemm_rows, against a quad at a time: 6 rows 1.81-1.82 ms against 2.17-2.21, 12 rows 2.17-2.29
 * against 2.81-2.87, 16 rows 2.66-2.78 against 3.47-3.51). Each token's numbers are the quad kernels',
 * whatever the order. */
static __attribute__((noinline)) void pack_group_major(const tile *t, int groups, int rows, const void *x,
                                                       size_t x_stride, int n, size_t xbytes, size_t qoff, float *y,
                                                       int64_t ldy, float *xd0, float *xs0, int32_t *xc0) {
    const char *xq[PK_GROUP_MAJOR / NR][NR];
    tile tq[PK_GROUP_MAJOR / NR];
    const int nq4 = (n + NR - 1) / NR;
    const size_t nb = (size_t)t->nb;
    for (int p = 0; p < nq4; p++) {
        quad_rows(x, x_stride, n, p * NR, xq[p]);
        tq[p] = *t;
        tq[p].xd = xd0 + (size_t)p * NR * nb, tq[p].xs = xs0 + (size_t)p * NR * nb, tq[p].xc = xc0 + (size_t)p * NR * t->xcs;
    }
    for (int g = 0; g < groups; g++) {
        int p = 0;
        for (; p + 1 < nq4 && n - p * NR >= 2 * NR; p += 2) {
            float out[2 * NR * ZGR];
            zmicro_legacy_group8(&tq[p], &tq[p + 1], g, xq[p], xq[p + 1], xbytes, qoff, out);
            zstore_group(y + (int64_t)(p * NR) * ldy, ldy, g, rows, NR, out);
            zstore_group(y + (int64_t)((p + 1) * NR) * ldy, ldy, g, rows, NR, out + NR * ZGR);
        }
        for (; p < nq4; p++) {
            float out[NR * ZGR];
            int nt = n - p * NR < NR ? n - p * NR : NR;
            zmicro_legacy_group(&tq[p], g, xq[p], xbytes, qoff, out);
            zstore_group(y + (int64_t)(p * NR) * ldy, ldy, g, rows, nt, out);
        }
    }
}
#endif

static void gemm_avx512(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                        int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes, const gpack *pk) {
    tile t;
    size_t nq = ((size_t)n + NR - 1) / NR;
    int all = tile_layout(&t, wtype, k, ZTR, ZGR, zbias(wtype), 0, nq, scratch) <= scratch_bytes;
    if (!all) tile_layout(&t, wtype, k, ZTR, ZGR, zbias(wtype), 0, 1, scratch);
#if defined(CM_G_VNNI)
    zmicro_fn zk = zmicro_for(wtype);
    t.s32 = zk != NULL;
#endif
    size_t rb = (size_t)gguf_row_bytes(wtype, k), nb = (size_t)t.nb;
    int xt = cm_quant_vec_dot_type(wtype);
    size_t xbytes = xt == GGUF_TT_Q8_1 ? sizeof(cm_block_q8_1) : xt == GGUF_TT_Q8_K ? sizeof(cm_block_q8_k)
                                                                                   : sizeof(cm_block_q8_0);
    size_t qoff = xt == GGUF_TT_Q8_1 ? offsetof(cm_block_q8_1, qs) : xt == GGUF_TT_Q8_K ? offsetof(cm_block_q8_k, qs)
                                                                                     : offsetof(cm_block_q8_0, qs);
    float *xd0 = t.xd, *xs0 = t.xs;
    int32_t *xc0 = t.xc;
    const char *xr[NR];
    if (all) /* every quad's scales and sums once, for all the tiles (the first tile's rows coming in) */
        for (size_t q = 0; q < nq; q++) {
            if (!pk) prefetch_tile_slice(w, rb, r0, (r1 - r0 < ZTR ? r1 - r0 : ZTR), nq, q);
            t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xc = xc0 + q * NR * t.xcs;
            zquad(&t, xt, xbytes, qoff, x, x_stride, n, (int)q * NR, 0, xr);
        }
    for (int64_t a = r0; a < r1; a += ZTR) {
        int rows = r1 - a < ZTR ? (int)(r1 - a) : ZTR, groups = (rows + ZGR - 1) / ZGR;
        if (pk) pack_window(&t, pk, a);
        else tile_fill(&t, wtype, w, rb, a, rows, groups);
#if defined(CM_G_VNNI)
        if (pk && all && !t.kq && !t.has_min && n > NR && n <= PK_GROUP_MAJOR) {
            pack_group_major(&t, groups, rows, x, x_stride, n, xbytes, qoff, y + a, ldy, xd0, xs0, xc0);
            continue;
        }
#endif
        for (int t0 = 0; t0 < n; t0 += NR) {
            int nt = n - t0 < NR ? n - t0 : NR;
            if (!pk) prefetch_tile_slice(w, rb, a + ZTR, (r1 - a - ZTR < ZTR ? r1 - a - ZTR : ZTR), nq, (size_t)t0 / NR);
            if (all) {
                size_t q = (size_t)t0 / NR;
                t.xd = xd0 + q * NR * nb, t.xs = xs0 + q * NR * nb, t.xc = xc0 + q * NR * t.xcs;
            }
            zquad(&t, xt, xbytes, qoff, x, x_stride, n, t0, all, xr);
            /* the quad's outputs into cache for writing while the micro-kernels run: a store that
             * misses (y far larger than the caches) would otherwise stall at their end */
            for (int j = 0; j < nt; j++)
                for (int g = 0; g < groups; g++) __builtin_prefetch(y + (int64_t)(t0 + j) * ldy + a + ZGR * g, 1, 3);
            if (!t.kq) {
#if defined(CM_G_VNNI)
                /* a packed matrix in cache against many tokens (a prompt through packed layers): its window
                 * sits in L1 for all of them, as a tile does (streamed from memory, the output head with
                 * 40-64 rows, the tile-wide kernel ran 3-6% slower than two quads a load) */
                if (!pk || (pk->cached && n > PK_GROUP_MAJOR)) zmicro_legacy_wide(&t, groups, xr, xbytes, qoff, y + (int64_t)t0 * ldy + a, ldy, nt, rows);
                else if (all && !t.has_min && nt == NR && n - t0 >= 2 * NR) { /* two full quads left */
                    tile tb = t;
                    size_t q2 = (size_t)t0 / NR + 1;
                    tb.xd = xd0 + q2 * NR * nb, tb.xs = xs0 + q2 * NR * nb, tb.xc = xc0 + q2 * NR * t.xcs;
                    const char *xr2[NR];
                    quad_rows(x, x_stride, n, t0 + NR, xr2);
                    for (int g = 0; g < groups; g++) {
                        float out[2 * NR * ZGR];
                        zmicro_legacy_group8(&t, &tb, g, xr, xr2, xbytes, qoff, out);
                        zstore_group(y + (int64_t)t0 * ldy + a, ldy, g, rows, NR, out);
                        zstore_group(y + (int64_t)(t0 + NR) * ldy + a, ldy, g, rows, NR, out + NR * ZGR);
                    }
                    t0 += NR; /* the loop's own step passes the second quad */
                } else
#endif
                    zmicro_legacy_groups(&t, groups, xr, xbytes, qoff, y + (int64_t)t0 * ldy + a, ldy, nt, rows);
                continue;
            }
            for (int g = 0; g < groups; g++) {
                float out[NR * ZGR];
#if defined(CM_G_VNNI)
                if (zk) zk(&t, g, (const cm_block_q8_k *const *)xr, out);
                else
#endif
                zmicro_k(&t, g, (const cm_block_q8_k *const *)xr, out);
                zstore_group(y + (int64_t)t0 * ldy + a, ldy, g, rows, nt, out);
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
        gemm_avx512(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes, NULL);
        return;
    }
#endif
#if defined(CM_G_AVX2)
    if (wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) {
        gemm_avx2(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes, NULL);
        return;
    }
#endif
    (void)scratch, (void)scratch_bytes;
    cm_matvec_rows_ref(wtype, cm_quant_vec_dot_type(wtype), w, k, x, x_stride, n, y, ldy, r0, r1);
}

/* ------------------------------------------------------------ packed weights */

cm_gemm_pack *CM_FAMILY_FN(cm_gemm_q_pack)(int wtype, const void *w, int64_t k, int64_t m, size_t max_bytes) {
#if defined(CM_G_AVX2)
    if (!(wtype == GGUF_TT_Q8_0 || cm_quant_is_block_type(wtype)) || k <= 0 || m <= 0 ||
        k % cm_quant_block_values(wtype))
        return NULL;
    gpack g;
    memset(&g, 0, sizeof g);
#if defined(CM_G_AVX512)
    g.z = ztakes(wtype);
#endif
    const int gr = g.z ? ZGR : GR;
#if defined(CM_G_AVX512)
    if (g.z) {
        tile_flags(&g.t, wtype, k, ZGR, zbias(wtype), 0);
#if defined(CM_G_VNNI)
        g.t.s32 = zmicro_for(wtype) != NULL; /* as gemm_avx512 sets it */
#endif
    } else
#endif
    {
        tile_flags(&g.t, wtype, k, GR, 0, flips(wtype));
    }
    const size_t nb = (size_t)g.t.nb, groups = (size_t)((m + gr - 1) / gr);
    g.sq = (size_t)gr * (size_t)k;
    g.sdm = (size_t)gr * nb;
    g.ssc = g.t.kq ? (g.t.s32 ? nb * (size_t)g.t.nsub * gr * 2 : nb * 16 * gr * 2) : 0;
    g.smn = g.t.kq ? nb * 8 * gr * 2 : 0;
    size_t sizes[7] = {sizeof(gpack), groups * g.sq, groups * g.sdm * sizeof(float), groups * g.sdm * sizeof(float),
                       g.t.flip ? groups * g.sdm * sizeof(int32_t) : 0, groups * g.ssc * sizeof(int16_t),
                       groups * g.smn * sizeof(int16_t)};
    size_t bytes = 0;
    for (int i = 0; i < 7; i++) bytes += (sizes[i] + 63) & ~(size_t)63;
    if (max_bytes && bytes > max_bytes) return NULL;
    /* its own mapping with huge pages from 2 MiB on: the head's products stream it whole every step
     * (151936 x 256 Q8_0, 1 to 16 rows, one thread: 2-6% faster than on 4 KiB pages) */
    size_t mapped;
    cm_gemm_pack *pk = calloc(1, sizeof *pk);
    char *mem = cm_big_alloc(bytes, 64, &mapped);
    uint8_t *stage = aligned_alloc(64, ((size_t)gr * (size_t)k + 63) & ~(size_t)63);
    if (!pk || !mem || !stage) {
        free(pk), cm_big_free(mem, mapped), free(stage);
        return NULL;
    }
    char *p = mem;
    gpack *gp = carve(&p, sizes[0]);
    g.t.q = carve(&p, sizes[1]);
    g.t.d = carve(&p, sizes[2]);
    g.t.m = carve(&p, sizes[3]);
    g.t.corr = sizes[4] ? carve(&p, sizes[4]) : NULL;
    g.t.sc = sizes[5] ? carve(&p, sizes[5]) : NULL;
    g.t.mn = sizes[6] ? carve(&p, sizes[6]) : NULL;
    g.cached = bytes <= CM_BIG_BYTES;
    *gp = g;
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    tile t = g.t;
    t.row = stage;
    for (size_t i = 0; i < groups; i++) { /* a last partial group repeats the matrix's last row */
        const char *wr[ZGR];
        for (int r = 0; r < gr; r++) {
            int64_t row = (int64_t)i * gr + r;
            wr[r] = (const char *)w + (size_t)(row < m ? row : m - 1) * rb;
        }
        pack_window(&t, gp, (int64_t)i * gr);
        tile_group(&t, wtype, wr, 0);
    }
    free(stage);
    *pk = (cm_gemm_pack){
        .family = &CM_FAMILY_FN(cm_kernels), .wtype = wtype, .w = w, .k = k, .m = m, .bytes = bytes,
        .mapped = mapped, .impl = mem};
    return pk;
#else
    (void)wtype, (void)w, (void)k, (void)m, (void)max_bytes;
    return NULL;
#endif
}

void CM_FAMILY_FN(cm_gemm_q_packed)(const cm_gemm_pack *pk, const void *x, size_t x_stride, int n, float *y,
                                    int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes) {
#if defined(CM_G_AVX2)
    const gpack *g = pk->impl;
    if (pk->family == &CM_FAMILY_FN(cm_kernels) && r0 % g->t.gr == 0) {
#if defined(CM_G_AVX512)
        if (g->z) {
            gemm_avx512(pk->wtype, pk->w, pk->k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes, g);
            return;
        }
#endif
        gemm_avx2(pk->wtype, pk->w, pk->k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes, g);
        return;
    }
#endif
    /* packed by another family (the table changed since), or a window off the groups: the plain way */
    CM_FAMILY_FN(cm_gemm_q)(pk->wtype, pk->w, pk->k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes);
}
