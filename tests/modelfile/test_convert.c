/*
 * test_convert.c - Hugging Face directory -> GGUF against the fixtures written by tools/make_fixtures.py.
 *
 * Proves: (1) converting tests/fixtures/hf/<name>/ gives, tensor for tensor, exactly the bytes of
 * tests/fixtures/models/<base>.gguf (written independently by numpy, llama q/k permutation included),
 * with the same tensor set and the same metadata; for a bf16 source, the bf16 rounding of the f32 model;
 * (2) --type f16/bf16/q8_0 output equals the fixture models of that type bit for bit (so our Q8_0 is
 * numpy's/llama.cpp's reference quantiser); (3) the converted model's logits match the golden logits
 * within the golden tolerance; (4) a tokenizer-only directory gives a vocab-only GGUF that loads;
 * (5) broken directories (bad config values, missing/misshaped/unexpected tensors, unsafe shard names,
 * unsupported dtype/arch/rope scaling) are refused with a message naming the problem; (6) rope scaling
 * (linear, YaRN, llama3) becomes llama.cpp's keys / rope_freqs tensor and the golden logits.
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "gguf.h"
#include "golden.h"
#include "test.h"
#include "util.h"

static char tmp_dir[256];

static const char *tmp(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmp_dir, name);
    return buf[k];
}

static char *fixture_dup(const char *rel) {
    return strdup(test_fixture(rel));
}

/* ------------------------------------------------------------ comparing two GGUF files */

/* Round x through the HF source's dtype (GGUF_TT_F32/F16/BF16): what an F32 output tensor holds. */
static float through(int src, float x) {
    return src == GGUF_TT_F16 ? cm_fp16_to_f32(cm_f32_to_fp16(x)) : src == GGUF_TT_BF16 ? cm_bf16_to_f32(cm_f32_to_bf16(x)) : x;
}

/* Does converted tensor t hold reference tensor r? r is of t's type (bytes equal), or F32 when t is
 * F16/BF16 (t = r rounded), or both F32 with an f16/bf16 HF source (t = r rounded through the source type,
 * as the converter writes norms and biases as F32). */
static int tensor_matches(const gguf_tensor *r, const gguf_tensor *t, int src, char *why, size_t cap) {
    if (r->n_dims != t->n_dims) { snprintf(why, cap, "n_dims %d vs %d", t->n_dims, r->n_dims); return 0; }
    for (int d = 0; d < GGUF_MAX_DIMS; d++)
        if (r->ne[d] != t->ne[d]) { snprintf(why, cap, "ne[%d] %lld vs %lld", d, (long long)t->ne[d], (long long)r->ne[d]); return 0; }
    if (src != GGUF_TT_F32 && r->type == GGUF_TT_F32 && t->type == GGUF_TT_F32) {
        for (uint64_t i = 0; i < r->nbytes / 4; i++) {
            float x, y, want;
            memcpy(&x, (const uint8_t *)r->data + 4 * i, 4);
            memcpy(&y, (const uint8_t *)t->data + 4 * i, 4);
            want = through(src, x);
            if (memcmp(&y, &want, 4)) {
                snprintf(why, cap, "element %llu: %.9g vs %.9g rounded to %s", (unsigned long long)i, y, x, gguf_ttype_name(src));
                return 0;
            }
        }
        return 1;
    }
    if (r->type == t->type) {
        if (r->nbytes != t->nbytes || memcmp(r->data, t->data, t->nbytes)) {
            snprintf(why, cap, "data differs (%s)", gguf_ttype_name(t->type));
            return 0;
        }
        return 1;
    }
    if (r->type != GGUF_TT_F32 || (t->type != GGUF_TT_BF16 && t->type != GGUF_TT_F16)) {
        snprintf(why, cap, "type %s vs %s", gguf_ttype_name(t->type), gguf_ttype_name(r->type));
        return 0;
    }
    uint64_t n = r->nbytes / 4;
    for (uint64_t i = 0; i < n; i++) {
        float x;
        uint16_t h, want;
        memcpy(&x, (const uint8_t *)r->data + 4 * i, 4);
        memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
        want = t->type == GGUF_TT_BF16 ? cm_f32_to_bf16(x) : cm_f32_to_fp16(x);
        if (h != want) { snprintf(why, cap, "element %llu: 0x%04x vs 0x%04x", (unsigned long long)i, h, want); return 0; }
    }
    return 1;
}

/* Raw bytes of a kv value as stored (for arrays: the element bytes after type and count). */
static int kv_equal(const gguf_kv *a, const gguf_kv *b) {
    if (a->type != b->type || a->arr_type != b->arr_type || a->n != b->n) return 0;
    int et = a->type == GGUF_VT_ARRAY ? a->arr_type : a->type;
    if (et == GGUF_VT_STRING) {
        for (uint64_t i = 0; i < a->n; i++) {
            gguf_str x = gguf_arr_str(a, i), y = gguf_arr_str(b, i);
            if (x.len != y.len || memcmp(x.ptr, y.ptr, x.len)) return 0;
        }
        return 1;
    }
    static const int sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return memcmp(a->data, b->data, (size_t)a->n * (size_t)sz[et]) == 0;
}

/* Keys checked separately: the name comes from the directory; file_type from the output type. */
static int kv_skipped(const gguf_kv *kv) {
    return gguf_str_eq(kv->key, "general.name") || gguf_str_eq(kv->key, "general.file_type");
}

/* llama_ftype of an output type: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32. */
static int ftype_of(int tt) {
    return tt == GGUF_TT_F16 ? 1 : tt == GGUF_TT_Q8_0 ? 7 : tt == GGUF_TT_BF16 ? 32 : 0;
}

/* Keys the fixture writer adds that llama.cpp's converter does not (the loader infers them): they may be
 * absent from our output, but must match when present. */
static int kv_optional(const gguf_kv *kv) {
    return gguf_str_eq(kv->key, "tokenizer.ggml.eot_token_id");
}

