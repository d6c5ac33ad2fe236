/*
 * kv.h - paged KV memory and the prefix cache. Internal to engine/.
 *
 * A fixed pool of blocks, each holding CM_KV_BLOCK consecutive positions of one prefix for every
 * layer: block b, layer l is K (CM_KV_BLOCK, C) then V (CM_KV_BLOCK, C), C = n_head_kv * head_dim, in
 * the pool's element type (CM_KV_F32 or CM_KV_F16, codemoe.h), followed by `extra_bytes` of state the owner stores per block (the MoE routing state at the block's
 * last position). Each sequence owns a block table: position p lives in block table[p / CM_KV_BLOCK]
 * at row p % CM_KV_BLOCK.
 *
 * Every block is in exactly one state:
 *   free      refcount 0, on the free stack;
 *   used      refcount > 0: in that many sequence tables (full blocks may be shared; a sequence only
 *             ever writes into a block it holds alone and that is not in the cache);
 *   cached    refcount 0, registered in the prefix index and on the LRU list: evictable.
 * A used block may also be registered (it is then shared with future sequences).
 *
 * Prefix index: a full block is registered under (parent block, parent generation, salt, its tokens),
 * so a key names the whole prefix up to the block's end without hashing it again: the parent's key
 * names everything before. A block's generation changes whenever it leaves the index, so children of an
 * evicted (and possibly reused) block can never be found through it again. Lookups compare keys
 * exactly; the hash only picks the bucket.
 *
 * Allocation is all-or-nothing: callers check cm_kv_blocks_needed() against cm_kv_available() for a
 * whole batch before cm_kv_seq_reserve(), which then cannot fail. Allocation takes a free block, else
 * evicts the least recently released cached block.
 */
#ifndef CM_KV_H
#define CM_KV_H

#include <stddef.h>
#include <stdint.h>
#include "codemoe.h"

#define CM_KV_BLOCK CM_KV_BLOCK_TOKENS

typedef struct cm_kv_seq {
    int open;
    int len;            /* positions stored */
    int n_blocks;       /* entries used in blocks[] */
    int n_reg;          /* blocks[0..n_reg) are registered (or came from the cache) */
    int no_reg;         /* never register more of this sequence (uncacheable, or a duplicate met) */
    int salted;         /* salt is known (set by the first publish) */
    uint64_t salt;
    int32_t *blocks;    /* (max_blocks) block ids; a slice of cm_kv.tables */
    int32_t *toks;      /* (n_ctx) tokens at each position (prefix cache only; else NULL) */
} cm_kv_seq;

