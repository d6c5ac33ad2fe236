/*
 * gemm_rows.c - where the int8 GEMM overtakes the matvec kernels: times cm_matvec_rows, cm_gemm_q and
 * cm_gemm_q_packed (the matrix repacked once, as the output head is) on random weights of one type and
 * shape, for 1 to 16 activation rows, on the kernel family the process picks (CODEMOE_ISA=... forces
 * one). Best of 5 passes over all rows, one thread; the weights are in cache when they fit it.
 *
 *   cc -O2 -Iengine -Iengine/include bench/gemm_rows.c build/engine/libcodemoe_engine.a \
 *      build/engine/libcodemoe_kernels_*.a -lopenblas -lm -lpthread -o build/gemm_rows
 *   build/gemm_rows TYPE K M [N]    (TYPE: the GGUF type number, e.g. 8 for Q8_0, 12 for Q4_K)
 *
 * With N, the int8 GEMM alone with N rows instead (a prefill's), in GMAC/s.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf.h"
#include "kernels.h"
#include "quants.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: gemm_rows TYPE K M [N]\n");
        return 2;
    }
    int wt = atoi(argv[1]), big = argc == 5 ? atoi(argv[4]) : 0;
    int64_t k = atoll(argv[2]), m = atoll(argv[3]);
    const int nx = big > 16 ? big : 16;
    int xt = cm_quant_vec_dot_type(wt);
    if (xt < 0 || k <= 0 || m <= 0 || k % cm_quant_block_values(wt)) {
        fprintf(stderr, "gemm_rows: not an int8 weight type, or K not a multiple of its block\n");
        return 2;
    }
    size_t rb = gguf_row_bytes(wt, k), xs = cm_vec_row_bytes(xt, k);
    char *w = malloc(rb * (size_t)m), *xv = malloc(xs * (size_t)nx);
    float *x = malloc(sizeof(float) * (size_t)k * (size_t)nx), *y = malloc(sizeof(float) * (size_t)m * (size_t)nx);
    size_t sb = cm_gemm_q_scratch_bytes(k) * 4;
    void *scratch = malloc(sb);
    if (!w || !xv || !x || !y || !scratch) return 1;
    /* random bytes, every block's fp16 scales then set to ordinary values (random ones would be NaN or
     * subnormal now and then) */
    srand(1);
    for (size_t i = 0; i < rb * (size_t)m; i++) w[i] = (char)rand();
    size_t bb = gguf_row_bytes(wt, cm_quant_block_values(wt)), nblk = rb * (size_t)m / bb;
    for (size_t b = 0; b < nblk; b++) {
        char *blk = w + b * bb;
        uint16_t d = (uint16_t)(0x2000 + rand() % 0x400), *s[2] = {NULL, NULL};
        switch (wt) {
        case GGUF_TT_Q8_0: s[0] = &((cm_block_q8_0 *)(void *)blk)->d; break;
        case GGUF_TT_Q4_0: s[0] = &((cm_block_q4_0 *)(void *)blk)->d; break;
        case GGUF_TT_Q5_0: s[0] = &((cm_block_q5_0 *)(void *)blk)->d; break;
        case GGUF_TT_Q4_1: s[0] = &((cm_block_q4_1 *)(void *)blk)->d, s[1] = &((cm_block_q4_1 *)(void *)blk)->m; break;
        case GGUF_TT_Q5_1: s[0] = &((cm_block_q5_1 *)(void *)blk)->d, s[1] = &((cm_block_q5_1 *)(void *)blk)->m; break;
        case GGUF_TT_Q2_K: s[0] = &((cm_block_q2_k *)(void *)blk)->d, s[1] = &((cm_block_q2_k *)(void *)blk)->dmin; break;
        case GGUF_TT_Q3_K: s[0] = &((cm_block_q3_k *)(void *)blk)->d; break;
        case GGUF_TT_Q4_K: s[0] = &((cm_block_q4_k *)(void *)blk)->d, s[1] = &((cm_block_q4_k *)(void *)blk)->dmin; break;
        case GGUF_TT_Q5_K: s[0] = &((cm_block_q5_k *)(void *)blk)->d, s[1] = &((cm_block_q5_k *)(void *)blk)->dmin; break;
        case GGUF_TT_Q6_K: s[0] = &((cm_block_q6_k *)(void *)blk)->d; break;
        }
        for (int i = 0; i < 2; i++)
            if (s[i]) memcpy(s[i], &d, sizeof d);
    }
    for (int64_t i = 0; i < k * nx; i++) x[i] = (float)(rand() % 2001 - 1000) / 1000.0f;
    for (int j = 0; j < nx; j++) cm_vec_prepare(xt, x + (size_t)j * k, xv + (size_t)j * xs, k);
    if (big > 0) {
        double best = 1e9;
        for (int rep = 0; rep < 20; rep++) {
            double t0 = now();
            cm_gemm_q(wt, w, k, xv, xs, big, y, m, 0, m, scratch, sb);
            double t = now() - t0;
            if (t < best) best = t;
        }
        printf("%s K %lld M %lld N %d, family %s: %.3f ms, %.1f GMAC/s\n", gguf_ttype_name(wt), (long long)k,
               (long long)m, big, cm_kernels_isa(), best * 1e3, (double)k * (double)m * big / best / 1e9);
        return 0;
    }
    cm_gemm_pack *pk = cm_gemm_q_pack(wt, w, k, m, 0);
    printf("%s K %lld M %lld, family %s; packed %.1f MB (the matrix %.1f MB)\n", gguf_ttype_name(wt), (long long)k,
           (long long)m, cm_kernels_isa(), cm_gemm_pack_bytes(pk) / 1e6, (double)rb * (double)m / 1e6);
    printf("| rows | matvec ms | GEMM ms | packed GEMM ms |\n|--:|--:|--:|--:|\n");
    static const int ns[] = {1, 2, 3, 4, 6, 8, 10, 12, 14, 16};
    for (size_t a = 0; a < sizeof ns / sizeof *ns; a++) {
        int n = ns[a];
        double best[3] = {1e9, 1e9, 1e9};
        for (int rep = 0; rep < 5; rep++)
            for (int how = 0; how < 3; how++) {
                if (how == 2 && !pk) continue;
                double t0 = now();
                for (int64_t r0 = 0; r0 < m; r0 += 256) { /* in pool-task-sized slices, as forward.c runs them */
                    int64_t r1 = r0 + 256 < m ? r0 + 256 : m;
                    if (how == 0) cm_matvec_rows(wt, xt, w, k, xv, xs, n, y, m, r0, r1);
                    else if (how == 1) cm_gemm_q(wt, w, k, xv, xs, n, y, m, r0, r1, scratch, sb);
                    else cm_gemm_q_packed(pk, xv, xs, n, y, m, r0, r1, scratch, sb);
                }
                double t = now() - t0;
                if (t < best[how]) best[how] = t;
            }
        if (pk) printf("| %d | %.2f | %.2f | %.2f |\n", n, best[0] * 1e3, best[1] * 1e3, best[2] * 1e3);
        else printf("| %d | %.2f | %.2f | - |\n", n, best[0] * 1e3, best[1] * 1e3);
    }
    cm_gemm_pack_free(pk);
    free(w), free(xv), free(x), free(y), free(scratch);
    return 0;
}
