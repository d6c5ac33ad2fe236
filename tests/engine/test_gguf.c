/*
 * test_gguf.c - the GGUF reader, and the writer as the reader sees it (tests/modelfile/test_gguf_writer.c
 * has the writer's own input checks).
 *
 * Proves: (1) what the writer writes, the reader reads back bit-exactly (every value type, arrays,
 * tensors of every type, f32 -> f16/bf16/q8_0 conversion equal to independent reference conversions);
 * (2) the reader rejects every hostile header we can think of with CM_E_FORMAT or CM_E_UNSUPPORTED and a
 * message, without touching memory outside the buffer (buffers are exact-size heap blocks, so ASan
 * sees any overread): truncation at every byte, huge counts, bad lengths/types/dims/offsets, etc.;
 * (3) the hand-made files in tests/fixtures/bad/ are all rejected; (4) typed getters range-check;
 * (5) cm_model_foreach renders values and tensors.
 */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf_writer.h"
#include "gguf.h"
#include "model.h"
#include "test.h"
#include "util.h"

/* ------------------------------------------------------------ a byte builder for hand-made files */

typedef struct buf {
    uint8_t *p;
    size_t len, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}
static void u8_(buf *b, uint8_t v) { put(b, &v, 1); }
static void u32_(buf *b, uint32_t v) { put(b, &v, 4); }
static void u64_(buf *b, uint64_t v) { put(b, &v, 8); }
static void str_(buf *b, const char *s) { u64_(b, strlen(s)); put(b, s, strlen(s)); }
static void hdr(buf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    put(b, "GGUF", 4); u32_(b, version); u64_(b, n_tensors); u64_(b, n_kv);
}
static void pad_to(buf *b, size_t align) { while (b->len % align) u8_(b, 0); }
/* Tensor info: name, dims, type, offset. */
static void tinfo(buf *b, const char *name, int nd, const uint64_t *ne, uint32_t type, uint64_t off) {
    str_(b, name); u32_(b, (uint32_t)nd);
    for (int i = 0; i < nd; i++) u64_(b, ne[i]);
    u32_(b, type); u64_(b, off);
}

/* Opens an exact-size heap copy (so any overread is an ASan report). */
static int open_copy(const uint8_t *p, size_t n, cm_err *err) {
    uint8_t *c = malloc(n ? n : 1);
    memcpy(c, p, n);
    gguf_file g;
    int rc = gguf_open_mem(&g, c, n, err);
    if (rc == CM_OK) gguf_close(&g);
    free(c);
    return rc;
}

#define EXPECT_REJECT(b, what) do { cm_err e_ = {0}; int rc_ = open_copy((b)->p, (b)->len, &e_); \
    if (!(rc_ == CM_E_FORMAT || rc_ == CM_E_UNSUPPORTED) || strncmp(e_.msg, "gguf: ", 6)) \
        TEST_FAIL_("%s: rc %d msg '%s'", what, rc_, e_.msg); \
    else if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %-28s -> %s\n", what, e_.msg); \
    free((b)->p); memset((b), 0, sizeof *(b)); } while (0)

static char tmp_path[256];
static const char *tmpfile_path(const char *tag) {
    snprintf(tmp_path, sizeof tmp_path, "/tmp/cm_test_gguf_%d_%s.gguf", (int)getpid(), tag);
    return tmp_path;
}

/* ------------------------------------------------------------ reference conversions (independent) */

/* Q8_0 as ggml's quantize_row_q8_0_ref writes it, spelled out separately from gguf_writer.c. */
static void ref_q8_0(const float *x, int n, uint8_t *out) {
    for (int b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) if (fabsf(x[b * 32 + i]) > amax) amax = fabsf(x[b * 32 + i]);
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t hd = cm_f32_to_fp16(d);
        memcpy(out + b * 34, &hd, 2);
        for (int i = 0; i < 32; i++) {
            float v = x[b * 32 + i] * id;
            int q = (int)(v < 0 ? -floorf(-v + 0.5f) : floorf(v + 0.5f)); /* round half away from zero */
            out[b * 34 + 2 + i] = (uint8_t)(int8_t)q;
        }
    }
}

static float lcg_f(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f - 0.5f) * 4.0f;
}

/* ------------------------------------------------------------ writer -> reader round trip */

#define RT_ROWS 3
#define RT_COLS 64

static float rt_data[RT_ROWS * RT_COLS];

