/*
 * fuzz_gguf.c - libFuzzer driver for the GGUF reader: any input must either be rejected with an error
 * message or parse into a gguf_file whose every string, array element and tensor byte can be read
 * (ASan/UBSan watch). Build: meson setup build-fuzz -Dfuzz=true (clang); run:
 *   build-fuzz/tests/fuzz/fuzz_gguf -max_total_time=60 CORPUS_DIR tests/fixtures/bad tests/fixtures/models
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "model.h"

static void kv_cb(void *ud, const char *key, const char *type, const char *value) {
    *(size_t *)ud += strlen(key) + strlen(type) + strlen(value);
}

static void t_cb(void *ud, const char *name, const char *type, int n_dims, const int64_t *dims, uint64_t off,
                 uint64_t nbytes) {
    *(size_t *)ud += strlen(name) + strlen(type) + (size_t)n_dims + (size_t)dims[0] + (size_t)(off + nbytes);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* an exact-size copy so that a read one past the end is caught */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    cm_model m;
    memset(&m, 0, sizeof m);
    cm_err err;
    if (gguf_open_mem(&m.gguf, buf, size, &err) == CM_OK) {
        const gguf_file *g = &m.gguf;
        volatile uint64_t sink = 0;
        for (uint64_t i = 0; i < g->n_kv; i++) {
            const gguf_kv *kv = &g->kv[i];
            for (uint64_t j = 0; j < kv->n && j < 4096; j++) {
                gguf_str s = gguf_arr_str(kv, j);
                if (s.len) sink += (uint8_t)s.ptr[0] + (uint8_t)s.ptr[s.len - 1];
                sink += (uint64_t)gguf_arr_int(kv, j) + (gguf_arr_float(kv, j) > 0);
            }
        }
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            const gguf_tensor *t = &g->tensors[i];
            const uint8_t *p = t->data;
            sink += p[0] + p[t->nbytes - 1] + gguf_row_bytes(t->type, t->ne[0]);
        }
        uint32_t u; int32_t i32; float f; int b; gguf_str s;
        gguf_get_u32(g, "general.alignment", &u, &err);
        gguf_get_i32(g, "qwen2.block_count", &i32, &err);
        gguf_get_f32(g, "general.architecture", &f, &err);
        gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &err);
        gguf_get_str(g, "general.architecture", &s, &err);
        size_t n = 0;
        cm_model_foreach(&m, kv_cb, t_cb, &n);
        sink += n;
        (void)sink;
        gguf_close(&m.gguf);
    }
    free(buf);
    return 0;
}
