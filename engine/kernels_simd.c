/*
 * kernels_simd.c - the fast kernels of kernels.h for one SIMD family (see kernels_family.h): built once
 * per family with its compiler flags, each build exporting the table cm_kernels_<CM_FAMILY>.
 *
 * Paths by the build's ISA macros: AVX-512 needs F+BW+VL+DQ (+VNNI for the int8 dot, else the AVX2
 * int8 dot is used); AVX2 needs FMA and F16C. A build without them (the scalar family) calls the
 * references of kernels.c, except where the plain loop is itself the fast version. Every float kernel
 * follows kernels_order.h operation for operation (its 64 lanes as four zmm or eight ymm accumulators,
 * its exp lane by lane), so every family gives the references' bits.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "kernels_family.h"
#include "kernels_order.h"
#include "util.h"

#ifndef CM_FAMILY
#error "kernels_simd.c is built once per kernel family with -DCM_FAMILY=<name> (engine/meson.build)"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CM_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CM_AVX2 1
#endif
#if defined(CM_AVX512) && defined(__AVX512VNNI__)
#define CM_AVX512VNNI 1
#endif
#if defined(CM_AVX512) || defined(CM_AVX2)
#include <immintrin.h>
#endif

#if defined(CM_AVX2) || defined(CM_AVX512)
static inline float fp16(uint16_t h) { return _cvtsh_ss(h); } /* exact, like cm_fp16_to_f32 */
#endif

/* ============================================================ Q8_0 quantisation */

static void quantize_row_q8_0(const float *x, cm_block_q8_0 *y, int64_t k) {
#if defined(CM_AVX512)
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / CM_QK8_0; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        __m512 a = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
        float amax = _mm512_reduce_max_ps(a);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT); /* cm_f32_to_fp16 in hardware (equal but for NaN) */
        __m512 s = _mm512_set1_ps(id);
        /* cvtps rounds with MXCSR's default round-half-even, the same as nearbyintf */
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
        _mm_storeu_si128((__m128i *)y[b].qs, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y[b].qs + 16), _mm512_cvtsepi32_epi8(q1));
    }
#elif defined(CM_AVX2)
    /* the same steps in 256-bit halves (prefill quantises every activation row of the batch) */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / CM_QK8_0; b++) {
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + b * 32 + 8 * i);
        __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float d = _mm_cvtss_f32(h) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        __m256 s = _mm256_set1_ps(id);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], s)); /* round half even */
        /* |q| <= 127: the saturating packs are exact; they interleave 128-bit lanes, the permute undoes it */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)y[b].qs, p);
    }
#else
    cm_quantize_row_q8_0_ref(x, y, k);
#endif
}

/* Q8_K (quants.h): the same steps per super-block of 256, q clamped to +-127 as the reference clamps
 * (x / d can round just above 127), and each 16 q's sum (AVX-512, and AVX2 in 256-bit parts). */
static void quantize_row_q8_k(const float *x, cm_block_q8_k *y, int64_t k) {
#if defined(CM_AVX512)
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    for (int64_t b = 0; b < k / CM_QK_K; b++) {
        const float *xb = x + b * CM_QK_K;
        __m512 a = _mm512_setzero_ps();
        for (int i = 0; i < CM_QK_K; i += 16) a = _mm512_max_ps(a, _mm512_andnot_ps(sign, _mm512_loadu_ps(xb + i)));
        float d = _mm512_reduce_max_ps(a) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        __m512 s = _mm512_set1_ps(id);
        for (int j = 0; j < CM_QK_K / 16; j++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * j), s)); /* round half even */
            q = _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
            _mm_storeu_si128((__m128i *)(y[b].qs + 16 * j), _mm512_cvtepi32_epi8(q));
            y[b].bsums[j] = (int16_t)_mm512_reduce_add_epi32(q);
        }
    }
#elif defined(CM_AVX2)
    /* the same steps in 256-bit parts, 32 values (two sums) at a time */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    for (int64_t b = 0; b < k / CM_QK_K; b++) {
        const float *xb = x + b * CM_QK_K;
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < CM_QK_K; i += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = d;
        __m256 s = _mm256_set1_ps(id);
        for (int c = 0; c < CM_QK_K / 32; c++) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) { /* round half even, then the reference's clamp */
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * c + 8 * i), s));
                q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], hi), lo);
            }
            /* |q| <= 127: the packs are exact; they interleave 128-bit lanes, the permute undoes it */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(y[b].qs + 32 * c),
                                _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            /* the two sums of 16: lanes 0 + 4 and 1 + 5 after two pairwise adds */
            __m256i t = _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            t = _mm256_hadd_epi32(t, t);
            __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            y[b].bsums[2 * c] = (int16_t)_mm_cvtsi128_si32(u);
            y[b].bsums[2 * c + 1] = (int16_t)_mm_extract_epi32(u, 1);
        }
    }
#else
    cm_quantize_row_q8_k_ref(x, y, k);
#endif
}

/* ============================================================ dequantisation */

static void dequantize_row(int type, const void *w, float *y, int64_t k) {
#if defined(CM_AVX512)
    int64_t i = 0;
    switch (type) {
    case GGUF_TT_F16: {
        const uint16_t *h = w;
        for (; i + 16 <= k; i += 16)
            _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
        for (; i < k; i++) y[i] = fp16(h[i]);
        return;
    }
    case GGUF_TT_BF16: {
        const uint16_t *h = w;
        for (; i + 16 <= k; i += 16) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + i)));
            _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
        for (; i < k; i++) y[i] = cm_bf16_to_f32(h[i]);
        return;
    }
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = w;
        for (int64_t j = 0; j < k / CM_QK8_0; j++) {
            __m512 d = _mm512_set1_ps(fp16(b[j].d));
            __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b[j].qs));
            __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b[j].qs + 16)));
            _mm512_storeu_ps(y + j * 32, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q0)));
            _mm512_storeu_ps(y + j * 32 + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q1)));
        }
        return;
    }
    default:
        break;
    }
#endif
    if (cm_quant_is_block_type(type))
        CM_FAMILY_FN(cm_quant_dequantize)(type, w, y, k);
    else
        cm_dequantize_row_ref(type, w, y, k);
}

