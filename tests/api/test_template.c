/*
 * test_template.c - the chat-template interpreter (api/template.c): every golden of tests/fixtures/template/
 * (real templates of the Qwen2.5/Qwen3, Llama-3.x and DeepSeek-Coder families, and small templates of the
 * interpreter's pieces, all rendered by @huggingface/jinja through tools/template_golden.mjs) rendered byte
 * for byte; the pieces one by one; and hostile input: deep nesting, huge loops, output and memory
 * bounds, unterminated tags and unknown names must end in a clear error, never a crash.
 */
#include <jansson.h>

#include "../test.h"
#include "template.h"

/* Renders src with the JSON context ctx_json and default options (plus an optional clock). The result
 * (NULL on error, *e filled) is malloc'd. */
static char *render_with(const char *src, const char *ctx_json, const api_template_opts *o, api_template_error *e) {
    api_template *t = api_template_compile(src, strlen(src), e);
    if (!t) return NULL;
    json_t *ctx = json_loads(ctx_json ? ctx_json : "{}", JSON_DECODE_ANY, NULL);
    char *out = api_template_render(t, ctx, o, NULL, e);
    json_decref(ctx);
    api_template_free(t);
    return out;
}
static char *render(const char *src, const char *ctx_json) {
    api_template_error e;
    char *out = render_with(src, ctx_json, NULL, &e);
    if (!out) fprintf(stderr, "  render error %d:%d: %s\n", e.line, e.col, e.message);
    return out;
}

#define ASSERT_RENDERS(src, ctx, want) do { \
        char *out_ = render(src, ctx); \
        if (!out_ || strcmp(out_, want)) { \
            TEST_FAIL_("%s: \"%s\" != \"%s\"", src, out_ ? out_ : "(error)", want); \
            free(out_); \
            return; \
        } \
        free(out_); \
    } while (0)

/* The template fails (at compile or render time) with a message containing `part`. */
#define ASSERT_FAILS(src, ctx, part) do { \
        api_template_error e_; \
        char *out_ = render_with(src, ctx, NULL, &e_); \
        if (out_) { TEST_FAIL_("%s: rendered \"%s\", expected an error", src, out_); free(out_); return; } \
        if (!strstr(e_.message, part)) { TEST_FAIL_("%s: error \"%s\" lacks \"%s\"", src, e_.message, part); return; } \
    } while (0)

/* ============================================================ pieces */

TEST(lexer_text_tags_and_whitespace) {
    ASSERT_RENDERS("a { b } c {x", NULL, "a { b } c {x");
    ASSERT_RENDERS("{{ '}}' }}|{{ {'a': {'b': 1}} }}", NULL, "}}|{\"a\": {\"b\": 1}}");
    ASSERT_RENDERS("x  {{- 1 -}}  y", NULL, "x1y");
    /* trim_blocks, and one final newline dropped */
    ASSERT_RENDERS("x\n{% if true %}\ny\n{% endif %}\nz\n", NULL, "x\ny\nz");
    ASSERT_RENDERS("x\n   {% if true %}y{% endif %}", NULL, "x\ny");              /* lstrip_blocks */
    ASSERT_RENDERS("x\n   {{ 'y' }}", NULL, "x\n   y");                           /* ... not before {{ */
    ASSERT_RENDERS("a\u00a0{#- c -#}\u3000b", NULL, "ab");                        /* Unicode white space */
    ASSERT_RENDERS("{{ 'a\\tb\\u00e9\\ud83d\\ude00' }}", NULL, "a\tb\xc3\xa9\xf0\x9f\x98\x80");
}

TEST(parser_precedence) {
    ASSERT_RENDERS("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }}", NULL, "7 9 4 64");
    ASSERT_RENDERS("{{ 'a' + 'b' | upper }} {{ not 1 in [1] }} {{ 1 if 0 else 2 if 0 else 3 }}", NULL, "aB false 3");
    ASSERT_RENDERS("{{ [1, 2, 3] | length - 1 }} {{ 'x' is string and 1 is number }}", NULL, "2 true");
    ASSERT_RENDERS("{{ 'abc'[1:] }}{{ [1,2,3][::-2] }}", NULL, "bc[3, 1]");
}

