/*
 * safetensors.c - validating reader for .safetensors (see safetensors.h for the checks).
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

static const struct { const char *name; int dtype, size; } dtypes[] = {
    {"F32", ST_F32, 4}, {"F16", ST_F16, 2}, {"BF16", ST_BF16, 2},
    {"F64", ST_UNSUPPORTED, 8}, {"I64", ST_UNSUPPORTED, 8}, {"U64", ST_UNSUPPORTED, 8},
    {"I32", ST_UNSUPPORTED, 4}, {"U32", ST_UNSUPPORTED, 4}, {"I16", ST_UNSUPPORTED, 2},
    {"U16", ST_UNSUPPORTED, 2}, {"I8", ST_UNSUPPORTED, 1}, {"U8", ST_UNSUPPORTED, 1},
    {"BOOL", ST_UNSUPPORTED, 1}, {"F8_E4M3", ST_UNSUPPORTED, 1}, {"F8_E5M2", ST_UNSUPPORTED, 1},
};

static int parse_tensor(st_file *f, st_tensor *t, const char *name, json_t *v, uint64_t data_size, cm_err *err) {
    if (!json_is_object(v))
        return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': entry is not an object", name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
        return cm_err_set(err, CM_E_FORMAT,
                          "safetensors: tensor '%s': needs string \"dtype\", array \"shape\" and 2-element \"data_offsets\"",
                          name);
    const char *ds = json_string_value(jd);
    int esize = 0;
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
        if (!strcmp(ds, dtypes[i].name)) {
            t->dtype = dtypes[i].dtype;
            t->dtype_name = dtypes[i].name;
            esize = dtypes[i].size;
        }
    }
    if (!esize)
        return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': unknown dtype \"%.32s\"", name, ds);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return cm_err_set(err, CM_E_UNSUPPORTED, "safetensors: tensor '%s': %zu dimensions (max %d)", name, nd,
                          ST_MAX_DIMS);
    t->n_dims = (int)nd;
    uint64_t nel = 1;
    for (size_t d = 0; d < nd; d++) {
        json_t *x = json_array_get(js, d);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': shape[%zu] is not a non-negative integer",
                              name, d);
        t->shape[d] = (int64_t)json_integer_value(x);
        if (!cm_mul_u64(nel, (uint64_t)t->shape[d], &nel))
            return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': element count overflows", name);
    }
    json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
    if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
        json_integer_value(je) < json_integer_value(jb))
        return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': data_offsets must be integers 0 <= begin <= end",
                          name);
    uint64_t begin = (uint64_t)json_integer_value(jb), end = (uint64_t)json_integer_value(je);
    if (end > data_size)
        return cm_err_set(err, CM_E_FORMAT,
                          "safetensors: tensor '%s': data [%llu, %llu) beyond end of data area (%llu bytes; file size %llu)",
                          name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size,
                          (unsigned long long)f->size);
    if (!cm_mul_u64(nel, (uint64_t)esize, &t->nbytes))
        return cm_err_set(err, CM_E_FORMAT, "safetensors: tensor '%s': byte size overflows", name);
    if (t->nbytes != end - begin)
        return cm_err_set(err, CM_E_FORMAT,
                          "safetensors: tensor '%s': data_offsets span %llu bytes but shape x %s needs %llu",
                          name, (unsigned long long)(end - begin), t->dtype_name, (unsigned long long)t->nbytes);
    t->data = f->map + f->data_offset + begin;
    return CM_OK;
}

static int cmp_by_data(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    const uint8_t *px = x->data, *py = y->data;
    return px < py ? -1 : px > py;
}

static int parse(st_file *f, cm_err *err) {
    uint64_t n;
    if (f->size < 8) return cm_err_set(err, CM_E_FORMAT, "safetensors: file too small (%llu bytes)", (unsigned long long)f->size);
    memcpy(&n, f->map, 8);
    if (n > f->size - 8)
        return cm_err_set(err, CM_E_FORMAT, "safetensors: header length %llu beyond end of file (size %llu)",
                          (unsigned long long)n, (unsigned long long)f->size);
    if (n > ST_MAX_HEADER)
        return cm_err_set(err, CM_E_FORMAT, "safetensors: header length %llu exceeds the %u-byte limit",
                          (unsigned long long)n, ST_MAX_HEADER);
    if (n < 2 || f->map[8] != '{')
        return cm_err_set(err, CM_E_FORMAT, "safetensors: header is not a JSON object");
    f->data_offset = 8 + n;
    json_error_t je;
    json_t *root = json_loadb((const char *)f->map + 8, (size_t)n, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return cm_err_set(err, CM_E_FORMAT, "safetensors: bad JSON header at byte %d: %s", je.position, je.text);
    int rc = CM_OK;
    if (!json_is_object(root)) {
        rc = cm_err_set(err, CM_E_FORMAT, "safetensors: header is not a JSON object");
        goto out;
    }
    size_t cnt = json_object_size(root);
    f->tensors = calloc(cnt ? cnt : 1, sizeof *f->tensors);
    if (!f->tensors) { rc = cm_err_set(err, CM_E_NOMEM, "safetensors: out of memory"); goto out; }
    const char *key;
    json_t *val;
    uint64_t data_size = f->size - f->data_offset;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) continue;
        st_tensor *t = &f->tensors[f->n_tensors];
        if ((rc = parse_tensor(f, t, key, val, data_size, err))) goto out;
        if (!(t->name = strdup(key))) { rc = cm_err_set(err, CM_E_NOMEM, "safetensors: out of memory"); goto out; }
        f->n_tensors++;
    }
    /* No overlaps: sort by start and compare neighbours (zero-sized tensors occupy nothing). */
    if (f->n_tensors > 1) {
        st_tensor **v = malloc(f->n_tensors * sizeof *v);
        if (!v) { rc = cm_err_set(err, CM_E_NOMEM, "safetensors: out of memory"); goto out; }
        for (uint64_t i = 0; i < f->n_tensors; i++) v[i] = &f->tensors[i];
        qsort(v, f->n_tensors, sizeof *v, cmp_by_data);
        const st_tensor *prev = NULL;
        for (uint64_t i = 0; i < f->n_tensors && !rc; i++) {
            if (!v[i]->nbytes) continue;
            if (prev && (const uint8_t *)prev->data + prev->nbytes > (const uint8_t *)v[i]->data)
                rc = cm_err_set(err, CM_E_FORMAT, "safetensors: tensors '%s' and '%s' overlap", prev->name, v[i]->name);
            prev = v[i];
        }
        free(v);
    }
