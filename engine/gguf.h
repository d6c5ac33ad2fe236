/*
 * gguf.h - GGUF (v2, v3) reader over an mmapped file. Internal to engine/ (the writer is
 * modelfile/gguf_writer.h).
 *
 * The reader validates the whole header at open: magic, version, every count against the file size,
 * every string length, every value type, tensor dimension products (no overflow), tensor types and
 * block-size divisibility, alignment, and that each tensor's data lies inside the file's data section.
 * After gguf_open() succeeds, every pointer handed out is inside the mapping: callers need not re-check.
 * Strings are NOT NUL-terminated in the file; gguf_str carries the length.
 */
#ifndef CM_GGUF_H
#define CM_GGUF_H

#include <stddef.h>
#include <stdint.h>
#include "codemoe.h"

enum gguf_vtype {
    GGUF_VT_UINT8 = 0, GGUF_VT_INT8 = 1, GGUF_VT_UINT16 = 2, GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4, GGUF_VT_INT32 = 5, GGUF_VT_FLOAT32 = 6, GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8, GGUF_VT_ARRAY = 9, GGUF_VT_UINT64 = 10, GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12, GGUF_VT_COUNT
};

/* ggml tensor types we know the layout of (others are rejected as unsupported at load): the float types
 * and every block type llama-quantize writes for its presets Q2_K .. Q8_0. Legacy blocks hold 32 values,
 * K-quant super-blocks 256; engine/quants.h has their byte layouts. */
enum gguf_ttype {
    GGUF_TT_F32 = 0, GGUF_TT_F16 = 1, GGUF_TT_Q4_0 = 2, GGUF_TT_Q4_1 = 3,
    GGUF_TT_Q5_0 = 6, GGUF_TT_Q5_1 = 7, GGUF_TT_Q8_0 = 8,
    GGUF_TT_Q2_K = 10, GGUF_TT_Q3_K = 11, GGUF_TT_Q4_K = 12, GGUF_TT_Q5_K = 13, GGUF_TT_Q6_K = 14,
    GGUF_TT_BF16 = 30,
    /* activation formats of the int8 dot products (engine/quants.h); never accepted in a file */
    GGUF_TT_Q8_1 = 9, GGUF_TT_Q8_K = 15,
};

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32

typedef struct gguf_str {
    const char *ptr; /* into the mapping, not NUL-terminated */
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    int type;           /* gguf_vtype */
    int arr_type;       /* element type when type == ARRAY */
    uint64_t n;         /* element count when ARRAY, else 1 */
    const uint8_t *data;/* the value (or first element) in the mapping */
    uint64_t *str_off;  /* ARRAY of STRING: offset of each element's length prefix from data (owned) */
} gguf_kv;

typedef struct gguf_tensor {
    gguf_str name;
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] innermost (a row); unused dims are 1 */
    int type;                  /* gguf_ttype */
    uint64_t offset;           /* relative to the data section */
    uint64_t nbytes;
    const void *data;          /* into the mapping */
} gguf_tensor;

typedef struct gguf_file {
    const uint8_t *map;  /* whole file */
    uint64_t size;
    int owns_map;        /* 1: munmap at close (gguf_open); 0: caller's buffer (gguf_open_mem) */
    uint32_t version;
    uint64_t alignment;
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;
    gguf_tensor *tensors;
    uint64_t data_offset;
} gguf_file;

int gguf_open(gguf_file *g, const char *path, cm_err *err);
/* Parse a file already in memory (fuzzing, tests). buf must outlive g. */
int gguf_open_mem(gguf_file *g, const void *buf, uint64_t size, cm_err *err);
void gguf_close(gguf_file *g);

const gguf_kv *gguf_find(const gguf_file *g, const char *key);
/* Typed getters: return CM_OK, or CM_E_FORMAT (with message naming the key) when the key exists with
 * an incompatible type or out-of-range value, or 1 when the key is absent (out untouched). Integer getters
 * accept any integer type whose value fits. */
int gguf_get_u32(const gguf_file *g, const char *key, uint32_t *out, cm_err *err);
int gguf_get_i32(const gguf_file *g, const char *key, int32_t *out, cm_err *err);
int gguf_get_f32(const gguf_file *g, const char *key, float *out, cm_err *err);
int gguf_get_bool(const gguf_file *g, const char *key, int *out, cm_err *err);
int gguf_get_str(const gguf_file *g, const char *key, gguf_str *out, cm_err *err);
/* Element i of an array of strings (i < kv->n checked). */
gguf_str gguf_arr_str(const gguf_kv *kv, uint64_t i);
/* Element i of a numeric array converted to double/int64 (type checked at open). */
int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i);
double gguf_arr_float(const gguf_kv *kv, uint64_t i);

const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name);
int gguf_str_eq(gguf_str s, const char *c);
const char *gguf_ttype_name(int type);
const char *gguf_vtype_name(int type);
/* Bytes for n elements of a row of this type (n must be a multiple of the block size); 0 if unknown. */
uint64_t gguf_row_bytes(int type, int64_t n);
int gguf_block_size(int type);

#endif
