/*
 * tokenizer.c - byte-level BPE (GPT-2 family: Qwen2, Llama-3, DeepSeek-Coder, GPT-2) from GGUF metadata,
 * and the streaming detokenizer.
 *
 * Encoding, in the order Hugging Face `tokenizers` applies it:
 *   1. with CM_TOK_PARSE_SPECIAL, split the text on the strings of control (3) and user-defined (4)
 *      tokens, leftmost then longest match; without it they are never produced from text (a prompt that
 *      contains "<|fim_prefix|>" as code cannot inject the FIM token);
 *   2. NFC-normalise each remaining segment (qwen2 only: its tokenizer.json has an NFC normalizer);
 *   3. pre-tokenize with the model's regex(es) (PCRE2, UTF + UCP, JIT): matches and the gaps between
 *      them become pieces ("Isolated"); a Sequence of Splits (deepseek-coder) re-splits every piece with
 *      the next regex;
 *   4. BPE each piece over its bytes: start from one symbol per byte and repeatedly apply the adjacent
 *      merge of lowest rank (leftmost on ties), using a heap so that long pieces (a megabyte of spaces)
 *      stay O(n log n). llama-bpe first looks the whole piece up in the vocabulary ("ignore_merges").
 *
 * Decisions (documented here because the metadata format leaves them open):
 * - tokenizer.ggml.model other than "gpt2" -> CM_E_UNSUPPORTED.
 * - tokenizer.ggml.pre absent -> "default" (the GPT-2 regex, as llama.cpp does for old files);
 *   present but unknown -> CM_E_UNSUPPORTED naming it (silently using another regex gives wrong ids).
 * - A merge whose parts or concatenation are not in the vocabulary -> CM_E_FORMAT (HF refuses such a
 *   tokenizer.json too). Duplicate merges keep their first (lowest) rank.
 * - A byte with no token of its own is dropped from the output, as HF does when there is no unk token.
 * - A token's bytes: its text mapped back through the byte-level alphabet; if any character is outside
 *   that alphabet the token's text is taken as raw bytes (HF's ByteLevel decoder does the same, which is
 *   what makes added tokens such as "<|endoftext|>" decode to themselves).
 * - Control (3) and unused (5) tokens render as nothing unless `special` is asked for. EOG: the EOS and
 *   EOT ids, plus control/user tokens spelled like a turn or file end (<|im_end|>, <|fim_pad|>, ...).
 * - FIM ids: tokenizer.ggml.fim_{pre,suf,mid,rep,sep}_token_id, else the tokens spelled <|fim_prefix|>,
 *   <|fim_suffix|>, <|fim_middle|>, <|repo_name|>, <|file_sep|> (DeepSeek's spellings for the first
 *   three), as older converters do not name them.
 * - The streaming detokenizer replaces each maximal invalid subsequence by U+FFFD, as WHATWG's
 *   TextDecoder does; a token of L bytes can thus produce up to 3 L + 3 bytes (only for hostile vocabs).
 * - If PCRE2 gives up on a piece (match limit) the next character becomes a piece of its own: output
 *   stays a valid, decodable tokenization of the input, though not the canonical one.
 *
 * The tokenizer is immutable after load and shared by threads: per-call scratch lives in tok_scratch,
 * allocated once per cm_tokenize call and reused for every piece (PCRE2 match data and JIT stack, BPE
 * symbol/heap arrays, the NFC buffer and, for long texts, a small cache of piece -> ids).
 */
#include "tokenizer.h"

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include "model.h"
#include "util.h"

#define TOK_MAX_VOCAB (1 << 24)     /* 16M tokens: far beyond any real vocabulary */
#define TOK_MAX_TOKEN_LEN 4096      /* bytes of one token's text */
#define TOK_MAX_REGEX 6
#define TOK_MATCH_LIMIT 50000000u   /* PCRE2 backtracking budget for one match */

enum { TOKF_EOG = 1, TOKF_SPLIT = 2 /* matched in text with CM_TOK_PARSE_SPECIAL */ };

enum {
    TOK_TYPE_NORMAL = 1, TOK_TYPE_UNKNOWN = 2, TOK_TYPE_CONTROL = 3, TOK_TYPE_USER = 4,
    TOK_TYPE_UNUSED = 5, TOK_TYPE_BYTE = 6,
};

typedef struct tok_merge {
    int32_t a, b;    /* left, right token ids; a < 0: empty slot */
    int32_t rank;
    int32_t result;  /* id of the concatenation */
} tok_merge;

struct cm_tokenizer {
    int n_vocab;
    char *text;            /* every token's text, NUL-terminated, back to back */
    uint32_t *text_off;    /* (n_vocab + 1) */
    char *bytes;           /* the raw bytes each token stands for */
    uint32_t *bytes_off;   /* (n_vocab + 1) */
    uint8_t *type;         /* (n_vocab) tokenizer.ggml.token_type, 1 when absent */
    uint8_t *flags;        /* (n_vocab) TOKF_* */
    int max_token_bytes;
    int max_special_text;  /* longest text of a TOKF_SPLIT token: what one match covers in the input */

    int32_t *vocab_ht;     /* open addressing, token text -> id; -1 empty */
    uint32_t vocab_mask;
    tok_merge *merge_ht;   /* open addressing, (a, b) -> rank, result */
    uint32_t merge_mask;
    int n_merges;
    int32_t byte_tok[256]; /* token of each single byte, -1 if none */

    int32_t *spec_ids;     /* TOKF_SPLIT tokens grouped by first byte, longest first within a group */
    uint32_t spec_start[257];

    pcre2_code *re[TOK_MAX_REGEX];
    int n_re;
    int nfc;               /* NFC-normalise segments before pre-tokenizing */
    int ignore_merges;     /* whole-piece vocabulary lookup before BPE (llama-bpe) */
    char model_name[32];
    char pre_name[64];
};

/* ============================================================ byte-level alphabet */

/* GPT-2 maps every byte to a printable code point so that BPE never sees whitespace or control bytes:
 * printable Latin-1 bytes map to themselves, the 68 others to U+0100.. in byte order. */
static uint16_t byte_to_cp[256];
static int16_t cp_to_byte[324];

static void byte_alphabet_build(void) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        byte_to_cp[b] = (uint16_t)(printable ? b : 256 + n++);
    }
    for (int c = 0; c < 324; c++) cp_to_byte[c] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;
}

