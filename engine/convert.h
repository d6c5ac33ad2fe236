/*
 * convert.h - internals shared by the Hugging Face -> GGUF converter (convert.c) and the tokenizer part
 * of it (convert_tokenizer.c). Internal to engine/; the public entry point is cm_convert_hf in codemoe.h.
 */
#ifndef CM_CONVERT_H
#define CM_CONVERT_H

#include "codemoe.h"
#include "gguf.h"

/* Writer extras (gguf_writer.c) not in gguf.h's public-to-engine contract:
 * gguf_writer_add_tensor_ref is gguf_writer_add_tensor without the copy: data must stay valid and
 * unchanged until gguf_writer_write returns (the converter passes views into mmapped safetensors).
 * Conversion (F32/F16/BF16 -> F32/F16/BF16/Q8_0) happens row by row while writing. */
int gguf_writer_add_tensor_ref(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                               int src_type, const void *data, cm_err *err);
/* ggml's reference Q8_0 quantiser: x (n), n % 32 == 0 -> y (n/32 blocks of fp16 d + 32 int8). */
void gguf_quantize_q8_0(const float *x, uint8_t *y, int64_t n);

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

#endif