/* ============================================================ the 64 float lanes (kernels_order.h) */

/* The lanes live in named vector variables (struct members, never an array), so that the compiler
 * keeps them in registers: four zmm s0..s3 (lanes 16j .. 16j + 15 in sj) or eight ymm a0..a7 (lanes
 * 8j .. 8j + 7 in aj). EACH4 / EACH8 write a statement once per vector. */
#define EACH4(M) M(0) M(1) M(2) M(3)
#define EACH8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
/* lanes16_fma and lanes8_fma are inlined wherever used, with the type constant and the lanes in registers */
#define CM_ALWAYS_INLINE static inline __attribute__((always_inline))

#if defined(CM_AVX2) || defined(CM_AVX512)
/* The tree's last levels, from eight lanes: 128-bit halves, then 64-bit, then 32-bit ones. */
static inline float tree8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(CM_AVX512)
typedef struct lanes16 {
    __m512 s0, s1, s2, s3;
} lanes16;

static inline float lanes16_tree(const lanes16 *a) {
    __m512 v = _mm512_add_ps(_mm512_add_ps(a->s0, a->s2), _mm512_add_ps(a->s1, a->s3));
    return tree8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

static inline void lanes16_zero(lanes16 *a) {
#define ZERO_(j) a->s##j = _mm512_setzero_ps();
    EACH4(ZERO_)
#undef ZERO_
}

/* 16 weights from index i (a multiple of 16) as f32, exactly as cm_weight_f32 (kernels_order.h)
 * converts them; `m` masks a tail (Q8_0 rows have none: K % 32 == 0). */
static inline __m512 load16(int t, const void *w, int64_t i, __mmask16 m) {
    switch (t) {
    case GGUF_TT_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i));
    case GGUF_TT_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i)), 16));
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = (const cm_block_q8_0 *)w + i / CM_QK8_0;
        __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + i % CM_QK8_0))));
        return _mm512_mul_ps(_mm512_set1_ps(fp16(b->d)), q); /* exact: d * q has at most 19 bits */
    }
    default:
        return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    }
}

/* Q8_0's 16 values from q as f32 times d (exact). */
static inline __m512 q8x16(const int8_t *q, __m512 d) {
    return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))));
}

/* The lanes take w_i x_i for i < k, value i in lane i % 64 (lanes that already hold the start of a row
 * take its values from the next multiple of 64 on); t is a compile-time constant at each call site, so
 * the switch folds away. A tail feeds only its own lanes (mask3 keeps the others). */
CM_ALWAYS_INLINE void lanes16_fma(lanes16 *a, int t, int64_t k, const void *w, const float *x) {
    __m512 s0 = a->s0, s1 = a->s1, s2 = a->s2, s3 = a->s3;
    int64_t i = 0;
    if (t == GGUF_TT_Q8_0) { /* two blocks per step, each block's d converted once */
        for (const cm_block_q8_0 *b = w; i + 64 <= k; i += 64, b += 2) {
            __m512 d0 = _mm512_set1_ps(fp16(b[0].d)), d1 = _mm512_set1_ps(fp16(b[1].d));
            s0 = _mm512_fmadd_ps(q8x16(b[0].qs, d0), _mm512_loadu_ps(x + i), s0);
            s1 = _mm512_fmadd_ps(q8x16(b[0].qs + 16, d0), _mm512_loadu_ps(x + i + 16), s1);
            s2 = _mm512_fmadd_ps(q8x16(b[1].qs, d1), _mm512_loadu_ps(x + i + 32), s2);
            s3 = _mm512_fmadd_ps(q8x16(b[1].qs + 16, d1), _mm512_loadu_ps(x + i + 48), s3);
        }
    } else {
        for (; i + 64 <= k; i += 64) {
#define FMA_(j) s##j = _mm512_fmadd_ps(load16(t, w, i + 16 * j, 0xffff), _mm512_loadu_ps(x + i + 16 * j), s##j);
            EACH4(FMA_)
#undef FMA_
        }
    }
#define TAIL_(j)                                                                                          \
    if (k - i > 16 * j) {                                                                                 \
        int64_t n_ = k - i - 16 * j;                                                                      \
        __mmask16 m_ = n_ >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n_) - 1);                        \
        s##j = _mm512_mask3_fmadd_ps(load16(t, w, i + 16 * j, m_), _mm512_maskz_loadu_ps(m_, x + i + 16 * j), \
                                     s##j, m_);                                                           \
    }
    EACH4(TAIL_)
#undef TAIL_
    a->s0 = s0, a->s1 = s1, a->s2 = s2, a->s3 = s3;
}
#endif

#if defined(CM_AVX2) || defined(CM_AVX512)
/* Also the AVX-512 families' lanes for quants_simd.c, whose kernels are 256-bit code: zmm instructions
 * between them cost them more than the wider FMAs gain (measured: a Q4_K x f32 matvec 1.3x slower with
 * zmm lanes). */
typedef struct lanes8 {
    __m256 a0, a1, a2, a3, a4, a5, a6, a7;
} lanes8;

static inline float lanes8_tree(const lanes8 *a) {
    __m256 v0 = _mm256_add_ps(_mm256_add_ps(a->a0, a->a4), _mm256_add_ps(a->a2, a->a6));
    __m256 v1 = _mm256_add_ps(_mm256_add_ps(a->a1, a->a5), _mm256_add_ps(a->a3, a->a7));
    return tree8(_mm256_add_ps(v0, v1));
}

#if !defined(CM_AVX512) /* the AVX-512 families compute their own dots in zmm */
static inline void lanes8_zero(lanes8 *a) {
#define ZERO_(j) a->a##j = _mm256_setzero_ps();
    EACH8(ZERO_)
#undef ZERO_
}
#endif

static inline void lanes8_load(lanes8 *a, const float *acc) {
#define LOAD_(j) a->a##j = _mm256_loadu_ps(acc + 8 * j);
    EACH8(LOAD_)
#undef LOAD_
}

static inline void lanes8_store(const lanes8 *a, float *acc) {
#define STORE_(j) _mm256_storeu_ps(acc + 8 * j, a->a##j);
    EACH8(STORE_)
#undef STORE_
}

