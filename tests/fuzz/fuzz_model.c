/*
 * fuzz_model.c - libFuzzer driver for the model loader: any input must either be refused by
 * cm_model_load with an error message or load into a model whose info, metadata and tensors can be
 * walked (ASan/UBSan watch). fuzz_gguf covers the GGUF parser alone; this one reaches the checks a
 * well-formed GGUF can still fail (tensor shapes, weight types, expert counts against their tensors,
 * hyper-parameters), so its seeds are valid fixture models and the model-level hostile corpus.
 * Build: meson setup build-fuzz -Dfuzz=true (clang); run:
 *   build-fuzz/tests/fuzz/fuzz_model -max_total_time=60 CORPUS_DIR tests/fixtures/bad tests/fixtures/models
 * (libFuzzer reads seed directories recursively, so tests/fixtures/bad/model is included.)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "codemoe.h"

static void kv_cb(void *ud, const char *key, const char *type, const char *value) {
    *(size_t *)ud += strlen(key) + strlen(type) + strlen(value);
}

static void t_cb(void *ud, const char *name, const char *type, int n_dims, const int64_t *dims, uint64_t off,
                 uint64_t nbytes) {
    *(size_t *)ud += strlen(name) + strlen(type) + (size_t)n_dims + (size_t)dims[0] + (size_t)(off + nbytes);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* the loader opens a path: give it the input as an in-memory file */
    int fd = memfd_create("fuzz_model", 0);
    if (fd < 0) return 0;
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) break;
        done += (size_t)w;
    }
    if (done == size) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        cm_err err = {0};
        cm_model_params mp = {0};
        cm_model *m = cm_model_load(path, &mp, &err);
        if (m) {
            const cm_model_info *in = cm_model_get_info(m);
            size_t n = strlen(in->arch) + strlen(in->name) + (size_t)in->n_vocab;
            cm_model_foreach(m, kv_cb, t_cb, &n);
            volatile size_t sink = n;
            (void)sink;
            cm_model_free(m);
        } else if (!err.msg[0]) {
            abort(); /* a refusal must say why */
        }
    }
    close(fd);
    return 0;
}
