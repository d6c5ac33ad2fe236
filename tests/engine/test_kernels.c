/*
 * test_kernels.c - every optimised kernel equals its plain reference bit for bit on random data, at sizes
 * that are and are not multiples of the SIMD width and of the 64 float lanes (where the type allows), and
 * the threaded matvec equals the reference with 1..4 threads; all of it for every kernel family this CPU
 * runs, so no result depends on the family. The references themselves are held to what they compute:
 * dots within 1e-5 of sum |w x| of the double product, exp within 2 ulp of expf over the float range
 * (sampled; its specials exactly), silu and softmax within a few ulp of their expf forms, and the float
 * dot to kernels_order.h's lanes and tree. The thread pool runs every task exactly once, and the process
 * starts on the best family it runs.
 */
#include <stdatomic.h>
#include <stdint.h>

#include "../test.h"
#include "kernel_families.h"
#include "kernels.h"
#include "threadpool.h"
#include "util.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static void fill(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = frand() * scale;
}

/* a random row of k values of `type` in buf; returns buf */
static void *make_row(int type, int64_t k, void *buf) {
    float *tmp = malloc((size_t)k * sizeof(float));
    fill(tmp, k, 2.0f);
    switch (type) {
    case GGUF_TT_F32: memcpy(buf, tmp, (size_t)k * 4); break;
    case GGUF_TT_F16: for (int64_t i = 0; i < k; i++) ((uint16_t *)buf)[i] = cm_f32_to_fp16(tmp[i]); break;
    case GGUF_TT_BF16: for (int64_t i = 0; i < k; i++) ((uint16_t *)buf)[i] = cm_f32_to_bf16(tmp[i]); break;
    case GGUF_TT_Q8_0: cm_quantize_row_q8_0_ref(tmp, buf, k); break;
    }
    free(tmp);
    return buf;
}

static size_t rowb(int type, int64_t k) {
    return type == GGUF_TT_Q8_0 ? (size_t)(k / 32) * 34 : type == GGUF_TT_F32 ? (size_t)k * 4 : (size_t)k * 2;
}

static const int types[] = {GGUF_TT_F32, GGUF_TT_F16, GGUF_TT_BF16, GGUF_TT_Q8_0};
static const int64_t fsizes[] = {1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 129, 896, 1001};
static const int64_t qsizes[] = {32, 64, 96, 160, 896, 4864};

TEST(quantize_q8_0_equals_ref) {
    for (size_t s = 0; s < sizeof qsizes / sizeof *qsizes; s++) {
        int64_t k = qsizes[s];
        float *x = malloc((size_t)k * 4);
        fill(x, k, 3.0f);
        x[0] = 0.0f;
        if (k >= 64) memset(x + 32, 0, 32 * sizeof(float)); /* an all-zero block: d = 0 */
        cm_block_q8_0 *a = malloc((size_t)k / 32 * 34), *b = malloc((size_t)k / 32 * 34);
        cm_quantize_row_q8_0(x, a, k);
        cm_quantize_row_q8_0_ref(x, b, k);
        int same = !memcmp(a, b, (size_t)k / 32 * 34);
        /* and the quantisation is faithful: |x - d q| <= d/2 */
        float *y = malloc((size_t)k * 4);
        cm_dequantize_row_ref(GGUF_TT_Q8_0, a, y, k);
        float worst = 0;
        for (int64_t i = 0; i < k; i++) {
            float d = cm_fp16_to_f32(a[i / 32].d);
            float e = fabsf(x[i] - y[i]) - (0.5f * d + 1e-3f * fabsf(x[i]));
            if (e > worst) worst = e;
        }
        free(x), free(a), free(b), free(y);
        ASSERT_TRUE(same);
        ASSERT_TRUE(worst <= 0.0f);
    }
}

/* Q8_K activations (what K-quant weights meet): the fast quantiser's blocks equal the reference's byte
 * for byte, d, q and bsums, with an all-zero super-block and values at the clamp (the block maximum, and
 * x / d that rounds to exactly 127); and its q are within half a step of x. */
TEST(quantize_q8_k_equals_ref) {
    static const int64_t ks[] = {256, 512, 768, 4864};
    for (size_t s = 0; s < sizeof ks / sizeof *ks; s++) {
        int64_t k = ks[s], nb = k / CM_QK_K;
        float *x = malloc((size_t)k * 4);
        fill(x, k, 3.0f);
        x[1] = 7.5f, x[2] = -7.5f, x[3] = 7.4999f; /* the maximum, its negation and just below */
        if (k >= 512) memset(x + 256, 0, 256 * sizeof(float)); /* an all-zero super-block: d = 0 */
        cm_block_q8_k *a = malloc((size_t)nb * sizeof *a), *b = malloc((size_t)nb * sizeof *b);
        memset(a, 0x55, (size_t)nb * sizeof *a);
        memset(b, 0xAA, (size_t)nb * sizeof *b);
        cm_quantize_row_q8_k(x, a, k);
        cm_quantize_row_q8_k_ref(x, b, k);
        int same = !memcmp(a, b, (size_t)nb * sizeof *a);
        float worst = 0;
        for (int64_t i = 0; i < k; i++) {
            float e = fabsf(x[i] - a[i / CM_QK_K].d * (float)a[i / CM_QK_K].qs[i % CM_QK_K]) -
                      (0.5f * a[i / CM_QK_K].d + 1e-3f * fabsf(x[i]));
            if (e > worst) worst = e;
        }
        int q127 = a[0].qs[1] == 127 && a[0].qs[2] == -127;
        free(x), free(a), free(b);
        ASSERT_TRUE(same);
        ASSERT_TRUE(worst <= 0.0f);
        ASSERT_TRUE(q127);
    }
}

