/*
 * test_choice.c - unit tests of api/choice.c, the per-choice state machine (sampled ids -> released
 * text and a finish reason), of the stop-list rules it and `codemoe complete --stop` share with the
 * request parser, and of the choice -> prompt index. Linked against tests/api/fake_engine.c: one
 * token per byte (plus EOS and FAKE_CUT, a token that ends inside a character), so every edge between
 * tokens, characters and stop strings is placed exactly.
 */
#include <stdint.h>

#include "../test.h"
#include "api.h"
#include "fake_engine.h"

static cm_model *g_model;

/* Allocation counters: the test binary links with -Wl,--wrap=malloc,--wrap=realloc (tests/meson.build),
 * so every malloc/realloc made by the api/ code in it passes through here. */
static long g_allocs;
void *__real_malloc(size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n) { g_allocs++; return __real_malloc(n); }
void *__wrap_realloc(void *p, size_t n) { g_allocs++; return __real_realloc(p, n); }

/* What a client saw of one choice: the concatenation of every api_choice_state_take. */
typedef struct client {
    char text[1024];
    size_t len;
    int pieces;     /* non-empty takes */
    int bad_piece;  /* a take that ended inside a UTF-8 character */
} client;

static void client_take(api_choice_state *c, client *cl) {
    size_t n;
    const char *p = api_choice_state_take(c, &n);
    if (n == 0) return;
    cl->pieces++;
    unsigned char last = (unsigned char)p[n - 1];
    if (last >= 0xc0 || (n == 1 && (last & 0xc0) == 0x80)) cl->bad_piece = 1;
    if (cl->len + n < sizeof cl->text) {
        memcpy(cl->text + cl->len, p, n);
        cl->len += n;
        cl->text[cl->len] = '\0';
    }
}

/* Pushes the bytes of s as tokens, one position further each, and takes after every push; stops at
 * the first push that does not return 0. Returns that push's result (0: all went on). */
static int feed(api_choice_state *c, const char *s, int *seq_len, client *cl) {
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int rc = api_choice_state_push(c, *p, (*seq_len)++);
        client_take(c, cl);
        if (rc) return rc;
    }
    return 0;
}

static int push1(api_choice_state *c, int32_t tok, int *seq_len, client *cl) {
    int rc = api_choice_state_push(c, tok, (*seq_len)++);
    client_take(c, cl);
    return rc;
}

/* A stop list built through the same rules as a request's. */
static api_stops stops(const char *const *s, int n) {
    api_stops st = {0};
    api_error e;
    for (int i = 0; i < n; i++)
        if (api_stops_add(&st, s[i], strlen(s[i]), "x", &e)) fprintf(stderr, "stop '%s': %s\n", s[i], e.message);
    return st;
}

#define TEXT_IS(c, want) (c)->len == strlen(want) && memcmp((c)->text, want, strlen(want)) == 0

TEST(stop_split_across_tokens) {
    const char *s[] = {"END"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 5;
    ASSERT_EQ_INT(feed(&c, "abEN", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "ab"); /* "EN" could still become "END": held back */
    ASSERT_EQ_INT(c.emitted, 2);
    ASSERT_EQ_INT(feed(&c, "D", &pos, &cl), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);
    ASSERT_EQ_INT(c.stop_hit, 0);
    ASSERT_EQ_INT(c.n_gen, 5);
    ASSERT_TRUE(TEXT_IS(&c, "ab"));
    ASSERT_STREQ(cl.text, "ab");
    /* an ended choice takes no more tokens and releases nothing more, even when ended again */
    ASSERT_EQ_INT(feed(&c, "xyz", &pos, &cl), 1);
    api_choice_state_end(&c, API_FINISH_LENGTH);
    client_take(&c, &cl);
    ASSERT_STREQ(cl.text, "ab");
    ASSERT_EQ_INT(c.n_gen, 5);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);

    /* a held tail that does not become the stop string is released by the next token */
    api_choice_state_reset(&c, &st, 100, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "abENx", &pos, &c2), 0);
    ASSERT_STREQ(c2.text, "abENx");
    ASSERT_EQ_INT(c.finish, API_FINISH_NONE);
    ASSERT_EQ_INT(c.stop_hit, -1);
    api_choice_state_free(&c);
    api_stops_free(&st);
}

