/*
 * test_kv.c - KV memory: block bytes, the prefix cache, forks and block-boundary truncation (engine/kv.c, forward.c, moe.c).
 *
 * The reference for every check is a COLD run: the same tokens in a fresh context without the cache.
 * Every test runs twice, with f32 and with f16 K/V (cm_ctx_params.kv_type): the invariants are the same
 * for both, and a cold run is the reference in the same type.
 * Models: dense qwen2 and llama fixtures; the hybrid fixtures with their segment window patched to 12
 * and 24 (so a KV block boundary falls inside a window and the pooled window state must travel with
 * the block); the MoLE fixture with AUTO adapter routing (the fence tracker state travels too); the
 * sparse qwen3moe fixture (no state beyond K/V); the route "previous" hybrid fixtures, windows patched
 * to 12 and 24 likewise (the last complete window's descriptor travels as well).
 *
 *   cache_hit_equals_cold     attach a cached prefix, continue: logits == cold at every position
 *   options_and_modes_isolate a different MoLE language or reference segment mode never shares blocks
 *   evicted_parent_invalidates_children  a block that left the index is never reached through again
 *   fork_equals_cold          n > 1: forks share full blocks, copy the partial one, continue exactly
 *   truncate_at_block_ends    hybrid/MoLE truncation to block ends (a sparse MoE's anywhere); dense
 *                             copy-on-write of shared blocks
 *   eviction_under_pressure   a pool far smaller than the traffic: results stay exact, LRU evicts
 *   random_soak               random opens/attaches/forwards/forks/truncates/closes; bookkeeping sound
 *                             after every operation, no block leaked at the end
 *   kv_block_bytes_is_the_allocation  cm_ctx_kv_block_bytes equals the block size the context allocates
 *                             and a plain count of what a block holds (K, V, the MoE routing state);
 *                             f16 K and V take half the bytes of f32
 *   prefault_makes_the_pool_resident  kv_prefault: the whole pool resident at creation, not without it
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "codemoe.h"
#include "kv.h"
#include "test.h"

#define MAXT 256
/* Prefill in other chunkings is not bit-identical (sgemm vs matvec), but close: 2e-5. With f16 K/V such
 * a 1e-7 difference can round a K or V element to the neighbouring half float (a relative step of up to
 * 2^-11), so the same comparison differs by up to ~3e-4 (measured on these fixtures): 1e-3. A wrong or
 * stale block moves logits by 1e-1 and more. */
#define TOL (kv_type == CM_KV_F16 ? 1e-3 : 2e-5)

static char tmpdir[256];
static int kv_type; /* CM_KV_F32 or CM_KV_F16: the type of every context the tests make */

typedef struct model_case {
    const char *name;   /* for messages */
    cm_model *m;
    int mole;           /* set a language option */
} model_case;

static cm_model *load_path(const char *path) {
    cm_err err = {0};
    cm_model_params mp = {0};
    cm_model *m = cm_model_load(path, &mp, &err);
    if (!m) fprintf(stderr, "%s: %s\n", path, err.msg);
    return m;
}

/* A hybrid fixture with another segment window (the fixtures' 4 and 8 divide the block size). */
static cm_model *load_hybrid_window(const char *fixture, uint32_t window) {
    char dst[512];
    snprintf(dst, sizeof dst, "%s/%s-w%u.gguf", tmpdir, fixture, window);
    char src[128];
    snprintf(src, sizeof src, "models/%s.gguf", fixture);
    if (test_patch_gguf_key(src, dst, "multipl_moe.segment.window", 0, &window, 4) < 0) return NULL;
    return load_path(dst);
}

static cm_ctx *new_ctx(const cm_model *m, int n_seq, int kv_tokens, int cache) {
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = n_seq, .n_ctx = MAXT, .n_batch_max = MAXT,
                        .kv_tokens = kv_tokens, .prefix_cache = cache, .kv_type = kv_type};
    cm_err err = {0};
    cm_ctx *c = cm_ctx_create(m, &cp, &err);
    if (!c) fprintf(stderr, "ctx: %s\n", err.msg);
    return c;
}

static int open_seq(cm_ctx *c, const model_case *mc, int lang) {
    cm_err err = {0};
    int s = cm_seq_open(c, &err);
    if (s >= 0 && mc->mole) {
        cm_seq_options o;
        cm_seq_options_default(&o);
        o.language = lang;
        if (cm_seq_set_options(c, s, &o, &err) < 0) fprintf(stderr, "options: %s\n", err.msg);
    }
    return s;
}

/* Feeds tok[from..to) to seq in chunks of `step`, logits of every fed position into out[pos - from]. */
static int feed(cm_ctx *c, int seq, const int32_t *tok, int from, int to, int step, int V, float *out) {
    int32_t seqs[MAXT];
    int8_t want[MAXT];
    for (int i = 0; i < MAXT; i++) seqs[i] = seq, want[i] = 1;
    for (int i0 = from; i0 < to; i0 += step) {
        int k = to - i0 < step ? to - i0 : step;
        cm_batch b = {.n = k, .token = tok + i0, .seq = seqs, .logits = want};
        cm_err err = {0};
        int rc = cm_forward(c, &b, &err);
        if (rc) {
            fprintf(stderr, "forward: %s\n", err.msg);
            return rc;
        }
        if (out)
            for (int i = 0; i < k; i++) memcpy(out + (size_t)(i0 + i - from) * V, cm_logits(c, i), (size_t)V * 4);
    }
    return 0;
}

