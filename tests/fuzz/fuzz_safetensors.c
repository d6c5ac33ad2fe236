/*
 * fuzz_safetensors.c - libFuzzer driver for the safetensors reader: any input is rejected or parses into
 * tensors whose every data byte lies in the buffer. Build with -Dfuzz=true (clang); run:
 *   build-fuzz/tests/fuzz/fuzz_safetensors -max_total_time=60 CORPUS_DIR tests/fixtures/bad tests/fixtures/hf/<x>
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    st_file f;
    cm_err err;
    if (st_open_mem(&f, buf, size, &err) == CM_OK) {
        volatile uint64_t sink = 0;
        for (uint64_t i = 0; i < f.n_tensors; i++) {
            const st_tensor *t = &f.tensors[i];
            if (t->nbytes) sink += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
            sink += st_find(&f, t->name) == t;
        }
        (void)sink;
        st_close(&f);
    }
    free(buf);
    return 0;
}
