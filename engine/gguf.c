/*
 * gguf.c - GGUF v2/v3 reader. The whole header is validated at open so that everything handed out
 * afterwards (strings, array elements, tensor data) is known to lie inside the mapping.
 *
 * File layout: magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, n_kv x (string key, u32 type, value),
 * n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 type, u64 offset), padding to the alignment,
 * tensor data. Strings are u64 length + bytes. All integers little-endian (we only run on LE hosts).
 *
 * Decisions beyond the spec, all rejecting things no real writer produces:
 * - v1 (32-bit counts) is unsupported; v2 and v3 are read identically.
 * - keys are 1..65535 bytes and unique; tensor names 1..256 bytes and unique; neither may contain NUL.
 * - bool values must be 0 or 1; arrays of arrays are unsupported.
 * - a tensor has 1..4 dims, every ne >= 1 (a zero-sized weight is never useful and would put a zero
 *   divisor in front of every consumer), ne[0] a multiple of the type's block size, and the byte size
 *   must not overflow.
 * - tensor data offsets are multiples of the alignment, lie inside the file, and tensors do not overlap.
 * - general.alignment, if present, is a u32 power of two in [1, 2^24].
 * Allocation is bounded by the file size: every kv needs >= 13 bytes and every tensor info >= 33, so a
 * huge count fails before anything is allocated.
 */
#include "gguf.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"
#include "util.h"

#define GGUF_MAX_KEY_LEN 65535u
#define GGUF_MAX_NAME_LEN 256u
#define GGUF_MAX_ALIGNMENT (1u << 24)
#define GGUF_MIN_KV_BYTES 13     /* key length (8) + 1 key byte + type (4); values add >= 1 more, lenient */
#define GGUF_MIN_TENSOR_BYTES 33 /* name length (8) + 1 + n_dims (4) + one ne (8) + type (4) + offset (8) */

/* ------------------------------------------------------------ type tables */

static const struct { int block, bytes; const char *name; } tt_info[] = {
    [GGUF_TT_F32] = {1, 4, "F32"},      [GGUF_TT_F16] = {1, 2, "F16"},
    [GGUF_TT_Q4_0] = {32, 18, "Q4_0"},  [GGUF_TT_Q4_1] = {32, 20, "Q4_1"},
    [GGUF_TT_Q5_0] = {32, 22, "Q5_0"},  [GGUF_TT_Q5_1] = {32, 24, "Q5_1"},
    [GGUF_TT_Q8_0] = {32, 34, "Q8_0"},  [GGUF_TT_Q2_K] = {256, 84, "Q2_K"},
    [GGUF_TT_Q3_K] = {256, 110, "Q3_K"}, [GGUF_TT_Q4_K] = {256, 144, "Q4_K"},
    [GGUF_TT_Q5_K] = {256, 176, "Q5_K"}, [GGUF_TT_Q6_K] = {256, 210, "Q6_K"},
    [GGUF_TT_BF16] = {1, 2, "BF16"},
};
#define TT_N ((int)(sizeof tt_info / sizeof tt_info[0]))

/* ggml type names we do not support, only so that the error message can say what the file holds. */
static const char *const tt_other_names[] = {
    [4] = "Q4_2", [5] = "Q4_3", [9] = "Q8_1", [15] = "Q8_K", [16] = "IQ2_XXS", [17] = "IQ2_XS", [18] = "IQ3_XXS",
    [19] = "IQ1_S", [20] = "IQ4_NL", [21] = "IQ3_S", [22] = "IQ2_S", [23] = "IQ4_XS", [24] = "I8",
    [25] = "I16", [26] = "I32", [27] = "I64", [28] = "F64", [29] = "IQ1_M",
};

static int tt_known(int type) {
    return type >= 0 && type < TT_N && tt_info[type].name != NULL;
}

const char *gguf_ttype_name(int type) {
    if (tt_known(type)) return tt_info[type].name;
    if (type >= 0 && type < (int)(sizeof tt_other_names / sizeof tt_other_names[0]) && tt_other_names[type])
        return tt_other_names[type];
    return "unknown";
}

int gguf_block_size(int type) {
    return tt_known(type) ? tt_info[type].block : 0;
}

