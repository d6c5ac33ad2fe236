/*
 * kv.c - the paged KV pool: a free stack of blocks and a block table per sequence (see kv.h).
 */
#include "kv.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

int cm_kv_init(cm_kv *kv, int n_layer, int kv_dim, int n_blocks, int n_seq, int n_ctx, cm_err *err) {
    memset(kv, 0, sizeof *kv);
    if (n_layer < 1 || kv_dim < 1 || n_blocks < 1 || n_seq < 1 || n_ctx < 1)
        return cm_err_set(err, CM_E_INVAL, "kv: bad sizes (layers %d, dim %d, blocks %d, seqs %d, ctx %d)",
                          n_layer, kv_dim, n_blocks, n_seq, n_ctx);
    uint64_t block_floats, total, tab;
    if (!cm_mul_u64((uint64_t)n_layer * 2 * CM_KV_BLOCK, (uint64_t)kv_dim, &block_floats) ||
        !cm_mul_u64(block_floats, (uint64_t)n_blocks, &total) || !cm_mul_u64(total, sizeof(float), &total) ||
        total > (uint64_t)SIZE_MAX / 2)
        return cm_err_set(err, CM_E_NOMEM, "kv: pool of %d blocks is too large", n_blocks);
    kv->n_layer = n_layer;
    kv->kv_dim = kv_dim;
    kv->n_blocks = n_blocks;
    kv->n_ctx = n_ctx;
    kv->max_blocks = (n_ctx + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    kv->n_seq = n_seq;
    kv->block_floats = (size_t)block_floats;
    if (!cm_mul_u64((uint64_t)n_seq, (uint64_t)kv->max_blocks, &tab) || tab > (uint64_t)SIZE_MAX / 8)
        return cm_err_set(err, CM_E_NOMEM, "kv: block tables too large");
    /* malloc, not calloc: a large pool is mapped lazily and only blocks in use become resident */
    kv->data = malloc((size_t)total);
    kv->refcount = calloc((size_t)n_blocks, sizeof *kv->refcount);
    kv->free_ids = malloc((size_t)n_blocks * sizeof *kv->free_ids);
    kv->tables = malloc((size_t)tab * sizeof *kv->tables);
    kv->seqs = calloc((size_t)n_seq, sizeof *kv->seqs);
    if (!kv->data || !kv->refcount || !kv->free_ids || !kv->tables || !kv->seqs) {
        cm_kv_free(kv);
        return cm_err_set(err, CM_E_NOMEM, "kv: cannot allocate %llu bytes for %d blocks",
                          (unsigned long long)total, n_blocks);
    }
    /* low ids on top of the stack: a fresh context touches the start of the pool first */
    for (int i = 0; i < n_blocks; i++) kv->free_ids[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    for (int s = 0; s < n_seq; s++) kv->seqs[s].blocks = kv->tables + (size_t)s * kv->max_blocks;
    return CM_OK;
}

void cm_kv_free(cm_kv *kv) {
    if (!kv) return;
    free(kv->data);
    free(kv->refcount);
    free(kv->free_ids);
    free(kv->tables);
    free(kv->seqs);
    memset(kv, 0, sizeof *kv);
}

int cm_kv_seq_open(cm_kv *kv) {
    for (int s = 0; s < kv->n_seq; s++) {
        if (!kv->seqs[s].open) {
            kv->seqs[s].open = 1;
            kv->seqs[s].len = 0;
            kv->seqs[s].n_blocks = 0;
            return s;
        }
    }
    return -1;
}

static void kv_release(cm_kv *kv, int32_t b) {
    if (kv->refcount[b] > 0 && --kv->refcount[b] == 0) kv->free_ids[kv->n_free++] = b;
}

void cm_kv_seq_truncate(cm_kv *kv, int seq, int n) {
    cm_kv_seq *s = &kv->seqs[seq];
    if (n < 0) n = 0;
    if (n > s->len) n = s->len;
    int keep = (n + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    while (s->n_blocks > keep) kv_release(kv, s->blocks[--s->n_blocks]);
    s->len = n;
}

void cm_kv_seq_close(cm_kv *kv, int seq) {
    cm_kv_seq *s = &kv->seqs[seq];
    while (s->n_blocks > 0) kv_release(kv, s->blocks[--s->n_blocks]);
    s->len = 0;
    s->open = 0;
}

int cm_kv_blocks_needed(const cm_kv *kv, int seq, int extra) {
    const cm_kv_seq *s = &kv->seqs[seq];
    int need = (s->len + extra + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    return need > s->n_blocks ? need - s->n_blocks : 0;
}

void cm_kv_seq_reserve(cm_kv *kv, int seq, int extra) {
    cm_kv_seq *s = &kv->seqs[seq];
    int need = (s->len + extra + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    while (s->n_blocks < need && kv->n_free > 0) {
        int32_t b = kv->free_ids[--kv->n_free];
        kv->refcount[b] = 1;
        s->blocks[s->n_blocks++] = b;
    }
}