TEST(dequantize_equals_ref) {
    for (size_t t = 0; t < 4; t++) {
        for (size_t s = 0; s < sizeof fsizes / sizeof *fsizes; s++) {
            int64_t k = types[t] == GGUF_TT_Q8_0 ? qsizes[s % 6] : fsizes[s];
            void *w = malloc(rowb(types[t], k) + 64);
            make_row(types[t], k, w);
            float *a = malloc((size_t)k * 4), *b = malloc((size_t)k * 4);
            cm_dequantize_row(types[t], w, a, k);
            cm_dequantize_row_ref(types[t], w, b, k);
            int same = !memcmp(a, b, (size_t)k * 4);
            free(w), free(a), free(b);
            if (!same) TEST_FAIL_("type %d k %lld differs", types[t], (long long)k);
        }
    }
}

/* (weight type, activation type) pairs the kernels support */
static const int pairs[][2] = {{GGUF_TT_F32, GGUF_TT_F32}, {GGUF_TT_F16, GGUF_TT_F32}, {GGUF_TT_BF16, GGUF_TT_F32},
                               {GGUF_TT_Q8_0, GGUF_TT_F32}, {GGUF_TT_Q8_0, GGUF_TT_Q8_0}};

static int same_bits(float a, float b) { return !memcmp(&a, &b, sizeof a); }

/* |ref - double product| <= 1e-5 * sum|w x| + 1e-6: the references are accurate, not only agreed on */
static double dot_tol(int type, int xtype, int64_t k, const void *w, const void *x, double *exact) {
    double s = 0, e = 0;
    float *wf = malloc((size_t)k * 4), *xf = malloc((size_t)k * 4);
    cm_dequantize_row_ref(type, w, wf, k);
    cm_dequantize_row_ref(xtype, x, xf, k);
    for (int64_t i = 0; i < k; i++) s += fabs((double)wf[i] * xf[i]), e += (double)wf[i] * xf[i];
    free(wf), free(xf);
    if (exact) *exact = e;
    return 1e-5 * s + 1e-6;
}

TEST(vec_dot_equals_ref) {
    for (size_t p = 0; p < 5; p++) {
        int type = pairs[p][0], xtype = pairs[p][1];
        int n = type == GGUF_TT_Q8_0 ? 6 : (int)(sizeof fsizes / sizeof *fsizes);
        for (int s = 0; s < n; s++) {
            int64_t k = type == GGUF_TT_Q8_0 ? qsizes[s] : fsizes[s];
            void *w = malloc(rowb(type, k) + 64);
            make_row(type, k, w);
            if (type == GGUF_TT_Q8_0) ((cm_block_q8_0 *)w)[0].qs[3] = -128; /* legal in files */
            float *xf = malloc((size_t)k * 4);
            fill(xf, k, 1.0f);
            void *x = malloc(cm_vec_row_bytes(xtype, k) + 64);
            cm_vec_prepare(xtype, xf, x, k);
            float a = cm_vec_dot(type, xtype, k, w, x), b = cm_vec_dot_ref(type, xtype, k, w, x);
            double exact, tol = dot_tol(type, xtype, k, w, x, &exact);
            free(w), free(x), free(xf);
            if (!same_bits(a, b))
                TEST_FAIL_("type %d/%d k %lld: %.9g vs ref %.9g", type, xtype, (long long)k, a, b);
            if (xtype == GGUF_TT_F32 && !(fabs(b - exact) <= tol))
                TEST_FAIL_("type %d k %lld: ref %.9g vs the double product %.9g", type, (long long)k, b, exact);
        }
    }
}

/* The float dot is kernels_order.h's: value i in lane i % 64, then the halving tree. Written out here
 * once more, so that a change of the definition (which moves every pinned token) cannot pass unnoticed. */
