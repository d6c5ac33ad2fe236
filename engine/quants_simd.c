/*
 * quants_simd.c - the fast block-format kernels of quants.h for one SIMD family (see kernels_family.h),
 * built once per family with its compiler flags; kernels_simd.c of the same build puts them in the
 * family's table.
 *
 * AVX2 (with FMA, F16C) decodes each layout with SIMD shifts and masks, one group unpacker per type
 * shared by the dots and the dequantisers; the VNNI byte dot (AVX-512 VL + VNNI) replaces the int8
 * inner product of Q8_0 and the legacy types where the family has it. The int8 dots accumulate exactly
 * as cm_qacc (quants.h) defines, four weight rows per pass over the quantised activations, so they and
 * the dequantisers are bit-exact with quants.c. A family without AVX2 calls the references.
 */
#include "quants.h"

#include <math.h>
#include <string.h>

#include "gguf.h"
#include "kernels_family.h"
#include "util.h"

#ifndef CM_FAMILY
#error "quants_simd.c is built once per kernel family with -DCM_FAMILY=<name> (engine/meson.build)"
#endif

/* Bit-exactness with the references needs every multiply rounded: no contraction (see quants.c). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CM_Q_AVX2 1
#include <immintrin.h>
#endif
#if defined(CM_Q_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CM_Q_VNNI 1
#endif

/* ============================================================ AVX2 */

#if defined(CM_Q_AVX2)
static inline float fp16(uint16_t h) { return _cvtsh_ss(h); } /* exact, like cm_fp16_to_f32 */

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* The totals of four rows' 8 int32 lanes, exactly (integer adds), as [row 0, row 1, row 2, row 3]. By
 * unpacks and adds rather than three hadds: on Zen 5 the four-row legacy dots (in L2, one thread) run
 * 3-12% faster so, and AVX2's 1-5%. */
static inline __m128i hsum4_i32(const __m256i p[4]) {
    __m256i s01 = _mm256_add_epi32(_mm256_unpacklo_epi32(p[0], p[1]), _mm256_unpackhi_epi32(p[0], p[1]));
    __m256i s23 = _mm256_add_epi32(_mm256_unpacklo_epi32(p[2], p[3]), _mm256_unpackhi_epi32(p[2], p[3]));
    __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* 8 int32 lanes whose total is sum u[i] * s[i] over 32 bytes, u unsigned, s signed. maddubs's int16
 * pair sums cannot saturate here: every u this file passes is < 128 and |s| <= 127. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(CM_Q_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* The same with signed a: |a| * (s with a's sign). */
static inline __m256i dot_s8s8(__m256i a, __m256i s) {
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(s, a));
}

/* Q4_0 and Q5_0 store q + bias unsigned (bias 8, 16): their dots take u = q + bias as it is, and the
 * bias's share of a block comes off once per activation block, for all rows, instead of per row.
 * off_u8s8(bias, s) is that share, and dot_u8s8_off(u, s, off) the lanes of sum (u[i] - bias) * s[i],
 * exactly: VNNI starts dpbusd at -(bias * s) per lane; maddubs subtracts bias * s per int16 pair
 * (u <= 31, |s| <= 127: neither pair sum saturates). */
static inline __m256i off_u8s8(int bias, __m256i s) {
#if defined(CM_Q_VNNI)
    return _mm256_sub_epi32(_mm256_setzero_si256(),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)bias), s));
#else
    return _mm256_maddubs_epi16(_mm256_set1_epi8((char)bias), s);
#endif
}

static inline __m256i dot_u8s8_off(__m256i u, __m256i s, __m256i off) {
#if defined(CM_Q_VNNI)
    return _mm256_dpbusd_epi32(off, u, s);
#else
    return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(u, s), off), _mm256_set1_epi16(1));
#endif
}

/* 32 nibbles of a legacy block: byte j low nibble -> value j, high nibble -> value j + 16. */
static inline __m256i legacy_nibbles(const uint8_t *qs) {
    __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

/* The 32 q + bias of a Q5_0 / Q5_1 block: the nibbles, and 0x10 in byte j where bit j of the 32-bit qh
 * is set (AVX-512 BW/VL: qh is that byte mask as it is). */
static inline __m256i legacy_q5(const uint8_t *qs, const uint8_t *qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    __m256i nib = legacy_nibbles(qs);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_mask_add_epi8(nib, (__mmask32)bits, nib, _mm256_set1_epi8(0x10)); /* nib < 0x10: + is | */
#else
    const __m256i which = _mm256_set_epi64x(0x0303030303030303ll, 0x0202020202020202ll, 0x0101010101010101ll, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_or_si256(nib, _mm256_and_si256(v, _mm256_set1_epi8(0x10)));
#endif
}

/* (bytes >> shift) & mask per byte; the 16-bit shift's spill into the next byte is masked away. */
static inline __m256i bits_at(__m256i v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8((char)mask));
}

/* Each byte's bits from `from` on moved to bit `to` (one 16-bit shift), & mask (already at `to`): a
 * field that stays inside its byte, so what the shift spills across bytes is masked away. */
static inline __m256i bits_to(__m256i v, int from, int to, int mask) {
    if (to > from) v = _mm256_slli_epi16(v, to - from);
    else if (from > to) v = _mm256_srli_epi16(v, from - to);
    return _mm256_and_si256(v, _mm256_set1_epi8((char)mask));
}

/* The 32-value groups of each K-quant, as unsigned bytes (what the dots multiply; the dequantisers
 * subtract the type's offset). Value 128h + 32s + l for Q2_K/Q3_K/Q6_K, 64c + 32half + l for Q4_K/Q5_K. */

/* Q3_K: q + 4 in 0..7 from qs[32h..] (q) and hmask (hm). */
static inline __m256i q3k_group(__m256i q, __m256i hm, int h, int s) {
    return _mm256_or_si256(bits_at(q, 2 * s, 3), bits_to(hm, 4 * h + s, 2, 0x04));
}

/* Q4_K / Q5_K: q in 0..15 / 0..31 of half `half` of chunk c from qs[32c..] (q) and, for Q5_K, qh. */
static inline __m256i q45k_group(__m256i q, const __m256i *qh, int c, int half) {
    __m256i u = bits_at(q, 4 * half, 0xF);
    return qh ? _mm256_or_si256(u, bits_to(*qh, 2 * c + half, 4, 0x10)) : u;
}

/* Q6_K: q + 32 in 0..63 from ql[64h..] (l0), ql[64h + 32..] (l1) and qh[32h..] (qh). */
static inline __m256i q6k_group(__m256i l0, __m256i l1, __m256i qh, int s) {
    __m256i low = bits_at(s & 1 ? l1 : l0, s < 2 ? 0 : 4, 0xF);
    return _mm256_or_si256(low, bits_to(qh, 2 * s, 4, 0x30));
}

/* The fields of a Q4_K or Q5_K block (qh NULL for Q4_K). */
typedef struct q45k_view {
    const uint8_t *scales, *qs, *qh;
    uint16_t d, dmin;
} q45k_view;

static inline q45k_view q45k_at(int type, const void *w, int64_t i) {
    q45k_view v;
    if (type == GGUF_TT_Q4_K) {
        const cm_block_q4_k *a = (const cm_block_q4_k *)w + i;
        v.scales = a->scales; v.qs = a->qs; v.qh = NULL; v.d = a->d; v.dmin = a->dmin;
    } else {
        const cm_block_q5_k *a = (const cm_block_q5_k *)w + i;
        v.scales = a->scales; v.qs = a->qs; v.qh = a->qh; v.d = a->d; v.dmin = a->dmin;
    }
    return v;
}

/* Q2_K, Q3_K and Q6_K share a shape: 16 sub-blocks of 16, values in 8 groups of 32 (h = g / 4,
 * s = g % 4 in the layouts). A block's integer scales, mins and the offset that turns the unsigned group
 * bytes into q (q = u - offset). */
typedef struct k16_view {
    const void *blk;
    int sc[16], mn[16], offset;
    float d, dmin;
} k16_view;

static inline void k16_at(int type, const void *w, int64_t i, k16_view *v) {
    memset(v->mn, 0, sizeof v->mn);
    v->dmin = 0.0f;
    switch (type) {
    case GGUF_TT_Q2_K: {
        const cm_block_q2_k *a = (const cm_block_q2_k *)w + i;
        for (int j = 0; j < 16; j++) { v->sc[j] = a->scales[j] & 0xF; v->mn[j] = a->scales[j] >> 4; }
        v->blk = a; v->offset = 0; v->d = fp16(a->d); v->dmin = fp16(a->dmin);
        break;
    }
    case GGUF_TT_Q3_K: {
        const cm_block_q3_k *a = (const cm_block_q3_k *)w + i;
        cm_q3k_scales(a->scales, v->sc);
        v->blk = a; v->offset = 4; v->d = fp16(a->d);
        break;
    }
    default: {
        const cm_block_q6_k *a = (const cm_block_q6_k *)w + i;
        for (int j = 0; j < 16; j++) v->sc[j] = a->scales[j];
        v->blk = a; v->offset = 32; v->d = fp16(a->d);
        break;
    }
    }
}

/* Group g of the block as unsigned bytes u = q + offset. */
static inline __m256i k16_group(int type, const void *blk, int g) {
    int h = g / 4, s = g % 4;
    switch (type) {
    case GGUF_TT_Q2_K: {
        const cm_block_q2_k *a = blk;
        return bits_at(_mm256_loadu_si256((const __m256i *)(a->qs + 32 * h)), 2 * s, 3);
    }
    case GGUF_TT_Q3_K: {
        const cm_block_q3_k *a = blk;
        return q3k_group(_mm256_loadu_si256((const __m256i *)(a->qs + 32 * h)),
                         _mm256_loadu_si256((const __m256i *)a->hmask), h, s);
    }
    default: {
        const cm_block_q6_k *a = blk;
        return q6k_group(_mm256_loadu_si256((const __m256i *)(a->ql + 64 * h)),
                         _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h + 32)),
                         _mm256_loadu_si256((const __m256i *)(a->qh + 32 * h)), s);
    }
    }
}

