/*
 * convert.h - internals shared by the Hugging Face -> GGUF converter (convert.c), its tokenizer part
 * (convert_tokenizer.c) and its MoLE part (convert_mole.c). Internal to modelfile/; the public entry
 * point is cm_convert_hf in codemoe_modelfile.h.
 */
#ifndef CM_CONVERT_H
#define CM_CONVERT_H

#include "codemoe.h"
#include "codemoe_modelfile.h"
#include "gguf_writer.h"

/* Reads a Hugging Face tokenizer.json (and, when tokenizer_config_path is not NULL, tokenizer_config.json
 * for add_bos_token / bos / eos / pad) and writes every tokenizer.ggml.* key to w: model, pre, tokens,
 * token_type, merges, bos/eos/eot/padding/fim_* token ids, add_bos_token.
 * n_vocab_model: the model's embedding row count. When it exceeds the tokenizer's vocabulary, the token
 * list is padded to n_vocab_model with "[PAD<i>]" tokens (type 5, unused) so that tokens and embeddings
 * line up; when it is smaller than the vocabulary, that is an error (CM_E_FORMAT). 0 for a vocab-only
 * conversion (no model; no padding).
 * Returns CM_OK or a negative CM_E* code with err set; on error w may hold some tokenizer keys already
 * (the caller discards w). */
int cm_convert_tokenizer_json(const char *tokenizer_json_path, const char *tokenizer_config_path,
                              gguf_writer *w, int n_vocab_model, cm_err *err);

/* convert_mole.c: a uw-swag/mole checkpoint directory (config.json model_type "MoE") -> "mole" GGUF;
 * out_type a GGUF type or -1 (keep the source's). convert.c hands such directories over. */
int cm_convert_is_mole(const char *config_path);
int cm_convert_mole_hf(const char *dir, const char *out_path, int out_type, cm_err *err);

#endif