static void byte_alphabet_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT; /* models may be loaded from several threads */
    pthread_once(&once, byte_alphabet_build);
}

static int utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Decodes one code point from s[0..n) (n >= 1). Returns its length, or 0 if the sequence is invalid
 * (overlong, surrogate, > U+10FFFF, truncated). */
static int utf8_get(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len;
    uint32_t v, min;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; v = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; v = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; v = c & 0x07; min = 0x10000; }
    else return 0;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
    *cp = v;
    return len;
}

/* ============================================================ hash tables */

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint64_t hash_pair(int32_t a, int32_t b) {
    uint64_t x = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb3fe1a85ec53ull; x ^= x >> 33;
    return x;
}

static uint32_t table_size(uint64_t n) {
    uint32_t s = 16;
    while (s < 2 * n) s <<= 1;
    return s;
}

static inline const char *tok_text(const cm_tokenizer *t, int32_t id, uint32_t *len) {
    *len = t->text_off[id + 1] - t->text_off[id] - 1;
    return t->text + t->text_off[id];
}

static int32_t vocab_find(const cm_tokenizer *t, const char *s, size_t n) {
    uint32_t i = (uint32_t)hash_bytes(s, n) & t->vocab_mask;
    for (;;) {
        int32_t id = t->vocab_ht[i];
        if (id < 0) return -1;
        uint32_t len;
        const char *p = tok_text(t, id, &len);
        if (len == n && memcmp(p, s, n) == 0) return id;
        i = (i + 1) & t->vocab_mask;
    }
}

static const tok_merge *merge_find(const cm_tokenizer *t, int32_t a, int32_t b) {
    if (!t->merge_ht) return NULL;
    uint32_t i = (uint32_t)hash_pair(a, b) & t->merge_mask;
    for (;;) {
        const tok_merge *m = &t->merge_ht[i];
        if (m->a < 0) return NULL;
        if (m->a == a && m->b == b) return m;
        i = (i + 1) & t->merge_mask;
    }
}

/* ============================================================ pre-tokenizer regexes */

/* The GPT-2 regex, as HF's ByteLevel pre-tokenizer and OpenAI's encoder use it. */
static const char *const re_gpt2[] = {
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
};
/* Qwen2 (and Qwen2.5/3): like cl100k but single digits. */
static const char *const re_qwen2[] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};
/* Llama-3: digits in groups of up to three. */
static const char *const re_llama3[] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};
/* DeepSeek-Coder: a Sequence of Splits, each Isolated, applied in this order. The CJK class is the one
 * in its tokenizer.json: U+4E00-U+9FA5, U+0800-U+4E00, U+AC00-U+D7FF. */
static const char *const re_deepseek_coder[] = {
    "[\\r\\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\\x{4e00}-\\x{9fa5}\\x{0800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+",
    "\\p{N}",
};

typedef struct tok_pre_def {
    const char *name;
    const char *const *re;
    int n_re;
    int nfc, ignore_merges;
} tok_pre_def;

static const tok_pre_def pre_defs[] = {
    {"default", re_gpt2, 1, 0, 0},
    {"gpt-2", re_gpt2, 1, 0, 0},
    {"gpt2", re_gpt2, 1, 0, 0},
    {"qwen2", re_qwen2, 1, 1, 0},
    {"deepseek-r1-qwen", re_qwen2, 1, 1, 0},
    {"llama-bpe", re_llama3, 1, 0, 1},
    {"llama3", re_llama3, 1, 0, 1},
    {"llama-v3", re_llama3, 1, 0, 1},
    {"deepseek-coder", re_deepseek_coder, 5, 0, 0},
};

static int compile_regexes(cm_tokenizer *t, const tok_pre_def *d, cm_err *err) {
    for (int i = 0; i < d->n_re; i++) {
        int ec;
        PCRE2_SIZE eo;
        t->re[i] = pcre2_compile((PCRE2_SPTR)d->re[i], PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo, NULL);
        if (!t->re[i]) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ec, msg, sizeof msg);
            return cm_err_set(err, CM_E_UNSUPPORTED, "tokenizer: regex %d of pre-tokenizer '%s': %s", i,
                              d->name, (const char *)msg);
        }
        t->n_re = i + 1;
        /* JIT is a speed-up only: the interpreter gives the same matches when it is unavailable. */
        (void)pcre2_jit_compile(t->re[i], PCRE2_JIT_COMPLETE);
    }
    t->nfc = d->nfc;
    t->ignore_merges = d->ignore_merges;
    return CM_OK;
}

/* ============================================================ load */

void cm_tokenizer_free(cm_tokenizer *t) {
    if (!t) return;
    free(t->text); free(t->text_off); free(t->bytes); free(t->bytes_off); free(t->type); free(t->flags);
    free(t->vocab_ht); free(t->merge_ht); free(t->spec_ids);
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
    free(t);
}

static void copy_gstr(char *dst, size_t cap, gguf_str s) {
    size_t n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
    memcpy(dst, s.ptr, n);
    dst[n] = 0;
}

/* Token ids stored as metadata: absent -> -1, present must lie in [0, n_vocab). */
static int load_id(const gguf_file *g, const char *key, int n_vocab, int32_t *out, cm_err *err) {
    int32_t v = -1;
    int rc = gguf_get_i32(g, key, &v, err);
    if (rc < 0) return rc;
    if (rc == 1) { *out = -1; return CM_OK; }
    if (v < 0 || v >= n_vocab)
        return cm_err_set(err, CM_E_FORMAT, "tokenizer: %s = %d is outside the vocabulary [0, %d)", key, v,
                          n_vocab);
    *out = v;
    return CM_OK;
}

/* A token's bytes: its text through the inverse byte-level map, or the raw text when any character is
 * outside the alphabet (added tokens, stored as plain UTF-8). Writes at most len bytes to out. */
static uint32_t token_raw_bytes(const char *s, uint32_t len, char *out) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < len;) {
        uint32_t cp;
        int l = utf8_get((const unsigned char *)s + i, len - i, &cp);
        if (!l || cp >= 324 || cp_to_byte[cp] < 0) {
            memcpy(out, s, len);
            return len;
        }
        out[n++] = (char)cp_to_byte[cp];
        i += (uint32_t)l;
    }
    return n;
}

