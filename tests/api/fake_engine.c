/*
 * fake_engine.c - see fake_engine.h. Linked into test_api, test_api_choice and fuzz_api instead of the
 * engine library.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_engine.h"

struct cm_model {
    cm_model_info info;
    char name[64];
    cm_moe_info moe;
    const char *const *adapters;
    const char *chat_template;
};

static const char *const specials[] = {"<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<s>"};

cm_model *fake_model_create(const fake_model_opts *o, const char *name) {
    cm_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    snprintf(m->name, sizeof m->name, "%s", name ? name : "");
    cm_model_info *i = &m->info;
    i->arch = "qwen2";
    i->name = m->name;
    i->n_vocab = FAKE_VOCAB;
    i->n_ctx_train = 4096;
    i->weight_type = "F32";
    i->n_params = 12345;
    i->tok_model = "gpt2";
    i->tok_pre = "qwen2";
    i->bos = o->bos ? FAKE_BOS : -1;
    i->eos = o->eos ? FAKE_EOS : -1;
    i->eot = -1;
    i->pad = -1;
    i->fim_pre = o->fim ? FAKE_FIM_PRE : -1;
    i->fim_suf = o->fim ? FAKE_FIM_SUF : -1;
    i->fim_mid = o->fim ? FAKE_FIM_MID : -1;
    i->fim_rep = i->fim_sep = -1;
    i->add_bos = o->add_bos;
    m->chat_template = o->chat_template;
    if (o->moe) {
        m->moe = *o->moe;
        m->adapters = o->adapters;
    } else {
        m->moe = (cm_moe_info){.kind = CM_MOE_KIND_DENSE, .shared_expert = -1, .shared_adapter = -1,
                               .fallback_adapter = -1};
    }
    return m;
}

void cm_model_moe_info(const cm_model *m, cm_moe_info *out) { *out = m->moe; }

int cm_model_n_adapters(const cm_model *m) {
    return m && m->moe.kind == CM_MOE_KIND_MOLE ? m->moe.n_adapters : 0;
}

const char *cm_model_adapter_name(const cm_model *m, int i) {
    return i >= 0 && i < cm_model_n_adapters(m) ? m->adapters[i] : NULL;
}

int cm_model_adapter_id(const cm_model *m, const char *name) {
    for (int i = 0; name && i < cm_model_n_adapters(m); i++)
        if (!strcmp(m->adapters[i], name)) return i;
    return -1;
}

const char *cm_lang_for_request(const char *explicit_lang, const char *text, size_t len) {
    (void)text;
    (void)len;
    return explicit_lang;
}

void cm_seq_options_default(cm_seq_options *o) {
    o->segment_mode = CM_SEGMENT_DEFAULT;
    o->adapter_routing = CM_ADAPTERS_AUTO;
    o->language = -1;
}

void fake_model_free(cm_model *m) { free(m); }

const cm_model_info *cm_model_get_info(const cm_model *m) { return &m->info; }

const char *cm_model_chat_template(const cm_model *m, size_t *len) {
    *len = m->chat_template ? strlen(m->chat_template) : 0;
    return m->chat_template;
}

int cm_tokenize(const cm_model *m, const char *text, size_t len, int flags, int32_t *out, int cap,
                cm_err *err) {
    (void)err;
    int n = 0;
#define EMIT(t) do { if (n < cap) out[n] = (t); n++; } while (0)
    if ((flags & CM_TOK_ADD_BOS) && m->info.add_bos && m->info.bos >= 0) EMIT(m->info.bos);
    for (size_t i = 0; i < len;) {
        int hit = -1;
        if (flags & CM_TOK_PARSE_SPECIAL) {
            for (int s = 0; s < 5; s++) {
                size_t k = strlen(specials[s]);
                if (k <= len - i && memcmp(text + i, specials[s], k) == 0) { hit = s; break; }
            }
        }
        if (hit >= 0) { EMIT(256 + hit); i += strlen(specials[hit]); }
        else { EMIT((unsigned char)text[i]); i++; }
    }
#undef EMIT
    return n;
}

/* A special string is the most bytes one token covers. */
size_t cm_tokenize_min_tokens(const cm_model *m, size_t len) {
    (void)m;
    size_t per = 1;
    for (int s = 0; s < 5; s++)
        if (strlen(specials[s]) > per) per = strlen(specials[s]);
    return len / per + (len % per != 0);
}

