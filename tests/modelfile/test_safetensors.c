/*
 * test_safetensors.c - the safetensors reader.
 *
 * Proves: a valid file (F32/F16/BF16, a 0-dim tensor, __metadata__, an unsupported-but-known dtype)
 * parses with the right shapes, sizes and data pointers; every hostile variant (header length past the
 * file or over the cap, bad/non-object/duplicate-key JSON, missing fields, unknown dtype, negative or
 * non-integer shapes, offsets outside the data area or reversed, size != product(shape) * dtype size,
 * product overflow, overlapping ranges, truncation at every byte) is rejected with CM_E_FORMAT (or
 * CM_E_UNSUPPORTED) and a message; the hand-made files in fixtures/bad/ (*.safetensors) are rejected.
 * Buffers are exact-size heap copies so ASan sees any overread.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "safetensors.h"
#include "test.h"

/* File = u64 header length + header + data. */
static uint8_t *make(const char *header, const void *data, size_t data_len, size_t *out_len) {
    uint64_t n = strlen(header);
    *out_len = 8 + n + data_len;
    uint8_t *p = malloc(*out_len);
    memcpy(p, &n, 8);
    memcpy(p + 8, header, n);
    if (data_len) memcpy(p + 8 + n, data, data_len);
    return p;
}

static int open_hdr(const char *header, size_t data_len, cm_err *err) {
    uint8_t zeros[256] = {0};
    size_t len;
    uint8_t *p = make(header, zeros, data_len, &len);
    st_file f;
    int rc = st_open_mem(&f, p, len, err);
    if (rc == CM_OK) st_close(&f);
    free(p);
    return rc;
}

#define EXPECT_REJECT(header, data_len, what) do { cm_err e_ = {0}; int rc_ = open_hdr(header, data_len, &e_); \
    if (!(rc_ == CM_E_FORMAT || rc_ == CM_E_UNSUPPORTED) || strncmp(e_.msg, "safetensors: ", 13)) \
        TEST_FAIL_("%s: rc %d msg '%s'", what, rc_, e_.msg); \
    else if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %-24s -> %s\n", what, e_.msg); } while (0)

static const char *valid_header =
    "{\"__metadata__\": {\"format\": \"pt\"},"
    " \"a.weight\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 24]},"
    " \"b\": {\"dtype\": \"BF16\", \"shape\": [4], \"data_offsets\": [24, 32]},"
    " \"c\": {\"dtype\": \"F16\", \"shape\": [], \"data_offsets\": [32, 34]},"
    " \"ids\": {\"dtype\": \"I64\", \"shape\": [1], \"data_offsets\": [34, 42]},"
    " \"empty\": {\"dtype\": \"F32\", \"shape\": [0, 5], \"data_offsets\": [42, 42]}}   ";

TEST(st_reads_valid_file) {
    uint8_t data[42];
    for (int i = 0; i < 42; i++) data[i] = (uint8_t)i;
    size_t len;
    uint8_t *p = make(valid_header, data, sizeof data, &len);
    st_file f;
    cm_err err = {0};
    int rc = st_open_mem(&f, p, len, &err);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    ASSERT_EQ_INT(rc, CM_OK);
    ASSERT_EQ_INT(f.n_tensors, 5);
    const st_tensor *t = st_find(&f, "a.weight");
    ASSERT_TRUE(t && t->dtype == ST_F32 && t->n_dims == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    ASSERT_TRUE(t->nbytes == 24 && t->data == p + 8 + strlen(valid_header));
    t = st_find(&f, "b");
    ASSERT_TRUE(t && t->dtype == ST_BF16 && t->nbytes == 8 && ((const uint8_t *)t->data)[0] == 24);
    t = st_find(&f, "c");
    ASSERT_TRUE(t && t->dtype == ST_F16 && t->n_dims == 0 && t->nbytes == 2);
    t = st_find(&f, "ids");
    ASSERT_TRUE(t && t->dtype == ST_UNSUPPORTED && !strcmp(t->dtype_name, "I64"));
    t = st_find(&f, "empty");
    ASSERT_TRUE(t && t->nbytes == 0);
    ASSERT_TRUE(st_find(&f, "__metadata__") == NULL);
    ASSERT_TRUE(st_find(&f, "nope") == NULL);
    st_close(&f);

    /* truncation at every byte is rejected */
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *c = malloc(cut ? cut : 1);
        memcpy(c, p, cut);
        cm_err e = {0};
        rc = st_open_mem(&f, c, cut, &e);
        free(c);
        if (rc != CM_E_FORMAT) { TEST_FAIL_("truncated at %zu: rc %d '%s'", cut, rc, e.msg); break; }
    }
    free(p);
}

