/*
 * kv.c - the paged KV pool: a free stack of blocks, a block table per sequence, and the prefix cache
 * (an exact-key index over full blocks plus an LRU list of idle cached blocks). See kv.h.
 */
#include "kv.h"

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

/* The memory the system says it could give now (Linux: MemAvailable), or 0 when it cannot tell. */
static uint64_t kv_mem_available(void) {
    uint64_t kb = 0;
#if defined(__linux__)
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[128];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1) break;
    fclose(f);
#endif
    return kb > UINT64_MAX / 1024 ? 0 : kb * 1024;
}

int cm_kv_prefault(cm_kv *kv) {
    if (!kv->data) return 0;
    size_t bytes = kv->block_bytes * (size_t)kv->n_blocks;
    /* a pool of more than half what the system has left stays lazy: touching it all now could push the
     * machine into reclaim, or the process into the OOM killer, before it has served anything */
    uint64_t avail = kv_mem_available();
    if (avail && bytes > avail / 2) return 0;
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
    /* the kernel faults the pages in (zeroed) without this thread writing them again; a pool of 2 MiB
     * or more is aligned to them (cm_big_alloc), a smaller one's first page is rounded down. Only a
     * kernel without it (EINVAL) falls back to the writes below; any other failure leaves the rest lazy */
    uintptr_t a = (uintptr_t)kv->data & ~(uintptr_t)4095;
    if (madvise((void *)a, (uintptr_t)kv->data + bytes - a, MADV_POPULATE_WRITE) == 0) return 1;
    if (errno != EINVAL) return 0;
#endif
    volatile unsigned char *p = kv->data; /* one write per page: the kernel zeroes the rest */
    for (size_t i = 0; i < bytes; i += 4096) p[i] = 0;
    return 1;
}

size_t cm_kv_elt_bytes(int kv_type) {
    return kv_type == CM_KV_F32 ? sizeof(float) : kv_type == CM_KV_F16 ? sizeof(uint16_t) : 0;
}

size_t cm_kv_block_bytes(int n_layer, int kv_dim, int kv_type, size_t extra_bytes) {
    uint64_t block_elems;
    if (n_layer < 1 || kv_dim < 1 || !cm_kv_elt_bytes(kv_type) || extra_bytes > ((size_t)1 << 30) ||
        !cm_mul_u64((uint64_t)n_layer * 2 * CM_KV_BLOCK, (uint64_t)kv_dim, &block_elems) ||
        block_elems > (uint64_t)SIZE_MAX / 8)
        return 0;
    /* blocks start on 64-byte boundaries: the kernels' vector loads never straddle two blocks' lines */
    return (size_t)((block_elems * cm_kv_elt_bytes(kv_type) + extra_bytes + 63) / 64 * 64);
}

