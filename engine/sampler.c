/*
 * sampler.c - turns one row of logits into the next token.
 *
 * Pipeline (in this order, on a private copy; the caller's logits are never modified):
 *   logit bias -> repetition penalty (CTRL: over prompt + generated tokens in the window)
 *   -> presence/frequency penalties (OpenAI: over generated tokens in the window)
 *   -> temperature 0: argmax (ties -> lowest id), done
 *   -> top-k -> temperature -> softmax -> top-p -> min-p -> renormalise -> draw.
 *
 * Everything is sized by the vocabulary at create time: a sample allocates nothing. top-k uses a bounded
 * heap (O(V log k)) instead of sorting V logits; top-p without top-k sorts only a growing prefix (64, 512,
 * 4096, ... best tokens) until it holds the requested mass, which for real models is almost always the
 * first round.
 *
 * Determinism: the random stream is xoshiro256** seeded by running splitmix64 four times from `seed`
 * (every seed, 0 included, is a valid seed). Each stochastic sample consumes exactly one 64-bit draw and
 * greedy samples consume none, so the same seed and the same sequence of logits give the same tokens.
 * Candidates are ordered by (probability descending, id ascending), a total order, so ties never depend
 * on memory layout.
 */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "model.h"
#include "util.h"

/* A penalty window larger than this is treated as "all tokens" (no ring): no real context is longer, and
 * it keeps a hostile penalty_last_n from sizing an allocation. */
#define CM_PENALTY_WINDOW_MAX (1 << 22)

typedef struct cm_cand {
    float v;     /* logit, then (after softmax) unnormalised probability */
    int32_t id;
} cm_cand;

struct cm_sampler {
    int n_vocab;          /* V */
    cm_sampling p;        /* parameters; p.logit_bias points at bias below */
    cm_logit_bias *bias;  /* (n_bias) validated copy */
    cm_cand *cand;        /* (V) working candidates */
    /* penalty bookkeeping: counts of tokens inside the window, and the distinct tokens with a nonzero
     * count, so applying penalties costs O(distinct tokens), not O(V) */
    int32_t *cnt_all;     /* (V) prompt + generated occurrences in the window */
    int32_t *cnt_gen;     /* (V) generated occurrences in the window */
    int32_t *active;      /* (V) ids with cnt_all > 0, in no particular order */
    int32_t *active_pos;  /* (V) index of id in active[], -1 when absent */
    int n_active;
    uint32_t *ring;       /* (ring_cap) last tokens: id << 1 | generated; NULL when the window is "all" */
    int ring_cap, ring_head, ring_n;
    uint64_t rng[4];      /* xoshiro256** state */
};

/* ------------------------------------------------------------ random numbers */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* uniform double in [0, 1) with 53 random bits */
static double rng_uniform(uint64_t s[4]) { return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53; }

/* ------------------------------------------------------------ candidate selection */

/* The total order used everywhere: higher value first, lower id on ties. */
static inline int cand_better(const cm_cand *a, const cm_cand *b) {
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static inline void cand_swap(cm_cand *a, cm_cand *b) {
    cm_cand t = *a;
    *a = *b;
    *b = t;
}

/* Heap whose root is the WORST element, so the best m seen so far stay in it. */
static void heap_sift_down(cm_cand *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_better(&h[w], &h[l])) w = l;
        if (r < n && cand_better(&h[w], &h[r])) w = r;
        if (w == i) return;
        cand_swap(&h[i], &h[w]);
        i = w;
    }
}

/* Moves the best m of c[0..n) to c[0..m), sorted best first (the rest is left in some order).
 * O(n log m): one comparison per element that does not make it in. */
static void cand_select_top(cm_cand *c, int n, int m) {
    if (m > n) m = n;
    if (m <= 0) return;
    for (int i = m / 2 - 1; i >= 0; i--) heap_sift_down(c, m, i);
    for (int i = m; i < n; i++) {
        if (cand_better(&c[i], &c[0])) {
            cand_swap(&c[0], &c[i]);
            heap_sift_down(c, m, 0);
        }
    }
    for (int i = m - 1; i > 0; i--) { /* heapsort: the worst goes last each round */
        cand_swap(&c[0], &c[i]);
        heap_sift_down(c, i, 0);
    }
}

/* ------------------------------------------------------------ penalty window */