/* src: the HF source dtype (as a GGUF type); out: the output matrix type (for general.file_type). */
static void compare_gguf(const char *got_path, const char *ref_path, int src, int out) {
    gguf_file got, ref;
    cm_err err = {0};
    if (gguf_open(&got, got_path, &err)) { TEST_FAIL_("%s", err.msg); return; }
    if (gguf_open(&ref, ref_path, &err)) { TEST_FAIL_("%s", err.msg); gguf_close(&got); return; }
    CHECK_TRUE(got.n_tensors == ref.n_tensors);
    char why[160], name[300];
    for (uint64_t i = 0; i < ref.n_tensors; i++) {
        const gguf_tensor *r = &ref.tensors[i];
        snprintf(name, sizeof name, "%.*s", (int)r->name.len, r->name.ptr);
        const gguf_tensor *t = gguf_find_tensor(&got, name);
        if (!t) { TEST_FAIL_("%s: tensor %s missing", got_path, name); continue; }
        if (!tensor_matches(r, t, src, why, sizeof why)) TEST_FAIL_("%s vs %s: tensor %s: %s", got_path, ref_path, name, why);
    }
    for (uint64_t i = 0; i < ref.n_kv; i++) {
        const gguf_kv *r = &ref.kv[i];
        if (kv_skipped(r)) continue;
        snprintf(name, sizeof name, "%.*s", (int)r->key.len, r->key.ptr);
        const gguf_kv *k = gguf_find(&got, name);
        if (!k && kv_optional(r)) {
            if (getenv("TEST_VERBOSE")) fprintf(stderr, "  note: optional key %s absent\n", name);
        } else if (!k) TEST_FAIL_("%s: key %s missing", got_path, name);
        else if (!kv_equal(r, k)) TEST_FAIL_("%s: key %s differs from %s", got_path, name, ref_path);
    }
    uint32_t ft = 99;
    if (gguf_get_u32(&got, "general.file_type", &ft, &err) || (int)ft != ftype_of(out))
        TEST_FAIL_("%s: general.file_type %u, want %d", got_path, ft, ftype_of(out));
    for (uint64_t i = 0; i < got.n_kv; i++) {
        snprintf(name, sizeof name, "%.*s", (int)got.kv[i].key.len, got.kv[i].key.ptr);
        if (!gguf_find(&ref, name) && getenv("TEST_VERBOSE")) fprintf(stderr, "  note: extra key %s\n", name);
    }
    gguf_close(&got);
    gguf_close(&ref);
}

/* ------------------------------------------------------------ golden json */

/* models/<base>.gguf for hf/<name>: "<base>-hf" or "<base>-<type>-hf". */
static int ref_model_for(const char *hf_name, char *out, size_t cap) {
    char base[256];
    snprintf(base, sizeof base, "%s", hf_name);
    size_t n = strlen(base);
    if (n > 3 && !strcmp(base + n - 3, "-hf")) base[n - 3] = 0;
    for (int tries = 0; tries < 2; tries++) {
        char rel[300];
        snprintf(rel, sizeof rel, "models/%s.gguf", base);
        struct stat st;
        if (stat(test_fixture(rel), &st) == 0) { snprintf(out, cap, "%s", test_fixture(rel)); return 1; }
        char *dash = strrchr(base, '-');
        if (!dash) break;
        *dash = 0;
    }
    return 0;
}

/* Logits of the converted model vs golden, every position of every case. */
static void check_logits(const char *gguf_path, json_t *golden) {
    cm_err err = {0};
    cm_model_params mp = {0};
    cm_model *m = cm_model_load(gguf_path, &mp, &err);
    if (!m) { TEST_FAIL_("load %s: %s", gguf_path, err.msg); return; }
    const cm_model_info *info = cm_model_get_info(m);
    double tol = json_number_value(json_object_get(json_object_get(golden, "tolerance"), "max_abs"));
    json_t *cases = json_object_get(golden, "cases"), *c;
    size_t ci;
    json_array_foreach(cases, ci, c) {
        json_t *toks = json_object_get(c, "tokens");
        int n = (int)json_array_size(toks);
        cm_ctx_params cp = {.n_threads = 1, .n_seq_max = 1, .n_ctx = 0, .n_batch_max = n, .kv_tokens = 0};
        cm_ctx *ctx = cm_ctx_create(m, &cp, &err);
        if (!ctx) { TEST_FAIL_("ctx: %s", err.msg); break; }
        int seq = cm_seq_open(ctx, &err);
        int32_t *tk = malloc((size_t)n * sizeof *tk), *sq = malloc((size_t)n * sizeof *sq);
        int8_t *want = malloc((size_t)n);
        for (int i = 0; i < n; i++) {
            tk[i] = (int32_t)json_integer_value(json_array_get(toks, (size_t)i));
            sq[i] = seq;
            want[i] = 1;
        }
        cm_batch b = {.n = n, .token = tk, .seq = sq, .logits = want};
        float *ref = NULL;
        const char *rel = json_string_value(json_object_get(c, "logits"));
        if (seq < 0 || cm_forward(ctx, &b, &err)) TEST_FAIL_("forward: %s", err.msg);
        else if (!rel || !(ref = golden_f32(rel, (size_t)n * (size_t)info->n_vocab)))
            TEST_FAIL_("golden logits %s unreadable or wrong size", rel ? rel : "(none)");
        else {
            double max_diff = 0;
            for (int i = 0; i < n; i++) {
                const float *l = cm_logits(ctx, i);
                if (!l) { TEST_FAIL_("no logits at %d", i); break; }
                double d = golden_max_diff(l, ref + (size_t)i * (size_t)info->n_vocab, (size_t)info->n_vocab);
                if (!(d <= max_diff)) max_diff = d;
            }
            if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %s case %zu: max |diff| %.3g (tol %g)\n", gguf_path, ci, max_diff, tol);
            if (!(max_diff <= tol)) TEST_FAIL_("%s case %zu: max |logit diff| %.3g > %g", gguf_path, ci, max_diff, tol);
        }
        free(ref); free(tk); free(sq); free(want);
        cm_ctx_free(ctx);
    }
    cm_model_free(m);
}

