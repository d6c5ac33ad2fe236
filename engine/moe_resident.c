/*
 * moe_resident.c - how many experts of each MoE layer stay in memory (cm_ctx_params.experts_resident).
 * Expert weights are views into the read-only mapping of the model file, paged in as they are first
 * read. With a limit N, after each layer's products the experts that ran are the most recently used of
 * that layer; once more than N of its experts are resident, the least recently used ones (ties: the lower
 * index) have their pages released with madvise(MADV_DONTNEED): they are unmapped from this mapping (the
 * process's Rss falls at once) and left to the page cache, from which the kernel reclaims them under
 * pressure and a later use faults them back. Not MADV_PAGEOUT nor MADV_COLD: with the page cache in large
 * folios (Linux 6.x) both work on whole folios, which an expert's pages rarely cover: PAGEOUT then skips
 * most of them (measured on 6.18: an expert's 28 KiB kept its pages), and COLD splits the folio, which
 * unmaps it from every mapping of the file, so another model instance over the same file lost its
 * resident pages too (measured: a pool of two instances, the unrestricted one fell from 12.8 MB to 0.4 MB).
 * DONTNEED touches this mapping's page tables only. An expert that runs again is paged back in by the
 * mapping, so the weights read are the file's either way and the results never depend on the limit;
 * only time (page faults, disk reads once the kernel has reclaimed the pages) and memory do.
 *
 * Only whole pages inside an expert's byte range are released (a page shared with a neighbour stays), and
 * only pages of the file mapping: a weight held elsewhere (a buffer, a copy) is never touched. The state
 * is one context's: it runs on the thread that calls cm_forward, after the layer's products have ended.
 */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "model.h"
#include "moe.h"
#include "util.h"

struct cm_moe_resident {
    int n_layer, n_exp, keep;
    uintptr_t map_lo, map_hi;  /* the file mapping: [lo, hi) */
    size_t page;
    uint64_t tick;             /* layer steps noted */
    uint64_t *last;            /* (n_layer, n_exp) tick of each expert's last use */
    uint8_t *res;              /* (n_layer, n_exp) 1: its pages may be resident (used since released) */
    int *n_res;                /* (n_layer) */
    uint64_t released;         /* expert releases so far */
    const cm_moe_model *mm;
};

/* Releases the whole pages of [p, p + n) that lie in the file mapping. */
static void release_range(cm_moe_resident *r, const void *p, size_t n) {
    uintptr_t lo = (uintptr_t)p, hi = lo + n;
    if (lo < r->map_lo || hi > r->map_hi) return;
    lo = (lo + r->page - 1) & ~(uintptr_t)(r->page - 1);
    hi &= ~(uintptr_t)(r->page - 1);
    if (hi <= lo) return;
    (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

static void release_expert(cm_moe_resident *r, int il, int e) {
    const cm_moe_model *mm = r->mm;
    const cm_moe_layer *l = &mm->layers[il];
    const cm_moe_expert *x = e < mm->n_tok ? &l->tok[e] : &l->seg[e - mm->n_tok];
    int64_t D = mm->d, F = mm->f_exp;
    release_range(r, x->gate, (size_t)gguf_row_bytes(x->gate_type, D) * (size_t)F);  /* (F, D) */
    release_range(r, x->up, (size_t)gguf_row_bytes(x->up_type, D) * (size_t)F);      /* (F, D) */
    release_range(r, x->down, (size_t)gguf_row_bytes(x->down_type, F) * (size_t)D); /* (D, F) */
    r->res[(size_t)il * r->n_exp + e] = 0;
    r->n_res[il]--;
    r->released++;
}

int cm_moe_resident_create(const cm_model *m, const cm_moe_model *mm, int keep, cm_moe_resident **out, cm_err *err) {
    *out = NULL;
    if (keep <= 0 || !mm || (mm->kind != CM_MOE_HYBRID && mm->kind != CM_MOE_SPARSE)) return CM_OK;
    cm_moe_resident *r = calloc(1, sizeof *r);
    size_t cells = (size_t)mm->n_layer * (size_t)(mm->n_tok + mm->n_seg);
    if (r) {
        r->last = calloc(cells, sizeof *r->last);
        r->res = calloc(cells, 1);
        r->n_res = calloc((size_t)mm->n_layer, sizeof *r->n_res);
    }
    if (!r || !r->last || !r->res || !r->n_res) {
        cm_moe_resident_free(r);
        return cm_err_set(err, CM_E_NOMEM, "ctx: out of memory for expert residency");
    }
    r->mm = mm;
    r->n_layer = mm->n_layer;
    r->n_exp = mm->n_tok + mm->n_seg;
    r->keep = keep;
    long page = sysconf(_SC_PAGESIZE);
    r->page = page > 0 ? (size_t)page : 4096;
    /* a model read from memory (gguf_open_mem) has no mapping to release: the policy only counts */
    if (m->gguf.owns_map && m->gguf.map) {
        r->map_lo = (uintptr_t)m->gguf.map;
        r->map_hi = r->map_lo + (uintptr_t)m->gguf.size;
    }
    /* start from nothing resident: whatever loading or an earlier context touched goes */
    for (int il = 0; il < r->n_layer; il++)
        for (int e = 0; e < r->n_exp; e++) {
            r->res[(size_t)il * r->n_exp + e] = 1;
            r->n_res[il]++;
            release_expert(r, il, e);
        }
    r->released = 0;
    *out = r;
    return CM_OK;
}

void cm_moe_resident_free(cm_moe_resident *r) {
    if (!r) return;
    free(r->last);
    free(r->res);
    free(r->n_res);
    free(r);
}

void cm_moe_resident_note(cm_moe_resident *r, int il, const int32_t *g_start) {
    if (!r) return;
    uint64_t now = ++r->tick;
    uint64_t *last = r->last + (size_t)il * r->n_exp;
    uint8_t *res = r->res + (size_t)il * r->n_exp;
    for (int e = 0; e < r->n_exp; e++) {
        if (g_start[e + 1] == g_start[e]) continue;
        last[e] = now;
        if (!res[e]) { res[e] = 1; r->n_res[il]++; }
    }
    while (r->n_res[il] > r->keep) {
        int victim = -1;
        for (int e = 0; e < r->n_exp; e++)
            if (res[e] && (victim < 0 || last[e] < last[victim])) victim = e;
        release_expert(r, il, victim);
    }
}

void cm_moe_resident_stats(const cm_moe_resident *r, int *max_resident, uint64_t *released) {
    *max_resident = 0;
    *released = 0;
    if (!r) return;
    for (int il = 0; il < r->n_layer; il++)
        if (r->n_res[il] > *max_resident) *max_resident = r->n_res[il];
    *released = r->released;
}