TEST(stop_at_first_token) {
    const char *s[] = {"zz", "a"};
    api_stops st = stops(s, 2);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 3;
    ASSERT_EQ_INT(feed(&c, "abc", &pos, &cl), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);
    ASSERT_EQ_INT(c.stop_hit, 1);
    ASSERT_EQ_INT(c.len, 0);
    ASSERT_EQ_INT(c.n_gen, 1);
    ASSERT_EQ_INT(cl.pieces, 0);
    /* a stop string spanning the first tokens: nothing is ever released */
    const char *s2[] = {"ab"};
    api_stops st2 = stops(s2, 1);
    api_choice_state_reset(&c, &st2, 100, 1000);
    ASSERT_EQ_INT(feed(&c, "ab", &pos, &cl), 1);
    ASSERT_EQ_INT(c.stop_hit, 0);
    ASSERT_EQ_INT(c.len, 0);
    ASSERT_EQ_INT(cl.pieces, 0);
    api_choice_state_free(&c);
    api_stops_free(&st);
    api_stops_free(&st2);
}

TEST(overlapping_stops) {
    /* the earliest match wins, whichever string it is */
    const char *s[] = {"abcd", "bc"};
    api_stops st = stops(s, 2);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "xabcd", &pos, &cl), 1);
    ASSERT_EQ_INT(c.stop_hit, 1);
    ASSERT_TRUE(TEXT_IS(&c, "xa"));
    ASSERT_STREQ(cl.text, "xa");

    /* a stop string that overlaps itself: "aaaa" holds back "aaa", so the match at 1 loses nothing */
    const char *s2[] = {"aaab"};
    api_stops st2 = stops(s2, 1);
    api_choice_state_reset(&c, &st2, 100, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "aaaa", &pos, &c2), 0);
    ASSERT_STREQ(c2.text, "a");
    ASSERT_EQ_INT(feed(&c, "b", &pos, &c2), 1);
    ASSERT_STREQ(c2.text, "a");
    ASSERT_TRUE(TEXT_IS(&c, "a"));

    /* two strings matching at the same place: the first listed */
    const char *s3[] = {"q", "qr"};
    api_stops st3 = stops(s3, 2);
    api_choice_state_reset(&c, &st3, 100, 1000);
    client c3 = {0};
    ASSERT_EQ_INT(feed(&c, "pqr", &pos, &c3), 1);
    ASSERT_EQ_INT(c.stop_hit, 0);
    ASSERT_STREQ(c3.text, "p");
    api_choice_state_free(&c);
    api_stops_free(&st);
    api_stops_free(&st2);
    api_stops_free(&st3);
}

