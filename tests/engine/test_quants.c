/*
 * test_quants.c - the block formats of engine/quants.c.
 *
 * (0) The block structs, the GGUF type table and the activation row sizes agree.
 * (1) The reference dequantisers match tests/fixtures/golden/quants.gguf bit for bit: rows quantised and
 *     dequantised by tools/gguf.py, an independent implementation written from the format description.
 * (2) Every fast kernel, of every kernel family this CPU runs, equals its reference bit for bit:
 *     dequantisation, the int8 dot products (weights, Q8_0 included, x Q8_0 / Q8_1 / Q8_K activations)
 *     and the f32 dot (kernels_order.h's lanes), which is also within 1e-5 of sum |w x| of the double
 *     product. Blocks are random bytes (every bit pattern of quants and packed scales) with scales
 *     set to random, extreme (65504, the largest half) or tiny (subnormal) values, plus all-zero blocks;
 *     row lengths are multiples of the block but not of the f32 path's 1024-value chunk.
 * (3) The matvec gives every row exactly what cm_vec_dot gives it, whatever the number of activation
 *     rows (a token's logits do not depend on its batch), and exactly what the reference matvec gives.
 * (4) The activation quantisers: |q| <= 127, bsums and s are what they claim, error <= d/2.
 * (5) The int8 prefill GEMM (gemm_q8.c), for Q8_0 and every block type, gives every (row, token) the
 *     reference dot bit for bit, whatever the number of tokens (odd, below and above its 4-token quad),
 *     the rows asked for (odd counts, starting off its 8- and 16-row groups, one row, tiles of one to
 *     four 16-row groups, more than one 64-row tile), the row length (one block, a few, and tens of
 *     them) and the output stride; and at the extremes of its integer sums (every weight at the end
 *     of its range against int8 rows of all +127 or all -127), where an int16 partial sum held one
 *     step too long would wrap. Its K-quant row unpacker equals the reference unpacker byte for byte.
 *     The same matrices packed once (cm_gemm_q_pack) give the same bits, from the pack's groups and,
 *     where a call starts off them or runs under another family, from the matrix.
 */
#include <math.h>
#include <stdint.h>

#include "../test.h"
#include "gguf.h"
#include "kernel_families.h"
#include "kernels.h"
#include "quants.h"
#include "util.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint32_t urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static float frand(void) { return (float)(urand() >> 8) * (1.0f / 8388608.0f) - 1.0f; } /* [-1, 1) */

static const int qtypes[] = {GGUF_TT_Q4_0, GGUF_TT_Q4_1, GGUF_TT_Q5_0, GGUF_TT_Q5_1, GGUF_TT_Q2_K,
                             GGUF_TT_Q3_K, GGUF_TT_Q4_K, GGUF_TT_Q5_K, GGUF_TT_Q6_K};
#define N_QTYPES (int)(sizeof qtypes / sizeof qtypes[0])
/* The types whose kernels (2) and (3) check: the block types and Q8_0, whose int8 dot shares their
 * accumulation (cm_qacc). */
static const int ktypes[] = {GGUF_TT_Q8_0, GGUF_TT_Q4_0, GGUF_TT_Q4_1, GGUF_TT_Q5_0, GGUF_TT_Q5_1,
                             GGUF_TT_Q2_K, GGUF_TT_Q3_K, GGUF_TT_Q4_K, GGUF_TT_Q5_K, GGUF_TT_Q6_K};
#define N_KTYPES (int)(sizeof ktypes / sizeof ktypes[0])

/* Byte offsets of the fp16 scales in a block of each type (d, and dmin / m where the type has one). */
static void scale_offsets(int type, int *od, int *om) {
    *om = -1;
    switch (type) {
    case GGUF_TT_Q4_1: case GGUF_TT_Q5_1: case GGUF_TT_Q4_K: case GGUF_TT_Q5_K: *od = 0; *om = 2; break;
    case GGUF_TT_Q2_K: *od = 80; *om = 82; break;
    case GGUF_TT_Q3_K: *od = 108; break;
    case GGUF_TT_Q6_K: *od = 208; break;
    default: *od = 0; break;
    }
}

