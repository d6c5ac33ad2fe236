/*
 * gguf_writer.c - builds a GGUF v3 file: metadata is serialised in memory as keys are set; tensor data
 * is converted row by row while writing, straight into the file, so a model never needs a second
 * serialised copy in memory. Output goes to "<path>.tmp" and is renamed into place only when complete.
 *
 * Conversions go through f32 one row at a time: a source of type F32, F16, BF16, Q8_0 or a block type
 * can be written as F32, F16, BF16, Q8_0 or a block type. Quantised types are made by quantize.c's
 * reference quantisers (ggml's, bit for bit).
 */
#include "gguf_writer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quantize.h"
#include "quants.h"
#include "util.h"

typedef struct wkv {
    char *key;
    uint8_t *val; /* serialised: u32 type, then the value as in the file */
    size_t len;
} wkv;

typedef struct wtensor {
    char *name;
    int type, src_type, n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    const void *src; /* the source data (== owned when copied); NULL when in parts */
    void *owned;
    const void **parts; /* (n_parts) owned array: equal slices along the outermost dimension, in order */
    int n_parts;
    uint64_t nbytes, offset; /* in the output */
} wtensor;

struct gguf_writer {
    wkv *kv;
    size_t n_kv, cap_kv;
    wtensor *t;
    size_t n_t, cap_t;
    int failed; /* a setter ran out of memory: write refuses */
};

gguf_writer *gguf_writer_create(cm_err *err) {
    gguf_writer *w = calloc(1, sizeof *w);
    if (!w) cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
    return w;
}

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) { free(w->kv[i].key); free(w->kv[i].val); }
    for (size_t i = 0; i < w->n_t; i++) { free(w->t[i].name); free(w->t[i].owned); free(w->t[i].parts); }
    free(w->kv);
    free(w->t);
    free(w);
}

/* ------------------------------------------------------------ metadata */

typedef struct bbuf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} bbuf;

static void bb_put(bbuf *b, const void *d, size_t n) {
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}
static void bb_u32(bbuf *b, uint32_t v) { bb_put(b, &v, 4); }
static void bb_u64(bbuf *b, uint64_t v) { bb_put(b, &v, 8); }
static void bb_str(bbuf *b, const char *s) {
    size_t n = strlen(s);
    bb_u64(b, n);
    bb_put(b, s, n);
}

/* Takes ownership of the serialised value; replaces an earlier value of the same key. */
static int add_kv(gguf_writer *w, const char *key, bbuf *b) {
    if (b->oom) { free(b->p); w->failed = 1; return CM_E_NOMEM; }
    for (size_t i = 0; i < w->n_kv; i++) {
        if (!strcmp(w->kv[i].key, key)) {
            free(w->kv[i].val);
            w->kv[i].val = b->p;
            w->kv[i].len = b->len;
            return CM_OK;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? 2 * w->cap_kv : 32;
        wkv *kv = realloc(w->kv, cap * sizeof *kv);
        if (!kv) { free(b->p); w->failed = 1; return CM_E_NOMEM; }
        w->kv = kv;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (!k) { free(b->p); w->failed = 1; return CM_E_NOMEM; }
    w->kv[w->n_kv++] = (wkv){k, b->p, b->len};
    return CM_OK;
}

static int set_scalar(gguf_writer *w, const char *key, int type, const void *v, size_t n) {
    bbuf b = {0};
    bb_u32(&b, (uint32_t)type);
    bb_put(&b, v, n);
    return add_kv(w, key, &b);
}

int gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v) { return set_scalar(w, key, GGUF_VT_UINT32, &v, 4); }
int gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v) { return set_scalar(w, key, GGUF_VT_INT32, &v, 4); }
int gguf_writer_set_f32(gguf_writer *w, const char *key, float v) { return set_scalar(w, key, GGUF_VT_FLOAT32, &v, 4); }
int gguf_writer_set_bool(gguf_writer *w, const char *key, int v) {
    uint8_t b = v ? 1 : 0;
    return set_scalar(w, key, GGUF_VT_BOOL, &b, 1);
}

int gguf_writer_set_str(gguf_writer *w, const char *key, const char *v) {
    bbuf b = {0};
    bb_u32(&b, GGUF_VT_STRING);
    bb_str(&b, v);
    return add_kv(w, key, &b);
}