TEST(context_values) {
    const char *ctx = "{\"s\": \"x\", \"i\": 3, \"r\": 2.0, \"h\": 2.5, \"b\": false, \"n\": null, "
                      "\"a\": [1, \"two\"], \"o\": {\"z\": 1, \"1\": 2}}";
    ASSERT_RENDERS("{{ s }}{{ i }}{{ r }}{{ h }}{{ b }}[{{ n }}]{{ a }}{{ o }}", ctx,
                   "x322.5false[][1, \"two\"]{\"1\": 2, \"z\": 1}");
    ASSERT_RENDERS("{{ missing }}|{{ missing is defined }}|{{ o.nope.deeper is defined }}", ctx, "|false|false");
}

TEST(output_keeps_nul_bytes) {
    api_template_error e;
    api_template *t = api_template_compile("[{{ s }}]", 9, &e);
    ASSERT_TRUE(t != NULL);
    json_t *ctx = json_pack("{s:s#}", "s", "a\0b", (size_t)3);
    size_t n = 0;
    char *out = api_template_render(t, ctx, NULL, &n, &e);
    ASSERT_TRUE(out != NULL);
    ASSERT_EQ_INT(n, 5);
    ASSERT_TRUE(memcmp(out, "[a\0b]", 5) == 0);
    free(out);
    out = api_template_render(t, NULL, NULL, &n, &e);  /* no context: no variables */
    ASSERT_STREQ(out, "[]");
    ASSERT_EQ_INT(n, 2);
    free(out);
    json_decref(ctx);
    api_template_free(t);
}

TEST(clock_from_the_caller) {
    api_template_opts o;
    api_template_opts_default(&o);
    api_template_error e;
    char *out = render_with("{{ strftime_now is defined }}", NULL, &o, &e);
    ASSERT_STREQ(out, "true");
    free(out);
    ASSERT_FAILS("{{ strftime_now('%Y') }}", NULL, "no clock");
    api_template_time now = {2026, 12, 3, 9, 5};
    o.now = &now;
    out = render_with("{{ strftime_now('%d %b %Y, %H:%M (%B)') }}", NULL, &o, &e);
    ASSERT_STREQ(out, "03 Dec 2026, 09:05 (December)");
    free(out);
}

/* ============================================================ errors */

TEST(compile_errors_name_the_place) {
    api_template_error e;
    const char *src = "ab\n  {{ x ) }}";
    ASSERT_TRUE(api_template_compile(src, strlen(src), &e) == NULL);
    ASSERT_EQ_INT(e.line, 2);
    ASSERT_EQ_INT(e.col, 8);
    ASSERT_TRUE(strstr(e.message, "'}}'") != NULL);
    src = "a\n    {% if %}";  /* lstrip_blocks removed the indent; the column is still the source's */
    ASSERT_TRUE(api_template_compile(src, strlen(src), &e) == NULL);
    ASSERT_EQ_INT(e.line, 2);
    ASSERT_EQ_INT(e.col, 11);
    ASSERT_FAILS("{% if x %}open", NULL, "endif");
    ASSERT_FAILS("{% for x in y %}open{% else %}", NULL, "endfor");
    ASSERT_FAILS("{{ 'unterminated }}", NULL, "unterminated string");
    ASSERT_FAILS("{# no end", NULL, "unterminated comment");
    ASSERT_FAILS("{{ x", NULL, "end of template");
    ASSERT_FAILS("{% call foo() %}x{% endcall %}", NULL, "not supported");
    ASSERT_FAILS("{% filter upper %}x{% endfilter %}", NULL, "not supported");
    ASSERT_FAILS("{% frobnicate %}", NULL, "unknown statement");
    ASSERT_FAILS("{{ 1 + }}", NULL, "unexpected");
    ASSERT_FAILS("{{ x | }}", NULL, "unexpected");
    ASSERT_FAILS("{{ x[1:2:3:4] }}", NULL, "three parts");
    ASSERT_FAILS("{{ '\\q' }}", NULL, "escaped character");
    ASSERT_FAILS("{{ f(a=1, 2) }}", NULL, "positional argument follows keyword");
    ASSERT_FAILS("{% macro m(a, a) %}{% endmacro %}", NULL, "duplicate parameter");
    ASSERT_FAILS("{{ x ? y }}", NULL, "unexpected character");
    ASSERT_FAILS("{{ \xff }}", NULL, "UTF-8");
}

