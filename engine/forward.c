/*
 * forward.c - inference contexts and the forward pass of a batch of tokens from several sequences.
 *
 * Shapes: N tokens in the batch, D n_embd, H heads, G kv heads, E head_dim, Q = H*E, C = G*E,
 * F n_ff, V vocab, T positions of a sequence.
 *
 * One layer, for all N tokens at once:
 *   xn = rmsnorm(x) * attn_norm                      (N, D)
 *   q, k, v = xn Wq^T + bq, xn Wk^T + bk, xn Wv^T + bv (N, Q), (N, C), (N, C)
 *   qwen3: q, k = rmsnorm(q_h) * q_norm, rmsnorm(k_h) * k_norm per head h    (E) weights
 *   rope(q), rope(k) at each token's position; k, v appended to the token's sequence's KV blocks
 *   att = per token and head: softmax(q k^T / sqrt(E)) v over positions 0..pos of its sequence (N, Q)
 *   x += att Wo^T                                     (N, D)
 *   xn = rmsnorm(x) * ffn_norm; x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
 *     (MoE architectures without a dense FFN: x += the routed experts' sum, moe.c)
 * then logits = rmsnorm(x) Wout^T for the requested rows only.
 *
 * Two ways to multiply by a weight matrix, by the number of activation rows:
 * - few rows (decode): our matvec kernels read each weight row once and dot it with every activation row
 *   (quantised weights with activations quantised once per row to their paired int8 format, as
 *   llama.cpp); rows of W are split across the pool; q/k/v and gate/up run as one pool run each.
 * - more rows: quantised weights take the int8 GEMM (cm_gemm_q, gemm_q8.c) from cm_gemm_q_min_rows of
 *   their type on (5 rows for Q8_0 and the legacy types, 8 to 16 for the K-quants: the kernel family's
 *   crossover), on a tile of W's rows per pool task (a long batch: each thread's tokens against all of
 *   W, token_split), X quantised once per row, bit-exact per row with
 *   the matvec's dot, so a token's products do not depend on the rest of the batch nor on the path.
 *   F32/F16 weights, and every weight under CODEMOE_EXACT_ACTIVATIONS=1, go through sgemm from
 *   CM_GEMM_MIN_ROWS rows instead: each task dequantises its tile (unless F32) into its thread's scratch
 *   and calls single-threaded OpenBLAS: Y[:, tile] = X W[tile]^T.
 * Every buffer is sized at cm_ctx_create; cm_forward allocates nothing.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kv.h"
#include "model.h"
#include "moe.h"
#include "threadpool.h"
#include "util.h"

#define MM_TILE_TOKENS 64 /* tokens a task of it takes at least when a batch is split by tokens */
#define CM_ROWS_CHUNK 16 /* tokens per task of the per-token steps, at least */
#define ATT_RUN 8         /* consecutive tokens of one sequence an attention task takes at most... */
#define ATT_RUN_SCORES ((size_t)32 << 20) /* ...while their scores fit this per thread (long contexts) */
enum { LP_Q, LP_K, LP_V, LP_O, LP_GATE, LP_UP, LP_DOWN, LP_N }; /* cm_ctx.lpack's matrices of a layer */
#define CM_GEMM_MIN_ROWS 16          /* activation rows from which sgemm beats the matvec kernels */
#define CM_DEQ_TILE_FLOATS (1 << 20) /* per-thread dequantisation tile: 4 MiB */
#define CM_LOGITS_BUDGET ((size_t)256 << 20) /* bytes of logits kept per context */
#define CM_MAX_CTX (1 << 22)
#define CM_MAX_BATCH (1 << 16)
#define CM_YIELD_VOCAB_ROWS 8192     /* rows of the output head between two calls of a batch's yield hook
                                        (CODEMOE_YIELD_VOCAB_ROWS, a multiple of 16, for tests) */

struct cm_ctx {
    const cm_model *m;
    cm_pool *pool;
    cm_kv kv;
    int n_threads, n_seq_max, n_ctx, n_batch_max, n_logits_max;
    int64_t deq_floats;     /* per thread */
    int exact_act;          /* f32 activations everywhere, the reference (CODEMOE_EXACT_ACTIVATIONS=1) */
    cm_gemm_pack *out_pack; /* the output head repacked (cm_ctx_params.pack_output), or NULL */
    cm_gemm_pack **lpack;   /* (n_layer, LP_N) the layers' matrices repacked (cm_ctx_params.pack_layers), or NULL */
    int64_t yield_rows;     /* CM_YIELD_VOCAB_ROWS */

    float *rope_cos, *rope_sin; /* (n_ctx, E/2) */

    /* activations, B = n_batch_max */
    float *x;       /* (B, D) residual stream */
    float *xn;      /* (B, D) normed */
    float *q;       /* (B, Q) */
    float *k, *v;   /* (B, C) */
    float *att;     /* (B, Q) */
    float *proj;    /* (B, D) output of Wo / Wd before the residual add */
    float *hg, *hu; /* (B, F) */
    void *xq;       /* (B, row bytes of the largest int8 activation format of max(D, Q, F)) */
    float *outn;    /* (n_logits_max, D) final-normed rows whose logits are wanted */
    float *logits;  /* (n_logits_max, V) */
    float *scores;  /* (n_threads, att_run_max * H / H_kv, n_ctx) attention scores of a run's tokens'
                       query heads of one kv head */
    float *att_acc; /* (n_threads, att_run_max * H / H_kv, att_acc_stride) their outputs as they
                       accumulate, 64-byte aligned */
    float *att_q;   /* (n_threads, att_run_max * H / H_kv, E) their queries side by side */
    int32_t *att_run; /* (B + 1) the batch's attention runs: run r is tokens [att_run[r], att_run[r + 1]) */
    int32_t *row_task; /* (B + 1) the per-token steps' tasks: task t is tokens [row_task[t], row_task[t + 1]) */
    int n_row_tasks;
    int32_t *tok_first; /* (n_threads + 1) the layer's tokens of thread i: [tok_first[i], tok_first[i + 1]) */
    int32_t *row_first; /* (n_threads + 1) ...which are its per-token steps' tasks from row_first[i] on */
    int32_t *split;     /* (n_threads + 1) a pool run's shares of its tasks (cm_pool_run_split) */
    int att_run_max;  /* tokens a run takes at most: ATT_RUN, fewer for contexts too long for it */
    int att_acc_stride;
    float *deq;     /* (n_threads, deq_floats) dequantised weight tiles, or the int8 GEMM's unpacked ones */

    /* per batch */
    int32_t *pos;       /* (B) position of each token in its sequence */
    int32_t *logit_row; /* (B) row in logits, -1 if none */
    int32_t *out_idx;   /* (n_logits_max) batch index of each logits row */
    int32_t *seq_cnt;   /* (n_seq_max) tokens of each sequence in the batch */
    int32_t *seq_rem;   /* (n_seq_max) scratch: tokens of each sequence not yet seen */
    unsigned char **snap; /* (B) MoE: the KV block extra to store routing state in after token i, or NULL */
    int n_last;         /* tokens in the last successful batch */
    int32_t *last_logit_row; /* that batch's logit_row and logits (a nested batch's own, see below) */
    float *last_logits;
    const cm_batch *batch;
    cm_moe_ctx *moe;    /* mixture-of-experts state (moe.h); NULL for dense models */

    /* A forward nested in another one's yield hook (cm_batch.yield) swaps in this second set of the
     * state a batch keeps from one layer to the next (the residual stream, the next layer's normed
     * input, positions, logits rows and logits, counts per sequence, the batch); everything else is
     * scratch of one layer. */
    struct {
        int n_max;      /* cm_ctx_params.n_batch_nested; 0: no nesting */
        float *x, *xn;  /* (n_max, D) */
        float *outn, *logits; /* (n_max, D), (n_max, V): the outer batch's may be half computed (the
                                 output head yields too) */
        int32_t *pos, *logit_row, *out_idx; /* (n_max) */
        int32_t *seq_cnt; /* (n_seq_max) */
        unsigned char **snap; /* (n_max) */
        const cm_batch *batch;
    } nest;
};

/* ============================================================ create / free */

static void *xmalloc(size_t n, int *fail) {
    void *p = malloc(n ? n : 1);
    if (!p) *fail = 1;
    return p;
}

/* cos/sin of every position's angles, (n_ctx, E/2): angle(p, i) = p * inv_freq[i], i < E/2.
 * inv_freq[i] = theta^(-2i/E), divided by rope_freqs[i] if the model has them (Llama 3.1), then rope
 * scaling (the same as llama.cpp's rope_yarn and HF's _compute_{linear_scaling,yarn}_rope_parameters;
 * docs/engine.md says where those two differ):
 * - linear: inv_freq / factor (positions interpolated), cos and sin times attn_factor;
 * - YaRN: dims rotating fewer than beta_slow times over the original context are interpolated
 *   (inv_freq / factor), those rotating more than beta_fast times are kept, a linear ramp blends the
 *   dims between; cos and sin times (0.1 ln(factor) + 1) * attn_factor. */
#define CM_PI 3.14159265358979323846

