/*
 * test_cli.c - the real `codemoe` binary ($CM_BINARY) on the committed fixture models: greedy
 * `complete` reproduces the pinned token ids of every GGUF-fixture golden (dense and MoE, as text) under
 * every kernel family the machine runs (CODEMOE_ISA), sampling is repeatable by seed, `complete
 * --suffix` builds the API's FIM prompt (api/), `--stop` ends the output before the earliest stop
 * string, `tokenize` agrees with the golden prompt ids and round-trips, `inspect` lists the expected
 * tensors, `quantize` output loads and generates (its Q8_0 tensors are `convert --type q8_0`'s), and
 * every error path (missing/truncated/hostile file, bad flags, prompt longer than the context) exits
 * non-zero with a message on stderr and without a crash.
 *
 * Each command runs in a child (posix_spawn) with stdout and stderr captured to temporary files.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "api.h"
#include "codemoe.h"
#include "golden.h"
#include "test.h"

extern char **environ;

typedef struct run_result {
    int code;   /* exit status, or -1 when killed by a signal */
    int sig;    /* the signal, 0 if it exited */
    char *out;  /* NUL-terminated stdout */
    size_t nout;
    char *err;  /* NUL-terminated stderr */
} run_result;

static char tmp_dir[256];

static const char *binary(void) {
    const char *b = getenv("CM_BINARY");
    return b && *b ? b : "build/server/codemoe";
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(n > 0 ? (size_t)n + 1 : 1);
    size_t r = b && n > 0 ? fread(b, 1, (size_t)n, f) : 0;
    fclose(f);
    if (!b) return NULL;
    b[r] = '\0';
    if (len) *len = r;
    return b;
}

static void run_free(run_result *r) {
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof *r);
}

/* Runs CM_BINARY with args (NULL-terminated, not including argv[0]). Returns 0 if it could be run. */
static int run(run_result *r, const char *const *args) {
    memset(r, 0, sizeof *r);
    const char *argv[128];
    int n = 0;
    argv[n++] = binary();
    while (*args && n < 127) argv[n++] = *args++;
    argv[n] = NULL;
    char out_path[320], err_path[320];
    snprintf(out_path, sizeof out_path, "%s/stdout", tmp_dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", tmp_dir);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(rc));
        return -1;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    if (WIFSIGNALED(st)) {
        r->code = -1;
        r->sig = WTERMSIG(st);
    } else {
        r->code = WEXITSTATUS(st);
    }
    r->out = slurp(out_path, &r->nout);
    r->err = slurp(err_path, NULL);
    if (!r->out || !r->err) return -1;
    return 0;
}

#define RUN_OK(r, ...) do { const char *argv_[] = {__VA_ARGS__, NULL}; ASSERT_EQ_INT(run(r, argv_), 0); } while (0)

/* An error path: ran, exited (no signal) with `code`, and said something on stderr. */
#define ASSERT_FAILS_WITH(r, code_, ...) do { RUN_OK(r, __VA_ARGS__); \
    if ((r)->sig) TEST_FAIL_("killed by signal %d; stderr: %s", (r)->sig, (r)->err); \
    ASSERT_EQ_INT((r)->sig, 0); ASSERT_EQ_INT((r)->code, code_); \
    ASSERT_TRUE(strlen((r)->err) > 0); } while (0)

/* ------------------------------------------------------------ fixtures */

typedef struct golden {
    char name[128];
    char model[1024];
    char arch[64];
    int kind;              /* GOLDEN_DENSE or GOLDEN_MOE */
    char *text;            /* greedy prompt text */
    int32_t prompt[512];
    int n_prompt;
    int32_t tokens[256];
    int n_tokens;
    int n_predict;
} golden;

static golden goldens[32];
static int n_goldens;

static int golden_cmp(const void *a, const void *b) {
    return strcmp(((const golden *)a)->name, ((const golden *)b)->name);
}

/* Every GGUF-fixture golden (dense and MoE in tests/golden.h's inventory): each must load and run. */
static int load_goldens(void) {
    int n_inv;
    const golden_entry *inv = golden_inventory(&n_inv);
    for (int k = 0; k < n_inv && n_goldens < (int)(sizeof goldens / sizeof goldens[0]); k++) {
        if (inv[k].kind != GOLDEN_DENSE && inv[k].kind != GOLDEN_MOE) continue;
        json_t *j = golden_json(inv[k].name);
        if (!j) continue;
        json_t *model = json_object_get(j, "model"), *g = json_object_get(j, "greedy");
        json_t *text = g ? json_object_get(g, "text") : NULL;
        json_t *pr = g ? json_object_get(g, "prompt") : NULL, *tk = g ? json_object_get(g, "tokens") : NULL;
        golden *G = &goldens[n_goldens];
        if (json_is_string(model) && json_is_string(text) &&
            (G->n_prompt = golden_ids(pr, G->prompt, 512)) >= 0 && (G->n_tokens = golden_ids(tk, G->tokens, 256)) >= 0) {
            n_goldens++;
            snprintf(G->name, sizeof G->name, "%s", inv[k].name);
            G->kind = inv[k].kind;
            snprintf(G->model, sizeof G->model, "%s", test_fixture(json_string_value(model)));
            G->text = strdup(json_string_value(text));
            json_t *arch = json_object_get(j, "arch");
            snprintf(G->arch, sizeof G->arch, "%s", json_is_string(arch) ? json_string_value(arch) : "?");
            json_t *np = json_object_get(g, "n_predict");
            G->n_predict = json_is_integer(np) ? (int)json_integer_value(np) : G->n_tokens;
        } else {
            fprintf(stderr, "golden/%s.json: no model or greedy prompt/tokens/text\n", inv[k].name);
        }
        json_decref(j);
    }
    qsort(goldens, (size_t)n_goldens, sizeof goldens[0], golden_cmp);
    return n_goldens;
}

