/*
 * codemoe.h - the engine's public interface.
 *
 * The engine loads a model (GGUF), tokenizes, runs the forward pass of a batch of sequences over a KV
 * cache, and samples. It knows nothing about HTTP; api/ and server/ use this header and nothing else
 * from engine/ (the build exports only engine/include/). Writing model files (conversion, upcycling)
 * is the offline library modelfile/, whose header is codemoe_modelfile.h.
 *
 * Conventions
 * - Every object has a create/free pair. free(NULL) is a no-op.
 * - Functions that can fail take a `cm_err *` (may be NULL) and return a negative CM_E* code (or NULL);
 *   on failure err->msg holds a one-line human-readable reason and no operation was performed.
 * - A cm_model is immutable after load and may be shared by any number of contexts and threads.
 *   A cm_ctx (KV cache + scratch) and a cm_sampler belong to one thread at a time.
 * - Token ids are int32_t. Lengths are in tokens unless the name says bytes.
 */
#ifndef CODEMOE_H
#define CODEMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================ errors */

enum {
    CM_OK = 0,
    CM_E_INVAL = -1,    /* bad argument */
    CM_E_IO = -2,       /* could not open/read/write a file */
    CM_E_FORMAT = -3,   /* malformed or hostile model/tokenizer file */
    CM_E_UNSUPPORTED = -4, /* well-formed but not something we support (arch, tensor type, ...) */
    CM_E_NOMEM = -5,    /* allocation failed or a budget (KV blocks, batch size) is exhausted */
    CM_E_RANGE = -6,    /* value out of range: token id, context length, sequence id */
};

typedef struct cm_err {
    int code;
    char msg[320];
} cm_err;

/* ============================================================ model */

typedef struct cm_model cm_model;

typedef struct cm_model_params {
    int n_threads;   /* threads used by load-time work (0 = 1) */
    int vocab_only;  /* load the tokenizer only; no tensors required */
} cm_model_params;

enum { CM_ROPE_SCALING_NONE = 0, CM_ROPE_SCALING_LINEAR = 1, CM_ROPE_SCALING_YARN = 2 };

typedef struct cm_model_info {
    const char *arch;        /* "qwen2", "llama", ... (owned by the model) */
    const char *name;        /* general.name or "" */
    int n_vocab;
    int n_ctx_train;         /* <arch>.context_length */
    int n_embd;              /* d */
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;            /* n_embd / n_head unless the file says otherwise */
    int n_ff;
    float rope_theta;
    float rms_eps;
    int rope_neox;           /* 1: rotate halves (qwen2), 0: rotate adjacent pairs (llama as converted) */
    /* rope scaling (<arch>.rope.scaling.*, see docs/model-format.md); NONE: factor 1, attn factor 1 */
    int rope_scaling;        /* CM_ROPE_SCALING_NONE, _LINEAR (positions / factor) or _YARN */
    float rope_factor;       /* context extension factor (>= 1) */
    int rope_orig_ctx;       /* YaRN: context length the model was trained at (correction dims) */
    float rope_attn_factor;  /* multiplies cos and sin (YaRN: on top of 0.1 ln(factor) + 1) */
    float rope_beta_fast, rope_beta_slow; /* YaRN: rotations bounding the ramp (32, 1) */
    int rope_freqs;          /* 1: rope_freqs.weight divides each pair's frequency (Llama 3.1 scaling) */
    int qkv_bias;
    int tied_output;         /* output.weight absent: lm_head = token_embd */
    uint64_t n_params;       /* total parameters */
    uint64_t file_bytes;
    const char *weight_type; /* type of the largest matrices: "F32", "F16", "BF16", "Q8_0", ... */
    /* tokenizer */
    const char *tok_model;   /* tokenizer.ggml.model, e.g. "gpt2" */
    const char *tok_pre;     /* tokenizer.ggml.pre, e.g. "qwen2", "llama-bpe", "deepseek-coder", "gpt-2" */
    int32_t bos, eos, eot, pad;          /* -1 when absent */
    int32_t fim_pre, fim_suf, fim_mid;   /* -1 when absent */
    int32_t fim_rep, fim_sep;            /* repository-level FIM: repo-name and file-separator ids
                                            (Qwen2.5-Coder's <|repo_name|>, <|file_sep|>); -1 when absent */
    int add_bos;                         /* tokenizer.ggml.add_bos_token */
} cm_model_info;

/* Load a GGUF model. The file is mmapped read-only and every count, length, offset and type is checked
 * before use. On error returns NULL with the reason in err. */
cm_model *cm_model_load(const char *path, const cm_model_params *params, cm_err *err);
void cm_model_free(cm_model *m);
const cm_model_info *cm_model_get_info(const cm_model *m);
/* How much of the model file is in memory. *mapped: the size of its read-only mapping (0 when the model
 * was not loaded from a file). *cached: the bytes of it in the page cache (mincore; shared with every
 * process that maps or read the file, and includes what the kernel read ahead). *rss: the bytes of it
 * this process has faulted in (its Rss in /proc/self/smaps; 0 where that file does not exist). The weights
 * are paged in as they are first read, so a mixture-of-experts model whose requests use few experts has
 * less resident than its file size. Costs a mincore call, a byte per page of the file and a read of
 * smaps: not for a hot path. Returns 0, or -1 when residency cannot be read (the counts then 0). */
