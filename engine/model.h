/*
 * model.h - the loaded model: hyper-parameters, weights (views into the GGUF mapping) and tokenizer.
 * Internal to engine/. Shapes use: V vocab, D n_embd, H n_head, K n_head_kv, E head_dim, F n_ff.
 * A weight matrix (out, in) is stored row-major as GGUF writes it: ne[0] = in (row length), ne[1] = out.
 */
#ifndef CM_MODEL_H
#define CM_MODEL_H

#include "codemoe.h"
#include "gguf.h"
#include "tokenizer.h"

typedef struct cm_tensor {
    const void *data; /* NULL when absent (optional tensors) */
    int type;         /* gguf_ttype */
    int64_t ne0;      /* row length (input dim) */
    int64_t ne1;      /* rows (output dim); 1 for vectors */
} cm_tensor;

typedef struct cm_layer {
    cm_tensor attn_norm; /* (D) f32 */
    cm_tensor wq;        /* (H*E, D) */
    cm_tensor wk;        /* (K*E, D) */
    cm_tensor wv;        /* (K*E, D) */
    cm_tensor wo;        /* (D, H*E) */
    cm_tensor bq, bk, bv;/* (H*E), (K*E), (K*E) f32; absent unless qkv_bias */
    cm_tensor q_norm;    /* (E) f32: RMS norm of each q head before rope (qwen3, qwen3moe); else absent */
    cm_tensor k_norm;    /* (E) f32: the same for each k head */
    cm_tensor ffn_norm;  /* (D) f32 */
    cm_tensor w_gate;    /* (F, D) */
    cm_tensor w_up;      /* (F, D) */
    cm_tensor w_down;    /* (D, F) */
} cm_layer;

struct cm_model {
    gguf_file gguf;
    cm_model_info info;
    cm_tokenizer *tok;
    cm_tensor tok_embd;    /* (V, D) */
    cm_tensor output_norm; /* (D) f32 */
    cm_tensor output;      /* (V, D); == tok_embd when tied */
    cm_layer *layers;      /* (n_layer) */
    struct cm_moe_model *moe; /* mixture-of-experts part (moe.h), NULL for dense architectures */
    char *arch, *name, *weight_type; /* owned copies backing info's strings */
};

#endif