TEST(st_rejects_hostile_headers) {
    EXPECT_REJECT("", 0, "empty header");
    EXPECT_REJECT("{\"a\": ", 0, "bad JSON");
    EXPECT_REJECT("[1, 2]", 0, "not an object");
    EXPECT_REJECT(" {}", 0, "leading space");
    EXPECT_REJECT("{} x", 0, "trailing garbage");
    EXPECT_REJECT("{\"a\": 5}", 0, "entry not object");
    EXPECT_REJECT("{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "no dtype");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "no shape");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "no offsets");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "one offset");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"Q4_K\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "unknown dtype");
    EXPECT_REJECT("{\"a\": {\"dtype\": 3, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "dtype not string");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "negative dim");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, "float dim");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4,
                  "9 dims");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 8]}}", 4, "end past data");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4, "end < begin");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, "negative begin");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8, "size mismatch");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F16\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 0]}}", 8,
                  "product overflow");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904], \"data_offsets\": [0, 0]}}", 8,
                  "bytes overflow");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 99999999999999999999]}}", 4,
                  "offset beyond int64");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                  " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", 12, "overlap");
    EXPECT_REJECT("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                  " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "duplicate name");
    EXPECT_REJECT("{\"a\\u0000b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "NUL in name");

    /* header length field: larger than the file, and over the cap */
    cm_err err = {0};
    uint8_t *p = malloc(16);
    uint64_t n = 9;
    memcpy(p, &n, 8);
    memcpy(p + 8, "{}      ", 8);
    st_file f;
    ASSERT_EQ_INT(st_open_mem(&f, p, 16, &err), CM_E_FORMAT);
    n = UINT64_MAX;
    memcpy(p, &n, 8);
    ASSERT_EQ_INT(st_open_mem(&f, p, 16, &err), CM_E_FORMAT);
    ASSERT_TRUE(strstr(err.msg, "header length") != NULL);
    free(p);
    /* positive controls */
    ASSERT_EQ_INT(open_hdr("{}", 0, &err), CM_OK);
    ASSERT_EQ_INT(open_hdr("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                           " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", 16, &err), CM_OK);
}

TEST(st_header_cap) {
    /* A header over 100 MB is refused before parsing even when the file is that large (sparse file). */
    char path[128];
    snprintf(path, sizeof path, "/tmp/cm_test_st_%d.safetensors", (int)getpid());
    FILE *fp = fopen(path, "wb");
    ASSERT_TRUE(fp != NULL);
    uint64_t n = (uint64_t)ST_MAX_HEADER + 1;
    fwrite(&n, 8, 1, fp);
    fputc('{', fp);
    fseek(fp, (long)(8 + n + 16), SEEK_SET);
    fputc(0, fp);
    fclose(fp);
    st_file f;
    cm_err err = {0};
    int rc = st_open(&f, path, &err);
    unlink(path);
    ASSERT_EQ_INT(rc, CM_E_FORMAT);
    ASSERT_TRUE(strstr(err.msg, "limit") != NULL && strstr(err.msg, path) != NULL);
    ASSERT_EQ_INT(st_open(&f, "/nonexistent.safetensors", &err), CM_E_IO);
}

static void st_expect_rejected(const char *path, const char *name, void *ud) {
    st_file f;
    cm_err err = {0};
    int rc = st_open(&f, path, &err);
    if (rc != CM_E_FORMAT && rc != CM_E_UNSUPPORTED) {
        TEST_FAIL_("%s: rc %d", name, rc);
        if (rc == CM_OK) st_close(&f);
    } else if (getenv("TEST_VERBOSE")) fprintf(stderr, "  %s\n", err.msg);
}

TEST(st_rejects_fixture_corpus) {
    ASSERT_TRUE(test_foreach_fixture("bad", ".safetensors", st_expect_rejected, NULL) >= 5);
}

int main(void) {
    RUN(st_reads_valid_file);
    RUN(st_rejects_hostile_headers);
    RUN(st_header_cap);
    RUN(st_rejects_fixture_corpus);
    return test_summary();
}