int cm_model_residency(const cm_model *m, size_t *mapped, size_t *cached, size_t *rss);
/* Bytes of memory one decode step of one sequence reads, the numerator of decode's bandwidth bound
 * (tokens/s <= memory bandwidth / these bytes): every weight tensor the token runs through, plus K and V
 * of n_past + 1 positions (the cache before it and its own) in every layer at kv_type's element size
 * (CM_KV_F32 4 bytes, CM_KV_F16 2). Weights counted: all matrices, norms and biases of the layers, the
 * output norm and the whole output matrix (a tied model's embedding is that matrix, counted once); an
 * untied embedding counts one row. Mixture of experts: each stacked expert tensor counts the share of
 * its experts that run per token (qwen3moe and hybrid: top_k of the token experts; hybrid's segment
 * level: its causal top of the segment experts, plus its router), and MoLE's adapters the mean share of
 * the two adapters a code token runs (the shared one and its language's). A lower bound on traffic:
 * activations, scratch and cache misses on re-reads are not counted. 0 for NULL, a vocab-only model, a
 * negative n_past or an unknown kv_type. Never fails otherwise. */
uint64_t cm_model_decode_bytes(const cm_model *m, int n_past, int kv_type);
/* The model's chat template (GGUF tokenizer.chat_template, a Jinja source), borrowed from the mapped file
 * and valid while m lives; NOT NUL-terminated: *len gets its length. NULL (and *len 0) when the file has
 * none or the key is not a string. */
const char *cm_model_chat_template(const cm_model *m, size_t *len);

/* Metadata and tensor listing for `codemoe inspect`: calls fn once per key (value rendered as text,
 * arrays abbreviated) and once per tensor. */
typedef void (*cm_kv_fn)(void *ud, const char *key, const char *type, const char *value);
typedef void (*cm_tensor_fn)(void *ud, const char *name, const char *type, int n_dims,
                             const int64_t *dims, uint64_t offset, uint64_t nbytes);
void cm_model_foreach(const cm_model *m, cm_kv_fn kv, cm_tensor_fn tensor, void *ud);

/* ============================================================ tokenizer */

enum {
    CM_TOK_ADD_BOS = 1 << 0,       /* prepend BOS if the model has one and add_bos is set */
    CM_TOK_PARSE_SPECIAL = 1 << 1, /* recognise control/added token strings in the text */
};

/* Tokenize `len` bytes of UTF-8 text (invalid UTF-8 is handled bytewise, never rejected).
 * Writes at most `cap` ids to out. Returns the number of tokens the text needs (which may exceed cap:
 * call again with a larger buffer), or a negative CM_E* code. */
int cm_tokenize(const cm_model *m, const char *text, size_t len, int flags, int32_t *out, int cap,
                cm_err *err);
/* A lower bound, in O(1) after load, on the tokens cm_tokenize produces for ANY text of len bytes (with
 * or without CM_TOK_PARSE_SPECIAL; the BOS that CM_TOK_ADD_BOS adds not counted): ceil(len / the most
 * input bytes one token can stand for). Lets a caller refuse a text that cannot fit a context before
 * paying for its tokenization. 0 when len is 0 or the vocabulary gives no bound (a byte with no token
 * of its own is dropped from the output). */
size_t cm_tokenize_min_tokens(const cm_model *m, size_t len);

/* The vocabulary string of a token as stored (byte-level BPE alphabet), NULL if out of range. */
const char *cm_token_text(const cm_model *m, int32_t id, size_t *len);

/* The raw bytes a token stands for (byte-level mapping undone; a control token yields its text only
 * when `special` is nonzero, else nothing). Returns the byte count (may exceed cap), <0 if id invalid. */
int cm_token_bytes(const cm_model *m, int32_t id, int special, char *out, size_t cap);

int cm_token_is_control(const cm_model *m, int32_t id);  /* control or added special token */
int cm_token_is_eog(const cm_model *m, int32_t id);      /* EOS, EOT or another end-of-generation id */

/* Streaming detokenizer: emits only complete UTF-8 sequences; bytes of a character split across tokens
 * are held back until it completes. Invalid sequences are replaced by U+FFFD. Plain struct, no free. */
typedef struct cm_detok {
    unsigned char pend[8];
    int npend;
    int special; /* render control tokens as text */
} cm_detok;
void cm_detok_init(cm_detok *d, int special);
/* Appends the text of `id` to out (at most cap bytes). Returns bytes written, <0 on error; with
 * cap >= cm_detok_max_bytes(m) it never fails for a valid id (CM_E_RANGE otherwise, state unchanged). */
int cm_detok_push(cm_detok *d, const cm_model *m, int32_t id, char *out, size_t cap);
/* The output buffer one cm_detok_push (or flush) may need for this vocabulary: held-back bytes plus the
 * longest token, each byte possibly rendered as U+FFFD (3 bytes). */
size_t cm_detok_max_bytes(const cm_model *m);
/* End of stream: flushes held bytes (as U+FFFD). Returns bytes written. */
int cm_detok_flush(cm_detok *d, char *out, size_t cap);

/* Whole-sequence decode. Returns the byte count needed (may exceed cap), <0 on error. */
int cm_detokenize(const cm_model *m, const int32_t *ids, int n, int special, char *out, size_t cap);

/* ============================================================ inference context */

typedef struct cm_ctx cm_ctx;