static double max_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) {
        double x = fabs((double)a[i] - (double)b[i]);
        if (!(x <= d)) d = x;
    }
    return d;
}

/* Logits of every position of tok[0..n) in a fresh context without the cache: (n, V). */
static float *cold(const model_case *mc, const int32_t *tok, int n, int lang) {
    int V = cm_model_get_info(mc->m)->n_vocab;
    float *out = malloc((size_t)n * V * sizeof *out);
    cm_ctx *c = new_ctx(mc->m, 1, 0, 0);
    int s = c ? open_seq(c, mc, lang) : -1;
    if (!out || s < 0 || feed(c, s, tok, 0, n, n, V, out)) {
        free(out);
        out = NULL;
    }
    cm_ctx_free(c);
    return out;
}

static void random_tokens(int32_t *t, int n, int V, unsigned *rng) {
    for (int i = 0; i < n; i++) {
        *rng = *rng * 1103515245u + 12345u;
        t[i] = (int32_t)((*rng >> 8) % (unsigned)(V - 8)); /* no specials at the top */
    }
}

/* Test tokens: random for most models; for MoLE, Markdown with a rust block and then an open python
 * block, so that every block boundary falls inside a fence and the tracker state must travel. */
static void case_tokens(const model_case *mc, int32_t *t, int n, unsigned *rng) {
    int V = cm_model_get_info(mc->m)->n_vocab;
    if (!mc->mole) {
        random_tokens(t, n, V, rng);
        return;
    }
    char text[4096];
    int len = snprintf(text, sizeof text, "Prose first.\n```rust\nfn main() {\n    let x = 1;\n}\n```\n```python\n");
    for (int i = 0; len < 3000; i++) {
        *rng = *rng * 1103515245u + 12345u;
        len += snprintf(text + len, sizeof text - (size_t)len, "def f%u(a, b):\n    return a + b * %u\n", i,
                        (*rng >> 8) % 100);
    }
    cm_err err = {0};
    int got = cm_tokenize(mc->m, text, (size_t)len, 0, t, n, &err);
    if (got < n) fprintf(stderr, "case_tokens: only %d tokens\n", got);
}

static int check_sound(cm_ctx *c) {
    char why[256] = "";
    int bad = cm_ctx_kv_check(c, why, sizeof why);
    if (bad) fprintf(stderr, "kv check: %d bad: %s\n", bad, why);
    return bad;
}

/* Sound bookkeeping and no block held by any sequence (cached blocks may remain). */
static int all_released(cm_ctx *c) {
    cm_kv_stats st;
    cm_ctx_kv_stats(c, &st);
    if (st.blocks_used) fprintf(stderr, "%d blocks still held\n", st.blocks_used);
    return check_sound(c) == 0 && st.blocks_used == 0;
}

static model_case cases[8];
static int n_cases;

static void load_cases(void) {
    static const char *dense[] = {"models/qwen2-gqa.gguf", "models/llama-mha.gguf"};
    for (int i = 0; i < 2; i++) cases[n_cases++] = (model_case){dense[i], load_path(test_fixture(dense[i])), 0};
    cases[n_cases++] = (model_case){"hybrid-max window 12", load_hybrid_window("hybrid-max", 12), 0};
    cases[n_cases++] = (model_case){"hybrid-mean window 24", load_hybrid_window("hybrid-mean", 24), 0};
    cases[n_cases++] = (model_case){"mole", load_path(test_fixture("models/mole.gguf")), 1};
    cases[n_cases++] = (model_case){"qwen3moe", load_path(test_fixture("models/qwen3moe.gguf")), 0};
    /* route "previous": the last complete window's descriptor travels with the block too */
    cases[n_cases++] = (model_case){"hybrid-prev-max window 12", load_hybrid_window("hybrid-prev-max", 12), 0};
    cases[n_cases++] = (model_case){"hybrid-prev-mean window 24", load_hybrid_window("hybrid-prev-mean", 24), 0};
}

/* ------------------------------------------------------------ tests */

