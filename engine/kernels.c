/*
 * kernels.c - the plain reference of every numeric kernel (see kernels.h), the parts that have no SIMD
 * twin, and the run-time choice of the kernel family whose fast versions the cm_* entry points call.
 *
 * The fast kernels live in kernels_simd.c, quants_simd.c and gemm_q8.c, compiled once per family
 * (kernels_family.h); the float references follow the operation order of kernels_order.h, which every
 * family follows too, so a family changes speed, never a result.
 * At startup the best family this CPU runs is chosen (cpuid), or the one CODEMOE_ISA names when the CPU
 * runs it; from then on each fast entry point is one indirect call through that family's table.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_family.h"
#include "kernels_order.h"
#include "threadpool.h"
#include "util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

int cm_weight_type_ok(int type) {
    return type == GGUF_TT_F32 || type == GGUF_TT_F16 || type == GGUF_TT_BF16 || type == GGUF_TT_Q8_0 ||
           cm_quant_is_block_type(type);
}

/* ============================================================ Q8_0 quantisation */

void cm_quantize_row_q8_0_ref(const float *x, cm_block_q8_0 *y, int64_t k) {
    for (int64_t b = 0; b < k / CM_QK8_0; b++) {
        const float *xb = x + b * CM_QK8_0;
        float amax = 0.0f;
        for (int i = 0; i < CM_QK8_0; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = cm_f32_to_fp16(d);
        for (int i = 0; i < CM_QK8_0; i++) y[b].qs[i] = (int8_t)nearbyintf(xb[i] * id);
    }
}

/* ============================================================ dequantisation */

void cm_dequantize_row_ref(int type, const void *w, float *y, int64_t k) {
    switch (type) {
    case GGUF_TT_F32:
        memcpy(y, w, (size_t)k * sizeof(float));
        break;
    case GGUF_TT_F16: {
        const uint16_t *h = w;
        for (int64_t i = 0; i < k; i++) y[i] = cm_fp16_to_f32(h[i]);
        break;
    }
    case GGUF_TT_BF16: {
        const uint16_t *h = w;
        for (int64_t i = 0; i < k; i++) y[i] = cm_bf16_to_f32(h[i]);
        break;
    }
    case GGUF_TT_Q8_0: {
        const cm_block_q8_0 *b = w;
        for (int64_t j = 0; j < k / CM_QK8_0; j++) {
            float d = cm_fp16_to_f32(b[j].d);
            for (int i = 0; i < CM_QK8_0; i++) y[j * CM_QK8_0 + i] = d * (float)b[j].qs[i];
        }
        break;
    }
    default:
        if (cm_quant_is_block_type(type))
            cm_quant_dequantize_ref(type, w, y, k);
        else
            memset(y, 0, (size_t)k * sizeof(float)); /* unreachable: the loader admits only weight types */
    }
}

size_t cm_vec_row_bytes(int xtype, int64_t k) {
    switch (xtype) {
    case GGUF_TT_Q8_0: return (size_t)(k / CM_QK8_0) * sizeof(cm_block_q8_0);
    case GGUF_TT_Q8_1: return (size_t)(k / 32) * sizeof(cm_block_q8_1);
    case GGUF_TT_Q8_K: return (size_t)(k / CM_QK_K) * sizeof(cm_block_q8_k);
    default: return (size_t)k * sizeof(float);
    }
}

void cm_vec_prepare(int xtype, const float *x, void *out, int64_t k) {
    if (xtype == GGUF_TT_Q8_0)
        cm_quantize_row_q8_0(x, out, k);
    else if (xtype == GGUF_TT_Q8_1)
        cm_quantize_row_q8_1_ref(x, out, k);
    else if (xtype == GGUF_TT_Q8_K)
        cm_quantize_row_q8_k(x, out, k);
    else if (out != (const void *)x)
        memcpy(out, x, (size_t)k * sizeof(float));
}

/* ============================================================ dot products */

float cm_vec_dot_ref(int wtype, int xtype, int64_t k, const void *w, const void *x) {
    if (cm_quant_is_block_type(wtype))
        return xtype == GGUF_TT_F32 ? cm_quant_dot_f32_ref(wtype, k, w, x) : cm_quant_dot_q_ref(wtype, k, w, x);
    if (wtype == GGUF_TT_Q8_0 && xtype != GGUF_TT_F32) return cm_quant_dot_q_ref(wtype, k, w, x); /* the int8 dot */
    if (wtype != GGUF_TT_F32 && wtype != GGUF_TT_F16 && wtype != GGUF_TT_BF16 && wtype != GGUF_TT_Q8_0) return 0.0f;
    /* the float dot of kernels_order.h: the dequantised row times x, value i in lane i % 64 */
    const float *xf = x;
    float acc[CM_LANES] = {0};
    for (int64_t i = 0; i < k; i++) acc[i % CM_LANES] = fmaf(cm_weight_f32(wtype, w, i), xf[i], acc[i % CM_LANES]);
    return cm_lanes_total(acc);
}

/* ============================================================ matrix x vectors */

void cm_matvec_rows_ref(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride,
                        int n, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    size_t rb = (size_t)gguf_row_bytes(wtype, k);
    for (int64_t r = r0; r < r1; r++)
        for (int j = 0; j < n; j++)
            y[j * ldy + r] = cm_vec_dot_ref(wtype, xtype, k, (const char *)w + (size_t)r * rb,
                                            (const char *)x + (size_t)j * x_stride);
}

typedef struct matvec_job {
    int wtype, xtype;
    const void *w;
    int64_t m, k, chunk;
    const void *x;
    size_t x_stride;
    int n;
    float *y;
    int64_t ldy;
} matvec_job;

static void matvec_task(void *arg, int task, int thread) {
    (void)thread;
    const matvec_job *j = arg;
    int64_t r0 = (int64_t)task * j->chunk, r1 = r0 + j->chunk;
    if (r1 > j->m) r1 = j->m;
    cm_matvec_rows(j->wtype, j->xtype, j->w, j->k, j->x, j->x_stride, j->n, j->y, j->ldy, r0, r1);
}

void cm_matvec(cm_pool *pool, int wtype, int xtype, const void *w, int64_t m, int64_t k, const void *x,
               size_t x_stride, int n, float *y, int64_t ldy) {
    int nt = cm_pool_size(pool);
    /* Several tasks per thread so a preempted thread's share is picked up by the others; rows in
     * multiples of 16 keep tasks off each other's output cache lines. */
    int64_t chunk = nt == 1 ? m : (m + nt * 4 - 1) / (nt * 4);
    chunk = (chunk + 15) & ~(int64_t)15;
    if (chunk < 16) chunk = 16;
    matvec_job j = {wtype, xtype, w, m, k, chunk, x, x_stride, n, y, ldy};
    cm_pool_run(pool, matvec_task, &j, (int)((m + chunk - 1) / chunk));
}

/* ============================================================ element-wise */

/* The definitions of kernels_order.h. */
void cm_rmsnorm_ref(float *y, const float *x, const float *w, int64_t k, float eps) {
    float ss = cm_lanes_dot(x, x, k);
    float s = 1.0f / sqrtf(ss / (float)k + eps);
    for (int64_t i = 0; i < k; i++) y[i] = w[i] * (x[i] * s);
}

void cm_add_ref(float *x, const float *b, int64_t k) {
    for (int64_t i = 0; i < k; i++) x[i] += b[i];
}

void cm_axpy_ref(float *y, float a, const float *x, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = fmaf(a, x[i], y[i]);
}

void cm_f32_to_f16_row_ref(const float *x, uint16_t *y, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = cm_f32_to_fp16(x[i]);
}

void cm_axpy_f16_ref(float *y, float a, const uint16_t *x, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = fmaf(a, cm_fp16_to_f32(x[i]), y[i]);
}

void cm_att_scores_heads_ref(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t q_stride,
                             int nh, int64_t e, float scale, float *out, size_t out_stride) {
    for (int h = 0; h < nh; h++)
        for (int t = 0; t < n; t++) {
            float s = 0.0f;
            for (int64_t d = 0; d < e; d++) {
                size_t i = (size_t)d * kt_stride + (size_t)t;
                float k = type == GGUF_TT_F16 ? cm_fp16_to_f32(((const uint16_t *)kt)[i]) : ((const float *)kt)[i];
                s = fmaf(k, q[(size_t)h * q_stride + (size_t)d], s);
            }
            out[(size_t)h * out_stride + (size_t)t] = s * scale;
        }
}

void cm_att_values_ref(int type, float *y, const float *p, const void *v, size_t row_bytes, int n, int64_t e) {
    for (int t = 0; t < n; t++) {
        const void *r = (const char *)v + (size_t)t * row_bytes;
        if (type == GGUF_TT_F16) cm_axpy_f16_ref(y, p[t], r, e);
        else cm_axpy_ref(y, p[t], r, e);
    }
}

void cm_att_values_heads_ref(int type, float *y, size_t y_stride, const float *p, size_t p_stride, int nh,
                             const void *v, size_t row_bytes, int n, int64_t e) {
    for (int h = 0; h < nh; h++)
        cm_att_values_ref(type, y + (size_t)h * y_stride, p + (size_t)h * p_stride, v, row_bytes, n, e);
}

void cm_silu_mul_ref(float *g, const float *u, int64_t k) {
    for (int64_t i = 0; i < k; i++) g[i] = (g[i] / (1.0f + cm_exp_def(-g[i]))) * u[i];
}

int64_t cm_argmax_ref(const float *x, int64_t k) {
    int64_t b = 0;
    float bv = isnan(x[0]) ? -INFINITY : x[0];
    for (int64_t i = 1; i < k; i++)
        if (x[i] > bv) bv = x[b = i];
    return b;
}

void cm_softmax_ref(float *x, int64_t k) {
    float mx = x[0];
    for (int64_t i = 1; i < k; i++) mx = fmaxf(mx, x[i]);
    float acc[CM_LANES] = {0};
    for (int64_t i = 0; i < k; i++) {
        x[i] = cm_exp_def(x[i] - mx);
        acc[i % CM_LANES] += x[i];
    }
    float sum = cm_lanes_total(acc);
    for (int64_t i = 0; i < k; i++) x[i] /= sum;
}

void cm_exp_row_ref(float *x, int64_t k) {
    for (int64_t i = 0; i < k; i++) x[i] = cm_exp_def(x[i]);
}

void cm_rope_ref(float *x, const float *cs, const float *sn, int e, int neox) {
    int h = e / 2;
    for (int i = 0; i < h; i++) {
        int i0 = neox ? i : 2 * i, i1 = neox ? i + h : 2 * i + 1;
        float x0 = x[i0], x1 = x[i1];
        x[i0] = x0 * cs[i] - x1 * sn[i];
        x[i1] = x1 * cs[i] + x0 * sn[i];
    }
}

/* ============================================================ kernel families */

/* The families this build compiled (engine/meson.build defines CM_HAVE_KERNELS_<suffix>), best first;
 * the last one runs on any CPU the build targets. */
extern const cm_kernel_ops cm_kernels_avx512vnni, cm_kernels_avx512, cm_kernels_avx2, cm_kernels_scalar,
    cm_kernels_native;
static const cm_kernel_ops *const families[] = {
#if defined(CM_HAVE_KERNELS_avx512vnni)
    &cm_kernels_avx512vnni,
#endif
#if defined(CM_HAVE_KERNELS_avx512)
    &cm_kernels_avx512,
#endif
#if defined(CM_HAVE_KERNELS_avx2)
    &cm_kernels_avx2,
#endif
#if defined(CM_HAVE_KERNELS_native)
    &cm_kernels_native,
#endif
#if defined(CM_HAVE_KERNELS_scalar)
    &cm_kernels_scalar,
#endif
};
#define N_FAMILIES ((int)(sizeof families / sizeof families[0]))

/* Until kernels_choose runs: the family every CPU the build targets runs (the last of the list). */
#if defined(CM_HAVE_KERNELS_scalar)
const cm_kernel_ops *cm__kops = &cm_kernels_scalar;
#else
const cm_kernel_ops *cm__kops = &cm_kernels_native;
#endif

/* CM_CPU_* bits of this CPU; a vector extension counts only when the OS saves its registers (XCR0). */
static unsigned cpu_features(void) {
    unsigned f = 0;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    int ymm = (xlo & 0x6) == 0x6, zmm = ymm && (xlo & 0xe0) == 0xe0;
    if (!ymm || !(c & bit_AVX)) return 0;
    if (c & bit_FMA) f |= CM_CPU_FMA;
    if (c & bit_F16C) f |= CM_CPU_F16C;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    if (b & bit_AVX2) f |= CM_CPU_AVX2;
    if (zmm) {
        if (b & bit_AVX512F) f |= CM_CPU_AVX512F;
        if (b & bit_AVX512BW) f |= CM_CPU_AVX512BW;
        if (b & bit_AVX512VL) f |= CM_CPU_AVX512VL;
        if (b & bit_AVX512DQ) f |= CM_CPU_AVX512DQ;
        if (c & (1u << 11)) f |= CM_CPU_AVX512VNNI; /* cpuid.h of older compilers lacks bit_AVX512VNNI */
    }
#endif
    return f;
}

static int family_runs(const cm_kernel_ops *k) {
    static unsigned have;
    static int known;
    if (!known) {
        have = cpu_features();
        known = 1;
    }
    return (k->needs & ~have) == 0;
}

int cm_kernels_family_count(void) { return N_FAMILIES; }

const char *cm_kernels_family_name(int i) { return i >= 0 && i < N_FAMILIES ? families[i]->name : NULL; }

int cm_kernels_family_runs(int i) { return i >= 0 && i < N_FAMILIES && family_runs(families[i]); }

int cm_kernels_use(const char *name) {
    for (int i = 0; i < N_FAMILIES; i++)
        if (name && !strcmp(families[i]->name, name) && family_runs(families[i])) {
            cm__kops = families[i];
            return 0;
        }
    return -1;
}

const char *cm_kernels_isa(void) { return cm__kops->name; }

/* Before main: the best family the CPU runs, unless CODEMOE_ISA names another one it runs. Done once,
 * so no kernel call pays for the choice. */
__attribute__((constructor)) static void kernels_choose(void) {
    const char *want = getenv("CODEMOE_ISA");
    if (want && *want && cm_kernels_use(want) == 0) return;
    for (int i = 0; i < N_FAMILIES; i++)
        if (family_runs(families[i])) {
            cm__kops = families[i];
            return;
        }
}

/* ------------------------------------------------------------ the fast entry points */

void cm_quantize_row_q8_0(const float *x, cm_block_q8_0 *y, int64_t k) { cm__kops->quantize_row_q8_0(x, y, k); }

void cm_dequantize_row(int type, const void *w, float *y, int64_t k) { cm__kops->dequantize_row(type, w, y, k); }

float cm_vec_dot(int wtype, int xtype, int64_t k, const void *w, const void *x) {
    return cm__kops->vec_dot(wtype, xtype, k, w, x);
}

void cm_matvec_rows(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                    float *y, int64_t ldy, int64_t r0, int64_t r1) {
    cm__kops->matvec_rows(wtype, xtype, w, k, x, x_stride, n, y, ldy, r0, r1);
}

size_t cm_gemm_q_scratch_bytes(int64_t k) { return cm__kops->gemm_q_scratch_bytes(k); }

int cm_gemm_q_min_rows(int wtype) { return cm__kops->gemm_q_min_rows(wtype); }

cm_gemm_pack *cm_gemm_q_pack(int wtype, const void *w, int64_t k, int64_t m, size_t max_bytes) {
    return cm__kops->gemm_q_pack(wtype, w, k, m, max_bytes);
}

size_t cm_gemm_pack_bytes(const cm_gemm_pack *pk) { return pk ? pk->bytes : 0; }

void cm_gemm_pack_free(cm_gemm_pack *pk) {
    if (!pk) return;
    cm_big_free(pk->impl, pk->mapped);
    free(pk);
}

void cm_gemm_q_packed(const cm_gemm_pack *pk, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
                      int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes) {
    cm__kops->gemm_q_packed(pk, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes);
}

void cm_gemm_q(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
               int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes) {
    cm__kops->gemm_q(wtype, w, k, x, x_stride, n, y, ldy, r0, r1, scratch, scratch_bytes);
}

void cm_quantize_row_q8_k(const float *x, cm_block_q8_k *y, int64_t k) { cm__kops->quantize_row_q8_k(x, y, k); }

void cm_rmsnorm(float *y, const float *x, const float *w, int64_t k, float eps) { cm__kops->rmsnorm(y, x, w, k, eps); }

void cm_add(float *x, const float *b, int64_t k) { cm__kops->add(x, b, k); }

void cm_silu_mul(float *g, const float *u, int64_t k) { cm__kops->silu_mul(g, u, k); }

void cm_softmax(float *x, int64_t k) { cm__kops->softmax(x, k); }

void cm_exp_row(float *x, int64_t k) { cm__kops->exp_row(x, k); }
int64_t cm_argmax(const float *x, int64_t k) { return cm__kops->argmax(x, k); }

void cm_rope(float *x, const float *cs, const float *sn, int e, int neox) { cm__kops->rope(x, cs, sn, e, neox); }

float cm_dot_f32(const float *a, const float *b, int64_t k) { return cm__kops->dot_f32(a, b, k); }

void cm_axpy(float *y, float a, const float *x, int64_t k) { cm__kops->axpy(y, a, x, k); }

void cm_f32_to_f16_row(const float *x, uint16_t *y, int64_t k) { cm__kops->f32_to_f16_row(x, y, k); }

float cm_dot_f16(const uint16_t *a, const float *b, int64_t k) { return cm__kops->dot_f16(a, b, k); }

void cm_axpy_f16(float *y, float a, const uint16_t *x, int64_t k) { cm__kops->axpy_f16(y, a, x, k); }

void cm_att_scores_heads(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t q_stride, int nh,
                         int64_t e, float scale, float *out, size_t out_stride) {
    cm__kops->att_scores_heads(type, kt, kt_stride, n, q, q_stride, nh, e, scale, out, out_stride);
}

void cm_att_values_heads(int type, float *y, size_t y_stride, const float *p, size_t p_stride, int nh, const void *v,
                         size_t row_bytes, int n, int64_t e) {
    cm__kops->att_values_heads(type, y, y_stride, p, p_stride, nh, v, row_bytes, n, e);
}