static int looks_like(const char *s, uint32_t len, const char *text) {
    return strlen(text) == len && memcmp(s, text, len) == 0;
}

static int load_tokens(cm_tokenizer *t, const gguf_file *g, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, "tokenizer.ggml.tokens");
    if (!kv) return cm_err_set(err, CM_E_FORMAT, "tokenizer: tokenizer.ggml.tokens is missing");
    if (kv->type != GGUF_VT_ARRAY || kv->arr_type != GGUF_VT_STRING)
        return cm_err_set(err, CM_E_FORMAT, "tokenizer: tokenizer.ggml.tokens is not an array of strings");
    if (kv->n < 1 || kv->n > TOK_MAX_VOCAB)
        return cm_err_set(err, CM_E_FORMAT, "tokenizer: %llu tokens (expected 1..%d)",
                          (unsigned long long)kv->n, TOK_MAX_VOCAB);
    int n = (int)kv->n;
    t->n_vocab = n;

    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        gguf_str s = gguf_arr_str(kv, (uint64_t)i);
        if (s.len > TOK_MAX_TOKEN_LEN)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: token %d is %llu bytes long (max %d)", i,
                              (unsigned long long)s.len, TOK_MAX_TOKEN_LEN);
        total += s.len + 1;
    }
    if (total > UINT32_MAX) return cm_err_set(err, CM_E_FORMAT, "tokenizer: token texts exceed 4 GiB");

    t->text = malloc(total);
    t->bytes = malloc(total);
    t->text_off = malloc(((size_t)n + 1) * sizeof *t->text_off);
    t->bytes_off = malloc(((size_t)n + 1) * sizeof *t->bytes_off);
    t->type = malloc((size_t)n);
    t->flags = calloc((size_t)n, 1);
    if (!t->text || !t->bytes || !t->text_off || !t->bytes_off || !t->type || !t->flags)
        return cm_err_set(err, CM_E_NOMEM, "tokenizer: out of memory for %d tokens", n);

    uint32_t off = 0, boff = 0;
    for (int i = 0; i < n; i++) {
        gguf_str s = gguf_arr_str(kv, (uint64_t)i);
        t->text_off[i] = off;
        memcpy(t->text + off, s.ptr, s.len);
        t->text[off + s.len] = 0;
        off += (uint32_t)s.len + 1;
        t->bytes_off[i] = boff;
        uint32_t nb = token_raw_bytes(s.ptr, (uint32_t)s.len, t->bytes + boff);
        boff += nb;
        if ((int)nb > t->max_token_bytes) t->max_token_bytes = (int)nb;
    }
    t->text_off[n] = off;
    t->bytes_off[n] = boff;

    const gguf_kv *tt = gguf_find(g, "tokenizer.ggml.token_type");
    if (tt) {
        int at = tt->arr_type;
        int is_int = at == GGUF_VT_INT32 || at == GGUF_VT_UINT32 || at == GGUF_VT_INT8 || at == GGUF_VT_UINT8 ||
                     at == GGUF_VT_INT16 || at == GGUF_VT_UINT16 || at == GGUF_VT_INT64 || at == GGUF_VT_UINT64;
        if (tt->type != GGUF_VT_ARRAY || !is_int)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: tokenizer.ggml.token_type is not an integer array");
        if (tt->n != (uint64_t)n)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: %llu token types for %d tokens",
                              (unsigned long long)tt->n, n);
        for (int i = 0; i < n; i++) {
            int64_t v = gguf_arr_int(tt, (uint64_t)i);
            if (v < 0 || v > TOK_TYPE_BYTE)
                return cm_err_set(err, CM_E_FORMAT, "tokenizer: token %d has type %lld (expected 0..6)", i,
                                  (long long)v);
            t->type[i] = (uint8_t)v;
        }
    } else {
        memset(t->type, TOK_TYPE_NORMAL, (size_t)n);
    }

    /* Vocabulary hash: the first id wins for duplicate texts. */
    t->vocab_mask = table_size((uint64_t)n) - 1;
    t->vocab_ht = malloc(((size_t)t->vocab_mask + 1) * sizeof *t->vocab_ht);
    if (!t->vocab_ht) return cm_err_set(err, CM_E_NOMEM, "tokenizer: out of memory");
    memset(t->vocab_ht, 0xff, ((size_t)t->vocab_mask + 1) * sizeof *t->vocab_ht);
    for (int i = 0; i < n; i++) {
        uint32_t len;
        const char *s = tok_text(t, i, &len);
        uint32_t h = (uint32_t)hash_bytes(s, len) & t->vocab_mask;
        int dup = 0;
        while (t->vocab_ht[h] >= 0) {
            uint32_t l2;
            const char *s2 = tok_text(t, t->vocab_ht[h], &l2);
            if (l2 == len && memcmp(s, s2, len) == 0) { dup = 1; break; }
            h = (h + 1) & t->vocab_mask;
        }
        if (!dup) t->vocab_ht[h] = i;
    }

    for (int b = 0; b < 256; b++) {
        char u[4];
        int l = utf8_put(byte_to_cp[b], u);
        t->byte_tok[b] = vocab_find(t, u, (size_t)l);
    }
    return CM_OK;
}