typedef struct cm_kv {
    int n_layer;
    int kv_dim;         /* C = n_head_kv * head_dim */
    int n_blocks;
    int n_ctx;          /* max positions per sequence */
    int max_blocks;     /* per sequence: ceil(n_ctx / CM_KV_BLOCK) */
    int n_seq;
    int cache_on;       /* prefix cache enabled */
    int kv_type;        /* CM_KV_F32 or CM_KV_F16: the type of every K and V element */
    size_t elt_bytes;   /* bytes per element: 4 or 2 */
    size_t block_elems; /* n_layer * 2 * CM_KV_BLOCK * C */
    size_t extra_bytes; /* per block, after its elements (a multiple of 8) */
    size_t block_bytes; /* block_elems * elt_bytes + extra_bytes, rounded up to 64 */
    unsigned char *data;/* (n_blocks, block_bytes) */
    size_t map_bytes;   /* cm_big_alloc's mapping of data, 0: from the allocator */
    uint16_t *refcount; /* (n_blocks) */
    int32_t *free_ids;  /* (n_blocks) stack of free block ids */
    int n_free;
    int n_shared;       /* blocks with refcount > 1 (kept as they change: stats read it every step) */
    int32_t *tables;    /* (n_seq, max_blocks) */
    int32_t *seq_toks;  /* (n_seq, n_ctx) when cache_on */
    cm_kv_seq *seqs;    /* (n_seq) */
    /* prefix index (cache_on) */
    uint8_t *reg;       /* (n_blocks) registered */
    uint32_t *gen;      /* (n_blocks) bumped when a block leaves the index */
    int32_t *parent;    /* (n_blocks) parent block id, -1 for a first block */
    uint32_t *parent_gen;
    uint64_t *salt;     /* (n_blocks) options the block was computed under */
    uint64_t *hash;     /* (n_blocks) */
    int32_t *btoks;     /* (n_blocks, CM_KV_BLOCK) tokens of the block */
    uint8_t *tail_n;    /* (n_blocks) >0: a registered TAIL, the partial last block of a closed sequence
                           holding this many positions (keyed without tokens; see cm_kv_seq_close_tail) */
    int32_t *hnext;     /* (n_blocks) bucket chains of full blocks, by their exact key */
    int32_t *buckets;   /* (n_buckets) */
    int32_t *pnext;     /* (n_blocks) bucket chains of every registered block (full and tails) by */
    int32_t *pbuckets;  /* (n_buckets)   (parent, generation, salt): the candidates for a partial match */
    uint32_t n_buckets; /* a power of two */
    int32_t *lru_prev, *lru_next; /* (n_blocks) cached blocks, oldest at lru_head */
    int32_t lru_head, lru_tail;
    int n_lru;
    uint64_t query_tokens, hit_tokens, evictions;
} cm_kv;

/* Bytes of one K or V element of kv_type (CM_KV_F32: 4, CM_KV_F16: 2); 0 for another value. */
size_t cm_kv_elt_bytes(int kv_type);
/* Bytes of one block: its K and V elements of kv_type plus extra_bytes, rounded up to 64 (blocks start
 * on 64-byte boundaries). 0 when the sizes or the type are invalid or overflow. The one formula behind
 * cm_kv_init and cm_ctx_kv_block_bytes. */
size_t cm_kv_block_bytes(int n_layer, int kv_dim, int kv_type, size_t extra_bytes);
/* Sizes the pool; returns CM_OK or CM_E_NOMEM / CM_E_INVAL with err set. */
int cm_kv_init(cm_kv *kv, int n_layer, int kv_dim, int kv_type, int n_blocks, int n_seq, int n_ctx,
               size_t extra_bytes, int prefix_cache, cm_err *err);
void cm_kv_free(cm_kv *kv);
/* Makes the whole pool resident now (its pages written once, zero): a server's first requests then take
 * no page faults for their KV rows, and its memory use is the pool's from the start. A pool of more
 * than half the memory the system reports available (Linux: MemAvailable) is left lazy. Returns 1 when
 * the pool is resident, 0 when it was left lazy. */
int cm_kv_prefault(cm_kv *kv);

/* Opens a free sequence slot: its id, or -1 if all are open. */
int cm_kv_seq_open(cm_kv *kv);
/* Releases all its blocks (registered ones stay cached). */
void cm_kv_seq_close(cm_kv *kv, int seq);
/* Tails: token-level reuse. The block a closing sequence would keep as a tail (its partial last block,
 * when every full block before it is registered), or -1; the caller may store the sequence's state in
 * its extra bytes, then closes with cm_kv_seq_close_tail, which registers the tail under (parent, salt)
 * and its positions' tokens. A later attach that ends on the same parent copies the tail with the
 * most positions in common with its next tokens (MoE callers: only whole tails, whose end state is
 * the one stored) into a private block. */
int32_t cm_kv_seq_tail_block(const cm_kv *kv, int seq);
void cm_kv_seq_close_tail(cm_kv *kv, int seq, uint64_t salt);
/* Drops positions >= n; blocks no longer needed go back to the pool. A partial last block that is
 * shared or registered is first made private (copied, or taken out of the index): CM_E_NOMEM, nothing
 * changed, when a copy is needed and no block is available. */
