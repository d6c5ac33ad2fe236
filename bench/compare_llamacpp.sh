#!/usr/bin/env bash
# compare_llamacpp.sh - prefill and decode speed of codemoe and llama.cpp on the same GGUF files.
#
#   bench/compare_llamacpp.sh [-t "1 2"] [-r 3] [-p 512] [-n 128] [-l LOGDIR] [-e] CODEMOE LLAMA_BENCH MODEL...
#
# For every model and thread count it runs `codemoe bench` and then `llama-bench` with the same
# -p/-n/-t/-r (interleaved, so that a neighbour's load on a shared machine hits both alike rather than one
# whole column), then prints one table: tokens/s of both (mean ± sample std over the reps) and the ratio
# ours/theirs. Both tools measure ppN as one N-token batch with logits for the last token only, and tgN as
# N single-token decodes, each after an unmeasured warm-up run. "load" is the 1-minute load average just
# before the pair ran: a value above the core count means the pair shared the CPU with other work.
# A second table gives tokens per CPU-second of all threads, which depends much less on other processes
# sharing the machine: codemoe prints it; for llama.cpp (which does not) the script runs the pp and tg tests
# as separate llama-bench processes under time(1) and subtracts the CPU cost of loading the model.
# -e adds a third engine column: codemoe again with CODEMOE_EXACT_ACTIVATIONS=1 (f32 activations and sgemm,
# the exact reference path, instead of the default int8 activations: integer dots in decode and the int8
# GEMM in prefill, as llama.cpp does), run right after the default codemoe; the default column always runs
# with CODEMOE_EXACT_ACTIVATIONS unset, whatever the caller's environment says. -n 0 (or -p 0) leaves
# decode (or prefill) out.
# The raw outputs of both tools go to LOGDIR (default: a fresh directory under $TMPDIR).
set -u
# OpenBLAS picks its kernels from OPENBLAS_CORETYPE when set: the build machine forces Haswell (AVX2)
# globally, which a stock install does not; let it detect the CPU unless asked to keep it.
[ "${CM_KEEP_OPENBLAS_CORETYPE:-0}" = 1 ] || unset OPENBLAS_CORETYPE

threads="1 2" reps=3 pp=512 tg=128 logdir="" exact=0
usage() {
    sed -n '3p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while getopts "t:r:p:n:l:eh" o; do
    case $o in
    t) threads=${OPTARG//,/ } ;;
    r) reps=$OPTARG ;;
    p) pp=$OPTARG ;;
    n) tg=$OPTARG ;;
    l) logdir=$OPTARG ;;
    e) exact=1 ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 3 ] || usage
codemoe=$1 lbench=$2
shift 2
for x in "$codemoe" "$lbench"; do
    [ -x "$x" ] || { echo "compare_llamacpp: $x is not an executable" >&2; exit 2; }
done
for m in "$@"; do
    [ -r "$m" ] || { echo "compare_llamacpp: cannot read $m" >&2; exit 2; }
done
[ -n "$logdir" ] || logdir=$(mktemp -d -t compare_llamacpp.XXXXXX)
mkdir -p "$logdir"

# md_get FILE TEST COLUMN: the COLUMN cell of the markdown row whose "test" cell is TEST. Columns are
# found by their header names, so the two tools' different column sets parse alike. Prints "-" if absent.
md_get() {
    awk -F'|' -v want="$2" -v col="$3" '
        function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
        /^\|/ {
            if (!hdr) { for (i = 2; i < NF; i++) h[trim($i)] = i; hdr = 1; next }
            if ($0 ~ /^\| *-/ || !("test" in h) || !(col in h)) next
            if (trim($h["test"]) == want) { print trim($h[col]); found = 1; exit }
        }
        END { if (!found) print "-" }' "$1"
}

