/*
 * util.h - small helpers shared inside engine/: error reporting, checked arithmetic, fp16/bf16.
 */
#ifndef CM_UTIL_H
#define CM_UTIL_H

#include <stdint.h>
#include <string.h>
#include "codemoe.h"

#if defined(__GNUC__)
#define CM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define CM_PRINTF(a, b)
#endif

/* A large buffer that lives as long as its owner (the KV pool, a packed weight matrix). On Linux one of
 * CM_BIG_BYTES or more is its own anonymous mapping, aligned to 2 MiB, with transparent huge pages asked
 * for where the kernel has them on request (madvise): the TLB then covers 2 MiB per entry where a
 * stream over it would miss every 4 KiB, and freeing it returns it to the system. A smaller one comes
 * from aligned_alloc (align: a power of two, at least sizeof(void *)). Not zeroed. *mapped is the
 * mapping's size (0: from the allocator); cm_big_free takes it back. NULL when there is no memory. */
#define CM_BIG_BYTES ((size_t)2 << 20)
void *cm_big_alloc(size_t bytes, size_t align, size_t *mapped);
void cm_big_free(void *p, size_t mapped);

/* Sets err (if not NULL) and returns code, so that `return cm_err_set(err, CM_E_FORMAT, "...")` reads well. */
int cm_err_set(cm_err *err, int code, const char *fmt, ...) CM_PRINTF(3, 4);

/* Checked a*b and a+b on uint64: return 0 on overflow, 1 otherwise. */
static inline int cm_mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline int cm_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

static inline float cm_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest even. */
static inline uint16_t cm_f32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t e = (x >> 23) & 0xff, m = x & 0x7fffff;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0));
    int32_t ne = (int32_t)e - 127 + 15;
    if (ne >= 31) return (uint16_t)(sign | 0x7c00);
    if (ne <= 0) {
        if (ne < -10) return (uint16_t)sign;
        m |= 0x800000;
        uint32_t shift = (uint32_t)(14 - ne);
        uint32_t hm = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (hm & 1))) hm++;
        return (uint16_t)(sign | hm);
    }
    uint32_t hm = m >> 13, rem = m & 0x1fff;
    uint32_t h = sign | ((uint32_t)ne << 10) | hm;
    if (rem > 0x1000 || (rem == 0x1000 && (hm & 1))) h++;
    return (uint16_t)h;
}

static inline float cm_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t cm_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

#endif