static void count_inc(cm_sampler *s, int32_t t, int gen) {
    if (s->cnt_all[t]++ == 0) {
        s->active_pos[t] = s->n_active;
        s->active[s->n_active++] = t;
    }
    if (gen) s->cnt_gen[t]++;
}

static void count_dec(cm_sampler *s, int32_t t, int gen) {
    if (gen) s->cnt_gen[t]--;
    if (--s->cnt_all[t] == 0) { /* swap-remove from the active list */
        int i = s->active_pos[t];
        int32_t last = s->active[--s->n_active];
        s->active[i] = last;
        s->active_pos[last] = i;
        s->active_pos[t] = -1;
    }
}

static void sampler_accept(cm_sampler *s, int32_t t, int gen) {
    if (t < 0 || t >= s->n_vocab) return;
    if (s->ring) {
        if (s->ring_n == s->ring_cap) { /* full: the slot at head holds the oldest token */
            uint32_t old = s->ring[s->ring_head];
            count_dec(s, (int32_t)(old >> 1), (int)(old & 1));
        } else {
            s->ring_n++;
        }
        s->ring[s->ring_head] = (uint32_t)t << 1 | (uint32_t)(gen != 0);
        s->ring_head = (s->ring_head + 1) % s->ring_cap;
    }
    count_inc(s, t, gen);
}

/* ------------------------------------------------------------ create / free */

void cm_sampling_default(cm_sampling *s) {
    memset(s, 0, sizeof *s);
    s->temperature = 1.0f;
    s->top_k = 0;
    s->top_p = 1.0f;
    s->min_p = 0.0f;
    s->repetition_penalty = 1.0f;
    s->presence_penalty = 0.0f;
    s->frequency_penalty = 0.0f;
    s->penalty_last_n = 64; /* as llama.cpp: a whole long prompt is rarely what should be penalised */
    s->seed = 0;
    s->n_logprobs = 0;
}

/* Every parameter checked against a vocabulary of n_vocab: CM_OK or the error. */
static int sampling_check(int n_vocab, const cm_sampling *p, cm_err *err) {
    if (n_vocab <= 0 || n_vocab > (1 << 30))
        return cm_err_set(err, CM_E_INVAL, "sampler: bad vocabulary size %d", n_vocab);
    if (!p)
        return cm_err_set(err, CM_E_INVAL, "sampler: no sampling parameters");
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return cm_err_set(err, CM_E_RANGE, "temperature must be a finite number >= 0 (got %g)", p->temperature);
    if (p->top_k < 0)
        return cm_err_set(err, CM_E_RANGE, "top_k must be >= 0 (got %d)", p->top_k);
    if (!(p->top_p >= 0.0f && p->top_p <= 1.0f))
        return cm_err_set(err, CM_E_RANGE, "top_p must be in [0, 1] (got %g)", p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return cm_err_set(err, CM_E_RANGE, "min_p must be in [0, 1] (got %g)", p->min_p);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return cm_err_set(err, CM_E_RANGE, "repetition_penalty must be a finite number > 0 (got %g)",
                          p->repetition_penalty);
    if (!isfinite(p->presence_penalty) || !isfinite(p->frequency_penalty))
        return cm_err_set(err, CM_E_RANGE, "presence/frequency penalties must be finite");
    if (p->penalty_last_n < 0)
        return cm_err_set(err, CM_E_RANGE, "penalty_last_n must be >= 0 (got %d)", p->penalty_last_n);
    if (p->n_logprobs < 0 || p->n_logprobs > CM_LOGPROBS_MAX)
        return cm_err_set(err, CM_E_RANGE, "logprobs must be in [0, %d] (got %d)", CM_LOGPROBS_MAX, p->n_logprobs);
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias))
        return cm_err_set(err, CM_E_INVAL, "logit_bias: bad count %d", p->n_logit_bias);
    for (int i = 0; i < p->n_logit_bias; i++) {
        const cm_logit_bias *b = &p->logit_bias[i];
        if (b->token < 0 || b->token >= n_vocab)
            return cm_err_set(err, CM_E_RANGE, "logit_bias: token id %d out of range [0, %d)", (int)b->token, n_vocab);
        if (isnan(b->bias))
            return cm_err_set(err, CM_E_RANGE, "logit_bias: bias for token %d is not a number", (int)b->token);
    }
    return CM_OK;
}