/* The model most tests use: qwen2-gqa (the reference dense model) when present. */
static golden *primary(void) {
    for (int i = 0; i < n_goldens; i++)
        if (!strcmp(goldens[i].name, "qwen2-gqa")) return &goldens[i];
    for (int i = 0; i < n_goldens; i++)
        if (!strcmp(goldens[i].arch, "qwen2")) return &goldens[i];
    return &goldens[0];
}

static cm_model *load_vocab(const char *path) {
    cm_err err = {0};
    cm_model_params mp = {.n_threads = 1, .vocab_only = 1};
    cm_model *m = cm_model_load(path, &mp, &err);
    if (!m) fprintf(stderr, "load %s: %s\n", path, err.msg);
    return m;
}

/* ------------------------------------------------------------ tests */

TEST(help_version_and_usage_errors) {
    run_result r;
    RUN_OK(&r, "--version");
    ASSERT_EQ_INT(r.code, 0);
    {
        /* "codemoe <meson's project version> (...)": the binary's version comes from meson.build */
        const char *want = getenv("CM_VERSION");
        ASSERT_TRUE(want != NULL && *want);
        char head[128];
        snprintf(head, sizeof head, "codemoe %s (", want);
        if (strncmp(r.out, head, strlen(head)) != 0) TEST_FAIL_("--version printed \"%s\", want \"%s...\"", r.out, head);
    }
    run_free(&r);
    RUN_OK(&r, "--help");
    ASSERT_EQ_INT(r.code, 0);
    ASSERT_TRUE(strstr(r.out, "complete") && strstr(r.out, "tokenize") && strstr(r.out, "inspect"));
    run_free(&r);
    {
        const char *none[] = {NULL};
        ASSERT_EQ_INT(run(&r, none), 0);
        ASSERT_EQ_INT(r.code, 2);
        ASSERT_TRUE(strlen(r.err) > 0);
        run_free(&r);
    }
    ASSERT_FAILS_WITH(&r, 2, "frobnicate");
    ASSERT_TRUE(strstr(r.err, "frobnicate") != NULL);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "tokenize");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "inspect");
    run_free(&r);
}

/* Every golden's greedy completion, through the binary as the environment now configures it, with K/V
 * of kv_type (f16, the default, or f32). PyTorch's greedy tokens pin the exact path
 * (CODEMOE_EXACT_ACTIVATIONS=1, which the caller sets); int8_outputs_match_across_families holds the
 * default int8 decode path to one answer whatever the kernel family. */
static void greedy_goldens(const char *family, const char *kv_type) {
    ASSERT_EQ_INT(n_goldens, 25); /* golden.h: 17 dense + 8 MoE fixtures, every one runs */
    for (int gi = 0; gi < n_goldens; gi++) {
        golden *G = &goldens[gi];
        cm_model *m = load_vocab(G->model);
        ASSERT_TRUE(m);
        /* expected text: the pinned tokens up to the first end-of-generation token, detokenised */
        int n = 0;
        while (n < G->n_tokens && !cm_token_is_eog(m, G->tokens[n])) n++;
        char *want = malloc(1 << 16);
        int nw = cm_detokenize(m, G->tokens, n, 0, want, 1 << 16);
        cm_model_free(m);
        ASSERT_TRUE(nw >= 0 && nw < (1 << 16));
        char np[16];
        snprintf(np, sizeof np, "%d", G->n_predict);
        run_result r;
        RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "-n", np, "--temperature", "0",
               "--threads", "2", "--kv-type", kv_type);
        if (r.code != 0 || r.nout != (size_t)nw || memcmp(r.out, want, (size_t)nw) != 0)
            fprintf(stderr, "%s [%s, KV %s]: want \"%.*s\"\n  got \"%s\" (exit %d)\n  stderr: %s\n", G->name, family,
                    kv_type, nw, want, r.out, r.code, r.err);
        CHECK_TRUE(r.code == 0);
        CHECK_TRUE(r.nout == (size_t)nw && memcmp(r.out, want, (size_t)nw) == 0);
        CHECK_TRUE(strstr(r.err, "prefill") != NULL); /* timings go to stderr */
        run_free(&r);
        free(want);
    }
}

/* The kernel families the binary runs here: CODEMOE_ISA=name takes effect only for those, and
 * --version names the family in use. */
static const char *const all_families[] = {"avx512vnni", "avx512", "avx2", "scalar"};

static int binary_runs_family(const char *name) {
    setenv("CODEMOE_ISA", name, 1);
    run_result r;
    const char *argv[] = {"--version", NULL};
    int ok = run(&r, argv) == 0 && r.code == 0;
    char want[64];
    snprintf(want, sizeof want, "(kernels: %s,", name);
    ok = ok && strstr(r.out, want) != NULL;
    run_free(&r);
    unsetenv("CODEMOE_ISA");
    return ok;
}

/* The pinned tokens do not depend on the kernel family: every family the machine runs (scalar always)
 * reproduces them on the exact path, with f16 K/V (the default) and, on the best family, with f32. */
TEST(complete_greedy_reproduces_pinned_tokens) {
    setenv("CODEMOE_EXACT_ACTIVATIONS", "1", 1);
    int ran = 0;
    for (size_t f = 0; f < sizeof all_families / sizeof all_families[0]; f++) {
        const char *name = all_families[f];
        if (!binary_runs_family(name)) {
            fprintf(stderr, "-- kernel family %s: not run by this CPU or build\n", name);
            continue;
        }
        fprintf(stderr, "-- kernel family %s\n", name);
        setenv("CODEMOE_ISA", name, 1);
        greedy_goldens(name, "f16");
        unsetenv("CODEMOE_ISA");
        ran++;
    }
    greedy_goldens("best", "f32");
    unsetenv("CODEMOE_EXACT_ACTIVATIONS");
    ASSERT_TRUE(binary_runs_family("scalar"));
    ASSERT_TRUE(ran >= 1);
}

