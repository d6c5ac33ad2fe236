/*
 * tokenizer.h - byte-level BPE tokenizer built from GGUF metadata (tokenizer.ggml.*). Internal to engine/;
 * the public entry points are cm_tokenize / cm_token_* / cm_detok_* in codemoe.h.
 */
#ifndef CM_TOKENIZER_H
#define CM_TOKENIZER_H

#include "codemoe.h"
#include "gguf.h"

typedef struct cm_tokenizer cm_tokenizer;

/* Builds the tokenizer from the file's tokenizer.ggml.* keys. Fills the tokenizer fields of info
 * (tok_model, tok_pre, bos/eos/eot/pad, fim_*, add_bos, n_vocab). Returns NULL with err set when the
 * metadata is missing, inconsistent or hostile. The tokenizer copies what it needs: it does not keep
 * pointers into g after return except string views documented in tokenizer.c. */
cm_tokenizer *cm_tokenizer_load(const gguf_file *g, cm_model_info *info, cm_err *err);
void cm_tokenizer_free(cm_tokenizer *t);

#endif