/* ------------------------------------------------------------ tests */

/* Every hf/<name>: default conversion equals models/<base>.gguf. */
TEST(convert_matches_fixture_models) {
    DIR *d = opendir(test_fixture("hf"));
    ASSERT_TRUE(d != NULL);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char rel[300], ref[4096];
        snprintf(rel, sizeof rel, "hf/%s", de->d_name);
        char *dir = fixture_dup(rel);
        if (!ref_model_for(de->d_name, ref, sizeof ref)) { TEST_FAIL_("no reference model for %s", rel); free(dir); continue; }
        cm_err err = {0};
        const char *out = tmp("default.gguf");
        int rc = cm_convert_hf(dir, out, NULL, &err);
        if (rc) { TEST_FAIL_("convert %s: %s", rel, err.msg); free(dir); continue; }
        json_t *g = golden_json(de->d_name);
        const char *type = g ? json_string_value(json_object_get(g, "type")) : NULL;
        int src = !type ? -1 : !strcmp(type, "f32") ? GGUF_TT_F32 : !strcmp(type, "f16") ? GGUF_TT_F16
                : !strcmp(type, "bf16") ? GGUF_TT_BF16 : -1;
        if (src < 0) TEST_FAIL_("golden/%s.json: no usable \"type\"", de->d_name);
        else compare_gguf(out, ref, src, src);
        json_decref(g);
        unlink(out);
        free(dir);
        n++;
    }
    closedir(d);
    ASSERT_TRUE(n >= 2);
}

/* --type f32/f16/bf16/q8_0 of an f32 HF dir equals the fixture model of that type, byte for byte. */
static const char *make_f32_hf(void);

TEST(convert_types_match_fixture_models) {
    static const struct { const char *type, *model; int tt; } v[] = {
        {"f32", "models/qwen2-gqa.gguf", GGUF_TT_F32}, {"f16", "models/qwen2-gqa-f16.gguf", GGUF_TT_F16},
        {"bf16", "models/qwen2-gqa-bf16.gguf", GGUF_TT_BF16}, {"q8_0", "models/qwen2-gqa-q8_0.gguf", GGUF_TT_Q8_0},
    };
    const char *dir = make_f32_hf();
    ASSERT_TRUE(dir != NULL);
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        cm_err err = {0};
        const char *out = tmp("typed.gguf");
        if (cm_convert_hf(dir, out, v[i].type, &err)) { TEST_FAIL_("--type %s: %s", v[i].type, err.msg); continue; }
        char *ref = fixture_dup(v[i].model);
        compare_gguf(out, ref, GGUF_TT_F32, v[i].tt);
        free(ref);
        unlink(out);
    }
    /* no --type: the source type (f32) */
    cm_err err = {0};
    ASSERT_EQ_INT(cm_convert_hf(dir, tmp("typed.gguf"), NULL, &err), CM_OK);
    char *ref = fixture_dup("models/qwen2-gqa.gguf");
    compare_gguf(tmp("typed.gguf"), ref, GGUF_TT_F32, GGUF_TT_F32);
    free(ref);
    unlink(tmp("typed.gguf"));
    ASSERT_EQ_INT(cm_convert_hf(dir, tmp("x.gguf"), "q4_0", &err), CM_E_INVAL);
}

/* The converted models compute the golden logits: every hf/ directory, and they are exactly the
 * GOLDEN_HF entries of golden.h's inventory (none missing, none unlisted). */
TEST(convert_logits_match_golden) {
    DIR *d = opendir(test_fixture("hf"));
    ASSERT_TRUE(d != NULL);
    int n_inv, n_hf = 0, n_dirs = 0;
    const golden_entry *inv = golden_inventory(&n_inv);
    for (int i = 0; i < n_inv; i++) n_hf += inv[i].kind == GOLDEN_HF;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        n_dirs++;
        int listed = 0;
        for (int i = 0; i < n_inv; i++) listed |= inv[i].kind == GOLDEN_HF && !strcmp(inv[i].name, de->d_name);
        if (!listed) TEST_FAIL_("hf/%s is not a GOLDEN_HF entry of tests/golden.h", de->d_name);
        json_t *g = golden_json(de->d_name);
        if (!g) { TEST_FAIL_("no golden/%s.json", de->d_name); continue; }
        char rel[300];
        snprintf(rel, sizeof rel, "hf/%s", de->d_name);
        char *dir = fixture_dup(rel);
        cm_err err = {0};
        const char *out = tmp("logits.gguf");
        if (cm_convert_hf(dir, out, NULL, &err)) TEST_FAIL_("convert %s: %s", rel, err.msg);
        else check_logits(out, g);
        unlink(out);
        free(dir);
        json_decref(g);
    }
    closedir(d);
    ASSERT_EQ_INT(n_dirs, n_hf);
}

static int copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    int ok = a && b;
    char buf[65536];
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof buf, a)) > 0) ok = fwrite(buf, 1, n, b) == n;
    if (a) fclose(a);
    if (b && fclose(b)) ok = 0;
    return ok ? 0 : -1;
}

/* A fixture HF dir whose config.json names arch_class and has no rope_scaling (the plain model the
 * derived directories below are built from); sharded: 1 with an index, 0 without, -1 any.
 * Returns an absolute path (static buffer) or NULL. */
static const char *find_hf_dir(const char *arch_class, int sharded) {
    static char found[1024];
    char *root = fixture_dup("hf");
    DIR *d = opendir(root);
    const char *ret = NULL;
    struct dirent *de;
    while (d && !ret && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s/config.json", root, de->d_name);
        json_error_t je;
        json_t *c = json_load_file(p, 0, &je);
        const char *a = json_string_value(json_array_get(json_object_get(c, "architectures"), 0));
        snprintf(p, sizeof p, "%s/%s/model.safetensors.index.json", root, de->d_name);
        struct stat st;
        int has_index = stat(p, &st) == 0;
        const json_t *rs = json_object_get(c, "rope_scaling");
        if (a && !strcmp(a, arch_class) && (sharded < 0 || sharded == has_index) && (!rs || json_is_null(rs))) {
            snprintf(found, sizeof found, "%s/%s", root, de->d_name);
            ret = found;
        }
        json_decref(c);
    }
    if (d) closedir(d);
    free(root);
    return ret;
}