/* 8 weights from index i (a multiple of 8) as f32, exactly as cm_weight_f32 (kernels_order.h) converts them. */
static inline __m256 load8(int t, const void *w, int64_t i) {
    switch (t) {
    case GGUF_TT_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    case GGUF_TT_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = (const cm_block_q8_0 *)w + i / CM_QK8_0;
        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + i % CM_QK8_0))));
        return _mm256_mul_ps(_mm256_set1_ps(fp16(b->d)), q); /* exact: d * q has at most 19 bits */
    }
    default:
        return _mm256_loadu_ps((const float *)w + i);
    }
}

/* Q8_0's 8 values from q as f32 times d (exact). */
static inline __m256 q8x8(const int8_t *q, __m256 d) {
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))));
}

/* As lanes16_fma. A tail's last vector of n < 8 values is copied into zeros and fed whole: a
 * lane past the end takes fma(0, 0, acc) = acc + 0 = acc, since a lane that starts at +0 and only takes
 * fmas is never -0. */
CM_ALWAYS_INLINE void lanes8_fma(lanes8 *a, int t, int64_t k, const void *w, const float *x) {
    __m256 a0 = a->a0, a1 = a->a1, a2 = a->a2, a3 = a->a3, a4 = a->a4, a5 = a->a5, a6 = a->a6, a7 = a->a7;
    int64_t i = 0;
    if (t == GGUF_TT_Q8_0) { /* two blocks per step, each block's d converted once */
        for (const cm_block_q8_0 *b = w; i + 64 <= k; i += 64, b += 2) {
            __m256 d0 = _mm256_set1_ps(fp16(b[0].d)), d1 = _mm256_set1_ps(fp16(b[1].d));
#define FMAQ_(j) a##j = _mm256_fmadd_ps(q8x8(b[j / 4].qs + 8 * (j % 4), j < 4 ? d0 : d1), _mm256_loadu_ps(x + i + 8 * j), a##j);
            EACH8(FMAQ_)
#undef FMAQ_
        }
    } else {
        for (; i + 64 <= k; i += 64) {
#define FMA_(j) a##j = _mm256_fmadd_ps(load8(t, w, i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), a##j);
            EACH8(FMA_)
#undef FMA_
        }
    }
#define TAIL_(j)                                                                                          \
    if (k - i >= 8 * j + 8) {                                                                             \
        a##j = _mm256_fmadd_ps(load8(t, w, i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), a##j);             \
    } else if (k - i > 8 * j) {                                                                           \
        float wb_[8], xb_[8];                                                                             \
        _mm256_storeu_ps(wb_, _mm256_setzero_ps());                                                       \
        _mm256_storeu_ps(xb_, _mm256_setzero_ps());                                                       \
        for (int64_t r_ = 0; r_ < k - i - 8 * j; r_++) {                                                  \
            wb_[r_] = cm_weight_f32(t, w, i + 8 * j + r_);                                                    \
            xb_[r_] = x[i + 8 * j + r_];                                                                  \
        }                                                                                                 \
        a##j = _mm256_fmadd_ps(_mm256_loadu_ps(wb_), _mm256_loadu_ps(xb_), a##j);                         \
    }
    if (i < k) {
        EACH8(TAIL_)
    }
#undef TAIL_
    a->a0 = a0, a->a1 = a1, a->a2 = a2, a->a3 = a3, a->a4 = a4, a->a5 = a5, a->a6 = a6, a->a7 = a7;
}

#if !defined(CM_AVX512)
/* Lane mask of the first n (0..8) of eight. */
static inline __m256i first_n8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
#endif

/* ============================================================ dot products */

/* kernels_order.h's float dot of a row of type t (F32, F16, BF16, Q8_0) with f32 x. */
CM_ALWAYS_INLINE float dot_float(int t, int64_t k, const void *w, const float *x) {
#if defined(CM_AVX512)
    lanes16 a;
    lanes16_zero(&a);
    lanes16_fma(&a, t, k, w, x);
    return lanes16_tree(&a);
#elif defined(CM_AVX2)
    lanes8 a;
    lanes8_zero(&a);
    lanes8_fma(&a, t, k, w, x);
    return lanes8_tree(&a);
#else
    return cm_vec_dot_ref(t, GGUF_TT_F32, k, w, x);
#endif
}

/* quants_simd.c's f32 products feed the same lanes, chunk by chunk (kernels_family.h). */
void CM_FAMILY_FN(cm_lanes_fma)(float acc[CM_LANES], const float *w, const float *x, int64_t n) {
#if defined(CM_AVX512) || defined(CM_AVX2)
    lanes8 a;
    lanes8_load(&a, acc);
    lanes8_fma(&a, GGUF_TT_F32, n, w, x);
    lanes8_store(&a, acc);
#else
    for (int64_t i = 0; i < n; i++) acc[i % CM_LANES] = fmaf(w[i], x[i], acc[i % CM_LANES]);
#endif
}

float CM_FAMILY_FN(cm_lanes_sum)(float acc[CM_LANES]) {
#if defined(CM_AVX512) || defined(CM_AVX2)
    lanes8 a;
    lanes8_load(&a, acc);
    return lanes8_tree(&a);
#else
    return cm_lanes_total(acc);
#endif
}

static float dot_f32(const float *a, const float *b, int64_t k) { return dot_float(GGUF_TT_F32, k, a, b); }

static float quant_dot_f32(int wtype, int64_t k, const void *w, const float *x) {
    float y;
    CM_FAMILY_FN(cm_quant_matvec_f32)(wtype, w, k, x, 0, 1, &y, 1, 0, 1);
    return y;
}

static float vec_dot(int wtype, int xtype, int64_t k, const void *w, const void *x) {
    if (cm_quant_is_block_type(wtype))
        return xtype == GGUF_TT_F32 ? quant_dot_f32(wtype, k, w, x) : CM_FAMILY_FN(cm_quant_dot_q)(wtype, k, w, x);
    switch (wtype) {
    case GGUF_TT_Q8_0:
        return xtype == GGUF_TT_Q8_0 ? CM_FAMILY_FN(cm_quant_dot_q)(wtype, k, w, x) : dot_float(GGUF_TT_Q8_0, k, w, x);
    case GGUF_TT_F32: return dot_float(GGUF_TT_F32, k, w, x);
    case GGUF_TT_F16: return dot_float(GGUF_TT_F16, k, w, x);
    case GGUF_TT_BF16: return dot_float(GGUF_TT_BF16, k, w, x);
    default:
        return cm_vec_dot_ref(wtype, xtype, k, w, x);
    }
}

