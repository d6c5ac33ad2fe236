/*
 * kv.h - paged KV memory. Internal to engine/.
 *
 * A fixed pool of blocks, each holding CM_KV_BLOCK consecutive positions of one sequence for every
 * layer: block b, layer l is K (CM_KV_BLOCK, C) then V (CM_KV_BLOCK, C), C = n_head_kv * head_dim, f32.
 * A block's bytes are contiguous, so a block can later be shared (prefix cache), copied or swapped as a
 * unit. Each sequence owns a block table: position p lives in block table[p / CM_KV_BLOCK] at row
 * p % CM_KV_BLOCK. Blocks carry a reference count so that a future prefix cache can map one block
 * read-only into several tables; today every count is 0 (free) or 1.
 *
 * Allocation is all-or-nothing: cm_kv_seq_reserve() either grows a sequence's table to hold n more
 * positions or changes nothing, so a forward pass fails before touching any state.
 */
#ifndef CM_KV_H
#define CM_KV_H

#include <stddef.h>
#include <stdint.h>
#include "codemoe.h"

#define CM_KV_BLOCK 32

typedef struct cm_kv_seq {
    int open;
    int len;            /* positions stored */
    int n_blocks;       /* entries used in blocks[] */
    int32_t *blocks;    /* (max_blocks) block ids; a slice of cm_kv.tables */
} cm_kv_seq;

typedef struct cm_kv {
    int n_layer;
    int kv_dim;         /* C = n_head_kv * head_dim */
    int n_blocks;
    int n_ctx;          /* max positions per sequence */
    int max_blocks;     /* per sequence: ceil(n_ctx / CM_KV_BLOCK) */
    int n_seq;
    size_t block_floats;/* n_layer * 2 * CM_KV_BLOCK * C */
    float *data;        /* (n_blocks, n_layer, 2, CM_KV_BLOCK, C) */
    uint16_t *refcount; /* (n_blocks) */
    int32_t *free_ids;  /* (n_blocks) stack of free block ids */
    int n_free;
    int32_t *tables;    /* (n_seq, max_blocks) */
    cm_kv_seq *seqs;    /* (n_seq) */
} cm_kv;

/* Sizes the pool; returns CM_OK or CM_E_NOMEM / CM_E_INVAL with err set. */
int cm_kv_init(cm_kv *kv, int n_layer, int kv_dim, int n_blocks, int n_seq, int n_ctx, cm_err *err);
void cm_kv_free(cm_kv *kv);

/* Opens a free sequence slot: its id, or -1 if all are open. */
int cm_kv_seq_open(cm_kv *kv);
/* Releases all its blocks. */
void cm_kv_seq_close(cm_kv *kv, int seq);
/* Drops positions >= n; blocks no longer needed go back to the pool. */
void cm_kv_seq_truncate(cm_kv *kv, int seq, int n);
/* Blocks a sequence needs beyond what it holds to store `extra` more positions. */
int cm_kv_blocks_needed(const cm_kv *kv, int seq, int extra);
/* Grows the table so that len + extra positions fit. Only call after checking blocks_needed against
 * n_free for all sequences of a batch: this never fails then. Does not change len. */
void cm_kv_seq_reserve(cm_kv *kv, int seq, int extra);

/* K and V rows of position pos of a sequence in a layer: (C) each. pos < n_blocks * CM_KV_BLOCK. */
static inline float *cm_kv_k(const cm_kv *kv, const cm_kv_seq *s, int layer, int pos) {
    size_t b = (size_t)s->blocks[pos / CM_KV_BLOCK];
    return kv->data + b * kv->block_floats + (size_t)layer * 2 * CM_KV_BLOCK * kv->kv_dim +
           (size_t)(pos % CM_KV_BLOCK) * kv->kv_dim;
}
static inline float *cm_kv_v(const cm_kv *kv, const cm_kv_seq *s, int layer, int pos) {
    return cm_kv_k(kv, s, layer, pos) + (size_t)CM_KV_BLOCK * kv->kv_dim;
}

#endif
