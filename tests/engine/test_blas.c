/*
 * test_blas.c - engine/blas.c: cm_blas_core names the kernel family OpenBLAS runs, and
 * cm_blas_better_core suggests "SkylakeX" exactly when an AVX2-only family runs on a CPU with the
 * AVX-512 subsets it needs, never for an AVX-512 family. OpenBLAS picks the family when it loads, so
 * each case re-runs this binary with OPENBLAS_CORETYPE set and reads what the child reports.
 */
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "codemoe.h"
#include "test.h"

/* Child mode: prints "<core> <better or ->" and exits. */
static int child_report(void) {
    const char *b = cm_blas_better_core();
    printf("%s %s\n", cm_blas_core(), b ? b : "-");
    return 0;
}

/* Runs this binary with OPENBLAS_CORETYPE=core; its report in out. 0 on success. */
static int run_child(const char *self, const char *core, char *out, size_t cap) {
    int fd[2];
    if (pipe(fd) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(fd[1], 1);
        close(fd[0]);
        setenv("OPENBLAS_CORETYPE", core, 1);
        execl(self, self, "--child", (char *)NULL);
        _exit(127);
    }
    close(fd[1]);
    size_t n = 0;
    ssize_t r;
    while (n + 1 < cap && (r = read(fd[0], out + n, cap - 1 - n)) > 0) n += (size_t)r;
    out[n] = 0;
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

/* The rule, stated plainly: does this CPU have AVX-512 F, CD, BW, DQ and VL? */
static int cpu_has_avx512(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static const char *self_path;

TEST(core_is_named) {
    const char *c = cm_blas_core();
    ASSERT_TRUE(c != NULL && c[0] != 0);
    const char *b = cm_blas_better_core();
    CHECK_TRUE(b == NULL || !strcmp(b, "SkylakeX"));
}

TEST(better_core_only_for_avx2_families_on_avx512_cpus) {
#if defined(__x86_64__)
    char out[256], core[128], better[128];
    /* an AVX2-only family: a suggestion exactly when the CPU can do better */
    ASSERT_EQ_INT(run_child(self_path, "Haswell", out, sizeof out), 0);
    ASSERT_EQ_INT(sscanf(out, "%127s %127s", core, better), 2);
    ASSERT_STREQ(core, "Haswell");
    ASSERT_STREQ(better, cpu_has_avx512() ? "SkylakeX" : "-");
    /* an AVX-512 family: never a suggestion */
    ASSERT_EQ_INT(run_child(self_path, "SkylakeX", out, sizeof out), 0);
    ASSERT_EQ_INT(sscanf(out, "%127s %127s", core, better), 2);
    ASSERT_STREQ(better, "-");
#endif
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--child")) return child_report();
    self_path = argv[0];
    RUN(core_is_named);
    RUN(better_core_only_for_avx2_families_on_avx512_cpus);
    return test_summary();
}
