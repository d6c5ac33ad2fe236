/*
 * moe.c - the mixture-of-experts FFNs at run time: routing, grouped expert products, MoLE adapters,
 * per-sequence state (causal window pooling, fence trackers, options) and routing statistics.
 *
 * Hybrid layer, for N batch tokens (see moe.h for the call order; a sparse qwen3moe layer is the same
 * without segment level, shared expert or fusion weights):
 *   1. route: per token, p = softmax(W_tok x) -> k experts and gates (a_tok folded in); segment level
 *      causal: the sequence's running window pool (max, or sum in double for mean) -> q -> top-c
 *      experts (route "previous": the pool of the last complete window; none in window 0); reference: per sequence, windows -> q (P, N_seg) -> greedy expert choice. Every routed
 *      (token, expert, gate) is a "slot".
 *   2. group: slots sorted by expert (counting sort; tokens keep batch order inside a group), the
 *      tokens' rows gathered into xg (R, D).
 *   3. one pool run for every group's gate and up products, silu*up, one pool run for every down
 *      product: only selected experts are computed, each on exactly its tokens.
 *   4. scatter: y[t] = sum over t's slots, in expert order, of gate * out_row. The order is per token,
 *      so a token's result does not depend on what else is in the batch.
 * Products with enough rows go through a GEMM (the int8 one from cm_gemm_q_min_rows of the weight type,
 * sgemm from MM_GEMM_ROWS), smaller ones through the matvec kernels: decode touches each active expert's
 * weights once. With int8 activations on (the default; forward.c's
 * CODEMOE_EXACT_ACTIVATIONS=1 turns them off), a quantised weight's rows meet their inputs quantised to
 * its paired format, through the int8 GEMM (gemm_q8.c) and the int8 matvec, as the dense layers do:
 * both take the same cm_qacc dot, so a token's products do not depend on which other tokens its experts
 * took. Float weights, and all weights with exact activations, go through OpenBLAS sgemm on
 * dequantised tiles and the f32 matvec.
 * MoLE: the base projections are forward.c's (once for the batch); each adapter with tokens gathers
 * them, runs T = X A^T (n_a, r), Y = T B^T, and adds scale * Y back, in adapter order per token.
 * Everything is allocated at cm_moe_ctx_create.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "moe.h"
#include "threadpool.h"
#include "util.h"

#define MM_GEMM_ROWS 16
#define MM_DEQ_FLOATS (1 << 19) /* per-thread dequantisation tile */
#define MM_MAX_OPS (4 * CM_MOE_MAX_EXPERTS + 8)
#define MOLE_GROUP 2 /* MoLE: adapters whose rows share one pool run (scratch: MOLE_GROUP x batch rows) */

typedef struct moe_seq {
    cm_seq_options opt;
    int sealed;          /* reference mode: scored; no more tokens */
    cm_fence fence;
    /* causal segment state per layer: positions of the current window seen so far and their pool;
     * route "previous" also the descriptor of the last complete window (valid from position w on) */
    int *win_n;          /* (n_layer) */
    float *pool_max;     /* (n_layer, D) */
    double *pool_sum;    /* (n_layer, D) */
    float *prev_desc;    /* (n_layer, D), route "previous" only */
    cm_routing r;
    cm_route_count *tok, *seg, *adapter;
    uint32_t *seg_windows;
    /* per-token detail (cm_moe_seq_tokens_enable): rows for positions 0..cap-1, allocated when enabled,
     * written in place during cm_forward; det.n_tokens and det.n_dropped follow det_hi */
    int det_cap, det_hi;
    void *det_mem;        /* one allocation carved into the arrays of det */
    cm_route_tokens det;
} moe_seq;

typedef struct mm_op {
    const void *w;
    int wtype;
    int64_t m, k;  /* W (m, k) */
    const float *x;/* (n, k) */
    int n;
    float *y;      /* (n, m) */
    int task0;
    int xt;        /* int8 activations: x's rows in format xt at xq (xq_stride bytes apart); -1: f32 x */
    const void *xq;
    size_t xq_stride;
} mm_op;

struct cm_moe_ctx {
    const cm_model *m;
    const cm_moe_model *mm;
    cm_pool *pool;
    int n_threads, n_seq_max, n_ctx, B, D, n_layer, stats_on, n_win;
    moe_seq *seqs;
    /* batch */
    const cm_batch *b;
    const int32_t *pos;
    unsigned char *const *snap; /* (n) where to store the sequence's state after this token, or NULL */
    int n;
    uint64_t *sets;       /* (B) MoLE adapter mask per token */
    int8_t *gen;          /* (B) 1: generated token */
    /* routing slots: S per token */
    int S;
    int *n_slot;          /* (B) */
    int16_t *slot_e;      /* (B, S) global expert index: token experts 0..n_tok-1, then segment experts */
    float *slot_g;        /* (B, S) gate with the fusion weight folded in */
    float *rlog;          /* (B, max(n_tok, n_seg)) router outputs */
    float *desc;          /* (max(B, P), D) window descriptors */
    int32_t *ref_idx;     /* (B) batch indices of one reference-mode sequence */
    double *ref_q;        /* (B, N_seg) reference mode: q of each window */
    /* grouping */
    int rows_max;
    int32_t *g_start;     /* (n_tok + n_seg + 1) */
    int32_t *g_tok;       /* (rows_max) token of each row */
    float *xg;            /* (rows_max, max(D, F)) gathered inputs */
    float *hg, *hu;       /* (rows_max, F) */
    float *yd;            /* (rows_max, D) */
    int32_t *row_of_slot; /* (B, S) */
    float *lt;            /* (B, 2 * max_rank) LoRA low-rank activations */
    float *deq;           /* (n_threads, deq_floats) */
    int64_t deq_floats;   /* per thread: MM_DEQ_FLOATS, or the int8 GEMM's scratch if larger */
    int int8_act;         /* quantised weights meet int8 activations (forward.c decides) */
    unsigned char *xq;    /* (xq_bytes) the current run's inputs in int8 formats; NULL without int8_act */
    size_t xq_bytes, xq_used;
    cm_moe_trace_fn trace;
    void *trace_ud;
    cm_moe_resident *resident; /* owned; NULL: every expert stays as paged in */
    char *tokbuf;         /* the longest token's bytes (fence tracking) */
    int tokbuf_cap;
    /* one grouped product run */
    int n_ops;
    mm_op ops[MM_MAX_OPS];
    int64_t chunk;
};

/* ============================================================ grouped products */

static void mm_task(void *arg, int task, int thread) {
    cm_moe_ctx *mc = arg;
    int o = 0;
    while (o + 1 < mc->n_ops && task >= mc->ops[o + 1].task0) o++;
    const mm_op *op = &mc->ops[o];
    int64_t r0 = (int64_t)(task - op->task0) * mc->chunk, r1 = r0 + mc->chunk;
    if (r1 > op->m) r1 = op->m;
    if (op->xt >= 0 && op->n >= cm_gemm_q_min_rows(op->wtype)) {
        cm_gemm_q(op->wtype, op->w, op->k, op->xq, op->xq_stride, op->n, op->y, op->m, r0, r1,
                  mc->deq + (size_t)thread * (size_t)mc->deq_floats, (size_t)mc->deq_floats * sizeof(float));
        return;
    }
    if (op->xt >= 0 || op->n < MM_GEMM_ROWS) {
        if (op->xt >= 0)
            cm_matvec_rows(op->wtype, op->xt, op->w, op->k, op->xq, op->xq_stride, op->n, op->y, op->m, r0, r1);
        else
            cm_matvec_rows(op->wtype, GGUF_TT_F32, op->w, op->k, op->x, (size_t)op->k * sizeof(float), op->n, op->y,
                           op->m, r0, r1);
        return;
    }
    size_t rb = gguf_row_bytes(op->wtype, op->k);
    float *t = mc->deq + (size_t)thread * (size_t)mc->deq_floats;
    /* tiles of W rows that fit the scratch */
    int64_t tile = MM_DEQ_FLOATS / op->k;
    if (tile < 1) tile = 1;
    for (int64_t a = r0; a < r1; a += tile) {
        int64_t e = a + tile < r1 ? a + tile : r1;
        const float *bw;
        if (op->wtype == GGUF_TT_F32) {
            bw = (const float *)op->w + a * op->k;
        } else {
            for (int64_t r = a; r < e; r++)
                cm_dequantize_row(op->wtype, (const char *)op->w + (size_t)r * rb, t + (r - a) * op->k, op->k);
            bw = t;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, op->n, (int)(e - a), (int)op->k, 1.0f, op->x,
                    (int)op->k, bw, (int)op->k, 0.0f, op->y + a, (int)op->m);
    }
}