# mean of a "12.34 ± 0.56" cell, or "-"
mean_of() { awk '{ print ($1 ~ /^[0-9.]+$/) ? $1 : "-" }' <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
short() { awk '{ if ($1 ~ /^[0-9.]+$/ && $3 ~ /^[0-9.]+$/) printf "%.2f±%.2f", $1, $3; else print "-" }' <<<"$1"; }

# cpu_run OUT CMD...: run CMD with stdout to OUT, stderr to OUT.err; CPU seconds (user + sys) to OUT.cpu
cpu_run() {
    local out=$1
    shift
    /usr/bin/time -f '%U %S' -o "$out.time" "$@" >"$out" 2>"$out.err"
    local rc=$?
    awk '{ s = $1 + $2 } END { print s + 0 }' "$out.time" >"$out.cpu"
    return $rc
}
# tokens per CPU-second from a token count and CPU seconds net of the model-loading cost
per_cpu() { awk -v n="$1" -v c="$2" -v b="$3" 'BEGIN { c -= b; if (c > 0) printf "%.2f", n / c; else print "-" }'; }

# one test's cells: ours, llama.cpp, ratio, and with -e also the exact run and its ratio to llama.cpp
tf='%14s | %14s | %5s |' cf='%10s | %10s | %5s |' tsep=' -------------: | -------------: | ----: |'
csep=' ---------: | ---------: | ----: |'
if [ $exact = 1 ]; then
    tf+=' %14s | %5s |' cf+=' %10s | %5s |' tsep+=' -------------: | ----: |' csep+=' ---------: | ----: |'
fi
rfmt="| %-22s | %-5s | %7s | $tf $tf %5s |" cfmt="| %-22s | %-5s | %7s | $cf $cf"
# -n 0 (or -p 0) leaves that test out of the runs and the tables
tests=()
[ "$pp" = 0 ] || tests+=("pp$pp")
[ "$tg" = 0 ] || tests+=("tg$tg")
[ ${#tests[@]} -gt 0 ] || usage
if [ ${#tests[@]} = 1 ]; then
    rfmt="| %-22s | %-5s | %7s | $tf %5s |" cfmt="| %-22s | %-5s | %7s | $cf"
    tsep2=$tsep csep2=$csep
else
    tsep2=$tsep$tsep csep2=$csep$csep
fi
hdr=()
for test in "${tests[@]}"; do
    hdr+=("$test ours" "$test llama" ratio)
    [ $exact = 0 ] || hdr+=("$test exact" ratio)
done

rows=() crows=()
for m in "$@"; do
    base=$(basename "$m" .gguf)
    # llama-bench reports no CPU time: run pp and tg as separate processes under time(1), and subtract what
    # loading the model and a 1-token test cost (measured here), to get tokens per CPU-second like ours
    lb0="$logdir/$base-llamacpp-load.md"
    cpu_run "$lb0" "$lbench" -m "$m" -p 1 -n 0 -t 1 -r 1 -o md || echo "   llama-bench failed, see $lb0.err" >&2
    cpu0=$(cat "$lb0.cpu")
    for t in $threads; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        ours="$logdir/$base-t$t-codemoe.md" theirs="$logdir/$base-t$t-llamacpp"
        echo "== $base threads=$t (load $load): codemoe" >&2
        env -u CODEMOE_EXACT_ACTIVATIONS "$codemoe" bench --model "$m" -p "$pp" -n "$tg" -t "$t" -r "$reps" >"$ours" 2>"$ours.err" ||
            echo "   codemoe bench failed, see $ours.err" >&2
        ours8="$logdir/$base-t$t-codemoe-exact.md"
        if [ $exact = 1 ]; then
            echo "== $base threads=$t: codemoe, CODEMOE_EXACT_ACTIVATIONS=1" >&2
            CODEMOE_EXACT_ACTIVATIONS=1 "$codemoe" bench --model "$m" -p "$pp" -n "$tg" -t "$t" -r "$reps" >"$ours8" 2>"$ours8.err" ||
                echo "   codemoe bench failed, see $ours8.err" >&2
        fi
        echo "== $base threads=$t: llama-bench" >&2
        : >"$theirs-pp.md" >"$theirs-tg.md"
        [ "$pp" = 0 ] || cpu_run "$theirs-pp.md" "$lbench" -m "$m" -p "$pp" -n 0 -t "$t" -r "$reps" -o md ||
            echo "   llama-bench failed, see $theirs-pp.md.err" >&2
        [ "$tg" = 0 ] || cpu_run "$theirs-tg.md" "$lbench" -m "$m" -p 0 -n "$tg" -t "$t" -r "$reps" -o md ||
            echo "   llama-bench failed, see $theirs-tg.md.err" >&2
        cat "$theirs-pp.md" "$theirs-tg.md" >"$theirs.md"
        type=$(md_get "$ours" "${tests[0]}" type)
        [ "$type" != "-" ] || type=$(md_get "$ours" "${tests[${#tests[@]} - 1]}" type)
        cells=() ccells=()
        for test in "${tests[@]}"; do
            o=$(md_get "$ours" "$test" "t/s") l=$(md_get "$theirs.md" "$test" "t/s")
            cells+=("$(short "$o")" "$(short "$l")" "$(ratio "$(mean_of "$o")" "$(mean_of "$l")")")
            if [ $exact = 1 ]; then
                o8=$(md_get "$ours8" "$test" "t/s")
                cells+=("$(short "$o8")" "$(ratio "$(mean_of "$o8")" "$(mean_of "$l")")")
            fi
            # tokens llama-bench processed: the warm-up is a full ppN, or a 1-token decode
            if [ "$test" = "pp$pp" ]; then n=$((pp * (reps + 1))) f="$theirs-pp.md.cpu"; else n=$((tg * reps + 1)) f="$theirs-tg.md.cpu"; fi
            oc=$(md_get "$ours" "$test" "t/cpu-s") lc=$(per_cpu "$n" "$(cat "$f")" "$cpu0")
            ccells+=("$oc" "$lc" "$(ratio "$oc" "$lc")")
            if [ $exact = 1 ]; then
                oc8=$(md_get "$ours8" "$test" "t/cpu-s")
                ccells+=("$oc8" "$(ratio "$oc8" "$lc")")
            fi
        done
        rows+=("$(printf "$rfmt" "$base" "$type" "$t" "${cells[@]}" "$load")")
        crows+=("$(printf "$cfmt" "$base" "$type" "$t" "${ccells[@]}")")
    done
done

lbuild=$(cat "$logdir"/*-llamacpp.md 2>/dev/null | grep -m1 '^build:' || echo 'build: ?')
echo "codemoe: $codemoe; llama.cpp: $lbench ($lbuild); reps $reps; raw: $logdir"
echo
echo "tokens/s (wall clock), mean ± std over $reps runs; ratio = ours / llama.cpp$([ $exact = 1 ] && echo "; exact: codemoe with CODEMOE_EXACT_ACTIVATIONS=1")"
printf "$rfmt\n" model type threads "${hdr[@]}" load
echo "| ---------------------- | ----- | ------: |$tsep2 ----: |"
printf '%s\n' "${rows[@]}"
echo
echo "tokens per CPU-second of all threads (less sensitive to other load; llama.cpp's net of model loading)"
printf "$cfmt\n" model type threads "${hdr[@]}"
echo "| ---------------------- | ----- | ------: |$csep2"
printf '%s\n' "${crows[@]}"