uint64_t gguf_row_bytes(int type, int64_t n) {
    if (!tt_known(type) || n < 0 || n % tt_info[type].block) return 0;
    uint64_t r;
    if (!cm_mul_u64((uint64_t)(n / tt_info[type].block), (uint64_t)tt_info[type].bytes, &r)) return 0;
    return r;
}

static const char *const vt_names[GGUF_VT_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
    "uint64", "int64", "float64",
};
/* Fixed size of a scalar of each type; 0 for string and array (variable). */
static const int vt_size[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *gguf_vtype_name(int type) {
    return type >= 0 && type < GGUF_VT_COUNT ? vt_names[type] : "unknown";
}

/* ------------------------------------------------------------ cursor */

typedef struct rd {
    const uint8_t *p;
    uint64_t size, off;
    cm_err *err;
} rd;

static uint64_t rd_left(const rd *r) { return r->size - r->off; }

/* Reads n bytes into out; on truncation sets err naming `what`. */
static int rd_bytes(rd *r, void *out, uint64_t n, const char *what) {
    if (n > rd_left(r))
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: truncated reading %s at offset %llu (file size %llu)",
                          what, (unsigned long long)r->off, (unsigned long long)r->size);
    memcpy(out, r->p + r->off, n);
    r->off += n;
    return CM_OK;
}

static int rd_u32(rd *r, uint32_t *v, const char *what) { return rd_bytes(r, v, 4, what); }
static int rd_u64(rd *r, uint64_t *v, const char *what) { return rd_bytes(r, v, 8, what); }

/* A length-prefixed string of at most max_len bytes (0 = only bounded by the file). */
static int rd_str(rd *r, gguf_str *s, uint64_t max_len, const char *what) {
    uint64_t at = r->off, len = 0;
    int rc = rd_u64(r, &len, what);
    if (rc) return rc;
    if (len > rd_left(r))
        return cm_err_set(r->err, CM_E_FORMAT,
                          "gguf: %s at offset %llu: string length %llu beyond end of file (size %llu)", what,
                          (unsigned long long)at, (unsigned long long)len, (unsigned long long)r->size);
    if (max_len && len > max_len)
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: %s at offset %llu: length %llu exceeds limit %llu", what,
                          (unsigned long long)at, (unsigned long long)len, (unsigned long long)max_len);
    s->ptr = (const char *)r->p + r->off;
    s->len = len;
    r->off += len;
    return CM_OK;
}