/* ------------------------------------------------------------ AVX2 int8 dots (cm_qacc, quants.h) */

/* Every block below yields int32 lanes (madd/maddubs or VNNI's dpbusd) whose total is the block's exact
 * sum in cm_qacc's sense; the four-row drivers add four rows' lanes together (hsum4_i32) and give the four
 * block sums one 4-wide FMA, a one-row driver one scalar fmaf or lane 0 of the same FMA (the same float
 * steps). The drivers take several weight rows at once and are specialised per type (always_inline with
 * a constant type), so no type switch is left inside the block loop. */
#define CM_ALWAYS_INLINE static inline __attribute__((always_inline))
#define ROWS_MAX 4 /* weight rows per pass over x: four independent FMA chains */

/* Q8_0 and legacy weights: block i's lanes against x's 32 int8 xv, its fp16 d (and m as float for
 * Q4_1/Q5_1); off is legacy_off(wt, xv). */
CM_ALWAYS_INLINE __m256i legacy_lanes(int wt, const void *w, int64_t i, __m256i xv, __m256i off, uint16_t *dh,
                                      float *m) {
    switch (wt) {
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = (const cm_block_q8_0 *)w + i;
        *dh = b->d;
        return dot_s8s8(_mm256_loadu_si256((const __m256i *)b->qs), xv);
    }
    case GGUF_TT_Q4_0: {
        const cm_block_q4_0 *b = (const cm_block_q4_0 *)w + i;
        *dh = b->d;
        return dot_u8s8_off(legacy_nibbles(b->qs), xv, off);
    }
    case GGUF_TT_Q4_1: {
        const cm_block_q4_1 *b = (const cm_block_q4_1 *)w + i;
        *dh = b->d;
        *m = fp16(b->m);
        return dot_u8s8(legacy_nibbles(b->qs), xv);
    }
    case GGUF_TT_Q5_0: {
        const cm_block_q5_0 *b = (const cm_block_q5_0 *)w + i;
        *dh = b->d;
        return dot_u8s8_off(legacy_q5(b->qs, b->qh), xv, off);
    }
    default: {
        const cm_block_q5_1 *b = (const cm_block_q5_1 *)w + i;
        *dh = b->d;
        *m = fp16(b->m);
        return dot_u8s8(legacy_q5(b->qs, b->qh), xv);
    }
    }
}

/* The share of the bias that legacy_lanes's dots take off per activation block: Q4_0's 8 and Q5_0's 16.
 * (Q8_0 as q + 128 against a 128 share, one xor instead of two sign operations per row, was faster in L2
 * but 2% slower in decode of a 1.5B Q8_0 file at one thread, so Q8_0 keeps the sign trick.) */
CM_ALWAYS_INLINE __m256i legacy_off(int wt, __m256i xv) {
    if (wt == GGUF_TT_Q4_0) return off_u8s8(8, xv);
    if (wt == GGUF_TT_Q5_0) return off_u8s8(16, xv);
    return _mm256_setzero_si256();
}

/* How far beyond the next rows' matching share the row dots stream the weights in: with one pass of four
 * short rows as the only lead (a 1536-wide Q4_K row is 864 bytes, an 896-wide Q4_0 row 504), the lines
 * arrive late; 4 KiB more keeps the memory busy (decode on Zen 5 at one thread: Q4_K_M about 10% faster
 * on the 512-bit rows, Q8_0 7-12% and Q4_0 2-10% on the legacy rows; 8 KiB no better, 16 KiB worse). */
#define ROWS_AHEAD 4096

/* The weight rows after this call's nr rows, streamed into cache while these are computed: block i of
 * these rows is as far into them as the same share of the next nr rows, plus ROWS_AHEAD bytes. Without
 * it the rows' short interleaved streams leave the core waiting on memory (about 1.6x slower on a 0.5B
 * Q4_0 model). */
CM_ALWAYS_INLINE void prefetch_next_rows(const char *w, size_t rb, int nr, int64_t i, size_t bs) {
    size_t step = (size_t)nr * bs;
    const char *next = w + (size_t)nr * rb + (size_t)i * step + ROWS_AHEAD;
    for (size_t o = 0; o < step + 63; o += 64) _mm_prefetch(next + o, _MM_HINT_T0);
}

CM_ALWAYS_INLINE size_t legacy_block_bytes(int wt) {
    switch (wt) {
    case GGUF_TT_Q8_0: return sizeof(cm_block_q8_0);
    case GGUF_TT_Q4_0: return sizeof(cm_block_q4_0);
    case GGUF_TT_Q4_1: return sizeof(cm_block_q4_1);
    case GGUF_TT_Q5_0: return sizeof(cm_block_q5_0);
    default: return sizeof(cm_block_q5_1);
    }
}