/* ============================================================ matrix x vectors */

/* The type is a template parameter in spirit: each case below inlines its own dot loop. */
#define MATVEC_LOOP(T)                                                                                   \
    for (int64_t r = r0; r < r1; r++) {                                                                  \
        const void *wr = (const char *)w + (size_t)r * rb;                                               \
        for (int j = 0; j < n; j++)                                                                      \
            y[j * ldy + r] = dot_float(T, k, wr, (const float *)((const char *)x + (size_t)j * x_stride)); \
    }

static void matvec_rows(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                        float *y, int64_t ldy, int64_t r0, int64_t r1) {
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    if (cm_quant_is_block_type(wtype)) {
        if (xtype == GGUF_TT_F32) {
            CM_FAMILY_FN(cm_quant_matvec_f32)(wtype, w, k, x, x_stride, n, y, ldy, r0, r1);
        } else {
            CM_FAMILY_FN(cm_quant_matvec_q)(wtype, w, k, x, x_stride, n, y, ldy, r0, r1);
        }
        return;
    }
    switch (wtype) {
    case GGUF_TT_Q8_0:
        if (xtype == GGUF_TT_Q8_0) {
            CM_FAMILY_FN(cm_quant_matvec_q)(wtype, w, k, x, x_stride, n, y, ldy, r0, r1);
        } else {
            MATVEC_LOOP(GGUF_TT_Q8_0)
        }
        return;
    case GGUF_TT_F32:
        MATVEC_LOOP(GGUF_TT_F32)
        return;
    case GGUF_TT_F16:
        MATVEC_LOOP(GGUF_TT_F16)
        return;
    case GGUF_TT_BF16:
        MATVEC_LOOP(GGUF_TT_BF16)
        return;
    default:
        cm_matvec_rows_ref(wtype, xtype, w, k, x, x_stride, n, y, ldy, r0, r1);
    }
}

/* ============================================================ element-wise */

/* kernels_order.h's exp, lane by lane: the same clamps, roundings and fmas as cm_exp_def. */
#if defined(CM_AVX512)
static inline __m512 exp16(__m512 x) {
    const __m512 magic = _mm512_set1_ps(CM_EXP_ROUND);
    x = _mm512_min_ps(_mm512_set1_ps(CM_EXP_MAX), x); /* minps/maxps return their second operand for a NaN */
    x = _mm512_max_ps(_mm512_set1_ps(CM_EXP_MIN), x);
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(CM_EXP_LOG2E)), magic), magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CM_EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CM_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(CM_EXP_P5);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CM_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CM_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CM_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CM_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CM_EXP_P0));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p 2^n rounded once, as the two multiplies of cm_exp_def */
}
#endif
#if defined(CM_AVX2) && !defined(CM_AVX512)
static inline __m256 exp8(__m256 x) {
    const __m256 magic = _mm256_set1_ps(CM_EXP_ROUND);
    x = _mm256_min_ps(_mm256_set1_ps(CM_EXP_MAX), x);
    x = _mm256_max_ps(_mm256_set1_ps(CM_EXP_MIN), x);
    __m256 t = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(CM_EXP_LOG2E)), magic);
    __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CM_EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CM_EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(CM_EXP_P5);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CM_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CM_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CM_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CM_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CM_EXP_P0));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n = 2^n1 2^n2 (n1 = floor(n / 2): another split than cm_exp_def's, the same p 2^n) */
    __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
    __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

static void rmsnorm(float *y, const float *x, const float *w, int64_t k, float eps) {
#if defined(CM_AVX512) || defined(CM_AVX2)
    float ss = dot_float(GGUF_TT_F32, k, x, x);
    float s = 1.0f / sqrtf(ss / (float)k + eps);
    int64_t i = 0;
#if defined(CM_AVX512)
    __m512 vs = _mm512_set1_ps(s);
    for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), vs)));
#endif
    __m256 vs8 = _mm256_set1_ps(s);
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vs8)));
    for (; i < k; i++) y[i] = w[i] * (x[i] * s);
#else
    cm_rmsnorm_ref(y, x, w, k, eps);
#endif
}

static void add(float *x, const float *b, int64_t k) {
    /* the compiler vectorises this loop with the family's flags; the reference is already optimal */
    for (int64_t i = 0; i < k; i++) x[i] += b[i];
}

static void axpy(float *y, float a, const float *x, int64_t k) {
    int64_t i = 0;
#if defined(CM_AVX512)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
#if defined(CM_AVX2) || defined(CM_AVX512)
    __m256 va8 = _mm256_set1_ps(a);
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va8, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    cm_axpy_ref(y + i, a, x + i, k - i);
}

static void f32_to_f16_row(const float *x, uint16_t *y, int64_t k) {
    int64_t i = 0;
#if defined(CM_AVX512)
    for (; i + 16 <= k; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(CM_AVX2) || defined(CM_AVX512)
    for (; i + 8 <= k; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    cm_f32_to_f16_row_ref(x + i, y + i, k - i);
}

static float dot_f16(const uint16_t *a, const float *b, int64_t k) { return dot_float(GGUF_TT_F16, k, a, b); }

static void axpy_f16(float *y, float a, const uint16_t *x, int64_t k) {
    int64_t i = 0;
#if defined(CM_AVX512)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= k; i += 16) {
        __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, v, _mm512_loadu_ps(y + i)));
    }
#endif
#if defined(CM_AVX2) || defined(CM_AVX512)
    __m256 va8 = _mm256_set1_ps(a);
    for (; i + 8 <= k; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va8, v, _mm256_loadu_ps(y + i)));
    }
#endif
    cm_axpy_f16_ref(y + i, a, x + i, k - i);
}

/* ------------------------------------------------------------ attention over a run of KV rows */