TEST(runtime_errors_name_the_place) {
    api_template_error e;
    char *out = render_with("ok\n  {{ raise_exception('Roles must alternate') }}", NULL, NULL, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_STREQ(e.message, "Roles must alternate");
    ASSERT_EQ_INT(e.line, 2);
    ASSERT_FAILS("{{ 'x' | frobnicate }}", NULL, "Unknown StringValue filter: frobnicate");
    ASSERT_FAILS("{{ [1] | frobnicate(2) }}", NULL, "Unknown ArrayValue filter: frobnicate");
    ASSERT_FAILS("{{ 1 is frobnicated }}", NULL, "Unknown test: frobnicated");
    ASSERT_FAILS("{{ nope() }}", NULL, "not a function");
    ASSERT_FAILS("{{ m + 1 }}", NULL, "undefined");
    ASSERT_FAILS("{% break %}", NULL, "outside of a loop");
    ASSERT_FAILS("{{ x }}", "[1]", "must be a JSON object");
    ASSERT_FAILS("{{ x }}", "{\"true\": 1}", "already declared: true");
    ASSERT_FAILS("{{ x }}", "{\"namespace\": 1}", "already declared: namespace");
}

/* ============================================================ hostile input */

static char *repeat(const char *a, int n, const char *mid, const char *b, int m) {
    size_t la = strlen(a), lm = strlen(mid), lb = strlen(b);
    char *s = malloc(la * (size_t)n + lm + lb * (size_t)m + 1), *p = s;
    for (int i = 0; i < n; i++) memcpy(p, a, la), p += la;
    memcpy(p, mid, lm), p += lm;
    for (int i = 0; i < m; i++) memcpy(p, b, lb), p += lb;
    *p = 0;
    return s;
}

/* "{{ " head unit*n tail " }}" */
static char *in_tag(const char *head, const char *unit, int n, const char *tail) {
    char *a = repeat("{{ ", 1, head, unit, n);
    char *s = malloc(strlen(a) + strlen(tail) + 4);
    sprintf(s, "%s%s }}", a, tail);
    free(a);
    return s;
}

/* like ASSERT_FAILS for a malloc'd source, which it frees */
#define ASSERT_SRC_FAILS(src, part) do { \
        char *s_ = (src); \
        api_template_error e_; \
        char *o_ = render_with(s_, NULL, NULL, &e_); \
        free(s_); \
        if (o_) { free(o_); TEST_FAIL_("rendered, expected an error with \"%s\"", part); return; } \
        if (!strstr(e_.message, part)) { TEST_FAIL_("error \"%s\" lacks \"%s\"", e_.message, part); return; } \
    } while (0)