/* out[r] = dot(row r, x) for r < nr; row r at w + r * rb, nb blocks of 32. */
CM_ALWAYS_INLINE void rows_legacy(int wt, int nr, int64_t nb, const char *w, size_t rb, const void *x, float *out) {
    const int has_m = wt == GGUF_TT_Q4_1 || wt == GGUF_TT_Q5_1;
    __m128 acc4 = _mm_setzero_ps(); /* the rows' cm_qacc acc: four at once, or acc1 for one row */
    float acc1 = 0.0f, e[ROWS_MAX];
    for (int r = 0; r < nr; r++) e[r] = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        __m256i xv;
        float dx, sx = 0.0f;
        if (has_m) {
            const cm_block_q8_1 *xb = (const cm_block_q8_1 *)x + i;
            xv = _mm256_loadu_si256((const __m256i *)xb->qs);
            dx = fp16(xb->d);
            sx = fp16(xb->s);
        } else {
            const cm_block_q8_0 *xb = (const cm_block_q8_0 *)x + i;
            xv = _mm256_loadu_si256((const __m256i *)xb->qs);
            dx = fp16(xb->d);
        }
        prefetch_next_rows(w, rb, nr, i, legacy_block_bytes(wt));
        __m256i off = legacy_off(wt, xv);
        __m256i p[ROWS_MAX];
        uint16_t dh[ROWS_MAX];
        for (int r = 0; r < nr; r++) {
            float m = 0.0f;
            p[r] = legacy_lanes(wt, w + (size_t)r * rb, i, xv, off, &dh[r], &m);
            if (has_m) e[r] = fmaf(m, sx, e[r]);
        }
        if (nr == ROWS_MAX) { /* the four d converted at once (exact, as fp16 is) */
            __m128i h = _mm_cvtsi32_si128((int)(dh[0] | (uint32_t)dh[1] << 16)); /* unsigned: no shift into the sign */
            h = _mm_insert_epi32(h, (int)(dh[2] | (uint32_t)dh[3] << 16), 1);
            __m128 s = _mm_mul_ps(_mm_cvtph_ps(h), _mm_set1_ps(dx));
            acc4 = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_i32(p)), s, acc4);
        } else {
            acc1 = fmaf((float)hsum_i32(p[0]), fp16(dh[0]) * dx, acc1);
        }
    }
    float a[ROWS_MAX];
    _mm_storeu_ps(a, acc4);
    if (nr != ROWS_MAX) a[0] = acc1;
    for (int r = 0; r < nr; r++) out[r] = a[r] + e[r];
}

/* Q3_K's 16 scales minus 32, as bytes (cm_q3k_scales four at a time). */
CM_ALWAYS_INLINE __m128i q3k_scales_vec(const uint8_t *s) {
    uint32_t a[3];
    memcpy(a, s, 12);
    const uint32_t m4 = 0x0f0f0f0f, m2 = 0x03030303;
    __m128i v = _mm_set_epi32((int)(((a[1] >> 4) & m4) | (((a[2] >> 6) & m2) << 4)),
                              (int)(((a[0] >> 4) & m4) | (((a[2] >> 4) & m2) << 4)),
                              (int)((a[1] & m4) | (((a[2] >> 2) & m2) << 4)),
                              (int)((a[0] & m4) | ((a[2] & m2) << 4)));
    return _mm_sub_epi8(v, _mm_set1_epi8(32));
}

CM_ALWAYS_INLINE size_t k_block_bytes(int wt) {
    switch (wt) {
    case GGUF_TT_Q2_K: return sizeof(cm_block_q2_k);
    case GGUF_TT_Q3_K: return sizeof(cm_block_q3_k);
    case GGUF_TT_Q4_K: return sizeof(cm_block_q4_k);
    case GGUF_TT_Q5_K: return sizeof(cm_block_q5_k);
    default: return sizeof(cm_block_q6_k);
    }
}

/* The sixteen sub-block scales of a Q2_K, Q3_K or Q6_K block (blk) as bytes, as the dots multiply them
 * (Q3_K's minus 32, signed; Q2_K's unsigned), and for Q2_K its sixteen mins in *mn (zero for the others). */
CM_ALWAYS_INLINE __m128i k16_scale_bytes(int wt, const char *blk, __m128i *mn) {
    *mn = _mm_setzero_si128();
    if (wt == GGUF_TT_Q2_K) {
        __m128i s = _mm_loadu_si128((const __m128i *)((const cm_block_q2_k *)blk)->scales);
        *mn = _mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(0x0F));
        return _mm_and_si128(s, _mm_set1_epi8(0x0F));
    }
    if (wt == GGUF_TT_Q3_K) return q3k_scales_vec(((const cm_block_q3_k *)blk)->scales);
    return _mm_loadu_si128((const __m128i *)((const cm_block_q6_k *)blk)->scales);
}

/* k16_scale_bytes's bytes as int16 (Q2_K's are unsigned, the others signed). */
CM_ALWAYS_INLINE __m256i k16_widen(int wt, __m128i v) {
    return wt == GGUF_TT_Q2_K ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
}

#if defined(__AVX512BW__)
/* The sixteen scales as int16 in order, and Q2_K's mins likewise: rows_k512's. */
CM_ALWAYS_INLINE __m256i k16_scales16(int wt, const char *blk, __m256i *mn) {
    __m128i m, sc = k16_scale_bytes(wt, blk, &m);
    *mn = _mm256_cvtepu8_epi16(m);
    return k16_widen(wt, sc);
}
#endif

/* The fp16 d of a Q2_K, Q3_K or Q6_K block, and Q2_K's dmin (0 for the others). */
CM_ALWAYS_INLINE uint16_t k16_dh(int wt, const char *blk, uint16_t *dmin) {
    *dmin = 0;
    if (wt == GGUF_TT_Q2_K) {
        *dmin = ((const cm_block_q2_k *)blk)->dmin;
        return ((const cm_block_q2_k *)blk)->d;
    }
    return wt == GGUF_TT_Q3_K ? ((const cm_block_q3_k *)blk)->d : ((const cm_block_q6_k *)blk)->d;
}

#if !defined(__AVX512BW__) /* rows_k512 takes every K-quant where it is built */
/* Four Q4_K/Q5_K block headers' 16 bytes (d, dmin, the twelve scale bytes), two per vector, one per
 * 128-bit lane, to their sixteen 6-bit scales and mins in cm_q4k_scales_mins's order, lane for lane:
 * the low bits by one byte shuffle (the mins 4..7 shifted down a nibble), the top two bits of the upper
 * four by another. */
CM_ALWAYS_INLINE __m256i q45k_scales_mins2(__m256i hd) {
    const __m256i lo_at = _mm256_broadcastsi128_si256(_mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m256i hi_at = _mm256_broadcastsi128_si256(_mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m256i lo_sh = _mm256_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4);
    const __m256i lo_mask = _mm256_broadcastsi128_si256(_mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(hd, lo_at), lo_sh), lo_mask);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(_mm256_shuffle_epi8(hd, hi_at), 2), _mm256_set1_epi8(0x30));
    return _mm256_or_si256(lo, hi);
}

/* int16 j of each 128-bit lane, in all of that lane's int16 lanes. */
CM_ALWAYS_INLINE __m256i pick16(__m256i v, int j) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)(2 * j | (2 * j + 1) << 8)));
}

/* The K-quants with 256-bit vectors, four rows at a time (nr of them real; the others' lanes are computed
 * from row 0's header and not used). Each group of 32 values meets x's 32 bytes by maddubs (u <= 63,
 * |x| <= 128: no saturation), its int16 pair sums meet the sub-block's scale by madd. Q4_K/Q5_K: the
 * four headers are unpacked together and the scale of sub-block j is int16 j of sc (sc0..7 in both
 * lanes); their mins meet bsums's pairs for all rows at once. Q2_K/Q3_K/Q6_K: a group covers sub-blocks
 * 2g (low lane) and 2g + 1 (high), so the scales are widened with the even ones in the low lane and the
 * odd ones in the high, and one in-lane shuffle gives a group both; Q3_K's and Q6_K's u = q + 4 and
 * q + 32, the offsets taken off once per row and block as offset * sum sc_j * bsums_j. All integer and
 * exact, so each block's sums, and the float steps after them, are rows_k512's and the reference's. */
