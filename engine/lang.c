/*
 * lang.c - programming-language helpers for MoLE routing: the Markdown fence tracker, name
 * normalisation and a prompt language detector. Pure functions over bytes; no model, no allocation.
 *
 * The fence tracker follows tools/reference_moe.py's mole_sets_from_fences exactly (the goldens' adapter
 * sets come from it): a piece is classified by the current line's text so far plus the piece, with
 * leading SPACES skipped, starting with ```; the block state toggles when a completed line, stripped of
 * all whitespace, starts with ```.
 */
#include <ctype.h>
#include <string.h>

#include "codemoe.h"

/* ============================================================ names */

static const struct {
    const char *alias, *name;
} lang_alias[] = {
    {"py", "python"}, {"python3", "python"}, {"py3", "python"}, {"rs", "rust"}, {"js", "javascript"},
    {"jsx", "javascript"}, {"mjs", "javascript"}, {"node", "javascript"}, {"c++", "cpp"}, {"cc", "cpp"},
    {"cxx", "cpp"}, {"hpp", "cpp"}, {"h", "c"}, {"cs", "csharp"}, {"c#", "csharp"}, {"golang", "go"},
    {"ts", "typescript"}, {"tsx", "typescript"}, {"rb", "ruby"}, {"kt", "kotlin"}, {"sh", "bash"},
    {"shell", "bash"}, {"zsh", "bash"},
};

static int is_ws(int ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\v' || ch == '\f'; }

int cm_lang_normalize(const char *name, size_t len, char out[CM_LANG_NAME_MAX + 1]) {
    out[0] = 0;
    if (!name) return 0;
    while (len && is_ws((unsigned char)*name)) name++, len--;
    while (len && is_ws((unsigned char)name[len - 1])) len--;
    if (len == 0 || len > CM_LANG_NAME_MAX) return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (ch < 0x21 || ch > 0x7e) return 0; /* printable ASCII only: it becomes part of messages */
        out[i] = (char)tolower(ch);
    }
    out[len] = 0;
    for (size_t i = 0; i < sizeof lang_alias / sizeof lang_alias[0]; i++)
        if (!strcmp(out, lang_alias[i].alias)) {
            strcpy(out, lang_alias[i].name);
            break;
        }
    return (int)strlen(out);
}

/* ============================================================ fence tracker */

void cm_fence_init(cm_fence *f) { memset(f, 0, sizeof *f); }

/* f->line keeps the current line's first bytes after its leading whitespace; f->lead_ws records
 * whether that leading whitespace held anything but spaces (then lstrip(" ") cannot reach the ```). */
int cm_fence_classify(const cm_fence *f, const char *piece, size_t len, const char **lang) {
    /* the line so far + the piece, leading spaces skipped, must start with ``` */
    char buf[3];
    int nb = 0, bad = f->lead_ws;
    for (int i = 0; i < f->line_len && i < (int)sizeof f->line && nb < 3; i++) buf[nb++] = f->line[i];
    for (size_t i = 0; i < len && nb < 3 && !bad; i++) {
        char ch = piece[i];
        if (nb == 0 && f->line_len == 0 && ch == ' ') continue;
        buf[nb++] = ch;
    }
    int fence_line = !bad && nb == 3 && !memcmp(buf, "```", 3);
    if (lang) *lang = f->in_block && !fence_line ? f->lang : NULL;
    return fence_line ? CM_FENCE_LINE : f->in_block ? CM_FENCE_CODE : CM_FENCE_TEXT;
}

static void end_line(cm_fence *f) {
    /* the line, stripped of all whitespace, starts with ```: open or close a block */
    int n = f->line_len < (int)sizeof f->line ? f->line_len : (int)sizeof f->line;
    if (n >= 3 && !memcmp(f->line, "```", 3)) {
        if (f->in_block) {
            f->in_block = 0;
            f->lang[0] = 0;
        } else {
            f->in_block = 1;
            /* a tag longer than the kept bytes cannot be a language we know: "" */
            if (f->line_len <= (int)sizeof f->line)
                cm_lang_normalize(f->line + 3, (size_t)(n - 3), f->lang);
            else
                f->lang[0] = 0;
        }
    }
    f->line_len = 0;
    f->lead_ws = 0;
    memset(f->line, 0, sizeof f->line);
}