static uint16_t random_scale(int mode) {
    switch (mode) {
    case 1: return 0x7bff;                       /* 65504 */
    case 2: return (uint16_t)(1 + urand() % 1023); /* subnormal */
    default: return cm_f32_to_fp16(frand() * 0.05f);
    }
}

/* nb random blocks of `type` in buf (bb bytes each). Block 1 (when there is one) is all zero; the scale
 * mode cycles per row so every row sees normal, extreme and tiny scales. */
static void random_blocks(int type, uint8_t *buf, int64_t nb, int row) {
    size_t bb = (size_t)gguf_row_bytes(type, gguf_block_size(type));
    int od, om;
    scale_offsets(type, &od, &om);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = buf + (size_t)b * bb;
        for (size_t i = 0; i < bb; i++) p[i] = (uint8_t)urand();
        int mode = (int)((b + row) % 5 == 3 ? 1 : (b + row) % 5 == 4 ? 2 : 0);
        uint16_t d = random_scale(mode), m = random_scale(mode);
        memcpy(p + od, &d, 2);
        if (om >= 0) memcpy(p + om, &m, 2);
        if (b == 1) memset(p, 0, bb);
    }
}

static void random_acts(float *x, int64_t k, int row) {
    for (int64_t i = 0; i < k; i++) x[i] = frand() * (row % 3 == 2 ? 1000.0f : 1.0f);
    if (k >= 64) memset(x + 32, 0, 32 * sizeof(float)); /* an all-zero activation block: d = 0 */
    x[0] = row % 2 ? -8.0f : 0.0f;
}

static int same_bits(float a, float b) {
    return !memcmp(&a, &b, sizeof a);
}

/* NaNs (from 65504 scales times large activations) compare equal whatever their payload. */
static int same_or_nan(float a, float b) {
    return same_bits(a, b) || (isnan(a) && isnan(b));
}

static int64_t ksizes_for(int type, int64_t *ks) {
    if (gguf_block_size(type) == 32) {
        static const int64_t l[] = {32, 64, 96, 160, 288, 896, 4864};
        memcpy(ks, l, sizeof l);
        return 7;
    }
    static const int64_t kq[] = {256, 512, 768, 1280, 4864 - 4864 % 256};
    memcpy(ks, kq, sizeof kq);
    return 5;
}

/* The block structs and the GGUF reader's type table agree on every size. */
TEST(block_sizes_match_gguf_table) {
    static const struct { int type; size_t bytes; } sz[] = {
        {GGUF_TT_Q4_0, sizeof(cm_block_q4_0)}, {GGUF_TT_Q4_1, sizeof(cm_block_q4_1)},
        {GGUF_TT_Q5_0, sizeof(cm_block_q5_0)}, {GGUF_TT_Q5_1, sizeof(cm_block_q5_1)},
        {GGUF_TT_Q8_0, sizeof(cm_block_q8_0)}, {GGUF_TT_Q2_K, sizeof(cm_block_q2_k)},
        {GGUF_TT_Q3_K, sizeof(cm_block_q3_k)}, {GGUF_TT_Q4_K, sizeof(cm_block_q4_k)},
        {GGUF_TT_Q5_K, sizeof(cm_block_q5_k)}, {GGUF_TT_Q6_K, sizeof(cm_block_q6_k)},
    };
    for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) {
        int bs = gguf_block_size(sz[i].type);
        ASSERT_EQ_INT(bs, sz[i].type == GGUF_TT_Q4_0 || sz[i].type == GGUF_TT_Q4_1 || sz[i].type == GGUF_TT_Q5_0 ||
                                  sz[i].type == GGUF_TT_Q5_1 || sz[i].type == GGUF_TT_Q8_0 ? 32 : 256);
        ASSERT_EQ_INT((int)gguf_row_bytes(sz[i].type, bs), (int)sz[i].bytes);
        ASSERT_EQ_INT(cm_weight_type_ok(sz[i].type), 1);
    }
    ASSERT_EQ_INT(cm_vec_row_bytes(GGUF_TT_Q8_1, 64), 2 * sizeof(cm_block_q8_1));
    ASSERT_EQ_INT(cm_vec_row_bytes(GGUF_TT_Q8_K, 512), 2 * sizeof(cm_block_q8_k));
    ASSERT_EQ_INT(cm_weight_type_ok(GGUF_TT_Q8_K), 0); /* activation formats are no weight types */
    ASSERT_EQ_INT(cm_weight_type_ok(16), 0);
}