CM_ALWAYS_INLINE void rows_k256(int wt, int nr, int64_t nb, const char *w, size_t rb, const cm_block_q8_k *x,
                                float *out) {
    const __m128i evens_odds = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m128i d_dmin_at = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const int has_min = wt == GGUF_TT_Q2_K || wt == GGUF_TT_Q4_K || wt == GGUF_TT_Q5_K;
    const size_t bb = k_block_bytes(wt);
    const char *row[ROWS_MAX];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS_MAX; r++) row[r] = w + (size_t)(r < nr ? r : 0) * rb;
    __m128 acc4 = _mm_setzero_ps(), e4 = _mm_setzero_ps(); /* the rows' cm_qacc acc and min terms */
    for (int64_t i = 0; i < nb; i++) {
        const cm_block_q8_k *b = x + i;
        const int8_t *xq = b->qs;
        prefetch_next_rows(w, rb, nr, i, bb);
        __m256i acc[ROWS_MAX];
        __m128 d4, dm4 = _mm_setzero_ps();
        __m128i imin4 = _mm_setzero_si128();
#pragma GCC unroll 4
        for (int r = 0; r < ROWS_MAX; r++) acc[r] = _mm256_setzero_si256();
        if (wt == GGUF_TT_Q4_K || wt == GGUF_TT_Q5_K) {
            const char *h[ROWS_MAX];
            uint32_t dd[ROWS_MAX];
#pragma GCC unroll 4
            for (int r = 0; r < ROWS_MAX; r++) {
                h[r] = row[r] + (size_t)i * bb;
                memcpy(&dd[r], h[r], 4);
            }
            __m256 dv = _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)dd), d_dmin_at));
            d4 = _mm256_castps256_ps128(dv);
            dm4 = _mm256_extractf128_ps(dv, 1);
            __m256i sm01 = q45k_scales_mins2(_mm256_loadu2_m128i((const __m128i *)h[1], (const __m128i *)h[0]));
            __m256i sm23 = q45k_scales_mins2(_mm256_loadu2_m128i((const __m128i *)h[3], (const __m128i *)h[2]));
            __m256i smw[ROWS_MAX] = {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(sm01)),
                                     _mm256_cvtepu8_epi16(_mm256_extracti128_si256(sm01, 1)),
                                     _mm256_cvtepu8_epi16(_mm256_castsi256_si128(sm23)),
                                     _mm256_cvtepu8_epi16(_mm256_extracti128_si256(sm23, 1))};
            /* the mins (int16 8..15 of smw) against the sums of x per sub-block of 32 (pairs of bsums) */
            __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)b->bsums),
                                        _mm_loadu_si128((const __m128i *)(b->bsums + 8)));
            __m256i bsv = _mm256_inserti128_si256(_mm256_setzero_si256(), bs, 1);
            __m256i mp[ROWS_MAX], sc[ROWS_MAX];
#pragma GCC unroll 4
            for (int r = 0; r < ROWS_MAX; r++) {
                mp[r] = _mm256_madd_epi16(smw[r], bsv);
                sc[r] = _mm256_permute4x64_epi64(smw[r], _MM_SHUFFLE(1, 0, 1, 0)); /* sc0..7 in both lanes */
            }
            imin4 = hsum4_i32(mp);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32));
#pragma GCC unroll 4
                for (int r = 0; r < nr; r++) {
                    q45k_view a = q45k_at(wt, row[r], i);
                    __m256i q = _mm256_loadu_si256((const __m256i *)(a.qs + 32 * c)), qh;
                    if (wt == GGUF_TT_Q5_K) qh = _mm256_loadu_si256((const __m256i *)a.qh);
                    __m256i u0 = q45k_group(q, wt == GGUF_TT_Q5_K ? &qh : NULL, c, 0);
                    __m256i u1 = q45k_group(q, wt == GGUF_TT_Q5_K ? &qh : NULL, c, 1);
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, x0), pick16(sc[r], 2 * c)));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x1), pick16(sc[r], 2 * c + 1)));
                }
            }
        } else { /* Q2_K, Q3_K, Q6_K: sixteen sub-blocks of 16, bsums's */
            /* bsums with the even sub-blocks in the low lane and the odd in the high, as the scales */
            __m256i bs = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)b->bsums),
                                                                      _mm256_broadcastsi128_si256(_mm_setr_epi8(
                                                                          0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15))),
                                                  _MM_SHUFFLE(3, 1, 2, 0));
            __m256i sc[ROWS_MAX], mp[ROWS_MAX];
            uint16_t dh[ROWS_MAX], mh[ROWS_MAX];
#pragma GCC unroll 4
            for (int r = 0; r < ROWS_MAX; r++) {
                const char *a = row[r] + (size_t)i * bb;
                __m128i mn, s8 = k16_scale_bytes(wt, a, &mn);
                sc[r] = k16_widen(wt, _mm_shuffle_epi8(s8, evens_odds)); /* evens low, odds high */
                dh[r] = k16_dh(wt, a, &mh[r]);
                if (wt == GGUF_TT_Q2_K) {
                    mp[r] = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_shuffle_epi8(mn, evens_odds)), bs);
                } else { /* the offsets' share (4 or 32 per value), taken off from the start */
                    acc[r] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                              _mm256_slli_epi32(_mm256_madd_epi16(sc[r], bs), wt == GGUF_TT_Q3_K ? 2 : 5));
                }
            }
            d4 = _mm_cvtph_ps(_mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], 0, 0, 0, 0));
            if (wt == GGUF_TT_Q2_K) {
                dm4 = _mm_cvtph_ps(_mm_setr_epi16((short)mh[0], (short)mh[1], (short)mh[2], (short)mh[3], 0, 0, 0, 0));
                imin4 = hsum4_i32(mp);
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
                for (int r = 0; r < nr; r++) {
                    const char *a = row[r] + (size_t)i * bb;
                    __m256i v0, v1 = _mm256_setzero_si256(), v2 = _mm256_setzero_si256();
                    if (wt == GGUF_TT_Q6_K) {
                        const cm_block_q6_k *q6 = (const cm_block_q6_k *)a;
                        v0 = _mm256_loadu_si256((const __m256i *)(q6->ql + 64 * h));
                        v1 = _mm256_loadu_si256((const __m256i *)(q6->ql + 64 * h + 32));
                        v2 = _mm256_loadu_si256((const __m256i *)(q6->qh + 32 * h));
                    } else if (wt == GGUF_TT_Q3_K) {
                        const cm_block_q3_k *q3 = (const cm_block_q3_k *)a;
                        v0 = _mm256_loadu_si256((const __m256i *)(q3->qs + 32 * h));
                        v1 = _mm256_loadu_si256((const __m256i *)q3->hmask);
                    } else {
                        v0 = _mm256_loadu_si256((const __m256i *)(((const cm_block_q2_k *)a)->qs + 32 * h));
                    }
#pragma GCC unroll 4
                    for (int s = 0; s < 4; s++) {
                        int g = 4 * h + s;
                        __m256i u = wt == GGUF_TT_Q2_K   ? bits_at(v0, 2 * s, 3)
                                    : wt == GGUF_TT_Q3_K ? q3k_group(v0, v1, h, s)
                                                         : q6k_group(v0, v1, v2, s);
                        __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(xq + 32 * g)));
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, pick16(sc[r], g)));
                    }
                }
            }
        }
        __m128 s = _mm_mul_ps(d4, _mm_set1_ps(b->d));
        acc4 = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_i32(acc)), s, acc4);
        if (has_min)
            e4 = _mm_fmadd_ps(_mm_cvtepi32_ps(imin4), _mm_xor_ps(_mm_mul_ps(dm4, _mm_set1_ps(b->d)), _mm_set1_ps(-0.0f)), e4);
    }
    float a[ROWS_MAX], e[ROWS_MAX];
    _mm_storeu_ps(a, acc4);
    _mm_storeu_ps(e, e4);
    for (int r = 0; r < nr; r++) out[r] = a[r] + e[r];
}
#endif