void cm_fence_push(cm_fence *f, const char *piece, size_t len) {
    for (size_t i = 0; i < len; i++) {
        char ch = piece[i];
        if (ch == '\n') {
            end_line(f);
            continue;
        }
        if (f->line_len == 0 && is_ws((unsigned char)ch)) {
            if (ch != ' ') f->lead_ws = 1; /* leading tab etc.: not a fence line for classify */
            continue;
        }
        if (f->line_len < (int)sizeof f->line) f->line[f->line_len] = ch;
        if (f->line_len < 1 << 30) f->line_len++;
    }
}

/* ============================================================ detector */

static int has_prefix(const char *p, const char *end, const char *s) {
    size_t n = strlen(s);
    return (size_t)(end - p) >= n && !memcmp(p, s, n);
}

/* language of a file name's extension, or NULL */
static const char *lang_of_ext(const char *name, size_t len) {
    static const struct {
        const char *ext, *lang;
    } ext[] = {
        {"py", "python"}, {"pyi", "python"}, {"rs", "rust"}, {"go", "go"}, {"java", "java"},
        {"js", "javascript"}, {"mjs", "javascript"}, {"jsx", "javascript"}, {"ts", "typescript"},
        {"tsx", "typescript"}, {"c", "c"}, {"h", "c"}, {"cc", "cpp"}, {"cpp", "cpp"}, {"cxx", "cpp"},
        {"hpp", "cpp"}, {"hh", "cpp"}, {"cs", "csharp"}, {"rb", "ruby"}, {"kt", "kotlin"}, {"php", "php"},
        {"swift", "swift"}, {"scala", "scala"}, {"sh", "bash"}, {"lua", "lua"}, {"r", "r"},
    };
    const char *dot = NULL;
    for (size_t i = 0; i < len; i++)
        if (name[i] == '.') dot = name + i;
    if (!dot) return NULL;
    size_t el = len - (size_t)(dot + 1 - name);
    char e[8];
    if (el == 0 || el >= sizeof e) return NULL;
    for (size_t i = 0; i < el; i++) e[i] = (char)tolower((unsigned char)dot[1 + i]);
    e[el] = 0;
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++)
        if (!strcmp(e, ext[i].ext)) return ext[i].lang;
    return NULL;
}

static int is_path_ch(int ch) { return isalnum(ch) || ch == '.' || ch == '_' || ch == '-' || ch == '/' || ch == '\\'; }

/* A file-name hint on a line: "<filename>x.py", "# file: x.py", "// path: src/main.rs", or a line that
 * is only a path (FIM prompts often start with one). */
static const char *lang_of_line_hint(const char *p, const char *end) {
    static const char *tags[] = {"<filename>", "file:", "filename:", "path:", "File:", "Path:", "<reponame>"};
    while (p < end && (*p == ' ' || *p == '\t' || *p == '#' || *p == '/' || *p == '*' || *p == '-' || *p == '!'))
        p++;
    for (size_t t = 0; t < sizeof tags / sizeof tags[0]; t++) {
        if (!has_prefix(p, end, tags[t])) continue;
        const char *q = p + strlen(tags[t]);
        while (q < end && *q == ' ') q++;
        const char *s = q;
        while (q < end && is_path_ch((unsigned char)*q)) q++;
        const char *l = lang_of_ext(s, (size_t)(q - s));
        if (l) return l;
    }
    /* a bare path: one word with a '/' or a '.', nothing else on the line */
    const char *s = p, *q = p;
    while (q < end && is_path_ch((unsigned char)*q)) q++;
    const char *r = q;
    while (r < end && (*r == ' ' || *r == '\t' || *r == '\r')) r++;
    if (r == end && q > s && memchr(s, '/', (size_t)(q - s))) return lang_of_ext(s, (size_t)(q - s));
    return NULL;
}

/* Keyword statistics: count tokens characteristic of each language; the winner needs a clear lead. */
typedef struct kw {
    const char *word;
    int lang; /* index into kw_langs */
    int weight;
} kw;

static const char *kw_langs[] = {"python", "rust", "go", "java", "javascript", "cpp", "c", "csharp"};
enum { KL_PY, KL_RS, KL_GO, KL_JAVA, KL_JS, KL_CPP, KL_C, KL_CS, KL_N };