static void mm_begin(cm_moe_ctx *mc) {
    mc->n_ops = 0;
    mc->xq_used = 0;
}

static void mm_add(cm_moe_ctx *mc, const void *w, int wtype, int64_t m, int64_t k, const float *x, int n, float *y) {
    if (n <= 0) return;
    mm_op *op = &mc->ops[mc->n_ops++];
    *op = (mm_op){w, wtype, m, k, x, n, y, 0, -1, NULL, 0};
    int xt = mc->int8_act ? cm_quant_vec_dot_type(wtype) : -1;
    if (xt < 0) return;
    size_t rb = cm_vec_row_bytes(xt, k);
    const mm_op *prev = mc->n_ops > 1 ? op - 1 : NULL;
    if (prev && prev->xt == xt && prev->x == x && prev->k == k && prev->n == n) { /* gate and up share x */
        op->xt = xt, op->xq = prev->xq, op->xq_stride = rb;
        return;
    }
    if (mc->xq_used + (size_t)n * rb > mc->xq_bytes) return; /* cannot happen (sized at create): stays f32 */
    unsigned char *q = mc->xq + mc->xq_used;
    mc->xq_used += (size_t)n * rb;
    for (int r = 0; r < n; r++) cm_vec_prepare(xt, x + (size_t)r * k, q + (size_t)r * rb, k);
    op->xt = xt, op->xq = q, op->xq_stride = rb;
}

static void mm_go(cm_moe_ctx *mc) {
    if (!mc->n_ops) return;
    int64_t rows = 0, mmax = 0;
    for (int i = 0; i < mc->n_ops; i++) {
        rows += mc->ops[i].m;
        if (mc->ops[i].m > mmax) mmax = mc->ops[i].m;
    }
    int nt = mc->n_threads;
    int64_t chunk = nt == 1 ? mmax : (rows + 4 * nt - 1) / (4 * nt);
    chunk = (chunk + 15) & ~(int64_t)15;
    if (chunk < 16) chunk = 16;
    mc->chunk = chunk;
    int t = 0;
    for (int i = 0; i < mc->n_ops; i++) {
        mc->ops[i].task0 = t;
        t += (int)((mc->ops[i].m + chunk - 1) / chunk);
    }
    cm_pool_run(mc->pool, mm_task, mc, t);
}

/* ============================================================ create / free */

static int max_token_bytes(const cm_model *m) {
    int mx = 16;
    for (int i = 0; i < cm_model_get_info(m)->n_vocab; i++) {
        int n = cm_token_bytes(m, i, 0, NULL, 0);
        if (n > mx) mx = n;
    }
    return mx;
}

cm_moe_ctx *cm_moe_ctx_create(const cm_model *m, const cm_moe_model *mm, cm_pool *pool, int n_threads,
                              int n_seq_max, int n_ctx, int n_batch_max, int int8_act, cm_err *err) {
    cm_moe_ctx *mc = calloc(1, sizeof *mc);
    if (!mc) {
        cm_err_set(err, CM_E_NOMEM, "ctx: out of memory");
        return NULL;
    }
    mc->m = m;
    mc->mm = mm;
    mc->pool = pool;
    mc->n_threads = n_threads;
    mc->n_seq_max = n_seq_max;
    mc->n_ctx = n_ctx;
    mc->B = n_batch_max;
    mc->D = mm->d;
    mc->n_layer = mm->n_layer;
    mc->stats_on = 1;
    size_t B = (size_t)n_batch_max, D = (size_t)mm->d, L = (size_t)mm->n_layer;
    int fail = 0;
#define ALLOC(p, n) do { size_t n_ = (n); (p) = calloc(n_ + 1, sizeof *(p)); fail |= !(p); } while (0)
    ALLOC(mc->seqs, (size_t)n_seq_max);
    ALLOC(mc->sets, B);
    ALLOC(mc->gen, B);
    if (mm->kind != CM_MOE_MOLE) { /* hybrid and sparse */
        int segs = mm->n_seg ? (mm->seg_causal_top > mm->bucket ? mm->seg_causal_top : mm->bucket) : 0;
        if (segs > mm->n_seg) segs = mm->n_seg;
        mc->S = mm->k_used + segs;
        int nr = mm->n_tok > mm->n_seg ? mm->n_tok : mm->n_seg;
        mc->rows_max = (int)B * mc->S;
        mc->n_win = mm->n_seg ? (n_ctx + mm->window - 1) / mm->window : 0;
        size_t F = (size_t)mm->f_exp, R = (size_t)mc->rows_max;
        ALLOC(mc->n_slot, B);
        ALLOC(mc->slot_e, B * (size_t)mc->S);
        ALLOC(mc->slot_g, B * (size_t)mc->S);
        ALLOC(mc->row_of_slot, B * (size_t)mc->S);
        ALLOC(mc->rlog, B * (size_t)nr);
        ALLOC(mc->desc, B * D);
        ALLOC(mc->ref_idx, B);
        ALLOC(mc->ref_q, B * (size_t)mm->n_seg);
        ALLOC(mc->g_start, (size_t)(mm->n_tok + mm->n_seg + 1));
        ALLOC(mc->g_tok, R);
        ALLOC(mc->xg, R * D);
        ALLOC(mc->hg, R * F);
        ALLOC(mc->hu, R * F);
        ALLOC(mc->yd, R * D);
    } else {
        size_t F = (size_t)mm->n_ff, K = D > F ? D : F;
        size_t R = B * (size_t)(mm->n_adapters < MOLE_GROUP ? (mm->n_adapters ? mm->n_adapters : 1) : MOLE_GROUP);
        mc->rows_max = (int)R;
        ALLOC(mc->g_tok, R);
        ALLOC(mc->xg, R * K);
        ALLOC(mc->hg, R * K);
        ALLOC(mc->hu, R * K);
        ALLOC(mc->lt, R * 2 * (size_t)mm->max_rank);
    }
    {
        /* the widest input a product has (D, the expert or MoLE width) and the rows one run holds */
        size_t F = mm->kind != CM_MOE_MOLE ? (size_t)mm->f_exp : (size_t)mm->n_ff, K = D > F ? D : F;
        mc->deq_floats = MM_DEQ_FLOATS;
        if ((int64_t)(cm_gemm_q_scratch_bytes((int64_t)K) / sizeof(float)) + 1 > mc->deq_floats)
            mc->deq_floats = (int64_t)(cm_gemm_q_scratch_bytes((int64_t)K) / sizeof(float)) + 1;
        ALLOC(mc->deq, (size_t)n_threads * (size_t)mc->deq_floats);
        mc->int8_act = int8_act;
        if (int8_act) { /* every op of a run its own rows, twice over if gate and up pair differently */
            size_t rb = cm_vec_row_bytes(GGUF_TT_Q8_0, (int64_t)K);
            if (cm_vec_row_bytes(GGUF_TT_Q8_1, (int64_t)K) > rb) rb = cm_vec_row_bytes(GGUF_TT_Q8_1, (int64_t)K);
            if (cm_vec_row_bytes(GGUF_TT_Q8_K, (int64_t)K) > rb) rb = cm_vec_row_bytes(GGUF_TT_Q8_K, (int64_t)K);
            mc->xq_bytes = 2 * (size_t)mc->rows_max * rb;
            ALLOC(mc->xq, mc->xq_bytes);
        }
    }
    for (int s = 0; s < n_seq_max && !fail; s++) {
        moe_seq *q = &mc->seqs[s];
        cm_routing *r = &q->r;
        r->n_layer = mm->n_layer;
        if (mm->kind != CM_MOE_MOLE) {
            r->n_tok_experts = mm->n_tok;
            r->shared_expert = mm->shared;
            r->n_seg_experts = mm->n_seg;
            r->window = mm->window;
            r->n_windows = mc->n_win;
            ALLOC(q->tok, L * (size_t)mm->n_tok);
            if (mm->kind == CM_MOE_HYBRID) { /* a sparse MoE has no segment level and no window state */
                ALLOC(q->seg, L * (size_t)mm->n_seg);
                ALLOC(q->seg_windows, L * (size_t)mm->n_seg * (size_t)mc->n_win);
                ALLOC(q->win_n, L);
                if (mm->pooling == CM_POOL_MAX) ALLOC(q->pool_max, L * D);
                else ALLOC(q->pool_sum, L * D);
                if (mm->route == CM_SEGMENT_ROUTE_PREVIOUS) ALLOC(q->prev_desc, L * D);
            }
        } else {
            r->n_adapters = mm->n_adapters;
            ALLOC(q->adapter, (size_t)mm->n_adapters);
        }
        r->tok = q->tok;
        r->seg = q->seg;
        r->seg_windows = q->seg_windows;
        r->adapter = q->adapter;
        cm_seq_options_default(&q->opt);
    }
#undef ALLOC
    if (fail) {
        cm_moe_ctx_free(mc);
        cm_err_set(err, CM_E_NOMEM, "ctx: cannot allocate mixture-of-experts state");
        return NULL;
    }
    if (mm->kind == CM_MOE_MOLE) {
        /* fence tracking reads each token's bytes: a buffer for the longest */
        int mx = max_token_bytes(m);
        mc->tokbuf = malloc((size_t)mx + 1);
        mc->tokbuf_cap = mx + 1;
        if (!mc->tokbuf) {
            cm_moe_ctx_free(mc);
            cm_err_set(err, CM_E_NOMEM, "ctx: out of memory");
            return NULL;
        }
    }
    return mc;
}