static const char *write_roundtrip(void) {
    uint32_t s = 1;
    for (int i = 0; i < RT_ROWS * RT_COLS; i++) rt_data[i] = lcg_f(&s);
    rt_data[5] = 0; rt_data[64] = 1e-8f; /* a zero block boundary and a tiny value */
    for (int i = 96; i < 128; i++) rt_data[i] = 0; /* an all-zero Q8_0 block: d = 0 */
    cm_err err = {0};
    gguf_writer *w = gguf_writer_create(&err);
    if (!w) return NULL;
    const char *strs[] = {"a", "", "hello world", "\xe4\xbd\xa0"};
    int32_t ints[] = {-1, 0, 7, INT32_MAX};
    float fl[] = {0.5f, -2.0f};
    int bad = 0;
    bad |= gguf_writer_set_str(w, "general.architecture", "qwen2");
    bad |= gguf_writer_set_u32(w, "qwen2.block_count", 3);
    bad |= gguf_writer_set_i32(w, "test.i32", -5);
    bad |= gguf_writer_set_f32(w, "test.f32", 1e-6f);
    bad |= gguf_writer_set_bool(w, "test.bool", 1);
    bad |= gguf_writer_set_arr_str(w, "test.arr_str", strs, 4);
    bad |= gguf_writer_set_arr_i32(w, "test.arr_i32", ints, 4);
    bad |= gguf_writer_set_arr_f32(w, "test.arr_f32", fl, 2);
    bad |= gguf_writer_set_arr_str(w, "test.empty", strs, 0);
    bad |= gguf_writer_set_u32(w, "test.replaced", 1);
    bad |= gguf_writer_set_u32(w, "test.replaced", 2); /* same key again: replaces */
    int64_t ne[2] = {RT_COLS, RT_ROWS}, ne1[1] = {RT_COLS};
    uint16_t h16[RT_COLS];
    for (int i = 0; i < RT_COLS; i++) h16[i] = cm_f32_to_fp16(rt_data[i]);
    bad |= gguf_writer_add_tensor(w, "t.f32", GGUF_TT_F32, 2, ne, GGUF_TT_F32, rt_data, &err);
    bad |= gguf_writer_add_tensor(w, "t.f16", GGUF_TT_F16, 2, ne, GGUF_TT_F32, rt_data, &err);
    bad |= gguf_writer_add_tensor(w, "t.bf16", GGUF_TT_BF16, 2, ne, GGUF_TT_F32, rt_data, &err);
    bad |= gguf_writer_add_tensor(w, "t.q8_0", GGUF_TT_Q8_0, 2, ne, GGUF_TT_F32, rt_data, &err);
    bad |= gguf_writer_add_tensor(w, "t.vec", GGUF_TT_F16, 1, ne1, GGUF_TT_F16, h16, &err);
    bad |= gguf_writer_add_tensor_ref(w, "t.q8_from_f16", GGUF_TT_Q8_0, 1, ne1, GGUF_TT_F16, h16, &err);
    const char *path = tmpfile_path("rt");
    if (!bad) bad = gguf_writer_write(w, path, &err);
    gguf_writer_free(w);
    if (bad) { fprintf(stderr, "writer: %s\n", err.msg); return NULL; }
    return path;
}

