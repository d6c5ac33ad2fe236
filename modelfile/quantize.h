/*
 * quantize.h - internals of the quantiser (quantize.c) that the GGUF writer and the tests reach: the
 * per-type row quantisers and the per-tensor type policy of llama-quantize's presets. Internal to
 * modelfile/; the public entry point is cm_quantize in codemoe_modelfile.h.
 */
#ifndef CM_QUANTIZE_H
#define CM_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>
#include "codemoe.h"

/* ------------------------------------------------------------ row quantisers */

/* Can cm_quantize_row write `type` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K)? */
int cm_quantize_type_ok(int type);

/* x (k) f32 -> y (k / block values of `type`, gguf_row_bytes(type, k) bytes); k a multiple of the
 * type's block, type one cm_quantize_type_ok accepts (anything else: nothing is written). Each type is
 * ggml's reference quantiser without an importance matrix (quantize_row_<type>_ref), bit for bit; blocks
 * are independent, so quantising row by row equals quantising a whole tensor at once. */
void cm_quantize_row(int type, const float *x, void *y, int64_t k);

/* ------------------------------------------------------------ presets and the type policy */

/* llama-quantize's presets: name (as llama-quantize spells it), llama_ftype value (general.file_type) and
 * the default tensor type. */
typedef struct cm_quant_preset {
    const char *name;
    int ftype;
    int type;
} cm_quant_preset;

/* The preset called `name` (case-insensitive; "Q3_K", "Q4_K", "Q5_K" are aliases of their _M presets,
 * as in llama-quantize), or NULL. */
const cm_quant_preset *cm_quant_preset_find(const char *name);
/* All presets, in llama-quantize's order; *n receives the count. */
const cm_quant_preset *cm_quant_presets(size_t *n);

/* What the policy needs to know about the model (from <arch>.* keys; see cm_quantize). */
typedef struct cm_quant_hparams {
    const char *arch;   /* general.architecture */
    int n_layer;        /* <arch>.block_count */
    int n_expert;       /* <arch>.expert_count, 0 when absent */
    int n_head;         /* <arch>.attention.head_count (layer 0) */
    int n_head_kv;      /* <arch>.attention.head_count_kv (layer 0), n_head when absent */
} cm_quant_hparams;

/* One tensor as the policy sees it, in the order llama-quantize writes them (cm_quant_sort). */
typedef struct cm_quant_tensor {
    const char *name;   /* NUL-terminated */
    int n_dims;         /* dimensions up to the last one > 1 (ggml_n_dims), at least 1 */
    int64_t ne[4];
    int type;           /* the input's */
    int target;         /* out: the type it is written as */
} cm_quant_tensor;

/* Orders t as llama-quantize does: tensors outside "blk.N." first, then by layer N; by name (bytewise)
 * within each. */
void cm_quant_sort(cm_quant_tensor *t, size_t n);

/* Chooses every t[i].target for preset p, as llama-quantize does without an importance matrix: the
 * preset's type for 2-D and 3-D weights (norms, routers and small special tensors keep their type), more
 * bits for the output, token embedding, attn_v, ffn_down, attn_output by layer position, and the
 * fallbacks when a row length is not a multiple of the type's block. t must be in cm_quant_sort order
 * (layer counters follow it). Returns CM_OK, or CM_E_UNSUPPORTED (a row length no type of the preset
 * fits) / CM_E_FORMAT (an expert tensor without a valid "blk.N." layer) with err set. */
int cm_quant_plan(const cm_quant_hparams *hp, const cm_quant_preset *p, cm_quant_tensor *t, size_t n,
                  cm_err *err);

#endif
