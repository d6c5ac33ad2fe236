/*
 * cmd_convert.c - `codemoe convert HF_DIR OUT.gguf [--type f32|f16|bf16|q8_0]`: Hugging Face directory to
 * GGUF (modelfile/convert.c does the work). Without --type each matrix keeps its source type.
 */
#include <stdio.h>
#include <string.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "commands.h"

static int usage(void) {
    fprintf(stderr,
            "usage: codemoe convert HF_DIR OUT.gguf [--type f32|f16|bf16|q8_0]\n"
            "  HF_DIR holds config.json, model.safetensors (or model.safetensors.index.json and its shards)\n"
            "  and tokenizer.json; with tokenizer.json only, a vocab-only GGUF is written.\n");
    return 2;
}

int cmd_convert(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL}, *type = NULL;
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--type") || !strcmp(argv[i], "-t")) {
            if (++i >= argc) return usage();
            type = argv[i];
        } else if (!strncmp(argv[i], "--type=", 7)) {
            type = argv[i] + 7;
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage();
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "codemoe convert: unknown option %s\n", argv[i]);
            return usage();
        } else if (npos < 2) {
            pos[npos++] = argv[i];
        } else {
            return usage();
        }
    }
    if (npos != 2) return usage();
    if (type && strcmp(type, "f32") && strcmp(type, "f16") && strcmp(type, "bf16") && strcmp(type, "q8_0")) {
        fprintf(stderr, "codemoe convert: --type must be f32, f16, bf16 or q8_0 (got \"%s\")\n", type);
        return 2;
    }
    cm_err err = {0};
    int rc = cm_convert_hf(pos[0], pos[1], type, &err);
    if (rc != CM_OK) {
        fprintf(stderr, "codemoe: %s\n", err.msg);
        return 1;
    }
    fprintf(stderr, "wrote %s\n", pos[1]);
    return 0;
}