TEST(float_dot_is_the_defined_order) {
    const int64_t ks[] = {1, 63, 64, 65, 200, 1001};
    for (size_t s = 0; s < sizeof ks / sizeof *ks; s++) {
        int64_t k = ks[s];
        float *w = malloc((size_t)k * 4), *x = malloc((size_t)k * 4);
        fill(w, k, 3.0f);
        fill(x, k, 1.0f);
        float lane[64] = {0};
        for (int64_t i = 0; i < k; i++) lane[i % 64] = fmaf(w[i], x[i], lane[i % 64]);
        for (int h = 32; h >= 1; h /= 2)
            for (int l = 0; l < h; l++) lane[l] += lane[l + h];
        float got = cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, k, w, x);
        free(w), free(x);
        if (!same_bits(got, lane[0])) TEST_FAIL_("k %lld: reference %.9g, the definition %.9g", (long long)k, got, lane[0]);
    }
    /* an order sequential sums cannot give: 2^24 + 1 + 0 + 1 is 2^24 summed left to right, 2^24 + 2 here
     * (lanes 1 and 3 meet before lane 0 does) */
    float w4[4] = {1, 1, 1, 1}, x4[4] = {0x1p24f, 1, 0, 1};
    ASSERT_TRUE(same_bits(cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, 4, w4, x4), 0x1p24f + 2));
}

TEST(matvec_threads_equal_ref) {
    const int64_t ms[] = {1, 37, 200};
    const int ns[] = {1, 3};
    for (int nt = 1; nt <= 4; nt++) {
        cm_pool *pool = cm_pool_create(nt, NULL);
        ASSERT_TRUE(pool);
        for (size_t p = 0; p < 5; p++) {
            int type = pairs[p][0], xtype = pairs[p][1];
            int64_t k = type == GGUF_TT_Q8_0 ? 96 : 77;
            for (int mi = 0; mi < 3; mi++) {
                for (int ni = 0; ni < 2; ni++) {
                    int64_t m = ms[mi];
                    int n = ns[ni];
                    size_t rb = rowb(type, k);
                    char *w = malloc((size_t)m * rb + 64);
                    for (int64_t r = 0; r < m; r++) make_row(type, k, w + r * rb);
                    float *xf = malloc((size_t)n * k * 4);
                    fill(xf, n * k, 1.0f);
                    size_t xs = cm_vec_row_bytes(xtype, k);
                    char *x = malloc((size_t)n * xs + 64);
                    for (int j = 0; j < n; j++) cm_vec_prepare(xtype, xf + j * k, x + j * xs, k);
                    float *y = malloc((size_t)n * m * 4), *yr = malloc((size_t)n * m * 4);
                    for (int64_t i = 0; i < n * m; i++) y[i] = yr[i] = NAN;
                    cm_matvec(pool, type, xtype, w, m, k, x, xs, n, y, m);
                    cm_matvec_rows_ref(type, xtype, w, k, x, xs, n, yr, m, 0, m);
                    int same = !memcmp(y, yr, (size_t)n * m * 4);
                    free(w), free(xf), free(x), free(y), free(yr);
                    if (!same) TEST_FAIL_("threads %d type %d/%d m %lld n %d: differs from the reference", nt, type,
                                          xtype, (long long)m, n);
                }
            }
        }
        cm_pool_free(pool);
    }
}

/* |a - b| <= rel |b| + abs_ for every element */
static int close_rel(const float *a, const float *b, int64_t n, float rel, float abs_) {
    for (int64_t i = 0; i < n; i++)
        if (!(fabsf(a[i] - b[i]) <= rel * fabsf(b[i]) + abs_)) {
            fprintf(stderr, "  [%lld] %.9g vs %.9g\n", (long long)i, a[i], b[i]);
            return 0;
        }
    return 1;
}

static int same_row(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!same_bits(a[i], b[i])) {
            fprintf(stderr, "  [%lld] %.9g (%a) vs ref %.9g (%a)\n", (long long)i, a[i], a[i], b[i], b[i]);
            return 0;
        }
    return 1;
}