/* The default decode path (int8 activations for quantised weights) gives every golden's prompt the same
 * greedy text under every kernel family the machine runs: the fast int8 kernels are bit-exact with the
 * scalar references (test_quants), and this holds the whole binary to it. */
TEST(int8_outputs_match_across_families) {
    int compared = 0;
    for (int gi = 0; gi < n_goldens; gi++) {
        golden *G = &goldens[gi];
        char np[16];
        snprintf(np, sizeof np, "%d", G->n_predict);
        char *first = NULL;
        for (size_t f = 0; f < sizeof all_families / sizeof all_families[0]; f++) {
            const char *name = all_families[f];
            if (!binary_runs_family(name)) continue;
            setenv("CODEMOE_ISA", name, 1);
            run_result r;
            RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "-n", np, "--temperature", "0",
                   "--threads", "2");
            unsetenv("CODEMOE_ISA");
            CHECK_TRUE(r.code == 0);
            if (!first) {
                first = strdup(r.out);
            } else {
                if (strcmp(first, r.out) != 0)
                    TEST_FAIL_("%s: family %s gives \"%s\", the best family \"%s\"", G->name, name, r.out, first);
                compared++;
            }
            run_free(&r);
        }
        free(first);
    }
    ASSERT_TRUE(compared >= n_goldens); /* scalar is always there besides the best family */
}

TEST(complete_from_file_equals_prompt) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    char path[400];
    snprintf(path, sizeof path, "%s/prompt.txt", tmp_dir);
    FILE *f = fopen(path, "wb");
    ASSERT_TRUE(f);
    fputs(G->text, f);
    fclose(f);
    run_result a, b;
    RUN_OK(&a, "complete", "--model", G->model, "--prompt", G->text, "-n", "8", "--temperature", "0");
    RUN_OK(&b, "complete", "--model", G->model, "--file", path, "-n", "8", "--temperature", "0");
    ASSERT_EQ_INT(a.code, 0);
    ASSERT_EQ_INT(b.code, 0);
    ASSERT_TRUE(a.nout == b.nout && memcmp(a.out, b.out, a.nout) == 0);
    run_free(&a);
    run_free(&b);
}

TEST(complete_sampling_is_repeatable_by_seed) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    run_result a, b;
    RUN_OK(&a, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "1.2",
           "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01", "--repeat-penalty", "1.1",
           "--presence-penalty", "0.2", "--frequency-penalty", "0.1", "--seed", "1234", "--logprobs", "3");
    RUN_OK(&b, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "1.2",
           "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01", "--repeat-penalty", "1.1",
           "--presence-penalty", "0.2", "--frequency-penalty", "0.1", "--seed", "1234", "--logprobs", "3");
    ASSERT_EQ_INT(a.code, 0);
    ASSERT_EQ_INT(b.code, 0);
    ASSERT_TRUE(a.nout == b.nout && memcmp(a.out, b.out, a.nout) == 0);
    /* one logprobs line per sampled token, on stderr only */
    int lines = 0;
    for (const char *p = a.err; (p = strstr(p, "logprobs: ")); p++) lines++;
    ASSERT_TRUE(lines >= 1 && lines <= 24);
    ASSERT_TRUE(strstr(a.out, "logprobs") == NULL);
    run_free(&a);
    run_free(&b);
}

TEST(complete_fim_and_special) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    run_result r;
    RUN_OK(&r, "complete", "--model", G->model, "--prompt", "def add(a, b):\n    return ", "--suffix",
           "\n\nprint(add(1, 2))\n", "-n", "4", "--temperature", "0");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    RUN_OK(&r, "complete", "--model", G->model, "--special", "--prompt",
           "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>", "-n", "4", "--temperature", "0");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
}

/* The text greedy decoding of ids[0..n) yields (at most n_predict tokens), its choice run by the same
 * api_choice_state as `complete` and the server. */
static char *greedy_text(const cm_model *m, const int32_t *ids, int n, int n_predict) {
    cm_err err = {0};
    const int n_ctx = n + n_predict + 1;
    cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = n_ctx, .n_batch_max = n, .kv_tokens = n_ctx};
    cm_ctx *ctx = cm_ctx_create(m, &cp, &err);
    cm_sampling sp;
    cm_sampling_default(&sp);
    sp.temperature = 0;
    cm_sampler *smp = ctx ? cm_sampler_create(m, &sp, &err) : NULL;
    int seq = ctx ? cm_seq_open(ctx, &err) : -1;
    api_choice_state ch;
    int ok = api_choice_state_init(&ch, m, NULL, n_predict, n_ctx) == 0;
    int32_t *seqs = calloc((size_t)n, sizeof *seqs);
    ok = ok && ctx && smp && seq >= 0 && seqs;
    for (int i = 0; ok && i < n; i++) { seqs[i] = seq; cm_sampler_accept_prompt(smp, ids[i]); }
    cm_batch b = {.n = n, .token = ids, .seq = seqs};
    ok = ok && cm_forward(ctx, &b, &err) == 0;
    while (ok && !ch.ended) {
        int32_t tok = cm_sampler_sample(smp, cm_logits(ctx, cm_seq_len(ctx, seq) == n ? n - 1 : 0), NULL, NULL);
        int rc = api_choice_state_push(&ch, tok, cm_seq_len(ctx, seq));
        if (rc < 0) ok = 0;
        if (rc != 0) break;
        cm_batch one = {.n = 1, .token = &tok, .seq = &seq};
        ok = cm_forward(ctx, &one, &err) == 0;
    }
    char *out = NULL;
    if (ok) {
        api_choice_state_end(&ch, API_FINISH_NONE);
        out = malloc(ch.len + 1);
        if (out) {
            memcpy(out, ch.text, ch.len);
            out[ch.len] = 0;
        }
    } else {
        fprintf(stderr, "greedy_text: %s\n", err.msg);
    }
    api_choice_state_free(&ch);
    free(seqs);
    cm_sampler_free(smp);
    cm_ctx_free(ctx);
    return out;
}