TEST(dequantize_matches_python_golden) {
    gguf_file g;
    cm_err err = {0};
    ASSERT_EQ_INT(gguf_open(&g, test_fixture("golden/quants.gguf"), &err), CM_OK);
    int checked = 0;
    for (int t = 0; t < N_QTYPES; t++) {
        char name[64];
        snprintf(name, sizeof name, "%s", gguf_ttype_name(qtypes[t]));
        const gguf_tensor *q = gguf_find_tensor(&g, name);
        snprintf(name, sizeof name, "%s.f32", gguf_ttype_name(qtypes[t]));
        const gguf_tensor *f = gguf_find_tensor(&g, name);
        if (!q || !f) { TEST_FAIL_("golden lacks %s", gguf_ttype_name(qtypes[t])); continue; }
        ASSERT_TRUE(q->type == qtypes[t] && f->type == GGUF_TT_F32);
        ASSERT_TRUE(q->ne[0] == f->ne[0] && q->ne[1] == f->ne[1]);
        int64_t k = q->ne[0], rows = q->ne[1];
        size_t rb = (size_t)gguf_row_bytes(q->type, k);
        float *y = malloc((size_t)k * sizeof(float)), *z = malloc((size_t)k * sizeof(float));
        for (int64_t r = 0; r < rows; r++) {
            const float *want = (const float *)f->data + r * k;
            cm_quant_dequantize_ref(q->type, (const char *)q->data + (size_t)r * rb, y, k);
            cm_dequantize_row(q->type, (const char *)q->data + (size_t)r * rb, z, k);
            for (int64_t i = 0; i < k; i++)
                if (!same_bits(y[i], want[i]) || !same_bits(z[i], want[i])) {
                    TEST_FAIL_("%s row %lld value %lld: ref %.9g fast %.9g, python %.9g", gguf_ttype_name(q->type),
                               (long long)r, (long long)i, y[i], z[i], want[i]);
                    break;
                }
        }
        free(y);
        free(z);
        checked++;
    }
    ASSERT_EQ_INT(checked, N_QTYPES);
    gguf_close(&g);
}

TEST(fast_kernels_equal_ref) {
    for (int t = 0; t < N_KTYPES; t++) {
        int type = ktypes[t], xt = cm_quant_vec_dot_type(type);
        int64_t ks[8];
        int nk = (int)ksizes_for(type, ks);
        for (int s = 0; s < nk; s++) {
            int64_t k = ks[s], nb = k / gguf_block_size(type);
            for (int row = 0; row < 6; row++) {
                uint8_t *w = malloc((size_t)gguf_row_bytes(type, k));
                float *x = malloc((size_t)k * 4), *y0 = malloc((size_t)k * 4), *y1 = malloc((size_t)k * 4);
                void *xq = malloc(cm_vec_row_bytes(xt, k));
                random_blocks(type, w, nb, row);
                random_acts(x, k, row);
                cm_vec_prepare(xt, x, xq, k);

                cm_dequantize_row_ref(type, w, y0, k);
                cm_dequantize_row(type, w, y1, k);
                if (memcmp(y0, y1, (size_t)k * 4))
                    TEST_FAIL_("%s k=%lld row %d: dequantise differs", gguf_ttype_name(type), (long long)k, row);

                float a = cm_vec_dot(type, xt, k, w, xq), b = cm_vec_dot_ref(type, xt, k, w, xq);
                if (!same_bits(a, b))
                    TEST_FAIL_("%s x %s k=%lld row %d: %.9g vs ref %.9g", gguf_ttype_name(type), gguf_ttype_name(xt),
                               (long long)k, row, a, b);

                float c = cm_vec_dot(type, GGUF_TT_F32, k, w, x), e = cm_vec_dot_ref(type, GGUF_TT_F32, k, w, x);
                double mag = 0, exact = 0;
                for (int64_t i = 0; i < k; i++) mag += fabs((double)y0[i] * x[i]), exact += (double)y0[i] * x[i];
                if (!same_or_nan(c, e))
                    TEST_FAIL_("%s x F32 k=%lld row %d: %.9g vs ref %.9g", gguf_ttype_name(type), (long long)k, row, c, e);
                if (!(fabs((double)e - exact) <= 1e-5 * mag + 1e-30) && isfinite(mag))
                    TEST_FAIL_("%s x F32 k=%lld row %d: ref %.9g vs the double product %.9g (sum|wx| %g)",
                               gguf_ttype_name(type), (long long)k, row, e, exact, mag);
                free(w); free(x); free(y0); free(y1); free(xq);
            }
        }
    }
}

