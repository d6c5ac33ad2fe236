/*
 * cmd_bench.c - `codemoe bench`: prefill and decode speed of a model, printed as a table in the style of
 * llama-bench so the two can be set side by side.
 *
 *   codemoe bench --model M [-p 512] [-n 128] [-b 1] [-d 0] [-t 1,2] [-r 3] [--kv-type f32,f16] [--membw]
 *
 * ppN: one N-token forward on a fresh sequence (logits of the last token only), tokens/s = N / time.
 * tgN: after a 1-token prompt, N single-token forwards with logits, tokens/s = N / time. With -b B > 1
 * (tgNxB): B sequences decode side by side, each step one token of each (a server's decode step of B
 * streams), tokens/s = N * B / time.
 * With -d D > 0 (ppN @ dD, tgN @ dD, as llama-bench's depth), each sequence first gets D tokens, unmeasured
 * (prompts of up to 512 tokens a forward), so that the measured tokens attend over D earlier positions.
 * Each test creates one context (as a server keeps one), runs once unmeasured (warm-up: page in the
 * weights and the context's buffers), then REPS times on a fresh sequence each; mean ± sample std.
 * t/cpu-s divides tokens by the CPU time of all threads: the efficiency on a machine shared with others.
 * Several thread counts or KV types are measured in the same run, one row each, so they can be compared
 * under the same conditions.
 * --membw first measures the machine's plain memory read bandwidth at each thread count (a buffer far
 * larger than the caches, read in full several times per rep, best of reps), then gives each decode row
 * the bytes a token reads (cm_model_decode_bytes at the run's mean depth) and its tokens/s as a fraction
 * of the bound that bandwidth sets (bound = bandwidth / bytes per token). Both are also taken on the CPU
 * clock (each reading thread's bytes / its CPU time, summed; tokens per CPU-second x threads), which a
 * busy machine's time-slicing distorts much less than the wall clock.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "codemoe.h"
#include "commands.h"

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_s(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* ------------------------------------------------------------ memory bandwidth */

enum { MEMBW_MIB = 512, MEMBW_PASSES = 3, MEMBW_REPS = 5 };

typedef struct {
    const uint64_t *p;
    size_t n; /* words */
    uint64_t sum;
    double cpu; /* the thread's CPU seconds for its passes */
} membw_part;

/* Reads its slice MEMBW_PASSES times. Eight independent sums keep many loads in flight (one chain would
 * measure the adder's latency), and the result is kept so the reads cannot be optimised away. */
static void *membw_read(void *arg) {
    membw_part *w = arg;
    double c0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
    uint64_t s[8] = {0};
    for (int pass = 0; pass < MEMBW_PASSES; pass++)
        for (size_t i = 0; i + 8 <= w->n; i += 8)
            for (int j = 0; j < 8; j++) s[j] += w->p[i + j];
    w->sum = s[0] ^ s[1] ^ s[2] ^ s[3] ^ s[4] ^ s[5] ^ s[6] ^ s[7];
    w->cpu = clock_s(CLOCK_THREAD_CPUTIME_ID) - c0;
    return NULL;
}

/* Plain read bandwidth in bytes/s of `threads` threads each reading its own slice of buf (words), best
 * of MEMBW_REPS, on the wall clock (returned) and on the CPU clock (*cpu_bw: the sum of each thread's
 * bytes / CPU seconds); 0 when a thread cannot be started. */
static double membw_measure(const uint64_t *buf, size_t words, int threads, double *cpu_bw) {
    membw_part parts[256];
    pthread_t tid[256];
    double best = 0;
    *cpu_bw = 0;
    size_t per = words / (size_t)threads / 8 * 8;
    for (int rep = 0; rep < MEMBW_REPS; rep++) {
        double t0 = now_s();
        int started = 0;
        for (int i = 0; i < threads; i++) {
            parts[i] = (membw_part){.p = buf + (size_t)i * per, .n = per};
            if (i > 0 && pthread_create(&tid[i], NULL, membw_read, &parts[i])) break;
            started++;
        }
        membw_read(&parts[0]);
        for (int i = 1; i < started; i++) pthread_join(tid[i], NULL);
        double t = now_s() - t0;
        if (started < threads) return 0;
        volatile uint64_t sink = parts[0].sum;
        (void)sink;
        double bytes = (double)per * sizeof *buf * MEMBW_PASSES, bw = bytes * (double)threads / t, cbw = 0;
        for (int i = 0; i < threads; i++) cbw += parts[i].cpu > 0 ? bytes / parts[i].cpu : 0;
        if (bw > best) best = bw;
        if (cbw > *cpu_bw) *cpu_bw = cbw;
    }
    return best;
}

static int g_routing_stats = 1; /* --routing-stats 0|1: MoE routing statistics off/on (their cost) */
#define CLI_BENCH_MAX_SEQ 64    /* -b at most */