/* The element type of the KV cache's K and V (cm_ctx_params.kv_type). CM_KV_F16 stores them as IEEE
 * half floats (rounded to nearest even when written; attention converts them back exactly and
 * accumulates in f32): half the memory of CM_KV_F32, so a pool of the same bytes holds twice the
 * positions, at a logit difference of ~1e-3 on the fixture models (docs/engine.md). Every guarantee
 * below (prefix reuse equals a cold run, batch invariance) holds for either type. */
enum { CM_KV_F32 = 0, CM_KV_F16 = 1 };

typedef struct cm_ctx_params {
    int n_threads;    /* compute threads for the forward pass (0 = 1) */
    int n_seq_max;    /* sequences that may be open at once */
    int n_ctx;        /* max tokens per sequence (0 = model's n_ctx_train) */
    int n_batch_max;  /* max tokens in one cm_forward call */
    int kv_tokens;    /* KV pool size in tokens shared by all sequences (0 = n_seq_max * n_ctx) */
    int prefix_cache; /* nonzero: keep KV blocks of computed prefixes for reuse (see below) */
    int kv_type;      /* CM_KV_F32 (0, the default) or CM_KV_F16; another value is CM_E_INVAL */
    int experts_resident; /* sparse (qwen3moe) and hybrid MoE models: at most this many experts of each
                             layer keep their pages of the model file (0, the default: no limit; < 0:
                             CM_E_INVAL; other models ignore it). See below. */
    int n_batch_nested; /* max tokens of a cm_forward nested in another one's yield hook (cm_batch.yield);
                           0, the default: none (a nested call is CM_E_INVAL). Dense models only: a
                           mixture-of-experts model with n_batch_nested > 0 is CM_E_INVAL. */
    int pack_output;    /* the output head kept repacked for the int8 GEMM (see below): 0, the default,
                           when it is Q8_0 or a legacy type and the copy takes at most
                           CM_PACK_OUTPUT_AUTO_MAX bytes; 1: whenever the kernel family can (K-quant heads
                           too); < 0: never */
    int pack_layers;    /* the layers' dense matrices kept repacked for the int8 GEMM (see below): 0, the
                           default, when each is Q8_0 or a legacy type and the copies take at most
                           CM_PACK_LAYERS_AUTO_MAX bytes together; 1: whenever the kernel family can;
                           < 0: never */
    int prefault_buffers; /* nonzero: the buffers a step writes (activations, attention scratch, the
                           int8 GEMM's tiles, the logits of the first n_seq_max rows) are written once at
                           cm_ctx_create, so the first steps take no page faults for them (a fresh
                           server's first burst of 16 prompts took about 5000); 0, the default: as used */
    int kv_prefault;    /* nonzero: the KV pool is made resident at cm_ctx_create (written once), so the
                           first sequences take no page faults for their KV rows and the process holds
                           the whole pool from the start (not a pool of more than half the memory
                           the system reports available: that one stays lazy); 0, the default: its
                           pages come in as first used (a short-lived context of a large n_ctx keeps
                           only what it touches) */
} cm_ctx_params;

/* The packed output head. Logits for a few rows at once (a decode step of several sequences, the ends
 * of a step's prompts) are the output head's int8 GEMM, which otherwise repacks the head's rows into its
 * tiles on every call: for a small model over a large vocabulary that repacking is most of the step's
 * head. A packed context repacks it once at cm_ctx_create (about 1.2x the bytes of a Q8_0 head,
 * 1.7-2.3x a K-quant's, on top of the file's mapping, which embedding lookups and one-row steps still
 * read) and takes it from two rows on. The logits are the same bits either way (tested). */
#define CM_PACK_OUTPUT_AUTO_MAX ((size_t)512 << 20)
/* Bytes of c's packed output head (0: none). */
size_t cm_ctx_output_pack_bytes(const cm_ctx *c);

/* The packed layers. A layer's products otherwise repack its weights into the int8 GEMM's tiles on
 * every call too, and the few rows of a decode step take the matvec: for a small model, whose layers
 * sit in the caches, both cost more than the products (a 768 x 256 Q8_0 matrix, one thread: 4 rows in
 * 2.8 us packed against 14.7 by the matvec, 8 rows in 5.4 against 13.1 repacking). A packed context
 * repacks them once (about 1.2x their bytes) and takes the GEMM from two rows on, prompts included.
 * The same bits either way (tested). */
#define CM_PACK_LAYERS_AUTO_MAX ((size_t)64 << 20)
/* Bytes of c's packed layer matrices (0: none). */
size_t cm_ctx_layers_pack_bytes(const cm_ctx *c);

/* Expert residency. Weights are read straight from the model file's read-only mapping and paged in as
 * they are first read, so a MoE model whose requests use few experts already keeps less than its file in
 * memory (cm_model_residency). With experts_resident N the context also gives memory back: it records
 * which experts of each layer run (least recently used first; the token and segment levels together), and
 * once more than N of a layer's experts are resident it releases the pages of the least recently used
 * ones (madvise MADV_DONTNEED: the process's Rss falls at once, the page cache keeps the pages until the
 * kernel reclaims them; only whole pages of the mapping inside the expert's weights; engine/moe_resident.c
 * says why not MADV_PAGEOUT or MADV_COLD). An expert that runs again is paged back in
 * by the mapping: the results are the same with and without the limit (logits identical, tested); only
 * time (page faults, perhaps disk reads) and memory differ. With routing skewed to a few experts per
 * layer, N a little above the model's top-k keeps the hot experts resident and the rest out. The context
 * starts by releasing every expert's pages. A model loaded from memory has no mapping: nothing is
 * released. The policy is per context; two contexts over one model each release what they see as cold. */