TEST(utf8_split_across_tokens) {
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, NULL, 100, 1000), 0);
    client cl = {0};
    int pos = 0;
    /* "é" is two byte tokens, "😀" four: nothing of a character goes out before its last byte */
    ASSERT_EQ_INT(feed(&c, "a\xc3", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "a");
    ASSERT_EQ_INT(c.len, 1); /* the text holds whole characters only; the detokenizer keeps the rest */
    ASSERT_EQ_INT(feed(&c, "\xa9\xf0\x9f\x98", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "a\xc3\xa9");
    ASSERT_EQ_INT(feed(&c, "\x80", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "a\xc3\xa9\xf0\x9f\x98\x80");
    ASSERT_EQ_INT(cl.bad_piece, 0);
    ASSERT_EQ_INT(c.n_gen, 7); /* every byte token counts, complete or not */
    api_choice_state_free(&c);
}

TEST(utf8_at_stop_boundary) {
    const char *s[] = {"\xc3\xa9"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 0;
    /* a multi-byte stop completed by the token that completes its character */
    ASSERT_EQ_INT(feed(&c, "a\xc3", &pos, &cl), 0);
    ASSERT_EQ_INT(feed(&c, "\xa9", &pos, &cl), 1);
    ASSERT_TRUE(TEXT_IS(&c, "a"));
    ASSERT_STREQ(cl.text, "a");

    /* a broken character before a stop string goes out as U+FFFD; the stop cuts after it */
    const char *s2[] = {"x"};
    api_stops st2 = stops(s2, 1);
    api_choice_state_reset(&c, &st2, 100, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "a\xc3x", &pos, &c2), 1);
    ASSERT_STREQ(c2.text, "a\xef\xbf\xbd");

    /* the stop token leaves half a character in the detokenizer: dropped, never flushed as U+FFFD */
    api_choice_state_reset(&c, &st2, 100, 1000);
    client c3 = {0};
    ASSERT_EQ_INT(push1(&c, 'a', &pos, &c3), 0);
    ASSERT_EQ_INT(push1(&c, FAKE_CUT, &pos, &c3), 1);
    api_choice_state_end(&c, API_FINISH_NONE);
    client_take(&c, &c3);
    ASSERT_STREQ(c3.text, "a");
    ASSERT_TRUE(TEXT_IS(&c, "a"));
    /* and the next choice starts with an empty detokenizer: a lone continuation byte is U+FFFD, not
     * the end of the dropped character */
    api_choice_state_reset(&c, NULL, 100, 1000);
    client c4 = {0};
    ASSERT_EQ_INT(feed(&c, "\xa9", &pos, &c4), 0);
    ASSERT_STREQ(c4.text, "\xef\xbf\xbd");

    /* without a stop the same cut character is flushed as U+FFFD when the choice ends */
    api_choice_state_reset(&c, NULL, 2, 1000);
    client c5 = {0};
    ASSERT_EQ_INT(push1(&c, 'a', &pos, &c5), 0);
    ASSERT_EQ_INT(push1(&c, FAKE_CUT, &pos, &c5), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_STREQ(c5.text, "ax\xef\xbf\xbd");
    api_choice_state_free(&c);
    api_stops_free(&st);
    api_stops_free(&st2);
}

TEST(eog_ends_and_flushes) {
    const char *s[] = {"bc"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 3, 1000), 0);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "ab", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "a"); /* "b" may begin "bc" */
    /* max_tokens is 3, but end-of-generation is not a generated token: it ends with "stop" */
    ASSERT_EQ_INT(push1(&c, FAKE_EOS, &pos, &cl), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);
    ASSERT_EQ_INT(c.stop_hit, -1);
    ASSERT_EQ_INT(c.n_gen, 2);
    ASSERT_STREQ(cl.text, "ab"); /* the held tail goes out */

    /* an incomplete character at the end of generation becomes U+FFFD */
    api_choice_state_reset(&c, NULL, 100, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "a\xe2\x82", &pos, &c2), 0);
    ASSERT_EQ_INT(push1(&c, FAKE_EOS, &pos, &c2), 1);
    ASSERT_STREQ(c2.text, "a\xef\xbf\xbd");
    ASSERT_EQ_INT(c.n_gen, 3);

    /* end-of-generation as the very first token: an empty choice */
    api_choice_state_reset(&c, NULL, 100, 1000);
    ASSERT_EQ_INT(api_choice_state_push(&c, FAKE_EOS, 9), 1);
    ASSERT_EQ_INT(c.n_gen, 0);
    ASSERT_EQ_INT(c.len, 0);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);
    api_choice_state_free(&c);
    api_stops_free(&st);
}

TEST(max_tokens_ends_and_flushes) {
    const char *s[] = {"cd"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 3, 1000), 0);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "abcdef", &pos, &cl), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_EQ_INT(c.n_gen, 3);
    ASSERT_STREQ(cl.text, "abc"); /* "c" was held for "cd"; the length end releases it */
    ASSERT_TRUE(TEXT_IS(&c, "abc"));

    /* a stop string completed by the last allowed token is a stop, not a length end */
    api_choice_state_reset(&c, &st, 4, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "abcd", &pos, &c2), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_STOP);
    ASSERT_STREQ(c2.text, "ab");

    /* max_tokens 1: the first token ends it */
    api_choice_state_reset(&c, NULL, 1, 1000);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'a', 0), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_TRUE(TEXT_IS(&c, "a"));
    api_choice_state_free(&c);
    api_stops_free(&st);
}