TEST(elementwise_equal_ref) {
    for (size_t s = 0; s < sizeof fsizes / sizeof *fsizes; s++) {
        int64_t k = fsizes[s];
        float *x = malloc((size_t)k * 4), *w = malloc((size_t)k * 4), *a = malloc((size_t)k * 4),
              *b = malloc((size_t)k * 4), *u = malloc((size_t)k * 4), *m = malloc((size_t)k * 4);
        fill(x, k, 4.0f);
        fill(w, k, 1.0f);
        fill(u, k, 1.0f);
        cm_rmsnorm(a, x, w, k, 1e-6f);
        cm_rmsnorm_ref(b, x, w, k, 1e-6f);
        int ok_norm = same_row(a, b, k);
        double ss = 0;
        for (int64_t i = 0; i < k; i++) ss += (double)x[i] * x[i];
        for (int64_t i = 0; i < k; i++) m[i] = (float)(w[i] * x[i] / sqrt(ss / (double)k + 1e-6));
        ok_norm = ok_norm && close_rel(b, m, k, 1e-6f, 0);
        memcpy(a, x, (size_t)k * 4); /* in place, as forward.c calls it */
        cm_rmsnorm(a, a, w, k, 1e-6f);
        ok_norm = ok_norm && same_row(a, b, k);
        /* silu over a wide range: exercise exp's range reduction */
        for (int64_t i = 0; i < k; i++) a[i] = b[i] = x[i] * 5.0f;
        if (k > 2) a[1] = b[1] = -95.0f, a[2] = b[2] = 90.0f;
        for (int64_t i = 0; i < k; i++) m[i] = a[i] / (1.0f + expf(-a[i])) * u[i];
        cm_silu_mul(a, u, k);
        cm_silu_mul_ref(b, u, k);
        int ok_silu = same_row(a, b, k) && close_rel(b, m, k, 4e-7f, 1e-37f);
        /* softmax over scores with a wide spread (exp(x - max) down to ~1e-45), against the double exp of
         * the same float differences x - max */
        for (int64_t i = 0; i < k; i++) a[i] = b[i] = x[i] * 25.0f;
        float mx = a[0];
        double sum = 0;
        for (int64_t i = 1; i < k; i++) mx = fmaxf(mx, a[i]);
        for (int64_t i = 0; i < k; i++) sum += exp((double)(a[i] - mx));
        for (int64_t i = 0; i < k; i++) m[i] = (float)(exp((double)(a[i] - mx)) / sum);
        cm_softmax(a, k);
        cm_softmax_ref(b, k);
        int ok_soft = same_row(a, b, k) && close_rel(b, m, k, 1e-6f, 1e-44f);
        memcpy(a, x, (size_t)k * 4);
        memcpy(b, x, (size_t)k * 4);
        cm_add(a, w, k);
        cm_add_ref(b, w, k);
        int ok_add = same_row(a, b, k);
        memcpy(a, x, (size_t)k * 4);
        memcpy(b, x, (size_t)k * 4);
        cm_axpy(a, 0.37f, w, k);
        cm_axpy_ref(b, 0.37f, w, k);
        for (int64_t i = 0; i < k; i++) m[i] = fmaf(0.37f, w[i], x[i]);
        int ok_axpy = same_row(a, b, k) && same_row(b, m, k);
        float d = cm_dot_f32(x, w, k), dr = cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, k, x, w);
        free(x), free(w), free(a), free(b), free(u), free(m);
        if (!ok_norm || !ok_silu || !ok_soft || !ok_add || !ok_axpy)
            TEST_FAIL_("k %lld: rmsnorm %d silu %d softmax %d add %d axpy %d", (long long)k, ok_norm, ok_silu,
                       ok_soft, ok_add, ok_axpy);
        if (!same_bits(d, dr)) TEST_FAIL_("k %lld: dot_f32 %.9g vs ref %.9g", (long long)k, d, dr);
    }
}

/* ulps between two finite floats of the same sign, or 0 and a float */
static int64_t ulps(float a, float b) {
    int32_t i, j;
    memcpy(&i, &a, 4);
    memcpy(&j, &b, 4);
    int64_t oi = i < 0 ? (int64_t)INT32_MIN - i : i, oj = j < 0 ? (int64_t)INT32_MIN - j : j;
    return oi > oj ? oi - oj : oj - oi;
}

/* The exp of softmax and silu: every family's bit for bit (NaN: any NaN), within 2 ulp of expf on a
 * sample of every float (bit patterns in steps of 4099; over all 2^32 it is within 1 of glibc's), and
 * exact where it must be. */
TEST(exp_equals_ref_and_expf) {
    enum { B = 4096 };
    static float x[B], a[B], b[B];
    int64_t worst = 0, mism = 0;
    for (uint64_t u = 0; u < (1ull << 32);) {
        int n = 0;
        for (; n < B && u < (1ull << 32); n++, u += 4099) {
            uint32_t v = (uint32_t)u;
            memcpy(&x[n], &v, 4);
        }
        memcpy(a, x, (size_t)n * 4);
        memcpy(b, x, (size_t)n * 4);
        cm_exp_row(a, n);
        cm_exp_row_ref(b, n);
        for (int i = 0; i < n; i++) {
            if (isnan(x[i])) {
                mism += !isnan(a[i]) || !isnan(b[i]);
                continue;
            }
            mism += !same_bits(a[i], b[i]);
            int64_t d = ulps(b[i], expf(x[i]));
            if (d > worst) worst = d;
        }
    }
    ASSERT_EQ_INT(mism, 0);
    ASSERT_TRUE(worst <= 2);
    /* e, the largest finite result and the first overflow, the smallest normal and subnormal results */
    static const float special[][2] = {{0.0f, 1.0f}, {-0.0f, 1.0f}, {1.0f, 0x1.5bf0a8p1f}, {-INFINITY, 0.0f},
                                       {INFINITY, INFINITY}, {-104.0f, 0.0f}, {89.0f, INFINITY},
                                       {0x1.62e42ep6f, 0x1.ffff08p127f}, {0x1.62e430p6f, INFINITY},
                                       {-87.0f, 0x1.666d0ep-126f}, {-103.0f, 0x1p-149f}};
    for (size_t i = 0; i < sizeof special / sizeof *special; i++) {
        float e = special[i][0], r = e;
        cm_exp_row(&e, 1);
        cm_exp_row_ref(&r, 1);
        if (!same_bits(e, special[i][1]) || !same_bits(r, special[i][1]))
            TEST_FAIL_("exp(%a) = %a (ref %a), want %a", special[i][0], e, r, special[i][1]);
    }
    float nan = NAN;
    cm_exp_row(&nan, 1);
    ASSERT_TRUE(isnan(nan));
}