TEST(cache_hit_equals_cold) {
    for (int ci = 0; ci < n_cases; ci++) {
        const model_case *mc = &cases[ci];
        ASSERT_TRUE(mc->m);
        int V = cm_model_get_info(mc->m)->n_vocab;
        unsigned rng = 7u + (unsigned)ci;
        int32_t tok[150];
        case_tokens(mc, tok, 150, &rng);
        float *ref = cold(mc, tok, 150, 1);
        float *got = malloc((size_t)150 * V * sizeof *got);
        ASSERT_TRUE(ref && got);
        cm_ctx *c = new_ctx(mc->m, 3, 0, 1);
        ASSERT_TRUE(c);
        cm_err err = {0};
        /* A computes 110 positions in odd chunks (3 full blocks and a 14-position tail) and ends */
        int a = open_seq(c, mc, 1);
        ASSERT_EQ_INT(feed(c, a, tok, 0, 110, 7, V, NULL), 0);
        cm_seq_close(c, a);
        cm_kv_stats st;
        cm_ctx_kv_stats(c, &st);
        ASSERT_EQ_INT(st.blocks_used, 0);
        ASSERT_EQ_INT(st.blocks_cached, 4);
        /* E diverges from A inside the tail, at 100: a dense model reuses 96 + 4 tail positions; MoE
         * state exists only at the tail's end, so a MoE model reuses the 96 of the full blocks */
        int32_t alt[120];
        memcpy(alt, tok, 100 * sizeof *alt);
        random_tokens(alt + 100, 20, V, &rng);
        float *ref_alt = cold(mc, alt, 120, 1);
        ASSERT_TRUE(ref_alt);
        int e = open_seq(c, mc, 1);
        int want = ci >= 2 ? 96 : 100; /* cases 2.. are the MoE models */
        ASSERT_EQ_INT(cm_seq_attach_prefix(c, e, alt, 120, &err), want);
        ASSERT_EQ_INT(feed(c, e, alt, want, 120, 20, V, got), 0);
        double d = max_diff(got, ref_alt + (size_t)want * V, (size_t)(120 - want) * V);
        if (!(d <= TOL)) TEST_FAIL_("%s: after a %d-token partial-tail hit, max diff %g", mc->name, want, d);
        cm_seq_close(c, e);
        free(ref_alt);
        /* B reuses A's blocks and whole tail (copied: it stays cached) and continues to 150 */
        int b = open_seq(c, mc, 1);
        ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 150, &err), 110);
        ASSERT_EQ_INT(cm_seq_len(c, b), 110);
        ASSERT_EQ_INT(feed(c, b, tok, 110, 150, 5, V, got), 0);
        d = max_diff(got, ref + (size_t)110 * V, (size_t)40 * V);
        if (!(d <= TOL)) TEST_FAIL_("%s: after a 110-token hit, max diff %g", mc->name, d);
        /* C, while B is still open, reuses B's 4 full blocks (shared, not copied) and, for a dense model,
         * 21 rows of B's live partial block (copied; the last prompt token is always computed). MoE
         * models would need B's whole partial block (their state is B's, at B's end) */
        int c2 = open_seq(c, mc, 1);
        int live = ci >= 2 ? 128 : 149;
        ASSERT_EQ_INT(cm_seq_attach_prefix(c, c2, tok, 150, &err), live);
        cm_ctx_kv_stats(c, &st);
        ASSERT_EQ_INT(st.blocks_shared, 4);
        ASSERT_EQ_INT(feed(c, c2, tok, live, 150, 22, V, got), 0);
        d = max_diff(got, ref + (size_t)live * V, (size_t)(150 - live) * V);
        if (!(d <= TOL)) TEST_FAIL_("%s: after a %d-token hit, max diff %g", mc->name, live, d);
        /* a MoE model takes a live sequence's whole partial block, with the live state */
        if (ci >= 2) {
            int f = open_seq(c, mc, 1);
            int32_t ext[160];
            memcpy(ext, tok, 150 * sizeof *ext);
            random_tokens(ext + 150, 10, V, &rng);
            float *ref_ext = cold(mc, ext, 160, 1);
            ASSERT_TRUE(ref_ext);
            ASSERT_EQ_INT(cm_seq_attach_prefix(c, f, ext, 160, &err), 150);
            ASSERT_EQ_INT(feed(c, f, ext, 150, 160, 10, V, got), 0);
            d = max_diff(got, ref_ext + (size_t)150 * V, (size_t)10 * V);
            if (!(d <= TOL)) TEST_FAIL_("%s: after a live whole-block hit, max diff %g", mc->name, d);
            cm_seq_close(c, f);
            free(ref_ext);
        }
        /* a prompt of exactly 128 tokens cannot take B's block 3 whole (the last token must be computed
         * for its logits): a dense model copies 31 of its rows, a MoE model takes 96 + A's whole tail */
        int d3 = open_seq(c, mc, 1);
        int part = ci >= 2 ? 110 : 127;
        ASSERT_EQ_INT(cm_seq_attach_prefix(c, d3, tok, 128, &err), part);
        cm_seq_close(c, d3);
        cm_ctx_kv_stats(c, &st);
        ASSERT_EQ_INT(st.prefix_hit_tokens, want + 110 + live + (ci >= 2 ? 150 : 0) + part);
        ASSERT_EQ_INT(st.prefix_query_tokens, 119 + 149 + 149 + (ci >= 2 ? 159 : 0) + 127);
        cm_seq_close(c, b);
        cm_seq_close(c, c2);
        ASSERT_TRUE(all_released(c));
        cm_ctx_free(c);
        free(ref);
        free(got);
    }
}

