/*
 * cmd_inspect.c - `codemoe inspect FILE`: what is in a GGUF file: every metadata key, every tensor
 * (name, type, shape, offset, bytes) and a summary of the model.
 *
 * A full load validates tensors against the architecture; when that fails (a vocab-only file, an
 * architecture this build does not run) the file is opened again tokenizer-only so its metadata and
 * tensor table can still be read, and the reason is printed.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "codemoe.h"
#include "commands.h"

typedef struct inspect_state {
    int n_kv, n_tensors;
    uint64_t n_elems, n_bytes;
    int pass; /* 0: count, 1: print metadata, 2: print tensors */
} inspect_state;

static void inspect_kv(void *ud, const char *key, const char *type, const char *value) {
    inspect_state *st = ud;
    if (st->pass == 0) st->n_kv++;
    if (st->pass != 1) return;
    printf("  %-44s %-8s %s\n", key, type, value);
}

static void inspect_tensor(void *ud, const char *name, const char *type, int n_dims, const int64_t *dims,
                           uint64_t offset, uint64_t nbytes) {
    inspect_state *st = ud;
    if (st->pass == 0) {
        uint64_t ne = 1;
        for (int i = 0; i < n_dims; i++) ne *= (uint64_t)(dims[i] > 0 ? dims[i] : 0);
        st->n_tensors++;
        st->n_elems += ne;
        st->n_bytes += nbytes;
        return;
    }
    if (st->pass != 2) return;
    char shape[128];
    int o = snprintf(shape, sizeof shape, "[");
    for (int i = 0; i < n_dims && o > 0 && (size_t)o < sizeof shape; i++)
        o += snprintf(shape + o, sizeof shape - (size_t)o, i ? ", %" PRId64 : "%" PRId64, dims[i]);
    if (o > 0 && (size_t)o < sizeof shape) snprintf(shape + o, sizeof shape - (size_t)o, "]");
    printf("  %-36s %-6s %-20s %12" PRIu64 " %12" PRIu64 "\n", name, type, shape, offset, nbytes);
}

/* 1234567 -> "1.23M" */
static const char *human(uint64_t v, char *buf, size_t cap) {
    if (v >= 1000000000ull) snprintf(buf, cap, "%.2fB", v / 1e9);
    else if (v >= 1000000ull) snprintf(buf, cap, "%.2fM", v / 1e6);
    else if (v >= 1000ull) snprintf(buf, cap, "%.2fK", v / 1e3);
    else snprintf(buf, cap, "%" PRIu64, v);
    return buf;
}

static void inspect_usage(FILE *f) {
    fprintf(f, "usage: codemoe inspect FILE.gguf\n"
               "  prints metadata (key, type, value), tensors (name, type, shape, offset, bytes) and a summary;\n"
               "  works on vocab-only files too\n");
}

int cmd_inspect(int argc, char **argv) {
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            inspect_usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "codemoe inspect: unknown flag '%s'\n", argv[i]);
            inspect_usage(stderr);
            return 2;
        } else if (path) {
            fprintf(stderr, "codemoe inspect: one file at a time\n");
            return 2;
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        inspect_usage(stderr);
        return 2;
    }

    cm_err err = {0}, err_full = {0};
    cm_model_params mp = {.n_threads = 1, .vocab_only = 0};
    cm_model *m = cm_model_load(path, &mp, &err_full);
    int vocab_only = 0;
    if (!m) {
        mp.vocab_only = 1;
        m = cm_model_load(path, &mp, &err);
        if (!m) {
            fprintf(stderr, "codemoe inspect: %s: %s\n", path, err_full.msg);
            return 1;
        }
        vocab_only = 1;
    }

    inspect_state st = {0};
    cm_model_foreach(m, inspect_kv, inspect_tensor, &st);
    printf("file: %s\n", path);
    printf("metadata: %d keys\n", st.n_kv);
    st.pass = 1;
    cm_model_foreach(m, inspect_kv, inspect_tensor, &st);
    printf("tensors: %d\n", st.n_tensors);
    if (st.n_tensors)
        printf("  %-36s %-6s %-20s %12s %12s\n", "name", "type", "shape", "offset", "bytes");
    st.pass = 2;
    cm_model_foreach(m, inspect_kv, inspect_tensor, &st);

    const cm_model_info *in = cm_model_get_info(m);
    char b1[32], b2[32], b3[32];
    printf("summary:\n");
    printf("  arch          %s%s\n", in->arch && in->arch[0] ? in->arch : "(none)",
           vocab_only ? "  (tokenizer only)" : "");
    if (vocab_only && st.n_tensors == 0) printf("  contents      vocabulary only (no tensors)\n");
    else if (vocab_only) printf("  not loadable  %s\n", err_full.msg);
    if (in->name && in->name[0]) printf("  name          %s\n", in->name);
    printf("  params        %s (%" PRIu64 ")\n", human(st.n_elems, b1, sizeof b1), st.n_elems);
    printf("  tensor bytes  %s\n", human(st.n_bytes, b2, sizeof b2));
    if (in->file_bytes) printf("  file bytes    %s\n", human(in->file_bytes, b3, sizeof b3));
    if (!vocab_only) {
        printf("  weight type   %s\n", in->weight_type ? in->weight_type : "?");
        printf("  layers %d, embd %d, ff %d, heads %d, kv heads %d, head dim %d, ctx %d\n", in->n_layer,
               in->n_embd, in->n_ff, in->n_head, in->n_head_kv, in->head_dim, in->n_ctx_train);
        printf("  rope theta %g (%s), rms eps %g, qkv bias %s, output %s\n", in->rope_theta,
               in->rope_neox ? "neox" : "normal", in->rms_eps, in->qkv_bias ? "yes" : "no",
               in->tied_output ? "tied to token_embd" : "separate");
        if (in->rope_scaling == CM_ROPE_SCALING_LINEAR)
            printf("  rope scaling  linear, factor %g, attn factor %g\n", in->rope_factor, in->rope_attn_factor);
        else if (in->rope_scaling == CM_ROPE_SCALING_YARN)
            printf("  rope scaling  yarn, factor %g, original ctx %d, attn factor %g, beta fast %g, slow %g\n",
                   in->rope_factor, in->rope_orig_ctx, in->rope_attn_factor, in->rope_beta_fast, in->rope_beta_slow);
        else
            printf("  rope scaling  none\n");
        if (in->rope_freqs) printf("  rope freqs    per-pair factors from rope_freqs.weight (Llama 3.1 scaling)\n");
    }
    printf("  vocab         %d (%s / %s)\n", in->n_vocab, in->tok_model ? in->tok_model : "?",
           in->tok_pre ? in->tok_pre : "?");
    printf("  special       bos %d, eos %d, eot %d, pad %d, add_bos %d\n", (int)in->bos, (int)in->eos,
           (int)in->eot, (int)in->pad, in->add_bos);
    if (in->fim_pre >= 0 && in->fim_suf >= 0 && in->fim_mid >= 0)
        printf("  fim           prefix %d, suffix %d, middle %d\n", (int)in->fim_pre, (int)in->fim_suf,
               (int)in->fim_mid);
    else
        printf("  fim           none\n");
    int rc = fflush(stdout) ? 1 : 0;
    cm_model_free(m);
    return rc;
}