/* Printable, bounded rendering of a file string for error messages. */
static const char *str_show(gguf_str s, char *buf, size_t cap) {
    size_t j = 0;
    for (uint64_t i = 0; i < s.len && j + 4 < cap; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        buf[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (s.len > 0 && j + 4 >= cap) { buf[j++] = '.'; buf[j++] = '.'; buf[j++] = '.'; }
    buf[j] = 0;
    return buf;
}

/* ------------------------------------------------------------ unique-name check */

static uint64_t str_hash(gguf_str s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (uint64_t i = 0; i < s.len; i++) h = (h ^ (unsigned char)s.ptr[i]) * 1099511628211ull;
    return h;
}

static int str_eq2(gguf_str a, gguf_str b) {
    return a.len == b.len && memcmp(a.ptr, b.ptr, a.len) == 0;
}

/* Returns the index of an earlier duplicate of names[i], or -1 for all unique, via an open-addressing
 * table (a quadratic scan would let a file with 10^6 keys stall the loader). *dup_out = the later one. */
static int find_duplicate(const gguf_str *(*get)(const void *, uint64_t), const void *arr, uint64_t n,
                          uint64_t *dup_out, cm_err *err, int *rc) {
    *rc = CM_OK;
    if (n < 2) return -1;
    uint64_t cap = 2;
    while (cap < 2 * n) cap <<= 1;
    uint64_t *tab = malloc(cap * sizeof *tab);
    if (!tab) { *rc = cm_err_set(err, CM_E_NOMEM, "gguf: out of memory"); return -1; }
    for (uint64_t i = 0; i < cap; i++) tab[i] = UINT64_MAX;
    int found = -1;
    for (uint64_t i = 0; i < n && found < 0; i++) {
        const gguf_str *s = get(arr, i);
        uint64_t h = str_hash(*s) & (cap - 1);
        while (tab[h] != UINT64_MAX) {
            if (str_eq2(*get(arr, tab[h]), *s)) { found = 1; *dup_out = i; break; }
            h = (h + 1) & (cap - 1);
        }
        if (found < 0) tab[h] = i;
    }
    free(tab);
    return found;
}

static const gguf_str *kv_key_at(const void *a, uint64_t i) { return &((const gguf_kv *)a)[i].key; }
static const gguf_str *tensor_name_at(const void *a, uint64_t i) { return &((const gguf_tensor *)a)[i].name; }

/* ------------------------------------------------------------ parsing */

static int parse_kv(rd *r, gguf_kv *kv, uint64_t idx) {
    char show[80];
    uint64_t at = r->off;
    int rc = rd_str(r, &kv->key, GGUF_MAX_KEY_LEN, "kv key");
    if (rc) return rc;
    if (kv->key.len == 0 || memchr(kv->key.ptr, 0, kv->key.len))
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: kv %llu at offset %llu: empty key or key with NUL byte",
                          (unsigned long long)idx, (unsigned long long)at);
    const char *key = str_show(kv->key, show, sizeof show);
    uint32_t type = 0;
    if ((rc = rd_u32(r, &type, "kv type"))) return rc;
    if (type >= GGUF_VT_COUNT)
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: key '%s': bad value type %u", key, type);
    kv->type = (int)type;
    kv->arr_type = -1;
    kv->n = 1;
    kv->str_off = NULL;
    uint32_t et = type;
    if (type == GGUF_VT_ARRAY) {
        if ((rc = rd_u32(r, &et, "array element type"))) return rc;
        if (et >= GGUF_VT_COUNT)
            return cm_err_set(r->err, CM_E_FORMAT, "gguf: key '%s': bad array element type %u", key, et);
        if (et == GGUF_VT_ARRAY)
            return cm_err_set(r->err, CM_E_UNSUPPORTED, "gguf: key '%s': arrays of arrays are not supported", key);
        kv->arr_type = (int)et;
        if ((rc = rd_u64(r, &kv->n, "array length"))) return rc;
    }
    kv->data = r->p + r->off;
    if (et == GGUF_VT_STRING) {
        /* Each element needs at least its 8-byte length, so n is bounded by the file before we allocate. */
        if (kv->n > rd_left(r) / 8)
            return cm_err_set(r->err, CM_E_FORMAT, "gguf: key '%s': %llu strings cannot fit in the %llu bytes left",
                              key, (unsigned long long)kv->n, (unsigned long long)rd_left(r));
        if (type == GGUF_VT_ARRAY) {
            kv->str_off = malloc((kv->n ? kv->n : 1) * sizeof *kv->str_off);
            if (!kv->str_off) return cm_err_set(r->err, CM_E_NOMEM, "gguf: key '%s': out of memory", key);
        }
        uint64_t base = r->off;
        for (uint64_t i = 0; i < kv->n; i++) {
            uint64_t len, sat = r->off;
            if (kv->str_off) kv->str_off[i] = r->off - base;
            if (rd_left(r) < 8 || (memcpy(&len, r->p + r->off, 8), len > rd_left(r) - 8))
                return cm_err_set(r->err, CM_E_FORMAT,
                                  "gguf: key '%s' string %llu at offset %llu: length beyond end of file (size %llu)",
                                  key, (unsigned long long)i, (unsigned long long)sat, (unsigned long long)r->size);
            r->off += 8 + len;
        }
        return CM_OK;
    }
    uint64_t nbytes;
    if (!cm_mul_u64(kv->n, (uint64_t)vt_size[et], &nbytes) || nbytes > rd_left(r))
        return cm_err_set(r->err, CM_E_FORMAT,
                          "gguf: key '%s' at offset %llu: %llu x %s beyond end of file (size %llu)", key,
                          (unsigned long long)at, (unsigned long long)kv->n, vt_names[et],
                          (unsigned long long)r->size);
    if (et == GGUF_VT_BOOL)
        for (uint64_t i = 0; i < kv->n; i++)
            if (kv->data[i] > 1)
                return cm_err_set(r->err, CM_E_FORMAT, "gguf: key '%s': bool value %u is not 0 or 1", key,
                                  kv->data[i]);
    r->off += nbytes;
    return CM_OK;
}

static int parse_tensor_info(rd *r, gguf_tensor *t, uint64_t idx) {
    char show[80];
    uint64_t at = r->off;
    int rc = rd_str(r, &t->name, GGUF_MAX_NAME_LEN, "tensor name");
    if (rc) return rc;
    if (t->name.len == 0 || memchr(t->name.ptr, 0, t->name.len))
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor %llu at offset %llu: empty name or name with NUL byte",
                          (unsigned long long)idx, (unsigned long long)at);
    const char *name = str_show(t->name, show, sizeof show);
    uint32_t nd = 0, type = 0;
    if ((rc = rd_u32(r, &nd, "tensor n_dims"))) return rc;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor '%s': n_dims %u not in [1, %d]", name, nd, GGUF_MAX_DIMS);
    t->n_dims = (int)nd;
    uint64_t nel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t ne = 0;
        if ((rc = rd_u64(r, &ne, "tensor dimension"))) return rc;
        if (ne == 0 || ne > (uint64_t)INT64_MAX)
            return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor '%s': dimension %u is %llu", name, d,
                              (unsigned long long)ne);
        if (!cm_mul_u64(nel, ne, &nel) || nel > (uint64_t)INT64_MAX)
            return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor '%s': element count overflows", name);
        t->ne[d] = (int64_t)ne;
    }
    if ((rc = rd_u32(r, &type, "tensor type"))) return rc;
    if (!tt_known((int)type))
        return cm_err_set(r->err, CM_E_UNSUPPORTED, "gguf: tensor '%s': type %u (%s) is not supported", name, type,
                          gguf_ttype_name((int)type));
    t->type = (int)type;
    if (t->ne[0] % tt_info[type].block)
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor '%s': row length %lld not a multiple of %s block size %d",
                          name, (long long)t->ne[0], tt_info[type].name, tt_info[type].block);
    uint64_t row = gguf_row_bytes(t->type, t->ne[0]);
    if (!row || !cm_mul_u64(row, nel / (uint64_t)t->ne[0], &t->nbytes))
        return cm_err_set(r->err, CM_E_FORMAT, "gguf: tensor '%s': byte size overflows", name);
    if ((rc = rd_u64(r, &t->offset, "tensor offset"))) return rc;
    t->data = NULL;
    return CM_OK;
}

