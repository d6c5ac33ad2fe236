/*
 * kernels.h - the numeric kernels of the forward pass. Internal to engine/.
 *
 * Every optimised kernel has a plain C reference `*_ref` beside it; tests/engine/test_kernels.c holds
 * them equal bit for bit, for every kernel family the machine runs: the int8 dots follow cm_qacc
 * (quants.h), every float kernel the operation order of kernels_order.h. The optimised kernels come in families
 * (kernels_family.h): AVX-512 (F, BW, VL, DQ, with or without VNNI), AVX2 (+FMA, F16C) and scalar,
 * compiled side by side; the best one the CPU runs is chosen at startup (CODEMOE_ISA may name a lower
 * one). Letters: M output rows, K row length (input dim), N activation rows (tokens), E head_dim.
 *
 * Weight matrices W (M, K) are row-major as GGUF stores them; a "row" of W is K values of its type:
 * F32, F16, BF16, Q8_0 (kernels here) or one of the block types of quants.h (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q2_K .. Q6_K; their kernels live in quants.c and are reached through the dispatchers below).
 * Activations are f32; quantised weights may instead meet activations quantised to their paired int8
 * format (see xtype below).
 */
#ifndef CM_KERNELS_H
#define CM_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "gguf.h"
#include "quants.h"

struct cm_pool;

/* Weight types the matrix kernels multiply (any mix per tensor), and their names for messages. */
int cm_weight_type_ok(int type);
#define CM_WEIGHT_TYPES "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"

/* Kernel families (cm_kernels_isa, in codemoe.h, names the one in use). The build's families, best
 * first: i in [0, cm_kernels_family_count()); the name, or NULL out of range; whether this CPU runs it.
 * cm_kernels_use switches to a family by name: 0, or -1 (nothing changed) for a name this build lacks or
 * this CPU cannot run. For tests and startup only: not while kernels run on other threads. */
int cm_kernels_family_count(void);
const char *cm_kernels_family_name(int i);
int cm_kernels_family_runs(int i);
int cm_kernels_use(const char *name);

/* ------------------------------------------------------------ conversion */

/* x (K) -> y (K/32 blocks); K % 32 == 0. d = max|x|/127, q = round-half-even(x/d). */
void cm_quantize_row_q8_0(const float *x, cm_block_q8_0 *y, int64_t k);
void cm_quantize_row_q8_0_ref(const float *x, cm_block_q8_0 *y, int64_t k);

/* One row of k values of `type` (any weight type) -> y (k) f32. */
void cm_dequantize_row(int type, const void *w, float *y, int64_t k);
void cm_dequantize_row_ref(int type, const void *w, float *y, int64_t k);

/* Activation rows ("x") come in one of these formats, xtype:
 * - F32: plain floats; works with every weight type. Quantised weights give the dot of the exactly
 *   dequantised row with x (kernels_order.h's float dot, whatever the weight type), so logits match a
 *   float reference.
 * - Q8_0, Q8_1, Q8_K: x quantised once per token to cm_quant_vec_dot_type(wtype), for the weight types
 *   that pair with it (Q8_0, Q4_0, Q5_0 with Q8_0; Q4_1, Q5_1 with Q8_1; K-quants with Q8_K); an
 *   int8 dot per block, as llama.cpp does. Faster arithmetic, but adds x's quantisation error (~1e-2
 *   on logits of a small model). */
/* Bytes of one activation row of K values in xtype. */
size_t cm_vec_row_bytes(int xtype, int64_t k);
/* x (K) f32 -> one activation row in xtype (a copy for F32). */
void cm_vec_prepare(int xtype, const float *x, void *out, int64_t k);

/* ------------------------------------------------------------ dot products */

/* dot(w (K) of wtype, x (K) of xtype): kernels_order.h's float dot for f32 x, cm_qacc's int8 dot
 * (int32 within a block) for int8 x. */
float cm_vec_dot(int wtype, int xtype, int64_t k, const void *w, const void *x);
float cm_vec_dot_ref(int wtype, int xtype, int64_t k, const void *w, const void *x);

/* y[n*ldy + r] = dot(W row r, x_n) for n < N, r in [r0, r1). W (M, K) of wtype; x_n = x + n*x_stride
 * bytes, each an activation row of xtype. The weight row is reused from cache across the N rows. */
void cm_matvec_rows(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride, int n,
                    float *y, int64_t ldy, int64_t r0, int64_t r1);