/* Scores over a K^T block (cm_att_scores_heads_ref): keys side by side in the lanes, each key's sum
 * its own lane's FMA chain along the head dim, so every lane computes exactly the reference's number.
 * A kernel call takes NK registers of keys (a constant) for NH heads (a constant, their sums held in
 * registers across the head dim): each K element is loaded and converted once for the NH heads. */
#if defined(CM_AVX512)
/* keys [0, 16 * NK) of kt, the last register's tail masked by m (tail lanes load zeros and are not
 * stored) */
CM_ALWAYS_INLINE void att_kt16(int type, int nk, int nh, const char *kt, size_t ks, __mmask16 m, const float *q,
                               size_t qs, int64_t e, float scale, float *out, size_t os) {
    /* the sums in named registers (an array of them, GCC keeps in memory and stores every step) */
    const __mmask16 m0 = nk == 1 ? m : (__mmask16)0xffff;
    __m512 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71;
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = a60 = a61 = a70 = a71 = _mm512_setzero_ps();
    for (int64_t d = 0; d < e; d++) {
        const char *r = kt + (size_t)d * ks;
        __m512 k0 = load16(type, r, 0, m0), k1 = nk > 1 ? load16(type, r, 16, m) : k0;
#define KT16_(H)                                                                                   \
        if (nh > H) {                                                                              \
            __m512 qd = _mm512_set1_ps(q[(size_t)H * qs + (size_t)d]);                             \
            a##H##0 = _mm512_fmadd_ps(k0, qd, a##H##0);                                            \
            if (nk > 1) a##H##1 = _mm512_fmadd_ps(k1, qd, a##H##1);                                \
        }
        KT16_(0) KT16_(1) KT16_(2) KT16_(3) KT16_(4) KT16_(5) KT16_(6) KT16_(7)
#undef KT16_
    }
    const __m512 vs = _mm512_set1_ps(scale);
#define KT16_(H)                                                                                   \
    if (nh > H) {                                                                                  \
        _mm512_mask_storeu_ps(out + (size_t)H * os, m0, _mm512_mul_ps(a##H##0, vs));               \
        if (nk > 1) _mm512_mask_storeu_ps(out + (size_t)H * os + 16, m, _mm512_mul_ps(a##H##1, vs)); \
    }
    KT16_(0) KT16_(1) KT16_(2) KT16_(3) KT16_(4) KT16_(5) KT16_(6) KT16_(7)
#undef KT16_
}
#define ATT_KT_VEC 16 /* keys per register */
#define ATT_KT_HEADS 8 /* heads per pass at most (2 x 8 sums, 2 keys, a query in the 32 zmm) */
#elif defined(CM_AVX2)
/* As att_kt16 with 8 keys a register; the last register whole (a tail is padded by the caller). */
CM_ALWAYS_INLINE void att_kt8(int type, int nk, int nh, const char *kt, size_t ks, const float *q, size_t qs, int64_t e,
                              float scale, float *out, size_t os) {
    __m256 a00, a01, a10, a11, a20, a21, a30, a31; /* named, as att_kt16's */
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = _mm256_setzero_ps();
    for (int64_t d = 0; d < e; d++) {
        const char *r = kt + (size_t)d * ks;
        __m256 k0, k1;
        if (type == GGUF_TT_F16) {
            k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)r));
            k1 = nk > 1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(r + 16))) : k0;
        } else {
            k0 = _mm256_loadu_ps((const float *)(const void *)r);
            k1 = nk > 1 ? _mm256_loadu_ps((const float *)(const void *)r + 8) : k0;
        }
#define KT8_(H)                                                                                    \
        if (nh > H) {                                                                              \
            __m256 qd = _mm256_set1_ps(q[(size_t)H * qs + (size_t)d]);                             \
            a##H##0 = _mm256_fmadd_ps(k0, qd, a##H##0);                                            \
            if (nk > 1) a##H##1 = _mm256_fmadd_ps(k1, qd, a##H##1);                                \
        }
        KT8_(0) KT8_(1) KT8_(2) KT8_(3)
#undef KT8_
    }
    const __m256 vs = _mm256_set1_ps(scale);