static int set_arr(gguf_writer *w, const char *key, int et, const void *v, uint64_t n, size_t esz) {
    bbuf b = {0};
    bb_u32(&b, GGUF_VT_ARRAY);
    bb_u32(&b, (uint32_t)et);
    bb_u64(&b, n);
    if (n > SIZE_MAX / esz) b.oom = 1;
    else bb_put(&b, v, (size_t)n * esz);
    return add_kv(w, key, &b);
}

int gguf_writer_set_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n) {
    return set_arr(w, key, GGUF_VT_INT32, v, n, 4);
}
int gguf_writer_set_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n) {
    return set_arr(w, key, GGUF_VT_FLOAT32, v, n, 4);
}

static const int vt_bytes[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static int fixed_size(int vt) { return vt >= 0 && vt < GGUF_VT_COUNT ? vt_bytes[vt] : 0; }

int gguf_writer_set_scalar(gguf_writer *w, const char *key, int vtype, const void *v) {
    if (!fixed_size(vtype)) return CM_E_INVAL;
    return set_scalar(w, key, vtype, v, (size_t)fixed_size(vtype));
}

int gguf_writer_set_arr(gguf_writer *w, const char *key, int elem_vtype, const void *v, uint64_t n) {
    if (!fixed_size(elem_vtype)) return CM_E_INVAL;
    return set_arr(w, key, elem_vtype, v, n, (size_t)fixed_size(elem_vtype));
}

void gguf_writer_remove(gguf_writer *w, const char *key) {
    for (size_t i = 0; i < w->n_kv; i++) {
        if (!strcmp(w->kv[i].key, key)) {
            free(w->kv[i].key);
            free(w->kv[i].val);
            memmove(&w->kv[i], &w->kv[i + 1], (w->n_kv - i - 1) * sizeof *w->kv);
            w->n_kv--;
            return;
        }
    }
}

int gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n) {
    bbuf b = {0};
    bb_u32(&b, GGUF_VT_ARRAY);
    bb_u32(&b, GGUF_VT_STRING);
    bb_u64(&b, n);
    for (uint64_t i = 0; i < n; i++) bb_str(&b, v[i]);
    return add_kv(w, key, &b);
}

/* ------------------------------------------------------------ tensors */

static int float_type(int t) { return t == GGUF_TT_F32 || t == GGUF_TT_F16 || t == GGUF_TT_BF16; }
static int src_ok(int t) { return float_type(t) || cm_quantize_type_ok(t); }
static int dst_ok(int t) { return float_type(t) || cm_quantize_type_ok(t); }

static int add_tensor(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne, int src_type,
                      const void *data, const void *const *parts, int n_parts, int copy, cm_err *err) {
    if (!name || !*name || strlen(name) > 256)
        return cm_err_set(err, CM_E_INVAL, "gguf writer: bad tensor name");
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': n_dims %d", name, n_dims);
    if (!(type == src_type && gguf_block_size(type)) && !(src_ok(src_type) && dst_ok(type)))
        return cm_err_set(err, CM_E_UNSUPPORTED, "gguf writer: tensor '%s': cannot convert %s to %s", name,
                          gguf_ttype_name(src_type), gguf_ttype_name(type));
    for (size_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name))
            return cm_err_set(err, CM_E_INVAL, "gguf writer: duplicate tensor '%s'", name);
    wtensor t = {0};
    t.type = type;
    t.src_type = src_type;
    t.n_dims = n_dims;
    uint64_t nrows = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] < 1 || (d > 0 && !cm_mul_u64(nrows, (uint64_t)t.ne[d], &nrows)))
            return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': bad dimension %d", name, d);
    }
    uint64_t row = gguf_row_bytes(type, t.ne[0]), srow = gguf_row_bytes(src_type, t.ne[0]), src_bytes;
    if (!row || !srow)
        return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': row length %lld not a multiple of the %s block size",
                          name, (long long)t.ne[0], gguf_ttype_name(row ? src_type : type));
    if (!cm_mul_u64(row, nrows, &t.nbytes) || !cm_mul_u64(srow, nrows, &src_bytes) || src_bytes > SIZE_MAX)
        return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': too large", name);
    if (parts && (n_parts < 1 || (uint64_t)t.ne[n_dims - 1] % (uint64_t)n_parts))
        return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': %d parts do not split dimension %d (%lld)", name,
                          n_parts, n_dims - 1, (long long)t.ne[n_dims - 1]);
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? 2 * w->cap_t : 64;
        wtensor *p = realloc(w->t, cap * sizeof *p);
        if (!p) return cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
        w->t = p;
        w->cap_t = cap;
    }
    t.name = strdup(name);
    if (!t.name) return cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
    if (parts) {
        t.parts = malloc((size_t)n_parts * sizeof *t.parts);
        if (!t.parts) {
            free(t.name);
            return cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
        }
        memcpy(t.parts, parts, (size_t)n_parts * sizeof *t.parts);
        t.n_parts = n_parts;
    } else if (copy) {
        t.owned = malloc(src_bytes ? (size_t)src_bytes : 1);
        if (!t.owned) {
            free(t.name);
            return cm_err_set(err, CM_E_NOMEM, "gguf writer: tensor '%s': out of memory (%llu bytes)", name,
                              (unsigned long long)src_bytes);
        }
        memcpy(t.owned, data, (size_t)src_bytes);
        t.src = t.owned;
    } else {
        t.src = data;
    }
    w->t[w->n_t++] = t;
    return CM_OK;
}