void cm_matvec_rows_ref(int wtype, int xtype, const void *w, int64_t k, const void *x, size_t x_stride,
                        int n, float *y, int64_t ldy, int64_t r0, int64_t r1);

/* Threaded: y (N, ldy) [:, 0:M] = x (N, K) W (M, K)^T, x already in xtype; rows of W are split
 * across the pool's threads. */
void cm_matvec(struct cm_pool *pool, int wtype, int xtype, const void *w, int64_t m, int64_t k,
               const void *x, size_t x_stride, int n, float *y, int64_t ldy);

/* The prefill product with int8 activations (gemm_q8.c): y[n*ldy + r] = cm_vec_dot_ref(wtype, xtype, K,
 * W row r, x_n), bit for bit, for n < N, r in [r0, r1); wtype Q8_0 or a block type of quants.h, x_n =
 * x + n*x_stride bytes an activation row in xtype = cm_quant_vec_dot_type(wtype). Each weight row is
 * unpacked once into `scratch` (scratch_bytes >= cm_gemm_q_scratch_bytes(K), the caller's, one per
 * concurrent call) and reused for all N activation rows, which pays from cm_gemm_q_min_rows(wtype) rows
 * on (the kernel family's own crossover with cm_matvec_rows, 5 to 16); room beyond the
 * minimum (about K bytes per row of x) lets the activations' per-block sums be prepared once per call
 * rather than once per tile. No result depends on N, on [r0, r1), on the scratch or on the kernel
 * family. The plain reference is cm_matvec_rows_ref. */
size_t cm_gemm_q_scratch_bytes(int64_t k);
int cm_gemm_q_min_rows(int wtype);
void cm_gemm_q(int wtype, const void *w, int64_t k, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
               int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);

/* W (M, K) of wtype repacked once, as cm_gemm_q repacks each tile of it on every call: for a matrix read
 * often with few activation rows (a small model's output head over a large vocabulary, every step),
 * where repacking is most of the product's time. NULL where the kernel family has no int8 GEMM for
 * wtype (the scalar family, float types), without memory, or when it would hold more than max_bytes (0:
 * no bound; checked before anything is allocated); cm_gemm_pack_bytes is what it holds (about
 * 1.2x Q8_0's bytes, 1.7-2.3x a K-quant's). W must outlive it. cm_gemm_q_packed(pk, ...) is
 * cm_gemm_q(wtype, W, K, ...) bit for bit, faster when r0 is a multiple of 16 and the family in use is
 * the one that packed it (otherwise it is cm_gemm_q itself). */
typedef struct cm_gemm_pack cm_gemm_pack;
cm_gemm_pack *cm_gemm_q_pack(int wtype, const void *w, int64_t k, int64_t m, size_t max_bytes);
size_t cm_gemm_pack_bytes(const cm_gemm_pack *pk);
void cm_gemm_pack_free(cm_gemm_pack *pk);
void cm_gemm_q_packed(const cm_gemm_pack *pk, const void *x, size_t x_stride, int n, float *y, int64_t ldy,
                      int64_t r0, int64_t r1, void *scratch, size_t scratch_bytes);

/* ------------------------------------------------------------ element-wise */

/* Each as kernels_order.h defines it, bit for bit in every family. */

/* y (K) = x * rsqrt(mean(x^2) + eps) * w, as HF Qwen2/Llama RMSNorm in f32. y may alias x. */
void cm_rmsnorm(float *y, const float *x, const float *w, int64_t k, float eps);
void cm_rmsnorm_ref(float *y, const float *x, const float *w, int64_t k, float eps);

/* x (K) += b (K). */
void cm_add(float *x, const float *b, int64_t k);
void cm_add_ref(float *x, const float *b, int64_t k);

/* g (K) = silu(g) * u. */
void cm_silu_mul(float *g, const float *u, int64_t k);
void cm_silu_mul_ref(float *g, const float *u, int64_t k);

/* In place softmax over x (K); returns nothing. K >= 1. */
void cm_softmax(float *x, int64_t k);
void cm_softmax_ref(float *x, int64_t k);

/* x (K) = exp(x) in place, cm_exp_def per element: the exp that softmax and silu_mul evaluate inside,
 * exposed so that a test holds each family's to the definition bit for bit. */
void cm_exp_row(float *x, int64_t k);
void cm_exp_row_ref(float *x, int64_t k);