#if defined(__AVX512BW__)
/* The K-quants with 512-bit vectors: two groups of 32 per vector, against x's 64 bytes of those
 * groups. A row's 32 int16 pair sums maddubs(u, x) (u <= 63, |x| <= 128: no saturation) meet each
 * value's sub-block scale in the int16 lanes of sc (permuted from the block's scales), widened and
 * summed by madd (dpwssd with VNNI). Q4_K's and Q5_K's u are their q (0..15, 0..31), their mins against
 * the pairs of bsums for all rows at once; Q2_K's u are its q (0..3), its mins against bsums; Q3_K's
 * and Q6_K's u = q + 4 and q + 32, and the offsets come off once per row and block as offset * sum
 * sc_j * bsums_j (their sub-blocks of 16 are bsums's). All integer and exact, so the block sums are
 * rows_k256's. */
CM_ALWAYS_INLINE __m512i dot_pair_scaled(__m512i acc, __m512i u, __m512i x, __m512i sc) {
    __m512i p = _mm512_maddubs_epi16(u, x);
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, p, sc);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p, sc));
#endif
}

/* int16 lanes 0..15 = sc16[j], lanes 16..31 = sc16[j + 1] (sixteen int16 scales sc16 in the low 256 bits). */
CM_ALWAYS_INLINE __m512i scale_halves(__m512i sc16, int j) {
    const __m512i base = _mm512_set_epi64(0x0001000100010001ll, 0x0001000100010001ll, 0x0001000100010001ll,
                                          0x0001000100010001ll, 0, 0, 0, 0);
    return _mm512_permutexvar_epi16(_mm512_add_epi16(base, _mm512_set1_epi16((short)j)), sc16);
}

/* int16 lanes 8m..8m+7 = sc16[j + m] for m < 4 (a 64-byte pair of Q6_K groups covers four sub-blocks). */
CM_ALWAYS_INLINE __m512i scale_quarters(__m512i sc16, int j) {
    const __m512i base = _mm512_set_epi64(0x0003000300030003ll, 0x0003000300030003ll, 0x0002000200020002ll,
                                          0x0002000200020002ll, 0x0001000100010001ll, 0x0001000100010001ll, 0, 0);
    return _mm512_permutexvar_epi16(_mm512_add_epi16(base, _mm512_set1_epi16((short)j)), sc16);
}

/* int16 lanes 0..15 = lo, 16..31 = hi. */
CM_ALWAYS_INLINE __m512i halves16(short lo, short hi) {
    return _mm512_inserti64x4(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi), 1);
}

/* bytes 0..31 = lo, 32..63 = hi. */
CM_ALWAYS_INLINE __m512i halves8(char lo, char hi) {
    return _mm512_inserti64x4(_mm512_set1_epi8(lo), _mm256_set1_epi8(hi), 1);
}

/* Groups 4h, 4h + 1 (u0) and 4h + 2, 4h + 3 (u1) of a Q2_K, Q3_K or Q6_K block (blk) as unsigned bytes
 * u = q + offset, each pair against x's 64 bytes at 128h (u0) and 128h + 64 (u1): k16_group's bytes, two
 * groups a vector. */
CM_ALWAYS_INLINE void k16_pairs512(int wt, const char *blk, int h, __m512i *u0, __m512i *u1) {
    const __m512i m03 = _mm512_set1_epi8(3), m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    if (wt == GGUF_TT_Q6_K) {
        const cm_block_q6_k *a = (const cm_block_q6_k *)blk;
        __m512i l = _mm512_loadu_si512((const void *)(a->ql + 64 * h));
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(a->qh + 32 * h)));
        /* groups s = 0, 1: low nibbles, qh bits 0-1 / 2-3 at bits 4-5; s = 2, 3: high, bits 4-5 / 6-7 */
        *u0 = _mm512_or_si512(_mm512_and_si512(l, m0f), _mm512_and_si512(_mm512_sllv_epi16(qh, halves16(4, 2)), m30));
        *u1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m0f),
                              _mm512_and_si512(_mm512_srlv_epi16(qh, halves16(0, 2)), m30));
        return;
    }
    /* Q2_K and Q3_K: the low two bits of group s at bits 2s of qs[32h..] */
    const uint8_t *qs = wt == GGUF_TT_Q2_K ? ((const cm_block_q2_k *)blk)->qs : ((const cm_block_q3_k *)blk)->qs;
    __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * h)));
    *u0 = _mm512_and_si512(_mm512_srlv_epi16(q, halves16(0, 2)), m03);
    *u1 = _mm512_and_si512(_mm512_srlv_epi16(q, halves16(4, 6)), m03);
    if (wt == GGUF_TT_Q3_K) { /* the third bit, bit 4h + s of hmask, adds 4 */
        const __m512i four = _mm512_set1_epi8(4);
        __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)((const cm_block_q3_k *)blk)->hmask));
        __mmask64 k0 = _mm512_test_epi8_mask(hm, halves8((char)(1 << 4 * h), (char)(2 << 4 * h)));
        __mmask64 k1 = _mm512_test_epi8_mask(hm, halves8((char)(4 << 4 * h), (char)(8 << 4 * h)));
        *u0 = _mm512_mask_add_epi8(*u0, k0, *u0, four);
        *u1 = _mm512_mask_add_epi8(*u1, k1, *u1, four);
    }
}

/* The eight int32 lanes of a 512-bit sum, halves added. */
CM_ALWAYS_INLINE __m256i fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* The totals of four rows' 16 int32 lanes, exactly, as [row 0, row 1, row 2, row 3]. */
CM_ALWAYS_INLINE __m128i hsum4_512(const __m512i a[4]) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    __m256i t = fold512(_mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1)));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* Four Q4_K/Q5_K block headers (d, dmin, the twelve scale bytes), one per 128-bit lane, to their
 * sixteen 6-bit scales and mins in cm_q4k_scales_mins's order, lane for lane: the low bits by one byte
 * shuffle (the mins 4..7 shifted down a nibble), the top two bits of the upper four by another. */