/* `complete --suffix` builds the prompt the server builds for a "suffix" request (api_parse_completion):
 * the same number of prompt tokens and, greedily, the same text, even with --special and control-token
 * strings in the prefix and the suffix (user code is plain text in FIM). */
TEST(complete_fim_prompt_is_the_apis) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    const char *prefix = "def f(x):<|endoftext|>\n    return ", *suffix = "\n<|fim_middle|>print(f(1))\n";
    cm_err err = {0};
    cm_model_params mp = {.n_threads = 1};
    cm_model *m = cm_model_load(G->model, &mp, &err);
    ASSERT_TRUE(m);
    api_model am = {.model = m, .id = "m", .n_ctx = 512};
    api_limits lim;
    api_limits_default(&lim);
    json_t *body = json_pack("{s:s,s:s}", "prompt", prefix, "suffix", suffix);
    char *bs = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    api_completion_req req;
    api_error e;
    int prc = api_parse_completion(bs, strlen(bs), &am, &lim, &req, &e);
    free(bs);
    if (prc) fprintf(stderr, "parse: %s\n", e.message);
    ASSERT_EQ_INT(prc, 0);
    char *want = greedy_text(m, req.prompts[0].tokens, req.prompts[0].n_tokens, 6);
    char want_count[64];
    snprintf(want_count, sizeof want_count, "prompt %d tokens", req.prompts[0].n_tokens);
    api_completion_req_free(&req);
    cm_model_free(m);
    ASSERT_TRUE(want);
    run_result r;
    RUN_OK(&r, "complete", "--model", G->model, "--special", "--prompt", prefix, "--suffix", suffix, "-n", "6",
           "--temperature", "0");
    if (r.code || !strstr(r.err, want_count) || strcmp(r.out, want))
        fprintf(stderr, "want %s, text '%s'; stderr: %s\nstdout '%s'\n", want_count, want, r.err, r.out);
    CHECK_TRUE(r.code == 0);
    CHECK_TRUE(strstr(r.err, want_count) != NULL);
    CHECK_TRUE(strcmp(r.out, want) == 0);
    free(want);
    run_free(&r);
}

/* Byte offset of character c of s[0..n) (n when s has fewer characters). */
static size_t char_offset(const char *s, size_t n, int c) {
    size_t i = 0;
    for (; i < n && c > 0; c--)
        for (i++; i < n && ((unsigned char)s[i] & 0xc0) == 0x80;) i++;
    return i;
}

/* Where the first of the stop strings occurs in out[0..n), or n. */
static size_t first_stop(const char *out, size_t n, const char *const *stops, int n_stops) {
    size_t best = n;
    for (int i = 0; i < n_stops; i++) {
        const char *p = memmem(out, n, stops[i], strlen(stops[i]));
        if (p && (size_t)(p - out) < best) best = (size_t)(p - out);
    }
    return best;
}

TEST(complete_stop_strings) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    run_result full, r;
    RUN_OK(&full, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "0");
    ASSERT_EQ_INT(full.code, 0);
    /* stop strings taken from the greedy output itself: characters 1-2 and character 4 */
    size_t a = char_offset(full.out, full.nout, 1), b = char_offset(full.out, full.nout, 3);
    size_t c = char_offset(full.out, full.nout, 4), d = char_offset(full.out, full.nout, 5);
    ASSERT_TRUE(d < full.nout && a > 0);
    char early[16], late[16];
    snprintf(early, sizeof early, "%.*s", (int)(b - a), full.out + a);
    snprintf(late, sizeof late, "%.*s", (int)(d - c), full.out + c);

    /* one stop string: the output is the greedy output up to its first occurrence, without it */
    const char *one[] = {late};
    size_t cut = first_stop(full.out, full.nout, one, 1);
    ASSERT_TRUE(cut > 0 && cut < full.nout);
    RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "0", "--stop", late);
    if (r.code != 0 || r.nout != cut || memcmp(r.out, full.out, cut) != 0)
        fprintf(stderr, "--stop '%s': want %zu bytes of \"%s\", got \"%s\" (exit %d)\n", late, cut, full.out, r.out, r.code);
    CHECK_TRUE(r.code == 0 && r.nout == cut && memcmp(r.out, full.out, cut) == 0);
    CHECK_TRUE(strstr(r.err, "stop: stop string") != NULL);
    run_free(&r);

    /* several: the earliest occurrence of any of them ends it, whatever their order on the line */
    const char *several[] = {late, "\x01never", early};
    cut = first_stop(full.out, full.nout, several, 3);
    ASSERT_TRUE(cut < first_stop(full.out, full.nout, one, 1));
    RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "0", "--stop", late,
           "--stop", "\x01never", "--stop", early);
    CHECK_TRUE(r.code == 0 && r.nout == cut && memcmp(r.out, full.out, cut) == 0);
    CHECK_TRUE(strstr(r.err, "stop: stop string") != NULL);
    run_free(&r);

    /* a stop string that never occurs changes nothing */
    RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "-n", "24", "--temperature", "0", "--stop",
           "\x01never");
    CHECK_TRUE(r.code == 0 && r.nout == full.nout && memcmp(r.out, full.out, full.nout) == 0);
    CHECK_TRUE(strstr(r.err, "stop: stop string") == NULL);
    run_free(&r);
    run_free(&full);

    /* the API's limits: at most 32 strings of 1..512 bytes */
    for (int n_stop = 32; n_stop <= 33; n_stop++) {
        const char *args[2 * 33 + 8];
        int k = 0;
        const char *head[] = {"complete", "--model", G->model, "--prompt", "x", "-n", "1"};
        for (size_t i = 0; i < sizeof head / sizeof *head; i++) args[k++] = head[i];
        for (int i = 0; i < n_stop; i++) { args[k++] = "--stop"; args[k++] = "\x01never"; }
        args[k] = NULL;
        ASSERT_EQ_INT(run(&r, args), 0);
        ASSERT_EQ_INT(r.code, n_stop <= 32 ? 0 : 2);
        if (n_stop > 32) CHECK_TRUE(strstr(r.err, "at most 32") != NULL);
        run_free(&r);
    }
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", G->model, "--prompt", "x", "--stop", "");
    run_free(&r);
    char big[514];
    memset(big, 'x', 513);
    big[513] = '\0';
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", G->model, "--prompt", "x", "--stop", big);
    CHECK_TRUE(strstr(r.err, "512 bytes") != NULL);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", G->model, "--prompt", "x", "--stop");
    run_free(&r);
}