/* Parameters, penalty window and seed onto allocated buffers (create and reset). */
static int sampler_configure(cm_sampler *s, const cm_sampling *p) {
    free(s->bias);
    s->bias = NULL;
    if (p->n_logit_bias > 0) {
        s->bias = malloc((size_t)p->n_logit_bias * sizeof *s->bias);
        if (!s->bias) return CM_E_NOMEM;
        memcpy(s->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *s->bias);
    }
    s->p = *p;
    s->p.logit_bias = s->bias;
    int cap = p->penalty_last_n > 0 && p->penalty_last_n <= CM_PENALTY_WINDOW_MAX ? p->penalty_last_n : 0;
    if (cap != s->ring_cap) {
        free(s->ring);
        s->ring = cap ? malloc((size_t)cap * sizeof *s->ring) : NULL;
        if (cap && !s->ring) { s->ring_cap = 0; return CM_E_NOMEM; }
        s->ring_cap = cap;
    }
    s->ring_head = s->ring_n = 0;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    return CM_OK;
}

cm_sampler *cm_sampler_create_n(int n_vocab, const cm_sampling *p, cm_err *err) {
    if (sampling_check(n_vocab, p, err) < 0) return NULL;
    cm_sampler *s = calloc(1, sizeof *s);
    if (!s) goto nomem;
    s->n_vocab = n_vocab;
    size_t V = (size_t)n_vocab;
    s->cand = malloc(V * sizeof *s->cand);
    s->cnt_all = calloc(V, sizeof *s->cnt_all);
    s->cnt_gen = calloc(V, sizeof *s->cnt_gen);
    s->active = malloc(V * sizeof *s->active);
    s->active_pos = malloc(V * sizeof *s->active_pos);
    if (!s->cand || !s->cnt_all || !s->cnt_gen || !s->active || !s->active_pos) goto nomem;
    for (size_t i = 0; i < V; i++) s->active_pos[i] = -1;
    if (sampler_configure(s, p) < 0) goto nomem;
    return s;
nomem:
    cm_sampler_free(s);
    cm_err_set(err, CM_E_NOMEM, "sampler: out of memory for a vocabulary of %d", n_vocab);
    return NULL;
}

cm_sampler *cm_sampler_create(const cm_model *m, const cm_sampling *s, cm_err *err) {
    if (!m) {
        cm_err_set(err, CM_E_INVAL, "sampler: no model");
        return NULL;
    }
    return cm_sampler_create_n(m->info.n_vocab, s, err);
}

int cm_sampler_reset(cm_sampler *s, const cm_sampling *p, cm_err *err) {
    if (!s) return cm_err_set(err, CM_E_INVAL, "sampler: none");
    int rc = sampling_check(s->n_vocab, p, err);
    if (rc < 0) return rc;
    /* the counts are nonzero only at the active ids: clearing costs O(distinct tokens seen), not O(V) */
    for (int i = 0; i < s->n_active; i++) {
        int32_t t = s->active[i];
        s->cnt_all[t] = s->cnt_gen[t] = 0;
        s->active_pos[t] = -1;
    }
    s->n_active = 0;
    if (sampler_configure(s, p) < 0)
        return cm_err_set(err, CM_E_NOMEM, "sampler: out of memory");
    return CM_OK;
}

void cm_sampler_free(cm_sampler *s) {
    if (!s) return;
    free(s->cand);
    free(s->cnt_all);
    free(s->cnt_gen);
    free(s->active);
    free(s->active_pos);
    free(s->bias);
    free(s->ring);
    free(s);
}

void cm_sampler_accept_prompt(cm_sampler *s, int32_t tok) { sampler_accept(s, tok, 0); }

/* ------------------------------------------------------------ sampling */

/* log(softmax) of one logit given the maximum and log-sum-exp: -inf stays -inf even when every logit
 * is -inf (no probability anywhere), and n_inf > 0 logits of +inf share all the mass equally */
static inline float lsm(float v, float mx, double lse, int n_inf) {
    if (v == -INFINITY) return -INFINITY;
    if (mx == INFINITY) return v == INFINITY ? (float)-log((double)n_inf) : -INFINITY;
    return (float)((double)v - lse);
}