TEST(gguf_writer_reader_roundtrip) {
    const char *path = write_roundtrip();
    ASSERT_TRUE(path != NULL);
    gguf_file g;
    cm_err err = {0};
    int rc = gguf_open(&g, path, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    ASSERT_EQ_INT(rc, CM_OK);
    ASSERT_EQ_INT(g.version, 3);
    ASSERT_EQ_INT(g.n_kv, 10);
    ASSERT_EQ_INT(g.n_tensors, 6);
    gguf_str s;
    ASSERT_EQ_INT(gguf_get_str(&g, "general.architecture", &s, &err), CM_OK);
    ASSERT_TRUE(gguf_str_eq(s, "qwen2"));
    uint32_t u = 0; int32_t i = 0; float f = 0; int bl = 0;
    ASSERT_EQ_INT(gguf_get_u32(&g, "qwen2.block_count", &u, &err), CM_OK); ASSERT_EQ_INT(u, 3);
    ASSERT_EQ_INT(gguf_get_i32(&g, "test.i32", &i, &err), CM_OK); ASSERT_EQ_INT(i, -5);
    ASSERT_EQ_INT(gguf_get_f32(&g, "test.f32", &f, &err), CM_OK); ASSERT_TRUE(f == 1e-6f);
    ASSERT_EQ_INT(gguf_get_bool(&g, "test.bool", &bl, &err), CM_OK); ASSERT_EQ_INT(bl, 1);
    ASSERT_EQ_INT(gguf_get_u32(&g, "test.replaced", &u, &err), CM_OK); ASSERT_EQ_INT(u, 2);
    ASSERT_EQ_INT(gguf_get_u32(&g, "absent.key", &u, &err), 1);
    const gguf_kv *kv = gguf_find(&g, "test.arr_str");
    ASSERT_TRUE(kv && kv->type == GGUF_VT_ARRAY && kv->arr_type == GGUF_VT_STRING && kv->n == 4);
    ASSERT_TRUE(gguf_str_eq(gguf_arr_str(kv, 0), "a"));
    ASSERT_TRUE(gguf_str_eq(gguf_arr_str(kv, 1), ""));
    ASSERT_TRUE(gguf_str_eq(gguf_arr_str(kv, 2), "hello world"));
    ASSERT_TRUE(gguf_str_eq(gguf_arr_str(kv, 3), "\xe4\xbd\xa0"));
    ASSERT_EQ_INT(gguf_arr_str(kv, 4).len, 0); /* out of range: empty */
    kv = gguf_find(&g, "test.arr_i32");
    ASSERT_TRUE(kv && kv->arr_type == GGUF_VT_INT32 && kv->n == 4);
    ASSERT_EQ_INT(gguf_arr_int(kv, 0), -1); ASSERT_EQ_INT(gguf_arr_int(kv, 3), INT32_MAX);
    kv = gguf_find(&g, "test.arr_f32");
    ASSERT_TRUE(kv && kv->n == 2 && gguf_arr_float(kv, 1) == -2.0);
    kv = gguf_find(&g, "test.empty");
    ASSERT_TRUE(kv && kv->n == 0);

    const gguf_tensor *t = gguf_find_tensor(&g, "t.f32");
    ASSERT_TRUE(t && t->type == GGUF_TT_F32 && t->n_dims == 2 && t->ne[0] == RT_COLS && t->ne[1] == RT_ROWS);
    ASSERT_TRUE(t->ne[2] == 1 && t->ne[3] == 1 && t->nbytes == sizeof rt_data);
    ASSERT_TRUE(memcmp(t->data, rt_data, sizeof rt_data) == 0);
    ASSERT_EQ_INT(((const uint8_t *)t->data - g.map) % 32, 0);
    t = gguf_find_tensor(&g, "t.f16");
    ASSERT_TRUE(t && t->type == GGUF_TT_F16 && t->nbytes == RT_ROWS * RT_COLS * 2);
    for (int k = 0; k < RT_ROWS * RT_COLS; k++) {
        uint16_t h; memcpy(&h, (const uint8_t *)t->data + 2 * k, 2);
        ASSERT_EQ_INT(h, cm_f32_to_fp16(rt_data[k]));
    }
    t = gguf_find_tensor(&g, "t.bf16");
    ASSERT_TRUE(t && t->type == GGUF_TT_BF16);
    for (int k = 0; k < RT_ROWS * RT_COLS; k++) {
        uint16_t h; memcpy(&h, (const uint8_t *)t->data + 2 * k, 2);
        ASSERT_EQ_INT(h, cm_f32_to_bf16(rt_data[k]));
    }
    t = gguf_find_tensor(&g, "t.q8_0");
    ASSERT_TRUE(t && t->type == GGUF_TT_Q8_0 && t->nbytes == RT_ROWS * RT_COLS / 32 * 34);
    uint8_t ref[RT_ROWS * RT_COLS / 32 * 34];
    ref_q8_0(rt_data, RT_ROWS * RT_COLS, ref);
    ASSERT_TRUE(memcmp(t->data, ref, sizeof ref) == 0);
    /* and it dequantises back within half a step of each block's scale */
    for (int k = 0; k < RT_ROWS * RT_COLS; k++) {
        const uint8_t *blk = (const uint8_t *)t->data + (k / 32) * 34;
        uint16_t hd; memcpy(&hd, blk, 2);
        float d = cm_fp16_to_f32(hd), x = d * (float)(int8_t)blk[2 + k % 32];
        ASSERT_NEAR(x, rt_data[k], d * 0.5 + 1e-3 * d + 1e-7);
    }
    t = gguf_find_tensor(&g, "t.vec");
    ASSERT_TRUE(t && t->n_dims == 1 && t->ne[0] == RT_COLS && t->ne[1] == 1);
    t = gguf_find_tensor(&g, "t.q8_from_f16");
    float back[RT_COLS];
    for (int k = 0; k < RT_COLS; k++) back[k] = cm_fp16_to_f32(cm_f32_to_fp16(rt_data[k]));
    ref_q8_0(back, RT_COLS, ref);
    ASSERT_TRUE(t && memcmp(t->data, ref, RT_COLS / 32 * 34) == 0);
    ASSERT_TRUE(gguf_find_tensor(&g, "t.nope") == NULL);
    gguf_close(&g);
    unlink(path);
}

/* Every prefix of a valid file up to the end of the last tensor's data must be rejected. */
TEST(gguf_rejects_truncation_at_every_byte) {
    const char *path = write_roundtrip();
    ASSERT_TRUE(path != NULL);
    FILE *f = fopen(path, "rb");
    ASSERT_TRUE(f != NULL);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *all = malloc((size_t)n);
    ASSERT_TRUE(fread(all, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    unlink(path);
    gguf_file g;
    cm_err err = {0};
    ASSERT_EQ_INT(gguf_open_mem(&g, all, (uint64_t)n, &err), CM_OK);
    uint64_t end = 0;
    for (uint64_t i = 0; i < g.n_tensors; i++) {
        uint64_t e = g.data_offset + g.tensors[i].offset + g.tensors[i].nbytes;
        if (e > end) end = e;
    }
    gguf_close(&g);
    int bad = 0;
    for (uint64_t cut = 0; cut < end; cut++) {
        cm_err e = {0};
        int rc = open_copy(all, (size_t)cut, &e);
        if (rc != CM_E_FORMAT || strncmp(e.msg, "gguf: ", 6)) {
            if (bad++ < 5) TEST_FAIL_("truncated at %llu: rc %d msg '%s'", (unsigned long long)cut, rc, e.msg);
        }
    }
    /* cutting only the trailing padding leaves a valid file */
    cm_err e = {0};
    CHECK_TRUE(open_copy(all, (size_t)end, &e) == CM_OK);
    free(all);
    ASSERT_EQ_INT(bad, 0);
}

static void kvcb(void *ud, const char *key, const char *type, const char *value) {
    char *s = ud;
    size_t n = strlen(s);
    snprintf(s + n, 4096 - n, "%s=%s=%s;", key, type, value);
}

static void tcb(void *ud, const char *name, const char *type, int n_dims, const int64_t *dims, uint64_t off,
                uint64_t nbytes) {
    char *s = ud;
    size_t n = strlen(s);
    snprintf(s + n, 4096 - n, "%s:%s:%d:%lld:%llu:%llu;", name, type, n_dims, (long long)dims[0],
             (unsigned long long)off, (unsigned long long)nbytes);
}

/* A valid hand-made file with every scalar and array value type (the writer has no setters for some). */
TEST(gguf_reads_all_value_types) {
    buf b = {0};
    hdr(&b, 2, 0, 14);
    str_(&b, "u8"); u32_(&b, GGUF_VT_UINT8); u8_(&b, 200);
    str_(&b, "i8"); u32_(&b, GGUF_VT_INT8); u8_(&b, (uint8_t)-100);
    str_(&b, "u16"); u32_(&b, GGUF_VT_UINT16); { uint16_t v = 60000; put(&b, &v, 2); }
    str_(&b, "i16"); u32_(&b, GGUF_VT_INT16); { int16_t v = -30000; put(&b, &v, 2); }
    str_(&b, "u32"); u32_(&b, GGUF_VT_UINT32); u32_(&b, 4000000000u);
    str_(&b, "i32"); u32_(&b, GGUF_VT_INT32); u32_(&b, (uint32_t)-7);
    str_(&b, "f32"); u32_(&b, GGUF_VT_FLOAT32); { float v = 0.25f; put(&b, &v, 4); }
    str_(&b, "bool"); u32_(&b, GGUF_VT_BOOL); u8_(&b, 0);
    str_(&b, "str"); u32_(&b, GGUF_VT_STRING); str_(&b, "x");
    str_(&b, "u64"); u32_(&b, GGUF_VT_UINT64); u64_(&b, UINT64_MAX);
    str_(&b, "i64"); u32_(&b, GGUF_VT_INT64); u64_(&b, (uint64_t)(int64_t)-5000000000ll);
    str_(&b, "f64"); u32_(&b, GGUF_VT_FLOAT64); { double v = 1e100; put(&b, &v, 8); }
    str_(&b, "arr_u16"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_UINT16); u64_(&b, 2);
    { uint16_t v[2] = {1, 65535}; put(&b, v, 4); }
    str_(&b, "arr_bool"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_BOOL); u64_(&b, 3);
    u8_(&b, 1); u8_(&b, 0); u8_(&b, 1);
    gguf_file g;
    cm_err err = {0};
    int rc = gguf_open_mem(&g, b.p, b.len, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    ASSERT_EQ_INT(rc, CM_OK);
    ASSERT_EQ_INT(g.version, 2);
    uint32_t u = 0; int32_t i = 0; float f = 0; int bl = -1;
    ASSERT_EQ_INT(gguf_get_u32(&g, "u8", &u, &err), CM_OK); ASSERT_EQ_INT(u, 200);
    ASSERT_EQ_INT(gguf_get_i32(&g, "i8", &i, &err), CM_OK); ASSERT_EQ_INT(i, -100);
    ASSERT_EQ_INT(gguf_get_u32(&g, "u16", &u, &err), CM_OK); ASSERT_EQ_INT(u, 60000);
    ASSERT_EQ_INT(gguf_get_i32(&g, "i16", &i, &err), CM_OK); ASSERT_EQ_INT(i, -30000);
    ASSERT_EQ_INT(gguf_get_u32(&g, "u32", &u, &err), CM_OK); ASSERT_EQ_INT(u, 4000000000u);
    ASSERT_EQ_INT(gguf_get_i32(&g, "u32", &i, &err), CM_E_FORMAT); /* does not fit */
    ASSERT_TRUE(strstr(err.msg, "'u32'") != NULL);
    ASSERT_EQ_INT(gguf_get_u32(&g, "i32", &u, &err), CM_E_FORMAT); /* negative */
    ASSERT_EQ_INT(gguf_get_i32(&g, "i32", &i, &err), CM_OK); ASSERT_EQ_INT(i, -7);
    ASSERT_EQ_INT(gguf_get_u32(&g, "u64", &u, &err), CM_E_FORMAT);
    ASSERT_EQ_INT(gguf_get_i32(&g, "i64", &i, &err), CM_E_FORMAT);
    ASSERT_EQ_INT(gguf_get_f32(&g, "f32", &f, &err), CM_OK); ASSERT_TRUE(f == 0.25f);
    ASSERT_EQ_INT(gguf_get_f32(&g, "u8", &f, &err), CM_OK); ASSERT_TRUE(f == 200.0f);
    ASSERT_EQ_INT(gguf_get_f32(&g, "str", &f, &err), CM_E_FORMAT);
    ASSERT_EQ_INT(gguf_get_u32(&g, "f32", &u, &err), CM_E_FORMAT);
    ASSERT_EQ_INT(gguf_get_bool(&g, "bool", &bl, &err), CM_OK); ASSERT_EQ_INT(bl, 0);
    ASSERT_EQ_INT(gguf_get_bool(&g, "str", &bl, &err), CM_E_FORMAT);
    gguf_str s;
    ASSERT_EQ_INT(gguf_get_str(&g, "str", &s, &err), CM_OK); ASSERT_TRUE(gguf_str_eq(s, "x"));
    ASSERT_EQ_INT(gguf_get_str(&g, "u8", &s, &err), CM_E_FORMAT);
    const gguf_kv *kv = gguf_find(&g, "f64");
    ASSERT_TRUE(kv && gguf_arr_float(kv, 0) == 1e100);
    ASSERT_EQ_INT(gguf_get_f32(&g, "f64", &f, &err), CM_E_FORMAT); /* no float holds 1e100 */
    ASSERT_TRUE(gguf_arr_int(kv, 0) == INT64_MAX);                  /* saturates, no UB */
    kv = gguf_find(&g, "i64");
    ASSERT_TRUE(kv && gguf_arr_int(kv, 0) == -5000000000ll);
    kv = gguf_find(&g, "arr_u16");
    ASSERT_TRUE(kv && kv->n == 2 && gguf_arr_int(kv, 1) == 65535 && gguf_arr_int(kv, 2) == 0);
    kv = gguf_find(&g, "arr_bool");
    ASSERT_TRUE(kv && kv->n == 3 && gguf_arr_int(kv, 0) == 1 && gguf_arr_int(kv, 1) == 0);
    /* cm_model_foreach over a bare model holding this file */
    cm_model m;
    memset(&m, 0, sizeof m);
    m.gguf = g;
    char seen[4096] = "";
    cm_model_foreach(&m, kvcb, NULL, seen);
    ASSERT_TRUE(strstr(seen, "u8=uint8=200;") != NULL);
    ASSERT_TRUE(strstr(seen, "u64=uint64=18446744073709551615;") != NULL);
    ASSERT_TRUE(strstr(seen, "str=string=\"x\";") != NULL);
    ASSERT_TRUE(strstr(seen, "arr_bool=array=[bool x 3]: true, false, true;") != NULL);
    gguf_close(&g);
    free(b.p);
}

TEST(gguf_foreach_renders_arrays_and_tensors) {
    const char *path = write_roundtrip();
    ASSERT_TRUE(path != NULL);
    cm_model m;
    memset(&m, 0, sizeof m);
    cm_err err = {0};
    ASSERT_EQ_INT(gguf_open(&m.gguf, path, &err), CM_OK);
    unlink(path);
    char seen[4096] = "";
    cm_model_foreach(&m, kvcb, tcb, seen);
    ASSERT_TRUE(strstr(seen, "test.arr_str=array=[string x 4]: \"a\", \"\", \"hello world\", \"\xe4\xbd\xa0\";"));
    ASSERT_TRUE(strstr(seen, "test.arr_i32=array=[int32 x 4]: -1, 0, 7, 2147483647;"));
    ASSERT_TRUE(strstr(seen, "test.empty=array=[string x 0];"));
    ASSERT_TRUE(strstr(seen, "t.f32:F32:2:64:0:768;"));
    ASSERT_TRUE(strstr(seen, "t.q8_0:Q8_0:2:64:"));
    gguf_close(&m.gguf);
}

/* ------------------------------------------------------------ hostile headers */

TEST(gguf_rejects_hostile_headers) {
    buf b = {0};
    uint64_t ne2[2] = {32, 2};

    put(&b, "GGUX", 4); u32_(&b, 3); u64_(&b, 0); u64_(&b, 0); EXPECT_REJECT(&b, "bad magic");
    hdr(&b, 1, 0, 0); EXPECT_REJECT(&b, "version 1");
    hdr(&b, 4, 0, 0); EXPECT_REJECT(&b, "version 4");
    hdr(&b, 3, 0, UINT64_MAX); EXPECT_REJECT(&b, "huge kv count");
    hdr(&b, 3, 0, 1ull << 40); EXPECT_REJECT(&b, "large kv count");
    hdr(&b, 3, UINT64_MAX, 0); EXPECT_REJECT(&b, "huge tensor count");
    hdr(&b, 3, 3, 0); tinfo(&b, "a", 1, ne2, 0, 0); EXPECT_REJECT(&b, "tensor count > infos");

    hdr(&b, 3, 0, 1); u64_(&b, UINT64_MAX); put(&b, "abcdefghijklmn", 14); EXPECT_REJECT(&b, "key length 2^64-1");
    hdr(&b, 3, 0, 1); u64_(&b, 20); put(&b, "abcdefghijklmn", 14); EXPECT_REJECT(&b, "key length past end");
    hdr(&b, 3, 0, 1); str_(&b, ""); u32_(&b, GGUF_VT_UINT8); u8_(&b, 0); u64_(&b, 0); EXPECT_REJECT(&b, "empty key");
    hdr(&b, 3, 0, 1); u64_(&b, 3); put(&b, "a\0b", 3); u32_(&b, GGUF_VT_UINT8); u8_(&b, 0); u64_(&b, 0);
    EXPECT_REJECT(&b, "key with NUL");
    hdr(&b, 3, 0, 1); u64_(&b, 70000); for (int i = 0; i < 70000; i++) u8_(&b, 'k');
    u32_(&b, GGUF_VT_UINT8); u8_(&b, 0); EXPECT_REJECT(&b, "key longer than 65535");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_STRING); u64_(&b, UINT64_MAX - 3); u64_(&b, 0);
    EXPECT_REJECT(&b, "string length overflow");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_STRING); u64_(&b, 100); put(&b, "short", 5);
    EXPECT_REJECT(&b, "unterminated string");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, 13); u64_(&b, 0); EXPECT_REJECT(&b, "value type 13");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, 0x80000000u); u64_(&b, 0); EXPECT_REJECT(&b, "value type 2^31");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_BOOL); u8_(&b, 2); u64_(&b, 0); EXPECT_REJECT(&b, "bool 2");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_ARRAY); u64_(&b, 1);
    u32_(&b, GGUF_VT_UINT8); u64_(&b, 1); u8_(&b, 0); EXPECT_REJECT(&b, "array of arrays");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, 99); u64_(&b, 0); u64_(&b, 0);
    EXPECT_REJECT(&b, "array of type 99");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_UINT32); u64_(&b, 1ull << 62);
    u64_(&b, 0); EXPECT_REJECT(&b, "u32 array count * 4 overflows");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_UINT64); u64_(&b, 3);
    u64_(&b, 0); u64_(&b, 0); EXPECT_REJECT(&b, "u64 array past end");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_STRING); u64_(&b, UINT64_MAX / 2);
    u64_(&b, 0); u64_(&b, 0); EXPECT_REJECT(&b, "huge string array count");
    hdr(&b, 3, 0, 1); str_(&b, "k"); u32_(&b, GGUF_VT_ARRAY); u32_(&b, GGUF_VT_STRING); u64_(&b, 2);
    str_(&b, "ok"); u64_(&b, 1000); EXPECT_REJECT(&b, "string array element past end");
    hdr(&b, 3, 0, 2); str_(&b, "k"); u32_(&b, GGUF_VT_UINT8); u8_(&b, 1); str_(&b, "k"); u32_(&b, GGUF_VT_UINT8);
    u8_(&b, 2); EXPECT_REJECT(&b, "duplicate key");
    hdr(&b, 3, 0, 1); str_(&b, "general.alignment"); u32_(&b, GGUF_VT_UINT32); u32_(&b, 24); EXPECT_REJECT(&b, "alignment 24");
    hdr(&b, 3, 0, 1); str_(&b, "general.alignment"); u32_(&b, GGUF_VT_UINT32); u32_(&b, 0); EXPECT_REJECT(&b, "alignment 0");
    hdr(&b, 3, 0, 1); str_(&b, "general.alignment"); u32_(&b, GGUF_VT_UINT64); u64_(&b, 32);
    EXPECT_REJECT(&b, "alignment as u64");

    /* tensor infos; data section starts at the next multiple of 32 */