#define KT8_(H)                                                                                    \
    if (nh > H) {                                                                                  \
        _mm256_storeu_ps(out + (size_t)H * os, _mm256_mul_ps(a##H##0, vs));                         \
        if (nk > 1) _mm256_storeu_ps(out + (size_t)H * os + 8, _mm256_mul_ps(a##H##1, vs));         \
    }
    KT8_(0) KT8_(1) KT8_(2) KT8_(3)
#undef KT8_
}
#define ATT_KT_VEC 8
#define ATT_KT_HEADS 4 /* 2 x 4 sums, 2 keys, a query in the 16 ymm */
#endif

#if defined(CM_AVX512) || defined(CM_AVX2)
/* One pass: NK registers of keys from kt, NH heads from q; the type, NK and NH constants inside. */
static void att_kt_pass(int type, int nk, int nh, const char *kt, size_t ks, int nkeys, const float *q, size_t qs,
                        int64_t e, float scale, float *out, size_t os) {
#if defined(CM_AVX512)
    int last = nkeys - 16 * (nk - 1);
    __mmask16 m = last >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << last) - 1);
#define KT_(T, NK, NH) att_kt16(T, NK, NH, kt, ks, m, q, qs, e, scale, out, os)
#else
    (void)nkeys;
#define KT_(T, NK, NH) att_kt8(T, NK, NH, kt, ks, q, qs, e, scale, out, os)
#endif
#define KT_NH_(T, NK)                                                                                         \
    switch (nh) {                                                                                             \
    case 1: KT_(T, NK, 1); break;                                                                             \
    case 2: KT_(T, NK, 2); break;                                                                             \
    case 3: KT_(T, NK, 3); break;                                                                             \
    case 4: KT_(T, NK, 4); break;                                                                             \
    ATT_KT_MORE_(T, NK)                                                                                       \
    }
#if defined(CM_AVX512)
#define ATT_KT_MORE_(T, NK)                                                                                   \
    case 5: KT_(T, NK, 5); break;                                                                             \
    case 6: KT_(T, NK, 6); break;                                                                             \
    case 7: KT_(T, NK, 7); break;                                                                             \
    default: KT_(T, NK, 8); break;
#else
#define ATT_KT_MORE_(T, NK)
#endif
    if (type == GGUF_TT_F16) {
        if (nk == 1) { KT_NH_(GGUF_TT_F16, 1) }
        else { KT_NH_(GGUF_TT_F16, 2) }
    } else {
        if (nk == 1) { KT_NH_(GGUF_TT_F32, 1) }
        else { KT_NH_(GGUF_TT_F32, 2) }
    }
#undef ATT_KT_MORE_
#undef KT_NH_
#undef KT_
}
#endif

static void att_scores_heads(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t qs, int nh,
                             int64_t e, float scale, float *out, size_t os) {
#if defined(CM_AVX512) || defined(CM_AVX2)
    const size_t eb = type == GGUF_TT_F16 ? 2 : 4, ks = kt_stride * eb;
    const int step = 2 * ATT_KT_VEC;
    int t = 0;
#if defined(CM_AVX512)
    const int whole = n; /* a tail is masked */
#else
    const int whole = n / ATT_KT_VEC * ATT_KT_VEC; /* AVX2 has no masked 16-bit load: a tail goes below */
#endif
    for (int nkeys; t < whole; t += nkeys) {
        nkeys = whole - t < step ? whole - t : step;
        int nk = (nkeys + ATT_KT_VEC - 1) / ATT_KT_VEC;
        /* heads in passes of at most ATT_KT_HEADS, as even as possible */
        for (int h = 0; h < nh;) {
            int passes = (nh - h + ATT_KT_HEADS - 1) / ATT_KT_HEADS, k = (nh - h + passes - 1) / passes;
            att_kt_pass(type, nk, k, (const char *)kt + (size_t)t * eb, ks, nkeys, q + (size_t)h * qs, qs, e, scale,
                        out + (size_t)h * os + t, os);
            h += k;
        }
    }
#if !defined(CM_AVX512)
    if (t < n && e <= 128) { /* the tail's keys into a register's width of zero-padded f32 columns */
        const int rest = n - t;
        _Alignas(32) float buf[128 * ATT_KT_VEC], o[ATT_KT_HEADS * ATT_KT_VEC];
        for (int64_t d = 0; d < e; d++)
            for (int j = 0; j < ATT_KT_VEC; j++) {
                size_t i = (size_t)d * kt_stride + (size_t)(t + j);
                buf[d * ATT_KT_VEC + j] = j >= rest                ? 0.0f
                                          : type == GGUF_TT_F16 ? fp16(((const uint16_t *)kt)[i])
                                                                : ((const float *)kt)[i];
            }
        for (int h = 0; h < nh;) {
            int k = nh - h < ATT_KT_HEADS ? nh - h : ATT_KT_HEADS;
            att_kt_pass(GGUF_TT_F32, 1, k, (const char *)buf, ATT_KT_VEC * sizeof(float), rest, q + (size_t)h * qs, qs,
                        e, scale, o, ATT_KT_VEC);
            for (int i = 0; i < k; i++) memcpy(out + (size_t)(h + i) * os + t, o + i * ATT_KT_VEC, (size_t)rest * sizeof(float));
            h += k;
        }
        t = n;
    }
#endif
    if (t < n) /* a head dim the tail buffer does not hold */
        cm_att_scores_heads_ref(type, (const char *)kt + (size_t)t * eb, kt_stride, n - t, q, qs, nh, e, scale, out + t, os);
#else
    cm_att_scores_heads_ref(type, kt, kt_stride, n, q, qs, nh, e, scale, out, os);
#endif
}

#if defined(CM_AVX512)
/* y[i, i + 64) of cm_att_values_ref for NH heads (a constant at each call site) at once: each V row's
 * 16-value pieces are converted once and feed the NH heads' y, 4 * NH zmm held across the n rows (tails
 * masked). */
CM_ALWAYS_INLINE void att_values64_heads(int type, int nh, float *y, size_t ys, const float *p, size_t ps,
                                         const char *v, size_t rb, int n, int64_t i, int64_t e) {
    __mmask16 m[4];
    for (int j = 0; j < 4; j++)
        m[j] = e - i >= 16 * j + 16 ? (__mmask16)0xffff
               : e - i > 16 * j   ? (__mmask16)((1u << (e - i - 16 * j)) - 1)
                                  : 0;
    __m512 acc[4][4];
    for (int h = 0; h < nh; h++)
        for (int j = 0; j < 4; j++) acc[h][j] = _mm512_maskz_loadu_ps(m[j], y + (size_t)h * ys + i + 16 * j);
    for (int t = 0; t < n; t++) {
        const char *r = v + (size_t)t * rb;
        __m512 x[4];
        for (int j = 0; j < 4; j++) x[j] = load16(type, r, i + 16 * j, m[j]);
        for (int h = 0; h < nh; h++) {
            __m512 a = _mm512_set1_ps(p[(size_t)h * ps + t]);
            for (int j = 0; j < 4; j++) acc[h][j] = _mm512_fmadd_ps(a, x[j], acc[h][j]);
        }
    }
    for (int h = 0; h < nh; h++)
        for (int j = 0; j < 4; j++) _mm512_mask_storeu_ps(y + (size_t)h * ys + i + 16 * j, m[j], acc[h][j]);
}

/* Up to four heads per pass (16 zmm of y, 4 of V, the broadcasts): types and head counts as constants. */
#define ATT_VH_(NH)                                                                                         \
    static void att_values_h##NH(int type, float *y, size_t ys, const float *p, size_t ps, const void *v,    \
                                 size_t rb, int n, int64_t e) {                                             \
        for (int64_t i = 0; i < e; i += 64) {                                                               \
            if (type == GGUF_TT_F16) att_values64_heads(GGUF_TT_F16, NH, y, ys, p, ps, v, rb, n, i, e);     \
            else att_values64_heads(GGUF_TT_F32, NH, y, ys, p, ps, v, rb, n, i, e);                         \
        }                                                                                                   \
    }
ATT_VH_(1)
ATT_VH_(2)
ATT_VH_(3)
ATT_VH_(4)
#undef ATT_VH_
#endif

