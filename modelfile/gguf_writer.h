/*
 * gguf_writer.h - builds GGUF v3 files (gguf_writer.c): the converter, the upcycler and tests that make
 * model files write through it. Internal to modelfile/ (and its tests); the reader is engine/gguf.h,
 * whose type and key enums this shares.
 *
 * Contract: setters copy key and value; a setter that runs out of memory returns CM_E_NOMEM and marks
 * the writer failed, and gguf_writer_write then refuses. gguf_writer_write writes "<path>.tmp" and
 * renames it into place only when complete: on failure nothing is created or replaced at
 * path.
 */
#ifndef CM_GGUF_WRITER_H
#define CM_GGUF_WRITER_H

#include <stdint.h>
#include "codemoe.h"
#include "gguf.h"

typedef struct gguf_writer gguf_writer;

gguf_writer *gguf_writer_create(cm_err *err);
void gguf_writer_free(gguf_writer *w);
int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v);
int gguf_writer_set_f32(gguf_writer *w, const char *key, float v);
int gguf_writer_set_bool(gguf_writer *w, const char *key, int v);
int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v);
int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n);
int gguf_writer_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n);
int gguf_writer_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n);
/* Any fixed-size value type (every gguf_vtype but STRING and ARRAY): a scalar from the bytes at v, or
 * an array of n such elements; CM_E_INVAL for other types. The quantiser copies keys through these. */
int gguf_writer_set_scalar(gguf_writer *w, const char *key, int vtype, const void *v);
int gguf_writer_set_arr(gguf_writer *w, const char *key, int elem_vtype, const void *v, uint64_t n);
/* Drops key if it is set; a later setter appends it at the end. */
void gguf_writer_remove(gguf_writer *w, const char *key);
/* Adds a tensor; data is copied, or converted when type differs from src_type: a source of F32, F16,
 * BF16, Q8_0 or a block type (engine/quants.h) is read as f32 and written as F32, F16, BF16, Q8_0 or a
 * block type (quantize.h's ggml reference quantisers). ne[0] is the row length. */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                           int src_type, const void *data, cm_err *err);
/* gguf_writer_add_tensor without the copy: data must stay valid and unchanged until gguf_writer_write
 * returns (the converter passes views into mmapped safetensors, the quantiser into the mmapped input).
 * Conversion happens row by row while writing. */
int gguf_writer_add_tensor_ref(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                               int src_type, const void *data, cm_err *err);
/* gguf_writer_add_tensor_ref of a tensor held in n_parts equal pieces, concatenated along its outermost
 * dimension (ne[n_dims - 1], which n_parts must divide): the converter stacks per-expert matrices into
 * one (n_expert, rows, cols) tensor without copying them. The pointer array is copied; the pieces must
 * stay valid until gguf_writer_write returns. */
int gguf_writer_add_tensor_parts(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                                 int src_type, const void *const *parts, int n_parts, cm_err *err);
int gguf_writer_write(gguf_writer *w, const char *path, cm_err *err);

#endif