int gguf_writer_add_tensor(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                           int src_type, const void *data, cm_err *err) {
    return add_tensor(w, name, type, n_dims, ne, src_type, data, NULL, 0, 1, err);
}

int gguf_writer_add_tensor_ref(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                               int src_type, const void *data, cm_err *err) {
    return add_tensor(w, name, type, n_dims, ne, src_type, data, NULL, 0, 0, err);
}

int gguf_writer_add_tensor_parts(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                                 int src_type, const void *const *parts, int n_parts, cm_err *err) {
    if (!parts) return cm_err_set(err, CM_E_INVAL, "gguf writer: tensor '%s': no parts", name ? name : "");
    return add_tensor(w, name, type, n_dims, ne, src_type, NULL, parts, n_parts, 0, err);
}

/* ------------------------------------------------------------ conversion */

/* src may be unaligned (safetensors does not promise alignment): read 16-bit values with memcpy. Block
 * sources come from GGUF data, which is aligned. */
static void row_to_f32(int type, const void *src, float *dst, int64_t n) {
    const uint8_t *p = src;
    uint16_t h;
    if (type == GGUF_TT_F32) memcpy(dst, src, (size_t)n * 4);
    else if (type == GGUF_TT_F16) for (int64_t i = 0; i < n; i++) { memcpy(&h, p + 2 * i, 2); dst[i] = cm_fp16_to_f32(h); }
    else if (type == GGUF_TT_BF16) for (int64_t i = 0; i < n; i++) { memcpy(&h, p + 2 * i, 2); dst[i] = cm_bf16_to_f32(h); }
    else if (type == GGUF_TT_Q8_0)
        for (int64_t b = 0; b < n / CM_QK8_0; b++) {
            const cm_block_q8_0 *q = (const cm_block_q8_0 *)p + b;
            const float d = cm_fp16_to_f32(q->d);
            for (int i = 0; i < CM_QK8_0; i++) dst[b * CM_QK8_0 + i] = q->qs[i] * d;
        }
    else cm_quant_dequantize_ref(type, src, dst, n);
}

static void row_from_f32(int type, const float *src, void *dst, int64_t n) {
    uint16_t *h = dst;
    if (type == GGUF_TT_F32) memcpy(dst, src, (size_t)n * 4);
    else if (type == GGUF_TT_F16) for (int64_t i = 0; i < n; i++) h[i] = cm_f32_to_fp16(src[i]);
    else if (type == GGUF_TT_BF16) for (int64_t i = 0; i < n; i++) h[i] = cm_f32_to_bf16(src[i]);
    else cm_quantize_row(type, src, dst, n);
}

/* ------------------------------------------------------------ output */

static const uint8_t zeros[64];

static int write_pad(FILE *f, uint64_t pos, uint64_t align) {
    uint64_t pad = (align - pos % align) % align;
    while (pad) {
        size_t n = pad < sizeof zeros ? (size_t)pad : sizeof zeros;
        if (fwrite(zeros, 1, n, f) != n) return -1;
        pad -= n;
    }
    return 0;
}