TEST(options_and_modes_isolate) {
    cm_err err = {0};
    /* MoLE: blocks computed for one language are not another language's */
    const model_case *mole = &cases[4];
    int V = cm_model_get_info(mole->m)->n_vocab;
    unsigned rng = 99;
    int32_t tok[100];
    random_tokens(tok, 100, V, &rng);
    cm_ctx *c = new_ctx(mole->m, 2, 0, 1);
    ASSERT_TRUE(c);
    int a = open_seq(c, mole, 1);
    ASSERT_EQ_INT(feed(c, a, tok, 0, 100, 100, V, NULL), 0);
    cm_seq_close(c, a);
    int b = open_seq(c, mole, 0);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), 0);
    cm_seq_close(c, b);
    b = open_seq(c, mole, 1);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), 96);
    cm_seq_close(c, b);
    /* MoLE with adapter sets from the batch: never registered, never served from the cache */
    b = open_seq(c, mole, 1);
    cm_seq_options o;
    cm_seq_options_default(&o);
    o.adapter_routing = CM_ADAPTERS_BATCH;
    ASSERT_EQ_INT(cm_seq_set_options(c, b, &o, &err), 0);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), 0);
    cm_seq_close(c, b);
    cm_ctx_free(c);

    /* hybrid: a reference-mode request is scored whole; its blocks stay private */
    const model_case *hy = &cases[2];
    V = cm_model_get_info(hy->m)->n_vocab;
    random_tokens(tok, 100, V, &rng);
    c = new_ctx(hy->m, 2, 0, 1);
    ASSERT_TRUE(c);
    cm_seq_options_default(&o);
    o.segment_mode = CM_SEGMENT_REFERENCE;
    a = cm_seq_open(c, &err);
    ASSERT_EQ_INT(cm_seq_set_options(c, a, &o, &err), 0);
    ASSERT_EQ_INT(feed(c, a, tok, 0, 100, 100, V, NULL), 0);
    cm_seq_close(c, a);
    cm_kv_stats st;
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_cached, 0);
    b = cm_seq_open(c, &err);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), 0);
    ASSERT_EQ_INT(feed(c, b, tok, 0, 100, 100, V, NULL), 0); /* causal: registered */
    cm_seq_close(c, b);
    a = cm_seq_open(c, &err);
    ASSERT_EQ_INT(cm_seq_set_options(c, a, &o, &err), 0);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, a, tok, 100, &err), 0); /* reference never attaches */
    cm_seq_close(c, a);
    /* attaching to a non-empty sequence is refused */
    b = cm_seq_open(c, &err);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), 96);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, tok, 100, &err), CM_E_INVAL);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, 999, tok, 100, &err), CM_E_RANGE);
    cm_seq_close(c, b);
    ASSERT_EQ_INT(check_sound(c), 0);
    cm_ctx_free(c);
}

/* A sequence holding blocks 0..2 of X is truncated to 40 and continues with other tokens Y: block 1
 * leaves the index and is rewritten; block 2 (X's tokens 64..95, parent block 1) stays cached. A prompt
 * made of Y's first 64 tokens followed by X's 64..95 must not be served X's block 2, whose keys were
 * computed after X's block 1. */
TEST(evicted_parent_invalidates_children) {
    const model_case *mc = &cases[0];
    int V = cm_model_get_info(mc->m)->n_vocab;
    unsigned rng = 5;
    int32_t x[120], y[120];
    random_tokens(x, 120, V, &rng);
    memcpy(y, x, 40 * sizeof *y);
    random_tokens(y + 40, 80, V, &rng);
    memcpy(y + 64, x + 64, 32 * sizeof *y); /* same tokens as X's block 2, different block 1 */
    cm_ctx *c = new_ctx(mc->m, 2, 0, 1);
    ASSERT_TRUE(c);
    cm_err err = {0};
    int a = open_seq(c, mc, 0);
    ASSERT_EQ_INT(feed(c, a, x, 0, 100, 100, V, NULL), 0);
    ASSERT_EQ_INT(cm_seq_truncate(c, a, 40, &err), 0);
    ASSERT_EQ_INT(check_sound(c), 0);
    ASSERT_EQ_INT(feed(c, a, y, 40, 100, 60, V, NULL), 0); /* block 1 now holds y[32..64) */
    cm_seq_close(c, a);
    ASSERT_EQ_INT(check_sound(c), 0);
    int b = open_seq(c, mc, 0);
    int got = cm_seq_attach_prefix(c, b, y, 120, &err);
    ASSERT_EQ_INT(got, 100); /* y's own 3 blocks and its 4-position tail, from the continued sequence */
    float *ref = cold(mc, y, 120, 0);
    float *out = malloc((size_t)24 * V * sizeof *out);
    ASSERT_TRUE(ref && out);
    ASSERT_EQ_INT(feed(c, b, y, 100, 120, 24, V, out), 0);
    double d = max_diff(out, ref + (size_t)100 * V, (size_t)20 * V);
    if (!(d <= TOL)) TEST_FAIL_("continued prefix: max diff %g", d);
    cm_seq_close(c, b);
    /* X itself: only its first block and the 8 positions X and Y share in block 1 are still X's */
    b = open_seq(c, mc, 0);
    ASSERT_EQ_INT(cm_seq_attach_prefix(c, b, x, 120, &err), 40);
    cm_seq_close(c, b);
    ASSERT_EQ_INT(check_sound(c), 0);
    free(ref);
    free(out);
    cm_ctx_free(c);
}