/* The f16 KV kernels: storing rounds exactly as cm_f32_to_fp16 (ties to even, overflow to inf,
 * subnormals), scores and value sums equal their references. */
TEST(f16_kv_rows_equal_ref) {
    for (size_t s = 0; s < sizeof fsizes / sizeof *fsizes; s++) {
        int64_t k = fsizes[s];
        float *x = malloc((size_t)k * 4), *a = malloc((size_t)k * 4), *b = malloc((size_t)k * 4);
        uint16_t *h = malloc((size_t)k * 2), *hr = malloc((size_t)k * 2);
        fill(x, k, 8.0f);
        /* values that exercise the rounding: halfway between two halves, beyond 65504, subnormal */
        static const float edge[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65520.0f, 65519.0f, -70000.0f,
                                     0x1p-25f, 3 * 0x1p-26f, 1e-8f, -0.0f, 2049.0f, INFINITY};
        for (int64_t i = 0; i < k && i < (int64_t)(sizeof edge / sizeof *edge); i++) x[k - 1 - i] = edge[i];
        cm_f32_to_f16_row(x, h, k);
        cm_f32_to_f16_row_ref(x, hr, k);
        if (memcmp(h, hr, (size_t)k * 2) != 0) TEST_FAIL_("k %lld: f32 -> f16 row differs", (long long)k);
        fill(x, k, 4.0f);
        for (int64_t i = 0; i < k; i++) hr[i] = cm_f32_to_fp16(x[i]); /* a K or V row */
        fill(x, k, 1.0f);
        float d = cm_dot_f16(hr, x, k), dr = cm_vec_dot_ref(GGUF_TT_F16, GGUF_TT_F32, k, hr, x);
        if (!same_bits(d, dr)) TEST_FAIL_("k %lld: dot_f16 %.9g vs ref %.9g", (long long)k, d, dr);
        fill(a, k, 1.0f);
        memcpy(b, a, (size_t)k * 4);
        cm_axpy_f16(a, 0.75f, hr, k);
        cm_axpy_f16_ref(b, 0.75f, hr, k);
        int ok = same_row(a, b, k);
        free(x), free(a), free(b), free(h), free(hr);
        if (!ok) TEST_FAIL_("k %lld: axpy_f16 differs from its reference", (long long)k);
    }
}

/* Attention's value sums over a run of V rows (F32 and F16, rows further apart than E as in the KV
 * pool) equal their reference, which is the one-row axpy row after row; run lengths below, at and above
 * 16, head dims with and without a tail of 64. The reference itself is checked against the one-row
 * reference (a test that compared two copies of one wrong loop would pass). */
TEST(att_values_equal_ref) {
    static const int64_t es[] = {64, 128, 80, 24, 7};
    static const int ns[] = {1, 5, 15, 16, 17, 32, 33, 50};
    enum { NMAX = 50, STRIDE = 160 };
    float *p = malloc(NMAX * 4), *rows = malloc((size_t)NMAX * STRIDE * 4);
    float *got = malloc(STRIDE * 4), *want = malloc(STRIDE * 4);
    uint16_t *hrows = malloc((size_t)NMAX * STRIDE * 2);
    for (int type = 0; type < 2; type++) {
        int tt = type ? GGUF_TT_F16 : GGUF_TT_F32;
        for (size_t a = 0; a < sizeof es / sizeof *es; a++)
            for (size_t b = 0; b < sizeof ns / sizeof *ns; b++) {
                int64_t e = es[a];
                int n = ns[b];
                fill(rows, (int64_t)NMAX * STRIDE, 3.0f);
                rows[5] = -0.0f; /* a -0 product: fmaf(w, x, 0) and w * x differ in the sign of zero */
                for (int64_t i = 0; i < (int64_t)NMAX * STRIDE; i++) hrows[i] = cm_f32_to_fp16(rows[i]);
                const void *kr = type ? (const void *)hrows : (const void *)rows;
                size_t rb = (size_t)STRIDE * (type ? 2 : 4);
                fill(p, n, 1.0f);
                fill(got, e, 1.0f);
                memcpy(want, got, (size_t)e * 4);
                float *one = malloc((size_t)e * 4);
                memcpy(one, got, (size_t)e * 4);
                cm_att_values_heads(tt, got, 0, p, 0, 1, kr, rb, n, e);
                cm_att_values_ref(tt, want, p, kr, rb, n, e);
                for (int t = 0; t < n; t++) {
                    if (type) cm_axpy_f16_ref(one, p[t], hrows + (size_t)t * STRIDE, e);
                    else cm_axpy_ref(one, p[t], rows + (size_t)t * STRIDE, e);
                }
                if (!same_row(got, want, e) || !same_row(want, one, e))
                    TEST_FAIL_("%s e %lld n %d: values differ from their reference", type ? "f16" : "f32", (long long)e, n);
                free(one);
            }
    }
    free(p), free(rows), free(got), free(want), free(hrows);
}