TEST(tokenize_matches_golden_and_round_trips) {
    ASSERT_TRUE(n_goldens > 0);
    for (int gi = 0; gi < n_goldens; gi++) {
        golden *G = &goldens[gi];
        run_result r;
        RUN_OK(&r, "tokenize", "--model", G->model, "--prompt", G->text);
        ASSERT_EQ_INT(r.code, 0);
        char want[8192];
        int o = 0;
        for (int i = 0; i < G->n_prompt && o < (int)sizeof want - 16; i++)
            o += snprintf(want + o, sizeof want - (size_t)o, i ? " %d" : "%d", (int)G->prompt[i]);
        snprintf(want + o, sizeof want - (size_t)o, "\n");
        if (strcmp(r.out, want) != 0) fprintf(stderr, "%s: want %s got %s", G->name, want, r.out);
        CHECK_TRUE(strcmp(r.out, want) == 0);
        run_free(&r);

        /* --pieces: one line per token; the JSON pieces concatenate back to the (ASCII) text */
        RUN_OK(&r, "tokenize", "--model", G->model, "--pieces", "--prompt", G->text);
        ASSERT_EQ_INT(r.code, 0);
        char joined[8192] = "";
        int lines = 0;
        for (char *line = strtok(r.out, "\n"); line; line = strtok(NULL, "\n")) {
            char *tab = strchr(line, '\t');
            ASSERT_TRUE(tab != NULL);
            ASSERT_EQ_INT(atoi(line), G->prompt[lines]);
            json_t *s = json_loads(tab + 1, JSON_DECODE_ANY, NULL);
            ASSERT_TRUE(json_is_string(s));
            strncat(joined, json_string_value(s), sizeof joined - strlen(joined) - 1);
            json_decref(s);
            lines++;
        }
        ASSERT_EQ_INT(lines, G->n_prompt);
        ASSERT_STREQ(joined, G->text);
        run_free(&r);
    }
    /* non-ASCII text: binary's ids -> library detokenize -> the same bytes */
    golden *G = primary();
    const char *text = "naïve café — 你好 😀 x\t\n";
    run_result r;
    RUN_OK(&r, "tokenize", "--model", G->model, "--prompt", text);
    ASSERT_EQ_INT(r.code, 0);
    int32_t ids[256];
    int n = 0;
    for (char *p = r.out; *p && *p != '\n' && n < 256;) {
        char *end;
        ids[n++] = (int32_t)strtol(p, &end, 10);
        ASSERT_TRUE(end != p);
        p = end;
    }
    cm_model *m = load_vocab(G->model);
    ASSERT_TRUE(m);
    char back[1024];
    int nb = cm_detokenize(m, ids, n, 0, back, sizeof back);
    cm_model_free(m);
    ASSERT_TRUE(nb >= 0 && nb < (int)sizeof back);
    back[nb] = '\0';
    ASSERT_STREQ(back, text);
    run_free(&r);
}

TEST(inspect_lists_tensors_and_summary) {
    ASSERT_TRUE(n_goldens > 0);
    for (int gi = 0; gi < n_goldens; gi++) {
        golden *G = &goldens[gi];
        if (G->kind != GOLDEN_DENSE) continue; /* MoE fixtures name their FFN tensors differently */
        run_result r;
        RUN_OK(&r, "inspect", G->model);
        ASSERT_EQ_INT(r.code, 0);
        const char *want[] = {"general.architecture", "tokenizer.ggml.tokens", "token_embd.weight",
                              "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight",
                              "blk.1.attn_norm.weight", "output_norm.weight", "summary:", "params", "vocab"};
        for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
            if (!strstr(r.out, want[i])) fprintf(stderr, "%s: inspect lacks '%s'\n", G->name, want[i]);
            CHECK_TRUE(strstr(r.out, want[i]) != NULL);
        }
        run_free(&r);
    }
}

/* A vocab-only GGUF (codemoe convert on a tokenizer-only directory): inspect and tokenize work on it,
 * complete refuses it with a message. */
TEST(vocab_only_file) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    char src[1200], dir[400], out[450], cmd[3000];
    snprintf(src, sizeof src, "%s", test_fixture("hf/qwen2-gqa-hf/tokenizer.json"));
    ASSERT_TRUE(access(src, R_OK) == 0);
    snprintf(dir, sizeof dir, "%s/vocab", tmp_dir);
    ASSERT_TRUE(mkdir(dir, 0700) == 0 || errno == EEXIST);
    size_t tlen;
    char *tj = slurp(src, &tlen);
    ASSERT_TRUE(tj != NULL);
    snprintf(cmd, sizeof cmd, "%s/tokenizer.json", dir);
    FILE *f = fopen(cmd, "wb");
    size_t wrote = f ? fwrite(tj, 1, tlen, f) : 0;
    if (f) fclose(f);
    free(tj);
    ASSERT_EQ_INT(wrote, tlen);
    snprintf(out, sizeof out, "%s/vocab.gguf", tmp_dir);
    run_result r;
    RUN_OK(&r, "convert", dir, out);
    if (r.code != 0) fprintf(stderr, "convert: %s\n", r.err);
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    RUN_OK(&r, "inspect", out);
    ASSERT_EQ_INT(r.code, 0);
    ASSERT_TRUE(strstr(r.out, "tokenizer.ggml.tokens") && strstr(r.out, "vocabulary only"));
    ASSERT_TRUE(strstr(r.out, "token_embd.weight") == NULL);
    run_free(&r);
    RUN_OK(&r, "tokenize", "--model", out, "--prompt", G->text);
    ASSERT_EQ_INT(r.code, 0);
    char want[8192];
    int o = 0;
    for (int i = 0; i < G->n_prompt && o < (int)sizeof want - 16; i++)
        o += snprintf(want + o, sizeof want - (size_t)o, i ? " %d" : "%d", (int)G->prompt[i]);
    snprintf(want + o, sizeof want - (size_t)o, "\n");
    ASSERT_STREQ(r.out, want);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "complete", "--model", out, "--prompt", "x");
    run_free(&r);
    unlink(out);
    snprintf(cmd, sizeof cmd, "%s/tokenizer.json", dir);
    unlink(cmd);
    rmdir(dir);
}

