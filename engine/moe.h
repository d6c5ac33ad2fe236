/*
 * moe.h - mixture-of-experts FFNs: the MultiPL-MoE hybrid (token + segment level), the sparse MoE of
 * Qwen3-MoE (token level only: the hybrid's path without segments, shared expert or fusion weights) and
 * MoLE (LoRA language experts), their weights, per-context state and routing statistics. Internal to engine/.
 * Semantics and file layout: docs/model-format.md; the PyTorch reference: tools/reference_moe.py.
 *
 * Shapes: N batch tokens, D n_embd, F expert FFN width (hybrid) or n_ff (MoLE), r a LoRA rank.
 * model.c calls cm_moe_load() for the three architectures; forward.c creates a cm_moe_ctx beside its own
 * scratch and calls:
 *   cm_moe_batch_check()  while validating a batch (before any state changes);
 *   cm_moe_batch_begin()  once positions are assigned (per-token adapter sets, fence trackers);
 *   cm_moe_ffn()          hybrid and sparse: the whole FFN of one layer, y (N, D) from the normed input;
 *   cm_mole_gate_up()     MoLE: after the base gate/up products, adds the adapters' deltas;
 *   cm_mole_down()        MoLE: after the base down product, adds the adapters' deltas;
 *   cm_moe_batch_end()    after the last layer (reference-mode sequences become closed for input).
 */
#ifndef CM_MOE_H
#define CM_MOE_H

#include "codemoe.h"
#include "gguf.h"

struct cm_model;
struct cm_tensor;
struct cm_pool;
typedef struct cm_moe_ctx cm_moe_ctx;

#define CM_MOE_MAX_EXPERTS 128   /* per level: stack arrays and the op list are sized by it (Qwen3-MoE: 128) */
#define CM_HYBRID_MAX_EXPERTS 64 /* multipl_moe's limit per level (docs/model-format.md) */
#define CM_MOLE_MAX_ADAPTERS 64 /* cm_batch.adapters is a 64-bit mask */

/* SPARSE (qwen3moe) is stored as a hybrid without segment level, shared expert or fusion weights
 * (n_seg 0, shared -1, a_tok 1, a_seg 0), so it runs on the hybrid's grouped-by-expert path. */
enum { CM_MOE_NONE = 0, CM_MOE_HYBRID = 1, CM_MOE_MOLE = 2, CM_MOE_SPARSE = 3 };
enum { CM_POOL_MAX = 0, CM_POOL_MEAN = 1 };

typedef struct cm_moe_expert {
    /* views into the stacked tensors: gate, up (F, D); down (D, F) */
    const void *gate, *up, *down;
    /* their weight types: each stacked tensor has its own (llama-quantize's Q4_K_M gives ffn_down_exps
     * more bits in some layers, and falls back to a 32-value block type where F does not fill 256) */
    int gate_type, up_type, down_type;
} cm_moe_expert;

typedef struct cm_moe_layer {
    const void *tok_router; /* (N_tok, D) */
    const void *seg_router; /* (N_seg, D) */
    cm_moe_expert *tok;     /* (N_tok) */
    cm_moe_expert *seg;     /* (N_seg) */
} cm_moe_layer;

typedef struct cm_lora {
    const void *a; /* (r, in) */
    const void *b; /* (out, r) */
    int a_type, b_type;
} cm_lora;

