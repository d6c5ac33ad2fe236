/*
 * cmd_tokenize.c - `codemoe tokenize`: the token ids of a text, as the server would see them.
 * Loads the tokenizer only (vocab_only), so it works on vocab-only GGUF files and costs no weights.
 *
 *   ids on one line, space-separated; with --pieces one line per token: id <TAB> piece, the piece being
 *   the token's bytes as a JSON string (see cli_json_string for bytes that are not valid UTF-8).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "codemoe.h"
#include "commands.h"

#define TOKENIZE_MAX_BYTES (64u << 20)

static void tokenize_usage(FILE *f) {
    fprintf(f,
        "usage: codemoe tokenize --model M (--prompt S | --file F) [--pieces] [--special] [--no-bos]\n"
        "  --model M    GGUF file (a vocab-only file is enough)\n"
        "  --prompt S   text to tokenize\n"
        "  --file F     read the text from a file ('-' for stdin)\n"
        "  --pieces     one line per token: id<TAB>piece (piece as a JSON string)\n"
        "  --special    recognise special-token strings (<|endoftext|>, <|fim_prefix|>, ...) in the text\n"
        "  --no-bos     never prepend BOS (by default it is, when the model asks for it)\n");
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *file = NULL, *v = NULL;
    int pieces = 0, special = 0, bos = 1;
    for (int i = 1; i < argc; i++) {
        int r;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            tokenize_usage(stdout);
            return 0;
        } else if ((r = cli_flag(argc, argv, &i, "--model", &v))) {
            if (r < 0) goto missing;
            model = v;
        } else if ((r = cli_flag(argc, argv, &i, "--prompt", &v))) {
            if (r < 0) goto missing;
            prompt = v;
        } else if ((r = cli_flag(argc, argv, &i, "--file", &v))) {
            if (r < 0) goto missing;
            file = v;
        } else if (cli_flag(argc, argv, &i, "--pieces", NULL)) {
            pieces = 1;
        } else if (cli_flag(argc, argv, &i, "--special", NULL)) {
            special = 1;
        } else if (cli_flag(argc, argv, &i, "--no-bos", NULL)) {
            bos = 0;
        } else {
            fprintf(stderr, "codemoe tokenize: unknown flag '%s'\n", argv[i]);
            tokenize_usage(stderr);
            return 2;
        }
        continue;
    missing:
        fprintf(stderr, "codemoe tokenize: %s needs a value\n", argv[i]);
        return 2;
    }
    if (!model || (!prompt == !file)) {
        fprintf(stderr, "codemoe tokenize: need --model and exactly one of --prompt / --file\n");
        tokenize_usage(stderr);
        return 2;
    }

    size_t len = 0;
    char *text = NULL;
    if (file) {
        text = cli_read_file("tokenize", !strcmp(file, "-") ? "/dev/stdin" : file, TOKENIZE_MAX_BYTES, &len);
        if (!text) return 1;
        prompt = text;
    } else {
        len = strlen(prompt);
    }

    cm_err err = {0};
    cm_model_params mp = {.n_threads = 1, .vocab_only = 1};
    cm_model *m = cm_model_load(model, &mp, &err);
    if (!m) {
        fprintf(stderr, "codemoe tokenize: %s: %s\n", model, err.msg);
        free(text);
        return 1;
    }
    int flags = (bos ? CM_TOK_ADD_BOS : 0) | (special ? CM_TOK_PARSE_SPECIAL : 0);
    int rc = 1, cap = (int)(len < 1u << 28 ? len : 1u << 28) + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n = ids ? cm_tokenize(m, prompt, len, flags, ids, cap, &err) : CM_E_NOMEM;
    if (n > cap) { /* the first guess (one token per byte, + BOS) should always be enough */
        int32_t *bigger = realloc(ids, (size_t)n * sizeof *ids);
        if (bigger) {
            ids = bigger;
            cap = n;
            n = cm_tokenize(m, prompt, len, flags, ids, cap, &err);
        } else {
            n = CM_E_NOMEM;
        }
    }
    if (n < 0) {
        fprintf(stderr, "codemoe tokenize: %s\n", n == CM_E_NOMEM && !err.msg[0] ? "out of memory" : err.msg);
        goto out;
    }
    if (pieces) {
        char buf[1024];
        for (int i = 0; i < n; i++) {
            int nb = cm_token_bytes(m, ids[i], 1, buf, sizeof buf);
            printf("%d\t", (int)ids[i]);
            cli_json_string(stdout, buf, nb < 0 ? 0 : (size_t)nb > sizeof buf ? sizeof buf : (size_t)nb);
            putchar('\n');
        }
    } else {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
        putchar('\n');
    }
    rc = fflush(stdout) ? 1 : 0;
out:
    free(ids);
    free(text);
    cm_model_free(m);
    return rc;
}
