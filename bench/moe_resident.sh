#!/usr/bin/env bash
# moe_resident.sh - resident memory of a Qwen3-MoE-shaped model (qwen3moe, 128 experts, top-8) with skewed
# and with spread routing, with and without --experts-resident.
#
#   bench/moe_resident.sh [-o OUTDIR] [-s D,F,LAYERS] [-k N] [-r REQUESTS] [-t THREADS] CODEMOE
#
# Makes the two models once (bench/moe_resident_make.py into OUTDIR, default the benchmark cache of
# bench/inputs.sh; shape -s, default 512,256,4: ~400 MB each), then for each model, without a limit and with --experts-resident N (default 32):
# starts `codemoe serve`, reads codemoe_model_resident_bytes once the model has loaded, sends REQUESTS
# (default 24) non-streamed completions of 32 tokens on distinct code prompts one after the other, and
# reads the residency again (a measurement starts at most every 2 s: the script waits for a fresh one).
# Prints one table row per run: experts that took tokens in layer 0, resident after load and after the
# requests, that as a share of the file, and generated tokens per second.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out="" shape=512,256,4 keep=32 reqs=24 threads=1
usage() { sed -n "5p" "$0" | sed 's/^# *//' >&2; exit 2; }
while getopts "o:s:k:r:t:h" o; do
    case $o in
    o) out=$OPTARG ;;
    s) shape=$OPTARG ;;
    k) keep=$OPTARG ;;
    r) reqs=$OPTARG ;;
    t) threads=$OPTARG ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] && [ -x "$1" ] || usage
codemoe=$1
command -v node >/dev/null || { echo "moe_resident: node is needed" >&2; exit 2; }
[ -n "$out" ] || out=$("$here/inputs.sh" dir)/moe-resident || exit 1
IFS=, read -r d f layers <<<"$shape"
/usr/bin/python3 "$here/moe_resident_make.py" "$out" "$d" "$f" "$layers" >/dev/null || exit 1
suffix=D$d-F$f-L$layers

pid=""
stop_server() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=""; }
trap 'stop_server; exit 130' INT TERM

echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r), --threads $threads, $reqs requests of 32 tokens"
echo
echo "| routing | --experts-resident | experts with tokens (layer 0) | resident after load | resident after requests | of the file | tok/s |"
echo "|---|---|---|---|---|---|---|"
for kind in skewed spread; do
    model=$out/qwen3moe-$kind-$suffix.gguf
    for limit in 0 "$keep"; do
        log=$(mktemp -t moe_resident.XXXXXX)
        "$codemoe" serve --model "$model" --threads "$threads" --experts-resident "$limit" --host 127.0.0.1 --port 0 \
            >/dev/null 2>"$log" &
        pid=$!
        port=""
        for _ in $(seq 600); do
            port=$(sed -n 's/.*"msg":"listening".*"port":\([0-9]*\).*/\1/p' "$log" | head -1)
            [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
            sleep 0.1
        done
        rm -f "$log"
        [ -n "$port" ] || { echo "moe_resident: the server did not start" >&2; stop_server; exit 1; }
        node - "$port" "$kind" "$limit" "$reqs" "$(stat -c %s "$model")" <<'JS'
const [port, kind, limit, reqs, size] = process.argv.slice(2);
const base = `http://127.0.0.1:${port}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const metric = async (name) => {
  const t = await (await fetch(base + '/metrics')).text();
  const m = t.match(new RegExp(`^${name}\\{[^}]*\\} (\\d+)`, 'm'));
  return m ? Number(m[1]) : 0;
};
/* a fresh measurement: one starts at most every 2 s, at a scrape, and lands shortly after */
const resident = async () => { await sleep(2100); await metric('codemoe_model_resident_bytes'); await sleep(400);
  return metric('codemoe_model_resident_bytes'); };
const mb = (b) => (b / 1e6).toFixed(1) + ' MB';
const atLoad = await resident();
const words = ['const', 'let', 'return', 'if', 'for', 'while', 'function', 'class', 'import', 'async', 'await',
  'x', 'y', 'items', 'map', 'filter', 'reduce', 'value', 'key', 'index', '=>', '{', '}', '(', ')', ';', '+', '*'];
let gen = 0, seed = 1;
const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const t0 = performance.now();
for (let i = 0; i < Number(reqs); i++) {
  const prompt = `// file ${i}\n` + Array.from({ length: 60 }, () => words[Math.floor(rnd() * words.length)]).join(' ');
  const r = await fetch(base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt, max_tokens: 32, temperature: 0.8, seed: i, logit_bias: { 296: -100 } }) });
  const j = await r.json();
  if (!j.usage) throw new Error(JSON.stringify(j));
  gen += j.usage.completion_tokens;
}
const secs = (performance.now() - t0) / 1000;
const after = await resident();
const t = await (await fetch(base + '/metrics')).text();
const used = new Set();
for (const m of t.matchAll(/^codemoe_expert_tokens_total\{[^}]*layer="0",expert="(\d+)",phase="[a-z]+"\} (\d+)/gm))
  if (Number(m[2]) > 0) used.add(m[1]);
console.log(`| ${kind} | ${limit === '0' ? 'no limit' : limit} | ${used.size} of 128 | ${mb(atLoad)} | ${mb(after)} | ` +
  `${(100 * after / Number(size)).toFixed(0)} % | ${(gen / secs).toFixed(0)} |`);
JS
        stop_server
    done
done
echo
echo "shape D=$d F=$f layers=$layers: $(stat -c %s "$out/qwen3moe-skewed-$suffix.gguf") bytes (each model)"
