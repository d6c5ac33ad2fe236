#!/usr/bin/env bash
# lb_typing.sh - the IDE typing workload across several `codemoe serve` replicas behind HAProxy with
# deploy/haproxy/haproxy.cfg (prefix affinity), as a team would run it: every user keeps its replica.
#
#   bench/lb_typing.sh [-m MODEL] [-r REPLICAS] [-u USERS] [-t THREADS] [-P PARALLEL] [-d SEC]
#                      [-n MAX_TOKENS] [-l LOGDIR] CODEMOE
#
# Starts REPLICAS (default 3) servers on loopback ports, each with THREADS compute threads (default 1) and
# PARALLEL sequences (default 16), renders the deploy/ config with those replicas as its server lines
# (nothing else of it changes), starts HAProxy on a free port, and runs bench/loadgen.mjs's typing
# workload with USERS (default 48) closed-loop users through the proxy, each sending its
# X-Codemoe-Affinity key. Prints loadgen's table (TTFT p50/p99, throughput) and each replica's prefix
# cache hit ratio. MODEL defaults to the 45M Q8_0 bench model (bench/inputs.sh model45m). Needs
# Debian's haproxy and node. The goal it checks (docs/benchmarks.md): typing TTFT p99 under 1 s at 48
# users on three replicas.
set -u
[ "${CM_KEEP_OPENBLAS_CORETYPE:-0}" = 1 ] || unset OPENBLAS_CORETYPE
here=$(cd "$(dirname "$0")" && pwd)
model="" replicas=3 users=48 threads=1 parallel=16 dur=30 maxtok=16 logdir=""
usage() {
    sed -n '4,5p' "$0" | sed 's/^# *//' >&2
    exit 2
}
while getopts "m:r:u:t:P:d:n:l:h" o; do
    case $o in
    m) model=$OPTARG ;;
    r) replicas=$OPTARG ;;
    u) users=$OPTARG ;;
    t) threads=$OPTARG ;;
    P) parallel=$OPTARG ;;
    d) dur=$OPTARG ;;
    n) maxtok=$OPTARG ;;
    l) logdir=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
codemoe=$1
[ -x "$codemoe" ] || { echo "lb_typing: $codemoe is not an executable" >&2; exit 2; }
command -v haproxy >/dev/null || { echo "lb_typing: haproxy is needed (apt-get install haproxy)" >&2; exit 2; }
command -v node >/dev/null || { echo "lb_typing: node is needed" >&2; exit 2; }
[ -n "$model" ] || model=$("$here/inputs.sh" model45m) || exit 1
data=$("$here/inputs.sh" humaneval-x) || exit 1
[ -n "$logdir" ] || logdir=$(mktemp -d -t lb_typing.XXXXXX)
mkdir -p "$logdir"

free_port() { node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$p" 2>/dev/null
    done
}
trap 'cleanup; exit 130' INT TERM
healthy() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health")" = 200 ]; }

ports=()
lines=""
for i in $(seq "$replicas"); do
    port=$(free_port)
    "$codemoe" serve --model "$model" --host 127.0.0.1 --port "$port" --threads "$threads" --parallel "$parallel" \
        --queue 256 --max-conn-per-ip 0 >"$logdir/replica$i.log" 2>&1 &
    pids+=($!)
    ports+=("$port")
    lines+="    server replica$i 127.0.0.1:$port"$'\n'
done
for p in "${ports[@]}"; do
    for _ in $(seq 300); do healthy "$p" && break; sleep 0.2; done
    healthy "$p" || { echo "lb_typing: replica on $p not healthy; logs in $logdir" >&2; cleanup; exit 1; }
done
lb=$(free_port)
LINES="$lines" awk '
    /# BEGIN replicas/ { print; printf "%s", ENVIRON["LINES"]; skip = 1; next }
    /# END replicas/ { skip = 0 }
    !skip' "$here/../deploy/haproxy/haproxy.cfg" >"$logdir/haproxy.cfg"
CODEMOE_LB_BIND="127.0.0.1:$lb" haproxy -f "$logdir/haproxy.cfg" >"$logdir/haproxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do healthy "$lb" && break; sleep 0.2; done
healthy "$lb" || { echo "lb_typing: haproxy not answering; see $logdir" >&2; cleanup; exit 1; }
sleep 3 # every replica marked up by the health checks (rise 2, fastinter 500 ms)

node "$here/loadgen.mjs" --url "http://127.0.0.1:$lb" --workload typing --concurrency "$users" --data "$data" \
    --requests $((40 * users)) --duration "$dur" --max-tokens "$maxtok" --affinity \
    --label "lb-$replicas-replicas" --json "$logdir/lb.json" --quiet
rc=$?
node "$here/loadgen.mjs" --report "$logdir/lb.json"
for i in "${!ports[@]}"; do
    curl -s "http://127.0.0.1:${ports[$i]}/metrics" |
        awk -v r="replica$((i + 1))" '/^codemoe_prefix_cache_hit_ratio/ { print r ": prefix cache hit ratio " $2 }'
done
cleanup
echo "(per-request JSON, server and proxy logs: $logdir)"
exit $rc
