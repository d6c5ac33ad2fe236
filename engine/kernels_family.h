/*
 * kernels_family.h - one SIMD family of the fast kernels, and the table through which kernels.c calls
 * it. Internal to engine/.
 *
 * kernels_simd.c, quants_simd.c and gemm_q8.c are compiled once per family, each time with that family's
 * compiler flags and CM_FAMILY set to a suffix (engine/meson.build); each build exports one table,
 * cm_kernels_<suffix>. The ISA paths a build contains follow from the compiler's own macros (__AVX2__,
 * __AVX512F__, ...), so the same sources give the scalar, AVX2 and AVX-512 tables of the portable build,
 * or the single table `-Dnative=true` (-march=native) allows. A table names itself and the CPU features
 * it needs from those same macros, so what it runs on and what it was compiled for cannot disagree.
 *
 * kernels.c picks one table at startup (the best one the CPU runs, or CODEMOE_ISA's choice) and the
 * fast entry points of kernels.h and quants.h call through it: one indirect call per kernel call,
 * never per element. The references are not in the table: they are plain C in kernels.c and quants.c.
 */
#ifndef CM_KERNELS_FAMILY_H
#define CM_KERNELS_FAMILY_H

#include <stddef.h>
#include <stdint.h>
#include "quants.h"

/* CPU features a family may need (cm_kernel_ops.needs); kernels.c detects them with cpuid. */
enum {
    CM_CPU_AVX2 = 1 << 0,
    CM_CPU_FMA = 1 << 1,
    CM_CPU_F16C = 1 << 2,
    CM_CPU_AVX512F = 1 << 3,
    CM_CPU_AVX512BW = 1 << 4,
    CM_CPU_AVX512VL = 1 << 5,
    CM_CPU_AVX512DQ = 1 << 6,
    CM_CPU_AVX512VNNI = 1 << 7,
};

/* A weight matrix repacked for one family's int8 GEMM (cm_gemm_q_pack): which family (its table), the
 * original matrix (what another family, or a window off the pack's groups, computes from), and the
 * family's own part (gemm_q8.c), one allocation. */
typedef struct cm_gemm_pack cm_gemm_pack; /* also kernels.h's (C11 allows the repeat) */
struct cm_gemm_pack {
    const struct cm_kernel_ops *family;
    int wtype;
    const void *w;
    int64_t k, m;
    size_t bytes;  /* of impl */
    size_t mapped; /* cm_big_alloc's mapping of impl, 0: from the allocator */
    void *impl;
};

/* Each entry has the contract of the kernels.h / quants.h function of the same name. */
typedef struct cm_kernel_ops {
    const char *name; /* "avx512vnni", "avx512", "avx2" or "scalar" */
    unsigned needs;   /* CM_CPU_* bits the code was compiled to use */
    void (*quantize_row_q8_0)(const float *x, cm_block_q8_0 *y, int64_t k);
    void (*quantize_row_q8_k)(const float *x, cm_block_q8_k *y, int64_t k);
    void (*dequantize_row)(int type, const void *w, float *y, int64_t k);
    float (*vec_dot)(int wtype, int xtype, int64_t k, const void *w, const void *x);
    void (*matvec_rows)(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                        float *y, int64_t ldy, int64_t r0, int64_t r1);
    void (*rmsnorm)(float *y, const float *x, const float *w, int64_t k, float eps);
    void (*add)(float *x, const float *b, int64_t k);
    void (*silu_mul)(float *g, const float *u, int64_t k);
    void (*softmax)(float *x, int64_t k);
    void (*exp_row)(float *x, int64_t k);
    int64_t (*argmax)(const float *x, int64_t k);
    void (*rope)(float *x, const float *cs, const float *sn, int e, int neox);
    float (*dot_f32)(const float *a, const float *b, int64_t k);
    void (*axpy)(float *y, float a, const float *x, int64_t k);
    void (*f32_to_f16_row)(const float *x, uint16_t *y, int64_t k);
    float (*dot_f16)(const uint16_t *a, const float *b, int64_t k);
    void (*axpy_f16)(float *y, float a, const uint16_t *x, int64_t k);
    void (*att_scores_heads)(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t q_stride,
                             int nh, int64_t e, float scale, float *out, size_t out_stride);
    void (*att_values_heads)(int type, float *y, size_t y_stride, const float *p, size_t p_stride, int nh,
                             const void *v, size_t row_bytes, int n, int64_t e);
    void (*quant_dequantize)(int type, const void *w, float *y, int64_t k);
    void (*quant_unpack_k_row)(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin, int16_t *sc16,
                               int16_t *mn16);
    float (*quant_dot_q)(int wtype, int64_t k, const void *w, const void *x);
    void (*quant_matvec_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                           int64_t ldy, int64_t r0, int64_t r1);
    void (*quant_matvec_f32)(int wtype, const void *w, int64_t k, const float *x, size_t x_stride, int n,
                             float *y, int64_t ldy, int64_t r0, int64_t r1);
    size_t (*gemm_q_scratch_bytes)(int64_t k);
    int (*gemm_q_min_rows)(int wtype);
    cm_gemm_pack *(*gemm_q_pack)(int wtype, const void *w, int64_t k, int64_t m, size_t max_bytes);
    void (*gemm_q_packed)(const cm_gemm_pack *pk, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
                          int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);
    void (*gemm_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
                   int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);
} cm_kernel_ops;