int cm_kv_seq_truncate(cm_kv *kv, int seq, int n);
/* Blocks a sequence needs beyond what it holds to store `extra` more positions. */
int cm_kv_blocks_needed(const cm_kv *kv, int seq, int extra);
/* Free + evictable blocks. */
static inline int cm_kv_available(const cm_kv *kv) { return kv->n_free + kv->n_lru; }
/* Grows the table so that len + extra positions fit. Only call after checking blocks_needed against
 * cm_kv_available for all sequences of a batch: this never fails then. Does not change len. */
void cm_kv_seq_reserve(cm_kv *kv, int seq, int extra);

/* Prefix cache. After positions were appended: registers the sequence's newly completed blocks under
 * salt (uncacheable sequences: call cm_kv_seq_no_cache once instead). */
void cm_kv_seq_publish(cm_kv *kv, int seq, uint64_t salt);
void cm_kv_seq_no_cache(cm_kv *kv, int seq);
/* On an empty sequence: maps the longest registered prefix of tokens[0..n) in whole blocks, then the
 * best tail after them (copied), at most max_tokens positions in all. Tails are the registered ones of
 * closed sequences and the partial last blocks of LIVE sequences on the same chain (their rows are
 * final: sequences only append). Returns the positions mapped (the sequence's new length); *tail_src =
 * the private copy of a tail, or -1; *live_src = the live sequence it came from, or -1 (a registered
 * tail's extra bytes hold the state at its end; a live one's state is the live sequence's own). */
int cm_kv_seq_attach(cm_kv *kv, int seq, const int32_t *tokens, int n, int max_tokens, uint64_t salt,
                     int whole_tails_only, int32_t *tail_src, int *live_src);
/* dst (open, empty) becomes a copy of src: full blocks shared, the partial one copied. CM_E_NOMEM
 * (nothing changed) when the copy has no block. */
int cm_kv_seq_fork(cm_kv *kv, int dst, int src);
/* See cm_ctx_kv_check. */
int cm_kv_check(const cm_kv *kv, char *why, size_t cap);

/* forward.c: the context's pool (for tests of its layout). */
const cm_kv *cm_ctx_kv(const cm_ctx *c);

/* The block's first byte (its K and V elements start there). */
static inline unsigned char *cm_kv_block_data(const cm_kv *kv, int32_t b) {
    return kv->data + (size_t)b * kv->block_bytes;
}
/* The block's extra bytes (extra_bytes of them). */
static inline unsigned char *cm_kv_block_extra(const cm_kv *kv, int32_t b) {
    return cm_kv_block_data(kv, b) + kv->block_elems * kv->elt_bytes;
}

/* A block holds, per layer, its K part then its V part, CM_KV_BLOCK positions each, of kv_dim elements
 * of kv_type (float or uint16_t f16). K is stored transposed: element c of the block's position p at
 * c * CM_KV_BLOCK + p, so that attention's scores take keys side by side (cm_att_scores_heads); V by
 * rows: position p's kv_dim elements at p * kv_dim. pos < n_blocks * CM_KV_BLOCK. */
static inline void *cm_kv_kt(const cm_kv *kv, const cm_kv_seq *s, int layer, int pos) {
    size_t e = (size_t)layer * 2 * CM_KV_BLOCK * kv->kv_dim;
    return cm_kv_block_data(kv, s->blocks[pos / CM_KV_BLOCK]) + e * kv->elt_bytes;
}
static inline void *cm_kv_v(const cm_kv *kv, const cm_kv_seq *s, int layer, int pos) {
    size_t e = (size_t)CM_KV_BLOCK * kv->kv_dim + (size_t)(pos % CM_KV_BLOCK) * kv->kv_dim;
    return (unsigned char *)cm_kv_kt(kv, s, layer, pos) + e * kv->elt_bytes;
}

#endif
