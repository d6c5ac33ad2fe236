/*
 * cmd_upcycle.c - `codemoe upcycle DENSE.gguf OUT.gguf [flags]`: a dense qwen2/llama model to a hybrid
 * MoE ("multipl_moe", every expert a copy of the dense FFN) or, with --mole, to a MoLE model with
 * zero-initialised LoRA adapters. modelfile/upcycle.c does the work.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "commands.h"

static int usage(FILE *f) {
    fprintf(f,
            "usage: codemoe upcycle DENSE.gguf OUT.gguf [flags]\n"
            "hybrid MoE (multipl_moe):\n"
            "  --experts N          token experts (6)\n"
            "  --top-k K            experts per token, the shared one included (2)\n"
            "  --shared I           shared expert index, -1 none (default: the last)\n"
            "  --segment-experts N  segment experts, 0: no segment level (6)\n"
            "  --window W           tokens per segment (64)\n"
            "  --pooling max|mean   window descriptor (max)\n"
            "  --capacity C         segment capacity (1.0)\n"
            "  --bucket B           experts one segment may be taken by, reference mode (4)\n"
            "  --gate-scale S       segment gate scale (1/window)\n"
            "  --fusion A_TOK,A_SEG fusion weights (0.7,0.3; 1,0 reproduces the dense model)\n"
            "  --mode causal|reference  default segment mode (causal)\n"
            "  --router-init zeros|noise  router weights (zeros)\n"
            "  --router-std S       noise deviation (0.02)\n"
            "  --seed N             noise seed (1)\n"
            "MoLE (mole):\n"
            "  --mole LANGS         comma-separated languages; shared and other adapters are added\n"
            "  --rank-lang R, --rank-shared R, --rank-other R      (16, 48, 64)\n"
            "  --alpha-lang A, --alpha-shared A, --alpha-other A   (16, 32, 32)\n");
    return 2;
}

static int num(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) return -1;
    *out = v;
    return 0;
}

int cmd_upcycle(int argc, char **argv) {
    cm_upcycle_params p;
    cm_upcycle_default(&p);
    const char *pos[2] = {NULL, NULL};
    int npos = 0, noise = 0;
    float std = 0.02f;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (a[0] != '-' || !a[1]) {
            if (npos == 2) return usage(stderr);
            pos[npos++] = a;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "codemoe upcycle: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        double x = 0;
        int bad = 0;
#define INT_OPT(flag, field, lo, hi) \
        else if (!strcmp(a, flag)) { bad = num(v, lo, hi, &x); p.field = (int)x; }
#define FLT_OPT(flag, field, lo, hi) \
        else if (!strcmp(a, flag)) { bad = num(v, lo, hi, &x); p.field = (float)x; }
        if (0) {}
        INT_OPT("--experts", n_experts, 1, 64)
        INT_OPT("--top-k", top_k, 1, 64)
        INT_OPT("--shared", shared, -1, 63)
        INT_OPT("--segment-experts", n_seg_experts, 0, 64)
        INT_OPT("--window", window, 1, 1 << 20)
        INT_OPT("--bucket", bucket, 1, 64)
        FLT_OPT("--capacity", capacity, 1e-6, 1e6)
        FLT_OPT("--gate-scale", gate_scale, -1e6, 1e6)
        INT_OPT("--rank-lang", rank_lang, 1, 8192)
        INT_OPT("--rank-shared", rank_shared, 1, 8192)
        INT_OPT("--rank-other", rank_other, 1, 8192)
        FLT_OPT("--alpha-lang", alpha_lang, -1e6, 1e6)
        FLT_OPT("--alpha-shared", alpha_shared, -1e6, 1e6)
        FLT_OPT("--alpha-other", alpha_other, -1e6, 1e6)
        else if (!strcmp(a, "--pooling")) p.pooling = v;
        else if (!strcmp(a, "--mode")) p.mode_default = v;
        else if (!strcmp(a, "--mole")) p.mole_langs = v;
        else if (!strcmp(a, "--router-init")) {
            bad = strcmp(v, "zeros") && strcmp(v, "noise");
            noise = !strcmp(v, "noise");
        } else if (!strcmp(a, "--router-std")) {
            bad = num(v, 1e-9, 1e3, &x);
            std = (float)x;
        } else if (!strcmp(a, "--seed")) {
            bad = num(v, 0, 1e18, &x);
            p.seed = (uint64_t)x;
        } else if (!strcmp(a, "--fusion")) {
            char *comma = strchr(v, ',');
            double t = 0, s = 0;
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%.*s", comma ? (int)(comma - v) : 0, v);
            bad = !comma || num(tmp, -1e6, 1e6, &t) || num(comma + 1, -1e6, 1e6, &s);
            p.a_tok = (float)t;
            p.a_seg = (float)s;
        } else {
            fprintf(stderr, "codemoe upcycle: unknown option %s\n", a);
            return usage(stderr);
        }
#undef INT_OPT
#undef FLT_OPT
        if (bad) {
            fprintf(stderr, "codemoe upcycle: bad value for %s: %s\n", a, v);
            return 2;
        }
    }
    if (npos != 2) return usage(stderr);
    p.router_std = noise ? std : 0.0f;
    cm_err err = {0};
    if (cm_upcycle(pos[0], pos[1], &p, &err) < 0) {
        fprintf(stderr, "codemoe upcycle: %s\n", err.msg);
        return err.code == CM_E_INVAL ? 2 : 1;
    }
    fprintf(stderr, "codemoe upcycle: wrote %s (%s)\n", pos[1], p.mole_langs ? "mole" : "multipl_moe");
    return 0;
}