TEST(fork_equals_cold) {
    for (int ci = 0; ci < n_cases; ci++) {
        const model_case *mc = &cases[ci];
        for (int cache = 0; cache <= 1; cache++) {
            int V = cm_model_get_info(mc->m)->n_vocab;
            unsigned rng = 31u + (unsigned)ci;
            int32_t p[110], q[110];
            case_tokens(mc, p, 110, &rng);
            memcpy(q, p, 70 * sizeof *q);
            random_tokens(q + 70, 40, V, &rng);
            float *rp = cold(mc, p, 110, 1), *rq = cold(mc, q, 110, 1);
            float *out = malloc((size_t)2 * V * sizeof *out);
            ASSERT_TRUE(rp && rq && out);
            cm_ctx *c = new_ctx(mc->m, 2, 0, cache);
            ASSERT_TRUE(c);
            cm_err err = {0};
            int a = open_seq(c, mc, 1);
            ASSERT_EQ_INT(feed(c, a, p, 0, 70, 70, V, NULL), 0);
            int b = cm_seq_fork(c, a, &err);
            ASSERT_TRUE(b >= 0);
            ASSERT_EQ_INT(cm_seq_len(c, b), 70);
            cm_kv_stats st;
            cm_ctx_kv_stats(c, &st);
            ASSERT_EQ_INT(st.blocks_shared, 2);  /* two full blocks shared, the third copied */
            ASSERT_EQ_INT(st.blocks_used, 4);
            /* both continue in one batch, one token each per step, differently */
            for (int t = 70; t < 110; t++) {
                int32_t tk[2] = {p[t], q[t]}, sq[2] = {a, b};
                cm_batch bt = {.n = 2, .token = tk, .seq = sq};
                ASSERT_EQ_INT(cm_forward(c, &bt, &err), 0);
                double d1 = max_diff(cm_logits(c, 0), rp + (size_t)t * V, (size_t)V);
                double d2 = max_diff(cm_logits(c, 1), rq + (size_t)t * V, (size_t)V);
                if (!(d1 <= TOL && d2 <= TOL)) {
                    TEST_FAIL_("%s (cache %d): position %d: source diff %g, fork diff %g", mc->name, cache, t, d1, d2);
                    break;
                }
            }
            cm_seq_close(c, a);
            cm_seq_close(c, b);
            ASSERT_TRUE(all_released(c));
            cm_ctx_free(c);
            free(rp);
            free(rq);
            free(out);
        }
    }
}

TEST(truncate_at_block_ends) {
    cm_err err = {0};
    for (int ci = 2; ci < n_cases; ci++) { /* hybrid, MoLE and the sparse MoE */
        const model_case *mc = &cases[ci];
        int V = cm_model_get_info(mc->m)->n_vocab;
        unsigned rng = 77u + (unsigned)ci;
        int32_t p[100], q[100];
        case_tokens(mc, p, 100, &rng);
        memcpy(q, p, 64 * sizeof *q);
        random_tokens(q + 64, 36, V, &rng);
        float *rq = cold(mc, q, 100, 1);
        float *out = malloc((size_t)36 * V * sizeof *out);
        ASSERT_TRUE(rq && out);
        cm_ctx *c = new_ctx(mc->m, 1, 0, 0);
        int a = open_seq(c, mc, 1);
        ASSERT_EQ_INT(feed(c, a, p, 0, 100, 9, V, NULL), 0);
        /* inside a block: refused where routing state lives at block ends only; a sparse MoE has none */
        cm_moe_info mi;
        cm_model_moe_info(mc->m, &mi);
        int mid_ok = mi.kind == CM_MOE_KIND_SPARSE;
        ASSERT_EQ_INT(cm_seq_truncate(c, a, 70, &err), mid_ok ? CM_OK : CM_E_UNSUPPORTED);
        ASSERT_EQ_INT(cm_seq_len(c, a), mid_ok ? 70 : 100);
        ASSERT_EQ_INT(cm_seq_truncate(c, a, 64, &err), 0);
        ASSERT_EQ_INT(feed(c, a, q, 64, 100, 36, V, out), 0);
        double d = max_diff(out, rq + (size_t)64 * V, (size_t)36 * V);
        if (!(d <= TOL)) TEST_FAIL_("%s: continued after truncation to 64: max diff %g", mc->name, d);
        cm_ctx_free(c);
        free(rq);
        free(out);
    }
    /* dense: truncating into a block shared with a fork copies it first; with no block left, refuses */
    const model_case *mc = &cases[0];
    int V = cm_model_get_info(mc->m)->n_vocab;
    unsigned rng = 3;
    int32_t p[100], q[90];
    random_tokens(p, 100, V, &rng);
    memcpy(q, p, 40 * sizeof *q);
    random_tokens(q + 40, 50, V, &rng);
    float *rp = cold(mc, p, 100, 0), *rq = cold(mc, q, 90, 0);
    float *out = malloc((size_t)100 * V * sizeof *out);
    ASSERT_TRUE(rp && rq && out);
    cm_ctx *c = new_ctx(mc->m, 2, 4 * 32, 0); /* 4 blocks */
    int a = open_seq(c, mc, 0);
    ASSERT_EQ_INT(feed(c, a, p, 0, 64, 64, V, NULL), 0);
    int b = cm_seq_fork(c, a, &err);                      /* shares both full blocks, copies none */
    ASSERT_TRUE(b >= 0);
    ASSERT_EQ_INT(feed(c, a, p, 64, 100, 36, V, NULL), 0); /* takes the last two blocks */
    ASSERT_EQ_INT(cm_seq_truncate(c, b, 40, &err), CM_E_NOMEM); /* block 1 is shared, nothing left to copy */
    ASSERT_EQ_INT(cm_seq_len(c, b), 64);
    ASSERT_EQ_INT(check_sound(c), 0);
    ASSERT_EQ_INT(cm_seq_truncate(c, a, 64, &err), 0);    /* gives two blocks back */
    ASSERT_EQ_INT(cm_seq_truncate(c, b, 40, &err), 0);    /* copies block 1 */
    ASSERT_EQ_INT(check_sound(c), 0);
    ASSERT_EQ_INT(feed(c, b, q, 40, 90, 50, V, out), 0);
    double d = max_diff(out, rq + (size_t)40 * V, (size_t)50 * V);
    if (!(d <= TOL)) TEST_FAIL_("dense fork truncated into a shared block: max diff %g", d);
    cm_seq_close(c, b);
    ASSERT_EQ_INT(feed(c, a, p, 64, 100, 36, V, out), 0); /* a's block 1 was not touched by b */
    d = max_diff(out, rp + (size_t)64 * V, (size_t)36 * V);
    if (!(d <= TOL)) TEST_FAIL_("source after its fork was truncated: max diff %g", d);
    cm_seq_close(c, a);
    ASSERT_EQ_INT(check_sound(c), 0);
    cm_ctx_free(c);
    free(rp);
    free(rq);
    free(out);
}