static int load_merges(cm_tokenizer *t, const gguf_file *g, cm_err *err) {
    const gguf_kv *kv = gguf_find(g, "tokenizer.ggml.merges");
    if (!kv) return CM_OK; /* a vocabulary without merges encodes byte by byte */
    if (kv->type != GGUF_VT_ARRAY || kv->arr_type != GGUF_VT_STRING)
        return cm_err_set(err, CM_E_FORMAT, "tokenizer: tokenizer.ggml.merges is not an array of strings");
    if (kv->n > TOK_MAX_VOCAB)
        return cm_err_set(err, CM_E_FORMAT, "tokenizer: %llu merges (max %d)", (unsigned long long)kv->n,
                          TOK_MAX_VOCAB);
    int n = (int)kv->n;
    t->merge_mask = table_size((uint64_t)n) - 1;
    t->merge_ht = malloc(((size_t)t->merge_mask + 1) * sizeof *t->merge_ht);
    if (!t->merge_ht) return cm_err_set(err, CM_E_NOMEM, "tokenizer: out of memory for %d merges", n);
    for (uint32_t i = 0; i <= t->merge_mask; i++) t->merge_ht[i].a = -1;

    char cat[2 * TOK_MAX_TOKEN_LEN];
    for (int r = 0; r < n; r++) {
        gguf_str s = gguf_arr_str(kv, (uint64_t)r);
        /* "a b": the separator is the first space after the first byte, so a part may itself be a
         * space in a non-byte-level vocabulary. */
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', (size_t)s.len - 1) : NULL;
        if (!sp)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: merge %d is not of the form \"a b\"", r);
        size_t la = (size_t)(sp - s.ptr), lb = (size_t)s.len - la - 1;
        int32_t a = vocab_find(t, s.ptr, la), b = vocab_find(t, sp + 1, lb);
        if (a < 0 || b < 0 || la + lb > sizeof cat)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: merge %d \"%.*s\" references an unknown token", r,
                              (int)(s.len > 60 ? 60 : s.len), s.ptr);
        memcpy(cat, s.ptr, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t res = vocab_find(t, cat, la + lb);
        if (res < 0)
            return cm_err_set(err, CM_E_FORMAT, "tokenizer: merge %d \"%.*s\" produces a token not in the vocabulary",
                              r, (int)(s.len > 60 ? 60 : s.len), s.ptr);
        uint32_t h = (uint32_t)hash_pair(a, b) & t->merge_mask;
        while (t->merge_ht[h].a >= 0 && !(t->merge_ht[h].a == a && t->merge_ht[h].b == b))
            h = (h + 1) & t->merge_mask;
        if (t->merge_ht[h].a >= 0) continue; /* duplicate: the first rank stands */
        t->merge_ht[h] = (tok_merge){a, b, r, res};
    }
    t->n_merges = n;
    return CM_OK;
}

/* Strings that end generation when the model emits them as control tokens (chat turn ends, and the
 * FIM separators a code model writes after the middle). */
static const char *const eog_texts[] = {
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
    "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<EOT>", "<|EOT|>",
    /* <｜end▁of▁sentence｜>, split because \x9ce would be one escape */
    ("<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"),
};

static int cmp_spec(const void *pa, const void *pb, void *ud) {
    const cm_tokenizer *t = ud;
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    uint32_t la, lb;
    const unsigned char *sa = (const unsigned char *)tok_text(t, a, &la);
    const unsigned char *sb = (const unsigned char *)tok_text(t, b, &lb);
    if (sa[0] != sb[0]) return sa[0] < sb[0] ? -1 : 1;
    if (la != lb) return la > lb ? -1 : 1; /* longest first */
    return a < b ? -1 : a > b;
}

static int build_specials(cm_tokenizer *t, cm_err *err) {
    int n = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        uint32_t len;
        const char *s = tok_text(t, i, &len);
        if ((t->type[i] == TOK_TYPE_CONTROL || t->type[i] == TOK_TYPE_USER) && len > 0) {
            t->flags[i] |= TOKF_SPLIT;
            if ((int)len > t->max_special_text) t->max_special_text = (int)len;
            n++;
        }
        if (t->type[i] == TOK_TYPE_CONTROL || t->type[i] == TOK_TYPE_USER)
            for (size_t k = 0; k < sizeof eog_texts / sizeof *eog_texts; k++)
                if (looks_like(s, len, eog_texts[k])) t->flags[i] |= TOKF_EOG;
    }
    t->spec_ids = malloc(((size_t)n + 1) * sizeof *t->spec_ids);
    if (!t->spec_ids) return cm_err_set(err, CM_E_NOMEM, "tokenizer: out of memory");
    int k = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (t->flags[i] & TOKF_SPLIT) t->spec_ids[k++] = i;
    qsort_r(t->spec_ids, (size_t)n, sizeof *t->spec_ids, cmp_spec, t); /* glibc: _GNU_SOURCE */
    int j = 0;
    for (int c = 0; c < 256; c++) {
        t->spec_start[c] = (uint32_t)j;
        while (j < n) {
            uint32_t len;
            const unsigned char *s = (const unsigned char *)tok_text(t, t->spec_ids[j], &len);
            if (s[0] != c) break;
            j++;
        }
    }
    t->spec_start[256] = (uint32_t)n;
    return CM_OK;
}

static int32_t find_text(const cm_tokenizer *t, const char *s) {
    return vocab_find(t, s, strlen(s));
}