/* The scores of several query heads over a transposed K block (F32 and F16 as in the KV pool, element
 * d of key t at d * KS + t; each head's query and scores at their own strides): every head's scores
 * equal the reference's bit for bit, and the reference is within rounding of the exact dot product
 * times the scale (so it reads the right elements); head dims 64 and 128 and others, heads that split
 * into passes evenly and not, key counts below, at and above the 8 and 16 keys a register holds and
 * the 32 of a block. A key of -0 products (signs opposite to head 0's query) scores +0 from s = 0 where
 * a chain begun with the first product would keep -0. Scores around each head's stay put. */
TEST(att_scores_heads_equal_ref) {
    static const int64_t es[] = {64, 128, 80, 7};
    static const int nhs[] = {1, 2, 3, 7, 8, 9, 16};
    static const int ns[] = {1, 3, 7, 8, 9, 15, 16, 17, 21, 31, 32, 33, 50};
    enum { NMAX = 50, KS = 56, EMAX = 128, HMAX = 16, QS = 136, OS = 56 };
    float *q = malloc(HMAX * QS * 4), *kt = malloc((size_t)EMAX * KS * 4);
    float *got = malloc(HMAX * OS * 4), *want = malloc(HMAX * OS * 4);
    uint16_t *hkt = malloc((size_t)EMAX * KS * 2);
    for (int type = 0; type < 2; type++) {
        int tt = type ? GGUF_TT_F16 : GGUF_TT_F32;
        for (size_t a = 0; a < sizeof es / sizeof *es; a++)
            for (size_t c = 0; c < sizeof nhs / sizeof *nhs; c++)
                for (size_t b = 0; b < sizeof ns / sizeof *ns; b++) {
                    int64_t e = es[a];
                    int nh = nhs[c], n = ns[b];
                    fill(kt, (int64_t)EMAX * KS, 3.0f);
                    fill(q, HMAX * QS, 1.0f);
                    for (int64_t d = 0; d < e; d++) kt[d * KS + (n > 3 ? 3 : n - 1)] = q[d] < 0.0f ? 0.0f : -0.0f;
                    for (int64_t i = 0; i < (int64_t)EMAX * KS; i++) {
                        hkt[i] = cm_f32_to_fp16(kt[i]);
                        if (type) kt[i] = cm_fp16_to_f32(hkt[i]); /* the values the f16 block holds */
                    }
                    const void *k = type ? (const void *)hkt : (const void *)kt;
                    fill(got, HMAX * OS, 1.0f);
                    memcpy(want, got, HMAX * OS * 4);
                    cm_att_scores_heads(tt, k, KS, n, q, QS, nh, e, 0.125f, got, OS);
                    cm_att_scores_heads_ref(tt, k, KS, n, q, QS, nh, e, 0.125f, want, OS);
                    int bad = !same_row(got, want, HMAX * OS);
                    for (int h = 0; h < nh && !bad; h++)
                        for (int t = 0; t < n && !bad; t++) {
                            double x = 0, mag = 0;
                            for (int64_t d = 0; d < e; d++) {
                                x += (double)kt[d * KS + t] * q[h * QS + d];
                                mag += fabs((double)kt[d * KS + t] * q[h * QS + d]);
                            }
                            bad = fabs(want[h * OS + t] - 0.125 * x) > 0.125 * mag * 1e-5;
                        }
                    if (!bad && !same_bits(want[(n > 3 ? 3 : n - 1)], 0.0f)) bad = 1;
                    if (bad)
                        TEST_FAIL_("%s e %lld heads %d n %d: scores differ from their reference", type ? "f16" : "f32",
                                   (long long)e, nh, n);
                }
    }
    free(q), free(kt), free(got), free(want), free(hkt);
}

/* The value sums of several query heads over the same V rows (F32 and F16 rows as in the KV pool, each
 * head's y and probabilities at their own strides): every head's y equals its reference, which is the
 * one-row axpy reference row after row; group sizes that split into passes of at most four unevenly
 * (7) and evenly (8), head dims with and without a tail of 64. The values around each y stay put. */
