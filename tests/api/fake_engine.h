/*
 * fake_engine.h - a stand-in for the few engine entry points api/ calls (model info, tokenize,
 * detokenize, token bytes, sampling defaults), so the api unit tests pin exact token ids without a
 * model file, and the mixture-of-experts queries (shape, MoLE adapter names) answered from the options.
 * Vocabulary: ids 0..255 are the raw bytes; 256 "<|endoftext|>" (EOS), 257 "<|fim_prefix|>",
 * 258 "<|fim_middle|>", 259 "<|fim_suffix|>", 260 "<s>" (BOS), 261 " world", 262 "x\xc3" (a character
 * cut by the token's end), 263..299 "tokN".
 * Tokenization is one byte per token; control strings are recognised only with CM_TOK_PARSE_SPECIAL.
 * EOS is the only end-of-generation id. The streaming detokenizer holds back a character split across
 * byte tokens until it completes, as the engine's does.
 * Languages: adapter names match exactly (no aliases); a request's language is the explicit one or none
 * (no fence reading, no detection: the engine's test_lang covers those).
 */
#ifndef FAKE_ENGINE_H
#define FAKE_ENGINE_H

#include "codemoe.h"

enum { FAKE_EOS = 256, FAKE_FIM_PRE = 257, FAKE_FIM_MID = 258, FAKE_FIM_SUF = 259, FAKE_BOS = 260,
       FAKE_WORLD = 261, FAKE_CUT = 262, FAKE_VOCAB = 300 };

typedef struct fake_model_opts {
    int fim;      /* has FIM ids */
    int bos;      /* has a BOS token */
    int add_bos;  /* tokenizer.ggml.add_bos_token */
    int eos;      /* has an EOS token */
    const cm_moe_info *moe;       /* NULL: dense */
    const char *const *adapters;  /* (moe->n_adapters) MoLE adapter names, borrowed */
    const char *chat_template;    /* tokenizer.chat_template, borrowed; NULL: none */
} fake_model_opts;

cm_model *fake_model_create(const fake_model_opts *o, const char *name);
void fake_model_free(cm_model *m);

#endif
