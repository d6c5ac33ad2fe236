/*
 * test_kernels.c - every optimised kernel equals its plain reference on random data, at sizes that are
 * and are not multiples of the SIMD width (where the type allows), and the threaded matvec equals the
 * reference with 1..4 threads; all of it for every kernel family this CPU runs. Tolerances: exact for
 * conversions and quantisation; 1e-5 relative to sum |w x| for dot products (only summation order
 * differs); 4 ulp-ish (2e-6 relative) for exp-based kernels; the thread pool runs every task exactly
 * once, and the process starts on the best family it runs.
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
static const int64_t fsizes[] = {1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 896, 1001};
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

/* |opt - ref| <= 1e-5 * sum|w x| + 1e-6: the only difference is summation order */
static double dot_tol(int type, int xtype, int64_t k, const void *w, const void *x) {
    double s = 0;
    float *wf = malloc((size_t)k * 4), *xf = malloc((size_t)k * 4);
    cm_dequantize_row_ref(type, w, wf, k);
    cm_dequantize_row_ref(xtype, x, xf, k);
    for (int64_t i = 0; i < k; i++) s += fabs((double)wf[i] * xf[i]);
    free(wf), free(xf);
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
            double a = cm_vec_dot(type, xtype, k, w, x), b = cm_vec_dot_ref(type, xtype, k, w, x);
            double tol = dot_tol(type, xtype, k, w, x);
            /* Q8_0 x f32 equals the dot with the dequantised row, to rounding */
            double exact = 0;
            if (type == GGUF_TT_Q8_0 && xtype == GGUF_TT_F32) {
                float *wf = malloc((size_t)k * 4);
                cm_dequantize_row_ref(type, w, wf, k);
                for (int64_t i = 0; i < k; i++) exact += (double)wf[i] * xf[i];
                free(wf);
            }
            free(w), free(x), free(xf);
            if (!(fabs(a - b) <= tol))
                TEST_FAIL_("type %d/%d k %lld: %.9g vs ref %.9g (tol %g)", type, xtype, (long long)k, a, b, tol);
            if (type == GGUF_TT_Q8_0 && xtype == GGUF_TT_F32 && !(fabs(a - exact) <= tol))
                TEST_FAIL_("q8_0 x f32 k %lld: %.9g vs dequantised %.9g", (long long)k, a, exact);
        }
    }
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
                    int bad = -1;
                    for (int j = 0; j < n && bad < 0; j++)
                        for (int64_t r = 0; r < m; r++) {
                            double tol = dot_tol(type, xtype, k, w + r * rb, x + j * xs);
                            if (!(fabs((double)y[j * m + r] - yr[j * m + r]) <= tol)) { bad = (int)r; break; }
                        }
                    free(w), free(xf), free(x), free(y), free(yr);
                    if (bad >= 0) TEST_FAIL_("threads %d type %d/%d m %lld n %d: row %d differs", nt, type,
                                             xtype, (long long)m, n, bad);
                }
            }
        }
        cm_pool_free(pool);
    }
}

static int close_rel(const float *a, const float *b, int64_t n, float rel, float abs_) {
    for (int64_t i = 0; i < n; i++)
        if (!(fabsf(a[i] - b[i]) <= rel * fabsf(b[i]) + abs_)) {
            fprintf(stderr, "  [%lld] %.9g vs ref %.9g\n", (long long)i, a[i], b[i]);
            return 0;
        }
    return 1;
}

TEST(elementwise_equal_ref) {
    for (size_t s = 0; s < sizeof fsizes / sizeof *fsizes; s++) {
        int64_t k = fsizes[s];
        float *x = malloc((size_t)k * 4), *w = malloc((size_t)k * 4), *a = malloc((size_t)k * 4),
              *b = malloc((size_t)k * 4), *u = malloc((size_t)k * 4);
        fill(x, k, 4.0f);
        fill(w, k, 1.0f);
        fill(u, k, 1.0f);
        cm_rmsnorm(a, x, w, k, 1e-6f);
        cm_rmsnorm_ref(b, x, w, k, 1e-6f);
        int ok_norm = close_rel(a, b, k, 1e-6f, 0);
        /* silu over a wide range: exercise exp's range reduction */
        for (int64_t i = 0; i < k; i++) a[i] = b[i] = x[i] * 5.0f;
        if (k > 2) a[1] = b[1] = -95.0f, a[2] = b[2] = 90.0f;
        cm_silu_mul(a, u, k);
        cm_silu_mul_ref(b, u, k);
        int ok_silu = close_rel(a, b, k, 2e-6f, 1e-30f);
        memcpy(a, x, (size_t)k * 4);
        memcpy(b, x, (size_t)k * 4);
        cm_softmax(a, k);
        cm_softmax_ref(b, k);
        int ok_soft = close_rel(a, b, k, 2e-6f, 1e-30f);
        memcpy(a, x, (size_t)k * 4);
        memcpy(b, x, (size_t)k * 4);
        cm_add(a, w, k);
        cm_add_ref(b, w, k);
        int ok_add = !memcmp(a, b, (size_t)k * 4);
        memcpy(a, x, (size_t)k * 4);
        for (int64_t i = 0; i < k; i++) b[i] = x[i] + 0.5f * w[i];
        cm_axpy(a, 0.5f, w, k);
        int ok_axpy = close_rel(a, b, k, 1e-6f, 1e-7f);
        double d = cm_dot_f32(x, w, k), dr = cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, k, x, w);
        free(x), free(w), free(a), free(b), free(u);
        if (!ok_norm || !ok_silu || !ok_soft || !ok_add || !ok_axpy)
            TEST_FAIL_("k %lld: rmsnorm %d silu %d softmax %d add %d axpy %d", (long long)k, ok_norm, ok_silu,
                       ok_soft, ok_add, ok_axpy);
        ASSERT_NEAR(d, dr, 1e-5 * 4 * (double)k);
    }
}

/* The f16 KV kernels: storing rounds exactly as cm_f32_to_fp16 (ties to even, overflow to inf,
 * subnormals), scores and value sums match their references. */
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
        double d = cm_dot_f16(hr, x, k), dr = cm_vec_dot_ref(GGUF_TT_F16, GGUF_TT_F32, k, hr, x);
        ASSERT_NEAR(d, dr, 1e-5 * (double)k);
        fill(a, k, 1.0f);
        memcpy(b, a, (size_t)k * 4);
        cm_axpy_f16(a, 0.75f, hr, k);
        cm_axpy_f16_ref(b, 0.75f, hr, k);
        int ok = close_rel(a, b, k, 1e-6f, 1e-7f);
        free(x), free(a), free(b), free(h), free(hr);
        if (!ok) TEST_FAIL_("k %lld: axpy_f16 differs from its reference", (long long)k);
    }
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

static void kernel_tests(void) {
    RUN(quantize_q8_0_equals_ref);
    RUN(dequantize_equals_ref);
    RUN(vec_dot_equals_ref);
    RUN(matvec_threads_equal_ref);
    RUN(elementwise_equal_ref);
    RUN(f16_kv_rows_equal_ref);
    RUN(rope_equals_ref);
}

int main(void) {
    RUN(best_family_chosen_at_start);
    test_each_family(kernel_tests);
    RUN(pool_runs_every_task_once);
    return test_summary();
}