TEST(att_values_heads_equal_ref) {
    static const int64_t es[] = {64, 128, 80, 7};
    static const int nhs[] = {1, 2, 7, 8};
    static const int ns[] = {1, 17, 32};
    enum { NMAX = 32, STRIDE = 160, HMAX = 8, YS = 144, PS = 40 };
    float *p = malloc(HMAX * PS * 4), *rows = malloc((size_t)NMAX * STRIDE * 4);
    float *got = malloc(HMAX * YS * 4), *want = malloc(HMAX * YS * 4), *one = malloc(HMAX * YS * 4);
    uint16_t *hrows = malloc((size_t)NMAX * STRIDE * 2);
    for (int type = 0; type < 2; type++) {
        int tt = type ? GGUF_TT_F16 : GGUF_TT_F32;
        for (size_t a = 0; a < sizeof es / sizeof *es; a++)
            for (size_t c = 0; c < sizeof nhs / sizeof *nhs; c++)
                for (size_t b = 0; b < sizeof ns / sizeof *ns; b++) {
                    int64_t e = es[a];
                    int nh = nhs[c], n = ns[b];
                    fill(rows, (int64_t)NMAX * STRIDE, 3.0f);
                    for (int64_t i = 0; i < (int64_t)NMAX * STRIDE; i++) hrows[i] = cm_f32_to_fp16(rows[i]);
                    const void *vr = type ? (const void *)hrows : (const void *)rows;
                    size_t rb = (size_t)STRIDE * (type ? 2 : 4);
                    fill(p, HMAX * PS, 1.0f);
                    fill(got, HMAX * YS, 1.0f);
                    memcpy(want, got, HMAX * YS * 4);
                    memcpy(one, got, HMAX * YS * 4);
                    cm_att_values_heads(tt, got, YS, p, PS, nh, vr, rb, n, e);
                    cm_att_values_heads_ref(tt, want, YS, p, PS, nh, vr, rb, n, e);
                    for (int h = 0; h < nh; h++)
                        for (int t = 0; t < n; t++) {
                            if (type) cm_axpy_f16_ref(one + h * YS, p[h * PS + t], hrows + (size_t)t * STRIDE, e);
                            else cm_axpy_ref(one + h * YS, p[h * PS + t], rows + (size_t)t * STRIDE, e);
                        }
                    if (!same_row(got, want, HMAX * YS) || !same_row(want, one, HMAX * YS))
                        TEST_FAIL_("%s e %lld heads %d n %d: values differ from their reference", type ? "f16" : "f32",
                                   (long long)e, nh, n);
                }
    }
    free(p), free(rows), free(got), free(want), free(one), free(hrows);
}