CM_ALWAYS_INLINE __m512i q45k_scales_mins4(__m512i hd) {
    const __m512i lo_at = _mm512_broadcast_i32x4(_mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi_at = _mm512_broadcast_i32x4(_mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m512i lo_sh = _mm512_broadcast_i32x4(_mm_setr_epi16(0, 0, 0, 0, 0, 0, 4, 4));
    const __m512i lo_mask = _mm512_broadcast_i32x4(_mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(_mm512_shuffle_epi8(hd, lo_at), lo_sh), lo_mask);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(_mm512_shuffle_epi8(hd, hi_at), 2), _mm512_set1_epi8(0x30));
    return _mm512_or_si512(lo, hi);
}

CM_ALWAYS_INLINE void rows_k512(int wt, int nr, int64_t nb, const char *w, size_t rb, const cm_block_q8_k *x,
                                float *out) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), sh04 = halves16(0, 4);
    /* Q5_K: int16 shifts [a in the low 256 bits | b in the high] that bring qh bits 2c, 2c + 1 to bit 4 */
    const __m512i m10 = _mm512_set1_epi8(0x10), sh43 = halves16(4, 3), sh21 = halves16(2, 1),
                  sh01 = halves16(0, 1), sh23 = halves16(2, 3);
    __m128 acc4 = _mm_setzero_ps(), e4 = _mm_setzero_ps(); /* as rows_k */
    float acc1 = 0.0f, e1 = 0.0f;
    const size_t bb = k_block_bytes(wt);
    for (int64_t i = 0; i < nb; i++) {
        const cm_block_q8_k *b = x + i;
        const int8_t *xq = b->qs;
        prefetch_next_rows(w, rb, nr, i, bb);
        __m512i acc[ROWS_MAX];
        __m128 d4 = _mm_setzero_ps(); /* the rows' d (four rows) */
        float d1 = 0.0f;              /* row 0's d (one row) */
        if (wt == GGUF_TT_Q4_K || wt == GGUF_TT_Q5_K) {
            __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)b->bsums),
                                        _mm_loadu_si128((const __m128i *)(b->bsums + 8)));
            /* row r's eight scales in the int16 lanes 16 * (r % 2) + 0..7 of sc[r] */
            __m512i sc[ROWS_MAX];
            q45k_view a[ROWS_MAX];
            if (nr == ROWS_MAX) {
                /* the four headers at once: scales and mins widened two rows to a vector, their d and
                 * dmin converted together, the mins' sums against bsums's pairs reduced together */
                const char *h = w + (size_t)i * bb;
                __m512i hd = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)h));
                hd = _mm512_inserti32x4(hd, _mm_loadu_si128((const __m128i *)(h + rb)), 1);
                hd = _mm512_inserti32x4(hd, _mm_loadu_si128((const __m128i *)(h + 2 * rb)), 2);
                hd = _mm512_inserti32x4(hd, _mm_loadu_si128((const __m128i *)(h + 3 * rb)), 3);
                __m512i sm = q45k_scales_mins4(hd);
                sc[0] = sc[1] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(sm));
                sc[2] = sc[3] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(sm, 1));
                const __m512i dm_at = _mm512_castsi128_si512(_mm_setr_epi16(0, 8, 16, 24, 1, 9, 17, 25));
                __m256 dm = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(dm_at, hd)));
                d4 = _mm256_castps256_ps128(dm);
                __m512i bsv = _mm512_broadcast_i32x4(bs);
                /* lanes 1 and 3 of each product: the mins of rows 0 and 1, 2 and 3 */
                __m512i mp = _mm512_shuffle_i32x4(_mm512_madd_epi16(sc[0], bsv), _mm512_madd_epi16(sc[2], bsv),
                                                  _MM_SHUFFLE(3, 1, 3, 1));
                mp = _mm512_add_epi32(mp, _mm512_shuffle_epi32(mp, _MM_PERM_BADC));
                mp = _mm512_add_epi32(mp, _mm512_shuffle_epi32(mp, _MM_PERM_CDAB));
                const __m512i lane0 = _mm512_castsi128_si512(_mm_setr_epi32(0, 4, 8, 12));
                __m128i imin = _mm512_castsi512_si128(_mm512_permutexvar_epi32(lane0, mp));
                __m128 s = _mm_mul_ps(_mm256_extractf128_ps(dm, 1), _mm_set1_ps(b->d));
                e4 = _mm_fmadd_ps(_mm_cvtepi32_ps(imin), _mm_xor_ps(s, _mm_set1_ps(-0.0f)), e4);
#pragma GCC unroll 4
                for (int r = 0; r < nr; r++) a[r] = q45k_at(wt, w + (size_t)r * rb, i);
            } else {
                a[0] = q45k_at(wt, w, i);
                d1 = fp16(a[0].d);
                uint8_t smb[16];
                cm_q4k_scales_mins(a[0].scales, smb);
                __m128i smv = _mm_loadu_si128((const __m128i *)smb);
                __m128i t = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_srli_si128(smv, 8)), bs);
                t = _mm_hadd_epi32(t, t);
                t = _mm_hadd_epi32(t, t);
                e1 = fmaf((float)_mm_cvtsi128_si32(t), -(fp16(a[0].dmin) * b->d), e1);
                sc[0] = _mm512_castsi128_si512(_mm_cvtepu8_epi16(smv));
            }
            for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                __m512i xv = _mm512_loadu_si512((const void *)(xq + 64 * c));
                for (int r = 0; r < nr; r++) {
                    __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(a[r].qs + 32 * c)));
                    __m512i u = _mm512_and_si512(_mm512_srlv_epi16(q, sh04), m0f);
                    if (wt == GGUF_TT_Q5_K) { /* qh bits 2c and 2c + 1 of each byte to bit 4 */
                        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)a[r].qh));
                        qh = c < 2 ? _mm512_sllv_epi16(qh, c == 0 ? sh43 : sh21)
                                   : _mm512_srlv_epi16(qh, c == 2 ? sh01 : sh23);
                        u = _mm512_or_si512(u, _mm512_and_si512(qh, m10));
                    }
                    acc[r] = dot_pair_scaled(acc[r], u, xv, scale_halves(sc[r], 2 * c + 16 * (r & 1)));
                }
            }
        } else { /* Q2_K, Q3_K, Q6_K: sixteen sub-blocks of 16, bsums's */
            __m256i bs = _mm256_loadu_si256((const __m256i *)b->bsums);
            __m512i sc[ROWS_MAX];
            __m256i mp[ROWS_MAX]; /* Q2_K: the mins' products with bsums */
            const char *a[ROWS_MAX];
            uint16_t dh[ROWS_MAX], mh[ROWS_MAX];
#pragma GCC unroll 4
            for (int r = 0; r < nr; r++) {
                a[r] = w + (size_t)r * rb + (size_t)i * bb;
                __m256i mn, sc16 = k16_scales16(wt, a[r], &mn);
                sc[r] = _mm512_castsi256_si512(sc16);
                dh[r] = k16_dh(wt, a[r], &mh[r]);
                if (wt == GGUF_TT_Q2_K) {
                    mp[r] = _mm256_madd_epi16(mn, bs);
                    acc[r] = _mm512_setzero_si512();
                } else { /* the offsets' share (4 or 32 per value), taken off from the start */
                    acc[r] = _mm512_zextsi256_si512(_mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), wt == GGUF_TT_Q3_K ? 2 : 5)));
                }
            }
            if (nr == ROWS_MAX) {
                d4 = _mm_cvtph_ps(_mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], 0, 0, 0, 0));
                if (wt == GGUF_TT_Q2_K) {
                    __m128 dm = _mm_cvtph_ps(
                        _mm_setr_epi16((short)mh[0], (short)mh[1], (short)mh[2], (short)mh[3], 0, 0, 0, 0));
                    __m128 s = _mm_mul_ps(dm, _mm_set1_ps(b->d));
                    e4 = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_i32(mp)), _mm_xor_ps(s, _mm_set1_ps(-0.0f)), e4);
                }
            } else {
                d1 = fp16(dh[0]);
                if (wt == GGUF_TT_Q2_K) e1 = fmaf((float)hsum_i32(mp[0]), -(fp16(mh[0]) * b->d), e1);
            }
            for (int h = 0; h < 2; h++) {
                __m512i x0 = _mm512_loadu_si512((const void *)(xq + 128 * h));
                __m512i x1 = _mm512_loadu_si512((const void *)(xq + 128 * h + 64));
                for (int r = 0; r < nr; r++) {
                    __m512i u0, u1;
                    k16_pairs512(wt, a[r], h, &u0, &u1);
                    acc[r] = dot_pair_scaled(acc[r], u0, x0, scale_quarters(sc[r], 8 * h));
                    acc[r] = dot_pair_scaled(acc[r], u1, x1, scale_quarters(sc[r], 8 * h + 4));
                }
            }
        }
        if (nr == ROWS_MAX) {
            __m128 s = _mm_mul_ps(d4, _mm_set1_ps(b->d));
            acc4 = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_512(acc)), s, acc4);
        } else {
            acc1 = fmaf((float)hsum_i32(fold512(acc[0])), d1 * b->d, acc1);
        }
    }
    float a[ROWS_MAX], e[ROWS_MAX];
    _mm_storeu_ps(a, acc4);
    _mm_storeu_ps(e, e4);
    if (nr != ROWS_MAX) { a[0] = acc1; e[0] = e1; }
    for (int r = 0; r < nr; r++) out[r] = a[r] + e[r];
}
#endif