#define DATA(nbytes) do { pad_to(&b, 32); for (int k_ = 0; k_ < (nbytes); k_++) u8_(&b, 0); } while (0)
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 0, ne2, 0, 0); DATA(256); EXPECT_REJECT(&b, "n_dims 0");
    { uint64_t ne5[5] = {1, 1, 1, 1, 1}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 5, ne5, 0, 0); DATA(256); }
    EXPECT_REJECT(&b, "n_dims 5");
    { uint64_t ne[2] = {32, 0}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne, 0, 0); DATA(256); }
    EXPECT_REJECT(&b, "dimension 0");
    { uint64_t ne[1] = {1ull << 63}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 1, ne, 0, 0); DATA(256); }
    EXPECT_REJECT(&b, "dimension 2^63");
    { uint64_t ne[4] = {1ull << 20, 1ull << 20, 1ull << 20, 1ull << 20}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 4, ne, 0, 0); DATA(256); }
    EXPECT_REJECT(&b, "dims product overflow");
    { uint64_t ne[2] = {1ull << 31, 1ull << 31}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne, 0, 0); DATA(256); }
    EXPECT_REJECT(&b, "bytes overflow (2^62 f32)");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 16, 0); DATA(256); EXPECT_REJECT(&b, "type IQ2_XXS");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0xffffffffu, 0); DATA(256); EXPECT_REJECT(&b, "type 2^32-1");
    { uint64_t ne[1] = {33}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 1, ne, GGUF_TT_Q8_0, 0); DATA(256); }
    EXPECT_REJECT(&b, "Q8_0 row 33");
    { uint64_t ne[2] = {128, 2}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne, GGUF_TT_Q4_K, 0); DATA(512); }
    EXPECT_REJECT(&b, "Q4_K row 128");
    { uint64_t ne[1] = {288}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 1, ne, GGUF_TT_Q2_K, 0); DATA(512); }
    EXPECT_REJECT(&b, "Q2_K row 288");
    { uint64_t ne[2] = {256, 2}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne, GGUF_TT_Q6_K, 0); DATA(419); }
    EXPECT_REJECT(&b, "Q6_K data one byte short");
    { uint64_t ne[1] = {48}; hdr(&b, 3, 1, 0); tinfo(&b, "t", 1, ne, GGUF_TT_Q5_1, 0); DATA(512); }
    EXPECT_REJECT(&b, "Q5_1 row 48");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0, 16); DATA(512); EXPECT_REJECT(&b, "misaligned offset");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0, 0); DATA(255); EXPECT_REJECT(&b, "data one byte short");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0, 1ull << 40); DATA(256); EXPECT_REJECT(&b, "offset past end");
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0, UINT64_MAX - 31); DATA(256); EXPECT_REJECT(&b, "offset+size overflow");
    hdr(&b, 3, 2, 0); tinfo(&b, "a", 2, ne2, 0, 0); tinfo(&b, "b", 2, ne2, 0, 224); DATA(512);
    EXPECT_REJECT(&b, "overlapping tensors");
    hdr(&b, 3, 2, 0); tinfo(&b, "a", 2, ne2, 0, 0); tinfo(&b, "a", 2, ne2, 0, 256); DATA(512);
    EXPECT_REJECT(&b, "duplicate tensor name");
    hdr(&b, 3, 1, 0); tinfo(&b, "", 2, ne2, 0, 0); DATA(256); EXPECT_REJECT(&b, "empty tensor name");
    {
        char longname[300];
        memset(longname, 'n', 299); longname[299] = 0;
        hdr(&b, 3, 1, 0); tinfo(&b, longname, 2, ne2, 0, 0); DATA(256); EXPECT_REJECT(&b, "tensor name 299 bytes");
    }
    hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne2, 0, 0); EXPECT_REJECT(&b, "no data section");

    /* positive controls: the same shapes laid out correctly are accepted */
    cm_err err = {0};
    hdr(&b, 3, 2, 0); tinfo(&b, "a", 2, ne2, 0, 0); tinfo(&b, "b", 2, ne2, 0, 256); DATA(512);
    ASSERT_EQ_INT(open_copy(b.p, b.len, &err), CM_OK); free(b.p); memset(&b, 0, sizeof b);
    hdr(&b, 3, 1, 1); str_(&b, "general.alignment"); u32_(&b, GGUF_VT_UINT32); u32_(&b, 64);
    tinfo(&b, "t", 2, ne2, GGUF_TT_Q8_0, 64); pad_to(&b, 64); for (int k = 0; k < 64 + 68; k++) u8_(&b, 0);
    ASSERT_EQ_INT(open_copy(b.p, b.len, &err), CM_OK); free(b.p); memset(&b, 0, sizeof b);
    /* every block type at its exact byte size: (256, 2) of each needs 2 rows x (256 / block) x bytes */
    {
        static const struct { int type, bytes; } sizes[] = {
            {GGUF_TT_Q4_0, 8 * 18},  {GGUF_TT_Q4_1, 8 * 20},  {GGUF_TT_Q5_0, 8 * 22}, {GGUF_TT_Q5_1, 8 * 24},
            {GGUF_TT_Q8_0, 8 * 34},  {GGUF_TT_Q2_K, 84},      {GGUF_TT_Q3_K, 110},    {GGUF_TT_Q4_K, 144},
            {GGUF_TT_Q5_K, 176},     {GGUF_TT_Q6_K, 210},
        };
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            uint64_t ne[2] = {256, 2};
            gguf_file g;
            ASSERT_EQ_INT((int)gguf_row_bytes(sizes[i].type, 256), sizes[i].bytes);
            hdr(&b, 3, 1, 0); tinfo(&b, "t", 2, ne, (uint32_t)sizes[i].type, 0); DATA(2 * sizes[i].bytes);
            ASSERT_EQ_INT(gguf_open_mem(&g, b.p, b.len, &err), CM_OK);
            ASSERT_TRUE(g.tensors[0].nbytes == (uint64_t)(2 * sizes[i].bytes));
            gguf_close(&g); free(b.p); memset(&b, 0, sizeof b);
        }
    }
    hdr(&b, 3, 0, 0); /* empty file body: fine (vocab-only style, no data section needed) */
    ASSERT_EQ_INT(open_copy(b.p, b.len, &err), CM_OK); free(b.p);