typedef struct cm_moe_model {
    int kind; /* CM_MOE_HYBRID, CM_MOE_SPARSE or CM_MOE_MOLE */
    int n_layer, d;
    /* hybrid and sparse */
    int n_tok, k_used, shared, f_exp;
    int n_seg, window, pooling, bucket;
    float capacity, gate_scale, a_tok, a_seg;
    int mode_default;   /* CM_SEGMENT_CAUSAL or CM_SEGMENT_REFERENCE */
    int route;          /* causal descriptor: CM_SEGMENT_ROUTE_PREFIX or CM_SEGMENT_ROUTE_PREVIOUS */
    int seg_causal_top; /* max(1, floor(capacity)), capped at n_seg */
    int router_type;    /* type of both routers (any weight type, cm_weight_type_ok) */
    cm_moe_layer *layers; /* (n_layer) */
    cm_moe_expert *experts_mem;
    /* MoLE */
    int n_ff;
    int n_adapters;
    char (*names)[CM_LANG_NAME_MAX + 1]; /* (n_adapters) */
    int *ranks;                          /* (n_adapters) */
    float *alphas, *scales;              /* (n_adapters); scale = alpha / sqrt(rank) */
    int ad_shared, ad_fallback;          /* -1: none */
    int max_rank;
    cm_lora *lora;                       /* (n_layer, 3 projections gate/up/down, n_adapters) */
} cm_moe_model;

/* Reads <arch>.* keys and the MoE tensors for arch "multipl_moe", "qwen3moe" or "mole" (base tensors are model.c's).
 * in: the base hyper-parameters already loaded. Returns NULL with err set on any inconsistency. */
cm_moe_model *cm_moe_load(const gguf_file *g, const char *arch, const cm_model_info *in, cm_err *err);
void cm_moe_model_free(cm_moe_model *mm);
/* Architectures this file handles, and their base attention defaults. */
int cm_moe_arch(const char *arch); /* CM_MOE_* */
/* Base-attention hyper-parameters of the MoE architectures, after model.c's common ones: the rope
 * style is multipl_moe's NeoX (as qwen2) and mole's "normal" (as llama), or <arch>.rope.type
 * ("neox" / "normal") when present. q/k/v biases are expressed by their tensors' presence. qwen3moe
 * is llama.cpp's architecture: model.c's settings (NeoX) stand and no rope.type key is read. */
int cm_moe_hparams(const gguf_file *g, const char *arch, cm_model_info *in, cm_err *err);

/* forward.c: the context's MoE state (NULL for dense models). */
cm_moe_ctx *cm_ctx_moe(const cm_ctx *c);

/* int8_act: quantised experts (and adapters) meet int8 activations, as forward.c's dense products do. */
cm_moe_ctx *cm_moe_ctx_create(const struct cm_model *m, const cm_moe_model *mm, struct cm_pool *pool,
                              int n_threads, int n_seq_max, int n_ctx, int n_batch_max, int int8_act, cm_err *err);
void cm_moe_ctx_free(cm_moe_ctx *mc);
void cm_moe_seq_open(cm_moe_ctx *mc, int seq);
/* Truncation to n < len: allowed to 0, and to block ends (n a multiple of CM_KV_BLOCK_TOKENS) whose
 * snapshot the caller passes to cm_moe_seq_truncate; reference-mode sequences only to 0. */
int cm_moe_seq_truncate_check(const cm_moe_ctx *mc, int seq, int len, int n, cm_err *err);
void cm_moe_seq_truncate(cm_moe_ctx *mc, int seq, int len, int n, const unsigned char *snap);

/* Prefix cache and forks. The state after a block's last position is written into the block's extra
 * bytes (cm_moe_snapshot_bytes of them) during cm_forward; a sequence mapped onto cached blocks restores
 * the last one's (NULL: the empty state). */
size_t cm_moe_snapshot_bytes(const cm_moe_model *mm);
void cm_moe_seq_restore(cm_moe_ctx *mc, int seq, const unsigned char *snap);
/* The sequence's current state (after its last position) into snap. */
void cm_moe_seq_snapshot(const cm_moe_ctx *mc, int seq, unsigned char *snap);
/* dst continues src: options and routing state copied, statistics zero. */
void cm_moe_seq_copy(cm_moe_ctx *mc, int dst, int src);
/* The sequence's options as a prefix-cache salt; 0 when its blocks must not be shared (reference
 * segment mode, adapter sets from the batch). */
int cm_moe_seq_cache_salt(const cm_moe_ctx *mc, int seq, uint64_t *salt);
int cm_moe_seq_set_options(cm_moe_ctx *mc, int seq, int len, const cm_seq_options *o, cm_err *err);