TEST(context_limit) {
    /* a 7-token prompt in a 10-position context: tokens sampled at positions 7, 8, 9; the one sampled
     * with 9 positions filled would fill the context, so it is the last */
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, NULL, 100, 10), 0);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'a', 7), 0);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'b', 8), 0);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'c', 9), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_EQ_INT(c.n_gen, 3);
    /* the held tail goes out at a context end too */
    const char *s[] = {"bz"};
    api_stops st = stops(s, 1);
    api_choice_state_reset(&c, &st, 100, 10);
    client cl = {0};
    int pos = 7;
    ASSERT_EQ_INT(feed(&c, "abc", &pos, &cl), 1);
    ASSERT_EQ_INT(pos, 10);
    ASSERT_STREQ(cl.text, "abc");
    api_choice_state_reset(&c, &st, 100, 10);
    client c2 = {0};
    pos = 8;
    ASSERT_EQ_INT(feed(&c, "ab", &pos, &c2), 1);
    ASSERT_STREQ(c2.text, "ab");
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    api_choice_state_free(&c);
    api_stops_free(&st);
}

TEST(end_from_outside) {
    const char *s[] = {"END"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "aE\xc3", &pos, &cl), 0);
    ASSERT_STREQ(cl.text, "a");
    /* cancelled: finish stays null, everything held goes out */
    api_choice_state_end(&c, API_FINISH_NONE);
    client_take(&c, &cl);
    ASSERT_STREQ(cl.text, "aE\xef\xbf\xbd");
    ASSERT_EQ_INT(c.ended, 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_NONE);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'x', pos), 1);
    ASSERT_EQ_INT(c.n_gen, 3);
    api_choice_state_free(&c);
    api_choice_state_free(&c); /* freed twice: safe */
    /* a state whose init never ran (zeroed) can be ended and freed */
    api_choice_state z;
    memset(&z, 0, sizeof z);
    api_choice_state_end(&z, API_FINISH_NONE);
    size_t n;
    api_choice_state_take(&z, &n);
    ASSERT_EQ_INT(n, 0);
    api_choice_state_free(&z);
    api_stops_free(&st);
}

TEST(steady_state_does_not_allocate) {
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, NULL, 1 << 20, 1 << 20), 0);
    /* a long choice grows the buffer by doubling: a handful of reallocations for 4000 tokens */
    long before = g_allocs;
    int pos = 0;
    for (int i = 0; i < 4000; i++) ASSERT_EQ_INT(api_choice_state_push(&c, 'a', pos++), 0);
    ASSERT_EQ_INT(c.len, 4000);
    ASSERT_TRUE(g_allocs - before >= 1 && g_allocs - before <= 8);
    /* the next choice of the same length reuses the buffer: no allocation at all, nor for take/end */
    before = g_allocs;
    api_choice_state_reset(&c, NULL, 1 << 20, 1 << 20);
    pos = 0;
    size_t n;
    for (int i = 0; i < 4000; i++) {
        ASSERT_EQ_INT(api_choice_state_push(&c, 'b', pos++), 0);
        api_choice_state_take(&c, &n);
    }
    api_choice_state_end(&c, API_FINISH_NONE);
    ASSERT_EQ_INT(g_allocs - before, 0);
    ASSERT_EQ_INT(c.len, 4000);
    api_choice_state_free(&c);
}

TEST(bad_token_changes_nothing) {
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, NULL, 100, 1000), 0);
    ASSERT_EQ_INT(api_choice_state_push(&c, 'a', 0), 0);
    ASSERT_EQ_INT(api_choice_state_push(&c, FAKE_VOCAB, 1), -1);
    ASSERT_EQ_INT(api_choice_state_push(&c, -1, 1), -1);
    ASSERT_EQ_INT(c.n_gen, 1);
    ASSERT_EQ_INT(c.ended, 0);
    ASSERT_TRUE(TEXT_IS(&c, "a"));
    api_choice_state_free(&c);
}