static void usage(void) {
    fprintf(stderr,
            "usage: codemoe bench --model FILE [-p N] [-n N] [-b B] [-d D] [-t T[,T...]] [-r REPS] [--kv-type T[,T]]\n"
            "  -m, --model FILE   GGUF model\n"
            "  -p, --n-prompt N   prefill test size (default 512; 0 skips)\n"
            "  -n, --n-gen N      decode test size (default 128; 0 skips)\n"
            "  -b, --n-seq B      sequences decoding side by side in the decode test, one token each a\n"
            "                     step (default 1; test tgNxB, tokens/s of all of them; at most 64)\n"
            "  -d, --depth D      tokens in each sequence's KV cache before the measured ones (default 0;\n"
            "                     tests ppN @ dD, tgN @ dD: the attention over a long context)\n"
            "  -t, --threads LIST thread counts, comma separated (default 1)\n"
            "  -r, --repetitions  measured runs per test (default 3)\n"
            "  --kv-type LIST     KV cache element types, f16 and/or f32, comma separated (default: the\n"
            "                     other commands' default)\n"
            "  --routing-stats 0|1  gather MoE routing statistics (default 1)\n"
            "  --membw            measure memory read bandwidth first; decode rows get bytes per token and\n"
            "                     their fraction of the bandwidth bound (wall clock and CPU clock)\n");
}

#define BENCH_DEPTH_CHUNK 512 /* -d: the depth's tokens a forward at most */

/* The rows of the largest forward that gives a sequence its depth. */
static int depth_rows(int depth) { return depth < BENCH_DEPTH_CHUNK ? depth : BENCH_DEPTH_CHUNK; }

/* A context for one test (its thread count and KV type; rows sequences at once, depth tokens each before
 * the test's), used for its warm-up and every rep. */
static cm_ctx *test_ctx(const cm_model *m, int threads, int kv_type, int pp, int tg, int rows, int depth) {
    int nb = pp > rows ? pp : rows, dc = depth_rows(depth);
    cm_ctx_params cp = {.n_threads = threads, .n_seq_max = rows, .n_ctx = depth + (pp > tg + 1 ? pp : tg + 1),
                        .n_batch_max = nb > dc ? nb : dc, .kv_type = kv_type};
    cm_err err = {0};
    cm_ctx *c = cm_ctx_create(m, &cp, &err);
    if (!c) fprintf(stderr, "bench: %s\n", err.msg);
    else cm_ctx_set_routing_stats(c, g_routing_stats);
    return c;
}

/* One run of a test on fresh sequences of c (the context is the test's: as a server's, its buffers are
 * warm from the run before), nb of them side by side in the decode test (1 in prefill), each first given
 * depth tokens (unmeasured); returns wall seconds (CPU seconds of all threads in *cpu) or < 0 on error.
 * toks holds at least max(pp, tg + 1, depth) ids; seqs and want at least max(pp, 2 * nb,
 * depth_rows(depth)). */
static double run_once(cm_ctx *c, int pp, int tg, int nb, int depth, const int32_t *toks, int32_t *seqs,
                       int8_t *want, double *cpu) {
    cm_err err = {0};
    int s[CLI_BENCH_MAX_SEQ], open = 0;
    double t = -1;
    for (; open < nb; open++)
        if ((s[open] = cm_seq_open(c, &err)) < 0) goto out;
    for (int k = 0; k < nb; k++)
        for (int d0 = 0; d0 < depth; d0 += BENCH_DEPTH_CHUNK) {
            int n = depth_rows(depth - d0);
            for (int i = 0; i < n; i++) seqs[i] = s[k];
            cm_batch b = {.n = n, .token = toks + d0, .seq = seqs, .logits = NULL};
            if (cm_forward(c, &b, &err)) goto out;
        }
    if (pp > 0) {
        for (int i = 0; i < pp; i++) seqs[i] = s[0];
        cm_batch b = {.n = pp, .token = toks, .seq = seqs, .logits = NULL};
        double t0 = now_s(), c0 = cpu_s();
        if (cm_forward(c, &b, &err) == 0) t = now_s() - t0, *cpu = cpu_s() - c0;
    } else {
        /* every sequence starts from its own one-token prompt; step i feeds each its token i + 1 (the
         * sequences' ids offset by k: no two rows the same) */
        int32_t *step = seqs + nb; /* scratch after the sequence ids: room for nb more */
        for (int k = 0; k < nb; k++) seqs[k] = s[k], want[k] = 1, step[k] = toks[k % (tg + 1)];
        cm_batch b = {.n = nb, .token = step, .seq = seqs, .logits = want};
        if (cm_forward(c, &b, &err) == 0) {
            double t0 = now_s(), c0 = cpu_s();
            int i;
            for (i = 0; i < tg; i++) {
                for (int k = 0; k < nb; k++) step[k] = toks[(1 + i + k) % (tg + 1)];
                if (cm_forward(c, &b, &err)) break;
            }
            if (i == tg) t = now_s() - t0, *cpu = cpu_s() - c0;
        }
    }
out:
    if (t < 0) fprintf(stderr, "bench: %s\n", err.msg);
    for (int k = 0; k < open; k++) cm_seq_close(c, s[k]);
    return t;
}