/* GGUF tensor name -> HF name (qwen2: no permutation, so the f32 fixture model's tensors are HF's). */
static int hf_name_of(const char *g, char *out, size_t cap) {
    static const char *const map[][2] = {
        {"attn_norm.weight", "input_layernorm.weight"}, {"attn_q.weight", "self_attn.q_proj.weight"},
        {"attn_k.weight", "self_attn.k_proj.weight"}, {"attn_v.weight", "self_attn.v_proj.weight"},
        {"attn_q.bias", "self_attn.q_proj.bias"}, {"attn_k.bias", "self_attn.k_proj.bias"},
        {"attn_v.bias", "self_attn.v_proj.bias"}, {"attn_output.weight", "self_attn.o_proj.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"}, {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"}, {"ffn_down.weight", "mlp.down_proj.weight"},
    };
    if (!strcmp(g, "token_embd.weight")) return snprintf(out, cap, "model.embed_tokens.weight"), 1;
    if (!strcmp(g, "output_norm.weight")) return snprintf(out, cap, "model.norm.weight"), 1;
    if (!strcmp(g, "output.weight")) return snprintf(out, cap, "lm_head.weight"), 1;
    int l, n = 0;
    if (sscanf(g, "blk.%d.%n", &l, &n) != 1 || !n) return 0;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(g + n, map[i][0])) return snprintf(out, cap, "model.layers.%d.%s", l, map[i][1]), 1;
    return 0;
}

/* tmp_dir/f32hf: an f32 HF directory made from models/qwen2-gqa.gguf (weights) and the qwen2 fixture HF
 * dir (config and tokenizer of the same model). */
static const char *make_f32_hf(void) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/f32hf", tmp_dir);
    const char *src = find_hf_dir("Qwen2ForCausalLM", 0);
    if (!src) { fprintf(stderr, "no single-file Qwen2 HF fixture\n"); return NULL; }
    mkdir(dir, 0700);
    static const char *const files[] = {"config.json", "tokenizer.json", "tokenizer_config.json"};
    char a[1024], b[1024];
    for (int i = 0; i < 3; i++) {
        snprintf(a, sizeof a, "%s/%s", src, files[i]);
        snprintf(b, sizeof b, "%s/%s", dir, files[i]);
        if (copy_file(a, b)) return NULL;
    }
    gguf_file g;
    cm_err err = {0};
    if (gguf_open(&g, test_fixture("models/qwen2-gqa.gguf"), &err)) { fprintf(stderr, "%s\n", err.msg); return NULL; }
    json_t *hdr = json_object();
    uint64_t off = 0;
    for (uint64_t i = 0; i < g.n_tensors; i++) {
        const gguf_tensor *t = &g.tensors[i];
        char gname[300], hname[300];
        snprintf(gname, sizeof gname, "%.*s", (int)t->name.len, t->name.ptr);
        if (t->type != GGUF_TT_F32 || !hf_name_of(gname, hname, sizeof hname)) { off = UINT64_MAX; break; }
        json_t *shape = t->n_dims == 2 ? json_pack("[II]", (json_int_t)t->ne[1], (json_int_t)t->ne[0])
                                       : json_pack("[I]", (json_int_t)t->ne[0]);
        json_object_set_new(hdr, hname, json_pack("{s:s, s:o, s:[II]}", "dtype", "F32", "shape", shape,
                                                  "data_offsets", (json_int_t)off, (json_int_t)(off + t->nbytes)));
        off += t->nbytes;
    }
    const char *ret = NULL;
    char *text = off == UINT64_MAX ? NULL : json_dumps(hdr, JSON_COMPACT);
    snprintf(b, sizeof b, "%s/model.safetensors", dir);
    FILE *f = text ? fopen(b, "wb") : NULL;
    if (f) {
        uint64_t n = strlen(text);
        int ok = fwrite(&n, 8, 1, f) == 1 && fwrite(text, 1, n, f) == n;
        for (uint64_t i = 0; ok && i < g.n_tensors; i++)
            ok = fwrite(g.tensors[i].data, 1, g.tensors[i].nbytes, f) == g.tensors[i].nbytes;
        if (fclose(f) == 0 && ok) ret = dir;
    }
    free(text);
    json_decref(hdr);
    gguf_close(&g);
    return ret;
}

/* A scratch HF dir: the given fixture dir's files copied into tmp_dir/work/ (removed first). */
static const char *make_work_dir(const char *src_dir) {
    static char work[512];
    snprintf(work, sizeof work, "%s/work", tmp_dir);
    DIR *d = opendir(work);
    if (d) {
        struct dirent *de;
        char p[1024];
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            snprintf(p, sizeof p, "%s/%s", work, de->d_name);
            unlink(p);
        }
        closedir(d);
    } else {
        mkdir(work, 0700);
    }
    char *src = src_dir ? strdup(src_dir) : NULL;
    d = src ? opendir(src) : NULL;
    if (d) {
        struct dirent *de;
        char a[1024], b[1024];
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            snprintf(a, sizeof a, "%s/%s", src, de->d_name);
            snprintf(b, sizeof b, "%s/%s", work, de->d_name);
            copy_file(a, b);
        }
        closedir(d);
    }
    free(src);
    return work;
}

