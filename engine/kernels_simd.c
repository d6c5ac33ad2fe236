/*
 * kernels_simd.c - the fast kernels of kernels.h for one SIMD family (see kernels_family.h): built once
 * per family with its compiler flags, each build exporting the table cm_kernels_<CM_FAMILY>.
 *
 * Paths by the build's ISA macros: AVX-512 needs F+BW+VL+DQ (+VNNI for the int8 dot, else the AVX2
 * int8 dot is used); AVX2 needs FMA and F16C. A build without them (the scalar family) calls the
 * references of kernels.c, except where the plain loop is itself the fast version.
 */
#include "kernels.h"

#include <math.h>
#include <string.h>

#include "kernels_family.h"
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

#if defined(CM_AVX2) && !defined(CM_AVX512) /* the AVX-512 family sums its 512-bit vectors instead */
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
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
        y[b].d = cm_f32_to_fp16(d);
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
        y[b].d = cm_f32_to_fp16(d);
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

/* ============================================================ dot products */

#if defined(CM_AVX512)
/* Loads 16 weights of type t as f32; `m` masks a tail (all-ones for a full vector). */
static inline __m512 load16(int t, const void *w, int64_t i, __mmask16 m) {
    switch (t) {
    case GGUF_TT_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i));
    case GGUF_TT_BF16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i)), 16));
    default:
        return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    }
}

/* One dot of K values; t is a compile-time constant at each call site, so the switch folds away. */
static inline float dot_float_avx512(int t, int64_t k, const void *w, const float *x) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
        s0 = _mm512_fmadd_ps(load16(t, w, i, 0xffff), _mm512_loadu_ps(x + i), s0);
        s1 = _mm512_fmadd_ps(load16(t, w, i + 16, 0xffff), _mm512_loadu_ps(x + i + 16), s1);
        s2 = _mm512_fmadd_ps(load16(t, w, i + 32, 0xffff), _mm512_loadu_ps(x + i + 32), s2);
        s3 = _mm512_fmadd_ps(load16(t, w, i + 48, 0xffff), _mm512_loadu_ps(x + i + 48), s3);
    }
    for (; i + 16 <= k; i += 16) s0 = _mm512_fmadd_ps(load16(t, w, i, 0xffff), _mm512_loadu_ps(x + i), s0);
    if (i < k) {
        __mmask16 m = (__mmask16)((1u << (k - i)) - 1);
        s1 = _mm512_fmadd_ps(load16(t, w, i, m), _mm512_maskz_loadu_ps(m, x + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
#elif defined(CM_AVX2)
static inline __m256 load8(int t, const void *w, int64_t i) {
    switch (t) {
    case GGUF_TT_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    case GGUF_TT_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    default:
        return _mm256_loadu_ps((const float *)w + i);
    }
}

static inline float dot_float_avx2(int t, int64_t k, const void *w, const float *x) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        s0 = _mm256_fmadd_ps(load8(t, w, i), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(load8(t, w, i + 8), _mm256_loadu_ps(x + i + 8), s1);
        s2 = _mm256_fmadd_ps(load8(t, w, i + 16), _mm256_loadu_ps(x + i + 16), s2);
        s3 = _mm256_fmadd_ps(load8(t, w, i + 24), _mm256_loadu_ps(x + i + 24), s3);
    }
    for (; i + 8 <= k; i += 8) s0 = _mm256_fmadd_ps(load8(t, w, i), _mm256_loadu_ps(x + i), s0);
    float sum = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < k; i++) {
        float wi = t == GGUF_TT_F32 ? ((const float *)w)[i]
                 : t == GGUF_TT_F16 ? fp16(((const uint16_t *)w)[i])
                                    : cm_bf16_to_f32(((const uint16_t *)w)[i]);
        sum += wi * x[i];
    }
    return sum;
}
#endif

/* Q8_0 weights times f32 x: per block d * sum(q x), q converted exactly to f32. */
static inline float dot_q8_0_f32(int64_t nb, const cm_block_q8_0 *a, const float *x) {
#if defined(CM_AVX512)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    int64_t j = 0;
    for (; j + 2 <= nb; j += 2) {
        const float *xb = x + j * CM_QK8_0;
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)a[j].qs)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a[j].qs + 16))));
        __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)a[j + 1].qs)));
        __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a[j + 1].qs + 16))));
        __m512 s0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
        __m512 s1 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xb + 48), _mm512_mul_ps(w2, _mm512_loadu_ps(xb + 32)));
        acc0 = _mm512_fmadd_ps(s0, _mm512_set1_ps(fp16(a[j].d)), acc0);
        acc1 = _mm512_fmadd_ps(s1, _mm512_set1_ps(fp16(a[j + 1].d)), acc1);
    }
    if (j < nb) {
        const float *xb = x + j * CM_QK8_0;
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)a[j].qs)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a[j].qs + 16))));
        __m512 s0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
        acc0 = _mm512_fmadd_ps(s0, _mm512_set1_ps(fp16(a[j].d)), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(CM_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
        const float *xb = x + j * CM_QK8_0;
        __m256 s = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8) {
            __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(a[j].qs + i))));
            s = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + i), s);
        }
        acc = _mm256_fmadd_ps(s, _mm256_set1_ps(fp16(a[j].d)), acc);
    }
    return hsum256(acc);
