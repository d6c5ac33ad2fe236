/*
 * kernel_families.h - runs a set of kernel tests once per kernel family the machine runs
 * (engine/kernels_family.h), so each family is held to the references, not only the one the process
 * would pick.
 *
 *   static void kernel_tests(void) { RUN(vec_dot_equals_ref); ... }
 *   int main(void) { test_each_family(kernel_tests); ... }
 *
 * A family this CPU cannot run is named on stderr as compiled but not run. It is a failure when no
 * family ran, or when switching to one did not take.
 */
#ifndef CM_TEST_KERNEL_FAMILIES_H
#define CM_TEST_KERNEL_FAMILIES_H

#include "../test.h"
#include "codemoe.h"
#include "kernels.h"

static inline void test_each_family(void (*tests)(void)) {
    const char *chosen = cm_kernels_isa();
    int ran = 0;
    for (int i = 0; i < cm_kernels_family_count(); i++) {
        const char *name = cm_kernels_family_name(i);
        if (!cm_kernels_family_runs(i)) {
            fprintf(stderr, "-- kernel family %s: compiled, not run (this CPU lacks it)\n", name);
            continue;
        }
        if (cm_kernels_use(name) != 0 || strcmp(cm_kernels_isa(), name) != 0) {
            TEST_FAIL_("cannot switch to kernel family %s (in use: %s)", name, cm_kernels_isa());
            test__tests_failed++;
            continue;
        }
        fprintf(stderr, "-- kernel family %s\n", name);
        tests();
        ran++;
    }
    if (!ran) {
        TEST_FAIL_("no kernel family ran");
        test__tests_failed++;
    }
    cm_kernels_use(chosen);
}

#endif