/* ============================================================ stop list rules */

TEST(stop_list_rules) {
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    /* editor plugins send a dozen (Continue's tab autocomplete: 12, plus an SDK's own) */
    ASSERT_EQ_INT(api_stops_check_count(32, &lim, "v", &e), 0);
    ASSERT_EQ_INT(api_stops_check_count(33, &lim, "v", &e), -1);
    ASSERT_EQ_INT(e.status, 400);
    ASSERT_STREQ(e.param, "stop");
    ASSERT_STREQ(e.message, "v is too long: at most 32 stop sequences - 'stop'");
    lim.max_stop = 1000; /* never above the hard bound */
    ASSERT_EQ_INT(api_stops_check_count(API_STOP_MAX, &lim, "v", &e), 0);
    ASSERT_EQ_INT(api_stops_check_count(API_STOP_MAX + 1, &lim, "v", &e), -1);

    api_stops st = {0};
    ASSERT_EQ_INT(api_stops_add(&st, "", 0, "''", &e), -1);
    ASSERT_STREQ(e.message, "'' is too short - 'stop'");
    char big[API_STOP_MAX_BYTES + 1];
    memset(big, 'x', sizeof big);
    ASSERT_EQ_INT(api_stops_add(&st, big, sizeof big, "'xx...'", &e), -1);
    ASSERT_EQ_INT(st.n, 0);
    ASSERT_EQ_INT(api_stops_add(&st, big, API_STOP_MAX_BYTES, "'xx...'", &e), 0);
    ASSERT_EQ_INT(api_stops_add(&st, "a\0b", 3, "'a b'", &e), 0); /* NULs are bytes like any other */
    ASSERT_EQ_INT(st.n, 2);
    ASSERT_EQ_INT(st.len[1], 3);
    ASSERT_TRUE(memcmp(st.s[1], "a\0b", 4) == 0);
    for (int i = 2; i < API_STOP_MAX; i++) ASSERT_EQ_INT(api_stops_add(&st, "s", 1, "'s'", &e), 0);
    ASSERT_EQ_INT(api_stops_add(&st, "s", 1, "'s'", &e), -1); /* the array is full */
    ASSERT_EQ_INT(st.n, API_STOP_MAX);
    api_stops_free(&st);
    ASSERT_EQ_INT(st.n, 0);
}

/* ============================================================ choice -> prompt */

TEST(choice_to_prompt) {
    api_completion_req r;
    memset(&r, 0, sizeof r);
    r.n_prompts = 3;
    r.n = 2;
    const int prompt[] = {0, 0, 1, 1, 2, 2}, first[] = {0, 0, 2, 2, 4, 4};
    ASSERT_EQ_INT(api_completion_n_choices(&r), 6);
    for (int i = 0; i < 6; i++) {
        ASSERT_EQ_INT(api_completion_prompt_of(&r, i), prompt[i]);
        ASSERT_EQ_INT(api_completion_first_choice(&r, i), first[i]);
    }
    ASSERT_EQ_INT(api_completion_prompt_of(&r, 9), 2); /* never past the last prompt */
    r.n = 1;
    for (int i = 0; i < 3; i++) ASSERT_EQ_INT(api_completion_first_choice(&r, i), i);
    r.n = 0; /* an unparsed request: one choice per prompt, no division by zero */
    ASSERT_EQ_INT(api_completion_prompt_of(&r, 1), 1);

    /* a parsed request: two prompts, n 3 */
    api_model am = {.model = g_model, .id = "fake", .n_ctx = 64};
    api_limits lim;
    api_limits_default(&lim);
    api_error e;
    const char *body = "{\"prompt\":[\"ab\",\"cde\"],\"n\":3}";
    ASSERT_EQ_INT(api_parse_completion(body, strlen(body), &am, &lim, &r, &e), 0);
    ASSERT_EQ_INT(api_completion_n_choices(&r), 6);
    for (int i = 0; i < 6; i++) {
        int p = api_completion_prompt_of(&r, i);
        ASSERT_EQ_INT(p, i / 3);
        ASSERT_EQ_INT(r.prompts[p].text_len, p == 0 ? 2 : 3);
        ASSERT_EQ_INT(api_completion_first_choice(&r, i), i - i % 3);
    }
    api_completion_req_free(&r);
}