int cmd_bench(int argc, char **argv) {
    const char *model = NULL;
    int pp = 512, tg = 128, reps = 3, n_thr = 0, thr[16], n_kv = 0, kv[2], membw = 0;
    int n_seq = 1;   /* -b: sequences decoding side by side in the tg test */
    int depth = 0;   /* -d: tokens in each sequence before the measured ones */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        }
        if (!strcmp(a, "--membw")) {
            membw = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "bench: %s needs a value\n", a);
            usage();
            return 2;
        }
        i++;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            model = v;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--n-prompt")) {
            if (cli_parse_int(v, 0, 1 << 16, &pp)) goto bad;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-gen")) {
            if (cli_parse_int(v, 0, 1 << 16, &tg)) goto bad;
        } else if (!strcmp(a, "-b") || !strcmp(a, "--n-seq")) {
            if (cli_parse_int(v, 1, CLI_BENCH_MAX_SEQ, &n_seq)) goto bad;
        } else if (!strcmp(a, "-d") || !strcmp(a, "--depth")) {
            if (cli_parse_int(v, 0, 1 << 16, &depth)) goto bad;
        } else if (!strcmp(a, "--routing-stats")) {
            if (cli_parse_int(v, 0, 1, &g_routing_stats)) goto bad;
        } else if (!strcmp(a, "-r") || !strcmp(a, "--repetitions")) {
            if (cli_parse_int(v, 1, 1000, &reps)) goto bad;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            n_thr = 0;
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (n_thr == 16 || cli_parse_int(tok, 1, 256, &thr[n_thr])) goto bad;
                n_thr++;
            }
        } else if (!strcmp(a, "--kv-type")) {
            char buf[64];
            snprintf(buf, sizeof buf, "%s", v);
            n_kv = 0;
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (n_kv == 2 || !cli_kv_type("bench", a, tok, &kv[n_kv])) return 2;
                n_kv++;
            }
            if (n_kv == 0) goto bad;
        } else {
            fprintf(stderr, "bench: unknown option %s\n", a);
            usage();
            return 2;
        }
        continue;
    bad:
        fprintf(stderr, "bench: bad value for %s: %s\n", a, v);
        return 2;
    }
    if (!model) {
        usage();
        return 2;
    }
    if (n_thr == 0) thr[n_thr++] = 1;
    if (n_kv == 0) kv[n_kv++] = CLI_KV_TYPE_DEFAULT;

    cm_err err = {0};
    cm_model_params mp = {0};
    cm_model *m = cm_model_load(model, &mp, &err);
    if (!m) {
        fprintf(stderr, "bench: %s\n", err.msg);
        return 1;
    }
    const cm_model_info *in = cm_model_get_info(m);
    int ntok = (pp > tg + 1 ? pp : tg + 1) + 1, nrow = (pp > 2 * n_seq ? pp : 2 * n_seq) + 1;
    if (ntok < depth + 1) ntok = depth + 1;
    if (nrow < depth_rows(depth) + 1) nrow = depth_rows(depth) + 1;
    int32_t *toks = malloc((size_t)ntok * sizeof *toks), *seqs = malloc((size_t)nrow * sizeof *seqs);
    int8_t *want = malloc((size_t)nrow);
    if (!toks || !seqs || !want) {
        fprintf(stderr, "bench: out of memory\n");
        cm_model_free(m);
        return 1;
    }
    uint64_t r = 42;
    for (int i = 0; i < ntok; i++) { /* fixed pseudo-random ids: runs are comparable */
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)((r >> 33) % (uint64_t)in->n_vocab);
    }

    /* bandwidth per thread count, measured before any model weights are read */
    double bw[16] = {0}, cbw[16] = {0};
    if (membw && tg > 0) {
        size_t words = (size_t)MEMBW_MIB * 1024 * 1024 / sizeof(uint64_t);
        uint64_t *buf = malloc(words * sizeof *buf);
        if (!buf) {
            fprintf(stderr, "bench: out of memory for the %d MiB bandwidth buffer\n", MEMBW_MIB);
            membw = 0;
        } else {
            for (size_t i = 0; i < words; i++) buf[i] = i; /* fault every page in before timing */
            for (int ti = 0; ti < n_thr; ti++) {
                bw[ti] = membw_measure(buf, words, thr[ti], &cbw[ti]);
                printf("membw: %d thread%s %.2f GB/s, per CPU-second %.2f GB/s (%d MiB, %d passes, best of %d)\n",
                       thr[ti], thr[ti] == 1 ? "" : "s", bw[ti] / 1e9, cbw[ti] / 1e9, MEMBW_MIB, MEMBW_PASSES,
                       MEMBW_REPS);
            }
            printf("\n");
            free(buf);
        }
    }

    char mname[64];
    snprintf(mname, sizeof mname, "%s %s", in->arch, in->name && *in->name ? in->name : "");
    /* t/cpu-s: tokens per CPU-second of all threads; on a shared machine the wall-clock t/s depends on
     * the neighbours, this column much less */
    const int tw = depth > 0 ? 16 : 6; /* the test column: "tg128x16 @ d4096" */
    printf("| %-28s | %6s | %10s | %9s | %7s | %3s | %*s | %18s | %9s |", "model", "type", "size", "params",
           "threads", "kv", tw, "test", "t/s", "t/cpu-s");
    if (membw) printf(" %9s | %9s | %8s | %9s | %10s |", "MB/tok", "bound t/s", "of bound", "cpu bound", "cpu of bnd");
    printf("\n| %.28s | -----: | ---------: | --------: | ------: | --: | %.*s: | -----------------: | --------: |%s\n",
           "----------------------------------", tw - 1, "----------------", membw ? " --------: | --------: | -------: | --------: | ---------: |" : "");
    int rc = 0;
    for (int ti = 0; ti < n_thr && !rc; ti++) {
        for (int test = 0; test < 2 && !rc; test++) {
            for (int ki = 0; ki < n_kv && !rc; ki++) {
                int n = test == 0 ? pp : tg;
                if (n == 0) continue;
                const int rows = test == 0 ? 1 : n_seq; /* sequences side by side: tokens per decode step */
                const int tpp = test == 0 ? pp : 0, ttg = test == 0 ? 0 : tg;
                double sum = 0, sum2 = 0, csum = 0;
                cm_ctx *c = test_ctx(m, thr[ti], kv[ki], tpp, ttg, rows, depth);
                if (!c) {
                    rc = 1;
                    break;
                }
                for (int k = -1; k < reps; k++) {
                    double cpu = 0;
                    double t = run_once(c, tpp, ttg, rows, depth, toks, seqs, want, &cpu);
                    if (t <= 0) {
                        rc = 1;
                        break;
                    }
                    if (k < 0) continue; /* warm-up */
                    double tps = (double)n * rows / t;
                    csum += cpu;
                    sum += tps;
                    sum2 += tps * tps;
                }
                cm_ctx_free(c);
                if (rc) break;
                double mean = sum / reps, sd = reps > 1 ? sqrt(fmax(0, (sum2 - sum * sum / reps) / (reps - 1))) : 0;
                char tname[40], tps[32];
                int tl = rows > 1 ? snprintf(tname, sizeof tname, "tg%dx%d", n, rows)
                                  : snprintf(tname, sizeof tname, "%s%d", test == 0 ? "pp" : "tg", n);
                if (depth > 0) snprintf(tname + tl, sizeof tname - (size_t)tl, " @ d%d", depth);
                snprintf(tps, sizeof tps, "%.2f ± %.2f", mean, sd);
                printf("| %-28.28s | %6s | %6.2f MiB | %7.2f M | %7d | %3s | %*s | %19s | %9.2f |", mname,
                       in->weight_type, (double)in->file_bytes / (1024.0 * 1024.0), (double)in->n_params / 1e6,
                       thr[ti], kv[ki] == CM_KV_F16 ? "f16" : "f32", tw, tname, tps, (double)n * rows * reps / csum);
                if (membw && test == 1 && rows == 1 && bw[ti] > 0) { /* several rows a step: no one bound */
                    /* the decode tokens see n_past depth + 1 .. depth + tg: bytes are linear in depth, so
                     * the mean is the mean of the ends */
                    double bytes = ((double)cm_model_decode_bytes(m, depth + 1, kv[ki]) +
                                    (double)cm_model_decode_bytes(m, depth + tg, kv[ki])) / 2;
                    double bound = bw[ti] / bytes, cbound = cbw[ti] / bytes;
                    printf(" %9.2f | %9.2f | %7.0f%% | %9.2f | %9.0f%% |", bytes / 1e6, bound, 100 * mean / bound, cbound,
                           100 * (n * reps / csum) * thr[ti] / cbound);
                } else if (membw) {
                    printf(" %9s | %9s | %8s | %9s | %10s |", "-", "-", "-", "-", "-");
                }
                printf("\n");
                fflush(stdout);
            }
        }
    }
    free(toks);
    free(seqs);
    free(want);
    cm_model_free(m);
    return rc;
}