/* Prompts from a few families sharing long prefixes, through a pool of 8 blocks: the cache fills,
 * evicts, and every result still equals the cold run. */
TEST(eviction_under_pressure) {
    for (int ci = 0; ci < n_cases; ci += 2) { /* qwen2, hybrid-max w12, mole, hybrid-prev-max w12 */
        const model_case *mc = &cases[ci];
        int V = cm_model_get_info(mc->m)->n_vocab;
        unsigned rng = 1234u + (unsigned)ci;
        int32_t fam[3][200];
        for (int f = 0; f < 3; f++) random_tokens(fam[f], 200, V, &rng);
        cm_ctx *c = new_ctx(mc->m, 1, 8 * 32, 1);
        ASSERT_TRUE(c);
        float *out = malloc((size_t)V * sizeof *out);
        ASSERT_TRUE(out);
        uint64_t hits = 0;
        for (int r = 0; r < 14; r++) {
            rng = rng * 1103515245u + 12345u;
            int f = (int)((rng >> 8) % 3);
            int n = 40 + (int)((rng >> 12) % 180); /* 40..219 tokens: up to 7 blocks */
            if (n > 200) n = 200;
            int32_t tok[200];
            memcpy(tok, fam[f], (size_t)n * sizeof *tok);
            tok[n - 1] = (int32_t)(r % 5); /* the last token differs between requests */
            float *ref = cold(mc, tok, n, 1);
            ASSERT_TRUE(ref);
            cm_err err = {0};
            int s = open_seq(c, mc, 1);
            int got = cm_seq_attach_prefix(c, s, tok, n, &err);
            ASSERT_TRUE(got >= 0 && got < n);
            hits += (uint64_t)got;
            ASSERT_EQ_INT(feed(c, s, tok, got, n, 64, V, NULL), 0);
            double d = max_diff(cm_logits(c, (n - got - 1) % 64), ref + (size_t)(n - 1) * V, (size_t)V);
            if (!(d <= TOL)) TEST_FAIL_("%s: request %d (%d tokens, %d cached): max diff %g", mc->name, r, n, got, d);
            cm_seq_close(c, s);
            ASSERT_EQ_INT(check_sound(c), 0);
            free(ref);
        }
        cm_kv_stats st;
        cm_ctx_kv_stats(c, &st);
        if (!(st.evictions > 0 && st.prefix_hit_tokens == hits && hits > 0))
            TEST_FAIL_("%s: evictions %llu, hits %llu (counted %llu)", mc->name, (unsigned long long)st.evictions,
                       (unsigned long long)st.prefix_hit_tokens, (unsigned long long)hits);
        ASSERT_EQ_INT(st.blocks_used, 0);
        ASSERT_EQ_INT(st.blocks_available, 8);
        free(out);
        cm_ctx_free(c);
    }
}

/* Random operations on 4 sequences over a 10-block pool, the bookkeeping checked after each; every
 * few steps a sequence's next logits are compared with a cold run of its whole token history. */
