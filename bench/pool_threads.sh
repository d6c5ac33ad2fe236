#!/usr/bin/env bash
# pool_threads.sh - two models in one `codemoe serve` pool under load, together and each alone.
#
#   bench/pool_threads.sh [-m MODEL] [-t THREADS] [-c CONC] [-d SEC] [-n MAX_TOKENS] CODEMOE
#
# One server serves MODEL twice, as models a and b with THREADS compute threads each and a --threads budget
# of 2 x THREADS (docs/server.md, the pool). CONC closed-loop clients per model send /v1/completions
# (temperature 0, MAX_TOKENS tokens, a distinct prompt each time so the prefix cache does not answer)
# for SEC seconds: first to a alone, then to b alone, then to both at once. Then the same with each
# model given the whole budget (threads=2 x THREADS each, --threads 4 x THREADS): what two workers do when
# nothing keeps them from oversubscribing the cores. Prints one table row per phase: generated tokens/s
# per model and in all, the median and 90th-percentile request latency, the CPU time the server used in
# the phase (user + system, /proc/PID/stat), generated tokens per CPU-second (the figure a busy machine
# disturbs least: it counts the work done, not the time the scheduler gave it) and the load average when
# the phase ended.
#
# MODEL defaults to the 45M Q8_0 benchmark model (bench/inputs.sh model45m). Run it on a quiet machine
# with at least 2 x THREADS cores.
set -u
here=$(cd "$(dirname "$0")" && pwd)
model="" threads=1 conc=4 dur=10 maxtok=32
usage() { sed -n '4p' "$0" | sed 's/^# *//' >&2; exit 2; }
while getopts "m:t:c:d:n:h" o; do
    case $o in
    m) model=$OPTARG ;;
    t) threads=$OPTARG ;;
    c) conc=$OPTARG ;;
    d) dur=$OPTARG ;;
    n) maxtok=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] && [ -x "$1" ] || usage
codemoe=$1
command -v node >/dev/null || { echo "pool_threads: node is needed" >&2; exit 2; }
[ -n "$model" ] || model=$("$here/inputs.sh" model45m) || exit 1

pid=""
stop_server() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=""; }
trap 'stop_server; exit 130' INT TERM

# start PER_MODEL_THREADS BUDGET: a and b on a free port ($port; $pid)
start() {
    local log
    log=$(mktemp -t pool_threads.XXXXXX)
    "$codemoe" serve --model "$model,id=a,threads=$1,parallel=$conc" --model "$model,id=b,threads=$1,parallel=$conc" \
        --threads "$2" --host 127.0.0.1 --port 0 >/dev/null 2>"$log" &
    pid=$!
    port=""
    for _ in $(seq 300); do
        port=$(sed -n 's/.*"msg":"listening".*"port":\([0-9]*\).*/\1/p' "$log" | head -1)
        [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        sleep 0.1
    done
    rm -f "$log"
}

# load PORT PHASE MODELS...: CONC clients per model for SEC seconds; one table row
load() {
    local port=$1 phase=$2
    shift 2
    node - "$port" "$phase" "$conc" "$dur" "$maxtok" "$pid" "$(getconf CLK_TCK)" "$@" <<'EOF'
const [port, phase, conc, dur, maxtok, pid, hz, ...models] = process.argv.slice(2);
const { readFileSync } = await import('node:fs');
/* the server's user + system CPU seconds so far */
const cpu = () => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / Number(hz);
};
const cpu0 = cpu();
const url = `http://127.0.0.1:${port}/v1/completions`;
const end = Date.now() + Number(dur) * 1000;
const tok = {}, lat = [];
let seq = 0;
async function client(model) {
  while (Date.now() < end) {
    const t0 = performance.now();
    const prompt = `// task ${seq++}: ${model}\nfunction add${seq}(a, b) {\n  return`;
    const r = await fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model, prompt, max_tokens: Number(maxtok), temperature: 0 }) });
    const j = await r.json();
    if (!j.usage) throw new Error(JSON.stringify(j));
    tok[model] = (tok[model] || 0) + j.usage.completion_tokens;
    lat.push(performance.now() - t0);
  }
}
const t0 = Date.now();
await Promise.all(models.flatMap((m) => Array.from({ length: Number(conc) }, () => client(m))));
const s = (Date.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(0);
const rate = (m) => (tok[m] ? (tok[m] / s).toFixed(0) : '-');
const all = Object.values(tok).reduce((a, b) => a + b, 0) / s;
const used = cpu() - cpu0;
const total = Object.values(tok).reduce((a, b) => a + b, 0);
const load = readFileSync('/proc/loadavg', 'utf8').split(' ')[0];
console.log(`| ${phase} | ${rate('a')} | ${rate('b')} | ${all.toFixed(0)} | ${q(0.5)} | ${q(0.9)} | ` +
  `${used.toFixed(1)} | ${used > 0 ? (total / used).toFixed(0) : '-'} | ${load} |`);
EOF
}

echo "model $(basename "$model"), $conc clients per model, max_tokens $maxtok, ${dur} s per phase, $(nproc) CPUs"
echo
echo "| phase | a tok/s | b tok/s | total tok/s | latency p50 ms | p90 ms | server CPU s | tok per CPU-s | load 1m |"
echo "|---|---|---|---|---|---|---|---|---|"
budget=$((2 * threads))
start "$threads" "$budget"
[ -n "$port" ] || { echo "pool_threads: the server did not start" >&2; stop_server; exit 1; }
load "$port" "a alone, threads=$threads of $budget" a
load "$port" "b alone, threads=$threads of $budget" b
load "$port" "a + b together, threads=$threads each of $budget" a b
stop_server
over=$((2 * threads))
start "$over" "$((2 * over))"
[ -n "$port" ] || { echo "pool_threads: the server did not start" >&2; stop_server; exit 1; }
load "$port" "a alone, threads=$over (oversubscribed pool)" a
load "$port" "a + b together, threads=$over each (oversubscribed)" a b
stop_server