/* out[r] = dot(row r, x) for r < nr, K-quant rows of nb blocks: rows_k512 on the 512-bit families, else
 * rows_k256. */
CM_ALWAYS_INLINE void rows_k(int wt, int nr, int64_t nb, const char *w, size_t rb, const cm_block_q8_k *x,
                             float *out) {
#if defined(__AVX512BW__)
    rows_k512(wt, nr, nb, w, rb, x, out);
#else
    rows_k256(wt, nr, nb, w, rb, x, out);
#endif
}

/* One function per (type, rows) pair: the compiler specialises each. */
typedef void (*rows_fn)(int64_t nb, const char *w, size_t rb, const void *x, float *out);
#define ROWS_LEGACY(T, NR)                                                                  \
    static void rows_##T##_##NR(int64_t nb, const char *w, size_t rb, const void *x, float *out) { \
        rows_legacy(GGUF_TT_##T, NR, nb, w, rb, x, out);                                    \
    }
#define ROWS_K(T, NR)                                                                       \
    static void rows_##T##_##NR(int64_t nb, const char *w, size_t rb, const void *x, float *out) { \
        rows_k(GGUF_TT_##T, NR, nb, w, rb, (const cm_block_q8_k *)x, out);                  \
    }
ROWS_LEGACY(Q8_0, 1) ROWS_LEGACY(Q8_0, 4)
ROWS_LEGACY(Q4_0, 1) ROWS_LEGACY(Q4_0, 4)
ROWS_LEGACY(Q4_1, 1) ROWS_LEGACY(Q4_1, 4)
ROWS_LEGACY(Q5_0, 1) ROWS_LEGACY(Q5_0, 4)
ROWS_LEGACY(Q5_1, 1) ROWS_LEGACY(Q5_1, 4)
ROWS_K(Q2_K, 1) ROWS_K(Q2_K, 4)
ROWS_K(Q3_K, 1) ROWS_K(Q3_K, 4)
ROWS_K(Q4_K, 1) ROWS_K(Q4_K, 4)
ROWS_K(Q5_K, 1) ROWS_K(Q5_K, 4)
ROWS_K(Q6_K, 1) ROWS_K(Q6_K, 4)

/* The one- and four-row kernels of wtype; 0 when it has none (not an int8 weight type). */
static int rows_kernels(int wtype, rows_fn *one, rows_fn *four) {
    switch (wtype) {
#define PICK(T) case GGUF_TT_##T: *one = rows_##T##_1; *four = rows_##T##_4; return 1;
    PICK(Q8_0) PICK(Q4_0) PICK(Q4_1) PICK(Q5_0) PICK(Q5_1)
    PICK(Q2_K) PICK(Q3_K) PICK(Q4_K) PICK(Q5_K) PICK(Q6_K)
#undef PICK
    default: return 0;
    }
}

/* The 32 q of a legacy block (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) as signed bytes, and its d and m (0 for
 * the types without one): cm_quant_unpack_legacy's numbers. */
CM_ALWAYS_INLINE __m256i legacy_q(const char *blk, int type, float *d, float *m) {
    *m = 0.0f;
    switch (type) {
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *x = (const cm_block_q8_0 *)blk;
        *d = fp16(x->d);
        return _mm256_loadu_si256((const __m256i *)x->qs);
    }
    case GGUF_TT_Q4_0: {
        const cm_block_q4_0 *x = (const cm_block_q4_0 *)blk;
        *d = fp16(x->d);
        return _mm256_sub_epi8(legacy_nibbles(x->qs), _mm256_set1_epi8(8));
    }
    case GGUF_TT_Q4_1: {
        const cm_block_q4_1 *x = (const cm_block_q4_1 *)blk;
        *d = fp16(x->d);
        *m = fp16(x->m);
        return legacy_nibbles(x->qs);
    }
    case GGUF_TT_Q5_0: {
        const cm_block_q5_0 *x = (const cm_block_q5_0 *)blk;
        *d = fp16(x->d);
        return _mm256_sub_epi8(legacy_q5(x->qs, x->qh), _mm256_set1_epi8(16));
    }
    default: {
        const cm_block_q5_1 *x = (const cm_block_q5_1 *)blk;
        *d = fp16(x->d);
        *m = fp16(x->m);
        return legacy_q5(x->qs, x->qh);
    }
    }
}

/* ------------------------------------------------------------ the int8 GEMM's repacking */

/* cm_quant_unpack_legacy of every block of a row (nb blocks of wtype, Q8_0 or a legacy type) at once:
 * q (nb * 32) the blocks' q, d[b * dm_stride] and m[b * dm_stride] their d and m, each what the
 * reference unpacker gives, through the same SIMD decoders as the dots above (gemm_q8.c's tiles). */
void CM_FAMILY_FN(cm_quant_unpack_legacy_row)(int wtype, const void *w, int64_t nb, int8_t *q, float *d, float *m,
                                              size_t dm_stride) {
    size_t bs = legacy_block_bytes(wtype);
    for (int64_t b = 0; b < nb; b++)
        _mm256_storeu_si256((__m256i *)(q + 32 * b),
                            legacy_q((const char *)w + (size_t)b * bs, wtype, &d[(size_t)b * dm_stride],
                                     &m[(size_t)b * dm_stride]));
}

/* ------------------------------------------------------------ AVX2 dequantisation */

/* y[0..32) = q * d + off for 32 int8 q, (d, off) = (d0, off0) for the first 16 and (d1, off1) for the
 * rest: the reference's d * q - m with off = -m (a - b is a + -b in IEEE arithmetic), or + m for
 * Q4_1/Q5_1, or -0.0 where there is no offset (x + -0.0 is x, signed zeros included). */
static inline void deq32(float *y, __m256i q, float d0, float off0, float d1, float off1) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    __m256 vd0 = _mm256_set1_ps(d0), vo0 = _mm256_set1_ps(off0);
    __m256 vd1 = _mm256_set1_ps(d1), vo1 = _mm256_set1_ps(off1);
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(f0, vd0), vo0));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_mul_ps(f1, vd0), vo0));
    _mm256_storeu_ps(y + 16, _mm256_add_ps(_mm256_mul_ps(f2, vd1), vo1));
    _mm256_storeu_ps(y + 24, _mm256_add_ps(_mm256_mul_ps(f3, vd1), vo1));
}

static void dequant_legacy_avx2(int type, const void *w, float *y, int64_t nb) {
    size_t bs = legacy_block_bytes(type);
    const int has_m = type == GGUF_TT_Q4_1 || type == GGUF_TT_Q5_1;
    for (int64_t i = 0; i < nb; i++, y += 32) {
        float d, m;
        __m256i q = legacy_q((const char *)w + (size_t)i * bs, type, &d, &m);
        if (!has_m) m = -0.0f; /* q * d + -0.0 keeps the sign of a zero product, as q * d alone */
        deq32(y, q, d, m, d, m);
    }
}