static void random_soak_case(const model_case *mc) {
    int V = cm_model_get_info(mc->m)->n_vocab;
    cm_ctx *c = new_ctx(mc->m, 4, 10 * 32, 1);
    ASSERT_TRUE(c);
    int32_t base[2][MAXT];
    unsigned rng = 4242;
    random_tokens(base[0], MAXT, V, &rng);
    random_tokens(base[1], MAXT, V, &rng);
    int seq[4] = {-1, -1, -1, -1}, len[4] = {0};
    int32_t hist[4][MAXT];
    int compared = 0, nomem = 0;
    for (int it = 0; it < 300; it++) {
        rng = rng * 1103515245u + 12345u;
        int k = (int)((rng >> 8) % 4), op = (int)((rng >> 12) % 6);
        cm_err err = {0};
        if (seq[k] < 0) { /* open: a prompt from a family, attach, feed the rest */
            int f = (int)((rng >> 16) % 2), n = 8 + (int)((rng >> 18) % 120);
            memcpy(hist[k], base[f], (size_t)n * sizeof(int32_t));
            hist[k][n - 1] = (int32_t)(it % 7);
            seq[k] = cm_seq_open(c, &err);
            ASSERT_TRUE(seq[k] >= 0);
            int got = cm_seq_attach_prefix(c, seq[k], hist[k], n, &err);
            ASSERT_TRUE(got >= 0);
            if (feed(c, seq[k], hist[k], got, n, 50, V, NULL)) { /* pool full: give up this one */
                cm_seq_close(c, seq[k]);
                seq[k] = -1;
                nomem++;
            } else {
                len[k] = n;
            }
        } else if (op == 0) {
            cm_seq_close(c, seq[k]);
            seq[k] = -1;
        } else if (op == 1) { /* fork into a free slot */
            int j = 0;
            while (j < 4 && seq[j] >= 0) j++;
            if (j < 4) {
                int d = cm_seq_fork(c, seq[k], &err);
                if (d >= 0) {
                    seq[j] = d;
                    len[j] = len[k];
                    memcpy(hist[j], hist[k], (size_t)len[k] * sizeof(int32_t));
                } else {
                    ASSERT_EQ_INT(d, CM_E_NOMEM);
                }
            }
        } else if (op == 2 && len[k] >= 32) { /* back to a block end */
            int n = (int)((rng >> 16) % (unsigned)(len[k] / 32 + 1)) * 32;
            int rc = cm_seq_truncate(c, seq[k], n, &err);
            ASSERT_EQ_INT(rc, 0);
            len[k] = n;
            if (n == 0) { cm_seq_close(c, seq[k]); seq[k] = -1; }
        } else if (len[k] < MAXT - 8) { /* a few tokens more */
            int n = 1 + (int)((rng >> 16) % 6);
            for (int i = 0; i < n; i++) hist[k][len[k] + i] = (int32_t)((rng >> (i + 3)) % (unsigned)(V - 8));
            int check = it % 5 == 0;
            float *ref = check ? cold(mc, hist[k], len[k] + n, 1) : NULL;
            int32_t sq[8];
            for (int i = 0; i < n; i++) sq[i] = seq[k];
            cm_batch bt = {.n = n, .token = hist[k] + len[k], .seq = sq};
            int rc = cm_forward(c, &bt, &err);
            if (rc == 0) {
                if (ref) {
                    double d = max_diff(cm_logits(c, n - 1), ref + (size_t)(len[k] + n - 1) * V, (size_t)V);
                    if (!(d <= TOL)) TEST_FAIL_("soak step %d: max diff %g", it, d);
                    compared++;
                }
                len[k] += n;
            } else {
                ASSERT_EQ_INT(rc, CM_E_NOMEM);
                nomem++;
            }
            free(ref);
        }
        if (check_sound(c)) {
            TEST_FAIL_("soak step %d (op %d on slot %d)", it, op, k);
            break;
        }
    }
    for (int k = 0; k < 4; k++) if (seq[k] >= 0) cm_seq_close(c, seq[k]);
    cm_kv_stats st;
    cm_ctx_kv_stats(c, &st);
    ASSERT_EQ_INT(st.blocks_used, 0);
    ASSERT_EQ_INT(check_sound(c), 0);
    ASSERT_TRUE(compared > 10);
    fprintf(stderr, "  soak %s: %d logits comparisons, %d pool-full refusals, %llu evictions, %llu hit tokens\n",
            mc->name, compared, nomem, (unsigned long long)st.evictions, (unsigned long long)st.prefix_hit_tokens);
    cm_ctx_free(c);
}

/* The hybrids with window 12: the hardest state to carry (prefix and previous-window routing). */
TEST(random_soak) {
    random_soak_case(&cases[2]);
    random_soak_case(&cases[6]);
}

/* What a block holds, counted plainly: K and V of 32 positions for every layer, then (MoE models) the
 * routing state at its last position: the fence tracker, each layer's window fill count and causal
 * window pool (hybrid: D floats for max pooling, D doubles for mean; MoLE: none), route "previous"
 * also each layer's descriptor of the last complete window (D floats), each part 8-aligned; the block
 * rounded up to 64 bytes. */
static size_t a8(size_t x) { return (x + 7) / 8 * 8; }
static size_t ref_block_bytes(const cm_model *m, int moe, size_t pool_elem, int prev) {
    const cm_model_info *in = cm_model_get_info(m);
    size_t elt = kv_type == CM_KV_F16 ? 2 : 4;
    size_t kv = (size_t)in->n_layer * 2 * CM_KV_BLOCK_TOKENS * in->n_head_kv * in->head_dim * elt;
    size_t extra = moe ? a8(sizeof(cm_fence)) + a8((size_t)in->n_layer * sizeof(int)) +
                         a8((size_t)in->n_layer * in->n_embd * pool_elem) +
                         (prev ? a8((size_t)in->n_layer * in->n_embd * sizeof(float)) : 0) : 0;
    return (kv + extra + 63) / 64 * 64;
}