static void att_values_heads(int type, float *y, size_t ys, const float *p, size_t ps, int nh, const void *v,
                             size_t rb, int n, int64_t e) {
#if defined(CM_AVX512)
    /* heads in passes of at most four, as even as possible (7 = 4 + 3) */
    for (int h = 0; h < nh;) {
        int passes = (nh - h + 3) / 4, k = (nh - h + passes - 1) / passes;
        float *yh = y + (size_t)h * ys;
        const float *ph = p + (size_t)h * ps;
        switch (k) {
        case 1: att_values_h1(type, yh, ys, ph, ps, v, rb, n, e); break;
        case 2: att_values_h2(type, yh, ys, ph, ps, v, rb, n, e); break;
        case 3: att_values_h3(type, yh, ys, ph, ps, v, rb, n, e); break;
        default: att_values_h4(type, yh, ys, ph, ps, v, rb, n, e); break;
        }
        h += k;
    }
#else
    for (int h = 0; h < nh; h++)
        for (int t = 0; t < n; t++) {
            const void *r = (const char *)v + (size_t)t * rb;
            if (type == GGUF_TT_F16) axpy_f16(y + (size_t)h * ys, p[(size_t)h * ps + t], r, e);
            else axpy(y + (size_t)h * ys, p[(size_t)h * ps + t], r, e);
        }
#endif
}

static void silu_mul(float *g, const float *u, int64_t k) {
    int64_t i = 0;
#if defined(CM_AVX512)
    const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
    for (; i + 16 <= k; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 e = exp16(_mm512_xor_ps(x, sign));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#elif defined(CM_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= k; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_xor_ps(x, sign));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    cm_silu_mul_ref(g + i, u + i, k - i);
}

static void softmax(float *x, int64_t k) {
#if defined(CM_AVX512)
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
    float mx = _mm512_reduce_max_ps(vm);
    for (; i < k; i++) mx = fmaxf(mx, x[i]);
    /* e_i into x, and into lane i % 64 of the sum; a tail under a mask feeds only its own lanes */
    const __m512 vmx = _mm512_set1_ps(mx);
    lanes16 a;
    lanes16_zero(&a);
    for (i = 0; i < k; i += 64) {
#define EXP_(j)                                                                                           \
        if (k - i > 16 * j) {                                                                             \
            int64_t n_ = k - i - 16 * j;                                                                  \
            __mmask16 m_ = n_ >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n_) - 1);                    \
            __m512 e_ = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m_, x + i + 16 * j), vmx));             \
            _mm512_mask_storeu_ps(x + i + 16 * j, m_, e_);                                                \
            a.s##j = _mm512_mask_add_ps(a.s##j, m_, a.s##j, e_);                                          \
        }
        EACH4(EXP_)
#undef EXP_
    }
    float sum = lanes16_tree(&a);
    __m512 vsum = _mm512_set1_ps(sum);
    for (i = 0; i + 16 <= k; i += 16) _mm512_storeu_ps(x + i, _mm512_div_ps(_mm512_loadu_ps(x + i), vsum));
    for (; i < k; i++) x[i] /= sum;
#elif defined(CM_AVX2)
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    for (; i < k; i++) mx = fmaxf(mx, x[i]);
    const __m256 vmx = _mm256_set1_ps(mx);
    lanes8 a;
    lanes8_zero(&a);
    for (i = 0; i < k; i += 64) {
#define EXP_(j)                                                                                           \
        if (k - i >= 8 * j + 8) {                                                                         \
            __m256 e_ = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8 * j), vmx));                         \
            _mm256_storeu_ps(x + i + 8 * j, e_);                                                          \
            a.a##j = _mm256_add_ps(a.a##j, e_);                                                           \
        } else if (k - i > 8 * j) {                                                                       \
            __m256i m_ = first_n8(k - i - 8 * j);                                                         \
            __m256 e_ = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i + 8 * j, m_), vmx));                  \
            _mm256_maskstore_ps(x + i + 8 * j, m_, e_);                                                   \
            a.a##j = _mm256_blendv_ps(a.a##j, _mm256_add_ps(a.a##j, e_), _mm256_castsi256_ps(m_));        \
        }
        EACH8(EXP_)
#undef EXP_
    }
    float sum = lanes8_tree(&a);
    __m256 vsum = _mm256_set1_ps(sum);
    for (i = 0; i + 8 <= k; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), vsum));
    for (; i < k; i++) x[i] /= sum;
#else
    cm_softmax_ref(x, k);
#endif
}

/* The lowest index among the n lanes holding the largest running maximum (mv: each lane's maximum, iv:
 * its index; -inf lanes hold nothing): the answer, 0 when every lane is -inf; that maximum into *mx. */
#if defined(CM_AVX512) || defined(CM_AVX2)
static int32_t lanes_first_max(const float *mv, const int32_t *iv, int n, float *mx) {
    float m = -INFINITY;
    int32_t best = 0;
    for (int l = 0; l < n; l++)
        if (mv[l] > m || (mv[l] == m && m != -INFINITY && iv[l] < best)) m = mv[l], best = iv[l];
    *mx = m;
    return best;
}
#endif

/* One pass: per lane the running maximum (x > m, so NaN and ties keep m) and the index it came from,
 * over four vectors side by side; the answer is the lowest index among the lanes holding the largest
 * maximum, which is the reference's first index of it. Rows of 2^31 values or more: the reference. */
static int64_t argmax(const float *x, int64_t k) {
#if defined(CM_AVX512)
    if (k < ((int64_t)1 << 31)) {
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        __m512 m[4];
        __m512i ix[4], cur[4];
        for (int j = 0; j < 4; j++) {
            m[j] = ninf;
            ix[j] = _mm512_setzero_si512();
            cur[j] = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32(16 * j));
        }
        int64_t i = 0;
        for (; i + 64 <= k; i += 64)
            for (int j = 0; j < 4; j++) {
                __m512 v = _mm512_loadu_ps(x + i + 16 * j);
                __mmask16 gt = _mm512_cmp_ps_mask(v, m[j], _CMP_GT_OQ);
                m[j] = _mm512_mask_mov_ps(m[j], gt, v);
                ix[j] = _mm512_mask_mov_epi32(ix[j], gt, cur[j]);
                cur[j] = _mm512_add_epi32(cur[j], _mm512_set1_epi32(64));
            }
        for (int j = 0; i < k; i += 16, j = (j + 1) & 3) { /* the tail, 16 at a time, -inf past the end */
            int64_t n = k - i;
            __mmask16 live = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            __m512 v = _mm512_mask_loadu_ps(ninf, live, x + i);
            __m512i at = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int32_t)i));
            __mmask16 gt = _mm512_cmp_ps_mask(v, m[j], _CMP_GT_OQ);
            m[j] = _mm512_mask_mov_ps(m[j], gt, v);
            ix[j] = _mm512_mask_mov_epi32(ix[j], gt, at);
        }
        float mv[64];
        int32_t iv[64];
        for (int j = 0; j < 4; j++) {
            _mm512_storeu_ps(mv + 16 * j, m[j]);
            _mm512_storeu_si512((void *)(iv + 16 * j), ix[j]);
        }
        float mx;
        return lanes_first_max(mv, iv, 64, &mx);
    }
