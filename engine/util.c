/* util.c - error reporting shared by engine/. */
#include "util.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

int cm_err_set(cm_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->code = code;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void *cm_big_alloc(size_t bytes, size_t align, size_t *mapped) {
    *mapped = 0;
#if defined(__linux__)
    if (bytes >= CM_BIG_BYTES && bytes <= SIZE_MAX - 2 * CM_BIG_BYTES) {
        size_t whole = (bytes + CM_BIG_BYTES - 1) / CM_BIG_BYTES * CM_BIG_BYTES, span = whole + CM_BIG_BYTES;
        void *m = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return NULL;
        /* keep the 2 MiB-aligned `whole` inside the span, give the rest back */
        uintptr_t a = ((uintptr_t)m + CM_BIG_BYTES - 1) & ~(uintptr_t)(CM_BIG_BYTES - 1);
        size_t head = a - (uintptr_t)m, tail = span - head - whole;
        if (head) munmap(m, head);
        if (tail) munmap((char *)a + whole, tail);
#if defined(MADV_HUGEPAGE)
        (void)madvise((void *)a, whole, MADV_HUGEPAGE); /* advice only */
#endif
        *mapped = whole;
        return (void *)a;
    }
#endif
    return aligned_alloc(align, (bytes + align - 1) & ~(align - 1));
}

void cm_big_free(void *p, size_t mapped) {
#if defined(__linux__)
    if (p && mapped) {
        munmap(p, mapped);
        return;
    }
#endif
    free(p);
}
