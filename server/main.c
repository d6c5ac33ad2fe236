/*
 * main.c - the `codemoe` binary: `codemoe <subcommand> [flags]` dispatches to cmd_<subcommand>()
 * (server/commands.h). Exit status: 0 success, 1 runtime error, 2 usage error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codemoe.h"
#include "commands.h"

/* the version is project(version:) in meson.build, passed by server/meson.build */
#ifndef CM_VERSION
#error "CM_VERSION is not defined (build with meson)"
#endif

typedef struct cm_command {
    const char *name;
    int (*fn)(int, char **);
} cm_command;

static void usage(FILE *f) {
    fprintf(f,
        "codemoe " CM_VERSION " - a code-completion LLM inference engine and server\n"
        "\n"
        "usage: codemoe <command> [flags]    (codemoe <command> --help for its flags)\n"
        "\n"
        "commands:\n"
        "  serve      run the OpenAI-compatible HTTP server\n"
        "  complete   complete a prompt from the command line (streams text to stdout)\n"
        "  tokenize   print the token ids (or id/piece pairs) of a text\n"
        "  inspect    print a GGUF file's metadata, tensors and a summary\n"
        "  bench      measure prefill and decode speed\n"
        "  convert    convert a Hugging Face model directory to GGUF\n"
        "  upcycle    turn a dense GGUF into a hybrid MoE or MoLE GGUF\n"
        "  quantize   quantise a GGUF to a llama-quantize preset (Q4_K_M, Q8_0, ...)\n"
        "\n"
        "  --help, -h      this text\n"
        "  --version, -V   print the version\n");
}

/* OpenBLAS chooses its kernels when it loads, from OPENBLAS_CORETYPE or its own detection. Stock
 * Debian detects AVX-512 CPUs fine (Cooperlake/SkylakeX kernels); an environment that forces an AVX2
 * family on such a CPU (this project's build machine sets OPENBLAS_CORETYPE=Haswell globally) costs
 * ~30% of prefill speed, so the long-running commands say so once. */
static void blas_note(const char *cmd) {
    if (strcmp(cmd, "serve") && strcmp(cmd, "bench")) return;
    const char *better = cm_blas_better_core();
    if (better)
        fprintf(stderr, "codemoe: note: OpenBLAS runs its %s kernels on an AVX-512 CPU%s; prefill is faster with "
                "OPENBLAS_CORETYPE unset or set to %s\n", cm_blas_core(),
                getenv("OPENBLAS_CORETYPE") ? " (OPENBLAS_CORETYPE is set)" : "", better);
}

int main(int argc, char **argv) {
    const cm_command cmds[] = {
        {"serve", cmd_serve},
        {"complete", cmd_complete},
        {"tokenize", cmd_tokenize},
        {"inspect", cmd_inspect},
        {"bench", cmd_bench},
        {"convert", cmd_convert},
        {"upcycle", cmd_upcycle},
        {"quantize", cmd_quantize},
    };
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V") || !strcmp(cmd, "version")) {
        printf("codemoe %s (kernels: %s, OpenBLAS kernels: %s)\n", CM_VERSION, cm_kernels_isa(), cm_blas_core());
        return 0;
    }
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        if (strcmp(cmd, cmds[i].name) != 0) continue;
        blas_note(cmd);
        return cmds[i].fn(argc - 1, argv + 1);
    }
    fprintf(stderr, "codemoe: unknown command '%s' (try 'codemoe --help')\n", cmd);
    return 2;
}
