/*
 * test_lang.c - the Markdown fence tracker, language-name normalisation and the prompt language
 * detector (engine/lang.c), on hand-written texts fed whole, byte by byte and in odd pieces.
 */
#include "../test.h"
#include "codemoe.h"

/* classify every byte of text fed in pieces of `step` bytes; out[i] = class of the piece holding byte i
 * (its first byte decides), lang of code pieces in langs[i] */
static void classify(const char *text, int step, int *out, char langs[][CM_LANG_NAME_MAX + 1]) {
    cm_fence f;
    cm_fence_init(&f);
    size_t n = strlen(text);
    for (size_t i = 0; i < n; i += (size_t)step) {
        size_t k = n - i < (size_t)step ? n - i : (size_t)step;
        const char *lang;
        int c = cm_fence_classify(&f, text + i, k, &lang);
        for (size_t j = i; j < i + k; j++) {
            out[j] = c;
            snprintf(langs[j], CM_LANG_NAME_MAX + 1, "%s", c == CM_FENCE_CODE ? lang : "");
        }
        cm_fence_push(&f, text + i, k);
    }
}

TEST(fence_blocks_and_lines) {
    const char *t = "Sort:\n```python\nx.sort()\n```\nRust:\n  ```rs\nv.sort();\n```\nend";
    int cls[256];
    char langs[256][CM_LANG_NAME_MAX + 1];
    classify(t, 1, cls, langs);
    const char *x = strstr(t, "x.sort"), *v = strstr(t, "v.sort"), *e = strstr(t, "end");
    ASSERT_EQ_INT(cls[0], CM_FENCE_TEXT);
    /* byte pieces: a lone ` is not yet a fence; the third one and the rest of the line are */
    ASSERT_EQ_INT(cls[6], CM_FENCE_TEXT);
    ASSERT_EQ_INT(cls[8], CM_FENCE_LINE);
    ASSERT_EQ_INT(cls[9], CM_FENCE_LINE);
    ASSERT_EQ_INT(cls[x - t], CM_FENCE_CODE);
    ASSERT_STREQ(langs[x - t], "python");
    ASSERT_EQ_INT(cls[strstr(t, "```\nRust") - t + 2], CM_FENCE_LINE); /* closing fence */
    ASSERT_EQ_INT(cls[strstr(t, "Rust") - t], CM_FENCE_TEXT);
    ASSERT_EQ_INT(cls[v - t], CM_FENCE_CODE);
    ASSERT_STREQ(langs[v - t], "rust");                    /* alias rs, indented fence */
    ASSERT_EQ_INT(cls[e - t], CM_FENCE_TEXT);
    /* the same decisions whatever the piece boundaries (pieces decided by their first byte) */
    for (int step = 2; step <= 5; step++) {
        int c2[256];
        char l2[256][CM_LANG_NAME_MAX + 1];
        classify(t, step, c2, l2);
        for (size_t i = 0; i < strlen(t); i += (size_t)step) {
            int want = cls[i];
            /* a piece holding a ` may complete a fence line earlier than single bytes do */
            size_t rem = strlen(t) - i < (size_t)step ? strlen(t) - i : (size_t)step;
            int tick = memchr(t + i, 0x60, rem) != NULL;
            if (c2[i] != want && !tick && want != CM_FENCE_LINE) TEST_FAIL_("step %d byte %zu: %d vs %d", step, i, c2[i], want);
        }
    }
}

TEST(fence_edge_cases) {
    cm_fence f;
    cm_fence_init(&f);
    /* a tab before ``` is not a fence line for classification, but the line still toggles the block
     * (the reference strips all whitespace there): follow it exactly */
    cm_fence_push(&f, "\t```go\n", 7);
    ASSERT_EQ_INT(f.in_block, 1);
    ASSERT_STREQ(f.lang, "go");
    ASSERT_EQ_INT(cm_fence_classify(&f, "``", 2, NULL), CM_FENCE_CODE); /* only two backticks so far */
    cm_fence_push(&f, "``", 2);
    ASSERT_EQ_INT(cm_fence_classify(&f, "`", 1, NULL), CM_FENCE_LINE);
    cm_fence_push(&f, "`\n", 2);
    ASSERT_EQ_INT(f.in_block, 0);
    /* unnamed block, overlong tag, and a very long line do not break the tracker */
    cm_fence_push(&f, "```\ncode\n```\n", 13);
    ASSERT_EQ_INT(f.in_block, 0);
    cm_fence_push(&f, "```averyveryveryverylonglanguagename-that-is-too-long-to-keep\n", 62);
    ASSERT_EQ_INT(f.in_block, 1);
    ASSERT_STREQ(f.lang, "");
    char big[5000];
    memset(big, 'x', sizeof big);
    cm_fence_push(&f, big, sizeof big);
    cm_fence_push(&f, "\n```\n", 5);
    ASSERT_EQ_INT(f.in_block, 0);
    ASSERT_EQ_INT(cm_fence_classify(&f, "", 0, NULL), CM_FENCE_TEXT);
}

