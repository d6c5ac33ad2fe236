#!/usr/bin/env bash
# compare_llamacpp.sh - prefill and decode speed of codemoe, llama.cpp and (with -k) ik_llama.cpp on the
# same GGUF files.
#
#   bench/compare_llamacpp.sh [-t "1 2"] [-r 3] [-p 512] [-n 128] [-l LOGDIR] [-e] [-b] [-i ISA] [-k IK_LLAMA_BENCH] CODEMOE LLAMA_BENCH MODEL...
#
# For every model and thread count it runs `codemoe bench` and then each other engine's `llama-bench` with
# the same -p/-n/-t/-r (interleaved, so that a neighbour's load on a shared machine hits all alike rather
# than one whole column), then prints one table: tokens/s of each (mean ± sample std over the reps) and the
# ratio codemoe / that engine after each engine's column. All tools measure ppN as one N-token batch with
# logits for the last token only, and tgN as N single-token decodes, each after an unmeasured warm-up run.
# "load" is the 1-minute load average just before the row ran: a value above the core count means the
# engines shared the CPU with other work.
# A second table gives tokens per CPU-second of all threads, which depends much less on other processes
# sharing the machine: codemoe prints it; for llama-bench (which does not) the script runs the pp and tg
# tests as separate processes under time(1) and subtracts the CPU cost of loading the model.
# -k adds ik_llama.cpp (the path of its llama-bench) twice: as it loads by default ("ik") and with -rtr 1,
# its run-time repacking of the weights at load ("ik-rtr"; the repacking's CPU time counts as loading).
# -e adds codemoe again with CODEMOE_EXACT_ACTIVATIONS=1 (f32 activations and sgemm, the exact reference
# path, instead of the default int8 activations: integer dots in decode and the int8 GEMM in prefill, as
# llama.cpp does), run right after the default codemoe, and its ratio to llama.cpp; the default column
# always runs with CODEMOE_EXACT_ACTIVATIONS unset, whatever the caller's environment says.
# -b passes --membw to codemoe bench and adds a third table: the bytes a decode token reads, the bound the
# measured memory bandwidth sets and codemoe's fraction of it, on the wall clock and on the CPU clock. -n 0 (or -p 0) leaves decode (or prefill) out.
# -i runs codemoe (both columns with -e) with CODEMOE_ISA=ISA, the kernel family it names (avx2, scalar,
# ...); without -i codemoe takes CODEMOE_ISA from the caller's environment, if set, else the best family
# the CPU runs. The other engines ignore the variable and run as built (build llama.cpp for the same ISA
# to compare like with like). The output's first line names the family codemoe used (its --version).
# The raw outputs of all tools go to LOGDIR (default: a fresh directory under $TMPDIR).
set -u
# OpenBLAS picks its kernels from OPENBLAS_CORETYPE when set: the build machine forces Haswell (AVX2)
# globally, which a stock install does not; let it detect the CPU unless asked to keep it.
[ "${CM_KEEP_OPENBLAS_CORETYPE:-0}" = 1 ] || unset OPENBLAS_CORETYPE

threads="1 2" reps=3 pp=512 tg=128 logdir="" exact=0 ikbench="" membw="" isa=""
brows=() bwlines=()
usage() {
    sed -n '3p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while getopts "t:r:p:n:l:k:i:beh" o; do
    case $o in
    t) threads=${OPTARG//,/ } ;;
    r) reps=$OPTARG ;;
    p) pp=$OPTARG ;;
    n) tg=$OPTARG ;;
    l) logdir=$OPTARG ;;
    e) exact=1 ;;
    k) ikbench=$OPTARG ;;
    b) membw=--membw ;;
    i) isa=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 3 ] || usage
codemoe=$1 lbench=$2
shift 2
for x in "$codemoe" "$lbench" ${ikbench:+"$ikbench"}; do
    [ -x "$x" ] || { echo "compare_llamacpp: $x is not an executable" >&2; exit 2; }
done
for m in "$@"; do
    [ -r "$m" ] || { echo "compare_llamacpp: cannot read $m" >&2; exit 2; }
done
codemoe_env=(env -u CODEMOE_EXACT_ACTIVATIONS)
[ -z "$isa" ] || codemoe_env+=("CODEMOE_ISA=$isa")
family=$("${codemoe_env[@]}" "$codemoe" --version 2>&1 | tr '\n' ' ' | sed 's/ *$//')
[ -n "$logdir" ] || logdir=$(mktemp -d -t compare_llamacpp.XXXXXX)
mkdir -p "$logdir"

# shellcheck source=bench/md_table.sh
. "$(dirname "$0")/md_table.sh"
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

# The engines compared with codemoe, each run by llama-bench: llama.cpp always; with -k, ik_llama.cpp
# twice, as it loads by default and with its run-time repacking of the weights (-rtr 1)
eng_name=(llama) eng_bin=("$lbench") eng_args=("")
if [ -n "$ikbench" ]; then
    eng_name+=(ik ik-rtr) eng_bin+=("$ikbench" "$ikbench") eng_args+=("" "-rtr 1")
