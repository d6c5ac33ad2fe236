/*
 * cmd_quantize.c - `codemoe quantize IN.gguf OUT.gguf TYPE [--allow-requantize]`: a GGUF model to one of
 * llama-quantize's presets, byte-identical to llama-quantize's output (modelfile/quantize.c does the
 * work).
 */
#include <stdio.h>
#include <string.h>

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "commands.h"

static int usage(void) {
    fprintf(stderr,
            "usage: codemoe quantize IN.gguf OUT.gguf TYPE [--allow-requantize]\n"
            "  TYPE: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K\n"
            "        (llama-quantize's presets, case-insensitive; Q3_K, Q4_K, Q5_K mean the _M ones)\n"
            "  The output is the file llama-quantize writes for the same input without an importance matrix.\n"
            "  --allow-requantize  quantise tensors that are already quantised (refused otherwise)\n");
    return 2;
}

int cmd_quantize(int argc, char **argv) {
    const char *pos[3] = {NULL, NULL, NULL};
    int npos = 0;
    cm_quantize_params p;
    cm_quantize_default(&p);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--allow-requantize")) {
            p.allow_requantize = 1;
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage();
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "codemoe quantize: unknown option %s\n", argv[i]);
            return usage();
        } else if (npos < 3) {
            pos[npos++] = argv[i];
        } else {
            return usage();
        }
    }
    if (npos != 3) return usage();
    p.preset = pos[2];
    cm_err err = {0};
    int rc = cm_quantize(pos[0], pos[1], &p, &err);
    if (rc != CM_OK) {
        fprintf(stderr, "codemoe: %s\n", err.msg);
        return rc == CM_E_INVAL ? 2 : 1;
    }
    fprintf(stderr, "wrote %s\n", pos[1]);
    return 0;
}