/* Grows *arr (cap elements) to min(2 * cap, max) elements, at least 16, zeroing the new ones. */
static int grow(void **arr, uint64_t *cap, uint64_t max, size_t elem) {
    uint64_t n = *cap ? 2 * *cap : 16;
    if (n > max) n = max;
    void *p = realloc(*arr, (size_t)n * elem);
    if (!p) return 0;
    memset((char *)p + (size_t)*cap * elem, 0, (size_t)(n - *cap) * elem);
    *arr = p;
    *cap = n;
    return 1;
}

static int cmp_tensor_off(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int parse(gguf_file *g, cm_err *err) {
    rd r = {g->map, g->size, 0, err};
    char show[80], show2[80];
    char magic[4] = {0};
    int rc;
    if ((rc = rd_bytes(&r, magic, 4, "magic"))) return rc;
    if (memcmp(magic, "GGUF", 4))
        return cm_err_set(err, CM_E_FORMAT, "gguf: bad magic (not a GGUF file)");
    if ((rc = rd_u32(&r, &g->version, "version"))) return rc;
    if (g->version != 2 && g->version != 3)
        return cm_err_set(err, g->version == 1 ? CM_E_UNSUPPORTED : CM_E_FORMAT,
                          "gguf: version %u not supported (2 and 3 are)", g->version);
    if ((rc = rd_u64(&r, &g->n_tensors, "tensor count")) || (rc = rd_u64(&r, &g->n_kv, "kv count"))) return rc;
    if (g->n_kv > rd_left(&r) / GGUF_MIN_KV_BYTES)
        return cm_err_set(err, CM_E_FORMAT, "gguf: kv count %llu cannot fit in a %llu-byte file",
                          (unsigned long long)g->n_kv, (unsigned long long)g->size);
    if (g->n_tensors > rd_left(&r) / GGUF_MIN_TENSOR_BYTES)
        return cm_err_set(err, CM_E_FORMAT, "gguf: tensor count %llu cannot fit in a %llu-byte file",
                          (unsigned long long)g->n_tensors, (unsigned long long)g->size);
    /* The arrays grow as entries actually parse, so memory follows the bytes really present rather
     * than the counts the header claims (a 10 GB file could otherwise ask for a 40 GB table). */
    uint64_t cap_kv = 0, cap_t = 0;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (i == cap_kv && !grow((void **)&g->kv, &cap_kv, g->n_kv, sizeof *g->kv)) {
            g->n_kv = i;
            return cm_err_set(err, CM_E_NOMEM, "gguf: out of memory");
        }
        if ((rc = parse_kv(&r, &g->kv[i], i))) {
            g->n_kv = i + 1; /* so that close frees what this kv allocated */
            return rc;
        }
    }
    uint64_t dup;
    int found = find_duplicate(kv_key_at, g->kv, g->n_kv, &dup, err, &rc);
    if (rc) return rc;
    if (found >= 0)
        return cm_err_set(err, CM_E_FORMAT, "gguf: duplicate key '%s'", str_show(g->kv[dup].key, show, sizeof show));

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *al = gguf_find(g, "general.alignment");
    if (al) {
        uint32_t a;
        if (al->type != GGUF_VT_UINT32)
            return cm_err_set(err, CM_E_FORMAT, "gguf: general.alignment has type %s, expected uint32",
                              gguf_vtype_name(al->type));
        memcpy(&a, al->data, 4);
        if (a == 0 || (a & (a - 1)) || a > GGUF_MAX_ALIGNMENT)
            return cm_err_set(err, CM_E_FORMAT, "gguf: general.alignment %u is not a power of two <= %u", a,
                              GGUF_MAX_ALIGNMENT);
        g->alignment = a;
    }

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        if (i == cap_t && !grow((void **)&g->tensors, &cap_t, g->n_tensors, sizeof *g->tensors))
            return cm_err_set(err, CM_E_NOMEM, "gguf: out of memory");
        if ((rc = parse_tensor_info(&r, &g->tensors[i], i))) return rc;
    }
    found = find_duplicate(tensor_name_at, g->tensors, g->n_tensors, &dup, err, &rc);
    if (rc) return rc;
    if (found >= 0)
        return cm_err_set(err, CM_E_FORMAT, "gguf: duplicate tensor name '%s'",
                          str_show(g->tensors[dup].name, show, sizeof show));

    /* The data section starts at the next multiple of the alignment after the tensor infos. A file
     * without tensors may end before it (nothing is read there). */
    g->data_offset = r.off + (g->alignment - r.off % g->alignment) % g->alignment;
    if (g->n_tensors == 0) return CM_OK;
    if (g->data_offset > g->size)
        return cm_err_set(err, CM_E_FORMAT, "gguf: data section at %llu beyond end of file (size %llu)",
                          (unsigned long long)g->data_offset, (unsigned long long)g->size);
    uint64_t data_size = g->size - g->data_offset;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        uint64_t end;
        const char *name = str_show(t->name, show, sizeof show);
        if (t->offset % g->alignment)
            return cm_err_set(err, CM_E_FORMAT, "gguf: tensor '%s': data offset %llu not a multiple of the alignment %llu",
                              name, (unsigned long long)t->offset, (unsigned long long)g->alignment);
        if (!cm_add_u64(t->offset, t->nbytes, &end) || end > data_size)
            return cm_err_set(err, CM_E_FORMAT,
                              "gguf: tensor '%s': data [%llu, %llu+%llu) beyond end of file (data section %llu bytes at %llu, file size %llu)",
                              name, (unsigned long long)t->offset, (unsigned long long)t->offset,
                              (unsigned long long)t->nbytes, (unsigned long long)data_size,
                              (unsigned long long)g->data_offset, (unsigned long long)g->size);
        t->data = g->map + g->data_offset + t->offset;
    }
    /* No two tensors may share bytes: sort views by offset and compare neighbours. */
    gguf_tensor **by_off = malloc(g->n_tensors * sizeof *by_off);
    if (!by_off) return cm_err_set(err, CM_E_NOMEM, "gguf: out of memory");
    for (uint64_t i = 0; i < g->n_tensors; i++) by_off[i] = &g->tensors[i];
    qsort(by_off, g->n_tensors, sizeof *by_off, cmp_tensor_off);
    rc = CM_OK;
    for (uint64_t i = 1; i < g->n_tensors && !rc; i++) {
        const gguf_tensor *a = by_off[i - 1], *b = by_off[i];
        if (a->offset + a->nbytes > b->offset)
            rc = cm_err_set(err, CM_E_FORMAT, "gguf: tensors '%s' and '%s' overlap at data offset %llu",
                            str_show(a->name, show, sizeof show), str_show(b->name, show2, sizeof show2),
                            (unsigned long long)b->offset);
    }
    free(by_off);
    return rc;
}