static void rope_tables(cm_ctx *c) {
    const cm_model_info *in = &c->m->info;
    int h = in->head_dim / 2;
    /* in double: the goldens are computed in float64, so this keeps our error our own */
    double E = in->head_dim, base = in->rope_theta, factor = in->rope_factor, mscale = in->rope_attn_factor;
    double low = 0, high = 0; /* YaRN ramp over the pair index i: 0 at or below low, 1 at or above high */
    if (in->rope_scaling == CM_ROPE_SCALING_YARN) {
        /* the (fractional) dim whose pair turns n times over the original context: orig / (2 pi theta_i) = n */
        double lb = 2.0 * log(base), orig = in->rope_orig_ctx;
        double c_fast = E * log(orig / (in->rope_beta_fast * 2.0 * CM_PI)) / lb;
        double c_slow = E * log(orig / (in->rope_beta_slow * 2.0 * CM_PI)) / lb;
        low = floor(c_fast) > 0 ? floor(c_fast) : 0;
        high = ceil(c_slow) < E - 1 ? ceil(c_slow) : E - 1;
        mscale *= 0.1 * log(factor) + 1.0;
    }
    const gguf_tensor *ff = in->rope_freqs ? gguf_find_tensor(&c->m->gguf, "rope_freqs.weight") : NULL; /* (E/2) */
    for (int i = 0; i < h; i++) {
        double inv = pow(base, -2.0 * i / E);
        if (ff) { /* checked by the loader: F32, E/2 values in [0.001, 10000] */
            float f;
            memcpy(&f, (const char *)ff->data + 4 * (size_t)i, 4);
            inv /= f;
        }
        if (in->rope_scaling == CM_ROPE_SCALING_LINEAR) {
            inv /= factor;
        } else if (in->rope_scaling == CM_ROPE_SCALING_YARN) {
            double span = high - low > 0.001 ? high - low : 0.001; /* llama.cpp's guard, not HF's */
            double r = (i - low) / span;
            r = r < 0 ? 0 : r > 1 ? 1 : r; /* 0: extrapolate (keep), 1: interpolate */
            inv = inv / factor * r + inv * (1.0 - r);
        }
        for (int p = 0; p < c->n_ctx; p++) {
            double a = (double)p * inv;
            c->rope_cos[(size_t)p * h + i] = (float)(cos(a) * mscale);
            c->rope_sin[(size_t)p * h + i] = (float)(sin(a) * mscale);
        }
    }
}

/* What each KV block carries beyond K and V: the MoE routing state at its last position. */
static size_t kv_extra_bytes(const cm_model *m) { return m->moe ? cm_moe_snapshot_bytes(m->moe) : 0; }

size_t cm_ctx_kv_block_bytes(const cm_model *m, int kv_type) {
    if (!m) return 0;
    const cm_model_info *in = &m->info;
    return cm_kv_block_bytes(in->n_layer, in->n_head_kv * in->head_dim, kv_type, kv_extra_bytes(m));
}

/* The layers' dense matrices repacked for the int8 GEMM (cm_ctx_params.pack_layers): all of them or
 * none. Auto (force 0): only when every one is Q8_0 or a legacy type and their copies take at most
 * CM_PACK_LAYERS_AUTO_MAX bytes together (about 1.2x their bytes); force: whenever the kernel family
 * packs every one. No memory for it is no failure: the layers then go unpacked, as without. */
static void pack_layers(cm_ctx *c, int force) {
    const cm_model *m = c->m;
    const int L = m->info.n_layer;
    size_t est = 0;
    for (int il = 0; il < L; il++) {
        const cm_layer *l = &m->layers[il];
        const cm_tensor *w[LP_N] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        for (int i = 0; i < LP_N; i++) {
            if (!w[i]->data) continue; /* an MoE layer's experts replace its FFN */
            if (cm_quant_vec_dot_type(w[i]->type) < 0 || (!force && cm_quant_block_values(w[i]->type) != 32)) return;
            est += gguf_row_bytes(w[i]->type, w[i]->ne0) * (size_t)w[i]->ne1 / 4 * 5;
        }
    }
    if (!force && est > CM_PACK_LAYERS_AUTO_MAX) return;
    if (!(c->lpack = calloc((size_t)L * LP_N, sizeof *c->lpack))) return;
    for (int il = 0; il < L; il++) {
        const cm_layer *l = &m->layers[il];
        const cm_tensor *w[LP_N] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        for (int i = 0; i < LP_N; i++) {
            if (!w[i]->data) continue;
            if (!(c->lpack[il * LP_N + i] = cm_gemm_q_pack(w[i]->type, w[i]->data, w[i]->ne0, w[i]->ne1, 0))) {
                for (int k = 0; k < L * LP_N; k++) cm_gemm_pack_free(c->lpack[k]);
                free(c->lpack);
                c->lpack = NULL;
                return;
            }
        }
    }
}

/* Layer il's packed matrix i, or NULL. */
static const cm_gemm_pack *lpack(const cm_ctx *c, int il, int i) { return c->lpack ? c->lpack[il * LP_N + i] : NULL; }