cm_ctx *cm_ctx_create(const cm_model *m, const cm_ctx_params *p, cm_err *err);
void cm_ctx_free(cm_ctx *c);

/* Open a new empty sequence. Returns its id (>= 0) or a negative CM_E* code (CM_E_NOMEM when
 * n_seq_max sequences are open). */
int cm_seq_open(cm_ctx *c, cm_err *err);
/* Close a sequence and return its KV memory to the pool. */
void cm_seq_close(cm_ctx *c, int seq);
/* Number of positions already in the sequence's KV cache. */
int cm_seq_len(const cm_ctx *c, int seq);
/* Forget positions >= n (n <= current length). */
int cm_seq_truncate(cm_ctx *c, int seq, int n, cm_err *err);

/* ------------------------------------------------------------ prefix cache and forks
 *
 * KV memory is a pool of blocks of CM_KV_BLOCK_TOKENS positions. With cm_ctx_params.prefix_cache set,
 * every FULL block a sequence computes is registered under its content: the model (the context's),
 * the tokens of the whole prefix up to the block's end, and the sequence's options (resolved segment
 * mode, adapter routing, language). When a sequence closes, its partial last block (if it holds that
 * block alone and every full block before it is registered) is kept as well, as a TAIL registered under the same key plus the
 * positions it holds. Reference-mode hybrid sequences and CM_ADAPTERS_BATCH MoLE sequences are never
 * registered (their blocks depend on more than the prefix). A registered block outlives its
 * sequences: once no sequence holds it, it stays in the cache, evictable in least-recently-used
 * order, and is reused by any later sequence whose prompt starts with the same prefix. Blocks hold,
 * beside K and V, the sequence's routing state at their last position (causal window pools, the MoLE
 * fence tracker), so a hybrid or MoLE sequence resumes exactly like a dense one. Allocation takes
 * free blocks first, then evicts the least recently used cached block. */
#define CM_KV_BLOCK_TOKENS 32

/* On an EMPTY sequence whose options are set: maps the longest cached prefix of tokens[0..n) into the
 * sequence, always fewer than n tokens (and at most the context's n_ctx), so the caller still feeds
 * at least the last token and gets its logits. First whole blocks, shared with the cache (reference
 * counts); then, after them, the best partial block on the same prefix, COPIED into a block of the
 * sequence's own (the copy needs a free or evictable block; without one the attach stops at the
 * whole blocks). That partial block is a registered tail, a registered full block whose tokens
 * continue differently, or the partial last block of a live sequence with the same prefix and
 * options. Dense models reuse any number of its leading tokens that match (token-level); hybrid and
 * MoLE models only a tail or a live sequence's partial block that matches entirely, since their
 * routing state is known only at the end of what a block holds. Returns the number of positions
 * reused (0..n-1, not necessarily a multiple of CM_KV_BLOCK_TOKENS; the sequence's length becomes
 * that): 0 without prefix_cache, for n < 2 and for an uncacheable sequence. Errors: CM_E_RANGE for a
 * sequence that is not open, CM_E_INVAL for a non-empty one or bad tokens/n. When the cache is
 * consulted, cm_kv_stats counts it (prefix_query_tokens += the tokens it may reuse, prefix_hit_tokens
 * += the result). Routing
 * statistics do not count reused positions (no expert ran for them). */
int cm_seq_attach_prefix(cm_ctx *c, int seq, const int32_t *tokens, int n, cm_err *err);

/* Opens a new sequence that continues `src` exactly: it shares src's full blocks (reference counts),
 * copies the partial last block, and copies src's options and routing state (statistics start at
 * zero). Returns the new id, CM_E_NOMEM when no sequence slot or block is left. Needs one free or
 * evictable block at most. */
int cm_seq_fork(cm_ctx *c, int src, cm_err *err);

/* Blocks that appending `extra` positions to seq will take from the pool (0.. ; CM_E_RANGE for a bad
 * sequence). Blocks shared with another sequence or the cache are never written: a sequence only
 * appends into blocks it holds alone (a shared partial block does not occur: only full blocks are
 * shared, and forks copy the partial one). */
int cm_seq_blocks_needed(const cm_ctx *c, int seq, int extra);

/* A batch: n tokens, each appended to the end of its sequence in the order given (tokens of one
 * sequence keep their relative order; sequences may be interleaved). Several sequences of different
 * lengths may be prefilled and decoded in one call. */
