/*
 * test_gguf_writer.c - the GGUF writer's own contract (modelfile/gguf_writer.h): bad tensor shapes,
 * types and duplicate names are refused with the documented code, an unwritable path is CM_E_IO, and
 * free(NULL) is a no-op. What it writes is read back bit-exactly in tests/engine/test_gguf.c.
 */
#include <stdint.h>

#include "gguf_writer.h"
#include "test.h"

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

int main(void) {
    RUN(gguf_writer_rejects_bad_input);
    return test_summary();
}