cm_ctx *cm_ctx_create(const cm_model *m, const cm_ctx_params *p, cm_err *err) {
    if (!m || !p || !m->layers) {
        cm_err_set(err, CM_E_INVAL, "ctx: %s", !m || !p ? "no model or params" : "model was loaded vocab-only");
        return NULL;
    }
    const cm_model_info *in = &m->info;
    int n_threads = p->n_threads ? p->n_threads : 1;
    int n_seq = p->n_seq_max ? p->n_seq_max : 1;
    int n_ctx = p->n_ctx ? p->n_ctx : in->n_ctx_train;
    int n_batch = p->n_batch_max ? p->n_batch_max : 512;
    if (n_threads < 1 || n_threads > CM_POOL_MAX_THREADS || n_seq < 1 || n_seq > 65536 || n_ctx < 1 ||
        n_ctx > CM_MAX_CTX || n_batch < 1 || n_batch > CM_MAX_BATCH || p->kv_tokens < 0 ||
        (p->kv_type != CM_KV_F32 && p->kv_type != CM_KV_F16) || p->experts_resident < 0 ||
        p->n_batch_nested < 0 || p->n_batch_nested > n_batch || (p->n_batch_nested && m->moe)) {
        cm_err_set(err, CM_E_INVAL,
                   "ctx: bad params (threads %d, n_seq_max %d, n_ctx %d, n_batch_max %d, kv_tokens %d, kv_type %d, "
                   "experts_resident %d, n_batch_nested %d%s)",
                   n_threads, n_seq, n_ctx, n_batch, p->kv_tokens, p->kv_type, p->experts_resident,
                   p->n_batch_nested, p->n_batch_nested && m->moe ? " with a mixture-of-experts model" : "");
        return NULL;
    }
    /* default: every sequence can reach n_ctx at once */
    uint64_t per_seq = ((uint64_t)n_ctx + CM_KV_BLOCK - 1) / CM_KV_BLOCK;
    uint64_t n_blocks = p->kv_tokens ? ((uint64_t)p->kv_tokens + CM_KV_BLOCK - 1) / CM_KV_BLOCK
                                     : (uint64_t)n_seq * per_seq;
    if (n_blocks > INT32_MAX / 2) {
        cm_err_set(err, CM_E_NOMEM, "ctx: KV pool of %llu blocks is too large", (unsigned long long)n_blocks);
        return NULL;
    }

    cm_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        cm_err_set(err, CM_E_NOMEM, "ctx: out of memory");
        return NULL;
    }
    c->m = m;
    c->n_threads = n_threads;
    c->n_seq_max = n_seq;
    c->n_ctx = n_ctx;
    c->n_batch_max = n_batch;
    const char *exact = getenv("CODEMOE_EXACT_ACTIVATIONS");
    c->exact_act = exact && *exact == '1';
    const char *yr = getenv("CODEMOE_YIELD_VOCAB_ROWS");
    c->yield_rows = yr && atoi(yr) >= 16 && atoi(yr) % 16 == 0 ? atoi(yr) : CM_YIELD_VOCAB_ROWS;

    int64_t D = in->n_embd, Q = (int64_t)in->n_head * in->head_dim, C = (int64_t)in->n_head_kv * in->head_dim;
    int64_t F = in->n_ff, V = in->n_vocab, B = n_batch;
    int64_t kmax = D > Q ? D : Q;
    if (F > kmax) kmax = F;
    /* logits rows: the whole batch if that fits the budget, else what fits but at least one per sequence */
    int64_t lrows = (int64_t)(CM_LOGITS_BUDGET / ((size_t)V * sizeof(float)));
    if (lrows > B) lrows = B;
    if (lrows < n_seq) lrows = n_seq < B ? n_seq : B;
    if (lrows < 1) lrows = 1;
    c->n_logits_max = (int)lrows;
    c->deq_floats = CM_DEQ_TILE_FLOATS > 16 * kmax ? CM_DEQ_TILE_FLOATS : 16 * kmax;
    int64_t gemm_q_floats = (int64_t)(cm_gemm_q_scratch_bytes(kmax) / sizeof(float)) + 1; /* shares the scratch */
    if (c->deq_floats < gemm_q_floats) c->deq_floats = gemm_q_floats;

    if (cm_kv_init(&c->kv, in->n_layer, (int)C, p->kv_type, (int)n_blocks, n_seq, n_ctx, kv_extra_bytes(m),
                   p->prefix_cache, err) < 0) {
        free(c);
        return NULL;
    }
    if (p->kv_prefault) cm_kv_prefault(&c->kv);
    int fail = 0;
    size_t f = sizeof(float);
    c->rope_cos = xmalloc((size_t)n_ctx * (size_t)(in->head_dim / 2) * f, &fail);
    c->rope_sin = xmalloc((size_t)n_ctx * (size_t)(in->head_dim / 2) * f, &fail);
    /* the buffers a step writes, in bytes (prefault_buffers writes them once below) */
    size_t xq_row = cm_vec_row_bytes(GGUF_TT_Q8_0, kmax); /* the largest of the int8 activation formats */
    if (cm_vec_row_bytes(GGUF_TT_Q8_1, kmax) > xq_row) xq_row = cm_vec_row_bytes(GGUF_TT_Q8_1, kmax);
    if (cm_vec_row_bytes(GGUF_TT_Q8_K, kmax) > xq_row) xq_row = cm_vec_row_bytes(GGUF_TT_Q8_K, kmax);
    const size_t th = (size_t)n_threads, group = (size_t)(in->n_head / in->n_head_kv);
    const size_t run_scores = group * (size_t)n_ctx * f;
    c->att_run_max = run_scores * ATT_RUN <= ATT_RUN_SCORES ? ATT_RUN
                   : ATT_RUN_SCORES / run_scores > 1 ? (int)(ATT_RUN_SCORES / run_scores) : 1;
    /* a thread's own cache lines: heads of c->att next to each other share lines, which two threads
     * writing every position's axpy would pass back and forth */
    c->att_acc_stride = (in->head_dim + 15) & ~15;
    const size_t b_d = (size_t)(B * D) * f, b_q = (size_t)(B * Q) * f, b_c = (size_t)(B * C) * f,
                 b_f = (size_t)(B * F) * f, b_xq = (size_t)B * xq_row + 64, b_outn = (size_t)(lrows * D) * f,
                 b_scores = th * (size_t)c->att_run_max * run_scores,
                 b_att_q = th * (size_t)c->att_run_max * group * (size_t)in->head_dim * f,
                 b_att_acc = th * (size_t)c->att_run_max * group * (size_t)c->att_acc_stride * f, /* a multiple of 64 */
                 b_deq = th * (size_t)c->deq_floats * f;
    c->x = xmalloc(b_d, &fail);
    c->xn = xmalloc(b_d, &fail);
    c->q = xmalloc(b_q, &fail);
    c->k = xmalloc(b_c, &fail);
    c->v = xmalloc(b_c, &fail);
    c->att = xmalloc(b_q, &fail);
    c->proj = xmalloc(b_d, &fail);
    c->hg = xmalloc(b_f, &fail);
    c->hu = xmalloc(b_f, &fail);
    c->xq = xmalloc(b_xq, &fail);
    c->outn = xmalloc(b_outn, &fail);
    c->logits = xmalloc((size_t)lrows * (size_t)V * f, &fail);
    c->scores = xmalloc(b_scores, &fail);
    c->att_q = xmalloc(b_att_q, &fail);
    c->att_run = xmalloc((size_t)(B + 1) * sizeof(int32_t), &fail);
    c->row_task = xmalloc((size_t)(B + 1) * sizeof(int32_t), &fail);
    c->tok_first = xmalloc((size_t)(n_threads + 1) * sizeof(int32_t), &fail);
    c->row_first = xmalloc((size_t)(n_threads + 1) * sizeof(int32_t), &fail);
    c->split = xmalloc((size_t)(n_threads + 1) * sizeof(int32_t), &fail);
    c->att_acc = aligned_alloc(64, b_att_acc);
    if (!c->att_acc) fail = 1;
    c->deq = xmalloc(b_deq, &fail);
    c->pos = xmalloc((size_t)B * sizeof(int32_t), &fail);
    c->logit_row = xmalloc((size_t)B * sizeof(int32_t), &fail);
    c->out_idx = xmalloc((size_t)lrows * sizeof(int32_t), &fail);
    c->seq_cnt = xmalloc((size_t)n_seq * sizeof(int32_t), &fail);
    c->seq_rem = xmalloc((size_t)n_seq * sizeof(int32_t), &fail);
    c->snap = xmalloc((size_t)B * sizeof *c->snap, &fail);
    if ((c->nest.n_max = p->n_batch_nested) > 0) {
        int64_t B2 = c->nest.n_max;
        c->nest.x = xmalloc((size_t)(B2 * D) * f, &fail);
        c->nest.xn = xmalloc((size_t)(B2 * D) * f, &fail);
        c->nest.outn = xmalloc((size_t)(B2 * D) * f, &fail);
        c->nest.logits = xmalloc((size_t)B2 * (size_t)V * f, &fail);
        c->nest.pos = xmalloc((size_t)B2 * sizeof(int32_t), &fail);
        c->nest.logit_row = xmalloc((size_t)B2 * sizeof(int32_t), &fail);
        c->nest.out_idx = xmalloc((size_t)B2 * sizeof(int32_t), &fail);
        c->nest.seq_cnt = xmalloc((size_t)n_seq * sizeof(int32_t), &fail);
        c->nest.snap = xmalloc((size_t)B2 * sizeof *c->nest.snap, &fail);
    }
    if (fail) {
        cm_ctx_free(c);
        cm_err_set(err, CM_E_NOMEM, "ctx: cannot allocate scratch for n_batch_max %d, n_ctx %d", n_batch, n_ctx);
        return NULL;
    }
    if (p->prefault_buffers) { /* written once now, so that the first steps take no page faults */
        struct { void *p; size_t bytes; } bufs[] = {
            {c->x, b_d}, {c->xn, b_d}, {c->q, b_q}, {c->k, b_c}, {c->v, b_c}, {c->att, b_q}, {c->proj, b_d},
            {c->hg, b_f}, {c->hu, b_f}, {c->xq, b_xq}, {c->outn, b_outn},
            {c->logits, (size_t)(n_seq < lrows ? n_seq : lrows) * (size_t)V * f}, /* a row per sequence */
            {c->scores, b_scores}, {c->att_q, b_att_q}, {c->att_acc, b_att_acc}, {c->deq, b_deq}};
        for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) memset(bufs[i].p, 0, bufs[i].bytes);
    }
    c->pool = cm_pool_create(n_threads, err);
    if (!c->pool) {
        cm_ctx_free(c);
        return NULL;
    }
    /* Our pool owns the parallelism: each task calls sgemm on its own tile, single-threaded. */
    openblas_set_num_threads(1);
    rope_tables(c);
    if (p->pack_output >= 0 && !c->exact_act && cm_quant_vec_dot_type(m->output.type) >= 0 &&
        (p->pack_output > 0 || cm_quant_block_values(m->output.type) == 32)) {
        /* no memory for it (or more than auto allows) is no failure: the head is then repacked per
         * call, as without */
        c->out_pack = cm_gemm_q_pack(m->output.type, m->output.data, m->output.ne0, m->output.ne1,
                                     p->pack_output == 0 ? CM_PACK_OUTPUT_AUTO_MAX : 0);
    }
    if (p->pack_layers >= 0 && !c->exact_act) pack_layers(c, p->pack_layers > 0);
    if (m->moe && !(c->moe = cm_moe_ctx_create(m, m->moe, c->pool, n_threads, n_seq, n_ctx, n_batch, !c->exact_act, err))) {
        cm_ctx_free(c);
        return NULL;
    }
    if (c->moe) {
        cm_moe_resident *r;
        if (cm_moe_resident_create(m, m->moe, p->experts_resident, &r, err) != CM_OK) {
            cm_ctx_free(c);
            return NULL;
        }
        cm_moe_set_resident(c->moe, r);
    }
    return c;
}

size_t cm_ctx_output_pack_bytes(const cm_ctx *c) { return c ? cm_gemm_pack_bytes(c->out_pack) : 0; }

size_t cm_ctx_layers_pack_bytes(const cm_ctx *c) {
    size_t b = 0;
    for (int i = 0; c && c->lpack && i < c->m->info.n_layer * LP_N; i++) b += cm_gemm_pack_bytes(c->lpack[i]);
    return b;
}

void cm_ctx_free(cm_ctx *c) {
    if (!c) return;
    cm_gemm_pack_free(c->out_pack);
    for (int i = 0; c->lpack && i < c->m->info.n_layer * LP_N; i++) cm_gemm_pack_free(c->lpack[i]);
    free(c->lpack);
    cm_moe_ctx_free(c->moe);
    cm_pool_free(c->pool);
    cm_kv_free(&c->kv);
    free(c->rope_cos);
    free(c->rope_sin);
    free(c->x);
    free(c->xn);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->att);
    free(c->proj);
    free(c->hg);
    free(c->hu);
    free(c->xq);
    free(c->outn);
    free(c->logits);
    free(c->scores);
    free(c->att_acc);
    free(c->att_q);
    free(c->att_run);
    free(c->row_task);
    free(c->tok_first);
    free(c->row_first);
    free(c->split);
    free(c->deq);
    free(c->pos);
    free(c->logit_row);
    free(c->out_idx);
    free(c->seq_cnt);
    free(c->seq_rem);
    free(c->snap);
    free(c->nest.x);
    free(c->nest.xn);
    free(c->nest.outn);
    free(c->nest.logits);
    free(c->nest.pos);
    free(c->nest.logit_row);
    free(c->nest.out_idx);
    free(c->nest.seq_cnt);
    free(c->nest.snap);
    free(c);
}