#undef DATA
}

TEST(gguf_error_names_the_tensor) {
    buf b = {0};
    uint64_t ne[2] = {64, 4};
    hdr(&b, 3, 1, 0); tinfo(&b, "blk.3.attn_q.weight", 2, ne, 0, 0); pad_to(&b, 32);
    for (int k = 0; k < 100; k++) u8_(&b, 0);
    cm_err err = {0};
    ASSERT_EQ_INT(open_copy(b.p, b.len, &err), CM_E_FORMAT);
    ASSERT_TRUE(strstr(err.msg, "tensor 'blk.3.attn_q.weight': data [0, 0+1024) beyond end of file") != NULL);
    free(b.p);
}

TEST(gguf_open_errors_on_missing_and_tiny_files) {
    gguf_file g;
    cm_err err = {0};
    ASSERT_EQ_INT(gguf_open(&g, "/nonexistent/x.gguf", &err), CM_E_IO);
    ASSERT_TRUE(strstr(err.msg, "/nonexistent/x.gguf") != NULL);
    const char *p = tmpfile_path("tiny");
    FILE *f = fopen(p, "wb");
    fputs("GGUF", f);
    fclose(f);
    ASSERT_EQ_INT(gguf_open(&g, p, &err), CM_E_FORMAT);
    unlink(p);
    ASSERT_EQ_INT(gguf_open(&g, "/tmp", &err), CM_E_IO);
}