/* The tensor table `codemoe inspect` prints for file: name, type, offset, bytes per tensor; *data_start
 * receives where the data section begins (the file ends at the last tensor, padded to 32). */
typedef struct itensor {
    char name[96], type[16];
    long long off, bytes;
} itensor;

static int inspect_tensors(const char *file, itensor *t, int cap, long long *data_start) {
    run_result r;
    const char *argv[] = {"inspect", file, NULL};
    if (run(&r, argv) != 0 || r.code != 0) { run_free(&r); return -1; }
    int n = 0;
    long long end = 0;
    const char *p = strstr(r.out, "\ntensors:");
    for (p = p ? strchr(p + 1, '\n') : NULL; p && n < cap; p = strchr(p + 1, '\n')) {
        /* name type [ne0, ne1, ...] offset bytes */
        const char *eol = strchr(p + 1, '\n'), *q = strchr(p + 1, ']');
        if (sscanf(p + 1, " %95s %15s", t[n].name, t[n].type) != 2 || !q || (eol && q > eol) ||
            sscanf(q + 1, " %lld %lld", &t[n].off, &t[n].bytes) != 2)
            continue;
        if (t[n].off + t[n].bytes > end) end = t[n].off + t[n].bytes;
        n++;
    }
    run_free(&r);
    struct stat st;
    if (stat(file, &st) != 0) return -1;
    *data_start = (long long)st.st_size - (end + 31) / 32 * 32;
    return n;
}

/* `codemoe quantize`: a fixture's F32 conversion quantised to Q8_0 holds exactly the tensors `convert
 * --type q8_0` writes (one quantiser serves both), and the Q8_0 and Q4_K_M results (the latter also from
 * the 256-row K-quant fixture, requantised) load and generate; bad calls are usage errors. */
TEST(quantize_loads_generates_and_matches_convert) {
    char f32[400], c8[400], q8[400], q4[400], qk[400];
    snprintf(f32, sizeof f32, "%s/qz-f32.gguf", tmp_dir);
    snprintf(c8, sizeof c8, "%s/qz-convert-q8_0.gguf", tmp_dir);
    snprintf(q8, sizeof q8, "%s/qz-q8_0.gguf", tmp_dir);
    snprintf(q4, sizeof q4, "%s/qz-q4_k_m.gguf", tmp_dir);
    snprintf(qk, sizeof qk, "%s/qz-k-q4_k_m.gguf", tmp_dir);
    char hf[1200], kq[1200];
    snprintf(hf, sizeof hf, "%s", test_fixture("hf/qwen2-gqa-hf"));
    snprintf(kq, sizeof kq, "%s", test_fixture("models/qwen2-k-q6_k.gguf"));
    run_result r;
    RUN_OK(&r, "convert", hf, f32);
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    RUN_OK(&r, "convert", hf, c8, "--type", "q8_0");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    RUN_OK(&r, "quantize", f32, q8, "Q8_0");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    RUN_OK(&r, "quantize", f32, q4, "q4_k_m");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "quantize", kq, qk, "Q4_K_M");
    ASSERT_TRUE(strstr(r.err, "--allow-requantize") != NULL);
    run_free(&r);
    RUN_OK(&r, "quantize", "--allow-requantize", kq, qk, "Q4_K_M");
    ASSERT_EQ_INT(r.code, 0);
    run_free(&r);

    static itensor a[64], b[64];
    long long da, db;
    int na = inspect_tensors(c8, a, 64, &da), nb = inspect_tensors(q8, b, 64, &db);
    ASSERT_TRUE(na > 10);
    ASSERT_EQ_INT(na, nb);
    size_t la, lb;
    char *fa = slurp(c8, &la), *fb = slurp(q8, &lb);
    ASSERT_TRUE(fa && fb);
    int n_q8 = 0;
    for (int i = 0; i < na; i++) {
        int j = 0;
        while (j < nb && strcmp(a[i].name, b[j].name)) j++;
        if (j == nb) { TEST_FAIL_("%s missing from the quantized file", a[i].name); continue; }
        CHECK_TRUE(!strcmp(a[i].type, b[j].type) && a[i].bytes == b[j].bytes);
        if (a[i].bytes == b[j].bytes && da + a[i].off + a[i].bytes <= (long long)la &&
            db + b[j].off + b[j].bytes <= (long long)lb &&
            memcmp(fa + da + a[i].off, fb + db + b[j].off, (size_t)a[i].bytes) != 0)
            TEST_FAIL_("%s: data differs between convert --type q8_0 and quantize Q8_0", a[i].name);
        n_q8 += !strcmp(a[i].type, "Q8_0");
    }
    free(fa);
    free(fb);
    ASSERT_TRUE(n_q8 >= 15);

    const char *files[] = {c8, q8, q4, qk};
    char first[4][256];
    for (int k = 0; k < 4; k++) {
        RUN_OK(&r, "complete", "--model", files[k], "--prompt", "def add(a, b):", "-n", "8", "--temperature", "0");
        if (r.code != 0) fprintf(stderr, "%s: %s\n", files[k], r.err);
        ASSERT_EQ_INT(r.code, 0);
        ASSERT_TRUE(r.nout > 0);
        snprintf(first[k], sizeof first[k], "%s", r.out);
        run_free(&r);
    }
    ASSERT_STREQ(first[0], first[1]); /* the same weights generate the same text */

    ASSERT_FAILS_WITH(&r, 2, "quantize", f32, q8, "IQ2_XXS");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "quantize", f32, q8);
    run_free(&r);
    RUN_OK(&r, "quantize", "--help");
    ASSERT_EQ_INT(r.code, 0);
    ASSERT_TRUE(strstr(r.err, "Q4_K_M") != NULL);
    run_free(&r);
    const char *rm[] = {f32, c8, q8, q4, qk};
    for (int k = 0; k < 5; k++) unlink(rm[k]);
}