/* ============================================================ sequences */

static int seq_valid(const cm_ctx *c, int seq) {
    return seq >= 0 && seq < c->n_seq_max && c->kv.seqs[seq].open;
}

int cm_seq_open(cm_ctx *c, cm_err *err) {
    if (!c) return cm_err_set(err, CM_E_INVAL, "seq: no context");
    int s = cm_kv_seq_open(&c->kv);
    if (s < 0) return cm_err_set(err, CM_E_NOMEM, "seq: all %d sequences are open", c->n_seq_max);
    if (c->moe) cm_moe_seq_open(c->moe, s);
    return s;
}

/* The salt a sequence's blocks are registered under; 0 if they must stay private. */
static int seq_salt(const cm_ctx *c, int seq, uint64_t *salt) {
    *salt = 0;
    return c->moe ? cm_moe_seq_cache_salt(c->moe, seq, salt) : 1;
}

void cm_seq_close(cm_ctx *c, int seq) {
    if (!c || !seq_valid(c, seq)) return;
    if (c->moe) cm_moe_seq_close(c->moe, seq); /* frees the sequence's routing detail */
    uint64_t salt;
    int32_t tail = c->kv.cache_on && seq_salt(c, seq, &salt) ? cm_kv_seq_tail_block(&c->kv, seq) : -1;
    if (tail < 0) {
        cm_kv_seq_close(&c->kv, seq);
        return;
    }
    /* the partial last block stays as a tail; a MoE sequence's state at its last position goes with it */
    if (c->moe) cm_moe_seq_snapshot(c->moe, seq, cm_kv_block_extra(&c->kv, tail));
    cm_kv_seq_close_tail(&c->kv, seq, salt);
}

int cm_seq_len(const cm_ctx *c, int seq) {
    if (!c || !seq_valid(c, seq)) return CM_E_RANGE;
    return c->kv.seqs[seq].len;
}

int cm_seq_truncate(cm_ctx *c, int seq, int n, cm_err *err) {
    if (!c || !seq_valid(c, seq)) return cm_err_set(err, CM_E_RANGE, "seq: %d is not an open sequence", seq);
    if (n < 0 || n > c->kv.seqs[seq].len)
        return cm_err_set(err, CM_E_RANGE, "seq: cannot truncate to %d (length %d)", n, c->kv.seqs[seq].len);
    cm_kv_seq *s = &c->kv.seqs[seq];
    int len = s->len;
    if (c->moe) {
        int rc = cm_moe_seq_truncate_check(c->moe, seq, len, n, err);
        if (rc < 0) return rc;
    }
    if (cm_kv_seq_truncate(&c->kv, seq, n) < 0)
        return cm_err_set(err, CM_E_NOMEM, "seq: truncating %d into a shared block needs a free KV block", seq);
    if (c->moe) /* a block end: the state stored in the (kept) block that ends at n; a sparse MoE keeps no state */
        cm_moe_seq_truncate(c->moe, seq, len, n,
                            n > 0 && n % CM_KV_BLOCK == 0 ? cm_kv_block_extra(&c->kv, s->blocks[n / CM_KV_BLOCK - 1])
                                                          : NULL);
    return CM_OK;
}

int cm_seq_attach_prefix(cm_ctx *c, int seq, const int32_t *tokens, int n, cm_err *err) {
    if (!c || !seq_valid(c, seq)) return cm_err_set(err, CM_E_RANGE, "seq: %d is not an open sequence", seq);
    if (n < 0 || (n > 0 && !tokens)) return cm_err_set(err, CM_E_INVAL, "seq: bad prefix (%d tokens)", n);
    if (c->kv.seqs[seq].len != 0)
        return cm_err_set(err, CM_E_INVAL, "seq: a prefix can be attached only to an empty sequence (%d holds %d)",
                          seq, c->kv.seqs[seq].len);
    uint64_t salt;
    if (!c->kv.cache_on || n < 2 || !seq_salt(c, seq, &salt)) return 0;
    int32_t tail;
    int live;
    /* MoE state is known only at block ends and at a tail's end: partial tails only for dense models */
    int got = cm_kv_seq_attach(&c->kv, seq, tokens, n, n - 1, salt, c->moe != NULL, &tail, &live);
    if (got > 0 && c->moe) {
        unsigned char *snap = cm_kv_block_extra(&c->kv, tail >= 0 ? tail : c->kv.seqs[seq].blocks[got / CM_KV_BLOCK - 1]);
        if (live >= 0) cm_moe_seq_snapshot(c->moe, live, snap); /* the live sequence is exactly at got */
        cm_moe_seq_restore(c->moe, seq, snap);
    }
    return got;
}

int cm_seq_fork(cm_ctx *c, int src, cm_err *err) {
    if (!c || !seq_valid(c, src)) return cm_err_set(err, CM_E_RANGE, "seq: %d is not an open sequence", src);
    int d = cm_kv_seq_open(&c->kv);
    if (d < 0) return cm_err_set(err, CM_E_NOMEM, "seq: all %d sequences are open", c->n_seq_max);
    if (cm_kv_seq_fork(&c->kv, d, src) < 0) {
        cm_kv_seq_close(&c->kv, d);
        return cm_err_set(err, CM_E_NOMEM, "seq: no KV block left to copy sequence %d's last block", src);
    }
    if (c->moe) {
        cm_moe_seq_open(c->moe, d);
        cm_moe_seq_copy(c->moe, d, src);
    }
    return d;
}

int cm_seq_blocks_needed(const cm_ctx *c, int seq, int extra) {
    if (!c || !seq_valid(c, seq) || extra < 0) return CM_E_RANGE;
    return cm_kv_blocks_needed(&c->kv, seq, extra);
}

int cm_ctx_kv_check(const cm_ctx *c, char *why, size_t cap) {
    if (!c) return 0;
    return cm_kv_check(&c->kv, why, cap);
}

const cm_kv *cm_ctx_kv(const cm_ctx *c) { return c ? &c->kv : NULL; }

void cm_ctx_kv_stats(const cm_ctx *c, cm_kv_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!c) return;
    out->blocks_total = c->kv.n_blocks;
    out->blocks_used = c->kv.n_blocks - c->kv.n_free - c->kv.n_lru;
    out->block_tokens = CM_KV_BLOCK;
    out->blocks_cached = c->kv.n_lru;
    out->blocks_available = cm_kv_available(&c->kv);
    out->blocks_shared = c->kv.n_shared;
    out->prefix_query_tokens = c->kv.query_tokens;
    out->prefix_hit_tokens = c->kv.hit_tokens;
    out->evictions = c->kv.evictions;
}

/* ============================================================ the threads' shares of a layer */

/* Every step of a layer parallel over the batch's tokens gives each thread the same tokens
 * (token_split), so that the activations a thread writes are mostly those it reads in the next step:
 * passed between cores, they cost more than the arithmetic on them where the cores do not share a
 * cache (two vCPUs of a cloud machine at times: 2-thread prefill of the 45M model 1.2x one thread's
 * where two 1-thread forwards side by side ran 2x; docs/engine.md). A thread that has run its own
 * share takes what is left of the others' (cm_pool_run_split), so a preempted thread, or the longer
 * attention of later tokens, still leaves no thread idle. */

/* The per-token steps' tasks (c->row_task) and the threads' tokens: CM_ROWS_CHUNK tokens a task or a
 * few more, a task extending while the next token falls in the same KV block of the same sequence, so
 * that no two tasks write one block's transposed K (kv_put_k: a block's positions share each cache
 * line of it, which two threads writing at once would pass back and forth); thread i's tokens
 * [tok_first[i], tok_first[i + 1]) are about n / n_threads of them, cut at a task's start. Each token's
 * numbers are computed alone, so they do not depend on the split. */
static void token_split(cm_ctx *c, int n) {
    int tasks = 0;
    for (int i = 0; i < n; tasks++) {
        c->row_task[tasks] = i;
        int e = i + CM_ROWS_CHUNK < n ? i + CM_ROWS_CHUNK : n;
        while (e < n && c->batch->seq[e] == c->batch->seq[e - 1] && c->pos[e] / CM_KV_BLOCK == c->pos[e - 1] / CM_KV_BLOCK)
            e++;
        i = e;
    }
    c->row_task[tasks] = n;
    c->n_row_tasks = tasks;
    const int nt = c->n_threads;
    int t = 0;
    c->row_first[0] = c->tok_first[0] = 0;
    for (int i = 1; i < nt; i++) {
        int64_t want = (int64_t)n * i / nt;
        while (t < tasks && c->row_task[t + 1] <= want) t++;
        if (t < tasks && c->row_task[t + 1] - want < want - c->row_task[t]) t++; /* the nearer cut */
        c->row_first[i] = t;
        c->tok_first[i] = c->row_task[t];
    }
    c->row_first[nt] = tasks;
    c->tok_first[nt] = n;
}

/* c->split for a run of `groups` groups of `per` tasks, group g starting at token start[g] (or at
 * g * rows without start): thread i's share from the first group starting at or after its first token. */