void cm_moe_ctx_free(cm_moe_ctx *mc) {
    if (!mc) return;
    cm_moe_resident_free(mc->resident);
    for (int s = 0; mc->seqs && s < mc->n_seq_max; s++) {
        moe_seq *q = &mc->seqs[s];
        free(q->tok);
        free(q->seg);
        free(q->seg_windows);
        free(q->adapter);
        free(q->win_n);
        free(q->pool_max);
        free(q->pool_sum);
        free(q->prev_desc);
        free(q->det_mem);
    }
    free(mc->seqs);
    free(mc->sets);
    free(mc->gen);
    free(mc->n_slot);
    free(mc->slot_e);
    free(mc->slot_g);
    free(mc->row_of_slot);
    free(mc->rlog);
    free(mc->desc);
    free(mc->ref_idx);
    free(mc->ref_q);
    free(mc->g_start);
    free(mc->g_tok);
    free(mc->xg);
    free(mc->hg);
    free(mc->hu);
    free(mc->yd);
    free(mc->lt);
    free(mc->deq);
    free(mc->xq);
    free(mc->tokbuf);
    free(mc);
}

/* ============================================================ sequences and options */

void cm_seq_options_default(cm_seq_options *o) {
    if (!o) return;
    o->segment_mode = CM_SEGMENT_DEFAULT;
    o->adapter_routing = CM_ADAPTERS_AUTO;
    o->language = -1;
}

void cm_moe_routing_reset(cm_moe_ctx *mc, int seq) {
    moe_seq *q = &mc->seqs[seq];
    const cm_moe_model *mm = mc->mm;
    size_t L = (size_t)mm->n_layer;
    if (q->tok) memset(q->tok, 0, L * (size_t)mm->n_tok * sizeof *q->tok);
    if (q->seg) memset(q->seg, 0, L * (size_t)mm->n_seg * sizeof *q->seg);
    if (q->seg_windows) memset(q->seg_windows, 0, L * (size_t)mm->n_seg * (size_t)mc->n_win * sizeof *q->seg_windows);
    if (q->adapter) memset(q->adapter, 0, (size_t)mm->n_adapters * sizeof *q->adapter);
}

static void seq_state_reset(cm_moe_ctx *mc, moe_seq *q) {
    q->sealed = 0;
    if (q->win_n) memset(q->win_n, 0, (size_t)mc->n_layer * sizeof *q->win_n);
    /* unread before window 1, but a snapshot taken in window 0 copies it: no earlier sequence's bytes */
    if (q->prev_desc) memset(q->prev_desc, 0, (size_t)mc->n_layer * (size_t)mc->D * sizeof *q->prev_desc);
    cm_fence_init(&q->fence);
}

void cm_moe_seq_open(cm_moe_ctx *mc, int seq) {
    moe_seq *q = &mc->seqs[seq];
    cm_moe_seq_close(mc, seq);
    cm_seq_options_default(&q->opt);
    seq_state_reset(mc, q);
    cm_moe_routing_reset(mc, seq);
}

static int seg_mode(const cm_moe_ctx *mc, const moe_seq *q) {
    return q->opt.segment_mode == CM_SEGMENT_DEFAULT ? mc->mm->mode_default : q->opt.segment_mode;
}

/* ------------------------------------------------------------ snapshots
 *
 * A sequence's routing state after a position, as stored at the end of each KV block (kv.h "extra"):
 *   cm_fence | win_n (n_layer ints) | pool (n_layer, D) floats (max pooling) or doubles (mean)
 *   [| prev_desc (n_layer, D) floats: route "previous" only]
 * each part 8-byte aligned. It is all the state a causal hybrid or AUTO MoLE sequence carries beyond
 * its KV rows, so a sequence restored from a block's snapshot continues exactly as the one that
 * wrote it. */
#define SNAP_ALIGN(x) (((x) + 7) & ~(size_t)7)

static size_t snap_win_off(void) { return SNAP_ALIGN(sizeof(cm_fence)); }
static size_t snap_pool_off(const cm_moe_model *mm) {
    return snap_win_off() + SNAP_ALIGN((size_t)mm->n_layer * sizeof(int));
}

static size_t snap_prev_off(const cm_moe_model *mm) {
    size_t el = mm->kind == CM_MOE_HYBRID ? (mm->pooling == CM_POOL_MAX ? sizeof(float) : sizeof(double)) : 0;
    return snap_pool_off(mm) + SNAP_ALIGN((size_t)mm->n_layer * (size_t)mm->d * el);
}

static int route_previous(const cm_moe_model *mm) {
    return mm->kind == CM_MOE_HYBRID && mm->n_seg && mm->route == CM_SEGMENT_ROUTE_PREVIOUS;
}

size_t cm_moe_snapshot_bytes(const cm_moe_model *mm) {
    size_t prev = route_previous(mm) ? (size_t)mm->n_layer * (size_t)mm->d * sizeof(float) : 0;
    return snap_prev_off(mm) + SNAP_ALIGN(prev);
}

