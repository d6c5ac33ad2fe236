#!/usr/bin/env bash
# load_compare.sh - serving under IDE-like load: `codemoe serve` and llama.cpp's llama-server, side by side.
#
#   bench/load_compare.sh [-m MODEL] [-t THREADS] [-c "1 4 16"] [-w "humaneval fim typing"] [-d SEC]
#                         [-n MAX_TOKENS] [-P PARALLEL] [-C CTX] [-s "codemoe llama.cpp"] [-l LOGDIR]
#                         [-o DOC] CODEMOE LLAMA_SERVER
#
# -s names the servers each cell runs, in this order: codemoe (its defaults), codemoe-spec (the same with
# --spec-draft 8: prompt-lookup speculation), codemoe-nospec (with --spec-draft 0), llama.cpp.
# For every workload and concurrency it starts our server, runs bench/loadgen.mjs against it, stops it,
# then does the same with llama-server (interleaved, so that load from other processes on a shared machine
# falls on both alike rather than on one whole column). Each run gets freshly started servers, so no run
# inherits a prompt cache from an earlier one. Both load the same GGUF with the same compute threads, the
# same number of parallel sequences (-P) and the same context per sequence (-C; llama-server's -c is the
# total over its slots, with --no-kv-unified where the build has it so that each slot gets its share, as
# codemoe's --ctx). llama-server runs with its defaults otherwise; its --version line goes into DOC. Requests are streamed /v1/completions with temperature 0 and cache_prompt true;
# FIM requests carry the FIM tokens in the prompt text, identical token sequences on both servers.
#
# MODEL defaults to qwen45m-q8_0.gguf in the benchmark cache (bench/inputs.sh: $CODEMOE_CACHE, default
# ~/.cache/codemoe), made there if missing by bench/make_qwen05b_gguf.py's writer with smaller shapes: a
# ~45M-parameter Qwen2 (hidden 256, 8 layers, 4 q / 2 kv heads of 64, FFN 768) with the real 151936-row
# Qwen2 vocabulary and tokenizer, random weights, Q8_0. The prompts are HumanEval-X's, from the same cache
# (bench/inputs.sh humaneval-x). LOGDIR defaults to a fresh directory under $TMPDIR. The per-run JSON of
# loadgen (every request's TTFT, inter-token gaps, outcome) and both servers' logs stay in LOGDIR. With -o,
# the generated section of DOC for this thread count (between the load_compare markers for -t THREADS) is
# replaced by this run's commands and tables, or appended; the rest of DOC is left alone. With more than
# one thread, a line under the tables gives how prefill scaled from 1 to THREADS threads before each
# workload and at the end (probe, below): a machine whose vCPUs are at times one core's hyperthreads
# says so there. Its command
# names LLAMA_SERVER under $LLAMACPP when that is set and holds it (else under $HOME when there), so no
# machine's own path goes into DOC.
set -u
# OpenBLAS picks its kernels from OPENBLAS_CORETYPE when set: the build machine forces Haswell (AVX2)
# globally, which a stock install does not; let it detect the CPU unless asked to keep it.
[ "${CM_KEEP_OPENBLAS_CORETYPE:-0}" = 1 ] || unset OPENBLAS_CORETYPE

here=$(cd "$(dirname "$0")" && pwd)
model="" threads=2 concs="1 4 16" workloads="humaneval fim typing"
dur=20 maxtok=16 parallel=16 ctx=2048 logdir="" doc="" timeout=60 sides="codemoe llama.cpp"
usage() {
    sed -n '3,8p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while getopts "m:t:c:w:d:n:P:C:s:l:o:h" o; do
    case $o in
    m) model=$OPTARG ;;
    t) threads=$OPTARG ;;
    c) concs=${OPTARG//,/ } ;;
    w) workloads=${OPTARG//,/ } ;;
    d) dur=$OPTARG ;;
    n) maxtok=$OPTARG ;;
    P) parallel=$OPTARG ;;
    C) ctx=$OPTARG ;;
    s) sides=${OPTARG//,/ } ;;
    l) logdir=$OPTARG ;;
    o) doc=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || usage
codemoe=$1 lserver=$2
for x in "$codemoe" "$lserver"; do
    [ -x "$x" ] || { echo "load_compare: $x is not an executable" >&2; exit 2; }
done
command -v node >/dev/null || { echo "load_compare: node (20 or later) is needed" >&2; exit 2; }
[ -n "$logdir" ] || logdir=$(mktemp -d -t load_compare.XXXXXX)
mkdir -p "$logdir"

[ -n "$model" ] || model=$("$here/inputs.sh" model45m) || exit 1
[ -r "$model" ] || { echo "load_compare: cannot read $model" >&2; exit 2; }
data=$("$here/inputs.sh" humaneval-x) || exit 1

# llama-server builds of 2025 have no --kv-unified (their slots always split -c); later ones share one
# KV buffer among the slots unless told not to
ll_flags=""
"$lserver" --help 2>&1 | grep -q -- '--no-kv-unified' && ll_flags="--no-kv-unified"
ll_version=$("$lserver" --version 2>&1 | grep -m1 '^version' || echo "?")