out:
    json_decref(root);
    return rc;
}

int st_open_mem(st_file *f, const void *buf, uint64_t size, cm_err *err) {
    memset(f, 0, sizeof *f);
    f->map = buf;
    f->size = size;
    int rc = parse(f, err);
    if (rc) st_close(f);
    return rc;
}

int st_open(st_file *f, const char *path, cm_err *err) {
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return cm_err_set(err, CM_E_IO, "safetensors: cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return cm_err_set(err, CM_E_IO, "safetensors: %s is not a readable regular file", path);
    }
    if (st.st_size < 8) {
        close(fd);
        return cm_err_set(err, CM_E_FORMAT, "safetensors: %s: file too small (%lld bytes)", path, (long long)st.st_size);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) return cm_err_set(err, CM_E_IO, "safetensors: cannot mmap %s: %s", path, strerror(e));
    f->map = map;
    f->size = (uint64_t)st.st_size;
    f->owns_map = 1;
    int rc = parse(f, err);
    if (rc) {
        if (err) {
            char msg[sizeof err->msg];
            snprintf(msg, sizeof msg, "%s", err->msg);
            cm_err_set(err, rc, "safetensors: %s: %s", path, strncmp(msg, "safetensors: ", 13) ? msg : msg + 13);
        }
        st_close(f);
    }
    return rc;
}

void st_close(st_file *f) {
    if (!f) return;
    for (uint64_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->owns_map && f->map) munmap((void *)f->map, f->size);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}