/* Every file in fixtures/bad/ named *.gguf is malformed by construction and must be rejected. */
static void gguf_expect_rejected(const char *path, const char *name, void *ud) {
    gguf_file g;
    cm_err err = {0};
    int rc = gguf_open(&g, path, &err);
    if (rc != CM_E_FORMAT && rc != CM_E_UNSUPPORTED) {
        TEST_FAIL_("%s: rc %d", name, rc);
        if (rc == CM_OK) gguf_close(&g);
    } else if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %s\n", err.msg);
}

TEST(gguf_rejects_fixture_corpus) {
    ASSERT_TRUE(test_foreach_fixture("bad", ".gguf", gguf_expect_rejected, NULL) >= 5);
}

/* The block-type entries of the corpus fail for the reason their name gives, and the message says so. */
TEST(gguf_fixture_corpus_block_types) {
    static const struct { const char *file, *msg; } cases[] = {
        {"bad/tensor_type_iq2xxs.gguf", "tensor 'blk.0.ffn_up.weight': type 16 (IQ2_XXS) is not supported"},
        {"bad/row_not_block_multiple.gguf",
         "tensor 'blk.0.ffn_gate.weight': row length 128 not a multiple of Q4_K block size 256"},
        {"bad/tensor_q6k_truncated.gguf", "tensor 'blk.0.ffn_down.weight': data [0, 0+420) beyond end of file"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gguf_file g;
        cm_err err = {0};
        int rc = gguf_open(&g, test_fixture(cases[i].file), &err);
        ASSERT_TRUE(rc == CM_E_FORMAT || rc == CM_E_UNSUPPORTED);
        if (!strstr(err.msg, cases[i].msg)) TEST_FAIL_("%s: '%s' lacks '%s'", cases[i].file, err.msg, cases[i].msg);
    }
}

int main(void) {
    RUN(gguf_writer_reader_roundtrip);
    RUN(gguf_rejects_truncation_at_every_byte);
    RUN(gguf_reads_all_value_types);
    RUN(gguf_foreach_renders_arrays_and_tensors);
    RUN(gguf_rejects_hostile_headers);
    RUN(gguf_error_names_the_tensor);
    RUN(gguf_open_errors_on_missing_and_tiny_files);
    RUN(gguf_rejects_fixture_corpus);
    RUN(gguf_fixture_corpus_block_types);
    return test_summary();
}