/* Layer il's causal window state of q into a snapshot. */
static void snap_put_layer(const cm_moe_ctx *mc, const moe_seq *q, int il, unsigned char *snap) {
    const cm_moe_model *mm = mc->mm;
    size_t D = (size_t)mc->D;
    memcpy(snap + snap_win_off() + (size_t)il * sizeof(int), &q->win_n[il], sizeof(int));
    if (mm->pooling == CM_POOL_MAX)
        memcpy(snap + snap_pool_off(mm) + (size_t)il * D * sizeof(float), q->pool_max + il * D, D * sizeof(float));
    else
        memcpy(snap + snap_pool_off(mm) + (size_t)il * D * sizeof(double), q->pool_sum + il * D, D * sizeof(double));
    if (q->prev_desc)
        memcpy(snap + snap_prev_off(mm) + (size_t)il * D * sizeof(float), q->prev_desc + il * D, D * sizeof(float));
}

static void snap_get(cm_moe_ctx *mc, moe_seq *q, const unsigned char *snap) {
    const cm_moe_model *mm = mc->mm;
    size_t L = (size_t)mc->n_layer, D = (size_t)mc->D;
    if (mm->kind == CM_MOE_MOLE) memcpy(&q->fence, snap, sizeof q->fence);
    if (mm->kind != CM_MOE_HYBRID || !mm->n_seg) return;
    memcpy(q->win_n, snap + snap_win_off(), L * sizeof(int));
    if (mm->pooling == CM_POOL_MAX) memcpy(q->pool_max, snap + snap_pool_off(mm), L * D * sizeof(float));
    else memcpy(q->pool_sum, snap + snap_pool_off(mm), L * D * sizeof(double));
    if (q->prev_desc) memcpy(q->prev_desc, snap + snap_prev_off(mm), L * D * sizeof(float));
}

void cm_moe_seq_snapshot(const cm_moe_ctx *mc, int seq, unsigned char *snap) {
    const moe_seq *q = &mc->seqs[seq];
    memcpy(snap, &q->fence, sizeof q->fence);
    if (mc->mm->kind == CM_MOE_HYBRID)
        for (int il = 0; il < mc->n_layer; il++) snap_put_layer(mc, q, il, snap);
}

void cm_moe_seq_restore(cm_moe_ctx *mc, int seq, const unsigned char *snap) {
    moe_seq *q = &mc->seqs[seq];
    seq_state_reset(mc, q);
    if (snap) snap_get(mc, q, snap);
}

void cm_moe_seq_copy(cm_moe_ctx *mc, int dst, int src) {
    moe_seq *d = &mc->seqs[dst];
    const moe_seq *s = &mc->seqs[src];
    size_t L = (size_t)mc->n_layer, D = (size_t)mc->D;
    d->opt = s->opt;
    d->sealed = s->sealed;
    d->fence = s->fence;
    if (s->win_n) memcpy(d->win_n, s->win_n, L * sizeof *s->win_n);
    if (s->pool_max) memcpy(d->pool_max, s->pool_max, L * D * sizeof *s->pool_max);
    if (s->pool_sum) memcpy(d->pool_sum, s->pool_sum, L * D * sizeof *s->pool_sum);
    if (s->prev_desc) memcpy(d->prev_desc, s->prev_desc, L * D * sizeof *s->prev_desc);
    cm_moe_routing_reset(mc, dst);
}

int cm_moe_seq_cache_salt(const cm_moe_ctx *mc, int seq, uint64_t *salt) {
    const cm_moe_model *mm = mc->mm;
    const moe_seq *q = &mc->seqs[seq];
    if (mm->kind != CM_MOE_MOLE) {
        if (mm->n_seg && seg_mode(mc, q) == CM_SEGMENT_REFERENCE) return 0; /* depends on the whole request */
        *salt = 1;
        return 1;
    }
    if (q->opt.adapter_routing == CM_ADAPTERS_BATCH) return 0; /* sets come from the caller */
    /* AUTO: each token's set follows from the tokens before it and the request language */
    *salt = 2 + (uint64_t)q->opt.adapter_routing + ((uint64_t)(q->opt.language + 1) << 8);
    return 1;
}

/* Positions of an earlier block end can be restored from the block's snapshot (the caller passes it);
 * reference-mode sequences were scored whole and only go back to 0. */
int cm_moe_seq_truncate_check(const cm_moe_ctx *mc, int seq, int len, int n, cm_err *err) {
    const moe_seq *q = &mc->seqs[seq];
    if (n == 0 || n == len || mc->mm->kind == CM_MOE_SPARSE) return CM_OK; /* sparse: no state beyond K/V */
    if (q->sealed)
        return cm_err_set(err, CM_E_UNSUPPORTED, "seq: a reference-mode sequence can be truncated only to 0 or its "
                          "length (%d -> %d)", len, n);
    if (n % CM_KV_BLOCK_TOKENS == 0) return CM_OK;
    return cm_err_set(err, CM_E_UNSUPPORTED,
                      "seq: a %s sequence can be truncated only to 0, its length, or a multiple of %d (%d -> %d): its "
                      "routing state (window pool, code fences) is kept at block ends only; re-prefill instead",
                      mc->mm->kind == CM_MOE_HYBRID ? "hybrid-MoE" : "MoLE", CM_KV_BLOCK_TOKENS, len, n);
}

static void det_clear(cm_moe_ctx *mc, moe_seq *q, int p0, int p1);

void cm_moe_seq_truncate(cm_moe_ctx *mc, int seq, int len, int n, const unsigned char *snap) {
    if (n == len) return;
    moe_seq *q = &mc->seqs[seq];
    if (q->det_hi > n) { /* forgotten positions leave the detail */
        det_clear(mc, q, n, q->det_hi);
        q->det_hi = n;
    }
    cm_moe_seq_restore(mc, seq, n == 0 ? NULL : snap);
}

int cm_moe_seq_set_options(cm_moe_ctx *mc, int seq, int len, const cm_seq_options *o, cm_err *err) {
    if (!o) return cm_err_set(err, CM_E_INVAL, "seq: no options");
    if (len != 0) return cm_err_set(err, CM_E_INVAL, "seq: options can change only while sequence %d is empty", seq);
    if (o->segment_mode < CM_SEGMENT_DEFAULT || o->segment_mode > CM_SEGMENT_REFERENCE)
        return cm_err_set(err, CM_E_INVAL, "seq: segment_mode %d (0 default, 1 causal, 2 reference)", o->segment_mode);
    if (o->adapter_routing < CM_ADAPTERS_AUTO || o->adapter_routing > CM_ADAPTERS_NONE)
        return cm_err_set(err, CM_E_INVAL, "seq: adapter_routing %d (0 auto, 1 batch, 2 none)", o->adapter_routing);
    int na = mc->mm->kind == CM_MOE_MOLE ? mc->mm->n_adapters : 0;
    if (o->language < -1 || (o->language >= 0 && o->language >= na))
        return cm_err_set(err, CM_E_RANGE, "seq: language adapter %d out of range (%d adapters)", o->language, na);
    mc->seqs[seq].opt = *o;
    return CM_OK;
}


/* ------------------------------------------------------------ per-token detail
 *
 * Row p of a sequence's detail is position p: written when the position enters a batch (token,
 * generated flag, MoLE set; expert slots cleared to -1), then filled slot by slot as each layer routes
 * it. Positions are independent of batch composition, so a sequence's detail is the same batched or
 * alone. Positions at or past det_cap are counted (det_hi) but not kept. */

static size_t det_row_bytes(int n_layer, int k_tok, int k_seg, int mole) {
    return sizeof(int32_t) + sizeof(int8_t) + (mole ? sizeof(uint64_t) : 0) +
           (size_t)n_layer * (size_t)(k_tok + k_seg) * (sizeof(int16_t) + sizeof(float));
}

/* Rows [p0, p1) back to "not routed": token -1, no experts (positions a prefix-cache attach maps
 * are never fed, so their rows must not keep an earlier run's). */