static const int *split_groups(cm_ctx *c, const int32_t *start, int rows, int groups, int per) {
    int g = 0;
    c->split[0] = 0;
    for (int i = 1; i < c->n_threads; i++) {
        while (g < groups && (start ? start[g] : g * rows) < c->tok_first[i]) g++;
        c->split[i] = g * per;
    }
    c->split[c->n_threads] = groups * per;
    return c->split;
}

/* ============================================================ matrix products */

/* Up to three products sharing one input X (N, K): q/k/v, gate/up. */
typedef struct mm_op {
    const cm_tensor *w;       /* (M, K) */
    float *y;                 /* (N, M) */
    const cm_gemm_pack *pack; /* w repacked (the output head, the layers' matrices), or NULL */
    int head;                 /* the output head: a large matrix, streamed from memory once per call */
} mm_op;

typedef struct mm_job {
    cm_ctx *c;
    int n_ops;
    mm_op ops[3];
    const float *x;   /* (N, K) f32 */
    int xtype;        /* format of xv: F32, or Q8_0 / Q8_1 / Q8_K for int8 dots (decode) or the int8 GEMM */
    const void *xv;   /* the activations in xtype (sgemm reads x) */
    size_t xv_stride;
    int n;
    int64_t k;
    int64_t chunk;    /* rows of W per task */
    int tok;          /* the batch's tokens (not the output head's rows): tasks follow the layer's token split */
    int by_tokens;    /* the int8 GEMM split by tokens: task = thread's part * task0[n_ops] + rows' task */
    int64_t lo, hi;   /* one op: only rows [lo, hi) of its W (hi 0: all) */
    int task0[4];     /* first task of each op; task0[n_ops] = total */
} mm_job;

/* Task `task` of a run: op *o, rows [r0, r1) of its W; returns W. */
static const cm_tensor *mm_task_rows(const mm_job *j, int task, int *o, int64_t *r0, int64_t *r1) {
    int i = 0;
    while (task >= j->task0[i + 1]) i++;
    const cm_tensor *w = j->ops[i].w;
    *o = i;
    int64_t end = j->hi ? j->hi : w->ne1;
    *r0 = j->lo + (int64_t)(task - j->task0[i]) * j->chunk;
    *r1 = *r0 + j->chunk < end ? *r0 + j->chunk : end;
    return w;
}

static void mm_task_matvec(void *arg, int task, int thread) {
    (void)thread;
    const mm_job *j = arg;
    int o;
    int64_t r0, r1;
    const cm_tensor *w = mm_task_rows(j, task, &o, &r0, &r1);
    cm_matvec_rows(w->type, j->xtype, w->data, j->k, j->xv, j->xv_stride, j->n, j->ops[o].y, w->ne1, r0, r1);
}

static void mm_task_gemm_q(void *arg, int task, int thread) {
    const mm_job *j = arg;
    int o, t0 = 0, n = j->n;
    int64_t r0, r1;
    if (j->by_tokens) {
        int part = task / j->task0[j->n_ops];
        t0 = j->c->tok_first[part], n = j->c->tok_first[part + 1] - t0;
        task %= j->task0[j->n_ops];
    }
    const cm_tensor *w = mm_task_rows(j, task, &o, &r0, &r1);
    const char *xv = (const char *)j->xv + (size_t)t0 * j->xv_stride;
    float *y = j->ops[o].y + (size_t)t0 * (size_t)w->ne1;
    float *scratch = j->c->deq + (size_t)thread * (size_t)j->c->deq_floats;
    size_t bytes = (size_t)j->c->deq_floats * sizeof(float);
    if (j->ops[o].pack) cm_gemm_q_packed(j->ops[o].pack, xv, j->xv_stride, n, y, w->ne1, r0, r1, scratch, bytes);
    else cm_gemm_q(w->type, w->data, j->k, xv, j->xv_stride, n, y, w->ne1, r0, r1, scratch, bytes);
}

#define QUANT_ROWS 16
/* Rows [QUANT_ROWS task, QUANT_ROWS task + QUANT_ROWS) of x quantised to xtype (prefill: worth
 * spreading over the pool). */
static void mm_task_quantize(void *arg, int task, int thread) {
    (void)thread;
    const mm_job *j = arg;
    for (int r = QUANT_ROWS * task; r < QUANT_ROWS * task + QUANT_ROWS && r < j->n; r++)
        cm_vec_prepare(j->xtype, j->x + (size_t)r * j->k, (char *)j->xv + (size_t)r * j->xv_stride, j->k);
}