float cm_logprobs(int n_vocab, const float *logits, int32_t want, cm_token_logprob *top, int n_top) {
    const int V = n_vocab > 0 ? n_vocab : 0;
    float mx = -INFINITY;
    int n_inf = 0;
    for (int i = 0; i < V; i++) {
        if (logits[i] > mx) mx = logits[i];
        n_inf += logits[i] == INFINITY;
    }
    double sum = 0.0;
    if (mx > -INFINITY)
        for (int i = 0; i < V; i++)
            if (logits[i] > -INFINITY) sum += exp((double)logits[i] - mx); /* NaN fails the test too */
    double lse = mx > -INFINITY && isfinite(mx) ? mx + log(sum) : mx;
    int n = n_top < 0 ? 0 : n_top > CM_LOGPROBS_MAX ? CM_LOGPROBS_MAX : n_top;
    if (top && n > 0) {
        cm_cand h[CM_LOGPROBS_MAX]; /* bounded heap, worst at the root */
        int k = 0;
        for (int i = 0; i < V; i++) {
            cm_cand c = {isnan(logits[i]) ? -INFINITY : logits[i], i};
            if (k < n) {
                h[k++] = c;
                if (k == n)
                    for (int j = n / 2 - 1; j >= 0; j--) heap_sift_down(h, n, j);
            } else if (cand_better(&c, &h[0])) {
                h[0] = c;
                heap_sift_down(h, n, 0);
            }
        }
        if (k < n) /* vocabulary smaller than n: heapify what there is */
            for (int j = k / 2 - 1; j >= 0; j--) heap_sift_down(h, k, j);
        for (int i = k - 1; i > 0; i--) {
            cand_swap(&h[0], &h[i]);
            heap_sift_down(h, i, 0);
        }
        for (int i = 0; i < k; i++) {
            top[i].token = h[i].id;
            top[i].logprob = lsm(h[i].v, mx, lse, n_inf);
        }
        for (int i = k; i < n; i++) { /* V < n: pad so the caller never reads garbage */
            top[i].token = -1;
            top[i].logprob = -INFINITY;
        }
    }
    if (want < 0 || want >= V) return NAN;
    return lsm(isnan(logits[want]) ? -INFINITY : logits[want], mx, lse, n_inf);
}

/* Fills c[] (indexed by id) with the logits after bias and penalties. */
static void sampler_prepare(cm_sampler *s, const float *logits) {
    const cm_sampling *p = &s->p;
    cm_cand *c = s->cand;
    for (int i = 0; i < s->n_vocab; i++) { /* NaN counts as banned */
        float l = logits[i];
        c[i].v = isnan(l) ? -INFINITY : l;
        c[i].id = i;
    }
    for (int i = 0; i < p->n_logit_bias; i++) {
        /* OpenAI: -100 bans a token outright (adding -100 alone would only make it unlikely) */
        if (p->logit_bias[i].bias <= -100.0f) c[p->logit_bias[i].token].v = -INFINITY;
        else c[p->logit_bias[i].token].v += p->logit_bias[i].bias;
    }
    const float rp = p->repetition_penalty, pp = p->presence_penalty, fp = p->frequency_penalty;
    if (rp == 1.0f && pp == 0.0f && fp == 0.0f) return;
    for (int j = 0; j < s->n_active; j++) {
        int32_t t = s->active[j];
        float l = c[t].v;
        if (rp != 1.0f) l = l > 0.0f ? l / rp : l * rp;
        int g = s->cnt_gen[t];
        if (g > 0) l -= pp + fp * (float)g;
        c[t].v = l;
    }
}

void cm_sampler_adjusted_logits(cm_sampler *s, const float *logits, float *out) {
    sampler_prepare(s, logits);
    for (int i = 0; i < s->n_vocab; i++) out[i] = s->cand[i].v;
}

int cm_sampler_is_greedy(const cm_sampler *s) {
    const cm_sampling *p = &s->p;
    return p->temperature == 0.0f && p->n_logit_bias == 0 && p->repetition_penalty == 1.0f &&
           p->presence_penalty == 0.0f && p->frequency_penalty == 0.0f;
}

/* The chosen token's bookkeeping, also cm_sampler_sample's last step: log-probabilities if asked, then
 * the token recorded as generated. */