static void dequant_k16_avx2(int type, const void *w, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += CM_QK_K) {
        k16_view v;
        k16_at(type, w, i, &v);
        float dl[16], off[16];
        for (int j = 0; j < 16; j++) {
            dl[j] = v.d * (float)v.sc[j];
            off[j] = -(v.dmin * (float)v.mn[j]); /* -0.0 where there is no min: see deq32 */
        }
        const __m256i bias = _mm256_set1_epi8((char)v.offset);
        for (int g = 0; g < 8; g++)
            deq32(y + 32 * g, _mm256_sub_epi8(k16_group(type, v.blk, g), bias), dl[2 * g], off[2 * g], dl[2 * g + 1],
                  off[2 * g + 1]);
    }
}

static void dequant_q45_k_avx2(int type, const void *w, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, y += CM_QK_K) {
        q45k_view a = q45k_at(type, w, i);
        float d = fp16(a.d), dmin = fp16(a.dmin), dl[8], off[8];
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            cm_q4k_scale_min(j, a.scales, &sc, &m);
            dl[j] = d * (float)sc;
            off[j] = -(dmin * (float)m);
        }
        __m256i qh = a.qh ? _mm256_loadu_si256((const __m256i *)a.qh) : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(a.qs + 32 * c));
            for (int half = 0; half < 2; half++) {
                int j = 2 * c + half;
                deq32(y + 64 * c + 32 * half, q45k_group(q, a.qh ? &qh : NULL, c, half), dl[j], off[j], dl[j], off[j]);
            }
        }
    }
}
#endif
/* ============================================================ K-quant rows for the int8 GEMM */

void CM_FAMILY_FN(cm_quant_unpack_k_row)(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin,
                                         int16_t *sc16, int16_t *mn16) {
#if defined(CM_Q_AVX2)
    if (type == GGUF_TT_Q4_K || type == GGUF_TT_Q5_K) {
        for (int64_t b = 0; b < nb; b++, q += CM_QK_K, sc16 += 16, mn16 += 16) {
            q45k_view a = q45k_at(type, w, b);
            d[b] = fp16(a.d);
            dmin[b] = fp16(a.dmin);
            for (int j = 0; j < 8; j++) { /* sub-blocks of 32: each scale and min twice */
                uint8_t sc, m;
                cm_q4k_scale_min(j, a.scales, &sc, &m);
                sc16[2 * j] = sc16[2 * j + 1] = sc;
                mn16[2 * j] = mn16[2 * j + 1] = m;
            }
            __m256i qh = a.qh ? _mm256_loadu_si256((const __m256i *)a.qh) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a.qs + 32 * c));
                for (int half = 0; half < 2; half++)
                    _mm256_storeu_si256((__m256i *)(q + 64 * c + 32 * half), q45k_group(v, a.qh ? &qh : NULL, c, half));
            }
        }
        return;
    }
    if (type == GGUF_TT_Q2_K || type == GGUF_TT_Q3_K || type == GGUF_TT_Q6_K) {
        for (int64_t b = 0; b < nb; b++, q += CM_QK_K, sc16 += 16, mn16 += 16) {
            k16_view v;
            k16_at(type, w, b, &v);
            d[b] = v.d;
            dmin[b] = v.dmin;
            for (int j = 0; j < 16; j++) {
                sc16[j] = (int16_t)v.sc[j];
                mn16[j] = (int16_t)v.mn[j];
            }
            const __m256i off = _mm256_set1_epi8((char)v.offset);
            for (int g = 0; g < 8; g++)
                _mm256_storeu_si256((__m256i *)(q + 32 * g), _mm256_sub_epi8(k16_group(type, v.blk, g), off));
        }
        return;
    }
#endif
    cm_quant_unpack_k_row_ref(type, w, nb, q, d, dmin, sc16, mn16);
}

/* ============================================================ dispatch */

void CM_FAMILY_FN(cm_quant_dequantize)(int type, const void *w, float *y, int64_t k) {
#if defined(CM_Q_AVX2)
    switch (type) {
    case GGUF_TT_Q4_0: case GGUF_TT_Q4_1: case GGUF_TT_Q5_0: case GGUF_TT_Q5_1:
        dequant_legacy_avx2(type, w, y, k / CM_QK4);
        return;
    case GGUF_TT_Q2_K: case GGUF_TT_Q3_K: case GGUF_TT_Q6_K: dequant_k16_avx2(type, w, y, k / CM_QK_K); return;
    case GGUF_TT_Q4_K: case GGUF_TT_Q5_K: dequant_q45_k_avx2(type, w, y, k / CM_QK_K); return;
    default: break;
    }
#endif
    cm_quant_dequantize_ref(type, w, y, k);
}

float CM_FAMILY_FN(cm_quant_dot_q)(int wtype, int64_t k, const void *w, const void *x) {
#if defined(CM_Q_AVX2)
    rows_fn one, four;
    if (rows_kernels(wtype, &one, &four)) {
        float y;
        one(k / cm_quant_block_values(wtype), w, 0, x, &y);
        return y;
    }
#endif
    return cm_quant_dot_q_ref(wtype, k, w, x);
}

/* Rows of W in fours, each four against every token while it is in cache. */
void CM_FAMILY_FN(cm_quant_matvec_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                                     float *y, int64_t ldy, int64_t r0, int64_t r1) {
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
#if defined(CM_Q_AVX2)
    rows_fn one, four;
    if (rows_kernels(wtype, &one, &four)) {
        int64_t nb = k / cm_quant_block_values(wtype);
        for (int64_t r = r0; r < r1;) {
            int nr = r1 - r >= ROWS_MAX ? ROWS_MAX : 1;
            const char *wr = (const char *)w + (size_t)r * rb;
            for (int j = 0; j < n; j++) {
                float o[ROWS_MAX];
                (nr == ROWS_MAX ? four : one)(nb, wr, rb, (const char *)x + (size_t)j * x_stride, o);
                for (int q = 0; q < nr; q++) y[(int64_t)j * ldy + r + q] = o[q];
            }
            r += nr;
        }
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r++)
        for (int j = 0; j < n; j++)
            y[(int64_t)j * ldy + r] =
                cm_quant_dot_q_ref(wtype, k, (const char *)w + (size_t)r * rb, (const char *)x + (size_t)j * x_stride);
}

/* The f32 path works in chunks of up to 1024 values (whole blocks): dequantise, then feed each token's
 * 64 float lanes (kernels_order.h; a chunk starts on a multiple of 64, so the lanes run on). */
#define CHUNK (4 * CM_QK_K)

void CM_FAMILY_FN(cm_quant_matvec_f32)(int wtype, const void *w, int64_t k, const float *x, size_t x_stride,
                                       int n, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    int qk = cm_quant_block_values(wtype);
    size_t bb = cm_quant_block_bytes(wtype), rb = (size_t)(k / qk) * bb;
    float t[CHUNK], acc[16][64];
    for (int j0 = 0; j0 < n; j0 += 16) {
        int nn = n - j0 < 16 ? n - j0 : 16;
        for (int64_t r = r0; r < r1; r++) {
            const char *wr = (const char *)w + (size_t)r * rb;
            memset(acc, 0, (size_t)nn * sizeof acc[0]);
            for (int64_t c = 0; c < k; c += CHUNK) {
                int len = k - c < CHUNK ? (int)(k - c) : CHUNK;
                CM_FAMILY_FN(cm_quant_dequantize)(wtype, wr + (size_t)(c / qk) * bb, t, len);
                for (int j = 0; j < nn; j++) {
                    const float *xj = (const float *)((const char *)x + (size_t)(j0 + j) * x_stride);
                    CM_FAMILY_FN(cm_lanes_fma)(acc[j], t, xj + c, len);
                }
            }
            for (int j = 0; j < nn; j++) y[(int64_t)(j0 + j) * ldy + r] = CM_FAMILY_FN(cm_lanes_sum)(acc[j]);
        }
    }
}
