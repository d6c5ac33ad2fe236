/*
 * choice.c - one choice of a completion from its first sampled token to its finish reason: the
 * streaming detokenizer, stop strings, end-of-generation, max_tokens and the context limit in one
 * state machine (contract in api.h), so that the server's scheduler, `codemoe complete` and the tests
 * cannot drift apart on what text a client sees or why a choice ended.
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"

/* Grows c->text to hold at least `need` bytes (doubling, so a long choice reallocates O(log n) times). */
static int choice_grow(api_choice_state *c, size_t need) {
    if (need <= c->cap) return 0;
    size_t cap = c->cap ? c->cap : 64;
    while (cap < need) cap *= 2;
    char *p = realloc(c->text, cap);
    if (!p) return -1;
    c->text = p;
    c->cap = cap;
    return 0;
}

int api_choice_state_init(api_choice_state *c, const cm_model *m, const api_stops *stop, int max_tokens,
                          int n_ctx) {
    memset(c, 0, sizeof *c);
    c->model = m;
    c->piece_max = cm_detok_max_bytes(m);
    if (choice_grow(c, 2 * c->piece_max) < 0) return -1;
    api_choice_state_reset(c, stop, max_tokens, n_ctx);
    return 0;
}

void api_choice_state_reset(api_choice_state *c, const api_stops *stop, int max_tokens, int n_ctx) {
    c->len = c->emitted = c->taken = 0;
    c->n_gen = 0;
    c->ended = 0;
    c->finish = API_FINISH_NONE;
    c->stop_hit = -1;
    c->stop = stop;
    c->max_tokens = max_tokens;
    c->n_ctx = n_ctx;
    c->n_indent = 0;
    c->line_open = 0;
    c->line = 0;
    c->time_up = 0;
    cm_detok_init(&c->dt, 0);
}

void api_choice_state_set_indent(api_choice_state *c, int n_indent) { c->n_indent = n_indent > 0 ? n_indent : 0; }

void api_choice_state_time_up(api_choice_state *c) { c->time_up = 1; }

/* Rule 4: where the text must be cut (returns 1, *cut set), or 0. Each line is decided once, by the
 * push that brings its first non-blank byte; a line of blanks so far waits for more. */
static int indent_cut(api_choice_state *c, size_t *cut) {
    while (c->line < c->len) {
        if (!c->line_open) { /* the first line is never checked: the next one starts after a newline */
            const char *nl = memchr(c->text + c->line, '\n', c->len - c->line);
            if (!nl) { c->line = c->len; return 0; }
            c->line = (size_t)(nl - c->text) + 1;
            c->line_open = 1;
            continue;
        }
        size_t p = c->line;
        while (p < c->len && (c->text[p] == ' ' || c->text[p] == '\t')) p++;
        if (p == c->len) return 0;
        if (p - c->line < (size_t)c->n_indent) { *cut = p; return 1; }
        c->line_open = 0;
        c->line = p;
    }
    return 0;
}

void api_choice_state_free(api_choice_state *c) {
    free(c->text);
    memset(c, 0, sizeof *c);
}

void api_choice_state_end(api_choice_state *c, api_finish finish) {
    if (c->ended) return;
    /* push kept piece_max bytes free before the last token, and that token plus the flush of what it
     * left pending fit in them, so the flush cannot run out of room */
    if (c->text) {
        int n = cm_detok_flush(&c->dt, c->text + c->len, c->cap - c->len);
        if (n > 0) c->len += (size_t)n;
    }
    c->emitted = c->len;
    c->finish = finish;
    c->ended = 1;
}

int api_choice_state_push(api_choice_state *c, int32_t tok, int seq_len) {
    if (c->ended) return 1;
    if (cm_token_is_eog(c->model, tok)) {
        api_choice_state_end(c, API_FINISH_STOP);
        return 1;
    }
    if (choice_grow(c, c->len + c->piece_max) < 0) return -1;
    int n = cm_detok_push(&c->dt, c->model, tok, c->text + c->len, c->cap - c->len);
    if (n < 0) return -1;
    int newline = n > 0 && memchr(c->text + c->len, '\n', (size_t)n) != NULL;
    c->len += (size_t)n;
    c->n_gen++;
    size_t safe = c->emitted;
    int hit = api_stop_scan(c->stop, c->text, c->len, c->emitted, &safe);
    c->emitted = safe;
    if (hit >= 0) {
        c->len = safe; /* the stop string and what follows it are not part of the completion */
        c->stop_hit = hit;
        c->finish = API_FINISH_STOP;
        c->ended = 1;
        return 1;
    }
    size_t cut;
    if (c->n_indent > 0 && indent_cut(c, &cut)) {
        /* the cut byte came with this token, so nothing from it on was released; what the
         * detokenizer still holds comes after it */
        c->len = c->emitted = cut;
        c->finish = API_FINISH_LENGTH;
        c->ended = 1;
        return 1;
    }
    if (c->time_up && newline) {
        api_choice_state_end(c, API_FINISH_LENGTH);
        return 1;
    }
    if (c->n_gen >= c->max_tokens || seq_len + 1 >= c->n_ctx) {
        api_choice_state_end(c, API_FINISH_LENGTH);
        return 1;
    }
    return 0;
}

const char *api_choice_state_take(api_choice_state *c, size_t *len) {
    const char *p = c->text ? c->text + c->taken : "";
    *len = c->emitted - c->taken;
    c->taken = c->emitted;
    return p;
}
