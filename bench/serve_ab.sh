#!/usr/bin/env bash
# serve_ab.sh - builds of `codemoe serve` (and llama-server) side by side at 16 users, interleaved round by
# round, for A/B measurements of a serving change on a shared machine.
#
#   bench/serve_ab.sh [-r ROUNDS] [-w WORKLOAD] [-t THREADS] [-u USERS] NAME=BIN[:FLAGS]...
#
# NAME=BIN runs BIN serve with the bench model (bench/inputs.sh model45m), --threads THREADS --parallel 16
# --ctx 2048 --queue 256 and FLAGS (spaces as commas: --batch,1024); BIN may be "llama" for
# $LLAMA_SERVER with the same sequences and context (as bench/load_compare.sh starts it). Each round
# starts every server fresh in turn and runs bench/loadgen.mjs once (the run's request budget and
# duration as load_compare.sh's), then prints one line per server: tokens/s, TTFT p50, p99 and max,
# ITL p50 and p99 (ms; p99 as loadgen's, linear between ranks). Defaults: 3 rounds, humaneval, 1 thread,
# 16 users. Per-run JSON and logs in $TMPDIR/serve_ab.*.
set -u
[ "${CM_KEEP_OPENBLAS_CORETYPE:-0}" = 1 ] || unset OPENBLAS_CORETYPE # as load_compare.sh
here=$(cd "$(dirname "$0")" && pwd)
rounds=3 workload=humaneval threads=1 users=16
while getopts "r:w:t:u:h" o; do
    case $o in
    r) rounds=$OPTARG ;; w) workload=$OPTARG ;; t) threads=$OPTARG ;; u) users=$OPTARG ;;
    *) sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '5p' "$0" | sed 's/^# *//' >&2; exit 2; }
model=$("$here/inputs.sh" model45m) || exit 1
data=$("$here/inputs.sh" humaneval-x) || exit 1
logdir=$(mktemp -d -t serve_ab.XXXXXX)
requests=$((6 * users)); [ "$workload" = typing ] && requests=$((40 * users))
port=$(node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
for r in $(seq "$rounds"); do
    for spec in "$@"; do
        name=${spec%%=*} rest=${spec#*=}
        bin=${rest%%:*} flags=""
        [ "$rest" != "$bin" ] && flags=${rest#*:}
        if [ "$bin" = llama ]; then
            [ -x "${LLAMA_SERVER:-}" ] || { echo "serve_ab: set LLAMA_SERVER to llama-server" >&2; exit 2; }
            extra=""; "$LLAMA_SERVER" --help 2>&1 | grep -q -- '--no-kv-unified' && extra=--no-kv-unified
            "$LLAMA_SERVER" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -np 16 -c 32768 $extra \
                >"$logdir/$name-$r.log" 2>&1 &
        else
            "$bin" serve --model "$model" --host 127.0.0.1 --port "$port" --threads "$threads" --parallel 16 \
                --ctx 2048 --queue 256 ${flags//,/ } >"$logdir/$name-$r.log" 2>&1 &
        fi
        pid=$!
        for _ in $(seq 300); do
            [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
            sleep 0.1
        done
        node "$here/loadgen.mjs" --url "http://127.0.0.1:$port" --workload "$workload" --concurrency "$users" \
            --data "$data" --requests "$requests" --duration 20 --timeout 60 --max-tokens 16 \
            --json "$logdir/$name-$r.json" --quiet
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        node -e '
const j = JSON.parse(require("fs").readFileSync(process.argv[1]));
const q = (t, p) => { const x = p * (t.length - 1), i = Math.floor(x); return t[i] + (x - i) * ((t[i + 1] ?? t[i]) - t[i]); };
const t = j.records.filter(r => r.ttft_ms != null).map(r => r.ttft_ms).sort((a, b) => a - b);
const itl = [].concat(...j.records.map(r => r.itl_ms || [])).sort((a, b) => a - b);
const tok = j.records.reduce((a, r) => a + (r.tokens || 0), 0);
const dur = (Math.max(...j.records.map(r => r.end_ms)) - Math.min(...j.records.map(r => r.start_ms))) / 1e3;
console.log(`${process.argv[2].padEnd(12)} round ${process.argv[3]}  tok/s ${(tok / dur).toFixed(0).padStart(5)}  TTFT p50 ${q(t, .5).toFixed(1).padStart(6)}  p99 ${q(t, .99).toFixed(1).padStart(6)}  max ${t[t.length - 1].toFixed(0).padStart(4)}  ITL p50 ${q(itl, .5).toFixed(1)}  p99 ${q(itl, .99).toFixed(1)}`);
' "$logdir/$name-$r.json" "$name" "$r"
    done
done
echo "(per-run JSON and logs: $logdir)"