TEST(convert_vocab_only) {
    const char *work = make_work_dir(make_f32_hf());
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", work); unlink(p);
    snprintf(p, sizeof p, "%s/model.safetensors", work); unlink(p);
    cm_err err = {0};
    const char *out = tmp("vocab.gguf");
    int rc = cm_convert_hf(work, out, NULL, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    ASSERT_EQ_INT(rc, CM_OK);
    gguf_file g;
    ASSERT_EQ_INT(gguf_open(&g, out, &err), CM_OK);
    gguf_str s;
    CHECK_TRUE(gguf_get_str(&g, "general.architecture", &s, &err) == CM_OK && gguf_str_eq(s, "none"));
    CHECK_TRUE(g.n_tensors == 0);
    const gguf_kv *kv = gguf_find(&g, "tokenizer.ggml.tokens");
    CHECK_TRUE(kv && kv->n == 300);
    gguf_close(&g);
    cm_model_params mp = {.vocab_only = 1};
    cm_model *m = cm_model_load(out, &mp, &err);
    if (!m) TEST_FAIL_("vocab-only load: %s", err.msg);
    else {
        int32_t ids[16];
        int n = cm_tokenize(m, "name", 4, 0, ids, 16, &err);
        CHECK_TRUE(n == 1 && ids[0] == 280); /* golden: "name" -> [280] */
        cm_model_free(m);
    }
    mp.vocab_only = 0;
    m = cm_model_load(out, &mp, &err);
    CHECK_TRUE(m == NULL);
    cm_model_free(m);
    unlink(out);
    /* nothing convertible at all */
    snprintf(p, sizeof p, "%s/tokenizer.json", work); unlink(p);
    ASSERT_EQ_INT(cm_convert_hf(work, out, NULL, &err), CM_E_IO);
    ASSERT_EQ_INT(cm_convert_hf("/nonexistent/dir", out, NULL, &err), CM_E_IO);
}

/* Edit config.json (or index) of a scratch copy and expect rc with msg containing `needle`. */
static void edit_json(const char *path, const char *key, json_t *val) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return;
    if (val) json_object_set_new(root, key, val);
    else json_object_del(root, key);
    json_dump_file(root, path, JSON_INDENT(1));
    json_decref(root);
}

static void expect_fail(const char *work, int want_rc, const char *needle, const char *what) {
    cm_err err = {0};
    int rc = cm_convert_hf(work, tmp("bad.gguf"), NULL, &err);
    if (rc != want_rc || !strstr(err.msg, needle))
        TEST_FAIL_("%s: rc %d (want %d) msg '%s' (want '%s')", what, rc, want_rc, err.msg, needle);
    else if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %-22s -> %s\n", what, err.msg);
    struct stat st;
    if (stat(tmp("bad.gguf"), &st) == 0) TEST_FAIL_("%s: output written despite error", what);
}

/* A scratch copy of src_dir whose config.json has key set to json (NULL: removed) must fail with rc and a
 * message containing needle. */
static void expect_config_fails(const char *src_dir, const char *key, const char *json, int rc, const char *needle) {
    const char *work = make_work_dir(src_dir);
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", work);
    json_error_t je;
    edit_json(p, key, json ? json_loads(json, JSON_DECODE_ANY, &je) : NULL);
    char what[128];
    snprintf(what, sizeof what, "%s=%s", key, json ? json : "(absent)");
    expect_fail(work, rc, needle, what);
}