int gguf_open_mem(gguf_file *g, const void *buf, uint64_t size, cm_err *err) {
    memset(g, 0, sizeof *g);
    g->map = buf;
    g->size = size;
    int rc = parse(g, err);
    if (rc) gguf_close(g);
    return rc;
}

int gguf_open(gguf_file *g, const char *path, cm_err *err) {
    memset(g, 0, sizeof *g);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return cm_err_set(err, CM_E_IO, "gguf: cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return cm_err_set(err, CM_E_IO, "gguf: cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return cm_err_set(err, CM_E_IO, "gguf: %s is not a regular file", path);
    }
    if (st.st_size < 24) {
        close(fd);
        return cm_err_set(err, CM_E_FORMAT, "gguf: %s: file too small (%lld bytes) for a GGUF header", path,
                          (long long)st.st_size);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) return cm_err_set(err, CM_E_IO, "gguf: cannot mmap %s: %s", path, strerror(e));
    g->map = map;
    g->size = (uint64_t)st.st_size;
    g->owns_map = 1;
    int rc = parse(g, err);
    if (rc) {
        /* Say which file: prefix the message (it starts with "gguf: "). */
        if (err) {
            char msg[sizeof err->msg];
            snprintf(msg, sizeof msg, "%s", err->msg);
            cm_err_set(err, rc, "gguf: %s: %s", path, strncmp(msg, "gguf: ", 6) ? msg : msg + 6);
        }
        gguf_close(g);
    }
    return rc;
}