static int write_tensor_data(FILE *f, const wtensor *t, float *tmp, uint8_t *out, size_t out_cap) {
    int np = t->parts ? t->n_parts : 1;
    if (t->type == t->src_type) {
        size_t each = (size_t)(t->nbytes / (uint64_t)np);
        for (int i = 0; i < np; i++)
            if (fwrite(t->parts ? t->parts[i] : t->src, 1, each, f) != each) return -1;
        return 0;
    }
    uint64_t nrows = t->nbytes / gguf_row_bytes(t->type, t->ne[0]), per_part = nrows / (uint64_t)np;
    uint64_t srow = gguf_row_bytes(t->src_type, t->ne[0]), drow = gguf_row_bytes(t->type, t->ne[0]);
    size_t used = 0;
    for (uint64_t r = 0; r < nrows; r++) {
        if (used + drow > out_cap) {
            if (fwrite(out, 1, used, f) != used) return -1;
            used = 0;
        }
        const uint8_t *src = t->parts ? t->parts[r / per_part] : t->src;
        row_to_f32(t->src_type, src + (t->parts ? r % per_part : r) * srow, tmp, t->ne[0]);
        row_from_f32(t->type, tmp, out + used, t->ne[0]);
        used += (size_t)drow;
    }
    return fwrite(out, 1, used, f) == used ? 0 : -1;
}

int gguf_writer_write(gguf_writer *w, const char *path, cm_err *err) {
    if (w->failed) return cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory while setting metadata");
    const uint64_t align = GGUF_DEFAULT_ALIGNMENT;
    /* Layout: offsets of each tensor in the data section, padded to the alignment. */
    uint64_t off = 0, max_row = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        w->t[i].offset = off;
        off += w->t[i].nbytes;
        off += (align - off % align) % align;
        if ((uint64_t)w->t[i].ne[0] > max_row) max_row = (uint64_t)w->t[i].ne[0];
    }
    size_t out_cap = 1 << 20;
    if (max_row * 4 > out_cap) out_cap = (size_t)max_row * 4;
    float *tmp = malloc((max_row ? max_row : 1) * sizeof *tmp);
    uint8_t *out = malloc(out_cap);
    size_t plen = strlen(path);
    char *tmp_path = malloc(plen + 5);
    if (!tmp || !out || !tmp_path) {
        free(tmp); free(out); free(tmp_path);
        return cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
    }
    memcpy(tmp_path, path, plen);
    memcpy(tmp_path + plen, ".tmp", 5);
    int rc = CM_OK;
    FILE *f = fopen(tmp_path, "wb");
    if (!f) {
        rc = cm_err_set(err, CM_E_IO, "gguf writer: cannot create %s: %s", tmp_path, strerror(errno));
        goto done;
    }
    bbuf h = {0};
    bb_put(&h, "GGUF", 4);
    bb_u32(&h, 3);
    bb_u64(&h, w->n_t);
    bb_u64(&h, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        bb_str(&h, w->kv[i].key);
        bb_put(&h, w->kv[i].val, w->kv[i].len);
    }
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        bb_str(&h, t->name);
        bb_u32(&h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) bb_u64(&h, (uint64_t)t->ne[d]);
        bb_u32(&h, (uint32_t)t->type);
        bb_u64(&h, t->offset);
    }
    if (h.oom) {
        free(h.p);
        rc = cm_err_set(err, CM_E_NOMEM, "gguf writer: out of memory");
        goto done;
    }
    int ioerr = fwrite(h.p, 1, h.len, f) != h.len || write_pad(f, h.len, align);
    free(h.p);
    for (size_t i = 0; i < w->n_t && !ioerr; i++) {
        ioerr = write_tensor_data(f, &w->t[i], tmp, out, out_cap) || write_pad(f, w->t[i].nbytes, align);
    }
    if (ioerr) rc = cm_err_set(err, CM_E_IO, "gguf writer: writing %s: %s", tmp_path, strerror(errno));
done:
    if (f && fclose(f) != 0 && !rc) rc = cm_err_set(err, CM_E_IO, "gguf writer: closing %s: %s", tmp_path, strerror(errno));
    if (!rc && rename(tmp_path, path) != 0)
        rc = cm_err_set(err, CM_E_IO, "gguf writer: renaming %s to %s: %s", tmp_path, path, strerror(errno));
    if (rc && f) unlink(tmp_path);
    free(tmp); free(out); free(tmp_path);
    return rc;
}