typedef struct cm_batch {
    int n;
    const int32_t *token;  /* (n) */
    const int32_t *seq;    /* (n) sequence ids from cm_seq_open */
    const int8_t *logits;  /* (n) nonzero: compute logits for this token; NULL: only each sequence's
                              last token in the batch */
    /* Optional, for mixture-of-experts models (ignored by dense models; may be NULL): */
    const uint64_t *adapters; /* (n) MoLE: bit a set = adapter a applies to this token; read only for
                                 sequences whose adapter routing is CM_ADAPTERS_BATCH */
    const int8_t *generated;  /* (n) nonzero: a token the caller generated (routing statistics count
                                 prompt and generated tokens apart); NULL: all are prompt tokens */
    /* Optional yield hook (NULL: none): called on the calling thread after each layer of this batch
     * (the last one too, before the logits) and, as the output matrix is then multiplied in slices of
     * 8192 of its rows (matvec and int8 GEMM), after each slice; never while a compute task runs. It
     * may run ONE nested cm_forward at a time on the same context (dense models, a context created
     * with n_batch_nested), for at most n_batch_nested tokens of sequences that have no token in this
     * batch, and no hook of its own; the nested batch is complete when that call returns (its
     * sequences grew, its logits are readable with cm_logits until the hook returns). Besides that it
     * may open sequences, attach prefixes (cm_seq_attach_prefix), read lengths and KV statistics, fork
     * and close sequences that are not in this batch; it must not close, truncate or fork a sequence
     * of this batch. Every token's logits are the same as without the hook (batch invariance:
     * docs/engine.md). */
    void (*yield)(void *ud);
    void *yield_ud;
} cm_batch;

/* Runs the forward pass. On error nothing is appended to any sequence. */
int cm_forward(cm_ctx *c, const cm_batch *b, cm_err *err);
/* Logits (n_vocab floats) of batch token i from the last cm_forward that returned (a nested one's
 * inside a yield hook); NULL if not requested. Valid until the next cm_forward on this context. */
const float *cm_logits(const cm_ctx *c, int i);
/* The argmax of each of n logits rows of the last cm_forward (batch tokens rows[0..n)) into out, on c's
 * threads, one row per task: a step's greedy tokens at once instead of one after another on the
 * caller's thread (sampling's serial part of a decode step of many sequences). Each row's result is
 * cm_sampler_sample's greedy token for it (the largest logit, the lowest id among equals, NaN never).
 * Returns 0, or -1 (out untouched) when a row has no logits. */
int cm_logits_argmax(cm_ctx *c, int n, const int *rows, int32_t *out);

/* ------------------------------------------------------------ mixture-of-experts options
 *
 * Hybrid MoE (arch "multipl_moe") has a token level and a segment level; the segment level routes
 * windows of `window` tokens in one of two modes:
 * - CM_SEGMENT_CAUSAL (the default for generation): a token's window descriptor pools only the window's
 *   positions up to and including it, kept as per-sequence state in the context (O(1) per decoded token).
 *   Outputs depend on nothing later in the sequence nor on other sequences in the batch, so prefill
 *   equals token-by-token decoding and the KV cache stays valid. How the causal descriptor is taken is
 *   the model's (`segment.route`, cm_moe_info.segment_route): "prefix" (the default) pools the token's
 *   window up to it; "previous" gives every token of window s >= 1 the pool of the whole window s-1
 *   (the window's experts are chosen before it is read), and window 0 no segment expert.
 * - CM_SEGMENT_REFERENCE (the paper's non-causal expert choice, for scoring complete text): experts
 *   choose among the windows of the WHOLE request. Only valid when the sequence is empty and all its
 *   tokens come in ONE cm_forward; afterwards the sequence accepts no more tokens (CM_E_INVAL) until
 *   it is truncated to 0 or closed.
 * MoLE (arch "mole") applies low-rank adapters per token. Where a token's adapter set comes from:
 * - CM_ADAPTERS_AUTO: a fence tracker over the sequence's own tokens (prompt and generated alike, in
 *   order): inside a Markdown code block of a language with an adapter -> {language, shared}; fence
 *   lines, prose and unknown languages -> {fallback}. With `language` >= 0, text outside any fenced
 *   block counts as code of that language ({language, shared}).
 * - CM_ADAPTERS_BATCH: the caller gives each token's set in cm_batch.adapters.
 * - CM_ADAPTERS_NONE: the base model only. */
enum { CM_SEGMENT_DEFAULT = 0, CM_SEGMENT_CAUSAL = 1, CM_SEGMENT_REFERENCE = 2 };
enum { CM_SEGMENT_ROUTE_PREFIX = 0, CM_SEGMENT_ROUTE_PREVIOUS = 1 };
enum { CM_ADAPTERS_AUTO = 0, CM_ADAPTERS_BATCH = 1, CM_ADAPTERS_NONE = 2 };

typedef struct cm_seq_options {
    int segment_mode;     /* CM_SEGMENT_*; DEFAULT = the model's multipl_moe.segment.mode_default */
    int adapter_routing;  /* CM_ADAPTERS_* */
    int language;         /* adapter id (cm_model_adapter_id) of the request's language, -1: none */
} cm_seq_options;

/* A newly opened sequence has {DEFAULT, AUTO, -1}. Options may change only while the sequence is empty
 * (length 0): CM_E_INVAL otherwise. Dense models accept and ignore them. */
void cm_seq_options_default(cm_seq_options *o);
int cm_seq_set_options(cm_ctx *c, int seq, const cm_seq_options *o, cm_err *err);

/* What kind of mixture of experts a model is, and its shape (for /v1/models and tools). Fields that do
 * not apply to the model's kind are 0 (or -1 for indices). */