/* The int8 GEMM's K-quant row unpacker: q, d, dmin and the per-16 scales and mins, every byte as the
 * reference (cm_quant_unpack_k block by block) gives them, for rows of random blocks (every bit pattern of
 * quants and packed scales, all-zero blocks, extreme and subnormal scales). */
TEST(unpack_k_row_equals_ref) {
    static const int kq[] = {GGUF_TT_Q2_K, GGUF_TT_Q3_K, GGUF_TT_Q4_K, GGUF_TT_Q5_K, GGUF_TT_Q6_K};
    enum { NB = 7 };
    for (size_t t = 0; t < sizeof kq / sizeof kq[0]; t++)
        for (int row = 0; row < 5; row++) {
            int type = kq[t];
            uint8_t *w = malloc((size_t)gguf_row_bytes(type, NB * CM_QK_K));
            int8_t q0[NB * CM_QK_K], q1[NB * CM_QK_K];
            float d0[NB], d1[NB], m0[NB], m1[NB];
            int16_t s0[NB * 16], s1[NB * 16], n0[NB * 16], n1[NB * 16];
            random_blocks(type, w, NB, row);
            memset(q1, 0x55, sizeof q1), memset(d1, 0x55, sizeof d1), memset(m1, 0x55, sizeof m1);
            memset(s1, 0x55, sizeof s1), memset(n1, 0x55, sizeof n1);
            cm_quant_unpack_k_row_ref(type, w, NB, q0, d0, m0, s0, n0);
            cm_quant_unpack_k_row(type, w, NB, q1, d1, m1, s1, n1);
            if (memcmp(q0, q1, sizeof q0) || memcmp(d0, d1, sizeof d0) || memcmp(m0, m1, sizeof m0) ||
                memcmp(s0, s1, sizeof s0) || memcmp(n0, n1, sizeof n0))
                TEST_FAIL_("%s row %d: the row unpacker differs from the reference", gguf_ttype_name(type), row);
            free(w);
        }
}

/* The int8 dot against the f32 product of the dequantised rows: they differ only by x's quantisation. */
TEST(int8_dot_tracks_exact_product) {
    for (int t = 0; t < N_KTYPES; t++) {
        int type = ktypes[t], xt = cm_quant_vec_dot_type(type);
        int64_t k = 1024, nb = k / gguf_block_size(type);
        uint8_t *w = malloc((size_t)gguf_row_bytes(type, k));
        float *x = malloc((size_t)k * 4), *y = malloc((size_t)k * 4);
        void *xq = malloc(cm_vec_row_bytes(xt, k));
        for (int64_t b = 0; b < nb; b++) random_blocks(type, w + (size_t)b * gguf_row_bytes(type, gguf_block_size(type)), 1, 0);
        for (int64_t i = 0; i < k; i++) x[i] = frand();
        cm_vec_prepare(xt, x, xq, k);
        cm_dequantize_row_ref(type, w, y, k);
        double exact = 0, mag = 0;
        for (int64_t i = 0; i < k; i++) { exact += (double)y[i] * x[i]; mag += fabs((double)y[i] * x[i]); }
        double got = cm_vec_dot(type, xt, k, w, xq);
        /* x's error is <= d/2 = max|x|/254 per value, plus the fp16 rounding of d (and s) */
        double ymag = 0;
        for (int64_t i = 0; i < k; i++) ymag += fabs((double)y[i]);
        if (!(fabs(got - exact) <= ymag / 254.0 * 1.01 + 2e-3 * (mag + ymag)))
            TEST_FAIL_("%s: int8 dot %.6g, exact %.6g (sum|w| %g)", gguf_ttype_name(type), got, exact, ymag);
        free(w); free(x); free(y); free(xq);
    }
}