# a free loopback port (the kernel's pick; the tiny window before the server binds it is acceptable here)
free_port() { node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

pid=""
stop_server() {
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
    pid=""
}
trap 'stop_server; exit 130' INT TERM

# start_server SIDE PORT LOG: starts one server in the background (pid in $pid); 0 once /health says ok
start_server() {
    local side=$1 port=$2 log=$3
    case $side in
    codemoe | codemoe-spec | codemoe-nospec)
        local extra=()
        [ "$side" = codemoe-spec ] && extra=(--spec-draft 8)
        [ "$side" = codemoe-nospec ] && extra=(--spec-draft 0)
        "$codemoe" serve --model "$model" --host 127.0.0.1 --port "$port" --threads "$threads" \
            --parallel "$parallel" --ctx "$ctx" --queue 256 "${extra[@]}" >"$log" 2>&1 &
        ;;
    llama.cpp)
        "$lserver" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -np "$parallel" \
            -c $((parallel * ctx)) $ll_flags --metrics >"$log" 2>&1 &
        ;;
    *) echo "load_compare: unknown server '$side' (-s: codemoe, codemoe-spec, codemoe-nospec, llama.cpp)" >&2; return 1 ;;
    esac
    pid=$!
    # disowned: bash still reaps it, but does not report the abort llama-server of early 2025 may hit in
    # its exit path after SIGTERM (stop_server polls with kill -0 instead of waiting)
    disown "$pid"
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || { echo "load_compare: $side exited; see $log" >&2; pid=""; return 1; }
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && return 0
        sleep 0.2
    done
    echo "load_compare: $side not healthy after 60 s; see $log" >&2
    stop_server
    return 1
}

# request budget per run: closed-loop users, so more users need more requests to reach a steady state;
# the -d time bound ends slow runs first
requests_for() {
    case $1 in
    typing) echo $((40 * $2)) ;;
    *) echo $((6 * $2)) ;;
    esac
}

# probe: how prefill scales to THREADS on this machine now (`codemoe bench -p 512 -n 0 -t 1,THREADS`),
# printed as "1.84x": on a machine whose vCPUs are at times hyperthreads of one core the ratio falls
# from about 1.85 to 1.2, which moves every prefill-bound figure of a run with more than one thread
probe() {
    "$codemoe" bench --model "$model" -p 512 -n 0 -t "1,$threads" -r 2 2>/dev/null |
        awk -F'|' '/ pp512 / { gsub(/ /, "", $6); split($9, v, " "); t[$6] = v[1] }
                   END { if (t[1] > 0 && t['"$threads"'] > 0) printf "%.2fx", t['"$threads"'] / t[1]; else printf "?" }'
}
probes=""

t_start=$(date +%s)
jsons=()
for w in $workloads; do
    [ "$threads" -gt 1 ] && probes+="${probes:+, }before $w $(probe)"
    for c in $concs; do
        for side in $sides; do
            port=$(free_port)
            tag="$side-$w-c$c"
            start_server "$side" "$port" "$logdir/$tag.log" || continue
            node "$here/loadgen.mjs" --url "http://127.0.0.1:$port" --workload "$w" --concurrency "$c" --data "$data" \
                --requests "$(requests_for "$w" "$c")" --duration "$dur" --timeout "$timeout" \
                --max-tokens "$maxtok" --label "$side" --json "$logdir/$tag.json" --quiet \
                && jsons+=("$logdir/$tag.json")
            stop_server
            echo "load_compare: $tag done ($(($(date +%s) - t_start)) s)" >&2
        done
    done
done
[ ${#jsons[@]} -gt 0 ] || { echo "load_compare: no run finished; logs in $logdir" >&2; exit 1; }

tables=$(node "$here/loadgen.mjs" --report "${jsons[@]}")
if [ "$threads" -gt 1 ]; then
    probes+=", at the end $(probe)"
    tables+=$'\n\n'"Prefill at $threads threads against 1 (\`codemoe bench -p 512 -n 0 -t 1,$threads\`, the machine's state): $probes."
fi
echo "$tables"
echo "(per-request JSON and server logs: $logdir)"

if [ -n "$doc" ]; then
    cache=$("$here/inputs.sh" dir)   # the commands in DOC name the cache $CACHE, not this machine's path
    cm_rev=$(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo "?")
    ll_rev="llama-server $ll_version"
    ll_shown=$lserver
    [ -n "${LLAMACPP:-}" ] && ll_shown=${ll_shown/#$LLAMACPP/\$LLAMACPP}
    ll_shown=${ll_shown/#$HOME/\$HOME}
    section=$(cat <<EOF
<!-- load_compare:begin -t $threads (generated by bench/load_compare.sh; edits here are overwritten) -->
Run of $(date -u '+%Y-%m-%d %H:%M UTC'), codemoe $cm_rev, llama.cpp $ll_rev, $(nproc) CPUs, $(($(date +%s) - t_start)) s:

\`\`\`sh
bench/load_compare.sh -m ${model/#$cache/\$CACHE} -t $threads -c "$concs" -w "$workloads" -d $dur -n $maxtok -P $parallel -C $ctx -s "$sides" \\
    $codemoe $ll_shown
\`\`\`

$tables
<!-- load_compare:end -t $threads -->
EOF
)
    begin="<!-- load_compare:begin -t $threads " end="<!-- load_compare:end -t $threads "
    if [ -f "$doc" ] && grep -qF "$begin" "$doc"; then
        SECTION="$section" B="$begin" E="$end" awk '
            index($0, ENVIRON["B"]) == 1 { print ENVIRON["SECTION"]; skip = 1; next }
            index($0, ENVIRON["E"]) == 1 { skip = 0; next }
            !skip' "$doc" >"$doc.tmp" && mv "$doc.tmp" "$doc"
    else
        printf '\n%s\n' "$section" >>"$doc"
    fi
    echo "load_compare: updated $doc" >&2
fi