enum { CM_MOE_KIND_DENSE = 0, CM_MOE_KIND_HYBRID = 1, CM_MOE_KIND_MOLE = 2, CM_MOE_KIND_SPARSE = 3 };
typedef struct cm_moe_info {
    int kind;                 /* CM_MOE_KIND_*: dense, "multipl_moe", "mole" or "qwen3moe" (sparse) */
    /* hybrid and sparse (a sparse MoE has token-level experts only: no shared one, no segment level) */
    int n_experts;            /* token-level experts */
    int top_k;                /* token experts per token, the shared one included */
    int shared_expert;        /* index of the shared token expert, -1 none */
    int n_seg_experts;        /* segment-level experts (0: no segment level) */
    int window;               /* tokens per segment window */
    int segment_mode_default; /* CM_SEGMENT_CAUSAL or CM_SEGMENT_REFERENCE (what DEFAULT means) */
    int segment_route;        /* causal descriptor: CM_SEGMENT_ROUTE_PREFIX or CM_SEGMENT_ROUTE_PREVIOUS */
    /* MoLE (names: cm_model_adapter_name) */
    int n_adapters;
    int shared_adapter;       /* id of the adapter every code token runs, -1 none */
    int fallback_adapter;     /* id of the adapter of prose and unknown languages, -1 none */
} cm_moe_info;
/* Fills out for any model (a dense one: kind DENSE, counts 0, indices -1). Never fails. */
void cm_model_moe_info(const cm_model *m, cm_moe_info *out);

/* MoLE adapters of a model: count (0 for other architectures), name of id i (NULL if out of range),
 * and the id of a name or common alias ("py", "rs", "c++", "js", "golang", ...), -1 if none. */
int cm_model_n_adapters(const cm_model *m);
const char *cm_model_adapter_name(const cm_model *m, int i);
int cm_model_adapter_id(const cm_model *m, const char *name);

/* ------------------------------------------------------------ routing statistics
 *
 * Per sequence, gathered during cm_forward when enabled (the default). Prompt and generated tokens
 * (cm_batch.generated) are counted apart: index [0] prompt, [1] generated. Counts start at zero when
 * the sequence is opened and on cm_seq_routing_reset. */
typedef struct cm_route_count {
    uint32_t tokens[2];   /* tokens routed here */
    double gate_sum[2];   /* sum of their gates (mean gate = gate_sum / tokens) */
} cm_route_count;

typedef struct cm_routing {
    int n_layer;
    int n_tok_experts;    /* token-level experts (0 unless a hybrid or sparse MoE model) */
    int shared_expert;    /* index of the shared token expert, -1 none */
    int n_seg_experts;    /* segment-level experts */
    int window;           /* tokens per segment window */
    int n_windows;        /* windows covered by seg_windows: ceil(n_ctx / window) */
    int n_adapters;       /* MoLE adapters (0 when not a MoLE model) */
    const cm_route_count *tok;     /* (n_layer, n_tok_experts) */
    const cm_route_count *seg;     /* (n_layer, n_seg_experts); gate = q * gate_scale as applied */
    const uint32_t *seg_windows;   /* (n_layer, n_seg_experts, n_windows): tokens of window w routed to
                                      segment expert e (reference mode: the windows the expert chose) */
    const cm_route_count *adapter; /* (n_adapters): tokens per adapter (gate_sum = tokens x scale) */
} cm_routing;

/* The sequence's statistics (arrays owned by the context), or NULL for a dense model or a bad sequence.
 * Valid until the next cm_forward, reset, cm_seq_close or cm_ctx_free on c: copy what you keep. */
const cm_routing *cm_seq_routing(const cm_ctx *c, int seq);
void cm_seq_routing_reset(cm_ctx *c, int seq);
/* Turn statistics gathering on (default) or off for the whole context. */
void cm_ctx_set_routing_stats(cm_ctx *c, int on);

/* Per-token routing detail, opt-in per sequence: for each position, the token, whether it was
 * generated, and for each layer the token-level experts it went to (selection order: the top experts by
 * router probability, then the shared one) and the segment-level experts (causal: by q, highest first;
 * reference: the experts whose chosen windows hold it, in expert order), each with its gate as
 * cm_route_count sums it; MoLE: each position's adapter set (no per-layer choice). Summing a sequence's
 * detail over its positions gives exactly its cm_routing counts (positions reused from the prefix cache
 * are in neither: their row has token -1 and no experts). Rows depend only on the sequence, never on
 * the batch it ran in. */
typedef struct cm_route_tokens {
    int n_tokens;         /* positions recorded: 0 .. n_tokens-1 */
    int n_dropped;        /* positions past the capacity, routed but not recorded */
    int n_layer;
    int k_tok;            /* token-expert slots per (position, layer): the model's top_k; 0 for MoLE */
    int k_seg;            /* segment-expert slots per (position, layer); 0 without a segment level */
    int shared_expert;    /* index of the shared token expert, -1 none */
    int window;           /* tokens per segment window (window of position p: p / window) */
    const int32_t *token;      /* (n_tokens) token id; -1: the position was not routed (prefix cache) */
    const int8_t *generated;   /* (n_tokens) 1: a generated token (cm_batch.generated) */
    const int16_t *tok_expert; /* (n_tokens, n_layer, k_tok) expert ids, -1: unused slot */
    const float *tok_gate;     /* (n_tokens, n_layer, k_tok) gate (renormalised over the chosen) */
    const int16_t *seg_expert; /* (n_tokens, n_layer, k_seg) segment expert ids, -1: unused slot */
    const float *seg_gate;     /* (n_tokens, n_layer, k_seg) gate = q * gate_scale */
    const uint64_t *adapters;  /* (n_tokens) MoLE: bit a = adapter a applied; NULL for other models */
} cm_route_tokens;