void gguf_close(gguf_file *g) {
    if (!g) return;
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++) free(g->kv[i].str_off);
    free(g->kv);
    free(g->tensors);
    if (g->owns_map && g->map) munmap((void *)g->map, g->size);
    memset(g, 0, sizeof *g);
}

/* ------------------------------------------------------------ lookups */

int gguf_str_eq(gguf_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && memcmp(s.ptr, c, n) == 0;
}

const gguf_kv *gguf_find(const gguf_file *g, const char *key) {
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (gguf_str_eq(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (gguf_str_eq(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

/* Float -> int64 without the undefined behaviour of an out-of-range cast: NaN 0, saturating. */
static int64_t dbl_to_i64(double v) {
    if (v != v) return 0;
    if (v >= 9223372036854775807.0) return INT64_MAX;
    if (v <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)v;
}

/* Element i of a numeric array (or the scalar when i == 0) as int64 / double. */
static int64_t elem_int(int type, const uint8_t *p) {
    switch (type) {
    case GGUF_VT_UINT8: case GGUF_VT_BOOL: return p[0];
    case GGUF_VT_INT8: return (int8_t)p[0];
    case GGUF_VT_UINT16: { uint16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_VT_INT16: { int16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_VT_UINT32: { uint32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v; }
    case GGUF_VT_INT64: { int64_t v; memcpy(&v, p, 8); return v; }
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); return dbl_to_i64(v); }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); return dbl_to_i64(v); }
    default: return 0;
    }
}

static double elem_float(int type, const uint8_t *p) {
    switch (type) {
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); return (double)v; }
    default: return (double)elem_int(type, p);
    }
}

static int vt_is_int(int t) {
    return t == GGUF_VT_UINT8 || t == GGUF_VT_INT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_INT16 ||
           t == GGUF_VT_UINT32 || t == GGUF_VT_INT32 || t == GGUF_VT_UINT64 || t == GGUF_VT_INT64;
}

static int vt_is_num(int t) {
    return vt_is_int(t) || t == GGUF_VT_FLOAT32 || t == GGUF_VT_FLOAT64 || t == GGUF_VT_BOOL;
}

int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i) {
    int t = kv->type == GGUF_VT_ARRAY ? kv->arr_type : kv->type;
    if (i >= kv->n || !vt_is_num(t)) return 0;
    return elem_int(t, kv->data + i * (uint64_t)vt_size[t]);
}