TEST(kv_block_bytes_is_the_allocation) {
    static const struct { const char *fixture; int moe; size_t pool_elem; int prev; } cases[] = {
        {"models/qwen2-gqa.gguf", 0, 0, 0},
        {"models/llama-mha.gguf", 0, 0, 0},
        {"models/hybrid-max.gguf", 1, sizeof(float), 0},
        {"models/hybrid-mean.gguf", 1, sizeof(double), 0},
        {"models/hybrid-prev-max.gguf", 1, sizeof(float), 1},
        {"models/hybrid-prev-mean.gguf", 1, sizeof(double), 1},
        {"models/mole.gguf", 1, 0, 0},
        {"models/qwen3moe.gguf", 1, 0, 0}, /* sparse: no window pool, only the (unused) fence and counts */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cm_model *m = load_path(test_fixture(cases[i].fixture));
        ASSERT_TRUE(m != NULL);
        size_t bb = cm_ctx_kv_block_bytes(m, kv_type);
        size_t ref = ref_block_bytes(m, cases[i].moe, cases[i].pool_elem, cases[i].prev);
        if (bb != ref) TEST_FAIL_("%s: cm_ctx_kv_block_bytes %zu, plain count %zu", cases[i].fixture, bb, ref);
        /* the routing state is really there: an MoE block is larger than its K and V */
        const cm_model_info *in = cm_model_get_info(m);
        size_t kv_f32 = (size_t)in->n_layer * 2 * CM_KV_BLOCK_TOKENS * in->n_head_kv * in->head_dim * 4;
        size_t kv_only = kv_type == CM_KV_F16 ? kv_f32 / 2 : kv_f32;
        if (cases[i].moe) CHECK_TRUE(bb >= kv_only + sizeof(cm_fence));
        /* f16 saves exactly half of K and V (up to the 64-byte rounding) */
        if (kv_type == CM_KV_F16) CHECK_TRUE(cm_ctx_kv_block_bytes(m, CM_KV_F32) - bb + 64 > kv_f32 / 2);
        /* the context's pool: blocks of exactly that size, ceil(kv_tokens / 32) of them */
        for (int cache = 0; cache <= 1; cache++) {
            cm_ctx *c = new_ctx(m, 2, 100, cache);
            ASSERT_TRUE(c != NULL);
            const cm_kv *kv = cm_ctx_kv(c);
            CHECK_TRUE(kv->block_bytes == bb);
            CHECK_TRUE(kv->kv_type == kv_type);
            cm_kv_stats st;
            cm_ctx_kv_stats(c, &st);
            CHECK_TRUE(st.blocks_total == 4);
            /* consecutive blocks are block_bytes apart in the pool */
            CHECK_TRUE((size_t)(cm_kv_block_data(kv, 1) - cm_kv_block_data(kv, 0)) == bb);
            cm_ctx_free(c);
        }
        cm_model_free(m);
    }
    ASSERT_TRUE(cm_ctx_kv_block_bytes(NULL, kv_type) == 0);
}

/* Pages of [p, p + bytes) resident now (mincore), or -1 when it cannot tell. */
static long resident_pages(const void *p, size_t bytes, long *total) {
    long ps = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(ps - 1), e = (uintptr_t)p + bytes;
    size_t n = (e - a + (size_t)ps - 1) / (size_t)ps;
    unsigned char *v = malloc(n);
    if (!v || mincore((void *)a, e - a, v) != 0) {
        free(v);
        return -1;
    }
    long r = 0;
    for (size_t i = 0; i < n; i++) r += v[i] & 1;
    free(v);
    *total = (long)n;
    return r;
}

/* kv_prefault: a fresh context's whole pool is resident at once; without it, a pool nothing has used
 * yet is not (the same size, 48 MiB, mapped fresh either way). */
TEST(prefault_makes_the_pool_resident) {
    const cm_model *m = cases[0].m;
    ASSERT_TRUE(m != NULL);
    size_t bb = cm_ctx_kv_block_bytes(m, kv_type);
    ASSERT_TRUE(bb > 0);
    int tokens = (int)(((size_t)48 << 20) / bb) * CM_KV_BLOCK_TOKENS;
    for (int pf = 0; pf <= 1; pf++) {
        cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 2, .n_ctx = MAXT, .n_batch_max = MAXT,
                            .kv_tokens = tokens, .kv_type = kv_type, .kv_prefault = pf};
        cm_err err = {0};
        cm_ctx *c = cm_ctx_create(m, &cp, &err);
        ASSERT_TRUE(c != NULL);
        const cm_kv *kv = cm_ctx_kv(c);
        long total = 0, r = resident_pages(kv->data, kv->block_bytes * (size_t)kv->n_blocks, &total);
        ASSERT_TRUE(r >= 0 && total > 1000);
        if (pf) CHECK_TRUE(r == total);
        else CHECK_TRUE(r < total / 2);
        if (pf ? r != total : r >= total / 2) fprintf(stderr, "prefault %d: %ld of %ld pages resident\n", pf, r, total);
        cm_ctx_free(c);
    }
}

/* An unknown KV type is refused, not guessed. */
TEST(unknown_kv_type_refused) {
    const cm_model *m = cases[0].m;
    ASSERT_TRUE(m != NULL);
    ASSERT_TRUE(cm_ctx_kv_block_bytes(m, 7) == 0);
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = 64, .n_batch_max = 64, .kv_type = 7};
    cm_err err = {0};
    ASSERT_TRUE(cm_ctx_create(m, &cp, &err) == NULL);
    ASSERT_EQ_INT(err.code, CM_E_INVAL);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/cm_prefix_%d", (int)getpid());
    char cmd[300];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", tmpdir);
    if (system(cmd) != 0) return 1;
    load_cases();
    for (kv_type = CM_KV_F32; kv_type <= CM_KV_F16; kv_type++) {
        fprintf(stderr, "-- KV %s\n", kv_type == CM_KV_F16 ? "f16" : "f32");
        RUN(cache_hit_equals_cold);
        RUN(options_and_modes_isolate);
        RUN(evicted_parent_invalidates_children);
        RUN(fork_equals_cold);
        RUN(truncate_at_block_ends);
        RUN(prefault_makes_the_pool_resident);
        RUN(eviction_under_pressure);
        RUN(random_soak);
        RUN(kv_block_bytes_is_the_allocation);
    }
    RUN(unknown_kv_type_refused);
    for (int i = 0; i < n_cases; i++) cm_model_free(cases[i].m);
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_summary();
}