TEST(normalize_names) {
    char out[CM_LANG_NAME_MAX + 1];
    ASSERT_EQ_INT(cm_lang_normalize("Py", 2, out), 6);
    ASSERT_STREQ(out, "python");
    cm_lang_normalize(" C++ ", 5, out);
    ASSERT_STREQ(out, "cpp");
    cm_lang_normalize("c#", 2, out);
    ASSERT_STREQ(out, "csharp");
    cm_lang_normalize("golang", 6, out);
    ASSERT_STREQ(out, "go");
    ASSERT_EQ_INT(cm_lang_normalize("", 0, out), 0);
    ASSERT_EQ_INT(cm_lang_normalize("a name with spaces", 18, out), 0);
    ASSERT_EQ_INT(cm_lang_normalize("abcdefghijklmnopqrstuvwxyz", 26, out), 0);
    ASSERT_EQ_INT(cm_lang_normalize("\xff\xfe", 2, out), 0);
}

static const char *det(const char *s) { return cm_lang_detect(s, strlen(s)); }

TEST(lang_for_request) {
    /* the field wins; fences leave the choice to the per-token tracker; else the detector */
    ASSERT_STREQ(cm_lang_for_request("go", "def f(x):\n    return x\n", 24), "go");
    const char *fenced = "see\n```python\nx = 1\n```\n";
    ASSERT_TRUE(cm_lang_for_request(NULL, fenced, strlen(fenced)) == NULL);
    const char *py = "import os\ndef f(x):\n    return os.path.join(x)\n";
    ASSERT_STREQ(cm_lang_for_request(NULL, py, strlen(py)), "python");
    ASSERT_TRUE(cm_lang_for_request(NULL, NULL, 0) == NULL);
}

TEST(detector) {
    ASSERT_STREQ(det("Please fix:\n```rust\nfn main() {}\n```\n"), "rust");
    ASSERT_STREQ(det("<filename>src/app/main.go\npackage main\n"), "go");
    ASSERT_STREQ(det("# file: utils/helpers.py\nimport os\n"), "python");
    ASSERT_STREQ(det("src/lib/Widget.java\n"), "java");
    ASSERT_STREQ(det("def f(x):\n    if x is None:\n        return self.y\n    elif x:\n        print(x)\n"), "python");
    ASSERT_STREQ(det("fn add(a: usize, b: usize) -> usize {\n    let mut s = a;\n    println!(\"{}\", s);\n}\n"), "rust");
    ASSERT_STREQ(det("func main() {\n\tx := 1\n\tfmt.Println(x)\n}\n"), "go");
    ASSERT_STREQ(det("function f(a) {\n  const b = a === 1;\n  console.log(b);\n}\n"), "javascript");
    ASSERT_STREQ(det("#include <iostream>\nint main() { std::cout << std::endl; }\n"), "cpp");
    ASSERT_STREQ(det("public class A {\n  public static void main(String[] args) { System.out.println(1); }\n}\n"), "java");
    ASSERT_TRUE(det("The quick brown fox jumps over the lazy dog.") == NULL);
    ASSERT_TRUE(det("") == NULL);
    ASSERT_TRUE(cm_lang_detect(NULL, 5) == NULL);
    /* hostile bytes: no crash, no language */
    char junk[300];
    for (int i = 0; i < 300; i++) junk[i] = (char)(i * 7 + 3);
    (void)cm_lang_detect(junk, sizeof junk);
}

int main(void) {
    RUN(fence_blocks_and_lines);
    RUN(fence_edge_cases);
    RUN(normalize_names);
    RUN(detector);
    RUN(lang_for_request);
    return test_summary();
}