TEST(deep_nesting_is_an_error) {
    ASSERT_SRC_FAILS(in_tag("", "(", 100000, "1"), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("", "[", 100000, "1"), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("", "not ", 100000, "1"), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("", "- ", 100000, "1"), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("f", "()", 100000, ""), "nested too deeply");
    ASSERT_SRC_FAILS(repeat("{% if true %}", 10000, "x", "{% endif %}", 10000), "nested too deeply");
    ASSERT_SRC_FAILS(repeat("{% for x in [1] %}", 10000, "x", "{% endfor %}", 10000), "nested too deeply");
    /* long chains parse flat but evaluate nested: the evaluation depth bound stops them */
    ASSERT_SRC_FAILS(in_tag("x", ".a", 100000, ""), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("1", " + 1", 100000, ""), "nested too deeply");
    ASSERT_SRC_FAILS(in_tag("'x'", " | trim", 100000, ""), "nested too deeply");
    ASSERT_FAILS("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, "nested too deeply");
    api_template_opts o;  /* a caller's huge depth is clamped: still an error, not a stack overflow */
    api_template_opts_default(&o);
    o.max_depth = 1 << 30;
    api_template_error e;
    char *out = render_with("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, &o, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_TRUE(strstr(e.message, "max_depth 1024") != NULL);
    ASSERT_FAILS("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", NULL, "nested too deeply");
    char *deep = repeat("{\"x\": ", 1, "", "[", 300);  /* a context deeper than max_depth */
    char *deep2 = repeat(deep, 1, "", "]", 300);
    deep2 = realloc(deep2, strlen(deep2) + 2);
    strcat(deep2, "}");
    ASSERT_FAILS("{{ x }}", deep2, "nested too deeply");
    free(deep), free(deep2);
}

TEST(work_and_size_are_bounded) {
    ASSERT_FAILS("{% for i in range(100000000000) %}{% endfor %}", NULL, "step limit");
    ASSERT_FAILS("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", NULL, "exceeded");
    ASSERT_FAILS("{% set s = 'xxxxxxxx' %}{% for i in range(64) %}{% set s = s ~ s %}{% endfor %}", NULL, "exceeds");
    api_template_opts o;
    api_template_opts_default(&o);
    o.max_output = 1000;
    api_template_error e;
    char *out = render_with("{% for i in range(1000) %}xx{% endfor %}", NULL, &o, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_TRUE(strstr(e.message, "output exceeds 1000 bytes") != NULL);
    out = render_with("{% for i in range(400) %}xx{% endfor %}", NULL, &o, &e);
    ASSERT_TRUE(out != NULL && strlen(out) == 800);
    free(out);
    api_template_opts_default(&o);
    o.max_memory = 1 << 20;
    out = render_with("{% set s = 'xxxxxxxx' %}{% for i in range(40) %}{% set s = s ~ s %}{% endfor %}", NULL, &o, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_TRUE(strstr(e.message, "memory limit") != NULL);
    api_template_opts_default(&o);
    o.max_steps = 50;
    out = render_with("{% for i in range(10) %}{{ i }}{% endfor %}", NULL, &o, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_TRUE(strstr(e.message, "50 steps") != NULL);
    api_template_opts_default(&o);
    o.max_memory = 0;
    out = render_with("x", NULL, &o, &e);
    ASSERT_TRUE(out == NULL);
    ASSERT_TRUE(strstr(e.message, "invalid render options") != NULL);
    ASSERT_TRUE(api_template_render(NULL, NULL, NULL, NULL, &e) == NULL);
    api_template *empty = api_template_compile(NULL, 0, &e);
    ASSERT_TRUE(empty != NULL);
    out = api_template_render(empty, NULL, NULL, NULL, &e);
    ASSERT_STREQ(out, "");
    free(out);
    api_template_free(empty);
    char *big = malloc((1u << 20) + 2);
    memset(big, 'x', (1u << 20) + 1);
    big[(1u << 20) + 1] = 0;
    ASSERT_TRUE(api_template_compile(big, strlen(big), &e) == NULL);
    ASSERT_TRUE(strstr(e.message, "larger than") != NULL);
    free(big);
}

TEST(garbage_never_crashes) {
    /* every prefix of a real template, and byte flips of it: compile may fail, render may fail, neither crashes */
    const char *src = "{%- set ns = namespace(a=1) -%}{% for m in messages[::-1] if m.role != 'x' %}"
                      "{{ m.content | trim | tojson(indent=2) }}{% if loop.last %}{{ ns.a ~ '\\n' }}{% endif %}"
                      "{% else %}{{ raise_exception('none') }}{% endfor %}{# c #}{{ x.split(',')[0].strip() }}";
    size_t n = strlen(src);
    json_t *ctx = json_loads("{\"messages\": [{\"role\": \"user\", \"content\": \" hi \"}], \"x\": \"a,b\"}", 0, NULL);
    char *buf = malloc(n + 1);
    int rendered = 0;
    for (size_t len = 0; len <= n; len++) {
        for (int flip = -1; flip < (int)len; flip += 7) {
            memcpy(buf, src, len);
            if (flip >= 0) buf[flip] = "{}%#-|()[]'\".,: x"[(size_t)flip % 17];
            api_template_error e;
            api_template *t = api_template_compile(buf, len, &e);
            if (!t) { CHECK_TRUE(e.message[0] != 0); continue; }
            char *out = api_template_render(t, ctx, NULL, NULL, &e);
            if (out) rendered++;
            else CHECK_TRUE(e.message[0] != 0);
            free(out);
            api_template_free(t);
        }
    }
    free(buf);
    json_decref(ctx);
    ASSERT_TRUE(rendered > 10);
}

/* ============================================================ goldens */

typedef struct golden_stats {
    int files, cases, outputs, errors;
} golden_stats;

static void check_golden(const char *path, const char *name, void *ud) {
    golden_stats *st = ud;
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    if (!g) { TEST_FAIL_("%s: %s", name, je.text); return; }
    st->files++;
    json_t *now = json_object_get(g, "now");
    api_template_time clock = {
        (int)json_integer_value(json_object_get(now, "year")), (int)json_integer_value(json_object_get(now, "month")),
        (int)json_integer_value(json_object_get(now, "day")), (int)json_integer_value(json_object_get(now, "hour")),
        (int)json_integer_value(json_object_get(now, "minute")),
    };
    api_template_opts o;
    api_template_opts_default(&o);
    o.now = &clock;
    const char *file_tpl = json_string_value(json_object_get(g, "template"));
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(g, "cases"), i, c) {
        const char *cname = json_string_value(json_object_get(c, "name"));
        json_t *tj = json_object_get(c, "template");
        const char *src = tj ? json_string_value(tj) : file_tpl;
        size_t src_len = tj ? json_string_length(tj) : json_string_length(json_object_get(g, "template"));
        json_t *want = json_object_get(c, "output");
        st->cases++;
        api_template_error e;
        api_template *t = api_template_compile(src, src_len, &e);
        char *out = NULL;
        size_t out_len = 0;
        json_t *ctx = json_object_get(c, "context");
        if (!ctx) ctx = json_object_get(g, "context");
        if (t) out = api_template_render(t, ctx, &o, &out_len, &e);
        api_template_free(t);
        if (want) {
            st->outputs++;
            const char *w = json_string_value(want);
            size_t wn = json_string_length(want);
            if (!out) {
                TEST_FAIL_("%s/%s: error %d:%d: %s", name, cname, e.line, e.col, e.message);
            } else if (out_len != wn || memcmp(out, w, wn)) {
                size_t k = 0;
                while (k < out_len && k < wn && out[k] == w[k]) k++;
                TEST_FAIL_("%s/%s: differs at byte %zu (got %zu bytes, want %zu)\n  got:  \"%.80s\"\n  want: \"%.80s\"",
                           name, cname, k, out_len, wn, out + (k > 20 ? k - 20 : 0), w + (k > 20 ? k - 20 : 0));
            }
        } else {
            st->errors++;
            if (out) TEST_FAIL_("%s/%s: rendered, but the reference fails with \"%s\"", name, cname,
                                json_string_value(json_object_get(c, "error")));
            else if (!e.message[0]) TEST_FAIL_("%s/%s: failed without a message", name, cname);
        }
        free(out);
    }
    json_decref(g);
}

TEST(goldens_match_huggingface_jinja) {
    golden_stats st = {0};
    int n = test_foreach_fixture("template", ".json", check_golden, &st);
    fprintf(stderr, "  %d golden files, %d cases (%d outputs, %d errors)\n", st.files, st.cases, st.outputs, st.errors);
    ASSERT_TRUE(n >= 10);  /* a missing golden file must not pass quietly */
    ASSERT_TRUE(st.outputs >= 250);
    ASSERT_TRUE(st.errors >= 150);
}

int main(void) {
    RUN(lexer_text_tags_and_whitespace);
    RUN(parser_precedence);
    RUN(context_values);
    RUN(output_keeps_nul_bytes);
    RUN(clock_from_the_caller);
    RUN(compile_errors_name_the_place);
    RUN(runtime_errors_name_the_place);
    RUN(deep_nesting_is_an_error);
    RUN(work_and_size_are_bounded);
    RUN(garbage_never_crashes);
    RUN(goldens_match_huggingface_jinja);
    return test_summary();
}