cm_tokenizer *cm_tokenizer_load(const gguf_file *g, cm_model_info *info, cm_err *err) {
    byte_alphabet_init();
    cm_tokenizer *t = calloc(1, sizeof *t);
    if (!t) { cm_err_set(err, CM_E_NOMEM, "tokenizer: out of memory"); return NULL; }
    gguf_str s;
    int rc = gguf_get_str(g, "tokenizer.ggml.model", &s, err);
    if (rc < 0) goto fail;
    if (rc == 1) { rc = cm_err_set(err, CM_E_FORMAT, "tokenizer: tokenizer.ggml.model is missing"); goto fail; }
    copy_gstr(t->model_name, sizeof t->model_name, s);
    if (!gguf_str_eq(s, "gpt2")) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED,
                        "tokenizer: model '%.*s' is not supported (only byte-level BPE, tokenizer.ggml.model "
                        "= \"gpt2\"; SentencePiece 'llama' vocabularies are not)",
                        (int)(s.len > 40 ? 40 : s.len), s.ptr);
        goto fail;
    }
    rc = gguf_get_str(g, "tokenizer.ggml.pre", &s, err);
    if (rc < 0) goto fail;
    if (rc == 1) snprintf(t->pre_name, sizeof t->pre_name, "default");
    else copy_gstr(t->pre_name, sizeof t->pre_name, s);
    const tok_pre_def *pre = NULL;
    for (size_t i = 0; i < sizeof pre_defs / sizeof *pre_defs; i++)
        if (strcmp(pre_defs[i].name, t->pre_name) == 0) pre = &pre_defs[i];
    if (!pre) {
        rc = cm_err_set(err, CM_E_UNSUPPORTED,
                        "tokenizer: pre-tokenizer '%s' is not supported (known: qwen2, llama-bpe, "
                        "deepseek-coder, gpt-2/default)", t->pre_name);
        goto fail;
    }
    if ((rc = compile_regexes(t, pre, err)) < 0) goto fail;
    if ((rc = load_tokens(t, g, err)) < 0) goto fail;
    if ((rc = load_merges(t, g, err)) < 0) goto fail;
    if ((rc = build_specials(t, err)) < 0) goto fail;

    int n = t->n_vocab;
    int32_t bos = -1, eos = -1, eot = -1, pad = -1, fp = -1, fs = -1, fm = -1, fr = -1, fsep = -1;
    if ((rc = load_id(g, "tokenizer.ggml.bos_token_id", n, &bos, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.eos_token_id", n, &eos, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.eot_token_id", n, &eot, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.padding_token_id", n, &pad, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.fim_pre_token_id", n, &fp, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.fim_suf_token_id", n, &fs, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.fim_mid_token_id", n, &fm, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.fim_rep_token_id", n, &fr, err)) < 0) goto fail;
    if ((rc = load_id(g, "tokenizer.ggml.fim_sep_token_id", n, &fsep, err)) < 0) goto fail;
    /* FIM ids by their well-known texts when the file does not name them (older converters). */
    if (fp < 0) fp = find_text(t, "<|fim_prefix|>");
    if (fs < 0) fs = find_text(t, "<|fim_suffix|>");
    if (fm < 0) fm = find_text(t, "<|fim_middle|>");
    if (fp < 0) fp = find_text(t, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>"); /* deepseek */
    if (fs < 0) fs = find_text(t, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>");
    if (fm < 0) fm = find_text(t, "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>");
    if (fr < 0) fr = find_text(t, "<|repo_name|>");
    if (fsep < 0) fsep = find_text(t, "<|file_sep|>");
    int add_bos = 0;
    rc = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos, err);
    if (rc < 0) goto fail;
    if (rc == 1) add_bos = 0;
    if (eos >= 0) t->flags[eos] |= TOKF_EOG;
    if (eot >= 0) t->flags[eot] |= TOKF_EOG;

    info->tok_model = t->model_name;
    info->tok_pre = t->pre_name;
    info->n_vocab = n;
    info->bos = bos; info->eos = eos; info->eot = eot; info->pad = pad;
    info->fim_pre = fp; info->fim_suf = fs; info->fim_mid = fm;
    info->fim_rep = fr; info->fim_sep = fsep;
    info->add_bos = add_bos && bos >= 0;
    return t;
fail:
    (void)rc;
    cm_tokenizer_free(t);
    return NULL;
}

/* ============================================================ encode */

typedef struct tok_heap_ent {
    int32_t rank, pos;
} tok_heap_ent;

/* Per-call cache of BPE results for short pieces: source code repeats its words and indents, and a hit
 * skips every merge lookup. Direct-mapped and bounded; only allocated for texts long enough to pay. */
#define TOK_CACHE_SLOTS 4096
#define TOK_CACHE_KEY 22
#define TOK_CACHE_IDS 8
#define TOK_CACHE_MIN_TEXT 4096

typedef struct tok_cache_ent {
    uint8_t len, n_ids; /* len 0: empty */
    char key[TOK_CACHE_KEY];
    int32_t ids[TOK_CACHE_IDS];
} tok_cache_ent;

typedef struct tok_scratch {
    const cm_tokenizer *t;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    /* BPE of one piece: symbols (n) as a linked list, heap of candidate merges */
    size_t cap;
    int32_t *sym, *prev, *next;
    tok_heap_ent *heap;
    char *bl;              /* the piece in the byte-level alphabet (ignore_merges lookup), 2 * cap */
    /* NFC output of the current segment, and utf8proc's code point buffer */
    char *nfc;
    size_t nfc_len, nfc_cap;
    utf8proc_int32_t *u32;
    size_t u32_cap;
    tok_cache_ent *cache;  /* (TOK_CACHE_SLOTS) or NULL */
    /* output */
    int32_t *out;
    int out_cap;
    size_t n_out;
} tok_scratch;

static void scratch_free(tok_scratch *s) {
    pcre2_match_data_free(s->md);
    pcre2_match_context_free(s->mctx);
    pcre2_jit_stack_free(s->jit);
    free(s->sym); free(s->prev); free(s->next); free(s->heap); free(s->bl); free(s->nfc); free(s->u32);
    free(s->cache);
}

static int scratch_reserve(tok_scratch *s, size_t n) {
    if (n <= s->cap) return CM_OK;
    size_t c = s->cap ? s->cap : 256;
    while (c < n) c *= 2;
    int32_t *a = realloc(s->sym, c * sizeof *a);
    if (a) s->sym = a;
    int32_t *b = realloc(s->prev, c * sizeof *b);
    if (b) s->prev = b;
    int32_t *d = realloc(s->next, c * sizeof *d);
    if (d) s->next = d;
    tok_heap_ent *h = realloc(s->heap, 3 * c * sizeof *h);
    if (h) s->heap = h;
    char *bl = realloc(s->bl, 2 * c);
    if (bl) s->bl = bl;
    if (!a || !b || !d || !h || !bl) return CM_E_NOMEM;
    s->cap = c;
    return CM_OK;
}

static inline void emit(tok_scratch *s, int32_t id) {
    if (s->n_out < (size_t)s->out_cap) s->out[s->n_out] = id;
    s->n_out++;
}

static inline int heap_less(tok_heap_ent x, tok_heap_ent y) {
    return x.rank < y.rank || (x.rank == y.rank && x.pos < y.pos);
}

static void heap_push(tok_heap_ent *h, int *n, tok_heap_ent e) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!heap_less(e, h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static tok_heap_ent heap_pop(tok_heap_ent *h, int *n) {
    tok_heap_ent top = h[0], e = h[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(h[c + 1], h[c])) c++;
        if (!heap_less(h[c], e)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = e;
    return top;
}

static inline void push_pair(const cm_tokenizer *t, tok_scratch *s, int *nh, int32_t left) {
    int32_t right = s->next[left];
    if (right < 0) return;
    const tok_merge *m = merge_find(t, s->sym[left], s->sym[right]);
    if (m) heap_push(s->heap, nh, (tok_heap_ent){m->rank, left});
}

/* BPE over one piece's bytes. */
static int bpe_piece(tok_scratch *s, const unsigned char *p, size_t n) {
    const cm_tokenizer *t = s->t;
    if (n == 0) return CM_OK;
    if (n == 1) {
        if (t->byte_tok[p[0]] >= 0) emit(s, t->byte_tok[p[0]]);
        return CM_OK;
    }
    tok_cache_ent *ce = NULL;
    if (s->cache && n <= TOK_CACHE_KEY) {
        ce = &s->cache[hash_bytes(p, n) & (TOK_CACHE_SLOTS - 1)];
        if (ce->len == n && memcmp(ce->key, p, n) == 0) {
            for (int i = 0; i < ce->n_ids; i++) emit(s, ce->ids[i]);
            return CM_OK;
        }
        ce->len = 0; /* refilled below if the result fits */
    }
    if (n > INT32_MAX / 4) return CM_E_RANGE;
    if (scratch_reserve(s, n) < 0) return CM_E_NOMEM;
    if (t->ignore_merges) {
        size_t l = 0;
        for (size_t i = 0; i < n; i++) l += (size_t)utf8_put(byte_to_cp[p[i]], s->bl + l);
        int32_t id = vocab_find(t, s->bl, l);
        if (id >= 0) {
            emit(s, id);
            if (ce) { memcpy(ce->key, p, n); ce->len = (uint8_t)n; ce->n_ids = 1; ce->ids[0] = id; }
            return CM_OK;
        }
    }
    /* Symbols: one per byte that has a token (others dropped), doubly linked. */
    int32_t first = -1, last = -1;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_tok[p[i]];
        int32_t k = (int32_t)i;
        if (id < 0) { s->sym[k] = -1; continue; }
        s->sym[k] = id;
        s->prev[k] = last;
        s->next[k] = -1;
        if (last >= 0) s->next[last] = k;
        else first = k;
        last = k;
    }
    if (first < 0) return CM_OK;
    int nh = 0;
    for (int32_t k = first; k >= 0; k = s->next[k]) push_pair(t, s, &nh, k);
    while (nh > 0) {
        tok_heap_ent e = heap_pop(s->heap, &nh);
        int32_t l = e.pos, r;
        /* Stale entries: the left symbol was absorbed, or its right neighbour changed. A still-present
         * pair of the same rank is the same merge (ranks are unique), so it is valid. */
        if (s->sym[l] < 0 || (r = s->next[l]) < 0) continue;
        const tok_merge *m = merge_find(t, s->sym[l], s->sym[r]);
        if (!m || m->rank != e.rank) continue;
        s->sym[l] = m->result;
        s->sym[r] = -1;
        s->next[l] = s->next[r];
        if (s->next[r] >= 0) s->prev[s->next[r]] = l;
        if (s->prev[l] >= 0) push_pair(t, s, &nh, s->prev[l]);
        push_pair(t, s, &nh, l);
    }
    int cnt = 0;
    for (int32_t k = first; k >= 0; k = s->next[k], cnt++) {
        emit(s, s->sym[k]);
        if (ce && cnt < TOK_CACHE_IDS) ce->ids[cnt] = s->sym[k];
    }
    if (ce && cnt <= TOK_CACHE_IDS) { memcpy(ce->key, p, n); ce->len = (uint8_t)n; ce->n_ids = (uint8_t)cnt; }
    return CM_OK;
}

/* Length of the UTF-8 character at p (1 for an invalid byte). */
static size_t char_len(const unsigned char *p, size_t n) {
    uint32_t cp;
    int l = utf8_get(p, n, &cp);
    return l ? (size_t)l : 1;
}

/* Splits p[0..n) with regex `level` (matches and gaps, in order) and hands each piece to the next
 * level; past the last regex, to BPE. */
static int split_level(tok_scratch *s, int level, const unsigned char *p, size_t n) {
    const cm_tokenizer *t = s->t;
    if (n == 0) return CM_OK;
    if (level == t->n_re) return bpe_piece(s, p, n);
    size_t pos = 0;
    int rc;
    while (pos < n) {
        int m = pcre2_match(t->re[level], p, n, pos, 0, s->md, s->mctx);
        size_t ms, me;
        if (m >= 0) {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md);
            ms = ov[0];
            me = ov[1];
            if (me <= ms) { /* empty match: step over one character, it joins the gap */
                if (me >= n) break;
                me = ms = ms + char_len(p + ms, n - ms);
                if ((rc = split_level(s, level + 1, p + pos, ms - pos)) < 0) return rc;
                pos = ms;
                continue;
            }
        } else if (m == PCRE2_ERROR_NOMATCH) {
            break;
        } else {
            /* Match limit or JIT stack exhausted: the next character becomes a piece of its own. */
            ms = pos;
            me = pos + char_len(p + pos, n - pos);
        }
        if (ms > pos && (rc = split_level(s, level + 1, p + pos, ms - pos)) < 0) return rc;
        if ((rc = split_level(s, level + 1, p + ms, me - ms)) < 0) return rc;
        pos = me;
    }
    if (pos < n) return split_level(s, level + 1, p + pos, n - pos);
    return CM_OK;
}

static int nfc_put(tok_scratch *s, const void *p, size_t n) {
    if (s->nfc_len + n > s->nfc_cap) {
        size_t c = s->nfc_cap ? s->nfc_cap : 4096;
        while (c < s->nfc_len + n) c *= 2;
        char *b = realloc(s->nfc, c);
        if (!b) return CM_E_NOMEM;
        s->nfc = b;
        s->nfc_cap = c;
    }
    memcpy(s->nfc + s->nfc_len, p, n);
    s->nfc_len += n;
    return CM_OK;
}

/* NFC of a stretch of valid UTF-8 through utf8proc, into s->nfc, with a reused code point buffer. */
static int nfc_valid_run(tok_scratch *s, const unsigned char *p, size_t n) {
    const utf8proc_option_t opt = UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    int below = 1; /* nothing below U+0300 composes with anything after it but a combining mark */
    for (size_t i = 0; i < n && below; i++) below = p[i] < 0xcc;
    if (below) return nfc_put(s, p, n);
    for (;;) {
        utf8proc_ssize_t r = utf8proc_decompose(p, (utf8proc_ssize_t)n, s->u32, (utf8proc_ssize_t)s->u32_cap, opt);
        if (r < 0) return nfc_put(s, p, n); /* cannot happen for valid input; keep the bytes */
        if ((size_t)r > s->u32_cap) {
            size_t c = (size_t)r + 64;
            utf8proc_int32_t *b = realloc(s->u32, c * sizeof *b);
            if (!b) return CM_E_NOMEM;
            s->u32 = b;
            s->u32_cap = c;
            continue;
        }
        r = utf8proc_reencode(s->u32, r, opt); /* composes, then writes UTF-8 over the buffer */
        if (r < 0) return nfc_put(s, p, n);
        return nfc_put(s, s->u32, (size_t)r);
    }
}

/* NFC of p[0..n) into s->nfc. Only the stretches around non-ASCII characters go through utf8proc:
 * composition never crosses an ASCII character (none is the second element of a composition and all
 * have combining class 0), so the text can be cut just before any ASCII byte. Invalid UTF-8 bytes are
 * copied as they are (utf8proc rejects them; HF never sees any). */
static int nfc_segment(tok_scratch *s, const unsigned char *p, size_t n) {
    s->nfc_len = 0;
    size_t i = 0;
    int rc = CM_OK;
    while (i < n && rc >= 0) {
        size_t j = i;
        while (j < n && p[j] < 0x80 && (j + 1 == n || p[j + 1] < 0x80)) j++;
        if (j > i) { rc = nfc_put(s, p + i, j - i); i = j; continue; }
        /* a chunk: an optional ASCII character, then non-ASCII bytes up to the next ASCII one */
        j = i + 1;
        while (j < n && p[j] >= 0x80) j++;
        size_t k = i;
        while (k < j && rc >= 0) {
            size_t e = k;
            uint32_t cp;
            int l;
            while (e < j && (l = utf8_get(p + e, j - e, &cp)) > 0) e += (size_t)l;
            if (e > k) rc = nfc_valid_run(s, p + k, e - k);
            else { rc = nfc_put(s, p + k, 1); e = k + 1; }
            k = e;
        }
        i = j;
    }
    return rc;
}

/* One segment of text free of special tokens: normalise, pre-tokenize, BPE. */
static int encode_segment(tok_scratch *s, const unsigned char *p, size_t n) {
    const cm_tokenizer *t = s->t;
    int ascii = 1;
    if (t->nfc)
        for (size_t i = 0; i < n && ascii; i++) ascii = p[i] < 0x80;
    if (!t->nfc || ascii) return split_level(s, 0, p, n);
    int rc = nfc_segment(s, p, n);
    if (rc < 0) return rc;
    return split_level(s, 0, (const unsigned char *)s->nfc, s->nfc_len);
}

static int tokenize_impl(const cm_tokenizer *t, const unsigned char *p, size_t n, int flags, tok_scratch *s,
                         const cm_model_info *info) {
    int rc;
    if ((flags & CM_TOK_ADD_BOS) && info && info->add_bos && info->bos >= 0) emit(s, info->bos);
    if (!(flags & CM_TOK_PARSE_SPECIAL) || t->spec_start[256] == 0) return encode_segment(s, p, n);
    size_t seg = 0, i = 0;
    while (i < n) {
        uint32_t a = t->spec_start[p[i]], b = t->spec_start[p[i] + 1];
        int32_t hit = -1;
        uint32_t hl = 0;
        for (uint32_t k = a; k < b; k++) {
            uint32_t len;
            const char *st = tok_text(t, t->spec_ids[k], &len);
            if (len <= n - i && memcmp(st, p + i, len) == 0) { hit = t->spec_ids[k]; hl = len; break; }
        }
        if (hit < 0) { i++; continue; }
        if ((rc = encode_segment(s, p + seg, i - seg)) < 0) return rc;
        emit(s, hit);
        i += hl;
        seg = i;
    }
    return encode_segment(s, p + seg, n - seg);
}

int cm_tokenize(const cm_model *m, const char *text, size_t len, int flags, int32_t *out, int cap,
                cm_err *err) {
    if (!m || !m->tok) return cm_err_set(err, CM_E_INVAL, "tokenize: model has no tokenizer");
    if (!text && len) return cm_err_set(err, CM_E_INVAL, "tokenize: text is NULL");
    if (cap < 0 || (cap > 0 && !out)) return cm_err_set(err, CM_E_INVAL, "tokenize: bad output buffer");
    if (len > (size_t)INT_MAX - 1)
        return cm_err_set(err, CM_E_RANGE, "tokenize: text of %zu bytes is too long", len);
    const cm_tokenizer *t = m->tok;
    tok_scratch s = {.t = t, .out = out, .out_cap = cap};
    s.md = pcre2_match_data_create(4, NULL);
    s.mctx = pcre2_match_context_create(NULL);
    s.jit = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, NULL);
    if (len >= TOK_CACHE_MIN_TEXT) s.cache = calloc(TOK_CACHE_SLOTS, sizeof *s.cache); /* optional */
    int rc = CM_E_NOMEM;
    if (s.md && s.mctx && s.jit) {
        pcre2_set_match_limit(s.mctx, TOK_MATCH_LIMIT);
        pcre2_jit_stack_assign(s.mctx, NULL, s.jit);
        rc = tokenize_impl(t, (const unsigned char *)(text ? text : ""), len, flags, &s, &m->info);
    }
    scratch_free(&s);
    if (rc < 0)
        return cm_err_set(err, rc, rc == CM_E_NOMEM ? "tokenize: out of memory" : "tokenize: text too long");
    if (s.n_out > INT_MAX) return cm_err_set(err, CM_E_RANGE, "tokenize: too many tokens");
    return (int)s.n_out;
}

/* ============================================================ token info */

const char *cm_token_text(const cm_model *m, int32_t id, size_t *len) {
    if (!m || !m->tok || id < 0 || id >= m->tok->n_vocab) return NULL;
    uint32_t l;
    const char *s = tok_text(m->tok, id, &l);
    if (len) *len = l;
    return s;
}

static int token_renders(const cm_tokenizer *t, int32_t id, int special) {
    return special || (t->type[id] != TOK_TYPE_CONTROL && t->type[id] != TOK_TYPE_UNUSED);
}

int cm_token_bytes(const cm_model *m, int32_t id, int special, char *out, size_t cap) {
    if (!m || !m->tok || id < 0 || id >= m->tok->n_vocab) return CM_E_RANGE;
    const cm_tokenizer *t = m->tok;
    if (!token_renders(t, id, special)) return 0;
    uint32_t n = t->bytes_off[id + 1] - t->bytes_off[id];
    if (out) memcpy(out, t->bytes + t->bytes_off[id], n < cap ? n : cap);
    return (int)n;
}

int cm_token_is_control(const cm_model *m, int32_t id) {
    if (!m || !m->tok || id < 0 || id >= m->tok->n_vocab) return 0;
    return m->tok->type[id] == TOK_TYPE_CONTROL;
}

int cm_token_is_eog(const cm_model *m, int32_t id) {
    if (!m || !m->tok || id < 0 || id >= m->tok->n_vocab) return 0;
    return (m->tok->flags[id] & TOKF_EOG) != 0;
}

/* ============================================================ streaming detokenizer */

/* Bytes of a UTF-8 sequence given its lead byte, 0 for a byte that cannot start one. */
static int utf8_seq_len(unsigned c) {
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) return 2;
    if (c >= 0xe0 && c <= 0xef) return 3;
    if (c >= 0xf0 && c <= 0xf4) return 4;
    return 0;
}

/* Whether c may follow the k-th byte (k >= 1) of a sequence led by `lead`: the second byte's range
 * excludes overlongs, surrogates and code points past U+10FFFF. */
static int utf8_cont_ok(unsigned lead, int k, unsigned c) {
    if (k == 1) {
        if (lead == 0xe0) return c >= 0xa0 && c <= 0xbf;
        if (lead == 0xed) return c >= 0x80 && c <= 0x9f;
        if (lead == 0xf0) return c >= 0x90 && c <= 0xbf;
        if (lead == 0xf4) return c >= 0x80 && c <= 0x8f;
    }
    return (c & 0xc0) == 0x80;
}

typedef struct tok_sink {
    char *out;
    size_t cap, n;
    int overflow;
} tok_sink;

static inline void sink_put(tok_sink *k, const void *p, size_t n) {
    if (k->n + n > k->cap) { k->overflow = 1; return; }
    memcpy(k->out + k->n, p, n);
    k->n += n;
}

static const char utf8_repl[3] = {'\xef', '\xbf', '\xbd'};

/* Feeds bytes through the decoder state: complete characters go to the sink, a valid incomplete tail is
 * held in d->pend, an invalid maximal subpart becomes one U+FFFD (as WHATWG's TextDecoder does). */
static void detok_feed(cm_detok *d, const unsigned char *p, size_t n, tok_sink *k) {
    for (size_t i = 0; i < n; i++) {
        unsigned c = p[i];
        if (d->npend > 0) {
            int need = utf8_seq_len(d->pend[0]);
            if (utf8_cont_ok(d->pend[0], d->npend, c)) {
                d->pend[d->npend++] = (unsigned char)c;
                if (d->npend == need) { sink_put(k, d->pend, (size_t)need); d->npend = 0; }
                continue;
            }
            sink_put(k, utf8_repl, 3);
            d->npend = 0;
        }
        int l = utf8_seq_len(c);
        if (l == 1) {
            char ch = (char)c;
            sink_put(k, &ch, 1);
        } else if (l == 0) {
            sink_put(k, utf8_repl, 3);
        } else {
            d->pend[0] = (unsigned char)c;
            d->npend = 1;
        }
    }
}

void cm_detok_init(cm_detok *d, int special) {
    memset(d, 0, sizeof *d);
    d->special = special;
}

int cm_detok_push(cm_detok *d, const cm_model *m, int32_t id, char *out, size_t cap) {
    if (!d || !m || !m->tok) return CM_E_INVAL;
    const cm_tokenizer *t = m->tok;
    if (id < 0 || id >= t->n_vocab) return CM_E_RANGE;
    if (!token_renders(t, id, d->special)) return 0;
    cm_detok save = *d;
    tok_sink k = {out, cap, 0, 0};
    detok_feed(d, (const unsigned char *)t->bytes + t->bytes_off[id], t->bytes_off[id + 1] - t->bytes_off[id], &k);
    if (k.overflow) { *d = save; return CM_E_RANGE; }
    return (int)k.n;
}

size_t cm_tokenize_min_tokens(const cm_model *m, size_t len) {
    if (!m || !m->tok || len == 0) return 0;
    const cm_tokenizer *t = m->tok;
    /* a byte without a token of its own is dropped: such text yields no tokens at all */
    for (int b = 0; b < 256; b++)
        if (t->byte_tok[b] < 0) return 0;
    /* Every token covers at most `per` input bytes: a special-token match its text, a BPE token its
     * raw bytes. NFC (qwen2) can shrink a text before BPE, at most 3 to 1 (Hangul L+V+T jamo, 9 bytes,
     * compose into one 3-byte syllable; a base with combining marks shrinks less), so a token then
     * stands for up to 3x its bytes of the original. */
    size_t per = (size_t)(t->max_token_bytes > t->max_special_text ? t->max_token_bytes : t->max_special_text);
    if (t->nfc) per *= 3;
    if (per == 0) return 0;
    return len / per + (len % per != 0);
}

size_t cm_detok_max_bytes(const cm_model *m) {
    if (!m || !m->tok) return 0;
    return 3 * ((size_t)m->tok->max_token_bytes + 8);
}

int cm_detok_flush(cm_detok *d, char *out, size_t cap) {
    if (!d) return CM_E_INVAL;
    if (d->npend == 0) return 0;
    if (cap < 3) return CM_E_RANGE;
    memcpy(out, utf8_repl, 3);
    d->npend = 0;
    return 3;
}

int cm_detokenize(const cm_model *m, const int32_t *ids, int n, int special, char *out, size_t cap) {
    if (!m || !m->tok || n < 0 || (n > 0 && !ids)) return CM_E_INVAL;
    /* Decode into a per-token buffer (worst case 3 bytes out per byte in, plus the held-back tail) and
     * copy what fits, so that the returned size is exact even when cap is too small. */
    size_t tcap = cm_detok_max_bytes(m);
    char small[1024];
    char *tmp = tcap <= sizeof small ? small : malloc(tcap);
    if (!tmp) return CM_E_NOMEM;
    cm_detok d;
    cm_detok_init(&d, special);
    size_t total = 0;
    int rc = 0;
    for (int i = 0; i <= n; i++) {
        int w = i < n ? cm_detok_push(&d, m, ids[i], tmp, tcap) : cm_detok_flush(&d, tmp, tcap);
        if (w < 0) { rc = w; break; }
        if (out && total < cap) memcpy(out + total, tmp, (size_t)w < cap - total ? (size_t)w : cap - total);
        total += (size_t)w;
        if (total > INT_MAX) { rc = CM_E_RANGE; break; }
    }
    if (tmp != small) free(tmp);
    return rc < 0 ? rc : (int)total;
}