static void det_clear(cm_moe_ctx *mc, moe_seq *q, int p0, int p1) {
    cm_route_tokens *d = &q->det;
    if (p1 > q->det_cap) p1 = q->det_cap;
    if (p0 >= p1) return;
    size_t nt = (size_t)mc->n_layer * (size_t)d->k_tok, ns = (size_t)mc->n_layer * (size_t)d->k_seg, n = (size_t)(p1 - p0);
    memset((int32_t *)d->token + p0, 0xff, n * sizeof *d->token); /* all bits set: -1 */
    memset((int16_t *)d->tok_expert + (size_t)p0 * nt, 0xff, n * nt * sizeof *d->tok_expert);
    memset((int16_t *)d->seg_expert + (size_t)p0 * ns, 0xff, n * ns * sizeof *d->seg_expert);
    memset((int8_t *)d->generated + p0, 0, n);
    if (d->adapters) memset((uint64_t *)d->adapters + p0, 0, n * sizeof *d->adapters);
}

static void det_begin(cm_moe_ctx *mc, moe_seq *q, int p, int32_t tok, int gen) {
    if (p + 1 > q->det_hi) q->det_hi = p + 1;
    if (p >= q->det_cap) return;
    cm_route_tokens *d = &q->det;
    ((int32_t *)d->token)[p] = tok;
    ((int8_t *)d->generated)[p] = (int8_t)gen;
    size_t nt = (size_t)mc->n_layer * (size_t)d->k_tok, ns = (size_t)mc->n_layer * (size_t)d->k_seg;
    for (size_t k = 0; k < nt; k++) ((int16_t *)d->tok_expert)[(size_t)p * nt + k] = -1;
    for (size_t k = 0; k < ns; k++) ((int16_t *)d->seg_expert)[(size_t)p * ns + k] = -1;
    if (d->adapters) ((uint64_t *)d->adapters)[p] = 0;
}

/* Position p of layer il went to expert e (level 0 token, 1 segment) with gate g: the next free slot. */
static void det_put(cm_moe_ctx *mc, moe_seq *q, int il, int p, int level, int e, double g) {
    if (p >= q->det_cap) return;
    cm_route_tokens *d = &q->det;
    int k = level ? d->k_seg : d->k_tok;
    size_t row = ((size_t)p * (size_t)mc->n_layer + (size_t)il) * (size_t)k;
    int16_t *ex = (int16_t *)(level ? d->seg_expert : d->tok_expert) + row;
    float *gt = (float *)(level ? d->seg_gate : d->tok_gate) + row;
    for (int j = 0; j < k; j++)
        if (ex[j] < 0) {
            ex[j] = (int16_t)e;
            gt[j] = (float)g;
            return;
        }
}

int cm_moe_seq_tokens_enable(cm_moe_ctx *mc, int seq, int n_max, cm_err *err) {
    const cm_moe_model *mm = mc->mm;
    moe_seq *q = &mc->seqs[seq];
    cm_moe_seq_close(mc, seq);
    if (n_max <= 0) return 0;
    int mole = mm->kind == CM_MOE_MOLE;
    int k_tok = mole ? 0 : mm->k_used, k_seg = mole ? 0 : mc->S - mm->k_used;
    size_t row = det_row_bytes(mc->n_layer, k_tok, k_seg, mole);
    size_t cap = CM_ROUTE_TOKENS_MAX_BYTES / row;
    if ((size_t)n_max < cap) cap = (size_t)n_max;
    if (cap > (size_t)mc->n_ctx) cap = (size_t)mc->n_ctx;
    size_t nl = (size_t)mc->n_layer * cap;
    /* arrays by alignment, widest first: adapters (8), gates and tokens (4), expert ids (2), flags (1) */
    size_t o_ad = 0, o_tg = o_ad + (mole ? cap * sizeof(uint64_t) : 0);
    size_t o_sg = o_tg + nl * (size_t)k_tok * sizeof(float), o_tok = o_sg + nl * (size_t)k_seg * sizeof(float);
    size_t o_te = o_tok + cap * sizeof(int32_t), o_se = o_te + nl * (size_t)k_tok * sizeof(int16_t);
    size_t o_gen = o_se + nl * (size_t)k_seg * sizeof(int16_t), total = o_gen + cap;
    unsigned char *mem = calloc(1, total);
    if (!mem) return cm_err_set(err, CM_E_NOMEM, "seq: cannot allocate the routing detail of %zu positions", cap);
    q->det_mem = mem;
    q->det_cap = (int)cap;
    q->det_hi = 0;
    cm_route_tokens *d = &q->det;
    memset(d, 0, sizeof *d);
    d->n_layer = mc->n_layer;
    d->k_tok = k_tok;
    d->k_seg = k_seg;
    d->shared_expert = mole ? -1 : mm->shared;
    d->window = mole ? 0 : mm->window;
    d->token = (const int32_t *)(mem + o_tok);
    d->generated = (const int8_t *)(mem + o_gen);
    d->tok_expert = (const int16_t *)(mem + o_te);
    d->tok_gate = (const float *)(mem + o_tg);
    d->seg_expert = (const int16_t *)(mem + o_se);
    d->seg_gate = (const float *)(mem + o_sg);
    d->adapters = mole ? (const uint64_t *)(mem + o_ad) : NULL;
    det_clear(mc, q, 0, q->det_cap);
    return (int)cap;
}

const cm_route_tokens *cm_moe_seq_tokens(cm_moe_ctx *mc, int seq) {
    moe_seq *q = &mc->seqs[seq];
    if (!q->det_mem) return NULL;
    q->det.n_tokens = q->det_hi < q->det_cap ? q->det_hi : q->det_cap;
    q->det.n_dropped = q->det_hi - q->det.n_tokens;
    return &q->det;
}

void cm_moe_seq_close(cm_moe_ctx *mc, int seq) {
    moe_seq *q = &mc->seqs[seq];
    free(q->det_mem);
    q->det_mem = NULL;
    q->det_cap = q->det_hi = 0;
    memset(&q->det, 0, sizeof q->det);
}

/* ============================================================ batch */

int cm_moe_batch_check(const cm_moe_ctx *mc, const cm_batch *b, const int32_t *seq_len, const int32_t *seq_cnt,
                       cm_err *err) {
    const cm_moe_model *mm = mc->mm;
    for (int s = 0; s < mc->n_seq_max; s++) {
        if (!seq_cnt[s]) continue;
        const moe_seq *q = &mc->seqs[s];
        if (mm->kind == CM_MOE_HYBRID && mm->n_seg && seg_mode(mc, q) == CM_SEGMENT_REFERENCE && seq_len[s] != 0)
            return cm_err_set(err, CM_E_INVAL,
                              "forward: sequence %d is in reference segment mode, which scores a whole request in "
                              "ONE forward from an empty sequence (it holds %d positions); use causal mode to "
                              "decode", s, seq_len[s]);
        if (mm->kind == CM_MOE_MOLE && q->opt.adapter_routing == CM_ADAPTERS_BATCH && !b->adapters)
            return cm_err_set(err, CM_E_INVAL, "forward: sequence %d takes adapter sets from the batch, which has none", s);
    }
    if (mm->kind == CM_MOE_MOLE && b->adapters) {
        uint64_t ok = mm->n_adapters >= 64 ? ~0ull : (1ull << mm->n_adapters) - 1;
        for (int i = 0; i < b->n; i++)
            if (mc->seqs[b->seq[i]].opt.adapter_routing == CM_ADAPTERS_BATCH && (b->adapters[i] & ~ok))
                return cm_err_set(err, CM_E_RANGE, "forward: adapter set 0x%llx of token %d names adapters beyond "
                                  "the model's %d", (unsigned long long)b->adapters[i], i, mm->n_adapters);
    }
    return CM_OK;
}