/* The index of x's (K >= 1) largest value: the lowest such index on ties; NaN never wins, and 0 when
 * nothing is above -inf. Greedy sampling over a vocabulary row: the reference is the plain scan, the
 * fast one a single pass keeping each vector lane's running maximum and its index, the same index
 * always. */
int64_t cm_argmax(const float *x, int64_t k);
int64_t cm_argmax_ref(const float *x, int64_t k);

/* Rotary embedding of one head x (E) at one position, with that position's tables cs (E/2) cos and
 * sn (E/2) sin. neox: pairs (i, i + E/2); normal: pairs (2i, 2i+1). */
void cm_rope(float *x, const float *cs, const float *sn, int e, int neox);
void cm_rope_ref(float *x, const float *cs, const float *sn, int e, int neox);

/* dot of two f32 vectors (attention scores; reference: cm_vec_dot_ref(GGUF_TT_F32, GGUF_TT_F32, ...));
 * y (K) = fmaf(a, x (K), y) (attention values). */
float cm_dot_f32(const float *a, const float *b, int64_t k);
void cm_axpy(float *y, float a, const float *x, int64_t k);
void cm_axpy_ref(float *y, float a, const float *x, int64_t k);

/* ------------------------------------------------------------ f16 KV rows (CM_KV_F16) */

/* y (K) f16 = x (K) rounded to nearest even, as cm_f32_to_fp16 (F16C vcvtps2ph); bit-exact with the
 * reference for every input but NaN (both give a NaN). */
void cm_f32_to_f16_row(const float *x, uint16_t *y, int64_t k);
void cm_f32_to_f16_row_ref(const float *x, uint16_t *y, int64_t k);

/* Attention over f16 K and V: dot(a (K) f16, b (K) f32), each element converted exactly (reference:
 * cm_vec_dot_ref(GGUF_TT_F16, GGUF_TT_F32, ...)); y (K) = fmaf(a, x (K) f16, y). */
float cm_dot_f16(const uint16_t *a, const float *b, int64_t k);
void cm_axpy_f16(float *y, float a, const uint16_t *x, int64_t k);
void cm_axpy_f16_ref(float *y, float a, const uint16_t *x, int64_t k);

/* ------------------------------------------------------------ attention over a run of KV rows */

/* Attention's scores, over one KV block's K stored transposed (kv.h): element d of key t at
 * kt[d * kt_stride + t], of type F32 or F16 (the KV pool's), keys t < n. For nh query heads of one kv
 * head, head h's query at q + h * q_stride:
 *   out[h * out_stride + t] = s * scale, s = fmaf(k_d, q_d, s) for d = 0, 1, .., E - 1 from s = 0,
 * one rounding for the scale. The order is sequential along the head dim and the same for every key,
 * so a vector of keys side by side computes each key's score exactly (no reduction across lanes):
 * the SIMD families hold 8 or 16 keys per register and several heads' sums at once, each K element
 * converted once for all the heads. The order does not depend on the family, the batch or the heads
 * that share the call. */
void cm_att_scores_heads(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t q_stride, int nh,
                         int64_t e, float scale, float *out, size_t out_stride);
void cm_att_scores_heads_ref(int type, const void *kt, size_t kt_stride, int n, const float *q, size_t q_stride,
                             int nh, int64_t e, float scale, float *out, size_t out_stride);

/* y (E) = fmaf(p[t], V row t, y) for t = 0, 1, .., n - 1 in that order (cm_axpy_ref or cm_axpy_f16_ref
 * row after row), V rows of E values `row_bytes` apart, F32 or F16. */
void cm_att_values_ref(int type, float *y, const float *p, const void *v, size_t row_bytes, int n, int64_t e);

/* cm_att_values_ref for the nh query heads of one kv head over the same V rows (nh = 1: one head):
 * head h's y at y + h * y_stride and probabilities at p + h * p_stride, each head's numbers exactly
 * cm_att_values_ref's. The
 * AVX-512 families convert each V row once for several heads and keep their y in registers together,
 * so that the FMA chains of one head no longer wait on each other. */
void cm_att_values_heads(int type, float *y, size_t y_stride, const float *p, size_t p_stride, int nh, const void *v,
                         size_t row_bytes, int n, int64_t e);
void cm_att_values_heads_ref(int type, float *y, size_t y_stride, const float *p, size_t p_stride, int nh,
                             const void *v, size_t row_bytes, int n, int64_t e);

#endif