/* The bytes of one token into buf (>= 16 bytes). */
static int token_bytes(int32_t id, int special, char *buf) {
    if (id < 0 || id >= FAKE_VOCAB) return -1;
    if (id < 256) { buf[0] = (char)id; return 1; }
    if (id <= FAKE_BOS) {
        if (!special) return 0;
        size_t k = strlen(specials[id - 256]);
        memcpy(buf, specials[id - 256], k);
        return (int)k;
    }
    if (id == FAKE_WORLD) { memcpy(buf, " world", 6); return 6; }
    if (id == FAKE_CUT) { memcpy(buf, "x\xc3", 2); return 2; }
    return snprintf(buf, 16, "tok%d", (int)id);
}

int cm_token_bytes(const cm_model *m, int32_t id, int special, char *out, size_t cap) {
    (void)m;
    char buf[32];
    int n = token_bytes(id, special, buf);
    if (n > 0) memcpy(out, buf, (size_t)n < cap ? (size_t)n : cap);
    return n;
}

int cm_detokenize(const cm_model *m, const int32_t *ids, int n, int special, char *out, size_t cap) {
    (void)m;
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        char buf[32];
        int k = token_bytes(ids[i], special, buf);
        if (k < 0) return CM_E_RANGE;
        for (int j = 0; j < k; j++, o++) if (o < cap) out[o] = buf[j];
    }
    return (int)o;
}

void cm_sampling_default(cm_sampling *s) {
    memset(s, 0, sizeof *s);
    s->temperature = 0.8f; /* deliberately not OpenAI's 1.0: the api must set its own defaults */
    s->top_p = 0.95f;
    s->repetition_penalty = 1.0f;
    s->penalty_last_n = 64;
}

int cm_token_is_eog(const cm_model *m, int32_t id) { return m->info.eos >= 0 && id == m->info.eos; }

/* The streaming detokenizer, reduced to what a byte-per-token vocabulary needs: a lead byte waits for
 * as many bytes as it announces; a byte that cannot start or continue a character, and a sequence cut
 * short at the end, become U+FFFD. (No overlong or surrogate checks: tests feed well-formed text or
 * plainly broken bytes.) */
static int fake_utf8_len(unsigned c) {
    return c < 0x80 ? 1 : c < 0xc0 ? 0 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf8 ? 4 : 0;
}

void cm_detok_init(cm_detok *d, int special) {
    memset(d, 0, sizeof *d);
    d->special = special;
}

size_t cm_detok_max_bytes(const cm_model *m) { (void)m; return 3 * (16 + 8); }

int cm_detok_push(cm_detok *d, const cm_model *m, int32_t id, char *out, size_t cap) {
    (void)m;
    char buf[32];
    int k = token_bytes(id, d->special, buf);
    if (k < 0) return CM_E_RANGE;
    if (cap < cm_detok_max_bytes(m)) return CM_E_RANGE; /* stricter than the engine: callers must leave room */
    size_t o = 0;
    for (int i = 0; i < k; i++) {
        unsigned c = (unsigned char)buf[i];
        if (d->npend > 0) {
            if ((c & 0xc0) == 0x80) {
                d->pend[d->npend++] = (unsigned char)c;
                if (d->npend == fake_utf8_len(d->pend[0])) {
                    memcpy(out + o, d->pend, (size_t)d->npend);
                    o += (size_t)d->npend;
                    d->npend = 0;
                }
                continue;
            }
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            d->npend = 0;
        }
        int l = fake_utf8_len(c);
        if (l == 1) out[o++] = (char)c;
        else if (l == 0) { memcpy(out + o, "\xef\xbf\xbd", 3); o += 3; }
        else d->pend[d->npend++] = (unsigned char)c;
    }
    return (int)o;
}

int cm_detok_flush(cm_detok *d, char *out, size_t cap) {
    if (d->npend == 0) return 0;
    if (cap < 3) return CM_E_RANGE;
    memcpy(out, "\xef\xbf\xbd", 3);
    d->npend = 0;
    return 3;
}