int cm_kv_init(cm_kv *kv, int n_layer, int kv_dim, int kv_type, int n_blocks, int n_seq, int n_ctx,
               size_t extra_bytes, int prefix_cache, cm_err *err) {
    memset(kv, 0, sizeof *kv);
    if (n_layer < 1 || kv_dim < 1 || !cm_kv_elt_bytes(kv_type) || n_blocks < 1 || n_seq < 1 || n_ctx < 1 ||
        extra_bytes > ((size_t)1 << 30))
        return cm_err_set(err, CM_E_INVAL, "kv: bad sizes (layers %d, dim %d, type %d, blocks %d, seqs %d, ctx %d)",
                          n_layer, kv_dim, kv_type, n_blocks, n_seq, n_ctx);
    uint64_t block_elems = (uint64_t)n_layer * 2 * CM_KV_BLOCK * (uint64_t)kv_dim, bytes, total, tab;
    bytes = cm_kv_block_bytes(n_layer, kv_dim, kv_type, extra_bytes);
    if (bytes == 0) return cm_err_set(err, CM_E_NOMEM, "kv: blocks too large");
    if (!cm_mul_u64(bytes, (uint64_t)n_blocks, &total) || total > (uint64_t)SIZE_MAX / 2)
        return cm_err_set(err, CM_E_NOMEM, "kv: pool of %d blocks is too large", n_blocks);
    kv->n_layer = n_layer;
    kv->kv_dim = kv_dim;
    kv->n_blocks = n_blocks;
    kv->n_ctx = n_ctx;
    kv->max_blocks = (n_ctx + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    kv->n_seq = n_seq;
    kv->cache_on = prefix_cache != 0;
    kv->kv_type = kv_type;
    kv->elt_bytes = cm_kv_elt_bytes(kv_type);
    kv->block_elems = (size_t)block_elems;
    kv->extra_bytes = extra_bytes;
    kv->block_bytes = (size_t)bytes;
    if (!cm_mul_u64((uint64_t)n_seq, (uint64_t)kv->max_blocks, &tab) || tab > (uint64_t)SIZE_MAX / 8)
        return cm_err_set(err, CM_E_NOMEM, "kv: block tables too large");
    /* the pool's memory, not zeroed: a large pool is mapped lazily and only blocks in use become resident,
     * unless cm_kv_prefault touches it all at once. Its own mapping from 2 MiB on (cm_big_alloc), so
     * malloc's tuning (e.g. MALLOC_PERTURB_'s fill) never touches it, and with huge pages asked for: a
     * prompt's rows then fault in 2 MiB at a time instead of 4 KiB (a fresh server's first burst of 16
     * prompts took about 2500 page faults, 5 ms of admission and more in its steps), and attention's
     * reads of a sequence's scattered blocks miss the TLB less */
    kv->data = cm_big_alloc((size_t)total, 64, &kv->map_bytes);
    kv->refcount = calloc((size_t)n_blocks, sizeof *kv->refcount);
    kv->free_ids = malloc((size_t)n_blocks * sizeof *kv->free_ids);
    kv->tables = malloc((size_t)tab * sizeof *kv->tables);
    kv->seqs = calloc((size_t)n_seq, sizeof *kv->seqs);
    int fail = !kv->data || !kv->refcount || !kv->free_ids || !kv->tables || !kv->seqs;
    if (!fail && kv->cache_on) {
        uint64_t st;
        uint32_t nb = 16;
        while (nb < (uint32_t)n_blocks * 2u && nb < (1u << 30)) nb <<= 1;
        kv->n_buckets = nb;
        fail = !cm_mul_u64((uint64_t)n_seq, (uint64_t)n_ctx, &st) || st > (uint64_t)SIZE_MAX / 8;
        if (!fail) {
            kv->seq_toks = malloc((size_t)st * sizeof *kv->seq_toks);
            kv->reg = calloc((size_t)n_blocks, 1);
            kv->gen = calloc((size_t)n_blocks, sizeof *kv->gen);
            kv->parent = malloc((size_t)n_blocks * sizeof *kv->parent);
            kv->parent_gen = malloc((size_t)n_blocks * sizeof *kv->parent_gen);
            kv->salt = malloc((size_t)n_blocks * sizeof *kv->salt);
            kv->hash = malloc((size_t)n_blocks * sizeof *kv->hash);
            kv->btoks = malloc((size_t)n_blocks * CM_KV_BLOCK * sizeof *kv->btoks);
            kv->tail_n = calloc((size_t)n_blocks, 1);
            kv->hnext = malloc((size_t)n_blocks * sizeof *kv->hnext);
            kv->buckets = malloc((size_t)nb * sizeof *kv->buckets);
            kv->pnext = malloc((size_t)n_blocks * sizeof *kv->pnext);
            kv->pbuckets = malloc((size_t)nb * sizeof *kv->pbuckets);
            kv->lru_prev = malloc((size_t)n_blocks * sizeof *kv->lru_prev);
            kv->lru_next = malloc((size_t)n_blocks * sizeof *kv->lru_next);
            fail = !kv->seq_toks || !kv->reg || !kv->gen || !kv->parent || !kv->parent_gen || !kv->salt ||
                   !kv->hash || !kv->btoks || !kv->tail_n || !kv->hnext || !kv->buckets || !kv->pnext || !kv->pbuckets || !kv->lru_prev || !kv->lru_next;
        }
    }
    if (fail) {
        cm_kv_free(kv);
        return cm_err_set(err, CM_E_NOMEM, "kv: cannot allocate %llu bytes for %d blocks",
                          (unsigned long long)total, n_blocks);
    }
    /* low ids on top of the stack: a fresh context touches the start of the pool first */
    for (int i = 0; i < n_blocks; i++) kv->free_ids[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    for (int s = 0; s < n_seq; s++) {
        kv->seqs[s].blocks = kv->tables + (size_t)s * kv->max_blocks;
        if (kv->cache_on) kv->seqs[s].toks = kv->seq_toks + (size_t)s * (size_t)n_ctx;
    }
    if (kv->cache_on) {
        for (uint32_t i = 0; i < kv->n_buckets; i++) kv->buckets[i] = kv->pbuckets[i] = -1;
        kv->lru_head = kv->lru_tail = -1;
    }
    return CM_OK;
}

void cm_kv_free(cm_kv *kv) {
    if (!kv) return;
    cm_big_free(kv->data, kv->map_bytes);
    free(kv->refcount);
    free(kv->free_ids);
    free(kv->tables);
    free(kv->seq_toks);
    free(kv->seqs);
    free(kv->reg);
    free(kv->gen);
    free(kv->parent);
    free(kv->parent_gen);
    free(kv->salt);
    free(kv->hash);
    free(kv->btoks);
    free(kv->tail_n);
    free(kv->hnext);
    free(kv->buckets);
    free(kv->pnext);
    free(kv->pbuckets);
    free(kv->lru_prev);
    free(kv->lru_next);
    memset(kv, 0, sizeof *kv);
}

/* ============================================================ index and LRU */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t key_hash(int32_t parent, uint32_t pgen, uint64_t salt, const int32_t *toks) {
    uint64_t h = mix64(((uint64_t)(uint32_t)parent << 32 | pgen) ^ 0x9e3779b97f4a7c15ull);
    h = mix64(h ^ salt);
    for (int i = 0; i < CM_KV_BLOCK; i++) h = mix64(h ^ (uint32_t)toks[i]) + (uint64_t)i;
    return h;
}

/* A tail's key has no tokens (it is looked up by how many of them match). */
static uint64_t tail_hash(int32_t parent, uint32_t pgen, uint64_t salt) {
    return mix64(mix64(((uint64_t)(uint32_t)parent << 32 | pgen) ^ 0x7a11u) ^ salt);
}

/* Leading tokens a and b share, at most n. */
static int common_prefix(const int32_t *a, const int32_t *b, int n) {
    int k = 0;
    while (k < n && a[k] == b[k]) k++;
    return k;
}

/* index_find: full blocks only (tails are never in the exact-key chains). */
static int32_t index_find(const cm_kv *kv, uint64_t h, int32_t parent, uint32_t pgen, uint64_t salt,
                          const int32_t *toks) {
    for (int32_t b = kv->buckets[h & (kv->n_buckets - 1)]; b >= 0; b = kv->hnext[b])
        if (kv->hash[b] == h && kv->parent[b] == parent && kv->parent_gen[b] == pgen && kv->salt[b] == salt &&
            !memcmp(kv->btoks + (size_t)b * CM_KV_BLOCK, toks, CM_KV_BLOCK * sizeof *toks))
            return b;
    return -1;
}

static uint32_t parent_bucket(const cm_kv *kv, int32_t b) {
    return (uint32_t)(tail_hash(kv->parent[b], kv->parent_gen[b], kv->salt[b]) & (kv->n_buckets - 1));
}

static void unlink_from(int32_t *head, int32_t *next, int32_t b) {
    while (*head >= 0 && *head != b) head = &next[*head];
    if (*head == b) *head = next[b];
}

static void index_remove(cm_kv *kv, int32_t b) {
    if (!kv->tail_n[b]) unlink_from(&kv->buckets[kv->hash[b] & (kv->n_buckets - 1)], kv->hnext, b);
    unlink_from(&kv->pbuckets[parent_bucket(kv, b)], kv->pnext, b);
    kv->reg[b] = 0;
    kv->tail_n[b] = 0;
    kv->gen[b]++; /* its children's keys name the old generation: they can never match again */
}

static void lru_append(cm_kv *kv, int32_t b) {
    kv->lru_prev[b] = kv->lru_tail;
    kv->lru_next[b] = -1;
    if (kv->lru_tail >= 0) kv->lru_next[kv->lru_tail] = b;
    else kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_lru++;
}

static void lru_remove(cm_kv *kv, int32_t b) {
    if (kv->lru_prev[b] >= 0) kv->lru_next[kv->lru_prev[b]] = kv->lru_next[b];
    else kv->lru_head = kv->lru_next[b];
    if (kv->lru_next[b] >= 0) kv->lru_prev[kv->lru_next[b]] = kv->lru_prev[b];
    else kv->lru_tail = kv->lru_prev[b];
    kv->n_lru--;
}

/* ============================================================ blocks */

/* A free block, else the least recently used cached one (evicted); -1 if neither. refcount becomes 1. */
static int32_t kv_take(cm_kv *kv) {
    int32_t b = -1;
    if (kv->n_free > 0) b = kv->free_ids[--kv->n_free];
    else if (kv->cache_on && kv->lru_head >= 0) {
        b = kv->lru_head;
        lru_remove(kv, b);
        index_remove(kv, b);
        kv->evictions++;
    }
    if (b >= 0) kv->refcount[b] = 1;
    return b;
}

/* One more table holds b (n_shared counts blocks held by more than one). */
static void kv_hold(cm_kv *kv, int32_t b) {
    if (kv->refcount[b]++ == 1) kv->n_shared++;
}

static void block_copy(cm_kv *kv, int32_t dst, int32_t src) {
    memcpy(kv->data + (size_t)dst * kv->block_bytes, kv->data + (size_t)src * kv->block_bytes, kv->block_bytes);
}

static void kv_release(cm_kv *kv, int32_t b) {
    if (kv->refcount[b] == 0) return;
    if (kv->refcount[b]-- == 2) kv->n_shared--;
    if (kv->refcount[b] > 0) return;
    if (kv->cache_on && kv->reg[b]) lru_append(kv, b);
    else kv->free_ids[kv->n_free++] = b;
}

int cm_kv_seq_open(cm_kv *kv) {
    for (int s = 0; s < kv->n_seq; s++) {
        cm_kv_seq *q = &kv->seqs[s];
        if (!q->open) {
            q->open = 1;
            q->len = q->n_blocks = q->n_reg = q->no_reg = q->salted = 0;
            return s;
        }
    }
    return -1;
}

void cm_kv_seq_close(cm_kv *kv, int seq) {
    cm_kv_seq *s = &kv->seqs[seq];
    /* last block first: a prefix's deeper blocks become older in the LRU than its first ones, so
     * eviction eats a chain from its end and the shared beginnings survive longest */
    while (s->n_blocks > 0) kv_release(kv, s->blocks[--s->n_blocks]);
    s->len = s->n_reg = s->no_reg = s->salted = 0;
    s->open = 0;
}

int cm_kv_seq_truncate(cm_kv *kv, int seq, int n) {
    cm_kv_seq *s = &kv->seqs[seq];
    if (n < 0) n = 0;
    if (n > s->len) n = s->len;
    int keep = (n + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    if (n % CM_KV_BLOCK && keep <= s->n_blocks) {
        /* the kept partial block will be written again: it must be this sequence's alone */
        int32_t b = s->blocks[keep - 1];
        if (kv->refcount[b] > 1) {
            int32_t nb = kv_take(kv);
            if (nb < 0) return CM_E_NOMEM;
            block_copy(kv, nb, b);
            kv_release(kv, b);
            s->blocks[keep - 1] = nb;
        } else if (kv->cache_on && kv->reg[b]) {
            index_remove(kv, b);
        }
    }
    while (s->n_blocks > keep) kv_release(kv, s->blocks[--s->n_blocks]);
    if (s->n_reg > n / CM_KV_BLOCK) s->n_reg = n / CM_KV_BLOCK;
    s->len = n;
    return CM_OK;
}

int cm_kv_blocks_needed(const cm_kv *kv, int seq, int extra) {
    const cm_kv_seq *s = &kv->seqs[seq];
    int need = (s->len + extra + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    return need > s->n_blocks ? need - s->n_blocks : 0;
}

void cm_kv_seq_reserve(cm_kv *kv, int seq, int extra) {
    cm_kv_seq *s = &kv->seqs[seq];
    int need = (s->len + extra + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    while (s->n_blocks < need) {
        int32_t b = kv_take(kv);
        if (b < 0) break; /* callers checked availability: not reached */
        s->blocks[s->n_blocks++] = b;
    }
}

/* ============================================================ prefix cache */

void cm_kv_seq_no_cache(cm_kv *kv, int seq) { kv->seqs[seq].no_reg = 1; }

static void index_insert(cm_kv *kv, int32_t b, uint64_t h, int32_t parent, uint32_t pgen, uint64_t salt,
                         const int32_t *toks, int n) {
    kv->reg[b] = 1;
    kv->parent[b] = parent;
    kv->parent_gen[b] = pgen;
    kv->salt[b] = salt;
    kv->hash[b] = h;
    memcpy(kv->btoks + (size_t)b * CM_KV_BLOCK, toks, (size_t)n * sizeof *toks);
    kv->tail_n[b] = (uint8_t)(n < CM_KV_BLOCK ? n : 0);
    if (n == CM_KV_BLOCK) { /* full blocks are found by exact key; tails only by their parent */
        uint32_t k = (uint32_t)(h & (kv->n_buckets - 1));
        kv->hnext[b] = kv->buckets[k];
        kv->buckets[k] = b;
    }
    uint32_t k = parent_bucket(kv, b);
    kv->pnext[b] = kv->pbuckets[k];
    kv->pbuckets[k] = b;
}

int32_t cm_kv_seq_tail_block(const cm_kv *kv, int seq) {
    const cm_kv_seq *s = &kv->seqs[seq];
    int full = s->len / CM_KV_BLOCK;
    if (!kv->cache_on || s->no_reg || s->len % CM_KV_BLOCK == 0 || s->n_reg != full || s->n_blocks != full + 1)
        return -1;
    int32_t b = s->blocks[full];
    return kv->refcount[b] == 1 && !kv->reg[b] ? b : -1;
}

void cm_kv_seq_close_tail(cm_kv *kv, int seq, uint64_t salt) {
    cm_kv_seq *s = &kv->seqs[seq];
    int32_t b = cm_kv_seq_tail_block(kv, seq);
    if (b >= 0) {
        int full = s->len / CM_KV_BLOCK;
        int32_t parent = full ? s->blocks[full - 1] : -1;
        uint32_t pgen = parent >= 0 ? kv->gen[parent] : 0;
        index_insert(kv, b, tail_hash(parent, pgen, salt), parent, pgen, salt, s->toks + (size_t)full * CM_KV_BLOCK,
                     s->len - full * CM_KV_BLOCK);
    }
    cm_kv_seq_close(kv, seq); /* the registered tail goes to the LRU like any cached block */
}

/* The registered block under (parent, salt) sharing the most leading tokens with toks[0..n): tails, and
 * full blocks that continue differently (a full block matching all 32 was taken by the chain). With
 * `whole`, only tails matching entirely (their end state is stored; nothing inside a block is). Its
 * count in *m; -1 if none shares any. */
static int32_t tail_find(const cm_kv *kv, int32_t parent, uint32_t pgen, uint64_t salt, const int32_t *toks,
                         int n, int whole, int *m) {
    int32_t best = -1;
    *m = 0;
    for (int32_t b = kv->pbuckets[tail_hash(parent, pgen, salt) & (kv->n_buckets - 1)]; b >= 0; b = kv->pnext[b]) {
        if (kv->parent[b] != parent || kv->parent_gen[b] != pgen || kv->salt[b] != salt) continue;
        if (whole && !kv->tail_n[b]) continue;
        int have = kv->tail_n[b] ? kv->tail_n[b] : CM_KV_BLOCK;
        int k = common_prefix(kv->btoks + (size_t)b * CM_KV_BLOCK, toks, have < n ? have : n);
        if (whole && k != have) continue;
        if (k > *m) { *m = k; best = b; }
    }
    return best;
}

void cm_kv_seq_publish(cm_kv *kv, int seq, uint64_t salt) {
    cm_kv_seq *s = &kv->seqs[seq];
    if (!kv->cache_on || s->no_reg) return;
    s->salt = salt;
    s->salted = 1;
    int full = s->len / CM_KV_BLOCK;
    while (s->n_reg < full) {
        int bi = s->n_reg;
        int32_t b = s->blocks[bi];
        if (kv->reg[b]) { s->n_reg++; continue; } /* mapped from the cache */
        int32_t parent = bi ? s->blocks[bi - 1] : -1;
        uint32_t pgen = parent >= 0 ? kv->gen[parent] : 0;
        const int32_t *toks = s->toks + (size_t)bi * CM_KV_BLOCK;
        uint64_t h = key_hash(parent, pgen, salt, toks);
        if (index_find(kv, h, parent, pgen, salt, toks) >= 0) {
            /* another sequence computed the same prefix meanwhile: keep ours private (its children
             * could not be reached through it) */
            s->no_reg = 1;
            return;
        }
        index_insert(kv, b, h, parent, pgen, salt, toks, CM_KV_BLOCK);
        s->n_reg++;
    }
}

/* The live sequence (not seq) whose registered chain ends on parent and whose partial last block shares
 * the most leading tokens with toks[0..n) (whole partial blocks only if asked); its count in *m. */
static int live_find(const cm_kv *kv, int seq, int full, int32_t parent, uint64_t salt, const int32_t *toks,
                     int n, int whole, int *m) {
    int best = -1;
    *m = 0;
    for (int q = 0; q < kv->n_seq; q++) {
        const cm_kv_seq *o = &kv->seqs[q];
        if (q == seq || !o->open || !o->salted || o->salt != salt || o->no_reg || o->len / CM_KV_BLOCK != full ||
            o->n_reg != full || o->len % CM_KV_BLOCK == 0 || (full && o->blocks[full - 1] != parent))
            continue;
        int have = o->len - full * CM_KV_BLOCK;
        int k = common_prefix(o->toks + (size_t)full * CM_KV_BLOCK, toks, have < n ? have : n);
        if (whole && k != have) continue;
        if (k > *m) { *m = k; best = q; }
    }
    return best;
}

int cm_kv_seq_attach(cm_kv *kv, int seq, const int32_t *tokens, int n, int max_tokens, uint64_t salt,
                     int whole_tails_only, int32_t *tail_src, int *live_src) {
    cm_kv_seq *s = &kv->seqs[seq];
    *tail_src = -1;
    *live_src = -1;
    if (!kv->cache_on || s->len != 0 || s->no_reg) return 0;
    if (max_tokens > n) max_tokens = n;
    if (max_tokens > kv->n_ctx) max_tokens = kv->n_ctx;
    if (max_tokens < 0) max_tokens = 0;
    kv->query_tokens += (uint64_t)max_tokens;
    int32_t parent = -1;
    uint32_t pgen = 0;
    while ((s->n_blocks + 1) * CM_KV_BLOCK <= max_tokens) {
        const int32_t *toks = tokens + (size_t)s->n_blocks * CM_KV_BLOCK;
        int32_t b = index_find(kv, key_hash(parent, pgen, salt, toks), parent, pgen, salt, toks);
        if (b < 0) break;
        if (kv->refcount[b] == 0) lru_remove(kv, b);
        kv_hold(kv, b);
        s->blocks[s->n_blocks++] = b;
        parent = b;
        pgen = kv->gen[b];
    }
    s->len = s->n_blocks * CM_KV_BLOCK;
    s->n_reg = s->n_blocks;
    int m = 0, lm = 0, room = max_tokens - s->len;
    int32_t t = room > 0 ? tail_find(kv, parent, pgen, salt, tokens + s->len, room, whole_tails_only, &m) : -1;
    int live = room > 0 ? live_find(kv, seq, s->n_blocks, parent, salt, tokens + s->len, room, whole_tails_only, &lm) : -1;
    if (live >= 0 && lm > m) { /* a running sequence is further along: copy its partial block */
        const cm_kv_seq *o = &kv->seqs[live];
        int32_t src = o->blocks[o->n_blocks - 1];
        int32_t b = kv_take(kv);
        if (b >= 0) {
            block_copy(kv, b, src);
            s->blocks[s->n_blocks++] = b;
            s->len += lm;
            *tail_src = b;
            *live_src = live;
        }
        t = -1;
    }
    if (t >= 0) {
        /* copy it: the tail stays for others. If no block is free, the LRU's oldest cached block is
         * evicted, and that may be this very tail: then its rows are simply ours (nothing overwrote them) */
        int32_t b = kv_take(kv);
        if (b >= 0) {
            if (b != t) block_copy(kv, b, t);
            s->blocks[s->n_blocks++] = b;
            s->len += m;
            *tail_src = b; /* the copy holds the tail's extra bytes too */
        }
    }
    memcpy(s->toks, tokens, (size_t)s->len * sizeof *tokens);
    kv->hit_tokens += (uint64_t)s->len;
    return s->len;
}

int cm_kv_seq_fork(cm_kv *kv, int dst, int src) {
    cm_kv_seq *d = &kv->seqs[dst], *s = &kv->seqs[src];
    int full = s->len / CM_KV_BLOCK;
    int32_t part = -1;
    if (s->n_blocks > full) { /* the partial last block is copied: both will write their own rows */
        part = kv_take(kv);
        if (part < 0) return CM_E_NOMEM;
        block_copy(kv, part, s->blocks[full]);
    }
    for (int i = 0; i < full; i++) {
        kv_hold(kv, s->blocks[i]);
        d->blocks[i] = s->blocks[i];
    }
    d->n_blocks = full;
    if (part >= 0) d->blocks[d->n_blocks++] = part;
    d->len = s->len;
    d->n_reg = s->n_reg;
    d->no_reg = s->no_reg;
    if (kv->cache_on) memcpy(d->toks, s->toks, (size_t)s->len * sizeof *s->toks);
    return CM_OK;
}

/* ============================================================ consistency */

int cm_kv_check(const cm_kv *kv, char *why, size_t cap) {
    int bad = 0;
    uint32_t *refs = calloc((size_t)kv->n_blocks, sizeof *refs);
    uint8_t *where = calloc((size_t)kv->n_blocks, 1); /* bit 1 free stack, bit 2 LRU, bit 4 index */
    if (!refs || !where) {
        free(refs);
        free(where);
        if (why && cap) snprintf(why, cap, "kv check: out of memory");
        return -1;
    }
#define KV_BAD(...)                                                    \
    do {                                                               \
        if (!bad++ && why && cap) snprintf(why, cap, __VA_ARGS__);     \
    } while (0)
    for (int s = 0; s < kv->n_seq; s++) {
        const cm_kv_seq *q = &kv->seqs[s];
        if (!q->open) {
            if (q->n_blocks) KV_BAD("closed sequence %d holds %d blocks", s, q->n_blocks);
            continue;
        }
        if (q->n_blocks < (q->len + CM_KV_BLOCK - 1) / CM_KV_BLOCK || q->n_blocks > kv->max_blocks)
            KV_BAD("sequence %d: %d blocks for %d positions", s, q->n_blocks, q->len);
        for (int i = 0; i < q->n_blocks && i < kv->max_blocks; i++) {
            int32_t b = q->blocks[i];
            if (b < 0 || b >= kv->n_blocks) KV_BAD("sequence %d: block id %d", s, b);
            else refs[b]++;
        }
    }
    for (int i = 0; i < kv->n_free; i++) {
        int32_t b = kv->free_ids[i];
        if (b < 0 || b >= kv->n_blocks || where[b] & 1) { KV_BAD("free stack entry %d: block %d", i, b); continue; }
        where[b] |= 1;
    }
    if (kv->cache_on) {
        int n = 0;
        for (int32_t b = kv->lru_head; b >= 0 && n <= kv->n_blocks; b = kv->lru_next[b], n++) where[b] |= 2;
        if (n != kv->n_lru) KV_BAD("LRU list has %d blocks, count says %d", n, kv->n_lru);
        for (uint32_t k = 0; k < kv->n_buckets; k++)
            for (int32_t b = kv->pbuckets[k], m = 0; b >= 0 && m <= kv->n_blocks; b = kv->pnext[b], m++) {
                if (where[b] & 8 || parent_bucket(kv, b) != k || !kv->reg[b]) KV_BAD("parent index: block %d misfiled", b);
                where[b] |= 8;
            }
        for (uint32_t k = 0; k < kv->n_buckets; k++)
            for (int32_t b = kv->buckets[k], m = 0; b >= 0 && m <= kv->n_blocks; b = kv->hnext[b], m++) {
                if (where[b] & 4 || (kv->hash[b] & (kv->n_buckets - 1)) != k || !kv->reg[b])
                    KV_BAD("index: block %d misfiled", b);
                where[b] |= 4;
            }
    }
    int shared = 0;
    for (int32_t b = 0; b < kv->n_blocks; b++) {
        int in_free = where[b] & 1, in_lru = where[b] & 2, in_index = (where[b] & 8) && ((where[b] & 4) || kv->tail_n[b]);
        int reg = kv->cache_on && kv->reg[b];
        if (refs[b] != kv->refcount[b])
            KV_BAD("block %d: refcount %u, held by %u tables", b, kv->refcount[b], refs[b]);
        if (reg != (in_index != 0)) KV_BAD("block %d: registered %d, in index %d", b, reg, in_index != 0);
        if (kv->refcount[b] > 0 && (in_free || in_lru)) KV_BAD("block %d: held and also free or cached", b);
        if (kv->refcount[b] == 0 && (in_free != 0) + (in_lru != 0) != 1)
            KV_BAD("block %d: unheld, on free stack %d, on LRU %d (leaked if neither)", b, in_free != 0, in_lru != 0);
        if (in_lru && !reg) KV_BAD("block %d: cached but not registered", b);
        if (kv->cache_on && kv->tail_n[b] && (!reg || kv->refcount[b])) KV_BAD("block %d: a tail, held or unregistered", b);
        shared += kv->refcount[b] > 1;
    }
    if (shared != kv->n_shared) KV_BAD("%d blocks are shared, the counter says %d", shared, kv->n_shared);
#undef KV_BAD
    free(refs);
    free(where);
    return bad;
}
