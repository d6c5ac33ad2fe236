#!/usr/bin/env bash
# serve_rerun.sh - every serving measurement of docs/benchmarks.md "Serving against a current llama-server"
# in one command, for a quiet machine (nothing else running: the numbers are latencies).
#
#   bench/serve_rerun.sh [-o DOC] [-d SEC] [-l LOGDIR] CODEMOE LLAMA_SERVER
#
# 1. bench/load_compare.sh at 1 and 2 threads: 1, 4 and 16 users, the humaneval, fim and typing workloads,
#    codemoe (its defaults: prefill-first, no speculation), codemoe with --spec-draft 8, and llama-server,
#    interleaved; with -o the generated sections of DOC are replaced (per thread count);
# 2. bench/fair_load.mjs: one key flooding 50 concurrent requests, another typing, on a server with
#    --threads 1 --parallel 16, with and without --key-max-concurrent 3;
# 3. bench/lb_typing.sh: typing with 48 users on three replicas behind deploy/haproxy (1 thread each).
# Everything else goes to LOGDIR (default: a fresh directory under $TMPDIR); a summary is printed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
doc="" dur=20 logdir=""
while getopts "o:d:l:h" o; do
    case $o in
    o) doc=$OPTARG ;;
    d) dur=$OPTARG ;;
    l) logdir=$OPTARG ;;
    *) sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }
codemoe=$1 lserver=$2
[ -n "$logdir" ] || logdir=$(mktemp -d -t serve_rerun.XXXXXX)
mkdir -p "$logdir"
echo "serve_rerun: load average before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$logdir/summary.txt"
rc=0

for t in 1 2; do
    "$here/load_compare.sh" -t "$t" -c "1 4 16" -w "humaneval fim typing" -d "$dur" \
        -s "codemoe codemoe-spec llama.cpp" -l "$logdir/load-t$t" ${doc:+-o "$doc"} "$codemoe" "$lserver" \
        | tee -a "$logdir/summary.txt" || rc=1
done

model=$("$here/inputs.sh" model45m) || exit 1
free_port() { node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
for limit in 0 3; do
    port=$(free_port)
    "$codemoe" serve --model "$model" --host 127.0.0.1 --port "$port" --threads 1 --parallel 16 --queue 256 \
        --api-key kf --api-key kt --key-max-concurrent "$limit" >"$logdir/fair-limit$limit.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
        sleep 0.2
    done
    echo "== fair_load, --parallel 16, --key-max-concurrent $limit" | tee -a "$logdir/summary.txt"
    extra=()
    [ "$limit" -gt 0 ] && extra=(--no-same-key)
    node "$here/fair_load.mjs" --url "http://127.0.0.1:$port" --key-flood kf --key-typist kt --requests 40 \
        --json "$logdir/fair-limit$limit.json" "${extra[@]}" | tee -a "$logdir/summary.txt" || rc=1
    kill "$pid"
    wait "$pid" 2>/dev/null
done

echo "== lb_typing: 48 users, three replicas behind HAProxy" | tee -a "$logdir/summary.txt"
"$here/lb_typing.sh" -r 3 -u 48 -t 1 -d 30 -l "$logdir/lb" "$codemoe" | tee -a "$logdir/summary.txt" || rc=1
echo "serve_rerun: load average after: $(cut -d' ' -f1-3 /proc/loadavg); everything in $logdir" | tee -a "$logdir/summary.txt"
exit $rc