TEST(matvec_rows_equal_vec_dot_and_ref) {
    for (int t = 0; t < N_KTYPES; t++) {
        int type = ktypes[t];
        int64_t k = gguf_block_size(type) == 32 ? 352 : 768, m = 37;
        size_t rb = (size_t)gguf_row_bytes(type, k);
        uint8_t *w = malloc(rb * (size_t)m);
        for (int64_t r = 0; r < m; r++) random_blocks(type, w + (size_t)r * rb, k / gguf_block_size(type), (int)r);
        for (int xi = 0; xi < 2; xi++) {
            int xt = xi ? cm_quant_vec_dot_type(type) : GGUF_TT_F32;
            size_t xb = cm_vec_row_bytes(xt, k);
            for (int n = 1; n <= 19; n += 6) {
                float *x = malloc((size_t)(n * k) * 4);
                uint8_t *xv = malloc(xb * (size_t)n);
                for (int j = 0; j < n; j++) {
                    random_acts(x + j * k, k, j);
                    cm_vec_prepare(xt, x + j * k, xv + (size_t)j * xb, k);
                }
                float *y = malloc((size_t)(n * m) * 4), *yr = malloc((size_t)(n * m) * 4);
                cm_matvec_rows(type, xt, w, k, xv, xb, n, y, m, 0, m);
                cm_matvec_rows_ref(type, xt, w, k, xv, xb, n, yr, m, 0, m);
                for (int64_t r = 0; r < m; r++) {
                    for (int j = 0; j < n; j++) {
                        float one = cm_vec_dot(type, xt, k, w + (size_t)r * rb, xv + (size_t)j * xb);
                        float got = y[j * m + r], want = yr[j * m + r];
                        if (!same_bits(got, one))
                            TEST_FAIL_("%s x %s n=%d: row %lld token %d: matvec %.9g, vec_dot %.9g",
                                       gguf_ttype_name(type), gguf_ttype_name(xt), n, (long long)r, j, got, one);
                        else if (!same_bits(got, want))
                            TEST_FAIL_("%s x %s n=%d: row %lld token %d: matvec %.9g, ref %.9g",
                                       gguf_ttype_name(type), gguf_ttype_name(xt), n, (long long)r, j, got, want);
                    }
                }
                free(x); free(xv); free(y); free(yr);
            }
        }
        free(w);
    }
}