/* The detail costs a fixed size per position; a sequence's capacity is capped so that it never takes
 * more than this many bytes (a 48-layer top-8 model: about 2.3 KB a position, so ~29k positions). */
#define CM_ROUTE_TOKENS_MAX_BYTES ((size_t)64 << 20)
/* On an EMPTY sequence: records the detail of its first n_max positions (capped by n_ctx and
 * CM_ROUTE_TOKENS_MAX_BYTES); all memory is allocated here, none during cm_forward. n_max <= 0 turns it
 * off. Returns the capacity (0 for a dense model, which has nothing to record), CM_E_RANGE for a bad
 * sequence, CM_E_INVAL for a non-empty one, CM_E_NOMEM (then the detail is off). Closing, reopening
 * or forking a sequence turns it off (a fork starts without detail); truncation forgets the rows of
 * forgotten positions. */
int cm_seq_routing_tokens_enable(cm_ctx *c, int seq, int n_max, cm_err *err);
/* The sequence's detail (arrays owned by the context), NULL when not enabled or a bad sequence. Valid
 * until the next cm_forward, truncate or close of the sequence, or cm_ctx_free: copy what you keep. */
const cm_route_tokens *cm_seq_routing_tokens(const cm_ctx *c, int seq);

/* ------------------------------------------------------------ languages (pure functions, no model)
 *
 * A fence tracker follows Markdown code fences through a byte stream, fed piece by piece (token
 * texts): a line whose text starts (after spaces) with ``` is a fence line; an opening fence names the
 * block's language (```python, ```rs: aliases are normalised), the next fence line closes it. Plain
 * struct: copy it to checkpoint. */
#define CM_LANG_NAME_MAX 24
typedef struct cm_fence {
    int in_block;             /* inside a fenced block */
    int lead_ws;              /* the current line began with whitespace other than spaces */
    int line_len;             /* bytes of the current line seen so far */
    char line[40];            /* first bytes of the current line (enough to parse ```lang) */
    char lang[CM_LANG_NAME_MAX + 1]; /* normalised language of the open block, "" if none/unnamed */
} cm_fence;

void cm_fence_init(cm_fence *f);
/* Where the piece starting here belongs, decided by the line so far and the piece: CM_FENCE_CODE inside
 * a block (*lang points at f->lang; "" if the block named no language or an unreadable one),
 * CM_FENCE_LINE on a fence line, CM_FENCE_TEXT outside any block. Call before cm_fence_push with the
 * same piece. lang may be NULL. */
enum { CM_FENCE_TEXT = 0, CM_FENCE_CODE = 1, CM_FENCE_LINE = 2 };
int cm_fence_classify(const cm_fence *f, const char *piece, size_t len, const char **lang);
/* Consume the piece's bytes, updating the block state at each newline. */
void cm_fence_push(cm_fence *f, const char *piece, size_t len);

/* Normalise a language name or alias ("py" -> "python", "C++" -> "cpp", "rs" -> "rust", ...) into out
 * (lower case, at most CM_LANG_NAME_MAX bytes). Returns out's length, 0 if empty/too long/invalid. */
int cm_lang_normalize(const char *name, size_t len, char out[CM_LANG_NAME_MAX + 1]);
/* Guess the programming language of a prompt: the first fence's language; else a file name or
 * extension hint ("# file: x.py", "<filename>main.rs", a FIM path line); else keyword statistics.
 * Returns a normalised name (static string) or NULL when nothing is convincing. */
const char *cm_lang_detect(const char *text, size_t len);
/* The MoLE language a request runs with: `explicit_lang` when given (as is); else NULL when the text has
 * Markdown fences (the per-token fence tracker then decides each token's adapter set); else
 * cm_lang_detect's guess (NULL: none). One rule for the CLI and the server. */
const char *cm_lang_for_request(const char *explicit_lang, const char *text, size_t len);

/* KV pool usage, for metrics. Every block is exactly one of: held by sequences (used), cached and idle
 * (evictable; counted in available), free. */
typedef struct cm_kv_stats {
    int blocks_total, blocks_used, block_tokens;
    int blocks_cached;      /* registered in the prefix cache and held by no sequence */
    int blocks_available;   /* free + cached: what new positions can take */
    int blocks_shared;      /* held by more than one sequence */
    uint64_t prefix_query_tokens; /* tokens offered to cm_seq_attach_prefix (minus the last of each) */
    uint64_t prefix_hit_tokens;   /* of those, reused from the cache */
    uint64_t evictions;           /* cached blocks taken back for new positions */
} cm_kv_stats;
void cm_ctx_kv_stats(const cm_ctx *c, cm_kv_stats *out);
/* Bytes of KV memory one pool block (CM_KV_BLOCK_TOKENS positions) takes in any context of this model
 * whose cm_ctx_params.kv_type is kv_type: K and V of every layer (n_layer x 2 x n_head_kv x head_dim
 * elements per position, 4 bytes each for CM_KV_F32, 2 for CM_KV_F16), plus, for mixture-of-experts
 * models, the routing state each block keeps at its last position (causal window pools, the MoLE fence
 * tracker), rounded up to 64 bytes. A pool of kv_tokens positions allocates
 * ceil(kv_tokens / CM_KV_BLOCK_TOKENS) such blocks; per-block bookkeeping (reference counts, the
 * prefix index, a few dozen bytes) is not included. Divide by CM_KV_BLOCK_TOKENS for a per-token
 * figure. 0 for NULL or an unknown kv_type. */