static void mm_task_gemm(void *arg, int task, int thread) {
    const mm_job *j = arg;
    int o;
    int64_t r0, r1;
    const cm_tensor *w = mm_task_rows(j, task, &o, &r0, &r1);
    const float *b;
    if (w->type == GGUF_TT_F32) {
        b = (const float *)w->data + r0 * j->k;
    } else {
        float *t = j->c->deq + (size_t)thread * (size_t)j->c->deq_floats;
        size_t rb = gguf_row_bytes(w->type, j->k);
        for (int64_t r = r0; r < r1; r++)
            cm_dequantize_row(w->type, (const char *)w->data + (size_t)r * rb, t + (r - r0) * j->k, j->k);
        b = t;
    }
    /* Y[:, r0:r1] (N, r1-r0) = X (N, K) B^T, B = W[r0:r1] (r1-r0, K) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, (int)(r1 - r0), (int)j->k, 1.0f, j->x,
                (int)j->k, b, (int)j->k, 0.0f, j->ops[o].y + r0, (int)w->ne1);
}

/* ops[i].y (N, M_i) = X (N, K) W_i^T for every op; all W_i have row length K. With hi > 0 (one op):
 * only the columns [lo, hi) of Y, from those rows of W. tok: X is the layer's batch (the threads'
 * tokens are c->tok_first's), not the output head's rows. */
static void mm_run_rows(cm_ctx *c, int n_ops, const mm_op *ops, const float *x, int n, int64_t k, int64_t lo,
                        int64_t hi, int tok) {
    mm_job j = {.c = c, .n_ops = n_ops, .x = x, .n = n, .k = k, .lo = lo, .hi = hi, .tok = tok};
    memcpy(j.ops, ops, (size_t)n_ops * sizeof *ops);
    int nt = c->n_threads;
    int64_t mmax = 0;
    for (int i = 0; i < n_ops; i++) mmax = ops[i].w->ne1 > mmax ? ops[i].w->ne1 : mmax;
    if (hi) mmax = hi - lo;
    /* Quantised weights meet activations quantised once per token to the int8 format they pair with
     * (Q8_0, Q8_1 or Q8_K, as cm_quant_vec_dot_type says; llama.cpp's scheme), X quantised once for
     * all ops that share it; decode (matvec) and prefill (int8 GEMM) take the same cm_qacc dot, so a
     * row's product never depends on the batch. Float weights, and every weight when exact
     * activations were asked for, keep X in f32 (the exact dequantised products). */
    int xt = c->exact_act ? -1 : cm_quant_vec_dot_type(ops[0].w->type), split = 0;
    for (int i = 1; i < n_ops; i++) {
        int t = cm_quant_vec_dot_type(ops[i].w->type);
        split |= xt >= 0 && t >= 0 && t != xt;
        if (t != xt) xt = -1;
    }
    if (split) { /* quantised weights of different pairings (a K-quant file's Q4_K beside Q6_K and Q8_0):
                  * each op with its own format, so a row's product never depends on its neighbours' */
        for (int i = 0; i < n_ops; i++) mm_run_rows(c, 1, &ops[i], x, n, k, lo, hi, tok);
        return;
    }
    void (*task_fn)(void *, int, int);
    if (n >= CM_GEMM_MIN_ROWS && xt < 0) {
        /* tiles that fit the dequantisation scratch, and at least two per thread for balance */
        int64_t tile = c->deq_floats / k;
        int64_t bal = (mmax + 2 * nt - 1) / (2 * nt);
        if (tile > bal) tile = bal;
        tile = (tile + 15) & ~(int64_t)15;
        if (tile * k > c->deq_floats) tile = c->deq_floats / k / 16 * 16;
        if (tile < 16) tile = 16;
        j.chunk = tile;
        task_fn = mm_task_gemm;
    } else {
        if (xt >= 0) {
            j.xtype = xt;
            j.xv = c->xq;
            j.xv_stride = cm_vec_row_bytes(xt, k);
            int qt = (n + QUANT_ROWS - 1) / QUANT_ROWS;
            if (n >= CM_GEMM_MIN_ROWS && tok)
                cm_pool_run_split(c->pool, mm_task_quantize, &j, split_groups(c, NULL, QUANT_ROWS, qt, 1));
            else if (n >= CM_GEMM_MIN_ROWS)
                cm_pool_run(c->pool, mm_task_quantize, &j, qt);
            else
                for (int r = 0; r < n; r++)
                    cm_vec_prepare(xt, x + (size_t)r * k, (char *)c->xq + (size_t)r * j.xv_stride, k);
        } else {
            j.xtype = GGUF_TT_F32;
            j.xv = x;
            j.xv_stride = (size_t)k * sizeof(float);
        }
        /* the int8 GEMM from the family's crossover on: the largest of the ops' (their types share
         * a pairing; a Q4_K_M layer's attn_v may be Q6_K beside Q4_K) */
        int gemm_rows = 0;
        for (int i = 0; i < n_ops && xt >= 0; i++) {
            /* packed: nothing to repack, so the GEMM from 2 rows on (one row: the matvec, which does
             * not compute a whole quad of tokens) */
            int r = ops[i].pack ? 2 : cm_gemm_q_min_rows(ops[i].w->type);
            if (r > gemm_rows) gemm_rows = r;
        }
        task_fn = xt >= 0 && n >= gemm_rows ? mm_task_gemm_q : mm_task_matvec;
        /* The int8 GEMM: about four tasks per thread over all ops' rows together (q is 7x larger than k
         * and v); it interleaves W in groups of 8 or 16 rows, so multiples of 16 suit both. The matvec
         * (decode): one contiguous share per thread, fewer boundaries where the row dots' stream of weights
         * ahead starts again (decode at 2 threads on Zen 5: 5-10% faster than four tasks a thread on 0.5B
         * models, more tasks slower still); a thread that comes late leaves its share to the others. */
        int64_t rows = 0;
        for (int i = 0; i < n_ops; i++) rows += ops[i].w->ne1;
        if (hi) rows = hi - lo;
        int64_t per = task_fn == mm_task_gemm_q ? (int64_t)nt * 4 : nt;
        int64_t chunk = nt == 1 ? mmax : (rows + per - 1) / per;
        chunk = (chunk + 15) & ~(int64_t)15;
        if (chunk < 16) chunk = 16;
        /* The batch's tokens, each thread's share of them at least MM_TILE_TOKENS: a task per op and
         * thread, its tokens against all of the op's rows, so that a thread reads the activations it
         * quantised and prepares each token once per op (rows split among the threads, every thread
         * would read every token's, and prepare each again per task). The token split as a whole, 2
         * threads, pp512 on the 45M model: about 1.05-1.1x where the cores share a cache, 1.35-1.4x where
         * they do not (docs/engine.md). */
        int part = n;
        for (int i = 0; tok && i < nt; i++)
            if (c->tok_first[i + 1] - c->tok_first[i] < part) part = c->tok_first[i + 1] - c->tok_first[i];
        if (task_fn == mm_task_gemm_q && tok && !hi && nt > 1 && part >= MM_TILE_TOKENS) {
            j.by_tokens = 1;
            chunk = (mmax + 15) & ~(int64_t)15;
        }
        j.chunk = chunk;
    }
    j.task0[0] = 0;
    for (int i = 0; i < n_ops; i++)
        j.task0[i + 1] = j.task0[i] + (int)(((hi ? hi - lo : ops[i].w->ne1) + j.chunk - 1) / j.chunk);
    if (j.by_tokens) {
        for (int i = 0; i <= nt; i++) c->split[i] = i * j.task0[n_ops];
        cm_pool_run_split(c->pool, task_fn, &j, c->split);
    } else {
        cm_pool_run(c->pool, task_fn, &j, j.task0[n_ops]);
    }
}

static void mm_run(cm_ctx *c, int n_ops, const mm_op *ops, const float *x, int n, int64_t k) {
    mm_run_rows(c, n_ops, ops, x, n, k, 0, 0, 1);
}

static void mm1(cm_ctx *c, const cm_tensor *w, const cm_gemm_pack *pk, const float *x, int n, float *y) {
    mm_op op = {w, y, pk, 0};
    mm_run(c, 1, &op, x, n, w->ne0);
}

/* ============================================================ attention */

typedef struct att_job {
    cm_ctx *c;
    int layer, n;
    int hg; /* query heads per task: the n_head / n_head_kv heads of one kv head, or 1 (a token a task,
             * not runs) */
} att_job;

/* The value sums of np (token, head) pairs over KV rows [a, b) of sequence s, accumulating into acc
 * (pair p at acc + p * att_acc_stride) with probabilities p at sc + p * n_ctx (indexed by row). */
static void att_values_rows(const cm_ctx *c, const cm_kv_seq *s, int layer, size_t head, int a, int b, float *acc,
                            const float *sc, int np) {
    const int kvt = c->kv.kv_type == CM_KV_F16 ? GGUF_TT_F16 : GGUF_TT_F32;
    const size_t row = (size_t)c->kv.kv_dim * c->kv.elt_bytes;
    const int E = c->m->info.head_dim;
    while (a < b) {
        int end = (a / CM_KV_BLOCK + 1) * CM_KV_BLOCK;
        if (end > b) end = b;
        const unsigned char *vb = (const unsigned char *)cm_kv_v(&c->kv, s, layer, a) + head;
        cm_att_values_heads(kvt, acc, c->att_acc_stride, sc + a, c->n_ctx, np, vb, row, end - a, E);
        a = end;
    }
}

/* task = run * (H / hg) + hg heads from h0 = (task % (H / hg)) * hg, all of one kv head, for the run's
 * tokens i (consecutive positions of one sequence): att[i, h] = softmax(q_i,h K^T / sqrt(E)) V over
 * positions 0..pos_i. The run's tokens and heads pass over each K and V row together
 * (cm_att_scores_heads, cm_att_values_heads: the rows converted once for all of them): the scores over
 * the last token's rows (an earlier token's extra scores go unused), the value sums over the first
 * token's rows for all, then each later token's own rows after them, in order. Every number is what
 * the token alone computes. */
static void att_task(void *arg, int task, int thread) {
    const att_job *j = arg;
    cm_ctx *c = j->c;
    const cm_model_info *in = &c->m->info;
    int H = in->n_head, E = in->head_dim, G = in->n_head_kv, hg = j->hg;
    int r = task / (H / hg), h0 = task % (H / hg) * hg, g = h0 / (H / G);
    int i0 = j->hg > 1 ? c->att_run[r] : r, nq = j->hg > 1 ? c->att_run[r + 1] - i0 : 1, np = nq * hg;
    const cm_kv_seq *s = &c->kv.seqs[c->batch->seq[i0]];
    int T0 = c->pos[i0] + 1, T1 = T0 + nq - 1; /* the first and last token's rows */
    size_t slot = (size_t)thread * (size_t)c->att_run_max * (size_t)(H / G);
    float *sc = c->scores + slot * (size_t)c->n_ctx;
    float *acc = c->att_acc + slot * (size_t)c->att_acc_stride;
    const float *q = c->q + (size_t)i0 * H * E + (size_t)h0 * E;
    size_t qs = (size_t)E;
    if (nq > 1) { /* the run's queries side by side: pair t * hg + h is token i0 + t, head h0 + h */
        float *qb = c->att_q + slot * (size_t)E;
        for (int t = 0; t < nq; t++)
            memcpy(qb + (size_t)t * hg * E, c->q + (size_t)(i0 + t) * H * E + (size_t)h0 * E, (size_t)hg * E * sizeof(float));
        q = qb;
    }
    const float scale = (float)(1.0 / sqrt((double)E));
    /* a block at a time, in the pool's type: the kv head's E rows of its transposed K (CM_KV_BLOCK
     * keys each), its V rows (E elements every C) */
    const int kvt = c->kv.kv_type == CM_KV_F16 ? GGUF_TT_F16 : GGUF_TT_F32;
    const size_t head = (size_t)g * E * c->kv.elt_bytes;
    for (int t0 = 0; t0 < T1; t0 += CM_KV_BLOCK) {
        const unsigned char *kt = (const unsigned char *)cm_kv_kt(&c->kv, s, j->layer, t0) + head * CM_KV_BLOCK;
        int nt = T1 - t0 < CM_KV_BLOCK ? T1 - t0 : CM_KV_BLOCK;
        cm_att_scores_heads(kvt, kt, CM_KV_BLOCK, nt, q, qs, np, E, scale, sc + t0, (size_t)c->n_ctx);
    }
    for (int p = 0; p < np; p++) cm_softmax(sc + (size_t)p * c->n_ctx, T0 + p / hg);
    memset(acc, 0, (size_t)np * c->att_acc_stride * sizeof(float));
    att_values_rows(c, s, j->layer, head, 0, T0, acc, sc, np);
    for (int t = 1; t < nq; t++)
        att_values_rows(c, s, j->layer, head, T0, T0 + t, acc + (size_t)t * hg * c->att_acc_stride,
                        sc + (size_t)t * hg * c->n_ctx, hg);
    for (int t = 0; t < nq; t++) {
        float *out = c->att + (size_t)(i0 + t) * H * E + (size_t)h0 * E;
        for (int h = 0; h < hg; h++)
            memcpy(out + (size_t)h * E, acc + (size_t)(t * hg + h) * c->att_acc_stride, (size_t)E * sizeof(float));
    }
}

/* The batch's attention runs into c->att_run: consecutive tokens of one sequence at consecutive
 * positions (a prompt's chunk), att_run_max at most. Returns their count. */
static int att_runs(cm_ctx *c, int n) {
    int r = 0;
    for (int i = 0; i < n; i++) {
        int start = r ? c->att_run[r - 1] : -1;
        if (!r || i - start >= c->att_run_max || c->batch->seq[i] != c->batch->seq[i - 1] || c->pos[i] != c->pos[i - 1] + 1)
            c->att_run[r++] = i;
    }
    c->att_run[r] = n;
    return r;
}

/* ============================================================ element-wise, parallel over rows */

typedef struct silu_job {
    float *g, *u;
    int64_t f;
    int n;
} silu_job;

/* rows [SILU_ROWS task, SILU_ROWS task + SILU_ROWS): a task of one row was too short for the ticket's
 * cost (the pool's atomic passed between the threads per row) */
#define SILU_ROWS 8
static void silu_task(void *arg, int task, int thread) {
    (void)thread;
    const silu_job *j = arg;
    for (int i = SILU_ROWS * task; i < SILU_ROWS * task + SILU_ROWS && i < j->n; i++)
        cm_silu_mul(j->g + (size_t)i * j->f, j->u + (size_t)i * j->f, j->f);
}

/* Position pos's K row k (kv_dim floats) into its block's transposed K (kv.h: element c at c *
 * CM_KV_BLOCK + pos % CM_KV_BLOCK), in the pool's type. */
static void kv_put_k(const cm_kv *kv, const cm_kv_seq *s, int il, int pos, const float *k) {
    const size_t p = (size_t)(pos % CM_KV_BLOCK), C = (size_t)kv->kv_dim;
    if (kv->kv_type == CM_KV_F16) {
        uint16_t *kt = cm_kv_kt(kv, s, il, pos), h[256];
        for (size_t c0 = 0; c0 < C; c0 += 256) {
            size_t m = C - c0 < 256 ? C - c0 : 256;
            cm_f32_to_f16_row(k + c0, h, (int64_t)m);
            for (size_t c = 0; c < m; c++) kt[(c0 + c) * CM_KV_BLOCK + p] = h[c];
        }
    } else {
        float *kt = cm_kv_kt(kv, s, il, pos);
        for (size_t c = 0; c < C; c++) kt[c * CM_KV_BLOCK + p] = k[c];
    }
}

/* ============================================================ per-token steps, parallel over tokens */

typedef struct rows_job {
    cm_ctx *c;
    int il, n;
    const float *norm; /* (D) the rmsnorm's weights, or NULL (add_norm_task: the add alone) */
} rows_job;

/* Runs fn over the batch's tokens, a task of c->row_task each (token_split): across the pool for a
 * prefill batch (so that the steps between the matrix products leave no thread idle), each thread its
 * own tokens first; inline for decode. */
static void rows_run(cm_ctx *c, void (*fn)(void *, int, int), rows_job *j) {
    if (j->n >= CM_GEMM_MIN_ROWS && c->n_threads > 1) cm_pool_run_split(c->pool, fn, j, c->row_first);
    else
        for (int t = 0; t < c->n_row_tasks; t++) fn(j, t, 0);
}

#define ROWS_OF(j, task, i) for (int i = (j)->c->row_task[task]; i < (j)->c->row_task[(task) + 1]; i++)

/* x_i = the embedding of token i, xn_i = rmsnorm(x_i) * norm */
static void embed_norm_task(void *arg, int task, int thread) {
    (void)thread;
    const rows_job *j = arg;
    const cm_model *m = j->c->m;
    int64_t D = m->info.n_embd;
    size_t erb = gguf_row_bytes(m->tok_embd.type, D);
    ROWS_OF(j, task, i) {
        cm_dequantize_row(m->tok_embd.type, (const char *)m->tok_embd.data + (size_t)j->c->batch->token[i] * erb,
                          j->c->x + i * D, D);
        cm_rmsnorm(j->c->xn + i * D, j->c->x + i * D, j->norm, D, m->info.rms_eps);
    }
}

/* x_i += proj_i, then xn_i = rmsnorm(x_i) * norm unless norm is NULL */
static void add_norm_task(void *arg, int task, int thread) {
    (void)thread;
    const rows_job *j = arg;
    const cm_model_info *in = &j->c->m->info;
    int64_t D = in->n_embd;
    ROWS_OF(j, task, i) {
        cm_add(j->c->x + i * D, j->c->proj + i * D, D);
        if (j->norm) cm_rmsnorm(j->c->xn + i * D, j->c->x + i * D, j->norm, D, in->rms_eps);
    }
}

/* q, k, v of token i: biases, qwen3's per-head norms, rope at its position; k and v into its KV row */
static void qkv_task(void *arg, int task, int thread) {
    (void)thread;
    const rows_job *j = arg;
    cm_ctx *c = j->c;
    const cm_model_info *in = &c->m->info;
    const cm_layer *l = &c->m->layers[j->il];
    int64_t E = in->head_dim, H = in->n_head, G = in->n_head_kv, Q = H * E, C = G * E;
    int h2 = (int)E / 2, il = j->il;
    ROWS_OF(j, task, i) {
        float *q = c->q + i * Q, *k = c->k + i * C, *v = c->v + i * C;
        if (in->qkv_bias) {
            cm_add(q, l->bq.data, Q);
            cm_add(k, l->bk.data, C);
            cm_add(v, l->bv.data, C);
        }
        if (l->q_norm.data) { /* qwen3: every head normalised on its own, before rope */
            for (int h = 0; h < H; h++) cm_rmsnorm(q + h * E, q + h * E, l->q_norm.data, E, in->rms_eps);
            for (int h = 0; h < G; h++) cm_rmsnorm(k + h * E, k + h * E, l->k_norm.data, E, in->rms_eps);
        }
        const float *cs = c->rope_cos + (size_t)c->pos[i] * h2, *sn = c->rope_sin + (size_t)c->pos[i] * h2;
        for (int h = 0; h < H; h++) cm_rope(q + h * E, cs, sn, (int)E, in->rope_neox);
        for (int h = 0; h < G; h++) cm_rope(k + h * E, cs, sn, (int)E, in->rope_neox);
        const cm_kv_seq *s = &c->kv.seqs[c->batch->seq[i]];
        kv_put_k(&c->kv, s, il, c->pos[i], k);
        if (c->kv.kv_type == CM_KV_F16) cm_f32_to_f16_row(v, cm_kv_v(&c->kv, s, il, c->pos[i]), C);
        else memcpy(cm_kv_v(&c->kv, s, il, c->pos[i]), v, (size_t)C * sizeof(float));
    }
}

/* ============================================================ forward */

static void forward_layer(cm_ctx *c, int il, int n) {
    const cm_model *m = c->m;
    const cm_model_info *in = &m->info;
    const cm_layer *l = &m->layers[il];
    int64_t D = in->n_embd, H = in->n_head, F = in->n_ff;
    rows_job rj = {c, il, n, l->attn_norm.data};

    token_split(c, n); /* every layer: a batch nested in the yield hook between layers takes the same arrays */
    if (il == 0) rows_run(c, embed_norm_task, &rj); /* later layers' norm: fused into the previous layer's last add */
    mm_op qkv[3] = {{&l->wq, c->q, lpack(c, il, LP_Q), 0}, {&l->wk, c->k, lpack(c, il, LP_K), 0},
                    {&l->wv, c->v, lpack(c, il, LP_V), 0}};
    mm_run(c, 3, qkv, c->xn, n, D);
    rows_run(c, qkv_task, &rj);
    /* a task per kv head's group of query heads (each K and V block read once for all of them), unless
     * the batch has fewer groups than threads: then a task per query head; the results do not depend
     * on the split */
    int hg = (int)(H / in->n_head_kv);
    if (n * (int)in->n_head_kv < c->n_threads) hg = 1;
    att_job aj = {c, il, n, hg};
    const int *share = hg > 1 ? split_groups(c, c->att_run, 0, att_runs(c, n), (int)H / hg) : split_groups(c, NULL, 1, n, (int)H);
    cm_pool_run_split(c->pool, att_task, &aj, share);

    mm1(c, &l->wo, lpack(c, il, LP_O), c->att, n, c->proj);
    rj.norm = l->ffn_norm.data;
    rows_run(c, add_norm_task, &rj);
    rj.norm = il + 1 < in->n_layer ? m->layers[il + 1].attn_norm.data : NULL; /* the next layer's */
    if (c->moe && !l->w_gate.data) { /* hybrid and sparse MoE: the experts replace the FFN */
        cm_moe_ffn(c->moe, il, n, c->xn, c->proj);
        rows_run(c, add_norm_task, &rj);
        return;
    }
    mm_op gu[2] = {{&l->w_gate, c->hg, lpack(c, il, LP_GATE), 0}, {&l->w_up, c->hu, lpack(c, il, LP_UP), 0}};
    mm_run(c, 2, gu, c->xn, n, D);
    if (c->moe) cm_mole_gate_up(c->moe, il, n, c->xn, c->hg, c->hu); /* MoLE adapters on their tokens */
    silu_job sj = {c->hg, c->hu, F, n};
    if (n == 1)
        cm_silu_mul(c->hg, c->hu, F);
    else
        cm_pool_run_split(c->pool, silu_task, &sj, split_groups(c, NULL, SILU_ROWS, (n + SILU_ROWS - 1) / SILU_ROWS, 1));
    mm1(c, &l->w_down, lpack(c, il, LP_DOWN), c->hg, n, c->proj);
    if (c->moe) cm_mole_down(c->moe, il, n, c->hg, c->proj);
    rows_run(c, add_norm_task, &rj);
}

/* Exchanges the state a batch keeps across layers with the nested set (cm_ctx.nest). */
static void nest_swap(cm_ctx *c) {
    float *f = c->x; c->x = c->nest.x; c->nest.x = f;
    f = c->xn; c->xn = c->nest.xn; c->nest.xn = f;
    f = c->outn; c->outn = c->nest.outn; c->nest.outn = f;
    f = c->logits; c->logits = c->nest.logits; c->nest.logits = f;
    int32_t *i = c->pos; c->pos = c->nest.pos; c->nest.pos = i;
    i = c->logit_row; c->logit_row = c->nest.logit_row; c->nest.logit_row = i;
    i = c->out_idx; c->out_idx = c->nest.out_idx; c->nest.out_idx = i;
    i = c->seq_cnt; c->seq_cnt = c->nest.seq_cnt; c->nest.seq_cnt = i;
    unsigned char **sn = c->snap; c->snap = c->nest.snap; c->nest.snap = sn;
    const cm_batch *b = c->batch; c->batch = c->nest.batch; c->nest.batch = b;
}

/* The forward pass of b; outer: the tokens per sequence of the batch whose yield hook runs this one
 * (none of its sequences may appear in b), NULL when not nested. */
static int forward_run(cm_ctx *c, const cm_batch *b, const int32_t *outer, cm_err *err);

int cm_forward(cm_ctx *c, const cm_batch *b, cm_err *err) {
    if (!c || !b || !b->token || !b->seq) return cm_err_set(err, CM_E_INVAL, "forward: no context or batch");
    if (!c->batch) return forward_run(c, b, NULL, err);
    /* inside the yield hook of the batch in flight */
    if (!c->nest.n_max || c->nest.batch || b->yield || b->n > c->nest.n_max)
        return cm_err_set(err, CM_E_INVAL, "forward: a nested batch (%d tokens) needs n_batch_nested (%d) >= its "
                          "tokens, no hook of its own and no other nested batch in flight", b->n, c->nest.n_max);
    nest_swap(c);
    int rc = forward_run(c, b, c->nest.seq_cnt, err); /* nest holds the outer batch's state meanwhile */
    nest_swap(c);
    return rc;
}

static int forward_run(cm_ctx *c, const cm_batch *b, const int32_t *outer, cm_err *err) {
    const cm_model *m = c->m;
    const cm_model_info *in = &m->info;
    int n = b->n;
    if (n < 1 || n > c->n_batch_max)
        return cm_err_set(err, CM_E_INVAL, "forward: batch of %d tokens (1..%d)", n, c->n_batch_max);
    c->n_last = 0; /* the previous batch's logits are gone whatever happens */

    /* validate everything before touching any state */
    memset(c->seq_cnt, 0, (size_t)c->n_seq_max * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        if (b->token[i] < 0 || b->token[i] >= in->n_vocab)
            return cm_err_set(err, CM_E_RANGE, "forward: token %d at %d is outside the vocabulary (%d)",
                              b->token[i], i, in->n_vocab);
        if (!seq_valid(c, b->seq[i]))
            return cm_err_set(err, CM_E_RANGE, "forward: sequence %d at %d is not open", b->seq[i], i);
        if (outer && outer[b->seq[i]])
            return cm_err_set(err, CM_E_INVAL, "forward: sequence %d at %d is in the batch whose hook runs this one",
                              b->seq[i], i);
        c->seq_cnt[b->seq[i]]++;
    }
    int64_t blocks = 0;
    for (int s = 0; s < c->n_seq_max; s++) {
        if (!c->seq_cnt[s]) continue;
        if (c->kv.seqs[s].len + c->seq_cnt[s] > c->n_ctx)
            return cm_err_set(err, CM_E_RANGE, "forward: sequence %d would hold %d positions (n_ctx %d)", s,
                              c->kv.seqs[s].len + c->seq_cnt[s], c->n_ctx);
        blocks += cm_kv_blocks_needed(&c->kv, s, c->seq_cnt[s]);
    }
    if (blocks > cm_kv_available(&c->kv))
        return cm_err_set(err, CM_E_NOMEM, "forward: KV pool exhausted (need %lld blocks, %d free or cached)",
                          (long long)blocks, cm_kv_available(&c->kv));
    if (c->moe) { /* segment mode and adapter sets; seq_rem is free scratch until below */
        for (int s = 0; s < c->n_seq_max; s++) c->seq_rem[s] = c->kv.seqs[s].len;
        int rc = cm_moe_batch_check(c->moe, b, c->seq_rem, c->seq_cnt, err);
        if (rc < 0) return rc;
    }
    /* logits rows: as flagged, or each sequence's last token in the batch */
    memcpy(c->seq_rem, c->seq_cnt, (size_t)c->n_seq_max * sizeof(int32_t));
    int n_out = 0;
    for (int i = 0; i < n; i++) {
        int want = b->logits ? b->logits[i] != 0 : --c->seq_rem[b->seq[i]] == 0;
        if (want && n_out >= c->n_logits_max)
            return cm_err_set(err, CM_E_NOMEM, "forward: more than %d logits rows requested", c->n_logits_max);
        c->logit_row[i] = want ? n_out : -1;
        if (want) c->out_idx[n_out++] = i;
    }

    /* commit: reserve KV blocks and assign positions */
    for (int s = 0; s < c->n_seq_max; s++)
        if (c->seq_cnt[s]) cm_kv_seq_reserve(&c->kv, s, c->seq_cnt[s]);
    memset(c->seq_cnt, 0, (size_t)c->n_seq_max * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        cm_kv_seq *s = &c->kv.seqs[b->seq[i]];
        int p = c->pos[i] = s->len + c->seq_cnt[b->seq[i]]++;
        if (s->toks) s->toks[p] = b->token[i];
        c->snap[i] = c->moe && (p + 1) % CM_KV_BLOCK == 0 ? cm_kv_block_extra(&c->kv, s->blocks[p / CM_KV_BLOCK]) : NULL;
    }
    c->batch = b;
    if (c->moe) cm_moe_batch_begin(c->moe, b, c->pos, c->snap);

    int64_t D = in->n_embd;
    for (int il = 0; il < in->n_layer; il++) { /* layer 0 looks the embeddings up */
        forward_layer(c, il, n);
        if (b->yield) b->yield(b->yield_ud);
    }

    for (int r = 0; r < n_out; r++)
        cm_rmsnorm(c->outn + r * D, c->x + (size_t)c->out_idx[r] * D, m->output_norm.data, D, in->rms_eps);
    mm_op head = {&m->output, c->logits, c->out_pack, 1};
    if (n_out && b->yield && (n_out < CM_GEMM_MIN_ROWS || (!c->exact_act && cm_quant_vec_dot_type(m->output.type) >= 0))) {
        /* the output head is most of a decode step of a small model with a large vocabulary: it yields
         * too, every yield_rows rows of it. A row's logits are the same products either way:
         * the matvec kernels and the int8 GEMM compute each output on its own (sgemm, for float weights
         * with many rows, does not slice) */
        for (int64_t v0 = 0; v0 < in->n_vocab; v0 += c->yield_rows) {
            int64_t v1 = v0 + c->yield_rows < in->n_vocab ? v0 + c->yield_rows : in->n_vocab;
            mm_run_rows(c, 1, &head, c->outn, n_out, D, v0, v1, 0);
            b->yield(b->yield_ud);
        }
    } else if (n_out) {
        mm_run_rows(c, 1, &head, c->outn, n_out, D, 0, 0, 0);
    }

    for (int s = 0; s < c->n_seq_max; s++) c->kv.seqs[s].len += c->seq_cnt[s];
    if (c->moe) cm_moe_batch_end(c->moe);
    if (c->kv.cache_on) /* completed blocks join the prefix cache */
        for (int s = 0; s < c->n_seq_max; s++) {
            uint64_t salt;
            if (!c->seq_cnt[s]) continue;
            if (seq_salt(c, s, &salt)) cm_kv_seq_publish(&c->kv, s, salt);
            else cm_kv_seq_no_cache(&c->kv, s);
        }
    c->n_last = n;
    c->last_logit_row = c->logit_row;
    c->last_logits = c->logits;
    c->batch = NULL;
    return CM_OK;
}

cm_moe_ctx *cm_ctx_moe(const cm_ctx *c) { return c ? c->moe : NULL; }

const float *cm_logits(const cm_ctx *c, int i) {
    if (!c || i < 0 || i >= c->n_last || c->last_logit_row[i] < 0) return NULL;
    return c->last_logits + (size_t)c->last_logit_row[i] * (size_t)c->m->info.n_vocab;
}

typedef struct argmax_job {
    const cm_ctx *c;
    const int *rows;
    int32_t *out;
} argmax_job;

static void argmax_task(void *arg, int task, int thread) {
    (void)thread;
    const argmax_job *j = arg;
    j->out[task] = (int32_t)cm_argmax(cm_logits(j->c, j->rows[task]), j->c->m->info.n_vocab);
}

int cm_logits_argmax(cm_ctx *c, int n, const int *rows, int32_t *out) {
    if (!c || n < 0 || (n > 0 && (!rows || !out))) return -1;
    for (int i = 0; i < n; i++)
        if (!cm_logits(c, rows[i])) return -1;
    argmax_job j = {c, rows, out};
    cm_pool_run(c->pool, argmax_task, &j, n);
    return 0;
}