static int adapter_id_of(const cm_moe_model *mm, const char *lang) {
    if (!lang || !*lang) return -1;
    for (int a = 0; a < mm->n_adapters; a++)
        if (!strcmp(mm->names[a], lang)) return a;
    return -1;
}

/* The adapter set of a code token of language adapter `id`: {id, shared}. */
static uint64_t code_set(const cm_moe_model *mm, int id) {
    uint64_t s = 1ull << id;
    if (mm->ad_shared >= 0) s |= 1ull << mm->ad_shared;
    return s;
}

static uint64_t auto_set(cm_moe_ctx *mc, moe_seq *q, int32_t tok) {
    const cm_moe_model *mm = mc->mm;
    int nb = cm_token_bytes(mc->m, tok, 0, mc->tokbuf, (size_t)mc->tokbuf_cap);
    if (nb < 0) nb = 0;
    if (nb > mc->tokbuf_cap) nb = mc->tokbuf_cap;
    const char *lang = NULL;
    int where = cm_fence_classify(&q->fence, mc->tokbuf, (size_t)nb, &lang);
    cm_fence_push(&q->fence, mc->tokbuf, (size_t)nb);
    uint64_t fb = mm->ad_fallback >= 0 ? 1ull << mm->ad_fallback : 0;
    if (where == CM_FENCE_CODE) {
        int id = adapter_id_of(mm, lang);
        return id >= 0 ? code_set(mm, id) : fb;
    }
    if (where == CM_FENCE_TEXT && q->opt.language >= 0) return code_set(mm, q->opt.language);
    return fb;
}

void cm_moe_batch_begin(cm_moe_ctx *mc, const cm_batch *b, const int32_t *pos, unsigned char *const *snap) {
    const cm_moe_model *mm = mc->mm;
    mc->b = b;
    mc->pos = pos;
    mc->snap = snap;
    mc->n = b->n;
    for (int i = 0; i < b->n; i++) {
        mc->gen[i] = b->generated && b->generated[i] ? 1 : 0;
        det_begin(mc, &mc->seqs[b->seq[i]], pos[i], b->token[i], mc->gen[i]);
        if (mm->kind != CM_MOE_MOLE) continue;
        moe_seq *q = &mc->seqs[b->seq[i]];
        uint64_t set = 0;
        switch (q->opt.adapter_routing) {
        case CM_ADAPTERS_BATCH: set = b->adapters[i]; break;
        case CM_ADAPTERS_NONE: set = 0; break;
        default: set = auto_set(mc, q, b->token[i]); break;
        }
        if (snap && snap[i]) memcpy(snap[i], &q->fence, sizeof q->fence);
        mc->sets[i] = set;
        if (pos[i] < q->det_cap) ((uint64_t *)q->det.adapters)[pos[i]] = set;
        if (mc->stats_on)
            for (int a = 0; a < mm->n_adapters; a++)
                if (set >> a & 1) {
                    q->adapter[a].tokens[mc->gen[i]]++;
                    q->adapter[a].gate_sum[mc->gen[i]] += mm->scales[a];
                }
    }
}

void cm_moe_batch_end(cm_moe_ctx *mc) {
    const cm_moe_model *mm = mc->mm;
    if (mm->kind == CM_MOE_HYBRID && mm->n_seg)
        for (int i = 0; i < mc->n; i++) {
            moe_seq *q = &mc->seqs[mc->b->seq[i]];
            if (seg_mode(mc, q) == CM_SEGMENT_REFERENCE) q->sealed = 1;
        }
    mc->b = NULL;
}

/* ============================================================ hybrid routing */

/* y (n_out) = W (n_out, D) x: a router's logits, as f32 dots (the routers are tiny). */
static void router(const void *w, int wtype, int n_out, int64_t d, const float *x, float *y) {
    size_t rb = gguf_row_bytes(wtype, d);
    for (int e = 0; e < n_out; e++) y[e] = cm_vec_dot(wtype, GGUF_TT_F32, d, (const char *)w + (size_t)e * rb, x);
}

/* p (n) = softmax(l) in double: routing decisions compare these */
static void softmax_d(const float *l, int n, double *p) {
    double mx = l[0], s = 0;
    for (int i = 1; i < n; i++) mx = l[i] > mx ? l[i] : mx;
    for (int i = 0; i < n; i++) s += p[i] = exp((double)l[i] - mx);
    for (int i = 0; i < n; i++) p[i] /= s;
}

/* Indices of the k largest of p[0..n) not equal to skip, highest first, ties to the lower index. */
static int top_k(const double *p, int n, int k, int skip, int *out) {
    int m = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            if (e == skip) continue;
            int used = 0;
            for (int u = 0; u < m; u++) used |= out[u] == e;
            if (used) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        if (best < 0) break;
        out[m++] = best;
    }
    return m;
}

static void add_slot(cm_moe_ctx *mc, int i, int e, float g) {
    int k = mc->n_slot[i]++;
    mc->slot_e[(size_t)i * mc->S + k] = (int16_t)e;
    mc->slot_g[(size_t)i * mc->S + k] = g;
}

static void route_token_level(cm_moe_ctx *mc, int il, const float *x) {
    const cm_moe_model *mm = mc->mm;
    const cm_moe_layer *l = &mm->layers[il];
    int N = mm->n_tok, D = mc->D;
    double p[CM_MOE_MAX_EXPERTS];
    int sel[CM_MOE_MAX_EXPERTS];
    for (int i = 0; i < mc->n; i++) {
        float *lg = mc->rlog + (size_t)i * N;
        router(l->tok_router, mm->router_type, N, D, x + (size_t)i * D, lg);
        softmax_d(lg, N, p);
        int k = mm->shared >= 0 ? mm->k_used - 1 : mm->k_used;
        int m = top_k(p, N, k, mm->shared, sel);
        if (mm->shared >= 0) sel[m++] = mm->shared;
        double sum = 0;
        for (int j = 0; j < m; j++) sum += p[sel[j]];
        moe_seq *q = &mc->seqs[mc->b->seq[i]];
        cm_route_count *st = q->tok + (size_t)il * N;
        for (int j = 0; j < m; j++) {
            double g = p[sel[j]] / sum;
            add_slot(mc, i, sel[j], (float)(mm->a_tok * g));
            det_put(mc, q, il, mc->pos[i], 0, sel[j], g);
            if (mc->stats_on) {
                st[sel[j]].tokens[mc->gen[i]]++;
                st[sel[j]].gate_sum[mc->gen[i]] += g;
            }
        }
    }
}

/* A token routed to segment expert e: the statistics (when on) and the sequence's detail (when enabled). */
static void seg_stat(cm_moe_ctx *mc, moe_seq *q, int il, int e, int gen, double g, int pos) {
    const cm_moe_model *mm = mc->mm;
    det_put(mc, q, il, pos, 1, e, g);
    if (!mc->stats_on) return;
    cm_route_count *st = q->seg + (size_t)il * mm->n_seg + e;
    st->tokens[gen]++;
    st->gate_sum[gen] += g;
    int w = pos / mm->window;
    if (w < mc->n_win) q->seg_windows[((size_t)il * mm->n_seg + e) * (size_t)mc->n_win + w]++;
}

/* The descriptor of the positions pooled so far in layer il's current window (cnt of them). */
static void pool_desc(const cm_moe_ctx *mc, const moe_seq *q, int il, int cnt, float *desc) {
    size_t D = (size_t)mc->D;
    if (mc->mm->pooling == CM_POOL_MAX) {
        memcpy(desc, q->pool_max + (size_t)il * D, D * sizeof *desc);
    } else {
        const double *ps = q->pool_sum + (size_t)il * D;
        for (size_t d = 0; d < D; d++) desc[d] = (float)(ps[d] / cnt);
    }
}

