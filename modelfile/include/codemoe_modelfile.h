/*
 * codemoe_modelfile.h - writing model files: the public interface of modelfile/, the offline library
 * beside the engine (Hugging Face -> GGUF conversion, dense -> mixture-of-experts upcycling, quantisation
 * to llama-quantize's presets). The `codemoe convert`, `upcycle` and `quantize` subcommands use it;
 * serving never does. It builds on the
 * engine (cm_err, the CM_E* codes) and never the other way round.
 *
 * Conventions as in codemoe.h: functions take a `cm_err *` (may be NULL) and return CM_OK or a
 * negative CM_E* code with err->msg set. Output goes to "<out_path>.tmp" and is renamed into place
 * only when complete: on failure nothing is created or replaced at out_path.
 */
#ifndef CODEMOE_MODELFILE_H
#define CODEMOE_MODELFILE_H

#include <stdint.h>
#include "codemoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================ conversion */

/* Convert a Hugging Face model directory (config.json, model.safetensors or
 * model.safetensors.index.json with shards, tokenizer.json) to GGUF. out_type: "f32", "f16", "bf16",
 * "q8_0" or NULL (keep source type). If the directory holds only tokenizer.json (and optionally
 * tokenizer_config.json), writes a vocab-only GGUF. */
int cm_convert_hf(const char *hf_dir, const char *out_path, const char *out_type, cm_err *err);

/* ============================================================ upcycling */

/* Build a mixture-of-experts model from a dense qwen2/llama GGUF. Every expert is a copy of the dense
 * FFN (tensor types kept), so with a_tok = 1, a_seg = 0 the hybrid computes the dense model's function,
 * and a MoLE model with its B = 0 adapters does too. Routers: zeros, or seeded N(0, router_std).
 * MoLE adapters: A seeded N(0, 1/sqrt(in)), B = 0 (F32). The base's rope style and q/k/v biases carry
 * over (<arch>.rope.type). Everything is validated as the loader would before anything is written. */
#define CM_UPCYCLE_SHARED_LAST (-2)
typedef struct cm_upcycle_params {
    /* hybrid ("multipl_moe") */
    int n_experts;          /* token experts (6) */
    int top_k;              /* experts per token, the shared one included (2) */
    int shared;             /* shared expert index, -1 none, CM_UPCYCLE_SHARED_LAST (default): the last */
    int n_seg_experts;      /* segment experts (6); 0: no segment level */
    int window;             /* tokens per segment (64) */
    const char *pooling;    /* "max" (default) or "mean" */
    float capacity;         /* 1.0 */
    int bucket;             /* 4 */
    float gate_scale;       /* 0: 1 / window */
    float a_tok, a_seg;     /* fusion weights (0.7, 0.3) */
    const char *mode_default; /* "causal" (default) or "reference" */
    float router_std;       /* 0: zero routers; else seeded normal noise of this deviation */
    uint64_t seed;
    /* MoLE ("mole") instead, when mole_langs is set: comma-separated adapter languages; "shared" and
     * "other" adapters are added after them */
    const char *mole_langs;
    int rank_lang, rank_shared, rank_other;        /* 16, 48, 64 */
    float alpha_lang, alpha_shared, alpha_other;   /* 16, 32, 32 */
} cm_upcycle_params;

void cm_upcycle_default(cm_upcycle_params *p);
int cm_upcycle(const char *dense_path, const char *out_path, const cm_upcycle_params *p, cm_err *err);

/* ============================================================ quantisation */

/* Quantise a GGUF model to one of llama-quantize's presets, writing byte for byte the file llama-quantize
 * writes for the same input without an importance matrix: the same type for every tensor (the preset's
 * type for 2-D and 3-D weights, more bits for the output, token embedding, attn_v, ffn_down and
 * attn_output by layer position, fallbacks for row lengths the type's block does not divide; norms,
 * biases and routers keep their type), ggml's reference quantisers, every input key kept in order with
 * general.quantization_version and general.file_type set last, and the same tensor order (non-layer
 * tensors first, then by layer, by name within each).
 * Sources may be F32, F16 or BF16; an already quantised tensor that would change type is refused
 * (CM_E_UNSUPPORTED) unless allow_requantize. Errors: CM_E_INVAL (unknown preset), CM_E_FORMAT (no
 * general.architecture or <arch>.block_count, an expert tensor without a layer), CM_E_UNSUPPORTED (a row
 * length no type of the preset fits, a general.alignment other than 32), CM_E_IO / CM_E_NOMEM. */
typedef struct cm_quantize_params {
    const char *preset;       /* "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M",
                                 "Q3_K_L", "Q4_K_S", "Q4_K_M" (default), "Q5_K_S", "Q5_K_M", "Q6_K";
                                 case-insensitive; "Q3_K", "Q4_K", "Q5_K" mean their _M presets */
    int allow_requantize;     /* 0 (default): refuse quantised inputs that would change type */
} cm_quantize_params;

void cm_quantize_default(cm_quantize_params *p);
int cm_quantize(const char *in_path, const char *out_path, const cm_quantize_params *p, cm_err *err);

#ifdef __cplusplus
}
#endif
#endif /* CODEMOE_MODELFILE_H */
