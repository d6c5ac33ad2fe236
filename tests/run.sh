#!/usr/bin/env bash
# tests/run.sh - the one test command (README, CI): installs what the build needs (Debian 12, as root),
# runs the tokenizer fixture fetch, builds a release tree, a clang tree (-Werror) and an ASan+UBSan
# debug tree, runs `meson test` (all suites on release; the C unit tests on clang; unit + golden under
# the sanitizers), and ends with exactly one line "N passed, N failed" summed over the trees. Exits
# non-zero if any test or any step failed.
#
# Environment: CM_SKIP_ASAN=1 skips the sanitizer tree (local quick runs); JOBS (default 2) for ninja.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=${JOBS:-2}
PASSED=0
FAILED=0

log() { printf '== %s\n' "$*" >&2; }
step_failed() { log "FAILED: $*"; FAILED=$((FAILED + 1)); }
finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ] && exit 0
    exit 1
}

# ---------------------------------------------------------------- dependencies
PKGS=(meson ninja-build pkg-config gcc clang libc6-dev libmicrohttpd-dev libuv1-dev libjansson-dev
      libopenblas-dev libopenblas0-pthread libpcre2-dev libutf8proc-dev
      python3 python3-numpy python3-torch   # self-tests of tools/ (unit suite, py_*)
      chromium                              # the browser the CORS and playground tests drive (tests/integration/browser.mjs)
      haproxy prometheus)                   # deploy/: the load balancer test; promtool (also server_pool)
command -v node >/dev/null 2>&1 || PKGS+=(nodejs)
command -v npm >/dev/null 2>&1 || PKGS+=(npm)
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        step_failed "missing packages (${missing[*]}); run as root: sudo bash tests/run.sh"
        finish
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq </dev/null >/dev/null ||
       ! apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null; then
        step_failed "apt-get install ${missing[*]}"
        finish
    fi
fi

# ---------------------------------------------------------------- tokenizer reference data
if [ -f tests/tokenizer/fetch.sh ]; then
    log "tests/tokenizer/fetch.sh"
    bash tests/tokenizer/fetch.sh </dev/null || step_failed "tests/tokenizer/fetch.sh"
fi

# ---------------------------------------------------------------- build + test
# run_tree DIR SETUP_ARGS... -- TEST_ARGS...: configure (once), build, test, add the counts.
mkdir -p build-logs
run_tree() {
    local dir=$1; shift
    local setup=() test=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do setup+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    test=("$@")
    if [ ! -f "$dir/build.ninja" ]; then
        log "meson setup $dir ${setup[*]}"
        if ! meson setup "$dir" "${setup[@]}" >"build-logs/$dir.setup.log" 2>&1; then
            cat "build-logs/$dir.setup.log" >&2
            step_failed "meson setup $dir"
            return
        fi
    fi
    log "ninja -C $dir"
    if ! ninja -C "$dir" -j"$JOBS" >"build-logs/$dir.build.log" 2>&1; then
        tail -n 60 "build-logs/$dir.build.log" >&2
        step_failed "build $dir"
        return
    fi
    if [ "${test[0]:-}" = "--no-python" ]; then
        # the sanitizer tree runs the C tests of the named suites; the py_* tests are not C and were
        # already run in the release tree
        test=("${test[@]:1}")
        local names=() suites=() rest=() a
        while [ ${#test[@]} -gt 0 ]; do
            if [ "${test[0]}" = --suite ]; then suites+=(--suite "${test[1]}"); test=("${test[@]:2}")
            else rest+=("${test[0]}"); test=("${test[@]:1}"); fi
        done
        for a in $(meson test -C "$dir" --list "${suites[@]}" 2>/dev/null | sed -n 's|^[^ ]* / ||p'); do
            case $a in py_*) ;; *) names+=("$a") ;; esac
        done
        if [ ${#names[@]} -eq 0 ]; then
            log "no tests in ${suites[*]} for $dir"
            return
        fi
        test=("${rest[@]}" "${names[@]}")
    fi
    log "meson test -C $dir ${test[*]}"
    local out rc
    out=$(meson test -C "$dir" --no-rebuild --print-errorlogs --num-processes "$JOBS" "${test[@]}" 2>&1)
    rc=$?
    printf '%s\n' "$out"
    local ok xfail fail upass tmo
    ok=$(printf '%s\n' "$out" | sed -n 's/^Ok: *\([0-9]*\).*/\1/p' | tail -n1)
    xfail=$(printf '%s\n' "$out" | sed -n 's/^Expected Fail: *\([0-9]*\).*/\1/p' | tail -n1)
    fail=$(printf '%s\n' "$out" | sed -n 's/^Fail: *\([0-9]*\).*/\1/p' | tail -n1)
    upass=$(printf '%s\n' "$out" | sed -n 's/^Unexpected Pass: *\([0-9]*\).*/\1/p' | tail -n1)
    tmo=$(printf '%s\n' "$out" | sed -n 's/^Timeout: *\([0-9]*\).*/\1/p' | tail -n1)
    if [ -z "$ok" ] && [ -z "$fail" ]; then
        # no summary: either no test matched the suites (fine) or meson test itself broke
        if [ $rc -ne 0 ] || ! printf '%s\n' "$out" | grep -q 'No suitable tests defined'; then
            step_failed "meson test -C $dir (no summary, exit $rc)"
        fi
        return
    fi
    PASSED=$((PASSED + ${ok:-0} + ${xfail:-0}))
    FAILED=$((FAILED + ${fail:-0} + ${upass:-0} + ${tmo:-0}))
    if [ $rc -ne 0 ] && [ $((${fail:-0} + ${upass:-0} + ${tmo:-0})) -eq 0 ]; then
        step_failed "meson test -C $dir exited $rc"
    fi
}

run_tree build-ci --buildtype=release -- --timeout-multiplier 2
# the same C built by clang with warnings as errors (portable C11, not GCC's dialect); only the C unit
# tests run in it, everything else already ran in the release tree
CC=clang run_tree build-ci-clang --buildtype=release -Dwerror=true -- --no-python --suite unit --timeout-multiplier 2
if [ "${CM_SKIP_ASAN:-0}" != 1 ]; then
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
    export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
    run_tree build-ci-asan -Db_sanitize=address,undefined -Db_lundef=false --buildtype=debug \
        -- --no-python --suite unit --suite golden --timeout-multiplier 4
fi
finish