/* llama.cpp's n_indent: the first line is free; a later line whose first non-blank byte sits below the
 * indentation ends the choice ("length"), cut before that byte; a line is judged only once that byte
 * has come, and whatever it is (an empty line's newline too). */
TEST(indent_limit) {
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, NULL, 100, 1000), 0);
    api_choice_state_set_indent(&c, 4);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "x = 1\n    y\n\t  ", &pos, &cl), 0); /* line 1 free, line 2 at 4 */
    ASSERT_STREQ(cl.text, "x = 1\n    y\n\t  ");                   /* line 3's blanks: undecided */
    ASSERT_EQ_INT(feed(&c, "z", &pos, &cl), 1);                      /* 3 columns < 4 */
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_EQ_INT(c.stop_hit, -1);
    ASSERT_TRUE(TEXT_IS(&c, "x = 1\n    y\n\t  "));
    ASSERT_STREQ(cl.text, "x = 1\n    y\n\t  ");
    ASSERT_EQ_INT(c.n_gen, (int)strlen("x = 1\n    y\n\t  z"));

    /* an empty line ends it too (its newline is the first non-blank byte); reset clears the limit */
    api_choice_state_reset(&c, NULL, 100, 1000);
    api_choice_state_set_indent(&c, 2);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "a\n  b\n\n", &pos, &c2), 1);
    ASSERT_STREQ(c2.text, "a\n  b\n");
    api_choice_state_reset(&c, NULL, 100, 1000);
    client c3 = {0};
    ASSERT_EQ_INT(feed(&c, "a\nb\n\nc", &pos, &c3), 0);
    ASSERT_STREQ(c3.text, "a\nb\n\nc");
    api_choice_state_free(&c);
}

/* llama.cpp's t_max_predict_ms: once the caller says time is up, the next token with a newline ends
 * the choice ("length"), its text kept; tokens without one go on. */
TEST(time_up_ends_at_newline) {
    const char *s[] = {"STOP"};
    api_stops st = stops(s, 1);
    api_choice_state c;
    ASSERT_EQ_INT(api_choice_state_init(&c, g_model, &st, 100, 1000), 0);
    client cl = {0};
    int pos = 0;
    ASSERT_EQ_INT(feed(&c, "a\nb", &pos, &cl), 0); /* a newline before the time is up: nothing */
    api_choice_state_time_up(&c);
    ASSERT_EQ_INT(feed(&c, "cST", &pos, &cl), 0);
    ASSERT_EQ_INT(feed(&c, "\n", &pos, &cl), 1);
    ASSERT_EQ_INT(c.finish, API_FINISH_LENGTH);
    ASSERT_STREQ(cl.text, "a\nbcST\n"); /* the held-back "ST" is released with the end */
    api_choice_state_reset(&c, &st, 100, 1000);
    client c2 = {0};
    ASSERT_EQ_INT(feed(&c, "x\ny\n", &pos, &c2), 0); /* reset: the time is not up any more */
    api_choice_state_free(&c);
    api_stops_free(&st);
}

int main(void) {
    fake_model_opts o = {.fim = 1, .bos = 1, .add_bos = 0, .eos = 1};
    g_model = fake_model_create(&o, "fake");
    RUN(stop_split_across_tokens);
    RUN(stop_at_first_token);
    RUN(overlapping_stops);
    RUN(utf8_split_across_tokens);
    RUN(utf8_at_stop_boundary);
    RUN(eog_ends_and_flushes);
    RUN(max_tokens_ends_and_flushes);
    RUN(context_limit);
    RUN(end_from_outside);
    RUN(steady_state_does_not_allocate);
    RUN(bad_token_changes_nothing);
    RUN(stop_list_rules);
    RUN(choice_to_prompt);
    RUN(indent_limit);
    RUN(time_up_ends_at_newline);
    fake_model_free(g_model);
    return test_summary();
}
