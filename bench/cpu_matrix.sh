#!/usr/bin/env bash
# cpu_matrix.sh - the whole CPU speed comparison of docs/benchmarks.md in one command: codemoe against
# llama.cpp and ik_llama.cpp (default and -rtr 1) on every benchmark file, with codemoe's decode against
# the memory bandwidth bound, and the sparse MoE's decode against a dense model of its active size.
#
#   bench/cpu_matrix.sh [-r 2] [-p 512] [-n 128] [-l LOGDIR] CODEMOE LLAMA_BENCH IK_LLAMA_BENCH
#
# Files (bench/inputs.sh makes the missing ones; the 1.5B and 30B-A3B-shaped F32 sources take ~25 GB and
# several minutes): Qwen2.5-0.5B-shaped Q8_0 and Q4_K_M at 1 and 2 threads; Qwen2.5-Coder-1.5B-shaped
# Q8_0 and Q4_K_M, the Qwen3-Coder-30B-A3B-shaped file (6 layers, Q4_K_M) and the dense qwen3 of its active
# size (Q4_K_M) at 1 thread. Each group is one bench/compare_llamacpp.sh run (-b: --membw), whose tables
# are printed as they come; the end adds the MoE/dense decode ratio of each engine. Raw outputs: LOGDIR
# (default: a fresh directory under $TMPDIR), one subdirectory per group.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
reps=2 pp=512 tg=128 logdir=""
usage() {
    sed -n '5p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while getopts "r:p:n:l:h" o; do
    case $o in
    r) reps=$OPTARG ;;
    p) pp=$OPTARG ;;
    n) tg=$OPTARG ;;
    l) logdir=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# = 3 ] || usage
codemoe=$1 lbench=$2 ikbench=$3
[ -n "$logdir" ] || logdir=$(mktemp -d -t cpu_matrix.XXXXXX)
mkdir -p "$logdir"
# the quantised inputs are made by the codemoe under test
export CODEMOE=$codemoe

inputs() { "$here/inputs.sh" "$@"; }
small=$(inputs model05b-q8_0 model05b-q4_k_m)
large=$(inputs model15b-q8_0 model15b-q4_k_m model30ba3b-q4_k_m model30ba3b-dense-q4_k_m)

# group NAME THREADS FILE...: one compare_llamacpp.sh run over the files
group() {
    local name=$1 t=$2
    shift 2
    echo "### $name (threads $t; $(date -u '+%F %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$here/compare_llamacpp.sh" -t "$t" -r "$reps" -p "$pp" -n "$tg" -b -k "$ikbench" -l "$logdir/$name" \
        "$codemoe" "$lbench" "$@"
    echo
}
# shellcheck disable=SC2086 # one path per line, no spaces in the cache's file names
group small "1 2" $small
# shellcheck disable=SC2086
group large 1 $large

# the sparse MoE's decode against the dense model of its active size, per engine, from the raw tables
# (compare_llamacpp.sh's file names: BASE-tT-ENGINE.md; codemoe's t/cpu-s, the others' t/s)
moe=$(basename "$(inputs model30ba3b-q4_k_m)" .gguf) dense=$(basename "$(inputs model30ba3b-dense-q4_k_m)" .gguf)
# shellcheck source=bench/md_table.sh
. "$here/md_table.sh"
echo "### qwen3moe decode against a dense qwen3 of its active parameters (goal: within 25%, ratio >= 0.75)"
echo "| engine | tg$tg $moe | tg$tg $dense | moe / dense |"
echo "|---|---:|---:|---:|"
for e in codemoe llama ik ik-rtr; do
    a=$(mean_of "$(md_get "$logdir/large/$moe-t1-$e.md" "tg$tg" "t/s" 2>/dev/null)")
    b=$(mean_of "$(md_get "$logdir/large/$dense-t1-$e.md" "tg$tg" "t/s" 2>/dev/null)")
    r=$(awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0 && b > 0) printf "%.2f", a / b; else print "-" }')
    echo "| $e | $a | $b | $r |"
done
echo
echo "raw: $logdir"