TEST(gemm_q_equals_ref) {
    int types[N_QTYPES + 1];
    types[0] = GGUF_TT_Q8_0;
    memcpy(types + 1, qtypes, sizeof qtypes);
    for (int t = 0; t < 3 * (N_QTYPES + 1); t++) {
        /* each type three times: K of a few blocks, a longer K (legacy types: 35 blocks; K-quants: 5
         * super-blocks), and K of one block */
        int type = types[t / 3], xt = cm_quant_vec_dot_type(type), bs = gguf_block_size(type);
        int64_t k = t % 3 == 2 ? bs : bs == 32 ? (t % 3 ? 1120 : 96) : (t % 3 ? 1280 : 768), m = 83, ldy = m + 3;
        size_t rb = (size_t)gguf_row_bytes(type, k), xb = cm_vec_row_bytes(xt, k);
        int nmax = 67; /* enough token quads that the least scratch cannot hold them all at the longer K */
        uint8_t *w = malloc(rb * (size_t)m), *xv = malloc(xb * (size_t)nmax);
        float *x = malloc((size_t)k * 4), *yr = malloc((size_t)(nmax * ldy) * 4), *y = malloc((size_t)(nmax * ldy) * 4);
        /* the least scratch (the activations' sums prepared per tile), and room for them all (per call) */
        size_t sb = cm_gemm_q_scratch_bytes(k), sb_all = sb + (size_t)nmax * ((size_t)k + 1024);
        void *scratch = malloc(sb_all);
        for (int64_t r = 0; r < m; r++) random_blocks(type, w + (size_t)r * rb, k / gguf_block_size(type), (int)r);
        for (int j = 0; j < nmax; j++) {
            random_acts(x, k, j);
            cm_vec_prepare(xt, x, xv + (size_t)j * xb, k);
        }
        cm_matvec_rows_ref(type, xt, w, k, xv, xb, nmax, yr, ldy, 0, m);
        /* the matrix packed once (every family but the scalar one packs): the same products from its
         * groups (rows from a multiple of 16) and, off them, from the matrix itself */
        cm_gemm_pack *pk = cm_gemm_q_pack(type, w, k, m, 0);
        CHECK_TRUE((pk != NULL) == (strcmp(cm_kernels_isa(), "scalar") != 0));
        CHECK_TRUE(!pk || cm_gemm_pack_bytes(pk) >= (size_t)(k * m));
        if (pk) { /* a bound below its size refuses it; its size admits it */
            cm_gemm_pack *over = cm_gemm_q_pack(type, w, k, m, cm_gemm_pack_bytes(pk) - 1);
            cm_gemm_pack *fits = cm_gemm_q_pack(type, w, k, m, cm_gemm_pack_bytes(pk));
            CHECK_TRUE(over == NULL && fits != NULL);
            cm_gemm_pack_free(over);
            cm_gemm_pack_free(fits);
        }
        static const int ns[] = {1, 2, 3, 4, 5, 8, 16, 19, 67};
        static const int64_t ranges[][2] = {{0, 83}, {3, 4}, {5, 22}, {17, 83}, {64, 83}, {16, 48}, {1, 41}};
        for (size_t a = 0; a < 3 * sizeof ns / sizeof ns[0]; a++)
            for (size_t b = 0; b < sizeof ranges / sizeof ranges[0]; b++) {
                int n = ns[a / 3], packed = a % 3 == 2;
                size_t bytes = a % 3 == 1 ? sb_all : sb;
                int64_t r0 = ranges[b][0], r1 = ranges[b][1];
                if (packed && !pk) continue;
                for (int i = 0; i < nmax * ldy; i++) y[i] = -12345.0f;
                if (packed) cm_gemm_q_packed(pk, xv, xb, n, y, ldy, r0, r1, scratch, bytes);
                else cm_gemm_q(type, w, k, xv, xb, n, y, ldy, r0, r1, scratch, bytes);
                int bad = 0;
                for (int j = 0; j < nmax && !bad; j++)
                    for (int64_t r = 0; r < ldy && !bad; r++) {
                        float got = y[j * ldy + r], want = j < n && r >= r0 && r < r1 ? yr[j * ldy + r] : -12345.0f;
                        if (!same_or_nan(got, want)) {
                            TEST_FAIL_("%s%s n=%d rows [%lld, %lld) scratch %zu: row %lld token %d: gemm %.9g, ref %.9g",
                                       gguf_ttype_name(type), packed ? " packed" : "", n, (long long)r0, (long long)r1,
                                       bytes, (long long)r, j, got, want);
                            bad = 1;
                        }
                    }
            }
        if (pk) { /* under another family (the table changed since it was packed): the matrix itself */
            const char *fam = cm_kernels_isa();
            CHECK_TRUE(cm_kernels_use("scalar") == 0);
            for (int i = 0; i < nmax * ldy; i++) y[i] = -12345.0f;
            cm_gemm_q_packed(pk, xv, xb, 5, y, ldy, 0, m, scratch, sb);
            for (int j = 0; j < 5; j++)
                for (int64_t r = 0; r < m; r++)
                    if (!same_or_nan(y[j * ldy + r], yr[j * ldy + r])) {
                        TEST_FAIL_("%s packed under %s, row %lld token %d", gguf_ttype_name(type), fam, (long long)r, j);
                        r = m, j = 5;
                    }
            CHECK_TRUE(cm_kernels_use(fam) == 0);
        }
        cm_gemm_pack_free(pk);
        free(w); free(xv); free(x); free(yr); free(y); free(scratch);
    }
}