size_t cm_ctx_kv_block_bytes(const cm_model *m, int kv_type);
/* Checks the pool's bookkeeping (reference counts equal table references, every block in exactly one
 * state, cache index consistent). Returns the number of inconsistent blocks (0 = sound) and describes
 * the first in why (may be NULL). For tests and --kv-check; O(blocks + sequences x blocks per seq). */
int cm_ctx_kv_check(const cm_ctx *c, char *why, size_t cap);

/* ============================================================ sampler */

typedef struct cm_logit_bias {
    int32_t token;
    float bias;
} cm_logit_bias;

typedef struct cm_sampling {
    float temperature;        /* 0: greedy (argmax after bias and penalties) */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off; CTRL-style, over prompt and generated tokens */
    float presence_penalty;   /* 0: off; OpenAI semantics, over generated tokens */
    float frequency_penalty;  /* 0: off; OpenAI semantics, over generated tokens */
    int penalty_last_n;       /* window of tokens considered by the penalties (0: all) */
    uint64_t seed;
    const cm_logit_bias *logit_bias; /* copied at create */
    int n_logit_bias;
    int n_logprobs;           /* top-N log-probabilities to report per step (0..CM_LOGPROBS_MAX) */
} cm_sampling;

void cm_sampling_default(cm_sampling *s);

typedef struct cm_sampler cm_sampler;

typedef struct cm_token_logprob {
    int32_t token;
    float logprob;
} cm_token_logprob;

/* The most alternatives any logprobs report carries (cm_sampling.n_logprobs, cm_logprobs's n_top). */
#define CM_LOGPROBS_MAX 20

/* Log-softmax of the raw logits (n_vocab floats, not modified), the one definition of a token's
 * log-probability that sampling and prompt echo share. Returns the log-probability of `want`, NAN when
 * want is not in [0, n_vocab). When top != NULL, writes min(n_top, CM_LOGPROBS_MAX) entries (n_top < 0
 * counts as 0): the most likely tokens, best first, ties broken by the lower id; when the vocabulary
 * is smaller, the tail is padded with {-1, -inf}. NaN logits count as -inf; a -inf logit has
 * log-probability -inf (also when every logit is -inf); k logits of +inf share all the mass (each
 * reports -log k, the others -inf). Allocates nothing. */
float cm_logprobs(int n_vocab, const float *logits, int32_t want, cm_token_logprob *top, int n_top);

/* All buffers are allocated here, sized by the vocabulary: sampling allocates nothing. */
cm_sampler *cm_sampler_create(const cm_model *m, const cm_sampling *s, cm_err *err);
void cm_sampler_free(cm_sampler *s);
/* Reuse: new parameters (checked as by create; on error the sampler is unchanged), counts and window
 * cleared, RNG reseeded: afterwards it behaves exactly like a fresh cm_sampler_create. Costs O(tokens
 * it had seen), where create costs O(vocabulary) in memory to clear (servers keep a pool). */
int cm_sampler_reset(cm_sampler *s, const cm_sampling *p, cm_err *err);
/* Record a prompt token (counted by repetition_penalty only). */
void cm_sampler_accept_prompt(cm_sampler *s, int32_t tok);
/* Sample the next token from logits (n_vocab floats, not modified). The chosen token is recorded as
 * generated. If top != NULL, writes the chosen token's logprob to *chosen_lp and the top
 * n_logprobs alternatives to top[] (log-softmax of the raw logits, before bias/penalties/temperature). */
int32_t cm_sampler_sample(cm_sampler *s, const float *logits, float *chosen_lp, cm_token_logprob *top);
/* Whether s samples plain greedy (temperature 0, no logit bias, no penalties): its token for a row is
 * then the argmax of the row's logits (cm_logits_argmax), which cm_sampler_take records. */
int cm_sampler_is_greedy(const cm_sampler *s);
/* cm_sampler_sample for a greedy sampler whose token, tok, is already known (the row's argmax): records
 * it and writes the log-probabilities as cm_sampler_sample would. Returns tok. */
int32_t cm_sampler_take(cm_sampler *s, const float *logits, int32_t tok, float *chosen_lp, cm_token_logprob *top);

/* ============================================================ BLAS (prefill products)
 *
 * The OpenBLAS kernel family this process runs ("Haswell", "Cooperlake", ...), and, when that is an
 * AVX2 family on a CPU with AVX-512 F/CD/BW/DQ/VL, the AVX-512 family to use instead (else NULL).
 * OpenBLAS picks the family once, at library load, from OPENBLAS_CORETYPE or its own detection. */
const char *cm_blas_core(void);
const char *cm_blas_better_core(void);

/* ============================================================ kernels (decode products, attention)
 *
 * The engine's own SIMD kernel family in use: "avx512vnni", "avx512", "avx2" or "scalar". The portable
 * build compiles them all and picks the best one the CPU runs when the process starts; the environment
 * variable CODEMOE_ISA names a lower one instead (ignored when this CPU or build cannot run it). A
 * -Dnative=true build has only the family -march=native allows. The string is static. */
const char *cm_kernels_isa(void);

#ifdef __cplusplus
}
#endif
#endif /* CODEMOE_H */
