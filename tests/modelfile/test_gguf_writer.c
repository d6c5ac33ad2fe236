/*
 * test_gguf_writer.c - the GGUF writer's own contract (modelfile/gguf_writer.h): bad tensor shapes,
 * types and duplicate names are refused with the documented code, an unwritable path is CM_E_IO, and
 * free(NULL) is a no-op; a tensor given in parts is written as their concatenation, copied or converted
 * row by row. What it writes is read back bit-exactly in tests/engine/test_gguf.c.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gguf_writer.h"
#include "test.h"
#include "util.h"

TEST(gguf_writer_rejects_bad_input) {
    cm_err err = {0};
    gguf_writer *w = gguf_writer_create(&err);
    ASSERT_TRUE(w != NULL);
    float x[40] = {0};
    int64_t ne33[1] = {33}, ne32[1] = {32}, ne0[2] = {32, 0};
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_Q8_0, 1, ne33, GGUF_TT_F32, x, &err), CM_E_INVAL);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_F32, 2, ne0, GGUF_TT_F32, x, &err), CM_E_INVAL);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_F32, 5, ne32, GGUF_TT_F32, x, &err), CM_E_INVAL);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_Q8_K, 1, ne32, GGUF_TT_F32, x, &err), CM_E_UNSUPPORTED);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_F32, 1, ne32, GGUF_TT_Q8_1, x, &err), CM_E_UNSUPPORTED);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_F32, 1, ne32, GGUF_TT_F32, x, &err), CM_OK);
    ASSERT_EQ_INT(gguf_writer_add_tensor(w, "a", GGUF_TT_F32, 1, ne32, GGUF_TT_F32, x, &err), CM_E_INVAL);
    ASSERT_EQ_INT(gguf_writer_write(w, "/nonexistent/dir/out.gguf", &err), CM_E_IO);
    gguf_writer_free(w);
    gguf_writer_free(NULL);
}

/* Three (2, 32) pieces stacked into (3, 2, 32), as F32 (copied) and as F16 (converted): the file holds
 * the pieces in order; parts that do not split the outermost dimension are refused. */
TEST(gguf_writer_parts) {
    cm_err err = {0};
    gguf_writer *w = gguf_writer_create(&err);
    ASSERT_TRUE(w != NULL);
    float p[3][64];
    for (int e = 0; e < 3; e++)
        for (int i = 0; i < 64; i++) p[e][i] = (float)(e * 100 + i) * 0.5f;
    const void *parts[3] = {p[0], p[1], p[2]};
    int64_t ne[3] = {32, 2, 3};
    ASSERT_EQ_INT(gguf_writer_add_tensor_parts(w, "bad", GGUF_TT_F32, 3, ne, GGUF_TT_F32, parts, 2, &err), CM_E_INVAL);
    ASSERT_EQ_INT(gguf_writer_add_tensor_parts(w, "x", GGUF_TT_F32, 3, ne, GGUF_TT_F32, parts, 3, &err), CM_OK);
    ASSERT_EQ_INT(gguf_writer_add_tensor_parts(w, "h", GGUF_TT_F16, 3, ne, GGUF_TT_F32, parts, 3, &err), CM_OK);
    char path[256];
    snprintf(path, sizeof path, "/tmp/cm_test_writer_parts_%d.gguf", (int)getpid());
    ASSERT_EQ_INT(gguf_writer_write(w, path, &err), CM_OK);
    gguf_writer_free(w);
    gguf_file g;
    ASSERT_EQ_INT(gguf_open(&g, path, &err), CM_OK);
    const gguf_tensor *x = gguf_find_tensor(&g, "x"), *h = gguf_find_tensor(&g, "h");
    ASSERT_TRUE(x && h && x->ne[2] == 3 && h->type == GGUF_TT_F16);
    CHECK_TRUE(memcmp(x->data, p, sizeof p) == 0);
    int bad = 0;
    for (int i = 0; i < 3 * 64; i++) {
        uint16_t v;
        memcpy(&v, (const char *)h->data + 2 * i, 2);
        bad += cm_fp16_to_f32(v) != p[i / 64][i % 64];
    }
    CHECK_TRUE(bad == 0);
    gguf_close(&g);
    unlink(path);
}

int main(void) {
    RUN(gguf_writer_rejects_bad_input);
    RUN(gguf_writer_parts);
    return test_summary();
}