#else
    return cm_vec_dot_ref(GGUF_TT_Q8_0, GGUF_TT_F32, nb * CM_QK8_0, a, x);
#endif
}

static float dot_f32(const float *a, const float *b, int64_t k) {
#if defined(CM_AVX512)
    return dot_float_avx512(GGUF_TT_F32, k, a, b);
#elif defined(CM_AVX2)
    return dot_float_avx2(GGUF_TT_F32, k, a, b);
#else
    return cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, k, a, b);
#endif
}

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
        return xtype == GGUF_TT_Q8_0 ? CM_FAMILY_FN(cm_quant_dot_q)(wtype, k, w, x) : dot_q8_0_f32(k / CM_QK8_0, w, x);
#if defined(CM_AVX512)
    case GGUF_TT_F32: return dot_float_avx512(GGUF_TT_F32, k, w, x);
    case GGUF_TT_F16: return dot_float_avx512(GGUF_TT_F16, k, w, x);
    case GGUF_TT_BF16: return dot_float_avx512(GGUF_TT_BF16, k, w, x);
#elif defined(CM_AVX2)
    case GGUF_TT_F32: return dot_float_avx2(GGUF_TT_F32, k, w, x);
    case GGUF_TT_F16: return dot_float_avx2(GGUF_TT_F16, k, w, x);
    case GGUF_TT_BF16: return dot_float_avx2(GGUF_TT_BF16, k, w, x);
#endif
    default:
        return cm_vec_dot_ref(wtype, xtype, k, w, x);
    }
}

/* ============================================================ matrix x vectors */

/* The type is a template parameter in spirit: each case below inlines its own dot loop. */
#define MATVEC_LOOP(DOT)                                                                \
    for (int64_t r = r0; r < r1; r++) {                                                 \
        const void *wr = (const char *)w + (size_t)r * rb;                              \
        for (int j = 0; j < n; j++)                                                     \
            y[j * ldy + r] = DOT(wr, (const void *)((const char *)x + (size_t)j * x_stride)); \
    }

static void matvec_rows(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                        float *y, int64_t ldy, int64_t r0, int64_t r1) {
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    int64_t nb = k / CM_QK8_0;
    (void)nb;
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
#define DOT_Q8F(wr, xr) dot_q8_0_f32(nb, (const cm_block_q8_0 *)(wr), (const float *)(xr))
            MATVEC_LOOP(DOT_Q8F)
        }
        return;
#if defined(CM_AVX512)
#define DOT_F32(wr, xr) dot_float_avx512(GGUF_TT_F32, k, wr, (const float *)(xr))
#define DOT_F16(wr, xr) dot_float_avx512(GGUF_TT_F16, k, wr, (const float *)(xr))
#define DOT_BF16(wr, xr) dot_float_avx512(GGUF_TT_BF16, k, wr, (const float *)(xr))
#elif defined(CM_AVX2)
#define DOT_F32(wr, xr) dot_float_avx2(GGUF_TT_F32, k, wr, (const float *)(xr))
#define DOT_F16(wr, xr) dot_float_avx2(GGUF_TT_F16, k, wr, (const float *)(xr))
#define DOT_BF16(wr, xr) dot_float_avx2(GGUF_TT_BF16, k, wr, (const float *)(xr))
#else
#define DOT_F32(wr, xr) cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, k, wr, xr)
#define DOT_F16(wr, xr) cm_vec_dot_ref(GGUF_TT_F16, GGUF_TT_F32, k, wr, xr)
#define DOT_BF16(wr, xr) cm_vec_dot_ref(GGUF_TT_BF16, GGUF_TT_F32, k, wr, xr)
#endif
    case GGUF_TT_F32:
        MATVEC_LOOP(DOT_F32)
        return;
    case GGUF_TT_F16:
        MATVEC_LOOP(DOT_F16)
        return;
    case GGUF_TT_BF16:
        MATVEC_LOOP(DOT_BF16)
        return;
    default:
        cm_matvec_rows_ref(wtype, xtype, w, k, x, x_stride, n, y, ldy, r0, r1);
    }
}