/* The integer sums at their extremes: every weight value at the top or the bottom of its range (all
 * quant bits set or clear, non-zero scales) against activation blocks of all +127 and all -127 (the
 * ends of the quantisers' range, (4)), where the int16 pair sums the GEMM adds up before widening are
 * largest. A kernel that adds one step too many in int16, or lets maddubs saturate, wraps here. The
 * decode rows (cm_matvec_rows, four rows a pass and one) are held to the same. */
TEST(gemm_q_extremes) {
    static const int8_t vals[] = {127, -127};
    const int nv = 2, m = 2 * 8, n = 3 * nv; /* rows: all bits clear, all set, 8 of each; tokens: each value 3 times */
    for (int t = 0; t < N_KTYPES; t++) {
        int type = ktypes[t], xt = cm_quant_vec_dot_type(type);
        int64_t k = 2 * (int64_t)gguf_block_size(type) * (gguf_block_size(type) == 32 ? 4 : 1);
        size_t rb = (size_t)gguf_row_bytes(type, k), xb = cm_vec_row_bytes(xt, k);
        size_t bb = (size_t)gguf_row_bytes(type, gguf_block_size(type));
        int64_t nb = k / gguf_block_size(type);
        uint8_t *w = malloc(rb * (size_t)m), *xv = malloc(xb * (size_t)n);
        float *yr = malloc((size_t)(n * m) * 4), *y = malloc((size_t)(n * m) * 4);
        void *scratch = malloc(cm_gemm_q_scratch_bytes(k));
        for (int r = 0; r < m; r++)
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *p = w + (size_t)r * rb + (size_t)b * bb;
                memset(p, r < m / 2 ? 0x00 : 0xFF, bb);
                /* scales and mins non-zero (all ones; the signed scales of Q3_K and Q6_K at their most
                 * negative, -32 and -128, in the odd rows), then d (and dmin / m) 1.0 */
                switch (type) {
                case GGUF_TT_Q2_K: memset(((cm_block_q2_k *)p)->scales, 0xFF, 16); break;
                case GGUF_TT_Q3_K: memset(((cm_block_q3_k *)p)->scales, r % 2 ? 0x00 : 0xFF, 12); break;
                case GGUF_TT_Q4_K: memset(((cm_block_q4_k *)p)->scales, 0xFF, 12); break;
                case GGUF_TT_Q5_K: memset(((cm_block_q5_k *)p)->scales, 0xFF, 12); break;
                case GGUF_TT_Q6_K: memset(((cm_block_q6_k *)p)->scales, r % 2 ? 0x80 : 0x7F, 16); break;
                case GGUF_TT_Q8_0: memset(p, r < m / 2 ? 0x80 : 0x7F, bb); break; /* q = -128, 127 */
                default: break;
                }
                int od, om;
                scale_offsets(type, &od, &om);
                uint16_t one = 0x3c00;
                memcpy(p + od, &one, 2);
                if (om >= 0) memcpy(p + om, &one, 2);
            }
        for (int j = 0; j < n; j++) {
            int8_t v = vals[j % nv];
            char *xr = (char *)xv + (size_t)j * xb;
            for (int64_t b = 0; b < k / (xt == GGUF_TT_Q8_K ? CM_QK_K : 32); b++) {
                if (xt == GGUF_TT_Q8_K) {
                    cm_block_q8_k *q = (cm_block_q8_k *)xr + b;
                    q->d = 1.0f / 127.0f;
                    memset(q->qs, (uint8_t)v, CM_QK_K);
                    for (int i = 0; i < CM_QK_K / 16; i++) q->bsums[i] = (int16_t)(16 * v);
                } else if (xt == GGUF_TT_Q8_1) {
                    cm_block_q8_1 *q = (cm_block_q8_1 *)xr + b;
                    q->d = cm_f32_to_fp16(1.0f / 127.0f);
                    q->s = cm_f32_to_fp16(32.0f * (float)v / 127.0f);
                    memset(q->qs, (uint8_t)v, 32);
                } else {
                    cm_block_q8_0 *q = (cm_block_q8_0 *)xr + b;
                    q->d = cm_f32_to_fp16(1.0f / 127.0f);
                    memset(q->qs, (uint8_t)v, 32);
                }
            }
        }
        cm_matvec_rows_ref(type, xt, w, k, xv, xb, n, yr, m, 0, m);
        /* the GEMM, then the decode rows (four rows a pass, and one: rows [0, 3) and [13, 16)) */
        for (int path = 0; path < 3; path++) {
            for (int i = 0; i < n * m; i++) y[i] = -12345.0f;
            if (path == 0) cm_gemm_q(type, w, k, xv, xb, n, y, m, 0, m, scratch, cm_gemm_q_scratch_bytes(k));
            else if (path == 1) cm_matvec_rows(type, xt, w, k, xv, xb, n, y, m, 0, m);
            else cm_matvec_rows(type, xt, w, k, xv, xb, n, y, m, 0, 3), cm_matvec_rows(type, xt, w, k, xv, xb, n, y, m, 13, m);
            int bad = 0;
            for (int j = 0; j < n && !bad; j++)
                for (int r = 0; r < m && !bad; r++) {
                    if (path == 2 && r >= 3 && r < 13) continue;
                    if (!same_bits(y[j * m + r], yr[j * m + r])) {
                        TEST_FAIL_("%s: row %d (bits %s) x all %d: %s %.9g, ref %.9g", gguf_ttype_name(type), r,
                                   r < m / 2 ? "clear" : "set", vals[j % nv], path ? "matvec rows" : "gemm",
                                   y[j * m + r], yr[j * m + r]);
                        bad = 1;
                    }
                }
        }
        free(w); free(xv); free(yr); free(y); free(scratch);
    }
}