double gguf_arr_float(const gguf_kv *kv, uint64_t i) {
    int t = kv->type == GGUF_VT_ARRAY ? kv->arr_type : kv->type;
    if (i >= kv->n || !vt_is_num(t)) return 0;
    return elem_float(t, kv->data + i * (uint64_t)vt_size[t]);
}

gguf_str gguf_arr_str(const gguf_kv *kv, uint64_t i) {
    gguf_str s = {"", 0};
    const uint8_t *p;
    if (kv->type == GGUF_VT_STRING && i == 0) p = kv->data;
    else if (kv->type == GGUF_VT_ARRAY && kv->arr_type == GGUF_VT_STRING && i < kv->n) p = kv->data + kv->str_off[i];
    else return s;
    memcpy(&s.len, p, 8);
    s.ptr = (const char *)p + 8;
    return s;
}

/* Integer value of a scalar key with range check. Returns 1 absent, CM_E_FORMAT bad type / range. */
static int get_int(const gguf_file *g, const char *key, int64_t lo, int64_t hi, int64_t *out, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (!vt_is_int(kv->type))
        return cm_err_set(err, CM_E_FORMAT, "gguf: key '%s' has type %s, expected an integer", key,
                          gguf_vtype_name(kv->type));
    int64_t v = elem_int(kv->type, kv->data);
    int too_big = 0;
    if (kv->type == GGUF_VT_UINT64) {
        uint64_t u;
        memcpy(&u, kv->data, 8);
        too_big = u > (uint64_t)INT64_MAX;
    }
    if (too_big || v < lo || v > hi)
        return cm_err_set(err, CM_E_FORMAT, "gguf: key '%s': value out of range [%lld, %lld]", key, (long long)lo,
                          (long long)hi);
    *out = v;
    return CM_OK;
}

int gguf_get_u32(const gguf_file *g, const char *key, uint32_t *out, cm_err *err) {
    int64_t v = 0;
    int rc = get_int(g, key, 0, UINT32_MAX, &v, err);
    if (rc == CM_OK) *out = (uint32_t)v;
    return rc;
}

int gguf_get_i32(const gguf_file *g, const char *key, int32_t *out, cm_err *err) {
    int64_t v = 0;
    int rc = get_int(g, key, INT32_MIN, INT32_MAX, &v, err);
    if (rc == CM_OK) *out = (int32_t)v;
    return rc;
}

int gguf_get_f32(const gguf_file *g, const char *key, float *out, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (!vt_is_int(kv->type) && kv->type != GGUF_VT_FLOAT32 && kv->type != GGUF_VT_FLOAT64)
        return cm_err_set(err, CM_E_FORMAT, "gguf: key '%s' has type %s, expected a number", key,
                          gguf_vtype_name(kv->type));
    double v = elem_float(kv->type, kv->data);
    if (v == v && (v > FLT_MAX || v < -FLT_MAX) && !isinf(v)) /* finite but no float holds it */
        return cm_err_set(err, CM_E_FORMAT, "gguf: key '%s': value %g out of float range", key, v);
    *out = (float)v;
    return CM_OK;
}

int gguf_get_bool(const gguf_file *g, const char *key, int *out, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type == GGUF_VT_BOOL) { *out = kv->data[0]; return CM_OK; }
    int64_t v = 0;
    int rc = get_int(g, key, 0, 1, &v, err);
    if (rc == CM_OK) *out = (int)v;
    else if (rc < 0)
        cm_err_set(err, CM_E_FORMAT, "gguf: key '%s' has type %s, expected bool", key, gguf_vtype_name(kv->type));
    return rc;
}

int gguf_get_str(const gguf_file *g, const char *key, gguf_str *out, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type != GGUF_VT_STRING)
        return cm_err_set(err, CM_E_FORMAT, "gguf: key '%s' has type %s, expected string", key,
                          gguf_vtype_name(kv->type));
    *out = gguf_arr_str(kv, 0);
    return CM_OK;
}

/* ------------------------------------------------------------ cm_model_foreach (codemoe inspect) */