/* ============================================================ element-wise */

static void rmsnorm(float *y, const float *x, const float *w, int64_t k, float eps) {
#if defined(CM_AVX512)
    float ss = dot_f32(x, x, k);
    float s = 1.0f / sqrtf(ss / (float)k + eps);
    __m512 vs = _mm512_set1_ps(s);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), _mm512_mul_ps(_mm512_loadu_ps(x + i), vs)));
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
#if defined(CM_AVX512)
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < k; i++) y[i] += a * x[i];
#else
    for (int64_t i = 0; i < k; i++) y[i] += a * x[i];
#endif
}

#if defined(CM_AVX512)
/* e^x for 16 lanes, within ~2 ulp of expf over the float range: x = n ln2 + r, |r| <= ln2/2,
 * e^r by a degree-6 polynomial, 2^n built in the exponent field (split in two for the extremes). */
static inline __m512 exp16(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7228f)), _mm512_set1_ps(-103.97f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* scalef computes p * 2^n exactly, including subnormal results */
    return _mm512_scalef_ps(p, n);
}
#endif

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

static float dot_f16(const uint16_t *a, const float *b, int64_t k) {
#if defined(CM_AVX512)
    return dot_float_avx512(GGUF_TT_F16, k, a, b);
#elif defined(CM_AVX2)
    return dot_float_avx2(GGUF_TT_F16, k, a, b);
#else
    return cm_vec_dot_ref(GGUF_TT_F16, GGUF_TT_F32, k, a, b);
#endif
}

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

static void silu_mul(float *g, const float *u, int64_t k) {
#if defined(CM_AVX512)
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    for (; i < k; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#else
    cm_silu_mul_ref(g, u, k);
#endif
}

static void softmax(float *x, int64_t k) {
#if defined(CM_AVX512)
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
    float mx = _mm512_reduce_max_ps(vm);
    for (; i < k; i++) mx = fmaxf(mx, x[i]);
    __m512 vmx = _mm512_set1_ps(mx), vs = _mm512_setzero_ps();
    float sum = 0.0f;
    for (i = 0; i + 16 <= k; i += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmx));
        _mm512_storeu_ps(x + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    for (; i < k; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    sum += _mm512_reduce_add_ps(vs);
    __m512 vsum = _mm512_set1_ps(sum);
    for (i = 0; i + 16 <= k; i += 16) _mm512_storeu_ps(x + i, _mm512_div_ps(_mm512_loadu_ps(x + i), vsum));
    for (; i < k; i++) x[i] /= sum;
#else
    cm_softmax_ref(x, k);
#endif
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
    .dequantize_row = dequantize_row,
    .vec_dot = vec_dot,
    .matvec_rows = matvec_rows,
    .rmsnorm = rmsnorm,
    .add = add,
    .silu_mul = silu_mul,
    .softmax = softmax,
    .rope = rope,
    .dot_f32 = dot_f32,
    .axpy = axpy,
    .f32_to_f16_row = f32_to_f16_row,
    .dot_f16 = dot_f16,
    .axpy_f16 = axpy_f16,
    .quant_dequantize = CM_FAMILY_FN(cm_quant_dequantize),
    .quant_dot_q = CM_FAMILY_FN(cm_quant_dot_q),
    .quant_matvec_q = CM_FAMILY_FN(cm_quant_matvec_q),
    .quant_matvec_f32 = CM_FAMILY_FN(cm_quant_matvec_f32),
    .gemm_q_scratch_bytes = CM_FAMILY_FN(cm_gemm_q_scratch_bytes),
    .gemm_q = CM_FAMILY_FN(cm_gemm_q),
};