#elif defined(CM_AVX2)
    if (k < ((int64_t)1 << 31)) {
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        __m256 m[4];
        __m256i ix[4], cur[4];
        for (int j = 0; j < 4; j++) {
            m[j] = ninf;
            ix[j] = _mm256_setzero_si256();
            cur[j] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * j));
        }
        int64_t i = 0;
        for (; i + 32 <= k; i += 32)
            for (int j = 0; j < 4; j++) {
                __m256 v = _mm256_loadu_ps(x + i + 8 * j);
                __m256 gt = _mm256_cmp_ps(v, m[j], _CMP_GT_OQ);
                m[j] = _mm256_blendv_ps(m[j], v, gt);
                ix[j] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(ix[j]), _mm256_castsi256_ps(cur[j]), gt));
                cur[j] = _mm256_add_epi32(cur[j], _mm256_set1_epi32(32));
            }
        float mv[32];
        int32_t iv[32];
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_ps(mv + 8 * j, m[j]);
            _mm256_storeu_si256((__m256i *)(void *)(iv + 8 * j), ix[j]);
        }
        float mx;
        int32_t best = lanes_first_max(mv, iv, 32, &mx);
        for (; i < k; i++) /* the tail comes after every index above: only a larger value wins */
            if (x[i] > mx) mx = x[i], best = (int32_t)i;
        return best;
    }
#endif
    return cm_argmax_ref(x, k);
}

static void exp_row(float *x, int64_t k) {
    int64_t i = 0;
#if defined(CM_AVX512)
    for (; i + 16 <= k; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
#elif defined(CM_AVX2)
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
#endif
    cm_exp_row_ref(x + i, k - i);
}

static void rope(float *x, const float *cs, const float *sn, int e, int neox) {
#if defined(CM_AVX512)
    int h = e / 2;
    if (neox && h % 16 == 0) {
        for (int i = 0; i < h; i += 16) {
            __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + h + i);
            __m512 c = _mm512_loadu_ps(cs + i), s = _mm512_loadu_ps(sn + i);
            /* same operation order as the reference: (x0*c) - (x1*s), no fused rounding */
            _mm512_storeu_ps(x + i, _mm512_sub_ps(_mm512_mul_ps(x0, c), _mm512_mul_ps(x1, s)));
            _mm512_storeu_ps(x + h + i, _mm512_add_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x0, s)));
        }
        return;
    }
#endif
    cm_rope_ref(x, cs, sn, e, neox);
}

/* ============================================================ the family's table */

/* The family's name and what its code paths need of the CPU, from the same macros that chose them. */
#define NEEDS_AVX2 (CM_CPU_AVX2 | CM_CPU_FMA | CM_CPU_F16C)
#define NEEDS_AVX512 (NEEDS_AVX2 | CM_CPU_AVX512F | CM_CPU_AVX512BW | CM_CPU_AVX512VL | CM_CPU_AVX512DQ)
#if defined(CM_AVX512VNNI)
#define FAMILY_NAME "avx512vnni"
#define FAMILY_NEEDS (NEEDS_AVX512 | CM_CPU_AVX512VNNI)
#elif defined(CM_AVX512)
#define FAMILY_NAME "avx512"
#define FAMILY_NEEDS NEEDS_AVX512
#elif defined(CM_AVX2)
#define FAMILY_NAME "avx2"
#define FAMILY_NEEDS NEEDS_AVX2
#else
#define FAMILY_NAME "scalar"
#define FAMILY_NEEDS 0u
#endif

const cm_kernel_ops CM_FAMILY_FN(cm_kernels) = {
    .name = FAMILY_NAME,
    .needs = FAMILY_NEEDS,
    .quantize_row_q8_0 = quantize_row_q8_0,
    .quantize_row_q8_k = quantize_row_q8_k,
    .dequantize_row = dequantize_row,
    .vec_dot = vec_dot,
    .matvec_rows = matvec_rows,
    .rmsnorm = rmsnorm,
    .add = add,
    .silu_mul = silu_mul,
    .softmax = softmax,
    .exp_row = exp_row,
    .argmax = argmax,
    .rope = rope,
    .dot_f32 = dot_f32,
    .axpy = axpy,
    .f32_to_f16_row = f32_to_f16_row,
    .dot_f16 = dot_f16,
    .axpy_f16 = axpy_f16,
    .att_scores_heads = att_scores_heads,
    .att_values_heads = att_values_heads,
    .quant_dequantize = CM_FAMILY_FN(cm_quant_dequantize),
    .quant_unpack_k_row = CM_FAMILY_FN(cm_quant_unpack_k_row),
    .quant_dot_q = CM_FAMILY_FN(cm_quant_dot_q),
    .quant_matvec_q = CM_FAMILY_FN(cm_quant_matvec_q),
    .quant_matvec_f32 = CM_FAMILY_FN(cm_quant_matvec_f32),
    .gemm_q_scratch_bytes = CM_FAMILY_FN(cm_gemm_q_scratch_bytes),
    .gemm_q_min_rows = CM_FAMILY_FN(cm_gemm_q_min_rows),
    .gemm_q_pack = CM_FAMILY_FN(cm_gemm_q_pack),
    .gemm_q_packed = CM_FAMILY_FN(cm_gemm_q_packed),
    .gemm_q = CM_FAMILY_FN(cm_gemm_q),
};