/* causal: token t of window s pools its sequence's x over s*w .. t (state kept per sequence/layer);
 * route "previous": the pool is kept the same way, and a token of window s >= 1 is routed by the
 * descriptor of the whole window s-1, set aside when window s starts; window 0 gets no segment expert */
static void route_seg_causal(cm_moe_ctx *mc, int il, const float *x, int i) {
    const cm_moe_model *mm = mc->mm;
    int D = mc->D, N = mm->n_seg;
    moe_seq *q = &mc->seqs[mc->b->seq[i]];
    const float *xi = x + (size_t)i * D;
    int prev = q->prev_desc != NULL, pos = mc->pos[i];
    if (pos % mm->window == 0) { /* a new window starts here */
        if (prev && pos > 0) pool_desc(mc, q, il, q->win_n[il], q->prev_desc + (size_t)il * D);
        q->win_n[il] = 0;
    }
    int cnt = ++q->win_n[il];
    if (mm->pooling == CM_POOL_MAX) {
        float *pm = q->pool_max + (size_t)il * D;
        for (int d = 0; d < D; d++) pm[d] = cnt == 1 || xi[d] > pm[d] ? xi[d] : pm[d];
    } else {
        double *ps = q->pool_sum + (size_t)il * D;
        for (int d = 0; d < D; d++) ps[d] = (cnt == 1 ? 0.0 : ps[d]) + xi[d];
    }
    if (mc->snap && mc->snap[i]) snap_put_layer(mc, q, il, mc->snap[i]);
    const float *desc;
    if (!prev) {
        float *dp = mc->desc + (size_t)i * D;
        pool_desc(mc, q, il, cnt, dp);
        desc = dp;
    } else {
        if (pos < mm->window) return;
        desc = q->prev_desc + (size_t)il * D;
    }
    float *lg = mc->rlog + (size_t)i * N;
    double p[CM_MOE_MAX_EXPERTS];
    int sel[CM_MOE_MAX_EXPERTS];
    router(mm->layers[il].seg_router, mm->router_type, N, D, desc, lg);
    softmax_d(lg, N, p);
    int m = top_k(p, N, mm->seg_causal_top, -1, sel);
    for (int j = 0; j < m; j++) {
        double g = p[sel[j]] * mm->gate_scale;
        add_slot(mc, i, mm->n_tok + sel[j], (float)(mm->a_seg * g));
        seg_stat(mc, q, il, sel[j], mc->gen[i], g, mc->pos[i]);
    }
}

/* reference: the sequence's whole request is in this batch (checked): windows from position 0, experts
 * in index order each take their top-K windows among those fewer than `bucket` experts hold */
static void route_seg_reference(cm_moe_ctx *mc, int il, const float *x, int seq) {
    const cm_moe_model *mm = mc->mm;
    int D = mc->D, N = mm->n_seg, w = mm->window;
    int T = 0;
    for (int i = 0; i < mc->n; i++)
        if (mc->b->seq[i] == seq) mc->ref_idx[T++] = i; /* batch order == position order */
    int P = T / w;
    if (P == 0) return;
    double *qb = mc->ref_q; /* (P, N) */
    for (int s = 0; s < P; s++) {
        float *dsc = mc->desc + (size_t)s * D;
        for (int d = 0; d < D; d++) {
            double acc = mm->pooling == CM_POOL_MAX ? -INFINITY : 0.0;
            for (int t = s * w; t < (s + 1) * w; t++) {
                double v = x[(size_t)mc->ref_idx[t] * D + d];
                acc = mm->pooling == CM_POOL_MAX ? (v > acc ? v : acc) : acc + v;
            }
            dsc[d] = (float)(mm->pooling == CM_POOL_MAX ? acc : acc / w);
        }
        float lg[CM_MOE_MAX_EXPERTS];
        router(mm->layers[il].seg_router, mm->router_type, N, D, dsc, lg);
        softmax_d(lg, N, qb + (size_t)s * N);
    }
    int K = (int)floor((double)P * (double)mm->capacity / (double)N);
    uint8_t *taken = (uint8_t *)mc->yd; /* (P) counts; yd is free until the experts run */
    memset(taken, 0, (size_t)P);
    moe_seq *q = &mc->seqs[seq];
    for (int e = 0; e < N && K > 0; e++) {
        for (int got = 0; got < K;) {
            int best = -1;
            for (int s = 0; s < P; s++) {
                if (taken[s] >= mm->bucket || (taken[s] & 0x80)) continue;
                if (best < 0 || qb[(size_t)s * N + e] > qb[(size_t)best * N + e]) best = s;
            }
            if (best < 0) break;
            taken[best] |= 0x80; /* taken by this expert; cleared below */
            got++;
            double g = qb[(size_t)best * N + e] * mm->gate_scale;
            for (int t = best * w; t < (best + 1) * w; t++) {
                int i = mc->ref_idx[t];
                add_slot(mc, i, mm->n_tok + e, (float)(mm->a_seg * g));
                seg_stat(mc, q, il, e, mc->gen[i], g, mc->pos[i]);
            }
        }
        for (int s = 0; s < P; s++)
            if (taken[s] & 0x80) taken[s] = (uint8_t)((taken[s] & 0x7f) + 1);
    }
}

/* ============================================================ hybrid FFN */

void cm_moe_ffn(cm_moe_ctx *mc, int il, int n, const float *x, float *y) {
    const cm_moe_model *mm = mc->mm;
    const cm_moe_layer *l = &mm->layers[il];
    int D = mc->D, F = mm->f_exp, NE = mm->n_tok + mm->n_seg;
    memset(mc->n_slot, 0, (size_t)n * sizeof *mc->n_slot);

    /* 1. route */
    route_token_level(mc, il, x);
    if (mm->n_seg) {
        for (int i = 0; i < n; i++) {
            moe_seq *q = &mc->seqs[mc->b->seq[i]];
            if (seg_mode(mc, q) == CM_SEGMENT_CAUSAL) route_seg_causal(mc, il, x, i);
        }
        for (int i = 0; i < n; i++) {
            int s = mc->b->seq[i];
            if (seg_mode(mc, &mc->seqs[s]) != CM_SEGMENT_REFERENCE) continue;
            int first = 1;
            for (int j = 0; j < i && first; j++) first = mc->b->seq[j] != s;
            if (first) route_seg_reference(mc, il, x, s);
        }
    }

    if (mc->trace)
        for (int i = 0; i < n; i++) {
            int te[2 * CM_MOE_MAX_EXPERTS], se[2 * CM_MOE_MAX_EXPERTS], nt = 0, ns = 0;
            for (int k = 0; k < mc->n_slot[i]; k++) {
                int e = mc->slot_e[(size_t)i * mc->S + k];
                if (e < mm->n_tok) te[nt++] = e;
                else se[ns++] = e - mm->n_tok;
            }
            mc->trace(mc->trace_ud, il, i, nt, te, ns, se);
        }

    /* 2. group slots by expert: counting sort; rows of one expert in batch order */
    int32_t *gs = mc->g_start;
    memset(gs, 0, (size_t)(NE + 1) * sizeof *gs);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < mc->n_slot[i]; k++) {
            int e = mc->slot_e[(size_t)i * mc->S + k];
            /* a zero fusion weight removes the level: skip its experts' work entirely */
            if (mc->slot_g[(size_t)i * mc->S + k] == 0.0f) continue;
            gs[e + 1]++;
        }
    for (int e = 0; e < NE; e++) gs[e + 1] += gs[e];
    int32_t fill[2 * CM_MOE_MAX_EXPERTS];
    memcpy(fill, gs, (size_t)NE * sizeof *fill);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < mc->n_slot[i]; k++) {
            size_t si = (size_t)i * mc->S + k;
            if (mc->slot_g[si] == 0.0f) {
                mc->row_of_slot[si] = -1;
                continue;
            }
            int r = fill[mc->slot_e[si]]++;
            mc->g_tok[r] = i;
            mc->row_of_slot[si] = r;
            memcpy(mc->xg + (size_t)r * D, x + (size_t)i * D, (size_t)D * sizeof(float));
        }

    /* 3. expert products, only on routed rows */
    mm_begin(mc);
    for (int e = 0; e < NE; e++) {
        int r0 = gs[e], nr = gs[e + 1] - gs[e];
        if (!nr) continue;
        const cm_moe_expert *ex = e < mm->n_tok ? &l->tok[e] : &l->seg[e - mm->n_tok];
        mm_add(mc, ex->gate, ex->gate_type, F, D, mc->xg + (size_t)r0 * D, nr, mc->hg + (size_t)r0 * F);
        mm_add(mc, ex->up, ex->up_type, F, D, mc->xg + (size_t)r0 * D, nr, mc->hu + (size_t)r0 * F);
    }
    mm_go(mc);
    int rows = gs[NE];
    for (int r = 0; r < rows; r++) cm_silu_mul(mc->hg + (size_t)r * F, mc->hu + (size_t)r * F, F);
    mm_begin(mc);
    for (int e = 0; e < NE; e++) {
        int r0 = gs[e], nr = gs[e + 1] - gs[e];
        if (!nr) continue;
        const cm_moe_expert *ex = e < mm->n_tok ? &l->tok[e] : &l->seg[e - mm->n_tok];
        mm_add(mc, ex->down, ex->down_type, D, F, mc->hg + (size_t)r0 * F, nr, mc->yd + (size_t)r0 * D);
    }
    mm_go(mc);
    cm_moe_resident_note(mc->resident, il, gs);

    /* 4. scatter in expert order per token */
    for (int i = 0; i < n; i++) {
        float *yi = y + (size_t)i * D;
        memset(yi, 0, (size_t)D * sizeof(float));
        for (int e = 0; e < NE; e++)
            for (int k = 0; k < mc->n_slot[i]; k++) {
                size_t si = (size_t)i * mc->S + k;
                if (mc->slot_e[si] != e || mc->row_of_slot[si] < 0) continue;
                cm_axpy(yi, mc->slot_g[si], mc->yd + (size_t)mc->row_of_slot[si] * D, D);
            }
    }
}