static const kw kws[] = {
    {"def ", KL_PY, 3}, {"elif ", KL_PY, 4}, {"import ", KL_PY, 1}, {"self.", KL_PY, 3}, {"None", KL_PY, 2},
    {"print(", KL_PY, 2}, {"lambda ", KL_PY, 2}, {"__init__", KL_PY, 4}, {"):\n", KL_PY, 2},
    {"fn ", KL_RS, 3}, {"let mut ", KL_RS, 4}, {"impl ", KL_RS, 3}, {"&self", KL_RS, 3}, {"pub fn", KL_RS, 3},
    {"println!", KL_RS, 4}, {"::new(", KL_RS, 2}, {"Vec<", KL_RS, 3}, {"-> ", KL_RS, 1}, {"usize", KL_RS, 3},
    {"func ", KL_GO, 3}, {"package ", KL_GO, 2}, {":= ", KL_GO, 3}, {"fmt.", KL_GO, 4}, {"chan ", KL_GO, 3},
    {"public class ", KL_JAVA, 3}, {"System.out", KL_JAVA, 5}, {"public static void", KL_JAVA, 4},
    {"private ", KL_JAVA, 1}, {"String[]", KL_JAVA, 3}, {"@Override", KL_JAVA, 4},
    {"function ", KL_JS, 3}, {"const ", KL_JS, 1}, {"=> ", KL_JS, 2}, {"console.log", KL_JS, 5},
    {"let ", KL_JS, 1}, {"require(", KL_JS, 3}, {"===", KL_JS, 3},
    {"#include <", KL_CPP, 1}, {"std::", KL_CPP, 4}, {"cout", KL_CPP, 3}, {"template<", KL_CPP, 4},
    {"namespace ", KL_CPP, 2}, {"vector<", KL_CPP, 3},
    {"#include <", KL_C, 2}, {"printf(", KL_C, 3}, {"malloc(", KL_C, 3}, {"int main(", KL_C, 2},
    {"struct ", KL_C, 1}, {"->", KL_C, 1},
    {"using System", KL_CS, 5}, {"Console.Write", KL_CS, 5}, {"public void ", KL_CS, 1}, {"namespace ", KL_CS, 1},
    {"var ", KL_CS, 1}, {"string ", KL_CS, 1},
};

const char *cm_lang_detect(const char *text, size_t len) {
    if (!text) return NULL;
    const char *end = text + len;
    /* 1. the first opening fence with a language */
    cm_fence f;
    cm_fence_init(&f);
    static _Thread_local char fence_lang[CM_LANG_NAME_MAX + 1];
    for (const char *p = text; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl + 1 : end;
        cm_fence_push(&f, p, (size_t)(le - p));
        if (f.in_block && f.lang[0]) {
            memcpy(fence_lang, f.lang, sizeof fence_lang);
            return fence_lang;
        }
        p = le;
    }
    /* 2. a file-name hint in the first lines */
    int lines = 0;
    for (const char *p = text; p < end && lines < 8; lines++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *l = lang_of_line_hint(p, le);
        if (l) return l;
        p = nl ? nl + 1 : end;
    }
    /* 3. keyword statistics */
    int score[KL_N] = {0};
    for (const char *p = text; p < end; p++) {
        if (p != text && (isalnum((unsigned char)p[-1]) || p[-1] == '_')) continue; /* word starts only */
        for (size_t k = 0; k < sizeof kws / sizeof kws[0]; k++)
            if (*p == kws[k].word[0] && has_prefix(p, end, kws[k].word)) score[kws[k].lang] += kws[k].weight;
    }
    int best = 0, second = -1;
    for (int i = 1; i < KL_N; i++)
        if (score[i] > score[best]) best = i;
    for (int i = 0; i < KL_N; i++)
        if (i != best && (second < 0 || score[i] > score[second])) second = i;
    /* convincing: enough evidence and a lead of a third over the runner-up */
    if (score[best] >= 4 && score[best] * 3 >= score[second] * 4 + 1) return kw_langs[best];
    return NULL;
}

const char *cm_lang_for_request(const char *explicit_lang, const char *text, size_t len) {
    if (explicit_lang) return explicit_lang;
    if (!text || memmem(text, len, "```", 3)) return NULL;
    return cm_lang_detect(text, len);
}