TEST(activation_quantisers) {
    int64_t k = 768;
    float *x = malloc((size_t)k * 4);
    cm_block_q8_1 *q1 = malloc((size_t)k / 32 * sizeof *q1);
    cm_block_q8_k *qk = malloc((size_t)k / 256 * sizeof *qk);
    for (int round = 0; round < 3; round++) {
        random_acts(x, k, round);
        if (round == 2) for (int64_t i = 0; i < 256; i++) x[i] = 0.0f; /* a zero super-block */
        cm_quantize_row_q8_1_ref(x, q1, k);
        cm_quantize_row_q8_k_ref(x, qk, k);
        for (int64_t b = 0; b < k / 32; b++) {
            float d = cm_fp16_to_f32(q1[b].d);
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                sum += q1[b].qs[i];
                ASSERT_TRUE(q1[b].qs[i] >= -127 && q1[b].qs[i] <= 127);
                /* d is stored as fp16: q was made with the unrounded d (off by <= 127 * 2^-11 d) */
                ASSERT_TRUE(fabsf(x[b * 32 + i] - d * q1[b].qs[i]) <= d * 0.57f + 1e-30f);
            }
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
            ASSERT_TRUE(q1[b].s == cm_f32_to_fp16(amax / 127.0f * (float)sum)); /* s from the unrounded d */
        }
        for (int64_t b = 0; b < k / 256; b++) {
            for (int j = 0; j < 16; j++) {
                int sum = 0;
                for (int i = 0; i < 16; i++) {
                    int v = qk[b].qs[16 * j + i];
                    sum += v;
                    ASSERT_TRUE(v >= -127 && v <= 127);
                    ASSERT_TRUE(fabsf(x[b * 256 + 16 * j + i] - qk[b].d * (float)v) <= qk[b].d * 0.502f + 1e-30f);
                }
                ASSERT_EQ_INT(qk[b].bsums[j], sum);
            }
        }
    }
    ASSERT_TRUE(qk[0].d == 0.0f); /* the zero super-block of the last round */
    free(x); free(q1); free(qk);
}

static void family_tests(void) {
    RUN(fast_kernels_equal_ref);
    RUN(int8_dot_tracks_exact_product);
    RUN(matvec_rows_equal_vec_dot_and_ref);
    RUN(unpack_k_row_equals_ref);
    RUN(gemm_q_equals_ref);
    RUN(gemm_q_extremes);
}

int main(void) {
    RUN(block_sizes_match_gguf_table);
    RUN(dequantize_matches_python_golden);
    test_each_family(family_tests);
    RUN(activation_quantisers);
    return test_summary();
}