/* ============================================================ MoLE */

/* For every adapter with tokens: out[t] (n, M) += scale * B (A x_t); x (n, K). proj: 0 gate, 1 up, 2 down;
 * with out2, a second projection proj2 shares the gathered x (gate and up). Adapters are taken in groups
 * whose rows fit the scratch (MOLE_GROUP x n_batch_max rows: the usual {language, shared} pair is one
 * group), so a decode step costs two pool runs per call, whatever the number of adapters per token.
 * Each token's deltas are added in adapter order, whatever else is in the batch. */
static void mole_apply(cm_moe_ctx *mc, int il, int proj, int n, const float *x, int64_t K, float *out, int64_t M,
                       float *out2, int proj2) {
    const cm_moe_model *mm = mc->mm;
    int na = mm->n_adapters, cap = mc->rows_max, rmax = mm->max_rank;
    int cnt[CM_MOLE_MAX_ADAPTERS], off[CM_MOLE_MAX_ADAPTERS];
    for (int a = 0; a < na; a++) {
        cnt[a] = 0;
        for (int i = 0; i < n; i++) cnt[a] += (int)(mc->sets[i] >> a & 1);
    }
    for (int a0 = 0; a0 < na;) {
        /* a group [a0, a1): adapters whose rows fit together (one adapter always fits: n <= B) */
        int a1 = a0, rows = 0;
        while (a1 < na && rows + cnt[a1] <= cap) rows += cnt[a1++];
        rows = 0;
        for (int a = a0; a < a1; a++) {
            off[a] = rows;
            for (int i = 0; i < n && cnt[a]; i++)
                if (mc->sets[i] >> a & 1) {
                    mc->g_tok[rows] = i;
                    memcpy(mc->xg + (size_t)rows * K, x + (size_t)i * K, (size_t)K * sizeof(float));
                    rows++;
                }
        }
        float *t1 = mc->lt, *t2 = mc->lt + (size_t)cap * (size_t)rmax;
        mm_begin(mc);
        for (int a = a0; a < a1; a++) {
            if (!cnt[a]) continue;
            const cm_lora *lo = &mm->lora[((size_t)il * 3 + (size_t)proj) * (size_t)na + (size_t)a];
            mm_add(mc, lo->a, lo->a_type, mm->ranks[a], K, mc->xg + (size_t)off[a] * K, cnt[a], t1 + (size_t)off[a] * rmax);
            if (out2) {
                const cm_lora *l2 = &mm->lora[((size_t)il * 3 + (size_t)proj2) * (size_t)na + (size_t)a];
                mm_add(mc, l2->a, l2->a_type, mm->ranks[a], K, mc->xg + (size_t)off[a] * K, cnt[a], t2 + (size_t)off[a] * rmax);
            }
        }
        mm_go(mc);
        /* the low-rank rows were written with stride r_a inside each adapter's rmax-strided block:
         * mm_add's y is (n, M) with M = r_a, contiguous from t + off * rmax */
        mm_begin(mc);
        for (int a = a0; a < a1; a++) {
            if (!cnt[a]) continue;
            const cm_lora *lo = &mm->lora[((size_t)il * 3 + (size_t)proj) * (size_t)na + (size_t)a];
            mm_add(mc, lo->b, lo->b_type, M, mm->ranks[a], t1 + (size_t)off[a] * rmax, cnt[a], mc->hg + (size_t)off[a] * M);
            if (out2) {
                const cm_lora *l2 = &mm->lora[((size_t)il * 3 + (size_t)proj2) * (size_t)na + (size_t)a];
                mm_add(mc, l2->b, l2->b_type, M, mm->ranks[a], t2 + (size_t)off[a] * rmax, cnt[a], mc->hu + (size_t)off[a] * M);
            }
        }
        mm_go(mc);
        for (int a = a0; a < a1; a++) {
            float sc = mm->scales[a];
            for (int j = off[a]; j < off[a] + cnt[a]; j++) {
                int i = mc->g_tok[j];
                cm_axpy(out + (size_t)i * M, sc, mc->hg + (size_t)j * M, M);
                if (out2) cm_axpy(out2 + (size_t)i * M, sc, mc->hu + (size_t)j * M, M);
            }
        }
        a0 = a1;
    }
}

void cm_mole_gate_up(cm_moe_ctx *mc, int il, int n, const float *x, float *hg, float *hu) {
    mole_apply(mc, il, 0, n, x, mc->D, hg, mc->mm->n_ff, hu, 1);
}

void cm_mole_down(cm_moe_ctx *mc, int il, int n, const float *h, float *proj) {
    mole_apply(mc, il, 2, n, h, mc->mm->n_ff, proj, mc->D, NULL, 0);
}

/* ============================================================ statistics */

const cm_routing *cm_moe_routing(cm_moe_ctx *mc, int seq) { return &mc->seqs[seq].r; }

void cm_moe_set_stats(cm_moe_ctx *mc, int on) { mc->stats_on = on != 0; }

void cm_moe_set_resident(cm_moe_ctx *mc, cm_moe_resident *r) {
    cm_moe_resident_free(mc->resident);
    mc->resident = r;
}

const cm_moe_resident *cm_moe_get_resident(const cm_moe_ctx *mc) { return mc ? mc->resident : NULL; }

void cm_moe_set_trace(cm_moe_ctx *mc, cm_moe_trace_fn fn, void *ud) {
    mc->trace = fn;
    mc->trace_ud = ud;
}