typedef struct sbuf {
    char *p;
    size_t cap, len;
} sbuf;

static void sb_putc(sbuf *b, char c) {
    if (b->len + 1 < b->cap) b->p[b->len++] = c;
    b->p[b->len < b->cap ? b->len : b->cap - 1] = 0;
}

static void sb_printf(sbuf *b, const char *fmt, ...) CM_PRINTF(2, 3);
static void sb_printf(sbuf *b, const char *fmt, ...) {
    if (b->len + 1 >= b->cap) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n > 0) b->len = b->len + (size_t)n < b->cap ? b->len + (size_t)n : b->cap - 1;
}

/* A string value quoted, control bytes escaped, cut at max bytes. */
static void sb_quote(sbuf *b, gguf_str s, uint64_t max) {
    sb_putc(b, '"');
    for (uint64_t i = 0; i < s.len && i < max; i++) {
        unsigned char c = (unsigned char)s.ptr[i];
        if (c == '"' || c == '\\') { sb_putc(b, '\\'); sb_putc(b, (char)c); }
        else if (c == '\n') sb_printf(b, "\\n");
        else if (c == '\t') sb_printf(b, "\\t");
        else if (c < 0x20 || c == 0x7f) sb_printf(b, "\\x%02x", c);
        else sb_putc(b, (char)c);
    }
    sb_putc(b, '"');
    if (s.len > max) sb_printf(b, "... (%llu bytes)", (unsigned long long)s.len);
}

static void sb_elem(sbuf *b, const gguf_kv *kv, int type, uint64_t i) {
    if (type == GGUF_VT_STRING) sb_quote(b, gguf_arr_str(kv, i), kv->type == GGUF_VT_ARRAY ? 32 : 200);
    else if (type == GGUF_VT_BOOL) sb_printf(b, "%s", gguf_arr_int(kv, i) ? "true" : "false");
    else if (type == GGUF_VT_FLOAT32 || type == GGUF_VT_FLOAT64) sb_printf(b, "%.9g", gguf_arr_float(kv, i));
    else if (type == GGUF_VT_UINT64) {
        uint64_t v;
        memcpy(&v, kv->data + i * 8, 8);
        sb_printf(b, "%llu", (unsigned long long)v);
    } else sb_printf(b, "%lld", (long long)gguf_arr_int(kv, i));
}

void cm_model_foreach(const cm_model *m, cm_kv_fn kvfn, cm_tensor_fn tfn, void *ud) {
    if (!m) return;
    const gguf_file *g = &m->gguf;
    char val[640], name[GGUF_MAX_NAME_LEN + 1];
    if (kvfn) {
        uint64_t max_key = 0;
        for (uint64_t i = 0; i < g->n_kv; i++)
            if (g->kv[i].key.len > max_key) max_key = g->kv[i].key.len;
        char *key = malloc(max_key + 1);
        if (!key) return;
        for (uint64_t i = 0; i < g->n_kv; i++) {
            const gguf_kv *kv = &g->kv[i];
            sbuf b = {val, sizeof val, 0};
            val[0] = 0;
            memcpy(key, kv->key.ptr, kv->key.len);
            key[kv->key.len] = 0;
            if (kv->type == GGUF_VT_ARRAY) {
                sb_printf(&b, "[%s x %llu]", gguf_vtype_name(kv->arr_type), (unsigned long long)kv->n);
                uint64_t shown = kv->n < 8 ? kv->n : 8;
                if (shown) sb_printf(&b, ": ");
                for (uint64_t j = 0; j < shown; j++) {
                    if (j) sb_printf(&b, ", ");
                    sb_elem(&b, kv, kv->arr_type, j);
                }
                if (kv->n > shown) sb_printf(&b, ", ...");
            } else {
                sb_elem(&b, kv, kv->type, 0);
            }
            kvfn(ud, key, gguf_vtype_name(kv->type), val);
        }
        free(key);
    }
    if (tfn) {
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            const gguf_tensor *t = &g->tensors[i];
            memcpy(name, t->name.ptr, t->name.len);
            name[t->name.len] = 0;
            tfn(ud, name, gguf_ttype_name(t->type), t->n_dims, t->ne, t->offset, t->nbytes);
        }
    }
}