TEST(rope_equals_ref) {
    const int es[] = {2, 6, 32, 64, 128};
    for (int neox = 0; neox <= 1; neox++) {
        for (int s = 0; s < 5; s++) {
            int e = es[s];
            float x[128] = {0}, a[128], b[128], cs[64], sn[64];
            fill(x, e, 1.0f);
            for (int i = 0; i < e / 2; i++) {
                double ang = 7.0 * pow(10000.0, -2.0 * i / e);
                cs[i] = (float)cos(ang);
                sn[i] = (float)sin(ang);
            }
            memcpy(a, x, sizeof x);
            memcpy(b, x, sizeof x);
            cm_rope(a, cs, sn, e, neox);
            cm_rope_ref(b, cs, sn, e, neox);
            ASSERT_TRUE(!memcmp(a, b, (size_t)e * 4));
            /* a rotation keeps each pair's norm */
            double n0 = 0, n1 = 0;
            for (int i = 0; i < e; i++) n0 += (double)x[i] * x[i], n1 += (double)a[i] * a[i];
            ASSERT_NEAR(n0, n1, 1e-5 * n0);
        }
    }
    /* neox rotates (i, i+E/2): a unit vector on lane 0 with angle pi/2 moves to lane E/2 */
    float x[8] = {1, 0, 0, 0, 0, 0, 0, 0}, cs[4] = {0, 1, 1, 1}, sn[4] = {1, 0, 0, 0};
    cm_rope(x, cs, sn, 8, 1);
    ASSERT_NEAR(x[4], 1.0, 1e-7);
    float y[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    cm_rope(y, cs, sn, 8, 0);
    ASSERT_NEAR(y[1], 1.0, 1e-7);
}

/* ------------------------------------------------------------ thread pool */

typedef struct count_ctx {
    atomic_int *hits;
    atomic_int bad_thread;
    int n_threads;
} count_ctx;

static void count_task(void *arg, int task, int thread) {
    count_ctx *c = arg;
    atomic_fetch_add(&c->hits[task], 1);
    if (thread < 0 || thread >= c->n_threads) atomic_store(&c->bad_thread, 1);
}

TEST(pool_runs_every_task_once) {
    for (int nt = 1; nt <= 4; nt++) {
        cm_pool *p = cm_pool_create(nt, NULL);
        ASSERT_TRUE(p);
        ASSERT_EQ_INT(cm_pool_size(p), nt);
        atomic_int hits[97];
        count_ctx c = {hits, 0, nt};
        for (int i = 0; i < 97; i++) atomic_init(&hits[i], 0);
        int runs = 500;
        for (int r = 0; r < runs; r++) cm_pool_run(p, count_task, &c, 1 + r % 97);
        /* task i ran once in every run with n_tasks > i */
        for (int i = 0; i < 97; i++) {
            int want = 0;
            for (int r = 0; r < runs; r++) want += i < 1 + r % 97;
            if (atomic_load(&hits[i]) != want) TEST_FAIL_("threads %d task %d: %d runs, want %d", nt, i,
                                                          atomic_load(&hits[i]), want);
        }
        ASSERT_EQ_INT(atomic_load(&c.bad_thread), 0);
        cm_pool_run(p, count_task, &c, 0); /* no-op */
        cm_pool_free(p);
    }
    ASSERT_TRUE(cm_pool_create(0, NULL) == NULL);
    cm_pool_free(NULL);
}

/* Without CODEMOE_ISA (the test environment sets none) the process starts on the best family it runs;
 * a name the build lacks changes nothing. */
TEST(best_family_chosen_at_start) {
    ASSERT_TRUE(getenv("CODEMOE_ISA") == NULL);
    int best = -1;
    for (int i = 0; i < cm_kernels_family_count() && best < 0; i++)
        if (cm_kernels_family_runs(i)) best = i;
    ASSERT_TRUE(best >= 0);
    ASSERT_STREQ(cm_kernels_isa(), cm_kernels_family_name(best));
    ASSERT_EQ_INT(cm_kernels_use("no-such-family"), -1);
    ASSERT_STREQ(cm_kernels_isa(), cm_kernels_family_name(best));
    ASSERT_TRUE(cm_kernels_family_name(cm_kernels_family_count()) == NULL);
}

/* Greedy's argmax, every family: the fast scan gives the reference's index on random rows of every
 * length past two of its widest steps (4 vectors of 16) and their tails, with the maximum placed
 * anywhere, repeated (the lowest index), beside NaNs, among signed zeros, and on rows with nothing above
 * -inf (index 0). */
TEST(argmax_equals_ref) {
    static float x[151936];
    for (int64_t k = 1; k <= 140; k++) {
        for (int trial = 0; trial < 40; trial++) {
            fill(x, k, 1.0f);
            int64_t a = (int64_t)((rng >> 33) % (uint64_t)k), b = (int64_t)((rng >> 13) % (uint64_t)k);
            switch (trial % 8) {
            case 1: x[a] = 5.0f; x[b] = 5.0f; break;                    /* a tie */
            case 2: x[a] = NAN; break;                                  /* a NaN beside */
            case 3: for (int64_t i = 0; i < k; i++) x[i] = NAN; break;  /* all NaN: 0 */
            case 4: for (int64_t i = 0; i < k; i++) x[i] = -INFINITY; x[a] = NAN; break;
            case 5: for (int64_t i = 0; i < k; i++) x[i] = i % 2 ? 0.0f : -0.0f; break; /* 0 and -0 tie */
            case 6: x[a] = INFINITY; x[b] = NAN; break;
            case 7: x[0] = NAN; x[a] = 3.0f; break;
            }
            int64_t want = cm_argmax_ref(x, k);
            if (cm_argmax(x, k) != want)
                TEST_FAIL_("argmax k=%lld trial %d: %lld, reference %lld", (long long)k, trial, (long long)cm_argmax(x, k),
                     (long long)want);
            if (trial % 8 == 1) ASSERT_EQ_INT((int)want, (int)(a < b ? a : b));
        }
    }
    fill(x, 151936, 8.0f); /* a vocabulary row, the maximum late */
    x[151900] = 9.0f;
    ASSERT_EQ_INT((int)cm_argmax(x, 151936), 151900);
    ASSERT_EQ_INT((int)cm_argmax_ref(x, 151936), 151900);
}

static void kernel_tests(void) {
    RUN(quantize_q8_0_equals_ref);
    RUN(quantize_q8_k_equals_ref);
    RUN(dequantize_equals_ref);
    RUN(vec_dot_equals_ref);
    RUN(matvec_threads_equal_ref);
    RUN(elementwise_equal_ref);
    RUN(exp_equals_ref_and_expf);
    RUN(f16_kv_rows_equal_ref);
    RUN(att_values_equal_ref);
    RUN(att_scores_heads_equal_ref);
    RUN(att_values_heads_equal_ref);
    RUN(rope_equals_ref);
    RUN(argmax_equals_ref);
}

int main(void) {
    RUN(best_family_chosen_at_start);
    RUN(float_dot_is_the_defined_order);
    test_each_family(kernel_tests);
    RUN(pool_runs_every_task_once);
    return test_summary();
}
