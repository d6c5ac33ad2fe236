/*
 * test.h - a minimal test harness: typed ASSERT macros that report file:line and the values, and a
 * TEST list run by main(). One test executable per module; meson runs each as its own process.
 *
 *   TEST(gguf_rejects_truncated) { ... ASSERT_EQ_INT(rc, CM_E_FORMAT); }
 *   int main(void) { RUN(gguf_rejects_truncated); ...; return test_summary(); }
 */
#ifndef CM_TEST_H
#define CM_TEST_H

#include <dirent.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test__failed_checks, test__tests_run, test__tests_failed, test__cur_failed;

#define TEST(name) static void name(void)
#define RUN(name) do { \
    test__cur_failed = 0; test__tests_run++; name(); \
    if (test__cur_failed) { test__tests_failed++; fprintf(stderr, "FAIL %s\n", #name); } \
    else fprintf(stderr, "ok   %s\n", #name); } while (0)

#define TEST_FAIL_(...) do { fprintf(stderr, "%s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); test__failed_checks++; test__cur_failed = 1; } while (0)

#define ASSERT_TRUE(c) do { if (!(c)) { TEST_FAIL_("expected true: %s", #c); return; } } while (0)
#define ASSERT_EQ_INT(a, b) do { long long a_ = (long long)(a), b_ = (long long)(b); \
    if (a_ != b_) { TEST_FAIL_("%s == %s: %lld != %lld", #a, #b, a_, b_); return; } } while (0)
#define ASSERT_NE_INT(a, b) do { long long a_ = (long long)(a), b_ = (long long)(b); \
    if (a_ == b_) { TEST_FAIL_("%s != %s: both %lld", #a, #b, a_); return; } } while (0)
#define ASSERT_STREQ(a, b) do { const char *a_ = (a), *b_ = (b); \
    if (!a_ || !b_ || strcmp(a_, b_)) { TEST_FAIL_("%s == %s: \"%s\" != \"%s\"", #a, #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)"); return; } } while (0)
#define ASSERT_NEAR(a, b, tol) do { double a_ = (a), b_ = (b); \
    if (!(fabs(a_ - b_) <= (tol))) { TEST_FAIL_("%s ~ %s: %.9g vs %.9g (tol %g)", #a, #b, a_, b_, (double)(tol)); return; } } while (0)
/* got[0..n) equals the listed token ids. */
#define ASSERT_IDS(got, n, ...) do { \
    const int32_t want_[] = {__VA_ARGS__}; \
    int nw_ = (int)(sizeof want_ / sizeof *want_); \
    ASSERT_EQ_INT(n, nw_); \
    for (int i_ = 0; i_ < nw_; i_++) ASSERT_EQ_INT((got)[i_], want_[i_]); } while (0)

/* Non-fatal variant for loops that should report every mismatch up to a limit. */
#define CHECK_TRUE(c) do { if (!(c)) TEST_FAIL_("expected true: %s", #c); } while (0)

static inline int test_summary(void) {
    fprintf(stderr, "%d tests, %d failed\n", test__tests_run, test__tests_failed);
    return test__tests_failed ? 1 : 0;
}

/* Path of a fixture file: $CM_FIXTURES/name (the meson test env sets it). */
static inline const char *test_fixture(const char *name) {
    static char buf[4096];
    const char *dir = getenv("CM_FIXTURES");
    snprintf(buf, sizeof buf, "%s/%s", dir ? dir : "tests/fixtures", name);
    return buf;
}

/* Calls fn(path, name, ud) for every file of $CM_FIXTURES/subdir whose name ends in suffix. Returns how
 * many files it visited, or -1 when the directory cannot be opened. */
static inline int test_foreach_fixture(const char *subdir, const char *suffix,
                                       void (*fn)(const char *path, const char *name, void *ud), void *ud) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", test_fixture(subdir));
    DIR *d = opendir(dir);
    if (!d) return -1;
    size_t ls = strlen(suffix);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t l = strlen(de->d_name);
        if (l < ls || strcmp(de->d_name + l - ls, suffix)) continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        fn(path, de->d_name, ud);
        n++;
    }
    closedir(d);
    return n;
}

/* Copies fixture src to dst with the value of metadata key `key` overwritten by vlen bytes of val (for
 * an array key: element elem of fixed size vlen). Returns 0, or -1 if src or the key is missing. */
static inline int test_patch_gguf_key(const char *src, const char *dst, const char *key, int elem, const void *val, size_t vlen) {
    FILE *f = fopen(test_fixture(src), "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)sz);
    if (!buf || fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        fclose(f);
        free(buf);
        return -1;
    }
    fclose(f);
    size_t kl = strlen(key);
    long at = -1;
    for (long i = 8; i + (long)kl + 4 < sz; i++) {
        uint64_t len;
        memcpy(&len, buf + i - 8, 8);
        if (len == kl && !memcmp(buf + i, key, kl)) {
            at = i + (long)kl;
            break;
        }
    }
    if (at < 0) {
        free(buf);
        return -1;
    }
    uint32_t type;
    memcpy(&type, buf + at, 4);
    long v = at + 4;
    if (type == 9) v += 4 + 8 + (long)elem * (long)vlen; /* arrays of fixed-size elements */
    memcpy(buf + v, val, vlen);
    f = fopen(dst, "wb");
    fwrite(buf, 1, (size_t)sz, f);
    fclose(f);
    free(buf);
    return 0;
}


#endif
