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

#define ASSERT_RENDERS(src, ctx, want) do { char *out_ = render(src, ctx); \
    if (!out_ || strcmp(out_, want)) { TEST_FAIL_("%s: \"%s\" != \"%s\"", src, out_ ? out_ : "(error)", want); free(out_); return; } \
    free(out_); } while (0)

/* The template fails (at compile or render time) with a message containing `part`. */
#define ASSERT_FAILS(src, ctx, part) do { api_template_error e_; char *out_ = render_with(src, ctx, NULL, &e_); \
    if (out_) { TEST_FAIL_("%s: rendered \"%s\", expected an error", src, out_); free(out_); return; } \
    if (!strstr(e_.message, part)) { TEST_FAIL_("%s: error \"%s\" lacks \"%s\"", src, e_.message, part); return; } } while (0)

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
    ASSERT_TRUE(n >= 9);
    ASSERT_TRUE(st.outputs >= 150);
    ASSERT_TRUE(st.errors >= 10);
}

int main(void) {
    RUN(goldens_match_huggingface_jinja);
    return test_summary();
}