fi
n_eng=${#eng_name[@]}

# -n 0 (or -p 0) leaves that test out of the runs and the tables
tests=()
[ "$pp" = 0 ] || tests+=("pp$pp")
[ "$tg" = 0 ] || tests+=("tg$tg")
[ ${#tests[@]} -gt 0 ] || usage

# Columns per test: codemoe, then each engine and codemoe's ratio to it, then with -e the exact run and
# its ratio to llama.cpp. The format strings and the header are built from that one list.
rfmt='| %-22s | %-5s | %7s |' cfmt=$rfmt sep='| ---------------------- | ----- | ------: |'
hdr=()
for test in "${tests[@]}"; do
    rfmt+=' %14s |' cfmt+=' %10s |' sep+=' ---------: |'
    hdr+=("$test ours")
    for e in "${eng_name[@]}"; do
        rfmt+=' %14s | %5s |' cfmt+=' %10s | %5s |' sep+=' ---------: | ----: |'
        hdr+=("$test $e" ratio)
    done
    if [ $exact = 1 ]; then
        rfmt+=' %14s | %5s |' cfmt+=' %10s | %5s |' sep+=' ---------: | ----: |'
        hdr+=("$test exact" ratio)
    fi
done
rsep="$sep ----: |"
rfmt+=' %5s |'

# run_codemoe OUT MODEL THREADS [ENV...]: codemoe bench's table for one model and thread count
run_codemoe() {
    local out=$1 m=$2 t=$3
    shift 3
    "${codemoe_env[@]}" "$@" "$codemoe" bench --model "$m" -p "$pp" -n "$tg" -t "$t" -r "$reps" \
        $membw >"$out" 2>"$out.err" || echo "   codemoe bench failed, see $out.err" >&2
}

# run_lbench E OUT MODEL THREADS: engine E's llama-bench, its pp and tg tests as separate processes under
# time(1), into OUT-pp.md and OUT-tg.md (and their .cpu), concatenated into OUT.md. llama-bench reports no
# CPU time: the caller subtracts what loading the model and a 1-token test cost (lbench_load).
# shellcheck disable=SC2086 # eng_args holds separate words
run_lbench() {
    local e=$1 out=$2 m=$3 t=$4
    : >"$out-pp.md"
    : >"$out-tg.md"
    [ "$pp" = 0 ] || cpu_run "$out-pp.md" "${eng_bin[e]}" -m "$m" -p "$pp" -n 0 -t "$t" -r "$reps" -o md ${eng_args[e]} ||
        echo "   ${eng_name[e]} llama-bench failed, see $out-pp.md.err" >&2
    [ "$tg" = 0 ] || cpu_run "$out-tg.md" "${eng_bin[e]}" -m "$m" -p 0 -n "$tg" -t "$t" -r "$reps" -o md ${eng_args[e]} ||
        echo "   ${eng_name[e]} llama-bench failed, see $out-tg.md.err" >&2
    cat "$out-pp.md" "$out-tg.md" >"$out.md"
}

# lbench_load E OUT MODEL: CPU seconds engine E's llama-bench spends loading MODEL (and repacking it with
# -rtr) plus a 1-token prompt, the part of each run that is not the test itself
# shellcheck disable=SC2086
lbench_load() {
    local e=$1 out=$2 m=$3
    cpu_run "$out" "${eng_bin[e]}" -m "$m" -p 1 -n 0 -t 1 -r 1 -o md ${eng_args[e]} ||
        echo "   ${eng_name[e]} llama-bench failed, see $out.err" >&2
    cat "$out.cpu"
}

rows=() crows=()
for m in "$@"; do
    base=$(basename "$m" .gguf)
    cpu0=()
    for ((e = 0; e < n_eng; e++)); do
        cpu0+=("$(lbench_load $e "$logdir/$base-${eng_name[e]}-load.md" "$m")")
    done
    for t in $threads; do
        load=$(cut -d' ' -f1 /proc/loadavg)
        ours="$logdir/$base-t$t-codemoe.md" ours8="$logdir/$base-t$t-codemoe-exact.md"
        echo "== $base threads=$t (load $load): codemoe" >&2
        run_codemoe "$ours" "$m" "$t"
        if [ $exact = 1 ]; then
            echo "== $base threads=$t: codemoe, CODEMOE_EXACT_ACTIVATIONS=1" >&2
            run_codemoe "$ours8" "$m" "$t" CODEMOE_EXACT_ACTIVATIONS=1
        fi
        for ((e = 0; e < n_eng; e++)); do
            echo "== $base threads=$t: ${eng_name[e]} llama-bench ${eng_args[e]}" >&2
            run_lbench $e "$logdir/$base-t$t-${eng_name[e]}" "$m" "$t"
        done
        type=$(md_get "$ours" "${tests[0]}" type)
        [ "$type" != "-" ] || type=$(md_get "$ours" "${tests[${#tests[@]} - 1]}" type)
        cells=() ccells=()
        for test in "${tests[@]}"; do
            o=$(md_get "$ours" "$test" "t/s") oc=$(md_get "$ours" "$test" "t/cpu-s")
            cells+=("$(short "$o")") ccells+=("$oc")
            # tokens llama-bench processed: llama.cpp's warm-up is a full ppN, ik_llama.cpp's a 1-token
            # prompt; a tgN's warm-up is a 1-token decode in both
            if [ "$test" = "pp$pp" ]; then part=pp; else n=$((tg * reps + 1)) part=tg; fi
            l0="" lc0=""
            for ((e = 0; e < n_eng; e++)); do
                lf="$logdir/$base-t$t-${eng_name[e]}"
                if [ $part = pp ]; then
                    case ${eng_name[e]} in ik*) n=$((pp * reps + 1)) ;; *) n=$((pp * (reps + 1))) ;; esac
                fi
                l=$(md_get "$lf.md" "$test" "t/s") lc=$(per_cpu "$n" "$(cat "$lf-$part.md.cpu")" "${cpu0[e]}")
                cells+=("$(short "$l")" "$(ratio "$(mean_of "$o")" "$(mean_of "$l")")")
                ccells+=("$lc" "$(ratio "$oc" "$lc")")
                [ $e != 0 ] || l0=$l lc0=$lc
            done
            if [ $exact = 1 ]; then
                o8=$(md_get "$ours8" "$test" "t/s") oc8=$(md_get "$ours8" "$test" "t/cpu-s")
                cells+=("$(short "$o8")" "$(ratio "$(mean_of "$o8")" "$(mean_of "$l0")")")
                ccells+=("$oc8" "$(ratio "$oc8" "$lc0")")
            fi
        done
        rows+=("$(printf "$rfmt" "$base" "$type" "$t" "${cells[@]}" "$load")")
        crows+=("$(printf "$cfmt" "$base" "$type" "$t" "${ccells[@]}")")
        # --membw: the decode row's bytes per token and fraction of the bandwidth bound, from codemoe
        if [ -n "$membw" ] && [ "$tg" != 0 ]; then
            brows+=("$(printf '| %-22s | %-5s | %7s | %10s | %9s | %8s | %9s | %10s |' "$base" "$type" "$t" \
                "$(md_get "$ours" "tg$tg" "MB/tok")" "$(md_get "$ours" "tg$tg" "bound t/s")" \
                "$(md_get "$ours" "tg$tg" "of bound")" "$(md_get "$ours" "tg$tg" "cpu bound")" \
                "$(md_get "$ours" "tg$tg" "cpu of bnd")")")
            bwline=$(grep '^membw:' "$ours" | tr '\n' ';')
            bwlines+=("$base: ${bwline%;}")
        fi
    done
done

# the commit each llama-bench names at the end of its markdown output
builds=""
for ((e = 0; e < n_eng; e++)); do
    [ $e -gt 0 ] && [ "${eng_bin[e]}" = "${eng_bin[e - 1]}" ] && continue
    b=$(cat "$logdir"/*-"${eng_name[e]}".md 2>/dev/null | grep -m1 '^build:' || echo 'build: ?')
    builds+="; ${eng_name[e]}: ${eng_bin[e]} ($b)"
done
echo "codemoe: $codemoe ($family)$builds; reps $reps; raw: $logdir"
echo
echo "tokens/s (wall clock), mean ± std over $reps runs; ratio = codemoe / the column before it$([ $exact = 1 ] && echo "; exact: codemoe with CODEMOE_EXACT_ACTIVATIONS=1, its ratio to llama.cpp")"
[ -z "$ikbench" ] || echo "ik: ik_llama.cpp's llama-bench as it loads by default; ik-rtr: with -rtr 1 (weights repacked at load)"
printf "$rfmt\n" model type threads "${hdr[@]}" load
echo "$rsep"
printf '%s\n' "${rows[@]}"
echo
echo "tokens per CPU-second of all threads (less sensitive to other load; llama-bench's net of model loading)"
printf "$cfmt\n" model type threads "${hdr[@]}"
echo "$sep"
printf '%s\n' "${crows[@]}"
if [ -n "$membw" ] && [ ${#brows[@]} -gt 0 ]; then
    echo
    echo "codemoe's decode against the memory bandwidth bound (codemoe bench --membw)"
    printf '%s\n' "${bwlines[@]}"
    printf '| %-22s | %-5s | %7s | %10s | %9s | %8s | %9s | %10s |\n' model type threads "MB/tok" "bound t/s" "of bound" \
        "cpu bound" "cpu of bnd"
    echo "| ---------------------- | ----- | ------: | ---------: | --------: | -------: | --------: | ---------: |"
    printf '%s\n' "${brows[@]}"
fi