/* The table in use (kernels.c sets it before main runs; cm_kernels_use changes it). */
extern const cm_kernel_ops *cm__kops;

#ifdef CM_FAMILY
/* Names inside one family's build: cm_quant_dot_q -> cm_quant_dot_q_avx2, ... */
#define CM_FAMILY_CAT2(a, b) a##_##b
#define CM_FAMILY_CAT(a, b) CM_FAMILY_CAT2(a, b)
#define CM_FAMILY_FN(name) CM_FAMILY_CAT(name, CM_FAMILY)

/* quants_simd.c's kernels, which kernels_simd.c of the same family calls and puts in the table. */
void CM_FAMILY_FN(cm_quant_dequantize)(int type, const void *w, float *y, int64_t k);
float CM_FAMILY_FN(cm_quant_dot_q)(int wtype, int64_t k, const void *w, const void *x);
void CM_FAMILY_FN(cm_quant_matvec_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                                     float *y, int64_t ldy, int64_t r0, int64_t r1);
void CM_FAMILY_FN(cm_quant_matvec_f32)(int wtype, const void *w, int64_t k, const float *x, size_t x_stride,
                                       int n, float *y, int64_t ldy, int64_t r0, int64_t r1);
/* kernels_simd.c's float lanes (kernels_order.h), for quants_simd.c's f32 products: acc (64 lanes, in
 * memory) takes w_i x_i for i < n, value i in lane i % 64 (a call resumes where the previous one ended,
 * when that was on a multiple of 64); cm_lanes_sum is the tree over acc (consumed). */
void CM_FAMILY_FN(cm_lanes_fma)(float acc[64], const float *w, const float *x, int64_t n);
float CM_FAMILY_FN(cm_lanes_sum)(float acc[64]);
/* quants_simd.c's unpacking of a whole legacy-type (or Q8_0) row for gemm_q8.c, AVX2 families only: the
 * blocks' q (nb * 32) and their d, m (cm_quant_unpack_legacy's) at d[b * dm_stride], m[b * dm_stride]. */
void CM_FAMILY_FN(cm_quant_unpack_legacy_row)(int wtype, const void *w, int64_t nb, int8_t *q, float *d, float *m,
                                              size_t dm_stride);
/* cm_quant_unpack_k_row (quants.h), which gemm_q8.c's repacking calls directly (every family; the
 * reference where the family has no AVX2). */
void CM_FAMILY_FN(cm_quant_unpack_k_row)(int type, const void *w, int64_t nb, int8_t *q, float *d, float *dmin,
                                         int16_t *sc16, int16_t *mn16);
/* gemm_q8.c's int8 prefill product, likewise. */
size_t CM_FAMILY_FN(cm_gemm_q_scratch_bytes)(int64_t k);
int CM_FAMILY_FN(cm_gemm_q_min_rows)(int wtype);
cm_gemm_pack *CM_FAMILY_FN(cm_gemm_q_pack)(int wtype, const void *w, int64_t k, int64_t m, size_t max_bytes);
void CM_FAMILY_FN(cm_gemm_q_packed)(const cm_gemm_pack *pk, const void *x, size_t x_stride, int n, float *y,
                                    int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);
extern const cm_kernel_ops CM_FAMILY_FN(cm_kernels);
void CM_FAMILY_FN(cm_gemm_q)(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y,
                             int64_t ldy, int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);
#endif

#endif