TEST(missing_and_truncated_files_fail_cleanly) {
    ASSERT_TRUE(n_goldens > 0);
    run_result r;
    ASSERT_FAILS_WITH(&r, 1, "complete", "--model", "/nonexistent/x.gguf", "--prompt", "hi");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "tokenize", "--model", "/nonexistent/x.gguf", "--prompt", "hi");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "inspect", "/nonexistent/x.gguf");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "complete", "--model", primary()->model, "--file", "/nonexistent/prompt");
    run_free(&r);

    /* the first model cut at several points: header only, mid-metadata, mid-tensor-data */
    size_t len;
    char *buf = slurp(primary()->model, &len);
    ASSERT_TRUE(buf && len > 4096);
    size_t cuts[] = {16, len / 50, len / 2, len - 1};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        char path[400];
        snprintf(path, sizeof path, "%s/trunc.gguf", tmp_dir);
        FILE *f = fopen(path, "wb");
        ASSERT_TRUE(f);
        fwrite(buf, 1, cuts[c], f);
        fclose(f);
        RUN_OK(&r, "complete", "--model", path, "--prompt", "hi", "-n", "2");
        if (r.sig || r.code == 0) fprintf(stderr, "truncated at %zu: exit %d signal %d\n", cuts[c], r.code, r.sig);
        CHECK_TRUE(r.sig == 0 && r.code == 1 && strlen(r.err) > 0);
        run_free(&r);
        RUN_OK(&r, "inspect", path);
        CHECK_TRUE(r.sig == 0);
        if (cuts[c] < len / 2) CHECK_TRUE(r.code == 1 && strlen(r.err) > 0); /* metadata is gone */
        run_free(&r);
    }
    free(buf);
}

TEST(hostile_files_fail_cleanly) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", test_fixture("bad"));
    DIR *d = opendir(dir);
    ASSERT_TRUE(d != NULL); /* the hostile corpus (tests/fixtures/bad/) is committed */
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 6 || strcmp(e->d_name + l - 5, ".gguf") != 0) continue;
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        run_result r;
        const char *a1[] = {"inspect", path, NULL};
        const char *a2[] = {"complete", "--model", path, "--prompt", "x", "-n", "1", NULL};
        for (int k = 0; k < 2; k++) {
            if (run(&r, k ? a2 : a1) != 0) {
                CHECK_TRUE(0);
                continue;
            }
            if (r.sig || r.code != 1) fprintf(stderr, "%s (%s): exit %d signal %d\n", e->d_name, k ? "complete" : "inspect", r.code, r.sig);
            CHECK_TRUE(r.sig == 0 && r.code == 1 && strlen(r.err) > 0);
            run_free(&r);
        }
        n++;
    }
    closedir(d);
    ASSERT_TRUE(n > 0);
}

TEST(bad_flags_are_usage_errors) {
    ASSERT_TRUE(n_goldens > 0);
    const char *M = primary()->model;
    run_result r;
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--bogus");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "-n", "abc");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--temperature", "-1");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--top-p", "1.5");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--logprobs", "99");
    run_free(&r);
    /* the API's language rule: a MoLE model refuses a language it has no adapter for; others ignore it */
    char mole[512];
    snprintf(mole, sizeof mole, "%s", test_fixture("models/mole.gguf"));
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", mole, "--prompt", "x", "-n", "1", "--language", "cobol");
    CHECK_TRUE(strstr(r.err, "no adapter for language 'cobol'") != NULL);
    run_free(&r);
    RUN_OK(&r, "complete", "--model", M, "--prompt", "x", "-n", "1", "--language", "cobol");
    CHECK_TRUE(r.code == 0);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--kv-type", "f8");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--prompt", "x");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "complete", "--model", M, "--prompt", "x", "--file", "y");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "tokenize", "--model", M, "--prompt", "x", "--nope");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "inspect", M, "--nope");
    run_free(&r);
}

/* `bench` prints one row per test with a positive rate; --membw adds the bandwidth line and, on the
 * decode row, bytes per token and the fraction of the bound (the prefill row has none, nor a decode row
 * of several sequences, -b; at a depth, -d). Bad values are usage errors, a missing file a clean failure. */
static double cell_after(const char *row, int col) { /* the col-th '|'-separated cell as a number */
    const char *p = row;
    for (int i = 0; i < col && p; i++) p = strchr(p + 1, '|');
    return p ? strtod(p + 1, NULL) : -1;
}

static int cell_is_dash(const char *row, int col) { /* the col-th cell reads "-" */
    const char *p = row;
    for (int i = 0; i < col && p; i++) p = strchr(p + 1, '|');
    return p && p[1 + strspn(p + 1, " ")] == '-';
}

static const char *row_with(const char *out, const char *cell) { /* the start of the row holding cell */
    const char *p = strstr(out, cell);
    while (p && p > out && p[-1] != '\n') p--;
    return p;
}

