/*
 * safetensors.h - reader for Hugging Face .safetensors files over an mmapped file. Internal to modelfile/
 * (used by the converter).
 *
 * Layout: u64 little-endian N, N bytes of JSON header {"name": {"dtype": "F32", "shape": [..],
 * "data_offsets": [begin, end]}, ..., "__metadata__": {...}}, then the data area; offsets are relative
 * to the data area. st_open validates everything before returning: N against the file size and a 100 MB
 * cap, the JSON (duplicate keys rejected), every dtype, shape and [begin, end) range (inside the data
 * area, end - begin == product(shape) * dtype size with overflow checks, no two tensors overlapping).
 * After st_open succeeds every data pointer is inside the mapping.
 *
 * dtypes: F32, F16 and BF16 are supported. The other dtypes of the format (F64, I64, I32, I16, I8, U8,
 * BOOL, F8_E4M3, F8_E5M2, ...) are parsed and size-checked but given type ST_UNSUPPORTED, so that a file
 * with, say, an int64 buffer the converter never reads still opens; st_tensor.dtype_name says which.
 * Unknown dtype strings are a format error.
 */
#ifndef CM_SAFETENSORS_H
#define CM_SAFETENSORS_H

#include <stdint.h>
#include "codemoe.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u << 20)

enum st_dtype { ST_F32 = 0, ST_F16 = 1, ST_BF16 = 2, ST_UNSUPPORTED = 3 };

typedef struct st_tensor {
    char *name;               /* owned, NUL-terminated */
    int dtype;                /* st_dtype */
    const char *dtype_name;   /* "F32", "I64", ... (static) */
    int n_dims;               /* 0..ST_MAX_DIMS */
    int64_t shape[ST_MAX_DIMS]; /* HF order: shape[0] outermost; (out, in) for a linear weight */
    uint64_t nbytes;
    const void *data;         /* into the mapping */
} st_tensor;

typedef struct st_file {
    const uint8_t *map;
    uint64_t size;
    int owns_map;
    uint64_t data_offset;     /* 8 + N */
    uint64_t n_tensors;
    st_tensor *tensors;       /* (n_tensors) in header order */
} st_file;

/* Opens and validates path. On error returns a negative CM_E* code with err set and *f zeroed. */
int st_open(st_file *f, const char *path, cm_err *err);
/* Same over a buffer (tests, fuzzing); buf must outlive f. */
int st_open_mem(st_file *f, const void *buf, uint64_t size, cm_err *err);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);

#endif