int32_t cm_sampler_take(cm_sampler *s, const float *logits, int32_t tok, float *chosen_lp, cm_token_logprob *top) {
    if (chosen_lp || top) {
        float lp = cm_logprobs(s->n_vocab, logits, tok, top, top ? s->p.n_logprobs : 0);
        if (chosen_lp) *chosen_lp = lp;
    }
    sampler_accept(s, tok, 1);
    return tok;
}

int32_t cm_sampler_sample(cm_sampler *s, const float *logits, float *chosen_lp, cm_token_logprob *top) {
    const cm_sampling *p = &s->p;
    const int V = s->n_vocab;
    cm_cand *c = s->cand;

    int32_t chosen;
    if (cm_sampler_is_greedy(s)) {
        /* plain greedy: the argmax of the raw logits, without copying V candidates (NaN never wins;
         * ties go to the lowest id) */
        chosen = (int32_t)cm_argmax(logits, V);
        goto done;
    }
    sampler_prepare(s, logits);
    int n = V;
    int best = 0;
    for (int i = 1; i < V; i++) /* strict >: ties go to the lowest id */
        if (c[i].v > c[best].v) best = i;
    if (p->temperature == 0.0f || c[best].v == -INFINITY) {
        chosen = best; /* greedy, or everything banned: nothing to draw from */
        goto done;
    }

    int sorted = 0;
    if (p->min_p > 0.0f && p->top_p >= 1.0f && !(p->top_k > 0 && p->top_k < n)) {
        /* min-p alone: drop in logit space what softmax would put below min_p * p_max, before paying
         * for V exponentials (p_i >= min_p * p_max <=> l_i >= l_max + T log min_p) */
        const float lmin = c[best].v + p->temperature * logf(p->min_p);
        int k = 0;
        for (int i = 0; i < n; i++)
            if (c[i].v >= lmin) c[k++] = c[i];
        n = k;
        best = 0;
        for (int i = 1; i < n; i++) /* the best moved; find it again (ids stay ascending) */
            if (c[i].v > c[best].v) best = i;
    }
    if (p->top_k > 0 && p->top_k < n) {
        cand_select_top(c, n, p->top_k);
        n = p->top_k;
        sorted = 1;
    }
    /* temperature + softmax; values become probabilities relative to the best (which gets exactly 1) */
    const float mx = sorted ? c[0].v : c[best].v, inv_t = 1.0f / p->temperature;
    double sum = 0.0;
    if (isfinite(inv_t)) {
        for (int i = 0; i < n; i++) {
            c[i].v = expf((c[i].v - mx) * inv_t);
            sum += c[i].v;
        }
    } else { /* a temperature so small its inverse overflows: divide (0 / T stays 0 for the best) */
        for (int i = 0; i < n; i++) {
            c[i].v = expf((c[i].v - mx) / p->temperature);
            sum += c[i].v;
        }
    }
    const int n_soft = n;
    if (p->top_p < 1.0f) {
        const double target = (double)p->top_p * sum;
        int m = sorted ? n : 64, cut = n;
        for (;;) {
            if (!sorted) cand_select_top(c, n, m);
            if (m > n) m = n;
            double cum = 0.0;
            int i = 0;
            for (; i < m; i++) {
                cum += c[i].v;
                if (cum >= target) break;
            }
            if (i < m) { /* smallest prefix holding the mass, at least one token */
                cut = i + 1;
                break;
            }
            if (m == n) break; /* rounding left us just short: keep everything */
            m = m > n / 8 ? n : m * 8;
        }
        n = cut;
    }
    if (p->min_p > 0.0f) { /* p_max is 1 here by construction */
        int k = 0;
        for (int i = 0; i < n; i++)
            if (c[i].v >= p->min_p) c[k++] = c[i];
        n = k; /* the best token always survives */
    }
    if (n != n_soft) { /* renormalise over what top-p / min-p kept */
        sum = 0.0;
        for (int i = 0; i < n; i++) sum += c[i].v;
    }
    double r = rng_uniform(s->rng) * sum, acc = 0.0;
    chosen = c[0].id;
    for (int i = 0; i < n; i++) {
        if (c[i].v <= 0.0f) continue;
        chosen = c[i].id; /* also the fallback should rounding leave r >= acc at the end */
        acc += c[i].v;
        if (r < acc) break;
    }

done:
    return cm_sampler_take(s, logits, chosen, chosen_lp, top);
}