TEST(bench_reports_rates_and_bound) {
    ASSERT_TRUE(n_goldens > 0);
    const char *M = primary()->model;
    run_result r;
    RUN_OK(&r, "bench", "--model", M, "-p", "16", "-n", "8", "-t", "1", "-r", "1", "--membw");
    if (r.code != 0) fprintf(stderr, "bench: %s\n", r.err);
    ASSERT_EQ_INT(r.code, 0);
    const char *bw = strstr(r.out, "membw: 1 thread ");
    ASSERT_TRUE(bw != NULL);
    CHECK_TRUE(strtod(bw + strlen("membw: 1 thread "), NULL) > 0.1); /* GB/s */
    /* rows: | model | type | size | params | threads | kv | test | t/s | t/cpu-s | MB/tok | bound | of bound */
    const char *pp = row_with(r.out, " pp16 |"), *tg = row_with(r.out, " tg8 |");
    ASSERT_TRUE(pp != NULL && tg != NULL);
    CHECK_TRUE(cell_after(pp, 7) > 0);                       /* t/s */
    CHECK_TRUE(cell_after(pp, 8) > 0);                       /* t/cpu-s */
    CHECK_TRUE(cell_is_dash(pp, 9));                         /* the prefill row has no MB/tok */
    CHECK_TRUE(cell_after(tg, 7) > 0);
    double mb = cell_after(tg, 9), bound = cell_after(tg, 10), frac = cell_after(tg, 11);
    CHECK_TRUE(mb > 0 && bound > 0 && frac > 0);
    run_free(&r);
    /* -b 3: three sequences a step, the row named tg8x3, its rate counting all three's tokens, no bound */
    RUN_OK(&r, "bench", "--model", M, "-p", "0", "-n", "8", "-b", "3", "-t", "1", "-r", "1", "--membw");
    ASSERT_EQ_INT(r.code, 0);
    const char *tb = row_with(r.out, " tg8x3 |");
    ASSERT_TRUE(tb != NULL);
    CHECK_TRUE(cell_after(tb, 7) > 0);
    CHECK_TRUE(cell_is_dash(tb, 9));
    run_free(&r);
    /* -d 2000: each sequence holds 2000 tokens before the measured ones: rows "pp16 @ d2000" and
     * "tg8 @ d2000", the decode row's bytes a token (which count the KV cache read) above mb, the same
     * row's at depth 0 in the first run */
    RUN_OK(&r, "bench", "--model", M, "-p", "16", "-n", "8", "-d", "2000", "-t", "1", "-r", "1", "--membw");
    ASSERT_EQ_INT(r.code, 0);
    const char *dp = row_with(r.out, " pp16 @ d2000 |"), *dt = row_with(r.out, " tg8 @ d2000 |");
    ASSERT_TRUE(dp != NULL && dt != NULL);
    CHECK_TRUE(cell_after(dp, 7) > 0 && cell_after(dt, 7) > 0);
    CHECK_TRUE(cell_after(dt, 9) > mb);
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "-d", "-1");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "-b", "0");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "-b", "65");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "-t", "0");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "-p", "x");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "--model", M, "--nope", "1");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 2, "bench", "-p", "8");
    run_free(&r);
    ASSERT_FAILS_WITH(&r, 1, "bench", "--model", "no/such/file.gguf", "-r", "1");
    run_free(&r);
}

TEST(prompt_longer_than_context_is_refused) {
    ASSERT_TRUE(n_goldens > 0);
    golden *G = primary();
    ASSERT_TRUE(G->n_prompt > 4);
    run_result r;
    ASSERT_FAILS_WITH(&r, 1, "complete", "--model", G->model, "--prompt", G->text, "--ctx", "4");
    ASSERT_TRUE(strstr(r.err, "context") != NULL);
    run_free(&r);
    /* a prompt that fits leaves room for fewer tokens than asked: capped, still succeeds */
    char ctx[16];
    snprintf(ctx, sizeof ctx, "%d", G->n_prompt + 3);
    RUN_OK(&r, "complete", "--model", G->model, "--prompt", G->text, "--ctx", ctx, "-n", "50", "--temperature", "0");
    ASSERT_EQ_INT(r.code, 0);
    ASSERT_TRUE(strstr(r.err, "generated 3 tokens") || strstr(r.err, "stop: end of generation"));
    run_free(&r);
}

int main(void) {
    snprintf(tmp_dir, sizeof tmp_dir, "%s/cm_cli_XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    if (access(binary(), X_OK) != 0) fprintf(stderr, "warning: %s is not executable\n", binary());
    if (load_goldens() == 0) fprintf(stderr, "no golden files with a greedy case under %s\n", test_fixture("golden"));
    RUN(help_version_and_usage_errors);
    RUN(complete_greedy_reproduces_pinned_tokens);
    RUN(int8_outputs_match_across_families);
    RUN(complete_from_file_equals_prompt);
    RUN(complete_sampling_is_repeatable_by_seed);
    RUN(complete_fim_and_special);
    RUN(complete_fim_prompt_is_the_apis);
    RUN(complete_stop_strings);
    RUN(tokenize_matches_golden_and_round_trips);
    RUN(inspect_lists_tensors_and_summary);
    RUN(vocab_only_file);
    RUN(quantize_loads_generates_and_matches_convert);
    RUN(missing_and_truncated_files_fail_cleanly);
    RUN(hostile_files_fail_cleanly);
    RUN(bad_flags_are_usage_errors);
    RUN(prompt_longer_than_context_is_refused);
    RUN(bench_reports_rates_and_bound);
    for (int i = 0; i < n_goldens; i++) free(goldens[i].text);
    char p[400];
    snprintf(p, sizeof p, "%s/stdout", tmp_dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/stderr", tmp_dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/prompt.txt", tmp_dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/trunc.gguf", tmp_dir);
    unlink(p);
    rmdir(tmp_dir);
    return test_summary();
}