TEST(convert_rejects_bad_config) {
    static const struct { const char *key; const char *json; int rc; const char *needle; } cases[] = {
        {"hidden_size", NULL, CM_E_FORMAT, "hidden_size"},
        {"hidden_size", "0", CM_E_FORMAT, "hidden_size"},
        {"hidden_size", "\"64\"", CM_E_FORMAT, "hidden_size"},
        {"num_attention_heads", "3", CM_E_FORMAT, "not divisible"},
        {"num_key_value_heads", "3", CM_E_FORMAT, "num_key_value_heads"},
        {"num_key_value_heads", "8", CM_E_FORMAT, "num_key_value_heads"},
        {"num_hidden_layers", "3", CM_E_FORMAT, "missing tensor 'model.layers.2."},
        {"num_hidden_layers", "1", CM_E_UNSUPPORTED, "unexpected tensor 'model.layers.1."},
        {"vocab_size", "301", CM_E_FORMAT, "model.embed_tokens.weight': shape [300, 64], expected [301, 64]"},
        {"intermediate_size", "96", CM_E_FORMAT, "shape"},
        {"rms_norm_eps", "-1", CM_E_FORMAT, "rms_norm_eps"},
        {"rope_theta", "\"x\"", CM_E_FORMAT, "rope_theta"},
        {"rope_scaling", "{\"type\": \"dynamic\", \"factor\": 2}", CM_E_UNSUPPORTED, "rope_scaling \"dynamic\""},
        {"rope_scaling", "{\"type\": \"linear\"}", CM_E_FORMAT, "factor"},
        {"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8}", CM_E_FORMAT, "needs \"low_freq_factor\""},
        {"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 4, \"high_freq_factor\": 1, "
                         "\"original_max_position_embeddings\": 8192}", CM_E_FORMAT, "above low_freq_factor"},
        {"rope_scaling", "{\"rope_type\": \"longrope\", \"factor\": 8}", CM_E_UNSUPPORTED, "rope_scaling \"longrope\""},
        {"rope_scaling", "{\"type\": \"linear\", \"factor\": 0.5}", CM_E_FORMAT, "\"factor\" = 0.5 not in [1, 1024]"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4096}", CM_E_FORMAT, "factor"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": \"4\"}", CM_E_FORMAT, "factor"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": 0}", CM_E_FORMAT,
         "original_max_position_embeddings"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4, \"attention_factor\": -1}", CM_E_FORMAT, "attention_factor"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 4, \"beta_fast\": 1, \"beta_slow\": 2}", CM_E_FORMAT,
         "beta_fast 1 must exceed beta_slow 2"},
        {"rope_scaling", "{\"type\": \"yarn\", \"factor\": 40, \"mscale\": 0.707, \"mscale_all_dim\": 0.707}",
         CM_E_UNSUPPORTED, "rope_scaling \"mscale\" is not supported"},
        {"rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4, \"truncate\": false}", CM_E_UNSUPPORTED, "truncate"},
        {"rope_scaling", "\"linear\"", CM_E_UNSUPPORTED, "rope_scaling \"?\""},
        {"architectures", "[\"MistralForCausalLM\"]", CM_E_UNSUPPORTED, "MistralForCausalLM"},
        {"tie_word_embeddings", "false", CM_E_FORMAT, "lm_head.weight"},
        {"head_dim", "15", CM_E_FORMAT, "head_dim"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_config_fails(make_f32_hf(), cases[i].key, cases[i].json, cases[i].rc, cases[i].needle);
    const char *work = make_work_dir(make_f32_hf());
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", work);
    FILE *f = fopen(p, "w");
    fputs("{\"architectures\": [\"Qwen2ForCausalLM\"], ", f);
    fclose(f);
    expect_fail(work, CM_E_FORMAT, "config.json", "truncated config.json");
}

/* Qwen3-MoE: --type q8_0 equals the Q8_0 fixture byte for byte (routers stay F32, the stacked experts
 * are converted row by row from the per-expert views); configs that would convert into another model
 * are refused. (The F32 conversion and its logits are checked with every hf/ directory above.) */
TEST(convert_qwen3moe) {
    const char *src = find_hf_dir("Qwen3MoeForCausalLM", 0);
    ASSERT_TRUE(src != NULL);
    cm_err err = {0};
    ASSERT_EQ_INT(cm_convert_hf(src, tmp("moe.gguf"), "q8_0", &err), CM_OK);
    char *ref = fixture_dup("models/qwen3moe-q8_0.gguf");
    compare_gguf(tmp("moe.gguf"), ref, GGUF_TT_F32, GGUF_TT_Q8_0);
    free(ref);
    gguf_file g;
    ASSERT_EQ_INT(gguf_open(&g, tmp("moe.gguf"), &err), CM_OK);
    CHECK_TRUE(gguf_find_tensor(&g, "blk.1.ffn_gate_inp.weight")->type == GGUF_TT_F32);
    CHECK_TRUE(gguf_find_tensor(&g, "blk.1.ffn_down_exps.weight")->type == GGUF_TT_Q8_0);
    gguf_close(&g);
    unlink(tmp("moe.gguf"));
    static const struct { const char *key, *json; int rc; const char *needle; } cases[] = {
        {"norm_topk_prob", "false", CM_E_UNSUPPORTED, "norm_topk_prob must be true"},
        {"norm_topk_prob", NULL, CM_E_UNSUPPORTED, "norm_topk_prob must be true"},
        {"mlp_only_layers", "[1]", CM_E_UNSUPPORTED, "dense layers"},
        {"decoder_sparse_step", "2", CM_E_UNSUPPORTED, "dense layers"},
        {"num_experts_per_tok", "9", CM_E_FORMAT, "num_experts_per_tok"},
        {"num_experts", "7", CM_E_UNSUPPORTED, "unexpected tensor 'model.layers.0.mlp.experts.7."},
        {"num_experts", "9", CM_E_FORMAT, "'model.layers.0.mlp.gate.weight': shape [8, 32], expected [9, 32]"},
        {"moe_intermediate_size", "16", CM_E_FORMAT, "experts.0.gate_proj.weight': shape [32, 32], expected [16, 32]"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_config_fails(src, cases[i].key, cases[i].json, cases[i].rc, cases[i].needle);
}

/* Linear and YaRN rope scaling are carried into the GGUF as llama.cpp writes them; HF's attention_factor
 * (the whole cos/sin multiplier) becomes llama.cpp's attn_factor (a multiplier on top of 0.1 ln f + 1). */
TEST(convert_rope_scaling_metadata) {
    /* automatic, not static: the attn_factor entry calls log(), which is no constant expression */
    const struct { const char *json, *type; float factor; int orig; float attn, fast, slow; } v[] = {
        {"{\"type\": \"linear\", \"factor\": 4.0}", "linear", 4.0f, 0, 0, 0, 0},
        {"{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}", "yarn", 4.0f, 32768, 0, 0, 0},
        {"{\"type\": \"yarn\", \"factor\": 8.0, \"attention_factor\": 1.2, \"beta_fast\": 16, \"beta_slow\": 2}", "yarn", 8.0f, 0,
         (float)(1.2 / (0.1 * log(8.0) + 1.0)), 16, 2},
        {"{\"rope_type\": \"default\"}", NULL, 0, 0, 0, 0, 0},
        {"null", NULL, 0, 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        const char *work = make_work_dir(make_f32_hf());
        char p[1024];
        snprintf(p, sizeof p, "%s/config.json", work);
        json_error_t je;
        edit_json(p, "rope_scaling", json_loads(v[i].json, JSON_DECODE_ANY, &je));
        cm_err err = {0};
        const char *out = tmp("rope.gguf");
        if (cm_convert_hf(work, out, NULL, &err)) { TEST_FAIL_("%s: %s", v[i].json, err.msg); continue; }
        gguf_file g;
        if (gguf_open(&g, out, &err)) { TEST_FAIL_("%s", err.msg); continue; }
        gguf_str st;
        float f = 0;
        uint32_t u = 0;
        int rc = gguf_get_str(&g, "qwen2.rope.scaling.type", &st, &err);
        if (!v[i].type) CHECK_TRUE(rc == 1);
        else {
            CHECK_TRUE(rc == CM_OK && gguf_str_eq(st, v[i].type));
            CHECK_TRUE(gguf_get_f32(&g, "qwen2.rope.scaling.factor", &f, &err) == CM_OK && f == v[i].factor);
            rc = gguf_get_u32(&g, "qwen2.rope.scaling.original_context_length", &u, &err);
            CHECK_TRUE(v[i].orig ? rc == CM_OK && u == (uint32_t)v[i].orig : rc == 1);
            static const char *const fk[] = {"qwen2.rope.scaling.attn_factor", "qwen2.rope.scaling.yarn_beta_fast",
                                             "qwen2.rope.scaling.yarn_beta_slow"};
            const float want[] = {v[i].attn, v[i].fast, v[i].slow};
            for (int k = 0; k < 3; k++) {
                f = 0;
                rc = gguf_get_f32(&g, fk[k], &f, &err);
                if (want[k] ? rc != CM_OK || fabsf(f - want[k]) > 1e-6f : rc != 1)
                    TEST_FAIL_("%s: %s = %g (rc %d), want %g", v[i].json, fk[k], (double)f, rc, (double)want[k]);
            }
            /* and the loader takes what was written */
            cm_model *m = cm_model_load(out, NULL, &err);
            if (!m) TEST_FAIL_("%s: load: %s", v[i].json, err.msg);
            else CHECK_TRUE(cm_model_get_info(m)->rope_scaling ==
                            (!strcmp(v[i].type, "linear") ? CM_ROPE_SCALING_LINEAR : CM_ROPE_SCALING_YARN));
            cm_model_free(m);
        }
        gguf_close(&g);
        unlink(out);
    }
}

/* The rope-scaled HF fixtures (DeepSeek-Coder-style linear 4, Qwen2.5-style YaRN with cases past the
 * original length, Llama 3.1-style "llama3") convert to models that compute their golden logits. convert_logits_match_golden walks
 * every hf/ directory too; this names them so that losing them fails. */
TEST(convert_rope_scaling_fixtures) {
    static const struct { const char *name; int kind; float factor; int freqs; } v[] = {
        {"llama-linear-hf", CM_ROPE_SCALING_LINEAR, 4, 0}, {"qwen2-yarn-hf", CM_ROPE_SCALING_YARN, 4, 0},
        {"llama-freqs-hf", CM_ROPE_SCALING_NONE, 1, 1}, /* Llama 3.1's "llama3": a rope_freqs tensor */
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        char rel[300];
        snprintf(rel, sizeof rel, "hf/%s", v[i].name);
        char *dir = fixture_dup(rel);
        json_t *g = golden_json(v[i].name);
        cm_err err = {0};
        const char *out = tmp("rope_fixture.gguf");
        if (!g) TEST_FAIL_("no golden/%s.json", v[i].name);
        else if (cm_convert_hf(dir, out, NULL, &err)) TEST_FAIL_("convert %s: %s", rel, err.msg);
        else {
            cm_model *m = cm_model_load(out, NULL, &err);
            const cm_model_info *in = m ? cm_model_get_info(m) : NULL;
            CHECK_TRUE(in && in->rope_scaling == v[i].kind && in->rope_factor == v[i].factor && in->rope_freqs == v[i].freqs);
            cm_model_free(m);
            check_logits(out, g);
        }
        unlink(out);
        json_decref(g);
        free(dir);
    }
}

TEST(convert_rejects_bad_shards) {
    /* shard names escaping the directory */
    const char *work = make_work_dir(find_hf_dir("LlamaForCausalLM", 1));
    char p[1024];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", work);
    json_error_t je;
    json_t *root = json_load_file(p, 0, &je);
    ASSERT_TRUE(root != NULL);
    json_t *wm = json_object_get(root, "weight_map");
    json_object_set_new(wm, "model.norm.weight", json_string("../model-00001-of-00002.safetensors"));
    json_dump_file(root, p, 0);
    expect_fail(work, CM_E_FORMAT, "not a plain file name", "shard ../");
    /* index names a shard that lacks the tensor */
    json_object_set_new(wm, "model.norm.weight", json_string("model-00001-of-00002.safetensors"));
    const char *other = "model-00002-of-00002.safetensors";
    json_t *cur = json_object_get(wm, "model.embed_tokens.weight");
    if (cur && !strcmp(json_string_value(cur), other)) other = "model-00001-of-00002.safetensors";
    json_object_set_new(wm, "model.embed_tokens.weight", json_string(other));
    json_dump_file(root, p, 0);
    expect_fail(work, CM_E_FORMAT, "does not hold it", "index points elsewhere");
    /* a shard that does not exist */
    json_object_set_new(wm, "model.embed_tokens.weight", json_string("model-00009-of-00009.safetensors"));
    json_dump_file(root, p, 0);
    expect_fail(work, CM_E_IO, "model-00009-of-00009.safetensors", "missing shard");
    json_decref(root);
    /* no weights at all */
    work = make_work_dir(make_f32_hf());
    snprintf(p, sizeof p, "%s/model.safetensors", work);
    unlink(p);
    expect_fail(work, CM_E_IO, "neither model.safetensors", "no weights");
    /* a corrupt safetensors file: header length beyond the file */
    FILE *f = fopen(p, "wb");
    uint64_t n = 1000;
    fwrite(&n, 8, 1, f);
    fputs("{}", f);
    fclose(f);
    expect_fail(work, CM_E_FORMAT, "header length", "corrupt safetensors");
}

/* A safetensors file with one tensor replaced: wrong dtype, an extra tensor. Written by hand. */
static void write_st(const char *path, const char *header, size_t data_len) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(header);
    fwrite(&n, 8, 1, f);
    fputs(header, f);
    for (size_t i = 0; i < data_len; i++) fputc(0, f);
    fclose(f);
}

TEST(convert_rejects_bad_tensors) {
    /* A minimal 1-layer llama built by hand, D=32 H=2 E=16 F=32 V=8, tied; then broken variants. */
    const char *work = make_work_dir(make_f32_hf());
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", work);
    FILE *f = fopen(p, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 32, \"num_hidden_layers\": 1,"
          " \"intermediate_size\": 32, \"num_attention_heads\": 2, \"vocab_size\": 300, \"rms_norm_eps\": 1e-5,"
          " \"tie_word_embeddings\": true}", f);
    fclose(f);
    snprintf(p, sizeof p, "%s/model.safetensors", work);
    char hdr[4096];
    size_t off = 0;
    int len = 0;
    /* name, rows, cols (0 = vector) */
    static const struct { const char *n; int r, c; } t[] = {
        {"model.embed_tokens.weight", 300, 32}, {"model.norm.weight", 32, 0},
        {"model.layers.0.input_layernorm.weight", 32, 0}, {"model.layers.0.post_attention_layernorm.weight", 32, 0},
        {"model.layers.0.self_attn.q_proj.weight", 32, 32}, {"model.layers.0.self_attn.k_proj.weight", 32, 32},
        {"model.layers.0.self_attn.v_proj.weight", 32, 32}, {"model.layers.0.self_attn.o_proj.weight", 32, 32},
        {"model.layers.0.mlp.gate_proj.weight", 32, 32}, {"model.layers.0.mlp.up_proj.weight", 32, 32},
        {"model.layers.0.mlp.down_proj.weight", 32, 32},
    };
    for (int variant = 0; variant < 4; variant++) {
        len = snprintf(hdr, sizeof hdr, "{");
        off = 0;
        for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
            size_t nb = (size_t)t[i].r * (size_t)(t[i].c ? t[i].c : 1) * 4;
            const char *dtype = variant == 1 && i == 4 ? "I32" : "F32";
            if (t[i].c)
                len += snprintf(hdr + len, sizeof hdr - (size_t)len, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [%d, %d], \"data_offsets\": [%zu, %zu]}",
                                i ? ", " : "", t[i].n, dtype, t[i].r, t[i].c, off, off + nb);
            else
                len += snprintf(hdr + len, sizeof hdr - (size_t)len, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [%d], \"data_offsets\": [%zu, %zu]}",
                                i ? ", " : "", t[i].n, dtype, t[i].r, off, off + nb);
            off += nb;
        }
        if (variant == 2)
            len += snprintf(hdr + len, sizeof hdr - (size_t)len, ", \"model.layers.0.mlp.extra.weight\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [%zu, %zu]}", off, off + 4), off += 4;
        if (variant == 3)
            len += snprintf(hdr + len, sizeof hdr - (size_t)len, ", \"model.rotary_emb.inv_freq\": {\"dtype\": \"F32\", \"shape\": [8], \"data_offsets\": [%zu, %zu]}", off, off + 32), off += 32;
        snprintf(hdr + len, sizeof hdr - (size_t)len, "}");
        write_st(p, hdr, off);
        cm_err err = {0};
        int rc = cm_convert_hf(work, tmp("hand.gguf"), variant == 0 ? "q8_0" : NULL, &err);
        if (variant == 0 || variant == 3) {
            if (rc) TEST_FAIL_("variant %d: %s", variant, err.msg);
            else {
                gguf_file g;
                CHECK_TRUE(gguf_open(&g, tmp("hand.gguf"), &err) == CM_OK);
                const gguf_tensor *x = gguf_find_tensor(&g, "blk.0.attn_q.weight");
                CHECK_TRUE(x && x->type == (variant == 0 ? GGUF_TT_Q8_0 : GGUF_TT_F32));
                x = gguf_find_tensor(&g, "blk.0.attn_norm.weight");
                CHECK_TRUE(x && x->type == GGUF_TT_F32);
                CHECK_TRUE(gguf_find_tensor(&g, "output.weight") == NULL);
                CHECK_TRUE(g.n_tensors == 11);
                gguf_close(&g);
            }
            unlink(tmp("hand.gguf"));
        } else if (variant == 1) {
            CHECK_TRUE(rc == CM_E_UNSUPPORTED && strstr(err.msg, "dtype I32"));
        } else {
            CHECK_TRUE(rc == CM_E_UNSUPPORTED && strstr(err.msg, "unexpected tensor 'model.layers.0.mlp.extra.weight'"));
        }
    }
}

/* Runs $CM_BINARY with args (stdout/stderr to /dev/null); returns its exit status or -1. */
static int run_binary(const char *const *args) {
    const char *bin = getenv("CM_BINARY");
    if (!bin) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        const char *argv[16];
        int n = 0;
        argv[n++] = bin;
        for (int i = 0; args[i] && n < 15; i++) argv[n++] = args[i];
        argv[n] = NULL;
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); }
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) return -1;
    return WEXITSTATUS(st);
}