/* seq_len: each sequence's length before this batch; seq_cnt: its tokens in this batch. */
int cm_moe_batch_check(const cm_moe_ctx *mc, const cm_batch *b, const int32_t *seq_len, const int32_t *seq_cnt,
                       cm_err *err);
/* snap: (n) per token, the snapshot area to fill after it (the token ends a KV block), or NULL. */
void cm_moe_batch_begin(cm_moe_ctx *mc, const cm_batch *b, const int32_t *pos, unsigned char *const *snap);
void cm_moe_batch_end(cm_moe_ctx *mc);

/* Hybrid FFN of layer il: y (N, D) = a_tok y_tok + a_seg y_seg from x (N, D), the ffn-normed input;
 * sparse: y = y_tok. */
void cm_moe_ffn(cm_moe_ctx *mc, int il, int n, const float *x, float *y);
/* MoLE: hg, hu (N, F) += adapter deltas of x (N, D); proj (N, D) += adapter deltas of h (N, F). */
void cm_mole_gate_up(cm_moe_ctx *mc, int il, int n, const float *x, float *hg, float *hu);
void cm_mole_down(cm_moe_ctx *mc, int il, int n, const float *h, float *proj);

/* Expert residency (moe_resident.c, cm_ctx_params.experts_resident): at most `keep` experts of each layer
 * (token and segment level together) keep their pages of the model file; the least recently used of the
 * others are released after each layer's products. cm_moe_resident_create: CM_OK with *out NULL when
 * there is nothing to do (keep <= 0, a model other than hybrid or sparse), or with *out a new state that
 * has released every expert's pages; CM_E_NOMEM (err set). cm_moe_set_resident: mc takes r (freed with
 * mc) and notes each layer's experts in cm_moe_ffn. cm_moe_resident_stats (tests, benchmarks): the most
 * experts resident in a layer now, and the releases since creation; 0s for NULL. */
typedef struct cm_moe_resident cm_moe_resident;
int cm_moe_resident_create(const struct cm_model *m, const cm_moe_model *mm, int keep, cm_moe_resident **out,
                           cm_err *err);
void cm_moe_resident_free(cm_moe_resident *r);
/* After layer il's products: g_start (n_tok + n_seg + 1) the grouped rows' starts, an expert ran when
 * its group is not empty. NULL r: nothing. */
void cm_moe_resident_note(cm_moe_resident *r, int il, const int32_t *g_start);
void cm_moe_resident_stats(const cm_moe_resident *r, int *max_resident, uint64_t *released);
void cm_moe_set_resident(cm_moe_ctx *mc, cm_moe_resident *r);
const cm_moe_resident *cm_moe_get_resident(const cm_moe_ctx *mc);

/* Tests: called after routing each layer, once per batch token, with its token experts (selection
 * order: the top non-shared by p, then the shared one) and segment experts (by q, highest first;
 * reference mode: the experts whose chosen windows hold the token, in expert order). */
typedef void (*cm_moe_trace_fn)(void *ud, int layer, int i, int n_tok, const int *tok, int n_seg, const int *seg);
void cm_moe_set_trace(cm_moe_ctx *mc, cm_moe_trace_fn fn, void *ud);

const cm_routing *cm_moe_routing(cm_moe_ctx *mc, int seq);
void cm_moe_routing_reset(cm_moe_ctx *mc, int seq);
void cm_moe_set_stats(cm_moe_ctx *mc, int on);
/* Per-token detail (codemoe.h cm_seq_routing_tokens_enable): enable allocates the rows (n_max <= 0 frees
 * them) and returns the capacity or CM_E_NOMEM; close frees them (cm_seq_close, reopen, fork). */
int cm_moe_seq_tokens_enable(cm_moe_ctx *mc, int seq, int n_max, cm_err *err);
const cm_route_tokens *cm_moe_seq_tokens(cm_moe_ctx *mc, int seq);
void cm_moe_seq_close(cm_moe_ctx *mc, int seq);

#endif
