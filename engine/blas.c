/*
 * blas.c - which OpenBLAS kernels this process runs, and whether the CPU has better ones.
 *
 * OpenBLAS (Debian: 0.3.21, DYNAMIC_ARCH) picks its kernel family once, when the library loads: from
 * OPENBLAS_CORETYPE if set, else by CPU detection (Cooperlake on a Zen 5 CPU). An environment
 * that forces an AVX2 family on an AVX-512 CPU makes prefill ~30% slower (pp256 Q8_0, 1 thread: 3338
 * tokens/s with Haswell, 4774 with the detected Cooperlake; docs/engine.md). The engine cannot change
 * the family after load; server/main.c reports the case.
 */
#include <cblas.h>
#include <string.h>
#include <strings.h>

#include "codemoe.h"

const char *cm_blas_core(void) {
    const char *c = openblas_get_corename();
    return c ? c : "unknown";
}

const char *cm_blas_better_core(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512vl")))
        return NULL;
    /* families that already use AVX-512, or that we do not know to be lesser: leave them */
    static const char *avx2_only[] = {"Haswell", "Zen", "SandyBridge", "Prescott", "Nehalem", "Core2"};
    const char *cur = cm_blas_core();
    for (size_t i = 0; i < sizeof avx2_only / sizeof *avx2_only; i++)
        if (!strcasecmp(cur, avx2_only[i])) return "SkylakeX";
#endif
    return NULL;
}