/* `codemoe convert`: exit codes 0 / 1 (conversion error) / 2 (usage), and the file it writes. */
TEST(convert_cli) {
    if (!getenv("CM_BINARY")) { TEST_FAIL_("CM_BINARY not set (run through meson test)"); return; }
    const char *dir = make_f32_hf();
    ASSERT_TRUE(dir != NULL);
    const char *out = tmp("cli.gguf");
    const char *ok[] = {"convert", dir, out, "--type", "q8_0", NULL};
    ASSERT_EQ_INT(run_binary(ok), 0);
    char *ref = fixture_dup("models/qwen2-gqa-q8_0.gguf");
    compare_gguf(out, ref, GGUF_TT_F32, GGUF_TT_Q8_0);
    free(ref);
    unlink(out);
    const char *bad_type[] = {"convert", dir, out, "--type", "q4_0", NULL};
    ASSERT_EQ_INT(run_binary(bad_type), 2);
    const char *no_args[] = {"convert", NULL};
    ASSERT_EQ_INT(run_binary(no_args), 2);
    const char *missing[] = {"convert", "/nonexistent/hf", out, NULL};
    ASSERT_EQ_INT(run_binary(missing), 1);
    struct stat st;
    ASSERT_TRUE(stat(out, &st) != 0);
}

static void rm_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    char p[1024];
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        struct stat st;
        if (stat(p, &st) == 0 && S_ISDIR(st.st_mode)) rm_tree(p);
        else unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

int main(void) {
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/cm_test_convert_%d", (int)getpid());
    if (mkdir(tmp_dir, 0700) != 0) { perror(tmp_dir); return 1; }
    RUN(convert_matches_fixture_models);
    RUN(convert_types_match_fixture_models);
    RUN(convert_logits_match_golden);
    RUN(convert_vocab_only);
    RUN(convert_rejects_bad_config);
    RUN(convert_qwen3moe);
    RUN(convert_rope_scaling_metadata);
    RUN(convert_rope_scaling_fixtures);
    RUN(convert_rejects_bad_shards);
    RUN(convert_rejects_bad_tensors);
    RUN(convert_cli);
    rm_tree(tmp_dir);
    return test_summary();
}
